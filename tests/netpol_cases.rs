//! Hand-written cases of the NetworkPolicy compiler: the shape of the output for each kind of
//! subtraction, each fidelity reason, bad references, ownership and deletion. Every case also
//! checks its flows against the reference evaluator through the independent `np_eval`.

mod np_eval;

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

use kube_nsg::eval::{Packet, evaluate_flow};
use kube_nsg::model::*;
use kube_nsg::netpol::{self, Compiled, Fidelity, Mode, Reason, pod_labels};
use kube_nsg::resolve::Resolved;

use np_eval::{Behaviour, Cluster, NpPod};

// ---------------------------------------------------------------------------------------------
// Builders

fn endpoint(s: &str) -> Endpoint {
    if let Some(asgs) = s.strip_prefix("asg:") {
        Endpoint::Asgs(
            asgs.split(',')
                .map(|a| {
                    let (namespace, name) = a.split_once('/').unwrap();
                    AsgRef {
                        namespace: namespace.into(),
                        name: name.into(),
                    }
                })
                .collect(),
        )
    } else {
        Endpoint::Prefixes(s.split(',').map(|p| p.parse().unwrap()).collect())
    }
}

fn ports(s: &str) -> Vec<PortRange> {
    s.split(',').map(|p| p.parse().unwrap()).collect()
}

/// `rule("deny-ssh", 100, "in", "deny", "tcp", "*", "*", "*", "22")`
#[allow(clippy::too_many_arguments)]
fn rule(
    name: &str,
    priority: u32,
    dir: &str,
    access: &str,
    proto: &str,
    src: &str,
    sp: &str,
    dst: &str,
    dp: &str,
) -> SecurityRule {
    SecurityRule {
        name: name.into(),
        description: None,
        priority,
        direction: if dir == "in" {
            Direction::Inbound
        } else {
            Direction::Outbound
        },
        access: if access == "allow" {
            Access::Allow
        } else {
            Access::Deny
        },
        protocol: Protocol::parse(proto).unwrap(),
        source: endpoint(src),
        source_ports: ports(sp),
        destination: endpoint(dst),
        destination_ports: ports(dp),
        is_default: false,
    }
}

fn subnet_nsg(ns: &str, name: &str, rules: Vec<SecurityRule>) -> Nsg {
    Nsg {
        id: ObjectRef::new(ns, name),
        created: Some("2026-01-01T00:00:00Z".into()),
        generation: Some(1),
        subnet: true,
        pod_selector: None,
        rules,
    }
}

fn nic_nsg(ns: &str, name: &str, app: &str, rules: Vec<SecurityRule>) -> Nsg {
    Nsg {
        subnet: false,
        pod_selector: Some(LabelSelector {
            match_labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            match_expressions: vec![],
        }),
        ..subnet_nsg(ns, name, rules)
    }
}

fn pod(ns: &str, name: &str, app: &str, asgs: &str, ips: &[&str]) -> Pod {
    Pod {
        id: ObjectRef::new(ns, name),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        annotations: if asgs.is_empty() {
            BTreeMap::new()
        } else {
            BTreeMap::from([(ASG_ANNOTATION.to_string(), asgs.to_string())])
        },
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        node_name: Some("node-1".into()),
    }
}

fn asg(ns: &str, name: &str) -> Asg {
    Asg {
        id: ObjectRef::new(ns, name),
        pod_selector: None,
    }
}

fn inventory(nsgs: Vec<Nsg>, asgs: Vec<Asg>, pods: Vec<Pod>) -> Inventory {
    Inventory {
        nsgs,
        asgs,
        service_tags: vec![ServiceTag {
            name: "corp".into(),
            prefixes: vec!["192.0.2.0/24".parse().unwrap()],
        }],
        pods,
        namespaces: vec![Namespace::named("a"), Namespace::named("b")],
        virtual_network: vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/64".parse().unwrap(),
        ],
        node_ips: vec!["172.18.0.2".parse().unwrap()],
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tcp(src: &str, dst: &str, port: u16) -> Packet {
    Packet {
        protocol: Protocol::Tcp,
        src: ip(src),
        src_port: 40000,
        dst: ip(dst),
        dst_port: port,
    }
}

fn with(protocol: Protocol, src_port: u16, p: Packet) -> Packet {
    Packet {
        protocol,
        src_port,
        ..p
    }
}

// ---------------------------------------------------------------------------------------------
// Checking

struct Case {
    inv: Inventory,
}

impl Case {
    fn new(inv: Inventory) -> Self {
        Case { inv }
    }

    fn compile(&self, mode: Mode) -> Compiled {
        netpol::compile(&Resolved::new(&self.inv), mode)
    }

    fn policies(&self, mode: Mode) -> Vec<Value> {
        self.compile(mode)
            .policies
            .iter()
            .map(|p| serde_json::to_value(p).unwrap())
            .collect()
    }

    fn cluster(&self) -> Cluster {
        let res = Resolved::new(&self.inv);
        Cluster {
            namespaces: self
                .inv
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), n.labels.clone()))
                .collect(),
            pods: self
                .inv
                .pods
                .iter()
                .enumerate()
                .map(|(p, pod)| {
                    let mut labels = pod.labels.clone();
                    labels.extend(pod_labels(&res, p));
                    NpPod {
                        namespace: pod.id.namespace.clone(),
                        labels,
                        ips: pod.ips.clone(),
                    }
                })
                .collect(),
            node_ips: self.inv.node_ips.clone(),
        }
    }

    fn nsg_allows(&self, p: &Packet) -> bool {
        evaluate_flow(&Resolved::new(&self.inv), p).access == Access::Allow
    }

    fn np_allows(&self, mode: Mode, p: &Packet) -> bool {
        let b = Behaviour {
            ipblock_matches_pods: true,
            portless_matches_icmp: true,
            node_traffic_allowed: false,
        };
        np_eval::allows(&self.policies(mode), &self.cluster(), p, b)
    }

    /// The flow gets the NSG's verdict from the policies of both modes.
    fn exact(&self, p: Packet) {
        let nsg = self.nsg_allows(&p);
        assert_eq!(self.np_allows(Mode::Strict, &p), nsg, "strict {p:?}");
        assert_eq!(
            self.np_allows(Mode::Permissive, &p),
            nsg,
            "permissive {p:?}"
        );
    }

    /// The NSG allows the flow; strict policies deny it, permissive ones allow it.
    fn lost_in_strict(&self, p: Packet) {
        assert!(self.nsg_allows(&p), "the NSG allows {p:?}");
        assert!(!self.np_allows(Mode::Strict, &p), "strict denies {p:?}");
        assert!(
            self.np_allows(Mode::Permissive, &p),
            "permissive allows {p:?}"
        );
    }

    /// The NSG denies the flow; strict policies deny it, permissive ones allow it.
    fn widened_in_permissive(&self, p: Packet) {
        assert!(!self.nsg_allows(&p), "the NSG denies {p:?}");
        assert!(!self.np_allows(Mode::Strict, &p), "strict denies {p:?}");
        assert!(
            self.np_allows(Mode::Permissive, &p),
            "permissive allows {p:?}"
        );
    }

    fn fidelity(&self, nsg: &str, dir: Direction, rule: &str) -> Fidelity {
        let (ns, name) = nsg.split_once('/').unwrap();
        self.compile(Mode::Strict)
            .rule(&ObjectRef::new(ns, name), dir, rule)
            .unwrap()
            .fidelity
            .clone()
    }
}

fn reasons(r: &[Reason]) -> Fidelity {
    Fidelity::NotExpressible(r.to_vec())
}

// ---------------------------------------------------------------------------------------------
// Defaults and isolation

#[test]
fn default_rules_isolate_and_allow_the_virtual_network() {
    let case = Case::new(inventory(
        vec![subnet_nsg("a", "web", vec![])],
        vec![],
        vec![
            pod("a", "p1", "web", "", &["10.244.0.10", "fd00:10:244::10"]),
            pod("b", "p2", "db", "", &["10.244.1.10"]),
        ],
    ));
    let policies = case.policies(Mode::Strict);
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    assert_eq!(p["metadata"]["namespace"], "a");
    assert_eq!(p["metadata"]["labels"]["kubensg.io/nsg"], "web");
    assert_eq!(
        p["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "kube-nsg"
    );
    assert_eq!(
        p["spec"]["podSelector"],
        json!({"matchExpressions": [{"key": "kubensg.io/nic-nsg", "operator": "DoesNotExist"}]})
    );
    assert_eq!(p["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    // AllowVNetInBound and AllowAzureLoadBalancerInBound: every pod, the cluster ranges and the node.
    assert_eq!(
        p["spec"]["ingress"],
        json!([{"from": [
            {"namespaceSelector": {}},
            {"ipBlock": {"cidr": "10.244.0.0/16"}},
            {"ipBlock": {"cidr": "172.18.0.2/32"}},
            {"ipBlock": {"cidr": "fd00:10:244::/64"}},
        ]}])
    );
    // AllowVnetOutBound plus AllowInternetOutBound: everything.
    assert_eq!(p["spec"]["egress"], json!([{}]));
    assert!(
        case.compile(Mode::Strict)
            .report
            .iter()
            .all(|r| r.fidelity.is_exact())
    );
    case.exact(tcp("10.244.1.10", "10.244.0.10", 80));
    case.exact(tcp("8.8.8.8", "10.244.0.10", 80));
    case.exact(tcp("2001:db8::1", "fd00:10:244::10", 80));
    case.exact(tcp("172.18.0.2", "10.244.0.10", 8080));
    case.exact(tcp("10.244.0.10", "8.8.8.8", 443));
    case.exact(with(
        Protocol::Icmp,
        0,
        tcp("10.244.0.200", "10.244.0.10", 0),
    ));
}

#[test]
fn pods_without_a_group_get_no_policy() {
    let case = Case::new(inventory(
        vec![nic_nsg(
            "a",
            "web",
            "web",
            vec![rule("deny-all", 100, "in", "deny", "*", "*", "*", "*", "*")],
        )],
        vec![],
        vec![
            pod("a", "w", "web", "", &["10.244.0.10"]),
            pod("a", "d", "db", "", &["10.244.0.11"]),
        ],
    ));
    let policies = case.policies(Mode::Strict);
    assert_eq!(policies.len(), 1);
    assert_eq!(
        policies[0]["spec"]["podSelector"],
        json!({"matchLabels": {"kubensg.io/nic-nsg": "web"}})
    );
    assert_eq!(
        policies[0]["spec"].get("ingress"),
        None,
        "isolated, nothing allowed in"
    );
    case.exact(tcp("8.8.8.8", "10.244.0.11", 80));
    case.exact(tcp("10.244.0.11", "10.244.0.10", 80));
    case.exact(tcp("10.244.0.10", "10.244.0.11", 80));
}

// ---------------------------------------------------------------------------------------------
// The three subtractions

#[test]
fn pod_group_subtraction_becomes_match_expressions() {
    // Allow web members, except those that are also db members.
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule("deny-db", 100, "in", "deny", "*", "asg:b/db", "*", "*", "*"),
                rule(
                    "allow-web",
                    200,
                    "in",
                    "allow",
                    "*",
                    "asg:b/web",
                    "*",
                    "*",
                    "*",
                ),
                rule("deny-rest", 300, "in", "deny", "*", "*", "*", "*", "*"),
            ],
        )],
        vec![asg("b", "web"), asg("b", "db")],
        vec![
            pod("a", "target", "x", "", &["10.244.0.10"]),
            pod("b", "web", "x", "web", &["10.244.1.10"]),
            pod("b", "both", "x", "web,db", &["10.244.1.11"]),
            pod("b", "none", "x", "", &["10.244.1.12"]),
        ],
    ));
    let p = &case.policies(Mode::Strict)[0];
    assert_eq!(
        p["spec"]["ingress"],
        json!([{"from": [{
            "podSelector": {"matchExpressions": [
                {"key": "asg.kubensg.io/db", "operator": "DoesNotExist"},
                {"key": "asg.kubensg.io/web", "operator": "Exists"},
            ]},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}},
        }]}])
    );
    case.exact(tcp("10.244.1.10", "10.244.0.10", 80));
    case.exact(tcp("10.244.1.11", "10.244.0.10", 80));
    case.exact(tcp("10.244.1.12", "10.244.0.10", 80));
}

#[test]
fn cidr_subtraction_becomes_except() {
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule(
                    "deny-lab",
                    100,
                    "in",
                    "deny",
                    "*",
                    "203.0.113.0/26",
                    "*",
                    "*",
                    "*",
                ),
                rule(
                    "allow-partner",
                    200,
                    "in",
                    "allow",
                    "tcp",
                    "203.0.113.0/24",
                    "*",
                    "*",
                    "443",
                ),
                rule("deny-rest", 300, "in", "deny", "*", "*", "*", "*", "*"),
            ],
        )],
        vec![],
        vec![pod("a", "target", "x", "", &["10.244.0.10"])],
    ));
    let p = &case.policies(Mode::Strict)[0];
    assert_eq!(
        p["spec"]["ingress"],
        json!([{
            "ports": [{"protocol": "TCP", "port": 443}],
            "from": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.0/26"]}}],
        }])
    );
    case.exact(tcp("203.0.113.7", "10.244.0.10", 443));
    case.exact(tcp("203.0.113.77", "10.244.0.10", 443));
    case.exact(tcp("203.0.113.77", "10.244.0.10", 80));
}

#[test]
fn port_subtraction_becomes_ranges() {
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule("deny-1500", 100, "in", "deny", "tcp", "*", "*", "*", "1500"),
                rule(
                    "allow-range",
                    200,
                    "in",
                    "allow",
                    "tcp",
                    "Internet",
                    "*",
                    "*",
                    "1000-2000",
                ),
            ],
        )],
        vec![],
        vec![pod("a", "target", "x", "", &["10.244.0.10"])],
    ));
    let p = &case.policies(Mode::Strict)[0];
    let ingress = p["spec"]["ingress"].as_array().unwrap();
    let internet = ingress
        .iter()
        .find(|r| r["ports"][0]["port"] == 1000)
        .unwrap();
    assert_eq!(
        internet["ports"],
        json!([{"protocol": "TCP", "port": 1000, "endPort": 1499}, {"protocol": "TCP", "port": 1501, "endPort": 2000}])
    );
    case.exact(tcp("8.8.8.8", "10.244.0.10", 1499));
    case.exact(tcp("8.8.8.8", "10.244.0.10", 1500));
    case.exact(tcp("8.8.8.8", "10.244.0.10", 2001));
}

#[test]
fn both_stages_must_allow() {
    // The subnet allows TCP 80 and 443 from the Internet, the interface only 443.
    let case = Case::new(inventory(
        vec![
            subnet_nsg(
                "a",
                "sub",
                vec![rule(
                    "web", 100, "in", "allow", "tcp", "Internet", "*", "*", "80,443",
                )],
            ),
            nic_nsg(
                "a",
                "nic",
                "web",
                vec![rule("tls", 100, "in", "allow", "tcp", "*", "*", "*", "443")],
            ),
        ],
        vec![],
        vec![
            pod("a", "w", "web", "", &["10.244.0.10"]),
            pod("a", "o", "other", "", &["10.244.0.11"]),
        ],
    ));
    let policies = case.policies(Mode::Strict);
    assert_eq!(policies.len(), 2, "one per bound combination");
    let nic = policies
        .iter()
        .find(|p| p["metadata"]["labels"]["kubensg.io/nsg"] == "nic")
        .unwrap();
    assert_eq!(
        nic["metadata"]["annotations"]["kubensg.io/subnet-nsg"],
        "sub"
    );
    assert_eq!(nic["metadata"]["annotations"]["kubensg.io/nic-nsg"], "nic");
    case.exact(tcp("8.8.8.8", "10.244.0.10", 443));
    case.exact(tcp("8.8.8.8", "10.244.0.10", 80));
    case.exact(tcp("8.8.8.8", "10.244.0.11", 80));
    case.exact(tcp("10.244.0.11", "10.244.0.10", 22));
}

#[test]
fn ipv6_is_first_class() {
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule(
                    "deny-doc",
                    100,
                    "in",
                    "deny",
                    "*",
                    "2001:db8:1::/48",
                    "*",
                    "*",
                    "*",
                ),
                rule(
                    "allow-doc",
                    200,
                    "in",
                    "allow",
                    "udp",
                    "2001:db8::/32",
                    "*",
                    "*",
                    "53",
                ),
            ],
        )],
        vec![],
        vec![pod("a", "t", "x", "", &["10.244.0.10", "fd00:10:244::10"])],
    ));
    let p = &case.policies(Mode::Strict)[0];
    let ingress = p["spec"]["ingress"].as_array().unwrap();
    assert!(ingress.contains(&json!({
        "ports": [{"protocol": "UDP", "port": 53}],
        "from": [{"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]}}],
    })));
    let dns = |src: &str| with(Protocol::Udp, 40000, tcp(src, "fd00:10:244::10", 53));
    case.exact(dns("2001:db8::1"));
    case.exact(dns("2001:db8:1::1"));
    case.exact(dns("2001:db9::1"));
}

// ---------------------------------------------------------------------------------------------
// Each fidelity reason

#[test]
fn icmp_alone_is_not_expressible() {
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule(
                    "ping",
                    100,
                    "in",
                    "allow",
                    "icmp",
                    "VirtualNetwork",
                    "*",
                    "*",
                    "*",
                ),
                rule(
                    "deny-vnet",
                    200,
                    "in",
                    "deny",
                    "*",
                    "VirtualNetwork",
                    "*",
                    "*",
                    "*",
                ),
            ],
        )],
        vec![],
        vec![
            pod("a", "t", "x", "", &["10.244.0.10"]),
            pod("b", "o", "x", "", &["10.244.1.10"]),
        ],
    ));
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "ping"),
        reasons(&[Reason::IcmpNotExpressible])
    );
    // VirtualNetwork holds the node's address too.
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "deny-vnet"),
        reasons(&[Reason::IcmpNotExpressible, Reason::NodeTrafficNotBlockable])
    );
    case.lost_in_strict(with(
        Protocol::Icmp,
        0,
        tcp("10.244.1.10", "10.244.0.10", 0),
    ));
    case.widened_in_permissive(tcp("10.244.1.10", "10.244.0.10", 80));
}

#[test]
fn icmp_with_everything_is_expressible() {
    // Deny one TCP port, then allow everything: the rest is TCP and UDP ranges plus ICMP.
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![rule(
                "deny-ssh", 100, "in", "deny", "tcp", "*", "*", "*", "22",
            )],
        )],
        vec![],
        vec![
            pod("a", "t", "x", "", &["10.244.0.10"]),
            pod("b", "o", "x", "", &["10.244.1.10"]),
        ],
    ));
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "AllowVNetInBound"),
        reasons(&[Reason::IcmpNotExpressible])
    );
    case.exact(tcp("10.244.1.10", "10.244.0.10", 80));
    case.lost_in_strict(with(
        Protocol::Icmp,
        0,
        tcp("10.244.1.10", "10.244.0.10", 0),
    ));
    case.widened_in_permissive(tcp("10.244.1.10", "10.244.0.10", 22));
}

#[test]
fn source_ports_are_not_expressible() {
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![rule(
                "from-high",
                100,
                "in",
                "allow",
                "tcp",
                "Internet",
                "1024-65535",
                "*",
                "443",
            )],
        )],
        vec![],
        vec![pod("a", "t", "x", "", &["10.244.0.10"])],
    ));
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "from-high"),
        reasons(&[Reason::SourcePortsNotExpressible])
    );
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "DenyAllInbound"),
        reasons(&[Reason::SourcePortsNotExpressible])
    );
    case.lost_in_strict(tcp("8.8.8.8", "10.244.0.10", 443));
    case.widened_in_permissive(with(Protocol::Tcp, 80, tcp("8.8.8.8", "10.244.0.10", 443)));
}

#[test]
fn a_cidr_splitting_pods_alike_is_not_expressible() {
    // Two pods NetworkPolicy cannot tell apart (same namespace, no ASG), one inside the CIDR.
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule(
                    "one-pod",
                    100,
                    "in",
                    "allow",
                    "tcp",
                    "10.244.1.10/32",
                    "*",
                    "*",
                    "80",
                ),
                rule(
                    "deny-vnet",
                    200,
                    "in",
                    "deny",
                    "*",
                    "VirtualNetwork",
                    "*",
                    "*",
                    "*",
                ),
            ],
        )],
        vec![],
        vec![
            pod("a", "t", "x", "", &["10.244.0.10"]),
            pod("b", "in", "x", "", &["10.244.1.10"]),
            pod("b", "out", "x", "", &["10.244.1.11"]),
        ],
    ));
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "one-pod"),
        reasons(&[Reason::PodAddressedByCidr])
    );
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "deny-vnet"),
        reasons(&[Reason::PodAddressedByCidr, Reason::NodeTrafficNotBlockable])
    );
    case.lost_in_strict(tcp("10.244.1.10", "10.244.0.10", 80));
    case.widened_in_permissive(tcp("10.244.1.11", "10.244.0.10", 80));
    // Pod IPs are never written as ipBlocks.
    let text = serde_json::to_string(&case.policies(Mode::Permissive)).unwrap();
    assert!(!text.contains("10.244.1.10"), "{text}");
}

#[test]
fn a_cidr_covering_a_whole_class_is_exact() {
    // The CIDR covers every pod of namespace b: selected by namespace, exactly.
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule(
                    "ns-b",
                    100,
                    "in",
                    "allow",
                    "tcp",
                    "10.244.1.0/24",
                    "*",
                    "*",
                    "80",
                ),
                rule(
                    "deny-vnet",
                    200,
                    "in",
                    "deny",
                    "*",
                    "VirtualNetwork",
                    "*",
                    "*",
                    "*",
                ),
            ],
        )],
        vec![],
        vec![
            pod("a", "t", "x", "", &["10.244.0.10"]),
            pod("b", "o", "x", "", &["10.244.1.10"]),
        ],
    ));
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "ns-b"),
        Fidelity::Exact
    );
    case.exact(tcp("10.244.1.10", "10.244.0.10", 80));
    case.exact(tcp("10.244.1.77", "10.244.0.10", 80));
    case.exact(tcp("10.244.0.77", "10.244.0.10", 80));
}

#[test]
fn one_family_of_a_dual_stack_pod_is_not_expressible() {
    // The CIDR holds the peer's IPv4 address but not its IPv6 one.
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule(
                    "v4-only",
                    100,
                    "in",
                    "allow",
                    "tcp",
                    "10.244.1.0/24",
                    "*",
                    "*",
                    "80",
                ),
                rule(
                    "deny-vnet",
                    200,
                    "in",
                    "deny",
                    "*",
                    "VirtualNetwork",
                    "*",
                    "*",
                    "*",
                ),
            ],
        )],
        vec![],
        vec![
            pod("a", "t", "x", "", &["10.244.0.10", "fd00:10:244::10"]),
            pod("b", "o", "x", "", &["10.244.1.10", "fd00:10:244::11"]),
        ],
    ));
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "v4-only"),
        reasons(&[Reason::PodAddressedByCidr])
    );
    case.lost_in_strict(tcp("10.244.1.10", "10.244.0.10", 80));
    case.widened_in_permissive(tcp("fd00:10:244::11", "fd00:10:244::10", 80));
}

#[test]
fn node_traffic_cannot_be_blocked() {
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![rule(
                "no-probes",
                100,
                "in",
                "deny",
                "*",
                "AzureLoadBalancer",
                "*",
                "*",
                "*",
            )],
        )],
        vec![],
        vec![pod("a", "t", "x", "", &["10.244.0.10"])],
    ));
    assert_eq!(
        case.fidelity("a/g", Direction::Inbound, "no-probes"),
        reasons(&[Reason::NodeTrafficNotBlockable])
    );
    // The policies leave the node out; whether a plugin lets its own node through is its call.
    case.exact(tcp("172.18.0.2", "10.244.0.10", 8080));
    let b = Behaviour {
        ipblock_matches_pods: true,
        portless_matches_icmp: true,
        node_traffic_allowed: true,
    };
    assert!(np_eval::allows(
        &case.policies(Mode::Strict),
        &case.cluster(),
        &tcp("172.18.0.2", "10.244.0.10", 8080),
        b
    ));
}

// ---------------------------------------------------------------------------------------------
// Bad input, ownership, deletion, names

#[test]
fn missing_references_compile_the_rest_and_are_reported() {
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![
                rule(
                    "ghost-asg",
                    100,
                    "in",
                    "allow",
                    "*",
                    "asg:a/ghost",
                    "*",
                    "*",
                    "*",
                ),
                rule(
                    "ghost-tag",
                    110,
                    "in",
                    "deny",
                    "*",
                    "NoSuchTag",
                    "*",
                    "*",
                    "*",
                ),
                rule("web", 200, "in", "allow", "tcp", "Internet", "*", "*", "80"),
                rule("deny-rest", 300, "in", "deny", "*", "*", "*", "*", "*"),
            ],
        )],
        vec![],
        vec![pod("a", "t", "x", "", &["10.244.0.10"])],
    ));
    let c = case.compile(Mode::Strict);
    let id = ObjectRef::new("a", "g");
    let ghost = c.rule(&id, Direction::Inbound, "ghost-asg").unwrap();
    assert_eq!(ghost.unresolved, vec!["source: asg:a/ghost".to_string()]);
    let tag = c.rule(&id, Direction::Inbound, "ghost-tag").unwrap();
    assert_eq!(
        tag.unresolved,
        vec!["source: serviceTag:NoSuchTag".to_string()]
    );
    assert!(
        c.rule(&id, Direction::Inbound, "web")
            .unwrap()
            .unresolved
            .is_empty()
    );
    let report = serde_json::to_value(&c.report).unwrap();
    assert_eq!(report[0]["unresolved"], json!(["source: asg:a/ghost"]));
    assert_eq!(report[0]["fidelity"], json!("Exact"));
    case.exact(tcp("8.8.8.8", "10.244.0.10", 80));
    case.exact(tcp("8.8.8.8", "10.244.0.10", 81));
}

#[test]
fn report_serializes_camel_case_with_reasons() {
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![rule("ping", 100, "in", "allow", "icmp", "*", "*", "*", "*")],
        )],
        vec![],
        vec![pod("a", "t", "x", "", &["10.244.0.10"])],
    ));
    let report = serde_json::to_value(case.compile(Mode::Strict).report).unwrap();
    assert_eq!(
        report[0],
        json!({
            "nsg": "a/g",
            "rule": "ping",
            "priority": 100,
            "direction": "Inbound",
            "access": "Allow",
            "isDefault": false,
            "fidelity": ["IcmpNotExpressible"],
        })
    );
}

#[test]
fn deleting_a_group_removes_its_policies_and_the_rest_stay_correct() {
    let nic = nic_nsg(
        "a",
        "nic",
        "web",
        vec![
            rule("only-tls", 100, "in", "allow", "tcp", "*", "*", "*", "443"),
            rule("deny", 200, "in", "deny", "*", "*", "*", "*", "*"),
        ],
    );
    let sub = subnet_nsg(
        "a",
        "sub",
        vec![rule(
            "no-corp", 100, "in", "deny", "*", "corp", "*", "*", "*",
        )],
    );
    let pods = vec![
        pod("a", "w", "web", "", &["10.244.0.10"]),
        pod("a", "o", "db", "", &["10.244.0.11"]),
    ];
    let both = Case::new(inventory(
        vec![sub.clone(), nic.clone()],
        vec![],
        pods.clone(),
    ));
    let owners = |c: &Case| -> Vec<String> {
        c.policies(Mode::Strict)
            .iter()
            .map(|p| {
                p["metadata"]["labels"]["kubensg.io/nsg"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(owners(&both), vec!["nic", "sub"]);
    let flows = [
        tcp("10.244.0.11", "10.244.0.10", 443),
        tcp("10.244.0.11", "10.244.0.10", 80),
        tcp("192.0.2.5", "10.244.0.10", 443),
        tcp("192.0.2.5", "10.244.0.11", 80),
        tcp("10.244.0.10", "10.244.0.11", 80),
    ];
    for f in flows {
        both.exact(f);
    }
    let without_nic = Case::new(inventory(vec![sub.clone()], vec![], pods.clone()));
    assert_eq!(owners(&without_nic), vec!["sub"]);
    for f in flows {
        without_nic.exact(f);
    }
    let without_sub = Case::new(inventory(vec![nic], vec![], pods));
    assert_eq!(owners(&without_sub), vec!["nic"]);
    for f in flows {
        without_sub.exact(f);
    }
    // The interface group's policy keeps its name when the subnet group goes.
    let name = |c: &Case| {
        c.policies(Mode::Strict)
            .iter()
            .find(|p| p["metadata"]["labels"]["kubensg.io/nsg"] == "nic")
            .unwrap()["metadata"]["name"]
            .clone()
    };
    assert_eq!(name(&both), name(&without_sub));
}

#[test]
fn names_are_stable_when_rules_change() {
    let pods = vec![pod("a", "t", "x", "", &["10.244.0.10"])];
    let one = Case::new(inventory(
        vec![subnet_nsg("a", "g", vec![])],
        vec![],
        pods.clone(),
    ));
    let two = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![rule("ssh", 100, "in", "deny", "tcp", "*", "*", "*", "22")],
        )],
        vec![],
        pods,
    ));
    let (p1, p2) = (one.policies(Mode::Strict), two.policies(Mode::Strict));
    assert_eq!(p1[0]["metadata"]["name"], p2[0]["metadata"]["name"]);
    assert_ne!(p1[0]["spec"], p2[0]["spec"]);
    assert!(
        p1[0]["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("nsg-g-")
    );
}

#[test]
fn classes_with_equal_content_share_one_policy() {
    // The rules name ASG web as destination: members and non-members differ, db membership not.
    let case = Case::new(inventory(
        vec![subnet_nsg(
            "a",
            "g",
            vec![rule(
                "to-web",
                100,
                "in",
                "allow",
                "tcp",
                "Internet",
                "*",
                "asg:a/web",
                "443",
            )],
        )],
        vec![asg("a", "web"), asg("a", "db")],
        vec![
            pod("a", "w1", "x", "web", &["10.244.0.10"]),
            pod("a", "w2", "x", "web,db", &["10.244.0.11"]),
            pod("a", "d", "x", "db", &["10.244.0.12"]),
            pod("a", "n", "x", "", &["10.244.0.13"]),
        ],
    ));
    let policies = case.policies(Mode::Strict);
    assert_eq!(policies.len(), 2);
    let selectors: Vec<&Value> = policies.iter().map(|p| &p["spec"]["podSelector"]).collect();
    assert!(
        selectors
            .iter()
            .all(|s| s.to_string().contains("asg.kubensg.io/web")
                && !s.to_string().contains("asg.kubensg.io/db"))
    );
    for dst in ["10.244.0.10", "10.244.0.11", "10.244.0.12", "10.244.0.13"] {
        case.exact(tcp("8.8.8.8", dst, 443));
    }
}
