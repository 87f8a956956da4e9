//! Compiles a large interface-level group (1,000 augmented rules with up to 50 prefixes each,
//! 50 ASGs, both directions) plus a subnet-level group, for 5,000 dual-stack pods in 100
//! namespaces, and compares the output with a naive one-policy-per-rule translation.
//!
//! `cargo bench --bench netpol` (release). Deterministic: a fixed-seed generator.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};

use kube_nsg::model::*;
use kube_nsg::netpol::types::{
    IngressRule, IpBlock, NetworkPolicyPort, NetworkPolicySpec, ObjectMeta, Peer, PolicyType,
    Selector, SelectorRequirement,
};
use kube_nsg::netpol::{self, Mode, NetworkPolicy, asg_label_key};
use kube_nsg::resolve::Resolved;

/// SplitMix64: small, fixed-seed, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

// The allocator of the `kube-nsg` binary, so compiling costs here what it costs the controller.
#[global_allocator]
static ALLOCATOR: kube_nsg::Allocator = kube_nsg::Allocator;

const APPS: [&str; 5] = ["web", "api", "db", "cache", "worker"];
const NAMESPACES: usize = 100;
const PODS_PER_NS: usize = 50;
const ASG_NAMESPACES: usize = 10;
const RULES: usize = 1000;

fn ns(i: usize) -> String {
    format!("team-{i:03}")
}

/// A pool of public prefixes rules draw from, so that rules overlap as in real groups.
fn prefix_pool(rng: &mut Rng) -> Vec<IpNet> {
    (0..3000)
        .map(|_| {
            let len = [16u8, 20, 24, 24, 24, 28, 32, 32][rng.below(8)];
            let addr = Ipv4Addr::from(
                ((rng.below(200) as u32 + 20) << 24) | (rng.next() as u32 & 0x00ff_ffff),
            );
            IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc())
        })
        .collect()
}

fn port_ranges(rng: &mut Rng) -> Vec<PortRange> {
    if rng.chance(30) {
        return vec![PortRange::ALL];
    }
    let pool = [
        (80, 80),
        (443, 443),
        (8080, 8090),
        (5432, 5432),
        (6379, 6379),
        (9000, 9100),
        (53, 53),
        (1024, 65535),
        (22, 22),
        (3000, 3999),
    ];
    (0..1 + rng.below(4))
        .map(|_| pool[rng.below(pool.len())])
        .map(|(a, b)| PortRange::new(a, b))
        .collect()
}

/// A rule's far end: mostly prefix lists and ASGs; broad ends (tags, `*`) are `broad`.
fn endpoint(rng: &mut Rng, pool: &[IpNet], asgs: &[AsgRef]) -> (Endpoint, bool) {
    match rng.below(20) {
        0..=11 => (
            Endpoint::Prefixes(
                (0..1 + rng.below(50))
                    .map(|_| AddressPrefix::Net(pool[rng.below(pool.len())]))
                    .collect(),
            ),
            false,
        ),
        12..=16 => (
            Endpoint::Asgs(
                (0..1 + rng.below(3))
                    .map(|_| asgs[rng.below(asgs.len())].clone())
                    .collect(),
            ),
            false,
        ),
        17..=18 => (
            Endpoint::Prefixes(vec![AddressPrefix::Tag(
                [
                    "Internet",
                    "VirtualNetwork",
                    "AzureLoadBalancer",
                    "partners",
                ][rng.below(4)]
                .into(),
            )]),
            true,
        ),
        _ => (Endpoint::any(), true),
    }
}

/// A namespace-level group for namespace `n`: a few allows and denies, as a platform team
/// would give every namespace.
fn subnet_group(rng: &mut Rng, n: usize, pool: &[IpNet], asgs: &[AsgRef]) -> Nsg {
    let rules = (0..20)
        .map(|i| SecurityRule {
            name: format!("subnet-{i:02}"),
            description: None,
            priority: 100 + i * 10,
            direction: if i % 2 == 0 {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            access: if i % 5 == 0 {
                Access::Deny
            } else {
                Access::Allow
            },
            protocol: Protocol::Tcp,
            source: endpoint(rng, pool, asgs).0,
            source_ports: vec![PortRange::ALL],
            destination: Endpoint::any(),
            destination_ports: port_ranges(rng),
            is_default: false,
        })
        .collect();
    Nsg {
        id: ObjectRef::new(ns(n), format!("{}-subnet", ns(n))),
        created: Some("2026-01-01T00:00:00Z".into()),
        generation: Some(1),
        subnet: true,
        pod_selector: None,
        rules,
    }
}

fn inventory(every_namespace: bool) -> Inventory {
    let mut rng = Rng(0x006b_7562_656e_7367);
    let pool = prefix_pool(&mut rng);
    let mut pods = Vec::new();
    for n in 0..NAMESPACES {
        for k in 0..PODS_PER_NS {
            let i = n * PODS_PER_NS + k;
            let app = APPS[k % APPS.len()];
            pods.push(Pod {
                id: ObjectRef::new(ns(n), format!("{app}-{k}")),
                labels: BTreeMap::from([("app".to_string(), app.to_string())]),
                annotations: BTreeMap::new(),
                ips: vec![
                    IpAddr::V4(Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250 + 1) as u8)),
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, i as u16 + 1)),
                ],
                node_name: Some(format!("node-{}", i % 20)),
            });
        }
    }
    let mut asgs = Vec::new();
    for n in 0..ASG_NAMESPACES {
        for app in APPS {
            asgs.push(Asg {
                id: ObjectRef::new(ns(n), app),
                pod_selector: Some(LabelSelector {
                    match_labels: BTreeMap::from([("app".to_string(), app.to_string())]),
                    match_expressions: vec![],
                }),
            });
        }
    }
    let asg_refs: Vec<AsgRef> = asgs
        .iter()
        .map(|a| AsgRef {
            namespace: a.id.namespace.clone(),
            name: a.id.name.clone(),
        })
        .collect();
    let own: Vec<AsgRef> = asg_refs
        .iter()
        .filter(|a| a.namespace == ns(0))
        .cloned()
        .collect();
    let mut rules = Vec::new();
    for i in 0..RULES {
        let direction = if i % 2 == 0 {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let (peer, broad) = endpoint(&mut rng, &pool, &asg_refs);
        // The selected pods' side: usually any, sometimes one of the namespace's own ASGs.
        let this = if rng.chance(20) {
            Endpoint::Asgs(vec![own[rng.below(own.len())].clone()])
        } else {
            Endpoint::any()
        };
        let (source, destination) = match direction {
            Direction::Inbound => (peer, this),
            Direction::Outbound => (this, peer),
        };
        let protocol = [Protocol::Tcp, Protocol::Tcp, Protocol::Udp, Protocol::Any][rng.below(4)];
        rules.push(SecurityRule {
            name: format!("rule-{i:04}"),
            description: None,
            priority: 100 + (i / 2) as u32 * 7,
            direction,
            access: if rng.chance(30) {
                Access::Deny
            } else {
                Access::Allow
            },
            protocol,
            source,
            source_ports: vec![PortRange::ALL],
            destination,
            // Broad peers always name ports; specific ones sometimes allow everything.
            destination_ports: if !broad && protocol == Protocol::Any && rng.chance(50) {
                vec![PortRange::ALL]
            } else {
                loop {
                    let p = port_ranges(&mut rng);
                    if !(broad && p.iter().any(|r| r.is_all() || r.last - r.first > 10000)) {
                        break p;
                    }
                }
            },
            is_default: false,
        });
    }
    let nic = Nsg {
        id: ObjectRef::new(ns(0), "frontend"),
        created: Some("2026-01-01T00:00:00Z".into()),
        generation: Some(1),
        subnet: false,
        pod_selector: Some(LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![Requirement {
                key: "app".into(),
                operator: Operator::In,
                values: vec!["web".into(), "api".into()],
            }],
        }),
        rules,
    };
    let mut nsgs = vec![nic];
    for n in 0..if every_namespace { NAMESPACES } else { 1 } {
        nsgs.push(subnet_group(&mut rng, n, &pool, &asg_refs));
    }
    Inventory {
        nsgs,
        asgs,
        service_tags: vec![ServiceTag {
            name: "partners".into(),
            prefixes: pool[..40].to_vec(),
        }],
        pods,
        namespaces: (0..NAMESPACES)
            .map(|n| Namespace {
                name: ns(n),
                labels: BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns(n))]),
            })
            .collect(),
        virtual_network: vec![
            "10.244.0.0/16".parse().unwrap(),
            "10.96.0.0/12".parse().unwrap(),
            "fd00:10:244::/64".parse().unwrap(),
        ],
        node_ips: (0..20)
            .map(|i| IpAddr::V4(Ipv4Addr::new(172, 18, 0, i + 2)))
            .collect(),
    }
}

/// One policy per allow rule of each bound group (what a translator that ignores order, denies
/// and stages would write): selecting the group's pods, the rule's peers as ipBlocks (tags
/// expanded) and ASG selectors, its ports. Wrong, and only here for size.
fn naive(res: &Resolved) -> Vec<NetworkPolicy> {
    let mut out = Vec::new();
    for nsg in &res.inv.nsgs {
        for direction in [Direction::Inbound, Direction::Outbound] {
            for rule in nsg
                .rules_for(direction)
                .iter()
                .filter(|r| r.access == Access::Allow)
            {
                let peer_end = if direction == Direction::Inbound {
                    &rule.source
                } else {
                    &rule.destination
                };
                let peers: Vec<Peer> = match peer_end {
                    Endpoint::Prefixes(p) => p
                        .iter()
                        .filter_map(|p| res.prefix_set(p))
                        .flat_map(|s| s.to_cidrs())
                        .map(|c| Peer {
                            ip_block: Some(IpBlock {
                                cidr: c.to_string(),
                                except: vec![],
                            }),
                            ..Peer::default()
                        })
                        .collect(),
                    Endpoint::Asgs(a) => a
                        .iter()
                        .map(|a| Peer {
                            pod_selector: Some(Selector {
                                match_labels: BTreeMap::new(),
                                match_expressions: vec![SelectorRequirement::exists(
                                    asg_label_key(&a.name),
                                    true,
                                )],
                            }),
                            namespace_selector: Some(Selector {
                                match_labels: BTreeMap::from([(
                                    "kubernetes.io/metadata.name".into(),
                                    a.namespace.clone(),
                                )]),
                                match_expressions: vec![],
                            }),
                            ip_block: None,
                        })
                        .collect(),
                };
                let ports: Vec<NetworkPolicyPort> = rule
                    .destination_ports
                    .iter()
                    .filter(|p| !p.is_all())
                    .flat_map(|p| {
                        ["TCP", "UDP"]
                            .into_iter()
                            .filter(|proto| rule.protocol.covers(Protocol::parse(proto).unwrap()))
                            .map(|proto| NetworkPolicyPort {
                                protocol: proto.into(),
                                port: Some(p.first.max(1)),
                                end_port: (p.last > p.first).then_some(p.last),
                            })
                    })
                    .collect();
                let spec_rule = IngressRule { ports, from: peers };
                out.push(NetworkPolicy {
                    api_version: "networking.k8s.io/v1".into(),
                    kind: "NetworkPolicy".into(),
                    metadata: ObjectMeta {
                        name: format!("{}-{}", nsg.id.name, rule.name.to_lowercase()),
                        namespace: nsg.id.namespace.clone(),
                        ..ObjectMeta::default()
                    },
                    spec: NetworkPolicySpec {
                        pod_selector: Selector::default(),
                        policy_types: vec![if direction == Direction::Inbound {
                            PolicyType::Ingress
                        } else {
                            PolicyType::Egress
                        }],
                        ingress: vec![spec_rule],
                        egress: vec![],
                    },
                });
            }
        }
    }
    out
}

fn bytes(policies: &[NetworkPolicy]) -> usize {
    policies
        .iter()
        .map(|p| serde_json::to_vec(p).unwrap().len())
        .sum()
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..runs {
        let start = Instant::now();
        let v = f();
        best = best.min(start.elapsed());
        out = Some(v);
    }
    (best, out.unwrap())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    println!("== the issue's case: one 1,000-rule interface group and its namespace's group");
    run(&inventory(false), true);
    println!("\n== the same, and a 20-rule group in each of the 100 namespaces");
    run(&inventory(true), false);
}

fn run(inv: &Inventory, analyze: bool) {
    let prefixes: usize = inv.nsgs[0]
        .rules
        .iter()
        .map(|r| {
            [&r.source, &r.destination]
                .iter()
                .map(|e| {
                    if let Endpoint::Prefixes(p) = e {
                        p.len()
                    } else {
                        0
                    }
                })
                .sum::<usize>()
        })
        .sum();
    println!(
        "input: {} rules in {} (+{} groups of {} rules), {prefixes} prefixes, {} ASGs, {} pods in {} namespaces",
        inv.nsgs[0].rules.len(),
        inv.nsgs[0].id,
        inv.nsgs.len() - 1,
        inv.nsgs[1].rules.len(),
        inv.asgs.len(),
        inv.pods.len(),
        inv.namespaces.len()
    );
    let (resolve_time, res) = time(3, || Resolved::new(inv));
    println!("resolve: {:.1} ms", resolve_time.as_secs_f64() * 1e3);
    let naive = naive(&res);
    let (naive_n, naive_b) = (naive.len(), bytes(&naive));
    println!("naive one-policy-per-allow-rule: {naive_n} policies, {naive_b} bytes");
    for mode in [Mode::Strict, Mode::Permissive] {
        let (t, compiled) = time(3, || netpol::compile(&res, mode));
        let (n, b) = (compiled.policies.len(), bytes(&compiled.policies));
        let largest = compiled
            .policies
            .iter()
            .map(|p| serde_json::to_vec(p).unwrap().len())
            .max()
            .unwrap_or(0);
        let inexact = compiled
            .report
            .iter()
            .filter(|r| !r.fidelity.is_exact())
            .count();
        println!(
            "{mode}: compile {:.1} ms; {n} policies, {b} bytes (largest {largest}); vs naive: {:.3} objects, {:.3} bytes; {inexact}/{} rules not exact",
            t.as_secs_f64() * 1e3,
            n as f64 / naive_n as f64,
            b as f64 / naive_b as f64,
            compiled.report.len()
        );
        // Reported, not asserted: time depends on the machine and its load.
        let met = if t < Duration::from_secs(1) {
            "met"
        } else {
            "MISSED"
        };
        println!("{mode}: target compile under 1 s: {met}");
        assert!(
            n < naive_n,
            "target: fewer objects than the naive translation"
        );
    }
    if analyze {
        let (t, anomalies) = time(1, || kube_nsg::analyze::analyze(&res, 0));
        let count = |k| anomalies.iter().filter(|a| a.kind == k).count();
        use kube_nsg::analyze::AnomalyKind::*;
        println!(
            "analyze {}: {:.1} ms; {} shadowed, {} redundant, {} correlated",
            inv.nsgs[0].id,
            t.as_secs_f64() * 1e3,
            count(Shadowed),
            count(Redundant),
            count(Correlated)
        );
    }
}
