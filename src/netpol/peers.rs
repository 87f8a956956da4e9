//! Writing sets of peers compactly: address sets as `ipBlock`s with `except`, and sets of pod
//! classes as namespace and pod selectors. Both take don't-cares: addresses and classes whose
//! verdict does not depend on whether this rule covers them, which lets covers stay small.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::model::{IntervalSet, IpSet, NAMESPACE_NAME_LABEL};

use super::asg_label_key;
use super::types::{IpBlock, Peer, Selector, SelectorRequirement};

// ---------------------------------------------------------------------------------------------
// ipBlocks

fn intersects(set: &IntervalSet, first: u128, last: u128) -> bool {
    let r = set.ranges();
    let i = r.partition_point(|&(_, l)| l < first);
    r.get(i).is_some_and(|&(f, _)| f <= last)
}

fn covers(set: &IntervalSet, first: u128, last: u128) -> bool {
    let r = set.ranges();
    let i = r.partition_point(|&(_, l)| l < first);
    r.get(i).is_some_and(|&(f, l)| f <= first && last <= l)
}

fn net(v6: bool, start: u128, len: u32) -> IpNet {
    if v6 {
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from(start), len as u8).expect("valid prefix"))
    } else {
        IpNet::V4(Ipv4Net::new(Ipv4Addr::from(start as u32), len as u8).expect("valid prefix"))
    }
}

/// Best representation of one block: the ipBlocks, their cost (CIDR strings written), and the
/// fewest CIDRs covering the block's forbidden part without touching its required part (what
/// an enclosing block would list in `except`).
struct Cover {
    blocks: Vec<(IpNet, Vec<IpNet>)>,
    cost: usize,
    excepts: Vec<IpNet>,
}

struct Family<'a> {
    v6: bool,
    bits: u32,
    required: &'a IntervalSet,
    allowed: &'a IntervalSet,
}

impl Family<'_> {
    fn cover(&self, start: u128, len: u32) -> Cover {
        let host = self.bits - len;
        let last = if host == 128 {
            u128::MAX
        } else {
            start | ((1u128 << host) - 1)
        };
        let has_required = intersects(self.required, start, last);
        let has_forbidden = !covers(self.allowed, start, last);
        let block = || net(self.v6, start, len);
        match (has_required, has_forbidden) {
            (false, false) => Cover {
                blocks: vec![],
                cost: 0,
                excepts: vec![],
            },
            (false, true) => Cover {
                blocks: vec![],
                cost: 0,
                excepts: vec![block()],
            },
            (true, false) => Cover {
                blocks: vec![(block(), vec![])],
                cost: 1,
                excepts: vec![],
            },
            (true, true) => {
                // Both kinds inside: the block is wider than one address, so it splits.
                let half = 1u128 << (host - 1);
                let (l, r) = (
                    self.cover(start, len + 1),
                    self.cover(start + half, len + 1),
                );
                let mut excepts = l.excepts;
                excepts.extend(r.excepts);
                let split_cost = l.cost + r.cost;
                // One block with excepts costs 1 + excepts; on a tie it wins (fewer peers).
                if excepts.len() < split_cost {
                    Cover {
                        blocks: vec![(block(), excepts.clone())],
                        cost: 1 + excepts.len(),
                        excepts,
                    }
                } else {
                    let mut blocks = l.blocks;
                    blocks.extend(r.blocks);
                    Cover {
                        blocks,
                        cost: split_cost,
                        excepts,
                    }
                }
            }
        }
    }
}

/// The ipBlocks, fewest CIDR strings first, whose union contains every `required` address and
/// no address outside `allowed` (`required ⊆ allowed`). Each `except` is a strict subset of its
/// `cidr`, as the API requires. IPv4 first, then in address order.
pub(crate) fn ip_blocks(required: &IpSet, allowed: &IpSet) -> Vec<IpBlock> {
    let v4 = Family {
        v6: false,
        bits: 32,
        required: &required.v4,
        allowed: &allowed.v4,
    };
    let v6 = Family {
        v6: true,
        bits: 128,
        required: &required.v6,
        allowed: &allowed.v6,
    };
    [v4, v6]
        .iter()
        .flat_map(|f| f.cover(0, 0).blocks)
        .map(|(cidr, except)| IpBlock {
            cidr: cidr.to_string(),
            except: except.iter().map(|e| e.to_string()).collect(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Selectors

/// Pods that NetworkPolicy cannot tell apart: same namespace, same ASG membership labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PodClass {
    pub namespace: String,
    /// Names of the ASGs (all of the pod's own namespace) the pods are members of.
    pub asgs: BTreeSet<String>,
}

/// Whether a class must, must not, or may be selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    On,
    Off,
    DontCare,
}

/// A conjunction: the namespace (or any) and, per ASG label, present or absent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Term {
    pub namespace: Option<String>,
    pub asgs: BTreeMap<String, bool>,
}

impl Term {
    fn covers(&self, class: &PodClass) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|n| *n == class.namespace)
            && self
                .asgs
                .iter()
                .all(|(name, member)| class.asgs.contains(name) == *member)
    }

    fn subsumes(&self, other: &Term) -> bool {
        (self.namespace.is_none() || self.namespace == other.namespace)
            && self.asgs.iter().all(|(k, v)| other.asgs.get(k) == Some(v))
    }
}

/// Conjunctions that cover every `On` class and no `Off` class, grown greedily from each `On`
/// class by dropping the literals no `Off` class needs (absences first, then memberships, then
/// the namespace once nothing else is left). `universe` lists, per namespace, the ASG names
/// its classes may carry. With `keep_namespace` the namespace is never dropped.
pub(crate) fn cover_classes(
    classes: &[PodClass],
    want: &[Want],
    universe: &BTreeMap<String, BTreeSet<String>>,
    keep_namespace: bool,
) -> Vec<Term> {
    let mut off_by_ns: BTreeMap<&str, Vec<&PodClass>> = BTreeMap::new();
    for (c, w) in classes.iter().zip(want) {
        if *w == Want::Off {
            off_by_ns.entry(&c.namespace).or_default().push(c);
        }
    }
    let hits_off = |t: &Term| match &t.namespace {
        Some(ns) => off_by_ns
            .get(ns.as_str())
            .is_some_and(|v| v.iter().any(|c| t.covers(c))),
        None => off_by_ns.values().flatten().any(|c| t.covers(c)),
    };
    let mut terms: Vec<Term> = Vec::new();
    for (class, _) in classes.iter().zip(want).filter(|(_, w)| **w == Want::On) {
        if terms.iter().any(|t| t.covers(class)) {
            continue;
        }
        let names = universe.get(&class.namespace).cloned().unwrap_or_default();
        let mut term = Term {
            namespace: Some(class.namespace.clone()),
            asgs: names
                .iter()
                .map(|n| (n.clone(), class.asgs.contains(n)))
                .collect(),
        };
        let order: Vec<String> = names
            .iter()
            .filter(|n| !class.asgs.contains(*n))
            .chain(names.iter().filter(|n| class.asgs.contains(*n)))
            .cloned()
            .collect();
        for name in order {
            let value = term.asgs.remove(&name).expect("literal present");
            if hits_off(&term) {
                term.asgs.insert(name, value);
            }
        }
        if !keep_namespace && term.asgs.is_empty() {
            let ns = term.namespace.take();
            if hits_off(&term) {
                term.namespace = ns;
            }
        }
        terms.push(term);
    }
    // Drop terms another term already implies.
    let mut kept: Vec<Term> = Vec::new();
    for (i, t) in terms.iter().enumerate() {
        let implied = terms
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && o.subsumes(t) && (o != t || j < i));
        if !implied {
            kept.push(t.clone());
        }
    }
    kept.sort();
    kept
}

/// The pod selector of a conjunction's ASG literals.
pub(crate) fn asg_selector(asgs: &BTreeMap<String, bool>) -> Selector {
    let mut match_expressions: Vec<SelectorRequirement> = asgs
        .iter()
        .map(|(name, member)| SelectorRequirement::exists(asg_label_key(name), *member))
        .collect();
    match_expressions.sort();
    Selector {
        match_labels: BTreeMap::new(),
        match_expressions,
    }
}

/// NetworkPolicy peers for a set of conjunctions, from a policy in `policy_ns`. Terms with the
/// same ASG literals share one peer whose namespace selector lists their namespaces.
pub(crate) fn class_peers(terms: &[Term], policy_ns: &str) -> Vec<Peer> {
    if terms.iter().any(|t| t.namespace.is_none()) {
        // Every pod of every namespace.
        return vec![Peer {
            namespace_selector: Some(Selector::default()),
            ..Peer::default()
        }];
    }
    let mut by_literals: BTreeMap<&BTreeMap<String, bool>, BTreeSet<&str>> = BTreeMap::new();
    for t in terms {
        by_literals
            .entry(&t.asgs)
            .or_default()
            .insert(t.namespace.as_deref().expect("checked"));
    }
    let mut peers: Vec<Peer> = by_literals
        .into_iter()
        .map(|(asgs, namespaces)| {
            let pods = asg_selector(asgs);
            if namespaces.len() == 1 && namespaces.contains(policy_ns) {
                return Peer {
                    pod_selector: Some(pods),
                    ..Peer::default()
                };
            }
            let namespace_selector = if namespaces.len() == 1 {
                Selector {
                    match_labels: BTreeMap::from([(
                        NAMESPACE_NAME_LABEL.to_string(),
                        namespaces.first().expect("one").to_string(),
                    )]),
                    match_expressions: vec![],
                }
            } else {
                Selector {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![SelectorRequirement {
                        key: NAMESPACE_NAME_LABEL.to_string(),
                        operator: "In".to_string(),
                        values: namespaces.iter().map(|s| s.to_string()).collect(),
                    }],
                }
            };
            Peer {
                pod_selector: (!asgs.is_empty()).then_some(pods),
                namespace_selector: Some(namespace_selector),
                ip_block: None,
            }
        })
        .collect();
    peers.sort();
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> IpSet {
        IpSet::from_nets(nets.iter().map(|n| n.parse::<IpNet>().unwrap()))
    }

    fn blocks(required: &IpSet, allowed: &IpSet) -> Vec<(String, Vec<String>)> {
        ip_blocks(required, allowed)
            .into_iter()
            .map(|b| (b.cidr, b.except))
            .collect()
    }

    #[test]
    fn complement_of_a_range_uses_except() {
        let internet = set(&["10.244.0.0/16", "172.18.0.2/32"]).complement();
        assert_eq!(
            blocks(&internet, &internet),
            vec![
                (
                    "0.0.0.0/0".to_string(),
                    vec!["10.244.0.0/16".to_string(), "172.18.0.2/32".to_string()]
                ),
                ("::/0".to_string(), vec![]),
            ]
        );
    }

    #[test]
    fn dont_cares_merge_blocks() {
        // Three blocks are required; the rest of the /24 but one address may go.
        let required = set(&["10.0.0.0/25", "10.0.0.128/26", "10.0.0.192/29"]);
        let allowed = set(&["10.0.0.0/24"]).difference(&set(&["10.0.0.200/32"]));
        // One block; its except may take don't-cares along (10.0.0.200/29 is as short as /32).
        assert_eq!(
            blocks(&required, &allowed),
            vec![("10.0.0.0/24".to_string(), vec!["10.0.0.200/29".to_string()])]
        );
        assert_eq!(blocks(&required, &required).len(), 3);
    }

    #[test]
    fn ip_blocks_stay_between_required_and_allowed() {
        let required = set(&["10.1.0.0/16", "10.3.4.0/24", "fd00::/64"]);
        let allowed = required.union(&set(&["10.2.0.0/15", "fd00:0:0:1::/64"]));
        let out = ip_blocks(&required, &allowed);
        let union = out.iter().fold(IpSet::empty(), |acc, b| {
            let minus = set(&b.except.iter().map(String::as_str).collect::<Vec<_>>());
            acc.union(&set(&[&b.cidr]).difference(&minus))
        });
        assert!(required.is_subset(&union) && union.is_subset(&allowed));
    }

    fn class(ns: &str, asgs: &[&str]) -> PodClass {
        PodClass {
            namespace: ns.into(),
            asgs: asgs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn selectors_drop_literals_no_off_class_needs() {
        let classes = vec![
            class("a", &[]),
            class("a", &["db"]),
            class("a", &["web"]),
            class("b", &["web"]),
            class("c", &[]),
            class("c", &["web"]),
        ];
        let universe = BTreeMap::from([
            (
                "a".to_string(),
                BTreeSet::from(["web".to_string(), "db".to_string()]),
            ),
            ("b".to_string(), BTreeSet::from(["web".to_string()])),
            ("c".to_string(), BTreeSet::from(["web".to_string()])),
        ]);
        use Want::*;
        let terms = cover_classes(&classes, &[Off, Off, On, On, Off, On], &universe, false);
        let json = serde_json::to_string(&class_peers(&terms, "z")).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"b"}}},"#,
                r#"{"podSelector":{"matchExpressions":[{"key":"asg.kubensg.io/web","operator":"Exists"}]},"#,
                r#""namespaceSelector":{"matchExpressions":[{"key":"kubernetes.io/metadata.name","operator":"In","values":["a","c"]}]}}]"#
            )
        );
        // From a policy in namespace b, its own namespace needs no namespace selector.
        let own = class_peers(
            &[Term {
                namespace: Some("b".into()),
                asgs: BTreeMap::new(),
            }],
            "b",
        );
        assert_eq!(
            serde_json::to_string(&own).unwrap(),
            r#"[{"podSelector":{}}]"#
        );
        let all = cover_classes(&classes, &[On, DontCare, On, On, On, On], &universe, false);
        assert_eq!(
            all,
            vec![Term {
                namespace: None,
                asgs: BTreeMap::new()
            }]
        );
    }
}
