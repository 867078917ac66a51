//! Workload certificates: one X.509-SVID per SPIFFE ID this proxy hosts.
//!
//! Split in two: `WorkloadCerts` is the read side, shared with whoever terminates or originates mTLS
//! (current certificate per identity in an `ArcSwapOption`, plus a `watch` generation counter to rebuild
//! TLS configs on change); `CertManager` is the write side, owned by the discovery stream, which decides
//! when to send a CSR (missing, half-life reached, RenewNow, retry after failure) and installs answers.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1::{CertificateRequest, CertificateResponse};

use super::certs::{self, CertError, CertInfo};
use super::csr;
use crate::backoff::{Backoff, random_fraction};

/// A CSR that gets no answer within this time is considered lost and retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Renewal happens at this fraction of the validity left at receipt, plus up to `RENEW_JITTER` of it.
const RENEW_AT: f64 = 0.45;
const RENEW_JITTER: f64 = 0.10;

/// A workload's certificate and its key.
pub struct WorkloadCert {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then the chain up to the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
    key: PrivatePkcs8KeyDer<'static>,
}

impl WorkloadCert {
    /// A certificate already checked against its key (`certs::check_issued`), e.g. one read back from the state
    /// directory.
    pub fn new(
        spiffe_id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        info: CertInfo,
        key: PrivatePkcs8KeyDer<'static>,
    ) -> Self {
        Self { spiffe_id, chain, info, key }
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The key as PKCS#8 DER, to store it (0600) beside the certificate.
    pub fn pkcs8_der(&self) -> &[u8] {
        self.key.secret_pkcs8_der()
    }
}

// Hand-written so the private key never reaches a log line.
impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.info.serial)
            .field("not_after", &certs::rfc3339(self.info.not_after))
            .finish_non_exhaustive()
    }
}

/// The current certificates, readable from anywhere.
pub struct WorkloadCerts {
    slots: BTreeMap<SpiffeId, ArcSwapOption<WorkloadCert>>,
    generation: watch::Sender<u64>,
}

impl WorkloadCerts {
    pub fn new(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        Self {
            slots: ids.into_iter().map(|id| (id, ArcSwapOption::empty())).collect(),
            generation: watch::Sender::new(0),
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = &SpiffeId> {
        self.slots.keys()
    }

    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.slots.get(id).and_then(|slot| slot.load_full())
    }

    /// Every identity that currently has a certificate.
    pub fn all(&self) -> Vec<Arc<WorkloadCert>> {
        self.slots.values().filter_map(|slot| slot.load_full()).collect()
    }

    /// True when every hosted identity has a certificate.
    pub fn complete(&self) -> bool {
        self.slots.values().all(|slot| slot.load().is_some())
    }

    /// Changes whenever any certificate is installed or withdrawn.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn publish(&self, id: &SpiffeId, cert: Option<Arc<WorkloadCert>>) {
        if let Some(slot) = self.slots.get(id) {
            slot.store(cert);
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the control plane refused the CSR for {id}: {reason}")]
    Refused { id: SpiffeId, reason: String },
    #[error("the certificate issued for {id} is unusable: {source}")]
    Invalid { id: SpiffeId, source: CertError },
    #[error("no answer to the CSR for {0} within {REQUEST_TIMEOUT:?}")]
    TimedOut(SpiffeId),
}

impl IssueError {
    pub fn spiffe_id(&self) -> &SpiffeId {
        match self {
            IssueError::Refused { id, .. } | IssueError::Invalid { id, .. } | IssueError::TimedOut(id) => id,
        }
    }
}

/// Per-identity schedule.
struct Slot {
    /// When to send the next CSR; `None` while one is outstanding.
    due: Option<Instant>,
    backoff: Backoff,
    /// When the published certificate expires (it is withdrawn then).
    expires: Option<Instant>,
}

struct Pending {
    id: SpiffeId,
    key: KeyPair,
    sent: Instant,
}

pub struct CertManager {
    certs: Arc<WorkloadCerts>,
    slots: BTreeMap<SpiffeId, Slot>,
    pending: HashMap<u64, Pending>,
    next_request_id: u64,
}

/// What a `CertManager` step produced: CSRs to send and problems to log.
#[derive(Default)]
pub struct Step {
    pub requests: Vec<CertificateRequest>,
    pub failures: Vec<IssueError>,
    pub expired: Vec<SpiffeId>,
}

impl CertManager {
    pub fn new(certs: Arc<WorkloadCerts>, now: Instant) -> Self {
        let slots = certs
            .ids()
            .map(|id| {
                let slot = Slot {
                    due: Some(now),
                    backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
                    expires: None,
                };
                (id.clone(), slot)
            })
            .collect();
        Self { certs, slots, pending: HashMap::new(), next_request_id: 1 }
    }

    /// A manager whose request IDs start at `first`, so that two managers can share one discovery stream (the
    /// tunnel certificates and the application SVIDs of the Workload API) and answers reach the one that asked.
    pub fn with_first_request_id(certs: Arc<WorkloadCerts>, now: Instant, first: u64) -> Self {
        Self { next_request_id: first, ..Self::new(certs, now) }
    }

    /// Whether an answer to `request_id` is awaited by this manager.
    pub fn expects(&self, request_id: u64) -> bool {
        self.pending.contains_key(&request_id)
    }

    pub fn certs(&self) -> &Arc<WorkloadCerts> {
        &self.certs
    }

    /// Withdraws expired certificates, times out lost CSRs and creates CSRs for every identity that is due.
    pub fn step(&mut self, now: Instant) -> Step {
        let mut step = Step { expired: self.expire(now), ..Step::default() };

        let lost: Vec<u64> =
            self.pending.iter().filter(|(_, p)| now >= p.sent + REQUEST_TIMEOUT).map(|(id, _)| *id).collect();
        for request_id in lost {
            let pending = self.pending.remove(&request_id).expect("listed above");
            self.failed(&pending.id, now);
            step.failures.push(IssueError::TimedOut(pending.id));
        }

        let due: Vec<SpiffeId> =
            self.slots.iter().filter(|(_, s)| s.due.is_some_and(|d| d <= now)).map(|(id, _)| id.clone()).collect();
        for id in due {
            match self.request(&id, now) {
                Ok(request) => step.requests.push(request),
                Err(e) => {
                    // Key or CSR generation failing is a local fault; retry later like a refusal.
                    self.failed(&id, now);
                    step.failures.push(IssueError::Refused { id, reason: format!("cannot create CSR: {e}") });
                }
            }
        }
        step
    }

    /// Withdraws certificates past their expiry; returns whose.
    pub fn expire(&mut self, now: Instant) -> Vec<SpiffeId> {
        let mut expired = Vec::new();
        for (id, slot) in &mut self.slots {
            if slot.expires.is_some_and(|at| at <= now) {
                slot.expires = None;
                self.certs.publish(id, None);
                expired.push(id.clone());
            }
        }
        expired
    }

    /// When the next published certificate expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.slots.values().filter_map(|s| s.expires).min()
    }

    fn request(&mut self, id: &SpiffeId, now: Instant) -> Result<CertificateRequest, rcgen::Error> {
        let key = csr::new_key()?;
        let csr_der = csr::workload_csr(&key, id)?;
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.pending.insert(request_id, Pending { id: id.clone(), key, sent: now });
        if let Some(slot) = self.slots.get_mut(id) {
            slot.due = None;
        }
        Ok(CertificateRequest { request_id, csr_der })
    }

    /// Installs an answer. `Ok(None)` for an answer to a request that is no longer outstanding.
    pub fn on_response(
        &mut self,
        response: CertificateResponse,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Option<Arc<WorkloadCert>>, IssueError> {
        let Some(pending) = self.pending.remove(&response.request_id) else {
            return Ok(None);
        };
        let id = pending.id;
        if !response.error.is_empty() {
            self.failed(&id, now);
            return Err(IssueError::Refused { id, reason: response.error });
        }
        let chain: Vec<CertificateDer<'static>> =
            response.certificate_chain.into_iter().map(CertificateDer::from).collect();
        let info = match certs::check_issued(&chain, &pending.key.subject_public_key_info(), &id, wall) {
            Ok(info) => info,
            Err(source) => {
                self.failed(&id, now);
                return Err(IssueError::Invalid { id, source });
            }
        };

        let renew_in = renewal_delay(&info, wall);
        let expires_in = info.not_after.duration_since(wall).unwrap_or_default();
        let cert = Arc::new(WorkloadCert {
            spiffe_id: id.clone(),
            chain,
            info,
            key: PrivatePkcs8KeyDer::from(pending.key.serialize_der()),
        });
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.due = Some(now + renew_in);
            slot.expires = Some(now + expires_in);
            slot.backoff.reset();
        }
        self.certs.publish(&id, Some(cert.clone()));
        Ok(Some(cert))
    }

    /// Installs a certificate kept from before a restart (already checked, not expired at `wall`): published at once,
    /// renewed and withdrawn on the same schedule as one just issued.
    pub fn restore(&mut self, cert: WorkloadCert, now: Instant, wall: SystemTime) {
        let Some(slot) = self.slots.get_mut(&cert.spiffe_id) else { return };
        slot.due = Some(now + renewal_delay(&cert.info, wall));
        slot.expires = Some(now + cert.info.not_after.duration_since(wall).unwrap_or_default());
        let id = cert.spiffe_id.clone();
        self.certs.publish(&id, Some(Arc::new(cert)));
    }

    /// RenewNow from the control plane: the listed identities (all when empty) get a new CSR immediately;
    /// an outstanding CSR for them is abandoned (its answer may be signed by a root being retired).
    pub fn renew_now(&mut self, spiffe_ids: &[String], now: Instant) -> Vec<SpiffeId> {
        let wanted: Vec<SpiffeId> = self
            .slots
            .keys()
            .filter(|id| spiffe_ids.is_empty() || spiffe_ids.iter().any(|s| *s == id.to_string()))
            .cloned()
            .collect();
        self.pending.retain(|_, p| !wanted.contains(&p.id));
        for id in &wanted {
            if let Some(slot) = self.slots.get_mut(id) {
                slot.due = Some(now);
                slot.backoff.reset();
            }
        }
        wanted
    }

    /// The stream that carried outstanding CSRs is gone: their answers will never come, ask again on the
    /// next stream. Identities with a valid certificate keep their schedule.
    pub fn stream_lost(&mut self, now: Instant) {
        for (_, pending) in self.pending.drain() {
            if let Some(slot) = self.slots.get_mut(&pending.id) {
                slot.due = Some(now);
            }
        }
    }

    /// The earliest instant at which `step` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let slots = self.slots.values().flat_map(|s| [s.due, s.expires]).flatten();
        let timeouts = self.pending.values().map(|p| p.sent + REQUEST_TIMEOUT);
        slots.chain(timeouts).min()
    }

    fn failed(&mut self, id: &SpiffeId, now: Instant) {
        if let Some(slot) = self.slots.get_mut(id) {
            slot.due = Some(now + slot.backoff.next_delay());
        }
    }
}

/// Time until renewal: about half the remaining validity (45-55%, jittered so identities issued together
/// do not renew together). Counted from receipt rather than not_before, because the control plane
/// back-dates certificates for clock skew, which would otherwise make short-lived ones renew at once.
fn renewal_delay(info: &CertInfo, wall: SystemTime) -> Duration {
    let fraction = RENEW_AT + RENEW_JITTER * random_fraction();
    let start = info.not_before.max(wall);
    let remaining = info.not_after.duration_since(start).unwrap_or_default();
    remaining.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certs::test_ca::TestCa;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::workload("td", "ns", sa).unwrap()
    }

    fn answer(ca: &TestCa, req: &CertificateRequest, lifetime: Duration) -> CertificateResponse {
        CertificateResponse {
            request_id: req.request_id,
            certificate_chain: ca.sign(&req.csr_der, lifetime).into_iter().map(|c| c.to_vec()).collect(),
            error: String::new(),
        }
    }

    #[test]
    fn issues_renews_with_fresh_keys_and_publishes() {
        let ca = TestCa::new();
        let certs = Arc::new(WorkloadCerts::new([id("a"), id("b")]));
        let mut generation = certs.subscribe();
        let t0 = Instant::now();
        let mut m = CertManager::new(certs.clone(), t0);

        let step = m.step(t0);
        assert_eq!(step.requests.len(), 2);
        assert!(!certs.complete());
        // Nothing new is requested while the CSRs are outstanding.
        assert!(m.step(t0).requests.is_empty());

        let wall = SystemTime::now();
        let lifetime = Duration::from_secs(3600);
        for req in &step.requests {
            m.on_response(answer(&ca, req, lifetime), t0, wall).unwrap().unwrap();
        }
        assert!(certs.complete());
        assert!(generation.has_changed().unwrap());
        generation.mark_unchanged();
        let first = certs.get(&id("a")).unwrap();

        // Renewal is due around half the lifetime, not before 45%.
        let deadline = m.next_deadline().unwrap();
        assert!(deadline >= t0 + lifetime.mul_f64(0.44) && deadline <= t0 + lifetime.mul_f64(0.56), "{deadline:?}");
        assert!(m.step(t0 + lifetime.mul_f64(0.44)).requests.is_empty());
        let renewal = m.step(t0 + lifetime.mul_f64(0.56));
        assert_eq!(renewal.requests.len(), 2);
        // The old certificate stays in use while the renewal is outstanding.
        assert_eq!(certs.get(&id("a")).unwrap().info.serial, first.info.serial);

        let req_a = renewal
            .requests
            .iter()
            .find(|r| {
                let info = ca.sign(&r.csr_der, lifetime);
                certs::CertInfo::parse(&info[0]).unwrap().uri_sans == [id("a").to_string()]
            })
            .unwrap();
        let renewed = m.on_response(answer(&ca, req_a, lifetime), t0, SystemTime::now()).unwrap().unwrap();
        assert_ne!(renewed.info.serial, first.info.serial);
        assert_ne!(renewed.info.spki, first.info.spki, "each renewal uses a new key");
        assert!(generation.has_changed().unwrap());
    }

    #[test]
    fn renewal_ignores_backdating() {
        let wall = SystemTime::now();
        let ca = TestCa::new();
        let mut info = CertInfo::parse(&ca.root).unwrap();
        // Issued now for 2 minutes, back-dated by 2 minutes (as the control plane does for skew).
        info.not_before = wall - Duration::from_secs(120);
        info.not_after = wall + Duration::from_secs(120);
        for _ in 0..100 {
            let delay = renewal_delay(&info, wall);
            assert!(delay >= Duration::from_secs(54) && delay <= Duration::from_secs(66), "{delay:?}");
        }
    }

    #[test]
    fn refusal_backs_off_and_stale_answers_are_ignored() {
        let ca = TestCa::new();
        let certs = Arc::new(WorkloadCerts::new([id("a")]));
        let t0 = Instant::now();
        let mut m = CertManager::new(certs.clone(), t0);
        let req = m.step(t0).requests.remove(0);

        let refused = CertificateResponse { request_id: req.request_id, certificate_chain: vec![], error: "no".into() };
        assert!(matches!(m.on_response(refused, t0, SystemTime::now()), Err(IssueError::Refused { .. })));
        assert!(m.step(t0).requests.is_empty(), "retry waits for the backoff");
        let retry = m.step(t0 + Duration::from_secs(2)).requests.remove(0);

        // An answer to the first request is no longer expected.
        assert!(m.on_response(answer(&ca, &req, Duration::from_secs(60)), t0, SystemTime::now()).unwrap().is_none());
        // A certificate for someone else's key is rejected.
        let mut wrong = answer(&ca, &req, Duration::from_secs(60));
        wrong.request_id = retry.request_id;
        assert!(matches!(
            m.on_response(wrong, t0, SystemTime::now()),
            Err(IssueError::Invalid { source: CertError::KeyMismatch, .. })
        ));
        assert!(!certs.complete());
    }

    #[test]
    fn lost_stream_timeouts_renew_now_and_expiry() {
        let ca = TestCa::new();
        let certs = Arc::new(WorkloadCerts::new([id("a"), id("b")]));
        let t0 = Instant::now();
        let mut m = CertManager::new(certs.clone(), t0);
        let reqs = m.step(t0).requests;
        let lifetime = Duration::from_secs(600);
        m.on_response(answer(&ca, &reqs[0], lifetime), t0, SystemTime::now()).unwrap();

        // Only the identity without a certificate is asked for again on the next stream.
        m.stream_lost(t0);
        assert_eq!(m.step(t0).requests.len(), 1);
        // An unanswered CSR times out and is retried after the backoff.
        let step = m.step(t0 + REQUEST_TIMEOUT);
        assert_eq!(step.failures.len(), 1);
        assert_eq!(m.step(t0 + REQUEST_TIMEOUT + Duration::from_secs(2)).requests.len(), 1);

        // RenewNow with an unknown ID touches nothing; with none it renews all.
        assert!(m.renew_now(&["spiffe://td/ns/ns/sa/zzz".into()], t0).is_empty());
        assert_eq!(m.renew_now(&[], t0).len(), 2);
        assert_eq!(m.step(t0 + REQUEST_TIMEOUT).requests.len(), 2);

        // At expiry the certificate is withdrawn.
        let step = m.step(t0 + lifetime + Duration::from_secs(1));
        assert_eq!(step.expired.len(), 1);
        assert!(certs.all().is_empty());
    }
}
