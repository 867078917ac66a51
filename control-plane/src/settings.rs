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
    /// host:port of the control plane's gRPC endpoint (or `endpoints`, for several replicas).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// host:port of each control-plane replica, tried in order until one accepts the connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
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
        let config: Self =
            serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        config.endpoints().map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(config)
    }

    /// The endpoints to try, in order: `endpoint` or `endpoints` (exactly one of them).
    pub fn endpoints(&self) -> Result<Vec<String>, String> {
        match (self.endpoint.is_empty(), self.endpoints.is_empty()) {
            (false, false) => Err("endpoints: give either endpoint or endpoints, not both".into()),
            (true, true) => Err("endpoint: missing (set endpoint, or endpoints for several replicas)".into()),
            (false, true) => Ok(vec![self.endpoint.clone()]),
            (true, false) => match self.endpoints.iter().position(|e| e.trim().is_empty()) {
                Some(i) => Err(format!("endpoints[{i}]: must not be empty")),
                None => Ok(self.endpoints.clone()),
            },
        }
    }

    /// `--endpoint` given on the command line replaces the config's endpoints.
    pub fn with_endpoints(mut self, endpoints: Vec<String>) -> Self {
        if !endpoints.is_empty() {
            self.endpoint.clear();
            self.endpoints = endpoints;
        }
        self
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

#[cfg(test)]
mod tests {
    use super::CliConfig;

    fn config(endpoints: &str) -> Result<CliConfig, String> {
        let yaml = format!("{endpoints}caBundle: x\ncertificate: y\nkey: z\n");
        let config: CliConfig = serde_yaml_ng::from_str(&yaml).map_err(|e| e.to_string())?;
        config.endpoints().map(|_| config)
    }

    #[test]
    fn the_cli_config_names_one_endpoint_or_several() {
        assert_eq!(config("endpoint: a:1\n").unwrap().endpoints().unwrap(), ["a:1"]);
        assert_eq!(config("endpoints: [a:1, b:2]\n").unwrap().endpoints().unwrap(), ["a:1", "b:2"]);
        assert_eq!(
            config("endpoint: a:1\nendpoints: [b:2]\n").unwrap_err(),
            "endpoints: give either endpoint or endpoints, not both"
        );
        assert!(config("").unwrap_err().starts_with("endpoint: missing"));
        assert_eq!(config("endpoints: [a:1, '']\n").unwrap_err(), "endpoints[1]: must not be empty");
        let flag = config("endpoint: a:1\n").unwrap().with_endpoints(vec!["c:3".into(), "d:4".into()]);
        assert_eq!(flag.endpoints().unwrap(), ["c:3", "d:4"], "--endpoint replaces the file's");
    }
}
