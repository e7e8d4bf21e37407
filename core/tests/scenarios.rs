//! Scenario suite: Cilium's reference behaviour (its documentation and manager tests), retold in
//! our own words as manifest directories with expected plans.
//!
//! Layout: `tests/scenarios/<scenario>/base/` holds manifests every step shares;
//! `tests/scenarios/<scenario>/<NN-step>/` holds the step's own manifests and `expected.txt`, the
//! plan in the compact form below. Each step is planned twice: from scratch, and incrementally
//! from the previous step's planner (fed only the differences); both must match the expectation.
//!
//! `SLUICE_BLESS=1 cargo test --test scenarios` rewrites the expectations; review the diff.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use sluice_core::plan::PlanDocument;
use sluice_core::{
    manifests::Manifests,
    planner::{EgressEntry, EntryKey, Planner},
    report,
};

/// The plan in a form short enough to review by eye.
fn compact(doc: &PlanDocument) -> String {
    let mut out = String::new();
    for node in &doc.nodes {
        let _ = writeln!(out, "node {}", node.name);
        for e in &node.entries {
            let _ = write!(
                out,
                "  {} -> {} via {}",
                e.key.source, e.key.destination, e.gateway
            );
            if let Some(ip) = e.egress_ip {
                let _ = write!(out, " egress {ip}");
            }
            if let Some(i) = &e.interface {
                let _ = write!(out, " iface {i}");
            }
            let _ = writeln!(out, " [{}]", e.policy);
        }
        for d in &node.serves {
            let ips: Vec<String> = d.egress_ips.iter().map(|i| i.to_string()).collect();
            let _ = writeln!(
                out,
                "  serves {} egress [{}] iface {}{}",
                d.policy,
                ips.join(" "),
                d.interface.as_deref().unwrap_or("-"),
                if d.managed { " managed" } else { "" }
            );
        }
    }
    for p in &doc.policies {
        let state = if p.accepted { "accepted" } else { "rejected" };
        let gws: Vec<String> = p
            .gateways
            .iter()
            .map(|g| format!("{}({})", g.node, g.ip))
            .collect();
        let _ = write!(
            out,
            "policy {} {state} gateways [{}] endpoints {}",
            p.name,
            gws.join(" "),
            p.matched_endpoints
        );
        if let Some(r) = &p.reason {
            let _ = write!(out, " reason {r}");
        }
        for c in &p.conflicts {
            let _ = write!(out, " loses {} to {}", c.entries, c.policy);
        }
        let _ = writeln!(out);
    }
    out
}

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios")
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn load(scenario: &Path, step: &Path) -> Manifests {
    let mut m = Manifests::default();
    let base = scenario.join("base");
    if base.is_dir() {
        m.read_dir(&base).unwrap();
    }
    m.read_dir(step).unwrap();
    m
}

fn full(m: &Manifests) -> Planner {
    Planner::from_snapshot(
        m.namespaces.clone(),
        m.nodes.clone(),
        m.policies.clone(),
        m.pods.clone(),
    )
}

fn run_scenario(scenario: &Path) -> Vec<String> {
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let mut failures = Vec::new();
    let mut previous = Manifests::default();
    let mut incremental = Planner::new();
    // What every node holds if it applies every delta in order, starting from nothing.
    let mut tables: BTreeMap<String, BTreeMap<EntryKey, EgressEntry>> = BTreeMap::new();
    for step in subdirs(scenario).into_iter().filter(|d| !d.ends_with("base")) {
        let label = format!(
            "{}/{}",
            scenario.file_name().unwrap().to_string_lossy(),
            step.file_name().unwrap().to_string_lossy()
        );
        let manifests = load(scenario, &step);
        for change in previous.changes_to(&manifests) {
            for (node, delta) in incremental.apply(change).nodes {
                delta.apply_to(tables.entry(node.to_string()).or_default());
            }
        }
        // Which gateway each pod stays with is state, not input (pods are sticky): planning
        // from scratch takes it from the steps before, as a new operator takes it from the
        // datapaths.
        let mut scratch = full(&manifests);
        scratch.adopt_assignments(incremental.assignments());
        let from_scratch = compact(&report::document(&scratch));
        let incrementally = compact(&report::document(&incremental));
        if incrementally != from_scratch {
            failures.push(format!("{label}: incremental plan differs from full plan\n--- full\n{from_scratch}--- incremental\n{incrementally}"));
        }
        for (node, plan) in incremental.node_plans() {
            let held = tables.get(&*node).cloned().unwrap_or_default();
            if held != plan {
                failures.push(format!(
                    "{label}: node {node}: deltas add up to {held:?}, plan is {plan:?}"
                ));
            }
        }

        let expected_path = step.join("expected.txt");
        if bless {
            std::fs::write(&expected_path, &from_scratch).unwrap();
        } else {
            let expected = std::fs::read_to_string(&expected_path)
                .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
            if expected != from_scratch {
                failures.push(format!("{label}: plan differs from expected.txt\n--- expected\n{expected}--- planned\n{from_scratch}"));
            }
        }
        previous = manifests;
    }
    failures
}

#[test]
fn every_scenario_plans_as_expected() {
    let scenarios = subdirs(&scenarios_dir());
    assert!(scenarios.len() >= 8, "the scenario suite went missing");
    let failures: Vec<String> = scenarios.iter().flat_map(|s| run_scenario(s)).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
