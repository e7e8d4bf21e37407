//! The plan as a document (`plan --output json|table`) and as policy reports.

use std::fmt::Write as _;

use crate::plan::{
    EntryDoc, GatewayDuty as DutyDoc, GatewayReport, NodePlanDoc, PlanDocument, PolicyConflict, PolicyReport,
};

use crate::planner::{Planner, PolicyOutcome};

/// The whole plan as the stable JSON document of `docs/plan-format.md`.
pub fn document(planner: &Planner) -> PlanDocument {
    let nodes = planner
        .node_plans()
        .into_iter()
        .map(|(name, entries)| NodePlanDoc {
            // The in-cluster set is the caller's to add: it is not the planner's.
            cluster_cidrs: Vec::new(),
            guard: Some(crate::plan::Guard {
                destinations: planner.guarded_destinations(),
                decided_pods: planner.decided_pod_ips(&name),
            }),
            serves: planner
                .gateway_duties(&name)
                .into_iter()
                .map(|d| DutyDoc {
                    policy: d.policy.to_string(),
                    egress_ips: d.egress_ips,
                    interface: d.interface.map(|i| i.to_string()),
                })
                .collect(),
            name: name.to_string(),
            entries: entries
                .into_values()
                .map(|e| EntryDoc {
                    source: e.key.source,
                    destination: e.key.destination,
                    gateway: e.gateway,
                    egress_ip: e.egress_ip,
                    interface: e.interface.map(|i| i.to_string()),
                    source_node_ip: e.source_node_ip,
                    gateway_slot: e.gateway_slot.map(|(entry, slot)| crate::plan::GatewaySlotDoc {
                        entry: entry as u32,
                        slot: slot as u32,
                    }),
                    policy: e.policy.to_string(),
                })
                .collect(),
        })
        .collect();
    let policies = planner
        .policy_names()
        .filter_map(|name| planner.policy_outcome(name))
        .map(|o| policy_report(&o))
        .collect();
    PlanDocument { nodes, policies }
}

pub fn policy_report(outcome: &PolicyOutcome) -> PolicyReport {
    let problem = outcome.problem();
    PolicyReport {
        name: outcome.name.clone(),
        accepted: outcome.accepted.is_ok(),
        reason: problem.as_ref().map(|(r, _)| (*r).to_owned()),
        message: problem.map(|(_, m)| m),
        gateways: outcome
            .gateways
            .iter()
            .map(|g| GatewayReport {
                node: g.node.to_string(),
                ip: g.ip,
                egress_ip: g.egress_v4.or(g.egress_v6),
                interface: g.interface.as_ref().map(|i| i.to_string()),
            })
            .collect(),
        matched_endpoints: outcome.matched_endpoints as u64,
        conflicts: outcome
            .conflicts
            .iter()
            .map(|(policy, entries)| PolicyConflict {
                policy: policy.clone(),
                entries: *entries,
            })
            .collect(),
    }
}

/// The plan as aligned text tables, for people.
pub fn table(doc: &PlanDocument) -> String {
    let dash = |s: Option<String>| s.unwrap_or_else(|| "-".to_owned());
    let mut rows = vec![
        [
            "NODE",
            "SOURCE",
            "DESTINATION",
            "GATEWAY",
            "EGRESS IP",
            "INTERFACE",
            "POLICY",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for node in &doc.nodes {
        for e in &node.entries {
            rows.push(vec![
                node.name.clone(),
                e.source.to_string(),
                e.destination.to_string(),
                e.gateway.to_string(),
                dash(e.egress_ip.map(|i| i.to_string())),
                dash(e.interface.clone()),
                e.policy.clone(),
            ]);
        }
    }
    let mut out = align(&rows);
    out.push('\n');
    let mut rows = vec![
        [
            "POLICY",
            "ACCEPTED",
            "GATEWAYS",
            "EGRESS IPS",
            "ENDPOINTS",
            "REASON",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in &doc.policies {
        let join = |items: Vec<String>| {
            if items.is_empty() {
                "-".to_owned()
            } else {
                items.join(",")
            }
        };
        rows.push(vec![
            p.name.clone(),
            p.accepted.to_string(),
            join(p.gateways.iter().map(|g| g.node.clone()).collect()),
            join(
                p.gateways
                    .iter()
                    .filter_map(|g| g.egress_ip.map(|i| i.to_string()))
                    .collect(),
            ),
            p.matched_endpoints.to_string(),
            dash(p.reason.clone()),
        ]);
    }
    out.push_str(&align(&rows));
    for p in &doc.policies {
        if let Some(m) = &p.message {
            let _ = writeln!(out, "\n{}: {}", p.name, m);
        }
        for c in &p.conflicts {
            let _ = writeln!(
                out,
                "{}: loses {} entries to policy {}",
                p.name, c.entries, c.policy
            );
        }
    }
    out
}

fn align(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}
