//! Durable state behind a deliberately narrow interface: tables of byte values by string key, read directly or
//! inside an atomic read-modify-write transaction. That is all a distributed backend (etcd's transactions, for
//! several replicas) needs to provide; the one here is redb, an embedded ACID store in the data dir.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Resources,
    Tokens,
    Nodes,
    Workloads,
    Certificates,
    Meta,
    /// Certificates of revoked nodes, by serial.
    RevokedCertificates,
    /// Revoked workload identities, by SPIFFE ID.
    RevokedIdentities,
    /// Admin credentials, by name.
    Admins,
}

impl Table {
    const ALL: [Table; 9] = [
        Table::Resources,
        Table::Tokens,
        Table::Nodes,
        Table::Workloads,
        Table::Certificates,
        Table::Meta,
        Table::RevokedCertificates,
        Table::RevokedIdentities,
        Table::Admins,
    ];

    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(match self {
            Table::Resources => "resources",
            Table::Tokens => "tokens",
            Table::Nodes => "nodes",
            Table::Workloads => "workloads",
            Table::Certificates => "certificates",
            Table::Meta => "meta",
            Table::RevokedCertificates => "revoked_certificates",
            Table::RevokedIdentities => "revoked_identities",
            Table::Admins => "admins",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Backend(String),
    #[error("store: corrupt value in {table:?}/{key}: {reason}")]
    Corrupt { table: Table, key: String, reason: String },
    /// The transaction's closure failed; nothing was written.
    #[error("transaction aborted")]
    Aborted,
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

macro_rules! backend_errors {
    ($($t:ty),*) => {$(impl From<$t> for StoreError {
        fn from(e: $t) -> Self { StoreError::Backend(e.to_string()) }
    })*};
}
backend_errors!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// Reads and writes inside one atomic transaction.
pub trait Txn {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError>;
}

pub trait Store: Send + Sync + 'static {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Runs `f` in a transaction; commits what it wrote if it returns Ok, discards everything otherwise.
    fn update(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), StoreError>) -> Result<(), StoreError>;
}

/// Runs `f` atomically and hands back its own result or error (the store's errors convert into `E`).
pub fn transact<T, E: From<StoreError>>(
    store: &dyn Store,
    mut f: impl FnMut(&mut dyn Txn) -> Result<T, E>,
) -> Result<T, E> {
    let mut outcome: Option<Result<T, E>> = None;
    let result = store.update(&mut |txn| match f(txn) {
        Ok(value) => {
            outcome = Some(Ok(value));
            Ok(())
        }
        Err(e) => {
            outcome = Some(Err(e));
            Err(StoreError::Aborted)
        }
    });
    match (result, outcome) {
        (Ok(()), Some(Ok(value))) => Ok(value),
        (_, Some(Err(e))) => Err(e),
        (Err(e), _) => Err(e.into()),
        (Ok(()), None) => unreachable!("update ran the closure"),
    }
}

pub struct RedbStore {
    db: redb::Database,
}

pub const STORE_FILE: &str = "store.redb";

impl RedbStore {
    /// Opens (creating if needed) the store and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Database::create(path)?;
        let txn = db.begin_write()?;
        for table in Table::ALL {
            txn.open_table(table.definition())?;
        }
        txn.commit()?;
        Ok(Self { db })
    }
}

fn collect<T: ReadableTable<&'static str, &'static [u8]>>(table: &T) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        out.push((key.value().to_owned(), value.value().to_vec()));
    }
    Ok(out)
}

impl Store for RedbStore {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table.definition())?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        collect(&txn.open_table(table.definition())?)
    }

    fn update(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let mut txn = RedbTxn { txn: self.db.begin_write()? };
        match f(&mut txn) {
            Ok(()) => Ok(txn.txn.commit()?),
            Err(e) => {
                txn.txn.abort()?;
                Err(e)
            }
        }
    }
}

struct RedbTxn {
    txn: redb::WriteTransaction,
}

impl Txn for RedbTxn {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.txn.open_table(table.definition())?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        collect(&self.txn.open_table(table.definition())?)
    }

    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.txn.open_table(table.definition())?.insert(key, value)?;
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError> {
        self.txn.open_table(table.definition())?.remove(key)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborted_transaction_writes_nothing_and_data_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("trellis-store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(STORE_FILE);
        let _ = std::fs::remove_file(&path);
        {
            let store = RedbStore::open(&path).unwrap();
            transact::<_, StoreError>(&store, |txn| txn.put(Table::Meta, "a", b"1")).unwrap();
            let failed: Result<(), StoreError> = transact(&store, |txn| {
                txn.put(Table::Meta, "b", b"2")?;
                Err(StoreError::Backend("boom".into()))
            });
            assert!(failed.is_err());
            assert_eq!(store.get(Table::Meta, "b").unwrap(), None);
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get(Table::Meta, "a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.list(Table::Meta).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
