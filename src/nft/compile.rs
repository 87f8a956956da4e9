//! From the resolved model to one node's table (see `super` for the layout).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

// foldhash (seeded per process) rather than SipHash: hashing the class keys here (rule-index
// vectors, port boxes) was a quarter of compiling a large node.
use foldhash::HashMap;

use crate::model::{
    AddressPrefix, AsgRef, Direction, Endpoint, IntervalSet, IpSet, PortRange, Protocol,
    SecurityRule, WellKnownTag,
};
use crate::resolve::{Level, Resolved};

use super::ruleset::*;

mod pods;
use pods::{PeerMaps, StageIndex};
pub use pods::{PodIndex, compile_indexed, update_pods};

/// The table the agent owns.
pub const TABLE: &str = "kube-nsg";

/// How a stage's rules become nftables statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Layout {
    /// Disjoint intervals in verdict maps: a fixed number of lookups per packet.
    #[default]
    Maps,
    /// One nftables rule per NSG rule (and address alternative), tried in order: the
    /// readable, naive form whose cost grows with the rule count; kept as the baseline of the
    /// benchmarks and as a second compilation the property tests check.
    Linear,
}

/// Whether traffic between the node itself and its pods (kubelet probes come from the node
/// IPs, which are the `AzureLoadBalancer` tag) is subject to the pods' groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum HostTraffic {
    /// Input and output hooks run the pods' outbound and inbound stages too, as in Azure,
    /// where a rule denying `AzureLoadBalancer` stops health probes.
    #[default]
    Enforce,
    /// Only the forward hook: the node reaches its pods whatever the groups say.
    Exempt,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CompileOptions {
    pub table: String,
    pub layout: Layout,
    pub host_traffic: HostTraffic,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            table: TABLE.into(),
            layout: Layout::Maps,
            host_traffic: HostTraffic::Enforce,
        }
    }
}

/// The table for the pods of `node` (`None`: every pod, as if the cluster were one node).
pub fn compile(res: &Resolved, node: Option<&str>) -> Ruleset {
    compile_with(res, node, &CompileOptions::default())
}

pub fn compile_with(res: &Resolved, node: Option<&str>, opts: &CompileOptions) -> Ruleset {
    Compiler::new(res, opts, pod_addresses(res)).run(node)
}

/// Every pod address of the cluster (the pod it resolves to has it), sorted per family.
fn pod_addresses(res: &Resolved) -> BTreeMap<Family, Vec<u128>> {
    let mut pod_ips: BTreeMap<Family, Vec<u128>> = BTreeMap::new();
    for (p, pod) in res.inv.pods.iter().enumerate() {
        for &ip in pod.ips.iter().filter(|ip| res.pod_by_ip(**ip) == Some(p)) {
            pod_ips
                .entry(family_of(ip))
                .or_default()
                .push(addr_value(ip));
        }
    }
    for v in pod_ips.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    pod_ips
}

/// Names must be nftables identifiers (letters, digits, `/ - _ .`) of at most 255 bytes.
fn ident(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "/-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.len() <= 200 {
        return clean;
    }
    use sha2::Digest;
    let hash = sha2::Sha256::digest(s.as_bytes());
    let hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", &clean[..180])
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "in",
        Direction::Outbound => "out",
    }
}

/// Comments are limited to 128 bytes and must not contain quotes.
fn comment(s: &str) -> String {
    let mut c: String = s
        .chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect();
    while c.len() > 128 {
        c.pop();
    }
    c
}

/// The side of a rule the stage's own pod is on, and the other.
fn sides(rule: &SecurityRule, d: Direction) -> (&Endpoint, &Endpoint) {
    match d {
        Direction::Inbound => (&rule.destination, &rule.source),
        Direction::Outbound => (&rule.source, &rule.destination),
    }
}

fn peer_side(d: Direction) -> Side {
    match d {
        Direction::Inbound => Side::Src,
        Direction::Outbound => Side::Dst,
    }
}

fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() { Family::V4 } else { Family::V6 }
}

fn family_set(s: &IpSet, fam: Family) -> &IntervalSet {
    match fam {
        Family::V4 => &s.v4,
        Family::V6 => &s.v6,
    }
}

fn addr_value(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Matches every packet: protocol any and no port restriction.
fn is_total(r: &SecurityRule) -> bool {
    r.protocol == Protocol::Any && !r.restricts_ports()
}

fn all_ports(ranges: &[PortRange]) -> bool {
    ranges.iter().any(PortRange::is_all)
}

/// A group and the direction of its rules.
type StageKey = (usize, Direction);
/// Stage chains, class chains, the stage chain of each variant, and the stage's index.
type MapStage = (Vec<Chain>, Vec<Chain>, Vec<(Vec<usize>, String)>, PeerMaps);

/// One group in one direction, as the compiler sees it.
struct Stage {
    /// `in/NS/NAME`: the prefix of every chain and map of the stage.
    base: String,
    level: Level,
    level_hint: String,
    rules: Vec<StageRule>,
}

struct StageRule {
    rule: SecurityRule,
    /// The per-rule counting chain.
    chain: String,
    /// The addresses on the peer's side (ASG members and tags resolved): empty until
    /// `Compiler::resolve_peers`.
    peer: IpSet,
    /// The same without ASG members: what holds for addresses that are no pod's.
    peer_prefixes: IpSet,
}

/// One way an address can be on one side of a rule.
enum Alt {
    Any,
    Set { name: String, negate: bool },
    Literal(Vec<Span>),
}

/// Decision of one peer class: first-match rule (index into the stage's rules) per protocol,
/// ports and source ports. A complete one decides every packet; a partial one decides only
/// where the class's own (specific) rules win and leaves the rest to `fallback`, the complete
/// decision of the broad rules (tags, any) that many classes share: so a broad rule's ports
/// are written once per context, not once per class.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ClassFn {
    tcp: Vec<PortBox>,
    udp: Vec<PortBox>,
    icmp: Option<usize>,
    other: Option<usize>,
    fallback: Option<Box<ClassFn>>,
}

/// Disjoint boxes of (destination ports, source ports) that cover every pair.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PortBox {
    dport: (u16, u16),
    sport: (u16, u16),
    rule: usize,
}

impl ClassFn {
    /// The rule deciding every packet of the class, if one does.
    fn total(&self) -> Option<usize> {
        let single = |b: &[PortBox]| (b.len() == 1).then(|| b[0].rule);
        match (
            single(&self.tcp),
            single(&self.udp),
            self.fallback.is_none(),
        ) {
            (Some(t), Some(u), true) if t == u && Some(t) == self.icmp && Some(t) == self.other => {
                Some(t)
            }
            _ => None,
        }
    }
}

/// The classification of peer addresses one stage variant makes, per family: pod addresses
/// whose class is their own (exact), then intervals for every other address.
type Classification = BTreeMap<Family, (Vec<(u128, usize)>, Vec<(Span, usize)>)>;

struct Compiler<'r, 'a> {
    res: &'r Resolved<'a>,
    opts: &'r CompileOptions,
    stages: BTreeMap<(usize, Direction), Stage>,
    asg_ips: BTreeMap<AsgRef, IpSet>,
    sets: BTreeMap<String, Set>,
    /// Every pod address of the cluster (peers may be on any node), sorted.
    pod_ips: BTreeMap<Family, Vec<u128>>,
}

impl<'r, 'a> Compiler<'r, 'a> {
    fn new(
        res: &'r Resolved<'a>,
        opts: &'r CompileOptions,
        pod_ips: BTreeMap<Family, Vec<u128>>,
    ) -> Self {
        Compiler {
            res,
            opts,
            stages: BTreeMap::new(),
            asg_ips: BTreeMap::new(),
            sets: BTreeMap::new(),
            pod_ips,
        }
    }

    fn run(self, node: Option<&str>) -> Ruleset {
        self.run_indexed(node).0
    }

    fn run_indexed(mut self, node: Option<&str>) -> (Ruleset, StageIndex) {
        let res = self.res;
        // The node's pod addresses. An address another pod claims first is that pod's (as in
        // the evaluator), and a node address is never a pod's: a host-network pod must not
        // put the node's own traffic under its groups.
        let mut local: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for pod in &res.inv.pods {
            for &ip in &pod.ips {
                if let Some(p) = local_pod(res, node, ip) {
                    local.insert(ip, p);
                }
            }
        }

        // Each local address, per direction: its stages, each with the rules whose local side
        // holds the address (a rule naming an ASG as the local side applies to members only).
        type Variant = Vec<usize>;
        let mut per_ip: BTreeMap<(Direction, IpAddr), Vec<(StageKey, Variant)>> = BTreeMap::new();
        let mut variants: BTreeMap<(usize, Direction), BTreeSet<Variant>> = BTreeMap::new();
        for d in [Direction::Inbound, Direction::Outbound] {
            for (&ip, &p) in &local {
                let stages = res.stages(p, d);
                if stages.is_empty() {
                    continue; // pods without a group are not touched
                }
                for &(level, nsg) in &stages {
                    let key = (nsg, d);
                    self.stage(key, level);
                    let v = self.variant(key, ip);
                    variants.entry(key).or_default().insert(v.clone());
                    per_ip.entry((d, ip)).or_default().push((key, v));
                }
            }
        }

        self.resolve_peers();
        self.declare_sets();

        // Stage chains, and for each variant the chain that runs it.
        let mut stage_chains = Vec::new();
        let mut class_chains = Vec::new();
        let mut variant_chain: BTreeMap<((usize, Direction), Variant), String> = BTreeMap::new();
        let mut peer_maps = Vec::new();
        for (&key, vs) in &variants {
            match self.opts.layout {
                Layout::Linear => {
                    let chain = self.linear_stage(key);
                    for v in vs {
                        variant_chain.insert((key, v.clone()), chain.name.clone());
                    }
                    stage_chains.push(chain);
                }
                Layout::Maps => {
                    let (chains, classes, names, index) = self.map_stage(key, vs);
                    variant_chain.extend(names.into_iter().map(|(v, n)| ((key, v), n)));
                    stage_chains.extend(chains);
                    class_chains.extend(classes);
                    peer_maps.push(index);
                }
            }
        }

        // Pod chains: one per distinct sequence of stage chains.
        let mut sequences: BTreeMap<(Direction, Vec<String>), Vec<IpAddr>> = BTreeMap::new();
        for ((d, ip), stages) in &per_ip {
            let seq = stages
                .iter()
                .map(|(k, v)| variant_chain[&(*k, v.clone())].clone())
                .collect();
            sequences.entry((*d, seq)).or_default().push(*ip);
        }
        let mut pod_chains = Vec::new();
        let mut pod_chain_names = BTreeMap::new();
        let mut dispatch: BTreeMap<(Direction, Family), Vec<Element>> = BTreeMap::new();
        let mut counts: BTreeMap<Direction, usize> = BTreeMap::new();
        for ((d, seq), ips) in &sequences {
            let n = counts.entry(*d).or_default();
            let name = format!("pods-{}/{n}", dir_name(*d));
            *n += 1;
            pod_chain_names.insert((*d, seq.clone()), name.clone());
            let described: Vec<String> = per_ip[&(*d, ips[0])]
                .iter()
                .map(|((nsg, _), _)| self.stages[&(*nsg, *d)].level_hint.clone())
                .collect();
            let mut rules = vec![Rule::verdict(
                vec![Match::CtState(vec![CtState::Invalid])],
                Verdict::Drop,
            )];
            rules.extend(
                seq.iter()
                    .map(|s| Rule::verdict(vec![], Verdict::Jump(s.clone()))),
            );
            pod_chains.push(Chain {
                name: name.clone(),
                hook: None,
                comment: Some(comment(&format!(
                    "{}: {}",
                    match d {
                        Direction::Inbound => "inbound",
                        Direction::Outbound => "outbound",
                    },
                    described.join(", then ")
                ))),
                rules,
            });
            for ip in ips {
                let v = addr_value(*ip);
                dispatch
                    .entry((*d, family_of(*ip)))
                    .or_default()
                    .push(Element {
                        key: vec![(v, v)],
                        verdict: Some(Verdict::Jump(name.clone())),
                    });
            }
        }
        for d in [Direction::Inbound, Direction::Outbound] {
            for fam in Family::BOTH {
                let mut elements = dispatch.remove(&(d, fam)).unwrap_or_default();
                elements.sort();
                let name = dispatch_map(d, fam);
                self.sets.insert(
                    name.clone(),
                    Set {
                        name,
                        key: vec![Field::Addr(fam, Side::Src).key_type()],
                        is_map: true,
                        interval: false,
                        comment: Some(format!(
                            "{} pod addresses of this node with a group",
                            fam.suffix()
                        )),
                        elements,
                    },
                );
            }
        }

        // Per-rule counting chains: every rule of every compiled stage, so the counters read
        // like the groups (a shadowed rule shows 0).
        let mut rule_chains = BTreeMap::new();
        let mut counting = Vec::new();
        for (&(nsg, d), stage) in &self.stages {
            let id = &res.inv.nsgs[nsg].id;
            for sr in &stage.rules {
                let r = &sr.rule;
                let verdict = match r.access {
                    crate::model::Access::Allow => Verdict::Return,
                    crate::model::Access::Deny => Verdict::Drop,
                };
                counting.push(Chain {
                    name: sr.chain.clone(),
                    hook: None,
                    comment: None,
                    rules: vec![Rule {
                        matches: vec![],
                        counter: true,
                        action: Action::Verdict(verdict),
                        comment: Some(comment(&format!(
                            "{id} {} ({} {}): {}",
                            r.name,
                            match d {
                                Direction::Inbound => "inbound",
                                Direction::Outbound => "outbound",
                            },
                            r.priority,
                            match r.access {
                                crate::model::Access::Allow => "allow",
                                crate::model::Access::Deny => "deny",
                            }
                        ))),
                    }],
                });
                rule_chains.insert(
                    sr.chain.clone(),
                    RuleRef {
                        nsg: id.clone(),
                        direction: d,
                        rule: r.name.clone(),
                        priority: r.priority,
                        access: r.access,
                    },
                );
            }
        }
        counting.sort_by(|a, b| a.name.cmp(&b.name));

        let mut chains = self.base_chains();
        chains.extend(pod_chains);
        chains.extend(stage_chains);
        chains.extend(class_chains);
        chains.extend(counting);
        let index = StageIndex {
            stages: self.stages.iter().map(|(&k, s)| (k, s.level)).collect(),
            variant_chains: variant_chain,
            pod_chains: pod_chain_names,
            maps: peer_maps,
        };
        let rs = Ruleset {
            table: self.opts.table.clone(),
            sets: self.sets.into_values().collect(),
            chains,
            rule_chains,
        };
        (rs, index)
    }

    /// Declares the named sets every compiled rule refers to (both layouts keep them).
    fn declare_sets(&mut self) {
        let keys: Vec<(usize, Direction)> = self.stages.keys().copied().collect();
        for &key in &keys {
            for i in 0..self.stages[&key].rules.len() {
                let rule = self.stages[&key].rules[i].rule.clone();
                for fam in Family::BOTH {
                    self.alternatives(&rule.source, fam);
                    self.alternatives(&rule.destination, fam);
                }
            }
        }
    }

    fn base_chains(&self) -> Vec<Chain> {
        let established = Rule::verdict(
            vec![Match::CtState(vec![CtState::Established, CtState::Related])],
            Verdict::Accept,
        );
        // Neighbour discovery between a pod and its host is link plumbing, not traffic a
        // group filters (Azure exempts its platform traffic likewise).
        let nd = Rule::verdict(vec![Match::Icmpv6Type(ND_TYPES.to_vec())], Verdict::Accept);
        let dispatch = |d: Direction| {
            let side = match d {
                Direction::Outbound => Side::Src,
                Direction::Inbound => Side::Dst,
            };
            Family::BOTH.map(|fam| {
                Rule::new(
                    vec![],
                    Action::Vmap {
                        key: vec![Field::Addr(fam, side)],
                        map: dispatch_map(d, fam),
                    },
                )
            })
        };
        let base = |hook: Hook, comment: &str, mut rules: Vec<Rule>| {
            rules.insert(0, established.clone());
            Chain {
                name: hook.name().into(),
                hook: Some(hook),
                comment: Some(comment.into()),
                rules,
            }
        };
        let mut forward = vec![];
        forward.extend(dispatch(Direction::Outbound));
        forward.extend(dispatch(Direction::Inbound));
        let mut chains = vec![base(
            Hook::Forward,
            "routed traffic: the source pod's outbound stages, then the destination pod's inbound",
            forward,
        )];
        if self.opts.host_traffic == HostTraffic::Enforce {
            let mut input = vec![nd.clone()];
            input.extend(dispatch(Direction::Outbound));
            let mut output = vec![nd];
            output.extend(dispatch(Direction::Inbound));
            chains.push(base(
                Hook::Input,
                "pod to node: the pod's outbound stages",
                input,
            ));
            chains.push(base(
                Hook::Output,
                "node to pod: the pod's inbound stages",
                output,
            ));
        }
        chains
    }

    /// Builds (once) the rules of a group in a direction.
    fn stage(&mut self, key: (usize, Direction), level: Level) {
        if self.stages.contains_key(&key) {
            return;
        }
        let (nsg, d) = key;
        let group = &self.res.inv.nsgs[nsg];
        let base = ident(&format!(
            "{}/{}/{}",
            dir_name(d),
            group.id.namespace,
            group.id.name
        ));
        let mut used = BTreeSet::new();
        let mut rules = Vec::new();
        for rule in group.rules_for(d) {
            let mut chain = ident(&format!("{base}/{}", rule.priority));
            let mut n = 1;
            while !used.insert(chain.clone()) {
                chain = ident(&format!("{base}/{}-{n}", rule.priority)); // duplicate priority
                n += 1;
            }
            rules.push(StageRule {
                rule,
                chain,
                peer: IpSet::empty(),
                peer_prefixes: IpSet::empty(),
            });
        }
        let level_hint = format!(
            "{} {}",
            match level {
                Level::Subnet => "subnet",
                Level::NetworkInterface => "network interface",
            },
            group.id
        );
        self.stages.insert(
            key,
            Stage {
                base,
                level,
                level_hint,
                rules,
            },
        );
    }

    /// The rules of a stage whose local side holds a pod address (its variant).
    fn variant(&self, key: StageKey, ip: IpAddr) -> Vec<usize> {
        self.stages[&key]
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| self.res.endpoint_contains(sides(&r.rule, key.1).0, ip))
            .map(|(i, _)| i)
            .collect()
    }

    /// Resolves the peer addresses of every stage's rules, which cutting the address space
    /// needs (an update of peer pods asks the model about each address instead).
    fn resolve_peers(&mut self) {
        let keys: Vec<StageKey> = self.stages.keys().copied().collect();
        for key in keys {
            for i in 0..self.stages[&key].rules.len() {
                let ep = sides(&self.stages[&key].rules[i].rule, key.1).1.clone();
                let peer = self.endpoint_set(&ep);
                let sr = &mut self.stages.get_mut(&key).expect("listed above").rules[i];
                if matches!(ep, Endpoint::Prefixes(_)) {
                    sr.peer_prefixes = peer.clone();
                }
                sr.peer = peer;
            }
        }
    }

    fn asg_set(&mut self, asg: &AsgRef) -> IpSet {
        if let Some(s) = self.asg_ips.get(asg) {
            return s.clone();
        }
        let res = self.res;
        // An address is a member's when the pod it resolves to is a member (as in the evaluator).
        let ips = res.members(asg).flat_map(|p| {
            res.inv.pods[p]
                .ips
                .iter()
                .copied()
                .filter(move |ip| res.pod_by_ip(*ip) == Some(p))
        });
        let set = IpSet::from_ips(ips);
        self.asg_ips.insert(asg.clone(), set.clone());
        set
    }

    fn endpoint_set(&mut self, ep: &Endpoint) -> IpSet {
        match ep {
            Endpoint::Prefixes(ps) => ps
                .iter()
                .filter_map(|p| self.res.prefix_set(p))
                .fold(IpSet::empty(), |a, b| a.union(&b)),
            Endpoint::Asgs(asgs) => asgs
                .iter()
                .fold(IpSet::empty(), |a, asg| a.union(&self.asg_set(asg))),
        }
    }

    /// Declares a named address set (both families) with the given members. ASG members are
    /// listed one address each (`points`), so a pod joining is an element added, not a range
    /// re-split.
    fn named_set(&mut self, stem: &str, comment_text: &str, members: &IpSet, points: bool) {
        for fam in Family::BOTH {
            let name = format!("{stem}.{}", fam.suffix());
            if self.sets.contains_key(&name) {
                continue;
            }
            let ranges = family_set(members, fam).ranges();
            let elements = if points {
                ranges
                    .iter()
                    .flat_map(|&(a, b)| (a..=b).map(|v| (v, v)))
                    .collect::<Vec<Span>>()
            } else {
                ranges.to_vec()
            };
            let elements = elements
                .into_iter()
                .map(|r| Element {
                    key: vec![r],
                    verdict: None,
                })
                .collect();
            self.sets.insert(
                name.clone(),
                Set {
                    name,
                    key: vec![Field::Addr(fam, Side::Src).key_type()],
                    is_map: false,
                    // Points are hash sets: `nft` 1.0.6 fetches every element of every
                    // interval set in the ruleset before any `add element`, so interval
                    // sets of pod addresses make each membership change slow.
                    interval: !points,
                    comment: Some(comment(comment_text)),
                    elements,
                },
            );
        }
    }

    /// Declares the set of an ASG's members; returns its stem.
    fn declare_asg(&mut self, asg: &AsgRef) -> String {
        let stem = asg_stem(asg);
        let members = self.asg_set(asg);
        self.named_set(&stem, &format!("members of ASG {asg}"), &members, true);
        stem
    }

    /// The ways an address of `fam` can be in `ep`; empty when none can.
    fn alternatives(&mut self, ep: &Endpoint, fam: Family) -> Vec<Alt> {
        let mut alts = Vec::new();
        match ep {
            Endpoint::Asgs(asgs) => {
                for asg in asgs {
                    if !self.res.asg_exists(asg) {
                        continue; // names nothing: matches no address
                    }
                    let stem = self.declare_asg(asg);
                    alts.push(Alt::Set {
                        name: format!("{stem}.{}", fam.suffix()),
                        negate: false,
                    });
                }
            }
            Endpoint::Prefixes(prefixes) => {
                let mut literal = IpSet::empty();
                for p in prefixes {
                    match p {
                        AddressPrefix::Any => return vec![Alt::Any],
                        AddressPrefix::Net(n) => literal = literal.union(&IpSet::from_net(*n)),
                        AddressPrefix::Tag(name) => {
                            let Some(members) = self.res.prefix_set(p) else {
                                continue;
                            };
                            let (stem, negate) = match WellKnownTag::parse(name) {
                                Some(WellKnownTag::Internet) => {
                                    // Internet is everything outside VirtualNetwork.
                                    let vnet = self.res.virtual_network.clone();
                                    self.tag_set(WellKnownTag::VirtualNetwork.name(), &vnet);
                                    (format!("tag/{}", WellKnownTag::VirtualNetwork.name()), true)
                                }
                                Some(t) => (self.tag_set(t.name(), &members), false),
                                None => (self.tag_set(&name.to_ascii_lowercase(), &members), false),
                            };
                            alts.push(Alt::Set {
                                name: format!("{stem}.{}", fam.suffix()),
                                negate,
                            });
                        }
                    }
                }
                let spans = family_set(&literal, fam).ranges().to_vec();
                if !spans.is_empty() {
                    alts.push(Alt::Literal(spans));
                }
            }
        }
        alts
    }

    fn tag_set(&mut self, name: &str, members: &IpSet) -> String {
        let stem = ident(&format!("tag/{name}"));
        self.named_set(&stem, &format!("service tag {name}"), members, false);
        stem
    }

    /// The naive layout: the rules in order, each a conjunction of set lookups.
    fn linear_stage(&mut self, key: (usize, Direction)) -> Chain {
        let (_, d) = key;
        let n = self.stages[&key].rules.len();
        let mut rules = Vec::new();
        for i in 0..n {
            let (rule, chain) = {
                let sr = &self.stages[&key].rules[i];
                (sr.rule.clone(), sr.chain.clone())
            };
            let (local_ep, peer_ep) = sides(&rule, d);
            let (local_side, peer) = match d {
                Direction::Inbound => (Side::Dst, Side::Src),
                Direction::Outbound => (Side::Src, Side::Dst),
            };
            for fam in Family::BOTH {
                let Some(proto) = linear_protocol(&rule, fam) else {
                    continue;
                };
                let locals = self.alternatives(local_ep, fam);
                let peers = self.alternatives(peer_ep, fam);
                for l in &locals {
                    for p in &peers {
                        let mut matches = Vec::new();
                        // Address matches also pin the family; a rule with neither side
                        // restricted says so explicitly.
                        let before = matches.len();
                        push_alt(&mut matches, fam, local_side, l);
                        push_alt(&mut matches, fam, peer, p);
                        if matches.len() == before {
                            matches.push(Match::Addr {
                                family: fam,
                                side: Side::Src,
                                negate: false,
                                set: AddrSet::Literal(vec![(0, fam.max())]),
                            });
                        }
                        matches.extend(proto.iter().cloned());
                        rules.push(Rule::verdict(matches, Verdict::Goto(chain.clone())));
                    }
                }
            }
        }
        let stage = &self.stages[&key];
        Chain {
            name: stage.base.clone(),
            hook: None,
            comment: Some(comment(&stage.level_hint)),
            rules,
        }
    }

    /// The map layout of one group in one direction: per variant (set of rules whose local
    /// side holds the pod), a classification of peer addresses into classes, and per class a
    /// chain of port maps. Returns the stage chains, the class chains and each variant's chain.
    fn map_stage(&mut self, key: (usize, Direction), variants: &BTreeSet<Vec<usize>>) -> MapStage {
        let (_, d) = key;
        let stage = &self.stages[&key];
        let mut fns: Vec<ClassFn> = Vec::new();
        let mut fn_ids: HashMap<ClassFn, usize> = HashMap::default();
        let mut memo: HashMap<Vec<usize>, usize> = HashMap::default();
        let mut broad_fns = HashMap::default();
        let mut id_of = |class: Vec<usize>| -> usize {
            if let Some(&id) = memo.get(&class) {
                return id;
            }
            let f = class_fn(&stage.rules, &class, d, &mut broad_fns);
            let mut intern = |f: ClassFn| {
                let next = fns.len();
                *fn_ids.entry(f.clone()).or_insert_with(|| {
                    fns.push(f);
                    next
                })
            };
            if let Some(fb) = &f.fallback {
                intern((**fb).clone());
            }
            let id = intern(f);
            memo.insert(class, id);
            id
        };
        // Pod addresses are scattered through the address space with their memberships, so
        // they get exact (hash) entries where their class differs from the surrounding
        // prefixes'; the interval map then holds only the structure of prefixes and tags, and
        // pod churn never touches it.
        // The address space is cut once for all variants: a variant's class is its part of
        // the stage-wide class (whose rules stop at the first that matches everything in every
        // variant).
        let union: Vec<usize> = variants
            .iter()
            .flatten()
            .copied()
            .collect::<BTreeSet<usize>>()
            .into_iter()
            .collect();
        let in_all: BTreeSet<usize> = union
            .iter()
            .copied()
            .filter(|i| variants.iter().all(|v| v.contains(i)))
            .collect();
        let mut atoms = BTreeMap::new();
        for fam in Family::BOTH {
            for prefixes_only in [true, false] {
                let cut = peer_atoms(&stage.rules, &union, fam, prefixes_only, &in_all);
                atoms.insert((fam, prefixes_only), cut);
            }
        }
        let mut classified: Vec<(Vec<usize>, Classification)> = Vec::new();
        for v in variants {
            let mut cls = Classification::new();
            for fam in Family::BOTH {
                let (cut, classes) = &atoms[&(fam, true)];
                let ids: Vec<usize> = classes
                    .iter()
                    .map(|c| id_of(restrict(&stage.rules, c, v)))
                    .collect();
                let mut intervals: Vec<(Span, usize)> = Vec::new();
                for &(span, c) in cut {
                    let id = ids[c];
                    match intervals.last_mut() {
                        Some((prev, last)) if *last == id => prev.1 = span.1,
                        _ => intervals.push((span, id)),
                    }
                }
                let (cut, classes) = &atoms[&(fam, false)];
                let mut ids: Vec<Option<usize>> = vec![None; classes.len()];
                let at = |items: &[(Span, usize)], x: u128| {
                    items[items.partition_point(|(s, _)| s.1 < x)].1
                };
                let mut pods = Vec::new();
                for &x in self.pod_ips.get(&fam).into_iter().flatten() {
                    let c = at(cut, x);
                    let id = *ids[c]
                        .get_or_insert_with(|| id_of(restrict(&stage.rules, &classes[c], v)));
                    if id != at(&intervals, x) {
                        pods.push((x, id));
                    }
                }
                cls.insert(fam, (pods, intervals));
            }
            classified.push((v.clone(), cls));
        }

        // Class chains, named in the order of their content so names do not depend on the
        // order pods were seen in.
        let mut order: Vec<usize> = (0..fns.len())
            .filter(|&i| fns[i].total().is_none())
            .collect();
        order.sort_by(|&a, &b| fns[a].cmp(&fns[b]));
        let mut target: Vec<String> = fns
            .iter()
            .map(|f| {
                f.total()
                    .map(|r| stage.rules[r].chain.clone())
                    .unwrap_or_default()
            })
            .collect();
        for (k, &i) in order.iter().enumerate() {
            target[i] = ident(&format!("{}/c{k}", stage.base));
        }
        let mut class_chains = Vec::new();
        let mut maps = PortMaps::default();
        for &i in &order {
            let fallback = fns[i]
                .fallback
                .as_ref()
                .map(|fb| target[fn_ids[&**fb]].as_str());
            class_chains.push(class_chain(
                &target[i],
                &fns[i],
                &stage.rules,
                fallback,
                (&stage.base, &mut maps),
            ));
        }
        for set in maps.into_sets(&stage.base, &stage.level_hint) {
            self.sets.insert(set.name.clone(), set);
        }

        // Stage chains: variants whose classification came out the same share one.
        // (family, exact pod entry, interval, target)
        type Content = Vec<(Family, bool, Span, String)>;
        let mut contents: BTreeMap<Content, Vec<Vec<usize>>> = BTreeMap::new();
        for (v, cls) in classified {
            let mut content = Content::new();
            for (fam, (pods, intervals)) in &cls {
                content.extend(
                    pods.iter()
                        .map(|(x, id)| (*fam, true, (*x, *x), target[*id].clone())),
                );
                content.extend(
                    intervals
                        .iter()
                        .map(|(s, id)| (*fam, false, *s, target[*id].clone())),
                );
            }
            contents.entry(content).or_default().push(v);
        }
        let single = contents.len() == 1;
        let base = stage.base.clone();
        let hint = stage.level_hint.clone();
        // Rules that hold for some of the node's pods and not others tell the variants apart.
        let all: BTreeSet<usize> = variants.iter().flatten().copied().collect();
        let telling: Vec<usize> = all
            .into_iter()
            .filter(|i| !variants.iter().all(|v| v.contains(i)))
            .collect();
        let mut stage_chains = Vec::new();
        let mut names = Vec::new();
        let mut chain_variants = Vec::new();
        for (k, (content, vs)) in contents.into_iter().enumerate() {
            let name = if single {
                base.clone()
            } else {
                ident(&format!("{base}/l{k}"))
            };
            let chain_comment = if single {
                hint.clone()
            } else {
                let holding: Vec<&str> = telling
                    .iter()
                    .filter(|i| vs[0].contains(i))
                    .map(|&i| stage.rules[i].rule.name.as_str())
                    .collect();
                if holding.is_empty() {
                    let names: Vec<&str> = telling
                        .iter()
                        .map(|&i| stage.rules[i].rule.name.as_str())
                        .collect();
                    format!(
                        "{hint}, pods outside the local side of: {}",
                        names.join(", ")
                    )
                } else {
                    format!("{hint}, pods on the local side of: {}", holding.join(", "))
                }
            };
            let mut rules = Vec::new();
            for fam in Family::BOTH {
                for exact in [true, false] {
                    let map = if exact {
                        pod_map(&name, fam)
                    } else {
                        prefix_map(&name, fam)
                    };
                    let elements = content
                        .iter()
                        .filter(|(f, e, ..)| *f == fam && *e == exact)
                        .map(|(_, _, s, t)| Element {
                            key: vec![*s],
                            verdict: Some(Verdict::Goto(t.clone())),
                        })
                        .collect();
                    let what = if exact {
                        "peer pods with classes of their own"
                    } else {
                        "peer classes"
                    };
                    self.sets.insert(
                        map.clone(),
                        Set {
                            name: map.clone(),
                            key: vec![Field::Addr(fam, Side::Src).key_type()],
                            is_map: true,
                            interval: !exact,
                            comment: Some(comment(&format!("{hint}: {} {what}", fam.suffix()))),
                            elements,
                        },
                    );
                    rules.push(Rule::new(
                        vec![],
                        Action::Vmap {
                            key: vec![Field::Addr(fam, peer_side(d))],
                            map,
                        },
                    ));
                }
            }
            stage_chains.push(Chain {
                name: name.clone(),
                hook: None,
                comment: Some(comment(&chain_comment)),
                rules,
            });
            names.extend(vs.iter().map(|v| (v.clone(), name.clone())));
            chain_variants.push((name, vs));
        }
        let index = PeerMaps {
            key,
            chains: chain_variants,
            targets: fn_ids
                .into_iter()
                .map(|(f, i)| (f, target[i].clone()))
                .collect(),
        };
        (stage_chains, class_chains, names, index)
    }
}

/// The pod of `node` (every node: `None`) an address is a local address of: the pod it
/// resolves to, unless it is a node address.
fn local_pod(res: &Resolved, node: Option<&str>, ip: IpAddr) -> Option<usize> {
    res.pod_by_ip(ip).filter(|&p| {
        node.is_none_or(|n| res.inv.pods[p].node_name.as_deref() == Some(n))
            && !res.node_ips.contains(ip)
    })
}

/// The name of an ASG's member sets, less the family suffix.
fn asg_stem(asg: &AsgRef) -> String {
    ident(&format!("asg/{}/{}", asg.namespace, asg.name))
}

/// The map from the node's pod addresses to their chains in a direction.
fn dispatch_map(d: Direction, fam: Family) -> String {
    format!("pods-{}.{}", dir_name(d), fam.suffix())
}

/// A stage chain's map of peer pods with classes of their own.
fn pod_map(chain: &str, fam: Family) -> String {
    format!("{chain}/pods.{}", fam.suffix())
}

/// A stage chain's interval map of every other peer address.
fn prefix_map(chain: &str, fam: Family) -> String {
    format!("{chain}.{}", fam.suffix())
}

fn push_alt(matches: &mut Vec<Match>, family: Family, side: Side, alt: &Alt) {
    match alt {
        Alt::Any => {}
        Alt::Set { name, negate } => matches.push(Match::Addr {
            family,
            side,
            negate: *negate,
            set: AddrSet::Named(name.clone()),
        }),
        Alt::Literal(spans) => matches.push(Match::Addr {
            family,
            side,
            negate: false,
            set: AddrSet::Literal(spans.clone()),
        }),
    }
}

/// The protocol and port matches of a rule in the linear layout; `None` when it can match no
/// packet of the family.
fn linear_protocol(rule: &SecurityRule, fam: Family) -> Option<Vec<Match>> {
    let ports = |side, ranges: &[PortRange]| {
        (!all_ports(ranges)).then(|| Match::Port {
            side,
            ranges: ranges.iter().map(|r| (r.first, r.last)).collect(),
        })
    };
    let restricted = rule.restricts_ports();
    if restricted && (rule.source_ports.is_empty() || rule.destination_ports.is_empty()) {
        return None;
    }
    let protos = match rule.protocol {
        Protocol::Tcp => vec![proto::TCP],
        Protocol::Udp => vec![proto::UDP],
        // ICMP has no ports: a rule that restricts them matches only TCP and UDP.
        Protocol::Icmp if restricted => return None,
        Protocol::Icmp => vec![fam.icmp()],
        Protocol::Any if restricted => vec![proto::TCP, proto::UDP],
        Protocol::Any => return Some(vec![]),
    };
    let mut m = vec![Match::L4Proto(protos)];
    m.extend(ports(Side::Dst, &rule.destination_ports));
    m.extend(ports(Side::Src, &rule.source_ports));
    Some(m)
}

/// Splits the peer address space of `fam` into intervals over which the same rules of
/// `members` hold. Returns the intervals, each with the index of its class, and the classes:
/// rules in order, up to the first that matches every packet and is in `stops`.
fn peer_atoms(
    rules: &[StageRule],
    members: &[usize],
    fam: Family,
    prefixes_only: bool,
    stops: &BTreeSet<usize>,
) -> (Vec<(Span, usize)>, Vec<Vec<usize>>) {
    let peer = |i: usize| {
        let set = if prefixes_only {
            &rules[i].peer_prefixes
        } else {
            &rules[i].peer
        };
        family_set(set, fam).ranges()
    };
    // Sized up front: with pod addresses there are ~10^5 events per stage, and growing the
    // vector step by step was a tenth of compiling.
    let count = members.iter().map(|&i| 2 * peer(i).len()).sum();
    let mut events: Vec<(u128, bool, usize)> = Vec::with_capacity(count); // (position, starts, rule)
    for &i in members {
        for &(a, b) in peer(i) {
            events.push((a, true, i));
            if b < fam.max() {
                events.push((b + 1, false, i));
            }
        }
    }
    // Looked up for every active rule of every interval: a table, not a set lookup.
    let mut stop = vec![false; rules.len()];
    for &i in stops {
        stop[i] = is_total(&rules[i].rule);
    }
    // The order of the events at one position does not matter: all of them apply before
    // the interval that starts there is classified.
    events.sort_unstable_by_key(|&(position, _, _)| position);
    let mut active: BTreeMap<usize, u32> = BTreeMap::new();
    let mut out: Vec<(Span, usize)> = Vec::new();
    let mut classes: Vec<Vec<usize>> = Vec::new();
    let mut index: HashMap<Vec<usize>, usize> = HashMap::default();
    let mut class = Vec::new();
    let mut e = 0;
    let mut pos: u128 = 0;
    loop {
        let end = sweep_step(&events, &mut e, pos, fam.max(), &mut active);
        class.clear();
        for &i in active.keys() {
            class.push(i);
            if stop[i] {
                break;
            }
        }
        let c = match index.get(class.as_slice()) {
            Some(&c) => c,
            None => {
                classes.push(class.clone());
                index.insert(class.clone(), classes.len() - 1);
                classes.len() - 1
            }
        };
        match out.last_mut() {
            Some((span, last)) if *last == c => span.1 = end,
            _ => out.push(((pos, end), c)),
        }
        if end == fam.max() {
            return (out, classes);
        }
        pos = end + 1;
    }
}

/// The part of a stage-wide class that holds for a variant (sorted rule indices): its rules,
/// up to the first that matches everything.
fn restrict(rules: &[StageRule], class: &[usize], variant: &[usize]) -> Vec<usize> {
    let mut out = Vec::new();
    for &i in class {
        if variant.binary_search(&i).is_ok() {
            out.push(i);
            if is_total(&rules[i].rule) {
                break;
            }
        }
    }
    out
}

/// The first-match decision of a class (rules in priority order, ending with a total one).
fn complete_fn(rules: &[StageRule], class: &[usize]) -> ClassFn {
    let first = |pred: &dyn Fn(&SecurityRule) -> bool| {
        *class
            .iter()
            .find(|&&i| pred(&rules[i].rule))
            .expect("every class ends with a rule matching everything (the default deny)")
    };
    ClassFn {
        tcp: port_boxes(rules, class, Protocol::Tcp),
        udp: port_boxes(rules, class, Protocol::Udp),
        icmp: Some(first(&|r| {
            r.protocol.covers(Protocol::Icmp) && !r.restricts_ports()
        })),
        other: Some(first(&|r| {
            r.protocol == Protocol::Any && !r.restricts_ports()
        })),
        fallback: None,
    }
}

/// A rule whose peer side is only `*` and service tags: it holds for whole contexts (the
/// cluster, the Internet, the nodes) rather than for a few addresses.
fn is_broad(sr: &StageRule, d: Direction) -> bool {
    match sides(&sr.rule, d).1 {
        Endpoint::Prefixes(ps) => ps.iter().all(|p| !matches!(p, AddressPrefix::Net(_))),
        Endpoint::Asgs(_) => false,
    }
}

/// The decision of a class, split into what its specific rules decide and the shared
/// decision of its broad rules (see `ClassFn`).
fn class_fn(
    rules: &[StageRule],
    class: &[usize],
    d: Direction,
    broad_fns: &mut HashMap<Vec<usize>, ClassFn>,
) -> ClassFn {
    let specific: BTreeSet<usize> = class
        .iter()
        .copied()
        .filter(|&i| !is_broad(&rules[i], d))
        .collect();
    let last = *class.last().expect("a class ends with a total rule");
    if specific.is_empty() || specific.contains(&last) {
        return complete_fn(rules, class);
    }
    // Where a specific rule decides, the broad rules after the last specific one do not
    // matter: the class's own part is computed without them (the total rule closes it).
    let cut = class.iter().rposition(|i| specific.contains(i)).unwrap();
    let mut head = class[..=cut].to_vec();
    head.push(last);
    let full = complete_fn(rules, &head);
    let broad: Vec<usize> = class
        .iter()
        .copied()
        .filter(|i| !specific.contains(i))
        .collect();
    let fallback = broad_fns
        .entry(broad)
        .or_insert_with_key(|broad| complete_fn(rules, broad))
        .clone();
    let own = |boxes: Vec<PortBox>| -> Vec<PortBox> {
        boxes
            .into_iter()
            .filter(|b| specific.contains(&b.rule))
            .collect()
    };
    ClassFn {
        tcp: own(full.tcp),
        udp: own(full.udp),
        icmp: full.icmp.filter(|i| specific.contains(i)),
        other: None,
        fallback: Some(Box::new(fallback)),
    }
}

/// One step of a sweep over sorted `(position, starts, rule)` events: applies the events at
/// `pos` (those from `*e` on) to `active`, the rules covering the position with how many of
/// their ranges do, and returns the end of the elementary interval that starts at `pos`:
/// the position before the next event, else `max`.
fn sweep_step<T>(
    events: &[(T, bool, usize)],
    e: &mut usize,
    pos: T,
    max: T,
    active: &mut BTreeMap<usize, u32>,
) -> T
where
    T: Copy + PartialEq + std::ops::Sub<Output = T> + From<u8>,
{
    while *e < events.len() && events[*e].0 == pos {
        let (_, starts, i) = events[*e];
        if starts {
            *active.entry(i).or_default() += 1;
        } else if let Some(c) = active.get_mut(&i) {
            *c -= 1;
            if *c == 0 {
                active.remove(&i);
            }
        }
        *e += 1;
    }
    match events.get(*e) {
        Some(&(next, _, _)) => next - T::from(1),
        None => max,
    }
}

/// Sweeps `ranges` of each rule over 0..=65535: for every elementary interval, `decide`
/// gets the rules (in order) whose ranges contain it; neighbours decided alike are merged.
/// The rules are an iterator because the deciders read only the first few.
fn sweep<R: PartialEq>(
    items: &[(usize, &[PortRange])],
    mut decide: impl FnMut(&mut dyn Iterator<Item = usize>) -> R,
) -> Vec<((u16, u16), R)> {
    let mut events: Vec<(u32, bool, usize)> = Vec::new();
    for &(i, ranges) in items {
        for r in ranges {
            events.push((r.first as u32, true, i));
            events.push((r.last as u32 + 1, false, i));
        }
    }
    events.sort_unstable();
    let mut active: BTreeMap<usize, u32> = BTreeMap::new();
    let mut out: Vec<((u16, u16), R)> = Vec::new();
    let (mut e, mut pos) = (0, 0u32);
    while pos <= 65535 {
        let end = sweep_step(&events, &mut e, pos, 65535, &mut active);
        let r = decide(&mut active.keys().copied());
        match out.last_mut() {
            Some((span, last)) if *last == r => span.1 = end as u16,
            _ => out.push(((pos as u16, end as u16), r)),
        }
        pos = end + 1;
    }
    out
}

/// The first-match decision over (destination port, source port) for TCP or UDP.
fn port_boxes(rules: &[StageRule], class: &[usize], p: Protocol) -> Vec<PortBox> {
    let cands: Vec<(usize, &[PortRange])> = class
        .iter()
        .filter(|&&i| rules[i].rule.protocol.covers(p))
        .map(|&i| (i, rules[i].rule.destination_ports.as_slice()))
        .collect();
    // Per destination-port interval, the source-port intervals and their deciding rules.
    let rows = sweep(&cands, |active| {
        // The rules that can decide here: up to the first without a source-port restriction.
        let mut prefix = Vec::new();
        for i in active {
            prefix.push(i);
            if all_ports(&rules[i].rule.source_ports) {
                break;
            }
        }
        if prefix.len() == 1 {
            return vec![((0, 65535), prefix[0])];
        }
        let items: Vec<(usize, &[PortRange])> = prefix
            .iter()
            .map(|&i| (i, rules[i].rule.source_ports.as_slice()))
            .collect();
        sweep(&items, |act| {
            act.next()
                .expect("the last rule of a class takes every source port")
        })
    });
    rows.into_iter()
        .flat_map(|(dport, row)| {
            row.into_iter()
                .map(move |(sport, rule)| PortBox { dport, sport, rule })
        })
        .collect()
}

/// The port maps of one stage, shared by its class chains: (id . destination port [. source
/// port]) → the deciding rule's chain, without and with source ports; an id stands for one
/// class and protocol within its map. A few large maps instead of one small map per class:
/// the kernel spends milliseconds creating each concatenated interval set. Inserting into
/// one, and a packet's lookup, grow with its size, so a map is closed after `PORT_MAP_SIZE`
/// elements (128 loaded and forwarded faster than 1,024 on the benchmark table).
#[derive(Default)]
struct PortMaps {
    plain: Vec<Vec<Element>>,
    sport: Vec<Vec<Element>>,
}

const PORT_MAP_SIZE: usize = 128;

impl PortMaps {
    fn name(base: &str, sport: bool, n: usize) -> String {
        let kind = if sport { "ports-sport" } else { "ports" };
        format!("{base}/{kind}/{n}")
    }

    /// The map the next class and protocol go to: its name, elements and a new id.
    fn open(&mut self, base: &str, sport: bool) -> (String, &mut Vec<Element>, u16) {
        let chunks = if sport {
            &mut self.sport
        } else {
            &mut self.plain
        };
        if chunks.last().is_none_or(|c| c.len() >= PORT_MAP_SIZE) {
            chunks.push(Vec::new());
        }
        let n = chunks.len() - 1;
        let chunk = &mut chunks[n];
        // Elements are added in id order: the last one holds the highest id so far.
        let id = chunk.last().map_or(1, |e| e.key[0].0 as u16 + 1);
        (Self::name(base, sport, n), chunk, id)
    }

    /// The maps' declarations, elements sorted.
    fn into_sets(self, base: &str, level_hint: &str) -> impl Iterator<Item = Set> {
        [(false, self.plain), (true, self.sport)]
            .into_iter()
            .flat_map(move |(sport, chunks)| {
                chunks
                    .into_iter()
                    .enumerate()
                    .map(move |(n, mut elements)| {
                        elements.sort();
                        let what = if sport {
                            "destination and source ports"
                        } else {
                            "destination ports"
                        };
                        let mut key = vec![KeyType::Port, KeyType::Port];
                        if sport {
                            key.push(KeyType::Port);
                        }
                        Set {
                            name: Self::name(base, sport, n),
                            key,
                            is_map: true,
                            interval: true,
                            comment: Some(comment(&format!(
                                "{level_hint}: {what} per peer class and protocol"
                            ))),
                            elements,
                        }
                    })
            })
    }
}

/// A peer class's chain: TCP and UDP each through a port map, then ICMP and other
/// protocols; a partial class then goes on to its fallback's chain. Protocols are single
/// matches, not anonymous sets: each anonymous set is a kernel set to create.
fn class_chain(
    name: &str,
    f: &ClassFn,
    rules: &[StageRule],
    fallback: Option<&str>,
    maps: (&str, &mut PortMaps),
) -> Chain {
    let goto = |r: usize| Verdict::Goto(rules[r].chain.clone());
    let (base, maps) = maps;
    let mut out = Vec::new();
    for (p, boxes) in [(proto::TCP, &f.tcp), (proto::UDP, &f.udp)] {
        // What the chain's last rule decides anyway needs no element.
        let boxes: Vec<&PortBox> = boxes.iter().filter(|b| Some(b.rule) != f.other).collect();
        if boxes.is_empty() {
            continue;
        }
        let sport = boxes.iter().any(|b| b.sport != (0, 65535));
        let (map, elements, id) = maps.open(base, sport);
        let mut key = vec![Field::Class(id), Field::Port(Side::Dst)];
        if sport {
            key.push(Field::Port(Side::Src));
        }
        for b in boxes {
            let mut k = vec![
                (id as u128, id as u128),
                (b.dport.0 as u128, b.dport.1 as u128),
            ];
            if sport {
                k.push((b.sport.0 as u128, b.sport.1 as u128));
            }
            elements.push(Element {
                key: k,
                verdict: Some(goto(b.rule)),
            });
        }
        out.push(Rule::new(
            vec![Match::L4Proto(vec![p])],
            Action::Vmap { key, map },
        ));
    }
    let icmp = |i: usize| {
        [proto::ICMP, proto::ICMPV6].map(|p| Rule::verdict(vec![Match::L4Proto(vec![p])], goto(i)))
    };
    match (f.icmp, f.other, fallback) {
        (Some(i), Some(o), None) => {
            if i != o {
                out.extend(icmp(i));
            }
            out.push(Rule::verdict(vec![], goto(o)));
        }
        (i, None, Some(next)) => {
            if let Some(i) = i {
                out.extend(icmp(i));
            }
            out.push(Rule::verdict(vec![], Verdict::Goto(next.to_string())));
        }
        _ => unreachable!("a class is complete or has a fallback"),
    }
    Chain {
        name: name.to_string(),
        hook: None,
        comment: None,
        rules: out,
    }
}
