//! The Helm chart starts `sluice-shim run` with flags and environment variables that exist:
//! renaming one without updating `charts/sluice/templates/shim-daemonset.yaml` fails here. And
//! the shim does what the chart's probes rely on.

use std::process::Command;

fn template() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/sluice/templates/shim-daemonset.yaml");
    std::fs::read_to_string(path).unwrap()
}

fn help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-shim"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_chart_passes_only_flags_and_variables_that_run_has() {
    let template = template();
    let help = help();
    let flags: Vec<&str> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|f| f.split(['=', ' ']).next().unwrap())
        .collect();
    assert!(flags.len() >= 3, "{flags:?}");
    let known: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '\t']).next().unwrap())
        .collect();
    for flag in &flags {
        assert!(
            known.contains(flag),
            "the chart passes --{flag}, which `sluice-shim run` does not have"
        );
    }
    // Variables the chart sets; SLUICE_PROC_SYS_DIR is read by the datapath code, not a flag.
    let vars: Vec<&str> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|v| v.starts_with("SLUICE_") && *v != "SLUICE_PROC_SYS_DIR")
        .collect();
    assert!(vars.len() >= 8, "{vars:?}");
    for var in &vars {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "the chart sets {var}, which `sluice-shim run` does not read"
        );
    }
}

#[test]
fn the_sysctl_directory_variable_is_the_one_the_datapath_reads() {
    let source = include_str!("../src/netdev.rs");
    assert!(source.contains("\"SLUICE_PROC_SYS_DIR\""));
    assert!(template().contains("- name: SLUICE_PROC_SYS_DIR\n              value: /host/proc/sys\n"));
}

#[test]
fn the_uninstall_hook_runs_a_subcommand_and_variables_that_exist() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice/templates/uninstall.yaml");
    let template = std::fs::read_to_string(path).unwrap();
    assert!(
        template.contains("          args: [uninstall]\n"),
        "the uninstall hook no longer runs `sluice-shim uninstall`"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-shim"))
        .args(["uninstall", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let vars: Vec<&str> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|v| v.starts_with("SLUICE_"))
        .collect();
    // The bpffs directory, the tunnel device and the sysctls: what it removes and puts back must
    // be where the shim put it.
    assert_eq!(
        vars,
        ["SLUICE_BPFFS_DIR", "SLUICE_TUNNEL_DEVICE", "SLUICE_PROC_SYS_DIR"]
    );
    assert!(template.contains("- name: SLUICE_PROC_SYS_DIR\n              value: /host/proc/sys\n"));
    for var in vars.iter().filter(|v| **v != "SLUICE_PROC_SYS_DIR") {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "the uninstall hook sets {var}, which `sluice-shim uninstall` does not read"
        );
    }
}

/// The readiness probe passes once the status file exists (`test -s`), and the file lives on a
/// volume that outlasts a container restart within the pod: a restarted shim must not look Ready
/// before it applied a plan.
#[test]
fn a_status_file_from_an_earlier_run_is_gone_before_the_shim_does_anything() {
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("sluice-status.json");
    std::fs::write(&status, r#"{"plan":"0123456789abcdef","problems":[]}"#).unwrap();
    // Not a bpffs: the shim stops at its first step, loading the datapath (root or not).
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-shim"))
        .arg("--bpffs-dir")
        .arg(dir.path().join("pins"))
        .args(["run", "--node", "n1", "--node-ip", "192.0.2.11"])
        .arg("--entries")
        .arg(dir.path().join("plan.json"))
        .arg("--status-file")
        .arg(&status)
        .env("SLUICE_METRICS_ADDR", "off")
        .env_remove("SLUICE_OPERATOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!status.exists(), "the old status file is still there\n{stderr}");
    assert!(!dir.path().join("pins").exists(), "it loaded nothing\n{stderr}");
}
