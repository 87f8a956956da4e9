//! Golden tests of the rendered table for the examples: the text is the interface a person
//! reads with `nft list table`, so changes to it must be deliberate.
//! `UPDATE_GOLDEN=1 cargo test --test nft_golden` rewrites the files.

mod nft_support;

use std::path::PathBuf;

use kube_nsg::model::{ASG_ANNOTATION, Inventory};
use kube_nsg::nft::{self, CompileOptions, Layout, Update};
use kube_nsg::resolve::Resolved;

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    if expected != actual {
        let diff_at = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b);
        panic!(
            "{} differs from the rendered text (first differing line: {:?}); \
             run with UPDATE_GOLDEN=1 if the change is intended.\n--- rendered ---\n{actual}",
            path.display(),
            diff_at.map(|i| i + 1)
        );
    }
}

fn compile(inv: &Inventory, layout: Layout) -> nft::Ruleset {
    nft::compile_with(
        &Resolved::new(inv),
        Some("node-1"),
        &CompileOptions {
            layout,
            ..Default::default()
        },
    )
}

#[test]
fn three_tier_maps() {
    golden(
        "three_tier.maps.nft",
        &nft::render(&compile(&nft_support::examples::three_tier(), Layout::Maps)),
    );
}

#[test]
fn three_tier_linear() {
    golden(
        "three_tier.linear.nft",
        &nft::render(&compile(
            &nft_support::examples::three_tier(),
            Layout::Linear,
        )),
    );
}

/// A second web server joins: only elements change.
#[test]
fn three_tier_pod_joins_an_asg() {
    let before = nft_support::examples::three_tier();
    let mut after = before.clone();
    let mut web3 = nft_support::examples::pod("shop", "web3", "web", &["10.244.1.12"], "node-1");
    web3.annotations
        .insert(ASG_ANNOTATION.into(), "asg-web".into());
    after.pods.push(web3);
    let update = nft::render_update(
        Some(&compile(&before, Layout::Maps)),
        &compile(&after, Layout::Maps),
    );
    let Update::Elements(update) = update else {
        panic!("expected an element update, got {update:?}")
    };
    golden("three_tier.web3_joins.nft", &update.script());
}

/// A new rule changes chains: the whole table is replaced in one transaction.
#[test]
fn three_tier_rule_added_replaces_the_table() {
    let before = nft_support::examples::three_tier();
    let mut after = before.clone();
    let mut extra = after.nsgs[0].rules[0].clone();
    extra.name = "Allow-HTTPS-Inbound-Internet".into();
    extra.priority = 105;
    extra.destination_ports = vec!["443".parse().unwrap()];
    after.nsgs[0].rules.push(extra);
    let new = compile(&after, Layout::Maps);
    let update = nft::render_update(Some(&compile(&before, Layout::Maps)), &new);
    assert_eq!(update, Update::Replace);
    let script = nft::render_replace(&new);
    assert!(
        script.starts_with(
            "table inet kube-nsg\ndelete table inet kube-nsg\ntable inet kube-nsg {\n"
        )
    );
    assert!(script.contains("Allow-HTTPS-Inbound-Internet (inbound 105): allow"));
}
