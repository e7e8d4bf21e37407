// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

//! What the tests that run the live system share: the operator in-process in the underlay's
//! namespace, its options, and a testbed with the demo cluster and a token per node.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sluice_operator::runner::{RunOptions, Source};
use sluice_testbed::{EXT_A, NODES, Testbed, enter_netns};

pub const CLUSTER: &str = include_str!("../../../examples/demo/cluster.yaml");
/// The demo's policy: the checkout pods through n1 or n3, each with its own egress IP.
pub const POLICY: &str = include_str!("../../../examples/demo/policy.yaml");
pub const GRPC: &str = "192.0.2.1:9443";

/// The operator, running on its own thread inside the underlay namespace until dropped.
pub struct Operator {
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl Operator {
    pub fn start(ns: String, opts: RunOptions) -> Operator {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            // Not `run`: its SIGINT handler would keep Ctrl-C from ending the test process.
            let stop = async {
                let _ = stopped.await;
            };
            rt.block_on(sluice_operator::runner::run_until(opts, None, stop))
                .expect("operator runs");
        });
        Operator {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

/// The operator's options: the `dir:` source on `dir`, static tokens from `tokens/table`.
pub fn options(dir: &Path, tokens: &Path, grace: Duration) -> RunOptions {
    RunOptions {
        source: Source::Dir(dir.to_owned()),
        grpc_listen: GRPC.parse().unwrap(),
        metrics_listen: None,
        tls_cert: None,
        tls_key: None,
        heartbeat_grace: grace,
        tokens_file: Some(tokens.join("table")),
        insecure_allow_any_node: false,
        token_audience: "sluice-operator".into(),
        shim_service_accounts: vec![],
        poll: Duration::from_millis(100),
        lease_namespace: String::new(),
        lease_name: String::new(),
        leader_service: None,
        pod_ip: None,
        limits: Default::default(),
        lease_timings: Default::default(),
        lease_file: None,
        service_cidrs: vec![],
        pinned_flow_timeout: std::time::Duration::from_secs(600),
    }
}

/// A testbed with the demo cluster in a manifest directory and a token per node; returns the
/// directory and the tokens' directory.
pub fn live_testbed() -> (Testbed, PathBuf, PathBuf) {
    let tb = Testbed::new().expect("builds the testbed");
    let dir: PathBuf = tb.scratch().join("manifests");
    let tokens: PathBuf = tb.scratch().join("tokens");
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(&tokens).unwrap();
    let mut table = String::new();
    for (node, _) in NODES {
        fs::write(tokens.join(node), format!("token-of-{node}\n")).unwrap();
        table.push_str(&format!("token-of-{node} {node}\n"));
    }
    fs::write(tokens.join("table"), table).unwrap();
    fs::write(dir.join("cluster.yaml"), CLUSTER).unwrap();
    (tb, dir, tokens)
}

/// Starts `sluice-shim run --operator` on `node`.
pub fn start_shim(tb: &mut Testbed, node: &str, tokens: &Path) {
    start_shim_with(tb, node, tokens, &[]);
}

/// [`start_shim`] with more arguments to `run`.
pub fn start_shim_with(tb: &mut Testbed, node: &str, tokens: &Path, args: &[&str]) {
    tb.start_operator_shim_with(node, env!("CARGO_BIN_EXE_sluice-shim"), GRPC, tokens, args)
        .unwrap();
}

/// Opens one connection from namespace `ns` to the external host on a thread of its own (one
/// caught by a switch of gateways hangs until its timeout and must not delay the next) and
/// sends when it completed and the greeting (the source address the host saw) to `tx`.
pub fn connect_in_background(ns: &str, tx: std::sync::mpsc::Sender<(Instant, std::io::Result<String>)>) {
    use std::io::BufRead;
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&ns);
        let addr = format!("{EXT_A}:8080").parse().unwrap();
        let greeting = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim().to_owned())
        });
        let _ = tx.send((Instant::now(), greeting));
    });
}

/// Opens a new connection from namespace `ns` every 20 ms, each on its own thread (a connection
/// caught by the switch of gateways hangs until its timeout, and must not delay the next ones);
/// returns when the first one greeted with `egress` completed, counted from `since`.
pub fn first_connection_via(ns: &str, egress: &str, since: Instant, timeout: Duration) -> Option<Duration> {
    let (tx, rx) = std::sync::mpsc::channel();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        connect_in_background(ns, tx.clone());
        std::thread::sleep(Duration::from_millis(20));
        while let Ok((at, greeting)) = rx.try_recv() {
            if greeting.is_ok_and(|g| g.contains(egress)) {
                return Some(at - since);
            }
        }
    }
    None
}

/// The demo cluster, dual-stack: every node and checkout-2 (p2) with its IPv6 address too, the
/// nodes' IPv6 pod CIDRs.
pub fn dual_stack_cluster() -> String {
    let mut text = CLUSTER.to_owned();
    for (node, ip) in NODES {
        let n = &node[1..];
        text = text
            .replace(
                &format!("podCIDRs: [10.244.{n}.0/24]"),
                &format!("podCIDRs: [10.244.{n}.0/24, \"fd00:10:244:{n}::/64\"]"),
            )
            .replace(
                &format!("addresses: [{{type: InternalIP, address: {ip}}}]"),
                &format!(
                    "addresses: [{{type: InternalIP, address: {ip}}}, {{type: InternalIP, address: \"{}\"}}]",
                    sluice_testbed::node_ip_v6(node)
                ),
            );
    }
    let p2 = "podIPs: [{ip: 10.244.2.10}]";
    assert!(text.contains(p2), "the demo cluster changed: {text}");
    text.replace(p2, "podIPs: [{ip: 10.244.2.10}, {ip: \"fd00:10:244:2::10\"}]")
}
