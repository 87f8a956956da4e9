//! The controller against a real control plane (tests/cluster: etcd, kube-apiserver,
//! kube-controller-manager): CEL admission, pod labels, NetworkPolicies (applied, restored,
//! garbage-collected, never taken from someone else), status, Events, restart without
//! writes, and leader election between two replicas.
//!
//! Every test uses namespaces of its own; tests that run a controller hold `serial()`, since a
//! controller watches the whole cluster. They fail (never skip) when the control plane cannot
//! be started.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(60);

fn nsg(ns: &str, name: &str, association: &str, rules: &[&str]) -> String {
    let rules: String = rules.iter().map(|r| format!("    - {r}\n")).collect();
    format!(
        "apiVersion: kubensg.io/v1alpha1\nkind: NetworkSecurityGroup\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
         spec:\n  {association}\n  securityRules:\n{rules}"
    )
}

fn asg(ns: &str, name: &str, selector: &str) -> String {
    format!(
        "apiVersion: kubensg.io/v1alpha1\nkind: ApplicationSecurityGroup\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
         spec:\n  podSelector: {selector}\n"
    )
}

const ALLOW_WEB: &str = "{name: allow-web, priority: 100, direction: Inbound, access: Allow, protocol: Tcp, \
    sourceAddressPrefix: Internet, destinationApplicationSecurityGroups: [{name: web}], destinationPortRange: '80'}";
const DENY_DB: &str = "{name: deny-db, priority: 200, direction: Inbound, access: Deny, protocol: '*', \
    sourceAddressPrefix: '*', destinationApplicationSecurityGroups: [{name: db}], destinationPortRange: '1433'}";
const ALLOW_OUT_DNS: &str = "{name: allow-dns, priority: 100, direction: Outbound, access: Allow, protocol: Udp, \
    sourceAddressPrefix: '*', destinationAddressPrefix: 10.96.0.10, destinationPortRange: '53'}";

fn label<'a>(labels: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    labels.get(key).and_then(Value::as_str)
}

/// The managed NetworkPolicies of a namespace as (name → object).
fn policies(ns: &str) -> BTreeMap<String, Value> {
    let list = get_json(&["networkpolicies", "-n", ns]).unwrap_or_default();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p.clone(),
            )
        })
        .collect()
}

fn events(ns: &str, reason: &str) -> Vec<Value> {
    let list = get_json(&["events.events.k8s.io", "-n", ns]).unwrap_or_default();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == reason)
        .cloned()
        .collect()
}

/// An example applied into namespaces of this test's own (the examples' fixed namespace
/// names would collide with other runs sharing the control plane).
struct Example {
    namespaces: BTreeMap<String, TestNamespace>,
}

impl Example {
    /// The namespace the example's namespace `name` was renamed to.
    fn ns(&self, name: &str) -> &str {
        &self.namespaces[name].name
    }
}

/// Applies an example directory, renaming its namespaces, and plays the kubelet for its
/// pods: the status the YAML carries (dropped on create) is patched in through the status
/// subresource.
fn apply_example(dir: &str) -> Example {
    let path = format!("{REPO}/examples/{dir}");
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut docs: Vec<Value> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    let mut namespaces = BTreeMap::new();
    for v in docs.iter().filter(|v| v["kind"] == "Namespace") {
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        namespaces.insert(name.clone(), TestNamespace::new(&name));
    }
    let rename = |ns: &Value| -> Value { namespaces[ns.as_str().unwrap()].name.clone().into() };
    let mut objects = Vec::new();
    for mut v in docs.into_iter().filter(|v| v["kind"] != "Namespace") {
        v["metadata"]["namespace"] = rename(&v["metadata"]["namespace"]);
        for rule in v
            .pointer_mut("/spec/securityRules")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            for side in [
                "sourceApplicationSecurityGroups",
                "destinationApplicationSecurityGroups",
            ] {
                for asg in rule[side].as_array_mut().into_iter().flatten() {
                    if asg.get("namespace").is_some() {
                        asg["namespace"] = rename(&asg["namespace"]);
                    }
                }
            }
        }
        objects.push(v);
    }
    let yaml: Vec<String> = objects
        .iter()
        .map(|v| serde_yaml_ng::to_string(v).unwrap())
        .collect();
    apply_ok(&yaml.join("---\n"));
    for v in objects.iter().filter(|v| v["kind"] == "Pod") {
        let ip = v
            .pointer("/status/podIP")
            .and_then(Value::as_str)
            .expect("example pods carry an IP");
        set_pod_ip(
            v["metadata"]["namespace"].as_str().unwrap(),
            v["metadata"]["name"].as_str().unwrap(),
            ip,
        );
    }
    Example { namespaces }
}

#[test]
fn cel_rejects_invalid_groups_at_apply_with_clear_messages() {
    cluster();
    let rule = |extra: &str| {
        format!(
            "{{name: r, priority: 100, direction: Inbound, access: Allow, protocol: Tcp, sourceAddressPrefix: '*', destinationAddressPrefix: '*'{extra}}}"
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "priority 99",
            nsg(
                "default",
                "bad-priority",
                "subnet: true",
                &[
                    "{name: r, priority: 99, direction: Inbound, access: Allow, protocol: Tcp, sourceAddressPrefix: '*', destinationAddressPrefix: '*'}",
                ],
            ),
            "spec.securityRules[0].priority in body should be greater than or equal to 100",
        ),
        (
            "duplicate priority",
            nsg(
                "default",
                "bad-dup-priority",
                "subnet: true",
                &[
                    &rule(""),
                    "{name: s, priority: 100, direction: Inbound, access: Deny, protocol: Udp, sourceAddressPrefix: '*', destinationAddressPrefix: '*'}",
                ],
            ),
            "spec.securityRules: Invalid value: rules \"r\" and \"s\" have the same Inbound priority; priorities must be unique per direction",
        ),
        (
            "duplicate outbound priority",
            nsg(
                "default",
                "bad-dup-out-priority",
                "subnet: true",
                &[
                    "{name: o1, priority: 300, direction: Outbound, access: Allow, protocol: Tcp, sourceAddressPrefix: '*', destinationAddressPrefix: '*'}",
                    &rule(""),
                    "{name: o2, priority: 300, direction: Outbound, access: Deny, protocol: Udp, sourceAddressPrefix: '*', destinationAddressPrefix: '*'}",
                ],
            ),
            "spec.securityRules: Invalid value: rules \"o1\" and \"o2\" have the same Outbound priority; priorities must be unique per direction",
        ),
        (
            "bad CIDR",
            nsg(
                "default",
                "bad-cidr",
                "subnet: true",
                &[
                    "{name: r, priority: 100, direction: Inbound, access: Allow, protocol: Tcp, sourceAddressPrefix: 10.0.0.0/33, destinationAddressPrefix: '*'}",
                ],
            ),
            "spec.securityRules[0].sourceAddressPrefix: Invalid value: \"10.0.0.0/33\": address prefixes must be '*', 'Any', an IP address, a CIDR block without host bits",
        ),
        (
            "host bits",
            nsg(
                "default",
                "bad-host-bits",
                "subnet: true",
                &[
                    "{name: r, priority: 100, direction: Inbound, access: Allow, protocol: Tcp, sourceAddressPrefix: '*', destinationAddressPrefix: 10.1.2.3/8}",
                ],
            ),
            "spec.securityRules[0].destinationAddressPrefix: Invalid value: \"10.1.2.3/8\": address prefixes must be",
        ),
        (
            "octet out of range in a prefix list",
            nsg(
                "default",
                "bad-octet",
                "subnet: true",
                &[
                    "{name: r, priority: 100, direction: Inbound, access: Allow, protocol: Tcp, sourceAddressPrefixes: [10.0.0.0/8, 10.0.0.300], destinationAddressPrefix: '*'}",
                ],
            ),
            "spec.securityRules[0].sourceAddressPrefixes[1]: Invalid value: \"10.0.0.300\"",
        ),
        (
            "reversed port range",
            nsg(
                "default",
                "bad-ports",
                "subnet: true",
                &[&rule(", destinationPortRange: '90-80'")],
            ),
            "spec.securityRules[0].destinationPortRange: Invalid value: \"90-80\": port ranges must be '*', a port N or a range N-M with N <= M <= 65535",
        ),
        (
            "reversed range in a port list",
            nsg(
                "default",
                "bad-port-list",
                "subnet: true",
                &[&rule(", destinationPortRanges: ['80', '90-80']")],
            ),
            "spec.securityRules[0].destinationPortRanges: Invalid value: \"90-80\": port ranges must be '*', a port N or a range N-M with N <= M <= 65535",
        ),
        (
            "ASG reference that is not an object name",
            nsg(
                "default",
                "bad-asg-ref",
                "subnet: true",
                &[
                    "{name: r, priority: 100, direction: Inbound, access: Allow, protocol: Tcp, sourceApplicationSecurityGroups: [{name: Web_Tier}], destinationAddressPrefix: '*'}",
                ],
            ),
            "spec.securityRules[0].sourceApplicationSecurityGroups[0].name: Invalid value: \"Web_Tier\"",
        ),
        (
            "service tag prefix with host bits",
            "apiVersion: kubensg.io/v1alpha1\nkind: ServiceTag\nmetadata: {name: bad-tag}\n\
             spec: {addressPrefixes: [10.0.0.0/8, 10.0.0.1/8]}\n"
                .to_string(),
            "spec.addressPrefixes: Invalid value: \"10.0.0.1/8\": each prefix must be an IP address or a CIDR block without host bits",
        ),
        (
            "duplicate rule name",
            nsg(
                "default",
                "bad-names",
                "subnet: true",
                &[
                    &rule(""),
                    "{name: r, priority: 200, direction: Inbound, access: Deny, protocol: Udp, sourceAddressPrefix: '*', destinationAddressPrefix: '*'}",
                ],
            ),
            "spec.securityRules[1]: Duplicate value: {\"name\":\"r\"}",
        ),
        (
            "ICMP with ports",
            nsg(
                "default",
                "bad-icmp",
                "subnet: true",
                &[
                    "{name: r, priority: 100, direction: Inbound, access: Allow, protocol: Icmp, sourceAddressPrefix: '*', destinationAddressPrefix: '*', destinationPortRange: '80'}",
                ],
            ),
            "Icmp has no ports: port ranges must be '*'",
        ),
    ];
    for (what, yaml, message) in cases {
        let err = apply(&yaml).expect_err(&format!("{what}: the API server accepted\n{yaml}"));
        assert!(
            err.contains(message),
            "{what}: expected {message:?} in\n{err}"
        );
    }

    // The priority check is ratcheted (not re-run while the rules do not change); an update
    // that introduces a duplicate is still rejected.
    let ns = TestNamespace::new("cel");
    apply_ok(&nsg(&ns.name, "valid", "subnet: true", &[&rule("")]));
    let dup = nsg(
        &ns.name,
        "valid",
        "subnet: true",
        &[
            &rule(""),
            "{name: s, priority: 100, direction: Inbound, access: Deny, protocol: Udp, sourceAddressPrefix: '*', destinationAddressPrefix: '*'}",
        ],
    );
    let err = apply(&dup).expect_err("an update with a duplicate priority was accepted");
    assert!(
        err.contains("priorities must be unique per direction"),
        "{err}"
    );

    // The largest group the schema allows stays within CEL's run-time cost limit, created and
    // changed (the API server stops an expression at run time, past what it estimated at
    // CRD install); one rule more is refused by the schema.
    let max = kube_nsg::model::RuleLimits::RULES_PER_GROUP;
    let largest = |count: usize, port: u32| {
        let rules: Vec<String> = (0..count)
            .map(|i| format!(
                "{{name: r{i}, priority: {}, direction: Inbound, access: Allow, protocol: Tcp, \
                 sourceAddressPrefix: '*', destinationAddressPrefix: '*', destinationPortRange: '{}'}}",
                100 + i,
                port + i as u32
            ))
            .collect();
        let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
        nsg(&ns.name, "largest", "subnet: false", &rules)
    };
    apply_ok(&largest(max, 1000));
    apply_ok(&largest(max, 2000));
    // Naming the two rules costs as much as the check: past 500 rules the message does not.
    let dup = largest(max, 1000).replacen("priority: 101,", "priority: 100,", 1);
    let err = apply(&dup).expect_err("the largest group with a duplicate priority was accepted");
    assert!(
        err.contains("Invalid value: two rules of the same direction have the same priority"),
        "{err}"
    );
    let err = apply(&largest(max + 1, 1000)).expect_err("a group over the rule limit was accepted");
    assert!(
        err.contains(&format!("must have at most {max} items")),
        "{err}"
    );
}

#[test]
fn three_tier_example_gets_labels_policies_and_status() {
    cluster();
    let _serial = serial();
    let example = apply_example("three-tier");
    let tt = example.ns("three-tier");
    let ctl = Controller::start("three-tier", &[]);

    // The CRDs' category: one `kubectl get` lists the kinds together.
    let mut listed: Vec<String> = kubectl_ok(&["get", "kubensg", "-n", tt, "-o", "name"])
        .lines()
        .map(String::from)
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "applicationsecuritygroup.kubensg.io/asgdb",
            "applicationsecuritygroup.kubensg.io/asglogic",
            "applicationsecuritygroup.kubensg.io/asgweb",
            "networksecuritygroup.kubensg.io/nsg1",
        ]
    );

    let nsg1 = eventually("nsg1 Ready", T, || nsg_ready(tt, "nsg1"));
    for (pod, asg) in [
        ("web1", "asgweb"),
        ("web2", "asgweb"),
        ("logic1", "asglogic"),
        ("db1", "asgdb"),
    ] {
        let labels = eventually(&format!("{pod} labelled"), T, || {
            let l = pod_labels(tt, pod);
            l.contains_key(&format!("asg.kubensg.io/{asg}"))
                .then_some(l)
        });
        let ours: Vec<&String> = labels
            .keys()
            .filter(|k| k.starts_with("asg.kubensg.io/"))
            .collect();
        assert_eq!(
            ours,
            vec![&format!("asg.kubensg.io/{asg}")],
            "{pod}: exactly its own membership"
        );
        assert_eq!(
            label(&labels, &format!("asg.kubensg.io/{asg}")),
            Some("true")
        );
        assert!(
            !labels.contains_key("kubensg.io/nic-nsg"),
            "{pod}: no interface-level group"
        );
    }

    // Status: conditions, associated pods, effective rules with defaults and expansions.
    let status = &nsg1["status"];
    assert_eq!(status["associatedPods"], 4);
    for (t, s) in [
        ("Accepted", "True"),
        ("ResolvedRefs", "True"),
        ("Conflict", "False"),
        ("NetworkPoliciesProgrammed", "True"),
        ("Ready", "True"),
    ] {
        assert_eq!(
            condition(&nsg1, t).map(|c| c["status"].clone()),
            Some(Value::from(s)),
            "{t}"
        );
    }
    let rules = status["effectiveRules"]
        .as_array()
        .expect("effective rules");
    assert_eq!(rules.len(), 3 + 6, "three rules and the six defaults");
    assert_eq!(rules.iter().filter(|r| r["default"] == true).count(), 6);
    let http = rules
        .iter()
        .find(|r| r["name"] == "Allow-HTTP-Inbound-Internet")
        .unwrap();
    assert!(
        http["expansion"]
            .as_str()
            .unwrap()
            .contains(&format!("asg {tt}/asgweb (2 pods)")),
        "{http}"
    );
    assert!(
        rules
            .iter()
            .all(|r| r["fidelity"].is_string() || r["fidelity"].is_null())
    );

    // ASG status.
    let web = eventually("asgweb status", T, || {
        let a = get_json(&["asg", "asgweb", "-n", tt])?;
        (a.pointer("/status/memberCount") == Some(&Value::from(2))).then_some(a)
    });
    assert_eq!(
        web["status"]["members"],
        serde_json::json!(["web1", "web2"])
    );
    assert_eq!(
        web["status"]["referencedBy"],
        serde_json::json!([format!("{tt}/nsg1")])
    );

    // NetworkPolicies: exactly the ones the status names, owned by nsg1, labelled, and with
    // the compiler's content.
    let nps = policies(tt);
    let named: Vec<String> = status["networkPolicies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        !named.is_empty(),
        "nsg1 compiles to at least one NetworkPolicy"
    );
    assert_eq!(nps.keys().cloned().collect::<Vec<_>>(), named);
    let uid = nsg1["metadata"]["uid"].as_str().unwrap();
    for np in nps.values() {
        assert_eq!(
            np["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "kube-nsg"
        );
        let owner = &np["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], uid);
        assert_eq!(owner["kind"], "NetworkSecurityGroup");
        assert_eq!(owner["controller"], true);
        assert_eq!(owner["blockOwnerDeletion"], true);
    }
    assert_policies_match_compiler(tt);

    // /livez, /readyz and the documented metrics.
    assert_eq!(ctl.http("/livez").map(|r| r.0), Some(200));
    assert_eq!(ctl.http("/readyz").map(|r| r.0), Some(200));
    let metrics = ctl.metrics();
    for name in [
        "kube_nsg_reconciles_total",
        "kube_nsg_reconcile_errors_total",
        "kube_nsg_reconcile_duration_seconds_count",
        "kube_nsg_api_writes_total",
        "kube_nsg_managed_objects",
        "kube_nsg_leader 1",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    drop(ctl);
}

/// The NetworkPolicy specs the compiler makes for a namespace of the live inventory (as
/// the test's scoped controllers see it), after `tweak`.
fn compiled_policies(
    ns: &str,
    tweak: &dyn Fn(&mut kube_nsg::model::Inventory),
) -> BTreeMap<String, Value> {
    use kube_nsg::controller::policy::normalize_spec;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let expected = rt.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let vn: Vec<ipnet::IpNet> = VIRTUAL_NETWORK
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        let scope = kube_nsg::controller::inventory::parse_selector(&format!(
            "{SCOPE_LABEL}={}",
            scope_value()
        ))
        .unwrap();
        let nodes =
            kube_nsg::controller::inventory::parse_selector(&format!("{NODE_LABEL}=true")).unwrap();
        let mut live = kube_nsg::controller::scoped_inventory_from_cluster(
            &client,
            &vn,
            Some(&scope),
            Some(&nodes),
        )
        .await
        .unwrap();
        tweak(&mut live.inventory);
        let res = kube_nsg::resolve::Resolved::new(&live.inventory);
        kube_nsg::controller::compile::compile(
            &res,
            kube_nsg::controller::Mode::Strict,
            &mut Default::default(),
        )
    });
    expected
        .policies
        .iter()
        .filter(|p| p.namespace == ns)
        .map(|p| (p.name.clone(), normalize_spec(&p.spec_value())))
        .collect()
}

/// The NetworkPolicies in a namespace become those the compiler makes of the live inventory
/// (after `tweak`). Polled: another suite sharing the control plane may add nodes, which
/// changes both sides.
fn assert_policies_match(ns: &str, tweak: &dyn Fn(&mut kube_nsg::model::Inventory)) {
    use kube_nsg::controller::policy::normalize_spec;
    let mut last = None;
    let matched = (0..100).any(|_| {
        let want = compiled_policies(ns, tweak);
        let got: BTreeMap<String, Value> = policies(ns)
            .into_iter()
            .map(|(name, np)| (name, normalize_spec(&np["spec"])))
            .collect();
        let same = got == want;
        if !same {
            last = Some((got, want));
            std::thread::sleep(Duration::from_millis(300));
        }
        same
    });
    if let (false, Some((got, want))) = (matched, last) {
        panic!(
            "NetworkPolicies in {ns} differ from the compiler's output:\n{}\nwanted\n{}",
            serde_json::to_string_pretty(&got).unwrap(),
            serde_json::to_string_pretty(&want).unwrap()
        );
    }
}

fn assert_policies_match_compiler(ns: &str) {
    assert_policies_match(ns, &|_| {});
}

#[test]
fn subnet_and_interface_groups_of_the_example() {
    cluster();
    let _serial = serial();
    let example = apply_example("subnet-and-nic");
    let (subnet1, subnet2, subnet3) = (
        example.ns("subnet1"),
        example.ns("subnet2"),
        example.ns("subnet3"),
    );
    let _ctl = Controller::start("subnet-and-nic", &[]);
    for (ns, name) in [(subnet1, "nsg1"), (subnet1, "nsg2"), (subnet2, "nsg2")] {
        eventually(&format!("{ns}/{name} Ready"), T, || nsg_ready(ns, name));
    }
    let vm1 = eventually("vm1 bound to nsg2", T, || {
        let l = pod_labels(subnet1, "vm1");
        (label(&l, "kubensg.io/nic-nsg") == Some("nsg2")).then_some(l)
    });
    assert!(!vm1.keys().any(|k| k.starts_with("asg.kubensg.io/")));
    assert_eq!(
        label(&pod_labels(subnet2, "vm3"), "kubensg.io/nic-nsg"),
        Some("nsg2")
    );
    assert_eq!(
        label(&pod_labels(subnet1, "vm2"), "kubensg.io/nic-nsg"),
        None
    );
    let nsg1 = nsg_ready(subnet1, "nsg1").unwrap();
    assert_eq!(nsg1["status"]["associatedPods"], 2);
    let nsg2 = nsg_ready(subnet1, "nsg2").unwrap();
    assert_eq!(nsg2["status"]["associatedPods"], 1);
    for ns in [subnet1, subnet2] {
        assert_policies_match_compiler(ns);
    }
    assert!(policy_names(subnet3).is_empty(), "no group, no policy");
    drop(_ctl);
}

/// A namespace with ASGs web and db, a subnet group using them, and pods.
fn web_db_namespace(prefix: &str) -> TestNamespace {
    let ns = TestNamespace::new(prefix);
    let n = &ns.name;
    apply_ok(&asg(n, "web", "{matchLabels: {tier: web}}"));
    apply_ok(&asg(n, "db", "{matchLabels: {tier: db}}"));
    apply_ok(&nsg(
        n,
        "main",
        "subnet: true",
        &[ALLOW_WEB, DENY_DB, ALLOW_OUT_DNS],
    ));
    create_pod(n, "web-1", &[("tier", "web")], &[], "10.244.10.11");
    create_pod(n, "db-1", &[("tier", "db")], &[], "10.244.10.21");
    ns
}

/// Waits until the group `main` of `ns` is Ready and its NetworkPolicies exist; returns them.
fn wait_main_policies(ns: &str) -> BTreeMap<String, Value> {
    eventually("main Ready", T, || nsg_ready(ns, "main"));
    eventually("policies", T, || {
        let p = policies(ns);
        (!p.is_empty()).then_some(p)
    })
}

#[test]
fn policies_are_restored_after_hand_edits_and_collected_with_their_group() {
    cluster();
    let _serial = serial();
    let ns = web_db_namespace("restore");
    let n = ns.name.as_str();
    let ctl = Controller::start("restore", &[]);
    let before = wait_main_policies(n);
    let (name, original) = before.iter().next().unwrap();
    let spec = |np: &Value| kube_nsg::controller::policy::normalize_spec(&np["spec"]);

    // Someone edits a policy to allow everything: the controller puts its rules back.
    kubectl_ok(&[
        "patch",
        "networkpolicy",
        name,
        "-n",
        n,
        "--type=merge",
        "-p",
        r#"{"spec":{"ingress":[{}],"egress":[{}]}}"#,
    ]);
    eventually("the edited policy restored", T, || {
        let np = get_json(&["networkpolicy", name, "-n", n])?;
        (spec(&np) == spec(original)).then_some(())
    });

    // Someone adds a key inside the controller's selector: it goes too.
    kubectl_ok(&[
        "patch",
        "networkpolicy",
        name,
        "-n",
        n,
        "--type=merge",
        "-p",
        r#"{"spec":{"podSelector":{"matchLabels":{"sneaky":"yes"}}}}"#,
    ]);
    eventually("the extra selector key removed", T, || {
        let np = get_json(&["networkpolicy", name, "-n", n])?;
        (spec(&np) == spec(original)).then_some(())
    });

    // Someone deletes it: it comes back (a new object).
    let uid = original["metadata"]["uid"].clone();
    kubectl_ok(&["delete", "networkpolicy", name, "-n", n]);
    eventually("the deleted policy recreated", T, || {
        let np = get_json(&["networkpolicy", name, "-n", n])?;
        (np["metadata"]["uid"] != uid && spec(&np) == spec(original)).then_some(())
    });
    assert_eq!(
        policies(n).keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );

    // Deleting the group: kube-controller-manager's garbage collector removes its policies
    // (the controller is stopped first, so it is not the one deleting them).
    ctl.stop();
    kubectl_ok(&["delete", "nsg", "main", "-n", n]);
    eventually("policies garbage-collected", T, || {
        policies(n).is_empty().then_some(())
    });
}

#[test]
fn a_policy_that_is_not_ours_is_never_overwritten() {
    cluster();
    let _serial = serial();
    let ns = web_db_namespace("foreign");
    let n = ns.name.as_str();
    let ctl = Controller::start("foreign", &[]);
    eventually("main Ready", T, || nsg_ready(n, "main"));
    let names = eventually("policies", T, || {
        let p = policy_names(n);
        (!p.is_empty()).then_some(p)
    });
    ctl.stop();
    kubectl_ok(&["delete", "nsg", "main", "-n", n]);
    eventually("policies garbage-collected", T, || {
        policy_names(n).is_empty().then_some(())
    });

    // Someone else's policy under the name the compiler uses.
    let foreign = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {}\n  namespace: {n}\n  labels: {{owner: someone-else}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: theirs}}}}\n  policyTypes: [Ingress]\n",
        names[0]
    );
    apply_ok(&foreign);
    let theirs = get_json(&["networkpolicy", &names[0], "-n", n]).unwrap();
    apply_ok(&nsg(
        n,
        "main",
        "subnet: true",
        &[ALLOW_WEB, DENY_DB, ALLOW_OUT_DNS],
    ));
    let _ctl = Controller::start("foreign-2", &[]);
    let group = eventually("NetworkPoliciesProgrammed=False NotOwned", T, || {
        let g = get_json(&["nsg", "main", "-n", n])?;
        let c = condition(&g, "NetworkPoliciesProgrammed")?;
        (c["status"] == "False" && c["reason"] == "NotOwned").then_some(g)
    });
    assert!(
        condition(&group, "NetworkPoliciesProgrammed").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains(&names[0])
    );
    assert_eq!(condition(&group, "Ready").unwrap()["status"], "False");
    eventually("a NetworkPolicyNotOwned event", T, || {
        (!events(n, "NetworkPolicyNotOwned").is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let after = get_json(&["networkpolicy", &names[0], "-n", n]).unwrap();
    assert_eq!(
        after["metadata"]["resourceVersion"], theirs["metadata"]["resourceVersion"],
        "left alone"
    );
    // The group's other policies are still programmed.
    for other in &names[1..] {
        assert!(
            get_json(&["networkpolicy", other, "-n", n]).is_some(),
            "{other} applied"
        );
    }
}

#[test]
fn relabelling_a_pod_moves_its_membership_and_foreign_labels_go() {
    cluster();
    let _serial = serial();
    let ns = web_db_namespace("relabel");
    let n = ns.name.as_str();
    // A member by annotation, and an interface-level group for pods labelled bound=yes.
    create_pod(
        n,
        "annotated",
        &[],
        &[("kubensg.io/application-security-groups", "db")],
        "10.244.10.31",
    );
    apply_ok(&nsg(
        n,
        "nic",
        "podSelector: {matchLabels: {bound: 'yes'}}",
        &[ALLOW_WEB],
    ));
    let _ctl = Controller::start("relabel", &[]);
    eventually("web-1 in web", T, || {
        (label(&pod_labels(n, "web-1"), "asg.kubensg.io/web") == Some("true")).then_some(())
    });
    eventually("annotated in db", T, || {
        (label(&pod_labels(n, "annotated"), "asg.kubensg.io/db") == Some("true")).then_some(())
    });

    // A pod cannot join an ASG or bind a group by labelling itself.
    kubectl_ok(&[
        "label",
        "pod",
        "web-1",
        "-n",
        n,
        "asg.kubensg.io/db=true",
        "kubensg.io/nic-nsg=nic",
    ]);
    eventually("self-granted labels removed", T, || {
        let l = pod_labels(n, "web-1");
        (!l.contains_key("asg.kubensg.io/db") && !l.contains_key("kubensg.io/nic-nsg"))
            .then_some(())
    });
    assert_eq!(
        label(&pod_labels(n, "web-1"), "asg.kubensg.io/web"),
        Some("true")
    );

    // Relabel web-1 to the db tier: membership moves, statuses follow.
    let start = Instant::now();
    kubectl_ok(&["label", "pod", "web-1", "-n", n, "tier=db", "--overwrite"]);
    eventually("web-1 moved to db", T, || {
        let l = pod_labels(n, "web-1");
        (label(&l, "asg.kubensg.io/db") == Some("true") && !l.contains_key("asg.kubensg.io/web"))
            .then_some(())
    });
    let labelled = start.elapsed();
    eventually("ASG statuses updated", T, || {
        let web = get_json(&["asg", "web", "-n", n])?;
        let db = get_json(&["asg", "db", "-n", n])?;
        (web["status"]["memberCount"] == 0 && db["status"]["memberCount"] == 3).then_some(())
    });
    eprintln!(
        "membership moved in {labelled:?}, statuses in {:?}",
        start.elapsed()
    );

    // Binding by the interface-level group's selector, and unbinding.
    kubectl_ok(&["label", "pod", "db-1", "-n", n, "bound=yes"]);
    eventually("db-1 bound to nic", T, || {
        (label(&pod_labels(n, "db-1"), "kubensg.io/nic-nsg") == Some("nic")).then_some(())
    });
    eventually("nic associated with one pod", T, || {
        let g = nsg_ready(n, "nic")?;
        (g["status"]["associatedPods"] == 1).then_some(())
    });
    kubectl_ok(&["label", "pod", "db-1", "-n", n, "bound-"]);
    eventually("db-1 unbound", T, || {
        (!pod_labels(n, "db-1").contains_key("kubensg.io/nic-nsg")).then_some(())
    });
}

#[test]
fn a_missing_asg_is_reported_and_the_rest_enforced() {
    cluster();
    let _serial = serial();
    let ns = TestNamespace::new("missing");
    let n = ns.name.as_str();
    apply_ok(&asg(n, "web", "{matchLabels: {tier: web}}"));
    create_pod(n, "web-1", &[("tier", "web")], &[], "10.244.11.11");
    // deny-db names an ASG that does not exist.
    apply_ok(&nsg(n, "main", "subnet: true", &[ALLOW_WEB, DENY_DB]));
    let _ctl = Controller::start("missing", &[]);
    let g = eventually("ResolvedRefs=False", T, || {
        let g = get_json(&["nsg", "main", "-n", n])?;
        (condition(&g, "ResolvedRefs")?["status"] == "False").then_some(g)
    });
    let msg = condition(&g, "ResolvedRefs").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("deny-db") && msg.contains(&format!("asg:{n}/db")),
        "{msg}"
    );
    let deny = g["status"]["effectiveRules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "deny-db")
        .unwrap()
        .clone();
    assert_eq!(
        deny["unresolved"],
        serde_json::json!([format!("destination: asg:{n}/db")])
    );
    assert!(deny["expansion"].as_str().unwrap().contains("missing"));
    // A rule that matches nothing can never decide: the analysis says so.
    let anomalies = g["status"]["anomalies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        anomalies
            .iter()
            .any(|a| a["kind"] == "Shadowed" && a["rules"][0] == "deny-db"),
        "{anomalies:?}"
    );
    eventually("an InvalidReference event", T, || {
        (!events(n, "InvalidReference").is_empty()).then_some(())
    });
    // The rest is enforced: Ready, policies applied, members labelled.
    let g = eventually("main Ready", T, || nsg_ready(n, "main"));
    assert!(
        !g["status"]["networkPolicies"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(!policy_names(n).is_empty());
    assert_eq!(
        label(&pod_labels(n, "web-1"), "asg.kubensg.io/web"),
        Some("true")
    );

    // The ASG appears: resolved.
    apply_ok(&asg(n, "db", "{matchLabels: {tier: db}}"));
    eventually("ResolvedRefs=True", T, || {
        let g = get_json(&["nsg", "main", "-n", n])?;
        (condition(&g, "ResolvedRefs")?["status"] == "True").then_some(())
    });
}

#[test]
fn an_invalid_update_keeps_the_last_valid_generation_in_force() {
    cluster();
    let _serial = serial();
    let ns = web_db_namespace("lastvalid");
    let n = ns.name.as_str();
    let _ctl = Controller::start("lastvalid", &[]);
    let before = wait_main_policies(n);
    let valid: kube_nsg::api::NetworkSecurityGroup =
        serde_json::from_value(get_json(&["nsg", "main", "-n", n]).unwrap()).unwrap();
    let valid = kube_nsg::model::Nsg::try_from(&valid).unwrap();
    // Host bits inside a prefix list pass admission (a per-item pattern) but not validation.
    let bad = "{name: bad-list, priority: 300, direction: Inbound, access: Deny, protocol: Tcp, \
        sourceAddressPrefixes: [10.0.0.1/8], destinationAddressPrefix: '*'}";
    apply(&nsg(
        n,
        "main",
        "subnet: true",
        &[ALLOW_WEB, DENY_DB, ALLOW_OUT_DNS, bad],
    ))
    .expect("admission accepts it");
    let g = eventually("Accepted=False", T, || {
        let g = get_json(&["nsg", "main", "-n", n])?;
        let current = g["status"]["observedGeneration"] == g["metadata"]["generation"];
        (current && condition(&g, "Accepted")?["status"] == "False").then_some(g)
    });
    let msg = condition(&g, "Accepted").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("bad-list")
            && msg.contains("spec.securityRules[3]")
            && msg.contains("host bits"),
        "{msg}"
    );
    assert!(msg.contains("generation 1 stays in force"), "{msg}");
    assert_eq!(condition(&g, "Ready").unwrap()["status"], "False");
    assert!(
        g["status"]["effectiveRules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["name"] != "bad-list"),
        "old rules in force"
    );
    eventually("an Invalid event", T, || {
        (!events(n, "Invalid").is_empty()).then_some(())
    });
    // The policies are still those of the last valid generation.
    assert_eq!(
        policies(n).keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert_policies_match(n, &|inv| inv.nsgs.push(valid.clone()));
    // Fixed: accepted again.
    apply_ok(&nsg(
        n,
        "main",
        "subnet: true",
        &[ALLOW_WEB, DENY_DB, ALLOW_OUT_DNS],
    ));
    eventually("Ready again", T, || nsg_ready(n, "main"));
}

#[test]
fn conflicts_go_to_the_younger_group() {
    cluster();
    let _serial = serial();
    let ns = TestNamespace::new("conflict");
    let n = ns.name.as_str();
    create_pod(n, "p", &[("app", "x")], &[], "10.244.12.11");
    apply_ok(&nsg(n, "older", "subnet: true", &[ALLOW_WEB]));
    apply_ok(&nsg(
        n,
        "older-nic",
        "podSelector: {matchLabels: {app: x}}",
        &[ALLOW_WEB],
    ));
    // Creation times have a one-second resolution.
    std::thread::sleep(Duration::from_millis(1100));
    apply_ok(&nsg(n, "younger", "subnet: true", &[ALLOW_WEB]));
    apply_ok(&nsg(
        n,
        "younger-nic",
        "podSelector: {matchLabels: {app: x}}",
        &[ALLOW_WEB],
    ));
    let _ctl = Controller::start("conflict", &[]);
    let y = eventually("younger in conflict", T, || {
        let g = get_json(&["nsg", "younger", "-n", n])?;
        (condition(&g, "Conflict")?["status"] == "True").then_some(g)
    });
    let c = condition(&y, "Conflict").unwrap();
    assert_eq!(c["reason"], "SubnetConflict");
    assert!(c["message"].as_str().unwrap().contains("older"), "{c}");
    assert_eq!(condition(&y, "Ready").unwrap()["reason"], "Conflict");
    let yn = eventually("younger-nic in conflict", T, || {
        let g = get_json(&["nsg", "younger-nic", "-n", n])?;
        (condition(&g, "Conflict")?["status"] == "True").then_some(g)
    });
    assert_eq!(
        condition(&yn, "Conflict").unwrap()["reason"],
        "InterfaceConflict"
    );
    eventually("older Ready", T, || nsg_ready(n, "older"));
    eventually("older-nic Ready", T, || nsg_ready(n, "older-nic"));
    assert_eq!(
        label(&pod_labels(n, "p"), "kubensg.io/nic-nsg"),
        Some("older-nic")
    );
    eventually("Conflict events", T, || {
        (events(n, "Conflict").len() >= 2).then_some(())
    });
}

#[test]
fn a_restarted_controller_makes_no_writes() {
    cluster();
    let _serial = serial();
    let ns = web_db_namespace("restart");
    let n = ns.name.as_str();
    let lease = unique("restart-lease");
    let mut ctl = Controller::start(
        "restart-1",
        &["--lease-name", &lease, "--resync-interval", "2s"],
    );
    eventually("main Ready", T, || nsg_ready(n, "main"));
    eventually("policies", T, || {
        (!policy_names(n).is_empty()).then_some(())
    });
    // A periodic resync with nothing to change writes nothing. A window counts only when the
    // model did not change during it: another suite sharing the control plane may register
    // nodes, which changes policies (and so writes) legitimately.
    let compiles = "kube_nsg_compiles_total";
    // Likewise the dataplane status follows the agents' Leases, which other suites' agents
    // renew or let expire: a window counts only when it stayed the same.
    let dataplane = || {
        get_json(&["networksecuritygroup", "main", "-n", n])
            .map(|o| o["status"]["dataplane"].clone())
    };
    let resync_writes = eventually("a quiet window with resync passes", T, || {
        let (w, c, p, d) = (
            ctl.writes(),
            ctl.metric(compiles),
            ctl.metric("kube_nsg_reconciles_total"),
            dataplane(),
        );
        std::thread::sleep(Duration::from_secs(5));
        let quiet = ctl.metric(compiles) == c && dataplane() == d;
        let passes = ctl.metric("kube_nsg_reconciles_total") - p;
        (quiet && passes >= 2.0).then(|| ctl.writes() - w)
    });
    assert_eq!(resync_writes, 0.0, "a no-op resync made writes");

    let versions = |kind: &str| -> BTreeMap<String, Value> {
        let list = get_json(&[kind, "-n", n]).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["metadata"]["name"].as_str().unwrap().to_string(),
                    o["metadata"]["resourceVersion"].clone(),
                )
            })
            .collect()
    };
    let kinds = ["nsg", "asg", "pods", "networkpolicies"];
    for attempt in 1..=3 {
        assert!(ctl.stop().success());
        let before: Vec<_> = kinds.iter().map(|k| versions(k)).collect();
        ctl = Controller::start(
            &format!("restart-{}", attempt + 1),
            &["--lease-name", &lease],
        );
        eventually("the new controller leads and has run a pass", T, || {
            (ctl.is_leader() && ctl.metric("kube_nsg_reconciles_total") >= 1.0).then_some(())
        });
        std::thread::sleep(Duration::from_secs(3));
        if ctl.metric(compiles) > 1.0 {
            eprintln!("the model changed during restart attempt {attempt}; again");
            eventually("settled", T, || {
                let w = ctl.writes();
                std::thread::sleep(Duration::from_secs(2));
                (ctl.writes() == w).then_some(())
            });
            continue;
        }
        assert_eq!(ctl.writes(), 0.0, "restart made writes:\n{}", ctl.metrics());
        let after: Vec<_> = kinds.iter().map(|k| versions(k)).collect();
        assert_eq!(after, before, "objects changed across the restart");
        drop(ctl);
        delete_lease(&lease);
        return;
    }
    panic!("the model kept changing during every restart attempt");
}

#[test]
fn two_replicas_never_both_write() {
    cluster();
    let _serial = serial();
    let ns = web_db_namespace("replicas");
    let n = ns.name.as_str();
    let lease = unique("replicas-lease");
    let timing = [
        "--lease-name",
        &lease,
        "--lease-duration",
        "4s",
        "--renew-deadline",
        "3s",
        "--retry-period",
        "500ms",
    ];
    let a = Controller::start("replica-a", &timing);
    let b = Controller::start("replica-b", &timing);
    eventually("one leader", T, || {
        (a.is_leader() != b.is_leader()).then_some(())
    });
    let (leader, follower) = if a.is_leader() { (a, b) } else { (b, a) };
    // Both ready, only one leads; the follower never writes.
    assert_eq!(follower.http("/readyz").map(|r| r.0), Some(200));
    eventually("main Ready", T, || nsg_ready(n, "main"));
    for i in 0..5 {
        create_pod(
            n,
            &format!("web-{}", i + 2),
            &[("tier", "web")],
            &[],
            &format!("10.244.13.{}", 10 + i),
        );
        assert!(!(leader.is_leader() && follower.is_leader()), "both lead");
    }
    eventually("new pods labelled", T, || {
        (label(&pod_labels(n, "web-6"), "asg.kubensg.io/web") == Some("true")).then_some(())
    });
    assert!(leader.writes() > 0.0);
    assert_eq!(follower.writes(), 0.0, "the follower wrote");
    assert!(!follower.is_leader());

    // The leader dies without releasing the Lease: the follower takes over after it expires,
    // and only then writes.
    leader.kill();
    let killed = Instant::now();
    let new_leader = follower;
    eventually("takeover", T, || new_leader.is_leader().then_some(()));
    assert!(
        killed.elapsed() >= Duration::from_secs(3),
        "took over before the lease could expire: {:?}",
        killed.elapsed()
    );
    create_pod(n, "db-2", &[("tier", "db")], &[], "10.244.13.30");
    eventually("the new leader labels", T, || {
        (label(&pod_labels(n, "db-2"), "asg.kubensg.io/db") == Some("true")).then_some(())
    });
    assert!(new_leader.writes() > 0.0);

    // A graceful stop releases the Lease: a standby takes over at once.
    let standby = Controller::start("replica-c", &timing);
    assert!(!standby.is_leader());
    assert_eq!(standby.writes(), 0.0);
    let stopped = Instant::now();
    assert!(new_leader.stop().success());
    eventually("takeover after release", T, || {
        standby.is_leader().then_some(())
    });
    assert!(
        stopped.elapsed() < Duration::from_secs(4),
        "release should not wait for expiry: {:?}",
        stopped.elapsed()
    );
    drop(standby);
    delete_lease(&lease);
}

/// Deletes a cluster-scoped object when dropped.
struct ClusterObject(&'static str, String);

impl Drop for ClusterObject {
    fn drop(&mut self) {
        kubectl(&[
            "delete",
            self.0,
            &self.1,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

#[test]
fn service_tags_expand_in_rules_and_report_their_references() {
    cluster();
    let _serial = serial();
    let ns = TestNamespace::new("tags");
    let n = ns.name.as_str();
    let tag = unique("e2e-storage");
    let _tag = ClusterObject("servicetag", tag.clone());
    // Cluster-scoped: it carries the scope label so that this run's controller owns its status.
    apply_ok(&format!(
        "apiVersion: kubensg.io/v1alpha1\nkind: ServiceTag\nmetadata:\n  name: {tag}\n  labels: {{{SCOPE_LABEL}: {}}}\n\
         spec:\n  addressPrefixes: [203.0.113.0/24, 198.51.100.7]\n",
        scope_value()
    ));
    let rule = format!(
        "{{name: to-storage, priority: 100, direction: Outbound, access: Allow, protocol: Tcp, \
         sourceAddressPrefix: '*', destinationAddressPrefix: {tag}, destinationPortRange: '443'}}"
    );
    apply_ok(&nsg(n, "main", "subnet: true", &[&rule]));
    create_pod(n, "p", &[("app", "x")], &[], "10.244.14.11");
    let _ctl = Controller::start("tags", &[]);

    let g = eventually("main Ready", T, || nsg_ready(n, "main"));
    let r = g["status"]["effectiveRules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "to-storage")
        .unwrap()
        .clone();
    assert!(
        r["expansion"]
            .as_str()
            .unwrap()
            .contains(&format!("{tag} (2 prefixes)")),
        "{r}"
    );
    assert_eq!(condition(&g, "ResolvedRefs").unwrap()["status"], "True");
    let t = eventually("the tag's status", T, || {
        let t = get_json(&["servicetag", &tag])?;
        (t.pointer("/status/prefixCount") == Some(&Value::from(2))).then_some(t)
    });
    assert_eq!(
        t["status"]["referencedBy"],
        serde_json::json!([format!("{n}/main")])
    );
    assert_eq!(condition(&t, "Accepted").unwrap()["status"], "True");
    assert_policies_match_compiler(n);
}

/// Creates the group `large` of as many rules as a group may have, `rule(0)`, `rule(1)`, ...,
/// and a pod it applies to; returns the number of rules.
fn create_largest_group(ns: &str, rule: impl Fn(usize) -> String, pod_ip: &str) -> usize {
    let rules: Vec<String> = (0..kube_nsg::model::RuleLimits::RULES_PER_GROUP)
        .map(rule)
        .collect();
    let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
    // `create`: `apply` would add the whole spec again as an annotation, over the limit.
    let out = kubectl_in(
        &["create", "-f", "-"],
        Some(&nsg(ns, "large", "subnet: true", &rules)),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    create_pod(ns, "p", &[("app", "x")], &[], pod_ip);
    rules.len()
}

#[test]
fn the_largest_groups_get_a_status_that_fits_in_etcd() {
    cluster();
    let _serial = serial();
    let ns = TestNamespace::new("large");
    let n = ns.name.as_str();
    // 700 rules of 80 addresses each: 1.2 MB of JSON, which etcd (1.5 MiB per object) stores,
    // but not again as a status listing every rule with every address.
    let addresses = 80;
    let rule = |i: usize| {
        let prefixes: Vec<String> = (0..addresses)
            .map(|j| format!("10.{}.{}.{}/32", i % 200, j / 250, j % 250 + 1))
            .collect();
        format!(
            "{{name: r{i:03}, priority: {}, direction: {}, access: Allow, protocol: Tcp, \
             sourceAddressPrefixes: [{}], destinationAddressPrefix: VirtualNetwork, \
             destinationPortRanges: ['1000', '2000-2999']}}",
            100 + i / 2,
            ["Inbound", "Outbound"][i % 2],
            prefixes.join(", ")
        )
    };
    let rules = create_largest_group(n, rule, "10.244.15.11");
    let _ctl = Controller::start("large", &[]);

    let g = eventually("large Ready", T, || nsg_ready(n, "large"));
    let size = serde_json::to_vec(&g).unwrap().len();
    assert!(size < 1536 * 1024, "the object is {size} bytes");
    let listed = g["status"]["effectiveRules"].as_array().unwrap();
    let omitted = g["status"]["omittedEffectiveRules"].as_u64().unwrap() as usize;
    assert_eq!(
        listed.len() + omitted,
        rules + 6,
        "every rule listed or counted"
    );
    assert!(
        omitted > 0 && listed.len() > 100,
        "{} listed, {omitted} omitted",
        listed.len()
    );
    // Both directions keep their highest priorities, and their default rules.
    for (direction, first) in [("Inbound", "r000"), ("Outbound", "r001")] {
        let of: Vec<&Value> = listed
            .iter()
            .filter(|r| r["direction"] == direction)
            .collect();
        assert_eq!(of[0]["name"], first);
        assert_eq!(of.iter().filter(|r| r["default"] == true).count(), 3);
    }
    assert!(
        listed[0]["source"]
            .as_str()
            .unwrap()
            .ends_with(&format!(" and {} more", addresses - 10)),
        "{}",
        listed[0]
    );
    assert_policies_match_compiler(n);

    // A group that fits again lists everything.
    apply_ok(&nsg(n, "large", "subnet: true", &[ALLOW_WEB]));
    let g = eventually("the smaller group Ready", T, || nsg_ready(n, "large"));
    assert_eq!(
        g["status"]["effectiveRules"].as_array().unwrap().len(),
        1 + 6
    );
    assert_eq!(g["status"].get("omittedEffectiveRules"), None);
}

#[test]
fn policies_too_large_to_store_are_cut_into_parts() {
    use kube_nsg::netpol::MAX_POLICY_BYTES;
    cluster();
    let _serial = serial();
    let ns = TestNamespace::new("parts");
    let n = ns.name.as_str();
    // 700 rules, each of 60 addresses and about 50 ports of its own, on both protocols: a
    // 1 MB group, whose rules would take one policy of 3.8 MB (the API server takes 3 MiB).
    // The ports of a rule: a quarter of 200, picked by a hash (splitmix64's finaliser).
    let picked = |x: u64| {
        let z = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) >> 62 == 0
    };
    let rule = |i: usize| {
        let prefixes: Vec<String> = (0..60)
            .map(|j| format!("10.{}.{}.{}", i / 250, i % 250, 4 * j + 1))
            .collect();
        let ports: Vec<String> = (0..200)
            .filter(|&k| picked((i * 200 + k) as u64))
            .map(|k| format!("'{}'", 2000 + 2 * k))
            .collect();
        format!(
            "{{name: r{i:03}, priority: {}, direction: Inbound, access: Allow, protocol: '*', \
             sourceAddressPrefixes: [{}], destinationAddressPrefix: VirtualNetwork, \
             destinationPortRanges: [{}]}}",
            100 + i,
            prefixes.join(", "),
            ports.join(", ")
        )
    };
    create_largest_group(n, rule, "10.244.15.12");
    let _ctl = Controller::start("parts", &[]);

    // The debug build compiles this group in about 10 s.
    eventually("large Ready", Duration::from_secs(240), || {
        nsg_ready(n, "large")
    });
    let parts = policies(n);
    let mut total = 0;
    for (name, policy) in &parts {
        let size = serde_json::to_vec(&policy["spec"]).unwrap().len();
        assert!(size < MAX_POLICY_BYTES, "{name}: {size} bytes");
        total += size;
    }
    assert!(
        total > 3 << 20,
        "{} parts of {total} bytes in all",
        parts.len()
    );
    assert_policies_match_compiler(n);

    // A group that fits in one policy again: the other parts go.
    apply_ok(&nsg(n, "large", "subnet: true", &[ALLOW_WEB]));
    eventually("one policy", T, || {
        (policy_names(n).len() == 1).then_some(())
    });
    assert_policies_match_compiler(n);
}

#[test]
fn an_agent_lease_with_the_longest_hit_counts_is_accepted() {
    use kube_nsg::agent::report::{hits_annotation, lease_body};
    use kube_nsg::model::{Direction, ObjectRef};
    cluster();
    // 2,000 rules with the longest names a group allows decided flows on one node.
    let nsg = ObjectRef::new("n".repeat(63), "g".repeat(253));
    let hits = (0..2000u64)
        .map(|i| {
            (
                (nsg.clone(), Direction::Inbound, format!("{i:0>80}")),
                i + 1,
            )
        })
        .collect();
    let apply = |hits: &str| {
        let body = lease_body(
            "e2e-node",
            None,
            Duration::from_secs(30),
            &BTreeMap::new(),
            hits,
            k8s_openapi::jiff::Timestamp::now(),
        );
        let args = [
            "apply",
            "--server-side",
            "--dry-run=server",
            "-n",
            "default",
            "-f",
            "-",
        ];
        kubectl_in(&args, Some(&body.to_string()))
    };
    let out = apply(&hits_annotation(&hits));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // All of them would be refused, and the heartbeat with them.
    let all: BTreeMap<String, u64> = hits
        .iter()
        .map(|(k, n)| (kube_nsg::agent::report::hit_key_string(k), *n))
        .collect();
    let out = apply(&serde_json::to_string(&all).unwrap());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Too long"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
