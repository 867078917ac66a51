//! The certificate log's layout in the store (`certificates` table), above the store seam so that both backends
//! keep the same: one key per batch of records, `batch-<latest not_after, 20 digits>-<first record's serial>`,
//! whose value is the batch's records (a JSON array). Node credentials, logged in the transaction that writes their
//! node's record, are batches of one; workload certificates are no longer logged (their serials carry the node's
//! tag, `serial_tag.rs`), but the batches of them that earlier versions wrote are read as before.
//!
//! Stores written before batches hold one key per certificate (its serial, hex, which never starts with `batch-`)
//! whose value is one record: every reader here takes both, and [`expired`] finds both kinds once all their records
//! have expired (deleted by `Mesh::forget_expired_certificates` and by a node's revocation, which lists the log).

use crate::records::{self, CertRecord};
use crate::store::{StoreError, Table, Txn};

/// Keys of batches start with this; a serial (hex) never does.
const BATCH: &str = "batch-";

/// Writes `batch` (not empty) under one key.
pub(super) fn append(txn: &mut dyn Txn, batch: &[&CertRecord]) -> Result<(), StoreError> {
    let first = batch.first().expect("a batch holds a record");
    let latest = batch.iter().map(|r| r.not_after).max().unwrap_or(0).max(0);
    let key = format!("{BATCH}{latest:020}-{}", first.serial);
    txn.put(Table::Certificates, &key, &serde_json::to_vec(batch).expect("records serialize"))
}

/// The records under one key of the log: a batch's, or (the layout before batches) one certificate's.
pub(super) fn decode(key: &str, bytes: &[u8]) -> Result<Vec<CertRecord>, StoreError> {
    if key.starts_with(BATCH) {
        records::decode(Table::Certificates, key, bytes)
    } else {
        Ok(vec![records::decode(Table::Certificates, key, bytes)?])
    }
}

/// Every record of the log's entries (as listed).
pub(super) fn all(entries: &[(String, Vec<u8>)]) -> Result<Vec<CertRecord>, StoreError> {
    let mut all = Vec::with_capacity(entries.len());
    for (key, bytes) in entries {
        all.extend(decode(key, bytes)?);
    }
    Ok(all)
}

/// The keys among `entries` whose every record has expired at `now`.
pub(super) fn expired(entries: &[(String, Vec<u8>)], now: i64) -> Result<Vec<String>, StoreError> {
    let mut keys = Vec::new();
    for (key, bytes) in entries {
        if decode(key, bytes)?.iter().all(|r| r.not_after <= now) {
            keys.push(key.clone());
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(serial: &str, not_after: i64) -> CertRecord {
        CertRecord {
            serial: serial.into(),
            identity: "spiffe://t/ns/a/sa/b".into(),
            node: "n1".into(),
            issued_at: 0,
            not_after,
            issuer: String::new(),
        }
    }

    /// Both layouts decode, and a key is expired only when all its records are.
    #[test]
    fn batches_and_single_records_decode_and_expire_whole() {
        let batch = serde_json::to_vec(&[record("0a", 10), record("0b", 20)]).unwrap();
        let single = serde_json::to_vec(&record("0c", 15)).unwrap();
        let entries = vec![("batch-00000000000000000020-0a".to_owned(), batch), ("0c".to_owned(), single)];
        let serials: Vec<String> = all(&entries).unwrap().into_iter().map(|r| r.serial).collect();
        assert_eq!(serials, ["0a", "0b", "0c"]);
        assert_eq!(expired(&entries, 14).unwrap(), Vec::<String>::new());
        assert_eq!(expired(&entries, 15).unwrap(), ["0c"], "one of the batch's records has not expired");
        assert_eq!(expired(&entries, 20).unwrap(), ["batch-00000000000000000020-0a", "0c"]);
        // A record where a batch is expected (and the reverse) is corrupt, named by its key.
        let wrong = vec![("batch-1-x".to_owned(), serde_json::to_vec(&record("x", 1)).unwrap())];
        assert!(matches!(all(&wrong), Err(StoreError::Corrupt { key, .. }) if key == "batch-1-x"));
    }
}
