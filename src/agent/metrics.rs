//! The agent's Prometheus metrics, and what its `/metrics` and `/readyz` answer (served by
//! [`crate::daemon::spawn_server`]).
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `kube_nsg_agent_syncs_total{kind}` | counter | syncs by what they changed: `full` (the table replaced atomically), `elements` (set elements only), `unchanged` |
//! | `kube_nsg_agent_compiles_total{kind}` | counter | how successful syncs got their table: `full` (the node's table compiled), `pods` (the last table updated for pod churn) |
//! | `kube_nsg_agent_sync_errors_total` | counter | syncs that failed (`nft` refused or could not run); retried with backoff, the table in the kernel stays |
//! | `kube_nsg_agent_sync_duration_seconds` | histogram | build, compile and apply of one sync |
//! | `kube_nsg_agent_drift_repairs_total` | counter | times the kernel's table differed from what the agent applied and was replaced |
//! | `kube_nsg_agent_rule_hits_total{nsg,direction,rule}` | counter | new flows each NSG rule decided on this node (read from the nftables counters every `--counters-interval`) |
//! | `kube_nsg_agent_programmed_nsgs` | gauge | NSGs in the table last applied |
//! | `kube_nsg_agent_ready` | gauge | 1 once the first sync succeeded |
//! | `kube_nsg_agent_report_errors_total` | counter | failed writes of the node's Lease (retried at the next heartbeat) |
//! | `kube_nsg_agent_watch_errors_total{kind}` | counter | watch failures (retried with backoff; the table stays) |
//! | `kube_nsg_agent_cached_objects{kind}` | gauge | objects in the agent's in-memory view |

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::dataplane::{HitKey, SyncOutcome};
use crate::controller::cache::WatchMetrics;
use crate::daemon::Probes;
use crate::nft::Applied;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    nsg: String,
    direction: String,
    rule: String,
}

pub struct AgentMetrics {
    registry: Registry,
    syncs: Family<KindLabels, Counter>,
    compiles: Family<KindLabels, Counter>,
    sync_errors: Counter,
    sync_duration: Histogram,
    drift_repairs: Counter,
    rule_hits: Family<RuleLabels, Counter>,
    programmed: Gauge,
    ready_gauge: Gauge,
    report_errors: Counter,
    watch_errors: Family<KindLabels, Counter>,
    cached: Family<KindLabels, Gauge>,
    ready: AtomicBool,
    /// What `rule_hits` was last set to, to add only the growth.
    hits_seen: std::sync::Mutex<BTreeMap<HitKey, u64>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kube_nsg_agent");
        let m = AgentMetrics {
            syncs: Family::default(),
            compiles: Family::default(),
            sync_errors: Counter::default(),
            sync_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            drift_repairs: Counter::default(),
            rule_hits: Family::default(),
            programmed: Gauge::default(),
            ready_gauge: Gauge::default(),
            report_errors: Counter::default(),
            watch_errors: Family::default(),
            cached: Family::default(),
            ready: AtomicBool::new(false),
            hits_seen: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "syncs",
            "Syncs of the node's table by what they changed: full, elements, unchanged",
            m.syncs.clone(),
        );
        registry.register(
            "compiles",
            "How successful syncs got their table: full (compiled), pods (updated for pod churn)",
            m.compiles.clone(),
        );
        registry.register(
            "sync_errors",
            "Syncs that failed; the table in the kernel stays as it was",
            m.sync_errors.clone(),
        );
        registry.register_with_unit(
            "sync_duration",
            "Build, compile and apply of one sync",
            Unit::Seconds,
            m.sync_duration.clone(),
        );
        registry.register(
            "drift_repairs",
            "Times the kernel's table differed from what the agent applied and was replaced",
            m.drift_repairs.clone(),
        );
        registry.register(
            "rule_hits",
            "New flows each NSG rule decided on this node",
            m.rule_hits.clone(),
        );
        registry.register(
            "programmed_nsgs",
            "NSGs in the table last applied",
            m.programmed.clone(),
        );
        registry.register(
            "ready",
            "1 once the first sync succeeded",
            m.ready_gauge.clone(),
        );
        registry.register(
            "report_errors",
            "Failed writes of the node's Lease",
            m.report_errors.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch failures, retried with backoff",
            m.watch_errors.clone(),
        );
        registry.register(
            "cached_objects",
            "Objects in the agent's in-memory view",
            m.cached.clone(),
        );
        AgentMetrics { registry, ..m }
    }

    pub fn synced(&self, outcome: SyncOutcome, duration: Duration, programmed: usize) {
        let kind = match outcome.applied {
            Applied::Replaced => "full",
            Applied::Elements => "elements",
            Applied::Unchanged => "unchanged",
        };
        self.syncs
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
        let compile = if outcome.pod_update { "pods" } else { "full" };
        self.compiles
            .get_or_create(&KindLabels {
                kind: compile.into(),
            })
            .inc();
        self.sync_duration.observe(duration.as_secs_f64());
        self.programmed.set(programmed as i64);
        self.ready.store(true, Ordering::Relaxed);
        self.ready_gauge.set(1);
    }

    pub fn sync_failed(&self, duration: Duration) {
        self.sync_errors.inc();
        self.sync_duration.observe(duration.as_secs_f64());
    }

    pub fn drift_repaired(&self) {
        self.drift_repairs.inc();
    }

    pub fn report_failed(&self) {
        self.report_errors.inc();
    }

    /// Sets the per-rule counters to these totals (which only grow).
    pub fn set_hits(&self, totals: &BTreeMap<HitKey, u64>) {
        let mut seen = self.hits_seen.lock().expect("metrics lock");
        for (key, &total) in totals {
            let before = seen.get(key).copied().unwrap_or(0);
            let counter = self.rule_hits.get_or_create(&RuleLabels {
                nsg: key.0.to_string(),
                direction: format!("{:?}", key.1),
                rule: key.2.clone(),
            });
            if total > before {
                counter.inc_by(total - before);
            }
            seen.insert(key.clone(), total.max(before));
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

impl WatchMetrics for AgentMetrics {
    fn watch_error(&self, kind: &str) {
        self.watch_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    fn set_cached(&self, kind: &str, n: usize) {
        self.cached
            .get_or_create(&KindLabels { kind: kind.into() })
            .set(n as i64);
    }
}

/// Ready once the first sync has programmed the table from complete caches.
impl Probes for AgentMetrics {
    fn metrics(&self) -> String {
        self.encode()
    }

    fn ready(&self) -> Result<(), &'static str> {
        if self.is_ready() {
            Ok(())
        } else {
            Err("first sync not done")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Direction, ObjectRef};

    #[test]
    fn metric_names_are_the_documented_ones() {
        let m = AgentMetrics::new();
        let outcome = |applied, pod_update| SyncOutcome {
            applied,
            drift_repaired: false,
            pod_update,
        };
        m.synced(
            outcome(Applied::Replaced, false),
            Duration::from_millis(3),
            2,
        );
        m.synced(
            outcome(Applied::Elements, true),
            Duration::from_millis(1),
            2,
        );
        m.sync_failed(Duration::from_millis(1));
        let key = (
            ObjectRef::new("shop", "nsg1"),
            Direction::Inbound,
            "Deny-Database-All".to_string(),
        );
        m.set_hits(&BTreeMap::from([(key.clone(), 5)]));
        m.set_hits(&BTreeMap::from([(key, 7)]));
        let text = m.encode();
        for name in [
            "kube_nsg_agent_syncs_total{kind=\"full\"} 1",
            "kube_nsg_agent_syncs_total{kind=\"elements\"} 1",
            "kube_nsg_agent_compiles_total{kind=\"full\"} 1",
            "kube_nsg_agent_compiles_total{kind=\"pods\"} 1",
            "kube_nsg_agent_sync_errors_total 1",
            "kube_nsg_agent_sync_duration_seconds_bucket",
            "kube_nsg_agent_rule_hits_total{nsg=\"shop/nsg1\",direction=\"Inbound\",rule=\"Deny-Database-All\"} 7",
            "kube_nsg_agent_programmed_nsgs 2",
            "kube_nsg_agent_ready 1",
            "kube_nsg_agent_drift_repairs_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
