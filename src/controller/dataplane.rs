//! The `DataplaneProgrammed` condition and `status.dataplane` of every NSG, from the node
//! agents' reports (one Lease per node, see [`crate::agent::report`]): "N of M nodes", where
//! M counts the nodes whose agent is live (its Lease renewed within `leaseDurationSeconds`,
//! three heartbeats) and N those among them whose table enforces the NSG's current generation,
//! as Antrea reports the realisation of a policy.
//!
//! A small loop of its own rather than part of the reconcile pass: heartbeats arrive every few
//! seconds per node and change nothing but liveness, which a pass over the whole model should
//! not pay for. It watches the agents' Leases, re-evaluates when a report's programmed
//! generations change, when the caches change (a new NSG gets its condition at once) and once
//! a second (liveness is a matter of time), and server-side applies only the condition and the
//! field, with a field manager of its own (`kube-nsg-dataplane`), only when they change. Only
//! the leader writes, and only in the namespaces of its scope (`--namespace-selector`) that
//! are not being deleted.
//!
//! | status | reason | when |
//! |---|---|---|
//! | True | `Programmed` | every live agent enforces the current generation |
//! | False | `Pending` | some live agents do not yet (the message names up to five nodes) |
//! | False | `NotAccepted` | the current generation is invalid; nodes keep the last valid one |
//! | False | `NoAgents` | no live agent reports (the agent is not deployed, or not running) |

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::cache::{Caches, NsgEntry};
use super::metrics::Metrics;
use super::status::{self, Cond};
use crate::agent::report::{NODE_LABEL, NodeReport};
use crate::api::NetworkSecurityGroup;
use crate::model::ObjectRef;

pub const DATAPLANE_PROGRAMMED: &str = "DataplaneProgrammed";
/// The field manager of these writes (the rest of the status is `kube-nsg`'s).
pub const MANAGER: &str = "kube-nsg-dataplane";
/// How many lagging nodes a message names.
const LISTED_NODES: usize = 5;

/// What an NSG's status should say about the dataplane: the condition and "N/M".
pub fn dataplane_status(
    id: &ObjectRef,
    generation: Option<i64>,
    accepted: bool,
    live: &[&NodeReport],
) -> (Cond, String) {
    let m = live.len();
    let generation = generation.unwrap_or(0);
    let enforcing: Vec<&&NodeReport> = live
        .iter()
        .filter(|r| r.programmed.get(id) == Some(&generation))
        .collect();
    let n = enforcing.len();
    let field = format!("{n}/{m}");
    let cond = if m == 0 {
        Cond::new(
            DATAPLANE_PROGRAMMED,
            false,
            "NoAgents",
            "no node agent reports: the nftables dataplane is not deployed or not running",
        )
    } else if !accepted {
        let older = live
            .iter()
            .filter(|r| r.programmed.contains_key(id))
            .count();
        Cond::new(
            DATAPLANE_PROGRAMMED,
            false,
            "NotAccepted",
            format!(
                "generation {generation} is not valid; {older} of {m} nodes enforce the last valid generation"
            ),
        )
    } else if n == m {
        Cond::new(
            DATAPLANE_PROGRAMMED,
            true,
            "Programmed",
            format!("generation {generation} is programmed on {n} of {m} nodes"),
        )
    } else {
        let lagging: Vec<&str> = live
            .iter()
            .filter(|r| r.programmed.get(id) != Some(&generation))
            .map(|r| r.node.as_str())
            .collect();
        let mut names = lagging
            .iter()
            .take(LISTED_NODES)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if lagging.len() > LISTED_NODES {
            names += &format!(" and {} more", lagging.len() - LISTED_NODES);
        }
        Cond::new(
            DATAPLANE_PROGRAMMED,
            false,
            "Pending",
            format!(
                "generation {generation} is programmed on {n} of {m} nodes; not yet on {names}"
            ),
        )
    };
    (cond, field)
}

/// Whether the observed status already says this.
fn observed_same(entry: &NsgEntry, cond: &Cond, field: &str) -> bool {
    entry.dataplane.as_deref() == Some(field)
        && entry
            .conditions
            .iter()
            .any(|c| cond.same_as(c) && c.observed_generation == entry.generation)
}

fn body(entry: &NsgEntry, cond: &Cond, field: &str) -> serde_json::Value {
    let conditions = status::conditions(
        &entry.conditions,
        std::slice::from_ref(cond),
        entry.generation,
        status::now(),
    );
    json!({
        "apiVersion": "kubensg.io/v1alpha1",
        "kind": "NetworkSecurityGroup",
        "metadata": {"name": entry.name, "namespace": entry.namespace, "uid": entry.uid},
        "status": {"conditions": conditions, "dataplane": field},
    })
}

/// The agents' reports as the Lease watch delivers them.
#[derive(Default)]
struct Reports {
    by_lease: BTreeMap<String, NodeReport>,
    synced: bool,
}

/// Runs until `stop`: watches the agents' Leases in `namespace` and keeps every NSG's
/// `DataplaneProgrammed` condition and `status.dataplane` current.
pub async fn run(
    client: Client,
    caches: Arc<Caches>,
    namespace: String,
    metrics: Arc<Metrics>,
    scope: Option<crate::model::LabelSelector>,
    mut leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let mut events = watcher(leases, watcher::Config::default().labels(NODE_LABEL))
        .default_backoff()
        .boxed();
    let mut reports = Reports::default();
    let mut pending_init: BTreeMap<String, NodeReport> = BTreeMap::new();
    // What this replica last wrote per NSG uid, so a write is not repeated while the cache
    // has not seen it yet.
    let mut written: HashMap<String, (Cond, String)> = HashMap::new();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cache_changes = caches.version.subscribe();
    let mut coalesce = false;
    loop {
        let evaluate = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = ticks.tick() => true,
            // A new or changed NSG gets its condition with its first status, not a second later.
            r = cache_changes.changed() => {
                if r.is_err() {
                    break;
                }
                coalesce = true;
                true
            }
            r = leader.changed() => {
                if r.is_err() {
                    break;
                }
                written.clear();
                true
            }
            e = events.next() => match e {
                None => break,
                Some(Err(e)) => {
                    warn!(error = %e, "watching the agents' Leases failed; retrying");
                    metrics.watch_error("Lease");
                    false
                }
                Some(Ok(ev)) => apply_event(&mut reports, &mut pending_init, ev),
            },
        };
        if coalesce {
            // Bursts of cache changes (pod churn) make one evaluation.
            tokio::time::sleep(Duration::from_millis(20)).await;
            cache_changes.borrow_and_update();
            coalesce = false;
        }
        if !evaluate || !*leader.borrow() || !reports.synced || !caches.nsgs.is_synced() {
            continue;
        }
        let now = Timestamp::now();
        let live: Vec<&NodeReport> = reports
            .by_lease
            .values()
            .filter(|r| r.is_live(now))
            .collect();
        // Only the groups of the namespaces this controller manages (`--namespace-selector`),
        // and none in a namespace being deleted.
        let snap = super::inventory::Snapshot::of(&caches, scope.as_ref());
        let mut writes = vec![];
        for entry in snap.nsgs.iter().cloned() {
            if snap.terminating(&entry.namespace) {
                continue;
            }
            let id = ObjectRef::new(&entry.namespace, &entry.name);
            let (cond, field) = dataplane_status(&id, entry.generation, entry.model.is_ok(), &live);
            let desired = (cond, field);
            if observed_same(&entry, &desired.0, &desired.1)
                || written.get(&entry.uid) == Some(&desired)
            {
                continue;
            }
            writes.push((entry, desired));
        }
        let api_for = |ns: &str| Api::<NetworkSecurityGroup>::namespaced(client.clone(), ns);
        let results: Vec<_> = futures::stream::iter(writes.into_iter().map(|(entry, desired)| {
            let api = api_for(&entry.namespace);
            let metrics = metrics.clone();
            async move {
                metrics.write("networksecuritygroups/status", "apply");
                let r = api
                    .patch_status(
                        &entry.name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(body(&entry, &desired.0, &desired.1)),
                    )
                    .await;
                (entry, desired, r)
            }
        }))
        .buffer_unordered(8)
        .collect()
        .await;
        for (entry, desired, r) in results {
            match r {
                Ok(_) => {
                    debug!(nsg = %format!("{}/{}", entry.namespace, entry.name), dataplane = %desired.1, "dataplane status");
                    written.insert(entry.uid.clone(), desired);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    warn!(nsg = %format!("{}/{}", entry.namespace, entry.name), error = %e, "cannot write the dataplane status; retrying");
                    written.remove(&entry.uid);
                }
            }
        }
        let live_uids: std::collections::HashSet<String> =
            snap.nsgs.iter().map(|e| e.uid.clone()).collect();
        written.retain(|uid, _| live_uids.contains(uid));
    }
}

/// Applies one watch event; returns whether the reports changed in a way that matters now
/// (a heartbeat that only renews does not: liveness is re-evaluated every second).
fn apply_event(
    reports: &mut Reports,
    pending: &mut BTreeMap<String, NodeReport>,
    event: watcher::Event<Lease>,
) -> bool {
    match event {
        watcher::Event::Apply(lease) => {
            let Some(r) = NodeReport::from_lease(&lease) else {
                return false;
            };
            let old = reports.by_lease.insert(lease.name_any(), r.clone());
            old.is_none_or(|o| o.programmed != r.programmed)
        }
        watcher::Event::Delete(lease) => reports.by_lease.remove(&lease.name_any()).is_some(),
        watcher::Event::Init => {
            pending.clear();
            false
        }
        watcher::Event::InitApply(lease) => {
            if let Some(r) = NodeReport::from_lease(&lease) {
                pending.insert(lease.name_any(), r);
            }
            false
        }
        watcher::Event::InitDone => {
            reports.by_lease = std::mem::take(pending);
            reports.synced = true;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, programmed: &[(&str, i64)], renewed: i64) -> NodeReport {
        NodeReport {
            node: node.into(),
            programmed: programmed
                .iter()
                .map(|(n, g)| (n.parse().unwrap(), *g))
                .collect(),
            hits: BTreeMap::new(),
            renewed: Some(Timestamp::from_second(renewed).unwrap()),
            lease_duration: Duration::from_secs(30),
        }
    }

    #[test]
    fn n_of_m_live_nodes() {
        let id: ObjectRef = "shop/nsg1".parse().unwrap();
        let a = report("a", &[("shop/nsg1", 3)], 1000);
        let b = report("b", &[("shop/nsg1", 2)], 1000);
        let c = report("c", &[], 1000);
        let dead = report("d", &[("shop/nsg1", 3)], 900);
        let now = Timestamp::from_second(1010).unwrap();
        let all = [&a, &b, &c, &dead];
        let live: Vec<&NodeReport> = all.into_iter().filter(|r| r.is_live(now)).collect();
        assert_eq!(live.len(), 3, "d's Lease expired");

        let (cond, field) = dataplane_status(&id, Some(3), true, &live);
        assert_eq!(field, "1/3");
        assert!(!cond.status);
        assert_eq!(cond.reason, "Pending");
        assert_eq!(
            cond.message,
            "generation 3 is programmed on 1 of 3 nodes; not yet on b, c"
        );

        let (cond, field) = dataplane_status(&id, Some(3), true, &[&a]);
        assert_eq!(
            (cond.status, cond.reason.as_str(), field.as_str()),
            (true, "Programmed", "1/1")
        );

        let (cond, field) = dataplane_status(&id, Some(4), false, &live);
        assert_eq!(cond.reason, "NotAccepted");
        assert_eq!(field, "0/3");
        assert!(cond.message.contains("2 of 3 nodes enforce the last valid"));

        let (cond, field) = dataplane_status(&id, Some(3), true, &[]);
        assert_eq!((cond.reason.as_str(), field.as_str()), ("NoAgents", "0/0"));
    }

    #[test]
    fn only_programmed_changes_wake_the_loop() {
        let lease = |programmed: &str, renew: &str| -> Lease {
            serde_json::from_value(json!({
                "metadata": {"name": "kube-nsg-agent-a", "labels": {NODE_LABEL: "a"},
                    "annotations": {"kubensg.io/programmed": programmed}},
                "spec": {"renewTime": renew, "leaseDurationSeconds": 30},
            }))
            .unwrap()
        };
        let mut reports = Reports::default();
        let mut pending = BTreeMap::new();
        assert!(!apply_event(
            &mut reports,
            &mut pending,
            watcher::Event::Init
        ));
        assert!(apply_event(
            &mut reports,
            &mut pending,
            watcher::Event::InitDone
        ));
        let t1 = "2026-01-01T00:00:00.000000Z";
        let t2 = "2026-01-01T00:00:10.000000Z";
        assert!(apply_event(
            &mut reports,
            &mut pending,
            watcher::Event::Apply(lease(r#"{"s/n":1}"#, t1))
        ));
        assert!(
            !apply_event(
                &mut reports,
                &mut pending,
                watcher::Event::Apply(lease(r#"{"s/n":1}"#, t2))
            ),
            "a heartbeat"
        );
        assert_eq!(
            reports.by_lease["kube-nsg-agent-a"]
                .renewed
                .unwrap()
                .as_second()
                % 60,
            10
        );
        assert!(apply_event(
            &mut reports,
            &mut pending,
            watcher::Event::Apply(lease(r#"{"s/n":2}"#, t2))
        ));
    }
}
