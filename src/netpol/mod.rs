//! Compiles NSG semantics (ordered, allow and deny, two stages) into `networking.k8s.io/v1`
//! NetworkPolicies (unordered, allow-only, additive), exactly wherever NetworkPolicy can say it,
//! and reports, rule by rule, where it cannot.
//!
//! # What is computed
//!
//! For a pod and a direction, the allowed flows of one group are the union over its allow
//! rules of (the rule's match minus the match of every rule before it); the pod's allowed
//! flows are the intersection over its stages (subnet and interface). A flow is a peer (a pod,
//! or an address that is no pod's), a protocol, a destination port and a source port. Rather
//! than subtracting rule matches symbolically, the compiler cuts each dimension into the
//! coarsest pieces every rule treats alike and evaluates the first match once per piece,
//! which is the same set difference computed in a form that cannot blow up:
//!
//! * peers that are pods: pods NetworkPolicy cannot tell apart form a *class* (same
//!   namespace, same ASG membership labels); each class is cut further by address family and
//!   by which rule prefixes contain its addresses;
//! * other addresses: each family is cut into intervals on which every rule's prefixes agree
//!   (node addresses apart);
//! * ports: protocols × source-port cells × destination-port cells, a bit set (`ports.rs`);
//! * the selected pods themselves: the pods one policy selects are a class too (namespace,
//!   bound groups, and memberships in the ASGs their groups' rules name on the pod's side),
//!   cut by family and by which prefixes contain their own addresses.
//!
//! Subtraction thus becomes, in the output: pod groups → `matchExpressions` `Exists` /
//! `DoesNotExist` on the ASG labels (a class not in the result is excluded by a literal);
//! CIDRs → `ipBlock` with `except` (see `peers::ip_blocks`, an exact dynamic programme for the
//! fewest CIDR strings); ports → `port`/`endPort` ranges per protocol.
//!
//! # Selecting pods
//!
//! Policies select pods only through labels the controller maintains ([`pod_labels`]): the
//! ASG membership labels `asg.kubensg.io/<asg>` and `kubensg.io/nic-nsg=<group>`, plus the
//! namespace (`kubernetes.io/metadata.name`). Every policy's `podSelector` names the
//! interface group (or its absence), so a pod's isolation always follows its bindings exactly.
//! A pod bound to no group at either level gets no policy, as in Azure. Pods whose ASG
//! memberships form a combination no pod had at compile time are selected by whichever
//! conjunction they satisfy until the controller, which makes that label change itself,
//! recompiles.
//!
//! Pod IPs are never listed as ipBlocks: pods are selected by labels, so the policies do not
//! change when pods come and go, and whether an ipBlock matches pod IPs (which upstream leaves
//! to the network plugin) never matters: every ipBlock `except`s the addresses of pods that
//! are not allowed at least as much as the rule allows. An address that is no pod's (outside
//! the cluster, a node, or an unused address in a cluster range) is addressed by ipBlock.
//!
//! # Ownership
//!
//! One policy set per combination of (namespace, subnet group, interface group), owned by the
//! interface group when there is one, else by the subnet group: labelled
//! `kubensg.io/nsg=<owner>` and annotated with both groups. Deleting the interface group
//! deletes its policies; the controller removes the pods' `kubensg.io/nic-nsg` label in the
//! same step, which moves them to the subnet group's policies (selected by the label's
//! absence). Deleting the subnet group leaves interface-owned policies whose content the next
//! compilation rewrites in place: a policy's name hashes its namespace and pod selector, not
//! its rules, so a rule change updates the same object. A policy too large to store is cut
//! into parts that allow the same (`split`).
//!
//! # What NetworkPolicy cannot say ([`Reason`])
//!
//! * `IcmpNotExpressible`: NetworkPolicy names TCP, UDP and SCTP ports only. A rule without
//!   `ports` allows every protocol, which network plugins commonly apply to ICMP too (upstream
//!   leaves protocols other than TCP, UDP and SCTP to the plugin); so ICMP is expressed exactly
//!   when a peer is allowed everything, and not otherwise.
//! * `SourcePortsNotExpressible`: NetworkPolicy has no source ports.
//! * `PodAddressedByCidr`: a prefix (CIDR or service tag) covers some but not all addresses of
//!   pods NetworkPolicy cannot tell apart (a class, or the two families of one pod, or the
//!   selected pods' own addresses); expressing it would take ipBlocks over pod IPs.
//! * `NodeTrafficNotBlockable`: traffic between a pod and its own node is always allowed by
//!   NetworkPolicy, so a rule that denies (or does not allow) node addresses cannot be exact.
//!
//! Port 0, which is no valid NetworkPolicy port and carries no TCP or UDP traffic, is ignored.
//! A rule is `Exact` when every flow it decides (as first match of its stage, for any selected
//! pod) gets the NSG's verdict from the policies in both modes. Where a piece is not exact,
//! [`Mode`] decides: `Strict` keeps only what is allowed for every flow of the piece (never
//! more than the NSG), `Permissive` everything allowed for some flow (never less).
//!
//! References to missing ASGs or service tags match nothing (as in the evaluator): the rest
//! compiles and the rule's report lists them in `unresolved`.

mod compile;
mod peers;
mod ports;
mod split;
pub mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::model::{ASG_LABEL_PREFIX, Access, Direction, NIC_NSG_LABEL, ObjectRef};
use crate::resolve::Resolved;

pub use split::{MAX_POLICY_BYTES, split};
pub use types::NetworkPolicy;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "kube-nsg";
/// Label naming the group that owns a generated policy.
pub const NSG_LABEL: &str = "kubensg.io/nsg";
pub const SUBNET_NSG_ANNOTATION: &str = "kubensg.io/subnet-nsg";
pub const NIC_NSG_ANNOTATION: &str = "kubensg.io/nic-nsg";
pub const MODE_ANNOTATION: &str = "kubensg.io/mode";

/// What the policies do with the part of an NSG they cannot express.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Never allow more than the NSG: an inexpressible allow is left out (only the node agent
    /// can restore it).
    #[default]
    Strict,
    /// Never deny what the NSG allows: an inexpressible allow is widened, and the node agent
    /// enforces the exact semantics.
    Permissive,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "strict" => Ok(Mode::Strict),
            "permissive" => Ok(Mode::Permissive),
            _ => Err(format!("{s:?} is not a mode (strict or permissive)")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Strict => "strict",
            Mode::Permissive => "permissive",
        })
    }
}

/// Why a rule's translation is not exact; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Reason {
    IcmpNotExpressible,
    SourcePortsNotExpressible,
    PodAddressedByCidr,
    NodeTrafficNotBlockable,
}

/// Serialized as `"Exact"` or as the list of reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fidelity {
    Exact,
    NotExpressible(Vec<Reason>),
}

impl Fidelity {
    pub fn is_exact(&self) -> bool {
        *self == Fidelity::Exact
    }
}

impl Serialize for Fidelity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Fidelity::Exact => s.serialize_str("Exact"),
            Fidelity::NotExpressible(reasons) => reasons.serialize(s),
        }
    }
}

/// The fidelity of one rule (default rules included) of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleReport {
    pub nsg: ObjectRef,
    pub rule: String,
    pub priority: u32,
    pub direction: Direction,
    pub access: Access,
    pub is_default: bool,
    pub fidelity: Fidelity,
    /// References that name no existing ASG or service tag (`source: asg:ns/name`); they
    /// match nothing, in the policies as in the evaluator.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unresolved: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Compiled {
    /// Sorted by namespace and name.
    pub policies: Vec<NetworkPolicy>,
    /// Every rule of every group, in group order, inbound then outbound, by priority.
    pub report: Vec<RuleReport>,
}

impl Compiled {
    /// The report of a rule, by group, direction and rule name.
    pub fn rule(&self, nsg: &ObjectRef, direction: Direction, rule: &str) -> Option<&RuleReport> {
        self.report
            .iter()
            .find(|r| r.nsg == *nsg && r.direction == direction && r.rule == rule)
    }
}

/// Compiles every group of the inventory. Never fails: what cannot be resolved matches
/// nothing and is reported.
pub fn compile(res: &Resolved, mode: Mode) -> Compiled {
    compile::Compiler::new(res, mode).run()
}

/// `s` if it is a valid label value (or name part of a key), else a shortened form with a
/// hash of `s`, so long object names still fit in 63 characters.
pub fn label_value(s: &str) -> String {
    if s.len() <= 63 {
        return s.to_string();
    }
    let hash: String = Sha256::digest(s.as_bytes())
        .iter()
        .take(5)
        .map(|b| format!("{b:02x}"))
        .collect();
    let head: String = s.chars().take(52).collect();
    format!("{}-{hash}", head.trim_end_matches(['-', '.', '_']))
}

/// The membership label of an ASG (of the pod's own namespace).
pub fn asg_label_key(asg: &str) -> String {
    format!("{ASG_LABEL_PREFIX}{}", label_value(asg))
}

/// Exactly the labels the controller maintains on a pod: one `asg.kubensg.io/<asg>: "true"`
/// per ASG membership and `kubensg.io/nic-nsg: <group>` when an interface-level group is bound.
/// The controller removes any other label with these keys.
pub fn pod_labels(res: &Resolved, pod: usize) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = res
        .memberships(pod)
        .into_iter()
        .map(|a| (asg_label_key(&a.name), "true".to_string()))
        .collect();
    if let Some(nsg) = res.nic_nsg(pod) {
        labels.insert(
            NIC_NSG_LABEL.to_string(),
            label_value(&res.inv.nsgs[nsg].id.name),
        );
    }
    labels
}

/// A pod's labels as the controller leaves them: its own labels, minus any managed key the
/// controller did not grant, plus [`pod_labels`] (what `kube-nsg compile --with-pods` prints).
pub fn labels_with_managed(res: &Resolved, pod: usize) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = res.inv.pods[pod]
        .labels
        .iter()
        .filter(|(k, _)| !is_managed_label(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(pod_labels(res, pod));
    labels
}

/// Whether a label key is one the controller maintains (and so strips when it did not set it).
pub fn is_managed_label(key: &str) -> bool {
    key.starts_with(ASG_LABEL_PREFIX) || key == NIC_NSG_LABEL
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ASG_ANNOTATION, Asg, Inventory, Nsg, Pod};

    #[test]
    fn long_names_become_valid_label_values() {
        assert_eq!(label_value("web"), "web");
        let long = "a".repeat(70) + ".example";
        let v = label_value(&long);
        assert!(v.len() <= 63 && v.chars().last().unwrap().is_ascii_alphanumeric());
        assert_ne!(label_value(&(long.clone() + "x")), v);
        assert_eq!(asg_label_key("web"), "asg.kubensg.io/web");
    }

    #[test]
    fn managed_labels_replace_what_the_controller_did_not_grant() {
        let pod = Pod {
            id: ObjectRef::new("a", "p"),
            labels: BTreeMap::from([
                ("app".to_string(), "web".to_string()),
                ("asg.kubensg.io/db".to_string(), "true".to_string()),
                ("kubensg.io/nic-nsg".to_string(), "forged".to_string()),
            ]),
            annotations: BTreeMap::from([(ASG_ANNOTATION.to_string(), "web".to_string())]),
            ips: vec![],
            node_name: None,
        };
        let inv = Inventory {
            asgs: vec![Asg {
                id: ObjectRef::new("a", "web"),
                pod_selector: None,
            }],
            nsgs: vec![Nsg {
                id: ObjectRef::new("a", "g"),
                created: None,
                generation: None,
                subnet: true,
                pod_selector: None,
                rules: vec![],
            }],
            pods: vec![pod],
            ..Inventory::default()
        };
        let res = Resolved::new(&inv);
        assert_eq!(
            labels_with_managed(&res, 0),
            BTreeMap::from([
                ("app".to_string(), "web".to_string()),
                ("asg.kubensg.io/web".to_string(), "true".to_string()),
            ])
        );
    }
}
