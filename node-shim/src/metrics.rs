//! Prometheus metrics over HTTP: datapath counters (read from the maps on each tick) and the
//! shim's own health.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
};

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
    pub policy_entries: u64,
    pub policy_map_max: u64,
    pub attached_interfaces: u64,
    pub map_writes: u64,
    pub apply_errors: u64,
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
                "Entries in the policy map",
                s.policy_entries,
            ),
            (
                "sluice_policy_map_max_entries",
                "Capacity of the policy map",
                s.policy_map_max,
            ),
            (
                "sluice_attached_interfaces",
                "Interfaces the datapath is attached to",
                s.attached_interfaces,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(family)?;
        }
        for (name, help, value) in [
            (
                "sluice_map_writes",
                "Policy map writes (upserts and deletes)",
                s.map_writes,
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
        Ok(())
    }
}

/// Serves `GET /metrics` (any path, in fact) on `addr` from a background thread.
pub fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let registry = metrics.registry();
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            // Read the request head; the body (there is none for GET) is ignored.
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let mut body = String::new();
            if prometheus_client::encoding::text::encode(&mut body, &registry).is_err() {
                continue;
            }
            let mut stream = &stream;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn metrics_are_served_over_http() {
        use std::io::Read;
        let m = Metrics::default();
        m.update(|s| s.map_writes = 7);
        let addr = serve("127.0.0.1:0".parse().unwrap(), m).unwrap();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("sluice_map_writes_total 7"), "{response}");
    }
}
