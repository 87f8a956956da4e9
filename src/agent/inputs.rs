//! What the agent's table depends on, as a model inventory.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Node, Pod as ApiPod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

use super::metrics::AgentMetrics;
use crate::api::{
    ApplicationSecurityGroup, NetworkSecurityGroup, ServiceTag as ApiServiceTag,
    namespace_from_api, pod_from_api,
};
use crate::model::{Asg, Inventory, Nsg, ServiceTag};

/// The agent's inputs.
pub trait Source: Send + Sync {
    /// Notified whenever the inventory may have changed.
    fn changed(&self) -> &Notify;
    /// The inventory to enforce now, or `None` while some watch has not listed once.
    fn inventory(&self) -> Option<Inventory>;
    /// Stops the watches.
    fn stop(&self) {}
}

struct Watched<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    /// The first list is complete.
    ready: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn watch<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    metrics: Arc<AgentMetrics>,
    kind: &'static str,
) -> Watched<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::InitDone) => {
                    flag.store(true, std::sync::atomic::Ordering::Release);
                    changed.notify_one();
                }
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    warn!(kind, error = %e, "watch failed; retrying with backoff (the table stays)");
                    metrics.watch_error(kind);
                }
            }
        }
    });
    Watched { store, ready, task }
}

/// Watches of every kind the table depends on.
pub struct CacheSource {
    changed: Arc<Notify>,
    nsgs: Watched<NetworkSecurityGroup>,
    asgs: Watched<ApplicationSecurityGroup>,
    tags: Watched<ApiServiceTag>,
    pods: Watched<ApiPod>,
    namespaces: Watched<ApiNamespace>,
    nodes: Watched<Node>,
    virtual_network: Vec<IpNet>,
    /// NSG uid → its last valid model, which stays in force while the spec is invalid.
    last_valid: Mutex<HashMap<String, Arc<Nsg>>>,
}

impl CacheSource {
    pub fn start(
        client: &Client,
        metrics: &Arc<AgentMetrics>,
        virtual_network: Vec<IpNet>,
    ) -> CacheSource {
        let changed = Arc::new(Notify::new());
        let c = || changed.clone();
        let m = || metrics.clone();
        CacheSource {
            nsgs: watch(Api::all(client.clone()), c(), m(), "NetworkSecurityGroup"),
            asgs: watch(
                Api::all(client.clone()),
                c(),
                m(),
                "ApplicationSecurityGroup",
            ),
            tags: watch(Api::all(client.clone()), c(), m(), "ServiceTag"),
            pods: watch(Api::all(client.clone()), c(), m(), "Pod"),
            namespaces: watch(Api::all(client.clone()), c(), m(), "Namespace"),
            nodes: watch(Api::all(client.clone()), c(), m(), "Node"),
            changed,
            virtual_network,
            last_valid: Mutex::new(HashMap::new()),
        }
    }

    fn synced(&self) -> bool {
        self.nsgs.ready.load(std::sync::atomic::Ordering::Acquire)
            && self.asgs.ready.load(std::sync::atomic::Ordering::Acquire)
            && self.tags.ready.load(std::sync::atomic::Ordering::Acquire)
            && self.pods.ready.load(std::sync::atomic::Ordering::Acquire)
            && self
                .namespaces
                .ready
                .load(std::sync::atomic::Ordering::Acquire)
            && self.nodes.ready.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<Arc<K>> {
    let mut items = store.state();
    items.sort_by_key(|o| (o.namespace(), o.name_any()));
    items
}

impl Source for CacheSource {
    fn changed(&self) -> &Notify {
        &self.changed
    }

    fn inventory(&self) -> Option<Inventory> {
        if !self.synced() {
            return None;
        }
        let mut inv = Inventory::default();
        let mut last_valid = self.last_valid.lock().expect("inputs lock");
        let mut seen = BTreeSet::new();
        for obj in sorted(&self.nsgs.store) {
            let uid = obj.uid().unwrap_or_default();
            seen.insert(uid.clone());
            match Nsg::try_from(&*obj) {
                Ok(nsg) => {
                    last_valid.insert(uid, Arc::new(nsg.clone()));
                    inv.nsgs.push(nsg);
                }
                Err(_) => {
                    if let Some(nsg) = last_valid.get(&uid) {
                        inv.nsgs.push((**nsg).clone());
                    }
                }
            }
        }
        last_valid.retain(|uid, _| seen.contains(uid));
        inv.asgs = sorted(&self.asgs.store)
            .iter()
            .filter_map(|a| Asg::try_from(&**a).ok())
            .collect();
        inv.service_tags = sorted(&self.tags.store)
            .iter()
            .filter_map(|t| ServiceTag::try_from(&**t).ok())
            .collect();
        inv.pods = sorted(&self.pods.store)
            .iter()
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .filter_map(|p| pod_from_api(p))
            .map(|mut p| {
                // The controller's own labels are outputs, not inputs (as the controller does).
                p.labels.retain(|k, _| !crate::netpol::is_managed_label(k));
                p
            })
            .collect();
        inv.namespaces = sorted(&self.namespaces.store)
            .iter()
            .map(|n| namespace_from_api(n))
            .collect();
        let mut ranges: BTreeSet<IpNet> = self.virtual_network.iter().map(IpNet::trunc).collect();
        let mut node_ips: BTreeSet<IpAddr> = BTreeSet::new();
        for node in sorted(&self.nodes.store) {
            let spec = node.spec.as_ref();
            let cidrs = spec
                .and_then(|s| s.pod_cidrs.clone())
                .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
                .unwrap_or_default();
            ranges.extend(
                cidrs
                    .iter()
                    .filter_map(|c| c.parse::<IpNet>().ok())
                    .map(|n| n.trunc()),
            );
            node_ips.extend(
                node.status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse::<IpAddr>().ok()),
            );
        }
        inv.virtual_network = ranges.into_iter().collect();
        inv.node_ips = node_ips.into_iter().collect();
        Some(inv)
    }

    fn stop(&self) {
        self.nsgs.task.abort();
        self.asgs.task.abort();
        self.tags.task.abort();
        self.pods.task.abort();
        self.namespaces.task.abort();
        self.nodes.task.abort();
    }
}
