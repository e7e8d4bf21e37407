//! Operator handovers under traffic, in network namespaces (needs root). Two `sluice-operator run`
//! processes (`dir:` source) share a lease file and the node channel's address in the underlay
//! namespace; one shim per node; pod p2 opens a new connection through its gateway every 50 ms.
//! SIGTERM the leader: the standby takes over. Start a new standby, SIGKILL the leader: the
//! standby takes over. Then stop the last operator: with no operator at all, the pinned datapath
//! keeps forwarding. Takeover times are asserted (< 2 s after the signal), and every connection
//! must succeed and leave with the egress IP it had before.
//!
//! The operator processes are this test binary started again (see [`operator_main`]): the
//! `sluice-operator` binary is not built for this package's tests, and a copy found in the target
//! directory could be stale.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use sluice_testbed::{
    EGRESS_N1, EGRESS_N3, EXT_A, NODES, SERVER_PORT, Testbed, enter_netns, in_netns, wait_for,
};

const CLUSTER: &str = include_str!("../../examples/demo/cluster.yaml");
const BOTH: &str = include_str!("../../examples/demo/policy.yaml");
const GRPC: &str = "192.0.2.1:9443";
/// Set in the environment of the operator processes: their `sluice-operator` arguments, one per
/// line.
const OPERATOR_ARGS: &str = "SLUICE_HANDOVER_E2E_OPERATOR_ARGS";
const TEST: &str = "operators_hand_over_under_traffic_and_the_datapath_outlives_them";

/// Runs `sluice-operator` with the arguments in [`OPERATOR_ARGS`] and exits as its `main` would:
/// the test binary, started again by the test with that variable set, is the operator process.
fn operator_main(args: &str) -> ! {
    use clap::Parser;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    let cli = sluice_operator::cli::Cli::parse_from(std::iter::once("sluice-operator").chain(args.lines()));
    match sluice_operator::cli::run(cli) {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The demo's policy with a single gateway.
fn only_gateway(node: &str, egress: &str) -> String {
    BOTH.split("  egressGateways:").next().unwrap().to_owned()
        + &format!(
            "  egressGateways:\n    - nodeSelector:\n        matchLabels: {{kubernetes.io/hostname: {node}}}\n      \
             egressIP: {egress}\n  failurePolicy: Drop\n"
        )
}

struct Setup {
    dir: PathBuf,
    tokens: PathBuf,
    lease: PathBuf,
}

/// Starts an operator process named `name` in the underlay namespace; its `/readyz` is on
/// `127.0.0.1:<metrics_port>` there (200 only while it holds the lease file).
fn start_operator(tb: &mut Testbed, setup: &Setup, name: &str, metrics_port: u16) {
    let args = [
        "run".to_owned(),
        format!("--source=dir:{}", setup.dir.display()),
        format!("--lease-file={}", setup.lease.display()),
        format!("--grpc-listen={GRPC}"),
        format!("--metrics-listen=127.0.0.1:{metrics_port}"),
        "--heartbeat-grace=1s".to_owned(),
        "--poll=100ms".to_owned(),
        format!("--tokens-file={}", setup.tokens.join("table").display()),
    ]
    .join("\n");
    let mut cmd = tb.command("ul", std::env::current_exe().unwrap());
    cmd.args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(OPERATOR_ARGS, args);
    tb.spawn(name, cmd).unwrap();
}

/// `GET path` from the operator whose metrics are on `port`: status code and body, or `None`
/// while nothing answers.
fn get(tb: &Testbed, port: u16, path: &str) -> Option<(u16, String)> {
    in_netns(&tb.ns("ul"), || {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, response))
    })
}

/// The status code of the operator's `/readyz` on `port`.
fn readyz(tb: &Testbed, port: u16) -> Option<u16> {
    get(tb, port, "/readyz").map(|(code, _)| code)
}

/// Shims in session with the operator on `port`.
fn connected_shims(tb: &Testbed, port: u16) -> Option<u64> {
    let (_, body) = get(tb, port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("sluice_connected_shims "))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until all three shims are in session with the operator on `port`.
fn wait_sessions(tb: &Testbed, name: &str, port: u16, since: Instant) -> Duration {
    let ok = wait_for(Duration::from_secs(15), || connected_shims(tb, port) == Some(3));
    assert!(
        ok,
        "the shims did not all reconnect to {name} ({:?})\n{}",
        connected_shims(tb, port),
        tb.log(name)
    );
    since.elapsed()
}

/// Waits until the operator on `port` answers `code`; how long that took from `since`.
fn wait_readyz(
    tb: &Testbed,
    name: &str,
    port: u16,
    code: u16,
    since: Instant,
    timeout: Duration,
) -> Duration {
    let ok = wait_for(timeout, || readyz(tb, port) == Some(code));
    assert!(ok, "{name} never answered {code} on /readyz\n{}", tb.log(name));
    since.elapsed()
}

fn start_shim(tb: &mut Testbed, node: &str, tokens: &Path) {
    tb.start_operator_shim(node, env!("CARGO_BIN_EXE_sluice-shim"), GRPC, tokens)
        .unwrap();
}

/// One connection of the probe: when it started, and the source address the external host saw.
type Probe = (Instant, Result<String, String>);

/// Opens a new connection from namespace `ns` to the external host every 50 ms, each on its own
/// thread (one caught by a broken path waits for its timeout without delaying the next), until
/// `stop` is set.
fn probe(ns: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Probe>> {
    std::thread::spawn(move || {
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let (ns, tx) = (ns.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter_netns(&ns);
                let started = Instant::now();
                let addr: SocketAddr = format!("{EXT_A}:{SERVER_PORT}").parse().unwrap();
                let greeting = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let mut line = String::new();
                        BufReader::new(s).read_line(&mut line)?;
                        Ok(line.trim().to_owned())
                    })
                    .map_err(|e| e.to_string())
                    .and_then(|g| {
                        if g.is_empty() {
                            Err("closed without a greeting".to_owned())
                        } else {
                            Ok(g)
                        }
                    });
                let _ = tx.send((started, greeting));
            }));
            std::thread::sleep(Duration::from_millis(50));
        }
        for t in threads {
            let _ = t.join();
        }
        drop(tx);
        let mut probes: Vec<Probe> = rx.iter().collect();
        probes.sort_by_key(|(at, _)| *at);
        probes
    })
}

/// (connections, failed, left with another egress IP than `egress`) among `probes` started in
/// `[from, to)`, and the first few bad ones.
fn tally(probes: &[Probe], egress: &str, from: Instant, to: Instant) -> (usize, usize, usize, Vec<String>) {
    let (mut total, mut failed, mut moved, mut bad) = (0, 0, 0, Vec::new());
    for (at, outcome) in probes.iter().filter(|(at, _)| (from..to).contains(at)) {
        total += 1;
        let t = at.duration_since(from);
        match outcome {
            Err(e) => {
                failed += 1;
                bad.push(format!("+{t:?}: {e}"));
            }
            Ok(seen) if seen != egress => {
                moved += 1;
                bad.push(format!("+{t:?}: left with {seen}"));
            }
            Ok(_) => {}
        }
    }
    bad.truncate(10);
    (total, failed, moved, bad)
}

#[test]
fn operators_hand_over_under_traffic_and_the_datapath_outlives_them() {
    if let Ok(args) = std::env::var(OPERATOR_ARGS) {
        operator_main(&args);
    }
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP handover_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let mut tb = Testbed::new().expect("builds the testbed");
    let setup = Setup {
        dir: tb.scratch().join("manifests"),
        tokens: tb.scratch().join("tokens"),
        lease: tb.scratch().join("operator.lease"),
    };
    fs::create_dir_all(&setup.dir).unwrap();
    fs::create_dir_all(&setup.tokens).unwrap();
    let mut table = String::new();
    for (node, _) in NODES {
        fs::write(setup.tokens.join(node), format!("token-of-{node}\n")).unwrap();
        table.push_str(&format!("token-of-{node} {node}\n"));
    }
    fs::write(setup.tokens.join("table"), table).unwrap();
    fs::write(setup.dir.join("cluster.yaml"), CLUSTER).unwrap();
    fs::write(setup.dir.join("policy.yaml"), BOTH).unwrap();

    let (a, b, c) = ("operator-a", "operator-b", "operator-c");
    let ports = [(a, 9101), (b, 9102), (c, 9103)];
    let port = |name: &str| ports.iter().find(|(n, _)| *n == name).unwrap().1;
    let started = Instant::now();
    start_operator(&mut tb, &setup, a, port(a));
    wait_readyz(&tb, a, port(a), 200, started, Duration::from_secs(30));
    start_operator(&mut tb, &setup, b, port(b));
    wait_readyz(&tb, b, port(b), 503, started, Duration::from_secs(30));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &setup.tokens);
    }
    // p2 (on n2) leaves through one of the two gateways, and keeps to it.
    let mut egress = String::new();
    let up = wait_for(Duration::from_secs(30), || {
        tb.fetch("p2", EXT_A).is_ok_and(|seen| {
            egress = seen;
            egress == EGRESS_N1 || egress == EGRESS_N3
        })
    });
    assert!(
        up,
        "p2 never left through a gateway (last {egress:?})\n{}",
        tb.log("shim-n2")
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        tb.fetch("p2", EXT_A).unwrap(),
        egress,
        "p2's gateway changed while nothing happened"
    );
    assert_eq!(
        (readyz(&tb, port(a)), readyz(&tb, port(b))),
        (Some(200), Some(503))
    );

    let stop = Arc::new(AtomicBool::new(false));
    let probes = probe(tb.ns("p2"), stop.clone());
    let probing = Instant::now();
    std::thread::sleep(Duration::from_secs(1));

    // A graceful stop: the leader closes the node channel and releases the lease file.
    let pid = |tb: &Testbed, name: &str| -> nix::unistd::Pid {
        let holder = fs::read_to_string(&setup.lease).unwrap();
        nix::unistd::Pid::from_raw(
            holder
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name} holds the lease: {holder:?}\n{}", tb.log(name))),
        )
    };
    let terminated = Instant::now();
    nix::sys::signal::kill(pid(&tb, a), nix::sys::signal::Signal::SIGTERM).unwrap();
    let graceful = wait_readyz(&tb, b, port(b), 200, terminated, Duration::from_secs(10));
    let graceful_sessions = wait_sessions(&tb, b, port(b), terminated);
    assert!(
        wait_for(Duration::from_secs(5), || !tb.is_running(a)),
        "{a} did not exit on SIGTERM\n{}",
        tb.log(a)
    );
    std::thread::sleep(Duration::from_secs(3));

    // A crash: the kernel releases the lock as the leader dies.
    start_operator(&mut tb, &setup, c, port(c));
    wait_readyz(&tb, c, port(c), 503, Instant::now(), Duration::from_secs(30));
    let killed = Instant::now();
    nix::sys::signal::kill(pid(&tb, b), nix::sys::signal::Signal::SIGKILL).unwrap();
    let crash = wait_readyz(&tb, c, port(c), 200, killed, Duration::from_secs(10));
    let crash_sessions = wait_sessions(&tb, c, port(c), killed);
    std::thread::sleep(Duration::from_secs(3));
    let handovers_done = Instant::now();

    // The last leader programs: an edit moves p2 to the other gateway.
    let other = if egress == EGRESS_N1 {
        (EGRESS_N3, "n3")
    } else {
        (EGRESS_N1, "n1")
    };
    fs::write(setup.dir.join("policy.yaml"), only_gateway(other.1, other.0)).unwrap();
    let moved_by_edit = wait_for(Duration::from_secs(10), || {
        tb.fetch("p2", EXT_A).is_ok_and(|seen| seen == other.0)
    });
    assert!(
        moved_by_edit,
        "the new leader did not program the edit\n{}",
        tb.log(c)
    );
    std::thread::sleep(Duration::from_secs(1));

    // No operator at all: the shims keep their datapath.
    let alone = Instant::now();
    tb.terminate(c, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    let end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let probes = probes.join().unwrap();

    let (total, failed, moved, bad) = tally(&probes, &egress, probing, handovers_done);
    let (alone_total, alone_failed, alone_moved, alone_bad) = tally(&probes, other.0, alone, end);
    println!(
        "HANDOVER graceful: standby leads {graceful:?} after SIGTERM, all shims in session after \
         {graceful_sessions:?}; killed: standby leads {crash:?} after SIGKILL, all shims in session after \
         {crash_sessions:?}; {total} connections via {egress} through both: {failed} failed, {moved} moved; \
         with no operator for 3 s: {alone_total} connections via {}, {alone_failed} failed, {alone_moved} moved",
        other.0
    );
    let logs = || -> String {
        [a, b, c, "shim-n1", "shim-n2", "shim-n3"]
            .iter()
            .map(|n| format!("--- {n}\n{}", tb.log(n)))
            .collect()
    };
    assert!(
        graceful < Duration::from_secs(2),
        "graceful takeover took {graceful:?}\n{}",
        logs()
    );
    assert!(
        crash < Duration::from_secs(2),
        "takeover after SIGKILL took {crash:?}\n{}",
        logs()
    );
    assert!(
        alone_total >= 30 && alone_failed == 0 && alone_moved == 0,
        "without an operator: {alone_total} connections, {alone_failed} failed, {alone_moved} moved: {alone_bad:?}\n{}",
        logs()
    );
    assert!(
        total >= 100 && failed == 0 && moved == 0,
        "through the handovers: {total} connections, {failed} failed, {moved} moved: {bad:?}\n{}",
        logs()
    );
}
