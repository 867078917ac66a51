//! Status entries each replica keeps in etcd under a lease of its own (`<prefix>status/<replica>/<key>`): the
//! lease is kept alive by the replica's publisher; when the replica dies (or cannot reach etcd for longer than
//! [`STATUS_LEASE_TTL`]), etcd deletes its entries. Writes go in batches, each one etcd transaction.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, TxnOp, TxnOpResponse};

use super::etcd::EtcdStore;
use super::{LeasedStatus, StoreError};

/// The key segment under the prefix.
pub const STATUS: &str = "status/";
/// How long a replica's entries outlive its last keep-alive.
pub const STATUS_LEASE_TTL: Duration = Duration::from_secs(10);
/// Operations per etcd transaction (etcd's default `--max-txn-ops` is 128).
const BATCH: usize = 100;

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
        for batch in entries.chunks(BATCH) {
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
