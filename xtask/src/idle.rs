//! `cargo xtask bench-idle`: what the operator costs once it has converged (issue 11, "quiet at
//! rest"). At rest nothing should be recomputed, re-sent or re-logged, so its CPU should be the
//! heartbeats' and nothing that grows with entries.
//!
//! For each case the manifests are generated into a directory, `sluice-operator run --source
//! dir:…` reads them, and one simulated shim per node keeps a session: a real gRPC client in this
//! process that acknowledges every plan and delta at once, sends heartbeats, and has no message
//! size limit (so that a plan of any size arrives, whatever the shims' limit is). Once every shim
//! holds a plan and nothing but heartbeats has arrived for [`QUIET`], the operator's CPU time
//! (utime + stime of `/proc/<pid>/stat`) and RSS are sampled over a window, and the plans and
//! deltas it sent and the log lines it wrote meanwhile are counted: at rest both must be 0.
//! Then the manifests change by one more destination CIDR in the first policy
//! ([`with_one_more_cidr`]), and what the shims receive until it stops is measured: when the
//! last of them acked, how many plans and deltas, entries and bytes.
//!
//! Cases:
//! - `a` the testbed's three nodes, 60 policies of 1,000 destination CIDRs each selecting its
//!   two pods p1 and p2, gateway n3 (which holds 2 × 60,000 entries);
//! - `b` 1 policy of 1,000 CIDRs selecting 1,000 pods on 50 nodes, one gateway (1,000,000 entries);
//! - `c` the synthetic cluster of the planner benchmark: 500 nodes, 20,000 pods, 300 policies.
//!
//! With `--shim-pairs`, the real shims at rest instead ([`run_shim_scale`], root): in a fresh
//! network-namespace testbed per size, n1's shim steers that many (pod, CIDR) pairs, n3's serves
//! them as the gateway and n2's holds none, fed by the operator over the node channel or by a
//! plan file (the only way to feed an older shim binary, `--compare-shim`).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::{Value, json};
use sluice_operator::{
    api::{EgressGateway, EgressGatewayPolicy, EgressGatewayPolicySpec, EgressRule},
    manifests::Manifests,
    model::{NamespaceInfo, NodeInfo, PodInfo, PolicyInput},
    synthetic::{self, Size},
};
use sluice_proto::v2::{self, node_channel_client::NodeChannelClient, operator_message, shim_message};

/// Nothing but heartbeats for this long, and the operator under [`BUSY`] meanwhile: converged.
const QUIET: Duration = Duration::from_secs(3);
/// An operator using more of a core than this (on average over [`QUIET`]) is still working, even
/// if it sends nothing (a long computation).
const BUSY: f64 = 0.25;
/// Stop waiting for convergence after this long (and measure anyway: a system that never
/// settles is measured as it is).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
/// `/proc/<pid>/stat` counts CPU time in USER_HZ, 100 per second on Linux.
const USER_HZ: f64 = 100.0;
/// The destination CIDR the change adds to the first policy of every case: in 198.18.0.0/15
/// (benchmarking), clear of every case's destinations (11.0.0.0/8 and 203.0.113.0/24 in a and
/// b, 198.18.0.0/16 and 203.0.0.0/16 in c), the testbed's addresses and the cluster CIDRs.
const CHANGE_CIDR: &str = "198.19.255.254/32";
/// After the change, no plan or delta chunk for this long (and at least one shim updated):
/// every shim that was going to be told has been.
const CHANGE_QUIET: Duration = Duration::from_secs(2);
/// Stop waiting for the shims' updates after the change after this long.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Case {
    A,
    B,
    C,
}

impl Case {
    const ALL: [Case; 3] = [Case::A, Case::B, Case::C];

    fn key(self) -> &'static str {
        match self {
            Case::A => "a",
            Case::B => "b",
            Case::C => "c",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Case::A => "60 policies × 1,000 CIDRs, 2 pods, 3 nodes",
            Case::B => "1 policy × 1,000 CIDRs, 1,000 pods, 50 nodes",
            Case::C => "synthetic: 500 nodes, 20,000 pods, 300 policies",
        }
    }

    fn manifests(self) -> Manifests {
        match self {
            Case::A => allowlists(60, 1000),
            Case::B => one_allowlist_many_pods(1000, 50, 1000),
            Case::C => synthetic::cluster(Size {
                nodes: 500,
                pods: 20_000,
                policies: 300,
            }),
        }
    }
}

/// The cases named by the letters of `cases`, in order.
pub fn choose(cases: &str) -> Result<Vec<Case>> {
    if let Some(unknown) = cases
        .chars()
        .find(|c| !Case::ALL.iter().any(|k| k.key().starts_with(*c)))
    {
        bail!("unknown case {unknown:?} (known: abc)");
    }
    Ok(Case::ALL
        .into_iter()
        .filter(|k| cases.contains(k.key()))
        .collect())
}

/// The `k`th destination CIDR of an allowlist: distinct /24s in 11.0.0.0/8 and up (no policy
/// shares one, so every (pod, CIDR) pair is an entry of its own).
fn allowlist_cidr(k: usize) -> String {
    format!("{}.{}.{}.0/24", 11 + k / 65_536, k / 256 % 256, k % 256)
}

fn allowlist_spec(
    selector: (&str, &str),
    cidrs: std::ops::Range<usize>,
    gateway: (&str, &str),
    egress_ip: &str,
) -> EgressGatewayPolicySpec {
    let label = |(k, v): (&str, &str)| k8s_selector(BTreeMap::from([(k.to_owned(), v.to_owned())]));
    EgressGatewayPolicySpec {
        selectors: vec![EgressRule {
            pod_selector: Some(label(selector)),
            namespace_selector: None,
            node_selector: None,
        }],
        destination_cidrs: cidrs.map(allowlist_cidr).collect(),
        egress_gateway: Some(EgressGateway {
            node_selector: label(gateway),
            egress_ip: Some(egress_ip.to_owned()),
            max_gateway_nodes: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn k8s_selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        match_expressions: None,
    }
}

/// The network of the testbed's external host (`sluice_testbed::EXT_A`).
const EXTERNAL_NET: &str = "203.0.113.0/24";

/// Case a: the testbed's nodes and pods (`sluice_testbed::NODES`, `PODS`); p1 and p2 are
/// selected by each of `policies` policies of `cidrs` CIDRs, all through n3.
pub fn allowlists(policies: usize, cidrs: usize) -> Manifests {
    let nodes = sluice_testbed::NODES
        .iter()
        .enumerate()
        .map(|(i, (name, ip))| NodeInfo {
            name: (*name).to_owned(),
            labels: BTreeMap::from([("kubernetes.io/hostname".to_owned(), (*name).to_owned())]),
            addresses: vec![ip.parse().expect("testbed node IP")],
            ready: true,
            eligible: true,
            draining: false,
            interfaces: None,
            pod_cidrs: vec![format!("10.244.{}.0/24", i + 1).parse().expect("pod CIDR")],
        })
        .collect();
    let pods = sluice_testbed::PODS
        .iter()
        .map(|(name, node, ip)| PodInfo {
            uid: format!("uid-{name}"),
            namespace: "shop".into(),
            name: (*name).to_owned(),
            labels: BTreeMap::from([(
                "app".to_owned(),
                if *name == "p3" { "other" } else { "saas" }.to_owned(),
            )]),
            node_name: Some((*node).to_owned()),
            ips: vec![ip.parse().expect("testbed pod IP")],
            host_network: false,
            phase: sluice_operator::model::PodPhase::Running,
        })
        .collect();
    let mut policies: Vec<PolicyInput> = (0..policies)
        .map(|i| PolicyInput {
            name: format!("saas-{i:02}"),
            spec: allowlist_spec(
                ("app", "saas"),
                i * cidrs..(i + 1) * cidrs,
                ("kubernetes.io/hostname", "n3"),
                sluice_testbed::EGRESS_N3,
            ),
            ..Default::default()
        })
        .collect();
    // The testbed's external host is on the first list, so that the path can be checked there.
    if let Some(first) = policies
        .first_mut()
        .and_then(|p| p.spec.destination_cidrs.first_mut())
    {
        *first = EXTERNAL_NET.to_owned();
    }
    Manifests {
        nodes,
        namespaces: vec![NamespaceInfo {
            name: "shop".into(),
            labels: BTreeMap::new(),
        }],
        pods,
        policies,
        service_cidrs: Vec::new(),
        ignored: Vec::new(),
    }
}

/// Case b: `pods` synthetic pods on `nodes` synthetic nodes, all selected by one policy of
/// `cidrs` CIDRs through node-0.
pub fn one_allowlist_many_pods(pods: usize, nodes: usize, cidrs: usize) -> Manifests {
    let mut m = synthetic::cluster(Size {
        nodes,
        pods,
        policies: 1,
    });
    m.policies = vec![PolicyInput {
        name: "saas".into(),
        // Every synthetic pod has it.
        spec: allowlist_spec(
            ("version", "v1"),
            0..cidrs,
            ("kubernetes.io/hostname", "node-0"),
            "192.0.2.1",
        ),
        ..Default::default()
    }];
    m
}

/// `m` with [`CHANGE_CIDR`] appended to the first policy's destinations: the change whose cost
/// the benchmark measures (one more (pod, CIDR) pair per pod the policy selects).
pub fn with_one_more_cidr(m: &Manifests) -> Manifests {
    let mut m = m.clone();
    if let Some(first) = m.policies.first_mut() {
        first.spec.destination_cidrs.push(CHANGE_CIDR.to_owned());
    }
    m
}

/// The manifests as one multi-document YAML file (JSON documents, which YAML reads as they are).
pub fn to_yaml(m: &Manifests) -> String {
    let mut docs: Vec<Value> = Vec::new();
    docs.extend(m.namespaces.iter().map(|n| {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n.name, "labels": n.labels}})
    }));
    docs.extend(m.nodes.iter().map(|n| {
        let addresses: Vec<Value> = n
            .addresses
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a.to_string()}))
            .collect();
        let pod_cidrs: Vec<String> = n.pod_cidrs.iter().map(ToString::to_string).collect();
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": n.labels},
            "spec": {"podCIDRs": pod_cidrs},
            "status": {"addresses": addresses},
        })
    }));
    docs.extend(m.pods.iter().map(|p| {
        let ips: Vec<Value> = p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": p.labels},
            "spec": {"nodeName": p.node_name, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIPs": ips},
        })
    }));
    docs.extend(m.policies.iter().map(|p| {
        serde_json::to_value(EgressGatewayPolicy::new(&p.name, p.spec.clone())).expect("a policy serializes")
    }));
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&d.to_string());
        out.push('\n');
    }
    out
}

/// What one simulated shim saw.
#[derive(Default)]
struct Tally {
    plans: AtomicU64,
    deltas: AtomicU64,
    /// Entries of the largest full plan received.
    plan_entries: AtomicU64,
    /// Encoded bytes of the largest full plan received (all its chunks).
    plan_bytes: AtomicU64,
    /// Every plan and delta received whole, in order.
    received: Mutex<Vec<Received>>,
    sessions: AtomicU64,
    /// When the last plan or delta arrived whole (its last chunk: the simulated shim acks it
    /// then).
    last_update: Mutex<Option<Instant>>,
    /// When the last chunk of a plan or delta arrived (the last one, or one of several).
    last_chunk: Mutex<Option<Instant>>,
    /// Why the last session ended.
    failure: Mutex<Option<String>>,
}

impl Tally {
    /// A plan or delta arrived whole.
    fn updated(&self, mut whole: Received) {
        let now = Instant::now();
        whole.at = Some(now);
        *self.last_update.lock().expect("tally lock") = Some(now);
        self.received().push(whole);
    }

    /// A chunk arrived.
    fn chunk(&self) {
        *self.last_chunk.lock().expect("tally lock") = Some(Instant::now());
    }

    fn received(&self) -> std::sync::MutexGuard<'_, Vec<Received>> {
        self.received.lock().expect("tally lock")
    }

    fn updates(&self) -> u64 {
        self.plans.load(Ordering::Relaxed) + self.deltas.load(Ordering::Relaxed)
    }
}

/// One plan or delta, all its chunks.
#[derive(Clone, Copy, Debug, Default)]
struct Received {
    /// When its last chunk arrived (and the simulated shim acked it).
    at: Option<Instant>,
    plan: bool,
    /// Encoded bytes of its chunks ([`prost::Message::encoded_len`] of each `OperatorMessage`).
    bytes: u64,
    /// Of which the no-leak guard (the encoded `Guard` and `GuardChange` messages of its chunks).
    guard_bytes: u64,
    /// Entries of a plan, upserts of a delta.
    entries: u64,
    removals: u64,
}

impl Received {
    fn add_chunk(&mut self, size: usize, guard: usize, entries: usize, removals: usize) {
        self.bytes += size as u64;
        self.guard_bytes += guard as u64;
        self.entries += entries as u64;
        self.removals += removals as u64;
    }
}

fn shim_msg(m: shim_message::Message) -> v2::ShimMessage {
    v2::ShimMessage { message: Some(m) }
}

/// A shim without a datapath: acknowledges what it receives at once, forever. `keeps`: it
/// announces that it keeps the guard and in-cluster set a delta leaves out, as the real shim
/// does (otherwise it is sent them whole, as shims before that were).
async fn simulated_shim(endpoint: String, node: String, tally: Arc<Tally>, keeps: bool) {
    loop {
        let Err(e) = session(&endpoint, &node, &tally, keeps).await;
        *tally.failure.lock().expect("tally lock") = Some(format!("{e:#}"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn session(endpoint: &str, node: &str, tally: &Tally, keeps: bool) -> Result<std::convert::Infallible> {
    // As the real shim connects (its HTTP/2 pings cost the operator too).
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
        .http2_keep_alive_interval(sluice_proto::client::KEEPALIVE_INTERVAL)
        .connect()
        .await?;
    let mut client = NodeChannelClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(shim_msg(shim_message::Message::Hello(v2::Hello {
        node: node.to_owned(),
        version: "bench-idle".into(),
        operator_heartbeat_floor: true,
        keeps_unchanged_lists: keeps,
        ..Default::default()
    })))
    .await?;
    let mut inbound = client
        .sync(tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
        .await?
        .into_inner();
    tally.sessions.fetch_add(1, Ordering::Relaxed);
    let mut interval = Duration::from_millis(250);
    let mut ticker = tokio::time::interval(interval);
    // The plan or delta being received, so far.
    let mut receiving = Received::default();
    let ack = |generation| {
        shim_msg(shim_message::Message::Ack(v2::Ack {
            generation,
            errors: Vec::new(),
            conflicts: Vec::new(),
            pinned_flows: Vec::new(),
            counted_gateways: Vec::new(),
        }))
    };
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = msg?.context("the operator closed the stream")?;
                // As on the wire: the gRPC message without its 5-byte length prefix.
                let size = prost::Message::encoded_len(&msg);
                match msg.message {
                    // A plan or delta counts (and is acknowledged) with its last chunk.
                    Some(operator_message::Message::Plan(plan)) => {
                        tally.chunk();
                        receiving.plan = true;
                        let guard = plan.guard.as_ref().map_or(0, prost::Message::encoded_len);
                        receiving.add_chunk(size, guard, plan.entries.len(), 0);
                        let wanted = Duration::from_millis(plan.heartbeat_interval_ms.into());
                        if !wanted.is_zero() && wanted != interval {
                            interval = wanted;
                            ticker = tokio::time::interval(interval);
                        }
                        if !plan.continued {
                            let whole = std::mem::take(&mut receiving);
                            tally.plans.fetch_add(1, Ordering::Relaxed);
                            tally.plan_entries.fetch_max(whole.entries, Ordering::Relaxed);
                            tally.plan_bytes.fetch_max(whole.bytes, Ordering::Relaxed);
                            tally.updated(whole);
                            tx.send(ack(plan.generation)).await?;
                        }
                    }
                    Some(operator_message::Message::Delta(delta)) => {
                        tally.chunk();
                        let guard = delta.guard.as_ref().map_or(0, prost::Message::encoded_len)
                            + delta.guard_change.as_ref().map_or(0, prost::Message::encoded_len);
                        receiving.add_chunk(size, guard, delta.upserts.len(), delta.removals.len());
                        if !delta.continued {
                            tally.deltas.fetch_add(1, Ordering::Relaxed);
                            tally.updated(std::mem::take(&mut receiving));
                            tx.send(ack(delta.generation)).await?;
                        }
                    }
                    Some(operator_message::Message::Heartbeat(_)) | None => {}
                }
            }
            _ = ticker.tick() => {
                let hb = shim_message::Message::Heartbeat(v2::Heartbeat { sent_unix_ms: 0 });
                tx.send(shim_msg(hb)).await?;
            }
        }
    }
}

/// Per process: its CPU ticks and the lines its log holds.
type Sample = Vec<(u64, usize)>;

/// Each process's [`Sample`] at the start and the end of `window`, and how long it took, in
/// seconds.
fn over_window(
    tb: &sluice_testbed::Testbed,
    procs: &[(String, u32)],
    window: Duration,
) -> Result<(Sample, Sample, f64)> {
    let sample = || -> Result<Sample> {
        procs
            .iter()
            .map(|(name, pid)| Ok((cpu_ticks(*pid)?, lines_of(&tb.log_path(name)))))
            .collect()
    };
    let (before, at0) = (sample()?, Instant::now());
    std::thread::sleep(window);
    let after = sample()?;
    Ok((before, after, at0.elapsed().as_secs_f64()))
}

/// CPU time of a process so far, in USER_HZ ticks: its threads' (utime + stime) and that of
/// the subprocesses it waited for (cutime + cstime: older shims ran `ip` every tick).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after `comm`, which may hold spaces and parentheses: state is field 3, utime,
    // stime, cutime and cstime fields 14 to 17 (proc(5)).
    let after = stat.rsplit_once(')').context("unexpected /proc/<pid>/stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        f.get(n - 3)
            .context("short /proc/<pid>/stat")?
            .parse()
            .context("/proc/<pid>/stat field")
    };
    Ok(field(14)? + field(15)? + field(16)? + field(17)?)
}

/// Context switches of all of `pid`'s threads so far (voluntary and not): how often it woke,
/// which on a VM is most of what an idle process costs, and far less noisy than its CPU time.
fn context_switches(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end while being read.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in MiB.
fn status_mib(pid: u32, key: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    let kib: f64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("{key}: {line}"))?;
    Ok(kib / 1024.0)
}

fn lines_of(path: &Path) -> usize {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
}

/// One operator on one case, at rest.
#[derive(Clone, Debug, Default)]
pub struct Measure {
    /// `None`: never quiet.
    pub converged_in: Option<Duration>,
    pub largest_plan: u64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// CPU over the window, in % of one core.
    pub cpu_pct: f64,
    /// Context switches per second over the window.
    pub switches_per_s: f64,
    /// Plans and deltas sent to shims during the window.
    pub updates: u64,
    pub log_lines: usize,
    /// Encoded bytes of the largest full plan (all its chunks).
    pub largest_plan_bytes: u64,
    /// The change after the window: one more CIDR in the first policy.
    pub change: AfterChange,
}

/// What the shims received after the manifests changed.
#[derive(Clone, Debug, Default)]
pub struct AfterChange {
    /// From the rename of the changed manifests to the last chunk of the first and of the last
    /// plan or delta a shim received (`None`: no shim got one, or updates did not stop, within
    /// [`CHANGE_TIMEOUT`]).
    pub first_acked_in: Option<Duration>,
    pub acked_in: Option<Duration>,
    /// Shims that received a plan or delta.
    pub shims: usize,
    /// The most plans and deltas one shim received.
    pub most_per_shim: usize,
    pub plans: u64,
    pub deltas: u64,
    /// Plans and deltas without an entry (no upsert, no removal).
    pub without_entries: u64,
    /// Entries of the plans and upserts of the deltas.
    pub entries: u64,
    pub removals: u64,
    /// Encoded bytes of every chunk of those plans and deltas.
    pub bytes: u64,
    /// Of which the no-leak guard.
    pub guard_bytes: u64,
}

/// An operator binary to measure, and what to call it in the table.
#[derive(Clone, Debug)]
pub struct Operator {
    pub label: String,
    pub path: PathBuf,
}

impl std::str::FromStr for Operator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((label, path)) if !label.is_empty() && !path.is_empty() => Ok(Operator {
                label: label.to_owned(),
                path: path.into(),
            }),
            _ => Err(format!("expected LABEL=PATH, not {s:?}")),
        }
    }
}

/// Starts `operator` on `dir`, lets it converge with one simulated shim per node, and measures it
/// over `window`; then replaces the directory's `manifests.yaml` with `changed` and measures what
/// the shims receive until it stops.
#[allow(clippy::too_many_arguments)]
fn measure(
    operator: &Path,
    dir: &Path,
    changed: &str,
    nodes: &[String],
    at_rest: AtRest,
    keeps: bool,
    log: &Path,
) -> Result<Measure> {
    let AtRest { window, grace, .. } = at_rest;
    let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let log_file = std::fs::File::create(log)?;
    let started = Instant::now();
    let child = Command::new(operator)
        .arg("run")
        .arg(format!("--source=dir:{}", dir.display()))
        .args(["--grpc-listen", &listen, "--metrics-listen", "off"])
        .arg(format!("--heartbeat-grace={}ms", grace.as_millis()))
        .arg("--insecure-allow-any-node")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", operator.display()))?;
    let mut child = Stopped(child);
    let pid = child.0.id();
    // Two threads, so that a shim decoding a large plan does not hold up the others' heartbeats.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tallies: Vec<Arc<Tally>> = nodes.iter().map(|_| Arc::default()).collect();
    for (node, tally) in nodes.iter().zip(&tallies) {
        rt.spawn(simulated_shim(
            format!("http://{listen}"),
            node.clone(),
            tally.clone(),
            keeps,
        ));
    }
    // The operator's CPU time, sampled every 200 ms (the last QUIET of it).
    let mut cpu: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let converged = loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(status) = child.0.try_wait()? {
            bail!("the operator exited ({status}):\n{}", tail(log));
        }
        cpu.push_back((Instant::now(), cpu_ticks(pid)?));
        while cpu.front().is_some_and(|(at, _)| at.elapsed() > QUIET) {
            cpu.pop_front();
        }
        let idle = match (cpu.front(), cpu.back()) {
            (Some((t0, c0)), Some((t1, c1))) if *t1 - *t0 >= QUIET.mul_f64(0.8) => {
                ((c1 - c0) as f64 / USER_HZ) / (*t1 - *t0).as_secs_f64() < BUSY
            }
            _ => false,
        };
        let all_planned = tallies.iter().all(|t| t.plans.load(Ordering::Relaxed) > 0);
        let last = tallies
            .iter()
            .filter_map(|t| *t.last_update.lock().expect("tally lock"))
            .max();
        if let Some(last) = last
            && all_planned
            && idle
            && last.elapsed() >= QUIET
        {
            break Some(last);
        }
        if started.elapsed() > CONVERGE_TIMEOUT {
            let unplanned = tallies
                .iter()
                .filter(|t| t.plans.load(Ordering::Relaxed) == 0)
                .count();
            let failure = tallies
                .iter()
                .find_map(|t| t.failure.lock().expect("tally lock").clone());
            eprintln!(
                "    not quiet after {CONVERGE_TIMEOUT:?} ({unplanned} shims without a plan, a session ended \
                 with {failure:?}): measuring as it is"
            );
            break None;
        }
    };
    let updates = || tallies.iter().map(|t| t.updates()).sum::<u64>();
    let (cpu0, switches0, updates0, lines0, at0) = (
        cpu_ticks(pid)?,
        context_switches(pid)?,
        updates(),
        lines_of(log),
        Instant::now(),
    );
    std::thread::sleep(window);
    let (cpu1, switches1, updates1, lines1) =
        (cpu_ticks(pid)?, context_switches(pid)?, updates(), lines_of(log));
    let elapsed = at0.elapsed().as_secs_f64();
    let largest = |of: fn(&Tally) -> &AtomicU64| {
        tallies
            .iter()
            .map(|t| of(t).load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    };
    let mut m = Measure {
        converged_in: converged.map(|c| c.saturating_duration_since(started)),
        largest_plan: largest(|t| &t.plan_entries),
        largest_plan_bytes: largest(|t| &t.plan_bytes),
        rss_mib: status_mib(pid, "VmRSS")?,
        peak_rss_mib: status_mib(pid, "VmHWM")?,
        cpu_pct: 100.0 * (cpu1 - cpu0) as f64 / USER_HZ / elapsed,
        switches_per_s: switches1.saturating_sub(switches0) as f64 / elapsed,
        updates: updates1 - updates0,
        log_lines: lines1 - lines0,
        change: AfterChange::default(),
    };
    m.change = change(dir, changed, &tallies, &mut child, log)?;
    rt.shutdown_background();
    child.stop();
    Ok(m)
}

/// Replaces `dir`'s `manifests.yaml` with `changed` at once (written beside the directory, where
/// the `dir:` source does not look, then renamed over it), and waits until at least one shim got
/// a plan or delta and no chunk of one arrived for [`CHANGE_QUIET`], for at most
/// [`CHANGE_TIMEOUT`].
fn change(
    dir: &Path,
    changed: &str,
    tallies: &[Arc<Tally>],
    child: &mut Stopped,
    log: &Path,
) -> Result<AfterChange> {
    let staged = dir.with_extension("changed");
    std::fs::write(&staged, changed)?;
    let before: Vec<usize> = tallies.iter().map(|t| t.received().len()).collect();
    std::fs::rename(&staged, dir.join("manifests.yaml"))?;
    let changed_at = Instant::now();
    let since = |t: &Tally, n: usize| -> Vec<Received> { t.received()[n..].to_vec() };
    let settled = loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(status) = child.0.try_wait()? {
            bail!("the operator exited after the change ({status}):\n{}", tail(log));
        }
        let updated = tallies.iter().zip(&before).any(|(t, n)| t.received().len() > *n);
        let last_chunk = tallies
            .iter()
            .filter_map(|t| *t.last_chunk.lock().expect("tally lock"))
            .max();
        if updated && last_chunk.is_some_and(|c| c > changed_at && c.elapsed() >= CHANGE_QUIET) {
            break true;
        }
        if changed_at.elapsed() > CHANGE_TIMEOUT {
            eprintln!("    the shims' updates after the change did not stop within {CHANGE_TIMEOUT:?}");
            break false;
        }
    };
    let mut after = AfterChange::default();
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for (t, n) in tallies.iter().zip(before) {
        let got = since(t, n);
        if got.is_empty() {
            continue;
        }
        after.shims += 1;
        after.most_per_shim = after.most_per_shim.max(got.len());
        for r in got {
            if r.plan {
                after.plans += 1;
            } else {
                after.deltas += 1;
            }
            after.without_entries += u64::from(r.entries + r.removals == 0);
            after.entries += r.entries;
            after.removals += r.removals;
            after.bytes += r.bytes;
            after.guard_bytes += r.guard_bytes;
            if let Some(at) = r.at {
                first = Some(first.map_or(at, |f| f.min(at)));
                last = Some(last.map_or(at, |l| l.max(at)));
            }
        }
    }
    if settled {
        let since_change = |at: Option<Instant>| at.map(|at| at.saturating_duration_since(changed_at));
        after.first_acked_in = since_change(first);
        after.acked_in = since_change(last);
    }
    Ok(after)
}

/// The operator process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Stopped(Child);

impl Stopped {
    fn stop(&mut self) {
        use nix::{sys::signal, unistd::Pid};
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = signal::kill(Pid::from_raw(self.0.id() as i32), signal::Signal::SIGTERM);
            for _ in 0..50 {
                if !matches!(self.0.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Measures every operator on every case (operators interleaved per case, so that each pair is
/// measured close together) and returns the table.
/// How long to measure, and the operator's `--heartbeat-grace` (shims send heartbeats four times
/// per grace period: at rest, what the operator does is mostly reading and answering them).
#[derive(Clone, Copy, Debug)]
pub struct AtRest {
    pub window: Duration,
    pub grace: Duration,
    /// Also measure each operator with simulated shims that take the guard and the in-cluster
    /// set whole in every delta (shims before `Hello.keeps_unchanged_lists`).
    pub also_whole_lists: bool,
}

pub fn run(operators: &[Operator], cases: &[Case], at_rest: AtRest, scratch: &Path) -> Result<String> {
    let mut rows = Vec::new();
    for &case in cases {
        let manifests = case.manifests();
        let original = to_yaml(&manifests);
        let changed = to_yaml(&with_one_more_cidr(&manifests));
        let dir = scratch.join(format!("case-{}", case.key()));
        std::fs::create_dir_all(&dir)?;
        let nodes: Vec<String> = manifests.nodes.iter().map(|n| n.name.clone()).collect();
        drop(manifests);
        let runs = operators.iter().flat_map(|op| {
            let whole = at_rest
                .also_whole_lists
                .then(|| (op, false, format!("{}, shims take lists whole", op.label)));
            std::iter::once((op, true, op.label.clone())).chain(whole)
        });
        for (op, keeps, label) in runs {
            eprintln!("==> ({}) {} — {label}", case.key(), case.describe());
            // The previous operator's run left the changed manifests.
            let mut file = std::fs::File::create(dir.join("manifests.yaml"))?;
            file.write_all(original.as_bytes())?;
            drop(file);
            let log = scratch.join(format!("operator-{}-{}-{keeps}.log", case.key(), op.label));
            let m = measure(&op.path, &dir, &changed, &nodes, at_rest, keeps, &log)
                .with_context(|| format!("case ({}) with {label}", case.key()))?;
            eprintln!(
                "    converged in {:.1?}, {:.0} MiB, {:.2} % of a core, {:.0} context switches/s, {} updates and {} log lines at rest",
                m.converged_in, m.rss_mib, m.cpu_pct, m.switches_per_s, m.updates, m.log_lines
            );
            eprintln!(
                "    largest plan {} entries, {} B; after the change: {:?} to the first shim's ack, {:?} to the last's",
                m.largest_plan, m.largest_plan_bytes, m.change.first_acked_in, m.change.acked_in
            );
            eprintln!("    {:?}", m.change);
            rows.push((case, label, m));
        }
    }
    Ok(table(&rows, at_rest))
}

/// After the path works, how long the shims get to finish applying before the window starts.
const SHIMS_SETTLE: Duration = Duration::from_secs(10);

/// Case a on the network-namespace testbed (root), with the real shims: the operator in the
/// underlay's namespace and `sluice-shim run --operator` on each node. Once p1 and p2 reach the
/// external host with n3's egress IP, and [`SHIMS_SETTLE`] later, every process's CPU, RSS and
/// log lines over `window`.
pub fn run_with_shims(operator: &Path, shim: &Path, window: Duration) -> Result<String> {
    use sluice_testbed::{EGRESS_N3, EXT_A, NODES, Testbed, UNDERLAY_IP};

    let mut tb = Testbed::new()?;
    let dir = tb.scratch().join("manifests");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("manifests.yaml"), to_yaml(&Case::A.manifests()))?;
    let tokens = tb.scratch().join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let mut table = String::new();
    for (node, _) in NODES {
        std::fs::write(tokens.join(node), format!("token-of-{node}\n"))?;
        let _ = writeln!(table, "token-of-{node} {node}");
    }
    std::fs::write(tokens.join("table"), table)?;
    let grpc = format!("{UNDERLAY_IP}:9443");
    let mut cmd = tb.command("ul", operator);
    cmd.arg("run")
        .arg(format!("--source=dir:{}", dir.display()))
        .args(["--grpc-listen", &grpc, "--metrics-listen", "off"])
        .args(["--heartbeat-grace", "1s", "--tokens-file"])
        .arg(tokens.join("table"));
    let started = Instant::now();
    let mut procs = vec![("operator".to_owned(), tb.spawn("operator", cmd)?)];
    for (node, _) in NODES {
        let pid = tb.start_operator_shim(node, shim, &grpc, &tokens)?;
        procs.push((format!("shim-{node}"), pid));
    }
    eprintln!("==> (a) {} — real shims in the testbed", Case::A.describe());
    let steered = |pod| tb.fetch(pod, EXT_A).is_ok_and(|seen| seen == EGRESS_N3);
    if !sluice_testbed::wait_for(CONVERGE_TIMEOUT, || steered("p1") && steered("p2")) {
        bail!(
            "p1 and p2 do not leave with {EGRESS_N3}\noperator:\n{}\nshim-n3:\n{}",
            tail(&tb.log_path("operator")),
            tail(&tb.log_path("shim-n3"))
        );
    }
    let converged_in = started.elapsed();
    std::thread::sleep(SHIMS_SETTLE);
    let (before, after, elapsed) = over_window(&tb, &procs, window)?;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| process | RSS (peak) | idle CPU, % of a core | log lines at rest |\n|---|---|---|---|"
    );
    for (((name, pid), (cpu0, lines0)), (cpu1, lines1)) in procs.iter().zip(&before).zip(&after) {
        let _ = writeln!(
            t,
            "| {name} | {:.0} MiB ({:.0} MiB) | {:.2} | {} |",
            status_mib(*pid, "VmRSS")?,
            status_mib(*pid, "VmHWM")?,
            100.0 * (cpu1 - cpu0) as f64 / USER_HZ / elapsed,
            lines1 - lines0
        );
    }
    let _ = writeln!(
        t,
        "\nCase (a) in the network-namespace testbed: p1 and p2 left with n3's egress IP {:.1} s \
         after the start; the {}-second window starts {} s later. Shims tick every second.",
        converged_in.as_secs_f64(),
        window.as_secs(),
        SHIMS_SETTLE.as_secs()
    );
    Ok(t)
}

/// Where a measured shim takes its plan from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanFrom {
    /// `sluice-shim run --operator`: a session with `sluice-operator run` in the testbed (what a
    /// cluster runs: the session's heartbeats are part of the cost).
    Operator,
    /// `sluice-shim run --entries FILE`: the plan document written once, no operator. The only
    /// way to feed a shim that speaks an older wire format.
    File,
}

impl PlanFrom {
    fn name(self) -> &'static str {
        match self {
            PlanFrom::Operator => "operator",
            PlanFrom::File => "plan file",
        }
    }
}

/// A shim binary to measure holding many pairs, and where it takes its plan from.
#[derive(Clone, Debug)]
pub struct ShimUnderTest {
    pub label: String,
    pub path: PathBuf,
    pub plan: PlanFrom,
}

/// Destination CIDRs per policy in the shim cases (the SaaS allowlist).
const SCALE_CIDRS: u64 = 1000;
/// Converging to a million pairs takes the operator and the shims a while on a small machine.
const SCALE_CONVERGE_TIMEOUT: Duration = Duration::from_secs(900);
/// After every shim holds its pairs, how long before the window starts: the last apply's
/// allocations are freed, the operator's sessions are quiet.
const SCALE_SETTLE: Duration = Duration::from_secs(20);

/// (selected pods, CIDRs) making at least `pairs` (pod, CIDR) pairs: up to [`SCALE_CIDRS`]
/// CIDRs, and as many pods as that takes.
pub fn scale_shape(pairs: u64) -> (u64, u64) {
    let cidrs = pairs.clamp(1, SCALE_CIDRS);
    (pairs.max(1).div_ceil(cidrs), cidrs)
}

/// The testbed's nodes and pods, where p1 and `pods - 1` more pods on n1 (addresses only: no
/// interface) are selected by one policy of `cidrs` CIDRs through n3: n1's shim steers
/// `pods × cidrs` pairs, n3's serves them, n2's holds none. The first CIDR is the external
/// host's, so that p1's path can be checked.
pub fn scale_manifests(pods: u64, cidrs: u64) -> Manifests {
    let mut m = allowlists(1, cidrs as usize);
    for p in &mut m.pods {
        let selected = p.name == "p1";
        p.labels
            .insert("app".into(), if selected { "saas" } else { "other" }.into());
    }
    // 10.244.64.0/18 on n1: inside the cluster CIDRs, clear of the testbed's own pods.
    let base = u32::from(Ipv4Addr::new(10, 244, 64, 0));
    m.pods.extend((1..pods).map(|i| PodInfo {
        uid: format!("uid-scale-{i}"),
        namespace: "shop".into(),
        name: format!("scale-{i}"),
        labels: BTreeMap::from([("app".to_owned(), "saas".to_owned())]),
        node_name: Some("n1".into()),
        ips: vec![std::net::IpAddr::V4(Ipv4Addr::from(base + i as u32))],
        host_network: false,
        phase: sluice_operator::model::PodPhase::Running,
    }));
    m
}

/// The plan document of `m`, as `sluice-operator plan --output json` writes it.
fn plan_document(m: &Manifests) -> Result<Vec<u8>> {
    let cluster_cidrs = sluice_operator::in_cluster::in_cluster_cidrs(&m.nodes, &m.service_cidrs);
    let planner = sluice_operator::planner::Planner::from_snapshot(
        m.namespaces.clone(),
        m.nodes.clone(),
        m.policies.clone(),
        m.pods.clone(),
    );
    let mut doc = sluice_operator::report::document(&planner);
    for node in &mut doc.nodes {
        node.cluster_cidrs.clone_from(&cluster_cidrs);
    }
    Ok(serde_json::to_vec(&doc)?)
}

/// The `Threads:` line of `/proc/<pid>/status`.
fn threads(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no Threads in /proc/{pid}/status"))
}

/// One process of a shim case over the window.
struct ProcessAtRest {
    name: String,
    /// Pairs the shim reported holding (`None`: the operator).
    holds: Option<u64>,
    cpu_pct: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    threads: u64,
    log_lines: usize,
}

/// Real shims holding each number of `pairs` in the network-namespace testbed (root), one fresh
/// testbed per (size, shim): the operator (when the shim takes its plan from it) in the
/// underlay's namespace, `sluice-shim run` on each node ticking every second with metrics on.
/// Once n1's and n3's shims report holding every pair and p1 reaches the external host with
/// n3's egress IP, and [`SCALE_SETTLE`] later, every process's CPU, RSS, threads and log lines
/// over `window`.
pub fn run_shim_scale(
    operator: &Path,
    shims: &[ShimUnderTest],
    pairs: &[u64],
    window: Duration,
) -> Result<String> {
    let mut rows: Vec<(u64, &ShimUnderTest, Duration, Vec<ProcessAtRest>)> = Vec::new();
    for &want in pairs {
        let (pods, cidrs) = scale_shape(want);
        let pairs = pods * cidrs;
        let manifests = scale_manifests(pods, cidrs);
        for shim in shims {
            eprintln!(
                "==> {pairs} pairs ({pods} pods × {cidrs} CIDRs) — shim {} from {}",
                shim.label,
                shim.plan.name()
            );
            let (took, procs) = shim_at_rest(operator, shim, &manifests, pairs, window)
                .with_context(|| format!("{pairs} pairs with shim {}", shim.label))?;
            for p in &procs {
                eprintln!(
                    "    {}: {:.3} % of a core, {:.0} MiB, {} log lines",
                    p.name, p.cpu_pct, p.rss_mib, p.log_lines
                );
            }
            rows.push((pairs, shim, took, procs));
        }
    }
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| pairs | shim | plan from | process | holds (pairs) | idle CPU, % of a core | CPU-s per hour | RSS (peak) | threads | log lines at rest |\n|---:|---|---|---|---:|---:|---:|---|---:|---:|"
    );
    for (pairs, shim, _, procs) in &rows {
        for p in procs {
            let _ = writeln!(
                t,
                "| {pairs} | {} | {} | {} | {} | {:.3} | {:.1} | {:.0} MiB ({:.0} MiB) | {} | {} |",
                shim.label,
                shim.plan.name(),
                p.name,
                p.holds.map_or_else(|| "-".to_owned(), |h| h.to_string()),
                p.cpu_pct,
                p.cpu_pct / 100.0 * 3600.0,
                p.rss_mib,
                p.peak_rss_mib,
                p.threads,
                p.log_lines,
            );
        }
    }
    let converged: Vec<String> = rows
        .iter()
        .map(|(pairs, shim, took, _)| {
            format!(
                "{pairs} ({}, {}): {:.1} s",
                shim.label,
                shim.plan.name(),
                took.as_secs_f64()
            )
        })
        .collect();
    let _ = writeln!(
        t,
        "\nShims in the network-namespace testbed: n1's steers the pairs (p1 and synthetic pods, \
         addresses only), n3's serves them as the gateway, n2's holds none. Each ticks every \
         second, serves metrics (not scraped) and, from the operator, keeps a session with \
         heartbeat grace 1 s: n3, which the policy's gateway selector matches, heartbeats every \
         250 ms each way, n1 and n2 at the operator's slow interval. The {}-second window starts \
         {} s after every shim held its pairs and p1 left with n3's egress IP (start → then: {}). \
         CPU is utime + stime + cutime + cstime of `/proc/<pid>/stat` (every thread, and the \
         subprocesses it ran; 10 ms resolution).",
        window.as_secs(),
        SCALE_SETTLE.as_secs(),
        converged.join("; ")
    );
    Ok(t)
}

/// One (size, shim) case in a fresh testbed: how long it took to converge, and every process
/// over the window.
fn shim_at_rest(
    operator: &Path,
    shim: &ShimUnderTest,
    manifests: &Manifests,
    pairs: u64,
    window: Duration,
) -> Result<(Duration, Vec<ProcessAtRest>)> {
    use sluice_testbed::{EGRESS_N3, EXT_A, NODES, Testbed, UNDERLAY_IP};

    let mut tb = Testbed::new()?;
    let started = Instant::now();
    let grpc = format!("{UNDERLAY_IP}:9443");
    let tokens = tb.scratch().join("tokens");
    let plan_file = tb.scratch().join("plan.json");
    let mut procs: Vec<(String, u32)> = Vec::new();
    match shim.plan {
        PlanFrom::Operator => {
            let dir = tb.scratch().join("manifests");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("manifests.yaml"), to_yaml(manifests))?;
            std::fs::create_dir_all(&tokens)?;
            let mut table = String::new();
            for (node, _) in NODES {
                std::fs::write(tokens.join(node), format!("token-of-{node}\n"))?;
                let _ = writeln!(table, "token-of-{node} {node}");
            }
            std::fs::write(tokens.join("table"), table)?;
            let mut cmd = tb.command("ul", operator);
            cmd.arg("run")
                .arg(format!("--source=dir:{}", dir.display()))
                .args(["--grpc-listen", &grpc, "--metrics-listen", "off"])
                .args(["--heartbeat-grace", "1s", "--tokens-file"])
                .arg(tokens.join("table"));
            procs.push(("operator".into(), tb.spawn("operator", cmd)?));
        }
        PlanFrom::File => std::fs::write(&plan_file, plan_document(manifests)?)?,
    }
    // Older shims keep one entry per pair in the destinations map: room for all of them (never
    // below today's default, 2^20).
    let map_max = (pairs + pairs / 8).max(1 << 20).to_string();
    let scratch = tb.scratch().to_owned();
    let status = |node: &str| scratch.join(format!("{node}.status"));
    for (node, _) in NODES {
        let mut cmd = tb.shim_command(node, &shim.path);
        match shim.plan {
            PlanFrom::Operator => cmd
                .args(["--operator", &format!("http://{grpc}")])
                .arg("--token-file")
                .arg(tokens.join(node)),
            PlanFrom::File => cmd.arg("--entries").arg(&plan_file),
        };
        cmd.args(["--interval-ms", "1000", "--metrics-addr", "127.0.0.1:9473"])
            .args(["--policy-map-max", &map_max])
            .arg("--status-file")
            .arg(status(node));
        let name = format!("shim-{node}");
        procs.push((name.clone(), tb.spawn(&name, cmd)?));
    }
    let holds = |node: &str| -> Option<u64> {
        let bytes = std::fs::read(status(node)).ok()?;
        serde_json::from_slice::<Value>(&bytes).ok()?["entries"].as_u64()
    };
    let expected = [("n1", pairs), ("n2", 0), ("n3", pairs)];
    let converged = sluice_testbed::wait_for(SCALE_CONVERGE_TIMEOUT, || {
        expected.iter().all(|(node, n)| holds(node) == Some(*n))
            && tb.fetch("p1", EXT_A).is_ok_and(|seen| seen == EGRESS_N3)
    });
    if !converged {
        let held: Vec<String> = expected
            .iter()
            .map(|(node, n)| format!("{node}: {:?} of {n}", holds(node)))
            .collect();
        bail!(
            "the shims never held their pairs ({}) or p1 does not leave with {EGRESS_N3}\nshim-n1:\n{}\nshim-n3:\n{}",
            held.join(", "),
            tail(&tb.log_path("shim-n1")),
            tail(&tb.log_path("shim-n3"))
        );
    }
    let took = started.elapsed();
    std::thread::sleep(SCALE_SETTLE);
    let (before, after, elapsed) = over_window(&tb, &procs, window)?;
    let mut out = Vec::new();
    for (((name, pid), (cpu0, lines0)), (cpu1, lines1)) in procs.iter().zip(&before).zip(&after) {
        out.push(ProcessAtRest {
            name: name.clone(),
            holds: name.strip_prefix("shim-").and_then(holds),
            cpu_pct: 100.0 * (cpu1 - cpu0) as f64 / USER_HZ / elapsed,
            rss_mib: status_mib(*pid, "VmRSS")?,
            peak_rss_mib: status_mib(*pid, "VmHWM")?,
            threads: threads(*pid)?,
            log_lines: lines1 - lines0,
        });
    }
    Ok((took, out))
}

/// `n` with commas between groups of three digits.
fn commas(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A number of bytes as read: bytes under 10 kB, then kB or MB with one decimal (10^3, 10^6).
fn readable_bytes(n: u64) -> String {
    match n {
        0..10_000 => format!("{} B", commas(n)),
        10_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

fn table(rows: &[(Case, String, Measure)], at_rest: AtRest) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| case | operator | largest plan (entries, bytes) | start → converged | RSS (peak) | idle CPU, % of a core | context switches/s | plans + deltas at rest | log lines at rest |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---|---:|---:|---:|---:|");
    for (case, label, m) in rows {
        let _ = writeln!(
            t,
            "| ({}) {} | {label} | {}, {} | {} | {:.0} MiB ({:.0} MiB) | {:.2} | {:.0} | {} | {} |",
            case.key(),
            case.describe(),
            commas(m.largest_plan),
            readable_bytes(m.largest_plan_bytes),
            m.converged_in.map_or_else(
                || format!("never (> {} s)", CONVERGE_TIMEOUT.as_secs()),
                |d| format!("{:.1} s", d.as_secs_f64())
            ),
            m.rss_mib,
            m.peak_rss_mib,
            m.cpu_pct,
            m.switches_per_s,
            m.updates,
            m.log_lines,
        );
    }
    let _ = writeln!(
        t,
        "\n| case | operator | change → first shim acked | change → last shim acked | shims updated | plans + deltas (most to one shim) | of which without entries | entries upserted, removed | bytes | of which the guard |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (case, label, m) in rows {
        let c = &m.change;
        let secs = |d: Option<Duration>| {
            d.map_or_else(
                || format!("never (> {} s)", CHANGE_TIMEOUT.as_secs()),
                |d| format!("{:.2} s", d.as_secs_f64()),
            )
        };
        let _ = writeln!(
            t,
            "| ({}) | {label} | {} | {} | {} | {} + {} ({}) | {} | {}, {} | {} | {} |",
            case.key(),
            secs(c.first_acked_in),
            secs(c.acked_in),
            commas(c.shims as u64),
            commas(c.plans),
            commas(c.deltas),
            c.most_per_shim,
            commas(c.without_entries),
            commas(c.entries),
            commas(c.removals),
            readable_bytes(c.bytes),
            readable_bytes(c.guard_bytes),
        );
    }
    let _ = writeln!(
        t,
        "\nAt rest: a {}-second window that starts once every shim holds a plan, nothing but \
         heartbeats has arrived for {} s and the operator used less than {:.0} % of a core \
         meanwhile (\"never\": not within {} s; measured anyway). Heartbeat grace {:?}: the \
         shims of gateway-capable nodes heartbeat every {:?}, the others at the operator's slow \
         interval, and the operator to each every max(that, {:?}); `dir:` source polled every \
         200 ms. The simulated shims run in the benchmark's process, on the same machine.",
        at_rest.window.as_secs(),
        QUIET.as_secs(),
        BUSY * 100.0,
        CONVERGE_TIMEOUT.as_secs(),
        at_rest.grace,
        at_rest.grace / 4,
        sluice_proto::OPERATOR_HEARTBEAT_FLOOR,
    );
    let _ = writeln!(
        t,
        "\nBytes: the encoded length of each operator message (`OperatorMessage`, without gRPC's \
         5-byte prefix), summed over the chunks of a plan or delta (kB and MB are 10^3 and 10^6 \
         bytes). The largest plan is the largest a shim received whole (entries and bytes). \
         The change, after the window: the case's manifests with one more destination CIDR \
         ({CHANGE_CIDR}) in the first policy, written beside the directory and renamed over its \
         file. \"change → first/last shim acked\": from the rename to the arrival of the last \
         chunk of the first and of the last plan or delta a shim received (a simulated shim acks \
         a plan or delta as soon as its last chunk arrives, so that is when its ack left), once \
         at least one shim was updated and no chunk arrived for {} s (\"never\": not within \
         {} s). Both include the `dir:` source noticing the change (polled every 200 ms, so up \
         to 200 ms of it) and reading the whole directory again. The other columns count what \
         the shims received after the rename, over all shims; \"the guard\": the no-leak guard's \
         lists (`Guard`: the destinations of every `failurePolicy: Drop` policy, the default, \
         and the node's decided pods) within those bytes.",
        CHANGE_QUIET.as_secs(),
        CHANGE_TIMEOUT.as_secs(),
    );
    t
}

#[cfg(test)]
mod tests {
    use sluice_operator::planner::Planner;

    use super::*;

    fn read_back(m: &Manifests) -> Manifests {
        let mut back = Manifests::default();
        back.add_file(Path::new("generated.yaml"), &to_yaml(m)).unwrap();
        back
    }

    fn planned(m: &Manifests) -> Planner {
        let m = read_back(m);
        Planner::from_snapshot(m.namespaces, m.nodes, m.policies, m.pods)
    }

    #[test]
    fn generated_manifests_read_back_as_generated() {
        for m in [
            allowlists(2, 3),
            one_allowlist_many_pods(40, 5, 3),
            synthetic::cluster(Size {
                nodes: 30,
                pods: 200,
                policies: 4,
            }),
        ] {
            let back = read_back(&m);
            assert_eq!(back.nodes, m.nodes);
            assert_eq!(back.namespaces, m.namespaces);
            assert_eq!(back.pods, m.pods);
            let specs = |m: &Manifests| -> Vec<(String, EgressGatewayPolicySpec)> {
                m.policies
                    .iter()
                    .map(|p| (p.name.clone(), p.spec.clone()))
                    .collect()
            };
            assert_eq!(specs(&back), specs(&m));
        }
    }

    #[test]
    fn allowlists_give_every_selected_pod_every_cidr_of_every_policy() {
        let planner = planned(&allowlists(3, 10));
        let entries = |node: &str| planner.node_plan(node).len();
        // p1 on n1 and p2 on n2, 3 × 10 CIDRs each; the gateway n3 holds both pods'.
        assert_eq!((entries("n1"), entries("n2"), entries("n3")), (30, 30, 60));
    }

    #[test]
    fn one_allowlist_selects_every_pod() {
        let planner = planned(&one_allowlist_many_pods(40, 5, 3));
        assert_eq!(planner.node_plan("node-0").len(), 40 * 3);
    }

    #[test]
    fn shim_cases_hold_the_pairs_asked_for_on_the_source_node_and_the_gateway() {
        assert_eq!(scale_shape(1), (1, 1));
        assert_eq!(scale_shape(50_000), (50, 1000));
        assert_eq!(scale_shape(1_000_000), (1000, 1000));
        assert_eq!(scale_shape(1500), (2, 1000));
        let planner = planned(&scale_manifests(5, 3));
        let entries = |node: &str| planner.node_plan(node).len();
        assert_eq!((entries("n1"), entries("n2"), entries("n3")), (15, 0, 15));
        // The file the plan-file shims read says the same.
        let doc: Value = serde_json::from_slice(&plan_document(&scale_manifests(5, 3)).unwrap()).unwrap();
        let held: Vec<(String, usize)> = doc["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_owned(),
                    n["entries"].as_array().unwrap().len(),
                )
            })
            .collect();
        assert_eq!(
            held,
            [("n1".to_owned(), 15), ("n2".to_owned(), 0), ("n3".to_owned(), 15)]
        );
    }

    #[test]
    fn the_change_adds_one_cidr_to_the_first_policy_and_one_pair_per_pod_it_selects() {
        use std::collections::BTreeSet;
        for original in [
            allowlists(3, 10),
            one_allowlist_many_pods(40, 5, 3),
            synthetic::cluster(Size {
                nodes: 30,
                pods: 200,
                policies: 4,
            }),
        ] {
            // The manifests as the operator reads them: the same but for that one CIDR.
            let (m, changed) = (read_back(&original), read_back(&with_one_more_cidr(&original)));
            assert_eq!(changed.nodes, m.nodes);
            assert_eq!(changed.namespaces, m.namespaces);
            assert_eq!(changed.pods, m.pods);
            assert_eq!(changed.policies.len(), m.policies.len());
            for (i, (before, after)) in m.policies.iter().zip(&changed.policies).enumerate() {
                assert!(
                    !before.spec.destination_cidrs.iter().any(|c| c == CHANGE_CIDR),
                    "{CHANGE_CIDR} is new"
                );
                let mut expected = before.spec.clone();
                if i == 0 {
                    expected.destination_cidrs.push(CHANGE_CIDR.to_owned());
                }
                assert_eq!((&after.name, &after.spec), (&before.name, &expected));
            }

            // Planned: every node keeps its entries and gains the new CIDR's, one (pod, CIDR)
            // pair more per pod the first policy selects.
            let (before, after) = (planned(&original), planned(&with_one_more_cidr(&original)));
            let first = &*m.policies[0].name;
            let pairs = |p: &Planner| -> BTreeSet<(std::net::IpAddr, String)> {
                p.node_plans()
                    .values()
                    .flat_map(|entries| entries.keys())
                    .map(|k| (k.source, k.destination.to_string()))
                    .collect()
            };
            let selected: BTreeSet<std::net::IpAddr> = before
                .node_plans()
                .values()
                .flat_map(|entries| entries.values())
                .filter(|e| &*e.policy == first)
                .map(|e| e.key.source)
                .collect();
            assert!(!selected.is_empty());
            let (pairs_before, pairs_after) = (pairs(&before), pairs(&after));
            assert!(pairs_before.is_subset(&pairs_after));
            let added: BTreeSet<_> = pairs_after.difference(&pairs_before).cloned().collect();
            let expected: BTreeSet<_> = selected
                .iter()
                .map(|pod| (*pod, CHANGE_CIDR.to_owned()))
                .collect();
            assert_eq!(added, expected);
            for node in after.node_names() {
                let mut entries = after.node_plan(node);
                entries.retain(|k, e| {
                    let new = k.destination.to_string() == CHANGE_CIDR;
                    assert!(!new || &*e.policy == first);
                    !new
                });
                assert_eq!(entries, before.node_plan(node), "{node} keeps its entries");
            }
        }
    }

    #[test]
    fn numbers_are_written_as_read() {
        assert_eq!(commas(0), "0");
        assert_eq!(commas(999), "999");
        assert_eq!(commas(1000), "1,000");
        assert_eq!(commas(1_000_000), "1,000,000");
        assert_eq!(readable_bytes(9_999), "9,999 B");
        assert_eq!(readable_bytes(36_100), "36.1 kB");
        assert_eq!(readable_bytes(36_048_000), "36.0 MB");
    }

    #[test]
    fn cases_are_chosen_by_letter() {
        assert_eq!(choose("ca").unwrap(), [Case::A, Case::C]);
        assert!(choose("x").is_err());
    }
}
