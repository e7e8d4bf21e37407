//! The shim's side of the node channel, independent of the datapath.
//!
//! [`run`] keeps one session to the operator open, reconnecting with backoff. Every plan and
//! delta received is decoded once (a large one off the async workers) and handed to the
//! datapath side as an [`Update`]; the datapath side keeps the one copy of the node's
//! [`NodeState`], folds every update pending into it in place when it can ([`fold`]: states it
//! had no time for are simply skipped) and publishes the generation it holds as [`Applied`], which the session
//! acknowledges. While disconnected, the state stays: the datapath keeps what it holds.
//! Heartbeats go out from a task of their own, so a long decode never makes the shim look dead.
//!
//! A plan or delta may come in chunks ([`crate::chunk`]): the session folds it in only once its
//! last chunk is in, so the datapath never sees part of one. A session that ends mid-way drops
//! the chunks it had.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::{
    EgressEntry, EntryKey, GatewayDuty, Guard,
    chunk::{Assembled, Assembler, Interleaved, Part},
    convert::{self, BadField},
    v2::{self, node_channel_client::NodeChannelClient, shim_message},
};

/// How to reach and authenticate to the operator.
#[derive(Clone, Debug)]
pub struct Config {
    /// `https://host:port` (TLS) or `http://host:port` (plaintext, for local demos only).
    pub endpoint: String,
    /// PEM CA bundle that signed the operator's certificate, re-read at every connection (a
    /// mounted Secret changes in place when the CA rotates). One of `ca_file` and `ca_pem` is
    /// required for `https`.
    pub ca_file: Option<PathBuf>,
    /// A fixed CA bundle (tests); `ca_file` wins when both are set.
    pub ca_pem: Option<Vec<u8>>,
    /// The name to expect in the operator's certificate, when not the endpoint's host.
    pub server_name: Option<String>,
    /// The projected ServiceAccount token, re-read at every connection (the kubelet rotates it).
    pub token_file: Option<PathBuf>,
    /// A fixed token (tests); `token_file` wins when both are set.
    pub token: Option<String>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// When the operator was last heard from, by any session.
    pub contact: Contact,
}

/// When the operator was last heard from (a plan, a delta or a heartbeat): what the datapath
/// side judges a long partition by. Counts from its creation until the first message.
#[derive(Clone, Debug)]
pub struct Contact(Arc<std::sync::Mutex<Instant>>);

impl Default for Contact {
    fn default() -> Self {
        Contact(Arc::new(std::sync::Mutex::new(Instant::now())))
    }
}

impl Contact {
    fn heard(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// How long the operator has been silent.
    pub fn silent_for(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

impl Config {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Config {
            endpoint: endpoint.into(),
            ca_file: None,
            ca_pem: None,
            server_name: None,
            token_file: None,
            token: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            contact: Contact::default(),
        }
    }

    fn token(&self) -> Result<Option<String>, SessionError> {
        if let Some(path) = &self.token_file {
            let t = std::fs::read_to_string(path)
                .map_err(|e| SessionError::Config(format!("reading token {}: {e}", path.display())))?;
            return Ok(Some(t.trim().to_owned()));
        }
        Ok(self.token.clone())
    }
}

/// What the operator wants this node's datapath to hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The session this state came from ([`next_session`]): a generation means something only
    /// within the session that sent it, since another operator process may send the same number
    /// with other entries.
    pub session: u64,
    pub generation: u64,
    pub entries: BTreeMap<EntryKey, EgressEntry>,
    pub serves: Vec<GatewayDuty>,
    /// The in-cluster destinations the operator found, which no entry steers to.
    pub cluster_cidrs: Vec<IpNet>,
    /// The no-leak guard for new pods.
    pub guard: Option<Guard>,
    /// Gateways this node's flows may stay pinned to (see `NodePlan.pinnable_gateways`).
    pub pinnable: Vec<std::net::IpAddr>,
}

impl NodeState {
    /// The state a full plan describes; a field that does not decode is refused, named.
    pub fn from_plan(session: u64, plan: &v2::NodePlan) -> Result<Self, BadField> {
        let policies = convert::policies_from_wire(&plan.policies);
        // Collected at once, the map is built in bulk with full nodes: inserted one by one
        // (in key order, as plans come), its nodes stay half empty, ~40 % more memory at a
        // million entries.
        let entries = plan
            .entries
            .iter()
            .map(|e| convert::entry_from_wire(e, &policies).map(|entry| (entry.key, entry)))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        Ok(NodeState {
            session,
            generation: plan.generation,
            entries,
            serves: plan
                .serves
                .iter()
                .map(GatewayDuty::try_from)
                .collect::<Result<_, _>>()?,
            cluster_cidrs: convert::prefixes_from_wire("cluster CIDR", &plan.cluster_cidrs)?,
            guard: plan.guard.as_ref().map(Guard::try_from).transpose()?,
            pinnable: convert::ips_from_wire("pinnable gateway", &plan.pinnable_gateways)?,
        })
    }

    /// Applies a delta in place (the session checked its base generation).
    pub fn apply(&mut self, delta: StateDelta) {
        for key in &delta.removals {
            self.entries.remove(key);
        }
        for entry in delta.upserts {
            self.entries.insert(entry.key, entry);
        }
        self.serves = delta.serves;
        if !delta.cluster_cidrs_unchanged {
            self.cluster_cidrs = delta.cluster_cidrs;
        }
        if let Some(change) = delta.guard_change {
            change.apply(self.guard.get_or_insert_default());
        } else if !delta.guard_unchanged {
            self.guard = delta.guard;
        }
        self.pinnable = delta.pinnable;
        self.generation = delta.generation;
    }
}

/// A delta, decoded: what changes from generation `base` to `generation`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDelta {
    pub generation: u64,
    pub base: u64,
    pub upserts: Vec<EgressEntry>,
    pub removals: Vec<EntryKey>,
    pub serves: Vec<GatewayDuty>,
    pub cluster_cidrs: Vec<IpNet>,
    pub guard: Option<Guard>,
    pub pinnable: Vec<std::net::IpAddr>,
    /// The guard, or the in-cluster set, is as it was: `guard` and `cluster_cidrs` say nothing.
    pub guard_unchanged: bool,
    pub cluster_cidrs_unchanged: bool,
    /// How the guard changed, instead of the guard whole.
    pub guard_change: Option<GuardChange>,
}

/// How a node's guard changed (`NodeDelta.guard_change`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardChange {
    pub added_destinations: Vec<IpNet>,
    pub removed_destinations: Vec<IpNet>,
    pub added_decided_pods: Vec<std::net::IpAddr>,
    pub removed_decided_pods: Vec<std::net::IpAddr>,
}

impl GuardChange {
    /// The change from `old` to `new`, or `None` when it is not smaller than `new` whole, or
    /// more than `max` items.
    pub fn between(old: &Guard, new: &Guard, max: usize) -> Option<GuardChange> {
        // Every session diffs its node's guard at each change (hundreds of nodes, tens of
        // thousands of destinations): one merge of the sorted lists (the planner's destinations
        // are sorted already), not two ordered sets each.
        fn diff<T: Ord + Copy>(old: &[T], new: &[T]) -> (Vec<T>, Vec<T>) {
            fn sorted<T: Ord + Copy>(l: &[T]) -> std::borrow::Cow<'_, [T]> {
                if l.windows(2).all(|w| w[0] < w[1]) {
                    l.into()
                } else {
                    let mut v = l.to_vec();
                    v.sort_unstable();
                    v.dedup();
                    v.into()
                }
            }
            let (old, new) = (sorted(old), sorted(new));
            let (mut added, mut removed) = (Vec::new(), Vec::new());
            let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
            loop {
                match (o.peek(), n.peek()) {
                    (Some(a), Some(b)) if a == b => {
                        o.next();
                        n.next();
                    }
                    (Some(a), Some(b)) if a < b => removed.push(*o.next().expect("peeked")),
                    (_, Some(_)) => added.push(*n.next().expect("peeked")),
                    (Some(_), None) => removed.push(*o.next().expect("peeked")),
                    (None, None) => break,
                }
            }
            (added, removed)
        }
        let (added_destinations, removed_destinations) = diff(&old.destinations, &new.destinations);
        let (added_decided_pods, removed_decided_pods) = diff(&old.decided_pods, &new.decided_pods);
        let change = GuardChange {
            added_destinations,
            removed_destinations,
            added_decided_pods,
            removed_decided_pods,
        };
        let items = change.added_destinations.len()
            + change.removed_destinations.len()
            + change.added_decided_pods.len()
            + change.removed_decided_pods.len();
        (items <= max && items < new.destinations.len() + new.decided_pods.len()).then_some(change)
    }

    /// `guard` changed so (its lists sorted, each item once).
    pub fn apply(&self, guard: &mut Guard) {
        fn apply<T: Ord + Copy>(list: &mut Vec<T>, added: &[T], removed: &[T]) {
            let mut set: BTreeSet<T> = list.iter().copied().collect();
            set.extend(added);
            for r in removed {
                set.remove(r);
            }
            *list = set.into_iter().collect();
        }
        apply(
            &mut guard.destinations,
            &self.added_destinations,
            &self.removed_destinations,
        );
        apply(
            &mut guard.decided_pods,
            &self.added_decided_pods,
            &self.removed_decided_pods,
        );
    }
}

impl From<&GuardChange> for v2::GuardChange {
    fn from(c: &GuardChange) -> Self {
        let prefixes = |l: &[IpNet]| l.iter().copied().map(convert::prefix_to_wire).collect();
        let ips = |l: &[std::net::IpAddr]| l.iter().copied().map(convert::ip_to_wire).collect();
        v2::GuardChange {
            added_destinations: prefixes(&c.added_destinations),
            removed_destinations: prefixes(&c.removed_destinations),
            added_decided_pods: ips(&c.added_decided_pods),
            removed_decided_pods: ips(&c.removed_decided_pods),
        }
    }
}

impl TryFrom<&v2::GuardChange> for GuardChange {
    type Error = BadField;
    fn try_from(c: &v2::GuardChange) -> Result<Self, BadField> {
        Ok(GuardChange {
            added_destinations: convert::prefixes_from_wire("guarded destination", &c.added_destinations)?,
            removed_destinations: convert::prefixes_from_wire(
                "guarded destination",
                &c.removed_destinations,
            )?,
            added_decided_pods: convert::ips_from_wire("decided pod", &c.added_decided_pods)?,
            removed_decided_pods: convert::ips_from_wire("decided pod", &c.removed_decided_pods)?,
        })
    }
}

impl TryFrom<&v2::NodeDelta> for StateDelta {
    type Error = BadField;
    fn try_from(delta: &v2::NodeDelta) -> Result<Self, BadField> {
        let policies = convert::policies_from_wire(&delta.policies);
        Ok(StateDelta {
            generation: delta.generation,
            base: delta.base_generation,
            upserts: delta
                .upserts
                .iter()
                .map(|e| convert::entry_from_wire(e, &policies))
                .collect::<Result<_, _>>()?,
            removals: delta
                .removals
                .iter()
                .map(EntryKey::try_from)
                .collect::<Result<_, _>>()?,
            serves: delta
                .serves
                .iter()
                .map(GatewayDuty::try_from)
                .collect::<Result<_, _>>()?,
            cluster_cidrs: convert::prefixes_from_wire("cluster CIDR", &delta.cluster_cidrs)?,
            guard: delta.guard.as_ref().map(Guard::try_from).transpose()?,
            pinnable: convert::ips_from_wire("pinnable gateway", &delta.pinnable_gateways)?,
            guard_unchanged: delta.guard_unchanged,
            cluster_cidrs_unchanged: delta.cluster_cidrs_unchanged,
            guard_change: delta
                .guard_change
                .as_ref()
                .map(GuardChange::try_from)
                .transpose()?,
        })
    }
}

/// What a session hands the datapath side, in the order received: a whole plan replaces the
/// state, a delta changes it. The datapath side keeps the one copy of the state and folds these
/// into it in place ([`fold`]), so a delta costs what it changes, not a copy of the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    Plan(NodeState),
    Delta(StateDelta),
}

/// Folds updates, oldest first, into the datapath side's state.
pub fn fold(state: &mut Option<NodeState>, updates: impl IntoIterator<Item = Update>) {
    for update in updates {
        match update {
            Update::Plan(plan) => *state = Some(plan),
            // A session sends a delta only on top of a plan it sent before, in this order.
            Update::Delta(delta) => {
                if let Some(s) = state.as_mut() {
                    s.apply(delta);
                }
            }
        }
    }
}

/// The sending end, owned by the sessions ([`run`]).
pub type UpdateSender = mpsc::UnboundedSender<Update>;

/// The receiving end, owned by the datapath side.
#[derive(Debug)]
pub struct UpdateReceiver(mpsc::UnboundedReceiver<Update>);

/// A channel of updates from the sessions to the datapath side. Unbounded: the operator sends a
/// delta only when the plan changed, each as large as the change, and the datapath side takes
/// everything pending at once ([`UpdateReceiver::next_batch`]).
pub fn updates() -> (UpdateSender, UpdateReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, UpdateReceiver(rx))
}

impl UpdateReceiver {
    /// Waits for at least one update and returns every update pending; `None` once the sessions
    /// are gone.
    pub async fn next_batch(&mut self) -> Option<Vec<Update>> {
        let first = self.0.recv().await?;
        let mut batch = vec![first];
        batch.extend(self.pending());
        Some(batch)
    }

    /// Every update pending now, without waiting.
    pub fn pending(&mut self) -> Vec<Update> {
        let mut batch = Vec::new();
        while let Ok(more) = self.0.try_recv() {
            batch.push(more);
        }
        batch
    }
}

/// The generation the datapath holds (of which session), and what it could not program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub session: u64,
    pub generation: u64,
    pub errors: Vec<v2::EntryError>,
    /// Managed egress IPs not claimed, with why (`Ack.conflicts`).
    pub conflicts: Vec<v2::AddressConflict>,
    /// The pods' open flows pinned to gateways, and the gateways counted (`Ack.pinned_flows`,
    /// `Ack.counted_gateways`).
    pub pinned_flows: Vec<v2::PinnedFlowCount>,
    pub counted_gateways: Vec<Vec<u8>>,
}

impl Applied {
    /// What an acknowledgement says besides the errors: a change of any of it is acknowledged
    /// again.
    fn said(&self) -> Said {
        (
            self.generation,
            self.conflicts.clone(),
            self.pinned_flows.clone(),
            self.counted_gateways.clone(),
        )
    }
}

type Said = (
    u64,
    Vec<v2::AddressConflict>,
    Vec<v2::PinnedFlowCount>,
    Vec<Vec<u8>>,
);

/// A number for a new session, never used before in this process (sessions start at 1; 0 is
/// "none", what [`Applied`] says before anything was applied).
pub fn next_session() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Builds the `Hello` of each connection (interfaces may have changed in between).
pub type HelloFn = Arc<dyn Fn() -> v2::Hello + Send + Sync>;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Config(String),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("operator said: {0}")]
    Status(#[from] tonic::Status),
    #[error("bad message from the operator: {0}")]
    Bad(#[from] BadField),
    #[error("delta on top of generation {base}, but this shim holds {held}")]
    OutOfOrder { base: u64, held: u64 },
    #[error("bad chunk from the operator: {0}")]
    Chunk(#[from] Interleaved),
    #[error("operator silent for {0:?}")]
    Silent(Duration),
    #[error("operator closed the stream")]
    Closed,
}

/// Keeps a session open forever, reconnecting with exponential backoff (with jitter).
pub async fn run(
    config: Config,
    hello: HelloFn,
    updates: UpdateSender,
    mut applied: watch::Receiver<Applied>,
) {
    let mut backoff = config.backoff_min;
    loop {
        let started = Instant::now();
        let err = session(&config, &hello, &updates, &mut applied).await;
        let level_error = matches!(&err, SessionError::Status(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied));
        if level_error {
            tracing::error!(error = %err, "operator refused this shim");
        } else {
            tracing::warn!(error = %err, "session to the operator ended");
        }
        // A session that lasted is not a failure streak.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = config.backoff_min;
        }
        let wait = jitter(backoff);
        tracing::info!(?wait, "reconnecting");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(config.backoff_max);
    }
}

/// ±20 % around `d`, from the clock's nanoseconds (no need for a real RNG here).
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let factor = 0.8 + f64::from(nanos % 1000) / 2500.0;
    d.mul_f64(factor)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |t| t.as_millis() as u64)
}

/// See [`connect`]: above the slowest heartbeat interval (the operator's 10 s for nodes that
/// cannot be gateways).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Connects to the operator (TLS for `https` endpoints, trusting the CA file's current content).
pub async fn connect(config: &Config) -> Result<NodeChannelClient<tonic::transport::Channel>, SessionError> {
    let mut endpoint = Endpoint::from_shared(config.endpoint.clone())?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        // Pings go only after this long without anything read: longer than the slowest
        // heartbeat, so a live session never carries them (heartbeats prove the operator alive;
        // a ping per shim every few seconds is most of an idle operator's work).
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL);
    if config.endpoint.starts_with("https://") {
        let ca = match (&config.ca_file, &config.ca_pem) {
            (Some(path), _) => tokio::fs::read(path)
                .await
                .map_err(|e| SessionError::Config(format!("reading CA {}: {e}", path.display())))?,
            (None, Some(pem)) => pem.clone(),
            (None, None) => {
                return Err(SessionError::Config(
                    "an https operator URL needs a CA (--ca-file)".into(),
                ));
            }
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(name) = &config.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(NodeChannelClient::new(endpoint.connect().await?)
        .max_decoding_message_size(crate::MAX_OPERATOR_MESSAGE)
        .max_encoding_message_size(crate::MAX_SHIM_MESSAGE))
}

/// One session: hello, then plans and deltas in, acks and heartbeats out, until it breaks.
pub async fn session(
    config: &Config,
    hello: &HelloFn,
    updates: &UpdateSender,
    applied: &mut watch::Receiver<Applied>,
) -> SessionError {
    match session_inner(config, hello, updates, applied).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    config: &Config,
    hello: &HelloFn,
    updates: &UpdateSender,
    applied: &mut watch::Receiver<Applied>,
) -> Result<std::convert::Infallible, SessionError> {
    let mut client = connect(config).await?;
    let (tx, rx) = mpsc::channel(16);
    let hello = hello();
    let node = hello.node.clone();
    let floor = hello.operator_heartbeat_floor;
    tx.send(shim_msg(shim_message::Message::Hello(hello)))
        .await
        .map_err(|_| SessionError::Closed)?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = config.token()? {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| SessionError::Config("the token is not valid metadata".into()))?;
        request.metadata_mut().insert(crate::AUTHORIZATION, value);
    }
    let mut inbound = client.sync(request).await?.into_inner();

    // Heartbeats go out from a task of their own: decoding a plan of a million entries takes
    // this loop away for seconds, and the operator must not take that for a dead shim.
    let (interval_tx, interval_rx) = watch::channel(Duration::from_millis(250));
    let mut heartbeats = AbortOnDrop(tokio::spawn(send_heartbeats(tx.clone(), interval_rx)));

    // Only what the datapath applied from this session's own plans is acknowledged: the
    // generation it held before may be another operator's, and equal to one of ours.
    let session = next_session();
    // The generation this session's updates bring the datapath side to.
    let mut held: Option<u64> = None;
    // Chunks of a plan or delta not complete yet: dropped with the session if it ends mid-way.
    let mut assembler = Assembler::default();
    let mut acked: Option<Said> = None;
    let mut last_heard = Instant::now();
    loop {
        let silence_limit = operator_silence_limit(*interval_tx.borrow(), floor);
        tokio::select! {
            // What the operator sent is read before its silence is judged.
            biased;
            msg = inbound.message() => {
                if !matches!(msg, Ok(Some(_))) && assembler.is_assembling() {
                    tracing::warn!(%node, "the stream ended within a chunked plan or delta: what arrived of it is dropped");
                }
                let Some(msg) = msg? else { return Err(SessionError::Closed) };
                last_heard = Instant::now();
                config.contact.heard();
                let whole = match msg.message.and_then(Part::from_message) {
                    Some(chunk) => assembler.push(chunk)?,
                    None => None,
                };
                match whole {
                    Some(Assembled { part: Part::Plan(plan), chunks }) => {
                        let wanted = plan.heartbeat_interval_ms;
                        let generation = plan.generation;
                        let items = plan.entries.len();
                        let new = decode(items, move || NodeState::from_plan(session, &plan)).await?;
                        last_heard = Instant::now();
                        tracing::info!(%node, generation, entries = new.entries.len(), chunks, "plan received");
                        follow_interval(&interval_tx, wanted);
                        held = Some(generation);
                        send_update(updates, Update::Plan(new))?;
                    }
                    Some(Assembled { part: Part::Delta(delta), chunks }) => {
                        let base = delta.base_generation;
                        if held != Some(base) {
                            return Err(SessionError::OutOfOrder { base, held: held.unwrap_or(0) });
                        }
                        let wanted = delta.heartbeat_interval_ms;
                        let (upserts, removals) = (delta.upserts.len(), delta.removals.len());
                        let decoded = decode(upserts + removals, move || StateDelta::try_from(&delta)).await?;
                        last_heard = Instant::now();
                        tracing::debug!(%node, generation = decoded.generation, upserts, removals, chunks, "delta received");
                        follow_interval(&interval_tx, wanted);
                        held = Some(decoded.generation);
                        send_update(updates, Update::Delta(decoded))?;
                    }
                    None => {}
                }
                let a = applied.borrow().clone();
                maybe_ack(&tx, &a, session, &mut acked).await?;
            }
            changed = applied.changed() => {
                if changed.is_err() {
                    return Err(SessionError::Config("the datapath side is gone".into()));
                }
                let a = applied.borrow_and_update().clone();
                maybe_ack(&tx, &a, session, &mut acked).await?;
            }
            () = tokio::time::sleep_until((last_heard + silence_limit).into()) => {
                return Err(SessionError::Silent(last_heard.elapsed()));
            }
            // It ends only when the stream to the operator is closed.
            _ = &mut heartbeats.0 => return Err(SessionError::Closed),
        }
    }
}

/// Decodes a plan or delta of `items` entries: a large one on the blocking pool, where it does
/// not hold up the runtime's other tasks for long; a small one (most deltas) right here.
async fn decode<T: Send + 'static>(
    items: usize,
    f: impl FnOnce() -> Result<T, BadField> + Send + 'static,
) -> Result<T, SessionError> {
    const MANY: usize = 10_000;
    if items < MANY {
        return f().map_err(SessionError::Bad);
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SessionError::Config(format!("decoding: {e}")))?
        .map_err(SessionError::Bad)
}

fn send_update(updates: &UpdateSender, update: Update) -> Result<(), SessionError> {
    updates
        .send(update)
        .map_err(|_| SessionError::Config("the datapath side is gone".into()))
}

/// Takes the heartbeat interval the operator asks for (0: unchanged).
/// How long the operator may stay silent before the session is given up, for a shim whose
/// heartbeat interval is `interval`: four of the operator's heartbeats (sent at the floor's pace
/// when the shim announced it).
fn operator_silence_limit(interval: Duration, floor: bool) -> Duration {
    if floor {
        crate::operator_heartbeat_interval(interval) * 4
    } else {
        (interval * 4).max(Duration::from_secs(1))
    }
}

fn follow_interval(interval: &watch::Sender<Duration>, wanted_ms: u32) {
    if wanted_ms > 0 {
        interval.send_if_modified(|cur| {
            let wanted = Duration::from_millis(u64::from(wanted_ms));
            (*cur != wanted).then(|| *cur = wanted).is_some()
        });
    }
}

/// Sends a heartbeat every interval (following changes of it) until the stream closes.
async fn send_heartbeats(tx: mpsc::Sender<v2::ShimMessage>, mut interval: watch::Receiver<Duration>) {
    loop {
        let every = *interval.borrow_and_update();
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let hb = shim_message::Message::Heartbeat(v2::Heartbeat { sent_unix_ms: unix_ms() });
                    if tx.send(shim_msg(hb)).await.is_err() {
                        return;
                    }
                }
                changed = interval.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

/// A task aborted when the session that spawned it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Acknowledges what the datapath holds, if it applied it from this session and it was not
/// acknowledged yet.
async fn maybe_ack(
    tx: &mpsc::Sender<v2::ShimMessage>,
    applied: &Applied,
    session: u64,
    acked: &mut Option<Said>,
) -> Result<(), SessionError> {
    let said = applied.said();
    if applied.session != session || acked.as_ref() == Some(&said) {
        return Ok(());
    }
    *acked = Some(said);
    if applied.errors.len() > crate::MAX_ACK_ERRORS {
        tracing::debug!(
            errors = applied.errors.len(),
            sent = crate::MAX_ACK_ERRORS,
            "more entry errors than an ack carries"
        );
    }
    let ack = shim_message::Message::Ack(v2::Ack {
        generation: applied.generation,
        // The operator reads no more, and an ack must stay within its decode limit.
        errors: applied
            .errors
            .iter()
            .take(crate::MAX_ACK_ERRORS)
            .cloned()
            .collect(),
        conflicts: applied.conflicts.clone(),
        pinned_flows: applied.pinned_flows.clone(),
        counted_gateways: applied.counted_gateways.clone(),
    });
    tx.send(shim_msg(ack)).await.map_err(|_| SessionError::Closed)
}

fn shim_msg(m: shim_message::Message) -> v2::ShimMessage {
    v2::ShimMessage { message: Some(m) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(destination: &str) -> Option<Guard> {
        Some(Guard {
            destinations: vec![destination.parse().unwrap()],
            decided_pods: vec![],
        })
    }

    /// A delta that says the guard or the in-cluster set is unchanged leaves the state's own;
    /// one that does not replaces them (with nothing, if it carries nothing).
    #[test]
    fn a_delta_keeps_the_guard_and_in_cluster_set_it_says_are_unchanged() {
        let mut state = Some(NodeState {
            generation: 1,
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            guard: guard("203.0.113.0/24"),
            ..NodeState::default()
        });
        let kept = StateDelta {
            generation: 2,
            base: 1,
            guard_unchanged: true,
            cluster_cidrs_unchanged: true,
            ..StateDelta::default()
        };
        fold(&mut state, [Update::Delta(kept)]);
        let s = state.as_ref().unwrap();
        assert_eq!(
            (s.generation, s.guard.clone(), s.cluster_cidrs.len()),
            (2, guard("203.0.113.0/24"), 1)
        );
        let replaced = StateDelta {
            generation: 3,
            base: 2,
            guard: guard("198.51.100.0/24"),
            ..StateDelta::default()
        };
        fold(&mut state, [Update::Delta(replaced)]);
        let s = state.as_ref().unwrap();
        assert_eq!(
            (s.guard.clone(), s.cluster_cidrs.len()),
            (guard("198.51.100.0/24"), 0)
        );
    }

    /// A guard change is what two guards differ by, and applied gives the second (sorted, each
    /// item once); a change as large as the guard itself is not worth it.
    #[test]
    fn a_guard_change_takes_one_guard_to_the_other() {
        let g = |destinations: &[&str], pods: &[&str]| Guard {
            destinations: destinations.iter().map(|d| d.parse().unwrap()).collect(),
            decided_pods: pods.iter().map(|p| p.parse().unwrap()).collect(),
        };
        let old = g(
            &["203.0.113.0/24", "198.51.100.0/24"],
            &["10.244.1.10", "10.244.1.11"],
        );
        let new = g(
            &["198.51.100.0/24", "192.0.2.0/24", "203.0.113.0/24"],
            &["10.244.1.10", "10.244.1.12"],
        );
        let change = GuardChange::between(&old, &new, 100).unwrap();
        assert_eq!(
            change.added_destinations,
            ["192.0.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            change.added_decided_pods.len() + change.removed_decided_pods.len(),
            2
        );
        let mut applied = old.clone();
        change.apply(&mut applied);
        let mut sorted = new.clone();
        sorted.destinations.sort();
        sorted.decided_pods.sort();
        assert_eq!(applied, sorted);
        // Applied through a delta, on a state that had the old guard.
        let mut state = Some(NodeState {
            guard: Some(old.clone()),
            ..NodeState::default()
        });
        let via_wire = GuardChange::try_from(&v2::GuardChange::from(&change)).unwrap();
        let d = StateDelta {
            guard_change: Some(via_wire),
            ..StateDelta::default()
        };
        fold(&mut state, [Update::Delta(d)]);
        assert_eq!(state.unwrap().guard, Some(sorted));
        assert!(GuardChange::between(&old, &new, 2).is_none(), "more than max");
        // A list with an item twice: the same set, no change.
        let twice = g(
            &["203.0.113.0/24", "203.0.113.0/24", "198.51.100.0/24"],
            &["10.244.1.10", "10.244.1.11"],
        );
        assert_eq!(
            GuardChange::between(&twice, &old, 100),
            Some(GuardChange::default())
        );
        assert!(
            GuardChange::between(&old, &g(&["192.0.2.0/24"], &[]), 100).is_none(),
            "no smaller"
        );
    }
}
