//! The CRD: committed YAML matches the code, the schema carries what admission must check, and
//! its CEL rules accept and reject what they should (evaluated client-side with kube-cel, since no
//! API server runs here).

use kube::CustomResourceExt;
use serde_json::{Value, json};
use sluice_operator::api::{EgressGatewayPolicy, EgressGatewayPolicySpec, crd_yaml};

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn committed_crd_yaml_is_what_the_code_generates() {
    let path = root().join("crds/egressgatewaypolicies.sluice.dev.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == crd_yaml(),
        "{} is stale: run `cargo xtask codegen`",
        path.display()
    );
}

#[test]
fn crd_has_the_promised_shape() {
    let crd = serde_json::to_value(EgressGatewayPolicy::crd()).unwrap();
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "sluice.dev");
    assert_eq!(spec["scope"], "Cluster");
    assert_eq!(spec["names"]["shortNames"], json!(["egp"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Gateways",
            "Egress IPs",
            "Managed IPs",
            "Endpoints",
            "Accepted",
            "Ready",
            "Failure Policy",
            "Conflicts",
            "Age"
        ]
    );
    // Shown by `kubectl get -o wide` only: the default view stays narrow.
    let wide: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["priority"] == 1)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(wide, ["Managed IPs", "Accepted", "Failure Policy", "Conflicts"]);
    // A policy whose selectors match no pod is accepted and can be Ready (nothing to program):
    // the default view's Endpoints column is what tells it from a working one.
    let endpoints = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "Endpoints")
        .unwrap();
    assert_eq!(endpoints["jsonPath"], ".status.matchedEndpoints");
    assert!(endpoints.get("priority").is_none_or(|p| p == 0));
    assert!(
        endpoints["description"]
            .as_str()
            .is_some_and(|d| d.contains("match no pod")),
        "{endpoints}"
    );
    let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    for field in [
        "observedGeneration",
        "conditions",
        "gateways",
        "matchedEndpoints",
        "conflicts",
    ] {
        assert!(status.get(field).is_some(), "status.{field} missing");
    }
    assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
}

fn schema() -> Value {
    let crd = serde_json::to_value(EgressGatewayPolicy::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn cel_errors(spec: Value) -> Vec<String> {
    let object = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "EgressGatewayPolicy", "metadata": {"name": "p"}, "spec": spec});
    match kube_cel::Validator::new().validate(&schema(), &object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

fn valid_spec() -> Value {
    json!({
        "selectors": [{"podSelector": {"matchLabels": {"app": "a"}}}],
        "destinationCIDRs": ["203.0.113.0/24", "2001:db8::/64"],
        "excludedCIDRs": ["203.0.113.7/32"],
        "egressGateway": {"nodeSelector": {"matchLabels": {"egress": "true"}}, "egressIP": "198.51.100.1"},
    })
}

#[test]
fn cel_rules_accept_a_valid_policy() {
    assert_eq!(cel_errors(valid_spec()), Vec::<String>::new());
    let mut multi = valid_spec();
    multi["egressGateway"] = Value::Null;
    multi.as_object_mut().unwrap().remove("egressGateway");
    multi["egressGateways"] = json!([{"nodeSelector": {}, "interface": "eth1", "maxGatewayNodes": 2}]);
    assert_eq!(cel_errors(multi), Vec::<String>::new());
}

#[test]
fn cel_rules_reject_what_admission_must_reject() {
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "bad destination",
            Box::new(|s| s["destinationCIDRs"] = json!(["203.0.113.0/33"])),
            "must be a CIDR",
        ),
        (
            "bad exclusion",
            Box::new(|s| s["excludedCIDRs"] = json!(["nope"])),
            "must be a CIDR",
        ),
        (
            "bad egress IP",
            Box::new(|s| s["egressGateway"]["egressIP"] = json!("198.51.100.300")),
            "IPv4 or IPv6",
        ),
        (
            "interface and egressIP",
            Box::new(|s| s["egressGateway"]["interface"] = json!("eth1")),
            "at most one of interface and egressIP",
        ),
        (
            "no gateway",
            Box::new(|s| drop(s.as_object_mut().unwrap().remove("egressGateway"))),
            "one of egressGateway or egressGateways",
        ),
        (
            "selector without pods or namespaces",
            Box::new(|s| s["selectors"] = json!([{"nodeSelector": {}}])),
            "needs a podSelector or a namespaceSelector",
        ),
    ];
    for (name, mutate, message) in cases {
        let mut spec = valid_spec();
        mutate(&mut spec);
        let errors = cel_errors(spec);
        assert!(
            errors.iter().any(|e| e.contains(message)),
            "{name}: expected {message:?}, got {errors:?}"
        );
    }
}

#[test]
fn a_cilium_policy_reads_as_ours_field_for_field() {
    // Every field of CiliumEgressGatewayPolicy (cilium.io/v2) in one spec.
    let cilium = r#"
selectors:
  - podSelector:
      matchLabels: {app: a, io.kubernetes.pod.namespace: prod}
      matchExpressions: [{key: tier, operator: In, values: [web, api]}]
    namespaceSelector:
      matchExpressions: [{key: env, operator: Exists}]
    nodeSelector:
      matchLabels: {zone: a}
destinationCIDRs: [0.0.0.0/0, "::/0"]
excludedCIDRs: [10.0.0.0/8]
egressGateway:
  nodeSelector: {matchLabels: {egress: "true"}}
  interface: eth1
egressGateways:
  - nodeSelector: {matchLabels: {egress: "true"}}
    egressIP: 198.51.100.1
  - nodeSelector: {matchExpressions: [{key: egress, operator: DoesNotExist}]}
"#;
    let spec: EgressGatewayPolicySpec = serde_yaml::from_str(cilium).unwrap();
    let original: Value = serde_yaml::from_str(cilium).unwrap();
    assert_eq!(
        serde_json::to_value(&spec).unwrap(),
        original,
        "a field was lost or renamed"
    );
    assert!(sluice_operator::policy::parse(&spec).is_ok());
}
