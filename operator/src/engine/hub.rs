//! Where the engine publishes views and the sessions report: shared by the engine and the
//! server ([`crate::grpc`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

use super::{HeldDuty, HeldPod, NodeView, PinnedCounts};
use crate::{model::InterfaceInfo, planner::EntryKey};

/// What sessions tell the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShimEvent {
    Connected {
        node: String,
        session: u64,
        version: String,
        interfaces: Vec<InterfaceInfo>,
        /// The gateway duties the shim's datapath holds.
        held: Vec<HeldDuty>,
        /// The gateways its pods are steered to.
        pods: Vec<HeldPod>,
        /// The gateways its pods' open flows are pinned to besides.
        pinned: Vec<HeldPod>,
    },
    /// A heartbeat, taken in at once. The node channel's sessions stamp [`Hub::heard`] instead,
    /// which the engine reads at its next tick.
    Heartbeat {
        node: String,
        session: u64,
    },
    Ack {
        node: String,
        session: u64,
        generation: u64,
        /// The entries the shim could not program as planned, with why.
        errors: Vec<(EntryKey, String)>,
        /// Managed egress IPs the shim did not claim (another host answers for them), with why.
        conflicts: Vec<(std::net::IpAddr, String)>,
    },
    /// The open flows its pods have pinned to gateways, as the shim last counted them (with
    /// every acknowledgement).
    PinnedFlows {
        node: String,
        session: u64,
        counts: PinnedCounts,
    },
    Disconnected {
        node: String,
        session: u64,
    },
}

/// Where the engine publishes views and sessions report.
///
/// A node's views go through a `watch` channel: each publication replaces the last, so a
/// session that reads slowly gets its changes coalesced into the newest view and never holds
/// anyone else up.
pub struct Hub {
    views: Mutex<HashMap<String, watch::Sender<Option<Arc<NodeView>>>>>,
    events: mpsc::UnboundedSender<ShimEvent>,
    /// When each session last had a heartbeat from its shim, stamped by the session itself and
    /// read at the engine's next tick ([`Hub::heard`]).
    heard: Mutex<HashMap<u64, Instant>>,
    /// The interval before a node has a view ([`NodeView::heartbeat_interval`] after).
    pub heartbeat_interval: Duration,
}

impl Hub {
    /// A hub and the receiver of its sessions' events (for [`super::run`]).
    pub fn new(heartbeat_interval: Duration) -> (Arc<Hub>, mpsc::UnboundedReceiver<ShimEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Hub {
                views: Mutex::default(),
                events,
                heard: Mutex::default(),
                heartbeat_interval,
            }),
            rx,
        )
    }

    /// The views of one node (`None` until the engine has published one).
    pub fn subscribe(&self, node: &str) -> watch::Receiver<Option<Arc<NodeView>>> {
        let mut views = self.views.lock().expect("hub lock");
        views
            .entry(node.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    pub(super) fn publish(&self, node: &str, view: NodeView) {
        let mut views = self.views.lock().expect("hub lock");
        let tx = views
            .entry(node.to_owned())
            .or_insert_with(|| watch::channel(None).0);
        tx.send_replace(Some(Arc::new(view)));
    }

    /// Reports a session event (ignored once the engine is gone).
    pub fn report(&self, event: ShimEvent) {
        let _ = self.events.send(event);
    }

    /// Session `session` had a heartbeat from its shim at `at`. Unlike a
    /// [`ShimEvent::Heartbeat`], this does not wake the engine (at rest, heartbeats are all that
    /// happens, a few per second per node), and the time is the session's, not the engine's: a
    /// shim is never taken for silent because its heartbeats waited behind a long flush.
    pub fn heard(&self, session: u64, at: Instant) {
        let mut heard = self.heard.lock().expect("hub lock");
        let last = heard.entry(session).or_insert(at);
        *last = (*last).max(at);
    }

    /// The heartbeats stamped since the last call: session -> when last.
    pub(super) fn take_heard(&self) -> HashMap<u64, Instant> {
        std::mem::take(&mut *self.heard.lock().expect("hub lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(generation: u64) -> NodeView {
        NodeView {
            generation,
            ..NodeView::default()
        }
    }

    #[test]
    fn a_session_that_reads_late_gets_only_the_newest_view() {
        let (hub, _events) = Hub::new(Duration::from_millis(250));
        let mut views = hub.subscribe("n");
        assert!(views.borrow_and_update().is_none());
        for generation in 1..=3 {
            hub.publish("n", view(generation));
        }
        assert!(views.has_changed().unwrap());
        assert_eq!(views.borrow_and_update().as_ref().unwrap().generation, 3);
        assert!(
            !views.has_changed().unwrap(),
            "the two before are gone, not queued"
        );
        // A session that subscribes after the publication still finds the view.
        assert_eq!(hub.subscribe("n").borrow().as_ref().unwrap().generation, 3);
    }

    #[test]
    fn the_latest_stamp_of_a_session_wins_and_is_taken_once() {
        let (hub, _events) = Hub::new(Duration::from_millis(250));
        let t0 = Instant::now();
        hub.heard(1, t0 + Duration::from_millis(20));
        // Stamped by another task a moment earlier but recorded later: it must not move back.
        hub.heard(1, t0 + Duration::from_millis(10));
        hub.heard(2, t0);
        let heard = hub.take_heard();
        assert_eq!(heard[&1], t0 + Duration::from_millis(20));
        assert_eq!(heard[&2], t0);
        assert!(hub.take_heard().is_empty());
    }
}
