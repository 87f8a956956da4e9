//! `kube-nsg agent`: the node agent (a DaemonSet). It watches what the node's table depends
//! on (NSGs, ASGs, ServiceTags, every pod's labels and IPs, namespaces and node IPs), compiles
//! the node's table with the same pure core as every other part, and applies it through `nft`.
//! See docs/agent.md for the behaviour users rely on.
//!
//! # Design
//!
//! - One loop: a change wakes it; it snapshots the inputs, builds the model inventory, and
//!   compiles and applies in a blocking task. A change after a quiet spell is applied at
//!   once; one within `--debounce` of the last sync waits out the rest of it, so a burst
//!   coalesces into one more sync instead of one per change. The
//!   first apply after a start replaces the whole table in one transaction; later ones
//!   change set elements only when that is all that differs (pod churn, memberships), else
//!   replace the table atomically again.
//! - Nothing is applied before every watch has listed once (a partial view would drop rules
//!   for peers not yet seen): until then the table an earlier agent left keeps enforcing.
//!   `/readyz` answers 200 after the first successful sync.
//! - `--resync-interval`: a pass without a change, which also compares the kernel's table
//!   with what was applied (a fingerprint of the table read over netlink, counters aside) and
//!   replaces it if someone changed or deleted it. The counter poll (`--counters-interval`)
//!   makes the same comparison, so drift is repaired within one poll.
//! - Errors never remove the table: a failed sync keeps the kernel's table and is retried
//!   with backoff; while the API server is unreachable the watches retry and the table of the
//!   last successful sync stays (and is still repaired from the cached view).
//! - SIGTERM stops the process and leaves the table in place (a rolling restart must not open
//!   a hole), unless the agent's DaemonSet is gone: an uninstall ([`uninstall`]) removes the
//!   table. `--cleanup` removes it by hand.
//! - Reporting ([`report`]): a Lease per node with the programmed NSG generations and the
//!   rule hit counts; metrics ([`metrics`]).

pub mod dataplane;
pub mod inputs;
pub mod metrics;
pub mod report;
pub mod uninstall;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::daemon::{self, DaemonArgs, init_tracing, parse_duration, shutdown_signal};
use crate::model::{Inventory, ObjectRef};
use crate::nft::{self, Applied, CompileOptions, HostTraffic, Nft, NftCommand, PodIndex};

pub use dataplane::{Dataplane, HitKey, SyncOutcome};
pub use inputs::Source;
pub use report::{NodeReport, rule_hits};

/// Whether the node's own traffic to and from its pods is filtered (`--host-traffic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostTrafficArg {
    /// As in Azure: the node's addresses are the `AzureLoadBalancer` tag, and a rule that
    /// denies it stops kubelet probes.
    Enforce,
    /// The node always reaches its pods and they it; only pod-to-pod and outside traffic is
    /// filtered.
    Exempt,
}

/// Arguments of `kube-nsg agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The node this agent programs: its pods get the groups' rules (the DaemonSet passes
    /// spec.nodeName through the downward API).
    #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Where to serve /metrics, /livez and /readyz.
    #[arg(long, default_value = "0.0.0.0:9190", env = "KUBE_NSG_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Sync this often even without changes, and repair a table someone else changed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// The least time from one sync to the next for changes: a change after a quiet spell
    /// is applied at once; the changes that follow within this coalesce into one sync.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// Read the per-rule nftables counters (and check the table for drift) this often.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub counters_interval: Duration,
    /// Renew the node's Lease this often; it counts as live for three times this.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub report_interval: Duration,
    /// Write changed rule hit counts to the Lease at most this often.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub rule_hits_interval: Duration,
    /// Namespace of the node Leases the agent reports through (the controller reads them).
    #[arg(long, default_value = "kube-system", env = "POD_NAMESPACE")]
    pub report_namespace: String,
    /// Whether traffic between the node itself and its pods is filtered.
    #[arg(long, value_enum, default_value = "enforce")]
    pub host_traffic: HostTrafficArg,
    /// Remove the node's nftables table (and its Lease, when the API answers) and exit.
    /// Idempotent. A stopped agent leaves its table in force (unless its DaemonSet was
    /// deleted: an uninstall); this removes it by hand, once the agent is stopped.
    #[arg(long)]
    pub cleanup: bool,
}

impl AgentArgs {
    fn compile_options(&self) -> CompileOptions {
        CompileOptions {
            host_traffic: match self.host_traffic {
                HostTrafficArg::Enforce => HostTraffic::Enforce,
                HostTrafficArg::Exempt => HostTraffic::Exempt,
            },
            ..CompileOptions::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Start(#[from] daemon::StartError),
    #[error("cannot remove the nftables table {table}: {source}")]
    Cleanup {
        table: String,
        source: nft::NftError,
    },
}

/// [`run`] on its own Tokio runtime, for a synchronous `main`. One thread: the agent is
/// I/O-bound, its CPU work (compiling) runs on blocking threads.
pub fn run_blocking(args: AgentArgs) -> Result<(), Error> {
    daemon::block_on(run(args))?
}

/// `--cleanup`: removes the table (idempotent) and, best effort, the node's Lease.
pub async fn cleanup(args: &AgentArgs) -> Result<(), Error> {
    let mut dp = Dataplane::new(Arc::new(NftCommand::default()), nft::TABLE);
    dp.remove().map_err(|source| Error::Cleanup {
        table: nft::TABLE.into(),
        source,
    })?;
    info!(table = nft::TABLE, "removed the nftables table");
    if let Some(node) = &args.node_name {
        let removed = tokio::time::timeout(Duration::from_secs(5), async {
            let client = Client::try_default().await?;
            let api: Api<Lease> = Api::namespaced(client, &args.report_namespace);
            report::delete_lease(&api, node).await
        })
        .await;
        match removed {
            Ok(Ok(())) => info!(node = %node, "removed the node's Lease"),
            Ok(Err(e)) => warn!(error = %e, "could not remove the node's Lease (it expires)"),
            Err(_) => warn!("the API server did not answer; the node's Lease expires by itself"),
        }
    }
    Ok(())
}

/// Runs the agent until SIGTERM or Ctrl-C (or does `--cleanup`).
pub async fn run(args: AgentArgs) -> Result<(), Error> {
    init_tracing(args.daemon.log_format);
    if args.cleanup {
        return cleanup(&args).await;
    }
    let node = args.node_name.clone().expect("clap requires --node-name");
    let client = daemon::client().await?;
    let metrics = Arc::new(metrics::AgentMetrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server =
        daemon::spawn_server(args.metrics_addr, metrics.clone(), shutdown_rx.clone()).await?;
    info!(node = %node, addr = %args.metrics_addr, "kube-nsg agent starting");

    let source = inputs::CacheSource::start(&client, &metrics, args.daemon.virtual_network.clone());
    let nft: Arc<dyn Nft + Send + Sync> = Arc::new(NftCommand::default());
    let agent = Agent::new(node.clone(), nft, args.compile_options(), metrics.clone());
    let reporter = tokio::spawn(report_loop(
        client.clone(),
        node.clone(),
        args.clone(),
        agent.programmed.subscribe(),
        agent.hits.subscribe(),
        metrics.clone(),
        shutdown_rx.clone(),
    ));
    let poller = tokio::spawn(
        agent
            .clone()
            .poll_counters(args.counters_interval, shutdown_rx.clone()),
    );
    let settings = LoopSettings {
        debounce: args.debounce,
        resync_interval: args.resync_interval,
    };
    let owner = tokio::spawn(uninstall::own_daemonset(client.clone()));
    agent.run_loop(&source, settings, shutdown_signal()).await;

    shutdown_tx.send_replace(true);
    source.stop();
    let _ = poller.await;
    let _ = reporter.await;
    // Uninstalled (our DaemonSet is gone), or stopped for a restart (it is there)?
    let owner = if owner.is_finished() {
        owner.await.ok().flatten()
    } else {
        owner.abort();
        None
    };
    let uninstalled = match &owner {
        Some(ds) => uninstall::is_gone(&client, ds).await,
        None => false,
    };
    if uninstalled {
        let dp = agent.dataplane.clone();
        let removed =
            tokio::task::spawn_blocking(move || dp.lock().expect("dataplane lock").remove()).await;
        match removed {
            Ok(Ok(())) => info!(
                daemonset = %owner.as_ref().map(|d| d.name.as_str()).unwrap_or_default(),
                "the agent's DaemonSet is gone (uninstall): removed the table"
            ),
            Ok(Err(e)) => error!(error = %e, "uninstall: cannot remove the table"),
            Err(e) => error!(error = %e, "uninstall: the removal task failed"),
        }
        let leases: Api<Lease> = Api::namespaced(client.clone(), &args.report_namespace);
        if let Err(e) = report::delete_lease(&leases, &node).await {
            warn!(error = %e, "uninstall: cannot remove the node's Lease (it expires)");
        }
    } else {
        info!(
            "shutting down; the table stays in force (a new agent replaces it; uninstalling \
             removes it, as does `kube-nsg agent --cleanup`)"
        );
    }
    let _ = server.await;
    Ok(())
}

/// How the loop paces itself.
#[derive(Debug, Clone, Copy)]
pub struct LoopSettings {
    pub debounce: Duration,
    pub resync_interval: Duration,
}

/// The agent's state shared by the sync loop, the counter poll and the reporter.
#[derive(Clone)]
pub struct Agent {
    pub node: String,
    opts: Arc<CompileOptions>,
    pub dataplane: Arc<Mutex<Dataplane>>,
    /// What the table last applied was compiled from, for updates of pod churn.
    pods: Arc<Mutex<Option<PodIndex>>>,
    metrics: Arc<metrics::AgentMetrics>,
    /// The NSG generations the table last applied enforces.
    pub programmed: Arc<watch::Sender<Option<BTreeMap<ObjectRef, i64>>>>,
    /// The rule hit totals last read.
    pub hits: Arc<watch::Sender<BTreeMap<HitKey, u64>>>,
    /// Wakes the loop for a sync that checks the table for drift.
    drift: Arc<Notify>,
}

/// Why the loop runs a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Change,
    Resync,
    Retry,
    Drift,
}

impl Agent {
    pub fn new(
        node: String,
        nft: Arc<dyn Nft + Send + Sync>,
        opts: CompileOptions,
        metrics: Arc<metrics::AgentMetrics>,
    ) -> Agent {
        let table = opts.table.clone();
        Agent {
            node,
            opts: Arc::new(opts),
            dataplane: Arc::new(Mutex::new(Dataplane::new(nft, table))),
            pods: Arc::new(Mutex::new(None)),
            metrics,
            programmed: Arc::new(watch::channel(None).0),
            hits: Arc::new(watch::channel(BTreeMap::new()).0),
            drift: Arc::new(Notify::new()),
        }
    }

    /// Compiles `inv` for this node and brings the kernel to it (blocking: runs `nft`).
    /// When only pods changed, the table last applied is updated instead (`nft::update_pods`:
    /// milliseconds, where a large node's compile takes most of a second); a sync that checks
    /// for drift always compiles in full, which also drops the chains nothing uses any more.
    pub fn sync_blocking(
        &self,
        inv: impl Into<Arc<Inventory>>,
        check_drift: bool,
    ) -> Result<SyncOutcome, nft::NftError> {
        let inv = inv.into();
        let mut dataplane = self.dataplane.lock().expect("dataplane lock");
        let mut pods = self.pods.lock().expect("pods lock");
        let updated = match (pods.as_mut(), dataplane.current()) {
            (Some(index), Some(current)) if !check_drift => {
                nft::update_pods(current, index, &inv, &self.opts)
            }
            _ => None,
        };
        let pod_update = updated.is_some();
        let rs = updated.unwrap_or_else(|| {
            let (rs, index) = nft::compile_indexed(&inv, Some(&self.node), &self.opts);
            *pods = Some(index);
            rs
        });
        let result = dataplane.sync(rs, check_drift);
        match result {
            Ok(outcome) => Ok(SyncOutcome {
                pod_update,
                ..outcome
            }),
            Err(e) => {
                *pods = None; // the index describes a table the kernel does not have
                Err(e)
            }
        }
    }

    /// One sync from the source's current view, on a blocking thread; updates the metrics
    /// and the programmed generations.
    async fn sync_once(
        &self,
        inv: Arc<Inventory>,
        check_drift: bool,
    ) -> Result<SyncOutcome, String> {
        let start = Instant::now();
        let programmed: BTreeMap<ObjectRef, i64> = inv
            .nsgs
            .iter()
            .map(|n| (n.id.clone(), n.generation.unwrap_or(0)))
            .collect();
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.sync_blocking(inv, check_drift))
            .await
            .map_err(|e| format!("the sync task failed: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        let elapsed = start.elapsed();
        match &result {
            Ok(outcome) => {
                self.metrics.synced(*outcome, elapsed, programmed.len());
                if outcome.drift_repaired {
                    self.metrics.drift_repaired();
                    warn!("the table differed from what the agent applied; replaced it");
                }
                if outcome.applied != Applied::Unchanged {
                    info!(applied = ?outcome.applied, pod_update = outcome.pod_update, nsgs = programmed.len(), ms = elapsed.as_secs_f64() * 1e3, "synced");
                } else {
                    debug!(ms = elapsed.as_secs_f64() * 1e3, "sync: unchanged");
                }
                self.programmed.send_if_modified(|p| {
                    if p.as_ref() == Some(&programmed) {
                        false
                    } else {
                        *p = Some(programmed);
                        true
                    }
                });
            }
            Err(e) => {
                self.metrics.sync_failed(elapsed);
                error!(error = %e, "sync failed; the table in the kernel stays as it was");
            }
        }
        result
    }

    /// The sync loop, until `stop` resolves.
    pub async fn run_loop(
        &self,
        source: &dyn Source,
        settings: LoopSettings,
        stop: impl Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut retry: Option<Duration> = None;
        let mut last: Option<Arc<Inventory>> = None;
        let mut next_resync = tokio::time::Instant::now() + settings.resync_interval;
        let mut wake = Wake::Change;
        let mut first = true;
        // When the last sync ended: a change waits until `debounce` after it.
        let mut last_sync = tokio::time::Instant::now();
        loop {
            if !first {
                let retry_sleep = async {
                    match retry {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                };
                wake = tokio::select! {
                    _ = &mut stop => break,
                    _ = source.changed().notified() => Wake::Change,
                    _ = self.drift.notified() => Wake::Drift,
                    _ = tokio::time::sleep_until(next_resync) => Wake::Resync,
                    _ = retry_sleep => Wake::Retry,
                };
                if wake == Wake::Change {
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep_until(last_sync + settings.debounce) => {}
                    }
                }
            }
            first = false;
            // Changes that arrived while waiting are in the snapshot about to be taken.
            let _ = source.changed().notified().now_or_never();
            if wake != Wake::Change {
                next_resync = tokio::time::Instant::now() + settings.resync_interval;
            }
            let Some(inv) = source.inventory().map(Arc::new) else {
                debug!("inputs not synced yet; the table in the kernel stays as it is");
                continue;
            };
            let check_drift = wake != Wake::Change;
            if !check_drift && retry.is_none() && last.as_ref() == Some(&inv) {
                continue;
            }
            let result = self.sync_once(inv.clone(), check_drift).await;
            last_sync = tokio::time::Instant::now();
            match result {
                Ok(_) => {
                    retry = None;
                    last = Some(inv);
                }
                Err(_) => {
                    last = None;
                    let next = retry.map_or(Duration::from_millis(500), |d| {
                        (d * 2).min(Duration::from_secs(30))
                    });
                    warn!(retry_in_ms = next.as_millis() as u64, "retrying the sync");
                    retry = Some(next);
                }
            }
        }
    }

    /// Reads the counters every `interval`: metrics, the hits for the Lease, and a drift
    /// check (a drifted table wakes the loop).
    /// A large table is read less often: at most every ten times what reading it costs.
    pub async fn poll_counters(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut delay = Duration::ZERO;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(delay) => {}
            }
            let dp = self.dataplane.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut dp = dp.lock().expect("dataplane lock");
                let read = dp.current().is_some().then(|| dp.read_hits());
                (read, dp.read_cost())
            })
            .await
            .map(|(read, cost)| {
                delay = interval.max(cost * 10);
                read
            });
            if delay.is_zero() {
                delay = interval;
            }
            match read {
                Ok(Some(Ok((totals, drifted)))) => {
                    self.metrics.set_hits(&totals);
                    self.hits.send_if_modified(|h| {
                        let changed = *h != totals;
                        *h = totals;
                        changed
                    });
                    if drifted {
                        self.drift.notify_one();
                    }
                }
                Ok(Some(Err(e))) => warn!(error = %e, "cannot read the nftables counters"),
                Ok(None) => {}
                Err(e) => warn!(error = %e, "the counter task failed"),
            }
        }
    }
}

/// Renews the node's Lease every `--report-interval`, and at once when the programmed
/// generations change; rule hits go in at most every `--rule-hits-interval`, when changed.
async fn report_loop(
    client: Client,
    node: String,
    args: AgentArgs,
    mut programmed: watch::Receiver<Option<BTreeMap<ObjectRef, i64>>>,
    mut hits: watch::Receiver<BTreeMap<HitKey, u64>>,
    metrics: Arc<metrics::AgentMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &args.report_namespace);
    let nodes: Api<Node> = Api::all(client);
    let lease_duration = args.report_interval * 3;
    let mut node_uid: Option<String> = None;
    let mut hits_written = report::hits_annotation(&BTreeMap::new());
    let mut hits_written_at: Option<Instant> = None;
    let mut ticks = tokio::time::interval(args.report_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let heartbeat = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = ticks.tick() => true,
            r = programmed.changed() => if r.is_err() { break } else { true },
            r = hits.changed() => if r.is_err() { break } else { false },
        };
        // Nothing is reported before the first sync: no Lease means "not programmed".
        let Some(current) = programmed.borrow_and_update().clone() else {
            continue;
        };
        let due = hits_written_at.is_none_or(|t| t.elapsed() >= args.rule_hits_interval);
        let latest = report::hits_annotation(&hits.borrow_and_update());
        let hits_text = if due && latest != hits_written {
            latest
        } else if heartbeat {
            hits_written.clone()
        } else {
            continue; // new counts, not due yet: they go with a later heartbeat
        };
        if node_uid.is_none() {
            node_uid = nodes
                .get_opt(&node)
                .await
                .ok()
                .flatten()
                .and_then(|n| n.metadata.uid);
        }
        let body = report::lease_body(
            &node,
            node_uid.as_deref(),
            lease_duration,
            &current,
            &hits_text,
            k8s_openapi::jiff::Timestamp::now(),
        );
        match report::write_lease(&leases, &node, &body).await {
            Ok(()) => {
                if failing {
                    info!("reporting to the API server again");
                }
                failing = false;
                if hits_text != hits_written {
                    hits_written = hits_text;
                    hits_written_at = Some(Instant::now());
                }
            }
            Err(e) => {
                metrics.report_failed();
                if !failing {
                    warn!(error = %e, "cannot write the node's Lease; retrying at the next heartbeat");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests;
