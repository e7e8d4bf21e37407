//! Hostile input for every decoder of outside input on the operator's side: policy specs, the
//! custom resource, manifest directories, `convert`'s Cilium YAML, and the shim's `Hello`.
//!
//! Two kinds of input: arbitrary (bytes, text, JSON), which mostly dies at the first parse error,
//! and input shaped like the real thing with a few parts replaced, removed or bent, which gets
//! past the syntax into the checks behind it. Nothing may panic, and every rejection must say
//! where the problem is. `PROPTEST_CASES=100000 cargo test -p sluice-operator --test
//! fuzz_parsers` runs longer than CI does.

use std::path::Path;

use proptest::{prelude::*, sample::Index};
use serde_json::{Value, json};
use sluice_operator::{
    api::{EgressGatewayPolicy, EgressGatewayPolicySpec},
    convert, grpc, manifests,
    policy::{self, MAX_GATEWAY_NODES},
};
use sluice_proto::v2;

/// JSON shaped like a template, bent in a few places.
mod shaped {
    use super::*;

    /// Strings the parsers here tend to trip on: near-misses of valid values, separators,
    /// whitespace, markers of other formats.
    const TRICKY: &[&str] = &[
        "",
        " ",
        "0",
        "-1",
        "65",
        "4294967296",
        "1e999",
        "null",
        "~",
        "true",
        "10.0.0.1",
        "10.0.0.1/8",
        "10.0.0.0/33",
        "10.0.0.0/-1",
        "::",
        "::/0",
        "::ffff:10.0.0.1",
        "fe80::1%eth0",
        "2001:db8::/129",
        "0.0.0.0/0",
        " 203.0.113.0/24 ",
        "256.0.0.1",
        "1.2.3",
        "none",
        "fallback",
        "excluded",
        "In",
        "NotIn",
        "Exists",
        "DoesNotExist",
        "in",
        "Drop",
        "Fallback",
        "eth0",
        "eth0:1",
        "a/b",
        ".",
        "..",
        "eth 0",
        "eth\t0",
        "eth\n0",
        "eth\u{0}",
        "0123456789abcdef",
        "ünïcödé-😀",
        "v1",
        "sluice.dev/v1alpha1",
        "cilium.io/v2",
        "Node",
        "Pod",
        "Namespace",
        "List",
        "EgressGatewayPolicy",
        "CiliumEgressGatewayPolicy",
        "Ready",
        "True",
        "InternalIP",
        "false",
        "[{\"name\": 1}]",
        "[{\"name\": \"eth1\", \"addresses\": [\"x\"]}]",
        "---",
        "{",
        "*a",
        "&a",
        "!!binary",
    ];

    /// Field names of the objects fuzzed here, so that random objects sometimes hit them.
    const KEYS: &[&str] = &[
        "apiVersion",
        "kind",
        "metadata",
        "name",
        "namespace",
        "uid",
        "labels",
        "annotations",
        "generation",
        "creationTimestamp",
        "spec",
        "status",
        "items",
        "selectors",
        "podSelector",
        "namespaceSelector",
        "nodeSelector",
        "matchLabels",
        "matchExpressions",
        "key",
        "operator",
        "values",
        "destinationCIDRs",
        "excludedCIDRs",
        "egressGateway",
        "egressGateways",
        "interface",
        "egressIP",
        "maxGatewayNodes",
        "failurePolicy",
        "addresses",
        "address",
        "type",
        "conditions",
        "nodeName",
        "hostNetwork",
        "phase",
        "podIP",
        "podIPs",
        "ip",
        "sluice.dev/interfaces",
        "sluice.dev/eligible",
    ];

    pub fn string() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(TRICKY).prop_map(str::to_owned),
            2 => "\\PC{0,24}",
            1 => any::<String>(),
            1 => (1usize..5000).prop_map(|n| "a".repeat(n)),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(KEYS).prop_map(str::to_owned),
            1 => string(),
        ]
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            // Non-finite floats become null.
            any::<f64>().prop_map(Value::from),
            string().prop_map(Value::String),
        ]
    }

    /// Any JSON value, a few levels deep.
    pub fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Replace(Value),
        RemoveChild(Index),
        AddChild(String, Value),
        DuplicateChild(Index),
        /// Replaces one of the strings: most fields here are strings with a syntax of their own.
        BendString(Index, String),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            3 => value().prop_map(Mutation::Replace),
            2 => any::<Index>().prop_map(Mutation::RemoveChild),
            1 => (key(), value()).prop_map(|(k, v)| Mutation::AddChild(k, v)),
            1 => any::<Index>().prop_map(Mutation::DuplicateChild),
            4 => (any::<Index>(), string()).prop_map(|(at, s)| Mutation::BendString(at, s)),
        ]
    }

    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }

    fn strings(v: &mut Value) -> Vec<&mut String> {
        match v {
            Value::String(s) => vec![s],
            Value::Array(a) => a.iter_mut().flat_map(strings).collect(),
            Value::Object(o) => o.values_mut().flat_map(strings).collect(),
            _ => Vec::new(),
        }
    }

    fn apply(root: &mut Value, at: Index, m: Mutation) {
        if let Mutation::BendString(which, text) = m {
            let mut all = strings(root);
            if !all.is_empty() {
                let i = which.index(all.len());
                *all[i] = text;
            }
            return;
        }
        let node = select(root, at.index(count(root)));
        match m {
            Mutation::Replace(v) => *node = v,
            Mutation::RemoveChild(i) => match node {
                Value::Array(a) if !a.is_empty() => {
                    a.remove(i.index(a.len()));
                }
                Value::Object(o) if !o.is_empty() => {
                    let k = o.keys().nth(i.index(o.len())).cloned().unwrap_or_default();
                    o.remove(&k);
                }
                _ => {}
            },
            Mutation::AddChild(k, v) => match node {
                Value::Array(a) => a.push(v),
                Value::Object(o) => {
                    o.insert(k, v);
                }
                _ => {}
            },
            Mutation::DuplicateChild(i) => {
                if let Value::Array(a) = node
                    && !a.is_empty()
                {
                    let copy = a[i.index(a.len())].clone();
                    a.push(copy);
                }
            }
            Mutation::BendString(..) => unreachable!("applied above"),
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

    /// `template`, with up to `max` mutations (none in some cases, so the template itself is
    /// exercised too).
    pub fn mutated(template: Value, max: usize) -> impl Strategy<Value = Value> {
        prop::collection::vec((any::<Index>(), mutation()), 0..=max).prop_map(move |ms| {
            let mut v = template.clone();
            for (at, m) in ms {
                apply(&mut v, at, m);
            }
            v
        })
    }
}

/// Whether a serde error says what it did not like, not just that something failed.
fn assert_says_what(error: &str) {
    const WHAT: &[&str] = &[
        "invalid",
        "missing field",
        "unknown variant",
        "unknown field",
        "expected",
        "duplicate field",
        "recursion limit",
        "repetition limit",
        "did not contain valid UTF-8",
        ", not a mapping",
    ];
    assert!(
        WHAT.iter().any(|w| error.contains(w)),
        "the error does not say what is wrong: {error:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Policy specs.

const REASONS: &[&str] = &[
    "NoSelectors",
    "InvalidSelector",
    "NoDestinations",
    "InvalidCIDR",
    "NoGateway",
    "InterfaceAndEgressIP",
    "InvalidInterface",
    "InvalidEgressIP",
    "InvalidMaxGatewayNodes",
];

fn spec_template() -> Value {
    json!({
        "selectors": [
            {
                "podSelector": {
                    "matchLabels": {"app": "web"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]
                },
                "nodeSelector": {"matchExpressions": [{"key": "zone", "operator": "Exists"}]}
            },
            {"namespaceSelector": {"matchLabels": {"team": "blue"}}}
        ],
        "destinationCIDRs": ["203.0.113.0/24", "2001:db8::/64"],
        "excludedCIDRs": ["203.0.113.7/32"],
        "egressGateway": {
            "nodeSelector": {"matchLabels": {"egress": "true"}},
            "interface": "eth1",
            "maxGatewayNodes": 2
        },
        "egressGateways": [
            {"nodeSelector": {"matchLabels": {"egress": "a"}}, "egressIP": "192.0.2.1"},
            {"nodeSelector": {}}
        ],
        "failurePolicy": "Fallback"
    })
}

fn policy_template() -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "EgressGatewayPolicy",
        "metadata": {
            "name": "web", "generation": 3, "creationTimestamp": "2024-01-02T03:04:05Z",
            "labels": {"a": "b"}
        },
        "spec": spec_template(),
        "status": {
            "observedGeneration": 3,
            "conditions": [{
                "type": "Accepted", "status": "True", "reason": "Valid", "message": "",
                "lastTransitionTime": "2024-01-02T03:04:05Z"
            }],
            "gateways": [{"node": "n1", "ip": "192.0.2.11", "egressIP": "192.0.2.101", "entry": 0, "slot": 0}],
            "matchedEndpoints": 4,
            "conflicts": [{"policy": "other", "entries": 2}]
        }
    })
}

/// What Linux accepts as an interface name (`dev_valid_name` in net/core/dev.c, with the
/// kernel's own `isspace`, which counts 0xA0 as a space).
fn is_interface_name(name: &str) -> bool {
    const FORBIDDEN: &[u8] = b"/:\0 \t\n\x0b\x0c\r\xa0";
    !name.is_empty()
        && name.len() < 16
        && !matches!(name, "." | "..")
        && name.bytes().all(|b| !FORBIDDEN.contains(&b))
}

/// Parses a spec; a rejection must name a field with a known reason, an acceptance must hold
/// only what the datapath can use.
fn check_parse(spec: &EgressGatewayPolicySpec) {
    match policy::parse(spec) {
        Err(e) => {
            assert!(REASONS.contains(&e.reason), "unknown reason {:?}", e.reason);
            assert!(e.message.contains("spec."), "{:?} names no field", e.message);
        }
        Ok(c) => {
            assert_eq!(c.rules.len(), spec.selectors.len());
            assert!(!c.destinations.is_empty());
            assert!(c.destinations.iter().chain(&c.excluded).all(|n| *n == n.trunc()));
            let gateways = if spec.egress_gateways.is_empty() {
                1
            } else {
                spec.egress_gateways.len()
            };
            assert_eq!(c.gateways.len(), gateways);
            for g in &c.gateways {
                assert!((1..=MAX_GATEWAY_NODES).contains(&g.max_nodes));
                if let policy::EgressSource::Interface(name) = &g.egress {
                    assert!(is_interface_name(name), "accepted interface {name:?}");
                }
            }
        }
    }
}

fn check_spec_json(v: Value) {
    match serde_json::from_value::<EgressGatewayPolicySpec>(v) {
        Err(e) => assert_says_what(&e.to_string()),
        Ok(spec) => check_parse(&spec),
    }
}

/// The whole object, as the API server hands it to the controller. Its decoding errors are
/// serde's and k8s-openapi's (timestamps, quantities): only the spec has to be ours.
fn check_policy_json(v: Value) {
    match serde_json::from_value::<EgressGatewayPolicy>(v) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(p) => check_parse(&p.spec),
    }
}

/// One field of an otherwise valid spec, broken.
#[derive(Debug, Clone)]
enum Break {
    Cidr { excluded: bool, at: Index, text: String },
    Operator { rule: Index, operator: String },
    EmptyRule { rule: Index },
    EgressIp { gateway: Index, ip: &'static str },
    Interface { gateway: Index, name: &'static str },
    MaxNodes { gateway: Index, max: u32 },
    NoSelectors,
    NoDestinations,
    NoGateway,
}

fn bad_cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "1.2.3.4",
            "10.0.0.0/33",
            "",
            "::1/129",
            "fe80::1%eth0/64",
            "a.b.c.d/8",
            "10.0.0.0 /8",
            "10.0.0.0/08x",
            "/8",
            "10.0.0.0/",
        ])
        .prop_map(str::to_owned),
        shaped::string(),
    ]
    .prop_filter("must not be a CIDR", |s| {
        s.trim().parse::<ipnet::IpNet>().is_err()
    })
}

fn breakage() -> impl Strategy<Value = Break> {
    prop_oneof![
        (any::<bool>(), any::<Index>(), bad_cidr()).prop_map(|(excluded, at, text)| Break::Cidr {
            excluded,
            at,
            text
        }),
        (any::<Index>(), shaped::string())
            .prop_filter("an unknown operator", |(_, o)| {
                !["In", "NotIn", "Exists", "DoesNotExist"].contains(&o.as_str())
            })
            .prop_map(|(rule, operator)| Break::Operator { rule, operator }),
        any::<Index>().prop_map(|rule| Break::EmptyRule { rule }),
        (
            any::<Index>(),
            prop::sample::select(vec!["fe80::1%eth0", "1.2.3", "10.0.0.1/32", "x", "256.1.1.1"])
        )
            .prop_map(|(gateway, ip)| Break::EgressIp { gateway, ip }),
        (
            any::<Index>(),
            prop::sample::select(vec![
                "a/b",
                "eth 0",
                "eth0:1",
                "0123456789abcdef",
                "eth\t0",
                "eth\n0",
                "eth\u{0}",
                ".",
                "..",
                " eth0",
                "eth\u{a0}0",
            ])
        )
            .prop_map(|(gateway, name)| Break::Interface { gateway, name }),
        (any::<Index>(), prop_oneof![Just(0u32), 65u32..])
            .prop_map(|(gateway, max)| Break::MaxNodes { gateway, max }),
        Just(Break::NoSelectors),
        Just(Break::NoDestinations),
        Just(Break::NoGateway),
    ]
}

/// A valid spec: (spec, rules, destinations, excluded, gateways in `egressGateways`).
fn valid_spec() -> impl Strategy<Value = Value> {
    let cidr = (any::<[u8; 4]>(), 0u8..=32)
        .prop_map(|(a, len)| format!("{}.{}.{}.{}/{len}", a[0], a[1], a[2], a[3]));
    let rule = (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(pods, ns, nodes)| {
        let mut r = serde_json::Map::new();
        if pods || !ns {
            r.insert("podSelector".into(), json!({"matchLabels": {"app": "web"}}));
        }
        if ns {
            r.insert(
                "namespaceSelector".into(),
                json!({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["x"]}]}),
            );
        }
        if nodes {
            r.insert("nodeSelector".into(), json!({}));
        }
        Value::Object(r)
    });
    let gateway = (0u8..4, 1u32..=MAX_GATEWAY_NODES).prop_map(|(how, max)| {
        let mut g = json!({"nodeSelector": {"matchLabels": {"egress": "true"}}, "maxGatewayNodes": max});
        match how {
            0 => g["interface"] = json!("eth1"),
            // One address the node holds: one gateway node (more would each hold it).
            1 => {
                g["egressIP"] = json!("192.0.2.1");
                g["maxGatewayNodes"] = json!(1);
            }
            // Managed addresses: at least one per gateway node.
            2 => g["egressIPs"] = json!((1..=max).map(|k| format!("100.64.0.{k}")).collect::<Vec<_>>()),
            _ => {}
        }
        g
    });
    (
        prop::collection::vec(rule, 1..4),
        prop::collection::vec(cidr.clone(), 1..5),
        prop::collection::vec(cidr, 0..3),
        prop::collection::vec(gateway, 1..4),
        any::<bool>(),
    )
        .prop_map(|(rules, destinations, excluded, mut gateways, single)| {
            // A managed address belongs to one entry's slot: each entry its own range.
            for (i, g) in gateways.iter_mut().enumerate() {
                if let Some(ips) = g.get_mut("egressIPs").and_then(Value::as_array_mut) {
                    for (k, ip) in ips.iter_mut().enumerate() {
                        *ip = json!(format!("100.64.{i}.{}", k + 1));
                    }
                }
            }
            let mut spec = json!({
                "selectors": rules,
                "destinationCIDRs": destinations,
                "excludedCIDRs": excluded,
            });
            if single {
                spec["egressGateway"] = gateways[0].clone();
            } else {
                spec["egressGateways"] = json!(gateways);
            }
            spec
        })
}

/// Applies `b` to a valid spec; returns the reason and the field the rejection must name.
fn break_spec(spec: &mut Value, b: &Break) -> (&'static str, String) {
    fn gateway<'a>(spec: &'a mut Value, at: &Index) -> (String, &'a mut Value) {
        match spec.get("egressGateways").and_then(Value::as_array).map(Vec::len) {
            Some(n) => {
                let i = at.index(n);
                (
                    format!("spec.egressGateways[{i}]"),
                    &mut spec["egressGateways"][i],
                )
            }
            None => ("spec.egressGateway".to_owned(), &mut spec["egressGateway"]),
        }
    }
    match b {
        Break::Cidr { excluded, at, text } => {
            let field = if *excluded {
                "excludedCIDRs"
            } else {
                "destinationCIDRs"
            };
            let list = spec[field].as_array_mut().unwrap();
            let i = at.index(list.len() + 1);
            list.insert(i, json!(text));
            ("InvalidCIDR", format!("spec.{field}[{i}]"))
        }
        Break::Operator { rule, operator } => {
            let rules = spec["selectors"].as_array_mut().unwrap();
            let i = rule.index(rules.len());
            rules[i]["nodeSelector"] =
                json!({"matchExpressions": [{"key": "k", "operator": operator, "values": ["v"]}]});
            ("InvalidSelector", format!("spec.selectors[{i}].nodeSelector"))
        }
        Break::EmptyRule { rule } => {
            let rules = spec["selectors"].as_array_mut().unwrap();
            let i = rule.index(rules.len());
            rules[i] = json!({"nodeSelector": {}});
            ("InvalidSelector", format!("spec.selectors[{i}]"))
        }
        Break::EgressIp { gateway: at, ip } => {
            let (field, g) = gateway(spec, at);
            g.as_object_mut().unwrap().remove("interface");
            g.as_object_mut().unwrap().remove("egressIPs");
            g["egressIP"] = json!(ip);
            ("InvalidEgressIP", format!("{field}.egressIP"))
        }
        Break::Interface { gateway: at, name } => {
            let (field, g) = gateway(spec, at);
            g.as_object_mut().unwrap().remove("egressIP");
            g["interface"] = json!(name);
            ("InvalidInterface", format!("{field}.interface"))
        }
        Break::MaxNodes { gateway: at, max } => {
            let (field, g) = gateway(spec, at);
            g["maxGatewayNodes"] = json!(max);
            ("InvalidMaxGatewayNodes", format!("{field}.maxGatewayNodes"))
        }
        Break::NoSelectors => {
            spec["selectors"] = json!([]);
            ("NoSelectors", "spec.selectors".to_owned())
        }
        Break::NoDestinations => {
            spec["destinationCIDRs"] = json!([]);
            ("NoDestinations", "spec.destinationCIDRs".to_owned())
        }
        Break::NoGateway => {
            let o = spec.as_object_mut().unwrap();
            o.remove("egressGateway");
            o.remove("egressGateways");
            ("NoGateway", "spec.egressGateway".to_owned())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn policy_specs_shaped_like_real_ones(v in shaped::mutated(spec_template(), 4)) {
        check_spec_json(v);
    }

    #[test]
    fn policies_shaped_like_real_ones(v in shaped::mutated(policy_template(), 4)) {
        check_policy_json(v);
    }

    #[test]
    fn arbitrary_json_as_a_policy(v in shaped::value()) {
        check_spec_json(v.clone());
        check_policy_json(v);
    }

    #[test]
    fn a_broken_field_is_named(spec in valid_spec(), b in breakage()) {
        let parsed: EgressGatewayPolicySpec = serde_json::from_value(spec.clone()).unwrap();
        prop_assert!(policy::parse(&parsed).is_ok(), "{:?}", policy::parse(&parsed));
        let mut broken = spec;
        let (reason, field) = break_spec(&mut broken, &b);
        let parsed: EgressGatewayPolicySpec = serde_json::from_value(broken).unwrap();
        let e = policy::parse(&parsed).unwrap_err();
        prop_assert_eq!(e.reason, reason, "{}", e.message);
        prop_assert!(e.message.contains(&field), "{:?} should name {}", e.message, field);
    }
}

// ---------------------------------------------------------------------------------------------
// Manifest directories.

fn interfaces_template() -> Value {
    json!([
        {"name": "eth1", "addresses": ["192.0.2.10", "2001:db8::10"], "defaultRoute": false},
        {"name": "eth0", "addresses": ["10.0.0.5"], "defaultRoute": true}
    ])
}

fn node_template(interfaces: String) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": "n1", "labels": {"egress": "true"},
            "annotations": {"sluice.dev/interfaces": interfaces, "sluice.dev/eligible": "true"}
        },
        "status": {
            "addresses": [{"type": "InternalIP", "address": "192.0.2.11"}, {"type": "ExternalIP", "address": "198.51.100.11"}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

fn templates() -> Vec<Value> {
    let cilium = {
        let mut p = policy_template();
        p["apiVersion"] = json!("cilium.io/v2");
        p["kind"] = json!("CiliumEgressGatewayPolicy");
        p
    };
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "hostNetwork": false, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}, {"ip": "fd00::10"}]}
    });
    let namespace = json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "blue"}}
    });
    let other =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}});
    let node = node_template(interfaces_template().to_string());
    let list = json!({
        "apiVersion": "v1", "kind": "List",
        "items": [node.clone(), pod.clone(), {"apiVersion": "v1", "kind": "List", "items": [namespace.clone()]}]
    });
    vec![node, pod, namespace, policy_template(), cilium, other, list]
}

/// A manifest document: a mutated object of one of the kinds read, or nothing at all.
fn document() -> impl Strategy<Value = Value> {
    let node_with_bent_annotation = shaped::mutated(interfaces_template(), 3)
        .prop_map(|interfaces| node_template(interfaces.to_string()));
    prop_oneof![
        8 => prop::sample::select(templates()).prop_flat_map(|t| shaped::mutated(t, 3)),
        2 => node_with_bent_annotation,
        1 => Just(Value::Null),
        1 => shaped::value(),
    ]
}

/// How many objects a document that was read holds (a `List` holds its items).
fn objects_in(v: &Value) -> usize {
    match v {
        Value::Null => 0,
        _ if v["kind"] == "List"
            && v["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .split_once('/')
                .is_none_or(|(group, _)| group.is_empty()) =>
        {
            v["items"]
                .as_array()
                .map_or(0, |items| items.iter().map(objects_in).sum())
        }
        _ => 1,
    }
}

fn read_one_file(
    name: &str,
    bytes: &[u8],
) -> (
    tempfile::TempDir,
    Result<manifests::Manifests, manifests::ManifestError>,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(name), bytes).unwrap();
    let result = manifests::read_dir(dir.path());
    (dir, result)
}

/// Whether a rejection of an object says which field is wrong: `items[0]: invalid Pod:
/// spec.containers[0].name: invalid type ...`, or `missing field `spec``.
fn names_a_field(message: &str) -> bool {
    let mut rest = message;
    while let Some(r) = rest.strip_prefix("items[") {
        rest = r.split_once("]: ").map_or("", |(_, r)| r);
    }
    let rest = rest
        .strip_prefix("not a Kubernetes object: ")
        .or_else(|| {
            rest.strip_prefix("invalid ")
                .and_then(|r| r.split_once(": ").map(|(_, r)| r))
        })
        .unwrap_or(rest);
    ["missing field", "unknown field", "duplicate field", "annotation "]
        .iter()
        .any(|w| rest.starts_with(w))
        || rest.ends_with(", not a mapping with apiVersion and kind")
        || rest.starts_with("the key ")
        || rest.split_once(": ").is_some_and(|(path, _)| {
            // A path (its keys may hold anything), not the start of serde's own message.
            const SERDE: &[&str] = &["invalid ", "unknown ", "expected ", "failed "];
            !path.is_empty() && !SERDE.iter().any(|s| path.starts_with(s))
        })
}

/// A rejection names the file, and the document when the file could be read.
fn check_manifest_error(e: &manifests::ManifestError, file: &str, documents: Option<usize>) {
    let text = e.to_string();
    assert!(text.contains(file), "{text:?} does not name the file");
    match e {
        manifests::ManifestError::Io { .. } => assert_says_what(&text),
        manifests::ManifestError::Document {
            document, message, ..
        } => {
            assert!(text.contains(&format!("document {document}")), "{text:?}");
            if let Some(n) = documents {
                assert!((1..=n).contains(document), "document {document} of {n}");
            }
            assert!(
                message.starts_with("not valid YAML: ")
                    || message.contains("not a Kubernetes object: ")
                    || message.contains("invalid "),
                "{message:?}"
            );
            match message.strip_prefix("not valid YAML: ") {
                // A syntax error says where it is.
                // What the YAML library says (with a line and column when it knows them).
                Some(syntax) => assert!(syntax.len() > 10, "{message:?}"),
                None => assert!(names_a_field(message), "{message:?} names no field"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn manifest_files_of_arbitrary_bytes(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        "\\PC{0,512}".prop_map(String::into_bytes),
        prop::collection::vec(prop::sample::select(vec![
            "---\n", "...\n", "- ", ": ", "a", "{", "}", "[", "]", "&x ", "*x ", "!!str ", "? ", "|\n", "  ", "\n", "\t", "\"", "'",
            "kind: Node\n", "apiVersion: v1\n", "items:\n",
        ]), 0..64).prop_map(|parts| parts.concat().into_bytes()),
    ], yml in any::<bool>()) {
        let name = if yml { "input.yml" } else { "input.yaml" };
        let (_dir, result) = read_one_file(name, &bytes);
        if let Err(e) = result {
            check_manifest_error(&e, name, None);
        }
    }

    #[test]
    fn manifest_files_shaped_like_real_ones(docs in prop::collection::vec(document(), 0..6)) {
        let text: String = docs
            .iter()
            .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
            .collect();
        let (_dir, result) = read_one_file("cluster.yaml", text.as_bytes());
        match result {
            Err(e) => {
                check_manifest_error(&e, "cluster.yaml", Some(docs.len()));
                // The document named is one that is wrong on its own.
                let manifests::ManifestError::Document { document, .. } = e else {
                    panic!("{e}");
                };
                let alone = serde_yaml::to_string(&docs[document - 1]).unwrap();
                prop_assert!(
                    manifests::Manifests::default().add_file(Path::new("x.yaml"), &alone).is_err(),
                    "document {} is fine on its own:\n{}", document, alone
                );
            }
            Ok(m) => {
                let read = m.nodes.len() + m.namespaces.len() + m.pods.len() + m.policies.len() + m.ignored.len();
                prop_assert_eq!(read, docs.iter().map(objects_in).sum::<usize>(), "an object was dropped");
                for ignored in &m.ignored {
                    prop_assert!(ignored.contains("cluster.yaml: document "), "{}", ignored);
                }
            }
        }
    }
}

#[test]
fn manifest_edge_cases_are_read_or_named() {
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let wide = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}",
        "- {apiVersion: v1, kind: Namespace, metadata: {name: ns}}\n".repeat(20_000)
    );
    // Nine levels of nine aliases each: 9^9 nodes if expanded.
    let mut bomb = String::from("a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\n");
    for (prev, next) in ('a'..='i').zip('b'..='j') {
        bomb += &format!(
            "{next}: &{next} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        );
    }
    let huge_string = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n",
        "n".repeat(5 << 20)
    );
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("empty", Vec::new(), None),
        ("separators only", b"---\n---\n...\n---\n".to_vec(), None),
        (
            "a scalar",
            b"hello\n".to_vec(),
            Some("document 1: not a Kubernetes object"),
        ),
        (
            "not UTF-8",
            vec![b'a', 0xff, 0xfe, b'\n'],
            Some("stream did not contain valid UTF-8"),
        ),
        (
            "deep nesting",
            deep.into_bytes(),
            Some("document 1: not valid YAML: recursion limit exceeded"),
        ),
        (
            "alias bomb",
            bomb.into_bytes(),
            Some("document 1: not valid YAML: repetition limit exceeded"),
        ),
        (
            "kind of the wrong type",
            b"kind: [Node]\n".to_vec(),
            Some("document 1: not a Kubernetes object"),
        ),
        (
            "second document broken",
            b"kind: Namespace\napiVersion: v1\n---\nkind: Pod\napiVersion: v1\nspec: 7\n".to_vec(),
            Some("document 2: invalid Pod"),
        ),
        ("huge string", huge_string.into_bytes(), None),
        ("wide list", wide.into_bytes(), None),
    ];
    for (what, bytes, want) in cases {
        let (_dir, result) = read_one_file("edge.yaml", &bytes);
        match (result, want) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => {
                check_manifest_error(&e, "edge.yaml", None);
                assert!(e.to_string().contains(want), "{what}: {e} should say {want:?}");
            }
            (result, want) => panic!("{what}: {:?}, wanted {want:?}", result.map(|m| m.ignored.len())),
        }
    }
}

/// Regressions: rejections that used to say only what serde expected, not where.
#[test]
fn manifest_rejections_name_the_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ns, labels: {team: [a]}}\n",
            "document 1: invalid Namespace: metadata.labels.team: invalid type: sequence, expected a string",
        ),
        (
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, status: {podIPs: 7}}\n",
            "document 1: items[0]: invalid Pod: status.podIPs: invalid type: integer `7`, expected a sequence",
        ),
        (
            "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata: {name: p}\n\
             spec: {selectors: [{podSelector: {}}], destinationCIDRs: [0.0.0.0/0], failurePolicy: Later}\n",
            "invalid EgressGatewayPolicy: spec.failurePolicy: unknown variant `Later`",
        ),
        (
            "apiVersion: v2\nkind: Node\nmetadata: {name: n1}\n",
            "document 1: invalid Node: apiVersion: \"v2\" is not v1",
        ),
        (
            "- a\n- b\n",
            "document 1: not a Kubernetes object: a sequence, not a mapping with apiVersion and kind",
        ),
        (
            "kind: [Node]\n",
            "document 1: not a Kubernetes object: kind: invalid type: sequence",
        ),
        (
            "? \n",
            "document 1: not a Kubernetes object: the key null is not a string",
        ),
        (
            "[a]: b\n",
            "document 1: not a Kubernetes object: the key - a is not a string",
        ),
    ];
    for (text, want) in cases {
        let e = manifests::Manifests::default()
            .add_file(Path::new("m.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e:?} should say {want:?}");
    }
    // An empty list item is skipped like an empty document, not taken for an object with no kind.
    let mut m = manifests::Manifests::default();
    let list = "apiVersion: v1\nkind: List\n\
                items: [null, {apiVersion: v1, kind: Namespace, metadata: {name: ns}}]\n";
    m.add_file(Path::new("m.yaml"), list).unwrap();
    assert_eq!((m.namespaces.len(), m.ignored.len()), (1, 0));
}

// ---------------------------------------------------------------------------------------------
// `convert`: Cilium YAML from the user.

fn check_convert(text: &str, documents: Option<usize>) {
    match convert::convert(text) {
        Ok(c) => {
            // What it prints must be read back as the policies it counted.
            let mut m = manifests::Manifests::default();
            m.add_file(Path::new("converted.yaml"), &c.yaml)
                .unwrap_or_else(|e| panic!("convert printed YAML that does not read back: {e}\n{}", c.yaml));
            assert_eq!(m.policies.len(), c.converted);
        }
        Err(e) => {
            if let Some(n) = documents {
                assert!((1..=n).contains(&e.document), "document {} of {n}", e.document);
            }
            assert!(!e.message.is_empty());
            assert!(e.to_string().starts_with(&format!("document {}", e.document)));
            for part in ["invalid spec: ", "invalid metadata: "] {
                if let Some((_, rest)) = e.message.split_once(part) {
                    assert!(names_a_field(rest), "{:?} names no field", e.message);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn convert_arbitrary_text(text in "\\PC{0,512}") {
        check_convert(&text, None);
    }

    #[test]
    fn convert_shaped_cilium_policies(docs in prop::collection::vec(
        prop::sample::select(templates()).prop_flat_map(|mut t| {
            if t["kind"] == "EgressGatewayPolicy" {
                t["apiVersion"] = json!("cilium.io/v2");
                t["kind"] = json!("CiliumEgressGatewayPolicy");
            }
            shaped::mutated(t, 3)
        }),
        0..4,
    )) {
        let text: String = docs
            .iter()
            .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
            .collect();
        check_convert(&text, Some(docs.len()));
    }
}

// ---------------------------------------------------------------------------------------------
// The shim's `Hello`, as the operator decodes it off the wire.

fn hello_template() -> v2::Hello {
    v2::Hello {
        node: "node-a.example".into(),
        version: "0.1.0".into(),
        interfaces: vec![
            v2::Interface {
                name: "eth0".into(),
                addresses: ["192.0.2.11", "2001:db8::11"]
                    .iter()
                    .map(|a| sluice_proto::convert::ip_to_wire(a.parse().unwrap()))
                    .collect(),
                networks: vec![sluice_proto::convert::prefix_to_wire(
                    "192.0.2.0/24".parse().unwrap(),
                )],
            },
            v2::Interface {
                name: "eth1".into(),
                addresses: vec![],
                networks: vec![],
            },
        ],
        default_route_interface: Some("eth0".into()),
        ..Default::default()
    }
}

/// Whether Kubernetes could have named a node so (an RFC 1123 subdomain).
fn is_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn check_hello(hello: &v2::Hello) {
    match grpc::check_hello(hello) {
        Ok(interfaces) => {
            assert!(is_node_name(&hello.node), "accepted node {:?}", hello.node);
            assert_eq!(interfaces.len(), hello.interfaces.len());
            for (got, sent) in interfaces.iter().zip(&hello.interfaces) {
                assert!(is_interface_name(&got.name), "accepted interface {:?}", got.name);
                assert_eq!(
                    got.addresses.len(),
                    sent.addresses.len(),
                    "an address was dropped"
                );
            }
        }
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            let m = status.message();
            assert!(m.starts_with("hello: "), "{m:?}");
            assert!(
                m.contains("node") || m.contains("interfaces["),
                "{m:?} names no field"
            );
        }
    }
}

fn interface() -> impl Strategy<Value = v2::Interface> {
    let address = prop_oneof![
        3 => any::<std::net::IpAddr>().prop_map(sluice_proto::convert::ip_to_wire),
        1 => prop::collection::vec(any::<u8>(), 0..20),
    ];
    let name = prop_oneof![
        3 => "[a-z][a-z0-9]{0,14}",
        1 => shaped::string(),
    ];
    // Subnets: well-formed, with host bits set, too long, or of no family.
    let network = (prop::collection::vec(any::<u8>(), 0..20), 0u32..200)
        .prop_map(|(address, length)| v2::Prefix { address, length });
    (
        name,
        prop::collection::vec(address, 0..4),
        prop::collection::vec(network, 0..3),
    )
        .prop_map(|(name, addresses, networks)| v2::Interface {
            name,
            addresses,
            networks,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn shim_messages_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        use prost::Message;
        if let Ok(v2::ShimMessage { message: Some(v2::shim_message::Message::Hello(hello)) }) =
            v2::ShimMessage::decode(bytes.as_slice())
        {
            check_hello(&hello);
        }
    }

    #[test]
    fn hellos_shaped_like_real_ones(
        node in prop_oneof![
            3 => "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?",
            1 => shaped::string(),
            1 => (1usize..400).prop_map(|n| "n".repeat(n)),
        ],
        interfaces in prop::collection::vec(interface(), 0..5),
        default_route in prop::option::of(shaped::string()),
    ) {
        check_hello(&hello_template());
        let hello = v2::Hello { node, interfaces, default_route_interface: default_route, ..hello_template() };
        check_hello(&hello);
    }

    #[test]
    fn hellos_with_bytes_flipped(flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6)) {
        use prost::Message;
        let mut bytes = v2::ShimMessage {
            message: Some(v2::shim_message::Message::Hello(hello_template())),
        }
        .encode_to_vec();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        match v2::ShimMessage::decode(bytes.as_slice()) {
            Ok(v2::ShimMessage { message: Some(v2::shim_message::Message::Hello(hello)) }) => check_hello(&hello),
            Ok(_) => {}
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.len() > "failed to decode Protobuf message: ".len(), "{}", e);
            }
        }
    }
}

/// Regressions: a hello used to be checked for an empty node name only, and addresses that did
/// not parse were dropped without a word.
#[test]
fn hellos_that_are_refused_say_why() {
    type Bend = fn(&mut v2::Hello);
    let cases: [(Bend, &str); 6] = [
        (|h| h.node.clear(), "hello: the node name is empty"),
        (
            |h| h.node = "Node-A".into(),
            "hello: node \"Node-A\" is not a Kubernetes node name",
        ),
        (
            |h| h.node = "../etc".into(),
            "hello: node \"../etc\" is not a Kubernetes node name",
        ),
        (|h| h.node = "n".repeat(300), "(300 bytes)"),
        (
            |h| h.interfaces[1].name = "eth 1".into(),
            "hello: interfaces[1].name \"eth 1\" is not an interface name",
        ),
        (
            |h| h.interfaces[0].addresses[1] = vec![10, 0, 0],
            "hello: interfaces[0].addresses[1]: invalid address: 3 octets",
        ),
    ];
    for (bend, want) in cases {
        let mut hello = hello_template();
        bend(&mut hello);
        let status = grpc::check_hello(&hello).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains(want),
            "{:?} should say {want:?}",
            status.message()
        );
    }
}

#[test]
fn the_hello_template_is_accepted() {
    let interfaces = grpc::check_hello(&hello_template()).unwrap();
    assert_eq!(interfaces.len(), 2);
    assert!(interfaces[0].default_route);
    assert_eq!(interfaces[0].addresses.len(), 2);
}
