//! Azure names into Kubernetes names.

use std::collections::BTreeSet;

/// At most 63 characters: object names of imported groups are DNS-1123 labels, so they can
/// also be label values (the controller labels pods with the NIC-level group they are bound
/// to) and part of label keys (`asg.kubensg.io/<asg>`).
pub const MAX_OBJECT_NAME: usize = 63;
/// The CRD's bound on a rule name (Azure's too).
pub const MAX_RULE_NAME: usize = 80;

/// A lower-case DNS-1123 label: `myNSG_01` becomes `mynsg-01`. Every run of characters
/// outside `[a-z0-9]` becomes one `-`; leading and trailing `-` are dropped. May be empty.
pub fn dns_label(raw: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
            dash = false;
        } else if !dash {
            out.push('-');
            dash = true;
        }
    }
    let mut out: String = out
        .trim_matches('-')
        .chars()
        .take(MAX_OBJECT_NAME)
        .collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// `base`, or `base-2`, `base-3`, ... (shortened to stay within the bound), whichever is
/// not yet in `taken`; the result is added to `taken`.
pub fn unique(base: &str, taken: &mut BTreeSet<String>) -> String {
    let mut name = base.to_string();
    let mut n = 2;
    while taken.contains(&name) {
        let suffix = format!("-{n}");
        let keep = MAX_OBJECT_NAME.saturating_sub(suffix.len());
        let mut stem: String = base.chars().take(keep).collect();
        while stem.ends_with('-') {
            stem.pop();
        }
        name = format!("{stem}{suffix}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// Whether Azure (and the CRD) accept `name` as a rule name: 1 to 80 letters, digits, `_`,
/// `.` and `-`.
pub fn is_valid_rule_name(name: &str) -> bool {
    (1..=MAX_RULE_NAME).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A valid rule name close to `raw`: other characters become `-`, cut at 80 characters.
pub fn rule_name(raw: &str) -> String {
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_RULE_NAME)
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "rule".to_string()
    } else {
        name
    }
}

/// The last segment of an Azure resource id, after `/{type_segment}/` (case-insensitive).
pub fn id_segment_after<'s>(id: &'s str, type_segment: &str) -> Option<&'s str> {
    let parts: Vec<&str> = id.split('/').collect();
    parts
        .windows(2)
        .rev()
        .find(|w| w[0].eq_ignore_ascii_case(type_segment))
        .map(|w| w[1])
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names() {
        assert_eq!(dns_label("myNSG_01"), "mynsg-01");
        assert_eq!(dns_label("FE_NSG"), "fe-nsg");
        assert_eq!(dns_label("__a..b__"), "a-b");
        assert_eq!(dns_label("Storage.WestEurope"), "storage-westeurope");
        assert_eq!(dns_label("ÅÄÖ"), "");
        assert_eq!(dns_label(&"a".repeat(100)).len(), 63);
        assert_eq!(dns_label(&format!("{}_b", "a".repeat(62))), "a".repeat(62));
    }

    #[test]
    fn unique_names() {
        let mut taken = BTreeSet::new();
        assert_eq!(unique("web", &mut taken), "web");
        assert_eq!(unique("web", &mut taken), "web-2");
        assert_eq!(unique("web", &mut taken), "web-3");
        let long = "x".repeat(63);
        assert_eq!(unique(&long, &mut taken), long);
        let second = unique(&long, &mut taken);
        assert_eq!(second.len(), 63);
        assert!(second.ends_with("-2"));
    }

    #[test]
    fn rule_names() {
        assert!(is_valid_rule_name(
            "Microsoft.Sql-managedInstances_UseOnly_mi-v10"
        ));
        assert!(!is_valid_rule_name(""));
        assert!(!is_valid_rule_name("allow http"));
        assert!(!is_valid_rule_name(&"a".repeat(81)));
        assert_eq!(rule_name("allow http"), "allow-http");
        assert_eq!(rule_name("!!!"), "rule");
        assert_eq!(rule_name(&"a".repeat(90)).len(), 80);
    }

    #[test]
    fn id_segments() {
        let id = "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/nsg1/securityRules/r1";
        assert_eq!(id_segment_after(id, "networksecuritygroups"), Some("nsg1"));
        assert_eq!(id_segment_after(id, "securityRules"), Some("r1"));
        assert_eq!(id_segment_after(id, "applicationSecurityGroups"), None);
        assert_eq!(
            id_segment_after("/a/applicationSecurityGroups/", "applicationSecurityGroups"),
            None
        );
    }
}
