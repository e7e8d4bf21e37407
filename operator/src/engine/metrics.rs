//! The engine's metrics.

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// The engine's metrics.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    /// From publishing a node's generation to its shim's acknowledgement of it.
    pub push_seconds: Histogram,
    /// Entries each node must hold, by `node`.
    pub entries: Family<Vec<(String, String)>, Gauge>,
    pub connected_shims: Gauge,
    pub failovers: Counter,
    /// From the last heartbeat of a lost gateway to the delta that replaces it.
    pub failover_seconds: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            push_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            entries: Family::default(),
            connected_shims: Gauge::default(),
            failovers: Counter::default(),
            failover_seconds: Histogram::new(exponential_buckets(0.05, 1.5, 14)),
        }
    }
}

impl EngineMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = EngineMetrics::default();
        registry.register(
            "push_seconds",
            "From publishing a node's plan generation to its shim's acknowledgement",
            m.push_seconds.clone(),
        );
        registry.register("node_entries", "Entries each node must hold", m.entries.clone());
        registry.register(
            "connected_shims",
            "Shims with an open session",
            m.connected_shims.clone(),
        );
        registry.register(
            "failovers",
            "Gateways replaced after their shim went silent",
            m.failovers.clone(),
        );
        registry.register(
            "failover_seconds",
            "From the last heartbeat of a lost gateway to the plan change that replaces it",
            m.failover_seconds.clone(),
        );
        m
    }
}
