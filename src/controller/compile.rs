//! The one place the controller calls the pure compilers, turning their output into owned
//! data the reconcile loop keeps between passes (compiling is skipped while the inventory
//! does not change, and a group's analysis while its input does not).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::digest::{self, Digest};
use crate::analyze::{self, AnomalyKind};
use crate::api::RuleAnomaly;
use crate::model::ObjectRef;
use crate::netpol::{self, Fidelity as NpFidelity};
use crate::resolve::Resolved;

pub use crate::netpol::Mode;

/// One NetworkPolicy the compiler wants. Kept between passes (compiling is skipped while
/// the inventory does not change), so the spec is kept as JSON text, a fraction of the
/// structured policy's size, for the rare pass that applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPolicy {
    pub namespace: String,
    pub name: String,
    /// The NSG (in the same namespace) that owns it: the interface-level group of the pods
    /// it selects when they have one, else the subnet-level group.
    pub nsg: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    spec_json: Box<str>,
    /// Digest of the normalised spec, to compare with what the API server holds.
    pub spec: Digest,
}

impl DesiredPolicy {
    pub fn new(policy: netpol::NetworkPolicy, nsg: String) -> Self {
        let spec = serde_json::to_value(&policy.spec).expect("NetworkPolicies serialize");
        let meta = policy.metadata;
        DesiredPolicy {
            namespace: meta.namespace,
            name: meta.name,
            nsg,
            labels: meta.labels,
            annotations: meta.annotations,
            spec_json: spec.to_string().into(),
            spec: super::policy::spec_digest(&spec),
        }
    }

    /// The spec, as the compiler made it.
    pub fn spec_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.spec_json).expect("the JSON text of a spec")
    }
}

/// How exactly one rule is enforced by NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fidelity {
    pub exact: bool,
    /// `Exact`, or the reasons NetworkPolicy cannot express the rule: few distinct texts,
    /// shared by every rule that has them.
    pub text: Arc<str>,
}

#[derive(Debug, Clone, Default)]
pub struct Output {
    pub policies: Vec<DesiredPolicy>,
    /// Per NSG, per rule name (default rules included).
    pub fidelity: HashMap<ObjectRef, BTreeMap<String, Fidelity>>,
    pub anomalies: HashMap<ObjectRef, Vec<RuleAnomaly>>,
}

fn fidelity(f: &NpFidelity, texts: &mut HashMap<String, Arc<str>>) -> Fidelity {
    let text = match f {
        NpFidelity::Exact => "Exact".to_string(),
        NpFidelity::NotExpressible(reasons) => reasons
            .iter()
            .map(|r| format!("{r:?}"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    Fidelity {
        exact: matches!(f, NpFidelity::Exact),
        text: texts
            .entry(text)
            .or_insert_with_key(|t| t.as_str().into())
            .clone(),
    }
}

/// How many anomalies a group's status lists (in rule order); the last one says how many
/// more there are.
pub const MAX_ANOMALIES: usize = 20;

/// An anomaly as the status shows it. The analyzer's example flow is left out: it names pod
/// addresses, and a status that changed with them would be rewritten on pod churn (the CLI's
/// `analyze` shows it).
fn anomaly(a: &analyze::Anomaly) -> RuleAnomaly {
    let rule = format!("{} rule {:?} ({})", a.direction, a.rule, a.priority);
    let related = a.related.join(", ");
    let message = match a.kind {
        AnomalyKind::Shadowed if a.related.is_empty() => {
            format!("{rule} matches nothing, so it never decides")
        }
        AnomalyKind::Shadowed => {
            format!("{rule} never decides: earlier rules ({related}) decide everything it matches")
        }
        AnomalyKind::Redundant => format!(
            "{rule} is redundant: without it, later rules ({related}) would decide its flows alike"
        ),
        AnomalyKind::Correlated => format!(
            "{rule} overlaps the earlier rule {related} with the opposite access; their order decides the flows both match"
        ),
    };
    RuleAnomaly {
        kind: format!("{:?}", a.kind),
        rules: std::iter::once(a.rule.clone())
            .chain(a.related.iter().cloned())
            .collect(),
        message,
    }
}

/// The status anomalies of the last compile by the digest of each group's analysis input
/// ([`analyze::Input`]): a group whose rules and matched addresses did not change since (most
/// groups, when a pod comes or goes) is not analysed again.
#[derive(Debug, Default)]
pub struct Analyses(HashMap<Digest, Vec<RuleAnomaly>>);

/// What a group's status lists of its anomalies: the first [`MAX_ANOMALIES`], the last of them
/// saying how many more there are.
fn status_anomalies(found: &[analyze::Anomaly]) -> Vec<RuleAnomaly> {
    let mut anomalies: Vec<RuleAnomaly> = found.iter().take(MAX_ANOMALIES).map(anomaly).collect();
    if let Some(last) = anomalies.last_mut()
        && found.len() > MAX_ANOMALIES
    {
        last.message.push_str(&format!(
            " ({} more anomalies: `kube-nsg analyze` lists them all)",
            found.len() - MAX_ANOMALIES
        ));
    }
    anomalies
}

/// Compiles every group and analyses its rules (again only where their input changed since
/// the compile that filled `analyses`).
pub fn compile(res: &Resolved, mode: Mode, analyses: &mut Analyses) -> Output {
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
    let mut current = HashMap::with_capacity(res.inv.nsgs.len());
    for (i, nsg) in res.inv.nsgs.iter().enumerate() {
        let input = analyze::Input::of(res, i);
        let key = digest::of_hash(&input);
        let anomalies = analyses
            .0
            .remove(&key)
            .unwrap_or_else(|| status_anomalies(&input.analyze()));
        if !anomalies.is_empty() {
            out.anomalies.insert(nsg.id.clone(), anomalies.clone());
        }
        current.insert(key, anomalies);
    }
    analyses.0 = current;
    let mut texts = HashMap::new();
    for report in compiled.report {
        out.fidelity
            .entry(report.nsg)
            .or_default()
            .insert(report.rule, fidelity(&report.fidelity, &mut texts));
    }
    out
}

/// Exactly the labels the controller maintains on a pod.
pub fn pod_labels(res: &Resolved, pod: usize) -> BTreeMap<String, String> {
    netpol::pod_labels(res, pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Inventory;

    fn three_tier() -> Inventory {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/three-tier");
        crate::cli::load::Objects::read(&[dir.into()])
            .unwrap()
            .into_inventory(&["10.244.0.0/16".parse().unwrap()], &[])
            .unwrap()
    }

    #[test]
    fn kept_analyses_give_what_analysing_again_gives() {
        let with_web = three_tier();
        let mut without_web = with_web.clone();
        for pod in &mut without_web.pods {
            if pod.labels.get("tier").is_some_and(|t| t == "web") {
                pod.labels.insert("tier".into(), "gone".into());
            }
        }
        let mut analyses = Analyses::default();
        let mut seen = Vec::new();
        for inv in [&with_web, &without_web, &without_web, &with_web] {
            let res = Resolved::new(inv);
            let kept = compile(&res, Mode::Strict, &mut analyses).anomalies;
            let fresh = compile(&res, Mode::Strict, &mut Analyses::default()).anomalies;
            assert_eq!(kept, fresh);
            assert_eq!(analyses.0.len(), inv.nsgs.len());
            seen.push(kept);
        }
        // The change of members changed the anomalies: nothing stale was kept.
        assert_ne!(seen[0], seen[1]);
    }
}
