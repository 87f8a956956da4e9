//! Rule anomaly analysis: hand-written cases of each kind, and properties against the
//! reference evaluator (every reported anomaly and its example flow are checked by evaluating
//! packets, with the rule in place and removed).

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use kube_nsg::analyze::{Anomaly, AnomalyKind, analyze};
use kube_nsg::eval::{Packet, rule_matches};
use kube_nsg::model::*;
use kube_nsg::resolve::Resolved;

/// The first rule matching `packet` among `rules` (in order), skipping index `without`.
fn first(
    res: &Resolved,
    rules: &[SecurityRule],
    packet: &Packet,
    without: Option<usize>,
) -> Option<usize> {
    (0..rules.len())
        .filter(|&i| Some(i) != without)
        .find(|&i| rule_matches(res, &rules[i], packet))
}

/// Checks what each anomaly claims against the evaluator: on its example flow, and on `packets`.
fn check(res: &Resolved, nsg: usize, packets: &[Packet]) -> Result<Vec<Anomaly>, TestCaseError> {
    let group = &res.inv.nsgs[nsg];
    let anomalies = analyze(res, nsg);
    for a in &anomalies {
        prop_assert_eq!(&a.nsg, &group.id);
        let rules = group.rules_for(a.direction);
        let i = rules
            .iter()
            .position(|r| r.name == a.rule && r.priority == a.priority)
            .expect("a rule of the group");
        let index = |name: &str| {
            rules
                .iter()
                .position(|r| r.name == name)
                .expect("related rules exist")
        };
        match a.kind {
            AnomalyKind::Shadowed => {
                for p in packets {
                    prop_assert_ne!(
                        first(res, &rules, p, None),
                        Some(i),
                        "shadowed rule decides {:?}",
                        p
                    );
                }
                match &a.example {
                    None => prop_assert!(a.related.is_empty()),
                    Some(ex) => {
                        prop_assert!(rule_matches(res, &rules[i], ex));
                        let decider = first(res, &rules, ex, None).unwrap();
                        prop_assert!(decider < i && a.related.contains(&rules[decider].name));
                    }
                }
            }
            AnomalyKind::Redundant => {
                for p in packets {
                    let with = first(res, &rules, p, None).map(|k| rules[k].access);
                    let without = first(res, &rules, p, Some(i)).map(|k| rules[k].access);
                    prop_assert_eq!(with, without, "removing a redundant rule changes {:?}", p);
                }
                let ex = a.example.as_ref().expect("redundant rules have an example");
                prop_assert_eq!(first(res, &rules, ex, None), Some(i));
                let instead = first(res, &rules, ex, Some(i)).unwrap();
                prop_assert_eq!(rules[instead].access, rules[i].access);
                prop_assert!(a.related.contains(&rules[instead].name));
            }
            AnomalyKind::Correlated => {
                prop_assert_eq!(a.related.len(), 1);
                let earlier = index(&a.related[0]);
                prop_assert!(earlier < i && rules[earlier].access != rules[i].access);
                let ex = a
                    .example
                    .as_ref()
                    .expect("correlated pairs have an example");
                prop_assert_eq!(first(res, &rules, ex, None), Some(earlier));
                prop_assert!(rule_matches(res, &rules[i], ex));
            }
        }
    }
    Ok(anomalies)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, max_local_rejects: 1 << 22, ..ProptestConfig::default() })]

    #[test]
    fn anomalies_hold_against_the_evaluator(
        inv in common::dense_inventory(),
        packets in prop::collection::vec(common::pod_packet(), 32),
    ) {
        let res = Resolved::new(&inv);
        for nsg in 0..inv.nsgs.len() {
            check(&res, nsg, &packets)?;
        }
    }

    /// A rule that decides some flow is never shadowed, and one whose removal changes a
    /// verdict is never redundant (the converse direction, on sampled flows).
    #[test]
    fn deciding_rules_are_not_shadowed(
        inv in common::inventory(),
        packets in prop::collection::vec(common::packet(), 32),
    ) {
        let res = Resolved::new(&inv);
        for nsg in 0..inv.nsgs.len() {
            let anomalies = check(&res, nsg, &packets)?;
            for direction in [Direction::Inbound, Direction::Outbound] {
                let rules = inv.nsgs[nsg].rules_for(direction);
                for p in &packets {
                    let i = first(&res, &rules, p, None).unwrap();
                    let changes = first(&res, &rules, p, Some(i)).map(|k| rules[k].access) != Some(rules[i].access);
                    for a in anomalies.iter().filter(|a| a.direction == direction && a.rule == rules[i].name) {
                        prop_assert_ne!(a.kind, AnomalyKind::Shadowed);
                        if changes {
                            prop_assert_ne!(a.kind, AnomalyKind::Redundant);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

fn rule(
    name: &str,
    priority: u32,
    access: Access,
    proto: Protocol,
    src: &str,
    dst: &str,
    dports: &str,
) -> SecurityRule {
    let endpoint = |s: &str| {
        if let Some(a) = s.strip_prefix("asg:") {
            Endpoint::Asgs(vec![AsgRef {
                namespace: "a".into(),
                name: a.into(),
            }])
        } else {
            Endpoint::Prefixes(s.split(',').map(|p| p.parse().unwrap()).collect())
        }
    };
    SecurityRule {
        name: name.into(),
        description: None,
        priority,
        direction: Direction::Inbound,
        access,
        protocol: proto,
        source: endpoint(src),
        source_ports: vec![PortRange::ALL],
        destination: endpoint(dst),
        destination_ports: dports.split(',').map(|p| p.parse().unwrap()).collect(),
        is_default: false,
    }
}

fn inventory(rules: Vec<SecurityRule>) -> Inventory {
    Inventory {
        nsgs: vec![Nsg {
            id: ObjectRef::new("a", "g"),
            created: None,
            generation: None,
            subnet: true,
            pod_selector: None,
            rules,
        }],
        asgs: vec![Asg {
            id: ObjectRef::new("a", "empty"),
            pod_selector: None,
        }],
        service_tags: vec![],
        pods: vec![Pod {
            id: ObjectRef::new("a", "p"),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            ips: vec!["10.244.0.10".parse().unwrap()],
            node_name: None,
        }],
        namespaces: vec![],
        virtual_network: vec!["10.244.0.0/16".parse().unwrap()],
        node_ips: vec!["172.18.0.2".parse().unwrap()],
    }
}

fn anomalies(rules: Vec<SecurityRule>) -> Vec<(AnomalyKind, String, Vec<String>)> {
    let inv = inventory(rules);
    let res = Resolved::new(&inv);
    check(&res, 0, &[]).unwrap();
    analyze(&res, 0)
        .into_iter()
        .map(|a| (a.kind, a.rule, a.related))
        .collect()
}

fn has(
    found: &[(AnomalyKind, String, Vec<String>)],
    kind: AnomalyKind,
    rule: &str,
    related: &[&str],
) -> bool {
    found.iter().any(|(k, r, rel)| {
        *k == kind && r == rule && rel.iter().map(String::as_str).eq(related.iter().copied())
    })
}

use Access::{Allow, Deny};
use Protocol::{Any, Tcp};

#[test]
fn a_rule_behind_a_wider_one_is_shadowed() {
    let found = anomalies(vec![
        rule("deny-ten", 100, Deny, Any, "10.0.0.0/8", "*", "*"),
        rule("allow-lab", 200, Allow, Tcp, "10.1.0.0/16", "*", "443"),
    ]);
    assert!(
        has(&found, AnomalyKind::Shadowed, "allow-lab", &["deny-ten"]),
        "{found:?}"
    );
}

#[test]
fn a_rule_behind_several_rules_together_is_shadowed() {
    let found = anomalies(vec![
        rule("allow-80", 100, Allow, Tcp, "203.0.113.0/24", "*", "80"),
        rule("allow-81", 110, Allow, Tcp, "203.0.113.0/24", "*", "81"),
        rule("deny-80-81", 200, Deny, Tcp, "203.0.113.0/25", "*", "80-81"),
    ]);
    assert!(
        has(
            &found,
            AnomalyKind::Shadowed,
            "deny-80-81",
            &["allow-80", "allow-81"]
        ),
        "{found:?}"
    );
}

#[test]
fn a_rule_that_matches_nothing_is_shadowed_without_example() {
    let inv = inventory(vec![rule(
        "to-nobody",
        100,
        Allow,
        Tcp,
        "*",
        "asg:empty",
        "80",
    )]);
    let res = Resolved::new(&inv);
    let a = analyze(&res, 0)
        .into_iter()
        .find(|a| a.rule == "to-nobody")
        .unwrap();
    assert_eq!(
        (a.kind, a.related.len(), a.example),
        (AnomalyKind::Shadowed, 0, None)
    );
}

#[test]
fn an_allow_the_defaults_would_make_anyway_is_redundant() {
    let found = anomalies(vec![rule(
        "vnet-web",
        100,
        Allow,
        Tcp,
        "VirtualNetwork",
        "VirtualNetwork",
        "80",
    )]);
    assert!(
        has(
            &found,
            AnomalyKind::Redundant,
            "vnet-web",
            &["AllowVNetInBound"]
        ),
        "{found:?}"
    );
}

#[test]
fn a_deny_before_a_deny_is_redundant() {
    let found = anomalies(vec![rule(
        "deny-internet",
        4000,
        Deny,
        Any,
        "Internet",
        "*",
        "*",
    )]);
    assert!(
        has(
            &found,
            AnomalyKind::Redundant,
            "deny-internet",
            &["DenyAllInbound"]
        ),
        "{found:?}"
    );
}

#[test]
fn overlapping_allow_and_deny_are_correlated() {
    let found = anomalies(vec![
        rule("allow-some", 100, Allow, Tcp, "10.0.0.0/16", "*", "80-100"),
        rule("deny-more", 200, Deny, Tcp, "10.0.0.0/8", "*", "90-443"),
    ]);
    assert!(
        has(
            &found,
            AnomalyKind::Correlated,
            "deny-more",
            &["allow-some"]
        ),
        "{found:?}"
    );
}

#[test]
fn an_exception_before_its_general_rule_is_not_an_anomaly() {
    let found = anomalies(vec![
        rule("deny-ssh", 100, Deny, Tcp, "Internet", "*", "22"),
        rule("allow-internet", 200, Allow, Tcp, "Internet", "*", "*"),
    ]);
    assert!(
        !found
            .iter()
            .any(|(_, r, rel)| r == "allow-internet" && rel == &["deny-ssh"]),
        "{found:?}"
    );
    assert!(!found.iter().any(|(_, r, _)| r == "deny-ssh"), "{found:?}");
}

#[test]
fn anomalies_serialize_camel_case() {
    let inv = inventory(vec![
        rule("deny-ten", 100, Deny, Any, "10.0.0.0/8", "*", "*"),
        rule(
            "allow-lab",
            200,
            Allow,
            Tcp,
            "10.1.0.0/16",
            "10.244.0.10",
            "443",
        ),
    ]);
    let res = Resolved::new(&inv);
    let a = analyze(&res, 0)
        .into_iter()
        .find(|a| a.rule == "allow-lab")
        .unwrap();
    assert_eq!(
        serde_json::to_value(&a).unwrap(),
        json!({
            "nsg": "a/g",
            "direction": "Inbound",
            "kind": "Shadowed",
            "rule": "allow-lab",
            "priority": 200,
            "related": ["deny-ten"],
            "example": {
                "protocol": "Tcp",
                "source": "10.1.0.0",
                "sourcePort": 0,
                "destination": "10.244.0.10",
                "destinationPort": 443,
            },
        })
    );
}
