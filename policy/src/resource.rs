//! The whole Kubernetes-style document: apiVersion, kind, metadata and a typed spec.

use serde::Serialize;

use crate::authz::AuthorizationPolicy;
use crate::kind::{Kind, ResourceKey};
use crate::lexical::parse_go_bool;
use crate::metadata::{DRY_RUN_ANNOTATION, Metadata};
use crate::peer_authn::PeerAuthentication;
use crate::request_authn::RequestAuthentication;

/// Accepted `apiVersion` values; v1 and v1beta1 share one schema.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// As written (`security.istio.io/v1` or `security.istio.io/v1beta1`).
    pub api_version: String,
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: Spec,
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

    /// YAML rendering of the same document as [`Resource::to_json`]; [`crate::parse_documents`] reads it back.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("Resource serialization to YAML cannot fail")
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
