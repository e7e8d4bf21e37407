//! Turning an `EgressGatewayPolicy` spec into a checked configuration, or into the reason a user
//! can act on.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    api::{EgressGateway, EgressGatewayPolicySpec, FailurePolicy},
    selector::{Selector, SelectorError},
};

/// How many nodes one gateway entry may keep active at once.
pub const MAX_GATEWAY_NODES: u32 = 64;

/// A checked pod selection rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pods: Option<Selector>,
    pub namespaces: Option<Selector>,
    pub nodes: Option<Selector>,
}

/// Where a gateway's traffic takes its source address from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EgressSource {
    /// The first address of the packet's family on this interface.
    Interface(String),
    /// This address, which must be on one of the gateway's interfaces.
    Ip(IpAddr),
    /// The default-route interface.
    DefaultRoute,
    /// Addresses Sluice assigns: slot i of the entry holds the i-th IPv4 and the i-th IPv6
    /// address of `ips` (a dual-stack list has as many of both), on `interface` if set, else on
    /// the interface whose subnet contains them, else on the default-route interface.
    Managed {
        ips: Vec<IpAddr>,
        interface: Option<String>,
    },
}

impl EgressSource {
    /// The managed addresses of `slot`, IPv4 and IPv6 (none unless the entry's addresses are
    /// Sluice's).
    pub fn managed_ips(&self, slot: usize) -> (Option<IpAddr>, Option<IpAddr>) {
        match self {
            EgressSource::Managed { ips, .. } => (
                ips.iter().filter(|ip| ip.is_ipv4()).nth(slot).copied(),
                ips.iter().filter(|ip| ip.is_ipv6()).nth(slot).copied(),
            ),
            _ => (None, None),
        }
    }

    /// How many slots the managed addresses fill (0 unless they are Sluice's).
    pub fn managed_slots(&self) -> usize {
        match self {
            EgressSource::Managed { ips, .. } => {
                let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
                v4.max(ips.len() - v4)
            }
            _ => 0,
        }
    }
}

impl GatewayConfig {
    /// The managed addresses the entry's slots hold (those of its first `maxGatewayNodes`
    /// slots; none unless its addresses are Sluice's).
    pub fn managed_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let slots = (self.max_nodes as usize).min(self.egress.managed_slots());
        (0..slots).flat_map(|slot| {
            let (v4, v6) = self.egress.managed_ips(slot);
            v4.into_iter().chain(v6)
        })
    }
}

/// A checked gateway entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub nodes: Selector,
    pub egress: EgressSource,
    pub max_nodes: u32,
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub rules: Vec<Rule>,
    pub destinations: Vec<IpNet>,
    pub excluded: Vec<IpNet>,
    pub gateways: Vec<GatewayConfig>,
    pub failure: FailurePolicy,
    /// `spec.drainTimeout`; `None`: the operator's default.
    pub drain_timeout: Option<std::time::Duration>,
}

/// Why a policy is not accepted. `reason` is a CamelCase word for the `Accepted` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PolicyError {
    pub reason: &'static str,
    pub message: String,
}

impl PolicyError {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        PolicyError {
            reason,
            message: message.into(),
        }
    }
}

/// Checks a spec the way the API server's schema and CEL rules would, and more.
pub fn parse(spec: &EgressGatewayPolicySpec) -> Result<PolicyConfig, PolicyError> {
    if spec.selectors.is_empty() {
        return Err(PolicyError::new(
            "NoSelectors",
            "spec.selectors must list at least one pod selector",
        ));
    }
    let mut rules = Vec::with_capacity(spec.selectors.len());
    for (i, rule) in spec.selectors.iter().enumerate() {
        if rule.pod_selector.is_none() && rule.namespace_selector.is_none() {
            return Err(PolicyError::new(
                "InvalidSelector",
                format!("spec.selectors[{i}] needs a podSelector or a namespaceSelector"),
            ));
        }
        let compile = |field: &str, s: &Option<_>| {
            s.as_ref()
                .map(Selector::compile)
                .transpose()
                .map_err(|e: SelectorError| {
                    PolicyError::new("InvalidSelector", format!("spec.selectors[{i}].{field}: {e}"))
                })
        };
        rules.push(Rule {
            pods: compile("podSelector", &rule.pod_selector)?,
            namespaces: compile("namespaceSelector", &rule.namespace_selector)?,
            nodes: compile("nodeSelector", &rule.node_selector)?,
        });
    }

    if spec.destination_cidrs.is_empty() {
        return Err(PolicyError::new(
            "NoDestinations",
            "spec.destinationCIDRs must list at least one CIDR (0.0.0.0/0 for all IPv4 destinations)",
        ));
    }
    let destinations = parse_cidrs("destinationCIDRs", &spec.destination_cidrs)?;
    let excluded = parse_cidrs("excludedCIDRs", &spec.excluded_cidrs)?;

    // As in Cilium, a non-empty egressGateways list replaces the single egressGateway.
    let entries: Vec<(String, &EgressGateway)> = if spec.egress_gateways.is_empty() {
        spec.egress_gateway
            .iter()
            .map(|g| ("spec.egressGateway".to_owned(), g))
            .collect()
    } else {
        spec.egress_gateways
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("spec.egressGateways[{i}]"), g))
            .collect()
    };
    if entries.is_empty() {
        return Err(PolicyError::new(
            "NoGateway",
            "set spec.egressGateway or spec.egressGateways",
        ));
    }
    let gateways: Vec<GatewayConfig> = entries
        .into_iter()
        .map(|(field, g)| parse_gateway(&field, g))
        .collect::<Result<_, _>>()?;
    // Two slots with one address would put it on two nodes at once.
    let mut managed: Vec<IpAddr> = Vec::new();
    for (i, g) in gateways.iter().enumerate() {
        for ip in g.managed_ips() {
            if managed.contains(&ip) {
                return Err(PolicyError::new(
                    "InvalidEgressIP",
                    format!(
                        "spec.egressGateways[{i}].egressIPs: {ip} is also an address of an earlier entry: \
                         each managed address belongs to one slot"
                    ),
                ));
            }
            managed.push(ip);
        }
    }

    Ok(PolicyConfig {
        rules,
        destinations,
        excluded,
        gateways,
        failure: spec.failure_policy.unwrap_or_default(),
        drain_timeout: spec
            .drain_timeout
            .as_deref()
            .map(parse_drain_timeout)
            .transpose()?,
    })
}

/// `spec.drainTimeout`: whole seconds, minutes or hours (`90s`, `10m`, `1h`).
fn parse_drain_timeout(text: &str) -> Result<std::time::Duration, PolicyError> {
    let bad = || {
        PolicyError::new(
            "InvalidDrainTimeout",
            format!("spec.drainTimeout: {text:?} is not a duration such as 90s, 10m or 1h"),
        )
    };
    let text = text.trim();
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(std::time::Duration::from_secs(secs))
}

fn parse_cidrs(field: &str, cidrs: &[String]) -> Result<Vec<IpNet>, PolicyError> {
    let mut out: Vec<IpNet> = Vec::with_capacity(cidrs.len());
    for (i, text) in cidrs.iter().enumerate() {
        let net: IpNet = text.trim().parse().map_err(|_| {
            PolicyError::new(
                "InvalidCIDR",
                format!("spec.{field}[{i}]: {text:?} is not a CIDR such as 203.0.113.0/24 or 2001:db8::/64"),
            )
        })?;
        // Like net.ParseCIDR in Cilium, host bits are ignored: 10.1.2.3/16 means 10.1.0.0/16.
        let net = net.trunc();
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// Whether Linux would accept `name` for a network interface (`dev_valid_name`): 1 to 15 bytes,
/// not `.` or `..`, none of `/`, `:`, NUL or a byte the kernel's `isspace` takes for a space
/// (which includes 0xA0, found inside many UTF-8 characters). Anything else names no interface on
/// any node; the CRD's pattern only keeps out `/`, `:` and ASCII whitespace.
pub fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| {
            matches!(
                b,
                b'/' | b':' | 0 | b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0
            )
        })
}

fn parse_gateway(field: &str, g: &EgressGateway) -> Result<GatewayConfig, PolicyError> {
    let nodes = Selector::compile(&g.node_selector)
        .map_err(|e| PolicyError::new("InvalidSelector", format!("{field}.nodeSelector: {e}")))?;
    let interface = g.interface.as_deref().filter(|s| !s.is_empty());
    let egress_ip = g.egress_ip.as_deref().filter(|s| !s.is_empty());
    if let Some(name) = interface
        && !is_interface_name(name)
    {
        return Err(PolicyError::new(
            "InvalidInterface",
            format!("{field}.interface: {name:?} is not a valid interface name"),
        ));
    }
    if !g.egress_ips.is_empty() {
        if egress_ip.is_some() {
            return Err(PolicyError::new(
                "EgressIPAndEgressIPs",
                format!(
                    "{field}: set at most one of egressIP (an address the node already holds) and \
                     egressIPs (addresses Sluice assigns)"
                ),
            ));
        }
        return parse_managed(field, g, nodes, interface);
    }
    let egress = match (interface, egress_ip) {
        (Some(_), Some(_)) => {
            return Err(PolicyError::new(
                "InterfaceAndEgressIP",
                format!("{field}: set at most one of interface and egressIP"),
            ));
        }
        (Some(name), None) => EgressSource::Interface(name.to_owned()),
        (None, Some(ip)) => EgressSource::Ip(ip.trim().parse().map_err(|_| {
            PolicyError::new(
                "InvalidEgressIP",
                format!("{field}.egressIP: {ip:?} is not an IP address"),
            )
        })?),
        (None, None) => EgressSource::DefaultRoute,
    };
    let max_nodes = max_gateway_nodes(field, g.max_gateway_nodes.unwrap_or(1))?;
    if max_nodes > 1 && matches!(egress, EgressSource::Ip(_)) {
        return Err(PolicyError::new(
            "SharedEgressIP",
            format!(
                "{field}: egressIP is one address that a node already holds, so {max_nodes} gateway \
                 nodes (maxGatewayNodes) would each hold it: an address conflict on a shared \
                 network. Use egressIPs (one address per gateway node, moved on failover) or \
                 maxGatewayNodes 1"
            ),
        ));
    }
    Ok(GatewayConfig {
        nodes,
        egress,
        max_nodes,
    })
}

fn max_gateway_nodes(field: &str, max_nodes: u32) -> Result<u32, PolicyError> {
    if !(1..=MAX_GATEWAY_NODES).contains(&max_nodes) {
        return Err(PolicyError::new(
            "InvalidMaxGatewayNodes",
            format!("{field}.maxGatewayNodes must be between 1 and {MAX_GATEWAY_NODES}, not {max_nodes}"),
        ));
    }
    Ok(max_nodes)
}

/// An entry with `egressIPs`: one slot per address (per pair of an IPv4 and an IPv6 address in a
/// dual-stack list) unless `maxGatewayNodes` says fewer.
fn parse_managed(
    field: &str,
    g: &EgressGateway,
    nodes: Selector,
    interface: Option<&str>,
) -> Result<GatewayConfig, PolicyError> {
    let mut ips: Vec<IpAddr> = Vec::with_capacity(g.egress_ips.len());
    for (i, text) in g.egress_ips.iter().enumerate() {
        let ip: IpAddr = text.trim().parse().map_err(|_| {
            PolicyError::new(
                "InvalidEgressIP",
                format!("{field}.egressIPs[{i}]: {text:?} is not an IP address"),
            )
        })?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(PolicyError::new(
                "InvalidEgressIP",
                format!("{field}.egressIPs[{i}]: {ip} cannot be a host's address"),
            ));
        }
        if ips.contains(&ip) {
            return Err(PolicyError::new(
                "InvalidEgressIP",
                format!("{field}.egressIPs[{i}]: {ip} is listed twice"),
            ));
        }
        ips.push(ip);
    }
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    let v6 = ips.len() - v4;
    if v4 > 0 && v6 > 0 && v4 != v6 {
        return Err(PolicyError::new(
            "UnpairedEgressIPs",
            format!(
                "{field}.egressIPs has {v4} IPv4 and {v6} IPv6 address(es): each gateway node holds \
                 one of each family, so list as many of both, or addresses of one family only"
            ),
        ));
    }
    let count = u32::try_from(v4.max(v6)).unwrap_or(u32::MAX);
    let max_nodes = max_gateway_nodes(field, g.max_gateway_nodes.unwrap_or(count))?;
    if max_nodes > count {
        return Err(PolicyError::new(
            "TooFewEgressIPs",
            format!(
                "{field}: maxGatewayNodes is {max_nodes} but egressIPs has {count} address(es): \
                 each gateway node holds one of them (one of each family)"
            ),
        ));
    }
    Ok(GatewayConfig {
        nodes,
        egress: EgressSource::Managed {
            ips,
            interface: interface.map(str::to_owned),
        },
        max_nodes,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::api::EgressRule;

    fn spec() -> EgressGatewayPolicySpec {
        EgressGatewayPolicySpec {
            selectors: vec![EgressRule {
                pod_selector: Some(LabelSelector::default()),
                ..Default::default()
            }],
            destination_cidrs: vec!["203.0.113.0/24".into()],
            egress_gateway: Some(EgressGateway::default()),
            ..Default::default()
        }
    }

    #[test]
    fn host_bits_are_ignored_and_duplicates_dropped() {
        let mut s = spec();
        s.destination_cidrs = vec![
            "10.1.2.3/16".into(),
            "10.1.0.0/16".into(),
            " 2001:db8::1/64 ".into(),
        ];
        let c = parse(&s).unwrap();
        let want: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap(), "2001:db8::/64".parse().unwrap()];
        assert_eq!(c.destinations, want);
    }

    #[test]
    fn egress_gateways_replace_the_single_gateway() {
        let mut s = spec();
        s.egress_gateway = Some(EgressGateway {
            interface: Some("eth9".into()),
            ..Default::default()
        });
        s.egress_gateways = vec![
            EgressGateway {
                egress_ip: Some("192.0.2.1".into()),
                ..Default::default()
            },
            EgressGateway {
                max_gateway_nodes: Some(3),
                ..Default::default()
            },
        ];
        let c = parse(&s).unwrap();
        assert_eq!(c.gateways.len(), 2);
        assert_eq!(
            c.gateways[0].egress,
            EgressSource::Ip("192.0.2.1".parse().unwrap())
        );
        assert_eq!(c.gateways[0].max_nodes, 1);
        assert_eq!(c.gateways[1].egress, EgressSource::DefaultRoute);
        assert_eq!(c.gateways[1].max_nodes, 3);
    }

    #[test]
    fn managed_addresses_give_one_slot_each_unless_max_gateway_nodes_says_fewer() {
        let mut s = spec();
        s.egress_gateway = Some(EgressGateway {
            egress_ips: vec!["192.0.2.150".into(), " 192.0.2.151 ".into()],
            interface: Some("eth1".into()),
            ..Default::default()
        });
        let c = parse(&s).unwrap();
        let ips: Vec<IpAddr> = vec!["192.0.2.150".parse().unwrap(), "192.0.2.151".parse().unwrap()];
        assert_eq!(
            c.gateways[0].egress,
            EgressSource::Managed {
                ips: ips.clone(),
                interface: Some("eth1".into())
            }
        );
        assert_eq!(c.gateways[0].max_nodes, 2);
        assert_eq!(c.gateways[0].egress.managed_ips(1), (Some(ips[1]), None));
        assert_eq!(c.gateways[0].egress.managed_ips(2), (None, None));
        s.egress_gateway.as_mut().unwrap().max_gateway_nodes = Some(1);
        assert_eq!(parse(&s).unwrap().gateways[0].max_nodes, 1);
        assert_eq!(
            parse(&s).unwrap().gateways[0].managed_ips().collect::<Vec<_>>(),
            ips[..1]
        );
    }

    #[test]
    fn a_dual_stack_list_pairs_the_families_slot_by_slot() {
        let mut s = spec();
        let text = ["2001:db8::150", "192.0.2.150", "192.0.2.151", "2001:db8::151"];
        s.egress_gateway = Some(EgressGateway {
            egress_ips: text.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        });
        let c = parse(&s).unwrap();
        let ip = |t: &str| Some(t.parse::<IpAddr>().unwrap());
        let g = &c.gateways[0];
        assert_eq!(g.max_nodes, 2, "two slots of two addresses");
        assert_eq!(g.egress.managed_ips(0), (ip("192.0.2.150"), ip("2001:db8::150")));
        assert_eq!(g.egress.managed_ips(1), (ip("192.0.2.151"), ip("2001:db8::151")));
        assert_eq!(g.managed_ips().count(), 4);

        // IPv6 only works like IPv4 only.
        s.egress_gateway.as_mut().unwrap().egress_ips = vec!["2001:db8::150".into()];
        let c = parse(&s).unwrap();
        assert_eq!(c.gateways[0].egress.managed_ips(0), (None, ip("2001:db8::150")));
        assert_eq!(c.gateways[0].max_nodes, 1);
    }

    /// Configurations that cannot work are refused, each with its own reason and the field.
    #[test]
    fn gateway_configurations_that_cannot_work_are_refused() {
        type Edit = fn(&mut EgressGateway);
        let cases: [(Edit, &str, &str); 8] = [
            (
                |g| {
                    g.egress_ip = Some("192.0.2.1".into());
                    g.max_gateway_nodes = Some(2);
                },
                "SharedEgressIP",
                "spec.egressGateway: egressIP is one address",
            ),
            (
                |g| {
                    g.egress_ip = Some("192.0.2.1".into());
                    g.egress_ips = vec!["192.0.2.2".into()];
                },
                "EgressIPAndEgressIPs",
                "spec.egressGateway: set at most one",
            ),
            (
                |g| {
                    g.egress_ips = vec!["192.0.2.2".into()];
                    g.max_gateway_nodes = Some(2);
                },
                "TooFewEgressIPs",
                "maxGatewayNodes is 2 but egressIPs has 1",
            ),
            (
                |g| g.egress_ips = vec!["192.0.2.2".into(), "192.0.2.2".into()],
                "InvalidEgressIP",
                "spec.egressGateway.egressIPs[1]: 192.0.2.2 is listed twice",
            ),
            (
                |g| g.egress_ips = vec!["0.0.0.0".into()],
                "InvalidEgressIP",
                "egressIPs[0]: 0.0.0.0 cannot be a host's address",
            ),
            (
                |g| g.egress_ips = vec!["192.0.2.2/32".into()],
                "InvalidEgressIP",
                "egressIPs[0]: \"192.0.2.2/32\" is not an IP address",
            ),
            (
                |g| g.egress_ips = vec!["192.0.2.2".into(), "2001:db8::2".into(), "192.0.2.3".into()],
                "UnpairedEgressIPs",
                "egressIPs has 2 IPv4 and 1 IPv6 address(es)",
            ),
            (
                |g| {
                    g.egress_ips = vec!["192.0.2.2".into(), "2001:db8::2".into()];
                    g.max_gateway_nodes = Some(2);
                },
                "TooFewEgressIPs",
                "maxGatewayNodes is 2 but egressIPs has 1 address(es)",
            ),
        ];
        for (edit, reason, text) in cases {
            let mut s = spec();
            edit(s.egress_gateway.as_mut().unwrap());
            let e = parse(&s).unwrap_err();
            assert_eq!(e.reason, reason, "{e}");
            assert!(e.message.contains(text), "{e}");
        }
    }

    #[test]
    fn a_drain_timeout_is_whole_seconds_minutes_or_hours() {
        for (text, secs) in [("90s", 90), ("10m", 600), ("1h", 3600), ("0s", 0)] {
            let mut s = spec();
            s.drain_timeout = Some(text.into());
            assert_eq!(
                parse(&s).unwrap().drain_timeout,
                Some(std::time::Duration::from_secs(secs))
            );
        }
        for text in ["10", "1.5m", "m", "-1s", "10d", ""] {
            let mut s = spec();
            s.drain_timeout = Some(text.into());
            let e = parse(&s).unwrap_err();
            assert_eq!(e.reason, "InvalidDrainTimeout", "{text:?}: {e}");
            assert!(e.message.contains("spec.drainTimeout"), "{e}");
        }
        assert_eq!(parse(&spec()).unwrap().drain_timeout, None);
    }

    /// One address in two entries would be held by two nodes.
    #[test]
    fn a_managed_address_in_two_entries_is_refused() {
        let mut s = spec();
        let entry = |ips: &[&str]| EgressGateway {
            egress_ips: ips.iter().map(|ip| ip.to_string()).collect(),
            ..Default::default()
        };
        s.egress_gateway = None;
        s.egress_gateways = vec![entry(&["192.0.2.150"]), entry(&["192.0.2.151", "192.0.2.150"])];
        let e = parse(&s).unwrap_err();
        assert_eq!(e.reason, "InvalidEgressIP");
        assert!(
            e.message
                .contains("egressGateways[1].egressIPs: 192.0.2.150 is also an address of an earlier entry"),
            "{e}"
        );
        // Beyond maxGatewayNodes an address is no slot's: no conflict.
        s.egress_gateways[1].max_gateway_nodes = Some(1);
        assert!(parse(&s).is_ok());
    }

    #[test]
    fn empty_strings_mean_unset_as_in_cilium() {
        let mut s = spec();
        s.egress_gateway = Some(EgressGateway {
            interface: Some(String::new()),
            egress_ip: Some("192.0.2.1".into()),
            ..Default::default()
        });
        assert_eq!(
            parse(&s).unwrap().gateways[0].egress,
            EgressSource::Ip("192.0.2.1".parse().unwrap())
        );
    }

    #[test]
    fn each_rejection_names_the_field() {
        type Mutation = fn(&mut EgressGatewayPolicySpec);
        let cases: Vec<(Mutation, &str, &str)> = vec![
            (|s| s.selectors.clear(), "NoSelectors", "spec.selectors"),
            (
                |s| s.selectors[0].pod_selector = None,
                "InvalidSelector",
                "spec.selectors[0]",
            ),
            (
                |s| s.destination_cidrs.clear(),
                "NoDestinations",
                "spec.destinationCIDRs",
            ),
            (
                |s| s.destination_cidrs.push("1.2.3.4".into()),
                "InvalidCIDR",
                "spec.destinationCIDRs[1]",
            ),
            (
                |s| s.excluded_cidrs = vec!["::1/129".into()],
                "InvalidCIDR",
                "spec.excludedCIDRs[0]",
            ),
            (|s| s.egress_gateway = None, "NoGateway", "spec.egressGateway"),
            (
                |s| s.egress_gateway.as_mut().unwrap().egress_ip = Some("fe80::1%eth0".into()),
                "InvalidEgressIP",
                "spec.egressGateway.egressIP",
            ),
            (
                |s| s.egress_gateway.as_mut().unwrap().interface = Some("a/b".into()),
                "InvalidInterface",
                "spec.egressGateway.interface",
            ),
            (
                |s| s.egress_gateway.as_mut().unwrap().interface = Some("eth\t0".into()),
                "InvalidInterface",
                "spec.egressGateway.interface",
            ),
            (
                |s| s.egress_gateway.as_mut().unwrap().interface = Some("..".into()),
                "InvalidInterface",
                "spec.egressGateway.interface",
            ),
            (
                |s| s.egress_gateway.as_mut().unwrap().interface = Some("eth0\0".into()),
                "InvalidInterface",
                "spec.egressGateway.interface",
            ),
            (
                |s| s.egress_gateway.as_mut().unwrap().max_gateway_nodes = Some(0),
                "InvalidMaxGatewayNodes",
                "spec.egressGateway.maxGatewayNodes",
            ),
        ];
        for (mutate, reason, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            let e = parse(&s).unwrap_err();
            assert_eq!(e.reason, reason, "{e}");
            assert!(
                e.message.contains(field),
                "{reason}: {:?} should name {field}",
                e.message
            );
        }
    }
}
