//! Join tokens: `<id>.<secret>`, 48-bit id for lookup and a 128-bit secret stored only as its SHA-256.

use crate::records::TokenRecord;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("join token is malformed (expected <id>.<secret>)")]
    Malformed,
    /// Unknown id and wrong secret look the same to the caller.
    #[error("join token is not valid")]
    Invalid,
    #[error("join token has expired")]
    Expired,
    #[error("join token was already used")]
    Used,
    #[error("join token was revoked")]
    Revoked,
    #[error("join token is for node {token_node:?}, not {node:?}")]
    WrongNode { token_node: String, node: String },
}

pub struct NewToken {
    pub token: String,
    pub record: TokenRecord,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).expect("system RNG");
    hex::encode(buf)
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes()))
}

pub fn generate(node: &str, namespaces: Vec<String>, ttl_secs: i64, reusable: bool, now: i64) -> NewToken {
    let id = random_hex(6);
    let secret = random_hex(16);
    let record = TokenRecord {
        id: id.clone(),
        secret_sha256: hash_secret(&secret),
        node: node.to_owned(),
        namespaces,
        created_at: now,
        expires_at: now + ttl_secs,
        reusable,
        uses: 0,
        revoked: false,
    };
    NewToken { token: format!("{id}.{secret}"), record }
}

pub fn split(token: &str) -> Result<(&str, &str), TokenRefusal> {
    let (id, secret) = token.split_once('.').ok_or(TokenRefusal::Malformed)?;
    let hex_ok = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex_ok(id, 12) || !hex_ok(secret, 32) {
        return Err(TokenRefusal::Malformed);
    }
    Ok((id, secret))
}

/// Decides whether `record` lets `node` join now with `secret`.
pub fn check(record: &TokenRecord, secret: &str, node: &str, now: i64) -> Result<(), TokenRefusal> {
    let presented = hash_secret(secret);
    if aws_lc_rs::constant_time::verify_slices_are_equal(presented.as_bytes(), record.secret_sha256.as_bytes()).is_err()
    {
        return Err(TokenRefusal::Invalid);
    }
    if record.revoked {
        return Err(TokenRefusal::Revoked);
    }
    if now >= record.expires_at {
        return Err(TokenRefusal::Expired);
    }
    if !record.reusable && record.uses > 0 {
        return Err(TokenRefusal::Used);
    }
    if record.node != node {
        return Err(TokenRefusal::WrongNode { token_node: record.node.clone(), node: node.to_owned() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks() {
        let new = generate("n1", vec!["default".into()], 3600, false, 1000);
        let (id, secret) = split(&new.token).unwrap();
        assert_eq!(id, new.record.id);
        assert!(!new.token.contains(&new.record.secret_sha256));
        let ok = new.record.clone();
        let used = TokenRecord { uses: 1, ..ok.clone() };
        let reusable_used = TokenRecord { uses: 5, reusable: true, ..ok.clone() };
        let revoked = TokenRecord { revoked: true, ..ok.clone() };
        let zeros = "0".repeat(32);
        type Case<'a> = (&'a TokenRecord, &'a str, &'a str, i64, Result<(), TokenRefusal>);
        let cases: Vec<Case> = vec![
            (&ok, secret, "n1", 1001, Ok(())),
            (&ok, secret, "n1", 4600, Err(TokenRefusal::Expired)),
            (&ok, &zeros, "n1", 1001, Err(TokenRefusal::Invalid)),
            (&used, secret, "n1", 1001, Err(TokenRefusal::Used)),
            (&reusable_used, secret, "n1", 1001, Ok(())),
            (&revoked, secret, "n1", 1001, Err(TokenRefusal::Revoked)),
            (&ok, secret, "n2", 1001, Err(TokenRefusal::WrongNode { token_node: "n1".into(), node: "n2".into() })),
        ];
        for (i, (record, secret, node, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(check(record, secret, node, now), want, "case {i}");
        }
        assert_eq!(split("nodot"), Err(TokenRefusal::Malformed));
        assert_eq!(split("abc.def"), Err(TokenRefusal::Malformed));
    }
}
