//! Authorization of inbound connections and requests. The compiled policies (and the JWT rules with their parsed
//! keys) are narrowed to each of this proxy's workloads once per config change; a check is then a map lookup plus
//! the evaluator's comparisons.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use trellis_policy::{CompiledPolicies, Decision, JwtAuthenticator, Request, WorkloadPolicies};

use crate::connections::{Downstream, InboundConn};
use crate::metrics::DecisionCounters;
use crate::registry::LocalWorkloads;

/// What applies to each local workload, by workload key.
#[derive(Default)]
pub struct LocalPolicies {
    by_workload: HashMap<String, WorkloadAuth>,
    /// Decision counters of the policies above.
    pub decisions: DecisionCounters,
}

/// The authorization policies and the RequestAuthentication rules of one workload.
pub struct WorkloadAuth {
    pub policies: WorkloadPolicies,
    pub jwt: JwtAuthenticator,
}

impl LocalPolicies {
    /// `jwks`: the JWKS text of each `jwksUri`, as the control plane fetched it; `mesh`: the mesh's issuer
    /// (`spiffe://<trust-domain>`) and its JWKS from the trust bundle, for rules of that issuer without keys of their
    /// own (JWT-SVIDs).
    pub fn build(
        compiled: &CompiledPolicies,
        locals: &LocalWorkloads,
        jwks: &BTreeMap<String, String>,
        mesh: (&str, &str),
        clock_skew: Duration,
    ) -> Self {
        let (mesh_issuer, mesh_jwks) = mesh;
        let lookup = |uri: &str| {
            if uri == mesh_issuer && !mesh_jwks.is_empty() {
                Some(mesh_jwks)
            } else {
                jwks.get(uri).map(String::as_str)
            }
        };
        let by_workload: HashMap<String, WorkloadAuth> = locals
            .all()
            .iter()
            .map(|w| {
                let (ns, labels) = (&w.config.namespace, &w.config.labels);
                let rules = compiled.jwt_rules_for(ns, labels);
                let jwt = JwtAuthenticator::new(rules, lookup, clock_skew);
                for (issuer, problem) in jwt.jwks_problems() {
                    tracing::warn!(workload = %w.key, %issuer, %problem, "JWT rule without usable keys: its tokens get 401");
                }
                (w.key.clone(), WorkloadAuth { policies: compiled.for_workload(ns, labels), jwt })
            })
            .collect();
        let decisions = DecisionCounters::build(by_workload.values().map(|w| &w.policies));
        Self { by_workload, decisions }
    }

    /// The policies (and PeerAuthentication modes) of one local workload.
    pub fn workload(&self, key: &str) -> Option<&WorkloadPolicies> {
        self.by_workload.get(key).map(|w| &w.policies)
    }

    /// The policies and JWT rules of one local workload (HTTP ports).
    pub fn auth(&self, key: &str) -> Option<&WorkloadAuth> {
        self.by_workload.get(key)
    }

    /// The decision for an inbound connection (None: the workload is unknown here, which the caller refuses).
    pub fn check<'p>(&'p self, conn: &InboundConn, peer: SocketAddr) -> Option<Decision<'p>> {
        let policies = &self.by_workload.get(&conn.workload.key)?.policies;
        Some(policies.evaluate(&tcp_request(conn, peer)))
    }
}

/// The connection attributes of an inbound tunnel; HTTP requests add theirs with `with_http`.
pub fn tcp_request(conn: &InboundConn, peer: SocketAddr) -> Request<'_> {
    // source.ip is the original client's address when the sending proxy reported it.
    let source_ip = conn.source_addr.map_or(peer.ip(), |a| a.ip());
    Request::tcp(Some(&conn.principal), source_ip, conn.destination.ip(), conn.destination.port())
}

/// The connection attributes of a connection to an HTTP port, whose requests add theirs with `with_http`: a
/// tunnel's as [`tcp_request`]; a plaintext client's without principal or namespace, `source.ip` its own address.
pub fn downstream_request(downstream: &Downstream) -> Request<'_> {
    let destination = downstream.destination();
    Request::tcp(downstream.principal(), downstream.client().ip(), destination.ip(), destination.port())
}
