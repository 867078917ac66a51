//! A minimal Workload API client for debugging (`trellis-proxy workload-api fetch`): the first X.509-SVID answer,
//! as a caller of the socket would receive it.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Endpoint, Uri};
use trellis_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use trellis_proto::workload::{X509svidRequest, X509svidResponse};

use super::service::SECURITY_HEADER;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not a socket path or unix:///path URI")]
    BadSocket(String),
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: tonic::transport::Error },
    #[error("{code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("the server closed the stream without an answer")]
    NoAnswer,
}

impl From<tonic::Status> for FetchError {
    fn from(status: tonic::Status) -> Self {
        FetchError::Status { code: status.code(), message: status.message().to_owned() }
    }
}

/// `unix:///path` or `/path`.
pub fn socket_path(text: &str) -> Result<PathBuf, FetchError> {
    let path = text.strip_prefix("unix://").unwrap_or(text);
    if path.starts_with('/') { Ok(PathBuf::from(path)) } else { Err(FetchError::BadSocket(text.to_owned())) }
}

/// The first FetchX509SVID answer.
pub async fn x509_svid(socket: &Path) -> Result<X509svidResponse, FetchError> {
    let path = socket.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
    });
    // The URI is required by the API and unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .map_err(|source| FetchError::Connect { path: socket.to_owned(), source })?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut request = tonic::Request::new(X509svidRequest {});
    request.metadata_mut().insert(SECURITY_HEADER, "true".parse().expect("ascii"));
    let mut stream = client.fetch_x509svid(request).await?.into_inner();
    stream.message().await?.ok_or(FetchError::NoAnswer)
}
