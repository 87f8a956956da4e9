//! An independent NetworkPolicy evaluator, written from the upstream semantics
//! (kubernetes.io/docs/concepts/services-networking/network-policies and the
//! networking.k8s.io/v1 API reference), reading policies as the JSON the API server would
//! receive. It shares no code with the compiler.
//!
//! - A pod is isolated for ingress (egress) when some policy of its namespace selects it with
//!   `Ingress` (`Egress`) among its policy types (absent types: `Ingress`, plus `Egress` when
//!   the policy has an `egress` section). An isolated pod accepts (sends) only what at least
//!   one rule of those policies allows; a connection needs the source's egress and the
//!   destination's ingress.
//! - A rule matches when its `ports` and its peers (`from` / `to`) both match; an empty or
//!   absent list matches everything.
//! - A peer with selectors matches pods: `namespaceSelector` picks namespaces by their labels
//!   (absent: the policy's own namespace), `podSelector` pods in them (absent: all). A peer
//!   with `ipBlock` matches addresses in `cidr` and in no `except`.
//! - A port entry matches its protocol (absent: TCP) and its port, or `port..=endPort`; an
//!   entry without a port matches every port of the protocol.
//!
//! Where upstream leaves behaviour to the network plugin, [`Behaviour`] chooses.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use kube_nsg::eval::Packet;
use kube_nsg::model::Protocol;

#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    /// Whether an ipBlock matches addresses that belong to pods ("implementation-defined").
    pub ipblock_matches_pods: bool,
    /// Whether a rule without ports lets ICMP through (plugins commonly do; upstream only
    /// defines TCP, UDP and SCTP).
    pub portless_matches_icmp: bool,
    /// Whether traffic between a pod and a node address always passes ("traffic to and from
    /// the node where a Pod is running is always allowed"; every test pod runs on the node).
    pub node_traffic_allowed: bool,
}

impl Behaviour {
    pub fn all() -> Vec<Behaviour> {
        let mut out = Vec::new();
        for a in [false, true] {
            for b in [false, true] {
                for c in [false, true] {
                    out.push(Behaviour {
                        ipblock_matches_pods: a,
                        portless_matches_icmp: b,
                        node_traffic_allowed: c,
                    });
                }
            }
        }
        out
    }
}

pub struct NpPod {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
}

pub struct Cluster {
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: Vec<NpPod>,
    pub node_ips: Vec<IpAddr>,
}

impl Cluster {
    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        // The API server labels every namespace with its name.
        let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.into());
        labels
    }

    /// The pod an address belongs to: the first that lists it.
    fn owner(&self, ip: IpAddr) -> Option<&NpPod> {
        self.pods.iter().find(|p| p.ips.contains(&ip))
    }
}

fn str_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// `metav1.LabelSelector` semantics: every term must hold; `{}` matches everything.
pub fn selector_matches(sel: &Value, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = str_map(sel.get("matchLabels"));
    if !match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
        return false;
    }
    let exprs = sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    exprs.iter().all(|e| {
        let key = e["key"].as_str().expect("key");
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .map(|v| v.iter().map(|x| x.as_str().expect("value")).collect())
            .unwrap_or_default();
        let value = labels.get(key).map(String::as_str);
        match e["operator"].as_str().expect("operator") {
            "In" => value.is_some_and(|v| values.contains(&v)),
            "NotIn" => value.is_none_or(|v| !values.contains(&v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("unknown operator {other}"),
        }
    })
}

fn ports_match(rule: &Value, packet: &Packet, b: Behaviour) -> bool {
    let ports = rule
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() {
        return packet.protocol != Protocol::Icmp || b.portless_matches_icmp;
    }
    let proto = match packet.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        _ => return false,
    };
    ports.iter().any(|p| {
        let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        if protocol != proto {
            return false;
        }
        match p.get("port") {
            None => true,
            Some(Value::Number(n)) => {
                let first = n.as_u64().expect("port") as u16;
                let last = p
                    .get("endPort")
                    .and_then(Value::as_u64)
                    .map_or(first, |e| e as u16);
                (first..=last).contains(&packet.dst_port)
            }
            Some(other) => panic!("named ports are never generated: {other}"),
        }
    })
}

fn peer_matches(
    peer: &Value,
    policy_ns: &str,
    ip: IpAddr,
    cluster: &Cluster,
    b: Behaviour,
) -> bool {
    if let Some(block) = peer.get("ipBlock") {
        if cluster.owner(ip).is_some() && !b.ipblock_matches_pods {
            return false;
        }
        let cidr: IpNet = block["cidr"]
            .as_str()
            .expect("cidr")
            .parse()
            .expect("valid cidr");
        let excepts: Vec<IpNet> = block
            .get("except")
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .map(|e| e.as_str().expect("cidr").parse().expect("valid except"))
                    .collect()
            })
            .unwrap_or_default();
        return cidr.contains(&ip) && !excepts.iter().any(|e| e.contains(&ip));
    }
    let Some(pod) = cluster.owner(ip) else {
        return false;
    };
    let ns_ok = match peer.get("namespaceSelector") {
        None => pod.namespace == policy_ns,
        Some(sel) => selector_matches(sel, &cluster.namespace_labels(&pod.namespace)),
    };
    ns_ok
        && peer
            .get("podSelector")
            .is_none_or(|sel| selector_matches(sel, &pod.labels))
}

fn policy_types(policy: &Value) -> Vec<String> {
    match policy["spec"].get("policyTypes").and_then(Value::as_array) {
        Some(t) => t
            .iter()
            .map(|x| x.as_str().expect("type").to_string())
            .collect(),
        None => {
            let mut t = vec!["Ingress".to_string()];
            if policy["spec"].get("egress").is_some() {
                t.push("Egress".into());
            }
            t
        }
    }
}

/// Whether `pod` may send (`egress`) or receive (`!egress`) the packet, `peer` being the other end.
fn side_allows(
    policies: &[Value],
    cluster: &Cluster,
    pod: &NpPod,
    egress: bool,
    peer: IpAddr,
    packet: &Packet,
    b: Behaviour,
) -> bool {
    if b.node_traffic_allowed && cluster.node_ips.contains(&peer) {
        return true;
    }
    let (kind, section, peers_key) = if egress {
        ("Egress", "egress", "to")
    } else {
        ("Ingress", "ingress", "from")
    };
    let selecting: Vec<&Value> = policies
        .iter()
        .filter(|p| p["metadata"]["namespace"].as_str() == Some(pod.namespace.as_str()))
        .filter(|p| policy_types(p).iter().any(|t| t == kind))
        .filter(|p| selector_matches(&p["spec"]["podSelector"], &pod.labels))
        .collect();
    if selecting.is_empty() {
        return true;
    }
    selecting.iter().any(|p| {
        let ns = p["metadata"]["namespace"].as_str().expect("namespace");
        let rules = p["spec"]
            .get(section)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        rules.iter().any(|rule| {
            let peers = rule
                .get(peers_key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            ports_match(rule, packet, b)
                && (peers.is_empty() || peers.iter().any(|x| peer_matches(x, ns, peer, cluster, b)))
        })
    })
}

/// Whether the policies let a new connection through.
pub fn allows(policies: &[Value], cluster: &Cluster, packet: &Packet, b: Behaviour) -> bool {
    let out = cluster
        .owner(packet.src)
        .is_none_or(|pod| side_allows(policies, cluster, pod, true, packet.dst, packet, b));
    out && cluster
        .owner(packet.dst)
        .is_none_or(|pod| side_allows(policies, cluster, pod, false, packet.src, packet, b))
}
