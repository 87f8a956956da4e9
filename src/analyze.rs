//! Rule anomalies of one group, per direction, default rules included:
//!
//! * **Shadowed**: the rule can never decide, because the rules before it cover everything it
//!   matches (or it matches nothing at all, e.g. an ASG without members: then `related` is
//!   empty and there is no example).
//! * **Redundant**: the rule decides some flows, but removing it changes no verdict, because
//!   the rules after it that would decide those flows instead have the same access.
//! * **Correlated**: an allow and a deny that overlap, neither containing the other, where the
//!   earlier one decides some flows the later one also matches, so their order decides those
//!   flows (reported on the later rule; `related` names the earlier one). An exception placed
//!   before the general rule it carves from (the earlier rule inside the later one) is the
//!   normal way to write a group and is not reported.
//!
//! "Flows" are every first packet (protocol, addresses, ports) as the reference evaluator
//! matches them: ASGs stand for their current members' addresses, service tags for their
//! prefixes, whichever pods the group is bound to. Each anomaly carries one example flow.
//!
//! The analysis is exact set algebra over boxes (protocol × source × source ports ×
//! destination × destination ports, per address family). Should a rule's region fragment past
//! a budget, the rule is skipped rather than guessed about: the analysis never reports an
//! anomaly it has not proven.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Serialize, Serializer};

use crate::eval::Packet;
use crate::model::{Direction, Endpoint, IntervalSet, IpSet, ObjectRef, Protocol, SecurityRule};
use crate::resolve::Resolved;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum AnomalyKind {
    Shadowed,
    Redundant,
    Correlated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Anomaly {
    pub nsg: ObjectRef,
    pub direction: Direction,
    pub kind: AnomalyKind,
    pub rule: String,
    pub priority: u32,
    /// Shadowed: the earlier rules that decide its flows. Redundant: the later rules that
    /// would decide them instead. Correlated: the earlier rule of the pair.
    pub related: Vec<String>,
    /// Shadowed: a flow it matches that an earlier rule decides. Redundant: a flow it decides
    /// that a later rule would decide alike. Correlated: a flow both match that the earlier
    /// rule decides.
    #[serde(
        serialize_with = "serialize_example",
        skip_serializing_if = "Option::is_none"
    )]
    pub example: Option<Packet>,
}

fn serialize_example<S: Serializer>(p: &Option<Packet>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Flow {
        protocol: Protocol,
        source: IpAddr,
        source_port: u16,
        destination: IpAddr,
        destination_port: u16,
    }
    p.map(|p| Flow {
        protocol: p.protocol,
        source: p.src,
        source_port: p.src_port,
        destination: p.dst,
        destination_port: p.dst_port,
    })
    .serialize(s)
}

const TCP: u8 = 1;
const UDP: u8 = 2;
const ICMP: u8 = 4;
/// Boxes one region may hold before its rule is skipped.
const BUDGET: usize = 20_000;

fn all_ports() -> IntervalSet {
    IntervalSet::range(0, 65535)
}

/// A product of sets of one address family. ICMP boxes have only ICMP and every port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Cube {
    v6: bool,
    protos: u8,
    src: IntervalSet,
    sport: IntervalSet,
    dst: IntervalSet,
    dport: IntervalSet,
}

/// Whether two sets share a value, without allocating.
fn overlaps(a: &IntervalSet, b: &IntervalSet) -> bool {
    let (a, b) = (a.ranges(), b.ranges());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].1 < b[j].0 {
            i += 1;
        } else if b[j].1 < a[i].0 {
            j += 1;
        } else {
            return true;
        }
    }
    false
}

impl Cube {
    fn overlaps(&self, o: &Cube) -> bool {
        self.v6 == o.v6
            && self.protos & o.protos != 0
            && overlaps(&self.dport, &o.dport)
            && overlaps(&self.src, &o.src)
            && overlaps(&self.dst, &o.dst)
            && overlaps(&self.sport, &o.sport)
    }

    fn intersect(&self, o: &Cube) -> Option<Cube> {
        if self.v6 != o.v6 || self.protos & o.protos == 0 {
            return None;
        }
        let c = Cube {
            v6: self.v6,
            protos: self.protos & o.protos,
            src: self.src.intersect(&o.src),
            sport: self.sport.intersect(&o.sport),
            dst: self.dst.intersect(&o.dst),
            dport: self.dport.intersect(&o.dport),
        };
        (!c.src.is_empty() && !c.sport.is_empty() && !c.dst.is_empty() && !c.dport.is_empty())
            .then_some(c)
    }

    /// `self \ o` as disjoint boxes: peel off one dimension at a time.
    fn subtract(&self, o: &Cube, out: &mut Vec<Cube>) {
        if !self.overlaps(o) {
            out.push(self.clone());
            return;
        }
        let mut rest = self.clone();
        let outside = rest.protos & !o.protos;
        if outside != 0 {
            out.push(Cube {
                protos: outside,
                ..rest.clone()
            });
            rest.protos &= o.protos;
        }
        macro_rules! peel {
            ($f:ident) => {
                let diff = rest.$f.difference(&o.$f);
                if !diff.is_empty() {
                    out.push(Cube {
                        $f: diff,
                        ..rest.clone()
                    });
                }
                rest.$f = rest.$f.intersect(&o.$f);
            };
        }
        peel!(src);
        peel!(sport);
        peel!(dst);
        peel!(dport);
    }

    fn example(&self) -> Packet {
        let addr = |v: u128| {
            if self.v6 {
                IpAddr::V6(Ipv6Addr::from(v))
            } else {
                IpAddr::V4(Ipv4Addr::from(v as u32))
            }
        };
        let src = self.src.first().expect("non-empty");
        // Prefer two different ends.
        let dst = self
            .dst
            .ranges()
            .iter()
            .flat_map(|&(a, b)| [a, b])
            .find(|&d| d != src)
            .unwrap_or(src);
        let protocol = if self.protos & TCP != 0 {
            Protocol::Tcp
        } else if self.protos & UDP != 0 {
            Protocol::Udp
        } else {
            Protocol::Icmp
        };
        let port = |s: &IntervalSet| {
            if protocol == Protocol::Icmp {
                0
            } else {
                s.first().expect("non-empty") as u16
            }
        };
        Packet {
            protocol,
            src: addr(src),
            src_port: port(&self.sport),
            dst: addr(dst),
            dst_port: port(&self.dport),
        }
    }
}

/// A disjoint union of boxes.
#[derive(Debug, Clone, Default, Hash)]
struct Region(Vec<Cube>);

impl Region {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn intersect(&self, o: &Region) -> Region {
        Region(
            self.0
                .iter()
                .flat_map(|a| o.0.iter().filter_map(move |b| a.intersect(b)))
                .collect(),
        )
    }

    fn intersects(&self, o: &Region) -> bool {
        self.0.iter().any(|a| o.0.iter().any(|b| a.overlaps(b)))
    }

    /// `None` past the budget.
    fn subtract(&self, o: &Region) -> Option<Region> {
        let mut cur = self.0.clone();
        for b in &o.0 {
            let mut next = Vec::new();
            for a in &cur {
                a.subtract(b, &mut next);
            }
            if next.len() > BUDGET {
                return None;
            }
            cur = next;
        }
        Some(Region(cur))
    }

    fn is_subset(&self, o: &Region) -> Option<bool> {
        self.subtract(o).map(|r| r.is_empty())
    }

    fn example(&self) -> Option<Packet> {
        self.0.first().map(Cube::example)
    }
}

fn endpoint_set(res: &Resolved, e: &Endpoint) -> IpSet {
    match e {
        Endpoint::Prefixes(p) => p
            .iter()
            .filter_map(|p| res.prefix_set(p))
            .fold(IpSet::empty(), |a, s| a.union(&s)),
        Endpoint::Asgs(asgs) => {
            IpSet::from_ips(asgs.iter().flat_map(|a| res.members(a)).flat_map(|p| {
                res.inv.pods[p]
                    .ips
                    .iter()
                    .copied()
                    .filter(move |ip| res.pod_by_ip(*ip) == Some(p))
            }))
        }
    }
}

/// Every packet the rule matches, as `eval::rule_matches` decides.
fn rule_region(res: &Resolved, rule: &SecurityRule) -> Region {
    let (src, dst) = (
        endpoint_set(res, &rule.source),
        endpoint_set(res, &rule.destination),
    );
    let ports = |r: &[crate::model::PortRange]| {
        IntervalSet::from_ranges(r.iter().map(|p| (p.first as u128, p.last as u128)))
    };
    let mut tcp_udp = 0;
    if rule.protocol.covers(Protocol::Tcp) {
        tcp_udp |= TCP;
    }
    if rule.protocol.covers(Protocol::Udp) {
        tcp_udp |= UDP;
    }
    let icmp = rule.protocol.covers(Protocol::Icmp) && !rule.restricts_ports();
    let mut cubes = Vec::new();
    for v6 in [false, true] {
        let (s, d) = if v6 {
            (&src.v6, &dst.v6)
        } else {
            (&src.v4, &dst.v4)
        };
        if s.is_empty() || d.is_empty() {
            continue;
        }
        if tcp_udp != 0 {
            cubes.push(Cube {
                v6,
                protos: tcp_udp,
                src: s.clone(),
                sport: ports(&rule.source_ports),
                dst: d.clone(),
                dport: ports(&rule.destination_ports),
            });
        }
        if icmp {
            cubes.push(Cube {
                v6,
                protos: ICMP,
                src: s.clone(),
                sport: all_ports(),
                dst: d.clone(),
                dport: all_ports(),
            });
        }
    }
    Region(cubes)
}

/// The anomalies of group `nsg`, inbound then outbound, by priority.
pub fn analyze(res: &Resolved, nsg: usize) -> Vec<Anomaly> {
    Input::of(res, nsg).analyze()
}

/// All that the analysis of one group reads: the group's name, and per direction its rules in
/// order with what each matches. Equal inputs have equal anomalies, so a caller can hash the
/// input and keep the anomalies of groups whose input did not change.
pub struct Input<'a> {
    nsg: &'a ObjectRef,
    directions: [(Direction, Vec<SecurityRule>, Vec<Region>); 2],
}

impl Hash for Input<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.nsg.hash(h);
        for (direction, rules, regions) in &self.directions {
            direction.hash(h);
            for rule in rules {
                (&rule.name, rule.priority, rule.access).hash(h);
            }
            regions.hash(h);
        }
    }
}

impl<'a> Input<'a> {
    pub fn of(res: &'a Resolved, nsg: usize) -> Self {
        let group = &res.inv.nsgs[nsg];
        let direction = |direction| {
            let rules = group.rules_for(direction);
            let regions = rules.iter().map(|r| rule_region(res, r)).collect();
            (direction, rules, regions)
        };
        Input {
            nsg: &group.id,
            directions: [
                direction(Direction::Inbound),
                direction(Direction::Outbound),
            ],
        }
    }

    /// The anomalies, inbound then outbound, by priority.
    pub fn analyze(&self) -> Vec<Anomaly> {
        let mut out = Vec::new();
        for (direction, rules, regions) in &self.directions {
            out.extend(anomalies(self.nsg, *direction, rules, regions));
        }
        out.sort_by(|x, y| {
            (x.direction, x.priority, x.kind, &x.related).cmp(&(
                y.direction,
                y.priority,
                y.kind,
                &y.related,
            ))
        });
        out
    }
}

/// The anomalies of one direction's rules, given what each matches.
fn anomalies(
    nsg: &ObjectRef,
    direction: Direction,
    rules: &[SecurityRule],
    regions: &[Region],
) -> Vec<Anomaly> {
    let mut out = Vec::new();
    let anomaly = |i: usize, kind, related: Vec<usize>, example| Anomaly {
        nsg: nsg.clone(),
        direction,
        kind,
        rule: rules[i].name.clone(),
        priority: rules[i].priority,
        related: related.iter().map(|&j| rules[j].name.clone()).collect(),
        example,
    };
    // What each rule decides: its region minus every earlier rule's.
    let mut decides: Vec<Option<Region>> = Vec::with_capacity(rules.len());
    for (i, region) in regions.iter().enumerate() {
        if region.is_empty() {
            out.push(anomaly(i, AnomalyKind::Shadowed, vec![], None));
            decides.push(Some(Region::default()));
            continue;
        }
        let mut rest = Some(region.clone());
        let mut covering = Vec::new();
        for (j, earlier) in regions[..i].iter().enumerate() {
            let Some(r) = rest.as_ref() else { break };
            if r.is_empty() {
                break;
            }
            if r.intersects(earlier) {
                covering.push(j);
                rest = r.subtract(earlier);
            }
        }
        if rest.as_ref().is_some_and(Region::is_empty) {
            out.push(anomaly(
                i,
                AnomalyKind::Shadowed,
                covering,
                region.example(),
            ));
        }
        decides.push(rest);
    }
    for i in 0..rules.len() {
        let Some(decided) = decides[i].as_ref().filter(|d| !d.is_empty()) else {
            continue;
        };
        // Redundant: whoever decides these flows without rule i has the same access.
        let mut rest = Some(decided.clone());
        let mut instead = Vec::new();
        let mut redundant = true;
        for (k, later) in regions.iter().enumerate().skip(i + 1) {
            let Some(r) = rest.as_ref() else { break };
            if r.is_empty() {
                break;
            }
            if r.intersects(later) {
                if rules[k].access != rules[i].access {
                    redundant = false;
                    break;
                }
                instead.push(k);
                rest = r.subtract(later);
            }
        }
        // Flows no later rule matches would lose their verdict: not redundant.
        if redundant && rest.as_ref().is_some_and(Region::is_empty) {
            out.push(anomaly(
                i,
                AnomalyKind::Redundant,
                instead,
                decided.example(),
            ));
        }
    }
    for b in 0..rules.len() {
        if decides[b].as_ref().is_some_and(Region::is_empty) {
            continue; // Shadowed: reported as such.
        }
        for a in 0..b {
            if rules[a].access == rules[b].access {
                continue;
            }
            let Some(decided) = decides[a].as_ref() else {
                continue;
            };
            if !decided.intersects(&regions[b]) {
                continue;
            }
            let overlap = decided.intersect(&regions[b]);
            if overlap.is_empty() {
                continue;
            }
            let nested = regions[a].is_subset(&regions[b]).unwrap_or(true)
                || regions[b].is_subset(&regions[a]).unwrap_or(true);
            if !nested {
                out.push(anomaly(
                    b,
                    AnomalyKind::Correlated,
                    vec![a],
                    overlap.example(),
                ));
            }
        }
    }
    out
}

/// The anomalies of every group.
pub fn analyze_all(res: &Resolved) -> Vec<Anomaly> {
    (0..res.inv.nsgs.len())
        .flat_map(|i| analyze(res, i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(src: (u128, u128), dport: (u128, u128)) -> Cube {
        Cube {
            v6: false,
            protos: TCP | UDP,
            src: IntervalSet::range(src.0, src.1),
            sport: all_ports(),
            dst: IntervalSet::range(0, 100),
            dport: IntervalSet::range(dport.0, dport.1),
        }
    }

    #[test]
    fn subtraction_is_exact_and_disjoint() {
        let a = cube((0, 99), (0, 1000));
        let b = Cube {
            protos: TCP,
            ..cube((50, 149), (80, 80))
        };
        let mut out = Vec::new();
        a.subtract(&b, &mut out);
        // Disjoint pieces, none inside b, and together with a ∩ b they are a.
        for (i, x) in out.iter().enumerate() {
            assert!(x.intersect(&b).is_none());
            for y in &out[i + 1..] {
                assert!(x.intersect(y).is_none());
            }
        }
        let size = |c: &Cube| {
            let n = |s: &IntervalSet| s.ranges().iter().map(|r| r.1 - r.0 + 1).sum::<u128>();
            c.protos.count_ones() as u128 * n(&c.src) * n(&c.sport) * n(&c.dst) * n(&c.dport)
        };
        let total: u128 = out.iter().map(size).sum::<u128>() + size(&a.intersect(&b).unwrap());
        assert_eq!(total, size(&a));
    }
}
