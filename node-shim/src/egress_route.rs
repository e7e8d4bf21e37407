//! Policy routing of a gateway's SNATed traffic out of its policy's egress interface.
//!
//! Per egress interface, a routing table (`reply table + 1 + ifindex`) holding a copy of the main
//! table's routes of both families through that interface (kept in sync every tick), and per
//! egress here one rule of each family `pref <reply table + 1> fwmark <magic | id>/<magic | reply |
//! id> lookup <table>` (egress ids are numbered across both families).
//! The tunnel bit is outside the mask (tunnelled requests and the gateway's own pods both match);
//! the reply bit is inside it with value 0 (replies never match), and the reply rule has the lower
//! preference anyway. Never per pod.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    error::{Error, Result},
    maps::MarkLayout,
    netdev,
    netlink::{self, Family, FwmarkRule, MAIN_TABLE, Netlink, Route},
};

/// The families whose routes and rules are kept: IPv6 only where the kernel has it.
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// Whether `e` says the kernel has no such family (a kernel built without IPv6).
fn unsupported(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAFNOSUPPORT)
}

/// The routing table of the egress interface with index `ifindex`.
pub fn table(reply_table: u32, ifindex: u32) -> u32 {
    reply_table.saturating_add(1).saturating_add(ifindex)
}

/// The preference of the egress rules: right after the reply rule (`pref <reply table>`).
pub fn rule_pref(reply_table: u32) -> u32 {
    reply_table.saturating_add(1)
}

/// The rule of policy `id`, looking up `table`.
pub fn rule(reply_table: u32, layout: &MarkLayout, id: u32, table: u32) -> FwmarkRule {
    FwmarkRule {
        pref: rule_pref(reply_table),
        mark: layout.egress_mark(id),
        mask: layout.egress | layout.reply,
        table,
    }
}

fn route_socket() -> Result<Netlink> {
    Netlink::route().map_err(|e| Error::io("opening a route netlink socket", e))
}

/// What a table must hold for the interface `ifindex`: the main table's routes through it,
/// connected ones first (a gateway must be reachable when its route is added).
fn wanted(main: &[Route], ifindex: Option<u32>) -> Vec<Route> {
    let mut want: Vec<Route> = main.iter().filter(|r| Some(r.oif) == ifindex).cloned().collect();
    want.sort_by_key(|r| r.gateway.is_some());
    want
}

/// What [`sync_tables`] did.
#[derive(Debug, Default)]
pub struct TablesSynced {
    /// The routes that were missing and were added, by table.
    pub added: BTreeMap<u32, BTreeSet<Route>>,
    pub deleted: u64,
    /// What each table holds now.
    pub holding: BTreeMap<u32, BTreeSet<Route>>,
}

impl TablesSynced {
    /// Routes added and deleted (0 when everything was in place: nothing is written then).
    pub fn changes(&self) -> u64 {
        self.added.values().map(|r| r.len() as u64).sum::<u64>() + self.deleted
    }
}

/// Makes each table of `tables` (table -> interface) hold the main table's routes through its
/// interface: missing routes added first, stale ones deleted after (a route the kernel refuses is
/// logged and skipped).
pub fn sync_tables(tables: &BTreeMap<u32, String>) -> Result<TablesSynced> {
    let mut out = TablesSynced::default();
    if tables.is_empty() {
        return Ok(out);
    }
    let mut nl = route_socket()?;
    let mut main = Vec::new();
    for family in FAMILIES {
        match netlink::routes_of(&mut nl, MAIN_TABLE, family) {
            Err(e) if family == Family::V6 && unsupported(&e) => {}
            r => main.extend(r.map_err(|e| Error::io("listing the main routing table", e))?),
        }
    }
    for (table, dev) in tables {
        let mut have: BTreeSet<Route> = BTreeSet::new();
        for family in FAMILIES {
            match netlink::routes_of(&mut nl, *table, family) {
                Err(e) if family == Family::V6 && unsupported(&e) => {}
                r => have.extend(r.map_err(|e| Error::io(format!("listing routing table {table}"), e))?),
            }
        }
        let want = wanted(&main, netdev::ifindex(dev));
        for r in want.iter().filter(|r| !have.contains(*r)) {
            // One route the kernel refuses must not hold up the plan: the rest still steer.
            match netlink::replace_route(&mut nl, *table, r) {
                Ok(()) => {
                    out.added.entry(*table).or_default().insert(r.clone());
                }
                Err(e) => {
                    tracing::warn!(table, route = ?r, error = %e, "copying a route into an egress table")
                }
            }
        }
        for r in have.iter().filter(|r| !want.contains(r)) {
            // A wanted route to the same destination with the same metric replaced it already;
            // deleting by destination and metric would take that one.
            if want
                .iter()
                .any(|w| w.destination == r.destination && w.metric == r.metric)
            {
                continue;
            }
            // Already gone (with its address, say) is fine.
            let _ = netlink::delete_route(&mut nl, *table, r);
            out.deleted += 1;
        }
        out.holding.insert(*table, want.into_iter().collect());
    }
    Ok(out)
}

/// Empties table `table` (both families).
pub fn flush_table(table: u32) {
    if let Err(e) = route_socket().and_then(|mut nl| {
        let mut routes = netlink::routes(&mut nl, table)
            .map_err(|e| Error::io(format!("listing routing table {table}"), e))?;
        match netlink::routes_of(&mut nl, table, Family::V6) {
            Err(e) if unsupported(&e) => {}
            r => routes.extend(r.map_err(|e| Error::io(format!("listing routing table {table}"), e))?),
        }
        routes.iter().try_for_each(|r| {
            netlink::delete_route(&mut nl, table, r)
                .map_err(|e| Error::io(format!("emptying routing table {table}"), e))
        })
    }) {
        tracing::warn!(table, error = %e, "emptying an egress table");
    }
}

/// The egress rules of `family` in place (none for a family the kernel lacks).
fn current_rules(nl: &mut Netlink, reply_table: u32, family: Family) -> Result<BTreeSet<FwmarkRule>> {
    let pref = rule_pref(reply_table);
    let rules = match netlink::fwmark_rules_of(nl, family) {
        Err(e) if family == Family::V6 && unsupported(&e) => Vec::new(),
        r => r.map_err(|e| Error::io("listing ip rules", e))?,
    };
    Ok(rules.into_iter().filter(|r| r.pref == pref).collect())
}

fn add_missing(nl: &mut Netlink, reply_table: u32, want: &BTreeSet<FwmarkRule>) -> Result<u64> {
    let mut added = 0;
    for family in FAMILIES {
        let have = current_rules(nl, reply_table, family)?;
        for rule in want.difference(&have) {
            match netlink::add_rule_of(nl, *rule, family) {
                Err(e) if family == Family::V6 && unsupported(&e) => break,
                r => r.map_err(|e| Error::io(format!("adding the egress rule {rule:?} ({family:?})"), e))?,
            }
            added += 1;
        }
    }
    Ok(added)
}

fn rules(reply_table: u32, layout: &MarkLayout, want: &BTreeSet<(u32, u32)>) -> BTreeSet<FwmarkRule> {
    want.iter()
        .map(|(id, table)| rule(reply_table, layout, *id, *table))
        .collect()
}

/// Adds the rules of `want` (egress id, table) that are missing; with `prune`, then deletes
/// every other egress rule. Returns the tables of the deleted rules.
pub fn sync_rules(
    reply_table: u32,
    layout: &MarkLayout,
    want: &BTreeSet<(u32, u32)>,
    prune: bool,
) -> Result<BTreeSet<u32>> {
    let mut nl = route_socket()?;
    let want = rules(reply_table, layout, want);
    add_missing(&mut nl, reply_table, &want)?;
    let mut gone = BTreeSet::new();
    if prune {
        for family in FAMILIES {
            for rule in current_rules(&mut nl, reply_table, family)?.difference(&want) {
                netlink::delete_rule_of(&mut nl, *rule, family)
                    .map_err(|e| Error::io(format!("deleting the egress rule {rule:?} ({family:?})"), e))?;
                gone.insert(rule.table);
            }
        }
    }
    Ok(gone)
}

/// Adds back the rules of `want` (egress id, table) that someone else deleted; returns how many.
pub fn restore_rules(reply_table: u32, layout: &MarkLayout, want: &BTreeSet<(u32, u32)>) -> Result<u64> {
    if want.is_empty() {
        return Ok(0);
    }
    add_missing(
        &mut route_socket()?,
        reply_table,
        &rules(reply_table, layout, want),
    )
}

/// Removes every egress rule and empties their tables (uninstall).
pub fn remove_all(reply_table: u32) -> Result<()> {
    let gone = sync_rules(reply_table, &MarkLayout::default(), &BTreeSet::new(), true)?;
    for table in gone {
        flush_table(table);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_match_both_tunnelled_and_local_requests_but_not_replies() {
        let r = rule(8473, &MarkLayout::default(), 3, 8477);
        assert_eq!((r.pref, r.mark, r.mask, r.table), (8474, 0x03, 0x20ff, 8477));
        let (value, mask) = (r.mark, r.mask);
        // Local and tunnelled requests, whatever other bits others set.
        for mark in [0x0003, 0x1003, 0xffff_5003] {
            assert_eq!(mark & mask, value, "{mark:#x}");
        }
        // Replies, other egresses, unmarked packets.
        for mark in [0x3003, 0x2003, 0x0004, 0] {
            assert_ne!(mark & mask, value, "{mark:#x}");
        }
        assert_eq!(rule_pref(8473), 8474);
        assert_eq!(table(8473, 3), 8477);
    }

    #[test]
    fn routes_through_an_interface_are_copied_connected_first() {
        let route = |destination: &str, gateway: Option<&str>, oif, metric| Route {
            destination: destination.parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            oif,
            protocol: 4,
            scope: 0,
            prefsrc: None,
            metric,
            onlink: false,
        };
        let main = vec![
            route("0.0.0.0/0", Some("192.0.2.1"), 2, None),
            route("0.0.0.0/0", Some("198.18.0.1"), 3, Some(100)),
            route("198.18.0.0/24", None, 3, None),
            route("10.0.0.0/8", None, 4, None),
            route("::/0", Some("fe80::1"), 3, Some(1024)),
            route("fe80::/64", None, 3, Some(256)),
        ];
        assert_eq!(
            wanted(&main, Some(3)),
            vec![main[2].clone(), main[5].clone(), main[1].clone(), main[4].clone()],
            "the routes of both families through the interface, connected first"
        );
        assert!(
            wanted(&main, None).is_empty(),
            "an interface that is gone has none"
        );
    }
}
