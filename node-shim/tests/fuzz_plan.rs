//! Hostile input for what the shim decodes: the plan document of `run --entries FILE`, and the
//! operator's messages, each followed into the pure part of the apply path
//! ([`desired::desired`]: map contents, SNAT rules, per-entry errors; no BPF needed). Nothing may
//! panic, every refusal says where the problem is, and what is accepted is programmed as planned
//! or reported. `PROPTEST_CASES=100000 cargo test -p sluice-shim --test fuzz_plan` runs longer
//! than CI does.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use ipnet::IpNet;
use proptest::{prelude::*, sample::Index};
use prost::Message;
use serde_json::{Value, json};
use sluice_proto::{EgressEntry, GatewayTarget, client::NodeState, convert, v2};
use sluice_shim::{
    desired::{self, Host, Interface, OVER_IPV6_UNDERLAY, PolicyIds},
    layout::Layout,
    maps::{self, PolicyKeyV4},
    run::DisplayChain,
};

const NODE: &str = "n1";
const PLAN_FILE: &str = "/etc/sluice/plan.json";

fn host() -> Host {
    Host {
        node_ip: "192.0.2.11".parse().unwrap(),
        managed_not_held: Default::default(),
        interfaces: vec![
            Interface {
                name: "eth0".into(),
                index: 2,
                ipv4: vec!["192.0.2.11".parse().unwrap(), "192.0.2.101".parse().unwrap()],
                ipv4_networks: vec!["192.0.2.0/24".parse().unwrap(); 2],
                ipv6: vec!["fd00:192:0:2::11".parse().unwrap()],
                ipv6_networks: vec!["fd00:192:0:2::/64".parse().unwrap()],
            },
            Interface {
                name: "eth1".into(),
                index: 3,
                ipv4: vec![],
                ipv4_networks: vec![],
                ipv6: vec![],
                ipv6_networks: vec![],
            },
        ],
        default_route_interface: Some("eth0".into()),
    }
}

/// Computes the desired state of `entries` and checks that every entry is either programmed as
/// planned, or reported with why.
fn check_desired(entries: &[EgressEntry]) {
    let host = host();
    let d = desired::desired(entries, &[], &host, &mut PolicyIds::default())
        .unwrap_or_else(|e| panic!("a plan of {} entries refused: {e}", entries.len()));
    let v4 = |e: &EgressEntry| match (e.key.source, e.key.destination, e.gateway) {
        (_, _, GatewayTarget::Node(IpAddr::V6(_))) => None,
        (IpAddr::V4(s), IpNet::V4(d), _) => Some(PolicyKeyV4::new(s, d)),
        _ => None,
    };
    let v6 = |e: &EgressEntry| match (e.key.source, e.key.destination) {
        (IpAddr::V6(s), IpNet::V6(d)) => Some(maps::EntryKeyV6::new(s, d)),
        _ => None,
    };
    // IPv4 entries to a gateway over an IPv6 underlay are not steered (IPv6 ones are).
    let over_v6 = entries
        .iter()
        .filter(|e| e.key.source.is_ipv4() && e.key.destination.addr().is_ipv4())
        .filter(|e| matches!(e.gateway, GatewayTarget::Node(IpAddr::V6(_))))
        .count();
    assert_eq!(d.over_ipv6_underlay, over_v6);
    let keys: BTreeSet<PolicyKeyV4> = entries.iter().filter_map(v4).collect();
    assert_eq!(d.policy.keys().copied().collect::<BTreeSet<_>>(), keys);
    let keys_v6: BTreeSet<maps::EntryKeyV6> = entries.iter().filter_map(v6).collect();
    assert_eq!(d.v6.keys().copied().collect::<BTreeSet<_>>(), keys_v6);
    let ipv6 = entries.len() - entries.iter().filter_map(v4).count();

    let host_ips: BTreeSet<u32> = host
        .interfaces
        .iter()
        .flat_map(|i| i.ipv4.iter().copied().map(maps::be))
        .collect();
    for value in d.policy.values() {
        assert!(d.names.contains_key(&value.policy_id));
        if value.flags & maps::F_LOCAL_GATEWAY != 0 && value.egress_ip != 0 {
            assert!(
                host_ips.contains(&value.egress_ip),
                "SNAT to an address not on this node"
            );
            assert_ne!(value.egress_id, 0, "SNATed without an egress id");
            assert!(d.snat.v4[&maps::from_be(value.egress_ip)].contains(&value.egress_id));
        }
    }
    let host_ips_v6: BTreeSet<maps::AddrV6> = host
        .interfaces
        .iter()
        .flat_map(|i| i.ipv6.iter().copied().map(maps::AddrV6::from))
        .collect();
    for value in d.v6.values() {
        assert!(d.names.contains_key(&value.policy_id));
        if value.flags & maps::F_LOCAL_GATEWAY != 0 && value.egress_ip != maps::AddrV6::default() {
            assert!(
                host_ips_v6.contains(&value.egress_ip),
                "NAT66 to an address not on this node"
            );
            assert_ne!(value.egress_id, 0, "SNATed without an egress id");
            let ip = std::net::Ipv6Addr::from(value.egress_ip.bytes);
            assert!(d.snat.v6[&ip].contains(&value.egress_id));
        }
    }
    for p in &d.entry_errors {
        // A plan may hold one (source, destination) more than once (from several policies): the
        // error names the policy of one of them.
        let same_key: Vec<&EgressEntry> = entries.iter().filter(|e| e.key == p.key).collect();
        assert!(!same_key.is_empty(), "an error about an entry of the plan");
        assert!(
            p.message == OVER_IPV6_UNDERLAY
                || same_key
                    .iter()
                    .any(|e| p.message.contains(&format!("{:?}", e.policy))),
            "{:?} names neither the policy nor the problem",
            p.message
        );
    }
    // A local-gateway entry with no usable egress IP is reported, and drops (never leaks).
    let unique = keys.len() + ipv6 == entries.len() && keys_v6.len() == entries.iter().filter_map(v6).count();
    if unique {
        let failed_local = d
            .policy
            .values()
            .filter(|v| v.flags & maps::F_LOCAL_GATEWAY != 0 && v.egress_ip == 0)
            .count()
            + d.v6
                .values()
                .filter(|v| v.flags & maps::F_LOCAL_GATEWAY != 0 && v.egress_ip == maps::AddrV6::default())
                .count();
        let reported = d
            .entry_errors
            .iter()
            .filter(|p| p.message != OVER_IPV6_UNDERLAY)
            .count();
        assert_eq!(failed_local, reported);
    }
    // The maps hold exactly these entries (or report the ones a pod has no room for).
    let (layout, overflow) = Layout::of(&d.policy, &Layout::default());
    if overflow.is_empty() {
        assert_eq!(layout.expand(), d.policy);
    }
}

fn chain(e: &sluice_shim::Error) -> String {
    DisplayChain(e).to_string()
}

// ---------------------------------------------------------------------------------------------
// The plan document.

/// Strings the plan's fields trip on.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "", " ", "n1", "n2", "none", "fallback", "excluded", "None", "10.244.1.10", "10.244.1.10/32",
            "203.0.113.0/24", "203.0.113.0/33", "::/0", "fd00::1", "192.0.2.11", "192.0.2.101", "192.0.2.200",
            "fe80::1%eth0", "eth0", "eth1", "eth9", "0.0.0.0", "255.255.255.255", "\u{0}", "é😀",
        ])
        .prop_map(str::to_owned),
        2 => any::<IpAddr>().prop_map(|ip| ip.to_string()),
        1 => "\\PC{0,24}",
        1 => (1usize..5000).prop_map(|n| "x".repeat(n)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "nodes",
                        "name",
                        "entries",
                        "serves",
                        "source",
                        "destination",
                        "gateway",
                        "egressIP",
                        "interface",
                        "policy",
                        "policies",
                    ])
                    .prop_map(str::to_owned),
                    inner
                ),
                0..4
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn entry_json() -> impl Strategy<Value = Value> {
    (
        any::<Ipv4Addr>(),
        (any::<Ipv4Addr>(), 0u8..=32),
        prop::sample::select(vec!["192.0.2.11", "192.0.2.12", "none", "fallback", "excluded"]),
        prop::option::of(prop::sample::select(vec![
            "192.0.2.101",
            "192.0.2.11",
            "192.0.2.200",
        ])),
        prop::option::of(prop::sample::select(vec!["eth0", "eth1", "eth9"])),
        prop::option::of(prop::sample::select(vec!["192.0.2.12", "192.0.2.11", "fd00::12"])),
        prop::sample::select(vec!["a", "b", "c"]),
    )
        .prop_map(
            |(source, (net, len), gateway, egress_ip, interface, source_node, policy)| {
                let mut e = json!({
                    "source": source.to_string(),
                    "destination": format!("{net}/{len}"),
                    "gateway": gateway,
                    "egressIP": egress_ip,
                    "interface": interface,
                    "policy": policy,
                });
                if let Some(ip) = source_node {
                    e["sourceNodeIP"] = json!(ip);
                }
                e
            },
        )
}

/// A plan document for nodes n1 and n2.
fn plan_json() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(entry_json(), 0..8),
        prop::collection::vec(entry_json(), 0..3),
    )
        .prop_map(|(mine, theirs)| {
            json!({
                "nodes": [
                    {"name": "n1", "entries": mine,
                     "serves": [{"policy": "a", "egressIPs": ["192.0.2.101"], "interface": null}]},
                    {"name": "n2", "entries": theirs},
                ],
                "policies": [{
                    "name": "a", "accepted": true, "reason": null, "matchedEndpoints": 2,
                    "gateways": [{"node": "n1", "ip": "192.0.2.11", "egressIP": "192.0.2.101", "interface": null}],
                    "conflicts": [{"policy": "b", "entries": 1}]
                }]
            })
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Index, Value),
    BendString(Index, String),
    RemoveKey(Index, Index),
}

fn mutate(v: &mut Value, m: &Mutation) {
    match m {
        Mutation::Replace(at, new) => {
            let n = count(v);
            *select(v, at.index(n)) = new.clone();
        }
        Mutation::BendString(at, text) => {
            let mut all = strings(v);
            if !all.is_empty() {
                let i = at.index(all.len());
                *all[i] = text.clone();
            }
        }
        Mutation::RemoveKey(at, key) => {
            let n = count(v);
            if let Value::Object(o) = select(v, at.index(n))
                && !o.is_empty()
            {
                let k = o.keys().nth(key.index(o.len())).cloned().unwrap_or_default();
                o.remove(&k);
            }
        }
    }
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// The `n`th node in pre-order (`n` < `count(v)`).
fn select(v: &mut Value, n: usize) -> &mut Value {
    if n == 0 {
        return v;
    }
    let mut n = n - 1;
    let children: Vec<&mut Value> = match v {
        Value::Array(a) => a.iter_mut().collect(),
        Value::Object(o) => o.values_mut().collect(),
        _ => unreachable!("a leaf has no nodes below it"),
    };
    for child in children {
        let size = count(child);
        if n < size {
            return select(child, n);
        }
        n -= size;
    }
    unreachable!("n is below count(v)")
}

fn strings(v: &mut Value) -> Vec<&mut String> {
    match v {
        Value::String(s) => vec![s],
        Value::Array(a) => a.iter_mut().flat_map(strings).collect(),
        Value::Object(o) => o.values_mut().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<Index>(), value()).prop_map(|(at, v)| Mutation::Replace(at, v)),
        4 => (any::<Index>(), string()).prop_map(|(at, s)| Mutation::BendString(at, s)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(at, k)| Mutation::RemoveKey(at, k)),
    ]
}

fn shaped_plan() -> impl Strategy<Value = Value> {
    (plan_json(), prop::collection::vec(mutation(), 0..4)).prop_map(|(mut plan, ms)| {
        for m in &ms {
            mutate(&mut plan, m);
        }
        plan
    })
}

/// Reads a plan file's bytes as `run --entries` does, and follows what it accepts.
fn check_plan_bytes(bytes: &[u8]) {
    match desired::plan_entries(Path::new(PLAN_FILE), bytes, NODE) {
        Ok(entries) => check_desired(&entries),
        Err(e @ sluice_shim::Error::NodeNotInPlan { .. }) => {
            let text = chain(&e);
            assert!(text.contains(PLAN_FILE) && text.contains("\"n1\""), "{text:?}");
        }
        Err(e @ sluice_shim::Error::Plan { .. }) => {
            let text = chain(&e);
            assert!(text.contains(PLAN_FILE), "{text:?} does not name the file");
            // serde_json says where (line and column), and for a field also which one.
            assert!(text.contains(" at line "), "{text:?} does not say where");
        }
        Err(e) => panic!("unexpected error {}", chain(&e)),
    }
}

/// Whether a refusal of a well-formed JSON document names the field at fault.
fn names_the_field(text: &str) -> bool {
    let detail = text.split_once(": ").map_or("", |(_, d)| d);
    // The document itself is of the wrong shape.
    [
        "missing field",
        "invalid type",
        "invalid length",
        "unknown variant",
    ]
    .iter()
    .any(|w| detail.starts_with(w))
        || ["nodes", "policies", "["].iter().any(|f| detail.starts_with(f))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn plan_files_of_arbitrary_bytes(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        "\\PC{0,256}".prop_map(String::into_bytes),
        value().prop_map(|v| v.to_string().into_bytes()),
    ]) {
        check_plan_bytes(&bytes);
    }

    #[test]
    fn plan_files_shaped_like_real_ones(plan in shaped_plan(), pretty in any::<bool>()) {
        let bytes = if pretty {
            serde_json::to_vec_pretty(&plan).unwrap()
        } else {
            serde_json::to_vec(&plan).unwrap()
        };
        check_plan_bytes(&bytes);
        if let Err(e @ sluice_shim::Error::Plan { .. }) =
            desired::plan_entries(Path::new(PLAN_FILE), &bytes, NODE)
        {
            let text = chain(&e);
            prop_assert!(names_the_field(&text), "{} names no field", text);
        }
    }

    #[test]
    fn plan_files_with_bent_bytes(
        plan in plan_json(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = serde_json::to_vec(&plan).unwrap();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        check_plan_bytes(&bytes);
    }
}

#[test]
fn plan_file_edge_cases_are_named() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "EOF while parsing a value at line 1 column 0"),
        ("trailing garbage", br#"{"nodes": [], "policies": []} x"#.to_vec(), "trailing characters"),
        ("no section", br#"{"nodes": [], "policies": []}"#.to_vec(), "has no section for node \"n1\""),
        (
            "bad gateway",
            br#"{"nodes": [{"name": "n1", "entries": [{"source": "10.0.0.1", "destination": "1.0.0.0/8",
                "gateway": "nowhere", "egressIP": null, "interface": null, "policy": "p"}]}], "policies": []}"#
                .to_vec(),
            "nodes[0].entries[0].gateway: gateway must be an IP address",
        ),
        // Unknown fields are skipped without recursion: deep nesting there costs no stack.
        (
            "deep nesting",
            format!(
                r#"{{"unknown": {}{}, "nodes": [], "policies": []}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            )
            .into_bytes(),
            "has no section for node \"n1\"",
        ),
        (
            "deep nesting, cut short",
            format!(r#"{{"unknown": {}"#, "[".repeat(100_000)).into_bytes(),
            "EOF while parsing a list at line 1 column 100012",
        ),
    ];
    for (what, bytes, want) in cases {
        let e = desired::plan_entries(Path::new(PLAN_FILE), &bytes, NODE).unwrap_err();
        let text = chain(&e);
        assert!(text.contains(want), "{what}: {text:?} should say {want:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's messages, off the wire.

fn wire_plan() -> impl Strategy<Value = v2::OperatorMessage> {
    (any::<u64>(), prop::collection::vec(entry_json(), 0..8)).prop_map(|(generation, entries)| {
        let mut policies = convert::PolicyNames::default();
        let entries = entries
            .into_iter()
            .map(|e| {
                convert::entry_to_wire(&serde_json::from_value::<EgressEntry>(e).unwrap(), &mut policies)
            })
            .collect();
        v2::OperatorMessage {
            message: Some(v2::operator_message::Message::Plan(v2::NodePlan {
                generation,
                policies: policies.into_wire(),
                entries,
                heartbeat_interval_ms: 1000,
                ..Default::default()
            })),
        }
    })
}

/// Decodes a message as the session does and, when it is a plan the session takes, computes
/// what the datapath would hold.
fn check_wire(bytes: &[u8]) {
    let Ok(msg) = v2::OperatorMessage::decode(bytes) else {
        return;
    };
    if let Some(v2::operator_message::Message::Plan(plan)) = &msg.message {
        match NodeState::from_plan(1, plan) {
            Ok(state) => check_desired(&state.entries.values().cloned().collect::<Vec<_>>()),
            Err(e) => assert!(e.to_string().starts_with(&format!("invalid {}: ", e.field))),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn operator_messages_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_wire(&bytes);
    }

    #[test]
    fn operator_plans_with_bent_bytes(
        msg in wire_plan(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = msg.encode_to_vec();
        check_wire(&bytes);
        for (at, byte) in flips {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
        }
        check_wire(&bytes);
    }
}
