//! Just enough of the ARM template expression language to read the values a template fixes
//! itself: `[parameters('p')]` with a `defaultValue`, `[variables('v')]`, `concat`, `format`,
//! `if`, property access and indexing, and `resourceId(...)` (for the names of application
//! security groups). Everything that depends on the deployment (`resourceGroup()`,
//! `reference(...)`, `uniqueString(...)`, `copyIndex()`, a parameter without a default, ...)
//! is an error that names the reason: the importer reports such values, it never guesses them.
//!
//! Parsing works on `char`s and every recursion is bounded, so no input can panic or overflow
//! the stack.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value};

/// How deep expressions may nest (parentheses, brackets) and how many expressions may refer
/// to one another (variables naming variables) before the importer gives up.
const MAX_DEPTH: usize = 48;
/// How many evaluation steps one value may take, and how long a computed string or array
/// may get: templates whose variables double each other stop here instead of running away.
const MAX_STEPS: usize = 20_000;
const MAX_STRING: usize = 64 * 1024;
const MAX_ITEMS: usize = 10_000;

/// A parsed ARM expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Value),
    Call(String, Vec<Expr>),
    Prop(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
}

/// The expression inside a template string, if it is one: `"[...]"` is an expression,
/// `"[[...]"` is a literal that starts with `[`.
pub fn expression_text(s: &str) -> Option<&str> {
    if s.starts_with('[') && !s.starts_with("[[") && s.ends_with(']') && s.len() >= 2 {
        Some(&s[1..s.len() - 1])
    } else {
        None
    }
}

/// Whether a JSON string is an ARM expression.
pub fn is_expression(s: &str) -> bool {
    expression_text(s).is_some()
}

/// The literal a template string stands for when it is not an expression (`[[x]` is `[x]`).
fn literal(s: &str) -> &str {
    if s.starts_with("[[") { &s[1..] } else { s }
}

pub fn parse(text: &str) -> Result<Expr, String> {
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
        depth: 0,
    };
    let e = p.expr()?;
    p.ws();
    if p.pos < p.chars.len() {
        return Err(format!(
            "unexpected {:?} at offset {}",
            p.chars[p.pos], p.pos
        ));
    }
    Ok(e)
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Result<String, String> {
        self.ws();
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
        {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(match self.peek() {
                Some(c) => format!("expected a name at offset {}, found {c:?}", self.pos),
                None => "unexpected end of expression".to_string(),
            });
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn expr(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("expression nested too deeply".into());
        }
        let mut e = self.primary()?;
        loop {
            if self.eat('.') {
                let name = self.ident()?;
                e = Expr::Prop(Box::new(e), name);
            } else if self.eat('[') {
                let index = self.expr()?;
                if !self.eat(']') {
                    return Err("missing ']'".into());
                }
                e = Expr::Index(Box::new(e), Box::new(index));
            } else {
                break;
            }
        }
        self.depth -= 1;
        Ok(e)
    }

    fn primary(&mut self) -> Result<Expr, String> {
        self.ws();
        match self.peek() {
            None => Err("unexpected end of expression".into()),
            Some('\'') => {
                self.pos += 1;
                let mut s = String::new();
                loop {
                    match self.peek() {
                        None => return Err("unterminated string literal".into()),
                        Some('\'') if self.chars.get(self.pos + 1) == Some(&'\'') => {
                            s.push('\'');
                            self.pos += 2;
                        }
                        Some('\'') => {
                            self.pos += 1;
                            return Ok(Expr::Lit(Value::String(s)));
                        }
                        Some(c) => {
                            s.push(c);
                            self.pos += 1;
                        }
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || c == '-' => {
                let start = self.pos;
                self.pos += 1;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                let text: String = self.chars[start..self.pos].iter().collect();
                text.parse::<i64>()
                    .map(|n| Expr::Lit(Value::from(n)))
                    .map_err(|_| format!("{text:?} is not an integer"))
            }
            Some(_) => {
                let mut name = self.ident()?;
                // User-defined functions are `namespace.name(...)`.
                while self.peek() == Some('.') {
                    self.pos += 1;
                    name.push('.');
                    name.push_str(&self.ident()?);
                }
                if !self.eat('(') {
                    return match name.to_ascii_lowercase().as_str() {
                        "true" => Ok(Expr::Lit(Value::Bool(true))),
                        "false" => Ok(Expr::Lit(Value::Bool(false))),
                        "null" => Ok(Expr::Lit(Value::Null)),
                        _ => Err(format!("{name:?} is not a function call")),
                    };
                }
                let mut args = Vec::new();
                if !self.eat(')') {
                    loop {
                        args.push(self.expr()?);
                        if self.eat(')') {
                            break;
                        }
                        if !self.eat(',') {
                            return Err(format!(
                                "expected ',' or ')' in the arguments of {name}()"
                            ));
                        }
                    }
                }
                Ok(Expr::Call(name, args))
            }
        }
    }
}

/// Canonical text: function names in lower case, literals in single quotes. Two expressions
/// that print the same way (ignoring case, as ARM does for names) denote the same value.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Lit(Value::String(s)) => write!(f, "'{}'", s.replace('\'', "''")),
            Expr::Lit(v) => write!(f, "{v}"),
            Expr::Call(name, args) => {
                write!(f, "{}(", name.to_ascii_lowercase())?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{a}")?;
                }
                write!(f, ")")
            }
            Expr::Prop(e, name) => write!(f, "{e}.{name}"),
            Expr::Index(e, i) => write!(f, "{e}[{i}]"),
        }
    }
}

impl Expr {
    /// The string literals and property names in the expression, in order: the raw material
    /// for a fallback name (`[parameters('webNsgName')]` gives `webNsgName`).
    pub fn words(&self, out: &mut Vec<String>) {
        match self {
            Expr::Lit(Value::String(s)) => out.push(s.clone()),
            Expr::Lit(_) => {}
            Expr::Call(_, args) => args.iter().for_each(|a| a.words(out)),
            Expr::Prop(e, name) => {
                e.words(out);
                out.push(name.clone());
            }
            Expr::Index(e, _) => e.words(out),
        }
    }
}

/// Index of a template scope in [`Scopes`].
pub type ScopeId = usize;

/// What expressions of one template can see.
#[derive(Default, Clone, Copy)]
struct ScopeData<'a> {
    parameters: Option<&'a Map<String, Value>>,
    variables: Option<&'a Map<String, Value>>,
    /// For a nested template with inner scope: the `parameters` its deployment passes, whose
    /// `value`s are evaluated in the parent scope.
    passed: Option<(&'a Map<String, Value>, ScopeId)>,
    /// False for scope 0, where values outside any template live.
    template: bool,
}

/// The template scopes met in one file. Scope 0 has no parameters or variables: it is where
/// values outside any template (REST and `az` output) are evaluated.
pub struct Scopes<'a> {
    scopes: Vec<ScopeData<'a>>,
}

/// Which parameter defaults and variables a value was taken from.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Trace {
    pub parameters: BTreeSet<String>,
    pub variables: BTreeSet<String>,
    steps: usize,
}

impl Trace {
    pub fn is_empty(&self) -> bool {
        self.parameters.is_empty() && self.variables.is_empty()
    }

    /// "the default of parameter p, variable v".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.parameters.is_empty() {
            let names: Vec<&str> = self.parameters.iter().map(String::as_str).collect();
            let s = if names.len() == 1 { "" } else { "s" };
            parts.push(format!(
                "the template's default of parameter{s} {}",
                names.join(", ")
            ));
        }
        if !self.variables.is_empty() {
            let names: Vec<&str> = self.variables.iter().map(String::as_str).collect();
            let s = if names.len() == 1 { "" } else { "s" };
            parts.push(format!("the template's variable{s} {}", names.join(", ")));
        }
        parts.join(" and ")
    }
}

/// A value met during evaluation: computed, or still template text (which may hold
/// expressions) to be evaluated in its own scope when needed.
#[derive(Clone)]
enum Val<'a> {
    Done(Value),
    Raw(&'a Value, ScopeId),
}

/// `map[key]`, else the first entry whose key equals `key` ignoring ASCII case (ARM and
/// Azure's JSON names are case-insensitive).
pub fn get_ci<'v>(map: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// What kind of JSON value `v` is, for messages: "a string", "an array"...
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Functions whose value depends on the deployment (where, when, by whom, what exists).
const DEPLOYMENT_FUNCTIONS: &[&str] = &[
    "resourcegroup",
    "subscription",
    "deployment",
    "reference",
    "uniquestring",
    "copyindex",
    "environment",
    "utcnow",
    "newguid",
    "tenant",
    "managementgroup",
    "guid",
    "pickzones",
    "subscriptionresourceid",
    "tenantresourceid",
    "extensionresourceid",
    "managementgroupresourceid",
    "listkeys",
    "listsecrets",
    "listaccountsas",
    "listservicesas",
    "providers",
];

impl<'a> Default for Scopes<'a> {
    fn default() -> Self {
        Scopes {
            scopes: vec![ScopeData::default()],
        }
    }
}

impl<'a> Scopes<'a> {
    pub const NONE: ScopeId = 0;

    /// A top-level template's scope.
    pub fn template(&mut self, template: &'a Map<String, Value>) -> ScopeId {
        self.scopes.push(ScopeData {
            parameters: template.get("parameters").and_then(Value::as_object),
            variables: template.get("variables").and_then(Value::as_object),
            passed: None,
            template: true,
        });
        self.scopes.len() - 1
    }

    /// A nested template with inner scope: its parameters take the values its deployment
    /// passes (evaluated in `parent`), else their defaults.
    pub fn nested(
        &mut self,
        template: &'a Map<String, Value>,
        passed: Option<&'a Map<String, Value>>,
        parent: ScopeId,
    ) -> ScopeId {
        self.scopes.push(ScopeData {
            parameters: template.get("parameters").and_then(Value::as_object),
            variables: template.get("variables").and_then(Value::as_object),
            passed: passed.map(|p| (p, parent)),
            template: true,
        });
        self.scopes.len() - 1
    }

    /// Evaluates a parsed expression.
    pub fn eval(&self, scope: ScopeId, e: &Expr, trace: &mut Trace) -> Result<Value, String> {
        let v = self.eval_expr(scope, e, trace, 0)?;
        self.force(v, trace, 0)
    }

    fn data(&self, scope: ScopeId) -> ScopeData<'a> {
        self.scopes.get(scope).copied().unwrap_or_default()
    }

    /// Evaluates template text just enough to see what it is (an expression string becomes
    /// its value; objects and arrays stay raw).
    fn settle(&self, v: Val<'a>, trace: &mut Trace, depth: usize) -> Result<Val<'a>, String> {
        if depth > MAX_DEPTH {
            return Err("values refer to one another too deeply (a cycle?)".into());
        }
        match v {
            Val::Raw(Value::String(s), scope) => match expression_text(s) {
                Some(text) => {
                    let e = parse(text).map_err(|err| format!("cannot parse {s:?}: {err}"))?;
                    let inner = self.eval_expr(scope, &e, trace, depth + 1)?;
                    self.settle(inner, trace, depth + 1)
                }
                None => Ok(Val::Done(Value::String(literal(s).to_string()))),
            },
            Val::Raw(Value::Array(_) | Value::Object(_), _) => Ok(v),
            Val::Raw(other, _) => Ok(Val::Done(other.clone())),
            Val::Done(_) => Ok(v),
        }
    }

    /// Evaluates completely.
    fn force(&self, v: Val<'a>, trace: &mut Trace, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("values nested too deeply".into());
        }
        match self.settle(v, trace, depth)? {
            Val::Done(v) => Ok(v),
            Val::Raw(Value::Array(items), scope) => items
                .iter()
                .map(|x| self.force(Val::Raw(x, scope), trace, depth + 1))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            Val::Raw(Value::Object(map), scope) => map
                .iter()
                .map(|(k, x)| Ok((k.clone(), self.force(Val::Raw(x, scope), trace, depth + 1)?)))
                .collect::<Result<Map<_, _>, String>>()
                .map(Value::Object),
            Val::Raw(other, _) => Ok(other.clone()),
        }
    }

    fn scalar(&self, v: Val<'a>, trace: &mut Trace, depth: usize) -> Result<Value, String> {
        self.force(v, trace, depth)
    }

    fn string_arg(
        &self,
        scope: ScopeId,
        e: &Expr,
        func: &str,
        trace: &mut Trace,
        depth: usize,
    ) -> Result<String, String> {
        let v = self.eval_expr(scope, e, trace, depth)?;
        match self.scalar(v, trace, depth)? {
            Value::String(s) => Ok(s),
            other => Err(format!(
                "{func}() expects a string, got {}",
                type_name(&other)
            )),
        }
    }

    fn eval_expr(
        &self,
        scope: ScopeId,
        e: &Expr,
        trace: &mut Trace,
        depth: usize,
    ) -> Result<Val<'a>, String> {
        if depth > MAX_DEPTH {
            return Err("expressions refer to one another too deeply (a cycle?)".into());
        }
        trace.steps += 1;
        if trace.steps > MAX_STEPS {
            return Err("the expression takes too many steps to evaluate".into());
        }
        let depth = depth + 1;
        match e {
            Expr::Lit(v) => Ok(Val::Done(v.clone())),
            Expr::Prop(inner, name) => {
                let base = self.eval_expr(scope, inner, trace, depth)?;
                match self.settle(base, trace, depth)? {
                    Val::Raw(Value::Object(map), s) => get_ci(map, name)
                        .map(|v| Val::Raw(v, s))
                        .ok_or_else(|| format!("the object has no property {name:?}")),
                    Val::Done(Value::Object(map)) => get_ci(&map, name)
                        .map(|v| Val::Done(v.clone()))
                        .ok_or_else(|| format!("the object has no property {name:?}")),
                    Val::Done(other) => Err(format!(
                        "property .{name} of {}, not of an object",
                        type_name(&other)
                    )),
                    Val::Raw(other, _) => Err(format!(
                        "property .{name} of {}, not of an object",
                        type_name(other)
                    )),
                }
            }
            Expr::Index(inner, index) => {
                let i = self.eval_expr(scope, index, trace, depth)?;
                let i = self.scalar(i, trace, depth)?;
                let base = self.eval_expr(scope, inner, trace, depth)?;
                let base = self.settle(base, trace, depth)?;
                let position =
                    |n: &serde_json::Number| n.as_u64().and_then(|n| usize::try_from(n).ok());
                let value: Option<Val<'a>> = match (base, &i) {
                    (Val::Raw(Value::Array(items), s), Value::Number(n)) => position(n)
                        .and_then(|n| items.get(n))
                        .map(|v| Val::Raw(v, s)),
                    (Val::Done(Value::Array(items)), Value::Number(n)) => position(n)
                        .and_then(|n| items.get(n))
                        .map(|v| Val::Done(v.clone())),
                    (Val::Raw(Value::Object(map), s), Value::String(k)) => {
                        get_ci(map, k).map(|v| Val::Raw(v, s))
                    }
                    (Val::Done(Value::Object(map)), Value::String(k)) => {
                        get_ci(&map, k).map(|v| Val::Done(v.clone()))
                    }
                    _ => return Err(format!("cannot index with {}", type_name(&i))),
                };
                value.ok_or_else(|| format!("index {i} is out of range"))
            }
            Expr::Call(name, args) => self.call(scope, name, args, trace, depth),
        }
    }

    fn call(
        &self,
        scope: ScopeId,
        name: &str,
        args: &[Expr],
        trace: &mut Trace,
        depth: usize,
    ) -> Result<Val<'a>, String> {
        let lname = name.to_ascii_lowercase();
        let arity = |n: usize| {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "{name}() takes {n} argument(s), got {}",
                    args.len()
                ))
            }
        };
        match lname.as_str() {
            "parameters" => {
                arity(1)?;
                let p = self.string_arg(scope, &args[0], name, trace, depth)?;
                let data = self.data(scope);
                if let Some((passed, parent)) = data.passed
                    && let Some(given) = get_ci(passed, &p)
                {
                    return match given {
                        Value::Object(o) if o.contains_key("value") => {
                            Ok(Val::Raw(&o["value"], parent))
                        }
                        Value::Object(o) if o.contains_key("reference") => Err(format!(
                            "parameter '{p}' is passed from a Key Vault reference"
                        )),
                        _ => Err(format!("parameter '{p}' is passed in an unknown form")),
                    };
                }
                if !data.template {
                    return Err(format!(
                        "parameter '{p}' belongs to a template that is not in the file"
                    ));
                }
                let decl = data
                    .parameters
                    .and_then(|ps| get_ci(ps, &p))
                    .ok_or_else(|| format!("parameter '{p}' is not declared in the template"))?;
                match decl.as_object().and_then(|d| get_ci(d, "defaultValue")) {
                    Some(default) => {
                        trace.parameters.insert(p);
                        Ok(Val::Raw(default, scope))
                    }
                    None => Err(format!(
                        "parameter '{p}' has no default value: its value is chosen at deployment"
                    )),
                }
            }
            "variables" => {
                arity(1)?;
                let v = self.string_arg(scope, &args[0], name, trace, depth)?;
                let vars = self.data(scope).variables;
                if !self.data(scope).template {
                    return Err(format!(
                        "variable '{v}' belongs to a template that is not in the file"
                    ));
                }
                if let Some(value) = vars.and_then(|vs| get_ci(vs, &v)).filter(|_| v != "copy") {
                    trace.variables.insert(v);
                    return Ok(Val::Raw(value, scope));
                }
                let by_copy = vars
                    .and_then(|vs| vs.get("copy"))
                    .and_then(Value::as_array)
                    .is_some_and(|loops| {
                        loops.iter().any(|l| {
                            l.get("name")
                                .and_then(Value::as_str)
                                .is_some_and(|n| n.eq_ignore_ascii_case(&v))
                        })
                    });
                if by_copy {
                    Err(format!("variable '{v}' is built by a copy loop"))
                } else {
                    Err(format!("variable '{v}' is not declared in the template"))
                }
            }
            "concat" => {
                let values = args
                    .iter()
                    .map(|a| {
                        let v = self.eval_expr(scope, a, trace, depth)?;
                        self.force(v, trace, depth)
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                if !values.is_empty() && values.iter().all(Value::is_array) {
                    let items = values.into_iter().flat_map(|v| match v {
                        Value::Array(items) => items,
                        _ => Vec::new(),
                    });
                    let items: Vec<Value> = items.collect();
                    if items.len() > MAX_ITEMS {
                        return Err("concat() result is too long".into());
                    }
                    return Ok(Val::Done(Value::Array(items)));
                }
                let mut out = String::new();
                for v in &values {
                    out.push_str(&scalar_text(v, "concat")?);
                    if out.len() > MAX_STRING {
                        return Err("concat() result is too long".into());
                    }
                }
                Ok(Val::Done(Value::String(out)))
            }
            "format" => {
                if args.is_empty() {
                    return Err("format() needs a format string".into());
                }
                let fmt = self.string_arg(scope, &args[0], name, trace, depth)?;
                let values = args[1..]
                    .iter()
                    .map(|a| {
                        let v = self.eval_expr(scope, a, trace, depth)?;
                        let v = self.force(v, trace, depth)?;
                        scalar_text(&v, "format")
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                let s = format_string(&fmt, &values)?;
                if s.len() > MAX_STRING {
                    return Err("format() result is too long".into());
                }
                Ok(Val::Done(Value::String(s)))
            }
            "string" => {
                arity(1)?;
                let v = self.eval_expr(scope, &args[0], trace, depth)?;
                Ok(Val::Done(Value::String(
                    match self.force(v, trace, depth)? {
                        Value::String(s) => s,
                        Value::Bool(true) => "True".into(),
                        Value::Bool(false) => "False".into(),
                        other => other.to_string(),
                    },
                )))
            }
            "int" => {
                arity(1)?;
                let v = self.eval_expr(scope, &args[0], trace, depth)?;
                match self.force(v, trace, depth)? {
                    Value::Number(n) if n.is_i64() || n.is_u64() => Ok(Val::Done(Value::Number(n))),
                    Value::String(s) => s
                        .trim()
                        .parse::<i64>()
                        .map(|n| Val::Done(Value::from(n)))
                        .map_err(|_| format!("int({s:?}): not an integer")),
                    other => Err(format!("int() of {}", type_name(&other))),
                }
            }
            "tolower" | "toupper" => {
                arity(1)?;
                let s = self.string_arg(scope, &args[0], name, trace, depth)?;
                let s = if lname == "tolower" {
                    s.to_lowercase()
                } else {
                    s.to_uppercase()
                };
                Ok(Val::Done(Value::String(s)))
            }
            "if" => {
                arity(3)?;
                let c = self.eval_expr(scope, &args[0], trace, depth)?;
                match self.force(c, trace, depth)? {
                    Value::Bool(true) => self.eval_expr(scope, &args[1], trace, depth),
                    Value::Bool(false) => self.eval_expr(scope, &args[2], trace, depth),
                    other => Err(format!(
                        "if() condition is {}, not a boolean",
                        type_name(&other)
                    )),
                }
            }
            "true" | "false" => {
                arity(0)?;
                Ok(Val::Done(Value::Bool(lname == "true")))
            }
            "resourceid" => self
                .resource_id(scope, args, trace, depth)
                .map(|s| Val::Done(Value::String(s))),
            f if DEPLOYMENT_FUNCTIONS.contains(&f) || f.starts_with("list") => {
                Err(format!("{name}() depends on the deployment"))
            }
            _ => Err(format!("{name}() is not evaluated by the importer")),
        }
    }

    /// `resourceId([subscriptionId,] [resourceGroupName,] type, name, ...)` as
    /// `/providers/{type}/{name}[/{child type}/{child name}]`: the subscription and resource
    /// group are left out (they depend on the deployment and no Kubernetes name uses them).
    fn resource_id(
        &self,
        scope: ScopeId,
        args: &[Expr],
        trace: &mut Trace,
        depth: usize,
    ) -> Result<String, String> {
        for (i, a) in args.iter().enumerate() {
            let mut scratch = Trace {
                steps: trace.steps,
                ..Trace::default()
            };
            let ty = self
                .eval_expr(scope, a, &mut scratch, depth)
                .and_then(|v| self.force(v, &mut scratch, depth));
            trace.steps = scratch.steps;
            let Ok(Value::String(ty)) = ty else {
                if trace.steps > MAX_STEPS {
                    return Err("the expression takes too many steps to evaluate".into());
                }
                continue;
            };
            let Some((provider, types)) = ty.split_once('/') else {
                continue;
            };
            if !provider.contains('.') {
                continue;
            }
            trace.parameters.extend(scratch.parameters);
            trace.variables.extend(scratch.variables);
            let names = args[i + 1..]
                .iter()
                .map(|n| self.string_arg(scope, n, "resourceId", trace, depth))
                .collect::<Result<Vec<_>, String>>()?;
            let types: Vec<&str> = types.split('/').collect();
            if names.len() != types.len() {
                return Err(format!(
                    "resourceId() of type {ty} takes {} name(s)",
                    types.len()
                ));
            }
            let mut id = format!("/providers/{provider}");
            for (t, n) in types.iter().zip(&names) {
                id.push_str(&format!("/{t}/{n}"));
            }
            return Ok(id);
        }
        Err("resourceId() without a resource type".into())
    }
}

fn scalar_text(v: &Value, func: &str) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("{func}() of {}", type_name(other))),
    }
}

/// .NET composite formatting, as ARM's `format()`: `{0}`, `{1}`, with `{{` and `}}` escapes.
fn format_string(fmt: &str, args: &[String]) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut spec = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => spec.push(c),
                        None => return Err(format!("format({fmt:?}): unterminated placeholder")),
                    }
                }
                let index: usize = spec.trim().parse().map_err(|_| {
                    format!("format({fmt:?}): placeholder {{{spec}}} is not supported")
                })?;
                out.push_str(
                    args.get(index)
                        .ok_or_else(|| format!("format({fmt:?}): no argument {index}"))?,
                );
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval_in(template: &Value, text: &str) -> Result<(Value, Trace), String> {
        let mut scopes = Scopes::default();
        let s = scopes.template(template.as_object().unwrap());
        let mut trace = Trace::default();
        let v = scopes.eval(s, &parse(expression_text(text).unwrap())?, &mut trace)?;
        Ok((v, trace))
    }

    #[test]
    fn parses_and_prints_canonically() {
        let e = parse("concat( Parameters('a'),'/x''y', variables('v')[0].name)").unwrap();
        assert_eq!(
            e.to_string(),
            "concat(parameters('a'), '/x''y', variables('v')[0].name)"
        );
        assert!(parse("concat('a'").is_err());
        assert!(parse("'open").is_err());
        assert!(parse("a.b").is_err());
        assert!(parse(&"f(".repeat(200)).unwrap_err().contains("deeply"));
        assert!(parse("").is_err());
        assert!(parse("f() extra").is_err());
    }

    #[test]
    fn expression_strings() {
        assert_eq!(expression_text("[variables('x')]"), Some("variables('x')"));
        assert_eq!(expression_text("[[literal]"), None);
        assert_eq!(expression_text("10.0.0.0/8"), None);
        assert_eq!(expression_text("["), None);
        assert_eq!(literal("[[x]"), "[x]");
    }

    #[test]
    fn resolves_what_the_template_fixes() {
        let t = json!({
            "parameters": {
                "withDefault": {"type": "string", "defaultValue": "10.0.0.0/24"},
                "noDefault": {"type": "string"},
                "location": {"type": "string", "defaultValue": "[resourceGroup().location]"},
                "net": {"type": "object", "defaultValue": {"subnets": [{"nsg": "web-nsg"}]}},
                "flag": {"type": "bool", "defaultValue": false}
            },
            "variables": {
                "port": 30303,
                "name": "[concat('nsg-', variables('tier'))]",
                "tier": "web",
                "settings": [{"start": 49152, "end": 65534}],
                "asgName": "webAsg",
                "asgId": "[resourceId('Microsoft.Network/applicationSecurityGroups', variables('asgName'))]",
                "loop": "[variables('loop')]",
                "copy": [{"name": "rules", "count": 2, "input": {}}]
            }
        });
        let ok = |text: &str| eval_in(&t, text).unwrap().0;
        assert_eq!(ok("[parameters('withDefault')]"), json!("10.0.0.0/24"));
        assert_eq!(ok("[variables('name')]"), json!("nsg-web"));
        assert_eq!(ok("[variables('port')]"), json!(30303));
        assert_eq!(
            ok("[concat(variables('settings')[0].start, '-', variables('settings')[0].end)]"),
            json!("49152-65534")
        );
        assert_eq!(ok("[parameters('net').subnets[0].nsg]"), json!("web-nsg"));
        assert_eq!(
            ok("[if(parameters('flag'), 'A', 'Internet')]"),
            json!("Internet")
        );
        assert_eq!(
            ok("[format('{0}.{1}', 'Storage', variables('tier'))]"),
            json!("Storage.web")
        );
        assert_eq!(
            ok("[variables('asgId')]"),
            json!("/providers/Microsoft.Network/applicationSecurityGroups/webAsg")
        );
        assert_eq!(
            ok(
                "[resourceId(resourceGroup().name, 'Microsoft.Network/applicationSecurityGroups', 'x')]"
            ),
            json!("/providers/Microsoft.Network/applicationSecurityGroups/x")
        );
        let (_, trace) =
            eval_in(&t, "[concat(parameters('withDefault'), variables('tier'))]").unwrap();
        assert_eq!(trace.parameters.iter().collect::<Vec<_>>(), ["withDefault"]);
        assert_eq!(trace.variables.iter().collect::<Vec<_>>(), ["tier"]);

        let err = |text: &str| eval_in(&t, text).unwrap_err();
        assert!(err("[parameters('noDefault')]").contains("no default value"));
        assert!(
            err("[parameters('location')]").contains("resourceGroup() depends on the deployment")
        );
        assert!(
            err("[format('Storage.{0}', parameters('location'))]")
                .contains("depends on the deployment")
        );
        assert!(err("[variables('loop')]").contains("too deeply"));
        assert!(err("[variables('rules')]").contains("copy loop"));
        assert!(err("[variables('missing')]").contains("not declared"));
        assert!(err("[replace('a', 'b', 'c')]").contains("not evaluated"));
        assert!(err("[variables('settings')[5]]").contains("out of range"));
        assert!(err("[variables('tier').x]").contains("not of an object"));
    }

    #[test]
    fn runaway_templates_stop() {
        let mut vars = serde_json::Map::new();
        vars.insert("v0".into(), json!("x".repeat(1000)));
        for k in 1..20 {
            vars.insert(
                format!("v{k}"),
                json!(format!(
                    "[concat(variables('v{0}'), variables('v{0}'))]",
                    k - 1
                )),
            );
        }
        let t = json!({ "variables": vars });
        let err = eval_in(&t, "[variables('v19')]").unwrap_err();
        assert!(
            err.contains("too long") || err.contains("too many steps"),
            "{err}"
        );
    }

    #[test]
    fn inner_scope_takes_passed_values() {
        let outer =
            json!({"parameters": {"prefix": {"type": "string", "defaultValue": "10.1.0.0/16"}}});
        let inner = json!({"parameters": {"p": {"type": "string"}, "q": {"type": "string", "defaultValue": "d"}}});
        let passed = json!({"p": {"value": "[parameters('prefix')]"}});
        let mut scopes = Scopes::default();
        let o = scopes.template(outer.as_object().unwrap());
        let i = scopes.nested(inner.as_object().unwrap(), passed.as_object(), o);
        let mut trace = Trace::default();
        let v = scopes.eval(
            i,
            &parse("concat(parameters('p'), parameters('q'))").unwrap(),
            &mut trace,
        );
        assert_eq!(v.unwrap(), json!("10.1.0.0/16d"));
        assert!(trace.parameters.contains("prefix") && trace.parameters.contains("q"));
    }

    #[test]
    fn formats_like_dotnet() {
        let a = ["x".to_string(), "y".to_string()];
        assert_eq!(format_string("{0}-{1}-{{0}}", &a).unwrap(), "x-y-{0}");
        assert!(format_string("{2}", &a).is_err());
        assert!(format_string("{0:D3}", &a).is_err());
        assert!(format_string("{0", &a).is_err());
    }
}
