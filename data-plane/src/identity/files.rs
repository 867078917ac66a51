//! Files in the state directory: the directory is private (0700), the node key is owner-only (0600), and
//! every file is replaced atomically so a crash never leaves a half-written credential behind.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DIR_MODE: u32 = 0o700;
pub const SECRET_MODE: u32 = 0o600;
pub const PUBLIC_MODE: u32 = 0o644;

/// Creates the directory (and parents) if needed and makes it owner-only.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Writes `contents` to `path` with `mode` via a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| io::Error::other("path has no file name"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", file_name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    if let Err(e) = write_new(&tmp, contents, mode).and_then(|()| fs::rename(&tmp, path)) {
        // A full disk, say: no partial file left behind to hold the space.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Creates `path` (which must not exist) with `mode` and `contents`, synced to disk.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    // The umask may have narrowed the mode on create; set it exactly.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Makes renames in `dir` durable; best effort (not every filesystem allows syncing a directory).
pub fn sync_dir(dir: &Path) {
    let _ = fs::File::open(dir).and_then(|d| d.sync_all());
}

#[cfg(test)]
pub(crate) fn temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("trellis-dp-test-{tag}-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn modes_and_atomic_replace() {
        let root = temp_dir("files");
        let dir = root.join("state");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), DIR_MODE);

        let key = dir.join("node-key.pem");
        write_atomic(&key, b"one", SECRET_MODE).unwrap();
        write_atomic(&key, b"two", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"two");
        assert_eq!(mode(&key), SECRET_MODE);

        let public = dir.join("bundle.pem");
        write_atomic(&public, b"x", PUBLIC_MODE).unwrap();
        assert_eq!(mode(&public), PUBLIC_MODE);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);

        // A loose existing directory is tightened.
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
        fs::remove_dir_all(&root).unwrap();
    }
}
