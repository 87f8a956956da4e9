//! The rendered text against the real `nft` (installed on every test machine: these tests
//! fail, never skip, without it). Tables here have names of their own and no traffic.

mod common;
mod nft_support;

use kube_nsg::model::{ASG_ANNOTATION, Inventory};
use kube_nsg::nft::{
    self, Applied, CompileOptions, FakeNft, Layout, Nft, NftCommand, NftError, Update,
};
use kube_nsg::resolve::Resolved;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn require_nft() {
    match NftCommand::default().apply(&nft::render_delete("kube-nsg-probe-missing")) {
        Ok(_) => {}
        Err(e @ NftError::Spawn { .. }) => {
            panic!(
                "nft is not installed: {e}. Install it (apt-get install nftables); these tests do not skip"
            )
        }
        Err(e) => panic!("nft does not work here (run as root?): {e}"),
    }
}

/// Random cases from a fixed seed, so a failure repeats.
fn samples<T: std::fmt::Debug>(s: impl Strategy<Value = T>, n: usize) -> Vec<T> {
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    (0..n)
        .map(|_| s.new_tree(&mut runner).unwrap().current())
        .collect()
}

fn opts(table: &str, layout: Layout) -> CompileOptions {
    CompileOptions {
        table: table.into(),
        layout,
        ..Default::default()
    }
}

/// A table name no other test (or process) uses.
fn table(tag: &str) -> String {
    format!("kube-nsg-test-{tag}-{}", std::process::id())
}

#[test]
fn nft_checks_rendered_tables_of_random_clusters() {
    require_nft();
    let check = NftCommand::check();
    let mut inventories: Vec<Inventory> = samples(common::busy_inventory(), 30);
    inventories.extend(samples(common::inventory(), 10));
    inventories.push(nft_support::examples::three_tier());
    let mut v6_pods = 0;
    for (i, inv) in inventories.iter().enumerate() {
        v6_pods += inv
            .pods
            .iter()
            .flat_map(|p| &p.ips)
            .filter(|ip| ip.is_ipv6())
            .count();
        let res = Resolved::new(inv);
        for layout in [Layout::Maps, Layout::Linear] {
            let rs = nft::compile_with(&res, None, &opts("kube-nsg-check", layout));
            let text = nft::render_replace(&rs);
            if let Err(e) = check.apply(&text) {
                panic!("nft -c rejects case {i} ({layout:?}): {e}\n{text}");
            }
        }
    }
    assert!(v6_pods > 0, "the sample has IPv6 pods");
}

fn list(table: &str) -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A table loaded over netlink (`Nft::replace`, the agent's path) lists exactly as its text
/// loaded by `nft -f`, for both layouts of random clusters, IPv6 included.
#[test]
fn tables_loaded_over_netlink_list_as_their_text() {
    require_nft();
    let nft = NftCommand::default();
    let t = table("load");
    let mut inventories: Vec<Inventory> = samples(common::busy_inventory(), 30);
    inventories.extend(samples(common::inventory(), 10));
    inventories.push(nft_support::examples::three_tier());
    for (i, inv) in inventories.iter().enumerate() {
        let res = Resolved::new(inv);
        for layout in [Layout::Maps, Layout::Linear] {
            let rs = nft::compile_with(&res, None, &opts(&t, layout));
            nft.replace(&rs)
                .unwrap_or_else(|e| panic!("case {i} ({layout:?}): {e}"));
            let loaded = list(&t);
            nft.apply(&nft::render_replace(&rs)).unwrap();
            let text = list(&t);
            let diff: Vec<String> = loaded
                .lines()
                .zip(text.lines())
                .filter(|(a, b)| a != b)
                .map(|(a, b)| format!("netlink: {a}\nnft -f:  {b}"))
                .collect();
            assert!(
                loaded == text,
                "case {i} ({layout:?}):\n{}",
                diff.join("\n")
            );
        }
    }
    nft.delete_table(&t).unwrap();
}

/// An element update, as a script and as the agent applies it, leaves the kernel with exactly
/// what loading the new table whole gives.
#[test]
fn element_updates_in_the_kernel_equal_a_full_load() {
    require_nft();
    let nft = NftCommand::default();
    let t = table("upd");
    let (mut updates, mut netlink) = (0, 0);
    let cases = samples(common::busy_inventory(), 80);
    for (i, inv) in cases.iter().enumerate() {
        let mut changed = inv.clone();
        let k = i % changed.pods.len();
        changed.pods[k].annotations.insert(
            ASG_ANNOTATION.into(),
            ["web", "db", "web,logic"][i % 3].into(),
        );
        if i % 4 == 0 && changed.pods.len() > 1 {
            changed.pods.remove((k + 1) % changed.pods.len());
        }
        let old = nft::compile_with(&Resolved::new(inv), None, &opts(&t, Layout::Maps));
        let new = nft::compile_with(&Resolved::new(&changed), None, &opts(&t, Layout::Maps));
        let Update::Elements(update) = nft::render_update(Some(&old), &new) else {
            continue;
        };
        let script = update.script();
        updates += 1;
        nft.apply(&nft::render_replace(&old)).unwrap();
        nft.apply(&script)
            .unwrap_or_else(|e| panic!("case {i}: {e}\n{script}"));
        let incremental = list(&t);
        // The agent's path: over netlink unless a single-field interval set changes.
        nft.apply(&nft::render_replace(&old)).unwrap();
        nft.apply_elements(&update)
            .unwrap_or_else(|e| panic!("case {i}: {e}\n{script}"));
        netlink += nft::netlink::ops(&update).is_some() as usize;
        let by_netlink = list(&t);
        nft.apply(&nft::render_replace(&new)).unwrap();
        assert_eq!(incremental, list(&t), "case {i}: after\n{script}");
        assert_eq!(by_netlink, list(&t), "case {i}: netlink\n{script}");
    }
    nft.delete_table(&t).unwrap();
    assert!(
        updates >= 8,
        "only {updates} of the cases were element updates"
    );
    assert!(
        netlink * 2 >= updates,
        "only {netlink} of {updates} element updates went over netlink"
    );
}

/// Counters read back per NSG rule; removal is idempotent.
#[test]
fn counters_per_rule_and_cleanup() {
    require_nft();
    let nft = NftCommand::default();
    let t = table("cnt");
    let inv = nft_support::examples::three_tier();
    let rs = nft::compile_with(&Resolved::new(&inv), None, &opts(&t, Layout::Maps));
    let mut current = None;
    assert_eq!(
        nft::sync(&nft, &mut current, rs.clone()).unwrap(),
        Applied::Replaced
    );
    assert_eq!(
        nft::sync(&nft, &mut current, rs.clone()).unwrap(),
        Applied::Unchanged
    );
    let counters = nft::read_counters(&nft, &rs).unwrap();
    assert_eq!(counters.len(), rs.rule_chains.len());
    assert!(counters.iter().all(|c| c.packets == 0));
    assert!(counters.iter().any(|c| c.rule.rule == "Deny-Database-All"));
    nft.delete_table(&t).unwrap();
    nft.delete_table(&t).unwrap();
    assert_eq!(nft.read_table(&t).unwrap(), None);
    assert!(nft::read_counters(&nft, &rs).unwrap().is_empty());
}

/// A failed element update (the table changed behind the agent's back) falls back to
/// replacing the table.
#[test]
fn sync_falls_back_to_replacing() {
    let fake = FakeNft::default();
    let inv = nft_support::examples::three_tier();
    let mut joined = inv.clone();
    joined.pods.push(nft_support::examples::pod(
        "shop",
        "web3",
        "web",
        &["10.244.1.12"],
        "node-1",
    ));
    let a = nft::compile(&Resolved::new(&inv), None);
    let b = nft::compile(&Resolved::new(&joined), None);
    let mut current = None;
    nft::sync(&fake, &mut current, a).unwrap();
    *fake.reject_containing.lock().unwrap() = Some("add element".into());
    assert_eq!(
        nft::sync(&fake, &mut current, b.clone()).unwrap(),
        Applied::Replaced
    );
    let scripts = fake.scripts();
    assert_eq!(scripts.len(), 2);
    assert_eq!(scripts[1], nft::render_replace(&b));
    assert_eq!(current, Some(b));
}
