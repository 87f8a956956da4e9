//! Running the real `kube-nsg` binary (agent, controller) as host processes next to the lab,
//! for tests/agent_e2e.rs, tests/lab_smoke.rs and benches/agent_latency.rs. Needs root and
//! the local control plane (tests/cluster/up.sh, started here).
#![allow(dead_code)] // each test and the bench use their part

pub mod random;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::{Client, ResourceExt};
use kube_nsg::agent::report::{NodeReport, lease_name};
use kube_nsg::api::NetworkSecurityGroup;
use kube_nsg::model::{Inventory, ObjectRef};

use crate::lab::{self, Lab, ProbeReport, ProbeSpec};

pub const KUBECONFIG: &str = "/tmp/kube-nsg-cluster/kubeconfig";
pub const NODE: &str = "lab-node";
/// The lab's cluster ranges (tests/lab/net.rs), as the agent's `--virtual-network`.
pub const VIRTUAL_NETWORK: &str = "10.244.0.0/16,10.96.0.0/16,fd00:10:244::/56,fd00:10:96::/108";
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
pub const BIN: &str = env!("CARGO_BIN_EXE_kube-nsg");
const LOG_DIR: &str = "/tmp/kube-nsg-agent-e2e";

pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        uid, "0",
        "the lab's tests need root (network namespaces, veths, routes, nftables): run \
         `cargo test` as root"
    );
}

/// Starts the local control plane if needed (idempotent) and returns a client for it.
pub async fn client() -> Client {
    require_root();
    let out = Command::new("bash")
        .arg("tests/cluster/up.sh")
        .current_dir(REPO)
        .output()
        .expect("running tests/cluster/up.sh");
    assert!(
        out.status.success(),
        "tests/cluster/up.sh could not start the local control plane:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    lab::cluster::client(Path::new(KUBECONFIG))
        .await
        .expect("a client for the local control plane")
}

/// `kubectl ARGS` with the admin kubeconfig; stdout, or a panic with stderr.
pub fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", KUBECONFIG)
        .output()
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CRDs, from this checkout (they are the same on every branch that has the agent).
pub fn ensure_crds() {
    kubectl(&["apply", "-f", &format!("{REPO}/crds/kube-nsg.yaml")]);
    for crd in [
        "networksecuritygroups.kubensg.io",
        "applicationsecuritygroups.kubensg.io",
        "servicetags.kubensg.io",
    ] {
        kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            &format!("crd/{crd}"),
        ]);
    }
}

/// Waits while a namespace of an earlier run is still being deleted.
pub fn wait_namespace_usable(name: &str) {
    wait_not_terminating(&["get", "namespace", name], name);
}

/// Waits until no namespace is being deleted: an agent started now sees no earlier test's
/// namespace go away (a change of namespaces makes it compile its table in full).
pub fn wait_no_namespace_terminating() {
    wait_not_terminating(&["get", "namespaces"], "a namespace");
}

fn wait_not_terminating(get: &[&str], what: &str) {
    let start = Instant::now();
    loop {
        let out = Command::new("kubectl")
            .args(get)
            .args(["-o", "jsonpath={..status.phase}"])
            .env("KUBECONFIG", KUBECONFIG)
            .output()
            .expect("running kubectl");
        let phases = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || !phases.contains("Terminating") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{what} is still terminating after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn ensure_namespace(name: &str) {
    wait_namespace_usable(name);
    let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
    apply_yaml(&yaml);
}

/// `kubectl apply -f -` of some YAML.
pub fn apply_yaml(yaml: &str) {
    let mut child = Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .env("KUBECONFIG", KUBECONFIG)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply: {}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy of `examples/<name>` with every `(from, to)` replaced (namespaces and pod IPs, so
/// the test's objects are its own on a control plane others may use).
pub fn copy_example(name: &str, tag: &str, replacements: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kube-nsg-agent-e2e-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(Path::new(REPO).join("examples").join(name)).unwrap() {
        let path = entry.unwrap().path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (from, to) in replacements {
            text = text.replace(from, to);
        }
        std::fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
    }
    dir
}

/// Files of a directory that hold objects of these kinds (to apply a subset).
pub fn files_with(dir: &Path, kinds: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            kinds.iter().any(|k| text.contains(&format!("kind: {k}")))
        })
        .collect();
    out.sort();
    out
}

/// `kubectl apply` of the NSGs and ASGs of a directory (pods come from the lab).
pub fn apply_groups(dir: &Path) {
    for f in files_with(dir, &["NetworkSecurityGroup", "ApplicationSecurityGroup"]) {
        kubectl(&["apply", "-f", f.to_str().unwrap()]);
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `kube-nsg` process (agent or controller); SIGTERM and wait when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub metrics_port: u16,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String], kubeconfig: &str, metrics_port: u16) -> Proc {
        Proc::spawn_with_env(name, args, kubeconfig, metrics_port, &[])
    }

    pub fn spawn_with_env(
        name: &str,
        args: &[String],
        kubeconfig: &str,
        metrics_port: u16,
        env: &[(String, String)],
    ) -> Proc {
        std::fs::create_dir_all(LOG_DIR).unwrap();
        let log = Path::new(LOG_DIR).join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        writeln!(&file, "---- {} {}", BIN, args.join(" ")).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube_nsg=debug")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting kube-nsg");
        Proc {
            name: name.into(),
            child: Some(child),
            log,
            metrics_port,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// SIGTERM, then wait (SIGKILL after 10 s); returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        self.signal_child(&child, "-TERM");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                return child.wait().ok().and_then(|s| s.code());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal_child(&self, child: &Child, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status();
    }

    /// SIGKILL: no handler runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn suspend(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// GET a path of its metrics server.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path).await
    }

    pub async fn metrics(&self) -> String {
        self.http_get("/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some((200, _)) = self.http_get("/readyz").await {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            assert!(
                start.elapsed() < timeout,
                "{} not ready after {timeout:?}:\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A minimal HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

/// A metric's value in the text format (the first sample whose name and labels start so).
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with([' ', '{']))
        .or_else(|| text.lines().find(|l| l.starts_with(sample)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// How the agent is run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub report_namespace: String,
    pub kubeconfig: String,
    pub resync: &'static str,
    pub counters: &'static str,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl AgentConfig {
    pub fn new(report_namespace: &str) -> Self {
        AgentConfig {
            report_namespace: report_namespace.into(),
            kubeconfig: KUBECONFIG.into(),
            resync: "5s",
            counters: "1s",
            extra: vec![],
            env: vec![],
        }
    }
}

/// Starts an agent, waits until it is ready, applies the groups in `dir` and waits until the
/// agent reports `nsgs` programmed.
pub async fn start_agent_programmed(
    name: &str,
    cfg: &AgentConfig,
    client: &Client,
    dir: &Path,
    nsgs: &[ObjectRef],
) -> Proc {
    let mut agent = start_agent(name, cfg);
    agent.wait_ready(Duration::from_secs(30)).await;
    apply_groups(dir);
    wait_programmed(client, &cfg.report_namespace, nsgs, &[], &agent).await;
    agent
}

pub fn start_agent(name: &str, cfg: &AgentConfig) -> Proc {
    let port = free_port();
    let mut args: Vec<String> = [
        "agent",
        "--node-name",
        NODE,
        "--virtual-network",
        VIRTUAL_NETWORK,
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--report-namespace",
        &cfg.report_namespace,
        "--report-interval",
        "1s",
        "--rule-hits-interval",
        "1s",
        "--counters-interval",
        cfg.counters,
        "--resync-interval",
        cfg.resync,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(cfg.extra.iter().cloned());
    Proc::spawn_with_env(name, &args, &cfg.kubeconfig, port, &cfg.env)
}

/// The controller, without leader election, counting the agents that report to `agent_ns`.
pub fn start_controller(name: &str, agent_ns: &str) -> Proc {
    let port = free_port();
    let args: Vec<String> = [
        "controller",
        "--no-leader-election",
        "--virtual-network",
        VIRTUAL_NETWORK,
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--agent-namespace",
        agent_ns,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Proc::spawn(name, &args, KUBECONFIG, port)
}

/// Waits for a condition of an NSG to have this status; returns it.
pub async fn wait_condition(
    client: &Client,
    nsg: &ObjectRef,
    type_: &str,
    status: &str,
    controller: &Proc,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let api: Api<NetworkSecurityGroup> = Api::namespaced(client.clone(), &nsg.namespace);
    let start = Instant::now();
    loop {
        let obj = api.get_opt(&nsg.name).await.ok().flatten();
        let conditions = obj
            .and_then(|o| o.status)
            .map(|s| s.conditions)
            .unwrap_or_default();
        if let Some(c) = conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
        {
            return c.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{nsg}: no {type_}={status} within 30 s: {conditions:#?}\n{}",
            controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn dataplane_field(client: &Client, nsg: &ObjectRef) -> Option<String> {
    let api: Api<NetworkSecurityGroup> = Api::namespaced(client.clone(), &nsg.namespace);
    api.get_opt(&nsg.name)
        .await
        .ok()
        .flatten()
        .and_then(|o| o.status)
        .and_then(|s| s.dataplane)
}

/// Removes the agent's table when dropped, so a failing test leaves no enforcement behind for
/// the next user of the lab.
pub struct TableGuard;

impl Drop for TableGuard {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", kube_nsg::nft::TABLE])
            .output();
    }
}

pub fn table_exists() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", kube_nsg::nft::TABLE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// What the node's agent reports, from its Lease.
pub async fn node_report(client: &Client, report_ns: &str) -> Option<NodeReport> {
    let api: Api<Lease> = Api::namespaced(client.clone(), report_ns);
    let lease = api.get_opt(&lease_name(NODE)).await.ok()??;
    NodeReport::from_lease(&lease)
}

pub async fn generation(client: &Client, nsg: &ObjectRef) -> Option<i64> {
    let api: Api<NetworkSecurityGroup> = Api::namespaced(client.clone(), &nsg.namespace);
    api.get_opt(&nsg.name)
        .await
        .ok()
        .flatten()
        .and_then(|n| n.metadata.generation)
}

/// The NSGs of some namespaces, as they are now in the API.
pub async fn nsgs_in(client: &Client, namespaces: &[&str]) -> Vec<ObjectRef> {
    let mut out = vec![];
    for ns in namespaces {
        let api: Api<NetworkSecurityGroup> = Api::namespaced(client.clone(), ns);
        for n in api.list(&Default::default()).await.unwrap().items {
            out.push(ObjectRef::new(*ns, n.name_any()));
        }
    }
    out
}

/// Waits until the agent reports every NSG of `present` at its current generation and none
/// of `absent`; returns how long that took.
pub async fn wait_programmed(
    client: &Client,
    report_ns: &str,
    present: &[ObjectRef],
    absent: &[ObjectRef],
    agent: &Proc,
) -> Duration {
    let start = Instant::now();
    let mut wanted = BTreeMap::new();
    for n in present {
        wanted.insert(
            n.clone(),
            generation(client, n)
                .await
                .unwrap_or_else(|| panic!("NSG {n} does not exist")),
        );
    }
    loop {
        let report = node_report(client, report_ns).await;
        if let Some(r) = &report
            && wanted.iter().all(|(n, g)| r.programmed.get(n) == Some(g))
            && absent.iter().all(|n| !r.programmed.contains_key(n))
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent did not report {wanted:?} (and not {absent:?}) within 30 s; it reports \
             {:?}\n{}",
            report.map(|r| r.programmed),
            agent.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The kernel's per-rule counters of the namespaces of the groups in `inventory`, read from
/// the comments of the agent's counting chains ("NS/NSG RULE (inbound PRIO): allow"): what
/// the table really holds, whatever the test expects.
pub fn nft_counters(inventory: &Inventory) -> String {
    let namespaces: std::collections::BTreeSet<String> = inventory
        .nsgs
        .iter()
        .map(|n| format!("{}/", n.id.namespace))
        .collect();
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", kube_nsg::nft::TABLE])
        .output()
        .expect("running nft");
    if !out.status.success() {
        return format!(
            "  (no table: {})\n",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let doc: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(d) => d,
        Err(e) => return format!("  (cannot read nft's JSON: {e})\n"),
    };
    let mut lines = vec![];
    for item in doc["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let Some(comment) = rule["comment"].as_str() else {
            continue;
        };
        if !namespaces.iter().any(|ns| comment.starts_with(ns.as_str())) {
            continue;
        }
        for expr in rule["expr"].as_array().into_iter().flatten() {
            if let Some(packets) = expr["counter"]["packets"].as_u64() {
                lines.push(format!("  {comment}: {packets} packets\n"));
            }
        }
    }
    lines.sort();
    if lines.is_empty() {
        "  (no counting chain of these groups in the table)\n".into()
    } else {
        lines.concat()
    }
}

/// Probes `spec`'s flows in the lab and asserts they are what the reference evaluator says
/// for `inventory` ([`assert_no_mismatches`]); returns the report for further checks.
pub async fn probe_matches(
    what: &str,
    lab: &Lab,
    inventory: &Inventory,
    spec: &ProbeSpec,
    agent: &Proc,
) -> ProbeReport {
    let report = lab.probe(inventory, spec).await.unwrap();
    assert_no_mismatches(what, &report, inventory, agent);
    report
}

/// Panics with the matrix, every mismatch (flow, the evaluator's deciding rules), the nft
/// counters and the agent's log when the probe disagrees with the evaluator.
pub fn assert_no_mismatches(what: &str, report: &ProbeReport, inventory: &Inventory, agent: &Proc) {
    if report.mismatches.is_empty() {
        return;
    }
    panic!(
        "{what}: {} of {} flows differ from the reference evaluator\n{}\nnft counters per rule \
         (new flows each rule decided):\n{}\nagent log:\n{}",
        report.mismatches.len(),
        report.results.len(),
        report.table(),
        nft_counters(inventory),
        agent.log_tail(30)
    );
}

/// The lab's inventory of some files (the lab's ranges and node IP).
pub fn inventory(lab: &Lab, files: &[PathBuf]) -> Inventory {
    lab.inventory(files).expect("the scenario's inventory")
}
