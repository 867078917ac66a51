//! Captured plaintext inbound (listen.inbound, 15006): TCP from outside the mesh to a local workload, redirected
//! here by the capture rules. Accept → original destination → local workload and declared port →
//! PeerAuthentication (STRICT refuses; PERMISSIVE and DISABLE accept) → authorization with a plaintext peer (no
//! principal: `principals` ALLOW rules never match, `notPrincipals: ["*"]` DENY rules do) → dial → copy.
//!
//! The per-port modes and policies are resolved once per config change (`LocalPolicies`); a connection costs two
//! map lookups and the evaluator's comparisons.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};
use trellis_policy::{Decision, MtlsMode, Request};

use crate::authz::LocalPolicies;
use crate::connections::{ByteCounts, PlaintextConn, copy_counted};
use crate::proxy::DataPath;

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
    Allowed { mode: MtlsMode, decision: Decision<'p> },
    Refused(String),
}

/// PeerAuthentication, then authorization, for a plaintext connection (also used to re-check open connections
/// after a policy change).
pub fn check<'p>(policies: &'p LocalPolicies, conn: &PlaintextConn) -> Check<'p> {
    let Some(workload) = policies.workload(&conn.workload.key) else {
        return Check::Refused(format!("no policies for workload {}", conn.workload.key));
    };
    let port = conn.destination.port();
    let mtls = workload.mtls().port(port);
    if mtls.mode == MtlsMode::Strict {
        return Check::Refused(format!("port {port} requires mTLS: {mtls}"));
    }
    let request = Request::tcp(None, conn.client.ip(), conn.destination.ip(), port);
    let decision = workload.evaluate(&request);
    if decision.allowed { Check::Allowed { mode: mtls.mode, decision } } else { Check::Refused(decision.to_string()) }
}

/// Whether an open plaintext connection is still allowed (re-evaluation after a config change).
pub fn still_allowed(policies: &LocalPolicies, conn: &PlaintextConn) -> bool {
    match check(policies, conn) {
        Check::Allowed { .. } => true,
        Check::Refused(reason) => {
            info!(client = %conn.client, target = %conn.destination, %reason, "closing plaintext connection after a policy change");
            false
        }
    }
}

async fn connection(
    tcp: TcpStream,
    client: SocketAddr,
    own: Option<SocketAddr>,
    data: &DataPath,
) -> Result<(), String> {
    let target = crate::outbound::original_destination(&tcp)
        .filter(|t| Some(*t) != own && Some(*t) != tcp.local_addr().ok())
        .ok_or("not redirected by the capture rules")?;
    let workload = (data.locals.by_ip(target.ip()))
        .filter(|w| w.port(target.port()).is_some())
        .cloned()
        .ok_or_else(|| format!("{target} is not a declared port of a workload this proxy fronts"))?;
    let conn = Arc::new(PlaintextConn { client, destination: target, workload });
    // Registered before the check, so that a policy change between check and registration cannot be missed.
    let registration = data.connections.register_plaintext(conn.clone());
    {
        let policies = data.authz.load();
        match check(&policies, &conn) {
            Check::Allowed { mode, decision } => {
                if !decision.audit.is_empty() || decision.dry_run.is_some() {
                    info!(%client, %target, %decision, "plaintext connection allowed");
                }
                debug!(%client, %target, %mode, "plaintext connection accepted");
            }
            Check::Refused(reason) => return Err(format!("{target}: {reason}")),
        }
    }
    let mut upstream = tokio::time::timeout(DIAL_TIMEOUT, crate::dial::connect(target))
        .await
        .map_err(|_| format!("timed out dialling the workload at {target}"))?
        .map_err(|e| format!("workload {target} refused the connection: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    let counts = ByteCounts::default();
    let result = tokio::select! {
        r = copy_counted(&mut tcp, &mut upstream, &counts) => r,
        () = registration.cancel.cancelled() => {
            info!(%client, %target, "plaintext connection closed: no longer allowed by policy, or shutting down");
            return Ok(());
        }
    };
    match result {
        Ok(()) => {
            let (sent, received) = counts.get();
            debug!(%client, %target, sent, received, "plaintext connection closed")
        }
        Err(e) => debug!(%client, %target, error = %e, "plaintext connection failed"),
    }
    Ok(())
}
