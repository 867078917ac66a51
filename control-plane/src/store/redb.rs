//! The embedded backend: redb, an ACID store in one file of the data dir (one process writes it).

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError, Table, Txn};

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Io(_) | redb::Error::PreviousIo => StoreError::Io(e.to_string()),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

macro_rules! backend_errors {
    ($($t:ty),*) => {$(impl From<$t> for StoreError {
        fn from(e: $t) -> Self { redb::Error::from(e).into() }
    })*};
}
backend_errors!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

pub struct RedbStore {
    path: PathBuf,
    /// `None` after a reopen failed: every call tries again.
    db: RwLock<Option<redb::Database>>,
}

pub const STORE_FILE: &str = "store.redb";

impl RedbStore {
    /// Opens (creating if needed) the store and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = open_database(path)?;
        Ok(Self { path: path.to_owned(), db: RwLock::new(Some(db)) })
    }

    /// Runs `f` on the database. After an I/O error, redb refuses every later write until the database is
    /// reopened; so the store reopens it then (the file holds the last committed transaction, redb's own
    /// guarantee), and once the cause is gone (space freed) the next call works without a restart.
    fn with_db<T>(&self, f: impl FnOnce(&redb::Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = {
            let db = self.db.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            match db.as_ref() {
                Some(db) => f(db),
                None => Err(StoreError::Io("closed after an I/O error; reopening".into())),
            }
        };
        if matches!(result, Err(StoreError::Io(_))) {
            self.reopen();
        }
        result
    }

    fn reopen(&self) {
        let mut db = self.db.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        // redb allows one open handle per file: the old one goes first.
        drop(db.take());
        match open_database(&self.path) {
            Ok(opened) => {
                tracing::warn!(path = %self.path.display(), "store reopened after an I/O error");
                *db = Some(opened);
            }
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot reopen the store yet"),
        }
    }
}

fn open_database(path: &Path) -> Result<redb::Database, StoreError> {
    let db = redb::Database::create(path)?;
    let txn = db.begin_write()?;
    for table in Table::ALL {
        txn.open_table(definition(table))?;
    }
    txn.commit()?;
    Ok(db)
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
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(definition(table))?;
            Ok(t.get(key)?.map(|v| v.value().to_vec()))
        })
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            collect(&txn.open_table(definition(table))?)
        })
    }

    fn update(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.with_db(|db| {
            let mut txn = RedbTxn { txn: db.begin_write()?, io_failed: None };
            match f(&mut txn) {
                Ok(()) => Ok(txn.txn.commit()?),
                Err(e) => {
                    let io_failed = txn.io_failed.take();
                    txn.txn.abort()?;
                    // An I/O error inside the transaction (which the closure may have turned into its own error)
                    // still means the database must be reopened.
                    Err(io_failed.map_or(e, StoreError::Io))
                }
            }
        })
    }
}

struct RedbTxn {
    txn: redb::WriteTransaction,
    /// The first I/O error a write met, if any.
    io_failed: Option<String>,
}

impl RedbTxn {
    fn write(&mut self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let result = f(&self.txn);
        if let Err(StoreError::Io(e)) = &result {
            self.io_failed.get_or_insert_with(|| e.clone());
        }
        result
    }
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
        self.write(|txn| {
            txn.open_table(definition(table))?.insert(key, value)?;
            Ok(())
        })
    }

    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(definition(table))?.remove(key)?;
            Ok(())
        })
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
