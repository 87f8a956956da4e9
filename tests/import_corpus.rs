//! `kube-nsg import azure` on the 38 real Azure NSG exports of the shared corpus
//! (`../shared/corpus/azure-nsg`, described by its MANIFEST.md): every file imports without
//! panic, finds the manifest's groups and rules, converts or reports every rule, and produces
//! objects that the project's own loader and validation accept.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use kube_nsg::api::{
    Access as ApiAccess, NetworkSecurityGroup, Protocol as ApiProtocol, SecurityRule,
};
use kube_nsg::cli::load::Objects;
use kube_nsg::eval::{Packet, evaluate};
use kube_nsg::import::{Import, IssueKind, import_azure, import_azure_bytes, import_azure_file};
use kube_nsg::model::{Access, Direction, Nsg, Protocol, RuleLimits};
use kube_nsg::resolve::Resolved;

/// One corpus file: what MANIFEST.md says (NSG objects, concrete rules, default rules), and
/// what the importer makes of it (groups produced, rules converted).
struct Expected {
    file: &'static str,
    /// The manifest's "NSGs" column: objects of type networkSecurityGroups.
    nsgs: usize,
    /// The manifest's "rules" column: concrete rule objects (separate ones included).
    rules: usize,
    /// The manifest's "+N default".
    defaults: usize,
    /// Groups produced: the NSGs, plus one for a lone rule whose group is not in the file.
    produced: usize,
    /// Rules converted; the others are reported as skipped (expressions the template does
    /// not fix, an empty list from a default). Reviewed one by one.
    converted: usize,
}

const fn e(
    file: &'static str,
    nsgs: usize,
    rules: usize,
    defaults: usize,
    produced: usize,
    converted: usize,
) -> Expected {
    Expected {
        file,
        nsgs,
        rules,
        defaults,
        produced,
        converted,
    }
}

#[rustfmt::skip]
const CORPUS: [Expected; 38] = [
    e("01-apim-external-vnet.json",                1, 18, 0, 1, 18),
    e("02-frontdoor-apim-nested-module.json",      1, 15, 0, 1, 15),
    e("03-frontdoor-apim-conditional-tag.json",    1, 14, 0, 1, 14),
    e("04-bastion-nsg.json",                       1, 10, 0, 1, 10),
    e("05-aml-secure-regional-tags.json",          1,  9, 0, 1,  7), // Storage.{location}, AzureContainerRegistry.{location}
    e("06-databricks-vnet-injection.json",         1,  6, 0, 1,  6),
    e("07-servicefabric-3-nodetype.json",          3, 30, 0, 3, 12), // 18 ports from variables not in the file
    e("08-multi-tier-service-networking.json",     3, 12, 0, 3, 12),
    e("09-nsg-dmz-in-vnet.json",                   3,  9, 0, 3,  9),
    e("10-dmz-nsg.json",                           1,  6, 0, 1,  6),
    e("11-redis-vnet-nsg.json",                    1,  9, 0, 1,  0), // every rule uses reference()
    e("12-sqlmi-azure-environment.json",           1,  8, 0, 1,  8),
    e("13-sqlmi-nested-vnet.json",                 1,  5, 0, 1,  2), // subnet range: parameter without default
    e("14-ase-azfirewall-vnet.json",               1, 17, 0, 1, 17),
    e("15-eshop-ilb-ase-prereq.json",              1, 17, 0, 1, 17),
    e("16-application-security-group.json",        1,  2, 0, 1,  2),
    e("17-nsg-rules-copy-loop.json",               1,  0, 0, 1,  0),
    e("18-sap-rules-from-variables.json",          1,  0, 0, 1,  0),
    e("19-azfw-forced-tunneling-conditional.json", 1,  0, 0, 1,  0),
    e("20-chef-automate-ha-nsgs.json",             2, 13, 0, 2, 11), // object parameter without default
    e("21-solace-shared-resources.json",           1, 16, 0, 1, 16),
    e("22-couchbase.json",                         1,  9, 0, 1,  9),
    e("23-darktrace-vsensor.json",                 1,  3, 0, 1,  2), // split() of a parameter
    e("24-hdinsight-secure-vnet.json",             1,  2, 0, 1,  2),
    e("25-batch-pool-no-public-ip.json",           1,  1, 0, 1,  1),
    e("26-ipv6-in-vnet.json",                      1,  4, 0, 1,  4),
    e("27-parameterized-linked-templates.json",    3,  8, 0, 3,  8),
    e("28-c7n-rest-list-43-nsgs.json",            43, 133, 258, 43, 133),
    e("29-c7n-rest-list-multiple-ports.json",      2,  8, 12, 2,  8),
    e("30-c7n-rest-list-deny-implicit.json",       3,  5, 18, 3,  5),
    e("31-c7n-arm-template.json",                  1,  6, 6, 1,  6),
    e("32-checkov-nsg-plus-child-rule.json",       1,  2, 0, 1,  1), // the child's destination: parameter without default
    e("33-azcli-nsg-create-output.json",           1,  0, 1, 1,  0),
    e("34-azcli-nsg-rule-create-output.json",      0,  1, 0, 1,  1), // a lone rule: its group is made from its id
    e("35-aro-rp-production-predeploy.json",       2,  4, 0, 2,  3), // the child's prefixes default to []
    e("36-azurestack-hybrid-ase.json",             1, 20, 0, 1, 20),
    e("37-azurestack-ethereum-leader.json",        2,  9, 0, 2,  5), // replace() builds the VNet prefix
    e("38-docs-variable-copy-loop.json",           1,  0, 0, 1,  0),
];

const NAMESPACE: &str = "imported";

/// The corpus directory: `../shared/corpus/azure-nsg` from the repository root (where CI
/// has it), or `../../shared/...` from a git worktree under `wt/`, or `$KUBE_NSG_AZURE_CORPUS`.
fn corpus_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KUBE_NSG_AZURE_CORPUS") {
        return dir.into();
    }
    let primary = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/corpus/azure-nsg");
    let worktree = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus/azure-nsg");
    for dir in [primary, worktree] {
        if Path::new(dir).join("MANIFEST.md").is_file() {
            return PathBuf::from(dir);
        }
    }
    panic!(
        "the Azure NSG corpus is missing: no MANIFEST.md in {primary} nor in {worktree}; \
         check out the shared corpus next to the repository or set KUBE_NSG_AZURE_CORPUS"
    );
}

fn import(file: &str) -> Import {
    let path = corpus_dir().join(file);
    import_azure_file(&path, NAMESPACE).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn nsg<'a>(i: &'a Import, name: &str) -> &'a NetworkSecurityGroup {
    i.nsgs
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| {
            panic!(
                "no group {name} in {:?}",
                i.nsgs.iter().map(|n| &n.metadata.name).collect::<Vec<_>>()
            )
        })
}

fn rule<'a>(n: &'a NetworkSecurityGroup, name: &str) -> &'a SecurityRule {
    n.spec
        .security_rules
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no rule {name}"))
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The CRD's bounds that the Rust-side validation does not check (the API server does).
fn assert_crd_bounds(file: &str, n: &NetworkSecurityGroup) {
    let name = n.metadata.name.as_deref().unwrap_or_default();
    assert!(is_dns_label(name), "{file}: group name {name:?}");
    assert_eq!(n.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert!(n.spec.security_rules.len() <= RuleLimits::RULES_PER_GROUP);
    assert!(
        n.spec.subnet && n.spec.pod_selector.is_none(),
        "{file}: imported groups are subnet-level"
    );
    for r in &n.spec.security_rules {
        let at = format!("{file}: {name}/{}", r.name);
        assert!((1..=80).contains(&r.name.chars().count()), "{at}: name");
        assert!(
            r.description
                .as_ref()
                .is_none_or(|d| d.chars().count() <= 140),
            "{at}: description"
        );
        for (one, many, asgs) in [
            (
                &r.source_address_prefix,
                &r.source_address_prefixes,
                &r.source_application_security_groups,
            ),
            (
                &r.destination_address_prefix,
                &r.destination_address_prefixes,
                &r.destination_application_security_groups,
            ),
        ] {
            let forms = [one.is_some(), many.is_some(), asgs.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
            assert_eq!(forms, 1, "{at}: exactly one form per side");
            assert!(
                one.as_ref().is_none_or(|p| p.len() <= 100 && p.trim() == p),
                "{at}"
            );
            assert!(many.as_ref().is_none_or(|l| (1..=400).contains(&l.len()) && l.iter().all(|p| p.len() <= 64)), "{at}");
            assert!(
                asgs.as_ref().is_none_or(|l| (1..=10).contains(&l.len())
                    && l.iter()
                        .all(|a| is_dns_label(&a.name) && a.namespace.is_none())),
                "{at}"
            );
        }
        for (one, many) in [
            (&r.source_port_range, &r.source_port_ranges),
            (&r.destination_port_range, &r.destination_port_ranges),
        ] {
            assert!(!(one.is_some() && many.is_some()), "{at}: ports");
            assert!(one.as_ref().is_none_or(|p| p.len() <= 11), "{at}");
            assert!(many.as_ref().is_none_or(|l| (1..=100).contains(&l.len()) && l.iter().all(|p| p.len() <= 11)), "{at}");
        }
    }
}

/// What must hold for every import, whatever the input.
fn assert_sound(file: &str, i: &Import) {
    let s = i.stats;
    assert_eq!(
        s.rules_converted + s.rules_skipped,
        s.rules_found,
        "{file}: every rule is converted or reported"
    );
    assert_eq!(
        s.rules_converted,
        i.nsgs
            .iter()
            .map(|n| n.spec.security_rules.len())
            .sum::<usize>(),
        "{file}"
    );
    assert_eq!(s.rules_skipped, i.count(IssueKind::Skipped), "{file}");
    let mut names = BTreeSet::new();
    for n in &i.nsgs {
        Nsg::try_from(n).unwrap_or_else(|e| panic!("{file}: invalid group: {e}"));
        assert!(
            names.insert(n.metadata.name.clone()),
            "{file}: names are unique"
        );
        assert_crd_bounds(file, n);
    }
    let referenced: BTreeSet<&str> = i
        .nsgs
        .iter()
        .flat_map(|n| &n.spec.security_rules)
        .flat_map(|r| {
            r.source_application_security_groups
                .iter()
                .chain(&r.destination_application_security_groups)
        })
        .flatten()
        .map(|a| a.name.as_str())
        .collect();
    let asgs: BTreeSet<&str> = i
        .asgs
        .iter()
        .map(|a| a.metadata.name.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(
        referenced, asgs,
        "{file}: one ApplicationSecurityGroup per referenced ASG"
    );
    for a in &i.asgs {
        assert!(
            a.spec.pod_selector.is_none() && a.metadata.namespace.as_deref() == Some(NAMESPACE)
        );
    }
}

/// Writes the YAML and JSON renderings and loads both with the CLI's loader, which converts
/// and validates every object as `kube-nsg verify` would.
fn assert_loads(file: &str, i: &Import) {
    let dir = std::env::temp_dir().join(format!("kube-nsg-import-{}-{file}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (ext, text) in [("yaml", i.to_yaml()), ("json", i.to_json())] {
        let path = dir.join(format!("out.{ext}"));
        std::fs::write(&path, text).unwrap();
        let inventory = Objects::read(std::slice::from_ref(&path))
            .unwrap_or_else(|e| panic!("{file}: {ext} output does not parse: {e}"))
            .into_inventory(&[], &[])
            .unwrap_or_else(|e| panic!("{file}: {ext} output does not validate: {e:?}"));
        assert_eq!(inventory.nsgs.len(), i.nsgs.len(), "{file} ({ext})");
        assert_eq!(inventory.asgs.len(), i.asgs.len(), "{file} ({ext})");
        std::fs::remove_file(&path).unwrap();
    }
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn every_corpus_file_imports_as_the_manifest_says() {
    let dir = corpus_dir();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    let listed: BTreeSet<String> = CORPUS.iter().map(|c| c.file.to_string()).collect();
    assert_eq!(
        on_disk, listed,
        "the corpus and this test's table list the same files"
    );

    let mut totals = [0usize; 6];
    let mut by_kind = [0usize; IssueKind::ALL.len()];
    println!(
        "{:<44} {:>4} {:>5} {:>9} {:>7}  issues",
        "file", "NSGs", "rules", "converted", "skipped"
    );
    for c in &CORPUS {
        let i = import(c.file);
        assert_sound(c.file, &i);
        assert_loads(c.file, &i);
        let s = i.stats;
        assert_eq!(s.nsgs_found, c.nsgs, "{}: NSGs found", c.file);
        assert_eq!(s.rules_found, c.rules, "{}: rules found", c.file);
        assert_eq!(
            s.default_rules_found, c.defaults,
            "{}: default rules",
            c.file
        );
        assert_eq!(i.nsgs.len(), c.produced, "{}: groups produced", c.file);
        assert_eq!(
            s.rules_converted,
            c.converted,
            "{}: rules converted\n{}",
            c.file,
            i.report()
        );
        // Every skipped rule says why, naming the field.
        for issue in i.issues.iter().filter(|x| x.kind == IssueKind::Skipped) {
            assert!(
                issue.rule.is_some() && issue.location.is_some() && !issue.message.is_empty(),
                "{}: {issue}",
                c.file
            );
        }
        for (k, n) in IssueKind::ALL.iter().zip(by_kind.iter_mut()) {
            *n += i.count(*k);
        }
        for (t, v) in totals.iter_mut().zip([
            s.nsgs_found,
            i.nsgs.len(),
            s.rules_found,
            s.rules_converted,
            s.rules_skipped,
            i.asgs.len(),
        ]) {
            *t += v;
        }
        let kinds: Vec<String> = IssueKind::ALL
            .iter()
            .map(|k| (k, i.count(*k)))
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        println!(
            "{:<44} {:>4} {:>5} {:>9} {:>7}  {}",
            c.file,
            i.nsgs.len(),
            s.rules_found,
            s.rules_converted,
            s.rules_skipped,
            kinds.join(", ")
        );
    }
    let kinds: Vec<String> = IssueKind::ALL
        .iter()
        .zip(by_kind)
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    println!(
        "total: {} NSGs found, {} produced, {} ASGs; rules: {} found, {} converted, {} skipped; issues: {}",
        totals[0],
        totals[1],
        totals[5],
        totals[2],
        totals[3],
        totals[4],
        kinds.join(", ")
    );
    // The manifest's totals.
    assert_eq!(totals[0], 93);
    assert_eq!(totals[2], 431);
}

/// The hard-coded table agrees with MANIFEST.md's columns (guards against a changed corpus).
#[test]
fn table_matches_the_manifest() {
    let manifest = std::fs::read_to_string(corpus_dir().join("MANIFEST.md")).unwrap();
    let leading = |s: &str| {
        s.trim()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse::<usize>()
            .unwrap()
    };
    let mut rows = 0;
    for line in manifest
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(".json`"))
    {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let file = cols[2].trim_matches('`');
        let c = CORPUS
            .iter()
            .find(|c| c.file == file)
            .unwrap_or_else(|| panic!("{file} is not in the table"));
        assert_eq!(leading(cols[9]), c.nsgs, "{file}: NSGs");
        assert_eq!(leading(cols[10]), c.rules, "{file}: rules");
        let defaults = cols[10].split('+').nth(1).map_or(0, leading);
        assert_eq!(defaults, c.defaults, "{file}: default rules");
        rows += 1;
    }
    assert_eq!(rows, CORPUS.len());
}

#[test]
fn ipv6_prefixes_and_source_ports_26() {
    let i = import("26-ipv6-in-vnet.json");
    let n = nsg(&i, "dsnsg");
    let out = rule(n, "allow-MyIpv6App-out");
    assert_eq!(
        out.source_address_prefix.as_deref(),
        Some("ace:cab:deca:deed::/64")
    );
    assert_eq!(out.source_port_range.as_deref(), Some("33819-33829"));
    assert_eq!(
        out.destination_address_prefixes.as_deref(),
        Some(
            &[
                "cab:cab:aaaa:bbbb::/64".to_string(),
                "cab:cab:1111:2222::/64".to_string()
            ][..]
        )
    );
    assert_eq!(out.destination_port_range.as_deref(), Some("5000-6000"));
    let http = rule(n, "allow-HTTP-in");
    assert_eq!(http.source_port_range.as_deref(), Some("80"));
    assert_eq!(http.protocol, ApiProtocol::Tcp, "TCP is Tcp");
}

/// 29: `22-22` is `22`; the Deny of 8086 at 290 overrides part of the Allow of
/// `8080-8084, 8086` at 310, checked with the reference evaluator on the imported YAML.
#[test]
fn degenerate_ranges_and_priorities_29() {
    let i = import("29-c7n-rest-list-multiple-ports.json");
    let master = nsg(&i, "k8s-master-c02b7042-nsg");
    assert_eq!(
        rule(master, "allow_ssh").destination_port_range.as_deref(),
        Some("22")
    );
    assert_eq!(
        rule(master, "allow_kube_tls")
            .destination_port_range
            .as_deref(),
        Some("443")
    );
    let c7n = nsg(&i, "c7n-nsg");
    assert_eq!(
        rule(c7n, "test2").destination_port_ranges.as_deref(),
        Some(&["8080-8084".to_string(), "8086".to_string()][..])
    );
    let deny = rule(c7n, "test3");
    assert_eq!(
        (
            deny.priority,
            deny.access,
            deny.destination_port_range.as_deref()
        ),
        (290, ApiAccess::Deny, Some("8086"))
    );

    // Only c7n-nsg (one subnet-level group per namespace), and a pod to evaluate at.
    let mut only = i.clone();
    only.nsgs
        .retain(|n| n.metadata.name.as_deref() == Some("c7n-nsg"));
    let dir = std::env::temp_dir().join(format!("kube-nsg-import-{}-29", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("nsg.yaml"), only.to_yaml()).unwrap();
    std::fs::write(
        dir.join("pod.yaml"),
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: {NAMESPACE}}}\nspec: {{containers: [{{name: app, image: x}}]}}\nstatus: {{podIP: 10.244.0.10}}\n"
        ),
    )
    .unwrap();
    let inv = Objects::read(std::slice::from_ref(&dir))
        .unwrap()
        .into_inventory(&["10.244.0.0/16".parse().unwrap()], &[])
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let res = Resolved::new(&inv);
    let pod = res
        .pod_index(&format!("{NAMESPACE}/web").parse().unwrap())
        .unwrap();
    let remote: IpAddr = "203.0.113.10".parse().unwrap();
    let verdict = |port| {
        let packet = Packet {
            protocol: Protocol::Tcp,
            src: remote,
            src_port: 50000,
            dst: "10.244.0.10".parse().unwrap(),
            dst_port: port,
        };
        let v = evaluate(&res, pod, Direction::Inbound, &packet);
        let d = v.deciding().unwrap();
        (v.access, d.rule.clone())
    };
    assert_eq!(verdict(8086), (Access::Deny, "test3".into()));
    assert_eq!(verdict(8083), (Access::Allow, "test2".into()));
    assert_eq!(verdict(80), (Access::Allow, "test1".into()));
    assert_eq!(verdict(22), (Access::Deny, "test4".into()));
    assert_eq!(
        verdict(8085).0,
        Access::Deny,
        "not allowed by any rule: DenyAllInbound"
    );
}

#[test]
fn asg_references_16() {
    let i = import("16-application-security-group.json");
    let n = nsg(&i, "webnsg");
    for r in ["AllowHttpAll", "AllowSshAll"] {
        let refs = rule(n, r)
            .destination_application_security_groups
            .as_ref()
            .unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].name, "webserversasg");
        assert_eq!(rule(n, r).destination_address_prefix, None);
    }
    assert_eq!(i.asgs.len(), 1);
    assert_eq!(i.asgs[0].metadata.name.as_deref(), Some("webserversasg"));
    assert_eq!(
        i.asgs[0].metadata.annotations.as_ref().unwrap()["kubensg.io/azure-name"],
        "webServersAsg"
    );
    assert!(i.issues.iter().any(|x| x.kind == IssueKind::Info
        && x.message.contains("kubensg.io/application-security-groups")));
    assert!(
        i.issues
            .iter()
            .any(|x| x.kind == IssueKind::Resolved && x.message.contains("[variables('asgId')]"))
    );
    assert!(i.to_yaml().contains("# Members: pods whose annotation kubensg.io/application-security-groups lists \"webserversasg\""));
}

#[test]
fn asg_references_by_rest_id_28() {
    let i = import("28-c7n-rest-list-43-nsgs.json");
    let n = nsg(&i, "parent11-k8s-parent11-cilium-etcd");
    let r = rule(n, "parent11-k8s-parent11-cilium-etcd-tcp2380");
    assert_eq!(
        r.source_application_security_groups.as_ref().unwrap()[0].name,
        "parent11-k8s-parent11-cilium-etcd"
    );
    assert_eq!(
        r.destination_application_security_groups.as_ref().unwrap()[0].name,
        "parent11-k8s-parent11-cilium-etcd"
    );
    assert_eq!(
        r.source_address_prefix, None,
        "REST's \"\" next to ASGs is no prefix"
    );
    assert_eq!(i.asgs.len(), 6);
    // Same Azure name in two resource groups: two objects.
    assert!(
        i.nsgs
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some("dbm-sqlserver-2012-nsg-2"))
    );
    assert!(
        i.issues
            .iter()
            .any(|x| x.kind == IssueKind::Info && x.message.contains("74 network interface(s)"))
    );
    assert!(i.issues.iter().any(|x| x.nsg.is_none() && x.message.contains("43 groups are imported into namespace")));
}

#[test]
fn az_flattened_output_33() {
    let i = import("33-azcli-nsg-create-output.json");
    let n = nsg(&i, "mynsgnameb1404f");
    assert!(n.spec.security_rules.is_empty());
    assert!(
        n.metadata.annotations.as_ref().unwrap()["kubensg.io/azure-id"]
            .ends_with("/networkSecurityGroups/myNSGNameb1404f")
    );
    let defaults = i
        .issues
        .iter()
        .find(|x| x.field.as_deref() == Some("defaultSecurityRules"))
        .unwrap();
    assert_eq!(
        defaults.kind,
        IssueKind::Info,
        "only missing ones: nothing differs"
    );
    assert!(defaults.message.contains("DenyAllOutBound"));
}

#[test]
fn lone_rule_34() {
    let i = import("34-azcli-nsg-rule-create-output.json");
    let n = nsg(&i, "mynsgnamexxxxxx");
    let r = rule(n, "Allow-Accessxxxxxx");
    assert_eq!(
        r.destination_port_ranges.as_deref(),
        Some(&["22".to_string(), "80".to_string(), "443".to_string()][..])
    );
    assert_eq!((r.priority, r.protocol), (100, ApiProtocol::Tcp));
    assert!(
        i.issues
            .iter()
            .any(|x| x.message.contains("\"myNSGNamexxxxxx\" is not in the file"))
    );
}

#[test]
fn child_rule_attached_to_its_parent_32() {
    let i = import("32-checkov-nsg-plus-child-rule.json");
    let n = nsg(&i, "webservernsgname");
    assert_eq!(rule(n, "DefaultDeny").priority, 4096);
    // The child resource `[concat(parameters('webServerNsgName'),'/allowAllFromAll')]`
    // belongs to this group; its destination is a parameter without default: reported.
    let skipped = i
        .issues
        .iter()
        .find(|x| x.kind == IssueKind::Skipped)
        .unwrap();
    assert_eq!(skipped.nsg.as_deref(), Some("webservernsgname"));
    assert_eq!(skipped.rule.as_deref(), Some("allowAllFromAll"));
    assert_eq!(skipped.field.as_deref(), Some("destinationAddressPrefix"));
    assert!(
        skipped
            .message
            .contains("[parameters('webServerSubnetAddressPrefix')]")
    );
    assert!(
        i.issues.iter().any(|x| x.kind == IssueKind::Renamed
            && x.message.contains("[parameters('webServerNsgName')]"))
    );
}

#[test]
fn separate_rule_with_an_empty_default_35() {
    let i = import("35-aro-rp-production-predeploy.json");
    let skipped = i
        .issues
        .iter()
        .find(|x| x.kind == IssueKind::Skipped)
        .unwrap();
    assert_eq!(
        (skipped.nsg.as_deref(), skipped.rule.as_deref()),
        (Some("rp-nsg"), Some("portal_in"))
    );
    assert!(skipped.message.contains("empty list"));
    assert_eq!(
        i.issues
            .iter()
            .filter(|x| x.field.as_deref() == Some("condition"))
            .count(),
        2
    );
}

#[test]
fn regional_tag_expression_is_reported_05() {
    let i = import("05-aml-secure-regional-tags.json");
    let skipped: Vec<_> = i
        .issues
        .iter()
        .filter(|x| x.kind == IssueKind::Skipped)
        .collect();
    assert_eq!(skipped.len(), 2);
    assert_eq!(skipped[0].rule.as_deref(), Some("AzureStorageAccount"));
    assert!(
        skipped[0]
            .message
            .contains("[format('Storage.{0}', parameters('location'))]")
    );
    assert!(skipped[1].message.contains("AzureContainerRegistry.{0}"));
}

#[test]
fn protocol_spellings_12() {
    let i = import("12-sqlmi-azure-environment.json");
    let n = &i.nsgs[0];
    assert_eq!(
        rule(n, "allow_tds_inbound").protocol,
        ApiProtocol::Tcp,
        "TCP"
    );
    assert!(
        n.spec
            .security_rules
            .iter()
            .all(|r| matches!(r.protocol, ApiProtocol::Tcp | ApiProtocol::Any))
    );
    assert_eq!(
        n.spec
            .security_rules
            .iter()
            .filter(|r| r.access == ApiAccess::Deny)
            .count(),
        2
    );
}

#[test]
fn nested_deployment_and_template_values_02_03() {
    let i = import("02-frontdoor-apim-nested-module.json");
    assert_eq!(i.nsgs[0].metadata.name.as_deref(), Some("mynsg"));
    assert_eq!(
        rule(&i.nsgs[0], "Client_communication_to_API_Management")
            .source_address_prefix
            .as_deref(),
        Some("AzureFrontDoor.Backend")
    );
    let i = import("03-frontdoor-apim-conditional-tag.json");
    let n = nsg(&i, "frontdoorapimsamplensg");
    assert_eq!(
        rule(n, "ClientCommunicationToAPIManagementInbound")
            .source_address_prefix
            .as_deref(),
        Some("Internet")
    );
    assert!(
        i.issues.iter().any(|x| x.kind == IssueKind::Resolved
            && x.message.contains("allowTrafficOnlyFromFrontDoor"))
    );
}

#[test]
fn rules_by_expression_or_copy_loop_are_reported() {
    for file in [
        "17-nsg-rules-copy-loop.json",
        "18-sap-rules-from-variables.json",
        "19-azfw-forced-tunneling-conditional.json",
        "38-docs-variable-copy-loop.json",
    ] {
        let i = import(file);
        assert_eq!(i.nsgs.len(), 1);
        assert!(i.nsgs[0].spec.security_rules.is_empty());
        let u = i
            .issues
            .iter()
            .find(|x| x.kind == IssueKind::Unsupported)
            .unwrap_or_else(|| panic!("{file}"));
        assert!(u.message.contains("not converted"), "{file}: {u}");
    }
}

#[test]
fn unfixed_values_in_07_are_reported_by_expression() {
    let i = import("07-servicefabric-3-nodetype.json");
    let skipped: Vec<_> = i
        .issues
        .iter()
        .filter(|x| x.kind == IssueKind::Skipped)
        .collect();
    assert_eq!(skipped.len(), 18);
    assert!(
        skipped
            .iter()
            .all(|x| x.field.as_deref() == Some("destinationPortRange")
                && x.message.contains("is the ARM expression \"["))
    );
    let names: Vec<_> = i
        .nsgs
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "nsg-subnetsettings-subnetname",
            "nsg-subnetsettings-subnetname-2",
            "nsg-subnetsettings-subnetname-3"
        ]
    );
}

/// 36 lost its UTF-8 byte-order mark when copied into the corpus; put it back, and also try
/// UTF-16 as Windows PowerShell writes it.
#[test]
fn byte_order_marks_36() {
    let bytes = std::fs::read(corpus_dir().join("36-azurestack-hybrid-ase.json")).unwrap();
    let plain = import_azure_bytes("36.json", &bytes, NAMESPACE).unwrap();
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend(&bytes);
    let with_bom = import_azure_bytes("36.json", &bom, NAMESPACE).unwrap();
    assert_eq!(with_bom.stats, plain.stats);
    let text = String::from_utf8(bytes).unwrap();
    let mut utf16 = vec![0xFF, 0xFE];
    utf16.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    assert_eq!(
        import_azure_bytes("36.json", &utf16, NAMESPACE)
            .unwrap()
            .stats,
        plain.stats
    );
    assert_eq!(
        import_azure("36.json", &format!("\u{feff}{text}"), NAMESPACE)
            .unwrap()
            .stats
            .rules_converted,
        20
    );
}

#[test]
fn crlf_files_01_29() {
    for file in [
        "01-apim-external-vnet.json",
        "29-c7n-rest-list-multiple-ports.json",
    ] {
        let text = std::fs::read_to_string(corpus_dir().join(file)).unwrap();
        assert!(text.contains("\r\n"), "{file} has CRLF line ends");
        let lf = import_azure(file, &text.replace("\r\n", "\n"), NAMESPACE).unwrap();
        assert_eq!(
            import_azure(file, &text, NAMESPACE).unwrap().stats,
            lf.stats
        );
    }
}

#[test]
fn truncated_corpus_files_are_clear_errors() {
    let text =
        std::fs::read_to_string(corpus_dir().join("16-application-security-group.json")).unwrap();
    let cut = &text[..text.len() / 2];
    let err = import_azure("16.json", cut, NAMESPACE).unwrap_err();
    let line = cut.lines().count();
    assert!(
        err.to_string().starts_with(&format!("16.json:{line}:")),
        "{err}"
    );
    let missing = import_azure_file(Path::new("/nonexistent/nsg.json"), NAMESPACE).unwrap_err();
    assert!(
        missing
            .to_string()
            .starts_with("/nonexistent/nsg.json: cannot read"),
        "{missing}"
    );
}
