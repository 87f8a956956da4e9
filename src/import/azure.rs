//! Finding NSGs in Azure JSON and converting them (see the module docs of `import`).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::arm::{self, Expr, ScopeId, Scopes, Trace, get_ci, type_name};
use super::names;
use super::{Import, ImportError, ImportIssue, ImportStats, IssueKind};
use crate::api::{
    self, ApplicationSecurityGroup, ApplicationSecurityGroupSpec, AsgReference,
    NetworkSecurityGroup, NetworkSecurityGroupSpec,
};
use crate::model::{AddressPrefix, Nsg, PortRange, RuleLimits, WellKnownTag, default_rules};

const NSG_TYPE: &str = "microsoft.network/networksecuritygroups";
const RULE_TYPE: &str = "microsoft.network/networksecuritygroups/securityrules";
const DEFAULT_RULE_TYPE: &str = "microsoft.network/networksecuritygroups/defaultsecurityrules";
const DEPLOYMENT_TYPE: &str = "microsoft.resources/deployments";
/// The CRD's bounds on a description, on a `...AddressPrefix` and on each item of a
/// `...AddressPrefixes` list.
const MAX_DESCRIPTION: usize = 140;
const MAX_PREFIX_TEXT: usize = 100;
const MAX_PREFIX_ITEM: usize = 64;
/// Annotations on imported objects naming what they came from.
pub const AZURE_NAME_ANNOTATION: &str = "kubensg.io/azure-name";
pub const AZURE_ID_ANNOTATION: &str = "kubensg.io/azure-id";
/// The group that takes rules whose group the file does not name.
const DEFAULT_NSG_NAME: &str = "imported-nsg";

/// The resource type, lower case, when it is a literal.
fn type_of(m: &Map<String, Value>) -> Option<String> {
    match m.get("type") {
        Some(Value::String(t)) if !arm::is_expression(t) => Some(t.to_ascii_lowercase()),
        _ => None,
    }
}

fn child_path(path: &str, key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    {
        format!("{path}.{key}")
    } else {
        format!("{path}[{key:?}]")
    }
}

/// Properties of a resource: under `properties`, or the object itself for `az` output,
/// which is flattened.
fn properties(m: &Map<String, Value>) -> &Map<String, Value> {
    get_ci(m, "properties")
        .and_then(Value::as_object)
        .unwrap_or(m)
}

fn has_key(m: &Map<String, Value>, key: &str) -> bool {
    get_ci(m, key).is_some() || get_ci(properties(m), key).is_some()
}

fn is_template(m: &Map<String, Value>) -> bool {
    matches!(m.get("resources"), Some(Value::Array(_) | Value::Object(_)))
        && (m.contains_key("$schema")
            || m.contains_key("contentVersion")
            || !m.contains_key("type"))
}

fn looks_like_nsg(m: &Map<String, Value>) -> bool {
    has_key(m, "securityRules") || has_key(m, "defaultSecurityRules")
}

fn looks_like_rule(m: &Map<String, Value>) -> bool {
    has_key(m, "access") && has_key(m, "direction")
}

fn issue(kind: IssueKind, field: Option<&str>, message: impl Into<String>) -> ImportIssue {
    ImportIssue {
        kind,
        nsg: None,
        rule: None,
        field: field.map(str::to_string),
        message: message.into(),
        location: None,
    }
}

/// A JSON value in a message: strings quoted, long values cut.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(117).collect::<String>())
    } else {
        s
    }
}

/// `"[parameters('p')]"` quoted for a message, cut when long.
fn show_expr(s: &str) -> String {
    show(&Value::String(s.to_string()))
}

// ---------------------------------------------------------------------------------------
// Discovery

struct Found<'a> {
    value: &'a Value,
    scope: ScopeId,
    path: String,
}

struct FoundNsg<'a> {
    obj: &'a Map<String, Value>,
    scope: ScopeId,
    path: String,
    /// Rule resources nested in the NSG resource's own `resources`.
    children: Vec<Found<'a>>,
}

#[derive(Default)]
struct Discovery<'a> {
    scopes: Scopes<'a>,
    nsgs: Vec<FoundNsg<'a>>,
    /// Rule resources and rule objects outside any NSG.
    separate: Vec<Found<'a>>,
    issues: Vec<ImportIssue>,
    ids: BTreeSet<String>,
}

impl<'a> Discovery<'a> {
    /// `loose`: untyped objects that look like NSGs or rules count as such (not inside
    /// resources of other types).
    fn walk(&mut self, v: &'a Value, scope: ScopeId, path: String, loose: bool) {
        match v {
            Value::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    self.walk(x, scope, format!("{path}[{i}]"), loose);
                }
            }
            Value::Object(m) => match type_of(m).as_deref() {
                Some(NSG_TYPE) => self.nsg(m, scope, path),
                Some(RULE_TYPE) => self.separate.push(Found {
                    value: v,
                    scope,
                    path,
                }),
                Some(DEFAULT_RULE_TYPE) => {}
                Some(DEPLOYMENT_TYPE) => self.deployment(m, scope, &path),
                Some(_) => self.walk_members(m, scope, &path, false),
                None if is_template(m) => {
                    let s = self.scopes.template(m);
                    self.resources(m, s, &path);
                }
                None if loose && looks_like_nsg(m) => self.nsg(m, scope, path),
                None if loose && looks_like_rule(m) => self.separate.push(Found {
                    value: v,
                    scope,
                    path,
                }),
                None => self.walk_members(m, scope, &path, loose),
            },
            _ => {}
        }
    }

    fn walk_members(&mut self, m: &'a Map<String, Value>, scope: ScopeId, path: &str, loose: bool) {
        for (k, x) in m {
            self.walk(x, scope, child_path(path, k), loose);
        }
    }

    /// The `resources` of a template (an array, or an object of symbolic names in
    /// languageVersion 2.0), or of a resource (its child resources).
    fn resources(&mut self, m: &'a Map<String, Value>, scope: ScopeId, path: &str) {
        match m.get("resources") {
            Some(Value::Array(items)) => {
                for (i, r) in items.iter().enumerate() {
                    self.resource(r, scope, format!("{path}.resources[{i}]"));
                }
            }
            Some(Value::Object(items)) => {
                for (k, r) in items {
                    self.resource(r, scope, child_path(&format!("{path}.resources"), k));
                }
            }
            _ => {}
        }
    }

    fn resource(&mut self, r: &'a Value, scope: ScopeId, path: String) {
        let Value::Object(m) = r else { return };
        match type_of(m).as_deref() {
            Some(NSG_TYPE) => self.nsg(m, scope, path),
            Some(RULE_TYPE) => self.separate.push(Found {
                value: r,
                scope,
                path,
            }),
            Some(DEPLOYMENT_TYPE) => self.deployment(m, scope, &path),
            _ => self.resources(m, scope, &path),
        }
    }

    fn deployment(&mut self, m: &'a Map<String, Value>, scope: ScopeId, path: &str) {
        let Some(props) = m.get("properties").and_then(Value::as_object) else {
            return;
        };
        let name = m
            .get("name")
            .map(show)
            .unwrap_or_else(|| "(unnamed)".into());
        if let Some(Value::Object(template)) = props.get("template") {
            let inner = props
                .get("expressionEvaluationOptions")
                .and_then(|o| o.get("scope"))
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case("inner"));
            let s = if inner {
                self.scopes.nested(
                    template,
                    props.get("parameters").and_then(Value::as_object),
                    scope,
                )
            } else {
                scope
            };
            if m.contains_key("copy") {
                let mut i = issue(
                    IssueKind::Unsupported,
                    Some("copy"),
                    format!(
                        "nested deployment {name} is a copy loop: the groups in its template are imported once, not once per iteration"
                    ),
                );
                i.location = Some(path.to_string());
                self.issues.push(i);
            }
            self.resources(template, s, &format!("{path}.properties.template"));
        } else if let Some(link) = props.get("templateLink") {
            let target = link
                .as_object()
                .and_then(|l| ["uri", "relativePath", "id"].iter().find_map(|k| l.get(*k)))
                .map(show)
                .unwrap_or_else(|| show(link));
            let mut i = issue(
                IssueKind::Unsupported,
                Some("properties.templateLink"),
                format!(
                    "nested deployment {name} links to the template {target}, which is not read: if it holds network security groups, import that file too"
                ),
            );
            i.location = Some(path.to_string());
            self.issues.push(i);
        }
    }

    fn nsg(&mut self, m: &'a Map<String, Value>, scope: ScopeId, path: String) {
        if let Some(Value::String(id)) = m.get("id")
            && !arm::is_expression(id)
            && !self.ids.insert(id.to_ascii_lowercase())
        {
            let mut i = issue(
                IssueKind::Info,
                None,
                format!("the group {id} appears a second time; the copy was ignored"),
            );
            i.location = Some(path);
            self.issues.push(i);
            return;
        }
        let mut children = Vec::new();
        let mut child = |r: &'a Value, p: String| {
            if let Value::Object(c) = r
                && matches!(type_of(c).as_deref(), Some("securityrules" | RULE_TYPE))
            {
                children.push(Found {
                    value: r,
                    scope,
                    path: p,
                });
            }
        };
        match m.get("resources") {
            Some(Value::Array(items)) => {
                for (i, r) in items.iter().enumerate() {
                    child(r, format!("{path}.resources[{i}]"));
                }
            }
            Some(Value::Object(items)) => {
                for (k, r) in items {
                    child(r, child_path(&format!("{path}.resources"), k));
                }
            }
            _ => {}
        }
        self.nsgs.push(FoundNsg {
            obj: m,
            scope,
            path,
            children,
        });
    }
}

// ---------------------------------------------------------------------------------------
// Rules

/// One rule's conversion: the rule and notes about it, or the one issue saying why not.
enum Outcome {
    Converted {
        rule: Box<api::SecurityRule>,
        notes: Vec<ImportIssue>,
        asgs: Vec<(String, String)>,
    },
    Skipped(ImportIssue),
}

fn skipped(rule: Option<String>, field: &str, message: String, location: &str) -> Outcome {
    Outcome::Skipped(ImportIssue {
        kind: IssueKind::Skipped,
        nsg: None,
        rule,
        field: Some(field.to_string()),
        message,
        location: Some(location.to_string()),
    })
}

/// Reads the fields of one rule, resolving template expressions, collecting every problem.
struct RuleReader<'c, 'a> {
    scopes: &'c Scopes<'a>,
    scope: ScopeId,
    props: &'a Map<String, Value>,
    problems: Vec<(String, String)>,
    notes: Vec<(IssueKind, String, String)>,
    /// (Kubernetes name, Azure name) of the referenced ASGs.
    asgs: Vec<(String, String)>,
}

enum Side {
    Prefix(String),
    Prefixes(Vec<String>),
    Asgs(Vec<AsgReference>),
}

impl<'c, 'a> RuleReader<'c, 'a> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push((field.to_string(), message.into()));
    }

    /// A problem: `field` holds a value of another type than `expected` ("a string").
    fn wrong_type(&mut self, field: &str, expected: &str, found: &Value) {
        self.problem(
            field,
            format!("expected {expected}, found {}", type_name(found)),
        );
    }

    fn note(&mut self, kind: IssueKind, field: &str, message: impl Into<String>) {
        self.notes.push((kind, field.to_string(), message.into()));
    }

    /// A field of `map` with expressions resolved: `Ok(None)` when absent or null,
    /// `Err(())` when a problem was recorded.
    fn get_in(&mut self, map: &'a Map<String, Value>, field: &str) -> Result<Option<Value>, ()> {
        match get_ci(map, field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.resolve(field, v).map(Some),
        }
    }

    fn get(&mut self, field: &str) -> Result<Option<Value>, ()> {
        self.get_in(self.props, field)
    }

    /// Like `get`, but a value that cannot be read is dropped with a note, not a problem
    /// (for fields that do not change what the rule matches).
    fn get_soft(&mut self, field: &str) -> Option<Value> {
        let before = self.problems.len();
        let v = self.get(field).ok().flatten();
        for (f, message) in self.problems.split_off(before) {
            self.note(IssueKind::Approximated, &f, format!("dropped: {message}"));
        }
        v
    }

    fn resolve(&mut self, field: &str, v: &'a Value) -> Result<Value, ()> {
        match v {
            Value::String(s) if arm::is_expression(s) => self.eval(field, s),
            Value::String(s) => Ok(Value::String(
                s.strip_prefix('[')
                    .filter(|r| r.starts_with('['))
                    .unwrap_or(s)
                    .to_string(),
            )),
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, x) in items.iter().enumerate() {
                    match self.resolve(&format!("{field}[{i}]"), x) {
                        Ok(x) => out.push(x),
                        Err(()) => ok = false,
                    }
                }
                if ok { Ok(Value::Array(out)) } else { Err(()) }
            }
            Value::Object(m) => {
                let mut out = Map::new();
                let mut ok = true;
                for (k, x) in m {
                    match self.resolve(&format!("{field}.{k}"), x) {
                        Ok(x) => {
                            out.insert(k.clone(), x);
                        }
                        Err(()) => ok = false,
                    }
                }
                if ok { Ok(Value::Object(out)) } else { Err(()) }
            }
            other => Ok(other.clone()),
        }
    }

    fn eval(&mut self, field: &str, s: &str) -> Result<Value, ()> {
        let mut trace = Trace::default();
        let text = arm::expression_text(s).unwrap_or(s);
        let result = arm::parse(text)
            .map_err(|e| format!("it cannot be parsed: {e}"))
            .and_then(|e| self.scopes.eval(self.scope, &e, &mut trace));
        match result {
            Ok(v) => {
                self.note(IssueKind::Resolved, field, resolved_message(s, &v, &trace));
                Ok(v)
            }
            Err(reason) => {
                self.problem(
                    field,
                    format!(
                        "is the ARM expression {}, whose value the template does not fix: {reason}",
                        show_expr(s)
                    ),
                );
                Err(())
            }
        }
    }

    fn string(&mut self, field: &str) -> Result<Option<String>, ()> {
        match self.get(field)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                self.problem(
                    field,
                    format!(
                        "expected a string, found {} {}",
                        type_name(&other),
                        show(&other)
                    ),
                );
                Err(())
            }
        }
    }

    fn required_string(&mut self, field: &str) -> Option<String> {
        match self.string(field) {
            Ok(Some(s)) => Some(s),
            Ok(None) => {
                self.problem(field, "is missing");
                None
            }
            Err(()) => None,
        }
    }

    fn priority(&mut self) -> Option<i32> {
        let n = match self.get("priority") {
            Err(()) => return None,
            Ok(None) => {
                self.problem("priority", "is missing");
                return None;
            }
            Ok(Some(Value::Number(n))) => match n.as_i64() {
                Some(n) => n,
                None => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => f as i64,
                    _ => {
                        self.problem("priority", format!("{n} is not an integer"));
                        return None;
                    }
                },
            },
            Ok(Some(Value::String(s))) => match s.trim().parse::<i64>() {
                Ok(n) => n,
                Err(_) => {
                    self.problem("priority", format!("{s:?} is not an integer"));
                    return None;
                }
            },
            Ok(Some(other)) => {
                self.wrong_type("priority", "a number", &other);
                return None;
            }
        };
        let range = i64::from(RuleLimits::PRIORITY_MIN)..=i64::from(RuleLimits::PRIORITY_MAX);
        if !range.contains(&n) {
            self.problem(
                "priority",
                format!("{n} is outside Azure's range 100..4096"),
            );
            return None;
        }
        i32::try_from(n).ok()
    }

    fn direction(&mut self) -> Option<api::Direction> {
        let s = self.required_string("direction")?;
        match s.to_ascii_lowercase().as_str() {
            "inbound" => Some(api::Direction::Inbound),
            "outbound" => Some(api::Direction::Outbound),
            _ => {
                self.problem(
                    "direction",
                    format!("{s:?} is neither Inbound nor Outbound"),
                );
                None
            }
        }
    }

    fn access(&mut self) -> Option<api::Access> {
        let s = self.required_string("access")?;
        match s.to_ascii_lowercase().as_str() {
            "allow" => Some(api::Access::Allow),
            "deny" => Some(api::Access::Deny),
            _ => {
                self.problem("access", format!("{s:?} is neither Allow nor Deny"));
                None
            }
        }
    }

    fn protocol(&mut self) -> Option<api::Protocol> {
        let s = self.required_string("protocol")?;
        match s.trim().to_ascii_lowercase().as_str() {
            "tcp" => Some(api::Protocol::Tcp),
            "udp" => Some(api::Protocol::Udp),
            "icmp" => Some(api::Protocol::Icmp),
            "*" | "any" => Some(api::Protocol::Any),
            "esp" | "ah" => {
                self.problem(
                    "protocol",
                    format!(
                        "{s} (IPsec) is not supported: kube-nsg rules take Tcp, Udp, Icmp or *"
                    ),
                );
                None
            }
            _ => {
                self.problem(
                    "protocol",
                    format!("{s:?} is not supported: kube-nsg rules take Tcp, Udp, Icmp or *"),
                );
                None
            }
        }
    }

    fn address(&mut self, field: &str, text: &str, max: usize) -> Option<String> {
        let t = text.trim();
        if t.chars().count() > max {
            self.problem(
                field,
                format!("{} is longer than {max} characters", show_expr(t)),
            );
            return None;
        }
        match t.parse::<AddressPrefix>() {
            Ok(_) => Some(t.to_string()),
            Err(e) => match t.parse::<IpNet>() {
                Ok(net) if net.trunc() != net => {
                    let network = net.trunc().to_string();
                    self.note(
                        IssueKind::Approximated,
                        field,
                        format!("{t} has host bits set: imported as the network {network}"),
                    );
                    Some(network)
                }
                _ => {
                    self.problem(field, e);
                    None
                }
            },
        }
    }

    /// One side of the rule: prefixes (`...AddressPrefix` or `...AddressPrefixes`) or ASGs.
    fn side(&mut self, side: &str) -> Option<Side> {
        let (pf, pfs, af) = (
            format!("{side}AddressPrefix"),
            format!("{side}AddressPrefixes"),
            format!("{side}ApplicationSecurityGroups"),
        );
        let mut ok = true;
        let single = match self.get(&pf) {
            // REST output writes "" for the unused form (next to ASGs or a list).
            Ok(Some(Value::String(s))) if s.is_empty() => None,
            Ok(Some(Value::String(s))) => Some(s),
            Ok(Some(other)) => {
                self.wrong_type(&pf, "a string", &other);
                ok = false;
                None
            }
            Ok(None) => None,
            Err(()) => {
                ok = false;
                None
            }
        };
        let many = match self.get(&pfs) {
            Ok(Some(Value::Array(items))) if !items.is_empty() => {
                let mut texts = Vec::new();
                for (i, x) in items.iter().enumerate() {
                    match x {
                        Value::String(s) => texts.push(s.clone()),
                        Value::Array(inner) if inner.iter().all(Value::is_string) => {
                            // `[variables('list')]` inside a list: flattened.
                            texts
                                .extend(inner.iter().filter_map(Value::as_str).map(str::to_string));
                        }
                        other => {
                            self.wrong_type(&format!("{pfs}[{i}]"), "a string", other);
                            ok = false;
                        }
                    }
                }
                Some(texts)
            }
            Ok(Some(Value::Array(_))) => {
                let resolved = self
                    .notes
                    .iter()
                    .rev()
                    .find(|(_, f, _)| *f == pfs)
                    .map(|(_, _, m)| m.clone());
                if let Some(resolved) = resolved {
                    self.problem(
                        &pfs,
                        format!("{resolved}: an empty list, so the rule would match no address"),
                    );
                    ok = false;
                }
                None
            }
            Ok(Some(other)) => {
                self.wrong_type(&pfs, "an array", &other);
                ok = false;
                None
            }
            Ok(None) => None,
            Err(()) => {
                ok = false;
                None
            }
        };
        let asgs = match self.get(&af) {
            Ok(Some(Value::Array(items))) if !items.is_empty() => {
                let mut refs = Vec::new();
                for (i, x) in items.iter().enumerate() {
                    let field = format!("{af}[{i}]");
                    let id = x
                        .as_object()
                        .and_then(|o| get_ci(o, "id"))
                        .and_then(Value::as_str);
                    match id
                        .map(|id| (id, names::id_segment_after(id, "applicationSecurityGroups")))
                    {
                        Some((_, Some(azure))) => {
                            let name = names::dns_label(azure);
                            if name.is_empty() {
                                self.problem(
                                    &field,
                                    format!("the ASG name {azure:?} has no letters or digits"),
                                );
                                ok = false;
                            } else {
                                self.asgs.push((name.clone(), azure.to_string()));
                                refs.push(AsgReference {
                                    name,
                                    namespace: None,
                                });
                            }
                        }
                        Some((id, None)) => {
                            self.problem(
                                &field,
                                format!("{id:?} is not the id of an application security group"),
                            );
                            ok = false;
                        }
                        None => {
                            self.problem(
                                &field,
                                format!("expected an object with an \"id\", found {}", show(x)),
                            );
                            ok = false;
                        }
                    }
                }
                Some(refs)
            }
            Ok(Some(Value::Array(_)) | None) => None,
            Ok(Some(other)) => {
                self.wrong_type(&af, "an array", &other);
                ok = false;
                None
            }
            Err(()) => {
                ok = false;
                None
            }
        };
        if !ok {
            return None;
        }
        match (single, many, asgs) {
            (Some(_), Some(_), _) => {
                self.problem(
                    &pf,
                    format!("is set together with {pfs}; Azure takes one of them"),
                );
                None
            }
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                self.problem(
                    &af,
                    format!(
                        "is set together with address prefixes; the {side} takes one or the other"
                    ),
                );
                None
            }
            (None, None, None) => {
                self.problem(
                    &pf,
                    format!("is missing: the {side} needs {pf}, {pfs} or {af}"),
                );
                None
            }
            (Some(s), None, None) => self.address(&pf, &s, MAX_PREFIX_TEXT).map(Side::Prefix),
            (None, Some(list), None) => {
                if list.len() > RuleLimits::PREFIXES_PER_RULE {
                    self.problem(
                        &pfs,
                        format!(
                            "has {} entries; a rule takes at most {}",
                            list.len(),
                            RuleLimits::PREFIXES_PER_RULE
                        ),
                    );
                    return None;
                }
                let converted: Vec<Option<String>> = list
                    .iter()
                    .enumerate()
                    .map(|(i, t)| self.address(&format!("{pfs}[{i}]"), t, MAX_PREFIX_ITEM))
                    .collect();
                converted
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .map(Side::Prefixes)
            }
            (None, None, Some(refs)) => {
                if refs.len() > RuleLimits::ASGS_PER_RULE {
                    self.problem(
                        &af,
                        format!(
                            "has {} entries; a rule takes at most {}",
                            refs.len(),
                            RuleLimits::ASGS_PER_RULE
                        ),
                    );
                    return None;
                }
                Some(Side::Asgs(refs))
            }
        }
    }

    fn port_text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) if n.is_u64() => Some(n.to_string()),
            _ => None,
        }
    }

    fn port(&mut self, field: &str, v: &Value) -> Option<String> {
        let Some(text) = Self::port_text(v) else {
            self.problem(
                field,
                format!(
                    "expected a port or range, found {} {}",
                    type_name(v),
                    show(v)
                ),
            );
            return None;
        };
        match text.parse::<PortRange>() {
            Ok(range) => Some(range.to_string()),
            Err(e) => {
                self.problem(field, e);
                None
            }
        }
    }

    /// `(single, list)` for `sourcePortRange(s)` or `destinationPortRange(s)`; both `None`
    /// means `*`.
    #[allow(clippy::type_complexity)]
    fn ports(&mut self, field: &str) -> Option<(Option<String>, Option<Vec<String>>)> {
        let plural = format!("{field}s");
        let single = self.get(field);
        let many = self.get(&plural);
        let (Ok(single), Ok(many)) = (single, many) else {
            return None;
        };
        let single = single.filter(|v| v.as_str() != Some(""));
        let many = match many {
            Some(Value::Array(items)) if items.is_empty() => None,
            Some(Value::Array(items)) => Some(items),
            Some(other) => {
                self.wrong_type(&plural, "an array", &other);
                return None;
            }
            None => None,
        };
        match (single, many) {
            (Some(_), Some(_)) => {
                self.problem(
                    field,
                    format!("is set together with {plural}; Azure takes one of them"),
                );
                None
            }
            (Some(v), None) => self.port(field, &v).map(|p| (Some(p), None)),
            (None, Some(items)) => {
                if items.len() > RuleLimits::PORT_RANGES_PER_RULE {
                    self.problem(
                        &plural,
                        format!(
                            "has {} entries; a rule takes at most {}",
                            items.len(),
                            RuleLimits::PORT_RANGES_PER_RULE
                        ),
                    );
                    return None;
                }
                let converted: Vec<Option<String>> = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.port(&format!("{plural}[{i}]"), v))
                    .collect();
                converted
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .map(|list| (None, Some(list)))
            }
            (None, None) => {
                self.note(
                    IssueKind::Approximated,
                    field,
                    format!("is missing (Azure requires {field} or {plural}): imported as '*'"),
                );
                Some((None, None))
            }
        }
    }

    fn description(&mut self) -> Option<String> {
        match self.get_soft("description")? {
            Value::String(s) if s.chars().count() > MAX_DESCRIPTION => {
                self.note(
                    IssueKind::Approximated,
                    "description",
                    format!("longer than {MAX_DESCRIPTION} characters: cut"),
                );
                Some(s.chars().take(MAX_DESCRIPTION).collect())
            }
            Value::String(s) if s.is_empty() => None,
            Value::String(s) => Some(s),
            other => {
                self.note(
                    IssueKind::Approximated,
                    "description",
                    format!("dropped: expected a string, found {}", type_name(&other)),
                );
                None
            }
        }
    }
}

fn resolved_message(expr: &str, value: &Value, trace: &Trace) -> String {
    if trace.is_empty() {
        format!("{} evaluated to {}", show_expr(expr), show(value))
    } else {
        let warning = if trace.parameters.is_empty() {
            ""
        } else {
            "; a deployment may pass another value"
        };
        format!(
            "{} resolved to {} from {}{warning}",
            show_expr(expr),
            show(value),
            trace.describe()
        )
    }
}

/// Converts one rule object (`{name, properties}` or flattened). `name` overrides the
/// rule's own name (for separate rule resources named `nsg/rule`).
fn read_rule<'a>(
    scopes: &Scopes<'a>,
    scope: ScopeId,
    value: &'a Value,
    location: &str,
    name: Option<&str>,
) -> Outcome {
    let raw_name = || {
        value
            .as_object()
            .and_then(|o| get_ci(o, "name"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let label = name.map(str::to_string).or_else(raw_name);
    let obj = match value {
        Value::Object(m) => m,
        Value::String(s) if arm::is_expression(s) => {
            return skipped(
                None,
                "securityRules",
                format!(
                    "the rule is the ARM expression {}; rules computed by expressions are not converted",
                    show_expr(s)
                ),
                location,
            );
        }
        other => {
            return skipped(
                None,
                "securityRules",
                format!("a rule is an object, found {}", type_name(other)),
                location,
            );
        }
    };
    let props = match get_ci(obj, "properties") {
        Some(Value::Object(p)) => p,
        None | Some(Value::Null) => obj,
        Some(Value::String(s)) if arm::is_expression(s) => {
            return skipped(
                label,
                "properties",
                format!(
                    "is the ARM expression {}; rules computed by expressions are not converted",
                    show_expr(s)
                ),
                location,
            );
        }
        Some(other) => {
            return skipped(
                label,
                "properties",
                format!("expected an object, found {}", type_name(other)),
                location,
            );
        }
    };
    let mut r = RuleReader {
        scopes,
        scope,
        props,
        problems: vec![],
        notes: vec![],
        asgs: vec![],
    };
    let rule_name = match name {
        Some(n) => Some(n.to_string()),
        None => match r.get_in(obj, "name") {
            Ok(Some(Value::String(s))) if !s.is_empty() => Some(s),
            Ok(Some(other)) if !other.is_string() => {
                r.wrong_type("name", "a string", &other);
                None
            }
            Ok(_) => {
                r.problem("name", "is missing");
                None
            }
            Err(()) => None,
        },
    };
    let label = rule_name.clone().or(label);
    let rule_name = rule_name.map(|n| {
        if names::is_valid_rule_name(&n) {
            n
        } else {
            let fixed = names::rule_name(&n);
            r.note(
                IssueKind::Renamed,
                "name",
                format!("{n:?} is not a valid rule name (1-80 letters, digits, '_', '.', '-'): imported as {fixed:?}"),
            );
            fixed
        }
    });
    let priority = r.priority();
    let direction = r.direction();
    let access = r.access();
    let protocol = r.protocol();
    let source = r.side("source");
    let destination = r.side("destination");
    let source_ports = r.ports("sourcePortRange");
    let destination_ports = r.ports("destinationPortRange");
    let description = r.description();

    let (
        Some(name),
        Some(priority),
        Some(direction),
        Some(access),
        Some(protocol),
        Some(source),
        Some(destination),
        Some(source_ports),
        Some(destination_ports),
    ) = (
        rule_name,
        priority,
        direction,
        access,
        protocol,
        source,
        destination,
        source_ports,
        destination_ports,
    )
    else {
        let mut message = String::new();
        for (i, (field, m)) in r.problems.iter().enumerate() {
            if i > 0 {
                message.push_str(&format!("; {field}: "));
            }
            message.push_str(m);
        }
        let field = r
            .problems
            .first()
            .map(|(f, _)| f.clone())
            .unwrap_or_else(|| "name".into());
        if message.is_empty() {
            message = "cannot be read".into();
        }
        return skipped(label, &field, message, location);
    };
    let mut rule = api::SecurityRule {
        name,
        description,
        priority,
        direction,
        access,
        protocol,
        source_address_prefix: None,
        source_address_prefixes: None,
        source_port_range: source_ports.0,
        source_port_ranges: source_ports.1,
        destination_address_prefix: None,
        destination_address_prefixes: None,
        destination_port_range: destination_ports.0,
        destination_port_ranges: destination_ports.1,
        source_application_security_groups: None,
        destination_application_security_groups: None,
    };
    match source {
        Side::Prefix(p) => rule.source_address_prefix = Some(p),
        Side::Prefixes(p) => rule.source_address_prefixes = Some(p),
        Side::Asgs(a) => rule.source_application_security_groups = Some(a),
    }
    match destination {
        Side::Prefix(p) => rule.destination_address_prefix = Some(p),
        Side::Prefixes(p) => rule.destination_address_prefixes = Some(p),
        Side::Asgs(a) => rule.destination_application_security_groups = Some(a),
    }
    let notes = r
        .notes
        .into_iter()
        .map(|(kind, field, message)| ImportIssue {
            kind,
            nsg: None,
            rule: label.clone(),
            field: Some(field),
            message,
            location: Some(location.to_string()),
        })
        .collect();
    Outcome::Converted {
        rule: Box::new(rule),
        notes,
        asgs: r.asgs,
    }
}

/// Azure's `condition` on a resource, as a note (the importer imports unconditionally).
fn condition_note(scopes: &Scopes<'_>, scope: ScopeId, v: &Value) -> Option<String> {
    match v {
        Value::Bool(true) => None,
        Value::Bool(false) => {
            Some("has condition false: Azure does not deploy it; imported anyway".into())
        }
        Value::String(s) if arm::is_expression(s) => {
            let mut trace = Trace::default();
            let value = arm::parse(arm::expression_text(s).unwrap_or(s))
                .map_err(|e| e.to_string())
                .and_then(|e| scopes.eval(scope, &e, &mut trace));
            Some(match value {
                Ok(Value::Bool(b)) if !trace.is_empty() => format!(
                    "is deployed only when {} (which is {b} with {}); imported unconditionally",
                    show_expr(s),
                    trace.describe()
                ),
                _ => format!(
                    "is deployed only when {}; imported unconditionally",
                    show_expr(s)
                ),
            })
        }
        other => Some(format!(
            "has condition {}; imported unconditionally",
            show(other)
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Groups

struct Draft {
    /// The Azure name, when literal or resolved.
    azure_name: Option<String>,
    /// Canonical text of the name expression when the template does not fix it, and the
    /// scope it lives in: separate rules whose parent is the same expression attach here.
    name_key: Option<(String, ScopeId)>,
    /// Why the name is unknown (the issue says so once the fallback name is chosen).
    unnamed: Option<String>,
    fallback: String,
    id: Option<String>,
    rules: Vec<(api::SecurityRule, String)>,
    issues: Vec<ImportIssue>,
}

impl Draft {
    fn new(azure_name: Option<String>) -> Self {
        Draft {
            azure_name,
            name_key: None,
            unnamed: None,
            fallback: DEFAULT_NSG_NAME.into(),
            id: None,
            rules: Vec::new(),
            issues: Vec::new(),
        }
    }
}

/// Where a separate rule resource belongs.
struct Parent {
    literal: Option<String>,
    key: Option<(String, ScopeId)>,
    text: String,
    reason: Option<String>,
    rule_name: Result<Option<String>, String>,
    note: Option<String>,
}

struct Converter<'c, 'a> {
    scopes: &'c Scopes<'a>,
    namespace: &'c str,
    drafts: Vec<Draft>,
    /// Issues of the whole file, before and after the groups' own.
    head: Vec<ImportIssue>,
    tail: Vec<ImportIssue>,
    nsgs_found: usize,
    rules_found: usize,
    default_rules_found: usize,
    /// Kubernetes ASG name -> Azure names that became it.
    asg_names: BTreeMap<String, BTreeSet<String>>,
}

impl<'c, 'a> Converter<'c, 'a> {
    fn push(&mut self, d: usize, outcome: Outcome, location: String) {
        match outcome {
            Outcome::Converted { rule, notes, asgs } => {
                self.drafts[d].rules.push((*rule, location));
                self.drafts[d].issues.extend(notes);
                for (name, azure) in asgs {
                    self.asg_names.entry(name).or_default().insert(azure);
                }
            }
            Outcome::Skipped(issue) => self.drafts[d].issues.push(issue),
        }
    }

    fn group(&mut self, found: &FoundNsg<'a>) {
        self.nsgs_found += 1;
        let (m, scope, path) = (found.obj, found.scope, found.path.as_str());
        let mut d = Draft::new(None);
        let at = |mut i: ImportIssue| {
            i.location = Some(path.to_string());
            i
        };
        // The name.
        match get_ci(m, "name") {
            Some(Value::String(s)) if arm::is_expression(s) => {
                let text = arm::expression_text(s).unwrap_or(s);
                match arm::parse(text) {
                    Ok(e) => {
                        let mut words = Vec::new();
                        e.words(&mut words);
                        d.fallback = fallback_name(&words);
                        let mut trace = Trace::default();
                        match self.scopes.eval(scope, &e, &mut trace) {
                            Ok(Value::String(v)) if !v.is_empty() => {
                                d.issues.push(at(issue(
                                    IssueKind::Resolved,
                                    Some("name"),
                                    resolved_message(s, &Value::String(v.clone()), &trace),
                                )));
                                d.azure_name = Some(v);
                            }
                            Ok(other) => {
                                d.unnamed = Some(format!(
                                    "the name {} is {}, not a name",
                                    show_expr(s),
                                    show(&other)
                                ));
                            }
                            Err(reason) => {
                                d.name_key = Some((e.to_string().to_ascii_lowercase(), scope));
                                d.unnamed = Some(format!(
                                    "the name is the ARM expression {}, whose value the template does not fix ({reason})",
                                    show_expr(s)
                                ));
                            }
                        }
                    }
                    Err(e) => {
                        d.unnamed = Some(format!("the name {} cannot be parsed: {e}", show_expr(s)))
                    }
                }
            }
            Some(Value::String(s)) if !s.is_empty() => d.azure_name = Some(s.clone()),
            other => {
                let from_id = m
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(|id| names::id_segment_after(id, "networkSecurityGroups"));
                match from_id {
                    Some(n) => d.azure_name = Some(n.to_string()),
                    None => {
                        d.unnamed = Some(match other {
                            None => "the group has no name".to_string(),
                            Some(v) => format!("the name is {}", show(v)),
                        })
                    }
                }
            }
        }
        d.id = m
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !arm::is_expression(id))
            .map(str::to_string);
        if let Some(c) = get_ci(m, "condition")
            && let Some(message) = condition_note(self.scopes, scope, c)
        {
            d.issues.push(at(issue(
                IssueKind::Approximated,
                Some("condition"),
                format!("the group {message}"),
            )));
        }
        if let Some(copy) = get_ci(m, "copy") {
            let count = copy.get("count").map(show).unwrap_or_else(|| "?".into());
            d.issues.push(at(issue(
                IssueKind::Unsupported,
                Some("copy"),
                format!("the group is a copy loop (count {count}): imported once, not once per iteration"),
            )));
        }
        let props: Option<&'a Map<String, Value>> = match get_ci(m, "properties") {
            Some(Value::Object(p)) => Some(p),
            None | Some(Value::Null) => Some(m),
            Some(other) => {
                d.issues.push(at(issue(
                    IssueKind::Unsupported,
                    Some("properties"),
                    format!(
                        "is {} {}, not an object: no rules converted",
                        type_name(other),
                        show(other)
                    ),
                )));
                None
            }
        };
        let prop = |key: &str| props.and_then(|p| get_ci(p, key));
        self.drafts.push(d);
        let di = self.drafts.len() - 1;
        let rules_path = format!("{path}.properties.securityRules");
        match prop("securityRules") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, r) in items.iter().enumerate() {
                    self.rules_found += 1;
                    let location = format!("{rules_path}[{i}]");
                    let outcome = read_rule(self.scopes, scope, r, &location, None);
                    self.push(di, outcome, location);
                }
            }
            Some(Value::String(s)) if arm::is_expression(s) => {
                self.drafts[di].issues.push(at(issue(
                    IssueKind::Unsupported,
                    Some("securityRules"),
                    format!(
                        "is the ARM expression {}: rules computed by an expression are not converted, so this group has none from it; add them by hand",
                        show_expr(s)
                    ),
                )));
            }
            Some(other) => {
                self.drafts[di].issues.push(at(issue(
                    IssueKind::Unsupported,
                    Some("securityRules"),
                    format!("is {}, not an array: nothing converted", type_name(other)),
                )));
            }
        }
        if let Some(Value::Array(loops)) = prop("copy") {
            for l in loops {
                let name = l.get("name").map(show).unwrap_or_else(|| "?".into());
                let count = l.get("count").map(show).unwrap_or_else(|| "?".into());
                self.drafts[di].issues.push(at(issue(
                    IssueKind::Unsupported,
                    Some("copy"),
                    format!(
                        "property {name} is built by a copy loop (count {count}) from deployment values: rules computed by a copy loop are not converted; add them by hand"
                    ),
                )));
            }
        }
        for child in &found.children {
            self.rules_found += 1;
            let name = child.value.get("name").and_then(Value::as_str);
            let name = name
                .filter(|n| !arm::is_expression(n))
                .map(|n| n.rsplit('/').next().unwrap_or(n));
            let mut outcome = copy_loop(child).unwrap_or_else(|| {
                read_rule(self.scopes, child.scope, child.value, &child.path, name)
            });
            self.add_condition(&mut outcome, child);
            self.push(di, outcome, child.path.clone());
        }
        match prop("defaultSecurityRules") {
            Some(Value::Array(items)) => {
                self.default_rules_found += items.len();
                if let Some((kind, message)) = check_defaults(items) {
                    self.drafts[di].issues.push(at(issue(
                        kind,
                        Some("defaultSecurityRules"),
                        message,
                    )));
                }
            }
            None | Some(Value::Null) => {}
            Some(other) => {
                self.drafts[di].issues.push(at(issue(
                    IssueKind::Info,
                    Some("defaultSecurityRules"),
                    format!(
                        "is {}, not an array; ignored (the default rules are built in)",
                        type_name(other)
                    ),
                )));
            }
        }
        let count = |key: &str| prop(key).and_then(Value::as_array).map_or(0, Vec::len);
        let (nics, subnets) = (count("networkInterfaces"), count("subnets"));
        if nics > 0 {
            let also = if subnets > 0 {
                format!(" and {subnets} subnet(s)")
            } else {
                String::new()
            };
            self.drafts[di].issues.push(at(issue(
                IssueKind::Info,
                Some("networkInterfaces"),
                format!(
                    "in Azure the group is associated with {nics} network interface(s){also}; it is imported with subnet: true (every pod of namespace {}): to apply it to some pods only, as on network interfaces, replace subnet: true with a podSelector",
                    self.namespace
                ),
            )));
        }
    }

    fn add_condition(&self, outcome: &mut Outcome, found: &Found<'a>) {
        if let Outcome::Converted { notes, rule, .. } = outcome
            && let Some(c) = found.value.as_object().and_then(|o| get_ci(o, "condition"))
            && let Some(message) = condition_note(self.scopes, found.scope, c)
        {
            notes.push(ImportIssue {
                kind: IssueKind::Approximated,
                nsg: None,
                rule: Some(rule.name.clone()),
                field: Some("condition".into()),
                message: format!("the rule resource {message}"),
                location: Some(found.path.clone()),
            });
        }
    }

    /// The group a separate rule resource (or lone rule) belongs to.
    fn parent(&self, obj: &'a Map<String, Value>, scope: ScopeId) -> Parent {
        let mut p = Parent {
            literal: None,
            key: None,
            text: String::new(),
            reason: None,
            rule_name: Ok(None),
            note: None,
        };
        let id = obj
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !arm::is_expression(id));
        if let Some(parent) = id.and_then(|id| names::id_segment_after(id, "networkSecurityGroups"))
        {
            p.literal = Some(parent.to_string());
            p.text = parent.to_string();
            return p;
        }
        match obj.get("name") {
            Some(Value::String(s)) if arm::is_expression(s) => {
                let e = match arm::parse(arm::expression_text(s).unwrap_or(s)) {
                    Ok(e) => e,
                    Err(err) => {
                        p.text = s.clone();
                        p.reason = Some(format!("the name cannot be parsed: {err}"));
                        return p;
                    }
                };
                let mut trace = Trace::default();
                if let Ok(Value::String(full)) = self.scopes.eval(scope, &e, &mut trace)
                    && let Some((parent, rule)) = full.split_once('/')
                {
                    p.note = Some(resolved_message(s, &Value::String(full.clone()), &trace));
                    p.literal = Some(parent.to_string());
                    p.text = parent.to_string();
                    p.rule_name = Ok(Some(rule.rsplit('/').next().unwrap_or(rule).to_string()));
                    return p;
                }
                match split_parent(&e) {
                    Some((parent, rule)) => {
                        p.text = format!("[{parent}]");
                        let mut trace = Trace::default();
                        match self.scopes.eval(scope, &parent, &mut trace) {
                            Ok(Value::String(v)) => p.literal = Some(v),
                            Ok(other) => p.reason = Some(format!("it is {}", show(&other))),
                            Err(reason) => p.reason = Some(reason),
                        }
                        p.key = Some((parent.to_string().to_ascii_lowercase(), scope));
                        let mut trace = Trace::default();
                        p.rule_name = match self.scopes.eval(scope, &rule, &mut trace) {
                            Ok(Value::String(r)) if !r.is_empty() => Ok(Some(r)),
                            Ok(other) => {
                                Err(format!("the rule's name part [{rule}] is {}", show(&other)))
                            }
                            Err(reason) => Err(format!(
                                "the rule's name part [{rule}] is an ARM expression whose value the template does not fix: {reason}"
                            )),
                        };
                    }
                    None => {
                        p.text = s.clone();
                        p.reason =
                            Some("the name does not have the form concat(group, '/rule')".into());
                    }
                }
            }
            Some(Value::String(s)) => {
                if let Some((parent, rule)) = s.split_once('/') {
                    p.literal = Some(parent.to_string());
                    p.text = parent.to_string();
                    p.rule_name = Ok(Some(rule.rsplit('/').next().unwrap_or(rule).to_string()));
                }
            }
            _ => {}
        }
        p
    }

    fn separate(&mut self, found: &Found<'a>) {
        self.rules_found += 1;
        let Some(obj) = found.value.as_object() else {
            self.tail.push(ImportIssue {
                kind: IssueKind::Skipped,
                nsg: None,
                rule: None,
                field: None,
                message: format!("a rule is an object, found {}", type_name(found.value)),
                location: Some(found.path.clone()),
            });
            return;
        };
        let p = self.parent(obj, found.scope);
        let matching = self.drafts.iter().position(|d| {
            p.literal.as_ref().is_some_and(|l| {
                d.azure_name
                    .as_ref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(l))
            }) || p
                .key
                .as_ref()
                .is_some_and(|k| d.name_key.as_ref() == Some(k))
        });
        let raw_name = obj.get("name").and_then(Value::as_str).map(str::to_string);
        let d = match (matching, &p.literal) {
            (Some(d), _) => d,
            (None, Some(literal)) => {
                let mut d = Draft::new(Some(literal.clone()));
                d.issues.push(ImportIssue {
                    location: Some(found.path.clone()),
                    ..issue(
                        IssueKind::Info,
                        None,
                        format!(
                            "the group {literal:?} is not in the file: created to hold the rules the file has for it (any other rules of the group are not in the file)"
                        ),
                    )
                });
                self.drafts.push(d);
                self.drafts.len() - 1
            }
            (None, None) if p.text.is_empty() && p.reason.is_none() => {
                // A rule object that names no group at all.
                match self
                    .drafts
                    .iter()
                    .position(|d| d.azure_name.is_none() && d.unnamed.as_deref() == Some(""))
                {
                    Some(d) => d,
                    None => {
                        let mut d = Draft::new(None);
                        d.unnamed = Some(String::new());
                        self.drafts.push(d);
                        self.drafts.len() - 1
                    }
                }
            }
            (None, None) => {
                let reason = p.reason.clone().unwrap_or_default();
                self.tail.push(ImportIssue {
                    kind: IssueKind::Skipped,
                    nsg: None,
                    rule: raw_name,
                    field: Some("name".into()),
                    message: format!(
                        "separate securityRules resource whose group {} is not fixed by the template ({reason}) and matches no group in the file",
                        show_expr(&p.text)
                    ),
                    location: Some(found.path.clone()),
                });
                return;
            }
        };
        let mut outcome = match (copy_loop(found), &p.rule_name) {
            (Some(looped), _) => looped,
            (None, Err(reason)) => skipped(raw_name.clone(), "name", reason.clone(), &found.path),
            (None, Ok(name)) => read_rule(
                self.scopes,
                found.scope,
                found.value,
                &found.path,
                name.as_deref(),
            ),
        };
        if let (Some(note), Outcome::Converted { notes, rule, .. }) = (&p.note, &mut outcome) {
            notes.push(ImportIssue {
                kind: IssueKind::Resolved,
                nsg: None,
                rule: Some(rule.name.clone()),
                field: Some("name".into()),
                message: note.clone(),
                location: Some(found.path.clone()),
            });
        }
        self.add_condition(&mut outcome, found);
        self.push(d, outcome, found.path.clone());
    }
}

/// A rule resource that is a copy loop stands for rules computed at deployment: reported,
/// not converted.
fn copy_loop(found: &Found<'_>) -> Option<Outcome> {
    let copy = found.value.as_object()?.get("copy")?;
    let count = copy.get("count").map(show).unwrap_or_else(|| "?".into());
    let name = found
        .value
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_string);
    Some(skipped(
        name,
        "copy",
        format!(
            "the rule resource is a copy loop (count {count}): rules computed by a copy loop are not converted; add them by hand"
        ),
        &found.path,
    ))
}

/// `concat(A, '/rule')` or `format('{0}/rule', A)` into `(A, 'rule')`.
fn split_parent(e: &Expr) -> Option<(Expr, Expr)> {
    let join = |mut parts: Vec<Expr>| {
        if parts.len() == 1 {
            parts.pop()
        } else if parts.is_empty() {
            None
        } else {
            Some(Expr::Call("concat".into(), parts))
        }
    };
    let Expr::Call(f, args) = e else { return None };
    match f.to_ascii_lowercase().as_str() {
        "concat" => {
            let k = args
                .iter()
                .position(|a| matches!(a, Expr::Lit(Value::String(s)) if s.contains('/')))?;
            let Expr::Lit(Value::String(s)) = &args[k] else {
                return None;
            };
            let (before, after) = s.split_once('/')?;
            let mut parent = args[..k].to_vec();
            if !before.is_empty() {
                parent.push(Expr::Lit(Value::String(before.into())));
            }
            let mut rule = Vec::new();
            if !after.is_empty() {
                rule.push(Expr::Lit(Value::String(after.into())));
            }
            rule.extend(args[k + 1..].iter().cloned());
            Some((join(parent)?, join(rule)?))
        }
        "format" => {
            let Some(Expr::Lit(Value::String(fmt))) = args.first() else {
                return None;
            };
            let (before, after) = fmt.split_once('/')?;
            let rest = &args[1..];
            let placeholder = before
                .strip_prefix('{')
                .and_then(|b| b.strip_suffix('}'))
                .and_then(|n| n.parse::<usize>().ok());
            let parent = match placeholder {
                Some(n) => rest.get(n)?.clone(),
                None => Expr::Call(
                    "format".into(),
                    [Expr::Lit(Value::String(before.into()))]
                        .into_iter()
                        .chain(rest.iter().cloned())
                        .collect(),
                ),
            };
            let rule = if after.contains('{') {
                Expr::Call(
                    "format".into(),
                    [Expr::Lit(Value::String(after.into()))]
                        .into_iter()
                        .chain(rest.iter().cloned())
                        .collect(),
                )
            } else {
                Expr::Lit(Value::String(after.replace("}}", "}")))
            };
            Some((parent, rule))
        }
        _ => None,
    }
}

/// A name from the words of an unresolvable expression (`[parameters('webNsgName')]` gives
/// `webnsgname`), without format placeholders.
fn fallback_name(words: &[String]) -> String {
    let cleaned: Vec<String> = words
        .iter()
        .map(|w| {
            let mut out = String::new();
            let mut in_placeholder = false;
            for c in w.chars() {
                match c {
                    '{' => in_placeholder = true,
                    '}' => in_placeholder = false,
                    c if !in_placeholder => out.push(c),
                    _ => {}
                }
            }
            out
        })
        .collect();
    let name = names::dns_label(&cleaned.join("-"));
    if name.is_empty() { "nsg".into() } else { name }
}

/// Compares `defaultSecurityRules` with Azure's six; `None` when they are the six.
fn check_defaults(items: &[Value]) -> Option<(IssueKind, String)> {
    let standard = default_rules();
    let mut seen = BTreeSet::new();
    let mut differences = Vec::new();
    for item in items {
        let Some(obj) = item.as_object() else {
            differences.push(format!("an entry is {}", type_name(item)));
            continue;
        };
        let p = properties(obj);
        let name = get_ci(obj, "name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(std) = standard.iter().find(|s| s.name.eq_ignore_ascii_case(name)) else {
            differences.push(format!("{name:?} is not one of Azure's default rules"));
            continue;
        };
        seen.insert(std.name.clone());
        let text = |k: &str| {
            get_ci(p, k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_ascii_lowercase()
        };
        let prefix = |k: &str| {
            get_ci(p, k)
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<AddressPrefix>().ok())
        };
        let std_prefix = |e: &crate::model::Endpoint| match e {
            crate::model::Endpoint::Prefixes(ps) => ps.first().cloned(),
            crate::model::Endpoint::Asgs(_) => None,
        };
        let same_prefix = |a: Option<AddressPrefix>, b: Option<AddressPrefix>| match (a, b) {
            (Some(AddressPrefix::Tag(x)), Some(AddressPrefix::Tag(y))) => {
                x.eq_ignore_ascii_case(&y)
            }
            (a, b) => a.is_some() && a == b,
        };
        let port_all = |k: &str| {
            get_ci(p, k)
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<PortRange>().ok())
                .is_some_and(|r| r.is_all())
        };
        let same = get_ci(p, "priority").and_then(Value::as_u64) == Some(u64::from(std.priority))
            && text("direction") == std.direction.to_string().to_ascii_lowercase()
            && text("access") == std.access.to_string().to_ascii_lowercase()
            && matches!(text("protocol").as_str(), "*" | "any")
            && same_prefix(prefix("sourceAddressPrefix"), std_prefix(&std.source))
            && same_prefix(
                prefix("destinationAddressPrefix"),
                std_prefix(&std.destination),
            )
            && port_all("sourcePortRange")
            && port_all("destinationPortRange");
        if !same {
            differences.push(format!(
                "{name} differs from Azure's default rule of that name"
            ));
        }
    }
    let missing: Vec<&str> = standard
        .iter()
        .filter(|s| !seen.contains(&s.name))
        .map(|s| s.name.as_str())
        .collect();
    if differences.is_empty() && missing.is_empty() {
        return None;
    }
    let mut message = String::from(
        "the exported default rules are not Azure's six (kube-nsg always applies the six, they are not imported)",
    );
    let kind = if differences.is_empty() {
        IssueKind::Info
    } else {
        IssueKind::Approximated
    };
    if !missing.is_empty() {
        message.push_str(&format!("; not in the export: {}", missing.join(", ")));
    }
    if !differences.is_empty() {
        message.push_str(&format!("; {}", differences.join("; ")));
    }
    Some((kind, message))
}

/// The index of the rule a validation error's field names (`spec.securityRules[3].x`).
fn rule_index(field: &str) -> Option<(usize, &str)> {
    let rest = field.strip_prefix("spec.securityRules[")?;
    let (index, rest) = rest.split_once(']')?;
    Some((index.parse().ok()?, rest.strip_prefix('.').unwrap_or(rest)))
}

fn metadata_annotations(
    azure_name: Option<&str>,
    id: Option<&str>,
) -> Option<BTreeMap<String, String>> {
    let mut a = BTreeMap::new();
    if let Some(n) = azure_name {
        a.insert(AZURE_NAME_ANNOTATION.to_string(), n.to_string());
    }
    if let Some(id) = id {
        a.insert(AZURE_ID_ANNOTATION.to_string(), id.to_string());
    }
    (!a.is_empty()).then_some(a)
}

pub(super) fn convert(file: &str, doc: &Value, namespace: &str) -> Result<Import, ImportError> {
    let mut discovery = Discovery::default();
    discovery.walk(doc, Scopes::NONE, "$".into(), true);
    if discovery.nsgs.is_empty() && discovery.separate.is_empty() {
        return Err(ImportError::NoNsg {
            file: file.to_string(),
        });
    }
    let Discovery {
        scopes,
        nsgs,
        separate,
        issues: head,
        ..
    } = discovery;
    let mut c = Converter {
        scopes: &scopes,
        namespace,
        drafts: Vec::new(),
        head,
        tail: Vec::new(),
        nsgs_found: 0,
        rules_found: 0,
        default_rules_found: 0,
        asg_names: BTreeMap::new(),
    };
    for found in &nsgs {
        c.group(found);
    }
    for found in &separate {
        c.separate(found);
    }
    let Converter {
        drafts,
        head,
        mut tail,
        nsgs_found,
        rules_found,
        default_rules_found,
        asg_names,
        ..
    } = c;

    let mut issues = head;
    let mut objects = Vec::new();
    let mut taken = BTreeSet::new();
    let mut tags: BTreeSet<String> = BTreeSet::new();
    let mut referenced: BTreeSet<String> = BTreeSet::new();
    for mut d in drafts {
        let base = d
            .azure_name
            .as_deref()
            .map(names::dns_label)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| names::dns_label(&d.fallback));
        let base = if base.is_empty() {
            DEFAULT_NSG_NAME.to_string()
        } else {
            base
        };
        let name = names::unique(&base, &mut taken);
        let rename = match (&d.azure_name, &d.unnamed) {
            (Some(azure), _) if *azure != name => Some(if name == base {
                format!("the Azure name {azure:?} is not a Kubernetes name: imported as {name:?}")
            } else {
                format!(
                    "another imported group is already named {base:?} (Azure names are unique per resource group only): the group {azure:?} is imported as {name:?}"
                )
            }),
            (Some(_), _) => None,
            (None, Some(reason)) if reason.is_empty() => Some(format!(
                "rules that name no group are imported into the group {name:?}"
            )),
            (None, Some(reason)) => Some(format!("{reason}: imported as {name:?}")),
            (None, None) => Some(format!("imported as {name:?}")),
        };
        if let Some(message) = rename {
            // After the note on how the name was resolved, if any.
            let at = d
                .issues
                .iter()
                .take_while(|i| i.rule.is_none() && i.field.as_deref() == Some("name"))
                .count();
            d.issues
                .insert(at, issue(IssueKind::Renamed, Some("name"), message));
        }
        if d.rules.len() > RuleLimits::RULES_PER_GROUP {
            for (rule, location) in d.rules.split_off(RuleLimits::RULES_PER_GROUP) {
                d.issues.push(ImportIssue {
                    kind: IssueKind::Skipped,
                    nsg: None,
                    rule: Some(rule.name),
                    field: None,
                    message: format!(
                        "a group holds at most {} rules",
                        RuleLimits::RULES_PER_GROUP
                    ),
                    location: Some(location),
                });
            }
        }
        // Validate as the controller and the CLI will; skip what would make the group invalid.
        let obj = loop {
            let mut obj = NetworkSecurityGroup::new(
                &name,
                NetworkSecurityGroupSpec {
                    subnet: true,
                    pod_selector: None,
                    security_rules: d.rules.iter().map(|(r, _)| r.clone()).collect(),
                },
            );
            obj.metadata.namespace = Some(namespace.to_string());
            obj.metadata.annotations =
                metadata_annotations(d.azure_name.as_deref(), d.id.as_deref());
            let errors = match Nsg::try_from(&obj) {
                Ok(_) => break obj,
                Err(errors) => errors.0,
            };
            let mut bad: BTreeMap<usize, Vec<String>> = BTreeMap::new();
            for e in &errors {
                if let Some((i, field)) = rule_index(&e.field).filter(|(i, _)| *i < d.rules.len()) {
                    bad.entry(i)
                        .or_default()
                        .push(format!("{field}: {}", e.message));
                }
            }
            if bad.is_empty() {
                // Not attributable to one rule: keep none rather than emit an invalid group.
                bad = (0..d.rules.len())
                    .map(|i| (i, errors.iter().map(ToString::to_string).collect()))
                    .collect();
                if bad.is_empty() {
                    break obj;
                }
            }
            for (i, messages) in bad.into_iter().rev() {
                let (rule, location) = d.rules.remove(i);
                d.issues.push(ImportIssue {
                    kind: IssueKind::Skipped,
                    nsg: None,
                    rule: Some(rule.name),
                    field: None,
                    message: format!("would make the group invalid: {}", messages.join("; ")),
                    location: Some(location),
                });
            }
        };
        for rule in &obj.spec.security_rules {
            for asgs in [
                &rule.source_application_security_groups,
                &rule.destination_application_security_groups,
            ] {
                referenced.extend(asgs.iter().flatten().map(|a| a.name.clone()));
            }
            let prefixes = [
                &rule.source_address_prefix,
                &rule.destination_address_prefix,
            ]
            .into_iter()
            .flatten()
            .chain(
                [
                    &rule.source_address_prefixes,
                    &rule.destination_address_prefixes,
                ]
                .into_iter()
                .flatten()
                .flatten(),
            );
            for p in prefixes {
                if let Ok(AddressPrefix::Tag(t)) = p.parse::<AddressPrefix>()
                    && WellKnownTag::parse(&t).is_none()
                {
                    tags.insert(t);
                }
            }
        }
        for i in &mut d.issues {
            i.nsg = Some(name.clone());
        }
        issues.extend(d.issues);
        objects.push(obj);
    }

    let mut asgs = Vec::new();
    for name in &referenced {
        let azure: Vec<&String> = asg_names
            .get(name)
            .map(|s| s.iter().collect())
            .unwrap_or_default();
        let mut obj = ApplicationSecurityGroup::new(
            name,
            ApplicationSecurityGroupSpec { pod_selector: None },
        );
        obj.metadata.namespace = Some(namespace.to_string());
        obj.metadata.annotations = metadata_annotations(azure.first().map(|s| s.as_str()), None);
        match azure.as_slice() {
            [one] if *one != name => tail.push(issue(
                IssueKind::Renamed,
                None,
                format!("application security group {one:?} is imported as ApplicationSecurityGroup {name:?}"),
            )),
            [_, _, ..] => tail.push(issue(
                IssueKind::Approximated,
                None,
                format!(
                    "application security groups {} all become ApplicationSecurityGroup {name:?}: one group in Kubernetes",
                    azure.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
                ),
            )),
            _ => {}
        }
        asgs.push(obj);
    }
    if !asgs.is_empty() {
        tail.push(issue(
            IssueKind::Info,
            None,
            format!(
                "ApplicationSecurityGroup {} {} created without podSelector: a pod is a member when its annotation {} lists the group (as a network interface lists its ASGs), e.g. `{}: {}`; or give the group a podSelector",
                referenced.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "),
                if referenced.len() == 1 { "is" } else { "are" },
                crate::model::ASG_ANNOTATION,
                crate::model::ASG_ANNOTATION,
                referenced.iter().next().map(String::as_str).unwrap_or_default(),
            ),
        ));
    }
    if !tags.is_empty() {
        let lower: BTreeSet<String> = tags.iter().map(|t| t.to_ascii_lowercase()).collect();
        tail.push(issue(
            IssueKind::Info,
            None,
            format!(
                "service tags {} are not built in: create ServiceTag objects named {} with the tags' address prefixes (Azure publishes them as the \"Azure IP Ranges and Service Tags\" JSON); until then a rule naming a missing tag matches no address, so an Allow allows nothing and a Deny denies nothing",
                tags.iter().cloned().collect::<Vec<_>>().join(", "),
                lower.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if objects.len() > 1 {
        tail.push(issue(
            IssueKind::Approximated,
            None,
            format!(
                "{} groups are imported into namespace {namespace} with subnet: true, but a namespace has one subnet-level group (the oldest is in force, the others report a conflict): import each into its own namespace (one per Azure subnet), or give all but one a podSelector",
                objects.len()
            ),
        ));
    }
    issues.extend(tail);

    let rules_converted = objects.iter().map(|o| o.spec.security_rules.len()).sum();
    let rules_skipped = issues
        .iter()
        .filter(|i| i.kind == IssueKind::Skipped)
        .count();
    debug_assert_eq!(
        rules_converted + rules_skipped,
        rules_found,
        "every rule is converted or skipped"
    );
    Ok(Import {
        source: file.to_string(),
        namespace: namespace.to_string(),
        nsgs: objects,
        asgs,
        issues,
        stats: ImportStats {
            nsgs_found,
            rules_found,
            rules_converted,
            rules_skipped,
            default_rules_found,
        },
    })
}
