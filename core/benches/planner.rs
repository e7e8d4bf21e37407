//! Planner benchmarks on a synthetic cluster of 500 nodes, 20,000 pods and 300 policies: the full
//! plan, the delta of one pod added, one pod relabelled and one gateway node lost, and the
//! planner's memory per pod. Results go to docs/benchmarks.md.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicIsize, Ordering},
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_core::{
    model::NodeInfo,
    planner::Planner,
    synthetic::{self, Size},
};

/// Counts live heap bytes, to measure the planner's memory.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

#[allow(
    unsafe_code,
    reason = "a global allocator must implement an unsafe trait; it only forwards to System"
)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SIZE: Size = Size {
    nodes: 500,
    pods: 20_000,
    policies: 300,
};

fn build() -> Planner {
    let m = synthetic::cluster(SIZE);
    Planner::from_snapshot(m.namespaces, m.nodes, m.policies, m.pods)
}

fn memory_report() {
    let before = LIVE.load(Ordering::Relaxed);
    let planner = build();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "planner memory: {:.1} MiB for {} pods, {} entries: {:.0} bytes per pod",
        bytes as f64 / (1 << 20) as f64,
        SIZE.pods,
        planner.entry_count(),
        bytes as f64 / SIZE.pods as f64
    );
    drop(planner);
}

/// Times `op` alone, undoing it untimed after every run so each run starts from the same state.
fn time_with_undo(
    planner: &mut Planner,
    iters: u64,
    mut op: impl FnMut(&mut Planner, u64),
    mut undo: impl FnMut(&mut Planner, u64),
) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let start = Instant::now();
        op(planner, i);
        total += start.elapsed();
        undo(planner, i);
    }
    total
}

fn benches(c: &mut Criterion) {
    memory_report();

    let mut group = c.benchmark_group("planner");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.bench_function("full plan (500 nodes, 20k pods, 300 policies)", |b| {
        b.iter(|| black_box(build()))
    });
    group.finish();

    let mut planner = build();
    let mut group = c.benchmark_group("delta");
    group.sample_size(50);

    // A new replica of a selected app on some node.
    group.bench_function("one pod added", |b| {
        b.iter_custom(|iters| {
            time_with_undo(
                &mut planner,
                iters,
                |p, i| {
                    drop(black_box(p.upsert_pod(synthetic::pod(
                        SIZE.pods + 2 * (i as usize % 300) * 2,
                        SIZE,
                        1,
                    ))))
                },
                |p, i| {
                    drop(p.remove_pod(&synthetic::pod(SIZE.pods + 2 * (i as usize % 300) * 2, SIZE, 1).uid))
                },
            )
        })
    });

    // A selected pod's labels change so that another policy selects it.
    group.bench_function("one pod relabelled", |b| {
        b.iter_custom(|iters| {
            time_with_undo(
                &mut planner,
                iters,
                |p, i| {
                    let mut pod = synthetic::pod((i as usize * 600) % SIZE.pods, SIZE, 0);
                    pod.labels.insert("app".into(), "app-2".into());
                    drop(black_box(p.upsert_pod(pod)));
                },
                |p, i| drop(p.upsert_pod(synthetic::pod((i as usize * 600) % SIZE.pods, SIZE, 0))),
            )
        })
    });

    // The `i`th of the 20 gateway-capable synthetic nodes, as `change` leaves it.
    let gateway = |i: u64, change: fn(&mut NodeInfo)| {
        let mut node = synthetic::node((i as usize % 20) * 25);
        change(&mut node);
        node
    };
    // A gateway node stops being ready: its policies fail over. A gateway node is drained
    // (cordoned): its slots go to other nodes, its pods follow.
    group.sample_size(20);
    let lost: fn(&mut NodeInfo) = |n| n.ready = false;
    let drained: fn(&mut NodeInfo) = |n| n.draining = true;
    for (name, change) in [
        ("one gateway node lost", lost),
        ("one gateway node drained", drained),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                time_with_undo(
                    &mut planner,
                    iters,
                    |p, i| drop(black_box(p.upsert_node(gateway(i, change)))),
                    |p, i| drop(p.upsert_node(gateway(i, |_| {}))),
                )
            })
        });
    }

    // A lost gateway node recovers (or a new one is added): it takes free slots and new pods,
    // no pod of a working gateway (sticky assignment).
    for i in 0..20 {
        drop(planner.upsert_node(gateway(i, lost)));
    }
    group.bench_function("one gateway node recovers", |b| {
        b.iter_custom(|iters| {
            time_with_undo(
                &mut planner,
                iters,
                |p, i| drop(black_box(p.upsert_node(gateway(i, |_| {})))),
                |p, i| drop(p.upsert_node(gateway(i, lost))),
            )
        })
    });
    group.finish();
}

criterion_group!(planner_benches, benches);
criterion_main!(planner_benches);
