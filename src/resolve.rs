//! The resolved view of an inventory: which group is bound where, who is a member of which
//! ASG, and what each address prefix stands for. Shared by the evaluator and the compilers so
//! they cannot disagree about anything but the rule semantics they implement.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::model::{
    ASG_ANNOTATION, AddressPrefix, AsgRef, Direction, Endpoint, Inventory, IpSet, Nsg, ObjectRef,
    SecurityRule, WellKnownTag,
};

/// Where a group is associated: with a namespace (subnet) or with pods (network interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Level {
    Subnet,
    NetworkInterface,
}

/// A group that lost an association to an older one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    pub nsg: ObjectRef,
    pub level: Level,
    pub winner: ObjectRef,
    /// The pods it would have been bound to, for a NIC-level conflict.
    pub pods: Vec<ObjectRef>,
}

/// A reference in a rule that names nothing that exists; it matches no address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unresolved {
    pub rule: String,
    pub field: &'static str,
    /// `asg:NS/NAME` or `serviceTag:NAME`.
    pub reference: String,
}

impl Unresolved {
    /// The references of `rule` among `all`, as `field: reference`. A default rule has none,
    /// whatever its name.
    pub fn of_rule(all: &[Unresolved], rule: &SecurityRule) -> Vec<String> {
        if rule.is_default {
            return Vec::new();
        }
        all.iter()
            .filter(|u| u.rule == rule.name)
            .map(|u| format!("{}: {}", u.field, u.reference))
            .collect()
    }
}

pub struct Resolved<'a> {
    pub inv: &'a Inventory,
    /// Namespace → index of its subnet-level group.
    subnet: BTreeMap<&'a str, usize>,
    /// Pod index → index of its NIC-level group.
    nic: Vec<Option<usize>>,
    pub conflicts: Vec<Conflict>,
    /// Existing ASGs → their member pods.
    members: BTreeMap<AsgRef, BTreeSet<usize>>,
    pod_by_ip: HashMap<IpAddr, usize>,
    pub virtual_network: IpSet,
    pub node_ips: IpSet,
    /// Custom service tags by lower-case name.
    tags: BTreeMap<String, IpSet>,
}

/// Oldest first; the name breaks ties (and orders objects without a creation time).
fn age_key(nsg: &Nsg) -> (bool, Option<&str>, &ObjectRef) {
    (nsg.created.is_none(), nsg.created.as_deref(), &nsg.id)
}

impl<'a> Resolved<'a> {
    pub fn new(inv: &'a Inventory) -> Self {
        let mut by_age: Vec<usize> = (0..inv.nsgs.len()).collect();
        by_age.sort_by(|&a, &b| age_key(&inv.nsgs[a]).cmp(&age_key(&inv.nsgs[b])));

        let mut subnet: BTreeMap<&str, usize> = BTreeMap::new();
        let mut conflicts = Vec::new();
        for &i in &by_age {
            let nsg = &inv.nsgs[i];
            if !nsg.subnet {
                continue;
            }
            match subnet.get(nsg.id.namespace.as_str()) {
                Some(&w) => conflicts.push(Conflict {
                    nsg: nsg.id.clone(),
                    level: Level::Subnet,
                    winner: inv.nsgs[w].id.clone(),
                    pods: vec![],
                }),
                None => {
                    subnet.insert(&nsg.id.namespace, i);
                }
            }
        }

        let mut nic = vec![None; inv.pods.len()];
        let mut lost: BTreeMap<(usize, usize), Vec<ObjectRef>> = BTreeMap::new();
        for (p, pod) in inv.pods.iter().enumerate() {
            for &i in &by_age {
                let nsg = &inv.nsgs[i];
                let selects = nsg.id.namespace == pod.id.namespace
                    && nsg
                        .pod_selector
                        .as_ref()
                        .is_some_and(|s| s.matches(&pod.labels));
                if !selects {
                    continue;
                }
                match nic[p] {
                    None => nic[p] = Some(i),
                    Some(w) => lost.entry((i, w)).or_default().push(pod.id.clone()),
                }
            }
        }
        conflicts.extend(lost.into_iter().map(|((i, w), pods)| Conflict {
            nsg: inv.nsgs[i].id.clone(),
            level: Level::NetworkInterface,
            winner: inv.nsgs[w].id.clone(),
            pods,
        }));

        let mut members: BTreeMap<AsgRef, BTreeSet<usize>> = inv
            .asgs
            .iter()
            .map(|a| (AsgRef::from(&a.id), BTreeSet::new()))
            .collect();
        for asg in &inv.asgs {
            let set = members
                .get_mut(&AsgRef::from(&asg.id))
                .expect("inserted above");
            for (p, pod) in inv.pods.iter().enumerate() {
                if pod.id.namespace != asg.id.namespace {
                    continue;
                }
                let by_selector = asg
                    .pod_selector
                    .as_ref()
                    .is_some_and(|s| s.matches(&pod.labels));
                let by_annotation = pod
                    .annotations
                    .get(ASG_ANNOTATION)
                    .is_some_and(|v| v.split(',').any(|n| n.trim() == asg.id.name));
                if by_selector || by_annotation {
                    set.insert(p);
                }
            }
        }

        let mut pod_by_ip = HashMap::new();
        for (p, pod) in inv.pods.iter().enumerate() {
            for ip in &pod.ips {
                pod_by_ip.entry(*ip).or_insert(p);
            }
        }
        let node_ips = IpSet::from_ips(inv.node_ips.iter().copied());
        let virtual_network = IpSet::from_nets(inv.virtual_network.iter().copied())
            .union(&IpSet::from_ips(pod_by_ip.keys().copied()))
            .union(&node_ips);
        let tags = inv
            .service_tags
            .iter()
            .map(|t| {
                (
                    t.name.to_ascii_lowercase(),
                    IpSet::from_nets(t.prefixes.iter().copied()),
                )
            })
            .collect();
        Resolved {
            inv,
            subnet,
            nic,
            conflicts,
            members,
            pod_by_ip,
            virtual_network,
            node_ips,
            tags,
        }
    }

    pub fn pod_index(&self, id: &ObjectRef) -> Option<usize> {
        self.inv.pods.iter().position(|p| &p.id == id)
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<usize> {
        self.pod_by_ip.get(&ip).copied()
    }

    pub fn subnet_nsg(&self, namespace: &str) -> Option<usize> {
        self.subnet.get(namespace).copied()
    }

    pub fn nic_nsg(&self, pod: usize) -> Option<usize> {
        self.nic[pod]
    }

    /// The groups a pod's traffic passes in `direction`, in evaluation order: inbound the
    /// subnet's then the interface's, outbound the interface's then the subnet's.
    pub fn stages(&self, pod: usize, direction: Direction) -> Vec<(Level, usize)> {
        let subnet = self
            .subnet_nsg(&self.inv.pods[pod].id.namespace)
            .map(|i| (Level::Subnet, i));
        let nic = self.nic[pod].map(|i| (Level::NetworkInterface, i));
        let order = match direction {
            Direction::Inbound => [subnet, nic],
            Direction::Outbound => [nic, subnet],
        };
        order.into_iter().flatten().collect()
    }

    pub fn asg_exists(&self, asg: &AsgRef) -> bool {
        self.members.contains_key(asg)
    }

    /// Members of an ASG; a missing ASG has none.
    pub fn members(&self, asg: &AsgRef) -> impl Iterator<Item = usize> + '_ {
        self.members.get(asg).into_iter().flatten().copied()
    }

    pub fn is_member(&self, pod: usize, asg: &AsgRef) -> bool {
        self.members.get(asg).is_some_and(|m| m.contains(&pod))
    }

    /// The existing ASGs a pod is a member of (all in its own namespace).
    pub fn memberships(&self, pod: usize) -> Vec<&AsgRef> {
        self.members
            .iter()
            .filter(|(_, m)| m.contains(&pod))
            .map(|(a, _)| a)
            .collect()
    }

    /// The addresses a prefix stands for; `None` for a service tag that does not exist.
    pub fn prefix_set(&self, prefix: &AddressPrefix) -> Option<IpSet> {
        match prefix {
            AddressPrefix::Any => Some(IpSet::all()),
            AddressPrefix::Net(net) => Some(IpSet::from_net(*net)),
            AddressPrefix::Tag(name) => match WellKnownTag::parse(name) {
                Some(WellKnownTag::VirtualNetwork) => Some(self.virtual_network.clone()),
                Some(WellKnownTag::Internet) => Some(self.virtual_network.complement()),
                Some(WellKnownTag::AzureLoadBalancer) => Some(self.node_ips.clone()),
                None => self.tags.get(&name.to_ascii_lowercase()).cloned(),
            },
        }
    }

    /// Whether an address is on this side of a rule.
    pub fn endpoint_contains(&self, endpoint: &Endpoint, ip: IpAddr) -> bool {
        match endpoint {
            Endpoint::Prefixes(prefixes) => prefixes
                .iter()
                .any(|p| self.prefix_set(p).is_some_and(|s| s.contains(ip))),
            Endpoint::Asgs(asgs) => self
                .pod_by_ip(ip)
                .is_some_and(|pod| asgs.iter().any(|a| self.is_member(pod, a))),
        }
    }

    /// References in a group's rules that name no existing ASG or service tag.
    pub fn unresolved(&self, nsg: &Nsg) -> Vec<Unresolved> {
        let mut out = Vec::new();
        for rule in &nsg.rules {
            for (field, endpoint) in [("source", &rule.source), ("destination", &rule.destination)]
            {
                match endpoint {
                    Endpoint::Asgs(asgs) => {
                        out.extend(asgs.iter().filter(|a| !self.asg_exists(a)).map(|a| {
                            Unresolved {
                                rule: rule.name.clone(),
                                field,
                                reference: format!("asg:{a}"),
                            }
                        }))
                    }
                    Endpoint::Prefixes(prefixes) => out.extend(
                        prefixes
                            .iter()
                            .filter(|p| self.prefix_set(p).is_none())
                            .map(|p| Unresolved {
                                rule: rule.name.clone(),
                                field,
                                reference: format!("serviceTag:{p}"),
                            }),
                    ),
                }
            }
        }
        out
    }
}
