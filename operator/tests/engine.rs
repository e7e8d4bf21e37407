//! The engine driven directly, with injected time: what it publishes after a restart or a leader
//! change while the shims come back in every order, and the generations it numbers plans with.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use sluice_operator::{
    api::{EgressGateway, EgressGatewayPolicySpec, EgressRule, FailurePolicy},
    engine::{Engine, EngineConfig, EngineMetrics, Generations, HeldDuty, Hub, NodeView, ShimEvent},
    live::SourceEvent,
    model::{GatewaySlot, NodeInfo, PodInfo, PodPhase, PolicyInput},
    planner::{Change, Planner},
};
use sluice_proto::GatewayTarget;
use tokio::sync::watch;

const GRACE: Duration = Duration::from_secs(1);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn node(name: &str, ip: &str, gateway: bool) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        labels: if gateway {
            labels(&[("egress", "yes")])
        } else {
            BTreeMap::new()
        },
        addresses: vec![ip.parse().unwrap()],
        ready: true,
        eligible: true,
        interfaces: None,
    }
}

/// Pod `p` on `w` leaves through one of the `egress=yes` nodes; failure policy Drop.
fn policy(retained: Vec<GatewaySlot>) -> PolicyInput {
    PolicyInput {
        name: "egress".into(),
        spec: EgressGatewayPolicySpec {
            selectors: vec![EgressRule {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(labels(&[("app", "p")])),
                    match_expressions: None,
                }),
                ..Default::default()
            }],
            destination_cidrs: vec!["203.0.113.0/24".into()],
            egress_gateway: Some(EgressGateway {
                node_selector: LabelSelector {
                    match_labels: Some(labels(&[("egress", "yes")])),
                    match_expressions: None,
                },
                ..Default::default()
            }),
            failure_policy: Some(FailurePolicy::Drop),
            ..Default::default()
        },
        retained_gateways: retained,
        ..Default::default()
    }
}

fn pod() -> PodInfo {
    PodInfo {
        uid: "uid-p".into(),
        namespace: "default".into(),
        name: "p".into(),
        labels: labels(&[("app", "p")]),
        node_name: Some("w".into()),
        ips: vec!["10.1.0.10".parse().unwrap()],
        host_network: false,
        phase: PodPhase::Running,
    }
}

fn nodes() -> Vec<NodeInfo> {
    vec![
        node("w", "192.168.0.1", false),
        node("g1", "192.168.0.11", true),
        node("g2", "192.168.0.12", true),
    ]
}

fn ip_of(name: &str) -> IpAddr {
    nodes().into_iter().find(|n| n.name == name).unwrap().addresses[0]
}

/// The gateway a planner with no memory picks, and the other one.
fn preferred_and_other() -> (&'static str, &'static str) {
    let planner = Planner::from_snapshot([], nodes(), [policy(vec![])], [pod()]);
    match &*planner.policy_outcome("egress").unwrap().gateways[0].node {
        "g1" => ("g1", "g2"),
        _ => ("g2", "g1"),
    }
}

/// An engine that has just started (as after a restart or a leader change), fed the whole
/// source state and `Synced`, with a recorder of every view it publishes for `w`.
struct Started {
    engine: Engine,
    views: watch::Receiver<Option<Arc<NodeView>>>,
    seen: Vec<Arc<NodeView>>,
    t0: Instant,
    session: u64,
}

impl Started {
    fn new(policy: PolicyInput) -> Self {
        let (hub, _events) = Hub::new(GRACE / 4);
        let views = hub.subscribe("w");
        let mut engine = Engine::new(EngineConfig::with_grace(GRACE), hub, EngineMetrics::default());
        let t0 = Instant::now();
        for n in nodes() {
            engine.source(SourceEvent::Change(Box::new(Change::UpsertNode(n))));
        }
        engine.source(SourceEvent::Change(Box::new(Change::UpsertPolicy(policy))));
        engine.source(SourceEvent::Change(Box::new(Change::UpsertPod(pod()))));
        engine.source(SourceEvent::Synced);
        let mut s = Started {
            engine,
            views,
            seen: vec![],
            t0,
            session: 0,
        };
        s.flush(Duration::ZERO);
        s
    }

    fn flush(&mut self, at: Duration) {
        self.engine.tick(self.t0 + at);
        self.engine.flush(self.t0 + at);
        if self.views.has_changed().unwrap_or(false)
            && let Some(v) = self.views.borrow_and_update().clone()
        {
            self.seen.push(v);
        }
    }

    fn connect(&mut self, node: &str, held: Vec<HeldDuty>, at: Duration) {
        self.session += 1;
        self.engine.shim(
            ShimEvent::Connected {
                node: node.into(),
                session: self.session,
                version: "test".into(),
                interfaces: vec![],
                held,
            },
            self.t0 + at,
        );
        self.flush(at);
    }

    /// The gateways `w`'s pod was ever steered to, in order, with "none" for drop entries.
    fn targets(&self) -> Vec<GatewayTarget> {
        let mut out: Vec<GatewayTarget> = Vec::new();
        for v in &self.seen {
            for e in v.entries.values() {
                if out.last() != Some(&e.gateway) {
                    out.push(e.gateway);
                }
            }
        }
        out
    }
}

#[test]
fn a_new_leader_keeps_the_retained_gateway_whatever_order_the_shims_return_in() {
    let (preferred, other) = preferred_and_other();
    // The last leader's choice (from the policy's status) is the node a memoryless choice would
    // not make.
    let retained = vec![GatewaySlot {
        entry: 0,
        slot: 0,
        node: other.into(),
    }];
    for order in [
        ["w", preferred, other],
        [preferred, "w", other],
        [other, preferred, "w"],
    ] {
        let mut s = Started::new(policy(retained.clone()));
        for (i, node) in order.iter().enumerate() {
            assert!(
                s.seen.is_empty(),
                "nothing is published before the shims are back: {order:?}"
            );
            s.connect(node, vec![], Duration::from_millis(100 * (i as u64 + 1)));
        }
        assert_eq!(
            s.targets(),
            vec![GatewayTarget::Node(ip_of(other))],
            "{order:?}: the retained gateway is kept, no drop entry is ever published"
        );
        assert!(!s.engine.settling());
    }
}

#[test]
fn the_duties_shims_report_are_adopted_without_any_status() {
    // The `dir:` source has no status to read back: the datapath is the truth.
    let (preferred, other) = preferred_and_other();
    let held = || {
        vec![HeldDuty {
            policy: "egress".into(),
            entry: 0,
            slot: 0,
        }]
    };
    for order in [["w", preferred, other], [other, "w", preferred]] {
        let mut s = Started::new(policy(vec![]));
        for (i, node) in order.iter().enumerate() {
            let duties = if *node == other { held() } else { vec![] };
            s.connect(node, duties, Duration::from_millis(100 * (i as u64 + 1)));
        }
        assert_eq!(
            s.targets(),
            vec![GatewayTarget::Node(ip_of(other))],
            "{order:?}: the gateway that holds the duty keeps it"
        );
    }
}

#[test]
fn a_gateway_that_does_not_come_back_is_replaced_when_settling_ends() {
    let (preferred, other) = preferred_and_other();
    let retained = vec![GatewaySlot {
        entry: 0,
        slot: 0,
        node: other.into(),
    }];
    let mut s = Started::new(policy(retained));
    s.connect("w", vec![], Duration::from_millis(100));
    s.connect(preferred, vec![], Duration::from_millis(200));
    // The retained gateway's shim never returns: nothing is published until the settling period
    // (grace + the shims' longest backoff) has run out...
    let settle = EngineConfig::with_grace(GRACE).settle;
    let mut at = Duration::from_millis(200);
    while at < settle {
        at += Duration::from_millis(50);
        s.flush(at - Duration::from_millis(1));
        // The connected shims keep heartbeating.
        for (session, node) in [(1, "w"), (2, preferred)] {
            s.engine.shim(
                ShimEvent::Heartbeat {
                    node: node.into(),
                    session,
                },
                s.t0 + at - Duration::from_millis(1),
            );
        }
        if at < settle {
            assert!(s.seen.is_empty(), "published at {at:?} while settling");
        }
    }
    s.flush(settle + Duration::from_millis(10));
    // ...then the pod goes straight to the gateway that is there, never to a drop entry.
    assert_eq!(s.targets(), vec![GatewayTarget::Node(ip_of(preferred))]);
    assert!(!s.engine.settling());
}

#[test]
fn generations_grow_and_never_repeat_across_engines() {
    let mut a = Generations::new(1000);
    let mut b = Generations::new(1001);
    let from_a: Vec<u64> = (0..5).map(|_| a.next()).collect();
    let from_b: Vec<u64> = (0..5).map(|_| b.next()).collect();
    assert!(from_a.windows(2).all(|w| w[0] < w[1]));
    assert!(from_a.iter().all(|g| !from_b.contains(g)));
    assert!(
        from_a.last() < from_b.first(),
        "a later epoch numbers above an earlier one"
    );
    assert!(from_a[0] != 0);
    // Two engines started a moment apart get different epochs.
    let e1 = Generations::epoch_now();
    std::thread::sleep(Duration::from_millis(2));
    assert!(Generations::epoch_now() > e1);
}
