//! API objects into model objects. This is also the Rust-side validation: the offline CLI
//! and the controller see the same messages, each naming the object, the rule and the field.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Pod as ApiPod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as ApiSelector;
use kube::ResourceExt;

use super::types::{
    self, ApplicationSecurityGroup, NetworkSecurityGroup, ServiceTag as ApiServiceTag,
};
use crate::model::{
    AddressPrefix, Asg, AsgRef, Endpoint, LabelSelector, Namespace, Nsg, ObjectRef, Operator, Pod,
    PortRange, Protocol, Requirement, SecurityRule, ServiceTag, ValidationError, ValidationErrors,
};

/// Collects every problem of one object.
struct Problems {
    object: String,
    errors: Vec<ValidationError>,
}

impl Problems {
    fn new(object: String) -> Self {
        Problems {
            object,
            errors: Vec::new(),
        }
    }

    fn push(&mut self, rule: Option<&str>, field: String, message: impl Into<String>) {
        self.errors.push(ValidationError {
            object: self.object.clone(),
            rule: rule.map(str::to_string),
            field,
            message: message.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ValidationErrors(self.errors))
        }
    }
}

fn namespace_of(obj: &impl ResourceExt) -> String {
    obj.namespace().unwrap_or_else(|| "default".to_string())
}

pub fn selector_from_api(sel: &ApiSelector) -> Result<LabelSelector, String> {
    let match_expressions = sel
        .match_expressions
        .iter()
        .flatten()
        .map(|e| {
            let operator = Operator::parse(&e.operator)
                .ok_or_else(|| format!("unknown selector operator {:?}", e.operator))?;
            Ok(Requirement {
                key: e.key.clone(),
                operator,
                values: e.values.clone().unwrap_or_default(),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(LabelSelector {
        match_labels: sel.match_labels.clone().unwrap_or_default(),
        match_expressions,
    })
}

/// Takes the singular or the plural form of a property (Azure allows one of them): its
/// values, each with the path that names it in a problem (`...Prefix`, `...Prefixes[1]`).
/// `None` when both are written (reported here).
fn one_or_many<'a>(
    problems: &mut Problems,
    rule: &str,
    field: &str,
    single: &'a Option<String>,
    many: &'a Option<Vec<String>>,
) -> Option<Vec<(String, &'a str)>> {
    let list = if field.ends_with('x') {
        format!("{field}es")
    } else {
        format!("{field}s")
    };
    match (single, many) {
        (Some(_), Some(_)) => {
            problems.push(
                Some(rule),
                field.into(),
                format!("{field} and {list} are exclusive"),
            );
            None
        }
        (Some(s), None) => Some(vec![(field.to_string(), s.as_str())]),
        (None, Some(v)) => Some(
            v.iter()
                .enumerate()
                .map(|(i, s)| (format!("{list}[{i}]"), s.as_str()))
                .collect(),
        ),
        (None, None) => Some(vec![]),
    }
}

/// One side of a rule as written: address prefixes or ASG references.
struct Side<'a> {
    name: &'static str,
    prefix: &'a Option<String>,
    prefixes: &'a Option<Vec<String>>,
    asgs: &'a Option<Vec<types::AsgReference>>,
}

fn endpoint(
    problems: &mut Problems,
    path: &str,
    rule: &str,
    side: Side,
    namespace: &str,
) -> Endpoint {
    let Side {
        name: side,
        prefix,
        prefixes,
        asgs,
    } = side;
    let Some(texts) = one_or_many(
        problems,
        rule,
        &format!("{path}.{side}AddressPrefix"),
        prefix,
        prefixes,
    ) else {
        return Endpoint::any();
    };
    match asgs {
        Some(asgs) if !texts.is_empty() => {
            problems.push(
                Some(rule),
                format!("{path}.{side}ApplicationSecurityGroups"),
                format!(
                    "the {side} takes address prefixes or application security groups, not both"
                ),
            );
            Endpoint::Asgs(vec![])
        }
        Some(asgs) => Endpoint::Asgs(
            asgs.iter()
                .map(|a| AsgRef {
                    namespace: a.namespace.clone().unwrap_or_else(|| namespace.to_string()),
                    name: a.name.clone(),
                })
                .collect(),
        ),
        None if texts.is_empty() => {
            problems.push(
                Some(rule),
                format!("{path}.{side}AddressPrefix"),
                format!("a {side} is required: {side}AddressPrefix(es) or {side}ApplicationSecurityGroups"),
            );
            Endpoint::any()
        }
        None => Endpoint::Prefixes(
            texts
                .into_iter()
                .filter_map(|(field, t)| {
                    t.parse::<AddressPrefix>()
                        .map_err(|e| problems.push(Some(rule), field, e))
                        .ok()
                })
                .collect(),
        ),
    }
}

fn ports(
    problems: &mut Problems,
    path: &str,
    rule: &str,
    field: &str,
    single: &Option<String>,
    many: &Option<Vec<String>>,
) -> Vec<PortRange> {
    let texts =
        one_or_many(problems, rule, &format!("{path}.{field}"), single, many).unwrap_or_default();
    if texts.is_empty() {
        return vec![PortRange::ALL];
    }
    texts
        .into_iter()
        .filter_map(|(field, t)| {
            t.parse::<PortRange>()
                .map_err(|e| problems.push(Some(rule), field, e))
                .ok()
        })
        .collect()
}

impl TryFrom<&NetworkSecurityGroup> for Nsg {
    type Error = ValidationErrors;

    fn try_from(obj: &NetworkSecurityGroup) -> Result<Nsg, ValidationErrors> {
        let id = ObjectRef::new(namespace_of(obj), obj.name_any());
        let mut problems = Problems::new(format!("NetworkSecurityGroup {id}"));
        let pod_selector = obj.spec.pod_selector.as_ref().and_then(|s| {
            selector_from_api(s)
                .map_err(|e| problems.push(None, "spec.podSelector".into(), e))
                .ok()
        });
        let mut rules = Vec::new();
        for (i, r) in obj.spec.security_rules.iter().enumerate() {
            let path = format!("spec.securityRules[{i}]");
            let name = r.name.as_str();
            let source = Side {
                name: "source",
                prefix: &r.source_address_prefix,
                prefixes: &r.source_address_prefixes,
                asgs: &r.source_application_security_groups,
            };
            let source = endpoint(&mut problems, &path, name, source, &id.namespace);
            let destination = Side {
                name: "destination",
                prefix: &r.destination_address_prefix,
                prefixes: &r.destination_address_prefixes,
                asgs: &r.destination_application_security_groups,
            };
            let destination = endpoint(&mut problems, &path, name, destination, &id.namespace);
            let source_ports = ports(
                &mut problems,
                &path,
                name,
                "sourcePortRange",
                &r.source_port_range,
                &r.source_port_ranges,
            );
            let destination_ports = ports(
                &mut problems,
                &path,
                name,
                "destinationPortRange",
                &r.destination_port_range,
                &r.destination_port_ranges,
            );
            rules.push(SecurityRule {
                name: r.name.clone(),
                description: r.description.clone(),
                priority: u32::try_from(r.priority).unwrap_or(0),
                direction: match r.direction {
                    types::Direction::Inbound => crate::model::Direction::Inbound,
                    types::Direction::Outbound => crate::model::Direction::Outbound,
                },
                access: match r.access {
                    types::Access::Allow => crate::model::Access::Allow,
                    types::Access::Deny => crate::model::Access::Deny,
                },
                protocol: match r.protocol {
                    types::Protocol::Tcp => Protocol::Tcp,
                    types::Protocol::Udp => Protocol::Udp,
                    types::Protocol::Icmp => Protocol::Icmp,
                    types::Protocol::Any => Protocol::Any,
                },
                source,
                source_ports,
                destination,
                destination_ports,
                is_default: false,
            });
        }
        let nsg = Nsg {
            id,
            created: obj
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            generation: obj.metadata.generation,
            subnet: obj.spec.subnet,
            pod_selector,
            rules,
        };
        problems.errors.extend(nsg.validate());
        problems.finish(nsg)
    }
}

impl TryFrom<&ApplicationSecurityGroup> for Asg {
    type Error = ValidationErrors;

    fn try_from(obj: &ApplicationSecurityGroup) -> Result<Asg, ValidationErrors> {
        let id = ObjectRef::new(namespace_of(obj), obj.name_any());
        let mut problems = Problems::new(format!("ApplicationSecurityGroup {id}"));
        if id.name.len() > 63 {
            problems.push(
                None,
                "metadata.name".into(),
                "at most 63 characters (it is part of a label key)",
            );
        }
        let pod_selector = obj.spec.pod_selector.as_ref().and_then(|s| {
            selector_from_api(s)
                .map_err(|e| problems.push(None, "spec.podSelector".into(), e))
                .ok()
        });
        problems.finish(Asg { id, pod_selector })
    }
}

impl TryFrom<&ApiServiceTag> for ServiceTag {
    type Error = ValidationErrors;

    fn try_from(obj: &ApiServiceTag) -> Result<ServiceTag, ValidationErrors> {
        let name = obj.name_any();
        let mut problems = Problems::new(format!("ServiceTag {name}"));
        let mut prefixes = Vec::new();
        for (i, p) in obj.spec.address_prefixes.iter().enumerate() {
            match p.parse::<AddressPrefix>() {
                Ok(AddressPrefix::Net(net)) => prefixes.push(net),
                Ok(AddressPrefix::Any) => prefixes
                    .extend(["0.0.0.0/0", "::/0"].map(|n| n.parse::<ipnet::IpNet>().unwrap())),
                Ok(AddressPrefix::Tag(_)) | Err(_) => problems.push(
                    None,
                    format!("spec.addressPrefixes[{i}]"),
                    format!("{p:?} is not an IP address or CIDR block"),
                ),
            }
        }
        problems.finish(ServiceTag { name, prefixes })
    }
}

/// The addresses of a pod that takes part in the model: `None` for host-network pods (their
/// address is the node's, and their traffic never crosses a pod interface) and pods that
/// finished (Succeeded or Failed; their IP may be reused). `status.podIPs`, else
/// `status.podIP`; empty while the pod has none.
pub fn pod_ips(pod: &ApiPod) -> Option<Vec<IpAddr>> {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    Some(ips)
}

/// A pod as the model sees it: `None` for the pods [`pod_ips`] leaves out and pods without
/// an IP yet.
pub fn pod_from_api(pod: &ApiPod) -> Option<Pod> {
    let ips = pod_ips(pod).filter(|ips| !ips.is_empty())?;
    Some(Pod {
        id: ObjectRef::new(namespace_of(pod), pod.name_any()),
        labels: pod.labels().clone(),
        annotations: pod.annotations().clone(),
        ips,
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
    })
}

pub fn namespace_from_api(ns: &ApiNamespace) -> Namespace {
    // The API server sets the name label on every namespace; offline YAML may omit it.
    let mut namespace = Namespace::named(ns.name_any());
    namespace.labels.extend(ns.labels().clone());
    namespace
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value, status: serde_json::Value) -> ApiPod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "a", "name": "p"},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn problems_name_the_field_as_written() {
        let nsg: NetworkSecurityGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubensg.io/v1alpha1",
            "kind": "NetworkSecurityGroup",
            "metadata": {"namespace": "a", "name": "g"},
            "spec": {"subnet": true, "securityRules": [
                {"name": "one", "priority": 100, "direction": "Inbound", "access": "Allow",
                 "protocol": "Tcp", "sourceAddressPrefix": "10.0.0.1/8",
                 "destinationAddressPrefix": "*", "destinationPortRange": "9-8"},
                {"name": "list", "priority": 200, "direction": "Inbound", "access": "Allow",
                 "protocol": "Tcp", "sourceAddressPrefixes": ["10.0.0.0/8", "fd00::zz"],
                 "destinationAddressPrefix": "*", "destinationPortRanges": ["80", "9-8"]},
                {"name": "both", "priority": 300, "direction": "Inbound", "access": "Allow",
                 "protocol": "Tcp", "sourceAddressPrefix": "*", "sourceAddressPrefixes": ["*"],
                 "destinationAddressPrefix": "*"},
            ]},
        }))
        .unwrap();
        let fields: Vec<String> = Nsg::try_from(&nsg)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.securityRules[0].sourceAddressPrefix",
                "spec.securityRules[0].destinationPortRange",
                "spec.securityRules[1].sourceAddressPrefixes[1]",
                "spec.securityRules[1].destinationPortRanges[1]",
                "spec.securityRules[2].sourceAddressPrefix",
            ]
        );
    }

    #[test]
    fn pod_ips_leave_out_host_network_and_finished_pods() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let both = serde_json::json!({"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]});
        assert_eq!(
            pod_ips(&pod(serde_json::json!({}), both.clone())),
            Some(vec![ip("10.0.0.1"), ip("fd00::1")])
        );
        let only_pod_ip = serde_json::json!({"podIP": "10.0.0.2"});
        assert_eq!(
            pod_ips(&pod(serde_json::json!({}), only_pod_ip)),
            Some(vec![ip("10.0.0.2")])
        );
        let pending = pod(
            serde_json::json!({}),
            serde_json::json!({"phase": "Pending"}),
        );
        assert_eq!(pod_ips(&pending), Some(vec![]));
        assert!(pod_from_api(&pending).is_none());
        let host = pod(serde_json::json!({"hostNetwork": true}), both.clone());
        assert_eq!(pod_ips(&host), None);
        let mut done = pod(serde_json::json!({}), both);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(pod_ips(&done), None);
        assert!(pod_from_api(&done).is_none());
    }
}
