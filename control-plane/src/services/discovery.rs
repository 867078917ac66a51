//! `Discovery.Stream`: one stream per proxy. Registers what the proxy fronts, then pushes a full snapshot and
//! incremental updates as the mesh changes, signs its workloads' CSRs and records its ACKs and NACKs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::v1 as pb;
use trellis_proto::v1::discovery_request::Message as Inbound;
use trellis_proto::v1::discovery_response::Message as Outbound;

use super::Shared;
use super::history::Resume;
use super::renewal::{self, RenewalTracker};
use super::scope::Scope;
use super::steps::{Step, jwks_set};
use crate::auth::{self, Caller};
use crate::authority::Authority;
use crate::ca::CaError;
use crate::mesh::{MeshError, Snapshot};
use crate::records::NodeRecord;
use crate::status::StreamCommand;

const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Why streams end when the control plane stops (the proxy logs it and reconnects with backoff).
const SHUTTING_DOWN: &str = "control plane shutting down";

pub struct DiscoveryService(pub Shared);

type ResponseStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::discovery_server::Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn sign_jwt_svid(
        &self,
        request: Request<pb::SignJwtSvidRequest>,
    ) -> Result<Response<pb::SignJwtSvidResponse>, Status> {
        let shared = &self.0;
        let node_name = match auth::caller(&request, shared.mesh.trust_domain())? {
            Caller::Node(name) => name,
            other => {
                return Err(Status::permission_denied(format!("{} is not a node credential", auth::describe(&other))));
            }
        };
        let node = shared.mesh.active_node(&node_name)?;
        let request = request.into_inner();
        match shared.mesh.sign_jwt_svid(&node, &request.spiffe_id, &request.audiences) {
            Ok((token, expires_at_unix)) => {
                metrics::counter!("trellis_jwt_svids_total", "outcome" => "issued").increment(1);
                Ok(Response::new(pb::SignJwtSvidResponse { token, expires_at_unix }))
            }
            Err(e) => {
                let outcome = match &e {
                    MeshError::PermissionDenied(_) => "permission_denied",
                    MeshError::InvalidArgument(_) => "invalid_argument",
                    _ => "error",
                };
                metrics::counter!("trellis_jwt_svids_total", "outcome" => outcome).increment(1);
                tracing::warn!(node = %node.name, spiffe_id = %request.spiffe_id, error = %e, "JWT-SVID refused");
                Err(e.into())
            }
        }
    }

    async fn stream(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let shared = &self.0;
        let node_name = match auth::caller(&request, shared.mesh.trust_domain())? {
            Caller::Node(name) => name,
            other => {
                return Err(Status::permission_denied(format!("{} is not a node credential", auth::describe(&other))));
            }
        };
        let node = shared.mesh.active_node(&node_name)?;
        let mut inbound = request.into_inner();
        let first = tokio::select! {
            first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()) => first,
            () = shared.shutting_down() => return Err(Status::unavailable(SHUTTING_DOWN)),
        };
        let hello = match first {
            Ok(Ok(Some(pb::DiscoveryRequest { message: Some(Inbound::Hello(hello)) }))) => hello,
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 30s")),
            Ok(_) => return Err(Status::invalid_argument("the first message on a discovery stream must be Hello")),
        };
        if let Err(e) = shared.mesh.register(&node, &hello) {
            tracing::warn!(node = %node_name, error = %e, "workload declaration refused");
            return Err(e.into());
        }
        // Resuming: the snapshot the proxy holds, if this replica knows it (`history.rs`). The current snapshot is
        // recorded first: after a restart it is the one loaded from the store, which proxies may hold.
        shared.history.record(&shared.mesh.current());
        let lineage = shared.history.lineage(shared.mesh.store()).map_err(MeshError::from)?.to_owned();
        let resume = shared.history.resume(&hello.resume_lineage, &lineage, hello.resume_version);
        metrics::counter!("trellis_stream_resumes_total", "outcome" => resume.label()).increment(1);
        if hello.resume_version != 0 {
            tracing::info!(node = %node_name, version = hello.resume_version, outcome = %resume.label(), "proxy asks to resume");
        }
        let scope = Scope::of(&hello);
        let (tx, rx) = mpsc::channel(16);
        let (commands_tx, commands) = mpsc::channel(8);
        let stream_id = shared.proxies.connect(&node_name, &hello.version, commands_tx);
        shared.holdings.stream_started(&node_name);
        metrics::gauge!("trellis_connected_proxies").set(shared.proxies.connected_count() as f64);
        tracing::info!(node = %node_name, workloads = hello.workloads.len(), scope = %scope.describe(), "proxy connected");
        let task = StreamTask {
            authority: shared.mesh.authority_changes(),
            renewals: RenewalTracker::default(),
            shared: shared.clone(),
            node,
            inbound,
            tx,
            commands,
            in_flight: InFlight::default(),
            sent: None,
            rejected: None,
            scope,
            lineage,
            resume: match resume {
                Resume::From(base) => Some(base),
                _ => None,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let reason = task.run().await;
            shared.proxies.disconnect(&node_name, stream_id);
            metrics::gauge!("trellis_connected_proxies").set(shared.proxies.connected_count() as f64);
            tracing::info!(node = %node_name, %reason, "proxy disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct StreamTask {
    shared: Shared,
    node: NodeRecord,
    inbound: Streaming<pb::DiscoveryRequest>,
    tx: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
    commands: mpsc::Receiver<StreamCommand>,
    in_flight: InFlight,
    /// What the proxy holds once it has applied every push so far; `None`: unknown, the next push is a full
    /// snapshot.
    sent: Option<Arc<Snapshot>>,
    /// The version of the latest intact push the proxy NACKed, until a later version is pushed: pushing the same
    /// state again would only be refused again.
    rejected: Option<u64>,
    /// Root rotation phases: from the switch on, what the retiring CA signed is renewed.
    authority: tokio::sync::watch::Receiver<Arc<Authority>>,
    renewals: RenewalTracker,
    /// Which resources the proxy receives (`scope.rs`).
    scope: Scope,
    /// The store's lineage, sent with the stream's first update.
    lineage: String,
    /// The snapshot the proxy holds when it resumes: the first push is a delta from it.
    resume: Option<Arc<Snapshot>>,
}

/// Pushes on one stream not yet answered, in order, with when each change was made: a proxy's ACK of version v
/// answers every earlier push too (it holds the state of v).
///
/// A push is *intact* while the proxy holds the state it was diffed from. A NACK breaks that for every push sent
/// after the rejected one: the proxy kept its older state and applies those increments on top of it, so an ACK of
/// one of them does not mean the proxy holds that version (the stream then sends a full snapshot, see
/// [`StreamTask::run`]).
#[derive(Default)]
struct InFlight(std::collections::VecDeque<Push>);

struct Push {
    version: u64,
    /// When the change it carries was made; `None` for a push that measures no convergence (a stream's first).
    created: Option<std::time::Instant>,
    intact: bool,
}

/// What a proxy's answer answered.
#[derive(Debug, PartialEq, Eq)]
struct Answered {
    /// When the change carried by the answered version was made, if that push measures convergence.
    created: Option<std::time::Instant>,
    /// Whether the answered push was diffed from the state the proxy held ([`InFlight`]); an answer to a version
    /// not pushed on this stream (or forgotten) counts as intact.
    intact: bool,
}

impl InFlight {
    /// A bound on what a stuck proxy can make the control plane remember.
    const MAX: usize = 64;

    fn sent(&mut self, version: u64, created: Option<std::time::Instant>) {
        if self.0.len() == Self::MAX {
            self.0.pop_front();
        }
        self.0.push_back(Push { version, created, intact: true });
    }

    /// Forgets every push before `version` and the first push of `version` (the same version is pushed twice when
    /// a full snapshot follows a NACK); returns what the answer answered.
    fn answered(&mut self, version: u64) -> Answered {
        while let Some(push) = self.0.front() {
            if push.version > version {
                break;
            }
            let push = self.0.pop_front().expect("front exists");
            if push.version == version {
                return Answered { created: push.created, intact: push.intact };
            }
        }
        Answered { created: None, intact: true }
    }

    /// After a NACK: every push still unanswered was diffed from a state the proxy does not hold.
    fn break_chain(&mut self) {
        for push in &mut self.0 {
            push.intact = false;
        }
    }
}

/// NACK reasons a proxy may report; anything else is counted as `other`, so a proxy cannot grow the label set.
const NACK_REASONS: [&str; 8] =
    ["not_synced", "trust_bundle", "workload", "resource", "removed_resource", "policy", "protocol", "revocations"];

fn response(message: Outbound) -> Result<pb::DiscoveryResponse, Status> {
    Ok(pb::DiscoveryResponse { message: Some(message) })
}

impl StreamTask {
    /// Serves the stream until it ends; returns why.
    ///
    /// Each change is pushed as the difference from what the proxy holds (`sent`). When the proxy NACKs an intact
    /// push it keeps its older state, and every push sent after that one was diffed from a state it does not hold:
    /// `sent` is forgotten and the next push is a full snapshot, so that nothing the rejected update carried (a
    /// good change beside the refused one) is lost. That push waits for a version later than the rejected one:
    /// the same state again would be refused again.
    async fn run(mut self) -> String {
        let mut snapshots = self.shared.mesh.subscribe();
        let mut first_push = true;
        loop {
            let current = snapshots.borrow_and_update().clone();
            let held_back = self.rejected.is_some_and(|rejected| current.version <= rejected);
            if !held_back {
                self.rejected = None;
                self.shared.history.record(&current);
                let update = match self.resume.take() {
                    // A resumed stream's first push is sent even when empty: the proxy learns it is in sync, and
                    // its ACK records the version. The JWKS set always goes (a restarted control plane refetches
                    // it, so the stored version does not name it).
                    Some(base) => {
                        let mut update = self
                            .shared
                            .steps
                            .update(Some(&base), &current, &self.scope)
                            .unwrap_or_else(|| pb::ConfigUpdate { version: current.version, ..Default::default() });
                        update.jwks = Some(jwks_set(&current.jwks));
                        Some(update)
                    }
                    None => self.shared.steps.update(self.sent.as_ref(), &current, &self.scope).or_else(|| {
                        // A change outside a scoped proxy's view reaches it as a version-only update (a few bytes):
                        // it ACKs every version, so proxy-status and a rotation's phases see it in sync.
                        let advanced = self.sent.as_ref().is_some_and(|sent| sent.version != current.version);
                        (advanced && self.scope != Scope::Everything)
                            .then(|| pb::ConfigUpdate { version: current.version, ..Default::default() })
                    }),
                };
                if let Some(mut update) = update {
                    let kind = match (update.full, first_push) {
                        (true, _) => "full",
                        (false, true) => "resume",
                        (false, false) => "delta",
                    };
                    if first_push {
                        update.lineage = self.lineage.clone();
                    }
                    let bytes = update.encoded_len();
                    metrics::counter!("trellis_push_bytes_total", "kind" => kind).increment(bytes as u64);
                    metrics::counter!("trellis_push_updates_total", "kind" => kind).increment(1);
                    if first_push {
                        tracing::info!(node = %self.node.name, version = update.version, kind, bytes, "first push of the stream");
                    }
                    let version = update.version;
                    if self.tx.send(response(Outbound::Update(update))).await.is_err() {
                        return "proxy went away".into();
                    }
                    self.shared.proxies.update(&self.node.name, |s| s.sent_version = version);
                    metrics::counter!("trellis_pushes_total").increment(1);
                    // The first push of a stream carries changes made before the proxy connected: no convergence
                    // time.
                    self.in_flight.sent(version, current.created.filter(|_| !first_push));
                    first_push = false;
                }
                self.sent = Some(current);
            }
            tokio::select! {
                () = self.shared.shutting_down() => {
                    // Never waits: a proxy that is not reading must not hold the shutdown (its stream still ends).
                    let _ = self.tx.try_send(Err(Status::unavailable(SHUTTING_DOWN)));
                    return SHUTTING_DOWN.into();
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return SHUTTING_DOWN.into();
                    }
                }
                changed = self.authority.changed() => {
                    if changed.is_err() {
                        return SHUTTING_DOWN.into();
                    }
                    let held = self.shared.holdings.get(&self.node.name).certificates;
                    if self.renew_retiring(&held).await.is_err() {
                        return "proxy went away".into();
                    }
                }
                message = self.inbound.message() => match message {
                    Ok(Some(request)) => {
                        if let Err(status) = self.handle(request).await {
                            let reason = status.message().to_owned();
                            let _ = self.tx.send(Err(status)).await;
                            return reason;
                        }
                    }
                    Ok(None) => return "stream closed by proxy".into(),
                    Err(status) => return format!("stream error: {}", status.message()),
                },
                command = self.commands.recv() => match command {
                    Some(StreamCommand::Renew(spiffe_ids)) => {
                        if self.tx.send(response(Outbound::Renew(pb::RenewNow { spiffe_ids }))).await.is_err() {
                            return "proxy went away".into();
                        }
                    }
                    Some(StreamCommand::Disconnect(reason)) => {
                        let _ = self.tx.send(Err(Status::permission_denied(reason.clone()))).await;
                        return reason;
                    }
                    None => return "stream replaced".into(),
                },
            }
        }
    }

    async fn handle(&mut self, request: pb::DiscoveryRequest) -> Result<(), Status> {
        match request.message {
            Some(Inbound::Ack(ack)) => {
                let answered = self.in_flight.answered(ack.version);
                if ack.error.is_empty() && !answered.intact {
                    // Applied on top of the older state the proxy kept after a NACK: it does not hold this
                    // version, and the full snapshot already scheduled brings it there.
                    tracing::debug!(node = %self.node.name, version = ack.version, "ACK of an update sent before a NACK; a full snapshot follows");
                } else if ack.error.is_empty() {
                    let convergence = answered.created.map(|at| at.elapsed().as_secs_f64());
                    if let Some(seconds) = convergence {
                        metrics::histogram!("trellis_config_convergence_seconds").record(seconds);
                    }
                    self.shared.proxies.update(&self.node.name, |s| {
                        s.acked_version = ack.version;
                        if let Some(seconds) = convergence {
                            s.last_convergence_seconds = seconds;
                        }
                    });
                } else {
                    tracing::warn!(node = %self.node.name, version = ack.version, error = %ack.error, "proxy rejected an update (NACK)");
                    let reason = NACK_REASONS.into_iter().find(|r| *r == ack.reason).unwrap_or("other");
                    metrics::counter!("trellis_nacks_total", "reason" => reason).increment(1);
                    self.shared.proxies.update(&self.node.name, |s| {
                        s.nacked_version = ack.version;
                        s.last_nack_error = ack.error.clone();
                    });
                    if answered.intact {
                        // The proxy kept its older state: resynchronise it with a full snapshot.
                        self.in_flight.break_chain();
                        self.sent = None;
                        self.rejected = Some(ack.version);
                    }
                }
                Ok(())
            }
            Some(Inbound::CertificateRequest(csr)) => {
                let answer = self.sign(&csr).await;
                self.tx
                    .send(response(Outbound::Certificate(answer)))
                    .await
                    .map_err(|_| Status::cancelled("proxy went away"))
            }
            Some(Inbound::Held(held)) => {
                self.shared.holdings.report(&self.node.name, held.certificates.clone());
                self.renew_retiring(&held.certificates).await.map_err(|_| Status::cancelled("proxy went away"))
            }
            Some(Inbound::NodeCredentialRequest(request)) => {
                let answer = renewal::node_credential(&self.shared, &self.node.name, &request);
                self.tx
                    .send(response(Outbound::NodeCredential(answer)))
                    .await
                    .map_err(|_| Status::cancelled("proxy went away"))
            }
            Some(Inbound::Hello(hello)) => {
                // The node may have been revoked since the stream started.
                self.shared.mesh.active_node(&self.node.name)?;
                self.shared.mesh.register(&self.node, &hello)?;
                let scope = Scope::of(&hello);
                if scope != self.scope {
                    // Resources enter and leave the proxy's view: resynchronise it with a full snapshot.
                    self.scope = scope;
                    self.sent = None;
                    self.rejected = None;
                }
                Ok(())
            }
            None => Err(Status::invalid_argument("empty discovery message")),
        }
    }

    /// Asks the proxy to renew the certificates in `held` that a retiring CA signed (each once per stream).
    async fn renew_retiring(&mut self, held: &[pb::HeldCertificate]) -> Result<(), ()> {
        let retiring = self.authority.borrow_and_update().retiring();
        let spiffe_ids = self.renewals.due(held, retiring.as_deref());
        if spiffe_ids.is_empty() {
            return Ok(());
        }
        tracing::info!(node = %self.node.name, ?spiffe_ids, "asking the proxy to renew certificates of the retiring CA");
        self.tx.send(response(Outbound::Renew(pb::RenewNow { spiffe_ids }))).await.map_err(|_| ())
    }

    async fn sign(&self, csr: &pb::CertificateRequest) -> pb::CertificateResponse {
        let started = std::time::Instant::now();
        match self.shared.mesh.sign_workload(&self.node, &csr.csr_der) {
            Ok((id, issued)) => {
                metrics::counter!("trellis_certificates_signed_total").increment(1);
                metrics::histogram!("trellis_certificate_signing_seconds").record(started.elapsed().as_secs_f64());
                tracing::info!(node = %self.node.name, spiffe_id = %id, serial = %issued.serial_hex, "workload certificate issued");
                pb::CertificateResponse {
                    request_id: csr.request_id,
                    certificate_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
                    error: String::new(),
                }
            }
            Err(e) => {
                metrics::counter!("trellis_certificates_refused_total", "reason" => refusal_label(&e)).increment(1);
                tracing::warn!(node = %self.node.name, error = %e, "CSR refused");
                pb::CertificateResponse { request_id: csr.request_id, certificate_chain: vec![], error: e.to_string() }
            }
        }
    }
}

/// A bounded set of reasons, for metrics.
fn refusal_label(e: &MeshError) -> &'static str {
    match e {
        MeshError::Ca(CaError::BadCsrSignature) => "bad_signature",
        MeshError::Ca(CaError::MalformedCsr(_)) => "malformed",
        MeshError::Ca(CaError::BadSans { .. } | CaError::BadSpiffeId(_) | CaError::NotWorkload(_)) => "bad_identity",
        MeshError::Ca(CaError::ForeignTrustDomain { .. }) => "foreign_trust_domain",
        MeshError::Ca(CaError::Refused(_)) => "not_authorized",
        // The node or the identity was revoked (`mesh/revocations.rs`).
        MeshError::PermissionDenied(_) => "revoked",
        _ => "internal",
    }
}

/// What a proxy that has seen `sent` needs to reach `next`, within its scope: a full snapshot first, then only
/// what changed (`steps.rs`; streams share the computed step through [`Steps`], this is the same for one caller).
pub fn diff(sent: Option<&Snapshot>, next: &Snapshot, scope: &Scope) -> Option<pb::ConfigUpdate> {
    Step::between(sent, next).update(scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, address: &str) -> Arc<pb::Workload> {
        Arc::new(pb::Workload {
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![address.into()],
            ..Default::default()
        })
    }

    fn resource(name: &str, revision: u64) -> Arc<pb::Resource> {
        Arc::new(pb::Resource {
            key: Some(pb::ResourceKey {
                kind: "AuthorizationPolicy".into(),
                namespace: "ns".into(),
                name: name.into(),
            }),
            revision,
            json: format!("{{\"r\":{revision}}}"),
        })
    }

    #[test]
    fn in_flight_matches_acks_to_their_pushes() {
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let intact = |ms| Answered { created: Some(at(ms)), intact: true };
        let unknown = Answered { created: None, intact: true };
        let mut f = InFlight::default();
        f.sent(3, Some(at(1)));
        f.sent(4, Some(at(2)));
        f.sent(6, Some(at(3)));
        assert_eq!(f.answered(2), unknown, "an ACK of an older version answers nothing pushed here");
        assert_eq!(f.answered(4), intact(2), "ACK of 4 also answers 3");
        assert_eq!(f.answered(5), unknown, "5 was never pushed on this stream");
        assert_eq!(f.answered(6), intact(3));
        assert_eq!(f.answered(6), unknown, "already answered");
        for v in 0..100 {
            f.sent(v, Some(at(v)));
        }
        assert_eq!(f.0.len(), InFlight::MAX);
        assert_eq!(f.answered(99), intact(99));
        assert!(f.0.is_empty());
    }

    #[test]
    fn after_a_nack_the_pushes_in_flight_are_not_intact_and_a_repeated_version_is_answered_in_order() {
        let mut f = InFlight::default();
        f.sent(1, None);
        f.sent(2, None);
        // NACK of 1: 2 was diffed from 1, which the proxy does not hold.
        assert!(f.answered(1).intact);
        f.break_chain();
        // The full snapshot of 2 that follows is intact.
        f.sent(2, None);
        assert_eq!(f.answered(2), Answered { created: None, intact: false }, "the increment sent before the NACK");
        assert_eq!(f.answered(2), Answered { created: None, intact: true }, "the full snapshot sent after it");
        assert!(f.0.is_empty());
    }

    #[test]
    fn diff_sends_the_jwks_set_when_it_changes() {
        let a = Snapshot { version: 1, ..Default::default() };
        assert_eq!(
            diff(None, &a, &Scope::Everything).unwrap().jwks,
            Some(pb::JwksSet::default()),
            "always in a full snapshot"
        );
        let jwks: std::collections::BTreeMap<String, String> = [("https://k/jwks".into(), "{}".into())].into();
        let b = Snapshot { version: 2, jwks: Arc::new(jwks.clone()), ..Default::default() };
        let update = diff(Some(&a), &b, &Scope::Everything).unwrap();
        assert_eq!(update.jwks.unwrap().entries, [pb::Jwks { uri: "https://k/jwks".into(), json: "{}".into() }]);
        let c = Snapshot { version: 3, jwks: Arc::new(jwks), ..Default::default() };
        assert!(diff(Some(&b), &c, &Scope::Everything).is_none(), "same set: nothing to send");
    }

    #[test]
    fn diff_sends_the_revocations_when_they_change() {
        let a = Snapshot { version: 1, ..Default::default() };
        assert_eq!(
            diff(None, &a, &Scope::Everything).unwrap().revocations,
            Some(pb::Revocations::default()),
            "always in a full snapshot"
        );
        let list = pb::Revocations {
            identities: vec![pb::RevokedIdentity { spiffe_id: "spiffe://td/ns/a/sa/b".into(), revoked_at_unix: 1 }],
            ..Default::default()
        };
        let b = Snapshot { version: 2, revocations: Arc::new(list.clone()), ..Default::default() };
        assert_eq!(diff(Some(&a), &b, &Scope::Everything).unwrap().revocations, Some(list.clone()));
        let c = Snapshot { version: 3, revocations: Arc::new(list), ..Default::default() };
        assert!(diff(Some(&b), &c, &Scope::Everything).is_none(), "same list: nothing to send");
    }

    #[test]
    fn diff_sends_full_then_changes_only() {
        let mut a = Snapshot { version: 1, ..Default::default() };
        a.workloads.insert("ns/a".into(), workload("a", "10.0.0.1"));
        a.workloads.insert("ns/b".into(), workload("b", "10.0.0.2"));
        a.resources.insert("AuthorizationPolicy/ns/p".into(), resource("p", 1));
        let full = diff(None, &a, &Scope::Everything).unwrap();
        assert!(full.full);
        assert_eq!((full.workloads.len(), full.resources.len()), (2, 1));
        assert!(full.trust_bundle.is_some());

        let mut b = Snapshot { version: 2, trust_bundle: a.trust_bundle.clone(), ..Default::default() };
        b.workloads.insert("ns/a".into(), a.workloads["ns/a"].clone());
        b.workloads.insert("ns/c".into(), workload("c", "10.0.0.3"));
        b.resources.insert("AuthorizationPolicy/ns/p".into(), resource("p", 2));
        let update = diff(Some(&a), &b, &Scope::Everything).unwrap();
        assert!(!update.full);
        assert!(update.trust_bundle.is_none());
        assert_eq!(update.workloads.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(update.removed_workloads, ["ns/b"]);
        assert_eq!(update.resources.len(), 1);
        assert_eq!(update.resources[0].revision, 2);

        let same = Snapshot {
            version: 3,
            trust_bundle: b.trust_bundle.clone(),
            workloads: b.workloads.clone(),
            resources: b.resources.clone(),
            jwks: b.jwks.clone(),
            revocations: b.revocations.clone(),
            ..Default::default()
        };
        assert!(diff(Some(&b), &same, &Scope::Everything).is_none());

        let mut gone = Snapshot {
            version: 4,
            trust_bundle: b.trust_bundle.clone(),
            workloads: b.workloads.clone(),
            ..Default::default()
        };
        gone.trust_bundle.roots.push(vec![1]);
        let update = diff(Some(&b), &gone, &Scope::Everything).unwrap();
        assert_eq!(update.removed_resources.len(), 1);
        assert!(update.trust_bundle.is_some());
    }

    fn namespaced(namespace: &str, name: &str, revision: u64) -> Arc<pb::Resource> {
        Arc::new(pb::Resource {
            key: Some(pb::ResourceKey {
                kind: "AuthorizationPolicy".into(),
                namespace: namespace.into(),
                name: name.into(),
            }),
            revision,
            json: format!("{{\"r\":{revision}}}"),
        })
    }

    #[test]
    fn scoped_diff_sends_only_the_proxys_namespaces_and_the_root_and_the_registry_as_deltas() {
        let scope = Scope::Namespaces(["a".to_owned(), "trellis-system".to_owned()].into());
        let mut one = Snapshot { version: 1, ..Default::default() };
        one.workloads.insert("ns/a".into(), workload("a", "10.0.0.1"));
        for (ns, name) in [("a", "p"), ("b", "p"), ("trellis-system", "mesh")] {
            one.resources.insert(format!("AuthorizationPolicy/{ns}/{name}"), namespaced(ns, name, 1));
        }
        let full = diff(None, &one, &scope).unwrap();
        let names: Vec<String> =
            full.resources.iter().map(|r| r.key.as_ref().map(|k| k.namespace.clone()).unwrap()).collect();
        assert_eq!(names, ["a", "trellis-system"], "b's policy cannot select this proxy's workloads");
        assert_eq!(full.workloads.len(), 1, "the registry is whole");

        // A change in namespace b only: nothing for this proxy.
        let mut two = Snapshot { version: 2, trust_bundle: one.trust_bundle.clone(), ..Default::default() };
        two.workloads = one.workloads.clone();
        two.resources = one.resources.clone();
        two.resources.insert("AuthorizationPolicy/b/p".into(), namespaced("b", "p", 2));
        two.jwks = one.jwks.clone();
        two.revocations = one.revocations.clone();
        assert!(diff(Some(&one), &two, &scope).is_none());
        assert!(diff(Some(&one), &two, &Scope::Everything).is_some(), "control: unscoped, the change goes out");

        // In scope: changed, removed, and one registry entry added; the rest of the registry is not resent.
        let mut three = Snapshot { version: 3, trust_bundle: two.trust_bundle.clone(), ..Default::default() };
        three.workloads = two.workloads.clone();
        three.workloads.insert("ns/c".into(), workload("c", "10.0.0.3"));
        three.resources = two.resources.clone();
        three.resources.insert("AuthorizationPolicy/a/p".into(), namespaced("a", "p", 3));
        three.resources.remove("AuthorizationPolicy/trellis-system/mesh");
        three.resources.remove("AuthorizationPolicy/b/p");
        three.jwks = two.jwks.clone();
        three.revocations = two.revocations.clone();
        let update = diff(Some(&two), &three, &scope).unwrap();
        assert_eq!(update.resources.iter().map(|r| r.revision).collect::<Vec<_>>(), [3]);
        let removed: Vec<&str> = update.removed_resources.iter().map(|k| k.namespace.as_str()).collect();
        assert_eq!(removed, ["trellis-system"], "b's removal is not this proxy's business");
        assert_eq!(update.workloads.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["c"]);
    }
}
