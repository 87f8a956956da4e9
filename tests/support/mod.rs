//! Harness for tests against the local control plane (tests/cluster): starts it when it is
//! not up, runs kubectl with the admin kubeconfig, creates kubelet-less pods, runs the
//! controller binary as a child process and reads its metrics.
//!
//! Tests that use it FAIL, never skip, when the control plane cannot be had.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
pub const NODE: &str = "kube-nsg-e2e-controller";
pub const NODE_IP: &str = "172.18.0.2";
/// The label of the test node; controllers count only the nodes that carry it
/// (`--node-selector`), so nodes other suites register and remove do not change their model.
pub const NODE_LABEL: &str = "kubensg.io/e2e-node";
pub const VIRTUAL_NETWORK: &str = "10.244.0.0/16,10.96.0.0/16";

pub fn kubeconfig() -> PathBuf {
    let state = std::env::var("KUBE_NSG_STATE").unwrap_or_else(|_| "/tmp/kube-nsg-cluster".into());
    Path::new(&state).join("kubeconfig")
}

/// Brings the control plane up (once per test process) and installs the CRDs and a Node.
pub fn cluster() {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let result = UP.get_or_init(|| {
        let uid = Command::new("id").arg("-u").output().map_err(|e| format!("running id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("the local control plane needs root (it binds ports, writes /var/cache and /dev/shm)".into());
        }
        let up = Command::new("bash")
            .arg(format!("{REPO}/tests/cluster/up.sh"))
            .output()
            .map_err(|e| format!("running tests/cluster/up.sh: {e}"))?;
        if !up.status.success() {
            return Err(format!(
                "tests/cluster/up.sh failed ({}):\n{}\n{}",
                up.status,
                String::from_utf8_lossy(&up.stdout),
                String::from_utf8_lossy(&up.stderr)
            ));
        }
        let crds = kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &format!("{REPO}/crds/kube-nsg.yaml")]);
        if !crds.status.success() {
            return Err(format!("installing the CRDs failed: {}", String::from_utf8_lossy(&crds.stderr)));
        }
        let est = kubectl(&[
            "wait", "--for=condition=Established", "--timeout=60s",
            "crd/networksecuritygroups.kubensg.io", "crd/applicationsecuritygroups.kubensg.io",
            "crd/servicetags.kubensg.io",
        ]);
        if !est.status.success() {
            return Err(format!("CRDs not established: {}", String::from_utf8_lossy(&est.stderr)));
        }
        let node = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n  labels: {{kubernetes.io/hostname: {NODE}, {NODE_LABEL}: 'true'}}\n"
        );
        apply(&node).map_err(|e| format!("creating the test Node: {e}"))?;
        let status = format!(r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{NODE_IP}"}}]}}}}"#);
        let out = kubectl(&["patch", "node", NODE, "--subresource=status", "--type=merge", "-p", &status]);
        if !out.status.success() {
            return Err(format!("patching the Node status: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("cannot run tests against the local control plane: {e}");
    }
}

/// Every test that runs a controller holds this: controllers watch the whole cluster, so two
/// at once would see (and count writes for) each other's objects.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn kubectl(args: &[&str]) -> Output {
    kubectl_in(args, None)
}

pub fn kubectl_in(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig())
        .arg("--request-timeout=20s")
        .args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl is installed");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("kubectl runs")
}

/// kubectl that must succeed; returns stdout.
#[track_caller]
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl apply -f -`: Ok(stdout) or Err(stderr).
pub fn apply(yaml: &str) -> Result<String, String> {
    let out = kubectl_in(&["apply", "-f", "-"], Some(yaml));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[track_caller]
pub fn apply_ok(yaml: &str) {
    if let Err(e) = apply(yaml) {
        panic!("kubectl apply failed: {e}\n---\n{yaml}");
    }
}

/// `kubectl get ... -o json`, `None` when not found.
pub fn get_json(args: &[&str]) -> Option<Value> {
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    let out = kubectl(&full);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("NotFound") || err.contains("not found"),
            "kubectl {full:?}: {err}"
        );
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("kubectl prints JSON"))
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `timeout`.
#[track_caller]
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The label every namespace of this test process carries, and that its controllers select
/// (`--namespace-selector`): the local control plane is shared with other test suites, whose
/// objects a controller must neither count nor touch.
pub const SCOPE_LABEL: &str = "kubensg.io/e2e";

pub fn scope_value() -> String {
    format!("run-{}", std::process::id())
}

/// Puts a namespace in this process's scope.
pub fn scope_namespace(ns: &str) {
    kubectl_ok(&[
        "label",
        "namespace",
        ns,
        &format!("{SCOPE_LABEL}={}", scope_value()),
        "--overwrite",
    ]);
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A namespace of its own for one test, deleted (with everything in it) when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        apply_ok(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{SCOPE_LABEL}: {}}}\n",
            scope_value()
        ));
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Pods bound to a node wait for a kubelet to confirm their deletion: force them.
        kubectl(&[
            "delete",
            "pods",
            "--all",
            "-n",
            &self.name,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ]);
        kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if get_json(&["namespace", &self.name]).is_none() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("namespace {} still terminating after 60 s", self.name);
    }
}

/// Creates a pod bound to the test node and gives it an IP and phase Running through the
/// status subresource, as a kubelet would.
pub fn create_pod(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    ip: &str,
) {
    let map = |kv: &[(&str, &str)]| {
        let items: Vec<String> = kv.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
        format!("{{{}}}", items.join(", "))
    };
    apply_ok(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {}\n  annotations: {}\n\
         spec:\n  nodeName: {NODE}\n  containers: [{{name: app, image: registry.k8s.io/pause:3.10}}]\n",
        map(labels),
        map(annotations)
    ));
    set_pod_ip(ns, name, ip);
}

pub fn set_pod_ip(ns: &str, name: &str, ip: &str) {
    let status =
        format!(r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#);
    kubectl_ok(&[
        "patch",
        "pod",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ]);
}

pub fn pod_labels(ns: &str, name: &str) -> serde_json::Map<String, Value> {
    get_json(&["pod", name, "-n", ns])
        .and_then(|p| {
            p.pointer("/metadata/labels")
                .and_then(Value::as_object)
                .cloned()
        })
        .unwrap_or_default()
}

/// The condition of `type_` in an object's status.
pub fn condition(obj: &Value, type_: &str) -> Option<Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Whether an NSG's status is about its current generation and says Ready=True.
pub fn nsg_ready(ns: &str, name: &str) -> Option<Value> {
    let nsg = get_json(&["nsg", name, "-n", ns])?;
    let current = nsg.pointer("/status/observedGeneration") == nsg.pointer("/metadata/generation");
    let ready = condition(&nsg, "Ready").is_some_and(|c| c["status"] == "True");
    (current && ready).then_some(nsg)
}

/// The names of the NetworkPolicies in a namespace.
pub fn policy_names(ns: &str) -> Vec<String> {
    let list = get_json(&["networkpolicies", "-n", ns]).unwrap_or_default();
    let mut names: Vec<String> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            p.pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .collect();
    names.sort();
    names
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The allocator setting the chart gives the controller (`_RJEM_MALLOC_CONF` in
/// charts/kube-nsg/templates/controller.yaml), so the tests run it as the chart does.
fn chart_allocator_conf() -> &'static str {
    const CHART: &str = include_str!("../../charts/kube-nsg/templates/controller.yaml");
    CHART
        .split_once("name: _RJEM_MALLOC_CONF")
        .and_then(|(_, rest)| rest.split('"').nth(1))
        .expect("the chart's controller sets _RJEM_MALLOC_CONF to a quoted value")
}

/// A `kube-nsg controller` child process.
pub struct Controller {
    child: Option<Child>,
    /// The Lease this controller made up for itself, deleted when it is dropped.
    own_lease: Option<String>,
    pub port: u16,
    pub log: PathBuf,
    pub name: String,
}

impl Controller {
    /// Starts a controller with its own Lease (unless `extra` names one) and waits until its
    /// caches are synced.
    pub fn start(name: &str, extra: &[&str]) -> Controller {
        let port = free_port();
        let log_dir = Path::new("/tmp/kube-nsg-e2e-logs");
        std::fs::create_dir_all(log_dir).unwrap();
        let log = log_dir.join(format!("{}.log", unique(name)));
        let file = std::fs::File::create(&log).unwrap();
        let mut args = vec![
            "controller".to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
            "--virtual-network".into(),
            VIRTUAL_NETWORK.into(),
            "--debounce".into(),
            "50ms".into(),
            "--identity".into(),
            name.into(),
        ];
        args.extend([
            "--namespace-selector".into(),
            format!("{SCOPE_LABEL}={}", scope_value()),
            "--node-selector".into(),
            format!("{NODE_LABEL}=true"),
            // No node agent reports here: the dataplane status stays "no agents" whatever
            // agents other suites on this control plane start and stop.
            "--agent-namespace".into(),
            "kube-nsg-e2e-no-agents".into(),
        ]);
        let own_lease = (!extra.contains(&"--lease-name")).then(|| unique("kube-nsg-e2e"));
        if let Some(lease) = &own_lease {
            args.extend(["--lease-name".into(), lease.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        // KUBE_NSG_E2E_WRAP runs the controller under a tool, e.g. "heaptrack -o /tmp/ht"
        // (the tool must pass signals on, or the controller outlives the test).
        let wrap = std::env::var("KUBE_NSG_E2E_WRAP").unwrap_or_default();
        let mut argv: Vec<String> = wrap.split_whitespace().map(String::from).collect();
        argv.push(env!("CARGO_BIN_EXE_kube-nsg").into());
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .args(&args)
            .env("KUBECONFIG", kubeconfig())
            .env("RUST_LOG", "info,kube_nsg=debug")
            .env("_RJEM_MALLOC_CONF", chart_allocator_conf())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("the kube-nsg binary runs");
        let c = Controller {
            child: Some(child),
            own_lease,
            port,
            log,
            name: name.into(),
        };
        eventually(
            "the controller's caches to sync (/readyz)",
            Duration::from_secs(60),
            || (c.http("/readyz").is_some_and(|(status, _)| status == 200)).then_some(()),
        );
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// GET on the metrics server: (status code, body).
    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    pub fn metrics(&self) -> String {
        self.http("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// The sum of every sample of a metric (0 when it has none).
    pub fn metric(&self, name: &str) -> f64 {
        metric_sum(&self.metrics(), name)
    }

    pub fn writes(&self) -> f64 {
        self.metric("kube_nsg_api_writes_total")
    }

    pub fn is_leader(&self) -> bool {
        self.metric("kube_nsg_leader") == 1.0
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "controller {} did not stop within 30 s of SIGTERM",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no chance to release the Lease.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(lease) = self.own_lease.take() {
            delete_lease(&lease);
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!(
                "--- last lines of controller {} ({}):",
                self.name,
                self.log.display()
            );
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Deletes a leader-election Lease the tests made.
pub fn delete_lease(name: &str) {
    kubectl(&[
        "delete",
        "lease",
        name,
        "-n",
        "kube-system",
        "--ignore-not-found",
    ]);
}

pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let metric = l.split(['{', ' ']).next().unwrap_or("");
            metric == name
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
