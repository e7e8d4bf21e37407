//! The shim's side of the node channel, independent of the datapath.
//!
//! [`run`] keeps one session to the operator open, reconnecting with backoff. Every plan and
//! delta received is folded into the node's [`NodeState`] and published on a `watch` channel:
//! the datapath side applies the latest state whenever it can (states it had no time for are
//! simply skipped) and publishes the generation it holds as [`Applied`], which the session
//! acknowledges. While disconnected, the last published state stays: the datapath keeps what it
//! holds.
//!
//! A plan or delta may come in chunks ([`crate::chunk`]): the session folds it in only once its
//! last chunk is in, so the datapath never sees part of one. A session that ends mid-way drops
//! the chunks it had.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::{
    EntryDoc, GatewayDuty,
    chunk::{Assembled, Assembler, Interleaved, Part},
    convert::{BadField, EntryKey},
    v1::{self, node_channel_client::NodeChannelClient, shim_message},
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
    pub entries: BTreeMap<EntryKey, EntryDoc>,
    pub serves: Vec<GatewayDuty>,
    /// The in-cluster destinations the operator found, which no entry steers to.
    pub cluster_cidrs: Vec<IpNet>,
    /// The no-leak guard for new pods.
    pub guard: Option<crate::Guard>,
}

impl NodeState {
    /// The entries, sorted by (source, destination).
    pub fn entry_list(&self) -> Vec<EntryDoc> {
        self.entries.values().cloned().collect()
    }

    /// The state a full plan describes; a field that does not parse is refused, named.
    pub fn from_plan(session: u64, plan: &v1::NodePlan) -> Result<Self, BadField> {
        let mut entries = BTreeMap::new();
        for e in &plan.entries {
            let doc = EntryDoc::try_from(e)?;
            entries.insert((doc.source, doc.destination), doc);
        }
        Ok(NodeState {
            session,
            generation: plan.generation,
            entries,
            serves: plan
                .serves
                .iter()
                .map(GatewayDuty::try_from)
                .collect::<Result<_, _>>()?,
            cluster_cidrs: cluster_cidrs(&plan.cluster_cidrs)?,
            guard: plan.guard.as_ref().map(crate::Guard::try_from).transpose()?,
        })
    }

    /// Applies a delta (the caller checks its base generation). On error the state may be half
    /// updated: the session ends and the next one starts from a full plan.
    pub fn apply(&mut self, delta: &v1::NodeDelta) -> Result<(), BadField> {
        for k in &delta.removals {
            self.entries.remove(&EntryKey::try_from(k)?);
        }
        for e in &delta.upserts {
            let doc = EntryDoc::try_from(e)?;
            self.entries.insert((doc.source, doc.destination), doc);
        }
        self.serves = delta
            .serves
            .iter()
            .map(GatewayDuty::try_from)
            .collect::<Result<_, _>>()?;
        self.cluster_cidrs = cluster_cidrs(&delta.cluster_cidrs)?;
        self.guard = delta.guard.as_ref().map(crate::Guard::try_from).transpose()?;
        self.generation = delta.generation;
        Ok(())
    }
}

fn cluster_cidrs(wire: &[String]) -> Result<Vec<IpNet>, BadField> {
    wire.iter()
        .map(|c| {
            c.parse().map_err(|_| BadField {
                field: "cluster CIDR",
                value: c.clone(),
            })
        })
        .collect()
}

/// The generation the datapath holds (of which session), and what it could not program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub session: u64,
    pub generation: u64,
    pub errors: Vec<v1::EntryError>,
}

/// A number for a new session, never used before in this process (sessions start at 1; 0 is
/// "none", what [`Applied`] says before anything was applied).
pub fn next_session() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Builds the `Hello` of each connection (interfaces may have changed in between).
pub type HelloFn = Arc<dyn Fn() -> v1::Hello + Send + Sync>;

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
    plans: watch::Sender<Option<Arc<NodeState>>>,
    mut applied: watch::Receiver<Applied>,
) {
    let mut backoff = config.backoff_min;
    loop {
        let started = Instant::now();
        let err = session(&config, &hello, &plans, &mut applied).await;
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

/// Connects to the operator (TLS for `https` endpoints, trusting the CA file's current content).
pub async fn connect(config: &Config) -> Result<NodeChannelClient<tonic::transport::Channel>, SessionError> {
    let mut endpoint = Endpoint::from_shared(config.endpoint.clone())?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10));
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
    plans: &watch::Sender<Option<Arc<NodeState>>>,
    applied: &mut watch::Receiver<Applied>,
) -> SessionError {
    match session_inner(config, hello, plans, applied).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    config: &Config,
    hello: &HelloFn,
    plans: &watch::Sender<Option<Arc<NodeState>>>,
    applied: &mut watch::Receiver<Applied>,
) -> Result<std::convert::Infallible, SessionError> {
    let mut client = connect(config).await?;
    let (tx, rx) = mpsc::channel(16);
    let hello = hello();
    let node = hello.node.clone();
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

    // Only what the datapath applied from this session's own plans is acknowledged: the
    // generation it held before may be another operator's, and equal to one of ours.
    let session = next_session();
    let mut state: Option<NodeState> = None;
    // Chunks of a plan or delta not complete yet: dropped with the session if it ends mid-way.
    let mut assembler = Assembler::default();
    let mut acked: Option<u64> = None;
    let mut interval = Duration::from_millis(250);
    let mut ticker = tokio::time::interval(interval);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                if !matches!(msg, Ok(Some(_))) && assembler.is_assembling() {
                    tracing::warn!(%node, "the stream ended within a chunked plan or delta: what arrived of it is dropped");
                }
                let Some(msg) = msg? else { return Err(SessionError::Closed) };
                last_heard = Instant::now();
                let whole = match msg.message.and_then(Part::from_message) {
                    Some(chunk) => assembler.push(chunk)?,
                    None => None,
                };
                match whole {
                    Some(Assembled { part: Part::Plan(plan), chunks }) => {
                        let new = NodeState::from_plan(session, &plan)?;
                        tracing::info!(%node, generation = plan.generation, entries = new.entries.len(), chunks, "plan received");
                        if plan.heartbeat_interval_ms > 0 {
                            let wanted = Duration::from_millis(u64::from(plan.heartbeat_interval_ms));
                            if wanted != interval {
                                interval = wanted;
                                ticker = tokio::time::interval(interval);
                            }
                        }
                        publish(plans, &new);
                        state = Some(new);
                    }
                    Some(Assembled { part: Part::Delta(delta), chunks }) => {
                        let Some(s) = state.as_mut() else {
                            return Err(SessionError::OutOfOrder { base: delta.base_generation, held: 0 });
                        };
                        if s.generation != delta.base_generation {
                            return Err(SessionError::OutOfOrder { base: delta.base_generation, held: s.generation });
                        }
                        s.apply(&delta)?;
                        tracing::debug!(%node, generation = delta.generation, upserts = delta.upserts.len(), removals = delta.removals.len(), chunks, "delta received");
                        publish(plans, s);
                    }
                    None => {}
                }
                let a = applied.borrow().clone();
                maybe_ack(&tx, &a, session, &mut acked).await?;
            }
            _ = ticker.tick() => {
                let silent = last_heard.elapsed();
                let limit = (interval * 4).max(Duration::from_secs(1));
                if silent > limit {
                    return Err(SessionError::Silent(silent));
                }
                let hb = shim_message::Message::Heartbeat(v1::Heartbeat { sent_unix_ms: unix_ms() });
                tx.send(shim_msg(hb)).await.map_err(|_| SessionError::Closed)?;
            }
            changed = applied.changed() => {
                if changed.is_err() {
                    return Err(SessionError::Config("the datapath side is gone".into()));
                }
                let a = applied.borrow_and_update().clone();
                maybe_ack(&tx, &a, session, &mut acked).await?;
            }
        }
    }
}

/// Publishes a state unless the datapath side already has exactly it.
fn publish(plans: &watch::Sender<Option<Arc<NodeState>>>, new: &NodeState) {
    plans.send_if_modified(|cur| {
        if cur.as_deref() == Some(new) {
            false
        } else {
            *cur = Some(Arc::new(new.clone()));
            true
        }
    });
}

/// Acknowledges what the datapath holds, if it applied it from this session and it was not
/// acknowledged yet.
async fn maybe_ack(
    tx: &mpsc::Sender<v1::ShimMessage>,
    applied: &Applied,
    session: u64,
    acked: &mut Option<u64>,
) -> Result<(), SessionError> {
    if applied.session != session || *acked == Some(applied.generation) {
        return Ok(());
    }
    *acked = Some(applied.generation);
    if applied.errors.len() > crate::MAX_ACK_ERRORS {
        tracing::debug!(
            errors = applied.errors.len(),
            sent = crate::MAX_ACK_ERRORS,
            "more entry errors than an ack carries"
        );
    }
    let ack = shim_message::Message::Ack(v1::Ack {
        generation: applied.generation,
        // The operator reads no more, and an ack must stay within its decode limit.
        errors: applied
            .errors
            .iter()
            .take(crate::MAX_ACK_ERRORS)
            .cloned()
            .collect(),
    });
    tx.send(shim_msg(ack)).await.map_err(|_| SessionError::Closed)
}

fn shim_msg(m: shim_message::Message) -> v1::ShimMessage {
    v1::ShimMessage { message: Some(m) }
}
