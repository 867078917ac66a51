//! JWT request authentication (`policy/src/jwt.rs`): finding tokens (header, query parameter, cookie), parsing,
//! signature checks, claims (`iss`, `aud`, `exp`, `nbf`), claim-to-header output; and JWKS parsing.
//!
//! The first byte picks what the rest is:
//! - 0: a raw token, presented at every location;
//! - 1: a JWT payload, signed here with the rule's ES256 key (so that the claim checks after the signature run);
//! - 2: a JWT header and payload separated by 0xff, both signed here (algorithm and `kid` confusion);
//! - 3: a JWKS document, as an inline `jwks`, then a token signed by the fixed key is checked against it.
#![no_main]

use std::sync::LazyLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use libfuzzer_sys::fuzz_target;
use trellis_policy::{
    ClaimToHeader, DEFAULT_CLOCK_SKEW, Headers, JwtAuthenticator, JwtOutcome, JwtRule, TokenSource, check_jwks,
};

const ISSUER: &str = "https://issuer.fuzz";
const NOW: u64 = 1_800_000_000;

struct Signer {
    key: EcdsaKeyPair,
    jwks: String,
}

static SIGNER: LazyLock<Signer> = LazyLock::new(|| {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("key");
    let point = key.public_key().as_ref();
    let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
    let jwks = format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"k1","alg":"ES256","use":"sig"}}]}}"#
    );
    Signer { key, jwks }
});

fn rule(jwks: &str) -> JwtRule {
    JwtRule {
        issuer: ISSUER.into(),
        audiences: vec!["svc".into()],
        jwks: jwks.into(),
        from_params: vec!["token".into()],
        from_cookies: vec!["jwt".into()],
        output_payload_to_header: "x-payload".into(),
        output_claim_to_headers: vec![
            ClaimToHeader { header: "x-sub".into(), claim: "sub".into() },
            ClaimToHeader { header: "x-nested".into(), claim: "a.b".into() },
        ],
        ..JwtRule::default()
    }
}

static RULE: LazyLock<JwtRule> = LazyLock::new(|| rule(&SIGNER.jwks));
static AUTHENTICATOR: LazyLock<JwtAuthenticator> =
    LazyLock::new(|| JwtAuthenticator::new([&*RULE], |_| None, DEFAULT_CLOCK_SKEW));

fn sign(header: &[u8], payload: &[u8]) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let signature = SIGNER.key.sign(&SystemRandom::new(), input.as_bytes()).expect("sign");
    format!("{input}.{}", B64.encode(signature.as_ref()))
}

struct Request(Vec<(&'static str, String)>);

impl Headers for Request {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        for (n, v) in &self.0 {
            if n.eq_ignore_ascii_case(name) {
                f(v);
            }
        }
    }
}

fn check(authenticator: &JwtAuthenticator, token: &str, everywhere: bool) {
    let mut headers = vec![("authorization", format!("Bearer {token}"))];
    let mut query = None;
    if everywhere {
        headers.push(("cookie", format!("a=b; jwt={token}")));
        query = Some(format!("x=1&token={token}"));
    }
    let request = Request(headers);
    let outcome =
        authenticator.authenticate(TokenSource { method: "GET", headers: &request, query: query.as_deref() }, NOW);
    match outcome {
        JwtOutcome::Rejected(r) => assert!(r.status == 401 || r.status == 403, "{r:?}"),
        JwtOutcome::Verified(v) => {
            // Only a token signed here can verify, and only with this rule's issuer.
            assert_eq!(v.payload.get("iss").and_then(|i| i.as_str()), Some(ISSUER));
        }
        JwtOutcome::NoToken => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                check(&AUTHENTICATOR, token, true);
            }
        }
        1 => check(&AUTHENTICATOR, &sign(br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#, rest), false),
        2 => {
            let mut parts = rest.splitn(2, |b| *b == 0xff);
            let (header, payload) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            check(&AUTHENTICATOR, &sign(header, payload), false);
        }
        _ => {
            let Ok(jwks) = std::str::from_utf8(rest) else { return };
            let _ = check_jwks(jwks);
            let rule = rule(jwks);
            let authenticator = JwtAuthenticator::new([&rule], |_| None, DEFAULT_CLOCK_SKEW);
            let payload = format!(r#"{{"iss":"{ISSUER}","sub":"s","aud":"svc","exp":{}}}"#, NOW + 60);
            check(&authenticator, &sign(br#"{"alg":"ES256","kid":"k1"}"#, payload.as_bytes()), false);
        }
    }
});
