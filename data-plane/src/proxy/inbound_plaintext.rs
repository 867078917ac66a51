//! Captured plaintext inbound (listen.inbound, 15006): TCP from outside the mesh to a local workload, redirected
//! here by the capture rules. Accept → original destination → local workload and declared port →
//! PeerAuthentication (STRICT refuses; PERMISSIVE and DISABLE accept) → authorization with a plaintext peer (no
//! principal: `principals` ALLOW rules never match, `notPrincipals: ["*"]` DENY rules do) → dial → copy.
//!
//! The per-port modes and policies are resolved once per config change (`LocalPolicies`); a connection costs two
//! map lookups and the evaluator's comparisons. Metrics and the access log report it like an inbound tunnel, with an
//! unknown source and `connection_security_policy="none"`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};
use trellis_policy::{Decision, MtlsMode, Request};

use super::DataPath;
use crate::authz::LocalPolicies;
use crate::connections::PlaintextConn;
use crate::copy::{ByteCounts, copy_counted};
use crate::metrics::{Flags, PeerLabels, Reporter, TrafficKey};
use crate::report::{Authz, ConnectionReport};

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts redirected plaintext connections until the listener task is dropped.
pub async fn serve(listener: TcpListener, data: Arc<DataPath>) {
    let own = listener.local_addr().ok();
    crate::listen::accept_each(listener, "inbound-plaintext", |tcp, client| {
        let data = data.clone();
        async move {
            if let Err(reason) = connection(tcp, client, own, &data).await {
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
    /// STRICT: the reason, and the PeerAuthentication (`ns/name`) that set it.
    MtlsRequired {
        reason: String,
        policy: String,
    },
    Denied(Decision<'p>),
    UnknownWorkload,
}

/// PeerAuthentication, then authorization, for a plaintext connection (also used to re-check open connections
/// after a policy change).
pub fn check<'p>(policies: &'p LocalPolicies, conn: &PlaintextConn) -> Check<'p> {
    let Some(workload) = policies.workload(&conn.workload.key) else { return Check::UnknownWorkload };
    let port = conn.destination.port();
    let mtls = workload.mtls().port(port);
    if mtls.mode == MtlsMode::Strict {
        let policy = mtls.policy.as_ref().map_or_else(|| "-".to_owned(), |k| format!("{}/{}", k.namespace, k.name));
        return Check::MtlsRequired { reason: format!("port {port} requires mTLS: {mtls}"), policy };
    }
    let request = Request::tcp(None, conn.client.ip(), conn.destination.ip(), port);
    let decision = workload.evaluate(&request);
    if decision.allowed { Check::Allowed { mode: mtls.mode, decision } } else { Check::Denied(decision) }
}

/// Whether an open plaintext connection is still allowed (re-evaluation after a config change).
pub fn still_allowed(policies: &LocalPolicies, conn: &PlaintextConn) -> bool {
    let reason = match check(policies, conn) {
        Check::Allowed { .. } => return true,
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
    data: &DataPath,
) -> Result<(), String> {
    let started = Instant::now();
    let target = crate::sockets::original_destination(&tcp)
        .filter(|t| Some(*t) != own && Some(*t) != tcp.local_addr().ok())
        .ok_or("not redirected by the capture rules")?;
    let workload = (data.locals.by_ip(target.ip()))
        .filter(|w| w.port(target.port()).is_some())
        .cloned()
        .ok_or_else(|| format!("{target} is not a declared port of a workload this proxy fronts"))?;
    let conn = Arc::new(PlaintextConn { client, destination: target, workload });
    let key = TrafficKey {
        reporter: Reporter::Destination,
        source: PeerLabels::unknown(),
        destination: conn.workload.peer.clone(),
        mutual_tls: false,
        flags: Flags::None,
    };
    let report = ConnectionReport { key, source_addr: client, destination_addr: target, started };
    let refused = |flags: Flags, verdict: Authz<'_>, detail: &str| {
        report.refused(&data.traffic, flags, verdict, detail);
        format!("{target}: {detail}")
    };
    // Registered before the check, so that a policy change between check and registration cannot be missed.
    let registration = data.connections.register_plaintext(conn.clone());
    let policy = {
        let policies = data.authz.load();
        match check(&policies, &conn) {
            Check::Allowed { mode, decision } => {
                policies.decisions.record(&decision);
                if !decision.audit.is_empty() || decision.dry_run.is_some() {
                    info!(%client, %target, %decision, "plaintext connection allowed");
                }
                debug!(%client, %target, %mode, "plaintext connection accepted");
                decision.deciding.map_or_else(|| "-".to_owned(), |p| format!("{}/{}", p.namespace, p.name))
            }
            Check::MtlsRequired { reason, policy } => {
                return Err(refused(Flags::Deny, Authz { decision: "denied", policy: &policy }, &reason));
            }
            Check::Denied(decision) => {
                policies.decisions.record(&decision);
                let policy =
                    decision.deciding.map_or_else(|| "-".to_owned(), |p| format!("{}/{}", p.namespace, p.name));
                let denied = Authz { decision: "denied", policy: &policy };
                return Err(refused(Flags::Deny, denied, &decision.to_string()));
            }
            Check::UnknownWorkload => {
                return Err(refused(Flags::NoRoute, Authz::NONE, "no policies for workload"));
            }
        }
    };
    let allowed = Authz { decision: "allowed", policy: &policy };
    let mut upstream = match tokio::time::timeout(DIAL_TIMEOUT, crate::sockets::connect(target)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            return Err(refused(Flags::Connect, allowed, &format!("workload refused the connection: {e}")));
        }
        Err(_) => return Err(refused(Flags::Connect, allowed, "timed out dialling the workload")),
    };
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    let open = report.opened(&data.traffic);
    let counts = ByteCounts::default();
    let detail = tokio::select! {
        result = copy_counted(&mut tcp, &mut upstream, &counts) => result.err().map(|e| e.to_string()),
        () = registration.cancel.cancelled() => {
            info!(%client, %target, "plaintext connection closed: no longer allowed by policy, or shutting down");
            Some("closed by the proxy: policy change or shutdown".to_owned())
        }
    };
    let (received, sent) = counts.get();
    report.closed(open, received, sent, allowed, detail.as_deref());
    Ok(())
}
