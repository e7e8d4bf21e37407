//! The kernel side of the gateway: static nftables rules that SNAT marked packets to their egress
//! IP, save/restore the mark through conntrack, and the policy route that sends replies back into
//! the tunnel. Rules are per egress IP, never per pod; Sluice owns the table `ip sluice`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use crate::{
    error::Result,
    maps::{MARK_MAGIC, MARK_MAGIC_MASK, MARK_POLICY_MASK, MARK_REPLY, MARK_TUNNEL},
    netdev,
};

/// Priority of the SNAT chain: before the usual masquerade chains (srcnat = 100), whose SNAT
/// would otherwise win: the first NAT binding made for a connection is the one kept.
pub const SNAT_PRIORITY: i32 = 50;

/// The full `ip sluice` table for these egress IPs (egress IP -> policy ids), replacing any
/// previous one in one nftables transaction.
pub fn ruleset(snat: &BTreeMap<Ipv4Addr, BTreeSet<u32>>) -> String {
    let magic_policy = MARK_MAGIC_MASK | MARK_POLICY_MASK;
    let tunnel_mask = MARK_MAGIC_MASK | MARK_TUNNEL;
    let mut s = String::new();
    s.push_str("table ip sluice {}\nflush table ip sluice\ntable ip sluice {\n");
    s.push_str(&format!(
        "  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    \
         ct direction reply ct mark & {tunnel_mask:#x} == {:#x} meta mark set ct mark | {MARK_REPLY:#x}\n  }}\n",
        MARK_MAGIC | MARK_TUNNEL
    ));
    s.push_str(&format!(
        "  chain postrouting {{\n    type nat hook postrouting priority {SNAT_PRIORITY}; policy accept;\n    \
         meta mark & {MARK_MAGIC_MASK:#x} != {MARK_MAGIC:#x} return\n    ct mark set meta mark\n"
    ));
    for (ip, ids) in snat {
        let marks: Vec<String> = ids.iter().map(|id| format!("{:#x}", MARK_MAGIC | id)).collect();
        s.push_str(&format!(
            "    meta mark & {magic_policy:#x} {{ {} }} snat ip to {ip}\n",
            marks.join(", ")
        ));
    }
    s.push_str("  }\n}\n");
    s
}

/// Applies [`ruleset`] with `nft -f -`.
pub fn apply(ruleset: &str) -> Result<()> {
    netdev::run("nft", &["-f", "-"], Some(ruleset)).map(drop)
}

/// Makes replies marked by the `restore` chain use routing table `table`, whose only route sends
/// everything into the tunnel device (the datapath then addresses it to the pod's node).
pub fn ensure_reply_route(table: u32, tunnel_device: &str) -> Result<()> {
    let table = table.to_string();
    let fwmark = format!(
        "{:#x}/{:#x}",
        MARK_MAGIC | MARK_TUNNEL | MARK_REPLY,
        MARK_MAGIC_MASK | MARK_TUNNEL | MARK_REPLY
    );
    let rules = netdev::ip(&["-4", "rule", "show", "pref", &table])?;
    if !rules.contains(&format!("lookup {table}")) {
        netdev::ip(&[
            "-4", "rule", "add", "pref", &table, "fwmark", &fwmark, "lookup", &table,
        ])?;
    }
    netdev::ip(&[
        "-4",
        "route",
        "replace",
        "default",
        "dev",
        tunnel_device,
        "table",
        &table,
    ])
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_snat_rule_per_egress_ip() {
        let snat = BTreeMap::from([
            ("192.0.2.101".parse().unwrap(), BTreeSet::from([1, 3])),
            ("192.0.2.102".parse().unwrap(), BTreeSet::from([2])),
        ]);
        let r = ruleset(&snat);
        assert!(
            r.contains("meta mark & 0xfff0ffff { 0x5c100001, 0x5c100003 } snat ip to 192.0.2.101"),
            "{r}"
        );
        assert!(
            r.contains("meta mark & 0xfff0ffff { 0x5c100002 } snat ip to 192.0.2.102"),
            "{r}"
        );
        assert!(r.contains("meta mark set ct mark | 0x40000"), "{r}");
        assert_eq!(r.matches("snat ip to").count(), 2);
    }
}
