//! The controller's Prometheus metrics, and what its `/metrics` and `/readyz` answer (served
//! by [`crate::daemon::spawn_server`]).
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `kube_nsg_reconciles_total` | counter | reconcile passes run (leader and follower) |
//! | `kube_nsg_reconcile_errors_total` | counter | passes that ended with at least one failed write |
//! | `kube_nsg_compiles_total` | counter | passes whose model changed, so the compilers ran |
//! | `kube_nsg_reconcile_duration_seconds` | histogram | time of one pass, writes included |
//! | `kube_nsg_api_writes_total{resource,verb}` | counter | every write request sent to the API server (Lease renewals excluded); zero growth on a no-op pass |
//! | `kube_nsg_lease_writes_total` | counter | Lease creates, renewals, takeovers and releases |
//! | `kube_nsg_watch_errors_total{kind}` | counter | watch failures (retried with backoff) |
//! | `kube_nsg_cached_objects{kind}` | gauge | objects in the in-memory view |
//! | `kube_nsg_managed_objects{kind}` | gauge | objects the controller manages: `networkpolicies`, `labelled_pods`, `networksecuritygroups`, `applicationsecuritygroups`, `servicetags` |
//! | `kube_nsg_leader` | gauge | 1 while this replica holds the Lease |

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::cache::Caches;
use crate::daemon::Probes;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    resource: String,
    verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Counter,
    compiles: Counter,
    reconcile_duration: Histogram,
    writes: Family<WriteLabels, Counter>,
    lease_writes: Counter,
    watch_errors: Family<KindLabels, Counter>,
    cached: Family<KindLabels, Gauge>,
    managed: Family<KindLabels, Gauge>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kube_nsg");
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let compiles = Counter::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let writes = Family::<WriteLabels, Counter>::default();
        let lease_writes = Counter::default();
        let watch_errors = Family::<KindLabels, Counter>::default();
        let cached = Family::<KindLabels, Gauge>::default();
        let managed = Family::<KindLabels, Gauge>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconcile passes run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile passes that ended with at least one failed write",
            reconcile_errors.clone(),
        );
        registry.register(
            "compiles",
            "Passes whose model changed, so the compilers ran",
            compiles.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of one reconcile pass, writes included",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register(
            "api_writes",
            "Write requests sent to the API server, Lease renewals excluded",
            writes.clone(),
        );
        registry.register(
            "lease_writes",
            "Lease creates, renewals, takeovers and releases",
            lease_writes.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch failures, retried with backoff",
            watch_errors.clone(),
        );
        registry.register(
            "cached_objects",
            "Objects in the controller's in-memory view",
            cached.clone(),
        );
        registry.register(
            "managed_objects",
            "Objects managed by the controller",
            managed.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            compiles,
            reconcile_duration,
            writes,
            lease_writes,
            watch_errors,
            cached,
            managed,
            leader,
        }
    }

    pub fn reconciled(&self, duration: Duration, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.reconcile_errors.inc();
        }
        self.reconcile_duration.observe(duration.as_secs_f64());
    }

    pub fn compiled(&self) {
        self.compiles.inc();
    }

    pub fn write(&self, resource: &str, verb: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                resource: resource.into(),
                verb: verb.into(),
            })
            .inc();
    }

    pub fn lease_write(&self) {
        self.lease_writes.inc();
    }

    pub fn watch_error(&self, kind: &str) {
        self.watch_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn set_cached(&self, kind: &str, n: usize) {
        self.cached
            .get_or_create(&KindLabels { kind: kind.into() })
            .set(n as i64);
    }

    pub fn set_managed(&self, kind: &str, n: usize) {
        self.managed
            .get_or_create(&KindLabels { kind: kind.into() })
            .set(n as i64);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// What the controller's `/metrics` and `/readyz` answer.
pub struct ControllerProbes {
    pub metrics: Arc<Metrics>,
    pub caches: Arc<Caches>,
}

/// Ready once every cache has completed its first list, on the leader and on followers alike.
impl Probes for ControllerProbes {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn ready(&self) -> Result<(), &'static str> {
        if self.caches.synced() {
            Ok(())
        } else {
            Err("caches not synced")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_the_documented_ones() {
        let m = Metrics::new();
        m.write("pods", "apply");
        m.reconciled(Duration::from_millis(3), false);
        m.set_managed("networkpolicies", 2);
        m.set_leader(true);
        let text = m.encode();
        for name in [
            "kube_nsg_reconciles_total",
            "kube_nsg_reconcile_errors_total",
            "kube_nsg_reconcile_duration_seconds_bucket",
            "kube_nsg_api_writes_total{resource=\"pods\",verb=\"apply\"} 1",
            "kube_nsg_lease_writes_total",
            "kube_nsg_managed_objects{kind=\"networkpolicies\"} 2",
            "kube_nsg_leader 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
