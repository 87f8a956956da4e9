//! The parent's handle on a `lab serve` process running in an endpoint's namespace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, oneshot};

use super::LabError;
use super::serve::{Op, Outcome, Reply, Request, Target};

pub struct Server {
    pub netns: String,
    stdin: Mutex<ChildStdin>,
    pending: Arc<StdMutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    next_id: AtomicU64,
    _child: Child,
}

impl Server {
    /// Starts `ip netns exec NETNS <lab binary> serve`; it is killed when this is dropped.
    pub async fn start(netns: &str) -> Result<Arc<Server>, LabError> {
        let bin = lab_binary()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(bin)
            .arg("serve")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| LabError::Command {
                command: format!("ip netns exec {netns} {} serve", bin.display()),
                message: e.to_string(),
            })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let pending: Arc<StdMutex<HashMap<u64, oneshot::Sender<Reply>>>> = Arc::default();
        let dispatch = pending.clone();
        let name = netns.to_string();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Reply>(&line) {
                    Ok(reply) => {
                        if let Some(tx) = dispatch.lock().unwrap().remove(&reply.id) {
                            let _ = tx.send(reply);
                        }
                    }
                    Err(e) => eprintln!("lab: server in {name}: bad reply {line:?}: {e}"),
                }
            }
            // The server is gone: fail whatever still waits.
            dispatch.lock().unwrap().clear();
        });
        Ok(Arc::new(Server {
            netns: netns.to_string(),
            stdin: Mutex::new(stdin),
            pending,
            next_id: AtomicU64::new(1),
            _child: child,
        }))
    }

    /// Sends a request and waits for its reply; a dead server is an `Error` outcome.
    pub async fn call(&self, op: Op) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut line = serde_json::to_string(&Request { id, op }).expect("request serializes");
        line.push('\n');
        let sent = {
            let mut stdin = self.stdin.lock().await;
            match stdin.write_all(line.as_bytes()).await {
                Ok(()) => stdin.flush().await,
                Err(e) => Err(e),
            }
        };
        let failed = |detail: String| Reply {
            id,
            outcome: Outcome::Error,
            micros: 0,
            detail: Some(detail),
        };
        if let Err(e) = sent {
            self.pending.lock().unwrap().remove(&id);
            return failed(format!("server in {}: {e}", self.netns));
        }
        rx.await
            .unwrap_or_else(|_| failed(format!("server in {} exited", self.netns)))
    }

    pub async fn listen(&self, target: Target) -> Result<(), LabError> {
        let reply = self.call(Op::Listen { target }).await;
        match reply.outcome {
            Outcome::Allowed => Ok(()),
            _ => Err(LabError::Other(format!(
                "server in {}: {}",
                self.netns,
                reply.detail.unwrap_or_default()
            ))),
        }
    }
}

/// The `lab` binary that runs `serve`: `$KUBE_NSG_LAB_BIN`; or this very program when it is
/// the `lab` example; or, from a test, the example of the same build, built on first use
/// (`cargo build --example lab`, a no-op when it is up to date).
pub fn lab_binary() -> Result<&'static Path, LabError> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(find_lab_binary)
        .as_deref()
        .map_err(|e| LabError::Other(e.clone()))
}

fn find_lab_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KUBE_NSG_LAB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    if exe.file_stem().is_some_and(|s| s == "lab") {
        return Ok(exe);
    }
    // A test runs as <target>/<profile>/deps/<name>-<hash>.
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("cannot find the target directory from {}", exe.display()))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("cannot find the target directory from {}", exe.display()))?;
    let mut cargo = std::process::Command::new(env!("CARGO"));
    // Cargo gives a test the variables of its own package (CARGO_PKG_NAME, ...); build
    // scripts that watch them (ring's does) would see a change and rebuild, back and forth
    // between this build and the outer one.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let of_this_package = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .iter()
        .any(|p| key.starts_with(p));
        if of_this_package {
            cargo.env_remove(key.as_ref());
        }
    }
    cargo
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--example", "lab", "--target-dir"])
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(other) => {
            cargo.args(["--profile", other]);
        }
        None => {}
    }
    let status = cargo
        .status()
        .map_err(|e| format!("running cargo build --example lab: {e}"))?;
    if !status.success() {
        return Err("cargo build --example lab failed".into());
    }
    let bin = profile_dir.join("examples").join("lab");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} does not exist after building it",
            bin.display()
        ))
    }
}
