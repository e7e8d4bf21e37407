//! What the engine tells the rest of the operator about policies: their status (for the status
//! writer, only when it changes) and notices (for Events: gateways changed, failovers,
//! rejections, each once).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

use super::EngineMetrics;
use crate::{
    live::{Behind, Draining, Holding, NodeBehind, Notice, StatusUpdate},
    planner::PolicyOutcome,
};

#[derive(Default)]
pub(super) struct Notices {
    /// Per policy, its gateway nodes as last noticed.
    gateways: BTreeMap<String, Vec<String>>,
    /// Per rejected policy, the reason and message last noticed.
    rejected: HashMap<String, (String, String)>,
    /// Policies whose status may have changed since the last [`Notices::take_dirty`].
    dirty: BTreeSet<String>,
    last_status: HashMap<String, StatusUpdate>,
    status_out: Vec<StatusUpdate>,
    notices_out: Vec<Notice>,
    /// Per (policy, managed address): where it is held, and the move under way (from which
    /// node, since when) until the new node holds it.
    managed: HashMap<(String, IpAddr), Placement>,
}

/// Where a managed address is held, for timing its moves.
#[derive(Clone, Debug, Default)]
struct Placement {
    node: Option<String>,
    /// The node it is moving from, and when the move was decided (until the new node holds it).
    moving: Option<(Option<String>, Instant)>,
}

impl Notices {
    /// `policy`'s status may have changed.
    pub fn touch(&mut self, policy: &str) {
        if !self.dirty.contains(policy) {
            self.dirty.insert(policy.to_owned());
        }
    }

    pub fn touch_all<'a>(&mut self, policies: impl IntoIterator<Item = &'a Arc<str>>) {
        for p in policies {
            self.touch(p);
        }
    }

    /// The policies whose status may have changed, for the caller to add to.
    pub fn dirty_mut(&mut self) -> &mut BTreeSet<String> {
        &mut self.dirty
    }

    pub fn take_dirty(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.dirty)
    }

    /// `policy` changed (`None`: it is gone): notices its rejection, and the change of its
    /// gateways, as a failover where a gateway it lost is among `lost` (node -> last heard
    /// from). Returns the nodes whose gateway duties may have changed.
    pub fn policy_changed(
        &mut self,
        policy: &str,
        outcome: Option<&PolicyOutcome>,
        lost: &HashMap<String, Instant>,
        now: Instant,
        metrics: &EngineMetrics,
    ) -> Vec<String> {
        self.touch(policy);
        let Some(outcome) = outcome else {
            self.rejected.remove(policy);
            self.last_status.remove(policy);
            return self.gateways.remove(policy).unwrap_or_default();
        };
        match &outcome.accepted {
            Err(e) => {
                let now_rejected = (e.reason.to_owned(), e.message.clone());
                if self.rejected.get(policy) != Some(&now_rejected) {
                    self.notices_out.push(Notice::Rejected {
                        policy: policy.to_owned(),
                        reason: now_rejected.0.clone(),
                        message: now_rejected.1.clone(),
                    });
                    self.rejected.insert(policy.to_owned(), now_rejected);
                }
            }
            Ok(()) => {
                self.rejected.remove(policy);
            }
        }
        let new: Vec<String> = outcome.gateways.iter().map(|g| g.node.to_string()).collect();
        let old = self.gateways.get(policy).cloned().unwrap_or_default();
        if new == old {
            return Vec::new();
        }
        let mut failed_over = false;
        for gone in old.iter().filter(|n| !new.contains(n)) {
            let Some(last_seen) = lost.get(gone) else {
                continue;
            };
            let took = now.saturating_duration_since(*last_seen);
            let replacement = new.iter().find(|n| !old.contains(n)).cloned();
            tracing::warn!(%policy, lost = %gone, ?replacement, ?took, "gateway failover");
            metrics.failovers.inc();
            metrics.failover_seconds.observe(took.as_secs_f64());
            self.notices_out.push(Notice::Failover {
                policy: policy.to_owned(),
                lost: gone.clone(),
                replacement,
                took,
            });
            failed_over = true;
        }
        if !failed_over {
            tracing::info!(%policy, ?old, ?new, "gateways changed");
            self.notices_out.push(Notice::GatewaysChanged {
                policy: policy.to_owned(),
                from: old.clone(),
                to: new.clone(),
            });
        }
        let mut duties = old;
        duties.extend(new.iter().cloned());
        self.gateways.insert(policy.to_owned(), new);
        duties
    }

    /// The status of the policy of `outcome`, from how each node that must hold its entries
    /// stands (`None`: programmed): written only when it differs from the last.
    pub fn status<'a>(
        &mut self,
        outcome: PolicyOutcome,
        nodes: impl IntoIterator<Item = (&'a Arc<str>, Option<Behind>)>,
        address_conflicts: Vec<(IpAddr, String)>,
        draining: Vec<Draining>,
        now: Instant,
    ) {
        let (mut to_program, mut programmed) = (0, 0);
        let mut behind = Vec::new();
        let mut gateways_behind = Vec::new();
        for (node, why) in nodes {
            to_program += 1;
            let Some(why) = why else {
                programmed += 1;
                continue;
            };
            if outcome.gateways.iter().any(|g| g.node == *node) {
                gateways_behind.push(node.to_string());
            }
            if behind.len() < StatusUpdate::MAX_BEHIND {
                behind.push(NodeBehind {
                    node: node.to_string(),
                    why,
                });
            }
        }
        let update = StatusUpdate {
            outcome,
            programmed,
            to_program,
            behind,
            gateways_behind: {
                gateways_behind.sort();
                gateways_behind
            },
            address_conflicts,
            draining,
        };
        self.time_moves(&update, now);
        self.notice_drains(&update);
        // A managed address newly found held by another host: an Event naming who answers.
        let before = self.last_status.get(&update.outcome.name);
        for (ip, detail) in &update.address_conflicts {
            if before.is_none_or(|b| !b.address_conflicts.iter().any(|(i, d)| i == ip && d == detail)) {
                self.notices_out.push(Notice::AddressConflict {
                    policy: update.outcome.name.clone(),
                    ip: *ip,
                    detail: detail.clone(),
                });
            }
        }
        if self.last_status.get(&update.outcome.name) != Some(&update) {
            self.last_status
                .insert(update.outcome.name.clone(), update.clone());
            self.status_out.push(update);
        }
    }

    /// An Event when a gateway starts draining the policy's open flows, and when it is done.
    fn notice_drains(&mut self, update: &StatusUpdate) {
        let policy = &update.outcome.name;
        let before: Vec<&str> = self
            .last_status
            .get(policy)
            .map(|b| b.draining.iter().map(|d| d.node.as_str()).collect())
            .unwrap_or_default();
        for d in &update.draining {
            if !before.contains(&d.node.as_str()) {
                tracing::info!(%policy, node = %d.node, pods = d.pods, "gateway draining the policy's open flows");
                self.notices_out.push(Notice::DrainStarted {
                    policy: policy.clone(),
                    node: d.node.clone(),
                    until: d.until,
                    pods: d.pods,
                });
            }
        }
        for node in before {
            if !update.draining.iter().any(|d| d.node == node) {
                tracing::info!(%policy, %node, "gateway drained");
                self.notices_out.push(Notice::DrainEnded {
                    policy: policy.clone(),
                    node: node.to_owned(),
                });
            }
        }
    }

    /// Follows each managed address of `update`'s policy: when it goes to another node, the move
    /// starts; once that node holds it (acknowledged, no conflict), an Event says from where to
    /// where and how long the new node took from the decision.
    fn time_moves(&mut self, update: &StatusUpdate, now: Instant) {
        let policy = &update.outcome.name;
        self.managed
            .retain(|(p, ip), _| p != policy || update.outcome.managed_ips.contains(ip));
        for (ip, holder, holding) in update.managed_ips() {
            let node = holder.map(|g| g.node.to_string());
            let h = self.managed.entry((policy.clone(), ip)).or_default();
            if h.node != node {
                // Moves are timed from a node that held it; a first placement is not a move.
                let from = h.moving.take().map_or(h.node.clone(), |(from, _)| from);
                h.moving = from.is_some().then_some((from, now));
                h.node = node.clone();
            }
            if holding == Holding::Assigned
                && let Some((from, since)) = h.moving.take()
            {
                self.notices_out.push(Notice::EgressIpMoved {
                    policy: policy.clone(),
                    ip,
                    from,
                    to: node.unwrap_or_default(),
                    took: now.saturating_duration_since(since),
                });
            }
        }
    }

    /// Status updates collected since the last call.
    pub fn take_status(&mut self) -> Vec<StatusUpdate> {
        std::mem::take(&mut self.status_out)
    }

    /// Notices collected since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices_out)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Duration};

    use super::*;
    use crate::{planner::ActiveGateway, policy::PolicyError};

    fn outcome(gateways: &[&str]) -> PolicyOutcome {
        PolicyOutcome {
            name: "p".into(),
            generation: Some(1),
            accepted: Ok(()),
            gateways: gateways
                .iter()
                .enumerate()
                .map(|(slot, node)| ActiveGateway {
                    entry: 0,
                    slot,
                    node: (*node).into(),
                    ip: IpAddr::from([192, 168, 0, slot as u8 + 1]),
                    egress_v4: None,
                    egress_v6: None,
                    interface: None,
                    managed: false,
                })
                .collect(),
            matched_endpoints: 1,
            conflicts: vec![],
            gateway_diagnosis: vec![],
            managed_ips: vec![],
            managed_taken: vec![],
        }
    }

    fn rejected(message: &str) -> PolicyOutcome {
        PolicyOutcome {
            accepted: Err(PolicyError {
                reason: "InvalidSpec",
                message: message.into(),
            }),
            ..outcome(&[])
        }
    }

    #[test]
    fn gateway_changes_are_noticed_once_and_a_lost_gateway_as_a_failover() {
        let (mut n, metrics, t0) = (Notices::default(), EngineMetrics::default(), Instant::now());
        let none = HashMap::new();
        let mut duties = n.policy_changed("p", Some(&outcome(&["g1"])), &none, t0, &metrics);
        assert_eq!(duties, ["g1"]);
        assert_eq!(
            n.take_notices(),
            [Notice::GatewaysChanged {
                policy: "p".into(),
                from: vec![],
                to: vec!["g1".into()],
            }]
        );
        assert!(
            n.policy_changed("p", Some(&outcome(&["g1"])), &none, t0, &metrics)
                .is_empty()
        );
        assert!(
            n.take_notices().is_empty(),
            "the same gateways again: nothing to say"
        );

        let lost = HashMap::from([("g1".to_owned(), t0)]);
        duties = n.policy_changed(
            "p",
            Some(&outcome(&["g2"])),
            &lost,
            t0 + Duration::from_millis(1200),
            &metrics,
        );
        duties.sort();
        assert_eq!(
            duties,
            ["g1", "g2"],
            "both the old and the new gateway's duties change"
        );
        assert_eq!(
            n.take_notices(),
            [Notice::Failover {
                policy: "p".into(),
                lost: "g1".into(),
                replacement: Some("g2".into()),
                took: Duration::from_millis(1200),
            }]
        );
        assert_eq!(metrics.failovers.get(), 1);

        // Gone: its gateways let go, and nothing is noticed.
        assert_eq!(n.policy_changed("p", None, &none, t0, &metrics), ["g2"]);
        assert!(n.take_notices().is_empty());
    }

    #[test]
    fn a_rejection_is_noticed_once_per_reason() {
        let (mut n, metrics, t0) = (Notices::default(), EngineMetrics::default(), Instant::now());
        let none = HashMap::new();
        for _ in 0..3 {
            n.policy_changed("p", Some(&rejected("bad CIDR")), &none, t0, &metrics);
        }
        n.policy_changed("p", Some(&rejected("worse CIDR")), &none, t0, &metrics);
        let messages: Vec<String> = n
            .take_notices()
            .into_iter()
            .map(|notice| match notice {
                Notice::Rejected { message, .. } => message,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(messages, ["bad CIDR", "worse CIDR"]);
        // Accepted, then rejected again for the same reason: noticed again.
        n.policy_changed("p", Some(&outcome(&[])), &none, t0, &metrics);
        n.policy_changed("p", Some(&rejected("worse CIDR")), &none, t0, &metrics);
        assert_eq!(n.take_notices().len(), 1);
    }

    #[test]
    fn status_is_written_when_it_changes_and_names_a_few_nodes_behind() {
        let (mut n, t0) = (Notices::default(), Instant::now());
        let names: Vec<Arc<str>> = (0..8).map(|i| Arc::from(format!("n{i}"))).collect();
        let pending = |programmed: usize| {
            names
                .iter()
                .enumerate()
                .map(move |(i, node)| (node, (i >= programmed).then_some(Behind::Pending)))
        };
        n.status(outcome(&["g1"]), pending(0), vec![], vec![], t0);
        let written = n.take_status();
        assert_eq!(written.len(), 1);
        assert_eq!((written[0].programmed, written[0].to_program), (0, 8));
        assert_eq!(written[0].behind.len(), StatusUpdate::MAX_BEHIND);
        assert_eq!(written[0].behind[0].node, "n0");

        n.status(outcome(&["g1"]), pending(0), vec![], vec![], t0);
        assert!(n.take_status().is_empty(), "unchanged: not written again");
        n.status(outcome(&["g1"]), pending(8), vec![], vec![], t0);
        let written = n.take_status();
        assert_eq!((written[0].programmed, written[0].behind.len()), (8, 0));

        // A policy that goes and comes back has its status written again.
        n.policy_changed(
            "p",
            None,
            &HashMap::new(),
            Instant::now(),
            &EngineMetrics::default(),
        );
        assert_eq!(n.take_dirty(), BTreeSet::from(["p".to_owned()]));
        n.status(outcome(&["g1"]), pending(8), vec![], vec![], t0);
        assert_eq!(n.take_status().len(), 1);
    }

    /// A managed address placed the first time is no move; one that goes to another node is,
    /// timed from the decision to the new node's acknowledgement, said once.
    #[test]
    fn a_managed_address_s_move_is_said_once_with_the_time_the_new_node_took() {
        let (mut n, t0) = (Notices::default(), Instant::now());
        let ip: IpAddr = "192.0.2.150".parse().unwrap();
        let held_by = |node: &str| {
            let mut o = outcome(&[node]);
            o.gateways[0].managed = true;
            o.gateways[0].egress_v4 = Some(ip);
            o.managed_ips = vec![ip];
            o
        };
        let names: Vec<Arc<str>> = ["g1", "g2"].into_iter().map(Arc::from).collect();
        let acked = |behind: &'static str| {
            names
                .iter()
                .map(move |node| (node, (**node == *behind).then_some(Behind::Pending)))
        };
        let moves = |n: &mut Notices| -> Vec<Notice> {
            n.take_notices()
                .into_iter()
                .filter(|x| matches!(x, Notice::EgressIpMoved { .. }))
                .collect()
        };
        n.status(held_by("g1"), acked("g1"), vec![], vec![], t0);
        n.status(
            held_by("g1"),
            acked("-"),
            vec![],
            vec![],
            t0 + Duration::from_millis(100),
        );
        assert!(moves(&mut n).is_empty(), "a first placement is no move");
        // g1 fails: g2 is assigned at 1 s and acknowledges at 1.3 s.
        n.status(
            held_by("g2"),
            acked("g2"),
            vec![],
            vec![],
            t0 + Duration::from_secs(1),
        );
        assert!(moves(&mut n).is_empty(), "not held by g2 yet");
        n.status(
            held_by("g2"),
            acked("-"),
            vec![],
            vec![],
            t0 + Duration::from_millis(1300),
        );
        let said = moves(&mut n);
        assert_eq!(said.len(), 1);
        let Notice::EgressIpMoved { from, to, took, .. } = &said[0] else {
            unreachable!()
        };
        assert_eq!(
            (from.as_deref(), to.as_str(), *took),
            (Some("g1"), "g2", Duration::from_millis(300))
        );
        n.status(
            held_by("g2"),
            acked("-"),
            vec![],
            vec![],
            t0 + Duration::from_secs(2),
        );
        assert!(moves(&mut n).is_empty(), "said once");
    }

    #[test]
    fn a_drain_is_said_when_it_starts_and_when_it_ends() {
        let (mut n, t0) = (Notices::default(), Instant::now());
        let drains = |n: &mut Notices| -> Vec<String> {
            n.take_notices()
                .into_iter()
                .filter_map(|x| match x {
                    Notice::DrainStarted { node, pods, .. } => Some(format!("start {node} {pods}")),
                    Notice::DrainEnded { node, .. } => Some(format!("end {node}")),
                    _ => None,
                })
                .collect()
        };
        let none = || std::iter::empty::<(&Arc<str>, Option<Behind>)>();
        n.status(outcome(&["g2"]), none(), vec![], vec![], t0);
        assert!(drains(&mut n).is_empty());
        let g1 = vec![Draining {
            node: "g1".to_owned(),
            until: 1_800_000_000,
            pods: 3,
            flows: None,
        }];
        n.status(outcome(&["g2"]), none(), vec![], g1.clone(), t0);
        assert_eq!(drains(&mut n), ["start g1 3"]);
        n.status(outcome(&["g2"]), none(), vec![], g1, t0);
        assert!(drains(&mut n).is_empty(), "said once");
        n.status(outcome(&["g2"]), none(), vec![], vec![], t0);
        assert_eq!(drains(&mut n), ["end g1"]);
    }
}
