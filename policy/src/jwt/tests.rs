//! Tokens signed here with keys generated per run (aws-lc-rs), JWKS built from them.

use std::sync::LazyLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;
use crate::request_authn::{ClaimToHeader, JwtHeader};

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://issuer.example";

/// (name, request headers, expected status).
type Case = (&'static str, Vec<(&'static str, String)>, u16);

struct TestKey {
    alg: Algorithm,
    kid: &'static str,
    enc: EncodingKey,
}

impl TestKey {
    fn jwk(&self) -> Value {
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&self.enc, self.alg).unwrap()).unwrap();
        jwk["kid"] = json!(self.kid);
        jwk
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(claims, Some(self.kid))
    }

    fn sign_with_kid(&self, claims: &Value, kid: Option<&str>) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &self.enc).unwrap()
    }
}

fn ec(alg: Algorithm, kid: &'static str) -> TestKey {
    let curve =
        if alg == Algorithm::ES256 { &ECDSA_P256_SHA256_FIXED_SIGNING } else { &ECDSA_P384_SHA384_FIXED_SIGNING };
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(curve, &SystemRandom::new()).unwrap();
    TestKey { alg, kid, enc: EncodingKey::from_ec_der(pkcs8.as_ref()) }
}

fn ed(kid: &'static str) -> TestKey {
    let pair = Ed25519KeyPair::generate().unwrap();
    TestKey { alg: Algorithm::EdDSA, kid, enc: EncodingKey::from_ed_der(pair.to_pkcs8v1().unwrap().as_ref()) }
}

static ES256: LazyLock<TestKey> = LazyLock::new(|| ec(Algorithm::ES256, "es256"));
static ES384: LazyLock<TestKey> = LazyLock::new(|| ec(Algorithm::ES384, "es384"));
static ED: LazyLock<TestKey> = LazyLock::new(|| ed("ed"));
static OTHER: LazyLock<TestKey> = LazyLock::new(|| ec(Algorithm::ES256, "es256"));

fn jwks(keys: &[&TestKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

fn rule(issuer: &str, keys: &[&TestKey]) -> JwtRule {
    JwtRule { issuer: issuer.into(), jwks: jwks(keys), ..JwtRule::default() }
}

fn authn(rules: &[JwtRule]) -> JwtAuthenticator {
    JwtAuthenticator::new(rules, |_| None, DEFAULT_CLOCK_SKEW)
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "exp": NOW + 600, "aud": ["shop"], "groups": ["admin", "dev"],
           "scope": "read write", "nested": {"team": {"name": "blue"}}, "n": 7, "ok": true})
}

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

fn run(a: &JwtAuthenticator, headers: &[(&str, String)], query: Option<&str>) -> JwtOutcome {
    a.authenticate(TokenSource { method: "GET", headers: &headers, query }, NOW)
}

fn status(outcome: &JwtOutcome) -> u16 {
    match outcome {
        JwtOutcome::NoToken | JwtOutcome::Verified(_) => 200,
        JwtOutcome::Rejected(r) => r.status,
    }
}

#[test]
fn every_supported_algorithm_verifies() {
    for key in [&*ES256, &*ES384, &*ED] {
        let a = authn(&[rule(ISS, &[key])]);
        let token = key.sign(&claims());
        let JwtOutcome::Verified(v) = run(&a, &bearer(&token), None) else { panic!("{:?}", key.alg) };
        assert_eq!(v.payload["sub"], "alice");
        assert_eq!(v.edits.remove, ["authorization"], "the token is stripped by default");
        // Without a kid every key whose algorithm fits is tried.
        let token = key.sign_with_kid(&claims(), None);
        assert_eq!(status(&run(&a, &bearer(&token), None)), 200, "{:?} without kid", key.alg);
    }
}

#[test]
fn outcome_table() {
    let a = authn(&[JwtRule { audiences: vec!["shop".into()], ..rule(ISS, &[&ES256, &ED]) }]);
    let sign = |c: Value| ES256.sign(&c);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        sign(c)
    };
    let header_only = |alg: &str| {
        let enc = |v: Value| base64url(v.to_string().as_bytes());
        format!("{}.{}.", enc(json!({"alg": alg, "typ": "JWT"})), enc(claims()))
    };
    let valid = sign(claims());
    let mut tampered = valid.clone();
    tampered.push_str(if tampered.ends_with('A') { "B" } else { "A" });
    let hmac = jsonwebtoken::encode(
        &Header { kid: Some("es256".into()), ..Header::new(Algorithm::HS256) },
        &claims(),
        &EncodingKey::from_secret(ES256.jwk()["x"].as_str().unwrap().as_bytes()).unwrap(),
    )
    .unwrap();
    let cases: Vec<Case> = vec![
        ("no token", vec![], 200),
        ("valid", bearer(&valid), 200),
        ("Basic auth is not a token", vec![("authorization", "Basic dXNlcjpwYXNz".into())], 200),
        ("lower-case scheme", vec![("authorization", format!("bearer {valid}"))], 200),
        ("expired", bearer(&with(&|c| c["exp"] = json!(NOW - 61))), 401),
        ("expired within the skew", bearer(&with(&|c| c["exp"] = json!(NOW - 59))), 200),
        ("not yet valid", bearer(&with(&|c| c["nbf"] = json!(NOW + 61))), 401),
        ("nbf within the skew", bearer(&with(&|c| c["nbf"] = json!(NOW + 59))), 200),
        ("exp not a number", bearer(&with(&|c| c["exp"] = json!("tomorrow"))), 401),
        ("no exp at all", bearer(&with(&|c| c.as_object_mut().unwrap().retain(|k, _| k != "exp"))), 200),
        ("wrong issuer", bearer(&with(&|c| c["iss"] = json!("https://evil.example"))), 401),
        ("no issuer", bearer(&with(&|c| c.as_object_mut().unwrap().retain(|k, _| k != "iss"))), 401),
        ("wrong audience", bearer(&with(&|c| c["aud"] = json!("billing"))), 403),
        ("audience as a string", bearer(&with(&|c| c["aud"] = json!("shop"))), 200),
        ("no audience", bearer(&with(&|c| c.as_object_mut().unwrap().retain(|k, _| k != "aud"))), 403),
        ("bad signature", bearer(&tampered), 401),
        ("signed by another key with the same kid", bearer(&OTHER.sign(&claims())), 401),
        ("unknown kid", bearer(&ES256.sign_with_kid(&claims(), Some("nope"))), 401),
        ("alg none", bearer(&header_only("none")), 401),
        ("HMAC with the public key", bearer(&hmac), 401),
        ("garbage", bearer("deadbeef"), 401),
        ("two parts", bearer("a.b"), 401),
    ];
    for (name, headers, want) in cases {
        assert_eq!(status(&run(&a, &headers, None)), want, "{name}");
    }
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn locations() {
    let token = ES256.sign(&claims());
    let default = authn(&[rule(ISS, &[&ES256])]);
    assert!(matches!(run(&default, &[], Some(&format!("a=1&access_token={token}"))), JwtOutcome::Verified(_)));
    assert_eq!(run(&default, &[], Some(&format!("token={token}"))), JwtOutcome::NoToken);
    assert_eq!(run(&default, &[("x-jwt", token.clone())], None), JwtOutcome::NoToken);

    let custom = authn(&[JwtRule {
        from_headers: vec![JwtHeader { name: "X-Jwt".into(), prefix: "Token ".into() }],
        from_params: vec!["jwt".into()],
        ..rule(ISS, &[&ES256])
    }]);
    let JwtOutcome::Verified(v) = run(&custom, &[("x-jwt", format!("Token {token}"))], None) else { panic!() };
    assert_eq!(v.edits.remove, ["x-jwt"]);
    assert!(matches!(run(&custom, &[], Some(&format!("jwt={token}"))), JwtOutcome::Verified(_)));
    assert_eq!(run(&custom, &bearer(&token), None), JwtOutcome::NoToken, "the default location is not read");
    assert_eq!(run(&custom, &[], Some(&format!("access_token={token}"))), JwtOutcome::NoToken);
    assert_eq!(run(&custom, &[("x-jwt", token.clone())], None), JwtOutcome::NoToken, "prefix missing");

    let cookies = authn(&[JwtRule { from_cookies: vec!["session".into()], ..rule(ISS, &[&ES256]) }]);
    let JwtOutcome::Verified(v) = run(&cookies, &[("cookie", format!("a=1; session={token}; b=2"))], None) else {
        panic!()
    };
    assert!(v.edits.remove.is_empty(), "a cookie is not stripped");
    assert_eq!(run(&cookies, &[("cookie", format!("other={token}"))], None), JwtOutcome::NoToken);
    assert_eq!(run(&cookies, &bearer(&token), None), JwtOutcome::NoToken);
}

#[test]
fn two_issuers_and_multiple_tokens() {
    const ISS2: &str = "https://second.example";
    let a = authn(&[rule(ISS, &[&ES256]), rule(ISS2, &[&ED])]);
    let first = ES256.sign(&claims());
    let mut c2 = claims();
    c2["iss"] = json!(ISS2);
    let second = ED.sign(&c2);
    let JwtOutcome::Verified(v) = run(&a, &bearer(&second), None) else { panic!() };
    assert_eq!(v.payload["iss"], ISS2);
    assert_eq!(status(&run(&a, &bearer(&first), None)), 200);
    // Issuer 1's key does not verify issuer 2's tokens.
    let forged = ES256.sign(&c2);
    assert_eq!(status(&run(&a, &bearer(&forged), None)), 401);
    // Two valid tokens pass; one valid and one expired do not.
    let both = vec![("authorization", format!("Bearer {first}")), ("authorization", format!("Bearer {second}"))];
    assert_eq!(status(&run(&a, &both, None)), 200);
    let mut expired = c2.clone();
    expired["exp"] = json!(NOW - 3600);
    let mixed = vec![("authorization", format!("Bearer {first}"))];
    assert_eq!(status(&run(&a, &mixed, Some(&format!("access_token={}", ED.sign(&expired))))), 401);
}

#[test]
fn rules_of_one_issuer_combine() {
    // Istio: several RequestAuthentications act as one; the token passes if any rule for its issuer accepts it.
    let strict = JwtRule { audiences: vec!["billing".into()], ..rule(ISS, &[&ES256]) };
    let other_keys = rule(ISS, &[&ED]);
    let mut c = claims();
    c.as_object_mut().unwrap().remove("aud");
    let token = ES256.sign(&c);
    assert_eq!(status(&run(&authn(&[strict.clone(), rule(ISS, &[&ES256])]), &bearer(&token), None)), 200);
    assert_eq!(status(&run(&authn(&[strict.clone(), other_keys.clone()]), &bearer(&token), None)), 403);
    assert_eq!(status(&run(&authn(&[other_keys, strict]), &bearer(&token), None)), 403, "order does not matter");
}

#[test]
fn header_outputs() {
    let token = ES256.sign(&claims());
    let a = authn(&[JwtRule {
        forward_original_token: true,
        output_payload_to_header: "X-Payload".into(),
        output_claim_to_headers: vec![
            ClaimToHeader { header: "x-team".into(), claim: "nested.team.name".into() },
            ClaimToHeader { header: "x-n".into(), claim: "n".into() },
            ClaimToHeader { header: "x-ok".into(), claim: "ok".into() },
            ClaimToHeader { header: "x-groups".into(), claim: "groups".into() },
            ClaimToHeader { header: "x-missing".into(), claim: "nope".into() },
        ],
        ..rule(ISS, &[&ES256])
    }]);
    assert_eq!(a.output_headers(), ["x-payload", "x-team", "x-n", "x-ok", "x-groups", "x-missing"]);
    let JwtOutcome::Verified(v) = run(&a, &bearer(&token), None) else { panic!() };
    assert!(v.edits.remove.is_empty(), "forwardOriginalToken keeps the token");
    let payload = token.split('.').nth(1).unwrap().to_string();
    assert_eq!(
        v.edits.set,
        [
            ("x-payload".to_string(), payload),
            ("x-team".into(), "blue".into()),
            ("x-n".into(), "7".into()),
            ("x-ok".into(), "true".into()),
        ]
    );
}

#[test]
fn jwks_problems() {
    let uri = JwtRule { issuer: ISS.into(), jwks_uri: "https://keys.example/jwks".into(), ..JwtRule::default() };
    let token = ES256.sign(&claims());
    let unfetched = JwtAuthenticator::new([&uri], |_| None, DEFAULT_CLOCK_SKEW);
    assert_eq!(status(&run(&unfetched, &bearer(&token), None)), 401);
    assert_eq!(run(&unfetched, &[], None), JwtOutcome::NoToken);
    assert_eq!(unfetched.jwks_problems().count(), 1);
    let text = jwks(&[&ES256]);
    let fetched = JwtAuthenticator::new([&uri], |u| (u == uri.jwks_uri).then_some(text.as_str()), DEFAULT_CLOCK_SKEW);
    assert_eq!(status(&run(&fetched, &bearer(&token), None)), 200);

    assert_eq!(check_jwks(&jwks(&[&ES256, &ED])), Ok(2));
    assert_eq!(check_jwks(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#), Ok(0), "HMAC keys are never used");
    assert!(check_jwks("{}").is_err());
    assert!(check_jwks("not json").is_err());
    let mut enc_key = ES256.jwk();
    enc_key["use"] = json!("enc");
    assert_eq!(check_jwks(&json!({"keys": [enc_key]}).to_string()), Ok(0));
}

#[test]
fn configurable_skew() {
    let a = JwtAuthenticator::new(&[rule(ISS, &[&ES256])], |_| None, std::time::Duration::ZERO);
    let mut c = claims();
    c["exp"] = json!(NOW - 1);
    assert_eq!(status(&run(&a, &bearer(&ES256.sign(&c)), None)), 401);
}

#[test]
fn a_rule_without_keys_is_resolved_by_its_issuer() {
    // The mesh's own issuer: the proxy resolves it to the JWKS of the trust bundle (JWT-SVIDs).
    let mesh = JwtRule { issuer: "spiffe://td".into(), ..JwtRule::default() };
    let mut c = claims();
    c["iss"] = json!("spiffe://td");
    c["sub"] = json!("spiffe://td/ns/a/sa/b");
    let token = ES256.sign(&c);
    let text = jwks(&[&ES256]);
    let resolved =
        JwtAuthenticator::new([&mesh], |i| (i == "spiffe://td").then_some(text.as_str()), DEFAULT_CLOCK_SKEW);
    let JwtOutcome::Verified(v) = run(&resolved, &bearer(&token), None) else { panic!("not verified") };
    assert_eq!(v.payload["sub"], "spiffe://td/ns/a/sa/b");
    // Control: another issuer without keys is not resolved, and says why.
    let unresolved = JwtAuthenticator::new([&mesh], |_| None, DEFAULT_CLOCK_SKEW);
    assert_eq!(status(&run(&unresolved, &bearer(&token), None)), 401);
    let (_, problem) = unresolved.jwks_problems().next().unwrap();
    assert!(problem.contains("no jwks or jwksUri"), "{problem}");
}
