//! The Sluice node shim: loads the eBPF datapath and keeps its maps equal to the node's plan.
use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use sluice_shim::{datapath, maps, netdev, run};

/// Sluice node agent.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// bpffs directory holding Sluice's pinned maps and links.
    #[arg(long, env = "SLUICE_BPFFS_DIR", default_value = datapath::DEFAULT_BPFFS_DIR, global = true)]
    bpffs_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath, then keep it equal to this node's entries in a plan file.
    Run(Box<RunArgs>),
    /// Inspect the live datapath.
    #[command(subcommand)]
    Bpf(BpfCommand),
    /// Remove everything Sluice put on this node: links (the datapath stops at once), pinned maps,
    /// the nftables table, the egress and reply rules and routes, the tunnel device; and put back
    /// the rp_filter settings the shim changed.
    Uninstall {
        /// Sluice's tunnel device.
        #[arg(long, env = "SLUICE_TUNNEL_DEVICE", default_value = "sluice-vx0")]
        tunnel_device: String,
        /// Routing table (and rule preference) of the reply route.
        #[arg(long, env = "SLUICE_REPLY_TABLE", default_value_t = 8473)]
        reply_table: u32,
    },
}

#[derive(Subcommand)]
enum BpfCommand {
    /// The live policy entries (like `cilium bpf egress list`).
    List,
    /// The datapath counters, by outcome and by policy.
    Counters,
    /// The pinned flows of this node's pods: each with the gateway it started on, which it keeps
    /// across planned changes while that gateway is pinnable.
    Flows,
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name, as in the plan.
    #[arg(long, env = "SLUICE_NODE")]
    node: String,
    /// This node's underlay address (IPv4; IPv6 on an IPv6-only node network): entries whose
    /// gateway is this address egress here, and the tunnel's outer packets leave from it.
    #[arg(long, env = "SLUICE_NODE_IP")]
    node_ip: std::net::IpAddr,
    /// The plan (`sluice-operator plan --output json`); re-read when it changes.
    #[arg(
        long,
        env = "SLUICE_ENTRIES",
        required_unless_present = "operator",
        conflicts_with = "operator"
    )]
    entries: Option<PathBuf>,
    /// Take the plan from the operator instead: `https://host:port` (or `http://` for local
    /// demos). Reconnects with backoff; the datapath keeps its state while disconnected.
    #[arg(long, env = "SLUICE_OPERATOR")]
    operator: Option<String>,
    /// PEM CA bundle that signed the operator's certificate; re-read at every connection.
    #[arg(long, env = "SLUICE_CA_FILE", requires = "operator")]
    ca_file: Option<PathBuf>,
    /// The name in the operator's certificate, when it is not the URL's host.
    #[arg(long, env = "SLUICE_SERVER_NAME", requires = "operator")]
    server_name: Option<String>,
    /// The projected ServiceAccount token to authenticate with (re-read at every connection).
    #[arg(long, env = "SLUICE_TOKEN_FILE", requires = "operator")]
    token_file: Option<PathBuf>,
    /// In-cluster CIDRs never steered, added to what the operator finds (pod CIDRs, node
    /// addresses, Service CIDRs) and this node's IP. Repeat or comma-separate.
    #[arg(long = "cluster-cidr", env = "SLUICE_CLUSTER_CIDRS", value_delimiter = ',')]
    cluster_cidrs: Vec<Ipv4Net>,
    /// Name patterns (`*`, `?`) of pod-facing interfaces. Repeat or comma-separate.
    #[arg(long = "pod-interface", env = "SLUICE_POD_INTERFACES", value_delimiter = ',',
          default_values_t = netdev::DEFAULT_POD_INTERFACES.iter().map(|s| s.to_string()))]
    pod_interfaces: Vec<String>,
    /// Capacity of the destinations map: the destination CIDRs of every source group (pods of
    /// the same policies share one). Set when the map is first created; takes no memory until
    /// used.
    #[arg(long, env = "SLUICE_POLICY_MAP_MAX", default_value_t = maps::DEFAULT_POLICY_MAP_MAX)]
    policy_map_max: u32,
    /// Capacity of the sources map: pods this node steers or serves as a gateway. Set when the
    /// map is first created.
    #[arg(long, env = "SLUICE_SOURCE_MAP_MAX", default_value_t = maps::DEFAULT_SOURCE_MAP_MAX)]
    source_map_max: u32,
    /// Capacity of the pinned flows map: TCP and UDP flows this node's pods have open through
    /// remote gateways, each remembered with the gateway it started on (an LRU: beyond it, the
    /// least recently used flow follows its pod's current gateway). Set when the map is first
    /// created; each flow is 40 bytes of key and value, plus the kernel's per-entry overhead.
    #[arg(long, env = "SLUICE_FLOW_MAP_MAX", default_value_t = maps::DEFAULT_FLOW_MAP_MAX)]
    flow_map_max: u32,
    /// Whether open flows keep the gateway they started on across planned changes (`on`), or
    /// every packet follows its pod's current entry (`off`: one map lookup a packet less).
    #[arg(long, env = "SLUICE_FLOW_PINNING", value_enum, default_value_t = OnOff::On)]
    flow_pinning: OnOff,
    /// Sluice's own VXLAN (collect_md) device.
    #[arg(long, env = "SLUICE_TUNNEL_DEVICE", default_value = "sluice-vx0")]
    tunnel_device: String,
    /// UDP port of the tunnel (not 4789/8472, which CNIs use).
    #[arg(long, env = "SLUICE_TUNNEL_PORT", default_value_t = 8473)]
    tunnel_port: u16,
    /// VXLAN network identifier used by the tunnel.
    #[arg(long, env = "SLUICE_TUNNEL_VNI", default_value_t = 8473)]
    tunnel_vni: u32,
    /// Whether a pod's packet is steered only when its source address routes back to the
    /// interface it came from (`route`), or without that check (`off`: only for CNIs that route
    /// every pod through one shared device and enforce pod source addresses themselves).
    #[arg(long, env = "SLUICE_SOURCE_CHECK", value_enum, default_value_t = run::SourceCheck::Route)]
    source_check: run::SourceCheck,
    /// Bits of the packet mark that hold Sluice's egress id (one contiguous run). The defaults
    /// stay clear of Calico (0xffff0000), kube-proxy (0x4000, 0x8000) and Cilium (0x0f00, and
    /// 0xffff0000); change them only if another agent on the nodes uses these bits.
    #[arg(long, env = "SLUICE_MARK_EGRESS", default_value = "0xff", value_parser = parse_mark)]
    mark_egress: u32,
    /// The mark bit of packets that came through Sluice's tunnel.
    #[arg(long, env = "SLUICE_MARK_TUNNEL", default_value = "0x1000", value_parser = parse_mark)]
    mark_tunnel: u32,
    /// The mark bit of replies to send back into the tunnel.
    #[arg(long, env = "SLUICE_MARK_REPLY", default_value = "0x2000", value_parser = parse_mark)]
    mark_reply: u32,
    /// Routing table (and rule preference) steering replies back into the tunnel; the egress
    /// rules take preference +1 and each egress interface the table +1+ifindex.
    #[arg(long, env = "SLUICE_REPLY_TABLE", default_value_t = 8473)]
    reply_table: u32,
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus) and `/healthz` (whether the
    /// agent loop ticked recently); `off` to disable. On the host network any pod can reach it:
    /// prefer the node's IP to `0.0.0.0`.
    #[arg(long, env = "SLUICE_METRICS_ADDR", default_value = "0.0.0.0:9473")]
    metrics_addr: String,
    /// How often to rescan interfaces and the plan file, in milliseconds.
    #[arg(long, env = "SLUICE_INTERVAL_MS", default_value_t = 1000)]
    interval_ms: u64,
    /// Where to write a JSON status after each applied plan (for tests and probes).
    #[arg(long, env = "SLUICE_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// Give up this node's managed egress IPs after this long without a word from the operator
    /// (`30s`, `5m`), or `never`. Never, by default: an operator that is down or restarting
    /// then costs no egress, and a node cut off from the operator but not from its neighbours
    /// keeps answering for its addresses, so the node the operator moves them to finds it
    /// answering and does not claim them (`Conflict`) until the partition heals. A duration
    /// bounds how long such a partition keeps the moved addresses from their new node, at the
    /// price of dropping every managed address of the node when the operator is away that long.
    /// At least 10s.
    #[arg(long, env = "SLUICE_RELEASE_MANAGED_IPS_AFTER", default_value = "never", value_parser = parse_release_after)]
    release_managed_ips_after: ReleaseAfter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// `--release-managed-ips-after`: `None` is never.
#[derive(Clone, Copy, Debug)]
struct ReleaseAfter(Option<Duration>);

/// `never`, or a duration such as `30s`, `500ms`, `5m`.
fn parse_release_after(s: &str) -> Result<ReleaseAfter, String> {
    let after = parse_release_duration(s)?;
    // The operator heartbeats a gateway every 2 s (other nodes every 10 s): anything shorter
    // than a few of those would give addresses up on a quiet but healthy session.
    if after.is_some_and(|a| a < MIN_RELEASE_AFTER) {
        return Err(format!(
            "{s:?} is shorter than {MIN_RELEASE_AFTER:?}: a healthy session can be that quiet"
        ));
    }
    Ok(ReleaseAfter(after))
}

const MIN_RELEASE_AFTER: Duration = Duration::from_secs(10);

fn parse_release_duration(s: &str) -> Result<Option<Duration>, String> {
    if s == "never" {
        return Ok(None);
    }
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is neither `never` nor a duration such as 30s"))?;
    match unit {
        "ms" => Ok(Some(Duration::from_millis(n))),
        "s" => Ok(Some(Duration::from_secs(n))),
        "m" => Ok(Some(Duration::from_secs(n * 60))),
        _ => Err(format!("unknown unit in {s:?} (ms, s, m, or `never`)")),
    }
}

/// A mark as `0x1000` or `4096`.
fn parse_mark(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a 32-bit mark: {e}"))
}

/// `sluice-shim run`, until SIGTERM or SIGINT (then `Ok`).
async fn run(a: RunArgs, bpffs_dir: PathBuf) -> anyhow::Result<()> {
    // First of all: as PID 1 in its container the shim gets no default action for SIGTERM, and
    // without a handler every pod stop would wait out the termination grace period.
    let stop = termination()?;
    let metrics_addr = match a.metrics_addr.as_str() {
        "off" | "" => None,
        addr => Some(
            sluice_shim::metrics::listen_address(addr)
                .with_context(|| format!("--metrics-addr {addr:?}: not an address and port"))?,
        ),
    };
    let plan = match (a.entries, a.operator) {
        (Some(path), _) => run::PlanSource::File(path),
        (None, Some(url)) => {
            let mut config = sluice_proto::client::Config::new(url);
            // Read now to fail fast on a wrong path; the session re-reads it at every
            // connection, so a rotated CA is trusted from the next one on.
            if let Some(p) = &a.ca_file {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            }
            config.ca_file = a.ca_file;
            config.server_name = a.server_name;
            config.token_file = a.token_file;
            run::PlanSource::Operator(sluice_shim::client::start(
                config,
                a.node.clone(),
                a.pod_interfaces.clone(),
                a.tunnel_device.clone(),
                bpffs_dir.clone(),
            ))
        }
        (None, None) => anyhow::bail!("--entries or --operator is required"),
    };
    let opts = run::Options {
        node: a.node,
        node_ip: a.node_ip,
        plan,
        cluster_cidrs: a.cluster_cidrs,
        pod_interfaces: a.pod_interfaces,
        bpffs_dir,
        capacity: sluice_shim::datapath::Capacity {
            sources: a.source_map_max,
            destinations: a.policy_map_max,
            flows: a.flow_map_max,
        },
        tunnel: netdev::Tunnel {
            device: a.tunnel_device,
            port: a.tunnel_port,
            vni: a.tunnel_vni,
            local: Some(a.node_ip),
        },
        reply_table: a.reply_table,
        source_check: a.source_check,
        marks: sluice_shim::maps::MarkLayout::new(a.mark_egress, a.mark_tunnel, a.mark_reply)
            .map_err(|e| anyhow::anyhow!("--mark-egress/--mark-tunnel/--mark-reply: {e}"))?,
        metrics_addr,
        interval: Duration::from_millis(a.interval_ms),
        status_file: a.status_file,
        release_managed_after: a.release_managed_ips_after.0,
        flow_pinning: a.flow_pinning == OnOff::On,
    };
    tokio::select! {
        ran = run::run(opts) => ran?,
        signal = stop => {
            // The datapath stays as it is, pinned: on a rolling update the next shim adopts it and
            // traffic never notices. A tick under way finishes first (the runtime waits for its
            // blocking pool when it shuts down).
            tracing::info!(signal, "stopping; the datapath stays in place");
        }
    }
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT, with its name; the handlers are installed before this
/// returns.
fn termination() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Args { bpffs_dir, command } = Args::parse();
    match command {
        Command::Bpf(BpfCommand::List) => print!("{}", sluice_shim::bpf::list(&bpffs_dir)?),
        Command::Bpf(BpfCommand::Counters) => print!("{}", sluice_shim::bpf::counters(&bpffs_dir)?),
        Command::Bpf(BpfCommand::Flows) => print!("{}", sluice_shim::bpf::flows(&bpffs_dir)?),
        Command::Uninstall {
            tunnel_device,
            reply_table,
        } => sluice_shim::uninstall::uninstall(&bpffs_dir, &tunnel_device, reply_table)?,
        Command::Run(a) => {
            // One runtime: the agent loop waits on it (its ticks run on the blocking pool), the
            // node channel's session and the metrics server run on its one worker.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("sluice-shim")
                .enable_all()
                .build()
                .context("starting the Tokio runtime")?;
            runtime.block_on(run(*a, bpffs_dir))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Args::command().debug_assert();
    }
}
