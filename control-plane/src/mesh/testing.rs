//! In-process test support: a [`Mesh`] on a fresh store (redb; etcd when `TRELLIS_TEST_STORE=etcd`, a fresh prefix
//! on a real etcd this process starts) and a fresh CA in a temporary directory (removed on
//! drop), and builders for what proxies send (CSRs, Hellos).

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use trellis_proto::v1 as pb;

use super::{Mesh, MeshConfig};
use crate::ca::{CA_CERT, CA_CHAIN, CA_KEY, Ca};
use crate::records::NodeRecord;
use crate::store::{EtcdStore, RedbStore, STORE_FILE, Store, StoreError, Table, Txn, test_etcd};

pub(super) const TRUST_DOMAIN: &str = "test.example";

pub(super) struct TestMesh {
    mesh: Mesh,
    dir: PathBuf,
}

impl TestMesh {
    pub(super) fn new() -> TestMesh {
        Self::with_store(|store| store)
    }

    /// A test mesh whose store is wrapped in a [`ProbedStore`] (counts transactions).
    pub(super) fn probed() -> (TestMesh, Arc<ProbedStore>) {
        let mut probe = None;
        let mesh = Self::with_store(|inner| {
            let probed = Arc::new(ProbedStore { inner, updates: AtomicUsize::new(0) });
            probe = Some(probed.clone());
            probed as Arc<dyn Store>
        });
        (mesh, probe.expect("wrapped"))
    }

    /// A test mesh on the store `wrap` makes of the fresh one.
    fn with_store(wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>) -> TestMesh {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("trellis-mesh-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ca")).expect("temp dir");
        let (cert, key) = Ca::generate_root(TRUST_DOMAIN).expect("test CA");
        std::fs::write(dir.join(CA_CERT), &cert).expect("CA cert");
        std::fs::write(dir.join(CA_KEY), &key).expect("CA key");
        std::fs::write(dir.join(CA_CHAIN), &cert).expect("CA chain");
        let ca = crate::authority::Authority::single(Ca::load(&dir, TRUST_DOMAIN).expect("load test CA"));
        let store: Arc<dyn crate::store::Store> = if test_etcd::requested() {
            Arc::new(EtcdStore::connect(&test_etcd::options()).expect("etcd store"))
        } else {
            Arc::new(RedbStore::open(&dir.join(STORE_FILE)).expect("store"))
        };
        let store = wrap(store);
        TestMesh { mesh: Mesh::open(store, ca, config(&dir)).expect("open mesh"), dir }
    }

    /// Another replica on the same store and CA, whose snapshot is the store's now and then follows nothing: it
    /// stands for a replica that has not seen the changes made after this call (its own writes aside).
    pub(super) fn replica(&self) -> Mesh {
        let ca = crate::authority::Authority::single(Ca::load(&self.dir, TRUST_DOMAIN).expect("load test CA"));
        Mesh::open(self.mesh.store.clone(), ca, config(&self.dir)).expect("open replica")
    }

    /// Creates a token for `node` and joins with it: the node's record, as the discovery service loads it.
    pub(super) fn joined(&self, node: &str, namespaces: &[&str]) -> NodeRecord {
        let namespaces = namespaces.iter().map(|n| n.to_string()).collect();
        let (token, _) =
            self.create_token(node, namespaces, Duration::from_secs(600), false).expect("token for a joining node");
        self.join(&token, node, &csr(None)).expect("join");
        self.active_node(node).expect("joined node is active")
    }
}

fn config(dir: &std::path::Path) -> MeshConfig {
    MeshConfig {
        trust_domain: TRUST_DOMAIN.to_owned(),
        cert_ttl: Duration::from_secs(3600),
        node_cert_ttl: Duration::from_secs(3600),
        jwt_svid_ttl: crate::jwt_key::DEFAULT_JWT_TTL,
        jwks_allow_local: false,
        data_dir: dir.to_owned(),
        kek: None,
    }
}

impl Deref for TestMesh {
    type Target = Mesh;

    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CSR for a fresh P-256 key, naming `uri` as its only SAN (none for node credentials, whose names the CA
/// sets).
pub(super) fn csr(uri: Option<&str>) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    if let Some(uri) = uri {
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("URI SAN"))];
    }
    params.serialize_request(&key).expect("CSR").der().to_vec()
}

/// A workload as a proxy declares it: one TCP port.
pub(super) fn workload(namespace: &str, name: &str, service_account: &str, addresses: &[&str]) -> pb::Workload {
    pb::Workload {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        ports: vec![pb::Port { port: 8080, protocol: pb::Protocol::Tcp.into() }],
        ..Default::default()
    }
}

pub(super) fn hello(workloads: Vec<pb::Workload>) -> pb::Hello {
    pb::Hello {
        workloads,
        hbone_address: "127.0.0.1:15008".to_owned(),
        version: "test".to_owned(),
        ..Default::default()
    }
}

/// A refusal as `(variant, message)`, so a test checks both the kind of refusal and its reason.
pub(super) fn refusal(e: &super::MeshError) -> (&'static str, String) {
    use super::MeshError::*;
    let kind = match e {
        InvalidArgument(_) => "InvalidArgument",
        NotFound(_) => "NotFound",
        PermissionDenied(_) => "PermissionDenied",
        Unauthenticated(_) => "Unauthenticated",
        AlreadyExists(_) => "AlreadyExists",
        FailedPrecondition(_) => "FailedPrecondition",
        Store(_) => "Store",
        Ca(_) => "Ca",
    };
    (kind, e.to_string())
}

/// A store that counts its transactions.
pub(super) struct ProbedStore {
    inner: Arc<dyn Store>,
    updates: AtomicUsize,
}

impl ProbedStore {
    /// Transactions begun so far.
    pub(super) fn updates(&self) -> usize {
        self.updates.load(Ordering::SeqCst)
    }
}

impl Store for ProbedStore {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(table, key)
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.list(table)
    }

    fn update(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.updates.fetch_add(1, Ordering::SeqCst);
        self.inner.update(f)
    }
}
