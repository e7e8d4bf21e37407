//! `sluice-shim run --operator URL`: the node channel to the operator, a task on the shim's
//! Tokio runtime beside the agent loop.
//!
//! The session ([`sluice_proto::client`]) hands every plan and delta it receives to the agent
//! loop, which it wakes; the agent folds them into its one copy of the node's state, applies the
//! state through the same path as a plan file (so an unchanged state writes nothing) and
//! publishes the generation it holds, which the session acknowledges. While the operator is
//! unreachable, the datapath keeps its pinned state.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use sluice_proto::{
    client::{self, Applied, Config, HelloFn},
    convert, v2,
};
use tokio::sync::watch;

use crate::{datapath::Maps, error::Result, netdev, run::OperatorPlans};

/// This node's interfaces as the operator wants them (not pod interfaces, not the tunnel), and
/// which gateway fills which policy slot as its datapath holds it.
fn hello(node: &str, pod_interfaces: &[String], tunnel_device: &str, bpffs_dir: &Path) -> v2::Hello {
    let interfaces = netdev::interfaces()
        .map_err(|e| tracing::warn!(error = %e, "listing interfaces for the operator"))
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.name != tunnel_device && !netdev::is_pod_interface(pod_interfaces, &i.name))
        .map(|i| v2::Interface {
            name: i.name,
            addresses: i
                .ipv4
                .iter()
                .map(|ip| convert::ip_to_wire((*ip).into()))
                .collect(),
            networks: i
                .ipv4_networks
                .iter()
                .map(|net| convert::prefix_to_wire((*net).into()))
                .collect(),
        })
        .collect();
    v2::Hello {
        node: node.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        interfaces,
        default_route_interface: netdev::default_route_interface(),
        held: held_slots(bpffs_dir),
        operator_heartbeat_floor: true,
        held_pods: held_pods(bpffs_dir),
    }
}

/// Which gateway each pod is steered to, per policy, as the pinned maps hold it (see
/// [`held_slots`]).
pub fn held_pods(bpffs_dir: &Path) -> Vec<v2::HeldPod> {
    let read = || -> Result<Vec<v2::HeldPod>> {
        let maps = Maps::open_pinned(bpffs_dir)?;
        let names = maps.policy_names()?;
        Ok(maps
            .layout()?
            .assignments()
            .into_iter()
            .filter_map(|(pod, policy, gateway)| {
                Some(v2::HeldPod {
                    policy: names.get(&policy)?.clone(),
                    pod: convert::ip_to_wire(crate::maps::from_be(pod).into()),
                    gateway: convert::ip_to_wire(crate::maps::from_be(gateway).into()),
                })
            })
            .collect())
    };
    read().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "no pinned maps to report pods from");
        Vec::new()
    })
}

/// The (policy, gateway entry, slot, gateway) the pinned maps hold, each once: read from the
/// datapath itself, so it is the truth even right after this shim restarted. Nothing pinned
/// yet (a first start) is nothing held.
pub fn held_slots(bpffs_dir: &Path) -> Vec<v2::HeldSlot> {
    let read = || -> Result<BTreeSet<(String, u32, u32, std::net::Ipv4Addr)>> {
        let maps = Maps::open_pinned(bpffs_dir)?;
        let names = maps.policy_names()?;
        Ok(maps
            .layout()?
            .slots
            .into_iter()
            .filter_map(|(key, gateway)| {
                let (entry, slot) = crate::maps::decode_slot(key.gateway_slot)?;
                let policy = names.get(&key.policy_id)?.clone();
                Some((policy, entry, slot, crate::maps::from_be(gateway)))
            })
            .collect())
    };
    match read() {
        Ok(held) => held
            .into_iter()
            .map(|(policy, entry, slot, gateway)| v2::HeldSlot {
                policy,
                slot: Some(v2::GatewaySlot { entry, slot }),
                gateway: convert::ip_to_wire(gateway.into()),
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "no pinned maps to report from");
            Vec::new()
        }
    }
}

/// Starts the session to the operator as a task of the current Tokio runtime.
pub fn start(
    config: Config,
    node: String,
    pod_interfaces: Vec<String>,
    tunnel_device: String,
    bpffs_dir: PathBuf,
) -> OperatorPlans {
    let (updates_tx, updates) = client::updates();
    let (applied_tx, applied_rx) = watch::channel(Applied::default());
    let hello: HelloFn = Arc::new(move || hello(&node, &pod_interfaces, &tunnel_device, &bpffs_dir));
    let contact = config.contact.clone();
    tokio::spawn(client::run(config, hello, updates_tx, applied_rx));
    OperatorPlans {
        updates: Some(updates),
        applied: Arc::new(applied_tx),
        contact,
    }
}
