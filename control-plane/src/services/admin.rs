//! The Admin service: resources, tokens, nodes and proxy status, for the admin credential only.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use trellis_proto::v1 as pb;

use super::{Shared, rotation};
use crate::auth;
use crate::mesh::{CaMaterial, Mesh, RotateRequest};
use crate::records::{self, NodeRecord, ResourceRecord, TokenRecord};
use crate::status::StreamCommand;
use crate::store::Table;

pub struct AdminService {
    shared: Shared,
    /// Bounds how many documents texts are parsed at once (each on a blocking thread).
    parsing: Arc<Semaphore>,
}

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_ADMIN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Texts parsed at once; further applies wait their turn without holding a thread.
const PARSING_AT_ONCE: usize = 2;

impl AdminService {
    pub fn new(shared: Shared) -> Self {
        Self { shared, parsing: Arc::new(Semaphore::new(PARSING_AT_ONCE)) }
    }

    /// The calling admin's name: checked on every call (not per connection), so a revoked admin is refused at once,
    /// also on a connection it opened before.
    fn authorize<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let name = auth::require_admin(request, self.shared.mesh.trust_domain())?;
        self.shared.mesh.active_admin(&name)?;
        Ok(name)
    }

    /// Runs `work` (parsing and validating a text, then writing the store) on a blocking thread, at most
    /// [`PARSING_AT_ONCE`] at a time: the async workers keep serving discovery streams, renewals and other calls
    /// meanwhile, however long a large text takes.
    async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Mesh) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let permit = self.parsing.clone().acquire_owned().await.map_err(|e| Status::internal(e.to_string()))?;
        let mesh = self.shared.mesh.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&mesh)
        })
        .await
        .map_err(|e| Status::internal(format!("parsing task: {e}")))?
    }

    fn resources(&self) -> Result<Vec<ResourceRecord>, Status> {
        records::load_all(self.shared.mesh.store(), Table::Resources).map_err(|e| Status::internal(e.to_string()))
    }
}

/// How to find out whether an apply whose outcome is unknown was applied (`MeshError::status_checked`).
const APPLY_CHECK: &str = "`trellisctl apply --dry-run -f FILE` once the store answers (every document `unchanged`: \
                           it was applied; applying it again is safe either way)";
const DELETE_CHECK: &str = "`trellisctl get KIND NAME -n NAMESPACE` once the store answers (not found: it was deleted; \
                            deleting again is safe either way)";

fn to_pb(r: ResourceRecord) -> pb::Resource {
    pb::Resource {
        key: Some(pb::ResourceKey { kind: r.kind, namespace: r.namespace, name: r.name }),
        revision: r.revision,
        json: r.json,
    }
}

fn parse_kind(kind: &str) -> Result<trellis_policy::Kind, Status> {
    kind.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "unknown kind {kind:?} (expected AuthorizationPolicy, PeerAuthentication or RequestAuthentication)"
        ))
    })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn apply(&self, request: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        tracing::info!(bytes = request.documents.len(), dry_run = request.dry_run, "apply received");
        let response = self
            .off_runtime(move |mesh| {
                if request.dry_run {
                    let (results, changes) =
                        mesh.apply_dry_run(&request.documents, trellis_policy::DEFAULT_ROOT_NAMESPACE)?;
                    return Ok(pb::ApplyResponse { results, changes });
                }
                let results = mesh.apply(&request.documents).map_err(|e| e.status_checked(APPLY_CHECK))?;
                Ok(pb::ApplyResponse { results, changes: vec![] })
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let deleted = self
            .off_runtime(move |mesh| {
                let mut keys = req.keys;
                if !req.documents.trim().is_empty() {
                    let parsed = trellis_policy::parse_keys(&req.documents)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    keys.extend(parsed.into_iter().map(|k| pb::ResourceKey {
                        kind: k.kind.to_string(),
                        namespace: k.namespace,
                        name: k.name,
                    }));
                }
                for key in &mut keys {
                    key.kind = parse_kind(&key.kind)?.to_string();
                }
                mesh.delete(&keys).map_err(|e| e.status_checked(DELETE_CHECK))
            })
            .await?;
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Resource>, Status> {
        self.authorize(&request)?;
        let key = request.into_inner().key.ok_or_else(|| Status::invalid_argument("key is required"))?;
        let kind = parse_kind(&key.kind)?;
        let store_key = records::resource_store_key(kind.as_str(), &key.namespace, &key.name);
        let record: Option<ResourceRecord> = records::load(self.shared.mesh.store(), Table::Resources, &store_key)
            .map_err(|e| Status::internal(e.to_string()))?;
        record
            .map(|r| Response::new(to_pb(r)))
            .ok_or_else(|| Status::not_found(format!("{kind} {}/{} not found", key.namespace, key.name)))
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let kind = if req.kind.is_empty() { None } else { Some(parse_kind(&req.kind)?.to_string()) };
        let resources = self
            .resources()?
            .into_iter()
            .filter(|r| kind.as_ref().is_none_or(|k| &r.kind == k))
            .filter(|r| req.namespace.is_empty() || r.namespace == req.namespace)
            .map(to_pb)
            .collect();
        Ok(Response::new(pb::ListResponse { resources }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let ttl = if req.ttl_seconds == 0 { DEFAULT_TOKEN_TTL } else { Duration::from_secs(req.ttl_seconds) };
        let (token, record) = self.shared.mesh.create_token(&req.node, req.namespaces, ttl, req.reusable)?;
        let ca_pin =
            trellis_proto::tls::ca_pin(self.shared.mesh.ca().root()).map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(id = %record.id, node = %record.node, "join token created");
        Ok(Response::new(pb::CreateTokenResponse { token, id: record.id, ca_pin, expires_at_unix: record.expires_at }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.authorize(&request)?;
        let mut tokens: Vec<TokenRecord> =
            records::load_all(self.shared.mesh.store(), Table::Tokens).map_err(|e| Status::internal(e.to_string()))?;
        tokens.sort_by_key(|t| t.created_at);
        let tokens = tokens
            .into_iter()
            .map(|t| pb::TokenInfo {
                id: t.id,
                node: t.node,
                namespaces: t.namespaces,
                expires_at_unix: t.expires_at,
                reusable: t.reusable,
                uses: t.uses,
                revoked: t.revoked,
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        self.authorize(&request)?;
        self.shared.mesh.revoke_token(&request.into_inner().id)?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.authorize(&request)?;
        let nodes: Vec<NodeRecord> =
            records::load_all(self.shared.mesh.store(), Table::Nodes).map_err(|e| Status::internal(e.to_string()))?;
        let snapshot = self.shared.mesh.current();
        let nodes = nodes
            .into_iter()
            .map(|n| pb::NodeInfo {
                connected: self.shared.proxies.is_connected(&n.name),
                workloads: snapshot
                    .workloads
                    .iter()
                    .filter(|(_, w)| w.node == n.name)
                    .map(|(k, _)| k.clone())
                    .collect(),
                name: n.name,
                namespaces: n.namespaces,
                joined_at_unix: n.joined_at,
                revoked: n.revoked,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        self.authorize(&request)?;
        let name = request.into_inner().name;
        self.shared.mesh.revoke_node(&name)?;
        // Its proxies' peers close its connections when they apply the revocation (pushed by `revoke_node`); its
        // own stream ends here.
        self.shared.proxies.command(&name, StreamCommand::Disconnect(format!("node {name:?} was revoked")));
        Ok(Response::new(pb::RevokeNodeResponse {}))
    }

    async fn proxy_status(
        &self,
        request: Request<pb::ProxyStatusRequest>,
    ) -> Result<Response<pb::ProxyStatusResponse>, Status> {
        self.authorize(&request)?;
        let shared = self.shared.clone();
        // Other replicas' proxies are read from the store: off the async workers.
        let proxies = tokio::task::spawn_blocking(move || super::mesh_status::list(&shared))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ProxyStatusResponse {
            current_version: self.shared.mesh.current().version,
            proxies: proxies.into_iter().map(|p| p.status).collect(),
        }))
    }

    async fn renew_certificates(
        &self,
        request: Request<pb::RenewCertificatesRequest>,
    ) -> Result<Response<pb::RenewCertificatesResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        if !self.shared.proxies.command(&req.node, StreamCommand::Renew(req.spiffe_ids)) {
            return Err(Status::failed_precondition(format!("node {:?} is not connected", req.node)));
        }
        Ok(Response::new(pb::RenewCertificatesResponse {}))
    }

    async fn rotate_ca(&self, request: Request<pb::RotateCaRequest>) -> Result<Response<pb::CaStatusResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let material = match (req.ca_cert_pem.is_empty(), req.ca_key_pem.is_empty()) {
            (true, true) if req.ca_chain_pem.is_empty() => None,
            (false, false) => Some(CaMaterial {
                cert_pem: req.ca_cert_pem,
                key_pem: req.ca_key_pem,
                chain_pem: (!req.ca_chain_pem.is_empty()).then_some(req.ca_chain_pem),
            }),
            _ => return Err(Status::invalid_argument("--ca-cert and --ca-key go together (--ca-chain needs both)")),
        };
        let rotate =
            RotateRequest { material, overlap: req.overlap_seconds.map(Duration::from_secs), force: req.force };
        let shared = self.shared.clone();
        // Key generation and the CA's files: off the async workers.
        let status = tokio::task::spawn_blocking(move || {
            shared.mesh.rotate(rotate)?;
            shared.rotation_wake.notify_one();
            Ok::<_, Status>(rotation::status(&shared)?)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(status))
    }

    async fn ca_status(&self, request: Request<pb::CaStatusRequest>) -> Result<Response<pb::CaStatusResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(rotation::status(&self.shared)?))
    }

    async fn renew_admin_credential(
        &self,
        request: Request<pb::RenewAdminCredentialRequest>,
    ) -> Result<Response<pb::RenewAdminCredentialResponse>, Status> {
        // A revoked admin cannot renew.
        let name = self.authorize(&request)?;
        // The rotation in the store may be ahead of this replica's CAs (another replica moved it on, the watch has
        // not told this one yet): catch up first, so that a credential renewed for the switch comes from the new CA
        // (one from the retiring CA would be refused once the rotation retires it).
        if let Some(record) = self.shared.mesh.rotation()? {
            self.shared.mesh.follow_rotation(&record)?;
        }
        let (_, issued) = self
            .shared
            .mesh
            .ca()
            .sign_admin(&request.into_inner().csr_der, &name, rotation::ADMIN_VALIDITY)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(admin = %name, serial = %issued.serial_hex, "admin credential renewed");
        // The roots of the CAs it was issued under (the snapshot's bundle may not have followed them yet).
        let mut trust_bundle = self.shared.mesh.current().trust_bundle.clone();
        trust_bundle.roots = self.shared.mesh.authority().roots().iter().map(|r| r.to_vec()).collect();
        Ok(Response::new(pb::RenewAdminCredentialResponse {
            certificate_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: Some(trust_bundle),
        }))
    }

    async fn revoke_identity(
        &self,
        request: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::RevokeIdentityResponse>, Status> {
        let admin = self.authorize(&request)?;
        let spiffe_id = request.into_inner().spiffe_id;
        if self.shared.mesh.revoke_identity(&spiffe_id)? {
            tracing::info!(%admin, %spiffe_id, "identity revoked by admin");
        }
        Ok(Response::new(pb::RevokeIdentityResponse {}))
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::Revocations>, Status> {
        self.authorize(&request)?;
        Ok(Response::new((*self.shared.mesh.revocations()).clone()))
    }

    async fn create_admin(
        &self,
        request: Request<pb::CreateAdminRequest>,
    ) -> Result<Response<pb::CreateAdminResponse>, Status> {
        let admin = self.authorize(&request)?;
        let req = request.into_inner();
        let ttl = if req.ttl_seconds == 0 { DEFAULT_ADMIN_TTL } else { Duration::from_secs(req.ttl_seconds) };
        let (issued, record) = self.shared.mesh.create_admin(&req.name, &req.csr_der, ttl, &admin)?;
        // The chain without its root, as `init` writes it; the root goes separately, for verifying the server.
        let chain = &issued.chain[..issued.chain.len() - 1];
        Ok(Response::new(pb::CreateAdminResponse {
            certificate_chain: chain.iter().map(|c| c.to_vec()).collect(),
            ca_root: self.shared.mesh.ca().root().to_vec(),
            expires_at_unix: record.not_after,
        }))
    }

    async fn revoke_admin(
        &self,
        request: Request<pb::RevokeAdminRequest>,
    ) -> Result<Response<pb::RevokeAdminResponse>, Status> {
        let admin = self.authorize(&request)?;
        let name = request.into_inner().name;
        self.shared.mesh.revoke_admin(&name)?;
        tracing::info!(%admin, revoked = %name, "admin credential revoked by admin");
        Ok(Response::new(pb::RevokeAdminResponse {}))
    }

    async fn list_admins(
        &self,
        request: Request<pb::ListAdminsRequest>,
    ) -> Result<Response<pb::ListAdminsResponse>, Status> {
        self.authorize(&request)?;
        let admins = self
            .shared
            .mesh
            .admins()?
            .into_iter()
            .map(|a| pb::AdminInfo {
                name: a.name,
                created_at_unix: a.created_at,
                created_by: a.created_by,
                revoked: a.revoked,
                revoked_at_unix: a.revoked_at,
                serial: a.serial,
                expires_at_unix: a.not_after,
            })
            .collect();
        Ok(Response::new(pb::ListAdminsResponse { admins }))
    }
}
