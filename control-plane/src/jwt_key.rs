//! The mesh JWT key: an ES256 (P-256) key that signs JWT-SVIDs. Each CA directory holds one (`jwt-key.pem`, PKCS#8,
//! 0600) beside the CA key, so it is stored, shared (etcd: sealed with the KEK, `shared_files.rs`) and rotated with
//! the CA: during a root rotation the JWKS holds the keys of both CAs, the signing CA's key signs, and the retiring
//! CA's key leaves the JWKS when its root leaves the bundle. A CA directory made before JWT-SVIDs existed gets its
//! key the first time it is loaded.
//!
//! The key ID (`kid`) is the key's RFC 7638 JWK thumbprint: stable, derived from the public key, nothing to store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Value, json};

/// The key file in a CA directory ("key" in its name: sealed on a shared store).
pub const JWT_KEY_FILE: &str = "jwt-key.pem";
/// A JWT-SVID's lifetime unless the control plane is configured otherwise (`--jwt-svid-ttl`).
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not an ECDSA P-256 private key in PKCS#8 PEM: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("signing a JWT-SVID: {0}")]
    Sign(String),
}

pub struct JwtKey {
    kid: String,
    jwk: Value,
    encoding: EncodingKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey").field("kid", &self.kid).finish()
    }
}

impl JwtKey {
    /// Loads `dir/jwt-key.pem`, generating it first when the directory has none.
    pub fn load_or_create(dir: &Path) -> Result<Self, JwtKeyError> {
        let path = dir.join(JWT_KEY_FILE);
        let pem = match std::fs::read_to_string(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = generate_pem().map_err(|reason| JwtKeyError::Key { path: path.clone(), reason })?;
                crate::files::write_new(&path, pem.as_bytes(), 0o600)
                    .map_err(|source| JwtKeyError::Io { path: path.clone(), source })?;
                tracing::info!(path = %path.display(), "mesh JWT key created");
                pem
            }
            Err(source) => return Err(JwtKeyError::Io { path, source }),
        };
        Self::from_pem(&pem).map_err(|reason| JwtKeyError::Key { path, reason })
    }

    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let pair = KeyPair::from_pem(pem).map_err(|e| e.to_string())?;
        if pair.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err("the key is not ECDSA P-256".into());
        }
        // SEC1 uncompressed point: 0x04 || x || y.
        let point = pair.public_key_raw();
        let point = point.get(point.len().saturating_sub(65)..).unwrap_or_default();
        if point.len() != 65 || point[0] != 4 {
            return Err("unexpected public key encoding".into());
        }
        let (x, y) = (URL_SAFE_NO_PAD.encode(&point[1..33]), URL_SAFE_NO_PAD.encode(&point[33..]));
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD
            .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes()).as_ref());
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "jwt-svid"});
        let encoding = EncodingKey::from_ec_der(&pair.serialize_der());
        Ok(Self { kid, jwk, encoding })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (`kid`, `alg: ES256`, `use: jwt-svid` as the SPIFFE JWT bundle format has it).
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// A JWT-SVID: `sub` the SPIFFE ID, `aud`, `iat`, `exp`; header `alg: ES256`, `typ: JWT`, `kid`. The issuer is
    /// the trust domain's SPIFFE ID (`spiffe://<td>`), which is how a RequestAuthentication names the mesh's keys.
    pub fn sign(
        &self,
        issuer: &str,
        sub: &str,
        audiences: &[String],
        iat: i64,
        exp: i64,
    ) -> Result<String, JwtKeyError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".into());
        header.kid = Some(self.kid.clone());
        let claims = json!({"iss": issuer, "sub": sub, "aud": audiences, "iat": iat, "exp": exp});
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| JwtKeyError::Sign(e.to_string()))
    }
}

fn generate_pem() -> Result<String, String> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?.serialize_pem())
}

/// A JWKS document (`{"keys": [...]}`) of `keys`, without duplicates, in order.
pub fn jwks<'k>(keys: impl IntoIterator<Item = &'k JwtKey>) -> String {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for key in keys {
        if !seen.contains(&key.kid()) {
            seen.push(key.kid());
            out.push(key.jwk().clone());
        }
    }
    json!({ "keys": out }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_tokens_verify_against_the_jwks_and_the_key_id_is_stable() {
        let pem = generate_pem().unwrap();
        let key = JwtKey::from_pem(&pem).unwrap();
        assert_eq!(JwtKey::from_pem(&pem).unwrap().kid(), key.kid(), "the kid derives from the key alone");
        let other = JwtKey::from_pem(&generate_pem().unwrap()).unwrap();
        assert_ne!(other.kid(), key.kid());
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks([&key, &key, &other])).unwrap();
        assert_eq!(set.keys.len(), 2, "one entry per key");

        let token = key.sign("spiffe://td", "spiffe://td/ns/a/sa/b", &["x".into()], 100, 4_000_000_000).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref(), header.typ.as_deref()),
            (Algorithm::ES256, Some(key.kid()), Some("JWT"))
        );
        let jwk = set.find(key.kid()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["x"]);
        let data =
            jsonwebtoken::decode::<Value>(&token, &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(), &validation)
                .unwrap();
        assert_eq!(data.claims["sub"], "spiffe://td/ns/a/sa/b");
        assert_eq!(data.claims["iss"], "spiffe://td");
        // Control: the other key's JWK does not verify it.
        let wrong = jsonwebtoken::DecodingKey::from_jwk(set.find(other.kid()).unwrap()).unwrap();
        assert!(jsonwebtoken::decode::<Value>(&token, &wrong, &validation).is_err());
    }

    #[test]
    fn a_missing_key_is_created_once_and_an_rsa_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("trellis-jwt-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let first = JwtKey::load_or_create(&dir).unwrap();
        let again = JwtKey::load_or_create(&dir).unwrap();
        assert_eq!(first.kid(), again.kid());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(JWT_KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(dir.join(JWT_KEY_FILE), "garbage").unwrap();
        let err = JwtKey::load_or_create(&dir).unwrap_err().to_string();
        assert!(err.contains("jwt-key.pem") && err.contains("P-256"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
