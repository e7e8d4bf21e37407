//! The node channel with a real server and real clients in one process: plans, deltas, acks,
//! reconnects without flaps, credentials, node isolation, slow clients, failover.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_operator::{
    auth::{StaticTokens, TokenVerifier},
    engine::{Engine, EngineConfig, EngineMetrics, Hub},
    grpc::{self, NodeService, Tls},
    live::{Notice, SourceEvent, StatusUpdate},
    manifests::Manifests,
    planner::Change,
};
use sluice_proto::{
    EntryDoc, GatewayTarget,
    client::{self, Applied, Config, HelloFn, NodeState, SessionError},
    convert::EntryKey,
    v1::{self, node_channel_client::NodeChannelClient, shim_message},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

const CLUSTER: &str = include_str!("../../examples/quickstart/cluster.yaml");
const POLICY: &str = include_str!("../../examples/quickstart/policy.yaml");

fn manifests(extra: &str) -> Manifests {
    let mut m = Manifests::default();
    m.add_file(Path::new("cluster.yaml"), CLUSTER).unwrap();
    m.add_file(Path::new("policy.yaml"), POLICY).unwrap();
    if !extra.is_empty() {
        m.add_file(Path::new("extra.yaml"), extra).unwrap();
    }
    m
}

fn tokens() -> StaticTokens {
    StaticTokens(
        ["node-a", "node-b", "node-c"]
            .iter()
            .map(|n| (format!("token-{n}"), (*n).to_owned()))
            .collect(),
    )
}

struct Operator {
    addr: SocketAddr,
    sources: mpsc::Sender<SourceEvent>,
    updates: mpsc::Receiver<StatusUpdate>,
    notices: mpsc::Receiver<Notice>,
    current: Manifests,
    _tasks: Vec<JoinHandle<()>>,
}

impl Operator {
    async fn start(verifier: impl TokenVerifier, tls: Option<Tls>, grace: Duration) -> Operator {
        let config = EngineConfig::with_grace(grace);
        let (hub, shim_events) = Hub::new(config.heartbeat_interval);
        let engine = Engine::new(config, hub.clone(), EngineMetrics::default());
        let listener = grpc::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = NodeService::new(hub, Arc::new(verifier));
        let server = tokio::spawn(async move {
            grpc::serve(listener, service, tls, std::future::pending())
                .await
                .unwrap();
        });
        let (sources, sources_rx) = mpsc::channel(1024);
        let (updates_tx, updates) = mpsc::channel(1024);
        let (notices_tx, notices) = mpsc::channel(1024);
        let engine = tokio::spawn(async move {
            sluice_operator::engine::run(engine, sources_rx, shim_events, updates_tx, notices_tx)
                .await
                .unwrap();
        });
        Operator {
            addr,
            sources,
            updates,
            notices,
            current: Manifests::default(),
            _tasks: vec![server, engine],
        }
    }

    async fn load(&mut self, next: Manifests) {
        for change in self.current.changes_to(&next) {
            self.sources
                .send(SourceEvent::Change(Box::new(change)))
                .await
                .unwrap();
        }
        self.current = next;
    }

    async fn change(&self, change: Change) {
        self.sources
            .send(SourceEvent::Change(Box::new(change)))
            .await
            .unwrap();
    }

    async fn synced(&self) {
        self.sources.send(SourceEvent::Synced).await.unwrap();
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn drain_notices(&mut self) -> Vec<Notice> {
        let mut out = Vec::new();
        while let Ok(n) = self.notices.try_recv() {
            out.push(n);
        }
        out
    }
}

/// The maps of a fake datapath: they survive the shim's restarts, like pinned maps.
#[derive(Clone, Default)]
struct Maps {
    entries: Arc<Mutex<BTreeMap<EntryKey, EntryDoc>>>,
    writes: Arc<AtomicU64>,
}

impl Maps {
    fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    /// Like the shim's sync: writes only what differs.
    fn apply(&self, want: &BTreeMap<EntryKey, EntryDoc>) {
        let mut have = self.entries.lock().unwrap();
        let mut writes = 0;
        for (k, v) in want {
            if have.get(k) != Some(v) {
                have.insert(*k, v.clone());
                writes += 1;
            }
        }
        let stale: Vec<EntryKey> = have.keys().filter(|k| !want.contains_key(*k)).copied().collect();
        for k in stale {
            have.remove(&k);
            writes += 1;
        }
        self.writes.fetch_add(writes, Ordering::SeqCst);
    }
}

struct Shim {
    maps: Maps,
    plans: watch::Receiver<Option<Arc<NodeState>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Shim {
    fn start(config: Config, node: &str, maps: Maps) -> Shim {
        let (plans_tx, plans) = watch::channel(None);
        let (applied_tx, applied_rx) = watch::channel(Applied::default());
        let node = node.to_owned();
        let hello: HelloFn = Arc::new(move || v1::Hello {
            node: node.clone(),
            version: "test".into(),
            // The quickstart's egress IP is on every node.
            interfaces: vec![v1::Interface {
                name: "eth0".into(),
                addresses: vec!["203.0.113.10".into()],
            }],
            default_route_interface: Some("eth0".into()),
        });
        let session = tokio::spawn(client::run(config, hello, plans_tx, applied_rx));
        let mut rx = plans.clone();
        let m = maps.clone();
        let applier = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(state) = rx.borrow_and_update().clone() else {
                    continue;
                };
                m.apply(&state.entries);
                applied_tx.send_replace(Applied {
                    generation: state.generation,
                    errors: vec![],
                });
            }
        });
        Shim {
            maps,
            plans,
            tasks: vec![session, applier],
        }
    }

    fn stop(self) -> Maps {
        for t in &self.tasks {
            t.abort();
        }
        self.maps
    }

    fn state(&self) -> Option<Arc<NodeState>> {
        self.plans.borrow().clone()
    }

    /// Waits until the shim's state satisfies `f`.
    async fn wait(&self, what: &str, f: impl Fn(&NodeState) -> bool) -> Arc<NodeState> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.state()
                && f(&s)
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.state()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn config(op: &Operator, node: &str) -> Config {
    let mut c = Config::new(op.url());
    c.token = Some(format!("token-{node}"));
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c
}

fn gateway_of(state: &NodeState, source: &str) -> Option<GatewayTarget> {
    let ip: std::net::IpAddr = source.parse().unwrap();
    state
        .entries
        .iter()
        .find(|((s, _), _)| *s == ip)
        .map(|(_, e)| e.gateway)
}

fn node_b() -> GatewayTarget {
    GatewayTarget::Node("192.168.1.2".parse().unwrap())
}
fn node_c() -> GatewayTarget {
    GatewayTarget::Node("192.168.1.3".parse().unwrap())
}

async fn started() -> (Operator, Shim, Shim, Shim) {
    let mut op = Operator::start(tokens(), None, Duration::from_millis(300)).await;
    op.load(manifests("")).await;
    op.synced().await;
    let a = Shim::start(config(&op, "node-a"), "node-a", Maps::default());
    let b = Shim::start(config(&op, "node-b"), "node-b", Maps::default());
    let c = Shim::start(config(&op, "node-c"), "node-c", Maps::default());
    (op, a, b, c)
}

#[tokio::test]
async fn plan_then_deltas_then_acks() {
    let (mut op, a, b, c) = started().await;
    // checkout-1 (10.244.1.10) on node-a goes through node-b or node-c.
    let s = a
        .wait(
            "checkout-1 steered to a gateway",
            |s| matches!(gateway_of(s, "10.244.1.10"), Some(g) if g == node_b() || g == node_c()),
        )
        .await;
    assert!(s.generation > 0);
    // web-1 is not selected.
    assert_eq!(gateway_of(&s, "10.244.1.11"), None);

    // A new pod: one delta.
    op.load(manifests(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: checkout-3, namespace: shop, uid: u-3, labels: {app: checkout}}\n\
         spec: {nodeName: node-a}\nstatus: {phase: Running, podIPs: [{ip: 10.244.1.12}]}\n",
    ))
    .await;
    let s2 = a
        .wait("checkout-3 steered", |s| gateway_of(s, "10.244.1.12").is_some())
        .await;
    assert!(s2.generation > s.generation);

    // Every shim acknowledges; the status then says every node is programmed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let u = tokio::time::timeout_at(deadline.into(), op.updates.recv())
            .await
            .expect("status with every node programmed")
            .unwrap();
        if u.to_program > 0 && u.programmed == u.to_program && u.outcome.matched_endpoints == 3 {
            break;
        }
    }
    drop((b, c));
}

#[tokio::test]
async fn a_reconnecting_shim_changes_nothing_and_flaps_nothing() {
    let (mut op, a, b, c) = started().await;
    let before = a
        .wait("steered", |s| gateway_of(s, "10.244.1.10").is_some())
        .await;
    let gw = gateway_of(&before, "10.244.1.10").unwrap();
    let (gw_shim, other) = if gw == node_b() { (b, c) } else { (c, b) };
    let gw_node = if gw == node_b() { "node-b" } else { "node-c" };
    gw_shim.wait("gateway plan", |s| !s.serves.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    op.drain_notices();

    // The gateway's shim restarts (its maps persist) within the grace period; so does node-a's.
    let writes_gw = gw_shim.maps.writes();
    let writes_a = a.maps.writes();
    let gw_maps = gw_shim.stop();
    let a_maps = a.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let gw_shim = Shim::start(config(&op, gw_node), gw_node, gw_maps);
    let a = Shim::start(config(&op, "node-a"), "node-a", a_maps);
    gw_shim.wait("resync", |s| !s.serves.is_empty()).await;
    let after = a.wait("resync", |s| gateway_of(s, "10.244.1.10").is_some()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    assert_eq!(
        gateway_of(&after, "10.244.1.10"),
        Some(gw),
        "the gateway did not move"
    );
    assert_eq!(gw_shim.maps.writes(), writes_gw, "no map writes on the gateway");
    assert_eq!(a.maps.writes(), writes_a, "no map writes on node-a");
    let notices = op.drain_notices();
    assert!(notices.is_empty(), "no gateway change: {notices:?}");
    drop(other);
}

#[tokio::test]
async fn a_silent_gateway_is_replaced_and_the_failover_is_timed() {
    let (mut op, a, b, c) = started().await;
    let before = a
        .wait("steered", |s| gateway_of(s, "10.244.1.10").is_some())
        .await;
    let gw = gateway_of(&before, "10.244.1.10").unwrap();
    let (gw_shim, _other, replacement) = if gw == node_b() {
        (b, c, node_c())
    } else {
        (c, b, node_b())
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    op.drain_notices();

    let killed = Instant::now();
    gw_shim.stop();
    a.wait("failover", |s| gateway_of(s, "10.244.1.10") == Some(replacement))
        .await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "not before the grace period: {took:?}"
    );
    assert!(took < Duration::from_millis(1500), "soon after it: {took:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let n = tokio::time::timeout_at(deadline.into(), op.notices.recv())
            .await
            .expect("a failover notice")
            .unwrap();
        if let Notice::Failover {
            replacement, took, ..
        } = n
        {
            assert!(replacement.is_some());
            assert!(took >= Duration::from_millis(300));
            break;
        }
    }
}

#[tokio::test]
async fn a_recovered_gateway_does_not_take_traffic_back() {
    let (op, a, b, c) = started().await;
    let before = a
        .wait("steered", |s| gateway_of(s, "10.244.1.10").is_some())
        .await;
    let gw = gateway_of(&before, "10.244.1.10").unwrap();
    let (gw_shim, gw_node, replacement) = if gw == node_b() {
        (b, "node-b", node_c())
    } else {
        (c, "node-c", node_b())
    };
    let maps = gw_shim.stop();
    a.wait("failover", |s| gateway_of(s, "10.244.1.10") == Some(replacement))
        .await;
    let _back = Shim::start(config(&op, gw_node), gw_node, maps);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gateway_of(&a.state().unwrap(), "10.244.1.10"), Some(replacement));
}

#[tokio::test]
async fn clients_without_valid_credentials_are_refused() {
    let op = Operator::start(tokens(), None, Duration::from_secs(1)).await;
    op.synced().await;
    let hello: HelloFn = Arc::new(|| v1::Hello {
        node: "node-a".into(),
        ..Default::default()
    });
    let (plans, _) = watch::channel(None);
    let (_applied_tx, mut applied) = watch::channel(Applied::default());

    let mut none = config(&op, "node-a");
    none.token = None;
    let err = client::session(&none, &hello, &plans, &mut applied).await;
    assert!(
        matches!(&err, SessionError::Status(s) if s.code() == tonic::Code::Unauthenticated),
        "{err:?}"
    );

    let mut wrong = config(&op, "node-a");
    wrong.token = Some("forged".into());
    let err = client::session(&wrong, &hello, &plans, &mut applied).await;
    assert!(
        matches!(&err, SessionError::Status(s) if s.code() == tonic::Code::Unauthenticated),
        "{err:?}"
    );
    assert!(plans.borrow().is_none(), "nothing was received");
}

#[tokio::test]
async fn node_a_never_receives_node_b_plan() {
    let (op, a, b, _c) = started().await;
    // With node-a's token, asking for node-b is refused.
    let hello: HelloFn = Arc::new(|| v1::Hello {
        node: "node-b".into(),
        ..Default::default()
    });
    let (plans, _) = watch::channel(None);
    let (_applied_tx, mut applied) = watch::channel(Applied::default());
    let err = client::session(&config(&op, "node-a"), &hello, &plans, &mut applied).await;
    assert!(
        matches!(&err, SessionError::Status(s) if s.code() == tonic::Code::PermissionDenied),
        "{err:?}"
    );
    assert!(plans.borrow().is_none());

    // And what node-a does receive holds only node-a's pods' entries (and its duties).
    let sa = a.wait("plan", |s| gateway_of(s, "10.244.1.10").is_some()).await;
    let a_sources: Vec<String> = sa.entries.keys().map(|(s, _)| s.to_string()).collect();
    assert!(
        a_sources.iter().all(|s| s.starts_with("10.244.1.")),
        "{a_sources:?}"
    );
    let sb = b.wait("plan", |s| gateway_of(s, "10.244.2.10").is_some()).await;
    for (source, _) in sb.entries.keys() {
        let own = source.to_string().starts_with("10.244.2.");
        assert!(
            own || !sb.serves.is_empty(),
            "node-b holds {source} without serving"
        );
    }
}

#[tokio::test]
async fn tls_with_the_operator_certificate() {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let tls = Tls {
        cert: cert.pem().into_bytes(),
        key: signing_key.serialize_pem().into_bytes(),
    };
    let mut op = Operator::start(tokens(), Some(tls), Duration::from_secs(1)).await;
    op.load(manifests("")).await;
    op.synced().await;

    // Plaintext to a TLS server fails.
    let hello: HelloFn = Arc::new(|| v1::Hello {
        node: "node-a".into(),
        ..Default::default()
    });
    let (plans, _) = watch::channel(None);
    let (_applied_tx, mut applied) = watch::channel(Applied::default());
    let mut c = config(&op, "node-a");
    c.connect_timeout = Duration::from_secs(1);
    let err = client::session(&c, &hello, &plans, &mut applied).await;
    assert!(plans.borrow().is_none(), "{err:?}");

    let mut c = config(&op, "node-a");
    c.endpoint = format!("https://localhost:{}", op.addr.port());
    c.ca_pem = Some(cert.pem().into_bytes());
    let a = Shim::start(c, "node-a", Maps::default());
    a.wait("plan over TLS", |s| gateway_of(s, "10.244.1.10").is_some())
        .await;
}

#[tokio::test]
async fn a_slow_client_stalls_no_one_and_gets_coalesced_deltas() {
    let (op, a, _b, _c) = started().await;
    a.wait("plan", |s| gateway_of(s, "10.244.1.10").is_some()).await;

    // A client for node-a that never reads: a second session of node-a (not a gateway candidate,
    // so its silence changes no gateway).
    let mut raw = NodeChannelClient::connect(op.url()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::ShimMessage {
        message: Some(shim_message::Message::Hello(v1::Hello {
            node: "node-a".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", "Bearer token-node-a".parse().unwrap());
    let mut slow = raw.sync(req).await.unwrap().into_inner();

    // Many changes on node-a (more than the HTTP/2 window holds); the fast shim keeps up.
    let base = manifests("");
    let pod = base.pods.iter().find(|p| p.name == "checkout-1").unwrap().clone();
    let started = Instant::now();
    for i in 0..3000u32 {
        let mut p = pod.clone();
        p.uid = format!("slow-{i}");
        p.name = format!("c-{i}");
        p.ips = vec![
            format!("10.244.{}.{}", 100 + i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
        ];
        op.change(Change::UpsertPod(p)).await;
    }
    let s = a.wait("all 3000 pods", |s| s.entries.len() >= 3001).await;
    let fast = started.elapsed();
    assert!(fast < Duration::from_secs(5), "{fast:?}");

    // The slow client, reading now, ends with the same state in few messages.
    let mut state: Option<NodeState> = None;
    let mut messages = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_millis(500), slow.message()).await else {
            break;
        };
        match m.message {
            Some(v1::operator_message::Message::Plan(_)) | Some(v1::operator_message::Message::Delta(_)) => {
                messages += 1;
                state = Some(state.unwrap_or_default());
            }
            _ => {}
        }
    }
    assert!(state.is_some());
    assert!(messages < 3000, "coalesced: {messages} messages for 3000 changes");
    eprintln!("slow client: {messages} messages for 3000 changes; fast shim done in {fast:?}");
    drop((s, tx));
}
