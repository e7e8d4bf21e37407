//! `sluice-shim run --operator URL`: the node channel to the operator, a task on the shim's
//! Tokio runtime beside the agent loop.
//!
//! The session ([`sluice_proto::client`]) hands every plan and delta it receives to the agent
//! loop, which it wakes; the agent folds them into its one copy of the node's state, applies the
//! state through the same path as a plan file (so an unchanged state writes nothing) and
//! publishes the generation it holds, which the session acknowledges. While the operator is
//! unreachable, the datapath keeps its pinned state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
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
                .chain(i.ipv6.iter().map(|ip| convert::ip_to_wire((*ip).into())))
                .collect(),
            networks: i
                .ipv4_networks
                .iter()
                .map(|net| convert::prefix_to_wire((*net).into()))
                .chain(
                    i.ipv6_networks
                        .iter()
                        .map(|net| convert::prefix_to_wire((*net).into())),
                )
                .collect(),
        })
        .collect();
    let Held {
        slots,
        pods,
        pinned_flows,
    } = held(bpffs_dir);
    // Once per connection: what a new leader learns from this node.
    tracing::info!(
        slots = slots.len(),
        pods = pods.len(),
        pinned_flows = pinned_flows.len(),
        "hello: what this node's datapath holds"
    );
    v2::Hello {
        node: node.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        interfaces,
        default_route_interface: netdev::default_route_interface(),
        held: slots,
        operator_heartbeat_floor: true,
        held_pods: pods,
        pinned_flows,
        keeps_unchanged_lists: true,
    }
}

/// What the pinned maps hold, as the hello reports it.
#[derive(Default)]
pub struct Held {
    pub slots: Vec<v2::HeldSlot>,
    pub pods: Vec<v2::HeldPod>,
    pub pinned_flows: Vec<v2::HeldPod>,
}

/// The open flows pinned to a gateway that is still pinnable, counted per (pod, policy id,
/// gateway; the gateway in network byte order), of both families ([`crate::datapath::Maps::pins`]).
/// A closing flow (FIN seen) or one idle past the datapath's timeout at `now_ns`
/// (CLOCK_MONOTONIC, the datapath's clock) is about to end or over, and is left out.
pub fn pinned_flows(
    flows: impl IntoIterator<Item = crate::datapath::Pin>,
    pinnable: &BTreeSet<u32>,
    now_ns: u64,
) -> BTreeMap<(IpAddr, u32, u32), u32> {
    use crate::maps::{FLOW_CLOSING, FLOW_IDLE_TCP_S, FLOW_IDLE_UDP_S};
    let mut out = BTreeMap::new();
    for (pod, protocol, v) in flows {
        let idle_limit = if protocol == 6 {
            FLOW_IDLE_TCP_S
        } else {
            FLOW_IDLE_UDP_S
        };
        let idle = now_ns.saturating_sub(v.last_seen_ns) / 1_000_000_000;
        if !pinnable.contains(&v.gateway_ip) || v.flags & FLOW_CLOSING != 0 || idle >= u64::from(idle_limit) {
            continue;
        }
        *out.entry((pod, v.policy_id, v.gateway_ip)).or_insert(0) += 1;
    }
    out
}

/// What the pinned maps hold, read from the datapath itself (so it is the truth even right after
/// this shim restarted; nothing pinned yet, a first start, is nothing held), with the maps opened
/// and the layout read once: the (policy, gateway entry, slot, gateway) filled, each once, and
/// which gateway each of this node's own pods is steered to, per policy, and which gateways its
/// pods' open flows are pinned to besides.
pub fn held(bpffs_dir: &Path) -> Held {
    let read = || -> Result<Held> {
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
        // (pod, policy id, gateway) as reported: the policy by name (ids are the node's own).
        let named = |held: BTreeSet<(IpAddr, u32, u32)>| -> Vec<v2::HeldPod> {
            held.into_iter()
                .filter_map(|(pod, policy, gateway)| {
                    Some(v2::HeldPod {
                        policy: names.get(&policy)?.clone(),
                        pod: convert::ip_to_wire(pod),
                        gateway: ip(gateway),
                    })
                })
                .collect()
        };
        let pods = named(
            layout
                .assignments()
                .into_iter()
                .map(|(pod, policy, gateway)| (IpAddr::V4(crate::maps::from_be(pod)), policy, gateway))
                .collect(),
        );
        // A flow map that cannot be read costs only the flows' pins, not the rest of the report.
        let pinnable: BTreeSet<u32> = maps.pinnable.keys().filter_map(|k| k.ok()).collect();
        let pinned = if pinnable.is_empty() {
            BTreeSet::new()
        } else {
            let now = crate::bpf::monotonic_ns();
            pinned_flows(maps.pins(), &pinnable, now).into_keys().collect()
        };
        Ok(Held {
            slots,
            pods,
            pinned_flows: named(pinned),
        })
    };
    read().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "no pinned maps to report from");
        Held::default()
    })
}

/// The session to the operator, started as a task of the current Tokio runtime by
/// [`OperatorPlans::connect`].
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
    let runtime = tokio::runtime::Handle::current();
    let connect = move || {
        runtime.spawn(client::run(config, hello, updates_tx, applied_rx));
    };
    OperatorPlans {
        updates: Some(updates),
        applied: Arc::new(applied_tx),
        contact,
        connect: Some(crate::run::Connect(Box::new(connect))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{FLOW_CLOSING, FlowV4};

    fn pod(n: u8) -> IpAddr {
        if n == 4 {
            "fd00:10:244:2::10".parse().unwrap()
        } else {
            IpAddr::from([10, 244, 2, n])
        }
    }

    fn flow(n: u8, gateway: u32, policy: u32, flags: u32) -> crate::datapath::Pin {
        (
            pod(n),
            6,
            FlowV4 {
                gateway_ip: gateway,
                policy_id: policy,
                last_seen_ns: NOW - 5_000_000_000,
                flags,
                egress_id: 0,
            },
        )
    }

    const NOW: u64 = 10_000 * 1_000_000_000;

    #[test]
    fn pinned_flows_are_the_open_ones_on_pinnable_gateways_counted() {
        let mut idle_udp = flow(1, 10, 7, 0);
        idle_udp.1 = 17;
        idle_udp.2.last_seen_ns = NOW - 121 * 1_000_000_000;
        let mut live_udp = idle_udp;
        live_udp.2.last_seen_ns = NOW - 119 * 1_000_000_000;
        let flows = [
            // Two flows of pod 1 on gateway 10 (pinnable), and a live UDP one: three.
            flow(1, 10, 7, 0),
            flow(1, 10, 7, 0),
            live_udp,
            // Idle past the UDP timeout: over.
            idle_udp,
            // Closing: about to end.
            flow(2, 10, 7, FLOW_CLOSING),
            // On a gateway no longer pinnable: the datapath lets it follow its entry.
            flow(3, 20, 7, 0),
            // Another policy, same pod and gateway.
            flow(1, 10, 8, 0),
            // An IPv6 pod's flow, on the same gateway.
            flow(4, 10, 7, 0),
        ];
        let pinnable = BTreeSet::from([10]);
        assert_eq!(
            pinned_flows(flows, &pinnable, NOW),
            BTreeMap::from([((pod(1), 7, 10), 3), ((pod(1), 8, 10), 1), ((pod(4), 7, 10), 1)])
        );
        assert!(pinned_flows(flows, &BTreeSet::new(), NOW).is_empty());
    }
}
