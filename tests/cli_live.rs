//! `kube-nsg verify` and `effective` without `-f`: the same answers, read from a real API server.

mod support;

use std::process::Command;

use support::{TestNamespace, apply_ok, cluster, create_pod};

fn kube_nsg(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-nsg"))
        .args(args)
        .env("KUBECONFIG", support::kubeconfig())
        .output()
        .expect("the binary runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn verify_and_effective_read_the_cluster_without_files() {
    cluster();
    let ns = TestNamespace::new("cli-live");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/three-tier/nsg.yaml"
    ))
    .unwrap()
        + "---\n"
        + &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/three-tier/asgs.yaml"
        ))
        .unwrap();
    apply_ok(&example.replace("namespace: three-tier", &format!("namespace: {}", ns.name)));
    // Addresses no other test uses, so the remote IP names exactly this pod.
    create_pod(&ns.name, "web1", &[("tier", "web")], &[], "10.244.201.11");
    create_pod(
        &ns.name,
        "db1",
        &[("tier", "db")],
        &[("kubensg.io/application-security-groups", "asgdb")],
        "10.244.201.31",
    );

    let db1 = format!("{}/db1", ns.name);
    let (ok, out, err) = kube_nsg(&[
        "verify",
        "--pod",
        &db1,
        "--direction",
        "Inbound",
        "--protocol",
        "Tcp",
        "--remote-ip",
        "10.244.201.11",
        "--local-port",
        "1433",
        "--remote-port",
        "40000",
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["access"], "Deny", "{out}");
    assert_eq!(v["rule"]["name"], "Deny-Database-All", "{out}");
    assert_eq!(v["rule"]["nsg"], format!("{}/nsg1", ns.name));

    let (ok, out, err) = kube_nsg(&["effective", "--pod", &db1, "-o", "json"]);
    assert!(ok, "{err}");
    let stages: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        stages[0]["rules"][2]["destinationExpansion"]["pods"],
        serde_json::json!([db1])
    );
    // Live mode counts each rule's hits (no agent programs these pods: zero).
    assert!(stages[0]["rules"][2]["hits"].is_u64(), "{out}");
}
