//! The custom resources users write, `kubensg.io/v1alpha1`, and their conversion into the
//! pure model (`TryFrom`, never the other way round).

mod convert;
mod types;

pub use convert::{namespace_from_api, pod_from_api, pod_ips};
pub use types::*;

use kube::CustomResourceExt;

/// The CRDs as multi-document YAML, in a fixed order: what `kube-nsg crds` prints and
/// `crds/` holds.
pub fn crds_yaml() -> String {
    [
        NetworkSecurityGroup::crd(),
        ApplicationSecurityGroup::crd(),
        ServiceTag::crd(),
    ]
    .iter()
    .map(|crd| serde_yaml_ng::to_string(crd).expect("CRDs serialize"))
    .collect::<Vec<_>>()
    .join("---\n")
}
