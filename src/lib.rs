//! kube-nsg: Azure-style network security groups for Kubernetes.
//!
//! The pure core (`model`, `resolve`, `eval`, `netpol`, `analyze`) holds the semantics; the
//! shells around it talk to Kubernetes.

pub mod analyze;
pub mod api;
pub mod cli;
pub mod controller;
pub mod effective;
pub mod eval;
pub mod model;
pub mod netpol;
pub mod resolve;
