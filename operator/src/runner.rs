//! `sluice-operator run`: a source of truth, the engine, the node channel server and metrics.
//!
//! With `--source kubernetes`, only the leader runs the engine and serves shims: the process
//! waits for the Lease, and exits when it loses it (its pod restarts as a standby), so that two
//! engines never program the same nodes. The leader writes its own pod IP as the only endpoint of
//! the shims' selector-less Service (`--leader-service`); without that, the standby's `/readyz`
//! is 503, which keeps a selector-based Service pointed at the leader.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::{
    auth::{AllowAnyNode, StaticTokens, TokenReviewVerifier, TokenVerifier},
    engine::{Engine, EngineConfig, EngineMetrics, Hub},
    grpc::{self, NodeService, Tls},
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
}

fn tls(opts: &RunOptions) -> anyhow::Result<Option<Tls>> {
    match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(Tls {
            cert: std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            key: std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        })),
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

/// Runs until the source ends or something fails.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let mut registry = crate::metrics::registry();
    let engine_metrics = EngineMetrics::register(&mut registry);
    let tls = tls(&opts)?;
    match opts.source.clone() {
        Source::Dir(dir) => {
            let verifier = static_verifier(&opts)?.context(
                "the dir source needs --tokens-file (TOKEN NODE lines) or --insecure-allow-any-node",
            )?;
            let (_ready_tx, ready) = watch::channel(true);
            serve_metrics(&opts, registry, ready).await?;
            let (sources_tx, sources_rx) = mpsc::channel(1024);
            let (updates_tx, updates_rx) = mpsc::channel(256);
            let (notices_tx, notices_rx) = mpsc::channel(256);
            tokio::spawn(log_outputs(updates_rx, notices_rx));
            let watching = crate::dirsource::run(dir, opts.poll, sources_tx);
            let live = run_live(
                &opts,
                tls,
                verifier,
                engine_metrics,
                sources_rx,
                updates_tx,
                notices_tx,
            );
            tokio::try_join!(watching, live)?;
            Ok(())
        }
        Source::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes (for a cluster-less run use --source dir:PATH)")?;
            let controller_metrics = crate::metrics::ControllerMetrics::register(&mut registry);
            let verifier: Arc<dyn TokenVerifier> = match static_verifier(&opts)? {
                Some(v) => v,
                None => Arc::new(TokenReviewVerifier::new(
                    client.clone(),
                    opts.token_audience.clone(),
                    opts.shim_service_accounts.clone(),
                )),
            };
            let identity = std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("sluice-operator-{}", std::process::id()));
            let election = crate::controller::leader::LeaderElection::start(
                client.clone(),
                crate::controller::leader::LeaseConfig::new(
                    &opts.lease_namespace,
                    &opts.lease_name,
                    &identity,
                ),
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
            // only the leader anyway); without one, readiness is what steers the shims.
            let ready = if endpoint.is_some() {
                watch::channel(true).1
            } else {
                leading.clone()
            };
            serve_metrics(&opts, registry, ready).await?;
            tracing::info!(%identity, "waiting for the lease");
            leading.wait_for(|l| *l).await.context("leader election ended")?;
            tracing::info!("leading: starting the engine and the node channel");
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
            let controller = crate::controller::run(client, config, sources_tx, updates_rx, notices_rx);
            let live = run_live(
                &opts,
                tls,
                verifier,
                engine_metrics,
                sources_rx,
                updates_tx,
                notices_tx,
            );
            let lost = async {
                let _ = leading.wait_for(|l| !*l).await;
                Err::<(), _>(anyhow::anyhow!(
                    "lost the lease: exiting so that only the leader programs nodes"
                ))
            };
            tokio::try_join!(controller, live, lost)?;
            Ok(())
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

/// The engine and the node channel server, until the source goes away.
pub async fn run_live(
    opts: &RunOptions,
    tls: Option<Tls>,
    verifier: Arc<dyn TokenVerifier>,
    metrics: EngineMetrics,
    sources: mpsc::Receiver<SourceEvent>,
    updates: mpsc::Sender<StatusUpdate>,
    notices: mpsc::Sender<Notice>,
) -> anyhow::Result<()> {
    let config = EngineConfig::with_grace(opts.heartbeat_grace);
    let (hub, shim_events) = Hub::new(config.heartbeat_interval);
    let engine = Engine::new(config, hub.clone(), metrics);
    let listener = grpc::bind(opts.grpc_listen).await?;
    tracing::info!(addr = %opts.grpc_listen, tls = tls.is_some(), "serving the node channel");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(grpc::serve(
        listener,
        NodeService::new(hub, verifier),
        tls,
        async {
            let _ = stop_rx.await;
        },
    ));
    let result = crate::engine::run(engine, sources, shim_events, updates, notices).await;
    let _ = stop_tx.send(());
    server.abort();
    result
}

/// Without Kubernetes, status and notices are only logged.
async fn log_outputs(mut updates: mpsc::Receiver<StatusUpdate>, mut notices: mpsc::Receiver<Notice>) {
    loop {
        tokio::select! {
            Some(u) = updates.recv() => {
                let gateways: Vec<&str> = u.outcome.gateways.iter().map(|g| &*g.node).collect();
                match u.outcome.problem() {
                    Some((reason, message)) => tracing::warn!(policy = %u.outcome.name, %reason, %message, programmed = u.programmed, to_program = u.to_program, "policy status"),
                    None => tracing::info!(policy = %u.outcome.name, ?gateways, endpoints = u.outcome.matched_endpoints, programmed = u.programmed, to_program = u.to_program, "policy status"),
                }
            }
            Some(n) = notices.recv() => tracing::info!(notice = ?n, "event"),
            else => return,
        }
    }
}
