//! The operator's side of the node channel (`sluice.v2.NodeChannel`): one session per shim.
//!
//! A session authenticates the shim ([`TokenVerifier`]), takes its `Hello` (refused unless the
//! credentials are bound to that node), reports it to the engine, then sends the node's views:
//! the whole plan first, then deltas from what it last sent. It only ever waits on its own shim;
//! while it waits, newer views replace older ones in the node's `watch` channel, so what it sends
//! next covers all of them at once. A plan or delta larger than the chunk budget goes out in
//! chunks ([`sluice_proto::chunk`]), back to back: no view is read before its last chunk is sent.
//!
//! One client costs a bounded amount ([`ServerLimits`]): a TLS handshake must finish in time, a
//! connection carries a few streams, HTTP/2 pings find dead peers, and a node has one live
//! session: a newer one ends the older one (a shim that restarted behind a half-open connection).
//! A session buffers at most a few chunks, whatever the size of its node's plan, and decodes
//! shim messages of at most [`sluice_proto::MAX_SHIM_MESSAGE`].
//! What a token costs the API server is bounded by the verifier (see [`crate::auth`]).
//! The serving certificate follows its files as they are renewed (see [`crate::tls`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_proto::{
    chunk::{self, Chunks, Part},
    client::GuardChange,
    convert::{self, PolicyNames},
    v2::{
        self, ShimMessage,
        node_channel_server::{NodeChannel, NodeChannelServer},
        operator_message, shim_message,
    },
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Server, server::TcpIncoming},
};

use crate::{
    auth::TokenVerifier,
    engine::{HeldDuty, HeldPod, Hub, NodeView, PinnedCounts, ShimEvent},
    model::InterfaceInfo,
    planner::{EgressEntry, EntryKey},
    tls::TlsIncoming,
};

pub use crate::tls::Tls;

mod legacy;

/// The `NodeChannel` service.
#[derive(Clone)]
pub struct NodeService {
    hub: Arc<Hub>,
    verifier: Arc<dyn TokenVerifier>,
    /// Session numbers, shared with the legacy channel: unique across both.
    sessions: Arc<AtomicU64>,
    live: Arc<LiveSessions>,
    hello_timeout: Duration,
    chunk_budget: usize,
}

impl NodeService {
    pub fn new(hub: Arc<Hub>, verifier: Arc<dyn TokenVerifier>) -> Self {
        NodeService {
            hub,
            verifier,
            sessions: Arc::default(),
            live: Arc::default(),
            hello_timeout: Duration::from_secs(10),
            chunk_budget: chunk::CHUNK_BUDGET,
        }
    }

    /// Chunks of at most `bytes` (default [`chunk::CHUNK_BUDGET`]); tests make them small.
    pub fn with_chunk_budget(mut self, bytes: usize) -> Self {
        self.chunk_budget = bytes;
        self
    }

    pub fn into_server(self) -> NodeChannelServer<Self> {
        NodeChannelServer::new(self)
            .max_decoding_message_size(sluice_proto::MAX_SHIM_MESSAGE)
            .max_encoding_message_size(sluice_proto::MAX_OPERATOR_MESSAGE)
    }
}

/// What one connection may hold of the server.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A client that has not finished its TLS handshake by then is disconnected.
    pub tls_handshake_timeout: Duration,
    /// Streams one connection may have open at once (a shim needs one).
    pub max_concurrent_streams: u32,
    /// How long a connection may carry nothing before an HTTP/2 ping (and TCP keepalive probe)
    /// checks the peer. Above the slowest heartbeat interval, so that pings go only to
    /// connections without a live session: heartbeats already prove a shim alive, and a ping
    /// to every shim every few seconds was a third of an idle operator's wakeups.
    pub keepalive_interval: Duration,
    /// A peer that has not answered a ping by then is disconnected.
    pub keepalive_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            tls_handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 4,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves the node channel on `listener` with the default [`ServerLimits`] until `shutdown`
/// resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: NodeService,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(listener, service, tls, &ServerLimits::default(), shutdown).await
}

/// Serves the node channel on `listener` until `shutdown` resolves.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    service: NodeService,
    tls: Option<Tls>,
    limits: &ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let router = Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .add_service(legacy::LegacyNodeService(service.clone()).into_server())
        .add_service(service.into_server());
    // The builder's TCP options apply only to listeners it binds itself.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(limits.keepalive_interval));
    // TLS is ours, not the builder's: its identity is fixed, and certificates are renewed.
    match tls {
        Some(tls) => {
            let incoming = TlsIncoming::new(incoming, tls, limits.tls_handshake_timeout)?;
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
        None => router.serve_with_incoming_shutdown(incoming, shutdown).await?,
    }
    Ok(())
}

/// Binds `addr` (for callers that want the bound address before serving).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Why the node channel could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("serving the node channel")]
    Transport(#[from] tonic::transport::Error),
}

type OutStream = Pin<Box<dyn Stream<Item = Result<v2::OperatorMessage, Status>> + Send>>;

fn bearer<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let Some(value) = request.metadata().get(sluice_proto::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
    value
        .strip_prefix("Bearer ")
        .map(|t| Some(t.trim().to_owned()))
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))
}

#[tonic::async_trait]
impl NodeChannel for NodeService {
    type SyncStream = OutStream;

    async fn sync(&self, request: Request<Streaming<ShimMessage>>) -> Result<Response<OutStream>, Status> {
        let peer = request.remote_addr();
        let token = bearer(&request)?;
        let identity = self.verifier.verify(token.as_deref()).await.inspect_err(|e| {
            tracing::warn!(?peer, error = %e, "shim refused");
        })?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello"))??;
        let Some(ShimMessage {
            message: Some(shim_message::Message::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be a hello"));
        };
        check_hello(&hello).inspect_err(|e| {
            tracing::warn!(?peer, error = %e, "shim refused");
        })?;
        if !identity.allows(&hello.node) {
            tracing::warn!(?peer, node = %hello.node, ?identity, "shim asked for another node's plan");
            return Err(Status::permission_denied(format!(
                "these credentials are not bound to node {}",
                hello.node
            )));
        }
        let session = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(4);
        let hub = self.hub.clone();
        let budget = self.chunk_budget;
        tokio::spawn(run_session(
            hub,
            self.live.clone(),
            session,
            hello,
            inbound,
            tx,
            budget,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The live session of each node.
#[derive(Default)]
struct LiveSessions(Mutex<HashMap<String, (u64, oneshot::Sender<u64>)>>);

impl LiveSessions {
    /// Makes `session` the node's live one; the receiver fires when a newer one replaces it.
    fn claim(&self, node: &str, session: u64) -> oneshot::Receiver<u64> {
        let (tx, rx) = oneshot::channel();
        let old = self
            .0
            .lock()
            .expect("sessions lock")
            .insert(node.to_owned(), (session, tx));
        if let Some((old, stop)) = old {
            tracing::warn!(%node, old, new = session, "a newer session of this node replaces the old one");
            let _ = stop.send(session);
        }
        rx
    }

    fn release(&self, node: &str, session: u64) {
        let mut live = self.0.lock().expect("sessions lock");
        if live.get(node).is_some_and(|(s, _)| *s == session) {
            live.remove(node);
        }
    }
}

/// The interfaces of a hello that [`check_hello`] accepted.
fn interfaces(hello: &v2::Hello) -> Vec<InterfaceInfo> {
    check_hello(hello).unwrap_or_default()
}

/// Checks a shim's `Hello` before any of it reaches the engine, and returns its interfaces. The
/// node name becomes a key of the engine's tables, and the interfaces decide which nodes can serve
/// a policy: what no kernel or cluster could have produced is refused, saying what.
pub fn check_hello(hello: &v2::Hello) -> Result<Vec<InterfaceInfo>, Status> {
    let bad = |what: String| Err(Status::invalid_argument(format!("hello: {what}")));
    if hello.node.is_empty() {
        return bad("the node name is empty".to_owned());
    }
    if !is_node_name(&hello.node) {
        return bad(format!(
            "node {} is not a Kubernetes node name (at most 253 lowercase letters, digits, '-' \
             and '.', in labels that start and end with a letter or digit)",
            shorten(&hello.node)
        ));
    }
    let mut interfaces = Vec::with_capacity(hello.interfaces.len());
    for (i, interface) in hello.interfaces.iter().enumerate() {
        if !crate::policy::is_interface_name(&interface.name) {
            return bad(format!(
                "interfaces[{i}].name {} is not an interface name",
                shorten(&interface.name)
            ));
        }
        let mut addresses = Vec::with_capacity(interface.addresses.len());
        for (j, address) in interface.addresses.iter().enumerate() {
            match convert::ip_from_wire("address", address) {
                Ok(ip) => addresses.push(ip),
                Err(e) => return bad(format!("interfaces[{i}].addresses[{j}]: {e}")),
            }
        }
        let networks = match convert::prefixes_from_wire("network", &interface.networks) {
            Ok(n) => n,
            Err(e) => return bad(format!("interfaces[{i}].networks: {e}")),
        };
        interfaces.push(InterfaceInfo {
            name: interface.name.clone(),
            addresses,
            networks,
            default_route: hello.default_route_interface.as_deref() == Some(interface.name.as_str()),
        });
    }
    Ok(interfaces)
}

/// An RFC 1123 subdomain, as Kubernetes requires of node names.
fn is_node_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A value for an error message: quoted, and cut short when long (it may be a megabyte).
fn shorten(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes)", &value[..end], value.len()),
    }
}

async fn run_session(
    hub: Arc<Hub>,
    live: Arc<LiveSessions>,
    session: u64,
    hello: v2::Hello,
    inbound: Streaming<ShimMessage>,
    tx: mpsc::Sender<Result<v2::OperatorMessage, Status>>,
    chunk_budget: usize,
) {
    let node = hello.node.clone();
    let mut views = hub.subscribe(&node);
    // Reported before the older session is ended, so that the engine sees the node's shim
    // connected throughout: its gateways stay where they are.
    hub.report(ShimEvent::Connected {
        node: node.clone(),
        session,
        version: hello.version.clone(),
        interfaces: interfaces(&hello),
        held: held_duties(&hello),
        pods: held_pods(&hello.held_pods),
        pinned: held_pods(&hello.pinned_flows),
    });
    let mut replaced = live.claim(&node, session);
    // Whether the latest view may not have been sent yet. Views are read only once the shim can
    // take a message, so that one that reads slowly gets the newest view, and the session keeps
    // answering (heartbeats, replacement) meanwhile.
    let mut unsent = true;
    // The node's own interval comes with its views (fast for nodes that may be gateways).
    let mut interval = hub.heartbeat_interval;
    // The operator's own heartbeats, at the shim's interval or, for shims that take it, no
    // faster than the floor: they only tell a shim when to reconnect. The same ticker judges
    // the shim's silence (ending the session; failover is the engine's, from the stamps).
    let pace = |interval| {
        if hello.operator_heartbeat_floor {
            sluice_proto::operator_heartbeat_interval(interval)
        } else {
            interval
        }
    };
    let mut ticker = aligned_ticker(pace(interval));
    let keeps = hello.keeps_unchanged_lists;
    // The shim's messages are read by a task of their own: building and sending a large plan
    // never keeps its heartbeats (its liveness) waiting.
    let beats = Arc::new(Mutex::new(Beats::new(Instant::now(), pace(interval), interval)));
    let mut reader = tokio::spawn(read_shim(
        inbound,
        hub.clone(),
        node.clone(),
        session,
        beats.clone(),
        tx.clone(),
    ));
    let mut sent: Option<Arc<NodeView>> = None;
    // The rest of the plan or delta being sent. Its chunks go out before any newer view: the
    // shim takes none of it until the last, and a chunk of anything else in between would be a
    // protocol error.
    let mut sending: Option<Chunks> = None;
    let reason = loop {
        tokio::select! {
            // The ticker last: a shim is silent only when nothing else is ready.
            biased;
            by = &mut replaced => {
                let _ = tx.try_send(Err(Status::aborted("a newer session of this node replaced this one")));
                break match by {
                    Ok(by) => format!("replaced by session {by}"),
                    Err(_) => "server stopped".to_owned(),
                };
            }
            end = &mut reader => {
                break end.unwrap_or_else(|e| format!("reading the stream failed: {e}"));
            }
            changed = views.changed(), if !unsent => {
                if changed.is_err() {
                    break "engine stopped".to_owned();
                }
                unsent = true;
            }
            permit = tx.reserve(), if unsent || sending.is_some() => {
                let Ok(permit) = permit else { break "stream closed".to_owned() };
                if sending.is_none() {
                    unsent = false;
                    let Some(view) = views.borrow_and_update().clone() else { continue };
                    let work = entries_to_build(sent.as_deref(), &view);
                    let Some(whole) = off_the_workers(work, || message_for(sent.as_deref(), &view, hub.heartbeat_interval, keeps)) else { continue };
                    let wanted = effective_interval(&view, hub.heartbeat_interval);
                    if wanted != interval {
                        interval = wanted;
                        ticker = aligned_ticker(pace(interval));
                        // The shim heard of it only now: its silence is measured from here.
                        beats.lock().expect("beats").retime(Instant::now(), pace(interval), interval);
                    }
                    sending = Some(Chunks::new(whole, chunk_budget));
                    sent = Some(view);
                }
                let Some(chunk) = sending.as_mut().and_then(Iterator::next) else {
                    sending = None;
                    continue;
                };
                if !chunk.continued() {
                    sending = None;
                }
                permit.send(Ok(chunk.into()));
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                let (silent, due) = {
                    let mut beats = beats.lock().expect("beats");
                    (beats.shim_silent(now), beats.take_due_on_tick(now))
                };
                if silent {
                    break "shim silent".to_owned();
                }
                if due {
                    // A shim that does not read is not sent more: its next view is coalesced anyway.
                    let _ = tx.try_send(Ok(operator_heartbeat()));
                }
            }
        }
    };
    reader.abort();
    live.release(&node, session);
    tracing::info!(%node, session, %reason, "session ended");
    hub.report(ShimEvent::Disconnected { node, session });
}

/// Reads what the shim sends until the stream ends (or is unusable), and says why it ended.
async fn read_shim(
    mut inbound: Streaming<ShimMessage>,
    hub: Arc<Hub>,
    node: String,
    session: u64,
    beats: Arc<Mutex<Beats>>,
    tx: mpsc::Sender<Result<v2::OperatorMessage, Status>>,
) -> String {
    loop {
        let msg = inbound.message().await;
        let now = Instant::now();
        let answer = {
            let mut beats = beats.lock().expect("beats");
            beats.heard = now;
            matches!(
                &msg,
                Ok(Some(ShimMessage {
                    message: Some(shim_message::Message::Heartbeat(_))
                }))
            ) && beats.take_due_on_heartbeat(now)
        };
        if answer {
            let _ = tx.try_send(Ok(operator_heartbeat()));
        }
        match msg {
            Ok(Some(ShimMessage {
                message: Some(shim_message::Message::Ack(ack)),
            })) => {
                hub.report(ShimEvent::Ack {
                    node: node.clone(),
                    session,
                    generation: ack.generation,
                    errors: entry_errors(&ack),
                    conflicts: address_conflicts(&ack),
                });
                hub.report(ShimEvent::PinnedFlows {
                    node: node.clone(),
                    session,
                    counts: pinned_counts(&ack),
                });
            }
            Ok(Some(ShimMessage {
                message: Some(shim_message::Message::Heartbeat(_)),
            })) => hub.heard(session, now),
            Ok(Some(_)) => {
                let _ = tx.send(Err(Status::invalid_argument("unexpected message"))).await;
                return "unexpected message".to_owned();
            }
            Ok(None) => return "shim closed the stream".to_owned(),
            Err(e) => return format!("stream error: {}", e.message()),
        }
    }
}

fn operator_heartbeat() -> v2::OperatorMessage {
    v2::OperatorMessage {
        message: Some(operator_message::Message::Heartbeat(v2::Heartbeat {
            sent_unix_ms: 0,
        })),
    }
}

/// The heartbeats of one session, both ways.
///
/// At rest, heartbeats are all the operator does, and what they cost is mostly waking up for
/// each: so the operator's own heartbeat goes out as the answer to one of the shim's, in the
/// wakeup that read it, and the session's ticker, which judges the shim's silence, ticks in step
/// with every other session of the same pace (one wakeup for all of them). The ticker sends a
/// heartbeat itself only when no answer went out for a whole pace (a shim that went quiet).
#[derive(Debug)]
struct Beats {
    /// When the shim was last heard from (any message).
    heard: Instant,
    /// When the operator last sent the shim a heartbeat.
    sent: Instant,
    /// How often the operator's heartbeats go out.
    pace: Duration,
    /// How often the shim's heartbeats come.
    shim_interval: Duration,
}

impl Beats {
    fn new(now: Instant, pace: Duration, shim_interval: Duration) -> Self {
        Beats {
            heard: now,
            sent: now,
            pace,
            shim_interval,
        }
    }

    /// The shim was told of a new interval at `now`.
    fn retime(&mut self, now: Instant, pace: Duration, shim_interval: Duration) {
        self.heard = now;
        self.pace = pace;
        self.shim_interval = shim_interval;
    }

    /// Whether the shim has been silent for too long (four of its intervals, at least 1 s).
    fn shim_silent(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.heard) > (self.shim_interval * 4).max(Duration::from_secs(1))
    }

    /// Whether a shim heartbeat arriving at `now` is to be answered (then counted as sent): the
    /// answer that comes closest to the pace without going beyond it by more than half a shim
    /// interval.
    fn take_due_on_heartbeat(&mut self, now: Instant) -> bool {
        let due = now.saturating_duration_since(self.sent) + self.shim_interval / 2 >= self.pace;
        if due {
            self.sent = now;
        }
        due
    }

    /// Whether the ticker must send a heartbeat at `now` (then counted as sent): none went out
    /// for a whole pace.
    fn take_due_on_tick(&mut self, now: Instant) -> bool {
        let due = now.saturating_duration_since(self.sent) >= self.pace;
        if due {
            self.sent = now;
        }
        due
    }
}

/// A ticker of period `pace` whose ticks fall on multiples of `pace` since one process-wide
/// instant: the tickers of all sessions of the same pace wake together.
fn aligned_ticker(pace: Duration) -> tokio::time::Interval {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let mut ticker = tokio::time::interval_at(next_multiple(epoch, Instant::now(), pace).into(), pace);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    ticker
}

/// The first instant `epoch + k * pace` (k >= 1) after `now`.
fn next_multiple(epoch: Instant, now: Instant, pace: Duration) -> Instant {
    let pace_ns = pace.as_nanos().max(1);
    let since = now.saturating_duration_since(epoch).as_nanos();
    let k = since / pace_ns + 1;
    epoch + Duration::from_nanos(u64::try_from(k * pace_ns).unwrap_or(u64::MAX))
}

/// Runs `f`, which handles `entries` entries: when they are many (the plan of a node with a
/// million entries takes about a second), without holding up the other sessions of this worker
/// thread, whose shims' heartbeats must still be read in time.
fn off_the_workers<T>(entries: usize, f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    const MANY: usize = 10_000;
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) if entries >= MANY => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// How many entries [`message_for`] goes through.
fn entries_to_build(sent: Option<&NodeView>, view: &NodeView) -> usize {
    match sent {
        None => view.entries.len(),
        Some(s) if s.generation == view.generation => 0,
        Some(s) if s.generation == view.base => view.delta.upserts.len() + view.delta.removals.len(),
        Some(s) => s.entries.len() + view.entries.len(),
    }
}

/// The heartbeat interval of a node's view (a view that names none: the server's default).
fn effective_interval(view: &NodeView, default: Duration) -> Duration {
    if view.heartbeat_interval.is_zero() {
        default
    } else {
        view.heartbeat_interval
    }
}

/// What to send a shim that was last sent `sent` so that it holds `view` (whole: the session
/// splits it into chunks). Every plan and delta carries the node's heartbeat interval
/// (`default` for a view that names none). To a shim that `keeps` what a delta leaves out, a
/// delta leaves out the guard and the in-cluster set when they are as `sent` had them.
pub fn message_for(sent: Option<&NodeView>, view: &NodeView, default: Duration, keeps: bool) -> Option<Part> {
    let heartbeat = effective_interval(view, default);
    let heartbeat_interval_ms = u32::try_from(heartbeat.as_millis()).unwrap_or(u32::MAX);
    let mut policies = PolicyNames::default();
    let message = match sent {
        None => {
            let entries = view
                .entries
                .values()
                .map(|e| convert::entry_to_wire(e, &mut policies))
                .collect();
            Part::Plan(v2::NodePlan {
                generation: view.generation,
                policies: policies.into_wire(),
                entries,
                serves: view.duties.iter().map(v2::GatewayDuty::from).collect(),
                heartbeat_interval_ms,
                cluster_cidrs: cluster_cidrs(view),
                guard: guard(view),
                continued: false,
                pinnable_gateways: pinnable(view),
            })
        }
        Some(s) if s.generation == view.generation => return None,
        Some(s) => {
            let (upserts, removals, base) = if s.generation == view.base {
                let upserts = view
                    .delta
                    .upserts
                    .values()
                    .map(|e| convert::entry_to_wire(e, &mut policies))
                    .collect();
                let removals = view.delta.removals.iter().map(v2::EntryKey::from).collect();
                (upserts, removals, view.base)
            } else {
                let (upserts, removals) = diff(&s.entries, &view.entries, &mut policies);
                (upserts, removals, s.generation)
            };
            let guard_unchanged = keeps && s.guard == view.guard;
            let cluster_cidrs_unchanged = keeps && s.cluster_cidrs == view.cluster_cidrs;
            let guard_change = (keeps && !guard_unchanged)
                .then(|| GuardChange::between(&s.guard, &view.guard, GUARD_CHANGE_MAX))
                .flatten();
            Part::Delta(v2::NodeDelta {
                generation: view.generation,
                base_generation: base,
                policies: policies.into_wire(),
                upserts,
                removals,
                serves: view.duties.iter().map(v2::GatewayDuty::from).collect(),
                cluster_cidrs: if cluster_cidrs_unchanged {
                    Vec::new()
                } else {
                    cluster_cidrs(view)
                },
                guard: if guard_unchanged || guard_change.is_some() {
                    None
                } else {
                    guard(view)
                },
                guard_change: guard_change.as_ref().map(v2::GuardChange::from),
                continued: false,
                heartbeat_interval_ms,
                pinnable_gateways: pinnable(view),
                guard_unchanged,
                cluster_cidrs_unchanged,
            })
        }
    };
    Some(message)
}

/// The most items a delta's guard change has (a larger change sends the guard whole): it goes
/// whole in the first chunk.
const GUARD_CHANGE_MAX: usize = 4096;

fn pinnable(view: &NodeView) -> Vec<Vec<u8>> {
    view.pinnable.iter().copied().map(convert::ip_to_wire).collect()
}

fn guard(view: &NodeView) -> Option<v2::Guard> {
    Some(v2::Guard::from(&*view.guard))
}

fn cluster_cidrs(view: &NodeView) -> Vec<v2::Prefix> {
    view.cluster_cidrs
        .iter()
        .copied()
        .map(convert::prefix_to_wire)
        .collect()
}

fn diff(
    old: &BTreeMap<EntryKey, EgressEntry>,
    new: &BTreeMap<EntryKey, EgressEntry>,
    policies: &mut PolicyNames,
) -> (Vec<v2::Entry>, Vec<v2::EntryKey>) {
    let upserts = new
        .iter()
        .filter(|(k, e)| old.get(*k) != Some(*e))
        .map(|(_, e)| convert::entry_to_wire(e, policies))
        .collect();
    let removals = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(v2::EntryKey::from)
        .collect();
    (upserts, removals)
}

/// The entries a shim reports it could not program. One whose key does not parse names no entry
/// of ours: it is logged and left out.
/// The managed addresses an ack says the shim did not claim: bounded (they end up in a status),
/// and those that do not decode dropped.
fn address_conflicts(ack: &v2::Ack) -> Vec<(std::net::IpAddr, String)> {
    const MAX_CONFLICTS: usize = 64;
    const MAX_DETAIL: usize = 128;
    ack.conflicts
        .iter()
        .take(MAX_CONFLICTS)
        .filter_map(|c| {
            let ip = convert::ip_from_wire("conflicting address", &c.ip).ok()?;
            let detail: String = c.detail.chars().take(MAX_DETAIL).collect();
            Some((ip, detail))
        })
        .collect()
}

fn entry_errors(ack: &v2::Ack) -> Vec<(EntryKey, String)> {
    // They end up in policy status: bounded, whatever a shim sends.
    const MAX_ERRORS: usize = sluice_proto::MAX_ACK_ERRORS;
    const MAX_MESSAGE: usize = 256;
    ack.errors
        .iter()
        .take(MAX_ERRORS)
        .filter_map(|e| {
            let key = e
                .key
                .as_ref()
                .ok_or_else(|| convert::BadField {
                    field: "entry key",
                    problem: "missing".into(),
                })
                .and_then(EntryKey::try_from);
            match key {
                Ok(key) => {
                    let mut message = e.message.clone();
                    if message.len() > MAX_MESSAGE {
                        let mut end = MAX_MESSAGE;
                        while !message.is_char_boundary(end) {
                            end -= 1;
                        }
                        message.truncate(end);
                        message.push('…');
                    }
                    Some((key, message))
                }
                Err(err) => {
                    tracing::warn!(error = %err, "an entry error that names no entry");
                    None
                }
            }
        })
        .collect()
}

/// The pods' gateways a shim reports holding, or its pods' flows pinned (entries whose addresses
/// do not decode are left out: they only ever keep a pod's traffic where it is).
fn held_pods(reported: &[v2::HeldPod]) -> Vec<HeldPod> {
    reported
        .iter()
        .filter_map(|p| {
            Some(HeldPod {
                policy: p.policy.clone(),
                pod: convert::ip_from_wire("pod", &p.pod).ok()?,
                gateway: convert::ip_from_wire("gateway", &p.gateway).ok()?,
            })
        })
        .collect()
}

/// The open flows a shim's pods have pinned to gateways, as its acknowledgement counts them
/// (counts whose addresses do not decode are left out, and a gateway that does not decode is
/// not counted: either only keeps a drain going longer).
fn pinned_counts(ack: &v2::Ack) -> PinnedCounts {
    PinnedCounts::new(
        ack.counted_gateways
            .iter()
            .filter_map(|g| convert::ip_from_wire("gateway", g).ok()),
        ack.pinned_flows.iter().filter_map(|c| {
            let pod = convert::ip_from_wire("pod", &c.pod).ok()?;
            let gateway = convert::ip_from_wire("gateway", &c.gateway).ok()?;
            Some(((pod, c.policy.clone(), gateway), u64::from(c.flows)))
        }),
    )
}

/// The gateway duties a shim reports holding. They only ever make the new leader keep a node
/// that is a candidate anyway in a slot the policy has; anything else in them is ignored.
fn held_duties(hello: &v2::Hello) -> Vec<HeldDuty> {
    hello
        .held
        .iter()
        .filter(|d| !d.policy.is_empty())
        .filter_map(|d| {
            let slot = d.slot.as_ref()?;
            Some(HeldDuty {
                policy: d.policy.clone(),
                entry: slot.entry as usize,
                slot: slot.slot as usize,
                gateway: convert::ip_from_wire("gateway", &d.gateway).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Guard;

    /// The operator's heartbeats as a shim beating every `shim` at `pace` sees them over `for_`,
    /// its own beats stopping at `until` (then only the ticker answers).
    fn operator_beats(shim: Duration, pace: Duration, until: Duration, for_: Duration) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut beats = Beats::new(t0, pace, shim);
        let (mut sent, step) = (vec![], Duration::from_millis(10));
        let mut t = step;
        while t <= for_ {
            let now = t0 + t;
            if t.as_millis() % shim.as_millis() == 0 && t <= until && beats.take_due_on_heartbeat(now) {
                sent.push(t);
            }
            if t.as_millis() % pace.as_millis() == 0 && beats.take_due_on_tick(now) {
                sent.push(t);
            }
            t += step;
        }
        sent
    }

    #[test]
    fn the_operator_answers_heartbeats_at_its_pace_and_its_ticker_covers_a_silent_shim() {
        let ms = Duration::from_millis;
        // A gateway's shim (250 ms) and an operator pace of 2 s: every eighth beat is answered,
        // the ticker sends none.
        let gaps = |sent: &[Duration]| sent.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>();
        let fast = operator_beats(ms(250), ms(2000), ms(20_000), ms(20_000));
        assert_eq!(fast.len(), 10, "{fast:?}");
        assert!(gaps(&fast).iter().all(|g| *g == ms(2000)), "{fast:?}");
        // A slow node: each of its beats is answered, though they come a hair before the pace.
        let slow = operator_beats(ms(10_000), ms(10_000), ms(60_000), ms(60_000));
        assert_eq!(slow.len(), 6, "{slow:?}");
        // The shim goes quiet: the ticker keeps the operator's heartbeats going, never more than
        // two paces apart (the shim takes four missed for a lost operator).
        let quiet = operator_beats(ms(250), ms(2000), ms(3000), ms(20_000));
        assert!(quiet.iter().any(|t| *t > ms(3000)), "{quiet:?}");
        assert!(gaps(&quiet).iter().all(|g| *g <= ms(4000)), "{quiet:?}");
    }

    #[test]
    fn a_shim_is_silent_after_four_of_its_intervals_and_a_new_interval_restarts_the_count() {
        let (t0, ms) = (Instant::now(), Duration::from_millis);
        let mut beats = Beats::new(t0, ms(2000), ms(250));
        assert!(!beats.shim_silent(t0 + ms(1000)));
        assert!(beats.shim_silent(t0 + ms(1001)));
        beats.retime(t0 + ms(1000), ms(10_000), ms(10_000));
        assert!(!beats.shim_silent(t0 + ms(41_000)));
        assert!(beats.shim_silent(t0 + ms(41_001)));
    }

    #[test]
    fn tickers_of_one_pace_fall_on_the_same_instants() {
        let (epoch, ms) = (Instant::now(), Duration::from_millis);
        assert_eq!(next_multiple(epoch, epoch, ms(2000)), epoch + ms(2000));
        assert_eq!(next_multiple(epoch, epoch + ms(1999), ms(2000)), epoch + ms(2000));
        assert_eq!(next_multiple(epoch, epoch + ms(2000), ms(2000)), epoch + ms(4000));
        assert_eq!(next_multiple(epoch, epoch + ms(7300), ms(2000)), epoch + ms(8000));
    }

    fn view(generation: u64, guarded: &[&str], cluster: &[&str]) -> NodeView {
        NodeView {
            generation,
            base: generation - 1,
            guard: Arc::new(Guard {
                destinations: guarded.iter().map(|d| d.parse().unwrap()).collect(),
                decided_pods: vec![],
            }),
            cluster_cidrs: Arc::new(cluster.iter().map(|d| d.parse().unwrap()).collect()),
            ..NodeView::default()
        }
    }

    fn delta(part: Option<Part>) -> v2::NodeDelta {
        match part {
            Some(Part::Delta(d)) => d,
            other => panic!("a delta, not {other:?}"),
        }
    }

    /// To a shim that keeps them, a delta leaves out the guard and the in-cluster set while
    /// they are as last sent, and sends each whole once it changed; to an earlier shim, always
    /// whole (it would take an absent guard for none).
    #[test]
    fn a_delta_leaves_out_an_unchanged_guard_and_in_cluster_set_for_shims_that_keep_them() {
        let default = Duration::from_secs(1);
        let sent = view(1, &["203.0.113.0/24"], &["10.244.0.0/16"]);
        let same = view(2, &["203.0.113.0/24"], &["10.244.0.0/16"]);
        let d = delta(message_for(Some(&sent), &same, default, true));
        assert!(d.guard_unchanged && d.cluster_cidrs_unchanged);
        assert!(d.guard.is_none() && d.cluster_cidrs.is_empty());

        // One more guarded destination: that one, not the guard whole.
        let more = view(2, &["203.0.113.0/24", "198.51.100.0/24"], &["10.244.0.0/16"]);
        let d = delta(message_for(Some(&sent), &more, default, true));
        assert!(!d.guard_unchanged && d.cluster_cidrs_unchanged && d.guard.is_none());
        let change = d.guard_change.unwrap();
        assert_eq!(
            change.added_destinations,
            [convert::prefix_to_wire("198.51.100.0/24".parse().unwrap())]
        );
        assert!(change.removed_destinations.is_empty());

        // A guard all new: whole, a change would be no smaller.
        let other = view(2, &["198.51.100.0/24"], &["10.244.0.0/16"]);
        let d = delta(message_for(Some(&sent), &other, default, true));
        assert!(d.guard_change.is_none());
        assert_eq!(d.guard.unwrap().destinations.len(), 1);

        let d = delta(message_for(Some(&sent), &more, default, false));
        assert!(!d.guard_unchanged && !d.cluster_cidrs_unchanged && d.guard_change.is_none());
        assert_eq!(d.guard.unwrap().destinations.len(), 2);
        assert_eq!(d.cluster_cidrs.len(), 1);
    }
}
