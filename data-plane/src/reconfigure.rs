//! Following changes: whenever a workload certificate, the trust bundle or the mesh state changes, the data path's
//! shared pieces are rebuilt once and swapped in (TLS set, registry index, per-workload policies), and every open
//! inbound connection the new policies deny is closed (re-authorization). Also the periodic upkeep: idle pooled
//! connections expire, health gauges refresh, departed workloads' series expire.

use std::sync::Arc;

use tracing::info;

use crate::authz::LocalPolicies;
use crate::config::Config;
use crate::identity::WorkloadCerts;
use crate::proxy::{DataPath, inbound_plaintext, l7};
use crate::registry::Registry;
use crate::revocation::Revocations;
use crate::state::StateStore;

/// Rebuilds the TLS configs when a certificate or the trust bundle changes, and the registry index when the
/// mesh state changes; expires idle pooled connections.
pub async fn follow_changes(
    config: Arc<Config>,
    data: Arc<DataPath>,
    certs: Arc<WorkloadCerts>,
    state: Arc<StateStore>,
) {
    let mut cert_changes = certs.subscribe();
    let mut state_changes = state.subscribe();
    let mut bundle: Option<Arc<crate::state::TrustBundle>> = None;
    let mut certs_changed = true;
    let mut reap = tokio::time::interval(crate::proxy::pool::REAP_INTERVAL);
    let mut upkeep = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
    let mut policies: Option<(Arc<trellis_policy::CompiledPolicies>, Arc<_>, Arc<String>)> = None;
    let mut revocations = data.tls.revocations().load();
    loop {
        let current = state.load();
        if !Arc::ptr_eq(&revocations, &current.revocations) {
            revocations = current.revocations.clone();
            revoke(&data, revocations.clone());
        }
        data.registry.store(Arc::new(Registry::from_state(&current)));
        if !policies.as_ref().is_some_and(|(p, j, m)| {
            Arc::ptr_eq(p, &current.policies) && Arc::ptr_eq(j, &current.jwks) && Arc::ptr_eq(m, &current.mesh_jwks)
        }) {
            let issuer = format!("spiffe://{}", current.trust_domain);
            let mesh = (issuer.as_str(), current.mesh_jwks.as_str());
            let local =
                LocalPolicies::build(&current.policies, &data.locals, &current.jwks, mesh, config.jwt_clock_skew);
            reauthorize(&data, local);
            policies = Some((current.policies.clone(), current.jwks.clone(), current.mesh_jwks.clone()));
        }
        let same_bundle = match (&bundle, &current.trust_bundle) {
            (Some(old), Some(new)) => Arc::ptr_eq(old, new),
            (None, None) => true,
            _ => false,
        };
        if certs_changed || !same_bundle {
            bundle = current.trust_bundle.clone();
            data.tls.rebuild(&config.workloads, &certs, bundle.as_deref());
        }
        record_health(&certs, &state);
        loop {
            tokio::select! {
                changed = cert_changes.changed() => {
                    if changed.is_err() { return }
                    certs_changed = true;
                    break;
                }
                changed = state_changes.changed() => {
                    if changed.is_err() { return }
                    certs_changed = false;
                    break;
                }
                _ = reap.tick() => data.pool.reap(data.tls.load().generation),
                _ = upkeep.tick() => metrics_upkeep(&data, &certs, &state),
            }
        }
    }
}

/// Refreshes the health gauges and keeps the series of workloads still in the mesh from expiring.
fn metrics_upkeep(data: &DataPath, certs: &WorkloadCerts, state: &StateStore) {
    let registry = data.registry.load();
    let present = registry
        .present()
        .chain(data.locals.all().iter().map(|w| &w.peer))
        .map(|p| (p.namespace.clone(), p.workload.clone()))
        .collect();
    data.traffic.upkeep(&present);
    data.authz.load().decisions.touch();
    record_health(certs, state);
}

fn record_health(certs: &WorkloadCerts, state: &StateStore) {
    let current = state.load();
    let roots = current
        .trust_bundle
        .as_ref()
        .map(|b| b.roots.iter().map(|r| (r.info.sha256.as_str(), r.info.not_after)).collect());
    crate::metrics::record_health(&crate::metrics::Health {
        certificates: certs.all().iter().map(|c| (c.spiffe_id.to_string(), c.info.not_after)).collect(),
        roots: roots.unwrap_or_default(),
        config_version: current.synced.then_some(current.version),
    });
}

/// Installs a new revocation list for every handshake from now on, then closes every open connection whose peer
/// certificate it names: HBONE connections accepted from revoked peers and pooled ones to them, and every tunnel
/// stream on them (inbound, outbound and `http`-port tunnels alike), each with the reason in its access-log entry.
fn revoke(data: &DataPath, revocations: Arc<Revocations>) {
    data.tls.revocations().store(revocations.clone());
    let closed = data.connections.close_revoked(&revocations);
    let pooled = data.pool.close_revoked(&revocations);
    if closed.sessions + closed.streams + pooled > 0 {
        info!(
            accepted_connections = closed.sessions,
            pooled_connections = pooled,
            streams = closed.streams,
            "connections of revoked peers closed"
        );
    }
}

/// Installs the policies for the local workloads, then closes every open inbound connection they no longer allow.
/// Connections to `http` ports stay (tunnelled or plaintext; a plaintext one unless its port now requires mTLS): each
/// of their requests is checked against the policies current at that time.
fn reauthorize(data: &DataPath, local: LocalPolicies) {
    let local = Arc::new(local);
    data.authz.store(local.clone());
    let mut closed = data.connections.close_inbound_unless(|conn| match local.check(conn, conn.peer) {
        _ if l7::is_http(&conn.workload, conn.destination) => true,
        Some(decision) if decision.allowed => true,
        Some(decision) => {
            info!(source = %conn.source, target = %conn.destination, %decision, "closing connection after a policy change");
            local.decisions.record_closed(&decision);
            false
        }
        None => false,
    });
    closed += data.connections.close_plaintext_unless(|conn| inbound_plaintext::still_allowed(&local, conn));
    if closed > 0 {
        info!(closed, "connections closed by re-evaluation");
    }
}
