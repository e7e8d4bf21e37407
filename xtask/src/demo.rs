//! `cargo xtask demo`: a narrated tour of Sluice on the network-namespace testbed.
//!
//! Control plane ([`ControlPlane`]): by default `sluice-operator run --source dir:…` in the
//! underlay router's namespace and one `sluice-shim run --operator http://192.0.2.1:9443` per node
//! ([`Live`]); a killed gateway shim is noticed by the operator through its missing heartbeats.
//! With `--plan-file`, the demo plans with `sluice-operator plan --output json` and hands the plan
//! to one `sluice-shim run --entries FILE` per node ([`PlanFile`]); a failed gateway is then taken
//! out of the manifests with the annotation `sluice.dev/eligible: "false"` and the demo plans
//! again.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_testbed::{EXT_A, EXT_EXCLUDED, FileCluster, Testbed};

/// The external host's address in the narration.
const PROVIDER: &str = EXT_A;

fn step(n: u32, title: &str) {
    println!("\n{}\n", bold(&format!("── Step {n}: {title}")));
}

/// `text` in bold on a terminal.
pub fn bold(text: &str) -> String {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        format!("\x1b[1m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

fn say(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

fn show(output: &str) {
    for line in output.trim_end().lines() {
        println!("    │ {line}");
    }
}

/// How the shims get their entries.
trait ControlPlane {
    /// The cluster, with one shim per node running.
    fn testbed(&self) -> &Testbed;
    fn testbed_mut(&mut self) -> &mut Testbed;
    /// Starts planning from the manifests in `dir` (which hold the policy now) and waits until
    /// the shims follow the plan.
    fn program(&mut self, dir: &Path) -> Result<()>;
    /// After `node`'s shim died: whatever makes the control plane move its pods elsewhere.
    fn gateway_failed(&mut self, node: &str, dir: &Path) -> Result<()>;
    /// Whether the control plane reacts to a failure at once (a stand-in), rather than after a
    /// detection delay.
    fn reacts_at_once(&self) -> bool {
        false
    }
    /// SIGKILLs `node`'s shim.
    fn kill_shim(&mut self, node: &str) {
        self.testbed_mut().kill(&format!("shim-{node}"));
    }
}

/// Where the operator's node channel listens: the underlay router's address.
const GRPC: &str = "192.0.2.1:9443";

/// `sluice-operator run --source dir:…` and `sluice-shim run --operator …`.
struct Live {
    testbed: Testbed,
}

impl Live {
    /// Starts the operator on the manifests in `dir` and the shims, each shim with its own token.
    fn start(operator: &Path, shim: &Path, examples: &Path) -> Result<Live> {
        let mut tb = Testbed::new()?;
        let dir = manifests_dir(&tb, examples)?;
        let tokens = tb.scratch().join("tokens");
        std::fs::create_dir_all(&tokens)?;
        let mut table = String::new();
        for (node, _) in sluice_testbed::NODES {
            std::fs::write(tokens.join(node), format!("demo-token-of-{node}\n"))?;
            table.push_str(&format!("demo-token-of-{node} {node}\n"));
        }
        std::fs::write(tokens.join("table"), table)?;
        let mut cmd = tb.command("ul", operator);
        cmd.arg("run")
            .arg(format!("--source=dir:{}", dir.display()))
            .args([
                "--grpc-listen",
                GRPC,
                "--metrics-listen",
                "off",
                "--heartbeat-grace",
                "1s",
            ])
            .args(["--poll", "100ms", "--tokens-file"])
            .arg(tokens.join("table"));
        tb.spawn("operator", cmd)?;
        for (node, _) in sluice_testbed::NODES {
            let mut cmd = tb.shim_command(node, shim);
            cmd.args(["--operator", &format!("http://{GRPC}"), "--token-file"])
                .arg(tokens.join(node))
                .args(["--interval-ms", "100"]);
            tb.spawn(&format!("shim-{node}"), cmd)?;
        }
        // Every shim has loaded its datapath once its pinned links show up.
        let up = sluice_testbed::wait_for(Duration::from_secs(20), || {
            ["n1", "n2", "n3"]
                .iter()
                .all(|n| tb.bpffs().join(n).join("links").is_dir())
        });
        if !up {
            bail!("the shims did not start:\n{}", tb.log("shim-n2"));
        }
        // And every shim is the operator's: it applied a plan of it (empty, no policy yet). A
        // policy that appeared before would find only some gateways, and its pods would stay
        // where they were first placed (no planned change moves a pod off a gateway that serves).
        let connected = sluice_testbed::wait_for(Duration::from_secs(20), || {
            ["n1", "n2", "n3"]
                .iter()
                .all(|n| tb.log(&format!("shim-{n}")).contains("plan applied"))
        });
        if !connected {
            bail!(
                "the shims did not get a plan from the operator in 20 s\noperator log:\n{}",
                tb.log("operator")
            );
        }
        Ok(Live { testbed: tb })
    }
}

impl ControlPlane for Live {
    fn testbed(&self) -> &Testbed {
        &self.testbed
    }

    fn testbed_mut(&mut self) -> &mut Testbed {
        &mut self.testbed
    }

    fn program(&mut self, _dir: &Path) -> Result<()> {
        // The operator re-reads the directory by itself; wait until both checkout pods leave
        // through a gateway.
        let tb = &self.testbed;
        let steered = |pod| {
            tb.fetch(pod, PROVIDER)
                .is_ok_and(|s| s == sluice_testbed::EGRESS_N1 || s == sluice_testbed::EGRESS_N3)
        };
        if !sluice_testbed::wait_for(Duration::from_secs(20), || steered("p2") && steered("p1")) {
            bail!(
                "the operator's plan did not reach the shims in 20 s\noperator log:\n{}\nn2's shim log:\n{}",
                tb.log("operator"),
                tb.log("shim-n2")
            );
        }
        Ok(())
    }

    fn gateway_failed(&mut self, node: &str, _dir: &Path) -> Result<()> {
        say(&format!(
            "The operator expects a heartbeat from every shim; {node}'s stops. After the grace\n\
             period (--heartbeat-grace 1s) it takes {node} out of the gateways, plans again and\n\
             sends n2 its new entries."
        ));
        Ok(())
    }
}

/// The directory of manifests the control plane reads, starting with the cluster's objects only
/// (the policy comes later; a copy, since the failover step may edit it).
fn manifests_dir(tb: &Testbed, examples: &Path) -> Result<PathBuf> {
    let dir = tb.scratch().join("manifests");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(examples.join("cluster.yaml"), dir.join("cluster.yaml"))
        .with_context(|| format!("copying cluster.yaml from {}", examples.display()))?;
    Ok(dir)
}

/// `sluice-shim --bpffs-dir <node's> ARGS` inside `node`.
fn shim_cli(tb: &Testbed, shim: &Path, node: &str, args: &[&str]) -> Result<String> {
    let dir = tb.bpffs().join(node);
    let mut full = vec!["--bpffs-dir", dir.to_str().context("bpffs path")?];
    full.extend_from_slice(args);
    tb.run(node, shim, &full)
}

/// `sluice-operator plan --output json` → plan file → `sluice-shim run --entries FILE`.
struct PlanFile {
    cluster: FileCluster,
    operator: PathBuf,
    alive: Vec<&'static str>,
}

impl PlanFile {
    fn start(operator: &Path, shim: &Path, examples: &Path) -> Result<PlanFile> {
        let cluster = FileCluster::start(shim, &[])?;
        manifests_dir(&cluster, examples)?;
        Ok(PlanFile {
            cluster,
            operator: operator.to_owned(),
            alive: vec!["n1", "n2", "n3"],
        })
    }
}

impl ControlPlane for PlanFile {
    fn testbed(&self) -> &Testbed {
        &self.cluster
    }

    fn testbed_mut(&mut self) -> &mut Testbed {
        &mut self.cluster
    }

    fn program(&mut self, dir: &Path) -> Result<()> {
        let plan = operator_plan(&self.operator, dir, "json")?;
        self.cluster
            .try_apply_plan_on(plan.as_bytes(), &self.alive, Duration::from_secs(20))
    }

    fn reacts_at_once(&self) -> bool {
        true
    }

    fn gateway_failed(&mut self, node: &str, dir: &Path) -> Result<()> {
        self.alive.retain(|n| *n != node);
        say(&format!(
            "This demo's stand-in for the operator's health check: it marks {node} with the\n\
             annotation sluice.dev/eligible: \"false\" and plans again."
        ));
        mark_ineligible(&dir.join("cluster.yaml"), node)?;
        self.program(dir)
    }
}

/// `sluice-operator plan --manifests DIR --output OUTPUT`.
fn operator_plan(operator: &Path, dir: &Path, output: &str) -> Result<String> {
    let out = std::process::Command::new(operator)
        .args(["plan", "--output", output, "--manifests"])
        .arg(dir)
        .output()
        .context("running sluice-operator plan")?;
    if !out.status.success() {
        bail!(
            "sluice-operator plan failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Adds `sluice.dev/eligible: "false"` to the Node `node` in the manifest file `path`.
fn mark_ineligible(path: &Path, node: &str) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut docs: Vec<serde_yaml::Value> = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        docs.push(serde::Deserialize::deserialize(doc)?);
    }
    let mut found = false;
    for doc in &mut docs {
        if doc["kind"] == "Node" && doc["metadata"]["name"] == node {
            let meta = doc["metadata"].as_mapping_mut().context("Node metadata")?;
            let annotations = meta
                .entry("annotations".into())
                .or_insert_with(|| serde_yaml::Mapping::new().into());
            annotations
                .as_mapping_mut()
                .context("annotations")?
                .insert("sluice.dev/eligible".into(), "false".into());
            found = true;
        }
    }
    if !found {
        bail!("no Node {node} in {}", path.display());
    }
    let out: Vec<String> = docs.iter().map(serde_yaml::to_string).collect::<Result<_, _>>()?;
    std::fs::write(path, out.join("---\n"))?;
    Ok(())
}

/// Blocks Ctrl-C (and SIGTERM, SIGHUP) in every thread but one, which cleans the testbed up and
/// exits. Must run before any other thread starts (they inherit the blocked mask; child processes
/// get a clean one from `std::process`).
fn clean_up_on_signals() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("\n{sig}: stopping the demo and removing its namespaces...");
            sluice_testbed::remove_leftovers();
            eprintln!("cleaned up.");
            std::process::exit(130);
        }
    });
    Ok(())
}

/// One connection from `pod` to `dst`, narrated: which source address the external host saw.
fn try_it(c: &Testbed, pod: &str, who: &str, dst: &str, expect: &str, meaning: &str) -> Result<()> {
    let seen = c
        .fetch(pod, dst)
        .map_err(|e| anyhow::anyhow!("{who} → {dst}: {e}"))?;
    let ok = if seen == expect { "✔" } else { "✘ unexpected" };
    println!("    {who} → {dst}:8080   the external host saw {seen}   {ok} {meaning}");
    if seen != expect {
        bail!("{who} → {dst}: expected the external host to see {expect}, it saw {seen}");
    }
    Ok(())
}

pub fn run(operator: &Path, shim: &Path, examples: &Path, plan_file: bool) -> Result<()> {
    clean_up_on_signals()?;
    let total = Instant::now();

    step(2, "Build a small cluster out of network namespaces");
    say(
        "Three \"nodes\" (n1, n2, n3) on one underlay network 192.0.2.0/24, three \"pods\" and an\n\
         \"external host\" (a server on the internet, here 203.0.113.10) — all network namespaces on\n\
         this machine, named slc-<pid>-*. Nothing leaves the machine.\n\
         \n\
         \x20 external host 203.0.113.10 (answers each connection with the source address it sees)\n\
         \x20        |\n\
         \x20 underlay router 192.0.2.1\n\
         \x20   |                         |                           |\n\
         \x20 n1 192.0.2.11             n2 192.0.2.12               n3 192.0.2.13\n\
         \x20 egress IP 192.0.2.101                                 egress IP 192.0.2.103\n\
         \x20 pod checkout-1            pods checkout-2 10.244.2.10\n\
         \x20     10.244.1.10                web-1      10.244.2.11\n\
         \n\
         A stand-in CNI routes between the nodes and masquerades pods' outside traffic to their\n\
         node's IP, as most CNIs do. Then one sluice-shim starts on each node: it loads Sluice's\n\
         eBPF programs onto the pods' interfaces, with nothing programmed yet.",
    );
    let started = Instant::now();
    let mut cp: Box<dyn ControlPlane> = if plan_file {
        say("\n(--plan-file: the shims read a plan file written with `sluice-operator plan`.)");
        Box::new(PlanFile::start(operator, shim, examples)?)
    } else {
        say(&format!(
            "\nThe operator runs in the underlay router's namespace ({GRPC}), reading the cluster's\n\
             objects from a directory instead of a Kubernetes API; each shim connects to it."
        ));
        Box::new(Live::start(operator, shim, examples)?)
    };
    println!(
        "\n    cluster up and 3 shims running in {:.1?}",
        started.elapsed()
    );

    let dir = cp.testbed().scratch().join("manifests");

    step(3, "Without a policy, pods leave with their node's IP");
    let node2 = cp.testbed().node_ip("n2");
    try_it(
        cp.testbed(),
        "p2",
        "checkout-2",
        PROVIDER,
        &node2,
        "(n2's own IP)",
    )?;
    say(
        "\nThis is the problem Sluice solves: the payment provider would have to allow every\n\
         node of the cluster, and could not tell checkout traffic from anything else.",
    );

    step(4, "The policy, and what the operator plans for it");
    say("examples/demo/policy.yaml:\n");
    show(&std::fs::read_to_string(examples.join("policy.yaml"))?);
    say(
        "\n`sluice-operator plan` turns the policies, nodes and pods into entries for each node:\n\
         on the pod's node \"send (pod, destination) to this gateway\", on the gateway \"let it out\n\
         with this egress IP\". Each checkout pod gets one of the two gateways:\n",
    );
    show(&operator_plan(operator, examples, "table")?);

    step(5, "The shims program their node's entries into the eBPF maps");
    std::fs::copy(examples.join("policy.yaml"), dir.join("policy.yaml"))?;
    let started = Instant::now();
    cp.program(&dir)?;
    println!("    plan programmed by the shims in {:.1?}\n", started.elapsed());
    say("`sluice-shim bpf list` on n2 (checkout-2's node) — the live eBPF map:\n");
    show(&shim_cli(cp.testbed(), shim, "n2", &["bpf", "list"])?);
    say("\nand on n1, the gateway that lets checkout-2's traffic out:\n");
    show(&shim_cli(cp.testbed(), shim, "n1", &["bpf", "list"])?);

    step(6, "The same requests again");
    let c = cp.testbed();
    try_it(
        c,
        "p2",
        "checkout-2",
        PROVIDER,
        sluice_testbed::EGRESS_N1,
        "egress IP of gateway n1",
    )?;
    try_it(
        c,
        "p1",
        "checkout-1",
        PROVIDER,
        sluice_testbed::EGRESS_N3,
        "egress IP of gateway n3",
    )?;
    try_it(c, "p3", "web-1     ", PROVIDER, &node2, "not selected: node IP")?;
    try_it(
        c,
        "p2",
        "checkout-2",
        EXT_EXCLUDED,
        &node2,
        "excluded destination: node IP",
    )?;
    say(
        "\nOn n2, Sluice's eBPF program saw checkout-2's packet to 203.0.113.10, found the entry,\n\
         and wrapped it in a VXLAN tunnel to n1. On n1 it was unwrapped and SNATed to the egress\n\
         IP; the reply went back through the tunnel to the pod. The counters on n2:\n",
    );
    let counters = shim_cli(c, shim, "n2", &["bpf", "counters"])?;
    show(
        &counters
            .lines()
            .filter(|l| {
                let first = l.split_whitespace().next().unwrap_or_default();
                first == "Outcome"
                    || (["steered", "reply_delivered", "excluded"].contains(&first)
                        && l.split_whitespace().nth(1).is_some_and(|n| n != "0"))
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );

    step(7, "A gateway fails");
    say(
        "checkout-2 now opens a new connection every ~10 ms. We SIGKILL the shim of its gateway,\n\
         n1. (The eBPF datapath itself keeps running without its shim — that is what lets shims be\n\
         upgraded without breaking connections — so traffic keeps flowing while the control plane\n\
         reacts.)\n",
    );
    let stream = cp
        .testbed()
        .stream_with_timeout("p2", PROVIDER, Duration::from_millis(500));
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    cp.kill_shim("n1");
    println!("    killed n1's shim");
    cp.gateway_failed("n1", &dir)?;
    // Let the stream show the new path for a moment.
    let switched = sluice_testbed::wait_for(Duration::from_secs(10), || {
        cp.testbed()
            .fetch("p2", PROVIDER)
            .is_ok_and(|s| s == sluice_testbed::EGRESS_N3)
    });
    std::thread::sleep(Duration::from_millis(1000));
    let results = stream.stop_timed();
    if !switched {
        bail!("checkout-2's traffic did not move to n3 within 10 s");
    }
    let first_new = results
        .iter()
        .find(|(at, r)| *at >= killed && r.as_deref() == Ok(sluice_testbed::EGRESS_N3))
        .map(|(at, _)| at.duration_since(killed));
    let failed = results
        .iter()
        .filter(|(at, r)| *at >= killed && r.is_err())
        .count();
    let by_n1 = results
        .iter()
        .filter(|(at, r)| *at >= killed && r.as_deref() == Ok(sluice_testbed::EGRESS_N1))
        .count();
    println!();
    say(&format!(
        "{} new connections from checkout-2 after the kill: {by_n1} still left through n1 (its\n\
         datapath works without the shim) until the new plan reached n2, then through n3;\n\
         {failed} failed. (A connection open at the very moment of the switch breaks: its NAT\n\
         state lives on n1. With any egress gateway, a connection does not survive a change of\n\
         gateway; new connections simply take the new one.)",
        results.iter().filter(|(at, _)| *at >= killed).count()
    ));
    if let Some(t) = first_new {
        say(&format!(
            "\nFrom killing n1's shim to the first connection leaving with n3's egress IP: {t:.1?}."
        ));
        if cp.reacts_at_once() {
            say(
                "(Here the stand-in reacts at once; the operator first waits for the shim's\n\
                 heartbeat to be missing for its grace period, 1 s by default.)",
            );
        } else {
            say("(Mostly the operator's heartbeat grace period, 1 s.)");
        }
    }
    say("\n`sluice-shim bpf list` on n2 now:\n");
    show(&shim_cli(cp.testbed(), shim, "n2", &["bpf", "list"])?);
    try_it(
        cp.testbed(),
        "p2",
        "checkout-2",
        PROVIDER,
        sluice_testbed::EGRESS_N3,
        "egress IP of gateway n3",
    )?;

    step(8, "Clean up");
    drop(cp);
    say(&format!(
        "All namespaces and processes removed. The demo took {:.0?}.\n\
         \n\
         Next: docs/datapath.md (the packet path), `cargo xtask test` (the test suite).",
        total.elapsed()
    ));
    Ok(())
}
