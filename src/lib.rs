//! kube-nsg: Azure-style network security groups for Kubernetes.
//!
//! The pure core (`model`, `resolve`, `eval`, `nft`) holds the semantics; the shells around it
//! talk to Kubernetes.

pub mod eval;
pub mod model;
pub mod resolve;
pub mod nft;
