//! The protocol and port dimensions of a flow, as bit sets over cells.
//!
//! For the rules of one evaluation context, the source ports and the destination ports are each
//! cut into the coarsest cells that every rule's ranges are unions of. A set of flows (for a
//! fixed pair of ends) is then a bit set over `{TCP, UDP} × source-port cell × destination-port
//! cell`, plus one bit for ICMP, which has no ports. Set operations are word operations.

use crate::model::{IntervalSet, PortRange, Protocol, SecurityRule};

use super::Mode;
use super::types::NetworkPolicyPort;

const PROTOS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

/// A set of cells; the words past `PortSpace::bits` are always zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Bits(Vec<u64>);

impl Bits {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn and(&self, o: &Bits) -> Bits {
        Bits(self.0.iter().zip(&o.0).map(|(a, b)| a & b).collect())
    }

    pub fn or(&self, o: &Bits) -> Bits {
        Bits(self.0.iter().zip(&o.0).map(|(a, b)| a | b).collect())
    }

    pub fn minus(&self, o: &Bits) -> Bits {
        Bits(self.0.iter().zip(&o.0).map(|(a, b)| a & !b).collect())
    }

    pub fn and_assign(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a &= b);
    }

    pub fn or_assign(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a |= b);
    }

    pub fn minus_assign(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a &= !b);
    }

    pub fn intersects(&self, o: &Bits) -> bool {
        self.0.iter().zip(&o.0).any(|(a, b)| a & b != 0)
    }

    fn get(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }

    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn unset(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    fn set_range(&mut self, first: usize, last: usize) {
        for i in first..=last {
            self.set(i);
        }
    }
}

/// Destination ports of one protocol that a NetworkPolicy can name: every port (`0..=65535`,
/// written as a port entry without `port`) or a set within `1..=65535` (port 0 is not a valid
/// NetworkPolicy port and carries no TCP/UDP traffic; it is ignored throughout).
pub(crate) type PortList = IntervalSet;

/// What one NetworkPolicy rule allows towards its peers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum NpPorts {
    /// A rule without `ports`: every protocol, ICMP included (see the module docs on ICMP).
    All,
    /// TCP and UDP destination ports; never ICMP.
    Some { tcp: PortList, udp: PortList },
}

/// `a ⊆ b`, without allocating (both are sorted, disjoint, merged ranges).
fn subset(a: &IntervalSet, b: &IntervalSet) -> bool {
    let r = b.ranges();
    a.ranges().iter().all(|&(first, last)| {
        let i = r.partition_point(|&(_, l)| l < first);
        r.get(i).is_some_and(|&(f, l)| f <= first && last <= l)
    })
}

fn full_ports() -> IntervalSet {
    IntervalSet::range(0, 65535)
}

fn is_full(set: &PortList) -> bool {
    set.ranges() == [(0, 65535)]
}

impl NpPorts {
    pub fn is_empty(&self) -> bool {
        matches!(self, NpPorts::Some { tcp, udp } if tcp.is_empty() && udp.is_empty())
    }

    /// Whether every flow `other` allows is allowed by `self` too.
    pub fn covers(&self, other: &NpPorts) -> bool {
        match (self, other) {
            (NpPorts::All, _) => true,
            (NpPorts::Some { .. }, NpPorts::All) => false,
            (NpPorts::Some { tcp, udp }, NpPorts::Some { tcp: t2, udp: u2 }) => {
                subset(t2, tcp) && subset(u2, udp)
            }
        }
    }

    /// The `ports` list of a NetworkPolicy rule; empty for `All`.
    pub fn to_ports(&self) -> Vec<NetworkPolicyPort> {
        let NpPorts::Some { tcp, udp } = self else {
            return vec![];
        };
        let mut out = Vec::new();
        for (name, set) in [("TCP", tcp), ("UDP", udp)] {
            if is_full(set) {
                out.push(NetworkPolicyPort {
                    protocol: name.into(),
                    port: None,
                    end_port: None,
                });
                continue;
            }
            for &(first, last) in set.ranges() {
                out.push(NetworkPolicyPort {
                    protocol: name.into(),
                    port: Some(first as u16),
                    end_port: (last > first).then_some(last as u16),
                });
            }
        }
        out
    }
}

/// The cells of one evaluation context.
#[derive(Debug, Clone)]
pub(crate) struct PortSpace {
    /// First port of each source-port cell; cell `i` ends where cell `i + 1` starts.
    sport: Vec<u32>,
    /// First port of each destination-port cell; `[0, 0]` is always a cell of its own.
    dport: Vec<u32>,
    words: usize,
    /// Every cell, and every cell but the TCP and UDP cells of destination port 0 (ignored
    /// when comparing, see `PortList`): built once, as every pair of ends starts from them.
    all: Bits,
    comparable: Bits,
}

fn cells(
    rules: &[&SecurityRule],
    ranges: impl Fn(&SecurityRule) -> &[PortRange],
    extra: &[u32],
) -> Vec<u32> {
    let mut starts: Vec<u32> = vec![0];
    starts.extend_from_slice(extra);
    for rule in rules {
        for r in ranges(rule) {
            starts.push(r.first as u32);
            if r.last < 65535 {
                starts.push(r.last as u32 + 1);
            }
        }
    }
    starts.sort_unstable();
    starts.dedup();
    starts
}

impl PortSpace {
    pub fn new(rules: &[&SecurityRule]) -> Self {
        let sport = cells(rules, |r| &r.source_ports, &[]);
        let dport = cells(rules, |r| &r.destination_ports, &[1]);
        let bits = 2 * sport.len() * dport.len() + 1;
        let words = bits.div_ceil(64);
        let mut all = Bits(vec![0; words]);
        all.set_range(0, bits - 1);
        let mut comparable = all.clone();
        // Destination port 0 is the first cell of each (protocol, source-port cell) row.
        for row in 0..2 * sport.len() {
            comparable.unset(row * dport.len());
        }
        PortSpace {
            sport,
            dport,
            words,
            all,
            comparable,
        }
    }

    fn nbits(&self) -> usize {
        2 * self.sport.len() * self.dport.len() + 1
    }

    fn icmp_bit(&self) -> usize {
        self.nbits() - 1
    }

    fn index(&self, proto: usize, s: usize, d: usize) -> usize {
        (proto * self.sport.len() + s) * self.dport.len() + d
    }

    fn cell_range(starts: &[u32], r: &PortRange) -> (usize, usize) {
        let first = starts.partition_point(|&s| s <= r.first as u32) - 1;
        let last = starts.partition_point(|&s| s <= r.last as u32) - 1;
        (first, last)
    }

    fn dport_cell(&self, d: usize) -> (u128, u128) {
        let first = self.dport[d] as u128;
        let last = self.dport.get(d + 1).map_or(65535, |&n| n as u128 - 1);
        (first, last)
    }

    pub fn empty(&self) -> Bits {
        Bits(vec![0; self.words])
    }

    pub fn all(&self) -> Bits {
        self.all.clone()
    }

    /// Every cell but the TCP and UDP cells of destination port 0.
    pub fn comparable(&self) -> &Bits {
        &self.comparable
    }

    /// The flows a rule matches, as the reference evaluator matches them.
    pub fn rule_bits(&self, rule: &SecurityRule) -> Bits {
        let mut b = self.empty();
        for (p, proto) in PROTOS.iter().enumerate() {
            if !rule.protocol.covers(*proto) {
                continue;
            }
            for sr in &rule.source_ports {
                let (s0, s1) = Self::cell_range(&self.sport, sr);
                for dr in &rule.destination_ports {
                    let (d0, d1) = Self::cell_range(&self.dport, dr);
                    for s in s0..=s1 {
                        b.set_range(self.index(p, s, d0), self.index(p, s, d1));
                    }
                }
            }
        }
        if rule.protocol.covers(Protocol::Icmp) && !rule.restricts_ports() {
            b.set(self.icmp_bit());
        }
        b
    }

    /// Projects the source-port dimension away: a (protocol, destination port) cell is kept
    /// when every (`Strict`) or some (`Permissive`) source-port cell has it, then repeated for
    /// every source-port cell.
    pub fn project_source_ports(&self, bits: &Bits, mode: Mode) -> Bits {
        let mut out = self.empty();
        for p in 0..2 {
            for d in 0..self.dport.len() {
                let mut cells = (0..self.sport.len()).map(|s| bits.get(self.index(p, s, d)));
                let keep = match mode {
                    Mode::Strict => cells.all(|x| x),
                    Mode::Permissive => cells.any(|x| x),
                };
                if keep {
                    for s in 0..self.sport.len() {
                        out.set(self.index(p, s, d));
                    }
                }
            }
        }
        if bits.get(self.icmp_bit()) {
            out.set(self.icmp_bit());
        }
        out
    }

    /// What a NetworkPolicy rule can say of a set that no longer depends on source ports:
    /// the TCP/UDP part exactly, and ICMP only together with everything (a rule without ports).
    /// `Strict` drops an ICMP part it cannot express; `Permissive` widens it to everything.
    pub fn to_np(&self, bits: &Bits, mode: Mode) -> NpPorts {
        // The cells in port order, leaving out port 0 (cell 0): every other port is every port.
        let [tcp, udp] = [0, 1].map(|p| {
            let set = IntervalSet::from_ordered(
                (1..self.dport.len())
                    .filter(|&d| bits.get(self.index(p, 0, d)))
                    .map(|d| self.dport_cell(d)),
            );
            if set.ranges() == [(1, 65535)] {
                full_ports()
            } else {
                set
            }
        });
        let icmp = bits.get(self.icmp_bit());
        if icmp && is_full(&tcp) && is_full(&udp) {
            return NpPorts::All;
        }
        match (icmp, mode) {
            (true, Mode::Permissive) => NpPorts::All,
            _ => NpPorts::Some { tcp, udp },
        }
    }

    /// The flows a NetworkPolicy port specification allows, as cells.
    pub fn np_bits(&self, ports: &NpPorts) -> Bits {
        let NpPorts::Some { tcp, udp } = ports else {
            return self.all();
        };
        let mut b = self.empty();
        for (p, set) in [tcp, udp].into_iter().enumerate() {
            for d in 0..self.dport.len() {
                let (first, _) = self.dport_cell(d);
                if set.contains(first) {
                    for s in 0..self.sport.len() {
                        b.set(self.index(p, s, d));
                    }
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Access, Direction, Endpoint};

    fn rule(protocol: Protocol, sports: &[(u16, u16)], dports: &[(u16, u16)]) -> SecurityRule {
        SecurityRule {
            name: "r".into(),
            description: None,
            priority: 100,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol,
            source: Endpoint::any(),
            source_ports: sports.iter().map(|&(a, b)| PortRange::new(a, b)).collect(),
            destination: Endpoint::any(),
            destination_ports: dports.iter().map(|&(a, b)| PortRange::new(a, b)).collect(),
            is_default: false,
        }
    }

    #[test]
    fn rule_cells_round_trip_to_network_policy_ports() {
        let web = rule(Protocol::Tcp, &[(0, 65535)], &[(80, 80), (8080, 8090)]);
        let any = rule(Protocol::Any, &[(0, 65535)], &[(0, 65535)]);
        let space = PortSpace::new(&[&web, &any]);
        let bits = space.rule_bits(&web);
        let np = space.to_np(&bits, Mode::Strict);
        let ports: Vec<_> = np
            .to_ports()
            .iter()
            .map(|p| (p.protocol.clone(), p.port, p.end_port))
            .collect();
        assert_eq!(
            ports,
            vec![
                ("TCP".into(), Some(80), None),
                ("TCP".into(), Some(8080), Some(8090))
            ]
        );
        assert_eq!(space.np_bits(&np), bits);
        assert_eq!(
            space.to_np(&space.rule_bits(&any), Mode::Strict),
            NpPorts::All
        );
    }

    #[test]
    fn icmp_is_expressible_only_with_everything() {
        let all_but_22 = rule(Protocol::Any, &[(0, 65535)], &[(0, 65535)]);
        let ssh = rule(Protocol::Tcp, &[(0, 65535)], &[(22, 22)]);
        let space = PortSpace::new(&[&all_but_22, &ssh]);
        let bits = space.rule_bits(&all_but_22).minus(&space.rule_bits(&ssh));
        let strict = space.to_np(&bits, Mode::Strict);
        assert!(
            matches!(&strict, NpPorts::Some { tcp, .. } if !tcp.contains(22) && tcp.contains(23))
        );
        assert_eq!(space.to_np(&bits, Mode::Permissive), NpPorts::All);
    }

    #[test]
    fn port_zero_is_ignored() {
        let low = rule(Protocol::Udp, &[(0, 65535)], &[(0, 1023)]);
        let space = PortSpace::new(&[&low]);
        let np = space.to_np(&space.rule_bits(&low), Mode::Strict);
        assert_eq!(np.to_ports()[0].port, Some(1));
        assert_eq!(np.to_ports()[0].end_port, Some(1023));
    }

    #[test]
    fn source_ports_project_by_mode() {
        let from_high = rule(Protocol::Tcp, &[(1024, 65535)], &[(443, 443)]);
        let space = PortSpace::new(&[&from_high]);
        let bits = space.rule_bits(&from_high);
        assert!(space.project_source_ports(&bits, Mode::Strict).is_empty());
        let perm = space.project_source_ports(&bits, Mode::Permissive);
        assert!(
            matches!(space.to_np(&perm, Mode::Permissive), NpPorts::Some { tcp, .. } if tcp.contains(443))
        );
    }
}
