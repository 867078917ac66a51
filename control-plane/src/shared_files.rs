//! On a shared store (etcd), the data dir files every replica needs are kept in the store too (table `CaFiles`):
//! `control.yaml`, the CA directories (`ca*/`) and the initial admin's certificate (named by `init`). `init` publishes them once;
//! `serve` writes the missing ones into its own data dir before loading the CA, so a new replica needs only the
//! etcd endpoints and the KEK. Private keys (`*key*`) are sealed with the KEK (`kek.rs`).

use std::path::{Path, PathBuf};

use crate::files::write_new;
use crate::kek::{Kek, KekError};
use crate::store::{Store, StoreError, Table, transact};

#[derive(Debug, thiserror::Error)]
pub enum SharedFilesError {
    #[error(
        "the store already holds a mesh (control.yaml and CA published by an earlier init): refusing to init it again"
    )]
    AlreadyInitialized,
    #[error("the store holds no mesh: run `trellis-control init` against it first")]
    NotInitialized,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Kek(#[from] KekError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

const MARKER: &str = crate::settings::CONTROL_FILE;

fn is_private(relative: &str) -> bool {
    relative.rsplit('/').next().is_some_and(|name| name.contains("key"))
}

/// The files of `data_dir` that are shared, as paths relative to it: control.yaml, the CA dirs, and `also`.
fn shared_files(data_dir: &Path, also: &[&str]) -> Result<Vec<String>, SharedFilesError> {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SharedFilesError + '_ {
        move |source| SharedFilesError::Io { path: path.to_owned(), source }
    }
    let mut out = vec![MARKER.to_owned()];
    out.extend(also.iter().filter(|f| data_dir.join(f).exists()).map(|f| f.to_string()));
    for entry in std::fs::read_dir(data_dir).map_err(io(data_dir))? {
        let entry = entry.map_err(io(data_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("ca") || !entry.path().is_dir() {
            continue;
        }
        for file in std::fs::read_dir(entry.path()).map_err(io(&entry.path()))? {
            let file = file.map_err(io(&entry.path()))?;
            if file.path().is_file() {
                out.push(format!("{name}/{}", file.file_name().to_string_lossy()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Publishes the shared files of `data_dir` (and the files `also` names); with `first`, refuses a store that
/// already has a mesh.
pub fn publish(
    store: &dyn Store,
    data_dir: &Path,
    kek: &Kek,
    first: bool,
    also: &[&str],
) -> Result<usize, SharedFilesError> {
    let mut values = Vec::new();
    for relative in shared_files(data_dir, also)? {
        let path = data_dir.join(&relative);
        let bytes = std::fs::read(&path).map_err(|source| SharedFilesError::Io { path: path.clone(), source })?;
        let value = if is_private(&relative) { kek.seal(&relative, &bytes)? } else { bytes };
        values.push((relative, value));
    }
    transact(store, |txn| {
        if first && txn.get(Table::CaFiles, MARKER)?.is_some() {
            return Err(SharedFilesError::AlreadyInitialized);
        }
        for (relative, value) in &values {
            if txn.get(Table::CaFiles, relative)?.is_none() {
                txn.put(Table::CaFiles, relative, value)?;
            }
        }
        Ok(values.len())
    })
}

/// The files of one CA folder of `data_dir` (a rotation's new CA) as the store keeps them (keys sealed), for the
/// caller to write in its own transaction.
pub fn ca_dir_values(data_dir: &Path, dir: &str, kek: &Kek) -> Result<Vec<(String, Vec<u8>)>, SharedFilesError> {
    let path = data_dir.join(dir);
    let mut values = Vec::new();
    for file in std::fs::read_dir(&path).map_err(|source| SharedFilesError::Io { path: path.clone(), source })? {
        let file = file.map_err(|source| SharedFilesError::Io { path: path.clone(), source })?;
        if !file.path().is_file() {
            continue;
        }
        let relative = format!("{dir}/{}", file.file_name().to_string_lossy());
        let bytes = std::fs::read(file.path()).map_err(|source| SharedFilesError::Io { path: file.path(), source })?;
        let value = if is_private(&relative) { kek.seal(&relative, &bytes)? } else { bytes };
        values.push((relative, value));
    }
    values.sort();
    Ok(values)
}

/// Writes the shared files missing from `data_dir` (existing files are left as they are). Returns how many.
pub fn materialize(store: &dyn Store, data_dir: &Path, kek: &Kek) -> Result<usize, SharedFilesError> {
    let files = store.list(Table::CaFiles)?;
    if !files.iter().any(|(k, _)| k == MARKER) {
        return Err(SharedFilesError::NotInitialized);
    }
    let mut written = 0;
    for (relative, value) in files {
        if relative.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return Err(StoreError::Corrupt {
                table: Table::CaFiles,
                key: relative,
                reason: "not a plain path".into(),
            }
            .into());
        }
        let path = data_dir.join(&relative);
        if path.exists() {
            continue;
        }
        let private = is_private(&relative);
        let bytes = if private { kek.open(&relative, &value)? } else { value };
        // Whole or not at all, as another thread of this replica may be materializing (or loading) the same CA
        // folder at once (the follower, the rotation driver): written aside, then renamed into place.
        static ASIDE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = ASIDE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let aside = path.with_extension(format!("materializing-{}-{n}", std::process::id()));
        let io = |source| SharedFilesError::Io { path: path.clone(), source };
        write_new(&aside, &bytes, if private { 0o600 } else { 0o644 }).map_err(io)?;
        std::fs::rename(&aside, &path).map_err(io)?;
        written += 1;
    }
    Ok(written)
}

/// Overwrites the local copies of the shared files named `file_name` (in any CA folder) whose content differs from
/// the store's: the store's copy wins. Returns how many were replaced.
pub fn adopt(store: &dyn Store, data_dir: &Path, kek: &Kek, file_name: &str) -> Result<usize, SharedFilesError> {
    let mut replaced = 0;
    for (relative, value) in store.list(Table::CaFiles)? {
        let Some((dir, name)) = relative.split_once('/') else { continue };
        if name != file_name || dir.is_empty() || dir == "." || dir == ".." || name.contains('/') {
            continue;
        }
        let bytes = if is_private(&relative) { kek.open(&relative, &value)? } else { value };
        let path = data_dir.join(&relative);
        if std::fs::read(&path).ok().as_deref() == Some(bytes.as_slice()) {
            continue;
        }
        let _ = std::fs::remove_file(&path);
        write_new(&path, &bytes, if is_private(&relative) { 0o600 } else { 0o644 })
            .map_err(|source| SharedFilesError::Io { path: path.clone(), source })?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt_key::{JWT_KEY_FILE, JwtKey};
    use crate::store::RedbStore;

    /// Two replicas of a store from before JWT-SVIDs each make a JWT key at start: the first to publish wins, the
    /// other adopts it, so both sign with (and publish) the same key; the store holds it sealed.
    #[test]
    fn replicas_converge_on_the_first_published_jwt_key() {
        let root = std::env::temp_dir().join(format!("trellis-shared-jwt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let store = RedbStore::open(&root.join("store.redb")).unwrap();
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        let replica = |name: &str| {
            let dir = root.join(name);
            std::fs::create_dir_all(dir.join("ca")).unwrap();
            std::fs::write(dir.join(MARKER), "trustDomain: td\n").unwrap();
            let key = JwtKey::load_or_create(&dir.join("ca")).unwrap();
            (dir, key.kid().to_owned())
        };
        let ((one, kid_one), (two, kid_two)) = (replica("one"), replica("two"));
        assert_ne!(kid_one, kid_two);

        publish(&store, &one, &kek, false, &[]).unwrap();
        assert_eq!(adopt(&store, &one, &kek, JWT_KEY_FILE).unwrap(), 0, "the first replica's key is the store's");
        publish(&store, &two, &kek, false, &[]).unwrap();
        assert_eq!(adopt(&store, &two, &kek, JWT_KEY_FILE).unwrap(), 1);
        assert_eq!(JwtKey::load_or_create(&two.join("ca")).unwrap().kid(), kid_one);

        let sealed = store.get(Table::CaFiles, "ca/jwt-key.pem").unwrap().unwrap();
        assert!(Kek::is_sealed(&sealed), "the JWT key is sealed in the store like the CA key");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
