//! Kubernetes object metadata: the parts Trellis keeps, the namespace an omitted one defaults to, and the
//! annotation Trellis reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Namespace used when `metadata.namespace` is omitted (what `kubectl apply` does without `-n`).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Annotation that puts an AuthorizationPolicy in shadow (log-only) mode.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The parts of Kubernetes object metadata Trellis keeps. Server-populated fields (`uid`, `resourceVersion`,
/// `generation`, `creationTimestamp`, `managedFields`) are accepted on input and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Input form of metadata: strict about unknown fields, tolerant of what `kubectl get -o yaml` adds.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMetadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default, rename = "uid")]
    _uid: serde::de::IgnoredAny,
    #[serde(default, rename = "resourceVersion")]
    _resource_version: serde::de::IgnoredAny,
    #[serde(default, rename = "generation")]
    _generation: serde::de::IgnoredAny,
    #[serde(default, rename = "creationTimestamp")]
    _creation_timestamp: serde::de::IgnoredAny,
    #[serde(default, rename = "managedFields")]
    _managed_fields: serde::de::IgnoredAny,
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawMetadata::deserialize(d)?;
        Ok(Metadata {
            name: raw.name.unwrap_or_default(),
            namespace: raw.namespace.filter(|ns| !ns.is_empty()).unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
            labels: raw.labels,
            annotations: raw.annotations,
        })
    }
}
