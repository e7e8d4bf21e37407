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
    let (held, held_pods) = held(bpffs_dir);
    v2::Hello {
        node: node.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        interfaces,
        default_route_interface: netdev::default_route_interface(),
        held,
        operator_heartbeat_floor: true,
        held_pods,
    }
}

/// What the pinned maps hold, read from the datapath itself (so it is the truth even right after
/// this shim restarted; nothing pinned yet, a first start, is nothing held), with the maps opened
/// and the layout read once: the (policy, gateway entry, slot, gateway) filled, each once, and
/// which gateway each of this node's own pods is steered to, per policy.
pub fn held(bpffs_dir: &Path) -> (Vec<v2::HeldSlot>, Vec<v2::HeldPod>) {
    let read = || -> Result<(Vec<v2::HeldSlot>, Vec<v2::HeldPod>)> {
        let maps = Maps::open_pinned(bpffs_dir)?;
        let names = maps.policy_names()?;
        let layout = maps.layout()?;
        let ip = |raw: u32| convert::ip_to_wire(crate::maps::from_be(raw).into());
        let slots: BTreeSet<(String, u32, u32, u32)> = layout
            .slots
            .iter()
            .filter_map(|(key, gateway)| {
                let (entry, slot) = crate::maps::decode_slot(key.gateway_slot)?;
                Some((names.get(&key.policy_id)?.clone(), entry, slot, *gateway))
            })
            .collect();
        let slots = slots
            .into_iter()
            .map(|(policy, entry, slot, gateway)| v2::HeldSlot {
                policy,
                slot: Some(v2::GatewaySlot { entry, slot }),
                gateway: ip(gateway),
            })
            .collect();
        let pods = layout
            .assignments()
            .into_iter()
            .filter_map(|(pod, policy, gateway)| {
                Some(v2::HeldPod {
                    policy: names.get(&policy)?.clone(),
                    pod: ip(pod),
                    gateway: ip(gateway),
                })
            })
            .collect();
        Ok((slots, pods))
    };
    read().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "no pinned maps to report from");
        (Vec::new(), Vec::new())
    })
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
