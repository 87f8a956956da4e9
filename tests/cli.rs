//! The offline CLI as a user runs it: the real binary, real files, exit codes and output.

use std::process::{Command, Output};

fn kube_nsg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kube-nsg"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const VERIFY_DB: &[&str] = &[
    "verify",
    "-f",
    "examples/three-tier",
    "--pod",
    "three-tier/db1",
    "--direction",
    "Inbound",
    "--protocol",
    "Tcp",
    "--local-port",
    "1433",
    "--remote-port",
    "40000",
];

#[test]
fn verify_names_the_deciding_rule_as_json() {
    let mut args = VERIFY_DB.to_vec();
    args.extend(["--remote-ip", "10.244.1.11", "-o", "json"]);
    let out = kube_nsg(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["access"], "Deny");
    assert_eq!(
        v["rule"],
        serde_json::json!({"nsg": "three-tier/nsg1", "name": "Deny-Database-All", "priority": 120})
    );
    assert_eq!(v["stages"][0]["level"], "Subnet");
    assert_eq!(v["stages"][0]["nsg"], "three-tier/nsg1");
}

#[test]
fn verify_text_is_a_sentence_and_the_stages() {
    let mut args = VERIFY_DB.to_vec();
    args.extend(["--remote-ip", "10.244.1.21"]);
    let out = stdout(&kube_nsg(&args));
    assert!(out.starts_with("Allow: "), "{out}");
    assert!(
        out.contains(
            "allowed by rule Allow-Database-BusinessLogic (priority 110) of three-tier/nsg1"
        ),
        "{out}"
    );
    assert!(out.contains("stage 1: Subnet three-tier/nsg1"), "{out}");
}

#[test]
fn verify_without_any_group_says_so_and_rule_is_null() {
    let out = kube_nsg(&[
        "verify",
        "-f",
        "examples/subnet-and-nic",
        "--pod",
        "subnet3/vm4",
        "--direction",
        "outbound",
        "--protocol",
        "icmp",
        "--remote-ip",
        "198.18.0.9",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["access"], "Allow");
    assert!(v["rule"].is_null());
    assert_eq!(v["stages"], serde_json::json!([]));
}

#[test]
fn verify_requires_ports_for_tcp_and_refuses_them_for_icmp() {
    let out = kube_nsg(&[
        "verify",
        "-f",
        "examples/three-tier",
        "--pod",
        "three-tier/web1",
        "--direction",
        "Inbound",
        "--protocol",
        "Tcp",
        "--remote-ip",
        "198.18.0.9",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--local-port and --remote-port"),
        "{}",
        stderr(&out)
    );
    let out = kube_nsg(&[
        "verify",
        "-f",
        "examples/three-tier",
        "--pod",
        "three-tier/web1",
        "--direction",
        "Inbound",
        "--protocol",
        "Icmp",
        "--remote-ip",
        "198.18.0.9",
        "--local-port",
        "80",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Icmp has no ports"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn effective_lists_defaults_and_expansions() {
    let out = kube_nsg(&[
        "effective",
        "-f",
        "examples/three-tier",
        "--pod",
        "three-tier/web1",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stages: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let inbound = &stages[0];
    assert_eq!(inbound["direction"], "Inbound");
    let names: Vec<&str> = inbound["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "Allow-HTTP-Inbound-Internet",
            "Allow-Database-BusinessLogic",
            "Deny-Database-All",
            "AllowVNetInBound",
            "AllowAzureLoadBalancerInBound",
            "DenyAllInbound"
        ]
    );
    assert_eq!(
        inbound["rules"][0]["destinationExpansion"]["pods"],
        serde_json::json!(["three-tier/web1", "three-tier/web2"])
    );
    let table = stdout(&kube_nsg(&[
        "effective",
        "-f",
        "examples/three-tier",
        "--pod",
        "three-tier/web1",
    ]));
    assert!(table.contains("PRIORITY  NAME"), "{table}");
}

#[test]
fn invalid_objects_are_all_reported_with_file_object_rule_and_field() {
    let out = kube_nsg(&[
        "verify",
        "-f",
        "tests/testdata/invalid-nsg.yaml",
        "--pod",
        "three-tier/web1",
        "--direction",
        "Inbound",
        "--protocol",
        "Icmp",
        "--remote-ip",
        "198.18.0.9",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    for expected in [
        "tests/testdata/invalid-nsg.yaml: NetworkSecurityGroup three-tier/broken rule \"reversed-ports\": spec.securityRules[0].destinationPortRange: range \"90-80\" is reversed",
        "rule \"bad-cidr\": spec.securityRules[1].sourceAddressPrefix: \"10.0.0.1/8\" has host bits set",
        "rule \"bad-cidr\": spec.securityRules[1].priority: Inbound 200 is already used by rule \"reversed-ports\"",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn unreadable_input_fails_cleanly() {
    let out = kube_nsg(&["effective", "-f", "no/such/file.yaml", "--pod", "a/b"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no/such/file.yaml"),
        "{}",
        stderr(&out)
    );
    let dir = std::env::temp_dir().join(format!("kube-nsg-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: NetworkSecurityGroup\nmetadata: {name: x}\nspec: {securityRules: 7}\n",
    )
    .unwrap();
    let out = kube_nsg(&["effective", "-f", bad.to_str().unwrap(), "--pod", "a/b"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("document 1: NetworkSecurityGroup x"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn import_azure_prints_objects_and_reports_what_it_could_not_convert() {
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/corpus/azure-nsg");
    assert!(
        std::path::Path::new(corpus).is_dir(),
        "the Azure corpus is missing at {corpus}"
    );
    let out = kube_nsg(&[
        "import",
        "azure",
        &format!("{corpus}/05-aml-secure-regional-tags.json"),
        "-n",
        "ml",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let yaml = stdout(&out);
    assert!(
        yaml.contains("kind: NetworkSecurityGroup") && yaml.contains("namespace: ml"),
        "{yaml}"
    );
    // The regional tags are template expressions: skipped and said so, never dropped silently.
    assert!(stderr(&out).contains("Storage.{0}"), "{}", stderr(&out));
    assert!(yaml.contains("# Issues"), "{yaml}");
    let bad = kube_nsg(&["import", "azure", "README.md", "-n", "x"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("README.md"), "{}", stderr(&bad));
}

#[test]
fn compile_prints_policies_pods_and_the_fidelity_report() {
    let out = kube_nsg(&[
        "compile",
        "-f",
        "examples/three-tier",
        "--to",
        "networkpolicy",
        "--with-pods",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&stdout(&out))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert!(docs.iter().any(|d| d["kind"] == "NetworkPolicy"));
    let db1 = docs
        .iter()
        .find(|d| d["kind"] == "Pod" && d["metadata"]["name"] == "db1")
        .unwrap();
    assert_eq!(db1["metadata"]["labels"]["asg.kubensg.io/asgdb"], "true");
    let report = kube_nsg(&["compile", "-f", "examples/three-tier", "--report", "json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&report)).unwrap();
    let http = report
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "Allow-HTTP-Inbound-Internet")
        .unwrap();
    assert_eq!(http["fidelity"], "Exact");
}

#[test]
fn analyze_reports_anomalies_with_an_example_flow() {
    let out = kube_nsg(&["analyze", "-f", "examples/three-tier", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let anomalies: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let correlated = anomalies
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "Correlated" && a["rule"] == "AllowVNetInBound")
        .expect("AllowVNetInBound overlaps the database deny before it, whose order decides");
    assert_eq!(
        correlated["related"],
        serde_json::json!(["Deny-Database-All"])
    );
    assert!(correlated["example"].is_object());
}
