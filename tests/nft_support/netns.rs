//! Pods without a kubelet: a network namespace each, a veth pair into the host, routed like
//! the ptp CNI (a /32 and /128 host route per pod, the host end as gateway), so pod-to-pod
//! traffic crosses the host's forward hook. Test ranges are blackholed first so a mistake
//! cannot send their packets off the machine. Everything is removed on drop, even when a test
//! fails.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output, Stdio};

/// The ranges every netns test draws addresses from (blackholed on the host).
pub const RANGE4: &str = "10.250.0.0/16";
pub const RANGE6: &str = "fd00:250::/48";
/// The host end of every veth (as with ptp, the same gateway address on each).
pub const GATEWAY4: &str = "10.250.255.1";
pub const GATEWAY6: &str = "fe80::1";

pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (iproute2 and root are needed)"));
    if !out.status.success() {
        panic!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

pub struct NetnsPod {
    pub ns: String,
    pub host_if: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl NetnsPod {
    /// A command run inside the pod's namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

/// A set of netns pods owned by one test.
pub struct Lab {
    tag: String,
    pub pods: Vec<NetnsPod>,
}

impl Lab {
    /// `tag` (a few letters) keeps names apart from other tests running at the same time.
    pub fn new(tag: &str) -> Lab {
        assert!(tag.len() <= 4, "interface names have 15 bytes");
        let tag = format!("{tag}{}", std::process::id() % 100000);
        sh(&["ip", "route", "replace", "blackhole", RANGE4]);
        sh(&["ip", "-6", "route", "replace", "blackhole", RANGE6]);
        sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        Lab {
            tag,
            pods: Vec::new(),
        }
    }

    /// Adds a pod with these addresses (inside the test ranges); returns its index.
    pub fn add(&mut self, ip4: &str, ip6: &str) -> usize {
        let i = self.pods.len();
        let ns = format!("kn-{}-{i}", self.tag);
        let host_if = format!("kn{}h{i}", self.tag);
        let (ip4, ip6): (Ipv4Addr, Ipv6Addr) = (ip4.parse().unwrap(), ip6.parse().unwrap());
        // Registered before it exists, so a failure half-way is still cleaned up.
        self.pods.push(NetnsPod {
            ns: ns.clone(),
            host_if: host_if.clone(),
            ip4,
            ip6,
        });
        let (a4, a6) = (format!("{ip4}/32"), format!("{ip6}/128"));
        let n = |args: &[&str]| {
            let mut v = vec!["ip", "-n", &ns];
            v.extend_from_slice(args);
            sh(&v);
        };
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{GATEWAY4}/32"),
            "dev",
            &host_if,
        ]);
        sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{GATEWAY6}/64"),
            "dev",
            &host_if,
            "nodad",
        ]);
        // IPv6 forwarding for packets from this interface only: the host's global setting
        // (and its router advertisements) stay as they are.
        sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{host_if}.force_forwarding=1"),
        ]);
        n(&["link", "set", "lo", "up"]);
        n(&["link", "set", "eth0", "up"]);
        n(&["addr", "add", &a4, "dev", "eth0"]);
        n(&["route", "add", GATEWAY4, "dev", "eth0", "scope", "link"]);
        n(&["route", "add", "default", "via", GATEWAY4, "dev", "eth0"]);
        n(&["-6", "addr", "add", &a6, "dev", "eth0", "nodad"]);
        n(&[
            "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
        ]);
        sh(&["ip", "route", "add", &a4, "dev", &host_if]);
        sh(&["ip", "-6", "route", "add", &a6, "dev", &host_if]);
        i
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &self.pods {
            // Deleting the namespace deletes the veth pair and with it the host routes.
            let _ = Command::new("ip")
                .args(["netns", "pids", &p.ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").arg(pid).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", &p.ns]).status();
            let _ = Command::new("ip")
                .args(["link", "del", &p.host_if])
                .stderr(Stdio::null())
                .status();
        }
    }
}
