//! The previous node channel, `sluice.v1`, kept for upgrades only.
//!
//! During an upgrade from a release that spoke `sluice.v1`, the new operator starts while most
//! shims are still the old ones, and the DaemonSet replaces them a few nodes at a time. Those
//! shims cannot take a `sluice.v2` plan; their pinned datapaths keep forwarding as they were. If
//! the operator took them for dead, every policy whose gateway is such a node would move to an
//! upgraded node as soon as there is one, breaking the connections through it — on every upgrade.
//! So the operator answers them here: it authenticates them as on the current channel, reads
//! their `Hello` (node, interfaces, the slots their datapath holds) and heartbeats, and sends
//! heartbeats back. It never sends a plan, and such a shim never acknowledges one, so the status
//! of its node's policies says it is behind until it is replaced.

use std::{
    net::IpAddr,
    pin::Pin,
    time::{Duration, Instant},
};

use sluice_proto::{
    convert,
    v1::{
        self,
        node_channel_server::{NodeChannel, NodeChannelServer},
        operator_message, shim_message,
    },
    v2,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::{NodeService, bearer, check_hello, held_duties};
use crate::engine::ShimEvent;

/// `sluice.v1.NodeChannel`, for liveness only (see the module documentation).
pub(super) struct LegacyNodeService(pub(super) NodeService);

impl LegacyNodeService {
    pub(super) fn into_server(self) -> NodeChannelServer<Self> {
        NodeChannelServer::new(self)
            .max_decoding_message_size(sluice_proto::MAX_SHIM_MESSAGE)
            .max_encoding_message_size(sluice_proto::MAX_SHIM_MESSAGE)
    }
}

/// A v1 hello in today's terms, so that it is checked the same way. An address that does not
/// parse is refused like a v2 address of the wrong size.
fn current_hello(hello: &v1::Hello) -> Result<v2::Hello, Status> {
    let ip = |field: &str, text: &str| -> Result<Vec<u8>, Status> {
        text.parse::<IpAddr>()
            .map(convert::ip_to_wire)
            .map_err(|_| Status::invalid_argument(format!("hello: {field} {text:?} is not an IP address")))
    };
    let interfaces = hello
        .interfaces
        .iter()
        .map(|i| {
            Ok(v2::Interface {
                name: i.name.clone(),
                addresses: i
                    .addresses
                    .iter()
                    .map(|a| ip("an interface address", a))
                    .collect::<Result<_, Status>>()?,
                // v1 hellos carry no subnets: such a node is placed by name or default route.
                networks: Vec::new(),
            })
        })
        .collect::<Result<_, Status>>()?;
    let held = hello
        .held
        .iter()
        .filter_map(|h| {
            Some(v2::HeldSlot {
                policy: h.policy.clone(),
                slot: Some(v2::GatewaySlot {
                    entry: h.entry,
                    slot: h.slot,
                }),
                gateway: ip("a held slot's gateway", &h.gateway).ok()?,
            })
        })
        .collect();
    Ok(v2::Hello {
        node: hello.node.clone(),
        version: hello.version.clone(),
        interfaces,
        default_route_interface: hello.default_route_interface.clone(),
        held,
        // A shim of the previous release judges the operator's silence by its own interval.
        operator_heartbeat_floor: false,
        // A shim of the previous release does not report its pods' gateways.
        held_pods: Vec::new(),
        pinned_flows: Vec::new(),
        // Nor keeps what a delta leaves out.
        keeps_unchanged_lists: false,
    })
}

type OutStream = Pin<Box<dyn Stream<Item = Result<v1::OperatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl NodeChannel for LegacyNodeService {
    type SyncStream = OutStream;

    async fn sync(
        &self,
        request: Request<Streaming<v1::ShimMessage>>,
    ) -> Result<Response<OutStream>, Status> {
        let service = &self.0;
        let peer = request.remote_addr();
        let token = bearer(&request)?;
        let identity = service.verifier.verify(token.as_deref()).await.inspect_err(|e| {
            tracing::warn!(?peer, error = %e, "shim refused (sluice.v1)");
        })?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(service.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello"))??;
        let Some(v1::ShimMessage {
            message: Some(shim_message::Message::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be a hello"));
        };
        let hello = current_hello(&hello)?;
        let interfaces = check_hello(&hello)?;
        if !identity.allows(&hello.node) {
            tracing::warn!(?peer, node = %hello.node, ?identity, "shim asked for another node's plan");
            return Err(Status::permission_denied(format!(
                "these credentials are not bound to node {}",
                hello.node
            )));
        }
        tracing::warn!(
            node = %hello.node,
            version = %hello.version,
            "this node's shim speaks sluice.v1 (an older release): it is kept alive, and its \
             datapath keeps what it holds until the shim is upgraded"
        );
        let session = service
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(keep_alive(
            service.clone(),
            session,
            hello,
            interfaces,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Heartbeats both ways until the stream ends, the shim goes silent or a newer session of the
/// node replaces this one.
async fn keep_alive(
    service: NodeService,
    session: u64,
    hello: v2::Hello,
    interfaces: Vec<crate::model::InterfaceInfo>,
    mut inbound: Streaming<v1::ShimMessage>,
    tx: mpsc::Sender<Result<v1::OperatorMessage, Status>>,
) {
    let hub = service.hub.clone();
    let node = hello.node.clone();
    hub.report(ShimEvent::Connected {
        node: node.clone(),
        session,
        version: hello.version.clone(),
        interfaces,
        held: held_duties(&hello),
        pods: Vec::new(),
        pinned: Vec::new(),
    });
    let mut replaced = service.live.claim(&node, session);
    // A v1 shim heartbeats at the interval of its last plan (250 ms by default), and takes the
    // operator for dead after four silent ones.
    let interval = hub.heartbeat_interval;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let reason = loop {
        tokio::select! {
            biased;
            by = &mut replaced => {
                break match by {
                    Ok(by) => format!("replaced by session {by}"),
                    Err(_) => "server stopped".to_owned(),
                };
            }
            msg = inbound.message() => match msg {
                Ok(Some(v1::ShimMessage { message: Some(shim_message::Message::Heartbeat(_)) })) => {
                    last_heard = Instant::now();
                    hub.heard(session, last_heard);
                }
                // Acks of plans never sent, or anything else: nothing to act on.
                Ok(Some(_)) => last_heard = Instant::now(),
                Ok(None) => break "shim closed the stream".to_owned(),
                Err(e) => break format!("stream error: {}", e.message()),
            },
            _ = ticker.tick() => {
                let silent = last_heard.elapsed();
                if silent > (interval * 4).max(Duration::from_secs(1)) {
                    break "shim silent".to_owned();
                }
                let hb = v1::OperatorMessage {
                    message: Some(operator_message::Message::Heartbeat(v1::Heartbeat { sent_unix_ms: 0 })),
                };
                let _ = tx.try_send(Ok(hb));
            }
        }
    };
    service.live.release(&node, session);
    tracing::info!(%node, session, %reason, "sluice.v1 session ended");
    hub.report(ShimEvent::Disconnected { node, session });
}
