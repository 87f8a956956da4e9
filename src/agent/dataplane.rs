//! The node's table as the agent keeps it: what it last applied, a fingerprint of what the
//! kernel held right after, and per-rule hit totals that survive table replacements.
//! Synchronous (it runs `nft`); the agent calls it from a blocking task. Tested with
//! [`FakeNft`](crate::nft::FakeNft).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::model::{Direction, ObjectRef};
use crate::nft::{self, Applied, Nft, NftError, RuleCounter, RuleRef, Ruleset};

/// One NSG rule's identity in hit counts: its group, direction and name (the priority and
/// access are part of the rule, not of its identity: an edit that changes them keeps counting).
pub type HitKey = (ObjectRef, Direction, String);

/// What one call of [`Dataplane::sync`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOutcome {
    pub applied: Applied,
    /// The kernel's table differed from what the agent last applied (edited or deleted by
    /// someone else), so it was replaced whole.
    pub drift_repaired: bool,
}

/// The agent's view of its one table.
pub struct Dataplane {
    nft: Arc<dyn Nft + Send + Sync>,
    table: String,
    /// What was last applied; `None` after a start or a failure: the next sync replaces the
    /// whole table (the table left by a previous agent keeps enforcing until then).
    current: Option<Ruleset>,
    /// Fingerprint of the kernel's table (counters zeroed) right after the last apply.
    fingerprint: Option<u64>,
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
            fingerprint: None,
            totals: BTreeMap::new(),
            last_raw: BTreeMap::new(),
        }
    }

    /// What was last applied successfully.
    pub fn current(&self) -> Option<&Ruleset> {
        self.current.as_ref()
    }

    /// Brings the kernel to `new`: set elements only when only they differ, else one atomic
    /// replacement. A table that drifted since the last apply (checked when `check_drift`) is
    /// replaced whole. On an error the table in the kernel is left as it is (never removed);
    /// the next sync replaces it whole.
    pub fn sync(&mut self, new: Ruleset, check_drift: bool) -> Result<SyncOutcome, NftError> {
        let mut drift_repaired = false;
        if check_drift && self.current.is_some() {
            match self.listing() {
                Ok(listing) => {
                    self.count(listing.as_deref());
                    if self.drifted(listing.as_deref()) {
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
        if replacing && self.current.is_some() {
            // A replacement starts every counter from zero: take what the old table counted.
            if let Ok(listing) = self.listing() {
                self.count(listing.as_deref());
            }
        }
        let result = nft::sync(&*self.nft, &mut self.current, new);
        let applied = match result {
            Ok(a) => a,
            Err(e) => {
                self.current = None;
                self.fingerprint = None;
                return Err(e);
            }
        };
        if applied == Applied::Replaced {
            self.last_raw.clear();
        }
        if applied != Applied::Unchanged || self.fingerprint.is_none() {
            // What the kernel holds now, to tell drift from our own changes later. A failed
            // listing leaves no fingerprint: the next drift check replaces the table.
            self.fingerprint = self.listing().ok().and_then(|l| fingerprint(l.as_deref()));
        }
        Ok(SyncOutcome {
            applied,
            drift_repaired,
        })
    }

    /// Reads the kernel's counters and returns the hit totals of every rule of the current
    /// table (zero for rules that never matched) and of rules seen earlier in this process.
    /// Also answers whether the table drifted from what was applied.
    pub fn read_hits(&mut self) -> Result<(BTreeMap<HitKey, u64>, bool), NftError> {
        let listing = self.listing()?;
        self.count(listing.as_deref());
        let drifted = self.current.is_some() && self.drifted(listing.as_deref());
        Ok((self.totals.clone(), drifted))
    }

    /// The hit totals without reading the kernel.
    pub fn totals(&self) -> &BTreeMap<HitKey, u64> {
        &self.totals
    }

    /// Removes the table (idempotent): what `--cleanup` does.
    pub fn remove(&mut self) -> Result<(), NftError> {
        nft::delete_table(&*self.nft, &self.table)?;
        self.current = None;
        self.fingerprint = None;
        self.last_raw.clear();
        Ok(())
    }

    /// Whether the kernel's table (as listed) is not what the last apply left; an unknown
    /// fingerprint counts as drift.
    fn drifted(&self, listing: Option<&str>) -> bool {
        self.fingerprint.is_none() || fingerprint(listing) != self.fingerprint
    }

    fn listing(&self) -> Result<Option<String>, NftError> {
        self.nft.list_table_json(&self.table)
    }

    /// Adds what the kernel's counters gained since the last read to the totals. A counter
    /// that went down belongs to a table someone else replaced: it counts from zero.
    fn count(&mut self, listing: Option<&str>) {
        let (Some(json), Some(current)) = (listing, self.current.as_ref()) else {
            return;
        };
        let Ok(counters) = nft::parse_counters(json, current) else {
            return;
        };
        let mut now: BTreeMap<RuleRef, u64> = BTreeMap::new();
        for RuleCounter { rule, packets, .. } in counters {
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

/// A hash of `nft -j list table` output with every counter value zeroed: equal as long as
/// nobody but the agent changed the table. `None` for no table.
pub fn fingerprint(listing: Option<&str>) -> Option<u64> {
    let mut doc: serde_json::Value = serde_json::from_str(listing?).ok()?;
    if let Some(items) = doc.get_mut("nftables").and_then(|v| v.as_array_mut()) {
        items.retain(|item| item.get("metainfo").is_none());
    }
    zero_counters(&mut doc);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    doc.to_string().hash(&mut h);
    Some(h.finish())
}

fn zero_counters(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "counter" {
                    *child = serde_json::Value::Null;
                } else {
                    zero_counters(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(zero_counters),
        _ => {}
    }
}
