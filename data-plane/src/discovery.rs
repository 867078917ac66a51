//! The Discovery stream client: one long-lived bidirectional stream to the control plane carrying the
//! Hello, CSRs and ACK/NACKs up, and config updates, certificates and renewal requests down. Reconnects
//! with backoff for as long as the proxy runs, moving on to the next replica of `controlPlane.addresses` after
//! each lost stream or failed connect, and resuming from the version it last applied (the control plane answers
//! with a delta when it knows that version).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{debug, error, info, warn};
use trellis_proto::tls::{self, ServerTrust};
use trellis_proto::v1::discovery_client::DiscoveryClient;
use trellis_proto::v1::discovery_request::Message as Up;
use trellis_proto::v1::discovery_response::Message as Down;
use trellis_proto::v1::{Ack, CertificatesHeld, ConfigUpdate, DiscoveryRequest, HeldCertificate, Hello};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::identity::certs::rfc3339;
use crate::identity::node_renewal::{NodeRenewal, NodeRenewalError};
use crate::identity::workload::IssueError;
use crate::identity::{CertManager, NodeCredential, node};
use crate::metrics::{self, RenewalKind, RenewalOutcome};
use crate::state::{self, StateStore};
use crate::{connect_error, shutdown_requested};

/// How long opening a stream (up to the control plane's response headers) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// A stream that lasted this long counts as healthy, so the next reconnect starts with a short delay.
const HEALTHY_STREAM: Duration = Duration::from_secs(30);
/// While the control plane is unreachable, how often a TCP connect checks whether it is back, so that the proxy
/// redials at once instead of at the end of its backoff step.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a stream ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot reach the control plane: {0}")]
    Connect(String),
    #[error("the control plane ended the stream: {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("the control plane closed the stream")]
    Closed,
    #[error("the control plane did not answer the Hello within {OPEN_TIMEOUT:?}")]
    OpenTimeout,
}

impl From<tonic::Status> for StreamError {
    fn from(status: tonic::Status) -> Self {
        StreamError::Status { code: status.code(), message: status.message().to_owned() }
    }
}

/// The connection of the open discovery stream, for unary calls on the same authenticated channel (JWT-SVIDs for
/// the Workload API); empty while the proxy is not connected.
pub type ControlChannel = Arc<arc_swap::ArcSwapOption<tonic::transport::Channel>>;

pub struct Discovery {
    config: Arc<Config>,
    /// Set while a stream is open (see [`ControlChannel`]).
    channel_slot: ControlChannel,
    /// The node credential the next connection presents (replaced by each renewal).
    node: Arc<NodeCredential>,
    /// Where the admin endpoint reads the node credential in use.
    node_slot: Arc<arc_swap::ArcSwapOption<NodeCredential>>,
    node_renewal: NodeRenewal,
    state: Arc<StateStore>,
    certs: CertManager,
    /// Application SVIDs (Workload API): separate keys, same identities, same stream; `None` when no workload is
    /// attested. Its request IDs start at [`APP_REQUEST_IDS`].
    app_certs: Option<CertManager>,
    /// Roots last written to the state directory, to persist rotations only when they change.
    persisted_roots: Vec<CertificateDer<'static>>,
    /// Index in `controlPlane.addresses` of the replica the next stream dials.
    replica: usize,
    /// The lineage (`ConfigUpdate.lineage`) of the state the proxy holds, once an update from the control plane
    /// was applied: with the state's version, what the next stream asks to resume from. `None` while the proxy
    /// serves only what it stored on disk.
    lineage: Option<String>,
}

/// One connected stream's outbound side.
struct Session {
    tx: mpsc::UnboundedSender<DiscoveryRequest>,
    /// The control plane promises a full snapshot first on every stream, or a delta when it grants the resume
    /// the Hello asked for.
    seen_update: bool,
    /// The lineage this stream asked to resume within, if any.
    resuming: Option<String>,
}

impl Session {
    fn send(&self, message: Up) -> Result<(), StreamError> {
        self.tx.send(DiscoveryRequest { message: Some(message) }).map_err(|_| StreamError::Closed)
    }
}

impl Discovery {
    pub fn new(
        config: Arc<Config>,
        node: Arc<NodeCredential>,
        node_slot: Arc<arc_swap::ArcSwapOption<NodeCredential>>,
        state: Arc<StateStore>,
        certs: CertManager,
    ) -> Self {
        let persisted_roots = node.roots.clone();
        let node_renewal = NodeRenewal::new(&node, Instant::now(), SystemTime::now());
        Self {
            config,
            channel_slot: ControlChannel::default(),
            node,
            node_slot,
            node_renewal,
            state,
            certs,
            app_certs: None,
            persisted_roots,
            replica: 0,
            lineage: None,
        }
    }

    /// Publishes each open stream's channel in `slot`.
    pub fn with_channel_slot(mut self, slot: ControlChannel) -> Self {
        self.channel_slot = slot;
        self
    }

    /// Also keeps the Workload API's application SVIDs issued and renewed over this stream.
    pub fn with_app_certs(mut self, app_certs: Option<CertManager>) -> Self {
        self.app_certs = app_certs;
        self
    }

    fn managers(&mut self) -> impl Iterator<Item = (&mut CertManager, Purpose)> {
        std::iter::once((&mut self.certs, Purpose::Tunnel)).chain(self.app_certs.as_mut().map(|m| (m, Purpose::App)))
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        let app = self.app_certs.as_ref().and_then(CertManager::next_deadline);
        self.certs.next_deadline().into_iter().chain(app).min()
    }

    /// Runs until shutdown is requested.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::control_plane();
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                _ = shutdown_requested(&mut shutdown) => return,
                result = self.stream() => result,
            };
            // A stream that stayed up a while was healthy: start the next round of retries small. One that
            // fails right after opening (e.g. a refused Hello) keeps backing off.
            if started.elapsed() >= HEALTHY_STREAM {
                backoff.reset();
            }
            match &result {
                StreamError::Status { code, message } => {
                    error!(code = ?code, "control plane ended the discovery stream: {message}")
                }
                other => warn!(error = %other, address = %self.address(), "discovery stream failed"),
            }
            // On to the next replica (the same one when only one is configured); the backoff spaces attempts.
            self.replica = (self.replica + 1) % self.config.control_plane.addresses.len();
            for (manager, _) in self.managers() {
                manager.stream_lost(Instant::now());
            }
            self.node_renewal.stream_lost(Instant::now());
            // Probing helps only when nothing answered: a control plane that answers and refuses (a Hello it
            // rejects, a status) is retried on the backoff alone, or the probe would turn the backoff into a loop.
            let probe = matches!(result, StreamError::Connect(_));
            if !self.wait(backoff.next_delay(), probe, &mut shutdown).await {
                return;
            }
        }
    }

    /// Sleeps before reconnecting, still withdrawing certificates that expire meanwhile; with `probe`, ends early
    /// once a TCP connect to the control plane succeeds (it is back). False on shutdown.
    async fn wait(&mut self, delay: Duration, probe: bool, shutdown: &mut watch::Receiver<bool>) -> bool {
        info!(retry_in = ?delay, "reconnecting to the control plane");
        let until = tokio::time::Instant::now() + delay;
        let mut next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
        loop {
            let mut next_expiry = None;
            for (manager, purpose) in self.managers() {
                for id in manager.expire(Instant::now()) {
                    error!(spiffe_id = %id, "{} expired before it could be renewed; withdrawn", purpose.what());
                }
                next_expiry = next_expiry.into_iter().chain(manager.next_expiry()).min();
            }
            let mut wake = next_expiry.map_or(until, |at| until.min(at.into()));
            if probe {
                wake = wake.min(next_probe);
            }
            tokio::select! {
                _ = shutdown_requested(shutdown) => return false,
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return true;
            }
            if probe && now >= next_probe {
                // Every replica, from the next one due: the first that accepts a connection is dialled now.
                let addresses = &self.config.control_plane.addresses;
                for offset in 0..addresses.len() {
                    let index = (self.replica + offset) % addresses.len();
                    let address = addresses[index].clone();
                    let reachable = tokio::select! {
                        _ = shutdown_requested(shutdown) => return false,
                        probe = tokio::time::timeout(PROBE_TIMEOUT, crate::sockets::connect_host(address.clone())) => {
                            matches!(probe, Ok(Ok(_)))
                        }
                    };
                    if reachable {
                        info!(%address, "a control-plane replica accepts connections; reconnecting now");
                        self.replica = index;
                        return true;
                    }
                }
                next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
            }
        }
    }

    /// One stream, from connect to failure. Never returns Ok: shutdown cancels it from outside.
    async fn stream(&mut self) -> StreamError {
        match self.try_stream().await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn try_stream(&mut self) -> Result<std::convert::Infallible, StreamError> {
        // Trust the live bundle (it follows root rotations), or the stored one before the first snapshot.
        let roots = self.state.load().trust_bundle.as_ref().map_or_else(|| self.node.roots.clone(), |b| b.root_ders());
        let tls_config = tls::client_config(ServerTrust::Roots(roots), Some(self.node.client_identity()))?;
        let address = self.address().to_owned();
        let channel = tls::connect_with(&address, tls_config.into(), crate::sockets::connect_host)
            .await
            .map_err(|e| StreamError::Connect(connect_error(&e)))?;

        let (tx, rx) = mpsc::unbounded_channel();
        let mut session = Session { tx, seen_update: false, resuming: self.lineage.clone() };
        // Queued before the call: the control plane may wait for the Hello before it answers with headers.
        session.send(Up::Hello(self.hello()))?;
        let mut client = DiscoveryClient::new(channel.clone());
        let call = client.stream(UnboundedReceiverStream::new(rx));
        let mut inbound =
            tokio::time::timeout(OPEN_TIMEOUT, call).await.map_err(|_| StreamError::OpenTimeout)??.into_inner();
        info!(address = %address, replica = self.replica, "discovery stream open");
        metrics::control_plane_connected(true);
        metrics::control_plane_replica(&self.config.control_plane.addresses, Some(&address));
        let config = self.config.clone();
        self.channel_slot.store(Some(Arc::new(channel.clone())));
        let slot = self.channel_slot.clone();
        let _disconnected = OnDrop(move || {
            slot.store(None);
            metrics::control_plane_connected(false);
            metrics::control_plane_replica(&config.control_plane.addresses, None);
        });
        self.report_held(&session)?;

        loop {
            self.request_certificates(&session)?;
            self.renew_node_credential(&session)?;
            let deadline = [self.next_deadline(), self.node_renewal.next_deadline()]
                .into_iter()
                .flatten()
                .min()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(far_future)) => {}
                message = inbound.message() => {
                    let Some(response) = message? else { return Err(StreamError::Closed) };
                    self.on_message(&mut session, response.message)?;
                }
            }
        }
    }

    fn on_message(&mut self, session: &mut Session, message: Option<Down>) -> Result<(), StreamError> {
        match message {
            Some(Down::Update(update)) => return self.on_update(session, update),
            Some(Down::Certificate(answer)) => {
                let (manager, purpose) = match &mut self.app_certs {
                    Some(app) if app.expects(answer.request_id) => (app, Purpose::App),
                    _ => (&mut self.certs, Purpose::Tunnel),
                };
                match manager.on_response(answer, Instant::now(), SystemTime::now()) {
                    Ok(Some(cert)) => {
                        metrics::certificate_rotation(&cert.spiffe_id, true);
                        metrics::certificate_renewal(RenewalKind::Workload, RenewalOutcome::Renewed);
                        if purpose == Purpose::App {
                            metrics::workload_api_svid_issued(&cert.spiffe_id);
                        }
                        info!(
                            spiffe_id = %cert.spiffe_id,
                            serial = %cert.info.serial,
                            not_after = %rfc3339(cert.info.not_after),
                            "{} installed", purpose.what()
                        );
                        self.report_held(session)?;
                    }
                    Ok(None) => debug!("answer to an abandoned CSR ignored"),
                    Err(e) => {
                        metrics::certificate_rotation(e.spiffe_id(), false);
                        metrics::certificate_renewal(RenewalKind::Workload, issue_outcome(&e));
                        error!(error = %e, "{} not issued", purpose.what())
                    }
                }
            }
            Some(Down::Renew(renew)) => {
                let mut renewing = 0;
                for (manager, _) in self.managers() {
                    renewing += manager.renew_now(&renew.spiffe_ids, Instant::now()).len();
                }
                let node_id = self.node.spiffe_id.to_string();
                let node = renew.spiffe_ids.is_empty() || renew.spiffe_ids.contains(&node_id);
                if node {
                    self.node_renewal.renew_now(Instant::now());
                }
                info!(requested = ?renew.spiffe_ids, renewing, node, "control plane asked for renewal");
            }
            Some(Down::NodeCredential(answer)) => {
                match self.node_renewal.on_response(answer, &self.node, Instant::now(), SystemTime::now()) {
                    Ok(Some(renewed)) => {
                        metrics::certificate_renewal(RenewalKind::Node, RenewalOutcome::Renewed);
                        self.install_node_credential(renewed, session)?
                    }
                    Ok(None) => debug!("answer to an abandoned node credential renewal ignored"),
                    Err(e) => {
                        let outcome = match e {
                            NodeRenewalError::Refused(_) => RenewalOutcome::Refused,
                            _ => RenewalOutcome::Failed,
                        };
                        metrics::certificate_renewal(RenewalKind::Node, outcome);
                        error!(error = %e, "node credential not renewed; the current one stays in use")
                    }
                }
            }
            None => debug!("empty message from the control plane ignored"),
        }
        Ok(())
    }

    /// A renewed node credential: stored (atomically) for the next start, used by the next connection. The
    /// stream that brought it stays up: TLS checked the old one at its handshake.
    fn install_node_credential(&mut self, renewed: NodeCredential, session: &Session) -> Result<(), StreamError> {
        if let Err(e) = renewed.save_renewed(&self.config.state_dir) {
            error!(error = %e, "cannot store the renewed node credential; it is used until the proxy stops");
        }
        info!(
            serial = %renewed.info.serial,
            not_after = %rfc3339(renewed.info.not_after),
            "node credential renewed"
        );
        let renewed = Arc::new(renewed);
        self.node_slot.store(Some(renewed.clone()));
        self.node = renewed;
        self.report_held(session)
    }

    fn renew_node_credential(&mut self, session: &Session) -> Result<(), StreamError> {
        match self.node_renewal.step(Instant::now()) {
            Ok(Some(request)) => {
                debug!(request_id = request.request_id, "sending the node credential CSR");
                session.send(Up::NodeCredentialRequest(request))
            }
            Ok(None) => Ok(()),
            Err(e) => {
                metrics::certificate_renewal(RenewalKind::Node, RenewalOutcome::Failed);
                warn!(error = %e, "node credential renewal failed; retrying");
                Ok(())
            }
        }
    }

    /// Tells the control plane which certificates this proxy uses (its own and its applications'), and which CA
    /// signed each (a root rotation
    /// waits for these reports).
    fn report_held(&self, session: &Session) -> Result<(), StreamError> {
        let held = |spiffe_id: String, chain: &[CertificateDer<'_>], info: &crate::identity::certs::CertInfo| {
            HeldCertificate {
                spiffe_id,
                serial: info.serial.clone(),
                issuer_sha256: chain.get(1).map(|ca| sha256_hex(ca)).unwrap_or_default(),
                not_after_unix: info
                    .not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            }
        };
        // Tunnel certificates and application SVIDs (Workload API, svidFiles) alike: a root rotation must wait for
        // the applications' certificates too, or it would retire the root they chain to.
        let mut certificates: Vec<HeldCertificate> = (std::iter::once(&self.certs).chain(self.app_certs.as_ref()))
            .flat_map(|manager| manager.certs().all())
            .map(|c| held(c.spiffe_id.to_string(), &c.chain, &c.info))
            .collect();
        certificates.push(held(self.node.spiffe_id.to_string(), &self.node.chain, &self.node.info));
        session.send(Up::Held(CertificatesHeld { certificates }))
    }

    /// The replica the next (or current) stream dials.
    fn address(&self) -> &str {
        &self.config.control_plane.addresses[self.replica]
    }

    fn hello(&self) -> Hello {
        let (resume_lineage, resume_version) = match &self.lineage {
            Some(lineage) => (lineage.clone(), self.state.load().version),
            None => (String::new(), 0),
        };
        Hello {
            workloads: self.config.workloads.iter().map(|w| w.to_proto()).collect(),
            hbone_address: self.config.hbone_address.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            resume_version,
            resume_lineage,
            root_namespace: self.config.root_namespace.clone(),
        }
    }

    /// Sends CSRs for identities that are due and logs what the certificate schedule reports.
    fn request_certificates(&mut self, session: &Session) -> Result<(), StreamError> {
        for (manager, purpose) in self.managers() {
            let step = manager.step(Instant::now());
            for id in step.expired {
                error!(spiffe_id = %id, "{} expired before it could be renewed; withdrawn", purpose.what());
            }
            for failure in step.failures {
                metrics::certificate_rotation(failure.spiffe_id(), false);
                metrics::certificate_renewal(RenewalKind::Workload, issue_outcome(&failure));
                error!(error = %failure, "{} not issued", purpose.what());
            }
            for request in step.requests {
                debug!(request_id = request.request_id, ?purpose, "sending CSR");
                session.send(Up::CertificateRequest(request))?;
            }
        }
        Ok(())
    }

    /// Applies an update to a copy of the state; swaps it in and ACKs, or keeps the old state and NACKs.
    fn on_update(&mut self, session: &mut Session, update: ConfigUpdate) -> Result<(), StreamError> {
        let version = update.version;
        let current = self.state.load();
        let resumed = !session.seen_update
            && !update.full
            && session.resuming.as_deref().is_some_and(|lineage| lineage == update.lineage);
        let result = if !session.seen_update && !update.full && !resumed {
            Err(("protocol", "the first update on a stream must be a full snapshot or a resume asked for".to_owned()))
        } else {
            state::injected_refusal(&update)
                .and_then(|()| state::apply(&current, &update))
                .map_err(|e| (e.kind(), e.to_string()))
        };
        session.seen_update = true;
        let error = match result {
            Ok(next) => {
                info!(
                    version,
                    full = update.full,
                    resumed,
                    workloads = next.workloads.len(),
                    resources = next.resources.len(),
                    "config applied"
                );
                if !update.lineage.is_empty() {
                    self.lineage = Some(update.lineage.clone());
                }
                if let Some(bundle) = &next.trust_bundle {
                    self.persist_roots(bundle.root_ders());
                }
                self.state.store(next);
                metrics::config_update(true);
                (String::new(), "")
            }
            Err((kind, reason)) => {
                warn!(version, error = %reason, "config update rejected (NACK); keeping version {}", current.version);
                metrics::config_update(false);
                (reason, kind)
            }
        };
        let (error, reason) = error;
        session.send(Up::Ack(Ack { version, error, reason: reason.to_owned() }))
    }

    fn persist_roots(&mut self, roots: Vec<CertificateDer<'static>>) {
        if roots == self.persisted_roots {
            return;
        }
        match node::save_trust_bundle(&self.config.state_dir, &roots) {
            Ok(()) => {
                info!(roots = roots.len(), "trust bundle changed; stored for the next start");
                self.persisted_roots = roots;
            }
            Err(e) => warn!(error = %e, "cannot store the new trust bundle"),
        }
    }
}

/// First request ID of the application-SVID manager: far above any the tunnel manager reaches, so the two never
/// collide on the stream.
pub const APP_REQUEST_IDS: u64 = 1 << 62;

/// Which certificates a manager keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The proxy's own, for tunnels.
    Tunnel,
    /// Handed to applications by the Workload API.
    App,
}

impl Purpose {
    fn what(self) -> &'static str {
        match self {
            Purpose::Tunnel => "workload certificate",
            Purpose::App => "application SVID (Workload API)",
        }
    }
}

/// Runs a closure when dropped: marks the stream closed however `try_stream` returns.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// A workload certificate not obtained: refused by the control plane, or failed here.
fn issue_outcome(e: &IssueError) -> RenewalOutcome {
    match e {
        IssueError::Refused { .. } => RenewalOutcome::Refused,
        IssueError::Invalid { .. } | IssueError::TimedOut(_) => RenewalOutcome::Failed,
    }
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}
