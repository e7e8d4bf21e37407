//! Plans and deltas in chunks, into the real shim client over real gRPC: a plan of 150,000
//! entries and a delta of 100,000 upserts arrive whole and are acknowledged; a stream cut within
//! a chunked plan or delta leaves the shim with its previous complete state; a chunk of another
//! generation ends the session. The test is the operator: it drives each session by hand.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prost::Message as _;
use sluice_proto::{
    EgressEntry, EntryKey, GatewaySlotRef, GatewayTarget,
    chunk::{CHUNK_BUDGET, Chunks, Interleaved, Part, Which},
    client::{self, Applied, Config, HelloFn, NodeState, SessionError},
    convert::{self, PolicyNames},
    v2::{
        self, OperatorMessage, ShimMessage,
        node_channel_server::{NodeChannel, NodeChannelServer},
        operator_message, shim_message,
    },
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Server, server::TcpIncoming},
};

/// One shim's stream, as the test (the operator) holds it.
struct Session {
    tx: mpsc::Sender<Result<OperatorMessage, Status>>,
    inbound: mpsc::UnboundedReceiver<ShimMessage>,
    heartbeats: JoinHandle<()>,
}

impl Session {
    /// Sends the chunks of `whole` with `budget`; `Some(n)`: only the first `n` of them.
    async fn send(&self, whole: Part, budget: usize, only: Option<usize>) -> usize {
        let chunks: Vec<Part> = Chunks::new(whole, budget).collect();
        let total = chunks.len();
        for chunk in chunks.into_iter().take(only.unwrap_or(total)) {
            self.tx.send(Ok(chunk.into())).await.unwrap();
        }
        total
    }

    /// Waits for the shim's ack of `generation`.
    async fn acked(&mut self, generation: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = tokio::time::timeout_at(deadline.into(), self.inbound.recv())
                .await
                .unwrap_or_else(|_| panic!("no ack of generation {generation}"))
                .expect("the stream is open");
            if let Some(shim_message::Message::Ack(a)) = m.message
                && a.generation == generation
            {
                return;
            }
        }
    }

    /// Ends the stream with an error, as a broken connection does.
    async fn cut(self) {
        self.heartbeats.abort();
        let _ = self.tx.send(Err(Status::unavailable("cut"))).await;
    }
}

/// The node channel server of the test: every new stream is handed to the test.
struct StandIn {
    sessions: mpsc::UnboundedSender<Session>,
}

#[tonic::async_trait]
impl NodeChannel for StandIn {
    type SyncStream = ReceiverStream<Result<OperatorMessage, Status>>;

    async fn sync(
        &self,
        request: Request<Streaming<ShimMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut stream = request.into_inner();
        let (in_tx, inbound) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                if in_tx.send(m).is_err() {
                    return;
                }
            }
        });
        let (tx, rx) = mpsc::channel(8);
        let beats = tx.clone();
        // Heartbeats go between chunks too: the shim must take them there.
        let heartbeats = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let hb = OperatorMessage {
                    message: Some(operator_message::Message::Heartbeat(v2::Heartbeat {
                        sent_unix_ms: 0,
                    })),
                };
                if beats.send(Ok(hb)).await.is_err() {
                    return;
                }
            }
        });
        let _ = self.sessions.send(Session {
            tx,
            inbound,
            heartbeats,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Operator {
    addr: SocketAddr,
    sessions: mpsc::UnboundedReceiver<Session>,
}

impl Operator {
    async fn start() -> Operator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sessions_tx, sessions) = mpsc::unbounded_channel();
        let service = NodeChannelServer::new(StandIn {
            sessions: sessions_tx,
        })
        .max_encoding_message_size(sluice_proto::MAX_OPERATOR_MESSAGE);
        let server = Server::builder().add_service(service);
        tokio::spawn(server.serve_with_incoming(TcpIncoming::from(listener)));
        Operator { addr, sessions }
    }

    /// The next session, once its hello is in.
    async fn session(&mut self) -> Session {
        let mut s = tokio::time::timeout(Duration::from_secs(30), self.sessions.recv())
            .await
            .expect("the shim connects")
            .unwrap();
        let hello = s.inbound.recv().await.expect("a hello");
        assert!(matches!(hello.message, Some(shim_message::Message::Hello(_))));
        s
    }

    fn config(&self) -> Config {
        let mut c = Config::new(format!("http://{}", self.addr));
        c.token = Some("t".into());
        c.backoff_min = Duration::from_millis(20);
        c.backoff_max = Duration::from_millis(100);
        c
    }
}

fn hello() -> HelloFn {
    Arc::new(|| v2::Hello {
        node: "node-a".into(),
        version: "test".into(),
        ..Default::default()
    })
}

/// The shim client with a datapath that applies every state it sees, and remembers each.
struct Shim {
    plans: watch::Receiver<Option<Arc<NodeState>>>,
    seen: Arc<Mutex<Vec<Arc<NodeState>>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Shim {
    fn start(config: Config) -> Shim {
        let (updates_tx, mut updates) = client::updates();
        let (plans_tx, plans) = watch::channel(None);
        let (applied_tx, applied_rx) = watch::channel(Applied::default());
        let session = tokio::spawn(client::run(config, hello(), updates_tx, applied_rx));
        let seen: Arc<Mutex<Vec<Arc<NodeState>>>> = Arc::default();
        let log = seen.clone();
        let applier = tokio::spawn(async move {
            let mut state = None;
            while let Some(batch) = updates.next_batch().await {
                client::fold(&mut state, batch);
                let Some(state) = state.clone().map(Arc::new) else {
                    continue;
                };
                plans_tx.send_replace(Some(state.clone()));
                log.lock().unwrap().push(state.clone());
                applied_tx.send_replace(Applied {
                    session: state.session,
                    generation: state.generation,
                    errors: vec![],
                    conflicts: vec![],
                    ..Applied::default()
                });
            }
        });
        Shim {
            plans,
            seen,
            tasks: vec![session, applier],
        }
    }

    fn state(&self) -> Option<Arc<NodeState>> {
        self.plans.borrow().clone()
    }

    async fn wait_generation(&self, generation: u64) -> Arc<NodeState> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.state().filter(|s| s.generation == generation) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "generation {generation} never arrived: {:?}",
                self.state().map(|s| s.generation)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Entry `i` of a policy: pod `i / cidrs` to CIDR `i % cidrs` (as a SaaS allowlist makes them).
fn entry(policy: &str, i: usize, cidrs: usize, octet: u8) -> EgressEntry {
    let (pod, cidr) = (i / cidrs, i % cidrs);
    EgressEntry {
        key: EntryKey {
            source: format!("10.{}.{}.{}", 244 - pod / 65536 % 256, pod / 256 % 256, pod % 256)
                .parse()
                .unwrap(),
            destination: format!("{octet}.{}.{}.0/24", cidr / 256, cidr % 256)
                .parse()
                .unwrap(),
        },
        gateway: GatewayTarget::Node("192.168.1.2".parse().unwrap()),
        egress_ip: Some("203.0.113.10".parse().unwrap()),
        interface: None,
        source_node_ip: None,
        gateway_slot: Some(GatewaySlotRef { entry: 0, slot: 0 }),
        policy: policy.into(),
    }
}

/// Entries as one plan or delta encodes them: with the list of the policies they name.
fn encode(entries: &[EgressEntry]) -> (Vec<String>, Vec<v2::Entry>) {
    let mut names = PolicyNames::default();
    let wire = entries
        .iter()
        .map(|e| convert::entry_to_wire(e, &mut names))
        .collect();
    (names.into_wire(), wire)
}

fn plan(generation: u64, entries: &[EgressEntry]) -> v2::NodePlan {
    let (policies, entries) = encode(entries);
    v2::NodePlan {
        generation,
        policies,
        entries,
        heartbeat_interval_ms: 100,
        cluster_cidrs: vec![convert::prefix_to_wire("10.244.0.0/16".parse().unwrap())],
        guard: Some(v2::Guard {
            destinations: vec![convert::prefix_to_wire("192.0.2.0/24".parse().unwrap())],
            decided_pods: vec![convert::ip_to_wire("10.244.0.1".parse().unwrap())],
        }),
        ..Default::default()
    }
}

fn table(entries: &[EgressEntry]) -> BTreeMap<EntryKey, EgressEntry> {
    entries.iter().map(|e| (e.key, e.clone())).collect()
}

#[tokio::test]
async fn a_plan_of_150000_entries_and_a_delta_of_100000_upserts_arrive_whole() {
    let mut op = Operator::start().await;
    let shim = Shim::start(op.config());
    let mut s = op.session().await;

    let entries: Vec<EgressEntry> = (0..150_000).map(|i| entry("saas", i, 1000, 100)).collect();
    let whole = plan(5, &entries);
    let bytes = v2::OperatorMessage::from(Part::Plan(whole.clone())).encoded_len();
    assert!(bytes > 4 << 20, "more than tonic's default limit: {bytes} bytes");
    // What architecture.md quotes for a gateway's entries (egress IP and slot set); the string
    // form of `sluice.v1` took 74 (the issue's 8,873,976 bytes for 120,000 entries).
    let per_entry = bytes / entries.len();
    eprintln!("{per_entry} bytes an entry");
    assert!(per_entry <= 40, "{per_entry} bytes an entry");
    let chunks = s.send(Part::Plan(whole), CHUNK_BUDGET, None).await;
    assert!(
        chunks >= bytes / CHUNK_BUDGET,
        "{chunks} chunks for {bytes} bytes"
    );
    let state = shim.wait_generation(5).await;
    assert_eq!(state.entries, table(&entries), "the same entries");
    assert_eq!(state.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
    assert_eq!(state.guard.as_ref().unwrap().decided_pods.len(), 1);
    s.acked(5).await;

    // 100 more pods, each to the 1,000 CIDRs of a second policy.
    let upserts: Vec<EgressEntry> = (0..100_000)
        .map(|i| entry("saas-2", 150_000 + i, 1000, 101))
        .collect();
    let (policies, wire) = encode(&upserts);
    let delta = v2::NodeDelta {
        generation: 6,
        base_generation: 5,
        policies,
        upserts: wire,
        cluster_cidrs: vec![convert::prefix_to_wire("10.244.0.0/16".parse().unwrap())],
        guard: Some(v2::Guard::default()),
        ..Default::default()
    };
    let bytes = v2::OperatorMessage::from(Part::Delta(delta.clone())).encoded_len();
    let chunks = s.send(Part::Delta(delta), CHUNK_BUDGET, None).await;
    assert!(
        chunks >= bytes / CHUNK_BUDGET && chunks > 2,
        "{chunks} chunks for {bytes} bytes"
    );
    let after = shim.wait_generation(6).await;
    let mut want = table(&entries);
    want.extend(table(&upserts));
    assert_eq!(after.entries.len(), 250_000);
    assert_eq!(after.entries, want, "the same entries");
    assert_eq!(after.session, state.session, "in the same session: a delta");
    s.acked(6).await;
    // Nothing partial was ever published.
    let seen: Vec<u64> = shim.seen.lock().unwrap().iter().map(|s| s.generation).collect();
    assert!(seen.iter().all(|g| [5, 6].contains(g)), "{seen:?}");
}

#[tokio::test]
async fn a_stream_cut_within_a_plan_or_delta_leaves_the_previous_state() {
    let mut op = Operator::start().await;
    let shim = Shim::start(op.config());
    const BUDGET: usize = 4096;

    // Session 1: a whole plan, then half a delta, then the stream breaks.
    let mut s1 = op.session().await;
    let p1: Vec<EgressEntry> = (0..3000).map(|i| entry("p", i, 100, 100)).collect();
    let chunks = s1.send(Part::Plan(plan(1, &p1)), BUDGET, None).await;
    assert!(chunks > 10, "{chunks}");
    let first = shim.wait_generation(1).await;
    assert_eq!(first.entries, table(&p1));
    s1.acked(1).await;
    let q: Vec<EgressEntry> = (0..3000).map(|i| entry("q", i, 100, 101)).collect();
    let (policies, upserts) = encode(&q);
    let delta = v2::NodeDelta {
        generation: 2,
        base_generation: 1,
        policies,
        upserts,
        removals: p1[..1500].iter().map(|e| v2::EntryKey::from(&e.key)).collect(),
        ..Default::default()
    };
    let total = Chunks::new(Part::Delta(delta.clone()), BUDGET).count();
    assert!(total > 10, "{total}");
    s1.send(Part::Delta(delta), BUDGET, Some(total / 2)).await;
    s1.cut().await;

    // Session 2 (the shim reconnected, so it read all of session 1): half a plan, then the
    // stream closes cleanly.
    let s2 = op.session().await;
    assert_eq!(shim.state(), Some(first.clone()), "session 1's whole plan");
    let p3: Vec<EgressEntry> = (0..3000).map(|i| entry("r", i, 100, 102)).collect();
    let total = Chunks::new(Part::Plan(plan(3, &p3)), BUDGET).count();
    s2.send(Part::Plan(plan(3, &p3)), BUDGET, Some(total - 1)).await;
    s2.heartbeats.abort();
    drop(s2);

    let mut s3 = op.session().await;
    assert_eq!(shim.state(), Some(first.clone()), "still session 1's whole plan");

    // A whole plan is taken again.
    let p4: Vec<EgressEntry> = (0..3000).map(|i| entry("s", i, 100, 103)).collect();
    s3.send(Part::Plan(plan(4, &p4)), BUDGET, None).await;
    assert_eq!(shim.wait_generation(4).await.entries, table(&p4));
    s3.acked(4).await;
    let seen: Vec<u64> = shim.seen.lock().unwrap().iter().map(|s| s.generation).collect();
    assert_eq!(seen, vec![1, 4], "only whole plans were ever published");
}

#[tokio::test]
async fn a_chunk_of_another_generation_ends_the_session_with_a_protocol_error() {
    let mut op = Operator::start().await;
    let config = op.config();
    let (plans, mut received) = client::updates();
    let (_applied_tx, mut applied) = watch::channel(Applied::default());
    let hello = hello();
    let shim = tokio::spawn(async move {
        let err = client::session(&config, &hello, &plans, &mut applied).await;
        (err, received.pending())
    });
    let s = op.session().await;
    let entries: Vec<EgressEntry> = (0..1000).map(|i| entry("p", i, 100, 100)).collect();
    let first = Chunks::new(Part::Plan(plan(7, &entries)), 4096).next().unwrap();
    assert!(first.continued());
    let other = Chunks::new(Part::Plan(plan(8, &entries)), 4096).nth(1).unwrap();
    s.tx.send(Ok(first.into())).await.unwrap();
    s.tx.send(Ok(other.into())).await.unwrap();

    let (err, published) = tokio::time::timeout(Duration::from_secs(30), shim)
        .await
        .expect("the session ends")
        .unwrap();
    let SessionError::Chunk(chunk) = &err else {
        panic!("a protocol error: {err:?}")
    };
    assert_eq!(
        *chunk,
        Interleaved {
            assembling: Which::Plan { generation: 7 },
            got: Which::Plan { generation: 8 },
            chunks: 1,
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("protocol error") && text.contains("generation 7") && text.contains("generation 8"),
        "{text}"
    );
    assert!(published.is_empty(), "nothing of it was published");
}

/// A delta can change how often the shim heartbeats (a node that stops being a possible gateway
/// is asked for fewer); the shim follows it without a new session.
#[tokio::test]
async fn the_heartbeat_interval_follows_plans_and_deltas() {
    let mut op = Operator::start().await;
    let shim = Shim::start(op.config());
    let mut s = op.session().await;
    let heartbeats_within = async |s: &mut Session, window: Duration| {
        let end = Instant::now() + window;
        let mut n = 0;
        while let Ok(Some(m)) = tokio::time::timeout_at(end.into(), s.inbound.recv()).await {
            n += usize::from(matches!(m.message, Some(shim_message::Message::Heartbeat(_))));
        }
        n
    };
    // The plan asks for 100 ms.
    s.send(Part::Plan(plan(1, &[entry("p", 0, 1, 100)])), CHUNK_BUDGET, None)
        .await;
    shim.wait_generation(1).await;
    let fast = heartbeats_within(&mut s, Duration::from_secs(1)).await;
    // A delta asks for 5 s.
    let delta = v2::NodeDelta {
        generation: 2,
        base_generation: 1,
        heartbeat_interval_ms: 5000,
        ..Default::default()
    };
    s.send(Part::Delta(delta), CHUNK_BUDGET, None).await;
    let second = shim.wait_generation(2).await;
    // The first beat of the new interval goes at once; then none for 5 s.
    heartbeats_within(&mut s, Duration::from_millis(200)).await;
    let slow = heartbeats_within(&mut s, Duration::from_secs(2)).await;
    assert!(fast >= 5, "{fast} heartbeats in a second at 100 ms");
    assert_eq!(slow, 0, "no heartbeat within 2 s at 5 s");
    assert_eq!(shim.state().map(|s| s.session), Some(second.session));
}
