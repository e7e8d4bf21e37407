//! The Kubernetes token verifier of the node channel against an API mock: which node a shim's
//! projected ServiceAccount token lets it act for, every way a token is refused, and what
//! garbage tokens may cost the API server.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use sluice_operator::{
    auth::{NodeIdentity, ReviewLimits, TokenReviewVerifier, TokenVerifier},
    engine::Hub,
    grpc::{self, NodeService},
};
use sluice_proto::v2::{self, node_channel_client::NodeChannelClient, shim_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};
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
        assert_eq!(tonic::Status::from(err.clone()).code(), code, "{name}: {err:?}");
    }
    let (client, _server) = fake_api(vec![], vec![]);
    assert_eq!(
        tonic::Status::from(verifier(client).verify(None).await.unwrap_err()).code(),
        Code::Unauthenticated
    );
}

/// An API server that reviews any token: those in `valid` are node-bound shim tokens, anything
/// else is not authenticated; a token listed in `failing` makes the review fail (HTTP 500).
/// Returns the tokens it was asked about, in order.
fn reviewing_api(valid: &[(&str, &str)], failing: &[&str]) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
    let valid: HashMap<String, String> = valid
        .iter()
        .map(|(t, n)| ((*t).to_owned(), (*n).to_owned()))
        .collect();
    let failing: Vec<String> = failing.iter().map(|t| (*t).to_owned()).collect();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let log = asked.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            assert_eq!(
                request.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let sent: Value = serde_json::from_slice(&bytes).unwrap();
            let token = sent["spec"]["token"].as_str().unwrap().to_owned();
            log.lock().unwrap().push(token.clone());
            if failing.contains(&token) {
                respond.send_response(
                    Response::builder()
                        .status(500)
                        .body(Body::from(b"{}".to_vec()))
                        .unwrap(),
                );
                continue;
            }
            let body = match valid.get(&token) {
                Some(node) => review_status(
                    "system:serviceaccount:sluice-system:sluice-shim",
                    &[AUDIENCE],
                    json!({"authentication.kubernetes.io/node-name": [node]}),
                ),
                None => {
                    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": {"authenticated": false, "error": "invalid bearer token"}})
                }
            };
            respond.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    (kube::Client::new(service, "default"), asked)
}

fn reviews(asked: &Arc<Mutex<Vec<String>>>) -> usize {
    asked.lock().unwrap().len()
}

/// The node channel in front of `verifier` (sessions are accepted; no engine behind them).
async fn node_channel(verifier: TokenReviewVerifier) -> String {
    let (hub, _events) = Hub::new(Duration::from_secs(1));
    let listener = grpc::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(grpc::serve(
        listener,
        NodeService::new(hub, Arc::new(verifier)),
        None,
        std::future::pending(),
    ));
    url
}

/// Opens one `Sync` stream with `token` as `node` on `channel`: Ok once the session runs.
async fn sync(channel: Channel, token: &str, node: &str) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(v2::ShimMessage {
        message: Some(shim_message::Message::Hello(v2::Hello {
            node: node.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    NodeChannelClient::new(channel).sync(req).await.map(|_| ())
}

async fn channels(url: &str, n: usize) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Endpoint::from_shared(url.to_owned())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    out
}

/// Opens `n` streams over a few connections at once, with the token `token(i)`.
async fn storm(url: &str, n: usize, token: impl Fn(usize) -> String) -> Vec<tonic::Code> {
    let channels = channels(url, 10).await;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let channel = channels[i % channels.len()].clone();
            let token = token(i);
            tokio::spawn(async move { sync(channel, &token, "node-a").await })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap().expect_err("a garbage token is refused").code());
    }
    codes
}

#[tokio::test]
async fn a_thousand_streams_with_one_bad_token_cost_one_review() {
    let (client, asked) = reviewing_api(&[("shim-a", "node-a")], &[]);
    let url = node_channel(verifier(client)).await;
    let codes = storm(&url, 1000, |_| "garbage".to_owned()).await;
    assert!(codes.iter().all(|c| *c == Code::Unauthenticated), "{codes:?}");
    assert_eq!(reviews(&asked), 1, "one review for one token");

    let channel = channels(&url, 1).await.remove(0);
    sync(channel, "shim-a", "node-a")
        .await
        .expect("a valid shim connects");
    assert_eq!(reviews(&asked), 2);
}

#[tokio::test]
async fn a_thousand_garbage_tokens_cost_at_most_the_burst_and_shims_still_connect() {
    let (client, asked) = reviewing_api(&[("shim-a", "node-a"), ("shim-b", "node-b")], &[]);
    let limits = ReviewLimits {
        rate: 2.0,
        burst: 20,
        ..ReviewLimits::default()
    };
    let url = node_channel(TokenReviewVerifier::with_limits(
        client,
        AUDIENCE.into(),
        vec![SHIM_SA.into()],
        limits,
    ))
    .await;
    let channel = channels(&url, 1).await.remove(0);
    sync(channel.clone(), "shim-a", "node-a")
        .await
        .expect("node-a's shim connects");

    let started = std::time::Instant::now();
    let codes = storm(&url, 1000, |i| format!("garbage-{i}")).await;
    let took = started.elapsed();
    let bound = 20 + (2.0 * took.as_secs_f64()).ceil() as usize;
    let reviewed = reviews(&asked) - 1;
    assert!(
        reviewed <= bound,
        "{reviewed} reviews for 1000 garbage tokens in {took:?}; at most {bound}"
    );
    let refused_unseen = codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Unauthenticated | Code::ResourceExhausted)),
        "{codes:?}"
    );
    assert_eq!(
        refused_unseen + reviewed,
        1000,
        "the rest were refused without a review"
    );

    // A shim the operator knows reconnects at once; a new one as soon as the bucket refills.
    let before = reviews(&asked);
    sync(channel.clone(), "shim-a", "node-a")
        .await
        .expect("node-a reconnects");
    assert_eq!(reviews(&asked), before, "from the cache");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match sync(channel.clone(), "shim-b", "node-b").await {
            Ok(()) => break,
            Err(s) if s.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("node-b's shim could not connect: {s:?}"),
        }
    }
}

#[tokio::test]
async fn refusals_expire_failures_are_not_kept_and_the_cache_is_bounded() {
    let (client, asked) = reviewing_api(&[("shim-a", "node-a")], &["unlucky"]);
    let limits = ReviewLimits {
        negative_ttl: Duration::from_millis(200),
        cache_size: 2,
        ..ReviewLimits::default()
    };
    let v = TokenReviewVerifier::with_limits(client, AUDIENCE.into(), vec![SHIM_SA.into()], limits);

    // A refusal is kept for the negative TTL, then asked again.
    assert_eq!(
        tonic::Status::from(v.verify(Some("bad")).await.unwrap_err()).code(),
        Code::Unauthenticated
    );
    assert_eq!(
        tonic::Status::from(v.verify(Some("bad")).await.unwrap_err()).code(),
        Code::Unauthenticated
    );
    assert_eq!(reviews(&asked), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        tonic::Status::from(v.verify(Some("bad")).await.unwrap_err()).code(),
        Code::Unauthenticated
    );
    assert_eq!(reviews(&asked), 2);

    // A failed review says nothing about the token: the next attempt asks again.
    assert_eq!(
        tonic::Status::from(v.verify(Some("unlucky")).await.unwrap_err()).code(),
        Code::Unavailable
    );
    assert_eq!(
        tonic::Status::from(v.verify(Some("unlucky")).await.unwrap_err()).code(),
        Code::Unavailable
    );
    assert_eq!(reviews(&asked), 4);

    // Two verdicts fit: a third token pushes out the one expiring first (a refusal), and the
    // shim's stays.
    assert_eq!(
        v.verify(Some("shim-a")).await.unwrap(),
        NodeIdentity::Node("node-a".into())
    );
    v.verify(Some("other")).await.unwrap_err();
    v.verify(Some("third")).await.unwrap_err();
    assert_eq!(reviews(&asked), 7);
    v.verify(Some("shim-a")).await.unwrap();
    assert_eq!(reviews(&asked), 7, "the shim's verdict was kept");
    v.verify(Some("other")).await.unwrap_err();
    assert_eq!(reviews(&asked), 8, "the oldest refusal was not");
}
