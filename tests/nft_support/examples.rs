//! Small inventories written out by hand.

use std::collections::BTreeMap;

use kube_nsg::model::*;

/// A rule from its fields, in the order Azure lists them.
#[allow(clippy::too_many_arguments)]
pub fn rule(
    name: &str,
    priority: u32,
    direction: Direction,
    access: Access,
    protocol: Protocol,
    source: Endpoint,
    destination: Endpoint,
    destination_ports: &str,
) -> SecurityRule {
    SecurityRule {
        name: name.into(),
        description: None,
        priority,
        direction,
        access,
        protocol,
        source,
        source_ports: vec![PortRange::ALL],
        destination,
        destination_ports: destination_ports
            .split(',')
            .map(|p| p.parse().unwrap())
            .collect(),
        is_default: false,
    }
}

pub fn asgs(ns: &str, names: &[&str]) -> Endpoint {
    Endpoint::Asgs(
        names
            .iter()
            .map(|n| AsgRef {
                namespace: ns.into(),
                name: (*n).into(),
            })
            .collect(),
    )
}

pub fn prefixes(ps: &[&str]) -> Endpoint {
    Endpoint::Prefixes(ps.iter().map(|p| p.parse().unwrap()).collect())
}

pub fn pod(ns: &str, name: &str, app: &str, ips: &[&str], node: &str) -> Pod {
    Pod {
        id: ObjectRef::new(ns, name),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        annotations: BTreeMap::new(),
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        node_name: Some(node.into()),
    }
}

pub fn asg(ns: &str, name: &str, app: &str) -> Asg {
    Asg {
        id: ObjectRef::new(ns, name),
        pod_selector: Some(LabelSelector {
            match_labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            match_expressions: vec![],
        }),
    }
}

/// The subnet rules of the three-tier application of Azure's documentation: web servers
/// reachable from the Internet on port 80, a database only the business logic reaches on 1433.
pub fn three_tier_rules(ns: &str) -> Vec<SecurityRule> {
    use Access::*;
    use Direction::Inbound;
    vec![
        rule(
            "Allow-HTTP-Inbound-Internet",
            100,
            Inbound,
            Allow,
            Protocol::Tcp,
            prefixes(&["Internet"]),
            asgs(ns, &["asg-web"]),
            "80",
        ),
        rule(
            "Allow-Database-BusinessLogic",
            110,
            Inbound,
            Allow,
            Protocol::Tcp,
            asgs(ns, &["asg-logic"]),
            asgs(ns, &["asg-db"]),
            "1433",
        ),
        rule(
            "Deny-Database-All",
            120,
            Inbound,
            Deny,
            Protocol::Any,
            prefixes(&["*"]),
            asgs(ns, &["asg-db"]),
            "1433",
        ),
    ]
}

/// The three-tier application on four pods of one node.
pub fn three_tier() -> Inventory {
    let ns = "shop";
    Inventory {
        nsgs: vec![Nsg {
            id: ObjectRef::new(ns, "shop-subnet"),
            created: Some("2026-01-01T00:00:00Z".into()),
            generation: Some(1),
            subnet: true,
            pod_selector: None,
            rules: three_tier_rules(ns),
        }],
        asgs: vec![
            asg(ns, "asg-web", "web"),
            asg(ns, "asg-logic", "logic"),
            asg(ns, "asg-db", "db"),
        ],
        service_tags: vec![],
        pods: vec![
            pod(
                ns,
                "web1",
                "web",
                &["10.244.1.10", "fd00:10:244:1::10"],
                "node-1",
            ),
            pod(ns, "web2", "web", &["10.244.1.11"], "node-1"),
            pod(ns, "logic1", "logic", &["10.244.1.20"], "node-1"),
            pod(ns, "db1", "db", &["10.244.1.30"], "node-1"),
        ],
        namespaces: vec![Namespace::named(ns)],
        virtual_network: vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/56".parse().unwrap(),
        ],
        node_ips: vec!["172.18.0.2".parse().unwrap()],
    }
}
