//! `nft -f` text from a `Ruleset`: the full definition, atomic replacement, element-only
//! updates and removal. Deterministic: the same ruleset always gives the same bytes.

use std::fmt::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};

use super::ruleset::*;

/// The table as `nft list table` would print it (without counters' values and handles).
pub fn render(rs: &Ruleset) -> String {
    let mut out = String::new();
    writeln!(out, "table inet {} {{", rs.table).unwrap();
    let mut first = true;
    for set in &rs.sets {
        if !first {
            out.push('\n');
        }
        first = false;
        render_set(&mut out, set);
    }
    for chain in &rs.chains {
        if !first {
            out.push('\n');
        }
        first = false;
        render_chain(&mut out, chain);
    }
    out.push_str("}\n");
    out
}

/// One transaction that makes the table exactly `rs`, whatever was there before: adding the
/// table first makes the delete succeed when it did not exist.
pub fn render_replace(rs: &Ruleset) -> String {
    format!(
        "table inet {t}\ndelete table inet {t}\n{}",
        render(rs),
        t = rs.table
    )
}

/// Removes the table; succeeds whether or not it exists (the agent's `--cleanup`).
pub fn render_delete(table: &str) -> String {
    format!("table inet {table}\ndelete table inet {table}\n")
}

/// What it takes to go from the table in the kernel to a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    Unchanged,
    /// Only set and map elements differ: pod churn and membership changes.
    Elements(ElementUpdate),
    /// Chains or set declarations differ: the whole table, atomically (`Nft::replace`).
    Replace,
}

/// Element changes of one table, applied as one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementUpdate {
    pub table: String,
    /// The sets that change, in the table's order.
    pub sets: Vec<SetChange>,
}

/// The elements one set or map loses and gains. A changed verdict is a delete then an add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetChange {
    pub name: String,
    pub key: Vec<KeyType>,
    pub is_map: bool,
    pub interval: bool,
    /// The set is emptied first and `add` holds all its elements: how a single-field
    /// interval set changes. The kernel keeps its ranges as start and end elements, shared
    /// between neighbours; written whole, they are laid out as in a table load.
    pub flush: bool,
    /// Keys only (no verdicts).
    pub delete: Vec<Element>,
    pub add: Vec<Element>,
}

impl ElementUpdate {
    /// The `nft -f` script: every delete first, so a re-split interval never overlaps its
    /// old self.
    pub fn script(&self) -> String {
        let mut deletes = String::new();
        let mut adds = String::new();
        for s in &self.sets {
            if s.flush {
                let kind = if s.is_map { "map" } else { "set" };
                writeln!(deletes, "flush {kind} inet {} {}", self.table, s.name).unwrap();
            }
            for (out, verb, elements) in [
                (&mut deletes, "delete", &s.delete),
                (&mut adds, "add", &s.add),
            ] {
                if !elements.is_empty() {
                    let items: Vec<String> = elements.iter().map(|e| element(e, &s.key)).collect();
                    writeln!(
                        out,
                        "{verb} element inet {} {} {{ {} }}",
                        self.table,
                        s.name,
                        items.join(", ")
                    )
                    .unwrap();
                }
            }
        }
        deletes + &adds
    }
}

/// The smallest update from `old` (what the kernel has; `None`: unknown) to `new`.
pub fn render_update(old: Option<&Ruleset>, new: &Ruleset) -> Update {
    let Some(old) = old.filter(|o| o.same_structure(new)) else {
        return Update::Replace;
    };
    let mut sets = Vec::new();
    for (o, n) in old.sets.iter().zip(&new.sets) {
        if o.elements == n.elements {
            continue; // most sets
        }
        if n.interval && n.key.len() == 1 {
            sets.push(SetChange {
                name: n.name.clone(),
                key: n.key.clone(),
                is_map: n.is_map,
                interval: true,
                flush: true,
                delete: vec![],
                add: n.elements.clone(),
            });
            continue;
        }
        let (gone, added) = difference(&o.elements, &n.elements);
        let delete: Vec<Element> = gone
            .into_iter()
            .map(|e| Element {
                key: e.key.clone(),
                verdict: None,
            })
            .collect();
        let add: Vec<Element> = added.into_iter().cloned().collect();
        if !delete.is_empty() || !add.is_empty() {
            sets.push(SetChange {
                name: n.name.clone(),
                key: n.key.clone(),
                is_map: n.is_map,
                interval: n.interval,
                flush: false,
                delete,
                add,
            });
        }
    }
    if sets.is_empty() {
        Update::Unchanged
    } else {
        Update::Elements(ElementUpdate {
            table: new.table.clone(),
            sets,
        })
    }
}

/// The elements only in `a` and those only in `b`, by merging sorted copies (the compiler's
/// elements come sorted, which the sort detects in linear time).
fn difference<'a>(a: &'a [Element], b: &'a [Element]) -> (Vec<&'a Element>, Vec<&'a Element>) {
    let sorted = |v: &'a [Element]| {
        let mut v: Vec<&Element> = v.iter().collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let (a, b) = (sorted(a), sorted(b));
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    loop {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => (i, j) = (i + 1, j + 1),
            (Some(x), Some(y)) if x < y => {
                only_a.push(*x);
                i += 1;
            }
            (Some(x), None) => {
                only_a.push(*x);
                i += 1;
            }
            (_, Some(y)) => {
                only_b.push(*y);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (only_a, only_b)
}

fn render_set(out: &mut String, set: &Set) {
    let kind = if set.is_map { "map" } else { "set" };
    writeln!(out, "\t{kind} {} {{", set.name).unwrap();
    let key: Vec<&str> = set.key.iter().map(|k| type_name(*k)).collect();
    let data = if set.is_map { " : verdict" } else { "" };
    writeln!(out, "\t\ttype {}{data}", key.join(" . ")).unwrap();
    if set.interval {
        out.push_str("\t\tflags interval\n");
    }
    if let Some(c) = &set.comment {
        writeln!(out, "\t\tcomment \"{c}\"").unwrap();
    }
    if !set.elements.is_empty() {
        out.push_str("\t\telements = {\n");
        for (i, e) in set.elements.iter().enumerate() {
            let sep = if i + 1 < set.elements.len() { "," } else { "" };
            writeln!(out, "\t\t\t{}{sep}", ElementText(e, &set.key)).unwrap();
        }
        out.push_str("\t\t}\n");
    }
    out.push_str("\t}\n");
}

fn render_chain(out: &mut String, chain: &Chain) {
    writeln!(out, "\tchain {} {{", chain.name).unwrap();
    if let Some(hook) = chain.hook {
        writeln!(
            out,
            "\t\ttype filter hook {} priority filter; policy accept;",
            hook.name()
        )
        .unwrap();
    }
    if let Some(c) = &chain.comment {
        writeln!(out, "\t\tcomment \"{c}\"").unwrap();
    }
    for rule in &chain.rules {
        writeln!(out, "\t\t{}", rule_text(rule)).unwrap();
    }
    out.push_str("\t}\n");
}

/// One rule on one line.
pub fn rule_text(rule: &Rule) -> String {
    let mut parts: Vec<String> = rule.matches.iter().map(match_text).collect();
    if rule.counter {
        parts.push("counter".into());
    }
    parts.push(match &rule.action {
        Action::Verdict(v) => verdict(v),
        Action::Vmap { key, map } => {
            let fields: Vec<String> = key.iter().map(|f| field(*f)).collect();
            format!("{} vmap @{map}", fields.join(" . "))
        }
    });
    if let Some(c) = &rule.comment {
        parts.push(format!("comment \"{c}\""));
    }
    parts.join(" ")
}

fn match_text(m: &Match) -> String {
    match m {
        Match::CtState(states) => {
            let s: Vec<&str> = states
                .iter()
                .map(|s| match s {
                    CtState::Invalid => "invalid",
                    CtState::Established => "established",
                    CtState::Related => "related",
                    CtState::New => "new",
                })
                .collect();
            format!("ct state {}", s.join(","))
        }
        Match::L4Proto(ps) => format!("meta l4proto {}", list(ps.iter().map(|p| proto_name(*p)))),
        Match::Icmpv6Type(ts) => {
            format!("icmpv6 type {}", list(ts.iter().map(|t| icmpv6_type(*t))))
        }
        Match::Addr {
            family,
            side,
            negate,
            set,
        } => {
            let f = field(Field::Addr(*family, *side));
            let op = if *negate { "!= " } else { "" };
            let kt = Field::Addr(*family, *side).key_type();
            let rhs = match set {
                AddrSet::Named(n) => format!("@{n}"),
                AddrSet::Literal(spans) => list(spans.iter().map(|s| key_part(*s, kt))),
            };
            format!("{f} {op}{rhs}")
        }
        Match::Port { side, ranges } => {
            let f = field(Field::Port(*side));
            format!(
                "{f} {}",
                list(
                    ranges
                        .iter()
                        .map(|&(a, b)| key_part((a as u128, b as u128), KeyType::Port))
                )
            )
        }
    }
}

/// `x` or `{ x, y }`.
fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.len() == 1 {
        items[0].clone()
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

struct VerdictText<'a>(&'a Verdict);

impl fmt::Display for VerdictText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

fn verdict(v: &Verdict) -> String {
    VerdictText(v).to_string()
}

fn field(f: Field) -> String {
    match f {
        Field::Addr(Family::V4, Side::Src) => "ip saddr".into(),
        Field::Addr(Family::V4, Side::Dst) => "ip daddr".into(),
        Field::Addr(Family::V6, Side::Src) => "ip6 saddr".into(),
        Field::Addr(Family::V6, Side::Dst) => "ip6 daddr".into(),
        Field::L4Proto => "meta l4proto".into(),
        Field::Port(Side::Src) => "th sport".into(),
        Field::Port(Side::Dst) => "th dport".into(),
        Field::Class(id) => format!("th sport & 0 | {id}"),
    }
}

fn type_name(k: KeyType) -> &'static str {
    match k {
        KeyType::Ipv4 => "ipv4_addr",
        KeyType::Ipv6 => "ipv6_addr",
        KeyType::Proto => "inet_proto",
        KeyType::Port => "inet_service",
    }
}

fn proto_name(p: u8) -> String {
    match p {
        proto::ICMP => "icmp".into(),
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMPV6 => "ipv6-icmp".into(),
        n => n.to_string(),
    }
}

fn icmpv6_type(t: u8) -> String {
    match t {
        133 => "nd-router-solicit".into(),
        134 => "nd-router-advert".into(),
        135 => "nd-neighbor-solicit".into(),
        136 => "nd-neighbor-advert".into(),
        137 => "nd-redirect".into(),
        n => n.to_string(),
    }
}

/// An element as nft lists it: its key parts joined by ` . `, then ` : verdict` in a map.
/// Written straight into the output: a large node's table has ~10^5 elements.
struct ElementText<'a>(&'a Element, &'a [KeyType]);

impl fmt::Display for ElementText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, (span, t)) in self.0.key.iter().zip(self.1).enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            KeyPart(*span, *t).fmt(f)?;
        }
        match &self.0.verdict {
            Some(v) => write!(f, " : {}", VerdictText(v)),
            None => Ok(()),
        }
    }
}

fn element(e: &Element, types: &[KeyType]) -> String {
    ElementText(e, types).to_string()
}

/// An interval of one key part: a single value, a CIDR block when aligned, else `a-b`.
struct KeyPart(Span, KeyType);

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let KeyPart((a, b), t) = *self;
        let addr = |f: &mut fmt::Formatter, v: u128| match t {
            KeyType::Ipv4 => Ipv4Addr::from(v as u32).fmt(f),
            _ => Ipv6Addr::from(v).fmt(f),
        };
        match t {
            KeyType::Ipv4 | KeyType::Ipv6 => {
                let bits = if t == KeyType::Ipv4 { 32 } else { 128 };
                if a == b {
                    return addr(f, a);
                }
                let size = b.wrapping_sub(a).wrapping_add(1); // 0 = the whole IPv6 space
                addr(f, a)?;
                if size == 0 || (size.is_power_of_two() && a % size == 0) {
                    let host = if size == 0 {
                        128
                    } else {
                        size.trailing_zeros()
                    };
                    write!(f, "/{}", bits - host)
                } else {
                    f.write_str("-")?;
                    addr(f, b)
                }
            }
            KeyType::Proto if a == b => f.write_str(&proto_name(a as u8)),
            KeyType::Proto | KeyType::Port if a == b => write!(f, "{a}"),
            KeyType::Proto | KeyType::Port => write!(f, "{a}-{b}"),
        }
    }
}

fn key_part(span: Span, t: KeyType) -> String {
    KeyPart(span, t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parts_print_as_nft_lists_them() {
        let v4 = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap()) as u128;
        assert_eq!(
            key_part((v4("10.0.0.1"), v4("10.0.0.1")), KeyType::Ipv4),
            "10.0.0.1"
        );
        assert_eq!(
            key_part((v4("10.0.0.0"), v4("10.0.255.255")), KeyType::Ipv4),
            "10.0.0.0/16"
        );
        assert_eq!(
            key_part((v4("10.0.0.5"), v4("10.0.0.9")), KeyType::Ipv4),
            "10.0.0.5-10.0.0.9"
        );
        assert_eq!(key_part((0, u32::MAX as u128), KeyType::Ipv4), "0.0.0.0/0");
        assert_eq!(key_part((0, u128::MAX), KeyType::Ipv6), "::/0");
        assert_eq!(key_part((6, 6), KeyType::Proto), "tcp");
        assert_eq!(key_part((6, 17), KeyType::Proto), "6-17");
        assert_eq!(key_part((80, 80), KeyType::Port), "80");
        assert_eq!(key_part((0, 65535), KeyType::Port), "0-65535");
    }

    #[test]
    fn differences_of_unsorted_elements() {
        let e = |k: u128| Element {
            key: vec![(k, k)],
            verdict: None,
        };
        let (a, b) = (vec![e(5), e(1), e(3), e(1)], vec![e(4), e(3), e(6)]);
        let (only_a, only_b) = difference(&a, &b);
        assert_eq!(only_a, vec![&e(1), &e(5)]);
        assert_eq!(only_b, vec![&e(4), &e(6)]);
    }

    #[test]
    fn delete_is_idempotent_text() {
        assert_eq!(
            render_delete("kube-nsg"),
            "table inet kube-nsg\ndelete table inet kube-nsg\n"
        );
    }
}
