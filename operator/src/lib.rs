//! The Sluice control plane: the Kubernetes controller, the engine that keeps every node's
//! plan and talks to the shims, the node channel (gRPC, TLS, authentication), metrics.
//!
//! The pure decisions (policy parsing, selectors, planner, plan document) live in
//! [`sluice_core`]; they are re-exported here under their old paths.

pub use sluice_core::{
    api, convert, in_cluster, manifests, model, objects, plan, planner, policy, report, selector, synthetic,
};
pub mod auth;
pub mod cli;
pub mod controller;
pub mod dirsource;
pub mod engine;
pub mod grpc;
pub mod lease_file;
pub mod live;
pub mod metrics;
pub mod runner;
pub mod tls;
