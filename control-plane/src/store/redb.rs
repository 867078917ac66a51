//! The embedded backend: redb, an ACID store in one file of the data dir (one process writes it).

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError, Table, Txn};

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
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
            txn.open_table(definition(table))?;
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
        let t = txn.open_table(definition(table))?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        collect(&txn.open_table(definition(table))?)
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
        let t = self.txn.open_table(definition(table))?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        collect(&self.txn.open_table(definition(table))?)
    }

    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.txn.open_table(definition(table))?.insert(key, value)?;
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError> {
        self.txn.open_table(definition(table))?.remove(key)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::transact;

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
