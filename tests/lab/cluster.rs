//! The API side: the Node for this machine, the Namespaces, and the Pods with the status a
//! kubelet would report, so controllers and the agent see running pods.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::json;

use super::LabError;

const MANAGER: &str = "kube-nsg-lab";
/// On every Pod the lab creates: the network namespace that stands for it.
pub const NETNS_ANNOTATION: &str = "lab.kubensg.io/netns";
/// On the Node the lab registers.
pub const NODE_LABEL: &str = "lab.kubensg.io/node";
/// The Node's pod CIDRs (`spec.podCIDRs`, immutable once set), one per family.
pub const NODE_POD_CIDRS: [&str; 2] = ["10.244.0.0/16", "fd00:10:244::/56"];

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Kube {
        what,
        source: Box::new(source),
    }
}

/// A client for a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> Result<Client, LabError> {
    let bad = |message: String| LabError::Other(format!("{}: {message}", kubeconfig.display()));
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| bad(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    Client::try_from(config).map_err(|e| bad(e.to_string()))
}

fn now() -> serde_json::Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).expect("time serializes")
}

pub async fn apply_node(client: &Client, name: &str, ip: IpAddr) -> Result<(), LabError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let what = format!("applying Node {name}");
    nodes
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        NODE_LABEL: "true",
                    },
                },
                "spec": {"podCIDR": NODE_POD_CIDRS[0], "podCIDRs": NODE_POD_CIDRS},
            })),
        )
        .await
        .map_err(kube_err(what.clone()))?;
    let t = now();
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": ip.to_string()},
                        {"type": "Hostname", "address": name},
                    ],
                    "conditions": [{
                        "type": "Ready", "status": "True", "reason": "KubeNsgLab",
                        "message": "netns pods of the kube-nsg lab",
                        "lastHeartbeatTime": t, "lastTransitionTime": t,
                    }],
                },
            })),
        )
        .await
        .map_err(kube_err(what))?;
    Ok(())
}

pub async fn apply_namespace(client: &Client, ns: &Namespace) -> Result<(), LabError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let name = ns.name_any();
    let mut metadata = json!({"name": name});
    if let Some(labels) = &ns.metadata.labels {
        metadata["labels"] = json!(labels);
    }
    if let Some(annotations) = &ns.metadata.annotations {
        metadata["annotations"] = json!(annotations);
    }
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})),
    )
    .await
    .map_err(kube_err(format!("applying Namespace {name}")))?;
    Ok(())
}

/// Creates (or updates) the Pod bound to `node`, then writes the status a kubelet would:
/// Running, Ready, its IPs. Retries while the namespace's `default` ServiceAccount (which
/// admission requires) is not there yet.
pub async fn apply_pod(
    client: &Client,
    pod: &Pod,
    ips: &[IpAddr],
    node: &str,
    node_ip: IpAddr,
    netns: &str,
) -> Result<(), LabError> {
    let namespace = pod.namespace().unwrap_or_else(|| "default".into());
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let what = format!("applying Pod {namespace}/{name}");
    let mut spec = serde_json::to_value(pod.spec.clone().unwrap_or_default()).expect("serializes");
    spec["nodeName"] = json!(node);
    let mut annotations = pod.metadata.annotations.clone().unwrap_or_default();
    annotations.insert(NETNS_ANNOTATION.into(), netns.into());
    let object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": pod.metadata.labels.clone().unwrap_or_default(),
            "annotations": annotations,
        },
        "spec": spec,
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
        {
            Ok(_) => break,
            Err(kube::Error::Api(s))
                if s.message.contains("serviceaccount") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(kube_err(what)(e)),
        }
    }
    let t = now();
    let condition = |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": t, "lastProbeTime": null});
    let ip_list: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    let containers: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": t}},
            })
        })
        .collect();
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({
            "status": {
                "phase": "Running",
                "podIP": ips[0].to_string(),
                "podIPs": ip_list,
                "hostIP": node_ip.to_string(),
                "hostIPs": [{"ip": node_ip.to_string()}],
                "startTime": t,
                "containerStatuses": containers,
                "conditions": [
                    condition("PodScheduled"),
                    condition("Initialized"),
                    condition("ContainersReady"),
                    condition("Ready"),
                ],
            },
        })),
    )
    .await
    .map_err(kube_err(what))?;
    Ok(())
}

/// Deletes, at once (no kubelet will ever confirm a graceful deletion), the lab's Pods bound
/// to `node` whose `namespace/name` `keep` rejects.
pub async fn delete_pods(
    client: &Client,
    node: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<(), LabError> {
    let all: Api<Pod> = Api::all(client.clone());
    let pods = all
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(kube_err(format!("listing the Pods of Node {node}")))?;
    for pod in pods {
        let id = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        if !pod.annotations().contains_key(NETNS_ANNOTATION) || keep(&id) {
            continue;
        }
        let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
        match api
            .delete(
                &pod.name_any(),
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err(format!("deleting Pod {id}"))(e)),
        }
    }
    Ok(())
}

/// Deletes the Node if it is the lab's.
pub async fn delete_node(client: &Client, name: &str) -> Result<(), LabError> {
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.get_opt(name).await {
        Ok(Some(node)) if node.labels().contains_key(NODE_LABEL) => {
            match nodes.delete(name, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(e) => Err(kube_err(format!("deleting Node {name}"))(e)),
            }
        }
        Ok(_) => Ok(()),
        Err(e) => Err(kube_err(format!("reading Node {name}"))(e)),
    }
}
