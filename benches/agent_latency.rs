//! Policy latency with real packets: from the request that creates an NSG to the first new
//! flow it denies being dropped, and from the request that deletes it to the first new flow
//! passing again. `cargo bench --bench agent_latency` (root; starts the local control plane
//! with tests/cluster/up.sh; the lab and the agent as in tests/agent_e2e.rs).
//!
//! A continuous prober opens a new TCP flow every `INTERVAL` from one netns pod to another
//! (port 80) and records when each flow started and whether it passed; the NSG is created and
//! deleted through the API (server-side apply and delete, the requests `kubectl apply` and
//! `kubectl delete` send) with the prober running. Latency = start of the first flow with the
//! new verdict − the moment the request was sent. `KUBE_NSG_BENCH_RUNS` (default 15) repetitions; prints the median,
//! the 90th percentile and the extremes. The agent runs with its defaults (50 ms debounce).

#[path = "../tests/lab/mod.rs"]
mod lab;

#[path = "../tests/agent_support/mod.rs"]
mod agent_support;

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube_nsg::api::NetworkSecurityGroup;
use kube_nsg::model::{Access, ObjectRef};

use agent_support::*;
use lab::continuous::always;
use lab::{ContinuousSpec, Lab, Target};

const NS: &str = "agent-bench";
const REPORT_NS: &str = "agent-bench-report";
/// A new flow this often.
const INTERVAL: Duration = Duration::from_millis(5);

fn pods_yaml() -> String {
    let pod = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}}}\n\
             spec: {{containers: [{{name: app, image: registry.k8s.io/pause:3.10}}]}}\n\
             status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n---\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\n{}{}",
        pod("client", "10.244.95.11"),
        pod("server", "10.244.95.12")
    )
}

fn nsg() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kubensg.io/v1alpha1",
        "kind": "NetworkSecurityGroup",
        "metadata": {"name": "deny-http", "namespace": NS},
        "spec": {
            "subnet": true,
            "securityRules": [{
                "name": "Deny-HTTP-From-Client",
                "priority": 100,
                "direction": "Inbound",
                "access": "Deny",
                "protocol": "Tcp",
                "sourceAddressPrefix": "10.244.95.11",
                "destinationAddressPrefix": "*",
                "destinationPortRange": "80",
            }],
        },
    })
}

/// The flows of one change: (ms from the prober's start to the request, report).
struct Change {
    request_at_ms: f64,
    report: lab::ContinuousReport,
}

impl Change {
    /// From the request to the start of the first flow with the new verdict (`wrong`: the
    /// prober expects the old one).
    fn latency(&self) -> Option<f64> {
        self.report
            .wrong
            .iter()
            .map(|w| w.at_ms as f64 - self.request_at_ms)
            .filter(|&d| d > -1.0)
            .reduce(f64::min)
            .map(|d| d.max(0.0))
    }
}

async fn measure(lab: &Lab, expect_before: Access, change: impl AsyncFnOnce()) -> Change {
    let spec = ContinuousSpec {
        interval: INTERVAL,
        timeout: Duration::from_millis(400),
        ..ContinuousSpec::new(
            &format!("{NS}/client"),
            &format!("{NS}/server"),
            Target::Tcp(80),
        )
    };
    let probe = lab
        .continuous_probe(spec, always(expect_before))
        .await
        .expect("continuous probe");
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let request_at_ms = started.elapsed().as_secs_f64() * 1e3;
    change().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = probe.stop().await;
    Change {
        request_at_ms,
        report,
    }
}

fn stats(name: &str, mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return format!("{name}: no measurement");
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    format!(
        "{name}: median {:.0} ms, p90 {:.0} ms, min {:.0} ms, max {:.0} ms ({} runs)",
        pct(0.5),
        pct(0.9),
        v[0],
        v[v.len() - 1],
        v.len()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("KUBE_NSG_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let client = client().await;
    ensure_crds();
    ensure_namespace(REPORT_NS);
    // The previous run's namespace may still be going away.
    wait_namespace_usable(NS);
    let dir = std::env::temp_dir().join("kube-nsg-agent-bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pods.yaml"), pods_yaml()).unwrap();
    let lab = Lab::up(std::slice::from_ref(&dir), &client)
        .await
        .expect("lab up");
    let _table = TableGuard;
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "inet", kube_nsg::nft::TABLE])
        .output();
    let mut cfg = AgentConfig::new(REPORT_NS);
    cfg.resync = "60s";
    cfg.counters = "10s";
    let mut agent = start_agent("bench", &cfg);
    agent.wait_ready(Duration::from_secs(60)).await;

    let api: Api<NetworkSecurityGroup> = Api::namespaced(client.clone(), NS);
    let _ = api.delete("deny-http", &DeleteParams::default()).await;
    let id = ObjectRef::new(NS, "deny-http");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut deny, mut restore) = (vec![], vec![]);
    for run in 0..runs {
        let apply = measure(&lab, Access::Allow, async || {
            api.patch(
                "deny-http",
                &PatchParams::apply("kube-nsg-bench").force(),
                &Patch::Apply(nsg()),
            )
            .await
            .expect("creating the NSG");
        })
        .await;
        wait_programmed(&client, REPORT_NS, std::slice::from_ref(&id), &[], &agent).await;
        let delete = measure(&lab, Access::Deny, async || {
            api.delete("deny-http", &DeleteParams::default())
                .await
                .expect("deleting the NSG");
        })
        .await;
        wait_programmed(&client, REPORT_NS, &[], std::slice::from_ref(&id), &agent).await;
        for (what, change, into) in [
            ("apply -> first drop", &apply, &mut deny),
            ("delete -> first pass", &delete, &mut restore),
        ] {
            match change.latency() {
                Some(ms) => {
                    into.push(ms);
                    eprintln!(
                        "run {run}: {what} {ms:.0} ms ({} flows)",
                        change.report.sent
                    );
                }
                None => eprintln!(
                    "run {run}: {what}: no flow changed verdict within 0.7 s \
                     ({} flows, {} with the old verdict)",
                    change.report.sent, change.report.correct
                ),
            }
        }
    }
    let metrics = agent.metrics().await;
    let sync_sum = metric(&metrics, "kube_nsg_agent_sync_duration_seconds_sum").unwrap_or(0.0);
    let sync_count = metric(&metrics, "kube_nsg_agent_sync_duration_seconds_count").unwrap_or(1.0);
    drop(agent);
    lab.down().await.expect("lab down");
    let _ = std::process::Command::new("kubectl")
        .args(["delete", "namespace", NS, "--wait=false"])
        .env("KUBECONFIG", KUBECONFIG)
        .output();

    println!(
        "policy latency with real packets (new TCP flow every {INTERVAL:?}; target < 250 ms each)"
    );
    println!("{}", stats("apply  -> first denied flow dropped", deny));
    println!("{}", stats("delete -> first flow passing again ", restore));
    println!(
        "agent sync (snapshot, compile, apply), mean over the run: {:.1} ms",
        sync_sum / sync_count.max(1.0) * 1e3
    );
}
