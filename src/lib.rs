//! kube-nsg: Azure-style network security groups for Kubernetes.
//!
//! The pure core (`model`, `resolve`, `eval`) holds the semantics; the shells around it
//! talk to Kubernetes.

pub mod api;
pub mod cli;
pub mod effective;
pub mod eval;
pub mod import;
pub mod model;
pub mod resolve;
