//! The one place the controller calls the pure compilers, turning their output into owned
//! data the reconcile loop can keep between passes.

use std::collections::{BTreeMap, HashMap};

use crate::api::RuleAnomaly;
use crate::model::{ASG_LABEL_PREFIX, NIC_NSG_LABEL, ObjectRef};
use crate::resolve::Resolved;

/// How rules NetworkPolicy cannot express exactly are compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Never allow more than the NSG: an inexpressible allow is narrowed.
    Strict,
    /// Never deny what the NSG allows: an inexpressible allow is widened.
    Permissive,
}

/// One NetworkPolicy the compiler wants, as the JSON object to server-side apply.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPolicy {
    pub namespace: String,
    pub name: String,
    /// The NSG (in the same namespace) that owns it.
    pub nsg: String,
    pub object: serde_json::Value,
}

/// How exactly one rule is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fidelity {
    pub exact: bool,
    /// `Exact`, or why NetworkPolicy cannot express the rule.
    pub text: String,
}

#[derive(Debug, Clone, Default)]
pub struct Output {
    pub policies: Vec<DesiredPolicy>,
    /// Per NSG, per rule name.
    pub fidelity: HashMap<ObjectRef, BTreeMap<String, Fidelity>>,
    pub anomalies: HashMap<ObjectRef, Vec<RuleAnomaly>>,
}

/// Compiles every group. Placeholder until the NetworkPolicy compiler lands: no policies.
pub fn compile(res: &Resolved, mode: Mode) -> Output {
    let _ = (res, mode);
    Output::default()
}

/// The labels the controller maintains on a pod.
pub fn pod_labels(res: &Resolved, pod: usize) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = res
        .memberships(pod)
        .into_iter()
        .map(|a| (format!("{ASG_LABEL_PREFIX}{}", a.name), "true".to_string()))
        .collect();
    if let Some(i) = res.nic_nsg(pod) {
        labels.insert(NIC_NSG_LABEL.to_string(), res.inv.nsgs[i].id.name.clone());
    }
    labels
}
