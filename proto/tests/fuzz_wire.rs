//! Hostile input for the wire side of the contract: arbitrary bytes into the prost decoders, and
//! messages that decode but hold nonsense (addresses of the wrong size, prefixes too long or with
//! host bits, a missing target, a policy index out of range) into the conversions the shim
//! applies ([`NodeState::from_plan`], [`StateDelta`]). Nothing may panic, and every refusal names
//! the field. `PROPTEST_CASES=100000 cargo test -p sluice-proto --test fuzz_wire` runs longer than
//! CI does.

use std::net::IpAddr;

use ipnet::IpNet;
use proptest::{prelude::*, sample::Index};
use prost::Message;
use sluice_proto::{
    EntryKey, GatewayDuty, GatewayTarget,
    client::{NodeState, StateDelta},
    convert::{self, BadField},
    v2,
};

/// Octets that are usually, but not always, an address.
fn ip_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => any::<IpAddr>().prop_map(convert::ip_to_wire),
        1 => prop::collection::vec(any::<u8>(), 0..20),
    ]
}

fn ip_ok(octets: &[u8]) -> bool {
    matches!(octets.len(), 4 | 16)
}

/// A prefix that is usually valid (host bits cleared), sometimes not.
fn prefix() -> impl Strategy<Value = v2::Prefix> {
    let valid = (any::<IpAddr>(), any::<u8>()).prop_map(|(ip, len)| {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        convert::prefix_to_wire(IpNet::new(ip, len % (max + 1)).unwrap().trunc())
    });
    let any_prefix = (ip_bytes(), any::<u32>()).prop_map(|(address, length)| v2::Prefix {
        address,
        length: length % 200,
    });
    prop_oneof![6 => valid, 1 => any_prefix]
}

fn prefix_ok(p: Option<&v2::Prefix>) -> bool {
    let Some(p) = p else { return false };
    let max = match p.address.len() {
        4 => 32,
        16 => 128,
        _ => return false,
    };
    if p.length > max {
        return false;
    }
    let addr = convert::ip_from_wire("x", &p.address).unwrap();
    let net = IpNet::new(addr, p.length as u8).unwrap();
    net.trunc() == net
}

fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9-]{1,12}",
        1 => any::<String>(),
        1 => (1usize..10_000).prop_map(|n| "p".repeat(n)),
    ]
}

fn key() -> impl Strategy<Value = Option<v2::EntryKey>> {
    prop_oneof![
        12 => (ip_bytes(), prop::option::weighted(0.95, prefix()))
            .prop_map(|(source, destination)| Some(v2::EntryKey { source, destination })),
        1 => Just(None),
    ]
}

fn target() -> impl Strategy<Value = Option<v2::entry::Target>> {
    use v2::entry::Target;
    prop_oneof![
        8 => (ip_bytes(), prop::option::of((any::<u32>(), any::<u32>()))).prop_map(|(node, slot)| {
            Some(Target::Gateway(v2::Hop {
                node,
                slot: slot.map(|(entry, slot)| v2::GatewaySlot { entry, slot }),
            }))
        }),
        1 => Just(Some(Target::None(v2::NoGateway {}))),
        1 => Just(Some(Target::Fallback(v2::Fallback {}))),
        1 => Just(Some(Target::Excluded(v2::Excluded {}))),
        1 => Just(None),
    ]
}

/// An entry of a plan or delta with `policies` names.
fn entry(policies: u32) -> impl Strategy<Value = v2::Entry> {
    (
        key(),
        target(),
        prop::option::weighted(0.3, ip_bytes()),
        prop::option::of(name_text()),
        prop::option::weighted(0.3, ip_bytes()),
        prop_oneof![12 => 0..policies.max(1), 1 => any::<u32>()],
    )
        .prop_map(
            |(key, target, egress_ip, interface, source_node_ip, policy)| v2::Entry {
                key,
                target,
                egress_ip,
                interface,
                source_node_ip,
                policy,
            },
        )
}

fn duty() -> impl Strategy<Value = v2::GatewayDuty> {
    (
        name_text(),
        prop::collection::vec(ip_bytes(), 0..3),
        prop::option::of(name_text()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(policy, egress_ips, interface, managed, awaiting_release)| v2::GatewayDuty {
                policy,
                egress_ips,
                interface,
                managed,
                awaiting_release,
            },
        )
}

fn policies() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(name_text(), 1..4)
}

fn plan() -> impl Strategy<Value = v2::NodePlan> {
    policies().prop_flat_map(|policies| {
        let n = policies.len() as u32;
        (
            any::<u64>(),
            Just(policies),
            prop::collection::vec(entry(n), 0..8),
            prop::collection::vec(duty(), 0..3),
            any::<u32>(),
            prop::collection::vec(prefix(), 0..3),
        )
            .prop_map(
                |(generation, policies, entries, serves, heartbeat_interval_ms, cluster_cidrs)| {
                    v2::NodePlan {
                        generation,
                        policies,
                        entries,
                        serves,
                        heartbeat_interval_ms,
                        cluster_cidrs,
                        guard: None,
                        continued: false,
                        pinnable_gateways: vec![],
                    }
                },
            )
    })
}

fn delta() -> impl Strategy<Value = v2::NodeDelta> {
    policies().prop_flat_map(|policies| {
        let n = policies.len() as u32;
        (
            (any::<u64>(), any::<u64>()),
            Just(policies),
            prop::collection::vec(entry(n), 0..6),
            prop::collection::vec(key().prop_filter_map("a key", |k| k), 0..6),
            prop::collection::vec(duty(), 0..3),
        )
            .prop_map(
                |((generation, base_generation), policies, upserts, removals, serves)| v2::NodeDelta {
                    generation,
                    base_generation,
                    policies,
                    upserts,
                    removals,
                    serves,
                    ..Default::default()
                },
            )
    })
}

/// The first field of an entry that does not decode, as [`BadField`] names it: computed here
/// without the conversion under test.
fn first_bad_field(e: &v2::Entry, policies: usize) -> Option<&'static str> {
    let Some(key) = &e.key else {
        return Some("entry key");
    };
    if !ip_ok(&key.source) {
        return Some("source");
    }
    if !prefix_ok(key.destination.as_ref()) {
        return Some("destination");
    }
    match &e.target {
        None => return Some("target"),
        Some(v2::entry::Target::Gateway(hop)) if !ip_ok(&hop.node) => return Some("gateway"),
        Some(_) => {}
    }
    if e.policy as usize >= policies {
        return Some("policy");
    }
    if e.egress_ip.as_deref().is_some_and(|ip| !ip_ok(ip)) {
        return Some("egress IP");
    }
    if e.source_node_ip.as_deref().is_some_and(|ip| !ip_ok(ip)) {
        return Some("source node IP");
    }
    None
}

/// A refusal names a field the contract has, in words.
fn check_bad_field(e: &BadField) {
    const FIELDS: &[&str] = &[
        "entry key",
        "source",
        "destination",
        "target",
        "gateway",
        "policy",
        "egress IP",
        "source node IP",
        "cluster CIDR",
        "guarded destination",
        "decided pod",
    ];
    assert!(FIELDS.contains(&e.field), "unknown field {:?}", e.field);
    let text = e.to_string();
    assert!(text.contains(e.field), "{text:?} does not name the field");
}

/// What a state must hold: every entry under its own key.
fn check_state(state: &NodeState) {
    for (key, e) in &state.entries {
        assert_eq!(*key, e.key);
    }
}

/// Applies one operator message to `state` as the shim's session and datapath side do.
fn receive(state: &mut Option<NodeState>, msg: &v2::OperatorMessage) {
    match &msg.message {
        Some(v2::operator_message::Message::Plan(plan)) => match NodeState::from_plan(1, plan) {
            Ok(s) => {
                assert_eq!(s.generation, plan.generation);
                assert!(s.entries.len() <= plan.entries.len());
                assert_eq!(s.serves.len(), plan.serves.len());
                check_state(&s);
                *state = Some(s);
            }
            Err(e) => check_bad_field(&e),
        },
        Some(v2::operator_message::Message::Delta(delta)) => match StateDelta::try_from(delta) {
            Ok(d) => {
                if let Some(s) = state {
                    s.apply(d);
                    assert_eq!(s.generation, delta.generation);
                    check_state(s);
                }
            }
            // The session ends; the next one starts from a whole plan.
            Err(e) => {
                check_bad_field(&e);
                *state = None;
            }
        },
        Some(v2::operator_message::Message::Heartbeat(_)) | None => {}
    }
}

fn operator_message() -> impl Strategy<Value = v2::OperatorMessage> {
    prop_oneof![
        plan().prop_map(v2::operator_message::Message::Plan),
        delta().prop_map(v2::operator_message::Message::Delta),
        any::<u64>().prop_map(
            |sent_unix_ms| v2::operator_message::Message::Heartbeat(v2::Heartbeat { sent_unix_ms })
        ),
    ]
    .prop_map(|m| v2::OperatorMessage { message: Some(m) })
}

/// The bytes of a message, with a few of them overwritten, cut short, or extended.
fn bent_bytes(msg: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        msg,
        prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        any::<Index>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(mut bytes, flips, cut, truncate, tail)| {
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            if truncate && !bytes.is_empty() {
                bytes.truncate(cut.index(bytes.len()));
            }
            bytes.extend(tail);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_into_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        if let Ok(msg) = v2::OperatorMessage::decode(bytes.as_slice()) {
            receive(&mut None, &msg);
        }
        let _ = v2::ShimMessage::decode(bytes.as_slice());
        let _ = v2::NodePlan::decode(bytes.as_slice());
        let _ = v2::NodeDelta::decode(bytes.as_slice());
    }

    #[test]
    fn shim_messages_with_bent_bytes(bytes in bent_bytes(
        (any::<u64>(), prop::collection::vec((key(), any::<String>()), 0..4)).prop_map(|(generation, errors)| {
            v2::ShimMessage {
                message: Some(v2::shim_message::Message::Ack(v2::Ack {
                    generation,
                    errors: errors
                        .into_iter()
                        .map(|(key, message)| v2::EntryError { key, message })
                        .collect(),
                    conflicts: vec![],
                    pinned_flows: vec![],
                    counted_gateways: vec![],
                })),
            }
            .encode_to_vec()
        })
    )) {
        let _ = v2::ShimMessage::decode(bytes.as_slice());
    }

    #[test]
    fn an_entry_is_taken_whole_or_refused_naming_its_first_bad_field(
        names in policies(),
        e in entry(3),
    ) {
        let policies = convert::policies_from_wire(&names);
        match (convert::entry_from_wire(&e, &policies), first_bad_field(&e, policies.len())) {
            (Ok(entry), None) => {
                // What the shim holds is what the operator meant: it goes back to the same wire form.
                let mut again = convert::PolicyNames::default();
                let wire = convert::entry_to_wire(&entry, &mut again);
                let back = convert::entry_from_wire(&wire, &convert::policies_from_wire(&again.into_wire())).unwrap();
                prop_assert_eq!(&back, &entry);
                prop_assert_eq!(&*entry.policy, names[e.policy as usize].as_str());
                prop_assert_eq!(entry.interface.as_deref(), e.interface.as_deref());
                let is_hop = matches!(e.target, Some(v2::entry::Target::Gateway(_)));
                prop_assert_eq!(is_hop, matches!(entry.gateway, GatewayTarget::Node(_)));
            }
            (Err(err), Some(field)) => {
                check_bad_field(&err);
                prop_assert_eq!(err.field, field);
            }
            (got, want) => prop_assert!(false, "{:?}, wanted a refusal of {:?}", got, want),
        }
    }

    #[test]
    fn keys_and_duties_are_taken_or_refused_naming_the_field(
        k in key().prop_filter_map("a key", |k| k),
        d in duty(),
    ) {
        match EntryKey::try_from(&k) {
            Ok(key) => {
                prop_assert!(ip_ok(&k.source) && prefix_ok(k.destination.as_ref()));
                prop_assert_eq!(convert::ip_to_wire(key.source), k.source.clone());
                prop_assert_eq!(Some(convert::prefix_to_wire(key.destination)), k.destination.clone());
            }
            Err(e) => {
                check_bad_field(&e);
                prop_assert!(["source", "destination"].contains(&e.field));
            }
        }
        match GatewayDuty::try_from(&d) {
            Ok(duty) => prop_assert_eq!(duty.egress_ips.len(), d.egress_ips.len()),
            Err(e) => {
                check_bad_field(&e);
                prop_assert_eq!(e.field, "egress IP");
                prop_assert!(d.egress_ips.iter().any(|ip| !ip_ok(ip)));
            }
        }
    }
}

proptest! {
    // Each case is a session's worth of messages.
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn plans_then_deltas_keep_every_entry_under_its_own_key(p in plan(), deltas in prop::collection::vec(delta(), 0..5)) {
        let mut state = None;
        receive(&mut state, &v2::OperatorMessage { message: Some(v2::operator_message::Message::Plan(p)) });
        for d in deltas {
            receive(&mut state, &v2::OperatorMessage { message: Some(v2::operator_message::Message::Delta(d)) });
        }
    }

    #[test]
    fn operator_messages_with_bent_bytes_in_a_session(
        msgs in prop::collection::vec(bent_bytes(operator_message().prop_map(|m| m.encode_to_vec())), 1..6)
    ) {
        let mut state = None;
        for bytes in msgs {
            match v2::OperatorMessage::decode(bytes.as_slice()) {
                Ok(msg) => receive(&mut state, &msg),
                Err(e) => prop_assert!(e.to_string().starts_with("failed to decode Protobuf message: ")),
            }
        }
    }
}
