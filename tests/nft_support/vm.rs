//! An interpreter of the compiled `Ruleset` (the data model, not the text): what the kernel
//! would do with one packet at one hook, written from nftables' documented semantics so the
//! property tests can compare it with the reference evaluator.

use std::collections::HashMap;
use std::net::IpAddr;

use kube_nsg::eval::Packet;
use kube_nsg::model::Protocol;
use kube_nsg::nft::*;

/// A packet as nftables sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pkt {
    pub family: Family,
    pub src: u128,
    pub dst: u128,
    pub proto: u8,
    /// The first four bytes of the transport header: ports for TCP/UDP, type, code and
    /// checksum for ICMP (so a port match on ICMP reads garbage, as in the kernel).
    pub th_sport: u16,
    pub th_dport: u16,
    pub icmp_type: Option<u8>,
    pub ct: CtState,
}

fn value(ip: IpAddr) -> (Family, u128) {
    match ip {
        IpAddr::V4(a) => (Family::V4, u32::from(a) as u128),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    }
}

impl Pkt {
    /// The first packet of a flow: ICMP is an echo request whose checksum bytes happen to be
    /// the packet's ports.
    pub fn new_flow(p: &Packet) -> Pkt {
        let (family, src) = value(p.src);
        let (_, dst) = value(p.dst);
        let (proto, icmp_type) = match p.protocol {
            Protocol::Tcp => (proto::TCP, None),
            Protocol::Udp => (proto::UDP, None),
            Protocol::Icmp => (
                family.icmp(),
                Some(if family == Family::V4 { 8 } else { 128 }),
            ),
            Protocol::Any => unreachable!("packets have a protocol"),
        };
        Pkt {
            family,
            src,
            dst,
            proto,
            th_sport: p.src_port,
            th_dport: p.dst_port,
            icmp_type,
            ct: CtState::New,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accept,
    Drop,
}

/// The result at one hook: the outcome and the per-rule counting chains that fired, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub outcome: Outcome,
    pub counted: Vec<String>,
}

pub struct Vm<'a> {
    rs: &'a Ruleset,
    sets: HashMap<&'a str, &'a Set>,
    chains: HashMap<&'a str, &'a Chain>,
}

/// nftables' limit on nested jumps.
const MAX_DEPTH: usize = 16;

impl<'a> Vm<'a> {
    /// Checks what the kernel would check on load: every referenced chain and set exists with
    /// the right kind and key, elements fit their keys and do not overlap.
    pub fn new(rs: &'a Ruleset) -> Result<Self, String> {
        let mut sets = HashMap::new();
        for s in &rs.sets {
            if sets.insert(s.name.as_str(), s).is_some() {
                return Err(format!("set {} declared twice", s.name));
            }
            check_elements(&s.elements, &s.key, s.is_map, &s.name)?;
            if !s.interval && s.elements.iter().any(|e| e.key.iter().any(|(a, b)| a != b)) {
                return Err(format!("set {} has intervals but no interval flag", s.name));
            }
        }
        let mut chains = HashMap::new();
        for c in &rs.chains {
            if chains.insert(c.name.as_str(), c).is_some() {
                return Err(format!("chain {} declared twice", c.name));
            }
        }
        let vm = Vm { rs, sets, chains };
        for c in &rs.chains {
            for r in &c.rules {
                vm.check_rule(r, &c.name)?;
            }
        }
        Ok(vm)
    }

    fn check_target(&self, v: &Verdict, at: &str) -> Result<(), String> {
        match v {
            Verdict::Jump(t) | Verdict::Goto(t) => match self.chains.get(t.as_str()) {
                Some(c) if c.hook.is_none() => Ok(()),
                Some(_) => Err(format!("{at}: jumps to base chain {t}")),
                None => Err(format!("{at}: jumps to missing chain {t}")),
            },
            _ => Ok(()),
        }
    }

    fn check_rule(&self, r: &Rule, at: &str) -> Result<(), String> {
        for m in &r.matches {
            if let Match::Addr {
                family,
                set: AddrSet::Named(n),
                ..
            } = m
            {
                let s = self
                    .sets
                    .get(n.as_str())
                    .ok_or(format!("{at}: missing set {n}"))?;
                let want = Field::Addr(*family, Side::Src).key_type();
                if s.is_map || s.key != [want] {
                    return Err(format!("{at}: set {n} is not a set of {want:?}"));
                }
            }
        }
        match &r.action {
            Action::Verdict(v) => self.check_target(v, at),
            Action::Vmap { key, map } => {
                let types: Vec<KeyType> = key.iter().map(|f| f.key_type()).collect();
                let s = self
                    .sets
                    .get(map.as_str())
                    .ok_or(format!("{at}: missing map {map}"))?;
                if !s.is_map || s.key != types {
                    return Err(format!("{at}: map {map} does not take {types:?}"));
                }
                for e in &s.elements {
                    self.check_target(e.verdict.as_ref().unwrap(), at)?;
                }
                Ok(())
            }
        }
    }

    /// What the table does with `pkt` at `hook`.
    pub fn run(&self, hook: Hook, pkt: &Pkt) -> Result<Trace, String> {
        let mut counted = Vec::new();
        let Some(base) = self.rs.chains.iter().find(|c| c.hook == Some(hook)) else {
            return Ok(Trace {
                outcome: Outcome::Accept,
                counted,
            });
        };
        // Call stack of (chain, next rule); `goto` replaces the top, `jump` pushes.
        let mut stack: Vec<(&Chain, usize)> = vec![(base, 0)];
        loop {
            let Some(&(chain, i)) = stack.last() else {
                return Ok(Trace {
                    outcome: Outcome::Accept,
                    counted,
                }); // policy accept
            };
            let Some(rule) = chain.rules.get(i) else {
                stack.pop(); // end of chain: implicit return
                continue;
            };
            stack.last_mut().unwrap().1 += 1;
            if !rule.matches.iter().all(|m| self.matches(m, pkt)) {
                continue;
            }
            if rule.counter && self.rs.rule_chains.contains_key(&chain.name) {
                counted.push(chain.name.clone());
            }
            let verdict = match &rule.action {
                Action::Verdict(v) => v.clone(),
                Action::Vmap { key, map } => {
                    let Some(k) = key
                        .iter()
                        .map(|f| field(*f, pkt))
                        .collect::<Option<Vec<u128>>>()
                    else {
                        continue; // a field of another family: the rule does not match
                    };
                    match lookup(&self.sets[map.as_str()].elements, &k)? {
                        Some(e) => e.verdict.clone().unwrap(),
                        None => continue,
                    }
                }
            };
            match verdict {
                Verdict::Accept => {
                    return Ok(Trace {
                        outcome: Outcome::Accept,
                        counted,
                    });
                }
                Verdict::Drop => {
                    return Ok(Trace {
                        outcome: Outcome::Drop,
                        counted,
                    });
                }
                Verdict::Return => {
                    stack.pop();
                }
                Verdict::Jump(t) => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(format!("jump depth over {MAX_DEPTH} at {t}"));
                    }
                    stack.push((self.chains[t.as_str()], 0));
                }
                Verdict::Goto(t) => {
                    *stack.last_mut().unwrap() = (self.chains[t.as_str()], 0);
                }
            }
        }
    }

    fn matches(&self, m: &Match, pkt: &Pkt) -> bool {
        match m {
            Match::CtState(states) => states.contains(&pkt.ct),
            Match::L4Proto(ps) => ps.contains(&pkt.proto),
            Match::Icmpv6Type(ts) => {
                pkt.family == Family::V6
                    && pkt.proto == proto::ICMPV6
                    && pkt.icmp_type.is_some_and(|t| ts.contains(&t))
            }
            Match::Addr {
                family,
                side,
                negate,
                set,
            } => {
                // `ip saddr` carries an implicit `meta nfproto ipv4`, negated or not.
                let Some(v) = field(Field::Addr(*family, *side), pkt) else {
                    return false;
                };
                let inside = match set {
                    AddrSet::Named(n) => self.sets[n.as_str()]
                        .elements
                        .iter()
                        .any(|e| e.key[0].0 <= v && v <= e.key[0].1),
                    AddrSet::Literal(spans) => spans.iter().any(|&(a, b)| a <= v && v <= b),
                };
                inside != *negate
            }
            Match::Port { side, ranges } => {
                let v = field(Field::Port(*side), pkt).unwrap() as u16;
                ranges.iter().any(|&(a, b)| a <= v && v <= b)
            }
        }
    }
}

/// A packet field; `None` when the packet is of the other family.
fn field(f: Field, pkt: &Pkt) -> Option<u128> {
    match f {
        Field::Addr(fam, side) if fam == pkt.family => {
            Some(if side == Side::Src { pkt.src } else { pkt.dst })
        }
        Field::Addr(..) => None,
        Field::L4Proto => Some(pkt.proto as u128),
        Field::Port(Side::Src) => Some(pkt.th_sport as u128),
        Field::Port(Side::Dst) => Some(pkt.th_dport as u128),
        // `th sport & 0 | ID` loads the port, then the kernel's bitwise expression.
        Field::Class(id) => Some(bitwise(pkt.th_sport, 0, id) as u128),
    }
}

/// nft's `bitwise` expression: `(reg & mask) ^ xor`.
fn bitwise(reg: u16, mask: u16, xor: u16) -> u16 {
    (reg & mask) ^ xor
}

fn contains(e: &Element, k: &[u128]) -> bool {
    e.key.iter().zip(k).all(|(&(a, b), &v)| a <= v && v <= b)
}

/// The element holding `k`; more than one is an error (elements must be disjoint).
fn lookup<'e>(elements: &'e [Element], k: &[u128]) -> Result<Option<&'e Element>, String> {
    let mut hits = elements.iter().filter(|e| contains(e, k));
    let first = hits.next();
    if let Some(second) = hits.next() {
        return Err(format!(
            "overlapping elements {first:?} and {second:?} hold {k:?}"
        ));
    }
    Ok(first)
}

fn check_elements(
    elements: &[Element],
    key: &[KeyType],
    is_map: bool,
    at: &str,
) -> Result<(), String> {
    for e in elements {
        if e.key.len() != key.len() || e.verdict.is_some() != is_map {
            return Err(format!("{at}: element {e:?} does not fit {key:?}"));
        }
        for (&(a, b), t) in e.key.iter().zip(key) {
            let max = match t {
                KeyType::Ipv4 => u32::MAX as u128,
                KeyType::Ipv6 => u128::MAX,
                KeyType::Proto => 255,
                KeyType::Port => 65535,
            };
            if a > b || b > max {
                return Err(format!("{at}: element {e:?} out of range"));
            }
        }
    }
    // Disjoint: no two elements share a point (boxes overlap iff every part overlaps).
    for (i, x) in elements.iter().enumerate() {
        for y in &elements[i + 1..] {
            if x.key
                .iter()
                .zip(&y.key)
                .all(|(p, q)| p.0 <= q.1 && q.0 <= p.1)
            {
                return Err(format!("{at}: elements {x:?} and {y:?} overlap"));
            }
        }
    }
    Ok(())
}
