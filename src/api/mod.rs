//! The custom resources users write, `kubensg.io/v1alpha1`, and their conversion into the
//! pure model (`TryFrom`, never the other way round).

mod convert;
mod types;

pub use convert::{namespace_from_api, pod_from_api, pod_ips};
pub use types::*;

use kube::CustomResourceExt;

/// The length of a value's compact JSON text: what it takes of an object the API server
/// stores.
pub fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, v).expect("serializable to JSON");
    count.0
}

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
