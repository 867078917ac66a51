//! The address every listener is bound to, logged and written for whoever started the proxy: with port 0 in a
//! `listen.*` address the kernel picks a free port, and this is how an operator, a supervisor or a test learns it.
//!
//! Each bound listener is logged at INFO (`listening`, with `listener = "listen.<field>"` and the bound `address`).
//! With `trellis-proxy run --addresses-file PATH` they are also written to PATH as one JSON object keyed by the
//! `listen.*` field names (`{"admin": "127.0.0.1:15000", "hbone": "0.0.0.0:15008", ...}`), replaced atomically
//! (written beside it, then renamed) each time listeners are added: `admin` and `metrics` at start, the data-path
//! listeners and `ready` once the node credential is ready. `ready` is bound last, so its presence means every
//! listener is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tracing::info;

#[derive(Debug, thiserror::Error)]
#[error("cannot write --addresses-file {path}: {source}")]
pub struct WriteError {
    path: PathBuf,
    source: std::io::Error,
}

/// The listeners bound so far, by `listen.*` field name.
#[derive(Debug, Default)]
pub struct BoundAddresses {
    file: Option<PathBuf>,
    bound: BTreeMap<&'static str, SocketAddr>,
}

impl BoundAddresses {
    /// Bound addresses, written to `file` (if given) by [`BoundAddresses::publish`].
    pub fn new(file: Option<PathBuf>) -> Self {
        Self { file, bound: BTreeMap::new() }
    }

    /// Records (and logs) that listener `listen.<field>` is bound to `address`.
    pub fn add(&mut self, field: &'static str, address: SocketAddr) {
        info!(listener = %format_args!("listen.{field}"), %address, "listening");
        self.bound.insert(field, address);
    }

    pub fn get(&self, field: &str) -> Option<SocketAddr> {
        self.bound.get(field).copied()
    }

    /// Writes every address recorded so far to the file, if there is one.
    pub fn publish(&self) -> Result<(), WriteError> {
        let Some(path) = &self.file else { return Ok(()) };
        let text =
            serde_json::to_string(&self.bound.iter().map(|(k, v)| (*k, v.to_string())).collect::<BTreeMap<_, _>>())
                .expect("a map of strings serializes");
        replace(path, text.as_bytes()).map_err(|source| WriteError { path: path.clone(), source })
    }
}

/// Writes `contents` beside `path` and renames it over `path`, so that a reader sees the old file or the new one,
/// never a part.
fn replace(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mut temporary = name.to_owned();
    temporary.push(".tmp");
    let temporary = path.with_file_name(temporary);
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_holds_every_address_added_and_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("trellis-bound-addresses-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("addresses.json");
        let mut bound = BoundAddresses::new(Some(path.clone()));
        bound.add("admin", "127.0.0.1:40001".parse().unwrap());
        bound.publish().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), r#"{"admin":"127.0.0.1:40001"}"#);
        bound.add("hbone", "0.0.0.0:40002".parse().unwrap());
        bound.publish().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), r#"{"admin":"127.0.0.1:40001","hbone":"0.0.0.0:40002"}"#);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left behind");
        assert_eq!(bound.get("hbone"), Some("0.0.0.0:40002".parse().unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_written_is_an_error_naming_it() {
        let bound = BoundAddresses::new(Some(PathBuf::from("/nonexistent-dir/addresses.json")));
        let error = bound.publish().unwrap_err().to_string();
        assert!(error.starts_with("cannot write --addresses-file /nonexistent-dir/addresses.json: "), "{error}");
    }
}
