//! The node's table as the agent keeps it: what it last applied, a fingerprint of what the
//! kernel held after that, and per-rule hit totals that survive table replacements.
//! Synchronous (it talks netlink, and runs `nft` to remove the table); the agent calls it from
//! a blocking task.
//! Tested with [`FakeNft`](crate::nft::FakeNft).
//!
//! Reading the kernel's table back (over netlink, [`crate::nft::netlink::read`]) costs a
//! millisecond for a small table and more for a very large one. So the cost of the last
//! reading decides how much the agent reads:
//! - a table that reads quickly is fingerprinted right after each apply (exact drift
//!   detection) and its counters are read just before a replacement (no hit is lost);
//! - a slow one is fingerprinted at the next counter poll, after checking that its chains and
//!   sets are the ones applied (drift of set elements in between goes unnoticed until the
//!   next change), and the hits counted since the last poll are lost when it is replaced: a
//!   policy change never waits for a read;
//! - the agent polls counters at most every ten times the read cost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{Direction, ObjectRef};
use crate::nft::{self, Applied, Nft, NftError, RuleCounter, RuleRef, Ruleset, TableState};

/// One NSG rule's identity in hit counts: its group, direction and name (the priority and
/// access are part of the rule, not of its identity: an edit that changes them keeps counting).
pub type HitKey = (ObjectRef, Direction, String);

/// A read slower than this is not done on the path of a sync.
pub const SLOW_READ: Duration = Duration::from_millis(100);

/// What one call of [`Dataplane::sync`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOutcome {
    pub applied: Applied,
    /// The kernel's table differed from what the agent last applied (edited or deleted by
    /// someone else), so it was replaced whole.
    pub drift_repaired: bool,
    /// The table was the last one updated for pod churn, not compiled anew.
    pub pod_update: bool,
}

/// What the agent knows of the kernel's table since its last apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// This fingerprint (counters zeroed).
    Fingerprint(u64),
    /// Not read since the apply: the next read is recorded if its chains and sets are
    /// the applied ones.
    Unverified,
    /// Unknown (a read failed): counts as drift.
    Unknown,
}

/// The agent's view of its one table.
pub struct Dataplane {
    nft: Arc<dyn Nft + Send + Sync>,
    table: String,
    /// What was last applied; `None` after a start or a failure: the next sync replaces the
    /// whole table (the table left by a previous agent keeps enforcing until then).
    current: Option<Ruleset>,
    known: Known,
    /// How long the last read took.
    read_cost: Duration,
    /// Hits counted so far, per rule, over every table this process applied.
    totals: BTreeMap<HitKey, u64>,
    /// The counters as last read from the kernel's current table.
    last_raw: BTreeMap<RuleRef, u64>,
}

impl Dataplane {
    pub fn new(nft: Arc<dyn Nft + Send + Sync>, table: impl Into<String>) -> Self {
        Dataplane {
            nft,
            table: table.into(),
            current: None,
            known: Known::Unknown,
            read_cost: Duration::ZERO,
            totals: BTreeMap::new(),
            last_raw: BTreeMap::new(),
        }
    }

    /// What was last applied successfully.
    pub fn current(&self) -> Option<&Ruleset> {
        self.current.as_ref()
    }

    /// How long the last reading of the table took.
    pub fn read_cost(&self) -> Duration {
        self.read_cost
    }

    fn slow(&self) -> bool {
        self.read_cost >= SLOW_READ
    }

    /// Brings the kernel to `new`: set elements only when only they differ, else one atomic
    /// replacement. A table that drifted since the last apply (checked when `check_drift`) is
    /// replaced whole. On an error the table in the kernel is left as it is (never removed);
    /// the next sync replaces it whole.
    pub fn sync(&mut self, new: Ruleset, check_drift: bool) -> Result<SyncOutcome, NftError> {
        let mut drift_repaired = false;
        let checked = check_drift && self.current.is_some();
        if checked {
            match self.read_back() {
                Ok(table) => {
                    self.count(table.as_ref());
                    if self.check(table.as_ref()) {
                        drift_repaired = true;
                        self.current = None;
                    }
                }
                Err(_) => self.current = None,
            }
        }
        let replacing = !self
            .current
            .as_ref()
            .is_some_and(|c| c.same_structure(&new));
        if replacing && self.current.is_some() && !checked && !self.slow() {
            // A replacement starts every counter from zero: take what the old table counted
            // (the drift check just did).
            if let Ok(table) = self.read_back() {
                self.count(table.as_ref());
            }
        }
        let applied = match nft::sync(&*self.nft, &mut self.current, new) {
            Ok(a) => a,
            Err(e) => {
                self.current = None;
                self.known = Known::Unknown;
                return Err(e);
            }
        };
        if applied == Applied::Replaced {
            self.last_raw.clear();
        }
        if applied != Applied::Unchanged || self.known == Known::Unknown {
            self.known = Known::Unverified;
            if !self.slow() {
                // What the kernel holds now, to tell drift from our own changes later.
                match self.read_back() {
                    Ok(table) => {
                        self.check(table.as_ref());
                    }
                    Err(_) => self.known = Known::Unknown,
                }
            }
        }
        Ok(SyncOutcome {
            applied,
            drift_repaired,
            pod_update: false,
        })
    }

    /// Reads the kernel's counters and returns the hit totals of every rule of the current
    /// table (zero for rules that never matched) and of rules seen earlier in this process.
    /// Also answers whether the table drifted from what was applied.
    pub fn read_hits(&mut self) -> Result<(BTreeMap<HitKey, u64>, bool), NftError> {
        let table = self.read_back()?;
        self.count(table.as_ref());
        let drifted = self.current.is_some() && self.check(table.as_ref());
        Ok((self.totals.clone(), drifted))
    }

    /// The hit totals without reading the kernel.
    pub fn totals(&self) -> &BTreeMap<HitKey, u64> {
        &self.totals
    }

    /// Removes the table (idempotent): what `--cleanup` does.
    pub fn remove(&mut self) -> Result<(), NftError> {
        self.nft.delete_table(&self.table)?;
        self.current = None;
        self.known = Known::Unknown;
        self.last_raw.clear();
        Ok(())
    }

    /// Whether the table read drifted from what the last apply left. An unverified table
    /// is recorded when its chains and sets are the applied ones (else it drifted).
    fn check(&mut self, table: Option<&TableState>) -> bool {
        let print = table.map(|t| t.fingerprint);
        match self.known {
            Known::Fingerprint(f) => print != Some(f),
            Known::Unknown => true,
            Known::Unverified => {
                let same = match (table, self.current.as_ref()) {
                    (Some(l), Some(rs)) => same_names(l, rs),
                    _ => false,
                };
                self.known = match (same, print) {
                    (true, Some(f)) => Known::Fingerprint(f),
                    _ => Known::Unknown,
                };
                !same
            }
        }
    }

    fn read_back(&mut self) -> Result<Option<TableState>, NftError> {
        let start = Instant::now();
        let table = self.nft.read_table(&self.table);
        self.read_cost = start.elapsed();
        table
    }

    /// Adds what the kernel's counters gained since the last read to the totals. A counter
    /// that went down belongs to a table someone else replaced: it counts from zero.
    fn count(&mut self, table: Option<&TableState>) {
        let (Some(state), Some(current)) = (table, self.current.as_ref()) else {
            return;
        };
        let mut now: BTreeMap<RuleRef, u64> = BTreeMap::new();
        for RuleCounter { rule, packets, .. } in nft::rule_counters(state, current) {
            *now.entry(rule).or_default() += packets;
        }
        for (rule, &packets) in &now {
            let last = self.last_raw.get(rule).copied().unwrap_or(0);
            let delta = if packets >= last {
                packets - last
            } else {
                packets
            };
            *self.totals.entry(hit_key(rule)).or_default() += delta;
        }
        for rule in current.rule_chains.values() {
            self.totals.entry(hit_key(rule)).or_default();
        }
        self.last_raw = now;
    }
}

fn hit_key(r: &RuleRef) -> HitKey {
    (r.nsg.clone(), r.direction, r.rule.clone())
}

/// Whether a table read has exactly the chains and sets of `rs`.
fn same_names(table: &TableState, rs: &Ruleset) -> bool {
    let same = |read: &BTreeSet<String>, applied: BTreeSet<&String>| read.iter().eq(applied);
    same(&table.chains, rs.chains.iter().map(|c| &c.name).collect())
        && same(&table.sets, rs.sets.iter().map(|s| &s.name).collect())
}
