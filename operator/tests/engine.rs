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
    engine::{
        Engine, EngineConfig, EngineMetrics, Generations, HeldDuty, HeldPod, Hub, NodeView, PinnedCounts,
        ShimEvent,
    },
    live::SourceEvent,
    live::{Behind, Notice, StatusUpdate},
    model::{GatewaySlot, NodeInfo, PodInfo, PodPhase, PolicyInput},
    planner::{Change, EntryKey, Planner},
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
        draining: false,
        interfaces: None,
        pod_cidrs: vec![],
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
    hub: Arc<Hub>,
    views: watch::Receiver<Option<Arc<NodeView>>>,
    seen: Vec<Arc<NodeView>>,
    t0: Instant,
    session: u64,
}

impl Started {
    fn new(policy: PolicyInput) -> Self {
        Self::with_pod(policy, pod())
    }

    fn with_pod(policy: PolicyInput, pod: PodInfo) -> Self {
        let (hub, _events) = Hub::new(GRACE / 4);
        let views = hub.subscribe("w");
        let mut engine = Engine::new(
            EngineConfig::with_grace(GRACE),
            hub.clone(),
            EngineMetrics::default(),
        );
        let t0 = Instant::now();
        for n in nodes() {
            engine.source(SourceEvent::Change(Box::new(Change::UpsertNode(n))));
        }
        engine.source(SourceEvent::Change(Box::new(Change::UpsertPolicy(policy))));
        engine.source(SourceEvent::Change(Box::new(Change::UpsertPod(pod))));
        engine.source(SourceEvent::Synced);
        let mut s = Started {
            engine,
            hub,
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
        self.connect_holding(node, held, vec![], at);
    }

    /// The shims of `w`, `preferred` and `other` connect (sessions 1, 2, 3), 100 ms apart from
    /// 100 ms on.
    fn connect_all(&mut self, preferred: &str, other: &str) {
        self.connect("w", vec![], Duration::from_millis(100));
        self.connect(preferred, vec![], Duration::from_millis(200));
        self.connect(other, vec![], Duration::from_millis(300));
    }

    /// The shims of [`Started::connect_all`] acknowledge their latest generations at `at`.
    fn ack_all(&mut self, preferred: &str, other: &str, at: Duration) {
        for (node, session) in [("w", 1), (preferred, 2), (other, 3)] {
            self.ack(node, session, at);
        }
    }

    /// `connect`, the shim reporting its pods' gateways too.
    fn connect_holding(&mut self, node: &str, held: Vec<HeldDuty>, pods: Vec<HeldPod>, at: Duration) {
        self.connect_reporting(node, held, pods, vec![], at);
    }

    /// `connect_holding`, the shim reporting its pods' pinned flows too.
    fn connect_reporting(
        &mut self,
        node: &str,
        held: Vec<HeldDuty>,
        pods: Vec<HeldPod>,
        pinned: Vec<HeldPod>,
        at: Duration,
    ) {
        self.session += 1;
        self.engine.shim(
            ShimEvent::Connected {
                node: node.into(),
                session: self.session,
                version: "test".into(),
                interfaces: vec![],
                held,
                pods,
                pinned,
            },
            self.t0 + at,
        );
        self.flush(at);
    }

    /// Heartbeats from the shims of `nodes` (sessions as numbered by their `connect`), at `at`.
    fn heartbeats(&mut self, nodes: &[(&str, u64)], at: Duration) {
        for (node, session) in nodes {
            self.engine.shim(
                ShimEvent::Heartbeat {
                    node: (*node).into(),
                    session: *session,
                },
                self.t0 + at,
            );
        }
    }

    /// `node`'s shim acknowledges the latest generation published for it.
    fn ack(&mut self, node: &str, session: u64, at: Duration) {
        self.ack_with_errors(node, session, vec![], at);
    }

    fn ack_with_errors(&mut self, node: &str, session: u64, errors: Vec<(EntryKey, String)>, at: Duration) {
        let generation = self.engine.generation(node).unwrap();
        self.engine.shim(
            ShimEvent::Ack {
                node: node.into(),
                session,
                generation,
                errors,
                conflicts: vec![],
            },
            self.t0 + at,
        );
        self.flush(at);
    }

    /// The latest status of each policy written since the last call.
    fn statuses(&mut self) -> BTreeMap<String, StatusUpdate> {
        self.engine
            .take_status()
            .into_iter()
            .map(|u| (u.outcome.name.clone(), u))
            .collect()
    }

    /// All shims connected and up to date at `at`, `preferred` (the pod's gateway) leaves the
    /// policy while its shim lives on (its label removed: a planned move), and `other`, the new
    /// gateway, acknowledges the pod's entry.
    fn move_away(&mut self, preferred: &str, other: &str, at: Duration) {
        self.connect_all(preferred, other);
        self.ack_all(preferred, other, at);
        self.unlabel(preferred, at);
        self.ack(other, 3, at + Duration::from_millis(10));
    }

    /// Gateway `node` loses its label (a planned move: its shim lives on), flushed at `at`.
    fn unlabel(&mut self, node_name: &str, at: Duration) {
        let unlabelled = NodeInfo {
            labels: BTreeMap::new(),
            ..node(node_name, &ip_of(node_name).to_string(), false)
        };
        self.engine
            .source(SourceEvent::Change(Box::new(Change::UpsertNode(unlabelled))));
        self.flush(at);
    }

    /// The gateways draining the policy's flows in its latest status: (node, pods).
    fn draining(&mut self) -> Vec<(String, u64)> {
        self.statuses()["egress"]
            .draining
            .iter()
            .map(|d| (d.node.clone(), d.pods))
            .collect()
    }

    /// Whether `node`'s latest view holds the pod's entry.
    fn holds_pod(&self, node: &str) -> bool {
        let view = self.hub.subscribe(node).borrow().clone();
        view.is_some_and(|v| v.entries.keys().any(|k| k.source.to_string() == "10.1.0.10"))
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
fn what_the_datapaths_hold_is_adopted_without_any_status() {
    // The `dir:` source has no status to read back: the datapath is the truth. Either the pod's
    // node (its pod is steered to `other`) or `other` itself (it serves the slot) says so.
    let (preferred, other) = preferred_and_other();
    let held = || {
        vec![HeldDuty {
            policy: "egress".into(),
            entry: 0,
            slot: 0,
            gateway: ip_of(other),
        }]
    };
    for (order, reporter) in [
        (["w", preferred, other], "w"),
        (["w", preferred, other], other),
        ([other, "w", preferred], other),
        ([preferred, other, "w"], "w"),
    ] {
        let mut s = Started::new(policy(vec![]));
        for (i, node) in order.iter().enumerate() {
            let report = if *node == reporter { held() } else { vec![] };
            s.connect(node, report, Duration::from_millis(100 * (i as u64 + 1)));
        }
        assert_eq!(
            s.targets(),
            vec![GatewayTarget::Node(ip_of(other))],
            "{order:?}, reported by {reporter}: the slot stays where the datapaths have it"
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
    let from_a: Vec<u64> = (0..5).map(|_| a.advance()).collect();
    let from_b: Vec<u64> = (0..5).map(|_| b.advance()).collect();
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

/// Three shims back and settled, the pod steered to `preferred`; then `preferred` falls silent
/// and the others keep heartbeating until the failover. Returns the time reached.
fn failover(s: &mut Started, preferred: &str, other: &str) -> Duration {
    s.connect_all(preferred, other);
    assert_eq!(s.targets(), vec![GatewayTarget::Node(ip_of(preferred))]);
    s.ack("w", 1, Duration::from_millis(300));
    s.ack(other, 3, Duration::from_millis(300));
    let mut at = Duration::from_millis(300);
    while !s.holds_pod(other) {
        at += Duration::from_millis(50);
        assert!(at < Duration::from_secs(5), "no failover");
        s.heartbeats(&[("w", 1), (other, 3)], at);
        s.flush(at);
    }
    at
}

#[test]
fn a_pod_switches_to_a_new_gateway_only_once_that_gateway_holds_its_entry() {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(policy(vec![]));
    let at = failover(&mut s, preferred, other);
    // The new gateway has been told; the pod's node not yet.
    assert_eq!(s.targets(), vec![GatewayTarget::Node(ip_of(preferred))]);
    s.heartbeats(&[("w", 1), (other, 3)], at);
    s.flush(at);
    assert_eq!(s.targets(), vec![GatewayTarget::Node(ip_of(preferred))]);
    // Once it acknowledges, the pod's node switches.
    s.ack(other, 3, at + Duration::from_millis(5));
    assert_eq!(
        s.targets(),
        vec![
            GatewayTarget::Node(ip_of(preferred)),
            GatewayTarget::Node(ip_of(other))
        ]
    );
}

#[test]
fn a_switch_waits_for_the_new_gateway_no_longer_than_the_grace_period() {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(policy(vec![]));
    let mut at = failover(&mut s, preferred, other);
    let switch_by = at + GRACE;
    while s.targets().len() < 2 {
        at += Duration::from_millis(50);
        assert!(
            at <= switch_by + Duration::from_millis(50),
            "still waiting at {at:?}"
        );
        s.heartbeats(&[("w", 1), (other, 3)], at);
        s.flush(at);
    }
    assert!(at >= switch_by, "switched at {at:?} without an acknowledgement");
    assert_eq!(s.targets()[1], GatewayTarget::Node(ip_of(other)));
}

#[test]
fn programmed_follows_each_policys_own_generation_and_names_what_failed() {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(policy(vec![]));
    let mut second = policy(vec![]);
    second.name = "second".into();
    second.spec.destination_cidrs = vec!["198.51.100.0/24".into()];
    s.engine.source(SourceEvent::Change(Box::new(Change::UpsertPolicy(
        second.clone(),
    ))));
    s.connect_all(preferred, other);
    let at = Duration::from_millis(400);
    s.ack_all(preferred, other, at);
    let st = s.statuses();
    for p in ["egress", "second"] {
        assert_eq!(
            (st[p].programmed, st[p].to_program),
            (2, 2),
            "{p}: {:?}",
            st[p].behind
        );
    }

    // `second` changes: the pod's node and the gateway get a new generation.
    second.spec.destination_cidrs = vec!["198.51.100.0/25".into()];
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertPolicy(second))));
    s.flush(at);
    let st = s.statuses();
    assert!(
        st.get("egress").is_none_or(|u| u.programmed == u.to_program),
        "a policy whose entries did not change stays programmed: {:?}",
        st.get("egress")
    );
    assert_eq!(st["second"].programmed, 0);
    assert!(st["second"].behind.iter().all(|b| b.why == Behind::Pending));

    // The pod's node acknowledges, but could not program one entry of `second`.
    let key = EntryKey {
        source: "10.1.0.10".parse().unwrap(),
        destination: "198.51.100.0/25".parse().unwrap(),
    };
    s.ack_with_errors("w", 1, vec![(key, "the policy map is full".into())], at);
    s.ack(preferred, 2, at);
    let st = s.statuses();
    let second = &st["second"];
    assert_eq!((second.programmed, second.to_program), (1, 2));
    assert_eq!(second.behind.len(), 1);
    assert_eq!(second.behind[0].node, "w");
    assert_eq!(
        second.behind[0].to_string(),
        "w: 10.1.0.10 -> 198.51.100.0/25: the policy map is full"
    );
    assert!(st.get("egress").is_none_or(|u| u.programmed == u.to_program));
}

/// The in-cluster set of the view last published for `node`, as strings, and its generation.
fn cluster_of(hub: &Hub, node: &str) -> (Vec<String>, u64) {
    let view = hub.subscribe(node).borrow().clone().expect("a published view");
    (
        view.cluster_cidrs.iter().map(ToString::to_string).collect(),
        view.generation,
    )
}

#[test]
fn a_node_added_with_a_pod_cidr_changes_every_nodes_cluster_set() {
    let mut s = Started::new(policy(vec![]));
    for (i, node) in ["w", "g1", "g2"].into_iter().enumerate() {
        s.connect(node, vec![], Duration::from_millis(10 * (i as u64 + 1)));
    }
    let before: Vec<(Vec<String>, u64)> = ["w", "g1", "g2"].map(|n| cluster_of(&s.hub, n)).into();
    for (cluster, _) in &before {
        assert_eq!(cluster, &["192.168.0.1/32", "192.168.0.11/32", "192.168.0.12/32"]);
    }
    let entries_before = s.hub.subscribe("w").borrow().clone().unwrap().entries.clone();

    let mut added = node("n4", "192.168.0.4", false);
    added.pod_cidrs = vec!["10.1.4.0/24".parse().unwrap()];
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertNode(added.clone()))));
    s.flush(Duration::from_millis(100));
    for (node, (_, generation)) in ["w", "g1", "g2"].into_iter().zip(&before) {
        let (cluster, now) = cluster_of(&s.hub, node);
        assert_eq!(
            cluster,
            [
                "10.1.4.0/24",
                "192.168.0.1/32",
                "192.168.0.4/32",
                "192.168.0.11/32",
                "192.168.0.12/32"
            ],
            "{node}"
        );
        assert!(now > *generation, "{node} got a new generation");
    }
    assert_eq!(s.engine.cluster_cidrs().len(), 5);
    // The entries did not move: only the set changed.
    assert_eq!(
        s.hub.subscribe("w").borrow().clone().unwrap().entries,
        entries_before
    );

    // A change of the node that leaves the set as it is publishes nothing.
    let published = cluster_of(&s.hub, "w").1;
    added.labels = labels(&[("zone", "b")]);
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertNode(added))));
    s.flush(Duration::from_millis(200));
    assert_eq!(cluster_of(&s.hub, "w").1, published);

    // Service CIDRs from the source join it; removing the node takes its part away.
    s.engine
        .source(SourceEvent::ServiceCidrs(vec!["10.96.0.0/12".parse().unwrap()]));
    s.engine
        .source(SourceEvent::Change(Box::new(Change::RemoveNode("n4".into()))));
    s.flush(Duration::from_millis(300));
    for node in ["w", "g1", "g2"] {
        assert_eq!(
            cluster_of(&s.hub, node).0,
            [
                "10.96.0.0/12",
                "192.168.0.1/32",
                "192.168.0.11/32",
                "192.168.0.12/32"
            ],
            "{node}"
        );
    }
}

#[test]
fn service_cidrs_of_the_flag_and_of_the_source_are_both_in_the_cluster_set() {
    let (hub, _events) = Hub::new(GRACE / 4);
    let config = EngineConfig {
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ..EngineConfig::with_grace(GRACE)
    };
    let mut engine = Engine::new(config, hub.clone(), EngineMetrics::default());
    let t0 = Instant::now();
    let mut w = node("w", "192.168.0.1", false);
    w.pod_cidrs = vec!["10.1.0.0/24".parse().unwrap()];
    engine.source(SourceEvent::Change(Box::new(Change::UpsertNode(w))));
    engine.source(SourceEvent::ServiceCidrs(vec![
        "10.97.0.0/16".parse().unwrap(),
        "10.96.0.0/16".parse().unwrap(),
    ]));
    engine.source(SourceEvent::Synced);
    engine.shim(
        ShimEvent::Connected {
            node: "w".into(),
            session: 1,
            version: "test".into(),
            interfaces: vec![],
            held: vec![],
            pods: vec![],
            pinned: vec![],
        },
        t0,
    );
    engine.flush(t0);
    assert_eq!(
        cluster_of(&hub, "w").0,
        ["10.1.0.0/24", "10.96.0.0/16", "10.97.0.0/16", "192.168.0.1/32"]
    );
}

#[test]
fn every_node_learns_which_of_its_pods_are_decided_and_what_drop_policies_guard() {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(policy(vec![]));
    s.connect_all(preferred, other);
    let guard = |s: &Started, node: &str| s.hub.subscribe(node).borrow().clone().unwrap().guard.clone();
    let g = guard(&s, "w");
    assert_eq!(g.destinations, vec!["203.0.113.0/24".parse().unwrap()]);
    assert_eq!(g.decided_pods, vec!["10.1.0.10".parse::<IpAddr>().unwrap()]);
    assert!(guard(&s, preferred).decided_pods.is_empty());

    // A pod no policy selects still becomes decided on its node: a new view, though no entry
    // changed anywhere.
    let before = s.engine.generation("w").unwrap();
    let mut web = pod();
    web.uid = "uid-web".into();
    web.name = "web".into();
    web.labels = labels(&[("app", "web")]);
    web.ips = vec!["10.1.0.11".parse().unwrap()];
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertPod(web))));
    s.flush(Duration::from_millis(400));
    assert!(s.engine.generation("w").unwrap() > before);
    assert_eq!(guard(&s, "w").decided_pods.len(), 2);

    // Without a Drop policy, nothing is guarded.
    let mut fallback = policy(vec![]);
    fallback.spec.failure_policy = Some(FailurePolicy::Fallback);
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertPolicy(fallback))));
    s.flush(Duration::from_millis(500));
    assert!(guard(&s, "w").destinations.is_empty());
    assert!(guard(&s, other).destinations.is_empty());
}

#[test]
fn a_new_pod_is_decided_only_with_its_entries() {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(policy(vec![]));
    s.connect_all(preferred, other);
    s.ack_all(preferred, other, Duration::from_millis(300));
    let view = |s: &Started| s.hub.subscribe("w").borrow().clone().unwrap();
    let mut new = pod();
    new.uid = "uid-new".into();
    new.name = "new".into();
    new.ips = vec!["10.1.0.12".parse().unwrap()];
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertPod(new))));
    s.flush(Duration::from_millis(400));
    // The gateway learns of the pod first; until it acknowledges, the pod's node neither steers
    // it nor counts it as decided (its traffic to guarded destinations is dropped, not leaked).
    let new_ip: IpAddr = "10.1.0.12".parse().unwrap();
    let steers = |v: &NodeView| v.entries.keys().any(|k| k.source == new_ip);
    assert!(!steers(&view(&s)));
    assert!(!view(&s).guard.decided_pods.contains(&new_ip));
    s.ack(preferred, 2, Duration::from_millis(410));
    assert!(steers(&view(&s)));
    assert!(view(&s).guard.decided_pods.contains(&new_ip));
}

/// Heartbeats as the node channel's sessions report them: stamped in the hub, with their time.
fn stamp(s: &Started, sessions: &[u64], at: Duration) {
    for session in sessions {
        s.hub.heard(*session, s.t0 + at);
    }
}

#[test]
fn heartbeats_stamped_while_the_engine_was_busy_keep_their_shims_alive() {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(policy(vec![]));
    s.connect_all(preferred, other);
    let generation = s.engine.generation("w");
    // The engine does not look for three seconds (a long flush), while every session keeps
    // stamping its shim's heartbeats.
    let mut at = Duration::from_millis(300);
    while at < Duration::from_secs(3) {
        at += Duration::from_millis(250);
        stamp(&s, &[1, 2, 3], at);
    }
    s.flush(at + Duration::from_millis(50));
    assert_eq!(s.engine.generation("w"), generation, "nothing changed");
    assert_eq!(s.targets(), vec![GatewayTarget::Node(ip_of(preferred))]);

    // Once `preferred`'s session stops stamping, it is replaced after the grace period.
    let silent_from = at;
    while !s.holds_pod(other) {
        at += Duration::from_millis(50);
        assert!(at < silent_from + 3 * GRACE, "no failover");
        stamp(&s, &[1, 3], at);
        s.flush(at);
    }
    assert!(
        at > silent_from + GRACE,
        "replaced at {at:?}, silent since {silent_from:?}"
    );

    // Back on the same session within the grace period: usable again.
    let gateways = |s: &Started| {
        s.engine
            .planner()
            .policy_outcome("egress")
            .unwrap()
            .gateways
            .len()
    };
    while gateways(&s) > 0 {
        at += Duration::from_millis(50);
        assert!(at < silent_from + 10 * GRACE, "never lost");
        stamp(&s, &[1], at);
        s.flush(at);
    }
    stamp(&s, &[1, 2], at + Duration::from_millis(10));
    s.flush(at + Duration::from_millis(20));
    assert_eq!(
        s.engine.planner().policy_outcome("egress").unwrap().gateways[0]
            .node
            .as_ref(),
        preferred
    );
}

/// Counts the events logged at INFO or above.
#[derive(Clone, Default)]
struct LogCounter(Arc<std::sync::atomic::AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() <= tracing::Level::INFO {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[test]
fn at_rest_nothing_is_published_written_or_logged() {
    use tracing_subscriber::layer::SubscriberExt;

    let (preferred, other) = preferred_and_other();
    let mut second = policy(vec![]);
    second.name = "second".into();
    second.spec.destination_cidrs = vec!["198.51.100.0/24".into()];
    let mut s = Started::new(policy(vec![]));
    s.engine.source(SourceEvent::Change(Box::new(Change::UpsertPolicy(
        second.clone(),
    ))));
    s.connect_all(preferred, other);
    s.ack_all(preferred, other, Duration::from_millis(300));
    s.flush(Duration::from_millis(350));
    assert!(!s.statuses().is_empty());
    s.engine.take_notices();
    let mut views: Vec<_> = ["w", preferred, other].map(|n| s.hub.subscribe(n)).into();
    for v in &mut views {
        v.borrow_and_update();
    }
    let generations = ["w", preferred, other].map(|n| s.engine.generation(n));

    // Ten seconds at rest: heartbeats, ticks and flushes, and now and then the whole source
    // state again, unchanged (as a source that relists does).
    let logged = LogCounter::default();
    let subscriber = tracing_subscriber::registry().with(logged.clone());
    let (mut statuses, mut notices) = (0, 0);
    tracing::subscriber::with_default(subscriber, || {
        let mut at = Duration::from_millis(350);
        for tick in 0..200 {
            at += Duration::from_millis(50);
            if tick % 5 == 0 {
                stamp(&s, &[1, 2, 3], at);
            }
            if tick % 40 == 0 {
                for n in nodes() {
                    s.engine
                        .source(SourceEvent::Change(Box::new(Change::UpsertNode(n))));
                }
                for p in [policy(vec![]), second.clone()] {
                    s.engine
                        .source(SourceEvent::Change(Box::new(Change::UpsertPolicy(p))));
                }
                s.engine
                    .source(SourceEvent::Change(Box::new(Change::UpsertPod(pod()))));
            }
            s.flush(at);
            statuses += s.engine.take_status().len();
            notices += s.engine.take_notices().len();
        }
    });
    let published: usize = views.iter().filter(|v| v.has_changed().unwrap()).count();
    assert_eq!(
        (
            published,
            statuses,
            notices,
            logged.0.load(std::sync::atomic::Ordering::Relaxed)
        ),
        (0, 0, 0, 0),
        "views published, statuses written, notices, log lines"
    );
    assert_eq!(
        ["w", preferred, other].map(|n| s.engine.generation(n)),
        generations
    );
}

/// `policy` with one managed address instead of the node's own.
fn managed_policy() -> PolicyInput {
    let mut p = policy(vec![]);
    p.spec.egress_gateway.as_mut().unwrap().egress_ips = vec![MANAGED.into()];
    p
}

const MANAGED: &str = "192.0.2.150";

/// The duty for the managed address in the view last published for `node`, if any.
fn managed_duty(hub: &Hub, node: &str) -> Option<sluice_operator::planner::GatewayDuty> {
    let view = hub.subscribe(node).borrow().clone()?;
    view.duties
        .iter()
        .find(|d| d.managed && d.egress_ips.contains(&MANAGED.parse().unwrap()))
        .cloned()
}

/// Every shim connected and at its latest generation, the managed address on `preferred`.
fn managed_started() -> (Started, &'static str, &'static str, Duration) {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(managed_policy());
    s.connect_all(preferred, other);
    let at = Duration::from_millis(400);
    s.ack_all(preferred, other, at);
    let duty = managed_duty(&s.hub, preferred).expect("the first gateway holds the address");
    assert!(!duty.awaiting_release);
    assert!(managed_duty(&s.hub, other).is_none());
    (s, preferred, other, at)
}

/// The state of the managed address in the latest status written since the last call.
fn managed_state(s: &mut Started) -> Option<String> {
    let st = s.statuses();
    let update = st.get("egress")?;
    update
        .managed_ips()
        .next()
        .map(|(_, holder, holding)| format!("{}: {holding:?}", holder.map_or("-", |g| &*g.node)))
}

/// A planned move (the gateway loses its label): the new node is told to wait until the old
/// one has acknowledged letting go, and only then to claim; meanwhile the address is `Moving`.
#[test]
fn a_planned_move_of_a_managed_address_waits_for_the_old_node_to_let_go() {
    let (mut s, preferred, other, at) = managed_started();
    let _ = s.statuses();
    s.unlabel(preferred, at);
    assert!(managed_duty(&s.hub, preferred).is_none(), "the old node lets go");
    let waiting = managed_duty(&s.hub, other).expect("the new node has the duty");
    assert!(waiting.awaiting_release, "it waits for the release");
    // The new node acknowledges its waiting duty: still moving.
    s.ack(other, 3, at);
    assert_eq!(
        managed_state(&mut s).as_deref(),
        Some(&*format!("{other}: Moving"))
    );
    // The old node acknowledges the release: the new node may claim.
    s.ack(preferred, 2, at + Duration::from_millis(10));
    assert!(!managed_duty(&s.hub, other).unwrap().awaiting_release);
    s.ack(other, 3, at + Duration::from_millis(20));
    assert_eq!(
        managed_state(&mut s).as_deref(),
        Some(&*format!("{other}: Assigned"))
    );
}

/// An old node that never acknowledges (its shim stuck, but heartbeating) holds the move up for
/// one grace period, no longer.
#[test]
fn a_release_not_acknowledged_holds_the_new_node_up_for_one_grace_period() {
    let (mut s, preferred, other, at) = managed_started();
    s.unlabel(preferred, at);
    assert!(managed_duty(&s.hub, other).unwrap().awaiting_release);
    let mut t = at;
    while managed_duty(&s.hub, other).unwrap().awaiting_release {
        t += Duration::from_millis(50);
        assert!(
            t <= at + GRACE + Duration::from_millis(50),
            "still waiting at {t:?}"
        );
        s.heartbeats(&[("w", 1), (preferred, 2), (other, 3)], t);
        s.flush(t);
    }
    assert!(t >= at + GRACE, "claimed at {t:?} without a release");
    assert!(
        s.engine.next_tick(s.t0 + at) <= s.t0 + at + GRACE,
        "the clock wakes for the deadline"
    );
}

/// A failure is no planned move: the new node claims at once.
#[test]
fn after_a_failure_the_new_node_claims_a_managed_address_at_once() {
    let (mut s, _preferred, other, at) = managed_started();
    let mut t = at;
    while managed_duty(&s.hub, other).is_none() {
        t += Duration::from_millis(50);
        assert!(t < at + 3 * GRACE, "no failover");
        s.heartbeats(&[("w", 1), (other, 3)], t);
        s.flush(t);
    }
    assert!(!managed_duty(&s.hub, other).unwrap().awaiting_release);
}

/// A younger policy naming the older one's managed address says so in its status.
#[test]
fn a_managed_address_of_an_older_policy_is_a_conflict_in_the_younger_s_status() {
    let (mut s, _preferred, _other, at) = managed_started();
    let mut younger = managed_policy();
    younger.name = "younger".into();
    younger.created = Some(i64::MAX - 1);
    let mut older = managed_policy();
    older.created = Some(1);
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertPolicy(older))));
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertPolicy(younger))));
    s.flush(at);
    let st = s.statuses();
    let states: Vec<String> = st["younger"]
        .managed_ips()
        .map(|(ip, holder, holding)| format!("{ip} {:?} {holding:?}", holder.map(|g| g.node.to_string())))
        .collect();
    assert_eq!(
        states,
        [format!(
            "{MANAGED} None Conflict(\"held by the older policy egress\")"
        )]
    );
}

/// After a restart or a leader change, each pod stays on the gateway its node's datapath steers
/// it to, even where placing it afresh would pick the other gateway (that would move it off a
/// working gateway and break its connections).
#[test]
fn a_new_leader_keeps_each_pod_on_the_gateway_the_datapaths_hold() {
    let mut two = policy(vec![]);
    two.spec.egress_gateway.as_mut().unwrap().max_gateway_nodes = Some(2);
    let fresh = Planner::from_snapshot([], nodes(), [two.clone()], [pod()]);
    let outcome = fresh.policy_outcome("egress").unwrap();
    assert_eq!(outcome.gateways.len(), 2);
    let placed = fresh
        .node_plan("w")
        .values()
        .find_map(|e| match e.gateway {
            GatewayTarget::Node(ip) => Some(ip),
            _ => None,
        })
        .unwrap();
    // The datapath holds the pod on the gateway a fresh placement would not pick.
    let held_on = if placed == ip_of("g1") { "g2" } else { "g1" };
    let slots: Vec<HeldDuty> = outcome
        .gateways
        .iter()
        .map(|g| HeldDuty {
            policy: "egress".into(),
            entry: g.entry,
            slot: g.slot,
            gateway: g.ip,
        })
        .collect();
    for adopt in [false, true] {
        let mut s = Started::new(two.clone());
        let pods = if adopt {
            vec![HeldPod {
                policy: "egress".into(),
                pod: "10.1.0.10".parse().unwrap(),
                gateway: ip_of(held_on),
            }]
        } else {
            vec![]
        };
        s.connect_holding("w", slots.clone(), pods, Duration::from_millis(100));
        s.connect("g1", slots.clone(), Duration::from_millis(150));
        s.connect("g2", slots.clone(), Duration::from_millis(200));
        let first = s.targets();
        if adopt {
            assert_eq!(first, vec![GatewayTarget::Node(ip_of(held_on))]);
        } else {
            assert_eq!(first, vec![GatewayTarget::Node(placed)], "the test's premise");
        }
    }
}

/// A planned move (the gateway loses its label, its shim lives on): once the new gateway holds
/// the pod's entry, the old one keeps it and the pod's node may pin to it, the status says the
/// old gateway is draining one pod; when the old gateway's shim goes silent, the drain ends at
/// once and the pod's node stops pinning to it.
#[test]
fn a_gateway_moved_away_from_drains_its_pods_open_flows_until_it_goes() {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(policy(vec![]));
    let at = Duration::from_millis(400);
    s.move_away(preferred, other, at);
    assert!(s.holds_pod(preferred), "the old gateway keeps the pod's entry");
    let w = s.hub.subscribe("w").borrow().clone().unwrap();
    assert_eq!(*w.pinnable, [ip_of(preferred)]);
    assert_eq!(s.draining(), [(preferred.to_owned(), 1)]);
    let drain_started = s
        .engine
        .take_notices()
        .into_iter()
        .any(|n| matches!(n, Notice::DrainStarted { ref node, .. } if node == preferred));
    assert!(drain_started);

    // The old gateway's shim goes silent: its drain ends with it.
    let mut t = at + Duration::from_millis(10);
    while s.holds_pod(preferred) {
        t += Duration::from_millis(50);
        assert!(t < at + GRACE * 3, "the drain outlived the gateway");
        s.heartbeats(&[("w", 1), (other, 3)], t);
        s.flush(t);
    }
    let w = s.hub.subscribe("w").borrow().clone().unwrap();
    assert!(w.pinnable.is_empty());
    assert!(s.statuses()["egress"].draining.is_empty());
}

/// A new leader in the middle of a drain: the pod's node steers the pod to the new gateway and
/// reports its open flows pinned to the draining one, which reports the slot it had (its
/// lingering entries carry it) beside the new gateway's report of the same slot. The first
/// publication keeps the pod where its node steers it, puts the pod's entry back on the
/// draining gateway, lets the pod's node pin there, and the status says it is draining;
/// without the report of pinned flows nothing lingers (the test's premise).
#[test]
fn a_new_leader_puts_back_the_entries_of_flows_pinned_to_a_draining_gateway() {
    let (preferred, other) = preferred_and_other();
    let slot = |gateway: &str| HeldDuty {
        policy: "egress".into(),
        entry: 0,
        slot: 0,
        gateway: ip_of(gateway),
    };
    let pod_ip: IpAddr = "10.1.0.10".parse().unwrap();
    for report in [true, false] {
        let mut s = Started::new(policy(vec![]));
        let draining = NodeInfo {
            draining: true,
            ..node(preferred, &ip_of(preferred).to_string(), true)
        };
        s.engine
            .source(SourceEvent::Change(Box::new(Change::UpsertNode(draining))));
        let pinned = if report {
            vec![HeldPod {
                policy: "egress".into(),
                pod: pod_ip,
                gateway: ip_of(preferred),
            }]
        } else {
            vec![]
        };
        let steered = vec![HeldPod {
            policy: "egress".into(),
            pod: pod_ip,
            gateway: ip_of(other),
        }];
        // The draining gateway reports first, so that its claim on the slot comes first.
        s.connect(preferred, vec![slot(preferred)], Duration::from_millis(100));
        s.connect_reporting(
            "w",
            vec![slot(other)],
            steered,
            pinned,
            Duration::from_millis(150),
        );
        s.connect(other, vec![slot(other)], Duration::from_millis(200));
        assert!(!s.engine.settling());
        assert_eq!(s.targets(), vec![GatewayTarget::Node(ip_of(other))]);
        assert!(s.holds_pod(other));
        let w = s.hub.subscribe("w").borrow().clone().unwrap();
        if !report {
            assert!(!s.holds_pod(preferred), "the premise: nothing lingers unreported");
            assert!(w.pinnable.is_empty());
            continue;
        }
        assert!(
            s.holds_pod(preferred),
            "the draining gateway keeps the pod's entry"
        );
        let kept = s.hub.subscribe(preferred).borrow().clone().unwrap();
        let entry = kept.entries.values().find(|e| e.key.source == pod_ip).unwrap();
        assert_eq!(entry.gateway, GatewayTarget::Node(ip_of(preferred)));
        assert_eq!(entry.source_node_ip, Some(ip_of("w")));
        assert_eq!(*w.pinnable, [ip_of(preferred)]);
        assert_eq!(s.draining(), [(preferred.to_owned(), 1)]);
    }
}

/// A drain ends when its flows do: the pod's node counts the open flows its pod has pinned to
/// the old gateway; the status shows them, and once the node counts none left there (and not
/// before the least lingering time), the old gateway lets go of the pod's entry and the drain
/// is over, long before its timeout.
#[test]
fn a_drain_ends_when_the_pods_node_counts_no_flow_left() {
    let (preferred, other) = preferred_and_other();
    let mut s = Started::new(policy(vec![]));
    let at = Duration::from_millis(400);
    s.move_away(preferred, other, at);
    assert!(s.holds_pod(preferred), "the old gateway keeps the pod's entry");
    let _ = s.statuses();
    let pod_ip: IpAddr = "10.1.0.10".parse().unwrap();
    let report = |s: &mut Started, flows: u64, t: Duration| {
        let counted = ((pod_ip, "egress".to_owned(), ip_of(preferred)), flows);
        let counts = PinnedCounts::new([ip_of(preferred)], (flows > 0).then_some(counted));
        s.engine.shim(
            ShimEvent::PinnedFlows {
                node: "w".into(),
                session: 1,
                counts,
            },
            s.t0 + t,
        );
        s.flush(t);
    };
    let t = at + Duration::from_millis(100);
    report(&mut s, 2, t);
    let flows: Vec<Option<u64>> = s.statuses()["egress"].draining.iter().map(|d| d.flows).collect();
    assert_eq!(flows, [Some(2)]);

    // None left, early: the entry stays until the least lingering time has passed.
    let t = at + Duration::from_secs(1);
    report(&mut s, 0, t);
    assert!(
        s.holds_pod(preferred),
        "a count this early may not know the newest flow"
    );
    let mut t = t;
    while s.holds_pod(preferred) {
        t += Duration::from_millis(500);
        assert!(t < at + Duration::from_secs(15), "the drain outlived its flows");
        s.heartbeats(&[("w", 1), (preferred, 2), (other, 3)], t);
        s.flush(t);
    }
    assert!(
        t >= at + Duration::from_secs(10),
        "ended before the least lingering time: {t:?}"
    );
    let w = s.hub.subscribe("w").borrow().clone().unwrap();
    assert!(w.pinnable.is_empty());
    let drained = s
        .engine
        .take_notices()
        .into_iter()
        .any(|n| matches!(n, Notice::DrainEnded { ref node, .. } if node == preferred));
    assert!(drained);
}

/// A pod on its own gateway node moved off it by a planned change keeps no entry there (its
/// entry there is the new one), but its node stays pinnable for itself, so that the flows that
/// left from there stay; and a pod whose own node becomes its gateway: its previous gateway
/// keeps its entry for its pinned flows, once the pod's node holds the new one.
#[test]
fn a_pod_on_its_own_gateway_node_keeps_its_flows_both_ways() {
    let (preferred, other) = preferred_and_other();
    for on in [preferred, other] {
        let pod = PodInfo {
            node_name: Some(on.into()),
            ..pod()
        };
        let mut s = Started::with_pod(policy(vec![]), pod);
        let at = Duration::from_millis(400);
        s.move_away(preferred, other, at);
        let t = at + Duration::from_millis(20);
        for (node, session) in [(preferred, 2), (other, 3)] {
            s.ack(node, session, t);
        }
        s.flush(t);
        let view = |n: &str| s.hub.subscribe(n).borrow().clone().unwrap();
        let steered_to = |n: &str| {
            view(n)
                .entries
                .values()
                .find(|e| e.key.source.to_string() == "10.1.0.10")
                .map(|e| e.gateway)
        };
        assert_eq!(
            steered_to(on),
            Some(GatewayTarget::Node(ip_of(other))),
            "the pod moved"
        );
        assert_eq!(*view(on).pinnable, [ip_of(preferred)], "pod on {on}");
        assert_eq!(s.draining(), [(preferred.to_owned(), 1)]);
        if on == other {
            assert!(
                s.holds_pod(preferred),
                "the previous gateway keeps the pod's entry"
            );
        }
    }
}

/// A new leader in the middle of a drain of a pod's own gateway node: the node reports its
/// pod's flows pinned to leaving from there; the first publication keeps the node pinnable for
/// itself (it keeps no entry: the pod's entry there is the new one), and the drain shows.
#[test]
fn a_new_leader_keeps_a_draining_node_pinnable_for_its_own_pods_flows() {
    let (preferred, other) = preferred_and_other();
    let pod_ip: IpAddr = "10.1.0.10".parse().unwrap();
    let pod = PodInfo {
        node_name: Some(preferred.into()),
        ..pod()
    };
    let mut s = Started::with_pod(policy(vec![]), pod);
    let draining = NodeInfo {
        draining: true,
        ..node(preferred, &ip_of(preferred).to_string(), true)
    };
    s.engine
        .source(SourceEvent::Change(Box::new(Change::UpsertNode(draining))));
    let slot = HeldDuty {
        policy: "egress".into(),
        entry: 0,
        slot: 0,
        gateway: ip_of(other),
    };
    let held = |gateway: &str| HeldPod {
        policy: "egress".into(),
        pod: pod_ip,
        gateway: ip_of(gateway),
    };
    s.connect("w", vec![], Duration::from_millis(100));
    s.connect_reporting(
        preferred,
        vec![slot.clone()],
        vec![held(other)],
        vec![held(preferred)],
        Duration::from_millis(150),
    );
    s.connect(other, vec![slot], Duration::from_millis(200));
    assert!(!s.engine.settling());
    let view = s.hub.subscribe(preferred).borrow().clone().unwrap();
    let steered = view.entries.values().find(|e| e.key.source == pod_ip).unwrap();
    assert_eq!(steered.gateway, GatewayTarget::Node(ip_of(other)));
    assert_eq!(*view.pinnable, [ip_of(preferred)]);
    assert_eq!(s.draining(), [(preferred.to_owned(), 1)]);
}

/// `spec.drainTimeout: 0s`: a gateway moved away from lets go of the pod at once (its open
/// connections follow the pod to the new gateway, and end there).
#[test]
fn a_policy_with_no_drain_time_keeps_nothing_on_the_old_gateway() {
    let (preferred, other) = preferred_and_other();
    let mut no_drain = policy(vec![]);
    no_drain.spec.drain_timeout = Some("0s".into());
    let mut s = Started::new(no_drain);
    let at = Duration::from_millis(400);
    s.move_away(preferred, other, at);
    assert!(!s.holds_pod(preferred), "nothing lingers");
    let w = s.hub.subscribe("w").borrow().clone().unwrap();
    assert!(w.pinnable.is_empty());
}
