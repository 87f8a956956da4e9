//! Applying tables and element updates (over netlink; scripts through `nft`), and reading
//! the table back (over netlink): its fingerprint and per-rule counters. Synchronous: the
//! agent calls it from a blocking task.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use super::netlink;
use super::render::{ElementUpdate, Update, render_delete, render_replace, render_update};
use super::ruleset::{RuleRef, Ruleset};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {program:?} (is the nftables package installed?): {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("nft rejected the script ({status}): {stderr}")]
    Rejected { status: String, stderr: String },
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    #[error("the kernel rejected {what} (nothing was changed): {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
}

/// The kernel's nftables as the agent uses it.
pub trait Nft {
    /// Runs `script` as `nft -f` does: one transaction, all or nothing.
    fn apply(&self, script: &str) -> Result<(), NftError>;
    /// Makes the table exactly `rs` in one transaction; by default as its script.
    fn replace(&self, rs: &Ruleset) -> Result<(), NftError> {
        self.apply(&render_replace(rs))
    }
    /// Applies an element-only update in one transaction; by default as its script.
    fn apply_elements(&self, update: &ElementUpdate) -> Result<(), NftError> {
        self.apply(&update.script())
    }
    /// Removes table `inet TABLE`, if it is there; by default as its script.
    fn delete_table(&self, table: &str) -> Result<(), NftError> {
        self.apply(&render_delete(table))
    }
    /// Reads table `inet TABLE` back; `None` when there is no such table.
    fn read_table(&self, table: &str) -> Result<Option<TableState>, NftError>;
}

/// What the agent reads back of its table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableState {
    /// A hash of everything in the table but its counters' values: it stays the same as long
    /// as nobody changes the table.
    pub fingerprint: u64,
    pub chains: BTreeSet<String>,
    /// The named sets and maps (not the anonymous sets of rules).
    pub sets: BTreeSet<String>,
    /// Every counter of a rule: its chain, packets and bytes.
    pub counters: Vec<(String, u64, u64)>,
}

/// The real thing: tables, element updates and reading go over netlink, scripts through the
/// `nft` program.
#[derive(Debug, Clone)]
pub struct NftCommand {
    pub program: String,
    /// `nft -c`: the kernel checks the transaction and discards it.
    pub check_only: bool,
}

impl Default for NftCommand {
    fn default() -> Self {
        NftCommand {
            program: "nft".into(),
            check_only: false,
        }
    }
}

impl NftCommand {
    /// Sends a change over netlink (`send`; `None` when it cannot be encoded), or runs its
    /// `script` through `nft -f`: in check mode (`-c`), for what cannot be encoded, and for a
    /// batch too large for the socket's send buffer (without CAP_NET_ADMIN).
    fn netlink_or_script(
        &self,
        send: impl FnOnce() -> Option<Result<(), NftError>>,
        script: impl FnOnce() -> String,
    ) -> Result<(), NftError> {
        match (!self.check_only).then(send).flatten() {
            Some(Err(NftError::Netlink(e))) if e.raw_os_error() == Some(netlink::EMSGSIZE) => {
                self.apply(&script())
            }
            Some(done) => done,
            None => self.apply(&script()),
        }
    }

    pub fn check() -> Self {
        NftCommand {
            check_only: true,
            ..Default::default()
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<Output, NftError> {
        let spawn_err = |source| NftError::Spawn {
            program: self.program.clone(),
            source,
        };
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(text) = stdin {
            // A write error (nft exited early) shows in its exit status and stderr.
            let _ = child
                .stdin
                .take()
                .expect("piped")
                .write_all(text.as_bytes());
        }
        child.wait_with_output().map_err(spawn_err)
    }
}

fn rejected(out: &Output) -> NftError {
    NftError::Rejected {
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

impl Nft for NftCommand {
    fn apply(&self, script: &str) -> Result<(), NftError> {
        let args: &[&str] = if self.check_only {
            &["-c", "-f", "-"]
        } else {
            &["-f", "-"]
        };
        let out = self.run(args, Some(script))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(rejected(&out))
        }
    }

    /// Over netlink: nft would spend longer parsing a large table's text than the kernel
    /// takes to load it.
    fn replace(&self, rs: &Ruleset) -> Result<(), NftError> {
        self.netlink_or_script(|| Some(netlink::replace(rs)), || render_replace(rs))
    }

    /// Over netlink, which skips nft's cache of every interval set in the ruleset.
    fn apply_elements(&self, update: &ElementUpdate) -> Result<(), NftError> {
        self.netlink_or_script(
            || netlink::ops(update).map(|ops| netlink::apply(&update.table, &ops)),
            || update.script(),
        )
    }

    fn delete_table(&self, table: &str) -> Result<(), NftError> {
        self.netlink_or_script(
            || Some(netlink::delete_table(table)),
            || render_delete(table),
        )
    }

    fn read_table(&self, table: &str) -> Result<Option<TableState>, NftError> {
        netlink::read(table)
    }
}

/// Records scripts instead of running them, for unit tests of code that applies.
#[derive(Debug, Default)]
pub struct FakeNft {
    pub scripts: Mutex<Vec<String>>,
    /// What `read_table` answers.
    pub table: Mutex<Option<TableState>>,
    /// Reject every script whose text contains this (to test fallbacks).
    pub reject_containing: Mutex<Option<String>>,
}

impl FakeNft {
    pub fn scripts(&self) -> Vec<String> {
        self.scripts.lock().unwrap().clone()
    }
}

impl Nft for FakeNft {
    fn apply(&self, script: &str) -> Result<(), NftError> {
        if let Some(bad) = self.reject_containing.lock().unwrap().as_deref()
            && script.contains(bad)
        {
            return Err(NftError::Rejected {
                status: "exit status: 1".into(),
                stderr: format!("fake: rejects {bad:?}"),
            });
        }
        self.scripts.lock().unwrap().push(script.to_string());
        Ok(())
    }

    fn read_table(&self, _table: &str) -> Result<Option<TableState>, NftError> {
        Ok(self.table.lock().unwrap().clone())
    }
}

/// How a sync changed the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Elements,
    Replaced,
}

/// Brings the kernel from `current` (what was last applied; `None` after a start) to `new`,
/// by element updates when only elements differ, else by one atomic replacement. An element
/// update that fails (someone changed the table behind our back) falls back to replacing.
/// On success `current` becomes `new`.
pub fn sync(
    nft: &dyn Nft,
    current: &mut Option<Ruleset>,
    new: Ruleset,
) -> Result<Applied, NftError> {
    let applied = match render_update(current.as_ref(), &new) {
        Update::Unchanged => Applied::Unchanged,
        Update::Elements(update) if nft.apply_elements(&update).is_ok() => Applied::Elements,
        Update::Elements(_) | Update::Replace => {
            *current = None;
            nft.replace(&new)?;
            Applied::Replaced
        }
    };
    *current = Some(new);
    Ok(applied)
}

/// How often one NSG rule decided a new flow on this node since the table was last replaced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuleCounter {
    pub rule: RuleRef,
    pub packets: u64,
    pub bytes: u64,
}

/// The counters of the rules of `rs` in a table read back.
pub fn rule_counters(state: &TableState, rs: &Ruleset) -> Vec<RuleCounter> {
    let mut out: Vec<RuleCounter> = state
        .counters
        .iter()
        .filter_map(|(chain, packets, bytes)| {
            Some(RuleCounter {
                rule: rs.rule_chains.get(chain)?.clone(),
                packets: *packets,
                bytes: *bytes,
            })
        })
        .collect();
    out.sort_by(|a, b| a.rule.cmp(&b.rule));
    out
}

/// Reads the per-rule counters of the table `rs` was applied as (empty without the table).
pub fn read_counters(nft: &dyn Nft, rs: &Ruleset) -> Result<Vec<RuleCounter>, NftError> {
    Ok(nft
        .read_table(&rs.table)?
        .map(|state| rule_counters(&state, rs))
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Access, Direction, ObjectRef};
    use crate::nft::ruleset::Ruleset;

    #[test]
    fn counters_are_read_per_rule_chain() {
        let rref = RuleRef {
            nsg: ObjectRef::new("shop", "shop-subnet"),
            direction: Direction::Inbound,
            rule: "Deny-Database-All".into(),
            priority: 120,
            access: Access::Deny,
        };
        let rs = Ruleset {
            table: "kube-nsg".into(),
            sets: vec![],
            chains: vec![],
            rule_chains: [("in/shop/shop-subnet/120".to_string(), rref.clone())].into(),
        };
        let state = TableState {
            counters: vec![
                ("forward".into(), 99, 1),
                ("in/shop/shop-subnet/120".into(), 3, 180),
            ],
            ..TableState::default()
        };
        let counters = rule_counters(&state, &rs);
        assert_eq!(
            counters,
            vec![RuleCounter {
                rule: rref,
                packets: 3,
                bytes: 180
            }]
        );
    }

    #[test]
    fn the_fake_records_and_rejects() {
        let fake = FakeNft::default();
        fake.apply("add element inet t s { 1.2.3.4 }").unwrap();
        *fake.reject_containing.lock().unwrap() = Some("delete".into());
        assert!(matches!(
            fake.delete_table("t"),
            Err(NftError::Rejected { .. })
        ));
        assert_eq!(fake.scripts().len(), 1);
    }
}
