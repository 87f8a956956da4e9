//! From what the API server holds to the model's [`Inventory`]: one function for the
//! controller's caches and one for a single listing of a live cluster (what `kube-nsg verify`
//! without `-f` uses), both through the same conversion so they cannot disagree.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Node, Pod as ApiPod};
use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::cache::{
    Caches, NodeEntry, NsgEntry, PodEntry, asg_entry, namespace_entry, nsg_entry, tag_entry,
};
use super::policy::ObservedPolicy;
use crate::api::{ApplicationSecurityGroup, NetworkSecurityGroup, ServiceTag as ApiServiceTag};
use crate::model::{
    ASG_ANNOTATION, Asg, Inventory, LabelSelector, Namespace, Nsg, ObjectRef, Operator, Pod,
    Requirement, ServiceTag, ValidationErrors,
};

pub use crate::netpol::is_managed_label;

/// One consistent copy of every cache, sorted by namespace and name.
#[derive(Default)]
pub struct Snapshot {
    pub nsgs: Vec<Arc<NsgEntry>>,
    pub asgs: Vec<Arc<ApplicationSecurityGroup>>,
    pub tags: Vec<Arc<ApiServiceTag>>,
    pub pods: Vec<Arc<PodEntry>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub nodes: Vec<Arc<NodeEntry>>,
    pub policies: Vec<Arc<ObservedPolicy>>,
    /// Namespaces being deleted.
    pub terminating: HashSet<String>,
}

impl Snapshot {
    /// A snapshot of the caches, restricted to a namespace selector (see [`Snapshot::scope`]).
    pub fn of(c: &Caches, scope: Option<&LabelSelector>) -> Self {
        let namespaces = c.namespaces.snapshot();
        let snap = Snapshot {
            nsgs: c.nsgs.snapshot(),
            asgs: c.asgs.snapshot(),
            tags: c.tags.snapshot(),
            pods: c.pods.snapshot(),
            namespaces: namespaces
                .iter()
                .map(|n| Arc::new(n.namespace.clone()))
                .collect(),
            nodes: c.nodes.snapshot(),
            policies: c.policies.snapshot(),
            terminating: namespaces
                .iter()
                .filter(|n| n.terminating)
                .map(|n| n.namespace.name.clone())
                .collect(),
        };
        snap.scope(scope)
    }

    /// Keeps only the namespaces the selector selects, with their NSGs, ASGs, pods and
    /// NetworkPolicies (every node and service tag stays).
    pub fn scope(mut self, scope: Option<&LabelSelector>) -> Self {
        let Some(sel) = scope else { return self };
        let selected: HashSet<String> = self
            .namespaces
            .iter()
            .filter(|n| sel.matches(&n.labels))
            .map(|n| n.name.clone())
            .collect();
        let in_scope = |ns: &str| selected.contains(ns);
        self.nsgs.retain(|o| in_scope(&o.namespace));
        self.asgs
            .retain(|o| in_scope(o.metadata.namespace.as_deref().unwrap_or("")));
        self.pods.retain(|o| in_scope(&o.namespace));
        self.policies.retain(|o| in_scope(&o.namespace));
        self.namespaces.retain(|n| in_scope(&n.name));
        self
    }

    /// Whether the API server would refuse writes in this namespace (it is being deleted).
    pub fn terminating(&self, namespace: &str) -> bool {
        self.terminating.contains(namespace)
    }
}

/// Parses a namespace selector written like kubectl's `-l`: comma-separated `key=value`,
/// `key==value`, `key!=value`, `key` (exists) and `!key` (does not exist).
pub fn parse_selector(s: &str) -> Result<LabelSelector, String> {
    let mut sel = LabelSelector::default();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = |key: &str, operator, values: Vec<String>| Requirement {
            key: key.trim().to_string(),
            operator,
            values,
        };
        if let Some((k, v)) = term.split_once("!=") {
            sel.match_expressions
                .push(requirement(k, Operator::NotIn, vec![v.trim().to_string()]));
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            sel.match_labels
                .insert(k.trim().to_string(), v.trim().to_string());
        } else if let Some(k) = term.strip_prefix('!') {
            sel.match_expressions
                .push(requirement(k, Operator::DoesNotExist, vec![]));
        } else if term
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            sel.match_expressions
                .push(requirement(term, Operator::Exists, vec![]));
        } else {
            return Err(format!(
                "{term:?} is not key=value, key!=value, key or !key"
            ));
        }
    }
    Ok(sel)
}

/// How one NetworkSecurityGroup object entered the inventory.
#[derive(Debug, Clone)]
pub struct NsgState {
    /// Index in `Inventory::nsgs` of the model in force: the current spec, or the last valid
    /// one when the current spec is invalid; `None` when no valid spec is known.
    pub model: Option<usize>,
    /// Why the current spec is invalid.
    pub errors: Option<ValidationErrors>,
}

pub struct Built {
    pub inventory: Inventory,
    /// Parallel to `Snapshot::nsgs`.
    pub nsgs: Vec<NsgState>,
    pub asg_errors: BTreeMap<ObjectRef, ValidationErrors>,
    pub tag_errors: BTreeMap<String, ValidationErrors>,
    /// `inventory.pods[i]` came from `Snapshot::pods[pod_source[i]]`.
    pub pod_source: Vec<usize>,
}

/// The model pod of a cached pod: the controller's own labels are dropped (a pod cannot select
/// itself into an ASG or a group by setting them), and of the annotations only the ASG list is
/// kept.
pub fn model_pod(entry: &PodEntry) -> Pod {
    Pod {
        id: ObjectRef::new(&entry.namespace, &entry.name),
        labels: entry
            .labels
            .iter()
            .filter(|(k, _)| !is_managed_label(k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        annotations: entry
            .asg_annotation
            .iter()
            .map(|v| (ASG_ANNOTATION.to_string(), v.clone()))
            .collect(),
        ips: entry.ips.clone(),
        node_name: entry.node_name.clone(),
    }
}

/// Builds the inventory. `last_valid` maps NSG uids to their last valid model: it is updated
/// with every valid NSG and used for invalid ones, so an edit that fails validation does not
/// take away what is already enforced. Entries of NSGs that no longer exist are dropped.
pub fn build(
    snap: &Snapshot,
    virtual_network: &[IpNet],
    last_valid: &mut HashMap<String, Arc<Nsg>>,
) -> Built {
    let mut inventory = Inventory::default();
    let mut nsgs = Vec::with_capacity(snap.nsgs.len());
    let mut seen = BTreeSet::new();
    for entry in &snap.nsgs {
        let uid = entry.uid.clone();
        seen.insert(uid.clone());
        let (model, errors) = match &entry.model {
            Ok(nsg) => {
                last_valid.insert(uid, nsg.clone());
                (Some(nsg.clone()), None)
            }
            Err(errors) => (last_valid.get(&uid).cloned(), Some(errors.clone())),
        };
        let model = model.map(|nsg| {
            inventory.nsgs.push((*nsg).clone());
            inventory.nsgs.len() - 1
        });
        nsgs.push(NsgState { model, errors });
    }
    last_valid.retain(|uid, _| seen.contains(uid));

    let mut asg_errors = BTreeMap::new();
    for obj in &snap.asgs {
        match Asg::try_from(&**obj) {
            Ok(asg) => inventory.asgs.push(asg),
            Err(e) => {
                asg_errors.insert(
                    ObjectRef::new(obj.namespace().unwrap_or_default(), obj.name_any()),
                    e,
                );
            }
        }
    }
    let mut tag_errors = BTreeMap::new();
    for obj in &snap.tags {
        match ServiceTag::try_from(&**obj) {
            Ok(tag) => inventory.service_tags.push(tag),
            Err(e) => {
                tag_errors.insert(obj.name_any(), e);
            }
        }
    }
    let mut pod_source = Vec::with_capacity(snap.pods.len());
    for (i, entry) in snap.pods.iter().enumerate() {
        inventory.pods.push(model_pod(entry));
        pod_source.push(i);
    }
    inventory.namespaces = snap.namespaces.iter().map(|n| (**n).clone()).collect();
    let mut ranges: BTreeSet<IpNet> = virtual_network.iter().map(IpNet::trunc).collect();
    let mut node_ips = BTreeSet::new();
    for node in &snap.nodes {
        ranges.extend(node.pod_cidrs.iter().copied());
        node_ips.extend(node.internal_ips.iter().copied());
    }
    inventory.virtual_network = ranges.into_iter().collect();
    inventory.node_ips = node_ips.into_iter().collect();
    Built {
        inventory,
        nsgs,
        asg_errors,
        tag_errors,
        pod_source,
    }
}

/// The inventory of a live cluster, for the CLI.
#[derive(Debug, Clone)]
pub struct LiveInventory {
    pub inventory: Inventory,
    /// Objects left out because they fail validation (an NSG's last valid generation is not
    /// known outside the controller).
    pub invalid: Vec<ValidationErrors>,
}

async fn list<K, T>(
    client: &Client,
    convert: fn(&K) -> Option<T>,
) -> Result<Vec<Arc<T>>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    let mut out: Vec<((String, String), T)> = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        out.extend(page.items.iter().filter_map(|o| {
            Some((
                (o.namespace().unwrap_or_default(), o.name_any()),
                convert(o)?,
            ))
        }));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out.into_iter().map(|(_, v)| Arc::new(v)).collect())
}

/// Lists NetworkSecurityGroups, ApplicationSecurityGroups, ServiceTags, Pods, Namespaces and
/// Nodes once and builds the inventory the controller would build from them.
/// `virtual_network` holds the ranges that cannot be discovered (pod and service CIDRs), as
/// the controller's `--virtual-network`.
pub async fn inventory_from_cluster(
    client: &Client,
    virtual_network: &[IpNet],
) -> Result<LiveInventory, kube::Error> {
    scoped_inventory_from_cluster(client, virtual_network, None).await
}

/// [`inventory_from_cluster`] restricted to the namespaces a selector selects, as a
/// controller with `--namespace-selector` sees it.
pub async fn scoped_inventory_from_cluster(
    client: &Client,
    virtual_network: &[IpNet],
    scope: Option<&LabelSelector>,
) -> Result<LiveInventory, kube::Error> {
    let snap = Snapshot {
        nsgs: list::<NetworkSecurityGroup, _>(client, nsg_entry).await?,
        asgs: list::<ApplicationSecurityGroup, _>(client, asg_entry).await?,
        tags: list::<ApiServiceTag, _>(client, tag_entry).await?,
        pods: list::<ApiPod, _>(client, PodEntry::from_api).await?,
        namespaces: list::<ApiNamespace, _>(client, |n| namespace_entry(n).map(|e| e.namespace))
            .await?,
        nodes: list::<Node, _>(client, NodeEntry::from_api).await?,
        policies: Vec::new(),
        terminating: HashSet::new(),
    }
    .scope(scope);
    let built = build(&snap, virtual_network, &mut HashMap::new());
    let invalid = built
        .nsgs
        .into_iter()
        .filter_map(|s| s.errors)
        .chain(built.asg_errors.into_values())
        .chain(built.tag_errors.into_values())
        .collect();
    Ok(LiveInventory {
        inventory: built.inventory,
        invalid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NetworkSecurityGroupSpec, SecurityRule};
    use crate::controller::cache::Labels;
    use crate::model::NIC_NSG_LABEL;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn nsg(name: &str, uid: &str, priority: i32) -> Arc<NsgEntry> {
        let rule: SecurityRule = serde_json::from_value(serde_json::json!({
            "name": "web", "priority": priority, "direction": "Inbound", "access": "Allow",
            "protocol": "Tcp", "sourceAddressPrefix": "*", "destinationAddressPrefix": "*",
            "destinationPortRange": "80"
        }))
        .unwrap();
        let obj = NetworkSecurityGroup {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: NetworkSecurityGroupSpec {
                subnet: true,
                pod_selector: None,
                security_rules: vec![rule],
            },
            status: None,
        };
        Arc::new(nsg_entry(&obj).unwrap())
    }

    #[test]
    fn an_invalid_nsg_keeps_its_last_valid_model() {
        let mut last = HashMap::new();
        let snap = Snapshot {
            nsgs: vec![nsg("a", "u1", 200)],
            ..Default::default()
        };
        let built = build(&snap, &[], &mut last);
        assert_eq!(built.nsgs[0].model, Some(0));
        assert_eq!(built.inventory.nsgs[0].rules[0].priority, 200);

        // Priority 99 passes no admission, but a Rust-side check can still fail it.
        let snap = Snapshot {
            nsgs: vec![nsg("a", "u1", 99)],
            ..Default::default()
        };
        let built = build(&snap, &[], &mut last);
        assert!(built.nsgs[0].errors.is_some());
        assert_eq!(
            built.nsgs[0].model,
            Some(0),
            "the last valid model stays in force"
        );
        assert_eq!(built.inventory.nsgs[0].rules[0].priority, 200);

        // A new object under the same name is not the old one.
        let snap = Snapshot {
            nsgs: vec![nsg("a", "u2", 99)],
            ..Default::default()
        };
        let built = build(&snap, &[], &mut last);
        assert_eq!(built.nsgs[0].model, None);
        assert!(built.inventory.nsgs.is_empty());
        assert!(last.is_empty(), "the deleted object's model is forgotten");
    }

    #[test]
    fn namespace_selectors_parse_like_kubectl() {
        let sel = parse_selector("team=a, env!=prod,owned,!legacy").unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(sel.matches(&labels(&[("team", "a"), ("owned", "")])));
        assert!(!sel.matches(&labels(&[("team", "a"), ("owned", ""), ("env", "prod")])));
        assert!(!sel.matches(&labels(&[("team", "a"), ("owned", ""), ("legacy", "1")])));
        assert!(!sel.matches(&labels(&[("team", "b"), ("owned", "")])));
        assert!(parse_selector("a in (b)").is_err());
    }

    #[test]
    fn managed_labels_are_not_inputs() {
        let entry = PodEntry {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            labels: Labels::from_map(&BTreeMap::from([
                ("app".into(), "web".into()),
                ("asg.kubensg.io/db".into(), "true".into()),
                (NIC_NSG_LABEL.into(), "x".into()),
            ])),
            asg_annotation: Some("web".into()),
            ips: vec![],
            node_name: None,
            deleting: false,
        };
        let pod = model_pod(&entry);
        assert_eq!(pod.labels.keys().collect::<Vec<_>>(), vec!["app"]);
        assert_eq!(
            pod.annotations.get(ASG_ANNOTATION).map(String::as_str),
            Some("web")
        );
    }
}
