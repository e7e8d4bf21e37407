//! The entry layout (`sluice_shim::layout`): how many map entries a node's entries take, and how
//! long laying them out takes, for the cases that make (pod, CIDR) entries multiply:
//!
//! - `allowlist`: one policy of 1,000 destination CIDRs (a SaaS allowlist) selecting 1,000 pods,
//!   spread over two gateways: 1,000,000 (pod, CIDR) pairs on the gateway;
//! - `sixty`: 60 such policies selecting the same 2 pods through one gateway: 120,000 pairs;
//! - `synthetic`: the planner's synthetic cluster (500 nodes, 20,000 pods, 300 policies), every
//!   node's entries as `sluice-operator plan` computes them.
//!
//! Before the timings it prints, per case, the pairs and the map entries they take (sources +
//! destinations), the largest node's too. `cargo bench -p sluice-shim --bench layout`.

use std::{
    collections::BTreeMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
};

use criterion::{Criterion, criterion_group, criterion_main};
use ipnet::Ipv4Net;
use sluice_operator::{
    planner::Planner,
    report,
    synthetic::{self, Size},
};
use sluice_shim::{
    desired::{self, Host, PolicyIds},
    layout::Layout,
    maps::{self, EntryValueV4, PolicyKeyV4},
};

type Entries = BTreeMap<PolicyKeyV4, EntryValueV4>;

fn gateway(last: u8, policy_id: u32) -> EntryValueV4 {
    EntryValueV4 {
        kind: maps::KIND_GATEWAY,
        flags: maps::F_LOCAL_GATEWAY,
        gateway_ip: maps::be(Ipv4Addr::new(192, 0, 2, last)),
        egress_ip: maps::be(Ipv4Addr::new(192, 0, 2, 100 + last)),
        egress_id: 1,
        policy_id,
        ..Default::default()
    }
}

fn cidr(i: u32) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + (i << 8)), 24).expect("a /24")
}

fn allowlist() -> Entries {
    let mut out = Entries::new();
    for pod in 0..1_000u32 {
        for c in 0..1_000 {
            let value = gateway(11 + (pod % 2) as u8, 1);
            out.insert(
                PolicyKeyV4::new(Ipv4Addr::from(0x0af4_0000 + pod), cidr(c)),
                value,
            );
        }
    }
    out
}

fn sixty() -> Entries {
    let mut out = Entries::new();
    for policy in 0..60u32 {
        for pod in 0..2u32 {
            for c in 0..1_000 {
                out.insert(
                    PolicyKeyV4::new(Ipv4Addr::from(0x0af4_0000 + pod), cidr(policy * 1_000 + c)),
                    gateway(13, policy + 1),
                );
            }
        }
    }
    out
}

/// Every node's entries of the synthetic cluster, as its shim computes them from the plan.
fn synthetic_nodes() -> Vec<Entries> {
    let size = Size {
        nodes: 500,
        pods: 20_000,
        policies: 300,
    };
    let m = synthetic::cluster(size);
    let planner = Planner::from_snapshot(m.namespaces, m.nodes, m.policies, m.pods);
    let doc = report::document(&planner);
    let mut ids = PolicyIds::default();
    (0..size.nodes)
        .filter_map(|i| {
            let node = synthetic::node(i);
            let section = doc.node(&node.name)?;
            let node_ip @ IpAddr::V4(_) = node.addresses[0] else {
                return None;
            };
            let host = Host {
                node_ip,
                interfaces: Vec::new(),
                default_route_interface: None,
                managed_not_held: Default::default(),
            };
            Some(
                desired::desired(&section.entries, &[], &host, &mut ids)
                    .ok()?
                    .policy,
            )
        })
        .collect()
}

fn report(case: &str, nodes: &[Entries]) {
    let laid: Vec<(usize, usize)> = nodes
        .iter()
        .map(|e| {
            let (l, _) = Layout::of(e, &Layout::default());
            (e.len(), l.sources.len() + l.destinations.len())
        })
        .collect();
    let pairs: usize = laid.iter().map(|(p, _)| p).sum();
    let entries: usize = laid.iter().map(|(_, e)| e).sum();
    let max_pairs = laid.iter().map(|(p, _)| *p).max().unwrap_or(0);
    let max_entries = laid.iter().map(|(_, e)| *e).max().unwrap_or(0);
    println!(
        "| {case} | {} | {pairs} | {entries} | {max_pairs} | {max_entries} |",
        nodes.len()
    );
}

fn bench(c: &mut Criterion) {
    let allowlist = allowlist();
    let sixty = sixty();
    let synthetic = synthetic_nodes();
    println!(
        "| case | nodes | (pod, CIDR) pairs | map entries (sources + destinations) | largest node: pairs | largest node: map entries |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    report(
        "allowlist: 1,000 pods x 1,000 CIDRs",
        std::slice::from_ref(&allowlist),
    );
    report(
        "sixty: 60 policies x 1,000 CIDRs, 2 pods",
        std::slice::from_ref(&sixty),
    );
    report("synthetic: 500 nodes, 20,000 pods, 300 policies", &synthetic);

    let mut g = c.benchmark_group("layout");
    g.sample_size(10);
    for (name, entries) in [("allowlist", &allowlist), ("sixty", &sixty)] {
        let (current, _) = Layout::of(entries, &Layout::default());
        g.bench_function(format!("{name}/from_empty"), |b| {
            b.iter(|| black_box(Layout::of(entries, &Layout::default())))
        });
        // A plan change on a node that already holds the entries: the ids of its groups are kept.
        g.bench_function(format!("{name}/over_current"), |b| {
            b.iter(|| black_box(Layout::of(entries, &current)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
