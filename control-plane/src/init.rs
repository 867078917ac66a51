//! `trellis-control init`: a new data dir with the CA, the admin credential, a `trellisctl` config and an
//! empty store. Refuses to touch an existing data dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::ca::{self, Ca, LocalCert};
use crate::files::{pem, write_new};
use crate::settings::{ADMIN_FILE, CONTROL_FILE, CliConfig, ControlSettings};
use crate::store::Table;
use crate::store_config::StoreConfig;

pub const ADMIN_CERT: &str = "admin/admin-cert.pem";
pub const ADMIN_KEY: &str = "admin/admin-key.pem";
const ADMIN_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct InitOptions {
    pub data_dir: PathBuf,
    pub trust_domain: String,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub ca_chain: Option<PathBuf>,
    /// The endpoint written into admin.yaml.
    pub endpoint: String,
    pub admin_name: String,
    /// redb (a file in the data dir) or etcd (the CA and control.yaml published there for every replica).
    pub store: StoreConfig,
}

pub fn init(opts: &InitOptions) -> anyhow::Result<()> {
    trellis_proto::spiffe::validate_trust_domain(&opts.trust_domain)
        .map_err(|e| anyhow::anyhow!("--trust-domain {:?}: {e}", opts.trust_domain))?;
    refuse_existing(&opts.data_dir)?;
    // A shared store is checked before anything is written: reachable, KEK readable, no mesh in it yet.
    let shared = match &opts.store {
        StoreConfig::Redb => None,
        StoreConfig::Etcd { .. } => {
            let opened = opts.store.open(&opts.data_dir)?;
            if opened.store.get(Table::CaFiles, CONTROL_FILE)?.is_some() {
                return Err(crate::shared_files::SharedFilesError::AlreadyInitialized.into());
            }
            Some(opened)
        }
    };
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let (cert_pem, key_pem, chain_pem) = match (&opts.ca_cert, &opts.ca_key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert)?;
            let key_pem = read(key)?;
            let chain_text = opts.ca_chain.as_deref().map(read).transpose()?;
            let chain = Ca::check_imported(&cert_pem, &key_pem, chain_text.as_deref())?;
            (cert_pem, key_pem, ca::certs_to_pem(&chain))
        }
        (None, None) => {
            if opts.ca_chain.is_some() {
                bail!("--ca-chain needs --ca-cert and --ca-key");
            }
            let (cert_pem, key_pem) = Ca::generate_root(&opts.trust_domain)?;
            (cert_pem.clone(), key_pem, cert_pem)
        }
        _ => bail!("--ca-cert and --ca-key go together"),
    };
    let dir = &opts.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    write_new(&dir.join(ca::CA_CERT), cert_pem.as_bytes(), 0o644)?;
    write_new(&dir.join(ca::CA_KEY), key_pem.as_bytes(), 0o600)?;
    write_new(&dir.join(ca::CA_CHAIN), chain_pem.as_bytes(), 0o644)?;
    let chain = ca::parse_pem_certs(&chain_pem)?;
    let root_pem = pem("CERTIFICATE", chain.last().expect("chain is never empty"));
    write_new(&dir.join(ca::ROOT_CERT), root_pem.as_bytes(), 0o644)?;

    let settings = ControlSettings { trust_domain: opts.trust_domain.clone(), store: None };
    write_new(&dir.join(CONTROL_FILE), serde_yaml_ng::to_string(&settings)?.as_bytes(), 0o644)?;

    let ca = Ca::load(dir, &opts.trust_domain)?;
    let (admin, admin_key) = ca.issue_local(LocalCert::Admin(&opts.admin_name), ADMIN_VALIDITY)?;
    let admin_chain = ca::certs_to_pem(&admin.chain[..admin.chain.len() - 1]);
    write_new(&dir.join(ADMIN_CERT), admin_chain.as_bytes(), 0o644)?;
    write_new(&dir.join(ADMIN_KEY), admin_key.as_bytes(), 0o600)?;
    let cli = CliConfig {
        endpoint: opts.endpoint.clone(),
        endpoints: vec![],
        ca_bundle: root_pem,
        certificate: admin_chain,
        key: admin_key,
    };
    write_new(&dir.join(ADMIN_FILE), serde_yaml_ng::to_string(&cli)?.as_bytes(), 0o600)?;

    match shared {
        None => {
            opts.store.open(dir)?;
        }
        Some(opened) => {
            let kek = opened.kek.as_ref().expect("etcd opens with a KEK");
            crate::shared_files::publish(opened.store.as_ref(), dir, kek, true, &[ADMIN_CERT])?;
        }
    }
    Ok(())
}

fn refuse_existing(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("data dir {} already exists and is not empty: refusing to overwrite it", dir.display());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}
