//! The contract between `sluice-operator` and `sluice-shim`.
//!
//! - [`plan`]: the plan document (`sluice-operator plan --output json`, read back by
//!   `sluice-shim run --entries FILE`);
//! - [`v2`]: the `sluice.v2` gRPC API (`proto/sluice/v2/node.proto`), by which the operator keeps
//!   every shim's datapath equal to its node's part of the plan;
//! - [`client`]: the shim's side of that channel (connect, hello, plan and deltas, acks,
//!   heartbeats, reconnects), independent of the datapath so that tests can drive it;
//! - [`chunk`]: plans and deltas of any size in messages of bounded size.

pub mod chunk;
pub mod client;
pub mod convert;
/// The plan document, defined with the planner in [`sluice_core`].
pub use sluice_core::plan;

pub use plan::{
    EgressEntry, EntryKey, GatewayDuty, GatewayReport, GatewaySlotRef, GatewayTarget, Guard, NodePlanDoc,
    PlanDocument, PolicyConflict, PolicyReport,
};

/// The previous node channel, `sluice.v1`: only what an operator needs to keep a shim of the
/// previous release alive during an upgrade (its hello and heartbeats). Nothing else speaks it.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// The generated `sluice.v2` messages and services.
#[allow(clippy::all, missing_docs)]
pub mod v2 {
    tonic::include_proto!("sluice.v2");
}

/// The metadata key carrying the shim's credentials (`Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

/// The largest operator message a shim decodes (and the operator encodes). Chunks end within
/// [`chunk::CHUNK_BUDGET`] unless one item alone exceeds it; this leaves room for such an item
/// so that no plan can wedge the channel.
pub const MAX_OPERATOR_MESSAGE: usize = 16 << 20;

/// The largest shim message the operator decodes (and a shim encodes). Hellos, acks and
/// heartbeats are small: the operator keeps tonic's default rather than let any authenticated
/// stream make it buffer more.
pub const MAX_SHIM_MESSAGE: usize = 4 << 20;

/// The slowest a shim that announces `Hello.operator_heartbeat_floor` is sent the operator's
/// heartbeats: every `max(its heartbeat interval, this)`. Gateway-capable nodes send theirs every
/// few hundred milliseconds so that failover is fast; the operator's only tell a shim when to
/// reconnect, and at this pace a 500-node cluster's operator sends about a tenth as many.
pub const OPERATOR_HEARTBEAT_FLOOR: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the operator sends heartbeats to a shim whose heartbeat interval is `shim`, when
/// the shim announced [`OPERATOR_HEARTBEAT_FLOOR`].
pub fn operator_heartbeat_interval(shim: std::time::Duration) -> std::time::Duration {
    shim.max(OPERATOR_HEARTBEAT_FLOOR)
}

/// The most entry errors an ack carries; the operator reads no more than these.
pub const MAX_ACK_ERRORS: usize = 1000;
