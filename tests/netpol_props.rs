//! The NetworkPolicy compiler against the reference evaluator, through an independent
//! NetworkPolicy evaluator (`np_eval`): for random clusters and flows,
//!
//! - wherever every rule deciding a flow is reported `Exact`, the policies give the NSG's
//!   verdict (in both modes, whether or not the plugin lets ipBlocks match pod addresses or node
//!   traffic through, with ICMP matched by rules without ports);
//! - `Strict` policies never allow a flow the NSG denies, whatever the plugin does with
//!   ipBlocks over pod addresses and with ICMP (node traffic aside: NetworkPolicy cannot block it);
//! - `Permissive` policies never deny a flow the NSG allows (with ICMP matched by rules without
//!   ports, the only way NetworkPolicy can allow ICMP);
//! - policies cut into parts (`netpol::split`, as the compiler cuts those too large to store)
//!   give the same verdicts as uncut.

mod common;
mod np_eval;

use std::collections::BTreeMap;

use ipnet::IpNet;
use proptest::prelude::*;
use serde_json::Value;

use kube_nsg::eval::{Packet, evaluate_flow};
use kube_nsg::model::*;
use kube_nsg::netpol::{self, Compiled, Mode, pod_labels};
use kube_nsg::resolve::Resolved;

use np_eval::{Behaviour, Cluster, NpPod};

fn cluster(inv: &Inventory, res: &Resolved) -> Cluster {
    Cluster {
        namespaces: inv
            .namespaces
            .iter()
            .map(|n| (n.name.clone(), n.labels.clone()))
            .collect(),
        pods: inv
            .pods
            .iter()
            .enumerate()
            .map(|(p, pod)| {
                // The controller owns these keys: it strips what it did not grant.
                let mut labels: BTreeMap<String, String> = pod
                    .labels
                    .iter()
                    .filter(|(k, _)| {
                        !k.starts_with(ASG_LABEL_PREFIX) && k.as_str() != NIC_NSG_LABEL
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                labels.extend(pod_labels(res, p));
                NpPod {
                    namespace: pod.id.namespace.clone(),
                    labels,
                    ips: pod.ips.clone(),
                }
            })
            .collect(),
        node_ips: inv.node_ips.clone(),
    }
}

fn json(c: &Compiled) -> Vec<Value> {
    c.policies
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect()
}

/// Whether every rule that decided the flow (each evaluated stage of both ends) is `Exact`.
fn decided_exactly(c: &Compiled, res: &Resolved, packet: &Packet) -> bool {
    let v = evaluate_flow(res, packet);
    let verdicts = [
        (Direction::Outbound, &v.outbound),
        (Direction::Inbound, &v.inbound),
    ];
    verdicts.iter().all(|(d, verdict)| {
        verdict.iter().flat_map(|v| &v.stages).all(|s| {
            let report = c.rule(&s.nsg, *d, &s.rule).expect("every rule is reported");
            report.fidelity.is_exact()
        })
    })
}

fn touches_node(inv: &Inventory, p: &Packet) -> bool {
    inv.node_ips.contains(&p.src) || inv.node_ips.contains(&p.dst)
}

/// The size of the parts policies are cut into, to check that the parts allow what the policy
/// allows: a few rules, peers or ports each.
const PART_BYTES: usize = 600;

/// Everything the properties claim, for one cluster and some flows.
fn check(inv: &Inventory, packets: &[Packet]) -> Result<(), TestCaseError> {
    let res = Resolved::new(inv);
    let strict = netpol::compile(&res, Mode::Strict);
    let permissive = netpol::compile(&res, Mode::Permissive);
    prop_assert_eq!(
        &strict.report,
        &permissive.report,
        "fidelity does not depend on the mode"
    );
    let (sj, pj) = (json(&strict), json(&permissive));
    let parts: Vec<Value> = strict
        .policies
        .iter()
        .flat_map(|p| netpol::split(p.clone(), PART_BYTES))
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    for p in sj.iter().chain(&pj).chain(&parts) {
        assert_valid(p);
    }
    let cl = cluster(inv, &res);
    for packet in packets {
        let nsg = evaluate_flow(&res, packet).access == Access::Allow;
        let exact = decided_exactly(&strict, &res, packet);
        for b in Behaviour::all() {
            let s = np_eval::allows(&sj, &cl, packet, b);
            let p = np_eval::allows(&pj, &cl, packet, b);
            prop_assert_eq!(
                np_eval::allows(&parts, &cl, packet, b),
                s,
                "the parts allow what the policy allows: {:?} {:?}",
                b,
                packet
            );
            if exact && b.portless_matches_icmp {
                prop_assert_eq!(s, nsg, "strict, exact rules, {:?} {:?}", b, packet);
                prop_assert_eq!(p, nsg, "permissive, exact rules, {:?} {:?}", b, packet);
            }
            if !(b.node_traffic_allowed && touches_node(inv, packet)) {
                prop_assert!(
                    !s || nsg,
                    "strict allows what the NSG denies: {:?} {:?}",
                    b,
                    packet
                );
            }
            if b.portless_matches_icmp {
                prop_assert!(
                    p || !nsg,
                    "permissive denies what the NSG allows: {:?} {:?}",
                    b,
                    packet
                );
            }
        }
    }
    Ok(())
}

/// What the API server would accept, and selection only through managed labels.
fn assert_valid(policy: &Value) {
    let meta = &policy["metadata"];
    let name = meta["name"].as_str().unwrap();
    assert!(
        name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
        "{name}"
    );
    for v in meta["labels"].as_object().unwrap().values() {
        assert!(v.as_str().unwrap().len() <= 63);
    }
    assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "kube-nsg");
    assert!(meta["labels"]["kubensg.io/nsg"].is_string());
    let managed = |sel: &Value| {
        let keys: Vec<String> = sel
            .get("matchLabels")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(
                sel.get("matchExpressions")
                    .and_then(Value::as_array)
                    .map(|v| {
                        v.iter()
                            .map(|e| e["key"].as_str().unwrap().to_string())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default(),
            )
            .collect();
        assert!(
            keys.iter().all(|k| netpol::is_managed_label(k)),
            "selects by a label it does not manage: {sel}"
        );
    };
    let spec = &policy["spec"];
    managed(&spec["podSelector"]);
    let rules = spec
        .get("ingress")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .chain(
            spec.get("egress")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        );
    for rule in rules {
        for port in rule
            .get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            assert!(["TCP", "UDP"].contains(&port["protocol"].as_str().unwrap()));
            if let Some(p) = port.get("port") {
                let p = p.as_u64().unwrap();
                assert!((1..=65535).contains(&p));
                if let Some(e) = port.get("endPort") {
                    assert!(e.as_u64().unwrap() > p);
                }
            } else {
                assert!(port.get("endPort").is_none());
            }
        }
        let peers = rule
            .get("from")
            .or(rule.get("to"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for peer in peers {
            if let Some(block) = peer.get("ipBlock") {
                assert!(
                    peer.get("podSelector").is_none() && peer.get("namespaceSelector").is_none()
                );
                let cidr: IpNet = block["cidr"].as_str().unwrap().parse().unwrap();
                assert_eq!(cidr.trunc(), cidr, "host bits in {cidr}");
                for e in block
                    .get("except")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                {
                    let e: IpNet = e.as_str().unwrap().parse().unwrap();
                    assert_eq!(e.trunc(), e);
                    assert!(
                        cidr.contains(&e) && e.prefix_len() > cidr.prefix_len(),
                        "{e} not strictly in {cidr}"
                    );
                }
            } else {
                if let Some(sel) = peer.get("podSelector") {
                    managed(sel);
                }
                if let Some(sel) = peer.get("namespaceSelector") {
                    for e in sel
                        .get("matchExpressions")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                    {
                        assert_eq!(e["key"], "kubernetes.io/metadata.name");
                    }
                    for k in sel
                        .get("matchLabels")
                        .and_then(Value::as_object)
                        .map(|m| m.keys().cloned().collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        assert_eq!(k, "kubernetes.io/metadata.name");
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, max_local_rejects: 1 << 22, ..ProptestConfig::default() })]

    #[test]
    fn policies_agree_with_the_evaluator(
        inv in common::inventory(),
        packets in prop::collection::vec(common::packet(), 1..24),
    ) {
        check(&inv, &packets)?;
    }

    /// The same, where most namespaces have a subnet group and most flows are between pods.
    #[test]
    fn policies_agree_with_the_evaluator_in_dense_clusters(
        inv in common::dense_inventory(),
        packets in prop::collection::vec(common::pod_packet(), 1..24),
    ) {
        check(&inv, &packets)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, max_local_rejects: 1 << 22, ..ProptestConfig::default() })]

    /// The labels the policies rely on are exactly membership and binding.
    #[test]
    fn pod_labels_are_memberships_and_binding(inv in common::inventory()) {
        let res = Resolved::new(&inv);
        for p in 0..inv.pods.len() {
            let mut expected: BTreeMap<String, String> = res
                .memberships(p)
                .iter()
                .map(|a| (format!("asg.kubensg.io/{}", a.name), "true".to_string()))
                .collect();
            if let Some(n) = res.nic_nsg(p) {
                expected.insert("kubensg.io/nic-nsg".into(), inv.nsgs[n].id.name.clone());
            }
            prop_assert_eq!(pod_labels(&res, p), expected);
        }
    }

    /// The same input gives byte-identical output.
    #[test]
    fn output_is_deterministic(inv in common::inventory()) {
        let a = serde_json::to_string(&netpol::compile(&Resolved::new(&inv), Mode::Strict)).unwrap();
        let b = serde_json::to_string(&netpol::compile(&Resolved::new(&inv.clone()), Mode::Strict)).unwrap();
        prop_assert_eq!(a, b);
    }
}

/// The generators exercise what the properties claim to check: many flows are decided by exact
/// rules, both allowed and denied ones, and every reason occurs (`--nocapture` prints the
/// figures).
#[test]
fn generators_exercise_exact_verdicts_and_every_reason() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (
        mut flows,
        mut exact,
        mut exact_allow,
        mut exact_deny,
        mut policies,
        mut parts,
        mut inexact_allow_strict_deny,
    ) = (0, 0, 0, 0, 0, 0, 0);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut isolated_pod_pod = 0;
    for _ in 0..500 {
        let inv = common::dense_inventory()
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let packets = prop::collection::vec(common::pod_packet(), 1..24)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let res = Resolved::new(&inv);
        let c = netpol::compile(&res, Mode::Strict);
        policies += c.policies.len();
        parts += (c.policies.iter())
            .map(|p| netpol::split(p.clone(), PART_BYTES).len())
            .sum::<usize>();
        for r in &c.report {
            if let netpol::Fidelity::NotExpressible(v) = &r.fidelity {
                for x in v {
                    *reasons.entry(format!("{x:?}")).or_default() += 1;
                }
            }
        }
        let sj = json(&c);
        let cl = cluster(&inv, &res);
        for p in &packets {
            flows += 1;
            let v = evaluate_flow(&res, p);
            if v.outbound.as_ref().is_some_and(|o| !o.stages.is_empty())
                && v.inbound.as_ref().is_some_and(|o| !o.stages.is_empty())
            {
                isolated_pod_pod += 1;
            }
            let nsg = v.access == Access::Allow;
            let b = Behaviour {
                ipblock_matches_pods: true,
                portless_matches_icmp: true,
                node_traffic_allowed: false,
            };
            if decided_exactly(&c, &res, p) {
                exact += 1;
                if nsg {
                    exact_allow += 1
                } else {
                    exact_deny += 1
                }
            } else if nsg && !np_eval::allows(&sj, &cl, p, b) {
                inexact_allow_strict_deny += 1
            }
            if !nsg {
                *reasons.entry("_total_deny".into()).or_default() += 1;
            }
        }
    }
    eprintln!(
        "flows {flows} exact {exact} (allow {exact_allow} deny {exact_deny}) pod-pod both isolated {isolated_pod_pod} policies {policies} parts {parts} strict-loses {inexact_allow_strict_deny}"
    );
    eprintln!("reasons {reasons:?}");
    assert!(
        exact * 2 > flows,
        "only {exact} of {flows} flows are decided by exact rules"
    );
    assert!(
        parts * 2 > policies * 3,
        "{policies} policies cut into {parts} parts of {PART_BYTES} bytes"
    );
    assert!(
        exact_allow >= 20 && exact_deny >= 5,
        "exact allows {exact_allow}, denies {exact_deny}"
    );
    for reason in [
        "IcmpNotExpressible",
        "SourcePortsNotExpressible",
        "PodAddressedByCidr",
        "NodeTrafficNotBlockable",
    ] {
        assert!(
            reasons.contains_key(reason),
            "no rule was {reason}: {reasons:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: shrunk counterexamples proptest found against faulty versions of the compiler,
// each checked on every flow between its addresses.

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], asgs: Option<&str>, ip: &str) -> Pod {
    Pod {
        id: ObjectRef::new(ns, name),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        annotations: asgs
            .map(|a| BTreeMap::from([(ASG_ANNOTATION.to_string(), a.to_string())]))
            .unwrap_or_default(),
        ips: vec![ip.parse().unwrap()],
        node_name: Some("node-1".into()),
    }
}

fn one_rule_group(ns: &str, name: &str, subnet: bool, rule: SecurityRule) -> Nsg {
    Nsg {
        id: ObjectRef::new(ns, name),
        created: Some("2026-01-01T00:00:00Z".into()),
        generation: Some(1),
        subnet,
        pod_selector: (!subnet).then(LabelSelector::default),
        rules: vec![rule],
    }
}

fn any_port_rule(
    direction: Direction,
    access: Access,
    protocol: Protocol,
    source: &str,
    destination: &str,
    priority: u32,
) -> SecurityRule {
    SecurityRule {
        name: "r0".into(),
        description: None,
        priority,
        direction,
        access,
        protocol,
        source: Endpoint::Prefixes(vec![source.parse().unwrap()]),
        source_ports: vec![PortRange::ALL],
        destination: Endpoint::Prefixes(vec![destination.parse().unwrap()]),
        destination_ports: vec![PortRange::ALL],
        is_default: false,
    }
}

fn cluster_of(nsgs: Vec<Nsg>, asgs: Vec<Asg>, pods: Vec<Pod>) -> Inventory {
    Inventory {
        nsgs,
        asgs,
        service_tags: vec![],
        pods,
        namespaces: common::NAMESPACES
            .iter()
            .copied()
            .map(Namespace::named)
            .collect(),
        virtual_network: common::VIRTUAL_NETWORK
            .iter()
            .map(|n| n.parse().unwrap())
            .collect(),
        node_ips: vec![common::NODE_IP.parse().unwrap()],
    }
}

/// Every flow between the pods' addresses and the generator's other addresses.
fn all_flows(inv: &Inventory) -> Vec<Packet> {
    let mut ips: Vec<std::net::IpAddr> = inv.pods.iter().flat_map(|p| p.ips.clone()).collect();
    ips.extend(
        common::OTHER_IPS
            .iter()
            .map(|s| s.parse::<std::net::IpAddr>().unwrap()),
    );
    let mut out = Vec::new();
    for &src in &ips {
        for &dst in &ips {
            if src == dst || src.is_ipv4() != dst.is_ipv4() {
                continue;
            }
            for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Icmp] {
                for dst_port in [22, 443] {
                    out.push(Packet {
                        protocol,
                        src,
                        src_port: 40000,
                        dst,
                        dst_port,
                    });
                }
            }
        }
    }
    out
}

fn regression(inv: Inventory, shrunk: Packet) {
    check(&inv, &[shrunk]).unwrap();
    check(&inv, &all_flows(&inv)).unwrap();
}

/// A CIDR splits pods NetworkPolicy cannot tell apart; the ipBlock written for the rest of the
/// cluster range must `except` their addresses, or plugins whose ipBlocks match pod IPs let
/// them through.
#[test]
fn regression_ipblocks_except_pods_not_allowed_as_much() {
    let web = [("app", "web")];
    regression(
        cluster_of(
            vec![one_rule_group(
                "a",
                "nsg0",
                false,
                any_port_rule(
                    Direction::Outbound,
                    Access::Deny,
                    Protocol::Tcp,
                    "*",
                    "10.244.0.10/31",
                    100,
                ),
            )],
            vec![Asg {
                id: ObjectRef::new("c", "logic"),
                pod_selector: Some(LabelSelector {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![Requirement {
                        key: "tier".into(),
                        operator: Operator::In,
                        values: vec!["x".into()],
                    }],
                }),
            }],
            vec![
                pod("a", "pod0", &web, None, "10.244.0.10"),
                pod("a", "pod1", &web, None, "10.244.0.11"),
                pod(
                    "c",
                    "pod2",
                    &[("app", "web"), ("tier", "x")],
                    None,
                    "10.244.0.12",
                ),
                pod("a", "pod3", &web, None, "10.244.0.13"),
                pod("a", "pod4", &web, None, "10.244.1.10"),
                pod("a", "pod5", &web, None, "10.244.1.11"),
            ],
        ),
        Packet {
            protocol: Protocol::Tcp,
            src: "10.244.0.11".parse().unwrap(),
            src_port: 40000,
            dst: "10.244.0.10".parse().unwrap(),
            dst_port: 22,
        },
    );
}

/// A closing deny must be subtracted from the default allows after it.
#[test]
fn regression_denies_are_subtracted_from_later_allows() {
    let web = [("app", "web")];
    let mut deny = any_port_rule(
        Direction::Inbound,
        Access::Deny,
        Protocol::Tcp,
        "*",
        "*",
        4096,
    );
    deny.name = "deny-rest".into();
    regression(
        cluster_of(
            vec![one_rule_group("a", "subnet-a", true, deny)],
            vec![],
            vec![
                pod("a", "pod0", &web, None, "10.244.0.10"),
                pod("a", "pod1", &web, None, "10.244.0.11"),
            ],
        ),
        Packet {
            protocol: Protocol::Tcp,
            src: "10.244.0.12".parse().unwrap(),
            src_port: 40000,
            dst: "10.244.0.10".parse().unwrap(),
            dst_port: 22,
        },
    );
}

/// A selector for the pods of one namespace must keep its namespace.
#[test]
fn regression_selectors_keep_their_namespace() {
    let web = [("app", "web")];
    regression(
        cluster_of(
            vec![one_rule_group(
                "a",
                "nsg0",
                true,
                any_port_rule(
                    Direction::Inbound,
                    Access::Deny,
                    Protocol::Udp,
                    "10.244.0.10/31",
                    "*",
                    100,
                ),
            )],
            vec![Asg {
                id: ObjectRef::new("a", "web"),
                pod_selector: None,
            }],
            vec![
                pod("a", "pod0", &web, None, "10.244.0.10"),
                pod("a", "pod1", &web, None, "10.244.0.11"),
                pod("c", "pod2", &web, None, "10.244.0.12"),
                pod("a", "pod3", &web, Some("web"), "10.244.0.13"),
                pod("a", "pod4", &web, None, "10.244.1.10"),
            ],
        ),
        Packet {
            protocol: Protocol::Udp,
            src: "10.244.0.10".parse().unwrap(),
            src_port: 40000,
            dst: "10.244.0.11".parse().unwrap(),
            dst_port: 22,
        },
    );
}

/// Node addresses are a peer group of their own (NetworkPolicy never blocks a pod's node).
#[test]
fn regression_node_addresses_are_reported_apart() {
    let web = [("app", "web")];
    regression(
        cluster_of(
            vec![one_rule_group(
                "b",
                "nsg0",
                false,
                any_port_rule(
                    Direction::Outbound,
                    Access::Deny,
                    Protocol::Icmp,
                    "*",
                    "*",
                    100,
                ),
            )],
            vec![],
            vec![
                pod("a", "pod0", &web, None, "10.244.0.10"),
                pod("a", "pod1", &web, None, "10.244.0.11"),
                pod("b", "pod2", &web, None, "10.244.0.12"),
            ],
        ),
        Packet {
            protocol: Protocol::Icmp,
            src: "10.244.0.12".parse().unwrap(),
            src_port: 40000,
            dst: "172.18.0.2".parse().unwrap(),
            dst_port: 22,
        },
    );
}
