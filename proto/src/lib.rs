//! The contract between `sluice-operator` and `sluice-shim`.
//!
//! - [`plan`]: the plan document (`sluice-operator plan --output json`, read back by
//!   `sluice-shim run --entries FILE`);
//! - [`v1`]: the `sluice.v1` gRPC API (`proto/sluice/v1/node.proto`), by which the operator keeps
//!   every shim's datapath equal to its node's part of the plan;
//! - [`client`]: the shim's side of that channel (connect, hello, plan and deltas, acks,
//!   heartbeats, reconnects), independent of the datapath so that tests can drive it.

pub mod client;
pub mod convert;
pub mod plan;

pub use plan::{
    EntryDoc, GatewayDuty, GatewayReport, GatewaySlotDoc, GatewayTarget, Guard, NodePlanDoc, PlanDocument,
    PolicyConflict, PolicyReport,
};

/// The generated `sluice.v1` messages and services.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// The metadata key carrying the shim's credentials (`Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";
