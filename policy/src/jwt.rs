//! JWT request authentication (RequestAuthentication, reference §3): find the tokens a request carries at the
//! configured locations, verify them against the rule of their issuer, and say what the proxy does next.
//!
//! [`JwtAuthenticator::new`] parses every JWKS once per configuration change; [`JwtAuthenticator::authenticate`]
//! runs per request and takes the time as an argument (no clock, no I/O here). Outcomes follow Istio: no token →
//! pass without a request principal; a token that fails (format, signature, unknown key, algorithm, `exp`, `nbf`,
//! issuer) → 401; a valid token whose audience the rule does not accept → 403.
//!
//! Signatures are checked by the `jsonwebtoken` crate (aws-lc-rs backend, the crypto library the proxy already
//! uses). Only asymmetric algorithms are accepted: RS256/384/512, PS256/384/512, ES256/384, EdDSA. `alg: none`
//! does not parse, and HMAC is refused whatever the JWKS holds, so a public key can never serve as an HMAC secret.

use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::eval::Headers;
use crate::request_authn::JwtRule;

/// Allowed difference between our clock and the issuer's for `exp` and `nbf`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Istio's response bodies.
pub const UNAUTHORIZED_BODY: &str = "Jwt verification fails";
pub const AUDIENCE_BODY: &str = "Audiences in Jwt are not allowed";

/// The JWT rules that apply to one workload, with their keys parsed. Immutable; built once per config change.
#[derive(Debug, Default)]
pub struct JwtAuthenticator {
    providers: Vec<Provider>,
    clock_skew: u64,
    /// Every header a rule writes (`outputPayloadToHeader`, `outputClaimToHeaders`), lower case.
    output_headers: Vec<String>,
}

#[derive(Debug)]
struct Provider {
    issuer: String,
    audiences: Vec<String>,
    locations: Vec<Location>,
    keys: Vec<Key>,
    /// Why the JWKS gave no usable key (tokens of this issuer then get 401).
    jwks_problem: Option<String>,
    forward_original_token: bool,
    output_payload_to_header: Option<String>,
    /// (header, claim path).
    output_claim_to_headers: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// Lower-case header name and the prefix its value must start with (compared ignoring ASCII case).
    Header {
        name: String,
        prefix: String,
    },
    Param(String),
    Cookie(String),
}

struct Key {
    kid: Option<String>,
    key: DecodingKey,
    /// The algorithms this key may verify, as a ready-made validation (signature only; claims are checked here).
    validation: Validation,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("algorithms", &self.validation.algorithms).finish()
    }
}

/// What the proxy does with a request after authentication.
#[derive(Debug, Clone, PartialEq)]
pub enum JwtOutcome {
    /// No token at any configured location: the request goes on without a request principal.
    NoToken,
    /// Every token presented is valid. `payload` is the first token's claims (principal `iss/sub`).
    Verified(Verified),
    /// 401 (invalid token) or 403 (audience not allowed); nothing is forwarded.
    Rejected(Rejection),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub payload: Value,
    /// Header edits for the forwarded request.
    pub edits: HeaderEdits,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Lower-case names of headers to remove (tokens not forwarded).
    pub remove: Vec<String>,
    /// (lower-case name, value) to set, replacing any value the client sent.
    pub set: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// 401 or 403.
    pub status: u16,
    /// Why, for logs and `trellisctl authz eval` (the response body is Istio's fixed text).
    pub reason: String,
}

impl Rejection {
    fn invalid(reason: impl Into<String>) -> Rejection {
        Rejection { status: 401, reason: reason.into() }
    }

    /// The body Istio answers with.
    pub fn body(&self) -> &'static str {
        if self.status == 403 { AUDIENCE_BODY } else { UNAUTHORIZED_BODY }
    }
}

/// What a request offers to the authenticator.
#[derive(Clone, Copy)]
pub struct TokenSource<'a> {
    /// The request method as received (a CORS preflight is recognized by it, see [`is_cors_preflight`]).
    pub method: &'a str,
    pub headers: &'a dyn Headers,
    /// The query string without `?`, if any.
    pub query: Option<&'a str>,
}

/// A CORS preflight as Envoy's JWT filter recognizes one: method `OPTIONS` with a non-empty `Origin` and a
/// non-empty `Access-Control-Request-Method`.
pub fn is_cors_preflight(method: &str, headers: &dyn Headers) -> bool {
    let non_empty = |name: &str| {
        let mut found = false;
        headers.for_each_value(name, &mut |v| found |= !v.is_empty());
        found
    };
    method == "OPTIONS" && non_empty("origin") && non_empty("access-control-request-method")
}

impl JwtAuthenticator {
    /// `rules` from every RequestAuthentication applying to the workload (combined, as Istio does); `jwks_for`
    /// resolves a `jwksUri` to the JWKS text the control plane fetched (`None`: not fetched yet). A rule with neither
    /// `jwks` nor `jwksUri` is resolved by its issuer: the proxy answers for the mesh's own issuer
    /// (`spiffe://<trust-domain>`, whose keys come with the trust bundle) and nothing else.
    pub fn new<'r>(
        rules: impl IntoIterator<Item = &'r JwtRule>,
        jwks_for: impl Fn(&str) -> Option<&'r str>,
        clock_skew: Duration,
    ) -> JwtAuthenticator {
        let providers = rules
            .into_iter()
            .map(|rule| {
                let jwks = match (rule.jwks.is_empty(), rule.jwks_uri.is_empty()) {
                    (false, _) => Some(rule.jwks.as_str()),
                    (true, false) => jwks_for(&rule.jwks_uri),
                    (true, true) => jwks_for(&rule.issuer),
                };
                let (keys, jwks_problem) = match jwks {
                    Some(text) => match parse_jwks(text) {
                        Ok(keys) if keys.is_empty() => (keys, Some("the JWKS has no usable key".to_string())),
                        Ok(keys) => (keys, None),
                        Err(e) => (Vec::new(), Some(e)),
                    },
                    None if rule.jwks_uri.is_empty() => (
                        Vec::new(),
                        Some(
                            "no jwks or jwksUri, and the issuer is not the mesh's own (spiffe://<trust-domain>)".into(),
                        ),
                    ),
                    None => (Vec::new(), Some(format!("the JWKS at {} has not been fetched", rule.jwks_uri))),
                };
                Provider {
                    issuer: rule.issuer.clone(),
                    audiences: rule.audiences.clone(),
                    locations: locations(rule),
                    keys,
                    jwks_problem,
                    forward_original_token: rule.forward_original_token,
                    output_payload_to_header: Some(rule.output_payload_to_header.to_ascii_lowercase())
                        .filter(|h| !h.is_empty()),
                    output_claim_to_headers: (rule.output_claim_to_headers.iter())
                        .map(|c| (c.header.to_ascii_lowercase(), c.claim.split('.').map(str::to_string).collect()))
                        .collect(),
                }
            })
            .collect::<Vec<Provider>>();
        let mut output_headers: Vec<String> = Vec::new();
        for p in &providers {
            let names = p.output_payload_to_header.iter().chain(p.output_claim_to_headers.iter().map(|(h, _)| h));
            for name in names {
                if !output_headers.contains(name) {
                    output_headers.push(name.clone());
                }
            }
        }
        JwtAuthenticator { providers, clock_skew: clock_skew.as_secs(), output_headers }
    }

    /// Headers the rules write from verified tokens. A proxy removes them from every request first, so that a
    /// client cannot pose as having presented a token by sending them itself.
    pub fn output_headers(&self) -> &[String] {
        &self.output_headers
    }

    /// No rule applies: every request passes without looking for tokens.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Problems with the configured JWKS (issuer, reason), for status reporting.
    pub fn jwks_problems(&self) -> impl Iterator<Item = (&str, &str)> {
        self.providers.iter().filter_map(|p| Some((p.issuer.as_str(), p.jwks_problem.as_deref()?)))
    }

    /// Authenticates one request at `now` (seconds since the Unix epoch).
    ///
    /// A CORS preflight is not authenticated at all (Istio configures Envoy's JWT filter with
    /// `bypass_cors_preflight: true`): whatever token it carries, it goes on as [`JwtOutcome::NoToken`], without a
    /// request principal, so that a browser sees the real answer of the actual request instead of a failed
    /// preflight. Authorization still applies to it.
    pub fn authenticate(&self, request: TokenSource<'_>, now: u64) -> JwtOutcome {
        if self.providers.is_empty() || is_cors_preflight(request.method, request.headers) {
            return JwtOutcome::NoToken;
        }
        // Every distinct (location, token): the providers reading that location are the candidates.
        let mut found: Vec<(&Location, String)> = Vec::new();
        for provider in &self.providers {
            for location in &provider.locations {
                for token in extract(location, request) {
                    if !found.iter().any(|(l, t)| *l == location && *t == token) {
                        found.push((location, token));
                    }
                }
            }
        }
        if found.is_empty() {
            return JwtOutcome::NoToken;
        }
        let mut first: Option<Value> = None;
        let mut edits = HeaderEdits::default();
        let mut audience: Option<Rejection> = None;
        for (location, token) in &found {
            let candidates = self.providers.iter().filter(|p| p.locations.contains(location));
            match self.verify(candidates, token, now) {
                Ok((provider, payload)) => {
                    provider.edits(location, token, &payload, &mut edits);
                    first.get_or_insert(payload);
                }
                Err(r) if r.status == 403 => audience = audience.or(Some(r)),
                Err(r) => return JwtOutcome::Rejected(r),
            }
        }
        match (audience, first) {
            (Some(r), _) => JwtOutcome::Rejected(r),
            (None, Some(payload)) => JwtOutcome::Verified(Verified { payload, edits }),
            (None, None) => JwtOutcome::NoToken,
        }
    }

    fn verify<'p>(
        &self,
        candidates: impl Iterator<Item = &'p Provider>,
        token: &str,
        now: u64,
    ) -> Result<(&'p Provider, Value), Rejection> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Rejection::invalid(format!("Jwt is not in the form of Header.Payload.Signature: {e}")))?;
        // Read unverified only to pick the rule; everything is re-read from the verified token below.
        let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| Rejection::invalid(format!("Jwt payload is not a JSON object: {e}")))?;
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or_default();
        let mut candidates = candidates.peekable();
        if candidates.peek().is_none() {
            return Err(Rejection::invalid("no rule reads this token location"));
        }
        // Several rules may name the issuer (RequestAuthentications combine): the token passes if one accepts it;
        // otherwise an audience refusal (403) says more than a key mismatch (401).
        let mut refusal: Option<Rejection> = None;
        for provider in candidates.filter(|p| p.issuer == iss) {
            match self.verify_with(provider, &header, token, now) {
                Ok(payload) => return Ok((provider, payload)),
                Err(r) if refusal.as_ref().is_none_or(|old| old.status != 403) => refusal = Some(r),
                Err(_) => {}
            }
        }
        Err(refusal.unwrap_or_else(|| Rejection::invalid(format!("Jwt issuer {iss:?} is not configured"))))
    }

    fn verify_with(
        &self,
        provider: &Provider,
        header: &jsonwebtoken::Header,
        token: &str,
        now: u64,
    ) -> Result<Value, Rejection> {
        if let Some(problem) = &provider.jwks_problem
            && provider.keys.is_empty()
        {
            return Err(Rejection::invalid(format!("Jwks remote fetch is failed: {problem}")));
        }
        let mut keys = provider.keys.iter().filter(|k| k.validation.algorithms.contains(&header.alg)).peekable();
        let payload = if let Some(kid) = &header.kid {
            let mut with_kid = keys.filter(|k| k.kid.as_deref() == Some(kid.as_str())).peekable();
            if with_kid.peek().is_none() {
                return Err(Rejection::invalid(format!("Jwks doesn't have key to match kid {kid:?} or alg")));
            }
            check_signature(with_kid, token)?
        } else {
            if keys.peek().is_none() {
                return Err(Rejection::invalid(format!("Jwks doesn't have key to match alg {:?}", header.alg)));
            }
            check_signature(keys, token)?
        };
        provider.check_claims(payload, now, self.clock_skew)
    }
}

fn check_signature<'k>(keys: impl Iterator<Item = &'k Key>, token: &str) -> Result<Value, Rejection> {
    for key in keys {
        if let Ok(data) = jsonwebtoken::decode::<Value>(token, &key.key, &key.validation) {
            return Ok(data.claims);
        }
    }
    Err(Rejection::invalid("Jwt verification fails: bad signature"))
}

impl Provider {
    fn check_claims(&self, payload: Value, now: u64, skew: u64) -> Result<Value, Rejection> {
        if !payload.is_object() {
            return Err(Rejection::invalid("Jwt payload is not a JSON object"));
        }
        let time = |name: &str| -> Result<Option<u64>, Rejection> {
            match payload.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                    .map(Some)
                    .ok_or_else(|| Rejection::invalid(format!("Jwt {name} is not a number"))),
            }
        };
        if let Some(exp) = time("exp")?
            && now > exp.saturating_add(skew)
        {
            return Err(Rejection::invalid("Jwt is expired"));
        }
        if let Some(nbf) = time("nbf")?
            && now.saturating_add(skew) < nbf
        {
            return Err(Rejection::invalid("Jwt not yet valid"));
        }
        if payload.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(Rejection::invalid("Jwt issuer is not configured"));
        }
        if !self.audiences.is_empty() {
            let allowed = |a: &Value| a.as_str().is_some_and(|a| self.audiences.iter().any(|x| x == a));
            let ok = match payload.get("aud") {
                Some(Value::Array(list)) => list.iter().any(allowed),
                Some(v) => allowed(v),
                None => false,
            };
            if !ok {
                return Err(Rejection { status: 403, reason: AUDIENCE_BODY.to_string() });
            }
        }
        Ok(payload)
    }

    fn edits(&self, location: &Location, token: &str, payload: &Value, edits: &mut HeaderEdits) {
        if let (Location::Header { name, .. }, false) = (location, self.forward_original_token)
            && !edits.remove.contains(name)
        {
            edits.remove.push(name.clone());
        }
        if let Some(header) = &self.output_payload_to_header {
            let segment = token.split('.').nth(1).unwrap_or_default();
            edits.set.push((header.clone(), segment.to_string()));
        }
        for (header, path) in &self.output_claim_to_headers {
            let value = path.iter().try_fold(payload, |v, p| v.get(p.as_str()));
            let text = match value {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => continue,
            };
            edits.set.push((header.clone(), text));
        }
    }
}

/// Istio's default locations when a rule names none: `Authorization: Bearer <token>`, then `?access_token=`.
fn locations(rule: &JwtRule) -> Vec<Location> {
    if rule.from_headers.is_empty() && rule.from_params.is_empty() && rule.from_cookies.is_empty() {
        return vec![
            Location::Header { name: "authorization".into(), prefix: "Bearer ".into() },
            Location::Param("access_token".into()),
        ];
    }
    let headers = (rule.from_headers.iter())
        .map(|h| Location::Header { name: h.name.to_ascii_lowercase(), prefix: h.prefix.clone() });
    let params = rule.from_params.iter().map(|p| Location::Param(p.clone()));
    headers.chain(params).chain(rule.from_cookies.iter().map(|c| Location::Cookie(c.clone()))).collect()
}

/// The tokens at one location. A header without the configured prefix carries no token (Envoy's extractor).
fn extract(location: &Location, request: TokenSource<'_>) -> Vec<String> {
    let mut out = Vec::new();
    match location {
        Location::Header { name, prefix } => request.headers.for_each_value(name, &mut |value| {
            let value = value.trim();
            let token = match value.get(..prefix.len()) {
                Some(p) if p.eq_ignore_ascii_case(prefix) => value[prefix.len()..].trim(),
                _ => return,
            };
            if !token.is_empty() {
                out.push(token.to_string());
            }
        }),
        Location::Param(name) => {
            let pairs = request.query.unwrap_or_default().split('&');
            out.extend(pairs.filter_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name && !v.is_empty()).then(|| v.to_string())
            }));
        }
        Location::Cookie(name) => request.headers.for_each_value("cookie", &mut |value| {
            for pair in value.split(';') {
                if let Some((k, v)) = pair.trim().split_once('=')
                    && k == name
                    && !v.is_empty()
                {
                    out.push(v.to_string());
                }
            }
        }),
    }
    out
}

/// Checks a JWKS document (e.g. one fetched from a `jwksUri`) and returns the number of usable keys.
pub fn check_jwks(text: &str) -> Result<usize, String> {
    parse_jwks(text).map(|keys| keys.len())
}

/// The usable verification keys of a JWKS document. Keys of unknown type, for encryption, or symmetric (`oct`)
/// are skipped; a document that is not a JWKS is an error.
fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
    let keys = doc.get("keys").and_then(Value::as_array).ok_or("the JWKS has no \"keys\" array")?;
    Ok(keys.iter().filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok()).filter_map(key).collect())
}

fn key(jwk: Jwk) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
        _ => return None,
    };
    let mut algorithms = family.to_vec();
    if let Some(alg) = jwk.common.key_algorithm {
        let alg: Algorithm = alg.to_string().parse().ok()?;
        algorithms.retain(|a| *a == alg);
    }
    if algorithms.is_empty() {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms;
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    Some(Key { kid: jwk.common.key_id, key, validation })
}

#[cfg(test)]
mod tests;
