//! Plan generations across operator processes, against the real shim (needs root): a stand-in
//! operator serves the node channel in the underlay namespace and sends a plan with a generation
//! of its choosing, then a second one replaces it with the same number and other entries. The
//! shim must apply the second plan and acknowledge only what its maps hold.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use sluice_proto::v2::{
    self, NodePlan, OperatorMessage, ShimMessage,
    node_channel_server::{NodeChannel, NodeChannelServer},
    operator_message, shim_message,
};
use sluice_shim::datapath::Maps;
use sluice_testbed::{Testbed, enter_netns, wait_for};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const GRPC: &str = "192.0.2.1:9443";

/// (source, destination) pairs the node's policy map holds.
fn held(bpffs: &Path) -> BTreeSet<(Ipv4Addr, String)> {
    // Not there yet (the shim is starting) reads as empty.
    let Ok(maps) = Maps::open_pinned(bpffs) else {
        return BTreeSet::new();
    };
    let Ok(entries) = maps.policy_entries() else {
        return BTreeSet::new();
    };
    entries
        .into_iter()
        .map(|(k, _)| (k.source(), k.destination().to_string()))
        .collect()
}

/// An acknowledgement as the stand-in operator saw it: its generation, and whether the node's
/// maps held this operator's entries when it arrived.
type Ack = (u64, bool);

#[derive(Clone)]
struct StandIn {
    plan: NodePlan,
    /// What the maps must hold for the plan to count as applied.
    wants: BTreeSet<(Ipv4Addr, String)>,
    bpffs: PathBuf,
    acks: Arc<Mutex<Vec<Ack>>>,
}

#[tonic::async_trait]
impl NodeChannel for StandIn {
    type SyncStream = ReceiverStream<Result<OperatorMessage, Status>>;

    async fn sync(
        &self,
        request: Request<Streaming<ShimMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            let mut heartbeat = tokio::time::interval(Duration::from_millis(100));
            let msg = |m| Ok(OperatorMessage { message: Some(m) });
            loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(ShimMessage { message: Some(shim_message::Message::Hello(_)) })) => {
                            let plan = operator_message::Message::Plan(me.plan.clone());
                            if tx.send(msg(plan)).await.is_err() { return; }
                        }
                        Ok(Some(ShimMessage { message: Some(shim_message::Message::Ack(a)) })) => {
                            let applied = held(&me.bpffs) == me.wants;
                            me.acks.lock().unwrap().push((a.generation, applied));
                        }
                        Ok(Some(_)) => {}
                        _ => return,
                    },
                    _ = heartbeat.tick() => {
                        let hb = operator_message::Message::Heartbeat(v2::Heartbeat { sent_unix_ms: 0 });
                        if tx.send(msg(hb)).await.is_err() { return; }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves `stand_in` on [`GRPC`] in namespace `ns` until dropped (then every session breaks,
/// as when an operator process dies).
struct Serving {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Serving {
    fn start(ns: String, stand_in: StandIn) -> Serving {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                let listener = bind_retrying(GRPC).await;
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let server = tonic::transport::Server::builder()
                    .add_service(NodeChannelServer::new(stand_in))
                    .serve_with_incoming(incoming);
                tokio::select! {
                    r = server => r.expect("serves"),
                    _ = stopped => {}
                }
            });
            rt.shutdown_timeout(Duration::ZERO);
        });
        Serving {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// The previous stand-in's socket may linger for a moment.
async fn bind_retrying(addr: &str) -> tokio::net::TcpListener {
    for _ in 0..50 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot bind {addr}");
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

/// A one-entry plan of generation 5 for p2.
fn plan(destination: &str, gateway: &str, policy: &str) -> NodePlan {
    let entry = sluice_proto::EgressEntry {
        key: sluice_proto::EntryKey {
            source: "10.244.2.10".parse().unwrap(),
            destination: destination.parse().unwrap(),
        },
        gateway: gateway.parse().unwrap(),
        egress_ip: None,
        interface: None,
        source_node_ip: None,
        gateway_slot: None,
        policy: policy.into(),
    };
    let mut policies = sluice_proto::convert::PolicyNames::default();
    let entries = vec![sluice_proto::convert::entry_to_wire(&entry, &mut policies)];
    NodePlan {
        generation: 5,
        policies: policies.into_wire(),
        entries,
        heartbeat_interval_ms: 250,
        ..Default::default()
    }
}

#[test]
fn a_new_operator_reusing_a_generation_is_applied_and_acknowledged_only_after() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP generations_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let mut tb = Testbed::new().expect("testbed");
    let bpffs = tb.bpffs().join("n2");
    let p2: Ipv4Addr = "10.244.2.10".parse().unwrap();
    let stand_in = |destination: &str, gateway: &str, policy: &str| StandIn {
        plan: plan(destination, gateway, policy),
        wants: BTreeSet::from([(p2, destination.to_owned())]),
        bpffs: bpffs.clone(),
        acks: Arc::default(),
    };

    // Operator A: generation 5, entries X.
    let a = stand_in("203.0.113.0/24", "192.0.2.11", "x");
    let serving = Serving::start(tb.ns("ul"), a.clone());
    let mut cmd = tb.shim_command("n2", env!("CARGO_BIN_EXE_sluice-shim"));
    cmd.args(["--operator", &format!("http://{GRPC}"), "--interval-ms", "1000"]);
    tb.spawn("shim-n2", cmd).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || a
            .acks
            .lock()
            .unwrap()
            .contains(&(5, true))),
        "A's plan is applied and acknowledged: {:?}\n{}",
        a.acks.lock().unwrap(),
        tb.log("shim-n2")
    );

    // Operator B replaces A: generation 5 again, entries Y.
    drop(serving);
    let b = stand_in("198.51.100.0/24", "none", "y");
    let _serving = Serving::start(tb.ns("ul"), b.clone());
    assert!(
        wait_for(Duration::from_secs(20), || held(&bpffs) == b.wants),
        "the maps hold B's entries, not A's: {:?}\n{}",
        held(&bpffs),
        tb.log("shim-n2")
    );
    assert!(
        wait_for(Duration::from_secs(5), || !b.acks.lock().unwrap().is_empty()),
        "B's plan is acknowledged"
    );
    let acks = b.acks.lock().unwrap().clone();
    assert!(
        acks.iter().all(|ack| *ack == (5, true)),
        "B hears only of its own plan, once the maps hold it: {acks:?}"
    );
}
