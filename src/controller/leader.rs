//! Leader election on a `coordination.k8s.io/v1` Lease, the protocol client-go's
//! leaderelection package uses, so `kubectl get lease` reads the same way.
//!
//! - A candidate that finds no Lease creates it; one that finds a Lease held by someone else
//!   takes it over only after it has seen the Lease *unchanged* for `leaseDurationSeconds` on
//!   its own monotonic clock (so clock skew between replicas does not matter). Every update
//!   carries the `resourceVersion` it read, so two candidates cannot both win a race.
//! - The holder renews every `retry_period`. If it could not renew for `renew_deadline`
//!   (shorter than the lease duration), it stops being leader *before* anyone else may take
//!   over: the gap between the two is the margin that keeps two replicas from ever writing at
//!   the same time.
//! - On shutdown the holder releases the Lease (empty holder), so a standby takes over at
//!   once instead of waiting for expiry.
//!
//! Leadership is published on a `watch` channel; every write the controller makes checks it.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use super::metrics::Metrics;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's holder identity.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// The identity of this process: the pod name when running in a pod, else hostname and pid.
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    metrics: Arc<Metrics>,
    /// The last Lease record seen (holder, renew time, resourceVersion) and when it was first
    /// seen by this process.
    observed: Option<(Option<String>, Option<MicroTime>, Option<String>)>,
    observed_at: Instant,
    last_renew: Option<Instant>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(client: Client, cfg: LeaseConfig, metrics: Arc<Metrics>) -> Self {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            metrics,
            observed: None,
            observed_at: Instant::now(),
            last_renew: None,
        }
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: returns whether this replica holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            self.metrics.lease_write();
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (
            holder.clone(),
            spec.renew_time.clone(),
            lease.metadata.resource_version.clone(),
        );
        if self.observed.as_ref() != Some(&record) {
            self.observed = Some(record);
            self.observed_at = Instant::now();
        }
        let mine = holder.as_deref() == Some(self.cfg.identity.as_str());
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.cfg.lease_duration);
        if !mine && holder.is_some() && self.observed_at.elapsed() < duration {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if mine {
            self.spec(now, spec.acquire_time, transitions)
        } else {
            info!(lease = %self.cfg.name, previous = ?holder, "taking over the leader Lease");
            self.spec(now, None, transitions + 1)
        });
        self.metrics.lease_write();
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this replica holds it.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.metrics.lease_write();
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    /// Runs rounds until `shutdown` turns true, publishing leadership on `tx`; releases the
    /// Lease on the way out.
    pub async fn run(mut self, tx: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let was_leader = *tx.borrow();
            let leader = match self.try_acquire_or_renew().await {
                Ok(true) => {
                    self.last_renew = Some(Instant::now());
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    warn!(error = %e, lease = %self.cfg.name, "leader election round failed");
                    was_leader
                        && self
                            .last_renew
                            .is_some_and(|t| t.elapsed() < self.cfg.renew_deadline)
                }
            };
            if leader != was_leader {
                info!(identity = %self.cfg.identity, leader, "leadership changed");
                self.metrics.set_leader(leader);
                tx.send_replace(leader);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if *tx.borrow() {
            tx.send_replace(false);
            self.metrics.set_leader(false);
            if let Err(e) = self.release().await {
                warn!(error = %e, "could not release the leader Lease");
            } else {
                info!(lease = %self.cfg.name, "released the leader Lease");
            }
        }
    }
}
