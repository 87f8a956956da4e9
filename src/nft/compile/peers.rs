//! Pods of other nodes coming, going, moving and changing memberships, brought into a
//! compiled table without compiling it again. Such a change moves addresses between the
//! peer classes the table already decides, so only set elements change: the ASG sets and
//! the stage chains' maps of peer pods with classes of their own. Compiling a large node
//! takes a good part of a second (4,096 rules, 10,000 pods); this takes milliseconds.
//! Anything else (a group, an ASG, a namespace or one of the node's own pods changed, or a
//! pod whose memberships give it a class the table has no chain for) is a full compile.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::HashMap;

use super::{
    ClassFn, CompileOptions, Compiler, Element, Ruleset, StageKey, Verdict, addr_value, class_fn,
    family_of, is_total, pod_addresses, pod_map, prefix_map, restrict, sides,
};
use crate::model::{Inventory, ObjectRef, Pod};
use crate::resolve::{Level, Resolved};

/// What [`update_peers`] needs to bring a compiled table to a later view of the cluster.
pub struct PeerIndex {
    /// The view the table was compiled from (shared with the caller, not copied).
    inventory: Arc<Inventory>,
    node: Option<String>,
    stages: StageIndex,
}

/// The stages a compile made.
pub(super) struct StageIndex {
    /// Every stage, to rebuild its rules from the later view.
    pub(super) stages: Vec<(StageKey, Level)>,
    /// The map layout's stages (none in the linear layout, which matches the ASG sets).
    pub(super) maps: Vec<PeerMaps>,
}

/// One stage of the map layout, as its peer pods are classified.
pub(super) struct PeerMaps {
    pub(super) key: StageKey,
    /// Each stage chain, with the variants (the rules holding for a local pod) it runs.
    pub(super) chains: Vec<(String, Vec<Vec<usize>>)>,
    /// Every class decision the stage makes, and the chain that makes it.
    pub(super) targets: HashMap<ClassFn, String>,
}

/// [`compile_with`](super::compile_with), and what [`update_peers`] needs later.
pub fn compile_indexed(
    inventory: &Arc<Inventory>,
    node: Option<&str>,
    opts: &CompileOptions,
) -> (Ruleset, PeerIndex) {
    let res = Resolved::new(inventory);
    let (table, stages) = Compiler::new(&res, opts, pod_addresses(&res)).run_indexed(node);
    let index = PeerIndex {
        inventory: inventory.clone(),
        node: node.map(String::from),
        stages,
    };
    (table, index)
}

/// `table` (compiled with `index`) brought to the view `inventory`, when all that changed
/// since is pods of other nodes; `index` then describes the result. `None` when it takes a
/// full compile.
pub fn update_peers(
    table: &Ruleset,
    index: &mut PeerIndex,
    inventory: &Arc<Inventory>,
    opts: &CompileOptions,
) -> Option<Ruleset> {
    let addresses = peer_changes(&index.inventory, inventory, index.node.as_deref()?)?;
    let res = Resolved::new(inventory);
    let mut c = Compiler::new(&res, opts, BTreeMap::new());
    for &(key, level) in &index.stages.stages {
        c.stage(key, level);
    }
    c.declare_sets();
    let mut out = table.clone();
    for set in std::mem::take(&mut c.sets).into_values() {
        let old = out.sets.iter_mut().find(|s| s.name == set.name)?;
        if !old.same_declaration(&set) {
            return None;
        }
        old.elements = set.elements;
    }
    for maps in &index.stages.maps {
        reclassify(&mut out, maps, &c, &addresses)?;
    }
    index.inventory = inventory.clone();
    Some(out)
}

/// Gives each address the pod-map entries of `maps`' stage chains that a full compile would
/// (see `Compiler::map_stage`): an entry where its class's chain is not the one its prefix
/// interval goes to.
fn reclassify(
    out: &mut Ruleset,
    maps: &PeerMaps,
    c: &Compiler,
    addresses: &[IpAddr],
) -> Option<()> {
    let stage = &c.stages[&maps.key];
    let rules = &stage.rules;
    let d = maps.key.1;
    let variants: Vec<&Vec<usize>> = maps.chains.iter().flat_map(|(_, vs)| vs).collect();
    let union: BTreeSet<usize> = variants.iter().copied().flatten().copied().collect();
    // The stage-wide class ends at the first rule matching everything in every variant.
    let stops = |i: usize| variants.iter().all(|v| v.contains(&i)) && is_total(&rules[i].rule);
    let mut broad_fns = HashMap::default();
    for &ip in addresses {
        let (fam, x) = (family_of(ip), addr_value(ip));
        let mut class = Vec::new();
        for &i in &union {
            if c.res.endpoint_contains(sides(&rules[i].rule, d).1, ip) {
                class.push(i);
                if stops(i) {
                    break;
                }
            }
        }
        for (chain, vs) in &maps.chains {
            // Variants share a chain because they classify alike; this pod must not split them.
            let mut target: Option<&String> = None;
            for v in vs {
                let f = class_fn(rules, &restrict(rules, &class, v), d, &mut broad_fns);
                let t = maps.targets.get(&f)?;
                if target.is_some_and(|prev| prev != t) {
                    return None;
                }
                target = Some(t);
            }
            let target = target?;
            let intervals = &out.set(&prefix_map(chain, fam))?.elements;
            let covering = &intervals[intervals.partition_point(|e| e.key[0].1 < x)];
            let wanted = match &covering.verdict {
                Some(Verdict::Goto(t)) if t == target => None,
                _ => Some(Element {
                    key: vec![(x, x)],
                    verdict: Some(Verdict::Goto(target.clone())),
                }),
            };
            let name = pod_map(chain, fam);
            let pods = &mut out.sets.iter_mut().find(|s| s.name == name)?.elements;
            let at = pods.binary_search_by(|e| e.key[0].cmp(&(x, x)));
            match (at, wanted) {
                (Ok(i), Some(e)) => pods[i] = e,
                (Ok(i), None) => {
                    pods.remove(i);
                }
                (Err(i), Some(e)) => pods.insert(i, e),
                (Err(_), None) => {}
            }
        }
    }
    Some(())
}

/// The addresses of the pods that changed from `before` to `after`, when nothing else the
/// node's table depends on did: the same groups, ASGs, tags, namespaces and ranges, and no
/// changed pod or address is one of `node`'s. `None` otherwise.
fn peer_changes(before: &Inventory, after: &Inventory, node: &str) -> Option<Vec<IpAddr>> {
    let same_rest = before.nsgs == after.nsgs
        && before.asgs == after.asgs
        && before.service_tags == after.service_tags
        && before.namespaces == after.namespaces
        && before.virtual_network == after.virtual_network
        && before.node_ips == after.node_ips;
    if !same_rest {
        return None;
    }
    let (old, new) = (pods_by_id(before), pods_by_id(after));
    let kept = |pods: &[Pod], other: &Inventory, other_ids: &HashMap<&ObjectRef, usize>| {
        pods.iter()
            .map(|p| other_ids.get(&p.id).is_some_and(|&i| other.pods[i] == *p))
            .collect::<Vec<bool>>()
    };
    let (kept_before, kept_after) = (
        kept(&before.pods, after, &new),
        kept(&after.pods, before, &old),
    );
    // Of two pods with one address, the first has it: the others must keep their order.
    if !kept_ids(&before.pods, &kept_before).eq(kept_ids(&after.pods, &kept_after)) {
        return None;
    }
    let on_node = |p: &&Pod| p.node_name.as_deref() == Some(node);
    let local: HashSet<IpAddr> = before
        .pods
        .iter()
        .chain(&after.pods)
        .filter(on_node)
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    let changed: Vec<&Pod> = before
        .pods
        .iter()
        .zip(&kept_before)
        .chain(after.pods.iter().zip(&kept_after))
        .filter(|(_, k)| !**k)
        .map(|(p, _)| p)
        .collect();
    if changed.iter().any(on_node) {
        return None;
    }
    let mut addresses: Vec<IpAddr> = changed.iter().flat_map(|p| p.ips.iter().copied()).collect();
    addresses.sort_unstable();
    addresses.dedup();
    if addresses.iter().any(|a| local.contains(a)) {
        return None;
    }
    Some(addresses)
}

fn pods_by_id(inv: &Inventory) -> HashMap<&ObjectRef, usize> {
    inv.pods
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.id, i))
        .collect()
}

fn kept_ids<'p>(pods: &'p [Pod], kept: &'p [bool]) -> impl Iterator<Item = &'p ObjectRef> {
    pods.iter()
        .zip(kept)
        .filter(|(_, k)| **k)
        .map(|(p, _)| &p.id)
}
