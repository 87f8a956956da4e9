//! NetworkPolicies the controller generates: which ones are its own, what to apply, and
//! whether what the API server holds already says the same (so nothing is written when it
//! does).

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::compile::DesiredPolicy;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "kube-nsg";
pub const NSG_LABEL: &str = "kubensg.io/nsg";
const NSG_API_VERSION: &str = "kubensg.io/v1alpha1";
const NSG_KIND: &str = "NetworkSecurityGroup";

/// The uid of the NSG that owns `np`, when `np` is this controller's: it carries the
/// managed-by label *and* a controller owner reference to a NetworkSecurityGroup. Anything
/// else is someone else's and is never written to.
pub fn owner_uid(np: &NetworkPolicy) -> Option<&str> {
    let labels = np.metadata.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    np.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| {
            o.kind == NSG_KIND
                && o.api_version.starts_with("kubensg.io/")
                && o.controller == Some(true)
        })
        .map(|o| o.uid.as_str())
}

/// The object to server-side apply: the compiler's policy with the project's labels and a
/// controller owner reference to its NSG (so deleting the NSG garbage-collects it).
pub fn apply_object(p: &DesiredPolicy, owner_uid: &str) -> Value {
    let mut labels = p
        .object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    // The compiler shortens long names to fit a label value; keep its value when it set one.
    labels
        .entry(NSG_LABEL)
        .or_insert_with(|| p.nsg.clone().into());
    let annotations = p
        .object
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": NSG_API_VERSION,
                "kind": NSG_KIND,
                "name": p.nsg,
                "uid": owner_uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": p.object.get("spec").cloned().unwrap_or_else(|| json!({})),
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

fn subset(
    desired: Option<&Value>,
    observed: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    desired
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(k, v)| observed.and_then(|l| l.get(k)).map(String::as_str) == v.as_str())
}

/// Whether `observed` already is what applying `desired` (an [`apply_object`]) would make it:
/// the same spec, our labels and annotations, and our owner reference.
pub fn up_to_date(desired: &Value, observed: &NetworkPolicy) -> bool {
    let labels_ok = subset(
        desired.pointer("/metadata/labels"),
        observed.metadata.labels.as_ref(),
    ) && subset(
        desired.pointer("/metadata/annotations"),
        observed.metadata.annotations.as_ref(),
    );
    let owner_uid = desired
        .pointer("/metadata/ownerReferences/0/uid")
        .and_then(Value::as_str);
    let owner_ok = owner_uid.is_some() && self::owner_uid(observed) == owner_uid;
    let observed_spec = serde_json::to_value(&observed.spec).unwrap_or(Value::Null);
    let spec_ok = normalize_spec(desired.get("spec").unwrap_or(&Value::Null))
        == normalize_spec(&observed_spec);
    labels_ok && owner_ok && spec_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> DesiredPolicy {
        DesiredPolicy {
            namespace: "ns".into(),
            name: "kube-nsg-web-in".into(),
            nsg: "web".into(),
            object: json!({
                "metadata": {"labels": {"kubensg.io/nsg": "web"}, "annotations": {"kubensg.io/subnet-nsg": "web"}},
                "spec": {
                    "podSelector": {"matchLabels": {"asg.kubensg.io/web": "true"}},
                    "ingress": [{"ports": [{"port": 80}], "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
                    "policyTypes": ["Ingress"]
                }
            }),
        }
    }

    fn as_read_back(v: &Value) -> NetworkPolicy {
        let mut np: NetworkPolicy = serde_json::from_value(v.clone()).unwrap();
        // What the API server adds.
        np.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0]
            .ports
            .as_mut()
            .unwrap()[0]
            .protocol = Some("TCP".into());
        np.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("someone/else".into(), "x".into());
        np.metadata.resource_version = Some("12".into());
        np
    }

    #[test]
    fn read_back_policy_is_up_to_date() {
        let obj = apply_object(&desired(), "uid-1");
        let np = as_read_back(&obj);
        assert_eq!(owner_uid(&np), Some("uid-1"));
        assert!(up_to_date(&obj, &np));
    }

    #[test]
    fn hand_edits_and_foreign_policies_are_detected() {
        let obj = apply_object(&desired(), "uid-1");
        let mut edited = as_read_back(&obj);
        edited.spec.as_mut().unwrap().ingress = Some(vec![Default::default()]);
        assert!(
            !up_to_date(&obj, &edited),
            "allow-all ingress is not our rule"
        );

        let mut annotated = as_read_back(&obj);
        annotated.metadata.annotations = None;
        assert!(
            !up_to_date(&obj, &annotated),
            "our annotations are part of the policy"
        );

        let mut relabelled = as_read_back(&obj);
        relabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(MANAGED_BY_LABEL);
        assert_eq!(
            owner_uid(&relabelled),
            None,
            "without the label it is not ours"
        );
        assert!(!up_to_date(&obj, &relabelled));

        let mut orphan = as_read_back(&obj);
        orphan.metadata.owner_references = None;
        assert_eq!(
            owner_uid(&orphan),
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
