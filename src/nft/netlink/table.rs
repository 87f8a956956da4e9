//! A whole table as one netlink batch: the messages `nft -f` sends for `render_replace`,
//! encoded straight from the `Ruleset`. Why: at 4,096 rules and 10,000 pods, nft spent
//! 0.6-0.8 s parsing and evaluating 6.6 MB of text before the kernel saw any of it.
//!
//! The batch adds the table (so that deleting it succeeds), deletes it, adds it again, then
//! its chains (empty, so that verdicts can name any of them), its named sets with their
//! elements, and the rules, each after the anonymous sets it looks up. Expressions follow
//! nft 1.0.6's, so that `nft list table` prints the table as `render` does (the tests compare
//! the two listings); nft's own shortcuts (loading one byte of an address for a /8) are left
//! out where the listing is the same without them.

use super::{
    Attrs, Batch, Data, Elem, NFT_SET_ANONYMOUS, NFTA_CHAIN_NAME, NFTA_CHAIN_TABLE, NFTA_EXPR_DATA,
    NFTA_EXPR_NAME, NFTA_LIST_ELEM, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE,
    NFTA_SET_FLAGS, NFTA_SET_NAME, NFTA_SET_TABLE, NFTA_TABLE_NAME, NLM_F_CREATE, Op, field,
    set_elements, whole_elem,
};
use crate::nft::ruleset::*;

// linux/netfilter/nf_tables.h
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NLM_F_APPEND: u16 = 0x800;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_ACCEPT: u32 = 1;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_CONCAT: u16 = 2;
const NFTA_SET_FIELD_LEN: u16 = 1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_CONCAT: u32 = 0x80;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NFTA_RULE_USERDATA: u16 = 7;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG32_00: u32 = 8;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_STATE: u32 = 0;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_GTE: u32 = 5;
const NFT_CMP_LTE: u32 = 3;
const NFT_RANGE_NEQ: u32 = 1;
const NFT_LOOKUP_F_INV: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

// nft's data types (src/datatype.h) and user data (libnftnl's udata), which `nft list` reads.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_ICMP6_TYPE: u32 = 29;
const TYPE_BITS: u32 = 6;
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_COMMENT: u8 = 7;
const UDATA_COMMENT: u8 = 0; // of a rule or a chain
const BYTEORDER_BIG_ENDIAN: u32 = 2;
/// The kernel numbers anonymous sets; messages of the same batch find them by id.
const ANONYMOUS_SET: &str = "__set%d";

/// The batch that makes table `inet rs.table` exactly `rs`, whatever was there before.
pub fn replace(rs: &Ruleset) -> Batch {
    let mut l = Loader {
        batch: Batch::begin(),
        table: &rs.table,
        next_id: 0,
        set_ids: Default::default(),
    };
    l.replace_table();
    rs.chains.iter().for_each(|c| l.chain(c));
    rs.sets.iter().for_each(|s| l.named_set(s));
    for chain in &rs.chains {
        for (i, rule) in chain.rules.iter().enumerate() {
            l.rule(&chain.name, i, rule);
        }
    }
    l.batch.end()
}

/// The batch that removes table `inet TABLE`: adding it first makes the delete succeed when
/// it is not there, as `render_delete`'s script does.
pub fn delete(table: &str) -> Batch {
    let mut batch = Batch::begin();
    for (ty, flags, attrs, what) in add_and_delete(table) {
        batch.push(ty, flags, &attrs.0, what);
    }
    batch.end()
}

/// The messages that add table `inet TABLE` and delete it again.
fn add_and_delete(table: &str) -> [(u16, u16, Attrs, String); 2] {
    let named = || {
        let mut a = Attrs(Vec::new());
        a.put_str(NFTA_TABLE_NAME, table);
        a
    };
    [
        (
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            named(),
            format!("adding table inet {table}"),
        ),
        (
            NFT_MSG_DELTABLE,
            0,
            named(),
            format!("deleting table inet {table}"),
        ),
    ]
}

struct Loader<'a> {
    batch: Batch,
    table: &'a str,
    next_id: u32,
    /// The ids of the named sets created in this batch, by name.
    set_ids: std::collections::HashMap<&'a str, u32>,
}

/// A set's key as nft declares it: its data type and length, per field.
struct KeyDecl(Vec<(u32, u32)>);

impl KeyDecl {
    fn of(types: &[KeyType]) -> KeyDecl {
        KeyDecl(
            types
                .iter()
                .map(|t| match t {
                    KeyType::Ipv4 => (TYPE_IPADDR, 4),
                    KeyType::Ipv6 => (TYPE_IP6ADDR, 16),
                    KeyType::Proto => (TYPE_INET_PROTOCOL, 1),
                    KeyType::Port => (TYPE_INET_SERVICE, 2),
                })
                .collect(),
        )
    }

    /// A concatenation's type packs its fields' types, `TYPE_BITS` each.
    fn type_id(&self) -> u32 {
        self.0.iter().fold(0, |acc, (t, _)| (acc << TYPE_BITS) | t)
    }

    /// A concatenation pads every field to 4 bytes.
    fn len(&self) -> u32 {
        match &self.0[..] {
            [(_, len)] => *len,
            fields => fields.iter().map(|(_, len)| len.next_multiple_of(4)).sum(),
        }
    }
}

/// How a set is declared (the elements come separately).
struct SetDecl<'s> {
    name: &'s str,
    key: KeyDecl,
    flags: u32,
    comment: Option<&'s str>,
}

impl<'a> Loader<'a> {
    fn push(&mut self, ty: u16, flags: u16, attrs: Attrs, what: String) {
        self.batch.push(ty, flags, &attrs.0, what);
    }

    /// Deletes the table, whether it was there or not, and adds it again, empty.
    fn replace_table(&mut self) {
        let [add, delete] = add_and_delete(self.table);
        for (ty, flags, attrs, what) in [add.clone(), delete, add] {
            self.push(ty, flags, attrs, what);
        }
    }

    fn chain(&mut self, chain: &Chain) {
        let mut a = Attrs(Vec::new());
        a.put_str(NFTA_CHAIN_TABLE, self.table);
        a.put_str(NFTA_CHAIN_NAME, &chain.name);
        if let Some(hook) = chain.hook {
            // linux/netfilter.h: NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT.
            let num: u32 = match hook {
                Hook::Input => 1,
                Hook::Forward => 2,
                Hook::Output => 3,
            };
            a.nest(NFTA_CHAIN_HOOK, |a| {
                a.put_u32(NFTA_HOOK_HOOKNUM, num);
                a.put_u32(NFTA_HOOK_PRIORITY, 0); // `priority filter`
            });
            a.put_u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
            a.put_str(NFTA_CHAIN_TYPE, "filter");
        }
        if let Some(c) = &chain.comment {
            a.put(NFTA_CHAIN_USERDATA, &udata_str(UDATA_COMMENT, c));
        }
        let what = format!("adding chain {} to table inet {}", chain.name, self.table);
        self.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, a, what);
    }

    fn named_set(&mut self, set: &'a Set) {
        let mut flags = 0;
        if set.is_map {
            flags |= NFT_SET_MAP;
        }
        if set.interval {
            flags |= NFT_SET_INTERVAL;
        }
        let decl = SetDecl {
            name: &set.name,
            key: KeyDecl::of(&set.key),
            flags,
            comment: set.comment.as_deref(),
        };
        let id = self.new_set(&decl);
        self.set_ids.insert(&set.name, id);
        let elems = elems(&set.elements, &set.key, set.interval);
        set_elements(
            &mut self.batch,
            self.table,
            &set.name,
            Some(id),
            Op::Add,
            &elems,
        );
    }

    /// An anonymous constant set for one rule: its id (the kernel names it).
    fn anonymous_set(&mut self, key: KeyDecl, interval: bool, elems: &[Elem]) -> u32 {
        let mut flags = NFT_SET_ANONYMOUS | NFT_SET_CONSTANT;
        if interval {
            flags |= NFT_SET_INTERVAL;
        }
        let id = self.new_set(&SetDecl {
            name: ANONYMOUS_SET,
            key,
            flags,
            comment: None,
        });
        set_elements(
            &mut self.batch,
            self.table,
            ANONYMOUS_SET,
            Some(id),
            Op::Add,
            elems,
        );
        id
    }

    fn new_set(&mut self, decl: &SetDecl) -> u32 {
        self.next_id += 1;
        let id = self.next_id;
        let concat = decl.key.0.len() > 1;
        let mut flags = decl.flags;
        if concat && flags & NFT_SET_INTERVAL != 0 {
            flags |= NFT_SET_CONCAT;
        }
        let mut a = Attrs(Vec::new());
        a.put_str(NFTA_SET_TABLE, self.table);
        a.put_str(NFTA_SET_NAME, decl.name);
        a.put_u32(NFTA_SET_FLAGS, flags);
        a.put_u32(NFTA_SET_KEY_TYPE, decl.key.type_id());
        a.put_u32(NFTA_SET_KEY_LEN, decl.key.len());
        if flags & NFT_SET_MAP != 0 {
            a.put_u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
            a.put_u32(NFTA_SET_DATA_LEN, 0);
        }
        if flags & NFT_SET_CONCAT != 0 {
            a.nest(NFTA_SET_DESC, |a| {
                a.nest(NFTA_SET_DESC_CONCAT, |a| {
                    for (_, len) in &decl.key.0 {
                        a.nest(NFTA_LIST_ELEM, |a| a.put_u32(NFTA_SET_FIELD_LEN, *len));
                    }
                })
            });
        }
        a.put_u32(NFTA_SET_ID, id);
        let byteorder = if concat { 0 } else { BYTEORDER_BIG_ENDIAN };
        let mut udata = udata_u32(UDATA_SET_KEYBYTEORDER, byteorder);
        if flags & NFT_SET_MAP != 0 {
            udata.extend(udata_u32(UDATA_SET_DATABYTEORDER, 0));
        }
        if let Some(c) = decl.comment {
            udata.extend(udata_str(UDATA_SET_COMMENT, c));
        }
        a.put(NFTA_SET_USERDATA, &udata);
        let what = format!("adding set {} to table inet {}", decl.name, self.table);
        self.push(NFT_MSG_NEWSET, NLM_F_CREATE, a, what);
        id
    }

    fn rule(&mut self, chain: &str, index: usize, rule: &Rule) {
        let mut e = Exprs(Attrs(Vec::new()));
        let mut matches = &rule.matches[..];
        while let [m, rest @ ..] = matches {
            if let Some(both) = both_ports(matches) {
                // As nft merges them: one load of the two adjacent fields.
                e.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 4, NFT_REG_1);
                e.cmp(NFT_CMP_EQ, &both);
                matches = &rest[1..];
            } else {
                self.match_exprs(&mut e, m);
                matches = rest;
            }
        }
        if rule.counter {
            e.expr("counter", |a| {
                a.put(1, &0u64.to_be_bytes()); // NFTA_COUNTER_BYTES
                a.put(2, &0u64.to_be_bytes()); // NFTA_COUNTER_PACKETS
            });
        }
        match &rule.action {
            Action::Verdict(v) => e.verdict(v),
            Action::Vmap { key: fields, map } => {
                e.load_key(fields);
                let id = self.set_ids.get(map.as_str()).copied();
                e.lookup(map, id, Some(NFT_REG_VERDICT), false);
            }
        }
        let mut a = Attrs(Vec::new());
        a.put_str(NFTA_RULE_TABLE, self.table);
        a.put_str(NFTA_RULE_CHAIN, chain);
        a.put_nested(NFTA_RULE_EXPRESSIONS, &e.0.0);
        if let Some(c) = &rule.comment {
            a.put(NFTA_RULE_USERDATA, &udata_str(UDATA_COMMENT, c));
        }
        let what = format!(
            "adding rule {} of chain {chain} in table inet {}",
            index + 1,
            self.table
        );
        self.push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, a, what);
    }

    fn match_exprs(&mut self, e: &mut Exprs, m: &Match) {
        match m {
            Match::CtState(states) => {
                let bits = states.iter().fold(0u32, |acc, s| {
                    acc | match s {
                        CtState::Invalid => 1,
                        CtState::Established => 2,
                        CtState::Related => 4,
                        CtState::New => 8,
                    }
                });
                e.expr("ct", |a| {
                    a.put_u32(1, NFT_REG_1); // NFTA_CT_DREG
                    a.put_u32(2, NFT_CT_STATE); // NFTA_CT_KEY
                });
                e.bitwise(NFT_REG_1, &bits.to_ne_bytes(), &[0; 4]);
                e.cmp(NFT_CMP_NEQ, &[0; 4]);
            }
            Match::L4Proto(protos) => {
                e.meta(NFT_META_L4PROTO, NFT_REG_1);
                let values: Vec<Vec<u8>> = protos.iter().map(|p| vec![*p]).collect();
                self.one_of(e, (TYPE_INET_PROTOCOL, 1), &values);
            }
            Match::Icmpv6Type(types) => {
                e.nfproto(Family::V6);
                e.meta(NFT_META_L4PROTO, NFT_REG_1);
                e.cmp(NFT_CMP_EQ, &[proto::ICMPV6]);
                e.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1, NFT_REG_1);
                let values: Vec<Vec<u8>> = types.iter().map(|t| vec![*t]).collect();
                self.one_of(e, (TYPE_ICMP6_TYPE, 1), &values);
            }
            Match::Addr {
                family,
                side,
                negate,
                set,
            } => {
                let field = Field::Addr(*family, *side);
                e.nfproto(*family);
                e.load(field, NFT_REG_1);
                let t = field.key_type();
                match set {
                    AddrSet::Named(n) => {
                        let id = self.set_ids.get(n.as_str()).copied();
                        e.lookup(n, id, None, *negate);
                    }
                    AddrSet::Literal(spans) => self.in_spans(e, t, spans, *negate),
                }
            }
            Match::Port { side, ranges } => {
                e.load(Field::Port(*side), NFT_REG_1);
                let spans: Vec<Span> = ranges
                    .iter()
                    .map(|&(a, b)| (a as u128, b as u128))
                    .collect();
                self.in_spans(e, KeyType::Port, &spans, false);
            }
        }
    }

    /// The loaded value is one of `values`: a comparison, or a lookup in an anonymous set.
    fn one_of(&mut self, e: &mut Exprs, key: (u32, u32), values: &[Vec<u8>]) {
        if let [one] = values {
            return e.cmp(NFT_CMP_EQ, one);
        }
        let elems: Vec<Elem> = values.iter().map(|v| plain(v.clone())).collect();
        let id = self.anonymous_set(KeyDecl(vec![key]), false, &elems);
        e.lookup(ANONYMOUS_SET, Some(id), None, false);
    }

    /// The loaded value is (`negate`: is not) in one of `spans`, as nft writes it: one span
    /// as a value compared, a prefix masked and compared or a range between two comparisons;
    /// a list (`{ ... }`) as an anonymous interval set, where nft merges overlapping and
    /// adjacent spans.
    fn in_spans(&mut self, e: &mut Exprs, t: KeyType, spans: &[Span], negate: bool) {
        let op = if negate { NFT_CMP_NEQ } else { NFT_CMP_EQ };
        match *spans {
            [(a, b)] if a == b => e.cmp(op, &field(a, t)),
            [(a, b)] if t != KeyType::Port && prefix_mask(a, b, t).is_some() => {
                let mask = prefix_mask(a, b, t).unwrap();
                e.bitwise(NFT_REG_1, &field(mask, t), &field(0, t));
                e.cmp(op, &field(a, t));
            }
            [(a, b)] if negate => e.expr("range", |r| {
                r.put_u32(1, NFT_REG_1); // NFTA_RANGE_SREG
                r.put_u32(2, NFT_RANGE_NEQ); // NFTA_RANGE_OP
                r.data(3, &Data::Value(field(a, t))); // NFTA_RANGE_FROM_DATA
                r.data(4, &Data::Value(field(b, t))); // NFTA_RANGE_TO_DATA
            }),
            [(a, b)] => {
                e.cmp(NFT_CMP_GTE, &field(a, t));
                e.cmp(NFT_CMP_LTE, &field(b, t));
            }
            _ => {
                let mut sorted = spans.to_vec();
                sorted.sort();
                let mut elements: Vec<Element> = Vec::with_capacity(sorted.len());
                for (a, b) in sorted {
                    match elements.last_mut() {
                        Some(last) if a <= last.key[0].1.saturating_add(1) => {
                            last.key[0].1 = last.key[0].1.max(b)
                        }
                        _ => elements.push(Element {
                            key: vec![(a, b)],
                            verdict: None,
                        }),
                    }
                }
                let elems = elems(&elements, &[t], true);
                let id = self.anonymous_set(KeyDecl::of(&[t]), true, &elems);
                e.lookup(ANONYMOUS_SET, Some(id), None, negate);
            }
        }
    }
}

/// The source and destination port (network order) when `matches` starts with one exact
/// port on each side.
fn both_ports(matches: &[Match]) -> Option<Vec<u8>> {
    let exact = |m: &Match| match m {
        Match::Port { side, ranges } => match ranges[..] {
            [(a, b)] if a == b => Some((*side, a)),
            _ => None,
        },
        _ => None,
    };
    let (s1, p1) = exact(matches.first()?)?;
    let (s2, p2) = exact(matches.get(1)?)?;
    let (src, dst) = match (s1, s2) {
        (Side::Src, Side::Dst) => (p1, p2),
        (Side::Dst, Side::Src) => (p2, p1),
        _ => return None,
    };
    Some([src.to_be_bytes(), dst.to_be_bytes()].concat())
}

/// The netmask of `a..=b` when it is one CIDR block (the whole space included).
fn prefix_mask(a: u128, b: u128, t: KeyType) -> Option<u128> {
    let max = t.max();
    let host = b ^ a;
    (host & host.wrapping_add(1) == 0 && a & host == 0 && b <= max).then_some(max & !host)
}

fn plain(key: Vec<u8>) -> Elem {
    Elem {
        key,
        key_end: None,
        data: None,
        interval_end: false,
    }
}

/// A set's elements as the kernel keeps them. In a single-field interval (rbtree) set, an
/// interval is its start (with the verdict) and the first key after it, flagged as an end;
/// as nft does, the space before the first interval is closed by an end at zero, and an
/// interval reaching the top of the space has no end. A concatenated interval (pipapo) set
/// keeps each interval whole.
pub(super) fn elems(elements: &[Element], types: &[KeyType], interval: bool) -> Vec<Elem> {
    if !interval || types.len() > 1 {
        return elements
            .iter()
            .map(|e| whole_elem(e, types, interval))
            .collect();
    }
    let t = types[0];
    let end = |v: u128| Elem {
        interval_end: true,
        ..plain(field(v, t))
    };
    let mut out = Vec::with_capacity(2 * elements.len() + 1);
    if elements.first().is_some_and(|e| e.key[0].0 > 0) {
        out.push(end(0));
    }
    for e in elements {
        let (a, b) = e.key[0];
        out.push(Elem {
            data: e.verdict.clone().map(Data::Verdict),
            ..plain(field(a, t))
        });
        if b < t.max() {
            out.push(end(b + 1));
        }
    }
    out
}

/// nft's user data: one type-length-value. Comments are at most 128 bytes (nft's limit, which
/// the compiler keeps), so the length fits its byte.
fn udata_str(ty: u8, s: &str) -> Vec<u8> {
    let mut v = vec![ty, (s.len() + 1) as u8];
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

fn udata_u32(ty: u8, value: u32) -> Vec<u8> {
    let mut v = vec![ty, 4];
    v.extend_from_slice(&value.to_ne_bytes());
    v
}

/// A rule's expressions.
struct Exprs(Attrs);

impl Exprs {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Attrs)) {
        self.0.nest(NFTA_LIST_ELEM, |a| {
            a.put_str(NFTA_EXPR_NAME, name);
            a.nest(NFTA_EXPR_DATA, body);
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
        self.expr("payload", |a| {
            a.put_u32(1, dreg); // NFTA_PAYLOAD_DREG
            a.put_u32(2, base); // NFTA_PAYLOAD_BASE
            a.put_u32(3, offset); // NFTA_PAYLOAD_OFFSET
            a.put_u32(4, len); // NFTA_PAYLOAD_LEN
        });
    }

    fn meta(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |a| {
            a.put_u32(1, dreg); // NFTA_META_DREG
            a.put_u32(2, key); // NFTA_META_KEY
        });
    }

    /// Compares register 1.
    fn cmp(&mut self, op: u32, value: &[u8]) {
        self.expr("cmp", |a| {
            a.put_u32(1, NFT_REG_1); // NFTA_CMP_SREG
            a.put_u32(2, op); // NFTA_CMP_OP
            a.data(3, &Data::Value(value.to_vec())); // NFTA_CMP_DATA
        });
    }

    /// `reg = (reg & mask) ^ xor`.
    fn bitwise(&mut self, reg: u32, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |a| {
            a.put_u32(1, reg); // NFTA_BITWISE_SREG
            a.put_u32(2, reg); // NFTA_BITWISE_DREG
            a.put_u32(3, mask.len() as u32); // NFTA_BITWISE_LEN
            a.data(4, &Data::Value(mask.to_vec())); // NFTA_BITWISE_MASK
            a.data(5, &Data::Value(xor.to_vec())); // NFTA_BITWISE_XOR
        });
    }

    /// Looks register 1 up in a set; a map's result goes to `dreg`.
    fn lookup(&mut self, set: &str, id: Option<u32>, dreg: Option<u32>, negate: bool) {
        self.expr("lookup", |a| {
            a.put_str(1, set); // NFTA_LOOKUP_SET
            a.put_u32(2, NFT_REG_1); // NFTA_LOOKUP_SREG
            if let Some(d) = dreg {
                a.put_u32(3, d); // NFTA_LOOKUP_DREG
            }
            if let Some(id) = id {
                a.put_u32(4, id); // NFTA_LOOKUP_SET_ID
            }
            if negate {
                a.put_u32(5, NFT_LOOKUP_F_INV); // NFTA_LOOKUP_FLAGS
            }
        });
    }

    fn verdict(&mut self, v: &Verdict) {
        self.expr("immediate", |a| {
            a.put_u32(1, NFT_REG_VERDICT); // NFTA_IMMEDIATE_DREG
            a.data(2, &Data::Verdict(v.clone())); // NFTA_IMMEDIATE_DATA
        });
    }

    /// `meta nfproto ipv4|ipv6`: what `ip` and `ip6` matches imply in an `inet` table.
    fn nfproto(&mut self, family: Family) {
        self.meta(NFT_META_NFPROTO, NFT_REG_1);
        let p = match family {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        };
        self.cmp(NFT_CMP_EQ, &[p]);
    }

    /// Loads one field into `reg`.
    fn load(&mut self, f: Field, reg: u32) {
        let th = NFT_PAYLOAD_TRANSPORT_HEADER;
        match f {
            Field::Addr(fam, side) => {
                let (offset, len) = match (fam, side) {
                    (Family::V4, Side::Src) => (12, 4),
                    (Family::V4, Side::Dst) => (16, 4),
                    (Family::V6, Side::Src) => (8, 16),
                    (Family::V6, Side::Dst) => (24, 16),
                };
                self.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len, reg);
            }
            Field::L4Proto => self.meta(NFT_META_L4PROTO, reg),
            Field::Port(Side::Src) => self.payload(th, 0, 2, reg),
            Field::Port(Side::Dst) => self.payload(th, 2, 2, reg),
            Field::Class(id) => {
                self.payload(th, 0, 2, reg);
                self.bitwise(reg, &[0, 0], &id.to_be_bytes());
            }
        }
    }

    /// A map's key into consecutive registers from register 1, each field at a multiple of
    /// 4 bytes, after the family checks its addresses imply.
    fn load_key(&mut self, fields: &[Field]) {
        let mut families: Vec<Family> = fields
            .iter()
            .filter_map(|f| match f {
                Field::Addr(fam, _) => Some(*fam),
                _ => None,
            })
            .collect();
        families.dedup();
        families.into_iter().for_each(|f| self.nfproto(f));
        let mut offset = 0;
        for (i, f) in fields.iter().enumerate() {
            let reg = if i == 0 {
                NFT_REG_1
            } else {
                NFT_REG32_00 + offset / 4
            };
            self.load(*f, reg);
            offset += KeyDecl::of(&[f.key_type()]).len().next_multiple_of(4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> u128 {
        u32::from(s.parse::<std::net::Ipv4Addr>().unwrap()) as u128
    }

    /// Keys and end flags, as `nft --debug=netlink` printed them for the same sets.
    fn shape(elems: &[Elem]) -> Vec<(Vec<u8>, bool, bool)> {
        elems
            .iter()
            .map(|e| (e.key.clone(), e.interval_end, e.data.is_some()))
            .collect()
    }

    #[test]
    fn interval_sets_keep_starts_and_ends() {
        let one = |a: u128, b: u128, verdict: Option<Verdict>| Element {
            key: vec![(a, b)],
            verdict,
        };
        // `elements = { 172.18.0.2 }` in an interval set: closed below by an end at zero.
        let set = elems(
            &[one(v4("172.18.0.2"), v4("172.18.0.2"), None)],
            &[KeyType::Ipv4],
            true,
        );
        assert_eq!(
            shape(&set),
            vec![
                (vec![0, 0, 0, 0], true, false),
                (vec![172, 18, 0, 2], false, false),
                (vec![172, 18, 0, 3], true, false),
            ]
        );
        // A map covering the whole space: an end and a start share a key; the top has no end.
        let goto = || Some(Verdict::Goto("c".into()));
        let map = elems(
            &[
                one(0, v4("10.243.255.255"), goto()),
                one(v4("10.244.0.0"), Family::V4.max(), goto()),
            ],
            &[KeyType::Ipv4],
            true,
        );
        assert_eq!(
            shape(&map),
            vec![
                (vec![0, 0, 0, 0], false, true),
                (vec![10, 244, 0, 0], true, false),
                (vec![10, 244, 0, 0], false, true),
            ]
        );
    }

    #[test]
    fn prefixes_and_adjacent_ports() {
        assert_eq!(
            prefix_mask(v4("10.0.0.0"), v4("10.255.255.255"), KeyType::Ipv4),
            Some(v4("255.0.0.0"))
        );
        assert_eq!(prefix_mask(0, Family::V6.max(), KeyType::Ipv6), Some(0));
        assert_eq!(
            prefix_mask(v4("10.0.0.5"), v4("10.0.0.9"), KeyType::Ipv4),
            None
        );
        assert_eq!(
            prefix_mask(v4("10.0.0.1"), v4("10.0.0.2"), KeyType::Ipv4),
            None
        );
        let port = |side, p: u16| Match::Port {
            side,
            ranges: vec![(p, p)],
        };
        assert_eq!(
            both_ports(&[port(Side::Dst, 80), port(Side::Src, 53)]),
            Some(vec![0, 53, 0, 80])
        );
        assert_eq!(
            both_ports(&[port(Side::Dst, 80), port(Side::Dst, 53)]),
            None
        );
        let range = Match::Port {
            side: Side::Src,
            ranges: vec![(1, 2)],
        };
        assert_eq!(both_ports(&[port(Side::Dst, 80), range]), None);
    }
}
