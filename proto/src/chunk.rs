//! Plans and deltas of any size, in messages of bounded size.
//!
//! A node's plan grows with its pods and destinations (a gateway of 120,000 entries has a plan
//! of 9 MB), while a gRPC message must fit the peer's decode limit. So the operator splits a plan
//! or delta into chunks ([`Chunks`]) of at most [`CHUNK_BUDGET`] encoded bytes, each but the last
//! marked `continued`, and the shim puts them back together ([`Assembler`]) before it takes any
//! of it: a plan or delta is applied whole or not at all. The wire rules are in `node.proto`.

use std::{fmt, iter::Peekable, vec};

use prost::Message as _;

use crate::v2::{self, operator_message};

/// How many encoded bytes the operator puts in one chunk (a chunk goes beyond it only when it
/// holds a single item larger than that).
pub const CHUNK_BUDGET: usize = 1 << 20;

/// A plan or a delta: a whole one, or one chunk of it.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Plan(v2::NodePlan),
    Delta(v2::NodeDelta),
}

impl Part {
    /// The plan or delta an operator message carries, if any (not a heartbeat).
    pub fn from_message(message: operator_message::Message) -> Option<Part> {
        match message {
            operator_message::Message::Plan(p) => Some(Part::Plan(p)),
            operator_message::Message::Delta(d) => Some(Part::Delta(d)),
            operator_message::Message::Heartbeat(_) => None,
        }
    }

    /// Whether more chunks of the same plan or delta follow this one.
    pub fn continued(&self) -> bool {
        match self {
            Part::Plan(p) => p.continued,
            Part::Delta(d) => d.continued,
        }
    }

    fn which(&self) -> Which {
        match self {
            Part::Plan(p) => Which::Plan {
                generation: p.generation,
            },
            Part::Delta(d) => Which::Delta {
                generation: d.generation,
                base: d.base_generation,
            },
        }
    }
}

impl From<Part> for v2::OperatorMessage {
    fn from(part: Part) -> Self {
        let message = match part {
            Part::Plan(p) => operator_message::Message::Plan(p),
            Part::Delta(d) => operator_message::Message::Delta(d),
        };
        v2::OperatorMessage {
            message: Some(message),
        }
    }
}

/// Which plan or delta a chunk belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Plan { generation: u64 },
    Delta { generation: u64, base: u64 },
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Which::Plan { generation } => write!(f, "the plan of generation {generation}"),
            Which::Delta { generation, base } => {
                write!(f, "the delta from generation {base} to {generation}")
            }
        }
    }
}

/// A chunk that does not continue the plan or delta being put together: the operator broke the
/// protocol, and the session must start over.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "protocol error: a chunk of {got} arrived while {assembling} was incomplete ({chunks} chunks \
     of it received)"
)]
pub struct Interleaved {
    pub assembling: Which,
    pub got: Which,
    pub chunks: usize,
}

/// A plan or delta whose last chunk arrived.
#[derive(Clone, Debug, PartialEq)]
pub struct Assembled {
    pub part: Part,
    /// How many chunks it came in.
    pub chunks: usize,
}

/// Puts chunks back together. Dropping it drops what was received of an incomplete plan or
/// delta, which is what a session that ends mid-way must do.
#[derive(Debug, Default)]
pub struct Assembler {
    partial: Option<(Part, usize)>,
}

impl Assembler {
    /// Takes the next chunk; returns the plan or delta once its last chunk is in.
    pub fn push(&mut self, chunk: Part) -> Result<Option<Assembled>, Interleaved> {
        let (whole, chunks) = match self.partial.take() {
            None => (chunk, 1),
            Some((mut acc, chunks)) => {
                if acc.which() != chunk.which() {
                    return Err(Interleaved {
                        assembling: acc.which(),
                        got: chunk.which(),
                        chunks,
                    });
                }
                match (&mut acc, chunk) {
                    (Part::Plan(acc), Part::Plan(chunk)) => extend_plan(acc, chunk),
                    (Part::Delta(acc), Part::Delta(chunk)) => extend_delta(acc, chunk),
                    _ => unreachable!("same kind: `which` compared equal"),
                }
                (acc, chunks + 1)
            }
        };
        if whole.continued() {
            self.partial = Some((whole, chunks));
            return Ok(None);
        }
        Ok(Some(Assembled { part: whole, chunks }))
    }

    /// Whether part of a plan or delta was received and the rest has not.
    pub fn is_assembling(&self) -> bool {
        self.partial.is_some()
    }
}

fn extend_plan(acc: &mut v2::NodePlan, chunk: v2::NodePlan) {
    acc.policies.extend(chunk.policies);
    acc.entries.extend(chunk.entries);
    acc.serves.extend(chunk.serves);
    acc.cluster_cidrs.extend(chunk.cluster_cidrs);
    acc.pinnable_gateways.extend(chunk.pinnable_gateways);
    extend_guard(&mut acc.guard, chunk.guard);
    if acc.heartbeat_interval_ms == 0 {
        acc.heartbeat_interval_ms = chunk.heartbeat_interval_ms;
    }
    acc.continued = chunk.continued;
}

fn extend_delta(acc: &mut v2::NodeDelta, chunk: v2::NodeDelta) {
    acc.guard_unchanged |= chunk.guard_unchanged;
    if chunk.guard_change.is_some() {
        acc.guard_change = chunk.guard_change;
    }
    acc.cluster_cidrs_unchanged |= chunk.cluster_cidrs_unchanged;
    acc.policies.extend(chunk.policies);
    acc.removals.extend(chunk.removals);
    acc.upserts.extend(chunk.upserts);
    acc.serves.extend(chunk.serves);
    acc.cluster_cidrs.extend(chunk.cluster_cidrs);
    acc.pinnable_gateways.extend(chunk.pinnable_gateways);
    extend_guard(&mut acc.guard, chunk.guard);
    if acc.heartbeat_interval_ms == 0 {
        acc.heartbeat_interval_ms = chunk.heartbeat_interval_ms;
    }
    acc.continued = chunk.continued;
}

fn extend_guard(acc: &mut Option<v2::Guard>, chunk: Option<v2::Guard>) {
    if let Some(chunk) = chunk {
        let acc = acc.get_or_insert_default();
        acc.destinations.extend(chunk.destinations);
        acc.decided_pods.extend(chunk.decided_pods);
    }
}

/// What is left of one list of a plan or delta.
type Items<T> = Peekable<vec::IntoIter<T>>;

/// The chunks of one plan or delta, in order, each at most `budget` encoded bytes (as an
/// `OperatorMessage`) or a single item. Lists are taken in a fixed order, short ones first:
/// policies, serves, cluster CIDRs, the guard's destinations and decided pods, removals, entries
/// (upserts).
pub struct Chunks {
    budget: usize,
    head: Which,
    heartbeat_interval_ms: u32,
    /// A delta's `guard_unchanged` and `cluster_cidrs_unchanged`, in every chunk.
    unchanged: (bool, bool),
    /// A delta's guard change: small, whole in the first chunk.
    guard_change: Option<v2::GuardChange>,
    first: bool,
    finished: bool,
    /// Whole in the first chunk (a handful of gateways).
    pinnable: Vec<Vec<u8>>,
    policies: Items<String>,
    serves: Items<v2::GatewayDuty>,
    cluster_cidrs: Items<v2::Prefix>,
    /// `Some` when the plan or delta has a guard: (destinations, decided pods).
    guard: Option<(Items<v2::Prefix>, Items<Vec<u8>>)>,
    removals: Items<v2::EntryKey>,
    entries: Items<v2::Entry>,
}

/// What the header of a chunk may grow by beyond what it encodes to while empty: the length
/// prefixes of the plan (in its `OperatorMessage`) and of the guard, from one byte up to five.
const PREFIX_GROWTH: usize = 2 * 4;

impl Chunks {
    pub fn new(whole: Part, budget: usize) -> Chunks {
        let head = whole.which();
        match whole {
            Part::Plan(p) => Chunks::from_lists(
                budget,
                head,
                p.heartbeat_interval_ms,
                p.pinnable_gateways,
                p.policies,
                p.serves,
                p.cluster_cidrs,
                p.guard,
                Vec::new(),
                p.entries,
            ),
            Part::Delta(d) => Chunks {
                unchanged: (d.guard_unchanged, d.cluster_cidrs_unchanged),
                guard_change: d.guard_change,
                ..Chunks::from_lists(
                    budget,
                    head,
                    d.heartbeat_interval_ms,
                    d.pinnable_gateways,
                    d.policies,
                    d.serves,
                    d.cluster_cidrs,
                    d.guard,
                    d.removals,
                    d.upserts,
                )
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn from_lists(
        budget: usize,
        head: Which,
        heartbeat_interval_ms: u32,
        pinnable: Vec<Vec<u8>>,
        policies: Vec<String>,
        serves: Vec<v2::GatewayDuty>,
        cluster_cidrs: Vec<v2::Prefix>,
        guard: Option<v2::Guard>,
        removals: Vec<v2::EntryKey>,
        entries: Vec<v2::Entry>,
    ) -> Chunks {
        Chunks {
            budget,
            head,
            heartbeat_interval_ms,
            unchanged: (false, false),
            guard_change: None,
            first: true,
            finished: false,
            pinnable,
            policies: policies.into_iter().peekable(),
            serves: serves.into_iter().peekable(),
            cluster_cidrs: cluster_cidrs.into_iter().peekable(),
            guard: guard.map(|g| {
                (
                    g.destinations.into_iter().peekable(),
                    g.decided_pods.into_iter().peekable(),
                )
            }),
            removals: removals.into_iter().peekable(),
            entries: entries.into_iter().peekable(),
        }
    }

    fn guard_left(&mut self) -> bool {
        self.guard
            .as_mut()
            .is_some_and(|(d, p)| d.peek().is_some() || p.peek().is_some())
    }

    fn anything_left(&mut self) -> bool {
        self.policies.peek().is_some()
            || self.serves.peek().is_some()
            || self.cluster_cidrs.peek().is_some()
            || self.guard_left()
            || self.removals.peek().is_some()
            || self.entries.peek().is_some()
    }
}

/// A chunk being filled: its encoded size so far, and how many items it holds.
struct Fill {
    size: usize,
    items: usize,
    budget: usize,
}

impl Fill {
    /// Moves items from `from` into `into` while they fit; the first item of a chunk goes in
    /// whatever its size, so that every chunk makes progress. Returns whether `from` is empty.
    fn take<T>(&mut self, from: &mut Items<T>, into: &mut Vec<T>, cost: impl Fn(&T) -> usize) -> bool {
        while let Some(item) = from.peek() {
            let cost = cost(item);
            if self.items > 0 && self.size + cost > self.budget {
                return false;
            }
            self.size += cost;
            self.items += 1;
            into.extend(from.next());
        }
        true
    }
}

/// The encoded size of one item of a repeated field (every field number is below 16: a one-byte
/// key), given the size of its content.
fn delimited(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

fn message_cost<M: prost::Message>(m: &M) -> usize {
    delimited(m.encoded_len())
}

impl Iterator for Chunks {
    type Item = Part;

    fn next(&mut self) -> Option<Part> {
        if self.finished {
            return None;
        }
        let carries_guard = self.guard.is_some() && (self.first || self.guard_left());
        let guard = carries_guard.then(v2::Guard::default);
        let pinnable_gateways = std::mem::take(&mut self.pinnable);
        let mut part = match self.head {
            Which::Plan { generation } => Part::Plan(v2::NodePlan {
                generation,
                heartbeat_interval_ms: self.heartbeat_interval_ms,
                guard,
                continued: true,
                pinnable_gateways,
                ..Default::default()
            }),
            Which::Delta { generation, base } => Part::Delta(v2::NodeDelta {
                generation,
                base_generation: base,
                guard_unchanged: self.unchanged.0,
                cluster_cidrs_unchanged: self.unchanged.1,
                guard_change: self.guard_change.take(),
                heartbeat_interval_ms: self.heartbeat_interval_ms,
                guard,
                continued: true,
                pinnable_gateways,
                ..Default::default()
            }),
        };
        let header = v2::OperatorMessage::from(part.clone()).encoded_len() + PREFIX_GROWTH;
        let mut fill = Fill {
            size: header,
            items: 0,
            budget: self.budget,
        };
        let (policies, serves, cluster_cidrs, guard, removals, entries) = match &mut part {
            Part::Plan(p) => (
                &mut p.policies,
                &mut p.serves,
                &mut p.cluster_cidrs,
                &mut p.guard,
                None,
                &mut p.entries,
            ),
            Part::Delta(d) => (
                &mut d.policies,
                &mut d.serves,
                &mut d.cluster_cidrs,
                &mut d.guard,
                Some(&mut d.removals),
                &mut d.upserts,
            ),
        };
        // In order: a list is started only once the ones before it are all out.
        let _ = fill.take(&mut self.policies, policies, |s: &String| delimited(s.len()))
            && fill.take(&mut self.serves, serves, message_cost)
            && fill.take(&mut self.cluster_cidrs, cluster_cidrs, message_cost)
            && match (&mut self.guard, guard) {
                (Some((destinations, decided)), Some(g)) => {
                    fill.take(destinations, &mut g.destinations, message_cost)
                        && fill.take(decided, &mut g.decided_pods, |b: &Vec<u8>| delimited(b.len()))
                }
                _ => true,
            }
            && match removals {
                Some(removals) => fill.take(&mut self.removals, removals, message_cost),
                None => true,
            }
            && fill.take(&mut self.entries, entries, message_cost);
        self.first = false;
        let more = self.anything_left();
        match &mut part {
            Part::Plan(p) => p.continued = more,
            Part::Delta(d) => d.continued = more,
        }
        self.finished = !more;
        Some(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Vec<u8> {
        vec![a, b, c, d]
    }

    fn prefix(address: Vec<u8>, length: u32) -> v2::Prefix {
        v2::Prefix { address, length }
    }

    fn entry(i: usize) -> v2::Entry {
        v2::Entry {
            key: Some(v2::EntryKey {
                source: v4(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
                destination: Some(prefix(v4(198, 51, 100, 0), 24)),
            }),
            target: Some(v2::entry::Target::Gateway(v2::Hop {
                node: v4(192, 168, 1, 2),
                slot: None,
            })),
            egress_ip: Some(v4(203, 0, 113, 10)),
            policy: 0,
            ..Default::default()
        }
    }

    fn key(i: usize) -> v2::EntryKey {
        v2::EntryKey {
            source: v4(10, 9, (i >> 8) as u8, i as u8),
            destination: Some(prefix(v4(0, 0, 0, 0), 0)),
        }
    }

    fn plan(entries: usize, guard: Option<v2::Guard>) -> v2::NodePlan {
        v2::NodePlan {
            generation: 7,
            policies: vec!["p".into()],
            entries: (0..entries).map(entry).collect(),
            serves: vec![v2::GatewayDuty {
                policy: "p".into(),
                egress_ips: vec![v4(203, 0, 113, 10)],
                interface: None,
                managed: false,
                awaiting_release: false,
            }],
            heartbeat_interval_ms: 250,
            cluster_cidrs: vec![prefix(v4(10, 244, 0, 0), 16), prefix(v4(10, 96, 0, 0), 12)],
            guard,
            continued: false,
            pinnable_gateways: vec![v4(192, 168, 1, 3)],
        }
    }

    fn guard(n: usize) -> v2::Guard {
        v2::Guard {
            destinations: (0..n).map(|i| prefix(v4(192, 0, i as u8, 0), 24)).collect(),
            decided_pods: (0..n).map(|i| v4(10, 244, 1, i as u8)).collect(),
        }
    }

    /// Items a chunk holds, of every list.
    fn items(part: &Part) -> usize {
        let g = |g: &Option<v2::Guard>| {
            g.as_ref()
                .map_or(0, |g| g.destinations.len() + g.decided_pods.len())
        };
        match part {
            Part::Plan(p) => {
                p.policies.len() + p.entries.len() + p.serves.len() + p.cluster_cidrs.len() + g(&p.guard)
            }
            Part::Delta(d) => {
                d.policies.len()
                    + d.upserts.len()
                    + d.removals.len()
                    + d.serves.len()
                    + d.cluster_cidrs.len()
                    + g(&d.guard)
            }
        }
    }

    /// Splits, checks every chunk against the budget, and puts the chunks back together.
    fn round_trip(whole: Part, budget: usize) -> (Part, usize) {
        let mut assembler = Assembler::default();
        let chunks: Vec<Part> = Chunks::new(whole, budget).collect();
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let size = v2::OperatorMessage::from(chunk.clone()).encoded_len();
            assert!(
                size <= budget || items(&chunk) <= 1,
                "chunk {i} of {n}: {size} bytes, {} items, budget {budget}",
                items(&chunk)
            );
            assert_eq!(chunk.continued(), i + 1 < n, "chunk {i} of {n}");
            match assembler.push(chunk).unwrap() {
                Some(done) => {
                    assert_eq!(i + 1, n, "complete only with the last chunk");
                    assert_eq!(done.chunks, n);
                    assert!(!assembler.is_assembling());
                    return (done.part, n);
                }
                None => assert!(assembler.is_assembling()),
            }
        }
        panic!("never complete ({n} chunks)");
    }

    #[test]
    fn a_small_plan_is_one_message() {
        let whole = Part::Plan(plan(10, Some(guard(3))));
        assert_eq!(round_trip(whole.clone(), CHUNK_BUDGET), (whole, 1));
    }

    #[test]
    fn an_empty_plan_and_delta_are_one_message_each() {
        let whole = Part::Plan(v2::NodePlan {
            generation: 3,
            ..Default::default()
        });
        assert_eq!(round_trip(whole.clone(), 1), (whole, 1));
        let whole = Part::Delta(v2::NodeDelta {
            generation: 4,
            base_generation: 3,
            guard: Some(v2::Guard::default()),
            ..Default::default()
        });
        assert_eq!(round_trip(whole.clone(), 1), (whole, 1));
    }

    #[test]
    fn a_large_plan_comes_back_whole_from_chunks_within_the_budget() {
        for guard in [None, Some(guard(500))] {
            let whole = Part::Plan(plan(20_000, guard));
            let encoded = v2::OperatorMessage::from(whole.clone()).encoded_len();
            for budget in [512, 4096, 100_000] {
                let (back, chunks) = round_trip(whole.clone(), budget);
                assert_eq!(back, whole);
                assert!(
                    chunks >= encoded / budget,
                    "{chunks} chunks of {budget} for {encoded}"
                );
            }
        }
    }

    #[test]
    fn a_large_delta_comes_back_whole_with_removals_before_upserts() {
        let whole = Part::Delta(v2::NodeDelta {
            generation: 9,
            base_generation: 7,
            policies: vec!["p".into()],
            upserts: (0..5000).map(entry).collect(),
            removals: (0..5000).map(key).collect(),
            serves: vec![],
            cluster_cidrs: vec![prefix(v4(10, 244, 0, 0), 16)],
            guard: Some(guard(100)),
            continued: false,
            heartbeat_interval_ms: 1000,
            pinnable_gateways: vec![v4(192, 168, 1, 3), v4(192, 168, 1, 4)],
            guard_unchanged: false,
            cluster_cidrs_unchanged: false,
            guard_change: None,
        });
        let (back, chunks) = round_trip(whole.clone(), 2048);
        assert_eq!(back, whole);
        assert!(chunks > 10);
        // The short lists go first, and removals before any upsert.
        let mut split = Chunks::new(whole, 2048);
        let Some(Part::Delta(first)) = split.next() else {
            panic!("a delta")
        };
        assert_eq!(first.cluster_cidrs.len(), 1);
        assert_eq!(first.pinnable_gateways.len(), 2, "whole in the first chunk");
        assert_eq!(first.policies.len(), 1);
        assert!(first.guard.is_some());
        let mut seen_upsert = false;
        for chunk in split {
            let Part::Delta(d) = chunk else { panic!("a delta") };
            assert!(!seen_upsert || d.removals.is_empty(), "a removal after an upsert");
            seen_upsert |= !d.upserts.is_empty();
        }
    }

    /// A delta that leaves the guard and the in-cluster set out says so in every chunk, carries
    /// its guard change in the first, and comes back as it was.
    #[test]
    fn a_delta_that_keeps_the_guard_says_so_in_every_chunk() {
        let whole = Part::Delta(v2::NodeDelta {
            generation: 9,
            base_generation: 7,
            policies: vec!["p".into()],
            upserts: (0..2000).map(entry).collect(),
            guard_unchanged: true,
            cluster_cidrs_unchanged: true,
            guard_change: Some(v2::GuardChange {
                added_destinations: vec![prefix(v4(198, 51, 100, 0), 24)],
                removed_decided_pods: vec![v4(10, 244, 1, 7)],
                ..Default::default()
            }),
            ..Default::default()
        });
        let (back, chunks) = round_trip(whole.clone(), 2048);
        assert_eq!(back, whole);
        assert!(chunks > 5);
        for (i, chunk) in Chunks::new(whole, 2048).enumerate() {
            let Part::Delta(d) = chunk else { panic!("a delta") };
            assert!(d.guard_unchanged && d.cluster_cidrs_unchanged && d.guard.is_none());
            assert_eq!(
                d.guard_change.is_some(),
                i == 0,
                "the guard change whole in the first chunk"
            );
        }
    }

    #[test]
    fn an_item_larger_than_the_budget_is_a_chunk_of_its_own() {
        let mut big = plan(3, None);
        big.entries[1].interface = Some("x".repeat(10_000));
        let whole = Part::Plan(big);
        let chunks: Vec<Part> = Chunks::new(whole.clone(), 1000).collect();
        assert!(chunks.iter().any(|c| matches!(c, Part::Plan(p)
            if p.entries.len() == 1 && p.entries[0].interface.as_ref().is_some_and(|i| i.len() == 10_000))));
        assert_eq!(round_trip(whole.clone(), 1000).0, whole);
    }

    #[test]
    fn a_chunk_of_another_generation_or_kind_is_a_protocol_error() {
        let mut chunks = Chunks::new(Part::Plan(plan(100, None)), 512);
        let mut assembler = Assembler::default();
        assert_eq!(assembler.push(chunks.next().unwrap()), Ok(None));
        let mut other = chunks.next().unwrap();
        if let Part::Plan(p) = &mut other {
            p.generation = 8;
        }
        let err = assembler.push(other).unwrap_err();
        assert_eq!(
            err,
            Interleaved {
                assembling: Which::Plan { generation: 7 },
                got: Which::Plan { generation: 8 },
                chunks: 1,
            }
        );
        assert!(err.to_string().contains("generation 8"), "{err}");

        let mut assembler = Assembler::default();
        let first = Chunks::new(Part::Plan(plan(100, None)), 512).next().unwrap();
        assembler.push(first).unwrap();
        let delta = Part::Delta(v2::NodeDelta {
            generation: 7,
            base_generation: 6,
            ..Default::default()
        });
        assert!(assembler.push(delta).is_err());
    }
}
