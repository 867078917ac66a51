//! Types shared by the three resources (`istio.type.v1beta1`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Selects workloads by labels (all must match). `Some(selector)` with no labels is distinct from `None` for
/// Istio's "only one of selector/targetRefs" rule, so the `Option` around it is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// True when every selector label is present with the same value in `labels`. An empty selector matches all.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Reference to a Gateway / GatewayClass / Service / ServiceEntry the policy attaches to (waypoints, gateways).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group; empty (or `core`) means the core group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    pub kind: String,
    pub name: String,
    /// Must be empty or the policy's own namespace (cross-namespace references are not supported).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl PolicyTargetReference {
    /// Group with the core group normalised to `""`, for comparisons.
    pub fn canonical_group(&self) -> &str {
        if self.group == "core" { "" } else { &self.group }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_matches() {
        let labels: BTreeMap<String, String> =
            [("app".to_string(), "httpbin".to_string()), ("version".to_string(), "v1".to_string())].into();
        let sel = |pairs: &[(&str, &str)]| WorkloadSelector {
            match_labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        assert!(sel(&[]).matches(&labels));
        assert!(sel(&[("app", "httpbin")]).matches(&labels));
        assert!(sel(&[("app", "httpbin"), ("version", "v1")]).matches(&labels));
        assert!(!sel(&[("app", "httpbin"), ("version", "v2")]).matches(&labels));
        assert!(!sel(&[("team", "a")]).matches(&labels));
    }
}
