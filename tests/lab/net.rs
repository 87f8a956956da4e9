//! The host side: blackhole routes, the node IP, forwarding, and one network namespace per
//! endpoint (pod or the Internet stand-in) wired to the host with a routed veth pair, the way
//! the `ptp` CNI plugin and Calico do it. Everything goes through `ip` (iproute2).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::LabError;
use super::state::State;

/// Ranges blackholed on the host before anything else, so that no packet of the lab can leave
/// the machine whatever else goes wrong: pods, services, the node IP's range, the Internet
/// stand-in (198.18.0.0/24, the benchmarking range of RFC 2544), and their IPv6 counterparts.
///
/// Not the documentation ranges (TEST-NET-1..3) for the Internet stand-in: on the project's
/// test machines the host's own link is 192.0.2.0/24 and the package registries resolve to
/// 203.0.113.80, so a blackhole there cuts apt, cargo and Go off for everyone on the machine.
pub const BLACKHOLES: [&str; 7] = [
    "10.244.0.0/16",
    "10.96.0.0/16",
    "10.255.0.0/24",
    "198.18.0.0/24",
    "fd00:10:244::/56",
    "fd00:10:96::/108",
    "2001:db8::/64",
];
/// Pod addresses must be in these (a subset of the blackholed ranges).
pub const POD_RANGES: [&str; 2] = ["10.244.0.0/16", "fd00:10:244::/56"];
/// The cluster ranges of the lab, for the `VirtualNetwork` tag: pods and services.
pub const VIRTUAL_NETWORK: [&str; 4] = [
    "10.244.0.0/16",
    "10.96.0.0/16",
    "fd00:10:244::/56",
    "fd00:10:96::/108",
];
/// The node's address (kubelet, `AzureLoadBalancer`), on a dummy interface.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
/// The interface holding the node IP: a dummy, or a veth pair where there is no dummy driver.
pub const DUMMY: &str = "nsglab0";
/// The Internet stand-in's addresses.
pub const INTERNET_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const INTERNET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const INTERNET: &str = "internet";
/// The next hop every endpoint routes through: not an address of the host, just a name for
/// the host's end of the veth (a permanent neighbour entry, plus proxy ARP like Calico).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// `proto` of every route the lab adds, so `down` finds them all.
pub const ROUTE_PROTO: &str = "252";
/// Host-side veths are `nsgv<8 hex>`; `down` removes every link with this prefix.
pub const VETH_PREFIX: &str = "nsgv";

const FORWARD_V4: &str = "/proc/sys/net/ipv4/ip_forward";
const FORWARD_V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// A pod (or the Internet stand-in) as a network namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// `namespace/name` of the pod, or `internet`.
    pub name: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    /// The host end of the veth pair; the namespace end is `eth0`.
    pub host_veth: String,
    pub host_mac: String,
    pub pod_mac: String,
}

impl Endpoint {
    pub fn new(name: &str, netns: String, ips: Vec<IpAddr>) -> Endpoint {
        let h = Sha256::digest(name.as_bytes());
        let hex: String = h[..4].iter().map(|b| format!("{b:02x}")).collect();
        let mac = |tag: u8| {
            format!(
                "02:{tag:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                h[0], h[1], h[2], h[3]
            )
        };
        Endpoint {
            name: name.to_string(),
            netns,
            ips,
            host_veth: format!("{VETH_PREFIX}{hex}"),
            host_mac: mac(0xee),
            pod_mac: mac(0x11),
        }
    }

    /// `nsg-<namespace>-<name>`, shortened with a hash when long.
    pub fn for_pod(namespace: &str, name: &str, ips: Vec<IpAddr>) -> Endpoint {
        let full = format!("{namespace}/{name}");
        let mut netns = format!("nsg-{namespace}-{name}");
        if netns.len() > 48 {
            let h = Sha256::digest(full.as_bytes());
            let hex: String = h[..4].iter().map(|b| format!("{b:02x}")).collect();
            netns = format!("{}-{hex}", &netns[..39]);
        }
        Endpoint::new(&full, netns, ips)
    }

    pub fn internet(v6: bool) -> Endpoint {
        let mut ips = vec![IpAddr::V4(INTERNET_V4)];
        if v6 {
            ips.push(IpAddr::V6(INTERNET_V6));
        }
        Endpoint::new(INTERNET, "nsg-internet".into(), ips)
    }

    pub fn is_internet(&self) -> bool {
        self.name == INTERNET
    }

    pub fn ip(&self, v6: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }

    /// The temporary name of the namespace end before it moves in and becomes `eth0`.
    fn peer_tmp(&self) -> String {
        self.host_veth.replacen(VETH_PREFIX, "nsgp", 1)
    }
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let _ = write!(s, " {}", a.to_string_lossy());
    }
    s
}

/// Runs a command, returning its stdout, or its stderr as the error.
pub fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String, LabError> {
    let line = command_line(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| LabError::Command {
        command: line.clone(),
        message: e.to_string(),
    })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        pipe.write_all(input.as_bytes())
            .map_err(|e| LabError::Command {
                command: line.clone(),
                message: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| LabError::Command {
        command: line.clone(),
        message: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Some(input) = stdin {
            let _ = write!(message, "\ninput:\n{input}");
        }
        Err(LabError::Command {
            command: line,
            message,
        })
    }
}

pub fn ip(args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").args(args), None)
}

/// Runs `ip -batch -`, in `netns` if given; stops at the first failing line.
fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), LabError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    run(&mut cmd, Some(&(lines.join("\n") + "\n"))).map(|_| ())
}

fn netns_list() -> Result<Vec<String>, LabError> {
    // `ip -j netns list` prints nothing at all when there is none.
    let out = ip(&["-j", "netns", "list"])?;
    if out.trim().is_empty() {
        return Ok(vec![]);
    }
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| LabError::Other(format!("ip -j netns list: {e}")))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str().map(String::from))
        .collect())
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

pub fn ipv6_available() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// Turns forwarding on. Never turned off again by `down`: other labs or tests on this machine
/// may rely on it by then, and with nothing routed through the host it is harmless.
fn enable_forwarding(file: &str) -> Result<(), LabError> {
    std::fs::write(file, "1").map_err(|source| LabError::Io {
        what: file.to_string(),
        source,
    })
}

/// Refuses addresses outside the lab's ranges, and addresses some other interface already
/// routes: the lab must never send to, or take over, an address it does not own.
pub fn check_addresses(endpoints: &[Endpoint]) -> Result<(), LabError> {
    let pod_ranges: Vec<IpNet> = POD_RANGES.iter().map(|r| r.parse().unwrap()).collect();
    let mut seen = std::collections::BTreeMap::new();
    for ep in endpoints {
        for ip in &ep.ips {
            if !ep.is_internet() && !pod_ranges.iter().any(|r| r.contains(ip)) {
                return Err(LabError::Other(format!(
                    "pod {} has address {ip}, outside the lab's pod ranges {POD_RANGES:?}",
                    ep.name
                )));
            }
            if let Some(other) = seen.insert(*ip, ep.name.clone()) {
                return Err(LabError::Other(format!(
                    "{ip} is the address of both {other} and {}",
                    ep.name
                )));
            }
        }
    }
    let mut netns = std::collections::BTreeMap::new();
    for ep in endpoints {
        if let Some(other) = netns.insert(ep.netns.clone(), ep.name.clone()) {
            return Err(LabError::Other(format!(
                "{other} and {} would share the network namespace {}",
                ep.name, ep.netns
            )));
        }
    }
    for family in ["-4", "-6"] {
        if family == "-6" && !ipv6_available() {
            continue;
        }
        let out = ip(&[family, "-j", "route", "show", "table", "main"])?;
        let routes: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        for r in routes.as_array().into_iter().flatten() {
            let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
                continue;
            };
            let Ok(dst) = dst.split('/').next().unwrap_or(dst).parse::<IpAddr>() else {
                continue;
            };
            if let Some(owner) = seen.get(&dst)
                && !dev.starts_with(VETH_PREFIX)
            {
                return Err(LabError::Other(format!(
                    "{dst} ({owner}) is already routed to {dev}, which is not the lab's"
                )));
            }
        }
    }
    Ok(())
}

/// Refuses to blackhole a range that holds one of the host's own addresses (other than the
/// lab's) or the gateway of one of its routes: that would cut the machine off.
fn check_blackholes() -> Result<(), LabError> {
    let ranges: Vec<IpNet> = BLACKHOLES.iter().map(|r| r.parse().unwrap()).collect();
    let mut used: Vec<(IpAddr, String)> = Vec::new();
    let addrs: serde_json::Value =
        serde_json::from_str(&ip(&["-j", "addr", "show"])?).unwrap_or_default();
    for link in addrs.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default();
        if name == DUMMY || name.starts_with(VETH_PREFIX) {
            continue;
        }
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(addr) = a["local"].as_str().and_then(|a| a.parse().ok()) {
                used.push((addr, format!("an address of {name}")));
            }
        }
    }
    for family in ["-4", "-6"] {
        if family == "-6" && !ipv6_available() {
            continue;
        }
        let routes: serde_json::Value =
            serde_json::from_str(&ip(&[family, "-j", "route", "show", "table", "all"])?)
                .unwrap_or_default();
        for r in routes.as_array().into_iter().flatten() {
            if let Some(gw) = r["gateway"].as_str().and_then(|g| g.parse().ok()) {
                used.push((gw, "a gateway".into()));
            }
        }
    }
    for (addr, what) in used {
        if let Some(range) = ranges.iter().find(|r| r.contains(&addr)) {
            return Err(LabError::Other(format!(
                "refusing to blackhole {range}: {addr} is {what} of this machine"
            )));
        }
    }
    Ok(())
}

/// Blackholes, the node IP, forwarding; idempotent. Must run before any endpoint exists.
pub fn host_up(state: &mut State, v6: bool) -> Result<(), LabError> {
    check_blackholes()?;
    for range in BLACKHOLES {
        let is_v6 = range.contains(':');
        if is_v6 && !ipv6_available() {
            continue;
        }
        let family = if is_v6 { "-6" } else { "-4" };
        let existing = ip(&[family, "route", "show", "exact", range, "type", "blackhole"])?;
        if existing.trim().is_empty() {
            state.blackholes.insert(range.to_string());
            state.save()?;
            ip(&[
                family,
                "route",
                "add",
                "blackhole",
                range,
                "proto",
                ROUTE_PROTO,
            ])?;
        }
    }
    if !link_exists(DUMMY) {
        state.dummy = true;
        state.save()?;
        // Some kernels (this project's test VMs) have no dummy driver: a veth pair whose
        // other end stays unused holds an address just as well.
        if ip(&["link", "add", DUMMY, "type", "dummy"]).is_err() {
            ip(&[
                "link",
                "add",
                DUMMY,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{DUMMY}p"),
            ])?;
            ip(&["link", "set", &format!("{DUMMY}p"), "up"])?;
        }
    }
    ip(&["addr", "replace", &format!("{NODE_IP}/32"), "dev", DUMMY])?;
    ip(&["link", "set", DUMMY, "up"])?;
    enable_forwarding(FORWARD_V4)?;
    if v6 {
        enable_forwarding(FORWARD_V6)?;
    }
    Ok(())
}

/// Whether an endpoint's namespace exists with exactly the expected addresses on `eth0`, and
/// its host veth exists.
fn endpoint_is_up(ep: &Endpoint, existing: &[String]) -> bool {
    if !existing.contains(&ep.netns) || !link_exists(&ep.host_veth) {
        return false;
    }
    let Ok(out) = ip(&["-n", &ep.netns, "-j", "addr", "show", "dev", "eth0"]) else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut have: Vec<IpAddr> = v[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["scope"] == "global")
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect();
    let mut want = ep.ips.clone();
    have.sort();
    want.sort();
    have == want
}

/// Creates (or re-creates, if it is not as expected) an endpoint's namespace and veth, and
/// (re)writes its host route and neighbour entries. Idempotent.
pub fn endpoint_up(state: &mut State, ep: &Endpoint, existing: &[String]) -> Result<(), LabError> {
    if !endpoint_is_up(ep, existing) {
        endpoint_down(&ep.netns, &ep.host_veth)?;
        state
            .endpoints
            .insert(ep.netns.clone(), ep.host_veth.clone());
        state.save()?;
        ip(&["netns", "add", &ep.netns])?;
        ip(&[
            "link",
            "add",
            &ep.host_veth,
            "address",
            &ep.host_mac,
            "type",
            "veth",
            "peer",
            "name",
            &ep.peer_tmp(),
            "address",
            &ep.pod_mac,
            "netns",
            &ep.netns,
        ])?;
        let mut inside = vec![
            format!("link set {} name eth0", ep.peer_tmp()),
            "link set lo up".into(),
            "link set eth0 up".into(),
        ];
        for ip in &ep.ips {
            match ip {
                IpAddr::V4(_) => inside.extend([
                    format!("addr add {ip}/32 dev eth0"),
                    format!("route add {GATEWAY_V4} dev eth0 scope link"),
                    format!(
                        "neigh replace {GATEWAY_V4} lladdr {} dev eth0 nud permanent",
                        ep.host_mac
                    ),
                    format!("route add default via {GATEWAY_V4} dev eth0"),
                ]),
                IpAddr::V6(_) => inside.extend([
                    format!("addr add {ip}/128 dev eth0 nodad"),
                    format!(
                        "neigh replace {GATEWAY_V6} lladdr {} dev eth0 nud permanent",
                        ep.host_mac
                    ),
                    format!("route add ::/0 via {GATEWAY_V6} dev eth0"),
                ]),
            }
        }
        ip_batch(Some(&ep.netns), &inside)?;
    }
    // Proxy ARP as Calico does; the permanent neighbour entries make ARP unnecessary anyway.
    let proxy_arp = format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", ep.host_veth);
    std::fs::write(&proxy_arp, "1").map_err(|source| LabError::Io {
        what: proxy_arp,
        source,
    })?;
    let mut host = vec![format!("link set {} up", ep.host_veth)];
    for ip in &ep.ips {
        let (prefix, src) = match ip {
            IpAddr::V4(_) => (32, format!(" src {NODE_IP}")),
            IpAddr::V6(_) => (128, String::new()),
        };
        host.extend([
            format!(
                "route replace {ip}/{prefix} dev {} proto {ROUTE_PROTO}{src}",
                ep.host_veth
            ),
            format!(
                "neigh replace {ip} lladdr {} dev {} nud permanent",
                ep.pod_mac, ep.host_veth
            ),
        ]);
    }
    ip_batch(None, &host)
}

/// Removes an endpoint's namespace and veth (deleting one end of a veth deletes both, and the
/// routes through it). Idempotent.
pub fn endpoint_down(netns: &str, host_veth: &str) -> Result<(), LabError> {
    if link_exists(host_veth) {
        ip(&["link", "del", host_veth])?;
    }
    if netns_list()?.iter().any(|n| n == netns) {
        ip(&["netns", "del", netns])?;
    }
    Ok(())
}

pub fn existing_netns() -> Result<Vec<String>, LabError> {
    netns_list()
}

/// Undoes everything `host_up` and `endpoint_up` did, as recorded in the state, plus any
/// straggler with the lab's names: endpoints first, then the node IP, the blackholes last
/// (forwarding stays on). Idempotent; keeps going after an error and returns the first.
pub fn host_down(state: &mut State) -> Result<(), LabError> {
    let mut first_error = None;
    let mut note = |r: Result<(), LabError>| {
        if let Err(e) = r {
            eprintln!("lab down: {e}");
            first_error.get_or_insert(e);
        }
    };
    for (netns, veth) in std::mem::take(&mut state.endpoints) {
        note(endpoint_down(&netns, &veth));
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(VETH_PREFIX) {
                note(ip(&["link", "del", &name]).map(|_| ()));
            }
        }
    }
    for family in ["-4", "-6"] {
        if family == "-6" && !ipv6_available() {
            continue;
        }
        // Host routes left behind (the blackholes go last, below).
        note(
            ip(&[
                family,
                "route",
                "flush",
                "proto",
                ROUTE_PROTO,
                "type",
                "unicast",
            ])
            .map(|_| ()),
        );
    }
    if state.dummy && link_exists(DUMMY) {
        note(ip(&["link", "del", DUMMY]).map(|_| ()));
    }
    state.dummy = false;
    for range in std::mem::take(&mut state.blackholes) {
        let family = if range.contains(':') { "-6" } else { "-4" };
        let existing = ip(&[
            family,
            "route",
            "show",
            "exact",
            &range,
            "type",
            "blackhole",
        ]);
        if existing.is_ok_and(|o| !o.trim().is_empty()) {
            note(
                ip(&[
                    family,
                    "route",
                    "del",
                    "blackhole",
                    &range,
                    "proto",
                    ROUTE_PROTO,
                ])
                .map(|_| ()),
            );
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
