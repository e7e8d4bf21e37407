//! `sluice-operator run`: a source of truth, the engine, the node channel server and metrics.
//!
//! With `--source kubernetes`, only the leader runs the engine and serves shims: the process
//! waits for the Lease, and exits when it loses it (its pod restarts as a standby), so that two
//! engines never program the same nodes. The leader writes its own pod IP as the only endpoint of
//! the shims' selector-less Service (`--leader-service`); without that, the standby's `/readyz`
//! is 503, which keeps a selector-based Service pointed at the leader. With `--source dir:` and
//! `--lease-file`, the holder of the file's lock leads the same way (`lease_file`).
//!
//! SIGTERM and SIGINT stop gracefully, in this order: the node channel closes (no new sessions;
//! the open ones end, and the shims reconnect to the next leader), the engine stops, the lease is
//! released, and the process exits 0. Releasing only after the listener is closed means the next
//! leader can bind the same address, and two engines never serve at once.
//!
//! This is an edge, like `main`: the body of `sluice-operator run`, public so that tests can
//! drive it. Its callers only report its errors, so they are `anyhow` with context; the modules
//! it wires together answer typed errors (or none, when nothing but the engine's going away ends
//! them: [`crate::dirsource::run`], [`crate::controller::run`]).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::{
    auth::{AllowAnyNode, ReviewLimits, StaticTokens, TokenReviewVerifier, TokenVerifier},
    controller::leader::LeaseTimings,
    engine::{Engine, EngineConfig, EngineMetrics, Hub},
    grpc::{self, NodeService, ServerLimits, Tls},
    lease_file::FileLease,
    live::{Notice, SourceEvent, StatusUpdate},
};

/// Where the planner's inputs come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Kubernetes,
    Dir(PathBuf),
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kubernetes" => Ok(Source::Kubernetes),
            _ => match s.strip_prefix("dir:") {
                Some(path) if !path.is_empty() => Ok(Source::Dir(path.into())),
                _ => Err(format!("expected `kubernetes` or `dir:PATH`, not {s:?}")),
            },
        }
    }
}

/// What one client may cost the node channel and, through its tokens, the API server.
#[derive(Clone, Debug, Default)]
pub struct ChannelLimits {
    pub server: ServerLimits,
    pub reviews: ReviewLimits,
}

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: Source,
    pub grpc_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub heartbeat_grace: Duration,
    pub tokens_file: Option<PathBuf>,
    pub insecure_allow_any_node: bool,
    pub token_audience: String,
    pub shim_service_accounts: Vec<String>,
    pub poll: Duration,
    pub lease_namespace: String,
    pub lease_name: String,
    pub leader_service: Option<String>,
    pub pod_ip: Option<std::net::IpAddr>,
    pub limits: ChannelLimits,
    /// The Kubernetes Lease's timings (checked at start).
    pub lease_timings: LeaseTimings,
    /// `dir:` source: only the process holding this file's lock runs the engine and serves.
    pub lease_file: Option<PathBuf>,
    /// Service CIDRs for the in-cluster set, beside those of `ServiceCIDR` objects.
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// How long a gateway keeps the entries of pods moved away by a planned change (their open
    /// flows stay pinned to it); zero: not at all.
    pub pinned_flow_timeout: Duration,
}

fn tls(opts: &RunOptions) -> anyhow::Result<Option<Tls>> {
    match (&opts.tls_cert, &opts.tls_key) {
        // Re-read when the files change (a renewed certificate): see `crate::tls`.
        (Some(cert), Some(key)) => Ok(Some(
            Tls::from_files(cert, key).context("loading --tls-cert and --tls-key")?,
        )),
        (None, None) => {
            tracing::warn!("no --tls-cert/--tls-key: the node channel is PLAINTEXT (local demos only)");
            Ok(None)
        }
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
}

fn static_verifier(opts: &RunOptions) -> anyhow::Result<Option<Arc<dyn TokenVerifier>>> {
    if opts.insecure_allow_any_node {
        tracing::warn!(
            "--insecure-allow-any-node: ANY client may receive ANY node's plan; never use this outside a local demo"
        );
        return Ok(Some(Arc::new(AllowAnyNode)));
    }
    if let Some(path) = &opts.tokens_file {
        return Ok(Some(Arc::new(StaticTokens::from_file(path)?)));
    }
    Ok(None)
}

/// Runs until SIGTERM or SIGINT (a graceful stop, `Ok`), the source ends, or something fails.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // First of all: until the handlers exist, SIGTERM kills the process the default way (and as
    // PID 1 in a container, the signal is ignored and the kubelet waits out the grace period).
    let stop = termination()?;
    run_until(opts, None, stop).await
}

/// The Kubernetes API for `--source kubernetes`, as `run_until` callers other than `run` supply
/// it (tests with a fake API server); `run` connects from the environment.
pub struct ApiAccess {
    pub client: kube::Client,
    /// This replica's identity in the Lease.
    pub identity: String,
}

/// Resolves at the first SIGTERM or SIGINT; the handlers are installed before this returns.
fn termination() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "stopping: closing the node channel, then releasing the lease"
        );
    })
}

/// [`run`] until `stop` resolves: then the node channel closes (no new sessions, the open ones
/// end), the engine stops, the lease is released so that a standby takes over at once, and this
/// returns `Ok`. Shims keep their datapath meanwhile.
pub async fn run_until(
    opts: RunOptions,
    api: Option<ApiAccess>,
    stop: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    opts.lease_timings.validate()?;
    if opts.lease_file.is_some() && opts.source == Source::Kubernetes {
        anyhow::bail!("--lease-file is for the dir: source; with Kubernetes the Lease elects the leader");
    }
    let mut stop = std::pin::pin!(stop);
    let mut registry = crate::metrics::registry();
    let engine_metrics = EngineMetrics::register(&mut registry);
    let tls = tls(&opts)?;
    match opts.source.clone() {
        Source::Dir(dir) => {
            let verifier = static_verifier(&opts)?.context(
                "the dir source needs --tokens-file (TOKEN NODE lines) or --insecure-allow-any-node",
            )?;
            // With a lease file, only the holder is ready (it alone serves shims).
            let (ready_tx, ready) = watch::channel(opts.lease_file.is_none());
            serve_metrics(&opts, registry, ready).await?;
            let lease = match &opts.lease_file {
                None => None,
                Some(path) => {
                    tracing::info!(path = %path.display(), "waiting for the lease file");
                    tokio::select! {
                        lease = FileLease::acquire(path) => Some(lease?),
                        () = &mut stop => return Ok(()),
                    }
                }
            };
            if let Some(lease) = &lease {
                tracing::info!(path = %lease.path().display(), "leading: holding the lease file");
            }
            let (sources_tx, sources_rx) = mpsc::channel(1024);
            let (updates_tx, updates_rx) = mpsc::channel(256);
            let (notices_tx, notices_rx) = mpsc::channel(256);
            tokio::spawn(log_outputs(updates_rx, notices_rx));
            let watching = crate::dirsource::run(dir, opts.poll, sources_tx);
            let channels = EngineChannels {
                sources: sources_rx,
                updates: updates_tx,
                notices: notices_tx,
            };
            // Ready once the node channel listens, not when the lock is taken: whoever trusts
            // `/readyz` (a probe, a script, the handover test) connects right after it says 200.
            let serving = || {
                ready_tx.send_replace(true);
            };
            let live = run_live(&opts, tls, verifier, engine_metrics, channels, serving, stop);
            // `live` ends on a stop, with the node channel closed; the source only once the engine
            // has gone.
            let result = tokio::select! {
                r = live => r,
                () = watching => Ok(()),
            };
            ready_tx.send_replace(false);
            if let Some(lease) = lease {
                lease.release();
                tracing::info!("released the lease file");
            }
            result
        }
        Source::Kubernetes => {
            let ApiAccess { client, identity } = match api {
                Some(api) => api,
                None => ApiAccess {
                    client: kube::Client::try_default()
                        .await
                        .context("connecting to Kubernetes (for a cluster-less run use --source dir:PATH)")?,
                    identity: std::env::var("POD_NAME")
                        .unwrap_or_else(|_| format!("sluice-operator-{}", std::process::id())),
                },
            };
            let controller_metrics = crate::metrics::ControllerMetrics::register(&mut registry);
            let verifier: Arc<dyn TokenVerifier> = match static_verifier(&opts)? {
                Some(v) => v,
                None => Arc::new(TokenReviewVerifier::with_limits(
                    client.clone(),
                    opts.token_audience.clone(),
                    opts.shim_service_accounts.clone(),
                    opts.limits.reviews.clone(),
                )),
            };
            let election = crate::controller::leader::LeaderElection::start(
                client.clone(),
                crate::controller::leader::LeaseConfig::new(
                    &opts.lease_namespace,
                    &opts.lease_name,
                    &identity,
                )
                .with_timings(opts.lease_timings),
                Some(controller_metrics.clone()),
            );
            let mut leading = election.leading();
            let endpoint = match (&opts.leader_service, opts.pod_ip) {
                (Some(service), Some(pod_ip)) => Some(crate::controller::endpoint::LeaderEndpoint {
                    namespace: opts.lease_namespace.clone(),
                    service: service.clone(),
                    pod_ip,
                    port: opts.grpc_listen.port(),
                    pod_name: std::env::var("POD_NAME").ok(),
                }),
                (Some(_), None) => anyhow::bail!("--leader-service needs this pod's IP (--pod-ip or POD_IP)"),
                _ => None,
            };
            // With a leader endpoint the standby is as ready as the leader (the Service reaches
            // only the leader anyway); without one, readiness is what steers the shims, so it
            // waits for the node channel to listen, and a lost lease ends the process.
            let (ready_tx, ready) = watch::channel(endpoint.is_some());
            serve_metrics(&opts, registry, ready).await?;
            tracing::info!(%identity, "waiting for the lease");
            tokio::select! {
                // The borrow `wait_for` returns must not live across the other arm's await.
                r = async { leading.wait_for(|l| *l).await.map(drop) } => r.context("leader election ended")?,
                () = &mut stop => {
                    election.step_down().await;
                    return Ok(());
                }
            }
            tracing::info!("leading: starting the engine and the node channel");
            let leader = async {
                if let Some(endpoint) = &endpoint {
                    crate::controller::endpoint::publish(
                        client.clone(),
                        endpoint,
                        crate::controller::FIELD_MANAGER,
                    )
                    .await
                    .context("publishing this leader as the node channel's endpoint")?;
                    tracing::info!(service = %endpoint.service, ip = %endpoint.pod_ip, "shims now reach this replica");
                }
                let (sources_tx, sources_rx) = mpsc::channel(4096);
                let (updates_tx, updates_rx) = mpsc::channel(1024);
                let (notices_tx, notices_rx) = mpsc::channel(1024);
                let mut config = crate::controller::Config::new(leading.clone(), Some(identity));
                config.metrics = controller_metrics;
                // Ends only once the engine has dropped its channels; `lost` then decides.
                let controller = async {
                    crate::controller::run(client, config, sources_tx, updates_rx, notices_rx).await;
                    Ok(())
                };
                let channels = EngineChannels {
                    sources: sources_rx,
                    updates: updates_tx,
                    notices: notices_tx,
                };
                let serving = || {
                    ready_tx.send_replace(true);
                };
                let live = run_live(&opts, tls, verifier, engine_metrics, channels, serving, &mut stop);
                let mut lost = leading.clone();
                let lost = async move {
                    let _ = lost.wait_for(|l| !*l).await;
                    Err::<(), _>(anyhow::anyhow!(
                        "lost the lease: exiting so that only the leader programs nodes"
                    ))
                };
                // `live` ends on a stop, with the node channel closed; `lost` only fails.
                tokio::select! {
                    r = live => r,
                    r = async { tokio::try_join!(controller, lost).map(drop) } => r,
                }
            };
            let result = leader.await;
            if endpoint.is_none() {
                ready_tx.send_replace(false);
            }
            // Released whatever ended the leadership: a standby need not wait for it to expire.
            election.step_down().await;
            result
        }
    }
}

async fn serve_metrics(
    opts: &RunOptions,
    registry: prometheus_client::registry::Registry,
    ready: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if let Some(addr) = opts.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        tokio::spawn(crate::metrics::serve(listener, Arc::new(registry), ready));
    }
    Ok(())
}

/// The engine's ends of the channels to and from the source of truth.
pub struct EngineChannels {
    pub sources: mpsc::Receiver<SourceEvent>,
    pub updates: mpsc::Sender<StatusUpdate>,
    pub notices: mpsc::Sender<Notice>,
}

/// The engine and the node channel server, until the source goes away or `stop` resolves (then
/// `Ok`, with the listener closed when this returns). `serving` is called once the node channel
/// listens.
#[allow(clippy::too_many_arguments)]
pub async fn run_live(
    opts: &RunOptions,
    tls: Option<Tls>,
    verifier: Arc<dyn TokenVerifier>,
    metrics: EngineMetrics,
    channels: EngineChannels,
    serving: impl FnOnce() + Send,
    stop: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let EngineChannels {
        sources,
        updates,
        notices,
    } = channels;
    let config = EngineConfig {
        service_cidrs: opts.service_cidrs.clone(),
        pinned_flow_timeout: (!opts.pinned_flow_timeout.is_zero()).then_some(opts.pinned_flow_timeout),
        ..EngineConfig::with_grace(opts.heartbeat_grace)
    };
    let (hub, shim_events) = Hub::new(config.heartbeat_interval);
    let engine = Engine::new(config, hub.clone(), metrics);
    let listener = bind_when_free(opts.grpc_listen).await?;
    tracing::info!(addr = %opts.grpc_listen, tls = tls.is_some(), "serving the node channel");
    serving();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = opts.limits.server.clone();
    let server = tokio::spawn(async move {
        grpc::serve_with(listener, NodeService::new(hub, verifier), tls, &limits, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let result = tokio::select! {
        r = crate::engine::run(engine, sources, shim_events, updates, notices) => r,
        () = stop => Ok(()),
    };
    let _ = stop_tx.send(());
    // Not a graceful drain: the shims' sessions never end on their own, and the next leader must
    // not wait for them. Dropping the server closes the listener, so that the next leader can
    // bind the address; the sessions' connections close with the runtime as the process exits,
    // and the shims reconnect to the next leader.
    server.abort();
    let _ = server.await;
    result
}

/// Binds the node channel's address, waiting a little while it is still taken: a new leader may
/// get there just before the old one's listener is closed (a killed leader's lock and socket are
/// released one after the other). The listener has `SO_REUSEADDR` (tokio sets it), so the old
/// leader's connections in `TIME_WAIT` do not count.
async fn bind_when_free(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match grpc::bind(addr).await {
            Err(grpc::ServeError::Bind { source, .. })
                if tokio::time::Instant::now() < deadline
                    && source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return Ok(r?),
        }
    }
}

/// Without Kubernetes, status and notices are only logged.
async fn log_outputs(mut updates: mpsc::Receiver<StatusUpdate>, mut notices: mpsc::Receiver<Notice>) {
    loop {
        tokio::select! {
            Some(u) = updates.recv() => {
                let gateways: Vec<&str> = u.outcome.gateways.iter().map(|g| &*g.node).collect();
                // Which nodes are behind and why, as the Programmed condition says it: without a
                // cluster this log line is where a `dir:` user reads "n2: ... map full".
                let behind = u.behind.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                match crate::report::problem(&u.outcome) {
                    Some((reason, message)) => tracing::warn!(policy = %u.outcome.name, %reason, %message, programmed = u.programmed, to_program = u.to_program, %behind, "policy status"),
                    None if u.behind.iter().any(|b| matches!(b.why, crate::live::Behind::Failed { .. })) => tracing::warn!(policy = %u.outcome.name, ?gateways, endpoints = u.outcome.matched_endpoints, programmed = u.programmed, to_program = u.to_program, %behind, "policy status"),
                    None => tracing::info!(policy = %u.outcome.name, ?gateways, endpoints = u.outcome.matched_endpoints, programmed = u.programmed, to_program = u.to_program, %behind, "policy status"),
                }
            }
            Some(n) = notices.recv() => tracing::info!(notice = ?n, "event"),
            else => return,
        }
    }
}
