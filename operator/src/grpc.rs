//! The operator's side of the node channel (`sluice.v1.NodeChannel`): one session per shim.
//!
//! A session authenticates the shim ([`TokenVerifier`]), takes its `Hello` (refused unless the
//! credentials are bound to that node), reports it to the engine, then sends the node's views:
//! the whole plan first, then deltas from what it last sent. It only ever waits on its own shim;
//! while it waits, newer views replace older ones in the node's `watch` channel, so what it sends
//! next covers all of them at once.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_proto::v1::{
    self, ShimMessage,
    node_channel_server::{NodeChannel, NodeChannelServer},
    operator_message, shim_message,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, transport::Server};

use crate::{
    auth::TokenVerifier,
    engine::{Hub, NodeView, ShimEvent},
    model::InterfaceInfo,
    planner::{EgressEntry, EntryKey, GatewayDuty},
};

/// The `NodeChannel` service.
pub struct NodeService {
    hub: Arc<Hub>,
    verifier: Arc<dyn TokenVerifier>,
    sessions: AtomicU64,
    hello_timeout: Duration,
}

impl NodeService {
    pub fn new(hub: Arc<Hub>, verifier: Arc<dyn TokenVerifier>) -> Self {
        NodeService {
            hub,
            verifier,
            sessions: AtomicU64::new(0),
            hello_timeout: Duration::from_secs(10),
        }
    }

    pub fn into_server(self) -> NodeChannelServer<Self> {
        NodeChannelServer::new(self)
    }
}

/// TLS material of the server (PEM).
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// Serves the node channel on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: NodeService,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)));
    if let Some(tls) = tls {
        builder = builder.tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(tls.cert, tls.key)),
        )?;
    }
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    builder
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Binds `addr` (for callers that want the bound address before serving).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

type OutStream = Pin<Box<dyn Stream<Item = Result<v1::OperatorMessage, Status>> + Send>>;

fn bearer(request: &Request<Streaming<ShimMessage>>) -> Result<Option<String>, Status> {
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
            tracing::warn!(?peer, error = %e.message(), "shim refused");
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
        if hello.node.is_empty() {
            return Err(Status::invalid_argument("hello without a node name"));
        }
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
        tokio::spawn(run_session(hub, session, hello, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn interfaces(hello: &v1::Hello) -> Vec<InterfaceInfo> {
    hello
        .interfaces
        .iter()
        .map(|i| InterfaceInfo {
            name: i.name.clone(),
            addresses: i.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            default_route: hello.default_route_interface.as_deref() == Some(i.name.as_str()),
        })
        .collect()
}

async fn run_session(
    hub: Arc<Hub>,
    session: u64,
    hello: v1::Hello,
    mut inbound: Streaming<ShimMessage>,
    tx: mpsc::Sender<Result<v1::OperatorMessage, Status>>,
) {
    let node = hello.node.clone();
    let mut views = hub.subscribe(&node);
    views.mark_changed();
    hub.report(ShimEvent::Connected {
        node: node.clone(),
        session,
        version: hello.version.clone(),
        interfaces: interfaces(&hello),
    });
    let interval = hub.heartbeat_interval;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut sent: Option<Arc<NodeView>> = None;
    let reason = loop {
        tokio::select! {
            changed = views.changed() => {
                if changed.is_err() {
                    break "engine stopped".to_owned();
                }
                let Some(view) = views.borrow_and_update().clone() else { continue };
                let Some(msg) = message_for(sent.as_deref(), &view, interval) else { continue };
                if tx.send(Ok(msg)).await.is_err() {
                    break "stream closed".to_owned();
                }
                sent = Some(view);
            }
            msg = inbound.message() => {
                last_heard = Instant::now();
                match msg {
                    Ok(Some(ShimMessage { message: Some(shim_message::Message::Ack(ack)) })) => {
                        hub.report(ShimEvent::Ack { node: node.clone(), session, generation: ack.generation, errors: ack.errors.len() });
                    }
                    Ok(Some(ShimMessage { message: Some(shim_message::Message::Heartbeat(_)) })) => {
                        hub.report(ShimEvent::Heartbeat { node: node.clone(), session });
                    }
                    Ok(Some(_)) => {
                        let _ = tx.send(Err(Status::invalid_argument("unexpected message"))).await;
                        break "unexpected message".to_owned();
                    }
                    Ok(None) => break "shim closed the stream".to_owned(),
                    Err(e) => break format!("stream error: {}", e.message()),
                }
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > (interval * 4).max(Duration::from_secs(1)) {
                    break "shim silent".to_owned();
                }
                let hb = v1::OperatorMessage { message: Some(operator_message::Message::Heartbeat(v1::Heartbeat { sent_unix_ms: 0 })) };
                // A shim that does not read is not sent more: its next view is coalesced anyway.
                let _ = tx.try_send(Ok(hb));
            }
        }
    };
    tracing::info!(%node, session, %reason, "session ended");
    hub.report(ShimEvent::Disconnected { node, session });
}

/// What to send a shim that was last sent `sent` so that it holds `view`.
pub fn message_for(
    sent: Option<&NodeView>,
    view: &NodeView,
    heartbeat: Duration,
) -> Option<v1::OperatorMessage> {
    let message = match sent {
        None => operator_message::Message::Plan(v1::NodePlan {
            generation: view.generation,
            entries: view.entries.values().map(entry).collect(),
            serves: view.duties.iter().map(duty).collect(),
            heartbeat_interval_ms: u32::try_from(heartbeat.as_millis()).unwrap_or(u32::MAX),
        }),
        Some(s) if s.generation == view.generation => return None,
        Some(s) if s.generation == view.base => operator_message::Message::Delta(v1::NodeDelta {
            generation: view.generation,
            base_generation: view.base,
            upserts: view.delta.upserts.values().map(entry).collect(),
            removals: view.delta.removals.iter().map(key).collect(),
            serves: view.duties.iter().map(duty).collect(),
        }),
        Some(s) => {
            let (upserts, removals) = diff(&s.entries, &view.entries);
            operator_message::Message::Delta(v1::NodeDelta {
                generation: view.generation,
                base_generation: s.generation,
                upserts,
                removals,
                serves: view.duties.iter().map(duty).collect(),
            })
        }
    };
    Some(v1::OperatorMessage {
        message: Some(message),
    })
}

fn diff(
    old: &BTreeMap<EntryKey, EgressEntry>,
    new: &BTreeMap<EntryKey, EgressEntry>,
) -> (Vec<v1::Entry>, Vec<v1::EntryKey>) {
    let upserts = new
        .iter()
        .filter(|(k, e)| old.get(*k) != Some(*e))
        .map(|(_, e)| entry(e))
        .collect();
    let removals = old.keys().filter(|k| !new.contains_key(*k)).map(key).collect();
    (upserts, removals)
}

fn key(k: &EntryKey) -> v1::EntryKey {
    v1::EntryKey {
        source: k.source.to_string(),
        destination: k.destination.to_string(),
    }
}

fn entry(e: &EgressEntry) -> v1::Entry {
    v1::Entry {
        source: e.key.source.to_string(),
        destination: e.key.destination.to_string(),
        gateway: e.gateway.to_string(),
        egress_ip: e.egress_ip.map(|ip| ip.to_string()),
        interface: e.interface.as_deref().map(str::to_owned),
        policy: e.policy.to_string(),
    }
}

fn duty(d: &GatewayDuty) -> v1::GatewayDuty {
    v1::GatewayDuty {
        policy: d.policy.to_string(),
        egress_ips: d.egress_ips.iter().map(ToString::to_string).collect(),
        interface: d.interface.as_deref().map(str::to_owned),
    }
}
