//! The leader's address as the only endpoint of the shims' Service.
//!
//! The Service the shims dial has no selector; the leader writes its EndpointSlice with its own
//! pod IP when it takes the Lease. Both replicas stay Ready (so a PodDisruptionBudget and rolling
//! updates work as usual), yet the shims only ever reach the leader. A new leader overwrites the
//! slice with server-side apply, so a crashed leader's address is gone as soon as the standby
//! takes over.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label saying who manages the slice (so the EndpointSlice controller leaves it alone).
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Where the leader publishes itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderEndpoint {
    pub namespace: String,
    /// The selector-less Service of the node channel.
    pub service: String,
    pub pod_ip: IpAddr,
    /// The node channel's port, named `grpc` as in the Service.
    pub port: u16,
    /// The pod's name, for people reading the slice.
    pub pod_name: Option<String>,
}

/// The EndpointSlice that points the Service at this replica.
pub fn slice(endpoint: &LeaderEndpoint) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-leader", endpoint.service)),
            namespace: Some(endpoint.namespace.clone()),
            labels: Some(
                [
                    (SERVICE_NAME_LABEL.to_owned(), endpoint.service.clone()),
                    (MANAGED_BY_LABEL.to_owned(), "sluice.dev-operator".to_owned()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        address_type: if endpoint.pod_ip.is_ipv4() { "IPv4" } else { "IPv6" }.to_owned(),
        endpoints: vec![Endpoint {
            addresses: vec![endpoint.pod_ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            target_ref: endpoint
                .pod_name
                .as_ref()
                .map(|name| k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(name.clone()),
                    namespace: Some(endpoint.namespace.clone()),
                    ..Default::default()
                }),
            ..Default::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some("grpc".into()),
            port: Some(i32::from(endpoint.port)),
            protocol: Some("TCP".into()),
            app_protocol: Some("grpc".into()),
        }]),
    }
}

/// Writes the slice (server-side apply, forced: the previous leader's version is replaced).
pub async fn publish(client: Client, endpoint: &LeaderEndpoint, field_manager: &str) -> kube::Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client, &endpoint.namespace);
    let object = slice(endpoint);
    let name = object.metadata.name.clone().expect("the slice is named");
    let patch = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": object.metadata,
        "addressType": object.address_type,
        "endpoints": object.endpoints,
        "ports": object.ports,
    });
    api.patch(
        &name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    use super::*;

    fn endpoint() -> LeaderEndpoint {
        LeaderEndpoint {
            namespace: "sluice".into(),
            service: "sluice-operator".into(),
            pod_ip: "10.244.0.7".parse().unwrap(),
            port: 9443,
            pod_name: Some("sluice-operator-abc".into()),
        }
    }

    #[tokio::test]
    async fn the_leader_applies_its_address_as_the_services_only_endpoint() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "sluice");
        let server = tokio::spawn(async move {
            let (request, respond) = handle.next_request().await.expect("one request");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(
                request.uri().to_string(),
                "/apis/discovery.k8s.io/v1/namespaces/sluice/endpointslices/sluice-operator-leader?&force=true&fieldManager=sluice-operator"
            );
            assert_eq!(request.headers()["content-type"], "application/apply-patch+yaml");
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["metadata"]["labels"][SERVICE_NAME_LABEL], "sluice-operator");
            assert_eq!(body["addressType"], "IPv4");
            assert_eq!(
                body["endpoints"][0]["addresses"],
                serde_json::json!(["10.244.0.7"])
            );
            assert_eq!(body["endpoints"][0]["conditions"]["ready"], true);
            assert_eq!(body["endpoints"][0]["targetRef"]["name"], "sluice-operator-abc");
            assert_eq!(
                body["ports"][0],
                serde_json::json!({"name": "grpc", "port": 9443, "protocol": "TCP", "appProtocol": "grpc"})
            );
            respond.send_response(Response::builder().body(Body::from(bytes)).unwrap());
        });
        publish(client, &endpoint(), "sluice-operator").await.unwrap();
        server.await.unwrap();
    }

    #[test]
    fn an_ipv6_leader_gets_an_ipv6_slice() {
        let mut e = endpoint();
        e.pod_ip = "fd00::7".parse().unwrap();
        assert_eq!(slice(&e).address_type, "IPv6");
    }
}
