//! Pod churn brought into a compiled table without compiling it again: pods coming, going,
//! moving, changing addresses or memberships. Such a change moves addresses between the
//! peer classes, variants and pod chains the table already has, so only set elements change:
//! the ASG sets, the stage chains' maps of peer pods with classes of their own, and the
//! node's dispatch maps. Compiling a large node takes a good part of a second (4,096 rules,
//! 10,000 pods); this takes milliseconds. Anything else (a group, an ASG, a namespace, a tag
//! or a range changed), or a pod that needs a class, variant or pod chain the table does not
//! have, is a full compile.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::HashMap;

use super::{
    ClassFn, CompileOptions, Compiler, Element, Ruleset, StageKey, Verdict, addr_value, asg_stem,
    class_fn, dispatch_map, family_of, is_total, local_pod, pod_addresses, pod_map, prefix_map,
    restrict, sides,
};
use crate::model::{AsgRef, Direction, Inventory, ObjectRef, Pod};
use crate::resolve::{Level, Resolved};

/// What [`update_pods`] needs to bring a compiled table to a later view of the cluster.
pub struct PodIndex {
    /// The view the table was compiled from (shared with the caller, not copied).
    inventory: Arc<Inventory>,
    node: Option<String>,
    stages: StageIndex,
}

/// The stages a compile made.
pub(super) struct StageIndex {
    /// Every stage, to rebuild its rules from the later view.
    pub(super) stages: Vec<(StageKey, Level)>,
    /// The stage chain of each variant (the rules of a stage holding for a local pod).
    pub(super) variant_chains: BTreeMap<(StageKey, Vec<usize>), String>,
    /// The pod chain of each sequence of stage chains, per direction.
    pub(super) pod_chains: BTreeMap<(Direction, Vec<String>), String>,
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

/// [`compile_with`](super::compile_with), and what [`update_pods`] needs later.
pub fn compile_indexed(
    inventory: &Arc<Inventory>,
    node: Option<&str>,
    opts: &CompileOptions,
) -> (Ruleset, PodIndex) {
    let res = Resolved::new(inventory);
    let (table, stages) = Compiler::new(&res, opts, pod_addresses(&res)).run_indexed(node);
    let index = PodIndex {
        inventory: inventory.clone(),
        node: node.map(String::from),
        stages,
    };
    (table, index)
}

/// `table` (compiled with `index`) brought to the view `inventory`, when all that changed
/// since is pods; `index` then describes the result. `None` when it takes a full compile.
pub fn update_pods(
    table: &Ruleset,
    index: &mut PodIndex,
    inventory: &Arc<Inventory>,
    opts: &CompileOptions,
) -> Option<Ruleset> {
    let addresses = pod_changes(&index.inventory, inventory)?;
    let res = Resolved::new(inventory);
    let mut c = Compiler::new(&res, opts, BTreeMap::new());
    for &(key, level) in &index.stages.stages {
        c.stage(key, level);
    }
    // Of the named sets, only the ASGs' move with pods.
    for asg in &inventory.asgs {
        let asg = AsgRef::from(&asg.id);
        if table.set(&format!("{}.v4", asg_stem(&asg))).is_some() {
            c.declare_asg(&asg);
        }
    }
    let mut out = table.clone();
    for set in std::mem::take(&mut c.sets).into_values() {
        let old = out.sets.iter_mut().find(|s| s.name == set.name)?;
        if !old.same_declaration(&set) {
            return None;
        }
        old.elements = set.elements;
    }
    for &ip in &addresses {
        for d in [Direction::Inbound, Direction::Outbound] {
            let chain = pod_chain(&c, &index.stages, index.node.as_deref(), d, ip)?;
            let wanted = chain.map(|name| Verdict::Jump(name.clone()));
            set_element(
                &mut out,
                &dispatch_map(d, family_of(ip)),
                addr_value(ip),
                wanted,
            )?;
        }
    }
    for maps in &index.stages.maps {
        reclassify(&mut out, maps, &c, &addresses)?;
    }
    index.inventory = inventory.clone();
    Some(out)
}

/// The pod chain an address of the node's pods goes to in direction `d` (as `Compiler::run`
/// picks it): `Some(None)` for an address that is no pod's of `node` or whose pod has no
/// group, `None` when the table has no chain for it.
fn pod_chain<'i>(
    c: &Compiler,
    index: &'i StageIndex,
    node: Option<&str>,
    d: Direction,
    ip: IpAddr,
) -> Option<Option<&'i String>> {
    let res = c.res;
    let Some(p) = local_pod(res, node, ip) else {
        return Some(None);
    };
    let stages = res.stages(p, d);
    if stages.is_empty() {
        return Some(None);
    }
    let mut seq = Vec::new();
    for (_, nsg) in stages {
        let key = (nsg, d);
        if !c.stages.contains_key(&key) {
            return None;
        }
        seq.push(
            index
                .variant_chains
                .get(&(key, c.variant(key, ip)))?
                .clone(),
        );
    }
    index.pod_chains.get(&(d, seq)).map(Some)
}

/// Sets (or, with `None`, removes) the element of address `x` in a map of single addresses.
fn set_element(out: &mut Ruleset, map: &str, x: u128, verdict: Option<Verdict>) -> Option<()> {
    let elements = &mut out.sets.iter_mut().find(|s| s.name == map)?.elements;
    let at = elements.binary_search_by(|e| e.key[0].cmp(&(x, x)));
    let wanted = verdict.map(|v| Element {
        key: vec![(x, x)],
        verdict: Some(v),
    });
    match (at, wanted) {
        (Ok(i), Some(e)) => elements[i] = e,
        (Ok(i), None) => {
            elements.remove(i);
        }
        (Err(i), Some(e)) => elements.insert(i, e),
        (Err(_), None) => {}
    }
    Some(())
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
                _ => Some(Verdict::Goto(target.clone())),
            };
            set_element(out, &pod_map(chain, fam), x, wanted)?;
        }
    }
    Some(())
}

/// The addresses of the pods that changed from `before` to `after`, when nothing else the
/// table depends on did (the same groups, ASGs, tags, namespaces and ranges). `None`
/// otherwise.
fn pod_changes(before: &Inventory, after: &Inventory) -> Option<Vec<IpAddr>> {
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
    let mut addresses: Vec<IpAddr> = (before.pods.iter().zip(&kept_before))
        .chain(after.pods.iter().zip(&kept_after))
        .filter(|(_, kept)| !**kept)
        .flat_map(|(p, _)| p.ips.iter().copied())
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
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
