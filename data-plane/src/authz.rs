//! Authorization of inbound connections. The compiled policies are narrowed to each of this proxy's workloads once
//! per config change; a check is then a map lookup plus the evaluator's comparisons.

use std::collections::HashMap;
use std::net::SocketAddr;

use trellis_policy::{CompiledPolicies, Decision, Request, WorkloadPolicies};

use crate::connections::InboundConn;
use crate::metrics::DecisionCounters;
use crate::registry::LocalWorkloads;

/// The policies that apply to each local workload, by workload key.
#[derive(Default)]
pub struct LocalPolicies {
    by_workload: HashMap<String, WorkloadPolicies>,
    /// Decision counters of the policies above.
    pub decisions: DecisionCounters,
}

impl LocalPolicies {
    pub fn build(compiled: &CompiledPolicies, locals: &LocalWorkloads) -> Self {
        let by_workload: HashMap<String, WorkloadPolicies> = locals
            .all()
            .iter()
            .map(|w| (w.key.clone(), compiled.for_workload(&w.config.namespace, &w.config.labels)))
            .collect();
        let decisions = DecisionCounters::build(by_workload.values());
        Self { by_workload, decisions }
    }

    /// The policies (and PeerAuthentication modes) of one local workload.
    pub fn workload(&self, key: &str) -> Option<&WorkloadPolicies> {
        self.by_workload.get(key)
    }

    /// The decision for an inbound connection (None: the workload is unknown here, which the caller refuses).
    pub fn check<'p>(&'p self, conn: &InboundConn, peer: SocketAddr) -> Option<Decision<'p>> {
        let policies = self.by_workload.get(&conn.workload.key)?;
        // source.ip is the original client's address when the sending proxy reported it.
        let source_ip = conn.source_addr.map_or(peer.ip(), |a| a.ip());
        let request = Request::tcp(Some(&conn.principal), source_ip, conn.destination.ip(), conn.destination.port());
        Some(policies.evaluate(&request))
    }
}
