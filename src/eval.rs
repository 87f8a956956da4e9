//! The reference evaluator: the executable form of the NSG semantics (DESIGN.md section 1).
//! Written for obviousness, not speed: it is the oracle every compiler is tested against.

use std::net::IpAddr;

use crate::model::{Access, Direction, Nsg, ObjectRef, Protocol, SecurityRule};
use crate::resolve::{Level, Resolved};

/// The first packet of a flow. Ports are ignored for ICMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Packet {
    pub protocol: Protocol,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

/// The rule that decided a stage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StageVerdict {
    pub level: Level,
    pub nsg: ObjectRef,
    pub access: Access,
    pub rule: String,
    pub priority: u32,
}

/// Azure's IP flow verify answer for one pod and one direction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub access: Access,
    /// The stages evaluated, in order; evaluation stops at the first deny.
    pub stages: Vec<StageVerdict>,
}

impl Verdict {
    /// The deciding stage: the denying one, or for an allow the last one; `None` when no
    /// group applies.
    pub fn deciding(&self) -> Option<&StageVerdict> {
        self.stages.last()
    }
}

/// Whether a rule matches a packet (its direction is the caller's business).
pub fn rule_matches(res: &Resolved, rule: &SecurityRule, packet: &Packet) -> bool {
    if !rule.protocol.covers(packet.protocol) {
        return false;
    }
    let ports_match = if packet.protocol == Protocol::Icmp {
        // ICMP has no ports: a rule that restricts them matches only TCP and UDP.
        !rule.restricts_ports()
    } else {
        rule.source_ports
            .iter()
            .any(|r| r.contains(packet.src_port))
            && rule
                .destination_ports
                .iter()
                .any(|r| r.contains(packet.dst_port))
    };
    ports_match
        && res.endpoint_contains(&rule.source, packet.src)
        && res.endpoint_contains(&rule.destination, packet.dst)
}

/// The first rule of a group, in priority order, that matches; the default deny rules match
/// everything, so there always is one.
pub fn first_match(
    res: &Resolved,
    nsg: &Nsg,
    direction: Direction,
    packet: &Packet,
) -> SecurityRule {
    nsg.rules_for(direction)
        .into_iter()
        .find(|r| rule_matches(res, r, packet))
        .expect("the default DenyAll rule matches every packet")
}

/// The verdict for a new flow seen from one pod: `Inbound` when the pod is the destination,
/// `Outbound` when it is the source. Both stages must allow; no group means allowed.
pub fn evaluate(res: &Resolved, pod: usize, direction: Direction, packet: &Packet) -> Verdict {
    let mut stages = Vec::new();
    for (level, i) in res.stages(pod, direction) {
        let nsg = &res.inv.nsgs[i];
        let rule = first_match(res, nsg, direction, packet);
        stages.push(StageVerdict {
            level,
            nsg: nsg.id.clone(),
            access: rule.access,
            rule: rule.name,
            priority: rule.priority,
        });
        if rule.access == Access::Deny {
            return Verdict {
                access: Access::Deny,
                stages,
            };
        }
    }
    Verdict {
        access: Access::Allow,
        stages,
    }
}

/// A flow between two addresses: the source pod's outbound groups, then the destination
/// pod's inbound groups, each where that end is a known pod.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlowVerdict {
    pub access: Access,
    pub outbound: Option<Verdict>,
    pub inbound: Option<Verdict>,
}

pub fn evaluate_flow(res: &Resolved, packet: &Packet) -> FlowVerdict {
    let outbound = res
        .pod_by_ip(packet.src)
        .map(|p| evaluate(res, p, Direction::Outbound, packet));
    let allowed_out = outbound.as_ref().is_none_or(|v| v.access == Access::Allow);
    let inbound = if allowed_out {
        res.pod_by_ip(packet.dst)
            .map(|p| evaluate(res, p, Direction::Inbound, packet))
    } else {
        None
    };
    let allowed = allowed_out && inbound.as_ref().is_none_or(|v| v.access == Access::Allow);
    FlowVerdict {
        access: if allowed { Access::Allow } else { Access::Deny },
        outbound,
        inbound,
    }
}
