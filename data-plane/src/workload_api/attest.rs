//! Attestation: which hosted identities a Workload API caller is entitled to, from its credentials and the
//! `attest` selectors of each workload in proxy.yaml (every selector of a workload must match; a workload without
//! selectors is never handed out). Pure: built once from the config, evaluated per call.

use std::collections::BTreeSet;

use trellis_proto::spiffe::SpiffeId;

use super::peer::Caller;
use crate::config::{Selector, WorkloadConfig};

pub struct Attestor {
    entries: Vec<(SpiffeId, Vec<Selector>)>,
}

impl Attestor {
    /// Workloads with selectors, each with its SPIFFE ID.
    pub fn new(workloads: &[WorkloadConfig], trust_domain: &str) -> Result<Self, trellis_proto::spiffe::SpiffeIdError> {
        let entries = (workloads.iter())
            .filter(|w| !w.attest.is_empty())
            .map(|w| Ok((SpiffeId::workload(trust_domain, &w.namespace, &w.service_account)?, w.attest.clone())))
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// Every identity a workload may be handed out as (the application SVIDs to keep issued).
    pub fn identities(&self) -> BTreeSet<SpiffeId> {
        self.entries.iter().map(|(id, _)| id.clone()).collect()
    }

    /// The identities `caller` matches, in SPIFFE ID order, without duplicates (workloads sharing a service account
    /// share an identity).
    pub fn attest(&self, caller: &Caller) -> Vec<SpiffeId> {
        let matched: BTreeSet<&SpiffeId> = (self.entries.iter())
            .filter(|(_, selectors)| selectors.iter().all(|s| matches(s, caller)))
            .map(|(id, _)| id)
            .collect();
        matched.into_iter().cloned().collect()
    }
}

fn matches(selector: &Selector, caller: &Caller) -> bool {
    match selector {
        Selector::Uid(uid) => caller.uid == *uid,
        Selector::Gid(gid) => caller.gid == *gid,
        Selector::Path(path) => caller.exe.as_deref() == Some(path.as_path()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn attestor() -> Attestor {
        let yaml = "node: n\ncontrolPlane: {address: 'cp:1', caPin: 'sha256:0000000000000000000000000000000000000000000000000000000000000000'}\nstateDir: /x\nworkloads:\n\
  - {name: orders, namespace: shop, serviceAccount: orders, addresses: [10.0.0.1], attest: [{uid: 1000}, {path: /usr/bin/orders}]}\n\
  - {name: pay, namespace: shop, serviceAccount: pay, addresses: [10.0.0.2], attest: [{uid: 1001}]}\n\
  - {name: pay2, namespace: shop, serviceAccount: pay, addresses: [10.0.0.3], attest: [{gid: 50}]}\n\
  - {name: open, namespace: shop, serviceAccount: open, addresses: [10.0.0.4]}\n";
        Attestor::new(&Config::parse(yaml).unwrap().workloads, "td").unwrap()
    }

    fn caller(uid: u32, gid: u32, exe: Option<&str>) -> Caller {
        Caller { uid, gid, pid: Some(1), exe: exe.map(Into::into) }
    }

    fn ids(v: Vec<SpiffeId>) -> Vec<String> {
        v.into_iter().map(|id| id.to_string()).collect()
    }

    #[test]
    fn every_selector_must_match() {
        let a = attestor();
        assert_eq!(ids(a.attest(&caller(1000, 0, Some("/usr/bin/orders")))), ["spiffe://td/ns/shop/sa/orders"]);
        assert!(a.attest(&caller(1000, 0, Some("/usr/bin/other"))).is_empty());
        assert!(a.attest(&caller(1000, 0, None)).is_empty(), "no verified executable, no path match");
        assert!(a.attest(&caller(0, 0, Some("/usr/bin/orders"))).is_empty());
    }

    #[test]
    fn shared_identities_once_and_unattested_workloads_never() {
        let a = attestor();
        assert_eq!(ids(a.attest(&caller(1001, 50, None))), ["spiffe://td/ns/shop/sa/pay"]);
        assert_eq!(a.identities().len(), 2, "orders and pay; `open` has no selectors");
        assert!(a.attest(&caller(4000, 4000, Some("/bin/sh"))).is_empty());
    }
}
