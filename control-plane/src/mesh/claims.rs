//! The registry's index, so that a registration costs what it declares, not the size of the mesh: which workload
//! holds each address (`workload_addresses`: canonical IP -> workload key) and which workloads each node declared
//! (`node_workloads`: node -> JSON list of workload keys). Both are written in the same transaction as the
//! workloads they describe. A store made before the index existed gets it built once when the mesh opens
//! ([`build_index`]); the meta key [`INDEX_KEY`] says it was.
//!
//! The workload records stay the truth: an address entry whose workload no longer exists or no longer holds the
//! address is stale and ignored (never a false refusal); the index can only miss a claim if it was never built.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use trellis_proto::v1 as pb;

use super::{MeshError, decode_workload};
use crate::records;
use crate::store::{Store, StoreError, Table, Txn, transact};

/// Meta key set (to [`INDEX_FORMAT`]) once the index holds every workload of the store.
pub const INDEX_KEY: &str = "workload_index";
const INDEX_FORMAT: u64 = 1;
/// Workloads indexed per transaction when building the index (etcd's default `--max-txn-ops` is 128: each
/// workload costs a compare, and a write per address, plus its node's entry).
const BUILD_BATCH: usize = 20;

/// The index's key for an address: the IP in its canonical form (`fd00::1`, whichever way it was written).
pub(super) fn address_key(address: &str) -> String {
    address.parse::<IpAddr>().map_or_else(|_| address.to_owned(), |ip| ip.to_string())
}

/// The keys of the workloads `node` declared.
pub(super) fn declared_by(txn: &dyn Txn, node: &str) -> Result<BTreeSet<String>, StoreError> {
    Ok(records::get::<BTreeSet<String>>(txn, Table::NodeWorkloads, node)?.unwrap_or_default())
}

/// Records the keys of the workloads `node` declares now (none: the entry goes).
pub(super) fn set_declared_by(txn: &mut dyn Txn, node: &str, keys: &BTreeSet<String>) -> Result<(), StoreError> {
    if keys.is_empty() {
        if txn.get(Table::NodeWorkloads, node)?.is_some() {
            txn.delete(Table::NodeWorkloads, node)?;
        }
        return Ok(());
    }
    if declared_by(txn, node)? != *keys {
        records::put(txn, Table::NodeWorkloads, node, keys)?;
    }
    Ok(())
}

/// The workload (key, record) that holds `address` now, if any: the index's entry, checked against the record.
pub(super) fn holder(txn: &dyn Txn, address: &str) -> Result<Option<(String, pb::Workload)>, StoreError> {
    let address = address_key(address);
    let Some(key) = txn.get(Table::WorkloadAddresses, &address)? else { return Ok(None) };
    let key = String::from_utf8_lossy(&key).into_owned();
    let Some(bytes) = txn.get(Table::Workloads, &key)? else { return Ok(None) };
    let workload = decode_workload(&key, &bytes)?;
    let holds = workload.addresses.iter().any(|a| address_key(a) == address);
    Ok(holds.then_some((key, workload)))
}

/// Moves the address entries from what a node's workloads held (`before`: key -> record) to what they hold now
/// (`after`), writing only the entries that change.
pub(super) fn reindex(
    txn: &mut dyn Txn,
    before: &BTreeMap<String, pb::Workload>,
    after: &BTreeMap<String, pb::Workload>,
) -> Result<(), StoreError> {
    let claims = |workloads: &BTreeMap<String, pb::Workload>| -> BTreeMap<String, String> {
        workloads.iter().flat_map(|(key, w)| w.addresses.iter().map(|a| (address_key(a), key.clone()))).collect()
    };
    let (old, new) = (claims(before), claims(after));
    for (address, key) in &old {
        if !new.contains_key(address) && txn.get(Table::WorkloadAddresses, address)?.as_deref() == Some(key.as_bytes())
        {
            txn.delete(Table::WorkloadAddresses, address)?;
        }
    }
    for (address, key) in &new {
        if old.get(address) != Some(key)
            || txn.get(Table::WorkloadAddresses, address)?.as_deref() != Some(key.as_bytes())
        {
            txn.put(Table::WorkloadAddresses, address, key.as_bytes())?;
        }
    }
    Ok(())
}

/// The records of the workloads `node` declared, by key (those whose record is gone or moved to another node are
/// left out).
pub(super) fn load_declared(txn: &dyn Txn, node: &str) -> Result<BTreeMap<String, pb::Workload>, StoreError> {
    let mut out = BTreeMap::new();
    for key in declared_by(txn, node)? {
        if let Some(bytes) = txn.get(Table::Workloads, &key)? {
            let workload = decode_workload(&key, &bytes)?;
            if workload.node == node {
                out.insert(key, workload);
            }
        }
    }
    Ok(out)
}

/// Builds the index from the workloads table if the store predates it (one time; idempotent, so two replicas
/// opening an old store at once both finish with the same index). Returns how many workloads it indexed.
pub fn build_index(store: &dyn Store) -> Result<usize, MeshError> {
    if records::load::<u64>(store, Table::Meta, INDEX_KEY)? == Some(INDEX_FORMAT) {
        return Ok(0);
    }
    let keys: Vec<String> = store.list(Table::Workloads)?.into_iter().map(|(key, _)| key).collect();
    for batch in keys.chunks(BUILD_BATCH) {
        transact::<_, MeshError>(store, |txn| {
            let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for key in batch {
                // Read again inside the transaction: a registration may have changed or removed it meanwhile.
                let Some(bytes) = txn.get(Table::Workloads, key)? else { continue };
                let workload = decode_workload(key, &bytes)?;
                for address in &workload.addresses {
                    txn.put(Table::WorkloadAddresses, &address_key(address), key.as_bytes())?;
                }
                by_node.entry(workload.node.clone()).or_default().insert(key.clone());
            }
            for (node, keys) in by_node {
                let mut declared = declared_by(txn, &node)?;
                declared.extend(keys);
                records::put(txn, Table::NodeWorkloads, &node, &declared)?;
            }
            Ok(())
        })?;
    }
    transact::<_, MeshError>(store, |txn| Ok(records::put(txn, Table::Meta, INDEX_KEY, &INDEX_FORMAT)?))?;
    tracing::info!(workloads = keys.len(), "workload index built (address claims and each node's declaration)");
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::testing::{TestMesh, hello, refusal, workload};

    fn keys(mesh: &TestMesh) -> Vec<String> {
        mesh.current().workloads.keys().cloned().collect()
    }

    /// An address a node moves from one of its workloads to another stays its own; once the node stops declaring
    /// it, another node may claim it.
    #[test]
    fn an_address_moves_within_a_node_and_is_released_when_dropped() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.0.1"])])).unwrap();
        mesh.register(&n1, &hello(vec![workload("shop", "b", "b", &["10.0.0.1", "10.0.0.2"])])).unwrap();
        assert_eq!(keys(&mesh), ["shop/b"]);
        let err = mesh.register(&n2, &hello(vec![workload("shop", "c", "c", &["10.0.0.1"])])).unwrap_err();
        assert_eq!(
            refusal(&err),
            (
                "AlreadyExists",
                "address 10.0.0.1 of workload shop/c is already claimed by workload shop/b on node n1".into()
            )
        );
        // n1 keeps 10.0.0.2 only: 10.0.0.1 is free again, 10.0.0.2 still refused.
        mesh.register(&n1, &hello(vec![workload("shop", "b", "b", &["10.0.0.2"])])).unwrap();
        let err = mesh.register(&n2, &hello(vec![workload("shop", "c", "c", &["10.0.0.2"])])).unwrap_err();
        assert_eq!(
            refusal(&err),
            (
                "AlreadyExists",
                "address 10.0.0.2 of workload shop/c is already claimed by workload shop/b on node n1".into()
            )
        );
        mesh.register(&n2, &hello(vec![workload("shop", "c", "c", &["10.0.0.1"])])).unwrap();
        assert_eq!(keys(&mesh), ["shop/b", "shop/c"]);
        // A node that declares nothing any more releases everything.
        mesh.register(&n1, &hello(vec![])).unwrap();
        mesh.register(&n2, &hello(vec![workload("shop", "c", "c", &["10.0.0.1", "10.0.0.2"])])).unwrap();
        assert_eq!(keys(&mesh), ["shop/c"]);
    }

    /// An IPv6 address is one claim however it is written.
    #[test]
    fn an_address_is_claimed_in_its_canonical_form() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["fd00:7472::1"])])).unwrap();
        let err = mesh.register(&n2, &hello(vec![workload("shop", "b", "b", &["fd00:7472:0:0::1"])])).unwrap_err();
        assert_eq!(
            refusal(&err),
            (
                "AlreadyExists",
                "address fd00:7472:0:0::1 of workload shop/b is already claimed by workload shop/a on node n1".into()
            )
        );
        // Control: another address of the same network.
        mesh.register(&n2, &hello(vec![workload("shop", "b", "b", &["fd00:7472::2"])])).unwrap();
    }

    /// Revoking a node releases its addresses (and drops its declaration).
    #[test]
    fn revoking_a_node_releases_its_addresses() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.0.1"])])).unwrap();
        let claim = hello(vec![workload("shop", "b", "b", &["10.0.0.1"])]);
        assert_eq!(refusal(&mesh.register(&n2, &claim).unwrap_err()).0, "AlreadyExists");
        mesh.revoke_node("n1").unwrap();
        mesh.register(&n2, &claim).unwrap();
        assert_eq!(keys(&mesh), ["shop/b"]);
        let store = mesh.store();
        assert_eq!(store.get(Table::NodeWorkloads, "n1").unwrap(), None);
        assert_eq!(store.get(Table::WorkloadAddresses, "10.0.0.1").unwrap(), Some(b"shop/b".to_vec()));
    }

    /// Forgets the index, as in a store written before it existed.
    fn forget_index(store: &dyn Store) {
        transact::<_, StoreError>(store, |txn| {
            for table in [Table::WorkloadAddresses, Table::NodeWorkloads] {
                for (key, _) in txn.list(table)? {
                    txn.delete(table, &key)?;
                }
            }
            txn.delete(Table::Meta, INDEX_KEY)
        })
        .unwrap();
    }

    /// A store made before the index (workloads, no index) gets it built once: address claims are refused and a
    /// node's new declaration replaces its old one, exactly as with an index kept from the start.
    #[test]
    fn the_index_is_built_for_a_store_that_predates_it() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        let many: Vec<_> =
            (0..45).map(|i| workload("shop", &format!("w{i}"), "a", &[&format!("10.0.1.{i}")])).collect();
        mesh.register(&n1, &hello(many)).unwrap();
        mesh.register(&n2, &hello(vec![workload("shop", "x", "x", &["10.0.2.1"])])).unwrap();
        let store = mesh.store();
        let index = |table| store.list(table).unwrap();
        let (addresses, nodes) = (index(Table::WorkloadAddresses), index(Table::NodeWorkloads));
        assert_eq!((addresses.len(), nodes.len()), (46, 2));
        forget_index(store);

        assert_eq!(build_index(store).unwrap(), 46, "every workload indexed (in several transactions)");
        assert_eq!(index(Table::WorkloadAddresses), addresses, "the same index as kept from the start");
        assert_eq!(index(Table::NodeWorkloads), nodes);
        assert_eq!(build_index(store).unwrap(), 0, "built once");

        let err = mesh.register(&n2, &hello(vec![workload("shop", "y", "y", &["10.0.1.7"])])).unwrap_err();
        assert_eq!(
            refusal(&err),
            (
                "AlreadyExists",
                "address 10.0.1.7 of workload shop/y is already claimed by workload shop/w7 on node n1".into()
            )
        );
        mesh.register(&n1, &hello(vec![workload("shop", "w0", "a", &["10.0.1.0"])])).unwrap();
        assert_eq!(keys(&mesh), ["shop/w0", "shop/x"], "n1's new declaration replaced its 45 workloads");
    }

    /// Control for the test above: without the build, the forgotten index misses both the claim and the previous
    /// declaration (so the test above shows what the build does).
    #[test]
    fn without_the_build_a_forgotten_index_misses_claims() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.1.7"])])).unwrap();
        forget_index(mesh.store());
        mesh.register(&n2, &hello(vec![workload("shop", "y", "y", &["10.0.1.7"])])).unwrap();
        mesh.register(&n1, &hello(vec![workload("shop", "b", "b", &["10.0.1.8"])])).unwrap();
        assert_eq!(keys(&mesh), ["shop/a", "shop/b", "shop/y"]);
    }

    /// A stale address entry (its workload gone, or holding other addresses now) never refuses a claim.
    #[test]
    fn a_stale_entry_is_no_claim() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.0.1"])])).unwrap();
        transact::<_, StoreError>(mesh.store(), |txn| {
            txn.put(Table::WorkloadAddresses, "10.0.0.8", b"shop/a")?;
            txn.put(Table::WorkloadAddresses, "10.0.0.9", b"shop/gone")
        })
        .unwrap();
        mesh.register(&n2, &hello(vec![workload("shop", "b", "b", &["10.0.0.8", "10.0.0.9"])])).unwrap();
        let entry = |address| mesh.store().get(Table::WorkloadAddresses, address).unwrap();
        assert_eq!((entry("10.0.0.8"), entry("10.0.0.9")), (Some(b"shop/b".to_vec()), Some(b"shop/b".to_vec())));
        // Control: an entry that is true still refuses.
        let err = mesh.register(&n2, &hello(vec![workload("shop", "b", "b", &["10.0.0.1"])])).unwrap_err();
        assert_eq!(refusal(&err).0, "AlreadyExists");
    }
}
