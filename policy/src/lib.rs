//! Trellis policy model: Istio's security resources (`security.istio.io/v1` and `v1beta1`:
//! `AuthorizationPolicy`, `PeerAuthentication`, `RequestAuthentication`) with the same schema and the same
//! admission-time validation as Istio, so manifests written for Istio apply unchanged.
//!
//! Evaluation follows Istio's documented (sidecar) semantics in ztunnel's compiled style: [`CompiledPolicies`]
//! once per configuration change, [`WorkloadPolicies`] once per destination workload, then
//! [`WorkloadPolicies::evaluate`] per connection or request without allocating. [`effective_mtls_mode`] resolves
//! PeerAuthentication precedence; [`EvalRequest`] / [`explain`] back `trellisctl authz eval`.
//!
//! Pure code: no I/O, networking or async; callers bring the text and decide what to do with the result.

#![forbid(unsafe_code)]

mod authz;
mod cidr;
mod common;
mod condition;
mod dns_name;
mod error;
mod eval;
mod eval_request;
mod http_url;
mod jwt;
mod kind;
mod lexical;
mod limits;
mod matcher;
mod metadata;
mod mtls;
mod parse;
mod path;
mod peer_authn;
mod request_authn;
mod resource;
mod strict;
mod validate;

#[cfg(test)]
mod tests;

pub use authz::{Action, AuthorizationPolicy, Condition, ExtensionProvider, From, Operation, Rule, Source, To};
pub use cidr::{Cidr, InvalidCidr};
pub use common::{PolicyTargetReference, WorkloadSelector};
pub use condition::{ConditionKey, ValueKind};
pub use dns_name::{DNS1123_LABEL_MAX_LEN, InvalidDnsLabel, check_dns1123_label};
pub use error::{DocumentError, FieldError, ParseError};
pub use eval::{
    CompileError, CompileOptions, CompiledPolicies, CompiledResource, Decision, DryRunOutcome, Headers, HttpRequest,
    IgnoreReason, IgnoredPolicy, NoHeaders, PolicyRef, Protocol, Reason, Request, WorkloadPolicies,
};
pub use eval_request::{
    EvalDestination, EvalHttp, EvalProtocol, EvalRequest, EvalRequestError, EvalSource, Explanation, Verdict, explain,
};
pub use jwt::{
    AUDIENCE_BODY, DEFAULT_CLOCK_SKEW, HeaderEdits, JwtAuthenticator, JwtOutcome, Rejection, TokenSource,
    UNAUTHORIZED_BODY, Verified, check_jwks, is_cors_preflight,
};
pub use kind::{InvalidResourceKey, Kind, ResourceKey, UnknownKind};
pub use lexical::{InvalidDuration, parse_go_bool, parse_go_duration, parse_port};
pub use limits::{LimitError, MAX_NESTING, MAX_RESOURCES, check_nesting};
pub use matcher::StringMatch;
pub use metadata::{DEFAULT_NAMESPACE, DRY_RUN_ANNOTATION, Metadata};
pub use mtls::{EffectiveMtls, MtlsLevel, WorkloadMtls, effective_mtls, effective_mtls_mode};
pub use parse::{parse_documents, parse_keys};
pub use path::{PathError, normalize_path, normalize_target};
pub use peer_authn::{MtlsMode, MutualTls, PeerAuthentication};
pub use request_authn::{ClaimToHeader, JwtHeader, JwtRule, RequestAuthentication};
pub use resource::{API_VERSIONS, Resource, Spec};

/// Namespace whose selector-less policies apply mesh-wide (Istio's `istio-system` role).
pub const DEFAULT_ROOT_NAMESPACE: &str = "trellis-system";
