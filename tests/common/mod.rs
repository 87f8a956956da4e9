//! Random clusters and flows for property tests: small pools of addresses, labels, ports and
//! names, so random rules and random packets meet often.
#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::select;

use kube_nsg::eval::Packet;
use kube_nsg::model::*;

pub const NAMESPACES: [&str; 3] = ["a", "b", "c"];
pub const ASG_NAMES: [&str; 3] = ["web", "logic", "db"];
pub const NODE_IP: &str = "172.18.0.2";
pub const VIRTUAL_NETWORK: [&str; 2] = ["10.244.0.0/16", "fd00:10:244::/64"];
/// Addresses pods may have: IPv4 and IPv6, all inside `VIRTUAL_NETWORK`.
pub const POD_IPS: [&str; 10] = [
    "10.244.0.10",
    "10.244.0.11",
    "10.244.0.12",
    "10.244.0.13",
    "10.244.1.10",
    "10.244.1.11",
    "fd00:10:244::10",
    "fd00:10:244::11",
    "fd00:10:244::12",
    "fd00:10:244::13",
];
/// Addresses outside the pods: the node, the Internet, a service tag's range.
pub const OTHER_IPS: [&str; 6] = [
    "172.18.0.2",
    "8.8.8.8",
    "192.0.2.7",
    "198.51.100.1",
    "2001:db8::1",
    "10.96.0.10",
];
pub const PORTS: [u16; 7] = [22, 53, 80, 443, 1500, 8085, 33000];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        select(vec!["web", "db", "api"]),
        prop::option::of(select(vec!["x", "y"])),
    )
        .prop_map(|(app, tier)| {
            let mut l = BTreeMap::from([("app".to_string(), app.to_string())]);
            if let Some(t) = tier {
                l.insert("tier".into(), t.into());
            }
            l
        })
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        select(vec!["web", "db", "api"]).prop_map(|app| LabelSelector {
            match_labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            match_expressions: vec![],
        }),
        (select(vec![
            Operator::Exists,
            Operator::DoesNotExist,
            Operator::In,
            Operator::NotIn
        ]))
        .prop_map(|operator| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![Requirement {
                key: "tier".into(),
                operator,
                values: match operator {
                    Operator::In | Operator::NotIn => vec!["x".into()],
                    _ => vec![],
                },
            }],
        }),
    ]
}

fn prefix() -> impl Strategy<Value = AddressPrefix> {
    let nets = vec![
        "10.244.0.0/24",
        "10.244.0.10/31",
        "10.244.0.12/32",
        "10.244.1.0/24",
        "10.0.0.0/8",
        "8.8.8.0/24",
        "192.0.2.0/24",
        "fd00:10:244::/124",
        "fd00:10:244::12/127",
        "2001:db8::/32",
        "172.18.0.0/16",
    ];
    prop_oneof![
        1 => Just(AddressPrefix::Any),
        4 => select(nets).prop_map(|n| AddressPrefix::Net(n.parse().unwrap())),
        3 => select(vec!["VirtualNetwork", "Internet", "AzureLoadBalancer", "corp", "missing"])
            .prop_map(|t| AddressPrefix::Tag(t.to_string())),
    ]
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        3 => prop::collection::vec(prefix(), 1..3).prop_map(Endpoint::Prefixes),
        2 => prop::collection::vec(
            (select(NAMESPACES.to_vec()), select(ASG_NAMES.to_vec()))
                .prop_map(|(ns, n)| AsgRef { namespace: ns.into(), name: n.into() }),
            1..3
        ).prop_map(Endpoint::Asgs),
    ]
}

fn ports() -> impl Strategy<Value = Vec<PortRange>> {
    let ranges = vec![
        PortRange::ALL,
        PortRange::new(80, 80),
        PortRange::new(443, 443),
        PortRange::new(53, 53),
        PortRange::new(1000, 2000),
        PortRange::new(8080, 8090),
        PortRange::new(0, 1023),
    ];
    prop_oneof![
        2 => Just(vec![PortRange::ALL]),
        3 => prop::collection::vec(select(ranges), 1..3),
    ]
}

pub fn rule() -> impl Strategy<Value = SecurityRule> {
    (
        select(vec![Direction::Inbound, Direction::Outbound]),
        select(vec![Access::Allow, Access::Deny]),
        select(vec![
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Icmp,
            Protocol::Any,
        ]),
        endpoint(),
        prop_oneof![4 => Just(vec![PortRange::ALL]), 1 => ports()],
        endpoint(),
        ports(),
    )
        .prop_map(
            |(direction, access, protocol, source, sp, destination, dp)| {
                let icmp = protocol == Protocol::Icmp;
                SecurityRule {
                    name: String::new(),
                    description: None,
                    priority: 0,
                    direction,
                    access,
                    protocol,
                    source,
                    source_ports: if icmp { vec![PortRange::ALL] } else { sp },
                    destination,
                    destination_ports: if icmp { vec![PortRange::ALL] } else { dp },
                    is_default: false,
                }
            },
        )
}

/// Gives rules distinct names and distinct priorities (in list order), as validation requires.
pub fn number_rules(rules: &mut [SecurityRule], priorities: &[u32]) {
    for (i, r) in rules.iter_mut().enumerate() {
        r.name = format!("r{i}");
        r.priority = priorities[i];
    }
}

fn nsg(index: usize) -> impl Strategy<Value = Nsg> {
    (
        select(NAMESPACES.to_vec()),
        any::<bool>(),
        prop::option::of(selector()),
        prop::collection::vec(rule(), 0..7),
        prop::collection::btree_set(100u32..130, 7),
    )
        .prop_map(move |(ns, subnet, pod_selector, mut rules, prios)| {
            let prios: Vec<u32> = prios.into_iter().collect();
            number_rules(&mut rules, &prios);
            Nsg {
                id: ObjectRef::new(ns, format!("nsg{index}")),
                created: Some(format!("2026-01-01T00:00:0{index}Z")),
                generation: Some(1),
                subnet,
                pod_selector,
                rules,
            }
        })
}

fn pods() -> impl Strategy<Value = Vec<Pod>> {
    prop::collection::vec(
        (
            select(NAMESPACES.to_vec()),
            labels(),
            prop::option::of(select(vec!["web", "db", "web,logic"])),
            any::<bool>(),
        ),
        1..8,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (ns, labels, asgs, dual))| {
                let mut ips = vec![ip(POD_IPS[i % 6])];
                if dual && i < 4 {
                    ips.push(ip(POD_IPS[6 + i]));
                }
                Pod {
                    id: ObjectRef::new(ns, format!("pod{i}")),
                    labels,
                    annotations: asgs
                        .map(|a| BTreeMap::from([(ASG_ANNOTATION.to_string(), a.to_string())]))
                        .unwrap_or_default(),
                    ips,
                    node_name: Some("node-1".into()),
                }
            })
            .collect()
    })
}

fn asgs() -> impl Strategy<Value = Vec<Asg>> {
    prop::collection::vec(
        (
            select(NAMESPACES.to_vec()),
            select(ASG_NAMES.to_vec()),
            prop::option::of(selector()),
        ),
        0..5,
    )
    .prop_map(|v| {
        let mut seen = std::collections::BTreeSet::new();
        v.into_iter()
            .filter(|(ns, n, _)| seen.insert((*ns, *n)))
            .map(|(ns, n, pod_selector)| Asg {
                id: ObjectRef::new(ns, n),
                pod_selector,
            })
            .collect()
    })
}

pub fn inventory() -> impl Strategy<Value = Inventory> {
    (
        pods(),
        asgs(),
        (0usize..5).prop_flat_map(|n| (0..n).map(nsg).collect::<Vec<_>>()),
        any::<bool>(),
    )
        .prop_map(|(pods, asgs, nsgs, with_tag)| Inventory {
            nsgs,
            asgs,
            service_tags: if with_tag {
                vec![ServiceTag {
                    name: "corp".into(),
                    prefixes: vec![
                        "192.0.2.0/25".parse().unwrap(),
                        "2001:db8::/48".parse().unwrap(),
                    ],
                }]
            } else {
                vec![]
            },
            pods,
            namespaces: NAMESPACES.iter().copied().map(Namespace::named).collect(),
            virtual_network: VIRTUAL_NETWORK
                .iter()
                .map(|n| n.parse::<IpNet>().unwrap())
                .collect(),
            node_ips: vec![ip(NODE_IP)],
        })
}

/// A first packet between two addresses of the pools, of one family.
pub fn packet() -> impl Strategy<Value = Packet> {
    let all: Vec<&str> = POD_IPS.iter().chain(OTHER_IPS.iter()).copied().collect();
    (
        select(all.clone()),
        select(all),
        select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp]),
        prop_oneof![3 => Just(40000u16), 1 => select(PORTS.to_vec())],
        select(PORTS.to_vec()),
    )
        .prop_filter("one address family, two ends", |(s, d, ..)| {
            s != d && ip(s).is_ipv4() == ip(d).is_ipv4()
        })
        .prop_map(|(s, d, protocol, sp, dp)| Packet {
            protocol,
            src: ip(s),
            src_port: sp,
            dst: ip(d),
            dst_port: dp,
        })
}

/// A group with random rules (the generator `inventory` uses), for callers that build their own.
pub fn group(index: usize) -> impl Strategy<Value = Nsg> {
    nsg(index)
}

/// Like `inventory`, but most namespaces also get a subnet-level group of random rules (younger
/// than the others, so it loses any conflict), so that most flows meet rules at both ends, and
/// half the groups end (before the defaults) with a broad deny, so that allow rules decide.
pub fn dense_inventory() -> impl Strategy<Value = Inventory> {
    let subnet_rules = || prop::option::weighted(0.8, prop::collection::vec(rule(), 0..7));
    let closing = prop::option::of((
        select(vec![Direction::Inbound, Direction::Outbound]),
        select(vec![
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Icmp,
            Protocol::Any,
        ]),
    ));
    (
        inventory(),
        [subnet_rules(), subnet_rules(), subnet_rules()],
        prop::collection::btree_set(100u32..130, 7),
        prop::collection::vec(closing, 8),
    )
        .prop_map(|(mut inv, per_ns, prios, closing)| {
            let prios: Vec<u32> = prios.into_iter().collect();
            for (ns, rules) in NAMESPACES.iter().zip(per_ns) {
                if let Some(mut rules) = rules {
                    number_rules(&mut rules, &prios);
                    inv.nsgs.push(Nsg {
                        id: ObjectRef::new(*ns, format!("subnet-{ns}")),
                        created: Some("2026-01-02T00:00:00Z".into()),
                        generation: Some(1),
                        subnet: true,
                        pod_selector: None,
                        rules,
                    });
                }
            }
            for (nsg, close) in inv.nsgs.iter_mut().zip(closing) {
                if let Some((direction, protocol)) = close {
                    nsg.rules.push(SecurityRule {
                        name: "deny-rest".into(),
                        description: None,
                        priority: 4096,
                        direction,
                        access: Access::Deny,
                        protocol,
                        source: Endpoint::any(),
                        source_ports: vec![PortRange::ALL],
                        destination: Endpoint::any(),
                        destination_ports: vec![PortRange::ALL],
                        is_default: false,
                    });
                }
            }
            inv
        })
}

/// A first packet, between two pod addresses three times out of four, from a well-known
/// source port as often as from an ephemeral one.
pub fn pod_packet() -> impl Strategy<Value = Packet> {
    let between_pods = (
        select(POD_IPS.to_vec()),
        select(POD_IPS.to_vec()),
        select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp]),
        prop_oneof![1 => Just(40000u16), 1 => select(PORTS.to_vec())],
        select(PORTS.to_vec()),
    )
        .prop_filter("one address family, two ends", |(s, d, ..)| {
            s != d && ip(s).is_ipv4() == ip(d).is_ipv4()
        })
        .prop_map(|(s, d, protocol, sp, dp)| Packet {
            protocol,
            src: ip(s),
            src_port: sp,
            dst: ip(d),
            dst_port: dp,
        });
    prop_oneof![3 => between_pods, 1 => packet()]
}

fn busy_endpoint() -> impl Strategy<Value = Endpoint> {
    let nets = vec![
        "10.244.0.0/24",
        "10.244.0.10/31",
        "10.244.1.0/24",
        "fd00:10:244::/124",
        "fd00:10:244::12/127",
        "8.8.8.0/24",
        "2001:db8::/32",
    ];
    prop_oneof![
        2 => Just(Endpoint::any()),
        2 => select(vec!["VirtualNetwork", "Internet", "AzureLoadBalancer", "corp"])
            .prop_map(|t| Endpoint::Prefixes(vec![AddressPrefix::Tag(t.to_string())])),
        2 => prop::collection::vec(select(nets).prop_map(|n| AddressPrefix::Net(n.parse().unwrap())), 1..3)
            .prop_map(Endpoint::Prefixes),
        3 => prop::collection::vec(
            (select(NAMESPACES.to_vec()), select(ASG_NAMES.to_vec()))
                .prop_map(|(ns, n)| AsgRef { namespace: ns.into(), name: n.into() }),
            1..3
        ).prop_map(Endpoint::Asgs),
    ]
}

/// Like `rule`, but with broad endpoints that match often and source ports restricted as
/// often as not.
pub fn busy_rule() -> impl Strategy<Value = SecurityRule> {
    (rule(), busy_endpoint(), busy_endpoint(), ports()).prop_map(|(mut r, src, dst, sp)| {
        r.source = src;
        r.destination = dst;
        if r.protocol != Protocol::Icmp {
            r.source_ports = sp;
        }
        r
    })
}

fn busy_nsg(index: usize) -> impl Strategy<Value = Nsg> {
    (
        select(NAMESPACES.to_vec()),
        prop::bool::weighted(0.7),
        prop::option::weighted(0.5, selector()),
        prop::collection::vec(prop_oneof![1 => rule(), 3 => busy_rule()], 2..12),
        prop::sample::subsequence((100u32..140).collect::<Vec<_>>(), 12),
    )
        .prop_map(move |(ns, subnet, pod_selector, mut rules, prios)| {
            number_rules(&mut rules, &prios);
            Nsg {
                id: ObjectRef::new(ns, format!("nsg{index}")),
                created: Some(format!("2026-01-01T00:00:0{index}Z")),
                generation: Some(1),
                subnet,
                pod_selector,
                rules,
            }
        })
}

/// Like `inventory`, but denser: every ASG exists, most namespaces have groups with many
/// broad rules, so that user rules (not only the defaults) decide many flows.
pub fn busy_inventory() -> impl Strategy<Value = Inventory> {
    let all_asgs = prop::collection::vec(prop::option::of(selector()), 9).prop_map(|sels| {
        let names = NAMESPACES
            .iter()
            .flat_map(|ns| ASG_NAMES.iter().map(move |n| (*ns, *n)));
        names
            .zip(sels)
            .map(|((ns, n), pod_selector)| Asg {
                id: ObjectRef::new(ns, n),
                pod_selector,
            })
            .collect::<Vec<_>>()
    });
    (
        inventory(),
        all_asgs,
        (2usize..6).prop_flat_map(|n| (0..n).map(busy_nsg).collect::<Vec<_>>()),
    )
        .prop_map(|(mut inv, asgs, nsgs)| {
            inv.asgs = asgs;
            inv.nsgs = nsgs;
            inv
        })
}

/// An inventory and a first packet whose ends are mostly its pods' addresses, with ports
/// from the rules' pool.
pub fn busy_case() -> impl Strategy<Value = (Inventory, Packet)> {
    busy_inventory().prop_flat_map(|inv| {
        let pod_ips: Vec<IpAddr> = inv.pods.iter().flat_map(|p| p.ips.clone()).collect();
        let others: Vec<IpAddr> = OTHER_IPS.iter().map(|s| ip(s)).collect();
        let end = prop_oneof![3 => select(pod_ips), 1 => select(others)];
        (
            Just(inv),
            end.clone(),
            end,
            select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp]),
            prop_oneof![1 => Just(40000u16), 2 => select(PORTS.to_vec()), 1 => 0u16..2100],
            prop_oneof![3 => select(PORTS.to_vec()), 1 => 0u16..2100],
        )
            .prop_map(|(inv, src, mut dst, protocol, src_port, dst_port)| {
                // Two distinct ends of one family, without rejecting cases.
                if src.is_ipv4() != dst.is_ipv4() || src == dst {
                    let other = if src.is_ipv4() {
                        ["8.8.8.8", "192.0.2.7"]
                    } else {
                        ["2001:db8::1", "fd00:10:244::13"]
                    };
                    dst = ip(if ip(other[0]) == src {
                        other[1]
                    } else {
                        other[0]
                    });
                }
                (
                    inv,
                    Packet {
                        protocol,
                        src,
                        src_port,
                        dst,
                        dst_port,
                    },
                )
            })
    })
}
