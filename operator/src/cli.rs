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
    /// sync over gRPC (`sluice.v1.NodeChannel`).
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
    /// PEM certificate (chain) of the node channel, e.g. mounted from a Secret.
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
    /// The selector-less Service the shims dial: the leader writes its EndpointSlice with its own
    /// pod IP, so both replicas can stay Ready while the shims reach only the leader. Without
    /// it, the standby reports not ready instead.
    #[arg(long, env = "SLUICE_LEADER_SERVICE")]
    pub leader_service: Option<String>,
    /// This pod's IP (from the downward API), published with `--leader-service`.
    #[arg(long, env = "POD_IP", requires = "leader_service")]
    pub pod_ip: Option<std::net::IpAddr>,
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
        Command::Plan { manifests, output } => plan(&manifests, output),
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
    };
    tokio::runtime::Runtime::new()?.block_on(crate::runner::run(opts))?;
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

fn plan(dirs: &[PathBuf], output: Output) -> anyhow::Result<String> {
    let mut m = manifests::Manifests::default();
    for dir in dirs {
        m.read_dir(dir)?;
    }
    for ignored in &m.ignored {
        eprintln!("note: ignoring {ignored}");
    }
    let planner = Planner::from_snapshot(m.namespaces, m.nodes, m.policies, m.pods);
    let doc = report::document(&planner);
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
}
