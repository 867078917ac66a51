//! Semantic validation, mirroring Istio's admission webhook (`pkg/config/validation`) and CRD rules so that what
//! Istio would reject is rejected here too, with a field path for each problem.

use std::time::Duration;

use crate::authz::{Action, AuthorizationPolicy, Operation, Rule, Source};
use crate::cidr::Cidr;
use crate::common::{PolicyTargetReference, WorkloadSelector};
use crate::condition::{ConditionKey, ValueKind};
use crate::dns_name::{check_dns1123_label, is_dns1123_subdomain};
use crate::error::{Errors, Failure, ParseError};
use crate::http_url::check_http_url;
use crate::lexical::{parse_go_bool, parse_go_duration, parse_port};
use crate::metadata::{DRY_RUN_ANNOTATION, Metadata};
use crate::peer_authn::PeerAuthentication;
use crate::request_authn::{JwtRule, RequestAuthentication};
use crate::resource::{API_VERSIONS, Resource, Spec};

const MAX_RULES: usize = 512;
const MAX_TARGET_REFS: usize = 16;
const MAX_SERVICE_ACCOUNTS: usize = 16;
const MAX_SERVICE_ACCOUNT_LEN: usize = 320;
const MAX_SELECTOR_LABELS: usize = 4096;
const MAX_JWT_RULES: usize = 4096;
const MAX_SPACE_DELIMITED_CLAIMS: usize = 64;

impl Resource {
    /// Re-runs semantic validation, e.g. for a resource built in code rather than parsed.
    pub fn validate(&self) -> Result<(), ParseError> {
        let errors = validate_resource(self);
        if errors.is_empty() {
            return Ok(());
        }
        let failure = Failure {
            kind: Some(self.kind.as_str().to_owned()),
            name: Some(self.metadata.name.clone()),
            namespace: Some(self.metadata.namespace.clone()),
            errors: errors.0,
        };
        Err(ParseError { errors: failure.into_document_errors(0, "") })
    }
}

/// Everything that can be checked on a typed resource (i.e. all but "list present but empty").
fn validate_resource(r: &Resource) -> Errors {
    let mut errs = Errors::default();
    if !API_VERSIONS.contains(&r.api_version.as_str()) {
        errs.push("apiVersion", api_version_reason(&r.api_version));
    }
    if r.spec.kind() != r.kind {
        errs.push("spec", format!("spec is a {} spec but kind is {}", r.spec.kind(), r.kind));
    }
    validate_metadata(&r.metadata, &mut errs);
    validate_spec(&r.spec, &r.metadata.namespace, &mut errs);
    validate_dry_run(&r.metadata, &r.spec, &mut errs);
    errs
}

/// Spec rules; `ns` is the policy's namespace (target references may not leave it).
pub(crate) fn validate_spec(spec: &Spec, ns: &str, errs: &mut Errors) {
    match spec {
        Spec::AuthorizationPolicy(p) => validate_authorization_policy(p, ns, errs),
        Spec::PeerAuthentication(p) => validate_peer_authentication(p, errs),
        Spec::RequestAuthentication(p) => validate_request_authentication(p, ns, errs),
    }
}

pub(crate) fn api_version_reason(got: &str) -> String {
    format!("unsupported apiVersion {got:?}: expected security.istio.io/v1 or security.istio.io/v1beta1")
}

// ---------------------------------------------------------------------------------------------------------------
// Metadata

pub(crate) fn name_reason(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("is required".to_string())
    } else if !is_dns1123_subdomain(name) {
        Some(format!(
            "{name:?} is not a valid name: must be a lowercase RFC 1123 subdomain (a-z, 0-9, '-' and '.', \
             starting and ending with an alphanumeric character, at most 253 characters)"
        ))
    } else {
        None
    }
}

pub(crate) fn namespace_reason(ns: &str) -> Option<String> {
    check_dns1123_label(ns).is_err().then(|| {
        format!(
            "{ns:?} is not a valid namespace: must be a lowercase RFC 1123 label (a-z, 0-9 and '-', starting and \
             ending with an alphanumeric character, at most 63 characters)"
        )
    })
}

pub(crate) fn validate_metadata(m: &Metadata, errs: &mut Errors) {
    if let Some(reason) = name_reason(&m.name) {
        errs.push("metadata.name", reason);
    }
    if let Some(reason) = namespace_reason(&m.namespace) {
        errs.push("metadata.namespace", reason);
    }
}

/// Istio's webhook rejects the dry-run annotation where it cannot take effect or when its value is not a boolean,
/// so that a typo never silently turns a shadow policy into an enforced one.
pub(crate) fn validate_dry_run(metadata: &Metadata, spec: &Spec, errs: &mut Errors) {
    let Some(value) = metadata.annotations.get(DRY_RUN_ANNOTATION) else { return };
    let field = format!("metadata.annotations[{DRY_RUN_ANNOTATION}]");
    match spec {
        Spec::AuthorizationPolicy(p) => match p.action {
            Action::Allow | Action::Deny => {
                if parse_go_bool(value).is_none() {
                    errs.push(
                        field,
                        format!("invalid value {value:?}: must be a boolean such as \"true\" or \"false\""),
                    );
                }
            }
            other => errs.push(
                field,
                format!("the {DRY_RUN_ANNOTATION} annotation only supports action ALLOW or DENY, found {other}"),
            ),
        },
        _ => errs.push(
            field,
            format!("the {DRY_RUN_ANNOTATION} annotation is only supported on AuthorizationPolicy; remove it"),
        ),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Shared pieces

fn validate_one_of_selector(
    selector: &Option<WorkloadSelector>,
    target_ref: &Option<PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    errs: &mut Errors,
) {
    let set =
        usize::from(selector.is_some()) + usize::from(target_ref.is_some()) + usize::from(!target_refs.is_empty());
    if set > 1 {
        errs.push("spec", "only one of selector, targetRef or targetRefs can be set");
    }
}

fn validate_selector(selector: &Option<WorkloadSelector>, errs: &mut Errors) {
    let Some(sel) = selector else { return };
    if sel.match_labels.len() > MAX_SELECTOR_LABELS {
        errs.push("spec.selector.matchLabels", format!("at most {MAX_SELECTOR_LABELS} labels are allowed"));
    }
    for (k, v) in &sel.match_labels {
        if k.is_empty() {
            errs.push("spec.selector.matchLabels", format!("empty key is not supported in selector: \"={v}\""));
        }
        if k.contains('*') || v.contains('*') {
            errs.push(
                format!("spec.selector.matchLabels[{k}]"),
                format!("wildcard is not supported in selector: \"{k}={v}\""),
            );
        }
    }
}

/// (canonical group, kind) pairs a policy may attach to.
const ALLOWED_TARGETS: [(&str, &str); 4] = [
    ("", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
];

fn validate_target_ref(path: &str, r: &PolicyTargetReference, policy_ns: &str, errs: &mut Errors) {
    if r.name.is_empty() {
        errs.push(format!("{path}.name"), "targetRef name must be set");
    }
    if !ALLOWED_TARGETS.contains(&(r.canonical_group(), r.kind.as_str())) {
        errs.push(
            format!("{path}.kind"),
            format!(
                "unsupported target {:?}: must be one of core/Service, networking.istio.io/ServiceEntry, \
                 gateway.networking.k8s.io/Gateway, gateway.networking.k8s.io/GatewayClass",
                format!("{}/{}", r.group, r.kind)
            ),
        );
    }
    if !r.namespace.is_empty() && r.namespace != policy_ns {
        errs.push(
            format!("{path}.namespace"),
            format!("cross-namespace references are not supported (policy namespace is {policy_ns:?})"),
        );
    }
}

fn validate_target_refs(
    target_ref: &Option<PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    policy_ns: &str,
    errs: &mut Errors,
) {
    if let Some(r) = target_ref {
        validate_target_ref("spec.targetRef", r, policy_ns, errs);
    }
    if target_refs.len() > MAX_TARGET_REFS {
        errs.push("spec.targetRefs", format!("at most {MAX_TARGET_REFS} target references are allowed"));
    }
    for (i, r) in target_refs.iter().enumerate() {
        validate_target_ref(&format!("spec.targetRefs[{i}]"), r, policy_ns, errs);
    }
}

fn port_reason(v: &str) -> Option<String> {
    parse_port(v).is_none().then(|| format!("{v:?} is not a valid port: must be a number in 0..65535"))
}

fn service_account_reason(v: &str) -> Option<String> {
    if v.contains('*') {
        return Some(format!("{v:?}: wildcards are not supported in service accounts"));
    }
    if v.len() > MAX_SERVICE_ACCOUNT_LEN {
        return Some(format!("service account must be at most {MAX_SERVICE_ACCOUNT_LEN} characters"));
    }
    let parts: Vec<&str> = v.split('/').collect();
    if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Some(format!("{v:?} is not of the form <namespace>/<serviceaccount> or <serviceaccount>"));
    }
    None
}

fn trust_domain_reason(v: &str) -> Option<String> {
    if v.contains('/') {
        return Some(format!("trust domain {v:?} must not contain '/'"));
    }
    let stars = v.matches('*').count();
    if stars > 1 || (stars == 1 && !v.starts_with('*') && !v.ends_with('*')) {
        return Some(format!("trust domain {v:?}: wildcard '*' is only supported once, at the start or the end"));
    }
    None
}

/// Envoy URI templates as Istio allows them: `{*}` (one segment) and `{**}` (any suffix) as whole segments,
/// `{**}` as the last operator, and no other `*`, `{` or `}`.
pub(crate) fn path_template_reason(path: &str) -> Option<String> {
    if !(path.contains("{*}") || path.contains("{**}")) {
        return None;
    }
    let bad = |why: &str| Some(format!("invalid or unsupported path template {path:?}: {why}"));
    let Some(rest) = path.strip_prefix('/') else { return bad("must start with '/'") };
    let mut seen_any = false;
    for segment in rest.split('/') {
        match segment {
            "{*}" | "{**}" => {
                if seen_any {
                    return bad("`{**}` must be the last operator");
                }
                seen_any = segment == "{**}";
            }
            s if s.contains(['*', '{', '}']) => {
                return bad("`{*}` and `{**}` must be whole path segments; no other '*', '{' or '}' is allowed");
            }
            _ => {}
        }
    }
    None
}

#[derive(Clone, Copy)]
enum FieldKind {
    Value(ValueKind),
    Path,
}

fn check_values(path: &str, values: &[String], kind: FieldKind, errs: &mut Errors) {
    for (i, v) in values.iter().enumerate() {
        let field = format!("{path}[{i}]");
        if v.is_empty() {
            errs.push(field, "empty value is not allowed");
            continue;
        }
        let reason = match kind {
            FieldKind::Value(ValueKind::String) => None,
            FieldKind::Value(ValueKind::IpBlock) => v.parse::<Cidr>().err().map(|e| e.to_string()),
            FieldKind::Value(ValueKind::Port) => port_reason(v),
            FieldKind::Value(ValueKind::ServiceAccount) => service_account_reason(v),
            FieldKind::Value(ValueKind::TrustDomain) => trust_domain_reason(v),
            FieldKind::Path => path_template_reason(v),
        };
        if let Some(reason) = reason {
            errs.push(field, reason);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// AuthorizationPolicy

fn validate_authorization_policy(p: &AuthorizationPolicy, ns: &str, errs: &mut Errors) {
    validate_one_of_selector(&p.selector, &p.target_ref, &p.target_refs, errs);
    validate_selector(&p.selector, errs);
    validate_target_refs(&p.target_ref, &p.target_refs, ns, errs);

    if p.action == Action::Custom {
        errs.push(
            "spec.action",
            "CUSTOM action is not supported: Trellis has no external authorization providers; use ALLOW, DENY or AUDIT",
        );
    } else if p.provider.is_some() {
        errs.push("spec.provider", format!("`provider` must only be used with the CUSTOM action, found {}", p.action));
    }
    if p.action == Action::Deny && p.rules.is_empty() {
        errs.push(
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered; add an empty rule `{}` \
             if you want it to be triggered for every request",
        );
    }
    if p.rules.len() > MAX_RULES {
        errs.push("spec.rules", format!("at most {MAX_RULES} rules are allowed"));
    }
    for (i, rule) in p.rules.iter().enumerate() {
        validate_rule(&format!("spec.rules[{i}]"), rule, errs);
    }
}

fn validate_rule(path: &str, rule: &Rule, errs: &mut Errors) {
    for (j, from) in rule.from.iter().enumerate() {
        validate_source(&format!("{path}.from[{j}].source"), &from.source, errs);
    }
    for (j, to) in rule.to.iter().enumerate() {
        validate_operation(&format!("{path}.to[{j}].operation"), &to.operation, errs);
    }
    for (k, cond) in rule.when.iter().enumerate() {
        let cpath = format!("{path}.when[{k}]");
        let parsed = if cond.key.is_empty() {
            errs.push(format!("{cpath}.key"), "`key` must not be empty");
            None
        } else {
            match cond.parsed_key() {
                Ok(key) => Some(key),
                Err(reason) => {
                    errs.push(format!("{cpath}.key"), reason);
                    None
                }
            }
        };
        if cond.values.is_empty() && cond.not_values.is_empty() {
            errs.push(
                cpath.clone(),
                format!("at least one of `values` or `notValues` must be set for key {}", cond.key),
            );
        }
        let kind = FieldKind::Value(parsed.as_ref().map_or(ValueKind::String, ConditionKey::value_kind));
        check_values(&format!("{cpath}.values"), &cond.values, kind, errs);
        check_values(&format!("{cpath}.notValues"), &cond.not_values, kind, errs);
    }
}

fn source_field_kind(name: &str) -> ValueKind {
    match name {
        "ipBlocks" | "notIpBlocks" | "remoteIpBlocks" | "notRemoteIpBlocks" => ValueKind::IpBlock,
        "serviceAccounts" | "notServiceAccounts" => ValueKind::ServiceAccount,
        "trustDomains" | "notTrustDomains" => ValueKind::TrustDomain,
        _ => ValueKind::String,
    }
}

fn validate_source(path: &str, s: &Source, errs: &mut Errors) {
    if s.is_empty() {
        errs.push(path, "`source` must not be empty: set at least one field");
        return;
    }
    for (name, values) in s.fields() {
        check_values(&format!("{path}.{name}"), values, FieldKind::Value(source_field_kind(name)), errs);
    }
    let has_sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_identity = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if has_sa && has_identity {
        errs.push(
            path,
            "serviceAccounts/notServiceAccounts cannot be combined with principals, notPrincipals, namespaces or \
             notNamespaces",
        );
    }
    for (name, values) in [("serviceAccounts", &s.service_accounts), ("notServiceAccounts", &s.not_service_accounts)] {
        if values.len() > MAX_SERVICE_ACCOUNTS {
            errs.push(format!("{path}.{name}"), format!("at most {MAX_SERVICE_ACCOUNTS} values are allowed"));
        }
    }
}

fn validate_operation(path: &str, op: &Operation, errs: &mut Errors) {
    if op.is_empty() {
        errs.push(path, "`operation` must not be empty: set at least one field");
        return;
    }
    for (name, values) in op.fields() {
        let kind = match name {
            "ports" | "notPorts" => FieldKind::Value(ValueKind::Port),
            "paths" | "notPaths" => FieldKind::Path,
            _ => FieldKind::Value(ValueKind::String),
        };
        check_values(&format!("{path}.{name}"), values, kind, errs);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// PeerAuthentication

fn validate_peer_authentication(p: &PeerAuthentication, errs: &mut Errors) {
    validate_selector(&p.selector, errs);
    let has_labels = p.selector.as_ref().is_some_and(|s| !s.match_labels.is_empty());
    if !p.port_level_mtls.is_empty() && !has_labels {
        errs.push(
            "spec.portLevelMtls",
            "portLevelMtls requires a workload selector with at least one label (mesh- and namespace-wide \
             PeerAuthentication cannot have port-level mTLS)",
        );
    }
    for port in p.port_level_mtls.keys() {
        if *port == 0 || *port > 65535 {
            errs.push(format!("spec.portLevelMtls[{port}]"), "port must be in range 1..65535");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RequestAuthentication

fn validate_request_authentication(p: &RequestAuthentication, ns: &str, errs: &mut Errors) {
    validate_one_of_selector(&p.selector, &p.target_ref, &p.target_refs, errs);
    validate_selector(&p.selector, errs);
    validate_target_refs(&p.target_ref, &p.target_refs, ns, errs);
    if p.jwt_rules.len() > MAX_JWT_RULES {
        errs.push("spec.jwtRules", format!("at most {MAX_JWT_RULES} rules are allowed"));
    }
    for (i, rule) in p.jwt_rules.iter().enumerate() {
        validate_jwt_rule(&format!("spec.jwtRules[{i}]"), rule, errs);
    }
}

fn validate_jwt_rule(path: &str, r: &JwtRule, errs: &mut Errors) {
    if r.issuer.is_empty() {
        errs.push(format!("{path}.issuer"), "issuer must be set");
    }
    check_values(&format!("{path}.audiences"), &r.audiences, FieldKind::Value(ValueKind::String), errs);
    if let Err(reason) = if r.jwks_uri.is_empty() { Ok(()) } else { check_http_url(&r.jwks_uri) } {
        errs.push(format!("{path}.jwksUri"), reason);
    }
    if let Err(reason) = if r.jwks.is_empty() { Ok(()) } else { check_jwks(&r.jwks) } {
        errs.push(format!("{path}.jwks"), format!("jwks parse error: {reason}"));
    }
    if !r.jwks_uri.is_empty() && !r.jwks.is_empty() {
        errs.push(path, "only one of jwksUri or jwks can be set");
    }
    for (j, h) in r.from_headers.iter().enumerate() {
        let field = format!("{path}.fromHeaders[{j}].name");
        if h.name.is_empty() {
            errs.push(field, "location header name must be set");
        } else if !is_http_token(&h.name) {
            errs.push(field, format!("{:?} is not a valid HTTP header name", h.name));
        }
    }
    check_values(&format!("{path}.fromParams"), &r.from_params, FieldKind::Value(ValueKind::String), errs);
    check_values(&format!("{path}.fromCookies"), &r.from_cookies, FieldKind::Value(ValueKind::String), errs);
    if !r.output_payload_to_header.is_empty() && !is_http_token(&r.output_payload_to_header) {
        errs.push(
            format!("{path}.outputPayloadToHeader"),
            format!("{:?} is not a valid HTTP header name", r.output_payload_to_header),
        );
    }
    for (j, c) in r.output_claim_to_headers.iter().enumerate() {
        let cpath = format!("{path}.outputClaimToHeaders[{j}]");
        if c.header.is_empty() {
            errs.push(format!("{cpath}.header"), "header must be set");
        } else if !c.header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            errs.push(
                format!("{cpath}.header"),
                format!("header name {:?} is not a valid header name (allowed: A-Z, a-z, 0-9, '-', '_')", c.header),
            );
        }
        if c.claim.is_empty() {
            errs.push(format!("{cpath}.claim"), "claim must be set");
        }
    }
    if let Some(t) = &r.timeout {
        let reason = match parse_go_duration(t) {
            Err(e) => Some(e.to_string()),
            Ok(d) if d < Duration::from_millis(1) => Some(format!("duration {t:?} must be at least 1ms")),
            Ok(d) if d.as_nanos() % 1_000_000 != 0 => {
                Some(format!("duration {t:?}: only millisecond precision is supported"))
            }
            Ok(_) => None,
        };
        if let Some(reason) = reason {
            errs.push(format!("{path}.timeout"), reason);
        }
    }
    if r.space_delimited_claims.len() > MAX_SPACE_DELIMITED_CLAIMS {
        errs.push(
            format!("{path}.spaceDelimitedClaims"),
            format!("at most {MAX_SPACE_DELIMITED_CLAIMS} values are allowed"),
        );
    }
    check_values(
        &format!("{path}.spaceDelimitedClaims"),
        &r.space_delimited_claims,
        FieldKind::Value(ValueKind::String),
        errs,
    );
}

/// RFC 9110 token: the characters allowed in an HTTP header name.
fn is_http_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A JWKS is either a key set `{"keys": [...]}` or a single JWK; each key needs a `kty`.
pub(crate) fn check_jwks(s: &str) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let has_kty = |k: &serde_json::Value| k.get("kty").is_some_and(serde_json::Value::is_string);
    match obj.get("keys") {
        Some(serde_json::Value::Array(keys)) => {
            for (i, k) in keys.iter().enumerate() {
                if !has_kty(k) {
                    return Err(format!("keys[{i}]: a JWK must be an object with a string \"kty\""));
                }
            }
            Ok(())
        }
        Some(_) => Err("\"keys\" must be an array".to_string()),
        None if has_kty(&v) => Ok(()),
        None => Err("expected a JWK set with \"keys\" or a single JWK with \"kty\"".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates() {
        for ok in ["/foo/{*}", "/foo/{**}", "/foo/{**}/", "/{*}/bar/{**}", "/foo/{*}/{*}", "/foo/{**}/bar", "/a*b"] {
            assert_eq!(path_template_reason(ok), None, "{ok}");
        }
        for bad in [
            "foo/{*}",
            "/foo/{**}/{*}",
            "/foo/{**}/{**}",
            "/foo/{*}.txt",
            "/foo/{bar}/{*}",
            "/foo/{*}/*",
            "/foo/*/{*}",
            "/foo/{*}/**",
            "/{x=*}/{*}",
            "/{}/{*}",
        ] {
            assert!(path_template_reason(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn jwks() {
        assert!(check_jwks(r#"{"keys":[{"kty":"RSA","n":"x","e":"AQAB"}]}"#).is_ok());
        assert!(check_jwks(r#"{"kty":"EC","crv":"P-256"}"#).is_ok());
        assert!(check_jwks(r#"{"keys":[]}"#).is_ok());
        for bad in ["", "not json", "[]", r#"{"keys":{}}"#, r#"{"keys":[{}]}"#, r#"{"foo":1}"#] {
            assert!(check_jwks(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_accounts_and_trust_domains() {
        assert_eq!(service_account_reason("default/sleep"), None);
        assert_eq!(service_account_reason("sleep"), None);
        assert!(service_account_reason("a/b/c").is_some());
        assert!(service_account_reason("/sleep").is_some());
        assert!(service_account_reason("default/").is_some());
        assert!(service_account_reason("default/*").is_some());
        assert!(service_account_reason(&"a".repeat(321)).is_some());
        for ok in ["cluster.local", "*", "*.local", "td-*"] {
            assert_eq!(trust_domain_reason(ok), None, "{ok}");
        }
        for bad in ["a/b", "a*b", "*a*", "**"] {
            assert!(trust_domain_reason(bad).is_some(), "{bad}");
        }
    }
}
