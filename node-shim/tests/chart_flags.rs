//! The Helm chart starts `sluice-shim run` with flags and environment variables that exist:
//! renaming one without updating `charts/sluice/templates/shim-daemonset.yaml` fails here.

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
    // The bpffs directory and the tunnel device: what it removes must be where the shim put it.
    assert_eq!(vars, ["SLUICE_BPFFS_DIR", "SLUICE_TUNNEL_DEVICE"]);
    for var in &vars {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "the uninstall hook sets {var}, which `sluice-shim uninstall` does not read"
        );
    }
}
