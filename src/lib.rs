//! kube-nsg: Azure-style network security groups for Kubernetes.
//!
//! The pure core (`model`, `resolve`, `eval`, `effective`, `netpol`, `analyze`, `nft`) holds
//! the semantics; the shells around it (`api`, `cli`, `import`) talk to Kubernetes and files.

pub mod agent;
pub mod analyze;
pub mod api;
pub mod cli;
pub mod controller;
pub mod daemon;
pub mod effective;
pub mod eval;
pub mod import;
pub mod model;
pub mod netpol;
pub mod nft;
pub mod resolve;

/// The `kube-nsg` binary's global allocator (why: `main.rs`), named once so the benchmarks
/// that declare it too measure what the binary runs.
pub use tikv_jemallocator::Jemalloc as Allocator;
