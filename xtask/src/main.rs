//! Developer tasks: `cargo xtask <command>`.
mod deps;

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
    run_step("lint", "cargo", &["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"])?;
    if deps::have("cargo-nextest") {
        run_step("tests", "cargo", &["nextest", "run", "--workspace", "--locked", "--no-fail-fast"])
    } else {
        run_step("tests", "cargo", &["test", "--workspace", "--locked", "--no-fail-fast"])
    }
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
