//! Shared by the nftables tests and benchmarks: example inventories, an interpreter of the
//! compiled `Ruleset`, and network-namespace pods.
#![allow(dead_code)] // each test binary uses its own part of this module

pub mod bench;
pub mod examples;
pub mod netns;
pub mod vm;
