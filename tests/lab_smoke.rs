//! The lab itself (tests/lab): netns pods registered in the local control plane, probed with
//! real packets. With no enforcement every flow passes; a hand-written nftables drop is
//! measured as exactly that flow; the prober reports a wrong expectation as a mismatch.
//!
//! Needs root and the local control plane (started here with tests/cluster/up.sh): fails,
//! never skips, without them.

#[path = "lab/mod.rs"]
mod lab;

mod agent_support;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube_nsg::model::Access;

use agent_support::{KUBECONFIG, client};
use lab::continuous::always;
use lab::{ContinuousSpec, Expectation, Lab, Outcome, ProbeSpec, Target};

const DB1: &str = "10.244.1.31";

/// One test at a time in this binary: they share the machine's one lab.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// examples/three-tier with its namespace renamed, so this test's objects are its own on a
/// control plane others may use at the same time.
fn three_tier(namespace: &str) -> Vec<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kube-nsg-{namespace}"));
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-tier");
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            dir.join(path.file_name().unwrap()),
            text.replace("three-tier", namespace),
        )
        .unwrap();
    }
    vec![dir]
}

/// An nftables table of the test's own, deleted when dropped (a failing test included).
struct NftTable(&'static str);

impl NftTable {
    fn install(name: &'static str, chain_body: &str) -> NftTable {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", name])
            .output();
        let table = NftTable(name);
        let ruleset = format!(
            "table inet {name} {{\n chain lab {{\n  type filter hook forward priority 0;\n  \
             {chain_body}\n }}\n}}\n"
        );
        lab::net::run(Command::new("nft").args(["-f", "-"]), Some(&ruleset))
            .expect("installing the test's nftables table");
        table
    }
}

impl NftTable {
    /// Replaces the chain's rules in one transaction.
    fn set_rules(&self, rules: &[&str]) {
        let mut script = format!("flush chain inet {} lab\n", self.0);
        for rule in rules {
            script += &format!("add rule inet {} lab {rule}\n", self.0);
        }
        lab::net::run(Command::new("nft").args(["-f", "-"]), Some(&script))
            .expect("changing the test's nftables table");
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", self.0])
            .output();
    }
}

fn all_allowed(_: &kube_nsg::eval::Packet) -> Expectation {
    Expectation::allow("no enforcement")
}

/// Allowed, except TCP to db1:1433.
fn db1_1433_dropped(p: &kube_nsg::eval::Packet) -> Expectation {
    if p.dst == DB1.parse::<IpAddr>().unwrap()
        && p.protocol == kube_nsg::model::Protocol::Tcp
        && p.dst_port == 1433
    {
        Expectation::deny("the test's table drops it")
    } else {
        Expectation::allow("no rule for it")
    }
}

fn lab_leftovers(lab_netns: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    let netns = lab::net::ip(&["netns", "list"]).unwrap();
    for ns in lab_netns {
        if netns
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns))
        {
            left.push(format!("netns {ns}"));
        }
    }
    for l in lab::net::ip(&["-br", "link"]).unwrap().lines() {
        if l.starts_with(lab::net::VETH_PREFIX) || l.starts_with(lab::net::DUMMY) {
            left.push(format!("link {l}"));
        }
    }
    for family in ["-4", "-6"] {
        let routes = lab::net::ip(&[family, "route", "show", "proto", "252"]).unwrap();
        left.extend(routes.lines().map(|r| format!("route {r}")));
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enforcement_every_flow_passes_and_down_cleans_up() {
    let _serial = SERIAL.lock().await;
    let client = client().await;
    let files = three_tier("lab-smoke-open");
    let t = Instant::now();
    let lab = Lab::up(&files, &client).await.expect("lab up");
    let up = t.elapsed();

    // The API sees four running, ready pods with their IPs on the lab's node.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "lab-smoke-open");
    let db1 = pods.get("db1").await.unwrap();
    let status = db1.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some(DB1));
    assert!(
        status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    assert_eq!(db1.spec.unwrap().node_name.as_deref(), Some("lab-node"));
    let node = Api::<Node>::all(client.clone())
        .get("lab-node")
        .await
        .unwrap();
    let addresses = node.status.unwrap().addresses.unwrap();
    assert!(
        addresses
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "10.255.0.1")
    );

    // No agent: every flow of the matrix passes, both ways.
    let spec = ProbeSpec::default();
    let t = Instant::now();
    let report = lab.probe_with(&spec, &all_allowed).await.unwrap();
    let probe = t.elapsed();
    assert_eq!(report.results.len(), 5 * 4 * 4, "5 endpoints, 4 targets");
    assert!(report.mismatches.is_empty(), "{}", report.table());

    // Against the evaluator the same measurements disagree exactly where three-tier's
    // rules deny: unexpected successes, reported on the first attempt (never retried).
    let inventory = lab.inventory(&files).unwrap();
    let report = lab.probe(&inventory, &spec).await.unwrap();
    let denied: BTreeSet<_> = report
        .results
        .iter()
        .filter(|r| r.expected.access == Access::Deny)
        .map(|r| (r.src.clone(), r.dst.clone(), r.target))
        .collect();
    let mismatched: BTreeSet<_> = report
        .mismatches
        .iter()
        .map(|r| (r.src.clone(), r.dst.clone(), r.target))
        .collect();
    assert_eq!(denied, mismatched, "{}", report.table());
    assert!(denied.contains(&(
        "lab-smoke-open/web1".into(),
        "lab-smoke-open/db1".into(),
        Target::Tcp(1433)
    )));
    assert!(
        report
            .mismatches
            .iter()
            .all(|m| m.measured == Outcome::Allowed && m.attempts.len() == 1)
    );
    let web1_db1 = report
        .find(
            "lab-smoke-open/web1",
            "lab-smoke-open/db1",
            Target::Tcp(1433),
        )
        .unwrap();
    assert!(
        web1_db1.describe().contains("Deny-Database-All (120)"),
        "{}",
        web1_db1.describe()
    );

    let netns: Vec<String> = lab.endpoints.iter().map(|e| e.netns.clone()).collect();
    let t = Instant::now();
    lab.down().await.expect("lab down");
    let down = t.elapsed();
    assert_eq!(lab_leftovers(&netns), Vec::<String>::new());
    assert!(pods.get_opt("db1").await.unwrap().is_none());
    assert!(
        Api::<Node>::all(client.clone())
            .get_opt("lab-node")
            .await
            .unwrap()
            .is_none()
    );
    assert!(!Path::new(lab::state::STATE_DIR).join("state.json").exists());
    eprintln!(
        "timings: up {:.2} s, probe of {} flows {:.2} s, down {:.2} s",
        up.as_secs_f64(),
        report.results.len(),
        probe.as_secs_f64(),
        down.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_drop_is_measured_and_a_wrong_expectation_is_a_mismatch() {
    let _serial = SERIAL.lock().await;
    let client = client().await;
    let lab = Lab::up(&three_tier("lab-smoke-drop"), &client)
        .await
        .expect("lab up");
    let _table = NftTable::install("lab-test", &format!("ip daddr {DB1} tcp dport 1433 drop"));
    let spec = ProbeSpec::default();

    let report = lab.probe_with(&spec, &db1_1433_dropped).await.unwrap();
    assert!(report.mismatches.is_empty(), "{}", report.table());
    let dropped: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.measured == Outcome::NoAnswer)
        .map(|r| (r.src.as_str(), r.dst.as_str(), r.target))
        .collect();
    assert_eq!(
        dropped,
        [
            (
                "lab-smoke-drop/web1",
                "lab-smoke-drop/db1",
                Target::Tcp(1433)
            ),
            (
                "lab-smoke-drop/web2",
                "lab-smoke-drop/db1",
                Target::Tcp(1433)
            ),
            (
                "lab-smoke-drop/logic1",
                "lab-smoke-drop/db1",
                Target::Tcp(1433)
            ),
            ("internet", "lab-smoke-drop/db1", Target::Tcp(1433)),
        ],
        "{}",
        report.table()
    );

    // A wrong expectation both ways: everything allowed (but the table drops four flows),
    // and web1 -> web2 tcp:80 denied (but it passes).
    let wrong = |p: &kube_nsg::eval::Packet| {
        if p.src == "10.244.1.11".parse::<IpAddr>().unwrap()
            && p.dst == "10.244.1.12".parse::<IpAddr>().unwrap()
            && p.dst_port == 80
            && p.protocol == kube_nsg::model::Protocol::Tcp
        {
            Expectation::deny("wrong on purpose")
        } else {
            Expectation::allow("wrong on purpose for db1:1433")
        }
    };
    let report = lab.probe_with(&spec, &wrong).await.unwrap();
    let table = report.table();
    assert_eq!(report.mismatches.len(), 5, "{table}");
    let leak = report
        .find(
            "lab-smoke-drop/web1",
            "lab-smoke-drop/web2",
            Target::Tcp(80),
        )
        .unwrap();
    assert!(
        leak.mismatch && leak.measured == Outcome::Allowed,
        "{table}"
    );
    assert_eq!(
        leak.attempts.len(),
        1,
        "an unexpected success is never retried"
    );
    for m in report
        .mismatches
        .iter()
        .filter(|m| m.dst == "lab-smoke-drop/db1")
    {
        assert_eq!(m.target, Target::Tcp(1433), "{table}");
        assert_eq!(m.measured, Outcome::NoAnswer, "{table}");
        assert_eq!(m.attempts.len(), 2, "an unexpected failure is retried once");
        assert_ne!(
            m.attempts[0].src_port, m.attempts[1].src_port,
            "a retry is a new flow"
        );
    }
    assert!(
        table.contains("MISMATCH tcp:80 lab-smoke-drop/web1 10.244.1.11:"),
        "{table}"
    );
    assert!(table.contains("measured no answer"), "{table}");
    lab.down().await.expect("lab down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_probes_and_held_connections_see_a_rule_change() {
    let _serial = SERIAL.lock().await;
    let client = client().await;
    let lab = Lab::up(&three_tier("lab-smoke-live"), &client)
        .await
        .expect("lab up");
    let web1 = "lab-smoke-live/web1";
    let web2 = "lab-smoke-live/web2";
    let db1 = "lab-smoke-live/db1";
    let second = Duration::from_secs(1);
    // Conntrack only tracks connections in a network namespace once some rule uses it: a
    // connection opened before that is picked up mid-stream later as a *new* flow. So the
    // table (and its `ct state` rule) exists before the held connection is opened.
    let table = NftTable::install("lab-test", "ct state established,related accept");
    let held = lab.hold_tcp(web1, db1, 1433, second).await.expect("hold");
    assert_eq!(held.check(second).await.outcome, Outcome::Allowed);

    let unaffected = lab
        .continuous_probe(
            ContinuousSpec::new(web1, web2, Target::Tcp(80)),
            always(Access::Allow),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let cut = lab
        .continuous_probe(
            ContinuousSpec::new(web2, db1, Target::Tcp(1433)),
            always(Access::Allow),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Drop new flows to db1:1433, keep established ones: the held connection still passes,
    // new flows to db1 fail and the continuous prober reports each of them.
    let installed_at = started.elapsed().as_millis() as u64;
    let drop_db1 = format!("ip daddr {DB1} tcp dport 1433 drop");
    table.set_rules(&["ct state established,related accept", &drop_db1]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        held.check(second).await.outcome,
        Outcome::Allowed,
        "an established connection survives a new drop rule that has an established accept"
    );
    let unaffected = unaffected.stop().await;
    let cut = cut.stop().await;
    assert!(unaffected.sent >= 20, "{unaffected:?}");
    assert!(unaffected.wrong.is_empty(), "{unaffected:?}");
    assert_eq!(unaffected.correct, unaffected.sent);
    assert!(cut.correct >= 5, "flows before the rule passed: {cut:?}");
    assert!(
        cut.wrong.len() >= 5,
        "flows after the rule were dropped: {cut:?}"
    );
    assert!(
        cut.wrong
            .iter()
            .all(|w| w.attempt.outcome == Outcome::NoAnswer)
    );
    assert!(
        cut.wrong.iter().all(|w| w.at_ms + 50 >= installed_at),
        "{cut:?}"
    );

    // Without the established accept the held connection is cut too.
    table.set_rules(&[&drop_db1]);
    assert_eq!(
        held.check(Duration::from_millis(500)).await.outcome,
        Outcome::NoAnswer
    );
    held.close().await;
    lab.down().await.expect("lab down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_ups_probes_against_the_evaluator_and_downs() {
    let _serial = SERIAL.lock().await;
    let _ = client().await;
    let files = three_tier("lab-smoke-cli");
    let bin = lab::server::lab_binary().expect("the lab binary");
    let cli = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .env("KUBECONFIG", KUBECONFIG)
            .output()
            .expect("running lab");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = files[0].to_str().unwrap();
    let (code, out, err) = cli(&["up", "-f", dir]);
    assert_eq!(code, Some(0), "lab up: {out}{err}");
    let (code, out, err) = cli(&["probe", "-f", dir, "-o", "json"]);
    let (down_code, down_out, down_err) = cli(&["down"]);
    assert_eq!(down_code, Some(0), "lab down: {down_out}{down_err}");
    assert_eq!(code, Some(1), "mismatches without an agent: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let mismatches = report["mismatches"].as_array().unwrap();
    let denied = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["expected"]["access"] == "Deny")
        .count();
    assert!(!mismatches.is_empty());
    assert_eq!(mismatches.len(), denied);
    assert!(mismatches.iter().all(|m| m["measured"] == "allowed"));
    let db = mismatches
        .iter()
        .find(|m| m["src"] == "lab-smoke-cli/web1" && m["target"] == "tcp:1433")
        .expect("web1 -> db1 tcp:1433 is a mismatch");
    assert_eq!(
        db["expected"]["verdict"]["inbound"]["stages"][0]["rule"],
        "Deny-Database-All"
    );
    assert!(lab_leftovers(&[]).is_empty(), "{:?}", lab_leftovers(&[]));
    // The lab is gone: probing now says so instead of measuring nothing.
    let (code, _, err) = cli(&["probe", "-f", dir]);
    assert_eq!(code, Some(2));
    assert!(err.contains("run `lab up`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_cleans_up_after_an_interrupted_up() {
    let _serial = SERIAL.lock().await;
    let _ = client().await;
    let dir = std::env::temp_dir().join("kube-nsg-lab-smoke-crash");
    std::fs::create_dir_all(&dir).unwrap();
    let pods: String = (1..=40)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: \
                 lab-smoke-crash}}\nspec:\n  containers: [{{name: app, image: pause}}]\n\
                 status:\n  podIP: 10.244.20.{i}\n"
            )
        })
        .collect();
    std::fs::write(dir.join("pods.yaml"), pods).unwrap();
    let bin = lab::server::lab_binary().expect("the lab binary");
    // Killed part-way (SIGKILL: no destructor runs), wherever that happens to be.
    let mut up = Command::new(bin)
        .args([
            "up",
            "-f",
            dir.to_str().unwrap(),
            "--kubeconfig",
            KUBECONFIG,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let _ = up.kill();
    let _ = up.wait();
    let state = std::fs::read_to_string(Path::new(lab::state::STATE_DIR).join("state.json"))
        .unwrap_or_default();
    let out = Command::new(bin)
        .args(["down", "--kubeconfig", KUBECONFIG])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lab down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let netns: Vec<String> = (1..=40)
        .map(|i| format!("nsg-lab-smoke-crash-p{i}"))
        .chain(["nsg-internet".to_string()])
        .collect();
    assert_eq!(
        lab_leftovers(&netns),
        Vec::<String>::new(),
        "state was {state}"
    );
    let blackholes = lab::net::ip(&["route", "show", "type", "blackhole", "proto", "252"]).unwrap();
    assert_eq!(blackholes, "", "state was {state}");
    let client = client().await;
    let left = Api::<Pod>::namespaced(client, "lab-smoke-crash")
        .list(&Default::default())
        .await
        .unwrap();
    assert!(left.items.is_empty(), "{:?}", left.items.len());
}
