//! A small cluster built from network namespaces, for the datapath end-to-end tests.
//!
//! ```text
//!                      slc-<pid>-ext  (external host: 203.0.113.10, .200, 198.51.100.10)
//!                            | eth0
//!                            | ext0 203.0.113.1 / 198.51.100.1
//!   slc-<pid>-ul  (underlay: bridge br0 192.0.2.1/24, routes to the external host)
//!        |n1                  |n2                   |n3
//!   slc-<pid>-n1         slc-<pid>-n2          slc-<pid>-n3        nodes, eth0 192.0.2.1N
//!   (+192.0.2.101)       pods 10.244.2.0/24    (+192.0.2.103)      egress IPs on n1 and n3
//!   pods 10.244.1.0/24     |veth-p2 |veth-p3
//!     |veth-p1          slc-<pid>-p2  -p3
//!   slc-<pid>-p1
//! ```
//!
//! The harness plays the CNI (see `cni`): a /32 route per local pod with proxy ARP on its veth
//! (Calico style, pods use 169.254.1.1 as gateway), a route to each other node's pod /24 via that
//! node, and masquerade of pod traffic leaving the cluster to the node IP. Everything lives in
//! namespaces named `slc-<pid>-*`; nothing routes through the machine's own network. Leftovers of
//! earlier runs (`slc-*` of dead processes) are removed first; `Drop` cleans up, also on failure
//! (unless `SLUICE_E2E_KEEP` is set, to debug a failure by hand).

#![allow(dead_code, reason = "each test uses a different part of the harness")]

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub const EGRESS_N1: &str = "192.0.2.101";
pub const EGRESS_N3: &str = "192.0.2.103";
/// In policy A (203.0.113.0/24).
pub const EXT_A: &str = "203.0.113.10";
/// In 203.0.113.128/25 (excluded in some tests).
pub const EXT_EXCLUDED: &str = "203.0.113.200";
/// In policy B (198.51.100.0/24), outside policy A.
pub const EXT_B: &str = "198.51.100.10";
const SERVER_PORT: u16 = 8080;
const CLUSTER_CIDRS: &str = "10.244.0.0/16,192.0.2.0/24";

const NODES: [(&str, &str); 3] = [("n1", "192.0.2.11"), ("n2", "192.0.2.12"), ("n3", "192.0.2.13")];
/// (pod, node, IP).
const PODS: [(&str, &str, &str); 3] = [
    ("p1", "n1", "10.244.1.10"),
    ("p2", "n2", "10.244.2.10"),
    ("p3", "n2", "10.244.2.11"),
];

/// Tests share the kernel: one cluster at a time.
static SERIAL: Mutex<()> = Mutex::new(());

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
    pub source: &'static str,
    pub destination: &'static str,
    pub gateway: Gw,
}

pub struct Cluster {
    prefix: String,
    dir: PathBuf,
    shims: BTreeMap<&'static str, Child>,
    /// (pod, node, IP): [`PODS`] and those added later.
    pods: Vec<(&'static str, &'static str, &'static str)>,
    plan_hash: String,
    server_stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    _serial: MutexGuard<'static, ()>,
}

fn node_ip(node: &str) -> &'static str {
    NODES
        .iter()
        .find(|(n, _)| *n == node)
        .map(|(_, ip)| *ip)
        .expect("known node")
}

/// Runs a command; panics with its stderr when it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failure (cleanup).
fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn sh_stdin(args: &[&str], input: &str) {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "{args:?} failed on:\n{input}");
}

/// Runs `f` on a thread inside network namespace `ns`; sockets it creates stay in `ns`.
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

fn enter_netns(ns: &str) {
    let file =
        fs::File::open(Path::new("/var/run/netns").join(ns)).unwrap_or_else(|e| panic!("netns {ns}: {e}"));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Removes namespaces and directories left by earlier runs whose process is gone (or this one).
fn remove_leftovers() {
    let me = std::process::id();
    let dead_or_me = |name: &str| -> bool {
        let pid: Option<u32> = name
            .strip_prefix("slc-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse().ok());
        pid.is_none_or(|p| p == me || !Path::new(&format!("/proc/{p}")).exists())
    };
    for line in sh(&["ip", "netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with("slc-") && dead_or_me(name) {
            for pid in sh(&["ip", "netns", "pids", name]).split_whitespace() {
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

impl Cluster {
    pub fn new() -> Cluster {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        remove_leftovers();
        let pid = std::process::id();
        let dir = PathBuf::from(format!("/tmp/slc-{pid}"));
        fs::create_dir_all(dir.join("bpffs")).unwrap();
        let mut c = Cluster {
            prefix: format!("slc-{pid}-"),
            dir,
            shims: BTreeMap::new(),
            pods: PODS.to_vec(),
            plan_hash: String::new(),
            server_stop: Arc::new(AtomicBool::new(false)),
            server: None,
            _serial: serial,
        };
        sh(&[
            "mount",
            "-t",
            "bpf",
            "bpf",
            &c.dir.join("bpffs").to_string_lossy(),
        ]);
        c.build();
        c.server = Some(c.start_server());
        c.write_plan(&[]);
        for (node, _) in NODES {
            c.start_shim(node);
        }
        c.wait_applied();
        c
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `ip -n <ns> ARGS`.
    fn ip(&self, ns: &str, args: &[&str]) {
        let ns = self.ns(ns);
        let mut full = vec!["ip", "-n", ns.as_str()];
        full.extend_from_slice(args);
        sh(&full);
    }

    fn sysctl(&self, ns: &str, kv: &str) {
        sh(&["ip", "netns", "exec", &self.ns(ns), "sysctl", "-qw", kv]);
    }

    fn build(&self) {
        for ns in ["ul", "ext", "n1", "n2", "n3", "p1", "p2", "p3"] {
            sh(&["ip", "netns", "add", &self.ns(ns)]);
            self.ip(ns, &["link", "set", "lo", "up"]);
        }
        // Underlay bridge and router to the external host.
        self.ip("ul", &["link", "add", "br0", "type", "bridge"]);
        self.ip("ul", &["addr", "add", "192.0.2.1/24", "dev", "br0"]);
        self.ip("ul", &["link", "set", "br0", "up"]);
        self.sysctl("ul", "net.ipv4.ip_forward=1");
        self.ip(
            "ul",
            &[
                "link",
                "add",
                "ext0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &self.ns("ext"),
            ],
        );
        for a in ["203.0.113.1/24", "198.51.100.1/24"] {
            self.ip("ul", &["addr", "add", a, "dev", "ext0"]);
        }
        self.ip("ul", &["link", "set", "ext0", "up"]);
        for a in ["203.0.113.10/24", "203.0.113.200/24", "198.51.100.10/24"] {
            self.ip("ext", &["addr", "add", a, "dev", "eth0"]);
        }
        self.ip("ext", &["link", "set", "eth0", "up"]);
        self.ip("ext", &["route", "add", "default", "via", "203.0.113.1"]);

        for (node, ip) in NODES {
            self.ip(
                "ul",
                &[
                    "link",
                    "add",
                    node,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &self.ns(node),
                ],
            );
            self.ip("ul", &["link", "set", node, "master", "br0", "up"]);
            self.ip(node, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            self.ip(node, &["link", "set", "eth0", "up"]);
            self.ip(node, &["route", "add", "default", "via", "192.0.2.1"]);
            self.sysctl(node, "net.ipv4.ip_forward=1");
            self.cni(node);
        }
        self.ip("n1", &["addr", "add", &format!("{EGRESS_N1}/32"), "dev", "eth0"]);
        self.ip("n3", &["addr", "add", &format!("{EGRESS_N3}/32"), "dev", "eth0"]);

        for (p, node, ip) in PODS {
            self.wire_pod(p, node, ip);
        }
    }

    /// The CNI's part for one pod: its veth, address and routes.
    fn wire_pod(&self, p: &str, node: &str, ip: &str) {
        let veth = format!("veth-{p}");
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
        );
        self.ip(p, &["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        // Room for the 50-byte VXLAN header on the underlay's 1500 bytes, as overlay CNIs do.
        self.ip(p, &["link", "set", "eth0", "mtu", "1450", "up"]);
        self.ip(
            p,
            &["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"],
        );
        self.ip(
            p,
            &["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"],
        );
        self.ip(node, &["link", "set", &veth, "up"]);
        self.ip(node, &["route", "add", &format!("{ip}/32"), "dev", &veth]);
        self.sysctl(node, &format!("net.ipv4.conf.{veth}.proxy_arp=1"));
    }

    /// Adds a pod while the shims run (its namespace is removed with the cluster).
    pub fn add_pod(&mut self, p: &'static str, node: &'static str, ip: &'static str) {
        sh(&["ip", "netns", "add", &self.ns(p)]);
        self.ip(p, &["link", "set", "lo", "up"]);
        self.wire_pod(p, node, ip);
        self.pods.push((p, node, ip));
    }

    /// Deletes a pod added by [`Cluster::add_pod`] (its veth goes with its namespace).
    pub fn delete_pod(&mut self, p: &str) {
        sh(&["ip", "netns", "del", &self.ns(p)]);
        self.pods.retain(|(name, _, _)| *name != p);
    }

    fn pod(&self, name: &str) -> (&'static str, &'static str) {
        self.pods
            .iter()
            .find(|(p, _, _)| *p == name)
            .map(|(_, n, ip)| (*n, *ip))
            .expect("known pod")
    }

    /// `ip ARGS` inside `node`'s namespace.
    pub fn ip_on(&self, node: &str, args: &[&str]) {
        self.ip(node, args);
    }

    /// The pod interfaces `node`'s datapath holds a pinned link for.
    pub fn pinned_pod_links(&self, node: &str) -> usize {
        fs::read_dir(self.bpffs().join(node).join("links"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("sluice_from_pod-"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The CNI's part on `node`: routes to the other nodes' pod CIDRs, and masquerade of pod
    /// traffic leaving the cluster (the "normal path", which shows the node IP).
    fn cni(&self, node: &str) {
        for (other, ip) in NODES {
            if other != node {
                self.ip(
                    node,
                    &["route", "add", &format!("10.244.{}.0/24", &other[1..]), "via", ip],
                );
            }
        }
        sh_stdin(
            &["ip", "netns", "exec", &self.ns(node), "nft", "-f", "-"],
            "table ip cni {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  \
             ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 oifname \"eth0\" masquerade\n }\n}\n",
        );
    }

    /// The external host's server: greets each connection with the source address it saw, then
    /// answers each line `<n> <padding>` with `<source address> <n bytes>`.
    fn start_server(&self) -> JoinHandle<()> {
        let listener = in_netns(&self.ns("ext"), || {
            TcpListener::bind(("0.0.0.0", SERVER_PORT)).expect("bind server")
        });
        listener.set_nonblocking(true).unwrap();
        let stop = self.server_stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        std::thread::spawn(move || serve(stream, peer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    }

    pub fn node_ip(&self, node: &str) -> String {
        node_ip(node).to_owned()
    }

    fn plan(&self, rules: &[Rule]) -> serde_json::Value {
        let mut per_node: BTreeMap<&str, Vec<serde_json::Value>> =
            NODES.iter().map(|(n, _)| (*n, vec![])).collect();
        for r in rules {
            let (src_node, src_ip) = self.pod(r.source);
            let entry = |gateway: &str, egress: Option<(&str, Option<&str>)>| {
                serde_json::json!({"source": src_ip, "destination": r.destination, "gateway": gateway,
                    "egressIP": egress.map(|e| e.0), "interface": egress.and_then(|e| e.1), "policy": r.policy})
            };
            match &r.gateway {
                Gw::Node(gw, egress) | Gw::NodeVia(gw, egress, _) => {
                    let interface = match &r.gateway {
                        Gw::NodeVia(_, _, i) => Some(*i),
                        _ => None,
                    };
                    // The source node steers; the gateway node holds the entry with its egress IP
                    // (the planner's contract, see docs/datapath.md).
                    let local = *gw == src_node;
                    per_node
                        .get_mut(src_node)
                        .unwrap()
                        .push(entry(node_ip(gw), local.then_some((*egress, interface))));
                    if !local {
                        per_node
                            .get_mut(gw)
                            .unwrap()
                            .push(entry(node_ip(gw), Some((egress, interface))));
                    }
                }
                Gw::None => per_node.get_mut(src_node).unwrap().push(entry("none", None)),
                Gw::Fallback => per_node.get_mut(src_node).unwrap().push(entry("fallback", None)),
                Gw::Excluded => per_node.get_mut(src_node).unwrap().push(entry("excluded", None)),
            }
        }
        let nodes: Vec<_> = per_node
            .into_iter()
            .map(|(name, entries)| serde_json::json!({"name": name, "entries": entries}))
            .collect();
        serde_json::json!({"nodes": nodes, "policies": []})
    }

    fn write_plan(&mut self, rules: &[Rule]) {
        let bytes = serde_json::to_vec_pretty(&self.plan(rules)).unwrap();
        let path = self.dir.join("plan.json");
        let tmp = self.dir.join("plan.json.tmp");
        fs::write(&tmp, &bytes).unwrap();
        fs::rename(&tmp, &path).unwrap();
        self.plan_hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
    }

    /// Writes the plan made of `rules` and waits until every shim has applied it.
    pub fn apply(&mut self, rules: &[Rule]) {
        let reads: BTreeMap<&str, u64> = NODES
            .iter()
            .map(|(n, _)| (*n, self.status(n)["planReads"].as_u64().unwrap_or(0)))
            .collect();
        self.write_plan(rules);
        self.wait_until(|c| {
            NODES.iter().all(|(n, _)| {
                let s = c.status(n);
                s["plan"] == c.plan_hash.as_str() && s["planReads"].as_u64().unwrap_or(0) > reads[n]
            })
        });
    }

    /// Waits until every shim has applied the current plan.
    pub fn wait_applied(&self) {
        self.wait_until(|c| {
            NODES
                .iter()
                .all(|(n, _)| c.status(n)["plan"] == c.plan_hash.as_str())
        });
    }

    fn wait_until(&self, done: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(self) {
            if Instant::now() > deadline {
                let logs: Vec<String> = NODES
                    .iter()
                    .map(|(n, _)| {
                        let log = fs::read_to_string(self.dir.join(format!("{n}.log"))).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        format!(
                            "--- {n} status {} log (last lines, newest first):\n{}",
                            self.status(n),
                            tail.join("\n")
                        )
                    })
                    .collect();
                panic!(
                    "the shims did not apply plan {} in time\n{}",
                    self.plan_hash,
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The status file of `node`'s shim (`null` before its first apply).
    pub fn status(&self, node: &str) -> serde_json::Value {
        fs::read(self.dir.join(format!("{node}.status")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn start_shim(&mut self, node: &'static str) {
        let _ = fs::remove_file(self.dir.join(format!("{node}.status")));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{node}.log")))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(node), env!("CARGO_BIN_EXE_sluice-shim")])
            .arg("--bpffs-dir")
            .arg(self.dir.join("bpffs").join(node))
            .args([
                "run",
                "--node",
                node,
                "--node-ip",
                node_ip(node),
                "--cluster-cidr",
                CLUSTER_CIDRS,
            ])
            .arg("--entries")
            .arg(self.dir.join("plan.json"))
            .arg("--status-file")
            .arg(self.dir.join(format!("{node}.status")))
            .args(["--metrics-addr", "off", "--interval-ms", "100"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sluice-shim");
        self.shims.insert(node, child);
    }

    /// SIGKILLs `node`'s shim.
    pub fn kill_shim(&mut self, node: &str) {
        if let Some(mut child) = self.shims.remove(node) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The bpffs mounted for this cluster (each node's shim pins under `<it>/<node>`).
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// The harness's scratch directory (not on a bpffs).
    pub fn scratch(&self) -> &Path {
        &self.dir
    }

    fn shim_cli(&self, node: &str, args: &[&str]) -> String {
        let dir = self.dir.join("bpffs").join(node);
        let ns = self.ns(node);
        let mut full = vec![
            "ip",
            "netns",
            "exec",
            &ns,
            env!("CARGO_BIN_EXE_sluice-shim"),
            "--bpffs-dir",
        ];
        let dir = dir.to_string_lossy();
        full.push(&dir);
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `sluice-shim uninstall` on `node`.
    pub fn uninstall(&self, node: &str) {
        self.shim_cli(node, &["uninstall"]);
    }

    /// `sluice-shim bpf list` on `node`.
    pub fn bpf_list(&self, node: &str) -> String {
        self.shim_cli(node, &["bpf", "list"])
    }

    /// `sluice-shim bpf counters` on `node`.
    pub fn bpf_counters(&self, node: &str) -> String {
        self.shim_cli(node, &["bpf", "counters"])
    }

    /// The packet count of outcome `name` on `node`.
    pub fn counter(&self, node: &str, name: &str) -> u64 {
        let out = self.bpf_counters(node);
        out.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&name)).then(|| f[1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no counter {name} in\n{out}"))
    }

    /// Opens a connection from `pod` to `dst`:8080 and reads the greeting.
    pub fn connect(&self, pod: &str, dst: &str) -> Result<Conn, String> {
        in_netns(&self.ns(pod), || Conn::open(dst))
    }

    /// One connection with a small exchange: the source address the external host saw.
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

    /// New connections from `pod` to `dst`, one after the other, until stopped (at most 60 s).
    pub fn stream(&self, pod: &str, dst: &str) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, dst, flag) = (self.ns(pod), dst.to_owned(), stop.clone());
        let handle = std::thread::spawn(move || {
            enter_netns(&ns);
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut results = Vec::new();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                results.push(Conn::open(&dst).and_then(|mut c| c.exchange(100, 100)));
                std::thread::sleep(Duration::from_millis(10));
            }
            results
        });
        Stream { stop, handle }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("SLUICE_E2E_KEEP").is_some() {
            // Debugging: leave everything up (the next run removes it).
            eprintln!(
                "SLUICE_E2E_KEEP: leaving namespaces {}* and {} in place",
                self.prefix,
                self.dir.display()
            );
            self.shims.clear();
            return;
        }
        for node in ["n1", "n2", "n3"] {
            self.kill_shim(node);
        }
        self.server_stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        let pods: Vec<&str> = self.pods.iter().map(|(p, _, _)| *p).collect();
        for ns in pods.into_iter().chain(["n1", "n2", "n3", "ext", "ul"]) {
            sh_quiet(&["ip", "netns", "del", &self.ns(ns)]);
        }
        sh_quiet(&["umount", &self.dir.join("bpffs").to_string_lossy()]);
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
        let addr: SocketAddr = format!("{dst}:{SERVER_PORT}").parse().unwrap();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
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

/// A background stream of new connections.
pub struct Stream {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Result<String, String>>>,
}

impl Stream {
    /// Stops the stream; the result of every connection it made.
    pub fn stop(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("stream thread")
    }
}
