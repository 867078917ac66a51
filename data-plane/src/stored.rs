//! What the proxy keeps in its state directory so that a restart while the control plane is unreachable still
//! serves: the last config it ACKed (`mesh-config.pb`, a full `ConfigUpdate` rebuilt from the state, which carries
//! the trust bundle) and each workload's certificate with its key (`svid-<hash>.pem`, 0600). Every file is replaced
//! atomically (write to a temporary file, then rename), so a crash leaves the previous copy or the new one.
//!
//! At start (`app`) the stored files are read back through the same checks as fresh ones: the config goes through
//! `state::apply` (a file that does not apply is ignored, with a warning), a certificate must carry its key, its
//! identity and a `notAfter` still ahead, and expired roots are dropped from the bundle. Nothing expired is used: a
//! certificate that expires later is withdrawn on time by `CertManager`, as a fresh one would be.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use rcgen::PublicKeyData;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tracing::{info, warn};
use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1;

use crate::identity::certs::{self, CertError};
use crate::identity::files;
use crate::identity::{WorkloadCert, WorkloadCerts};
use crate::state::{self, ApplyError, State, StateStore};

/// The last ACKed config, as a full snapshot (protobuf).
pub const CONFIG_FILE: &str = "mesh-config.pb";

#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a stored config: {source}")]
    Decode { path: PathBuf, source: prost::DecodeError },
    #[error("{path}: the stored config does not apply: {source}")]
    Apply { path: PathBuf, source: ApplyError },
    #[error("{path}: every root of the stored trust bundle has expired")]
    RootsExpired { path: PathBuf },
    #[error("{path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    CertCheck { path: PathBuf, source: CertError },
}

/// The state as a full snapshot: what `state::apply` turns back into the same state.
pub fn snapshot(state: &State) -> v1::ConfigUpdate {
    v1::ConfigUpdate {
        version: state.version,
        full: true,
        trust_bundle: state.trust_bundle.as_ref().map(|b| v1::TrustBundle {
            trust_domain: b.trust_domain.clone(),
            roots: b.roots.iter().map(|r| r.der.to_vec()).collect(),
            jwks: state.mesh_jwks.to_string(),
        }),
        workloads: state.workloads.values().map(|w| (**w).clone()).collect(),
        resources: state
            .resources
            .iter()
            .map(|(key, stored)| v1::Resource {
                key: Some(v1::ResourceKey {
                    kind: key.kind.as_str().to_owned(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                }),
                revision: stored.revision,
                json: stored.resource.to_json(),
            })
            .collect(),
        jwks: Some(v1::JwksSet {
            entries: state.jwks.iter().map(|(uri, json)| v1::Jwks { uri: uri.clone(), json: json.clone() }).collect(),
        }),
        ..Default::default()
    }
}

/// Writes the state (synced states only) as the stored config.
pub fn save_config(dir: &Path, state: &State) -> Result<(), StoredError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = snapshot(state).encode_to_vec();
    files::write_atomic(&path, &bytes, files::SECRET_MODE).map_err(|source| StoredError::Io { path, source })
}

/// Reads the stored config and applies it to `base` (the empty state with this proxy's trust domain and root
/// namespace); `Ok(None)` when there is none. Roots expired at `now` are dropped; none left is an error.
pub fn load_config(dir: &Path, base: &State, now: SystemTime) -> Result<Option<State>, StoredError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoredError::Io { path, source }),
    };
    let mut update = v1::ConfigUpdate::decode(bytes.as_slice())
        .map_err(|source| StoredError::Decode { path: path.clone(), source })?;
    if let Some(bundle) = update.trust_bundle.as_mut() {
        bundle.roots.retain(|der| certs::CertInfo::parse(der).is_ok_and(|info| info.not_after > now));
        if bundle.roots.is_empty() {
            return Err(StoredError::RootsExpired { path });
        }
    }
    let mut restored = state::apply(base, &update).map_err(|source| StoredError::Apply { path, source })?;
    restored.restored = true;
    Ok(Some(restored))
}

/// The file holding `id`'s certificate and key: named by a hash of the SPIFFE ID (any ID maps to a safe name).
pub fn cert_path(dir: &Path, id: &SpiffeId) -> PathBuf {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.to_string().as_bytes());
    dir.join(format!("svid-{}.pem", hex::encode(&digest.as_ref()[..12])))
}

/// Writes a workload certificate with its key (PEM: the key, then the chain), owner-only.
pub fn save_cert(dir: &Path, cert: &WorkloadCert) -> Result<(), StoredError> {
    let path = cert_path(dir, &cert.spiffe_id);
    let mut text = pem::encode(&pem::Pem::new("PRIVATE KEY", cert.pkcs8_der().to_vec()));
    text.push_str(&certs::to_pem(&cert.chain));
    files::write_atomic(&path, text.as_bytes(), files::SECRET_MODE).map_err(|source| StoredError::Io { path, source })
}

/// Removes `id`'s stored certificate (it was withdrawn); a missing file is fine.
pub fn remove_cert(dir: &Path, id: &SpiffeId) -> Result<(), StoredError> {
    let path = cert_path(dir, id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoredError::Io { path, source }),
    }
}

/// Reads `id`'s stored certificate: `Ok(None)` when there is none; an error when it is unusable (expired at `now`,
/// another identity, a key that does not match).
pub fn load_cert(dir: &Path, id: &SpiffeId, now: SystemTime) -> Result<Option<WorkloadCert>, StoredError> {
    let path = cert_path(dir, id);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoredError::Io { path, source }),
    };
    let bad = |reason: String| StoredError::Cert { path: path.clone(), reason };
    let blocks = pem::parse_many(&text).map_err(|e| bad(format!("PEM: {e}")))?;
    let key_der = blocks
        .iter()
        .find(|b| b.tag() == "PRIVATE KEY")
        .map(|b| b.contents().to_vec())
        .ok_or_else(|| bad("no PRIVATE KEY block".into()))?;
    let key = PrivatePkcs8KeyDer::from(key_der);
    let key_pair = rcgen::KeyPair::try_from(&key).map_err(|e| bad(format!("key: {e}")))?;
    let chain: Vec<CertificateDer<'static>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    let info = certs::check_issued(&chain, &key_pair.subject_public_key_info(), id, now)
        .map_err(|source| StoredError::CertCheck { path: path.clone(), source })?;
    Ok(Some(WorkloadCert::new(id.clone(), chain, info, key)))
}

/// Keeps the state directory in step: every newly stored synced state (an ACKed config) is written as the stored
/// config, every installed certificate is written and every withdrawn one removed. The writes run on a blocking
/// thread (they sync to disk), one at a time; changes that arrive meanwhile are coalesced into the next write. A
/// write that fails (a full disk) is retried every `RETRY_AFTER` until it succeeds or a newer one replaces it.
pub async fn follow(dir: PathBuf, state: Arc<StateStore>, certs: Arc<WorkloadCerts>) {
    let mut state_changes = state.subscribe();
    let mut cert_changes = certs.subscribe();
    // What is on disk now: the version written (None before the first) and each identity's serial.
    let mut written_version: Option<u64> = state.load().restored.then(|| state.load().version);
    let mut written_serials: std::collections::BTreeMap<SpiffeId, Option<String>> =
        certs.ids().map(|id| (id.clone(), certs.get(id).map(|c| c.info.serial.clone()))).collect();
    loop {
        let current = state.load();
        let config =
            (current.synced && !current.restored && written_version != Some(current.version)).then(|| current.clone());
        let mut cert_writes: Vec<(SpiffeId, Option<Arc<WorkloadCert>>)> = Vec::new();
        for (id, serial) in &mut written_serials {
            let now = certs.get(id);
            let now_serial = now.as_ref().map(|c| c.info.serial.clone());
            if *serial != now_serial {
                *serial = now_serial;
                cert_writes.push((id.clone(), now));
            }
        }
        let mut retry = false;
        if config.is_some() || !cert_writes.is_empty() {
            let dir = dir.clone();
            let version = config.as_ref().map(|c| c.version);
            let written = tokio::task::spawn_blocking(move || write_all(&dir, config.as_deref(), &cert_writes)).await;
            match written {
                Ok(written) => {
                    if written.config {
                        written_version = version.or(written_version);
                    }
                    // Marked as not on disk (no serial is empty), so that the next round writes them again.
                    for id in &written.failed_certs {
                        written_serials.insert(id.clone(), Some(String::new()));
                    }
                    retry = !written.config || !written.failed_certs.is_empty();
                }
                Err(e) => {
                    warn!(error = %e, "the task storing the config and certificates failed");
                    retry = true;
                }
            }
        }
        tokio::select! {
            changed = state_changes.changed() => if changed.is_err() { return },
            changed = cert_changes.changed() => if changed.is_err() { return },
            // A write that failed (a full disk, say) is tried again, so that recovery needs no further change.
            () = tokio::time::sleep(RETRY_AFTER), if retry => {}
        }
    }
}

/// How long after a failed write the proxy tries again.
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// What a round of writes did: whether the config (if any) was written, and the certificates that were not.
struct Written {
    config: bool,
    failed_certs: Vec<SpiffeId>,
}

fn write_all(dir: &Path, config: Option<&State>, certs: &[(SpiffeId, Option<Arc<WorkloadCert>>)]) -> Written {
    let mut written = Written { config: true, failed_certs: Vec::new() };
    if let Some(state) = config {
        match save_config(dir, state) {
            Ok(()) => info!(version = state.version, "config stored for a restart without the control plane"),
            Err(e) => {
                warn!(error = %e, retry_in = ?RETRY_AFTER,
                    "cannot store the config; a restart will wait for the control plane");
                written.config = false;
            }
        }
    }
    for (id, cert) in certs {
        let result = match cert {
            Some(cert) => save_cert(dir, cert),
            None => remove_cert(dir, id),
        };
        if let Err(e) = result {
            warn!(spiffe_id = %id, error = %e, retry_in = ?RETRY_AFTER, "cannot store the workload certificate");
            written.failed_certs.push(id.clone());
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certs::test_ca::TestCa;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::workload("td", "ns", sa).unwrap()
    }

    fn cert(ca: &TestCa, id: &SpiffeId, from: time::Duration, to: time::Duration) -> WorkloadCert {
        let now = time::OffsetDateTime::now_utc();
        let san = rcgen::SanType::URI(id.to_string().as_str().try_into().unwrap());
        let (chain, key) = ca.issue(vec![san], now + from, now + to);
        let info = certs::CertInfo::parse(&chain[0]).unwrap();
        let rustls_pki_types::PrivateKeyDer::Pkcs8(key) = key else { panic!("PKCS#8 key") };
        WorkloadCert::new(id.clone(), chain, info, key)
    }

    fn synced_state(ca: &TestCa) -> State {
        let update = v1::ConfigUpdate {
            version: 7,
            full: true,
            trust_bundle: Some(v1::TrustBundle { trust_domain: "td".into(), roots: vec![ca.root.to_vec()], jwks: String::new() }),
            workloads: vec![v1::Workload {
                name: "a".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                addresses: vec!["10.0.0.1".into()],
                ports: vec![v1::Port { port: 80, protocol: v1::Protocol::Tcp as i32 }],
                ..Default::default()
            }],
            resources: vec![v1::Resource {
                key: Some(v1::ResourceKey { kind: "AuthorizationPolicy".into(), namespace: "ns".into(), name: "p".into() }),
                revision: 3,
                json: r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"p","namespace":"ns"},"spec":{"action":"DENY","rules":[{"from":[{"source":{"principals":["td/ns/x/sa/y"]}}]}]}}"#.into(),
            }],
            jwks: Some(v1::JwksSet { entries: vec![v1::Jwks { uri: "https://a".into(), json: r#"{"keys":[]}"#.into() }] }),
            ..Default::default()
        };
        state::apply(&State::new("td"), &update).unwrap()
    }

    #[test]
    fn config_round_trips_through_the_file_and_is_marked_restored() {
        let ca = TestCa::new();
        let dir = files::temp_dir("stored-config");
        files::ensure_private_dir(&dir).unwrap();
        let base = State::new("td");
        assert!(load_config(&dir, &base, SystemTime::now()).unwrap().is_none());

        let state = synced_state(&ca);
        save_config(&dir, &state).unwrap();
        let mode = std::fs::metadata(dir.join(CONFIG_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load_config(&dir, &base, SystemTime::now()).unwrap().unwrap();
        assert!(back.restored && back.synced);
        assert_eq!(back.version, 7);
        assert_eq!(back.workloads, state.workloads);
        assert_eq!(back.jwks, state.jwks);
        let resources = |s: &State| {
            s.resources.iter().map(|(k, r)| (k.clone(), r.revision, r.resource.to_json())).collect::<Vec<_>>()
        };
        assert_eq!(resources(&back), resources(&state));
        assert_eq!(back.trust_bundle.as_ref().unwrap().root_ders(), state.trust_bundle.as_ref().unwrap().root_ders());
        // The control plane's next full snapshot replaces it and clears the mark.
        assert!(!state::apply(&back, &snapshot(&synced_state(&ca))).unwrap().restored);

        // Another trust domain's proxy does not take it; nor does anything that is not a stored config.
        let err = load_config(&dir, &State::new("other"), SystemTime::now()).unwrap_err().to_string();
        assert!(err.contains("does not apply") && err.contains("not this proxy's trust domain"), "{err}");
        // Roots past their notAfter are dropped; none left, nothing is used.
        let later = certs::CertInfo::parse(&ca.root).unwrap().not_after + Duration::from_secs(1);
        let err = load_config(&dir, &base, later).unwrap_err().to_string();
        assert!(err.contains("every root of the stored trust bundle has expired"), "{err}");
        std::fs::write(dir.join(CONFIG_FILE), b"\xff\xff garbage").unwrap();
        assert!(matches!(load_config(&dir, &base, SystemTime::now()), Err(StoredError::Decode { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn certificates_are_stored_owner_only_and_only_valid_ones_come_back() {
        let ca = TestCa::new();
        let dir = files::temp_dir("stored-certs");
        files::ensure_private_dir(&dir).unwrap();
        let hour = time::Duration::hours(1);
        let good = cert(&ca, &id("a"), -hour, hour);
        assert!(load_cert(&dir, &id("a"), SystemTime::now()).unwrap().is_none());
        save_cert(&dir, &good).unwrap();
        let path = cert_path(&dir, &id("a"));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let back = load_cert(&dir, &id("a"), SystemTime::now()).unwrap().unwrap();
        assert_eq!(back.info.serial, good.info.serial);
        assert_eq!(back.pkcs8_der(), good.pkcs8_der());
        assert_eq!(back.chain, good.chain);

        // Expired at the time of loading: refused.
        let later = SystemTime::now() + Duration::from_secs(7200);
        let err = load_cert(&dir, &id("a"), later).unwrap_err().to_string();
        assert!(err.contains("expired"), "{err}");
        let expired = cert(&ca, &id("b"), -hour - hour, -hour);
        save_cert(&dir, &expired).unwrap();
        assert!(load_cert(&dir, &id("b"), SystemTime::now()).unwrap_err().to_string().contains("expired"));
        // Another identity's file under this identity's name: refused.
        std::fs::copy(&path, cert_path(&dir, &id("c"))).unwrap();
        let err = load_cert(&dir, &id("c"), SystemTime::now()).unwrap_err().to_string();
        assert!(err.contains("expected spiffe://td/ns/ns/sa/c"), "{err}");
        // A key that is not the certificate's: refused.
        let other = cert(&ca, &id("a"), -hour, hour);
        let mixed = format!(
            "{}{}",
            pem::encode(&pem::Pem::new("PRIVATE KEY", other.pkcs8_der().to_vec())),
            certs::to_pem(&good.chain)
        );
        std::fs::write(&path, mixed).unwrap();
        assert!(matches!(load_cert(&dir, &id("a"), SystemTime::now()), Err(StoredError::CertCheck { .. })));
        std::fs::write(&path, "no pem here").unwrap();
        assert!(load_cert(&dir, &id("a"), SystemTime::now()).unwrap_err().to_string().contains("no PRIVATE KEY"));

        remove_cert(&dir, &id("a")).unwrap();
        remove_cert(&dir, &id("a")).unwrap();
        assert!(load_cert(&dir, &id("a"), SystemTime::now()).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn follow_writes_acked_configs_and_certificates_and_removes_withdrawn_ones() {
        let ca = TestCa::new();
        let dir = files::temp_dir("stored-follow");
        files::ensure_private_dir(&dir).unwrap();
        let state = Arc::new(StateStore::new(State::new("td")));
        let certs = Arc::new(WorkloadCerts::new([id("a")]));
        let mut manager = crate::identity::CertManager::new(certs.clone(), std::time::Instant::now());
        tokio::spawn(follow(dir.clone(), state.clone(), certs.clone()));
        let wait = |what: &'static str, check: Box<dyn Fn() -> bool>| async move {
            for _ in 0..500 {
                if check() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("timed out waiting for {what}");
        };

        state.store(synced_state(&ca));
        let d = dir.clone();
        wait("the config file", Box::new(move || d.join(CONFIG_FILE).exists())).await;
        let c = cert(&ca, &id("a"), -time::Duration::hours(1), time::Duration::hours(1));
        let serial = c.info.serial.clone();
        manager.restore(c, std::time::Instant::now(), SystemTime::now());
        let d = dir.clone();
        wait(
            "the certificate file",
            Box::new(move || {
                load_cert(&d, &id("a"), SystemTime::now()).ok().flatten().is_some_and(|c| c.info.serial == serial)
            }),
        )
        .await;
        // Withdrawn at expiry: the file goes too.
        manager.expire(std::time::Instant::now() + Duration::from_secs(7200));
        let d = dir.clone();
        wait("the certificate file to go", Box::new(move || !cert_path(&d, &id("a")).exists())).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
