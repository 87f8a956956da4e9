//! End to end with real packets: the local control plane (tests/cluster), the `kube-nsg`
//! agent as a host process programming the node's nftables table, netns pods (tests/lab) for
//! the examples and random scenarios, and a prober that sends real TCP, UDP and ICMP between
//! every pair of pods and from the Internet stand-in, each verdict compared with the
//! reference evaluator. On a mismatch the failure shows the flow, the evaluator's deciding
//! rules, the kernel's per-rule counters and the agent's log.
//!
//! Needs root and the local control plane (started here with tests/cluster/up.sh): fails,
//! never skips, without them. One test at a time (they share the machine's one lab and the
//! node's one table); each uses namespaces and pod IPs of its own.

#[path = "lab/mod.rs"]
mod lab;

mod agent_support;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube_nsg::model::{Access, ObjectRef};

use agent_support::random::Layout;
use agent_support::*;
use lab::continuous::oracle;
use lab::{ContinuousSpec, Lab, Outcome, ProbeSpec, Target};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const REPORT_NS: &str = "agent-e2e-report";

/// A namespace name of this run: a namespace of an earlier run may still be terminating.
fn unique(base: &str) -> String {
    format!("{base}-{}", std::process::id())
}

/// examples/three-tier in namespace `ns`, its pods' addresses moved to 10.244.OCTET.0/24.
fn three_tier(ns: &str, octet: u8) -> PathBuf {
    copy_example(
        "three-tier",
        ns,
        &[
            ("three-tier", ns),
            ("10.244.1.", &format!("10.244.{octet}.")),
        ],
    )
}

fn targets() -> Vec<Target> {
    vec![
        Target::Tcp(80),
        Target::Tcp(1433),
        Target::Tcp(22),
        Target::Udp(53),
        Target::Udp(1434),
        Target::Icmp,
    ]
}

fn spec() -> ProbeSpec {
    ProbeSpec {
        targets: targets(),
        ..ProbeSpec::default()
    }
}

/// Everything a test needs: the cluster, the CRDs, the report namespace, no table left by
/// someone else.
async fn setup() -> kube::Client {
    let client = client().await;
    // Also the test's own namespaces, when an earlier run used their names.
    wait_no_namespace_terminating();
    ensure_crds();
    ensure_namespace(REPORT_NS);
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "inet", kube_nsg::nft::TABLE])
        .output();
    client
}

fn delete_namespaces(names: &[&str]) {
    for n in names {
        let _ = std::process::Command::new("kubectl")
            .args([
                "delete",
                "namespace",
                n,
                "--wait=false",
                "--ignore-not-found",
            ])
            .env("KUBECONFIG", KUBECONFIG)
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tier_matches_the_evaluator_replies_pass_and_hits_are_reported() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let ns = unique("agent-e2e-3tier");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 71);
    let files = vec![dir.clone()];
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let _table = TableGuard;
    let mut agent = start_agent("three-tier", &AgentConfig::new(REPORT_NS));
    agent.wait_ready(Duration::from_secs(30)).await;
    // The controller too (its NetworkPolicies are not enforced here: no CNI), for the
    // DataplaneProgrammed condition it derives from the agents' reports.
    let mut controller = start_controller("three-tier-controller", REPORT_NS);
    controller.wait_ready(Duration::from_secs(30)).await;
    apply_groups(&dir);
    let nsg = ObjectRef::new(ns, "nsg1");
    let took = wait_programmed(&client, REPORT_NS, std::slice::from_ref(&nsg), &[], &agent).await;
    let condition = wait_condition(&client, &nsg, "DataplaneProgrammed", "True", &controller).await;
    assert_eq!(
        condition.message,
        format!(
            "generation {} is programmed on 1 of 1 nodes",
            generation(&client, &nsg).await.unwrap()
        )
    );
    assert_eq!(dataplane_field(&client, &nsg).await.as_deref(), Some("1/1"));
    let inventory = inventory(&lab, &files);
    let report = probe_matches("three-tier", &lab, &inventory, &spec(), &agent).await;

    // Stateful: logic1 may open flows to the Internet (AllowInternetOutBound) while the
    // Internet may not open flows to logic1 (DenyAllInbound): the replies pass anyway.
    let logic1 = format!("{ns}/logic1");
    for target in [Target::Tcp(80), Target::Udp(53), Target::Icmp] {
        let out = report.find(&logic1, "internet", target).unwrap();
        assert_eq!(out.measured, Outcome::Allowed, "{}", out.describe());
        let back = report.find("internet", &logic1, target).unwrap();
        assert_eq!(back.expected.access, Access::Deny, "{}", back.describe());
        assert_eq!(back.measured, Outcome::NoAnswer, "{}", back.describe());
    }

    // The hits reach the Lease and /metrics: three sources were denied db1:1433 (web1,
    // web2, the Internet), each flow counted once (a retried SYN counts again).
    let deny_key = (
        nsg.clone(),
        kube_nsg::model::Direction::Inbound,
        "Deny-Database-All".to_string(),
    );
    let start = Instant::now();
    let hits = loop {
        let hits = node_report(&client, REPORT_NS)
            .await
            .map(|r| r.hits)
            .unwrap_or_default();
        if hits.get(&deny_key).copied().unwrap_or(0) >= 3 {
            break hits;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "hits not reported: {hits:?}\n{}",
            nft_counters(&inventory)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let denied_db = report
        .results
        .iter()
        .filter(|r| r.dst == format!("{ns}/db1") && r.target == Target::Tcp(1433))
        .filter(|r| r.measured == Outcome::NoAnswer)
        .count() as u64;
    assert!(hits[&deny_key] >= denied_db, "{hits:?}");
    let metrics = agent.metrics().await;
    let sample = format!(
        "kube_nsg_agent_rule_hits_total{{nsg=\"{ns}/nsg1\",direction=\"Inbound\",rule=\"Deny-Database-All\"}}"
    );
    assert!(
        metric(&metrics, &sample).unwrap_or(0.0) >= 3.0,
        "{sample} in\n{metrics}"
    );
    assert!(metric(&metrics, "kube_nsg_agent_syncs_total{kind=\"full\"}").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        metric(&metrics, "kube_nsg_agent_sync_errors_total"),
        Some(0.0)
    );
    // The same counts in `kube-nsg effective` (live mode: no -f).
    let out = std::process::Command::new(BIN)
        .args(["effective", "--pod", &format!("{ns}/db1"), "-o", "json"])
        .env("KUBECONFIG", KUBECONFIG)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stages: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let deny = stages[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "Deny-Database-All")
        .expect("Deny-Database-All in effective");
    assert!(deny["hits"].as_u64().unwrap() >= 3, "{deny}");

    drop(agent);
    drop(controller);
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
    eprintln!(
        "three-tier: programmed {:.0} ms after the first apply; {} flows probed in {:.2} s; \
         test {:.1} s",
        took.as_secs_f64() * 1e3,
        report.results.len(),
        report.elapsed_ms as f64 / 1e3,
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnet_and_nic_matches_the_evaluator() {
    let _serial = SERIAL.lock().await;
    let names: Vec<String> = (1..=3)
        .map(|i| unique(&format!("agent-e2e-subnet{i}")))
        .collect();
    let [s1, s2, s3] = [names[0].as_str(), names[1].as_str(), names[2].as_str()];
    let client = setup().await;
    let dir = copy_example(
        "subnet-and-nic",
        "subnet-and-nic",
        &[
            ("subnet1", s1),
            ("subnet2", s2),
            ("subnet3", s3),
            ("10.244.2.", "10.244.82."),
            ("10.244.3.", "10.244.83."),
            ("10.244.4.", "10.244.84."),
        ],
    );
    let files = vec![dir.clone()];
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let _table = TableGuard;
    let mut agent = start_agent("subnet-and-nic", &AgentConfig::new(REPORT_NS));
    agent.wait_ready(Duration::from_secs(30)).await;
    apply_groups(&dir);
    let nsgs = nsgs_in(&client, &[s1, s2]).await;
    assert_eq!(nsgs.len(), 3);
    wait_programmed(&client, REPORT_NS, &nsgs, &[], &agent).await;
    let inventory = inventory(&lab, &files);
    let report = probe_matches("subnet-and-nic", &lab, &inventory, &spec(), &agent).await;
    // Azure's example: vm1 takes HTTP from the Internet only because both its subnet group
    // and its interface group allow it; every flow was checked above, spot-check that one.
    let vm1 = report
        .find("internet", &format!("{s1}/vm1"), Target::Tcp(80))
        .unwrap();
    assert_eq!(vm1.measured, Outcome::Allowed, "{}", vm1.describe());
    drop(agent);
    lab.down().await.expect("lab down");
    delete_namespaces(&[s1, s2, s3]);
}

/// Seeds of the random scenarios: `KUBE_NSG_E2E_SEEDS=1,2,3` or the default six.
fn seeds() -> Vec<u64> {
    std::env::var("KUBE_NSG_E2E_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![11, 23, 42, 57, 64, 99])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_scenarios_match_the_evaluator() {
    let _serial = SERIAL.lock().await;
    let layout = Layout::new(&unique("agent-e2e-rand"), 90);
    let client = setup().await;
    let root = std::env::temp_dir().join("kube-nsg-agent-e2e-random");
    let _ = std::fs::remove_dir_all(&root);
    let pods = layout.write_pods(&root);
    let lab = Lab::up(std::slice::from_ref(&pods), &client)
        .await
        .expect("lab up");
    let _table = TableGuard;
    let mut agent = start_agent("random", &AgentConfig::new(REPORT_NS));
    agent.wait_ready(Duration::from_secs(30)).await;
    apply_yaml(&layout.asgs_yaml());
    let groups = root.join("groups");
    std::fs::create_dir_all(&groups).unwrap();
    std::fs::write(groups.join("asgs.yaml"), layout.asgs_yaml()).unwrap();
    let mut flows = 0;
    for seed in seeds() {
        let (yaml, present) = layout.nsgs(seed);
        let absent: Vec<ObjectRef> = layout
            .all_nsgs()
            .into_iter()
            .filter(|n| !present.contains(n))
            .collect();
        for n in &absent {
            let _ = std::process::Command::new("kubectl")
                .args([
                    "delete",
                    "networksecuritygroups.kubensg.io",
                    &n.name,
                    "-n",
                    &n.namespace,
                    "--ignore-not-found",
                ])
                .env("KUBECONFIG", KUBECONFIG)
                .output();
        }
        std::fs::write(groups.join("nsgs.yaml"), &yaml).unwrap();
        if !yaml.is_empty() {
            apply_yaml(&yaml);
        }
        wait_programmed(&client, REPORT_NS, &present, &absent, &agent).await;
        let files = vec![pods.clone(), groups.clone()];
        let inventory = inventory(&lab, &files);
        let report = lab.probe(&inventory, &spec()).await.unwrap();
        flows += report.results.len();
        if !report.mismatches.is_empty() {
            eprintln!("seed {seed}: the groups were\n{yaml}");
        }
        assert_no_mismatches(&format!("seed {seed}"), &report, &inventory, &agent);
        let denied = report
            .results
            .iter()
            .filter(|r| r.expected.access == Access::Deny)
            .count();
        eprintln!(
            "seed {seed}: {} groups, {} flows, {denied} denied, {:.2} s",
            present.len(),
            report.results.len(),
            report.elapsed_ms as f64 / 1e3
        );
    }
    assert!(flows > 0);
    drop(agent);
    lab.down().await.expect("lab down");
    delete_namespaces(&[&layout.a, &layout.b]);
}

/// The three-tier NSG without one of its rules.
fn without_rule(dir: &std::path::Path, rule: &str) -> PathBuf {
    let out = dir.with_file_name(format!(
        "{}-without-{rule}",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let text = if text.contains("kind: NetworkSecurityGroup") {
            // Rules are list items starting with "    - name: RULE".
            let mut keep = String::new();
            let mut skipping = false;
            for line in text.lines() {
                if line.starts_with("    - name: ") {
                    skipping = line.trim_end().ends_with(rule);
                }
                if !skipping {
                    keep.push_str(line);
                    keep.push('\n');
                }
            }
            keep
        } else {
            text
        };
        std::fs::write(out.join(path.file_name().unwrap()), text).unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_rule_keeps_established_connections() {
    let _serial = SERIAL.lock().await;
    let ns = unique("agent-e2e-established");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 72);
    let lab = Lab::up(std::slice::from_ref(&dir), &client)
        .await
        .expect("lab up");
    let _table = TableGuard;
    let nsg = ObjectRef::new(ns, "nsg1");
    let agent = start_agent_programmed(
        "established",
        &AgentConfig::new(REPORT_NS),
        &client,
        &dir,
        std::slice::from_ref(&nsg),
    )
    .await;
    let (logic1, db1) = (format!("{ns}/logic1"), format!("{ns}/db1"));
    let second = Duration::from_secs(1);
    // Opened with the agent's table in place (conntrack tracks it), allowed by rule 110.
    let held = lab
        .hold_tcp(&logic1, &db1, 1433, second)
        .await
        .expect("logic1 -> db1:1433 is allowed");
    assert_eq!(held.check(second).await.outcome, Outcome::Allowed);

    // Remove Allow-Database-BusinessLogic: new flows from logic1 meet Deny-Database-All.
    let edited = without_rule(&dir, "Allow-Database-BusinessLogic");
    apply_groups(&edited);
    wait_programmed(&client, REPORT_NS, &[nsg], &[], &agent).await;
    let inventory = inventory(&lab, std::slice::from_ref(&edited));
    let spec = ProbeSpec {
        targets: vec![Target::Tcp(1433)],
        endpoints: Some(vec![logic1.clone(), db1.clone()]),
        internet: false,
        ..ProbeSpec::default()
    };
    let report = probe_matches("after removing the rule", &lab, &inventory, &spec, &agent).await;
    let new_flow = report.find(&logic1, &db1, Target::Tcp(1433)).unwrap();
    assert_eq!(
        new_flow.measured,
        Outcome::NoAnswer,
        "{}",
        new_flow.describe()
    );
    assert!(new_flow.expected.reason.contains("Deny-Database-All"));
    // The established connection still passes, both ways.
    for _ in 0..3 {
        assert_eq!(
            held.check(second).await.outcome,
            Outcome::Allowed,
            "the established connection was cut\n{}",
            nft_counters(&inventory)
        );
    }
    held.close().await;
    drop(agent);
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_leaks_no_denied_flow_and_breaks_no_allowed_one() {
    let _serial = SERIAL.lock().await;
    let ns = unique("agent-e2e-restart");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 73);
    let files = vec![dir.clone()];
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let _table = TableGuard;
    let cfg = AgentConfig::new(REPORT_NS);
    let mut agent = start_agent_programmed(
        "restart-1",
        &cfg,
        &client,
        &dir,
        &[ObjectRef::new(ns, "nsg1")],
    )
    .await;
    let inventory = inventory(&lab, &files);
    let p = |s: &str| format!("{ns}/{s}");
    let second = Duration::from_secs(1);
    let held = lab
        .hold_tcp(&p("logic1"), &p("db1"), 1433, second)
        .await
        .expect("hold logic1 -> db1:1433");
    // Two allowed and two denied flows, a new one every 20 ms each.
    let mut probes = vec![];
    for (src, dst, target) in [
        (p("web1"), p("web2"), Target::Tcp(80)),
        ("internet".to_string(), p("web1"), Target::Tcp(80)),
        (p("web1"), p("db1"), Target::Tcp(1433)),
        ("internet".to_string(), p("logic1"), Target::Udp(53)),
    ] {
        let expect = oracle(inventory.clone());
        probes.push((
            format!("{src} -> {dst} {target}"),
            lab.continuous_probe(ContinuousSpec::new(&src, &dst, target), expect)
                .await
                .unwrap(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SIGTERM: the table stays; a new agent replaces it atomically on its first sync.
    let restart = Instant::now();
    assert_eq!(agent.stop(), Some(0), "{}", agent.log_tail(20));
    assert!(
        table_exists(),
        "the table is left in force when the agent stops"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut agent = start_agent("restart-2", &cfg);
    agent.wait_ready(Duration::from_secs(30)).await;
    let ready_after = restart.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, probe) in probes {
        let report = probe.stop().await;
        assert!(report.sent >= 20, "{name}: {report:?}");
        assert!(
            report.wrong.is_empty(),
            "{name}: {} of {} flows had the wrong verdict around the restart: {:?}\n{}",
            report.wrong.len(),
            report.sent,
            report.wrong,
            agent.log_tail(20)
        );
    }
    assert_eq!(held.check(second).await.outcome, Outcome::Allowed);
    held.close().await;
    let metrics = agent.metrics().await;
    assert_eq!(
        metric(&metrics, "kube_nsg_agent_syncs_total{kind=\"full\"}"),
        Some(1.0),
        "the new agent replaced the table once\n{metrics}"
    );
    drop(agent);
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
    eprintln!(
        "restart: the new agent was ready {:.0} ms after the old one got SIGTERM",
        ready_after.as_secs_f64() * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_nsg_restores_full_connectivity() {
    let _serial = SERIAL.lock().await;
    let ns = unique("agent-e2e-delete");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 74);
    let files = vec![dir.clone()];
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let _table = TableGuard;
    let nsg = ObjectRef::new(ns, "nsg1");
    let agent = start_agent_programmed(
        "delete",
        &AgentConfig::new(REPORT_NS),
        &client,
        &dir,
        std::slice::from_ref(&nsg),
    )
    .await;
    let inventory = inventory(&lab, &files);
    let report = probe_matches("with the group", &lab, &inventory, &spec(), &agent).await;
    assert!(
        report
            .results
            .iter()
            .any(|r| r.measured == Outcome::NoAnswer),
        "the group denies something"
    );

    kubectl(&[
        "delete",
        "networksecuritygroups.kubensg.io",
        "nsg1",
        "-n",
        ns,
    ]);
    wait_programmed(&client, REPORT_NS, &[], &[nsg], &agent).await;
    let mut open = inventory.clone();
    open.nsgs.clear();
    let report = probe_matches("after deleting the group", &lab, &open, &spec(), &agent).await;
    assert!(
        report
            .results
            .iter()
            .all(|r| r.measured == Outcome::Allowed),
        "{}",
        report.table()
    );
    drop(agent);
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_churn_updates_elements_and_drift_is_repaired() {
    let _serial = SERIAL.lock().await;
    let ns = unique("agent-e2e-churn");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 75);
    let files = vec![dir.clone()];
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let _table = TableGuard;
    // No periodic resync (a full compile) while the churn is watched; drift is still caught
    // by the counter poll.
    let config = AgentConfig {
        resync: "1h",
        ..AgentConfig::new(REPORT_NS)
    };
    let agent = start_agent_programmed(
        "churn",
        &config,
        &client,
        &dir,
        &[ObjectRef::new(ns, "nsg1")],
    )
    .await;
    let full = |m: &str| metric(m, "kube_nsg_agent_syncs_total{kind=\"full\"}").unwrap_or(0.0);
    let elements =
        |m: &str| metric(m, "kube_nsg_agent_syncs_total{kind=\"elements\"}").unwrap_or(0.0);
    let compiles = |m: &str, kind: &str| {
        metric(
            m,
            &format!("kube_nsg_agent_compiles_total{{kind=\"{kind}\"}}"),
        )
        .unwrap_or(0.0)
    };
    // Events of the setup may still be arriving (status and label writes): count from the
    // moment the agent has compiled nothing for a second.
    let settle = Instant::now();
    let mut before = agent.metrics().await;
    let mut still = Instant::now();
    while still.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = agent.metrics().await;
        let total = |m: &str| compiles(m, "full") + compiles(m, "pods");
        if total(&now) != total(&before) {
            still = Instant::now();
        }
        before = now;
        assert!(
            settle.elapsed() < Duration::from_secs(30),
            "the agent kept compiling:\n{}",
            agent.log_tail(30)
        );
    }

    // A new web pod elsewhere in the cluster (no network namespace: only its IP matters to
    // this node, as a member of asgweb): set elements change, the table is not replaced.
    apply_yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web9, namespace: {ns}, labels: {{tier: web}}}}\n\
         spec: {{nodeName: other-node, containers: [{{name: app, image: registry.k8s.io/pause:3.10}}]}}\n"
    ));
    kubectl(&[
        "patch",
        "pod",
        "web9",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"10.244.99.9","podIPs":[{"ip":"10.244.99.9"}]}}"#,
    ]);
    let start = Instant::now();
    loop {
        let now = agent.metrics().await;
        if elements(&now) > elements(&before) {
            assert_eq!(full(&now), full(&before), "pod churn replaced the table");
            assert_eq!(
                compiles(&now, "full"),
                compiles(&before, "full"),
                "pod churn compiled the table instead of updating it:\n{}",
                agent.log_tail(30)
            );
            assert!(compiles(&now, "pods") > compiles(&before, "pods"));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no element update:\n{now}\n{}",
            agent.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listing = std::process::Command::new("nft")
        .args(["list", "table", "inet", kube_nsg::nft::TABLE])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("10.244.99.9"));

    // Someone deletes the table: the agent notices at its next counter poll and puts it back.
    let removed = Instant::now();
    let nft = kube_nsg::nft::NftCommand::default();
    kube_nsg::nft::Nft::delete_table(&nft, kube_nsg::nft::TABLE).unwrap();
    while !table_exists() {
        assert!(
            removed.elapsed() < Duration::from_secs(15),
            "the table was not restored\n{}",
            agent.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restored = removed.elapsed();
    let mut inventory = inventory(&lab, &files);
    inventory.pods.push(kube_nsg::model::Pod {
        id: ObjectRef::new(ns, "web9"),
        labels: [("tier".to_string(), "web".to_string())].into(),
        annotations: Default::default(),
        ips: vec!["10.244.99.9".parse::<IpAddr>().unwrap()],
        node_name: Some("other-node".into()),
    });
    probe_matches("after the drift repair", &lab, &inventory, &spec(), &agent).await;
    let m = agent.metrics().await;
    assert!(
        metric(&m, "kube_nsg_agent_drift_repairs_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    // No kubelet confirms the deletion of a pod bound to a node: force it.
    kubectl(&[
        "delete",
        "pod",
        "web9",
        "-n",
        ns,
        "--grace-period=0",
        "--force",
    ]);
    drop(agent);
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
    eprintln!(
        "drift: the deleted table was back after {:.0} ms",
        restored.as_secs_f64() * 1e3
    );
}

/// A TCP relay to the API server that the test can cut (every connection, and new ones are
/// refused) and restore, standing for an API server the node cannot reach.
struct ApiRelay {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ApiRelay {
    async fn start(port: u16) -> ApiRelay {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("binding the relay");
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", 16443)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        ApiRelay {
            port,
            task: Some(task),
        }
    }

    /// Cuts every connection (the JoinSet of connections goes with the task).
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    fn kubeconfig(&self) -> String {
        let text = std::fs::read_to_string(KUBECONFIG).unwrap();
        let path = std::env::temp_dir().join("kube-nsg-agent-e2e-relay.kubeconfig");
        std::fs::write(
            &path,
            text.replace("127.0.0.1:16443", &format!("127.0.0.1:{}", self.port)),
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_keeps_the_table_enforced() {
    let _serial = SERIAL.lock().await;
    let ns = unique("agent-e2e-offline");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 76);
    let files = vec![dir.clone()];
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let _table = TableGuard;
    let mut relay = ApiRelay::start(0).await;
    let mut cfg = AgentConfig::new(REPORT_NS);
    cfg.kubeconfig = relay.kubeconfig();
    cfg.resync = "1s";
    let nsg = ObjectRef::new(ns, "nsg1");
    let mut agent =
        start_agent_programmed("offline", &cfg, &client, &dir, std::slice::from_ref(&nsg)).await;
    let inventory = inventory(&lab, &files);

    // The node loses the API server. Resyncs and drift checks keep running on the cached
    // view; nothing is removed.
    relay.cut();
    let port = relay.port;
    // A change the agent cannot see while cut off.
    let edited = without_rule(&dir, "Deny-Database-All");
    apply_groups(&edited);
    tokio::time::sleep(Duration::from_secs(4)).await;
    probe_matches(
        "while the API server is unreachable",
        &lab,
        &inventory,
        &spec(),
        &agent,
    )
    .await;
    assert_eq!(
        agent.http_get("/readyz").await.map(|r| r.0),
        Some(200),
        "still ready: the table is in force"
    );
    let m = agent.metrics().await;
    assert!(
        metric(&m, "kube_nsg_agent_report_errors_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "kube_nsg_agent_syncs_total{kind=\"unchanged\"}").unwrap_or(0.0) >= 2.0,
        "resyncs ran meanwhile\n{m}"
    );

    // An agent restarted while the API server is unreachable cannot list anything: it leaves
    // the table alone (the previous agent's ruleset keeps enforcing) and is not ready.
    assert_eq!(agent.stop(), Some(0));
    let mut agent = start_agent("offline-restarted", &cfg);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agent.http_get("/readyz").await.map(|r| r.0), Some(503));
    probe_matches(
        "a new agent without the API server",
        &lab,
        &inventory,
        &spec(),
        &agent,
    )
    .await;

    // Back: the agent catches up with the change it missed.
    let _relay = ApiRelay::start(port).await;
    agent.wait_ready(Duration::from_secs(30)).await;
    wait_programmed(&client, REPORT_NS, &[nsg], &[], &agent).await;
    let caught_up = agent_support::inventory(&lab, std::slice::from_ref(&edited));
    probe_matches(
        "after the API server is back",
        &lab,
        &caught_up,
        &spec(),
        &agent,
    )
    .await;
    drop(agent);
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_leaves_the_table_and_cleanup_removes_it() {
    let _serial = SERIAL.lock().await;
    let ns = unique("agent-e2e-cleanup");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 77);
    let files = vec![dir.clone()];
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let _table = TableGuard;
    let mut agent = start_agent_programmed(
        "cleanup",
        &AgentConfig::new(REPORT_NS),
        &client,
        &dir,
        &[ObjectRef::new(ns, "nsg1")],
    )
    .await;
    assert_eq!(agent.stop(), Some(0));
    // Stopped: the table still enforces the groups.
    let inventory = inventory(&lab, &files);
    probe_matches("after SIGTERM", &lab, &inventory, &spec(), &agent).await;

    let cleanup = || {
        std::process::Command::new(BIN)
            .args([
                "agent",
                "--cleanup",
                "--node-name",
                NODE,
                "--report-namespace",
                REPORT_NS,
            ])
            .env("KUBECONFIG", KUBECONFIG)
            .output()
            .unwrap()
    };
    let out = cleanup();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!table_exists());
    assert!(
        node_report(&client, REPORT_NS).await.is_none(),
        "the Lease is gone"
    );
    let again = cleanup();
    assert!(
        again.status.success(),
        "idempotent: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let mut open = inventory.clone();
    open.nsgs.clear();
    probe_matches("after --cleanup", &lab, &open, &spec(), &agent).await;
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
}

/// One ping from the node itself (its address 10.255.0.1 is the route's source) to `ip`.
fn ping_from_node(ip: &str) -> bool {
    std::process::Command::new("ping")
        .args([
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            lab::NODE_IP.to_string().as_str(),
            ip,
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_traffic_is_enforced_or_exempt() {
    let _serial = SERIAL.lock().await;
    let ns = unique("agent-e2e-host");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 78);
    let lab = Lab::up(std::slice::from_ref(&dir), &client)
        .await
        .expect("lab up");
    let _table = TableGuard;
    let web1 = "10.244.78.11";
    assert!(
        ping_from_node(web1),
        "the node reaches its pod without a group"
    );
    // Kubelet probes come from the node's addresses, the AzureLoadBalancer tag.
    apply_yaml(&format!(
        "apiVersion: kubensg.io/v1alpha1\nkind: NetworkSecurityGroup\nmetadata: {{name: deny-node, namespace: {ns}}}\n\
         spec:\n  subnet: true\n  securityRules:\n  - {{name: Deny-Probes, priority: 100, direction: Inbound, access: Deny, \
         protocol: Icmp, sourceAddressPrefix: AzureLoadBalancer, destinationAddressPrefix: '*'}}\n"
    ));
    let nsg = ObjectRef::new(ns, "deny-node");
    for (mode, passes) in [("enforce", false), ("exempt", true)] {
        let mut cfg = AgentConfig::new(REPORT_NS);
        cfg.extra = vec!["--host-traffic".into(), mode.into()];
        let mut agent = start_agent(&format!("host-{mode}"), &cfg);
        agent.wait_ready(Duration::from_secs(30)).await;
        wait_programmed(&client, REPORT_NS, std::slice::from_ref(&nsg), &[], &agent).await;
        assert_eq!(
            ping_from_node(web1),
            passes,
            "--host-traffic {mode}: node -> pod ICMP\n{}",
            agent.log_tail(10)
        );
        drop(agent);
    }
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_agents_daemonset_removes_the_table_a_restart_does_not() {
    let _serial = SERIAL.lock().await;
    let ns = unique("agent-e2e-uninstall");
    let ns = ns.as_str();
    let client = setup().await;
    let dir = three_tier(ns, 79);
    let files = vec![dir.clone()];
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let _table = TableGuard;
    // The agent's DaemonSet and its Pod as the API holds them (no DaemonSet controller runs
    // here: the objects only say who owns the agent).
    let daemonset = |name: &str| {
        format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n\
             \x20   spec: {{containers: [{{name: agent, image: kube-nsg}}]}}\n"
        )
    };
    apply_yaml(&daemonset("kube-nsg-agent"));
    let uid = kubectl(&[
        "get",
        "daemonset",
        "kube-nsg-agent",
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    apply_yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-nsg-agent-x1\n  namespace: {ns}\n  ownerReferences:\n\
         \x20 - {{apiVersion: apps/v1, kind: DaemonSet, name: kube-nsg-agent, uid: {uid}, controller: true}}\n\
         spec: {{containers: [{{name: agent, image: kube-nsg}}]}}\n"
    ));
    let mut cfg = AgentConfig::new(REPORT_NS);
    cfg.env = vec![
        ("POD_NAME".into(), "kube-nsg-agent-x1".into()),
        ("POD_NAMESPACE".into(), ns.into()),
    ];
    let nsg = ObjectRef::new(ns, "nsg1");
    let mut agent = start_agent_programmed(
        "uninstall-1",
        &cfg,
        &client,
        &dir,
        std::slice::from_ref(&nsg),
    )
    .await;
    // Stopped while its DaemonSet exists: a restart, the table stays.
    assert_eq!(agent.stop(), Some(0));
    assert!(table_exists(), "{}", agent.log_tail(10));
    assert!(agent.log_tail(5).contains("the table stays in force"));

    let mut agent = start_agent("uninstall-2", &cfg);
    agent.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the owner lookup is done
    kubectl(&["delete", "daemonset", "kube-nsg-agent", "-n", ns]);
    assert_eq!(agent.stop(), Some(0));
    assert!(
        !table_exists(),
        "the DaemonSet is gone: uninstall\n{}",
        agent.log_tail(10)
    );
    assert!(
        node_report(&client, REPORT_NS).await.is_none(),
        "the Lease is gone"
    );
    let mut open = agent_support::inventory(&lab, &files);
    open.nsgs.clear();
    probe_matches("after the uninstall", &lab, &open, &spec(), &agent).await;
    let _ = std::process::Command::new("kubectl")
        .args([
            "delete",
            "pod",
            "kube-nsg-agent-x1",
            "-n",
            ns,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
        ])
        .env("KUBECONFIG", KUBECONFIG)
        .output();
    lab.down().await.expect("lab down");
    delete_namespaces(&[ns]);
}
