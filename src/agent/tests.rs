//! The sync loop and the dataplane against `FakeNft`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use tokio::sync::Notify;

use super::*;
use crate::model::Inventory;
use crate::nft::FakeNft;
use crate::resolve::Resolved;

fn three_tier() -> Inventory {
    let objects = crate::cli::load::Objects::read(&[std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/three-tier"
    ))])
    .unwrap();
    let mut inv = objects
        .into_inventory(
            &["10.244.0.0/16".parse().unwrap()],
            &["10.255.0.1".parse().unwrap()],
        )
        .unwrap();
    for p in &mut inv.pods {
        p.node_name = Some("node-1".into());
    }
    for n in &mut inv.nsgs {
        n.generation = Some(4);
    }
    inv
}

struct FakeSource {
    changed: Notify,
    inv: StdMutex<Option<Inventory>>,
}

impl FakeSource {
    fn new(inv: Option<Inventory>) -> Arc<Self> {
        Arc::new(FakeSource {
            changed: Notify::new(),
            inv: StdMutex::new(inv),
        })
    }
    fn set(&self, inv: Option<Inventory>) {
        *self.inv.lock().unwrap() = inv;
        self.changed.notify_one();
    }
}

impl Source for FakeSource {
    fn changed(&self) -> &Notify {
        &self.changed
    }
    fn inventory(&self) -> Option<Inventory> {
        self.inv.lock().unwrap().clone()
    }
}

fn agent(fake: &Arc<FakeNft>) -> Agent {
    Agent::new(
        "node-1".into(),
        fake.clone(),
        CompileOptions::default(),
        Arc::new(metrics::AgentMetrics::new()),
    )
}

/// The applied table as the fake reads it back: what the fingerprint and the counters come
/// from (the fingerprint of a table is a hash of its text).
fn read_back(rs: &Ruleset, packets: &BTreeMap<&str, u64>) -> TableState {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut print = DefaultHasher::new();
    crate::nft::render(rs).hash(&mut print);
    TableState {
        fingerprint: print.finish(),
        chains: rs.chains.iter().map(|c| c.name.clone()).collect(),
        sets: rs.sets.iter().map(|s| s.name.clone()).collect(),
        counters: rs
            .rule_chains
            .iter()
            .map(|(chain, rref)| {
                let n = packets.get(rref.rule.as_str()).copied().unwrap_or(0);
                (chain.clone(), n, n * 60)
            })
            .collect(),
    }
}

use crate::nft::{Ruleset, TableState};

#[test]
fn syncs_replace_then_update_elements_and_count_across_replacements() {
    let fake = Arc::new(FakeNft::default());
    let a = agent(&fake);
    let inv = three_tier();
    let rs = nft::compile(&Resolved::new(&inv), Some("node-1"));
    *fake.table.lock().unwrap() = Some(read_back(&rs, &BTreeMap::new()));
    let out = a.sync_blocking(inv.clone(), false).unwrap();
    assert_eq!(out.applied, Applied::Replaced);
    assert!(fake.scripts()[0].starts_with("table inet kube-nsg\ndelete table inet kube-nsg\n"));
    *fake.table.lock().unwrap() = Some(read_back(&rs, &BTreeMap::from([("Deny-Database-All", 3)])));
    assert_eq!(
        a.sync_blocking(inv.clone(), true).unwrap().applied,
        Applied::Unchanged
    );

    // A new web pod: elements only.
    let mut joined = inv.clone();
    let mut web3 = joined.pods[0].clone();
    web3.id.name = "web3".into();
    web3.ips = vec!["10.244.1.13".parse().unwrap()];
    joined.pods.push(web3);
    let out = a.sync_blocking(joined.clone(), false).unwrap();
    assert_eq!(
        out.applied,
        Applied::Elements,
        "{:?}",
        fake.scripts().last()
    );
    assert!(fake.scripts().last().unwrap().contains("add element"));

    let (hits, drifted) = a.dataplane.lock().unwrap().read_hits().unwrap();
    let deny = (
        ObjectRef::new("three-tier", "nsg1"),
        crate::model::Direction::Inbound,
        "Deny-Database-All".to_string(),
    );
    assert_eq!(hits[&deny], 3);
    assert!(!drifted);
    *fake.table.lock().unwrap() = Some(read_back(&rs, &BTreeMap::from([("Deny-Database-All", 5)])));

    // A changed rule set replaces the table; what the old one counted is kept.
    let mut edited = joined.clone();
    edited.nsgs[0].rules.retain(|r| r.priority != 100);
    let rs2 = nft::compile(&Resolved::new(&edited), Some("node-1"));
    let out = a.sync_blocking(edited.clone(), false).unwrap();
    assert_eq!(out.applied, Applied::Replaced);
    // The fake does not reset counters: read the new table as the kernel would give it.
    *fake.table.lock().unwrap() =
        Some(read_back(&rs2, &BTreeMap::from([("Deny-Database-All", 1)])));
    let (hits, _) = a.dataplane.lock().unwrap().read_hits().unwrap();
    assert_eq!(hits[&deny], 6, "5 from the old table, 1 from the new");
}

#[test]
fn drift_is_repaired_by_a_replacement() {
    let fake = Arc::new(FakeNft::default());
    let a = agent(&fake);
    let inv = three_tier();
    a.sync_blocking(inv.clone(), false).unwrap();
    let rs = a.dataplane.lock().unwrap().current().unwrap().clone();
    // The fake had no table to read when the sync ran: the fingerprint is of "no table".
    *fake.table.lock().unwrap() = Some(read_back(&rs, &BTreeMap::new()));
    let out = a.sync_blocking(inv.clone(), true).unwrap();
    assert_eq!(out.applied, Applied::Replaced);
    assert!(out.drift_repaired);
    // Now it matches; counter values alone are no drift.
    *fake.table.lock().unwrap() = Some(read_back(&rs, &BTreeMap::from([("Deny-Database-All", 9)])));
    let out = a.sync_blocking(inv.clone(), true).unwrap();
    assert_eq!(out.applied, Applied::Unchanged);
    assert!(!out.drift_repaired);
    // Someone deleted the table.
    *fake.table.lock().unwrap() = None;
    let (_, drifted) = a.dataplane.lock().unwrap().read_hits().unwrap();
    assert!(drifted);
    let out = a.sync_blocking(inv.clone(), true).unwrap();
    assert!(out.drift_repaired);
    assert_eq!(out.applied, Applied::Replaced);
}

#[test]
fn a_failed_apply_keeps_the_table_and_the_next_sync_replaces_it() {
    let fake = Arc::new(FakeNft::default());
    let a = agent(&fake);
    let inv = three_tier();
    *fake.reject_containing.lock().unwrap() = Some("table".into());
    assert!(a.sync_blocking(inv.clone(), false).is_err());
    assert!(
        fake.scripts().is_empty(),
        "nothing applied, nothing deleted"
    );
    *fake.reject_containing.lock().unwrap() = None;
    assert_eq!(
        a.sync_blocking(inv.clone(), false).unwrap().applied,
        Applied::Replaced
    );
    assert!(
        fake.scripts()
            .iter()
            .all(|s| !s.trim_end().ends_with("delete table inet kube-nsg"))
    );
}

#[test]
fn cleanup_removes_the_table_and_is_idempotent() {
    let fake = Arc::new(FakeNft::default());
    let mut dp = Dataplane::new(fake.clone(), "kube-nsg");
    dp.remove().unwrap();
    dp.remove().unwrap();
    assert_eq!(
        fake.scripts(),
        vec!["table inet kube-nsg\ndelete table inet kube-nsg\n"; 2]
    );
}

#[tokio::test]
async fn the_loop_waits_for_the_inputs_debounces_and_resyncs() {
    let fake = Arc::new(FakeNft::default());
    let a = agent(&fake);
    let source = FakeSource::new(None);
    let settings = LoopSettings {
        debounce: Duration::from_millis(50),
        resync_interval: Duration::from_millis(1500),
    };
    let (stop_tx, task) = spawn_loop(&a, &source, settings);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        fake.scripts().is_empty(),
        "nothing before the inputs are complete"
    );
    assert!(a.programmed.borrow().is_none());

    // The same view twice: one sync.
    let inv = three_tier();
    source.set(Some(inv.clone()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    source.set(Some(inv.clone()));
    wait_for(|| fake.scripts().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.scripts().len(), 1);
    assert_eq!(
        a.programmed.borrow().clone().unwrap(),
        BTreeMap::from([(ObjectRef::new("three-tier", "nsg1"), 4)])
    );

    // The same view again: no nft call.
    source.set(Some(inv.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.scripts().len(), 1);

    // The resync checks the kernel: the fake lists no table, so it is put back.
    wait_for(|| fake.scripts().len() == 2).await;

    // Inputs unavailable again (never in practice once synced): nothing is removed.
    source.set(None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.scripts().len(), 2);
    stop_tx.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_change_after_a_quiet_spell_applies_at_once_and_a_burst_coalesces() {
    let fake = Arc::new(FakeNft::default());
    let a = agent(&fake);
    // Views whose tables differ: the first rule's priority moved.
    let view = |shift: u32| {
        let mut inv = three_tier();
        inv.nsgs[0].rules[0].priority += shift;
        Some(inv)
    };
    let source = FakeSource::new(view(0));
    let debounce = Duration::from_secs(1);
    let settings = LoopSettings {
        debounce,
        resync_interval: Duration::from_secs(3600),
    };
    let (stop_tx, task) = spawn_loop(&a, &source, settings);
    wait_for(|| fake.scripts().len() == 1).await;

    // After a quiet spell longer than the debounce, a change does not wait for it.
    tokio::time::sleep(debounce + Duration::from_millis(200)).await;
    let changed = std::time::Instant::now();
    source.set(view(1));
    wait_for(|| fake.scripts().len() == 2).await;
    assert!(changed.elapsed() < debounce, "{:?}", changed.elapsed());

    // Two changes right after that sync wait out the debounce and make one sync.
    source.set(view(2));
    source.set(view(3));
    tokio::time::sleep(debounce / 2).await;
    assert_eq!(fake.scripts().len(), 2, "waiting out the debounce");
    wait_for(|| fake.scripts().len() == 3).await;
    tokio::time::sleep(debounce + Duration::from_millis(200)).await;
    assert_eq!(fake.scripts().len(), 3);
    let last = fake.scripts().pop().unwrap();
    let expected = nft::render_replace(&nft::compile_with(
        &Resolved::new(&view(3).unwrap()),
        Some("node-1"),
        &CompileOptions::default(),
    ));
    assert_eq!(last, expected, "the burst's last view is applied");
    stop_tx.send(()).unwrap();
    task.await.unwrap();
}

/// Runs the agent's loop on `source` until the sender is used (or dropped).
fn spawn_loop(
    a: &Agent,
    source: &Arc<FakeSource>,
    settings: LoopSettings,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let a = a.clone();
    let src: Arc<dyn Source> = source.clone();
    let task = tokio::spawn(async move {
        a.run_loop(&*src, settings, async {
            let _ = stop_rx.await;
        })
        .await
    });
    (stop_tx, task)
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}

/// A fake whose readings take time, counting them.
struct SlowNft {
    inner: FakeNft,
    delay: Duration,
    readings: std::sync::atomic::AtomicUsize,
}

impl crate::nft::Nft for SlowNft {
    fn apply(&self, script: &str) -> Result<(), crate::nft::NftError> {
        self.inner.apply(script)
    }
    fn read_table(&self, table: &str) -> Result<Option<TableState>, crate::nft::NftError> {
        self.readings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(self.delay);
        self.inner.read_table(table)
    }
}

#[test]
fn a_slow_table_is_not_listed_on_the_sync_path_and_is_verified_at_the_next_poll() {
    let slow = Arc::new(SlowNft {
        inner: FakeNft::default(),
        delay: dataplane::SLOW_READ + Duration::from_millis(20),
        readings: Default::default(),
    });
    let readings = || slow.readings.load(std::sync::atomic::Ordering::Relaxed);
    let mut dp = Dataplane::new(slow.clone(), "kube-nsg");
    let inv = three_tier();
    let rs = nft::compile(&Resolved::new(&inv), Some("node-1"));
    *slow.inner.table.lock().unwrap() = Some(read_back(&rs, &BTreeMap::new()));
    dp.sync(rs.clone(), false).unwrap();
    assert_eq!(
        readings(),
        1,
        "the first apply is read back: its cost is not known yet"
    );
    assert!(dp.read_cost() >= dataplane::SLOW_READ);

    let mut edited = inv.clone();
    edited.nsgs[0].rules.retain(|r| r.priority != 100);
    let rs2 = nft::compile(&Resolved::new(&edited), Some("node-1"));
    assert_eq!(
        dp.sync(rs2.clone(), false).unwrap().applied,
        Applied::Replaced
    );
    assert_eq!(readings(), 1, "no reading before or after the replacement");

    // The next poll records the table (its chains and sets are the applied ones).
    *slow.inner.table.lock().unwrap() = Some(read_back(&rs2, &BTreeMap::new()));
    let (_, drifted) = dp.read_hits().unwrap();
    assert!(!drifted);
    let (_, drifted) = dp.read_hits().unwrap();
    assert!(!drifted, "recorded");
    // Someone puts the old table back: drift.
    *slow.inner.table.lock().unwrap() = Some(read_back(&rs, &BTreeMap::new()));
    let (_, drifted) = dp.read_hits().unwrap();
    assert!(drifted);
}

#[test]
fn pod_churn_updates_the_last_table_and_a_drift_check_compiles_in_full() {
    let fake = Arc::new(FakeNft::default());
    let a = agent(&fake);
    let mut inv = three_tier();
    let pod =
        |inv: &Inventory, name: &str| inv.pods.iter().position(|p| p.id.name == name).unwrap();
    let logic1 = pod(&inv, "logic1");
    inv.pods[logic1].node_name = Some("node-2".into());
    assert!(!a.sync_blocking(inv.clone(), false).unwrap().pod_update);

    // logic1, on another node, joins asgweb: the web rules now hold for it as a peer.
    let mut joined = inv.clone();
    joined.pods[logic1]
        .annotations
        .insert(crate::model::ASG_ANNOTATION.into(), "asgweb".into());
    let out = a.sync_blocking(joined.clone(), false).unwrap();
    assert!(out.pod_update);
    assert_eq!(out.applied, Applied::Elements);
    let full = nft::compile(&Resolved::new(&joined), Some("node-1"));
    assert_eq!(a.dataplane.lock().unwrap().current(), Some(&full));

    // web2 leaves the node: its dispatch elements go.
    let mut moved = joined.clone();
    let web2 = pod(&moved, "web2");
    moved.pods[web2].node_name = Some("node-2".into());
    let out = a.sync_blocking(moved.clone(), false).unwrap();
    assert!(out.pod_update);
    assert_eq!(out.applied, Applied::Elements);
    assert!(fake.scripts().last().unwrap().contains("delete element"));

    // A drift check compiles in full, as does a changed group.
    assert!(!a.sync_blocking(moved.clone(), true).unwrap().pod_update);
    let mut edited = moved.clone();
    edited.nsgs[0].rules.retain(|r| r.priority != 100);
    assert!(!a.sync_blocking(edited, false).unwrap().pod_update);
}
