//! Files of the data dir that are configuration: `control.yaml` (the control plane's own settings) and
//! `admin.yaml` (a ready `trellisctl` config holding the admin credential).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const CONTROL_FILE: &str = "control.yaml";
pub const ADMIN_FILE: &str = "admin.yaml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlSettings {
    pub trust_domain: String,
    /// The store backend when no `--store` flag is given (`store_config.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::store_config::StoreSettings>,
}

impl ControlSettings {
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(CONTROL_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e} (run `trellis-control init` first)", path.display()))?;
        serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The `store:` section, if the data dir has a control.yaml (a new etcd replica has none yet).
    pub fn store_section(data_dir: &Path) -> anyhow::Result<Option<crate::store_config::StoreSettings>> {
        if !data_dir.join(CONTROL_FILE).exists() {
            return Ok(None);
        }
        Ok(Self::load(data_dir)?.store)
    }
}

/// The CLI's config: where the control plane is and the credential to call it with (PEM inline, like a
/// kubeconfig, so the one file can be copied to another machine).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CliConfig {
    /// host:port of the control plane's gRPC endpoint.
    pub endpoint: String,
    /// PEM root certificate(s) to verify the control plane.
    pub ca_bundle: String,
    /// PEM admin certificate chain.
    pub certificate: String,
    /// PEM private key of the admin certificate.
    pub key: String,
}

impl CliConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// `--config`, else `$TRELLIS_CONFIG`, else `~/.trellis/config.yaml`.
    pub fn resolve_path(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
        if let Some(path) = flag {
            return Ok(path);
        }
        if let Some(path) = std::env::var_os("TRELLIS_CONFIG").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        let home = std::env::var_os("HOME").ok_or_else(|| anyhow::anyhow!("no --config, $TRELLIS_CONFIG or $HOME"))?;
        Ok(PathBuf::from(home).join(".trellis/config.yaml"))
    }
}
