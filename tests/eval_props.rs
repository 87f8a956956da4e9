//! The evaluator's algebra: properties that follow from DESIGN.md section 1 alone.

mod common;

use kube_nsg::eval::{Packet, evaluate, evaluate_flow, first_match};
use kube_nsg::model::{Access, Direction, Inventory};
use kube_nsg::resolve::Resolved;
use proptest::prelude::*;

/// Every (pod, direction) a packet is evaluated at, with the packet.
fn ends(inv: &Inventory, packet: &Packet) -> Vec<(usize, Direction)> {
    let res = Resolved::new(inv);
    [
        (packet.src, Direction::Outbound),
        (packet.dst, Direction::Inbound),
    ]
    .into_iter()
    .filter_map(|(ip, d)| res.pod_by_ip(ip).map(|p| (p, d)))
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Both stages must allow; the verdict is the conjunction of each stage's first match.
    #[test]
    fn verdict_is_the_conjunction_of_stages(inv in common::inventory(), packet in common::packet()) {
        let res = Resolved::new(&inv);
        for (pod, direction) in ends(&inv, &packet) {
            let v = evaluate(&res, pod, direction, &packet);
            let firsts: Vec<Access> = res.stages(pod, direction).iter()
                .map(|&(_, i)| first_match(&res, &inv.nsgs[i], direction, &packet).access)
                .collect();
            let expected = if firsts.contains(&Access::Deny) { Access::Deny } else { Access::Allow };
            prop_assert_eq!(v.access, expected);
            prop_assert_eq!(v.stages.is_empty(), res.stages(pod, direction).is_empty());
        }
    }

    /// A rule behind an identical higher-priority rule never decides.
    #[test]
    fn shadowed_copy_never_decides(mut inv in common::inventory(), packet in common::packet()) {
        for nsg in &mut inv.nsgs {
            if let Some(first) = nsg.rules.first().cloned() {
                let mut copy = first.clone();
                copy.name = "copy".into();
                copy.priority = 4000;
                nsg.rules.push(copy);
            }
        }
        let res = Resolved::new(&inv);
        for (pod, direction) in ends(&inv, &packet) {
            let v = evaluate(&res, pod, direction, &packet);
            prop_assert!(v.stages.iter().all(|s| s.rule != "copy"));
        }
    }

    /// Adding a lower-priority rule never changes a flow a user rule decided.
    #[test]
    fn lower_priority_rule_never_changes_a_decided_flow(
        inv in common::inventory(), packet in common::packet(), extra in common::rule()
    ) {
        let res = Resolved::new(&inv);
        let before: Vec<_> = ends(&inv, &packet).into_iter()
            .map(|(p, d)| evaluate(&res, p, d, &packet)).collect();
        let mut changed = inv.clone();
        for nsg in &mut changed.nsgs {
            let mut r = extra.clone();
            r.name = "extra".into();
            r.priority = 4096;
            nsg.rules.push(r);
        }
        let res2 = Resolved::new(&changed);
        let after: Vec<_> = ends(&changed, &packet).into_iter()
            .map(|(p, d)| evaluate(&res2, p, d, &packet)).collect();
        for (b, a) in before.iter().zip(&after) {
            for (sb, sa) in b.stages.iter().zip(&a.stages) {
                if sb.priority < 4096 {
                    prop_assert_eq!(sb, sa);
                }
            }
        }
    }

    /// Default rules decide only when no user rule of that direction matches.
    #[test]
    fn defaults_decide_only_when_nothing_else_matches(inv in common::inventory(), packet in common::packet()) {
        let res = Resolved::new(&inv);
        for (pod, direction) in ends(&inv, &packet) {
            for (_, i) in res.stages(pod, direction) {
                let nsg = &inv.nsgs[i];
                let decided = first_match(&res, nsg, direction, &packet);
                let user_match = nsg.rules.iter().any(|r| r.direction == direction
                    && kube_nsg::eval::rule_matches(&res, r, &packet));
                prop_assert_eq!(decided.is_default, !user_match);
            }
        }
    }

    /// With no group anywhere, everything is allowed.
    #[test]
    fn no_group_allows_everything(mut inv in common::inventory(), packet in common::packet()) {
        inv.nsgs.clear();
        let res = Resolved::new(&inv);
        prop_assert_eq!(evaluate_flow(&res, &packet).access, Access::Allow);
    }
}
