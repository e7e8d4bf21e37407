//! Planned moves of managed egress IPs: the old node lets go before the new one claims.
//!
//! When a policy edit (or a node's labels) moves a managed address from a live node to another,
//! both would otherwise act at once: the new node's duplicate probe could still find the old
//! node answering (a false `Conflict`, and an Event), or both could answer ARP for a moment. So
//! the new node gets its duty with `awaiting_release` until the old node has acknowledged a
//! generation without the address — or stopped being alive, or a grace period passed (a node
//! that does not answer cannot hold anything up for longer). A failure is no planned move: a
//! node that is not alive any more releases nothing, and the new node claims at once.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

use crate::planner::GatewayDuty;

/// A managed address a node was told to give up.
#[derive(Debug)]
struct Release {
    from: Arc<str>,
    /// The generation `from` held before it was told: an acknowledgement of a later one means
    /// the address is gone from it (the shim releases before it acknowledges).
    before: u64,
    deadline: Instant,
    /// Nodes given the address meanwhile, with `awaiting_release`.
    waiting: BTreeSet<Arc<str>>,
}

/// The releases under way, per managed address.
#[derive(Debug, Default)]
pub(super) struct Handovers {
    releases: HashMap<IpAddr, Release>,
}

/// The managed addresses a node holds (or was told to claim) by its duties.
fn claimed(duties: &[GatewayDuty]) -> impl Iterator<Item = IpAddr> + '_ {
    duties
        .iter()
        .filter(|d| d.managed && !d.awaiting_release)
        .flat_map(|d| d.egress_ips.iter().copied())
}

impl Handovers {
    /// Node `node`, alive and at generation `generation`, goes from duties `old` (as last
    /// published) to `new`: the managed addresses it had claimed and loses are released, and
    /// others wait for that until `deadline`.
    pub fn publishing(
        &mut self,
        node: &Arc<str>,
        old: &[GatewayDuty],
        new: &[GatewayDuty],
        generation: u64,
        deadline: Instant,
    ) {
        let keeps: BTreeSet<IpAddr> = new
            .iter()
            .filter(|d| d.managed)
            .flat_map(|d| d.egress_ips.iter().copied())
            .collect();
        for ip in claimed(old).filter(|ip| !keeps.contains(ip)) {
            self.releases.insert(
                ip,
                Release {
                    from: node.clone(),
                    before: generation,
                    deadline,
                    waiting: BTreeSet::new(),
                },
            );
        }
    }

    /// Marks `node`'s duties whose address another node is still releasing.
    pub fn hold(&mut self, node: &Arc<str>, duties: &mut [GatewayDuty]) {
        for duty in duties.iter_mut().filter(|d| d.managed) {
            for ip in &duty.egress_ips {
                let Some(release) = self.releases.get_mut(ip) else {
                    continue;
                };
                if release.from == *node {
                    // Given back before it was done: it still holds it.
                    self.releases.remove(ip);
                } else {
                    release.waiting.insert(node.clone());
                    duty.awaiting_release = true;
                }
            }
        }
    }

    /// Ends the releases that are done: acknowledged past `before`, a node no longer alive
    /// (`acked` says `None`), or past the deadline. The nodes that waited, to publish again.
    pub fn settle(&mut self, acked: impl Fn(&str) -> Option<u64>, now: Instant) -> BTreeSet<Arc<str>> {
        let mut waited = BTreeSet::new();
        self.releases.retain(|ip, r| {
            let done = match acked(&r.from) {
                Some(generation) => generation > r.before,
                None => true,
            } || now >= r.deadline;
            if done {
                if now >= r.deadline && acked(&r.from).is_some_and(|g| g <= r.before) {
                    tracing::warn!(%ip, from = %r.from, "a managed egress IP's release was not acknowledged in time: its new node claims it anyway (after a probe)");
                }
                waited.extend(std::mem::take(&mut r.waiting));
            }
            !done
        });
        waited
    }

    /// The earliest deadline of a release under way.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.releases.values().map(|r| r.deadline).min()
    }

    /// Whether `node` waits for a release of one of its managed addresses.
    pub fn awaits(&self, node: &str) -> bool {
        self.releases
            .values()
            .any(|r| r.waiting.iter().any(|w| **w == *node))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn duty(ip: &str) -> GatewayDuty {
        GatewayDuty {
            policy: "p".into(),
            egress_ips: vec![ip.parse().unwrap()],
            interface: None,
            managed: true,
            awaiting_release: false,
        }
    }

    #[test]
    fn the_new_node_waits_until_the_old_one_acknowledges_the_release() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let t0 = Instant::now();
        let mut h = Handovers::default();
        h.publishing(&a, &[duty("192.0.2.150")], &[], 7, t0 + Duration::from_secs(1));
        let mut duties = vec![duty("192.0.2.150")];
        h.hold(&b, &mut duties);
        assert!(duties[0].awaiting_release);
        assert!(h.awaits("b"));
        // a still at 7 (or at 7's view): b waits.
        assert!(h.settle(|_| Some(7), t0).is_empty());
        assert_eq!(h.settle(|_| Some(8), t0), [b.clone()].into());
        let mut duties = vec![duty("192.0.2.150")];
        h.hold(&b, &mut duties);
        assert!(!duties[0].awaiting_release);
        assert!(!h.awaits("b"));
    }

    #[test]
    fn a_release_ends_when_its_node_is_gone_or_its_deadline_passes() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(1);
        for (acked, at, done) in [(Some(7), t0, false), (None, t0, true), (Some(7), deadline, true)] {
            let mut h = Handovers::default();
            h.publishing(&a, &[duty("192.0.2.150")], &[], 7, deadline);
            h.hold(&b, &mut [duty("192.0.2.150")]);
            assert_eq!(h.next_deadline(), Some(deadline));
            assert_eq!(!h.settle(|_| acked, at).is_empty(), done, "{acked:?} at {at:?}");
        }
    }

    #[test]
    fn only_an_address_the_node_had_claimed_is_released() {
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let t0 = Instant::now();
        let mut h = Handovers::default();
        // a keeps it; a never claimed it (it was waiting itself): no release from a.
        h.publishing(&a, &[duty("192.0.2.150")], &[duty("192.0.2.150")], 7, t0);
        let waiting = GatewayDuty {
            awaiting_release: true,
            ..duty("192.0.2.151")
        };
        h.publishing(&b, &[waiting], &[], 3, t0);
        assert_eq!(h.next_deadline(), None);
        // Given back to the node releasing it: nothing to wait for.
        h.publishing(&a, &[duty("192.0.2.150")], &[], 7, t0);
        h.hold(&c, &mut [duty("192.0.2.150")]);
        let mut back = [duty("192.0.2.150")];
        h.hold(&a, &mut back);
        assert!(!back[0].awaiting_release);
        assert_eq!(h.next_deadline(), None);
    }
}
