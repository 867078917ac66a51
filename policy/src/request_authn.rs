//! `RequestAuthentication` spec: which JWTs a workload accepts and how they are located and forwarded.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::common::{PolicyTargetReference, WorkloadSelector};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthentication {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single form of `target_refs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

impl RequestAuthentication {
    pub fn has_target_refs(&self) -> bool {
        self.target_ref.is_some() || !self.target_refs.is_empty()
    }
}

/// Istio `JWTRule`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// Required; tokens with a different `iss` are rejected.
    #[serde(default)]
    pub issuer: String,
    /// Empty: any audience is accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// http(s) URL of the JWKS; mutually exclusive with `jwks`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jwks_uri: String,
    /// Inline JWKS JSON document.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jwks: String,
    /// Explicit header locations; when no location is given, `Authorization: Bearer` then `?access_token=`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// Header that receives the base64-encoded verified payload.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output_payload_to_header: String,
    /// When false (default) the token is stripped before forwarding upstream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub forward_original_token: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// JWKS fetch timeout as written (Go duration syntax, e.g. `5s`, `1m30s`); see [`JwtRule::timeout_duration`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Claims (besides `scope` and `permission`) whose string values are split on whitespace for matching.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub space_delimited_claims: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl JwtRule {
    /// Default JWKS fetch timeout when `timeout` is unset.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// The effective JWKS fetch timeout (validated values always parse).
    pub fn timeout_duration(&self) -> Duration {
        self.timeout.as_deref().and_then(|t| crate::lexical::parse_go_duration(t).ok()).unwrap_or(Self::DEFAULT_TIMEOUT)
    }

    /// Claims that are split on whitespace: always `scope` and `permission`, plus `spaceDelimitedClaims`.
    pub fn all_space_delimited_claims(&self) -> Vec<&str> {
        let mut out = vec!["scope", "permission"];
        for c in &self.space_delimited_claims {
            if !out.contains(&c.as_str()) {
                out.push(c);
            }
        }
        out
    }
}

/// Istio `JWTHeader`: a header carrying the token, with an optional prefix (e.g. `"Bearer "`) to strip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// Istio `ClaimToHeader`: copy a (possibly nested `a.b.c`) claim into a request header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub claim: String,
}
