//! The testbed with one `sluice-shim run --entries FILE` per node, fed from a plan file written here
//! (the `sluice-operator plan --output json` format).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{NODES, Testbed, node_ip, wait_for};

/// Where matching traffic goes, in test terms.
#[derive(Clone, Debug)]
pub enum Gw {
    /// Gateway node name and its egress IP.
    Node(&'static str, &'static str),
    /// Gateway node name, its egress IP and the egress interface the policy names.
    NodeVia(&'static str, &'static str, &'static str),
    None,
    Fallback,
    Excluded,
}

/// One (pod, destination) rule of a policy.
#[derive(Clone, Debug)]
pub struct Rule {
    pub policy: &'static str,
    /// A pod name of the testbed (`p1`, ...): its address of the destination's family.
    pub source: &'static str,
    /// A CIDR, IPv4 or IPv6.
    pub destination: &'static str,
    pub gateway: Gw,
}

/// A [`Testbed`] running `sluice-shim run --entries <plan file>` in every node.
pub struct FileCluster {
    testbed: Testbed,
    shim: PathBuf,
    extra_args: Vec<OsString>,
    plan_hash: String,
    /// The shims take the nodes' IPv6 addresses as their underlay addresses, and plans name
    /// gateways and source nodes by them ([`FileCluster::start_over_ipv6_underlay`]).
    underlay_v6: bool,
}

impl Deref for FileCluster {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.testbed
    }
}

impl DerefMut for FileCluster {
    fn deref_mut(&mut self) -> &mut Testbed {
        &mut self.testbed
    }
}

/// The name under which node `node`'s shim runs ([`Testbed::spawn`], [`Testbed::log`]).
pub fn shim_name(node: &str) -> String {
    format!("shim-{node}")
}

impl FileCluster {
    /// Builds the testbed and starts the shim binary `shim` in every node with an empty plan,
    /// waiting until each applied it. `extra_args` go after `run` (e.g. `--policy-map-max N`).
    pub fn start(shim: impl Into<PathBuf>, extra_args: &[&str]) -> Result<FileCluster> {
        Self::start_with(shim, extra_args, false)
    }

    /// [`FileCluster::start`] over the IPv6 underlay: every shim's `--node-ip` is its node's
    /// IPv6 address (the tunnel's outer packets are IPv6), and [`FileCluster::plan`] names
    /// gateways and source nodes by their IPv6 addresses.
    pub fn start_over_ipv6_underlay(shim: impl Into<PathBuf>, extra_args: &[&str]) -> Result<FileCluster> {
        Self::start_with(shim, extra_args, true)
    }

    /// [`FileCluster::start`], with `prepare` run on the testbed before any shim starts (a
    /// node's settings as a cluster would have them before Sluice is installed).
    pub fn start_after(
        shim: impl Into<PathBuf>,
        extra_args: &[&str],
        prepare: impl FnOnce(&Testbed),
    ) -> Result<FileCluster> {
        let testbed = Testbed::new()?;
        prepare(&testbed);
        Self::start_on(testbed, shim, extra_args, false)
    }

    fn start_with(shim: impl Into<PathBuf>, extra_args: &[&str], underlay_v6: bool) -> Result<FileCluster> {
        Self::start_on(Testbed::new()?, shim, extra_args, underlay_v6)
    }

    fn start_on(
        testbed: Testbed,
        shim: impl Into<PathBuf>,
        extra_args: &[&str],
        underlay_v6: bool,
    ) -> Result<FileCluster> {
        let mut c = FileCluster {
            testbed,
            shim: shim.into(),
            extra_args: extra_args.iter().map(OsString::from).collect(),
            plan_hash: String::new(),
            underlay_v6,
        };
        let empty = serde_json::to_vec_pretty(&c.plan(&[]))?;
        c.write_plan_bytes(&empty)?;
        for (node, _) in NODES {
            c.try_start_shim(node)?;
        }
        c.try_wait_applied(Duration::from_secs(20))?;
        Ok(c)
    }

    /// The plan file the shims read.
    pub fn plan_path(&self) -> PathBuf {
        self.scratch().join("plan.json")
    }

    /// The underlay address of `node` the shims and plans use.
    pub fn underlay_ip(&self, node: &str) -> &'static str {
        if self.underlay_v6 {
            crate::node_ip_v6(node)
        } else {
            node_ip(node)
        }
    }

    /// The plan document (`plan --output json` format) made of `rules`.
    pub fn plan(&self, rules: &[Rule]) -> serde_json::Value {
        let node_ip = |node: &str| self.underlay_ip(node);
        let mut per_node: BTreeMap<&str, Vec<serde_json::Value>> =
            NODES.iter().map(|(n, _)| (*n, vec![])).collect();
        for r in rules {
            let (src_node, src_ip) = self.pod(r.source);
            let src_ip = if r.destination.contains(':') {
                self.pod_ip_v6(r.source)
            } else {
                src_ip.to_owned()
            };
            let entry = |gateway: &str, egress: Option<(&str, Option<&str>)>| {
                serde_json::json!({"source": src_ip, "destination": r.destination, "gateway": gateway,
                    "egressIP": egress.map(|e| e.0), "interface": egress.and_then(|e| e.1), "policy": r.policy})
            };
            // The gateway's entry names the pod's node: the only outer source it accepts.
            let gateway_entry = |gateway: &str, egress: (&str, Option<&str>)| {
                let mut e = entry(gateway, Some(egress));
                e["sourceNodeIP"] = node_ip(src_node).into();
                e
            };
            let mut push = |node: &str, e| per_node.get_mut(node).expect("known node").push(e);
            match &r.gateway {
                Gw::Node(gw, egress) | Gw::NodeVia(gw, egress, _) => {
                    let interface = match &r.gateway {
                        Gw::NodeVia(_, _, i) => Some(*i),
                        _ => None,
                    };
                    // The source node steers; the gateway node holds the entry with its egress IP
                    // (the planner's contract, see docs/datapath.md).
                    let local = *gw == src_node;
                    push(
                        src_node,
                        entry(node_ip(gw), local.then_some((*egress, interface))),
                    );
                    if !local {
                        push(gw, gateway_entry(node_ip(gw), (egress, interface)));
                    }
                }
                Gw::None => push(src_node, entry("none", None)),
                Gw::Fallback => push(src_node, entry("fallback", None)),
                Gw::Excluded => push(src_node, entry("excluded", None)),
            }
        }
        let nodes: Vec<_> = per_node
            .into_iter()
            .map(|(name, entries)| serde_json::json!({"name": name, "entries": entries}))
            .collect();
        serde_json::json!({"nodes": nodes, "policies": []})
    }

    /// `plan` with node `node`'s section given `pinnableGateways` [`gateway`] only (a gateway
    /// that keeps nothing for it: the node itself, whose pods' flows left from there).
    pub fn with_pinnable(&self, mut plan: serde_json::Value, node: &str, gateway: &str) -> serde_json::Value {
        let nodes = plan["nodes"].as_array_mut().expect("nodes");
        let section = nodes.iter_mut().find(|n| n["name"] == node).expect("the node");
        section["pinnableGateways"] = serde_json::json!([self.underlay_ip(gateway)]);
        plan
    }

    /// `plan` with node `node`'s section given `pinnableGateways` [`gateway`] and, appended to
    /// node `gateway`'s entries, those `gateway` held in `before` (what the operator keeps on a
    /// gateway that pods moved away from by a planned change).
    pub fn with_lingering(
        &self,
        plan: serde_json::Value,
        before: &serde_json::Value,
        node: &str,
        gateway: &str,
    ) -> serde_json::Value {
        let section = |p: &serde_json::Value, name: &str| {
            p["nodes"]
                .as_array()
                .expect("nodes")
                .iter()
                .position(|n| n["name"] == name)
                .expect("the node")
        };
        let mut plan = self.with_pinnable(plan, node, gateway);
        let (g_before, g_now) = (section(before, gateway), section(&plan, gateway));
        let kept = before["nodes"][g_before]["entries"]
            .as_array()
            .expect("entries")
            .clone();
        plan["nodes"][g_now]["entries"]
            .as_array_mut()
            .expect("entries")
            .extend(kept);
        plan
    }

    /// Replaces the plan file atomically (the shims pick it up on their next tick).
    pub fn write_plan_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.plan_path();
        let tmp = self.scratch().join("plan.json.tmp");
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, &path)?;
        self.plan_hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes));
        Ok(())
    }

    /// Writes `plan` and waits until every shim has applied it (read it anew: `planReads` grew).
    pub fn try_apply_plan(&mut self, plan: &[u8], timeout: Duration) -> Result<()> {
        let nodes: Vec<&str> = NODES.iter().map(|(n, _)| *n).collect();
        self.try_apply_plan_on(plan, &nodes, timeout)
    }

    /// Writes `plan` and waits until the shims of `nodes` have applied it.
    pub fn try_apply_plan_on(&mut self, plan: &[u8], nodes: &[&str], timeout: Duration) -> Result<()> {
        let reads: BTreeMap<&str, u64> = nodes
            .iter()
            .map(|n| (*n, self.status(n)["planReads"].as_u64().unwrap_or(0)))
            .collect();
        self.write_plan_bytes(plan)?;
        let applied = wait_for(timeout, || {
            nodes.iter().all(|n| {
                let s = self.status(n);
                s["plan"] == self.plan_hash.as_str() && s["planReads"].as_u64().unwrap_or(0) > reads[n]
            })
        });
        if !applied {
            bail!(self.not_applied());
        }
        Ok(())
    }

    /// Writes the plan made of `rules` and waits until every shim has applied it; panics after
    /// 20 s with the shims' status and logs.
    pub fn apply(&mut self, rules: &[Rule]) {
        let plan = serde_json::to_vec_pretty(&self.plan(rules)).expect("plan serializes");
        if let Err(e) = self.try_apply_plan(&plan, Duration::from_secs(20)) {
            panic!("{e}");
        }
    }

    /// Waits until every running shim has applied the current plan.
    pub fn try_wait_applied(&self, timeout: Duration) -> Result<()> {
        if !wait_for(timeout, || {
            NODES
                .iter()
                .all(|(n, _)| self.status(n)["plan"] == self.plan_hash.as_str())
        }) {
            bail!(self.not_applied());
        }
        Ok(())
    }

    /// Waits until every shim has applied the current plan; panics after 20 s.
    pub fn wait_applied(&self) {
        if let Err(e) = self.try_wait_applied(Duration::from_secs(20)) {
            panic!("{e}");
        }
    }

    fn not_applied(&self) -> String {
        let logs: Vec<String> = NODES
            .iter()
            .map(|(n, _)| {
                let log = self.log(&shim_name(n));
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- {n} status {} log (last lines, newest first):\n{}",
                    self.status(n),
                    tail.join("\n")
                )
            })
            .collect();
        format!(
            "the shims did not apply plan {} in time\n{}",
            self.plan_hash,
            logs.join("\n")
        )
    }

    fn status_path(&self, node: &str) -> PathBuf {
        self.scratch().join(format!("{node}.status"))
    }

    /// The status file of `node`'s shim (`null` before its first apply).
    pub fn status(&self, node: &str) -> serde_json::Value {
        fs::read(self.status_path(node))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Starts `node`'s shim.
    pub fn try_start_shim(&mut self, node: &str) -> Result<()> {
        let _ = fs::remove_file(self.status_path(node));
        let mut cmd = self
            .testbed
            .shim_command_with_node_ip(node, &self.shim, self.underlay_ip(node));
        cmd.arg("--entries")
            .arg(self.plan_path())
            .arg("--status-file")
            .arg(self.status_path(node))
            .args(["--interval-ms", "100"])
            .args(&self.extra_args);
        self.testbed
            .spawn(&shim_name(node), cmd)
            .with_context(|| format!("starting the shim of {node}"))
            .map(drop)
    }

    /// Starts `node`'s shim; panics on failure.
    pub fn start_shim(&mut self, node: &str) {
        self.try_start_shim(node).unwrap();
    }

    /// SIGKILLs `node`'s shim.
    pub fn kill_shim(&mut self, node: &str) {
        self.testbed.kill(&shim_name(node));
    }

    /// Sends `signal` to `node`'s shim: its exit status, or `None` if it still ran after `grace`
    /// (then it is SIGKILLed). See [`Testbed::stop`].
    pub fn stop_shim(
        &mut self,
        node: &str,
        signal: nix::sys::signal::Signal,
        grace: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.testbed.stop(&shim_name(node), signal, grace)
    }

    /// The shim binary.
    pub fn shim_binary(&self) -> &Path {
        &self.shim
    }

    /// `sluice-shim --bpffs-dir <node's> ARGS` inside `node`.
    pub fn shim_cli(&self, node: &str, args: &[&str]) -> Result<String> {
        self.testbed.shim_cli(&self.shim, node, args)
    }

    /// `sluice-shim uninstall` on `node`.
    pub fn uninstall(&self, node: &str) {
        self.shim_cli(node, &["uninstall"]).unwrap();
    }

    /// `sluice-shim bpf list` on `node`.
    pub fn bpf_list(&self, node: &str) -> String {
        self.shim_cli(node, &["bpf", "list"]).unwrap()
    }

    /// `sluice-shim bpf counters` on `node`.
    pub fn bpf_counters(&self, node: &str) -> String {
        self.shim_cli(node, &["bpf", "counters"]).unwrap()
    }

    /// The packet count of outcome `name` on `node`.
    pub fn counter(&self, node: &str, name: &str) -> u64 {
        let out = self.bpf_counters(node);
        out.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&name)).then(|| f[1].parse().expect("a count"))
            })
            .unwrap_or_else(|| panic!("no counter {name} in\n{out}"))
    }
}
