//! `sluice-operator convert`: `CiliumEgressGatewayPolicy` (`cilium.io/v2`) YAML to
//! `EgressGatewayPolicy` (`sluice.dev/v1alpha1`) YAML.
//!
//! Our spec is a superset of Cilium's, so most policies carry over field by field. What does not
//! carry over, or means something different here, is reported as a [`Note`] rather than silently
//! dropped: unknown fields, `status`, server-set metadata, and the `nodeSelector` of a rule, which
//! Cilium ORs across all the rules of a policy while Sluice applies it to its own rule only.
//!
//! Pure: text in, text and notes out. The CLI prints the notes on stderr.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::{
    api::{EgressGatewayPolicy, EgressGatewayPolicySpec},
    policy,
};

/// The result of a conversion: the YAML to print and what the user must know about it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversion {
    /// One `EgressGatewayPolicy` document per converted policy, each starting with `---`.
    pub yaml: String,
    /// How many policies were converted.
    pub converted: usize,
    pub notes: Vec<Note>,
}

/// How much a note matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Nothing is lost; for information.
    Info,
    /// Something was dropped or behaves differently under Sluice.
    Warning,
}

/// Something the user must know about one input document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub severity: Severity,
    /// "document N" and, when known, the policy's name.
    pub place: String,
    pub message: String,
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.severity {
            Severity::Info => "note",
            Severity::Warning => "warning",
        };
        write!(f, "{level}: {}: {}", self.place, self.message)
    }
}

/// Input that cannot be converted at all.
#[derive(Debug, thiserror::Error)]
#[error("document {document}: {message}")]
pub struct ConvertError {
    pub document: usize,
    pub message: String,
}

/// Fields Sluice shares with Cilium, level by level.
const TOP: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
const SPEC: &[&str] = &[
    "selectors",
    "destinationCIDRs",
    "excludedCIDRs",
    "egressGateway",
    "egressGateways",
];
/// Sluice's own spec fields: not Cilium's, but kept when present.
const SPEC_SLUICE: &[&str] = &["failurePolicy"];
const RULE: &[&str] = &["podSelector", "namespaceSelector", "nodeSelector"];
const GATEWAY: &[&str] = &["nodeSelector", "interface", "egressIP"];
const GATEWAY_SLUICE: &[&str] = &["maxGatewayNodes"];
const LABEL_SELECTOR: &[&str] = &["matchLabels", "matchExpressions"];
const EXPRESSION: &[&str] = &["key", "operator", "values"];
/// Metadata the API server sets; dropped without a note.
const METADATA_SERVER: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
];
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Converts every `CiliumEgressGatewayPolicy` of a multi-document YAML text (also inside a
/// `List`); other documents are skipped with a note.
pub fn convert(text: &str) -> Result<Conversion, ConvertError> {
    let mut out = Conversion::default();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document_no = i + 1;
        let value = Value::deserialize(document).map_err(|e| ConvertError {
            document: document_no,
            message: format!("not valid YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        let mut items = Vec::new();
        flatten(value, &format!("document {document_no}"), &mut items);
        for (place, item) in items {
            convert_object(item, &place, &mut out).map_err(|message| ConvertError {
                document: document_no,
                message,
            })?;
        }
    }
    if out.converted == 0 {
        out.notes.push(Note {
            severity: Severity::Warning,
            place: "input".into(),
            message: "no CiliumEgressGatewayPolicy found".into(),
        });
    }
    Ok(out)
}

/// Expands `kind: List` (`kubectl get -o yaml` output) into its items.
fn flatten(value: Value, place: &str, out: &mut Vec<(String, Value)>) {
    if str_field(&value, "kind") == Some("List")
        && let Some(Value::Sequence(items)) = value.get("items")
    {
        for (j, item) in items.iter().enumerate() {
            flatten(item.clone(), &format!("{place} items[{j}]"), out);
        }
        return;
    }
    out.push((place.to_owned(), value));
}

fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn convert_object(value: Value, place: &str, out: &mut Conversion) -> Result<(), String> {
    let kind = str_field(&value, "kind").unwrap_or_default().to_owned();
    let api_version = str_field(&value, "apiVersion").unwrap_or_default().to_owned();
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    if (group, kind.as_str()) != ("cilium.io", "CiliumEgressGatewayPolicy") {
        let what = if kind.is_empty() {
            "not a Kubernetes object (no kind)".to_owned()
        } else {
            format!("skipped: {kind} ({api_version}) is not a CiliumEgressGatewayPolicy")
        };
        out.notes.push(Note {
            severity: Severity::Warning,
            place: place.to_owned(),
            message: what,
        });
        return Ok(());
    }
    let Value::Mapping(mut object) = value else {
        return Err("not a mapping".into());
    };
    let name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let place = if name.is_empty() {
        place.to_owned()
    } else {
        format!("{place} ({name})")
    };
    let mut notes = Notes {
        place: &place,
        notes: Vec::new(),
    };

    prune(&mut object, TOP, "", &mut notes);
    if object.remove("status").is_some() {
        notes.info("status dropped: the operator writes its own");
    }
    let metadata = convert_metadata(object.remove("metadata"), &mut notes)?;
    if metadata.name.is_none() && metadata.generate_name.is_none() {
        return Err(format!("{place}: metadata.name is missing"));
    }
    let mut spec = match object.remove("spec") {
        Some(Value::Mapping(m)) => m,
        Some(_) => return Err(format!("{place}: spec is not a mapping")),
        None => return Err(format!("{place}: spec is missing")),
    };
    prune_spec(&mut spec, &mut notes);
    let spec: EgressGatewayPolicySpec =
        crate::manifests::decode(Value::Mapping(spec)).map_err(|e| format!("{place}: invalid spec: {e}"))?;
    semantic_notes(&spec, &mut notes);
    if let Err(e) = policy::parse(&spec) {
        notes.warn(format!(
            "Sluice will not accept the converted policy ({}): {}",
            e.reason, e.message
        ));
    }

    let policy = EgressGatewayPolicy {
        metadata,
        spec,
        status: None,
    };
    let body = serde_yaml::to_string(&policy).map_err(|e| format!("{place}: {e}"))?;
    out.yaml.push_str("---\n");
    out.yaml.push_str(&body);
    out.converted += 1;
    out.notes.extend(notes.notes);
    Ok(())
}

struct Notes<'a> {
    place: &'a str,
    notes: Vec<Note>,
}

impl Notes<'_> {
    fn push(&mut self, severity: Severity, message: impl Into<String>) {
        self.notes.push(Note {
            severity,
            place: self.place.to_owned(),
            message: message.into(),
        });
    }
    fn info(&mut self, message: impl Into<String>) {
        self.push(Severity::Info, message);
    }
    fn warn(&mut self, message: impl Into<String>) {
        self.push(Severity::Warning, message);
    }
}

/// Removes the keys of `map` that are not in `known`, with a note naming each.
fn prune(map: &mut Mapping, known: &[&str], path: &str, notes: &mut Notes) {
    let unknown: Vec<Value> = map
        .keys()
        .filter(|k| !k.as_str().is_some_and(|k| known.contains(&k)))
        .cloned()
        .collect();
    for key in unknown {
        map.remove(&key);
        let key = key.as_str().map_or_else(|| format!("{key:?}"), str::to_owned);
        let field = if path.is_empty() {
            key
        } else {
            format!("{path}.{key}")
        };
        notes.warn(format!("unknown field {field} dropped"));
    }
}

fn prune_label_selector(value: Option<&mut Value>, path: &str, notes: &mut Notes) {
    let Some(Value::Mapping(selector)) = value else {
        return;
    };
    prune(selector, LABEL_SELECTOR, path, notes);
    if let Some(Value::Sequence(expressions)) = selector.get_mut("matchExpressions") {
        for (i, e) in expressions.iter_mut().enumerate() {
            if let Value::Mapping(e) = e {
                prune(e, EXPRESSION, &format!("{path}.matchExpressions[{i}]"), notes);
            }
        }
    }
}

fn prune_gateway(gateway: &mut Value, path: &str, notes: &mut Notes) {
    let Value::Mapping(gateway) = gateway else {
        return;
    };
    let known: Vec<&str> = GATEWAY.iter().chain(GATEWAY_SLUICE).copied().collect();
    prune(gateway, &known, path, notes);
    for field in GATEWAY_SLUICE {
        if gateway.contains_key(*field) {
            notes.info(format!(
                "{path}.{field} is not a Cilium field; kept, since Sluice knows it"
            ));
        }
    }
    if gateway.contains_key("interface") && gateway.contains_key("egressIP") {
        gateway.remove("interface");
        notes.warn(format!(
            "{path} sets both interface and egressIP; Sluice allows one: kept egressIP, dropped interface"
        ));
    }
    prune_label_selector(
        gateway.get_mut("nodeSelector"),
        &format!("{path}.nodeSelector"),
        notes,
    );
}

fn prune_spec(spec: &mut Mapping, notes: &mut Notes) {
    let known: Vec<&str> = SPEC.iter().chain(SPEC_SLUICE).copied().collect();
    prune(spec, &known, "spec", notes);
    for field in SPEC_SLUICE {
        if spec.contains_key(*field) {
            notes.info(format!(
                "spec.{field} is not a Cilium field; kept, since Sluice knows it"
            ));
        }
    }
    if let Some(Value::Sequence(rules)) = spec.get_mut("selectors") {
        for (i, rule) in rules.iter_mut().enumerate() {
            let path = format!("spec.selectors[{i}]");
            if let Value::Mapping(rule) = rule {
                prune(rule, RULE, &path, notes);
                for field in RULE {
                    prune_label_selector(rule.get_mut(*field), &format!("{path}.{field}"), notes);
                }
            }
        }
    }
    if let Some(gateway) = spec.get_mut("egressGateway") {
        prune_gateway(gateway, "spec.egressGateway", notes);
    }
    if let Some(Value::Sequence(gateways)) = spec.get_mut("egressGateways") {
        for (i, gateway) in gateways.iter_mut().enumerate() {
            prune_gateway(gateway, &format!("spec.egressGateways[{i}]"), notes);
        }
    }
}

fn convert_metadata(value: Option<Value>, notes: &mut Notes) -> Result<ObjectMeta, String> {
    let Some(Value::Mapping(mut meta)) = value else {
        return Ok(ObjectMeta::default());
    };
    for key in METADATA_SERVER {
        meta.remove(*key);
    }
    if meta.remove("namespace").is_some() {
        notes.info("metadata.namespace dropped: both policies are cluster-scoped");
    }
    let kept = ["name", "generateName", "labels", "annotations"];
    let dropped: Vec<Value> = meta
        .keys()
        .filter(|k| !k.as_str().is_some_and(|k| kept.contains(&k)))
        .cloned()
        .collect();
    for key in dropped {
        meta.remove(&key);
        notes.warn(format!(
            "metadata.{} dropped (it refers to the Cilium object)",
            key.as_str().unwrap_or("?")
        ));
    }
    let mut meta: ObjectMeta =
        crate::manifests::decode(Value::Mapping(meta)).map_err(|e| format!("invalid metadata: {e}"))?;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    meta.annotations = meta.annotations.filter(|a: &BTreeMap<_, _>| !a.is_empty());
    Ok(meta)
}

/// Notes about what converts field by field but behaves differently under Sluice.
fn semantic_notes(spec: &EgressGatewayPolicySpec, notes: &mut Notes) {
    let with_node_selector: Vec<usize> = spec
        .selectors
        .iter()
        .enumerate()
        .filter(|(_, r)| r.node_selector.is_some())
        .map(|(i, _)| i)
        .collect();
    if spec.selectors.len() > 1 && !with_node_selector.is_empty() {
        let list: Vec<String> = with_node_selector
            .iter()
            .map(|i| format!("spec.selectors[{i}].nodeSelector"))
            .collect();
        notes.warn(format!(
            "{} now applies to its own rule only; Cilium ORs the nodeSelectors of all rules \
             into one list that every rule uses. Repeat a nodeSelector in each rule (or split \
             the rules) if pods of the other rules must be limited to those nodes",
            list.join(", ")
        ));
    }
    let has_v6 = spec
        .destination_cidrs
        .iter()
        .chain(&spec.excluded_cidrs)
        .any(|c| c.contains(':'));
    if has_v6 {
        notes.info(
            "IPv6 destinations are steered too; their traffic leaves with an IPv6 address: the \
             gateway's egressIP when it is IPv6, else the first IPv6 address of the gateway's \
             interface (egressIP names one family; egressIPs can list both)",
        );
    }
    if !spec.egress_gateways.is_empty() {
        notes.info(
            "egressGateways: Sluice spreads the selected pods over the active gateway nodes \
             (maxGatewayNodes per entry, default 1)",
        );
        if spec.egress_gateway.is_some() {
            notes.warn("egressGateway is ignored because egressGateways is not empty (as in Cilium)");
        }
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    const BASIC: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata:
  name: egress-sample
  uid: 6c0d1c1e-0000-0000-0000-000000000000
  resourceVersion: "123"
  creationTimestamp: "2024-01-01T00:00:00Z"
  labels: {team: payments}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  selectors:
  - podSelector:
      matchLabels:
        org: empire
        io.kubernetes.pod.namespace: default
  destinationCIDRs: [192.168.60.13/32]
  excludedCIDRs: [192.168.60.13/32]
  egressGateway:
    nodeSelector:
      matchLabels: {egress-node: "true"}
    egressIP: 10.168.60.100
"#;

    fn messages(c: &Conversion) -> Vec<String> {
        c.notes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_plain_policy_converts_without_notes() {
        let c = convert(BASIC).unwrap();
        assert_eq!(c.converted, 1);
        assert!(c.notes.is_empty(), "{:?}", messages(&c));
        assert_eq!(
            c.yaml,
            r#"---
apiVersion: sluice.dev/v1alpha1
kind: EgressGatewayPolicy
metadata:
  labels:
    team: payments
  name: egress-sample
spec:
  selectors:
  - podSelector:
      matchLabels:
        io.kubernetes.pod.namespace: default
        org: empire
  destinationCIDRs:
  - 192.168.60.13/32
  excludedCIDRs:
  - 192.168.60.13/32
  egressGateway:
    nodeSelector:
      matchLabels:
        egress-node: 'true'
    egressIP: 10.168.60.100
"#
        );
        // The output reads back as our policy, with the same spec as the input.
        let ours: EgressGatewayPolicy = serde_yaml::from_str(&c.yaml).unwrap();
        let theirs: Value = serde_yaml::from_str(BASIC).unwrap();
        let spec: EgressGatewayPolicySpec = serde_yaml::from_value(theirs["spec"].clone()).unwrap();
        assert_eq!(ours.spec, spec);
        assert!(policy::parse(&ours.spec).is_ok());
    }

    #[test]
    fn status_and_unknown_fields_are_reported() {
        let text = format!("{BASIC}  futureField: 1\nstatus:\n  conditions: []\n")
            .replace("  - podSelector:\n", "  - podSelector:\n      bogus: x\n")
            .replace("    egressIP:", "    weight: 3\n    egressIP:");
        let c = convert(&text).unwrap();
        let m = messages(&c);
        assert_eq!(c.converted, 1);
        for want in [
            "unknown field spec.futureField dropped",
            "unknown field spec.selectors[0].podSelector.bogus dropped",
            "unknown field spec.egressGateway.weight dropped",
            "status dropped",
        ] {
            assert!(m.iter().any(|n| n.contains(want)), "{want} not in {m:#?}");
        }
        assert!(
            m.iter().all(|n| n.contains("document 1 (egress-sample)")),
            "{m:#?}"
        );
        assert!(!c.yaml.contains("futureField") && !c.yaml.contains("status"));
    }

    #[test]
    fn node_selectors_of_several_rules_are_flagged() {
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: two-rules}
spec:
  selectors:
  - podSelector: {matchLabels: {app: a}}
    nodeSelector: {matchLabels: {zone: east}}
  - namespaceSelector: {matchLabels: {team: b}}
  destinationCIDRs: [0.0.0.0/0]
  egressGateway:
    nodeSelector: {matchLabels: {egress: "true"}}
"#;
        let c = convert(text).unwrap();
        let m = messages(&c);
        assert_eq!(m.len(), 1, "{m:#?}");
        assert!(m[0].starts_with("warning: document 1 (two-rules): spec.selectors[0].nodeSelector"));
        assert!(m[0].contains("Cilium ORs"));
        // One rule with a nodeSelector means the same in both.
        let one = text.replace("  - namespaceSelector: {matchLabels: {team: b}}\n", "");
        assert!(convert(&one).unwrap().notes.is_empty());
    }

    #[test]
    fn several_documents_and_lists_convert_and_other_kinds_are_skipped() {
        let second = BASIC.replace("egress-sample", "second");
        let text = format!(
            "{BASIC}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- {}\n",
            serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(&second).unwrap()).unwrap()
        );
        let c = convert(&text).unwrap();
        assert_eq!(c.converted, 2);
        let docs: Vec<EgressGatewayPolicy> = serde_yaml::Deserializer::from_str(&c.yaml)
            .map(|d| EgressGatewayPolicy::deserialize(d).unwrap())
            .collect();
        assert_eq!(
            docs.iter()
                .map(|p| p.metadata.name.clone().unwrap())
                .collect::<Vec<_>>(),
            ["egress-sample", "second"]
        );
        let m = messages(&c);
        assert_eq!(m.len(), 1, "{m:#?}");
        assert!(m[0].contains("document 2: skipped: ConfigMap (v1)"), "{m:#?}");
    }

    #[test]
    fn conflicts_and_invalid_results_are_explained() {
        let text = BASIC
            .replace("    egressIP:", "    interface: eth1\n    egressIP:")
            .replace("[192.168.60.13/32]\n  excludedCIDRs", "[2001:db8::/64]\n  excludedCIDRs")
            .replace("  - podSelector:\n      matchLabels:\n        org: empire\n        io.kubernetes.pod.namespace: default\n", "  - nodeSelector: {}\n");
        let c = convert(&text).unwrap();
        let m = messages(&c);
        for want in [
            "kept egressIP, dropped interface",
            "IPv6 destinations are steered too",
            "Sluice will not accept the converted policy (InvalidSelector)",
        ] {
            assert!(m.iter().any(|n| n.contains(want)), "{want} not in {m:#?}");
        }
        assert!(!c.yaml.contains("interface"));
    }

    #[test]
    fn bad_input_is_an_error_and_empty_input_a_warning() {
        assert!(convert("a: [").is_err());
        let no_spec = "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: x}\n";
        assert!(
            convert(no_spec)
                .unwrap_err()
                .to_string()
                .contains("spec is missing")
        );
        let bad = format!("{no_spec}spec: {{selectors: 3}}\n");
        assert!(convert(&bad).unwrap_err().to_string().contains("invalid spec"));
        let c = convert("").unwrap();
        assert_eq!(c.converted, 0);
        assert_eq!(
            messages(&c),
            ["warning: input: no CiliumEgressGatewayPolicy found"]
        );
    }

    #[test]
    fn sluice_fields_are_kept_with_a_note() {
        let text = BASIC
            .replace("    egressIP:", "    maxGatewayNodes: 1\n    egressIP:")
            .replace("  excludedCIDRs:", "  failurePolicy: Fallback\n  excludedCIDRs:");
        let c = convert(&text).unwrap();
        let p: EgressGatewayPolicy = serde_yaml::from_str(&c.yaml).unwrap();
        assert_eq!(p.spec.egress_gateway.unwrap().max_gateway_nodes, Some(1));
        assert_eq!(c.notes.len(), 2, "{:?}", messages(&c));
        assert!(c.notes.iter().all(|n| n.severity == Severity::Info));
    }
}
