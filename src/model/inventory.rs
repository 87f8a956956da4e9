use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{LabelSelector, Nsg};

/// `namespace/name` of a namespaced object (serialized as that string).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl serde::Serialize for ObjectRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for ObjectRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ObjectRef::new(ns, name))
            }
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

/// An application security group: pods of its namespace it selects, plus pods that list it
/// in their `kubensg.io/application-security-groups` annotation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Asg {
    pub id: ObjectRef,
    pub pod_selector: Option<LabelSelector>,
}

/// A named list of address prefixes that rules can use like a built-in service tag.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceTag {
    pub name: String,
    pub prefixes: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pod {
    pub id: ObjectRef,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node_name: Option<String>,
}

/// The label every namespace carries with its own name (set by the API server).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    /// A namespace with only the label the API server gives every namespace, its name.
    pub fn named(name: impl Into<String>) -> Self {
        let name = name.into();
        Namespace {
            labels: BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), name.clone())]),
            name,
        }
    }
}

/// Everything the semantics depend on: the groups, the pods they apply to, and the
/// cluster's address space.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Inventory {
    pub nsgs: Vec<Nsg>,
    pub asgs: Vec<Asg>,
    pub service_tags: Vec<ServiceTag>,
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    /// Configured cluster ranges (pod and service CIDRs) that belong to `VirtualNetwork`.
    pub virtual_network: Vec<IpNet>,
    /// Node IPs: part of `VirtualNetwork`, and all of `AzureLoadBalancer`.
    pub node_ips: Vec<IpAddr>,
}
