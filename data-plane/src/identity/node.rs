//! The node credential: obtained once by exchanging a join token (trusting the control plane only through
//! the CA pin), then kept in the state directory so restarts need no token.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::PublicKeyData;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use trellis_proto::spiffe::{self, SpiffeId};
use trellis_proto::tls::{self, ClientIdentity, ServerTrust};
use trellis_proto::v1::identity_client::IdentityClient;
use trellis_proto::v1::{JoinRequest, JoinResponse};

use super::certs::{self, CertInfo};
use super::{csr, files};
use crate::config::ControlPlane;
use crate::connect_error;

pub const KEY_FILE: &str = "node-key.pem";
pub const CHAIN_FILE: &str = "node-chain.pem";
pub const BUNDLE_FILE: &str = "trust-bundle.pem";
/// Written last: its presence means the join completed.
pub const STATE_FILE: &str = "node.json";
/// A renewal's new key and chain, written before they replace the current pair (see [`NodeCredential::save_renewed`]).
pub const KEY_NEXT: &str = "node-key.next.pem";
pub const CHAIN_NEXT: &str = "node-chain.next.pem";

const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason} (remove the state directory and join again with a new token)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state directory {dir} holds the credential of node {stored:?}, but the config names node {configured:?}")]
    OtherNode { dir: PathBuf, stored: String, configured: String },
    #[error(
        "no node credential in {0} and no controlPlane.token in the config: the first start needs a join token \
         (trellisctl token create)"
    )]
    NoToken(PathBuf),
    #[error("the node credential in {dir} expired at {at}: set controlPlane.token to a new join token to join again")]
    Expired { dir: PathBuf, at: String },
    #[error("cannot reach the control plane at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the control plane refused the join ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the control plane's join response is unusable: {0}")]
    BadResponse(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
}

impl NodeError {
    /// Worth retrying: the control plane may be starting or briefly overloaded. Anything else needs an
    /// operator (bad token, wrong pin, revoked node...).
    pub fn is_transient(&self) -> bool {
        match self {
            NodeError::Unreachable { .. } => true,
            NodeError::Refused { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
            ),
            _ => false,
        }
    }
}

/// What `node.json` records next to the PEM files.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeState {
    node: String,
    trust_domain: String,
    namespaces: Vec<String>,
}

pub struct NodeCredential {
    pub node: String,
    pub spiffe_id: SpiffeId,
    /// Namespaces this node may host workloads in, as granted at join.
    pub namespaces: Vec<String>,
    /// Node certificate first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
    key: PrivatePkcs8KeyDer<'static>,
    /// Roots from the join or the last persisted rotation; the live ones are in the mesh state.
    pub roots: Vec<CertificateDer<'static>>,
}

// Hand-written so the private key never reaches a log line.
impl std::fmt::Debug for NodeCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredential")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("namespaces", &self.namespaces)
            .field("serial", &self.info.serial)
            .finish_non_exhaustive()
    }
}

impl NodeCredential {
    pub fn trust_domain(&self) -> &str {
        self.spiffe_id.trust_domain()
    }

    /// The client identity for the control channel.
    pub fn client_identity(&self) -> ClientIdentity {
        ClientIdentity { chain: self.chain.clone(), key: PrivateKeyDer::Pkcs8(self.key.clone_key()) }
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        self.info.not_after <= now
    }

    /// Reads the stored credential; `Ok(None)` when the node has not joined yet.
    pub fn load(dir: &Path, node: &str) -> Result<Option<Self>, NodeError> {
        finish_renewal(dir)?;
        let state_path = dir.join(STATE_FILE);
        let state_text = match std::fs::read_to_string(&state_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(NodeError::Io { path: state_path, source }),
        };
        let corrupt = |path: &Path, reason: String| NodeError::Corrupt { path: path.to_owned(), reason };
        let state: NodeState = serde_json::from_str(&state_text).map_err(|e| corrupt(&state_path, e.to_string()))?;
        if state.node != node {
            return Err(NodeError::OtherNode { dir: dir.to_owned(), stored: state.node, configured: node.to_owned() });
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| NodeError::Io { path, source })
        };

        let key_path = dir.join(KEY_FILE);
        let key_pair = rcgen::KeyPair::from_pem(&read(KEY_FILE)?).map_err(|e| corrupt(&key_path, e.to_string()))?;
        let chain_path = dir.join(CHAIN_FILE);
        let chain = certs::from_pem(&read(CHAIN_FILE)?).map_err(|e| corrupt(&chain_path, e.to_string()))?;
        let bundle_path = dir.join(BUNDLE_FILE);
        let roots = certs::from_pem(&read(BUNDLE_FILE)?).map_err(|e| corrupt(&bundle_path, e.to_string()))?;
        if roots.is_empty() {
            return Err(corrupt(&bundle_path, "no certificates".into()));
        }

        let spiffe_id = SpiffeId::node(&state.trust_domain, node).map_err(|e| corrupt(&state_path, e.to_string()))?;
        // Expiry is the caller's decision (it may join again), so check against the epoch here.
        let info = certs::check_issued(&chain, &key_pair.subject_public_key_info(), &spiffe_id, SystemTime::UNIX_EPOCH)
            .map_err(|e| corrupt(&chain_path, e.to_string()))?;
        Ok(Some(Self {
            node: node.to_owned(),
            spiffe_id,
            namespaces: state.namespaces,
            chain,
            info,
            key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
            roots,
        }))
    }

    /// Stores the credential: key, chain and bundle first, the state file last.
    pub fn save(&self, dir: &Path) -> Result<(), NodeError> {
        files::ensure_private_dir(dir).map_err(|source| NodeError::Io { path: dir.to_owned(), source })?;
        let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", self.key.secret_pkcs8_der().to_vec()));
        let state = NodeState {
            node: self.node.clone(),
            trust_domain: self.trust_domain().to_owned(),
            namespaces: self.namespaces.clone(),
        };
        let state_json = serde_json::to_string_pretty(&state).expect("node state serializes");
        let writes = [
            (KEY_FILE, key_pem, files::SECRET_MODE),
            (CHAIN_FILE, certs::to_pem(&self.chain), files::PUBLIC_MODE),
            (BUNDLE_FILE, certs::to_pem(&self.roots), files::PUBLIC_MODE),
            (STATE_FILE, state_json, files::PUBLIC_MODE),
        ];
        for (name, contents, mode) in writes {
            let path = dir.join(name);
            files::write_atomic(&path, contents.as_bytes(), mode).map_err(|source| NodeError::Io { path, source })?;
        }
        Ok(())
    }

    /// The credential a renewal brought: the same node, namespaces and stored roots, a new key and chain (checked:
    /// our new key, our node identity, not expired).
    pub fn renewed(
        &self,
        key: &rcgen::KeyPair,
        chain: Vec<CertificateDer<'static>>,
        now: SystemTime,
    ) -> Result<Self, certs::CertError> {
        let info = certs::check_issued(&chain, &key.subject_public_key_info(), &self.spiffe_id, now)?;
        Ok(Self {
            node: self.node.clone(),
            spiffe_id: self.spiffe_id.clone(),
            namespaces: self.namespaces.clone(),
            chain,
            info,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots: self.roots.clone(),
        })
    }

    /// Stores a renewed key and chain so that a crash at any point leaves a matching pair: both are written under
    /// their `.next` names first (each atomically), then renamed over the current files, key first. A start that
    /// finds the `.next` key still there discards the renewal (the old pair is intact); one that finds only the
    /// `.next` chain completes it ([`finish_renewal`]).
    pub fn save_renewed(&self, dir: &Path) -> Result<(), NodeError> {
        let io = |path: PathBuf| move |source| NodeError::Io { path, source };
        let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", self.key.secret_pkcs8_der().to_vec()));
        files::write_atomic(&dir.join(KEY_NEXT), key_pem.as_bytes(), files::SECRET_MODE)
            .map_err(io(dir.join(KEY_NEXT)))?;
        files::write_atomic(&dir.join(CHAIN_NEXT), certs::to_pem(&self.chain).as_bytes(), files::PUBLIC_MODE)
            .map_err(io(dir.join(CHAIN_NEXT)))?;
        std::fs::rename(dir.join(KEY_NEXT), dir.join(KEY_FILE)).map_err(io(dir.join(KEY_FILE)))?;
        std::fs::rename(dir.join(CHAIN_NEXT), dir.join(CHAIN_FILE)).map_err(io(dir.join(CHAIN_FILE)))?;
        files::sync_dir(dir);
        Ok(())
    }

    /// Joins the mesh: one attempt at the replica at `address`, trusting it only through the CA pin.
    pub async fn join(cp: &ControlPlane, address: &str, node: &str) -> Result<Self, NodeError> {
        let token = cp.token.clone().ok_or_else(|| NodeError::NoToken(PathBuf::new()))?;
        let key = csr::new_key()?;
        let csr_der = csr::node_csr(&key)?;

        let config = tls::client_config(ServerTrust::Pin(cp.ca_pin), None)?;
        let unreachable = |reason: String| NodeError::Unreachable { address: address.to_owned(), reason };
        let channel = tls::connect_with(address, config.into(), crate::sockets::connect_host)
            .await
            .map_err(|e| unreachable(connect_error(&e)))?;
        let request = JoinRequest { token, node: node.to_owned(), csr_der };
        let response = tokio::time::timeout(JOIN_TIMEOUT, IdentityClient::new(channel).join(request))
            .await
            .map_err(|_| unreachable(format!("no answer to Join within {JOIN_TIMEOUT:?}")))?
            .map_err(|status| NodeError::Refused { code: status.code(), message: status.message().to_owned() })?
            .into_inner();
        Self::from_join(node, &key, response, cp.ca_pin)
    }

    fn from_join(node: &str, key: &rcgen::KeyPair, response: JoinResponse, pin: [u8; 32]) -> Result<Self, NodeError> {
        let bad = NodeError::BadResponse;
        let bundle = response.trust_bundle.ok_or_else(|| bad("no trust bundle".into()))?;
        spiffe::validate_trust_domain(&bundle.trust_domain)
            .map_err(|e| bad(format!("trust domain {:?}: {e}", bundle.trust_domain)))?;
        if bundle.roots.is_empty() {
            return Err(bad("the trust bundle has no roots".into()));
        }
        let mut pinned_root_present = false;
        for (i, root) in bundle.roots.iter().enumerate() {
            let info = certs::check_root(root).map_err(|e| bad(format!("trust bundle root {i}: {e}")))?;
            pinned_root_present |= info.spki_sha256 == format!("sha256:{}", hex::encode(pin));
        }
        if !pinned_root_present {
            tracing::warn!("the trust bundle from the join does not contain the pinned root (root rotated?)");
        }

        let spiffe_id = SpiffeId::node(&bundle.trust_domain, node).map_err(|e| bad(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> =
            response.certificate_chain.into_iter().map(CertificateDer::from).collect();
        let info = certs::check_issued(&chain, &key.subject_public_key_info(), &spiffe_id, SystemTime::now())
            .map_err(|e| bad(format!("node certificate: {e}")))?;
        Ok(Self {
            node: node.to_owned(),
            spiffe_id,
            namespaces: response.namespaces,
            chain,
            info,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots: bundle.roots.into_iter().map(CertificateDer::from).collect(),
        })
    }
}

#[cfg(test)]
impl NodeCredential {
    /// A credential with these facts and a fresh key (no chain), for schedule tests.
    pub(crate) fn for_tests(spiffe_id: SpiffeId, info: CertInfo) -> Self {
        let key = csr::new_key().expect("key");
        Self {
            node: "n".into(),
            spiffe_id,
            namespaces: vec![],
            chain: vec![],
            info,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots: vec![],
        }
    }
}

/// Completes or discards a renewal that a crash interrupted in [`NodeCredential::save_renewed`].
fn finish_renewal(dir: &Path) -> Result<(), NodeError> {
    let (key_next, chain_next) = (dir.join(KEY_NEXT), dir.join(CHAIN_NEXT));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| NodeError::Io { path, source }
    };
    if key_next.exists() {
        // The renames had not begun: the current pair is the old one, whole.
        std::fs::remove_file(&key_next).map_err(io(&key_next))?;
        if chain_next.exists() {
            std::fs::remove_file(&chain_next).map_err(io(&chain_next))?;
        }
        tracing::warn!(dir = %dir.display(), "an interrupted node credential renewal was discarded");
    } else if chain_next.exists() {
        // The new key is in place: its chain goes with it.
        std::fs::rename(&chain_next, dir.join(CHAIN_FILE)).map_err(io(&chain_next))?;
        files::sync_dir(dir);
        tracing::warn!(dir = %dir.display(), "an interrupted node credential renewal was completed");
    }
    Ok(())
}

/// Replaces the stored trust bundle after a root rotation, so the next start trusts the new roots.
pub fn save_trust_bundle(dir: &Path, roots: &[CertificateDer<'_>]) -> Result<(), NodeError> {
    let path = dir.join(BUNDLE_FILE);
    files::write_atomic(&path, certs::to_pem(roots).as_bytes(), files::PUBLIC_MODE)
        .map_err(|source| NodeError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certs::test_ca::TestCa;
    use std::os::unix::fs::PermissionsExt;
    use trellis_proto::v1::TrustBundle;

    fn joined(ca: &TestCa, node: &str) -> NodeCredential {
        let key = csr::new_key().unwrap();
        // The test CA keeps the CSR's SANs, so name the node the way the control plane would.
        let id = SpiffeId::node("td.example", node).unwrap();
        let csr_der = csr::workload_csr(&key, &id).unwrap();
        let response = JoinResponse {
            certificate_chain: ca.sign(&csr_der, Duration::from_secs(3600)).into_iter().map(|c| c.to_vec()).collect(),
            trust_bundle: Some(TrustBundle {
                trust_domain: "td.example".into(),
                roots: vec![ca.root.to_vec()],
                jwks: String::new(),
            }),
            namespaces: vec!["shop".into()],
        };
        let pin = tls::spki_sha256(&ca.root).unwrap();
        NodeCredential::from_join(node, &key, response, pin).unwrap()
    }

    #[test]
    fn save_then_load_round_trips_with_private_modes() {
        let ca = TestCa::new();
        let cred = joined(&ca, "node-a");
        let root = files::temp_dir("node");
        let dir = root.join("state");
        assert!(NodeCredential::load(&dir, "node-a").unwrap().is_none());
        cred.save(&dir).unwrap();

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CHAIN_FILE)), 0o644);

        let loaded = NodeCredential::load(&dir, "node-a").unwrap().unwrap();
        assert_eq!(loaded.spiffe_id.to_string(), "spiffe://td.example/trellis/node/node-a");
        assert_eq!(loaded.namespaces, ["shop"]);
        assert_eq!(loaded.chain, cred.chain);
        assert_eq!(loaded.roots, cred.roots);
        assert_eq!(loaded.key.secret_pkcs8_der(), cred.key.secret_pkcs8_der());
        assert!(!format!("{loaded:?}").contains("PRIVATE"));

        assert!(matches!(NodeCredential::load(&dir, "node-b"), Err(NodeError::OtherNode { .. })));
        std::fs::write(dir.join(CHAIN_FILE), "garbage").unwrap();
        assert!(matches!(NodeCredential::load(&dir, "node-a"), Err(NodeError::Corrupt { .. })));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_renewal_interrupted_anywhere_leaves_a_matching_pair() {
        let ca = TestCa::new();
        let old = joined(&ca, "node-a");
        let root = files::temp_dir("node-renewal");
        let dir = root.join("state");
        old.save(&dir).unwrap();
        let key = csr::new_key().unwrap();
        let id = SpiffeId::node("td.example", "node-a").unwrap();
        let chain = ca.sign(&csr::workload_csr(&key, &id).unwrap(), Duration::from_secs(3600));
        let new = old.renewed(&key, chain, SystemTime::now()).unwrap();
        assert_ne!(new.info.serial, old.info.serial);
        // Someone else's key is refused.
        let other = csr::new_key().unwrap();
        let err = old.renewed(&other, new.chain.clone(), SystemTime::now()).unwrap_err();
        assert_eq!(err, certs::CertError::KeyMismatch);

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let serial_after_load = || NodeCredential::load(&dir, "node-a").unwrap().unwrap().info.serial;
        let write_next = || {
            let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", new.key.secret_pkcs8_der().to_vec()));
            std::fs::write(dir.join(KEY_NEXT), key_pem).unwrap();
            std::fs::write(dir.join(CHAIN_NEXT), certs::to_pem(&new.chain)).unwrap();
        };
        // Crash before the renames: the old credential, and no leftovers.
        write_next();
        assert_eq!(serial_after_load(), old.info.serial);
        assert!(!dir.join(KEY_NEXT).exists() && !dir.join(CHAIN_NEXT).exists());
        // Crash between the two renames: the new key is in place; the load completes the renewal.
        write_next();
        std::fs::rename(dir.join(KEY_NEXT), dir.join(KEY_FILE)).unwrap();
        assert_eq!(serial_after_load(), new.info.serial);
        // The whole renewal: the new credential, key owner-only.
        old.save(&dir).unwrap();
        new.save_renewed(&dir).unwrap();
        assert_eq!(serial_after_load(), new.info.serial);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert!(!dir.join(KEY_NEXT).exists() && !dir.join(CHAIN_NEXT).exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn join_response_is_checked() {
        let ca = TestCa::new();
        let key = csr::new_key().unwrap();
        let pin = tls::spki_sha256(&ca.root).unwrap();
        let signed = |id: &SpiffeId| -> Vec<Vec<u8>> {
            let csr_der = csr::workload_csr(&key, id).unwrap();
            ca.sign(&csr_der, Duration::from_secs(3600)).into_iter().map(|c| c.to_vec()).collect()
        };
        let good_bundle =
            Some(TrustBundle { trust_domain: "td".into(), roots: vec![ca.root.to_vec()], jwks: String::new() });
        let cases: Vec<(JoinResponse, &str)> = vec![
            (
                JoinResponse {
                    certificate_chain: signed(&SpiffeId::node("td", "n").unwrap()),
                    trust_bundle: None,
                    namespaces: vec![],
                },
                "no trust bundle",
            ),
            (
                JoinResponse {
                    certificate_chain: signed(&SpiffeId::node("td", "other").unwrap()),
                    trust_bundle: good_bundle.clone(),
                    namespaces: vec![],
                },
                "expected spiffe://td/trellis/node/n",
            ),
            (
                JoinResponse {
                    certificate_chain: signed(&SpiffeId::node("td", "n").unwrap()),
                    trust_bundle: Some(TrustBundle {
                        trust_domain: "td".into(),
                        roots: vec![ca.leaf().to_vec()],
                        jwks: String::new(),
                    }),
                    namespaces: vec![],
                },
                "not a CA certificate",
            ),
            (
                JoinResponse { certificate_chain: vec![], trust_bundle: good_bundle.clone(), namespaces: vec![] },
                "chain is empty",
            ),
        ];
        for (response, want) in cases {
            let err = NodeCredential::from_join("n", &key, response, pin).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?}, got {err}");
        }
        let ok = JoinResponse {
            certificate_chain: signed(&SpiffeId::node("td", "n").unwrap()),
            trust_bundle: good_bundle,
            namespaces: vec![],
        };
        assert!(NodeCredential::from_join("n", &key, ok, pin).is_ok());
    }
}
