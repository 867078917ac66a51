//! Renewals on a discovery stream: node credentials for a new key, and asking the proxy to renew what the retiring
//! CA of a root rotation signed (each certificate once per stream: the proxy reports again after each install).

use std::collections::HashSet;

use trellis_proto::v1 as pb;

use super::Shared;

/// Per stream: the retiring CA's certificates the proxy was already asked to renew (by serial).
#[derive(Default)]
pub struct RenewalTracker {
    asked: HashSet<String>,
}

impl RenewalTracker {
    /// The identities among `held` that `retiring` signed and that were not asked for on this stream yet.
    pub fn due(&mut self, held: &[pb::HeldCertificate], retiring: Option<&str>) -> Vec<String> {
        let Some(retiring) = retiring else { return Vec::new() };
        let mut ids: Vec<String> = held
            .iter()
            .filter(|c| c.issuer_sha256 == retiring && self.asked.insert(c.serial.clone()))
            .map(|c| c.spiffe_id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// Answers a node credential renewal: signed for the stream's node, or refused with the reason.
pub fn node_credential(shared: &Shared, node: &str, request: &pb::NodeCredentialRequest) -> pb::NodeCredentialResponse {
    match shared.mesh.renew_node(node, &request.csr_der) {
        Ok(issued) => pb::NodeCredentialResponse {
            request_id: request.request_id,
            certificate_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            error: String::new(),
        },
        Err(e) => {
            tracing::warn!(node, error = %e, "node credential renewal refused");
            pb::NodeCredentialResponse {
                request_id: request.request_id,
                certificate_chain: vec![],
                error: e.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str, serial: &str, issuer: &str) -> pb::HeldCertificate {
        pb::HeldCertificate {
            spiffe_id: id.into(),
            serial: serial.into(),
            issuer_sha256: issuer.into(),
            not_after_unix: 0,
        }
    }

    #[test]
    fn each_old_certificate_is_asked_for_once() {
        let mut tracker = RenewalTracker::default();
        let report = [held("a", "1", "old"), held("b", "2", "new"), held("c", "3", "old")];
        assert!(tracker.due(&report, None).is_empty(), "no rotation: nothing");
        assert_eq!(tracker.due(&report, Some("old")), ["a", "c"]);
        assert!(tracker.due(&report, Some("old")).is_empty(), "already asked");
        // A certificate still old after a renewal failed has a new serial only if it was renewed; a new old one
        // (issued before the switch, installed after) is asked for.
        assert_eq!(tracker.due(&[held("a", "4", "old")], Some("old")), ["a"]);
    }
}
