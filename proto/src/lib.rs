//! The contract between `sluice-operator` and `sluice-shim`.
//!
//! Today this is the plan document (`sluice-operator plan --output json`, read back by
//! `sluice-shim run --entries FILE`); the gRPC API joins it here so both sides build from one
//! definition.

pub mod plan;

pub use plan::{
    EntryDoc, GatewayDuty, GatewayReport, GatewayTarget, NodePlanDoc, PlanDocument, PolicyConflict,
    PolicyReport,
};
