//! The Kubernetes layer against a fake API server (no kube-apiserver runs here): a
//! `tower-test` mock service behind a real `kube::Client`, answering list, watch, get, create,
//! replace and patch like the API server does. Watch events in, `SourceEvent`s out; status
//! updates in, server-side-apply patches out; notices in, Event POSTs out; leader election on a
//! Lease with optimistic concurrency. Time is paused: backoffs and lease expiry take no real
//! time, and "nothing happens" is checked by letting the runtime go idle.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};
use sluice_operator::{
    controller::{self, leader},
    engine::{self, Engine, EngineConfig, EngineMetrics, Hub, NodeView, ShimEvent},
    live::{Notice, SourceEvent, StatusUpdate},
    metrics::{self, ControllerMetrics},
    model::{GatewaySlot, NamespaceInfo, NodeInfo, PodInfo, PodPhase},
    planner::{ActiveGateway, Change, PolicyOutcome},
};
use tokio::sync::{mpsc, watch};
use tower_test::mock;

const POLICIES: &str = "/apis/sluice.dev/v1alpha1/egressgatewaypolicies";
const NODES: &str = "/api/v1/nodes";
const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/sluice/leases";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const SERVICE_CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";
const SERVICE_CIDRS_BETA: &str = "/apis/networking.k8s.io/v1beta1/servicecidrs";

/// A write (anything but GET) as the fake API server received it.
#[derive(Clone, Debug)]
struct Write {
    method: Method,
    /// Path and query, exactly as sent.
    uri: String,
    content_type: String,
    body: Value,
}

#[derive(Default)]
struct Collection {
    items: BTreeMap<String, Value>,
    /// Watch events not yet delivered, and watch requests waiting for one.
    pending: VecDeque<Value>,
    parked: Vec<mock::SendResponse<Response<Body>>>,
}

#[derive(Default)]
struct State {
    collections: HashMap<String, Collection>,
    version: u64,
    /// GET requests: (path and query, Accept header).
    gets: Vec<(String, String)>,
    /// Every request fails with 500 (an API server outage).
    broken: bool,
    /// Every request is left unanswered (a partitioned API server).
    hanging: Vec<mock::SendResponse<Response<Body>>>,
    hang: bool,
    /// Collections whose GETs fail with this code: 404 where the API server does not serve them
    /// (an older Kubernetes), 403 where RBAC does not allow them.
    refused: HashMap<String, u16>,
}

/// The fake API server.
#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    writes: Arc<Mutex<Option<mpsc::UnboundedSender<Write>>>>,
}

fn reply(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message})
}

/// Splits `/a/b/c/name[/status]` into (collection, name, subresource) for known collections.
fn split(path: &str) -> (String, Option<String>, Option<String>) {
    for c in [
        POLICIES,
        NODES,
        NAMESPACES,
        PODS,
        LEASES,
        EVENTS,
        SERVICE_CIDRS,
        SERVICE_CIDRS_BETA,
    ] {
        if path == c {
            return (c.to_owned(), None, None);
        }
        if let Some(rest) = path.strip_prefix(c).and_then(|r| r.strip_prefix('/')) {
            let mut parts = rest.splitn(2, '/');
            let name = parts.next().map(str::to_owned);
            return (c.to_owned(), name, parts.next().map(str::to_owned));
        }
    }
    (path.to_owned(), None, None)
}

impl Fake {
    fn new() -> Self {
        Fake {
            state: Arc::default(),
            writes: Arc::default(),
        }
    }

    /// A client talking to this fake, and the writes it receives.
    fn client(&self) -> (kube::Client, mpsc::UnboundedReceiver<Write>) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (tx, rx) = mpsc::unbounded_channel();
        *self.writes.lock().unwrap() = Some(tx);
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let body = body.collect_bytes().await.unwrap();
                fake.serve(parts, &body, send);
            }
        });
        (kube::Client::new(service, "default"), rx)
    }

    fn next_version(state: &mut State) -> String {
        state.version += 1;
        state.version.to_string()
    }

    /// Stores an object (as if created before the test) without a watch event.
    fn seed(&self, collection: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        object["metadata"]["resourceVersion"] = json!(Self::next_version(&mut state));
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        state
            .collections
            .entry(collection.into())
            .or_default()
            .items
            .insert(name, object);
    }

    /// Changes an object and tells watchers (`ADDED`, `MODIFIED` or `DELETED`).
    fn event(&self, collection: &str, type_: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        object["metadata"]["resourceVersion"] = json!(Self::next_version(&mut state));
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let c = state.collections.entry(collection.into()).or_default();
        if type_ == "DELETED" {
            c.items.remove(&name);
        } else {
            c.items.insert(name, object.clone());
        }
        Self::notify(c, json!({"type": type_, "object": object}));
    }

    /// Deletes an object while nobody watches (a watch gap).
    fn forget(&self, collection: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        state.collections.get_mut(collection).unwrap().items.remove(name);
    }

    /// Ends the current watch of a collection with `410 Gone`: the client must list again.
    fn expire_watch(&self, collection: &str) {
        let mut state = self.state.lock().unwrap();
        let c = state.collections.entry(collection.into()).or_default();
        let gone = status_error(410, "Expired", "too old resource version");
        Self::notify(c, json!({"type": "ERROR", "object": gone}));
    }

    fn notify(c: &mut Collection, event: Value) {
        c.pending.push_back(event);
        if let Some(send) = c.parked.pop() {
            Self::deliver(c, send);
        }
    }

    fn deliver(c: &mut Collection, send: mock::SendResponse<Response<Body>>) {
        let mut body = Vec::new();
        for event in c.pending.drain(..) {
            body.extend(serde_json::to_vec(&event).unwrap());
            body.push(b'\n');
        }
        send.send_response(Response::builder().status(200).body(Body::from(body)).unwrap());
    }

    fn set_broken(&self, broken: bool) {
        self.state.lock().unwrap().broken = broken;
    }

    fn set_hanging(&self, hang: bool) {
        self.state.lock().unwrap().hang = hang;
    }

    fn refuse(&self, collection: &str, code: u16) {
        self.state.lock().unwrap().refused.insert(collection.into(), code);
    }

    fn gets(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().gets.clone()
    }

    fn object(&self, collection: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state.collections.get(collection)?.items.get(name).cloned()
    }

    fn serve(&self, parts: http::request::Parts, body: &[u8], send: mock::SendResponse<Response<Body>>) {
        let uri = parts.uri.path_and_query().unwrap().as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let (collection, name, subresource) = split(&path);
        let mut state = self.state.lock().unwrap();
        if state.hang {
            state.hanging.push(send);
            return;
        }
        if state.broken {
            return send.send_response(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status_error(500, "InternalError", "etcd is down"),
            ));
        }
        if parts.method == Method::GET {
            state.gets.push((uri, header("accept")));
            if let Some(&code) = state.refused.get(&collection) {
                let reason = if code == 404 { "NotFound" } else { "Forbidden" };
                return send.send_response(reply(
                    StatusCode::from_u16(code).unwrap(),
                    &status_error(code, reason, "refused by the test"),
                ));
            }
            let metadata_only = header("accept").contains("as=PartialObjectMetadata");
            let version = state.version.to_string();
            let c = state.collections.entry(collection.clone()).or_default();
            if let Some(name) = name {
                return send.send_response(match c.items.get(&name) {
                    Some(o) => reply(StatusCode::OK, o),
                    None => reply(
                        StatusCode::NOT_FOUND,
                        &status_error(404, "NotFound", &format!("{name:?} not found")),
                    ),
                });
            }
            if query.split('&').any(|q| q == "watch=true") {
                if c.pending.is_empty() {
                    c.parked.push(send);
                } else {
                    Self::deliver(c, send);
                }
                return;
            }
            let items: Vec<Value> = c
                .items
                .values()
                .map(|o| {
                    if metadata_only {
                        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]})
                    } else {
                        o.clone()
                    }
                })
                .collect();
            // A list starts a new watch history: stale watch events are not replayed.
            c.pending.clear();
            let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": version}, "items": items});
            return send.send_response(reply(StatusCode::OK, &list));
        }

        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if let Some(tx) = self.writes.lock().unwrap().as_ref() {
            let _ = tx.send(Write {
                method: parts.method.clone(),
                uri,
                content_type: header("content-type"),
                body: body.clone(),
            });
        }
        let version = Self::next_version(&mut state);
        let c = state.collections.entry(collection.clone()).or_default();
        let response = match (&parts.method, name, subresource.as_deref()) {
            (&Method::POST, None, None) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                match c.items.entry(name) {
                    std::collections::btree_map::Entry::Occupied(_) => reply(
                        StatusCode::CONFLICT,
                        &status_error(409, "AlreadyExists", "already exists"),
                    ),
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        let mut o = body;
                        o["metadata"]["resourceVersion"] = json!(version);
                        reply(StatusCode::CREATED, slot.insert(o))
                    }
                }
            }
            (&Method::PUT, Some(name), None) => match c.items.get(&name) {
                None => reply(StatusCode::NOT_FOUND, &status_error(404, "NotFound", "not found")),
                Some(have) if have["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] => {
                    reply(
                        StatusCode::CONFLICT,
                        &status_error(409, "Conflict", "the object has been modified"),
                    )
                }
                Some(_) => {
                    let mut o = body;
                    o["metadata"]["resourceVersion"] = json!(version);
                    c.items.insert(name, o.clone());
                    reply(StatusCode::OK, &o)
                }
            },
            (&Method::PATCH, Some(name), Some("status")) => match c.items.get(&name).cloned() {
                None => reply(StatusCode::NOT_FOUND, &status_error(404, "NotFound", "not found")),
                Some(mut o) => {
                    o["status"] = body["status"].clone();
                    o["metadata"]["resourceVersion"] = json!(version);
                    c.items.insert(name, o.clone());
                    Self::notify(c, json!({"type": "MODIFIED", "object": o.clone()}));
                    reply(StatusCode::OK, &o)
                }
            },
            _ => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &status_error(405, "MethodNotAllowed", ""),
            ),
        };
        send.send_response(response);
    }
}

fn policy(name: &str, uid: &str, generation: i64, gateways: Value) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "EgressGatewayPolicy",
        "metadata": {"name": name, "uid": uid, "generation": generation, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
            "destinationCIDRs": ["203.0.113.0/24"],
            "egressGateway": {"nodeSelector": {"matchLabels": {"egress": "true"}}, "egressIP": "192.0.2.10"}
        },
        "status": {"conditions": [], "gateways": gateways, "matchedEndpoints": 0}
    })
}

fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"egress": "true"},
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                     "managedFields": [{"manager": "kubelet"}]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                   "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-01-01T00:00:00Z"}],
                   "images": [{"names": ["nginx"], "sizeBytes": 1}]}
    })
}

fn pod(name: &str, uid: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": labels},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn pod_info(name: &str, uid: &str, ip: &str, labels: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        namespace: "shop".into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        node_name: Some("n1".into()),
        ips: vec![ip.parse().unwrap()],
        host_network: false,
        phase: PodPhase::Running,
    }
}

fn slot(node: &str) -> GatewaySlot {
    GatewaySlot {
        entry: 0,
        slot: 0,
        node: node.into(),
    }
}

async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("a source event")
        .expect("the controller runs")
}

async fn next_change(rx: &mut mpsc::Receiver<SourceEvent>) -> Change {
    match next(rx).await {
        SourceEvent::Change(c) => *c,
        other => panic!("expected a change, got {other:?}"),
    }
}

/// Changes up to `Synced`, sorted (the four watchers interleave freely).
async fn initial(rx: &mut mpsc::Receiver<SourceEvent>) -> Vec<Change> {
    let mut changes = Vec::new();
    loop {
        match next(rx).await {
            SourceEvent::Synced => break,
            SourceEvent::Change(c) => changes.push(*c),
            SourceEvent::ServiceCidrs(_) => {}
        }
    }
    changes.sort_by_key(|c| format!("{c:?}"));
    changes
}

struct Running {
    sources: mpsc::Receiver<SourceEvent>,
    updates: mpsc::Sender<StatusUpdate>,
    notices: mpsc::Sender<Notice>,
    writes: mpsc::UnboundedReceiver<Write>,
    leading: watch::Sender<bool>,
}

fn start(fake: &Fake, leading: bool) -> Running {
    start_with(fake, leading, ControllerMetrics::default())
}

fn start_with(fake: &Fake, leading: bool, metrics: ControllerMetrics) -> Running {
    let (client, writes) = fake.client();
    let (sources_tx, sources) = mpsc::channel(16);
    let (updates, updates_rx) = mpsc::channel(16);
    let (notices, notices_rx) = mpsc::channel(16);
    let (leading_tx, leading_rx) = watch::channel(leading);
    let mut config = controller::Config::new(leading_rx, Some("sluice-operator-0".into()));
    config.metrics = metrics;
    tokio::spawn(controller::run(
        client, config, sources_tx, updates_rx, notices_rx,
    ));
    Running {
        sources,
        updates,
        notices,
        writes,
        leading: leading_tx,
    }
}

/// Nothing is written before the runtime goes idle (time is paused: this takes no real time).
async fn assert_no_write(writes: &mut mpsc::UnboundedReceiver<Write>) {
    if let Ok(w) = tokio::time::timeout(Duration::from_secs(30), writes.recv()).await {
        panic!("unexpected write: {w:?}");
    }
}

async fn next_write(writes: &mut mpsc::UnboundedReceiver<Write>) -> Write {
    tokio::time::timeout(Duration::from_secs(60), writes.recv())
        .await
        .expect("a write")
        .expect("the fake runs")
}

#[tokio::test(start_paused = true)]
async fn watch_events_become_planner_changes() {
    let fake = Fake::new();
    fake.seed(
        POLICIES,
        policy(
            "p",
            "uid-p",
            2,
            json!([{"node": "n1", "ip": "172.18.0.2", "entry": 0, "slot": 0}]),
        ),
    );
    fake.seed(NODES, node("n1", "172.18.0.2"));
    fake.seed(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}}),
    );
    fake.seed(PODS, pod("web-1", "uid-1", "10.0.1.5", json!({"app": "web"})));
    fake.seed(PODS, pod("web-2", "uid-2", "10.0.1.6", json!({"app": "web"})));
    let mut registry = metrics::registry();
    let mut run = start_with(&fake, true, ControllerMetrics::register(&mut registry));

    // The initial lists, then Synced.
    let changes = initial(&mut run.sources).await;
    let Change::UpsertPolicy(input) = &changes[4] else {
        panic!("{changes:?}")
    };
    assert_eq!((input.name.as_str(), input.generation), ("p", Some(2)));
    assert_eq!(
        input.retained_gateways,
        vec![slot("n1")],
        "seeded from status.gateways"
    );
    assert_eq!(
        changes[..4].to_vec(),
        vec![
            Change::UpsertNamespace(NamespaceInfo {
                name: "shop".into(),
                labels: [("team".to_owned(), "a".to_owned())].into()
            }),
            Change::UpsertNode(NodeInfo {
                name: "n1".into(),
                labels: [("egress".to_owned(), "true".to_owned())].into(),
                addresses: vec!["172.18.0.2".parse::<IpAddr>().unwrap()],
                ready: true,
                eligible: true,
                draining: false,
                interfaces: None,
                pod_cidrs: vec![],
            }),
            Change::UpsertPod(pod_info("web-1", "uid-1", "10.0.1.5", &[("app", "web")])),
            Change::UpsertPod(pod_info("web-2", "uid-2", "10.0.1.6", &[("app", "web")])),
        ]
    );

    // What was asked: finished pods filtered by the server, namespaces metadata-only.
    let gets = fake.gets();
    let pod_list = gets.iter().find(|(u, _)| u.starts_with("/api/v1/pods?")).unwrap();
    assert!(
        pod_list
            .0
            .contains("fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed"),
        "{pod_list:?}"
    );
    let ns_list = gets
        .iter()
        .find(|(u, _)| u.starts_with("/api/v1/namespaces?"))
        .unwrap();
    assert!(ns_list.1.contains("as=PartialObjectMetadata"), "{ns_list:?}");

    // A pod update the planner cannot see (a container restarted) is dropped; the next one,
    // which adds a label, arrives (so the first was not merely late).
    let mut restarted = pod("web-1", "uid-1", "10.0.1.5", json!({"app": "web"}));
    restarted["status"]["containerStatuses"] = json!([{"name": "c", "restartCount": 1}]);
    fake.event(PODS, "MODIFIED", restarted);
    fake.event(
        PODS,
        "MODIFIED",
        pod("web-1", "uid-1", "10.0.1.5", json!({"app": "web", "tier": "1"})),
    );
    assert_eq!(
        next_change(&mut run.sources).await,
        Change::UpsertPod(pod_info(
            "web-1",
            "uid-1",
            "10.0.1.5",
            &[("app", "web"), ("tier", "1")]
        ))
    );

    // Four pod events (two listed, two updates of which one changed nothing), three changes.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "sluice_controller_watch_events_total{kind=\"Pod\",event=\"apply\"} 4",
        "sluice_controller_changes_total{kind=\"Pod\"} 3",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }

    fake.event(PODS, "DELETED", pod("web-1", "uid-1", "10.0.1.5", json!({})));
    assert_eq!(
        next_change(&mut run.sources).await,
        Change::RemovePod("uid-1".into())
    );

    // A node heartbeat changes nothing; a NotReady node does.
    let mut heartbeat = node("n1", "172.18.0.2");
    heartbeat["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2026-01-01T00:01:00Z");
    fake.event(NODES, "MODIFIED", heartbeat);
    let mut not_ready = node("n1", "172.18.0.2");
    not_ready["status"]["conditions"][0]["status"] = json!("False");
    fake.event(NODES, "MODIFIED", not_ready);
    let Change::UpsertNode(n) = next_change(&mut run.sources).await else {
        panic!("expected a node")
    };
    assert!(!n.ready);

    // A new leader's choice in status moves the retained gateways.
    fake.event(
        POLICIES,
        "MODIFIED",
        policy(
            "p",
            "uid-p",
            2,
            json!([{"node": "n2", "ip": "172.18.0.3", "entry": 0, "slot": 0}]),
        ),
    );
    let Change::UpsertPolicy(input) = next_change(&mut run.sources).await else {
        panic!("expected a policy")
    };
    assert_eq!(input.retained_gateways, vec![slot("n2")]);

    // A pod deleted while the watch was down is removed after the re-list; unchanged pods are
    // not sent again.
    fake.forget(PODS, "web-2");
    fake.expire_watch(PODS);
    assert_eq!(
        next_change(&mut run.sources).await,
        Change::RemovePod("uid-2".into())
    );

    fake.event(POLICIES, "DELETED", policy("p", "uid-p", 2, json!([])));
    assert_eq!(
        next_change(&mut run.sources).await,
        Change::RemovePolicy("p".into())
    );
    fake.event(NAMESPACES, "DELETED", json!({"metadata": {"name": "shop"}}));
    assert_eq!(
        next_change(&mut run.sources).await,
        Change::RemoveNamespace("shop".into())
    );
    assert_no_write(&mut run.writes).await;
    drop(run.updates);
    drop(run.notices);
}

fn update(programmed: usize) -> StatusUpdate {
    StatusUpdate {
        outcome: PolicyOutcome {
            name: "p".into(),
            generation: Some(3),
            accepted: Ok(()),
            gateways: vec![ActiveGateway {
                entry: 0,
                slot: 0,
                node: "n1".into(),
                ip: "172.18.0.2".parse().unwrap(),
                egress_v4: Some("192.0.2.10".parse().unwrap()),
                egress_v6: None,
                interface: None,
                managed: false,
            }],
            matched_endpoints: 1,
            conflicts: vec![],
            gateway_diagnosis: Vec::new(),
            managed_ips: vec![],
            managed_taken: vec![],
        },
        programmed,
        to_program: 1,
        behind: vec![],
        gateways_behind: vec![],
        address_conflicts: vec![],
        draining: vec![],
    }
}

/// The conditions' transition times (checked to be timestamps) and the body with them blanked.
fn strip_times(mut body: Value) -> (Vec<String>, Value) {
    let mut times = Vec::new();
    for c in body["status"]["conditions"].as_array_mut().unwrap() {
        let t = c["lastTransitionTime"].as_str().unwrap().to_owned();
        assert!(t.parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "{t}");
        times.push(t);
        c["lastTransitionTime"] = json!("T");
    }
    (times, body)
}

fn expected_status(programmed: bool) -> Value {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "observedGeneration": 3, "lastTransitionTime": "T"})
    };
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "EgressGatewayPolicy",
        "metadata": {"name": "p"},
        "status": {
            "observedGeneration": 3,
            "conditions": [
                condition("Accepted", "True", "Accepted", "the policy is valid"),
                condition("PodsSelected", "True", "PodsSelected", "1 pod(s) selected"),
                condition("GatewaySelected", "True", "GatewaysSelected", "1 gateway node(s): n1"),
                if programmed {
                    condition("Programmed", "True", "Programmed", "1/1 nodes")
                } else {
                    condition("Programmed", "False", "Pending", "0/1 nodes")
                },
            ],
            "gateways": [{"node": "n1", "ip": "172.18.0.2", "egressIP": "192.0.2.10", "entry": 0, "slot": 0}],
            "matchedEndpoints": 1
        }
    })
}

const STATUS_PATCH: &str =
    "/apis/sluice.dev/v1alpha1/egressgatewaypolicies/p/status?&force=true&fieldManager=sluice-operator";

#[tokio::test(start_paused = true)]
async fn status_updates_become_server_side_apply_patches() {
    let fake = Fake::new();
    fake.seed(POLICIES, policy("p", "uid-p", 3, json!([])));
    let mut run = start(&fake, true);
    initial(&mut run.sources).await;

    run.updates.send(update(1)).await.unwrap();
    let w = next_write(&mut run.writes).await;
    assert_eq!((w.method.as_str(), w.uri.as_str()), ("PATCH", STATUS_PATCH));
    assert_eq!(w.content_type, "application/apply-patch+yaml");
    let (first_times, body) = strip_times(w.body);
    assert_eq!(body, expected_status(true));
    // The status write comes back through the watch, with the new gateways to retain.
    let Change::UpsertPolicy(input) = next_change(&mut run.sources).await else {
        panic!("expected the policy")
    };
    assert_eq!(input.retained_gateways, vec![slot("n1")]);
    assert_eq!(
        fake.object(POLICIES, "p").unwrap()["status"]["matchedEndpoints"],
        json!(1)
    );

    // The same status again is not written.
    run.updates.send(update(1)).await.unwrap();
    assert_no_write(&mut run.writes).await;

    // A change is; conditions that did not flip keep their transition time.
    run.updates.send(update(0)).await.unwrap();
    let (times, body) = strip_times(next_write(&mut run.writes).await.body);
    assert_eq!(body, expected_status(false));
    assert_eq!(times[..3], first_times[..3]);

    // A standby writes nothing, and writes the latest status once it leads.
    run.leading.send(false).unwrap();
    run.updates.send(update(1)).await.unwrap();
    assert_no_write(&mut run.writes).await;
    run.leading.send(true).unwrap();
    let w = next_write(&mut run.writes).await;
    assert_eq!(w.uri, STATUS_PATCH);
    assert_eq!(strip_times(w.body).1, expected_status(true));
    assert_no_write(&mut run.writes).await;

    // Updates queued together are coalesced: only each policy's latest counts (here the
    // status already written).
    run.updates.try_send(update(0)).unwrap();
    run.updates.try_send(update(1)).unwrap();
    assert_no_write(&mut run.writes).await;

    // A rejected policy.
    let mut rejected = update(0);
    rejected.outcome.accepted = Err(sluice_operator::policy::PolicyError {
        reason: "InvalidCIDR",
        message: "spec.destinationCIDRs[0]: bad".into(),
    });
    rejected.outcome.gateways.clear();
    rejected.to_program = 0;
    run.updates.send(rejected).await.unwrap();
    let body = next_write(&mut run.writes).await.body;
    let accepted = &body["status"]["conditions"][0];
    assert_eq!(
        (&accepted["status"], &accepted["reason"], &accepted["message"]),
        (
            &json!("False"),
            &json!("InvalidCIDR"),
            &json!("spec.destinationCIDRs[0]: bad")
        )
    );
    assert_eq!(body["status"]["gateways"], json!([]));
    let Change::UpsertPolicy(input) = next_change(&mut run.sources).await else {
        panic!("expected the policy")
    };
    assert!(input.retained_gateways.is_empty());

    // A failed write is retried.
    fake.set_broken(true);
    run.updates.send(update(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fake.set_broken(false);
    let w = next_write(&mut run.writes).await;
    assert_eq!(w.uri, STATUS_PATCH);
    assert_eq!(strip_times(w.body).1, expected_status(true));
    let Change::UpsertPolicy(input) = next_change(&mut run.sources).await else {
        panic!("expected the policy")
    };
    assert_eq!(input.retained_gateways, vec![slot("n1")]);

    // A policy deleted meanwhile is not written (and not recreated).
    fake.event(POLICIES, "DELETED", policy("p", "uid-p", 3, json!([])));
    assert_eq!(
        next_change(&mut run.sources).await,
        Change::RemovePolicy("p".into())
    );
    run.updates.send(update(1)).await.unwrap();
    assert_no_write(&mut run.writes).await;
}

fn without_generated_fields(mut event: Value) -> Value {
    let name = event["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("p."), "{name}");
    assert!(event["eventTime"].is_string());
    event["metadata"].as_object_mut().unwrap().remove("name");
    event.as_object_mut().unwrap().remove("eventTime");
    event
}

#[tokio::test(start_paused = true)]
async fn notices_become_events_on_the_policy() {
    let fake = Fake::new();
    fake.seed(POLICIES, policy("p", "uid-p", 3, json!([])));
    let mut run = start(&fake, true);
    initial(&mut run.sources).await;
    let event = |type_: &str, reason: &str, action: &str, note: &str| {
        json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"namespace": null},
            "type": type_, "reason": reason, "action": action, "note": note,
            "regarding": {"apiVersion": "sluice.dev/v1alpha1", "kind": "EgressGatewayPolicy", "name": "p", "uid": "uid-p"},
            "reportingController": "sluice-operator",
            "reportingInstance": "sluice-operator-0"
        })
    };
    let cases = [
        (
            Notice::Failover {
                policy: "p".into(),
                lost: "n1".into(),
                replacement: Some("n2".into()),
                took: Duration::from_millis(830),
            },
            event(
                "Warning",
                "GatewayFailover",
                "Failover",
                "gateway node n1 stopped serving; n2 took over after 830.000ms",
            ),
        ),
        (
            Notice::GatewaysChanged {
                policy: "p".into(),
                from: vec![],
                to: vec!["n1".into(), "n2".into()],
            },
            event(
                "Normal",
                "GatewaysChanged",
                "SelectGateways",
                "gateway nodes: none -> n1, n2",
            ),
        ),
        (
            Notice::Rejected {
                policy: "p".into(),
                reason: "InvalidCIDR".into(),
                message: "spec.destinationCIDRs[0]: bad".into(),
            },
            event(
                "Warning",
                "PolicyRejected",
                "Validate",
                "InvalidCIDR: spec.destinationCIDRs[0]: bad",
            ),
        ),
    ];
    for (notice, want) in cases {
        run.notices.send(notice).await.unwrap();
        let w = next_write(&mut run.writes).await;
        assert_eq!(
            (w.method.as_str(), w.uri.as_str()),
            ("POST", format!("{EVENTS}?").as_str())
        );
        let mut got = without_generated_fields(w.body);
        // The API server fills the namespace from the path.
        got["metadata"]["namespace"] = json!(null);
        assert_eq!(got, want);
    }

    // A standby publishes nothing.
    run.leading.send(false).unwrap();
    run.notices
        .send(Notice::Rejected {
            policy: "p".into(),
            reason: "X".into(),
            message: "y".into(),
        })
        .await
        .unwrap();
    assert_no_write(&mut run.writes).await;
}

fn lease_config(identity: &str) -> leader::LeaseConfig {
    leader::LeaseConfig {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
        ..leader::LeaseConfig::new("sluice", "sluice-operator", identity)
    }
}

async fn wait_for(rx: &mut watch::Receiver<bool>, value: bool) {
    tokio::time::timeout(Duration::from_secs(600), rx.wait_for(|v| *v == value))
        .await
        .expect("leadership changes in time")
        .expect("the election runs");
}

fn holder(fake: &Fake) -> Option<String> {
    fake.object(LEASES, "sluice-operator")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(start_paused = true)]
async fn leader_election_on_a_lease() {
    let fake = Fake::new();
    let (client_a, _wa) = fake.client();
    let a = leader::LeaderElection::start(client_a, lease_config("a"), None);
    let mut a_leads = a.leading();
    wait_for(&mut a_leads, true).await;
    assert_eq!(holder(&fake).as_deref(), Some("a"));
    let lease = fake.object(LEASES, "sluice-operator").unwrap();
    assert_eq!(lease["spec"]["leaseDurationSeconds"], json!(15));
    assert_eq!(lease["spec"]["leaseTransitions"], json!(0));

    // The standby sees a held lease that keeps being renewed, and does not lead.
    let (client_b, _wb) = fake.client();
    let b = leader::LeaderElection::start(client_b, lease_config("b"), None);
    let mut b_leads = b.leading();
    let renewed = fake.object(LEASES, "sluice-operator").unwrap()["spec"]["renewTime"].clone();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!*b_leads.borrow());
    assert!(*a_leads.borrow());
    assert_ne!(
        fake.object(LEASES, "sluice-operator").unwrap()["spec"]["renewTime"],
        renewed
    );

    // The leader dies without releasing: the standby takes over one lease duration after its
    // last sight of a renewal, which was at most one retry period before or after the death.
    drop(a);
    let died = tokio::time::Instant::now();
    wait_for(&mut b_leads, true).await;
    let took = died.elapsed();
    assert!(took <= Duration::from_secs(15 + 2), "took {took:?}");
    assert!(
        took >= Duration::from_secs(15 - 2),
        "took over too early: {took:?}"
    );
    assert_eq!(holder(&fake).as_deref(), Some("b"));
    assert_eq!(
        fake.object(LEASES, "sluice-operator").unwrap()["spec"]["leaseTransitions"],
        json!(1)
    );

    // A graceful step-down releases the lease: a new replica takes it at its first retry.
    let (client_c, _wc) = fake.client();
    let c = leader::LeaderElection::start(client_c, lease_config("c"), None);
    let mut c_leads = c.leading();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!*c_leads.borrow());
    b.step_down().await;
    assert!(!*b_leads.borrow());
    let released = tokio::time::Instant::now();
    wait_for(&mut c_leads, true).await;
    assert!(
        released.elapsed() <= Duration::from_secs(2),
        "{:?}",
        released.elapsed()
    );
    assert_eq!(holder(&fake).as_deref(), Some("c"));
}

#[tokio::test(start_paused = true)]
async fn only_one_of_two_replicas_started_together_leads() {
    let fake = Fake::new();
    let (client_a, _wa) = fake.client();
    let (client_b, _wb) = fake.client();
    let a = leader::LeaderElection::start(client_a, lease_config("a"), None);
    let b = leader::LeaderElection::start(client_b, lease_config("b"), None);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (la, lb) = (*a.leading().borrow(), *b.leading().borrow());
    assert!(la ^ lb, "exactly one leads: a={la} b={lb}");
    assert_eq!(holder(&fake).as_deref(), Some(if la { "a" } else { "b" }));
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_steps_down_before_the_lease_expires() {
    let fake = Fake::new();
    let (client, _w) = fake.client();
    let a = leader::LeaderElection::start(client, lease_config("a"), None);
    let mut leads = a.leading();
    wait_for(&mut leads, true).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    fake.set_broken(true);
    let broke = tokio::time::Instant::now();
    wait_for(&mut leads, false).await;
    let took = broke.elapsed();
    // Last renewal at most one retry period before the outage; gives up at the renew deadline,
    // before the 15 s lease lets a standby take over.
    assert!(took <= Duration::from_secs(10), "{took:?}");
    assert!(took >= Duration::from_secs(10 - 2), "{took:?}");
    // Back when the API server is.
    fake.set_broken(false);
    wait_for(&mut leads, true).await;
    assert_eq!(holder(&fake).as_deref(), Some("a"));

    // Requests that hang do not keep it leading either.
    tokio::time::sleep(Duration::from_secs(7)).await;
    fake.set_hanging(true);
    let hung = tokio::time::Instant::now();
    wait_for(&mut leads, false).await;
    assert!(hung.elapsed() <= Duration::from_secs(10), "{:?}", hung.elapsed());
}

fn lease_held_by(holder: &str, seconds: i64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "sluice-operator", "namespace": "sluice"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": seconds,
                 "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 3}
    })
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_over_as_soon_as_the_lease_expired_on_its_clock() {
    // A holder that never renews again: the standby sees the Lease first at its start, and may
    // take it over 15 s later, not at its first retry after that (16 s with a 2 s retry period).
    let fake = Fake::new();
    fake.seed(LEASES, lease_held_by("dead", 15));
    let (client, _w) = fake.client();
    let started = tokio::time::Instant::now();
    let b = leader::LeaderElection::start(client, lease_config("b"), None);
    let mut leads = b.leading();
    wait_for(&mut leads, true).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(15) && took < Duration::from_millis(15_050),
        "took over after {took:?}"
    );
    assert_eq!(holder(&fake).as_deref(), Some("b"));
    assert_eq!(
        fake.object(LEASES, "sluice-operator").unwrap()["spec"]["leaseTransitions"],
        json!(4)
    );
}

/// Crash takeover with the default timings (10 s lease, 1 s retry): the leader dies at several
/// points between two renewals, and the standby reads the Lease at several phases against them.
#[tokio::test(start_paused = true)]
async fn crash_takeover_with_the_default_timings() {
    let timings = leader::LeaseTimings::default();
    let (duration, retry) = (timings.lease_duration, timings.retry_period);
    let mut took = Vec::new();
    for standby_phase in [200, 500, 800] {
        for death in [100, 500, 900] {
            let fake = Fake::new();
            let (client_a, _wa) = fake.client();
            let (client_b, _wb) = fake.client();
            let a_started = tokio::time::Instant::now();
            // Renews at a_started + k s.
            let a = leader::LeaderElection::start(
                client_a,
                leader::LeaseConfig::new("sluice", "sluice-operator", "a"),
                None,
            );
            wait_for(&mut a.leading(), true).await;
            tokio::time::sleep_until(a_started + Duration::from_millis(standby_phase)).await;
            let b = leader::LeaderElection::start(
                client_b,
                leader::LeaseConfig::new("sluice", "sluice-operator", "b"),
                None,
            );
            let mut b_leads = b.leading();
            tokio::time::sleep_until(a_started + Duration::from_millis(5_000 + death)).await;
            assert!(!*b_leads.borrow(), "the standby took a live leader's lease");
            drop(a);
            let died = tokio::time::Instant::now();
            wait_for(&mut b_leads, true).await;
            let t = died.elapsed();
            // Never before the lease ran out after the leader's last renewal (at most one retry
            // before it died), never later than one retry after that.
            assert!(t + retry > duration, "{t:?}");
            assert!(t <= duration + retry + Duration::from_secs(1), "{t:?}");
            took.push(t);
        }
    }
    let (min, max) = (took.iter().min().unwrap(), took.iter().max().unwrap());
    println!("CRASH TAKEOVER with {timings:?}: {min:?} to {max:?} ({took:?})");
}

fn run_options() -> sluice_operator::runner::RunOptions {
    sluice_operator::runner::RunOptions {
        source: sluice_operator::runner::Source::Kubernetes,
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        tls_cert: None,
        tls_key: None,
        heartbeat_grace: Duration::from_secs(1),
        tokens_file: None,
        insecure_allow_any_node: true,
        token_audience: "sluice".into(),
        shim_service_accounts: vec![],
        poll: Duration::from_millis(200),
        lease_namespace: "sluice".into(),
        lease_name: "sluice-operator".into(),
        leader_service: None,
        pod_ip: None,
        limits: Default::default(),
        lease_timings: Default::default(),
        lease_file: None,
        service_cidrs: vec![],
        pinned_flow_timeout: std::time::Duration::from_secs(600),
    }
}

/// `sluice-operator run` against the fake, stopped when the returned sender sends (or drops):
/// what SIGTERM does to the real process.
fn run_operator(
    fake: &Fake,
    identity: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (client, _writes) = fake.client();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let api = sluice_operator::runner::ApiAccess {
        client,
        identity: identity.into(),
    };
    let task = tokio::spawn(sluice_operator::runner::run_until(
        run_options(),
        Some(api),
        async {
            let _ = stopped.await;
        },
    ));
    (stop, task)
}

async fn wait_for_holder(fake: &Fake, want: Option<&str>) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while holder(fake).as_deref() != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the lease never went to {want:?}: {:?}", holder(fake)));
}

#[tokio::test(start_paused = true)]
async fn a_stopped_operator_releases_the_lease_and_the_standby_takes_over_within_2_s() {
    let fake = Fake::new();
    let (stop_a, a) = run_operator(&fake, "a");
    wait_for_holder(&fake, Some("a")).await;
    let (stop_b, b) = run_operator(&fake, "b");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(holder(&fake).as_deref(), Some("a"), "the standby took over");
    assert!(!a.is_finished() && !b.is_finished());

    // SIGTERM to the leader: it stops, releases the Lease, and returns Ok.
    let signalled = tokio::time::Instant::now();
    stop_a.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), a)
        .await
        .expect("the stopped leader exits")
        .unwrap()
        .expect("a graceful stop is a success");
    let exited = signalled.elapsed();
    wait_for_holder(&fake, Some("b")).await;
    let took = signalled.elapsed();
    println!("GRACEFUL HANDOVER: leader exited after {exited:?}, standby leads after {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // A stopped standby just goes, and leaves the leader's Lease alone.
    let (stop_c, c) = run_operator(&fake, "c");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop_c.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), c)
        .await
        .expect("a stopped standby exits")
        .unwrap()
        .unwrap();
    assert_eq!(holder(&fake).as_deref(), Some("b"));

    // The last one releases the Lease too: whoever comes next need not wait for it.
    stop_b.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(holder(&fake), None);
}

fn service_cidr(api_version: &str, name: &str, cidrs: &[&str]) -> Value {
    json!({
        "apiVersion": api_version, "kind": "ServiceCIDR",
        "metadata": {"name": name, "finalizers": ["networking.k8s.io/service-cidr-finalizer"],
                     "managedFields": [{"manager": "kube-apiserver"}]},
        "spec": {"cidrs": cidrs},
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    })
}

fn nets(cidrs: &[&str]) -> Vec<ipnet::IpNet> {
    cidrs.iter().map(|c| c.parse().unwrap()).collect()
}

/// The Service CIDR sets sent up to `Synced`.
async fn initial_service_cidrs(rx: &mut mpsc::Receiver<SourceEvent>) -> Vec<Vec<ipnet::IpNet>> {
    let mut sent = Vec::new();
    loop {
        match next(rx).await {
            SourceEvent::Synced => return sent,
            SourceEvent::ServiceCidrs(cidrs) => sent.push(cidrs),
            SourceEvent::Change(_) => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn service_cidrs_are_watched_and_sent_whole_on_every_change() {
    const V1: &str = "networking.k8s.io/v1";
    let fake = Fake::new();
    fake.seed(
        SERVICE_CIDRS,
        service_cidr(V1, "kubernetes", &["10.96.0.0/12", "fd00:10:96::/112"]),
    );
    fake.seed(NODES, node("n1", "172.18.0.2"));
    let mut registry = metrics::registry();
    let mut run = start_with(&fake, true, ControllerMetrics::register(&mut registry));
    assert_eq!(
        initial_service_cidrs(&mut run.sources).await,
        [nets(&["10.96.0.0/12", "fd00:10:96::/112"])],
        "the listed set, once, before Synced"
    );

    fake.event(
        SERVICE_CIDRS,
        "ADDED",
        service_cidr(V1, "extra", &["10.100.0.0/16"]),
    );
    assert_eq!(
        next(&mut run.sources).await,
        SourceEvent::ServiceCidrs(nets(&["10.96.0.0/12", "10.100.0.0/16", "fd00:10:96::/112"]))
    );

    // A status change sends nothing; the next change of the CIDRs does (so the first was not
    // merely late).
    let mut not_ready = service_cidr(V1, "extra", &["10.100.0.0/16"]);
    not_ready["status"]["conditions"][0]["status"] = json!("False");
    fake.event(SERVICE_CIDRS, "MODIFIED", not_ready);
    fake.event(
        SERVICE_CIDRS,
        "MODIFIED",
        service_cidr(V1, "extra", &["10.100.0.0/16", "10.101.0.0/16"]),
    );
    assert_eq!(
        next(&mut run.sources).await,
        SourceEvent::ServiceCidrs(nets(&[
            "10.96.0.0/12",
            "10.100.0.0/16",
            "10.101.0.0/16",
            "fd00:10:96::/112"
        ]))
    );

    fake.event(SERVICE_CIDRS, "DELETED", service_cidr(V1, "extra", &[]));
    assert_eq!(
        next(&mut run.sources).await,
        SourceEvent::ServiceCidrs(nets(&["10.96.0.0/12", "fd00:10:96::/112"]))
    );

    // Replaced while the watch was down: the re-list sends the new set once.
    fake.forget(SERVICE_CIDRS, "kubernetes");
    fake.seed(SERVICE_CIDRS, service_cidr(V1, "other", &["10.200.0.0/16"]));
    fake.expire_watch(SERVICE_CIDRS);
    assert_eq!(
        next(&mut run.sources).await,
        SourceEvent::ServiceCidrs(nets(&["10.200.0.0/16"]))
    );
    fake.event(NODES, "ADDED", node("n2", "172.18.0.3"));
    let Change::UpsertNode(n2) = next_change(&mut run.sources).await else {
        panic!("expected a node")
    };
    assert_eq!(n2.name, "n2");

    assert!(
        fake.gets()
            .iter()
            .all(|(u, _)| !u.starts_with(SERVICE_CIDRS_BETA)),
        "v1 is served: v1beta1 is never asked"
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let line = "sluice_controller_changes_total{kind=\"ServiceCIDR\"} 5";
    assert!(text.contains(line), "{line} in\n{text}");
    drop(run.updates);
    drop(run.notices);
}

#[tokio::test(start_paused = true)]
async fn service_cidrs_are_watched_in_v1beta1_where_v1_is_not_served() {
    const BETA: &str = "networking.k8s.io/v1beta1";
    let fake = Fake::new();
    fake.refuse(SERVICE_CIDRS, 404);
    fake.seed(
        SERVICE_CIDRS_BETA,
        service_cidr(BETA, "kubernetes", &["10.96.0.0/12"]),
    );
    let mut run = start(&fake, true);
    assert_eq!(
        initial_service_cidrs(&mut run.sources).await,
        [nets(&["10.96.0.0/12"])]
    );
    fake.event(
        SERVICE_CIDRS_BETA,
        "ADDED",
        service_cidr(BETA, "extra", &["10.100.0.0/16"]),
    );
    assert_eq!(
        next(&mut run.sources).await,
        SourceEvent::ServiceCidrs(nets(&["10.96.0.0/12", "10.100.0.0/16"]))
    );
    drop(run.updates);
    drop(run.notices);
}

/// The Kubernetes layer feeding an engine, as `sluice-operator run` wires them, with
/// `--service-cidr` set to `flag`, and the shims of `nodes` connected: the hub holds the view
/// each gets.
fn start_planning(fake: &Fake, flag: &[&str], nodes: &[&str]) -> Arc<Hub> {
    let (client, _writes) = fake.client();
    let (sources_tx, sources) = mpsc::channel(16);
    let (updates, updates_rx) = mpsc::channel(16);
    let (notices, notices_rx) = mpsc::channel(16);
    let (_, leading) = watch::channel(true);
    tokio::spawn(controller::run(
        client,
        controller::Config::new(leading, None),
        sources_tx,
        updates_rx,
        notices_rx,
    ));
    let config = EngineConfig {
        service_cidrs: nets(flag),
        ..EngineConfig::with_grace(Duration::from_secs(1))
    };
    let (hub, shim_events) = Hub::new(config.heartbeat_interval);
    let planner = Engine::new(config, hub.clone(), EngineMetrics::default());
    tokio::spawn(engine::run(planner, sources, shim_events, updates, notices));
    for (session, node) in nodes.iter().enumerate() {
        hub.report(ShimEvent::Connected {
            node: (*node).into(),
            session: session as u64 + 1,
            version: "test".into(),
            interfaces: vec![],
            held: vec![],
            pods: vec![],
            pinned: vec![],
        });
    }
    hub
}

fn in_cluster_set(view: &Option<Arc<NodeView>>) -> Option<Vec<String>> {
    let view = view.as_ref()?;
    Some(view.cluster_cidrs.iter().map(ToString::to_string).collect())
}

async fn in_cluster_set_becomes(hub: &Hub, node: &str, want: &[&str]) {
    let mut views = hub.subscribe(node);
    let became = tokio::time::timeout(
        Duration::from_secs(120),
        views.wait_for(|v| in_cluster_set(v).is_some_and(|set| set == want)),
    )
    .await
    .is_ok();
    assert!(
        became,
        "{node}'s in-cluster set is {:?}, not {want:?}",
        in_cluster_set(&views.borrow())
    );
}

#[tokio::test(start_paused = true)]
async fn every_node_gets_the_watched_service_cidrs_in_its_in_cluster_set() {
    const V1: &str = "networking.k8s.io/v1";
    let fake = Fake::new();
    fake.seed(SERVICE_CIDRS, service_cidr(V1, "kubernetes", &["10.96.0.0/12"]));
    let mut n1 = node("n1", "172.18.0.2");
    n1["spec"] = json!({"podCIDRs": ["10.244.1.0/24"]});
    fake.seed(NODES, n1);
    fake.seed(NODES, node("n2", "172.18.0.3"));
    let hub = start_planning(&fake, &["10.97.0.0/16"], &["n1", "n2"]);
    for node in ["n1", "n2"] {
        in_cluster_set_becomes(
            &hub,
            node,
            &[
                "10.96.0.0/12",
                "10.97.0.0/16",
                "10.244.1.0/24",
                "172.18.0.2/32",
                "172.18.0.3/32",
            ],
        )
        .await;
    }

    fake.event(
        SERVICE_CIDRS,
        "ADDED",
        service_cidr(V1, "extra", &["10.100.0.0/16"]),
    );
    fake.event(SERVICE_CIDRS, "DELETED", service_cidr(V1, "kubernetes", &[]));
    for node in ["n1", "n2"] {
        in_cluster_set_becomes(
            &hub,
            node,
            &[
                "10.97.0.0/16",
                "10.100.0.0/16",
                "10.244.1.0/24",
                "172.18.0.2/32",
                "172.18.0.3/32",
            ],
        )
        .await;
    }
}

/// Where the API serves no ServiceCIDR (`refused` 404: before Kubernetes 1.33) or the operator
/// may not list them (403: the ClusterRole of an older chart), the in-cluster set has the flag's
/// Service CIDRs, the other watchers run, and the API is not asked again.
#[tokio::test(start_paused = true)]
async fn without_service_cidr_objects_the_flag_makes_the_service_part_of_the_set() {
    for (refused, asked) in [
        (404, vec![SERVICE_CIDRS, SERVICE_CIDRS_BETA]),
        (403, vec![SERVICE_CIDRS]),
    ] {
        let fake = Fake::new();
        fake.refuse(SERVICE_CIDRS, refused);
        fake.refuse(SERVICE_CIDRS_BETA, refused);
        fake.seed(NODES, node("n1", "172.18.0.2"));
        let hub = start_planning(&fake, &["10.96.0.0/12"], &["n1"]);
        in_cluster_set_becomes(&hub, "n1", &["10.96.0.0/12", "172.18.0.2/32"]).await;

        fake.event(NODES, "ADDED", node("n2", "172.18.0.3"));
        in_cluster_set_becomes(&hub, "n1", &["10.96.0.0/12", "172.18.0.2/32", "172.18.0.3/32"]).await;

        tokio::time::sleep(Duration::from_secs(300)).await;
        let gets: Vec<String> = fake
            .gets()
            .into_iter()
            .map(|(u, _)| u)
            .filter(|u| u.contains("/servicecidrs"))
            .collect();
        assert_eq!(
            gets.iter()
                .map(|u| u.split('?').next().unwrap())
                .collect::<Vec<_>>(),
            asked,
            "{refused}: {gets:?}"
        );
    }
}
