//! `sluice-shim bpf list`, `bpf counters` and `bpf flows`: the live maps, as tables.

use std::{
    collections::BTreeMap,
    fmt::Write,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use ipnet::IpNet;

use crate::{
    datapath::Maps,
    error::Result,
    maps::{self, Counter, EntryKeyV6, EntryV6, EntryValueV4, PolicyKeyV4},
};

/// The live policy entries of both families, like `cilium bpf egress list`.
pub fn list(dir: &Path) -> Result<String> {
    let maps = Maps::open_pinned(dir)?;
    let entries: Vec<Listed> = maps
        .policy_entries()?
        .iter()
        .map(Listed::from)
        .chain(maps.policy_entries_v6()?.iter().map(Listed::from))
        .collect();
    Ok(render_list(&entries, &maps.policy_names()?))
}

/// One entry as `bpf list` shows it, of either family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub source: IpAddr,
    pub destination: IpNet,
    /// `KIND_*` (0: drops, no room for its target).
    pub kind: u32,
    pub flags: u32,
    /// Underlay address of the gateway.
    pub gateway: Option<IpAddr>,
    pub egress_ip: Option<IpAddr>,
    /// The only node whose tunnelled packets this gateway takes for the entry.
    pub tunnel_from: Option<IpAddr>,
    pub policy_id: u32,
}

impl From<&(PolicyKeyV4, EntryValueV4)> for Listed {
    fn from((k, v): &(PolicyKeyV4, EntryValueV4)) -> Self {
        let ip = |be: u32| (be != 0).then(|| IpAddr::V4(maps::from_be(be)));
        Listed {
            source: IpAddr::V4(k.source()),
            destination: IpNet::V4(k.destination()),
            kind: v.kind,
            flags: v.flags,
            gateway: ip(v.gateway_ip),
            egress_ip: ip(v.egress_ip),
            tunnel_from: ip(v.peer_ip),
            policy_id: v.policy_id,
        }
    }
}

impl From<&(EntryKeyV6, EntryV6)> for Listed {
    fn from((k, v): &(EntryKeyV6, EntryV6)) -> Self {
        let prefix = u8::try_from(k.prefixlen.saturating_sub(128))
            .unwrap_or(128)
            .min(128);
        let destination = ipnet::Ipv6Net::new(k.daddr.into(), prefix).unwrap_or_default();
        Listed {
            source: IpAddr::V6(k.saddr.into()),
            destination: IpNet::V6(destination),
            kind: v.kind,
            flags: v.flags,
            gateway: v.gateway.to_underlay(),
            egress_ip: v.egress_ip.to_underlay(),
            tunnel_from: v.peer.to_underlay(),
            policy_id: v.policy_id,
        }
    }
}

/// The live counters, by outcome and by policy.
pub fn counters(dir: &Path) -> Result<String> {
    let maps = Maps::open_pinned(dir)?;
    Ok(render_counters(
        &maps.outcome_counters()?,
        &maps.policy_counters()?,
        &maps.policy_names()?,
    ))
}

/// The pinned flows: each TCP or UDP flow of this node's pods through a remote gateway, with the
/// gateway it started on (and stays on while that one is pinnable).
pub fn flows(dir: &Path) -> Result<String> {
    let maps = Maps::open_pinned(dir)?;
    let now = monotonic_ns();
    let map_err = |name| {
        move |source| crate::error::Error::Map {
            name,
            action: "reading".into(),
            source,
        }
    };
    let mut flows = Vec::new();
    for item in maps.flows.iter() {
        let (k, v) = item.map_err(map_err(maps::FLOWS_V4))?;
        let at = |ip: u32, port: u16| SocketAddr::new(maps::from_be(ip).into(), u16::from_be(port));
        flows.push((k.protocol, at(k.saddr, k.sport), at(k.daddr, k.dport), v));
    }
    for item in maps.flows_v6.iter() {
        let (k, v) = item.map_err(map_err(maps::FLOWS_V6))?;
        let at = |ip: [u8; 16], port: u16| {
            SocketAddr::new(std::net::Ipv6Addr::from(ip).into(), u16::from_be(port))
        };
        flows.push((k.protocol, at(k.saddr, k.sport), at(k.daddr, k.dport), v));
    }
    flows.sort_by_key(|(protocol, source, destination, _)| (*source, *destination, *protocol));
    let pinnable: std::collections::BTreeSet<u32> = maps.pinnable.keys().filter_map(|k| k.ok()).collect();
    Ok(render_flows(&flows, &pinnable, &maps.policy_names()?, now))
}

/// CLOCK_MONOTONIC in ns: the clock of the datapath's `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64
    })
}

/// Renders pinned flows as a table (`now`: CLOCK_MONOTONIC ns, for the idle times).
pub fn render_flows(
    flows: &[(u8, SocketAddr, SocketAddr, maps::FlowV4)],
    pinnable: &std::collections::BTreeSet<u32>,
    names: &BTreeMap<u32, String>,
    now: u64,
) -> String {
    let mut rows = vec![[
        "Protocol".to_owned(),
        "Source".into(),
        "Destination".into(),
        "Gateway".into(),
        "Pinnable".into(),
        "Idle".into(),
        "Policy".into(),
    ]];
    for (protocol, source, destination, v) in flows {
        let protocol = match protocol {
            6 => "tcp".to_owned(),
            17 => "udp".to_owned(),
            p => p.to_string(),
        };
        let closing = if v.flags & maps::FLOW_CLOSING != 0 {
            " (closing)"
        } else {
            ""
        };
        rows.push([
            protocol,
            source.to_string(),
            destination.to_string(),
            if v.egress_id != 0 {
                format!("{} (this node)", maps::from_be(v.gateway_ip))
            } else {
                maps::from_be(v.gateway_ip).to_string()
            },
            if pinnable.contains(&v.gateway_ip) {
                "yes"
            } else {
                "-"
            }
            .to_owned(),
            format!("{}s{closing}", now.saturating_sub(v.last_seen_ns) / 1_000_000_000),
            policy_name(names, v.policy_id),
        ]);
    }
    table(&rows)
}

fn gateway(e: &Listed) -> String {
    let ip = e.gateway.map_or_else(|| "?".to_owned(), |ip| ip.to_string());
    match e.kind {
        maps::KIND_GATEWAY if e.flags & maps::F_LOCAL_GATEWAY != 0 => format!("{ip} (this node)"),
        maps::KIND_GATEWAY => ip,
        maps::KIND_NONE => "none".into(),
        maps::KIND_FALLBACK => "fallback".into(),
        maps::KIND_EXCLUDED => "excluded".into(),
        // See `layout::Layout::expand`: no room for the target in the pod's source entry.
        0 => "drop (pod of too many policies)".into(),
        other => format!("kind {other}?"),
    }
}

fn policy_name(names: &BTreeMap<u32, String>, id: u32) -> String {
    names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
}

/// Renders entries as a table.
pub fn render_list(entries: &[Listed], names: &BTreeMap<u32, String>) -> String {
    let mut rows = vec![[
        "Source IP".to_owned(),
        "Destination CIDR".into(),
        "Gateway".into(),
        "Egress IP".into(),
        // The only node whose tunnelled packets this gateway takes for the entry.
        "Tunnel from".into(),
        "Policy".into(),
    ]];
    let or_dash = |ip: Option<IpAddr>| ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
    for e in entries {
        rows.push([
            e.source.to_string(),
            e.destination.to_string(),
            gateway(e),
            or_dash(e.egress_ip),
            or_dash(e.tunnel_from),
            policy_name(names, e.policy_id),
        ]);
    }
    table(&rows)
}

/// Renders counters as two tables.
pub fn render_counters(
    outcomes: &[(u32, &'static str, Counter)],
    policies: &[(u32, Counter)],
    names: &BTreeMap<u32, String>,
) -> String {
    let mut rows = vec![["Outcome".to_owned(), "Packets".into(), "Bytes".into()]];
    for (_, name, c) in outcomes {
        rows.push([(*name).to_owned(), c.packets.to_string(), c.bytes.to_string()]);
    }
    let mut out = table(&rows);
    out.push('\n');
    let mut rows = vec![["Policy".to_owned(), "ID".into(), "Packets".into(), "Bytes".into()]];
    for (id, c) in policies {
        rows.push([
            policy_name(names, *id),
            id.to_string(),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (w, cell)) in widths.iter().zip(row).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_looks_like_cilium_bpf_egress_list() {
        let key = PolicyKeyV4::new("10.244.1.10".parse().unwrap(), "203.0.113.0/24".parse().unwrap());
        let value = EntryValueV4 {
            kind: maps::KIND_GATEWAY,
            gateway_ip: maps::be("192.0.2.11".parse().unwrap()),
            policy_id: 1,
            peer_ip: maps::be("192.0.2.12".parse().unwrap()),
            ..Default::default()
        };
        let excluded = EntryValueV4 {
            kind: maps::KIND_EXCLUDED,
            policy_id: 1,
            ..Default::default()
        };
        let key2 = PolicyKeyV4::new(
            "10.244.1.10".parse().unwrap(),
            "203.0.113.128/25".parse().unwrap(),
        );
        let v6 = (
            EntryKeyV6::new(
                "fd00:10:244:1::10".parse().unwrap(),
                "fd00:203:0:113::/64".parse().unwrap(),
            ),
            EntryV6 {
                kind: maps::KIND_GATEWAY,
                flags: maps::F_LOCAL_GATEWAY,
                policy_id: 1,
                egress_id: 1,
                gateway: maps::AddrV6::underlay("192.0.2.13".parse().unwrap()),
                egress_ip: maps::AddrV6::underlay("fd00:192:0:2::103".parse().unwrap()),
                peer: maps::AddrV6::underlay("192.0.2.11".parse().unwrap()),
            },
        );
        let out = render_list(
            &[
                Listed::from(&(key, value)),
                Listed::from(&(key2, excluded)),
                Listed::from(&v6),
            ],
            &BTreeMap::from([(1, "egress-a".to_owned())]),
        );
        let lines: Vec<&str> = out.lines().collect();
        let cells = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            cells(lines[0]),
            [
                "Source",
                "IP",
                "Destination",
                "CIDR",
                "Gateway",
                "Egress",
                "IP",
                "Tunnel",
                "from",
                "Policy"
            ]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "10.244.1.10",
                "203.0.113.0/24",
                "192.0.2.11",
                "-",
                "192.0.2.12",
                "egress-a"
            ]
        );
        assert_eq!(
            cells(lines[2]),
            [
                "10.244.1.10",
                "203.0.113.128/25",
                "excluded",
                "-",
                "-",
                "egress-a"
            ]
        );
        // IPv6 beside it, over an IPv4 underlay: the gateway and the tunnel peer as IPv4.
        assert_eq!(
            cells(lines[3]),
            [
                "fd00:10:244:1::10",
                "fd00:203:0:113::/64",
                "192.0.2.13",
                "(this",
                "node)",
                "fd00:192:0:2::103",
                "192.0.2.11",
                "egress-a"
            ]
        );
        // Columns line up.
        let at = |line: &str, text: &str| line.find(text).unwrap();
        assert_eq!(at(lines[0], "Policy"), at(lines[3], "egress-a"));
    }
}
