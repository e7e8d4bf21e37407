//! Kubernetes label selectors, compiled once and matched many times.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Labels as Kubernetes stores them.
pub type Labels = BTreeMap<String, String>;

/// The pod label that selects a pod by its namespace name (Cilium's convention, kept so that
/// Cilium policies mean the same thing here).
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// Anything labels can be looked up in.
pub trait LabelSource {
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelSource for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// A pod's labels plus the synthetic namespace label.
pub struct PodLabels<'a, L: LabelSource + ?Sized = Labels> {
    pub labels: &'a L,
    pub namespace: &'a str,
}

impl<L: LabelSource + ?Sized> LabelSource for PodLabels<'_, L> {
    fn label(&self, key: &str) -> Option<&str> {
        if key == POD_NAMESPACE_LABEL {
            return Some(self.namespace);
        }
        self.labels.label(key)
    }
}

/// A selector that is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("operator {operator:?} of key {key:?} is not one of In, NotIn, Exists, DoesNotExist")]
    UnknownOperator { key: String, operator: String },
    #[error("operator {operator} of key {key:?} needs at least one value")]
    MissingValues { key: String, operator: &'static str },
    #[error("operator {operator} of key {key:?} takes no values")]
    UnexpectedValues { key: String, operator: &'static str },
    #[error("label key must not be empty")]
    EmptyKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &impl LabelSource) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.label(k) == Some(v.as_str()),
            Requirement::In(k, vs) => labels.label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => labels.label(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            Requirement::Exists(k) => labels.label(k).is_some(),
            Requirement::DoesNotExist(k) => labels.label(k).is_none(),
        }
    }
}

/// A compiled label selector. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Compiles a selector, rejecting operators and value lists Kubernetes would reject.
    pub fn compile(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            if k.is_empty() {
                return Err(SelectorError::EmptyKey);
            }
            requirements.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for expr in selector.match_expressions.iter().flatten() {
            if expr.key.is_empty() {
                return Err(SelectorError::EmptyKey);
            }
            let key = expr.key.clone();
            let values = expr.values.clone().unwrap_or_default();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        key,
                        operator: if expr.operator == "In" { "In" } else { "NotIn" },
                    });
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        key,
                        operator: if expr.operator == "Exists" {
                            "Exists"
                        } else {
                            "DoesNotExist"
                        },
                    });
                }
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(SelectorError::UnknownOperator {
                        key,
                        operator: other.to_owned(),
                    });
                }
            };
            requirements.push(requirement);
        }
        Ok(Selector { requirements })
    }

    /// A selector from `matchLabels` only.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Selector {
            requirements: labels
                .into_iter()
                .map(|(k, v)| Requirement::Equals(k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    pub fn matches(&self, labels: &impl LabelSource) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// A label every matching object must carry, if the selector has one: lets the planner
    /// index selectors instead of testing every one against every pod.
    pub fn anchor(&self) -> Option<(&str, &str)> {
        self.requirements.iter().find_map(|r| match r {
            Requirement::Equals(k, v) => Some((k.as_str(), v.as_str())),
            Requirement::In(k, vs) if vs.len() == 1 => Some((k.as_str(), vs[0].as_str())),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    fn selector(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::compile(&LabelSelector {
            match_labels: if match_labels.is_empty() {
                None
            } else {
                Some(labels(match_labels))
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        })
        .unwrap()
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = selector(&[], vec![]);
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert_eq!(s.anchor(), None);
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = selector(&[("app", "web")], vec![expr("tier", "In", &["a", "b"])]);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "b")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("tier", "a")])));
        assert_eq!(s.anchor(), Some(("app", "web")));
    }

    #[test]
    fn every_operator_means_what_kubernetes_says() {
        let l = labels(&[("a", "1")]);
        assert!(selector(&[], vec![expr("a", "NotIn", &["2"])]).matches(&l));
        assert!(!selector(&[], vec![expr("a", "NotIn", &["1"])]).matches(&l));
        assert!(selector(&[], vec![expr("b", "NotIn", &["1"])]).matches(&l));
        assert!(selector(&[], vec![expr("a", "Exists", &[])]).matches(&l));
        assert!(!selector(&[], vec![expr("b", "Exists", &[])]).matches(&l));
        assert!(selector(&[], vec![expr("b", "DoesNotExist", &[])]).matches(&l));
        assert!(!selector(&[], vec![expr("a", "DoesNotExist", &[])]).matches(&l));
        assert_eq!(
            selector(&[], vec![expr("a", "In", &["1"])]).anchor(),
            Some(("a", "1"))
        );
    }

    #[test]
    fn malformed_expressions_are_rejected() {
        let compile = |e| {
            Selector::compile(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![e]),
            })
        };
        assert!(matches!(
            compile(expr("a", "Equals", &["1"])),
            Err(SelectorError::UnknownOperator { .. })
        ));
        assert!(matches!(
            compile(expr("a", "In", &[])),
            Err(SelectorError::MissingValues { .. })
        ));
        assert!(matches!(
            compile(expr("a", "Exists", &["x"])),
            Err(SelectorError::UnexpectedValues { .. })
        ));
        assert!(matches!(
            compile(expr("", "Exists", &[])),
            Err(SelectorError::EmptyKey)
        ));
    }

    #[test]
    fn pod_labels_answer_the_namespace_label() {
        let l = labels(&[("app", "web")]);
        let pod = PodLabels {
            labels: &l,
            namespace: "prod",
        };
        assert!(Selector::from_labels([(POD_NAMESPACE_LABEL, "prod"), ("app", "web")]).matches(&pod));
        assert!(!Selector::from_labels([(POD_NAMESPACE_LABEL, "dev")]).matches(&pod));
    }
}
