//! `sluice-shim run`: load and attach the datapath, then keep its maps equal to the node's plan.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use std::sync::Arc;

use aya::maps::{MapData, lpm_trie::Key};
use ipnet::{IpNet, Ipv4Net};
use sluice_proto::{
    EgressEntry, EntryKey,
    client::{self, Applied, NodeState, Update, UpdateReceiver},
};
use tokio::sync::watch;

use crate::{
    datapath::{self, Datapath, DestinationStore, Maps, ignore_missing},
    desired::{self, Host, PolicyIds},
    egress_ip, egress_route,
    error::{Error, Result},
    layout::{Layout, MapFull, held_while_moving},
    maps::{self, CidrKeyV4, Config, PolicyName},
    metrics::Metrics,
    nat, netdev,
    netlink::Route,
    rp_filter,
    sync::{self, Store, Transition},
};

/// Kinds of kernel objects the agent puts back when someone else removes them (the `object` label
/// of `sluice_state_restored_total`).
const RESTORED_NFT_TABLE: &str = "nft_table";
const RESTORED_REPLY_RULE: &str = "reply_rule";
const RESTORED_REPLY_ROUTE: &str = "reply_route";
const RESTORED_EGRESS_RULE: &str = "egress_rule";
const RESTORED_EGRESS_ROUTE: &str = "egress_route";
const RESTORABLE: [&str; 5] = [
    RESTORED_NFT_TABLE,
    RESTORED_REPLY_RULE,
    RESTORED_REPLY_ROUTE,
    RESTORED_EGRESS_RULE,
    RESTORED_EGRESS_ROUTE,
];

/// How often the fence's deadline is pushed forward, and how far ahead. Sized for the default
/// 1 s heartbeat grace: once the shim is gone, its node stops answering for (and sending from)
/// its managed egress IPs within `FENCE_HOLD`, before the operator gives them to another node
/// (one grace period after the last heartbeat); a stall of the renewal shorter than
/// `FENCE_HOLD - FENCE_RENEW` changes nothing.
pub const FENCE_RENEW: Duration = Duration::from_millis(100);
pub const FENCE_HOLD: Duration = Duration::from_millis(600);

/// Everything `run` needs.
#[derive(Debug)]
pub struct Options {
    pub node: String,
    /// The node's underlay address (IPv6 on an IPv6-only node network).
    pub node_ip: IpAddr,
    pub plan: PlanSource,
    pub cluster_cidrs: Vec<Ipv4Net>,
    pub pod_interfaces: Vec<String>,
    pub bpffs_dir: PathBuf,
    /// Capacities of the sources and destinations maps.
    pub capacity: datapath::Capacity,
    pub tunnel: netdev::Tunnel,
    pub reply_table: u32,
    pub source_check: SourceCheck,
    /// The bits of the packet mark Sluice uses.
    pub marks: maps::MarkLayout,
    pub metrics_addr: Option<SocketAddr>,
    pub interval: Duration,
    pub status_file: Option<PathBuf>,
    /// Flows keep the gateway they started on across planned changes (`--flow-pinning`).
    pub flow_pinning: bool,
    /// Managed egress IPs are given up after this long without a word from the operator
    /// (`None`: never). See `--release-managed-ips-after`.
    pub release_managed_after: Option<Duration>,
}

/// How a pod's packet proves that its source address is its own before it is steered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceCheck {
    /// The route back to the source leaves by the interface the packet came in on (or, on a
    /// bridge, the frame's MAC is the source's neighbour entry).
    Route,
    /// No check: the CNI enforces pod source addresses itself.
    Off,
}

/// Ticks in a row that see a pod interface receive traffic Sluice's program never saw before it
/// counts as bypassed (see `Agent::check_bypass`).
const BYPASS_TICKS: u32 = 2;

/// Where the node's plan comes from.
#[derive(Debug)]
pub enum PlanSource {
    /// A plan document (`sluice-operator plan --output json`), re-read when it changes.
    File(PathBuf),
    /// The operator, over the node channel (see [`crate::client`]).
    Operator(OperatorPlans),
}

/// The datapath side of the node channel: the updates the sessions receive (taken by [`run`]),
/// and the generation applied (which the session acknowledges).
#[derive(Debug)]
pub struct OperatorPlans {
    pub updates: Option<UpdateReceiver>,
    pub applied: Arc<watch::Sender<Applied>>,
    /// When the operator was last heard from.
    pub contact: client::Contact,
    /// Starts the session (once): [`run`] calls it when the datapath is loaded, so that the
    /// first hello reports what the pinned maps hold, also right after an upgrade that added
    /// maps (until the datapath is loaded, they are not pinned yet).
    pub connect: Option<Connect>,
}

/// Starts a session (see [`OperatorPlans::connect`]).
pub struct Connect(pub Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connect")
    }
}

/// Runs until an unrecoverable error. Transient failures (a bad plan file, a missing egress IP)
/// are logged and retried every tick; the datapath keeps its last good state meanwhile.
///
/// One loop, woken by whichever comes first: a netlink notification (a link, an IPv4 address, a
/// route or a rule changed), a new state from the operator, or `--interval-ms` (the backstop, and
/// how a plan file's changes are noticed). Each tick runs on Tokio's blocking pool: it reads and
/// writes the kernel with blocking calls, which must not hold up the node channel's session.
pub async fn run(mut opts: Options) -> Result<()> {
    // Left by a previous run (a restarted container keeps the pod's volumes), it would make the
    // readiness probe pass before this process applied anything.
    if let Some(path) = &opts.status_file {
        remove_status(path)?;
    }
    let (mut updates, connect) = match &mut opts.plan {
        PlanSource::Operator(link) => (link.updates.take(), link.connect.take()),
        PlanSource::File(_) => (None, None),
    };
    let interval = opts.interval;
    let mut agent = blocking(move || Agent::start(opts)).await?;
    if let Some(Connect(connect)) = connect {
        connect();
    }
    let mut events = netdev::LinkEvents::open()?;
    let mut received = Vec::new();
    loop {
        if let Some(updates) = updates.as_mut() {
            received.extend(updates.pending());
        }
        let batch = std::mem::take(&mut received);
        agent = blocking(move || {
            agent.receive(batch);
            agent.tick();
            Ok(agent)
        })
        .await?;
        tokio::select! {
            changed = events.changed() => changed?,
            batch = next_updates(updates.as_mut()) => received = batch?,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Keeps the fence's deadline ahead of now from a thread of its own for the life of the
/// process, so that the node keeps its managed egress IPs exactly while this shim lives (a
/// long apply does not let them lapse; a dead process does). Started only on a node that holds
/// one: the others have nothing to fence, and no reason to wake ten times a second.
fn renew_fence_forever(bpffs_dir: &Path) -> Result<()> {
    let mut maps = Maps::open_pinned(bpffs_dir)?;
    std::thread::Builder::new()
        .name("fence".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                match maps.renew_fence(FENCE_HOLD) {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %DisplayChain(&e), "renewing the fence: managed egress IPs lapse");
                    }
                    Err(_) => {}
                }
                std::thread::sleep(FENCE_RENEW);
            }
        })
        .map_err(|e| Error::io("starting the fence thread", e))?;
    Ok(())
}

/// Runs `f` on Tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("the agent loop", std::io::Error::other(e)))?
}

/// Waits for the operator's next updates; never, with a plan file.
async fn next_updates(updates: Option<&mut UpdateReceiver>) -> Result<Vec<Update>> {
    let Some(updates) = updates else {
        return std::future::pending().await;
    };
    updates
        .next_batch()
        .await
        .ok_or_else(|| Error::io("the node channel", std::io::Error::other("stopped")))
}

/// What tells that the plan changed: the plan file's stat, or the operator's generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileStamp {
    File(SystemTime, u64),
    /// (session, generation): a new session's plan is applied even when its number is one the
    /// datapath holds (it may come from another operator process).
    Generation(u64, u64),
}

/// SNAT rules (egress IP -> egress ids) and egress routes (egress id -> interface name, index).
type EgressKept = (nat::Snat, BTreeMap<u32, (String, u32)>);

/// How often the pods' pinned flows are counted while any gateway is pinnable.
const PINNED_FLOWS_EVERY: Duration = Duration::from_secs(2);

/// The pods' open flows pinned to gateways, as the operator is told (`Ack.pinned_flows`,
/// `Ack.counted_gateways`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PinnedReport {
    pinned_flows: Vec<sluice_proto::v2::PinnedFlowCount>,
    counted_gateways: Vec<Vec<u8>>,
}

/// The running shim.
pub struct Agent {
    opts: Options,
    dp: Datapath,
    metrics: Metrics,
    /// Mirrors of what the maps hold (read once at start, then kept by every write).
    layout: Layout,
    /// Entries (source, destination) the datapath holds, as of the last apply.
    entries: usize,
    names: BTreeMap<u32, PolicyName>,
    /// Mirrors of the tunnel peers (both underlay families) and bridge ports maps.
    peers: BTreeMap<u32, u32>,
    peers_v6: BTreeMap<maps::AddrV6, u32>,
    bridge_ports: BTreeMap<u32, u32>,
    /// Mirror of the decided pods map (the no-leak guard).
    decided: BTreeMap<u32, u32>,
    /// Mirrors of the IPv6 entries and decided pods maps (IPv6 fails closed).
    entries_v6: BTreeMap<maps::EntryKeyV6, maps::EntryV6>,
    decided_v6: BTreeMap<maps::AddrV6, u32>,
    ids: PolicyIds,
    /// ifindex -> name of the pod interfaces attached this run.
    attached: BTreeMap<u32, String>,
    /// Per attached pod interface: (received packets, packets Sluice saw, ticks in a row that
    /// looked bypassed) at the last tick.
    seen: BTreeMap<u32, (u64, u64, u32)>,
    tunnel_ifindex: u32,
    /// Sluice's nftables table, as last applied.
    nft: nat::Guard,
    snat: nat::Snat,
    /// The no-leak guard's nftables backstop, as last applied.
    backstop: nat::Backstop,
    /// Egress routing tables (table -> interface) and rules (policy id, table) in place.
    egress_tables: BTreeMap<u32, String>,
    egress_rules: BTreeSet<(u32, u32)>,
    /// What the egress tables held after the last tick's sync.
    egress_routes: BTreeMap<u32, BTreeSet<Route>>,
    /// Kernel objects someone else removed and the shim put back, by kind.
    restored: BTreeMap<&'static str, u64>,
    /// The plan file and host as of the last successful apply.
    applied: Option<(FileStamp, Vec<desired::Interface>)>,
    plan_reads: u64,
    map_writes: u64,
    apply_errors: u64,
    /// Plans refused whole because they do not fit the maps.
    plans_refused: u64,
    /// After a failed apply, when to try again (doubling the wait up to 30 s).
    retry: Option<(std::time::Instant, Duration)>,
    /// What the operator wants this node to hold: the one copy, updated in place.
    operator_state: Option<NodeState>,
    /// Claims, announces and releases managed egress IPs.
    addresses: egress_ip::AddressManager,
    /// Interfaces the fence is attached to this run.
    fenced: BTreeSet<u32>,
    /// Whether the fence's renewal thread runs (from the first managed egress IP on).
    renewing: bool,
    /// What kept managed egress IPs from being claimed at the last tick, each logged once.
    managed_problems: BTreeSet<String>,
    /// Managed egress IPs another host answers for (not claimed), with who answers.
    address_conflicts: BTreeMap<IpAddr, String>,
    /// What `sluice_pinnable_v4` holds: gateways flows may stay pinned to.
    pinnable: BTreeMap<u32, u32>,
    /// The SNAT rules and egress routes of the last plan applied, kept on into the next while
    /// this node is pinnable itself (flows of its pods that left from here stay, by their
    /// egress).
    egress_kept: EgressKept,
    /// The pods' open flows pinned to those gateways as last counted, and when.
    pinned_report: PinnedReport,
    pinned_counted_at: Option<std::time::Instant>,
    /// Managed egress IPs were given up for the operator's silence: the state (session,
    /// generation) they were given up in, claimed from again only once a newer one comes.
    released_in_silence: Option<(u64, u64)>,
}

impl Agent {
    /// Loads the datapath (adopting pinned maps), creates the tunnel and adopts the map contents.
    pub fn start(opts: Options) -> Result<Self> {
        let mut dp = Datapath::load(&opts.bpffs_dir, opts.capacity)?;
        let addresses = egress_ip::AddressManager::default();
        // Before anything else: the managed addresses of a shim that was gone past its fence's
        // deadline may be another node's by now. Give them up; the plan gives back those that
        // are still this node's. Within the deadline, keep them and renew at once.
        if dp.maps.fence_expired()? {
            release_all_managed(&mut dp.maps);
        }
        dp.maps.renew_fence(FENCE_HOLD)?;
        let layout = dp.maps.layout()?;
        let policy = layout.expand();
        let mut names = BTreeMap::new();
        for item in dp.maps.names.iter() {
            let (id, name) = item.map_err(|source| Error::Map {
                name: maps::POLICY_NAMES,
                action: "reading".into(),
                source,
            })?;
            names.insert(id, name);
        }
        let peers = read_hash(&dp.maps.peers, maps::TUNNEL_PEERS_V4)?;
        let peers_v6 = read_hash(&dp.maps.peers_v6, maps::TUNNEL_PEERS_V6)?;
        let pinnable = read_hash(&dp.maps.pinnable, maps::PINNABLE_V4)?;
        let bridge_ports = read_hash(&dp.maps.bridge_ports, maps::BRIDGE_PORTS)?;
        let decided = read_hash(&dp.maps.decided_pods, maps::DECIDED_PODS_V4)?;
        let decided_v6 = read_hash(&dp.maps.decided_pods_v6, maps::DECIDED_PODS_V6)?;
        let mut entries_v6: BTreeMap<maps::EntryKeyV6, maps::EntryV6> = BTreeMap::new();
        for item in dp.maps.entries_v6.iter() {
            let (key, value) = item.map_err(|source| Error::Map {
                name: maps::ENTRIES_V6,
                action: "reading".into(),
                source,
            })?;
            entries_v6.insert(maps::EntryKeyV6::from_lpm(&key), value);
        }
        // Egress ids live on in conntrack marks: keep those the pinned entries carry.
        let local = |flags: u32, id: u32| flags & maps::F_LOCAL_GATEWAY != 0 && id != 0;
        let egress_ids: BTreeMap<IpAddr, u32> = policy
            .values()
            .filter(|v| local(v.flags, v.egress_id) && v.egress_ip != 0)
            .map(|v| (IpAddr::V4(maps::from_be(v.egress_ip)), v.egress_id))
            .chain(
                entries_v6
                    .values()
                    .filter(|v| local(v.flags, v.egress_id) && v.egress_ip != maps::AddrV6::default())
                    .map(|v| (IpAddr::V6(v.egress_ip.bytes.into()), v.egress_id)),
            )
            .collect();
        let ids = PolicyIds::adopt(names.iter().map(|(id, n)| (*id, n.as_str())).collect())
            .with_egresses(egress_ids, opts.marks.max_egress_id());
        tracing::info!(
            entries = policy.len(),
            sources = layout.sources.len(),
            groups = layout.group_count(),
            policies = names.len(),
            "adopted pinned maps"
        );
        let entries = policy.len();

        // Only added to: what the map holds beyond the flags came from the operator's last plan,
        // and stays in-cluster until the next plan says otherwise.
        sync_lpm(
            &mut dp.maps.cluster,
            maps::CLUSTER_V4,
            &own_cluster_cidrs(&opts, &[]),
            false,
        )?;

        let metrics = Metrics::default();
        if let Some(addr) = opts.metrics_addr {
            let limits = crate::metrics::Limits::for_interval(opts.interval);
            let server = crate::metrics::serve(addr, metrics.clone(), limits)
                .map_err(|e| Error::io(format!("serving metrics on {addr}"), e))?;
            tracing::info!(bound = %server.local_addr(), "serving metrics");
            // A task of the shim's runtime (this runs on its blocking pool); dropping the handle
            // leaves it serving for the life of the process.
        }
        let mut agent = Agent {
            opts,
            dp,
            metrics,
            layout,
            entries,
            names,
            peers,
            peers_v6,
            bridge_ports,
            decided,
            entries_v6,
            decided_v6,
            ids,
            attached: BTreeMap::new(),
            seen: BTreeMap::new(),
            tunnel_ifindex: 0,
            nft: nat::Guard::default(),
            snat: nat::Snat::default(),
            backstop: nat::Backstop::default(),
            egress_tables: BTreeMap::new(),
            egress_rules: BTreeSet::new(),
            egress_routes: BTreeMap::new(),
            restored: RESTORABLE.iter().map(|kind| (*kind, 0)).collect(),
            applied: None,
            plan_reads: 0,
            map_writes: 0,
            apply_errors: 0,
            plans_refused: 0,
            retry: None,
            operator_state: None,
            addresses,
            fenced: BTreeSet::new(),
            renewing: false,
            managed_problems: BTreeSet::new(),
            address_conflicts: BTreeMap::new(),
            pinned_report: PinnedReport::default(),
            pinned_counted_at: None,
            egress_kept: Default::default(),
            released_in_silence: None,
            pinnable,
        };
        // Back within the deadline with managed addresses: keep them renewed from now on.
        if !agent.dp.maps.managed()?.is_empty() {
            agent.keep_fence_renewed()?;
        }
        agent.ensure_tunnel(netdev::scan().ok().as_ref())?;
        Ok(agent)
    }

    /// Takes what the sessions received since the last call: the next tick applies it.
    pub fn receive(&mut self, updates: Vec<Update>) {
        client::fold(&mut self.operator_state, updates);
    }

    /// One round: follow interfaces, apply the plan if it (or the host) changed, refresh metrics.
    pub fn tick(&mut self) {
        // One scan of the node's links and addresses per tick, for every step below (a node has
        // hundreds of pod interfaces).
        let mut scan = netdev::scan();
        if let Ok(s) = &scan
            && self.sync_managed(s)
        {
            // The entries of a gateway need its egress IPs on the node: see them now.
            scan = netdev::scan();
        }
        self.report_conflicts();
        self.report_pinned_flows();
        if let Err(e) = self.ensure_tunnel(scan.as_ref().ok()) {
            tracing::error!(error = %DisplayChain(&e), "tunnel device");
        }
        if let Err(e) = scan
            .as_ref()
            .map_err(scan_failed)
            .and_then(|scan| self.follow_interfaces(scan))
        {
            tracing::error!(error = %DisplayChain(&e), "attaching to pod interfaces");
        }
        if let Ok(scan) = &scan {
            self.check_bypass(scan);
        }
        let now = std::time::Instant::now();
        if self.retry.is_none_or(|(at, _)| now >= at) {
            let applied = scan
                .as_ref()
                .map_err(scan_failed)
                .and_then(|scan| self.apply_plan(&scan.interfaces));
            match applied {
                Ok(()) => self.retry = None,
                Err(e) => {
                    self.apply_errors += 1;
                    let wait = self
                        .retry
                        .map_or(self.opts.interval, |(_, w)| (w * 2).min(Duration::from_secs(30)));
                    self.retry = Some((now + wait, wait));
                    tracing::error!(error = %DisplayChain(&e), retry_in = ?wait, "applying the plan");
                }
            }
        }
        self.restore_kernel_state();
        self.refresh_metrics();
        self.metrics.tick_completed();
    }

    /// Holds exactly the managed egress IPs the operator's plan gives this node (its duties with
    /// `managed`): releases the others first, then claims the new ones (probe, add, announce)
    /// behind the fence. Whether anything was claimed or released. Plan files carry no managed
    /// addresses: only an operator moves them.
    fn sync_managed(&mut self, scan: &netdev::Scan) -> bool {
        let Some(state) = &self.operator_state else {
            return false;
        };
        let mut want: BTreeMap<IpAddr, (String, u32)> = BTreeMap::new();
        let held_in = (state.session, state.generation);
        if let (Some(after), PlanSource::Operator(link)) = (self.opts.release_managed_after, &self.opts.plan)
            && self.released_in_silence.is_none()
            && state.serves.iter().any(|d| d.managed)
            && link.contact.silent_for() > after
        {
            tracing::warn!(silent_for = ?link.contact.silent_for(), "no word from the operator: giving up this node's managed egress IPs (--release-managed-ips-after)");
            self.released_in_silence = Some(held_in);
        }
        if self.released_in_silence.is_some_and(|r| r != held_in) {
            tracing::info!("the operator is back: managed egress IPs as its plan says");
            self.released_in_silence = None;
        }
        let silenced = self.released_in_silence.is_some();
        let mut problems = BTreeSet::new();
        // Looked up once per tick, and only when a duty names no interface.
        let mut default_route: Option<Option<String>> = None;
        // An address another node is still giving up is claimed once the operator says so.
        for duty in state
            .serves
            .iter()
            .filter(|d| d.managed && !d.awaiting_release && !silenced)
        {
            let name = match &duty.interface {
                Some(name) => Some(name.to_string()),
                None => default_route
                    .get_or_insert_with(netdev::default_route_interface)
                    .clone(),
            };
            let Some(name) = name else {
                problems.insert(format!(
                    "policy {}: no interface for its managed egress IPs",
                    duty.policy
                ));
                continue;
            };
            let Some(ifindex) = scan.ifindex(&name) else {
                problems.insert(format!(
                    "policy {}: no interface {name} for its managed egress IPs",
                    duty.policy
                ));
                continue;
            };
            for ip in &duty.egress_ips {
                want.insert(*ip, (name.clone(), ifindex));
            }
        }
        let registered = match self.dp.maps.managed() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %DisplayChain(&e), "reading the managed egress IPs");
                return false;
            }
        };
        let running = |ifindex: u32| scan.link(ifindex).is_some_and(|l| l.running);
        let mut changed = false;
        for (ip, ifindex) in &registered {
            // An address on a link that went down is given up at once: the operator will move
            // it, and when the link comes back the address is claimed again only after a
            // probe finds no other holder (no two nodes answering for it).
            if want.get(ip).map(|w| w.1) == Some(*ifindex) && running(*ifindex) {
                continue;
            }
            match self.addresses.release(*ifindex, *ip) {
                Ok(released) => tracing::info!(%ip, ifindex, ?released, "managed egress IP released"),
                Err(e) => tracing::error!(%ip, error = %e, "releasing a managed egress IP"),
            }
            if let Err(e) = self.dp.maps.remove_managed(*ip) {
                tracing::error!(%ip, error = %DisplayChain(&e), "unregistering a managed egress IP");
            }
            changed = true;
        }
        self.address_conflicts.retain(|ip, _| want.contains_key(ip));
        for (ip, (name, ifindex)) in &want {
            let present = scan
                .interfaces
                .iter()
                .any(|i| i.index == *ifindex && holds(i, *ip));
            if (present && registered.get(ip) == Some(ifindex)) || !running(*ifindex) {
                continue;
            }
            if !self.fenced.contains(ifindex) {
                match self.dp.attach_fence(name, *ifindex) {
                    Ok(()) => {
                        self.fenced.insert(*ifindex);
                    }
                    Err(e) => {
                        // Without the fence a dead shim's node would keep answering for it.
                        problems.insert(format!(
                            "{ip} not claimed: the fence cannot attach: {}",
                            DisplayChain(&e)
                        ));
                        continue;
                    }
                }
            }
            if let Err(e) = self.keep_fence_renewed() {
                problems.insert(format!(
                    "{ip} not claimed: the fence is not renewed: {}",
                    DisplayChain(&e)
                ));
                continue;
            }
            // Registered before the address exists, so that it is fenced from its first moment
            // and a shim killed mid-claim finds it in the map (and gives it up when no longer
            // wanted); unregistered again if it is not claimed.
            if let Err(e) = self.dp.maps.set_managed(*ip, *ifindex) {
                problems.insert(format!("{ip} not claimed: registering it: {}", DisplayChain(&e)));
                continue;
            }
            let claimed = self.addresses.claim(*ifindex, *ip);
            if !matches!(
                claimed,
                Ok(egress_ip::Claimed::Added | egress_ip::Claimed::AlreadyHeld)
            ) && let Err(e) = self.dp.maps.remove_managed(*ip)
            {
                problems.insert(format!("{ip}: unregistering it: {}", DisplayChain(&e)));
            }
            match claimed {
                Ok(egress_ip::Claimed::HeldUnmarked) => {
                    if self
                        .address_conflicts
                        .insert(*ip, "held without Sluice's mark".into())
                        .is_none()
                    {
                        tracing::warn!(%ip, interface = %name, "managed egress IP already on the interface, put there by someone else: left alone");
                    }
                }
                Ok(claimed) => {
                    self.address_conflicts.remove(ip);
                    tracing::info!(%ip, interface = %name, ?claimed, "managed egress IP claimed and announced");
                    changed = true;
                }
                Err(egress_ip::AddressError::Conflict { mac, .. }) => {
                    let who = format!("{mac} answers for it");
                    if self.address_conflicts.insert(*ip, who.clone()).as_ref() != Some(&who) {
                        tracing::warn!(%ip, interface = %name, %mac, "another host answers for the managed egress IP: not claimed");
                    }
                }
                Err(e) => {
                    problems.insert(format!("{ip} on {name} not claimed: {e}"));
                }
            }
        }
        for problem in problems.difference(&self.managed_problems) {
            tracing::error!(%problem, "managed egress IPs");
        }
        self.managed_problems = problems;
        changed
    }

    /// The managed egress IPs of `state`'s duties that no interface holds, with why.
    fn managed_not_held(
        &self,
        state: &NodeState,
        interfaces: &[desired::Interface],
    ) -> BTreeMap<IpAddr, String> {
        let mut out = BTreeMap::new();
        for duty in state.serves.iter().filter(|d| d.managed) {
            for ip in duty.egress_ips.iter().copied() {
                if interfaces.iter().any(|i| holds(i, ip)) {
                    continue;
                }
                let why = if self.released_in_silence.is_some() {
                    "given up: no word from the operator (--release-managed-ips-after)".to_owned()
                } else if duty.awaiting_release {
                    "another node is still giving it up (a planned move)".to_owned()
                } else if let Some(detail) = self.address_conflicts.get(&ip) {
                    format!("not claimed: {detail}")
                } else {
                    "not claimed (yet)".to_owned()
                };
                out.insert(ip, why);
            }
        }
        out
    }

    /// Renews the fence now and, from the first managed egress IP on, from a thread of its own.
    fn keep_fence_renewed(&mut self) -> Result<()> {
        if !self.renewing {
            self.dp.maps.renew_fence(FENCE_HOLD)?;
            renew_fence_forever(&self.opts.bpffs_dir)?;
            self.renewing = true;
        }
        Ok(())
    }

    /// Tells the operator (through the next acknowledgement) which managed addresses this node
    /// did not claim, when that changed without a new plan being applied.
    fn report_conflicts(&self) {
        let (PlanSource::Operator(link), Some(state)) = (&self.opts.plan, &self.operator_state) else {
            return;
        };
        let conflicts = address_conflicts(&self.address_conflicts);
        link.applied.send_if_modified(|a| {
            let changed = a.session == state.session && a.conflicts != conflicts;
            if changed {
                a.conflicts = conflicts;
            }
            changed
        });
    }

    /// While this node's pods have flows pinned to gateways: counts them (every
    /// [`PINNED_FLOWS_EVERY`], and at once when the pinnable gateways change) for the operator,
    /// which ends a pod's lingering entries on a gateway once none is left there. Nothing at
    /// all while nothing is pinnable (the flow map is read only during drains).
    fn report_pinned_flows(&mut self) {
        let (PlanSource::Operator(link), Some(state)) = (&self.opts.plan, &self.operator_state) else {
            return;
        };
        let gateways: BTreeSet<u32> = self.pinnable.keys().copied().collect();
        let counted: Vec<Vec<u8>> = gateways
            .iter()
            .map(|g| sluice_proto::convert::ip_to_wire(maps::from_be(*g).into()))
            .collect();
        let now = std::time::Instant::now();
        let due = counted != self.pinned_report.counted_gateways
            || self
                .pinned_counted_at
                .is_none_or(|at| now.duration_since(at) >= PINNED_FLOWS_EVERY);
        if !due || (gateways.is_empty() && self.pinned_report == PinnedReport::default()) {
            return;
        }
        self.pinned_counted_at = Some(now);
        let counts = if gateways.is_empty() {
            BTreeMap::new()
        } else {
            crate::client::pinned_flows(self.dp.maps.pins(), &gateways, crate::bpf::monotonic_ns())
        };
        let names = self.ids.names();
        let report = PinnedReport {
            pinned_flows: counts
                .into_iter()
                .filter_map(|((pod, policy, gateway), flows)| {
                    Some(sluice_proto::v2::PinnedFlowCount {
                        policy: (*names.get(&policy)?).to_owned(),
                        pod: sluice_proto::convert::ip_to_wire(pod),
                        gateway: sluice_proto::convert::ip_to_wire(maps::from_be(gateway).into()),
                        flows,
                    })
                })
                .collect(),
            counted_gateways: counted,
        };
        if report == self.pinned_report {
            return;
        }
        tracing::debug!(
            pods = report.pinned_flows.len(),
            gateways = report.counted_gateways.len(),
            "pinned flows counted"
        );
        self.pinned_report = report.clone();
        link.applied.send_if_modified(|a| {
            let changed = a.session == state.session
                && (a.pinned_flows != report.pinned_flows || a.counted_gateways != report.counted_gateways);
            if changed {
                a.pinned_flows = report.pinned_flows;
                a.counted_gateways = report.counted_gateways;
            }
            changed
        });
    }

    /// `scan`: this tick's scan (for the tunnel's index and the underlay's MTU), if it succeeded.
    fn ensure_tunnel(&mut self, scan: Option<&netdev::Scan>) -> Result<()> {
        let device = &self.opts.tunnel.device;
        let current = scan.map_or_else(|| netdev::ifindex(device), |s| s.ifindex(device));
        if current.is_some() && current == Some(self.tunnel_ifindex) {
            // The underlay's MTU may change under a running tunnel.
            return self.sync_config(self.tunnel_ifindex, scan);
        }
        let ifindex = netdev::ensure_tunnel(
            &self.opts.tunnel,
            &rp_filter::Record::in_bpffs(&self.opts.bpffs_dir),
        )?;
        let device = self.opts.tunnel.device.clone();
        self.dp.attach(datapath::PROG_FROM_TUNNEL, &device, ifindex)?;
        self.dp.attach(datapath::PROG_TO_TUNNEL, &device, ifindex)?;
        self.sync_config(ifindex, scan)?;
        // The reply route goes with the device it points to: (re)install it with the device.
        nat::ensure_reply_route(self.opts.reply_table, ifindex, &self.opts.marks)?;
        self.tunnel_ifindex = ifindex;
        // Pins of an earlier tunnel device (recreated since) are stale.
        for prog in [datapath::PROG_FROM_TUNNEL, datapath::PROG_TO_TUNNEL] {
            for stale in self
                .dp
                .pinned_ifindexes(prog)
                .into_iter()
                .filter(|i| *i != ifindex)
            {
                self.dp.unpin(prog, stale)?;
            }
        }
        tracing::info!(%device, ifindex, port = self.opts.tunnel.port, "tunnel ready");
        Ok(())
    }

    /// Notices pod interfaces whose traffic never reaches Sluice's program: something attached
    /// ahead of it (a CNI's TCX program that passes or redirects every packet) takes it all, so
    /// Sluice's policies do not apply there. Logged when it starts and stops, and counted in
    /// `sluice_bypassed_interfaces`.
    fn check_bypass(&mut self, scan: &netdev::Scan) {
        fn streak_bypassed(state: Option<&(u64, u64, u32)>) -> bool {
            state.is_some_and(|(_, _, streak)| *streak >= BYPASS_TICKS)
        }
        // Enough traffic in one tick that seeing none of it is no accident.
        const MIN_PACKETS: u64 = 8;
        self.seen.retain(|i, _| self.attached.contains_key(i));
        for (ifindex, name) in &self.attached {
            let rx = scan
                .link(*ifindex)
                .filter(|l| l.name == *name)
                .and_then(|l| l.rx_packets);
            let (Some(rx), Ok(seen)) = (rx, self.dp.maps.seen(*ifindex)) else {
                continue;
            };
            let (prev_rx, prev_seen, streak) = self.seen.get(ifindex).copied().unwrap_or((rx, seen, 0));
            let received = rx.saturating_sub(prev_rx);
            // The two counters are not read at the same instant: packets that arrive between
            // the reads count in one tick's `received` and the tick before's `seen`. So one tick
            // that looks bypassed is no proof; two in a row are (a real bypass lasts).
            let streak = if seen != prev_seen {
                0
            } else if received >= MIN_PACKETS {
                streak.saturating_add(1)
            } else if streak >= BYPASS_TICKS {
                // Quiet: a bypass found stays found.
                streak
            } else {
                0
            };
            let (was, bypassed) = (streak_bypassed(self.seen.get(ifindex)), streak >= BYPASS_TICKS);
            if bypassed && !was {
                tracing::warn!(
                    interface = %name,
                    received,
                    "pod interface bypassed: it receives traffic Sluice's program never sees; a program \
                     attached ahead of Sluice's takes every packet, so egress policies do not apply to its pods"
                );
            } else if was && !bypassed {
                tracing::info!(interface = %name, "pod interface no longer bypassed");
            }
            self.seen.insert(*ifindex, (rx, seen, streak));
        }
    }

    /// Writes the datapath's configuration when it differs from what the map holds.
    fn sync_config(&mut self, tunnel_ifindex: u32, scan: Option<&netdev::Scan>) -> Result<()> {
        let underlay_mtu = scan.and_then(|s| s.mtu_of_address(self.opts.node_ip));
        let config = Config {
            tunnel_ifindex,
            vni: self.opts.tunnel.vni,
            tunnel_ttl: 64,
            tunnel_port: u32::from(self.opts.tunnel.port),
            flags: match self.opts.source_check {
                SourceCheck::Route => 0,
                SourceCheck::Off => maps::CFG_NO_SOURCE_CHECK,
            } | if self.opts.flow_pinning {
                0
            } else {
                maps::CFG_NO_FLOW_PINNING
            },
            tcp_mss_max: underlay_mtu.map_or(0, |mtu| maps::tunnel_mss(mtu, self.opts.node_ip.is_ipv6())),
            mark_egress: self.opts.marks.egress,
            mark_egress_shift: self.opts.marks.shift(),
            mark_tunnel: self.opts.marks.tunnel,
            mark_reply: self.opts.marks.reply,
        };
        if self.dp.maps.config.get(&0, 0).ok() != Some(config) {
            tracing::info!(?underlay_mtu, mss = config.tcp_mss_max, "datapath configuration");
            self.dp
                .maps
                .config
                .set(0, config, 0)
                .map_err(|source| Error::Map {
                    name: maps::CONFIG,
                    action: "writing".into(),
                    source,
                })?;
        }
        Ok(())
    }

    fn follow_interfaces(&mut self, scan: &netdev::Scan) -> Result<()> {
        let live: BTreeMap<u32, String> = scan
            .interfaces
            .iter()
            .filter(|i| netdev::is_pod_interface(&self.opts.pod_interfaces, &i.name))
            .map(|i| (i.index, i.name.clone()))
            .collect();
        let mut first_error = None;
        for (ifindex, name) in &live {
            if self.attached.get(ifindex) == Some(name) {
                continue;
            }
            match self.dp.attach(datapath::PROG_FROM_POD, name, *ifindex) {
                Ok(()) => {
                    tracing::info!(interface = %name, ifindex, "attached");
                    self.attached.insert(*ifindex, name.clone());
                }
                // The interface may have gone between the scan and the attach.
                Err(e) if netdev::ifindex(name) != Some(*ifindex) => {
                    tracing::debug!(interface = %name, error = %e, "interface went away")
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.attached.retain(|i, _| live.contains_key(i));
        // The source check of bridged pod interfaces needs to know their bridge.
        let bridge_ports: BTreeMap<u32, u32> = live
            .keys()
            .filter_map(|ifindex| Some((*ifindex, scan.link(*ifindex)?.master?)))
            .collect();
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.bridge_ports, maps::BRIDGE_PORTS),
            &mut self.bridge_ports,
            &bridge_ports,
        )?;
        for ifindex in self.dp.pinned_ifindexes(datapath::PROG_FROM_POD) {
            if !live.contains_key(&ifindex) {
                self.dp.unpin(datapath::PROG_FROM_POD, ifindex)?;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn apply_plan(&mut self, interfaces: &[desired::Interface]) -> Result<()> {
        // Out of `self` while it is applied (the steps below borrow `self` mutably), and back
        // whatever happens.
        let state = self.operator_state.take();
        let result = self.apply_state(interfaces, state.as_ref());
        self.operator_state = state;
        result
    }

    /// The guard's destinations, IPv4 and IPv6: added to, or (`prune`) made equal to `guard`'s.
    fn sync_guarded(&mut self, guard: &GuardContents, prune: bool) -> Result<()> {
        sync_lpm(
            &mut self.dp.maps.guarded,
            maps::GUARDED_V4,
            &guard.destinations,
            prune,
        )?;
        sync_lpm_v6(
            &mut self.dp.maps.guarded_v6,
            maps::GUARDED_V6,
            &guard.destinations_v6,
            prune,
        )
    }

    fn apply_state(&mut self, interfaces: &[desired::Interface], state: Option<&NodeState>) -> Result<()> {
        let stamp = match &self.opts.plan {
            PlanSource::File(path) => {
                let meta =
                    fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                FileStamp::File(meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len())
            }
            PlanSource::Operator(_) => {
                // Nothing from the operator yet: the pinned maps stay as they are.
                let Some(state) = state else {
                    return Ok(());
                };
                FileStamp::Generation(state.session, state.generation)
            }
        };
        // Pod interfaces come and go all the time and never hold egress IPs: leave them out of
        // what decides whether the plan must be re-evaluated.
        let interfaces: Vec<desired::Interface> = interfaces
            .iter()
            .filter(|i| {
                i.name != self.opts.tunnel.device
                    && !netdev::is_pod_interface(&self.opts.pod_interfaces, &i.name)
            })
            .cloned()
            .collect();
        if let Some((s, i)) = &self.applied
            && *s == stamp
            && *i == interfaces
        {
            return Ok(());
        }
        self.applied = None;

        self.plan_reads += 1;
        // A plan file is read whole; the operator's state is used where it lies.
        let file_entries;
        let (bytes, entries, planned_cluster, guard): (_, Vec<&EgressEntry>, _, _) =
            match (&self.opts.plan, state) {
                (PlanSource::File(path), _) => {
                    let bytes =
                        fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                    file_entries = desired::plan_entries(path, &bytes, &self.opts.node)?;
                    let cluster = plan_file_cluster_cidrs(&bytes, &self.opts.node);
                    let guard = plan_file_guard(&bytes, &self.opts.node);
                    (bytes, file_entries.iter().collect(), cluster, guard)
                }
                (_, Some(state)) => (
                    format!("generation {}", state.generation).into_bytes(),
                    state.entries.values().collect(),
                    state.cluster_cidrs.clone(),
                    state.guard.clone(),
                ),
                (PlanSource::Operator(_), None) => unreachable!("checked above"),
            };
        let host = Host {
            node_ip: self.opts.node_ip,
            managed_not_held: state
                .map(|s| self.managed_not_held(s, &interfaces))
                .unwrap_or_default(),
            interfaces: interfaces.clone(),
            default_route_interface: netdev::default_route_interface(),
        };
        let guarded = guard.as_ref().map(|g| g.destinations.clone()).unwrap_or_default();
        // Gateways still holding the entries of pods that moved away from them: their flows
        // stay, and their replies are taken (see docs/datapath.md, "Pinned flows"). This node
        // itself when its own pods' flows left from here: their egresses stay meanwhile.
        let pinnable: BTreeMap<u32, u32> = match &self.opts.plan {
            PlanSource::File(_) => plan_file_pinnable(&bytes, &self.opts.node),
            PlanSource::Operator(_) => state
                .map(|s| s.pinnable.iter().filter_map(|ip| netdev::v4(*ip)).collect())
                .unwrap_or_default(),
        }
        .into_iter()
        .map(|ip| (maps::be(ip), 1))
        .collect();
        // Flows are pinned over IPv4 only: this node's own address is pinnable when it is IPv4.
        let own = match self.opts.node_ip {
            IpAddr::V4(v4) => Some(maps::be(v4)),
            IpAddr::V6(_) => None,
        };
        let own_flows_pinned = own.is_some_and(|own| pinnable.contains_key(&own));
        self.ids.hold_egresses(own_flows_pinned);
        let mut want = desired::desired(entries.iter().copied(), &guarded, &host, &mut self.ids)?;
        if own_flows_pinned {
            let (snat, routes) = &self.egress_kept;
            want.snat.extend(snat);
            for (id, route) in routes {
                want.egress_routes.entry(*id).or_insert_with(|| route.clone());
            }
        }
        self.egress_kept = (want.snat.clone(), want.egress_routes.clone());
        for ip in pinnable.keys().filter(|ip| Some(**ip) != own) {
            *want.peers.entry(*ip).or_default() |= maps::PEER_GATEWAY;
        }
        for problem in &want.problems {
            tracing::error!(error = %problem, "entry programmed to drop");
        }
        if want.over_ipv6_underlay > 0 {
            tracing::warn!(
                entries = want.over_ipv6_underlay,
                "entries whose gateway has only an IPv6 underlay address are not steered yet (fail closed)"
            );
        }
        let (next, overflow) = Layout::of(&want.policy, &self.layout);
        if !overflow.is_empty() {
            tracing::error!(
                entries = overflow.len(),
                first = %overflow[0].message(),
                "entries programmed to drop"
            );
        }
        want.entry_errors
            .extend(overflow.iter().map(|o| desired::EntryProblem {
                key: EntryKey {
                    source: IpAddr::V4(o.source),
                    destination: IpNet::V4(o.destination),
                },
                message: o.message(),
            }));
        let capacity = self.opts.capacity;
        let fits = self
            .layout
            .fits(&next, capacity.sources, capacity.destinations)
            .and_then(|()| {
                MapFull::check(
                    maps::ENTRIES_V6,
                    held_while_moving(&self.entries_v6, &want.v6),
                    maps::ENTRIES_V6_MAX,
                    "fewer IPv6 entries",
                )
            });
        if let Err(full) = fits {
            // All or nothing: the node keeps the entries it has, and says so per policy.
            tracing::error!(error = %full, "plan refused");
            self.plans_refused += 1;
            let mut named = BTreeSet::new();
            let errors = want
                .policy
                .iter()
                .filter(|(_, t)| named.insert(t.policy_id))
                .map(|(k, _)| desired::EntryProblem {
                    key: EntryKey {
                        source: IpAddr::V4(k.source()),
                        destination: IpNet::V4(k.destination()),
                    },
                    message: full.to_string(),
                })
                .collect::<Vec<_>>();
            // What the refused plan would change fails closed: its guarded destinations are
            // added (never removed here), and the pods whose entries it changes stop counting as
            // decided. They keep the entries they have; only their traffic to a guarded
            // destination they have no entry for is dropped instead of leaving by the normal
            // path (a Drop policy's new CIDR, say, that this node cannot hold).
            let guard = guard_contents(guard.as_ref());
            self.sync_guarded(&guard, false)?;
            let changed = crate::layout::changed_sources(&self.layout.expand(), &want.policy);
            let still_decided: BTreeMap<u32, u32> = self
                .decided
                .iter()
                .filter(|(ip, _)| !changed.contains(&maps::from_be(**ip)))
                .map(|(ip, v)| (*ip, *v))
                .collect();
            sync::reconcile(
                &mut HashStore(&mut self.dp.maps.decided_pods, maps::DECIDED_PODS_V4),
                &mut self.decided,
                &still_decided,
            )?;
            self.write_status(&bytes, Transition::default(), &[Error::PlanRefused(full)])?;
            if let (PlanSource::Operator(link), Some(state)) = (&self.opts.plan, state) {
                link.applied.send_replace(applied(
                    state,
                    &errors,
                    &self.address_conflicts,
                    &self.pinned_report,
                ));
            }
            self.applied = Some((stamp, interfaces));
            return Ok(());
        }

        // 0. The in-cluster set first: an entry of the new plan never catches in-cluster traffic
        //    the plan itself says is in-cluster.
        let cluster_v4 = own_cluster_cidrs(&self.opts, &planned_cluster);
        sync_lpm(&mut self.dp.maps.cluster, maps::CLUSTER_V4, &cluster_v4, true)?;
        let cluster_v6 = own_cluster_cidrs_v6(&self.opts, &planned_cluster);
        sync_lpm_v6(&mut self.dp.maps.cluster_v6, maps::CLUSTER_V6, &cluster_v6, true)?;
        // 1. SNAT rules, egress routing tables and rules for both the old and the new state, so
        //    no entry is ever ahead of its rules; 2. the maps, upserts first; 3. the rules as
        //    wanted.
        let mut union = self.snat.clone();
        union.extend(&want.snat);
        let guard = guard_contents(guard.as_ref());
        let backstop = nat::Backstop {
            pod_interfaces: self.opts.pod_interfaces.clone(),
            guarded: guard.destinations.iter().map(|n| n.trunc()).collect(),
            cluster: cluster_v4.iter().map(|n| n.trunc()).collect(),
            decided: guard.pods.keys().map(|ip| maps::from_be(*ip)).collect(),
            guarded_v6: guard.destinations_v6.iter().map(|n| n.trunc()).collect(),
            cluster_v6: cluster_v6.iter().map(|n| n.trunc()).collect(),
            decided_v6: guard.pods_v6.keys().map(|a| a.bytes.into()).collect(),
        };
        let moving = self.backstop.during_move_to(&backstop);
        self.apply_nft(&union, &moving)?;
        let reply_table = self.opts.reply_table;
        let want_tables: BTreeMap<u32, String> = want
            .egress_routes
            .values()
            .map(|(name, index)| (egress_route::table(reply_table, *index), name.clone()))
            .collect();
        let want_rules: BTreeSet<(u32, u32)> = want
            .egress_routes
            .iter()
            .map(|(id, (_, index))| (*id, egress_route::table(reply_table, *index)))
            .collect();
        let mut tables = self.egress_tables.clone();
        tables.extend(want_tables.clone());
        egress_route::sync_tables(&tables)?;
        let rules: BTreeSet<(u32, u32)> = self.egress_rules.union(&want_rules).copied().collect();
        egress_route::sync_rules(reply_table, &self.opts.marks, &rules, false)?;
        for iface in &want.egress_interfaces {
            rp_filter::loosen(iface, &rp_filter::Record::in_bpffs(&self.opts.bpffs_dir))?;
        }
        // The guard's destinations may only grow before the entries change: a pod the plan
        // has not decided on yet never gets a moment with the normal path.
        self.sync_guarded(&guard, false)?;
        // Pinnable gateways too: a flow never finds its gateway gone in the middle of a change.
        let mut both_pinnable = self.pinnable.clone();
        both_pinnable.extend(pinnable.iter().map(|(k, v)| (*k, *v)));
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.pinnable, maps::PINNABLE_V4),
            &mut self.pinnable,
            &both_pinnable,
        )?;
        // Peers before the entries that need them, and pruned after the entries that did.
        let peers = flags_of_both(&self.peers, &want.peers);
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.peers, maps::TUNNEL_PEERS_V4),
            &mut self.peers,
            &peers,
        )?;
        let peers_v6 = flags_of_both(&self.peers_v6, &want.peers_v6);
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.peers_v6, maps::TUNNEL_PEERS_V6),
            &mut self.peers_v6,
            &peers_v6,
        )?;
        // New groups' destinations before the sources that point to them, the groups no
        // source uses any more after (group ids never change meaning: see `layout`).
        let mut both = self.layout.destinations.clone();
        both.extend(next.destinations.iter().map(|(k, v)| (*k, *v)));
        let added = sync::reconcile(
            &mut DestinationStore(&mut self.dp.maps.destinations),
            &mut self.layout.destinations,
            &both,
        )?;
        let mut slots = self.layout.slots.clone();
        slots.extend(next.slots.iter().map(|(k, v)| (*k, *v)));
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.held_slots, maps::HELD_SLOTS_V4),
            &mut self.layout.slots,
            &slots,
        )?;
        let sources = sync::reconcile(
            &mut HashStore(&mut self.dp.maps.sources, maps::SOURCES_V4),
            &mut self.layout.sources,
            &next.sources,
        )?;
        let pruned = sync::reconcile(
            &mut DestinationStore(&mut self.dp.maps.destinations),
            &mut self.layout.destinations,
            &next.destinations,
        )?;
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.held_slots, maps::HELD_SLOTS_V4),
            &mut self.layout.slots,
            &next.slots,
        )?;
        let t = Transition {
            upserted: added.upserted + sources.upserted + pruned.upserted,
            deleted: added.deleted + sources.deleted + pruned.deleted,
        };
        self.entries = want.policy.len();
        // IPv6: one (pod, prefix) trie whose values hold the whole target.
        let v6 = sync::reconcile(
            &mut EntryStoreV6(&mut self.dp.maps.entries_v6),
            &mut self.entries_v6,
            &want.v6,
        )?;
        let t = Transition {
            upserted: t.upserted + v6.upserted,
            deleted: t.deleted + v6.deleted,
        };
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.peers, maps::TUNNEL_PEERS_V4),
            &mut self.peers,
            &want.peers,
        )?;
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.peers_v6, maps::TUNNEL_PEERS_V6),
            &mut self.peers_v6,
            &want.peers_v6,
        )?;
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.pinnable, maps::PINNABLE_V4),
            &mut self.pinnable,
            &pinnable,
        )?;
        // A pod counts as decided only once its entries (if it is selected) are in place.
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.decided_pods, maps::DECIDED_PODS_V4),
            &mut self.decided,
            &guard.pods,
        )?;
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.decided_pods_v6, maps::DECIDED_PODS_V6),
            &mut self.decided_v6,
            &guard.pods_v6,
        )?;
        self.sync_guarded(&guard, true)?;
        self.map_writes += t.writes();
        let gone: Vec<u32> = self
            .names
            .keys()
            .filter(|id| !want.names.contains_key(id))
            .copied()
            .collect();
        sync::reconcile(
            &mut HashStore(&mut self.dp.maps.names, maps::POLICY_NAMES),
            &mut self.names,
            &want.names,
        )?;
        for id in gone {
            let _ = self.dp.maps.policy_stats.remove(&id);
        }
        self.apply_nft(&want.snat, &backstop)?;
        self.snat = want.snat;
        self.backstop = backstop;
        let gone = egress_route::sync_rules(reply_table, &self.opts.marks, &want_rules, true)?;
        for table in gone.iter().chain(self.egress_tables.keys()) {
            if !want_tables.contains_key(table) {
                egress_route::flush_table(*table);
            }
        }
        self.egress_tables = want_tables;
        self.egress_rules = want_rules;

        tracing::info!(
            entries = self.entries,
            sources = self.layout.sources.len(),
            destinations = self.layout.destinations.len(),
            upserted = t.upserted,
            deleted = t.deleted,
            "plan applied"
        );
        self.write_status(&bytes, t, &want.problems)?;
        if let (PlanSource::Operator(link), Some(state)) = (&self.opts.plan, state) {
            link.applied.send_replace(applied(
                state,
                &want.entry_errors,
                &self.address_conflicts,
                &self.pinned_report,
            ));
        }
        // Entries with problems are re-evaluated when the plan or an interface changes (an
        // egress IP being added, say), not on every tick.
        self.applied = Some((stamp, interfaces));
        Ok(())
    }

    fn apply_nft(&mut self, snat: &nat::Snat, backstop: &nat::Backstop) -> Result<()> {
        self.nft.apply(nat::ruleset(snat, &self.opts.marks, backstop))
    }

    /// Puts back what someone else removed or changed of Sluice's kernel state: the nftables
    /// table, the reply rule and route, the egress rules and the routes of their tables (which
    /// also follow the main table: a changed gateway, say). Only reads when all is in place:
    /// netlink requests, no subprocess. Pruning is the apply's job, not this.
    fn restore_kernel_state(&mut self) {
        let mut restored: Vec<(&'static str, u64)> = Vec::new();
        match self.nft.restore() {
            Ok(true) => restored.push((RESTORED_NFT_TABLE, 1)),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %DisplayChain(&e), "checking the nftables table"),
        }
        if self.tunnel_ifindex != 0 {
            match nat::ensure_reply_route(self.opts.reply_table, self.tunnel_ifindex, &self.opts.marks) {
                Ok(repair) => {
                    restored.push((RESTORED_REPLY_RULE, u64::from(repair.rule)));
                    restored.push((RESTORED_REPLY_ROUTE, u64::from(repair.route)));
                }
                Err(e) => tracing::error!(error = %DisplayChain(&e), "checking the reply rule and route"),
            }
        }
        match egress_route::sync_tables(&self.egress_tables) {
            Ok(synced) => {
                // Routes it had put there itself and that are still wanted: someone removed them.
                let back = synced
                    .added
                    .iter()
                    .map(|(table, added)| {
                        let before = self.egress_routes.get(table);
                        added
                            .iter()
                            .filter(|r| before.is_some_and(|b| b.contains(*r)))
                            .count() as u64
                    })
                    .sum();
                restored.push((RESTORED_EGRESS_ROUTE, back));
                self.egress_routes = synced.holding;
            }
            Err(e) => tracing::error!(error = %DisplayChain(&e), "syncing the egress routing tables"),
        }
        match egress_route::restore_rules(self.opts.reply_table, &self.opts.marks, &self.egress_rules) {
            Ok(added) => restored.push((RESTORED_EGRESS_RULE, added)),
            Err(e) => tracing::error!(error = %DisplayChain(&e), "checking the egress rules"),
        }
        for (kind, count) in restored.into_iter().filter(|(_, n)| *n > 0) {
            tracing::warn!(
                object = kind,
                count,
                "put back Sluice kernel state someone else removed"
            );
            *self.restored.entry(kind).or_default() += count;
        }
    }

    fn write_status(&self, plan: &[u8], t: Transition, problems: &[Error]) -> Result<()> {
        let Some(path) = &self.opts.status_file else {
            return Ok(());
        };
        let status = serde_json::json!({
            "plan": format!("{:016x}", xxhash_rust::xxh3::xxh3_64(plan)),
            "entries": self.entries,
            "sources": self.layout.sources.len(),
            "destinations": self.layout.destinations.len(),
            "entriesV6": self.entries_v6.len(),
            "plansRefused": self.plans_refused,
            "upserted": t.upserted,
            "deleted": t.deleted,
            "mapWrites": self.map_writes,
            "planReads": self.plan_reads,
            "problems": problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        });
        write_atomically(path, status.to_string().as_bytes())
    }

    fn refresh_metrics(&self) {
        let outcomes = self.dp.maps.outcome_counters().unwrap_or_default();
        let policies = self.dp.maps.policy_counters().unwrap_or_default();
        let names: BTreeMap<u32, String> = self.names.iter().map(|(id, n)| (*id, n.as_str())).collect();
        self.metrics.update(|s| {
            s.outcomes = outcomes.into_iter().map(|(_, name, c)| (name, c)).collect();
            s.policies = policies
                .into_iter()
                .map(|(id, c)| (names.get(&id).cloned().unwrap_or_else(|| format!("#{id}")), c))
                .collect();
            s.policy_entries = (self.entries + self.entries_v6.len()) as u64;
            s.source_entries = self.layout.sources.len() as u64;
            s.destination_entries = self.layout.destinations.len() as u64;
            s.source_map_max = u64::from(self.opts.capacity.sources);
            s.policy_map_max = u64::from(self.opts.capacity.destinations);
            s.plans_refused = self.plans_refused;
            s.attached_interfaces = self.attached.len() as u64;
            s.bypassed_interfaces = self
                .seen
                .values()
                .filter(|(_, _, streak)| *streak >= BYPASS_TICKS)
                .count() as u64;
            s.map_writes = self.map_writes;
            s.apply_errors = self.apply_errors;
            s.restored = self.restored.iter().map(|(k, n)| (*k, *n)).collect();
        });
    }
}

/// What the shim tells the operator it applied: the generation, and the entries not programmed
/// as planned.
fn applied(
    state: &NodeState,
    errors: &[desired::EntryProblem],
    conflicts: &BTreeMap<IpAddr, String>,
    pinned: &PinnedReport,
) -> Applied {
    Applied {
        session: state.session,
        generation: state.generation,
        conflicts: address_conflicts(conflicts),
        pinned_flows: pinned.pinned_flows.clone(),
        counted_gateways: pinned.counted_gateways.clone(),
        errors: errors
            .iter()
            .map(|p| sluice_proto::v2::EntryError {
                key: Some((&p.key).into()),
                message: p.message.clone(),
            })
            .collect(),
    }
}

fn address_conflicts(conflicts: &BTreeMap<IpAddr, String>) -> Vec<sluice_proto::v2::AddressConflict> {
    conflicts
        .iter()
        .map(|(ip, detail)| sluice_proto::v2::AddressConflict {
            ip: sluice_proto::convert::ip_to_wire(*ip),
            detail: detail.clone(),
        })
        .collect()
}

/// Whether `interface` holds `ip`.
fn holds(interface: &desired::Interface, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => interface.ipv4.contains(&ip),
        IpAddr::V6(ip) => interface.ipv6.contains(&ip),
    }
}

/// Gives up every managed egress IP this node holds, and forgets them in the fence's map.
fn release_all_managed(maps: &mut Maps) {
    match egress_ip::release_held() {
        Ok(released) => {
            for a in released {
                tracing::warn!(ip = %a.ip, ifindex = a.ifindex, "the fence expired while no shim ran: managed egress IP released");
            }
        }
        Err(e) => tracing::error!(error = %e, "releasing managed egress IPs"),
    }
    for ip in maps.managed().unwrap_or_default().into_keys() {
        if let Err(e) = maps.remove_managed(ip) {
            tracing::error!(%ip, error = %DisplayChain(&e), "unregistering a managed egress IP");
        }
    }
}

/// Removes the status file, if there is one.
fn remove_status(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Writes `path` by renaming a sibling temporary file over it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
}

/// Every key of `held` and `want`, with the flags of both (tunnel peers while a plan is applied).
fn flags_of_both<K: Ord + Copy>(held: &BTreeMap<K, u32>, want: &BTreeMap<K, u32>) -> BTreeMap<K, u32> {
    let mut both = held.clone();
    for (key, flags) in want {
        *both.entry(*key).or_default() |= flags;
    }
    both
}

/// What `sluice_cluster_v4` must hold: `--cluster-cidr`, the node IP (when IPv4), and the IPv4
/// part of the plan's in-cluster set.
fn own_cluster_cidrs(opts: &Options, planned: &[ipnet::IpNet]) -> Vec<Ipv4Net> {
    let mut cidrs = opts.cluster_cidrs.clone();
    if let IpAddr::V4(v4) = opts.node_ip {
        cidrs.push(Ipv4Net::from(v4));
    }
    cidrs.extend(planned.iter().filter_map(|c| match c {
        ipnet::IpNet::V4(v4) => Some(*v4),
        ipnet::IpNet::V6(_) => None,
    }));
    cidrs
}

/// What `sluice_cluster_v6` must hold: the node IP (when IPv6) and the IPv6 part of the plan's
/// in-cluster set.
fn own_cluster_cidrs_v6(opts: &Options, planned: &[ipnet::IpNet]) -> Vec<ipnet::Ipv6Net> {
    let own = match opts.node_ip {
        IpAddr::V6(v6) => Some(ipnet::Ipv6Net::from(v6)),
        IpAddr::V4(_) => None,
    };
    own.into_iter()
        .chain(planned.iter().filter_map(|c| match c {
            ipnet::IpNet::V6(v6) => Some(*v6),
            ipnet::IpNet::V4(_) => None,
        }))
        .collect()
}

/// The no-leak guard of `node`'s section of a plan document (none when it has none).
fn plan_file_guard(bytes: &[u8], node: &str) -> Option<sluice_proto::Guard> {
    serde_json::from_slice::<sluice_proto::PlanDocument>(bytes)
        .ok()
        .and_then(|doc| doc.node(node).and_then(|n| n.guard.clone()))
}

/// The guard as map contents: guarded IPv4 destinations, and decided IPv4 pods (IPv6 is not
/// steered by this datapath yet).
/// What the no-leak guard puts in the maps, per family.
#[derive(Default)]
struct GuardContents {
    destinations: Vec<Ipv4Net>,
    pods: BTreeMap<u32, u32>,
    destinations_v6: Vec<ipnet::Ipv6Net>,
    pods_v6: BTreeMap<maps::AddrV6, u32>,
}

fn guard_contents(guard: Option<&sluice_proto::Guard>) -> GuardContents {
    let mut out = GuardContents::default();
    let Some(g) = guard else {
        return out;
    };
    for d in &g.destinations {
        match d {
            ipnet::IpNet::V4(v4) => out.destinations.push(*v4),
            ipnet::IpNet::V6(v6) => out.destinations_v6.push(*v6),
        }
    }
    for ip in &g.decided_pods {
        match ip {
            IpAddr::V4(v4) => {
                out.pods.insert(maps::be(*v4), 1);
            }
            IpAddr::V6(v6) => {
                out.pods_v6.insert(maps::AddrV6 { bytes: v6.octets() }, 1);
            }
        }
    }
    out
}

/// The gateways a plan file lets this node's flows stay pinned to (IPv4: the datapath pins
/// IPv4 flows only).
fn plan_file_pinnable(bytes: &[u8], node: &str) -> Vec<Ipv4Addr> {
    serde_json::from_slice::<sluice_proto::PlanDocument>(bytes)
        .ok()
        .and_then(|doc| doc.node(node).map(|n| n.pinnable_gateways.clone()))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// The in-cluster set of a plan document (the same in every node's section; this node's is
/// read). The document was checked by [`desired::plan_entries`]: a document that does not parse
/// never gets here.
fn plan_file_cluster_cidrs(bytes: &[u8], node: &str) -> Vec<ipnet::IpNet> {
    serde_json::from_slice::<sluice_proto::PlanDocument>(bytes)
        .ok()
        .and_then(|doc| doc.node(node).map(|n| n.cluster_cidrs.clone()))
        .unwrap_or_default()
}

/// Makes an LPM map of CIDRs (`name`: the in-cluster set, the guarded destinations) hold
/// `cidrs`; with `prune`, only them.
fn sync_lpm(
    map: &mut aya::maps::LpmTrie<MapData, u32, u32>,
    name: &'static str,
    cidrs: &[Ipv4Net],
    prune: bool,
) -> Result<()> {
    let keys: Vec<(u32, u32)> = cidrs
        .iter()
        .map(|c| {
            let c = c.trunc();
            let key = CidrKeyV4 {
                prefixlen: u32::from(c.prefix_len()),
                addr: maps::be(c.network()),
            };
            (key.prefixlen, key.addr)
        })
        .collect();
    sync_lpm_keys(map, name, &keys, prune)
}

/// [`sync_lpm`] for the IPv6 tries.
fn sync_lpm_v6(
    map: &mut aya::maps::LpmTrie<MapData, [u8; 16], u32>,
    name: &'static str,
    cidrs: &[ipnet::Ipv6Net],
    prune: bool,
) -> Result<()> {
    let keys: Vec<(u32, [u8; 16])> = cidrs
        .iter()
        .map(|c| {
            let c = c.trunc();
            (u32::from(c.prefix_len()), c.network().octets())
        })
        .collect();
    sync_lpm_keys(map, name, &keys, prune)
}

/// Makes an LPM trie of prefixes (value 1) hold `keys` (prefix length, data); without `prune`
/// it only adds.
fn sync_lpm_keys<K: aya::Pod + Ord + Copy>(
    map: &mut aya::maps::LpmTrie<MapData, K, u32>,
    name: &'static str,
    keys: &[(u32, K)],
    prune: bool,
) -> Result<()> {
    let mut current = BTreeMap::new();
    for item in map.iter() {
        let (key, value) = item.map_err(|source| Error::Map {
            name,
            action: "reading".into(),
            source,
        })?;
        current.insert((key.prefix_len(), key.data()), value);
    }
    let mut desired: BTreeMap<(u32, K), u32> = keys.iter().map(|k| (*k, 1)).collect();
    if !prune {
        desired.extend(current.iter().map(|(k, v)| (*k, *v)));
    }
    struct LpmStore<'a, K: aya::Pod>(&'a mut aya::maps::LpmTrie<MapData, K, u32>, &'static str);
    impl<K: aya::Pod> Store<(u32, K), u32> for LpmStore<'_, K> {
        type Error = Error;
        fn upsert(&mut self, k: &(u32, K), v: &u32) -> Result<()> {
            self.0
                .insert(&Key::new(k.0, k.1), v, 0)
                .map_err(|source| Error::Map {
                    name: self.1,
                    action: "writing".into(),
                    source,
                })
        }
        fn remove(&mut self, k: &(u32, K)) -> Result<()> {
            ignore_missing(self.0.remove(&Key::new(k.0, k.1)), self.1)
        }
    }
    sync::reconcile(&mut LpmStore(map, name), &mut current, &desired)?;
    Ok(())
}

/// The IPv6 entries trie as a [`Store`].
struct EntryStoreV6<'a>(&'a mut aya::maps::LpmTrie<MapData, maps::EntryAddrsV6, maps::EntryV6>);

impl Store<maps::EntryKeyV6, maps::EntryV6> for EntryStoreV6<'_> {
    type Error = Error;
    fn upsert(&mut self, key: &maps::EntryKeyV6, value: &maps::EntryV6) -> Result<()> {
        self.0.insert(&key.lpm(), value, 0).map_err(|source| Error::Map {
            name: maps::ENTRIES_V6,
            action: "writing".into(),
            source,
        })
    }
    fn remove(&mut self, key: &maps::EntryKeyV6) -> Result<()> {
        ignore_missing(self.0.remove(&key.lpm()), maps::ENTRIES_V6)
    }
}

/// A hash map (policy names, tunnel peers, bridge ports, ...) as a [`Store`].
struct HashStore<'a, K: aya::Pod, V: aya::Pod>(&'a mut aya::maps::HashMap<MapData, K, V>, &'static str);

impl<K: aya::Pod, V: aya::Pod> Store<K, V> for HashStore<'_, K, V> {
    type Error = Error;
    fn upsert(&mut self, key: &K, value: &V) -> Result<()> {
        self.0.insert(key, value, 0).map_err(|source| Error::Map {
            name: self.1,
            action: "writing".into(),
            source,
        })
    }
    fn remove(&mut self, key: &K) -> Result<()> {
        ignore_missing(self.0.remove(key), self.1)
    }
}

/// The contents of a `u32`-keyed hash map, to adopt at start.
fn read_hash<K: aya::Pod + Ord, V: aya::Pod + Clone>(
    map: &aya::maps::HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>> {
    map.iter()
        .map(|item| {
            item.map_err(|source| Error::Map {
                name,
                action: "reading".into(),
                source,
            })
        })
        .collect()
}

/// This tick's failed scan, for each step that needed it.
fn scan_failed(e: &Error) -> Error {
    Error::io(
        "listing interfaces",
        std::io::Error::other(DisplayChain(e).to_string()),
    )
}

/// Displays an error with its chain of causes.
pub struct DisplayChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}
