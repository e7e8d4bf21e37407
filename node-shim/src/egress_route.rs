//! Policy routing of a gateway's SNATed traffic out of its policy's egress interface.
//!
//! Per egress interface, a routing table (`reply table + 1 + ifindex`) holding a copy of the main
//! table's IPv4 routes through that interface (kept in sync every tick), and per policy served
//! here one rule `pref <reply table + 1> fwmark <magic | id>/<magic | reply | id> lookup <table>`.
//! The tunnel bit is outside the mask (tunnelled requests and the gateway's own pods both match);
//! the reply bit is inside it with value 0 (replies never match), and the reply rule has the lower
//! preference anyway. Never per pod.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    error::Result,
    maps::{MARK_MAGIC, MARK_MAGIC_MASK, MARK_POLICY_MASK, MARK_REPLY},
    netdev,
};

/// The routing table of the egress interface with index `ifindex`.
pub fn table(reply_table: u32, ifindex: u32) -> u32 {
    reply_table.saturating_add(1).saturating_add(ifindex)
}

/// The preference of the egress rules: right after the reply rule (`pref <reply table>`).
pub fn rule_pref(reply_table: u32) -> u32 {
    reply_table.saturating_add(1)
}

/// `fwmark` argument of the rule of policy `id`.
pub fn fwmark(id: u32) -> String {
    format!(
        "{:#x}/{:#x}",
        MARK_MAGIC | id,
        MARK_MAGIC_MASK | MARK_REPLY | MARK_POLICY_MASK
    )
}

/// One route, as `ip route` arguments (without the table).
type Route = Vec<String>;

/// The `ip route` arguments of one route of `ip -j route show`, if it is a plain unicast route
/// with a device (multipath and special routes are not copied).
fn route_args(v: &serde_json::Value) -> Option<(String, Route)> {
    if v.get("type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| t != "unicast")
    {
        return None;
    }
    let table = v["table"].as_str().unwrap_or("main").to_owned();
    let mut args = vec![v["dst"].as_str()?.to_owned()];
    if let Some(gw) = v["gateway"].as_str() {
        args.extend(["via".to_owned(), gw.to_owned()]);
    }
    args.extend(["dev".to_owned(), v["dev"].as_str()?.to_owned()]);
    for (key, arg) in [("protocol", "proto"), ("scope", "scope"), ("prefsrc", "src")] {
        if let Some(s) = v[key].as_str() {
            args.extend([arg.to_owned(), s.to_owned()]);
        }
    }
    if let Some(m) = v["metric"].as_u64() {
        args.extend(["metric".to_owned(), m.to_string()]);
    }
    if v["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "onlink"))
    {
        args.push("onlink".to_owned());
    }
    Some((table, args))
}

/// Every IPv4 route of every table, by table name.
fn routes_by_table(json: &str) -> BTreeMap<String, BTreeSet<Route>> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut out: BTreeMap<String, BTreeSet<Route>> = BTreeMap::new();
    for r in v.as_array().into_iter().flatten() {
        if let Some((table, args)) = route_args(r) {
            out.entry(table).or_default().insert(args);
        }
    }
    out
}

/// What a table must hold for `dev`: the main table's routes through it, connected ones first
/// (a gateway must be reachable when its route is added).
fn wanted(all: &BTreeMap<String, BTreeSet<Route>>, dev: &str) -> Vec<Route> {
    let mut want: Vec<Route> = all
        .get("main")
        .into_iter()
        .flatten()
        .filter(|r| r.windows(2).any(|w| w[0] == "dev" && w[1] == dev))
        .cloned()
        .collect();
    want.sort_by_key(|r| r.iter().any(|a| a == "via"));
    want
}

/// Makes each table of `tables` (table -> interface) hold the main table's routes through its
/// interface: missing routes added first, stale ones deleted after (a route the kernel refuses is
/// logged and skipped). Returns the number of changes (0 when everything was in place: nothing is
/// written then).
pub fn sync_tables(tables: &BTreeMap<u32, String>) -> Result<u64> {
    if tables.is_empty() {
        return Ok(0);
    }
    let all = routes_by_table(&netdev::ip(&["-j", "-4", "route", "show", "table", "all"])?);
    let mut changes = 0;
    for (table, dev) in tables {
        let t = table.to_string();
        let have = all.get(&t).cloned().unwrap_or_default();
        let want = wanted(&all, dev);
        for r in want.iter().filter(|r| !have.contains(*r)) {
            let mut args: Vec<&str> = vec!["-4", "route", "replace"];
            args.extend(r.iter().map(String::as_str));
            args.extend(["table", &t]);
            // One route the kernel refuses must not hold up the plan: the rest still steer.
            match netdev::ip(&args) {
                Ok(_) => changes += 1,
                Err(e) => tracing::warn!(table, error = %e, "copying a route into an egress table"),
            }
        }
        for r in have.iter().filter(|r| !want.contains(r)) {
            let mut args: Vec<&str> = vec!["-4", "route", "del"];
            args.extend(r.iter().map(String::as_str));
            args.extend(["table", &t]);
            // Already gone (with its address, say) is fine.
            let _ = netdev::ip(&args);
            changes += 1;
        }
    }
    Ok(changes)
}

/// Empties table `table`.
pub fn flush_table(table: u32) {
    let _ = netdev::ip(&["-4", "route", "flush", "table", &table.to_string()]);
}

/// The egress rules in place: (fwmark argument, table).
pub fn current_rules(reply_table: u32) -> Result<BTreeSet<(String, u32)>> {
    let out = netdev::ip(&[
        "-j",
        "-4",
        "rule",
        "show",
        "pref",
        &rule_pref(reply_table).to_string(),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let mark = u32::from_str_radix(r["fwmark"].as_str()?.trim_start_matches("0x"), 16).ok()?;
            let mask = u32::from_str_radix(r["fwmask"].as_str()?.trim_start_matches("0x"), 16).ok()?;
            let table = r["table"].as_str()?.parse().ok()?;
            Some((format!("{mark:#x}/{mask:#x}"), table))
        })
        .collect())
}

/// Adds the rules of `want` (policy id -> table) that are missing; with `prune`, then deletes
/// every other egress rule. Returns the tables of the deleted rules.
pub fn sync_rules(reply_table: u32, want: &BTreeSet<(u32, u32)>, prune: bool) -> Result<BTreeSet<u32>> {
    let pref = rule_pref(reply_table).to_string();
    let have = current_rules(reply_table)?;
    let want: BTreeSet<(String, u32)> = want.iter().map(|(id, t)| (fwmark(*id), *t)).collect();
    for (mark, table) in want.difference(&have) {
        netdev::ip(&[
            "-4",
            "rule",
            "add",
            "pref",
            &pref,
            "fwmark",
            mark,
            "lookup",
            &table.to_string(),
        ])?;
    }
    let mut gone = BTreeSet::new();
    if prune {
        for (mark, table) in have.difference(&want) {
            netdev::ip(&[
                "-4",
                "rule",
                "del",
                "pref",
                &pref,
                "fwmark",
                mark,
                "lookup",
                &table.to_string(),
            ])?;
            gone.insert(*table);
        }
    }
    Ok(gone)
}

/// Removes every egress rule and empties their tables (uninstall).
pub fn remove_all(reply_table: u32) -> Result<()> {
    let gone = sync_rules(reply_table, &BTreeSet::new(), true)?;
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
        assert_eq!(fwmark(3), "0x5c100003/0xfff4ffff");
        let (value, mask) = (0x5c10_0003u32, 0xfff4_ffffu32);
        for mark in [0x5c10_0003, 0x5c18_0003] {
            assert_eq!(mark & mask, value, "{mark:#x}");
        }
        for mark in [0x5c1c_0003, 0x5c14_0003, 0x5c10_0004, 0] {
            assert_ne!(mark & mask, value, "{mark:#x}");
        }
        assert_eq!(rule_pref(8473), 8474);
        assert_eq!(table(8473, 3), 8477);
    }

    #[test]
    fn routes_through_an_interface_are_copied_connected_first() {
        let json = r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]},
            {"dst":"default","gateway":"198.18.0.1","dev":"eth1","metric":100,"flags":["onlink"]},
            {"dst":"198.18.0.0/24","dev":"eth1","protocol":"kernel","scope":"link","prefsrc":"198.18.0.11","flags":[]},
            {"type":"unreachable","dst":"198.18.9.0/24","flags":[]},
            {"dst":"10.0.0.0/8","dev":"eth1","table":"8480","flags":[]},
            {"type":"local","dst":"198.18.0.11","dev":"eth1","table":"local","flags":[]}]"#;
        let all = routes_by_table(json);
        let want = wanted(&all, "eth1");
        assert_eq!(
            want,
            vec![
                "198.18.0.0/24 dev eth1 proto kernel scope link src 198.18.0.11"
                    .split(' ')
                    .map(String::from)
                    .collect::<Vec<_>>(),
                "default via 198.18.0.1 dev eth1 metric 100 onlink"
                    .split(' ')
                    .map(String::from)
                    .collect::<Vec<_>>(),
            ]
        );
        assert_eq!(all["8480"].len(), 1);
        assert!(!all.contains_key("local"));
    }
}
