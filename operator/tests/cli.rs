//! `sluice-operator plan` as a user runs it.

use std::process::Command;

use sluice_proto::{GatewayTarget, PlanDocument};

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice-operator"))
}

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn plan_json_of_the_quickstart_example() {
    let out = operator()
        .args(["plan", "--output", "json", "--manifests"])
        .arg(examples().join("quickstart"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: PlanDocument = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["node-a", "node-b", "node-c"]
    );
    let policy = &doc.policies[0];
    assert!(policy.accepted);
    assert_eq!(policy.matched_endpoints, 2, "web-1 is not a checkout pod");
    let gateway = &policy.gateways[0];
    assert!(["node-b", "node-c"].contains(&gateway.node.as_str()));
    // Every source node steers to the gateway, except the excluded status page.
    for node in ["node-a", "node-b"] {
        for e in &doc.node(node).unwrap().entries {
            if e.key.destination.to_string() == "198.51.100.7/32" {
                assert_eq!(e.gateway, GatewayTarget::Excluded);
            } else if node != gateway.node {
                assert_eq!(e.gateway, GatewayTarget::Node(gateway.ip));
                assert_eq!(e.egress_ip, None);
            }
        }
    }
    let gw_entries = &doc.node(&gateway.node).unwrap().entries;
    assert!(
        gw_entries
            .iter()
            .any(|e| e.egress_ip == Some("203.0.113.10".parse().unwrap()))
    );
}

#[test]
fn plan_table_is_for_people() {
    let out = operator()
        .args(["plan", "--manifests"])
        .arg(examples().join("quickstart"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("NODE"), "{text}");
    assert!(text.contains("checkout-to-psp  true"), "{text}");
}

#[test]
fn malformed_documents_are_named_and_fail_the_command() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ok.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.yml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\nkind: Pod\nmetadata: [not, a, map\n",
    )
    .unwrap();
    let out = operator()
        .args(["plan", "--manifests"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("broken.yml: document 2"), "{err}");

    std::fs::write(
        dir.path().join("broken.yml"),
        "apiVersion: v1\nkind: Pod\nspec: {nodeName: [1]}\n",
    )
    .unwrap();
    let out = operator()
        .args(["plan", "--manifests"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("broken.yml: document 1: invalid Pod"), "{err}");
}

#[test]
fn invalid_policies_are_reported_and_the_rest_is_planned() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("all.yaml"),
        r#"
apiVersion: v1
kind: Node
metadata: {name: gw, labels: {egress: "yes"}}
status: {addresses: [{type: InternalIP, address: 192.168.1.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: default, labels: {app: a}}
spec: {nodeName: gw}
status: {podIPs: [{ip: 10.0.0.1}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: sluice.dev/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: broken}
spec:
  selectors: [{podSelector: {matchLabels: {app: a}}}]
  destinationCIDRs: [203.0.113.0/24]
  egressGateway: {nodeSelector: {}, interface: eth1, egressIP: 192.0.2.1}
---
apiVersion: sluice.dev/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: fine}
spec:
  selectors: [{podSelector: {matchLabels: {app: a}}}]
  destinationCIDRs: [198.51.100.0/24]
  egressGateway: {nodeSelector: {matchLabels: {egress: "yes"}}}
"#,
    )
    .unwrap();
    let out = operator()
        .args(["plan", "--output", "json", "--manifests"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ignoring"),
        "the Deployment is mentioned"
    );
    let doc: PlanDocument = serde_json::from_slice(&out.stdout).unwrap();
    let broken = doc.policies.iter().find(|p| p.name == "broken").unwrap();
    assert!(!broken.accepted);
    assert_eq!(broken.reason.as_deref(), Some("InterfaceAndEgressIP"));
    let fine = doc.policies.iter().find(|p| p.name == "fine").unwrap();
    assert!(fine.accepted);
    assert_eq!(doc.node("gw").unwrap().entries.len(), 1);
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let out = operator()
        .args(["plan", "--manifests", "/nonexistent/sluice"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/sluice"));
}

#[test]
fn lease_timings_that_could_elect_two_leaders_are_refused() {
    for (args, want) in [
        (
            &["--lease-renew-deadline", "12s"][..],
            "--lease-renew-deadline (12s) must be shorter than --lease-duration (10s)",
        ),
        (
            &["--lease-retry-period", "7s"][..],
            "--lease-retry-period (7s) must be above zero and shorter than --lease-renew-deadline (7s)",
        ),
        (
            &["--lease-duration", "9.5s"][..],
            "--lease-duration must be a whole number of seconds",
        ),
    ] {
        let out = operator()
            .args([
                "run",
                "--source",
                "dir:/nonexistent/sluice",
                "--insecure-allow-any-node",
            ])
            .args(["--metrics-listen", "off", "--grpc-listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn plan_json_lists_the_in_cluster_set_on_every_node() {
    let out = operator()
        .args([
            "plan",
            "--output",
            "json",
            "--service-cidr",
            "10.96.0.0/12",
            "--manifests",
        ])
        .arg(examples().join("quickstart"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = serde_json::json!([
        "10.96.0.0/12",
        "10.244.1.0/24",
        "10.244.2.0/24",
        "10.244.3.0/24",
        "192.168.1.1/32",
        "192.168.1.2/32",
        "192.168.1.3/32"
    ]);
    for node in json["nodes"].as_array().unwrap() {
        assert_eq!(node["clusterCIDRs"], expected, "{}", node["name"]);
    }

    // The demo's ServiceCIDR object counts like the flag.
    let out = operator()
        .args(["plan", "--output", "json", "--manifests"])
        .arg(examples().join("demo"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: PlanDocument = serde_json::from_slice(&out.stdout).unwrap();
    let n2: Vec<String> = doc
        .node("n2")
        .unwrap()
        .cluster_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        n2,
        [
            "10.96.0.0/16",
            "10.244.1.0/24",
            "10.244.2.0/24",
            "10.244.3.0/24",
            "192.0.2.11/32",
            "192.0.2.12/32",
            "192.0.2.13/32"
        ]
    );
}
