//! `cargo xtask e2e-cluster`: the suite for a real cluster (kind, k3d, a cloud cluster).
//!
//! Uses `KUBECONFIG` (or kubectl's default) through `kubectl` and `helm`:
//! 1. installs (upgrades) the chart `charts/sluice`;
//! 2. labels one node as the gateway and applies a policy selecting a test pod on another node;
//! 3. waits until `kubectl get egp` reports `Accepted=True` and `Programmed=True`, with the
//!    gateway node in `status.gateways`;
//! 4. with `--echo-host`, checks traffic: this process serves HTTP on `--echo-port` and answers
//!    with the client's source address; the test pod fetches it, and the answer must be the
//!    gateway's egress address (in-cluster destinations are never steered, so the echo server
//!    runs outside the cluster: for kind, `--echo-host 172.18.0.1`, the docker network's
//!    gateway, usually works; it must not fall inside the chart's `clusterCIDRs`, which are
//!    never steered);
//! 5. removes what it created (`--keep` leaves it; `--uninstall` also removes the release).
//!
//! Without a reachable cluster it prints `SKIPPED: ...` and succeeds. It is not part of
//! `cargo xtask test`.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpListener},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub struct Options {
    pub namespace: String,
    pub release: String,
    /// `helm --set` values, e.g. `image.registry=ghcr.io/acme`.
    pub set: Vec<String>,
    pub echo_host: Option<IpAddr>,
    pub echo_port: u16,
    pub client_image: String,
    pub keep: bool,
    pub uninstall: bool,
    pub timeout: Duration,
}

const TEST_NAMESPACE: &str = "sluice-e2e";
const POLICY: &str = "sluice-e2e";
const GATEWAY_LABEL: &str = "sluice.dev/e2e-gateway";

fn kubeconfig() -> String {
    std::env::var("KUBECONFIG").unwrap_or_else(|_| "(unset: ~/.kube/config)".to_owned())
}

/// Runs a program, returning its stdout; fails with its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl(args: &[&str]) -> Result<String> {
    run("kubectl", args, None)
}

fn kubectl_json(args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    Ok(serde_json::from_str(&kubectl(&all)?)?)
}

fn apply(yaml: &str) -> Result<()> {
    run("kubectl", &["apply", "-f", "-"], Some(yaml)).map(|_| ())
}

fn step(what: &str) {
    eprintln!("==> e2e-cluster: {what}");
}

/// Whether a cluster answers; `Err` carries why not.
fn reachable() -> Result<()> {
    kubectl(&["version", "--request-timeout=5s", "-o", "json"]).map(|_| ())
}

pub fn run_suite(opts: &Options) -> Result<()> {
    if let Err(e) = reachable() {
        println!(
            "SKIPPED: no Kubernetes cluster reachable (KUBECONFIG={}): {e:#}",
            kubeconfig()
        );
        return Ok(());
    }
    // helm from PATH, else the one `cargo xtask chart` installs under target/tools/.
    let helm = match run("helm", &["version", "--short"], None) {
        Ok(_) => "helm".to_owned(),
        Err(_) => super::chart::helm(&super::root())?.display().to_string(),
    };
    let started = Instant::now();
    let result = suite(opts, &helm);
    if !opts.keep {
        step("cleaning up");
        cleanup(opts, &helm);
    }
    match &result {
        Ok(()) => println!("e2e-cluster: PASSED in {:.0?}", started.elapsed()),
        Err(e) => println!("e2e-cluster: FAILED after {:.0?}: {e:#}", started.elapsed()),
    }
    result
}

fn suite(opts: &Options, helm: &str) -> Result<()> {
    step("installing the chart charts/sluice");
    let chart = super::root().join("charts/sluice");
    let chart = chart.to_str().context("chart path")?;
    let timeout = format!("{}s", opts.timeout.as_secs());
    let mut args = vec![
        "upgrade",
        "--install",
        &opts.release,
        chart,
        "--namespace",
        &opts.namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        &timeout,
    ];
    for s in &opts.set {
        args.extend(["--set", s]);
    }
    run(helm, &args, None)?;
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/egressgatewaypolicies.sluice.dev",
    ])?;

    step("choosing the gateway and client nodes");
    let nodes = kubectl_json(&["get", "nodes"])?;
    let mut ready: Vec<String> = nodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    ready.sort();
    let gateway = ready.last().context("no Ready node")?.clone();
    let client = ready.iter().find(|n| **n != gateway).unwrap_or(&gateway).clone();
    eprintln!("    gateway {gateway}, client pod on {client}");
    kubectl(&[
        "label",
        "node",
        &gateway,
        &format!("{GATEWAY_LABEL}=true"),
        "--overwrite",
    ])?;

    let echo = match opts.echo_host {
        Some(host) => Some((host, start_echo_server(opts.echo_port)?)),
        None => None,
    };
    let destination = match echo {
        Some((IpAddr::V4(ip), _)) => format!("{ip}/32"),
        Some((IpAddr::V6(ip), _)) => format!("{ip}/128"),
        None => "198.51.100.0/24".to_owned(),
    };

    step("creating the test namespace, client pod and policy");
    apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {TEST_NAMESPACE}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: {TEST_NAMESPACE}
  labels: {{app: sluice-e2e-client}}
spec:
  nodeName: {client}
  tolerations: [{{operator: Exists}}]
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: {image}
      command: [sleep, "3600"]
---
apiVersion: sluice.dev/v1alpha1
kind: EgressGatewayPolicy
metadata:
  name: {POLICY}
spec:
  selectors:
    - podSelector:
        matchLabels: {{app: sluice-e2e-client}}
      namespaceSelector:
        matchLabels: {{kubernetes.io/metadata.name: {TEST_NAMESPACE}}}
  destinationCIDRs: [{destination}]
  egressGateway:
    nodeSelector:
      matchLabels: {{{GATEWAY_LABEL}: "true"}}
"#,
        image = opts.client_image,
    ))?;
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "-n",
        TEST_NAMESPACE,
        &format!("--timeout={timeout}"),
    ])?;

    step("waiting for the policy to be Accepted and Programmed");
    let status = wait_for_status(&gateway, opts.timeout)?;
    eprintln!("{}", kubectl(&["get", "egp", POLICY, "-o", "wide"])?);

    if let Some((host, _server)) = echo {
        step("checking traffic through the gateway");
        let gateways = status["gateways"].as_array().cloned().unwrap_or_default();
        let expected: Vec<String> = gateways
            .iter()
            .flat_map(|g| [g["egressIP"].as_str(), g["ip"].as_str()])
            .flatten()
            .map(str::to_owned)
            .collect();
        let url = match host {
            IpAddr::V4(ip) => format!("http://{ip}:{}/", opts.echo_port),
            IpAddr::V6(ip) => format!("http://[{ip}]:{}/", opts.echo_port),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = kubectl(&[
                "exec",
                "-n",
                TEST_NAMESPACE,
                "client",
                "--",
                "wget",
                "-qO-",
                "-T",
                "5",
                &url,
            ]);
            match seen {
                Ok(source) if expected.contains(&source.trim().to_owned()) => {
                    eprintln!("    the echo server saw {}: the gateway's address", source.trim());
                    break;
                }
                other if Instant::now() > deadline => {
                    bail!("traffic did not leave through the gateway {expected:?}: {other:?}")
                }
                other => eprintln!("    not yet: {other:?}"),
            }
            thread::sleep(Duration::from_secs(2));
        }
    } else {
        eprintln!(
            "note: traffic check skipped; pass --echo-host <this machine's address as seen from the pods>"
        );
    }
    Ok(())
}

/// Polls the policy's status until Accepted and Programmed are True and `gateway` serves it.
fn wait_for_status(gateway: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let policy = kubectl_json(&["get", "egp", POLICY])?;
        let status = policy["status"].clone();
        let condition = |t: &str| {
            status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == t)
                .map(|c| {
                    format!(
                        "{}={} ({}: {})",
                        t,
                        c["status"].as_str().unwrap_or("?"),
                        c["reason"].as_str().unwrap_or(""),
                        c["message"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_else(|| format!("{t}=?"))
        };
        let ok = |t: &str| condition(t).starts_with(&format!("{t}=True"));
        let serves = status["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|g| g["node"] == gateway);
        let generation = policy["metadata"]["generation"].clone();
        if ok("Accepted") && ok("Programmed") && serves && status["observedGeneration"] == generation {
            eprintln!("    {}; {}", condition("Accepted"), condition("Programmed"));
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "policy status did not converge: {}; {}; {}; gateways {}",
                condition("Accepted"),
                condition("GatewaySelected"),
                condition("Programmed"),
                status["gateways"]
            );
        }
        thread::sleep(Duration::from_secs(2));
    }
}

/// Answers every HTTP request with the client's address.
fn start_echo_server(port: u16) -> Result<thread::JoinHandle<()>> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("listening on port {port}"))?;
    Ok(thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let peer = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let mut buf = [0u8; 2048];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = stream.read(&mut buf);
            let body = format!("{peer}\n");
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    }))
}

fn cleanup(opts: &Options, helm: &str) {
    let steps: Vec<Vec<String>> = vec![
        vec![
            "delete".into(),
            "egp".into(),
            POLICY.into(),
            "--ignore-not-found".into(),
        ],
        vec![
            "delete".into(),
            "namespace".into(),
            TEST_NAMESPACE.into(),
            "--ignore-not-found".into(),
            "--wait=false".into(),
        ],
        vec![
            "label".into(),
            "nodes".into(),
            "--all".into(),
            format!("{GATEWAY_LABEL}-"),
        ],
    ];
    for args in steps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = kubectl(&args) {
            eprintln!("warning: {e:#}");
        }
    }
    if opts.uninstall
        && let Err(e) = run(
            helm,
            &["uninstall", &opts.release, "--namespace", &opts.namespace],
            None,
        )
    {
        eprintln!("warning: {e:#}");
    }
}
