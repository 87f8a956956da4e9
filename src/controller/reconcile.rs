//! One reconcile pass over the whole cluster: snapshot the caches, build and resolve the
//! model, compile it, then bring the API server in line — NetworkPolicies, pod labels, stale
//! policies, statuses and Events, in that order — writing only what differs.
//!
//! The order is chosen for safety: a new or changed policy lands before the labels that make
//! it select pods, and a stale policy goes only after the labels moved away from it, so a pod
//! never passes through a state with fewer policies selecting it than before or after.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod as ApiPod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::cache::{Caches, PodEntry};
use super::compile::{self, Mode, Output};
use super::inventory::{self, Snapshot, is_managed_label};
use super::metrics::Metrics;
use super::policy;
use super::status::{self, NsgFacts, Programmed, Summaries};
use crate::api::{ApplicationSecurityGroup, NetworkSecurityGroup, ServiceTag};
use crate::model::{Inventory, Nsg, ObjectRef};
use crate::resolve::Resolved;

/// Field manager of NetworkPolicies and statuses.
pub const MANAGER: &str = "kube-nsg";
/// Field manager of the pod labels, so dropping a label from its applied set removes it.
pub const LABEL_MANAGER: &str = "kube-nsg-labels";
/// Field manager of the rare full replacement of a hand-edited NetworkPolicy that an apply
/// alone cannot restore (fields another manager added inside ours).
const REPAIR_MANAGER: &str = "kube-nsg-repair";

#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub virtual_network: Vec<ipnet::IpNet>,
    /// Writes in flight at once.
    pub concurrency: usize,
    /// Reported as the Events' reporting instance.
    pub identity: String,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("not the leader any more")]
    NotLeader,
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl WriteError {
    fn not_found(&self) -> bool {
        matches!(self, WriteError::Kube(kube::Error::Api(s)) if s.code == 404)
    }
}

/// What the write phase needs: the client, the metrics, and the leadership to check before
/// every write.
struct Ctx<'a> {
    client: &'a Client,
    metrics: &'a Metrics,
    leader: &'a watch::Receiver<bool>,
}

impl Ctx<'_> {
    /// Called right before each write request; counts it.
    fn write(&self, resource: &str, verb: &str) -> Result<(), WriteError> {
        if !*self.leader.borrow() {
            return Err(WriteError::NotLeader);
        }
        self.metrics.write(resource, verb);
        Ok(())
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub writes: usize,
    pub failures: usize,
    /// The pass stopped because leadership was lost.
    pub aborted: bool,
}

pub struct Reconciler {
    client: Client,
    caches: Arc<Caches>,
    metrics: Arc<Metrics>,
    leader: watch::Receiver<bool>,
    settings: Settings,
    recorder: Recorder,
    last_valid: HashMap<String, Nsg>,
    /// The last compiled inventory and its output: compiling is skipped while the inventory
    /// does not change (our own writes do not change it).
    memo: Option<(Inventory, Arc<Output>)>,
}

impl Reconciler {
    pub fn new(
        client: Client,
        caches: Arc<Caches>,
        metrics: Arc<Metrics>,
        leader: watch::Receiver<bool>,
        settings: Settings,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(settings.identity.clone()),
            },
        );
        Reconciler {
            client,
            caches,
            metrics,
            leader,
            settings,
            recorder,
            last_valid: HashMap::new(),
            memo: None,
        }
    }

    pub async fn pass(&mut self) -> PassReport {
        let started = Instant::now();
        let span = info_span!("reconcile");
        let report = self.pass_inner().instrument(span).await;
        let failed = report.failures > 0;
        self.metrics.reconciled(started.elapsed(), failed);
        if report.writes > 0 || failed {
            info!(
                writes = report.writes,
                failures = report.failures,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "reconciled"
            );
        } else {
            debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "reconciled: nothing to change"
            );
        }
        report
    }

    async fn pass_inner(&mut self) -> PassReport {
        let snap = Snapshot::of(&self.caches);
        let built = inventory::build(&snap, &self.settings.virtual_network, &mut self.last_valid);
        let output = match &self.memo {
            Some((inv, out)) if *inv == built.inventory => out.clone(),
            _ => {
                let res = Resolved::new(&built.inventory);
                Arc::new(compile::compile(&res, self.settings.mode))
            }
        };
        let res = Resolved::new(&built.inventory);
        let ctx = Ctx {
            client: &self.client,
            metrics: &self.metrics,
            leader: &self.leader,
        };
        let mut report = PassReport::default();

        // Which NSG object each model, uid and key belongs to.
        let nsg_by_key: HashMap<(&str, &str), usize> = snap
            .nsgs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                (
                    (
                        o.metadata.namespace.as_deref().unwrap_or(""),
                        o.metadata.name.as_deref().unwrap_or(""),
                    ),
                    i,
                )
            })
            .collect();
        let nsg_by_uid: HashMap<&str, usize> = snap
            .nsgs
            .iter()
            .enumerate()
            .filter_map(|(i, o)| Some((o.metadata.uid.as_deref()?, i)))
            .collect();
        let mut programmed: Vec<Programmed> = built
            .nsgs
            .iter()
            .map(|s| {
                if s.model.is_some() {
                    Programmed::Ok
                } else {
                    Programmed::NotAccepted
                }
            })
            .collect();
        let mut policy_names: Vec<Vec<String>> = vec![Vec::new(); snap.nsgs.len()];

        // 1. NetworkPolicies to create or update.
        let observed: HashMap<(&str, &str), &Arc<NetworkPolicy>> = snap
            .policies
            .iter()
            .map(|p| {
                (
                    (
                        p.metadata.namespace.as_deref().unwrap_or(""),
                        p.metadata.name.as_deref().unwrap_or(""),
                    ),
                    p,
                )
            })
            .collect();
        let mut desired_keys = std::collections::HashSet::new();
        let mut applies = Vec::new();
        for p in &output.policies {
            let Some(&owner) = nsg_by_key.get(&(p.namespace.as_str(), p.nsg.as_str())) else {
                continue;
            };
            let Some(uid) = snap.nsgs[owner].metadata.uid.as_deref() else {
                continue;
            };
            desired_keys.insert((p.namespace.as_str(), p.name.as_str()));
            policy_names[owner].push(p.name.clone());
            let object = policy::apply_object(p, uid);
            match observed.get(&(p.namespace.as_str(), p.name.as_str())) {
                Some(np) if policy::owner_uid(np).is_none() => {
                    programmed[owner] = Programmed::NotOwned(format!(
                        "NetworkPolicy {}/{} exists and is not managed by kube-nsg; it is left alone",
                        p.namespace, p.name
                    ));
                }
                Some(np) if policy::up_to_date(&object, np) => {}
                _ => applies.push((owner, p, object)),
            }
        }
        let results: Vec<_> =
            futures::stream::iter(applies.into_iter().map(|(owner, p, object)| {
                let ctx = &ctx;
                async move { (owner, p, apply_policy(ctx, p, object).await) }
            }))
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        for (owner, p, result) in results {
            match result {
                Ok(writes) => report.writes += writes,
                Err(WriteError::NotLeader) => report.aborted = true,
                Err(e) => {
                    report.writes += 1;
                    report.failures += 1;
                    warn!(policy = %format!("{}/{}", p.namespace, p.name), error = %e, "applying NetworkPolicy failed");
                    if !matches!(programmed[owner], Programmed::NotOwned(_)) {
                        programmed[owner] = Programmed::Failed(format!(
                            "applying NetworkPolicy {}/{}: {e}",
                            p.namespace, p.name
                        ));
                    }
                }
            }
        }
        if report.aborted {
            return report;
        }

        // 2. Pod labels.
        let mut relabels = Vec::new();
        let mut labelled = 0;
        for (i, &source) in built.pod_source.iter().enumerate() {
            let entry = &snap.pods[source];
            let desired = compile::pod_labels(&res, i);
            if !desired.is_empty() {
                labelled += 1;
            }
            if entry.deleting {
                continue;
            }
            let current: BTreeMap<&String, &String> = entry
                .labels
                .iter()
                .filter(|(k, _)| is_managed_label(k))
                .collect();
            let same = current.len() == desired.len()
                && desired.iter().all(|(k, v)| current.get(k) == Some(&v));
            if !same {
                relabels.push((entry.clone(), desired));
            }
        }
        let results: Vec<_> =
            futures::stream::iter(relabels.into_iter().map(|(entry, desired)| {
                let ctx = &ctx;
                async move {
                    let r = write_pod_labels(ctx, &entry, &desired).await;
                    (entry, r)
                }
            }))
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        for (entry, result) in results {
            match result {
                Ok(writes) => report.writes += writes,
                Err(WriteError::NotLeader) => report.aborted = true,
                Err(e) if e.not_found() => report.writes += 1,
                Err(e) => {
                    report.writes += 1;
                    report.failures += 1;
                    warn!(pod = %format!("{}/{}", entry.namespace, entry.name), error = %e, "labelling pod failed");
                }
            }
        }
        if report.aborted {
            return report;
        }

        // 3. Stale NetworkPolicies: ours, owned by an NSG that exists and has a model in force,
        // and not produced this pass. Policies of deleted NSGs are the garbage collector's;
        // those of an NSG with no valid spec known stay as they are.
        let mut deletes = Vec::new();
        for np in &snap.policies {
            let Some(uid) = policy::owner_uid(np) else {
                continue;
            };
            let key = (
                np.metadata.namespace.as_deref().unwrap_or(""),
                np.metadata.name.as_deref().unwrap_or(""),
            );
            if desired_keys.contains(&key) {
                continue;
            }
            let Some(&owner) = nsg_by_uid.get(uid) else {
                continue;
            };
            if built.nsgs[owner].model.is_none() {
                continue;
            }
            deletes.push((owner, np.clone()));
        }
        let results: Vec<_> = futures::stream::iter(deletes.into_iter().map(|(owner, np)| {
            let ctx = &ctx;
            async move { (owner, delete_policy(ctx, &np).await, np) }
        }))
        .buffer_unordered(self.settings.concurrency)
        .collect()
        .await;
        for (owner, result, np) in results {
            match result {
                Ok(()) => report.writes += 1,
                Err(WriteError::NotLeader) => report.aborted = true,
                Err(e) if e.not_found() => report.writes += 1,
                Err(e) => {
                    report.writes += 1;
                    report.failures += 1;
                    warn!(policy = %np.name_any(), error = %e, "deleting stale NetworkPolicy failed");
                    programmed[owner] = Programmed::Failed(format!(
                        "deleting stale NetworkPolicy {}: {e}",
                        np.name_any()
                    ));
                }
            }
        }
        if report.aborted {
            return report;
        }

        // 4. Statuses and Events.
        let now = status::now();
        let sums = Summaries::new(&res);
        let associated = status::associated_pods(&res);
        let refs = status::references(&res);
        let mut status_writes = Vec::new();
        for (i, obj) in snap.nsgs.iter().enumerate() {
            let state = &built.nsgs[i];
            let id = ObjectRef::new(obj.namespace().unwrap_or_default(), obj.name_any());
            let mut names = std::mem::take(&mut policy_names[i]);
            names.sort();
            let facts = NsgFacts {
                id: &id,
                generation: obj.metadata.generation,
                model: state.model,
                errors: state.errors.as_ref(),
                programmed: programmed[i].clone(),
                policies: names,
                associated_pods: state.model.map_or(0, |m| associated[m]),
                fidelity: output.fidelity.get(&id),
                anomalies: output.anomalies.get(&id).cloned().unwrap_or_default(),
            };
            let conds = status::nsg_conditions(&res, &facts);
            let observed_conditions = obj
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            let conditions =
                status::conditions(observed_conditions, &conds, obj.metadata.generation, now);
            let desired = status::nsg_status(&res, &sums, &facts, conditions);
            let mut compare = desired.clone();
            compare.conditions =
                status::owned_conditions(&compare.conditions, &status::NSG_CONDITIONS);
            if compare == status::owned_nsg_status(obj.status.as_ref()) {
                continue;
            }
            let alerts = status::nsg_alerts(observed_conditions, &conds);
            status_writes.push(StatusWrite::Nsg(
                obj.clone(),
                serde_json::to_value(&desired).unwrap_or_default(),
                alerts,
            ));
        }
        for obj in &snap.asgs {
            let id = ObjectRef::new(obj.namespace().unwrap_or_default(), obj.name_any());
            let conds = status::asg_conditions(built.asg_errors.get(&id));
            let observed_conditions = obj
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            let conditions =
                status::conditions(observed_conditions, &conds, obj.metadata.generation, now);
            let desired = status::asg_status(&res, &refs, &id, obj.metadata.generation, conditions);
            if desired == status::owned_asg_status(obj.status.as_ref()) {
                continue;
            }
            status_writes.push(StatusWrite::Asg(
                obj.clone(),
                serde_json::to_value(&desired).unwrap_or_default(),
            ));
        }
        for obj in &snap.tags {
            let name = obj.name_any();
            let conds = status::asg_conditions(built.tag_errors.get(&name));
            let observed_conditions = obj
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            let conditions =
                status::conditions(observed_conditions, &conds, obj.metadata.generation, now);
            let desired =
                status::tag_status(&res, &refs, &name, obj.metadata.generation, conditions);
            if desired == status::owned_tag_status(obj.status.as_ref()) {
                continue;
            }
            status_writes.push(StatusWrite::Tag(
                obj.clone(),
                serde_json::to_value(&desired).unwrap_or_default(),
            ));
        }
        let recorder = &self.recorder;
        let results: Vec<_> = futures::stream::iter(status_writes.into_iter().map(|w| {
            let ctx = &ctx;
            async move { write_status(ctx, recorder, w).await }
        }))
        .buffer_unordered(self.settings.concurrency)
        .collect()
        .await;
        for result in results {
            match result {
                (writes, Ok(())) => report.writes += writes,
                (_, Err(WriteError::NotLeader)) => report.aborted = true,
                (writes, Err(e)) if e.not_found() => report.writes += writes,
                (writes, Err(e)) => {
                    report.writes += writes;
                    report.failures += 1;
                    warn!(error = %e, "writing status failed");
                }
            }
        }

        self.metrics
            .set_managed("networkpolicies", output.policies.len());
        self.metrics.set_managed("labelled_pods", labelled);
        self.metrics
            .set_managed("networksecuritygroups", snap.nsgs.len());
        self.metrics
            .set_managed("applicationsecuritygroups", snap.asgs.len());
        self.metrics.set_managed("servicetags", snap.tags.len());
        drop(sums);
        drop(res);
        self.memo = Some((built.inventory, output));
        report
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Server-side applies one policy; returns the number of writes made.
async fn apply_policy(
    ctx: &Ctx<'_>,
    p: &compile::DesiredPolicy,
    object: Value,
) -> Result<usize, WriteError> {
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &p.namespace);
    ctx.write("networkpolicies", "apply")?;
    let applied = api
        .patch(
            &p.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    if policy::up_to_date(&object, &applied) {
        return Ok(1);
    }
    // Someone else's fields survive inside ours (e.g. an extra key in matchLabels added with
    // `kubectl edit`): replace the spec as a whole.
    let mut replacement: NetworkPolicy =
        serde_json::from_value(object.clone()).map_err(kube::Error::SerdeError)?;
    let mut metadata = applied.metadata.clone();
    metadata.managed_fields = None;
    replacement.metadata = metadata;
    ctx.write("networkpolicies", "update")?;
    let pp = PostParams {
        field_manager: Some(REPAIR_MANAGER.into()),
        ..PostParams::default()
    };
    match api.replace(&p.name, &pp, &replacement).await {
        Ok(_) => Ok(2),
        // Changed in between: the next pass sees the new state.
        Err(e) if is_conflict(&e) => Ok(2),
        Err(e) => Err(e.into()),
    }
}

async fn delete_policy(ctx: &Ctx<'_>, np: &NetworkPolicy) -> Result<(), WriteError> {
    let api: Api<NetworkPolicy> = Api::namespaced(
        ctx.client.clone(),
        np.metadata.namespace.as_deref().unwrap_or(""),
    );
    ctx.write("networkpolicies", "delete")?;
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: np.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    api.delete(&np.name_any(), &dp).await?;
    Ok(())
}

/// Makes the controller's labels on a pod exactly `desired`: an apply with the label field
/// manager sets them and drops the ones it granted before; labels with the controller's
/// prefixes that it did not grant (set by someone else) are then removed explicitly.
async fn write_pod_labels(
    ctx: &Ctx<'_>,
    pod: &PodEntry,
    desired: &BTreeMap<String, String>,
) -> Result<usize, WriteError> {
    let api: Api<ApiPod> = Api::namespaced(ctx.client.clone(), &pod.namespace);
    let missing = desired.iter().any(|(k, v)| pod.labels.get(k) != Some(v));
    let mut writes = 0;
    let mut labels = pod.labels.clone();
    if missing {
        let body = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "labels": desired},
        });
        ctx.write("pods", "apply")?;
        writes += 1;
        let applied = api
            .patch(
                &pod.name,
                &PatchParams::apply(LABEL_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        labels = applied.labels().clone();
    }
    let extra: serde_json::Map<String, Value> = labels
        .keys()
        .filter(|k| is_managed_label(k) && !desired.contains_key(*k))
        .map(|k| (k.clone(), Value::Null))
        .collect();
    if !extra.is_empty() {
        let patch = json!({"metadata": {"uid": pod.uid, "labels": extra}});
        ctx.write("pods", "patch")?;
        writes += 1;
        let pp = PatchParams {
            field_manager: Some(LABEL_MANAGER.into()),
            ..PatchParams::default()
        };
        api.patch(&pod.name, &pp, &Patch::Merge(&patch)).await?;
    }
    Ok(writes)
}

enum StatusWrite {
    Nsg(Arc<NetworkSecurityGroup>, Value, Vec<status::Alert>),
    Asg(Arc<ApplicationSecurityGroup>, Value),
    Tag(Arc<ServiceTag>, Value),
}

fn status_body<K: Resource<DynamicType = ()>>(obj: &K, status: Value) -> Value {
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": obj.meta().name, "uid": obj.meta().uid},
        "status": status,
    })
}

async fn write_status(
    ctx: &Ctx<'_>,
    recorder: &Recorder,
    w: StatusWrite,
) -> (usize, Result<(), WriteError>) {
    let pp = PatchParams::apply(MANAGER).force();
    match w {
        StatusWrite::Nsg(obj, status, alerts) => {
            let api: Api<NetworkSecurityGroup> = Api::namespaced(
                ctx.client.clone(),
                obj.metadata.namespace.as_deref().unwrap_or(""),
            );
            if let Err(e) = ctx.write("networksecuritygroups/status", "apply") {
                return (0, Err(e));
            }
            if let Err(e) = api
                .patch_status(
                    &obj.name_any(),
                    &pp,
                    &Patch::Apply(status_body(&*obj, status)),
                )
                .await
            {
                return (1, Err(e.into()));
            }
            let mut writes = 1;
            let reference = obj.object_ref(&());
            for alert in alerts {
                if ctx.write("events", "create").is_err() {
                    break;
                }
                writes += 1;
                let event = Event {
                    type_: EventType::Warning,
                    reason: alert.reason,
                    note: Some(alert.message),
                    action: "Reconcile".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &reference).await {
                    warn!(nsg = %obj.name_any(), error = %e, "publishing an Event failed");
                }
            }
            (writes, Ok(()))
        }
        StatusWrite::Asg(obj, status) => {
            let api: Api<ApplicationSecurityGroup> = Api::namespaced(
                ctx.client.clone(),
                obj.metadata.namespace.as_deref().unwrap_or(""),
            );
            if let Err(e) = ctx.write("applicationsecuritygroups/status", "apply") {
                return (0, Err(e));
            }
            let r = api
                .patch_status(
                    &obj.name_any(),
                    &pp,
                    &Patch::Apply(status_body(&*obj, status)),
                )
                .await;
            (1, r.map(|_| ()).map_err(Into::into))
        }
        StatusWrite::Tag(obj, status) => {
            let api: Api<ServiceTag> = Api::all(ctx.client.clone());
            if let Err(e) = ctx.write("servicetags/status", "apply") {
                return (0, Err(e));
            }
            let r = api
                .patch_status(
                    &obj.name_any(),
                    &pp,
                    &Patch::Apply(status_body(&*obj, status)),
                )
                .await;
            (1, r.map(|_| ()).map_err(Into::into))
        }
    }
}
