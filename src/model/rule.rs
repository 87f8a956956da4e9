use std::collections::BTreeMap;
use std::fmt;

use super::{AddressPrefix, LabelSelector, ObjectRef, PortRange, ValidationError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Access {
    Allow,
    Deny,
}

/// A rule's protocol. `Any` is TCP, UDP and ICMP (ICMPv6 for IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

impl Protocol {
    /// Azure spellings, case-insensitively: `Tcp`, `Udp`, `Icmp`, `*`, `Any`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "tcp" => Self::Tcp,
            "udp" => Self::Udp,
            "icmp" => Self::Icmp,
            "*" | "any" => Self::Any,
            _ => return None,
        })
    }

    /// Whether a rule of this protocol matches a packet of protocol `p` (never `Any`).
    pub fn covers(self, p: Protocol) -> bool {
        self == Protocol::Any || self == p
    }
}

macro_rules! display_as_debug {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    )*};
}
display_as_debug!(Direction, Access, Protocol);

/// A reference to an application security group; the namespace defaults to the NSG's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct AsgRef {
    pub namespace: String,
    pub name: String,
}

/// The reference to an ASG object.
impl From<&ObjectRef> for AsgRef {
    fn from(id: &ObjectRef) -> Self {
        AsgRef {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
        }
    }
}

impl fmt::Display for AsgRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One side of a rule: address prefixes (incl. service tags) or application security groups.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Endpoint {
    Prefixes(Vec<AddressPrefix>),
    Asgs(Vec<AsgRef>),
}

impl Endpoint {
    pub fn any() -> Self {
        Endpoint::Prefixes(vec![AddressPrefix::Any])
    }

    /// Each prefix, tag or `asg:<name>` as written.
    pub fn items(&self) -> Vec<String> {
        match self {
            Endpoint::Prefixes(p) => p.iter().map(|x| x.to_string()).collect(),
            Endpoint::Asgs(a) => a.iter().map(|x| format!("asg:{}", x.name)).collect(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.items().join(","))
    }
}

/// One security rule, augmented (lists of prefixes and port ranges) and normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SecurityRule {
    pub name: String,
    pub description: Option<String>,
    /// 100..=4096 for user rules; 65000.. for the default rules.
    pub priority: u32,
    pub direction: Direction,
    pub access: Access,
    pub protocol: Protocol,
    pub source: Endpoint,
    pub source_ports: Vec<PortRange>,
    pub destination: Endpoint,
    pub destination_ports: Vec<PortRange>,
    /// One of the six rules every group has.
    pub is_default: bool,
}

impl SecurityRule {
    /// A rule that restricts ports matches only TCP and UDP: ICMP has no ports.
    pub fn restricts_ports(&self) -> bool {
        !self.source_ports.iter().any(PortRange::is_all)
            || !self.destination_ports.iter().any(PortRange::is_all)
    }
}

/// Azure's limits, enforced at admission so CEL stays within the API server's cost budget.
pub struct RuleLimits;

impl RuleLimits {
    pub const PRIORITY_MIN: u32 = 100;
    pub const PRIORITY_MAX: u32 = 4096;
    /// Azure allows 1,000. The API server stops a CEL expression at 1,000,000 cost units at
    /// run time, and checking unique priorities costs 2 × rules² (980,000 at 700).
    pub const RULES_PER_GROUP: usize = 700;
    pub const PREFIXES_PER_RULE: usize = 400;
    pub const PORT_RANGES_PER_RULE: usize = 100;
    pub const ASGS_PER_RULE: usize = 10;
}

/// A network security group as the evaluators see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Nsg {
    pub id: ObjectRef,
    /// RFC 3339 creation time; the oldest group wins an association conflict.
    pub created: Option<String>,
    pub generation: Option<i64>,
    /// Associated with every pod of its namespace (the subnet level).
    pub subnet: bool,
    /// Associated with the pods it selects (the network-interface level).
    pub pod_selector: Option<LabelSelector>,
    /// The user's rules; the defaults are added by `rules_for`.
    pub rules: Vec<SecurityRule>,
}

impl Nsg {
    /// The rules in force for one direction, user rules then defaults, in priority order.
    pub fn rules_for(&self, direction: Direction) -> Vec<SecurityRule> {
        let mut rules: Vec<SecurityRule> = self
            .rules
            .iter()
            .filter(|r| r.direction == direction)
            .cloned()
            .chain(
                default_rules()
                    .into_iter()
                    .filter(|r| r.direction == direction),
            )
            .collect();
        rules.sort_by_key(|r| r.priority);
        rules
    }

    /// Checks what holds across the group's rules (the per-field syntax is checked while
    /// parsing). Returns every problem, each naming the group, the rule and the field.
    pub fn validate(&self) -> Vec<ValidationError> {
        let object = format!("NetworkSecurityGroup {}", self.id);
        let mut errors = Vec::new();
        let mut err = |i: usize, rule: &SecurityRule, field: &str, message: String| {
            errors.push(ValidationError {
                object: object.clone(),
                rule: Some(rule.name.clone()),
                field: format!("spec.securityRules[{i}].{field}"),
                message,
            })
        };
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut priorities: BTreeMap<(u32, Direction), &str> = BTreeMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if !(RuleLimits::PRIORITY_MIN..=RuleLimits::PRIORITY_MAX).contains(&rule.priority) {
                err(
                    i,
                    rule,
                    "priority",
                    format!("{} is outside 100..4096", rule.priority),
                );
            }
            if let Some(first) = names.insert(&rule.name, i) {
                err(
                    i,
                    rule,
                    "name",
                    format!("duplicates the name of rule {first}"),
                );
            }
            if let Some(other) = priorities.insert((rule.priority, rule.direction), &rule.name) {
                err(
                    i,
                    rule,
                    "priority",
                    format!(
                        "{} {} is already used by rule {other:?}; priorities are unique per direction",
                        rule.direction, rule.priority
                    ),
                );
            }
            if rule.protocol == Protocol::Icmp && rule.restricts_ports() {
                err(
                    i,
                    rule,
                    "protocol",
                    "Icmp has no ports: port ranges must be '*'".into(),
                );
            }
        }
        if self.rules.len() > RuleLimits::RULES_PER_GROUP {
            errors.push(ValidationError {
                object,
                rule: None,
                field: "spec.securityRules".into(),
                message: format!(
                    "{} rules; a group holds at most {}",
                    self.rules.len(),
                    RuleLimits::RULES_PER_GROUP
                ),
            });
        }
        errors
    }
}

/// The six rules every group has (Azure's names and priorities), overridable by any user
/// rule since every user priority is lower.
pub fn default_rules() -> Vec<SecurityRule> {
    use AddressPrefix::{Any, Tag};
    let tag = |t: &str| Endpoint::Prefixes(vec![Tag(t.to_string())]);
    let any = || Endpoint::Prefixes(vec![Any]);
    let rule = |name: &str, priority, direction, access, source, destination| SecurityRule {
        name: name.to_string(),
        description: None,
        priority,
        direction,
        access,
        protocol: Protocol::Any,
        source,
        source_ports: vec![PortRange::ALL],
        destination,
        destination_ports: vec![PortRange::ALL],
        is_default: true,
    };
    use Access::{Allow, Deny};
    use Direction::{Inbound, Outbound};
    vec![
        rule(
            "AllowVNetInBound",
            65000,
            Inbound,
            Allow,
            tag("VirtualNetwork"),
            tag("VirtualNetwork"),
        ),
        rule(
            "AllowAzureLoadBalancerInBound",
            65001,
            Inbound,
            Allow,
            tag("AzureLoadBalancer"),
            any(),
        ),
        rule("DenyAllInbound", 65500, Inbound, Deny, any(), any()),
        rule(
            "AllowVnetOutBound",
            65000,
            Outbound,
            Allow,
            tag("VirtualNetwork"),
            tag("VirtualNetwork"),
        ),
        rule(
            "AllowInternetOutBound",
            65001,
            Outbound,
            Allow,
            any(),
            tag("Internet"),
        ),
        rule("DenyAllOutBound", 65500, Outbound, Deny, any(), any()),
    ]
}
