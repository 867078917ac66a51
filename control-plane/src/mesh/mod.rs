//! The control plane's model of the mesh: every change goes to the store first, in one transaction, then is
//! published as a new immutable [`Snapshot`] that every discovery stream diffs against what it last sent.
//!
//! This module holds the [`Mesh`], its snapshot and the write path every change takes; the operations are split
//! by concern: `resources` (apply, dry run, delete), `joins` (tokens, and a join consuming one), `nodes` (active
//! and revoked nodes), `registry` (the workloads each node declares), `claims` (the registry's index: address
//! claims and each node's declaration), `hello` (checking a proxy's declaration), `signing` (workload
//! certificates, tagged with their node), `renewal` (node credentials renewed over the stream), `rotation` (the root
//! CA rotation's transitions), `revocations` (revoked nodes' certificates and workload identities), `admins` (admin
//! credentials) and `errors` ([`MeshError`] and its gRPC status).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;
use trellis_proto::v1 as pb;

use crate::authority::Authority;
use crate::ca::Ca;
use crate::records::{self, META_VERSION, ResourceRecord};
use crate::store::{Store, StoreError, Table, Txn, transact};

mod admins;
mod cert_log;
mod claims;
mod eligibility;
mod errors;
mod follow;
mod hello;
mod joins;
mod mirror;
mod nodes;
mod registry;
mod renewal;
mod resources;
mod revocations;
mod rotation;
mod signing;

pub use errors::MeshError;
pub use follow::follow_store;
pub use mirror::FOLLOWED;
pub use revocations::next_expiry;
pub use rotation::{CaMaterial, RotateRequest};

/// Checks a proxy's Hello as the Discovery service does before registering it (`hello.rs`); public for the fuzz
/// target `fuzz/fuzz_targets/control_plane_messages.rs`, which drives the same checks without a store.
#[doc(hidden)]
pub fn validate_hello(
    node: &records::NodeRecord,
    hello: &pb::Hello,
    trust_domain: &str,
) -> Result<BTreeMap<String, pb::Workload>, MeshError> {
    hello::validate(node, hello, trust_domain)
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
    /// Revoked node certificates and workload identities (`mesh/revocations.rs`), pushed to every proxy.
    pub revocations: Arc<pb::Revocations>,
}

pub struct MeshConfig {
    pub trust_domain: String,
    pub cert_ttl: Duration,
    pub node_cert_ttl: Duration,
    /// Lifetime of JWT-SVIDs (`--jwt-svid-ttl`).
    pub jwt_svid_ttl: Duration,
    /// Accept `jwksUri` values whose host is a loopback, link-local or unspecified address (`--jwks-allow-local`).
    pub jwks_allow_local: bool,
    /// Where a rotation writes the new CA's files.
    pub data_dir: std::path::PathBuf,
    /// On a shared store: seals the CA keys a rotation publishes there (`shared_files.rs`), and opens those other
    /// replicas published.
    pub kek: Option<crate::kek::Kek>,
}

pub struct Mesh {
    store: Arc<dyn Store>,
    /// The CAs: which signs, which roots are trusted (changed by a root rotation, with the snapshot's bundle).
    authority: watch::Sender<Arc<Authority>>,
    config: MeshConfig,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// Serializes write transactions with the publication of their snapshot, so snapshots appear in version order.
    writer: Mutex<()>,
    /// Whether a follower publishes what the store reports (`follow.rs`): then a write that skipped versions
    /// (another replica wrote in between, and this one has not seen it yet) leaves publishing to the follower.
    followed: AtomicBool,
    /// The rotation (number, phase) the authority reflects (None: none ever), so that a replica following the
    /// store sees when another replica moved a rotation on (`follow.rs`).
    applied_rotation: Mutex<Option<(u64, crate::rotation::Phase)>>,
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

/// Reads what a snapshot holds from the store: version, resources, workloads, revocations.
fn load_state(store: &dyn Store, snapshot: &mut Snapshot) -> Result<(), StoreError> {
    snapshot.version = records::load::<u64>(store, Table::Meta, META_VERSION)?.unwrap_or(0);
    snapshot.resources.clear();
    for record in records::load_all::<ResourceRecord>(store, Table::Resources)? {
        snapshot.resources.insert(record.store_key(), Arc::new(to_pb_resource(&record)));
    }
    snapshot.workloads.clear();
    for (key, bytes) in store.list(Table::Workloads)? {
        snapshot.workloads.insert(key.clone(), Arc::new(decode_workload(&key, &bytes)?));
    }
    snapshot.revocations = Arc::new(revocations::load(store, now_unix())?);
    Ok(())
}

impl Mesh {
    pub fn open(store: Arc<dyn Store>, authority: Authority, config: MeshConfig) -> Result<Self, MeshError> {
        let mut snapshot = Snapshot {
            trust_bundle: pb::TrustBundle {
                trust_domain: config.trust_domain.clone(),
                roots: authority.roots().iter().map(|c| c.to_vec()).collect(),
                jwks: authority.jwks(),
            },
            ..Default::default()
        };
        claims::build_index(store.as_ref())?;
        load_state(store.as_ref(), &mut snapshot)?;
        store_gauges(&snapshot);
        let applied: Option<crate::rotation::RotationRecord> =
            records::load(store.as_ref(), Table::Meta, crate::rotation::RECORD_KEY)?;
        let (snapshot, _) = watch::channel(Arc::new(snapshot));
        let (authority, _) = watch::channel(Arc::new(authority));
        Ok(Self {
            store,
            authority,
            config,
            snapshot,
            writer: Mutex::new(()),
            followed: AtomicBool::new(false),
            applied_rotation: Mutex::new(applied.map(|r| (r.rotation, r.phase))),
        })
    }

    /// The CA that signs new certificates now.
    pub fn ca(&self) -> Arc<Ca> {
        self.authority().signer().clone()
    }

    pub fn authority(&self) -> Arc<Authority> {
        self.authority.borrow().clone()
    }

    /// Changes at every phase of a root rotation.
    pub fn authority_changes(&self) -> watch::Receiver<Arc<Authority>> {
        self.authority.subscribe()
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
        txn: impl FnMut(&mut dyn Txn) -> Result<(T, Option<u64>), MeshError>,
        edit: impl FnOnce(&T, &mut Snapshot),
    ) -> Result<T, MeshError> {
        let _guard = self.writer.lock().expect("writer lock");
        let (result, new_version) = transact(self.store.as_ref(), txn)?;
        if let Some(version) = new_version {
            let current = self.current();
            if version != current.version + 1 && self.followed.load(Ordering::Relaxed) {
                // Publishing `current` + this change as `version` would miss the versions in between (other
                // replicas' writes): the follower publishes this version, whole, when the store reports it.
                return Ok(result);
            }
            let mut next = Snapshot {
                version,
                trust_bundle: current.trust_bundle.clone(),
                workloads: current.workloads.clone(),
                resources: current.resources.clone(),
                created: Some(std::time::Instant::now()),
                jwks: current.jwks.clone(),
                revocations: current.revocations.clone(),
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
}

#[cfg(test)]
mod testing;
