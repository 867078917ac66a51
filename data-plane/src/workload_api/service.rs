//! The `SpiffeWorkloadAPI` gRPC service: every call is checked the same way (the `workload.spiffe.io: true`
//! header, then attestation of the caller's credentials as of this call), and the X.509 streams push again
//! whenever an application SVID is renewed or the trust bundle changes, re-attesting before each push. JWT-SVIDs
//! are signed by the control plane for an identity the caller is attested for; FetchJWTBundles pushes the mesh
//! JWKS whenever it changes; ValidateJWTSVID checks a token against it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use trellis_proto::spiffe::SpiffeId;
use trellis_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use trellis_proto::workload::{self as pb};

use super::attest::Attestor;
use super::jwt;
use super::peer::{Caller, Peer};
use crate::discovery::ControlChannel;
use crate::identity::WorkloadCerts;
use crate::metrics;
use crate::state::{StateStore, TrustBundle};

/// The metadata every Workload API request must carry (SPIFFE Workload API spec, section 6.2): it proves the
/// request was made on purpose by a Workload API client, not forged by a browser or a confused proxy.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

type Pushed<T> = ReceiverStream<Result<T, Status>>;

pub struct Service {
    attestor: Arc<Attestor>,
    /// The application SVIDs (not the proxy's tunnel certificates).
    certs: Arc<WorkloadCerts>,
    state: Arc<StateStore>,
    /// The discovery stream's connection: JWT-SVIDs are signed by the control plane.
    control: ControlChannel,
}

/// How long a FetchJWTSVID waits for the control plane to sign.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);

impl Service {
    pub fn new(
        attestor: Arc<Attestor>,
        certs: Arc<WorkloadCerts>,
        state: Arc<StateStore>,
        control: ControlChannel,
    ) -> Self {
        Self { attestor, certs, state, control }
    }

    /// A refusal after admission: counted with its result label and logged with its reason.
    fn refuse(&self, method: &'static str, admitted: &Admitted, status: Status) -> Status {
        let result = match status.code() {
            tonic::Code::InvalidArgument => "invalid_argument",
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => "unavailable",
            _ => "error",
        };
        metrics::workload_api_call(method, result);
        warn!(method, caller = %describe(&admitted.caller), reason = status.message(), "Workload API request refused");
        status
    }

    /// Asks the control plane for a JWT-SVID of `id` with `audiences`.
    async fn sign_jwt(&self, id: &SpiffeId, audiences: &[String]) -> Result<String, Status> {
        let channel = self
            .control
            .load_full()
            .ok_or_else(|| Status::unavailable("the proxy is not connected to the control plane; try again"))?;
        let mut client = trellis_proto::v1::discovery_client::DiscoveryClient::new((*channel).clone());
        let request =
            trellis_proto::v1::SignJwtSvidRequest { spiffe_id: id.to_string(), audiences: audiences.to_vec() };
        let answer = tokio::time::timeout(SIGN_TIMEOUT, client.sign_jwt_svid(request))
            .await
            .map_err(|_| Status::unavailable("the control plane did not sign within 10s"))?
            .map_err(|s| Status::new(s.code(), format!("control plane: {}", s.message())))?;
        Ok(answer.into_inner().token)
    }

    /// The header, then the caller's identities; a refusal is logged and counted with its reason.
    fn admit<T>(&self, method: &'static str, request: &Request<T>) -> Result<Admitted, Status> {
        let header = request.metadata().get(SECURITY_HEADER).and_then(|v| v.to_str().ok());
        if header != Some("true") {
            metrics::workload_api_call(method, "invalid_argument");
            warn!(method, "Workload API request without the {SECURITY_HEADER} header refused");
            return Err(Status::invalid_argument("security header missing from request"));
        }
        let Some(peer) = request.extensions().get::<Arc<Peer>>().cloned() else {
            return Err(Status::internal("no peer credentials for this connection"));
        };
        let caller = peer.current();
        let ids = self.attestor.attest(&caller);
        if ids.is_empty() {
            metrics::workload_api_call(method, "permission_denied");
            warn!(
                method,
                uid = caller.uid,
                gid = caller.gid,
                pid = ?caller.pid,
                exe = ?caller.exe,
                "Workload API caller matches no workload's attest selectors; refused (PermissionDenied)"
            );
            return Err(Status::permission_denied(format!(
                "no identity issued: the caller ({}) matches no workload's attest selectors",
                describe(&caller)
            )));
        }
        Ok(Admitted { peer, caller, ids })
    }

    /// Refuses a method this proxy does not serve yet, after the same checks as the others.
    fn unimplemented<T>(&self, method: &'static str, request: &Request<T>, why: &str) -> Status {
        if let Err(refusal) = self.admit(method, request) {
            return refusal;
        }
        metrics::workload_api_call(method, "unimplemented");
        Status::unimplemented(why.to_owned())
    }
}

struct Admitted {
    peer: Arc<Peer>,
    caller: Caller,
    ids: Vec<SpiffeId>,
}

fn describe(caller: &Caller) -> String {
    let pid = caller.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
    let exe = caller.exe.as_ref().map_or_else(|| "unknown".to_owned(), |e| e.display().to_string());
    format!("uid {}, gid {}, pid {pid}, exe {exe}", caller.uid, caller.gid)
}

const WIT_NEVER: &str = "WIT-SVIDs are not served by this proxy";

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = Pushed<pb::X509svidResponse>;
    type FetchX509BundlesStream = Pushed<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Pushed<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = Pushed<pb::WitsvidResponse>;
    type FetchWITBundlesStream = Pushed<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let admitted = self.admit("FetchX509SVID", &request)?;
        metrics::workload_api_call("FetchX509SVID", "ok");
        let (tx, rx) = mpsc::channel(1);
        let pusher = Pusher { attestor: self.attestor.clone(), certs: self.certs.clone(), state: self.state.clone() };
        tokio::spawn(pusher.svids(admitted, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let admitted = self.admit("FetchX509Bundles", &request)?;
        metrics::workload_api_call("FetchX509Bundles", "ok");
        let (tx, rx) = mpsc::channel(1);
        let pusher = Pusher { attestor: self.attestor.clone(), certs: self.certs.clone(), state: self.state.clone() };
        tokio::spawn(pusher.bundles(admitted, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const METHOD: &str = "FetchJWTSVID";
        let admitted = self.admit(METHOD, &request)?;
        let request = request.into_inner();
        if request.audience.is_empty() || request.audience.iter().any(String::is_empty) {
            let status = Status::invalid_argument("audience is required (at least one, none empty)");
            return Err(self.refuse(METHOD, &admitted, status));
        }
        let ids: Vec<SpiffeId> = if request.spiffe_id.is_empty() {
            admitted.ids.clone()
        } else {
            match admitted.ids.iter().find(|id| id.to_string() == request.spiffe_id) {
                Some(id) => vec![id.clone()],
                None => {
                    let status = Status::permission_denied(format!(
                        "the caller ({}) is not attested for {}",
                        describe(&admitted.caller),
                        request.spiffe_id
                    ));
                    return Err(self.refuse(METHOD, &admitted, status));
                }
            }
        };
        let mut svids = Vec::with_capacity(ids.len());
        for id in &ids {
            let token = match self.sign_jwt(id, &request.audience).await {
                Ok(token) => token,
                Err(status) => return Err(self.refuse(METHOD, &admitted, status)),
            };
            metrics::workload_api_jwt_svid_issued(id);
            info!(
                uid = admitted.caller.uid,
                pid = ?admitted.caller.pid,
                exe = ?admitted.caller.exe,
                spiffe_id = %id,
                audience = ?request.audience,
                "Workload API: JWT-SVID sent"
            );
            svids.push(pb::Jwtsvid { spiffe_id: id.to_string(), svid: token, hint: String::new() });
        }
        metrics::workload_api_call(METHOD, "ok");
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let admitted = self.admit("FetchJWTBundles", &request)?;
        metrics::workload_api_call("FetchJWTBundles", "ok");
        let (tx, rx) = mpsc::channel(1);
        let pusher = Pusher { attestor: self.attestor.clone(), certs: self.certs.clone(), state: self.state.clone() };
        tokio::spawn(pusher.jwt_bundles(admitted, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        const METHOD: &str = "ValidateJWTSVID";
        let admitted = self.admit(METHOD, &request)?;
        let request = request.into_inner();
        if request.audience.is_empty() {
            return Err(self.refuse(METHOD, &admitted, Status::invalid_argument("audience is required")));
        }
        if request.svid.is_empty() {
            return Err(self.refuse(METHOD, &admitted, Status::invalid_argument("svid is required")));
        }
        let state = self.state.load();
        match jwt::validate(&request.svid, &request.audience, &state.mesh_jwks, &state.trust_domain) {
            Ok(valid) => {
                metrics::workload_api_call(METHOD, "ok");
                Ok(Response::new(pb::ValidateJwtsvidResponse {
                    spiffe_id: valid.spiffe_id.to_string(),
                    claims: Some(jwt::to_struct(&valid.claims)),
                }))
            }
            Err(e) => {
                let status = Status::invalid_argument(format!("JWT-SVID refused: {e}"));
                Err(self.refuse(METHOD, &admitted, status))
            }
        }
    }

    async fn fetch_witsvid(
        &self,
        request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(self.unimplemented("FetchWITSVID", &request, WIT_NEVER))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(self.unimplemented("FetchWITBundles", &request, WIT_NEVER))
    }
}

/// One open stream's task: sends the current answer whenever it differs from the last one sent, until the caller
/// goes away or stops matching.
struct Pusher {
    attestor: Arc<Attestor>,
    certs: Arc<WorkloadCerts>,
    state: Arc<StateStore>,
}

impl Pusher {
    async fn svids(self, admitted: Admitted, tx: mpsc::Sender<Result<pb::X509svidResponse, Status>>) {
        let mut last: Option<Vec<String>> = None;
        self.follow(&admitted, &tx, |bundle, _| {
            let roots = bundle.root_ders();
            let bundle_der: Vec<u8> = roots.iter().flat_map(|r| r.iter().copied()).collect();
            let mut serials = Vec::new();
            let svids: Vec<pb::X509svid> = (admitted.ids.iter())
                .filter_map(|id| self.certs.get(id))
                .map(|cert| {
                    serials.push(cert.info.serial.clone());
                    pb::X509svid {
                        spiffe_id: cert.spiffe_id.to_string(),
                        // Leaf and intermediates; the roots travel in `bundle`.
                        x509_svid: (cert.chain.iter())
                            .filter(|c| !roots.contains(c))
                            .flat_map(|c| c.iter().copied())
                            .collect(),
                        x509_svid_key: cert.key().secret_der().to_vec(),
                        bundle: bundle_der.clone(),
                        hint: String::new(),
                    }
                })
                .collect();
            // Nothing until an SVID is issued; again only when a serial or the bundle changed.
            serials.push(hex::encode(&bundle_der));
            if svids.is_empty() || last.as_ref() == Some(&serials) {
                return None;
            }
            info!(
                uid = admitted.caller.uid,
                pid = ?admitted.caller.pid,
                exe = ?admitted.caller.exe,
                spiffe_ids = ?svids.iter().map(|s| s.spiffe_id.as_str()).collect::<Vec<_>>(),
                serials = ?&serials[..serials.len() - 1],
                "Workload API: X.509-SVIDs sent"
            );
            last = Some(serials);
            Some(pb::X509svidResponse { svids, crl: Vec::new(), federated_bundles: Default::default() })
        })
        .await
    }

    async fn bundles(self, admitted: Admitted, tx: mpsc::Sender<Result<pb::X509BundlesResponse, Status>>) {
        let mut last: Option<Vec<u8>> = None;
        self.follow(&admitted, &tx, |bundle, _| {
            let der: Vec<u8> = bundle.roots.iter().flat_map(|r| r.der.iter().copied()).collect();
            if last.as_ref() == Some(&der) {
                return None;
            }
            last = Some(der.clone());
            let key = format!("spiffe://{}", bundle.trust_domain);
            Some(pb::X509BundlesResponse { crl: Vec::new(), bundles: [(key, der)].into_iter().collect() })
        })
        .await
    }

    async fn jwt_bundles(self, admitted: Admitted, tx: mpsc::Sender<Result<pb::JwtBundlesResponse, Status>>) {
        let mut last: Option<String> = None;
        self.follow(&admitted, &tx, |bundle, jwks| {
            // Nothing until the control plane sent keys; again only when they change.
            if jwks.is_empty() || last.as_deref() == Some(jwks) {
                return None;
            }
            last = Some(jwks.to_owned());
            let key = format!("spiffe://{}", bundle.trust_domain);
            Some(pb::JwtBundlesResponse { bundles: [(key, jwks.as_bytes().to_vec())].into_iter().collect() })
        })
        .await
    }

    /// The loop the streams share: wake on a certificate or state change, re-attest, build, send.
    async fn follow<T>(
        &self,
        admitted: &Admitted,
        tx: &mpsc::Sender<Result<T, Status>>,
        mut build: impl FnMut(&TrustBundle, &str) -> Option<T>,
    ) {
        let mut cert_changes = self.certs.subscribe();
        let mut state_changes = self.state.subscribe();
        loop {
            // The caller must still be who it was when the stream opened (an exec, a reused pid: see peer.rs).
            let caller = admitted.peer.current();
            if self.attestor.attest(&caller) != admitted.ids {
                warn!(
                    before = %describe(&admitted.caller),
                    now = %describe(&caller),
                    "Workload API caller no longer matches its identities; stream ended"
                );
                let _ = tx.send(Err(Status::permission_denied("the caller no longer matches its identities"))).await;
                return;
            }
            let message = {
                let state = self.state.load();
                state.trust_bundle.as_deref().and_then(|b| build(b, state.mesh_jwks.as_str()))
            };
            if let Some(message) = message
                && tx.send(Ok(message)).await.is_err()
            {
                return;
            }
            tokio::select! {
                changed = cert_changes.changed() => if changed.is_err() { return },
                changed = state_changes.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    }
}
