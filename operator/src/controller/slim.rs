//! Trimmed Pod, Node and ServiceCIDR types for the watchers.
//!
//! They deserialize straight from the API server's JSON into a `Pod`/`Node` that holds only what
//! [`crate::objects`] reads: containers, volumes, images, managed fields and foreign annotations
//! are skipped by the deserializer and never allocated. The watchers keep no store (the planner
//! holds the only copy of the cluster), so an object lives only while it is converted.

use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::{
    api::{
        core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, Pod, PodIP, PodSpec, PodStatus},
        networking::{v1, v1beta1},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

/// Annotations with this prefix are kept; all others are dropped while deserializing.
pub const KEPT_ANNOTATION_PREFIX: &str = "sluice.dev/";

/// What the watchers keep of `metadata`.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MetaWire {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "sluice_annotations")]
    annotations: Option<BTreeMap<String, String>>,
}

impl From<MetaWire> for ObjectMeta {
    fn from(m: MetaWire) -> Self {
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            generation: m.generation,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            labels: m.labels,
            annotations: m.annotations.filter(|a| !a.is_empty()),
            ..ObjectMeta::default()
        }
    }
}

/// Reads an annotation map, keeping only Sluice's keys; other values are skipped unread.
fn sluice_annotations<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Kept;
    impl<'de> Visitor<'de> for Kept {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of annotations")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_map(Kept)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if key.starts_with(KEPT_ANNOTATION_PREFIX) {
                    kept.insert(key, map.next_value::<String>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }
    d.deserialize_option(Kept)
}

macro_rules! slim_resource {
    ($slim:ident, $full:ty) => {
        impl k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = <$full as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$full as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$full as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$full as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$full as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $slim {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.0.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.0.metadata
            }
        }
    };
}

/// A pod with labels, namespace, uid, `spec.nodeName`, `spec.hostNetwork`, `status.phase` and
/// its IPs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlimPod(pub Pod);
slim_resource!(SlimPod, Pod);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodWire {
    #[serde(default)]
    metadata: MetaWire,
    spec: Option<PodSpecWire>,
    status: Option<PodStatusWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecWire {
    node_name: Option<String>,
    host_network: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusWire {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIpWire>>,
}

#[derive(Deserialize)]
struct PodIpWire {
    ip: String,
}

impl<'de> Deserialize<'de> for SlimPod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = PodWire::deserialize(d)?;
        Ok(SlimPod(Pod {
            metadata: w.metadata.into(),
            spec: w.spec.map(|s| PodSpec {
                node_name: s.node_name,
                host_network: s.host_network,
                ..PodSpec::default()
            }),
            status: w.status.map(|s| PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                pod_ips: s
                    .pod_ips
                    .map(|ips| ips.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
                ..PodStatus::default()
            }),
        }))
    }
}

/// A node with labels, Sluice's annotations, pod CIDRs, whether it is cordoned, addresses and
/// the `Ready` condition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlimNode(pub Node);
slim_resource!(SlimNode, Node);

#[derive(Deserialize)]
struct NodeWire {
    #[serde(default)]
    metadata: MetaWire,
    spec: Option<NodeSpecWire>,
    status: Option<NodeStatusWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeSpecWire {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
    unschedulable: Option<bool>,
}

#[derive(Deserialize)]
struct NodeStatusWire {
    addresses: Option<Vec<AddressWire>>,
    conditions: Option<Vec<ConditionWire>>,
}

#[derive(Deserialize)]
struct AddressWire {
    #[serde(rename = "type")]
    type_: String,
    address: String,
}

#[derive(Deserialize)]
struct ConditionWire {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

impl<'de> Deserialize<'de> for SlimNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = NodeWire::deserialize(d)?;
        Ok(SlimNode(Node {
            metadata: w.metadata.into(),
            spec: w.spec.map(|s| NodeSpec {
                pod_cidr: s.pod_cidr,
                pod_cidrs: s.pod_cidrs,
                unschedulable: s.unschedulable,
                ..NodeSpec::default()
            }),
            status: w.status.map(|s| NodeStatus {
                addresses: s.addresses.map(|list| {
                    list.into_iter()
                        .map(|a| NodeAddress {
                            type_: a.type_,
                            address: a.address,
                        })
                        .collect()
                }),
                conditions: s.conditions.map(|list| {
                    list.into_iter()
                        .filter(|c| c.type_ == "Ready")
                        .map(|c| NodeCondition {
                            type_: c.type_,
                            status: c.status,
                            ..NodeCondition::default()
                        })
                        .collect()
                }),
                ..NodeStatus::default()
            }),
        }))
    }
}

/// A served version of `networking.k8s.io` `ServiceCIDR`: `v1` from Kubernetes 1.33, `v1beta1` in
/// 1.31 and 1.32 where a cluster enables it. The two versions' specs are the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceCidrVersion {
    #[default]
    V1,
    V1beta1,
}

impl ServiceCidrVersion {
    /// In the order to try them: the first one served is watched.
    pub const PREFERRED: [ServiceCidrVersion; 2] = [ServiceCidrVersion::V1, ServiceCidrVersion::V1beta1];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceCidrVersion::V1 => <v1::ServiceCIDR as k8s_openapi::Resource>::VERSION,
            ServiceCidrVersion::V1beta1 => <v1beta1::ServiceCIDR as k8s_openapi::Resource>::VERSION,
        }
    }
}

/// A `ServiceCIDR` with its name and `spec.cidrs` (unparsed, as [`crate::objects`] reads pod
/// CIDRs); its status and the rest of its metadata are skipped. Of either served version: the
/// version is the type's [`kube::Resource::DynamicType`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlimServiceCidr {
    pub metadata: ObjectMeta,
    pub cidrs: Vec<String>,
}

impl kube::Resource for SlimServiceCidr {
    type DynamicType = ServiceCidrVersion;
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &ServiceCidrVersion) -> Cow<'_, str> {
        <v1::ServiceCIDR as k8s_openapi::Resource>::KIND.into()
    }
    fn group(_: &ServiceCidrVersion) -> Cow<'_, str> {
        <v1::ServiceCIDR as k8s_openapi::Resource>::GROUP.into()
    }
    fn version(version: &ServiceCidrVersion) -> Cow<'_, str> {
        version.as_str().into()
    }
    fn plural(_: &ServiceCidrVersion) -> Cow<'_, str> {
        <v1::ServiceCIDR as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Deserialize)]
struct ServiceCidrWire {
    #[serde(default)]
    metadata: MetaWire,
    spec: Option<ServiceCidrSpecWire>,
}

#[derive(Deserialize)]
struct ServiceCidrSpecWire {
    cidrs: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for SlimServiceCidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = ServiceCidrWire::deserialize(d)?;
        Ok(SlimServiceCidr {
            metadata: w.metadata.into(),
            cidrs: w.spec.and_then(|s| s.cidrs).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::objects;

    #[test]
    fn pods_keep_what_planning_reads_and_nothing_else() {
        let wire = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"huge\": 1}", "sluice.dev/x": "y"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "r"}]
            },
            "spec": {"nodeName": "n1", "hostNetwork": false, "containers": [{"name": "c", "image": "nginx"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                       "containerStatuses": [{"name": "c", "ready": true}]}
        });
        let full: Pod = serde_json::from_value(wire.clone()).unwrap();
        let SlimPod(slim) = serde_json::from_value(wire).unwrap();
        assert_eq!(objects::pod_info(&slim), objects::pod_info(&full));
        assert!(slim.metadata.managed_fields.is_none());
        assert!(slim.metadata.owner_references.is_none());
        assert_eq!(
            slim.metadata.annotations,
            Some(BTreeMap::from([("sluice.dev/x".to_owned(), "y".to_owned())]))
        );
        assert!(slim.spec.unwrap().containers.is_empty());
        assert!(slim.status.unwrap().container_statuses.is_none());
    }

    /// Cordoned, labelled or annotated `sluice.dev/drain`, or being deleted: draining, from the
    /// slim node as from the full one.
    #[test]
    fn a_node_drains_when_cordoned_marked_or_deleted() {
        let base = json!({"metadata": {"name": "n1"}, "spec": {}});
        let mut cases = vec![(base.clone(), false)];
        let mut cordoned = base.clone();
        cordoned["spec"]["unschedulable"] = json!(true);
        cases.push((cordoned, true));
        for (field, value, drains) in [
            ("labels", "true", true),
            ("annotations", "", true),
            ("labels", "false", false),
        ] {
            let mut marked = base.clone();
            marked["metadata"][field] = json!({"sluice.dev/drain": value});
            cases.push((marked, drains));
        }
        let mut deleted = base.clone();
        deleted["metadata"]["deletionTimestamp"] = json!("2026-11-28T00:00:00Z");
        cases.push((deleted, true));
        for (wire, drains) in cases {
            let full: Node = serde_json::from_value(wire.clone()).unwrap();
            let SlimNode(slim) = serde_json::from_value(wire.clone()).unwrap();
            assert_eq!(objects::node_info(&full).unwrap().draining, drains, "{wire}");
            assert_eq!(objects::node_info(&slim).unwrap().draining, drains, "{wire}");
        }
    }

    #[test]
    fn nodes_keep_labels_addresses_ready_and_sluice_annotations() {
        let wire = json!({
            "metadata": {
                "name": "n1", "labels": {"egress": "true"}, "resourceVersion": "7",
                "annotations": {"sluice.dev/interfaces": "[{\"name\":\"eth1\",\"addresses\":[\"192.0.2.10\"]}]",
                                "node.alpha.kubernetes.io/ttl": "0"}
            },
            "spec": {"podCIDR": "10.0.1.0/24", "podCIDRs": ["10.0.1.0/24"], "providerID": "kind://n1",
                     "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "172.18.0.2"}, {"type": "Hostname", "address": "n1"}],
                "conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "False",
                                "lastHeartbeatTime": "2026-01-01T00:00:00Z"}],
                "images": [{"names": ["nginx"], "sizeBytes": 1}]
            }
        });
        let full: Node = serde_json::from_value(wire.clone()).unwrap();
        let SlimNode(slim) = serde_json::from_value(wire).unwrap();
        assert_eq!(
            objects::node_info(&slim).unwrap(),
            objects::node_info(&full).unwrap()
        );
        assert!(!objects::node_info(&slim).unwrap().ready);
        assert_eq!(
            objects::node_info(&slim).unwrap().pod_cidrs,
            ["10.0.1.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        assert!(slim.spec.as_ref().unwrap().taints.is_none());
        let status = slim.status.unwrap();
        assert!(status.images.is_none());
        assert_eq!(status.conditions.unwrap().len(), 1);
        assert_eq!(slim.metadata.annotations.unwrap().len(), 1);
    }

    #[test]
    fn service_cidrs_keep_their_name_and_cidrs_and_nothing_else() {
        let wire = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes", "resourceVersion": "9", "finalizers": ["networking.k8s.io/service-cidr-finalizer"],
                         "managedFields": [{"manager": "kube-apiserver"}]},
            "spec": {"cidrs": ["10.96.0.0/12", "fd00:10:96::/112"]},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "", "message": "",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        });
        let full: v1::ServiceCIDR = serde_json::from_value(wire.clone()).unwrap();
        let slim: SlimServiceCidr = serde_json::from_value(wire).unwrap();
        assert_eq!(Some(slim.cidrs.clone()), full.spec.unwrap().cidrs);
        assert_eq!(slim.metadata.name.as_deref(), Some("kubernetes"));
        assert_eq!(slim.metadata.resource_version.as_deref(), Some("9"));
        assert!(slim.metadata.finalizers.is_none() && slim.metadata.managed_fields.is_none());
        let bare: SlimServiceCidr = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert!(bare.cidrs.is_empty());
    }

    #[test]
    fn service_cidrs_are_listed_where_each_version_serves_them() {
        use kube::Resource;
        assert_eq!(
            SlimServiceCidr::url_path(&ServiceCidrVersion::V1, None),
            "/apis/networking.k8s.io/v1/servicecidrs"
        );
        assert_eq!(
            SlimServiceCidr::url_path(&ServiceCidrVersion::V1beta1, None),
            "/apis/networking.k8s.io/v1beta1/servicecidrs"
        );
        assert_eq!(SlimServiceCidr::kind(&ServiceCidrVersion::V1beta1), "ServiceCIDR");
    }
}
