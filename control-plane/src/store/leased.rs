//! Status entries each replica keeps in etcd under a lease of its own (`<prefix>_status/<replica>/<key>`): the
//! lease is kept alive by the replica's publisher; when the replica dies (or cannot reach etcd for longer than
//! [`STATUS_LEASE_TTL`]), etcd deletes its entries. Writes go in batches, each one etcd transaction.
//!
//! `_` sorts before every table's name (all lowercase), so the status keys lie outside the range of the tables a
//! replica follows (`mesh::FOLLOWED`, `meta/` to `workloads/`): a watch of that range never carries them.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, TxnOp, TxnOpResponse};

use super::etcd::EtcdStore;
use super::{LeasedStatus, StoreError};

/// The key segment under the prefix (outside the followed tables' range: see above).
pub const STATUS: &str = "_status/";
/// How long a replica's entries outlive its last keep-alive.
pub const STATUS_LEASE_TTL: Duration = Duration::from_secs(10);
/// Operations per etcd transaction (etcd's default `--max-txn-ops` is 128).
const BATCH: usize = 100;
/// Value bytes per etcd transaction (etcd's default `--max-request-bytes` is 1.5 MiB; an entry may group many
/// proxies).
const BATCH_BYTES: usize = 512 * 1024;

impl EtcdStore {
    fn status_prefix(&self) -> String {
        format!("{}{STATUS}", self.prefix())
    }

    fn grant(&self) -> Result<i64, StoreError> {
        let members = self.members();
        let ttl = STATUS_LEASE_TTL.as_secs() as i64;
        let granted =
            self.run(async move { members.call(|mut c| async move { c.lease_grant(ttl, None).await }).await })?;
        Ok(granted.id())
    }

    /// One keep-alive round trip: whether the lease still lives.
    fn refresh(&self, id: i64) -> Result<bool, StoreError> {
        let members = self.members();
        let ttl = self.run(async move {
            members
                .call(|mut c| async move {
                    let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    Ok(stream.message().await?.map_or(0, |r| r.ttl()))
                })
                .await
        })?;
        Ok(ttl > 0)
    }
}

/// A key and its value to put (Some) or nothing to delete (None).
type Write = (String, Option<Vec<u8>>);

/// `entries` cut into transactions of at most [`BATCH`] operations and (unless one value alone is larger)
/// [`BATCH_BYTES`] value bytes.
fn batches(entries: &[Write]) -> Vec<&[Write]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (key, value)) in entries.iter().enumerate() {
        let size = key.len() + value.as_ref().map_or(0, Vec::len);
        if i > start && (i - start == BATCH || bytes + size > BATCH_BYTES) {
            out.push(&entries[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

impl LeasedStatus for EtcdStore {
    fn keep_alive(&self) -> Result<i64, StoreError> {
        let current = *self.lease.lock().expect("lease lock");
        if current != 0 && self.refresh(current)? {
            return Ok(current);
        }
        if current != 0 {
            tracing::warn!(lease = current, "status lease expired; writing this replica's status again");
        }
        let id = self.grant()?;
        *self.lease.lock().expect("lease lock") = id;
        Ok(id)
    }

    fn write(&self, lease: i64, replica: &str, entries: &[(String, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let base = format!("{}{replica}/", self.status_prefix());
        for batch in batches(entries) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(key, value)| match value {
                    Some(value) => {
                        TxnOp::put(format!("{base}{key}"), value.clone(), Some(PutOptions::new().with_lease(lease)))
                    }
                    None => TxnOp::delete(format!("{base}{key}"), None),
                })
                .collect();
            let request = etcd_client::Txn::new().and_then(ops);
            let members = self.members();
            self.run(async move {
                members
                    .call(|mut c| {
                        let request = request.clone();
                        async move { c.txn(request).await }
                    })
                    .await
            })?;
        }
        Ok(())
    }

    fn claim(&self, lease: i64, role: &str, replica: &str) -> Result<String, StoreError> {
        let key = format!("{}_{role}", self.status_prefix());
        let request = etcd_client::Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), replica, Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key, None)]);
        let members = self.members();
        let response = self.run(async move {
            members
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.txn(request).await }
                })
                .await
        })?;
        if response.succeeded() {
            return Ok(replica.to_owned());
        }
        let holder = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        // Gone between the compare and the read: nobody holds it; the next claim takes it.
        Ok(holder.unwrap_or_default())
    }

    fn release(&self) -> Result<(), StoreError> {
        let id = std::mem::take(&mut *self.lease.lock().expect("lease lock"));
        if id == 0 {
            return Ok(());
        }
        let members = self.members();
        self.run(async move { members.call(|mut c| async move { c.lease_revoke(id).await }).await })?;
        Ok(())
    }

    fn list_all(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let prefix = self.status_prefix();
        let members = self.members();
        let key = prefix.clone();
        let response = self.run(async move {
            members
                .call(|mut c| {
                    let key = key.clone();
                    async move { c.get(key, Some(GetOptions::new().with_prefix().with_serializable())).await }
                })
                .await
        })?;
        let mut out = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let rest = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            if let Some((replica, key)) = rest.split_once('/') {
                out.push((replica.to_owned(), key.to_owned(), kv.value().to_vec()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_etcd;

    #[test]
    fn a_batch_holds_at_most_its_operations_and_bytes() {
        let entry = |size: usize| ("k".to_owned(), Some(vec![0u8; size]));
        let many: Vec<_> = (0..250).map(|_| entry(10)).collect();
        let sizes: Vec<usize> = batches(&many).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        let big: Vec<_> = (0..5).map(|_| entry(200 * 1024)).collect();
        let sizes: Vec<usize> = batches(&big).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [2, 2, 1], "512 KiB of values at most");
        let huge = vec![entry(BATCH_BYTES + 1), entry(1)];
        let sizes: Vec<usize> = batches(&huge).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [1, 1], "a value larger than a batch goes alone");
        assert!(batches(&[]).is_empty());
    }

    /// Status keys sort outside the followed tables' range, so a watch of that range does not carry them.
    #[test]
    fn status_keys_sort_outside_the_followed_tables() {
        let names: Vec<&str> = crate::mesh::FOLLOWED.iter().map(|t| t.name()).collect();
        let (first, last) = (names.iter().min().unwrap(), names.iter().max().unwrap());
        let key = format!("{STATUS}replica-0/_proxies-00");
        assert!(key.as_str() < *first && !key.starts_with(last), "{key} within {first}..{last}");
        for table in crate::store::Table::ALL {
            assert!(STATUS < table.name(), "{} sorts before {STATUS}", table.name());
        }
    }

    #[test]
    fn entries_live_with_their_replicas_lease_and_a_role_has_one_holder() {
        let options = test_etcd::options();
        let (one, two) = (EtcdStore::connect(&options).unwrap(), EtcdStore::connect(&options).unwrap());
        let lease_one = one.keep_alive().unwrap();
        assert_eq!(one.keep_alive().unwrap(), lease_one, "kept alive, not granted again");
        let lease_two = two.keep_alive().unwrap();
        // More entries than one transaction takes: written in batches.
        let many: Vec<(String, Option<Vec<u8>>)> =
            (0..250).map(|i| (format!("node-{i:03}"), Some(format!("v{i}").into_bytes()))).collect();
        one.write(lease_one, "r1", &many).unwrap();
        two.write(lease_two, "r2", &[("node-x".into(), Some(b"x".to_vec()))]).unwrap();
        let listed = two.list_all().unwrap();
        assert_eq!(listed.iter().filter(|(r, _, _)| r == "r1").count(), 250);
        assert!(listed.contains(&("r1".into(), "node-007".into(), b"v7".to_vec())));
        assert!(listed.contains(&("r2".into(), "node-x".into(), b"x".to_vec())));
        // A delete.
        one.write(lease_one, "r1", &[("node-000".into(), None)]).unwrap();
        assert!(!two.list_all().unwrap().iter().any(|(r, k, _)| r == "r1" && k == "node-000"));

        // One holder for a role; the other replica is told who.
        assert_eq!(one.claim(lease_one, "driver", "r1").unwrap(), "r1");
        assert_eq!(two.claim(lease_two, "driver", "r2").unwrap(), "r1");
        assert_eq!(one.claim(lease_one, "driver", "r1").unwrap(), "r1", "kept by its holder");
        // The role's key is not taken for a replica's entry.
        assert!(!two.list_all().unwrap().iter().any(|(_, k, _)| k.contains("driver")));

        // r1's lease goes (as when it dies and its TTL passes): its entries and its role go with it.
        one.release().unwrap();
        let listed = two.list_all().unwrap();
        assert!(!listed.iter().any(|(r, _, _)| r == "r1"), "{} entries of r1 left", listed.len());
        assert_eq!(listed.len(), 1);
        assert_eq!(two.claim(lease_two, "driver", "r2").unwrap(), "r2", "the role is free again");
        // A replica whose lease went gets a new one (and rewrites its entries).
        assert_ne!(one.keep_alive().unwrap(), lease_one);
    }
}
