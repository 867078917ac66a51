//! JWT-SVIDs on the Workload API side: checking one against the mesh JWKS (ValidateJWTSVID), and its claims as the
//! `google.protobuf.Struct` the answer carries. Pure: the JWKS and the time come from the caller.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::Value;
use trellis_proto::spiffe::SpiffeId;

/// Why a JWT-SVID was refused (the text goes back to the caller with InvalidArgument).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtSvidError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not allowed (JWT-SVIDs of this mesh are ES256)")]
    Algorithm(Algorithm),
    #[error("the token has no kid")]
    NoKid,
    #[error("no mesh JWT keys yet (the trust bundle carries none)")]
    NoKeys,
    #[error("key {0:?} is not in the mesh JWKS")]
    UnknownKey(String),
    #[error("the signature does not verify")]
    Signature,
    #[error("the token expired")]
    Expired,
    #[error("audience {0:?} is not in the token's aud claim")]
    Audience(String),
    #[error("claim {0}: {1}")]
    Claim(&'static str, String),
}

/// A valid JWT-SVID's SPIFFE ID and claims.
#[derive(Debug)]
pub struct Validated {
    pub spiffe_id: SpiffeId,
    pub claims: Value,
}

/// Checks `token` against the mesh JWKS: ES256 signature by a key of the set (by `kid`), `exp` (no leeway beyond
/// jsonwebtoken's default of 60 s), `audience` among `aud`, and `sub` a SPIFFE ID of `trust_domain`.
pub fn validate(token: &str, audience: &str, jwks: &str, trust_domain: &str) -> Result<Validated, JwtSvidError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| JwtSvidError::Malformed(e.to_string()))?;
    if header.alg != Algorithm::ES256 {
        return Err(JwtSvidError::Algorithm(header.alg));
    }
    let kid = header.kid.ok_or(JwtSvidError::NoKid)?;
    if jwks.is_empty() {
        return Err(JwtSvidError::NoKeys);
    }
    let set: JwkSet = serde_json::from_str(jwks).map_err(|_| JwtSvidError::NoKeys)?;
    let jwk = set.find(&kid).ok_or_else(|| JwtSvidError::UnknownKey(kid.clone()))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| JwtSvidError::UnknownKey(kid.clone()))?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| match e.kind() {
        ErrorKind::InvalidSignature => JwtSvidError::Signature,
        ErrorKind::ExpiredSignature => JwtSvidError::Expired,
        ErrorKind::InvalidAudience => JwtSvidError::Audience(audience.to_owned()),
        ErrorKind::MissingRequiredClaim(claim) => JwtSvidError::Claim("required", format!("{claim} is missing")),
        _ => JwtSvidError::Malformed(e.to_string()),
    })?;
    let sub = data.claims.get("sub").and_then(Value::as_str).unwrap_or_default();
    let spiffe_id = SpiffeId::parse(sub).map_err(|e| JwtSvidError::Claim("sub", e.to_string()))?;
    if spiffe_id.trust_domain() != trust_domain {
        return Err(JwtSvidError::Claim("sub", format!("{sub} is not of trust domain {trust_domain}")));
    }
    Ok(Validated { spiffe_id, claims: data.claims })
}

/// A JSON object as a `google.protobuf.Struct` (other JSON values: an empty one).
pub fn to_struct(value: &Value) -> prost_types::Struct {
    let fields = match value {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        _ => Default::default(),
    };
    prost_types::Struct { fields }
}

fn to_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue { values: items.iter().map(to_value).collect() }),
        Value::Object(_) => Kind::StructValue(to_struct(value)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    struct Signer {
        key: EncodingKey,
        kid: String,
    }

    impl Signer {
        fn new(kid: &str) -> Self {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            Self { key: EncodingKey::from_ec_der(&pair.serialize_der()), kid: kid.into() }
        }

        fn jwk(&self) -> Value {
            let mut jwk = Jwk::from_encoding_key(&self.key, Algorithm::ES256).unwrap();
            jwk.common.key_id = Some(self.kid.clone());
            serde_json::to_value(jwk).unwrap()
        }

        fn sign(&self, claims: Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
        }
    }

    fn far() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600
    }

    #[test]
    fn signature_key_audience_expiry_and_subject_are_checked() {
        let (a, b) = (Signer::new("a"), Signer::new("b"));
        let jwks = json!({"keys": [a.jwk()]}).to_string();
        let claims = json!({"sub": "spiffe://td/ns/x/sa/y", "aud": ["svc"], "exp": far(), "iss": "spiffe://td"});
        let good = a.sign(claims.clone());
        // Control: the right audience is accepted, with the claims.
        let ok = validate(&good, "svc", &jwks, "td").unwrap();
        assert_eq!(ok.spiffe_id.to_string(), "spiffe://td/ns/x/sa/y");
        assert_eq!(to_struct(&ok.claims).fields["aud"].kind, to_value(&json!(["svc"])).kind);

        assert_eq!(validate(&good, "other", &jwks, "td").unwrap_err(), JwtSvidError::Audience("other".into()));
        assert_eq!(
            validate(&b.sign(claims.clone()), "svc", &jwks, "td").unwrap_err(),
            JwtSvidError::UnknownKey("b".into())
        );
        // b's token under a's kid: the signature does not verify.
        let forged = Signer { key: b.key.clone(), kid: "a".into() }.sign(claims.clone());
        assert_eq!(validate(&forged, "svc", &jwks, "td").unwrap_err(), JwtSvidError::Signature);
        let expired = a.sign(json!({"sub": "spiffe://td/ns/x/sa/y", "aud": "svc", "exp": 1000}));
        assert_eq!(validate(&expired, "svc", &jwks, "td").unwrap_err(), JwtSvidError::Expired);
        let foreign = a.sign(json!({"sub": "spiffe://other/ns/x/sa/y", "aud": "svc", "exp": far()}));
        assert!(matches!(validate(&foreign, "svc", &jwks, "td").unwrap_err(), JwtSvidError::Claim("sub", _)));
        assert_eq!(validate(&good, "svc", "", "td").unwrap_err(), JwtSvidError::NoKeys);
        assert!(matches!(validate("not.a.token", "svc", &jwks, "td").unwrap_err(), JwtSvidError::Malformed(_)));
    }
}
