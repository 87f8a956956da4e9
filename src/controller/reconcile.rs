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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::cache::{Caches, NsgEntry, PodEntry, status_digest};
use super::compile::{self, Mode, Output};
use super::digest::{self, Digest};
use super::inventory::{self, Snapshot, is_managed_label};
use super::metrics::Metrics;
use super::policy::{self, ObservedPolicy};
use super::status::{self, NsgFacts, Programmed, Summaries};
use crate::api::{
    ApplicationSecurityGroup, NetworkSecurityGroup, NetworkSecurityGroupStatus, ServiceTag,
};
use crate::model::{LabelSelector, Nsg, ObjectRef};
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
    /// Only the namespaces this selects are managed (`--namespace-selector`).
    pub scope: Option<LabelSelector>,
    /// Only the nodes this selects contribute addresses (`--node-selector`).
    pub nodes: Option<LabelSelector>,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("not the leader any more")]
    NotLeader,
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl WriteError {
    /// The object is gone, or its namespace is being deleted: nothing to retry.
    fn not_found(&self) -> bool {
        matches!(self, WriteError::Kube(kube::Error::Api(s))
            if s.code == 404 || (s.code == 403 && s.message.contains("being terminated")))
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

impl PassReport {
    /// Counts one write of an object: `Ok(n)` made `n` requests, an error one. A write that
    /// lost the leadership aborts the pass; one whose object is gone needs no retry. Returns
    /// the error of a write that failed, for the caller to report.
    fn count(&mut self, result: Result<usize, WriteError>) -> Option<WriteError> {
        match result {
            Ok(writes) => self.writes += writes,
            Err(WriteError::NotLeader) => self.aborted = true,
            Err(e) if e.not_found() => self.writes += 1,
            Err(e) => {
                self.writes += 1;
                self.failures += 1;
                return Some(e);
            }
        }
        None
    }
}

pub struct Reconciler {
    client: Client,
    caches: Arc<Caches>,
    metrics: Arc<Metrics>,
    leader: watch::Receiver<bool>,
    settings: Settings,
    recorder: Recorder,
    last_valid: HashMap<String, Arc<Nsg>>,
    /// The digest of the last compiled inventory and its output: compiling is skipped while
    /// the inventory does not change (the controller's own writes do not change it).
    memo: Option<(Digest, Arc<Output>)>,
    analyses: compile::Analyses,
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
            analyses: compile::Analyses::default(),
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
        let mut timer = PhaseTimer {
            last: Some(Instant::now()),
            phases: Vec::new(),
        };
        let snap = Snapshot::of(&self.caches, self.settings.scope.as_ref())
            .with_nodes(self.settings.nodes.as_ref());
        let built = inventory::build(&snap, &self.settings.virtual_network, &mut self.last_valid);
        timer.mark("build");
        let res = Resolved::new(&built.inventory);
        timer.mark("resolve");
        let inventory_digest = digest::of_stream(&built.inventory);
        let output = match &self.memo {
            Some((d, out)) if *d == inventory_digest => out.clone(),
            _ => {
                debug!("the model changed: compiling");
                self.metrics.compiled();
                Arc::new(compile::compile(
                    &res,
                    self.settings.mode,
                    &mut self.analyses,
                ))
            }
        };
        timer.mark("compile");
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
            .map(|(i, o)| ((o.namespace.as_str(), o.name.as_str()), i))
            .collect();
        let nsg_by_uid: HashMap<&str, usize> = snap
            .nsgs
            .iter()
            .enumerate()
            .map(|(i, o)| (o.uid.as_str(), i))
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
        let observed: HashMap<(&str, &str), &Arc<ObservedPolicy>> = snap
            .policies
            .iter()
            .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
            .collect();
        let mut desired_keys = std::collections::HashSet::new();
        let mut applies = Vec::new();
        for p in &output.policies {
            let Some(&owner) = nsg_by_key.get(&(p.namespace.as_str(), p.nsg.as_str())) else {
                continue;
            };
            let uid = snap.nsgs[owner].uid.as_str();
            desired_keys.insert((p.namespace.as_str(), p.name.as_str()));
            policy_names[owner].push(p.name.clone());
            if snap.terminating(&p.namespace) {
                continue;
            }
            match observed.get(&(p.namespace.as_str(), p.name.as_str())) {
                Some(np) if np.owner_uid.is_none() => {
                    programmed[owner] = Programmed::NotOwned(format!(
                        "NetworkPolicy {}/{} exists and is not managed by kube-nsg; it is left alone",
                        p.namespace, p.name
                    ));
                }
                Some(np) if policy::up_to_date(p, uid, np) => {}
                _ => applies.push((owner, p, uid)),
            }
        }
        let results: Vec<_> = futures::stream::iter(applies.into_iter().map(|(owner, p, uid)| {
            let ctx = &ctx;
            async move { (owner, p, apply_policy(ctx, p, uid).await) }
        }))
        .buffer_unordered(self.settings.concurrency)
        .collect()
        .await;
        for (owner, p, result) in results {
            if let Some(e) = report.count(result) {
                warn!(policy = %format!("{}/{}", p.namespace, p.name), error = %e, "applying NetworkPolicy failed");
                if !matches!(programmed[owner], Programmed::NotOwned(_)) {
                    programmed[owner] = Programmed::Failed(format!(
                        "applying NetworkPolicy {}/{}: {e}",
                        p.namespace, p.name
                    ));
                }
            }
        }
        if report.aborted {
            return report;
        }

        timer.mark("policies");
        // 2. Pod labels.
        let mut relabels = Vec::new();
        let mut labelled = 0;
        for (i, &source) in built.pod_source.iter().enumerate() {
            let entry = &snap.pods[source];
            let desired = compile::pod_labels(&res, i);
            if !desired.is_empty() {
                labelled += 1;
            }
            if entry.deleting || snap.terminating(&entry.namespace) {
                continue;
            }
            let current: BTreeMap<&str, &str> = entry
                .labels
                .iter()
                .filter(|(k, _)| is_managed_label(k))
                .collect();
            let same = current.len() == desired.len()
                && desired
                    .iter()
                    .all(|(k, v)| current.get(k.as_str()) == Some(&v.as_str()));
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
            if let Some(e) = report.count(result) {
                warn!(pod = %format!("{}/{}", entry.namespace, entry.name), error = %e, "labelling pod failed");
            }
        }
        if report.aborted {
            return report;
        }

        timer.mark("labels");
        // 3. Stale NetworkPolicies: ours, owned by an NSG that exists and has a model in force,
        // and not produced this pass. Policies of deleted NSGs are the garbage collector's;
        // those of an NSG with no valid spec known stay as they are.
        let mut deletes = Vec::new();
        for np in &snap.policies {
            let Some(uid) = np.owner_uid.as_deref() else {
                continue;
            };
            let key = (np.namespace.as_str(), np.name.as_str());
            if snap.terminating(&np.namespace) {
                continue;
            }
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
            if let Some(e) = report.count(result.map(|()| 1)) {
                warn!(policy = %np.name, error = %e, "deleting stale NetworkPolicy failed");
                programmed[owner] =
                    Programmed::Failed(format!("deleting stale NetworkPolicy {}: {e}", np.name));
            }
        }
        if report.aborted {
            return report;
        }

        timer.mark("stale");
        // 4. Statuses and Events.
        let now = status::now();
        let sums = Summaries::new(&res);
        let associated = status::associated_pods(&res);
        let refs = status::references(&res);
        let mut status_writes = Vec::new();
        for (i, obj) in snap.nsgs.iter().enumerate() {
            if snap.terminating(&obj.namespace) {
                continue;
            }
            let state = &built.nsgs[i];
            let id = ObjectRef::new(&obj.namespace, &obj.name);
            let mut names = std::mem::take(&mut policy_names[i]);
            names.sort();
            let facts = NsgFacts {
                id: &id,
                generation: obj.generation,
                model: state.model,
                errors: state.errors.as_ref(),
                programmed: programmed[i].clone(),
                policies: names,
                associated_pods: state.model.map_or(0, |m| associated[m]),
                fidelity: output.fidelity.get(&id),
                anomalies: output.anomalies.get(&id).cloned().unwrap_or_default(),
                stored_bytes: obj.stored_bytes,
            };
            let conds = status::nsg_conditions(&res, &facts);
            let conditions = status::conditions(&obj.conditions, &conds, obj.generation, now);
            let desired = status::nsg_status(&res, &sums, &facts, conditions);
            if status_digest(&status::owned_nsg_status(Some(&desired))) == obj.status {
                continue;
            }
            let alerts = status::nsg_alerts(&obj.conditions, &conds);
            status_writes.push(StatusWrite::Nsg(obj.clone(), Box::new(desired), alerts));
        }
        // ASGs and service tags have one condition, Accepted, from their validation.
        let accepted_only = |observed: Option<&[Condition]>, errors, generation| {
            let desired = status::asg_conditions(errors);
            status::conditions(observed.unwrap_or_default(), &desired, generation, now)
        };
        for obj in &snap.asgs {
            let id = ObjectRef::new(obj.namespace().unwrap_or_default(), obj.name_any());
            if snap.terminating(&id.namespace) {
                continue;
            }
            let conditions = accepted_only(
                obj.status.as_ref().map(|s| s.conditions.as_slice()),
                built.asg_errors.get(&id),
                obj.metadata.generation,
            );
            let desired = status::asg_status(&res, &refs, &id, obj.metadata.generation, conditions);
            if desired == status::owned_asg_status(obj.status.as_ref()) {
                continue;
            }
            status_writes.push(StatusWrite::Asg(
                obj.clone(),
                serde_json::to_value(&desired).unwrap_or_default(),
            ));
        }
        // Service tags are cluster-scoped: a controller scoped to some namespaces sees only
        // part of their references, so it writes the status of the tags whose own labels
        // match its selector, and leaves the others to the controller they belong to.
        let scope = self.settings.scope.as_ref();
        let tags = snap
            .tags
            .iter()
            .filter(|t| scope.is_none_or(|sel| sel.matches(t.labels())));
        for obj in tags {
            let name = obj.name_any();
            let conditions = accepted_only(
                obj.status.as_ref().map(|s| s.conditions.as_slice()),
                built.tag_errors.get(&name),
                obj.metadata.generation,
            );
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
        timer.mark("status-diff");
        let recorder = &self.recorder;
        let results: Vec<_> = futures::stream::iter(status_writes.into_iter().map(|w| {
            let ctx = &ctx;
            async move { write_status(ctx, recorder, w).await }
        }))
        .buffer_unordered(self.settings.concurrency)
        .collect()
        .await;
        for result in results {
            if let Some(e) = report.count(result) {
                warn!(error = %e, "writing status failed");
            }
        }

        timer.mark("status-write");
        debug!(phases = %timer, "pass phases");
        self.metrics
            .set_managed("networkpolicies", output.policies.len());
        self.metrics.set_managed("labelled_pods", labelled);
        self.metrics
            .set_managed("networksecuritygroups", snap.nsgs.len());
        self.metrics
            .set_managed("applicationsecuritygroups", snap.asgs.len());
        self.metrics.set_managed("servicetags", snap.tags.len());
        self.memo = Some((inventory_digest, output));
        report
    }
}

/// Milliseconds spent in each phase of a pass, for debug logs.
struct PhaseTimer {
    last: Option<Instant>,
    phases: Vec<(&'static str, u128)>,
}

impl PhaseTimer {
    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        let since = self.last.unwrap_or(now);
        self.phases
            .push((phase, now.duration_since(since).as_millis()));
        self.last = Some(now);
    }
}

impl std::fmt::Display for PhaseTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, ms)) in self.phases.iter().enumerate() {
            write!(f, "{}{phase}={ms}ms", if i > 0 { " " } else { "" })?;
        }
        Ok(())
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Server-side applies one policy; returns the number of writes made.
async fn apply_policy(
    ctx: &Ctx<'_>,
    p: &compile::DesiredPolicy,
    owner_uid: &str,
) -> Result<usize, WriteError> {
    let object = policy::apply_object(p, owner_uid);
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &p.namespace);
    ctx.write("networkpolicies", "apply")?;
    let applied = api
        .patch(
            &p.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    if policy::up_to_date(p, owner_uid, &ObservedPolicy::from_api(&applied)) {
        return Ok(1);
    }
    // Someone else's fields survive inside ours (e.g. an extra key in matchLabels added with
    // `kubectl edit`): replace the spec as a whole.
    let mut replacement: NetworkPolicy =
        serde_json::from_value(object).map_err(kube::Error::SerdeError)?;
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

async fn delete_policy(ctx: &Ctx<'_>, np: &ObservedPolicy) -> Result<(), WriteError> {
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &np.namespace);
    ctx.write("networkpolicies", "delete")?;
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: np.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    api.delete(&np.name, &dp).await?;
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
    let missing = desired
        .iter()
        .any(|(k, v)| pod.labels.get(k) != Some(v.as_str()));
    let mut writes = 0;
    let mut labels = pod.labels.to_map();
    if missing {
        let body = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "labels": desired},
        });
        ctx.write("pods", "apply")?;
        writes += 1;
        // Only the metadata comes back: the labels are all this needs.
        let applied = api
            .patch_metadata(
                &pod.name,
                &PatchParams::apply(LABEL_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        labels = applied.metadata.labels.unwrap_or_default();
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
        api.patch_metadata(&pod.name, &pp, &Patch::Merge(&patch))
            .await?;
    }
    Ok(writes)
}

enum StatusWrite {
    Nsg(
        Arc<NsgEntry>,
        Box<NetworkSecurityGroupStatus>,
        Vec<status::Alert>,
    ),
    Asg(Arc<ApplicationSecurityGroup>, Value),
    Tag(Arc<ServiceTag>, Value),
}

/// Server-side applies a status with the field manager `kube-nsg`, asking for only the
/// metadata back: a group's status weighs tens of KiB, and parsing it back for nothing costs
/// time and memory.
async fn apply_status<K>(
    client: &Client,
    namespace: Option<&str>,
    name: &str,
    body: Value,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut req = kube::core::Request::new(K::url_path(&(), namespace))
        .patch_subresource(
            "status",
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(body),
        )
        .map_err(kube::Error::BuildRequest)?;
    req.headers_mut().insert(
        axum::http::header::ACCEPT,
        axum::http::HeaderValue::from_static(
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
        ),
    );
    client
        .request::<kube::core::PartialObjectMeta<K>>(req)
        .await
        .map(|_| ())
}

fn status_body<K: Resource<DynamicType = ()>>(
    name: &str,
    uid: Option<&str>,
    status: Value,
) -> Value {
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "uid": uid},
        "status": status,
    })
}

async fn write_status(
    ctx: &Ctx<'_>,
    recorder: &Recorder,
    w: StatusWrite,
) -> Result<usize, WriteError> {
    match w {
        StatusWrite::Nsg(obj, status, alerts) => {
            ctx.write("networksecuritygroups/status", "apply")?;
            let status = serde_json::to_value(&status).unwrap_or_default();
            let body = status_body::<NetworkSecurityGroup>(&obj.name, Some(&obj.uid), status);
            apply_status::<NetworkSecurityGroup>(ctx.client, Some(&obj.namespace), &obj.name, body)
                .await?;
            let mut writes = 1;
            let reference = obj.object_ref();
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
                    warn!(nsg = %obj.name, error = %e, "publishing an Event failed");
                }
            }
            Ok(writes)
        }
        StatusWrite::Asg(obj, status) => {
            ctx.write("applicationsecuritygroups/status", "apply")?;
            let name = obj.name_any();
            let body =
                status_body::<ApplicationSecurityGroup>(&name, obj.metadata.uid.as_deref(), status);
            apply_status::<ApplicationSecurityGroup>(
                ctx.client,
                obj.metadata.namespace.as_deref(),
                &name,
                body,
            )
            .await?;
            Ok(1)
        }
        StatusWrite::Tag(obj, status) => {
            ctx.write("servicetags/status", "apply")?;
            let name = obj.name_any();
            let body = status_body::<ServiceTag>(&name, obj.metadata.uid.as_deref(), status);
            apply_status::<ServiceTag>(ctx.client, None, &name, body).await?;
            Ok(1)
        }
    }
}
