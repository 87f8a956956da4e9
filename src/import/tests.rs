//! Conversion rules on small synthetic inputs; the real exports are in `tests/import_corpus.rs`.

use serde_json::{Value, json};

use super::*;
use crate::api::{Access, Direction, Protocol, SecurityRule};
use crate::model::Nsg;

/// Imports and checks what must hold for every import: each group validates, each rule is
/// converted or reported.
fn import(v: &Value) -> Import {
    let i = import_azure("test.json", &v.to_string(), "team").expect("imports");
    check(&i);
    i
}

fn check(i: &Import) {
    for nsg in &i.nsgs {
        Nsg::try_from(nsg).unwrap_or_else(|e| panic!("invalid output: {e}"));
    }
    assert_eq!(
        i.stats.rules_converted + i.stats.rules_skipped,
        i.stats.rules_found,
        "{:#?}",
        i.issues
    );
    assert_eq!(
        i.stats.rules_converted,
        i.nsgs
            .iter()
            .map(|n| n.spec.security_rules.len())
            .sum::<usize>()
    );
    assert_eq!(i.stats.rules_skipped, i.count(IssueKind::Skipped));
}

fn rule(name: &str, priority: Value, props: Value) -> Value {
    let mut p = json!({
        "protocol": "Tcp", "sourcePortRange": "*", "destinationPortRange": "80",
        "sourceAddressPrefix": "*", "destinationAddressPrefix": "*",
        "access": "Allow", "priority": priority, "direction": "Inbound"
    });
    for (k, v) in props.as_object().unwrap() {
        if v.is_null() {
            p.as_object_mut().unwrap().remove(k);
        } else {
            p[k] = v.clone();
        }
    }
    json!({ "name": name, "properties": p })
}

fn template(resources: Value) -> Value {
    json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {
            "nsgName": {"type": "string", "defaultValue": "web_NSG"},
            "prefix": {"type": "string", "defaultValue": "10.1.0.0/24"},
            "free": {"type": "string"},
            "location": {"type": "string", "defaultValue": "[resourceGroup().location]"}
        },
        "variables": {"port": 8443, "asgName": "Web_Servers"},
        "resources": resources
    })
}

fn nsg(name: &str, rules: Vec<Value>) -> Value {
    json!({
        "type": "Microsoft.Network/networkSecurityGroups",
        "name": name,
        "properties": { "securityRules": rules }
    })
}

fn only_rules(i: &Import) -> &[SecurityRule] {
    assert_eq!(i.nsgs.len(), 1, "{:#?}", i.issues);
    &i.nsgs[0].spec.security_rules
}

fn skipped_message<'a>(i: &'a Import, rule: &str) -> &'a str {
    i.issues_of(IssueKind::Skipped)
        .find(|x| x.rule.as_deref() == Some(rule))
        .map(|x| x.message.as_str())
        .unwrap_or_else(|| panic!("no skipped issue for {rule}: {:#?}", i.issues))
}

#[test]
fn invalid_json_names_file_and_line() {
    let err = import_azure("nsg.json", "{\n  \"a\": 1,\n  \"b\": ,\n}", "team").unwrap_err();
    match &err {
        ImportError::Json { file, line, .. } => {
            assert_eq!(file, "nsg.json");
            assert_eq!(*line, 3);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().starts_with("nsg.json:3:"), "{err}");
    for text in ["", "   ", "{", "[1,", "\u{feff}", "nul", "{\"a\": 1} x"] {
        assert!(
            matches!(
                import_azure("f", text, "team"),
                Err(ImportError::Json { .. })
            ),
            "{text:?}"
        );
    }
}

#[test]
fn no_nsg_is_a_clear_error() {
    for v in [
        json!({}),
        json!([]),
        json!("text"),
        json!(42),
        json!({"value": []}),
        json!({"$schema": "x", "resources": [{"type": "Microsoft.Network/virtualNetworks", "name": "v"}]}),
        // A template's variables may hold rule-like objects: they are not rules.
        template(json!([]))
            .as_object()
            .map(|t| {
                let mut t = t.clone();
                t.insert(
                    "variables".into(),
                    json!({"rules": [{"access": "Allow", "direction": "Inbound"}]}),
                );
                Value::Object(t)
            })
            .unwrap(),
    ] {
        let err = import_azure("empty.json", &v.to_string(), "team").unwrap_err();
        assert!(matches!(err, ImportError::NoNsg { .. }), "{v}: {err:?}");
        assert!(
            err.to_string()
                .starts_with("empty.json: no Azure network security group found")
        );
    }
}

#[test]
fn bom_crlf_and_utf16_are_accepted() {
    let text = "\u{feff}{\r\n  \"value\": [\r\n    {\"name\": \"a\", \"type\": \"Microsoft.Network/networkSecurityGroups\", \"properties\": {\"securityRules\": []}}\r\n  ]\r\n}\r\n";
    let i = import_azure("bom.json", text, "team").unwrap();
    assert_eq!(i.nsgs.len(), 1);
    let mut utf16 = vec![0xFF, 0xFE];
    utf16.extend(
        text.trim_start_matches('\u{feff}')
            .encode_utf16()
            .flat_map(u16::to_le_bytes),
    );
    assert_eq!(
        import_azure_bytes("ps.json", &utf16, "team")
            .unwrap()
            .nsgs
            .len(),
        1
    );
}

#[test]
fn comments_are_accepted_and_reported() {
    let text = "// exported\n{\"name\": \"a\", /* the group */ \"type\": \"Microsoft.Network/networkSecurityGroups\", \"properties\": {\"securityRules\": []}}";
    let i = import_azure("c.json", text, "team").unwrap();
    assert_eq!(i.nsgs.len(), 1);
    assert!(i.issues[0].message.contains("comments"));
}

#[test]
fn protocols_are_case_insensitive_and_ipsec_is_reported() {
    let rules = vec![
        rule("tcp", json!(100), json!({"protocol": "TCP"})),
        rule("udp", json!(110), json!({"protocol": "udp"})),
        rule(
            "any",
            json!(120),
            json!({"protocol": "Any", "destinationPortRange": "*"}),
        ),
        rule("star", json!(130), json!({"protocol": "*"})),
        rule(
            "icmp",
            json!(140),
            json!({"protocol": "ICMP", "destinationPortRange": "*"}),
        ),
        rule("esp", json!(150), json!({"protocol": "Esp"})),
        rule("ah", json!(160), json!({"protocol": "Ah"})),
        rule("gre", json!(170), json!({"protocol": "Gre"})),
        rule("missing", json!(180), json!({"protocol": null})),
    ];
    let i = import(&json!([nsg("n", rules)]));
    let protocols: Vec<(&str, Protocol)> = only_rules(&i)
        .iter()
        .map(|r| (r.name.as_str(), r.protocol))
        .collect();
    assert_eq!(
        protocols,
        [
            ("tcp", Protocol::Tcp),
            ("udp", Protocol::Udp),
            ("any", Protocol::Any),
            ("star", Protocol::Any),
            ("icmp", Protocol::Icmp)
        ]
    );
    assert!(skipped_message(&i, "esp").contains("Esp (IPsec) is not supported"));
    assert!(skipped_message(&i, "ah").contains("Ah (IPsec)"));
    assert!(skipped_message(&i, "gre").contains("\"Gre\" is not supported"));
    assert!(skipped_message(&i, "missing").contains("is missing"));
    assert_eq!(i.stats.rules_skipped, 4);
}

#[test]
fn ports_as_numbers_ranges_and_lists() {
    let rules = vec![
        rule(
            "number",
            json!(100),
            json!({"destinationPortRange": 443, "sourcePortRange": 1024}),
        ),
        rule(
            "degenerate",
            json!(110),
            json!({"destinationPortRange": "22-22"}),
        ),
        rule(
            "full",
            json!(120),
            json!({"destinationPortRange": "0-65535"}),
        ),
        rule(
            "list",
            json!(130),
            json!({"destinationPortRange": null, "destinationPortRanges": [22, "8080-8084", "443-443"]}),
        ),
        rule(
            "rest",
            json!(140),
            json!({"destinationPortRange": "", "destinationPortRanges": ["80"], "sourcePortRanges": []}),
        ),
        rule("big", json!(150), json!({"destinationPortRange": "65536"})),
        rule(
            "reversed",
            json!(160),
            json!({"destinationPortRange": "90-80"}),
        ),
        rule("both", json!(170), json!({"destinationPortRanges": ["81"]})),
        rule("float", json!(180), json!({"destinationPortRange": 80.5})),
        rule("absent", json!(190), json!({"sourcePortRange": null})),
    ];
    let i = import(&json!([nsg("n", rules)]));
    let r = only_rules(&i);
    assert_eq!(r[0].destination_port_range.as_deref(), Some("443"));
    assert_eq!(r[0].source_port_range.as_deref(), Some("1024"));
    assert_eq!(r[1].destination_port_range.as_deref(), Some("22"));
    assert_eq!(r[2].destination_port_range.as_deref(), Some("*"));
    assert_eq!(
        r[3].destination_port_ranges,
        Some(vec!["22".into(), "8080-8084".into(), "443".into()])
    );
    assert_eq!(r[4].destination_port_ranges, Some(vec!["80".into()]));
    assert_eq!(r[4].destination_port_range, None);
    assert_eq!(r[5].name, "absent");
    assert_eq!(r[5].source_port_range, None);
    assert!(
        i.issues
            .iter()
            .any(|x| x.kind == IssueKind::Approximated && x.rule.as_deref() == Some("absent"))
    );
    assert!(skipped_message(&i, "big").contains("not a port number"));
    assert!(skipped_message(&i, "reversed").contains("reversed"));
    assert!(skipped_message(&i, "both").contains("Azure takes one of them"));
    assert!(skipped_message(&i, "float").contains("expected a port"));
}

#[test]
fn priorities_directions_and_access_are_lenient_but_bounded() {
    let rules = vec![
        rule(
            "string",
            json!("200"),
            json!({"direction": "inbound", "access": "DENY"}),
        ),
        rule("float", json!(300.0), json!({"direction": "OUTBOUND"})),
        rule("low", json!(99), json!({})),
        rule("high", json!(4097), json!({})),
        rule("default", json!(65000), json!({})),
        rule("text", json!("first"), json!({})),
        rule("object", json!({"p": 1}), json!({})),
        rule("sideways", json!(400), json!({"direction": "Sideways"})),
        rule("maybe", json!(500), json!({"access": "Maybe"})),
    ];
    let i = import(&json!([nsg("n", rules)]));
    let r = only_rules(&i);
    assert_eq!(
        (r[0].priority, r[0].direction, r[0].access),
        (200, Direction::Inbound, Access::Deny)
    );
    assert_eq!((r[1].priority, r[1].direction), (300, Direction::Outbound));
    assert_eq!(r.len(), 2);
    assert!(skipped_message(&i, "low").contains("outside Azure's range 100..4096"));
    assert!(skipped_message(&i, "high").contains("4097"));
    assert!(skipped_message(&i, "default").contains("65000"));
    assert!(skipped_message(&i, "text").contains("not an integer"));
    assert!(skipped_message(&i, "object").contains("expected a number"));
    assert!(skipped_message(&i, "sideways").contains("neither Inbound nor Outbound"));
    assert!(skipped_message(&i, "maybe").contains("neither Allow nor Deny"));
}

#[test]
fn wrong_types_are_reported_not_panics() {
    let rules = vec![
        json!("a string"),
        json!(42),
        json!(null),
        json!({"name": 7, "properties": {}}),
        json!({"name": "props", "properties": [1, 2]}),
        rule("prefix", json!(100), json!({"sourceAddressPrefix": 10})),
        rule(
            "prefixes",
            json!(110),
            json!({"sourceAddressPrefix": null, "sourceAddressPrefixes": "10.0.0.0/8"}),
        ),
        rule(
            "listitem",
            json!(120),
            json!({"sourceAddressPrefix": null, "sourceAddressPrefixes": ["10.0.0.0/8", {}]}),
        ),
        rule(
            "asgs",
            json!(130),
            json!({"destinationAddressPrefix": null, "destinationApplicationSecurityGroups": [{"id": 5}]}),
        ),
        rule(
            "asgid",
            json!(140),
            json!({"destinationAddressPrefix": null, "destinationApplicationSecurityGroups": [{"id": "/subscriptions/x/virtualNetworks/v"}]}),
        ),
        rule(
            "description",
            json!(150),
            json!({"description": {"text": "x"}}),
        ),
        rule("protocol", json!(160), json!({"protocol": 6})),
    ];
    let mut group = nsg("n", rules);
    group["properties"]["defaultSecurityRules"] = json!("nope");
    let i = import(
        &json!([group, {"type": "Microsoft.Network/networkSecurityGroups", "name": "m", "properties": {"securityRules": {"a": 1}}}]),
    );
    assert_eq!(i.stats.rules_found, 12);
    assert_eq!(i.stats.rules_converted, 1, "{:#?}", i.issues);
    assert_eq!(i.nsgs[0].spec.security_rules[0].name, "description");
    assert_eq!(i.nsgs[0].spec.security_rules[0].description, None);
    assert!(skipped_message(&i, "prefix").contains("expected a string"));
    assert!(skipped_message(&i, "prefixes").contains("expected an array"));
    assert!(skipped_message(&i, "listitem").contains("expected a string"));
    assert!(skipped_message(&i, "asgs").contains("expected an object with an \"id\""));
    assert!(skipped_message(&i, "asgid").contains("not the id of an application security group"));
    assert!(skipped_message(&i, "props").contains("expected an object"));
    assert!(skipped_message(&i, "protocol").contains("expected a string"));
    assert!(
        i.issues
            .iter()
            .any(|x| x.field.as_deref() == Some("securityRules")
                && x.message.contains("not an array"))
    );
    assert!(
        i.issues
            .iter()
            .any(|x| x.field.as_deref() == Some("defaultSecurityRules"))
    );
}

#[test]
fn addresses_tags_and_host_bits() {
    let rules = vec![
        rule(
            "tag",
            json!(100),
            json!({"sourceAddressPrefix": "Storage.WestEurope", "destinationAddressPrefix": "VirtualNetwork"}),
        ),
        rule(
            "v6",
            json!(110),
            json!({"sourceAddressPrefix": "ace:cab:deca:deed::/64", "destinationAddressPrefix": null, "destinationAddressPrefixes": ["10.0.0.4", "fd00::/8"]}),
        ),
        rule(
            "hostbits",
            json!(120),
            json!({"sourceAddressPrefix": " 10.0.0.1/24 "}),
        ),
        rule(
            "bad",
            json!(130),
            json!({"sourceAddressPrefix": "10.0.0.0/33"}),
        ),
        rule(
            "both",
            json!(140),
            json!({"sourceAddressPrefixes": ["10.0.0.0/8"]}),
        ),
        rule("none", json!(150), json!({"sourceAddressPrefix": null})),
        rule(
            "any",
            json!(160),
            json!({"sourceAddressPrefix": "Any", "destinationAddressPrefix": "0.0.0.0/0"}),
        ),
        rule(
            "long-item",
            json!(170),
            json!({"sourceAddressPrefix": null, "sourceAddressPrefixes": [format!("Tag{}", "x".repeat(70))]}),
        ),
    ];
    let i = import(&json!({"value": [nsg("n", rules)]}));
    let r = only_rules(&i);
    assert_eq!(
        r[0].source_address_prefix.as_deref(),
        Some("Storage.WestEurope")
    );
    assert_eq!(
        r[1].destination_address_prefixes,
        Some(vec!["10.0.0.4".into(), "fd00::/8".into()])
    );
    assert_eq!(r[2].source_address_prefix.as_deref(), Some("10.0.0.0/24"));
    assert!(
        i.issues
            .iter()
            .any(|x| x.kind == IssueKind::Approximated && x.message.contains("host bits"))
    );
    assert_eq!(r[3].source_address_prefix.as_deref(), Some("Any"));
    assert!(skipped_message(&i, "bad").contains("not a valid"));
    assert!(skipped_message(&i, "both").contains("Azure takes one of them"));
    assert!(skipped_message(&i, "none").contains("is missing"));
    assert!(skipped_message(&i, "long-item").contains("longer than 64 characters"));
    let tags = i
        .issues
        .iter()
        .find(|x| x.message.contains("service tags"))
        .unwrap();
    assert!(
        tags.message.contains("Storage.WestEurope") && tags.message.contains("storage.westeurope")
    );
    assert!(!tags.message.contains("VirtualNetwork"));
}

#[test]
fn invalid_groups_are_never_emitted() {
    let rules = vec![
        rule("first", json!(100), json!({})),
        rule("same-priority", json!(100), json!({})),
        rule("first", json!(110), json!({})),
        rule("icmp-ports", json!(120), json!({"protocol": "Icmp"})),
        rule("out", json!(100), json!({"direction": "Outbound"})),
    ];
    let i = import(&json!([nsg("n", rules)]));
    let names: Vec<&str> = only_rules(&i).iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["first", "out"]);
    assert!(skipped_message(&i, "same-priority").contains("already used by rule \"first\""));
    assert!(skipped_message(&i, "icmp-ports").contains("Icmp has no ports"));
    assert!(skipped_message(&i, "first").contains("duplicates the name"));
}

#[test]
fn at_most_the_crd_bound_of_rules() {
    let max = crate::model::RuleLimits::RULES_PER_GROUP;
    let rules: Vec<Value> = (0..max + 2)
        .map(|n| rule(&format!("r{n}"), json!(100 + n), json!({})))
        .collect();
    let i = import(&json!([nsg("n", rules)]));
    assert_eq!(i.stats.rules_converted, max);
    let last = format!("r{}", max + 1);
    assert!(skipped_message(&i, &last).contains(&format!("at most {max}")));
}

#[test]
fn rule_names_are_kept_or_fixed() {
    let long = "x".repeat(90);
    let rules = vec![
        rule(
            "Microsoft.Sql-managedInstances_UseOnly_mi-v10",
            json!(100),
            json!({}),
        ),
        rule("allow http", json!(110), json!({})),
        rule(&long, json!(120), json!({})),
        json!({"properties": rule("x", json!(130), json!({}))["properties"]}),
    ];
    let i = import(&json!([nsg("n", rules)]));
    let names: Vec<&str> = only_rules(&i).iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Microsoft.Sql-managedInstances_UseOnly_mi-v10",
            "allow-http",
            &long[..80]
        ]
    );
    assert_eq!(i.count(IssueKind::Renamed), 2);
    assert!(
        i.issues_of(IssueKind::Skipped)
            .any(|x| x.field.as_deref() == Some("name") && x.message == "is missing")
    );
}

#[test]
fn group_names_become_kubernetes_names() {
    let i = import(&json!([
        nsg("myNSG_01", vec![]),
        nsg("MYNSG-01", vec![]),
        nsg("ok-name", vec![]),
        nsg("ÅÄÖ", vec![])
    ]));
    let names: Vec<&str> = i
        .nsgs
        .iter()
        .map(|n| n.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(names, ["mynsg-01", "mynsg-01-2", "ok-name", "imported-nsg"]);
    assert_eq!(i.count(IssueKind::Renamed), 3);
    assert_eq!(
        i.nsgs[0].metadata.annotations.as_ref().unwrap()["kubensg.io/azure-name"],
        "myNSG_01"
    );
    assert!(
        i.nsgs
            .iter()
            .all(|n| n.spec.subnet && n.spec.pod_selector.is_none())
    );
    assert!(
        i.nsgs
            .iter()
            .all(|n| n.metadata.namespace.as_deref() == Some("team"))
    );
    assert!(i.issues.iter().any(|x| {
        x.nsg.is_none()
            && x.message
                .contains("4 groups are imported into namespace team")
    }));
}

#[test]
fn template_values_are_resolved_only_when_fixed() {
    let rules = vec![
        rule(
            "param",
            json!(100),
            json!({"sourceAddressPrefix": "[parameters('prefix')]"}),
        ),
        rule(
            "var",
            json!(110),
            json!({"destinationPortRange": "[variables('port')]"}),
        ),
        rule(
            "free",
            json!(120),
            json!({"sourceAddressPrefix": "[parameters('free')]"}),
        ),
        rule(
            "regional",
            json!(130),
            json!({"destinationAddressPrefix": "[format('Storage.{0}', parameters('location'))]"}),
        ),
        rule(
            "escaped",
            json!(140),
            json!({"description": "[[not an expression]"}),
        ),
        rule("priority", json!("[add(100, 50)]"), json!({})),
        rule(
            "garbled",
            json!(150),
            json!({"sourceAddressPrefix": "[concat('a']"}),
        ),
    ];
    let i = import(&template(json!([nsg("[parameters('nsgName')]", rules)])));
    let r = only_rules(&i);
    assert_eq!(i.nsgs[0].metadata.name.as_deref(), Some("web-nsg"));
    assert_eq!(r[0].source_address_prefix.as_deref(), Some("10.1.0.0/24"));
    assert_eq!(r[1].destination_port_range.as_deref(), Some("8443"));
    assert_eq!(r[2].description.as_deref(), Some("[not an expression]"));
    let resolved: Vec<&ImportIssue> = i.issues_of(IssueKind::Resolved).collect();
    assert!(resolved.iter().any(|x| x.rule.as_deref() == Some("param")
        && x.message.contains("default of parameter prefix")
        && x.message.contains("a deployment may pass another value")));
    assert!(
        resolved
            .iter()
            .any(|x| x.rule.as_deref() == Some("var") && x.message.contains("variable port"))
    );
    assert!(
        resolved
            .iter()
            .any(|x| x.rule.is_none() && x.field.as_deref() == Some("name"))
    );
    assert!(skipped_message(&i, "free").contains("[parameters('free')]"));
    assert!(skipped_message(&i, "free").contains("no default value"));
    assert!(skipped_message(&i, "regional").contains("resourceGroup() depends on the deployment"));
    assert!(skipped_message(&i, "priority").contains("add() is not evaluated"));
    assert!(skipped_message(&i, "garbled").contains("cannot be parsed"));
}

#[test]
fn unresolvable_names_get_a_fallback() {
    let i = import(&template(json!([nsg(
        "[concat(parameters('free'), '-nsg')]",
        vec![]
    )])));
    assert_eq!(i.nsgs[0].metadata.name.as_deref(), Some("free-nsg"));
    let renamed = i.issues_of(IssueKind::Renamed).next().unwrap();
    assert!(
        renamed
            .message
            .contains("[concat(parameters('free'), '-nsg')]"),
        "{}",
        renamed.message
    );
    assert!(renamed.message.contains("imported as \"free-nsg\""));
}

#[test]
fn copy_loops_and_rule_expressions_are_unsupported() {
    let mut looped = nsg("looped", vec![]);
    looped["properties"] = json!({"copy": [{"name": "securityRules", "count": "[length(parameters('rules'))]", "input": {}}]});
    let mut expr = nsg("expr", vec![]);
    expr["properties"]["securityRules"] = json!("[variables('rules')]");
    let mut many = nsg("[concat('nsg', copyIndex())]", vec![]);
    many["copy"] = json!({"name": "nsgLoop", "count": 3});
    let i = import(&template(json!([looped, expr, many])));
    assert_eq!(i.nsgs.len(), 3);
    assert_eq!(i.stats.rules_found, 0);
    assert_eq!(i.count(IssueKind::Unsupported), 3, "{:#?}", i.issues);
    assert!(
        i.issues
            .iter()
            .any(|x| x.message.contains("copy loop") && x.field.as_deref() == Some("copy"))
    );
    assert!(
        i.issues
            .iter()
            .any(|x| x.message.contains("[variables('rules')]"))
    );
}

#[test]
fn rule_resources_in_copy_loops_are_reported() {
    let mut looped = rule(
        "[parameters('rules')[copyIndex()].name]",
        json!(100),
        json!({}),
    );
    looped["name"] = json!("[concat('web_NSG/', parameters('rules')[copyIndex()].name)]");
    looped["type"] = json!("Microsoft.Network/networkSecurityGroups/securityRules");
    looped["copy"] = json!({"name": "rules", "count": "[length(parameters('rules'))]"});
    let i = import(&template(json!([
        nsg("[parameters('nsgName')]", vec![]),
        looped
    ])));
    assert_eq!(i.stats.rules_found, 1);
    let skipped = i.issues_of(IssueKind::Skipped).next().unwrap();
    assert_eq!(skipped.nsg.as_deref(), Some("web-nsg"));
    assert!(skipped.message.contains("copy loop"), "{skipped}");
}

#[test]
fn conditions_are_reported() {
    let mut a = nsg("a", vec![]);
    a["condition"] = json!(false);
    let mut b = nsg("b", vec![]);
    b["condition"] = json!("[equals(parameters('free'), 'x')]");
    let i = import(&template(json!([a, b])));
    assert_eq!(i.count(IssueKind::Approximated), 3); // two conditions and the namespace note
    assert!(
        i.issues
            .iter()
            .any(|x| x.message.contains("condition false"))
    );
    assert!(
        i.issues
            .iter()
            .any(|x| x.message.contains("deployed only when"))
    );
}

#[test]
fn separate_rule_resources_attach_to_their_group() {
    let child = |name: &str, prio: i64| {
        let mut r = rule("ignored", json!(prio), json!({}));
        r["name"] = json!(name);
        r["type"] = json!("Microsoft.Network/networkSecurityGroups/securityRules");
        r
    };
    let mut nested_child = child("nested", 130);
    nested_child["type"] = json!("securityRules");
    let mut parent = nsg(
        "[parameters('free')]",
        vec![rule("inline", json!(100), json!({}))],
    );
    parent["resources"] = json!([nested_child]);
    let mut conditional = child("[concat(parameters('free'), '/byexpr')]", 110);
    conditional["condition"] = json!("[parameters('free')]");
    let i = import(&template(json!([
        parent,
        conditional,
        child("[format('{0}/byformat', parameters('free'))]", 120),
        child("web_NSG/byliteral", 140),
        child("[concat(parameters('nsgName'), '/byresolved')]", 150),
        child("elsewhere/orphan", 100),
        child("[concat(parameters('location'), '/lost')]", 160),
        child("[concat(parameters('free'), '/', parameters('free'))]", 170),
    ])));
    assert_eq!(i.stats.rules_found, 9);
    let rules_of = |name: &str| -> Vec<&str> {
        let n = i
            .nsgs
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .unwrap();
        n.spec
            .security_rules
            .iter()
            .map(|r| r.name.as_str())
            .collect()
    };
    // The group named by an unresolvable expression takes the rules whose parent is the
    // same expression, whatever the spelling (concat or format).
    assert_eq!(rules_of("free"), ["inline", "nested", "byexpr", "byformat"]);
    // A literal parent, or one that resolves, that is not in the file: a group of its own.
    assert_eq!(rules_of("web-nsg"), ["byliteral", "byresolved"]);
    assert_eq!(rules_of("elsewhere"), ["orphan"]);
    assert_eq!(i.nsgs.len(), 3);
    assert!(
        i.issues
            .iter()
            .any(|x| x.message.contains("\"elsewhere\" is not in the file"))
    );
    let lost = i
        .issues_of(IssueKind::Skipped)
        .find(|x| x.nsg.is_none())
        .unwrap();
    assert!(
        lost.message.contains("[parameters('location')]")
            && lost.message.contains("matches no group"),
        "{lost}"
    );
    assert!(
        i.issues_of(IssueKind::Skipped)
            .any(|x| x.nsg.as_deref() == Some("free") && x.message.contains("rule's name part"))
    );
    assert!(i.issues.iter().any(|x| x.kind == IssueKind::Approximated
        && x.field.as_deref() == Some("condition")
        && x.rule.as_deref() == Some("byexpr")));
}

#[test]
fn separate_rules_match_resolved_group_names() {
    let child = |name: &str| {
        let mut r = rule("ignored", json!(200), json!({}));
        r["name"] = json!(name);
        r["type"] = json!("Microsoft.Network/networkSecurityGroups/securityRules");
        r
    };
    let i = import(&template(json!([
        nsg("[parameters('nsgName')]", vec![]),
        child("web_NSG/literal"),
        child("[concat(parameters('nsgName'), '/resolved')]"),
    ])));
    // Two rules of one group at priority 200: the second is reported, not emitted.
    assert_eq!(i.nsgs.len(), 1);
    assert_eq!(i.nsgs[0].spec.security_rules[0].name, "literal");
    assert!(skipped_message(&i, "resolved").contains("already used"));
}

#[test]
fn lone_rules_make_a_group() {
    let mut with_id = rule(
        "Allow-Web",
        json!(100),
        json!({"destinationPortRange": null, "destinationPortRanges": [80, 443]}),
    );
    with_id["id"] = json!(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/My_NSG/securityRules/Allow-Web"
    );
    let flat = {
        let r = rule("flat", json!(100), json!({}));
        let mut m = r["properties"].as_object().unwrap().clone();
        m.insert("name".into(), json!("flat"));
        Value::Object(m)
    };
    let i = import(&with_id);
    assert_eq!(i.nsgs[0].metadata.name.as_deref(), Some("my-nsg"));
    assert_eq!(
        i.nsgs[0].spec.security_rules[0].destination_port_ranges,
        Some(vec!["80".into(), "443".into()])
    );
    assert_eq!(i.stats.nsgs_found, 0);
    let j = import(&flat);
    assert_eq!(j.nsgs[0].metadata.name.as_deref(), Some("imported-nsg"));
    assert!(
        j.issues_of(IssueKind::Renamed)
            .any(|x| x.message.contains("name no group"))
    );
}

#[test]
fn az_flattened_output_and_wrappers() {
    let flat_rule = json!({
        "name": "ssh", "access": "Allow", "direction": "Inbound", "priority": 1000, "protocol": "Tcp",
        "sourceAddressPrefix": "*", "sourceAddressPrefixes": [], "sourcePortRange": "*", "sourcePortRanges": [],
        "destinationAddressPrefix": "*", "destinationAddressPrefixes": [], "destinationPortRange": "22", "destinationPortRanges": [],
        "type": "Microsoft.Network/networkSecurityGroups/securityRules"
    });
    let doc = json!({"NewNSG": {
        "name": "vm-nsg", "resourceGroup": "rg", "securityRules": [flat_rule],
        "defaultSecurityRules": [], "networkInterfaces": [{"id": "/x/networkInterfaces/nic1"}]
    }});
    let i = import(&doc);
    assert_eq!(
        only_rules(&i)[0].destination_port_range.as_deref(),
        Some("22")
    );
    assert!(
        i.issues
            .iter()
            .any(|x| x.field.as_deref() == Some("networkInterfaces")
                && x.message.contains("1 network interface"))
    );
}

#[test]
fn default_rules_are_checked() {
    let std = |name: &str, prio: u32, dir: &str, access: &str, src: &str, dst: &str| {
        json!({"name": name, "properties": {"priority": prio, "direction": dir, "access": access, "protocol": "*",
            "sourceAddressPrefix": src, "destinationAddressPrefix": dst, "sourcePortRange": "*", "destinationPortRange": "*"}})
    };
    let six = vec![
        std(
            "AllowVnetInBound",
            65000,
            "Inbound",
            "Allow",
            "VirtualNetwork",
            "VirtualNetwork",
        ),
        std(
            "AllowAzureLoadBalancerInBound",
            65001,
            "Inbound",
            "Allow",
            "AzureLoadBalancer",
            "*",
        ),
        std("DenyAllInBound", 65500, "Inbound", "Deny", "*", "*"),
        std(
            "AllowVnetOutBound",
            65000,
            "Outbound",
            "Allow",
            "VirtualNetwork",
            "VirtualNetwork",
        ),
        std(
            "AllowInternetOutBound",
            65001,
            "Outbound",
            "Allow",
            "*",
            "Internet",
        ),
        std(
            "DenyAllOutBound",
            65500,
            "Outbound",
            "Deny",
            "0.0.0.0/0",
            "*",
        ),
    ];
    let mut good = nsg("good", vec![]);
    good["properties"]["defaultSecurityRules"] = json!(six);
    let mut bad = nsg("bad", vec![]);
    let mut changed = six.clone();
    changed[2]["properties"]["access"] = json!("Allow");
    changed.pop();
    changed.push(json!({"name": "Extra", "properties": {}}));
    bad["properties"]["defaultSecurityRules"] = json!(changed);
    let i = import(&json!([good, bad]));
    assert_eq!(i.stats.default_rules_found, 12);
    let notes: Vec<&ImportIssue> = i
        .issues
        .iter()
        .filter(|x| x.field.as_deref() == Some("defaultSecurityRules"))
        .collect();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].nsg.as_deref(), Some("bad"));
    assert_eq!(notes[0].kind, IssueKind::Approximated);
    assert!(notes[0].message.contains("DenyAllInBound differs"));
    assert!(notes[0].message.contains("DenyAllOutBound"));
    assert!(notes[0].message.contains("\"Extra\""));
}

#[test]
fn application_security_groups_become_objects() {
    let asg = |name: &str| json!({"id": format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/applicationSecurityGroups/{name}")});
    let rules = vec![
        rule(
            "by-id",
            json!(100),
            json!({"sourceAddressPrefix": "", "sourceApplicationSecurityGroups": [asg("Web_Servers")], "destinationAddressPrefix": null, "destinationApplicationSecurityGroups": [asg("db")]}),
        ),
        rule(
            "by-resource-id",
            json!(110),
            json!({"destinationAddressPrefix": null, "destinationApplicationSecurityGroups": [{"id": "[resourceId('Microsoft.Network/applicationSecurityGroups', variables('asgName'))]"}]}),
        ),
        rule(
            "other-case",
            json!(120),
            json!({"destinationAddressPrefix": null, "destinationApplicationSecurityGroups": [asg("WEB-servers")]}),
        ),
        rule(
            "both",
            json!(130),
            json!({"sourceApplicationSecurityGroups": [asg("x")]}),
        ),
        rule(
            "unfixed",
            json!(140),
            json!({"destinationAddressPrefix": null, "destinationApplicationSecurityGroups": [{"id": "[resourceId('Microsoft.Network/applicationSecurityGroups', parameters('free'))]"}]}),
        ),
    ];
    let i = import(&template(json!([nsg("n", rules)])));
    let r = only_rules(&i);
    assert_eq!(r.len(), 3);
    assert_eq!(
        r[0].source_application_security_groups.as_ref().unwrap()[0].name,
        "web-servers"
    );
    assert_eq!(r[0].source_address_prefix, None);
    assert_eq!(
        r[1].destination_application_security_groups
            .as_ref()
            .unwrap()[0]
            .name,
        "web-servers"
    );
    let asgs: Vec<&str> = i
        .asgs
        .iter()
        .map(|a| a.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(asgs, ["db", "web-servers"]);
    assert!(
        i.asgs
            .iter()
            .all(|a| a.spec.pod_selector.is_none()
                && a.metadata.namespace.as_deref() == Some("team"))
    );
    assert!(i.issues.iter().any(|x| {
        x.message
            .contains("all become ApplicationSecurityGroup \"web-servers\"")
    }));
    assert!(
        i.issues
            .iter()
            .any(|x| x.message.contains("without podSelector")
                && x.message.contains(crate::model::ASG_ANNOTATION))
    );
    assert!(skipped_message(&i, "both").contains("address prefixes"));
    assert!(skipped_message(&i, "unfixed").contains("no default value"));
}

#[test]
fn nested_deployments_with_inner_scope() {
    let doc = json!({
        "$schema": "x", "contentVersion": "1.0.0.0",
        "parameters": {"outerPrefix": {"type": "string", "defaultValue": "10.9.0.0/16"}},
        "resources": [{
            "type": "Microsoft.Resources/deployments", "name": "net",
            "properties": {
                "expressionEvaluationOptions": {"scope": "inner"},
                "parameters": {"p": {"value": "[parameters('outerPrefix')]"}},
                "template": {
                    "$schema": "x", "contentVersion": "1.0.0.0",
                    "parameters": {"p": {"type": "string"}},
                    "variables": {"name": "inner-nsg"},
                    "resources": [nsg("[variables('name')]", vec![rule("r", json!(100), json!({"sourceAddressPrefix": "[parameters('p')]"}))])]
                }
            }
        }, {
            "type": "Microsoft.Resources/deployments", "name": "linked",
            "properties": {"templateLink": {"uri": "https://example.com/t.json"}}
        }]
    });
    let i = import(&doc);
    assert_eq!(i.nsgs[0].metadata.name.as_deref(), Some("inner-nsg"));
    assert_eq!(
        only_rules(&i)[0].source_address_prefix.as_deref(),
        Some("10.9.0.0/16")
    );
    assert!(
        i.issues.iter().any(|x| x.kind == IssueKind::Unsupported
            && x.message.contains("https://example.com/t.json"))
    );
}

#[test]
fn duplicate_ids_are_imported_once() {
    let mut a = nsg("a", vec![]);
    a["id"] = json!(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/a"
    );
    let i = import(&json!([a.clone(), a]));
    assert_eq!(i.nsgs.len(), 1);
    assert!(
        i.issues
            .iter()
            .any(|x| x.message.contains("appears a second time"))
    );
}

#[test]
fn yaml_output_parses_back_and_comments_cannot_inject() {
    let rules = vec![
        rule(
            "line\nbreak",
            json!(100),
            json!({"description": "multi\nline\n---\nkind: Secret"}),
        ),
        rule(
            "evil",
            json!(110),
            json!({"protocol": "Esp\n---\nkind: Secret"}),
        ),
    ];
    let i = import(
        &json!([nsg("n\n---\nkind: Secret", rules), {"type": "Microsoft.Network/networkSecurityGroups", "name": "other", "properties": {"securityRules": [
            rule("to-asg", json!(100), json!({"destinationAddressPrefix": null, "destinationApplicationSecurityGroups": [{"id": "/x/applicationSecurityGroups/web"}]}))
        ]}}]),
    );
    let yaml = i.to_yaml();
    let header: Vec<&str> = yaml.lines().take_while(|l| *l != "---").collect();
    assert!(header.iter().all(|l| l.starts_with('#')), "{yaml}");
    assert!(!yaml.lines().any(|l| l == "kind: Secret"), "{yaml}");
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[0]["kind"], "ApplicationSecurityGroup");
    let nsg: crate::api::NetworkSecurityGroup = serde_json::from_value(docs[1].clone()).unwrap();
    assert_eq!(
        (&nsg.metadata, &nsg.spec),
        (&i.nsgs[0].metadata, &i.nsgs[0].spec)
    );
    assert_eq!(
        nsg.spec.security_rules[0].description.as_deref(),
        Some("multi\nline\n---\nkind: Secret")
    );

    let json: Value = serde_json::from_str(&i.to_json()).unwrap();
    assert_eq!(json["kind"], "List");
    assert_eq!(json["items"].as_array().unwrap().len(), 3);
    assert_eq!(i.render(OutputFormat::Json), i.to_json());
    assert_eq!("YAML".parse::<OutputFormat>(), Ok(OutputFormat::Yaml));
    assert!("xml".parse::<OutputFormat>().is_err());

    let report = i.report();
    assert!(
        report.lines().all(|l| l.starts_with("test.json: ")),
        "{report}"
    );
    assert!(
        report
            .lines()
            .last()
            .unwrap()
            .contains("3 rules found, 2 converted, 1 skipped")
    );
}
