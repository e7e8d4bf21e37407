//! How each policy fared: accepted or not, its gateways, its pods, its conflicts, and when no
//! node can serve it, why. Data only: [`crate::report`] says it in words.

use super::{
    Planner,
    gateways::{ActiveGateway, resolve_egress},
};
use crate::{
    model::NodeInfo,
    policy::{EgressSource, PolicyConfig, PolicyError},
};

/// How one policy fared, in the planner's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    pub name: String,
    pub generation: Option<i64>,
    /// `Err` when the policy is not accepted.
    pub accepted: Result<(), PolicyError>,
    pub gateways: Vec<ActiveGateway>,
    pub matched_endpoints: usize,
    /// (winning policy, keys lost to it), by policy name.
    pub conflicts: Vec<(String, u64)>,
    /// When the policy is accepted but has no gateway: why, per gateway entry. Empty otherwise.
    pub gateway_diagnosis: Vec<GatewayDiagnosis>,
    /// Every address of the accepted policy's `egressIPs`, entry by entry, slot by slot
    /// (whether a node holds it or not).
    pub managed_ips: Vec<std::net::IpAddr>,
    /// Those of `managed_ips` an older policy claims too, with that policy: it holds them, and
    /// their slots stay empty here.
    pub managed_taken: Vec<(std::net::IpAddr, String)>,
}

/// Why the nodes a gateway entry's `nodeSelector` matches cannot serve it. Each matching node
/// is counted once, under the first of these checks it fails, in field order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayDiagnosis {
    /// The entry's index in the policy's gateway list.
    pub entry: usize,
    /// What the entry's traffic leaves with, and so what a node may lack.
    pub egress: EgressSource,
    /// Nodes the entry's `nodeSelector` matches.
    pub matching: usize,
    /// Matching nodes that are not Ready.
    pub not_ready: usize,
    /// Ready, but not eligible (in the live system: without a healthy shim).
    pub ineligible: usize,
    /// Ready and eligible, but without an address to tunnel to.
    pub no_address: usize,
    /// Otherwise usable, but without the interface, egress IP or default route of
    /// [`GatewayDiagnosis::egress`].
    pub lacking_egress: usize,
}

impl Planner {
    pub fn policy_outcome(&self, name: &str) -> Option<PolicyOutcome> {
        let p = self.policies.get(name)?;
        let mut conflicts: Vec<(String, u64)> = self
            .conflicts
            .iter()
            .filter(|((loser, _), _)| &**loser == name)
            .map(|((_, winner), n)| (winner.to_string(), *n))
            .collect();
        conflicts.sort();
        Some(PolicyOutcome {
            name: name.to_owned(),
            generation: p.input.generation,
            accepted: p.config.as_ref().map(|_| ()).map_err(Clone::clone),
            gateways: p.active.iter().map(|g| (**g).clone()).collect(),
            matched_endpoints: p.matched.len(),
            conflicts,
            gateway_diagnosis: match (&p.config, p.active.is_empty()) {
                (Ok(config), true) => self.diagnose_gateways(config),
                _ => Vec::new(),
            },
            managed_ips: match &p.config {
                Ok(config) => config.gateways.iter().flat_map(|g| g.managed_ips()).collect(),
                Err(_) => Vec::new(),
            },
            managed_taken: match &p.config {
                Ok(config) => config
                    .gateways
                    .iter()
                    .flat_map(|g| g.managed_ips())
                    .filter_map(|ip| {
                        let owner = self.managed_owner(ip)?;
                        (**owner != *name).then(|| (ip, owner.to_string()))
                    })
                    .collect(),
                Err(_) => Vec::new(),
            },
        })
    }

    fn diagnose_gateways(&self, config: &PolicyConfig) -> Vec<GatewayDiagnosis> {
        config
            .gateways
            .iter()
            .enumerate()
            .map(|(entry, g)| {
                let matching: Vec<&NodeInfo> = self
                    .nodes
                    .values()
                    .filter(|n| g.nodes.matches(&n.labels))
                    .collect();
                GatewayDiagnosis {
                    entry,
                    egress: g.egress.clone(),
                    matching: matching.len(),
                    not_ready: matching.iter().filter(|n| !n.ready).count(),
                    ineligible: matching.iter().filter(|n| n.ready && !n.eligible).count(),
                    no_address: matching
                        .iter()
                        .filter(|n| n.ready && n.eligible && n.tunnel_ip().is_none())
                        .count(),
                    lacking_egress: matching
                        .iter()
                        .filter(|n| n.ready && n.eligible && n.tunnel_ip().is_some())
                        .filter(|n| {
                            (0..g.max_nodes as usize).all(|slot| resolve_egress(n, &g.egress, slot).is_none())
                        })
                        .count(),
                }
            })
            .collect()
    }
}
