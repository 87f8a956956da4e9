//! NetworkPolicies the controller generates: which ones are its own, what to apply, and
//! whether what the API server holds already says the same (so nothing is written when it
//! does). Observed policies are kept as [`ObservedPolicy`]: metadata that matters and a
//! digest of the normalised spec.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::compile::DesiredPolicy;
use super::digest::{self, Digest};

pub const MANAGED_BY_LABEL: &str = crate::netpol::MANAGED_BY_LABEL;
pub const MANAGED_BY: &str = crate::netpol::MANAGED_BY_VALUE;
pub const NSG_LABEL: &str = crate::netpol::NSG_LABEL;
const NSG_API_VERSION: &str = "kubensg.io/v1alpha1";
const NSG_KIND: &str = "NetworkSecurityGroup";

/// What the controller keeps of a NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPolicy {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    /// The uid of the owning NSG when the policy is this controller's: it carries the
    /// managed-by label *and* a controller owner reference to a NetworkSecurityGroup.
    /// Anything else is someone else's and is never written to.
    pub owner_uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Digest of the normalised spec.
    pub spec: Digest,
}

impl ObservedPolicy {
    pub fn from_api(np: &NetworkPolicy) -> Self {
        let labels = np.metadata.labels.clone().unwrap_or_default();
        let ours = labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
        let owner_uid = np
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| {
                o.kind == NSG_KIND
                    && o.api_version.starts_with("kubensg.io/")
                    && o.controller == Some(true)
            })
            .map(|o| o.uid.clone())
            .filter(|_| ours);
        let mut annotations = np.metadata.annotations.clone().unwrap_or_default();
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        let spec = serde_json::to_value(&np.spec).unwrap_or(Value::Null);
        ObservedPolicy {
            namespace: np.metadata.namespace.clone().unwrap_or_default(),
            name: np.metadata.name.clone().unwrap_or_default(),
            uid: np.metadata.uid.clone(),
            owner_uid,
            labels,
            annotations,
            spec: spec_digest(&spec),
        }
    }
}

/// The digest of a NetworkPolicy spec after [`normalize_spec`].
pub fn spec_digest(spec: &Value) -> Digest {
    digest::of_value(&normalize_spec(spec))
}

/// The labels a policy is applied with: the compiler's and the project's. The compiler
/// shortens long names to fit a label value; its NSG label is kept when it set one.
fn desired_labels(p: &DesiredPolicy) -> BTreeMap<String, String> {
    let mut labels = p.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels
        .entry(NSG_LABEL.into())
        .or_insert_with(|| p.nsg.clone());
    labels
}

/// The object to server-side apply: the compiler's policy with the project's labels and a
/// controller owner reference to its NSG (so deleting the NSG garbage-collects it).
pub fn apply_object(p: &DesiredPolicy, owner_uid: &str) -> Value {
    let labels = desired_labels(p);
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "labels": labels,
            "annotations": p.annotations,
            "ownerReferences": [{
                "apiVersion": NSG_API_VERSION,
                "kind": NSG_KIND,
                "name": p.nsg,
                "uid": owner_uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": p.spec_value(),
    })
}

/// Drops nulls and empty lists and maps from objects (they mean the same as absent fields),
/// keeping list elements as they are (`[{}]` is not `[]` in a NetworkPolicy).
fn prune(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for value in map.values_mut() {
                prune(value);
            }
            map.retain(|_, value| match value {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            });
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

/// A NetworkPolicy spec with the API server's defaults filled in, so a spec as written and as
/// read back compare equal: `protocol: TCP` on ports, and `policyTypes` from the rules.
pub fn normalize_spec(spec: &Value) -> Value {
    let mut spec = spec.clone();
    if let Value::Object(map) = &mut spec {
        for direction in ["ingress", "egress"] {
            for rule in map
                .get_mut(direction)
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                for port in rule
                    .get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Value::Object(p) = port {
                        p.entry("protocol").or_insert_with(|| "TCP".into());
                    }
                }
            }
        }
        if !map.contains_key("policyTypes") {
            let mut types = vec![Value::from("Ingress")];
            if map
                .get("egress")
                .and_then(Value::as_array)
                .is_some_and(|e| !e.is_empty())
            {
                types.push("Egress".into());
            }
            map.insert("policyTypes".into(), Value::Array(types));
        }
    }
    prune(&mut spec);
    spec
}

fn subset(desired: &BTreeMap<String, String>, observed: &BTreeMap<String, String>) -> bool {
    desired.iter().all(|(k, v)| observed.get(k) == Some(v))
}

/// Whether `observed` already is what applying `desired` for the NSG `owner_uid` would make
/// it: the same spec, our labels and annotations, and our owner reference.
pub fn up_to_date(desired: &DesiredPolicy, owner_uid: &str, observed: &ObservedPolicy) -> bool {
    desired.spec == observed.spec
        && observed.owner_uid.as_deref() == Some(owner_uid)
        && subset(&desired_labels(desired), &observed.labels)
        && subset(&desired.annotations, &observed.annotations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netpol;

    fn desired() -> DesiredPolicy {
        let policy: netpol::NetworkPolicy = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {
                "name": "nsg-web-0123456789", "namespace": "ns",
                "labels": {"kubensg.io/nsg": "web", "app.kubernetes.io/managed-by": "kube-nsg"},
                "annotations": {"kubensg.io/subnet-nsg": "web"}
            },
            "spec": {
                "podSelector": {"matchLabels": {"asg.kubensg.io/web": "true"}},
                "ingress": [{"ports": [{"protocol": "TCP", "port": 80}], "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
                "policyTypes": ["Ingress"]
            }
        }))
        .unwrap();
        DesiredPolicy::new(policy, "web".into())
    }

    /// What the API server gives back after an apply of `desired`.
    fn read_back(d: &DesiredPolicy) -> NetworkPolicy {
        let mut obj = apply_object(d, "uid-1");
        // The server fills in defaults and other managers add labels.
        obj["spec"]["ingress"][0]["ports"][0]
            .as_object_mut()
            .unwrap()
            .insert("protocol".into(), "TCP".into());
        obj["metadata"]["labels"]["someone/else"] = "x".into();
        obj["metadata"]["resourceVersion"] = "12".into();
        serde_json::from_value(obj).unwrap()
    }

    #[test]
    fn read_back_policy_is_up_to_date() {
        let d = desired();
        let np = ObservedPolicy::from_api(&read_back(&d));
        assert_eq!(np.owner_uid.as_deref(), Some("uid-1"));
        assert!(up_to_date(&d, "uid-1", &np));
        assert!(!up_to_date(&d, "uid-2", &np), "owned by another group");
    }

    #[test]
    fn hand_edits_and_foreign_policies_are_detected() {
        let d = desired();
        let mut edited = read_back(&d);
        edited.spec.as_mut().unwrap().ingress = Some(vec![Default::default()]);
        assert!(
            !up_to_date(&d, "uid-1", &ObservedPolicy::from_api(&edited)),
            "allow-all ingress is not our rule"
        );

        let mut annotated = read_back(&d);
        annotated.metadata.annotations = None;
        assert!(
            !up_to_date(&d, "uid-1", &ObservedPolicy::from_api(&annotated)),
            "our annotations are part of the policy"
        );

        let mut relabelled = read_back(&d);
        relabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(MANAGED_BY_LABEL);
        let observed = ObservedPolicy::from_api(&relabelled);
        assert_eq!(observed.owner_uid, None, "without the label it is not ours");
        assert!(!up_to_date(&d, "uid-1", &observed));

        let mut orphan = read_back(&d);
        orphan.metadata.owner_references = None;
        assert_eq!(
            ObservedPolicy::from_api(&orphan).owner_uid,
            None,
            "without the owner reference it is not ours"
        );
    }

    #[test]
    fn allow_all_and_deny_all_differ_after_normalisation() {
        let allow_all = normalize_spec(&json!({"podSelector": {}, "ingress": [{}]}));
        let deny_all = normalize_spec(&json!({"podSelector": {}, "ingress": []}));
        assert_ne!(allow_all, deny_all);
        assert_eq!(
            deny_all,
            normalize_spec(&json!({"podSelector": {}, "policyTypes": ["Ingress"]}))
        );
    }
}
