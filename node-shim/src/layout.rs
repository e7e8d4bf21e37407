//! How a node's entries, (source pod, destination prefix) -> target, are laid out in the
//! datapath's maps so that their size grows as pods + CIDRs instead of pods x CIDRs.
//!
//! Every pod gets one source entry: its source group and its targets (where its traffic goes:
//! which gateway, or none, or fallback; policies that send it the same way share one target). A
//! source group is the set of destination rules the pod's entries share, (prefix -> policy and
//! excluded, or policy and "the target at position i"); pods selected by the same policies share
//! one, whatever gateway each is assigned to, because targets are numbered in the order of the
//! first policy using each. The destinations map holds each group's rules once. A lookup is:
//! source -> group, (group, destination) by longest prefix -> target index, then the source's
//! target: the same answer as a longest-prefix match over that pod's entries.
//!
//! Which gateway fills which policy slot (an entry's `gateway_slot`) is kept apart, once per
//! (policy, slot), in the held slots map: the datapath never reads it.
//!
//! Group ids are local to the node. A group keeps its id while any pod uses it, and an id is
//! reused only after the group it named is gone from the maps, so rewriting the maps never
//! changes what a group id means under a running packet.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use crate::maps::{
    self, DEST_DROP, DEST_EXCLUDED, DEST_TARGET, DestinationKeyV4, DestinationV4, EntryValueV4,
    KIND_EXCLUDED, PolicyKeyV4, SOURCE_TARGETS, SlotKeyV4, SourceV4, TargetV4,
};

/// Capacity of the held slots map (`sluice_held_slots_v4`).
pub const HELD_SLOTS_MAX: u32 = 65_536;

/// What the sources and destinations maps hold (or must hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Pod IP (network byte order) -> its group and targets.
    pub sources: BTreeMap<u32, SourceV4>,
    pub destinations: BTreeMap<DestinationKeyV4, DestinationV4>,
    /// (policy id, gateway slot) -> the gateway filling it (network byte order).
    pub slots: BTreeMap<SlotKeyV4, u32>,
}

/// An entry the layout cannot hold as planned: its pod has more distinct targets (policies)
/// than a source entry has room for. It is laid out to drop (fail closed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub source: Ipv4Addr,
    pub destination: Ipv4Net,
}

impl Overflow {
    /// Why the entry is not programmed as planned.
    pub fn message(&self) -> String {
        format!(
            "pod {} is sent more than {SOURCE_TARGETS} distinct ways (gateways) by its policies: \
             traffic to {} is dropped (fail closed) until fewer policies select the pod",
            self.source, self.destination
        )
    }
}

/// One group's rules, in a canonical order: (prefix length, destination, rule).
type Rules = Vec<(u32, u32, DestinationV4)>;

/// The answer of a lookup, as the datapath's `policy_lookup` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No entry: not Sluice's packet.
    None,
    /// An entry that drops (no room for its target).
    Drop,
    /// The entry's value (kind [`KIND_EXCLUDED`] for an excluded destination; slot unknown).
    Target(EntryValueV4),
}

impl Layout {
    /// Lays out `entries` (expanded, as [`Layout::expand`] gives them back), keeping the group
    /// ids of `current` for the groups that stay. Returns the entries that overflowed.
    pub fn of(entries: &BTreeMap<PolicyKeyV4, EntryValueV4>, current: &Layout) -> (Layout, Vec<Overflow>) {
        let mut by_source: BTreeMap<u32, Vec<(u32, u32, EntryValueV4)>> = BTreeMap::new();
        for (key, target) in entries {
            by_source
                .entry(key.saddr)
                .or_default()
                .push((key.prefixlen, key.daddr, *target));
        }
        let existing = current.groups();
        let mut ids: HashMap<Rules, u32> = existing.iter().map(|(id, rules)| (rules.clone(), *id)).collect();
        let taken: BTreeSet<u32> = existing.keys().copied().collect();
        let mut next_id = 1u32;
        let mut emitted = BTreeSet::new();
        let mut out = Layout::default();
        let mut overflow = Vec::new();

        for (source, list) in by_source {
            // Distinct targets, numbered by the first policy using each, so that pods of the
            // same policies number them alike whatever gateways they are assigned.
            let mut first_use: BTreeMap<TargetV4, u32> = BTreeMap::new();
            for (_, _, e) in list.iter().filter(|(_, _, e)| e.kind != KIND_EXCLUDED) {
                let used = first_use.entry(TargetV4::of(e)).or_insert(e.policy_id);
                *used = (*used).min(e.policy_id);
                if e.gateway_slot != 0 {
                    let key = SlotKeyV4 {
                        policy_id: e.policy_id,
                        gateway_slot: e.gateway_slot,
                    };
                    out.slots.insert(key, e.gateway_ip);
                }
            }
            let mut targets: Vec<(u32, TargetV4)> = first_use.into_iter().map(|(t, p)| (p, t)).collect();
            targets.sort_unstable();
            let targets: Vec<TargetV4> = targets.into_iter().map(|(_, t)| t).collect();
            let mut rules: Rules = list
                .iter()
                .map(|(prefixlen, daddr, t)| {
                    let rule = if t.kind == KIND_EXCLUDED {
                        DestinationV4 {
                            kind: DEST_EXCLUDED,
                            policy_id: t.policy_id,
                            target: 0,
                        }
                    } else {
                        let i = targets
                            .iter()
                            .position(|x| *x == TargetV4::of(t))
                            .expect("collected above");
                        if i < SOURCE_TARGETS {
                            DestinationV4 {
                                kind: DEST_TARGET,
                                policy_id: t.policy_id,
                                target: i as u32,
                            }
                        } else {
                            let key = PolicyKeyV4 {
                                prefixlen: *prefixlen,
                                saddr: source,
                                daddr: *daddr,
                            };
                            overflow.push(Overflow {
                                source: key.source(),
                                destination: key.destination(),
                            });
                            DestinationV4 {
                                kind: DEST_DROP,
                                policy_id: t.policy_id,
                                target: 0,
                            }
                        }
                    };
                    (*prefixlen, *daddr, rule)
                })
                .collect();
            rules.sort_unstable();
            let group = match ids.get(&rules) {
                Some(id) => *id,
                None => {
                    while taken.contains(&next_id) || emitted.contains(&next_id) {
                        next_id += 1;
                    }
                    ids.insert(rules.clone(), next_id);
                    next_id
                }
            };
            if emitted.insert(group) {
                for (prefixlen, daddr, rule) in &rules {
                    let key = DestinationKeyV4 {
                        prefixlen: *prefixlen,
                        group,
                        daddr: *daddr,
                    };
                    out.destinations.insert(key, *rule);
                }
            }
            let mut value = SourceV4 {
                group,
                ..Default::default()
            };
            for (slot, target) in value.targets.iter_mut().zip(&targets) {
                *slot = *target;
            }
            out.sources.insert(source, value);
        }
        (out, overflow)
    }

    /// Every group's rules, by group id.
    fn groups(&self) -> BTreeMap<u32, Rules> {
        let mut groups: BTreeMap<u32, Rules> = BTreeMap::new();
        for (key, rule) in &self.destinations {
            groups
                .entry(key.group)
                .or_default()
                .push((key.prefixlen, key.daddr, *rule));
        }
        for rules in groups.values_mut() {
            rules.sort_unstable();
        }
        groups
    }

    /// The number of distinct source groups.
    pub fn group_count(&self) -> usize {
        self.destinations
            .keys()
            .map(|k| k.group)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Which gateway each of this node's own pods is steered to, per policy: (pod, policy id,
    /// gateway), network byte order, each once. A gateway's targets for other nodes' pods
    /// (`peer_ip` set) are left out: those nodes report their pods.
    pub fn assignments(&self) -> BTreeSet<(u32, u32, u32)> {
        let groups = self.groups();
        let mut out = BTreeSet::new();
        for (saddr, source) in &self.sources {
            for (_, _, rule) in groups.get(&source.group).into_iter().flatten() {
                if rule.kind != DEST_TARGET {
                    continue;
                }
                if let Some(t) = source.targets.get(rule.target as usize)
                    && t.kind == maps::KIND_GATEWAY
                    && t.gateway_ip != 0
                    && t.peer_ip == 0
                {
                    out.insert((*saddr, rule.policy_id, t.gateway_ip));
                }
            }
        }
        out
    }

    /// The entries as users think of them, (source, destination) -> value; a destination that
    /// drops for want of room in its source entry reads as kind 0. Slots are not per entry
    /// here (see [`Layout::slots`]): `gateway_slot` reads 0.
    pub fn expand(&self) -> BTreeMap<PolicyKeyV4, EntryValueV4> {
        let groups = self.groups();
        let mut out = BTreeMap::new();
        for (saddr, source) in &self.sources {
            for (prefixlen, daddr, rule) in groups.get(&source.group).into_iter().flatten() {
                let key = PolicyKeyV4 {
                    prefixlen: *prefixlen,
                    saddr: *saddr,
                    daddr: *daddr,
                };
                let target = match rule.kind {
                    DEST_EXCLUDED => EntryValueV4 {
                        kind: KIND_EXCLUDED,
                        policy_id: rule.policy_id,
                        ..Default::default()
                    },
                    DEST_TARGET => match source.targets.get(rule.target as usize) {
                        Some(t) if t.kind != 0 => t.entry(rule.policy_id),
                        _ => continue,
                    },
                    _ => EntryValueV4 {
                        policy_id: rule.policy_id,
                        ..Default::default()
                    },
                };
                out.insert(key, target);
            }
        }
        out
    }

    /// What the datapath finds for a packet from `source` to `destination` (its
    /// `policy_lookup`, for tests and tools).
    pub fn lookup(&self, source: Ipv4Addr, destination: Ipv4Addr) -> Lookup {
        let Some(src) = self.sources.get(&maps::be(source)) else {
            return Lookup::None;
        };
        let best = self
            .destinations
            .iter()
            .filter(|(k, _)| k.group == src.group && k.destination().contains(&destination))
            .max_by_key(|(k, _)| k.prefixlen);
        let Some((_, rule)) = best else {
            return Lookup::None;
        };
        match rule.kind {
            DEST_EXCLUDED => Lookup::Target(EntryValueV4 {
                kind: KIND_EXCLUDED,
                policy_id: rule.policy_id,
                ..Default::default()
            }),
            DEST_TARGET => match src.targets.get(rule.target as usize) {
                Some(t) if t.kind != 0 => Lookup::Target(t.entry(rule.policy_id)),
                Some(_) => Lookup::None,
                None => Lookup::Drop,
            },
            _ => Lookup::Drop,
        }
    }

    /// Whether the maps, holding `self` and moving to `next`, fit capacities of `sources` and
    /// `destinations` entries at every step of the move (new groups are written before old ones
    /// are deleted, so both are held for a moment). `Err` names the map that does not fit.
    pub fn fits(&self, next: &Layout, sources: u32, destinations: u32) -> Result<(), MapFull> {
        MapFull::check(
            maps::SOURCES_V4,
            held_while_moving(&self.sources, &next.sources),
            sources,
            "--source-map-max",
        )?;
        MapFull::check(
            maps::HELD_SLOTS_V4,
            held_while_moving(&self.slots, &next.slots),
            HELD_SLOTS_MAX,
            "fewer gateway slots",
        )?;
        MapFull::check(
            maps::DESTINATIONS_V4,
            held_while_moving(&self.destinations, &next.destinations),
            destinations,
            "--policy-map-max",
        )
    }
}

/// Entries a map holds at its fullest while moving from `from` to `to` (upserts come first).
pub fn held_while_moving<K: Ord, V>(from: &BTreeMap<K, V>, to: &BTreeMap<K, V>) -> usize {
    from.len() + to.keys().filter(|k| !from.contains_key(*k)).count()
}

/// The pods whose entries differ between what the maps hold (`held`, as [`Layout::expand`] gives
/// it: without slots) and a plan's entries (`wanted`). When a plan is refused, these pods stop
/// counting as decided: whatever the plan would have changed for them fails closed.
pub fn changed_sources(
    held: &BTreeMap<PolicyKeyV4, EntryValueV4>,
    wanted: &BTreeMap<PolicyKeyV4, EntryValueV4>,
) -> BTreeSet<Ipv4Addr> {
    let comparable = |v: &EntryValueV4| EntryValueV4 {
        gateway_slot: 0,
        ..*v
    };
    let mut changed = BTreeSet::new();
    for (key, value) in wanted {
        if held.get(key).map(comparable) != Some(comparable(value)) {
            changed.insert(key.source());
        }
    }
    changed.extend(
        held.keys()
            .filter(|k| !wanted.contains_key(*k))
            .map(PolicyKeyV4::source),
    );
    changed
}

/// A plan that does not fit a map.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "map full: {map} would need {needed} entries while moving to this plan, its capacity is \
     {capacity} (raise {flag}); the node keeps its previous entries"
)]
pub struct MapFull {
    pub map: &'static str,
    pub needed: usize,
    pub capacity: u32,
    pub flag: &'static str,
}

impl MapFull {
    /// `Err` when `needed` entries do not fit `map`'s `capacity`; `flag` says what to raise.
    pub fn check(map: &'static str, needed: usize, capacity: u32, flag: &'static str) -> Result<(), MapFull> {
        if needed > capacity as usize {
            return Err(MapFull {
                map,
                needed,
                capacity,
                flag,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{KIND_GATEWAY, KIND_NONE};

    fn target(policy_id: u32, gateway: u8) -> EntryValueV4 {
        EntryValueV4 {
            kind: if gateway == 0 { KIND_NONE } else { KIND_GATEWAY },
            gateway_ip: maps::be(Ipv4Addr::new(192, 0, 2, gateway)),
            policy_id,
            ..Default::default()
        }
    }

    fn excluded(policy_id: u32) -> EntryValueV4 {
        EntryValueV4 {
            kind: KIND_EXCLUDED,
            policy_id,
            ..Default::default()
        }
    }

    fn key(source: &str, destination: &str) -> PolicyKeyV4 {
        PolicyKeyV4::new(source.parse().unwrap(), destination.parse().unwrap())
    }

    #[test]
    fn pods_of_the_same_policies_share_a_group_whatever_their_gateway() {
        let mut entries = BTreeMap::new();
        for pod in 1..=100u8 {
            let source = format!("10.244.1.{pod}");
            for cidr in 0..50u8 {
                // Pods spread over two gateways of policy 1.
                entries.insert(
                    key(&source, &format!("198.18.{cidr}.0/24")),
                    target(1, 11 + pod % 2),
                );
            }
            entries.insert(key(&source, "198.18.7.128/25"), excluded(1));
        }
        let (layout, overflow) = Layout::of(&entries, &Layout::default());
        assert!(overflow.is_empty());
        assert_eq!(layout.sources.len(), 100);
        assert_eq!(layout.destinations.len(), 51, "pods + CIDRs, not pods x CIDRs");
        assert_eq!(layout.group_count(), 1);
        assert_eq!(layout.expand(), entries);
        assert_eq!(
            layout.lookup("10.244.1.3".parse().unwrap(), "198.18.9.9".parse().unwrap()),
            Lookup::Target(target(1, 12))
        );
        assert_eq!(
            layout.lookup("10.244.1.3".parse().unwrap(), "198.18.7.200".parse().unwrap()),
            Lookup::Target(excluded(1))
        );
        assert_eq!(
            layout.lookup("10.244.1.3".parse().unwrap(), "198.19.0.1".parse().unwrap()),
            Lookup::None
        );
    }

    #[test]
    fn groups_keep_their_ids_and_ids_are_not_reused_while_held() {
        let a = BTreeMap::from([
            (key("10.0.0.1", "1.0.0.0/8"), target(1, 11)),
            (key("10.0.0.2", "2.0.0.0/8"), target(2, 11)),
        ]);
        let (first, _) = Layout::of(&a, &Layout::default());
        let group = |l: &Layout, ip: &str| l.sources[&maps::be(ip.parse().unwrap())].group;
        assert_ne!(group(&first, "10.0.0.1"), group(&first, "10.0.0.2"));
        // Pod 1 moves to a new group; pod 2's stays, and the new one takes neither held id.
        let b = BTreeMap::from([
            (key("10.0.0.1", "3.0.0.0/8"), target(1, 11)),
            (key("10.0.0.2", "2.0.0.0/8"), target(2, 11)),
        ]);
        let (second, _) = Layout::of(&b, &first);
        assert_eq!(group(&second, "10.0.0.2"), group(&first, "10.0.0.2"));
        assert!(
            ![group(&first, "10.0.0.1"), group(&first, "10.0.0.2")].contains(&group(&second, "10.0.0.1"))
        );
        assert_eq!(second.expand(), b);
        // Laying out the same entries again changes nothing.
        assert_eq!(Layout::of(&b, &second).0, second);
    }

    /// What a shim reports as its pods' gateways: its own pods' (one per policy, however many
    /// destinations), not the other nodes' pods it serves as a gateway, nor pods without one.
    #[test]
    fn assignments_are_the_own_pods_gateways_per_policy() {
        let mut entries = BTreeMap::new();
        for i in 1..=2 {
            entries.insert(key("10.0.0.1", &format!("198.18.{i}.0/24")), target(1, 11));
            entries.insert(key("10.0.0.1", &format!("198.19.{i}.0/24")), target(2, 13));
        }
        let mut served = target(1, 12);
        served.peer_ip = maps::be(Ipv4Addr::new(192, 168, 0, 9));
        entries.insert(key("10.0.9.9", "198.18.1.0/24"), served);
        entries.insert(key("10.0.0.2", "198.18.1.0/24"), target(1, 0));
        let (layout, _) = Layout::of(&entries, &Layout::default());
        let be = |ip: &str| maps::be(ip.parse().unwrap());
        assert_eq!(
            layout.assignments(),
            [
                (be("10.0.0.1"), 1, be("192.0.2.11")),
                (be("10.0.0.1"), 2, be("192.0.2.13")),
            ]
            .into()
        );
    }

    #[test]
    fn a_pod_of_too_many_policies_drops_the_rest_and_says_so() {
        // Ten policies, each through its own gateway: ten distinct targets.
        let entries: BTreeMap<_, _> = (1..=10u32)
            .map(|p| {
                (
                    key("10.0.0.1", &format!("198.18.{p}.0/24")),
                    target(p, 10 + p as u8),
                )
            })
            .collect();
        let (layout, overflow) = Layout::of(&entries, &Layout::default());
        assert_eq!(overflow.len(), 2);
        assert!(overflow[0].message().contains("more than 8 distinct ways"));
        assert_eq!(
            layout.lookup("10.0.0.1".parse().unwrap(), "198.18.10.1".parse().unwrap()),
            Lookup::Drop
        );
        assert_eq!(
            layout.lookup("10.0.0.1".parse().unwrap(), "198.18.8.1".parse().unwrap()),
            Lookup::Target(target(8, 18))
        );
    }

    #[test]
    fn policies_sending_a_pod_the_same_way_share_one_target_and_slots_are_kept_apart() {
        // 60 policies of 100 CIDRs each, through one gateway, for two pods.
        let mut entries = BTreeMap::new();
        for policy in 1..=60u32 {
            for pod in ["10.0.0.1", "10.0.0.2"] {
                for cidr in 0..100u32 {
                    let destination =
                        Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + ((policy * 100 + cidr) << 8)), 24).unwrap();
                    let mut value = target(policy, 13);
                    value.gateway_slot = maps::encode_slot(0, 0);
                    entries.insert(PolicyKeyV4::new(pod.parse().unwrap(), destination), value);
                }
            }
        }
        let (layout, overflow) = Layout::of(&entries, &Layout::default());
        assert!(overflow.is_empty());
        assert_eq!((layout.sources.len(), layout.destinations.len()), (2, 6_000));
        let source = layout.sources[&maps::be("10.0.0.1".parse().unwrap())];
        assert_eq!(source.targets.iter().filter(|t| t.kind != 0).count(), 1);
        assert_eq!(layout.slots.len(), 60, "one slot per policy");
        assert!(
            layout
                .slots
                .values()
                .all(|ip| *ip == maps::be(Ipv4Addr::new(192, 0, 2, 13)))
        );
        let without_slots: BTreeMap<_, _> = entries
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    EntryValueV4 {
                        gateway_slot: 0,
                        ..*v
                    },
                )
            })
            .collect();
        assert_eq!(layout.expand(), without_slots);
    }

    #[test]
    fn changed_sources_are_the_pods_a_plan_would_change_whatever_the_slots() {
        let held = BTreeMap::from([
            (key("10.0.0.1", "1.0.0.0/8"), target(1, 11)),
            (key("10.0.0.2", "1.0.0.0/8"), target(1, 11)),
            (key("10.0.0.3", "1.0.0.0/8"), target(1, 11)),
            (key("10.0.0.4", "1.0.0.0/8"), target(1, 11)),
        ]);
        let mut wanted = held.clone();
        // .1: the same, but with its slot (which `expand` does not give back).
        wanted
            .get_mut(&key("10.0.0.1", "1.0.0.0/8"))
            .unwrap()
            .gateway_slot = maps::encode_slot(0, 1);
        // .2: another gateway; .3: a new destination; .4: gone; .5: new.
        wanted.insert(key("10.0.0.2", "1.0.0.0/8"), target(1, 12));
        wanted.insert(key("10.0.0.3", "2.0.0.0/8"), target(1, 11));
        wanted.remove(&key("10.0.0.4", "1.0.0.0/8"));
        wanted.insert(key("10.0.0.5", "1.0.0.0/8"), target(1, 11));
        let changed: Vec<String> = changed_sources(&held, &wanted)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(changed, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        assert!(changed_sources(&held, &held).is_empty());
    }

    #[test]
    fn capacity_counts_old_and_new_groups_held_together() {
        let a = BTreeMap::from([(key("10.0.0.1", "1.0.0.0/8"), target(1, 11))]);
        let b = BTreeMap::from([(key("10.0.0.1", "2.0.0.0/8"), target(1, 11))]);
        let (first, _) = Layout::of(&a, &Layout::default());
        let (second, _) = Layout::of(&b, &first);
        assert_eq!(first.fits(&second, 1, 2), Ok(()));
        let full = first.fits(&second, 1, 1).unwrap_err();
        assert_eq!((full.map, full.needed), (maps::DESTINATIONS_V4, 2));
        assert!(full.to_string().contains("--policy-map-max"), "{full}");
        assert_eq!(
            Layout::default().fits(&second, 0, 9).unwrap_err().map,
            maps::SOURCES_V4
        );
    }

    proptest::proptest! {
        /// Whatever the entries, a lookup in the layout answers what a longest-prefix match
        /// over the pod's own entries answers (the (source, destination) trie it replaces), and
        /// moving from any layout to any other keeps that true.
        #[test]
        fn lookups_agree_with_a_trie_of_the_entries(
            before in proptest::collection::vec((0u8..6, 0u8..4, 0u8..3, 0u8..4, proptest::bool::ANY), 0..40),
            after in proptest::collection::vec((0u8..6, 0u8..4, 0u8..3, 0u8..4, proptest::bool::ANY), 0..40),
            probes in proptest::collection::vec((0u8..6, 0u8..255), 1..30),
        ) {
            // One target per (pod, policy), as plans have: the gateway the pod is assigned to.
            let entries = |raw: &[(u8, u8, u8, u8, bool)]| -> BTreeMap<PolicyKeyV4, EntryValueV4> {
                raw.iter()
                    .map(|&(pod, net, len, policy, is_excluded)| {
                        let destination = format!("198.18.{}.0/{}", net * 64, [18, 24, 26][len as usize]);
                        let id = u32::from(policy) + 1;
                        let t = if is_excluded { excluded(id) } else { target(id, (pod * 3 + policy) % 4) };
                        (key(&format!("10.0.0.{pod}"), &destination), t)
                    })
                    .collect()
            };
            let (first, _) = Layout::of(&entries(&before), &Layout::default());
            let want = entries(&after);
            let (second, overflow) = Layout::of(&want, &first);
            proptest::prop_assert!(overflow.is_empty());
            proptest::prop_assert_eq!(second.expand(), want.clone());
            for (pod, last) in probes {
                let (source, destination) = (Ipv4Addr::new(10, 0, 0, pod), Ipv4Addr::new(198, 18, last, 1));
                let trie = want
                    .iter()
                    .filter(|(k, _)| k.source() == source && k.destination().contains(&destination))
                    .max_by_key(|(k, _)| k.prefixlen)
                    .map_or(Lookup::None, |(_, t)| Lookup::Target(*t));
                proptest::prop_assert_eq!(second.lookup(source, destination), trie);
            }
            // Group ids that both layouts use mean the same rules in both.
            let (old, new) = (first.groups(), second.groups());
            for (id, rules) in &new {
                if let Some(was) = old.get(id) {
                    proptest::prop_assert_eq!(was, rules);
                }
            }
        }
    }
}
