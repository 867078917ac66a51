//! The key-encryption key (`--kek-file`): private keys kept in a shared store (etcd) are sealed with it, so that
//! reading etcd alone never reveals the CA. AES-256-GCM, a random 96-bit nonce per value, the store key as
//! associated data (a sealed value moved to another key does not open), and the KEK's id in the value so that a
//! value sealed with another KEK is refused by name rather than as garbage.
//!
//! Sealed value: `trellis-sealed:v1:<kek id, 16 hex>:` then nonce (12 bytes) then ciphertext and tag.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const MAGIC: &[u8] = b"trellis-sealed:v1:";
const ID_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("--kek-file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("--kek-file {path}: mode {mode:04o} lets group or others read it; it must be 0600 (chmod 600 {path})")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("--kek-file {path}: expected 32 bytes, raw or as 64 hex digits (`openssl rand -hex 32`), found {found}")]
    Format { path: PathBuf, found: String },
    #[error("{key}: sealed with KEK {found}, but --kek-file holds KEK {ours}")]
    WrongKek { key: String, found: String, ours: String },
    #[error("{key}: not a sealed value, or corrupt")]
    Corrupt { key: String },
    #[error("sealing failed")]
    Seal,
}

pub struct Kek {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Kek {
    /// Reads the KEK; refuses a file group or others could read.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let read_err = |source| KekError::Read { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KekError::Permissions { path: path.to_owned(), mode });
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        let raw = if bytes.len() == 32 {
            bytes
        } else {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            match hex::decode(&text) {
                Ok(raw) if raw.len() == 32 => raw,
                _ => {
                    return Err(KekError::Format { path: path.to_owned(), found: format!("{} bytes", bytes.len()) });
                }
            }
        };
        Self::from_bytes(&raw).ok_or_else(|| KekError::Format { path: path.to_owned(), found: "bad key".into() })
    }

    pub fn from_bytes(raw: &[u8]) -> Option<Self> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw);
        let id = hex::encode(&digest.as_ref()[..ID_LEN / 2]);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).ok()?);
        Some(Self { key, id })
    }

    /// The KEK's id (first 8 bytes of its SHA-256, hex): names it without revealing it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext` stored under `key`.
    pub fn seal(&self, key: &str, plaintext: &[u8]) -> Result<Vec<u8>, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| KekError::Seal)?;
        let mut sealed = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(key.as_bytes()), &mut sealed)
            .map_err(|_| KekError::Seal)?;
        let mut out = Vec::with_capacity(MAGIC.len() + ID_LEN + 1 + NONCE_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(self.id.as_bytes());
        out.push(b':');
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a value [`Kek::seal`] made for `key`.
    pub fn open(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, KekError> {
        let corrupt = || KekError::Corrupt { key: key.to_owned() };
        let rest = value.strip_prefix(MAGIC).ok_or_else(corrupt)?;
        if rest.len() < ID_LEN + 1 + NONCE_LEN || rest[ID_LEN] != b':' {
            return Err(corrupt());
        }
        let id = String::from_utf8_lossy(&rest[..ID_LEN]).into_owned();
        if id != self.id {
            return Err(KekError::WrongKek { key: key.to_owned(), found: id, ours: self.id.clone() });
        }
        let nonce =
            Nonce::try_assume_unique_for_key(&rest[ID_LEN + 1..ID_LEN + 1 + NONCE_LEN]).map_err(|_| corrupt())?;
        let mut sealed = rest[ID_LEN + 1 + NONCE_LEN..].to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(key.as_bytes()), &mut sealed).map_err(|_| corrupt())?;
        Ok(plain.to_vec())
    }

    pub fn is_sealed(value: &[u8]) -> bool {
        value.starts_with(MAGIC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_refusals() {
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        let sealed = kek.seal("ca/ca-key.pem", b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(Kek::is_sealed(&sealed));
        assert!(!sealed.windows(11).any(|w| w == b"PRIVATE KEY"), "plaintext visible in the sealed value");
        // A fresh nonce per write.
        assert_ne!(sealed, kek.seal("ca/ca-key.pem", b"-----BEGIN PRIVATE KEY-----").unwrap());
        assert_eq!(kek.open("ca/ca-key.pem", &sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        // Moved to another key: refused.
        assert!(matches!(kek.open("ca/other.pem", &sealed), Err(KekError::Corrupt { .. })));
        // Another KEK: refused by name.
        let other = Kek::from_bytes(&[8u8; 32]).unwrap();
        let err = other.open("ca/ca-key.pem", &sealed).unwrap_err().to_string();
        assert!(err.contains(kek.id()) && err.contains(other.id()), "{err}");
    }

    #[test]
    fn kek_file_must_be_private_and_well_formed() {
        let dir = std::env::temp_dir().join(format!("trellis-kek-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kek");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Kek::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("0644") && err.contains("0600"), "{err}");
        // Control: the same file at 0600 loads.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Kek::load(&path).unwrap();
        std::fs::write(&path, "short").unwrap();
        let err = Kek::load(&path).unwrap_err().to_string();
        assert!(err.contains("expected 32 bytes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
