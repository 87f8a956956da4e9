//! The importer never panics and never emits an invalid object, whatever JSON it is fed:
//! random values, NSG-shaped templates with random fields, and mutated corpus files.

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};

use kube_nsg::import::{Import, ImportError, IssueKind, import_azure, import_azure_bytes};
use kube_nsg::model::Nsg;

const KEYS: &[&str] = &[
    "type",
    "name",
    "id",
    "properties",
    "securityRules",
    "defaultSecurityRules",
    "resources",
    "value",
    "parameters",
    "variables",
    "$schema",
    "contentVersion",
    "template",
    "expressionEvaluationOptions",
    "scope",
    "protocol",
    "access",
    "direction",
    "priority",
    "sourceAddressPrefix",
    "sourceAddressPrefixes",
    "destinationAddressPrefix",
    "destinationAddressPrefixes",
    "sourcePortRange",
    "sourcePortRanges",
    "destinationPortRange",
    "destinationPortRanges",
    "sourceApplicationSecurityGroups",
    "destinationApplicationSecurityGroups",
    "description",
    "condition",
    "copy",
    "defaultValue",
    "networkInterfaces",
    "subnets",
    "templateLink",
    "count",
];

const RULE_KEYS: &[&str] = &[
    "name",
    "protocol",
    "access",
    "direction",
    "priority",
    "sourceAddressPrefix",
    "sourceAddressPrefixes",
    "destinationAddressPrefix",
    "destinationAddressPrefixes",
    "sourcePortRange",
    "sourcePortRanges",
    "destinationPortRange",
    "destinationPortRanges",
    "sourceApplicationSecurityGroups",
    "destinationApplicationSecurityGroups",
    "description",
    "condition",
    "id",
    "type",
];

const STRINGS: &[&str] = &[
    "Microsoft.Network/networkSecurityGroups",
    "Microsoft.Network/networkSecurityGroups/securityRules",
    "Microsoft.Network/networkSecurityGroups/defaultSecurityRules",
    "Microsoft.Resources/deployments",
    "securityRules",
    "inner",
    "Tcp",
    "TCP",
    "udp",
    "Icmp",
    "*",
    "Any",
    "Esp",
    "Ah",
    "Inbound",
    "outbound",
    "Allow",
    "DENY",
    "10.0.0.0/8",
    "10.0.0.1/8",
    "0.0.0.0/0",
    "::/0",
    "fd00::/8",
    "10.0.0.4",
    "VirtualNetwork",
    "Internet",
    "Storage.WestEurope",
    "22",
    "22-22",
    "0-65535",
    "80",
    "90-80",
    "65536",
    "100",
    "4096",
    "",
    "[parameters('p')]",
    "[variables('v')]",
    "[parameters('q').x[0]]",
    "[concat(parameters('p'), '/r')]",
    "[concat(variables('v'), '-', parameters('p'))]",
    "[format('{0}/{1}', parameters('p'), 'r')]",
    "[if(parameters('b'), 'a', 'b')]",
    "[resourceId('Microsoft.Network/applicationSecurityGroups', parameters('p'))]",
    "[resourceGroup().location]",
    "[copyIndex()]",
    "[variables('v')]",
    "[[literal]",
    "[",
    "]",
    "[]",
    "[)(]",
    "['",
    "nsg/rule",
    "a/b/c",
    "/subscriptions/s/resourceGroups/r/providers/Microsoft.Network/applicationSecurityGroups/Asg_1",
    "/subscriptions/s/resourceGroups/r/providers/Microsoft.Network/networkSecurityGroups/N/securityRules/R",
];

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(STRINGS).prop_map(str::to_string),
        1 => ".{0,16}",
        1 => "\\[[a-z(')., 0-9\\[\\]]{0,24}\\]",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => prop_oneof![any::<i64>(), 0i64..70000].prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        4 => string().prop_map(Value::String),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => select(KEYS).prop_map(str::to_string), 1 => "[a-zA-Z$]{1,6}"]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A plausible rule (most of them convert), with a few fields then replaced by random
/// values or removed.
fn rule_like() -> impl Strategy<Value = Value> {
    let prefix = || {
        prop_oneof![
            5 => select(vec!["*", "10.0.0.0/8", "VirtualNetwork", "Storage.WestEurope", "fd00::/8", "Internet"]),
            1 => select(vec!["10.0.0.1/8", "[parameters('p')]", "[variables('v')]", ""]),
        ]
        .prop_map(|s| json!(s))
    };
    let port = || {
        prop_oneof![
            5 => select(vec!["*", "80", "22-22", "0-65535", "1000-2000"]).prop_map(|s| json!(s)),
            1 => select(vec!["[variables('v')]", "90-80"]).prop_map(|s| json!(s)),
            1 => (0u32..70000).prop_map(|n| json!(n)),
        ]
    };
    let asgs = prop::collection::vec(
        select(vec![
            "/subscriptions/s/resourceGroups/r/providers/Microsoft.Network/applicationSecurityGroups/Asg_1",
            "/x/applicationSecurityGroups/web",
            "[resourceId('Microsoft.Network/applicationSecurityGroups', parameters('p'))]",
            "[resourceId('Microsoft.Network/applicationSecurityGroups', 'db')]",
        ])
        .prop_map(|id| json!({ "id": id })),
        1..3,
    );
    let base = (
        prop_oneof![5 => select(vec!["Tcp", "TCP", "udp", "*", "Any"]), 1 => select(vec!["Icmp", "Esp"])],
        select(vec!["Allow", "Deny", "allow"]),
        select(vec!["Inbound", "Outbound", "inbound"]),
        prop_oneof![3 => (100i64..4097).prop_map(Value::from), 1 => (90i64..4200).prop_map(|n| json!(n.to_string()))],
        prefix(),
        prop_oneof![3 => prefix().prop_map(|p| ("destinationAddressPrefix", p)), 1 => asgs.prop_map(|a| ("destinationApplicationSecurityGroups", Value::Array(a)))],
        port(),
        prop_oneof![3 => port().prop_map(|p| ("destinationPortRange", p)), 1 => prop::collection::vec(port(), 1..4).prop_map(|l| ("destinationPortRanges", Value::Array(l)))],
    );
    let changes = prop_oneof![
        2 => Just(vec![]),
        1 => prop::collection::vec((select(RULE_KEYS), prop::option::of(leaf())), 1..3),
    ];
    (base, changes, any::<bool>(), prop_oneof![
        4 => (0u8..40).prop_map(|n| format!("r{n}")),
        1 => select(vec!["allow web", "[variables('v')]"]).prop_map(str::to_string),
    ]).prop_map(
        |((protocol, access, direction, priority, src, (dst_key, dst), sport, (dport_key, dport)), changes, flat, name)| {
            let mut props = json!({
                "protocol": protocol, "access": access, "direction": direction, "priority": priority,
                "sourceAddressPrefix": src, "sourcePortRange": sport,
            });
            props[dst_key] = dst;
            props[dport_key] = dport;
            let props = props.as_object_mut().unwrap();
            for (k, v) in changes {
                match v {
                    Some(v) => props.insert(k.to_string(), v),
                    None => props.remove(k),
                };
            }
            if flat {
                props.insert("name".into(), json!(name));
                Value::Object(props.clone())
            } else {
                json!({ "name": name, "properties": props })
            }
        },
    )
}

fn nsg_like() -> impl Strategy<Value = Value> {
    (
        string(),
        prop_oneof![
            4 => prop::collection::vec(rule_like(), 0..6).prop_map(Value::Array),
            1 => leaf(),
        ],
        prop::collection::vec(rule_like(), 0..2),
        prop::option::of(leaf()),
    )
        .prop_map(|(name, rules, children, condition)| {
            let children: Vec<Value> = children
                .into_iter()
                .map(|mut c| {
                    c["type"] = json!("securityRules");
                    c
                })
                .collect();
            let mut n = json!({
                "type": "Microsoft.Network/networkSecurityGroups",
                "name": name,
                "properties": { "securityRules": rules, "defaultSecurityRules": [] },
                "resources": children,
            });
            if let Some(c) = condition {
                n["condition"] = c;
            }
            n
        })
}

/// A template with parameters and variables the random expressions can name.
fn template_like() -> impl Strategy<Value = Value> {
    let separate = rule_like().prop_map(|mut r| {
        r["type"] = json!("Microsoft.Network/networkSecurityGroups/securityRules");
        r
    });
    (
        prop::collection::btree_map(
            select(vec!["p", "q", "b"]),
            prop::option::of(prop_oneof![2 => string().prop_map(Value::String), 1 => value()]),
            0..3,
        ),
        prop::collection::btree_map(
            select(vec!["v", "w"]),
            prop_oneof![2 => string().prop_map(Value::String), 1 => value()],
            0..2,
        ),
        prop::collection::vec(prop_oneof![3 => nsg_like(), 1 => separate], 1..4),
        any::<bool>(),
    )
        .prop_map(|(params, vars, resources, nested)| {
            let params: Map<String, Value> = params
                .into_iter()
                .map(|(k, d)| {
                    let decl = match d {
                        Some(d) => json!({ "type": "string", "defaultValue": d }),
                        None => json!({ "type": "string" }),
                    };
                    (k.to_string(), decl)
                })
                .collect();
            let vars: Map<String, Value> = vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let t = json!({
                "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
                "contentVersion": "1.0.0.0",
                "parameters": params, "variables": vars, "resources": resources,
            });
            if nested {
                json!({
                    "$schema": "x", "contentVersion": "1.0.0.0",
                    "parameters": { "p": { "type": "string", "defaultValue": "10.1.0.0/16" } },
                    "resources": [{
                        "type": "Microsoft.Resources/deployments", "name": "d",
                        "properties": {
                            "expressionEvaluationOptions": { "scope": "inner" },
                            "parameters": { "p": { "value": "[parameters('p')]" } },
                            "template": t,
                        }
                    }]
                })
            } else {
                t
            }
        })
}

fn corpus() -> &'static [Value] {
    static CORPUS: OnceLock<Vec<Value>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let primary = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/corpus/azure-nsg");
        let worktree = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus/azure-nsg");
        let dir = std::env::var("KUBE_NSG_AZURE_CORPUS")
            .ok()
            .unwrap_or_else(|| {
                [primary, worktree]
                    .into_iter()
                    .find(|d| std::path::Path::new(d).join("MANIFEST.md").is_file())
                    .unwrap_or_else(|| {
                        panic!("the Azure NSG corpus is missing: not in {primary} nor {worktree}")
                    })
                    .to_string()
            });
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            // The big REST list makes each case slow; its shape is covered by 29 and 30.
            .filter(|p| std::fs::metadata(p).unwrap().len() < 100_000)
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    })
}

/// Replaces the `n`-th node (pre-order, modulo the node count) of `v` by `with`.
fn mutate(v: &mut Value, n: usize, with: Value) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(m) => m.values().map(count).sum(),
            _ => 0,
        }
    }
    fn go(v: &mut Value, n: &mut usize, with: &mut Option<Value>) {
        if *n == 0 {
            if let Some(w) = with.take() {
                *v = w;
            }
            return;
        }
        *n -= 1;
        let children: Vec<&mut Value> = match v {
            Value::Array(a) => a.iter_mut().collect(),
            Value::Object(m) => m.values_mut().collect(),
            _ => vec![],
        };
        for c in children {
            if with.is_none() {
                return;
            }
            go(c, n, with);
        }
    }
    let mut n = n % count(v);
    go(v, &mut n, &mut Some(with));
}

fn check(text: &str) -> Result<(), TestCaseError> {
    match import_azure("prop.json", text, "ns") {
        Ok(i) => check_import(&i),
        Err(ImportError::NoNsg { .. }) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!(
            "unexpected error for valid JSON: {e}"
        ))),
    }
}

fn check_import(i: &Import) -> Result<(), TestCaseError> {
    let s = i.stats;
    prop_assert_eq!(s.rules_converted + s.rules_skipped, s.rules_found);
    prop_assert_eq!(s.rules_skipped, i.count(IssueKind::Skipped));
    for n in &i.nsgs {
        prop_assert!(
            Nsg::try_from(n).is_ok(),
            "invalid group: {:?}",
            Nsg::try_from(n).err()
        );
        prop_assert!(
            n.spec
                .security_rules
                .iter()
                .all(|r| (1..=80).contains(&r.name.chars().count()))
        );
    }
    let yaml = i.to_yaml();
    let docs = serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(<Value as serde::Deserialize>::deserialize)
        .collect::<Result<Vec<_>, _>>();
    prop_assert!(
        docs.is_ok(),
        "YAML does not parse: {:?}\n{}",
        docs.err(),
        yaml
    );
    // Comments only (nothing converted) read as one empty document.
    let objects = docs.unwrap().into_iter().filter(|d| !d.is_null()).count();
    prop_assert_eq!(objects, i.nsgs.len() + i.asgs.len());
    let list: Value = serde_json::from_str(&i.to_json()).unwrap();
    prop_assert_eq!(
        list["items"].as_array().map(Vec::len),
        Some(i.nsgs.len() + i.asgs.len())
    );
    let _ = i.report();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_json_never_panics(v in value()) {
        check(&v.to_string())?;
    }

    #[test]
    fn random_templates_import_soundly(t in template_like()) {
        check(&t.to_string())?;
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = import_azure_bytes("bytes.json", &bytes, "ns");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn mutated_corpus_files_import_soundly(
        file in any::<prop::sample::Index>(),
        mutations in prop::collection::vec((any::<usize>(), value()), 1..4),
    ) {
        let mut doc = file.get(corpus()).clone();
        for (n, with) in mutations {
            mutate(&mut doc, n, with);
        }
        check(&doc.to_string())?;
    }
}

#[test]
fn deep_nesting_is_bounded() {
    // serde_json refuses more than 128 levels; just under that, with an NSG at the bottom.
    let mut v = json!({"type": "Microsoft.Network/networkSecurityGroups", "name": "deep", "properties": {"securityRules": []}});
    for _ in 0..120 {
        v = json!([v]);
    }
    let i = import_azure("deep.json", &v.to_string(), "ns").unwrap();
    assert_eq!(i.nsgs.len(), 1);
    let too_deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    assert!(matches!(
        import_azure("deep.json", &too_deep, "ns"),
        Err(ImportError::Json { .. })
    ));

    // Deeply nested expressions and variables that name each other in a cycle.
    let expr = format!("[{}'10.0.0.0/8'{}]", "concat(".repeat(40), ")".repeat(40));
    let very = format!("[{}'x'{}]", "concat(".repeat(400), ")".repeat(400));
    let t = json!({
        "$schema": "x", "contentVersion": "1.0.0.0",
        "variables": {"a": "[variables('b')]", "b": "[variables('a')]"},
        "resources": [{"type": "Microsoft.Network/networkSecurityGroups", "name": "[variables('a')]", "properties": {"securityRules": [
            {"name": "nested", "properties": {"protocol": "*", "access": "Allow", "direction": "Inbound", "priority": 100,
                "sourceAddressPrefix": expr, "destinationAddressPrefix": "*", "sourcePortRange": "*", "destinationPortRange": "*"}},
            {"name": "very", "properties": {"protocol": "*", "access": "Allow", "direction": "Inbound", "priority": 110,
                "sourceAddressPrefix": very, "destinationAddressPrefix": "*", "sourcePortRange": "*", "destinationPortRange": "*"}}
        ]}}]
    });
    let i = import_azure("t.json", &t.to_string(), "ns").unwrap();
    assert_eq!(
        i.nsgs[0].spec.security_rules[0]
            .source_address_prefix
            .as_deref(),
        Some("10.0.0.0/8")
    );
    assert!(
        i.issues
            .iter()
            .any(|x| x.rule.as_deref() == Some("very") && x.message.contains("too deeply"))
    );
    assert!(
        i.issues
            .iter()
            .any(|x| x.field.as_deref() == Some("name") && x.message.contains("cycle"))
    );
}
