//! The one place the controller calls the pure compilers, turning their output into owned
//! data the reconcile loop keeps between passes (compiling is skipped while the inventory
//! does not change).

use std::collections::{BTreeMap, HashMap};

use super::digest::Digest;
use crate::api::RuleAnomaly;
use crate::model::ObjectRef;
use crate::netpol::{self, Fidelity as NpFidelity};
use crate::resolve::Resolved;

pub use crate::netpol::Mode;

/// One NetworkPolicy the compiler wants.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPolicy {
    pub namespace: String,
    pub name: String,
    /// The NSG (in the same namespace) that owns it: the interface-level group of the pods
    /// it selects when they have one, else the subnet-level group.
    pub nsg: String,
    pub policy: netpol::NetworkPolicy,
    /// Digest of the normalised spec, to compare with what the API server holds.
    pub spec: Digest,
}

impl DesiredPolicy {
    pub fn new(policy: netpol::NetworkPolicy, nsg: String) -> Self {
        let spec = serde_json::to_value(&policy.spec).expect("NetworkPolicies serialize");
        DesiredPolicy {
            namespace: policy.metadata.namespace.clone(),
            name: policy.metadata.name.clone(),
            nsg,
            spec: super::policy::spec_digest(&spec),
            policy,
        }
    }
}

/// How exactly one rule is enforced by NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fidelity {
    pub exact: bool,
    /// `Exact`, or the reasons NetworkPolicy cannot express the rule.
    pub text: String,
}

#[derive(Debug, Clone, Default)]
pub struct Output {
    pub policies: Vec<DesiredPolicy>,
    /// Per NSG, per rule name (default rules included).
    pub fidelity: HashMap<ObjectRef, BTreeMap<String, Fidelity>>,
    pub anomalies: HashMap<ObjectRef, Vec<RuleAnomaly>>,
}

fn fidelity(f: &NpFidelity) -> Fidelity {
    match f {
        NpFidelity::Exact => Fidelity {
            exact: true,
            text: "Exact".into(),
        },
        NpFidelity::NotExpressible(reasons) => Fidelity {
            exact: false,
            text: reasons
                .iter()
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
                .join(", "),
        },
    }
}

/// Compiles every group.
pub fn compile(res: &Resolved, mode: Mode) -> Output {
    let compiled = netpol::compile(res, mode);
    let mut out = Output::default();
    for np in compiled.policies {
        let annotations = &np.metadata.annotations;
        let owner = annotations
            .get(netpol::NIC_NSG_ANNOTATION)
            .or_else(|| annotations.get(netpol::SUBNET_NSG_ANNOTATION))
            .or_else(|| np.metadata.labels.get(netpol::NSG_LABEL))
            .cloned()
            .unwrap_or_default();
        out.policies.push(DesiredPolicy::new(np, owner));
    }
    for report in compiled.report {
        out.fidelity
            .entry(report.nsg)
            .or_default()
            .insert(report.rule, fidelity(&report.fidelity));
    }
    out
}

/// Exactly the labels the controller maintains on a pod.
pub fn pod_labels(res: &Resolved, pod: usize) -> BTreeMap<String, String> {
    netpol::pod_labels(res, pod)
}
