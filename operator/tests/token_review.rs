//! The Kubernetes token verifier of the node channel against an API mock: which node a shim's
//! projected ServiceAccount token lets it act for, and every way a token is refused.

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use sluice_operator::auth::{NodeIdentity, TokenReviewVerifier, TokenVerifier};
use tonic::Code;
use tower_test::mock;

const AUDIENCE: &str = "sluice.dev";
const SHIM_SA: &str = "sluice-system/sluice-shim";

fn review_status(username: &str, audiences: &[&str], extra: Value) -> Value {
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {},
        "status": {"authenticated": true, "audiences": audiences, "user": {"username": username, "extra": extra}}
    })
}

/// Serves `reviews` in order (one per TokenReview POST), and pods by name.
fn fake_api(
    reviews: Vec<Value>,
    pods: Vec<(&'static str, &'static str)>,
) -> (kube::Client, tokio::task::JoinHandle<usize>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut reviews = reviews.into_iter();
        let mut calls = 0;
        while let Some((request, respond)) = handle.next_request().await {
            calls += 1;
            let path = request.uri().path().to_owned();
            let method = request.method().clone();
            let body = if method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let sent: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(
                    sent["spec"]["audiences"],
                    json!([AUDIENCE]),
                    "the review asks for our audience"
                );
                assert_eq!(sent["spec"]["token"], "the-token");
                reviews.next().expect("an expected TokenReview")
            } else if method == Method::GET && path.starts_with("/api/v1/namespaces/sluice-system/pods/") {
                let name = path.rsplit('/').next().unwrap();
                match pods.iter().find(|(p, _)| *p == name) {
                    Some((p, node)) => {
                        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p, "namespace": "sluice-system"}, "spec": {"nodeName": node, "containers": []}})
                    }
                    None => {
                        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
                        respond.send_response(
                            Response::builder()
                                .status(404)
                                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                                .unwrap(),
                        );
                        continue;
                    }
                }
            } else {
                panic!("unexpected request {method} {path}");
            };
            respond.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
        calls
    });
    (kube::Client::new(service, "default"), server)
}

fn verifier(client: kube::Client) -> TokenReviewVerifier {
    TokenReviewVerifier::new(client, AUDIENCE.into(), vec![SHIM_SA.into()])
}

#[tokio::test]
async fn a_node_bound_token_acts_for_its_node_and_is_cached() {
    let review = review_status(
        "system:serviceaccount:sluice-system:sluice-shim",
        &[AUDIENCE],
        json!({"authentication.kubernetes.io/node-name": ["node-a"]}),
    );
    let (client, server) = fake_api(vec![review], vec![]);
    let v = verifier(client);
    assert_eq!(
        v.verify(Some("the-token")).await.unwrap(),
        NodeIdentity::Node("node-a".into())
    );
    // Within the cache's lifetime the API server is not asked again.
    assert_eq!(
        v.verify(Some("the-token")).await.unwrap(),
        NodeIdentity::Node("node-a".into())
    );
    drop(v);
    assert_eq!(server.await.unwrap(), 1);
}

#[tokio::test]
async fn a_pod_bound_token_acts_for_the_node_its_pod_runs_on() {
    let review = review_status(
        "system:serviceaccount:sluice-system:sluice-shim",
        &[AUDIENCE],
        json!({"authentication.kubernetes.io/pod-name": ["sluice-shim-x7"]}),
    );
    let (client, _server) = fake_api(vec![review], vec![("sluice-shim-x7", "node-b")]);
    assert_eq!(
        verifier(client).verify(Some("the-token")).await.unwrap(),
        NodeIdentity::Node("node-b".into())
    );
}

#[tokio::test]
async fn tokens_that_prove_nothing_are_refused() {
    let cases: Vec<(&str, Value, Code)> = vec![
        (
            "not authenticated",
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": {"authenticated": false, "error": "expired"}}),
            Code::Unauthenticated,
        ),
        (
            "another audience",
            review_status(
                "system:serviceaccount:sluice-system:sluice-shim",
                &["kubernetes"],
                json!({"authentication.kubernetes.io/node-name": ["n"]}),
            ),
            Code::Unauthenticated,
        ),
        (
            "another ServiceAccount",
            review_status(
                "system:serviceaccount:default:builder",
                &[AUDIENCE],
                json!({"authentication.kubernetes.io/node-name": ["n"]}),
            ),
            Code::PermissionDenied,
        ),
        (
            "a user, not a ServiceAccount",
            review_status("alice", &[AUDIENCE], json!({})),
            Code::PermissionDenied,
        ),
        (
            "not bound to a pod or node",
            review_status(
                "system:serviceaccount:sluice-system:sluice-shim",
                &[AUDIENCE],
                json!({}),
            ),
            Code::PermissionDenied,
        ),
        (
            "bound to a pod that does not exist",
            review_status(
                "system:serviceaccount:sluice-system:sluice-shim",
                &[AUDIENCE],
                json!({"authentication.kubernetes.io/pod-name": ["gone"]}),
            ),
            Code::PermissionDenied,
        ),
    ];
    for (name, review, code) in cases {
        let (client, _server) = fake_api(vec![review], vec![]);
        let err = verifier(client).verify(Some("the-token")).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
    }
    let (client, _server) = fake_api(vec![], vec![]);
    assert_eq!(
        verifier(client).verify(None).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}
