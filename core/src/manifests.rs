//! Reading a directory of Kubernetes manifests into the planner's inputs (`plan --manifests`,
//! and later the `dir:` source). The parsing is pure; only [`read_dir`] touches the disk.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use serde::Deserialize;

use crate::{
    api::{EgressGatewayPolicy, EgressGatewayPolicySpec},
    model::{NamespaceInfo, NodeInfo, PodInfo, PolicyInput},
    objects,
};

/// Everything a set of manifests describes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Manifests {
    pub nodes: Vec<NodeInfo>,
    pub namespaces: Vec<NamespaceInfo>,
    pub pods: Vec<PodInfo>,
    pub policies: Vec<PolicyInput>,
    /// The CIDRs of `networking.k8s.io` `ServiceCIDR` objects, in the order read.
    pub service_cidrs: Vec<IpNet>,
    /// Documents of kinds the planner does not use, as "file: document N: kind".
    pub ignored: Vec<String>,
}

/// A file or document that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {document}: {message}")]
    Document {
        path: PathBuf,
        document: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// A `CiliumEgressGatewayPolicy`: our spec is a superset of its spec.
#[derive(Deserialize)]
struct CiliumPolicy {
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: EgressGatewayPolicySpec,
}

/// A `networking.k8s.io/v1` (or `v1beta1`) `ServiceCIDR`: only its CIDRs matter here.
#[derive(Deserialize)]
struct ServiceCidr {
    #[serde(default)]
    spec: ServiceCidrSpec,
}

#[derive(Deserialize, Default)]
struct ServiceCidrSpec {
    #[serde(default)]
    cidrs: Vec<IpNet>,
}

/// Decodes an object, naming the field of the first error: `spec.selectors[0]: invalid type: ...`
/// tells the user where to look, where serde alone says only what it expected.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| e.to_string())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads every `*.yaml` / `*.yml` file of a directory, in name order.
pub fn read_dir(dir: &Path) -> Result<Manifests, ManifestError> {
    let mut manifests = Manifests::default();
    manifests.read_dir(dir)?;
    Ok(manifests)
}

impl Manifests {
    /// Adds every `*.yaml` / `*.yml` file of a directory, in name order.
    pub fn read_dir(&mut self, dir: &Path) -> Result<(), ManifestError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            self.add_file(&path, &text)?;
        }
        Ok(())
    }

    /// Adds every document of one multi-document YAML text.
    pub fn add_file(&mut self, path: &Path, text: &str) -> Result<(), ManifestError> {
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let fail = |message: String| ManifestError::Document {
                path: path.to_owned(),
                document: i + 1,
                message,
            };
            let value =
                serde_yaml::Value::deserialize(document).map_err(|e| fail(format!("not valid YAML: {e}")))?;
            if value.is_null() {
                continue;
            }
            self.add_object(value, &format!("{}: document {}", path.display(), i + 1))
                .map_err(fail)?;
        }
        Ok(())
    }

    fn add_object(&mut self, value: serde_yaml::Value, place: &str) -> Result<(), String> {
        use serde_yaml::Value;
        let other = match &value {
            Value::Mapping(_) => None,
            Value::Null => Some("nothing"),
            Value::Bool(_) => Some("a boolean"),
            Value::Number(_) => Some("a number"),
            Value::String(_) => Some("a string"),
            Value::Sequence(_) => Some("a sequence"),
            Value::Tagged(_) => Some("a tagged value"),
        };
        if let Some(other) = other {
            return Err(format!(
                "not a Kubernetes object: {other}, not a mapping with apiVersion and kind"
            ));
        }
        // Else serde would say "expected field identifier".
        if let Value::Mapping(m) = &value
            && let Some(key) = m.keys().find(|k| !k.is_string())
        {
            let key = serde_yaml::to_string(key).unwrap_or_default();
            return Err(format!(
                "not a Kubernetes object: the key {} is not a string",
                key.trim_end()
            ));
        }
        let meta: TypeMeta = decode(value.clone()).map_err(|e| format!("not a Kubernetes object: {e}"))?;
        let group = meta.api_version.split_once('/').map_or("", |(g, _)| g);
        let parse_err = |e: String| format!("invalid {}: {e}", meta.kind);
        // k8s-openapi checks the version only after reading the whole object, too late for the
        // error to say which field it is about.
        if group.is_empty()
            && ["Node", "Namespace", "Pod"].contains(&meta.kind.as_str())
            && meta.api_version != "v1"
        {
            return Err(parse_err(format!("apiVersion: {:?} is not v1", meta.api_version)));
        }
        match (group, meta.kind.as_str()) {
            ("", "List") => {
                #[derive(Deserialize)]
                struct List {
                    #[serde(default)]
                    items: Vec<serde_yaml::Value>,
                }
                let list: List = decode(value).map_err(parse_err)?;
                // An empty item is skipped like an empty document.
                for (j, item) in list.items.into_iter().enumerate().filter(|(_, i)| !i.is_null()) {
                    self.add_object(item, place)
                        .map_err(|e| format!("items[{j}]: {e}"))?;
                }
            }
            ("", "Node") => {
                let node: Node = decode(value).map_err(parse_err)?;
                self.nodes
                    .push(objects::node_info(&node).map_err(|e| format!("invalid Node: {e}"))?);
            }
            ("", "Namespace") => {
                let ns: Namespace = decode(value).map_err(parse_err)?;
                self.namespaces.push(objects::namespace_info(&ns));
            }
            ("", "Pod") => {
                let pod: Pod = decode(value).map_err(parse_err)?;
                self.pods.push(objects::pod_info(&pod));
            }
            ("sluice.dev", "EgressGatewayPolicy") => {
                let policy: EgressGatewayPolicy = decode(value).map_err(parse_err)?;
                self.policies.push(objects::policy_input(&policy));
            }
            ("cilium.io", "CiliumEgressGatewayPolicy") => {
                let c: CiliumPolicy = decode(value).map_err(parse_err)?;
                self.policies.push(objects::policy_input(&EgressGatewayPolicy {
                    metadata: c.metadata,
                    spec: c.spec,
                    status: None,
                }));
            }
            ("networking.k8s.io", "ServiceCIDR") => {
                let service_cidr: ServiceCidr = decode(value).map_err(parse_err)?;
                self.service_cidrs
                    .extend(service_cidr.spec.cidrs.iter().map(IpNet::trunc));
            }
            (_, kind) => self.ignored.push(format!("{place}: {kind}")),
        }
        Ok(())
    }
}

impl Manifests {
    /// The planner changes that turn the state these manifests describe into `next`'s: what the
    /// directory source feeds the planner when files change.
    pub fn changes_to(&self, next: &Manifests) -> Vec<crate::planner::Change> {
        use std::collections::BTreeMap;

        use crate::planner::Change;

        fn diff<T: Clone + PartialEq>(
            old: &[T],
            new: &[T],
            id: impl Fn(&T) -> &str,
            upsert: impl Fn(T) -> Change,
            remove: impl Fn(String) -> Change,
            out: &mut Vec<Change>,
        ) {
            // Later documents win over earlier ones with the same identity, as with kubectl apply.
            let old: BTreeMap<&str, &T> = old.iter().map(|o| (id(o), o)).collect();
            let new: BTreeMap<&str, &T> = new.iter().map(|o| (id(o), o)).collect();
            out.extend(
                old.keys()
                    .filter(|k| !new.contains_key(*k))
                    .map(|k| remove((*k).to_owned())),
            );
            out.extend(
                new.iter()
                    .filter(|(k, v)| old.get(*k) != Some(*v))
                    .map(|(_, v)| upsert((*v).clone())),
            );
        }

        let mut out = Vec::new();
        diff(
            &self.namespaces,
            &next.namespaces,
            |n| &n.name,
            Change::UpsertNamespace,
            Change::RemoveNamespace,
            &mut out,
        );
        diff(
            &self.nodes,
            &next.nodes,
            |n| &n.name,
            Change::UpsertNode,
            Change::RemoveNode,
            &mut out,
        );
        diff(
            &self.policies,
            &next.policies,
            |p| &p.name,
            Change::UpsertPolicy,
            Change::RemovePolicy,
            &mut out,
        );
        diff(
            &self.pods,
            &next.pods,
            |p| &p.uid,
            Change::UpsertPod,
            Change::RemovePod,
            &mut out,
        );
        out
    }
}
