//! Hostile input for the wire side of the contract: arbitrary bytes into the prost decoders, and
//! messages that decode but hold nonsense into the conversions the shim applies
//! ([`NodeState::from_plan`], [`NodeState::apply`]). Nothing may panic, and every refusal names
//! the field and the value. `PROPTEST_CASES=100000 cargo test -p sluice-proto --test fuzz_wire`
//! runs longer than CI does.

use std::net::IpAddr;

use ipnet::IpNet;
use proptest::{prelude::*, sample::Index};
use prost::Message;
use sluice_proto::{
    EntryDoc, GatewayDuty, GatewayTarget,
    client::NodeState,
    convert::{BadField, EntryKey},
    v1,
};

/// Text that is usually, but not always, what the field holds.
fn ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => any::<IpAddr>().prop_map(|ip| ip.to_string()),
        1 => prop::sample::select(vec![
            "", " 10.0.0.1", "10.0.0.1 ", "10.0.0", "10.0.0.256", "::ffff:10.0.0.1", "fe80::1%eth0",
            "10.0.0.1/32", "none", "0x0a000001", "010.0.0.1", "\u{0}",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,20}",
    ]
}

fn net_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (any::<IpAddr>(), any::<u8>()).prop_map(|(ip, len)| {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            format!("{ip}/{}", len % (max + 1))
        }),
        1 => prop::sample::select(vec![
            "", "10.0.0.0/33", "::/129", "10.0.0.1", "10.0.0.0/-1", "10.0.0.0/8/8", "/8", "10.0.0.0 /8",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,20}",
    ]
}

fn gateway_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => ip_text(),
        1 => prop::sample::select(vec!["none", "fallback", "excluded", "None", "drop", "local"])
            .prop_map(str::to_owned),
    ]
}

fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9-]{1,12}",
        1 => any::<String>(),
        1 => (1usize..10_000).prop_map(|n| "p".repeat(n)),
    ]
}

fn entry() -> impl Strategy<Value = v1::Entry> {
    (
        ip_text(),
        net_text(),
        gateway_text(),
        prop::option::of(ip_text()),
        prop::option::of(name_text()),
        prop::option::of(ip_text()),
        name_text(),
        (prop::option::of(any::<u32>()), prop::option::of(any::<u32>())),
    )
        .prop_map(
            |(source, destination, gateway, egress_ip, interface, source_node_ip, policy, slot)| v1::Entry {
                source,
                destination,
                gateway,
                egress_ip,
                interface,
                source_node_ip,
                gateway_entry: slot.0,
                gateway_slot: slot.1,
                policy,
            },
        )
}

/// Mostly well-formed entries, so that a plan of several gets past its first bad one.
fn entry_mostly_valid() -> impl Strategy<Value = v1::Entry> {
    let valid = (
        any::<IpAddr>(),
        (any::<IpAddr>(), any::<u8>()),
        prop_oneof![
            any::<IpAddr>().prop_map(GatewayTarget::Node),
            Just(GatewayTarget::None),
            Just(GatewayTarget::Fallback),
            Just(GatewayTarget::Excluded),
        ],
        prop::option::of(any::<IpAddr>()),
        name_text(),
    )
        .prop_map(|(source, (net, len), gateway, egress_ip, policy)| {
            let max = if net.is_ipv4() { 32 } else { 128 };
            v1::Entry {
                source: source.to_string(),
                destination: IpNet::new(net, len % (max + 1)).unwrap().to_string(),
                gateway: gateway.to_string(),
                egress_ip: egress_ip.map(|ip| ip.to_string()),
                policy,
                ..Default::default()
            }
        });
    prop_oneof![19 => valid, 1 => entry()]
}

fn key() -> impl Strategy<Value = v1::EntryKey> {
    (ip_text(), net_text()).prop_map(|(source, destination)| v1::EntryKey { source, destination })
}

fn duty() -> impl Strategy<Value = v1::GatewayDuty> {
    (
        name_text(),
        prop::collection::vec(ip_text(), 0..3),
        prop::option::of(name_text()),
    )
        .prop_map(|(policy, egress_ips, interface)| v1::GatewayDuty {
            policy,
            egress_ips,
            interface,
        })
}

fn plan() -> impl Strategy<Value = v1::NodePlan> {
    (
        any::<u64>(),
        prop::collection::vec(entry_mostly_valid(), 0..8),
        prop::collection::vec(duty(), 0..3),
        any::<u32>(),
    )
        .prop_map(
            |(generation, entries, serves, heartbeat_interval_ms)| v1::NodePlan {
                generation,
                entries,
                serves,
                heartbeat_interval_ms,
                cluster_cidrs: vec![],
                guard: None,
                continued: false,
            },
        )
}

fn delta() -> impl Strategy<Value = v1::NodeDelta> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(entry_mostly_valid(), 0..6),
        prop::collection::vec(key(), 0..6),
        prop::collection::vec(duty(), 0..3),
    )
        .prop_map(
            |(generation, base_generation, upserts, removals, serves)| v1::NodeDelta {
                generation,
                base_generation,
                upserts,
                removals,
                serves,
                cluster_cidrs: vec![],
                guard: None,
                continued: false,
            },
        )
}

/// The first field of an entry that does not parse, as [`BadField`] names it: computed here
/// without the conversion under test.
fn first_bad_field(e: &v1::Entry) -> Option<(&'static str, &str)> {
    let ip_ok = |s: &str| s.parse::<IpAddr>().is_ok();
    let gateway_ok = |s: &str| matches!(s, "none" | "fallback" | "excluded") || ip_ok(s);
    if !ip_ok(&e.source) {
        return Some(("source", &e.source));
    }
    if e.destination.parse::<IpNet>().is_err() {
        return Some(("destination", &e.destination));
    }
    if !gateway_ok(&e.gateway) {
        return Some(("gateway", &e.gateway));
    }
    if let Some(ip) = e.egress_ip.as_deref().filter(|ip| !ip_ok(ip)) {
        return Some(("egress IP", ip));
    }
    if let Some(ip) = e.source_node_ip.as_deref().filter(|ip| !ip_ok(ip)) {
        return Some(("source node IP", ip));
    }
    None
}

/// A refusal says which field and which value.
fn check_bad_field(e: &BadField) {
    const FIELDS: &[&str] = &["source", "destination", "gateway", "egress IP", "source node IP"];
    assert!(FIELDS.contains(&e.field), "unknown field {:?}", e.field);
    let text = e.to_string();
    assert!(text.contains(e.field), "{text:?} does not name the field");
    assert!(
        text.contains(&format!("{:?}", e.value)),
        "{text:?} does not show the value"
    );
}

/// What a state must hold after a plan: every entry under its own key, nothing else.
fn check_state(state: &NodeState) {
    for ((source, destination), e) in &state.entries {
        assert_eq!((*source, *destination), (e.source, e.destination));
    }
    assert_eq!(state.entry_list().len(), state.entries.len());
}

/// Applies one operator message to `state` as the shim's session does.
fn receive(state: &mut Option<NodeState>, msg: &v1::OperatorMessage) {
    match &msg.message {
        Some(v1::operator_message::Message::Plan(plan)) => match NodeState::from_plan(1, plan) {
            Ok(s) => {
                assert_eq!(s.generation, plan.generation);
                assert!(s.entries.len() <= plan.entries.len());
                assert_eq!(s.serves.len(), plan.serves.len());
                check_state(&s);
                *state = Some(s);
            }
            Err(e) => check_bad_field(&e),
        },
        Some(v1::operator_message::Message::Delta(delta)) => {
            if let Some(s) = state {
                match s.apply(delta) {
                    Ok(()) => {
                        assert_eq!(s.generation, delta.generation);
                        check_state(s);
                    }
                    Err(e) => {
                        check_bad_field(&e);
                        *state = None;
                    }
                }
            }
        }
        Some(v1::operator_message::Message::Heartbeat(_)) | None => {}
    }
}

fn operator_message() -> impl Strategy<Value = v1::OperatorMessage> {
    prop_oneof![
        plan().prop_map(v1::operator_message::Message::Plan),
        delta().prop_map(v1::operator_message::Message::Delta),
        any::<u64>().prop_map(
            |sent_unix_ms| v1::operator_message::Message::Heartbeat(v1::Heartbeat { sent_unix_ms })
        ),
    ]
    .prop_map(|m| v1::OperatorMessage { message: Some(m) })
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
        if let Ok(msg) = v1::OperatorMessage::decode(bytes.as_slice()) {
            receive(&mut None, &msg);
        }
        let _ = v1::ShimMessage::decode(bytes.as_slice());
        let _ = v1::NodePlan::decode(bytes.as_slice());
        let _ = v1::NodeDelta::decode(bytes.as_slice());
    }

    #[test]
    fn shim_messages_with_bent_bytes(bytes in bent_bytes(
        (any::<u64>(), prop::collection::vec((ip_text(), net_text(), any::<String>()), 0..4)).prop_map(|(generation, errors)| {
            v1::ShimMessage {
                message: Some(v1::shim_message::Message::Ack(v1::Ack {
                    generation,
                    errors: errors
                        .into_iter()
                        .map(|(source, destination, message)| v1::EntryError { source, destination, message })
                        .collect(),
                })),
            }
            .encode_to_vec()
        })
    )) {
        let _ = v1::ShimMessage::decode(bytes.as_slice());
    }

    #[test]
    fn an_entry_is_taken_whole_or_refused_naming_its_first_bad_field(e in entry()) {
        match (EntryDoc::try_from(&e), first_bad_field(&e)) {
            (Ok(doc), None) => {
                // What the shim holds is what the operator meant: it goes back to the same wire form.
                let again = EntryDoc::try_from(&v1::Entry::from(&doc)).unwrap();
                prop_assert_eq!(&again, &doc);
                prop_assert_eq!(doc.policy, e.policy);
                prop_assert_eq!(doc.interface, e.interface);
                if let ("none" | "fallback" | "excluded", g) = (e.gateway.as_str(), doc.gateway) {
                    prop_assert!(!matches!(g, GatewayTarget::Node(_)));
                }
            }
            (Err(err), Some((field, value))) => {
                check_bad_field(&err);
                prop_assert_eq!(err.field, field);
                prop_assert_eq!(err.value.as_str(), value);
            }
            (got, want) => prop_assert!(false, "{:?}, wanted a refusal of {:?}", got, want),
        }
    }

    #[test]
    fn keys_and_duties_are_taken_or_refused_naming_the_field(k in key(), d in duty()) {
        match EntryKey::try_from(&k) {
            Ok((source, destination)) => {
                prop_assert_eq!(source, k.source.parse::<IpAddr>().unwrap());
                prop_assert_eq!(destination, k.destination.parse::<IpNet>().unwrap());
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
                prop_assert!(d.egress_ips.contains(&e.value));
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
        receive(&mut state, &v1::OperatorMessage { message: Some(v1::operator_message::Message::Plan(p)) });
        for d in deltas {
            receive(&mut state, &v1::OperatorMessage { message: Some(v1::operator_message::Message::Delta(d)) });
        }
    }

    #[test]
    fn operator_messages_with_bent_bytes_in_a_session(
        msgs in prop::collection::vec(bent_bytes(operator_message().prop_map(|m| m.encode_to_vec())), 1..6)
    ) {
        let mut state = None;
        for bytes in msgs {
            match v1::OperatorMessage::decode(bytes.as_slice()) {
                Ok(msg) => receive(&mut state, &msg),
                Err(e) => prop_assert!(e.to_string().starts_with("failed to decode Protobuf message: ")),
            }
        }
    }
}
