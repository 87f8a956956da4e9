//! The data model of one nftables table: just the statements the compiler emits, so that a
//! renderer can print it and the tests can interpret it without parsing text.

use std::collections::BTreeMap;

use crate::model::{Access, Direction, ObjectRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }

    /// The ICMP protocol number of this family (`icmp` or `ipv6-icmp`).
    pub fn icmp(self) -> u8 {
        match self {
            Family::V4 => proto::ICMP,
            Family::V6 => proto::ICMPV6,
        }
    }

    pub fn max(self) -> u128 {
        match self {
            Family::V4 => u32::MAX as u128,
            Family::V6 => u128::MAX,
        }
    }
}

/// IP protocol numbers the compiler names.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// ICMPv6 neighbour discovery types (router/neighbour solicitation and advertisement, redirect).
pub const ND_TYPES: [u8; 5] = [133, 134, 135, 136, 137];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Side {
    Src,
    Dst,
}

/// The type of one part of a set's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum KeyType {
    Ipv4,
    Ipv6,
    Proto,
    Port,
}

impl KeyType {
    /// The largest value of this part.
    pub fn max(self) -> u128 {
        match self {
            KeyType::Ipv4 => Family::V4.max(),
            KeyType::Ipv6 => Family::V6.max(),
            KeyType::Proto => u8::MAX as u128,
            KeyType::Port => u16::MAX as u128,
        }
    }
}

/// A packet field read by a map lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Field {
    /// `ip saddr`, `ip6 daddr`, ...; also restricts the rule to that family.
    Addr(Family, Side),
    /// `meta l4proto`.
    L4Proto,
    /// `th sport` / `th dport`: the first four bytes of the transport header, whatever it is.
    Port(Side),
    /// A constant: `th sport & 0 | ID` computes `ID` (an `inet_service`) whatever the port.
    /// As the first part of a key it lets many classes share one map: nft cannot put a
    /// constant in a concatenation otherwise. Only behind a TCP or UDP match.
    Class(u16),
}

impl Field {
    pub fn key_type(self) -> KeyType {
        match self {
            Field::Addr(Family::V4, _) => KeyType::Ipv4,
            Field::Addr(Family::V6, _) => KeyType::Ipv6,
            Field::L4Proto => KeyType::Proto,
            Field::Port(_) => KeyType::Port,
            Field::Class(_) => KeyType::Port,
        }
    }
}

/// An inclusive interval of one key part (an address, protocol or port as a number).
pub type Span = (u128, u128);

/// One element of a set or map: one interval per key part, and the verdict for a map.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Element {
    pub key: Vec<Span>,
    pub verdict: Option<Verdict>,
}

/// A named set (`verdict: None` elements) or verdict map.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Set {
    pub name: String,
    pub key: Vec<KeyType>,
    pub is_map: bool,
    pub interval: bool,
    pub comment: Option<String>,
    /// Sorted and disjoint.
    pub elements: Vec<Element>,
}

impl Set {
    /// Everything but the elements: what must not change for an element-only update.
    pub fn same_declaration(&self, other: &Set) -> bool {
        self.name == other.name
            && self.key == other.key
            && self.is_map == other.is_map
            && self.interval == other.interval
            && self.comment == other.comment
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum CtState {
    Invalid,
    Established,
    Related,
    New,
}

/// Where a match finds its addresses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum AddrSet {
    Named(String),
    /// An anonymous set of intervals.
    Literal(Vec<Span>),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Match {
    CtState(Vec<CtState>),
    /// `meta l4proto { ... }`.
    L4Proto(Vec<u8>),
    /// `icmpv6 type { ... }` (implies IPv6 and ICMPv6).
    Icmpv6Type(Vec<u8>),
    /// `ip saddr @set`, `ip6 daddr != @set`, `ip saddr { ... }`; implies the family.
    Addr {
        family: Family,
        side: Side,
        negate: bool,
        set: AddrSet,
    },
    /// `th dport { ... }`.
    Port {
        side: Side,
        ranges: Vec<(u16, u16)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    Verdict(Verdict),
    /// `KEY vmap @MAP` (a named map): no element matching means the rule does not match.
    Vmap {
        key: Vec<Field>,
        map: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub counter: bool,
    pub action: Action,
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, action: Action) -> Self {
        Rule {
            matches,
            counter: false,
            action,
            comment: None,
        }
    }

    pub fn verdict(matches: Vec<Match>, verdict: Verdict) -> Self {
        Rule::new(matches, Action::Verdict(verdict))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Hook {
    Forward,
    Input,
    Output,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Forward => "forward",
            Hook::Input => "input",
            Hook::Output => "output",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Chain {
    pub name: String,
    /// A base chain: `type filter hook HOOK priority filter; policy accept;`.
    pub hook: Option<Hook>,
    pub comment: Option<String>,
    pub rules: Vec<Rule>,
}

/// The NSG rule a counting chain stands for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct RuleRef {
    pub nsg: ObjectRef,
    pub direction: Direction,
    pub rule: String,
    pub priority: u32,
    pub access: Access,
}

/// One `inet` table, complete: rendering it and loading the text gives exactly this table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ruleset {
    pub table: String,
    /// Named sets and maps, sorted by name.
    pub sets: Vec<Set>,
    /// Base chains first, then the rest in the order they are printed.
    pub chains: Vec<Chain>,
    /// Per-rule chains (one counter each) and the NSG rule each stands for.
    pub rule_chains: BTreeMap<String, RuleRef>,
}

impl Ruleset {
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Whether `other` differs from this table in set and map elements only, so that an
    /// element update turns one into the other.
    pub fn same_structure(&self, other: &Ruleset) -> bool {
        self.table == other.table
            && self.chains == other.chains
            && self.rule_chains == other.rule_chains
            && self.sets.len() == other.sets.len()
            && self
                .sets
                .iter()
                .zip(&other.sets)
                .all(|(a, b)| a.same_declaration(b))
    }
}
