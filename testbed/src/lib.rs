//! A small cluster built from network namespaces, shared by Sluice's end-to-end tests, the
//! datapath benchmark (`cargo xtask bench-datapath`) and the demo (`cargo xtask demo`). Needs root.
//!
//! ```text
//!                      slc-<pid>-ext  (external host: 203.0.113.10, .200, 198.51.100.10;
//!                            | eth0    a server on :8080, see below)
//!                            | ext0 203.0.113.1 / 198.51.100.1
//!   slc-<pid>-ul  (underlay: bridge br0 192.0.2.1/24, routes to the external host)
//!        |n1                  |n2                   |n3
//!   slc-<pid>-n1         slc-<pid>-n2          slc-<pid>-n3        nodes, eth0 192.0.2.1N/24
//!   (+192.0.2.101)       pods 10.244.2.0/24    (+192.0.2.103)      egress IPs on n1 and n3
//!   pods 10.244.1.0/24     |veth-p2 |veth-p3
//!     |veth-p1          slc-<pid>-p2  -p3
//!   slc-<pid>-p1
//! ```
//!
//! | name | namespace | addresses |
//! |---|---|---|
//! | underlay router/bridge | `ul` | `br0` 192.0.2.1/24, `ext0` 203.0.113.1/24 + 198.51.100.1/24 |
//! | external host | `ext` | `eth0` 203.0.113.10, 203.0.113.200, 198.51.100.10 (default via 203.0.113.1) |
//! | node `n1` | `n1` | `eth0` 192.0.2.11/24 + egress IP 192.0.2.101/32, pods 10.244.1.0/24 |
//! | node `n2` | `n2` | `eth0` 192.0.2.12/24, pods 10.244.2.0/24 |
//! | node `n3` | `n3` | `eth0` 192.0.2.13/24 + egress IP 192.0.2.103/32 |
//! | pod `p1` on n1 | `p1` | 10.244.1.10/32 (veth `veth-p1` on the node) |
//! | pod `p2` on n2 | `p2` | 10.244.2.10/32 (`veth-p2`) |
//! | pod `p3` on n2 | `p3` | 10.244.2.11/32 (`veth-p3`) |
//! | n1's second uplink (on demand, [`Testbed::add_second_uplink`]) | `n1` / `ext` | n1 `eth1` 198.18.0.11/24 (default route metric 100), external host `up-n1` 198.18.0.1/24 |
//!
//! Dual stack: every IPv4 address `a.b.c.d` above has an IPv6 twin `fd00:a:b:c::d` beside it
//! ([`ipv6_twin`]; e.g. p2 `fd00:10:244:2::10`, n2 `fd00:192:0:2::12`, the external host
//! `fd00:203:0:113::10`), every /24 a /64 (`fd00:a:b:c::/64`), the pods' 10.244.0.0/16 the
//! /48 [`POD_CIDR_V6`]; the constants have a `_V6` twin ([`EXT_A_V6`], [`EGRESS_N1_V6`],
//! [`NODES_V6`], [`PODS_V6`], ...). Routes, forwarding and the CNI's masquerade are the same in
//! both families; pods reach their node through the link-local `fe80::1` of their veth. The IPv6
//! egress IPs are deprecated addresses (preferred lifetime 0), so that the node's own address
//! stays the one the masquerade picks. Addresses skip duplicate address detection (usable at once).
//! The shims' `--cluster-cidr` stays IPv4 ([`CLUSTER_CIDRS`]); [`CLUSTER_CIDRS_V6`] is there for
//! plans.
//!
//! Pods have MTU 1450 (room for a VXLAN header on the 1500-byte underlay). The testbed plays the
//! CNI (see `Testbed::wire_pod`, `cni_routes`, `cni_masquerade`): a /32 route per local pod with
//! proxy ARP on its veth (Calico style, pods use 169.254.1.1 as gateway), a route to each other
//! node's pod /24 via that node, and masquerade of pod traffic leaving the cluster to the node IP
//! (the "normal path"); [`Testbed::apply_stand_in`] makes it play another CNI's habit instead
//! ([`CniStandIn`]). The external host runs a TCP server on port 8080, IPv4 and IPv6, that greets
//! each connection with the source address it saw ([`Testbed::fetch`], [`Conn`]; give them an
//! address of either family).
//!
//! Everything lives in namespaces named `slc-<pid>-*` and in `/tmp/slc-<pid>` (with a bpffs mounted
//! at `/tmp/slc-<pid>/bpffs`); nothing routes through the machine's own network. Leftovers of
//! earlier runs (`slc-*` of dead processes) are removed first; `Drop` kills the processes started
//! with [`Testbed::spawn`] and removes everything, also on failure (unless `SLUICE_E2E_KEEP` is set,
//! to debug a failure by hand). One testbed per process at a time (a global lock).
//!
//! [`Testbed`] runs no Sluice component: start any command in any namespace with
//! [`Testbed::command`] + [`Testbed::spawn`]. [`FileCluster`] adds one `sluice-shim run --entries`
//! per node, fed from a plan file the tests write.

mod cni;
pub mod craft;
mod shims;

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub use cni::{BRIDGED_PODS, CniStandIn, TcxVerdict, UNDERLAY_MTU};
pub use shims::{FileCluster, Gw, Rule, shim_name};

/// Egress IP assigned to n1.
pub const EGRESS_N1: &str = "192.0.2.101";
/// Egress IP assigned to n3.
pub const EGRESS_N3: &str = "192.0.2.103";
/// An external address (203.0.113.0/24).
pub const EXT_A: &str = "203.0.113.10";
/// In 203.0.113.128/25.
pub const EXT_EXCLUDED: &str = "203.0.113.200";
/// In 198.51.100.0/24.
pub const EXT_B: &str = "198.51.100.10";
/// The external host's greeting server.
pub const SERVER_PORT: u16 = 8080;
/// What the cluster calls in-cluster (pod CIDRs and the node subnet), as `--cluster-cidr` takes it.
pub const CLUSTER_CIDRS: &str = "10.244.0.0/16,192.0.2.0/24";
/// The underlay router's address on the node subnet.
pub const UNDERLAY_IP: &str = "192.0.2.1";
/// n1's second uplink ([`Testbed::add_second_uplink`]): its device on n1...
pub const UPLINK2_DEVICE: &str = "eth1";
/// ...its address (198.18.0.0/24, a benchmarking range), usable as an egress IP...
pub const UPLINK2_N1: &str = "198.18.0.11";
/// ...and the external host's end of it (device `up-n1`).
pub const UPLINK2_EXT: &str = "198.18.0.1";

/// (node, node IP).
pub const NODES: [(&str, &str); 3] = [("n1", "192.0.2.11"), ("n2", "192.0.2.12"), ("n3", "192.0.2.13")];
/// (pod, node, IP).
pub const PODS: [(&str, &str, &str); 3] = [
    ("p1", "n1", "10.244.1.10"),
    ("p2", "n2", "10.244.2.10"),
    ("p3", "n2", "10.244.2.11"),
];

/// n1's IPv6 egress IP (each IPv4 address has an IPv6 twin, [`ipv6_twin`]).
pub const EGRESS_N1_V6: &str = "fd00:192:0:2::101";
/// n3's IPv6 egress IP.
pub const EGRESS_N3_V6: &str = "fd00:192:0:2::103";
/// An external IPv6 address (fd00:203:0:113::/64).
pub const EXT_A_V6: &str = "fd00:203:0:113::10";
/// In fd00:203:0:113::200/120, which [`EXT_A_V6`] is not in (the IPv6 counterpart of
/// 203.0.113.128/25 for [`EXT_EXCLUDED`]).
pub const EXT_EXCLUDED_V6: &str = "fd00:203:0:113::200";
/// In fd00:198:51:100::/64.
pub const EXT_B_V6: &str = "fd00:198:51:100::10";
/// Every pod's IPv6 address: node `nN`'s pods are in `fd00:10:244:N::/64`.
pub const POD_CIDR_V6: &str = "fd00:10:244::/48";
/// The IPv6 counterpart of [`CLUSTER_CIDRS`] (pod CIDRs and the node subnet), for a plan's
/// `clusterCIDRs` (`split(',')`); the shims' `--cluster-cidr` gets [`CLUSTER_CIDRS`] only.
pub const CLUSTER_CIDRS_V6: &str = "fd00:10:244::/48,fd00:192:0:2::/64";
/// The underlay router's IPv6 address on the node subnet (fd00:192:0:2::/64).
pub const UNDERLAY_IP_V6: &str = "fd00:192:0:2::1";
/// n1's second uplink's IPv6 address ([`UPLINK2_N1`]'s twin), usable as an egress IP...
pub const UPLINK2_N1_V6: &str = "fd00:198:18::11";
/// ...and the external host's end of it.
pub const UPLINK2_EXT_V6: &str = "fd00:198:18::1";
/// (node, node IPv6), in the order of [`NODES`].
pub const NODES_V6: [(&str, &str); 3] = [
    ("n1", "fd00:192:0:2::11"),
    ("n2", "fd00:192:0:2::12"),
    ("n3", "fd00:192:0:2::13"),
];
/// (pod, node, IPv6), in the order of [`PODS`]. A pod added later has its IPv4's twin too.
pub const PODS_V6: [(&str, &str, &str); 3] = [
    ("p1", "n1", "fd00:10:244:1::10"),
    ("p2", "n2", "fd00:10:244:2::10"),
    ("p3", "n2", "fd00:10:244:2::11"),
];

/// The link-local address every pod veth has on the node's side: the pods' IPv6 default gateway
/// (the counterpart of 169.254.1.1; Calico and Cilium route pods through a link-local too).
const POD_GATEWAY_V6: &str = "fe80::1";

/// One testbed at a time: they share the kernel and the process id in their names.
static SERIAL: Mutex<()> = Mutex::new(());

/// The IP of `node` (`n1`, `n2` or `n3`).
pub fn node_ip(node: &str) -> &'static str {
    NODES
        .iter()
        .find(|(n, _)| *n == node)
        .map(|(_, ip)| *ip)
        .unwrap_or_else(|| panic!("unknown node {node}"))
}

/// The IPv6 address of `node` (`n1`, `n2` or `n3`).
pub fn node_ip_v6(node: &str) -> &'static str {
    NODES_V6
        .iter()
        .find(|(n, _)| *n == node)
        .map(|(_, ip)| *ip)
        .unwrap_or_else(|| panic!("unknown node {node}"))
}

/// The testbed's IPv6 twin of its IPv4 address (or /24 prefix, `a.b.c`) `ipv4`:
/// `a.b.c.d` → `fd00:a:b:c::d`, in the canonical form the external host reports.
pub fn ipv6_twin(ipv4: &str) -> String {
    let octets: Vec<&str> = ipv4.split('.').collect();
    let twin = match octets.as_slice() {
        [a, b, c, d] => format!("fd00:{a}:{b}:{c}::{d}"),
        [a, b, c] => format!("fd00:{a}:{b}:{c}::"),
        _ => panic!("not an IPv4 address or /24 prefix: {ipv4}"),
    };
    twin.parse::<std::net::Ipv6Addr>()
        .unwrap_or_else(|e| panic!("no IPv6 twin for {ipv4}: {e}"))
        .to_string()
}

/// Whether we run as root (the testbed needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The network-namespace cluster; see the crate documentation.
pub struct Testbed {
    prefix: String,
    dir: PathBuf,
    procs: BTreeMap<String, Child>,
    /// (pod, node, IP): [`PODS`] and those added later.
    pods: Vec<(&'static str, &'static str, &'static str)>,
    server_stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    _serial: MutexGuard<'static, ()>,
}

/// Runs a command; fails with its stderr when it fails.
fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("starting {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, ignoring failure (cleanup).
fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn sh_stdin(args: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {args:?}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{args:?} failed on:\n{input}\n{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns` (its full name, see [`Testbed::ns`]);
/// sockets it creates stay in `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// The value of one series (`name{labels} `, as Prometheus text prints it before the value) on
/// the metrics endpoint `addr` served in network namespace `ns`. Panics, naming the series and
/// showing what was served, when it cannot be read.
pub fn scrape_metric(ns: &str, addr: &str, series: &str) -> u64 {
    use std::io::{Read, Write};
    let response = in_netns(ns, || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        // HTTP/1.0: the body comes whole (no chunks) and the server closes after it.
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: shim\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
    .unwrap_or_else(|e| panic!("scraping the metrics on {addr} in {ns}: {e}"));
    let prefix = format!("{series} ");
    response
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics of {ns}:\n{response}"))
}

/// Moves the calling thread into network namespace `ns` (its full name).
pub fn enter_netns(ns: &str) {
    let file =
        fs::File::open(Path::new("/var/run/netns").join(ns)).unwrap_or_else(|e| panic!("netns {ns}: {e}"));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Removes the namespaces (killing their processes) and directories of testbeds whose process is
/// gone, and this process's own. Safe to call from a signal-handling thread to clean up after
/// Ctrl-C.
pub fn remove_leftovers() {
    let me = std::process::id();
    let dead_or_me = |name: &str| -> bool {
        let pid: Option<u32> = name
            .strip_prefix("slc-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse().ok());
        pid.is_none_or(|p| p == me || !Path::new(&format!("/proc/{p}")).exists())
    };
    for line in sh(&["ip", "netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with("slc-") && dead_or_me(name) {
            for pid in sh(&["ip", "netns", "pids", name])
                .unwrap_or_default()
                .split_whitespace()
            {
                sh_quiet(&["kill", "-9", pid]);
            }
            sh_quiet(&["ip", "netns", "del", name]);
        }
    }
    for entry in fs::read_dir("/tmp").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("slc-") && dead_or_me(&format!("{name}-")) {
            sh_quiet(&["umount", &entry.path().join("bpffs").to_string_lossy()]);
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Testbed {
    /// Builds the cluster and starts the external host's server. Needs root.
    pub fn new() -> Result<Testbed> {
        if !is_root() {
            bail!("the testbed needs root (network namespaces, bpffs)");
        }
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        remove_leftovers();
        let pid = std::process::id();
        let dir = PathBuf::from(format!("/tmp/slc-{pid}"));
        fs::create_dir_all(dir.join("bpffs")).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, `Drop` cleans up whatever was built when something fails.
        let mut t = Testbed {
            prefix: format!("slc-{pid}-"),
            dir,
            procs: BTreeMap::new(),
            pods: PODS.to_vec(),
            server_stop: Arc::new(AtomicBool::new(false)),
            server: None,
            _serial: serial,
        };
        sh(&["mount", "-t", "bpf", "bpf", &t.bpffs().to_string_lossy()])?;
        t.build()?;
        t.server = Some(t.start_server()?);
        Ok(t)
    }

    /// The full name of the testbed's namespace `name` (`ul`, `ext`, `n1`, `p2`, ...).
    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `ip -n <ns> ARGS`; its output.
    pub fn ip(&self, ns: &str, args: &[&str]) -> Result<String> {
        let ns = self.ns(ns);
        let mut full = vec!["ip", "-n", ns.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `ip ARGS` inside `node`'s namespace; panics on failure (for tests).
    pub fn ip_on(&self, node: &str, args: &[&str]) {
        self.ip(node, args).unwrap();
    }

    /// `sysctl -w KEY=VALUE` inside `ns`.
    pub fn sysctl(&self, ns: &str, kv: &str) -> Result<()> {
        sh(&["ip", "netns", "exec", &self.ns(ns), "sysctl", "-qw", kv]).map(drop)
    }

    /// Loads an nftables script (`nft -f -`) inside `ns`.
    pub fn nft(&self, ns: &str, script: &str) -> Result<()> {
        sh_stdin(&["ip", "netns", "exec", &self.ns(ns), "nft", "-f", "-"], script)
    }

    /// The packets of the named nftables counter `name` of table `table` (`ip probe`, `ip6 probe`)
    /// in `ns`. Panics when there is none (for tests).
    pub fn nft_counter(&self, ns: &str, table: &str, name: &str) -> u64 {
        let (family, table) = table.split_once(' ').expect("FAMILY TABLE");
        let out = self
            .run(ns, "nft", &["list", "counter", family, table, name])
            .unwrap();
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {out}"))
    }

    /// Runs `program ARGS` inside `ns` to completion; its stdout, or an error with its stderr.
    /// `shim --bpffs-dir <node's> ARGS` inside `node` (the shim CLI: `bpf list`, `bpf flows`…).
    pub fn shim_cli(&self, shim: impl AsRef<OsStr>, node: &str, args: &[&str]) -> Result<String> {
        let dir = self.bpffs().join(node);
        let mut full = vec!["--bpffs-dir", dir.to_str().context("bpffs path")?];
        full.extend_from_slice(args);
        self.run(node, shim, &full)
    }

    pub fn run(&self, ns: &str, program: impl AsRef<OsStr>, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(ns, program);
        cmd.args(args);
        let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A command that runs `program` inside `ns` (`ip netns exec`, which execs it: the child's
    /// pid is the program's). Add arguments and environment, then [`Testbed::spawn`] it (or run it).
    pub fn command(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns)]).arg(program);
        cmd
    }

    /// `sluice-shim run` for `node`, with what every node's shim here needs: its own bpffs
    /// directory, node name and IP, the cluster CIDRs, no metrics port. Add where its plan comes
    /// from (`--entries` or `--operator`) and anything else (`--metrics-addr 127.0.0.1:9473`
    /// serves metrics inside the node's namespace: "off" is only the environment's default).
    pub fn shim_command(&self, node: &str, shim: impl AsRef<OsStr>) -> Command {
        self.shim_command_with_node_ip(node, shim, node_ip(node))
    }

    /// [`Testbed::shim_command`] with `node_ip` as the node's underlay address (its IPv6 one:
    /// the tunnel over the IPv6 underlay).
    pub fn shim_command_with_node_ip(&self, node: &str, shim: impl AsRef<OsStr>, node_ip: &str) -> Command {
        let mut cmd = self.shim_command_at(node, shim, node_ip);
        cmd.args(["--cluster-cidr", CLUSTER_CIDRS]);
        cmd
    }

    fn shim_command_at(&self, node: &str, shim: impl AsRef<OsStr>, node_ip: &str) -> Command {
        let mut cmd = self.command(node, shim);
        cmd.arg("--bpffs-dir")
            .arg(self.bpffs().join(node))
            .args(["run", "--node", node, "--node-ip", node_ip])
            .env("SLUICE_METRICS_ADDR", "off")
            .env_remove("SLUICE_CLUSTER_CIDRS");
        cmd
    }

    /// Starts `shim`'s `run` for `node` (named `shim-<node>`) with its plan from the operator at
    /// `grpc` (plaintext), authenticated by the token in `tokens/<node>`, ticking every second.
    pub fn start_operator_shim(
        &mut self,
        node: &str,
        shim: impl AsRef<OsStr>,
        grpc: &str,
        tokens: &Path,
    ) -> Result<u32> {
        self.start_operator_shim_with(node, shim, grpc, tokens, &[])
    }

    /// [`Testbed::start_operator_shim`] with more arguments to `run`.
    pub fn start_operator_shim_with(
        &mut self,
        node: &str,
        shim: impl AsRef<OsStr>,
        grpc: &str,
        tokens: &Path,
        args: &[&str],
    ) -> Result<u32> {
        let mut cmd = self.shim_command(node, shim);
        cmd.args(["--operator", &format!("http://{grpc}")])
            .arg("--token-file")
            .arg(tokens.join(node))
            .args(["--interval-ms", "1000"])
            .args(args);
        self.spawn(&format!("shim-{node}"), cmd)
    }

    /// [`Testbed::shim_command`] as a user who forgot `--cluster-cidr` runs it: the shim knows
    /// only its node IP, and what the operator finds in-cluster.
    pub fn shim_command_without_cluster_cidrs(&self, node: &str, shim: impl AsRef<OsStr>) -> Command {
        self.shim_command_at(node, shim, node_ip(node))
    }

    /// Starts `cmd` in the background under `name`, its stdout and stderr appended to
    /// [`Testbed::log_path`]; it is SIGKILLed when the testbed is dropped. Returns its pid.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<u32> {
        if let Some(old) = self.procs.get_mut(name)
            && old.try_wait()?.is_none()
        {
            bail!("a process named {name} is already running");
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        self.procs.insert(name.to_owned(), child);
        Ok(pid)
    }

    /// SIGKILLs the process started as `name` (and reaps it); false if there is none.
    pub fn kill(&mut self, name: &str) -> bool {
        match self.procs.remove(name) {
            Some(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
                true
            }
            None => false,
        }
    }

    /// Sends SIGTERM to `name` and waits up to `grace` for it to exit, then SIGKILLs it.
    pub fn terminate(&mut self, name: &str, grace: Duration) {
        self.stop(name, nix::sys::signal::SIGTERM, grace);
    }

    /// Sends `signal` to `name` and waits up to `grace` for it to exit: its exit status, or `None`
    /// when it was still running then (it is SIGKILLed) or there is no such process.
    pub fn stop(
        &mut self,
        name: &str,
        signal: nix::sys::signal::Signal,
        grace: Duration,
    ) -> Option<ExitStatus> {
        let mut child = self.procs.remove(name)?;
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The pid of the process started as `name`, while the testbed holds it.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name).map(Child::id)
    }

    /// Whether the process started as `name` is still running.
    pub fn is_running(&mut self, name: &str) -> bool {
        self.procs
            .get_mut(name)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Where the output of the process started as `name` goes.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The output of the process started as `name` so far.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// The bpffs mounted for this testbed (a shim of node `n` should pin under `<it>/<n>`).
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// The testbed's scratch directory (not on a bpffs; removed with the testbed).
    pub fn scratch(&self) -> &Path {
        &self.dir
    }

    /// The IP of `node`.
    pub fn node_ip(&self, node: &str) -> String {
        node_ip(node).to_owned()
    }

    /// The IPv6 address of `node`.
    pub fn node_ip_v6(&self, node: &str) -> String {
        node_ip_v6(node).to_owned()
    }

    /// Every pod, (pod, node, IP): [`PODS`] and those added later.
    pub fn pods(&self) -> &[(&'static str, &'static str, &'static str)] {
        &self.pods
    }

    /// (node, IP) of pod `name`.
    pub fn pod(&self, name: &str) -> (&'static str, &'static str) {
        self.pods
            .iter()
            .find(|(p, _, _)| *p == name)
            .map(|(_, n, ip)| (*n, *ip))
            .unwrap_or_else(|| panic!("unknown pod {name}"))
    }

    /// The IPv6 address of pod `name` (its IPv4's twin, [`ipv6_twin`]).
    pub fn pod_ip_v6(&self, name: &str) -> String {
        ipv6_twin(self.pod(name).1)
    }

    /// Creates namespace `name` with its loopback up, and IPv6 addresses usable as soon as they
    /// are added (no duplicate address detection, which would hold each back for a second or two;
    /// nothing here ever duplicates an address).
    fn add_namespace(&self, name: &str) -> Result<()> {
        sh(&["ip", "netns", "add", &self.ns(name)])?;
        self.ip(name, &["link", "set", "lo", "up"])?;
        // Before any interface exists: each takes `default`'s value when it is created.
        self.write_sysctls(
            name,
            &[
                ("net/ipv6/conf/all/accept_dad", "0"),
                ("net/ipv6/conf/default/accept_dad", "0"),
            ],
        )
    }

    /// Writes `(key, value)` sysctls (`/proc/sys/KEY`) inside `ns`: a thread's write there goes to
    /// its own namespace's value, so no `sysctl` process is needed.
    fn write_sysctls(&self, ns: &str, settings: &[(&str, &str)]) -> Result<()> {
        in_netns(&self.ns(ns), || {
            settings.iter().try_for_each(|(key, value)| {
                fs::write(Path::new("/proc/sys").join(key), value)
                    .with_context(|| format!("setting {key}={value} in {ns}"))
            })
        })
    }

    /// `ip -n <ns> -batch -`: several `ip` commands (each without the leading `ip`) in one
    /// process, which keeps building the testbed quick.
    fn ip_batch(&self, ns: &str, commands: &[String]) -> Result<()> {
        sh_stdin(
            &["ip", "-n", &self.ns(ns), "-batch", "-"],
            &(commands.join("\n") + "\n"),
        )
    }

    fn build(&self) -> Result<()> {
        for ns in ["ul", "ext", "n1", "n2", "n3", "p1", "p2", "p3"] {
            self.add_namespace(ns)?;
        }
        let addr = |a: &str, dev: &str| format!("addr add {a} dev {dev}");
        // IPv6 addresses skip duplicate detection explicitly too (see `add_namespace`).
        let addr6 = |a: &str, dev: &str| format!("addr add {a} dev {dev} nodad");

        // Underlay bridge and router to the external host, and the nodes' links to the bridge.
        let mut ul = vec![
            "link add br0 type bridge".to_owned(),
            addr(&format!("{UNDERLAY_IP}/24"), "br0"),
            addr6(&format!("{UNDERLAY_IP_V6}/64"), "br0"),
            "link set br0 up".to_owned(),
            format!("link add ext0 type veth peer name eth0 netns {}", self.ns("ext")),
            addr("203.0.113.1/24", "ext0"),
            addr("198.51.100.1/24", "ext0"),
            addr6("fd00:203:0:113::1/64", "ext0"),
            addr6("fd00:198:51:100::1/64", "ext0"),
            "link set ext0 up".to_owned(),
        ];
        for (node, _) in NODES {
            ul.push(format!(
                "link add {node} type veth peer name eth0 netns {}",
                self.ns(node)
            ));
            ul.push(format!("link set {node} master br0 up"));
        }
        self.ip_batch("ul", &ul)?;
        self.write_sysctls(
            "ul",
            &[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
            ],
        )?;

        let mut ext: Vec<String> = [EXT_A, EXT_EXCLUDED, EXT_B]
            .iter()
            .map(|a| addr(&format!("{a}/24"), "eth0"))
            .collect();
        ext.extend([EXT_A_V6, EXT_EXCLUDED_V6, EXT_B_V6].map(|a| addr6(&format!("{a}/64"), "eth0")));
        ext.extend([
            "link set eth0 up".to_owned(),
            "route add default via 203.0.113.1".to_owned(),
            "route add ::/0 via fd00:203:0:113::1".to_owned(),
        ]);
        self.ip_batch("ext", &ext)?;

        for ((node, ip), (_, ip6)) in NODES.into_iter().zip(NODES_V6) {
            let mut commands = vec![
                addr(&format!("{ip}/24"), "eth0"),
                addr6(&format!("{ip6}/64"), "eth0"),
                "link set eth0 up".to_owned(),
                format!("route add default via {UNDERLAY_IP}"),
                format!("route add ::/0 via {UNDERLAY_IP_V6}"),
            ];
            commands.extend(self.cni_routes(node));
            // After the node IP, so that it stays the node's primary IPv4 address.
            let egress = match node {
                "n1" => Some((EGRESS_N1, EGRESS_N1_V6)),
                "n3" => Some((EGRESS_N3, EGRESS_N3_V6)),
                _ => None,
            };
            if let Some((egress, egress6)) = egress {
                commands.push(addr(&format!("{egress}/32"), "eth0"));
                // Deprecated (preferred lifetime 0): still the node's, but never chosen as a source
                // address, so the masquerade keeps showing the node IP (IPv6 source selection
                // would otherwise prefer the interface's newest address).
                commands.push(format!(
                    "{} preferred_lft 0",
                    addr6(&format!("{egress6}/128"), "eth0")
                ));
            }
            self.ip_batch(node, &commands)?;
            self.write_sysctls(
                node,
                &[
                    ("net/ipv4/ip_forward", "1"),
                    ("net/ipv6/conf/all/forwarding", "1"),
                ],
            )?;
            self.cni_masquerade(node)?;
        }

        for (p, node, ip) in PODS {
            self.wire_pod(p, node, ip)?;
        }
        Ok(())
    }

    /// The CNI's part for one pod: its veth, addresses and routes. IPv4 step by step as before
    /// (a batch would be quicker, but [`Testbed::add_pod`] would then return within a few
    /// milliseconds of the veth appearing, inside the window before a shim attaches to it that
    /// docs/datapath.md lists as a known gap; real pods start later), then IPv6.
    fn wire_pod(&self, p: &str, node: &str, ip: &str) -> Result<()> {
        let veth = format!("veth-{p}");
        let pod_ns = self.ns(p);
        self.ip(
            node,
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns,
            ],
        )?;
        self.ip(p, &["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        // Room for the 50-byte VXLAN header on the underlay's 1500 bytes, as overlay CNIs do.
        self.ip(p, &["link", "set", "eth0", "mtu", "1450", "up"])?;
        self.ip(
            p,
            &["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"],
        )?;
        self.ip(
            p,
            &["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"],
        )?;
        self.ip(node, &["link", "set", &veth, "up"])?;
        self.ip(node, &["route", "add", &format!("{ip}/32"), "dev", &veth])?;
        self.sysctl(node, &format!("net.ipv4.conf.{veth}.proxy_arp=1"))?;
        // Answer at once, as Calico has its workload interfaces do (the default waits up to
        // 0.8 s): a new pod sends its first packet within milliseconds of starting.
        self.sysctl(node, &format!("net.ipv4.neigh.{veth}.proxy_delay=0"))?;
        // IPv6: a /128 per pod too, routed the same way, the pod's gateway the same link-local
        // address on every pod's veth.
        let ip6 = ipv6_twin(ip);
        self.ip_batch(
            node,
            &[
                format!("addr add {POD_GATEWAY_V6}/64 dev {veth} nodad"),
                format!("route add {ip6}/128 dev {veth}"),
            ],
        )?;
        self.ip_batch(
            p,
            &[
                format!("addr add {ip6}/128 dev eth0 nodad"),
                format!("route add ::/0 via {POD_GATEWAY_V6} dev eth0"),
            ],
        )
    }

    /// Gives n1 a second uplink straight to the external host: `eth1` 198.18.0.11/24 on n1,
    /// `up-n1` 198.18.0.1/24 on the external host, and a second default route on n1 through it
    /// with a higher metric (the main table keeps sending everything through `eth0`). It goes
    /// with the namespaces.
    pub fn add_second_uplink(&self) -> Result<()> {
        let ext = self.ns("ext");
        self.ip(
            "n1",
            &[
                "link",
                "add",
                UPLINK2_DEVICE,
                "type",
                "veth",
                "peer",
                "name",
                "up-n1",
                "netns",
                &ext,
            ],
        )?;
        self.ip(
            "n1",
            &["addr", "add", &format!("{UPLINK2_N1}/24"), "dev", UPLINK2_DEVICE],
        )?;
        self.ip("n1", &["link", "set", UPLINK2_DEVICE, "up"])?;
        self.ip(
            "ext",
            &["addr", "add", &format!("{UPLINK2_EXT}/24"), "dev", "up-n1"],
        )?;
        self.ip("ext", &["link", "set", "up-n1", "up"])?;
        self.ip(
            "n1",
            &[
                "route",
                "add",
                "default",
                "via",
                UPLINK2_EXT,
                "dev",
                UPLINK2_DEVICE,
                "metric",
                "100",
            ],
        )?;
        self.ip_batch(
            "n1",
            &[
                format!("addr add {UPLINK2_N1_V6}/64 dev {UPLINK2_DEVICE} nodad"),
                // IPv6 routes default to metric 1024 (IPv4's to 0): above that, so the main table
                // keeps sending everything through `eth0` here too.
                format!("route add ::/0 via {UPLINK2_EXT_V6} dev {UPLINK2_DEVICE} metric 2048"),
            ],
        )?;
        self.ip_batch("ext", &[format!("addr add {UPLINK2_EXT_V6}/64 dev up-n1 nodad")])
    }

    /// Adds a pod (its namespace is removed with the testbed); panics on failure (for tests).
    pub fn add_pod(&mut self, p: &'static str, node: &'static str, ip: &'static str) {
        self.add_namespace(p).unwrap();
        self.wire_pod(p, node, ip).unwrap();
        self.pods.push((p, node, ip));
    }

    /// Adds pods behind a bridge `cni0` on `node`, wired as bridge CNIs (flannel, kubenet, the
    /// bridge plugin) do: the bridge holds the pod subnet's first address (`<subnet>.1/24`), each
    /// pod a `/24` address on a veth enslaved to it, and the node routes the subnet to the bridge,
    /// not to the pods' veths. `pods`: (name, IP in `subnet`). Panics on failure (for tests).
    pub fn add_bridged_pods(
        &mut self,
        node: &'static str,
        subnet: &str,
        pods: &[(&'static str, &'static str)],
    ) {
        self.try_add_bridged_pods(node, subnet, pods).unwrap();
    }

    /// [`Testbed::add_bridged_pods`], failing with an error.
    pub fn try_add_bridged_pods(
        &mut self,
        node: &'static str,
        subnet: &str,
        pods: &[(&'static str, &'static str)],
    ) -> Result<()> {
        let gateway = format!("{subnet}.1");
        let gateway_v6 = ipv6_twin(&gateway);
        self.ip(node, &["link", "add", "cni0", "type", "bridge"])?;
        self.ip(node, &["addr", "add", &format!("{gateway}/24"), "dev", "cni0"])?;
        self.ip(node, &["link", "set", "cni0", "up"])?;
        self.ip_batch(node, &[format!("addr add {gateway_v6}/64 dev cni0 nodad")])?;
        for &(p, ip) in pods {
            let veth = format!("veth-{p}");
            // Known before its namespace exists, so that `Drop` removes it whatever fails
            // (deleting one never made is harmless).
            self.pods.push((p, node, ip));
            self.add_namespace(p)?;
            self.ip(
                node,
                &[
                    "link",
                    "add",
                    &veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &self.ns(p),
                ],
            )?;
            self.ip(node, &["link", "set", &veth, "master", "cni0", "up"])?;
            self.ip(p, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            self.ip(p, &["link", "set", "eth0", "mtu", "1450", "up"])?;
            self.ip(p, &["route", "add", "default", "via", &gateway])?;
            self.ip_batch(
                p,
                &[
                    format!("addr add {}/64 dev eth0 nodad", ipv6_twin(ip)),
                    format!("route add ::/0 via {gateway_v6}"),
                ],
            )?;
        }
        Ok(())
    }

    /// Gives pod `p` the underlay's MTU (1500) or any other, as native-routing CNIs do (AWS VPC
    /// CNI, GKE VPC-native, Calico without encapsulation): the pod then sends packets the
    /// tunnel's 50 bytes of headers would make too big.
    pub fn set_pod_mtu(&self, p: &str, mtu: u32) -> Result<()> {
        self.ip(p, &["link", "set", "eth0", "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// Lowers the MTU of the underlay router's link to the external host to `mtu` on the
    /// router's side only: the external host still advertises its full MSS, so the gateways'
    /// full-size packets need path MTU discovery (the router answers them with ICMP
    /// "fragmentation needed"). Large packets from the external host would be lost on that link:
    /// keep what it sends small.
    pub fn set_router_mtu(&self, mtu: u32) -> Result<()> {
        self.ip("ul", &["link", "set", "ext0", "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// `Ip: FragCreates` of namespace `ns`: IP fragments its stack has made so far.
    pub fn fragments_created(&self, ns: &str) -> u64 {
        let snmp = in_netns(&self.ns(ns), || fs::read_to_string("/proc/thread-self/net/snmp"))
            .expect("reading /proc/net/snmp");
        let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (ip.next().unwrap_or(""), ip.next().unwrap_or(""));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "FragCreates")
            .and_then(|(_, v)| v.parse().ok())
            .expect("FragCreates in /proc/net/snmp")
    }

    /// Sends `count` UDP datagrams of `size` bytes from pod `pod` to the external host's address
    /// `dst` (port `port`; IPv4 or IPv6), 20 ms apart; returns the (source, size) of those that
    /// arrived within 2 s. Panics on failure (for tests).
    pub fn udp_through(
        &self,
        pod: &str,
        dst: &str,
        size: usize,
        count: usize,
        port: u16,
    ) -> Vec<(String, usize)> {
        let ip: std::net::IpAddr = dst.parse().unwrap();
        let listener = match ip {
            std::net::IpAddr::V4(_) => craft::Listener::bind(&self.ns("ext"), port),
            std::net::IpAddr::V6(_) => craft::Listener::bind_v6(&self.ns("ext"), port),
        }
        .unwrap();
        let to = SocketAddr::new(ip, port);
        for i in 0..count {
            craft::send_udp(&self.ns(pod), to, &vec![i as u8; size], 1).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        listener
            .collect(Duration::from_secs(2))
            .into_iter()
            .map(|(from, bytes)| (from.ip().to_string(), bytes.len()))
            .collect()
    }

    /// Moves pod traffic between nodes onto an overlay of the CNI's own, as Flannel's VXLAN
    /// backend does: a `flannel.1` VXLAN device (VNI 1, UDP 8472) on every node, each other
    /// node's pod subnet routed through it to that node's overlay address, with static
    /// neighbour and forwarding entries. Sluice's own tunnel (8473) runs beside it.
    pub fn use_flannel_like_overlay(&self) -> Result<()> {
        let mac = |node: &str| format!("02:f1:a0:00:00:0{}", &node[1..]);
        for (node, ip) in NODES {
            self.ip(
                node,
                &[
                    "link",
                    "add",
                    "flannel.1",
                    "address",
                    &mac(node),
                    "type",
                    "vxlan",
                    "id",
                    "1",
                    "dstport",
                    "8472",
                    "local",
                    ip,
                    "dev",
                    "eth0",
                    "nolearning",
                ],
            )?;
            self.ip(node, &["link", "set", "flannel.1", "mtu", "1450", "up"])?;
            self.ip(
                node,
                &[
                    "addr",
                    "add",
                    &format!("10.244.{}.0/32", &node[1..]),
                    "dev",
                    "flannel.1",
                ],
            )?;
            for (other, other_ip) in NODES {
                if other == node {
                    continue;
                }
                let subnet = format!("10.244.{}.0/24", &other[1..]);
                let gateway = format!("10.244.{}.0", &other[1..]);
                self.ip(
                    node,
                    &[
                        "route",
                        "replace",
                        &subnet,
                        "via",
                        &gateway,
                        "dev",
                        "flannel.1",
                        "onlink",
                    ],
                )?;
                self.ip(
                    node,
                    &[
                        "neigh",
                        "replace",
                        &gateway,
                        "lladdr",
                        &mac(other),
                        "dev",
                        "flannel.1",
                    ],
                )?;
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &self.ns(node),
                    "bridge",
                    "fdb",
                    "append",
                    &mac(other),
                    "dev",
                    "flannel.1",
                    "dst",
                    other_ip,
                ])?;
            }
        }
        Ok(())
    }

    /// Deletes a pod added by [`Testbed::add_pod`] (its veth goes with its namespace).
    pub fn delete_pod(&mut self, p: &str) {
        sh(&["ip", "netns", "del", &self.ns(p)]).unwrap();
        self.pods.retain(|(name, _, _)| *name != p);
    }

    /// The pod interfaces for which a shim of `node` pinned a link (under `bpffs()/<node>`).
    pub fn pinned_pod_links(&self, node: &str) -> usize {
        fs::read_dir(self.bpffs().join(node).join("links"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("sluice_from_pod-"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The CNI's routes on `node` (`ip` commands): each other node's pod CIDRs, IPv4 and IPv6,
    /// via that node.
    fn cni_routes(&self, node: &str) -> Vec<String> {
        let mut routes = Vec::new();
        for ((other, ip), (_, ip6)) in NODES.into_iter().zip(NODES_V6) {
            if other != node {
                let subnet = format!("10.244.{}", &other[1..]);
                routes.push(format!("route add {subnet}.0/24 via {ip}"));
                routes.push(format!("route add {}/64 via {ip6}", ipv6_twin(&subnet)));
            }
        }
        routes
    }

    /// The CNI's masquerade on `node`: pod traffic leaving the cluster shows the node IP (the
    /// "normal path"), in each family.
    fn cni_masquerade(&self, node: &str) -> Result<()> {
        self.nft(
            node,
            "table ip cni {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  \
             ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 oifname \"eth0\" masquerade\n }\n}\n\
             table ip6 cni {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  \
             ip6 saddr fd00:10:244::/48 ip6 daddr != fd00:10:244::/48 oifname \"eth0\" masquerade\n }\n}\n",
        )
    }

    /// The external host's server, on IPv4 and IPv6: greets each connection with the source
    /// address it saw, then answers each line `<n> <padding>` with `<source address> <n bytes>`.
    fn start_server(&self) -> Result<JoinHandle<()>> {
        let listeners = in_netns(&self.ns("ext"), || -> Result<[TcpListener; 2]> {
            Ok([
                TcpListener::bind(("0.0.0.0", SERVER_PORT))?,
                craft::v6_only_socket(nix::sys::socket::SockType::Stream, SERVER_PORT)?.into(),
            ])
        })
        .context("binding the external server")?;
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let stop = self.server_stop.clone();
        Ok(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut idle = true;
                for listener in &listeners {
                    if let Ok((stream, peer)) = listener.accept() {
                        idle = false;
                        std::thread::spawn(move || serve(stream, peer));
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }))
    }

    /// Opens a connection from `pod` to `dst`:8080 (`dst` an IPv4 or IPv6 address) and reads the
    /// greeting.
    pub fn connect(&self, pod: &str, dst: &str) -> Result<Conn, String> {
        in_netns(&self.ns(pod), || Conn::open(dst))
    }

    /// `n` long-lived connections from `pod` to `dst`, each with a first exchange that left with
    /// source address `via` (an error names what it left with otherwise).
    pub fn open_connections(&self, pod: &str, dst: &str, n: usize, via: &str) -> Result<Vec<Conn>, String> {
        (0..n)
            .map(|_| {
                let mut c = self.connect(pod, dst)?;
                match c.exchange(1000, 1000)? {
                    seen if seen == via => Ok(c),
                    seen => Err(format!("a connection of {pod} left with {seen}, not {via}")),
                }
            })
            .collect()
    }

    /// One connection with a small exchange: the source address the external host saw (an IPv6
    /// one in the canonical form of [`std::net::Ipv6Addr`]'s `Display` when `dst` is IPv6).
    pub fn fetch(&self, pod: &str, dst: &str) -> Result<String, String> {
        let mut conn = self.connect(pod, dst)?;
        let seen = conn.exchange(100, 100)?;
        if seen != conn.greeting {
            return Err(format!(
                "source changed within a connection: {} then {seen}",
                conn.greeting
            ));
        }
        Ok(seen)
    }

    /// New connections from `pod` to `dst` (either family), one after the other, until stopped
    /// (at most 60 s).
    pub fn stream(&self, pod: &str, dst: &str) -> Stream {
        self.stream_with_timeout(pod, dst, Duration::from_secs(5))
    }

    /// [`Testbed::stream`] whose connections give up reading after `timeout` (a connection broken
    /// in flight then holds the stream up only that long).
    pub fn stream_with_timeout(&self, pod: &str, dst: &str, timeout: Duration) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, dst, flag) = (self.ns(pod), dst.to_owned(), stop.clone());
        let handle = std::thread::spawn(move || {
            enter_netns(&ns);
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut results = Vec::new();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let started = Instant::now();
                let one = Conn::open_with_timeout(&dst, timeout).and_then(|mut c| c.exchange(100, 100));
                results.push((started, one));
                std::thread::sleep(Duration::from_millis(10));
            }
            results
        });
        Stream { stop, handle }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::env::var_os("SLUICE_E2E_KEEP").is_some() {
            // Debugging: leave everything up (the next run removes it).
            eprintln!(
                "SLUICE_E2E_KEEP: leaving namespaces {}* and {} in place",
                self.prefix,
                self.dir.display()
            );
            self.procs.clear();
            return;
        }
        let names: Vec<String> = self.procs.keys().cloned().collect();
        for name in names {
            self.kill(&name);
        }
        self.server_stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        let pods: Vec<&str> = self.pods.iter().map(|(p, _, _)| *p).collect();
        for ns in pods.into_iter().chain(["n1", "n2", "n3", "ext", "ul"]) {
            let ns = self.ns(ns);
            // Whatever else runs in there (started by hand with `ip netns exec`).
            for pid in sh(&["ip", "netns", "pids", &ns])
                .unwrap_or_default()
                .split_whitespace()
            {
                sh_quiet(&["kill", "-9", pid]);
            }
            sh_quiet(&["ip", "netns", "del", &ns]);
        }
        sh_quiet(&["umount", &self.bpffs().to_string_lossy()]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn serve(stream: TcpStream, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    // One write per message (and no Nagle), so small exchanges never wait for a delayed ACK.
    let _ = stream.set_nodelay(true);
    let mut writer = &stream;
    if writer.write_all(format!("{ip}\n").as_bytes()).is_err() {
        return;
    }
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    // Bounded by the read timeout and the client closing.
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let n: usize = line
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
            .min(10_000_000);
        if writer
            .write_all(format!("{ip} {}\n", "x".repeat(n)).as_bytes())
            .is_err()
        {
            return;
        }
        line.clear();
    }
}

/// A client connection to the external server.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The source address the server saw at accept time.
    pub greeting: String,
}

impl Conn {
    fn open(dst: &str) -> Result<Conn, String> {
        Conn::open_with_timeout(dst, Duration::from_secs(5))
    }

    fn open_with_timeout(dst: &str, timeout: Duration) -> Result<Conn, String> {
        let ip: std::net::IpAddr = dst.parse().map_err(|e| format!("{dst}: {e}"))?;
        let addr = SocketAddr::new(ip, SERVER_PORT);
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let setup = |s: &TcpStream| -> std::io::Result<TcpStream> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.try_clone()
        };
        let mut reader = BufReader::new(setup(&stream).map_err(|e| format!("socket setup: {e}"))?);
        let mut greeting = String::new();
        reader
            .read_line(&mut greeting)
            .map_err(|e| format!("greeting from {addr}: {e}"))?;
        Ok(Conn {
            stream,
            reader,
            greeting: greeting.trim().to_owned(),
        })
    }

    /// Sends `send` bytes, asks for `recv` bytes back; returns the source address the server saw.
    pub fn exchange(&mut self, send: usize, recv: usize) -> Result<String, String> {
        let msg = format!("{recv} {}\n", "y".repeat(send));
        self.stream
            .write_all(msg.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("receive: {e}"))?;
        let mut parts = line.trim_end().splitn(2, ' ');
        let ip = parts.next().unwrap_or_default().to_owned();
        let got = parts.next().map_or(0, str::len);
        if got != recv {
            return Err(format!("short answer: {got} of {recv} bytes"));
        }
        Ok(ip)
    }
}

/// The result of one connection of a [`Stream`]: the source address the server saw, or the error.
pub type Outcome = Result<String, String>;

/// A background stream of new connections.
pub struct Stream {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<(Instant, Outcome)>>,
}

impl Stream {
    /// Stops the stream; the result of every connection it made.
    pub fn stop(self) -> Vec<Outcome> {
        self.stop_timed().into_iter().map(|(_, r)| r).collect()
    }

    /// Stops the stream; when each connection started, and its result.
    pub fn stop_timed(self) -> Vec<(Instant, Outcome)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("stream thread")
    }
}

/// Waits until `done` holds, polling every 50 ms, at most `timeout`; false on timeout.
pub fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ipv6_constant_is_the_twin_of_its_ipv4_one_in_canonical_form() {
        let pairs = [
            (EGRESS_N1, EGRESS_N1_V6),
            (EGRESS_N3, EGRESS_N3_V6),
            (EXT_A, EXT_A_V6),
            (EXT_EXCLUDED, EXT_EXCLUDED_V6),
            (EXT_B, EXT_B_V6),
            (UNDERLAY_IP, UNDERLAY_IP_V6),
            (UPLINK2_N1, UPLINK2_N1_V6),
            (UPLINK2_EXT, UPLINK2_EXT_V6),
        ];
        let nodes = NODES.iter().zip(NODES_V6).map(|((n, ip), (n6, ip6))| {
            assert_eq!(*n, n6);
            (*ip, ip6)
        });
        let pods = PODS.iter().zip(PODS_V6).map(|((p, n, ip), (p6, n6, ip6))| {
            assert_eq!((*p, *n), (p6, n6));
            (*ip, ip6)
        });
        for (v4, v6) in pairs.into_iter().chain(nodes).chain(pods) {
            assert_eq!(ipv6_twin(v4), v6, "twin of {v4}");
        }
        assert_eq!(ipv6_twin("10.244.3"), "fd00:10:244:3::");
        assert_eq!(node_ip_v6("n2"), "fd00:192:0:2::12");
    }

    #[test]
    fn the_excluded_addresses_are_outside_what_the_first_ones_are_in() {
        let v6 = |a: &str| a.parse::<std::net::Ipv6Addr>().unwrap().segments();
        // fd00:203:0:113::200/120 holds EXT_EXCLUDED_V6, not EXT_A_V6.
        assert_eq!(v6(EXT_EXCLUDED_V6)[7] >> 8, 0x2);
        assert_ne!(v6(EXT_A_V6)[7] >> 8, 0x2);
        assert_eq!(v6(EXT_EXCLUDED_V6)[..7], v6(EXT_A_V6)[..7]);
        for cidr in CLUSTER_CIDRS_V6.split(',').chain([POD_CIDR_V6]) {
            let (net, len) = cidr.split_once('/').unwrap();
            assert!(net.parse::<std::net::Ipv6Addr>().is_ok() && len.parse::<u8>().unwrap() <= 128);
        }
        assert!(CLUSTER_CIDRS_V6.starts_with(POD_CIDR_V6));
    }
}
