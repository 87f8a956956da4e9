//! Changes sent straight to the kernel over netlink (nfnetlink, nf_tables), without the `nft`
//! program: element updates, and whole tables (`table`); and what the agent reads back of its
//! table (`read`). Why: for any `add element`, nft 1.0.6 first fetches every element of every
//! interval set in the ruleset into its cache, so one membership change next to a large table
//! took ~100 ms in userspace, and loading a large table spent longer in nft's parser than in
//! the kernel; the kernel itself needs well under a millisecond for the one, and most of the
//! load for the other.
//!
//! One change is one batch (`NFNL_MSG_BATCH_BEGIN`, the nf_tables messages,
//! `NFNL_MSG_BATCH_END`): one transaction, all or nothing. The kernel handles the batch within
//! `send` and answers every message that fails, naming it by sequence number; the last
//! message asks for an acknowledgement, so success is an answer too.
//!
//! Element updates are generic over the sets of one `inet` table: keys of any fixed-size
//! fields (concatenations included), ranges of concatenated interval (pipapo) sets, and
//! verdict or value data. Single-field interval (rbtree) sets keep ranges as start and end
//! elements: an update flushes such a set and writes it whole, as a table load does.

mod read;
mod table;

pub use read::read;

use std::io::ErrorKind;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::apply::NftError;
use super::render::{ElementUpdate, SetChange};
use super::ruleset::{Element, KeyType, Ruleset, Span, Verdict};

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
    /// In a single-field interval (rbtree) set: the first key after an interval, which the
    /// kernel keeps as an element of its own.
    pub interval_end: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
    /// Every element of the set (`elems` is empty).
    Flush,
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

/// The update as netlink operations, flushes and deletes first (as in its script); `None`
/// when it holds a range in a hash set (which `nft` then reports).
pub fn ops(update: &ElementUpdate) -> Option<Vec<SetElems>> {
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    for change in &update.sets {
        if change.flush {
            deletes.push(SetElems {
                set: change.name.clone(),
                op: Op::Flush,
                elems: vec![],
            });
        }
        for (op, elements, out) in [
            (Op::Delete, &change.delete, &mut deletes),
            (Op::Add, &change.add, &mut adds),
        ] {
            if elements.is_empty() {
                continue;
            }
            let elems = if change.flush {
                table::elems(elements, &change.key, true)
            } else {
                elements
                    .iter()
                    .map(|e| elem(change, e))
                    .collect::<Option<_>>()?
            };
            out.push(SetElems {
                set: change.name.clone(),
                op,
                elems,
            });
        }
    }
    deletes.extend(adds);
    Some(deletes)
}

fn elem(change: &SetChange, e: &Element) -> Option<Elem> {
    let points = e.key.iter().all(|&(a, b): &Span| a == b);
    if !change.interval && !points {
        return None; // a range in a hash set: let nft say what is wrong
    }
    Some(whole_elem(e, &change.key, change.interval))
}

/// An element of a hash set (`interval` false) or of a concatenated interval (pipapo) set,
/// which keeps each range whole: its start as the key, its end as the key end.
fn whole_elem(e: &Element, types: &[KeyType], interval: bool) -> Elem {
    let fields = |end: bool| -> Vec<Vec<u8>> {
        e.key
            .iter()
            .zip(types)
            .map(|(&(a, b), &t)| field(if end { b } else { a }, t))
            .collect()
    };
    Elem {
        key: key(&fields(false)),
        key_end: interval.then(|| key(&fields(true))),
        data: e.verdict.clone().map(Data::Verdict),
        interval_end: false,
    }
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
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
// Shared with `table` and `read`.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
/// An attribute's length is a u16: a message carries at most this many bytes of elements,
/// a larger list is split over several messages of the same batch.
const MAX_ELEMENTS_BYTES: usize = 60_000;
/// Linux's default socket send buffer (`net.core.wmem_default`), bytes.
const DEFAULT_SEND_BUFFER: usize = 212_992;
/// Linux's errno for a message larger than the socket's send buffer.
pub const EMSGSIZE: i32 = 90;

/// Netlink attributes, appended to a message.
#[derive(Clone)]
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

    fn put_u32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    fn put_nested(&mut self, ty: u16, encoded: &[u8]) {
        self.nest(ty, |a| a.0.extend_from_slice(encoded));
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
        if e.interval_end {
            a.put_u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
        }
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

/// An encoded batch (one transaction) and, per message (sequence numbers 1..), what it does.
pub struct Batch {
    pub bytes: Vec<u8>,
    pub messages: Vec<String>,
    /// Where the last message starts: `end` asks for its acknowledgement.
    last: usize,
}

impl Batch {
    fn begin() -> Batch {
        let mut bytes = Vec::new();
        message(
            &mut bytes,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        Batch {
            bytes,
            messages: Vec::new(),
            last: 0,
        }
    }

    /// Appends one nf_tables message of type `ty`; `what` names it in errors.
    fn push(&mut self, ty: u16, flags: u16, body: &[u8], what: String) {
        self.messages.push(what);
        self.last = self.bytes.len();
        let seq = self.messages.len() as u32;
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | ty;
        message(
            &mut self.bytes,
            ty,
            NLM_F_REQUEST | flags,
            seq,
            NFPROTO_INET,
            0,
            body,
        );
    }

    /// Only the last message is acknowledged: the kernel answers every message that fails
    /// anyway, and an acknowledgement per message of a whole table would overflow the
    /// socket's receive buffer.
    fn end(mut self) -> Batch {
        if !self.messages.is_empty() {
            let flags = self.last + 6..self.last + 8;
            let acked =
                u16::from_ne_bytes(self.bytes[flags.clone()].try_into().unwrap()) | NLM_F_ACK;
            self.bytes[flags].copy_from_slice(&acked.to_ne_bytes());
        }
        let seq = self.messages.len() as u32 + 1;
        message(
            &mut self.bytes,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self
    }
}

/// Encodes `ops` on the sets of table `inet TABLE` as one batch.
pub fn batch(table: &str, ops: &[SetElems]) -> Batch {
    let mut b = Batch::begin();
    for op in ops {
        set_elements(&mut b, table, &op.set, None, op.op, &op.elems);
    }
    b.end()
}

/// Appends the messages that add or delete `elems` in one set: a large list is split over
/// several messages (an attribute's length is a u16). A set created in the same batch is
/// also named by its `id`.
fn set_elements(b: &mut Batch, table: &str, set: &str, id: Option<u32>, op: Op, elems: &[Elem]) {
    let header = || {
        let mut a = Attrs(Vec::new());
        a.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
        a.put_str(NFTA_SET_ELEM_LIST_SET, set);
        if let Some(id) = id {
            a.put(NFTA_SET_ELEM_LIST_SET_ID, &id.to_be_bytes());
        }
        a
    };
    let (ty, flags, verb) = match op {
        Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE, "adding"),
        Op::Delete => (NFT_MSG_DELSETELEM, 0, "deleting"),
        Op::Flush => {
            // A delete without an element list empties the set.
            let what = format!("flushing set {set} in table inet {table}");
            b.push(NFT_MSG_DELSETELEM, 0, &header().0, what);
            return;
        }
    };
    let mut list = Attrs(Vec::new());
    let mut n = 0;
    let mut push_list = |list: &mut Attrs, n: &mut usize| {
        let mut a = header();
        a.put_nested(NFTA_SET_ELEM_LIST_ELEMENTS, &list.0);
        let what = format!("{verb} {n} element(s) of set {set} in table inet {table}");
        b.push(ty, flags, &a.0, what);
        list.0.clear();
        *n = 0;
    };
    for e in elems {
        let encoded = encode_elem(e, op);
        if n > 0 && list.0.len() + encoded.len() > MAX_ELEMENTS_BYTES {
            push_list(&mut list, &mut n);
        }
        list.0.extend_from_slice(&encoded);
        n += 1;
    }
    if n > 0 {
        push_list(&mut list, &mut n);
    }
}

/// One message of a datagram from the kernel: header fields and the whole message.
struct Received<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    bytes: &'a [u8],
}

impl Received<'_> {
    /// An `NLMSG_ERROR` message's error: a negative errno, or 0 for an acknowledgement.
    fn error(&self) -> i32 {
        self.bytes
            .get(16..20)
            .map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap()))
    }
}

/// The messages of one datagram.
fn received(mut datagram: &[u8]) -> impl Iterator<Item = Received<'_>> {
    std::iter::from_fn(move || {
        if datagram.len() < 16 {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes(datagram[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_ne_bytes([datagram[i], datagram[i + 1]]);
        let len = (u32_at(0) as usize).clamp(16, datagram.len());
        let msg = Received {
            ty: u16_at(4),
            flags: u16_at(6),
            seq: u32_at(8),
            bytes: &datagram[..len],
        };
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
        Some(msg)
    })
}

/// The (sequence number, error) of every acknowledgement or error in one datagram.
fn answers(buf: &[u8]) -> Vec<(u32, i32)> {
    received(buf)
        .filter(|m| m.ty == NLMSG_ERROR)
        .map(|m| (m.seq, m.error()))
        .collect()
}

/// Applies `ops` to table `inet TABLE` in one transaction. An error names the message the
/// kernel rejected; the table is then unchanged.
pub fn apply(table: &str, ops: &[SetElems]) -> Result<(), NftError> {
    send(&batch(table, ops))
}

/// Makes table `inet TABLE` exactly `rs` in one transaction, as `nft -f` of its
/// `render_replace` script does.
pub fn replace(rs: &Ruleset) -> Result<(), NftError> {
    send(&table::replace(rs))
}

/// Removes table `inet TABLE` in one transaction, if it is there.
pub fn delete_table(table: &str) -> Result<(), NftError> {
    send(&table::delete(table))
}

/// A netfilter netlink socket talking to the kernel.
fn socket() -> Result<Socket, NftError> {
    let io = NftError::Netlink;
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io)?;
    socket.bind_auto().map_err(io)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    // Errors without the rejected message echoed back: they stay small.
    socket.set_cap_ack(true).map_err(io)?;
    Ok(socket)
}

/// Sends one batch and waits for its outcome. The kernel handles a batch within `send`, so
/// every answer is queued when it returns.
pub fn send(batch: &Batch) -> Result<(), NftError> {
    let io = NftError::Netlink;
    let socket = socket()?;
    if batch.bytes.len() > DEFAULT_SEND_BUFFER {
        // A batch is one datagram. Raising the buffer past the system's limit needs
        // CAP_NET_ADMIN, which nftables needs anyway; without it `send` says EMSGSIZE.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, batch.bytes.len());
    }
    socket.send(&batch.bytes, 0).map_err(io)?;
    socket.set_non_blocking(true).map_err(io)?;
    let mut acked = false;
    let mut buf = Vec::with_capacity(1 << 16);
    loop {
        buf.clear();
        match socket.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(io(e)),
        }
        for (seq, err) in answers(&buf) {
            if err != 0 {
                let what = seq
                    .checked_sub(1)
                    .and_then(|i| batch.messages.get(i as usize));
                return Err(NftError::Kernel {
                    what: what.cloned().unwrap_or_else(|| "the transaction".into()),
                    source: std::io::Error::from_raw_os_error(-err),
                });
            }
            acked |= seq as usize == batch.messages.len();
        }
    }
    if acked || batch.messages.is_empty() {
        Ok(())
    } else {
        Err(NftError::Netlink(std::io::Error::other(format!(
            "no answer from the kernel to a batch of {} messages",
            batch.messages.len()
        ))))
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
                interval_end: false,
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
            interval_end: false,
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
                interval_end: false,
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
