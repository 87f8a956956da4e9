//! What the status of each object should say, computed from the resolved model (pure: no
//! client here), and how conditions keep their `lastTransitionTime` across passes.
//!
//! The controller's pass owns these NSG conditions (`DataplaneProgrammed` and
//! `status.dataplane` are written from the node agents' reports by [`super::dataplane`], with a
//! field manager of their own; the list is a map keyed by `type`, so both can server-side
//! apply their own entries):
//!
//! | type | True | False |
//! |---|---|---|
//! | `Accepted` | `Valid` | `Invalid`: the spec fails validation; the last valid generation, if any, stays in force |
//! | `ResolvedRefs` | `Resolved` | `MissingReferences`: an ASG or service tag that does not exist; it matches nothing, the rest is enforced |
//! | `Conflict` | `SubnetConflict`, `InterfaceConflict`: an older group is bound at that level | `NoConflict` |
//! | `Degraded` | `NotExact`: rules NetworkPolicy cannot express, per the compiler | `Exact` |
//! | `NetworkPoliciesProgrammed` | `Programmed` | `ApplyFailed`, `NotOwned`, `NotAccepted` |
//! | `Ready` | `Ready`: the current generation is accepted and programmed | the first reason that is not |

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::compile::Fidelity;
use crate::api::{
    ApplicationSecurityGroupStatus, EffectiveRule, NetworkSecurityGroupStatus, RuleAnomaly,
    ServiceTagStatus,
};
use crate::json_len;
use crate::model::{
    AddressPrefix, AsgRef, Direction, Endpoint, Nsg, ObjectRef, PortRange, SecurityRule,
    ValidationErrors, WellKnownTag,
};
use crate::resolve::{Level, Resolved, Unresolved};

pub const ACCEPTED: &str = "Accepted";
pub const RESOLVED_REFS: &str = "ResolvedRefs";
pub const CONFLICT: &str = "Conflict";
pub const DEGRADED: &str = "Degraded";
pub const PROGRAMMED: &str = "NetworkPoliciesProgrammed";
pub const READY: &str = "Ready";

/// The NSG condition types this controller writes.
pub const NSG_CONDITIONS: [&str; 6] = [
    ACCEPTED,
    RESOLVED_REFS,
    CONFLICT,
    DEGRADED,
    PROGRAMMED,
    READY,
];
/// The ASG and ServiceTag condition types this controller writes.
pub const OTHER_CONDITIONS: [&str; 1] = [ACCEPTED];

/// Longest condition message; the API allows 32 KiB, people read far less.
const MAX_MESSAGE: usize = 1024;
/// How many members an ASG's status lists.
pub const MAX_LISTED_MEMBERS: usize = 50;
/// How many addresses, groups or port ranges an effective rule lists per field: the spec
/// holds them all and `kube-nsg effective` expands them.
const MAX_LISTED_ITEMS: usize = 10;
/// etcd's default request limit (`--max-request-bytes`): the whole object, metadata, spec and
/// status, is stored in one request.
const OBJECT_LIMIT: usize = 1536 * 1024;
/// Room kept in the object for the conditions and the rest of the status.
const STATUS_HEADROOM: usize = 64 * 1024;
/// The most the effective rules take, however small the spec: a status of megabytes is read
/// by nobody and rewritten whenever a rule changes.
const MAX_EFFECTIVE_RULES_BYTES: usize = 256 * 1024;
/// Budgets are multiples of this, so the object growing by a few bytes (a longer
/// `resourceVersion`) does not change what its status lists.
const BUDGET_STEP: usize = 16 * 1024;

/// A condition before it gets its timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Cond {
            type_,
            status,
            reason: reason.into(),
            message: bound(message.into()),
        }
    }

    fn status_str(&self) -> &'static str {
        if self.status { "True" } else { "False" }
    }

    /// Whether `observed` says the same thing (timestamps aside).
    pub fn same_as(&self, observed: &Condition) -> bool {
        observed.type_ == self.type_
            && observed.status == self.status_str()
            && observed.reason == self.reason
            && observed.message == self.message
    }
}

fn bound(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Now, at the second precision the API server stores.
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).expect("now is a valid timestamp")
}

/// Full conditions: `lastTransitionTime` is kept from the observed condition of the same type
/// while its status stays the same, and is `now` on a real transition.
pub fn conditions(
    observed: &[Condition],
    desired: &[Cond],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let previous = observed.iter().find(|o| o.type_ == d.type_);
            let last_transition_time = match previous {
                Some(o) if o.status == d.status_str() => o.last_transition_time.clone(),
                _ => Time(now),
            };
            Condition {
                type_: d.type_.to_string(),
                status: d.status_str().to_string(),
                reason: d.reason.clone(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The conditions of `observed` whose types are in `owned`, sorted by type, to compare with
/// what this controller would write.
pub fn owned_conditions(observed: &[Condition], owned: &[&str]) -> Vec<Condition> {
    let mut out: Vec<Condition> = observed
        .iter()
        .filter(|c| owned.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Descriptions of what rule endpoints stand for.
pub struct Summaries<'r, 'a> {
    res: &'r Resolved<'a>,
}

impl<'r, 'a> Summaries<'r, 'a> {
    pub fn new(res: &'r Resolved<'a>) -> Self {
        Summaries { res }
    }

    /// Stable under pod and node churn on purpose: a status that counted the pod or node IPs
    /// in `VirtualNetwork` would be rewritten for every group whenever a pod starts or a
    /// node joins.
    fn prefix(&self, p: &AddressPrefix) -> String {
        match p {
            AddressPrefix::Any => "any address".into(),
            AddressPrefix::Net(n) => n.to_string(),
            AddressPrefix::Tag(t) => match WellKnownTag::parse(t) {
                Some(WellKnownTag::VirtualNetwork) => {
                    "VirtualNetwork (the cluster: configured ranges, node and pod IPs)".into()
                }
                Some(WellKnownTag::Internet) => {
                    "Internet (every address outside VirtualNetwork)".into()
                }
                Some(WellKnownTag::AzureLoadBalancer) => "AzureLoadBalancer (the node IPs)".into(),
                None => match self
                    .res
                    .inv
                    .service_tags
                    .iter()
                    .find(|s| s.name.eq_ignore_ascii_case(t))
                {
                    Some(tag) => format!("{t} ({} prefixes)", tag.prefixes.len()),
                    None => format!("{t} (missing: matches nothing)"),
                },
            },
        }
    }

    fn asg(&self, a: &AsgRef) -> String {
        if self.res.asg_exists(a) {
            let n = self.res.members(a).count();
            format!("asg {a} ({n} pod{})", if n == 1 { "" } else { "s" })
        } else {
            format!("asg {a} (missing: matches nothing)")
        }
    }

    fn endpoint(&self, e: &Endpoint) -> String {
        match e {
            Endpoint::Prefixes(p) => {
                list_names(p.iter().map(|p| self.prefix(p)), ", ", MAX_LISTED_ITEMS)
            }
            Endpoint::Asgs(a) => list_names(a.iter().map(|a| self.asg(a)), ", ", MAX_LISTED_ITEMS),
        }
    }
}

fn ports(p: &[PortRange]) -> String {
    list_names(p.iter().map(PortRange::to_string), ",", MAX_LISTED_ITEMS)
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "Inbound",
        Direction::Outbound => "Outbound",
    }
}

/// How many bytes of JSON the effective rules may take in a group whose metadata and spec
/// take `stored_bytes`.
pub fn effective_rules_budget(stored_bytes: usize) -> usize {
    let room = OBJECT_LIMIT.saturating_sub(stored_bytes + STATUS_HEADROOM);
    room.min(MAX_EFFECTIVE_RULES_BYTES) / BUDGET_STEP * BUDGET_STEP
}

/// The rules in force for a group, inbound then outbound, each in priority order with the
/// default rules, their expansion, fidelity and unresolved references; as many as fit in
/// `budget` bytes, and how many did not.
pub fn effective_rules(
    sums: &Summaries,
    nsg: &Nsg,
    fidelity: Option<&BTreeMap<String, Fidelity>>,
    budget: usize,
) -> (Vec<EffectiveRule>, usize) {
    let unresolved = sums.res.unresolved(nsg);
    let directions = [Direction::Inbound, Direction::Outbound].map(|direction| {
        nsg.rules_for(direction)
            .iter()
            .map(|rule| effective_rule(sums, rule, fidelity, &unresolved))
            .collect()
    });
    within_budget(directions, budget)
}

/// The rules of both directions that fit in `budget` bytes of JSON, and how many did not. The
/// default rules always stay. Each direction keeps its own rules (they come before its
/// defaults) in priority order up to the first that does not fit, the two taking turns so
/// neither crowds the other out.
fn within_budget(
    directions: [Vec<EffectiveRule>; 2],
    budget: usize,
) -> (Vec<EffectiveRule>, usize) {
    let size = |r: &EffectiveRule| json_len(r) + 1;
    let mut used: usize = directions
        .iter()
        .flatten()
        .filter(|r| r.default)
        .map(size)
        .sum();
    let mut kept = [0, 0];
    let mut open = [true, true];
    while open.contains(&true) {
        for (d, rules) in directions.iter().enumerate() {
            if !open[d] {
                continue;
            }
            match rules.get(kept[d]).filter(|r| !r.default).map(size) {
                Some(n) if used + n <= budget => {
                    used += n;
                    kept[d] += 1;
                }
                _ => open[d] = false,
            }
        }
    }
    let total: usize = directions.iter().map(Vec::len).sum();
    let out: Vec<EffectiveRule> = directions
        .into_iter()
        .zip(kept)
        .flat_map(|(rules, n)| {
            rules
                .into_iter()
                .enumerate()
                .filter(move |(i, r)| *i < n || r.default)
                .map(|(_, r)| r)
        })
        .collect();
    let omitted = total - out.len();
    (out, omitted)
}

fn effective_rule(
    sums: &Summaries,
    rule: &SecurityRule,
    fidelity: Option<&BTreeMap<String, Fidelity>>,
    unresolved: &[Unresolved],
) -> EffectiveRule {
    EffectiveRule {
        name: rule.name.clone(),
        priority: rule.priority as i32,
        direction: direction_name(rule.direction).into(),
        access: rule.access.to_string(),
        protocol: match rule.protocol {
            crate::model::Protocol::Any => "*".into(),
            p => p.to_string(),
        },
        source: list_names(rule.source.items(), ",", MAX_LISTED_ITEMS),
        source_ports: ports(&rule.source_ports),
        destination: list_names(rule.destination.items(), ",", MAX_LISTED_ITEMS),
        destination_ports: ports(&rule.destination_ports),
        default: rule.is_default,
        expansion: Some(format!(
            "source: {}; destination: {}",
            sums.endpoint(&rule.source),
            sums.endpoint(&rule.destination)
        )),
        fidelity: fidelity
            .and_then(|f| f.get(&rule.name))
            .map(|f| f.text.to_string()),
        unresolved: Unresolved::of_rule(unresolved, rule),
    }
}

/// Whether the group's NetworkPolicies are in place, as found by the write phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Programmed {
    /// Every desired policy matches what the API server holds.
    Ok,
    /// A policy of that name exists and is not ours: never overwritten.
    NotOwned(String),
    /// A write failed.
    Failed(String),
    /// No valid spec known, so nothing was programmed or removed.
    NotAccepted,
}

/// Everything the NSG status is made of, besides the resolved model.
pub struct NsgFacts<'x> {
    pub id: &'x ObjectRef,
    pub generation: Option<i64>,
    /// Index of the model in force in `res.inv.nsgs`.
    pub model: Option<usize>,
    pub errors: Option<&'x ValidationErrors>,
    pub programmed: Programmed,
    pub policies: Vec<String>,
    pub associated_pods: usize,
    pub fidelity: Option<&'x BTreeMap<String, Fidelity>>,
    pub anomalies: Vec<RuleAnomaly>,
    /// The size of the group's metadata and spec as stored: what its status must leave room
    /// for.
    pub stored_bytes: usize,
}

/// For every group in the inventory, the pods it applies to (subnet and interface level).
pub fn associated_pods(res: &Resolved) -> Vec<usize> {
    let mut counts = vec![0; res.inv.nsgs.len()];
    for (p, pod) in res.inv.pods.iter().enumerate() {
        let subnet = res.subnet_nsg(&pod.id.namespace);
        let nic = res.nic_nsg(p);
        if let Some(i) = subnet {
            counts[i] += 1;
        }
        if let Some(i) = nic.filter(|&i| Some(i) != subnet) {
            counts[i] += 1;
        }
    }
    counts
}

/// The first `max` names joined by `sep`, and how many more there are.
fn list_names(names: impl IntoIterator<Item = String>, sep: &str, max: usize) -> String {
    let mut names = names.into_iter();
    let mut s = names.by_ref().take(max).collect::<Vec<_>>().join(sep);
    let more = names.count();
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

/// The desired conditions of one NSG, in a fixed order.
pub fn nsg_conditions(res: &Resolved, f: &NsgFacts) -> Vec<Cond> {
    let nsg = f.model.map(|i| &res.inv.nsgs[i]);
    let mut out = Vec::new();
    let accepted = match (f.errors, nsg) {
        (None, _) => Cond::new(ACCEPTED, true, "Valid", "the spec is valid"),
        (Some(e), Some(old)) => Cond::new(
            ACCEPTED,
            false,
            "Invalid",
            format!(
                "{e}; generation {} stays in force",
                old.generation.map_or("?".into(), |g| g.to_string())
            ),
        ),
        (Some(e), None) => Cond::new(
            ACCEPTED,
            false,
            "Invalid",
            format!(
                "{e}; no valid generation is known, existing NetworkPolicies are left as they are"
            ),
        ),
    };
    out.push(accepted);

    let unresolved = nsg.map(|n| res.unresolved(n)).unwrap_or_default();
    out.push(if unresolved.is_empty() {
        Cond::new(
            RESOLVED_REFS,
            true,
            "Resolved",
            "every reference names an existing object",
        )
    } else {
        let list = unresolved
            .iter()
            .map(|u| format!("rule {:?} {}: {}", u.rule, u.field, u.reference));
        Cond::new(
            RESOLVED_REFS,
            false,
            "MissingReferences",
            format!(
                "{} (they match nothing; the other rules are enforced)",
                list_names(list, ", ", 20)
            ),
        )
    });

    let conflicts: Vec<_> = res.conflicts.iter().filter(|c| &c.nsg == f.id).collect();
    let subnet_lost = conflicts.iter().find(|c| c.level == Level::Subnet);
    let nic_lost = conflicts
        .iter()
        .filter(|c| c.level == Level::NetworkInterface);
    let mut messages = Vec::new();
    if let Some(c) = subnet_lost {
        messages.push(format!(
            "namespace {} is already associated with the older group {}; this group is not applied at the subnet level",
            f.id.namespace, c.winner.name
        ));
    }
    let mut lost_pods = 0;
    for c in nic_lost {
        lost_pods += c.pods.len();
        messages.push(format!(
            "{} pod(s) are already bound to the older group {} at the network-interface level: {}",
            c.pods.len(),
            c.winner.name,
            list_names(c.pods.iter().map(|p| p.name.clone()), ", ", 10)
        ));
    }
    out.push(if messages.is_empty() {
        Cond::new(
            CONFLICT,
            false,
            "NoConflict",
            "no other group is bound where this one is",
        )
    } else {
        let reason = if subnet_lost.is_some() {
            "SubnetConflict"
        } else {
            "InterfaceConflict"
        };
        Cond::new(CONFLICT, true, reason, messages.join("; "))
    });

    let inexact: Vec<String> = f
        .fidelity
        .into_iter()
        .flatten()
        .filter(|(_, fi)| !fi.exact)
        .map(|(rule, fi)| format!("rule {rule:?}: {}", fi.text))
        .collect();
    out.push(if inexact.is_empty() {
        Cond::new(
            DEGRADED,
            false,
            "Exact",
            "every rule is enforced exactly by NetworkPolicy",
        )
    } else {
        Cond::new(DEGRADED, true, "NotExact", list_names(inexact, ", ", 20))
    });

    let programmed = match &f.programmed {
        Programmed::Ok => Cond::new(
            PROGRAMMED,
            true,
            "Programmed",
            format!("{} NetworkPolicies applied", f.policies.len()),
        ),
        Programmed::NotOwned(m) => Cond::new(PROGRAMMED, false, "NotOwned", m.clone()),
        Programmed::Failed(m) => Cond::new(PROGRAMMED, false, "ApplyFailed", m.clone()),
        Programmed::NotAccepted => Cond::new(
            PROGRAMMED,
            false,
            "NotAccepted",
            "no valid spec is known; nothing was programmed",
        ),
    };

    // Out of force everywhere: it lost its only association.
    let selects_pods = associated_pods_lost(res, f, lost_pods);
    let out_of_force = nsg.is_some_and(|n| {
        (n.subnet && subnet_lost.is_some() && n.pod_selector.is_none())
            || (!n.subnet && selects_pods)
    });
    let ready = if f.errors.is_some() {
        Cond::new(
            READY,
            false,
            "Invalid",
            "the current generation is not valid",
        )
    } else if !programmed.status {
        Cond::new(READY, false, &programmed.reason, programmed.message.clone())
    } else if out_of_force {
        Cond::new(
            READY,
            false,
            "Conflict",
            "an older group is bound everywhere this one would apply",
        )
    } else {
        Cond::new(READY, true, "Ready", "the current generation is in force")
    };
    out.push(programmed);
    out.push(ready);
    out
}

/// Whether an interface-level group lost every pod it selects.
fn associated_pods_lost(_res: &Resolved, f: &NsgFacts, lost_pods: usize) -> bool {
    lost_pods > 0 && f.associated_pods == 0
}

/// The full desired status of an NSG (conditions without timestamps are merged by the caller).
pub fn nsg_status(
    res: &Resolved,
    sums: &Summaries,
    f: &NsgFacts,
    conditions: Vec<Condition>,
) -> NetworkSecurityGroupStatus {
    let nsg = f.model.map(|i| &res.inv.nsgs[i]);
    let budget = effective_rules_budget(f.stored_bytes);
    let (effective_rules, omitted) = nsg
        .map(|n| effective_rules(sums, n, f.fidelity, budget))
        .unwrap_or_default();
    NetworkSecurityGroupStatus {
        observed_generation: f.generation,
        conditions,
        associated_pods: nsg.map(|_| f.associated_pods as i32),
        effective_rules,
        omitted_effective_rules: (omitted > 0).then_some(omitted as i32),
        anomalies: f.anomalies.clone(),
        network_policies: f.policies.clone(),
        dataplane: None,
    }
}

/// The part of an observed NSG status this controller writes, normalised for comparison.
pub fn owned_nsg_status(
    observed: Option<&NetworkSecurityGroupStatus>,
) -> NetworkSecurityGroupStatus {
    let mut s = observed.cloned().unwrap_or_default();
    s.conditions = owned_conditions(&s.conditions, &NSG_CONDITIONS);
    s.dataplane = None;
    s
}

/// Which groups reference each ASG and each service tag (by lower-case name).
pub struct References {
    pub asgs: BTreeMap<AsgRef, BTreeSet<String>>,
    pub tags: BTreeMap<String, BTreeSet<String>>,
}

pub fn references(res: &Resolved) -> References {
    let mut asgs: BTreeMap<AsgRef, BTreeSet<String>> = BTreeMap::new();
    let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for nsg in &res.inv.nsgs {
        for rule in &nsg.rules {
            for e in [&rule.source, &rule.destination] {
                match e {
                    Endpoint::Asgs(list) => {
                        for a in list {
                            asgs.entry(a.clone())
                                .or_default()
                                .insert(nsg.id.to_string());
                        }
                    }
                    Endpoint::Prefixes(list) => {
                        for p in list {
                            if let AddressPrefix::Tag(t) = p
                                && WellKnownTag::parse(t).is_none()
                            {
                                tags.entry(t.to_ascii_lowercase())
                                    .or_default()
                                    .insert(nsg.id.to_string());
                            }
                        }
                    }
                }
            }
        }
    }
    References { asgs, tags }
}

fn accepted(errors: Option<&ValidationErrors>) -> Cond {
    match errors {
        None => Cond::new(ACCEPTED, true, "Valid", "the spec is valid"),
        Some(e) => Cond::new(ACCEPTED, false, "Invalid", e.to_string()),
    }
}

pub fn asg_conditions(errors: Option<&ValidationErrors>) -> Vec<Cond> {
    vec![accepted(errors)]
}

pub fn asg_status(
    res: &Resolved,
    refs: &References,
    id: &ObjectRef,
    generation: Option<i64>,
    conditions: Vec<Condition>,
) -> ApplicationSecurityGroupStatus {
    let key = AsgRef::from(id);
    let mut members: Vec<String> = res
        .members(&key)
        .map(|p| res.inv.pods[p].id.name.clone())
        .collect();
    members.sort();
    let member_count = members.len() as i32;
    members.truncate(MAX_LISTED_MEMBERS);
    ApplicationSecurityGroupStatus {
        observed_generation: generation,
        conditions,
        member_count,
        members,
        referenced_by: refs.asgs.get(&key).into_iter().flatten().cloned().collect(),
    }
}

pub fn owned_asg_status(
    observed: Option<&ApplicationSecurityGroupStatus>,
) -> ApplicationSecurityGroupStatus {
    let mut s = observed.cloned().unwrap_or_default();
    s.conditions = owned_conditions(&s.conditions, &OTHER_CONDITIONS);
    s
}

pub fn tag_status(
    res: &Resolved,
    refs: &References,
    name: &str,
    generation: Option<i64>,
    conditions: Vec<Condition>,
) -> ServiceTagStatus {
    let prefix_count = res
        .inv
        .service_tags
        .iter()
        .find(|t| t.name == name)
        .map_or(0, |t| t.prefixes.len() as i32);
    ServiceTagStatus {
        observed_generation: generation,
        conditions,
        prefix_count,
        referenced_by: refs
            .tags
            .get(&name.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .cloned()
            .collect(),
    }
}

pub fn owned_tag_status(observed: Option<&ServiceTagStatus>) -> ServiceTagStatus {
    let mut s = observed.cloned().unwrap_or_default();
    s.conditions = owned_conditions(&s.conditions, &OTHER_CONDITIONS);
    s
}

/// An Event to emit because a condition moved into a state someone should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub reason: String,
    pub message: String,
}

/// Alerts for the NSG conditions that changed into a bad state (or changed message while
/// bad), compared with the observed status. Restart-safe: the observed status is the memory.
pub fn nsg_alerts(observed: &[Condition], desired: &[Cond]) -> Vec<Alert> {
    let mut out = Vec::new();
    for d in desired {
        let bad = match d.type_ {
            ACCEPTED | RESOLVED_REFS | PROGRAMMED => !d.status,
            CONFLICT => d.status,
            _ => false,
        };
        if !bad || observed.iter().any(|o| d.same_as(o)) {
            continue;
        }
        let reason = match (d.type_, d.reason.as_str()) {
            (ACCEPTED, _) => "Invalid",
            (RESOLVED_REFS, _) => "InvalidReference",
            (CONFLICT, _) => "Conflict",
            (_, "NotOwned") => "NetworkPolicyNotOwned",
            (_, "NotAccepted") => continue,
            _ => "NetworkPolicyFailed",
        };
        out.push(Alert {
            reason: reason.into(),
            message: d.message.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(type_: &str, status: &str, reason: &str, message: &str, at: i64) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::from_second(at).unwrap()),
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let now = Timestamp::from_second(2_000_000_000).unwrap();
        let obs = vec![
            observed(READY, "True", "Ready", "x", 1_000),
            observed(CONFLICT, "False", "NoConflict", "", 1_000),
        ];
        let desired = vec![
            Cond::new(READY, true, "Ready", "a different message"),
            Cond::new(CONFLICT, true, "SubnetConflict", "lost"),
            Cond::new(ACCEPTED, true, "Valid", "ok"),
        ];
        let out = conditions(&obs, &desired, Some(2), now);
        assert_eq!(
            out[0].last_transition_time.0.as_second(),
            1_000,
            "same status keeps its time"
        );
        assert_eq!(out[1].last_transition_time.0, now, "a flip moves it");
        assert_eq!(
            out[2].last_transition_time.0, now,
            "a new condition starts now"
        );
        assert!(out.iter().all(|c| c.observed_generation == Some(2)));
    }

    #[test]
    fn alerts_fire_once_per_bad_transition() {
        let desired = vec![
            Cond::new(RESOLVED_REFS, false, "MissingReferences", "asg x"),
            Cond::new(CONFLICT, false, "NoConflict", ""),
            Cond::new(READY, false, "ApplyFailed", "boom"),
        ];
        let alerts = nsg_alerts(&[], &desired);
        assert_eq!(
            alerts.iter().map(|a| a.reason.as_str()).collect::<Vec<_>>(),
            vec!["InvalidReference"]
        );
        let obs = vec![observed(
            RESOLVED_REFS,
            "False",
            "MissingReferences",
            "asg x",
            5,
        )];
        assert!(nsg_alerts(&obs, &desired).is_empty(), "already reported");
    }

    fn group(name: &str, created: &str, rules: Vec<SecurityRule>) -> Nsg {
        Nsg {
            id: ObjectRef::new("ns", name),
            created: Some(created.into()),
            generation: Some(1),
            subnet: true,
            pod_selector: None,
            rules,
        }
    }

    fn rule_to_asg(asg: &str) -> SecurityRule {
        use crate::model::{Access, Protocol};
        SecurityRule {
            name: "to-asg".into(),
            description: None,
            priority: 100,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol: Protocol::Tcp,
            source: Endpoint::any(),
            source_ports: vec![PortRange::ALL],
            destination: Endpoint::Asgs(vec![AsgRef {
                namespace: "ns".into(),
                name: asg.into(),
            }]),
            destination_ports: vec![PortRange::new(80, 80)],
            is_default: false,
        }
    }

    fn facts<'x>(id: &'x ObjectRef, model: usize, associated: usize) -> NsgFacts<'x> {
        NsgFacts {
            id,
            generation: Some(1),
            model: Some(model),
            errors: None,
            programmed: Programmed::Ok,
            policies: vec![],
            associated_pods: associated,
            fidelity: None,
            anomalies: vec![],
            stored_bytes: 1000,
        }
    }

    fn by_type<'c>(conds: &'c [Cond], t: &str) -> &'c Cond {
        conds.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn the_younger_subnet_group_is_in_conflict_and_not_ready() {
        let inv = crate::model::Inventory {
            nsgs: vec![
                group("old", "2024-01-01T00:00:00Z", vec![]),
                group("young", "2024-06-01T00:00:00Z", vec![rule_to_asg("ghost")]),
            ],
            ..Default::default()
        };
        let res = Resolved::new(&inv);
        let old = ObjectRef::new("ns", "old");
        let young = ObjectRef::new("ns", "young");
        let c = nsg_conditions(&res, &facts(&old, 0, 0));
        assert!(!by_type(&c, CONFLICT).status);
        assert!(by_type(&c, READY).status);
        let c = nsg_conditions(&res, &facts(&young, 1, 0));
        assert!(by_type(&c, CONFLICT).status);
        assert_eq!(by_type(&c, CONFLICT).reason, "SubnetConflict");
        assert!(by_type(&c, CONFLICT).message.contains("old"));
        assert_eq!(by_type(&c, READY).reason, "Conflict");
        let refs = by_type(&c, RESOLVED_REFS);
        assert!(
            !refs.status && refs.message.contains("asg:ns/ghost"),
            "{refs:?}"
        );
        assert_eq!(
            nsg_alerts(&[], &c)
                .iter()
                .map(|a| a.reason.as_str())
                .collect::<Vec<_>>(),
            vec!["InvalidReference", "Conflict"]
        );
    }

    #[test]
    fn an_invalid_spec_with_a_valid_past_is_not_ready_but_stays_in_force() {
        let inv = crate::model::Inventory {
            nsgs: vec![group("g", "2024-01-01T00:00:00Z", vec![])],
            ..Default::default()
        };
        let res = Resolved::new(&inv);
        let id = ObjectRef::new("ns", "g");
        let errors = ValidationErrors(vec![crate::model::ValidationError {
            object: "NetworkSecurityGroup ns/g".into(),
            rule: Some("r".into()),
            field: "spec.securityRules[0].sourceAddressPrefixes[0]".into(),
            message: "host bits".into(),
        }]);
        let mut f = facts(&id, 0, 3);
        f.errors = Some(&errors);
        let c = nsg_conditions(&res, &f);
        let accepted = by_type(&c, ACCEPTED);
        assert!(!accepted.status);
        assert!(
            accepted.message.contains("generation 1 stays in force"),
            "{accepted:?}"
        );
        assert_eq!(by_type(&c, READY).reason, "Invalid");
        assert!(
            by_type(&c, PROGRAMMED).status,
            "the last valid generation is programmed"
        );
    }

    #[test]
    fn long_messages_are_bounded() {
        let c = Cond::new(READY, true, "Ready", "é".repeat(2000));
        assert!(c.message.len() <= MAX_MESSAGE);
        assert!(c.message.ends_with("..."));
    }

    #[test]
    fn long_lists_are_cut_with_a_count() {
        let names = (0..12).map(|i| i.to_string());
        assert_eq!(list_names(names, ",", 10), "0,1,2,3,4,5,6,7,8,9 and 2 more");
        assert_eq!(list_names(["a".to_string()], ",", 10), "a");
    }

    #[test]
    fn the_budget_leaves_room_for_the_spec_in_steps() {
        assert_eq!(effective_rules_budget(1000), MAX_EFFECTIVE_RULES_BYTES);
        assert_eq!(effective_rules_budget(OBJECT_LIMIT), 0);
        let b = effective_rules_budget(1_200_000);
        assert_eq!(b % BUDGET_STEP, 0);
        assert!(b > 0 && b <= OBJECT_LIMIT - 1_200_000 - STATUS_HEADROOM);
        assert_eq!(effective_rules_budget(1_200_010), b);
    }

    #[test]
    fn within_budget_the_directions_take_turns_and_the_defaults_stay() {
        // Names of one length, so every rule of a kind is the same size.
        let rule = |name: &str, default: bool| EffectiveRule {
            name: name.into(),
            default,
            ..Default::default()
        };
        let directions = || {
            [
                vec![
                    rule("i1", false),
                    rule("i2", false),
                    rule("i3", false),
                    rule("id", true),
                ],
                vec![rule("o1", false), rule("od", true)],
            ]
        };
        let own = json_len(&rule("i1", false)) + 1;
        let defaults = 2 * (json_len(&rule("id", true)) + 1);
        let names = |budget| {
            let (kept, omitted) = within_budget(directions(), budget);
            let names: Vec<String> = kept.into_iter().map(|r| r.name).collect();
            (names.join(" "), omitted)
        };
        assert_eq!(names(defaults + 4 * own), ("i1 i2 i3 id o1 od".into(), 0));
        // The defaults, then i1, o1, i2; i3 does not fit.
        assert_eq!(names(defaults + 3 * own), ("i1 i2 id o1 od".into(), 1));
        assert_eq!(names(defaults + own), ("i1 id od".into(), 3));
        assert_eq!(names(0), ("id od".into(), 4));
    }
}
