//! The Helm chart starts `sluice-operator run` with flags that exist: renaming a flag without
//! updating `charts/sluice/templates/operator-deployment.yaml` fails here.

use std::process::Command;

fn template() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/sluice/templates/operator-deployment.yaml");
    std::fs::read_to_string(path).unwrap()
}

/// The long flags of the container's args (`- --name=value` lines, the first `- run`).
fn chart_flags(template: &str) -> Vec<String> {
    template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|f| f.split(['=', ' ']).next().unwrap().to_owned())
        .collect()
}

#[test]
fn the_chart_passes_only_flags_that_run_has() {
    let template = template();
    assert!(
        template.contains("            - run\n"),
        "the chart no longer runs `run`"
    );
    let flags = chart_flags(&template);
    assert!(flags.len() >= 8, "{flags:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-operator"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let known: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '\t']).next().unwrap())
        .collect();
    for flag in &flags {
        assert!(
            known.contains(&flag.as_str()),
            "the chart passes --{flag}, which `sluice-operator run` does not have ({known:?})"
        );
    }
}
