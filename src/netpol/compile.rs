//! The compilation itself; see the module docs of `crate::netpol` for the semantics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::model::{
    Access, AsgRef, Direction, Endpoint, IntervalSet, IpSet, NIC_NSG_LABEL, SecurityRule,
};
use crate::resolve::{Level, Resolved, Unresolved};

use super::peers::{PodClass, Term, Want, asg_selector, class_peers, cover_classes, ip_blocks};
use super::ports::{Bits, NpPorts, PortSpace};
use super::split::{MAX_POLICY_BYTES, split};
use super::types::{
    EgressRule, IngressRule, NetworkPolicy, NetworkPolicySpec, ObjectMeta, Peer, PolicyType,
    Selector, SelectorRequirement,
};
use super::{
    Compiled, Fidelity, MANAGED_BY_LABEL, MANAGED_BY_VALUE, Mode, NSG_LABEL, Reason, RuleReport,
    label_value,
};

/// One side of a rule, resolved: ASGs (members only ever match) or an address set.
enum Side {
    Asgs(Vec<AsgRef>),
    Prefixes(IpSet),
}

impl Side {
    fn new(res: &Resolved, endpoint: &Endpoint) -> Side {
        match endpoint {
            Endpoint::Asgs(asgs) => Side::Asgs(asgs.clone()),
            // A service tag that does not exist matches no address, as in the evaluator.
            Endpoint::Prefixes(prefixes) => Side::Prefixes(
                prefixes
                    .iter()
                    .filter_map(|p| res.prefix_set(p))
                    .fold(IpSet::empty(), |a, s| a.union(&s)),
            ),
        }
    }
}

struct CRule {
    stage: usize,
    report: usize,
    allow: bool,
    bits: Bits,
    /// The side the bound pod is on: destination inbound, source outbound.
    target: Side,
    /// The other end.
    peer: Side,
}

/// Everything about one direction of one combination of groups (the subnet's and the
/// interface's): the rules in evaluation order (stage, then priority) and the partition of
/// the peers into groups that every rule treats alike.
struct Ctx {
    stages: usize,
    rules: Vec<CRule>,
    space: PortSpace,
    /// Rules whose peer side names each ASG.
    by_asg: BTreeMap<AsgRef, Vec<u32>>,
    /// Non-pod addresses with the same matching rules.
    groups: Vec<AddrGroup>,
    /// Pod addresses with the same class, family and matching rules.
    peers: Vec<PeerGroup>,
}

struct PeerGroup {
    class: usize,
    v6: bool,
    /// Rules whose peer side matches: prefixes holding the addresses, ASGs of the class.
    rules: Vec<u32>,
}

struct AddrGroup {
    v6: bool,
    /// A node's address: traffic between a pod and its node is always allowed.
    node: bool,
    rules: Vec<u32>,
    set: IpSet,
}

/// A flow end the NSG can tell apart but NetworkPolicy cannot: one address family of the
/// selected pods and the rules whose target side applies to it.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Unit {
    v6: bool,
    applies: Vec<bool>,
}

fn ip_key(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u32::from(a) as u128),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

/// Sorted union of two sorted lists.
fn merge(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x == y => {
                i += 1;
                j += 1;
                x
            }
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(_), Some(&y)) | (None, Some(&y)) => {
                j += 1;
                y
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, None) => unreachable!(),
        };
        out.push(next);
    }
    out
}

/// Hears (rule, flows it decides) during a walk.
type Decided<'a> = dyn FnMut(u32, &Bits) + 'a;

impl Ctx {
    /// The allowed flows for one pair of ends, given the rules matching the peer (in order) and
    /// which rules apply to the target. `decided` hears every (rule, flows it decides among
    /// those the earlier stages let through), as the evaluator reports deciding rules.
    fn walk(&self, list: &[u32], applies: &[bool], mut decided: Option<&mut Decided>) -> Bits {
        let mut result = self.space.all();
        let mut seen = 0;
        let mut current: Option<usize> = None;
        let mut undecided = self.space.all();
        let mut allowed = self.space.empty();
        for &id in list {
            let rule = &self.rules[id as usize];
            if !applies[id as usize] {
                continue;
            }
            if current != Some(rule.stage) {
                if current.is_some() {
                    result.and_assign(&allowed);
                    if result.is_empty() {
                        return result;
                    }
                }
                current = Some(rule.stage);
                seen += 1;
                undecided = self.space.all();
                allowed = self.space.empty();
            }
            if undecided.is_empty() {
                continue;
            }
            let d = undecided.and(&rule.bits);
            if d.is_empty() {
                continue;
            }
            if rule.allow {
                allowed.or_assign(&d);
            }
            if let Some(f) = decided.as_mut() {
                // Only flows that earlier stages let through reach this one.
                let reaching = d.and(&result);
                if !reaching.is_empty() {
                    f(id, &reaching);
                }
            }
            undecided.minus_assign(&rule.bits);
        }
        if current.is_some() {
            result.and_assign(&allowed);
        }
        if seen < self.stages {
            // A stage where nothing matched denies (cannot happen with the default rules).
            return self.space.empty();
        }
        result
    }
}

/// What a target class is allowed, per peer, before it becomes NetworkPolicy rules.
struct Allowed {
    /// Per peer pod class: what the policy says, or `None` when the class exchanges no
    /// traffic with the target (no address of a common family).
    classes: Vec<Option<NpPorts>>,
    /// Per address group of the context.
    groups: Vec<Option<NpPorts>>,
}

pub(super) struct Compiler<'r, 'a> {
    res: &'r Resolved<'a>,
    mode: Mode,
    reports: Vec<RuleReport>,
    reasons: Vec<BTreeSet<Reason>>,
    /// (nsg, direction) → report index of each rule of `rules_for(direction)`.
    report_index: HashMap<(usize, Direction), Vec<usize>>,
    /// The addresses each pod owns (the first pod listing an address owns it).
    owned: Vec<Vec<IpAddr>>,
    classes: Vec<PodClass>,
    class_ips: Vec<IpSet>,
    /// Namespace → names of its ASGs.
    universe: BTreeMap<String, BTreeSet<String>>,
    /// Per family (IPv4, IPv6): every pod address with its owner's class, sorted.
    pod_points: [Vec<(u128, usize)>; 2],
    /// Per family: node addresses that are no pod's, sorted.
    node_points: [Vec<u128>; 2],
    /// Per family: pod and node addresses, sorted: cut out of the address groups.
    singles: [Vec<u128>; 2],
}

/// Labels of a pod class key: (namespace, subnet group, interface group).
type StageKey = (String, Option<usize>, Option<usize>);

impl<'r, 'a> Compiler<'r, 'a> {
    pub fn new(res: &'r Resolved<'a>, mode: Mode) -> Self {
        let inv = res.inv;
        let mut reports = Vec::new();
        let mut report_index = HashMap::new();
        for (i, nsg) in inv.nsgs.iter().enumerate() {
            let unresolved = res.unresolved(nsg);
            for direction in [Direction::Inbound, Direction::Outbound] {
                let mut idx = Vec::new();
                for rule in nsg.rules_for(direction) {
                    idx.push(reports.len());
                    let refs = Unresolved::of_rule(&unresolved, &rule);
                    reports.push(RuleReport {
                        nsg: nsg.id.clone(),
                        rule: rule.name.clone(),
                        priority: rule.priority,
                        direction,
                        access: rule.access,
                        is_default: rule.is_default,
                        fidelity: Fidelity::Exact,
                        unresolved: refs,
                    });
                }
                report_index.insert((i, direction), idx);
            }
        }
        let owned: Vec<Vec<IpAddr>> = inv
            .pods
            .iter()
            .enumerate()
            .map(|(p, pod)| {
                let mut ips: Vec<IpAddr> = pod
                    .ips
                    .iter()
                    .copied()
                    .filter(|ip| res.pod_by_ip(*ip) == Some(p))
                    .collect();
                ips.sort();
                ips.dedup();
                ips
            })
            .collect();
        let mut keys: BTreeMap<PodClass, usize> = BTreeMap::new();
        let mut pod_key: Vec<Option<PodClass>> = Vec::new();
        for (p, pod) in inv.pods.iter().enumerate() {
            if owned[p].is_empty() {
                pod_key.push(None);
                continue;
            }
            let class = PodClass {
                namespace: pod.id.namespace.clone(),
                asgs: res
                    .memberships(p)
                    .into_iter()
                    .map(|a| a.name.clone())
                    .collect(),
            };
            keys.insert(class.clone(), 0);
            pod_key.push(Some(class));
        }
        for (i, v) in keys.values_mut().enumerate() {
            *v = i;
        }
        let classes: Vec<PodClass> = keys.keys().cloned().collect();
        let pod_class: Vec<Option<usize>> = pod_key
            .iter()
            .map(|k| k.as_ref().map(|k| keys[k]))
            .collect();
        let mut class_ips = vec![IpSet::empty(); classes.len()];
        for (p, c) in pod_class.iter().enumerate() {
            if let Some(c) = c {
                class_ips[*c] = class_ips[*c].union(&IpSet::from_ips(owned[p].iter().copied()));
            }
        }
        let mut universe: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for asg in &inv.asgs {
            universe
                .entry(asg.id.namespace.clone())
                .or_default()
                .insert(asg.id.name.clone());
        }
        let reasons = vec![BTreeSet::new(); reports.len()];
        let mut pod_points: [Vec<(u128, usize)>; 2] = [vec![], vec![]];
        for (p, ips) in owned.iter().enumerate() {
            for ip in ips {
                let (v6, x) = ip_key(*ip);
                let class = pod_class[p].expect("pods with addresses have a class");
                pod_points[v6 as usize].push((x, class));
            }
        }
        let mut node_points: [Vec<u128>; 2] = [vec![], vec![]];
        let mut singles: [Vec<u128>; 2] = [vec![], vec![]];
        for v6 in [false, true] {
            let f = v6 as usize;
            pod_points[f].sort_unstable();
            let nodes = if v6 {
                &res.node_ips.v6
            } else {
                &res.node_ips.v4
            };
            node_points[f] = nodes
                .ranges()
                .iter()
                .flat_map(|&(a, b)| a..=b)
                .filter(|x| pod_points[f].binary_search_by_key(x, |p| p.0).is_err())
                .collect();
            singles[f] = pod_points[f]
                .iter()
                .map(|p| p.0)
                .chain(node_points[f].iter().copied())
                .collect();
            singles[f].sort_unstable();
        }
        Compiler {
            res,
            mode,
            reports,
            reasons,
            report_index,
            owned,
            classes,
            class_ips,
            universe,
            pod_points,
            node_points,
            singles,
        }
    }

    pub fn run(mut self) -> Compiled {
        let res = self.res;
        let mut by_key: BTreeMap<StageKey, Vec<usize>> = BTreeMap::new();
        for (p, pod) in res.inv.pods.iter().enumerate() {
            let ns = &pod.id.namespace;
            let (subnet, nic) = (res.subnet_nsg(ns), res.nic_nsg(p));
            if subnet.is_some() || nic.is_some() {
                by_key.entry((ns.clone(), subnet, nic)).or_default().push(p);
            }
        }
        let mut policies = Vec::new();
        for (key, pods) in &by_key {
            policies.extend(self.compile_key(key, pods));
        }
        policies.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        let mut report = self.reports;
        for (r, reasons) in report.iter_mut().zip(self.reasons) {
            if !reasons.is_empty() {
                r.fidelity = Fidelity::NotExpressible(reasons.into_iter().collect());
            }
        }
        Compiled { policies, report }
    }

    fn context(&self, key: &StageKey, direction: Direction) -> Ctx {
        let (_, subnet, nic) = key;
        let stages: Vec<usize> = match direction {
            Direction::Inbound => [*subnet, *nic],
            Direction::Outbound => [*nic, *subnet],
        }
        .into_iter()
        .flatten()
        .collect();
        let all_rules: Vec<Vec<SecurityRule>> = stages
            .iter()
            .map(|&i| self.res.inv.nsgs[i].rules_for(direction))
            .collect();
        let flat: Vec<&SecurityRule> = all_rules.iter().flatten().collect();
        let space = PortSpace::new(&flat);
        let mut rules = Vec::new();
        for (stage, (&nsg, list)) in stages.iter().zip(&all_rules).enumerate() {
            let idx = &self.report_index[&(nsg, direction)];
            for (k, rule) in list.iter().enumerate() {
                let (target, peer) = match direction {
                    Direction::Inbound => (&rule.destination, &rule.source),
                    Direction::Outbound => (&rule.source, &rule.destination),
                };
                rules.push(CRule {
                    stage,
                    report: idx[k],
                    allow: rule.access == Access::Allow,
                    bits: space.rule_bits(rule),
                    target: Side::new(self.res, target),
                    peer: Side::new(self.res, peer),
                });
            }
        }
        let mut by_asg: BTreeMap<AsgRef, Vec<u32>> = BTreeMap::new();
        for (id, r) in rules.iter().enumerate() {
            if let Side::Asgs(asgs) = &r.peer {
                for a in asgs {
                    by_asg.entry(a.clone()).or_default().push(id as u32);
                }
            }
        }
        for v in by_asg.values_mut() {
            v.dedup();
        }
        let mut ctx = Ctx {
            stages: stages.len(),
            rules,
            space,
            by_asg,
            groups: vec![],
            peers: vec![],
        };
        self.partition(&mut ctx);
        ctx
    }

    /// Cuts each address family into intervals on which every rule's peer prefixes agree,
    /// then groups the pod addresses by (class, family, matching rules), the node addresses by
    /// matching rules, and what remains of the intervals by matching rules.
    fn partition(&self, ctx: &mut Ctx) {
        // Distinct sets of rules whose prefixes hold an interval, interned.
        let mut lists: Vec<Vec<u32>> = Vec::new();
        let mut list_ids: HashMap<Vec<u32>, usize> = HashMap::new();
        let mut pod_keys: BTreeSet<(usize, bool, usize)> = BTreeSet::new();
        for v6 in [false, true] {
            let f = v6 as usize;
            let max = if v6 { u128::MAX } else { u32::MAX as u128 };
            let mut events: Vec<(u128, bool, u32)> = Vec::new();
            for (id, r) in ctx.rules.iter().enumerate() {
                if let Side::Prefixes(set) = &r.peer {
                    let ranges = if v6 { &set.v6 } else { &set.v4 };
                    for &(a, b) in ranges.ranges() {
                        events.push((a, true, id as u32));
                        if b < max {
                            events.push((b + 1, false, id as u32));
                        }
                    }
                }
            }
            events.sort_unstable();
            // Intervals: their first addresses and the interned rule list of each.
            let (mut starts, mut ids): (Vec<u128>, Vec<usize>) = (Vec::new(), Vec::new());
            let mut active: BTreeSet<u32> = BTreeSet::new();
            let mut e = 0;
            loop {
                let start = match (starts.is_empty(), events.get(e)) {
                    (true, _) => 0,
                    (false, Some(ev)) => ev.0,
                    (false, None) => break,
                };
                while e < events.len() && events[e].0 == start {
                    let (_, add, id) = events[e];
                    if add {
                        active.insert(id);
                    } else {
                        active.remove(&id);
                    }
                    e += 1;
                }
                let list: Vec<u32> = active.iter().copied().collect();
                let id = *list_ids.entry(list.clone()).or_insert_with(|| {
                    lists.push(list);
                    lists.len() - 1
                });
                starts.push(start);
                ids.push(id);
            }
            let interval_of = |x: u128| ids[starts.partition_point(|&s| s <= x) - 1];
            // Other addresses: each interval minus the pod and node addresses in it, grouped
            // by rule list; node addresses apart.
            let mut index: HashMap<(usize, bool), usize> = HashMap::new();
            let mut ranges: Vec<Vec<(u128, u128)>> = Vec::new();
            let first = ctx.groups.len();
            let mut add = |id: usize, node: bool, range: (u128, u128)| {
                let g = *index.entry((id, node)).or_insert_with(|| {
                    ctx.groups.push(AddrGroup {
                        v6,
                        node,
                        rules: lists[id].clone(),
                        set: IpSet::empty(),
                    });
                    ranges.push(Vec::new());
                    ctx.groups.len() - 1
                });
                ranges[g - first].push(range);
            };
            let singles = &self.singles[f];
            for (k, &start) in starts.iter().enumerate() {
                let end = starts.get(k + 1).map_or(max, |n| n - 1);
                let mut cur = Some(start);
                for &x in &singles[singles.partition_point(|&y| y < start)..] {
                    if x > end {
                        break;
                    }
                    if let Some(c) = cur
                        && c < x
                    {
                        add(ids[k], false, (c, x - 1));
                    }
                    cur = x.checked_add(1);
                }
                if let Some(c) = cur
                    && c <= end
                {
                    add(ids[k], false, (c, end));
                }
            }
            for &x in &self.node_points[f] {
                add(interval_of(x), true, (x, x));
            }
            for (g, r) in ranges.into_iter().enumerate() {
                let set = IntervalSet::from_ranges(r);
                ctx.groups[first + g].set = if v6 {
                    IpSet {
                        v4: IntervalSet::empty(),
                        v6: set,
                    }
                } else {
                    IpSet {
                        v4: set,
                        v6: IntervalSet::empty(),
                    }
                };
            }
            for &(x, class) in &self.pod_points[f] {
                pod_keys.insert((class, v6, interval_of(x)));
            }
        }
        let mut class_rules: HashMap<usize, Vec<u32>> = HashMap::new();
        for (class, v6, list_id) in pod_keys {
            let asg_rules = class_rules.entry(class).or_insert_with(|| {
                let c = &self.classes[class];
                let mut ids: Vec<u32> = c
                    .asgs
                    .iter()
                    .filter_map(|name| {
                        ctx.by_asg.get(&AsgRef {
                            namespace: c.namespace.clone(),
                            name: name.clone(),
                        })
                    })
                    .flatten()
                    .copied()
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            });
            ctx.peers.push(PeerGroup {
                class,
                v6,
                rules: merge(&lists[list_id], asg_rules),
            });
        }
    }

    fn units(&self, ctx: &Ctx, pods: &[usize]) -> Vec<Unit> {
        let mut units: Vec<Unit> = Vec::new();
        for &p in pods {
            for &ip in &self.owned[p] {
                let applies = ctx
                    .rules
                    .iter()
                    .map(|r| match &r.target {
                        Side::Asgs(asgs) => asgs.iter().any(|a| self.res.is_member(p, a)),
                        Side::Prefixes(set) => set.contains(ip),
                    })
                    .collect();
                let unit = Unit {
                    v6: ip.is_ipv6(),
                    applies,
                };
                if !units.contains(&unit) {
                    units.push(unit);
                }
            }
        }
        units
    }

    /// Decides what one element (a peer class or an address group) gets, from every pair of
    /// ends it stands for, and marks the rules deciding flows where a NetworkPolicy cannot be
    /// exact (in either mode) with the reason.
    fn settle(&mut self, ctx: &Ctx, pairs: &[(&[u32], &[bool], Bits)], node: bool) -> NpPorts {
        let space = &ctx.space;
        let mut lower = space.all();
        let mut upper = space.empty();
        for (_, _, a) in pairs {
            lower.and_assign(a);
            upper.or_assign(a);
        }
        let lower_s = space.project_source_ports(&lower, Mode::Strict);
        let upper_s = space.project_source_ports(&upper, Mode::Permissive);
        let strict = space.to_np(&lower_s, Mode::Strict);
        let permissive = space.to_np(&upper_s, Mode::Permissive);
        let keep = space.comparable();
        let sports = lower.minus(&lower_s).or(&upper_s.minus(&upper)).and(keep);
        let icmp = lower_s
            .minus(&space.np_bits(&strict))
            .or(&space.np_bits(&permissive).minus(&upper_s))
            .and(keep);
        for (list, applies, a) in pairs {
            let mut masks: Vec<(Bits, Reason)> = Vec::new();
            let mixed = a.minus(&lower).or(&upper.minus(a)).and(keep);
            for (m, reason) in [
                (mixed, Reason::PodAddressedByCidr),
                (sports.clone(), Reason::SourcePortsNotExpressible),
                (icmp.clone(), Reason::IcmpNotExpressible),
            ] {
                if !m.is_empty() {
                    masks.push((m, reason));
                }
            }
            if node {
                let m = keep.minus(a);
                if !m.is_empty() {
                    masks.push((m, Reason::NodeTrafficNotBlockable));
                }
            }
            if masks.is_empty() {
                continue;
            }
            let reasons = &mut self.reasons;
            let mut mark = |id: u32, d: &Bits| {
                for (m, reason) in &masks {
                    if d.intersects(m) {
                        reasons[ctx.rules[id as usize].report].insert(*reason);
                    }
                }
            };
            ctx.walk(list, applies, Some(&mut mark));
        }
        match self.mode {
            Mode::Strict => strict,
            Mode::Permissive => permissive,
        }
    }

    fn allowed(&mut self, ctx: &Ctx, units: &[Unit]) -> Allowed {
        // Peer pods: every (class, family, matching rules) against every target unit.
        let mut per_class: Vec<Vec<(&[u32], usize, Bits)>> = vec![Vec::new(); self.classes.len()];
        for g in &ctx.peers {
            for (u, unit) in units.iter().enumerate().filter(|(_, u)| u.v6 == g.v6) {
                let a = ctx.walk(&g.rules, &unit.applies, None);
                per_class[g.class].push((&g.rules, u, a));
            }
        }
        let mut classes = Vec::with_capacity(self.classes.len());
        for pairs in &per_class {
            if pairs.is_empty() {
                classes.push(None);
                continue;
            }
            let refs: Vec<(&[u32], &[bool], Bits)> = pairs
                .iter()
                .map(|(l, u, a)| (*l, units[*u].applies.as_slice(), a.clone()))
                .collect();
            classes.push(Some(self.settle(ctx, &refs, false)));
        }
        // Addresses that are no pod's.
        let mut groups = Vec::with_capacity(ctx.groups.len());
        for g in &ctx.groups {
            let pairs: Vec<(&[u32], &[bool], Bits)> = units
                .iter()
                .filter(|u| u.v6 == g.v6)
                .map(|u| {
                    (
                        g.rules.as_slice(),
                        u.applies.as_slice(),
                        ctx.walk(&g.rules, &u.applies, None),
                    )
                })
                .collect();
            groups.push((!pairs.is_empty()).then(|| self.settle(ctx, &pairs, g.node)));
        }
        Allowed { classes, groups }
    }

    /// NetworkPolicy rules (ports, peers) for what `allowed` says, from a policy in `ns`.
    fn np_rules(
        &self,
        ctx: &Ctx,
        allowed: &Allowed,
        ns: &str,
    ) -> Vec<(Vec<super::types::NetworkPolicyPort>, Vec<Peer>)> {
        let specs: BTreeSet<&NpPorts> = allowed
            .classes
            .iter()
            .chain(&allowed.groups)
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        // Every group's ranges in address order, once: the union of any of the groups is then
        // a filter of this list, merged in one pass, instead of a sort per port spec.
        let mut ordered: [Vec<(u128, u128, usize)>; 2] = [Vec::new(), Vec::new()];
        for (g, group) in ctx.groups.iter().enumerate() {
            for (family, set) in [&group.set.v4, &group.set.v6].into_iter().enumerate() {
                ordered[family].extend(set.ranges().iter().map(|&(a, b)| (a, b, g)));
            }
        }
        ordered.iter_mut().for_each(|o| o.sort_unstable());
        let groups_where = |keep: &dyn Fn(usize) -> bool| {
            let [v4, v6] = ordered.each_ref().map(|o| {
                IntervalSet::from_ordered(o.iter().filter(|r| keep(r.2)).map(|r| (r.0, r.1)))
            });
            IpSet { v4, v6 }
        };
        let mut out = Vec::new();
        for spec in specs {
            let want: Vec<Want> = allowed
                .classes
                .iter()
                .map(|c| match c {
                    Some(x) if x == spec => Want::On,
                    Some(x) if !x.covers(spec) => Want::Off,
                    _ => Want::DontCare,
                })
                .collect();
            // Per group, once: must the spec's peers hold it, or must they leave it out?
            let (required_groups, off_groups): (Vec<bool>, Vec<bool>) = allowed
                .groups
                .iter()
                .map(|s| match s {
                    Some(x) if x == spec => (true, false),
                    Some(x) if !x.covers(spec) => (false, true),
                    _ => (false, false),
                })
                .unzip();
            let required = groups_where(&|g| required_groups[g]);
            let off_pods: Vec<&IpSet> = want
                .iter()
                .zip(&self.class_ips)
                .filter(|(w, _)| **w == Want::Off)
                .map(|(_, ips)| ips)
                .collect();
            let off_pods = IpSet {
                v4: IntervalSet::from_ranges(
                    off_pods.iter().flat_map(|s| s.v4.ranges().iter().copied()),
                ),
                v6: IntervalSet::from_ranges(
                    off_pods.iter().flat_map(|s| s.v6.ranges().iter().copied()),
                ),
            };
            let forbidden = groups_where(&|g| off_groups[g]).union(&off_pods);
            let peers = if forbidden.is_empty() && !want.contains(&Want::Off) {
                vec![]
            } else {
                let terms: Vec<Term> = cover_classes(&self.classes, &want, &self.universe, false);
                let mut peers = class_peers(&terms, ns);
                peers.extend(
                    ip_blocks(&required, &forbidden.complement())
                        .into_iter()
                        .map(|b| Peer {
                            ip_block: Some(b),
                            ..Peer::default()
                        }),
                );
                peers
            };
            out.push((spec.to_ports(), peers));
        }
        out
    }

    fn compile_key(&mut self, key: &StageKey, pods: &[usize]) -> Vec<NetworkPolicy> {
        let (ns, subnet, nic) = key;
        let ctxs = [
            self.context(key, Direction::Inbound),
            self.context(key, Direction::Outbound),
        ];
        // ASGs of this namespace whose membership decides whether a rule applies to a pod.
        let relevant: BTreeSet<String> = ctxs
            .iter()
            .flat_map(|c| &c.rules)
            .filter_map(|r| match &r.target {
                Side::Asgs(a) => Some(a),
                Side::Prefixes(_) => None,
            })
            .flatten()
            .filter(|a| a.namespace == *ns && self.res.asg_exists(a))
            .map(|a| a.name.clone())
            .collect();
        let mut targets: BTreeMap<BTreeSet<String>, Vec<usize>> = BTreeMap::new();
        for &p in pods {
            if self.owned[p].is_empty() {
                continue; // No traffic can reach it; the next compilation after it gets an address covers it.
            }
            let names = self
                .res
                .memberships(p)
                .into_iter()
                .map(|a| a.name.clone())
                .filter(|n| relevant.contains(n))
                .collect();
            targets.entry(names).or_default().push(p);
        }
        // Content of each target class.
        type Content = (Vec<IngressRule>, Vec<EgressRule>);
        let mut contents: Vec<(BTreeSet<String>, Content)> = Vec::new();
        for (names, members) in &targets {
            let mut ingress = Vec::new();
            let mut egress = Vec::new();
            for (ctx, direction) in ctxs.iter().zip([Direction::Inbound, Direction::Outbound]) {
                let units = self.units(ctx, members);
                let allowed = self.allowed(ctx, &units);
                for (ports, peers) in self.np_rules(ctx, &allowed, ns) {
                    match direction {
                        Direction::Inbound => ingress.push(IngressRule { ports, from: peers }),
                        Direction::Outbound => egress.push(EgressRule { ports, to: peers }),
                    }
                }
            }
            contents.push((names.clone(), (ingress, egress)));
        }
        // One policy per conjunction of membership labels that selects classes of equal content.
        let target_classes: Vec<PodClass> = contents
            .iter()
            .map(|(names, _)| PodClass {
                namespace: ns.clone(),
                asgs: names.clone(),
            })
            .collect();
        let universe = BTreeMap::from([(ns.clone(), relevant.clone())]);
        let distinct: BTreeSet<&Content> = contents.iter().map(|(_, c)| c).collect();
        let owner = nic.or(*subnet).expect("a key has at least one group");
        let owner_name = &self.res.inv.nsgs[owner].id.name;
        let mut policies = Vec::new();
        for content in distinct {
            let want: Vec<Want> = contents
                .iter()
                .map(|(_, c)| if c == content { Want::On } else { Want::Off })
                .collect();
            for term in cover_classes(&target_classes, &want, &universe, true) {
                let mut selector = asg_selector(&term.asgs);
                match nic {
                    Some(n) => {
                        selector.match_labels.insert(
                            NIC_NSG_LABEL.to_string(),
                            label_value(&self.res.inv.nsgs[*n].id.name),
                        );
                    }
                    None => {
                        selector
                            .match_expressions
                            .push(SelectorRequirement::exists(NIC_NSG_LABEL, false));
                        selector.match_expressions.sort();
                    }
                }
                let policy = self.policy(ns, owner_name, *subnet, *nic, selector, content);
                policies.extend(split(policy, MAX_POLICY_BYTES));
            }
        }
        policies
    }

    fn policy(
        &self,
        ns: &str,
        owner: &str,
        subnet: Option<usize>,
        nic: Option<usize>,
        selector: Selector,
        (ingress, egress): &(Vec<IngressRule>, Vec<EgressRule>),
    ) -> NetworkPolicy {
        let mut hasher = Sha256::new();
        hasher.update(ns.as_bytes());
        hasher.update([0]);
        hasher.update(serde_json::to_vec(&selector).expect("serializable"));
        let hash: String = hasher
            .finalize()
            .iter()
            .take(5)
            .map(|b| format!("{b:02x}"))
            .collect();
        // 253 characters at most, with room for a part's suffix (`-2`, see `split`).
        let prefix: String = owner.chars().take(253 - 15 - 6).collect();
        let name = format!("nsg-{}-{hash}", prefix.trim_end_matches(['-', '.']));
        let labels = BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
            (NSG_LABEL.to_string(), label_value(owner)),
        ]);
        let mut annotations = BTreeMap::new();
        let nsgs = &self.res.inv.nsgs;
        for (level, i) in [(Level::Subnet, subnet), (Level::NetworkInterface, nic)] {
            if let Some(i) = i {
                let key = match level {
                    Level::Subnet => super::SUBNET_NSG_ANNOTATION,
                    Level::NetworkInterface => super::NIC_NSG_ANNOTATION,
                };
                annotations.insert(key.to_string(), nsgs[i].id.name.clone());
            }
        }
        annotations.insert(super::MODE_ANNOTATION.to_string(), self.mode.to_string());
        NetworkPolicy {
            api_version: "networking.k8s.io/v1".into(),
            kind: "NetworkPolicy".into(),
            metadata: ObjectMeta {
                name,
                namespace: ns.to_string(),
                labels,
                annotations,
            },
            spec: NetworkPolicySpec {
                pod_selector: selector,
                policy_types: vec![PolicyType::Ingress, PolicyType::Egress],
                ingress: ingress.clone(),
                egress: egress.clone(),
            },
        }
    }
}
