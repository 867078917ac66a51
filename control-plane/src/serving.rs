//! The control plane's own TLS: the serving certificate (issued at start by the signing CA, with the chain up to
//! the root so that a joining proxy finds its CA pin in it) and the client verifier (the trust bundle), rebuilt at
//! every phase of a root rotation and published through a watch channel that every new connection reads.
//!
//! During a rotation's overlap the serving chain also carries the new CA cross-signed by the retiring one and the
//! retiring chain: a proxy that was away and still knows only the retiring root verifies it too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;

use crate::authority::Authority;
use crate::ca::LocalCert;
use crate::mesh::Mesh;

const SERVING_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The names the serving certificate carries.
#[derive(Clone)]
pub struct ServingNames {
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
}

impl ServingNames {
    /// `trellis-control` (which clients always verify), localhost, the listen address and the `--san` values.
    pub fn new(listen: SocketAddr, sans: &[String]) -> Self {
        let mut dns_names = vec![trellis_proto::CONTROL_PLANE_SERVER_NAME.to_owned(), "localhost".to_owned()];
        let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
        if !listen.ip().is_unspecified() {
            ips.push(listen.ip());
        }
        for san in sans {
            match san.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns_names.push(san.clone()),
            }
        }
        ips.dedup();
        Self { dns_names, ips }
    }
}

pub fn server_config(authority: &Authority, names: &ServingNames) -> anyhow::Result<ServerConfig> {
    let (issued, key_pem) = authority
        .signer()
        .issue_local(LocalCert::Server { dns_names: &names.dns_names, ips: &names.ips }, SERVING_CERT_VALIDITY)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("serving key")?;
    let provider = trellis_proto::tls::provider();
    let mut roots = RootCertStore::empty();
    for root in authority.roots() {
        roots.add(root.clone())?;
    }
    // Join is called without a certificate; the other services check the caller's identity themselves.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut chain = issued.chain;
    chain.extend(authority.serving_extra().iter().cloned());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        // The chain includes the root, so that a joining proxy can check it against its CA pin.
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The current server config, rebuilt whenever the mesh's CAs change (a failed rebuild keeps the previous one).
/// `serving_root` is set, after each swap, to the fingerprint of the root the serving certificate chains to: what
/// this replica tells the others (`services/mesh_status.rs`), so that a root rotation retires the old root only once
/// every replica serves a certificate from the new one.
pub fn follow(
    mesh: Arc<Mesh>,
    names: ServingNames,
    serving_root: Arc<std::sync::Mutex<String>>,
) -> anyhow::Result<watch::Receiver<Arc<ServerConfig>>> {
    let mut changes = mesh.authority_changes();
    let served = |authority: &Authority| crate::authority::fingerprint(authority.signer().root());
    let first_authority = changes.borrow_and_update().clone();
    let first = server_config(&first_authority, &names)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    *serving_root.lock().expect("serving root") = served(&first_authority);
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let authority = changes.borrow_and_update().clone();
            match server_config(&authority, &names) {
                Ok(config) => {
                    tracing::info!(phase = ?authority.phase(), "serving certificate and client roots rebuilt");
                    tx.send_replace(Arc::new(config));
                    // After the swap: every handshake from now on presents a chain to this root.
                    *serving_root.lock().expect("serving root") = served(&authority);
                }
                Err(e) => tracing::error!(error = %e, "cannot rebuild the control plane's TLS; keeping the previous"),
            }
        }
    });
    Ok(rx)
}
