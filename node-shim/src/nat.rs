//! The kernel side of the gateway: static nftables rules that SNAT marked packets to their egress
//! IP, save/restore the mark through conntrack, and the policy route that sends replies back into
//! the tunnel. Rules are per egress IP, never per pod; Sluice owns the table `inet sluice` (both
//! families: IPv4 SNAT and IPv6 NAT66). Earlier versions had an `ip sluice` table, which every
//! apply and the removal delete.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily, NetfilterSubsystem,
    nftables::{
        GenAttribute, GenMessage, NfTablesMessage, RuleAttribute, RuleMessage, TableAttribute, TableFlags,
        TableMessage,
    },
    none::ControlMessage,
};

use crate::{
    error::{Error, Result},
    maps::MarkLayout,
    netdev,
    netlink::{self, Family, FwmarkRule, Netlink, Route},
};

/// Priority of the SNAT chain: before the usual masquerade chains (srcnat = 100), whose SNAT
/// would otherwise win: the first NAT binding made for a connection is the one kept.
pub const SNAT_PRIORITY: i32 = 50;

/// The egress IPs this node SNATs to, by family: egress IP -> the egress ids (marks) that SNAT to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snat {
    pub v4: BTreeMap<Ipv4Addr, BTreeSet<u32>>,
    pub v6: BTreeMap<Ipv6Addr, BTreeSet<u32>>,
}

impl Snat {
    /// Adds `other`'s rules to these.
    pub fn extend(&mut self, other: &Snat) {
        for (ip, ids) in &other.v4 {
            self.v4.entry(*ip).or_default().extend(ids);
        }
        for (ip, ids) in &other.v6 {
            self.v6.entry(*ip).or_default().extend(ids);
        }
    }
}

/// The full `inet sluice` table for these egress IPs, replacing any previous one (and the
/// `ip sluice` table of earlier versions) in one nftables transaction.
/// The no-leak guard's backstop in nftables: what a pod interface the datapath is not attached to
/// yet (a pod that started sending within milliseconds of its interface appearing) must not
/// send by the normal path. The same decision as the datapath's guard, made where no attach has
/// to happen first: the forward hook, before any masquerade.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backstop {
    /// Name patterns of pod interfaces (`veth*`, ...).
    pub pod_interfaces: Vec<String>,
    /// Destinations `failurePolicy: Drop` policies guard.
    pub guarded: BTreeSet<Ipv4Net>,
    /// In-cluster CIDRs, never guarded.
    pub cluster: BTreeSet<Ipv4Net>,
    /// The pods of this node the plan has decided on.
    pub decided: BTreeSet<Ipv4Addr>,
    /// The same three for IPv6.
    pub guarded_v6: BTreeSet<ipnet::Ipv6Net>,
    pub cluster_v6: BTreeSet<ipnet::Ipv6Net>,
    pub decided_v6: BTreeSet<Ipv6Addr>,
}

impl Backstop {
    /// What holds while the datapath moves from `self` to `next`: guarded destinations grow
    /// first and shrink last, pods count as decided only when both say so.
    pub fn during_move_to(&self, next: &Backstop) -> Backstop {
        Backstop {
            pod_interfaces: next.pod_interfaces.clone(),
            guarded: self.guarded.union(&next.guarded).copied().collect(),
            cluster: next.cluster.clone(),
            decided: self.decided.intersection(&next.decided).copied().collect(),
            guarded_v6: self.guarded_v6.union(&next.guarded_v6).copied().collect(),
            cluster_v6: next.cluster_v6.clone(),
            decided_v6: self.decided_v6.intersection(&next.decided_v6).copied().collect(),
        }
    }
}

fn texts<T: ToString>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    items.into_iter().map(|t| t.to_string()).collect()
}

fn nft_set(name: &str, kind: &str, family: &str, elements: &[String]) -> String {
    let interval = if kind == "interval" {
        " flags interval; auto-merge;"
    } else {
        ""
    };
    let body = if elements.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }}", elements.join(", "))
    };
    format!("  set {name} {{ type {family};{interval}{body} }}\n")
}

pub fn ruleset(snat: &Snat, layout: &MarkLayout, backstop: &Backstop) -> String {
    let (egress, tunnel, reply) = (layout.egress, layout.tunnel, layout.reply);
    let ours = layout.ours();
    let mut s = String::new();
    // Deleted and created again in the same transaction: whatever else is in the table (a chain
    // someone added, the dormant flag) goes, and nothing runs without the table meanwhile.
    s.push_str(
        "table ip sluice {}\ndelete table ip sluice\ntable inet sluice {}\ndelete table inet sluice\n\
         table inet sluice {\n",
    );
    // Per family: (set suffix, set type, match keyword, guarded, in-cluster, decided).
    let families = [
        (
            "",
            "ipv4_addr",
            "ip",
            texts(backstop.guarded.iter().map(Ipv4Net::trunc)),
            texts(backstop.cluster.iter().map(Ipv4Net::trunc)),
            texts(&backstop.decided),
        ),
        (
            "6",
            "ipv6_addr",
            "ip6",
            texts(backstop.guarded_v6.iter().map(ipnet::Ipv6Net::trunc)),
            texts(backstop.cluster_v6.iter().map(ipnet::Ipv6Net::trunc)),
            texts(&backstop.decided_v6),
        ),
    ];
    let guarding = families.iter().any(|f| !f.3.is_empty());
    if guarding && !backstop.pod_interfaces.is_empty() {
        let patterns: Vec<String> = backstop
            .pod_interfaces
            .iter()
            .map(|p| format!("\"{}\"", p.replace('"', "")))
            .collect();
        let mut rules = String::new();
        for (suffix, kind, ip, guarded, cluster, decided) in families.iter().filter(|f| !f.3.is_empty()) {
            s.push_str(&nft_set(&format!("guarded{suffix}"), "interval", kind, guarded));
            s.push_str(&nft_set(&format!("cluster{suffix}"), "interval", kind, cluster));
            s.push_str(&nft_set(&format!("decided{suffix}"), "plain", kind, decided));
            rules.push_str(&format!(
                "    iifname {{ {} }} {ip} daddr @guarded{suffix} {ip} daddr != @cluster{suffix} \
                 {ip} saddr != @decided{suffix} counter drop\n",
                patterns.join(", ")
            ));
        }
        s.push_str(&format!(
            "  chain forward {{\n    type filter hook forward priority filter - 5; policy accept;\n{rules}  }}\n"
        ));
    }
    // Replies of tunnelled flows get the tunnel and reply bits (the reply rule sends them into
    // the tunnel); every other bit of their mark stays as it is.
    s.push_str(&format!(
        "  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    \
         ct direction reply ct mark & {tunnel:#x} == {tunnel:#x} meta mark set meta mark | {:#x}\n  }}\n",
        tunnel | reply
    ));
    // Packets to SNAT carry an egress id; only our bits go into the connection's mark.
    s.push_str(&format!(
        "  chain postrouting {{\n    type nat hook postrouting priority {SNAT_PRIORITY}; policy accept;\n    \
         meta mark & {egress:#x} == 0 return\n    ct mark set meta mark & {:#x}\n",
        ours & !reply
    ));
    let marks = |ids: &BTreeSet<u32>| {
        ids.iter()
            .map(|id| format!("{:#x}", layout.egress_mark(*id)))
            .collect::<Vec<String>>()
            .join(", ")
    };
    for (ip, ids) in &snat.v4 {
        s.push_str(&format!(
            "    meta nfproto ipv4 meta mark & {egress:#x} {{ {} }} snat ip to {ip}\n",
            marks(ids)
        ));
    }
    for (ip, ids) in &snat.v6 {
        s.push_str(&format!(
            "    meta nfproto ipv6 meta mark & {egress:#x} {{ {} }} snat ip6 to {ip}\n",
            marks(ids)
        ));
    }
    s.push_str("  }\n}\n");
    s
}

/// Applies [`ruleset`] with `nft -f -`.
pub fn apply(ruleset: &str) -> Result<()> {
    netdev::run("nft", &["-f", "-"], Some(ruleset)).map(drop)
}

/// The name of Sluice's table (family `inet`; `ip` in earlier versions).
const TABLE: &str = "sluice";

/// What the kernel holds of the `inet sluice` table: its handle, whether it is dormant, and the
/// handles of its rules by chain. Every object nftables creates gets a new handle, so a table or
/// rule deleted and added back by someone else shows as a different value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableHeld {
    pub handle: u64,
    pub dormant: bool,
    pub rules: BTreeMap<String, Vec<u64>>,
}

impl TableHeld {
    /// Whether the table holds every rule of `ruleset` (as many rules per chain) and is active.
    fn has_the_shape_of(&self, ruleset: &str) -> bool {
        let held: BTreeMap<&str, usize> = self
            .rules
            .iter()
            .map(|(chain, rules)| (chain.as_str(), rules.len()))
            .collect();
        !self.dormant && held == rules_per_chain(ruleset)
    }
}

/// How many rules each chain of a ruleset made by [`ruleset`] has.
fn rules_per_chain(ruleset: &str) -> BTreeMap<&str, usize> {
    let mut out = BTreeMap::new();
    let mut chain = None;
    for line in ruleset.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("chain ").and_then(|l| l.strip_suffix(" {")) {
            chain = Some(name);
            out.insert(name, 0);
        } else if line == "}" {
            chain = None;
        } else if let Some(c) = chain
            && !line.is_empty()
            && !line.starts_with("type ")
        {
            *out.entry(c).or_default() += 1;
        }
    }
    out
}

fn netfilter_request(
    nl: &mut Netlink,
    family: NetfilterProtoFamily,
    message: NfTablesMessage,
    flags: u16,
) -> std::io::Result<Vec<NfTablesMessage>> {
    let request = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), message);
    Ok(nl
        .request(request, flags)?
        .into_iter()
        .filter_map(|m| match m.inner {
            NetfilterMessageInner::NfTables(m) => Some(m),
            _ => None,
        })
        .collect())
}

/// The nftables ruleset generation: it changes whenever anyone changes the ruleset.
pub fn generation(nl: &mut Netlink) -> Result<u32> {
    let answers = netfilter_request(
        nl,
        NetfilterProtoFamily::Unspec,
        NfTablesMessage::GetGen(GenMessage { attributes: vec![] }),
        0,
    )
    .map_err(|e| Error::io("reading the nftables generation", e))?;
    answers
        .iter()
        .find_map(|m| match m {
            NfTablesMessage::NewGen(g) => g.attributes.iter().find_map(|a| match a {
                GenAttribute::Id(id) => Some(*id),
                _ => None,
            }),
            _ => None,
        })
        .ok_or_else(|| {
            Error::io(
                "reading the nftables generation",
                std::io::Error::other("no generation id in the answer"),
            )
        })
}

/// What the kernel holds of the `inet sluice` table, if it exists.
pub fn table_held(nl: &mut Netlink) -> Result<Option<TableHeld>> {
    let context = || "reading the nftables table inet sluice".to_owned();
    let table = match netfilter_request(
        nl,
        NetfilterProtoFamily::Inet,
        NfTablesMessage::GetTable(TableMessage {
            attributes: vec![TableAttribute::Name(TABLE.to_owned())],
        }),
        0,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        r => r.map_err(|e| Error::io(context(), e))?,
    };
    let (mut handle, mut dormant) = (None, false);
    for a in table
        .iter()
        .filter_map(|m| match m {
            NfTablesMessage::NewTable(t) => Some(&t.attributes),
            _ => None,
        })
        .flatten()
    {
        match a {
            TableAttribute::Handle(h) => handle = Some(*h),
            TableAttribute::Flags(f) => dormant = f.contains(TableFlags::Dormant),
            _ => {}
        }
    }
    let Some(handle) = handle else {
        return Ok(None);
    };
    let dump = match netfilter_request(
        nl,
        NetfilterProtoFamily::Inet,
        NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(TABLE.to_owned())],
        }),
        NLM_F_DUMP,
    ) {
        // Deleted between the two requests.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        r => r.map_err(|e| Error::io(context(), e))?,
    };
    let mut rules: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in &dump {
        let NfTablesMessage::NewRule(r) = m else { continue };
        let (mut table, mut chain, mut handle) = (None, None, None);
        for a in &r.attributes {
            match a {
                RuleAttribute::Table(t) => table = Some(t.as_str()),
                RuleAttribute::Chain(c) => chain = Some(c.clone()),
                RuleAttribute::Handle(h) => handle = Some(*h),
                _ => {}
            }
        }
        if let (Some(TABLE), Some(chain), Some(handle)) = (table, chain, handle) {
            rules.entry(chain).or_default().push(handle);
        }
    }
    // Chains without rules are not in the rule dump: they count as holding none.
    Ok(Some(TableHeld {
        handle,
        dormant,
        rules,
    }))
}

/// The batch deleting the `sluice` table of `family`: nf_tables takes changes only inside a
/// batch (as `nft -f` sends them), and acknowledges the deletion itself.
fn delete_table_batch(family: NetfilterProtoFamily) -> Vec<(NetfilterMessage, u16)> {
    let nftables = u16::from(u8::from(NetfilterSubsystem::NfTables));
    let control = |m: ControlMessage| {
        NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, nftables), m)
    };
    let delete = NetfilterMessage::new(
        NetfilterHeader::new(family, 0, 0),
        NfTablesMessage::DeleteTable(TableMessage {
            attributes: vec![TableAttribute::Name(TABLE.to_owned())],
        }),
    );
    vec![
        (control(ControlMessage::BatchBegin), 0),
        (delete, NLM_F_ACK),
        (control(ControlMessage::BatchEnd), 0),
    ]
}

/// Deletes Sluice's nftables table (and an earlier version's `ip sluice`); one already gone is
/// fine.
pub fn remove_table() -> Result<()> {
    let mut nl = Netlink::netfilter().map_err(|e| Error::io("opening a netfilter netlink socket", e))?;
    for (family, name) in [
        (NetfilterProtoFamily::Inet, "inet"),
        (NetfilterProtoFamily::IPv4, "ip"),
    ] {
        match nl.batch(delete_table_batch(family)) {
            // No table, or no nf_tables at all (then there is no table either).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EOPNOTSUPP)) => {}
            r => r.map_err(|e| Error::io(format!("deleting the nftables table {name} sluice"), e))?,
        }
    }
    Ok(())
}

/// Sluice's nftables table as last applied, and what the kernel held right after, to notice
/// cheaply when someone else changed it (an `nft flush ruleset`, say).
#[derive(Debug, Default)]
pub struct Guard {
    ruleset: Option<String>,
    /// The ruleset generation when `held` was read: while it stays the same, nothing changed.
    generation: Option<u32>,
    held: Option<TableHeld>,
}

impl Guard {
    /// Applies `ruleset` unless it is the one in place.
    pub fn apply(&mut self, ruleset: String) -> Result<()> {
        if self.ruleset.as_deref() == Some(ruleset.as_str()) {
            return Ok(());
        }
        apply(&ruleset)?;
        self.ruleset = Some(ruleset);
        self.record();
        Ok(())
    }

    /// Checks that the kernel still holds the table as applied (one netlink request when the
    /// ruleset generation is unchanged, which is the rule) and applies it again when not.
    /// Returns whether it had to.
    pub fn restore(&mut self) -> Result<bool> {
        let Some(ruleset) = &self.ruleset else {
            return Ok(false);
        };
        let mut nl = Netlink::netfilter().map_err(|e| Error::io("opening a netfilter netlink socket", e))?;
        let generation = generation(&mut nl)?;
        if self.generation == Some(generation) {
            return Ok(false);
        }
        let intact = table_held(&mut nl)?.is_some_and(|held| {
            held.has_the_shape_of(ruleset) && self.held.as_ref().is_none_or(|h| *h == held)
        });
        if intact {
            // Someone changed something else.
            self.generation = Some(generation);
            return Ok(false);
        }
        apply(ruleset)?;
        self.record();
        Ok(true)
    }

    /// Remembers what the kernel holds now. The generation is read first: a change made after
    /// it shows as a new generation on the next check. Failing to read is not fatal: the next
    /// check then looks at the table (its shape only, when `held` could not be read).
    fn record(&mut self) {
        let read = Netlink::netfilter()
            .map_err(|e| Error::io("opening a netfilter netlink socket", e))
            .and_then(|mut nl| Ok((generation(&mut nl)?, table_held(&mut nl)?)));
        match read {
            Ok((generation, held)) => {
                self.generation = Some(generation);
                self.held = held;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading back the nftables table");
                self.generation = None;
                self.held = None;
            }
        }
    }
}

/// The rule sending replies marked by the `prerouting` chain to table `table`.
pub fn reply_rule(table: u32, layout: &MarkLayout) -> FwmarkRule {
    FwmarkRule {
        pref: table,
        mark: layout.tunnel | layout.reply,
        mask: layout.tunnel | layout.reply,
        table,
    }
}

/// What [`ensure_reply_route`] had to put back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyRepair {
    pub rule: bool,
    pub route: bool,
}

/// Makes replies marked by the `prerouting` chain use routing table `table`, whose only route sends
/// everything into the tunnel device `tunnel_ifindex` (the datapath then addresses it to the pod's
/// node). Reads first (netlink dumps) and writes only what is missing.
pub fn ensure_reply_route(table: u32, tunnel_ifindex: u32, layout: &MarkLayout) -> Result<ReplyRepair> {
    let mut nl = Netlink::route().map_err(|e| Error::io("opening a route netlink socket", e))?;
    let rule = reply_rule(table, layout);
    let route = Route::default_via_device(tunnel_ifindex);
    let mut repair = ReplyRepair::default();
    for family in [Family::V4, Family::V6] {
        match ensure_reply_rule(&mut nl, rule, family) {
            Ok(added) => repair.rule |= added,
            // A kernel without IPv6: there are no IPv6 replies either.
            Err(e) if family == Family::V6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("putting the reply rule {rule:?} ({family:?}) in place"),
                    e,
                ));
            }
        }
    }
    let routes = netlink::routes(&mut nl, table)
        .map_err(|e| Error::io(format!("listing routing table {table}"), e))?;
    if routes != [route.clone()] {
        netlink::replace_route(&mut nl, table, &route)
            .map_err(|e| Error::io(format!("adding the reply route to table {table}"), e))?;
        repair.route = true;
    }
    // A tunnel device with IPv6 off (the node's IPv6 is off) takes no IPv6 route, and carries no
    // IPv6 replies either.
    if !crate::netdev::ipv6_enabled(tunnel_ifindex) {
        return Ok(repair);
    }
    match netlink::routes_v6(&mut nl, table) {
        Ok(held) if held == [(0, Some(tunnel_ifindex))] => {}
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
        Ok(_) => {
            netlink::replace_default_v6(&mut nl, table, tunnel_ifindex)
                .map_err(|e| Error::io(format!("adding the IPv6 reply route to table {table}"), e))?;
            repair.route = true;
        }
        Err(e) => return Err(Error::io(format!("listing IPv6 routing table {table}"), e)),
    }
    Ok(repair)
}

/// Puts the reply rule of `family` in place, removing stale ones of its preference; whether it
/// had to be added.
fn ensure_reply_rule(nl: &mut Netlink, rule: FwmarkRule, family: Family) -> std::io::Result<bool> {
    let rules = netlink::fwmark_rules_of(nl, family)?;
    for stale in rules.iter().filter(|r| r.pref == rule.pref && **r != rule) {
        netlink::delete_rule_of(nl, *stale, family)?;
    }
    if rules.contains(&rule) {
        return Ok(false);
    }
    netlink::add_rule_of(nl, rule, family)?;
    Ok(true)
}

/// Removes the reply rules (both families) and routes.
pub fn remove_reply_route(table: u32) -> Result<()> {
    let mut nl = Netlink::route().map_err(|e| Error::io("opening a route netlink socket", e))?;
    for family in [Family::V4, Family::V6] {
        let rules = match netlink::fwmark_rules_of(&mut nl, family) {
            Err(e) if family == Family::V6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => continue,
            r => r.map_err(|e| Error::io("listing ip rules", e))?,
        };
        for rule in rules.into_iter().filter(|r| r.pref == table) {
            netlink::delete_rule_of(&mut nl, rule, family)
                .map_err(|e| Error::io("deleting the reply rule", e))?;
        }
    }
    match netlink::flush_table_v6(&mut nl, table) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
        r => r.map_err(|e| Error::io(format!("emptying IPv6 routing table {table}"), e))?,
    }
    netlink::flush_table(&mut nl, table).map_err(|e| Error::io(format!("emptying routing table {table}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_deleted_in_a_batch_of_its_own() {
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
        let (bytes, awaited) = netlink::encode_batch(delete_table_batch(NetfilterProtoFamily::Inet), 7);
        assert_eq!(awaited, [8], "only the deletion is acknowledged");
        let mut rest = &bytes[..];
        let mut messages = Vec::new();
        while !rest.is_empty() {
            let m = NetlinkMessage::<NetfilterMessage>::deserialize(rest).expect("parses");
            rest = &rest[(m.header.length as usize).next_multiple_of(4)..];
            messages.push(m);
        }
        // The kernel's numbers: NFNL_MSG_BATCH_BEGIN, NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELTABLE,
        // NFNL_MSG_BATCH_END.
        let types: Vec<u16> = messages.iter().map(|m| m.header.message_type).collect();
        assert_eq!(types, [0x10, 0x0a02, 0x11]);
        let sequences: Vec<u32> = messages.iter().map(|m| m.header.sequence_number).collect();
        assert_eq!(sequences, [7, 8, 9]);
        let payloads: Vec<&NetfilterMessage> = messages
            .iter()
            .map(|m| match &m.payload {
                NetlinkPayload::InnerMessage(m) => m,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(payloads[0].header.res_id, 10, "the batch is nf_tables'");
        assert_eq!(payloads[1].header.family, NetfilterProtoFamily::Inet);
        assert_eq!(
            payloads[1].inner,
            NetfilterMessageInner::NfTables(NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name("sluice".into())],
            }))
        );
    }

    #[test]
    fn one_snat_rule_per_egress_ip_of_each_family() {
        let snat = Snat {
            v4: BTreeMap::from([
                ("192.0.2.101".parse().unwrap(), BTreeSet::from([1, 3])),
                ("192.0.2.102".parse().unwrap(), BTreeSet::from([2])),
            ]),
            v6: BTreeMap::from([("fd00:192:0:2::103".parse().unwrap(), BTreeSet::from([4]))]),
        };
        let r = ruleset(&snat, &MarkLayout::default(), &Backstop::default());
        assert!(
            r.contains("meta nfproto ipv4 meta mark & 0xff { 0x1, 0x3 } snat ip to 192.0.2.101"),
            "{r}"
        );
        assert!(
            r.contains("meta nfproto ipv4 meta mark & 0xff { 0x2 } snat ip to 192.0.2.102"),
            "{r}"
        );
        assert!(
            r.contains("meta nfproto ipv6 meta mark & 0xff { 0x4 } snat ip6 to fd00:192:0:2::103"),
            "{r}"
        );
        // One table for both families; an earlier version's IPv4-only table goes.
        assert!(r.contains("delete table ip sluice\n"), "{r}");
        assert!(r.contains("table inet sluice {\n"), "{r}");
        // Only Sluice's bits move between the packet and the connection.
        assert!(r.contains("meta mark set meta mark | 0x3000"), "{r}");
        assert!(r.contains("ct mark set meta mark & 0x10ff"), "{r}");
        assert_eq!(r.matches("snat ip to").count(), 2);
        assert_eq!(r.matches("snat ip6 to").count(), 1);
        // Another layout: the ids where the layout puts them.
        let shifted = MarkLayout::new(0x00ff_0000, 0x100, 0x200).unwrap();
        assert!(
            ruleset(&snat, &shifted, &Backstop::default())
                .contains("meta mark & 0xff0000 { 0x20000 } snat ip to 192.0.2.102")
        );
    }

    #[test]
    fn the_backstop_drops_undecided_pods_to_guarded_destinations_outside_the_cluster() {
        let old = Backstop {
            pod_interfaces: vec!["veth*".into(), "cali*".into()],
            guarded: BTreeSet::from(["203.0.113.0/24".parse().unwrap()]),
            cluster: BTreeSet::from(["10.244.0.0/16".parse().unwrap()]),
            decided: BTreeSet::from(["10.244.2.10".parse().unwrap(), "10.244.2.11".parse().unwrap()]),
            ..Backstop::default()
        };
        let new = Backstop {
            guarded: BTreeSet::from(["0.0.0.0/0".parse().unwrap()]),
            decided: BTreeSet::from(["10.244.2.11".parse().unwrap(), "10.244.2.12".parse().unwrap()]),
            ..old.clone()
        };
        // While moving: both guards, and only the pods both plans decided on.
        let moving = old.during_move_to(&new);
        assert_eq!(moving.guarded.len(), 2);
        assert_eq!(moving.decided, BTreeSet::from(["10.244.2.11".parse().unwrap()]));
        let r = ruleset(&Snat::default(), &MarkLayout::default(), &moving);
        assert!(r.contains("set guarded { type ipv4_addr; flags interval; auto-merge; elements = { 0.0.0.0/0, 203.0.113.0/24 } }"), "{r}");
        assert!(
            r.contains("set decided { type ipv4_addr; elements = { 10.244.2.11 } }"),
            "{r}"
        );
        assert!(
            r.contains(
                "iifname { \"veth*\", \"cali*\" } ip daddr @guarded ip daddr != @cluster ip saddr != @decided counter drop"
            ),
            "{r}"
        );
        assert_eq!(rules_per_chain(&r)["forward"], 1);
        // IPv6 beside it: its own sets and rule in the same chain.
        let dual = Backstop {
            guarded_v6: BTreeSet::from(["fd00:203:0:113::/64".parse().unwrap()]),
            cluster_v6: BTreeSet::from(["fd00:10:244::/48".parse().unwrap()]),
            decided_v6: BTreeSet::from(["fd00:10:244:2::10".parse().unwrap()]),
            ..new.clone()
        };
        let r = ruleset(&Snat::default(), &MarkLayout::default(), &dual);
        assert!(
            r.contains("set guarded6 { type ipv6_addr; flags interval; auto-merge; elements = { fd00:203:0:113::/64 } }"),
            "{r}"
        );
        assert!(
            r.contains("ip6 daddr @guarded6 ip6 daddr != @cluster6 ip6 saddr != @decided6 counter drop"),
            "{r}"
        );
        assert_eq!(rules_per_chain(&r)["forward"], 2);
        // An IPv6 guard alone makes the chain too.
        let only_v6 = Backstop {
            guarded: BTreeSet::new(),
            ..dual
        };
        let r = ruleset(&Snat::default(), &MarkLayout::default(), &only_v6);
        assert_eq!(rules_per_chain(&r)["forward"], 1, "{r}");
        assert!(!r.contains("@guarded "), "{r}");
        // No guard: no backstop chain at all.
        let none = ruleset(&Snat::default(), &MarkLayout::default(), &Backstop::default());
        assert!(!none.contains("forward"), "{none}");
    }

    #[test]
    fn a_table_missing_a_rule_or_dormant_is_not_the_one_applied() {
        let snat = Snat {
            v4: BTreeMap::from([("192.0.2.101".parse().unwrap(), BTreeSet::from([1]))]),
            ..Snat::default()
        };
        let r = ruleset(&snat, &MarkLayout::default(), &Backstop::default());
        assert_eq!(
            rules_per_chain(&r),
            BTreeMap::from([("prerouting", 1), ("postrouting", 3)]),
            "{r}"
        );
        let held = TableHeld {
            handle: 7,
            dormant: false,
            rules: BTreeMap::from([
                ("prerouting".to_owned(), vec![2]),
                ("postrouting".to_owned(), vec![4, 5, 6]),
            ]),
        };
        assert!(held.has_the_shape_of(&r));
        let mut flushed = held.clone();
        flushed.rules.clear();
        assert!(!flushed.has_the_shape_of(&r), "chains without rules");
        let mut short = held.clone();
        short.rules.get_mut("postrouting").unwrap().pop();
        assert!(!short.has_the_shape_of(&r), "a deleted SNAT rule");
        let dormant = TableHeld {
            dormant: true,
            ..held.clone()
        };
        assert!(!dormant.has_the_shape_of(&r));
        assert!(
            !held.has_the_shape_of(&ruleset(
                &Snat::default(),
                &MarkLayout::default(),
                &Backstop::default()
            )),
            "another plan's table"
        );
    }
}
