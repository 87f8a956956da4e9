//! The committed CRDs are exactly what the Rust types generate (`make generate` rewrites them).

#[test]
fn committed_crds_match_the_types() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/kube-nsg.yaml"))
            .expect("crds/kube-nsg.yaml exists");
    assert!(
        committed == kube_nsg::api::crds_yaml(),
        "crds/kube-nsg.yaml is stale: run `make generate`"
    );
}
