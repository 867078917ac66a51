//! The workload registry: each node declares the workloads it fronts (in its proxy's Hello); a declaration
//! replaces the node's previous one, and is refused whole if a name or an address is another node's. The index in
//! `claims.rs` finds the node's previous declaration and each address's holder, so a registration reads and writes
//! what it declares (and what it declared before), whatever the size of the mesh.

use std::sync::Arc;

use prost::Message;
use trellis_proto::v1 as pb;

use super::{Mesh, MeshError, claims, decode_workload, hello};
use crate::records::{self, META_VERSION, NodeRecord};
use crate::store::{StoreError, Table, Txn};

impl Mesh {
    /// Replaces the set of workloads `node` fronts with the ones its proxy declared.
    pub fn register(&self, node: &NodeRecord, hello: &pb::Hello) -> Result<u64, MeshError> {
        let declared = hello::validate(node, hello, &self.config.trust_domain)?;
        let (version, changed, removed) = self.write(
            |txn| {
                // What this node declared before, found through its index entry (no scan of the registry).
                let before = claims::load_declared(txn, &node.name)?;
                let mut changed = Vec::new();
                for (key, w) in &declared {
                    if declared_name_clash(txn, key, &node.name)? {
                        return Err(MeshError::AlreadyExists(format!(
                            "workload {key} is already declared by another node"
                        )));
                    }
                    for address in &w.addresses {
                        if let Some((other, holder)) = claims::holder(txn, address)?
                            && holder.node != node.name
                        {
                            return Err(MeshError::AlreadyExists(format!(
                                "address {address} of workload {key} is already claimed by workload {other} on node {}",
                                holder.node
                            )));
                        }
                    }
                    let bytes = w.encode_to_vec();
                    if txn.get(Table::Workloads, key)?.as_deref() != Some(bytes.as_slice()) {
                        txn.put(Table::Workloads, key, &bytes)?;
                        changed.push((key.clone(), w.clone()));
                    }
                }
                let removed: Vec<String> = before.keys().filter(|k| !declared.contains_key(*k)).cloned().collect();
                for key in &removed {
                    txn.delete(Table::Workloads, key)?;
                }
                claims::reindex(txn, &before, &declared)?;
                claims::set_declared_by(txn, &node.name, &declared.keys().cloned().collect())?;
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
}

/// A workload name declared by another node (names are unique per namespace across the mesh).
fn declared_name_clash(txn: &dyn Txn, key: &str, node: &str) -> Result<bool, StoreError> {
    Ok(match txn.get(Table::Workloads, key)? {
        Some(bytes) => decode_workload(key, &bytes)?.node != node,
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use crate::mesh::testing::{TestMesh, hello, refusal, workload};

    #[test]
    fn an_address_belongs_to_one_node() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.0.1"])])).unwrap();
        let version = mesh.current().version;

        let claim = hello(vec![workload("shop", "c", "c", &["10.0.0.3"]), workload("shop", "b", "b", &["10.0.0.1"])]);
        let err = mesh.register(&n2, &claim).unwrap_err();
        assert_eq!(
            refusal(&err),
            (
                "AlreadyExists",
                "address 10.0.0.1 of workload shop/b is already claimed by workload shop/a on node n1".into()
            )
        );
        let workloads: Vec<String> = mesh.current().workloads.keys().cloned().collect();
        assert_eq!(workloads, ["shop/a"], "a refused declaration registered part of itself");
        assert_eq!(mesh.current().version, version);

        // Control: the same declaration with a free address.
        let free = hello(vec![workload("shop", "c", "c", &["10.0.0.3"]), workload("shop", "b", "b", &["10.0.0.2"])]);
        assert_eq!(mesh.register(&n2, &free).unwrap(), version + 1);
        assert_eq!(mesh.current().workloads["shop/b"].node, "n2");
    }

    #[test]
    fn a_workload_name_belongs_to_one_node() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.0.1"])])).unwrap();
        let err = mesh.register(&n2, &hello(vec![workload("shop", "a", "a", &["10.0.0.2"])])).unwrap_err();
        assert_eq!(refusal(&err), ("AlreadyExists", "workload shop/a is already declared by another node".into()));
        // Control: the node that declared it may declare it again, changed.
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.0.2"])])).unwrap();
        assert_eq!(mesh.current().workloads["shop/a"].addresses, ["10.0.0.2"]);
    }

    #[test]
    fn a_declaration_replaces_the_previous_one() {
        let mesh = TestMesh::new();
        let n1 = mesh.joined("n1", &["shop"]);
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.0.1"])])).unwrap();
        let version = mesh.register(&n1, &hello(vec![workload("shop", "b", "b", &["10.0.0.1"])])).unwrap();
        let workloads: Vec<String> = mesh.current().workloads.keys().cloned().collect();
        assert_eq!(workloads, ["shop/b"]);
        assert_eq!(mesh.register(&n1, &hello(vec![workload("shop", "b", "b", &["10.0.0.1"])])).unwrap(), version);
        assert_eq!(mesh.current().version, version, "an unchanged declaration publishes nothing");
    }
}
