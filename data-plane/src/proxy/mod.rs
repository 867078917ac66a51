//! The data path: every proxied connection, from accept to close. [`DataPath`] holds what its parts share: the
//! current TLS set, registry and policies (each replaced whole on a change, read per connection), this proxy's
//! workloads, the tunnel pool and the registry of open connections. The children are the paths a connection takes,
//! each read in one walk (accept, identify, authorize, dial, copy):
//! - `inbound`: HBONE from another proxy (mTLS, HTTP/2 CONNECT served by `h2_server`), `l7` for streams to `http`
//!   ports;
//! - `inbound_plaintext`: captured plaintext to a local workload (PeerAuthentication, authorization), `l7` for
//!   connections to `http` ports;
//! - `outbound`: a local application's connection, fed by `socks5` and the capture listener, through `pool`
//!   (the HBONE client).
//!
//! Both ends of an HBONE stream carry its bytes as an `h2_stream::H2Stream`, on `h2` directly.
//!
//! Every path ends a connection the same way (`finish`): dial the workload within its timeout, relay until both
//! sides are done or the proxy cancels, report once.

pub mod finish;
pub mod h2_server;
pub mod h2_stream;
pub mod inbound;
pub mod inbound_plaintext;
pub mod l7;
pub mod outbound;
pub mod pool;
pub mod socks5;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::authz::LocalPolicies;
use crate::config::Outbound;
use crate::connections::Connections;
use crate::copy::Timeouts;
use crate::metrics::TrafficMetrics;
use crate::registry::{LocalWorkloads, Registry};
use crate::tls::MeshTls;
use pool::Pool;

/// How long a client may take over its handshake before any byte is proxied: TLS on the HBONE listener, the
/// SOCKS5 greeting and request.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Dialling a local workload (HBONE and plaintext inbound, HTTP tunnels' upstream connections).
pub const WORKLOAD_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Dialling a destination outside the mesh (`outbound.passthrough: allow`).
pub const PASSTHROUGH_DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A new pooled connection to another proxy: TCP, TLS and HTTP/2 handshakes together.
pub const TUNNEL_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the data path reads per connection; swapped pieces are rebuilt once per change.
pub struct DataPath {
    pub tls: MeshTls,
    pub registry: ArcSwap<Registry>,
    pub authz: ArcSwap<LocalPolicies>,
    pub locals: LocalWorkloads,
    pub pool: Pool,
    pub connections: Arc<Connections>,
    pub outbound: Outbound,
    pub traffic: TrafficMetrics,
    /// Pooled connections to local workloads for requests on `http` ports.
    pub upstream: l7::Upstream,
    /// When a relayed connection that carries nothing is closed (`connection` in proxy.yaml).
    pub timeouts: Timeouts,
}

impl DataPath {
    /// Empty TLS set, registry and policies until the first change arrives (`reconfigure`).
    pub fn new(locals: LocalWorkloads, outbound: Outbound, timeouts: Timeouts) -> Self {
        Self {
            tls: MeshTls::default(),
            registry: ArcSwap::from_pointee(Registry::default()),
            authz: ArcSwap::from_pointee(LocalPolicies::default()),
            locals,
            pool: Pool::default(),
            connections: Arc::new(Connections::default()),
            outbound,
            traffic: TrafficMetrics::default(),
            upstream: l7::Upstream::default(),
            timeouts,
        }
    }
}

#[cfg(test)]
mod inbound_tests;
#[cfg(test)]
mod plaintext_tests;
#[cfg(test)]
mod revocation_tests;
#[cfg(test)]
mod tests;
