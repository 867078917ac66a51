//! The whole Kubernetes-style document: apiVersion, kind, metadata and a typed spec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::authz::AuthorizationPolicy;
use crate::error::ParseError;
use crate::kind::{Kind, ResourceKey};
use crate::peer_authn::PeerAuthentication;
use crate::request_authn::RequestAuthentication;

/// Namespace used when `metadata.namespace` is omitted (what `kubectl apply` does without `-n`).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Accepted `apiVersion` values; v1 and v1beta1 share one schema.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Annotation that puts an AuthorizationPolicy in shadow (log-only) mode.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// As written (`security.istio.io/v1` or `security.istio.io/v1beta1`).
    pub api_version: String,
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: Spec,
}

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
pub(crate) struct RawMetadata {
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) namespace: Option<String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
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

/// The typed spec; the variant always agrees with `Resource::kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    RequestAuthentication(RequestAuthentication),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Spec::PeerAuthentication(_) => Kind::PeerAuthentication,
            Spec::RequestAuthentication(_) => Kind::RequestAuthentication,
        }
    }
}

/// Go `strconv.ParseBool`, which is how Istio reads `istio.io/dry-run`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

impl Resource {
    pub fn key(&self) -> ResourceKey {
        ResourceKey::new(self.kind, self.metadata.namespace.clone(), self.metadata.name.clone())
    }

    /// `istio.io/dry-run` parsed like Go's `strconv.ParseBool`; absent or unparsable means not dry-run.
    pub fn dry_run(&self) -> bool {
        self.metadata.annotations.get(DRY_RUN_ANNOTATION).and_then(|v| parse_go_bool(v)).unwrap_or(false)
    }

    pub fn authorization_policy(&self) -> Option<&AuthorizationPolicy> {
        match &self.spec {
            Spec::AuthorizationPolicy(p) => Some(p),
            _ => None,
        }
    }

    pub fn peer_authentication(&self) -> Option<&PeerAuthentication> {
        match &self.spec {
            Spec::PeerAuthentication(p) => Some(p),
            _ => None,
        }
    }

    pub fn request_authentication(&self) -> Option<&RequestAuthentication> {
        match &self.spec {
            Spec::RequestAuthentication(p) => Some(p),
            _ => None,
        }
    }

    /// Canonical compact JSON (Istio camelCase names, empty fields omitted); `from_json(to_json(r)) == r`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("Resource serialization to JSON cannot fail")
    }

    /// Same as [`Resource::to_json`], indented for humans.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("Resource serialization to JSON cannot fail")
    }

    /// Parses and validates one JSON document.
    pub fn from_json(s: &str) -> Result<Resource, ParseError> {
        let value: serde_json::Value =
            serde_json::from_str(s).map_err(|e| ParseError::single(0, "", format!("invalid JSON: {e}")))?;
        crate::parse::resource_from_value(value, 0)
    }

    /// YAML rendering of the same document as [`Resource::to_json`]; [`crate::parse_documents`] reads it back.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("Resource serialization to YAML cannot fail")
    }

    /// Re-runs semantic validation, e.g. for a resource built in code rather than parsed.
    pub fn validate(&self) -> Result<(), ParseError> {
        let errors = crate::validate::validate_resource(self);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(crate::parse::attribute_errors(
                0,
                Some(self.kind.as_str()),
                Some(&self.metadata.name),
                Some(&self.metadata.namespace),
                errors.0,
            ))
        }
    }
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Doc<'a> {
            api_version: &'a str,
            kind: Kind,
            metadata: &'a Metadata,
            spec: &'a Spec,
        }
        Doc { api_version: &self.api_version, kind: self.kind, metadata: &self.metadata, spec: &self.spec }
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Resource {
    /// Goes through the same parse + validate path as [`Resource::from_json`], so a deserialized `Resource` is
    /// always valid.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Via a YAML value so that non-string mapping keys (YAML `portLevelMtls: {8080: ...}`) survive any format.
        let value = serde_yaml_ng::Value::deserialize(d)?;
        let value = crate::parse::yaml_to_json(value).map_err(serde::de::Error::custom)?;
        crate::parse::resource_from_value(value, 0).map_err(serde::de::Error::custom)
    }
}
