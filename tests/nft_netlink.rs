//! Element updates, table loads and reading tables back over netlink against the real kernel, each test in a
//! network namespace of its own (the test binary runs itself again under `ip netns exec`).
//! Every set is then listed and compared with the same table loaded whole by `nft -f`
//! (`nft_real` compares whole tables loaded both ways). Needs root, nft and iproute2; fails,
//! never skips.

use std::collections::BTreeSet;
use std::process::Command;

use kube_nsg::model::{Access, Direction, ObjectRef};
use kube_nsg::nft::netlink::{self, Data, Elem, Op, SetElems};
use kube_nsg::nft::{
    self, Applied, Chain, Element, Hook, KeyType, Nft, NftCommand, NftError, RuleRef, Ruleset, Set,
    Span, Verdict,
};

const INSIDE: &str = "KUBE_NSG_TEST_NETNS";

/// Whether this process is the one inside the namespace; if not, runs `test` again inside a
/// new namespace (removed afterwards) and checks that it passed.
fn in_own_netns(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    let ns = format!("nsg-nl-{}-{}", std::process::id(), test.len());
    let ip = |args: &[&str]| Command::new("ip").args(args).status().unwrap().success();
    assert!(ip(&["netns", "add", &ns]), "ip netns add (root is needed)");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .unwrap();
    ip(&["netns", "delete", &ns]);
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{test} in netns {ns}:\n{text}");
    assert!(text.contains("1 passed"), "{text}");
    false
}

/// `nft` that always fails: an update applied with it went over netlink.
fn no_nft() -> NftCommand {
    NftCommand {
        program: "false".into(),
        ..Default::default()
    }
}

fn pt(v: u128) -> Span {
    (v, v)
}

fn v4(s: &str) -> u128 {
    u32::from(s.parse::<std::net::Ipv4Addr>().unwrap()) as u128
}

fn v6(s: &str) -> u128 {
    u128::from(s.parse::<std::net::Ipv6Addr>().unwrap())
}

fn el(key: Vec<Span>, verdict: Option<Verdict>) -> Element {
    Element { key, verdict }
}

fn set(name: &str, key: Vec<KeyType>, is_map: bool, interval: bool, elements: Vec<Element>) -> Set {
    Set {
        name: name.into(),
        key,
        is_map,
        interval,
        comment: None,
        elements,
    }
}

/// Every kind of set an element update may touch over netlink: IPv4 and IPv6 hash sets and
/// verdict maps (goto, jump, accept, drop), a concatenated hash map, a concatenated interval
/// (pipapo) map, and single-field interval (rbtree) sets and maps. `k` picks which elements.
fn table(name: &str, k: u128) -> Ruleset {
    use KeyType::*;
    let goto = |c: &str| Some(Verdict::Goto(c.into()));
    let sets = vec![
        set(
            "a4",
            vec![Ipv4],
            false,
            false,
            (0..4)
                .map(|i| el(vec![pt(v4("10.0.0.1") + k + i)], None))
                .collect(),
        ),
        set(
            "a6",
            vec![Ipv6],
            false,
            false,
            (0..3)
                .map(|i| el(vec![pt(v6("fd00::1") + k * 7 + i)], None))
                .collect(),
        ),
        set(
            "conc",
            vec![Ipv4, Proto, Port],
            true,
            false,
            vec![
                el(vec![pt(v4("10.1.0.1") + k), pt(6), pt(80 + k)], goto("c1")),
                el(
                    vec![pt(v4("10.1.0.2")), pt(17), pt(53)],
                    Some(Verdict::Accept),
                ),
            ],
        ),
        set(
            "pipapo",
            vec![Ipv4, Port],
            true,
            true,
            vec![
                el(
                    vec![(v4("10.2.0.0"), v4("10.2.0.255")), (1000, 1999 + k)],
                    goto("c2"),
                ),
                el(vec![pt(v4("10.3.0.1") + k), pt(22)], Some(Verdict::Drop)),
            ],
        ),
        // Single-field interval sets: neighbouring ranges, one from zero, one to the top.
        set(
            "iv4",
            vec![Ipv4],
            false,
            true,
            // Sorted, as the compiler's.
            (k == 0)
                .then_some((0, 99))
                .into_iter()
                .chain([
                    (v4("10.0.0.0"), v4("10.0.255.255")),
                    (v4("10.1.0.0") + k, v4("10.1.0.255")),
                    (v4("10.1.1.0"), v4("10.1.1.9") + k),
                ])
                .chain((k == 1).then_some((v4("255.255.255.0"), v4("255.255.255.255"))))
                .map(|span| el(vec![span], None))
                .collect(),
        ),
        set(
            "ivmap6",
            vec![Ipv6],
            true,
            true,
            vec![
                el(vec![(0, v6("fd00::ffff") + k)], goto("c1")),
                el(vec![(v6("fd00::ffff") + k + 1, v6("fd01::"))], goto("c2")),
                el(
                    vec![(v6("fd02::"), v6("fd02::") + 9)],
                    if k == 5 {
                        goto("c1")
                    } else {
                        Some(Verdict::Drop)
                    },
                ),
            ],
        ),
        set(
            "pods.v4",
            vec![Ipv4],
            true,
            false,
            (0..5)
                .map(|i| {
                    let c = if (i + k).is_multiple_of(2) {
                        "c1"
                    } else {
                        "c2"
                    };
                    el(vec![pt(v4("10.4.0.1") + i + k)], goto(c))
                })
                .collect(),
        ),
        set(
            "pods.v6",
            vec![Ipv6],
            true,
            false,
            vec![
                el(
                    vec![pt(v6("fd00:4::1") + k)],
                    Some(Verdict::Jump("c1".into())),
                ),
                el(
                    vec![pt(v6("fd00:4::ff"))],
                    goto(if k == 0 { "c1" } else { "c2" }),
                ),
            ],
        ),
    ];
    let chain = |n: &str| Chain {
        name: n.into(),
        hook: None,
        comment: None,
        rules: vec![],
    };
    Ruleset {
        table: name.into(),
        sets,
        chains: vec![chain("c1"), chain("c2")],
        rule_chains: Default::default(),
    }
}

/// The elements of a set (`set`) or map (`map`) as `nft -j list` gives them, sorted.
fn listed(kind: &str, table: &str, set: &str) -> Vec<String> {
    let out = Command::new("nft")
        .args(["-j", "list", kind, "inet", table, set])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = &doc["nftables"][1];
    let mut elems: Vec<String> = item[kind]["elem"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e.to_string())
        .collect();
    elems.sort();
    elems
}

/// Every set of `rs` as listed from the kernel equals the same set loaded whole by `nft -f`.
fn assert_equals_a_full_load(rs: &Ruleset) {
    let nftc = NftCommand::default();
    let mut whole = rs.clone();
    whole.table = format!("{}-whole", rs.table);
    nftc.apply(&nft::render_replace(&whole)).unwrap();
    for s in &rs.sets {
        let kind = if s.is_map { "map" } else { "set" };
        assert_eq!(
            listed(kind, &rs.table, &s.name),
            listed(kind, &whole.table, &s.name),
            "set {}",
            s.name
        );
    }
    nftc.delete_table(&whole.table).unwrap();
}

#[test]
fn element_updates_of_every_set_kind_go_over_netlink() {
    if !in_own_netns("element_updates_of_every_set_kind_go_over_netlink") {
        return;
    }
    let mut current = None;
    let first = table("nl", 0);
    let applied = nft::sync(&NftCommand::default(), &mut current, first.clone()).unwrap();
    assert_eq!(applied, Applied::Replaced);
    assert_eq!(listed("set", "nl", "a4").len(), 4);
    for k in [1, 5, 0] {
        let next = table("nl", k);
        let nft::Update::Elements(update) = nft::render_update(current.as_ref(), &next) else {
            panic!("not an element update");
        };
        assert!(update.sets.len() == 8, "every set changes: {update:?}");
        // The same update as nft's script, on a copy.
        let copy = |rs: &Ruleset| Ruleset {
            table: "nl-script".into(),
            ..rs.clone()
        };
        let nftc = NftCommand::default();
        nftc.replace(&copy(current.as_ref().unwrap())).unwrap();
        let script = nft::ElementUpdate {
            table: "nl-script".into(),
            ..update.clone()
        }
        .script();
        nftc.apply(&script).unwrap();
        assert_equals_a_full_load(&copy(&next));

        let applied = nft::sync(&no_nft(), &mut current, next.clone()).unwrap();
        assert_eq!(applied, Applied::Elements);
        assert_equals_a_full_load(&next);
    }
    assert_eq!(
        listed("map", "nl", "pods.v4")[0],
        r#"[\"10.4.0.1\",{\"goto\":{\"target\":\"c1\"}}]"#.replace('\\', "")
    );
}

#[test]
fn value_maps_and_a_missing_set() {
    if !in_own_netns("value_maps_and_a_missing_set") {
        return;
    }
    let nftc = NftCommand::default();
    nftc.apply(
        "table inet nv {\n\tmap marks { type ipv4_addr : mark; }\n\tset s { type ipv4_addr; }\n}\n",
    )
    .unwrap();
    let add = |set: &str, addr: [u8; 4], mark: Option<u32>| SetElems {
        set: set.into(),
        op: Op::Add,
        elems: vec![Elem {
            key: addr.to_vec(),
            key_end: None,
            data: mark.map(|m| Data::Value(m.to_ne_bytes().to_vec())),
            interval_end: false,
        }],
    };
    netlink::apply("nv", &[add("marks", [10, 0, 0, 1], Some(0x10))]).unwrap();
    assert_eq!(listed("map", "nv", "marks"), vec![r#"["10.0.0.1",16]"#]);

    // One batch: the valid add is undone with the rejected one.
    let err = netlink::apply(
        "nv",
        &[
            add("s", [10, 0, 0, 2], None),
            add("missing", [10, 0, 0, 3], None),
        ],
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, NftError::Kernel { .. }), "{err:?}");
    assert!(
        text.contains("set missing in table inet nv") && text.contains("No such file"),
        "{text}"
    );
    assert!(listed("set", "nv", "s").is_empty(), "nothing was changed");
    // Deleting an element that is not there fails the same way.
    let mut del = add("marks", [10, 0, 0, 9], None);
    del.op = Op::Delete;
    assert!(netlink::apply("nv", &[del]).is_err());
    assert_eq!(listed("map", "nv", "marks").len(), 1);
}

/// 20,000 new elements, a batch larger than a default socket send buffer (208 KiB): over
/// netlink where the buffer takes it, else through `nft -f`; one transaction either way.
#[test]
fn a_large_update_is_applied_whole() {
    if !in_own_netns("a_large_update_is_applied_whole") {
        return;
    }
    let small = table("big", 0);
    let mut large = small.clone();
    large.sets[0].elements = (0..20_000)
        .map(|i| el(vec![pt(v4("10.8.0.0") + i)], None))
        .collect();
    let nftc = NftCommand::default();
    let mut current = None;
    nft::sync(&nftc, &mut current, small).unwrap();
    let applied = nft::sync(&nftc, &mut current, large.clone()).unwrap();
    assert_eq!(applied, Applied::Elements);
    assert_eq!(listed("set", "big", "a4").len(), 20_000);
    assert_equals_a_full_load(&large);
}

/// A table the kernel rejects (a rule jumps to a chain that does not exist) fails as one
/// transaction: the error names the rule, and the table loaded before is still there, whole.
#[test]
fn a_rejected_table_names_the_rule_and_changes_nothing() {
    if !in_own_netns("a_rejected_table_names_the_rule_and_changes_nothing") {
        return;
    }
    let nftc = NftCommand::default();
    let good = table("rj", 0);
    nftc.replace(&good).unwrap();
    let before = listed("set", "rj", "a4");
    let mut bad = table("rj", 1);
    bad.chains[1]
        .rules
        .push(nft::Rule::verdict(vec![], Verdict::Goto("missing".into())));
    let err = nftc.replace(&bad).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, NftError::Kernel { .. }), "{err:?}");
    assert!(
        text.contains("rule 1 of chain c2 in table inet rj") && text.contains("No such file"),
        "{text}"
    );
    assert_eq!(
        listed("set", "rj", "a4"),
        before,
        "the old table is unchanged"
    );
    assert_equals_a_full_load(&good);
}

/// What the agent reads back of a table over netlink: the same for as long as only its
/// counters move, different once anything else in it changes, and the counters as `nft`
/// lists them. Then the table is removed over netlink.
#[test]
fn a_table_read_back_changes_with_its_contents_not_its_counters() {
    if !in_own_netns("a_table_read_back_changes_with_its_contents_not_its_counters") {
        return;
    }
    let nftc = NftCommand::default();
    assert_eq!(nftc.read_table("rb").unwrap(), None);
    let mut rs = table("rb", 0);
    // Loopback pings pass this counter (the output hook).
    let mut count = nft::Rule::verdict(vec![], Verdict::Accept);
    count.counter = true;
    rs.chains.push(Chain {
        name: "out".into(),
        hook: Some(Hook::Output),
        comment: None,
        rules: vec![count],
    });
    rs.rule_chains.insert(
        "out".into(),
        RuleRef {
            nsg: ObjectRef::new("ns", "nsg"),
            direction: Direction::Outbound,
            rule: "r".into(),
            priority: 100,
            access: Access::Allow,
        },
    );
    nftc.replace(&rs).unwrap();
    let read = || nftc.read_table("rb").unwrap().expect("the table");
    let first = read();
    let names = |v: Vec<&String>| v.into_iter().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        first.chains,
        names(rs.chains.iter().map(|c| &c.name).collect())
    );
    assert_eq!(first.sets, names(rs.sets.iter().map(|s| &s.name).collect()));
    assert_eq!(first.counters, vec![("out".to_string(), 0, 0)]);
    assert_eq!(read(), first);

    let run = |cmd: &str| {
        let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run("ip link set lo up && ping -c 3 -i 0.01 -q 127.0.0.1");
    let counted = read();
    assert_eq!(
        counted.fingerprint, first.fingerprint,
        "counting is no change"
    );
    let packets = counted.counters[0].1;
    assert!(packets >= 3, "{counted:?}");
    let listed = run("nft -j list chain inet rb out");
    assert!(
        listed.contains(&format!("\"packets\": {packets},")),
        "{listed}"
    );
    let hits = nft::read_counters(&nftc, &rs).unwrap();
    assert_eq!((hits.len(), hits[0].packets), (1, packets));

    run("nft add element inet rb a4 '{ 10.9.9.9 }'");
    assert_ne!(read().fingerprint, first.fingerprint, "an element added");
    run("nft delete element inet rb a4 '{ 10.9.9.9 }'");
    assert_eq!(read().fingerprint, first.fingerprint, "and taken out again");
    run(
        "nft add element inet rb pods.v4 '{ 10.4.0.1 : goto c2 }' 2>/dev/null || nft 'delete element inet rb pods.v4 { 10.4.0.1 }; add element inet rb pods.v4 { 10.4.0.1 : goto c2 }'",
    );
    assert_ne!(
        read().fingerprint,
        first.fingerprint,
        "an element's verdict"
    );
    nftc.replace(&rs).unwrap();
    assert_eq!(
        read().fingerprint,
        first.fingerprint,
        "the table loaded again"
    );
    run("nft add rule inet rb c1 accept");
    assert_ne!(read().fingerprint, first.fingerprint, "a rule added");
    nftc.replace(&rs).unwrap();
    run("nft add chain inet rb extra");
    let extra = read();
    assert_ne!(extra.fingerprint, first.fingerprint, "a chain added");
    assert!(extra.chains.contains("extra"));

    // Removed over netlink (`false` stands for nft), twice: the second finds nothing to do.
    no_nft().delete_table("rb").unwrap();
    no_nft().delete_table("rb").unwrap();
    assert_eq!(nftc.read_table("rb").unwrap(), None);
}
