//! Cutting a NetworkPolicy too large to store into parts that allow exactly the same.
//!
//! The API server takes at most 3 MiB per request and etcd stores at most 1.5 MiB per object;
//! the largest groups compile to policies past both. NetworkPolicies are additive: a pod
//! selected by several is isolated in each direction any of them names, and allowed the union
//! of their rules. So a policy can be cut into parts with its pod selector and policy types,
//! each holding some of its rules. A rule allows its ports × its peers, which is the union of
//! its ports × each chunk of its peers (and of each chunk of its ports × its peers), so a rule
//! too large for one part is cut the same way. Only a single peer with a single port (one
//! `ipBlock` and its `except` list) cannot be cut; it gets a part of its own.

use serde::Serialize;

use crate::json_len;

use super::types::{
    EgressRule, IngressRule, NetworkPolicy, NetworkPolicyPort, NetworkPolicySpec, ObjectMeta, Peer,
};

/// The largest policy the compiler emits, as JSON: a third of the API server's request limit,
/// and below etcd's object limit (NetworkPolicies are stored as protobuf, smaller than JSON).
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// The frame of a rule around its two lists (`"to"` is shorter than `"from"`).
const RULE_FRAME: usize = r#"{"ports":,"from":}"#.len();
/// What two non-empty rule lists add to a spec that has neither.
const RULE_LISTS: usize = r#","ingress":[],"egress":[]"#.len();

/// `policy` itself when its JSON takes at most `max_bytes`; else parts that each do (but for a
/// part holding one rule of one peer and one port), in rule order. The first part keeps the
/// policy's name, the others add `-2`, `-3`, ...
pub fn split(policy: NetworkPolicy, max_bytes: usize) -> Vec<NetworkPolicy> {
    if json_len(&policy) <= max_bytes {
        return vec![policy];
    }
    let NetworkPolicy {
        api_version,
        kind,
        metadata,
        spec,
    } = policy;
    let NetworkPolicySpec {
        pod_selector,
        policy_types,
        ingress,
        egress,
    } = spec;
    let part = |n: usize, ingress, egress| NetworkPolicy {
        api_version: api_version.clone(),
        kind: kind.clone(),
        metadata: ObjectMeta {
            name: match n {
                0 => metadata.name.clone(),
                n => format!("{}-{}", metadata.name, n + 1),
            },
            ..metadata.clone()
        },
        spec: NetworkPolicySpec {
            pod_selector: pod_selector.clone(),
            policy_types: policy_types.clone(),
            ingress,
            egress,
        },
    };
    // What a part without rules takes, with the longest name a part can have.
    let frame = json_len(&part(usize::MAX - 1, vec![], vec![])) + RULE_LISTS;
    let room = max_bytes.saturating_sub(frame);
    let mut parts = vec![Part::default()];
    for (rule, len) in cut(ingress, room) {
        place(&mut parts, len, room).ingress.push(rule);
    }
    for (rule, len) in cut(egress, room) {
        place(&mut parts, len, room).egress.push(rule);
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(n, p)| part(n, p.ingress, p.egress))
        .collect()
}

#[derive(Default)]
struct Part {
    ingress: Vec<IngressRule>,
    egress: Vec<EgressRule>,
    /// Bytes its rules take, with a comma after each.
    used: usize,
}

/// The part a rule of `len` bytes goes into: the last one, or a new one when it is full.
fn place(parts: &mut Vec<Part>, len: usize, room: usize) -> &mut Part {
    let last = parts.last().expect("at least one part");
    if last.used > 0 && last.used + len > room {
        parts.push(Part::default());
    }
    let part = parts.last_mut().expect("at least one part");
    part.used += len;
    part
}

/// Ingress and egress rules alike: ports and peers.
trait Rule: Serialize + Sized {
    fn into_lists(self) -> (Vec<NetworkPolicyPort>, Vec<Peer>);
    fn from_lists(ports: Vec<NetworkPolicyPort>, peers: Vec<Peer>) -> Self;
}

impl Rule for IngressRule {
    fn into_lists(self) -> (Vec<NetworkPolicyPort>, Vec<Peer>) {
        (self.ports, self.from)
    }
    fn from_lists(ports: Vec<NetworkPolicyPort>, from: Vec<Peer>) -> Self {
        IngressRule { ports, from }
    }
}

impl Rule for EgressRule {
    fn into_lists(self) -> (Vec<NetworkPolicyPort>, Vec<Peer>) {
        (self.ports, self.to)
    }
    fn from_lists(ports: Vec<NetworkPolicyPort>, to: Vec<Peer>) -> Self {
        EgressRule { ports, to }
    }
}

/// The rules, each cut into rules of at most `room` bytes (a comma included) where it can be,
/// with their sizes.
fn cut<R: Rule>(rules: Vec<R>, room: usize) -> Vec<(R, usize)> {
    let mut out = Vec::new();
    for rule in rules {
        cut_rule(rule, room, &mut out);
    }
    out
}

fn cut_rule<R: Rule>(rule: R, room: usize, out: &mut Vec<(R, usize)>) {
    let len = json_len(&rule) + 1;
    if len <= room {
        out.push((rule, len));
        return;
    }
    let (ports, peers) = rule.into_lists();
    if peers.len() > 1 {
        let fixed = RULE_FRAME + list_len(&ports);
        for peers in chunks(peers, room.saturating_sub(fixed)) {
            cut_rule(R::from_lists(ports.clone(), peers), room, out);
        }
    } else if ports.len() > 1 {
        let fixed = RULE_FRAME + list_len(&peers);
        for ports in chunks(ports, room.saturating_sub(fixed)) {
            cut_rule(R::from_lists(ports, peers.clone()), room, out);
        }
    } else {
        out.push((R::from_lists(ports, peers), len));
    }
}

/// `items` in order, in lists of at most `room` bytes of JSON each (at least one item each).
fn chunks<T: Serialize>(items: Vec<T>, room: usize) -> Vec<Vec<T>> {
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut used = 0;
    for item in items {
        let len = json_len(&item) + 1;
        match chunks.last_mut() {
            Some(chunk) if used + len <= room => chunk.push(item),
            _ => {
                chunks.push(vec![item]);
                used = 1; // The brackets, less the comma the last item does not have.
            }
        }
        used += len;
    }
    chunks
}

/// The JSON size of a list, at most (`[a,b]`).
fn list_len<T: Serialize>(items: &[T]) -> usize {
    2 + items.iter().map(|i| json_len(i) + 1).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;
    use crate::netpol::types::IpBlock;

    fn policy(ingress: Vec<IngressRule>, egress: Vec<EgressRule>) -> NetworkPolicy {
        serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "nsg-g-0123456789", "namespace": "ns", "labels": {"kubensg.io/nsg": "g"}},
            "spec": {
                "podSelector": {"matchLabels": {"asg.kubensg.io/web": "true"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": egress,
            }
        }))
        .unwrap()
    }

    fn peer(i: usize) -> Peer {
        Peer {
            ip_block: Some(IpBlock {
                cidr: format!("10.{}.{}.0/24", i / 256, i % 256),
                except: vec![],
            }),
            ..Peer::default()
        }
    }

    fn port(p: u16) -> NetworkPolicyPort {
        NetworkPolicyPort {
            protocol: "TCP".into(),
            port: Some(p),
            end_port: None,
        }
    }

    /// What a policy allows, as (direction, port, peer) with `None` for "any".
    fn allowed(p: &NetworkPolicy) -> BTreeSet<(bool, Option<NetworkPolicyPort>, Option<Peer>)> {
        fn any<T: Clone>(items: &[T]) -> Vec<Option<T>> {
            match items {
                [] => vec![None],
                items => items.iter().cloned().map(Some).collect(),
            }
        }
        let rules = (p.spec.ingress.iter().map(|r| (true, &r.ports, &r.from)))
            .chain(p.spec.egress.iter().map(|r| (false, &r.ports, &r.to)));
        let mut allowed = BTreeSet::new();
        for (ingress, ports, peers) in rules {
            for port in any(ports) {
                for peer in any(peers) {
                    allowed.insert((ingress, port.clone(), peer));
                }
            }
        }
        allowed
    }

    #[test]
    fn a_policy_that_fits_is_kept_as_it_is() {
        let p = policy(
            vec![IngressRule {
                ports: vec![port(80)],
                from: (0..10).map(peer).collect(),
            }],
            vec![EgressRule::default()],
        );
        assert_eq!(split(p.clone(), MAX_POLICY_BYTES), vec![p]);
    }

    #[test]
    fn parts_fit_and_allow_together_what_the_policy_allows() {
        let ingress = (0..40)
            .map(|r| IngressRule {
                ports: (0..r % 7).map(|p| port(1000 + p as u16)).collect(),
                from: (0..r * 3).map(peer).collect(),
            })
            .collect();
        let egress = vec![
            EgressRule {
                ports: (0..300).map(port).collect(),
                to: vec![peer(1)],
            },
            EgressRule::default(),
        ];
        let p = policy(ingress, egress);
        for max in [600, 2_000, 10_000] {
            let parts = split(p.clone(), max);
            assert!(parts.len() > 1, "{max}: {} parts", parts.len());
            let names: BTreeSet<&str> = parts.iter().map(|q| q.metadata.name.as_str()).collect();
            assert_eq!(names.len(), parts.len());
            assert!(names.contains("nsg-g-0123456789") && names.contains("nsg-g-0123456789-2"));
            let mut together = BTreeSet::new();
            for q in &parts {
                let len = json_len(q);
                assert!(len <= max, "{max}: a part of {len} bytes");
                assert_eq!(q.spec.pod_selector, p.spec.pod_selector);
                assert_eq!(q.spec.policy_types, p.spec.policy_types);
                assert_eq!(
                    (&q.metadata.namespace, &q.metadata.labels),
                    (&p.metadata.namespace, &p.metadata.labels)
                );
                together.extend(allowed(q));
            }
            assert_eq!(together, allowed(&p), "{max}");
        }
    }

    #[test]
    fn a_peer_too_large_for_a_part_gets_one_of_its_own() {
        let huge = Peer {
            ip_block: Some(IpBlock {
                cidr: "10.0.0.0/8".into(),
                except: (0..100).map(|i| format!("10.{i}.0.0/16")).collect(),
            }),
            ..Peer::default()
        };
        let p = policy(
            vec![
                IngressRule {
                    ports: vec![port(1)],
                    from: vec![peer(1)],
                },
                IngressRule {
                    ports: vec![port(2)],
                    from: vec![huge.clone()],
                },
            ],
            vec![],
        );
        let parts = split(p, 1_000);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].spec.ingress[0].from, vec![huge]);
    }
}
