//! Liveness: the shims' sessions, when each was last heard from, the heartbeat interval and grace
//! period of each node, the start-up settling period (with the gateway duties the shims report
//! holding), and so which nodes may be gateways.
//!
//! Only a gateway's liveness moves traffic: a node no accepted policy's gateway `nodeSelector`
//! matches is never selected, whatever its eligibility (the planner looks at eligibility only
//! for matching nodes), and it holds back no switch. So only nodes that may be gateways
//! (*gateway-capable*) are told the fast heartbeat interval and judged by the grace period;
//! the others heartbeat slowly and are judged by four of their intervals, which only their
//! status and metrics notice. A node that becomes capable may be a gateway only once its shim
//! has acknowledged a view with the fast interval: until then it may still be heartbeating
//! slowly, and a dead one would be found out only after the slow grace.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    model::{GatewaySlot, InterfaceInfo, NodeInfo},
    planner::EntryKey,
    selector::Selector,
};

/// What a shim reports its datapath holding: the node with underlay address `gateway` fills
/// `slot` of gateway entry `entry` of `policy` (the shim's own pods are steered to it, or the
/// shim's node is that gateway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldDuty {
    pub policy: String,
    pub entry: usize,
    pub slot: usize,
    pub gateway: IpAddr,
}

/// What a shim reports its datapath holding for one of its pods: the pod at `pod` is steered to
/// the node with underlay address `gateway` for `policy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldPod {
    pub policy: String,
    pub pod: IpAddr,
    pub gateway: IpAddr,
}

/// The open flows a shim's pods have pinned to gateways, as it last counted them: per (pod,
/// policy, gateway), and the gateways it counted (a pod with no count for one of these has no
/// open flow left there).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedCounts {
    counted: BTreeSet<IpAddr>,
    /// (pod, gateway) -> policy -> open flows (looked up by `&str`, on every check of a drain).
    flows: BTreeMap<(IpAddr, IpAddr), BTreeMap<String, u64>>,
}

impl PinnedCounts {
    /// The gateways `counted`, and the open flows per ((pod, policy, gateway)).
    pub fn new(
        counted: impl IntoIterator<Item = IpAddr>,
        flows: impl IntoIterator<Item = ((IpAddr, String, IpAddr), u64)>,
    ) -> Self {
        let mut out = PinnedCounts {
            counted: counted.into_iter().collect(),
            flows: BTreeMap::new(),
        };
        for ((pod, policy, gateway), n) in flows {
            *out.flows
                .entry((pod, gateway))
                .or_default()
                .entry(policy)
                .or_default() += n;
        }
        out
    }

    /// Whether the node counted `gateway` and found no open flow of `pod` under `policy` there.
    pub fn none_left(&self, pod: IpAddr, policy: &str, gateway: IpAddr) -> bool {
        self.counted.contains(&gateway)
            && self
                .flows
                .get(&(pod, gateway))
                .is_none_or(|by_policy| !by_policy.contains_key(policy))
    }

    /// The open flows of `policy`'s pods to `gateway`, if the node counted that gateway.
    pub fn to_gateway(&self, policy: &str, gateway: IpAddr) -> Option<u64> {
        self.counted.contains(&gateway).then(|| {
            self.flows
                .iter()
                .filter(|((_, g), _)| *g == gateway)
                .filter_map(|(_, by_policy)| by_policy.get(policy))
                .sum()
        })
    }
}

/// A flow a pod's node reported pinned to a gateway: (policy, pod, gateway node, the gateway
/// entry and slot the gateway reported holding for the policy, if any).
pub type PinnedFlow = (String, IpAddr, String, Option<(usize, usize)>);

/// The start-up settling period (see the engine's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settling {
    /// The engine has not seen the time yet.
    NotStarted,
    Until(Instant),
    Done,
}

/// The heartbeat interval a shim may be using, as far as the engine can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pace {
    /// The fast one: a new session starts at the shim's own default, and has been told nothing
    /// slower since.
    Fast,
    /// The slow one: it was told so (its node serves no policy as a gateway).
    Slow,
    /// Told the fast interval by the view of generation `from` (its node became a possible
    /// gateway), not acknowledged yet. Ready all the same until `until`, one grace period after
    /// that view went out: a live shim acknowledges within milliseconds, and the node must be a
    /// candidate from the moment it can be one. Were it a candidate only once acknowledged, a new
    /// policy's pods would all land on the first of its gateways to acknowledge and stay there
    /// (a pod sticks to its gateway). Its silence is judged by the slow interval meanwhile.
    Switching { from: u64, until: Instant },
    /// Past `until` without that acknowledgement: not ready until it comes.
    Overdue { from: u64 },
}

/// One node's shim, as its latest session has it.
pub(super) struct Shim {
    pub session: u64,
    pub connected: bool,
    last_seen: Instant,
    pub alive: bool,
    pub interfaces: Option<Vec<InterfaceInfo>>,
    pub acked: u64,
    /// The entries of the acknowledged generation that the shim could not program.
    pub errors: BTreeMap<EntryKey, String>,
    /// Managed egress IPs the shim did not claim (another host answers for them), with why.
    pub address_conflicts: BTreeMap<IpAddr, String>,
    pace: Pace,
}

impl Shim {
    /// Whether its node may serve as a gateway, as far as the shim goes.
    fn gateway_ready(&self) -> bool {
        // Told the slow interval, a node is ready too: it is told the fast one in the same
        // flush that makes it a possible gateway (see `Pace::Switching`).
        self.alive && !matches!(self.pace, Pace::Overdue { .. })
    }
}

/// See the module documentation.
pub(super) struct Liveness {
    grace: Duration,
    settle: Duration,
    fast: Duration,
    slow: Duration,
    shims: HashMap<String, Shim>,
    settling: Settling,
    /// While settling: per policy, the slots shims reported holding, by gateway address, with
    /// the nodes whose shims reported each.
    held: HashMap<String, Vec<(HeldDuty, BTreeSet<String>)>>,
    /// The pods' gateways shims reported (while settling).
    held_pods: Vec<HeldPod>,
    /// The pinned flows shims reported (while settling), and then, with the slots their gateways
    /// held, until the first publication takes them ([`Liveness::take_pinned`]).
    pinned: Vec<HeldPod>,
    pinned_slots: Vec<(HeldPod, Option<HeldDuty>)>,
    /// Shims found silent since the last [`Liveness::take_lost`]: node -> last heard from.
    lost: HashMap<String, Instant>,
    /// Per accepted policy, the `nodeSelector` of each of its gateway entries.
    gateway_selectors: HashMap<String, Vec<Selector>>,
    /// Nodes some accepted policy's gateway `nodeSelector` matches.
    capable: HashSet<String>,
    /// Every node's capability needs recomputing (a policy's selectors changed)...
    capable_stale: bool,
    /// ...or these nodes' (their labels changed, or they came or went).
    relabeled: BTreeSet<String>,
    /// Nodes still carrying flows of pods moved away from them (lingering entries): they
    /// heartbeat fast, like gateways, so that their failure ends those flows' pinning at once.
    carrying: BTreeSet<String>,
}

impl Liveness {
    /// `grace` for gateway-capable nodes, heartbeating every `fast`; four times `slow` (never
    /// faster than `fast`) for the others.
    pub fn new(grace: Duration, settle: Duration, fast: Duration, slow: Duration) -> Self {
        Liveness {
            grace,
            settle,
            fast,
            slow: slow.max(fast),
            shims: HashMap::new(),
            settling: Settling::NotStarted,
            held: HashMap::new(),
            held_pods: Vec::new(),
            pinned: Vec::new(),
            pinned_slots: Vec::new(),
            lost: HashMap::new(),
            gateway_selectors: HashMap::new(),
            capable: HashSet::new(),
            capable_stale: false,
            relabeled: BTreeSet::new(),
            carrying: BTreeSet::new(),
        }
    }

    pub fn shim(&self, node: &str) -> Option<&Shim> {
        self.shims.get(node)
    }

    /// `node`'s shim, if `session` is its latest.
    pub fn shim_mut(&mut self, node: &str, session: u64) -> Option<&mut Shim> {
        self.shims.get_mut(node).filter(|s| s.session == session)
    }

    pub fn connected_shims(&self) -> usize {
        self.shims.values().filter(|s| s.connected).count()
    }

    /// The grace period of a shim that may be heartbeating slowly.
    fn slow_grace(&self) -> Duration {
        self.grace.max(self.slow * 4)
    }

    // === Settling ===

    /// Whether the start-up settling period is still on.
    pub fn settling(&self) -> bool {
        self.settling != Settling::Done
    }

    /// The settling period runs from the first time the engine sees.
    pub fn start_clock(&mut self, now: Instant) {
        if self.settling == Settling::NotStarted {
            self.settling = Settling::Until(now + self.settle);
        }
    }

    /// Ends the settling period once it has run out, or (once the source has `synced`) every
    /// Ready node of `nodes` has its shim back. Returns the Ready nodes whose shim is not
    /// back: no longer presumed alive, so lost.
    pub fn settle(&mut self, now: Instant, synced: bool, nodes: &BTreeMap<String, NodeInfo>) -> Vec<String> {
        let Settling::Until(until) = self.settling else {
            return Vec::new();
        };
        let all_back = synced
            && nodes
                .values()
                .filter(|n| n.ready)
                .all(|n| self.shims.get(&n.name).is_some_and(|s| s.alive));
        if !all_back && now < until {
            return Vec::new();
        }
        let missing: Vec<String> = nodes
            .values()
            .filter(|n| n.ready && !self.shims.contains_key(&n.name))
            .map(|n| n.name.clone())
            .collect();
        tracing::info!(
            ?missing,
            "settled: shims not back by now are no longer presumed alive"
        );
        self.settling = Settling::Done;
        // A pinned flow's gateway is named with the slot it reported holding for the policy:
        // what its lingering entries were made for (the entry says which egress to use).
        for p in std::mem::take(&mut self.pinned) {
            // Its own claim, if it has two: the one fewest shims report (only the gateway itself
            // holds the pinned flows' entries now).
            let slot = self.held.get(&p.policy).and_then(|claims| {
                claims
                    .iter()
                    .filter(|(d, _)| d.gateway == p.gateway)
                    .min_by_key(|(_, reporters)| reporters.len())
            });
            let slot = slot.map(|(d, _)| d.clone());
            self.pinned_slots.push((p, slot));
        }
        self.held.clear();
        self.held_pods.clear();
        let settle_started = until.checked_sub(self.settle).unwrap_or(now);
        for node in &missing {
            self.lost.insert(node.clone(), settle_started);
        }
        missing
    }

    /// Takes in the slots `node`'s shim reports holding (while settling); the policies they
    /// concern. Two gateways may be reported in one slot: one that holds its pods' entries
    /// still for their pinned flows (lingering) keeps the slot it had beside the one that took
    /// it over, which the pods' nodes report too ([`Liveness::held_slots`] counts).
    pub fn adopt_held(&mut self, node: &str, held: Vec<HeldDuty>) -> BTreeSet<String> {
        let mut policies = BTreeSet::new();
        if !self.settling() {
            return policies;
        }
        for d in held {
            policies.insert(d.policy.clone());
            let claims = self.held.entry(d.policy.clone()).or_default();
            match claims.iter_mut().find(|(c, _)| *c == d) {
                Some((_, reporters)) => {
                    reporters.insert(node.to_owned());
                }
                None => claims.push((d, BTreeSet::from([node.to_owned()]))),
            }
        }
        policies
    }

    /// Takes in the flows a shim reports its pods have pinned to gateways (while settling).
    pub fn adopt_pinned(&mut self, pinned: Vec<HeldPod>) {
        if self.settling() {
            self.pinned.extend(pinned);
        }
    }

    /// The pinned flows reported while settling, once settled: (policy, pod, gateway node name,
    /// the gateway entry and slot it reported holding for the policy, if it did), the names
    /// among `nodes`. Taken once.
    pub fn take_pinned(&mut self, nodes: &BTreeMap<String, NodeInfo>) -> Vec<PinnedFlow> {
        if self.pinned_slots.is_empty() {
            return Vec::new();
        }
        let by_ip: HashMap<IpAddr, &str> = nodes
            .values()
            .filter_map(|n| Some((n.tunnel_ip()?, n.name.as_str())))
            .collect();
        std::mem::take(&mut self.pinned_slots)
            .into_iter()
            .filter_map(|(p, d)| {
                let gateway = (*by_ip.get(&p.gateway)?).to_owned();
                Some((p.policy, p.pod, gateway, d.map(|d| (d.entry, d.slot))))
            })
            .collect()
    }

    /// Takes in the pods' gateways a shim reports (while settling).
    pub fn adopt_held_pods(&mut self, pods: Vec<HeldPod>) {
        if self.settling() {
            self.held_pods.extend(pods);
        }
    }

    /// The pods' gateways reported while settling, as (policy, pod, gateway node name) with the
    /// names among `nodes` (addresses not among them are left out).
    pub fn held_pods(&self, nodes: &BTreeMap<String, NodeInfo>) -> Vec<(String, IpAddr, String)> {
        let by_ip: HashMap<IpAddr, &str> = nodes
            .values()
            .filter_map(|n| Some((n.tunnel_ip()?, n.name.as_str())))
            .collect();
        self.held_pods
            .iter()
            .filter_map(|p| Some((p.policy.clone(), p.pod, (*by_ip.get(&p.gateway)?).to_owned())))
            .collect()
    }

    /// The policies some shim reported holding slots of (while settling).
    pub fn held_policies(&self) -> impl Iterator<Item = &String> {
        self.held.keys()
    }

    pub fn holds(&self, policy: &str) -> bool {
        self.held.contains_key(policy)
    }

    /// The slots reported held for `policy`, with the gateways' names among `nodes` (addresses
    /// not among them are left out), those more shims reported first: of two gateways in one
    /// slot, the one the pods' nodes steer to goes before the one only the gateway itself
    /// reports (it holds lingering entries).
    pub fn held_slots(&self, policy: &str, nodes: &BTreeMap<String, NodeInfo>) -> Vec<GatewaySlot> {
        let Some(claims) = self.held.get(policy) else {
            return Vec::new();
        };
        let mut held: Vec<&(HeldDuty, BTreeSet<String>)> = claims.iter().collect();
        held.sort_by_key(|(_, reporters)| std::cmp::Reverse(reporters.len()));
        let held = held.into_iter().map(|(d, _)| d);
        let by_ip: HashMap<IpAddr, &str> = nodes
            .values()
            .filter_map(|n| Some((n.tunnel_ip()?, n.name.as_str())))
            .collect();
        held.filter_map(|d| {
            Some(GatewaySlot {
                entry: d.entry,
                slot: d.slot,
                node: (*by_ip.get(&d.gateway)?).to_owned(),
            })
        })
        .collect()
    }

    // === Sessions ===

    /// What the planner may know of `source`: whether it may be a gateway, as far as its shim
    /// goes, and the interfaces its shim reported.
    pub fn effective(&self, source: &NodeInfo) -> NodeInfo {
        let shim = self.shims.get(&source.name);
        let mut node = source.clone();
        // While settling, a Ready node whose shim is not back yet keeps serving: its datapath
        // still forwards, and its shim is on its way.
        let presumed = self.settling() && source.ready && shim.is_none();
        node.eligible = source.eligible && (presumed || shim.is_some_and(Shim::gateway_ready));
        if let Some(interfaces) = shim.and_then(|s| s.interfaces.clone()) {
            node.interfaces = Some(interfaces);
        }
        node
    }

    /// A new session of `node`'s shim, which will be sent `view` (generation, heartbeat
    /// interval) if one was published. Whether what the planner knows of the node changes.
    pub fn connected(
        &mut self,
        node: &str,
        session: u64,
        interfaces: Option<Vec<InterfaceInfo>>,
        view: Option<(u64, Duration)>,
        now: Instant,
    ) -> bool {
        let mut shim = Shim {
            session,
            connected: true,
            last_seen: now,
            alive: true,
            interfaces,
            acked: 0,
            errors: BTreeMap::new(),
            address_conflicts: BTreeMap::new(),
            pace: Pace::Fast,
        };
        if let Some((generation, interval)) = view {
            shim.pace = self.pace_after(Pace::Fast, generation, interval, now);
        }
        let old = self.shims.insert(node.to_owned(), shim);
        let new = &self.shims[node];
        old.is_none_or(|o| o.gateway_ready() != new.gateway_ready() || o.interfaces != new.interfaces)
    }

    fn pace_after(&self, pace: Pace, generation: u64, interval: Duration, now: Instant) -> Pace {
        match pace {
            _ if interval > self.fast => Pace::Slow,
            Pace::Slow => Pace::Switching {
                from: generation,
                until: now + self.grace,
            },
            other => other,
        }
    }

    /// `node`'s view of `generation`, telling heartbeats every `interval`, was published at
    /// `now`. Whether the node's readiness as a gateway changed.
    pub fn view_published(&mut self, node: &str, generation: u64, interval: Duration, now: Instant) -> bool {
        let Some(pace) = self.shims.get(node).map(|s| s.pace) else {
            return false;
        };
        let pace = self.pace_after(pace, generation, interval, now);
        let s = self.shims.get_mut(node).expect("looked up above");
        let before = s.gateway_ready();
        s.pace = pace;
        before != s.gateway_ready()
    }

    /// A heartbeat of `session`, taken at `now`. Whether its shim is back from silence.
    pub fn heartbeat(&mut self, node: &str, session: u64, now: Instant) -> bool {
        let Some(s) = self.shims.get_mut(node).filter(|s| s.session == session) else {
            return false;
        };
        s.last_seen = now;
        // Silent past the grace period, but back on the same session.
        !std::mem::replace(&mut s.alive, true)
    }

    /// `session` acknowledged `generation` (`published` being the latest this engine
    /// published for the node). `None` if the session is not the node's; else whether the
    /// node's readiness as a gateway changed.
    pub fn ack(
        &mut self,
        node: &str,
        session: u64,
        generation: u64,
        errors: Vec<(EntryKey, String)>,
        published: u64,
        now: Instant,
    ) -> Option<bool> {
        let s = self.shims.get_mut(node).filter(|s| s.session == session)?;
        s.last_seen = now;
        if generation > published {
            // Nothing this engine sent: a confused (or lying) shim proves nothing.
            tracing::warn!(%node, generation, published, "ack of a generation never published");
        } else if generation >= s.acked {
            s.acked = generation;
            if !errors.is_empty() {
                tracing::warn!(%node, generation, errors = errors.len(), "shim could not program some entries");
            }
            s.errors = errors.into_iter().collect();
        }
        let before = s.gateway_ready();
        if let Pace::Switching { from, .. } | Pace::Overdue { from } = s.pace
            && s.acked >= from
        {
            s.pace = Pace::Fast;
        }
        Some(before != s.gateway_ready())
    }

    pub fn disconnected(&mut self, node: &str, session: u64) {
        if let Some(s) = self.shims.get_mut(node)
            && s.session == session
        {
            tracing::info!(%node, session, "shim disconnected");
            s.connected = false;
        }
    }

    /// Takes in the heartbeats sessions stamped (session -> when last), and finds the shims
    /// silent for longer than their grace period. Returns the nodes whose shim came back or
    /// fell silent.
    pub fn tick(&mut self, heard: HashMap<u64, Instant>, now: Instant) -> Vec<String> {
        let mut changed = Vec::new();
        let (grace, slow_grace) = (self.grace, self.slow_grace());
        let grace_of = |s: &Shim| if s.pace == Pace::Fast { grace } else { slow_grace };
        for (node, s) in &mut self.shims {
            // Told the fast interval a grace period ago and still not acknowledged it: no
            // longer presumed on its way to the fast interval.
            if let Pace::Switching { from, until } = s.pace
                && now > until
            {
                tracing::warn!(%node, "shim did not acknowledge the fast heartbeat interval in time");
                s.pace = Pace::Overdue { from };
                changed.push(node.clone());
            }
            if let Some(&at) = heard.get(&s.session)
                && at > s.last_seen
            {
                s.last_seen = at;
            }
            let silent = now.saturating_duration_since(s.last_seen);
            if !s.alive && heard.contains_key(&s.session) && silent <= grace_of(s) {
                // Silent past the grace period, but back on the same session.
                s.alive = true;
                changed.push(node.clone());
            } else if s.alive && silent > grace_of(s) {
                tracing::warn!(%node, ?silent, "shim silent past the grace period");
                s.alive = false;
                self.lost.insert(node.clone(), s.last_seen);
                changed.push(node.clone());
            }
        }
        changed
    }

    /// When [`tick`](Self::tick) may next change something: the earliest a live shim can be
    /// past its grace period (as far as the heartbeats taken in so far go), or the end of the
    /// settling period; `now` while a connected shim is silent (a heartbeat stamped for it
    /// brings it back at the next tick) or before the clock started. `None`: nothing is due.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        let (grace, slow_grace) = (self.grace, self.slow_grace());
        let mut due = match self.settling {
            Settling::NotStarted => return Some(now),
            Settling::Until(until) => Some(until),
            Settling::Done => None,
        };
        for s in self.shims.values() {
            if let Pace::Switching { until, .. } = s.pace {
                let at = until + Duration::from_millis(1);
                due = Some(due.map_or(at, |d| d.min(at)));
            }
            let at = if s.alive {
                // `tick` finds a shim silent once strictly past its grace period.
                let grace = if s.pace == Pace::Fast { grace } else { slow_grace };
                s.last_seen + grace + Duration::from_millis(1)
            } else if s.connected {
                now
            } else {
                continue;
            };
            due = Some(due.map_or(at, |d| d.min(at)));
        }
        due
    }

    /// The shims found silent since the last call (node -> last heard from).
    pub fn take_lost(&mut self) -> HashMap<String, Instant> {
        std::mem::take(&mut self.lost)
    }

    // === Heartbeat intervals ===

    /// The heartbeat interval `node`'s views tell: fast when it may be a gateway.
    pub fn heartbeat_interval(&self, node: &str) -> Duration {
        if self.capable.contains(node) {
            self.fast
        } else {
            self.slow
        }
    }

    /// A policy's gateway entries' node selectors (`None`: it is not accepted, or gone).
    pub fn set_gateway_selectors(&mut self, policy: &str, selectors: Option<Vec<Selector>>) {
        let changed = match selectors {
            Some(s) => self.gateway_selectors.insert(policy.to_owned(), s.clone()) != Some(s),
            None => self.gateway_selectors.remove(policy).is_some(),
        };
        self.capable_stale |= changed;
    }

    /// `node`'s labels may have changed (or it came or went).
    pub fn relabeled(&mut self, node: &str) {
        self.relabeled.insert(node.to_owned());
    }

    /// Recomputes which of `nodes` may be gateways, where something changed. Returns the
    /// nodes whose heartbeat interval changes.
    /// The nodes carrying lingering entries now (see `carrying`).
    pub fn set_carrying(&mut self, carrying: BTreeSet<String>) {
        if carrying != self.carrying {
            self.relabeled
                .extend(self.carrying.symmetric_difference(&carrying).cloned());
            self.carrying = carrying;
        }
    }

    pub fn refresh_capable(&mut self, nodes: &BTreeMap<String, NodeInfo>) -> Vec<String> {
        let names: Vec<String> = if std::mem::take(&mut self.capable_stale) {
            self.relabeled.clear();
            nodes.keys().chain(&self.capable).cloned().collect()
        } else {
            std::mem::take(&mut self.relabeled).into_iter().collect()
        };
        let mut changed = Vec::new();
        for name in names {
            let capable = self.carrying.contains(&name)
                || nodes.get(&name).is_some_and(|n| {
                    self.gateway_selectors
                        .values()
                        .flatten()
                        .any(|s| s.matches(&n.labels))
                });
            let was = if capable {
                !self.capable.insert(name.clone())
            } else {
                self.capable.remove(&name)
            };
            if was != capable {
                changed.push(name);
            }
        }
        changed
    }
}

/// Puts the slots shims hold ahead of (and instead of) what `retained` says for the same slots.
pub(super) fn retain_held(retained: &mut Vec<GatewaySlot>, held: &[GatewaySlot]) {
    retained.retain(|r| {
        !held
            .iter()
            .any(|h| h.entry == r.entry && (h.slot == r.slot || h.node == r.node))
    });
    let mut merged = held.to_vec();
    merged.append(retained);
    *retained = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(1);
    const SETTLE: Duration = Duration::from_secs(6);
    const FAST: Duration = Duration::from_millis(250);
    const SLOW: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn node(name: &str, ip: &str, labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            addresses: vec![ip.parse().unwrap()],
            ready: true,
            eligible: true,
            draining: false,
            interfaces: None,
            pod_cidrs: vec![],
        }
    }

    /// `g` matches the gateway selector of policy `p`, `w` does not.
    fn nodes() -> BTreeMap<String, NodeInfo> {
        [
            node("g", "192.168.0.11", &[("egress", "yes")]),
            node("w", "192.168.0.1", &[]),
        ]
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect()
    }

    /// Liveness at `t0`, with both shims connected and told their intervals, and settled.
    fn settled(t0: Instant) -> (Liveness, BTreeMap<String, NodeInfo>) {
        let mut l = Liveness::new(GRACE, SETTLE, FAST, SLOW);
        let nodes = nodes();
        l.set_gateway_selectors("p", Some(vec![Selector::from_labels([("egress", "yes")])]));
        l.refresh_capable(&nodes);
        l.start_clock(t0);
        l.connected("g", 1, None, None, t0);
        l.connected("w", 2, None, None, t0);
        l.settle(t0, true, &nodes);
        assert!(!l.settling());
        assert!(!l.view_published("g", 1, FAST, t0));
        assert!(
            !l.view_published("w", 2, SLOW, t0),
            "told the slow interval, still ready"
        );
        (l, nodes)
    }

    fn eligible(l: &Liveness, nodes: &BTreeMap<String, NodeInfo>, name: &str) -> bool {
        l.effective(&nodes[name]).eligible
    }

    #[test]
    fn a_silent_gateway_is_no_longer_eligible_from_the_first_tick_past_its_grace_period() {
        let t0 = Instant::now();
        let (mut l, nodes) = settled(t0);
        assert!(!l.heartbeat("g", 1, t0 + ms(100)), "alive all along");
        let mut lost_at = None;
        for at in (0..=1300).step_by(10).map(ms) {
            let changed = l.tick(HashMap::new(), t0 + at);
            if !eligible(&l, &nodes, "g") {
                assert_eq!(changed, ["g"], "the tick that finds it says so");
                lost_at = Some(at);
                break;
            }
            assert!(changed.is_empty(), "{at:?}");
        }
        // Heard at 100 ms: still alive at 100 ms + grace, lost at the next tick.
        assert_eq!(lost_at, Some(ms(1110)));
        assert_eq!(l.take_lost(), HashMap::from([("g".to_owned(), t0 + ms(100))]));
        assert!(l.take_lost().is_empty());
    }

    #[test]
    fn a_reconnect_within_the_grace_period_changes_nothing() {
        let t0 = Instant::now();
        let (mut l, nodes) = settled(t0);
        l.tick(HashMap::from([(1, t0 + ms(200))]), t0 + ms(200));
        l.disconnected("g", 1);
        assert!(
            !l.connected("g", 3, None, Some((1, FAST)), t0 + ms(900)),
            "the planner need not hear of it"
        );
        // The old session's heartbeats no longer count; the new one's do.
        assert!(!l.heartbeat("g", 1, t0 + ms(1500)));
        for at in (1000..3000).step_by(100).map(ms) {
            assert!(l.tick(HashMap::from([(3, t0 + at)]), t0 + at).is_empty());
            assert!(eligible(&l, &nodes, "g"));
        }
        assert!(l.take_lost().is_empty());

        // Back only after the grace period: found silent first, then a change.
        l.disconnected("g", 3);
        assert_eq!(l.tick(HashMap::new(), t0 + ms(4000)), ["g"]);
        assert!(l.connected("g", 4, None, Some((1, FAST)), t0 + ms(4100)));
        assert!(eligible(&l, &nodes, "g"));
    }

    #[test]
    fn heartbeats_stamped_for_a_silent_shim_bring_it_back() {
        let t0 = Instant::now();
        let (mut l, nodes) = settled(t0);
        assert_eq!(l.tick(HashMap::new(), t0 + ms(1100)), ["g"]);
        // A stamp older than the grace period does not.
        assert!(
            l.tick(HashMap::from([(1, t0 + ms(50))]), t0 + ms(1200))
                .is_empty()
        );
        assert_eq!(l.tick(HashMap::from([(1, t0 + ms(1250))]), t0 + ms(1300)), ["g"]);
        assert!(eligible(&l, &nodes, "g"));
    }

    #[test]
    fn settling_ends_when_every_ready_node_is_back() {
        let t0 = Instant::now();
        let mut nodes = nodes();
        let mut down = node("down", "192.168.0.9", &[]);
        down.ready = false;
        nodes.insert("down".into(), down);
        let mut l = Liveness::new(GRACE, SETTLE, FAST, SLOW);
        l.start_clock(t0);
        // Presumed alive meanwhile, Ready or not back.
        assert!(eligible(&l, &nodes, "g"));
        assert!(!eligible(&l, &nodes, "down"));
        l.connected("w", 1, None, None, t0 + ms(100));
        assert!(l.settle(t0 + ms(100), true, &nodes).is_empty());
        assert!(l.settling());
        l.connected("g", 2, None, None, t0 + ms(300));
        // Not before the source has said everything: a node may yet appear.
        assert!(l.settle(t0 + ms(300), false, &nodes).is_empty());
        assert!(l.settling());
        assert!(l.settle(t0 + ms(300), true, &nodes).is_empty());
        assert!(!l.settling(), "the node that is not Ready is not waited for");
        assert!(l.take_lost().is_empty());
    }

    #[test]
    fn settling_ends_at_its_deadline_and_the_shims_not_back_are_lost() {
        let t0 = Instant::now();
        let (nodes, mut l) = (nodes(), Liveness::new(GRACE, SETTLE, FAST, SLOW));
        l.start_clock(t0);
        l.connected("w", 1, None, None, t0 + ms(100));
        for at in (100..SETTLE.as_millis() as u64).step_by(100).map(ms) {
            assert!(l.settle(t0 + at, true, &nodes).is_empty());
            assert!(eligible(&l, &nodes, "g"), "presumed alive at {at:?}");
        }
        assert_eq!(l.settle(t0 + SETTLE, true, &nodes), ["g"]);
        assert!(!l.settling());
        assert!(!eligible(&l, &nodes, "g"));
        assert_eq!(l.take_lost(), HashMap::from([("g".to_owned(), t0)]));
        // Over for good.
        assert!(l.settle(t0 + SETTLE * 2, true, &nodes).is_empty());
    }

    #[test]
    fn held_slots_are_taken_in_while_settling_only_and_go_before_the_retained() {
        let t0 = Instant::now();
        let nodes = nodes();
        let mut l = Liveness::new(GRACE, SETTLE, FAST, SLOW);
        l.start_clock(t0);
        let held = |slot, ip: &str| HeldDuty {
            policy: "p".into(),
            entry: 0,
            slot,
            gateway: ip.parse().unwrap(),
        };
        // Reported twice (by the pod's node and by the gateway), and one address nobody has.
        let policies = l.adopt_held(
            "w",
            vec![
                held(0, "192.168.0.11"),
                held(0, "192.168.0.11"),
                held(1, "10.9.9.9"),
            ],
        );
        assert_eq!(policies, BTreeSet::from(["p".to_owned()]));
        let slot = |slot, node: &str| GatewaySlot {
            entry: 0,
            slot,
            node: node.into(),
        };
        assert_eq!(l.held_slots("p", &nodes), [slot(0, "g")]);
        let mut retained = vec![slot(0, "w"), slot(2, "x")];
        retain_held(&mut retained, &l.held_slots("p", &nodes));
        assert_eq!(retained, [slot(0, "g"), slot(2, "x")]);

        l.settle(t0 + SETTLE, true, &nodes);
        assert!(l.held_slots("p", &nodes).is_empty());
        assert!(l.adopt_held("w", vec![held(0, "192.168.0.11")]).is_empty());
    }

    /// A gateway that keeps a moved pod's entries for its pinned flows still reports the slot it
    /// had; the node that took the slot over is reported by it and by the pod's node. The one
    /// more shims report goes first whatever the order, and the pinned flow is named with the
    /// slot its own gateway reported.
    #[test]
    fn of_two_gateways_reported_in_one_slot_the_one_more_shims_report_goes_first() {
        let t0 = Instant::now();
        let mut nodes = nodes();
        let h = node("h", "192.168.0.12", &[("egress", "yes")]);
        nodes.insert("h".into(), h);
        let held = |ip: &str| HeldDuty {
            policy: "p".into(),
            entry: 0,
            slot: 0,
            gateway: ip.parse().unwrap(),
        };
        let slot = |node: &str| GatewaySlot {
            entry: 0,
            slot: 0,
            node: node.into(),
        };
        for old_first in [true, false] {
            let mut l = Liveness::new(GRACE, SETTLE, FAST, SLOW);
            l.start_clock(t0);
            let reports = [
                ("g", held("192.168.0.11")),
                ("h", held("192.168.0.12")),
                ("w", held("192.168.0.12")),
            ];
            let order: Vec<_> = if old_first {
                reports.to_vec()
            } else {
                reports.iter().rev().cloned().collect()
            };
            for (node, d) in order {
                l.adopt_held(node, vec![d]);
            }
            // Reported again by the same shim (a reconnection): counted once.
            l.adopt_held("g", vec![held("192.168.0.11")]);
            assert_eq!(l.held_slots("p", &nodes), [slot("h"), slot("g")]);
            l.adopt_pinned(vec![HeldPod {
                policy: "p".into(),
                pod: "10.1.0.10".parse().unwrap(),
                gateway: "192.168.0.11".parse().unwrap(),
            }]);
            l.settle(t0 + SETTLE, true, &nodes);
            assert_eq!(
                l.take_pinned(&nodes),
                [(
                    "p".to_owned(),
                    "10.1.0.10".parse().unwrap(),
                    "g".to_owned(),
                    Some((0, 0))
                )]
            );
            assert!(l.take_pinned(&nodes).is_empty(), "taken once");
        }
    }

    #[test]
    fn nodes_that_cannot_be_gateways_heartbeat_slowly_and_get_four_slow_intervals() {
        let t0 = Instant::now();
        let (mut l, nodes) = settled(t0);
        assert_eq!(l.heartbeat_interval("g"), FAST);
        assert_eq!(l.heartbeat_interval("w"), SLOW);
        let silent_for = |l: &mut Liveness, at: Duration| l.tick(HashMap::new(), t0 + at);
        assert_eq!(silent_for(&mut l, GRACE + ms(1)), ["g"]);
        assert!(silent_for(&mut l, SLOW * 4).is_empty());
        assert_eq!(silent_for(&mut l, SLOW * 4 + ms(1)), ["w"]);
        assert!(!eligible(&l, &nodes, "w"));
    }

    #[test]
    fn a_node_that_becomes_capable_is_a_gateway_at_once_and_judged_fast_once_acknowledged() {
        let t0 = Instant::now();
        let (mut l, mut nodes) = settled(t0);
        // Told the slow interval, it serves no policy; it would be a candidate the moment one
        // selected it (told the fast interval in that same flush).
        assert!(eligible(&l, &nodes, "w"));
        // Nor does a new session change that: it is sent the same view.
        assert!(!l.connected("w", 2, None, Some((2, SLOW)), t0));
        assert!(eligible(&l, &nodes, "w"));

        nodes.get_mut("w").unwrap().labels = [("egress".to_owned(), "yes".to_owned())].into();
        l.relabeled("w");
        assert_eq!(l.refresh_capable(&nodes), ["w"]);
        assert_eq!(l.heartbeat_interval("w"), FAST);
        assert!(l.refresh_capable(&nodes).is_empty());
        // Told the fast interval: still ready (a live shim acknowledges in milliseconds), so
        // that a new policy's pods spread over every gateway from the start.
        assert!(!l.view_published("w", 5, FAST, t0));
        assert!(eligible(&l, &nodes, "w"), "on its way to the fast interval");
        // Neither a later view nor an older acknowledgement is the one telling it.
        assert!(!l.view_published("w", 6, FAST, t0 + ms(5)));
        assert_eq!(l.ack("w", 2, 1, vec![], 6, t0 + ms(10)), Some(false));
        assert!(eligible(&l, &nodes, "w"));
        assert_eq!(l.ack("w", 2, 5, vec![], 6, t0 + ms(20)), Some(false));
        assert!(eligible(&l, &nodes, "w"));
        // Now judged by the grace period.
        assert_eq!(l.tick(HashMap::new(), t0 + ms(20) + GRACE), ["g"]);
        assert_eq!(l.tick(HashMap::new(), t0 + ms(20) + GRACE + ms(1)), ["w"]);
    }

    #[test]
    fn a_shim_that_does_not_acknowledge_the_fast_interval_in_time_is_not_ready() {
        let t0 = Instant::now();
        let (mut l, mut nodes) = settled(t0);
        nodes.get_mut("w").unwrap().labels = [("egress".to_owned(), "yes".to_owned())].into();
        l.relabeled("w");
        assert_eq!(l.refresh_capable(&nodes), ["w"]);
        assert!(!l.view_published("w", 5, FAST, t0));
        assert!(eligible(&l, &nodes, "w"));
        // Due when the grace period after the view ends.
        assert!(l.next_due(t0).is_some_and(|d| d <= t0 + GRACE + ms(1)));
        // Heartbeats at the slow pace keep it alive, but not ready past the grace period.
        let heard = |at| HashMap::from([(1u64, at), (2u64, at)]);
        assert!(l.tick(heard(t0 + GRACE), t0 + GRACE).is_empty());
        assert!(eligible(&l, &nodes, "w"));
        assert_eq!(l.tick(heard(t0 + GRACE), t0 + GRACE + ms(1)), ["w"]);
        assert!(
            !eligible(&l, &nodes, "w"),
            "no acknowledgement within the grace period"
        );
        // The acknowledgement, late, makes it ready.
        assert_eq!(l.ack("w", 2, 5, vec![], 5, t0 + GRACE + ms(2)), Some(true));
        assert!(eligible(&l, &nodes, "w"));
    }

    #[test]
    fn a_policy_change_changes_which_nodes_are_capable() {
        let t0 = Instant::now();
        let (mut l, nodes) = settled(t0);
        l.set_gateway_selectors("q", Some(vec![Selector::default()]));
        let mut changed = l.refresh_capable(&nodes);
        changed.sort();
        assert_eq!(changed, ["w"], "the empty selector matches every node");
        // The same selectors again change nothing.
        l.set_gateway_selectors("q", Some(vec![Selector::default()]));
        assert!(l.refresh_capable(&nodes).is_empty());
        l.set_gateway_selectors("q", None);
        l.set_gateway_selectors("p", None);
        let mut changed = l.refresh_capable(&nodes);
        changed.sort();
        assert_eq!(changed, ["g", "w"]);
        assert_eq!(l.heartbeat_interval("g"), SLOW);
    }
}
