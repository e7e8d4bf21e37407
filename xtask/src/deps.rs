//! Making sure the tools the build and the tests need are on the machine, installing them from
//! Debian's packages when we are root.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// A command the project needs, and the Debian package that provides it.
pub struct Tool {
    pub command: &'static str,
    pub package: &'static str,
    pub why: &'static str,
}

/// What building and testing the datapath needs.
pub const DATAPATH: &[Tool] = &[
    Tool {
        command: "clang",
        package: "clang",
        why: "compiles the eBPF programs",
    },
    Tool {
        command: "llvm-strip",
        package: "llvm",
        why: "eBPF object tooling",
    },
    Tool {
        command: "ip",
        package: "iproute2",
        why: "network namespaces for the datapath tests",
    },
    Tool {
        command: "nft",
        package: "nftables",
        why: "SNAT rules on gateways",
    },
    Tool {
        command: "setpriv",
        package: "util-linux",
        why: "runs a test without privileges",
    },
];

/// What `cargo xtask bench-datapath` needs on top of [`DATAPATH`].
pub const BENCH: &[Tool] = &[
    Tool {
        command: "iperf3",
        package: "iperf3",
        why: "measures throughput in the benchmark",
    },
    Tool {
        command: "iptables",
        package: "iptables",
        why: "the iptables variant of the benchmark",
    },
    Tool {
        command: "ipset",
        package: "ipset",
        why: "the iptables variant of the benchmark",
    },
    Tool {
        command: "ss",
        package: "iproute2",
        why: "waits for the benchmark's servers",
    },
];

/// The headers the eBPF programs include.
const HEADERS: &[(&str, &str)] = &[("/usr/include/bpf/bpf_helpers.h", "libbpf-dev")];

pub fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Installs whatever of `tools` is missing, or says exactly what to install.
pub fn ensure(tools: &[Tool]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|t| !have(t.command))
        .map(|t| t.package)
        .collect();
    missing.extend(
        HEADERS
            .iter()
            .filter(|(path, _)| !std::path::Path::new(path).exists())
            .map(|(_, p)| *p),
    );
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        let why: Vec<String> = tools
            .iter()
            .filter(|t| missing.contains(&t.package))
            .map(|t| format!("{} ({})", t.package, t.why))
            .collect();
        bail!(
            "missing packages: {}. Install them with: sudo apt-get install -y {}",
            why.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}
