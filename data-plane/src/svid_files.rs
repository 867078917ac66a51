//! SVID files (`workloads[].svidFiles`), spiffe-helper's job, for programs that only read files: a workload's
//! application SVID (the same key-of-its-own certificate the Workload API hands out) written as `svid.pem` (leaf and
//! intermediates), `svid_key.pem` (PKCS#8, mode 0600) and `bundle.pem` (the trust bundle's roots), owned by the
//! configured `uid:gid`. Each file is written to a temporary name in the same directory, synced, then renamed over
//! the old one, so a reader sees the old file or the new one, never a part. The key is renamed first and the bundle
//! last (a reader that loads certificate and key separately can see a new key with the old certificate for the
//! instant between two renames; reloading per handshake, as the tests' server does, retries on the next one).
//! Written when the SVID is renewed (the application CertManager renews at about half its lifetime) and when the
//! bundle changes; then the configured command runs and the signal is sent to the pid in the pid file.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};
use trellis_proto::spiffe::SpiffeId;

use crate::config::SvidFilesConfig;
use crate::identity::WorkloadCerts;
use crate::identity::workload::WorkloadCert;
use crate::state::{StateStore, TrustBundle};

pub const SVID: &str = "svid.pem";
pub const KEY: &str = "svid_key.pem";
pub const BUNDLE: &str = "bundle.pem";

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("svidFiles: cannot create {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("svidFiles: cannot write {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
}

/// One workload's files.
pub struct Target {
    pub id: SpiffeId,
    pub config: SvidFilesConfig,
}

/// The PEM texts of one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub svid: String,
    pub key: String,
    pub bundle: String,
}

impl Contents {
    pub fn new(cert: &WorkloadCert, bundle: &TrustBundle) -> Self {
        let roots = bundle.root_ders();
        let svid: Vec<pem::Pem> = (cert.chain.iter())
            .filter(|c| !roots.contains(c))
            .map(|c| pem::Pem::new("CERTIFICATE", c.to_vec()))
            .collect();
        let bundle: Vec<pem::Pem> = roots.iter().map(|c| pem::Pem::new("CERTIFICATE", c.to_vec())).collect();
        Contents {
            svid: pem::encode_many(&svid),
            key: pem::encode(&pem::Pem::new("PRIVATE KEY", cert.pkcs8_der().to_vec())),
            bundle: pem::encode_many(&bundle),
        }
    }
}

/// Writes the three files of `contents` into `config.dir` (created if missing), key first, bundle last.
pub fn write(config: &SvidFilesConfig, contents: &Contents) -> Result<(), WriteError> {
    let dir = &config.dir;
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|source| WriteError::Dir { path: dir.clone(), source })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .and_then(|()| std::os::unix::fs::chown(dir, Some(config.uid), Some(config.gid)))
            .map_err(|source| WriteError::Dir { path: dir.clone(), source })?;
    }
    for (name, text, mode) in
        [(KEY, &contents.key, 0o600), (SVID, &contents.svid, 0o644), (BUNDLE, &contents.bundle, 0o644)]
    {
        let path = dir.join(name);
        write_atomically(&path, text.as_bytes(), mode, config.uid, config.gid)
            .map_err(|source| WriteError::File { path, source })?;
    }
    Ok(())
}

/// A temporary file beside `path` (created with `mode`, so a key is never readable by others, not even briefly),
/// owned by uid:gid, synced, then renamed over `path`.
fn write_atomically(path: &Path, data: &[u8], mode: u32, uid: u32, gid: u32) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("svid");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// After a write: the command (without a shell; its exit logged, not awaited here) and the signal (through
/// kill(1), waited for: it is quick).
fn notify(id: &SpiffeId, config: &SvidFilesConfig) {
    if let Some((program, args)) = config.command.split_first() {
        match tokio::process::Command::new(program).args(args).kill_on_drop(false).spawn() {
            Ok(mut child) => {
                let id = id.clone();
                tokio::spawn(async move {
                    match child.wait().await {
                        Ok(status) if status.success() => {}
                        Ok(status) => warn!(spiffe_id = %id, %status, "svidFiles: the command failed"),
                        Err(e) => warn!(spiffe_id = %id, error = %e, "svidFiles: waiting for the command failed"),
                    }
                });
            }
            Err(e) => warn!(spiffe_id = %id, program, error = %e, "svidFiles: cannot run the command"),
        }
    }
    if let Some((_, name, pid_file)) = &config.signal {
        let pid = std::fs::read_to_string(pid_file).ok().and_then(|t| t.trim().parse::<i32>().ok()).filter(|p| *p > 0);
        match pid {
            // kill(1), not kill(2): the crate has no unsafe code here.
            Some(pid) => {
                let short = name.trim_start_matches("SIG");
                match std::process::Command::new("kill").args(["-s", short, &pid.to_string()]).status() {
                    Ok(status) if status.success() => {
                        info!(spiffe_id = %id, pid, signal = %name, "svidFiles: signal sent")
                    }
                    result => warn!(
                        spiffe_id = %id, pid, signal = %name, result = ?result,
                        "svidFiles: cannot send the signal"
                    ),
                }
            }
            None => warn!(spiffe_id = %id, pid_file = %pid_file.display(), "svidFiles: no pid in the pid file"),
        }
    }
}

/// Keeps every target's files current: on each certificate or trust bundle change, writes those whose contents
/// changed. A failed write is logged and retried at the next change or after a pause.
pub async fn follow(targets: Vec<Target>, certs: Arc<WorkloadCerts>, state: Arc<StateStore>) {
    let mut written: Vec<Option<Contents>> = vec![None; targets.len()];
    let mut cert_changes = certs.subscribe();
    let mut state_changes = state.subscribe();
    loop {
        let mut failed = false;
        if let Some(bundle) = state.load().trust_bundle.clone() {
            for (target, last) in targets.iter().zip(written.iter_mut()) {
                let Some(cert) = certs.get(&target.id) else { continue };
                let contents = Contents::new(&cert, &bundle);
                if last.as_ref() == Some(&contents) {
                    continue;
                }
                match write(&target.config, &contents) {
                    Ok(()) => {
                        info!(
                            spiffe_id = %target.id,
                            dir = %target.config.dir.display(),
                            serial = %cert.info.serial,
                            "svidFiles: SVID, key and bundle written"
                        );
                        crate::metrics::svid_files_written(&target.id);
                        *last = Some(contents);
                        notify(&target.id, &target.config);
                    }
                    Err(e) => {
                        warn!(spiffe_id = %target.id, error = %e, "svidFiles: write failed; retrying");
                        failed = true;
                    }
                }
            }
        }
        let retry = tokio::time::sleep(std::time::Duration::from_secs(if failed { 5 } else { 3600 }));
        tokio::select! {
            changed = cert_changes.changed() => if changed.is_err() { return },
            changed = state_changes.changed() => if changed.is_err() { return },
            _ = retry => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_replaced_whole_with_their_modes_and_owner() {
        let dir = std::env::temp_dir().join(format!("trellis-svid-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("probe"), "").unwrap();
        let probe = std::fs::metadata(dir.join("probe")).unwrap();
        let (uid, gid) = (std::os::unix::fs::MetadataExt::uid(&probe), std::os::unix::fs::MetadataExt::gid(&probe));
        let config = SvidFilesConfig { dir: dir.join("sub"), uid, gid, command: Vec::new(), signal: None };
        let first = Contents { svid: "A".into(), key: "K".into(), bundle: "B".into() };
        write(&config, &first).unwrap();
        let second = Contents { svid: "A2".into(), key: "K2".into(), bundle: "B2".into() };
        write(&config, &second).unwrap();
        let read = |name: &str| std::fs::read_to_string(config.dir.join(name)).unwrap();
        assert_eq!((read(SVID), read(KEY), read(BUNDLE)), ("A2".into(), "K2".into(), "B2".into()));
        let mode = |name: &str| std::fs::metadata(config.dir.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(KEY), mode(SVID), mode(BUNDLE)), (0o600, 0o644, 0o644));
        let names: Vec<String> =
            (std::fs::read_dir(&config.dir).unwrap()).map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 3, "no temporary file left: {names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
