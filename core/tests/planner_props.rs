//! Property tests of the planner: incremental planning equals planning from scratch after any
//! sequence of changes, deltas add up to the plan, and gateway choice has the promised stability.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use proptest::prelude::*;
use sluice_core::plan::GatewayTarget;
use sluice_core::{
    api::{EgressGateway, EgressGatewayPolicySpec, EgressRule, FailurePolicy},
    model::{GatewaySlot, InterfaceInfo, NamespaceInfo, NodeInfo, PodInfo, PodPhase, PolicyInput},
    planner::{Change, EgressEntry, EntryKey, Planner},
    report,
};

const NODES: usize = 5;
const NAMESPACES: usize = 3;
const PODS: usize = 12;
const POLICIES: usize = 4;

fn labels(pairs: Vec<(u8, u8)>) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (format!("k{k}"), format!("v{v}")))
        .collect()
}

fn label_pairs() -> impl Strategy<Value = Vec<(u8, u8)>> {
    prop::collection::vec((0u8..3, 0u8..2), 0..3)
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    (
        label_pairs(),
        prop::option::of((0u8..3, 0u8..4, prop::collection::vec(0u8..2, 1..3))),
    )
        .prop_map(|(pairs, expr)| LabelSelector {
            match_labels: if pairs.is_empty() {
                None
            } else {
                Some(labels(pairs))
            },
            match_expressions: expr.map(|(k, op, vals)| {
                let op = ["In", "NotIn", "Exists", "DoesNotExist"][op as usize];
                let values =
                    matches!(op, "In" | "NotIn").then(|| vals.iter().map(|v| format!("v{v}")).collect());
                vec![LabelSelectorRequirement {
                    key: format!("k{k}"),
                    operator: op.into(),
                    values,
                }]
            }),
        })
}

fn node(i: usize) -> impl Strategy<Value = NodeInfo> {
    (
        label_pairs(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u8..3),
        0u8..4,
        prop::bool::weighted(0.2),
    )
        .prop_map(
            move |(pairs, ready, eligible, ifaces, ip_variant, draining)| NodeInfo {
                name: format!("node-{i}"),
                labels: labels(pairs),
                // Mostly stable addresses, sometimes none or a changed one.
                addresses: match ip_variant {
                    0 => vec![],
                    1 => vec![format!("192.168.9.{i}").parse().unwrap()],
                    _ => vec![format!("192.168.1.{i}").parse().unwrap()],
                },
                ready: ready || ip_variant == 3,
                eligible: eligible || ip_variant == 2,
                draining,
                interfaces: ifaces.map(|n| {
                    (0..n)
                        .map(|j| InterfaceInfo {
                            name: format!("eth{j}"),
                            addresses: vec![
                                format!("198.51.{i}.{j}").parse().unwrap(),
                                format!("2001:db8:{i}::{j}").parse().unwrap(),
                            ],
                            networks: vec![
                                format!("198.51.{i}.0/24").parse().unwrap(),
                                format!("2001:db8:{i}::/64").parse().unwrap(),
                            ],
                            default_route: j == 0,
                        })
                        .collect()
                }),
                pod_cidrs: vec![],
            },
        )
}

fn pod(i: usize) -> impl Strategy<Value = PodInfo> {
    (
        label_pairs(),
        0..NAMESPACES,
        0..NODES + 1,
        prop::collection::vec(0u8..6, 0..3),
        0u8..8,
        any::<bool>(),
    )
        .prop_map(move |(pairs, ns, node, ips, phase, uid_variant)| PodInfo {
            // Two UIDs per slot: a pod replaced under the same name.
            uid: format!("uid-{i}-{}", u8::from(uid_variant)),
            namespace: format!("ns-{ns}"),
            name: format!("pod-{i}"),
            labels: labels(pairs),
            // NODES means a node that does not exist.
            node_name: Some(format!("node-{node}")),
            // A small pool, so that pods share IPs now and then (churn reuses addresses).
            ips: ips
                .into_iter()
                .map(|ip| {
                    if ip < 4 {
                        format!("10.0.0.{ip}")
                    } else {
                        format!("fd00::{ip}")
                    }
                })
                .map(|s| s.parse::<IpAddr>().unwrap())
                .collect(),
            host_network: phase == 7,
            phase: match phase {
                5 => PodPhase::Succeeded,
                6 => PodPhase::Failed,
                0 => PodPhase::Pending,
                _ => PodPhase::Running,
            },
        })
}

fn cidr() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "0.0.0.0/0",
        "203.0.113.0/24",
        "203.0.113.0/28",
        "203.0.113.7/32",
        "198.51.100.0/24",
        "::/0",
        "2001:db8::/64",
        "2001:db8::7/128",
        "not-a-cidr",
    ])
    .prop_map(String::from)
}

fn gateway() -> impl Strategy<Value = EgressGateway> {
    (selector(), 0u8..7, prop::option::of(0u32..4)).prop_map(|(node_selector, egress, max)| EgressGateway {
        node_selector,
        interface: match egress {
            1 => Some("eth0".into()),
            2 => Some("eth1".into()),
            _ => None,
        },
        egress_ip: match egress {
            3 => Some("198.51.1.1".into()),
            4 => Some("2001:db8:2::0".into()),
            _ => None,
        },
        // Managed addresses: on the subnet of node 1's interfaces, or on no node's.
        egress_ips: match egress {
            5 => vec![
                "198.51.1.200".into(),
                "198.51.1.201".into(),
                "2001:db8:1::c9".into(),
            ],
            6 => vec!["192.0.2.200".into()],
            _ => vec![],
        },
        max_gateway_nodes: max,
    })
}

fn policy(i: usize) -> impl Strategy<Value = PolicyInput> {
    (
        prop::collection::vec(
            (
                prop::option::of(selector()),
                prop::option::of(selector()),
                prop::option::of(selector()),
            ),
            1..3,
        ),
        prop::collection::vec(cidr(), 0..3),
        prop::collection::vec(cidr(), 0..2),
        prop::option::of(gateway()),
        prop::collection::vec(gateway(), 0..3),
        any::<bool>(),
        prop::option::of(0i64..3),
        prop::collection::vec((0usize..3, 0usize..3, 0..NODES), 0..3),
    )
        .prop_map(
            move |(rules, dst, exc, gw, gws, fallback, created, retained)| PolicyInput {
                name: format!("policy-{i}"),
                generation: Some(1),
                created,
                spec: EgressGatewayPolicySpec {
                    selectors: rules
                        .into_iter()
                        .map(|(pods, namespaces, nodes)| EgressRule {
                            pod_selector: pods,
                            namespace_selector: namespaces,
                            node_selector: nodes,
                        })
                        .collect(),
                    destination_cidrs: dst,
                    excluded_cidrs: exc,
                    egress_gateway: gw,
                    egress_gateways: gws,
                    failure_policy: fallback.then_some(FailurePolicy::Fallback),
                    drain_timeout: None,
                },
                retained_gateways: retained
                    .into_iter()
                    .map(|(entry, slot, n)| GatewaySlot {
                        entry,
                        slot,
                        node: format!("node-{n}"),
                    })
                    .collect(),
            },
        )
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0..NODES).prop_flat_map(node).prop_map(Change::UpsertNode),
        1 => (0..NODES).prop_map(|i| Change::RemoveNode(format!("node-{i}"))),
        2 => (0..NAMESPACES, label_pairs()).prop_map(|(i, l)| Change::UpsertNamespace(NamespaceInfo { name: format!("ns-{i}"), labels: labels(l) })),
        1 => (0..NAMESPACES).prop_map(|i| Change::RemoveNamespace(format!("ns-{i}"))),
        5 => (0..PODS).prop_flat_map(pod).prop_map(Change::UpsertPod),
        2 => (0..PODS, any::<bool>()).prop_map(|(i, v)| Change::RemovePod(format!("uid-{i}-{}", u8::from(v)))),
        3 => (0..POLICIES).prop_flat_map(policy).prop_map(Change::UpsertPolicy),
        1 => (0..POLICIES).prop_map(|i| Change::RemovePolicy(format!("policy-{i}"))),
    ]
}

/// The inputs as they stand after a sequence of changes.
#[derive(Default)]
struct World {
    nodes: BTreeMap<String, NodeInfo>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    pods: BTreeMap<String, PodInfo>,
    policies: BTreeMap<String, PolicyInput>,
}

impl World {
    fn apply(&mut self, change: &Change) {
        match change.clone() {
            Change::UpsertNode(n) => drop(self.nodes.insert(n.name.clone(), n)),
            Change::RemoveNode(n) => drop(self.nodes.remove(&n)),
            Change::UpsertNamespace(n) => drop(self.namespaces.insert(n.name.clone(), n)),
            Change::RemoveNamespace(n) => drop(self.namespaces.remove(&n)),
            Change::UpsertPod(p) => drop(self.pods.insert(p.uid.clone(), p)),
            Change::RemovePod(p) => drop(self.pods.remove(&p)),
            Change::UpsertPolicy(p) => drop(self.policies.insert(p.name.clone(), p)),
            Change::RemovePolicy(p) => drop(self.policies.remove(&p)),
        }
    }

    fn plan_from_scratch(&self) -> Planner {
        Planner::from_snapshot(
            self.namespaces.values().cloned(),
            self.nodes.values().cloned(),
            self.policies.values().cloned(),
            self.pods.values().cloned(),
        )
    }
}

type Tables = BTreeMap<String, BTreeMap<EntryKey, EgressEntry>>;

fn run(changes: &[Change]) -> (World, Planner, Tables) {
    let mut world = World::default();
    let mut planner = Planner::new();
    let mut tables = Tables::new();
    for change in changes {
        world.apply(change);
        for (node, delta) in planner.apply(change.clone()).nodes {
            delta.apply_to(tables.entry(node.to_string()).or_default());
        }
    }
    (world, planner, tables)
}

/// The incremental planner plans what one fed `world` from scratch does, and every node that
/// applied every delta in order (`tables`) holds exactly its plan.
fn same_as_from_scratch(world: &World, incremental: &Planner, tables: &Tables) -> Result<(), TestCaseError> {
    // Which gateway each pod stays with is state, not input: a new planner takes it from the
    // datapaths, as the operator does after a restart.
    let mut full = world.plan_from_scratch();
    full.adopt_assignments(incremental.assignments());
    prop_assert_eq!(report::document(incremental), report::document(&full));
    for (node, plan) in incremental.node_plans() {
        let held = tables.get(&*node).cloned().unwrap_or_default();
        prop_assert_eq!(&held, &plan, "node {}", node);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full_recompute(changes in prop::collection::vec(change(), 1..60)) {
        let (world, incremental, tables) = run(&changes);
        same_as_from_scratch(&world, &incremental, &tables)?;
        for (node, held) in &tables {
            if !world.nodes.contains_key(node) {
                prop_assert!(held.is_empty(), "removed node {} still holds {:?}", node, held);
            }
        }
    }

    /// Edits that change only a policy's destinations (an allowlist gaining or losing CIDRs)
    /// take the planner's short way (claims of the changed destinations only); whatever came
    /// before and comes after, the result is what a planner built from scratch has.
    #[test]
    fn editing_only_destinations_equals_full_recompute(
        before in prop::collection::vec(change(), 1..40),
        edits in prop::collection::vec(
            (0..POLICIES, prop::collection::vec(cidr(), 1..4), prop::collection::vec(cidr(), 0..2)),
            1..6,
        ),
        after in prop::collection::vec(change(), 0..20),
    ) {
        let (mut world, mut incremental, mut tables) = run(&before);
        let mut apply = |world: &mut World, change: Change| {
            world.apply(&change);
            for (node, delta) in incremental.apply(change).nodes {
                delta.apply_to(tables.entry(node.to_string()).or_default());
            }
        };
        for (i, dst, exc) in edits {
            let Some(mut p) = world.policies.get(&format!("policy-{i}")).cloned() else {
                continue;
            };
            p.spec.destination_cidrs = dst;
            p.spec.excluded_cidrs = exc;
            // As the API server does on a spec change.
            p.generation = p.generation.map(|g| g + 1);
            apply(&mut world, Change::UpsertPolicy(p));
        }
        for change in after {
            apply(&mut world, change);
        }
        same_as_from_scratch(&world, &incremental, &tables)?;
    }

    #[test]
    fn every_entry_is_where_it_belongs(changes in prop::collection::vec(change(), 1..60)) {
        let (world, planner, _) = run(&changes);
        let pods_by_ip: HashMap<IpAddr, Vec<&PodInfo>> = world.pods.values().fold(HashMap::new(), |mut m, p| {
            for ip in &p.ips { m.entry(*ip).or_default().push(p); }
            m
        });
        for (node, plan) in planner.node_plans() {
            for (key, entry) in plan {
                let on_node = pods_by_ip.get(&key.source).into_iter().flatten()
                    .any(|p| p.is_source() && p.node_name.as_deref() == Some(&*node));
                let node_ip = world.nodes[&*node].addresses.iter().copied().find(IpAddr::is_ipv4);
                let is_gateway = matches!(entry.gateway, GatewayTarget::Node(ip) if Some(ip) == node_ip);
                // A node holds entries of its own pods, and entries it is the gateway for.
                prop_assert!(on_node || is_gateway, "{node} holds {entry:?}");
                // Egress details only on the gateway's own entries.
                if entry.egress_ip.is_some() || entry.interface.is_some() {
                    prop_assert!(is_gateway, "{node} has egress details for {entry:?}");
                }
                prop_assert_eq!(key.source.is_ipv4(), key.destination.addr().is_ipv4());
            }
        }
        for name in planner.policy_names() {
            let outcome = planner.policy_outcome(name).unwrap();
            for g in &outcome.gateways {
                let n = &world.nodes[&*g.node];
                prop_assert!(n.ready && n.eligible, "{} serves {} while unusable", g.node, name);
            }
        }
    }

    #[test]
    fn input_order_does_not_matter(changes in prop::collection::vec(change(), 1..40)) {
        let (world, planner, _) = run(&changes);
        let reversed = Planner::from_snapshot(
            world.namespaces.values().rev().cloned(),
            world.nodes.values().rev().cloned(),
            world.policies.values().rev().cloned(),
            world.pods.values().rev().cloned(),
        );
        prop_assert_eq!(report::document(&planner), report::document(&reversed));
    }
}

/// An allowlist gaining and losing CIDRs, its generation bumped as the API server does, takes
/// the short way (only the changed destinations' keys) and plans what a planner from scratch
/// plans; an edit of anything else takes the long way.
#[test]
fn an_allowlist_edit_touches_only_the_changed_destinations() {
    let (nodes, mut policy, pods) = gateway_cluster(2, 1, 20);
    policy.generation = Some(1);
    policy.spec.destination_cidrs = vec!["203.0.113.0/24".into(), "198.51.100.0/24".into()];
    let mut planner = Planner::from_snapshot([], nodes.clone(), [policy.clone()], pods.clone());
    let mut edited = policy.clone();
    edited.generation = Some(2);
    edited.spec.destination_cidrs = vec!["198.51.100.0/24".into(), "192.0.2.0/24".into()];
    edited.spec.excluded_cidrs = vec!["198.51.100.7/32".into()];
    let delta = planner.apply(Change::UpsertPolicy(edited.clone()));
    assert_eq!(planner.destination_edits(), 1);
    let touched: usize = delta
        .nodes
        .values()
        .map(|d| d.upserts.len() + d.removals.len())
        .sum();
    assert!(touched > 0);
    let full = Planner::from_snapshot([], nodes, [edited.clone()], pods);
    assert_eq!(report::document(&planner), report::document(&full));
    assert_eq!(planner.node_plans(), full.node_plans());
    // Another failure policy is more than destinations: the long way.
    let mut other = edited;
    other.generation = Some(3);
    other.spec.failure_policy = Some(FailurePolicy::Fallback);
    planner.apply(Change::UpsertPolicy(other));
    assert_eq!(planner.destination_edits(), 1);
}

/// A cluster with one policy served by `max` of `candidates` gateway nodes, and many pods.
fn gateway_cluster(candidates: usize, max: u32, pods: usize) -> (Vec<NodeInfo>, PolicyInput, Vec<PodInfo>) {
    let mut nodes: Vec<NodeInfo> = (0..candidates)
        .map(|i| NodeInfo {
            name: format!("gw-{i}"),
            labels: labels(vec![(0, 1)]),
            addresses: vec![format!("192.168.1.{}", i + 1).parse().unwrap()],
            ready: true,
            eligible: true,
            draining: false,
            interfaces: None,
            pod_cidrs: vec![],
        })
        .collect();
    nodes.push(NodeInfo {
        name: "worker".into(),
        addresses: vec!["192.168.2.1".parse().unwrap()],
        ready: true,
        eligible: true,
        ..Default::default()
    });
    let policy = PolicyInput {
        name: "p".into(),
        spec: EgressGatewayPolicySpec {
            selectors: vec![EgressRule {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(labels(vec![(1, 1)])),
                    match_expressions: None,
                }),
                ..Default::default()
            }],
            destination_cidrs: vec!["0.0.0.0/0".into()],
            egress_gateway: Some(EgressGateway {
                node_selector: LabelSelector {
                    match_labels: Some(labels(vec![(0, 1)])),
                    match_expressions: None,
                },
                max_gateway_nodes: Some(max),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let pods = (0..pods)
        .map(|i| PodInfo {
            uid: format!("pod-uid-{i}"),
            namespace: "default".into(),
            name: format!("pod-{i}"),
            labels: labels(vec![(1, 1)]),
            node_name: Some("worker".into()),
            ips: vec![IpAddr::from([10, 1, (i / 250) as u8, (i % 250) as u8])],
            host_network: false,
            phase: PodPhase::Running,
        })
        .collect();
    (nodes, policy, pods)
}

fn gateway_of_each_pod(planner: &Planner) -> BTreeMap<EntryKey, GatewayTarget> {
    planner
        .node_plan("worker")
        .into_iter()
        .map(|(k, e)| (k, e.gateway))
        .collect()
}

proptest! {
    #[test]
    fn losing_a_gateway_moves_only_the_pods_it_served(candidates in 2usize..7, max in 1u32..5, lost in 0usize..7) {
        let (nodes, mut policy, pods) = gateway_cluster(candidates, max, 60);
        let mut planner = Planner::from_snapshot([], nodes.clone(), [policy.clone()], pods);
        // The live system feeds the choice back, so that it survives later changes.
        policy.retained_gateways = planner.gateway_slots("p");
        prop_assert!(planner.upsert_policy(policy).nodes.is_empty());
        let before = gateway_of_each_pod(&planner);
        let active: Vec<String> = planner.policy_outcome("p").unwrap().gateways.iter().map(|g| g.node.to_string()).collect();
        prop_assert_eq!(active.len(), (max as usize).min(candidates));
        let lost = &active[lost % active.len()];
        let lost_ip = GatewayTarget::Node(nodes.iter().find(|n| &n.name == lost).unwrap().addresses[0]);
        let mut down = nodes.iter().find(|n| &n.name == lost).unwrap().clone();
        down.ready = false;
        planner.upsert_node(down);
        let after = gateway_of_each_pod(&planner);
        for (key, gw) in &before {
            if *gw != lost_ip {
                prop_assert_eq!(after[key], *gw, "{:?} moved although its gateway is fine", key);
            } else {
                prop_assert_ne!(after[key], lost_ip);
            }
        }
    }

    #[test]
    fn nodes_that_are_not_candidates_never_move_gateways(candidates in 1usize..6, max in 1u32..4, extra in 1usize..5) {
        let (nodes, policy, pods) = gateway_cluster(candidates, max, 30);
        let mut planner = Planner::from_snapshot([], nodes, [policy], pods);
        let before = gateway_of_each_pod(&planner);
        for i in 0..extra {
            let delta = planner.upsert_node(NodeInfo {
                name: format!("unrelated-{i}"),
                addresses: vec![format!("192.168.3.{i}").parse().unwrap()],
                ready: true,
                eligible: true,
                ..Default::default()
            });
            prop_assert!(delta.nodes.is_empty());
        }
        prop_assert_eq!(gateway_of_each_pod(&planner), before);
    }
}

#[test]
fn policies_spread_over_the_candidates() {
    let (nodes, policy, pods) = gateway_cluster(4, 1, 1);
    let mut planner = Planner::from_snapshot([], nodes, [], pods);
    let mut used = std::collections::BTreeSet::new();
    for i in 0..40 {
        let mut p = policy.clone();
        p.name = format!("policy-{i}");
        planner.upsert_policy(p);
        used.insert(
            planner.policy_outcome(&format!("policy-{i}")).unwrap().gateways[0]
                .node
                .to_string(),
        );
    }
    assert_eq!(
        used.len(),
        4,
        "40 policies should use all 4 candidate gateways, used {used:?}"
    );
}

#[test]
fn retained_gateways_keep_serving_after_a_better_node_appears() {
    let (nodes, mut policy, pods) = gateway_cluster(1, 1, 3);
    let mut planner = Planner::from_snapshot([], nodes.clone(), [policy.clone()], pods);
    let first = planner.policy_outcome("p").unwrap().gateways[0].node.to_string();
    policy.retained_gateways = planner.gateway_slots("p");
    planner.upsert_policy(policy);
    // Whatever their hash, newcomers do not take over from a working gateway.
    for i in 1..6 {
        let mut n = nodes[0].clone();
        n.name = format!("gw-new-{i}");
        n.addresses = vec![format!("192.168.5.{i}").parse().unwrap()];
        planner.upsert_node(n);
        assert_eq!(
            planner.policy_outcome("p").unwrap().gateways[0].node.to_string(),
            first
        );
    }
}

#[test]
fn a_gateway_accepts_each_pod_from_its_own_node_only() {
    let (mut nodes, policy, pods) = gateway_cluster(1, 1, 2);
    let mut planner = Planner::from_snapshot([], nodes.clone(), [policy], pods);
    let sources = |planner: &Planner| -> Vec<Option<IpAddr>> {
        planner
            .node_plan("gw-0")
            .into_values()
            .map(|e| e.source_node_ip)
            .collect()
    };
    let worker_ip: IpAddr = "192.168.2.1".parse().unwrap();
    assert_eq!(sources(&planner), vec![Some(worker_ip); 2]);
    // The pod's node gets a new address: the gateway follows, and only the gateway's entries
    // change (the worker's own entries name no source node).
    let worker = nodes.iter_mut().find(|n| n.name == "worker").unwrap();
    worker.addresses = vec!["192.168.2.9".parse().unwrap()];
    let delta = planner.upsert_node(worker.clone());
    assert_eq!(sources(&planner), vec![Some("192.168.2.9".parse().unwrap()); 2]);
    assert_eq!(
        delta.nodes.keys().map(|n| n.to_string()).collect::<Vec<_>>(),
        ["gw-0"]
    );
    assert!(
        planner
            .node_plan("worker")
            .values()
            .all(|e| e.source_node_ip.is_none()),
        "the pod's node holds no source node"
    );
}

/// `gateway_cluster` with managed addresses `ips` on its one gateway entry.
fn managed_cluster(
    candidates: usize,
    ips: &[&str],
    pods: usize,
) -> (Vec<NodeInfo>, PolicyInput, Vec<PodInfo>) {
    let (nodes, mut policy, pods) = gateway_cluster(candidates, 1, pods);
    let g = policy.spec.egress_gateway.as_mut().unwrap();
    g.max_gateway_nodes = None;
    g.egress_ips = ips.iter().map(|ip| ip.to_string()).collect();
    (nodes, policy, pods)
}

/// Each pod's egress IP, as its gateway's entries say.
fn egress_of_each_pod(planner: &Planner) -> BTreeMap<IpAddr, IpAddr> {
    let mut out = BTreeMap::new();
    for (node, plan) in planner.node_plans() {
        if &*node == "worker" {
            continue;
        }
        for (key, entry) in plan {
            if let Some(ip) = entry.egress_ip {
                assert_eq!(out.insert(key.source, ip).unwrap_or(ip), ip, "{:?}", key);
            }
        }
    }
    out
}

/// The address follows its slot: when a node fails, the slot it filled rides on another gateway
/// with the same address, so every pod keeps leaving with the address it had; when the node
/// comes back, nothing moves (the doubled slot is retained where it is).
#[test]
fn managed_addresses_follow_their_slot_and_stay_whole_when_a_node_fails() {
    let ips = ["192.0.2.150", "192.0.2.151"];
    let (nodes, mut policy, pods) = managed_cluster(2, &ips, 40);
    let mut planner = Planner::from_snapshot([], nodes.clone(), [policy.clone()], pods);
    let before = planner.policy_outcome("p").unwrap().gateways;
    assert_eq!(before.len(), 2);
    assert_ne!(
        before[0].node, before[1].node,
        "one address per node while nodes suffice"
    );
    for g in &before {
        assert!(g.managed);
        assert_eq!(g.egress_v4, Some(ips[g.slot].parse().unwrap()));
        let duties = planner.gateway_duties(&g.node);
        assert_eq!(duties.len(), 1);
        assert!(duties[0].managed);
        assert_eq!(duties[0].egress_ips, [ips[g.slot].parse::<IpAddr>().unwrap()]);
    }
    let egress = egress_of_each_pod(&planner);
    assert_eq!(egress.len(), 40);
    assert_eq!(
        egress.values().collect::<std::collections::BTreeSet<_>>().len(),
        2,
        "pods spread over both addresses"
    );

    // The node of slot 0 fails: the survivor holds both addresses, and no pod changes address.
    let lost = before[0].node.to_string();
    let mut down = nodes.iter().find(|n| n.name == lost).unwrap().clone();
    down.eligible = false;
    policy.retained_gateways = planner.gateway_slots("p");
    planner.upsert_policy(policy.clone());
    planner.upsert_node(down.clone());
    let after = planner.policy_outcome("p").unwrap().gateways;
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|g| g.node == before[1].node), "{after:?}");
    let mut duties: Vec<IpAddr> = planner
        .gateway_duties(&before[1].node)
        .into_iter()
        .flat_map(|d| d.egress_ips)
        .collect();
    duties.sort();
    assert_eq!(duties, ips.map(|ip| ip.parse::<IpAddr>().unwrap()));
    assert_eq!(egress_of_each_pod(&planner), egress, "same address for every pod");

    // It comes back: the doubled slot stays where it is.
    policy.retained_gateways = planner.gateway_slots("p");
    planner.upsert_policy(policy);
    down.eligible = true;
    planner.upsert_node(down);
    let back = planner.policy_outcome("p").unwrap().gateways;
    assert!(back.iter().all(|g| g.node == before[1].node), "{back:?}");
    assert_eq!(egress_of_each_pod(&planner), egress);
}

/// A dual-stack list: each slot holds one address of each family, and a pod's IPv4 and IPv6
/// traffic leave through the same gateway with the two addresses of that gateway's slot.
#[test]
fn a_dual_stack_slot_holds_one_address_of_each_family_on_one_gateway() {
    let ips = ["fd00::150", "192.0.2.150", "192.0.2.151", "fd00::151"];
    let (nodes, mut policy, mut pods) = managed_cluster(2, &ips, 20);
    policy.spec.destination_cidrs = vec!["0.0.0.0/0".into(), "::/0".into()];
    for (i, pod) in pods.iter_mut().enumerate() {
        pod.ips.push(format!("fd00:10::{i:x}").parse().unwrap());
    }
    let planner = Planner::from_snapshot([], nodes, [policy], pods.clone());
    let ip = |t: &str| t.parse::<IpAddr>().unwrap();
    let gateways = planner.policy_outcome("p").unwrap().gateways;
    assert_eq!(gateways.len(), 2, "two slots: {gateways:?}");
    let mut pairs = Vec::new();
    for g in &gateways {
        let duties = planner.gateway_duties(&g.node);
        assert_eq!(duties.len(), 1);
        let mut held = duties[0].egress_ips.clone();
        held.sort();
        pairs.push(held);
        assert_eq!(
            (g.egress_v4.is_some(), g.egress_v6.is_some()),
            (true, true),
            "{g:?}"
        );
    }
    pairs.sort();
    assert_eq!(
        pairs,
        [
            [ip("192.0.2.150"), ip("fd00::150")],
            [ip("192.0.2.151"), ip("fd00::151")]
        ]
    );
    let egress = egress_of_each_pod(&planner);
    for pod in &pods {
        let (v4, v6) = (egress[&pod.ips[0]], egress[&pod.ips[1]]);
        let slot = usize::from(v4 == ip("192.0.2.151"));
        assert_eq!(
            (v4, v6),
            (ip(ips[1 + slot]), ip(["fd00::150", "fd00::151"][slot])),
            "{}: one slot's two addresses",
            pod.name
        );
    }
}

/// Where a managed address lives: the named interface, else the one on its subnet, else the
/// default route's; a node without the named interface is no candidate.
#[test]
fn a_managed_address_goes_on_its_subnet_s_interface() {
    let (mut nodes, mut policy, pods) = managed_cluster(1, &["192.0.2.150", "198.51.100.7"], 4);
    nodes[0].interfaces = Some(vec![
        InterfaceInfo {
            name: "eth0".into(),
            addresses: vec!["10.0.0.5".parse().unwrap()],
            networks: vec!["10.0.0.0/24".parse().unwrap()],
            default_route: true,
        },
        InterfaceInfo {
            name: "eth1".into(),
            addresses: vec!["192.0.2.11".parse().unwrap()],
            networks: vec!["192.0.2.0/24".parse().unwrap()],
            default_route: false,
        },
    ]);
    let planner = Planner::from_snapshot([], nodes.clone(), [policy.clone()], pods.clone());
    let mut placed: Vec<(IpAddr, Option<String>)> = planner
        .gateway_duties("gw-0")
        .into_iter()
        .map(|d| (d.egress_ips[0], d.interface.map(|i| i.to_string())))
        .collect();
    placed.sort();
    assert_eq!(
        placed,
        [
            ("192.0.2.150".parse().unwrap(), Some("eth1".to_owned())),
            ("198.51.100.7".parse().unwrap(), Some("eth0".to_owned())),
        ]
    );
    policy.spec.egress_gateway.as_mut().unwrap().interface = Some("eth2".into());
    let planner = Planner::from_snapshot([], nodes, [policy], pods);
    let outcome = planner.policy_outcome("p").unwrap();
    assert!(outcome.gateways.is_empty());
    assert_eq!(outcome.gateway_diagnosis[0].lacking_egress, 1);
}

/// Two policies name one managed address: the older holds it, whichever arrives first, and the
/// younger's slot for it stays empty (its status names the holder) until the older lets it go.
/// At no point do two gateways hold the address.
#[test]
fn a_managed_address_two_policies_name_is_the_older_policy_s() {
    let shared: IpAddr = "192.0.2.150".parse().unwrap();
    let (nodes, mut older, pods) = managed_cluster(2, &["192.0.2.150"], 6);
    older.created = Some(100);
    let mut younger = older.clone();
    younger.name = "q".into();
    younger.created = Some(200);
    younger.spec.destination_cidrs = vec!["203.0.113.0/24".into()];
    younger.spec.egress_gateway.as_mut().unwrap().egress_ips =
        vec!["192.0.2.150".into(), "192.0.2.151".into()];
    let holders = |planner: &Planner| -> usize {
        planner
            .node_names()
            .map(|n| {
                planner
                    .gateway_duties(n)
                    .iter()
                    .filter(|d| d.managed && d.egress_ips.contains(&shared))
                    .count()
            })
            .sum()
    };
    for arrival in [[&older, &younger], [&younger, &older]] {
        let mut planner = Planner::from_snapshot([], nodes.clone(), [], pods.clone());
        for policy in arrival {
            planner.upsert_policy(policy.clone());
            assert_eq!(holders(&planner), 1, "one holder after {}", policy.name);
        }
        let p = planner.policy_outcome("p").unwrap();
        assert!(p.gateways.iter().any(|g| g.holds_managed(shared)));
        assert!(p.managed_taken.is_empty());
        let q = planner.policy_outcome("q").unwrap();
        assert_eq!(q.managed_taken, [(shared, "p".to_owned())]);
        assert!(!q.gateways.iter().any(|g| g.holds_managed(shared)), "{q:?}");
        assert_eq!(q.gateways.len(), 1, "its other address is held: {q:?}");
        // Its pods all leave with the address it holds.
        let q_egress: std::collections::BTreeSet<IpAddr> = planner
            .node_plans()
            .values()
            .flat_map(|plan| plan.values())
            .filter(|e| e.key.destination.to_string() == "203.0.113.0/24")
            .filter_map(|e| e.egress_ip)
            .collect();
        assert_eq!(q_egress, ["192.0.2.151".parse().unwrap()].into());

        // The older policy goes: the younger holds the address now.
        let delta = planner.remove_policy("p");
        assert!(delta.policies.iter().any(|p| &**p == "q"), "{delta:?}");
        let q = planner.policy_outcome("q").unwrap();
        assert!(q.managed_taken.is_empty());
        assert!(q.gateways.iter().any(|g| g.holds_managed(shared)), "{q:?}");
        assert_eq!(holders(&planner), 1);
    }
}

/// Nodes `a0`, `a1` (role a) and `b0`, `b1` (role b), a worker; policy `p` with two entries,
/// role a then role b, one slot each; `pods` pods on the worker.
fn two_entry_cluster(pods: usize) -> (Vec<NodeInfo>, PolicyInput, Vec<PodInfo>) {
    let (mut nodes, mut policy, pods) = gateway_cluster(4, 1, pods);
    for (i, name) in ["a0", "a1", "b0", "b1"].iter().enumerate() {
        nodes[i].name = (*name).into();
        nodes[i].labels = labels(vec![(0, 1), (2, u8::from(i >= 2))]);
    }
    let entry = |role: u8| EgressGateway {
        node_selector: LabelSelector {
            match_labels: Some(labels(vec![(0, 1), (2, role)])),
            match_expressions: None,
        },
        max_gateway_nodes: Some(1),
        ..Default::default()
    };
    policy.spec.egress_gateway = None;
    policy.spec.egress_gateways = vec![entry(0), entry(1)];
    (nodes, policy, pods)
}

/// Each pod's gateway node (by the worker's entries), by pod IP.
fn gateway_node_of_each_pod(planner: &Planner, nodes: &[NodeInfo]) -> BTreeMap<IpAddr, String> {
    let name_of = |ip: IpAddr| {
        nodes
            .iter()
            .find(|n| n.addresses.contains(&ip))
            .map(|n| n.name.clone())
    };
    planner
        .node_plan("worker")
        .into_iter()
        .filter_map(|(k, e)| match e.gateway {
            GatewayTarget::Node(ip) => Some((k.source, name_of(ip)?)),
            _ => None,
        })
        .collect()
}

/// What the live system does after every change: the planner's gateways become the retained ones.
fn feed_back(planner: &mut Planner, policy: &mut PolicyInput) {
    policy.retained_gateways = planner.gateway_slots(&policy.name);
    planner.upsert_policy(policy.clone());
}

/// The case: two entries, one node each. A pod's gateway fails, the pod goes to the
/// other entry's node; the failed node recovers and takes none of the pods back (their
/// connections are on the other node now), but new pods spread over both again.
#[test]
fn a_recovered_gateway_of_another_entry_takes_back_no_pod() {
    let (mut nodes, mut policy, pods) = two_entry_cluster(40);
    nodes.retain(|n| n.name != "a1" && n.name != "b1");
    let mut planner = Planner::from_snapshot([], nodes.clone(), [policy.clone()], pods.clone());
    feed_back(&mut planner, &mut policy);
    let before = gateway_node_of_each_pod(&planner, &nodes);
    assert_eq!(before.len(), 40);
    let on_a: Vec<IpAddr> = before
        .iter()
        .filter(|(_, n)| *n == "a0")
        .map(|(ip, _)| *ip)
        .collect();
    assert!(
        !on_a.is_empty() && on_a.len() < 40,
        "pods spread over both entries"
    );

    let a0 = nodes.iter().position(|n| n.name == "a0").unwrap();
    nodes[a0].eligible = false;
    planner.upsert_node(nodes[a0].clone());
    feed_back(&mut planner, &mut policy);
    let failed_over = gateway_node_of_each_pod(&planner, &nodes);
    assert!(failed_over.values().all(|n| n == "b0"), "{failed_over:?}");

    nodes[a0].eligible = true;
    planner.upsert_node(nodes[a0].clone());
    feed_back(&mut planner, &mut policy);
    assert_eq!(
        gateway_node_of_each_pod(&planner, &nodes),
        failed_over,
        "a recovered gateway takes no pod back"
    );
    assert_eq!(planner.policy_outcome("p").unwrap().gateways.len(), 2);

    // New pods spread over both gateways.
    let (_, _, more) = two_entry_cluster(80);
    for pod in more.into_iter().skip(40) {
        planner.upsert_pod(pod);
    }
    let after = gateway_node_of_each_pod(&planner, &nodes);
    let new_on_a = after
        .iter()
        .filter(|(ip, n)| !before.contains_key(ip) && *n == "a0")
        .count();
    assert!(new_on_a > 5, "{new_on_a} of 40 new pods on the recovered gateway");
}

/// A planned change of the gateways.
#[derive(Clone, Debug)]
enum Planned {
    /// A node recovers, or is added (was not eligible).
    Recover(usize),
    /// A node fails (it is no planned change; its pods may move, no one else's).
    Fail(usize),
    /// An entry's `maxGatewayNodes`.
    SetMax(usize, u32),
    /// The two entries swap places.
    Reorder,
    AddPod(usize),
    RemovePod(usize),
}

fn planned() -> impl Strategy<Value = Planned> {
    prop_oneof![
        (0usize..4).prop_map(Planned::Recover),
        (0usize..4).prop_map(Planned::Fail),
        (0usize..2, 1u32..=2).prop_map(|(e, m)| Planned::SetMax(e, m)),
        Just(Planned::Reorder),
        (0usize..30).prop_map(Planned::AddPod),
        (0usize..30).prop_map(Planned::RemovePod),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No sequence of changes moves a pod whose gateway node still serves the policy after the
    /// change (a recovered or added gateway, a `maxGatewayNodes` change, reordered entries, pods
    /// coming and going): only the pods of a gateway that failed or stopped serving move. And a
    /// pod has a gateway whenever the policy has one.
    #[test]
    fn no_planned_change_moves_a_pod_whose_gateway_still_serves(
        changes in prop::collection::vec(planned(), 1..30),
    ) {
        let (mut nodes, mut policy, all_pods) = two_entry_cluster(30);
        let mut planner = Planner::from_snapshot([], nodes.clone(), [policy.clone()], all_pods[..10].to_vec());
        feed_back(&mut planner, &mut policy);
        for change in changes {
            let before = gateway_node_of_each_pod(&planner, &nodes);
            let mut failed: Option<String> = None;
            match &change {
                Planned::Recover(i) | Planned::Fail(i) => {
                    nodes[*i].eligible = matches!(change, Planned::Recover(_));
                    if matches!(change, Planned::Fail(_)) {
                        failed = Some(nodes[*i].name.clone());
                    }
                    planner.upsert_node(nodes[*i].clone());
                }
                Planned::SetMax(e, m) => {
                    policy.spec.egress_gateways[*e].max_gateway_nodes = Some(*m);
                    planner.upsert_policy(policy.clone());
                }
                Planned::Reorder => {
                    policy.spec.egress_gateways.reverse();
                    // The retained slots name entries by index: the live system's feed back
                    // holds the old order until the planner's next choice.
                    planner.upsert_policy(policy.clone());
                }
                Planned::AddPod(k) => drop(planner.upsert_pod(all_pods[*k].clone())),
                Planned::RemovePod(k) => drop(planner.remove_pod(&all_pods[*k].uid)),
            }
            feed_back(&mut planner, &mut policy);
            let serving: Vec<String> = planner
                .policy_outcome("p")
                .unwrap()
                .gateways
                .iter()
                .map(|g| g.node.to_string())
                .collect();
            let after = gateway_node_of_each_pod(&planner, &nodes);
            for (ip, node) in &before {
                let Some(now) = after.get(ip) else { continue };
                if serving.contains(node) && failed.as_ref() != Some(node) {
                    prop_assert_eq!(now, node, "{:?} moved pod {} while {} serves", change, ip, node);
                }
            }
            if !serving.is_empty() {
                let selected = planner.policy_outcome("p").unwrap().matched_endpoints;
                prop_assert_eq!(after.len(), selected, "every pod has a gateway");
            }
        }
    }
}

/// A draining gateway gives its slot to another candidate (its pods follow the slot); with no
/// other candidate it keeps serving: a drain never leaves an entry without a gateway.
#[test]
fn a_draining_gateway_gives_its_slot_away_when_another_node_can_take_it() {
    let (mut nodes, mut policy, pods) = gateway_cluster(2, 1, 10);
    let mut planner = Planner::from_snapshot([], nodes.clone(), [policy.clone()], pods);
    feed_back(&mut planner, &mut policy);
    let before = planner.policy_outcome("p").unwrap().gateways;
    assert_eq!(before.len(), 1);
    let drained = nodes.iter().position(|n| *n.name == *before[0].node).unwrap();
    let other = nodes
        .iter()
        .position(|n| n.name.starts_with("gw-") && *n.name != *before[0].node)
        .unwrap();
    nodes[drained].draining = true;
    planner.upsert_node(nodes[drained].clone());
    feed_back(&mut planner, &mut policy);
    let after = planner.policy_outcome("p").unwrap().gateways;
    assert_eq!(after.len(), 1);
    assert_eq!(
        *after[0].node, *nodes[other].name,
        "the slot went to the other node"
    );
    assert!(
        gateway_node_of_each_pod(&planner, &nodes)
            .values()
            .all(|n| *n == nodes[other].name),
        "its pods followed the slot"
    );
    // The other node drains too: the entry keeps a gateway (the one it has).
    nodes[other].draining = true;
    planner.upsert_node(nodes[other].clone());
    feed_back(&mut planner, &mut policy);
    assert_eq!(planner.policy_outcome("p").unwrap().gateways.len(), 1);
}
