//! The nftables dataplane: one node's pods' groups compiled into one `inet` table that the
//! agent owns and replaces atomically. Pure except for `apply`, which runs the `nft` program,
//! and `netlink`, which sends tables and element updates to the kernel.
//!
//! # Path of a packet (`compile`, layout `Maps`)
//!
//! ```text
//! hook forward ── ct state established,related accept          (flows are stateful)
//!   ├─ ip saddr vmap @pods-out.v4 ─ jump pods-out/N            (source pod's outbound stages)
//!   └─ ip daddr vmap @pods-in.v4  ─ jump pods-in/N             (destination pod's inbound)
//! pods-in/N:   ct state invalid drop; jump in/NS/SUBNET-NSG; jump in/NS/NIC-NSG
//! in/NS/NSG:   ip saddr vmap @in/NS/NSG/pods.v4               (pod peers with a class of their own)
//!              ip saddr vmap @in/NS/NSG.v4    ─ goto in/NS/NSG/cK  (prefixes and tags → class)
//! in/NS/NSG/cK: meta l4proto tcp th sport & 0 | ID . th dport [. th sport]
//!                   vmap @in/NS/NSG/ports[-sport]/M           (TCP, then UDP likewise:
//!               meta l4proto icmp goto …; …                    the stage's port maps)
//!               goto …          (other protocols; a class of specific rules ends with `goto`
//!                                its broad rules' class instead)
//! in/NS/NSG/PRIO: counter return|drop comment "NS/NSG RULE (inbound PRIO): allow|deny"
//! ```
//!
//! - Pods without any group are in no dispatch map: their traffic is not touched. A stage
//!   that allows returns, so the next stage runs; inbound runs subnet then NIC, outbound NIC
//!   then subnet; a deny drops. The forward hook runs the source pod's outbound stages, then
//!   the destination pod's inbound ones.
//! - First match is kept exactly by compiling, per stage, the priority-ordered rules into
//!   disjoint intervals: the peer address space is cut where any rule's address set starts or
//!   ends; each piece's rules (up to the first that matches everything) form a class, and
//!   each class's (protocol, destination port, source port) space is cut the same way, with
//!   the first matching rule as the verdict. So a packet costs at most four lookups per stage
//!   (pod map, prefix map, exception and shared port maps) whatever the rule count. Source
//!   ports are a key part only in classes where a rule restricts them.
//!   Pod peers get exact hash entries where their ASG memberships give them a class of their
//!   own, so pod churn touches hash maps, never the interval maps; a class's specific rules
//!   (CIDRs, ASGs) are an exception map in front of the shared class of its broad rules (tags,
//!   any), so a broad rule's ports are written once per context, not once per class.
//! - The classes of a stage share a few named port maps, keyed on an id of the class and
//!   protocol first: `th sport & 0 | ID` is the constant ID (the port is read and masked
//!   off), the only way nft 1.0.6 takes a constant into a concatenated key. One small
//!   interval map per class instead made the kernel create thousands of concatenated
//!   interval (pipapo) sets, a millisecond or more each; a map is closed at 128 elements
//!   because inserting into one, and looking a packet up in it, grow with its size. A 16-bit
//!   id behind a protocol match keeps each lookup to the fields it had with inline maps (a
//!   32-bit `meta mark & 0x0 | ID` in front of the protocol cost a third of the forwarding
//!   rate).
//! - ICMP has no ports (`th dport` would read its checksum): port maps are reached by TCP
//!   and UDP only; ICMP is decided by the first
//!   rule of protocol Icmp or Any without port restrictions, other protocols by the first of
//!   protocol Any without port restrictions.
//! - A rule whose local side is an ASG or a prefix applies only to the pods it holds: pods
//!   whose local address holds different rules of a group get different stage chains
//!   (`in/NS/NSG/lK`), chosen by the dispatch map.
//! - Per-rule counters live in one chain per NSG rule, the verdict of the map elements; the
//!   counters count the new flows each rule decided (`nft list table`, or `read_counters`).
//! - Named sets `asg/NS/NAME.v4|v6` and `tag/NAME.v4|v6` (`tag/VirtualNetwork` holds the
//!   cluster ranges, pod and node IPs) are kept for every ASG and tag the node's groups use.
//!   An interval map's key cannot refer to a set, so the maps carry the same addresses
//!   flattened; the sets show memberships in `nft list`, and the `Linear` layout matches on
//!   them. Pod churn and membership changes change only elements (`render_update`) as long
//!   as no chain appears or disappears; the agent sends those over netlink (`netlink`), and
//!   for pod churn it updates the last table rather than compiling it again (`update_pods`).
//!
//! # Hooks
//!
//! Forward (pod to pod, pod to and from outside, routed as with the ptp CNI) always; input
//! (pod to node: the pod's outbound stages) and output (node to pod: inbound stages) with
//! `HostTraffic::Enforce`, the default, because the node's addresses are the
//! `AzureLoadBalancer` tag that kubelet probes come from and Azure filters those flows too.
//! Neighbour discovery between a pod and its host is exempt. A node address is never taken
//! as a pod's (host-network pods). Established flows pass before any rule, so replacing the
//! table never cuts an established connection (as in Azure).

mod apply;
mod compile;
pub mod netlink;
mod render;
mod ruleset;

pub use apply::{
    Applied, FakeNft, Nft, NftCommand, NftError, RuleCounter, TableState, read_counters,
    rule_counters, sync,
};
pub use compile::{
    CompileOptions, HostTraffic, Layout, PodIndex, TABLE, compile, compile_indexed, compile_with,
    update_pods,
};
pub use render::{
    ElementUpdate, SetChange, Update, render, render_delete, render_replace, render_update,
    rule_text,
};
pub use ruleset::*;
