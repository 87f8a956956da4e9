//! What the agent's table depends on, as a model inventory: the controller's compact caches
//! (one watch per kind: NSGs, ASGs, ServiceTags, every pod, namespaces, nodes; no
//! NetworkPolicies) and its inventory building, so the agent and the controller see the same
//! model (an NSG whose current spec is invalid keeps its last valid model in force, pods' own
//! controller-managed labels are not inputs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use kube::Client;
use tokio::sync::Notify;

use super::metrics::AgentMetrics;
use crate::controller::cache::Caches;
use crate::controller::inventory::{Snapshot, build};
use crate::model::{Inventory, Nsg};

/// The agent's inputs.
pub trait Source: Send + Sync {
    /// Notified whenever the inventory may have changed.
    fn changed(&self) -> &Notify;
    /// The inventory to enforce now, or `None` while some watch has not listed once.
    fn inventory(&self) -> Option<Inventory>;
    /// Stops the watches.
    fn stop(&self) {}
}

/// The controller's caches, fed by watches of the whole cluster.
pub struct CacheSource {
    caches: Arc<Caches>,
    watches: Vec<tokio::task::JoinHandle<()>>,
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
        let caches = Arc::new(Caches::default());
        let watches = caches.spawn_input_watches(client, metrics);
        CacheSource {
            caches,
            watches,
            virtual_network,
            last_valid: Mutex::new(HashMap::new()),
        }
    }
}

impl Source for CacheSource {
    fn changed(&self) -> &Notify {
        &self.caches.changed
    }

    fn inventory(&self) -> Option<Inventory> {
        if !self.caches.inputs_synced() {
            return None;
        }
        let snapshot = Snapshot::of(&self.caches, None);
        let mut last_valid = self.last_valid.lock().expect("inputs lock");
        Some(build(&snapshot, &self.virtual_network, &mut last_valid).inventory)
    }

    fn stop(&self) {
        for w in &self.watches {
            w.abort();
        }
    }
}
