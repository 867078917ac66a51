//! `trellisctl authz eval`: the JSON request format, and the evaluation of such a request against a set of
//! resources, printed as one JSON object. Lives here so the CLI stays a thin wrapper and the format is tested with
//! the evaluator.
//!
//! Request (`REQUEST.json`; unknown fields are errors):
//! ```json
//! {"source": {"principal": "cluster.local/ns/foo/sa/sleep", "ip": "10.0.0.1", "remote_ip": "10.9.9.9"},
//!  "destination": {"namespace": "foo", "labels": {"app": "httpbin"}, "ip": "10.0.0.2", "port": 8080},
//!  "protocol": "http",
//!  "http": {"method": "GET", "path": "/ip?x=1", "host": "httpbin.foo", "headers": {"x-token": "a"},
//!           "jwt": {"iss": "https://issuer", "sub": "alice", "groups": ["admin"]}}}
//! ```
//! `principal` null or missing = plaintext peer; `remote_ip` defaults to `ip`; `labels` to none; `http` is
//! required with `"protocol": "http"` and forbidden with `"tcp"`; `host`, `headers` and `jwt` (the verified
//! token payload) are optional. Without `jwt`, tokens in `headers` (e.g. `"authorization": "Bearer ..."`) or in
//! the path's query are verified as the proxy does, against the RequestAuthentication documents given (inline
//! `jwks` only: a `jwksUri` is not fetched offline, so its tokens get 401); `time` (Unix seconds, optional) is the
//! instant `exp`/`nbf` are checked at, which `trellisctl` sets to now.
//!
//! Result: `{"decision": "allow"|"deny", "status": 400|401|403|null, "policy": "NS/NAME"|null,
//! "action": "ALLOW"|"DENY"|null, "rule": N|null, "reason": "..."}`, plus `"requestPrincipal": "iss/sub"` when a
//! token was verified. For HTTP, as in the proxy: a path that cannot be normalized (Istio BASE, e.g. `%00`) is
//! 400; an invalid token 401 and a token whose audience is not allowed 403 (both before authorization, `policy`
//! null); a denial by authorization 403. TCP denials close the connection (null). A plaintext peer on a port
//! whose effective PeerAuthentication mode is STRICT is rejected before any authorization or HTTP exchange, so
//! that denial has status null whatever the protocol, `policy` naming the PeerAuthentication and `action` null.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::authz::Action;
use crate::eval::{CompileError, CompiledPolicies, Decision, HttpRequest, Request};
use crate::jwt::{JwtAuthenticator, JwtOutcome, TokenSource};
use crate::peer_authn::MtlsMode;
use crate::resource::Resource;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalRequest {
    pub source: EvalSource,
    pub destination: EvalDestination,
    pub protocol: EvalProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<EvalHttp>,
    /// Unix seconds at which token `exp`/`nbf` are checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSource {
    /// SPIFFE ID without `spiffe://`; `None` = plaintext peer.
    #[serde(default)]
    pub principal: Option<String>,
    pub ip: IpAddr,
    /// Original client address (X-Forwarded-For / PROXY protocol); defaults to `ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDestination {
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ip: IpAddr,
    /// Workload (target) port.
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalProtocol {
    Tcp,
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalHttp {
    pub method: String,
    /// May carry `?query`, which `paths` ignore.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Names are case-insensitive.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Verified JWT payload, as RequestAuthentication would have accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<serde_json::Value>,
}

/// A request file that cannot be used, with the offending field (`source.ip`; empty for the whole document).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct EvalRequestError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for EvalRequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid request: {}", self.message)
        } else {
            write!(f, "invalid request: {}: {}", self.field, self.message)
        }
    }
}

fn request_error(field: &str, message: impl Into<String>) -> EvalRequestError {
    EvalRequestError { field: field.to_string(), message: message.into() }
}

impl EvalRequest {
    /// Parses and checks a request document.
    pub fn from_json(text: &str) -> Result<EvalRequest, EvalRequestError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let request: EvalRequest = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            request_error(&field, e.into_inner().to_string())
        })?;
        request.check()?;
        Ok(request)
    }

    fn check(&self) -> Result<(), EvalRequestError> {
        match &self.source.principal {
            Some(p) if p.is_empty() => {
                return Err(request_error("source.principal", "must not be empty; use null for a plaintext peer"));
            }
            Some(p) if p.starts_with("spiffe://") => {
                return Err(request_error(
                    "source.principal",
                    format!("write the SPIFFE ID without `spiffe://`, e.g. {:?}", &p["spiffe://".len()..]),
                ));
            }
            _ => {}
        }
        if self.destination.namespace.is_empty() {
            return Err(request_error("destination.namespace", "must not be empty"));
        }
        match (self.protocol, &self.http) {
            (EvalProtocol::Http, None) => {
                return Err(request_error("http", "is required when protocol is \"http\" (method and path)"));
            }
            (EvalProtocol::Tcp, Some(_)) => {
                return Err(request_error("http", "is only allowed when protocol is \"http\""));
            }
            _ => {}
        }
        if let Some(h) = &self.http {
            let token = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
            if h.method.is_empty() || !h.method.bytes().all(token) {
                return Err(request_error(
                    "http.method",
                    format!("{:?} is not an upper-case HTTP method (Istio rejects other methods with 400)", h.method),
                ));
            }
            if !h.path.starts_with('/') {
                return Err(request_error("http.path", format!("{:?} must start with '/'", h.path)));
            }
            if h.headers.keys().any(|k| k.is_empty()) {
                return Err(request_error("http.headers", "header names must not be empty"));
            }
            if h.jwt.as_ref().is_some_and(|j| !j.is_object()) {
                return Err(request_error("http.jwt", "must be an object (the verified token payload)"));
            }
        }
        Ok(())
    }

    /// The evaluator's view of this request (borrows it).
    pub fn as_request(&self) -> Request<'_> {
        let mut req =
            Request::tcp(self.source.principal.as_deref(), self.source.ip, self.destination.ip, self.destination.port)
                .with_remote_ip(self.source.remote_ip.unwrap_or(self.source.ip));
        if let Some(h) = &self.http {
            let mut http = HttpRequest::new(&h.method, &h.path).with_headers(&h.headers);
            http.host = h.host.as_deref();
            http.jwt = h.jwt.as_ref();
            req = req.with_http(http);
        }
        req
    }

    /// Evaluates against already compiled policies (PeerAuthentication first, then authorization).
    pub fn explain_with(&self, policies: &CompiledPolicies) -> Explanation {
        let dst = &self.destination;
        let workload = policies.for_workload(&dst.namespace, &dst.labels);
        let mtls = workload.mtls().port(dst.port);
        if self.source.principal.is_none() && mtls.mode == MtlsMode::Strict {
            let by = mtls.policy.as_ref().map(|k| format!("{}/{}", k.namespace, k.name));
            return Explanation {
                decision: Verdict::Deny,
                status: None,
                reason: format!(
                    "plaintext connection rejected: port {} requires mTLS (STRICT, {}-level PeerAuthentication {})",
                    dst.port,
                    mtls.level,
                    by.as_deref().unwrap_or("?")
                ),
                policy: by,
                action: None,
                rule: None,
                request_principal: None,
            };
        }
        let http = self.protocol == EvalProtocol::Http;
        let Some(h) = &self.http else {
            return Explanation::from_decision(&workload.evaluate(&self.as_request()), false, None);
        };
        // As the proxy: normalize, then authenticate, then authorize.
        let (path, query) = match h.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (h.path.as_str(), None),
        };
        let path = match crate::path::normalize_path(path) {
            Ok(p) => p,
            Err(e) => return Explanation::refused(400, format!("bad request: {e}")),
        };
        let target = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.into_owned(),
        };
        let verified;
        let jwt = match &h.jwt {
            Some(jwt) => Some(jwt),
            None => {
                let rules = policies.jwt_rules_for(&dst.namespace, &dst.labels);
                let authn = JwtAuthenticator::new(rules, |_| None, crate::jwt::DEFAULT_CLOCK_SKEW);
                match authn
                    .authenticate(TokenSource { method: &h.method, headers: &h.headers, query }, self.time.unwrap_or(0))
                {
                    JwtOutcome::NoToken => None,
                    JwtOutcome::Verified(v) => {
                        verified = v.payload;
                        Some(&verified)
                    }
                    JwtOutcome::Rejected(r) => {
                        return Explanation::refused(r.status, format!("JWT rejected: {}", r.reason));
                    }
                }
            }
        };
        let mut req = self.as_request();
        let mut request = HttpRequest::new(&h.method, &target).with_headers(&h.headers);
        request.host = h.host.as_deref();
        request.jwt = jwt;
        req = req.with_http(request);
        let principal = jwt.map(|j| {
            let part = |k: &str| j.get(k).and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
            format!("{}/{}", part("iss"), part("sub"))
        });
        Explanation::from_decision(&workload.evaluate(&req), http, principal)
    }
}

/// `"allow"` / `"deny"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// The CLI's answer; serializes to exactly the documented object (keys in this order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub decision: Verdict,
    /// 403 for a denied HTTP request; null otherwise.
    pub status: Option<u16>,
    /// `NS/NAME` of the deciding policy (the PeerAuthentication for a STRICT rejection).
    pub policy: Option<String>,
    /// `ALLOW` / `DENY` of the deciding AuthorizationPolicy.
    pub action: Option<Action>,
    /// Index of the matching rule in the deciding policy.
    pub rule: Option<usize>,
    /// One readable line (the decision's `Display`, or the mTLS rejection).
    pub reason: String,
    /// `iss/sub` of the token verified for an HTTP request.
    #[serde(rename = "requestPrincipal", default, skip_serializing_if = "Option::is_none")]
    pub request_principal: Option<String>,
}

impl Explanation {
    fn from_decision(decision: &Decision<'_>, http: bool, request_principal: Option<String>) -> Explanation {
        Explanation {
            decision: if decision.allowed { Verdict::Allow } else { Verdict::Deny },
            status: (!decision.allowed && http).then_some(403),
            policy: decision.deciding.map(|p| format!("{}/{}", p.namespace, p.name)),
            action: decision.deciding.map(|p| p.action),
            rule: decision.deciding.map(|p| p.rule_index),
            reason: decision.to_string(),
            request_principal,
        }
    }

    /// Refused before authorization (bad request, token).
    fn refused(status: u16, reason: String) -> Explanation {
        Explanation {
            decision: Verdict::Deny,
            status: Some(status),
            policy: None,
            action: None,
            rule: None,
            reason,
            request_principal: None,
        }
    }

    pub fn allowed(&self) -> bool {
        self.decision == Verdict::Allow
    }

    /// Compact JSON, one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("Explanation serialization cannot fail")
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("Explanation serialization cannot fail")
    }
}

/// Compiles `resources` (AuthorizationPolicy, PeerAuthentication, RequestAuthentication) with `root_namespace`
/// and evaluates `request`. Fails only for resources that could not have passed validation.
pub fn explain(
    resources: &[Resource],
    root_namespace: &str,
    request: &EvalRequest,
) -> Result<Explanation, CompileError> {
    Ok(request.explain_with(&CompiledPolicies::compile(resources, root_namespace)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_documents;

    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]
    to: [{operation: {methods: [GET], paths: [/ip]}}]
  - to: [{operation: {ports: ["9000"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/admin*]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-8443, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  portLevelMtls: {8443: {mode: STRICT}}
"#;

    fn eval(request: serde_json::Value) -> serde_json::Value {
        let resources = parse_documents(POLICIES).unwrap();
        let req = EvalRequest::from_json(&request.to_string()).unwrap();
        serde_json::from_str(&explain(&resources, crate::DEFAULT_ROOT_NAMESPACE, &req).unwrap().to_json()).unwrap()
    }

    fn http(principal: Option<&str>, port: u16, method: &str, path: &str) -> serde_json::Value {
        serde_json::json!({
            "source": {"principal": principal, "ip": "10.0.0.1"},
            "destination": {"namespace": "foo", "labels": {"app": "httpbin"}, "ip": "10.0.0.2", "port": port},
            "protocol": "http",
            "http": {"method": method, "path": path, "host": "httpbin.foo"}
        })
    }

    fn tcp(principal: Option<&str>, port: u16) -> serde_json::Value {
        serde_json::json!({
            "source": {"principal": principal, "ip": "10.0.0.1"},
            "destination": {"namespace": "foo", "labels": {"app": "httpbin"}, "ip": "10.0.0.2", "port": port},
            "protocol": "tcp"
        })
    }

    const SLEEP: Option<&str> = Some("cluster.local/ns/foo/sa/sleep");

    #[test]
    fn allowed_http_request() {
        assert_eq!(
            eval(http(SLEEP, 8080, "GET", "/ip?verbose=1")),
            serde_json::json!({"decision": "allow", "status": null, "policy": "foo/httpbin", "action": "ALLOW",
                "rule": 0, "reason": "allowed by ALLOW policy foo/httpbin rule 0"})
        );
    }

    #[test]
    fn denied_http_request_is_403() {
        assert_eq!(
            eval(http(SLEEP, 8080, "GET", "/admin/users")),
            serde_json::json!({"decision": "deny", "status": 403, "policy": "foo/deny-admin", "action": "DENY",
                "rule": 0, "reason": "denied by DENY policy foo/deny-admin rule 0"})
        );
        assert_eq!(
            eval(http(SLEEP, 8080, "POST", "/ip")),
            serde_json::json!({"decision": "deny", "status": 403, "policy": null, "action": null, "rule": null,
                "reason": "denied: no ALLOW policy matched"})
        );
    }

    #[test]
    fn tcp_denial_has_no_status() {
        // The DENY rule's `paths` is removed on TCP (wider deny): every TCP connection is denied.
        let out = eval(tcp(SLEEP, 9000));
        assert_eq!(out["decision"], "deny");
        assert_eq!(out["status"], serde_json::Value::Null);
        assert_eq!(out["policy"], "foo/deny-admin");
    }

    #[test]
    fn tcp_allow_and_default_allow() {
        let resources = parse_documents(POLICIES).unwrap();
        let allow_only: Vec<_> = resources.into_iter().filter(|r| r.metadata.name == "httpbin").collect();
        let req = EvalRequest::from_json(&tcp(None, 9000).to_string()).unwrap();
        let out = explain(&allow_only, crate::DEFAULT_ROOT_NAMESPACE, &req).unwrap();
        assert_eq!((out.decision, out.status, out.rule), (Verdict::Allow, None, Some(1)));
        let out = explain(&[], crate::DEFAULT_ROOT_NAMESPACE, &req).unwrap();
        assert_eq!(
            out.to_json(),
            r#"{"decision":"allow","status":null,"policy":null,"action":null,"rule":null,"reason":"allowed: no ALLOW policy applies"}"#
        );
    }

    #[test]
    fn plaintext_to_strict_port_is_rejected_before_authorization() {
        for request in [http(None, 8443, "GET", "/ip"), tcp(None, 8443)] {
            assert_eq!(
                eval(request),
                serde_json::json!({"decision": "deny", "status": null, "policy": "foo/strict-8443", "action": null,
                    "rule": null, "reason": "plaintext connection rejected: port 8443 requires mTLS (STRICT, \
                    port-level PeerAuthentication foo/strict-8443)"})
            );
        }
        // mTLS on that port goes on to authorization.
        assert_eq!(eval(http(SLEEP, 8443, "GET", "/ip"))["decision"], "allow");
        // Plaintext on other (PERMISSIVE) ports is authorized normally: no principal, so no ALLOW match.
        assert_eq!(eval(http(None, 8080, "GET", "/ip"))["status"], 403);
    }

    #[test]
    fn request_fields_reach_the_evaluator() {
        let text = r#"{"source": {"principal": "cluster.local/ns/foo/sa/sleep", "ip": "10.0.0.1", "remote_ip": "2001:db8::1"},
            "destination": {"namespace": "foo", "ip": "10.0.0.2", "port": 80},
            "protocol": "http",
            "http": {"method": "GET", "path": "/x", "host": "h", "headers": {"X-A": "1"}, "jwt": {"iss": "i", "sub": "s"}}}"#;
        let req = EvalRequest::from_json(text).unwrap();
        let r = req.as_request();
        assert_eq!(r.remote_ip, "2001:db8::1".parse::<IpAddr>().unwrap());
        let h = r.http().unwrap();
        assert_eq!((h.method, h.path, h.host), ("GET", "/x", Some("h")));
        let mut seen = Vec::new();
        h.headers.for_each_value("x-a", &mut |v| seen.push(v.to_string()));
        assert_eq!(seen, ["1"]);
        assert_eq!(h.jwt.unwrap()["sub"], "s");
        assert!(req.destination.labels.is_empty());
        // remote_ip defaults to ip; missing principal = plaintext.
        let req = EvalRequest::from_json(&tcp(None, 1).to_string()).unwrap();
        assert_eq!((req.as_request().remote_ip, req.source.principal.as_deref()), (req.source.ip, None));
        assert!(!req.as_request().is_http());
    }

    #[test]
    fn request_errors_are_precise() {
        let base = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = http(SLEEP, 80, "GET", "/");
            f(&mut v);
            EvalRequest::from_json(&v.to_string()).unwrap_err().to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            (
                base(&|v| v["extra"] = 1.into()),
                "invalid request: extra: unknown field `extra`, expected one of `source`",
            ),
            (
                base(&|v| v["source"]["ip"] = "10.0.0.300".into()),
                "invalid request: source.ip: invalid IP address syntax",
            ),
            (base(&|v| v["source"]["remote_ip"] = "x".into()), "invalid request: source.remote_ip: invalid IP address"),
            (
                base(&|v| v["source"]["principal"] = "spiffe://cluster.local/ns/a/sa/b".into()),
                "source.principal: write the SPIFFE ID without `spiffe://`",
            ),
            (base(&|v| v["source"]["principal"] = "".into()), "source.principal: must not be empty; use null"),
            (
                base(&|v| v["destination"]["port"] = 70000.into()),
                "invalid request: destination.port: invalid value: integer `70000`",
            ),
            (base(&|v| v["destination"]["namespace"] = "".into()), "destination.namespace: must not be empty"),
            (
                base(&|v| v["destination"].as_object_mut().unwrap().retain(|k, _| k != "ip")),
                "invalid request: destination: missing field `ip`",
            ),
            (base(&|v| v["protocol"] = "grpc".into()), "invalid request: protocol: unknown variant `grpc`"),
            (
                base(&|v| v["protocol"] = "tcp".into()),
                "invalid request: http: is only allowed when protocol is \"http\"",
            ),
            (
                base(&|v| v.as_object_mut().unwrap().retain(|k, _| k != "http")),
                "invalid request: http: is required when protocol is \"http\"",
            ),
            (
                base(&|v| v["http"]["method"] = "get".into()),
                "invalid request: http.method: \"get\" is not an upper-case HTTP method",
            ),
            (base(&|v| v["http"]["path"] = "ip".into()), "invalid request: http.path: \"ip\" must start with '/'"),
            (
                base(&|v| v["http"]["headers"] = serde_json::json!({"a": 1})),
                "invalid request: http.headers.a: invalid type: integer `1`",
            ),
            (base(&|v| v["http"]["jwt"] = "token".into()), "invalid request: http.jwt: must be an object"),
            (
                base(&|v| v["http"]["body"] = "x".into()),
                "invalid request: http.body: unknown field `body`, expected one of `method`",
            ),
        ];
        for (got, want) in cases {
            assert!(got.starts_with(want) || got.contains(want), "got {got:?}, want {want:?}");
        }
        assert!(EvalRequest::from_json("not json").unwrap_err().to_string().starts_with("invalid request: expected"));
    }

    #[test]
    fn tokens_in_headers_are_verified_like_the_proxy_does() {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
        let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
        let key = EncodingKey::from_ed_der(pair.to_pkcs8v1().unwrap().as_ref());
        let jwks = serde_json::json!({"keys": [Jwk::from_encoding_key(&key, Algorithm::EdDSA).unwrap()]});
        let policies = format!(
            r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules:
  - issuer: https://issuer
    audiences: [httpbin]
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: alice-only, namespace: foo}}
spec:
  rules: [{{from: [{{source: {{requestPrincipals: [https://issuer/alice]}}}}]}}]
"#
        );
        let resources = parse_documents(&policies).unwrap();
        let sign =
            |claims: serde_json::Value| jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap();
        let now = 1_800_000_000u64;
        let run = |token: Option<String>, path: &str| {
            let mut request = http(SLEEP, 8080, "GET", path);
            if let Some(t) = token {
                request["http"]["headers"] = serde_json::json!({"Authorization": format!("Bearer {t}")});
            }
            request["time"] = now.into();
            let req = EvalRequest::from_json(&request.to_string()).unwrap();
            serde_json::to_value(explain(&resources, crate::DEFAULT_ROOT_NAMESPACE, &req).unwrap()).unwrap()
        };
        let claims = serde_json::json!({"iss": "https://issuer", "sub": "alice", "aud": "httpbin", "exp": now + 60});
        let ok = run(Some(sign(claims.clone())), "/ip");
        assert_eq!((&ok["decision"], &ok["requestPrincipal"]), (&"allow".into(), &"https://issuer/alice".into()));
        let mut bob = claims.clone();
        bob["sub"] = "bob".into();
        let denied = run(Some(sign(bob)), "/ip");
        assert_eq!((&denied["status"], &denied["reason"]), (&403.into(), &"denied: no ALLOW policy matched".into()));
        assert_eq!(denied["requestPrincipal"], "https://issuer/bob");
        assert_eq!(run(None, "/ip")["status"], 403, "no token: no principal");
        let mut expired = claims.clone();
        expired["exp"] = (now - 61).into();
        let out = run(Some(sign(expired)), "/ip");
        assert_eq!(
            (&out["decision"], &out["status"], &out["policy"]),
            (&"deny".into(), &401.into(), &serde_json::Value::Null)
        );
        assert!(out["reason"].as_str().unwrap().starts_with("JWT rejected: Jwt is expired"), "{out}");
        let mut aud = claims.clone();
        aud["aud"] = "other".into();
        assert_eq!(run(Some(sign(aud)), "/ip")["status"], 403);
        assert_eq!(run(Some("garbage".into()), "/ip")["status"], 401);
        // Tokens in the query, and the path normalized before matching.
        let out = run(None, &format!("/x/../ip?access_token={}", sign(claims.clone())));
        assert_eq!(out["decision"], "allow", "{out}");
        let out = run(None, "/a%00b");
        assert_eq!(
            (&out["status"], out["reason"].as_str().unwrap()),
            (&400.into(), "bad request: path contains an encoded NUL (%00)")
        );
    }

    /// A CORS preflight skips authentication as in Istio (an expired token on it is not a 401), while the same
    /// token on a GET is; authorization still applies (no request principal, so alice's rule does not match).
    #[test]
    fn cors_preflight_bypasses_authentication_like_the_proxy() {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
        let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
        let key = EncodingKey::from_ed_der(pair.to_pkcs8v1().unwrap().as_ref());
        let jwks = serde_json::json!({"keys": [Jwk::from_encoding_key(&key, Algorithm::EdDSA).unwrap()]});
        let policies = format!(
            r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules: [{{issuer: https://issuer, jwks: '{jwks}'}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: rules, namespace: foo}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: [https://issuer/alice]}}}}]
  - to: [{{operation: {{methods: [OPTIONS], paths: [/open]}}}}]
"#
        );
        let resources = parse_documents(&policies).unwrap();
        let now = 1_800_000_000u64;
        let claims = serde_json::json!({"iss": "https://issuer", "sub": "alice", "exp": now - 600});
        let expired = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap();
        let run = |method: &str, path: &str, extra: serde_json::Value| {
            let mut request = http(SLEEP, 8080, method, path);
            let mut headers = serde_json::json!({"authorization": format!("Bearer {expired}")});
            headers.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            request["http"]["headers"] = headers;
            request["time"] = now.into();
            let req = EvalRequest::from_json(&request.to_string()).unwrap();
            serde_json::to_value(explain(&resources, crate::DEFAULT_ROOT_NAMESPACE, &req).unwrap()).unwrap()
        };
        let preflight = serde_json::json!({"origin": "https://app.example", "access-control-request-method": "GET"});
        assert_eq!(run("GET", "/open", preflight.clone())["status"], 401, "a GET is authenticated");
        let out = run("OPTIONS", "/open", preflight.clone());
        assert_eq!((&out["decision"], &out["requestPrincipal"]), (&"allow".into(), &serde_json::Value::Null), "{out}");
        let out = run("OPTIONS", "/other", preflight);
        assert_eq!((&out["status"], &out["reason"]), (&403.into(), &"denied: no ALLOW policy matched".into()));
        // Not a preflight without both headers, or with an empty one: authenticated as any request.
        for extra in [
            serde_json::json!({"origin": "https://app.example"}),
            serde_json::json!({"access-control-request-method": "GET"}),
            serde_json::json!({"origin": "", "access-control-request-method": "GET"}),
        ] {
            assert_eq!(run("OPTIONS", "/open", extra.clone())["status"], 401, "{extra}");
        }
    }
}
