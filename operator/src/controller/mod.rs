//! The Kubernetes source of truth: watches EgressGatewayPolicies, Nodes, Namespaces, Pods and
//! ServiceCIDRs and feeds the engine ([`SourceEvent`]s), writes what the engine reports back as
//! policy status ([`StatusUpdate`]) and Kubernetes Events ([`Notice`]).
//!
//! ServiceCIDRs are watched in the first version the API serves (`v1`, else `v1beta1`), found
//! once at start; a cluster that serves neither (before Kubernetes 1.33, or 1.31 and 1.32 without
//! the beta API) has only `--service-cidr`, and nothing is watched then (a watch of a resource
//! that is not there would only retry forever). Each change sends the whole current set of Service
//! CIDRs ([`SourceEvent::ServiceCidrs`]), part of the in-cluster set.
//!
//! Memory: the watchers keep no store; the planner holds the only copy of the cluster. Pods,
//! Nodes and ServiceCIDRs are deserialized into trimmed types ([`slim`]): containers, volumes,
//! images, managed fields and foreign annotations are never allocated. Namespaces are watched
//! metadata-only, finished pods are filtered out by the API server (field selector). Per object
//! the watchers remember only its key and a 64-bit fingerprint of what the planner reads, so that
//! updates that change nothing for the planner (status heartbeats, container restarts) never
//! reach the engine, and objects that vanished while a watch was down are removed after the
//! re-list.
//!
//! The watchers run on every replica, so that a standby that becomes leader has its plan ready;
//! status writes and Events only happen while this replica leads.

pub mod endpoint;
pub mod leader;
pub mod slim;
pub mod status;

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use ipnet::IpNet;
use k8s_openapi::{
    api::core::v1::{Namespace, ObjectReference},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    api::{ListParams, PartialObjectMeta, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        watcher::{self, Event},
    },
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use crate::{
    api::{EgressGatewayPolicy, EgressGatewayPolicyStatus},
    live::{Notice, SourceEvent, StatusUpdate},
    metrics::ControllerMetrics,
    model::{GatewaySlot, NamespaceInfo, NodeInfo, PodInfo, PolicyInput},
    objects,
    planner::Change,
};
use slim::{ServiceCidrVersion, SlimNode, SlimPod, SlimServiceCidr};

/// The field manager of status writes, and the reporting controller of Events.
pub const FIELD_MANAGER: &str = "sluice-operator";

/// How the Kubernetes layer runs. Build it with [`Config::new`] and adjust fields.
#[derive(Clone, Debug)]
pub struct Config {
    /// Field manager for server-side apply of status.
    pub field_manager: String,
    /// Who reports Events: controller `sluice-operator`, instance the pod name.
    pub reporter: Reporter,
    /// Whether this replica leads (from [`leader::LeaderElection::leading`], or a channel
    /// holding `true` for a single replica). Status and Events are written only while `true`;
    /// on becoming leader the latest status of every policy is written again.
    pub leading: watch::Receiver<bool>,
    pub metrics: ControllerMetrics,
    /// Watch options shared by the watchers (page size, timeout).
    pub watcher: watcher::Config,
    /// Delay before retrying a status write that failed.
    pub retry_after: Duration,
}

impl Config {
    /// `instance` names this replica in Events (its pod name).
    pub fn new(leading: watch::Receiver<bool>, instance: Option<String>) -> Self {
        Config {
            field_manager: FIELD_MANAGER.to_owned(),
            reporter: Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance,
            },
            leading,
            metrics: ControllerMetrics::default(),
            watcher: watcher::Config::default(),
            retry_after: Duration::from_secs(2),
        }
    }
}

/// Runs the Kubernetes layer until the engine drops its ends of the channels. Nothing else ends
/// it: failed watches are retried with backoff, failed status writes and Events are logged,
/// counted and (status) retried.
///
/// Called by `sluice-operator run --source kubernetes`:
/// ```ignore
/// let election = controller::leader::LeaderElection::start(client.clone(), lease, Some(metrics.clone()));
/// let mut config = controller::Config::new(election.leading(), std::env::var("POD_NAME").ok());
/// config.metrics = metrics; // from metrics::ControllerMetrics::register(&mut registry)
/// controller::run(client, config, sources_tx, updates_rx, notices_rx).await;
/// ```
/// `sources` receives every object as a [`Change`] (policies with `retained_gateways` seeded from
/// their `status.gateways`, i.e. the last leader's choice), and the Service CIDRs as one
/// [`SourceEvent::ServiceCidrs`], then [`SourceEvent::Synced`] once all initial lists are in
/// (a ServiceCIDR API that is not served counts as an empty list); later re-lists remove what
/// disappeared meanwhile.
pub async fn run(
    client: Client,
    config: Config,
    sources: mpsc::Sender<SourceEvent>,
    updates: mpsc::Receiver<StatusUpdate>,
    notices: mpsc::Receiver<Notice>,
) {
    let policies = PolicyCache::default();
    let watching = Watchers::new(sources, policies.clone(), config.metrics.clone())
        .run(streams(&client, &config.watcher));
    let writer = StatusWriter {
        api: Api::all(client.clone()),
        params: PatchParams::apply(&config.field_manager).force(),
        policies: policies.clone(),
        latest: HashMap::new(),
        written: HashMap::new(),
        retry: HashSet::new(),
        metrics: config.metrics.clone(),
    };
    let writing = writer.run(updates, config.leading.clone(), config.retry_after);
    let recorder = Recorder::new(client, config.reporter.clone());
    let publishing = publish_notices(recorder, notices, config.leading, policies, config.metrics);
    tokio::join!(watching, writing, publishing);
}

/// What the watchers know of a policy that the writers need.
#[derive(Clone, Debug, Default)]
struct KnownPolicy {
    uid: Option<String>,
    status: Option<EgressGatewayPolicyStatus>,
}

type PolicyCache = Arc<Mutex<HashMap<String, KnownPolicy>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Policy,
    Node,
    Namespace,
    Pod,
    ServiceCidr,
}

impl Kind {
    const COUNT: usize = 5;

    fn name(self) -> &'static str {
        match self {
            Kind::Policy => "EgressGatewayPolicy",
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }

    /// The planner change of an object's removal; `None` for ServiceCIDRs, which are not
    /// planner objects but a part of [`Watchers::service_cidrs`].
    fn removal(self, key: String) -> Option<Change> {
        match self {
            Kind::Policy => Some(Change::RemovePolicy(key)),
            Kind::Node => Some(Change::RemoveNode(key)),
            Kind::Namespace => Some(Change::RemoveNamespace(key)),
            Kind::Pod => Some(Change::RemovePod(key)),
            Kind::ServiceCidr => None,
        }
    }
}

/// One watched object of any kind. Each is moved once, from the stream to its conversion:
/// boxing would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Object {
    Policy(Box<EgressGatewayPolicy>),
    Node(SlimNode),
    Namespace(PartialObjectMeta<Namespace>),
    Pod(SlimPod),
    ServiceCidr(SlimServiceCidr),
}

/// What an object becomes: a planner change, or a ServiceCIDR's CIDRs (of the whole set the
/// engine is sent).
enum Update {
    Change(Box<Change>),
    ServiceCidr(Vec<IpNet>),
}

type Watched = (Kind, Result<Event<Object>, watcher::Error>);

fn map_event<K>(e: Event<K>, f: impl Fn(K) -> Object) -> Event<Object> {
    match e {
        Event::Apply(k) => Event::Apply(f(k)),
        Event::Delete(k) => Event::Delete(f(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(f(k)),
        Event::InitDone => Event::InitDone,
    }
}

/// The watch streams, merged.
fn streams(client: &Client, config: &watcher::Config) -> BoxStream<'static, Watched> {
    fn one<K>(
        api: Api<K>,
        kind: Kind,
        config: watcher::Config,
        f: fn(K) -> Object,
    ) -> BoxStream<'static, Watched>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        K::DynamicType: Default,
    {
        watcher::watcher(api, config)
            .default_backoff()
            .map_ok(move |e| map_event(e, f))
            .map(move |r| (kind, r))
            .boxed()
    }
    // Finished pods are never sources: the API server leaves them out (and reports a pod that
    // finishes as deleted).
    let pods = config
        .clone()
        .fields("status.phase!=Succeeded,status.phase!=Failed");
    futures::stream::select_all([
        one(Api::all(client.clone()), Kind::Policy, config.clone(), |p| {
            Object::Policy(Box::new(p))
        }),
        one(Api::all(client.clone()), Kind::Node, config.clone(), Object::Node),
        one(
            Api::all(client.clone()),
            Kind::Namespace,
            config.clone(),
            Object::Namespace,
        ),
        one(Api::all(client.clone()), Kind::Pod, pods, Object::Pod),
        service_cidrs(client.clone(), config.clone()),
    ])
    .boxed()
}

/// The ServiceCIDR watch stream in the version the API serves; where it serves none, an empty
/// initial list and nothing more.
fn service_cidrs(client: Client, config: watcher::Config) -> BoxStream<'static, Watched> {
    futures::stream::once(async move {
        match served_service_cidr_version(&client).await {
            Some(version) => watcher::watcher(Api::<SlimServiceCidr>::all_with(client, &version), config)
                .default_backoff()
                .map_ok(|e| map_event(e, Object::ServiceCidr))
                .map(|r| (Kind::ServiceCidr, r))
                .boxed(),
            None => futures::stream::iter([Event::Init, Event::InitDone])
                .map(|e| (Kind::ServiceCidr, Ok(e)))
                .boxed(),
        }
    })
    .flatten()
    .boxed()
}

/// The first version of ServiceCIDR the API serves, asked once (a list of at most one object):
/// `None` where it serves none, or where the operator may not list them (a ClusterRole of an
/// older chart). Other errors (the API server unreachable) are retried with the watchers'
/// backoff.
async fn served_service_cidr_version(client: &Client) -> Option<ServiceCidrVersion> {
    let mut backoff = watcher::DefaultBackoff::default();
    let probe = ListParams::default().limit(1);
    for version in ServiceCidrVersion::PREFERRED {
        let api = Api::<SlimServiceCidr>::all_with(client.clone(), &version);
        loop {
            match api.list(&probe).await {
                Ok(_) => {
                    tracing::info!(version = version.as_str(), "watching ServiceCIDRs");
                    return Some(version);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => break,
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    tracing::warn!(
                        error = %s.message,
                        "may not list ServiceCIDRs (the ClusterRole lacks them): the Service CIDRs are only --service-cidr's"
                    );
                    return None;
                }
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(error = %e, ?delay, "could not list ServiceCIDRs; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    tracing::info!(
        "the API serves no ServiceCIDRs (Kubernetes before 1.33): the Service CIDRs are only --service-cidr's"
    );
    None
}

/// Per kind: every object's key and fingerprint, and the keys seen during a re-list.
#[derive(Default)]
struct Tracker {
    known: HashMap<String, u64>,
    relisting: Option<HashSet<String>>,
    synced: bool,
}

struct Watchers {
    sources: mpsc::Sender<SourceEvent>,
    trackers: [Tracker; Kind::COUNT],
    policies: PolicyCache,
    /// Every ServiceCIDR's CIDRs, by name.
    service_cidrs: HashMap<String, Vec<IpNet>>,
    /// The set of Service CIDRs last sent to the engine.
    sent_service_cidrs: Option<Vec<IpNet>>,
    metrics: ControllerMetrics,
}

/// The engine went away.
struct Closed;

impl Watchers {
    fn new(sources: mpsc::Sender<SourceEvent>, policies: PolicyCache, metrics: ControllerMetrics) -> Self {
        Watchers {
            sources,
            trackers: Default::default(),
            policies,
            service_cidrs: HashMap::new(),
            sent_service_cidrs: None,
            metrics,
        }
    }

    async fn run(mut self, mut events: BoxStream<'static, Watched>) {
        while let Some((kind, event)) = events.next().await {
            let started = Instant::now();
            let result = match event {
                Ok(event) => self.handle(kind, event).await,
                Err(e) => {
                    tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying");
                    self.metrics
                        .watch_errors
                        .get_or_create(&[("kind", kind.name())])
                        .inc();
                    Ok(())
                }
            };
            if result.is_err() {
                return;
            }
            self.metrics
                .reconcile_seconds
                .observe(started.elapsed().as_secs_f64());
        }
    }

    fn count(&self, kind: Kind, event: &'static str) {
        self.metrics
            .watch_events
            .get_or_create(&[("kind", kind.name()), ("event", event)])
            .inc();
    }

    async fn send(&self, kind: Kind, change: Box<Change>) -> Result<(), Closed> {
        self.metrics.changes.get_or_create(&[("kind", kind.name())]).inc();
        self.sources
            .send(SourceEvent::Change(change))
            .await
            .map_err(|_| Closed)
    }

    /// Sends the engine the whole set of Service CIDRs when it changed, unless a re-list is under
    /// way (its end sends it once).
    async fn send_service_cidrs(&mut self) -> Result<(), Closed> {
        if self.trackers[Kind::ServiceCidr as usize].relisting.is_some() {
            return Ok(());
        }
        let mut cidrs: Vec<IpNet> = self.service_cidrs.values().flatten().copied().collect();
        cidrs.sort_unstable();
        cidrs.dedup();
        if self.sent_service_cidrs.as_ref() == Some(&cidrs) {
            return Ok(());
        }
        self.metrics
            .changes
            .get_or_create(&[("kind", Kind::ServiceCidr.name())])
            .inc();
        self.sent_service_cidrs = Some(cidrs.clone());
        self.sources
            .send(SourceEvent::ServiceCidrs(cidrs))
            .await
            .map_err(|_| Closed)
    }

    /// Forgets an object that is gone: a planner removal, or (for a ServiceCIDR) its part of the
    /// set, sent by the caller.
    async fn remove(&mut self, kind: Kind, key: String) -> Result<(), Closed> {
        if kind == Kind::Policy {
            self.policies.lock().expect("policy cache").remove(&key);
        }
        match kind.removal(key.clone()) {
            Some(change) => self.send(kind, Box::new(change)).await,
            None => {
                self.service_cidrs.remove(&key);
                Ok(())
            }
        }
    }

    async fn handle(&mut self, kind: Kind, event: Event<Object>) -> Result<(), Closed> {
        match event {
            Event::Init => {
                self.count(kind, "relist");
                self.trackers[kind as usize].relisting = Some(HashSet::new());
            }
            Event::InitApply(object) | Event::Apply(object) => {
                self.count(kind, "apply");
                let (key, fingerprint, update) = self.convert(object);
                let tracker = &mut self.trackers[kind as usize];
                if let Some(seen) = &mut tracker.relisting {
                    seen.insert(key.clone());
                }
                if tracker.known.insert(key.clone(), fingerprint) != Some(fingerprint) {
                    match update {
                        Update::Change(change) => self.send(kind, change).await?,
                        Update::ServiceCidr(cidrs) => {
                            self.service_cidrs.insert(key, cidrs);
                            self.send_service_cidrs().await?;
                        }
                    }
                }
            }
            Event::Delete(object) => {
                self.count(kind, "delete");
                let key = self.key(&object);
                if self.trackers[kind as usize].known.remove(&key).is_some() {
                    self.remove(kind, key).await?;
                    if kind == Kind::ServiceCidr {
                        self.send_service_cidrs().await?;
                    }
                }
            }
            Event::InitDone => {
                let tracker = &mut self.trackers[kind as usize];
                let seen = tracker.relisting.take().unwrap_or_default();
                let gone: Vec<String> = tracker
                    .known
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.trackers[kind as usize].known.remove(&key);
                    self.remove(kind, key).await?;
                }
                if kind == Kind::ServiceCidr {
                    self.send_service_cidrs().await?;
                }
                let tracker = &mut self.trackers[kind as usize];
                if !tracker.synced {
                    tracker.synced = true;
                    tracing::info!(
                        kind = kind.name(),
                        objects = tracker.known.len(),
                        "initial list delivered"
                    );
                    if self.trackers.iter().all(|t| t.synced) {
                        self.sources.send(SourceEvent::Synced).await.map_err(|_| Closed)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn key(&self, object: &Object) -> String {
        match object {
            Object::Policy(p) => p.metadata.name.clone().unwrap_or_default(),
            Object::Node(n) => n.0.metadata.name.clone().unwrap_or_default(),
            Object::Namespace(n) => n.metadata.name.clone().unwrap_or_default(),
            Object::Pod(p) => objects::pod_info(&p.0).uid,
            Object::ServiceCidr(s) => s.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// The object's key, the fingerprint of what the planner reads of it, and what it becomes.
    fn convert(&self, object: Object) -> (String, u64, Update) {
        match object {
            Object::Policy(p) => {
                self.policies.lock().expect("policy cache").insert(
                    p.metadata.name.clone().unwrap_or_default(),
                    KnownPolicy {
                        uid: p.metadata.uid.clone(),
                        status: p.status.clone(),
                    },
                );
                let input = policy_input(&p);
                (
                    input.name.clone(),
                    fingerprint_policy(&input),
                    Update::Change(Box::new(Change::UpsertPolicy(input))),
                )
            }
            Object::Node(SlimNode(mut node)) => {
                let info = objects::node_info(&node).unwrap_or_else(|e| {
                    tracing::warn!(node = ?node.metadata.name, error = %e, "ignoring a bad annotation");
                    if let Some(a) = node.metadata.annotations.as_mut() {
                        a.remove(objects::INTERFACES_ANNOTATION);
                    }
                    objects::node_info(&node).expect("a node without the annotation converts")
                });
                (
                    info.name.clone(),
                    fingerprint_node(&info),
                    Update::Change(Box::new(Change::UpsertNode(info))),
                )
            }
            Object::Namespace(ns) => {
                let info = NamespaceInfo {
                    name: ns.metadata.name.clone().unwrap_or_default(),
                    labels: ns.metadata.labels.clone().unwrap_or_default(),
                };
                let fp = fingerprint(&(&info.name, &info.labels));
                (
                    info.name.clone(),
                    fp,
                    Update::Change(Box::new(Change::UpsertNamespace(info))),
                )
            }
            Object::Pod(SlimPod(pod)) => {
                let info = objects::pod_info(&pod);
                (
                    info.uid.clone(),
                    fingerprint_pod(&info),
                    Update::Change(Box::new(Change::UpsertPod(info))),
                )
            }
            Object::ServiceCidr(s) => {
                // The API server validates them: one that does not parse is skipped.
                let cidrs: Vec<IpNet> = s
                    .cidrs
                    .iter()
                    .filter_map(|c| c.parse::<IpNet>().ok().map(|c| c.trunc()))
                    .collect();
                (
                    s.metadata.name.unwrap_or_default(),
                    fingerprint(&cidrs),
                    Update::ServiceCidr(cidrs),
                )
            }
        }
    }
}

/// The planner's input for a policy: its spec, and the gateways its status lists (the last
/// leader's choice), so that a new leader keeps them while they stay usable.
pub fn policy_input(policy: &EgressGatewayPolicy) -> PolicyInput {
    let mut input = objects::policy_input(policy);
    input.retained_gateways = policy
        .status
        .iter()
        .flat_map(|s| &s.gateways)
        .map(|g| GatewaySlot {
            entry: g.entry as usize,
            slot: g.slot as usize,
            node: g.node.clone(),
        })
        .collect();
    input
}

fn fingerprint(value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

fn fingerprint_pod(p: &PodInfo) -> u64 {
    fingerprint(&(
        (&p.uid, &p.namespace, &p.name, &p.labels, &p.node_name),
        (&p.ips, p.host_network, p.phase as u8),
    ))
}

fn fingerprint_node(n: &NodeInfo) -> u64 {
    let interfaces = n.interfaces.as_ref().map(|list| {
        list.iter()
            .map(|i| (&i.name, &i.addresses, i.default_route))
            .collect::<Vec<_>>()
    });
    fingerprint(&(
        &n.name,
        &n.labels,
        &n.addresses,
        n.ready,
        n.eligible,
        interfaces,
        &n.pod_cidrs,
    ))
}

fn fingerprint_policy(p: &PolicyInput) -> u64 {
    let spec = serde_json::to_string(&p.spec).unwrap_or_default();
    fingerprint(&(&p.name, p.generation, p.created, spec, &p.retained_gateways))
}

/// Writes policy status with server-side apply while this replica leads.
struct StatusWriter {
    api: Api<EgressGatewayPolicy>,
    params: PatchParams,
    policies: PolicyCache,
    /// The latest update of every policy, written again on becoming leader.
    latest: HashMap<String, StatusUpdate>,
    /// What this replica last wrote, by policy name, with the policy's UID.
    written: HashMap<String, (Option<String>, EgressGatewayPolicyStatus)>,
    /// Policies whose last write failed.
    retry: HashSet<String>,
    metrics: ControllerMetrics,
}

enum Written {
    Yes,
    Unchanged,
    Gone,
    Failed,
}

impl StatusWriter {
    async fn run(
        mut self,
        mut updates: mpsc::Receiver<StatusUpdate>,
        mut leading: watch::Receiver<bool>,
        retry_after: Duration,
    ) {
        let mut election_open = true;
        let mut retry = tokio::time::interval_at(Instant::now() + retry_after, retry_after);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                update = updates.recv() => {
                    let Some(update) = update else { return };
                    // Coalesce: of the updates already queued, only each policy's latest is
                    // written.
                    let mut names = vec![update.outcome.name.clone()];
                    self.latest.insert(update.outcome.name.clone(), update);
                    while let Ok(update) = updates.try_recv() {
                        names.push(update.outcome.name.clone());
                        self.latest.insert(update.outcome.name.clone(), update);
                    }
                    names.sort_unstable();
                    names.dedup();
                    if *leading.borrow() {
                        for name in names {
                            self.write(&name).await;
                        }
                    }
                }
                changed = leading.changed(), if election_open => {
                    if changed.is_err() {
                        election_open = false;
                    } else if *leading.borrow_and_update() {
                        // Another replica may have written meanwhile: start from what the
                        // API server has.
                        self.written.clear();
                        let names: Vec<String> = self.latest.keys().cloned().collect();
                        for name in names {
                            self.write(&name).await;
                        }
                    }
                }
                _ = retry.tick(), if !self.retry.is_empty() => {
                    if *leading.borrow() {
                        let names: Vec<String> = self.retry.drain().collect();
                        for name in names {
                            self.write(&name).await;
                        }
                    }
                }
            }
        }
    }

    async fn write(&mut self, name: &str) -> Written {
        let result = self.try_write(name).await;
        let label = match result {
            Written::Yes => "written",
            Written::Unchanged => "unchanged",
            Written::Gone => "gone",
            Written::Failed => "failed",
        };
        self.metrics
            .status_writes
            .get_or_create(&[("result", label)])
            .inc();
        result
    }

    async fn try_write(&mut self, name: &str) -> Written {
        let Some(update) = self.latest.get(name) else {
            return Written::Unchanged;
        };
        let Some(known) = self.policies.lock().expect("policy cache").get(name).cloned() else {
            // Deleted (or not seen yet: the watch will bring it, and the engine a new update).
            self.latest.remove(name);
            self.written.remove(name);
            return Written::Gone;
        };
        let ours = self
            .written
            .get(name)
            .filter(|(uid, _)| *uid == known.uid)
            .map(|(_, s)| s);
        let previous = ours.or(known.status.as_ref());
        let desired = status::desired(update, previous, Time(Timestamp::now()));
        if previous.is_some_and(|p| status::same_ignoring_time(p, &desired)) {
            return Written::Unchanged;
        }
        let patch = serde_json::json!({
            "apiVersion": EgressGatewayPolicy::api_version(&()),
            "kind": EgressGatewayPolicy::kind(&()),
            "metadata": {"name": name},
            "status": desired,
        });
        let started = Instant::now();
        let result = self
            .api
            .patch_status(name, &self.params, &Patch::Apply(&patch))
            .await;
        self.metrics
            .status_write_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => {
                self.retry.remove(name);
                self.written.insert(name.to_owned(), (known.uid, desired));
                Written::Yes
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.latest.remove(name);
                self.written.remove(name);
                Written::Gone
            }
            Err(e) => {
                tracing::warn!(policy = name, error = %e, "status write failed; will retry");
                self.retry.insert(name.to_owned());
                Written::Failed
            }
        }
    }
}

/// The Event a notice becomes: (policy, type, reason, action, note).
pub fn notice_event(notice: &Notice) -> (&str, EventType, &'static str, &'static str, String) {
    let list = |nodes: &[String]| {
        if nodes.is_empty() {
            "none".to_owned()
        } else {
            nodes.join(", ")
        }
    };
    match notice {
        Notice::GatewaysChanged { policy, from, to } => (
            policy,
            EventType::Normal,
            "GatewaysChanged",
            "SelectGateways",
            format!("gateway nodes: {} -> {}", list(from), list(to)),
        ),
        Notice::Failover {
            policy,
            lost,
            replacement,
            took,
        } => (
            policy,
            EventType::Warning,
            "GatewayFailover",
            "Failover",
            match replacement {
                Some(r) => format!("gateway node {lost} stopped serving; {r} took over after {took:.3?}"),
                None => format!("gateway node {lost} stopped serving; no other node can take over"),
            },
        ),
        Notice::EgressIpMoved {
            policy,
            ip,
            from,
            to,
            took,
        } => (
            policy,
            EventType::Normal,
            "EgressIPMoved",
            "MoveEgressIP",
            format!(
                "managed egress IP {ip} moved from {} to {to}; held there {took:.3?} after the move was decided",
                from.as_deref().unwrap_or("no node")
            ),
        ),
        Notice::AddressConflict { policy, ip, detail } => (
            policy,
            EventType::Warning,
            "EgressIPConflict",
            "ClaimEgressIP",
            format!("managed egress IP {ip} not claimed: {detail}"),
        ),
        Notice::DrainStarted {
            policy,
            node,
            until,
            pods,
        } => (
            policy,
            EventType::Normal,
            "GatewayDraining",
            "Drain",
            format!(
                "gateway node {node} takes no new pods; it keeps the open connections of {pods} pod(s) until they end or {}",
                status::rfc3339(*until)
            ),
        ),
        Notice::DrainEnded { policy, node } => (
            policy,
            EventType::Normal,
            "GatewayDrained",
            "Drain",
            format!("gateway node {node} let go of the policy's last open connections"),
        ),
        Notice::Rejected {
            policy,
            reason,
            message,
        } => (
            policy,
            EventType::Warning,
            "PolicyRejected",
            "Validate",
            format!("{reason}: {message}"),
        ),
    }
}

/// Publishes every notice as an Event on its policy while this replica leads.
async fn publish_notices(
    recorder: Recorder,
    mut notices: mpsc::Receiver<Notice>,
    leading: watch::Receiver<bool>,
    policies: PolicyCache,
    metrics: ControllerMetrics,
) {
    while let Some(notice) = notices.recv().await {
        let (policy, type_, reason, action, mut note) = notice_event(&notice);
        tracing::info!(policy, reason, note, "notice");
        if !*leading.borrow() {
            continue;
        }
        if note.len() > 1024 {
            let mut end = 1021;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let reference = ObjectReference {
            api_version: Some(EgressGatewayPolicy::api_version(&()).into_owned()),
            kind: Some(EgressGatewayPolicy::kind(&()).into_owned()),
            name: Some(policy.to_owned()),
            uid: policies
                .lock()
                .expect("policy cache")
                .get(policy)
                .and_then(|p| p.uid.clone()),
            ..ObjectReference::default()
        };
        let event = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        let result = match recorder.publish(&event, &reference).await {
            Ok(()) => "published",
            Err(e) => {
                tracing::warn!(policy, reason, error = %e, "could not publish an Event");
                "failed"
            }
        };
        metrics
            .events
            .get_or_create(&[("reason", reason), ("result", result)])
            .inc();
    }
}
