//! Telling an uninstall from a restart when the agent is stopped. A restart (rolling update,
//! crash, evicted pod) must keep the table: the next agent replaces it atomically. An
//! uninstall must remove it, or the node keeps enforcing groups nobody manages. The
//! difference is the agent's DaemonSet: it is still there during a restart; `helm uninstall`
//! (or `kubectl delete daemonset`) deletes it before its pods get SIGTERM (background
//! propagation) or marks it deleted until they are gone (foreground).
//!
//! The agent finds its DaemonSet at start from its own Pod's owner (`$POD_NAME` and
//! `$POD_NAMESPACE`, from the downward API), and on SIGTERM asks whether it still exists
//! (same uid, not being deleted). When it cannot tell (no `$POD_NAME`, not owned by a
//! DaemonSet, the API server does not answer within a few seconds), it keeps the table: a
//! leftover table is fixed by `kube-nsg agent --cleanup`, an opened hole is not fixable after
//! the fact.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, info};

/// The DaemonSet that runs this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Looks up the agent's own DaemonSet (retrying while the API server does not answer);
/// `None` outside a DaemonSet pod.
pub async fn own_daemonset(client: Client) -> Option<Owner> {
    let pod_name = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty())?;
    let namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())?;
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let mut delay = Duration::from_millis(500);
    let pod = loop {
        match pods.get_opt(&pod_name).await {
            Ok(Some(pod)) => break pod,
            Ok(None) => {
                debug!(pod = %pod_name, "own Pod not found: not telling uninstalls from restarts");
                return None;
            }
            Err(e) => {
                debug!(error = %e, "cannot read the agent's own Pod yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    let owner = owner_of(&pod)?;
    info!(daemonset = %owner.name, "stopping keeps the table unless this DaemonSet is deleted");
    Some(owner)
}

pub fn owner_of(pod: &Pod) -> Option<Owner> {
    let o = pod
        .owner_references()
        .iter()
        .find(|o| o.kind == "DaemonSet" && o.api_version.starts_with("apps/"))?;
    Some(Owner {
        namespace: pod.namespace().unwrap_or_default(),
        name: o.name.clone(),
        uid: o.uid.clone(),
    })
}

/// Whether the DaemonSet is gone or being deleted (an uninstall). `false` when the API
/// server does not answer within 5 s: then the table stays.
pub async fn is_gone(client: &Client, owner: &Owner) -> bool {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &owner.namespace);
    match tokio::time::timeout(Duration::from_secs(5), api.get_opt(&owner.name)).await {
        Ok(Ok(None)) => true,
        Ok(Ok(Some(ds))) => {
            ds.meta().deletion_timestamp.is_some() || ds.meta().uid.as_deref() != Some(&owner.uid)
        }
        Ok(Err(_)) | Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_the_apps_daemonset() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kube-nsg-agent-x7", "namespace": "kube-nsg",
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "kube-nsg-agent", "uid": "u1", "controller": true}
                ]},
        }))
        .unwrap();
        assert_eq!(
            owner_of(&pod),
            Some(Owner {
                namespace: "kube-nsg".into(),
                name: "kube-nsg-agent".into(),
                uid: "u1".into()
            })
        );
        let bare: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}})).unwrap();
        assert_eq!(owner_of(&bare), None);
    }
}
