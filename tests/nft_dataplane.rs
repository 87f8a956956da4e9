//! Real packets through the compiled table: netns pods on this machine, real TCP, UDP and
//! ICMP between them (IPv4 and IPv6, through the forward hook) and from the host (output
//! hook), every verdict compared with the reference evaluator. Needs root and nft; fails,
//! never skips, without them.

mod nft_support;

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kube_nsg::eval::{Packet, evaluate_flow};
use kube_nsg::model::*;
use kube_nsg::nft::{self, CompileOptions, Nft, NftCommand};
use kube_nsg::resolve::Resolved;
use nft_support::examples::{asg, asgs, pod, prefixes, rule, three_tier_rules};
use nft_support::netns::{GATEWAY4, Lab, NetnsPod};

const TCP_PORTS: [u16; 4] = [80, 1433, 5432, 8080];

fn require_root_and_nft() {
    let out = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "the dataplane tests need root"
    );
    if let Err(e) = NftCommand::default().apply(&nft::render_delete("kube-nsg-probe-missing")) {
        panic!("nft does not work here: {e}. Install nftables; these tests do not skip");
    }
    for tool in ["socat", "ping"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .status()
                .unwrap()
                .success(),
            "{tool} is needed (apt-get install socat iputils-ping)"
        );
    }
}

/// The three-tier example on netns pods, plus rules NetworkPolicy cannot express: an ICMP
/// deny, a source-port deny, and an outbound NIC-level group.
fn inventory(web: &NetnsPod, logic: &NetnsPod, db: &NetnsPod, with_echo: bool) -> Inventory {
    use Access::*;
    use Direction::*;
    let ns = "shop";
    let mut sport_deny = rule(
        "Deny-Db-HighSourcePorts",
        140,
        Inbound,
        Deny,
        Protocol::Tcp,
        prefixes(&["VirtualNetwork"]),
        asgs(ns, &["asg-db"]),
        "*",
    );
    sport_deny.source_ports = vec!["6000-6999".parse().unwrap()];
    let mut subnet_rules = three_tier_rules(ns);
    subnet_rules.extend([
        rule(
            "Deny-Ping-Web",
            130,
            Inbound,
            Deny,
            Protocol::Icmp,
            prefixes(&["*"]),
            asgs(ns, &["asg-web"]),
            "*",
        ),
        sport_deny,
    ]);
    if with_echo {
        subnet_rules.push(rule(
            "Allow-Echo-Internet",
            105,
            Inbound,
            Allow,
            Protocol::Tcp,
            prefixes(&["Internet"]),
            asgs(ns, &["asg-web"]),
            "8080",
        ));
    }
    let group = |name: &str, subnet, pod_selector, rules| Nsg {
        id: ObjectRef::new(ns, name),
        created: Some("2026-01-01T00:00:00Z".into()),
        generation: Some(1),
        subnet,
        pod_selector,
        rules,
    };
    let logic_only = Some(LabelSelector {
        match_labels: [("app".to_string(), "logic".to_string())].into(),
        match_expressions: vec![],
    });
    let ips = |p: &NetnsPod| [p.ip4.to_string(), p.ip6.to_string()];
    let (w, l, d) = (ips(web), ips(logic), ips(db));
    Inventory {
        nsgs: vec![
            group("shop-subnet", true, None, subnet_rules),
            group(
                "logic-nic",
                false,
                logic_only,
                vec![
                    rule(
                        "Deny-DNS-Out",
                        100,
                        Outbound,
                        Deny,
                        Protocol::Udp,
                        prefixes(&["*"]),
                        prefixes(&["*"]),
                        "53",
                    ),
                    rule(
                        "Deny-Internet-Tcp-Out",
                        110,
                        Outbound,
                        Deny,
                        Protocol::Tcp,
                        prefixes(&["*"]),
                        prefixes(&["Internet"]),
                        "*",
                    ),
                ],
            ),
        ],
        asgs: vec![
            asg(ns, "asg-web", "web"),
            asg(ns, "asg-logic", "logic"),
            asg(ns, "asg-db", "db"),
        ],
        service_tags: vec![],
        pods: vec![
            pod(ns, "web1", "web", &[&w[0], &w[1]], "node-1"),
            pod(ns, "logic1", "logic", &[&l[0], &l[1]], "node-1"),
            pod(ns, "db1", "db", &[&d[0], &d[1]], "node-1"),
        ],
        namespaces: vec![],
        virtual_network: vec![
            "10.250.1.0/24".parse().unwrap(),
            "fd00:250::/64".parse().unwrap(),
        ],
        node_ips: vec![GATEWAY4.parse().unwrap()],
    }
}

fn spawn(mut c: Command) -> Child {
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Answers "ok" on every probed port, both families.
fn listen(p: &NetnsPod, servers: &mut Vec<Child>) {
    for port in TCP_PORTS {
        for (kind, extra) in [("TCP4-LISTEN", ""), ("TCP6-LISTEN", ",ipv6only=1")] {
            let mut c = p.cmd("socat");
            let answer = if port == 8080 {
                "PIPE".to_string()
            } else {
                "SYSTEM:echo ok".to_string()
            };
            c.args([format!("{kind}:{port},fork,reuseaddr{extra}"), answer]);
            servers.push(spawn(c));
        }
    }
    // UDP arrivals are recorded by a table of the pod's own: a datagram has no answer to wait
    // for, and a forking UDP server loses some under parallel probes.
    let seen = "table inet probe {
        set seen4 { type ipv4_addr . inet_service . inet_service; flags dynamic; }
        set seen6 { type ipv6_addr . inet_service . inet_service; flags dynamic; }
        chain input {
            type filter hook input priority filter; policy accept;
            meta l4proto udp add @seen4 { ip saddr . udp sport . udp dport }
            meta l4proto udp add @seen6 { ip6 saddr . udp sport . udp dport }
        }
    }";
    let mut c = p.cmd("nft");
    c.args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(seen.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "probe table in {}", p.ns);
}

/// Whether the pod's probe table saw a UDP datagram from `src:sport` to `dport`.
fn udp_seen(p: &NetnsPod, src: IpAddr, sport: u16, dport: u16) -> bool {
    let set = if src.is_ipv4() { "seen4" } else { "seen6" };
    let mut c = p.cmd("nft");
    c.args([
        "get",
        "element",
        "inet",
        "probe",
        set,
        &format!("{{ {src} . {sport} . {dport} }}"),
    ]);
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    protocol: Protocol,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

fn addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// Starts a probe from `from` (`None`: the host) and returns the process to wait for.
fn start(from: Option<&NetnsPod>, p: &Probe) -> Child {
    let mut c = match (from, p.protocol) {
        (Some(pod), Protocol::Icmp) => pod.cmd("ping"),
        (Some(pod), _) => pod.cmd("socat"),
        (None, Protocol::Icmp) => Command::new("ping"),
        (None, _) => Command::new("socat"),
    };
    let fam = if p.dst.is_ipv4() { "4" } else { "6" };
    match p.protocol {
        Protocol::Icmp => {
            c.args(["-c1", "-W1", &p.dst.to_string()]);
        }
        Protocol::Tcp => {
            c.args([
                "-T2",
                "-",
                &format!(
                    "TCP{fam}:{}:{},connect-timeout=1,sourceport={},reuseaddr",
                    addr(p.dst),
                    p.dport,
                    p.sport
                ),
            ]);
        }
        _ => {
            c.args([
                "-u",
                "-",
                &format!(
                    "UDP{fam}:{}:{},sourceport={},reuseaddr",
                    addr(p.dst),
                    p.dport,
                    p.sport
                ),
            ]);
        }
    }
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if p.protocol == Protocol::Udp {
        let _ = stdin.write_all(b"x\n");
    }
    drop(stdin);
    child
}

/// Whether the probe got through: an answer for TCP and ICMP, an arrival for UDP.
fn reached(lab: &Lab, p: &Probe, child: Child) -> bool {
    let out = child.wait_with_output().unwrap();
    match p.protocol {
        Protocol::Icmp => out.status.success(),
        Protocol::Udp => {
            let to = lab
                .pods
                .iter()
                .find(|q| ip_of(q, p.dst.is_ipv6()) == p.dst)
                .expect("a pod");
            (0..10).any(|i| {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                udp_seen(to, p.src, p.sport, p.dport)
            })
        }
        _ => String::from_utf8_lossy(&out.stdout).contains("ok"),
    }
}

/// Runs probes in parallel batches; returns whether each got through.
fn run_probes(lab: &Lab, probes: &[(Option<usize>, Probe)]) -> Vec<bool> {
    let mut results = Vec::new();
    for batch in probes.chunks(40) {
        let children: Vec<Child> = batch
            .iter()
            .map(|(from, p)| start(from.map(|i| &lab.pods[i]), p))
            .collect();
        let done: Vec<(&Probe, Child)> = batch.iter().map(|(_, p)| p).zip(children).collect();
        results.extend(done.into_iter().map(|(p, c)| reached(lab, p, c)));
    }
    results
}

struct TableGuard(String);

impl Drop for TableGuard {
    fn drop(&mut self) {
        let _ = NftCommand::default().delete_table(&self.0);
    }
}

fn ip_of(p: &NetnsPod, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(p.ip6)
    } else {
        IpAddr::V4(p.ip4)
    }
}

#[test]
fn real_packets_get_the_evaluators_verdicts() {
    require_root_and_nft();
    let mut lab = Lab::new("dp");
    let web = lab.add("10.250.1.10", "fd00:250::10");
    let logic = lab.add("10.250.1.20", "fd00:250::20");
    let db = lab.add("10.250.1.30", "fd00:250::30");
    let outside = lab.add("10.250.200.10", "fd00:250:0:200::10"); // Internet: not a pod
    let mut servers = Vec::new();
    for p in &lab.pods {
        listen(p, &mut servers);
    }
    let inv = inventory(&lab.pods[web], &lab.pods[logic], &lab.pods[db], true);
    let res = Resolved::new(&inv);
    let table = format!("kube-nsg-dp-{}", std::process::id());
    let _guard = TableGuard(table.clone());
    let opts = CompileOptions {
        table: table.clone(),
        ..Default::default()
    };
    let nftc = NftCommand::default();
    let mut current = None;
    nft::sync(
        &nftc,
        &mut current,
        nft::compile_with(&res, Some("node-1"), &opts),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300)); // listeners up

    // (protocol, destination port, source port base)
    let kinds = [
        (Protocol::Tcp, 80, 20000),
        (Protocol::Tcp, 1433, 21000),
        (Protocol::Tcp, 5432, 6100), // Deny-Db-HighSourcePorts
        (Protocol::Tcp, 5432, 5000),
        (Protocol::Udp, 53, 22000),
        (Protocol::Udp, 54, 23000),
        (Protocol::Icmp, 0, 0),
    ];
    let mut probes = Vec::new();
    let mut n = 0u16;
    for v6 in [false, true] {
        for from in [web, logic, db, outside] {
            for to in [web, logic, db, outside] {
                if from == to {
                    continue;
                }
                for (protocol, dport, base) in kinds {
                    n += 1;
                    let (src, dst) = (ip_of(&lab.pods[from], v6), ip_of(&lab.pods[to], v6));
                    probes.push((
                        Some(from),
                        Probe {
                            protocol,
                            src,
                            dst,
                            sport: base + n % 500,
                            dport,
                        },
                    ));
                }
            }
        }
    }
    // From the node itself (IPv4: the host's source is the gateway address, a node IP).
    for to in [web, logic, db] {
        for (protocol, dport, base) in kinds {
            n += 1;
            let dst = ip_of(&lab.pods[to], false);
            let src: IpAddr = GATEWAY4.parse().unwrap();
            probes.push((
                None,
                Probe {
                    protocol,
                    src,
                    dst,
                    sport: base + n % 500,
                    dport,
                },
            ));
        }
    }

    let results = run_probes(&lab, &probes);
    let mut mismatches = Vec::new();
    let (mut allowed, mut denied) = (0, 0);
    for ((_, p), got) in probes.iter().zip(&results) {
        let packet = Packet {
            protocol: p.protocol,
            src: p.src,
            src_port: p.sport,
            dst: p.dst,
            dst_port: p.dport,
        };
        let want = evaluate_flow(&res, &packet).access == Access::Allow;
        if want {
            allowed += 1
        } else {
            denied += 1
        }
        if want != *got {
            mismatches.push(format!("{p:?}: evaluator {want}, packets {got}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} probes disagree:\n{}",
        mismatches.len(),
        probes.len(),
        mismatches.join("\n")
    );
    assert!(
        allowed > 30 && denied > 30,
        "allowed {allowed}, denied {denied}: the scenario must exercise both"
    );

    // Counters show which rules decided.
    let rs = current.clone().unwrap();
    let counters = nft::read_counters(&nftc, &rs).unwrap();
    let hits = |name: &str| {
        counters
            .iter()
            .filter(|c| c.rule.rule == name)
            .map(|c| c.packets)
            .sum::<u64>()
    };
    for rule in [
        "Allow-HTTP-Inbound-Internet",
        "Deny-Database-All",
        "Deny-Ping-Web",
        "Deny-Db-HighSourcePorts",
        "Deny-DNS-Out",
    ] {
        assert!(hits(rule) > 0, "no hits counted for {rule}: {counters:?}");
    }

    // An established connection survives the removal of the rule that allowed it (as in
    // Azure); a new one is refused.
    let target = lab.pods[web].ip4;
    let mut c = lab.pods[outside].cmd("socat");
    c.args(["-", &format!("TCP4:{target}:8080,connect-timeout=1")]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut echo = c.spawn().unwrap();
    let mut stdin = echo.stdin.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = echo.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    writeln!(stdin, "before").unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(3)).ok().as_deref(),
        Some("before")
    );
    let inv2 = inventory(&lab.pods[web], &lab.pods[logic], &lab.pods[db], false);
    let res2 = Resolved::new(&inv2);
    let applied = nft::sync(
        &nftc,
        &mut current,
        nft::compile_with(&res2, Some("node-1"), &opts),
    )
    .unwrap();
    assert_eq!(applied, nft::Applied::Replaced);
    writeln!(stdin, "after").unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(3)).ok().as_deref(),
        Some("after"),
        "the established flow was cut"
    );
    let fresh = Probe {
        protocol: Protocol::Tcp,
        src: IpAddr::V4(lab.pods[outside].ip4),
        dst: IpAddr::V4(target),
        sport: 24001,
        dport: 8080,
    };
    assert!(
        !run_probes(&lab, &[(Some(outside), fresh)])[0],
        "a new flow passed a removed rule"
    );
    drop(stdin);
    let _ = echo.kill();
    let _ = echo.wait();
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    nftc.delete_table(&table).unwrap();
    assert_eq!(nftc.read_table(&table).unwrap(), None);
}
