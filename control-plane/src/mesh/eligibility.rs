//! Whether a workload certificate may still be logged: its node joined and is not revoked, and its identity is not
//! revoked; and the *eligibility epoch* that lets a batch of the certificate log check that with one compare.
//!
//! Every change that can make a certificate refusable (a node revoked: `nodes.rs`; an identity revoked:
//! `revocations.rs`) bumps the epoch (`meta/certificate_eligibility`) in its own transaction. The certificate
//! log's transaction reads the epoch and then the node records and revoked-identity keys its batch names
//! ([`Txn::get_many_guarded`]), and compares only the epoch at commit: if it is unchanged, none of what was read can
//! have changed in a way that refuses a record. Writers of the two tables that never make a certificate refusable
//! do not bump it: a join (a new node, or a joined one again: refused when revoked), a renewal (a new credential
//! serial). Nothing removes a node record or a revoked identity.

use std::collections::{BTreeMap, BTreeSet};

use crate::records::{self, CertRecord, NodeRecord};
use crate::store::{StoreError, Table, Txn};

/// The epoch's key in the meta table.
pub(super) const EPOCH: &str = "certificate_eligibility";

/// In a transaction that may make a logged certificate refusable: bumps the epoch, so that every certificate-log
/// transaction that read it before runs again on fresh reads.
pub(super) fn changed(txn: &mut dyn Txn) -> Result<(), StoreError> {
    records::bump(txn, EPOCH).map(|_| ())
}

/// For each record of `batch`, in order: why it must be refused (None: it may be logged), from the node records and
/// revoked-identity keys read after the epoch, in one read; only the epoch is compared at commit.
pub(super) fn refusals(txn: &dyn Txn, batch: &[CertRecord]) -> Result<Vec<Option<String>>, StoreError> {
    let nodes: BTreeSet<&str> = batch.iter().map(|r| r.node.as_str()).collect();
    let identities: BTreeSet<&str> = batch.iter().map(|r| r.identity.as_str()).collect();
    let keys: Vec<(Table, &str)> = (nodes.iter().map(|n| (Table::Nodes, *n)))
        .chain(identities.iter().map(|i| (Table::RevokedIdentities, *i)))
        .collect();
    let (_epoch, values) = txn.get_many_guarded((Table::Meta, EPOCH), &keys)?;
    let (node_values, identity_values) = values.split_at(nodes.len());
    let mut node_records = BTreeMap::new();
    for (node, bytes) in nodes.iter().zip(node_values) {
        let record = bytes.as_deref().map(|b| records::decode::<NodeRecord>(Table::Nodes, node, b)).transpose()?;
        node_records.insert(*node, record);
    }
    let revoked: BTreeSet<&str> =
        identities.iter().zip(identity_values).filter(|(_, v)| v.is_some()).map(|(i, _)| *i).collect();
    Ok(batch
        .iter()
        .map(|record| match node_records.get(record.node.as_str()) {
            Some(Some(node)) if node.revoked => Some(format!("node {:?} was revoked", record.node)),
            Some(Some(_)) => {
                revoked.contains(record.identity.as_str()).then(|| format!("identity {} was revoked", record.identity))
            }
            _ => Some(format!("node {:?} has not joined", record.node)),
        })
        .collect())
}
