//! Sluice's pure core: what the operator decides, with no I/O (no tokio, tonic, hyper or
//! Kubernetes client), so that it is easy to test and reuse.
//!
//! - [`api`]: the `EgressGatewayPolicy` custom resource; [`policy`]: its parsing and validation;
//! - [`model`]: nodes, namespaces and pods as planning sees them; [`objects`]: from Kubernetes
//!   objects to that model; [`manifests`]: from YAML manifests; [`selector`]: label selectors;
//! - [`planner`]: gateway selection and every node's entries, incremental;
//! - [`in_cluster`]: the in-cluster destinations no policy steers;
//! - [`plan`] and [`report`]: the plan document (`sluice-operator plan`, `sluice-shim run
//!   --entries`); [`convert`]: Cilium's `CiliumEgressGatewayPolicy` to ours;
//! - [`synthetic`]: deterministic clusters for benchmarks and load tests.

pub mod api;
pub mod convert;
pub mod in_cluster;
pub mod manifests;
pub mod model;
pub mod objects;
pub mod plan;
pub mod planner;
pub mod policy;
pub mod report;
pub mod selector;
pub mod synthetic;
