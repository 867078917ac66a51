//! The control plane's model of the mesh: every change goes to the store first, in one transaction, then is
//! published as a new immutable [`Snapshot`] that every discovery stream diffs against what it last sent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;
use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1 as pb;

use crate::ca::{Ca, CaError, Issued};
use crate::records::{self, CertRecord, META_REVISION, META_VERSION, NodeRecord, ResourceRecord, TokenRecord};
use crate::store::{Store, StoreError, Table, transact};
use crate::tokens::{self, TokenRefusal};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
}

impl From<TokenRefusal> for MeshError {
    fn from(r: TokenRefusal) -> Self {
        match r {
            TokenRefusal::WrongNode { .. } => MeshError::PermissionDenied(r.to_string()),
            _ => MeshError::Unauthenticated(r.to_string()),
        }
    }
}

impl From<MeshError> for tonic::Status {
    fn from(e: MeshError) -> Self {
        let msg = e.to_string();
        match e {
            MeshError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            MeshError::NotFound(_) => tonic::Status::not_found(msg),
            MeshError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            MeshError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            MeshError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            MeshError::Ca(CaError::Rcgen(_) | CaError::Io(_) | CaError::Material(_)) | MeshError::Store(_) => {
                tracing::error!(error = %msg, "internal error");
                tonic::Status::internal(msg)
            }
            MeshError::Ca(_) => tonic::Status::invalid_argument(msg),
        }
    }
}

/// What every proxy is told: the whole registry and every resource (scoping per proxy comes later).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub trust_bundle: pb::TrustBundle,
    pub workloads: BTreeMap<String, Arc<pb::Workload>>,
    pub resources: BTreeMap<String, Arc<pb::Resource>>,
    /// When the change that made this version was published (None for the snapshot loaded at start): the origin
    /// of the convergence time measured at each proxy's ACK.
    pub created: Option<std::time::Instant>,
    /// JWKS documents fetched for `jwksUri` values, by URI (kept in memory, refetched after a restart).
    pub jwks: Arc<BTreeMap<String, String>>,
}

pub struct MeshConfig {
    pub trust_domain: String,
    pub cert_ttl: Duration,
    pub node_cert_ttl: Duration,
}

pub struct Mesh {
    store: Arc<dyn Store>,
    ca: Ca,
    config: MeshConfig,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// Serializes write transactions with the publication of their snapshot, so snapshots appear in version order.
    writer: Mutex<()>,
}

/// The size of what the store holds, as gauges: resources by kind and registered workloads.
fn store_gauges(snapshot: &Snapshot) {
    for kind in trellis_policy::Kind::ALL {
        let count =
            snapshot.resources.values().filter(|r| r.key.as_ref().is_some_and(|k| k.kind == kind.as_str())).count();
        metrics::gauge!("trellis_store_resources", "kind" => kind.as_str()).set(count as f64);
    }
    metrics::gauge!("trellis_store_workloads").set(snapshot.workloads.len() as f64);
    metrics::gauge!("trellis_config_version").set(snapshot.version as f64);
}

pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn to_pb_resource(r: &ResourceRecord) -> pb::Resource {
    pb::Resource {
        key: Some(pb::ResourceKey { kind: r.kind.clone(), namespace: r.namespace.clone(), name: r.name.clone() }),
        revision: r.revision,
        json: r.json.clone(),
    }
}

fn decode_workload(key: &str, bytes: &[u8]) -> Result<pb::Workload, StoreError> {
    pb::Workload::decode(bytes).map_err(|e| StoreError::Corrupt {
        table: Table::Workloads,
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

impl Mesh {
    pub fn open(store: Arc<dyn Store>, ca: Ca, config: MeshConfig) -> Result<Self, MeshError> {
        let mut snapshot = Snapshot {
            version: records::load::<u64>(store.as_ref(), Table::Meta, META_VERSION)?.unwrap_or(0),
            trust_bundle: pb::TrustBundle {
                trust_domain: config.trust_domain.clone(),
                roots: ca.roots().iter().map(|c| c.to_vec()).collect(),
            },
            ..Default::default()
        };
        for record in records::load_all::<ResourceRecord>(store.as_ref(), Table::Resources)? {
            snapshot.resources.insert(record.store_key(), Arc::new(to_pb_resource(&record)));
        }
        for (key, bytes) in store.list(Table::Workloads)? {
            snapshot.workloads.insert(key.clone(), Arc::new(decode_workload(&key, &bytes)?));
        }
        store_gauges(&snapshot);
        let (snapshot, _) = watch::channel(Arc::new(snapshot));
        Ok(Self { store, ca, config, snapshot, writer: Mutex::new(()) })
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Runs a store transaction and, if it changed anything, publishes the snapshot `edit` derives.
    fn write<T>(
        &self,
        txn: impl FnMut(&mut dyn crate::store::Txn) -> Result<(T, Option<u64>), MeshError>,
        edit: impl FnOnce(&T, &mut Snapshot),
    ) -> Result<T, MeshError> {
        let _guard = self.writer.lock().expect("writer lock");
        let (result, new_version) = transact(self.store.as_ref(), txn)?;
        if let Some(version) = new_version {
            let current = self.current();
            let mut next = Snapshot {
                version,
                trust_bundle: current.trust_bundle.clone(),
                workloads: current.workloads.clone(),
                resources: current.resources.clone(),
                created: Some(std::time::Instant::now()),
                jwks: current.jwks.clone(),
            };
            edit(&result, &mut next);
            store_gauges(&next);
            self.snapshot.send_replace(Arc::new(next));
        }
        Ok(result)
    }

    /// Publishes a new set of fetched JWKS documents under a new config version (so proxies ACK it).
    pub fn set_jwks(&self, jwks: BTreeMap<String, String>) -> Result<(), MeshError> {
        if *self.current().jwks == jwks {
            return Ok(());
        }
        let jwks = Arc::new(jwks);
        self.write(|txn| Ok(((), Some(records::bump(txn, META_VERSION)?))), |_, snapshot| snapshot.jwks = jwks.clone())
    }

    // ---- resources -------------------------------------------------------------------------------------

    /// Applies every document of `text`, or none of them.
    pub fn apply(&self, text: &str) -> Result<Vec<pb::AppliedResource>, MeshError> {
        let parsed = trellis_policy::parse_documents(text).map_err(|e| MeshError::InvalidArgument(e.to_string()))?;
        if parsed.is_empty() {
            return Err(MeshError::InvalidArgument("no documents to apply".into()));
        }
        let (results, changed) = self.write(
            |txn| {
                let mut results = Vec::new();
                let mut changed = Vec::new();
                for resource in &parsed {
                    let key = resource.key();
                    let kind = key.kind.to_string();
                    let store_key = records::resource_store_key(&kind, &key.namespace, &key.name);
                    let json = resource.to_json();
                    let existing: Option<ResourceRecord> = records::get(txn, Table::Resources, &store_key)?;
                    let (revision, outcome) = match &existing {
                        Some(old) if old.json == json => (old.revision, "unchanged"),
                        _ => {
                            let revision = records::bump(txn, META_REVISION)?;
                            let record = ResourceRecord {
                                kind: kind.clone(),
                                namespace: key.namespace.clone(),
                                name: key.name.clone(),
                                revision,
                                json,
                            };
                            records::put(txn, Table::Resources, &store_key, &record)?;
                            changed.push(record);
                            (revision, if existing.is_some() { "configured" } else { "created" })
                        }
                    };
                    results.push(pb::AppliedResource {
                        key: Some(pb::ResourceKey { kind, namespace: key.namespace.clone(), name: key.name.clone() }),
                        revision,
                        outcome: format!("{outcome}{}", applicability_note(resource)),
                    });
                }
                let version = if changed.is_empty() { None } else { Some(records::bump(txn, META_VERSION)?) };
                Ok(((results, changed), version))
            },
            |(_, changed), snapshot| {
                for record in changed {
                    snapshot.resources.insert(record.store_key(), Arc::new(to_pb_resource(record)));
                }
            },
        )?;
        if !changed.is_empty() {
            tracing::info!(changed = changed.len(), version = self.current().version, "resources applied");
        }
        Ok(results)
    }

    /// What `apply` would do, without storing anything: per resource the outcome, and per registered workload its
    /// applicable policies before and after.
    pub fn apply_dry_run(
        &self,
        text: &str,
        root_namespace: &str,
    ) -> Result<(Vec<pb::AppliedResource>, Vec<pb::WorkloadPolicyChange>), MeshError> {
        let parsed = trellis_policy::parse_documents(text).map_err(|e| MeshError::InvalidArgument(e.to_string()))?;
        let snapshot = self.current();
        let mut before: BTreeMap<String, trellis_policy::Resource> = BTreeMap::new();
        for (key, r) in &snapshot.resources {
            let resource = trellis_policy::Resource::from_json(&r.json)
                .map_err(|e| MeshError::InvalidArgument(format!("stored resource {key}: {e}")))?;
            before.insert(key.clone(), resource);
        }
        let mut after = before.clone();
        let mut results = Vec::new();
        for resource in parsed {
            let key = resource.key();
            let kind = key.kind.to_string();
            let store_key = records::resource_store_key(&kind, &key.namespace, &key.name);
            let outcome = match before.get(&store_key) {
                Some(old) if old.to_json() == resource.to_json() => "unchanged",
                Some(_) => "configured",
                None => "created",
            };
            results.push(pb::AppliedResource {
                key: Some(pb::ResourceKey { kind, namespace: key.namespace.clone(), name: key.name.clone() }),
                revision: 0,
                outcome: format!("{outcome} (dry run){}", applicability_note(&resource)),
            });
            after.insert(store_key, resource);
        }
        let compile = |set: &BTreeMap<String, trellis_policy::Resource>| {
            let list: Vec<_> = set.values().cloned().collect();
            trellis_policy::CompiledPolicies::compile(&list, root_namespace)
                .map_err(|e| MeshError::InvalidArgument(e.to_string()))
        };
        let (old, new) = (compile(&before)?, compile(&after)?);
        let describe = |policies: &trellis_policy::WorkloadPolicies| -> Vec<String> {
            let mut out: Vec<String> = policies
                .policies()
                .map(|(ns, name, action, dry_run)| {
                    format!("{ns}/{name} ({action:?}{})", if dry_run { ", dry-run" } else { "" })
                })
                .collect();
            out.sort();
            out
        };
        let mut changes = Vec::new();
        for (key, w) in &snapshot.workloads {
            let labels: BTreeMap<String, String> = w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let (b, a) = (
                describe(&old.for_workload(&w.namespace, &labels)),
                describe(&new.for_workload(&w.namespace, &labels)),
            );
            changes.push(pb::WorkloadPolicyChange { workload: key.clone(), before: b, after: a });
        }
        Ok((results, changes))
    }

    /// Deletes every key, or none if any is missing.
    pub fn delete(&self, keys: &[pb::ResourceKey]) -> Result<Vec<pb::ResourceKey>, MeshError> {
        let store_keys: Vec<String> = keys
            .iter()
            .map(|k| {
                let kind: trellis_policy::Kind =
                    k.kind.parse().map_err(|_| MeshError::InvalidArgument(format!("unknown kind {:?}", k.kind)))?;
                Ok(records::resource_store_key(kind.as_str(), &k.namespace, &k.name))
            })
            .collect::<Result<_, MeshError>>()?;
        self.write(
            |txn| {
                let mut missing = Vec::new();
                for key in &store_keys {
                    if txn.get(Table::Resources, key)?.is_none() {
                        missing.push(key.clone());
                    } else {
                        txn.delete(Table::Resources, key)?;
                    }
                }
                if !missing.is_empty() {
                    return Err(MeshError::NotFound(format!("not found: {}", missing.join(", "))));
                }
                let version = if store_keys.is_empty() { None } else { Some(records::bump(txn, META_VERSION)?) };
                Ok(((), version))
            },
            |_, snapshot| {
                for key in &store_keys {
                    snapshot.resources.remove(key);
                }
            },
        )?;
        Ok(keys.to_vec())
    }

    // ---- tokens and nodes ------------------------------------------------------------------------------

    pub fn create_token(
        &self,
        node: &str,
        namespaces: Vec<String>,
        ttl: Duration,
        reusable: bool,
    ) -> Result<(String, TokenRecord), MeshError> {
        validate_dns_label(node).map_err(|e| MeshError::InvalidArgument(format!("node name {node:?}: {e}")))?;
        if namespaces.is_empty() {
            return Err(MeshError::InvalidArgument("a token needs at least one namespace".into()));
        }
        for ns in &namespaces {
            validate_dns_label(ns).map_err(|e| MeshError::InvalidArgument(format!("namespace {ns:?}: {e}")))?;
        }
        if ttl.is_zero() {
            return Err(MeshError::InvalidArgument("token ttl must be positive".into()));
        }
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let new = tokens::generate(node, namespaces, ttl_secs, reusable, now_unix());
        transact::<_, MeshError>(self.store.as_ref(), |txn| {
            records::put(txn, Table::Tokens, &new.record.id, &new.record).map_err(Into::into)
        })?;
        Ok((new.token, new.record))
    }

    pub fn revoke_token(&self, id: &str) -> Result<(), MeshError> {
        transact(self.store.as_ref(), |txn| {
            let mut record: TokenRecord = records::get(txn, Table::Tokens, id)?
                .ok_or_else(|| MeshError::NotFound(format!("token {id:?} not found")))?;
            record.revoked = true;
            records::put(txn, Table::Tokens, id, &record).map_err(Into::into)
        })
    }

    /// Exchanges a join token for a node credential.
    pub fn join(&self, token: &str, node: &str, csr_der: &[u8]) -> Result<(Issued, Vec<String>), MeshError> {
        let (id, secret) = tokens::split(token)?;
        let now = now_unix();
        // Consume the token and record the node in one transaction, so a single-use token joins once.
        let record = transact(self.store.as_ref(), |txn| {
            let mut token: TokenRecord = records::get(txn, Table::Tokens, id)?.ok_or(TokenRefusal::Invalid)?;
            tokens::check(&token, secret, node, now)?;
            if let Some(existing) = records::get::<NodeRecord>(txn, Table::Nodes, node)?
                && existing.revoked
            {
                return Err(MeshError::PermissionDenied(format!("node {node:?} was revoked")));
            }
            token.uses += 1;
            records::put(txn, Table::Tokens, id, &token)?;
            Ok(token)
        })?;
        let (spiffe_id, issued) = self.ca.sign_node(csr_der, node, self.config.node_cert_ttl)?;
        transact::<_, MeshError>(self.store.as_ref(), |txn| {
            let node_record = NodeRecord {
                name: node.to_owned(),
                namespaces: record.namespaces.clone(),
                joined_at: now,
                revoked: false,
                credential_serial: issued.serial_hex.clone(),
            };
            records::put(txn, Table::Nodes, node, &node_record)?;
            self.log_certificate(txn, &issued, &spiffe_id, node)?;
            Ok(())
        })?;
        tracing::info!(node, "node joined");
        Ok((issued, record.namespaces))
    }

    fn log_certificate(
        &self,
        txn: &mut dyn crate::store::Txn,
        issued: &Issued,
        id: &SpiffeId,
        node: &str,
    ) -> Result<(), StoreError> {
        let record = CertRecord {
            serial: issued.serial_hex.clone(),
            identity: id.to_string(),
            node: node.to_owned(),
            issued_at: now_unix(),
            not_after: issued.not_after.unix_timestamp(),
        };
        records::put(txn, Table::Certificates, &issued.serial_hex, &record)
    }

    /// The node's record if it may use its credential (joined, not revoked).
    pub fn active_node(&self, node: &str) -> Result<NodeRecord, MeshError> {
        match records::load::<NodeRecord>(self.store.as_ref(), Table::Nodes, node)? {
            Some(record) if !record.revoked => Ok(record),
            Some(_) => Err(MeshError::PermissionDenied(format!("node {node:?} was revoked"))),
            None => Err(MeshError::PermissionDenied(format!("node {node:?} has not joined"))),
        }
    }

    /// Marks the node revoked and removes its workloads from the registry.
    pub fn revoke_node(&self, node: &str) -> Result<(), MeshError> {
        let removed = self.write(
            |txn| {
                let mut record: NodeRecord = records::get(txn, Table::Nodes, node)?
                    .ok_or_else(|| MeshError::NotFound(format!("node {node:?} not found")))?;
                record.revoked = true;
                records::put(txn, Table::Nodes, node, &record)?;
                let mut removed = Vec::new();
                for (key, bytes) in txn.list(Table::Workloads)? {
                    if decode_workload(&key, &bytes)?.node == node {
                        txn.delete(Table::Workloads, &key)?;
                        removed.push(key);
                    }
                }
                Ok((removed, Some(records::bump(txn, META_VERSION)?)))
            },
            |removed, snapshot| {
                for key in removed {
                    snapshot.workloads.remove(key);
                }
            },
        )?;
        tracing::warn!(node, workloads_removed = removed.len(), "node revoked");
        Ok(())
    }

    // ---- workloads and certificates ----------------------------------------------------------------------

    /// Replaces the set of workloads `node` fronts with the ones its proxy declared.
    pub fn register(&self, node: &NodeRecord, hello: &pb::Hello) -> Result<u64, MeshError> {
        let declared = validate_hello(node, hello, &self.config.trust_domain)?;
        let (version, changed, removed) = self.write(
            |txn| {
                // Addresses held by other nodes' workloads.
                let mut claimed: BTreeMap<String, (String, String)> = BTreeMap::new();
                let mut mine = BTreeSet::new();
                for (key, bytes) in txn.list(Table::Workloads)? {
                    let w = decode_workload(&key, &bytes)?;
                    if w.node == node.name {
                        mine.insert(key);
                        continue;
                    }
                    for address in &w.addresses {
                        claimed.insert(address.clone(), (key.clone(), w.node.clone()));
                    }
                }
                let mut changed = Vec::new();
                for (key, w) in &declared {
                    if declared_name_clash(txn, key, &node.name)? {
                        return Err(MeshError::AlreadyExists(format!(
                            "workload {key} is already declared by another node"
                        )));
                    }
                    for address in &w.addresses {
                        if let Some((other, other_node)) = claimed.get(address) {
                            return Err(MeshError::AlreadyExists(format!(
                                "address {address} of workload {key} is already claimed by workload {other} on node {other_node}"
                            )));
                        }
                    }
                    let bytes = w.encode_to_vec();
                    if txn.get(Table::Workloads, key)?.as_deref() != Some(bytes.as_slice()) {
                        txn.put(Table::Workloads, key, &bytes)?;
                        changed.push((key.clone(), w.clone()));
                    }
                }
                let removed: Vec<String> = mine.into_iter().filter(|k| !declared.contains_key(k)).collect();
                for key in &removed {
                    txn.delete(Table::Workloads, key)?;
                }
                let version = if changed.is_empty() && removed.is_empty() {
                    None
                } else {
                    Some(records::bump(txn, META_VERSION)?)
                };
                Ok(((version, changed, removed), version))
            },
            |(_, changed, removed), snapshot| {
                for (key, w) in changed {
                    snapshot.workloads.insert(key.clone(), Arc::new(w.clone()));
                }
                for key in removed {
                    snapshot.workloads.remove(key);
                }
            },
        )?;
        tracing::info!(node = %node.name, workloads = declared.len(), changed = changed.len(), removed = removed.len(), "workloads registered");
        Ok(version.unwrap_or_else(|| self.current().version))
    }

    /// Signs a workload certificate for `node` if the identity is one of the workloads it fronts.
    pub fn sign_workload(&self, node: &NodeRecord, csr_der: &[u8]) -> Result<(SpiffeId, Issued), MeshError> {
        let hosted: BTreeSet<(String, String)> = self
            .current()
            .workloads
            .values()
            .filter(|w| w.node == node.name)
            .map(|w| (w.namespace.clone(), w.service_account.clone()))
            .collect();
        let (id, issued) = self.ca.sign_workload(csr_der, self.config.cert_ttl, |_, namespace, sa| {
            if !node.namespaces.iter().any(|n| n == namespace) {
                return Err(format!("node {:?} may not hold identities in namespace {namespace:?}", node.name));
            }
            if !hosted.contains(&(namespace.to_owned(), sa.to_owned())) {
                return Err(format!("node {:?} fronts no workload with service account {namespace}/{sa}", node.name));
            }
            Ok(())
        })?;
        transact::<_, MeshError>(self.store.as_ref(), |txn| Ok(self.log_certificate(txn, &issued, &id, &node.name)?))?;
        Ok((id, issued))
    }
}

/// Said with the apply outcome when a resource is stored but proxies will not enforce it (as Istio's sidecars).
fn applicability_note(resource: &trellis_policy::Resource) -> &'static str {
    match resource.authorization_policy() {
        Some(p) if p.target_ref.is_some() || !p.target_refs.is_empty() => {
            " (has targetRefs: applies to gateways and waypoints, not enforced by proxies)"
        }
        _ => "",
    }
}

/// A workload name declared by another node (names are unique per namespace across the mesh).
fn declared_name_clash(txn: &dyn crate::store::Txn, key: &str, node: &str) -> Result<bool, StoreError> {
    Ok(match txn.get(Table::Workloads, key)? {
        Some(bytes) => decode_workload(key, &bytes)?.node != node,
        None => false,
    })
}

/// Checks a proxy's declaration and fills in what the control plane owns (node, proxy address, SPIFFE ID).
fn validate_hello(
    node: &NodeRecord,
    hello: &pb::Hello,
    trust_domain: &str,
) -> Result<BTreeMap<String, pb::Workload>, MeshError> {
    let invalid = |i: usize, msg: String| MeshError::InvalidArgument(format!("workloads[{i}]: {msg}"));
    if hello.hbone_address.parse::<std::net::SocketAddr>().is_err() {
        return Err(MeshError::InvalidArgument(format!(
            "hbone_address {:?} is not an IP:port address",
            hello.hbone_address
        )));
    }
    let mut out = BTreeMap::new();
    let mut addresses = BTreeSet::new();
    for (i, w) in hello.workloads.iter().enumerate() {
        validate_dns_label(&w.name).map_err(|e| invalid(i, format!("name {:?}: {e}", w.name)))?;
        validate_dns_label(&w.namespace).map_err(|e| invalid(i, format!("namespace {:?}: {e}", w.namespace)))?;
        if !node.namespaces.iter().any(|n| n == &w.namespace) {
            return Err(MeshError::PermissionDenied(format!(
                "workloads[{i}] ({}/{}): node {:?} may not host workloads in namespace {:?} (its token allows {})",
                w.namespace,
                w.name,
                node.name,
                w.namespace,
                node.namespaces.join(", ")
            )));
        }
        let spiffe_id = SpiffeId::workload(trust_domain, &w.namespace, &w.service_account)
            .map_err(|e| invalid(i, format!("serviceAccount {:?}: {e}", w.service_account)))?;
        if w.addresses.is_empty() {
            return Err(invalid(i, "has no addresses".into()));
        }
        for address in &w.addresses {
            let ip: IpAddr = address.parse().map_err(|_| invalid(i, format!("{address:?} is not an IP address")))?;
            if !addresses.insert(ip) {
                return Err(invalid(i, format!("address {address} is declared twice")));
            }
        }
        for port in &w.ports {
            if port.port == 0 || port.port > 65535 {
                return Err(invalid(i, format!("port {} is out of range 1-65535", port.port)));
            }
            if port.protocol() == pb::Protocol::Unspecified {
                return Err(invalid(i, format!("port {} has no protocol (tcp or http)", port.port)));
            }
        }
        let key = trellis_proto::workload_key(&w.namespace, &w.name);
        let mut w = w.clone();
        w.node = node.name.clone();
        w.proxy_address = hello.hbone_address.clone();
        w.spiffe_id = spiffe_id.to_string();
        if out.insert(key.clone(), w).is_some() {
            return Err(MeshError::InvalidArgument(format!("workload {key} is declared twice")));
        }
    }
    Ok(out)
}

/// RFC 1123 label, as Kubernetes names and namespaces.
pub fn validate_dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1-63 characters");
    }
    let bytes = s.as_bytes();
    let ok_char = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    if !bytes.iter().all(ok_char) || bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return Err("must be lowercase letters, digits and '-', starting and ending with a letter or digit");
    }
    Ok(())
}
