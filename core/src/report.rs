//! The plan as a document (`plan --output json|table`) and as policy reports, and the words for
//! what keeps a policy from working (which its status conditions say too).

use std::fmt::Write as _;

use crate::plan::{GatewayReport, NodePlanDoc, PlanDocument, PolicyConflict, PolicyReport};

use crate::{
    planner::{GatewayDiagnosis, Planner, PolicyOutcome},
    policy::EgressSource,
};

/// The whole plan as the stable JSON document of `docs/plan-format.md`.
pub fn document(planner: &Planner) -> PlanDocument {
    let nodes = planner
        .node_plans()
        .into_iter()
        .map(|(name, entries)| NodePlanDoc {
            // The in-cluster set is the caller's to add: it is not the planner's.
            cluster_cidrs: Vec::new(),
            pinnable_gateways: Vec::new(),
            guard: Some(crate::plan::Guard {
                destinations: planner.guarded_destinations(),
                decided_pods: planner.decided_pod_ips(&name),
            }),
            serves: planner.gateway_duties(&name),
            name: name.to_string(),
            entries: entries.into_values().collect(),
        })
        .collect();
    let policies = planner
        .policy_names()
        .filter_map(|name| planner.policy_outcome(name))
        .map(|o| policy_report(&o))
        .collect();
    PlanDocument { nodes, policies }
}

/// The reason and message of whatever keeps a policy from working, if anything does: what its
/// report says, and its `GatewaySelected` condition.
pub fn problem(outcome: &PolicyOutcome) -> Option<(&'static str, String)> {
    match &outcome.accepted {
        Err(e) => Some((e.reason, e.message.clone())),
        Ok(()) if outcome.gateways.is_empty() => Some((
            "NoGatewayAvailable",
            format!(
                "no usable gateway node: {}",
                unusable_gateways(&outcome.gateway_diagnosis)
            ),
        )),
        Ok(()) => None,
    }
}

/// Per gateway entry, how many nodes match its selector and why they cannot serve.
fn unusable_gateways(diagnosis: &[GatewayDiagnosis]) -> String {
    let entries: Vec<String> = diagnosis
        .iter()
        .map(|d| {
            let egress = match &d.egress {
                EgressSource::Interface(name) => format!("interface {name:?}"),
                EgressSource::Ip(ip) => format!("egress IP {ip}"),
                EgressSource::DefaultRoute => "a default route".to_owned(),
                EgressSource::Managed {
                    interface: Some(name),
                    ..
                } => format!("interface {name:?} (for egressIPs)"),
                EgressSource::Managed { interface: None, .. } => {
                    "an interface on the subnet of egressIPs, or a default route".to_owned()
                }
            };
            let mut why = vec![format!(
                "{} node(s) match the nodeSelector of gateway {}",
                d.matching, d.entry
            )];
            for (n, text) in [
                (d.not_ready, "not Ready".to_owned()),
                (d.ineligible, "without a healthy shim".to_owned()),
                (d.no_address, "without an InternalIP".to_owned()),
                (d.lacking_egress, format!("without {egress}")),
            ] {
                if n > 0 {
                    why.push(format!("{n} {text}"));
                }
            }
            why.join(", ")
        })
        .collect();
    entries.join("; ")
}

pub fn policy_report(outcome: &PolicyOutcome) -> PolicyReport {
    let problem = problem(outcome);
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
                e.key.source.to_string(),
                e.key.destination.to_string(),
                e.gateway.to_string(),
                dash(e.egress_ip.map(|i| i.to_string())),
                dash(e.interface.as_deref().map(str::to_owned)),
                e.policy.to_string(),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::{
        api::{EgressGateway, EgressGatewayPolicySpec, EgressRule},
        model::{InterfaceInfo, NodeInfo, PolicyInput},
    };

    fn pool(name: &str) -> LabelSelector {
        LabelSelector {
            match_labels: Some(BTreeMap::from([("pool".to_owned(), name.to_owned())])),
            ..Default::default()
        }
    }

    fn node(name: &str, pool: &str, ready: bool, eligible: bool, address: bool) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: BTreeMap::from([("pool".to_owned(), pool.to_owned())]),
            addresses: if address {
                vec!["172.18.0.9".parse().unwrap()]
            } else {
                vec![]
            },
            ready,
            eligible,
            interfaces: Some(vec![InterfaceInfo {
                name: "eth0".into(),
                addresses: vec!["172.18.0.9".parse().unwrap()],
                networks: vec!["172.18.0.0/16".parse().unwrap()],
                default_route: false,
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn no_usable_gateway_says_what_each_matching_node_lacks() {
        let gateway = |pool_name: &str, interface: Option<&str>, egress_ip: Option<&str>| EgressGateway {
            node_selector: pool(pool_name),
            interface: interface.map(str::to_owned),
            egress_ip: egress_ip.map(str::to_owned),
            ..Default::default()
        };
        let policy = PolicyInput {
            name: "p".into(),
            spec: EgressGatewayPolicySpec {
                selectors: vec![EgressRule {
                    pod_selector: Some(LabelSelector::default()),
                    ..Default::default()
                }],
                destination_cidrs: vec!["203.0.113.0/24".into()],
                egress_gateways: vec![
                    gateway("a", Some("eth1"), None),
                    gateway("b", None, Some("192.0.2.9")),
                    gateway("c", None, None),
                    gateway("d", None, None),
                ],
                ..Default::default()
            },
            ..Default::default()
        };
        let nodes = [
            node("a1", "a", false, true, true),
            node("a2", "a", true, false, true),
            node("a3", "a", true, true, false),
            node("a4", "a", true, true, true),
            node("a5", "a", false, false, false),
            node("b1", "b", true, true, true),
            node("d1", "d", true, true, true),
        ];
        let planner = Planner::from_snapshot([], nodes, [policy], []);
        let report = policy_report(&planner.policy_outcome("p").unwrap());
        assert_eq!(report.reason.as_deref(), Some("NoGatewayAvailable"));
        assert_eq!(
            report.message.as_deref(),
            Some(
                "no usable gateway node: 5 node(s) match the nodeSelector of gateway 0, 2 not Ready, 1 \
                 without a healthy shim, 1 without an InternalIP, 1 without interface \"eth1\"; 1 \
                 node(s) match the nodeSelector of gateway 1, 1 without egress IP 192.0.2.9; 0 node(s) \
                 match the nodeSelector of gateway 2; 1 node(s) match the nodeSelector of gateway 3, 1 \
                 without a default route"
            )
        );
    }
}
