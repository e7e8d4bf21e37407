//! Every CEL rule of the CRD compiles on every Kubernetes version the chart claims.
//!
//! An API server compiles a new (or changed) rule against the CEL environment of its
//! compatibility version, one minor behind its own (`DefaultCompatibilityVersion` in
//! k8s.io/apiserver/pkg/cel/environment/base.go), so a library introduced in 1.N is accepted in
//! new rules from 1.N+1 on: `isCIDR` (introduced 1.30) is refused by a 1.30 API server, and the
//! CRD would not install there. The `cel` crate has one environment for every version (kube-cel
//! picks its libraries at compile time), so this test keeps the per-version table itself: it walks
//! every `x-kubernetes-validations` rule of the generated CRD, compiles it with the `cel` crate,
//! takes the functions and library namespaces it calls, and fails when one of them is not
//! available on the oldest version `charts/sluice/Chart.yaml` claims, or is not in the table.

use std::collections::BTreeSet;

use kube::CustomResourceExt;
use kube_cel::cel::Program;
use serde_json::Value;
use sluice_operator::api::EgressGatewayPolicy;

/// A CEL library as Kubernetes offers it to CRD validation rules.
struct Library {
    name: &'static str,
    /// The minor from which an API server accepts the library in a new rule: the version whose
    /// `base.go` entry introduces it, plus one.
    since: u32,
    /// Its functions and operators, as the `cel` crate names them.
    functions: &'static [&'static str],
    /// Identifiers its functions are called through (`sets.contains(...)`).
    namespaces: &'static [&'static str],
}

/// The libraries of k8s.io/apiserver/pkg/cel/environment/base.go, up to Kubernetes 1.34. CRD
/// validation rules themselves are on by default from 1.25 (GA in 1.29), so nothing is older.
/// A name several libraries define (`indexOf` of lists and strings, `compareTo` of quantities and
/// semvers) counts from the earliest: without a type checker, the overloads cannot be told apart.
const LIBRARIES: &[Library] = &[
    Library {
        name: "CEL standard (operators, macros, conversions, strings, timestamps)",
        since: 25,
        functions: &[
            "_&&_",
            "_||_",
            "!_",
            "_?_:_",
            "_==_",
            "_!=_",
            "_<_",
            "_<=_",
            "_>_",
            "_>=_",
            "_+_",
            "_-_",
            "_*_",
            "_/_",
            "_%_",
            "-_",
            "_[_]",
            "@in",
            "@not_strictly_false",
            "has",
            "all",
            "exists",
            "exists_one",
            "map",
            "filter",
            "size",
            "matches",
            "startsWith",
            "endsWith",
            "contains",
            "int",
            "uint",
            "double",
            "string",
            "bytes",
            "bool",
            "type",
            "dyn",
            "duration",
            "timestamp",
            "getDate",
            "getDayOfMonth",
            "getDayOfWeek",
            "getDayOfYear",
            "getFullYear",
            "getHours",
            "getMilliseconds",
            "getMinutes",
            "getMonth",
            "getSeconds",
        ],
        namespaces: &[],
    },
    Library {
        name: "Kubernetes lists, regex and URLs; cel-go strings (version 0)",
        since: 25,
        functions: &[
            "isSorted",
            "sum",
            "min",
            "max",
            "indexOf",
            "lastIndexOf",
            "find",
            "findAll",
            "url",
            "isURL",
            "getScheme",
            "getHost",
            "getHostname",
            "getPort",
            "getEscapedPath",
            "getQuery",
            "charAt",
            "lowerAscii",
            "upperAscii",
            "replace",
            "split",
            "substring",
            "trim",
            "join",
        ],
        namespaces: &[],
    },
    Library {
        name: "Kubernetes quantities; optional types",
        since: 29,
        functions: &[
            "quantity",
            "isQuantity",
            "sign",
            "isInteger",
            "asInteger",
            "asApproximateFloat",
            "add",
            "sub",
            "isGreaterThan",
            "isLessThan",
            "compareTo",
            "value",
            "hasValue",
            "or",
            "orValue",
            "_?._",
            "_[?_]",
        ],
        namespaces: &["optional"],
    },
    Library {
        name: "cel-go strings version 2; sets",
        since: 30,
        functions: &["format", "quote"],
        namespaces: &["sets"],
    },
    Library {
        name: "Kubernetes IP and CIDR",
        since: 31,
        functions: &[
            "ip",
            "isIP",
            "isCanonical",
            "family",
            "isUnspecified",
            "isLoopback",
            "isLinkLocalMulticast",
            "isLinkLocalUnicast",
            "isGlobalUnicast",
            "cidr",
            "isCIDR",
            "containsIP",
            "containsCIDR",
            "prefixLength",
            "masked",
        ],
        namespaces: &[],
    },
    Library {
        name: "Kubernetes format",
        since: 32,
        functions: &[
            "dns1123Label",
            "dns1123Subdomain",
            "dns1035Label",
            "qualifiedName",
            "dns1123LabelPrefix",
            "dns1123SubdomainPrefix",
            "dns1035LabelPrefix",
            "labelValue",
            "uri",
            "uuid",
            "byte",
            "date",
            "datetime",
            "named",
            "validate",
        ],
        namespaces: &["format"],
    },
    Library {
        name: "two-variable comprehensions",
        since: 33,
        functions: &["transformList", "transformMap", "transformMapEntry"],
        namespaces: &[],
    },
    Library {
        name: "Kubernetes semver",
        since: 34,
        functions: &["semver", "isSemver", "major", "minor", "patch"],
        namespaces: &[],
    },
    Library {
        name: "cel-go lists version 3",
        since: 35,
        functions: &[
            "distinct", "flatten", "reverse", "slice", "sort", "sortBy", "first", "last",
        ],
        namespaces: &["lists"],
    },
];

/// The newest minor the table knows: versions after it add libraries, they remove none.
const NEWEST_KNOWN: u32 = 35;

/// The earliest library that lets a rule call `name` (a function, or a namespace it is called
/// through), if the table knows one.
fn library(name: &str, namespace: bool) -> Option<&'static Library> {
    LIBRARIES
        .iter()
        .filter(|l| {
            if namespace {
                l.namespaces.contains(&name)
            } else {
                l.functions.contains(&name)
            }
        })
        .min_by_key(|l| l.since)
}

/// Why `rule` cannot be created on Kubernetes 1.`minor`: each function or namespace it calls
/// that the version lacks, or that the table does not know. Empty when it can.
fn unavailable(rule: &str, minor: u32) -> Result<Vec<String>, String> {
    let program = Program::compile(rule).map_err(|e| format!("does not compile: {e}"))?;
    let references = program.references();
    let mut problems = Vec::new();
    for function in references.functions() {
        match library(function, false) {
            Some(l) if l.since <= minor => {}
            Some(l) => problems.push(format!(
                "{function}() needs Kubernetes 1.{} ({})",
                l.since, l.name
            )),
            None => problems.push(format!(
                "{function}() is not in the table of Kubernetes CEL libraries (add it, with the \
                 version that introduced it)"
            )),
        }
    }
    // Plain variables (self, oldSelf, a macro's iteration variable) need nothing; library
    // namespaces are the calls the table must date.
    for variable in references.variables() {
        if let Some(l) = library(variable, true).filter(|l| l.since > minor) {
            problems.push(format!(
                "{variable}.* needs Kubernetes 1.{} ({})",
                l.since, l.name
            ));
        }
    }
    problems.sort();
    Ok(problems)
}

/// Every CEL expression of a schema (`rule`, and `messageExpression` where there is one), with
/// where it is.
fn rules(schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(validations)) = map.get("x-kubernetes-validations") {
                for v in validations {
                    for key in ["rule", "messageExpression"] {
                        if let Some(Value::String(expr)) = v.get(key) {
                            out.push((format!("{path} {key}"), expr.clone()));
                        }
                    }
                }
            }
            for (key, sub) in map {
                rules(sub, &format!("{path}.{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, sub) in items.iter().enumerate() {
                rules(sub, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn crd_rules() -> Vec<(String, String)> {
    let crd = serde_json::to_value(EgressGatewayPolicy::crd()).unwrap();
    let mut out = Vec::new();
    rules(&crd, "", &mut out);
    out
}

/// The oldest minor `charts/sluice/Chart.yaml` claims (`kubeVersion: ">=1.N..."`).
fn oldest_claimed() -> u32 {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice/Chart.yaml");
    let chart: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let constraint = chart["kubeVersion"].as_str().unwrap();
    constraint
        .strip_prefix(">=1.")
        .and_then(|rest| rest.split(['.', '-']).next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("kubeVersion {constraint:?} is not of the form \">=1.N.0-0\""))
}

#[test]
fn every_rule_compiles_on_every_claimed_version() {
    let rules = crd_rules();
    // The CRD's rules: the gateway one-of, the selector's pods-or-namespaces, the gateway's
    // interface-or-IP, and the CIDR and IP formats.
    assert!(rules.len() >= 6, "{rules:#?}");
    let oldest = oldest_claimed();
    let mut problems = Vec::new();
    for minor in oldest..=NEWEST_KNOWN.max(oldest) {
        for (path, rule) in &rules {
            match unavailable(rule, minor) {
                Ok(missing) if missing.is_empty() => {}
                Ok(missing) => problems.push(format!("1.{minor}: {path}: {rule}: {missing:?}")),
                Err(e) => problems.push(format!("{path}: {rule}: {e}")),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the CRD would not install on every version Chart.yaml claims (>=1.{oldest}):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_cidr_and_ip_rules_are_what_rules_out_1_30() {
    // What the chart's minimum rests on: the rules that need 1.31.
    let needing_31: BTreeSet<String> = crd_rules()
        .into_iter()
        .filter(|(_, rule)| !unavailable(rule, 30).unwrap().is_empty())
        .map(|(_, rule)| rule)
        .collect();
    assert_eq!(
        needing_31,
        BTreeSet::from(["isCIDR(self)".to_owned(), "isIP(self)".to_owned()])
    );
    assert_eq!(
        unavailable("isCIDR(self)", 30).unwrap(),
        ["isCIDR() needs Kubernetes 1.31 (Kubernetes IP and CIDR)"]
    );
    assert_eq!(unavailable("isCIDR(self)", 31).unwrap(), Vec::<String>::new());
}

#[test]
fn the_checker_catches_late_libraries_unknown_functions_and_bad_syntax() {
    let minor = 31;
    assert_eq!(
        unavailable("sets.contains(self.a, self.b)", 29).unwrap(),
        ["sets.* needs Kubernetes 1.30 (cel-go strings version 2; sets)"]
    );
    assert_eq!(
        unavailable("format.dns1123Label().validate(self.y).hasValue()", minor).unwrap(),
        [
            "dns1123Label() needs Kubernetes 1.32 (Kubernetes format)",
            "format.* needs Kubernetes 1.32 (Kubernetes format)",
            "validate() needs Kubernetes 1.32 (Kubernetes format)",
        ]
    );
    assert_eq!(
        unavailable("self.l.transformList(i, v, v * 2).size() > 0", minor).unwrap(),
        ["transformList() needs Kubernetes 1.33 (two-variable comprehensions)"]
    );
    assert_eq!(
        unavailable("self.all(x, x.startsWith('a'))", minor).unwrap(),
        Vec::<String>::new()
    );
    let unknown = unavailable("frobnicate(self)", minor).unwrap();
    assert!(unknown[0].contains("not in the table"), "{unknown:?}");
    assert!(unavailable("has(self.", minor).is_err());
}
