//! `kube-nsg controller`: watches NetworkSecurityGroups, ApplicationSecurityGroups,
//! ServiceTags, Pods, Namespaces, Nodes and NetworkPolicies; labels pods with their ASG
//! memberships and NIC-level group; server-side applies the compiled NetworkPolicies; and
//! writes the status of every group, ASG and service tag.
//!
//! # Design: one debounced, whole-cluster reconcile
//!
//! kube-runtime's `Controller` reconciles one object at a time and maps changes of other
//! kinds onto it. Here nearly everything depends on everything: a pod's labels decide ASG
//! membership, which changes every NSG that references the ASG, whose compiled policies and
//! status depend on every pod of the namespace and on the node IPs; association conflicts
//! are decided across all groups of a namespace by age. Per-object reconcilers would each
//! rebuild most of that view (or share it and race on it). Instead:
//!
//! 1. One watch per kind feeds a compact in-memory store ([`cache`]); an event that changes
//!    nothing the controller reads wakes nothing.
//! 2. A change wakes one loop that waits a short debounce (bursts coalesce), snapshots every
//!    store, builds the model [`Inventory`](crate::model::Inventory) ([`inventory`]) — an NSG
//!    whose current spec fails validation keeps its last valid model in force and gets
//!    `Accepted=False` — resolves it, and compiles it (skipped when the inventory is
//!    unchanged, which is the case after the controller's own writes; a group's rule analysis
//!    is kept while its rules and the addresses they match do not change).
//! 3. The pass compares the desired state with the observed one and writes only the
//!    differences ([`reconcile`]): NetworkPolicies and statuses by server-side apply with the
//!    field manager `kube-nsg`, pod labels with `kube-nsg-labels`. A pass with nothing to
//!    change makes no API request at all; `kube_nsg_api_writes_total` counts every write.
//! 4. A periodic resync (`--resync-interval`) runs a pass even without events, and a failed
//!    write schedules a retry with backoff.
//!
//! At 2,000 pods and 100 groups of 50 rules (the benchmark, `benches/controller.rs`) a pass
//! that changes nothing costs ~50 ms of CPU, and one whose model changed ~150 ms more for
//! the compilers: whole-cluster passes are cheaper than the bookkeeping fine-grained ones
//! would need, and they see one consistent snapshot.
//!
//! Only the leader ([`leader`], a Lease) writes; a follower keeps its caches warm and
//! reports ready, so a takeover starts with a full pass at once.
//!
//! # Writes and ownership
//!
//! - Order within a pass: NetworkPolicies created or updated, then pod labels, then stale
//!   policies deleted, then statuses and Events — a pod never passes through a state with
//!   fewer policies selecting it than before or after.
//! - NetworkPolicies carry `app.kubernetes.io/managed-by=kube-nsg`, the compiler's labels and
//!   annotations, and a controller owner reference to their NSG (`blockOwnerDeletion`; with
//!   the OwnerReferencesPermissionEnforcement admission plugin this needs `update` on
//!   `networksecuritygroups/finalizers`), so kube-controller-manager's garbage collector
//!   removes them with their NSG. A policy is the controller's only with both the label and
//!   the owner reference; one of the same name that is not is never written
//!   (`NetworkPoliciesProgrammed=False`, reason `NotOwned`, and an Event). A hand edit is
//!   undone by a forced apply; a field someone else added inside the controller's own (a key
//!   in a selector) by a replace with the field manager `kube-nsg-repair`.
//! - Pod labels: an apply with `kube-nsg-labels` sets exactly the granted labels (dropping
//!   one from the applied set removes it); a label with the controller's prefixes that it did
//!   not grant is removed by an explicit merge patch. The controller's own labels are never
//!   inputs: a pod cannot select itself into an ASG or a group.
//! - Status: server-side applied on the status subresource, only the fields the controller
//!   owns (the node agent owns `DataplaneProgrammed` and `dataplane`; conditions are a list
//!   map keyed by `type`). `lastTransitionTime` moves only when a condition's status does.
//!   Events are emitted when a condition turns bad (compared with the observed status, so a
//!   restart repeats none).
//! - Nothing is written in a namespace being deleted; `--namespace-selector` confines the
//!   controller to some namespaces (tests on a shared control plane use it).
//!
//! # Memory
//!
//! The caches keep compact entries (a pod is its labels, one annotation, IPs and node; an
//! NSG its converted model, conditions and a digest of the rest of its status; a
//! NetworkPolicy its metadata and a digest of its normalised spec; a compiled policy between
//! passes its spec as JSON text), lists come in small pages, write responses are metadata
//! only, the runtime has one thread, and the allocator (jemalloc, in `main.rs`) returns emptied
//! pages (at once with the chart's `_RJEM_MALLOC_CONF`). The touched program text is about
//! half of the resident memory. See the benchmark for the figures.

pub mod cache;
pub mod compile;
pub mod dataplane;
pub mod digest;
pub mod inventory;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::daemon::{self, DaemonArgs, init_tracing, parse_duration, shutdown_signal};
pub use compile::Mode;
pub use inventory::{LiveInventory, inventory_from_cluster, scoped_inventory_from_cluster};

/// Arguments of `kube-nsg controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// What NetworkPolicies do with rules they cannot express exactly: `strict` never allows
    /// more than the NSG, `permissive` never denies what it allows (the node agent then
    /// enforces the exact semantics).
    #[arg(long, default_value = "strict", env = "KUBE_NSG_MODE")]
    pub mode: Mode,
    /// Where to serve /metrics, /livez and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "KUBE_NSG_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = "kube-system", env = "POD_NAMESPACE")]
    pub leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "kube-nsg-controller")]
    pub lease_name: String,
    /// Holder identity in the Lease; defaults to $POD_NAME, else hostname-pid.
    #[arg(long)]
    pub identity: Option<String>,
    /// Run without leader election (a single replica that always writes).
    #[arg(long)]
    pub no_leader_election: bool,
    /// How long a Lease is valid without renewal; a standby takes over after this.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// The leader stops writing when it could not renew for this long (less than the lease
    /// duration).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: Duration,
    /// Time between leader-election rounds.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,
    /// Run a full pass this often even without changes (drift repair).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Wait this long after a change before a pass, so bursts of changes coalesce.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// Manage only the namespaces whose labels match (kubectl `-l` syntax: `k=v`, `k!=v`, `k`,
    /// `!k`, comma-separated): their NSGs, ASGs, pods and NetworkPolicies; the rest of the
    /// cluster is not part of the model (pods elsewhere count in VirtualNetwork only through
    /// --virtual-network). Of the (cluster-scoped) ServiceTags, all can be referenced, and
    /// the status of those whose own labels match is written.
    #[arg(long, value_parser = inventory::parse_selector)]
    pub namespace_selector: Option<crate::model::LabelSelector>,
    /// Only the nodes whose labels match (same syntax) contribute their InternalIP addresses
    /// (AzureLoadBalancer, VirtualNetwork) and pod CIDRs (VirtualNetwork). Default: all.
    #[arg(long, value_parser = inventory::parse_selector)]
    pub node_selector: Option<crate::model::LabelSelector>,
    /// Write requests in flight at once.
    #[arg(long, default_value = "16")]
    pub write_concurrency: usize,
    /// Namespace of the node agents' report Leases (their `--report-namespace`): each NSG's
    /// `DataplaneProgrammed` condition counts the agents that report there.
    #[arg(long, default_value = "kube-system", env = "POD_NAMESPACE")]
    pub agent_namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Start(#[from] daemon::StartError),
    #[error("--renew-deadline ({renew:?}) must be shorter than --lease-duration ({lease:?})")]
    LeaseTiming { renew: Duration, lease: Duration },
}

/// [`run`] on its own Tokio runtime, for a synchronous `main`. One thread: the controller is
/// I/O-bound (its CPU work, a compile, takes tens to hundreds of milliseconds per change), and
/// one thread means one allocator cache, which at 2,000 pods halved the resident memory
/// (measured with mimalloc's per-thread heaps).
pub fn run_blocking(args: ControllerArgs) -> Result<(), Error> {
    daemon::block_on(run(args))?
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(args: ControllerArgs) -> Result<(), Error> {
    init_tracing(args.daemon.log_format);
    if !args.no_leader_election && args.renew_deadline >= args.lease_duration {
        return Err(Error::LeaseTiming {
            renew: args.renew_deadline,
            lease: args.lease_duration,
        });
    }
    let client = daemon::client().await?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(leader::default_identity);
    let metrics = Arc::new(metrics::Metrics::new());
    let caches = Arc::new(cache::Caches::default());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let probes = metrics::ControllerProbes {
        metrics: metrics.clone(),
        caches: caches.clone(),
    };
    let server =
        daemon::spawn_server(args.metrics_addr, Arc::new(probes), shutdown_rx.clone()).await?;
    info!(addr = %args.metrics_addr, identity = %identity, mode = ?args.mode, "kube-nsg controller starting");

    let watches = caches.spawn_watches(&client, &metrics);

    let (leader_tx, leader_rx) = watch::channel(args.no_leader_election);
    metrics.set_leader(args.no_leader_election);
    let elector = if args.no_leader_election {
        None
    } else {
        let cfg = leader::LeaseConfig {
            namespace: args.leader_election_namespace.clone(),
            name: args.lease_name.clone(),
            identity: identity.clone(),
            lease_duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        };
        let elector = leader::Elector::new(client.clone(), cfg, metrics.clone());
        Some(tokio::spawn(elector.run(leader_tx, shutdown_rx.clone())))
    };

    let dataplane = tokio::spawn(dataplane::run(
        client.clone(),
        caches.clone(),
        args.agent_namespace.clone(),
        metrics.clone(),
        args.namespace_selector.clone(),
        leader_rx.clone(),
        shutdown_rx.clone(),
    ));

    let settings = reconcile::Settings {
        mode: args.mode,
        virtual_network: args.daemon.virtual_network.clone(),
        concurrency: args.write_concurrency.max(1),
        identity,
        scope: args.namespace_selector.clone(),
        nodes: args.node_selector.clone(),
    };
    let mut reconciler = reconcile::Reconciler::new(
        client.clone(),
        caches.clone(),
        metrics.clone(),
        leader_rx.clone(),
        settings,
    );

    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut leader_rx = leader_rx;
    let mut retry: Option<Duration> = None;
    loop {
        let retry_sleep = tokio::time::sleep(retry.unwrap_or(args.resync_interval));
        tokio::select! {
            _ = &mut signal => break,
            _ = caches.changed.notified() => {}
            changed = leader_rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = retry_sleep => {}
        }
        tokio::select! {
            _ = &mut signal => break,
            _ = tokio::time::sleep(args.debounce) => {}
        }
        // Changes that arrived during the debounce are in the snapshot about to be taken.
        let _ = caches.changed.notified().now_or_never();
        if !caches.synced() || !*leader_rx.borrow() {
            continue;
        }
        let report = reconciler.pass().await;
        retry = if report.failures > 0 {
            let next = retry.map_or(Duration::from_millis(500), |d| {
                (d * 2).min(Duration::from_secs(30))
            });
            warn!(
                retry_in_ms = next.as_millis() as u64,
                "pass had failures; retrying"
            );
            Some(next)
        } else {
            None
        };
    }

    info!("shutting down");
    shutdown_tx.send_replace(true);
    if let Some(elector) = elector
        && let Err(e) = elector.await
    {
        error!(error = %e, "leader elector task failed");
    }
    for w in watches {
        w.abort();
    }
    let _ = dataplane.await;
    let _ = server.await;
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::parse_from([
            "x",
            "--virtual-network",
            "10.244.0.0/16,10.96.0.0/12",
            "--mode",
            "permissive",
            "--metrics-addr",
            "127.0.0.1:9090",
            "--log-format",
            "json",
            "--resync-interval",
            "30s",
            "--debounce",
            "50ms",
        ]);
        assert_eq!(cli.args.daemon.virtual_network.len(), 2);
        assert_eq!(cli.args.daemon.log_format, daemon::LogFormat::Json);
        assert_eq!(cli.args.mode, Mode::Permissive);
        assert_eq!(cli.args.resync_interval, Duration::from_secs(30));
        assert_eq!(cli.args.debounce, Duration::from_millis(50));
        assert_eq!(cli.args.lease_duration, Duration::from_secs(15));
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    }
}
