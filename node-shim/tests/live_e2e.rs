//! The live system end to end in network namespaces (needs root): the operator (`dir:` source,
//! in-process, on the underlay router's address) and one `sluice-shim run --operator` per node,
//! talking gRPC. Editing the policy file moves the traffic; killing the gateway's shim moves it
//! to the other gateway, and the test prints how long that took (`docs/benchmarks.md`).

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use sluice_operator::runner::{RunOptions, Source};
use sluice_testbed::{EGRESS_N1, EGRESS_N3, EXT_A, EXT_B, NODES, Testbed, enter_netns, in_netns, wait_for};

mod support;

use support::{
    GRPC, Operator, connect_in_background, first_connection_via, live_testbed, options, start_shim,
};

const BOTH: &str = include_str!("../../examples/demo/policy.yaml");

fn only_gateway(node: &str, egress: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: checkout-to-psp\n\
         spec:\n  selectors:\n    - podSelector:\n        matchLabels: {{app: checkout}}\n      \
         namespaceSelector:\n        matchLabels: {{team: payments}}\n  destinationCIDRs: [203.0.113.0/24]\n  \
         excludedCIDRs: [203.0.113.200/32]\n  egressGateways:\n    - nodeSelector:\n        \
         matchLabels: {{kubernetes.io/hostname: {node}}}\n      egressIP: {egress}\n  failurePolicy: Drop\n"
    )
}

/// Replaces a file atomically, as an editor or `kubectl`-like tool would.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Waits until `pod`'s new connections to the external host leave with `egress`; how long it took.
fn wait_egress(tb: &Testbed, pod: &str, egress: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    let mut last = Err(String::new());
    let ok = wait_for(timeout, || {
        last = tb.fetch(pod, EXT_A);
        last.as_deref().is_ok_and(|s| s.contains(egress))
    });
    let logs: String = NODES.iter().map(|(n, _)| tb.log(&format!("shim-{n}"))).collect();
    assert!(ok, "{pod} never left with {egress}: last {last:?}\n{logs}");
    started.elapsed()
}

#[test]
fn a_new_operator_keeps_the_gateway_the_datapaths_hold() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let grace = Duration::from_secs(1);
    let (mut tb, dir, tokens) = live_testbed();
    // One slot, two candidates (n1, n3); no egress IP: p2 leaves with its gateway's node IP.
    write(
        &dir.join("policy.yaml"),
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: one-slot\n\
         spec:\n  selectors:\n    - podSelector:\n        matchLabels: {app: checkout}\n  \
         destinationCIDRs: [203.0.113.0/24]\n  egressGateways:\n    - nodeSelector:\n        \
         matchLabels: {sluice.dev/egress: \"true\"}\n  failurePolicy: Drop\n",
    );
    let operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let via = |tb: &Testbed| tb.fetch("p2", EXT_A).map(|s| s.trim().to_owned());
    assert!(wait_for(Duration::from_secs(20), || {
        via(&tb).is_ok_and(|v| v == tb.node_ip("n1") || v == tb.node_ip("n3"))
    }));
    // The hash's choice fails; the other gateway takes over, and keeps the slot when the first
    // comes back.
    let first = if via(&tb).unwrap() == tb.node_ip("n1") {
        "n1"
    } else {
        "n3"
    };
    let second = if first == "n1" { "n3" } else { "n1" };
    tb.kill(&format!("shim-{first}"));
    wait_egress(&tb, "p2", &tb.node_ip(second), Duration::from_secs(10));
    start_shim(&mut tb, first, &tokens);
    std::thread::sleep(grace * 2);
    assert_eq!(
        via(&tb).unwrap(),
        tb.node_ip(second),
        "a recovered gateway takes nothing back"
    );

    // A new operator has no memory, and the `dir:` source no status to read back: only what the
    // datapaths hold says that `second` fills the slot. Through the restart and past the
    // settling period, every connection leaves through `second`.
    drop(operator);
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    let until = Instant::now() + Duration::from_secs(9);
    let (mut ok, mut failed, mut moved) = (0, 0, 0);
    while Instant::now() < until {
        match via(&tb) {
            Ok(v) if v == tb.node_ip(second) => ok += 1,
            Ok(_) => moved += 1,
            Err(_) => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs: String = NODES
        .iter()
        .map(|(n, _)| format!("--- shim-{n}\n{}", tb.log(&format!("shim-{n}"))))
        .collect();
    assert_eq!(
        (failed, moved),
        (0, 0),
        "{ok} connections through {second}, {failed} failed, {moved} through another gateway\n{logs}"
    );
}

#[test]
fn operator_and_shims_move_traffic_on_edits_and_on_failover() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let grace = std::env::var("SLUICE_E2E_GRACE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
    let (mut tb, dir, tokens) = live_testbed();
    let policy = dir.join("policy.yaml");
    write(&policy, &only_gateway("n1", EGRESS_N1));

    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }

    // checkout-2 (p2, on n2) leaves through n1.
    let t = wait_egress(&tb, "p2", EGRESS_N1, Duration::from_secs(20));
    println!("initial plan programmed and used after {t:?}");

    // Editing the policy moves the traffic to n3.
    write(&policy, &only_gateway("n3", EGRESS_N3));
    let t = wait_egress(&tb, "p2", EGRESS_N3, Duration::from_secs(10));
    println!("policy edit: traffic moved after {t:?}");

    // A malformed file changes nothing.
    write(&dir.join("broken.yaml"), "kind: [unclosed\n");
    std::thread::sleep(Duration::from_millis(500));
    assert!(tb.fetch("p2", EXT_A).unwrap().contains(EGRESS_N3));
    fs::remove_file(dir.join("broken.yaml")).unwrap();

    // Both gateways: n3 keeps serving (retained); killing its shim moves p2 to n1.
    write(&policy, BOTH);
    std::thread::sleep(Duration::from_millis(800));
    let via = tb.fetch("p2", EXT_A).unwrap();
    let (dead, survivor) = if via.contains(EGRESS_N3) {
        ("n3", EGRESS_N1)
    } else {
        ("n1", EGRESS_N3)
    };
    let killed = Instant::now();
    tb.kill(&format!("shim-{dead}"));
    let took = first_connection_via(&tb.ns("p2"), survivor, killed, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("p2 never left through {survivor}"));
    println!(
        "FAILOVER grace={grace:?} took={took:?} (shim of {dead} killed; first new connection through the other gateway)"
    );
    let logs: String = NODES
        .iter()
        .map(|(n, _)| format!("--- shim-{n}\n{}", tb.log(&format!("shim-{n}"))))
        .collect();
    assert!(
        took < grace * 2,
        "failover took {took:?} with a grace period of {grace:?}\n{logs}"
    );
}

/// A TCP server in namespace `ns` on `port` that greets each connection with the source address
/// it saw, for as long as the test runs.
fn greet_peers(tb: &Testbed, ns: &str, port: u16) {
    use std::io::Write;
    let listener = in_netns(&tb.ns(ns), || std::net::TcpListener::bind(("0.0.0.0", port)))
        .unwrap_or_else(|e| panic!("binding :{port} in {ns}: {e}"));
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = writeln!(stream, "{}", peer.ip());
            }
        }
    });
}

/// Connects from `pod` to `dst:port`: the source address the server saw.
fn seen_by(tb: &Testbed, pod: &str, dst: &str, port: u16) -> Result<String, String> {
    use std::io::BufRead;
    in_netns(&tb.ns(pod), || {
        let addr = format!("{dst}:{port}").parse().unwrap();
        let stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        std::io::BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_owned())
    })
}

#[test]
fn a_policy_for_everything_leaves_the_cluster_alone_without_cluster_cidrs() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    // Everything p2 (checkout on n2) sends goes through n3, as a user who forgot the cluster
    // CIDRs would write it.
    write(
        &dir.join("policy.yaml"),
        &format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: everything\n\
             spec:\n  selectors:\n    - podSelector:\n        matchLabels: {{app: checkout}}\n      \
             nodeSelector:\n        matchLabels: {{kubernetes.io/hostname: n2}}\n  \
             destinationCIDRs: [0.0.0.0/0]\n  egressGateways:\n    - nodeSelector:\n        \
             matchLabels: {{kubernetes.io/hostname: n3}}\n      egressIP: {EGRESS_N3}\n  \
             failurePolicy: Drop\n"
        ),
    );
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, Duration::from_secs(1)));
    for (node, _) in NODES {
        // No `--cluster-cidr`: the shims know their node IP and what the operator found.
        let mut cmd = tb.shim_command_without_cluster_cidrs(node, env!("CARGO_BIN_EXE_sluice-shim"));
        cmd.args(["--operator", &format!("http://{GRPC}")])
            .arg("--token-file")
            .arg(tokens.join(node))
            .args(["--interval-ms", "1000"]);
        tb.spawn(&format!("shim-{node}"), cmd).unwrap();
    }
    // Outside destinations are steered: the external host sees the egress IP.
    wait_egress(&tb, "p2", EGRESS_N3, Duration::from_secs(20));

    const PORT: u16 = 9181;
    for ns in ["p1", "p3", "n1"] {
        greet_peers(&tb, ns, PORT);
    }
    let logs = || -> String {
        NODES
            .iter()
            .map(|(n, _)| format!("--- shim-{n}\n{}", tb.log(&format!("shim-{n}"))))
            .collect()
    };
    let p2 = tb.pod("p2").1;
    // Pod to pod, on another node and on its own: the peer sees the pod itself, not the egress
    // IP (a steered connection would arrive from n3's egress IP, or not at all).
    for (pod, ip) in [("p1", tb.pod("p1").1), ("p3", tb.pod("p3").1)] {
        assert_eq!(
            seen_by(&tb, "p2", ip, PORT).as_deref(),
            Ok(p2),
            "p2 -> {pod} ({ip}) was steered or dropped\n{}",
            logs()
        );
    }
    // Pod to another node: the CNI's masquerade shows n2's address; steered, it would be n3's
    // egress IP.
    assert_eq!(
        seen_by(&tb, "p2", &tb.node_ip("n1"), PORT),
        Ok(tb.node_ip("n2")),
        "p2 -> n1 was steered or dropped\n{}",
        logs()
    );
    // And outside destinations still leave with the egress IP.
    assert!(tb.fetch("p2", EXT_A).unwrap().contains(EGRESS_N3));
}

/// Opens a connection from namespace `ns` to the external host every 20 ms (each on its own
/// thread) for `window`; returns when the first one greeted with `egress` completed (counted
/// from the start), and every greeting that was not `egress` (a leak: another source address).
fn connections_from_a_new_pod(ns: &str, egress: &str, window: Duration) -> (Option<Duration>, Vec<String>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    let mut first = None;
    let mut leaked = Vec::new();
    while started.elapsed() < window {
        connect_in_background(ns, tx.clone());
        std::thread::sleep(Duration::from_millis(20));
        while let Ok((at, greeting)) = rx.try_recv() {
            match greeting {
                Ok(g) if g == egress => {
                    first.get_or_insert(at - started);
                }
                Ok(g) => leaked.push(g),
                Err(_) => {}
            }
        }
        // A second of traffic after the first steered connection, then stop.
        if first.is_some_and(|f| started.elapsed() > f + Duration::from_secs(1)) {
            break;
        }
    }
    // Connections still under way finish within their 2 s timeouts.
    drop(tx);
    while let Ok((_, greeting)) = rx.recv_timeout(Duration::from_secs(3)) {
        if let Ok(g) = greeting
            && g != egress
        {
            leaked.push(g);
        }
    }
    (first, leaked)
}

#[test]
fn a_new_pod_never_leaves_with_a_node_ip() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let repeats: usize = std::env::var("SLUICE_E2E_NEW_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let grace = Duration::from_secs(1);
    let (mut tb, dir, tokens) = live_testbed();
    write(&dir.join("policy.yaml"), &only_gateway("n1", EGRESS_N1));
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    wait_egress(&tb, "p2", EGRESS_N1, Duration::from_secs(20));

    let mut delays = Vec::new();
    for i in 0..repeats {
        let name: &'static str = Box::leak(format!("q{i}").into_boxed_str());
        let ip: &'static str = Box::leak(format!("10.244.2.{}", 20 + i % 200).into_boxed_str());
        tb.add_pod(name, "n2", ip);
        // The pod exists and sends at once; the operator learns of it from its manifest.
        write(
            &dir.join(format!("pod-{name}.yaml")),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: new-pod-{i}, \
                 labels: {{app: checkout}}}}\nspec: {{nodeName: n2, containers: [{{name: app, image: checkout}}]}}\n\
                 status: {{phase: Running, podIPs: [{{ip: {ip}}}]}}\n"
            ),
        );
        let (first, leaked) = connections_from_a_new_pod(&tb.ns(name), EGRESS_N1, Duration::from_secs(15));
        assert!(leaked.is_empty(), "{name} left with {leaked:?}");
        let first = first.unwrap_or_else(|| panic!("{name} never left through the gateway"));
        delays.push(first);
        fs::remove_file(dir.join(format!("pod-{name}.yaml"))).unwrap();
        tb.delete_pod(name);
    }
    delays.sort();
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    println!(
        "NEW PODS {} runs: first steered connection after p50 {:?}, p99 {:?}, max {:?}; 0 leaked",
        delays.len(),
        at(0.5),
        at(0.99),
        delays.last().unwrap()
    );
    // The guard did the work: packets of pods not decided on yet were dropped, not sent.
    let counters = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-shim"))
        .arg("--bpffs-dir")
        .arg(tb.bpffs().join("n2"))
        .args(["bpf", "counters"])
        .output()
        .unwrap();
    let counters = String::from_utf8_lossy(&counters.stdout);
    let dropped: u64 = counters
        .lines()
        .find_map(|l| l.strip_prefix("dropped_undecided_pod"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no dropped_undecided_pod in\n{counters}"));
    assert!(dropped > 0, "{counters}\n{}", tb.log("shim-n2"));
}

/// CPU time (user + system, in clock ticks) of process `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) are split on whitespace.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

#[test]
fn sixty_allowlists_of_a_thousand_cidrs_are_programmed_and_then_nothing_moves() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    // 60 policies of 1,000 destination CIDRs each (SaaS allowlists), selecting both checkout
    // pods, through n3: n3 serves 2 x 60,000 (pod, CIDR) pairs, n1 and n2 steer 60,000 each.
    let mut manifests = String::new();
    for p in 0..60u32 {
        let mut cidrs: Vec<String> = (0..1_000u32)
            .map(|c| {
                let net = std::net::Ipv4Addr::from(0x0b00_0000 + ((p * 1_000 + c) << 8));
                format!("{net}/24")
            })
            .collect();
        if p == 0 {
            cidrs[999] = "203.0.113.0/24".into();
        }
        manifests.push_str(&format!(
            "---\napiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: saas-{p:02}\n\
             spec:\n  selectors:\n    - podSelector:\n        matchLabels: {{app: checkout}}\n  \
             destinationCIDRs: [{}]\n  egressGateways:\n    - nodeSelector:\n        \
             matchLabels: {{kubernetes.io/hostname: n3}}\n      egressIP: {EGRESS_N3}\n  failurePolicy: Drop\n",
            cidrs.join(", ")
        ));
    }
    write(&dir.join("policies.yaml"), &manifests);
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, Duration::from_secs(10)));
    let mut pids = Vec::new();
    for (node, _) in NODES {
        let mut cmd = tb.shim_command(node, env!("CARGO_BIN_EXE_sluice-shim"));
        cmd.args(["--operator", &format!("http://{GRPC}")])
            .arg("--token-file")
            .arg(tokens.join(node))
            .args(["--interval-ms", "1000"])
            .arg("--status-file")
            .arg(tb.scratch().join(format!("{node}.status")));
        pids.push(tb.spawn(&format!("shim-{node}"), cmd).unwrap());
    }
    let status = |tb: &Testbed, node: &str| -> serde_json::Value {
        fs::read(tb.scratch().join(format!("{node}.status")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let started = Instant::now();
    let programmed = wait_for(Duration::from_secs(300), || {
        status(&tb, "n3")["entries"] == 120_000
            && status(&tb, "n1")["entries"] == 60_000
            && status(&tb, "n2")["entries"] == 60_000
    });
    let logs: String = NODES
        .iter()
        .map(|(n, _)| format!("--- shim-{n}\n{}", tb.log(&format!("shim-{n}"))))
        .collect();
    assert!(
        programmed,
        "not programmed: {} {} {}\n{logs}",
        status(&tb, "n1"),
        status(&tb, "n2"),
        status(&tb, "n3")
    );
    eprintln!("programmed in {:?}", started.elapsed());
    // Pods + CIDRs, not pods x CIDRs: one source group of 60,000 destinations for both pods.
    assert_eq!(status(&tb, "n3")["sources"], 2);
    assert_eq!(status(&tb, "n3")["destinations"], 60_000);
    wait_egress(&tb, "p2", EGRESS_N3, Duration::from_secs(20));
    wait_egress(&tb, "p1", EGRESS_N3, Duration::from_secs(20));

    // At rest nothing is applied again, and nothing is written to the maps.
    let counts = |tb: &Testbed| -> Vec<(serde_json::Value, serde_json::Value)> {
        NODES
            .iter()
            .map(|(n, _)| {
                let s = status(tb, n);
                (s["planReads"].clone(), s["mapWrites"].clone())
            })
            .collect()
    };
    let before = counts(&tb);
    let ticks_before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(counts(&tb), before, "a shim applied its plan again at rest");
    let idle: Vec<String> = pids
        .iter()
        .zip(&ticks_before)
        .zip(NODES)
        .map(|((p, t), (n, _))| format!("{n} {} ticks", cpu_ticks(*p) - t))
        .collect();
    eprintln!(
        "shim CPU over 10 s at rest (100 ticks = one core-second): {}",
        idle.join(", ")
    );
}

/// The policies' status, by policy name: what the Kubernetes controller would write
/// (`controller::status::desired`), as JSON.
type Statuses = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, serde_json::Value>>>;

/// The operator with the `dir:` source, wired as `runner::run_until` wires it, except that the
/// engine's status updates are kept for the test: with that source the operator only logs them,
/// and its log line does not name the nodes behind nor say why.
struct StatusOperator {
    statuses: Statuses,
    _running: Operator,
}

impl StatusOperator {
    fn start(ns: String, opts: RunOptions) -> StatusOperator {
        use sluice_operator::{
            auth::{StaticTokens, TokenVerifier},
            controller::status,
            engine::EngineMetrics,
            runner::{self, EngineChannels},
        };
        let statuses = Statuses::default();
        let kept = statuses.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let Source::Dir(dir) = opts.source.clone() else {
                    unreachable!("the dir source")
                };
                let tokens = opts.tokens_file.clone().expect("a tokens file");
                let verifier: std::sync::Arc<dyn TokenVerifier> =
                    std::sync::Arc::new(StaticTokens::from_file(&tokens).expect("reads the tokens"));
                let mut registry = sluice_operator::metrics::registry();
                let metrics = EngineMetrics::register(&mut registry);
                let (sources_tx, sources) = tokio::sync::mpsc::channel(1024);
                let (updates, mut updates_rx) = tokio::sync::mpsc::channel(256);
                let (notices, mut notices_rx) = tokio::sync::mpsc::channel(256);
                tokio::spawn(async move {
                    // `desired` wants a time for the conditions' transitions, which nothing here
                    // reads; a `Time` is only reachable through its serde form.
                    let now = || serde_json::from_str("\"2000-01-01T00:00:00Z\"").expect("a time");
                    while let Some(u) = updates_rx.recv().await {
                        let s = serde_json::to_value(status::desired(&u, None, now())).unwrap();
                        kept.lock().unwrap().insert(u.outcome.name.clone(), s);
                    }
                });
                tokio::spawn(async move { while notices_rx.recv().await.is_some() {} });
                let watching = sluice_operator::dirsource::run(dir, opts.poll, sources_tx);
                let channels = EngineChannels {
                    sources,
                    updates,
                    notices,
                };
                let stop = async {
                    let _ = stopped.await;
                };
                let live = runner::run_live(&opts, None, verifier, metrics, channels, || (), stop);
                tokio::select! {
                    r = live => r.expect("operator runs"),
                    () = watching => {}
                }
            });
        });
        StatusOperator {
            statuses,
            _running: Operator {
                stop: Some(stop),
                thread: Some(thread),
            },
        }
    }

    /// `policy`'s condition `Programmed` (`null` before the first status).
    fn programmed(&self, policy: &str) -> serde_json::Value {
        let statuses = self.statuses.lock().unwrap();
        let conditions = statuses
            .get(policy)
            .and_then(|s| s["conditions"].as_array().cloned())
            .unwrap_or_default();
        conditions
            .into_iter()
            .find(|c| c["type"] == sluice_operator::api::CONDITION_PROGRAMMED)
            .unwrap_or_default()
    }

    /// Waits until `policy`'s `Programmed` satisfies `ok`; panics with the last one and `logs`.
    fn wait_programmed(
        &self,
        policy: &str,
        timeout: Duration,
        logs: impl Fn() -> String,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let done = wait_for(timeout, || {
            last = self.programmed(policy);
            ok(&last)
        });
        assert!(done, "{policy}: Programmed is {last}\n{}", logs());
        last
    }
}

/// An allowlist of `cidrs` for the checkout pods (p1 on n1, p2 on n2) through n3.
fn allowlist(cidrs: &[&str]) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: allowlist\n\
         spec:\n  selectors:\n    - podSelector:\n        matchLabels: {{app: checkout}}\n  \
         destinationCIDRs: [{}]\n  egressGateways:\n    - nodeSelector:\n        \
         matchLabels: {{kubernetes.io/hostname: n3}}\n      egressIP: {EGRESS_N3}\n  failurePolicy: Drop\n",
        cidrs.join(", ")
    )
}

/// Waits until `pod`'s new connections to `dst` are seen from `want`; panics with `logs`.
fn wait_seen_from(
    tb: &Testbed,
    pod: &str,
    dst: &str,
    want: &str,
    timeout: Duration,
    logs: impl Fn() -> String,
) {
    let mut last = Err(String::new());
    let ok = wait_for(timeout, || {
        last = tb.fetch(pod, dst);
        last.as_deref() == Ok(want)
    });
    assert!(
        ok,
        "{pod} -> {dst} never seen from {want}: last {last:?}\n{}",
        logs()
    );
}

/// `sluice_plans_refused_total` of the shim serving metrics on 127.0.0.1:9473 in `node`.
fn plans_refused(tb: &Testbed, node: &str) -> u64 {
    sluice_testbed::scrape_metric(&tb.ns(node), "127.0.0.1:9473", "sluice_plans_refused_total")
}

#[test]
fn a_node_whose_maps_cannot_hold_the_new_plan_keeps_its_entries_and_the_status_names_it() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    let policy = dir.join("policy.yaml");
    write(&policy, &allowlist(&["203.0.113.0/24"]));
    let operator = StatusOperator::start(tb.ns("ul"), options(&dir, &tokens, Duration::from_secs(1)));
    for node in ["n1", "n3"] {
        start_shim(&mut tb, node, &tokens);
    }
    // n2's destinations map holds 4 (group, CIDR) entries: the plan of one CIDR fits, one of
    // four does not (the old group and the new one are both held while moving: 1 + 4).
    let mut cmd = tb.shim_command("n2", env!("CARGO_BIN_EXE_sluice-shim"));
    cmd.args(["--operator", &format!("http://{GRPC}")])
        .arg("--token-file")
        .arg(tokens.join("n2"))
        .args(["--interval-ms", "1000", "--policy-map-max", "4"])
        .args(["--metrics-addr", "127.0.0.1:9473"])
        .arg("--status-file")
        .arg(tb.scratch().join("n2.status"));
    tb.spawn("shim-n2", cmd).unwrap();
    let logs = || -> String {
        NODES
            .iter()
            .map(|(n, _)| format!("--- shim-{n}\n{}", tb.log(&format!("shim-{n}"))))
            .collect()
    };
    let n2_status = || -> serde_json::Value {
        fs::read(tb.scratch().join("n2.status"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let limit = Duration::from_secs(20);

    // The small plan: both checkout pods leave with n3's egress IP, every node programmed it.
    wait_seen_from(&tb, "p1", EXT_A, EGRESS_N3, limit, logs);
    wait_seen_from(&tb, "p2", EXT_A, EGRESS_N3, limit, logs);
    operator.wait_programmed("allowlist", limit, logs, |c| {
        c["status"] == "True" && c["message"] == "3/3 nodes"
    });
    assert_eq!(n2_status()["destinations"], 1, "{}", n2_status());
    assert_eq!(plans_refused(&tb, "n2"), 0);

    // Grown past what n2's map holds.
    let grown = ["203.0.113.0/24", "198.51.100.0/24", "11.0.0.0/24", "11.0.1.0/24"];
    write(&policy, &allowlist(&grown));
    // Pending until every node has answered; then n2's answer stays.
    let c = operator.wait_programmed("allowlist", limit, logs, |c| {
        c["status"] == "False"
            && c["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("2/3 nodes") && m.contains("map full"))
    });
    let message = c["message"].as_str().unwrap_or_default();
    assert_eq!(c["reason"], "ProgrammingFailed", "{c}");
    assert!(message.contains("n2: ") && message.contains("map full"), "{c}");
    assert!(
        message.starts_with("2/3 nodes") && !message.contains("n1: ") && !message.contains("n3: "),
        "only n2 is behind: {c}"
    );
    println!("refused by n2: Programmed {c}");
    // The other nodes took the new plan: p1 (on n1, through n3) reaches a new destination
    // through the gateway.
    wait_seen_from(&tb, "p1", EXT_B, EGRESS_N3, limit, logs);
    // n2 kept its previous entries, and none of the new plan: p2 still leaves through n3 for
    // the old destination. The new one is a Drop policy's destination that n2 holds no entry
    // for: p2 must not leave with n2's address there. (The operator published the grown guard
    // to n2 in a generation before the one with p2's new entries, which waited for the gateway
    // to hold them; n2 took that one, so p2 is dropped there as a pod not decided on.)
    assert_eq!(tb.fetch("p2", EXT_A), Ok(EGRESS_N3.to_owned()), "{}", logs());
    let n2_bpf = |what: &str| -> String {
        tb.shim_cli(env!("CARGO_BIN_EXE_sluice-shim"), "n2", &["bpf", what])
            .unwrap()
    };
    let seen = tb.fetch("p2", EXT_B);
    assert!(
        seen.is_err(),
        "p2 -> {EXT_B} left as {seen:?}\n{}\n{}",
        n2_bpf("counters"),
        logs()
    );
    let list = n2_bpf("list");
    assert!(
        list.contains("203.0.113.0/24") && !list.contains("198.51.100.0/24"),
        "{list}"
    );
    assert_eq!(n2_status()["destinations"], 1, "{}", n2_status());
    let refused = plans_refused(&tb, "n2");
    assert!(refused > 0, "{}", logs());
    // Refused once per plan, not again and again while nothing changes.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(plans_refused(&tb, "n2"), refused, "{}", logs());

    // Shrunk back: n2's plan fits again and every node has it.
    write(&policy, &allowlist(&["203.0.113.0/24"]));
    operator.wait_programmed("allowlist", limit, logs, |c| {
        c["status"] == "True" && c["message"] == "3/3 nodes"
    });
    assert_eq!(tb.fetch("p2", EXT_A), Ok(EGRESS_N3.to_owned()), "{}", logs());
    // No longer a guarded destination: the normal path, as n2 holds the plan now.
    wait_seen_from(&tb, "p2", EXT_B, &tb.node_ip("n2"), limit, logs);
    assert_eq!(plans_refused(&tb, "n2"), refused, "{}", logs());
}

#[test]
fn ipv6_traffic_follows_the_operators_choice_and_failover() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let grace = Duration::from_secs(1);
    let (mut tb, dir, tokens) = live_testbed();
    write(&dir.join("cluster.yaml"), &support::dual_stack_cluster());
    // One slot, two candidates (n1, n3), both families; no egress IP: p2 leaves with its
    // gateway's first address of each family (for IPv6 the preferred one: the node's own, not
    // the deprecated egress address beside it).
    write(
        &dir.join("policy.yaml"),
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: one-slot\n\
         spec:\n  selectors:\n    - podSelector:\n        matchLabels: {app: checkout}\n  \
         destinationCIDRs: [203.0.113.0/24, \"fd00:203:0:113::/64\"]\n  egressGateways:\n    - nodeSelector:\n        \
         matchLabels: {sluice.dev/egress: \"true\"}\n  failurePolicy: Drop\n",
    );
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let via_v6 = |tb: &Testbed| tb.fetch("p2", sluice_testbed::EXT_A_V6);
    let gateways = ["n1", "n3"].map(|n| (n, tb.node_ip_v6(n)));
    let mut first = None;
    assert!(
        wait_for(Duration::from_secs(20), || {
            let seen = via_v6(&tb);
            first = gateways
                .iter()
                .find(|(_, ip)| seen.as_ref().is_ok_and(|s| s == ip))
                .map(|(n, _)| *n);
            first.is_some()
        }),
        "p2's IPv6 never left through n1 or n3: {:?}",
        via_v6(&tb)
    );
    let first = first.unwrap();
    // IPv4 beside it, through the same gateway.
    assert_eq!(tb.fetch("p2", EXT_A).unwrap(), tb.node_ip(first));
    // The gateway fails: its IPv6 traffic moves with the slot.
    let second = if first == "n1" { "n3" } else { "n1" };
    tb.kill(&format!("shim-{first}"));
    let moved = wait_for(Duration::from_secs(10), || {
        via_v6(&tb).is_ok_and(|s| s == tb.node_ip_v6(second))
    });
    assert!(moved, "p2's IPv6 never moved to {second}: {:?}", via_v6(&tb));
    println!("IPv6 via {first}, then {second}: {:?}", via_v6(&tb));
    assert_eq!(tb.fetch("p2", EXT_A).unwrap(), tb.node_ip(second));
}

/// The number after `field=` in the last line of `log` that contains `line` (ANSI colours
/// stripped); `None` without such a line.
fn last_logged(log: &str, line: &str, field: &str) -> Option<u64> {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence: up to its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let last = plain.lines().rev().find(|l| l.contains(line))?;
    let value = last.split(&format!("{field}=")).nth(1)?;
    value.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// An upgrade from a shim whose datapath had fewer maps: the new shim finds the old pins without
/// the newest maps (here `sluice_flows_v6` and `sluice_managed_v6` unpinned, as before they
/// existed), and its hello to the operator still reports what the datapath holds (p2's gateway):
/// the session starts only once the datapath is loaded and the missing maps are pinned.
#[test]
fn a_shim_upgraded_over_pins_without_the_newest_maps_reports_what_it_holds() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    write(&dir.join("policy.yaml"), support::POLICY);
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, Duration::from_secs(1)));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let steered = wait_for(Duration::from_secs(30), || {
        tb.fetch("p2", EXT_A)
            .is_ok_and(|s| s == EGRESS_N1 || s == EGRESS_N3)
    });
    assert!(steered, "p2 never left through a gateway");
    let log = |tb: &Testbed| tb.log("shim-n2");
    assert_eq!(
        last_logged(&log(&tb), "hello: what this node", "pods"),
        Some(0),
        "a first start holds nothing"
    );

    tb.kill("shim-n2");
    for map in ["sluice_flows_v6", "sluice_managed_v6"] {
        std::fs::remove_file(tb.bpffs().join("n2").join(map)).expect("unpins the map");
    }
    let hellos = log(&tb).matches("hello: what this node").count();
    start_shim(&mut tb, "n2", &tokens);
    assert!(
        wait_for(Duration::from_secs(20), || log(&tb)
            .matches("hello: what this node")
            .count()
            > hellos),
        "no hello after the restart\n{}",
        log(&tb)
    );
    assert_eq!(
        last_logged(&log(&tb), "hello: what this node", "pods"),
        Some(1),
        "the restarted shim reports p2's gateway\n{}",
        log(&tb)
    );
    assert!(
        tb.bpffs().join("n2").join("sluice_flows_v6").exists(),
        "pinned again"
    );
}
