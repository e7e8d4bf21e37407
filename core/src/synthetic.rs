//! Synthetic clusters for benchmarks and load tests: deterministic, sized by the caller.

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{
    api::{EgressGateway, EgressGatewayPolicySpec, EgressRule},
    manifests::Manifests,
    model::{NamespaceInfo, NodeInfo, PodInfo, PodPhase, PolicyInput},
    selector::Labels,
};

/// How big a cluster to make.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub nodes: usize,
    pub pods: usize,
    pub policies: usize,
}

/// Every how many nodes one is a gateway (labelled `egress-pool=<n>`).
const GATEWAY_EVERY: usize = 25;
/// Gateway pools; each policy uses one.
const POOLS: usize = 4;
const NAMESPACES: usize = 100;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

fn selector(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    }
}

/// The node with this index.
pub fn node(i: usize) -> NodeInfo {
    let mut l = labels(&[
        ("kubernetes.io/hostname", format!("node-{i}")),
        ("topology.kubernetes.io/zone", format!("zone-{}", i % 3)),
    ]);
    if i.is_multiple_of(GATEWAY_EVERY) {
        l.insert(
            "egress-pool".into(),
            format!("pool-{}", (i / GATEWAY_EVERY) % POOLS),
        );
    }
    NodeInfo {
        name: format!("node-{i}"),
        labels: l,
        addresses: vec![IpAddr::V4(Ipv4Addr::new(
            172,
            16,
            (i / 250) as u8,
            (i % 250 + 1) as u8,
        ))],
        ready: true,
        eligible: true,
        draining: false,
        interfaces: None,
        pod_cidrs: Vec::new(),
    }
}

/// The pod with this index: app `app-<i mod apps>`, on a node spread over the cluster.
pub fn pod(i: usize, size: Size, generation: usize) -> PodInfo {
    let apps = size.policies.max(1) * 2;
    let ns = i % NAMESPACES;
    PodInfo {
        uid: format!("pod-{i}-{generation}"),
        namespace: format!("ns-{ns}"),
        name: format!("pod-{i}"),
        labels: labels(&[
            ("app", format!("app-{}", i % apps)),
            ("pod-template-hash", format!("{:x}", i * 7919 % 65536)),
            ("version", "v1".to_owned()),
        ]),
        node_name: Some(format!("node-{}", i % size.nodes)),
        ips: vec![IpAddr::V4(Ipv4Addr::new(
            10,
            (i >> 16) as u8 + 100,
            (i >> 8) as u8,
            i as u8,
        ))],
        host_network: false,
        phase: PodPhase::Running,
    }
}

/// Policy `i` selects app `app-<2i>` (so half of the pods are selected, `pods / 2 / policies`
/// per policy) and steers two destination ranges with one exclusion through two nodes of a
/// gateway pool.
pub fn policy(i: usize) -> PolicyInput {
    PolicyInput {
        name: format!("policy-{i}"),
        generation: Some(1),
        created: Some(1_700_000_000 + i as i64),
        spec: EgressGatewayPolicySpec {
            selectors: vec![EgressRule {
                pod_selector: Some(selector(&[("app", format!("app-{}", 2 * i))])),
                namespace_selector: None,
                node_selector: None,
            }],
            destination_cidrs: vec![
                format!("198.18.{}.0/24", i % 256),
                format!("203.0.{}.0/24", i % 256),
            ],
            excluded_cidrs: vec![format!("198.18.{}.7/32", i % 256)],
            // Two gateway nodes, each holding one of the policy's managed addresses (one
            // egressIP on two nodes would be an address conflict).
            egress_gateway: Some(EgressGateway {
                node_selector: selector(&[("egress-pool", format!("pool-{}", i % POOLS))]),
                egress_ips: (1..=2)
                    .map(|k| format!("100.64.{}.{}", i / 100, i % 100 * 2 + k))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        },
        retained_gateways: Vec::new(),
    }
}

pub fn cluster(size: Size) -> Manifests {
    Manifests {
        nodes: (0..size.nodes).map(node).collect(),
        namespaces: (0..NAMESPACES)
            .map(|i| NamespaceInfo {
                name: format!("ns-{i}"),
                labels: labels(&[("team", format!("team-{}", i % 10))]),
            })
            .collect(),
        pods: (0..size.pods).map(|i| pod(i, size, 0)).collect(),
        policies: (0..size.policies).map(policy).collect(),
        service_cidrs: Vec::new(),
        ignored: Vec::new(),
    }
}
