//! The Sluice node shim: loads the eBPF datapath and keeps its maps equal to the node's plan.
//!
//! - [`datapath`]: the object, its pinned maps and TCX links;
//! - [`desired`]: plan entries -> map contents and SNAT rules; [`layout`]: entries -> the
//!   sources and destinations maps (sizes that grow as pods + CIDRs);
//! - [`sync`]: one transition from current to desired (upserts first, deletes after);
//! - [`run`]: the agent loop; [`client`]: the node channel to the operator (`run --operator`); [`bpf`]: the `bpf list` / `bpf counters` views;
//! - [`nat`], [`egress_route`], [`netdev`], [`netlink`]: the kernel side (nftables, egress policy
//!   routing, links and addresses, tunnel device, sysctls; everything but the nftables ruleset,
//!   which `nft -f` applies, is read and written over netlink); [`rp_filter`]: the reverse-path
//!   filter settings relaxed, and the record of what they were;
//! - [`egress_ip`]: managed egress IPs (probe for a duplicate, claim, announce with gratuitous
//!   ARP, release);
//! - [`metrics`]: Prometheus metrics; [`uninstall`]: taking Sluice off a node.

pub mod bpf;
pub mod client;
pub mod datapath;
pub mod desired;
pub mod egress_ip;
pub mod egress_route;
pub mod error;
pub mod layout;
pub mod maps;
pub mod metrics;
pub mod nat;
pub mod netdev;
pub mod netlink;
pub mod rp_filter;
pub mod run;
pub mod sync;
pub mod uninstall;

pub use error::{Error, Result};
