//! The SPIFFE Workload API, served to applications on this host over a Unix socket (`listen.workloadApi`): the
//! X.509-SVIDs of the workloads whose `attest` selectors the caller's peer credentials match, each with a key of
//! its own (not the proxy's tunnel keys), and the trust bundle, pushed again on renewal and on bundle change.
//!
//! JWT-SVIDs are signed by the control plane (asked over the discovery connection) and checked against the mesh
//! JWKS of the trust bundle.
//!
//! `peer` reads who called (SO_PEERCRED, /proc), `authority` relays the bytes so that h2 accepts the `:authority`
//! gRPC C-core clients send on a Unix socket, `attest` decides which identities that entitles it to, `jwt` checks
//! JWT-SVIDs, `service` answers the gRPC calls, `fetch` is the debugging client behind `trellis-proxy workload-api fetch`.

pub mod attest;
pub mod authority;
pub mod fetch;
pub mod jwt;
pub mod peer;
pub mod service;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};
use trellis_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

use crate::config::WorkloadApiListen;
use peer::PeerStream;

/// Requests are empty or tiny; anything larger is refused before it is buffered.
const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Concurrent calls on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Connections accepted but not yet taken up by the server.
const ACCEPT_BACKLOG: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot create {path} for listen.workloadApi: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("listen.workloadApi: {path} exists and is not a socket; not replacing it")]
    NotSocket { path: PathBuf },
    #[error("cannot listen on {path} (listen.workloadApi): {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("cannot set mode {mode:o} on {path} (listen.workloadApiMode): {source}")]
    Mode { path: PathBuf, mode: u32, source: std::io::Error },
}

/// Binds the socket, replacing a stale one from an earlier run (never another kind of file), with the configured
/// mode: the file mode decides who may connect, attestation what they get.
pub fn bind(listen: &WorkloadApiListen) -> Result<UnixListener, BindError> {
    let path = &listen.path;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| BindError::Dir { path: parent.to_owned(), source })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| BindError::Bind { path: path.clone(), source })?
        }
        Ok(_) => return Err(BindError::NotSocket { path: path.clone() }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| BindError::Bind { path: path.clone(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(listen.mode)).map_err(|source| BindError::Mode {
        path: path.clone(),
        mode: listen.mode,
        source,
    })?;
    Ok(listener)
}

/// Serves until the task is dropped (then the socket file is removed).
pub async fn serve(listener: UnixListener, path: PathBuf, service: service::Service) {
    let _remove = RemoveOnDrop(path.clone());
    info!(socket = %path.display(), "SPIFFE Workload API listening");
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    tokio::spawn(accept(listener, tx));
    let server = SpiffeWorkloadApiServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(server)
        .serve_with_incoming(ReceiverStream::new(rx))
        .await;
    if let Err(e) = result {
        warn!(error = %e, "Workload API server stopped");
    }
}

/// Accepts connections and reads their peer credentials at once (SO_PEERCRED is the connector's; the process start
/// time is taken now, see `peer`). An accept error is retried after a pause instead of ending the listener.
async fn accept(listener: UnixListener, tx: mpsc::Sender<Result<PeerStream, std::io::Error>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match PeerStream::new(stream) {
                Ok(stream) => {
                    if tx.send(Ok(stream)).await.is_err() {
                        return;
                    }
                }
                Err(e) => debug!(error = %e, "Workload API connection without peer credentials dropped"),
            },
            Err(e) => {
                warn!(error = %e, "Workload API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove_socket(&self.0);
    }
}

fn remove_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}
