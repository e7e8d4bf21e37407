//! Loading the eBPF object, pinning its maps and links in bpffs, and attaching its programs.
//!
//! Pin layout under the bpffs directory (default `/sys/fs/bpf/sluice`):
//! - `<map name>`: every map (libbpf "pin by name"); a restarted shim adopts them as they are;
//! - `progs/<program>`: the programs of the running shim (for inspection);
//! - `links/<program>-<ifindex>`: one TCX link per attached interface. A restarted shim updates
//!   each pinned link to its freshly loaded program in one `bpf_link_update`, so there is never a
//!   moment without a program, and while the shim is down the old program keeps running.
//!
//! The fence of managed egress IPs ([`PROG_FENCE`], [`Maps::renew_fence`]) relies on that last
//! point: its deadline and addresses are pinned maps and its link a pinned link, so a shim that
//! dies leaves behind a datapath that lets go of the addresses by itself once the deadline passes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};

use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkLayerType, LinkMessage},
};

use crate::{
    error::{Error, Result, is_permission_error},
    layout::Layout,
    maps::{
        self, Config, Counter, DestinationAddrsV4, DestinationKeyV4, DestinationV4, EntryValueV4, Managed,
        PolicyName, ReplyV4, SlotKeyV4, SourceV4,
    },
};

/// The compiled datapath (`ebpf/sluice.bpf.c`, built by `build.rs`).
pub const OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice.bpf.o"));

/// TC ingress on the host side of pod interfaces.
pub const PROG_FROM_POD: &str = "sluice_from_pod";
/// TC ingress on the tunnel device.
pub const PROG_FROM_TUNNEL: &str = "sluice_from_tunnel";
/// TC egress on the tunnel device.
pub const PROG_TO_TUNNEL: &str = "sluice_to_tunnel";
/// TC egress on the Ethernet interfaces holding managed egress IPs: the fence.
pub const PROG_FENCE: &str = "sluice_fence";

/// Default bpffs directory.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/sluice";

/// Oldest kernel supported: TCX links (6.6).
const MIN_KERNEL: (u32, u32) = (6, 6);
const MIN_KERNEL_TEXT: &str = "6.6";

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The typed maps of the datapath, whether freshly loaded or opened from their pins.
pub struct Maps {
    /// Pod IP (network byte order) -> source group and targets.
    pub sources: HashMap<MapData, u32, SourceV4>,
    /// (source group, destination prefix) -> target index, excluded or drop.
    pub destinations: LpmTrie<MapData, DestinationAddrsV4, DestinationV4>,
    /// (policy id, gateway slot) -> the gateway filling it.
    pub held_slots: HashMap<MapData, SlotKeyV4, u32>,
    pub cluster: LpmTrie<MapData, u32, u32>,
    pub config: Array<MapData, Config>,
    pub counters: PerCpuArray<MapData, Counter>,
    pub policy_stats: PerCpuHashMap<MapData, u32, Counter>,
    pub reply: HashMap<MapData, u32, ReplyV4>,
    pub names: HashMap<MapData, u32, PolicyName>,
    /// Underlay IP (network byte order) -> `maps::PEER_*`.
    pub peers: HashMap<MapData, u32, u32>,
    /// Pod interface ifindex -> its bridge's ifindex.
    pub bridge_ports: HashMap<MapData, u32, u32>,
    /// Packets `sluice_from_pod` saw, by ifindex modulo `maps::SEEN_SLOTS`.
    pub seen: PerCpuArray<MapData, u64>,
    /// The no-leak guard: guarded destinations, and the pods the plan decided on.
    pub guarded: LpmTrie<MapData, u32, u32>,
    pub decided_pods: HashMap<MapData, u32, u32>,
    /// Underlay address of a peer over an IPv6 underlay -> `maps::PEER_*`.
    pub peers_v6: HashMap<MapData, maps::AddrV6, u32>,
    /// IPv6: (pod, destination) -> the whole target; in-cluster CIDRs; the guard.
    pub entries_v6: LpmTrie<MapData, maps::EntryAddrsV6, maps::EntryV6>,
    pub cluster_v6: LpmTrie<MapData, [u8; 16], u32>,
    pub guarded_v6: LpmTrie<MapData, [u8; 16], u32>,
    pub decided_pods_v6: HashMap<MapData, maps::AddrV6, u32>,
    /// Managed egress IP (network byte order) -> the interface it was put on.
    pub managed: HashMap<MapData, u32, Managed>,
    pub managed_v6: HashMap<MapData, maps::AddrV6, Managed>,
    /// Index 0: the fence's deadline, ns of CLOCK_MONOTONIC; 0 = never armed.
    pub fence_deadline: Array<MapData, u64>,
    /// Pinned flows (written by the datapath; the shim only reads them).
    pub flows: HashMap<MapData, maps::FlowKeyV4, maps::FlowV4>,
    pub flows_v6: HashMap<MapData, maps::FlowKeyV6, maps::FlowV4>,
    /// The gateways a flow may stay pinned to (underlay IP, network byte order -> 1).
    pub pinnable: HashMap<MapData, u32, u32>,
}

/// A pinned flow as [`Maps::pins`] reads it: the pod's address, the protocol, the pin.
pub type Pin = (IpAddr, u8, maps::FlowV4);

fn map_err<'a>(name: &'static str, action: &'a str) -> impl FnOnce(aya::maps::MapError) -> Error + 'a {
    move |source| {
        if is_permission_error(&source) {
            Error::NoBpfPermission {
                action: format!("{action} map {name}"),
                source: Box::new(source),
            }
        } else {
            Error::Map {
                name,
                action: action.to_owned(),
                source,
            }
        }
    }
}

impl Maps {
    /// Opens the maps pinned under `dir` (for `sluice-shim bpf ...`).
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        check_bpffs(dir)?;
        fn open(dir: &Path, name: &'static str) -> Result<Map> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|e| match e {
                aya::maps::MapError::SyscallError(ref s)
                    if s.io_error.kind() == std::io::ErrorKind::NotFound =>
                {
                    Error::Map {
                        name,
                        action: format!(
                            "opening {} (is `sluice-shim run` running on this node?)",
                            path.display()
                        ),
                        source: e,
                    }
                }
                e => map_err(name, "opening pinned")(e),
            })?;
            Map::from_map_data(data).map_err(map_err(name, "opening pinned"))
        }
        Self::from_maps(|name| open(dir, name))
    }

    fn from_maps(mut take: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        macro_rules! typed {
            ($name:expr) => {
                take($name)?
                    .try_into()
                    .map_err(map_err($name, "checking the layout of"))?
            };
        }
        Ok(Maps {
            sources: typed!(maps::SOURCES_V4),
            destinations: typed!(maps::DESTINATIONS_V4),
            held_slots: typed!(maps::HELD_SLOTS_V4),
            cluster: typed!(maps::CLUSTER_V4),
            config: typed!(maps::CONFIG),
            counters: typed!(maps::COUNTERS),
            policy_stats: typed!(maps::POLICY_STATS),
            reply: typed!(maps::REPLY_V4),
            names: typed!(maps::POLICY_NAMES),
            peers: typed!(maps::TUNNEL_PEERS_V4),
            bridge_ports: typed!(maps::BRIDGE_PORTS),
            seen: typed!(maps::SEEN),
            guarded: typed!(maps::GUARDED_V4),
            decided_pods: typed!(maps::DECIDED_PODS_V4),
            peers_v6: typed!(maps::TUNNEL_PEERS_V6),
            entries_v6: typed!(maps::ENTRIES_V6),
            cluster_v6: typed!(maps::CLUSTER_V6),
            guarded_v6: typed!(maps::GUARDED_V6),
            decided_pods_v6: typed!(maps::DECIDED_PODS_V6),
            managed: typed!(maps::MANAGED_V4),
            managed_v6: typed!(maps::MANAGED_V6),
            fence_deadline: typed!(maps::FENCE_DEADLINE),
            flows: typed!(maps::FLOWS_V4),
            flows_v6: typed!(maps::FLOWS_V6),
            pinnable: typed!(maps::PINNABLE_V4),
        })
    }

    /// Every pinned flow of both families (an unreadable one skipped).
    pub fn pins(&self) -> impl Iterator<Item = Pin> + '_ {
        let v4 = self
            .flows
            .iter()
            .filter_map(|f| f.ok())
            .map(|(k, v)| (IpAddr::V4(maps::from_be(k.saddr)), k.protocol, v));
        let v6 = self
            .flows_v6
            .iter()
            .filter_map(|f| f.ok())
            .map(|(k, v)| (IpAddr::V6(k.saddr.into()), k.protocol, v));
        v4.chain(v6)
    }

    /// Registers `ip`, put on interface `ifindex`, as a managed egress IP: the fence drops what
    /// this node sends from it (and, for IPv6, its advertisements of it) once the deadline has
    /// passed.
    pub fn set_managed(&mut self, ip: IpAddr, ifindex: u32) -> Result<()> {
        let value = Managed { ifindex, _pad: 0 };
        match ip {
            IpAddr::V4(ip) => self
                .managed
                .insert(maps::be(ip), value, 0)
                .map_err(map_err(maps::MANAGED_V4, "writing")),
            IpAddr::V6(ip) => self
                .managed_v6
                .insert(maps::AddrV6::from(ip), value, 0)
                .map_err(map_err(maps::MANAGED_V6, "writing")),
        }
    }

    /// Forgets managed egress IP `ip` (one not registered is fine): the fence no longer touches it.
    pub fn remove_managed(&mut self, ip: IpAddr) -> Result<()> {
        match ip {
            IpAddr::V4(ip) => ignore_missing(self.managed.remove(&maps::be(ip)), maps::MANAGED_V4),
            IpAddr::V6(ip) => {
                ignore_missing(self.managed_v6.remove(&maps::AddrV6::from(ip)), maps::MANAGED_V6)
            }
        }
    }

    /// The managed egress IPs of both families, each with the interface it was put on.
    pub fn managed(&self) -> Result<BTreeMap<IpAddr, u32>> {
        let mut out = BTreeMap::new();
        for item in self.managed.iter() {
            let (ip, value) = item.map_err(map_err(maps::MANAGED_V4, "reading"))?;
            out.insert(IpAddr::V4(maps::from_be(ip)), value.ifindex);
        }
        for item in self.managed_v6.iter() {
            let (ip, value) = item.map_err(map_err(maps::MANAGED_V6, "reading"))?;
            out.insert(IpAddr::V6(ip.bytes.into()), value.ifindex);
        }
        Ok(out)
    }

    /// Moves the fence's deadline to `from_now` after now: until then the node keeps answering
    /// for and sending from its managed egress IPs.
    pub fn renew_fence(&mut self, from_now: Duration) -> Result<()> {
        // Never 0, which would disarm the fence instead of arming it.
        let deadline = deadline_ns(monotonic_now()?, from_now).max(1);
        self.fence_deadline
            .set(0, deadline, 0)
            .map_err(map_err(maps::FENCE_DEADLINE, "writing"))
    }

    /// Disarms the fence (deadline 0): for a node that holds no managed egress IP any more.
    pub fn disarm_fence(&mut self) -> Result<()> {
        self.fence_deadline
            .set(0, 0, 0)
            .map_err(map_err(maps::FENCE_DEADLINE, "writing"))
    }

    /// Whether the fence is armed and its deadline has passed: the datapath is dropping this
    /// node's ARP for and packets from its managed egress IPs.
    pub fn fence_expired(&self) -> Result<bool> {
        let deadline = self
            .fence_deadline
            .get(&0, 0)
            .map_err(map_err(maps::FENCE_DEADLINE, "reading"))?;
        Ok(expired(deadline, monotonic_now()?))
    }

    /// Packets `sluice_from_pod` saw on interface `ifindex` (shared with the interfaces whose
    /// index is the same modulo `maps::SEEN_SLOTS`).
    pub fn seen(&self, ifindex: u32) -> Result<u64> {
        let per_cpu = self
            .seen
            .get(&(ifindex % maps::SEEN_SLOTS), 0)
            .map_err(map_err(maps::SEEN, "reading"))?;
        Ok(per_cpu.iter().sum())
    }

    /// Sums the per-CPU outcome counters, by counter index.
    pub fn outcome_counters(&self) -> Result<Vec<(u32, &'static str, Counter)>> {
        let mut out = Vec::with_capacity(maps::COUNTER_NAMES.len());
        for (index, name) in maps::COUNTER_NAMES {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(map_err(maps::COUNTERS, "reading"))?;
            out.push((index, name, sum(values.iter())));
        }
        Ok(out)
    }

    /// Sums the per-CPU policy counters, by policy id.
    pub fn policy_counters(&self) -> Result<Vec<(u32, Counter)>> {
        let mut out = Vec::new();
        for item in self.policy_stats.iter() {
            let (id, values) = item.map_err(map_err(maps::POLICY_STATS, "reading"))?;
            out.push((id, sum(values.iter())));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// The policy names, by id.
    pub fn policy_names(&self) -> Result<std::collections::BTreeMap<u32, String>> {
        let mut out = std::collections::BTreeMap::new();
        for item in self.names.iter() {
            let (id, name) = item.map_err(map_err(maps::POLICY_NAMES, "reading"))?;
            out.insert(id, name.as_str());
        }
        Ok(out)
    }

    /// What the sources and destinations maps hold.
    pub fn layout(&self) -> Result<Layout> {
        let mut out = Layout::default();
        for item in self.sources.iter() {
            let (ip, source) = item.map_err(map_err(maps::SOURCES_V4, "reading"))?;
            out.sources.insert(ip, source);
        }
        for item in self.destinations.iter() {
            let (key, rule) = item.map_err(map_err(maps::DESTINATIONS_V4, "reading"))?;
            out.destinations.insert(DestinationKeyV4::from_lpm(&key), rule);
        }
        for item in self.held_slots.iter() {
            let (key, gateway) = item.map_err(map_err(maps::HELD_SLOTS_V4, "reading"))?;
            out.slots.insert(key, gateway);
        }
        Ok(out)
    }

    /// Every entry, (source, destination) -> target, expanded from the sources and
    /// destinations maps.
    pub fn policy_entries(&self) -> Result<Vec<(maps::PolicyKeyV4, EntryValueV4)>> {
        let mut out: Vec<_> = self.layout()?.expand().into_iter().collect();
        out.sort_by_key(|(k, _)| (u32::from_be(k.saddr), u32::from_be(k.daddr), k.prefixlen));
        Ok(out)
    }

    /// Every IPv6 entry, (source, destination) -> target.
    pub fn policy_entries_v6(&self) -> Result<Vec<(maps::EntryKeyV6, maps::EntryV6)>> {
        let mut out = Vec::new();
        for item in self.entries_v6.iter() {
            let (key, value) = item.map_err(map_err(maps::ENTRIES_V6, "reading"))?;
            out.push((maps::EntryKeyV6::from_lpm(&key), value));
        }
        out.sort_by_key(|(k, _)| (k.saddr, k.daddr, k.prefixlen));
        Ok(out)
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a Counter>) -> Counter {
    values.fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

/// The loaded datapath: programs ready to attach, maps pinned.
pub struct Datapath {
    ebpf: Ebpf,
    links_dir: PathBuf,
    /// The typed maps.
    pub maps: Maps,
}

impl Datapath {
    /// Loads the object, adopting the maps already pinned under `dir` (creating them otherwise).
    pub fn load(dir: &Path, capacity: Capacity) -> Result<Self> {
        check_kernel()?;
        check_bpffs(dir)?;
        let links_dir = dir.join("links");
        fs::create_dir_all(&links_dir).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                Error::NoBpfPermission {
                    action: format!("creating {}", links_dir.display()),
                    source: Box::new(e),
                }
            } else {
                Error::io(format!("creating {}", links_dir.display()), e)
            }
        })?;

        replace_stale_layouts(dir);
        let legacy = take_legacy_entries(dir);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .map_max_entries(maps::DESTINATIONS_V4, capacity.destinations)
            .map_max_entries(maps::SOURCES_V4, capacity.sources)
            .map_max_entries(maps::FLOWS_V4, capacity.flows)
            .map_max_entries(maps::FLOWS_V6, capacity.flows)
            .load(OBJECT)
            .map_err(|e| {
                if is_permission_error(&e) {
                    Error::NoBpfPermission {
                        action: "loading the datapath".into(),
                        source: Box::new(e),
                    }
                } else {
                    Error::Load(e)
                }
            })?;
        let progs_dir = dir.join("progs");
        fs::create_dir_all(&progs_dir)
            .map_err(|e| Error::io(format!("creating {}", progs_dir.display()), e))?;
        for name in [PROG_FROM_POD, PROG_FROM_TUNNEL, PROG_TO_TUNNEL, PROG_FENCE] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| prog_err(name, "loading (verifier)", source))?;
            // Pinned for inspection (`bpftool prog show pinned ...`); the links keep the programs
            // they run alive on their own, so replacing this pin never disturbs traffic.
            let pin = progs_dir.join(name);
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", pin.display()), e)),
            }
            prog.pin(&pin).map_err(|e| Error::Pin {
                path: pin.clone(),
                source: Box::new(e),
            })?;
        }
        let maps = Maps::from_maps(|name| {
            ebpf.take_map(name).ok_or_else(|| Error::Map {
                name,
                action: "taking from the object".into(),
                source: aya::maps::MapError::InvalidName { name: name.into() },
            })
        })?;
        let mut maps = maps;
        if let Some(entries) = legacy {
            migrate(&mut maps, &entries)?;
        }
        for (held, name, wanted) in [
            (
                maps.destinations.map().info(),
                maps::DESTINATIONS_V4,
                capacity.destinations,
            ),
            (maps.sources.map().info(), maps::SOURCES_V4, capacity.sources),
        ] {
            if held.as_ref().map(|i| i.max_entries()).ok() != Some(wanted) {
                tracing::warn!(
                    map = name,
                    wanted,
                    held = held.map(|i| i.max_entries()).ok(),
                    "the pinned map has another capacity; it is kept to keep live connections \
                     (remove {} to resize)",
                    dir.join(name).display()
                );
            }
        }
        Ok(Datapath {
            ebpf,
            links_dir,
            maps,
        })
    }

    /// Attaches program `name` to interface (`ifname`, `ifindex`), or, when a link is already
    /// pinned for it, atomically swaps that link's program for this one.
    pub fn attach(&mut self, name: &'static str, ifname: &str, ifindex: u32) -> Result<()> {
        let attach_type = if name == PROG_TO_TUNNEL || name == PROG_FENCE {
            TcAttachType::Egress
        } else {
            TcAttachType::Ingress
        };
        let pin = self.links_dir.join(format!("{name}-{ifindex}"));
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let id = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| Error::Pin {
                    path: pin.clone(),
                    source: Box::new(e),
                })?;
                prog.attach_to_link(link)
                    .map_err(|source| prog_err(name, &format!("updating the link on {ifname}"), source))?
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                let id = prog
                    .attach_with_options(
                        ifname,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|source| prog_err(name, &format!("attaching to {ifname}"), source))?;
                let link = prog
                    .take_link(id)
                    .map_err(|source| prog_err(name, "taking the link", source))?;
                let fd = FdLink::try_from(link).map_err(|e| Error::Pin {
                    path: pin.clone(),
                    source: Box::new(e),
                })?;
                fd.pin(&pin).map_err(|e| Error::Pin {
                    path: pin.clone(),
                    source: Box::new(e),
                })?;
                return Ok(());
            }
            Err(e) => {
                return Err(Error::Pin {
                    path: pin,
                    source: Box::new(e),
                });
            }
        };
        // The pin keeps the link; let go of our handle without detaching.
        let link = prog
            .take_link(id)
            .map_err(|source| prog_err(name, "taking the link", source))?;
        drop(FdLink::try_from(link).map_err(|e| Error::Pin {
            path: pin,
            source: Box::new(e),
        })?);
        Ok(())
    }

    /// Attaches the fence to Ethernet interface (`ifname`, `ifindex`) (or swaps the program of
    /// its pinned link): the link stays after the shim is gone, as the fence must.
    pub fn attach_fence(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        // The program parses Ethernet frames: on another link type it would read garbage.
        let link_type = link_layer_type(ifindex)?;
        if link_type != LinkLayerType::Ether {
            return Err(Error::io(
                format!("attaching {PROG_FENCE} to {ifname}"),
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    format!(
                        "{ifname} (index {ifindex}) is not an Ethernet device ({link_type:?}): \
                         managed egress IPs are announced with ARP and neighbour \
                         advertisements, which need Ethernet"
                    ),
                ),
            ));
        }
        self.attach(PROG_FENCE, ifname, ifindex)
    }

    /// Detaches the fence from interface `ifindex` (by dropping its pinned link).
    pub fn detach_fence(&self, ifindex: u32) -> Result<()> {
        self.unpin(PROG_FENCE, ifindex)
    }

    /// The interfaces that have a pinned link of program `name`.
    pub fn pinned_ifindexes(&self, name: &str) -> BTreeSet<u32> {
        pinned_ifindexes(&self.links_dir, name)
    }

    /// Drops the pinned link of `name` on `ifindex` (the interface is gone or no longer matches).
    pub fn unpin(&self, name: &str, ifindex: u32) -> Result<()> {
        let pin = self.links_dir.join(format!("{name}-{ifindex}"));
        match fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", pin.display()), e)),
        }
    }
}

/// Now on CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns()`. (A time namespace's monotonic
/// offset would shift it from the kernel's: Kubernetes creates none.)
pub fn monotonic_now() -> Result<Duration> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_err(|e| Error::io("reading CLOCK_MONOTONIC", e.into()))?;
    Ok(Duration::from(now))
}

/// The deadline `from_now` after `now`, in ns as the map holds it.
fn deadline_ns(now: Duration, from_now: Duration) -> u64 {
    u64::try_from(now.saturating_add(from_now).as_nanos()).unwrap_or(u64::MAX)
}

/// The datapath's test: armed (non-zero) and `now` past it.
fn expired(deadline: u64, now: Duration) -> bool {
    deadline != 0 && u128::from(deadline) < now.as_nanos()
}

/// The link-layer type of interface `ifindex`.
fn link_layer_type(ifindex: u32) -> Result<LinkLayerType> {
    let mut nl =
        crate::netlink::Netlink::route().map_err(|e| Error::io("opening a route netlink socket", e))?;
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    let answers = nl
        .request(RouteNetlinkMessage::GetLink(request), 0)
        .map_err(|e| Error::io(format!("reading link {ifindex}"), e))?;
    answers
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l.header.link_layer_type),
            _ => None,
        })
        .ok_or_else(|| {
            Error::io(
                format!("reading link {ifindex}"),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such link"),
            )
        })
}

/// Unpins every pinned map whose key or value size is not this build's (an upgrade changed its
/// layout), so that the loader creates it anew instead of refusing to start. Its contents are
/// rewritten from the plan on the first apply; the old map lives on only as long as the programs
/// of the previous shim still use it.
fn replace_stale_layouts(dir: &Path) {
    for (name, key, value) in maps::layouts() {
        let pin = dir.join(name);
        let Ok(info) = MapData::from_pin(&pin).and_then(|m| m.info()) else {
            continue;
        };
        let held = (info.key_size() as usize, info.value_size() as usize);
        // Outcome counters index by position: a smaller array would drop the new ones.
        let too_small = name == maps::COUNTERS && info.max_entries() < maps::COUNTERS_MAX;
        if held == (key, value) && !too_small {
            continue;
        }
        tracing::warn!(
            map = name,
            pinned = ?held,
            wanted = ?(key, value),
            "a pinned map has an older layout (key, value sizes): replacing it with a new one"
        );
        if let Err(e) = fs::remove_file(&pin) {
            tracing::error!(map = name, error = %e, "could not unpin the map of the older layout");
        }
    }
}

/// How many entries the sources and destinations maps hold at most (fixed when they are
/// created; a pinned map keeps its capacity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub sources: u32,
    pub destinations: u32,
    /// Pinned flows (an LRU: the least recently used flow goes when it is full).
    pub flows: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            sources: maps::DEFAULT_SOURCE_MAP_MAX,
            destinations: maps::DEFAULT_POLICY_MAP_MAX,
            flows: maps::DEFAULT_FLOW_MAP_MAX,
        }
    }
}

/// The map of entries before they were split into sources and destinations (one LPM trie keyed
/// by (source, destination prefix)).
pub const LEGACY_POLICY_V4: &str = "sluice_policy_v4";

/// The data part of the legacy map's key (public for the upgrade test, which pins one).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct LegacyAddrsV4 {
    pub saddr: u32,
    pub daddr: u32,
}

#[allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe marker trait; plain data without padding"
)]
unsafe impl aya::Pod for LegacyAddrsV4 {}

/// Reads and unpins the legacy entries map left by an older shim, so that the new maps start
/// with what it held: the programs are swapped only after that, so an upgrade never has a
/// moment without entries. The old map lives on while the old programs still use it.
fn take_legacy_entries(dir: &Path) -> Option<std::collections::BTreeMap<maps::PolicyKeyV4, EntryValueV4>> {
    let pin = dir.join(LEGACY_POLICY_V4);
    let data = MapData::from_pin(&pin).ok()?;
    let read = || -> std::result::Result<_, aya::maps::MapError> {
        let trie: LpmTrie<MapData, LegacyAddrsV4, EntryValueV4> = Map::from_map_data(data)?.try_into()?;
        let mut out = std::collections::BTreeMap::new();
        for item in trie.iter() {
            let (key, value) = item?;
            let k = key.data();
            out.insert(
                maps::PolicyKeyV4 {
                    prefixlen: key.prefix_len(),
                    saddr: k.saddr,
                    daddr: k.daddr,
                },
                value,
            );
        }
        Ok(out)
    };
    let entries = read()
        .map_err(|e| tracing::warn!(error = %e, "could not read the entries of the older shim"))
        .ok();
    if let Err(e) = fs::remove_file(&pin) {
        tracing::error!(error = %e, "could not unpin the entries map of the older shim");
    }
    entries
}

/// Writes the legacy entries into the new maps, unless they already hold entries.
fn migrate(
    maps: &mut Maps,
    entries: &std::collections::BTreeMap<maps::PolicyKeyV4, EntryValueV4>,
) -> Result<()> {
    let current = maps.layout()?;
    if !current.sources.is_empty() {
        return Ok(());
    }
    let (layout, _) = Layout::of(entries, &current);
    let mut destinations = current.destinations.clone();
    crate::sync::reconcile(
        &mut DestinationStore(&mut maps.destinations),
        &mut destinations,
        &layout.destinations,
    )?;
    for (key, gateway) in &layout.slots {
        maps.held_slots
            .insert(key, gateway, 0)
            .map_err(map_err(maps::HELD_SLOTS_V4, "writing"))?;
    }
    for (ip, source) in &layout.sources {
        maps.sources
            .insert(ip, source, 0)
            .map_err(map_err(maps::SOURCES_V4, "writing"))?;
    }
    tracing::info!(
        entries = entries.len(),
        sources = layout.sources.len(),
        destinations = layout.destinations.len(),
        "moved the entries of the older shim into the sources and destinations maps"
    );
    Ok(())
}

/// The destinations map as a [`crate::sync::Store`].
pub struct DestinationStore<'a>(pub &'a mut LpmTrie<MapData, DestinationAddrsV4, DestinationV4>);

impl crate::sync::Store<DestinationKeyV4, DestinationV4> for DestinationStore<'_> {
    type Error = Error;
    fn upsert(&mut self, key: &DestinationKeyV4, value: &DestinationV4) -> Result<()> {
        self.0.insert(&key.lpm(), value, 0).map_err(|source| Error::Map {
            name: maps::DESTINATIONS_V4,
            action: format!("writing group {} -> {}", key.group, key.destination()),
            source,
        })
    }
    fn remove(&mut self, key: &DestinationKeyV4) -> Result<()> {
        ignore_missing(self.0.remove(&key.lpm()), maps::DESTINATIONS_V4)
    }
}

/// A deletion of a key that is already gone is fine.
pub fn ignore_missing(r: Result<(), aya::maps::MapError>, name: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(source) => Err(Error::Map {
            name,
            action: "deleting".into(),
            source,
        }),
    }
}

fn pinned_ifindexes(links_dir: &Path, name: &str) -> BTreeSet<u32> {
    let prefix = format!("{name}-");
    fs::read_dir(links_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok())
        .collect()
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or_else(|| prog_err(name, "finding", aya::programs::ProgramError::NotLoaded))?
        .try_into()
        .map_err(|source| prog_err(name, "checking the type of", source))
}

fn prog_err(name: &'static str, action: &str, source: aya::programs::ProgramError) -> Error {
    if is_permission_error(&source) {
        Error::NoBpfPermission {
            action: format!("{action} program {name}"),
            source: Box::new(source),
        }
    } else {
        Error::Program {
            name,
            action: action.to_owned(),
            source,
        }
    }
}

/// Fails with [`Error::KernelTooOld`] below [`MIN_KERNEL`].
pub fn check_kernel() -> Result<()> {
    let release = nix::sys::utsname::uname()
        .map_err(|e| Error::io("uname", e.into()))?
        .release()
        .to_string_lossy()
        .into_owned();
    check_kernel_release(&release)
}

fn check_kernel_release(release: &str) -> Result<()> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if (major, minor) < MIN_KERNEL {
        return Err(Error::KernelTooOld {
            found: release.to_owned(),
            required: MIN_KERNEL_TEXT,
        });
    }
    Ok(())
}

/// Fails with [`Error::BpffsNotMounted`] unless `dir` (or, if it does not exist yet, its nearest
/// existing ancestor) is on a bpffs.
pub fn check_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir;
    while !probe.exists() {
        probe = match probe.parent() {
            Some(p) => p,
            None => break,
        };
    }
    let fs = nix::sys::statfs::statfs(probe)
        .map_err(|e| Error::io(format!("statfs {}", probe.display()), e.into()))?;
    #[allow(
        clippy::unnecessary_cast,
        reason = "the field's type differs between libc targets"
    )]
    if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(Error::BpffsNotMounted { path: dir.to_owned() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernels_are_refused_with_the_version() {
        check_kernel_release("6.6.0").unwrap();
        check_kernel_release("6.18.44-fc-v769").unwrap();
        let err = check_kernel_release("5.15.0-91-generic").unwrap_err();
        assert!(
            err.to_string().contains("5.15.0-91-generic") && err.to_string().contains("6.6"),
            "{err}"
        );
    }

    #[test]
    fn bpffs_is_required() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_bpffs(&dir.path().join("sluice")).unwrap_err();
        assert!(matches!(err, Error::BpffsNotMounted { .. }), "{err}");
        assert!(err.to_string().contains("mount -t bpf"));
    }

    #[test]
    fn the_fence_expires_strictly_after_its_deadline_and_never_unarmed() {
        let now = Duration::new(1_000, 5);
        let deadline = deadline_ns(now, Duration::from_millis(750));
        assert_eq!(deadline, 1_000_750_000_005);
        assert!(!expired(deadline, now));
        assert!(
            !expired(deadline, Duration::from_nanos(deadline)),
            "now == deadline: still held"
        );
        assert!(expired(deadline, Duration::from_nanos(deadline + 1)));
        assert!(!expired(0, Duration::MAX), "0: never armed");
        assert_eq!(deadline_ns(Duration::MAX, Duration::from_secs(1)), u64::MAX);
        // The clock is the kernel's: positive and moving forward.
        let (a, b) = (monotonic_now().unwrap(), monotonic_now().unwrap());
        assert!(a > Duration::ZERO && b >= a);
    }

    #[test]
    fn pinned_links_are_found_by_program_and_ifindex() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "sluice_from_pod-3",
            "sluice_from_pod-12",
            "sluice_from_tunnel-4",
            "junk",
        ] {
            fs::write(dir.path().join(f), b"").unwrap();
        }
        assert_eq!(
            pinned_ifindexes(dir.path(), PROG_FROM_POD),
            BTreeSet::from([3, 12])
        );
        assert_eq!(
            pinned_ifindexes(dir.path(), PROG_FROM_TUNNEL),
            BTreeSet::from([4])
        );
    }
}
