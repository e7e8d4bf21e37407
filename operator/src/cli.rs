//! The `sluice-operator` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{manifests, planner::Planner, report};

#[derive(Parser, Debug)]
#[command(
    name = "sluice-operator",
    version,
    about = "Sluice egress gateway control plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Plan offline from manifest files: print every node's entries and every policy's status.
    Plan {
        /// Directory of *.yaml / *.yml files (Nodes, Namespaces, Pods, EgressGatewayPolicies and
        /// CiliumEgressGatewayPolicies; other kinds are ignored). Repeat to read several.
        #[arg(long, required = true)]
        manifests: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// A Service CIDR of the cluster (beside those of ServiceCIDR manifests), for the
        /// in-cluster set (`clusterCIDRs`). Repeat or separate with commas.
        #[arg(long = "service-cidr", value_delimiter = ',')]
        service_cidrs: Vec<ipnet::IpNet>,
    },
    /// Print the EgressGatewayPolicy CRD.
    Crd,
    /// Convert CiliumEgressGatewayPolicy YAML to EgressGatewayPolicy YAML on stdout; what could
    /// not be carried over, or means something different, is said on stderr.
    Convert {
        /// A multi-document YAML file (`kubectl get cegp -o yaml` output works too); `-` or
        /// nothing for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
    },
    /// Run the live system: watch a source of truth, plan, and keep every shim's datapath in
    /// sync over gRPC (`sluice.v2.NodeChannel`).
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// `kubernetes` (in a cluster), or `dir:PATH`: a directory of manifests, re-read when a file
    /// changes.
    #[arg(long, env = "SLUICE_SOURCE", default_value = "kubernetes")]
    pub source: crate::runner::Source,
    /// Address of the node channel (gRPC) for the shims.
    #[arg(long, env = "SLUICE_GRPC_LISTEN", default_value = "0.0.0.0:9443")]
    pub grpc_listen: std::net::SocketAddr,
    /// Address of /metrics, /healthz and /readyz; `off` to disable.
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,
    /// PEM certificate (chain) of the node channel, e.g. mounted from a Secret; it and the key
    /// are re-read when they change (a renewed certificate), for new connections.
    #[arg(long, env = "SLUICE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the node channel.
    #[arg(long, env = "SLUICE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How long a gateway's shim may stay silent before the gateway is replaced (e.g. `1s`,
    /// `500ms`). Shims send heartbeats four times per grace period.
    #[arg(long, env = "SLUICE_HEARTBEAT_GRACE", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_grace: std::time::Duration,
    /// A file of `TOKEN NODE` lines: shims authenticate with these tokens instead of TokenReview.
    #[arg(long, env = "SLUICE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Accept any client as any node. INSECURE: local demos only.
    #[arg(long, env = "SLUICE_INSECURE_ALLOW_ANY_NODE")]
    pub insecure_allow_any_node: bool,
    /// The audience shim tokens must be bound to (TokenReview).
    #[arg(long, env = "SLUICE_TOKEN_AUDIENCE", default_value = "sluice-operator")]
    pub token_audience: String,
    /// ServiceAccounts (`namespace/name`) whose tokens may act as shims. Repeat or comma-separate.
    #[arg(
        long = "shim-service-account",
        env = "SLUICE_SHIM_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "sluice-system/sluice-shim"
    )]
    pub shim_service_accounts: Vec<String>,
    /// How often the `dir:` source looks for changed files (e.g. `200ms`).
    #[arg(long, env = "SLUICE_POLL", default_value = "200ms", value_parser = parse_duration)]
    pub poll: std::time::Duration,
    /// Namespace of the leader election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
    pub lease_namespace: String,
    /// Name of the leader election Lease.
    #[arg(long, env = "SLUICE_LEASE_NAME", default_value = "sluice-operator")]
    pub lease_name: String,
    /// How long a standby waits, after the Lease stopped changing, before it takes it over: about
    /// how long a crashed leader goes unreplaced (whole seconds: the Lease stores seconds).
    #[arg(long, env = "SLUICE_LEASE_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub lease_duration: std::time::Duration,
    /// A leader that could not renew the Lease for this long stops leading (exits). Shorter than
    /// --lease-duration, so that it stops before a standby may take over.
    #[arg(long, env = "SLUICE_LEASE_RENEW_DEADLINE", default_value = "7s", value_parser = parse_duration)]
    pub lease_renew_deadline: std::time::Duration,
    /// How often the leader renews the Lease and a standby reads it: a Lease released by a
    /// graceful stop is taken over within this. Shorter than --lease-renew-deadline.
    #[arg(long, env = "SLUICE_LEASE_RETRY_PERIOD", default_value = "1s", value_parser = parse_duration)]
    pub lease_retry_period: std::time::Duration,
    /// `dir:` source: operators started with the same file elect a leader by locking it
    /// (`flock`); only the holder runs the engine and serves the node channel, the others wait.
    /// A stopped or killed leader's lock is released at once.
    #[arg(long, env = "SLUICE_LEASE_FILE")]
    pub lease_file: Option<PathBuf>,
    /// A Service CIDR of the cluster, for the in-cluster set every shim receives (no policy
    /// steers traffic to it). Needed only where the API has no `ServiceCIDR` objects (before
    /// Kubernetes 1.33) or the `dir:` source has none. Repeat or separate with commas.
    #[arg(long = "service-cidr", env = "SLUICE_SERVICE_CIDRS", value_delimiter = ',')]
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// How long a gateway that a planned change (a policy edit, a gateway leaving the policy)
    /// moved pods away from keeps their entries, so that their open connections, pinned to it on
    /// their nodes, keep working while new ones take the new gateway. `0s` turns it off.
    #[arg(long, env = "SLUICE_PINNED_FLOW_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub pinned_flow_timeout: std::time::Duration,
    /// The selector-less Service the shims dial: the leader writes its EndpointSlice with its own
    /// pod IP, so both replicas can stay Ready while the shims reach only the leader. Without
    /// it, the standby reports not ready instead.
    #[arg(long, env = "SLUICE_LEADER_SERVICE")]
    pub leader_service: Option<String>,
    /// This pod's IP (from the downward API), published with `--leader-service`.
    #[arg(long, env = "POD_IP", requires = "leader_service")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// A node channel client that has not finished its TLS handshake by then is disconnected.
    #[arg(long, env = "SLUICE_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: std::time::Duration,
    /// Streams one node channel connection may have open at once (a shim uses one).
    #[arg(long, env = "SLUICE_GRPC_MAX_STREAMS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_streams: u32,
    /// How long a node channel connection may carry nothing before it is pinged (HTTP/2 ping,
    /// TCP keepalive). Keep it above the slowest heartbeat interval (10 s), or live sessions are
    /// pinged too.
    #[arg(long, env = "SLUICE_GRPC_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub grpc_keepalive_interval: std::time::Duration,
    /// A node channel peer that has not answered a ping by then is disconnected.
    #[arg(long, env = "SLUICE_GRPC_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub grpc_keepalive_timeout: std::time::Duration,
    /// How long a shim token that passed its TokenReview is trusted without another review.
    #[arg(long, env = "SLUICE_TOKEN_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub token_cache_ttl: std::time::Duration,
    /// How long a token the TokenReview refused stays refused without another review.
    #[arg(long, env = "SLUICE_TOKEN_NEGATIVE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub token_negative_ttl: std::time::Duration,
    /// TokenReview verdicts kept at most (at least one per node is needed).
    #[arg(long, env = "SLUICE_TOKEN_CACHE_SIZE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub token_cache_size: u32,
    /// TokenReviews of tokens not in the cache, per second; beyond that (and the burst) clients
    /// are refused with RESOURCE_EXHAUSTED and retry. Bounds what garbage tokens cost the API
    /// server; also how fast a new leader admits every shim (nodes / rate seconds).
    #[arg(long, env = "SLUICE_TOKEN_REVIEW_RATE", default_value_t = 100.0)]
    pub token_review_rate: f64,
    /// TokenReviews of tokens not in the cache allowed at once: at least the number of nodes, so
    /// that a new leader admits every shim before its settling period ends.
    #[arg(long, env = "SLUICE_TOKEN_REVIEW_BURST", default_value_t = 5_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub token_review_burst: u32,
}

/// `250ms`, `1s`, `1.5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = number.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit in {s:?} (ms, s, m)")),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Json,
    Table,
}

/// Runs a command and returns what it prints on stdout.
pub fn run(cli: Cli) -> anyhow::Result<String> {
    match cli.command {
        Command::Plan {
            manifests,
            output,
            service_cidrs,
        } => plan(&manifests, output, &service_cidrs),
        Command::Crd => Ok(crate::api::crd_yaml()),
        Command::Convert { file } => convert(&file),
        Command::Run(args) => run_live(*args),
    }
}

fn run_live(a: RunArgs) -> anyhow::Result<String> {
    let metrics_listen = match a.metrics_listen.as_str() {
        "off" | "" => None,
        addr => Some(
            addr.parse()
                .map_err(|e| anyhow::anyhow!("--metrics-listen {addr:?}: {e}"))?,
        ),
    };
    let opts = crate::runner::RunOptions {
        source: a.source,
        grpc_listen: a.grpc_listen,
        metrics_listen,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        heartbeat_grace: a.heartbeat_grace,
        tokens_file: a.tokens_file,
        insecure_allow_any_node: a.insecure_allow_any_node,
        token_audience: a.token_audience,
        shim_service_accounts: a.shim_service_accounts,
        poll: a.poll,
        lease_namespace: a.lease_namespace,
        lease_name: a.lease_name,
        leader_service: a.leader_service,
        pod_ip: a.pod_ip,
        limits: crate::runner::ChannelLimits {
            server: crate::grpc::ServerLimits {
                tls_handshake_timeout: a.tls_handshake_timeout,
                max_concurrent_streams: a.grpc_max_streams,
                keepalive_interval: a.grpc_keepalive_interval,
                keepalive_timeout: a.grpc_keepalive_timeout,
            },
            reviews: crate::auth::ReviewLimits {
                ttl: a.token_cache_ttl,
                negative_ttl: a.token_negative_ttl,
                cache_size: a.token_cache_size as usize,
                rate: a.token_review_rate,
                burst: a.token_review_burst,
            },
        },
        lease_timings: crate::controller::leader::LeaseTimings {
            lease_duration: a.lease_duration,
            renew_deadline: a.lease_renew_deadline,
            retry_period: a.lease_retry_period,
        },
        lease_file: a.lease_file,
        service_cidrs: a.service_cidrs,
        pinned_flow_timeout: a.pinned_flow_timeout,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(crate::runner::run(opts));
    // Whatever is still running (sessions' connections, a DNS lookup) must not delay the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result?;
    Ok(String::new())
}

fn convert(file: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let conversion = crate::convert::convert(&text)?;
    for note in &conversion.notes {
        eprintln!("{note}");
    }
    if conversion.converted == 0 {
        anyhow::bail!("nothing to convert");
    }
    Ok(conversion.yaml)
}

fn plan(dirs: &[PathBuf], output: Output, service_cidrs: &[ipnet::IpNet]) -> anyhow::Result<String> {
    let mut m = manifests::Manifests::default();
    for dir in dirs {
        m.read_dir(dir)?;
    }
    for ignored in &m.ignored {
        eprintln!("note: ignoring {ignored}");
    }
    let cluster_cidrs =
        crate::in_cluster::in_cluster_cidrs(&m.nodes, service_cidrs.iter().chain(&m.service_cidrs));
    let planner = Planner::from_snapshot(m.namespaces, m.nodes, m.policies, m.pods);
    let mut doc = report::document(&planner);
    for node in &mut doc.nodes {
        node.cluster_cidrs.clone_from(&cluster_cidrs);
    }
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(&doc)? + "\n",
        Output::Table => report::table(&doc),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn lease_timing_defaults_are_the_elections() {
        let Command::Run(args) = Cli::parse_from(["sluice-operator", "run"]).command else {
            panic!("not run");
        };
        let timings = crate::controller::leader::LeaseTimings {
            lease_duration: args.lease_duration,
            renew_deadline: args.lease_renew_deadline,
            retry_period: args.lease_retry_period,
        };
        assert_eq!(timings, crate::controller::leader::LeaseTimings::default());
        timings.validate().unwrap();
    }
}
