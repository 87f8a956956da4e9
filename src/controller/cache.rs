//! The controller's in-memory view of the cluster: one watch per kind, each feeding a small
//! store of *compact* entries (only the fields the controller reads), and one shared
//! [`Notify`] that wakes the reconcile loop whenever an entry really changed.
//!
//! kube-runtime's reflector keeps whole API objects; a Pod with its spec and managed fields
//! costs several KiB, and the controller only needs the labels, one annotation, the IPs and
//! the node of each pod. Converting on arrival keeps the memory per pod small, and comparing
//! the converted entry with the stored one drops the events that change nothing the
//! controller reads (status heartbeats, container states, ...), so they never wake it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Node, Pod as ApiPod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::metrics::Metrics;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::digest::{self, Digest};
use super::policy::ObservedPolicy;
use super::status::owned_nsg_status;
use crate::api::{
    ApplicationSecurityGroup, NetworkSecurityGroup, ServiceTag, namespace_from_api, pod_ips,
};
use crate::json_len;
use crate::model::{ASG_ANNOTATION, Namespace};
use crate::model::{Nsg, ValidationErrors};

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects.
pub type Key = (String, String);

fn key_of<K: Resource>(obj: &K) -> Key {
    (
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

/// Labels in a compact sorted form: a `BTreeMap` reserves room for eleven entries per node,
/// which for the few labels of a pod is most of what the controller keeps of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    pub fn from_map(map: &BTreeMap<String, String>) -> Self {
        Labels(
            map.iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// What the controller keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// All labels, the controller's own included (they are compared with the desired ones).
    pub labels: Labels,
    /// The `kubensg.io/application-security-groups` annotation, the only one that matters.
    pub asg_annotation: Option<String>,
    pub ips: Vec<IpAddr>,
    pub node_name: Option<String>,
    /// Being deleted: never written to.
    pub deleting: bool,
}

impl PodEntry {
    /// `None` for the pods the controller ignores ([`pod_ips`]): host-network pods (their
    /// address is the node's) and pods that finished (Succeeded or Failed; their IP may be
    /// reused). A pod without an IP yet is kept.
    pub fn from_api(pod: &ApiPod) -> Option<PodEntry> {
        let ips = pod_ips(pod)?;
        Some(PodEntry {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            labels: Labels::from_map(pod.labels()),
            asg_annotation: pod.annotations().get(ASG_ANNOTATION).cloned(),
            ips,
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            deleting: pod.meta().deletion_timestamp.is_some(),
        })
    }
}

/// What the controller keeps of a node: the addresses that make up `AzureLoadBalancer` and
/// part of `VirtualNetwork`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: String,
    pub labels: Labels,
    pub internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeEntry {
    pub fn from_api(node: &Node) -> Option<NodeEntry> {
        let internal_ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        let spec = node.spec.as_ref();
        let pod_cidrs = spec
            .and_then(|s| s.pod_cidrs.clone())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse::<IpNet>().ok())
            .map(|n| n.trunc())
            .collect();
        Some(NodeEntry {
            name: node.name_any(),
            labels: Labels::from_map(node.labels()),
            internal_ips,
            pod_cidrs,
        })
    }
}

/// Drops what no part of the controller reads from a custom resource or a NetworkPolicy.
fn slim<K: Resource>(mut obj: K) -> K {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    obj
}

/// What the controller keeps of a NetworkSecurityGroup: its model (converted on arrival, or
/// why it is invalid), the conditions it shows, and a digest of the rest of its status.
#[derive(Debug, Clone, PartialEq)]
pub struct NsgEntry {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    pub resource_version: Option<String>,
    pub model: Result<Arc<Nsg>, ValidationErrors>,
    /// All observed conditions (transition times and Events are computed from them).
    pub conditions: Vec<Condition>,
    /// Digest of the part of the observed status this controller writes.
    pub status: Digest,
    /// The observed `status.dataplane` ("N/M", written by [`super::dataplane`]).
    pub dataplane: Option<String>,
    /// The size of its metadata and spec as stored (JSON): what its status must leave room for.
    pub stored_bytes: usize,
}

impl NsgEntry {
    pub fn object_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(NetworkSecurityGroup::api_version(&()).into()),
            kind: Some(NetworkSecurityGroup::kind(&()).into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()),
            ..ObjectReference::default()
        }
    }
}

pub fn nsg_entry(obj: &NetworkSecurityGroup) -> Option<NsgEntry> {
    Some(NsgEntry {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        uid: obj.uid().unwrap_or_default(),
        generation: obj.metadata.generation,
        resource_version: obj.metadata.resource_version.clone(),
        model: Nsg::try_from(obj).map(Arc::new),
        conditions: obj
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        status: status_digest(&owned_nsg_status(obj.status.as_ref())),
        dataplane: obj.status.as_ref().and_then(|s| s.dataplane.clone()),
        stored_bytes: json_len(&obj.metadata) + json_len(&obj.spec),
    })
}

/// The digest [`NsgEntry::status`] holds, of a status as [`owned_nsg_status`] normalises it.
pub fn status_digest(status: &crate::api::NetworkSecurityGroupStatus) -> Digest {
    // The status types hold no maps, so their JSON text is canonical: stream it.
    digest::of_stream(status)
}

pub fn asg_entry(obj: &ApplicationSecurityGroup) -> Option<ApplicationSecurityGroup> {
    Some(slim(obj.clone()))
}
pub fn tag_entry(obj: &ServiceTag) -> Option<ServiceTag> {
    Some(slim(obj.clone()))
}
/// What the controller keeps of a namespace: its labels, and whether it is being deleted
/// (the API server refuses new objects in it, so the controller writes nothing there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceEntry {
    pub namespace: Namespace,
    pub terminating: bool,
}

pub fn namespace_entry(obj: &ApiNamespace) -> Option<NamespaceEntry> {
    Some(NamespaceEntry {
        namespace: namespace_from_api(obj),
        terminating: obj.metadata.deletion_timestamp.is_some()
            || obj.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating"),
    })
}
pub fn policy_entry(obj: &NetworkPolicy) -> Option<ObservedPolicy> {
    Some(ObservedPolicy::from_api(obj))
}

/// How the cache tells an update that changes something from one that does not.
pub trait Entry {
    fn same(&self, other: &Self) -> bool;
}

macro_rules! same_by_value {
    ($($t:ty),*) => {$(
        impl Entry for $t {
            fn same(&self, other: &Self) -> bool {
                self == other
            }
        }
    )*};
}
same_by_value!(PodEntry, NodeEntry, NamespaceEntry, ObservedPolicy);

/// API objects kept whole are the same while their resourceVersion is.
macro_rules! same_by_version {
    ($($t:ty),*) => {$(
        impl Entry for $t {
            fn same(&self, other: &Self) -> bool {
                self.metadata.resource_version.is_some()
                    && self.metadata.resource_version == other.metadata.resource_version
            }
        }
    )*};
}
same_by_version!(ApplicationSecurityGroup, ServiceTag);

impl Entry for NsgEntry {
    fn same(&self, other: &Self) -> bool {
        self.resource_version.is_some() && self.resource_version == other.resource_version
    }
}

#[cfg(test)]
same_by_value!(u32);

struct Inner<T> {
    items: HashMap<Key, Arc<T>>,
    /// Entries of a relist in progress, swapped in at its end.
    relist: Option<HashMap<Key, Arc<T>>>,
    synced: bool,
}

/// The compact store of one kind.
pub struct Cache<T> {
    kind: &'static str,
    inner: RwLock<Inner<T>>,
}

impl<T: Entry> Cache<T> {
    pub fn new(kind: &'static str) -> Self {
        Cache {
            kind,
            inner: RwLock::new(Inner {
                items: HashMap::new(),
                relist: None,
                synced: false,
            }),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Whether the first full list has arrived.
    pub fn is_synced(&self) -> bool {
        self.inner.read().expect("cache lock").synced
    }

    pub fn len(&self) -> usize {
        self.inner.read().expect("cache lock").items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &Key) -> Option<Arc<T>> {
        self.inner
            .read()
            .expect("cache lock")
            .items
            .get(key)
            .cloned()
    }

    /// Every entry, sorted by key, so that everything built from a snapshot is deterministic.
    pub fn snapshot(&self) -> Vec<Arc<T>> {
        let inner = self.inner.read().expect("cache lock");
        let mut items: Vec<(&Key, &Arc<T>)> = inner.items.iter().collect();
        items.sort_by(|a, b| a.0.cmp(b.0));
        items.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Applies one watch event; returns whether the view changed.
    fn apply(&self, event: Event<T>) -> bool {
        let mut inner = self.inner.write().expect("cache lock");
        match event {
            Event::Upsert(key, Some(value)) => match inner.items.get(&key) {
                Some(old) if old.same(&value) => false,
                _ => {
                    inner.items.insert(key, Arc::new(value));
                    true
                }
            },
            Event::Upsert(key, None) | Event::Delete(key) => inner.items.remove(&key).is_some(),
            Event::Init => {
                inner.relist = Some(HashMap::new());
                false
            }
            Event::InitUpsert(key, value) => {
                // Reuse the stored Arc when nothing changed, so a relist costs no memory churn.
                let value = match inner.items.get(&key) {
                    Some(old) if old.same(&value) => old.clone(),
                    _ => Arc::new(value),
                };
                inner
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key, value);
                false
            }
            Event::InitDone => {
                let fresh = inner.relist.take().unwrap_or_default();
                let changed = !inner.synced
                    || fresh.len() != inner.items.len()
                    || fresh
                        .iter()
                        .any(|(k, v)| inner.items.get(k).is_none_or(|o| !Arc::ptr_eq(o, v)));
                inner.items = fresh;
                inner.synced = true;
                changed
            }
        }
    }
}

enum Event<T> {
    Upsert(Key, Option<T>),
    Delete(Key),
    Init,
    InitUpsert(Key, T),
    InitDone,
}

/// Every store the controller reads, and the signal that one of them changed.
pub struct Caches {
    pub nsgs: Cache<NsgEntry>,
    pub asgs: Cache<ApplicationSecurityGroup>,
    pub tags: Cache<ServiceTag>,
    pub pods: Cache<PodEntry>,
    pub namespaces: Cache<NamespaceEntry>,
    pub nodes: Cache<NodeEntry>,
    pub policies: Cache<ObservedPolicy>,
    pub changed: Notify,
    /// Counts the changes, for other observers than the reconcile loop (the dataplane
    /// status loop), which `changed` (a single waiter) cannot serve.
    pub version: tokio::sync::watch::Sender<u64>,
}

impl Default for Caches {
    fn default() -> Self {
        Caches {
            nsgs: Cache::new("NetworkSecurityGroup"),
            asgs: Cache::new("ApplicationSecurityGroup"),
            tags: Cache::new("ServiceTag"),
            pods: Cache::new("Pod"),
            namespaces: Cache::new("Namespace"),
            nodes: Cache::new("Node"),
            policies: Cache::new("NetworkPolicy"),
            changed: Notify::new(),
            version: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// Where the watches report their errors and sizes: the controller's metrics and the node
/// agent's.
pub trait WatchMetrics: Send + Sync + 'static {
    fn watch_error(&self, kind: &str);
    fn set_cached(&self, kind: &str, n: usize);
}

impl WatchMetrics for Metrics {
    fn watch_error(&self, kind: &str) {
        Metrics::watch_error(self, kind)
    }
    fn set_cached(&self, kind: &str, n: usize) {
        Metrics::set_cached(self, kind, n)
    }
}

impl Caches {
    /// Whether every store has completed its first list (what `/readyz` reports).
    pub fn synced(&self) -> bool {
        self.inputs_synced() && self.policies.is_synced()
    }

    /// Whether the stores of the model's inputs (all but NetworkPolicies) have completed
    /// their first list: what the node agent waits for.
    pub fn inputs_synced(&self) -> bool {
        self.nsgs.is_synced()
            && self.asgs.is_synced()
            && self.tags.is_synced()
            && self.pods.is_synced()
            && self.namespaces.is_synced()
            && self.nodes.is_synced()
    }

    /// Starts one watch task per kind; they run until aborted.
    pub fn spawn_watches<M: WatchMetrics>(
        self: &Arc<Self>,
        client: &Client,
        metrics: &Arc<M>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = self.spawn_input_watches(client, metrics);
        tasks.push(spawn(
            self,
            metrics,
            Api::all(client.clone()),
            watcher::Config::default().page_size(50),
            |c| &c.policies,
            policy_entry,
        ));
        tasks
    }

    /// The watches of the model's inputs only (the node agent reads no NetworkPolicy).
    pub fn spawn_input_watches<M: WatchMetrics>(
        self: &Arc<Self>,
        client: &Client,
        metrics: &Arc<M>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        // Small list pages bound the memory of a (re)list: objects arrive whole, managed
        // fields and all (an NSG with its status weighs tens of KiB), and are compacted one
        // by one.
        let pages = |n| watcher::Config::default().page_size(n);
        let c = client;
        vec![
            spawn(
                self,
                metrics,
                Api::all(c.clone()),
                pages(10),
                |c| &c.nsgs,
                nsg_entry,
            ),
            spawn(
                self,
                metrics,
                Api::all(c.clone()),
                pages(50),
                |c| &c.asgs,
                asg_entry,
            ),
            spawn(
                self,
                metrics,
                Api::all(c.clone()),
                pages(10),
                |c| &c.tags,
                tag_entry,
            ),
            spawn(
                self,
                metrics,
                Api::all(c.clone()),
                pages(100),
                |c| &c.pods,
                PodEntry::from_api,
            ),
            spawn(
                self,
                metrics,
                Api::all(c.clone()),
                pages(100),
                |c| &c.namespaces,
                namespace_entry,
            ),
            spawn(
                self,
                metrics,
                Api::all(c.clone()),
                pages(100),
                |c| &c.nodes,
                NodeEntry::from_api,
            ),
        ]
    }
}

fn spawn<K, T, M: WatchMetrics>(
    caches: &Arc<Caches>,
    metrics: &Arc<M>,
    api: Api<K>,
    config: watcher::Config,
    store: fn(&Caches) -> &Cache<T>,
    convert: fn(&K) -> Option<T>,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    T: Entry + Send + Sync + 'static,
{
    let caches = caches.clone();
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let kind = store(&caches).kind();
        let mut stream = watcher(api, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(watcher::Event::Apply(obj)) => Event::Upsert(key_of(&obj), convert(&obj)),
                Ok(watcher::Event::Delete(obj)) => Event::Delete(key_of(&obj)),
                Ok(watcher::Event::Init) => Event::Init,
                Ok(watcher::Event::InitApply(obj)) => match convert(&obj) {
                    Some(v) => Event::InitUpsert(key_of(&obj), v),
                    None => continue,
                },
                Ok(watcher::Event::InitDone) => Event::InitDone,
                Err(e) => {
                    warn!(kind, error = %e, "watch failed; retrying with backoff");
                    metrics.watch_error(kind);
                    continue;
                }
            };
            let changed = store(&caches).apply(event);
            if changed {
                debug!(kind, "cache changed");
                caches.changed.notify_one();
                caches.version.send_modify(|v| *v += 1);
            }
            metrics.set_cached(kind, store(&caches).len());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: &str) -> Key {
        ("ns".into(), n.into())
    }

    #[test]
    fn compact_labels_look_up_like_a_map() {
        let map: BTreeMap<String, String> = [("b", "2"), ("a", "1"), ("c", "3")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let labels = Labels::from_map(&map);
        assert_eq!(labels.get("a"), Some("1"));
        assert_eq!(labels.get("c"), Some("3"));
        assert_eq!(labels.get("d"), None);
        assert_eq!(labels.to_map(), map);
    }

    #[test]
    fn unchanged_entries_do_not_signal_and_relists_swap_atomically() {
        let c: Cache<u32> = Cache::new("T");
        assert!(!c.is_synced());
        assert!(!c.apply(Event::Init));
        assert!(!c.apply(Event::InitUpsert(k("a"), 1)));
        assert!(c.apply(Event::InitDone), "the first list is a change");
        assert!(c.is_synced());
        assert!(
            !c.apply(Event::Upsert(k("a"), Some(1))),
            "same value: no change"
        );
        assert!(c.apply(Event::Upsert(k("a"), Some(2))));
        assert!(c.apply(Event::Upsert(k("b"), Some(3))));
        // A relist that returns the same objects changes nothing.
        c.apply(Event::Init);
        c.apply(Event::InitUpsert(k("a"), 2));
        c.apply(Event::InitUpsert(k("b"), 3));
        assert!(!c.apply(Event::InitDone));
        // A relist that misses an object deletes it.
        c.apply(Event::Init);
        c.apply(Event::InitUpsert(k("a"), 2));
        assert_eq!(c.len(), 2, "entries stay until the relist is complete");
        assert!(c.apply(Event::InitDone));
        assert_eq!(
            c.snapshot().iter().map(|v| **v).collect::<Vec<_>>(),
            vec![2]
        );
        assert!(
            c.apply(Event::Upsert(k("a"), None)),
            "an object that converts to nothing is removed"
        );
        assert!(!c.apply(Event::Delete(k("a"))));
    }
}
