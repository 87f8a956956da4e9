//! Random scenarios over a fixed set of lab pods: from a seed, NSGs at the subnet and the
//! interface level with rules mixing pod IPs, CIDRs, service tags, ASGs, protocols,
//! destination and source port ranges, allow and deny. Written as YAML for kubectl, so the
//! whole path (CRD admission, conversion, watches, compiler, kernel) is exercised.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kube_nsg::model::ObjectRef;

/// splitmix64: small, deterministic, good enough to pick from lists.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The pods' namespaces and IP blocks of a scenario.
pub struct Layout {
    pub a: String,
    pub b: String,
    /// Third octet of namespace a's IPv4 addresses (b uses the next one).
    pub octet: u8,
}

impl Layout {
    pub fn new(prefix: &str, octet: u8) -> Self {
        Layout {
            a: format!("{prefix}-a"),
            b: format!("{prefix}-b"),
            octet,
        }
    }

    fn ip(&self, ns_b: bool, host: u8) -> String {
        format!("10.244.{}.{host}", self.octet + u8::from(ns_b))
    }

    fn ip6(&self, ns_b: bool, host: u8) -> String {
        format!("fd00:10:244:{:x}::{host}", self.octet + u8::from(ns_b))
    }

    /// (namespace is b, name, labels, dual-stack, ASG annotation)
    fn pods(&self) -> Vec<(bool, &'static str, &'static str, bool, Option<&'static str>)> {
        vec![
            (false, "a1", "{app: a, tier: web}", true, None),
            (false, "a2", "{app: a, tier: db}", false, Some("g2")),
            (false, "b1", "{app: b, tier: web}", true, None),
            (false, "b2", "{app: b, tier: logic}", false, None),
            (true, "c1", "{app: c, tier: web}", true, None),
            (true, "c2", "{app: c, tier: db}", false, Some("cdb")),
        ]
    }

    /// Namespaces and pods (fixed across seeds): what the lab brings up.
    pub fn write_pods(&self, dir: &Path) -> PathBuf {
        let dir = dir.join("pods");
        std::fs::create_dir_all(&dir).unwrap();
        let mut y = String::new();
        for ns in [&self.a, &self.b] {
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n"
            );
        }
        for (host, (in_b, name, labels, v6, annotation)) in self.pods().into_iter().enumerate() {
            let host = 11 + host as u8;
            let ns = if in_b { &self.b } else { &self.a };
            let v4 = self.ip(in_b, host);
            let mut ips = format!("[{{ip: {v4}}}");
            if v6 {
                let _ = write!(ips, ", {{ip: '{}'}}", self.ip6(in_b, host));
            }
            ips.push(']');
            let annotations = annotation
                .map(|a| {
                    format!("\n  annotations: {{kubensg.io/application-security-groups: {a}}}")
                })
                .unwrap_or_default();
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {labels}{annotations}\n\
                 spec:\n  containers: [{{name: app, image: registry.k8s.io/pause:3.10}}]\n\
                 status:\n  podIP: {v4}\n  podIPs: {ips}\n---\n"
            );
        }
        std::fs::write(dir.join("pods.yaml"), y).unwrap();
        dir
    }

    /// The ASGs (fixed across seeds).
    pub fn asgs_yaml(&self) -> String {
        let asg = |ns: &str, name: &str, selector: &str| {
            format!(
                "apiVersion: kubensg.io/v1alpha1\nkind: ApplicationSecurityGroup\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {selector}\n---\n"
            )
        };
        [
            asg(&self.a, "web", "{podSelector: {matchLabels: {tier: web}}}"),
            asg(&self.a, "g2", "{}"),
            asg(&self.a, "app-b", "{podSelector: {matchLabels: {app: b}}}"),
            asg(&self.b, "cdb", "{}"),
            asg(&self.b, "cweb", "{podSelector: {matchLabels: {tier: web}}}"),
        ]
        .concat()
    }

    fn addresses(&self) -> Vec<String> {
        let a = self.octet;
        let b = self.octet + 1;
        vec![
            "'*'".into(),
            "Internet".into(),
            "VirtualNetwork".into(),
            "AzureLoadBalancer".into(),
            format!("10.244.{a}.11"),
            format!("10.244.{a}.12"),
            format!("10.244.{a}.0/28"),
            format!("10.244.{a}.16/28"),
            format!("10.244.{b}.0/24"),
            format!("10.244.{b}.12"),
            "10.244.0.0/16".into(),
            "198.18.0.10".into(),
            "198.18.0.0/24".into(),
            "10.255.0.1".into(),
            format!("'fd00:10:244:{a:x}::/64'"),
            "'2001:db8::/64'".into(),
            "'::/0'".into(),
        ]
    }

    fn endpoint(&self, rng: &mut Rng, side: &str, ns_b: bool) -> String {
        if rng.chance(25) {
            let asgs: &[&str] = if ns_b {
                &["cdb", "cweb"]
            } else {
                &["web", "g2", "app-b"]
            };
            let n = 1 + rng.below(2);
            let mut names: Vec<&str> = (0..n).map(|_| *rng.pick(asgs)).collect();
            names.sort();
            names.dedup();
            let list: Vec<String> = names.iter().map(|n| format!("{{name: {n}}}")).collect();
            return format!("{side}ApplicationSecurityGroups: [{}]", list.join(", "));
        }
        let addrs = self.addresses();
        if rng.chance(30) {
            let n = 2 + rng.below(2);
            let mut picked: Vec<String> = (0..n).map(|_| rng.pick(&addrs).clone()).collect();
            picked.sort();
            picked.dedup();
            format!("{side}AddressPrefixes: [{}]", picked.join(", "))
        } else {
            format!("{side}AddressPrefix: {}", rng.pick(&addrs))
        }
    }

    fn rule(&self, rng: &mut Rng, name: &str, priority: u32, ns_b: bool) -> String {
        let direction = if rng.chance(50) {
            "Inbound"
        } else {
            "Outbound"
        };
        let access = if rng.chance(55) { "Allow" } else { "Deny" };
        let protocol = *rng.pick(&["Tcp", "Tcp", "Tcp", "Udp", "Udp", "Icmp", "'*'", "'*'"]);
        let mut parts = vec![
            format!("name: {name}"),
            format!("priority: {priority}"),
            format!("direction: {direction}"),
            format!("access: {access}"),
            format!("protocol: {protocol}"),
            self.endpoint(rng, "source", ns_b),
            self.endpoint(rng, "destination", ns_b),
        ];
        if protocol != "Icmp" {
            let dst = [
                "'*'",
                "'80'",
                "'1433'",
                "'53'",
                "'80-1433'",
                "'22'",
                "'1434'",
                "'1-79'",
            ];
            if rng.chance(25) {
                let a = rng.pick(&dst);
                let b = rng.pick(&dst);
                parts.push(format!("destinationPortRanges: [{a}, {b}]"));
            } else {
                parts.push(format!("destinationPortRange: {}", rng.pick(&dst)));
            }
            // Probe source ports are 20000-32767: ranges that cut through them.
            let src = [
                "'*'",
                "'*'",
                "'*'",
                "'20000-26000'",
                "'26001-32767'",
                "'1024-19999'",
            ];
            parts.push(format!("sourcePortRange: {}", rng.pick(&src)));
        }
        format!("    - {{{}}}\n", parts.join(", "))
    }

    fn nsg(&self, rng: &mut Rng, ns_b: bool, name: &str, association: &str) -> String {
        let ns = if ns_b { &self.b } else { &self.a };
        let n = 2 + rng.below(6);
        let mut priorities: Vec<u32> = Vec::new();
        while priorities.len() < n {
            let p = 100 + rng.below(40) as u32 * 10;
            if !priorities.contains(&p) {
                priorities.push(p);
            }
        }
        let rules: String = priorities
            .iter()
            .enumerate()
            .map(|(i, &p)| self.rule(rng, &format!("r{i}"), p, ns_b))
            .collect();
        format!(
            "apiVersion: kubensg.io/v1alpha1\nkind: NetworkSecurityGroup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  {association}\n  securityRules:\n{rules}---\n"
        )
    }

    /// The NSGs of a seed: YAML and the groups it holds. At most one subnet and one
    /// interface-level group per namespace (so no association conflict, which is decided by
    /// creation time and so differs between the API and the offline files).
    pub fn nsgs(&self, seed: u64) -> (String, Vec<ObjectRef>) {
        let mut rng = Rng::new(seed);
        let mut yaml = String::new();
        let mut ids = vec![];
        let plan = [
            (false, "subnet", "subnet: true", 85),
            (
                false,
                "nic",
                if rng.chance(50) {
                    "podSelector: {matchLabels: {app: a}}"
                } else {
                    "podSelector: {matchLabels: {tier: web}}"
                },
                60,
            ),
            (true, "subnet", "subnet: true", 60),
            (true, "nic", "podSelector: {matchLabels: {tier: db}}", 40),
        ];
        for (ns_b, name, association, percent) in plan {
            if rng.chance(percent) {
                yaml += &self.nsg(&mut rng, ns_b, name, association);
                ids.push(ObjectRef::new(if ns_b { &self.b } else { &self.a }, name));
            }
        }
        (yaml, ids)
    }

    /// Every NSG name a seed may use.
    pub fn all_nsgs(&self) -> Vec<ObjectRef> {
        [&self.a, &self.b]
            .iter()
            .flat_map(|ns| [ObjectRef::new(*ns, "subnet"), ObjectRef::new(*ns, "nic")])
            .collect()
    }
}
