//! The compiled table, run by an interpreter of its own structure, decides every new flow as
//! the reference evaluator does, and names the same deciding rules.

mod common;
mod nft_support;

use std::net::IpAddr;
use std::sync::Arc;

use kube_nsg::eval::{Packet, evaluate};
use kube_nsg::model::{Access, Direction, Inventory, ObjectRef};
use kube_nsg::nft::{self, CompileOptions, CtState, Hook, HostTraffic, Layout, Ruleset, Update};
use kube_nsg::resolve::Resolved;
use nft_support::vm::{Outcome, Pkt, Vm};
use proptest::prelude::*;

const NODE: &str = "node-1";

/// Moves the pods flagged to another node, so the compiled node has only some of them.
fn spread(mut inv: Inventory, elsewhere: &[bool]) -> Inventory {
    for (pod, away) in inv.pods.iter_mut().zip(elsewhere) {
        if *away {
            pod.node_name = Some("node-2".into());
        }
    }
    inv
}

/// What the evaluator says for the ends of `packet` on this node: `(allowed, deciding rules)`
/// for the source's outbound stages (`out`) and then the destination's inbound (`inb`).
fn expected(
    res: &Resolved,
    packet: &Packet,
    out: bool,
    inb: bool,
) -> (Access, Vec<(ObjectRef, String)>) {
    let local = |ip: IpAddr| {
        res.pod_by_ip(ip).filter(|&p| {
            res.inv.pods[p].node_name.as_deref() == Some(NODE) && !res.node_ips.contains(ip)
        })
    };
    let mut rules = Vec::new();
    let ends = [
        (out, packet.src, Direction::Outbound),
        (inb, packet.dst, Direction::Inbound),
    ];
    for (wanted, ip, d) in ends {
        let Some(p) = local(ip).filter(|_| wanted) else {
            continue;
        };
        let v = evaluate(res, p, d, packet);
        rules.extend(v.stages.iter().map(|s| (s.nsg.clone(), s.rule.clone())));
        if v.access == Access::Deny {
            return (Access::Deny, rules);
        }
    }
    (Access::Allow, rules)
}

fn check(
    rs: &Ruleset,
    res: &Resolved,
    packet: &Packet,
    hooks: &[(Hook, bool, bool)],
) -> Result<(), TestCaseError> {
    let vm = Vm::new(rs).map_err(TestCaseError::fail)?;
    for &(hook, out, inb) in hooks {
        let trace = vm
            .run(hook, &Pkt::new_flow(packet))
            .map_err(TestCaseError::fail)?;
        let (access, rules) = expected(res, packet, out, inb);
        let got = if trace.outcome == Outcome::Accept {
            Access::Allow
        } else {
            Access::Deny
        };
        prop_assert_eq!(got, access, "{:?} at {:?}", packet, hook);
        let named: Vec<(ObjectRef, String)> = trace
            .counted
            .iter()
            .map(|c| {
                (
                    rs.rule_chains[c].nsg.clone(),
                    rs.rule_chains[c].rule.clone(),
                )
            })
            .collect();
        prop_assert_eq!(named, rules, "{:?} at {:?}", packet, hook);
        // Packets of an established flow pass whatever the rules say.
        let mut est = Pkt::new_flow(packet);
        est.ct = CtState::Established;
        prop_assert_eq!(
            vm.run(hook, &est).map_err(TestCaseError::fail)?.outcome,
            Outcome::Accept
        );
    }
    Ok(())
}

const ALL_HOOKS: [(Hook, bool, bool); 3] = [
    (Hook::Forward, true, true),
    (Hook::Input, true, false),
    (Hook::Output, false, true),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The map layout: forward runs both ends, input the pod's outbound, output its inbound.
    #[test]
    fn map_layout_agrees_with_the_evaluator(
        (inv, packet) in common::busy_case(), away in prop::collection::vec(any::<bool>(), 8)
    ) {
        let inv = spread(inv, &away);
        let res = Resolved::new(&inv);
        let rs = nft::compile(&res, Some(NODE));
        check(&rs, &res, &packet, &ALL_HOOKS)?;
    }

    #[test]
    fn linear_layout_agrees_with_the_evaluator(
        (inv, packet) in common::busy_case(), away in prop::collection::vec(any::<bool>(), 8)
    ) {
        let inv = spread(inv, &away);
        let res = Resolved::new(&inv);
        let opts = CompileOptions { layout: Layout::Linear, ..Default::default() };
        let rs = nft::compile_with(&res, Some(NODE), &opts);
        check(&rs, &res, &packet, &ALL_HOOKS)?;
    }

    /// The sparser generator of the evaluator's tests: mostly default rules and foreign ends.
    #[test]
    fn map_layout_agrees_on_sparse_clusters(inv in common::inventory(), packet in common::packet()) {
        let res = Resolved::new(&inv);
        check(&nft::compile(&res, None), &res, &packet, &ALL_HOOKS)?;
    }

    /// Without host enforcement the node's own traffic is never filtered.
    #[test]
    fn exempt_host_traffic_has_only_the_forward_hook((inv, packet) in common::busy_case()) {
        let res = Resolved::new(&inv);
        let opts = CompileOptions { host_traffic: HostTraffic::Exempt, ..Default::default() };
        let rs = nft::compile_with(&res, Some(NODE), &opts);
        check(&rs, &res, &packet, &[(Hook::Forward, true, true), (Hook::Input, false, false), (Hook::Output, false, false)])?;
    }

    /// Compiling is deterministic, and so is rendering.
    #[test]
    fn compiling_twice_gives_the_same_text(inv in common::busy_inventory()) {
        let res = Resolved::new(&inv);
        let a = nft::render(&nft::compile(&res, None));
        let b = nft::render(&nft::compile(&Resolved::new(&inv.clone()), None));
        prop_assert_eq!(a, b);
    }

    /// A pod changing its memberships, labels, address or node, or going away, on the
    /// compiled node or another: what `update_pods` makes of it (elements only) decides like
    /// the evaluator; when it declines, so does a full compile.
    #[test]
    fn pod_updates_agree_with_the_evaluator(
        (inv, packet) in common::busy_case(),
        away in prop::collection::vec(any::<bool>(), 8),
        which in 0usize..8,
        change in 0u8..6,
        value in prop::sample::select(vec!["web", "db", "web,logic", "api"]),
    ) {
        let inv = spread(inv, &away);
        let opts = CompileOptions::default();
        let (table, mut index) = nft::compile_indexed(&Arc::new(inv.clone()), Some(NODE), &opts);
        let mut changed = inv.clone();
        let i = which % changed.pods.len();
        let pod = &mut changed.pods[i];
        match change {
            0 => { pod.annotations.insert(kube_nsg::model::ASG_ANNOTATION.into(), value.into()); }
            1 => { pod.annotations.clear(); }
            2 => { pod.labels.insert("app".into(), value.into()); }
            3 => { pod.ips = vec![if which % 2 == 0 { packet.src } else { packet.dst }]; }
            4 => {
                let elsewhere = pod.node_name.as_deref() == Some(NODE);
                pod.node_name = Some(if elsewhere { "node-2" } else { NODE }.into());
            }
            _ => { changed.pods.remove(i); }
        }
        let res = Resolved::new(&changed);
        match nft::update_pods(&table, &mut index, &Arc::new(changed.clone()), &opts) {
            Some(updated) => {
                prop_assert!(table.same_structure(&updated));
                check(&updated, &res, &packet, &ALL_HOOKS)?;
            }
            None => check(&nft::compile(&res, Some(NODE)), &res, &packet, &ALL_HOOKS)?,
        }
    }

    /// An element update, applied to the old table's elements, gives exactly the new table;
    /// and pod churn that keeps the same chains is an element update.
    #[test]
    fn element_updates_reach_the_new_table(
        inv in common::busy_inventory(), which in 0usize..8, annotation in prop::option::of(prop::sample::select(vec!["web", "db", "web,logic"]))
    ) {
        let res = Resolved::new(&inv);
        let old = nft::compile(&res, None);
        let mut changed = inv.clone();
        let i = which % changed.pods.len();
        match annotation {
            Some(a) => { changed.pods[i].annotations.insert(kube_nsg::model::ASG_ANNOTATION.into(), a.into()); }
            None => { changed.pods.remove(i); }
        }
        let new = nft::compile(&Resolved::new(&changed), None);
        match nft::render_update(Some(&old), &new) {
            Update::Unchanged => prop_assert_eq!(&old, &new),
            Update::Replace => prop_assert!(!old.same_structure(&new)),
            Update::Elements(update) => {
                prop_assert!(old.same_structure(&new));
                prop_assert_eq!(apply_elements(&old, &update.script()), new);
            }
        }
    }
}

/// Applies an element script to a ruleset the way nft would, by matching rendered elements.
fn apply_elements(old: &Ruleset, script: &str) -> Ruleset {
    let mut rs = old.clone();
    for line in script.lines() {
        if let Some(rest) = line
            .strip_prefix("flush set inet ")
            .or_else(|| line.strip_prefix("flush map inet "))
        {
            let name = rest.strip_prefix(&format!("{} ", rs.table)).unwrap();
            let set = rs.sets.iter_mut().find(|s| s.name == name).unwrap();
            set.elements.clear();
            continue;
        }
        let (op, rest) = line.split_once(" element inet ").unwrap();
        let rest = rest.strip_prefix(&format!("{} ", rs.table)).unwrap();
        let (name, items) = rest.split_once(" { ").unwrap();
        let items: Vec<&str> = items.strip_suffix(" }").unwrap().split(", ").collect();
        let set = rs.sets.iter_mut().find(|s| s.name == name).unwrap();
        match op {
            "delete" => set.elements.retain(|e| {
                let key_only = nft::Element {
                    key: e.key.clone(),
                    verdict: None,
                };
                !items.contains(&element_text(&key_only, set_key(&old.sets, name)).as_str())
            }),
            "add" => {
                let all = candidates(&items, set_key(&old.sets, name));
                set.elements.extend(all);
                set.elements.sort();
            }
            _ => panic!("unexpected line {line}"),
        }
    }
    rs
}

fn set_key<'s>(sets: &'s [nft::Set], name: &str) -> &'s [nft::KeyType] {
    &sets.iter().find(|s| s.name == name).unwrap().key
}

/// Renders one element alone through the public renderer (a one-element set).
fn element_text(e: &nft::Element, key: &[nft::KeyType]) -> String {
    let set = nft::Set {
        name: "x".into(),
        key: key.to_vec(),
        is_map: e.verdict.is_some(),
        interval: true,
        comment: None,
        elements: vec![e.clone()],
    };
    let rs = Ruleset {
        table: "t".into(),
        sets: vec![set],
        chains: vec![],
        rule_chains: Default::default(),
    };
    let text = nft::render(&rs);
    let line = text.lines().find(|l| l.starts_with("\t\t\t")).unwrap();
    line.trim().to_string()
}

/// Parses added elements back by rendering every element of the new table's candidates.
fn candidates(items: &[&str], key: &[nft::KeyType]) -> Vec<nft::Element> {
    items.iter().map(|t| parse_element(t, key)).collect()
}

fn parse_element(text: &str, key: &[nft::KeyType]) -> nft::Element {
    let (k, verdict) = match text.split_once(" : ") {
        Some((k, v)) => (k, Some(parse_verdict(v))),
        None => (text, None),
    };
    let parts: Vec<&str> = k.split(" . ").collect();
    let key_spans = parts
        .iter()
        .zip(key)
        .map(|(p, t)| parse_span(p, *t))
        .collect();
    let e = nft::Element {
        key: key_spans,
        verdict,
    };
    assert_eq!(element_text(&e, key), text, "round trip of {text}");
    e
}

fn parse_verdict(v: &str) -> nft::Verdict {
    match v.split_once(' ') {
        Some(("jump", c)) => nft::Verdict::Jump(c.into()),
        Some(("goto", c)) => nft::Verdict::Goto(c.into()),
        _ => panic!("verdict {v}"),
    }
}

fn parse_span(p: &str, t: nft::KeyType) -> (u128, u128) {
    let addr = |s: &str| -> u128 {
        match s.parse::<IpAddr>().unwrap() {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        }
    };
    match t {
        nft::KeyType::Ipv4 | nft::KeyType::Ipv6 => {
            if let Ok(net) = p.parse::<ipnet::IpNet>() {
                let s = kube_nsg::model::IpSet::from_net(net);
                let r = if t == nft::KeyType::Ipv4 {
                    s.v4.ranges()[0]
                } else {
                    s.v6.ranges()[0]
                };
                return r;
            }
            // `a-b` (IPv6 addresses hold no '-').
            match p.split_once('-') {
                Some((a, b)) => (addr(a), addr(b)),
                None => (addr(p), addr(p)),
            }
        }
        _ => {
            let num = |s: &str| -> u128 { s.parse().unwrap() };
            match p.split_once('-') {
                Some((a, b)) => (num(a), num(b)),
                None => (num(p), num(p)),
            }
        }
    }
}
