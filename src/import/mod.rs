//! `kube-nsg import azure`: Azure network security groups into `NetworkSecurityGroup` and
//! `ApplicationSecurityGroup` objects.
//!
//! The input is any JSON Azure produces or accepts for NSGs:
//!
//! - ARM templates: `Microsoft.Network/networkSecurityGroups` resources, also inside nested
//!   `Microsoft.Resources/deployments` (inline templates, inner or outer expression scope),
//!   with their rules inline, as nested child resources, or as separate
//!   `Microsoft.Network/networkSecurityGroups/securityRules` resources named `nsg/rule`
//!   (also `[concat(parameters('nsg'), '/rule')]`), which are attached to their group;
//! - REST objects (`GET .../networkSecurityGroups/x`, `az network nsg show`), REST lists
//!   (`{"value": [...]}`), arrays of NSG objects, and `az` output flattened without
//!   `properties`, also wrapped (`{"NewNSG": {...}}`);
//! - a lone rule (`az network nsg rule create/show`): its group is named from the rule's id.
//!
//! Nothing is dropped silently: every rule found is either converted or reported as an
//! [`IssueKind::Skipped`] issue, and every construct that is not converted (copy loops, rules
//! given as one expression, linked templates, ESP/AH protocols, values that are template
//! expressions the template does not fix, ...) is reported. Expressions are never guessed:
//! only values the template itself fixes are resolved — a parameter's `defaultValue`, a
//! variable, and `concat`/`format`/`if`/`resourceId` over those — and each resolution is
//! reported as [`IssueKind::Resolved`], since a deployment may pass other parameter values.
//!
//! Association: every imported group gets `subnet: true`, i.e. it applies to every pod of
//! the target namespace, as an NSG associated with a subnet. Azure's association is not part
//! of the group (subnets and network interfaces point at it); when a REST export shows the
//! group on network interfaces, an issue says so, since a `podSelector` would then be the
//! closer mapping. A namespace has at most one subnet-level group: importing several groups
//! into one namespace is reported too.
//!
//! Every produced object passes the project's validation (`Nsg::try_from`) and the CRD's
//! bounds; a rule that would make its group invalid (duplicate priority, ICMP with ports, a
//! priority outside 100..4096, ...) is skipped and reported instead.
//!
//! Names: groups and ASGs get lower-case DNS-1123 label names (`myNSG_01` becomes
//! `mynsg-01`, at most 63 characters, so they can also be label values and label-key parts),
//! made unique with `-2`, `-3`; rule names are kept when Azure-valid. The Azure name and id
//! are kept in the `kubensg.io/azure-name` and `kubensg.io/azure-id` annotations.
//!
//! Wiring `kube-nsg import azure FILE --namespace NS [-o yaml|json]`: an `Err` (unreadable
//! file, invalid JSON with its line, no NSG in it, bad namespace) is the command's error and
//! exit status; reported issues are not errors.
//!
//! ```no_run
//! use kube_nsg::import::{OutputFormat, import_azure_file};
//! # fn run(file: &std::path::Path, namespace: &str, format: OutputFormat) -> Result<(), kube_nsg::import::ImportError> {
//! let import = import_azure_file(file, namespace)?;
//! eprint!("{}", import.report()); // one line per issue, then the summary
//! print!("{}", import.render(format)); // YAML starts with the issues as # comments
//! # Ok(())
//! # }
//! ```

mod arm;
mod azure;
mod names;
mod render;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::api::{ApplicationSecurityGroup, NetworkSecurityGroup};

pub use render::OutputFormat;

/// The result of one import.
#[derive(Debug, Clone)]
pub struct Import {
    /// The file name (or other label) of the input, used in messages.
    pub source: String,
    pub namespace: String,
    pub nsgs: Vec<NetworkSecurityGroup>,
    /// One per application security group the converted rules reference, without
    /// `podSelector`: pods join by their `kubensg.io/application-security-groups` annotation.
    pub asgs: Vec<ApplicationSecurityGroup>,
    /// What was not converted, or converted with a change, in source order.
    pub issues: Vec<ImportIssue>,
    pub stats: ImportStats,
}

/// Counts over one import. `rules_converted + rules_skipped == rules_found` always holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportStats {
    /// NSG objects in the source (groups created only to hold separate rules not counted).
    pub nsgs_found: usize,
    /// Concrete rule objects: `securityRules` elements, child and separate rule resources,
    /// lone rules. Rules computed by copy loops or expressions are not concrete.
    pub rules_found: usize,
    pub rules_converted: usize,
    pub rules_skipped: usize,
    /// `defaultSecurityRules` entries (checked, not converted: the defaults are built in).
    pub default_rules_found: usize,
}

/// How much an issue matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IssueKind {
    /// A security rule was not converted; its group is imported without it.
    Skipped,
    /// A construct of the source has no counterpart and was not converted (copy loops, rules
    /// given as one expression, linked templates, ...).
    Unsupported,
    /// Converted, but not exactly as written: a condition ignored, a missing port taken as
    /// `*`, a CIDR's host bits dropped, several groups competing for one namespace, ...
    Approximated,
    /// A template expression was replaced by the value the template fixes (a parameter's
    /// default or a variable); a deployment may pass other parameter values.
    Resolved,
    /// A name was changed to be a valid Kubernetes (or rule) name.
    Renamed,
    /// Nothing lost; something to know or do (define service tags, ASG membership, ...).
    Info,
}

impl IssueKind {
    pub const ALL: [IssueKind; 6] = [
        IssueKind::Skipped,
        IssueKind::Unsupported,
        IssueKind::Approximated,
        IssueKind::Resolved,
        IssueKind::Renamed,
        IssueKind::Info,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IssueKind::Skipped => "skipped",
            IssueKind::Unsupported => "unsupported",
            IssueKind::Approximated => "approximated",
            IssueKind::Resolved => "resolved",
            IssueKind::Renamed => "renamed",
            IssueKind::Info => "info",
        }
    }
}

impl fmt::Display for IssueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing the import did not convert, or converted with a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportIssue {
    pub kind: IssueKind,
    /// The produced `NetworkSecurityGroup`'s name; `None` for the file as a whole.
    pub nsg: Option<String>,
    /// The rule's name as written in the source, when the issue is about one rule.
    pub rule: Option<String>,
    /// The Azure property, e.g. `sourceAddressPrefix` or `destinationPortRanges[1]`.
    pub field: Option<String>,
    pub message: String,
    /// Where in the source: a JSON path such as `$.resources[1].properties.securityRules[0]`.
    pub location: Option<String>,
}

impl fmt::Display for ImportIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.kind)?;
        if let Some(nsg) = &self.nsg {
            write!(f, "NetworkSecurityGroup {nsg}")?;
            if self.rule.is_some() || self.field.is_some() {
                write!(f, " ")?;
            }
        }
        if let Some(rule) = &self.rule {
            write!(f, "rule {rule:?}")?;
            if self.field.is_some() {
                write!(f, " ")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, "{field}")?;
        }
        if self.nsg.is_some() || self.rule.is_some() || self.field.is_some() {
            write!(f, ": ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(location) = &self.location {
            write!(f, " (at {location})")?;
        }
        Ok(())
    }
}

/// Why a file could not be imported at all. Reported rules are not errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: cannot read: {message}")]
    Read { file: String, message: String },
    #[error("{file}: not text: {message}")]
    Encoding { file: String, message: String },
    #[error("{file}:{line}:{column}: invalid JSON: {message}")]
    Json {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{file}: no Azure network security group found: expected an ARM template with \
         Microsoft.Network/networkSecurityGroups resources, the JSON of `az network nsg show` \
         or `az network nsg list` (or a REST response), or a security rule"
    )]
    NoNsg { file: String },
    #[error(
        "invalid namespace {namespace:?}: a namespace name is a DNS-1123 label (lower-case letters, digits and '-', at most 63 characters)"
    )]
    Namespace { namespace: String },
}

/// Imports the JSON text of an Azure NSG export into `namespace`. `source` names the input
/// in messages. A UTF-8 byte-order mark, CRLF line ends and ARM-style `//` and `/* */`
/// comments are accepted.
///
/// Every group is imported with `subnet: true` (it applies to every pod of `namespace`, as
/// an NSG associated with a subnet) and no `podSelector`; when the export shows the group on
/// network interfaces, an [`IssueKind::Info`] issue says so. ASGs are imported without
/// `podSelector` (pods join by annotation).
pub fn import_azure(source: &str, json_text: &str, namespace: &str) -> Result<Import, ImportError> {
    if !is_dns_label(namespace) {
        return Err(ImportError::Namespace {
            namespace: namespace.to_string(),
        });
    }
    let text = json_text.strip_prefix('\u{feff}').unwrap_or(json_text);
    let (doc, had_comments) = parse_json(source, text)?;
    let mut import = azure::convert(source, &doc, namespace)?;
    if had_comments {
        import.issues.insert(
            0,
            ImportIssue {
                kind: IssueKind::Info,
                nsg: None,
                rule: None,
                field: None,
                message: "the file has // or /* */ comments (allowed in ARM templates); they were ignored".into(),
                location: None,
            },
        );
    }
    Ok(import)
}

/// Like [`import_azure`], from bytes: UTF-8 (with or without a byte-order mark) or UTF-16
/// with a byte-order mark (what Windows PowerShell 5 writes for `az ... > file.json`).
pub fn import_azure_bytes(
    source: &str,
    bytes: &[u8],
    namespace: &str,
) -> Result<Import, ImportError> {
    let text = decode(source, bytes)?;
    import_azure(source, &text, namespace)
}

/// Reads and imports a file; `source` in messages is the path as given.
pub fn import_azure_file(path: &Path, namespace: &str) -> Result<Import, ImportError> {
    let source = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ImportError::Read {
        file: source.clone(),
        message: e.to_string(),
    })?;
    import_azure_bytes(&source, &bytes, namespace)
}

fn decode(source: &str, bytes: &[u8]) -> Result<String, ImportError> {
    let utf16 = |units: Vec<u16>| {
        String::from_utf16(&units).map_err(|e| ImportError::Encoding {
            file: source.to_string(),
            message: format!("invalid UTF-16: {e}"),
        })
    };
    if let Some(rest) = bytes.strip_prefix(&[0xFF, 0xFE]) {
        return utf16(
            rest.chunks(2)
                .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                .collect(),
        );
    }
    if let Some(rest) = bytes.strip_prefix(&[0xFE, 0xFF]) {
        return utf16(
            rest.chunks(2)
                .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                .collect(),
        );
    }
    String::from_utf8(bytes.to_vec()).map_err(|e| ImportError::Encoding {
        file: source.to_string(),
        message: format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
    })
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Strict JSON first; if that fails, JSON with comments (ARM templates may have them).
fn parse_json(source: &str, text: &str) -> Result<(Value, bool), ImportError> {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => Ok((v, false)),
        Err(strict) => {
            if let Some(stripped) = strip_comments(text)
                && let Ok(v) = serde_json::from_str::<Value>(&stripped)
            {
                return Ok((v, true));
            }
            let message = strict.to_string();
            let suffix = format!(" at line {} column {}", strict.line(), strict.column());
            Err(ImportError::Json {
                file: source.to_string(),
                line: strict.line(),
                column: strict.column(),
                message: message
                    .strip_suffix(&suffix)
                    .unwrap_or(&message)
                    .to_string(),
            })
        }
    }
}

/// The text with `//` and `/* */` comments outside strings blanked (newlines kept, so line
/// numbers stay), or `None` when it has none.
fn strip_comments(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let (mut in_string, mut escaped, mut found) = (false, false, false);
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match (c, chars.peek()) {
            ('"', _) => {
                in_string = true;
                out.push(c);
            }
            ('/', Some('/')) => {
                found = true;
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                found = true;
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    found.then_some(out)
}

#[cfg(test)]
mod text_tests {
    use super::*;

    #[test]
    fn comments_are_stripped_outside_strings() {
        let text = "{\n// c\n\"a\": \"x//y\", /* b\n */ \"b\": 1}";
        let stripped = strip_comments(text).unwrap();
        let v: Value = serde_json::from_str(&stripped).unwrap();
        assert_eq!(v["a"], "x//y");
        assert_eq!(stripped.lines().count(), text.lines().count());
        assert_eq!(strip_comments("{\"a\": \"/*\"}"), None);
    }

    #[test]
    fn decodes_utf16_and_rejects_binary() {
        let text = "{\"a\": 1}";
        let mut le = vec![0xFF, 0xFE];
        le.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(decode("f", &le).unwrap(), text);
        let mut be = vec![0xFE, 0xFF];
        be.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
        assert_eq!(decode("f", &be).unwrap(), text);
        assert!(matches!(
            decode("f", &[0x7B, 0xC3, 0x28]),
            Err(ImportError::Encoding { .. })
        ));
        assert!(decode("f", &[0xFF, 0xFE, 0x41]).is_ok());
    }

    #[test]
    fn namespaces_are_dns_labels() {
        assert!(is_dns_label("team-a"));
        assert!(!is_dns_label("Team"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(""));
        assert!(matches!(
            import_azure("f", "{}", "A_B"),
            Err(ImportError::Namespace { .. })
        ));
    }
}
