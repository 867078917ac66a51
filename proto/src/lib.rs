//! The wire contract between the Trellis control plane, its proxies and `trellisctl`.
//!
//! Generated from `proto/trellis/v1/trellis.proto`; see that file for the meaning of each message. Also the SPIFFE
//! Workload API (`workload`), which the proxy serves to applications.

#![forbid(unsafe_code)]

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("trellis.v1");
}

pub use v1::*;

/// The SPIFFE Workload API (`proto/spiffe/workload/workload.proto`, unmodified from the SPIFFE project, which
/// declares no protobuf package: the service is `SpiffeWorkloadAPI`). Served by the proxy on a Unix socket.
#[allow(clippy::all, clippy::pedantic)]
pub mod workload {
    tonic::include_proto!("_");
}

/// Default control-plane gRPC port (as istiod's 15012).
pub const CONTROL_PLANE_PORT: u16 = 15012;

/// TLS server name every control-plane serving certificate carries, so proxies can reach the control plane by
/// any address and still verify it by name.
pub const CONTROL_PLANE_SERVER_NAME: &str = "trellis-control";

/// Bytes of the node tag a workload certificate's serial starts with (`Revocations.nodes`): the control plane
/// derives it from the node's name, the proxies refuse a certificate whose serial starts with a revoked node's.
pub const SERIAL_TAG_BYTES: usize = 8;

/// Key of a workload in the registry and on the wire: `<namespace>/<name>`.
pub fn workload_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

pub mod spiffe;
pub mod tls;
