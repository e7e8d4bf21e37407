//! From what the engine reports ([`StatusUpdate`]) to the policy's `status`: a pure function, so
//! that every condition, reason and message is tested without an API server.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    api::{
        CONDITION_ACCEPTED, CONDITION_GATEWAY_SELECTED, CONDITION_PODS_SELECTED, CONDITION_PROGRAMMED,
        ConflictStatus, DrainingStatus, EgressGatewayPolicyStatus, EgressIpStatus, GatewayStatus,
    },
    live::{Behind, Holding, StatusUpdate},
    report,
};

/// The status a policy should have.
///
/// `previous` is the status the object has now (or the one last written): a condition whose
/// status did not change keeps its `lastTransitionTime`; others take `now`.
pub fn desired(
    update: &StatusUpdate,
    previous: Option<&EgressGatewayPolicyStatus>,
    now: Time,
) -> EgressGatewayPolicyStatus {
    let outcome = &update.outcome;
    let generation = outcome.generation;
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let last_transition_time = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time,
        }
    };

    let mut conditions = Vec::with_capacity(4);
    match &outcome.accepted {
        Err(e) => {
            conditions.push(condition(CONDITION_ACCEPTED, false, e.reason, e.message.clone()));
            let why = "the policy is not accepted".to_owned();
            conditions.push(condition(
                CONDITION_PODS_SELECTED,
                false,
                "NotAccepted",
                why.clone(),
            ));
            conditions.push(condition(
                CONDITION_GATEWAY_SELECTED,
                false,
                "NotAccepted",
                why.clone(),
            ));
            conditions.push(condition(CONDITION_PROGRAMMED, false, "NotAccepted", why));
        }
        Ok(()) => {
            conditions.push(condition(
                CONDITION_ACCEPTED,
                true,
                "Accepted",
                "the policy is valid".to_owned(),
            ));
            // A policy that selects nothing is valid and may have gateways, so neither of the
            // other conditions tells it from one that works.
            conditions.push(match outcome.matched_endpoints {
                0 => condition(
                    CONDITION_PODS_SELECTED,
                    false,
                    "NoPodSelected",
                    "no pod matches spec.selectors: compare each selector's podSelector, \
                     namespaceSelector and nodeSelector with the labels of the pods, their \
                     namespaces and nodes (kubectl get pods -A --show-labels); pods on the host \
                     network, without an IP, not scheduled or finished never count"
                        .to_owned(),
                ),
                n => condition(
                    CONDITION_PODS_SELECTED,
                    true,
                    "PodsSelected",
                    format!("{n} pod(s) selected"),
                ),
            });
            conditions.push(match report::problem(outcome) {
                Some((reason, message)) => condition(CONDITION_GATEWAY_SELECTED, false, reason, message),
                None => {
                    let mut nodes: Vec<&str> = outcome.gateways.iter().map(|g| &*g.node).collect();
                    nodes.sort_unstable();
                    nodes.dedup();
                    condition(
                        CONDITION_GATEWAY_SELECTED,
                        true,
                        "GatewaysSelected",
                        format!("{} gateway node(s): {}", nodes.len(), nodes.join(", ")),
                    )
                }
            });
            let done = update.programmed >= update.to_program;
            let mut message = format!("{}/{} nodes", update.programmed, update.to_program);
            // Which nodes are behind, and why: what `kubectl describe` shows.
            for b in &update.behind {
                message.push_str("; ");
                message.push_str(&b.to_string());
            }
            let unnamed = (update.to_program - update.programmed).saturating_sub(update.behind.len());
            if unnamed > 0 && !update.behind.is_empty() {
                message.push_str(&format!("; and {unnamed} more nodes"));
            }
            let failed = update
                .behind
                .iter()
                .any(|b| matches!(b.why, Behind::Failed { .. }));
            conditions.push(if done {
                condition(CONDITION_PROGRAMMED, true, "Programmed", message)
            } else if failed {
                condition(CONDITION_PROGRAMMED, false, "ProgrammingFailed", message)
            } else {
                condition(CONDITION_PROGRAMMED, false, "Pending", message)
            });
        }
    }

    let mut gateways: Vec<GatewayStatus> = outcome
        .gateways
        .iter()
        .map(|g| GatewayStatus {
            node: g.node.to_string(),
            ip: g.ip.to_string(),
            egress_ip: g.egress_v4.or(g.egress_v6).map(|ip| ip.to_string()),
            interface: g.interface.as_deref().map(str::to_owned),
            entry: u32::try_from(g.entry).unwrap_or(u32::MAX),
            slot: u32::try_from(g.slot).unwrap_or(u32::MAX),
        })
        .collect();
    gateways.sort_by_key(|g| (g.entry, g.slot));
    let egress_ips = managed_ips(update);

    EgressGatewayPolicyStatus {
        observed_generation: generation,
        conditions,
        gateways,
        matched_endpoints: outcome.matched_endpoints as u64,
        conflicts: outcome
            .conflicts
            .iter()
            .map(|(policy, entries)| ConflictStatus {
                policy: policy.clone(),
                entries: *entries,
            })
            .collect(),
        egress_ips,
        draining: update
            .draining
            .iter()
            .map(|d| DrainingStatus {
                node: d.node.clone(),
                until: rfc3339(d.until),
                pods: d.pods,
                flows: d.flows,
            })
            .collect(),
    }
}

/// Seconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs).map_or_else(|_| secs.to_string(), |t| t.to_string())
}

/// Where each managed address (`egressIPs`) stands: held by a gateway whose shim has
/// acknowledged it (`Assigned`), assigned to one that has not yet (`Moving`), or held by none.
fn managed_ips(update: &StatusUpdate) -> Vec<EgressIpStatus> {
    update
        .managed_ips()
        .map(|(ip, holder, holding)| {
            let (state, message) = match holding {
                Holding::Assigned => ("Assigned", None),
                Holding::Moving => ("Moving", None),
                Holding::Conflict(detail) => ("Conflict", Some(format!("not claimed: {detail}"))),
                Holding::Unassigned => (
                    "Unassigned",
                    Some("no usable gateway node for its slot".to_owned()),
                ),
            };
            EgressIpStatus {
                ip: ip.to_string(),
                node: holder.map(|g| g.node.to_string()),
                interface: holder.and_then(|g| g.interface.as_deref().map(str::to_owned)),
                state: state.to_owned(),
                message,
            }
        })
        .collect()
}

/// Whether writing `desired` over `current` would change anything but timestamps. Conditions
/// are compared by type, so their order and conditions of other writers do not matter.
pub fn same_ignoring_time(current: &EgressGatewayPolicyStatus, desired: &EgressGatewayPolicyStatus) -> bool {
    let conditions_match = desired.conditions.iter().all(|want| {
        current.conditions.iter().any(|have| {
            have.type_ == want.type_
                && have.status == want.status
                && have.reason == want.reason
                && have.message == want.message
                && have.observed_generation == want.observed_generation
        })
    });
    conditions_match
        && current.observed_generation == desired.observed_generation
        && current.gateways == desired.gateways
        && current.matched_endpoints == desired.matched_endpoints
        && current.conflicts == desired.conflicts
        && current.egress_ips == desired.egress_ips
        && current.draining == desired.draining
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use k8s_openapi::jiff::Timestamp;
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::{
        live::NodeBehind,
        planner::{ActiveGateway, GatewayDiagnosis, PolicyOutcome},
        policy::{EgressSource, PolicyError},
    };

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn gateway(entry: usize, slot: usize, node: &str, ip: &str) -> ActiveGateway {
        ActiveGateway {
            entry,
            slot,
            node: node.into(),
            ip: ip.parse().unwrap(),
            egress_v4: Some("192.0.2.10".parse::<IpAddr>().unwrap()),
            egress_v6: None,
            interface: Some("eth1".into()),
            managed: false,
        }
    }

    fn update(gateways: Vec<ActiveGateway>, programmed: usize, to_program: usize) -> StatusUpdate {
        StatusUpdate {
            outcome: PolicyOutcome {
                name: "p".into(),
                generation: Some(3),
                accepted: Ok(()),
                gateways,
                matched_endpoints: 12,
                conflicts: vec![("older".into(), 4)],
                gateway_diagnosis: vec![GatewayDiagnosis {
                    entry: 0,
                    egress: EgressSource::DefaultRoute,
                    matching: 2,
                    not_ready: 2,
                    ineligible: 0,
                    no_address: 0,
                    lacking_egress: 0,
                }],
                managed_ips: vec![],
                managed_taken: vec![],
            },
            programmed,
            to_program,
            behind: vec![],
            gateways_behind: vec![],
            address_conflicts: vec![],
            draining: vec![],
        }
    }

    /// Each managed address says who holds it and whether that node has it yet; one whose slot
    /// has no node says so.
    #[test]
    fn managed_addresses_say_where_they_are() {
        let managed = |slot: usize, node: &str, egress: &str| ActiveGateway {
            egress_v4: Some(egress.parse().unwrap()),
            managed: true,
            ..gateway(0, slot, node, "192.168.1.1")
        };
        let mut u = update(
            vec![
                managed(0, "gw-a", "192.0.2.150"),
                managed(1, "gw-b", "192.0.2.151"),
            ],
            2,
            3,
        );
        u.outcome.managed_ips = ["192.0.2.150", "192.0.2.151", "192.0.2.152"]
            .map(|ip| ip.parse().unwrap())
            .to_vec();
        u.gateways_behind = vec!["gw-b".into()];
        let s = desired(&u, None, at(1));
        let seen: Vec<(&str, Option<&str>, Option<&str>, &str)> = s
            .egress_ips
            .iter()
            .map(|e| {
                (
                    e.ip.as_str(),
                    e.node.as_deref(),
                    e.interface.as_deref(),
                    e.state.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("192.0.2.150", Some("gw-a"), Some("eth1"), "Assigned"),
                ("192.0.2.151", Some("gw-b"), Some("eth1"), "Moving"),
                ("192.0.2.152", None, None, "Unassigned"),
            ]
        );
        let mut moved = s.clone();
        moved.egress_ips[1].state = "Assigned".into();
        assert!(!same_ignoring_time(&moved, &s), "a state change is written");
    }

    /// A draining gateway shows in the status with its time, its pods and, once counted, the
    /// connections left; a change of the count is written, and the serialized status leaves
    /// out a count not made yet.
    #[test]
    fn a_draining_gateway_shows_its_pods_and_the_flows_left() {
        let mut u = update(vec![], 1, 1);
        u.draining = vec![crate::live::Draining {
            node: "gw-a".into(),
            until: 1_800_000_000,
            pods: 2,
            flows: None,
        }];
        let s = desired(&u, None, at(1));
        let d = &s.draining[0];
        assert_eq!(
            (d.node.as_str(), d.until.as_str(), d.pods, d.flows),
            ("gw-a", "2027-01-15T08:00:00Z", 2, None)
        );
        assert!(!serde_json::to_string(d).unwrap().contains("flows"));
        u.draining[0].flows = Some(5);
        let counted = desired(&u, None, at(1));
        assert_eq!(counted.draining[0].flows, Some(5));
        assert!(!same_ignoring_time(&counted, &s), "a count is written");
    }

    fn summary(s: &EgressGatewayPolicyStatus) -> Vec<(String, String, String, String)> {
        s.conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
            .collect()
    }

    fn row(t: &str, s: &str, r: &str, m: &str) -> (String, String, String, String) {
        (t.into(), s.into(), r.into(), m.into())
    }

    #[test]
    fn a_working_policy_is_accepted_selected_and_programmed() {
        let u = update(
            vec![
                gateway(1, 0, "gw-b", "172.18.0.3"),
                gateway(0, 0, "gw-a", "172.18.0.2"),
            ],
            12,
            12,
        );
        let s = desired(&u, None, at(100));
        assert_eq!(
            summary(&s),
            vec![
                row("Accepted", "True", "Accepted", "the policy is valid"),
                row("PodsSelected", "True", "PodsSelected", "12 pod(s) selected"),
                row(
                    "GatewaySelected",
                    "True",
                    "GatewaysSelected",
                    "2 gateway node(s): gw-a, gw-b"
                ),
                row("Programmed", "True", "Programmed", "12/12 nodes"),
            ]
        );
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(3)));
        assert!(s.conditions.iter().all(|c| c.last_transition_time == at(100)));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.matched_endpoints, 12);
        assert_eq!(
            s.gateways,
            vec![
                GatewayStatus {
                    node: "gw-a".into(),
                    ip: "172.18.0.2".into(),
                    egress_ip: Some("192.0.2.10".into()),
                    interface: Some("eth1".into()),
                    entry: 0,
                    slot: 0
                },
                GatewayStatus {
                    node: "gw-b".into(),
                    ip: "172.18.0.3".into(),
                    egress_ip: Some("192.0.2.10".into()),
                    interface: Some("eth1".into()),
                    entry: 1,
                    slot: 0
                },
            ]
        );
        assert_eq!(
            s.conflicts,
            vec![ConflictStatus {
                policy: "older".into(),
                entries: 4
            }]
        );
    }

    #[test]
    fn nodes_behind_are_named_with_why() {
        let mut u = update(vec![gateway(0, 0, "gw", "172.18.0.2")], 9, 12);
        u.behind = vec![
            NodeBehind {
                node: "n1".into(),
                why: Behind::Pending,
            },
            NodeBehind {
                node: "n2".into(),
                why: Behind::Failed {
                    source: "10.0.0.1".into(),
                    destination: "203.0.113.0/24".into(),
                    message: "egress IP 192.0.2.9 is not on this node".into(),
                    entries: 3,
                },
            },
        ];
        assert_eq!(
            summary(&desired(&u, None, at(1)))[3],
            row(
                "Programmed",
                "False",
                "ProgrammingFailed",
                "9/12 nodes; n1: not acknowledged yet; n2: 10.0.0.1 -> 203.0.113.0/24: egress IP \
                 192.0.2.9 is not on this node (and 2 more entries); and 1 more nodes"
            )
        );
    }

    #[test]
    fn nodes_still_programming_make_programmed_false() {
        let s = desired(
            &update(vec![gateway(0, 0, "gw", "172.18.0.2")], 9, 12),
            None,
            at(1),
        );
        assert_eq!(
            summary(&s)[3],
            row("Programmed", "False", "Pending", "9/12 nodes")
        );
    }

    #[test]
    fn no_gateway_says_why() {
        let s = desired(&update(vec![], 3, 3), None, at(1));
        assert_eq!(
            summary(&s)[2],
            row(
                "GatewaySelected",
                "False",
                "NoGatewayAvailable",
                "no usable gateway node: 2 node(s) match the nodeSelector of gateway 0, 2 not Ready"
            )
        );
        assert!(s.gateways.is_empty());
    }

    #[test]
    fn a_policy_selecting_no_pod_says_so_and_flips_back() {
        let mut u = update(vec![gateway(0, 0, "gw", "172.18.0.2")], 3, 3);
        u.outcome.matched_endpoints = 0;
        let none = desired(&u, None, at(100));
        let (type_, status, reason, message) = summary(&none)[1].clone();
        assert_eq!(
            (type_.as_str(), status.as_str(), reason.as_str()),
            ("PodsSelected", "False", "NoPodSelected")
        );
        // What to look at, so that the user can act on it.
        for hint in [
            "spec.selectors",
            "podSelector",
            "namespaceSelector",
            "nodeSelector",
            "kubectl get pods",
        ] {
            assert!(message.contains(hint), "{hint:?} missing from {message:?}");
        }
        // Gateways and programming are fine: only PodsSelected tells this policy from a working one.
        assert!(
            none.conditions
                .iter()
                .filter(|c| c.type_ != "PodsSelected")
                .all(|c| c.status == "True")
        );

        u.outcome.matched_endpoints = 1;
        let one = desired(&u, Some(&none), at(200));
        assert_eq!(
            summary(&one)[1],
            row("PodsSelected", "True", "PodsSelected", "1 pod(s) selected")
        );
        assert_eq!(one.conditions[1].last_transition_time, at(200));
        assert!(!same_ignoring_time(&none, &one));
    }

    #[test]
    fn a_rejected_policy_carries_the_parse_error() {
        let mut u = update(vec![], 0, 0);
        u.outcome.accepted = Err(PolicyError {
            reason: "InvalidCIDR",
            message: "spec.destinationCIDRs[0]: \"10.0.0.0/33\" is not a CIDR".into(),
        });
        let s = desired(&u, None, at(1));
        assert_eq!(
            summary(&s),
            vec![
                row(
                    "Accepted",
                    "False",
                    "InvalidCIDR",
                    "spec.destinationCIDRs[0]: \"10.0.0.0/33\" is not a CIDR"
                ),
                row(
                    "PodsSelected",
                    "False",
                    "NotAccepted",
                    "the policy is not accepted"
                ),
                row(
                    "GatewaySelected",
                    "False",
                    "NotAccepted",
                    "the policy is not accepted"
                ),
                row("Programmed", "False", "NotAccepted", "the policy is not accepted"),
            ]
        );
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let first = desired(
            &update(vec![gateway(0, 0, "gw", "172.18.0.2")], 1, 2),
            None,
            at(100),
        );
        let second = desired(
            &update(vec![gateway(0, 0, "gw", "172.18.0.2")], 2, 2),
            Some(&first),
            at(200),
        );
        let times: Vec<Time> = second
            .conditions
            .iter()
            .map(|c| c.last_transition_time.clone())
            .collect();
        assert_eq!(times, vec![at(100), at(100), at(100), at(200)]);
        // Same status, new message: still no transition.
        let third = desired(
            &update(vec![gateway(0, 0, "gw", "172.18.0.2")], 3, 3),
            Some(&second),
            at(300),
        );
        assert_eq!(third.conditions[3].last_transition_time, at(200));
    }

    #[test]
    fn rewriting_the_same_status_is_a_no_op() {
        let u = update(vec![gateway(0, 0, "gw", "172.18.0.2")], 2, 2);
        let first = desired(&u, None, at(100));
        let again = desired(&u, Some(&first), at(500));
        assert_eq!(again, first);
        assert!(same_ignoring_time(&first, &again));
        // Timestamps alone never make a write.
        let mut shifted = first.clone();
        shifted.conditions.reverse();
        for c in &mut shifted.conditions {
            c.last_transition_time = at(1);
        }
        assert!(same_ignoring_time(&shifted, &again));
        let changed = desired(
            &update(vec![gateway(0, 0, "gw", "172.18.0.2")], 1, 2),
            Some(&first),
            at(600),
        );
        assert!(!same_ignoring_time(&first, &changed));
    }
}
