//! Azure's "effective security rules": per pod, direction and stage, the rules in force with
//! their ASGs and service tags expanded to what they contain now.

use crate::model::{Direction, Endpoint, ObjectRef, PortRange, SecurityRule};
use crate::resolve::{Level, Resolved};

/// What one side of a rule stands for now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Expansion {
    /// Member pods, `namespace/name`, for ASGs.
    pub pods: Vec<String>,
    /// CIDR blocks, for addresses and service tags (the fewest blocks that cover them).
    pub prefixes: Vec<String>,
    /// References that name nothing (they match no address).
    pub unresolved: Vec<String>,
}

impl Expansion {
    /// A short summary such as `2 pods` or `3 prefixes` or `any`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.pods.is_empty() {
            parts.push(plural(self.pods.len(), "pod"));
        }
        if self.prefixes == ["0.0.0.0/0", "::/0"] {
            parts.push("any address".into());
        } else if !self.prefixes.is_empty() {
            parts.push(plural(self.prefixes.len(), "prefix"));
        }
        if !self.unresolved.is_empty() {
            parts.push(format!("unresolved: {}", self.unresolved.join(", ")));
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join("; ")
        }
    }
}

fn plural(n: usize, word: &str) -> String {
    match (n, word) {
        (1, w) => format!("1 {w}"),
        (n, "prefix") => format!("{n} prefixes"),
        (n, w) => format!("{n} {w}s"),
    }
}

pub fn expand(res: &Resolved, endpoint: &Endpoint) -> Expansion {
    let mut expansion = Expansion {
        pods: vec![],
        prefixes: vec![],
        unresolved: vec![],
    };
    match endpoint {
        Endpoint::Asgs(asgs) => {
            for asg in asgs {
                if !res.asg_exists(asg) {
                    expansion.unresolved.push(format!("asg:{asg}"));
                }
                expansion
                    .pods
                    .extend(res.members(asg).map(|p| res.inv.pods[p].id.to_string()));
            }
            expansion.pods.sort();
            expansion.pods.dedup();
        }
        Endpoint::Prefixes(prefixes) => {
            let mut set = crate::model::IpSet::empty();
            for p in prefixes {
                match res.prefix_set(p) {
                    Some(s) => set = set.union(&s),
                    None => expansion.unresolved.push(format!("serviceTag:{p}")),
                }
            }
            expansion.prefixes = set.to_cidrs().iter().map(|n| n.to_string()).collect();
        }
    }
    expansion
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveRule {
    pub name: String,
    pub priority: u32,
    pub access: crate::model::Access,
    pub protocol: crate::model::Protocol,
    pub source: String,
    pub source_ports: String,
    pub destination: String,
    pub destination_ports: String,
    pub default: bool,
    pub source_expansion: Expansion,
    pub destination_expansion: Expansion,
    /// New flows this rule decided, summed over the nodes' agents; known in live mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hits: Option<u64>,
}

impl EffectiveRule {
    pub fn new(res: &Resolved, rule: &SecurityRule) -> Self {
        let ports = |p: &[PortRange]| {
            p.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        EffectiveRule {
            name: rule.name.clone(),
            priority: rule.priority,
            access: rule.access,
            protocol: rule.protocol,
            source: rule.source.to_string(),
            source_ports: ports(&rule.source_ports),
            destination: rule.destination.to_string(),
            destination_ports: ports(&rule.destination_ports),
            default: rule.is_default,
            source_expansion: expand(res, &rule.source),
            destination_expansion: expand(res, &rule.destination),
            hits: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveStage {
    pub direction: Direction,
    pub level: Level,
    pub nsg: ObjectRef,
    pub rules: Vec<EffectiveRule>,
}

/// The stages a pod's traffic passes, inbound then outbound, each in evaluation order.
pub fn effective_rules(res: &Resolved, pod: usize) -> Vec<EffectiveStage> {
    [Direction::Inbound, Direction::Outbound]
        .into_iter()
        .flat_map(|direction| {
            res.stages(pod, direction)
                .into_iter()
                .map(move |(level, i)| {
                    let nsg = &res.inv.nsgs[i];
                    EffectiveStage {
                        direction,
                        level,
                        nsg: nsg.id.clone(),
                        rules: nsg
                            .rules_for(direction)
                            .iter()
                            .map(|r| EffectiveRule::new(res, r))
                            .collect(),
                    }
                })
        })
        .collect()
}
