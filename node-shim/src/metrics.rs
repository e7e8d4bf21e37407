//! Prometheus metrics over HTTP: datapath counters (read from the maps on each tick) and the
//! shim's own health.
//!
//! The server answers `GET /metrics` (OpenMetrics text) and `GET /healthz` (whether the agent
//! loop completed a tick recently). It listens on the host network, where any pod can reach it,
//! so no client may hold it: every connection has a deadline for its request head and an overall
//! one, and only [`Limits::max_connections`] are served at once (the rest wait in the listen
//! backlog, costing the shim no file descriptor).

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::maps::Counter;

/// The latest values, refreshed by the run loop.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// (outcome, counter).
    pub outcomes: Vec<(&'static str, Counter)>,
    /// (policy name, counter).
    pub policies: Vec<(String, Counter)>,
    /// Entries as users think of them, (source, destination), of both families.
    pub policy_entries: u64,
    /// What the sources and destinations maps hold, and their capacities.
    pub source_entries: u64,
    pub destination_entries: u64,
    pub source_map_max: u64,
    pub policy_map_max: u64,
    /// Plans refused whole because they did not fit the maps.
    pub plans_refused: u64,
    pub attached_interfaces: u64,
    /// Pod interfaces that receive traffic Sluice's program never sees.
    pub bypassed_interfaces: u64,
    pub map_writes: u64,
    pub apply_errors: u64,
    /// (kind of kernel object, times it was missing or changed and the shim put it back).
    pub restored: Vec<(&'static str, u64)>,
    /// When the agent loop last completed a tick (see [`Metrics::tick_completed`]).
    pub last_tick: Option<Instant>,
}

/// Shared between the run loop and the HTTP server.
#[derive(Debug, Default, Clone)]
pub struct Metrics(Arc<Mutex<Snapshot>>);

impl Metrics {
    /// Replaces the snapshot.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
    }

    /// Records that the agent loop completed a tick: `/healthz` reports the loop as alive.
    pub fn tick_completed(&self) {
        self.update(|s| s.last_tick = Some(Instant::now()));
    }

    /// The registry exposing this snapshot.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        registry
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (name, help, pick) in [
            (
                "sluice_datapath_packets",
                "Packets by datapath outcome",
                (|c: &Counter| c.packets) as fn(&Counter) -> u64,
            ),
            (
                "sluice_datapath_bytes",
                "Bytes by datapath outcome",
                |c: &Counter| c.bytes,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (outcome, c) in &s.outcomes {
                let labels = [("outcome", outcome.to_string())];
                ConstCounter::new(pick(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, pick) in [
            (
                "sluice_policy_packets",
                "Packets matched by policy",
                (|c: &Counter| c.packets) as fn(&Counter) -> u64,
            ),
            ("sluice_policy_bytes", "Bytes matched by policy", |c: &Counter| {
                c.bytes
            }),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (policy, c) in &s.policies {
                let labels = [("policy", policy.clone())];
                ConstCounter::new(pick(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, value) in [
            (
                "sluice_policy_map_entries",
                "Entries (source pod, destination CIDR) the datapath holds, IPv4 and IPv6",
                s.policy_entries,
            ),
            (
                "sluice_source_map_entries",
                "Entries in the sources map (pods steered or served here)",
                s.source_entries,
            ),
            (
                "sluice_source_map_max_entries",
                "Capacity of the sources map",
                s.source_map_max,
            ),
            (
                "sluice_destination_map_entries",
                "Entries in the destinations map (destination CIDRs per source group)",
                s.destination_entries,
            ),
            (
                "sluice_policy_map_max_entries",
                "Capacity of the destinations map",
                s.policy_map_max,
            ),
            (
                "sluice_attached_interfaces",
                "Interfaces the datapath is attached to",
                s.attached_interfaces,
            ),
            (
                "sluice_bypassed_interfaces",
                "Pod interfaces that receive traffic Sluice's program never sees (a program ahead of it takes every packet)",
                s.bypassed_interfaces,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(family)?;
        }
        for (name, help, value) in [
            (
                "sluice_map_writes",
                "Entry map writes (upserts and deletes)",
                s.map_writes,
            ),
            (
                "sluice_plans_refused",
                "Plans refused whole because they do not fit the maps (the node keeps its previous entries)",
                s.plans_refused,
            ),
            (
                "sluice_apply_errors",
                "Failed attempts to apply the plan",
                s.apply_errors,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        let mut family = encoder.encode_descriptor(
            "sluice_state_restored",
            "Kernel objects of Sluice (nftables table, rules, routes) that someone else removed or changed, put back",
            None,
            MetricType::Counter,
        )?;
        for (object, count) in &s.restored {
            let labels = [("object", object.to_string())];
            ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// What one client may hold of the server, and when `/healthz` turns unhealthy.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a connection has to send a complete request head, counted from when the server
    /// starts waiting for one (so it also bounds the idle time between keep-alive requests).
    pub header_read: Duration,
    /// Time after which a connection is closed, whatever it is doing; a response under way gets
    /// [`CLOSE_GRACE`] to finish.
    pub connection: Duration,
    /// Connections served at once; later ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// `/healthz` fails once the last completed tick (or the start, before the first) is older.
    pub stale_after: Duration,
}

/// How long a connection past its [`Limits::connection`] deadline may take to finish the
/// response it is writing.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

impl Limits {
    /// The limits for an agent that ticks every `interval`: stale after three missed ticks, but
    /// never sooner than 15 s, so that one slow apply (a large plan, a busy node) is not taken for
    /// a stuck loop.
    pub fn for_interval(interval: Duration) -> Self {
        Limits {
            header_read: Duration::from_secs(5),
            connection: Duration::from_secs(30),
            // Prometheus and the kubelet's probe need a handful; the cap keeps a flood of idle
            // connections from taking the descriptors the datapath needs.
            max_connections: 32,
            stale_after: (interval.saturating_mul(3)).max(Duration::from_secs(15)),
        }
    }
}

/// A running metrics server: a task on the runtime it was started from. Dropping the handle
/// leaves the server running for the life of that runtime (as the agent wants); [`Server::stop`]
/// ends it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and drops every open connection; the port is closed once this returns.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// Serves `/metrics` and `/healthz` on `addr` as a task of the current Tokio runtime (the
/// shim's one runtime; the agent calls this from its blocking pool). Fails without a runtime.
pub fn serve(addr: SocketAddr, metrics: Metrics, limits: Limits) -> std::io::Result<Server> {
    let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    // Bound here, so that a taken port or a foreign address fails the start.
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let endpoints = Arc::new(Endpoints {
        registry: metrics.registry(),
        metrics,
        started: Instant::now(),
        stale_after: limits.stale_after,
    });
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let task = runtime.spawn(async move {
        tokio::select! {
            () = stopped.notified() => {}
            () = accept(listener, endpoints, limits) => {}
        }
    });
    Ok(Server { addr, stop, task })
}

async fn accept(listener: tokio::net::TcpListener, endpoints: Arc<Endpoints>, limits: Limits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    // Owned here, so that stopping the server (dropping this future) aborts every connection.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Finished connections are reaped before each new one: at most `max_connections` can
        // finish between two accepts, so the set stays within twice that.
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: give the open connections time to close.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let response = endpoints.respond(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut conn = pin!(
                http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read)
                    .serve_connection(TokioIo::new(stream), service)
            );
            match tokio::time::timeout(limits.connection, conn.as_mut()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics: connection ended"),
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
                }
            }
        });
    }
}

/// What the server answers from.
struct Endpoints {
    registry: Registry,
    metrics: Metrics,
    started: Instant,
    stale_after: Duration,
}

impl Endpoints {
    fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        const PLAIN: &str = "text/plain; charset=utf-8";
        let text = |status: StatusCode, body: String, content_type: &'static str| {
            Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("a static response is valid")
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into(), PLAIN);
        }
        match req.uri().path() {
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => text(
                        StatusCode::OK,
                        body,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"), PLAIN),
                }
            }
            "/healthz" | "/livez" => {
                let last_tick = self.metrics.0.lock().unwrap_or_else(|e| e.into_inner()).last_tick;
                let (healthy, message) = liveness(last_tick, self.started, Instant::now(), self.stale_after);
                let status = if healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(status, message, PLAIN)
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
        }
    }
}

/// Whether the agent loop is alive at `now`, and a line saying why.
fn liveness(
    last_tick: Option<Instant>,
    started: Instant,
    now: Instant,
    stale_after: Duration,
) -> (bool, String) {
    let limit = stale_after.as_secs_f64();
    match last_tick {
        Some(at) => {
            let age = now.saturating_duration_since(at).as_secs_f64();
            if age <= limit {
                (true, format!("ok: last tick {age:.1}s ago\n"))
            } else {
                (
                    false,
                    format!("stale: last tick {age:.1}s ago (limit {limit:.0}s)\n"),
                )
            }
        }
        None => {
            let age = now.saturating_duration_since(started).as_secs_f64();
            if age <= limit {
                (true, format!("ok: starting, no tick yet ({age:.1}s)\n"))
            } else {
                (
                    false,
                    format!("stale: no tick completed {age:.1}s after start (limit {limit:.0}s)\n"),
                )
            }
        }
    }
}

/// The metrics listen address `address`: `IP:PORT`, `[IPv6]:PORT`, or an IPv6 address and port
/// without brackets (`fd00::1:9473`, as the chart writes `$(SLUICE_NODE_IP):PORT` on a node whose
/// IP is IPv6: the last colon is the port's).
pub fn listen_address(address: &str) -> Option<std::net::SocketAddr> {
    if let Ok(a) = address.parse() {
        return Some(a);
    }
    let (ip, port) = address.rsplit_once(':')?;
    Some(std::net::SocketAddr::new(
        ip.parse::<std::net::Ipv6Addr>().ok()?.into(),
        port.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream,
    };

    use super::*;

    #[test]
    fn counters_are_exposed_with_labels() {
        let m = Metrics::default();
        m.update(|s| {
            s.outcomes = vec![(
                "steered",
                Counter {
                    packets: 3,
                    bytes: 300,
                },
            )];
            s.policies = vec![(
                "egress-a".into(),
                Counter {
                    packets: 2,
                    bytes: 20,
                },
            )];
            s.policy_entries = 5;
        });
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry()).unwrap();
        assert!(
            out.contains("sluice_datapath_packets_total{outcome=\"steered\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("sluice_policy_bytes_total{policy=\"egress-a\"} 20"),
            "{out}"
        );
        assert!(out.contains("sluice_policy_map_entries 5"), "{out}");
    }

    /// The bound the issue sets for an answer while other clients misbehave.
    const ANSWER_WITHIN: Duration = Duration::from_secs(1);

    fn limits() -> Limits {
        Limits::for_interval(Duration::from_secs(1))
    }

    /// The server runs on the runtime's worker while the test thread plays blocking clients.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn start(rt: &tokio::runtime::Runtime, metrics: Metrics, limits: Limits) -> Server {
        let _context = rt.enter();
        serve("127.0.0.1:0".parse().unwrap(), metrics, limits).unwrap()
    }

    /// Sends `GET path` and reads the whole response, giving up (and failing) after `within`.
    fn get_within(addr: SocketAddr, path: &str, within: Duration) -> (u16, String) {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&addr, within).unwrap();
        stream.set_read_timeout(Some(within)).unwrap();
        stream.set_write_timeout(Some(within)).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("GET {path}: no complete answer within {within:?}: {e}"));
        assert!(
            started.elapsed() < within,
            "GET {path} took {:?}",
            started.elapsed()
        );
        let code = response
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        get_within(addr, path, ANSWER_WITHIN)
    }

    /// Holds a connection that sent half a request line and then nothing.
    fn half_request(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"GET /metr").unwrap();
        stream
    }

    /// Reads until the server closes the connection; fails if it is still open after `within`.
    fn closed_by_server(mut stream: TcpStream, within: Duration) {
        stream.set_read_timeout(Some(within)).unwrap();
        let mut rest = Vec::new();
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            // A reset is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the server kept an idle connection open for {within:?}: {e}"),
        }
    }

    #[test]
    fn metrics_and_health_are_served_over_http() {
        let rt = runtime();
        let m = Metrics::default();
        m.update(|s| s.map_writes = 7);
        let server = start(&rt, m.clone(), limits());
        let addr = server.local_addr();
        let (code, body) = get(addr, "/metrics");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("sluice_map_writes_total 7"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (code, body) = get(addr, "/healthz");
        assert_eq!((code, body.starts_with("ok: starting")), (200, true), "{body}");
        m.tick_completed();
        let (code, body) = get(addr, "/healthz");
        assert_eq!((code, body.starts_with("ok: last tick")), (200, true), "{body}");
        assert_eq!(get(addr, "/").0, 404);
        rt.block_on(server.stop());
    }

    #[test]
    fn idle_connections_do_not_stall_the_server() {
        let rt = runtime();
        let m = Metrics::default();
        m.update(|s| s.map_writes = 3);
        m.tick_completed();
        let server = start(&rt, m, limits());
        let addr = server.local_addr();
        // Accepted first, so a server that reads one connection at a time is stuck on it.
        let _half = half_request(addr);
        let _idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let _more_halves: Vec<TcpStream> = (0..4).map(|_| half_request(addr)).collect();
        for _ in 0..3 {
            let (code, body) = get(addr, "/metrics");
            assert_eq!(code, 200, "{body}");
            assert!(body.contains("sluice_map_writes_total 3"), "{body}");
            let (code, body) = get(addr, "/healthz");
            assert_eq!(code, 200, "{body}");
        }
        rt.block_on(server.stop());
    }

    #[test]
    fn healthz_turns_unavailable_when_ticks_stop() {
        let rt = runtime();
        let m = Metrics::default();
        let server = start(
            &rt,
            m.clone(),
            Limits {
                stale_after: Duration::from_secs(60),
                ..limits()
            },
        );
        let addr = server.local_addr();
        m.tick_completed();
        assert_eq!(get(addr, "/healthz").0, 200);
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(120))
            .expect("the monotonic clock has run for two minutes");
        m.update(|s| s.last_tick = Some(long_ago));
        let (code, body) = get(addr, "/healthz");
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("stale: last tick 120."), "{body}");
        // The endpoint that the metrics come from is unaffected.
        assert_eq!(get(addr, "/metrics").0, 200);
        m.tick_completed();
        assert_eq!(get(addr, "/healthz").0, 200);
        rt.block_on(server.stop());

        // No tick at all since the start.
        let server = start(
            &rt,
            Metrics::default(),
            Limits {
                stale_after: Duration::ZERO,
                ..limits()
            },
        );
        let (code, body) = get(server.local_addr(), "/healthz");
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("stale: no tick completed"), "{body}");
        rt.block_on(server.stop());
    }

    #[test]
    fn liveness_follows_the_last_tick() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let stale_after = Duration::from_secs(15);
        assert!(liveness(None, start, at(15), stale_after).0);
        assert!(!liveness(None, start, at(16), stale_after).0);
        assert!(liveness(Some(at(100)), start, at(115), stale_after).0);
        let (alive, message) = liveness(Some(at(100)), start, at(142), stale_after);
        assert!(!alive);
        assert_eq!(message, "stale: last tick 42.0s ago (limit 15s)\n");
        assert_eq!(
            Limits::for_interval(Duration::from_secs(1)).stale_after,
            Duration::from_secs(15)
        );
        assert_eq!(
            Limits::for_interval(Duration::from_secs(10)).stale_after,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn idle_connections_are_closed_by_the_server() {
        let rt = runtime();
        // A request head that never completes: closed after the header read timeout.
        let server = start(
            &rt,
            Metrics::default(),
            Limits {
                header_read: Duration::from_millis(200),
                ..limits()
            },
        );
        closed_by_server(half_request(server.local_addr()), Duration::from_secs(5));
        rt.block_on(server.stop());

        // Whatever a connection does, it ends at the connection deadline.
        let server = start(
            &rt,
            Metrics::default(),
            Limits {
                header_read: Duration::from_secs(600),
                connection: Duration::from_millis(200),
                ..limits()
            },
        );
        closed_by_server(
            TcpStream::connect(server.local_addr()).unwrap(),
            Duration::from_secs(5),
        );
        rt.block_on(server.stop());
    }

    #[test]
    fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let rt = runtime();
        let header_read = Duration::from_millis(300);
        let server = start(
            &rt,
            Metrics::default(),
            Limits {
                header_read,
                max_connections: 2,
                ..limits()
            },
        );
        let addr = server.local_addr();
        let opened = Instant::now();
        let _idle: Vec<TcpStream> = (0..2).map(|_| half_request(addr)).collect();
        // Served only once an idle connection has been closed for its unfinished head.
        let (code, _) = get_within(addr, "/healthz", Duration::from_secs(5));
        assert_eq!(code, 200);
        assert!(
            opened.elapsed() >= header_read,
            "a third connection was served beside two: the cap is not enforced"
        );
        rt.block_on(server.stop());
    }

    #[test]
    fn stop_closes_the_port_and_every_open_connection() {
        let rt = runtime();
        let server = start(
            &rt,
            Metrics::default(),
            Limits {
                // Only stopping may close the held connection within the test's bounds.
                header_read: Duration::from_secs(600),
                connection: Duration::from_secs(600),
                ..limits()
            },
        );
        let addr = server.local_addr();
        let held = half_request(addr);
        // Accepted after the held one: once answered, the held connection has its own task.
        assert_eq!(get(addr, "/healthz").0, 200);
        rt.block_on(server.stop());
        closed_by_server(held, Duration::from_secs(5));
        let refused = TcpStream::connect(addr).map_err(|e| e.kind());
        assert_eq!(
            refused.err(),
            Some(std::io::ErrorKind::ConnectionRefused),
            "the port still accepts after stop"
        );
    }

    #[test]
    fn serving_needs_the_callers_runtime() {
        let err = serve("127.0.0.1:0".parse().unwrap(), Metrics::default(), limits())
            .expect_err("served without a runtime to run on");
        assert!(err.to_string().contains("runtime"), "{err}");
    }
}
