//! When to renew the node credential, and checking the answer: at about 2/3 of its lifetime (or at once when the
//! control plane asks), a CSR for a new key goes up the discovery stream; the answer becomes the credential the next
//! connection presents. The stream that carries it, and every tunnel, stay up.

use std::time::{Duration, Instant, SystemTime};

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use trellis_proto::v1::{NodeCredentialRequest, NodeCredentialResponse};

use super::certs::CertError;
use super::{NodeCredential, csr};
use crate::backoff::{Backoff, random_fraction};

/// Renewal at this fraction of the lifetime, minus up to `JITTER` of it (so nodes that joined together spread).
const RENEW_AT: f64 = 2.0 / 3.0;
const JITTER: f64 = 0.05;
/// A CSR without an answer for this long is considered lost and sent again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The control plane back-dates certificates by this much, or by their lifetime when shorter (`ca.rs`): the
/// issue time is recovered from `notBefore` with it.
const CONTROL_PLANE_BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum NodeRenewalError {
    #[error("the control plane refused to renew the node credential: {0}")]
    Refused(String),
    #[error("the renewed node credential is unusable: {0}")]
    Invalid(#[from] CertError),
    #[error("no answer to the node credential renewal within {REQUEST_TIMEOUT:?}")]
    TimedOut,
    #[error("cannot create the renewal's key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
}

struct Pending {
    request_id: u64,
    key: KeyPair,
    sent: Instant,
}

pub struct NodeRenewal {
    /// When to send the next CSR; `None` while one is outstanding.
    due: Option<Instant>,
    pending: Option<Pending>,
    backoff: Backoff,
    next_request_id: u64,
}

/// When `credential` is due for renewal, counted from its issue time (`notBefore` plus the control plane's
/// back-dating), so that the same credential gets the same answer after a restart.
pub fn renewal_time(credential: &NodeCredential, jitter: f64) -> SystemTime {
    let (not_before, not_after) = (credential.info.not_before, credential.info.not_after);
    let seen = not_after.duration_since(not_before).unwrap_or_default();
    // The control plane back-dates by min(5 min, ttl): a seen lifetime under twice that was back-dated by half.
    let backdate = if seen >= 2 * CONTROL_PLANE_BACKDATE { CONTROL_PLANE_BACKDATE } else { seen / 2 };
    let issued = not_before + backdate;
    let ttl = not_after.duration_since(issued).unwrap_or_default();
    issued + ttl.mul_f64(RENEW_AT - JITTER * jitter)
}

impl NodeRenewal {
    pub fn new(credential: &NodeCredential, now: Instant, wall: SystemTime) -> Self {
        let mut renewal = Self {
            due: None,
            pending: None,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            next_request_id: 1,
        };
        renewal.schedule(credential, now, wall);
        renewal
    }

    fn schedule(&mut self, credential: &NodeCredential, now: Instant, wall: SystemTime) {
        let at = renewal_time(credential, random_fraction());
        self.due = Some(now + at.duration_since(wall).unwrap_or_default());
    }

    /// A CSR when one is due (and none outstanding); a lost one is reported and retried after a backoff.
    pub fn step(&mut self, now: Instant) -> Result<Option<NodeCredentialRequest>, NodeRenewalError> {
        if self.pending.as_ref().is_some_and(|p| now >= p.sent + REQUEST_TIMEOUT) {
            self.pending = None;
            self.due = Some(now + self.backoff.next_delay());
            return Err(NodeRenewalError::TimedOut);
        }
        if self.pending.is_some() || self.due.is_none_or(|due| now < due) {
            return Ok(None);
        }
        let key = csr::new_key()?;
        let csr_der = csr::node_csr(&key)?;
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.pending = Some(Pending { request_id, key, sent: now });
        self.due = None;
        Ok(Some(NodeCredentialRequest { request_id, csr_der }))
    }

    /// The control plane asked (a root rotation): renew at once, abandoning an outstanding CSR (its answer may
    /// come from the retiring CA).
    pub fn renew_now(&mut self, now: Instant) {
        self.pending = None;
        self.due = Some(now);
        self.backoff.reset();
    }

    /// The answer: the renewed credential, `Ok(None)` for an answer to an abandoned CSR.
    pub fn on_response(
        &mut self,
        response: NodeCredentialResponse,
        current: &NodeCredential,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Option<NodeCredential>, NodeRenewalError> {
        let Some(pending) = self.pending.take_if(|p| p.request_id == response.request_id) else {
            return Ok(None);
        };
        let result = if response.error.is_empty() {
            let chain: Vec<CertificateDer<'static>> =
                response.certificate_chain.into_iter().map(CertificateDer::from).collect();
            current.renewed(&pending.key, chain, wall).map_err(NodeRenewalError::from)
        } else {
            Err(NodeRenewalError::Refused(response.error))
        };
        match result {
            Ok(renewed) => {
                self.backoff.reset();
                self.schedule(&renewed, now, wall);
                Ok(Some(renewed))
            }
            Err(e) => {
                self.due = Some(now + self.backoff.next_delay());
                Err(e)
            }
        }
    }

    /// The stream that carried an outstanding CSR is gone: ask again on the next one.
    pub fn stream_lost(&mut self, now: Instant) {
        if self.pending.take().is_some() {
            self.due = Some(now);
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.due.or(self.pending.as_ref().map(|p| p.sent + REQUEST_TIMEOUT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certs::{CertInfo, test_ca::TestCa};
    use trellis_proto::spiffe::SpiffeId;

    fn credential(not_before: SystemTime, not_after: SystemTime) -> NodeCredential {
        let ca = TestCa::new();
        credential_from(&ca, not_before, not_after)
    }

    fn credential_from(ca: &TestCa, not_before: SystemTime, not_after: SystemTime) -> NodeCredential {
        let mut info = CertInfo::parse(&ca.root).unwrap();
        info.not_before = not_before;
        info.not_after = not_after;
        NodeCredential::for_tests(SpiffeId::node("td", "n").unwrap(), info)
    }

    #[test]
    fn renewal_falls_at_two_thirds_of_the_lifetime_whatever_the_backdating() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cases = [
            // (lifetime, back-dated by)
            (Duration::from_secs(720 * 3600), CONTROL_PLANE_BACKDATE),
            (Duration::from_secs(600), CONTROL_PLANE_BACKDATE),
            (Duration::from_secs(120), Duration::from_secs(120)),
            (Duration::from_secs(30), Duration::from_secs(30)),
        ];
        for (ttl, backdate) in cases {
            let c = credential(issued - backdate, issued + ttl);
            assert_eq!(renewal_time(&c, 0.0), issued + ttl.mul_f64(2.0 / 3.0), "{ttl:?}");
            let earliest = renewal_time(&c, 1.0);
            assert!(earliest < renewal_time(&c, 0.0) && earliest >= issued + ttl.mul_f64(0.6), "{ttl:?}");
        }
    }

    #[test]
    fn csr_then_answer_and_retries() {
        let wall = SystemTime::now();
        let current = credential(wall - Duration::from_secs(60), wall + Duration::from_secs(60));
        let t0 = Instant::now();
        let mut r = NodeRenewal::new(&current, t0, wall);
        let due = r.next_deadline().unwrap();
        assert!(due > t0 && due <= t0 + Duration::from_secs(60), "{due:?}");
        assert!(r.step(t0).unwrap().is_none(), "not due yet");

        let request = r.step(due).unwrap().unwrap();
        assert!(r.step(due).unwrap().is_none(), "one outstanding at a time");
        // A refusal (a revoked node) is reported and retried after a backoff.
        let refused = NodeCredentialResponse {
            request_id: request.request_id,
            certificate_chain: vec![],
            error: "node \"n\" was revoked".into(),
        };
        let err = r.on_response(refused, &current, due, wall).unwrap_err();
        assert_eq!(err.to_string(), "the control plane refused to renew the node credential: node \"n\" was revoked");
        assert!(r.step(due).unwrap().is_none(), "waits for the backoff");
        let retry = r.step(due + Duration::from_secs(2)).unwrap().unwrap();
        assert_ne!(retry.request_id, request.request_id);

        // An answer to an abandoned request is ignored; RenewNow asks again at once.
        r.renew_now(due);
        let stale = NodeCredentialResponse { request_id: retry.request_id, ..Default::default() };
        assert!(r.on_response(stale, &current, due, wall).unwrap().is_none());
        r.step(due).unwrap().unwrap();
        // A lost answer times out.
        assert!(matches!(r.step(due + REQUEST_TIMEOUT), Err(NodeRenewalError::TimedOut)));
        // A lost stream asks again on the next one.
        let mut r2 = NodeRenewal::new(&current, t0, wall);
        r2.renew_now(t0);
        r2.step(t0).unwrap().unwrap();
        r2.stream_lost(t0);
        assert!(r2.step(t0).unwrap().is_some());
    }

    #[test]
    fn a_good_answer_is_the_renewed_credential_and_schedules_the_next() {
        let ca = TestCa::new();
        let wall = SystemTime::now();
        let current = credential_from(&ca, wall - Duration::from_secs(60), wall + Duration::from_secs(60));
        let t0 = Instant::now();
        let mut r = NodeRenewal::new(&current, t0, wall);
        r.renew_now(t0);
        let request = r.step(t0).unwrap().unwrap();
        let lifetime = Duration::from_secs(3600);
        let answer = |uri: &str| NodeCredentialResponse {
            request_id: request.request_id,
            certificate_chain: ca.sign_as(&request.csr_der, Some(uri), lifetime).iter().map(|c| c.to_vec()).collect(),
            error: String::new(),
        };
        // Another node's identity is refused (and retried).
        let err = r.on_response(answer("spiffe://td/trellis/node/other"), &current, t0, wall).unwrap_err();
        assert!(matches!(err, NodeRenewalError::Invalid(CertError::WrongIdentity { .. })), "{err}");
        // Control: our own identity, for the key of the CSR.
        r.renew_now(t0);
        let request2 = r.step(t0).unwrap().unwrap();
        let good = NodeCredentialResponse {
            request_id: request2.request_id,
            certificate_chain: ca
                .sign_as(&request2.csr_der, Some("spiffe://td/trellis/node/n"), lifetime)
                .iter()
                .map(|c| c.to_vec())
                .collect(),
            error: String::new(),
        };
        let renewed = r.on_response(good, &current, t0, wall).unwrap().unwrap();
        assert_ne!(renewed.info.spki, current.info.spki, "a new key");
        let next = r.next_deadline().unwrap();
        // (The test CA does not back-date as the control plane does: a little later than 2/3.)
        assert!(next >= t0 + lifetime.mul_f64(0.6) && next <= t0 + lifetime.mul_f64(0.75), "{next:?}");
    }
}
