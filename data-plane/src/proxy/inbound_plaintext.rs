//! Captured plaintext inbound (listen.inbound, 15006): TCP from outside the mesh to a local workload, redirected
//! here by the capture rules. Accept → original destination → local workload and declared port →
//! PeerAuthentication (STRICT refuses; PERMISSIVE and DISABLE accept) → authorization with a plaintext peer (no
//! principal: `principals` ALLOW rules never match, `notPrincipals: ["*"]` DENY rules do) → dial → copy.
//! On a port declared `http`, `http2` or `grpc`, the connection takes the HBONE tunnels' HTTP path instead (`l7`,
//! after the PeerAuthentication check): every request is authenticated and authorized with its HTTP attributes,
//! forwarded over pooled connections, and counted in the request series.
//!
//! The per-port modes and policies are resolved once per config change (`LocalPolicies`); a connection costs two
//! map lookups and the evaluator's comparisons. Metrics and the access log report it like an inbound tunnel, with an
//! unknown source and `connection_security_policy="none"`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};
use trellis_policy::{Decision, MtlsMode, Request};

use super::finish::{self, DialError, Ended};
use super::{DataPath, l7};
use crate::authz::LocalPolicies;
use crate::connections::{Downstream, PlaintextConn};
use crate::metrics::{Flags, PeerLabels, Reporter, TrafficKey};
use crate::report::{Authz, ConnectionReport};

/// Why a plaintext connection was not proxied (logged as "plaintext connection refused").
#[derive(Debug, thiserror::Error)]
pub enum PlaintextError {
    #[error("not redirected by the capture rules")]
    NotRedirected,
    #[error("{0} is not a declared port of a workload this proxy fronts")]
    NotFronted(SocketAddr),
    /// Counted and logged as a refused connection to `target`.
    #[error("{target}: {refusal}")]
    Refused { target: SocketAddr, refusal: Refusal },
}

/// Why a plaintext connection to a local workload was refused; its response flags follow from it.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// STRICT PeerAuthentication: the reason.
    #[error("{0}")]
    MtlsRequired(String),
    /// Authorization denied it: the decision.
    #[error("{0}")]
    Denied(String),
    #[error("no policies for workload")]
    UnknownWorkload,
    #[error(transparent)]
    Dial(#[from] DialError),
}

impl From<&Refusal> for Flags {
    fn from(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::MtlsRequired(_) | Refusal::Denied(_) => Flags::Deny,
            Refusal::UnknownWorkload => Flags::NoRoute,
            Refusal::Dial(e) => Flags::from(e),
        }
    }
}

/// Accepts redirected plaintext connections until the listener task is dropped.
pub async fn serve(listener: TcpListener, data: Arc<DataPath>) {
    let own = listener.local_addr().ok();
    crate::listen::accept_each(listener, "inbound-plaintext", |tcp, client| {
        let data = data.clone();
        async move {
            if let Err(reason) = connection(tcp, client, own, data).await {
                info!(%client, %reason, "plaintext connection refused");
            }
        }
    })
    .await
}

/// Why a plaintext connection may or may not proceed.
pub enum Check<'p> {
    Allowed {
        mode: MtlsMode,
        decision: Decision<'p>,
    },
    /// A port declared `http`, `http2` or `grpc` that PeerAuthentication lets in: each request is authorized (`l7`).
    PerRequest {
        mode: MtlsMode,
    },
    /// STRICT: the reason, and the PeerAuthentication (`ns/name`) that set it.
    MtlsRequired {
        reason: String,
        policy: Option<Arc<str>>,
    },
    Denied(Decision<'p>),
    UnknownWorkload,
}

/// PeerAuthentication, then authorization (on a port not served as HTTP), for a plaintext connection (also used to
/// re-check open connections after a policy change).
pub fn check<'p>(policies: &'p LocalPolicies, conn: &PlaintextConn) -> Check<'p> {
    let Some(workload) = policies.workload(&conn.workload.key) else { return Check::UnknownWorkload };
    let port = conn.destination.port();
    let mtls = workload.mtls().port(port);
    if mtls.mode == MtlsMode::Strict {
        let policy = mtls.policy.as_ref().map(|k| crate::metrics::policy_name(&k.namespace, &k.name));
        return Check::MtlsRequired { reason: format!("port {port} requires mTLS: {mtls}"), policy };
    }
    if l7::is_http(&conn.workload, conn.destination) {
        return Check::PerRequest { mode: mtls.mode };
    }
    let request = Request::tcp(None, conn.client.ip(), conn.destination.ip(), port);
    let decision = workload.evaluate(&request);
    if decision.allowed { Check::Allowed { mode: mtls.mode, decision } } else { Check::Denied(decision) }
}

/// Whether an open plaintext connection is still allowed (re-evaluation after a config change).
pub fn still_allowed(policies: &LocalPolicies, conn: &PlaintextConn) -> bool {
    let reason = match check(policies, conn) {
        Check::Allowed { .. } | Check::PerRequest { .. } => return true,
        Check::MtlsRequired { reason, .. } => reason,
        Check::Denied(decision) => {
            policies.decisions.record_closed(&decision);
            decision.to_string()
        }
        Check::UnknownWorkload => "unknown workload".to_owned(),
    };
    info!(client = %conn.client, target = %conn.destination, %reason, "closing plaintext connection after a policy change");
    false
}

async fn connection(
    tcp: TcpStream,
    client: SocketAddr,
    own: Option<SocketAddr>,
    data: Arc<DataPath>,
) -> Result<(), PlaintextError> {
    let started = Instant::now();
    let target = crate::sockets::original_destination(&tcp, client)
        .filter(|t| Some(*t) != own && Some(*t) != tcp.local_addr().ok())
        .ok_or(PlaintextError::NotRedirected)?;
    redirected(tcp, client, target, started, data).await
}

/// A connection from `client` that the capture rules redirected here from `target`.
pub(super) async fn redirected(
    tcp: TcpStream,
    client: SocketAddr,
    target: SocketAddr,
    started: Instant,
    data: Arc<DataPath>,
) -> Result<(), PlaintextError> {
    let workload = (data.locals.by_ip(target.ip()))
        .filter(|w| w.port(target.port()).is_some())
        .cloned()
        .ok_or(PlaintextError::NotFronted(target))?;
    let conn = Arc::new(PlaintextConn { client, destination: target, workload });
    let key = TrafficKey {
        reporter: Reporter::Destination,
        source: PeerLabels::unknown(),
        destination: conn.workload.peer.clone(),
        mutual_tls: false,
        flags: Flags::None,
    };
    let report = ConnectionReport { key, source_addr: client, destination_addr: target, started };
    let refuse = |report: ConnectionReport, authz: Authz, refusal: Refusal| {
        report.refused(&data.traffic, Flags::from(&refusal), authz, &refusal.to_string());
        PlaintextError::Refused { target, refusal }
    };
    // Registered before the check, so that a policy change between check and registration cannot be missed.
    let registration = data.connections.register_plaintext(conn.clone());
    // `None`: served as HTTP, each request authorized on its own.
    let allowed = {
        let policies = data.authz.load();
        match check(&policies, &conn) {
            Check::PerRequest { mode } => {
                debug!(%client, %target, %mode, "plaintext connection accepted; its requests are checked one by one");
                None
            }
            Check::Allowed { mode, decision } => {
                policies.decisions.record(&decision);
                if !decision.audit.is_empty() || decision.dry_run.is_some() {
                    info!(%client, %target, %decision, "plaintext connection allowed");
                }
                debug!(%client, %target, %mode, "plaintext connection accepted");
                Some(Authz::allowed(policies.decisions.name_of(decision.deciding.as_ref())))
            }
            Check::MtlsRequired { reason, policy } => {
                return Err(refuse(report, Authz::denied(policy), Refusal::MtlsRequired(reason)));
            }
            Check::Denied(decision) => {
                policies.decisions.record(&decision);
                let denied = Authz::denied(policies.decisions.name_of(decision.deciding.as_ref()));
                return Err(refuse(report, denied, Refusal::Denied(decision.to_string())));
            }
            Check::UnknownWorkload => return Err(refuse(report, Authz::NONE, Refusal::UnknownWorkload)),
        }
    };
    // TCP_NODELAY: inherited from the listener (`listen::accept_each`).
    let Some(allowed) = allowed else {
        // Its requests go out over this connection's own pooled clients when they dial from the client's address
        // (as an HBONE tunnel's do), else over the shared ones.
        let dial_from = crate::sockets::preserves_source().then_some(client.ip());
        l7::serve(tcp, Downstream::Plaintext(conn), report, registration, data.clone(), dial_from).await;
        return Ok(());
    };
    // The client's address is the connection's own peer: the kernel vouches for it as much as it would without us.
    let (open, mut upstream) = finish::dial_workload(target, Some(client.ip()), report, allowed, &data.traffic)
        .await
        .map_err(|e| PlaintextError::Refused { target, refusal: e.into() })?;
    let mut tcp = tcp;
    if let Ended::Cancelled = finish::relay(open, &mut tcp, &mut upstream, &registration, data.timeouts).await {
        info!(%client, %target, "plaintext connection closed: no longer allowed by policy, or shutting down");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_derive_their_response_flags() {
        let cases = [
            (Refusal::MtlsRequired("port 8080 requires mTLS: STRICT".into()), "DENY"),
            (Refusal::Denied("denied by DENY policy shop/deny rule 0".into()), "DENY"),
            (Refusal::UnknownWorkload, "NR"),
            (Refusal::Dial(DialError::TimedOut), "CONNECT"),
        ];
        for (refusal, flags) in cases {
            assert_eq!(Flags::from(&refusal).as_str(), flags, "{refusal}");
        }
    }

    #[test]
    fn a_refusal_reads_as_before() {
        let target: SocketAddr = "10.1.0.2:8080".parse().unwrap();
        let dial = DialError::Refused(std::io::Error::other("connection refused"));
        let refused = PlaintextError::Refused { target, refusal: dial.into() };
        assert_eq!(refused.to_string(), "10.1.0.2:8080: workload refused the connection: connection refused");
        let unknown = PlaintextError::Refused { target, refusal: Refusal::UnknownWorkload };
        assert_eq!(unknown.to_string(), "10.1.0.2:8080: no policies for workload");
    }
}
