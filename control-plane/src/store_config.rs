//! Which store backend a `trellis-control init` or `serve` uses: flags (`--store`, `--etcd-endpoints`,
//! `--etcd-prefix`, `--kek-file`) first, else the `store:` section of `control.yaml`, else redb in the data dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::kek::{Kek, KekError};
use crate::store::{EtcdOptions, EtcdStore, RedbStore, STORE_FILE, Store, StoreError};

pub const DEFAULT_ETCD_PREFIX: &str = "/trellis/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// An embedded file in the data dir (one replica).
    #[default]
    Redb,
    /// An etcd v3 cluster shared by any number of replicas.
    Etcd,
}

/// The `store:` section of `control.yaml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StoreSettings {
    #[serde(default)]
    pub backend: Backend,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd_endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kek_file: Option<PathBuf>,
}

/// The store flags of `init` and `serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Where the mesh's state lives: `redb` (a file in the data dir; one replica) or `etcd` (shared by replicas).
    /// Default: control.yaml's `store.backend`, else redb.
    #[arg(long, value_enum)]
    pub store: Option<Backend>,
    /// etcd client URLs, comma-separated (`http://10.0.0.1:2379,http://10.0.0.2:2379`).
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every key in etcd, so several meshes can share one etcd [default: /trellis/].
    #[arg(long)]
    pub etcd_prefix: Option<String>,
    /// The key-encryption key sealing private keys kept in etcd: 32 bytes, raw or hex (`openssl rand -hex 32`),
    /// mode 0600. The same file on every replica.
    #[arg(long, value_name = "PATH")]
    pub kek_file: Option<PathBuf>,
}

/// A resolved choice.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Redb,
    Etcd { options: EtcdOptions, kek_file: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    #[error("--store etcd needs --etcd-endpoints (or store.etcdEndpoints in control.yaml)")]
    NoEndpoints,
    #[error("--store etcd needs --kek-file (or store.kekFile in control.yaml): CA keys in etcd are sealed with it")]
    NoKek,
    #[error("--etcd-endpoints {0:?}: not an http:// or https:// URL")]
    BadEndpoint(String),
    #[error("--etcd-prefix {0:?}: must start with '/'")]
    BadPrefix(String),
    #[error("--{0} is for --store etcd only")]
    EtcdOnly(&'static str),
    #[error(transparent)]
    Kek(#[from] KekError),
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
}

impl StoreArgs {
    /// Flags first, else `settings` (control.yaml), else redb.
    pub fn resolve(&self, settings: Option<&StoreSettings>) -> Result<StoreConfig, StoreConfigError> {
        let fallback = settings.cloned().unwrap_or_default();
        let backend = self.store.unwrap_or(fallback.backend);
        let endpoints =
            if self.etcd_endpoints.is_empty() { fallback.etcd_endpoints.clone() } else { self.etcd_endpoints.clone() };
        let prefix = self.etcd_prefix.clone().or(fallback.etcd_prefix.clone());
        let kek_file = self.kek_file.clone().or(fallback.kek_file.clone());
        match backend {
            Backend::Redb => {
                if !self.etcd_endpoints.is_empty() {
                    return Err(StoreConfigError::EtcdOnly("etcd-endpoints"));
                }
                if self.etcd_prefix.is_some() {
                    return Err(StoreConfigError::EtcdOnly("etcd-prefix"));
                }
                if self.kek_file.is_some() {
                    return Err(StoreConfigError::EtcdOnly("kek-file"));
                }
                Ok(StoreConfig::Redb)
            }
            Backend::Etcd => {
                let endpoints: Vec<String> =
                    endpoints.iter().map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()).collect();
                if endpoints.is_empty() {
                    return Err(StoreConfigError::NoEndpoints);
                }
                if let Some(bad) = endpoints.iter().find(|e| !e.starts_with("http://") && !e.starts_with("https://")) {
                    return Err(StoreConfigError::BadEndpoint(bad.clone()));
                }
                let prefix = prefix.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_owned());
                if !prefix.starts_with('/') {
                    return Err(StoreConfigError::BadPrefix(prefix));
                }
                let kek_file = kek_file.ok_or(StoreConfigError::NoKek)?;
                Ok(StoreConfig::Etcd { options: EtcdOptions { endpoints, prefix }, kek_file })
            }
        }
    }
}

/// An opened store, and the KEK when the store is shared.
pub struct Opened {
    pub store: Arc<dyn Store>,
    pub kek: Option<Kek>,
}

impl StoreConfig {
    pub fn open(&self, data_dir: &Path) -> Result<Opened, StoreConfigError> {
        Ok(match self {
            StoreConfig::Redb => Opened { store: Arc::new(RedbStore::open(&data_dir.join(STORE_FILE))?), kek: None },
            StoreConfig::Etcd { options, kek_file } => {
                let kek = Kek::load(kek_file)?;
                Opened { store: Arc::new(EtcdStore::connect(options)?), kek: Some(kek) }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_control_yaml_and_refusals_name_the_flag() {
        let yaml = StoreSettings {
            backend: Backend::Etcd,
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            etcd_prefix: None,
            kek_file: Some("/k".into()),
        };
        let resolved = StoreArgs::default().resolve(Some(&yaml)).unwrap();
        assert!(matches!(resolved, StoreConfig::Etcd { ref options, .. } if options.prefix == DEFAULT_ETCD_PREFIX));
        let flags = StoreArgs { store: Some(Backend::Redb), ..Default::default() };
        assert!(matches!(flags.resolve(Some(&yaml)).unwrap(), StoreConfig::Redb));
        assert!(matches!(StoreArgs::default().resolve(None).unwrap(), StoreConfig::Redb));
        let no_kek = StoreArgs {
            store: Some(Backend::Etcd),
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            ..Default::default()
        };
        assert!(no_kek.resolve(None).unwrap_err().to_string().contains("--kek-file"));
        let no_endpoints = StoreArgs { store: Some(Backend::Etcd), ..Default::default() };
        assert!(no_endpoints.resolve(None).unwrap_err().to_string().contains("--etcd-endpoints"));
        let bad = StoreArgs {
            store: Some(Backend::Etcd),
            etcd_endpoints: vec!["127.0.0.1:2379".into()],
            kek_file: Some("/k".into()),
            ..Default::default()
        };
        assert!(bad.resolve(None).unwrap_err().to_string().contains("\"127.0.0.1:2379\""));
        let stray = StoreArgs { kek_file: Some("/k".into()), ..Default::default() };
        assert!(stray.resolve(None).unwrap_err().to_string().contains("--kek-file is for --store etcd only"));
    }
}
