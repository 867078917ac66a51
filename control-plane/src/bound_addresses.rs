//! `trellis-control serve --addresses-file PATH`: the addresses the listeners are bound to, as one JSON object keyed
//! by the flag that sets each (`{"listen": "127.0.0.1:15012", "metricsListen": "127.0.0.1:15014"}`), so that whoever
//! started the control plane learns the ports the kernel picked for `--listen` / `--metrics-listen` with port 0.
//! Written once both are bound, atomically (beside the file, then renamed): a reader never sees a part.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

pub fn write(path: &Path, listen: SocketAddr, metrics_listen: SocketAddr) -> anyhow::Result<()> {
    let text =
        serde_json::json!({"listen": listen.to_string(), "metricsListen": metrics_listen.to_string()}).to_string();
    let name = path.file_name().with_context(|| format!("--addresses-file {} names no file", path.display()))?;
    let mut temporary = name.to_owned();
    temporary.push(".tmp");
    let temporary = path.with_file_name(temporary);
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .with_context(|| format!("writing --addresses-file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_both_addresses_by_flag_name() {
        let dir = std::env::temp_dir().join(format!("trellis-control-addresses-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("addresses.json");
        write(&path, "127.0.0.1:40001".parse().unwrap(), "127.0.0.1:40002".parse().unwrap()).unwrap();
        let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(written, serde_json::json!({"listen": "127.0.0.1:40001", "metricsListen": "127.0.0.1:40002"}));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
        let error = write(Path::new("/nonexistent-dir/a.json"), written_addr(), written_addr()).unwrap_err();
        assert!(format!("{error:#}").starts_with("writing --addresses-file /nonexistent-dir/a.json: "), "{error:#}");
    }

    fn written_addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }
}
