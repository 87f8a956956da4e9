//! Every verdict the source document (Azure's security-group overview) states for its two
//! examples, checked against the examples under `examples/` with the reference evaluator.

use std::net::IpAddr;
use std::path::PathBuf;

use kube_nsg::cli::load::Objects;
use kube_nsg::eval::{Packet, Verdict, evaluate, evaluate_flow};
use kube_nsg::model::{Access, Direction, Inventory, ObjectRef, Protocol, SecurityRule};
use kube_nsg::resolve::{Level, Resolved};

const INTERNET: &str = "198.18.0.10";

fn load(example: &str) -> Inventory {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(example);
    Objects::read(&[dir])
        .unwrap()
        .into_inventory(
            &["10.244.0.0/16".parse().unwrap()],
            &["172.18.0.2".parse().unwrap()],
        )
        .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pod_ip(inv: &Inventory, pod: &str) -> IpAddr {
    let id: ObjectRef = pod.parse().unwrap();
    inv.pods.iter().find(|p| p.id == id).unwrap().ips[0]
}

fn tcp(src: IpAddr, dst: IpAddr, port: u16) -> Packet {
    Packet {
        protocol: Protocol::Tcp,
        src,
        src_port: 50000,
        dst,
        dst_port: port,
    }
}

/// The verdict at one pod: `Inbound` packets go to it, `Outbound` ones come from it.
fn at(inv: &Inventory, pod: &str, direction: Direction, remote: IpAddr, port: u16) -> Verdict {
    let res = Resolved::new(inv);
    let local = pod_ip(inv, pod);
    let packet = match direction {
        Direction::Inbound => tcp(remote, local, port),
        Direction::Outbound => tcp(local, remote, port),
    };
    evaluate(
        &res,
        res.pod_index(&pod.parse().unwrap()).unwrap(),
        direction,
        &packet,
    )
}

fn decided_by(v: &Verdict) -> (Access, &str) {
    let s = v.deciding().expect("a group applies");
    (v.access, s.rule.as_str())
}

// --- The application security group example (AsgWeb, AsgLogic, AsgDb) ---

#[test]
fn internet_reaches_the_web_servers_on_port_80_only() {
    let inv = load("three-tier");
    for web in ["three-tier/web1", "three-tier/web2"] {
        let v = at(&inv, web, Direction::Inbound, ip(INTERNET), 80);
        assert_eq!(
            decided_by(&v),
            (Access::Allow, "Allow-HTTP-Inbound-Internet")
        );
        let v = at(&inv, web, Direction::Inbound, ip(INTERNET), 443);
        assert_eq!(decided_by(&v), (Access::Deny, "DenyAllInbound"));
    }
}

#[test]
fn internet_to_logic_and_database_is_denied_by_deny_all_inbound() {
    let inv = load("three-tier");
    for (pod, port, rule) in [
        ("three-tier/logic1", 80, "DenyAllInbound"),
        ("three-tier/logic1", 1433, "DenyAllInbound"),
        ("three-tier/db1", 80, "DenyAllInbound"),
        // Rule 120 comes first for the database port; denied either way.
        ("three-tier/db1", 1433, "Deny-Database-All"),
    ] {
        let v = at(&inv, pod, Direction::Inbound, ip(INTERNET), port);
        assert_eq!(decided_by(&v), (Access::Deny, rule), "{pod}:{port}");
    }
}

#[test]
fn only_the_business_logic_reaches_the_database() {
    let inv = load("three-tier");
    let logic = pod_ip(&inv, "three-tier/logic1");
    let v = at(&inv, "three-tier/db1", Direction::Inbound, logic, 1433);
    assert_eq!(
        decided_by(&v),
        (Access::Allow, "Allow-Database-BusinessLogic")
    );
    for web in ["three-tier/web1", "three-tier/web2"] {
        let v = at(
            &inv,
            "three-tier/db1",
            Direction::Inbound,
            pod_ip(&inv, web),
            1433,
        );
        assert_eq!(decided_by(&v), (Access::Deny, "Deny-Database-All"));
    }
    // The database's annotation makes it a member: the rules apply to it by ASG.
    let res = Resolved::new(&inv);
    let db = res.pod_index(&"three-tier/db1".parse().unwrap()).unwrap();
    assert_eq!(
        res.memberships(db)
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["asgdb"]
    );
}

#[test]
fn other_traffic_between_tiers_is_allowed_by_allow_vnet_inbound() {
    let inv = load("three-tier");
    let web = pod_ip(&inv, "three-tier/web1");
    let v = at(&inv, "three-tier/logic1", Direction::Inbound, web, 8080);
    assert_eq!(decided_by(&v), (Access::Allow, "AllowVNetInBound"));
    // Replies need no rule (stateful); a new flow the other way is its own decision.
    let res = Resolved::new(&inv);
    let flow = evaluate_flow(&res, &tcp(pod_ip(&inv, "three-tier/db1"), web, 80));
    assert_eq!(flow.access, Access::Allow);
}

// --- The subnet and network-interface example (VM1..VM4, NSG1 on Subnet1, NSG2 on NICs) ---

#[test]
fn inbound_port_80_reaches_vm1_only_when_both_groups_allow_it() {
    let inv = load("subnet-and-nic");
    let v = at(&inv, "subnet1/vm1", Direction::Inbound, ip(INTERNET), 80);
    assert_eq!(v.access, Access::Allow);
    let levels: Vec<Level> = v.stages.iter().map(|s| s.level).collect();
    assert_eq!(
        levels,
        [Level::Subnet, Level::NetworkInterface],
        "subnet first, then the NIC"
    );

    // Without NSG1's rule, DenyAllInbound of NSG1 denies and NSG2 is never evaluated.
    let mut without_subnet_rule = inv.clone();
    remove_rules(&mut without_subnet_rule, "subnet1/nsg1");
    let v = at(
        &without_subnet_rule,
        "subnet1/vm1",
        Direction::Inbound,
        ip(INTERNET),
        80,
    );
    assert_eq!(decided_by(&v), (Access::Deny, "DenyAllInbound"));
    assert_eq!(v.stages.len(), 1);
    assert_eq!(v.stages[0].nsg.to_string(), "subnet1/nsg1");

    // Without NSG2's rule, the NIC's group denies it.
    let mut without_nic_rule = inv.clone();
    remove_rules(&mut without_nic_rule, "subnet1/nsg2");
    let v = at(
        &without_nic_rule,
        "subnet1/vm1",
        Direction::Inbound,
        ip(INTERNET),
        80,
    );
    assert_eq!(decided_by(&v), (Access::Deny, "DenyAllInbound"));
    assert_eq!(v.stages[1].nsg.to_string(), "subnet1/nsg2");
}

#[test]
fn inbound_vm2_gets_what_nsg1_allows_or_denies() {
    let inv = load("subnet-and-nic");
    let v = at(&inv, "subnet1/vm2", Direction::Inbound, ip(INTERNET), 80);
    assert_eq!(decided_by(&v), (Access::Allow, "Allow-HTTP-Internet"));
    assert_eq!(v.stages.len(), 1);
    let v = at(&inv, "subnet1/vm2", Direction::Inbound, ip(INTERNET), 22);
    assert_eq!(decided_by(&v), (Access::Deny, "DenyAllInbound"));
}

#[test]
fn inbound_vm3_is_decided_by_nsg2_alone() {
    let inv = load("subnet-and-nic");
    let v = at(&inv, "subnet2/vm3", Direction::Inbound, ip(INTERNET), 80);
    assert_eq!(decided_by(&v), (Access::Allow, "Allow-HTTP-Internet"));
    assert_eq!(v.stages.len(), 1);
    assert_eq!(v.stages[0].level, Level::NetworkInterface);
}

#[test]
fn vm4_without_any_group_passes_everything() {
    let inv = load("subnet-and-nic");
    for direction in [Direction::Inbound, Direction::Outbound] {
        for port in [22, 80, 3389] {
            let v = at(&inv, "subnet3/vm4", direction, ip(INTERNET), port);
            assert_eq!(v.access, Access::Allow);
            assert!(v.stages.is_empty(), "no group applies");
        }
    }
}

#[test]
fn outbound_port_80_to_the_internet_is_allowed_by_default_in_both_groups() {
    let inv = load("subnet-and-nic");
    let v = at(&inv, "subnet1/vm1", Direction::Outbound, ip(INTERNET), 80);
    assert_eq!(v.access, Access::Allow);
    let order: Vec<(Level, &str)> = v
        .stages
        .iter()
        .map(|s| (s.level, s.rule.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            (Level::NetworkInterface, "AllowInternetOutBound"),
            (Level::Subnet, "AllowInternetOutBound")
        ],
        "outbound: the NIC's group first, then the subnet's"
    );
    // VM2: NSG1's rules are processed.
    let v = at(&inv, "subnet1/vm2", Direction::Outbound, ip(INTERNET), 80);
    assert_eq!(
        (v.stages.len(), decided_by(&v)),
        (1, (Access::Allow, "AllowInternetOutBound"))
    );
}

#[test]
fn outbound_deny_in_nsg2_wins_and_nsg1_is_never_evaluated() {
    let mut inv = load("subnet-and-nic");
    for nsg in ["subnet1/nsg2", "subnet2/nsg2"] {
        add_rule(&mut inv, nsg, deny_port_80_to_internet());
    }
    let v = at(&inv, "subnet1/vm1", Direction::Outbound, ip(INTERNET), 80);
    assert_eq!(decided_by(&v), (Access::Deny, "Deny-HTTP-Internet"));
    assert_eq!(v.stages.len(), 1, "NSG1 is never evaluated");
    // VM3: NSG2 decides alone, both ways.
    let v = at(&inv, "subnet2/vm3", Direction::Outbound, ip(INTERNET), 80);
    assert_eq!(decided_by(&v), (Access::Deny, "Deny-HTTP-Internet"));
    let mut allowing = load("subnet-and-nic");
    let mut allow = deny_port_80_to_internet();
    allow.access = Access::Allow;
    add_rule(&mut allowing, "subnet2/nsg2", allow);
    let v = at(
        &allowing,
        "subnet2/vm3",
        Direction::Outbound,
        ip(INTERNET),
        80,
    );
    assert_eq!(decided_by(&v), (Access::Allow, "Deny-HTTP-Internet"));
}

#[test]
fn a_subnet_rule_denying_everything_cuts_vm1_from_vm2() {
    let mut inv = load("subnet-and-nic");
    let (vm1, vm2) = (pod_ip(&inv, "subnet1/vm1"), pod_ip(&inv, "subnet1/vm2"));
    assert_eq!(
        evaluate_flow(&Resolved::new(&inv), &tcp(vm1, vm2, 8080)).access,
        Access::Allow
    );
    for direction in [Direction::Inbound, Direction::Outbound] {
        let mut deny_all = deny_port_80_to_internet();
        deny_all.name = format!("Deny-All-{direction}");
        deny_all.direction = direction;
        deny_all.protocol = Protocol::Any;
        deny_all.destination = kube_nsg::model::Endpoint::any();
        deny_all.destination_ports = vec![kube_nsg::model::PortRange::ALL];
        add_rule(&mut inv, "subnet1/nsg1", deny_all);
    }
    let res = Resolved::new(&inv);
    assert_eq!(
        evaluate_flow(&res, &tcp(vm1, vm2, 8080)).access,
        Access::Deny
    );
    assert_eq!(evaluate_flow(&res, &tcp(vm2, vm1, 80)).access, Access::Deny);
}

fn nsg_mut<'a>(inv: &'a mut Inventory, id: &str) -> &'a mut kube_nsg::model::Nsg {
    let id: ObjectRef = id.parse().unwrap();
    inv.nsgs.iter_mut().find(|n| n.id == id).unwrap()
}

fn remove_rules(inv: &mut Inventory, nsg: &str) {
    nsg_mut(inv, nsg).rules.clear();
}

fn add_rule(inv: &mut Inventory, nsg: &str, rule: SecurityRule) {
    nsg_mut(inv, nsg).rules.push(rule);
}

fn deny_port_80_to_internet() -> SecurityRule {
    use kube_nsg::model::{AddressPrefix, Endpoint, PortRange};
    SecurityRule {
        name: "Deny-HTTP-Internet".into(),
        description: None,
        priority: 200,
        direction: Direction::Outbound,
        access: Access::Deny,
        protocol: Protocol::Tcp,
        source: Endpoint::any(),
        source_ports: vec![PortRange::ALL],
        destination: Endpoint::Prefixes(vec![AddressPrefix::Tag("Internet".into())]),
        destination_ports: vec![PortRange::new(80, 80)],
        is_default: false,
    }
}
