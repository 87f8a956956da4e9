//! The large cluster of the benchmarks: 4,096 rules in the four stages a flow between two
//! pods crosses, 10,000 pods with ASG memberships.

use std::collections::BTreeMap;

use kube_nsg::model::*;

use super::examples::{asg, pod, rule};

pub const NAMESPACES: usize = 10;
pub const PODS: usize = 10_000;
pub const RULES_PER_STAGE: usize = 1024;
/// The benchmark flow: pod A to pod B, UDP to this port; no user rule matches it, so every
/// stage decides it by a default rule, after all of its user rules.
pub const FLOW_PORT: u16 = 9000;
pub const A: &str = "10.250.2.1";
pub const B: &str = "10.250.2.2";
pub const A6: &str = "fd00:250::2:1";
pub const B6: &str = "fd00:250::2:2";
pub const NODE: &str = "node-1";
/// Pods of the node besides A and B (a node holds about 110).
pub const LOCAL_PODS: usize = 108;

/// A small deterministic generator (no dependency, same cluster every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn asg_ep(ns: &str, name: &str) -> Endpoint {
    Endpoint::Asgs(vec![AsgRef {
        namespace: ns.into(),
        name: name.into(),
    }])
}

fn tag(t: &str) -> Endpoint {
    Endpoint::Prefixes(vec![AddressPrefix::Tag(t.into())])
}

/// `n` rules of one direction that never match the benchmark flow.
fn rules(seed: u64, n: usize, d: Direction) -> Vec<SecurityRule> {
    let mut g = Lcg(seed);
    let apps = ["web", "logic", "db"];
    (0..n)
        .map(|k| {
            let kind = g.below(8);
            let peer = match kind {
                // Addresses outside the cluster, IPv4 and IPv6.
                0..=2 => {
                    let net = if g.below(10) == 0 {
                        format!("fd00:99:{:x}::/64", g.below(65536))
                    } else if g.below(2) == 0 {
                        format!("10.{}.{}.0/24", g.below(200), g.below(256))
                    } else {
                        format!("172.{}.{}.{}", 16 + g.below(16), g.below(256), g.below(256))
                    };
                    Endpoint::Prefixes(vec![net.parse().unwrap()])
                }
                // Pods of other namespaces by ASG (A and B are members of none).
                3..=5 => asg_ep(
                    &format!("ns{}", g.below(NAMESPACES as u64)),
                    apps[g.below(3) as usize],
                ),
                6 => tag(if g.below(2) == 0 {
                    "Internet"
                } else {
                    "AzureLoadBalancer"
                }),
                // The cluster, but TCP only: the flow is UDP.
                _ => tag("VirtualNetwork"),
            };
            let protocol = if kind == 7 {
                Protocol::Tcp
            } else {
                [Protocol::Tcp, Protocol::Udp, Protocol::Any, Protocol::Icmp][g.below(4) as usize]
            };
            let dports = if protocol == Protocol::Icmp {
                "*".to_string()
            } else {
                let p = 1 + g.below(65000);
                let p = if p == FLOW_PORT as u64 { p + 1 } else { p };
                match g.below(3) {
                    0 => format!("{p}"),
                    1 => format!("{p}-{}", (p + g.below(100)).min(65535)),
                    _ => format!("{p},{}", 1 + g.below(1000)),
                }
            };
            // A few rules name an ASG of the node's own namespace on the local side, so pods
            // of the node fall into different stage variants (A and B are in none).
            let local = if g.below(10) == 0 {
                asg_ep("bench", apps[g.below(3) as usize])
            } else {
                Endpoint::any()
            };
            let (source, destination) = match d {
                Direction::Inbound => (peer, local),
                Direction::Outbound => (local, peer),
            };
            let access = if g.below(2) == 0 {
                Access::Allow
            } else {
                Access::Deny
            };
            let mut r = rule(
                &format!("r{k}"),
                100 + k as u32,
                d,
                access,
                protocol,
                source,
                destination,
                &dports,
            );
            if protocol != Protocol::Icmp && g.below(10) == 0 {
                let s = g.below(60000) as u16;
                r.source_ports = vec![PortRange::new(s, s + 100)];
            }
            r
        })
        .collect()
}

fn group(
    ns: &str,
    name: &str,
    subnet: bool,
    selector: Option<(&str, &str)>,
    rules: Vec<SecurityRule>,
) -> Nsg {
    Nsg {
        id: ObjectRef::new(ns, name),
        created: Some("2026-01-01T00:00:00Z".into()),
        generation: Some(1),
        subnet,
        pod_selector: selector.map(|(k, v)| LabelSelector {
            match_labels: BTreeMap::from([(k.to_string(), v.to_string())]),
            match_expressions: vec![],
        }),
        rules,
    }
}

/// The cluster; `user_rules: false` keeps its groups with the default rules only.
pub fn cluster(user_rules: bool) -> Inventory {
    let n = if user_rules { RULES_PER_STAGE } else { 0 };
    let mut subnet_rules = rules(1, n, Direction::Outbound);
    subnet_rules.extend(rules(2, n, Direction::Inbound));
    let nsgs = vec![
        group("bench", "bench-subnet", true, None, subnet_rules),
        group(
            "bench",
            "a-nic",
            false,
            Some(("name", "a")),
            rules(3, n, Direction::Outbound),
        ),
        group(
            "bench",
            "b-nic",
            false,
            Some(("name", "b")),
            rules(4, n, Direction::Inbound),
        ),
    ];
    let mut pods = Vec::new();
    let mut a = pod("bench", "a", "client", &[A, A6], NODE);
    a.labels.insert("name".into(), "a".into());
    let mut b = pod("bench", "b", "server", &[B, B6], NODE);
    b.labels.insert("name".into(), "b".into());
    pods.push(a);
    pods.push(b);
    let apps = ["web", "logic", "db"];
    for i in 0..LOCAL_PODS {
        pods.push(pod(
            "bench",
            &format!("local{i}"),
            apps[i % 3],
            &[&format!("10.250.3.{}", 10 + i)],
            NODE,
        ));
    }
    for i in 0..PODS - pods.len() {
        let ip = format!("10.250.{}.{}", 64 + i / 250, 1 + i % 250);
        let node = format!("node-{}", 2 + i % 50);
        // Every seventh pod is in no ASG.
        let app = if i % 7 == 0 {
            "batch"
        } else {
            apps[(i / NAMESPACES) % 3]
        };
        pods.push(pod(
            &format!("ns{}", i % NAMESPACES),
            &format!("p{i}"),
            app,
            &[&ip],
            &node,
        ));
    }
    let mut asgs = Vec::new();
    for ns in (0..NAMESPACES)
        .map(|i| format!("ns{i}"))
        .chain(["bench".to_string()])
    {
        for app in apps {
            asgs.push(asg(&ns, app, app));
        }
    }
    Inventory {
        nsgs,
        asgs,
        service_tags: vec![],
        pods,
        namespaces: vec![],
        virtual_network: vec![
            "10.250.0.0/16".parse().unwrap(),
            "fd00:250::/48".parse().unwrap(),
        ],
        node_ips: vec!["10.250.255.1".parse().unwrap()],
    }
}

/// The same cluster after one pod of another node, in no ASG so far, joins ns3/web, which
/// peers' rules name (a membership change the node sees). Returns its address too.
pub fn after_membership_change(mut inv: Inventory) -> (Inventory, String) {
    let p = inv
        .pods
        .iter_mut()
        .find(|p| p.id.namespace == "ns3" && p.labels["app"] == "batch")
        .expect("a pod of ns3 in no ASG");
    p.annotations.insert(ASG_ANNOTATION.into(), "web".into());
    let ip = p.ips[0].to_string();
    (inv, ip)
}

/// The cluster with one more pod on the compiled node, like `local0` (a web pod).
pub fn after_local_start(inv: &Inventory) -> Inventory {
    let mut inv = inv.clone();
    let mut started = inv
        .pods
        .iter()
        .find(|p| p.id.name == "local0")
        .expect("local0")
        .clone();
    started.id.name = "local-started".into();
    started.ips = vec!["10.250.3.200".parse().unwrap()];
    inv.pods.push(started);
    inv
}
