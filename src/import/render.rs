//! Output of an import: multi-document YAML with the issues as leading comments, a JSON
//! `List`, and plain text for stderr.

use std::fmt::Write as _;
use std::str::FromStr;

use serde::Serialize;

use super::{Import, ImportIssue, IssueKind};

/// `-o yaml|json` (a `clap::ValueEnum`, and `FromStr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Yaml,
    Json,
}

impl FromStr for OutputFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "yaml" | "yml" => Ok(OutputFormat::Yaml),
            "json" => Ok(OutputFormat::Json),
            _ => Err(format!(
                "unknown output format {s:?}: expected yaml or json"
            )),
        }
    }
}

/// Text safe inside a `#` comment line: control characters (newlines included) become
/// spaces, so no input can end the comment and inject YAML.
fn comment_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn to_yaml<T: Serialize>(value: &T) -> String {
    // Serializing these types (strings, numbers, maps with string keys) cannot fail.
    serde_yaml_ng::to_string(value).expect("imported objects serialize to YAML")
}

impl Import {
    /// `nsgs` groups and `asgs` ASGs; rules found, converted, skipped; issues by kind.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let mut out = format!(
            "{}, {}; {} found, {} converted, {} skipped",
            plural(self.nsgs.len(), "NetworkSecurityGroup"),
            plural(self.asgs.len(), "ApplicationSecurityGroup"),
            plural(s.rules_found, "rule"),
            s.rules_converted,
            s.rules_skipped,
        );
        let counts: Vec<String> = IssueKind::ALL
            .iter()
            .map(|k| (k, self.issues.iter().filter(|i| i.kind == *k).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        if counts.is_empty() {
            out.push_str("; no issues");
        } else {
            let _ = write!(out, "; issues: {}", counts.join(", "));
        }
        out
    }

    /// How many issues there are of one kind.
    pub fn count(&self, kind: IssueKind) -> usize {
        self.issues.iter().filter(|i| i.kind == kind).count()
    }

    /// One line per issue, prefixed with the source (`file: skipped: ...`), then the summary:
    /// what the CLI prints on stderr.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for issue in &self.issues {
            let _ = writeln!(out, "{}: {}", self.source, comment_safe(&issue.to_string()));
        }
        let _ = writeln!(out, "{}: {}", self.source, self.summary());
        out
    }

    /// The objects in the requested format.
    pub fn render(&self, format: OutputFormat) -> String {
        match format {
            OutputFormat::Yaml => self.to_yaml(),
            OutputFormat::Json => self.to_json(),
        }
    }

    /// Multi-document YAML for `kubectl apply -f`: a comment header with the summary and
    /// every issue, then the ApplicationSecurityGroups (each with a comment on membership),
    /// then the NetworkSecurityGroups.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Imported by `kube-nsg import azure` from {} into namespace {}.",
            comment_safe(&self.source),
            self.namespace
        );
        let _ = writeln!(out, "# {}.", self.summary());
        let _ = writeln!(
            out,
            "# Each NetworkSecurityGroup has subnet: true: it applies to every pod of the namespace, like an Azure NSG on a subnet."
        );
        if !self.issues.is_empty() {
            let _ = writeln!(out, "#");
            let _ = writeln!(out, "# Issues (review before applying):");
            for issue in &self.issues {
                let _ = writeln!(out, "#   {}", comment_safe(&issue.to_string()));
            }
        }
        for asg in &self.asgs {
            let name = asg.metadata.name.as_deref().unwrap_or_default();
            out.push_str("---\n");
            let _ = writeln!(
                out,
                "# Members: pods whose annotation {} lists {name:?}; or add a podSelector.",
                crate::model::ASG_ANNOTATION
            );
            out.push_str(&to_yaml(asg));
        }
        for nsg in &self.nsgs {
            out.push_str("---\n");
            out.push_str(&to_yaml(nsg));
        }
        out
    }

    /// A `v1` `List` of the objects (`kubectl apply -f` takes it). JSON has no comments: the
    /// issues go to stderr ([`Import::report`]).
    pub fn to_json(&self) -> String {
        let items: Vec<serde_json::Value> = self
            .asgs
            .iter()
            .map(serde_json::to_value)
            .chain(self.nsgs.iter().map(serde_json::to_value))
            .collect::<Result<_, _>>()
            .expect("imported objects serialize to JSON");
        let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
        let mut text = serde_json::to_string_pretty(&list).expect("a JSON value serializes");
        text.push('\n');
        text
    }

    /// The issues of one kind.
    pub fn issues_of(&self, kind: IssueKind) -> impl Iterator<Item = &ImportIssue> {
        self.issues.iter().filter(move |i| i.kind == kind)
    }
}
