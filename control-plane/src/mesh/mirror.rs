//! A replica's image of what its snapshot derives from in a shared store: the config version, resources, registry
//! and revocation records, kept up to date by applying the store's changes ([`Change`]) key by key, so that a
//! change costs the keys it wrote, not a reread of the whole store.
//!
//! A value that does not decode is logged and treated as absent (the rest of the change still applies): one corrupt
//! record must not freeze every other replica's view of the mesh.

use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_proto::v1 as pb;

use super::{decode_workload, now_unix, revocations, to_pb_resource};
use crate::records::{self, META_VERSION, NodeRecord, ResourceRecord};
use crate::rotation::{RECORD_KEY, RotationRecord};
use crate::store::{Change, StoreError, Table};

/// The tables a snapshot derives from (what a replica follows).
pub const FOLLOWED: [Table; 6] = [
    Table::Meta,
    Table::Resources,
    Table::Workloads,
    Table::RevokedCertificates,
    Table::RevokedIdentities,
    Table::Nodes,
];

#[derive(Debug, Default, Clone)]
pub struct Mirror {
    pub version: u64,
    pub resources: BTreeMap<String, Arc<pb::Resource>>,
    pub workloads: BTreeMap<String, Arc<pb::Workload>>,
    /// The revocation tables' raw records, from which `revocations` is rebuilt when they change (they are small).
    revoked_certificates: BTreeMap<String, Vec<u8>>,
    revoked_identities: BTreeMap<String, Vec<u8>>,
    /// Revoked nodes (from their records: `revocations::revoked_nodes`), and when.
    revoked_nodes: BTreeMap<String, i64>,
    pub revocations: Arc<pb::Revocations>,
    /// The root CA rotation's record, raw (`rotation::RECORD_KEY` in the meta table).
    rotation: Option<Vec<u8>>,
    /// Whether nothing was applied yet (a follower must not publish an empty image).
    pub loaded: bool,
}

impl Mirror {
    /// Applies `change` in order; returns whether anything the snapshot shows changed.
    pub fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Reset(entries) => {
                *self = Mirror::default();
                for (table, key, value) in entries {
                    self.set(table, key, Some(value));
                }
                self.loaded = true;
                self.rebuild_revocations();
                true
            }
            Change::Delta(writes) => {
                let mut revocations = false;
                let mut changed = false;
                for (table, key, value) in writes {
                    let listed = matches!(table, Table::RevokedCertificates | Table::RevokedIdentities | Table::Nodes);
                    let set = self.set(table, key, value);
                    revocations |= listed && set;
                    changed |= set;
                }
                if revocations {
                    self.rebuild_revocations();
                }
                changed
            }
        }
    }

    /// Sets (Some) or removes (None) one key; returns whether a followed table changed.
    fn set(&mut self, table: Table, key: String, value: Option<Vec<u8>>) -> bool {
        match table {
            Table::Meta if key == META_VERSION => {
                self.version = match value.map(|v| records::decode::<u64>(table, &key, &v)) {
                    Some(Ok(version)) => version,
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "ignoring a corrupt config version");
                        return false;
                    }
                    None => 0,
                };
                true
            }
            Table::Meta if key == RECORD_KEY => {
                self.rotation = value;
                true
            }
            Table::Resources => {
                match value.map(|v| records::decode::<ResourceRecord>(table, &key, &v)) {
                    Some(Ok(record)) => {
                        self.resources.insert(key, Arc::new(to_pb_resource(&record)));
                    }
                    Some(Err(e)) => {
                        corrupt(e);
                        self.resources.remove(&key);
                    }
                    None => {
                        self.resources.remove(&key);
                    }
                }
                true
            }
            Table::Workloads => {
                match value.map(|v| decode_workload(&key, &v)) {
                    Some(Ok(workload)) => {
                        self.workloads.insert(key, Arc::new(workload));
                    }
                    Some(Err(e)) => {
                        corrupt(e);
                        self.workloads.remove(&key);
                    }
                    None => {
                        self.workloads.remove(&key);
                    }
                }
                true
            }
            Table::RevokedCertificates => {
                set_raw(&mut self.revoked_certificates, key, value);
                true
            }
            Table::RevokedIdentities => {
                set_raw(&mut self.revoked_identities, key, value);
                true
            }
            // Only whether a node is revoked matters here (joins and renewals rewrite records too).
            Table::Nodes => {
                let revoked = match value.map(|v| records::decode::<NodeRecord>(table, &key, &v)) {
                    Some(Ok(record)) => record.revoked.then(|| record.revoked_at.unwrap_or(0)),
                    Some(Err(e)) => {
                        corrupt(e);
                        None
                    }
                    None => None,
                };
                let before = match revoked {
                    Some(at) => self.revoked_nodes.insert(key, at),
                    None => self.revoked_nodes.remove(&key),
                };
                before != revoked
            }
            _ => false,
        }
    }

    /// The rotation's record, if there is one that decodes.
    pub fn rotation(&self) -> Option<RotationRecord> {
        let bytes = self.rotation.as_ref()?;
        records::decode(Table::Meta, RECORD_KEY, bytes)
            .map_err(|e| tracing::error!(error = %e, "ignoring a corrupt rotation record"))
            .ok()
    }

    fn rebuild_revocations(&mut self) {
        let entries = |m: &BTreeMap<String, Vec<u8>>| -> Vec<(String, Vec<u8>)> {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let built = revocations::build(
            entries(&self.revoked_certificates),
            entries(&self.revoked_identities),
            self.revoked_nodes.iter().map(|(node, at)| (node.clone(), *at)).collect(),
            now_unix(),
        );
        match built {
            Ok(list) => self.revocations = Arc::new(list),
            Err(e) => tracing::error!(error = %e, "keeping the last revocation list: a revocation record is corrupt"),
        }
    }
}

fn set_raw(map: &mut BTreeMap<String, Vec<u8>>, key: String, value: Option<Vec<u8>>) {
    match value {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
}

fn corrupt(e: StoreError) {
    tracing::error!(error = %e, "a record in the store does not decode; treated as absent");
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::records::{RevokedCertRecord, RevokedIdentityRecord};

    fn resource(name: &str, revision: u64) -> (Table, String, Vec<u8>) {
        let record = ResourceRecord {
            kind: "AuthorizationPolicy".into(),
            namespace: "ns".into(),
            name: name.into(),
            revision,
            json: format!("{{\"r\":{revision}}}"),
        };
        (Table::Resources, record.store_key(), serde_json::to_vec(&record).unwrap())
    }

    fn workload(name: &str, address: &str) -> (Table, String, Vec<u8>) {
        let w = pb::Workload {
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![address.into()],
            node: "n".into(),
            ..Default::default()
        };
        (Table::Workloads, format!("ns/{name}"), w.encode_to_vec())
    }

    fn version(v: u64) -> (Table, String, Vec<u8>) {
        (Table::Meta, META_VERSION.into(), v.to_string().into_bytes())
    }

    fn put((t, k, v): (Table, String, Vec<u8>)) -> (Table, String, Option<Vec<u8>>) {
        (t, k, Some(v))
    }

    fn reset() -> Mirror {
        let mut m = Mirror::default();
        assert!(m.apply(Change::Reset(vec![
            version(3),
            resource("a", 1),
            resource("b", 1),
            workload("w1", "10.0.0.1")
        ])));
        m
    }

    #[test]
    fn a_reset_replaces_everything() {
        let mut m = reset();
        assert!(m.loaded);
        assert_eq!(m.version, 3);
        assert_eq!(m.resources.keys().collect::<Vec<_>>(), ["AuthorizationPolicy/ns/a", "AuthorizationPolicy/ns/b"]);
        assert_eq!(m.workloads.len(), 1);
        m.apply(Change::Reset(vec![version(9), resource("c", 2)]));
        assert_eq!(m.version, 9);
        assert_eq!(m.resources.keys().collect::<Vec<_>>(), ["AuthorizationPolicy/ns/c"]);
        assert!(m.workloads.is_empty(), "what the reset does not hold is gone");
    }

    #[test]
    fn a_delta_changes_only_its_keys_in_order() {
        let mut m = reset();
        let untouched = m.resources["AuthorizationPolicy/ns/b"].clone();
        let changed = m.apply(Change::Delta(vec![
            put(resource("a", 2)),
            (Table::Resources, "AuthorizationPolicy/ns/a".into(), None),
            put(resource("a", 3)),
            put(workload("w2", "10.0.0.2")),
            (Table::Workloads, "ns/w1".into(), None),
            put(version(4)),
        ]));
        assert!(changed);
        assert_eq!(m.version, 4);
        assert_eq!(m.resources["AuthorizationPolicy/ns/a"].revision, 3, "the last write of a key wins");
        assert!(Arc::ptr_eq(&m.resources["AuthorizationPolicy/ns/b"], &untouched), "an untouched key is not rebuilt");
        assert_eq!(m.workloads.keys().collect::<Vec<_>>(), ["ns/w2"]);
        assert_eq!(m.workloads["ns/w2"].addresses, ["10.0.0.2"]);
    }

    #[test]
    fn revocations_follow_their_tables() {
        let mut m = reset();
        let future = now_unix() + 3600;
        let cert = RevokedCertRecord {
            serial: "01".into(),
            node: "n".into(),
            identity: "spiffe://td/ns/ns/sa/a".into(),
            not_after: future,
            revoked_at: 1,
        };
        let expired = RevokedCertRecord { serial: "02".into(), not_after: now_unix() - 1, ..cert.clone() };
        let identity = RevokedIdentityRecord { spiffe_id: "spiffe://td/ns/ns/sa/b".into(), revoked_at: 1 };
        let node = |revoked: bool| NodeRecord {
            name: "n".into(),
            namespaces: vec![],
            joined_at: 0,
            revoked,
            revoked_at: revoked.then_some(5),
            credential_serial: "0a".into(),
        };
        // A node's record that is not revoked (a join) changes nothing the snapshot shows.
        let joined = serde_json::to_vec(&node(false)).unwrap();
        assert!(!m.apply(Change::Delta(vec![(Table::Nodes, "n".into(), Some(joined))])));
        m.apply(Change::Delta(vec![
            (Table::RevokedCertificates, "01".into(), Some(serde_json::to_vec(&cert).unwrap())),
            (Table::RevokedCertificates, "02".into(), Some(serde_json::to_vec(&expired).unwrap())),
            (Table::RevokedIdentities, "b".into(), Some(serde_json::to_vec(&identity).unwrap())),
            (Table::Nodes, "n".into(), Some(serde_json::to_vec(&node(true)).unwrap())),
        ]));
        assert_eq!(m.revocations.certificates.iter().map(|c| c.serial.as_str()).collect::<Vec<_>>(), ["01"]);
        assert_eq!(m.revocations.identities.len(), 1);
        let tags: Vec<(&str, i64)> =
            m.revocations.nodes.iter().map(|n| (n.serial_tag.as_str(), n.revoked_at_unix)).collect();
        assert_eq!(tags, [(crate::serial_tag::NodeTag::of("n").hex().as_str(), 5)]);
        m.apply(Change::Delta(vec![(Table::RevokedIdentities, "b".into(), None)]));
        assert!(m.revocations.identities.is_empty());
        assert_eq!(m.revocations.certificates.len(), 1);
    }

    #[test]
    fn other_tables_and_keys_change_nothing() {
        let mut m = reset();
        assert!(!m.apply(Change::Delta(vec![
            (Table::Certificates, "x".into(), Some(b"{}".to_vec())),
            (Table::Meta, "resource_revision".into(), Some(b"7".to_vec())),
        ])));
        assert_eq!(m.version, 3);
    }

    #[test]
    fn a_corrupt_value_is_absent_and_the_rest_applies() {
        let mut m = reset();
        m.apply(Change::Delta(vec![
            (Table::Resources, "AuthorizationPolicy/ns/a".into(), Some(b"not json".to_vec())),
            put(resource("c", 1)),
            put(version(5)),
        ]));
        assert!(!m.resources.contains_key("AuthorizationPolicy/ns/a"));
        assert!(m.resources.contains_key("AuthorizationPolicy/ns/c"));
        assert_eq!(m.version, 5);
    }
}
