//! `sluice-operator convert` as a user runs it.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use sluice_operator::api::EgressGatewayPolicy;

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice-operator"))
}

fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cilium/policy.yaml")
}

#[test]
fn converts_the_cilium_example_and_warns_about_node_selectors() {
    let out = operator().arg("convert").arg(example()).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    let policy: EgressGatewayPolicy = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(policy.metadata.name.as_deref(), Some("checkout-to-psp"));
    assert_eq!(policy.spec.selectors.len(), 2);
    assert_eq!(policy.spec.destination_cidrs, ["198.51.100.0/24"]);
    assert!(sluice_operator::policy::parse(&policy.spec).is_ok());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("---\napiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\n"));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("warning: document 1 (checkout-to-psp): spec.selectors[1].nodeSelector"));
}

#[test]
fn reads_standard_input_and_fails_without_a_policy() {
    let run = |input: &str| {
        let mut child = operator()
            .args(["convert", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let text = std::fs::read_to_string(example()).unwrap();
    let out = run(&text);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("name: checkout-to-psp"));

    let out = run("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("skipped: ConfigMap"), "{stderr}");
    assert!(stderr.contains("error: nothing to convert"), "{stderr}");
}

#[test]
fn a_missing_file_is_named() {
    let out = operator()
        .args(["convert", "/nonexistent/cegp.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading /nonexistent/cegp.yaml"));
}
