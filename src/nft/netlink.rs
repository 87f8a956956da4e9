//! Element updates sent straight to the kernel over netlink (nfnetlink, nf_tables), without
//! the `nft` program. Why: for any `add element`, nft 1.0.6 first fetches every element of
//! every interval set in the ruleset into its cache, so one membership change next to a large
//! table took ~100 ms in userspace; the kernel itself needs well under a millisecond.
//!
//! One update is one batch (`NFNL_MSG_BATCH_BEGIN`, the `NFT_MSG_DELSETELEM` and
//! `NFT_MSG_NEWSETELEM` messages, `NFNL_MSG_BATCH_END`): one transaction, all or nothing.
//! Every message asks for an acknowledgement; the kernel handles the batch within `send`, so
//! all answers are queued when it returns.
//!
//! Generic over the sets of one `inet` table: keys of any fixed-size fields (concatenations
//! included), ranges of concatenated interval (pipapo) sets, and verdict or value data.
//! Single-field interval (rbtree) sets keep ranges as start and end elements: [`ops`] leaves
//! those updates to `nft`.

use std::io::ErrorKind;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::apply::NftError;
use super::render::{ElementUpdate, SetChange};
use super::ruleset::{Element, KeyType, Span, Verdict};

/// What a map element maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    Verdict(Verdict),
    /// A value in the bytes of the map's data type (a `mark` is a host-endian u32).
    Value(Vec<u8>),
}

/// One element as the kernel keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    /// The key bytes (see [`key`]).
    pub key: Vec<u8>,
    /// The inclusive end of a range, in a concatenated interval (pipapo) set.
    pub key_end: Option<Vec<u8>>,
    /// Ignored when deleting (the kernel finds an element by its key).
    pub data: Option<Data>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
}

/// Elements to add to or delete from one named set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElems {
    pub set: String,
    pub op: Op,
    pub elems: Vec<Elem>,
}

/// A key from its fields' bytes (network order for addresses and ports), laid out as nft
/// does: a single field as it is, each field of a concatenation padded to 4 bytes.
pub fn key(fields: &[Vec<u8>]) -> Vec<u8> {
    if let [one] = fields {
        return one.clone();
    }
    let mut out = Vec::new();
    for f in fields {
        out.extend_from_slice(f);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

/// The update as netlink operations, deletes first (as in its script); `None` when it touches
/// a single-field interval (rbtree) set.
pub fn ops(update: &ElementUpdate) -> Option<Vec<SetElems>> {
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    for change in &update.sets {
        if change.interval && change.key.len() == 1 {
            return None;
        }
        for (op, elements, out) in [
            (Op::Delete, &change.delete, &mut deletes),
            (Op::Add, &change.add, &mut adds),
        ] {
            if !elements.is_empty() {
                out.push(SetElems {
                    set: change.name.clone(),
                    op,
                    elems: elements
                        .iter()
                        .map(|e| elem(change, e))
                        .collect::<Option<_>>()?,
                });
            }
        }
    }
    deletes.extend(adds);
    Some(deletes)
}

fn elem(change: &SetChange, e: &Element) -> Option<Elem> {
    let fields = |end: bool| -> Vec<Vec<u8>> {
        e.key
            .iter()
            .zip(&change.key)
            .map(|(&(a, b), &t)| field(if end { b } else { a }, t))
            .collect()
    };
    let points = e.key.iter().all(|&(a, b): &Span| a == b);
    if !change.interval && !points {
        return None; // a range in a hash set: let nft say what is wrong
    }
    Some(Elem {
        key: key(&fields(false)),
        key_end: change.interval.then(|| key(&fields(true))),
        data: e.verdict.clone().map(Data::Verdict),
    })
}

fn field(v: u128, t: KeyType) -> Vec<u8> {
    match t {
        KeyType::Ipv4 => (v as u32).to_be_bytes().to_vec(),
        KeyType::Ipv6 => v.to_be_bytes().to_vec(),
        KeyType::Proto => vec![v as u8],
        KeyType::Port => (v as u16).to_be_bytes().to_vec(),
    }
}

// linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
/// An attribute's length is a u16: a message carries at most this many bytes of elements,
/// a larger list is split over several messages of the same batch.
const MAX_ELEMENTS_BYTES: usize = 60_000;
/// Linux's errno for a message larger than the socket's send buffer.
pub const EMSGSIZE: i32 = 90;

/// Netlink attributes, appended to a message.
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, ty: u16, payload: &[u8]) {
        self.0
            .extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
    }

    fn put_str(&mut self, ty: u16, s: &str) {
        self.put(ty, &[s.as_bytes(), &[0]].concat());
    }

    fn nest(&mut self, ty: u16, body: impl FnOnce(&mut Attrs)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        body(self);
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    fn data(&mut self, ty: u16, data: &Data) {
        self.nest(ty, |a| match data {
            Data::Value(v) => a.put(NFTA_DATA_VALUE, v),
            Data::Verdict(v) => a.nest(NFTA_DATA_VERDICT, |a| {
                let (code, chain): (i32, Option<&str>) = match v {
                    Verdict::Drop => (0, None),
                    Verdict::Accept => (1, None),
                    Verdict::Jump(c) => (-3, Some(c)),
                    Verdict::Goto(c) => (-4, Some(c)),
                    Verdict::Return => (-5, None),
                };
                a.put(NFTA_VERDICT_CODE, &code.to_be_bytes());
                if let Some(c) = chain {
                    a.put_str(NFTA_VERDICT_CHAIN, c);
                }
            }),
        });
    }
}

/// One element's `NFTA_LIST_ELEM`.
fn encode_elem(e: &Elem, op: Op) -> Vec<u8> {
    let mut a = Attrs(Vec::new());
    a.nest(NFTA_LIST_ELEM, |a| {
        a.data(NFTA_SET_ELEM_KEY, &Data::Value(e.key.clone()));
        if let Some(end) = &e.key_end {
            a.data(NFTA_SET_ELEM_KEY_END, &Data::Value(end.clone()));
        }
        if let (Some(d), Op::Add) = (&e.data, op) {
            a.data(NFTA_SET_ELEM_DATA, d);
        }
    });
    a.0
}

fn message(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, body: &[u8]) {
    out.extend_from_slice(&((20 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    out.extend_from_slice(&[family, 0]); // nfgenmsg: family, NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(body);
}

/// An encoded batch and, per acknowledged message (sequence numbers 1..), what it does.
pub struct Batch {
    pub bytes: Vec<u8>,
    pub messages: Vec<String>,
}

/// Encodes `ops` on the sets of table `inet TABLE` as one batch.
pub fn batch(table: &str, ops: &[SetElems]) -> Batch {
    let mut bytes = Vec::new();
    let mut messages = Vec::new();
    message(
        &mut bytes,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        0,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for op in ops {
        let (ty, flags, verb) = match op.op {
            Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE, "adding"),
            Op::Delete => (NFT_MSG_DELSETELEM, 0, "deleting"),
        };
        let encoded: Vec<Vec<u8>> = op.elems.iter().map(|e| encode_elem(e, op.op)).collect();
        let mut rest = &encoded[..];
        while !rest.is_empty() {
            let mut size = 0;
            let n = rest
                .iter()
                .take_while(|e| {
                    size += e.len();
                    size <= MAX_ELEMENTS_BYTES
                })
                .count()
                .max(1);
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let mut a = Attrs(Vec::new());
            a.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
            a.put_str(NFTA_SET_ELEM_LIST_SET, &op.set);
            a.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |a| {
                chunk.iter().for_each(|e| a.0.extend_from_slice(e))
            });
            messages.push(format!(
                "{verb} {} element(s) of set {} in table inet {table}",
                n, op.set
            ));
            message(
                &mut bytes,
                (NFNL_SUBSYS_NFTABLES << 8) | ty,
                NLM_F_REQUEST | NLM_F_ACK | flags,
                messages.len() as u32,
                NFPROTO_INET,
                0,
                &a.0,
            );
        }
    }
    message(
        &mut bytes,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        messages.len() as u32 + 1,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    Batch { bytes, messages }
}

/// The (sequence number, error) of every acknowledgement or error in one datagram.
fn answers(mut buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while buf.len() >= 20 {
        let u32_at = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().unwrap());
        let len = (u32_at(0) as usize).clamp(16, buf.len());
        if u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            out.push((u32_at(8), u32_at(16) as i32));
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

/// Applies `ops` to table `inet TABLE` in one transaction. An error names the message the
/// kernel rejected; the table is then unchanged.
pub fn apply(table: &str, ops: &[SetElems]) -> Result<(), NftError> {
    let batch = batch(table, ops);
    let io = NftError::Netlink;
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io)?;
    socket.bind_auto().map_err(io)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    // Errors without the rejected message echoed back: they stay small.
    socket.set_cap_ack(true).map_err(io)?;
    socket.send(&batch.bytes, 0).map_err(io)?;
    socket.set_non_blocking(true).map_err(io)?;
    let mut acked = vec![false; batch.messages.len()];
    let mut buf = Vec::with_capacity(1 << 16);
    loop {
        buf.clear();
        match socket.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(io(e)),
        }
        for (seq, err) in answers(&buf) {
            let what = seq
                .checked_sub(1)
                .and_then(|i| batch.messages.get(i as usize));
            if err != 0 {
                return Err(NftError::Kernel {
                    what: what.cloned().unwrap_or_else(|| "the transaction".into()),
                    source: std::io::Error::from_raw_os_error(-err),
                });
            }
            if let Some(a) = (seq as usize).checked_sub(1).and_then(|i| acked.get_mut(i)) {
                *a = true;
            }
        }
    }
    match acked.iter().filter(|a| !**a).count() {
        0 => Ok(()),
        n => Err(NftError::Netlink(std::io::Error::other(format!(
            "no answer from the kernel to {n} of {} messages",
            acked.len()
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_pad_the_fields_of_a_concatenation_only() {
        assert_eq!(key(&[vec![6]]), vec![6]);
        assert_eq!(
            key(&[vec![10, 0, 0, 1], vec![6], vec![0, 80]]),
            vec![10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]
        );
    }

    /// The bytes `nft --debug=mnl 'add element inet t m { 10.0.0.1 . tcp . 80 : goto c }'`
    /// (nft 1.0.6) sends, less its set id attribute, with acknowledgements asked for.
    #[test]
    fn a_verdict_map_element_is_encoded_as_nft_does() {
        let ops = [SetElems {
            set: "m".into(),
            op: Op::Add,
            elems: vec![Elem {
                key: key(&[vec![10, 0, 0, 1], vec![6], vec![0, 80]]),
                key_end: None,
                data: Some(Data::Verdict(Verdict::Goto("c".into()))),
            }],
        }];
        let b = batch("t", &ops);
        let ne16 = |v: u16| v.to_ne_bytes().to_vec();
        let ne32 = |v: u32| v.to_ne_bytes().to_vec();
        let attr = |len: u16, ty: u16| [ne16(len), ne16(ty)].concat();
        let nested = |len: u16, ty: u16| attr(len, ty | NLA_F_NESTED);
        let header = |len: u32, ty: u16, flags: u16, seq: u32, nfgen: [u8; 4]| {
            [
                ne32(len),
                ne16(ty),
                ne16(flags),
                ne32(seq),
                ne32(0),
                nfgen.to_vec(),
            ]
            .concat()
        };
        let expected = [
            header(20, 0x10, 1, 0, [0, 0, 0, 10]),
            header(88, 0x0a0c, 1 | 4 | 0x400, 1, [1, 0, 0, 0]),
            attr(6, 1),
            b"t\0\0\0".to_vec(),
            attr(6, 2),
            b"m\0\0\0".to_vec(),
            nested(52, 3),
            nested(48, 1),
            nested(20, 1),
            attr(16, 1),
            vec![10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0],
            nested(24, 2),
            nested(20, 2),
            attr(8, 1),
            vec![0xff, 0xff, 0xff, 0xfc],
            attr(6, 2),
            b"c\0\0\0".to_vec(),
            header(20, 0x11, 1, 2, [0, 0, 0, 10]),
        ]
        .concat();
        assert_eq!(b.bytes, expected);
        assert_eq!(
            b.messages,
            vec!["adding 1 element(s) of set m in table inet t"]
        );
    }

    #[test]
    fn deletes_name_keys_and_ranges_only() {
        let e = Elem {
            key: vec![10, 0, 0, 0, 0, 80, 0, 0],
            key_end: Some(vec![10, 0, 0, 255, 0, 90, 0, 0]),
            data: Some(Data::Value(vec![1, 0, 0, 0])),
        };
        let del = encode_elem(&e, Op::Delete);
        assert_eq!(del.len(), 4 + 2 * (4 + 4 + 8));
        assert!(encode_elem(&e, Op::Add).len() > del.len());
    }

    #[test]
    fn large_lists_are_split_over_messages_of_one_batch() {
        let elems: Vec<Elem> = (0..10_000u32)
            .map(|i| Elem {
                key: i.to_be_bytes().to_vec(),
                key_end: None,
                data: None,
            })
            .collect();
        let b = batch(
            "t",
            &[SetElems {
                set: "s".into(),
                op: Op::Add,
                elems,
            }],
        );
        // 16 bytes per element: 3,750 in each message.
        assert_eq!(b.messages.len(), 3);
        assert!(b.messages[0].starts_with("adding 3750 element(s)"));
    }

    #[test]
    fn answers_are_read_from_a_datagram() {
        let mut d = Vec::new();
        for (seq, err) in [(1u32, 0i32), (2, -2)] {
            d.extend_from_slice(&36u32.to_ne_bytes());
            d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            d.extend_from_slice(&0u16.to_ne_bytes());
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&0u32.to_ne_bytes());
            d.extend_from_slice(&err.to_ne_bytes());
            d.extend_from_slice(&[0; 16]); // the request's header
        }
        assert_eq!(answers(&d), vec![(1, 0), (2, -2)]);
    }
}
