//! Convergence benchmark: from a manifest change to every affected shim's acknowledgement, with
//! a real gRPC server and 200 simulated shims (real clients, in this process) on a synthetic
//! cluster of 20,000 pods.
//!
//! `cargo bench -p sluice-operator --bench convergence` (environment: `CONVERGENCE_NODES`,
//! `CONVERGENCE_PODS`, `CONVERGENCE_CHANGES`). Each change adds a pod that a policy selects, on a
//! node that is not a gateway: its node and one gateway node must program it. The time of a
//! change is from handing it to the engine to the later of the two shims acknowledging the
//! state that holds it.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice_operator::{
    auth::StaticTokens,
    engine::{Engine, EngineConfig, EngineMetrics, Hub},
    grpc::{self, NodeService},
    live::SourceEvent,
    manifests::Manifests,
    planner::Change,
    synthetic::{self, Size},
};
use sluice_proto::{
    client::{self, Applied, Config, HelloFn},
    v2,
};
use tokio::sync::{mpsc, watch};

type Seen = Arc<Mutex<HashMap<IpAddr, Vec<(usize, Instant)>>>>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let size = Size {
        nodes: env("CONVERGENCE_NODES", 200),
        pods: env("CONVERGENCE_PODS", 20_000),
        policies: 10,
    };
    let changes = env("CONVERGENCE_CHANGES", 200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench(size, changes));
}

async fn bench(size: Size, changes: usize) {
    let config = EngineConfig::default();
    let (hub, shim_events) = Hub::new(config.heartbeat_interval);
    let engine = Engine::new(config, hub.clone(), EngineMetrics::default());
    let listener = grpc::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tokens = StaticTokens(
        (0..size.nodes)
            .map(|i| (format!("t{i}"), format!("node-{i}")))
            .collect(),
    );
    tokio::spawn(grpc::serve(
        listener,
        NodeService::new(hub, Arc::new(tokens)),
        None,
        std::future::pending(),
    ));
    let (sources, sources_rx) = mpsc::channel(65_536);
    let (updates_tx, mut updates) = mpsc::channel(1024);
    let (notices_tx, mut notices) = mpsc::channel(1024);
    tokio::spawn(async move { while updates.recv().await.is_some() {} });
    tokio::spawn(async move { while notices.recv().await.is_some() {} });
    tokio::spawn(sluice_operator::engine::run(
        engine,
        sources_rx,
        shim_events,
        updates_tx,
        notices_tx,
    ));

    // The shims: real clients; the "datapath" records when each source first appears.
    let seen: Seen = Arc::default();
    let mut acked: Vec<watch::Receiver<Applied>> = Vec::new();
    for i in 0..size.nodes {
        let mut c = Config::new(format!("http://{addr}"));
        c.token = Some(format!("t{i}"));
        let hello: HelloFn = Arc::new(move || v2::Hello {
            node: format!("node-{i}"),
            version: "bench".into(),
            ..Default::default()
        });
        let (updates_tx, mut updates) = client::updates();
        let (applied_tx, applied_rx) = watch::channel(Applied::default());
        acked.push(applied_rx.clone());
        tokio::spawn(client::run(c, hello, updates_tx, applied_rx));
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut table: BTreeMap<_, _> = BTreeMap::new();
            let mut state = None;
            while let Some(batch) = updates.next_batch().await {
                client::fold(&mut state, batch);
                let Some(state) = &state else {
                    continue;
                };
                let now = Instant::now();
                let mut fresh = Vec::new();
                for (k, e) in &state.entries {
                    if !table.contains_key(k) {
                        fresh.push(k.source);
                    }
                    table.insert(*k, e.clone());
                }
                table.retain(|k, _| state.entries.contains_key(k));
                if !fresh.is_empty() {
                    let mut seen = seen.lock().unwrap();
                    for source in fresh {
                        seen.entry(source).or_default().push((i, now));
                    }
                }
                applied_tx.send_replace(Applied {
                    session: state.session,
                    generation: state.generation,
                    errors: vec![],
                    conflicts: vec![],
                    ..Applied::default()
                });
            }
        });
    }

    let started = Instant::now();
    let cluster = synthetic::cluster(size);
    for change in Manifests::default().changes_to(&cluster) {
        sources.send(SourceEvent::Change(Box::new(change))).await.unwrap();
    }
    sources.send(SourceEvent::Synced).await.unwrap();
    // Initial convergence: every shim acknowledged something, then quiet for a while.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if acked.iter().all(|a| a.borrow().generation > 0) {
            break;
        }
    }
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let total: u64 = acked.iter().map(|a| a.borrow().generation).sum();
        if total == last {
            break;
        }
        last = total;
    }
    println!(
        "initial: {} nodes, {} pods, {} policies converged in {:?}",
        size.nodes,
        size.pods,
        size.policies,
        started.elapsed()
    );
    seen.lock().unwrap().clear();

    let mut latencies = Vec::new();
    let apps = size.policies * 2;
    let mut j = 0usize;
    while latencies.len() < changes {
        j += 1;
        // An even pod index is selected by a policy; skip gateway nodes (every 25th).
        let i = (j * 7) % (size.pods / apps) * apps + 2 * (j % size.policies);
        if (i % size.nodes).is_multiple_of(25) {
            continue;
        }
        let mut pod = synthetic::pod(i, size, 0);
        pod.uid = format!("bench-{j}");
        pod.name = format!("bench-{j}");
        let ip = IpAddr::V4(Ipv4Addr::new(10, 250, (j >> 8) as u8, j as u8));
        pod.ips = vec![ip];
        let t0 = Instant::now();
        sources
            .send(SourceEvent::Change(Box::new(Change::UpsertPod(pod))))
            .await
            .unwrap();
        let deadline = t0 + Duration::from_secs(10);
        loop {
            let holders = seen.lock().unwrap().get(&ip).cloned().unwrap_or_default();
            if holders.len() >= 2 {
                let done = holders.iter().map(|(_, t)| *t).max().unwrap();
                latencies.push(done - t0);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "change {j} never converged: {holders:?}"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    latencies.sort();
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    println!(
        "convergence over {} changes: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms, mean {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.9).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3,
    );
}
