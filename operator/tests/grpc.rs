//! The node channel with a real server and real clients in one process: plans, deltas, acks,
//! reconnects without flaps, credentials, node isolation, slow clients, failover, and what one
//! client may cost the server (handshake timeout, streams per connection, keepalive, one session
//! per node), certificates renewed under a running server, and plans and deltas larger than any
//! message, in chunks within their budget.

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
    grpc::{self, NodeService, ServerLimits, Tls},
    live::{Notice, SourceEvent, StatusUpdate},
    manifests::Manifests,
    planner::Change,
};
use sluice_proto::{
    EgressEntry, EntryKey, GatewayTarget,
    client::{self, Applied, Config, HelloFn, NodeState, SessionError},
    convert,
    v2::{self, node_channel_client::NodeChannelClient, shim_message},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
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
        Self::start_with(verifier, tls, grace, ServerLimits::default()).await
    }

    async fn start_with(
        verifier: impl TokenVerifier,
        tls: Option<Tls>,
        grace: Duration,
        limits: ServerLimits,
    ) -> Operator {
        Self::start_chunked(verifier, tls, grace, limits, sluice_proto::chunk::CHUNK_BUDGET).await
    }

    async fn start_chunked(
        verifier: impl TokenVerifier,
        tls: Option<Tls>,
        grace: Duration,
        limits: ServerLimits,
        chunk_budget: usize,
    ) -> Operator {
        let config = EngineConfig::with_grace(grace);
        let (hub, shim_events) = Hub::new(config.heartbeat_interval);
        let engine = Engine::new(config, hub.clone(), EngineMetrics::default());
        let listener = grpc::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = NodeService::new(hub, Arc::new(verifier)).with_chunk_budget(chunk_budget);
        let server = tokio::spawn(async move {
            grpc::serve_with(listener, service, tls, &limits, std::future::pending())
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

    async fn load_quickstart(&mut self) {
        self.load(manifests("")).await;
        self.synced().await;
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
    entries: Arc<Mutex<BTreeMap<EntryKey, EgressEntry>>>,
    writes: Arc<AtomicU64>,
}

impl Maps {
    fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    /// Like the shim's sync: writes only what differs.
    fn apply(&self, want: &BTreeMap<EntryKey, EgressEntry>) {
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
        Shim::start_reporting(config, node, maps, false)
    }

    /// A shim that, with `conflicted`, finds every managed egress IP of its duties answered by
    /// another host and says so in its acknowledgements.
    fn start_reporting(config: Config, node: &str, maps: Maps, conflicted: bool) -> Shim {
        let (updates_tx, mut updates) = client::updates();
        let (plans_tx, plans) = watch::channel(None);
        let (applied_tx, applied_rx) = watch::channel(Applied::default());
        let node = node.to_owned();
        let hello: HelloFn = Arc::new(move || v2::Hello {
            node: node.clone(),
            version: "test".into(),
            // The quickstart's egress IP is on every node.
            interfaces: vec![v2::Interface {
                name: "eth0".into(),
                addresses: vec![vec![203, 0, 113, 10]],
                networks: vec![],
            }],
            default_route_interface: Some("eth0".into()),
            // As the real shim.
            operator_heartbeat_floor: true,
            ..Default::default()
        });
        let session = tokio::spawn(client::run(config, hello, updates_tx, applied_rx));
        let m = maps.clone();
        let applier = tokio::spawn(async move {
            let mut state = None;
            while let Some(batch) = updates.next_batch().await {
                client::fold(&mut state, batch);
                let Some(state) = &state else {
                    continue;
                };
                m.apply(&state.entries);
                applied_tx.send_replace(Applied {
                    session: state.session,
                    generation: state.generation,
                    errors: vec![],
                    conflicts: if conflicted {
                        state
                            .serves
                            .iter()
                            .filter(|d| d.managed)
                            .flat_map(|d| &d.egress_ips)
                            .map(|ip| v2::AddressConflict {
                                ip: sluice_proto::convert::ip_to_wire(*ip),
                                detail: "02:00:00:00:00:99 answers for it".into(),
                            })
                            .collect()
                    } else {
                        vec![]
                    },
                    ..Applied::default()
                });
                // A copy for the test to look at.
                plans_tx.send_replace(Some(Arc::new(state.clone())));
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

    /// The state, or only its size when it is too large to read.
    fn summary(&self) -> String {
        match self.state() {
            Some(s) if s.entries.len() > 100 => {
                format!("generation {} with {} entries", s.generation, s.entries.len())
            }
            state => format!("{state:?}"),
        }
    }

    /// Waits until the shim's state satisfies `f`.
    async fn wait(&self, what: &str, f: impl Fn(&NodeState) -> bool) -> Arc<NodeState> {
        self.wait_for(what, Duration::from_secs(10), f).await
    }

    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&NodeState) -> bool,
    ) -> Arc<NodeState> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.state()
                && f(&s)
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {}",
                self.summary()
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
        .find(|(k, _)| k.source == ip)
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
    let hello: HelloFn = Arc::new(|| v2::Hello {
        node: "node-a".into(),
        ..Default::default()
    });
    let (plans, mut received) = client::updates();
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
    assert!(received.pending().is_empty(), "nothing was received");
}

#[tokio::test]
async fn node_a_never_receives_node_b_plan() {
    let (op, a, b, _c) = started().await;
    // With node-a's token, asking for node-b is refused.
    let hello: HelloFn = Arc::new(|| v2::Hello {
        node: "node-b".into(),
        ..Default::default()
    });
    let (plans, mut received) = client::updates();
    let (_applied_tx, mut applied) = watch::channel(Applied::default());
    let err = client::session(&config(&op, "node-a"), &hello, &plans, &mut applied).await;
    assert!(
        matches!(&err, SessionError::Status(s) if s.code() == tonic::Code::PermissionDenied),
        "{err:?}"
    );
    assert!(received.pending().is_empty());

    // And what node-a does receive holds only node-a's pods' entries (and its duties).
    let sa = a.wait("plan", |s| gateway_of(s, "10.244.1.10").is_some()).await;
    let a_sources: Vec<String> = sa.entries.keys().map(|k| k.source.to_string()).collect();
    assert!(
        a_sources.iter().all(|s| s.starts_with("10.244.1.")),
        "{a_sources:?}"
    );
    let sb = b.wait("plan", |s| gateway_of(s, "10.244.2.10").is_some()).await;
    for EntryKey { source, .. } in sb.entries.keys() {
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
    let tls = Tls::from_pem(cert.pem().as_bytes(), signing_key.serialize_pem().as_bytes()).unwrap();
    let mut op = Operator::start(tokens(), Some(tls), Duration::from_secs(1)).await;
    op.load(manifests("")).await;
    op.synced().await;

    // Plaintext to a TLS server fails.
    let hello: HelloFn = Arc::new(|| v2::Hello {
        node: "node-a".into(),
        ..Default::default()
    });
    let (plans, mut received) = client::updates();
    let (_applied_tx, mut applied) = watch::channel(Applied::default());
    let mut c = config(&op, "node-a");
    c.connect_timeout = Duration::from_secs(1);
    let err = client::session(&c, &hello, &plans, &mut applied).await;
    assert!(received.pending().is_empty(), "{err:?}");

    let mut c = config(&op, "node-a");
    c.endpoint = format!("https://localhost:{}", op.addr.port());
    c.ca_pem = Some(cert.pem().into_bytes());
    let a = Shim::start(c, "node-a", Maps::default());
    a.wait("plan over TLS", |s| gateway_of(s, "10.244.1.10").is_some())
        .await;
}

/// A session driven by hand: it says hello as `node` (with the quickstart's egress IP), sends
/// a heartbeat every 50 ms, and reads only what the test reads.
struct RawSession {
    inbound: tonic::Streaming<v2::OperatorMessage>,
    heartbeats: JoinHandle<()>,
}

impl RawSession {
    async fn open(op: &Operator, node: &str) -> RawSession {
        RawSession::open_with(op, node, false).await
    }

    /// A session whose hello announces (or not) that it takes the operator's heartbeats at the
    /// floor's pace.
    async fn open_with(op: &Operator, node: &str, operator_heartbeat_floor: bool) -> RawSession {
        let mut client = NodeChannelClient::connect(op.url()).await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(v2::ShimMessage {
            message: Some(shim_message::Message::Hello(v2::Hello {
                node: node.into(),
                version: "raw".into(),
                interfaces: vec![v2::Interface {
                    name: "eth0".into(),
                    addresses: vec![vec![203, 0, 113, 10]],
                    networks: vec![],
                }],
                default_route_interface: Some("eth0".into()),
                operator_heartbeat_floor,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let heartbeats = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let hb = v2::ShimMessage {
                    message: Some(shim_message::Message::Heartbeat(v2::Heartbeat {
                        sent_unix_ms: 0,
                    })),
                };
                if tx.send(hb).await.is_err() {
                    return;
                }
            }
        });
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("authorization", format!("Bearer token-{node}").parse().unwrap());
        let inbound = client.sync(req).await.unwrap().into_inner();
        RawSession { inbound, heartbeats }
    }

    /// Reads everything in a task: the plans and deltas received, then how the stream ended
    /// (`None`: cleanly).
    fn drain(
        mut self,
    ) -> (
        mpsc::UnboundedReceiver<v2::operator_message::Message>,
        JoinHandle<Option<tonic::Code>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let end = loop {
                match self.inbound.message().await {
                    Ok(Some(v2::OperatorMessage { message: Some(m) })) => {
                        let _ = tx.send(m);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break None,
                    Err(status) => break Some(status.code()),
                }
            };
            self.heartbeats.abort();
            end
        });
        (rx, reader)
    }
}

#[tokio::test]
async fn a_slow_client_stalls_no_one_and_gets_coalesced_deltas() {
    let mut op = Operator::start(tokens(), None, Duration::from_millis(300)).await;
    op.load_quickstart().await;
    let b = Shim::start(config(&op, "node-b"), "node-b", Maps::default());
    let c = Shim::start(config(&op, "node-c"), "node-c", Maps::default());
    // node-a's session is alive (it sends heartbeats) but never reads.
    let mut slow = RawSession::open(&op, "node-a").await;
    let gateway_entries = || {
        [&b, &c]
            .iter()
            .filter_map(|s| s.state())
            .filter(|s| !s.serves.is_empty())
            .map(|s| s.entries.len())
            .max()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway_entries().is_none_or(|n| n == 0) {
        assert!(Instant::now() < deadline, "no gateway got entries");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = gateway_entries().unwrap();

    // Many changes on node-a (more than the HTTP/2 window holds), each also on its gateway,
    // which keeps up.
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway_entries().is_none_or(|n| n < before + 3000) {
        assert!(
            Instant::now() < deadline,
            "the gateway got all 3000 pods: {:?}",
            gateway_entries()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fast = started.elapsed();
    assert!(fast < Duration::from_secs(5), "{fast:?}");

    // The slow client, reading now, ends with the same state in few messages.
    let mut state: Option<NodeState> = None;
    let mut messages = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_millis(500), slow.inbound.message()).await
        else {
            break;
        };
        match m.message {
            Some(v2::operator_message::Message::Plan(_)) | Some(v2::operator_message::Message::Delta(_)) => {
                messages += 1;
                state = Some(state.unwrap_or_default());
            }
            _ => {}
        }
    }
    assert!(state.is_some());
    assert!(messages < 3000, "coalesced: {messages} messages for 3000 changes");
    eprintln!("slow client: {messages} messages for 3000 changes; fast shims done in {fast:?}");
}

#[tokio::test]
async fn a_second_session_of_a_node_replaces_the_first_and_moves_no_gateway() {
    let mut op = Operator::start(tokens(), None, Duration::from_millis(300)).await;
    op.load_quickstart().await;
    // node-b is the only gateway candidate with a shim (node-c has none): if it looked dead for
    // a moment, checkout-1 would lose its gateway.
    let a = Shim::start(config(&op, "node-a"), "node-a", Maps::default());
    let (mut first_messages, first_end) = RawSession::open(&op, "node-b").await.drain();
    a.wait("checkout-1 steered through node-b", |s| {
        gateway_of(s, "10.244.1.10") == Some(node_b())
    })
    .await;
    let serves = |m: &v2::operator_message::Message| {
        matches!(m, v2::operator_message::Message::Plan(p) if !p.serves.is_empty())
            || matches!(m, v2::operator_message::Message::Delta(d) if !d.serves.is_empty())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !serves(
        &tokio::time::timeout_at(deadline.into(), first_messages.recv())
            .await
            .expect("the first session is told it serves")
            .unwrap(),
    ) {}
    tokio::time::sleep(Duration::from_millis(200)).await;
    op.drain_notices();
    let writes = a.maps.writes();

    let (mut second_messages, second_end) = RawSession::open(&op, "node-b").await.drain();
    let ended = tokio::time::timeout(Duration::from_secs(10), first_end)
        .await
        .expect("the first session is ended")
        .unwrap();
    assert_eq!(ended, Some(tonic::Code::Aborted), "it is told why");
    let plan = tokio::time::timeout(Duration::from_secs(10), second_messages.recv())
        .await
        .expect("the second session gets a plan")
        .unwrap();
    assert!(serves(&plan), "the second session serves: {plan:?}");

    // Three grace periods later, nothing moved: node-b never looked dead.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(gateway_of(&a.state().unwrap(), "10.244.1.10"), Some(node_b()));
    assert_eq!(a.maps.writes(), writes, "no map writes on node-a");
    let notices = op.drain_notices();
    assert!(notices.is_empty(), "no gateway change: {notices:?}");
    assert!(!second_end.is_finished(), "the second session lives on");
}

#[tokio::test]
async fn a_client_that_never_finishes_the_tls_handshake_is_disconnected() {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let tls = Tls::from_pem(cert.pem().as_bytes(), signing_key.serialize_pem().as_bytes()).unwrap();
    let limits = ServerLimits {
        tls_handshake_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    };
    let op = Operator::start_with(tokens(), Some(tls), Duration::from_secs(1), limits).await;

    // One client sends nothing; another starts a TLS record (a ClientHello header) and stalls.
    let mut silent = tokio::net::TcpStream::connect(op.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(op.addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    for (name, conn) in [("silent", &mut silent), ("partial", &mut partial)] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{name}: still open after 10 s"));
        // Closed (EOF), or reset.
        assert!(matches!(read, Ok(0) | Err(_)), "{name}: {read:?}");
    }
}

#[tokio::test]
async fn a_connection_carries_at_most_the_stream_limit() {
    let op = Operator::start(tokens(), None, Duration::from_secs(1)).await;
    let channel = tonic::transport::Endpoint::from_shared(op.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let open_stream = |token: &'static str| {
        let mut client = NodeChannelClient::new(channel.clone());
        tokio::spawn(async move {
            // The request stays open without a hello: the server holds the stream and waits.
            let (tx, rx) = mpsc::channel::<v2::ShimMessage>(1);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            let result = client.sync(req).await.map(|_| ());
            drop(tx);
            result
        })
    };
    let limit = ServerLimits::default().max_concurrent_streams;
    assert_eq!(limit, 4);
    let held: Vec<_> = (0..limit).map(|_| open_stream("token-node-a")).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(held.iter().all(|h| !h.is_finished()), "the server holds them");

    // One more on the same connection is not opened while the others are; a forged token would
    // be refused at once if it were.
    let extra = open_stream("forged");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!extra.is_finished(), "a fifth stream was opened");

    // It is opened (and refused) once one of the others goes.
    held[0].abort();
    let refused = tokio::time::timeout(Duration::from_secs(5), extra)
        .await
        .expect("the fifth stream is opened once a slot is free")
        .unwrap();
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn a_peer_that_does_not_answer_pings_is_disconnected() {
    let limits = ServerLimits {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(200),
        ..ServerLimits::default()
    };
    let op = Operator::start_with(tokens(), None, Duration::from_secs(1), limits).await;
    // An HTTP/2 client that starts the connection properly, then goes deaf.
    let mut conn = tokio::net::TcpStream::connect(op.addr).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    conn.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap(); // SETTINGS, empty
    let mut pings = 0;
    let mut settings_acked = false;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut header = [0u8; 9];
            if conn.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let (kind, flags) = (header[3], header[4]);
            let mut payload = vec![0u8; len];
            if conn.read_exact(&mut payload).await.is_err() {
                return;
            }
            match (kind, flags & 1) {
                // The server's SETTINGS: acknowledged, as a live peer would.
                (0x4, 0) if !settings_acked => {
                    settings_acked = true;
                    conn.write_all(&[0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]).await.unwrap();
                }
                (0x6, 0) => pings += 1,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after 10 s ({pings} pings)");
    assert!(pings > 0, "closed after pinging");
}

/// A Secret volume as the kubelet writes it: each file is a symlink through `..data` to a
/// versioned directory, and an update writes a new directory and swaps `..data` with one rename,
/// then removes the old directory.
struct MountedSecret {
    dir: tempfile::TempDir,
    version: u32,
}

impl MountedSecret {
    fn new(files: &[(&str, &str)]) -> MountedSecret {
        let mut secret = MountedSecret {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        secret.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), secret.path(name)).unwrap();
        }
        secret
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        let old = format!("..v{}", self.version);
        self.version += 1;
        let new = format!("..v{}", self.version);
        std::fs::create_dir(self.path(&new)).unwrap();
        for (name, content) in files {
            std::fs::write(self.path(&new).join(name), content).unwrap();
        }
        std::os::unix::fs::symlink(&new, self.path("..data_tmp")).unwrap();
        std::fs::rename(self.path("..data_tmp"), self.path("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.path(&old));
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A server certificate for `localhost`, self-signed (it is its own CA), in PEM.
struct Pem {
    cert: String,
    key: String,
}

fn localhost_cert() -> Pem {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Pem {
        cert: cert.pem(),
        key: signing_key.serialize_pem(),
    }
}

/// A shim's configuration for the TLS server of `op`, trusting only `ca`.
fn tls_config(op: &Operator, node: &str, ca: &str) -> Config {
    let mut c = config(op, node);
    c.endpoint = format!("https://localhost:{}", op.addr.port());
    c.ca_pem = Some(ca.as_bytes().to_vec());
    c.connect_timeout = Duration::from_secs(5);
    c
}

/// Whether a new connection trusting only `ca` completes its handshake: whether `ca` is what
/// the server serves now.
async fn served(op: &Operator, ca: &str) -> bool {
    client::connect(&tls_config(op, "node-a", ca)).await.is_ok()
}

async fn start_with_secret(secret: &MountedSecret) -> Operator {
    let tls = Tls::from_files(secret.path("tls.crt"), secret.path("tls.key")).unwrap();
    let mut op = Operator::start(tokens(), Some(tls), Duration::from_millis(300)).await;
    op.load_quickstart().await;
    op
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_clients_while_open_sessions_go_on() {
    let (old, new) = (localhost_cert(), localhost_cert());
    let mut secret = MountedSecret::new(&[
        ("tls.crt", &old.cert),
        ("tls.key", &old.key),
        ("ca.crt", &old.cert),
    ]);
    let mut op = start_with_secret(&secret).await;
    // Sessions opened before the renewal, trusting only the old certificate: if they had to
    // reconnect after it, they could not.
    let a = Shim::start(tls_config(&op, "node-a", &old.cert), "node-a", Maps::default());
    let b = Shim::start(tls_config(&op, "node-b", &old.cert), "node-b", Maps::default());
    a.wait("checkout-1 steered through node-b", |s| {
        gateway_of(s, "10.244.1.10") == Some(node_b())
    })
    .await;
    // A shim that reads its CA from the Secret, as in the chart.
    let mut from_file = tls_config(&op, "node-c", "");
    from_file.ca_pem = None;
    from_file.ca_file = Some(secret.path("ca.crt"));
    assert!(
        client::connect(&from_file).await.is_ok(),
        "the CA file trusts the old certificate"
    );

    secret.update(&[
        ("tls.crt", &new.cert),
        ("tls.key", &new.key),
        ("ca.crt", &new.cert),
    ]);
    assert!(
        served(&op, &new.cert).await,
        "a new client gets the new certificate"
    );
    assert!(!served(&op, &old.cert).await, "and no longer the old one");
    // The same configuration trusts the CA file's new content.
    client::connect(&from_file)
        .await
        .expect("the shim reads the renewed CA at its next connection");

    // The old sessions go on: a pod added now reaches node-a, and node-b keeps serving it.
    op.load(manifests(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: checkout-3, namespace: shop, uid: u-3, labels: {app: checkout}}\n\
         spec: {nodeName: node-a}\nstatus: {phase: Running, podIPs: [{ip: 10.244.1.12}]}\n",
    ))
    .await;
    a.wait("checkout-3 steered through node-b after the renewal", |s| {
        gateway_of(s, "10.244.1.12") == Some(node_b())
    })
    .await;
    b.wait("node-b still serves", |s| !s.serves.is_empty()).await;
    // Two heartbeat grace periods later, nothing failed over: node-b's session never broke.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(gateway_of(&a.state().unwrap(), "10.244.1.10"), Some(node_b()));
    let failovers: Vec<Notice> = op
        .drain_notices()
        .into_iter()
        .filter(|n| matches!(n, Notice::Failover { .. }))
        .collect();
    assert!(failovers.is_empty(), "{failovers:?}");
}

#[tokio::test]
async fn a_bad_new_certificate_is_not_served_and_the_previous_one_stays() {
    let (old, new) = (localhost_cert(), localhost_cert());
    let mut secret = MountedSecret::new(&[("tls.crt", &old.cert), ("tls.key", &old.key)]);
    let op = start_with_secret(&secret).await;
    assert!(served(&op, &old.cert).await);

    // A key that is not the certificate's (say, a half-finished renewal).
    secret.update(&[("tls.crt", &new.cert), ("tls.key", &old.key)]);
    assert!(
        served(&op, &old.cert).await,
        "a mismatched pair: the old certificate stays"
    );
    assert!(!served(&op, &new.cert).await);
    // A certificate that does not parse, and a key that does not.
    secret.update(&[("tls.crt", "not a certificate"), ("tls.key", &new.key)]);
    assert!(
        served(&op, &old.cert).await,
        "an unparsable certificate: the old one stays"
    );
    secret.update(&[
        ("tls.crt", &new.cert),
        (
            "tls.key",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ),
    ]);
    assert!(
        served(&op, &old.cert).await,
        "an unparsable key: the old certificate stays"
    );

    // Once the pair is whole, it is served.
    secret.update(&[("tls.crt", &new.cert), ("tls.key", &new.key)]);
    assert!(served(&op, &new.cert).await, "the good pair is served");
    assert!(!served(&op, &old.cert).await);
}

/// `pods` pods of node-a selected by the policies below (`app: saas`), the first `tier_a` of
/// them also labelled `tier: a`.
fn saas_pods(pods: usize, tier_a: usize) -> String {
    (0..pods)
        .map(|i| {
            let tier = if i < tier_a { "a" } else { "b" };
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: saas-{i}, namespace: shop, uid: saas-{i}, \
                 labels: {{app: saas, tier: {tier}}}}}\nspec: {{nodeName: node-a}}\n\
                 status: {{phase: Running, podIPs: [{{ip: 10.244.1.{}}}]}}\n---\n",
                50 + i
            )
        })
        .collect()
}

/// A policy steering the pods with `labels` to `cidrs` /24s of `octet.0.0.0/8` (a SaaS
/// allowlist) through node-b or node-c.
fn saas_policy(name: &str, labels: &str, cidrs: usize, octet: u8) -> String {
    let destinations: Vec<String> = (0..cidrs)
        .map(|i| format!("{octet}.{}.{}.0/24", i / 256, i % 256))
        .collect();
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata: {{name: {name}}}\nspec:\n  \
         selectors:\n    - podSelector: {{matchLabels: {labels}}}\n      namespaceSelector: {{matchLabels: {{team: payments}}}}\n  \
         destinationCIDRs: [{}]\n  egressGateway:\n    nodeSelector: {{matchLabels: {{sluice.dev/egress: \"true\"}}}}\n    \
         egressIP: 203.0.113.10\n---\n",
        destinations.join(", ")
    )
}

/// A name as long as a generated one may be (Kubernetes allows 253 characters). The wire names
/// a policy once per plan or delta, however many entries it has: the sizes below do not depend
/// on it.
fn long_name(prefix: &str) -> String {
    format!("{prefix}{}", "-allowlist-of-partner-addresses".repeat(4))
}

/// Waits for a status of `policy` saying every node that must hold it acknowledged it.
async fn programmed(op: &mut Operator, policy: &str, nodes: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let u = tokio::time::timeout_at(deadline.into(), op.updates.recv())
            .await
            .unwrap_or_else(|_| panic!("{policy} acknowledged by {nodes} nodes"))
            .unwrap();
        if u.outcome.name == policy && u.to_program == nodes && u.programmed == nodes {
            return;
        }
    }
}

/// The (source, destination) pairs of `policy` in a state.
fn pairs(state: &NodeState, policy: &str) -> std::collections::BTreeSet<EntryKey> {
    state
        .entries
        .iter()
        .filter(|(_, e)| &*e.policy == policy)
        .map(|(k, _)| *k)
        .collect()
}

fn expected_pairs(
    pods: std::ops::Range<usize>,
    cidrs: usize,
    octet: u8,
) -> std::collections::BTreeSet<EntryKey> {
    pods.flat_map(|p| {
        (0..cidrs).map(move |c| EntryKey {
            source: format!("10.244.1.{}", 50 + p).parse().unwrap(),
            destination: format!("{octet}.{}.{}.0/24", c / 256, c % 256).parse().unwrap(),
        })
    })
    .collect()
}

/// What a state's entries weigh on the wire.
fn wire_bytes(state: &NodeState) -> usize {
    use prost::Message as _;
    let mut names = convert::PolicyNames::default();
    let entries: usize = state
        .entries
        .values()
        .map(|e| {
            let len = convert::entry_to_wire(e, &mut names).encoded_len();
            1 + prost::length_delimiter_len(len) + len
        })
        .sum();
    let names: usize = names
        .into_wire()
        .iter()
        .map(|n| 1 + prost::length_delimiter_len(n.len()) + n.len())
        .sum();
    entries + names
}

/// The entries of a whole plan or delta (upserts), decoded.
fn decoded(part: &sluice_proto::chunk::Part) -> Vec<EgressEntry> {
    use sluice_proto::chunk::Part;
    let (policies, entries) = match part {
        Part::Plan(p) => (&p.policies, &p.entries),
        Part::Delta(d) => (&d.policies, &d.upserts),
    };
    let policies = convert::policies_from_wire(policies);
    entries
        .iter()
        .map(|e| convert::entry_from_wire(e, &policies).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_of_150000_entries_and_a_delta_of_100000_arrive_whole_and_are_acknowledged() {
    let first = long_name("saas");
    let second = long_name("saas-tier-a");
    // A grace period that no pause of an unoptimized build of this test reaches: a gateway
    // that looked dead would move every entry.
    let mut op = Operator::start(tokens(), None, Duration::from_secs(10)).await;
    let pods = saas_pods(150, 100);
    op.load(manifests(&format!(
        "{pods}{}",
        saas_policy(&first, "{app: saas}", 1000, 100)
    )))
    .await;
    op.synced().await;
    let a = Shim::start(config(&op, "node-a"), "node-a", Maps::default());
    let b = Shim::start(config(&op, "node-b"), "node-b", Maps::default());
    let c = Shim::start(config(&op, "node-c"), "node-c", Maps::default());

    let minute = Duration::from_secs(60);
    let plan = a
        .wait_for("150,000 entries on node-a", minute, |s| {
            // Cheap first: this is asked every few milliseconds.
            s.entries.len() >= 150_000 && pairs(s, &first).len() == 150_000
        })
        .await;
    assert_eq!(
        pairs(&plan, &first),
        expected_pairs(0..150, 1000, 100),
        "the same entries"
    );
    // What the issue saw refused: more than tonic's default decode limit.
    assert!(
        wire_bytes(&plan) > 4 << 20,
        "more than one default-sized message carries: {} bytes",
        wire_bytes(&plan)
    );
    // Its gateway holds them too (for pods of another node).
    let gateway = match gateway_of(&plan, "10.244.1.50") {
        Some(g) if g == node_b() => &b,
        Some(g) if g == node_c() => &c,
        other => panic!("steered to a gateway: {other:?}"),
    };
    gateway
        .wait_for("150,000 entries on the gateway", minute, |s| {
            s.entries.len() >= 150_000 && pairs(s, &first).len() == 150_000
        })
        .await;
    programmed(&mut op, &first, 2).await;

    // A second policy for the first 100 pods: 100,000 upserts on node-a, in one session.
    op.load(manifests(&format!(
        "{pods}{}{}",
        saas_policy(&first, "{app: saas}", 1000, 100),
        saas_policy(&second, "{tier: a}", 1000, 101)
    )))
    .await;
    let after = a
        .wait_for("100,000 more entries on node-a", minute, |s| {
            s.entries.len() >= 250_000 && pairs(s, &second).len() == 100_000
        })
        .await;
    assert_eq!(after.session, plan.session, "a delta, not a new session's plan");
    assert_eq!(
        pairs(&after, &second),
        expected_pairs(0..100, 1000, 101),
        "the same entries"
    );
    assert_eq!(
        pairs(&after, &first),
        pairs(&plan, &first),
        "the first policy's are kept"
    );
    let added: usize = wire_bytes(&after) - wire_bytes(&plan);
    assert!(
        added > 2 * sluice_proto::chunk::CHUNK_BUDGET,
        "a delta of several chunks: {added} bytes"
    );
    programmed(&mut op, &second, 2).await;
}

#[tokio::test]
async fn plans_and_deltas_go_out_in_chunks_within_their_budget() {
    use prost::Message as _;
    use sluice_proto::chunk::{Assembler, Part};
    const BUDGET: usize = 8192;
    // No gateway may look dead while the machine is busy: the deltas hold only what is added.
    let mut op = Operator::start_chunked(
        tokens(),
        None,
        Duration::from_secs(10),
        ServerLimits::default(),
        BUDGET,
    )
    .await;
    let pods = saas_pods(20, 10);
    op.load(manifests(&format!(
        "{pods}{}",
        saas_policy("saas", "{app: saas}", 100, 100)
    )))
    .await;
    op.synced().await;
    // node-a read by hand; its gateway by the shim client, from the same small chunks.
    let (mut raw, _end) = RawSession::open(&op, "node-a").await.drain();
    let b = Shim::start(config(&op, "node-b"), "node-b", Maps::default());
    let c = Shim::start(config(&op, "node-c"), "node-c", Maps::default());
    let gateway = |entries: &[EgressEntry]| match entries.first().map(|e| e.gateway.to_string()).as_deref() {
        Some("192.168.1.2") => &b,
        Some("192.168.1.3") => &c,
        other => panic!("steered to a gateway: {other:?}"),
    };

    let items = |p: &Part| -> usize {
        let guard = |g: &Option<v2::Guard>| {
            g.as_ref()
                .map_or(0, |g| g.destinations.len() + g.decided_pods.len())
        };
        match p {
            Part::Plan(p) => {
                p.policies.len() + p.entries.len() + p.serves.len() + p.cluster_cidrs.len() + guard(&p.guard)
            }
            Part::Delta(d) => {
                d.policies.len()
                    + d.upserts.len()
                    + d.removals.len()
                    + d.serves.len()
                    + d.cluster_cidrs.len()
                    + guard(&d.guard)
            }
        }
    };
    // Reads node-a's messages until a plan or delta with `entries` entries (upserts) of `policy`
    // is whole; every chunk on the way must be within the budget.
    let mut assembler = Assembler::default();
    let mut next_whole = async |policy: &str, entries: usize| -> (Part, usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = tokio::time::timeout_at(deadline.into(), raw.recv())
                .await
                .expect("a plan or delta")
                .unwrap();
            let Some(chunk) = Part::from_message(m) else {
                continue;
            };
            let size = v2::OperatorMessage::from(chunk.clone()).encoded_len();
            assert!(
                size <= BUDGET || items(&chunk) <= 1,
                "a chunk of {size} bytes with {} items",
                items(&chunk)
            );
            if let Some(whole) = assembler.push(chunk).unwrap() {
                let n = decoded(&whole.part)
                    .iter()
                    .filter(|e| &*e.policy == policy)
                    .count();
                if n == entries {
                    return (whole.part, whole.chunks);
                }
            }
        }
    };
    let (plan, chunks) = next_whole("saas", 2000).await;
    let bytes = v2::OperatorMessage::from(plan.clone()).encoded_len();
    assert!(matches!(plan, Part::Plan(_)), "a plan first");
    assert!(chunks > bytes / BUDGET, "{chunks} chunks for {bytes} bytes");
    let mut entries = decoded(&plan);
    entries.retain(|e| &*e.policy == "saas");
    assert_eq!(entries.len(), 2000);
    let first_gateway = gateway(&entries);
    let before = first_gateway
        .wait("the gateway's 2000 entries", |s| pairs(s, "saas").len() == 2000)
        .await;
    assert_eq!(pairs(&before, "saas"), expected_pairs(0..20, 100, 100));

    op.load(manifests(&format!(
        "{pods}{}{}",
        saas_policy("saas", "{app: saas}", 100, 100),
        saas_policy("saas-a", "{tier: a}", 100, 101)
    )))
    .await;
    let (delta, chunks) = next_whole("saas-a", 1000).await;
    assert!(matches!(delta, Part::Delta(_)), "then a delta");
    assert!(chunks > 1, "{chunks}");
    let mut upserts = decoded(&delta);
    upserts.retain(|e| &*e.policy == "saas-a");
    let second_gateway = gateway(&upserts);
    let after = second_gateway
        .wait("the gateway's 1000 more entries", |s| {
            pairs(s, "saas-a").len() == 1000
        })
        .await;
    if std::ptr::eq(first_gateway, second_gateway) {
        assert_eq!(after.session, before.session, "a delta");
    }
    assert_eq!(pairs(&after, "saas-a"), expected_pairs(0..10, 100, 101));
}

/// Only nodes that may be gateways need their shim's liveness fast: node-a (no policy's gateway
/// selector matches it) is asked for slow heartbeats, node-b and node-c for fast ones, and the
/// operator does not take node-a's slow heartbeats for silence.
#[tokio::test]
async fn nodes_that_cannot_be_gateways_heartbeat_slowly() {
    let mut op = Operator::start(tokens(), None, Duration::from_millis(300)).await;
    op.load(manifests("")).await;
    op.synced().await;
    let first_plan = async |node: &str| {
        let (mut raw, _end) = RawSession::open(&op, node).await.drain();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), raw.recv())
                .await
                .expect("a plan")
                .expect("the stream is open");
            if let v2::operator_message::Message::Plan(p) = m {
                return p.heartbeat_interval_ms;
            }
        }
    };
    let engine = EngineConfig::with_grace(Duration::from_millis(300));
    let fast = engine.heartbeat_interval.as_millis() as u32;
    let slow = engine.slow_heartbeat_interval.as_millis() as u32;
    assert!(slow > 4 * fast, "{slow} ms vs {fast} ms");
    assert_eq!(first_plan("node-b").await, fast);
    assert_eq!(first_plan("node-c").await, fast);
    assert_eq!(first_plan("node-a").await, slow);
    // A real shim of node-a then heartbeats every `slow` ms: many times the fast silence limit
    // (4 x 75 ms, at least 1 s) passes without its session ending.
    let a = Shim::start(config(&op, "node-a"), "node-a", Maps::default());
    let first = a.wait("node-a's plan", |s| s.generation > 0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        a.state().map(|s| s.session),
        Some(first.session),
        "node-a's session lasted"
    );
}

/// The operator's heartbeats to a gateway-capable shim (75 ms interval here) come no faster than
/// the floor when its hello says it takes that, and at its own interval otherwise (shims of
/// earlier releases judge the operator's silence by their interval); a real shim on the floor
/// keeps its session over many of its own silence limits of before (4 x 75 ms, at least 1 s).
#[tokio::test]
async fn the_operator_heartbeats_at_the_floor_to_shims_that_take_it() {
    let mut op = Operator::start(tokens(), None, Duration::from_millis(300)).await;
    op.load(manifests("")).await;
    op.synced().await;
    let heartbeats_within = async |floor: bool, window: Duration| {
        let (mut raw, _end) = RawSession::open_with(&op, "node-b", floor).await.drain();
        let end = Instant::now() + window;
        let mut heartbeats = 0;
        while let Ok(Some(m)) = tokio::time::timeout_at(end.into(), raw.recv()).await {
            if matches!(m, v2::operator_message::Message::Heartbeat(_)) {
                heartbeats += 1;
            }
        }
        heartbeats
    };
    let window = sluice_proto::OPERATOR_HEARTBEAT_FLOOR + Duration::from_millis(500);
    let fast = EngineConfig::with_grace(Duration::from_millis(300)).heartbeat_interval;
    assert!(fast * 8 < sluice_proto::OPERATOR_HEARTBEAT_FLOOR, "{fast:?}");
    // One at once and one at the floor (a tick's slack either way).
    let on_floor = heartbeats_within(true, window).await;
    assert!((1..=3).contains(&on_floor), "{on_floor} heartbeats on the floor");
    let at_interval = heartbeats_within(false, window).await;
    assert!(
        at_interval >= 10,
        "{at_interval} heartbeats at the shim's interval"
    );

    let b = Shim::start(config(&op, "node-b"), "node-b", Maps::default());
    let first = b.wait("node-b's plan", |s| s.generation > 0).await;
    tokio::time::sleep(sluice_proto::OPERATOR_HEARTBEAT_FLOOR * 2).await;
    assert_eq!(
        b.state().map(|s| s.session),
        Some(first.session),
        "node-b's session lasted"
    );
}

/// A gateway that finds its managed egress IP answered by another host does not claim it and
/// says so: the policy's status marks the address `Conflict` with who answers, and an Event says
/// it once.
#[tokio::test]
async fn a_managed_address_another_host_answers_for_is_a_conflict_in_status_and_an_event() {
    let mut op = Operator::start(tokens(), None, Duration::from_millis(300)).await;
    let managed = "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata: {name: web-out}\n\
                   spec:\n  selectors:\n  - podSelector: {matchLabels: {app: web}}\n  \
                   destinationCIDRs: [198.51.100.0/24]\n  egressGateway:\n    \
                   nodeSelector: {matchLabels: {sluice.dev/egress: \"true\"}}\n    \
                   egressIPs: [203.0.113.50]\n";
    op.load(manifests(managed)).await;
    op.synced().await;
    let _shims: Vec<Shim> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .map(|n| Shim::start_reporting(config(&op, n), n, Maps::default(), n != "node-a"))
        .collect();
    let ip: std::net::IpAddr = "203.0.113.50".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let conflict = loop {
        let u = tokio::time::timeout_at(deadline.into(), op.updates.recv())
            .await
            .expect("a status with the conflict")
            .unwrap();
        if u.outcome.name == "web-out" && !u.address_conflicts.is_empty() {
            break u;
        }
    };
    let holder = conflict
        .outcome
        .gateways
        .iter()
        .find(|g| g.managed)
        .expect("a node is assigned the address")
        .node
        .to_string();
    assert_eq!(
        conflict.address_conflicts,
        [(ip, format!("{holder}: 02:00:00:00:00:99 answers for it"))]
    );
    let status = sluice_operator::controller::status::desired(
        &conflict,
        None,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
        ),
    );
    assert_eq!(status.egress_ips.len(), 1);
    assert_eq!(status.egress_ips[0].state, "Conflict");
    assert_eq!(status.egress_ips[0].node.as_deref(), Some(holder.as_str()));
    assert!(
        status.egress_ips[0]
            .message
            .as_deref()
            .unwrap()
            .contains("02:00:00:00:00:99")
    );
    let mut events = 0;
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(500), op.notices.recv()).await {
        if let Notice::AddressConflict { policy, ip: at, .. } = n {
            assert_eq!((policy.as_str(), at), ("web-out", ip));
            events += 1;
        }
    }
    assert_eq!(events, 1, "one Event for the conflict");
}

/// During an upgrade from a release that spoke sluice.v1, the old shims are kept alive over it:
/// a gateway whose shim is still the old one keeps its duty (and is sent no plan).
#[tokio::test]
async fn a_shim_of_the_previous_release_keeps_its_gateway_during_an_upgrade() {
    use sluice_proto::v1;
    let mut op = Operator::start(tokens(), None, Duration::from_millis(300)).await;
    op.load(manifests("")).await;
    op.synced().await;
    // node-b's shim is an old one; node-c has none; node-a's is current.
    let mut client = v1::node_channel_client::NodeChannelClient::connect(op.url())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::ShimMessage {
        message: Some(v1::shim_message::Message::Hello(v1::Hello {
            node: "node-b".into(),
            version: "0.0.9".into(),
            interfaces: vec![v1::Interface {
                name: "eth0".into(),
                addresses: vec!["203.0.113.10".into()],
            }],
            default_route_interface: Some("eth0".into()),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let beats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let hb = v1::ShimMessage {
                message: Some(v1::shim_message::Message::Heartbeat(v1::Heartbeat {
                    sent_unix_ms: 0,
                })),
            };
            if tx.send(hb).await.is_err() {
                return;
            }
        }
    });
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", "Bearer token-node-b".parse().unwrap());
    let mut inbound = client.sync(req).await.unwrap().into_inner();
    let a = Shim::start(config(&op, "node-a"), "node-a", Maps::default());
    a.wait("checkout-1 steered to node-b", |s| {
        gateway_of(s, "10.244.1.10") == Some(node_b())
    })
    .await;
    // Many grace periods later node-b is still the gateway, and its shim got heartbeats only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gateway_of(&a.state().unwrap(), "10.244.1.10"), Some(node_b()));
    let mut heartbeats = 0;
    let end = Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(Some(m))) = tokio::time::timeout_at(end.into(), inbound.message()).await {
        assert!(
            matches!(m.message, Some(v1::operator_message::Message::Heartbeat(_))),
            "{m:?}"
        );
        heartbeats += 1;
    }
    assert!(heartbeats > 0);
    beats.abort();
}
