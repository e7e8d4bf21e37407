//! Prometheus metrics and the health endpoints of the operator.
//!
//! One [`Registry`] (prefix `sluice`) for the whole process: create it with [`registry`], let
//! every part register its metrics into it (the Kubernetes layer with
//! [`ControllerMetrics::register`], the engine with its own), then hand it to [`serve`], which
//! answers:
//! - `GET /metrics`: OpenMetrics text;
//! - `GET /healthz`: 200 while the process runs;
//! - `GET /readyz`: 200 while `ready` holds `true`, else 503. With a selector-based
//!   Service for the shims, pass the leader election's receiver: the standby then reports not
//!   ready and the Service routes to the leader (the chart uses `--leader-service` instead).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};

/// The process-wide registry, with the `sluice` prefix.
pub fn registry() -> Registry {
    Registry::with_prefix("sluice")
}

/// Label set of the controller's counters: `[(name, value); N]`.
pub type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Latency buckets from 100 µs to ~6.5 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// The Kubernetes layer's metrics. Cheap to clone (every field is shared).
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    /// Watch events by `kind` (Pod, Node, Namespace, EgressGatewayPolicy) and `event`
    /// (apply, delete, relist).
    pub watch_events: Family<Labels<2>, Counter>,
    /// Watch failures by `kind` (each is retried with backoff).
    pub watch_errors: Family<Labels<1>, Counter>,
    /// Changes handed to the engine by `kind`, after dropping those that change nothing the
    /// planner reads (status heartbeats, container restarts).
    pub changes: Family<Labels<1>, Counter>,
    /// From a watch event's arrival to its change being queued for the engine (conversion and
    /// back-pressure): the controller's reconcile latency.
    pub reconcile_seconds: Histogram,
    /// Duration of status writes (server-side apply on `status`).
    pub status_write_seconds: Histogram,
    /// Status writes by `result`: written, unchanged (skipped), gone (policy deleted), failed.
    pub status_writes: Family<Labels<1>, Counter>,
    /// Kubernetes Events by `reason` and `result` (published, failed).
    pub events: Family<Labels<2>, Counter>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Times this replica became leader.
    pub leader_transitions: Counter,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        ControllerMetrics {
            watch_events: Family::default(),
            watch_errors: Family::default(),
            changes: Family::default(),
            reconcile_seconds: latency_histogram(),
            status_write_seconds: latency_histogram(),
            status_writes: Family::default(),
            events: Family::default(),
            leader: Gauge::default(),
            leader_transitions: Counter::default(),
        }
    }
}

impl ControllerMetrics {
    /// Creates the metrics and registers them under `sluice_controller_*` / `sluice_leader*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ControllerMetrics::default();
        let sub = registry.sub_registry_with_prefix("controller");
        sub.register("watch_events", "Watch events received", m.watch_events.clone());
        sub.register(
            "watch_errors",
            "Watch failures (retried with backoff)",
            m.watch_errors.clone(),
        );
        sub.register(
            "changes",
            "Changes handed to the planning engine",
            m.changes.clone(),
        );
        sub.register(
            "reconcile_seconds",
            "From a watch event to its change queued for the engine",
            m.reconcile_seconds.clone(),
        );
        sub.register(
            "status_write_seconds",
            "Duration of server-side-apply status writes",
            m.status_write_seconds.clone(),
        );
        sub.register(
            "status_writes",
            "Status writes by result",
            m.status_writes.clone(),
        );
        sub.register(
            "events",
            "Kubernetes Events by reason and result",
            m.events.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        registry.register(
            "leader_acquisitions",
            "Times this replica became leader",
            m.leader_transitions.clone(),
        );
        m
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (registry, ready) = (registry.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = respond(&req, &registry, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics: connection ended");
            }
        });
    }
}

/// Binds `addr` and serves on it (see [`serve`]); returns the bound address (useful with port 0)
/// and the server task.
pub async fn spawn(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(serve(listener, registry, ready))))
}

fn respond<B>(req: &Request<B>, registry: &Registry, ready: &watch::Receiver<bool>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a static response is valid")
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into(), PLAIN);
    }
    match req.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" if *ready.borrow() => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not the leader\n".into(),
            PLAIN,
        ),
        "/metrics" => {
            let mut body = String::new();
            match encode(&mut body, registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"), PLAIN),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    #[tokio::test]
    async fn health_readiness_follows_leadership_and_metrics_are_exposed() {
        let mut registry = registry();
        let m = ControllerMetrics::register(&mut registry);
        m.status_writes.get_or_create(&[("result", "written")]).inc();
        m.status_write_seconds.observe(0.002);
        m.leader.set(1);
        let (tx, rx) = watch::channel(false);
        let (addr, task) = spawn("127.0.0.1:0".parse().unwrap(), Arc::new(registry), rx)
            .await
            .unwrap();

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        tx.send(true).unwrap();
        assert_eq!(get(addr, "/readyz").await.0, 200);
        assert_eq!(get(addr, "/nope").await.0, 404);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("sluice_controller_status_writes_total{result=\"written\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("sluice_controller_status_write_seconds_count 1"),
            "{body}"
        );
        assert!(body.contains("sluice_leader 1"), "{body}");
        assert!(body.ends_with("# EOF\n"));
        task.abort();
    }
}
