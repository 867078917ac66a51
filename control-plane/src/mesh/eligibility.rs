//! The *eligibility epoch* (`meta/certificate_eligibility`), kept for replicas of the previous version during a
//! rolling upgrade on etcd: they log workload certificates in batches whose transaction compares only this key at
//! commit, trusting every change that can make a certificate refusable (a node's or an identity's revocation) to
//! bump it. So this version's revocations still bump it, and such a batch committed meanwhile is run again and
//! refused (or is in the log the revocation reads). This version reads it nowhere: its workload certificates are
//! not logged (their serials carry the node's tag, `serial_tag.rs`).

use crate::records;
use crate::store::{StoreError, Txn};

/// The epoch's key in the meta table.
const EPOCH: &str = "certificate_eligibility";

/// In a transaction that revokes a node or an identity: bumps the epoch (see the module's doc).
pub(super) fn changed(txn: &mut dyn Txn) -> Result<(), StoreError> {
    records::bump(txn, EPOCH).map(|_| ())
}
