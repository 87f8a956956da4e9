use crate::model::RuleLimits;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::{Message, Rule};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// CEL that holds when `v` is a port range: `*`, `N` or `N-M` with N <= M <= 65535.
fn port_check(v: &str) -> String {
    format!(
        "{v} == '*' || ({v}.matches('^[0-9]{{1,5}}$') && int({v}) <= 65535) \
         || ({v}.matches('^[0-9]{{1,5}}-[0-9]{{1,5}}$') \
         && int({v}.split('-')[0]) <= int({v}.split('-')[1]) && int({v}.split('-')[1]) <= 65535)"
    )
}
const PORT_MESSAGE: &str = "port ranges must be '*', a port N or a range N-M with N <= M <= 65535";

/// The shape of an address prefix, checked per list item by the schema (CEL per item of
/// lists this long would exceed the API server's cost budget): IPv4 octets and prefix
/// lengths exactly, IPv6 loosely; the controller checks the rest (host bits, IPv6 syntax)
/// and reports it in status.
const ADDRESS_PATTERN: &str = r"^(\*|[A-Za-z][A-Za-z0-9._-]*|(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}(/([0-9]|[12][0-9]|3[0-2]))?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))?)$";

/// CEL that holds when `v` is an IP address or a CIDR block without host bits.
fn ip_or_cidr_check(v: &str) -> String {
    format!("isIP({v}) || (isCIDR({v}) && cidr({v}) == cidr({v}).masked())")
}

/// CEL that holds when `v` is `*`/`Any`, an IP address, a CIDR block without host bits, or a
/// service tag name.
fn address_check(v: &str) -> String {
    format!(
        "{v} == '*' || {v}.lowerAscii() == 'any' || {} \
         || ({v}.matches('^[A-Za-z][A-Za-z0-9._-]*$') && !isCIDR({v}))",
        ip_or_cidr_check(v)
    )
}
const ADDRESS_MESSAGE: &str = "address prefixes must be '*', 'Any', an IP address, a CIDR block \
    without host bits (e.g. 10.0.0.0/8) or a service tag name (e.g. VirtualNetwork)";

/// A lower-case RFC 1123 subdomain: what an object name is.
const OBJECT_NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// Two rules of one direction share no priority.
///
/// Ratcheted: an unchanged rule list (every status write, metadata edits) is not checked
/// again; the API server runs a CRD's CEL rules on status writes too. The check maps each rule
/// to one signed integer (direction as the sign) and compares the integers with the native
/// `indexOf`/`lastIndexOf` (Kubernetes 1.25+); interpreted pairwise (`self.all(r,
/// self.exists_one(o, ...))`) it was three quarters of the API server's work: creating the
/// controller benchmark's 100 groups of 50 rules took 13.3 s, now 3.8 s (3.3 s without any
/// CEL). The one-element list binds the mapped list.
///
/// The message names the two rules. It runs only when the check failed, so a duplicate
/// exists. Finding the pair costs as much as the check, and above 500 rules more than the API
/// server allows one expression, so larger groups get the message without names.
/// (`string(int)` and `join` would name the priority or every such rule, but the API
/// server's cost estimate for them exceeds the CRD's total budget.)
fn unique_priorities() -> Rule {
    let key = "r.direction == 'Inbound' ? r.priority : -r.priority";
    let unique = "priorities must be unique per direction";
    Rule::new(format!(
        "oldSelf.optMap(o, o == self).orValue(false) || [self.map(r, {key})].all(k, k.all(p, k.indexOf(p) == k.lastIndexOf(p)))"
    ))
    .optional_old_self(true)
    .message(Message::Expression(format!(
        "self.size() > 500 ? 'two rules of the same direction have the same priority; {unique}' \
         : [[self.map(r, {key})].map(k, k.filter(p, k.indexOf(p) != k.lastIndexOf(p))[0])[0]]\
         .map(d, [self.filter(r, ({key}) == d)]\
         .map(n, 'rules \"' + n[0].name + '\" and \"' + n[1].name + '\" have the same ' + n[0].direction \
         + ' priority; {unique}')[0])[0]"
    )))
}

/// A check of every item of a list; when it fails, the message quotes the first failing
/// item, as the API server quotes a failing scalar field.
fn each(check: fn(&str) -> String, message: &str) -> Rule {
    let check = check("x");
    Rule::new(format!("self.all(x, {check})")).message(Message::Expression(format!(
        "'\"' + self.filter(x, !({check}))[0] + '\": ' + \"{message}\""
    )))
}

/// A network security group: priority-ordered allow and deny rules for the pods it is
/// associated with, like an Azure NSG on a subnet (`subnet: true`: every pod of this
/// namespace) or on network interfaces (`podSelector`: the pods it selects).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubensg.io",
    version = "v1alpha1",
    kind = "NetworkSecurityGroup",
    namespaced,
    shortname = "nsg",
    category = "kubensg",
    status = "NetworkSecurityGroupStatus",
    printcolumn = r#"{"name":"Subnet","type":"boolean","jsonPath":".spec.subnet"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.associatedPods"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Exact","type":"string","jsonPath":".status.conditions[?(@.type==\"Degraded\")].reason"}"#,
    printcolumn = r#"{"name":"Dataplane","type":"string","jsonPath":".status.dataplane"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSecurityGroupSpec {
    /// Associate the group with the whole namespace, as an Azure NSG on a subnet: its rules
    /// apply to every pod of the namespace. At most one group per namespace; the oldest wins.
    #[serde(default)]
    pub subnet: bool,
    /// Associate the group with the pods it selects in its namespace, as an Azure NSG on
    /// network interfaces. At most one such group per pod; the oldest wins. An empty selector
    /// selects every pod of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// The security rules, with Azure's property names. The six default rules
    /// (AllowVNetInBound, AllowAzureLoadBalancerInBound, DenyAllInbound, AllowVnetOutBound,
    /// AllowInternetOutBound, DenyAllOutBound, at 65000-65500) are always present after these.
    /// At most 700 rules (Azure allows 1000; the API server's CEL cost limit for checking
    /// unique priorities allows 700).
    #[serde(default)]
    #[schemars(length(max = RuleLimits::RULES_PER_GROUP))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = unique_priorities()
    )]
    pub security_rules: Vec<SecurityRule>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Access {
    Allow,
    Deny,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    /// TCP, UDP and ICMP.
    #[serde(rename = "*", alias = "Any")]
    #[default]
    Any,
}

/// One security rule. Each side takes either address prefixes (`...AddressPrefix` or
/// `...AddressPrefixes`) or application security groups, not both.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.sourceAddressPrefix) && has(self.sourceAddressPrefixes))").message("sourceAddressPrefix and sourceAddressPrefixes are exclusive"),
    validation = Rule::new("!(has(self.destinationAddressPrefix) && has(self.destinationAddressPrefixes))").message("destinationAddressPrefix and destinationAddressPrefixes are exclusive"),
    validation = Rule::new("!(has(self.sourcePortRange) && has(self.sourcePortRanges))").message("sourcePortRange and sourcePortRanges are exclusive"),
    validation = Rule::new("!(has(self.destinationPortRange) && has(self.destinationPortRanges))").message("destinationPortRange and destinationPortRanges are exclusive"),
    validation = Rule::new("!((has(self.sourceAddressPrefix) || has(self.sourceAddressPrefixes)) && has(self.sourceApplicationSecurityGroups))").message("the source takes address prefixes or application security groups, not both"),
    validation = Rule::new("!((has(self.destinationAddressPrefix) || has(self.destinationAddressPrefixes)) && has(self.destinationApplicationSecurityGroups))").message("the destination takes address prefixes or application security groups, not both"),
    validation = Rule::new("has(self.sourceAddressPrefix) || has(self.sourceAddressPrefixes) || has(self.sourceApplicationSecurityGroups)").message("a source is required: sourceAddressPrefix, sourceAddressPrefixes or sourceApplicationSecurityGroups"),
    validation = Rule::new("has(self.destinationAddressPrefix) || has(self.destinationAddressPrefixes) || has(self.destinationApplicationSecurityGroups)").message("a destination is required: destinationAddressPrefix, destinationAddressPrefixes or destinationApplicationSecurityGroups"),
    validation = Rule::new("self.protocol != 'Icmp' || ((!has(self.sourcePortRange) || self.sourcePortRange == '*') && (!has(self.destinationPortRange) || self.destinationPortRange == '*') && !has(self.sourcePortRanges) && !has(self.destinationPortRanges))").message("Icmp has no ports: port ranges must be '*'")
)]
pub struct SecurityRule {
    /// Unique within the group.
    #[schemars(length(min = 1, max = 80))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 140))]
    pub description: Option<String>,
    /// 100 to 4096; lower numbers are processed first, and processing stops at the first rule
    /// that matches. Unique per direction within the group.
    #[schemars(range(min = 100, max = 4096))]
    pub priority: i32,
    /// `Inbound` or `Outbound`, from the pod's point of view.
    #[schemars(length(max = 8))]
    pub direction: Direction,
    pub access: Access,
    /// `Tcp`, `Udp`, `Icmp` or `*` (also written `Any`): TCP, UDP and ICMP.
    #[serde(default)]
    pub protocol: Protocol,
    /// `*`, an IP address, a CIDR block, or a service tag (VirtualNetwork, Internet,
    /// AzureLoadBalancer or a ServiceTag's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    #[x_kube(validation = Rule::new(address_check("self")).message(ADDRESS_MESSAGE))]
    pub source_address_prefix: Option<String>,
    /// Several source prefixes (an augmented rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RuleLimits::PREFIXES_PER_RULE), inner(length(max = 64), regex(pattern = ADDRESS_PATTERN)))]
    pub source_address_prefixes: Option<Vec<String>>,
    /// `*`, `N` or `N-M`. Defaults to `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 11))]
    #[x_kube(validation = Rule::new(port_check("self")).message(PORT_MESSAGE))]
    pub source_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RuleLimits::PORT_RANGES_PER_RULE), inner(length(max = 11)))]
    #[x_kube(validation = each(port_check, PORT_MESSAGE))]
    pub source_port_ranges: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    #[x_kube(validation = Rule::new(address_check("self")).message(ADDRESS_MESSAGE))]
    pub destination_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RuleLimits::PREFIXES_PER_RULE), inner(length(max = 64), regex(pattern = ADDRESS_PATTERN)))]
    pub destination_address_prefixes: Option<Vec<String>>,
    /// `*`, `N` or `N-M`. Defaults to `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 11))]
    #[x_kube(validation = Rule::new(port_check("self")).message(PORT_MESSAGE))]
    pub destination_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RuleLimits::PORT_RANGES_PER_RULE), inner(length(max = 11)))]
    #[x_kube(validation = each(port_check, PORT_MESSAGE))]
    pub destination_port_ranges: Option<Vec<String>>,
    /// Application security groups whose member pods are the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RuleLimits::ASGS_PER_RULE))]
    pub source_application_security_groups: Option<Vec<AsgReference>>,
    /// Application security groups whose member pods are the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RuleLimits::ASGS_PER_RULE))]
    pub destination_application_security_groups: Option<Vec<AsgReference>>,
}

/// A reference to an ApplicationSecurityGroup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AsgReference {
    /// An object name (an ApplicationSecurityGroup's name is at most 63 characters).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = OBJECT_NAME_PATTERN)
    )]
    pub name: String,
    /// Defaults to the group's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,
}

/// What is in force for a group, and why.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSecurityGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `Ready`, `NetworkPoliciesProgrammed`, `DataplaneProgrammed`, `Conflict`,
    /// `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// How many pods the group currently applies to (subnet and interface level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associated_pods: Option<i32>,
    /// The rules in force, per direction, default rules included, in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effective_rules: Vec<EffectiveRule>,
    /// How many rules `effectiveRules` leaves out (the lowest priorities of each direction) so
    /// that the object stays within etcd's size limit; `kube-nsg effective` lists them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omitted_effective_rules: Option<i32>,
    /// Rules that can never decide, could be removed, or whose order decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<RuleAnomaly>,
    /// The NetworkPolicies generated for this group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_policies: Vec<String>,
    /// Nodes whose dataplane enforces this generation, e.g. "3/3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
}

/// One rule in force, with its references expanded and how exactly it is enforced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveRule {
    pub name: String,
    pub priority: i32,
    pub direction: String,
    pub access: String,
    pub protocol: String,
    pub source: String,
    pub source_ports: String,
    pub destination: String,
    pub destination_ports: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// What the source and destination stand for now, e.g. "2 pods; 1 CIDR".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expansion: Option<String>,
    /// `Exact`, or why NetworkPolicy cannot express the rule exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fidelity: Option<String>,
    /// References that name nothing (they match no address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unresolved: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleAnomaly {
    /// `Shadowed`, `Redundant` or `Correlated`.
    pub kind: String,
    pub rules: Vec<String>,
    pub message: String,
}

/// An application security group: a named set of pods of this namespace that rules can use
/// as source or destination. Members are the pods `podSelector` selects plus the pods whose
/// `kubensg.io/application-security-groups` annotation lists this group's name.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubensg.io",
    version = "v1alpha1",
    kind = "ApplicationSecurityGroup",
    namespaced,
    shortname = "asg",
    category = "kubensg",
    status = "ApplicationSecurityGroupStatus",
    validation = Rule::new("size(self.metadata.name) <= 63").message("the name of an ApplicationSecurityGroup is part of a label key: at most 63 characters"),
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.memberCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationSecurityGroupSpec {
    /// Pods of this namespace that are members. Absent: only pods that list the group in
    /// their annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationSecurityGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub member_count: i32,
    /// The first members by name (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Groups whose rules reference this one, `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referenced_by: Vec<String>,
}

/// A named list of address prefixes that security rules use like a built-in service tag.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubensg.io",
    version = "v1alpha1",
    kind = "ServiceTag",
    shortname = "stag",
    category = "kubensg",
    status = "ServiceTagStatus",
    validation = Rule::new(format!("self.metadata.name.matches('{OBJECT_NAME_PATTERN}') && size(self.metadata.name) <= 80")).message("a ServiceTag's name is how rules name it: lower-case letters, digits, '-' and '.', at most 80 characters"),
    printcolumn = r#"{"name":"Prefixes","type":"integer","jsonPath":".status.prefixCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTagSpec {
    /// IPv4 and IPv6 CIDR blocks (or single addresses).
    #[schemars(length(max = 4000), inner(length(max = 43)))]
    #[x_kube(validation = each(ip_or_cidr_check, "each prefix must be an IP address or a CIDR block without host bits"))]
    pub address_prefixes: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTagStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub prefix_count: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referenced_by: Vec<String>,
}
