//! The dataplane benchmarks (`cargo bench --bench nft`, as root with nft and iproute2).
//! Every figure is a ratio of two measurements taken in the same run:
//!
//! (a) new-flow packet rate between two netns pods across the host's forward hook, with the
//!     compiled 4,096-rule table, with the naive linear chain of the same rules, and with an
//!     empty forward hook;
//! (b) time to compile and program 4,096 rules and 10,000 pod IPs through the applier, over
//!     the time of `nft -f` of the same text;
//! (c) time to apply one ASG membership change with the large table loaded, over the same
//!     change to an otherwise empty table: as the agent applies it (netlink), with the diff
//!     before it, and as an `nft -f` script.

#[path = "../tests/nft_support/mod.rs"]
mod nft_support;

use std::cell::RefCell;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube_nsg::eval::{Packet, evaluate_flow};
use kube_nsg::model::{Access, Inventory, Protocol};
use kube_nsg::nft::{
    self, Applied, CompileOptions, Element, ElementUpdate, KeyType, Layout, Nft, NftCommand,
    PodIndex, Ruleset, Set, SetChange, Update,
};
use kube_nsg::resolve::Resolved;
use nft_support::bench::{self, A, B, FLOW_PORT, NODE};
use nft_support::netns::{Lab, NetnsPod};

// The allocator of the `kube-nsg` binary, so compiling costs here what it costs the agent
// (glibc's malloc took 16% more instructions to compile this benchmark's node).
#[global_allocator]
static ALLOCATOR: kube_nsg::Allocator = kube_nsg::Allocator;

/// Sockets of the flood: each a flow of its own (its own source port).
const FLOWS: u16 = 1024;
const SECONDS: f64 = 2.0;
const ROUNDS: usize = 5;
/// Element updates over netlink take well under a millisecond: more rounds for a stable median.
const UPDATE_ROUNDS: usize = 21;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--udp-flood") {
        flood(&args[2], &args[3], args[4].parse().unwrap());
        return;
    }
    if args.iter().skip(1).any(|a| a != "--bench") {
        return; // `cargo bench` with a filter for other benches
    }
    let table = format!("kube-nsg-bench-{}", std::process::id());
    let _guard = TableGuard(table.clone());
    println!(
        "kube-nsg nftables benchmarks ({} rules in 4 stages, {} pods)\n",
        4 * bench::RULES_PER_STAGE,
        bench::PODS
    );
    programming(&table);
    membership_change(&table);
    forwarding(&table);
}

/// Sends UDP from `FLOWS` source ports to `dst:FLOW_PORT` for `secs` seconds.
fn flood(src: &str, dst: &str, secs: f64) {
    let dst: SocketAddr = format!("{dst}:{FLOW_PORT}").parse().unwrap();
    let socks: Vec<UdpSocket> = (0..FLOWS)
        .map(|i| {
            let s = UdpSocket::bind(format!("{src}:{}", 10000 + i)).unwrap();
            s.connect(dst).unwrap();
            s
        })
        .collect();
    let payload = [0u8; 18];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        for s in &socks {
            let _ = s.send(&payload); // a full queue drops: what arrives is what counts
        }
    }
}

struct TableGuard(String);

impl Drop for TableGuard {
    fn drop(&mut self) {
        let _ = NftCommand::default().delete_table(&self.0);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(d: f64) -> String {
    format!("{:.1} ms", d * 1000.0)
}

fn opts(table: &str, layout: Layout) -> CompileOptions {
    CompileOptions {
        table: table.into(),
        layout,
        ..Default::default()
    }
}

fn size(rs: &Ruleset) -> String {
    let elements: usize = rs.sets.iter().map(|s| s.elements.len()).sum();
    let rules: usize = rs.chains.iter().map(|c| c.rules.len()).sum();
    format!(
        "{} chains, {rules} nft rules, {} sets/maps, {elements} set elements",
        rs.chains.len(),
        rs.sets.len()
    )
}

fn nft_file(path: &str) {
    let st = Command::new("nft").args(["-f", path]).status().unwrap();
    assert!(st.success(), "nft -f {path}");
}

/// (b) Programming the large table from scratch: as the agent does (compile, then load over
/// netlink) against `nft -f` of the same table's text. Both loads list the same.
fn programming(table: &str) {
    let inv = bench::cluster(true);
    let nftc = NftCommand::default();
    let rs = nft::compile_with(&Resolved::new(&inv), Some(NODE), &opts(table, Layout::Maps));
    let text = nft::render_replace(&rs);
    let path = format!("/tmp/{table}.nft");
    std::fs::write(&path, &text).unwrap();
    let shape = format!("{}; {} KiB of text", size(&rs), text.len() / 1024);
    let (mut applier, mut plain, mut compile) = (vec![], vec![], vec![]);
    for _ in 0..3 {
        nftc.delete_table(table).unwrap();
        let t = Instant::now();
        let res = Resolved::new(&inv);
        let rs = nft::compile_with(&res, Some(NODE), &opts(table, Layout::Maps));
        compile.push(t.elapsed().as_secs_f64());
        nftc.replace(&rs).unwrap();
        applier.push(t.elapsed().as_secs_f64());

        nftc.delete_table(table).unwrap();
        let t = Instant::now();
        nft_file(&path);
        plain.push(t.elapsed().as_secs_f64());
    }
    let listing = || {
        let out = Command::new("nft")
            .args(["list", "table", "inet", table])
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    };
    let from_text = listing();
    nftc.replace(&rs).unwrap();
    assert!(
        listing() == from_text,
        "the netlink load lists differently from nft -f"
    );
    let _ = std::fs::remove_file(&path);
    // What the agent reads back (fingerprint, counters) against `nft -j list` of the table.
    let r = timed(
        3,
        || {
            let state = nftc.read_table(table).unwrap().expect("the table");
            assert_eq!(state.chains.len(), rs.chains.len());
        },
        || {},
    );
    let j = timed(
        3,
        || {
            let out = Command::new("nft")
                .args(["-j", "list", "table", "inet", table])
                .output()
                .unwrap();
            assert!(out.status.success());
        },
        || {},
    );
    // A rule edit on such a node replaces the loaded table: the old one goes in the same
    // transaction. The load alone, into no table, for comparison (both over netlink).
    let over = timed(3, || nftc.replace(&rs).unwrap(), || {});
    nftc.delete_table(table).unwrap();
    let fresh = timed(
        3,
        || nftc.replace(&rs).unwrap(),
        || nftc.delete_table(table).unwrap(),
    );
    let (a, p, c) = (median(applier), median(plain), median(compile));
    println!("(b) programming 4,096 rules + 10,000 pod IPs (node with 110 pods):");
    println!("    table: {shape}");
    println!(
        "    applier (resolve + compile + netlink load):  {}  [of which resolve+compile {}]",
        ms(a),
        ms(c)
    );
    println!(
        "    plain nft -f of the same table's text:        {}",
        ms(p)
    );
    println!(
        "    ratio applier / nft -f = {:.2}   (target <= 1.5, and under 1 s: {})",
        a / p,
        a < 1.0
    );
    println!(
        "    replacing the loaded table (netlink): {}  vs  loading it into none: {}   ratio {:.2}",
        ms(over),
        ms(fresh),
        over / fresh
    );
    println!(
        "    reading it back over netlink (fingerprint, counters): {}  vs  nft -j list table: {}   ratio {:.3}\n",
        ms(r),
        ms(j),
        r / j
    );
}

/// Median seconds of `rounds` runs of `change`, each followed by `undo` (not timed).
fn timed(rounds: usize, mut change: impl FnMut(), mut undo: impl FnMut()) -> f64 {
    median(
        (0..rounds)
            .map(|_| {
                let t = Instant::now();
                change();
                let s = t.elapsed().as_secs_f64();
                undo();
                s
            })
            .collect(),
    )
}

/// Median seconds of `nft::sync` from `old` to `new` (an element update), as the agent runs it.
fn sync_timed(nftc: &NftCommand, old: &Ruleset, new: &Ruleset) -> f64 {
    let current = RefCell::new(Some(old.clone()));
    // Rulesets cloned beforehand: the agent compiles each one anew.
    let mut fresh: Vec<Ruleset> = (0..ROUNDS).map(|_| new.clone()).collect();
    timed(
        ROUNDS,
        || {
            let a = nft::sync(nftc, &mut current.borrow_mut(), fresh.pop().unwrap()).unwrap();
            assert_eq!(a, Applied::Elements);
        },
        || {
            nft::sync(nftc, &mut current.borrow_mut(), old.clone()).unwrap();
        },
    )
}

/// Turns between two views, forth and back, so that `index` ends at `a` again.
const TURNS: usize = 6;

/// Median seconds of the agent's two ways from one table to the next, between views `a`
/// (compiled as `table_a` with `index`) and `b`: a full compile and diff, and the update for
/// pod churn, which must give the full compile's table.
fn agent_ways(
    table_a: &Ruleset,
    a: &Arc<Inventory>,
    b: &Arc<Inventory>,
    index: &mut PodIndex,
    options: &CompileOptions,
) -> (f64, f64) {
    let table_b = nft::compile_with(&Resolved::new(b), Some(NODE), options);
    let views = [(a, table_a), (b, &table_b)];
    let mut full = Vec::new();
    let mut pods = Vec::new();
    for turn in 0..TURNS {
        let ((_, from), (to, expected)) = (views[turn % 2], views[1 - turn % 2]);
        let t = Instant::now();
        let rs = nft::compile_with(&Resolved::new(to), Some(NODE), options);
        elements(nft::render_update(Some(from), &rs));
        full.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let rs = nft::update_pods(from, index, to, options).expect("pod churn: an update");
        elements(nft::render_update(Some(from), &rs));
        pods.push(t.elapsed().as_secs_f64());
        assert_eq!(&rs, expected, "the update gives the full compile's table");
    }
    (median(full), median(pods))
}

fn elements(update: Update) -> ElementUpdate {
    match update {
        Update::Elements(u) => u,
        other => panic!("not an element update: {other:?}"),
    }
}

/// (c) One ASG membership change, large table vs empty table: as the agent applies it
/// (`Nft::apply_elements`: netlink), with the diff (`nft::sync`), and as an `nft -f` script.
fn membership_change(table: &str) {
    let nftc = NftCommand::default();
    let before = bench::cluster(true);
    let (after, member) = bench::after_membership_change(before.clone());
    let options = opts(table, Layout::Maps);
    let before = Arc::new(before);
    let t = Instant::now();
    let (old, mut index) = nft::compile_indexed(&before, Some(NODE), &options);
    let t_old = t.elapsed().as_secs_f64();
    let new = nft::compile_with(&Resolved::new(&after), Some(NODE), &options);
    let update = elements(nft::render_update(Some(&old), &new));
    let churn = [
        ("the change above", Arc::new(after)),
        (
            "a pod starting on the node",
            Arc::new(bench::after_local_start(&before)),
        ),
    ]
    .map(|(what, state)| {
        (
            what,
            agent_ways(&old, &before, &state, &mut index, &options),
        )
    });
    let undo = elements(nft::render_update(Some(&new), &old));
    assert!(update.script().contains(&member), "{}", update.script());
    assert!(
        nft::netlink::ops(&update).is_some(),
        "the update cannot go over netlink"
    );
    // A node joining: its address enters the tags, single-field interval sets rewritten whole.
    let mut joined = (*before).clone();
    joined.node_ips.push("10.251.0.7".parse().unwrap());
    let node_new = nft::compile_with(&Resolved::new(&joined), Some(NODE), &options);
    let node_update = elements(nft::render_update(Some(&old), &node_new));
    let node_undo = elements(nft::render_update(Some(&node_new), &old));
    let rewritten = node_update.sets.iter().filter(|s| s.flush).count();
    assert!(rewritten > 0, "{}", node_update.script());

    // The empty table: just the ASG's set, a hash set as in the large table.
    let set = "asg/ns3/web.v4";
    let declared = old.set(set).expect("the ASG's set").clone();
    assert!(!declared.interval);
    let empty_old = Ruleset {
        table: table.into(),
        sets: vec![Set {
            elements: vec![],
            ..declared
        }],
        chains: vec![],
        rule_chains: Default::default(),
    };
    let mut empty_new = empty_old.clone();
    let ip = u32::from(member.parse::<std::net::Ipv4Addr>().unwrap()) as u128;
    empty_new.sets[0].elements.push(Element {
        key: vec![(ip, ip)],
        verdict: None,
    });
    let empty_update = elements(nft::render_update(Some(&empty_old), &empty_new));
    let empty_undo = elements(nft::render_update(Some(&empty_new), &empty_old));

    // The large table loaded.
    nftc.apply(&nft::render_replace(&old)).unwrap();
    let large_nl = timed(
        UPDATE_ROUNDS,
        || nftc.apply_elements(&update).unwrap(),
        || nftc.apply_elements(&undo).unwrap(),
    );
    // A jump or goto element makes the kernel validate the table's whole chain graph at
    // commit: the update's plain sets alone (what the empty table gets) show that share.
    let sets_only = |u: &ElementUpdate| ElementUpdate {
        table: u.table.clone(),
        sets: (u.sets.iter())
            .filter(|s| old.set(&s.name).is_some_and(|d| !d.is_map))
            .cloned()
            .collect(),
    };
    let (plain, plain_undo) = (sets_only(&update), sets_only(&undo));
    let large_plain = timed(
        UPDATE_ROUNDS,
        || nftc.apply_elements(&plain).unwrap(),
        || nftc.apply_elements(&plain_undo).unwrap(),
    );
    let large_sync = sync_timed(&nftc, &old, &new);
    let large_text = timed(
        ROUNDS,
        || nftc.apply(&update.script()).unwrap(),
        || nftc.apply(&undo.script()).unwrap(),
    );
    let node_nl = timed(
        UPDATE_ROUNDS,
        || nftc.apply_elements(&node_update).unwrap(),
        || nftc.apply_elements(&node_undo).unwrap(),
    );
    let node_text = timed(
        ROUNDS,
        || nftc.apply(&node_update.script()).unwrap(),
        || nftc.apply(&node_undo.script()).unwrap(),
    );

    // The empty table.
    nftc.apply(&nft::render_replace(&empty_old)).unwrap();
    let empty_nl = timed(
        UPDATE_ROUNDS,
        || nftc.apply_elements(&empty_update).unwrap(),
        || nftc.apply_elements(&empty_undo).unwrap(),
    );
    let empty_sync = sync_timed(&nftc, &empty_old, &empty_new);
    let empty_text = timed(
        ROUNDS,
        || nftc.apply(&empty_update.script()).unwrap(),
        || nftc.apply(&empty_undo.script()).unwrap(),
    );

    let script = update.script();
    println!("(c) one ASG membership change (pod {member} joins ns3/web):");
    println!(
        "    element update ({} lines): {}",
        script.lines().count(),
        script
            .lines()
            .map(|l| l.split(" {").next().unwrap())
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "    sets touched: {}, interval sets among them: {}",
        update.sets.len(),
        update.sets.iter().filter(|s| s.interval).count()
    );
    println!(
        "    median of {UPDATE_ROUNDS} rounds (sync, nft -f: {ROUNDS}) {:>13} {:>10} {:>10}",
        "large table", "empty", "ratio"
    );
    for (name, l, e) in [
        ("agent's apply (netlink)", large_nl, empty_nl),
        ("  the same, its plain sets only", large_plain, empty_nl),
        ("diff + apply (nft::sync)", large_sync, empty_sync),
        ("nft -f of the same script", large_text, empty_text),
    ] {
        println!(
            "    {name:<40} {:>7.3} ms {:>7.3} ms {:>10.2}",
            l * 1e3,
            e * 1e3,
            l / e
        );
    }
    println!(
        "    ratio large / empty, agent's apply = {:.2}   (target <= 1.2, and under 50 ms: {})",
        large_nl / empty_nl,
        large_nl < 0.05
    );
    println!(
        "    a node joining, large table ({} sets, {rewritten} single-field interval sets written whole): \
         netlink {} vs nft -f of its script {}, ratio {:.3}",
        node_update.sets.len(),
        ms(node_nl),
        ms(node_text),
        node_nl / node_text
    );
    println!(
        "    agent side, not in the ratios: compiling the node {}; to the next table and back \
         (median of {TURNS}):",
        ms(t_old)
    );
    for (what, (full, pods)) in churn {
        println!(
            "      {what:<28} compile + diff {:>9}, pod update + diff {:>8}, ratio {:.3}",
            ms(full),
            ms(pods),
            pods / full
        );
    }
    commit_per_chain(table);
    println!();
}

/// Why even plain sets cost more beside a large table: every commit walks every chain of
/// every table in the network namespace. One element added to a hash set, with 8,000 empty
/// chains in the set's table and with none.
fn commit_per_chain(table: &str) {
    let nftc = NftCommand::default();
    let t = format!("{table}-chains");
    let element = || Element {
        key: vec![(0x0a00_0001, 0x0a00_0001)],
        verdict: None,
    };
    let change = |add: bool| ElementUpdate {
        table: t.clone(),
        sets: vec![SetChange {
            name: "s".into(),
            key: vec![KeyType::Ipv4],
            is_map: false,
            interval: false,
            flush: false,
            delete: if add { vec![] } else { vec![element()] },
            add: if add { vec![element()] } else { vec![] },
        }],
    };
    let times = [0, 8_000].map(|chains| {
        let mut script = format!("table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n");
        script.push_str("\tset s { type ipv4_addr; }\n");
        for c in 0..chains {
            script.push_str(&format!("\tchain c{c} {{ }}\n"));
        }
        script.push_str("}\n");
        nftc.apply(&script).unwrap();
        timed(
            UPDATE_ROUNDS,
            || nftc.apply_elements(&change(true)).unwrap(),
            || nftc.apply_elements(&change(false)).unwrap(),
        )
    });
    nftc.delete_table(&t).unwrap();
    println!(
        "    the commit's walk over chains: one element added to a hash set beside 8,000 empty \
         chains {:.3} ms vs none {:.3} ms, ratio {:.2}",
        times[1] * 1e3,
        times[0] * 1e3,
        times[1] / times[0]
    );
}

fn sink_count(pod: &NetnsPod) -> u64 {
    let out = pod
        .cmd("nft")
        .args(["-j", "list", "chain", "inet", "sink", "input"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .flat_map(|r| r["expr"].as_array().unwrap().iter())
        .find_map(|e| e.get("counter").map(|c| c["packets"].as_u64().unwrap()))
        .unwrap()
}

/// Packets per second from A arriving at B.
fn rate(a: &NetnsPod, b: &NetnsPod) -> f64 {
    let exe = std::env::current_exe().unwrap();
    let before = sink_count(b);
    let st = a
        .cmd(exe.to_str().unwrap())
        .args(["--udp-flood", A, B, &SECONDS.to_string()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    (sink_count(b) - before) as f64 / SECONDS
}

/// (a) The forward path.
fn forwarding(table: &str) {
    let inv = bench::cluster(true);
    let res = Resolved::new(&inv);
    let flow = Packet {
        protocol: Protocol::Udp,
        src: A.parse().unwrap(),
        src_port: 10000,
        dst: B.parse().unwrap(),
        dst_port: FLOW_PORT,
    };
    let verdict = evaluate_flow(&res, &flow);
    let stages: Vec<(String, u32)> = [&verdict.outbound, &verdict.inbound]
        .into_iter()
        .flatten()
        .flat_map(|v| v.stages.iter().map(|s| (s.nsg.to_string(), s.priority)))
        .collect();
    assert_eq!(verdict.access, Access::Allow);
    assert_eq!(stages.len(), 4, "the flow crosses four stages: {stages:?}");
    assert!(
        stages.iter().all(|(_, p)| *p >= 65000),
        "default rules decide the flow: {stages:?}"
    );

    let maps = nft::compile_with(&res, Some(NODE), &opts(table, Layout::Maps));
    let linear = nft::compile_with(&res, Some(NODE), &opts(table, Layout::Linear));
    let defaults_inv = bench::cluster(false);
    let defaults = nft::compile_with(
        &Resolved::new(&defaults_inv),
        Some(NODE),
        &opts(table, Layout::Maps),
    );
    let empty = format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t}}\n}}\n"
    );
    // The stateful floor: the same empty hook with one conntrack match, which turns on
    // connection tracking in the namespace (every stateful table pays it, whatever its rules).
    let conntrack = format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct state established,related accept\n\t}}\n}}\n"
    );
    let linear_rules: usize = linear.chains.iter().map(|c| c.rules.len()).sum();
    let configs = [
        ("empty forward hook", empty),
        ("empty hook + conntrack (ct state only)", conntrack),
        (
            "compiled maps, default rules only",
            nft::render_replace(&defaults),
        ),
        ("compiled maps, 4,096 rules", nft::render_replace(&maps)),
        (
            "naive linear chain, 4,096 rules",
            nft::render_replace(&linear),
        ),
    ];

    let mut lab = Lab::new("bn");
    let a = lab.add(A, bench::A6);
    let b = lab.add(B, bench::B6);
    // B drops and counts what arrives, without answering (so every packet of a flow stays
    // `ct state new` and runs the rules).
    let mut sink = lab.pods[b].cmd("nft");
    sink.args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = sink.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(
        format!("table inet sink {{\n\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\t\tudp dport {FLOW_PORT} counter drop\n\t}}\n}}\n").as_bytes(),
    ).unwrap();
    assert!(child.wait().unwrap().success());

    let nftc = NftCommand::default();
    let mut rates: Vec<Vec<f64>> = vec![vec![]; configs.len()];
    for _ in 0..ROUNDS {
        for (i, (_, text)) in configs.iter().enumerate() {
            nftc.apply(text).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            rates[i].push(rate(&lab.pods[a], &lab.pods[b]));
        }
    }
    let med: Vec<f64> = rates.into_iter().map(median).collect();
    println!(
        "(a) new-flow UDP packets/s from pod A to pod B across the forward hook ({FLOWS} flows, never answered, so every packet is ct state new; median of {ROUNDS} rounds of {SECONDS} s, configurations interleaved):"
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        println!(
            "    {name:<40} {:>10.0} pkt/s   cost per packet vs empty hook = {:.2}",
            med[i],
            med[0] / med[i]
        );
    }
    println!(
        "    ratio 4,096 rules / 0 rules (compiled maps)   = {:.2}   (target <= 1.25)",
        med[0] / med[3]
    );
    println!(
        "    ratio 4,096 rules / 0 rules (linear, {linear_rules} nft rules) = {:.2}",
        med[0] / med[4]
    );
    // What the rule count alone adds: the same groups with none of their own rules (Azure's
    // default rules only) load the same dispatch and stage chains.
    println!(
        "    growth with the rules: 4,096 rules / the same groups with default rules only: compiled maps {:.2}, linear {:.2}",
        med[2] / med[3],
        med[2] / med[4]
    );
    println!(
        "    the same over the conntrack floor: compiled maps {:.2}, default rules only {:.2}, linear {:.2}",
        med[1] / med[3],
        med[1] / med[2],
        med[1] / med[4]
    );
    drop(lab);
}
