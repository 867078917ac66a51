//! Durable state behind a deliberately narrow interface: tables of byte values by string key, read directly or
//! inside an atomic read-modify-write transaction. Two backends: `redb` (embedded, one process, the default) and
//! `etcd` (shared by several replicas: optimistic transactions that compare what they read at commit, and a watch
//! that tells each replica about every change, its own included).

mod etcd;
mod leased;
mod redb;
#[cfg(test)]
pub(crate) mod test_etcd;

#[cfg(test)]
pub(crate) use self::etcd::CommitFault;
pub use self::etcd::{EtcdOptions, EtcdStore};
pub use self::leased::{STATUS, STATUS_LEASE_TTL};
pub use self::redb::{RedbStore, STORE_FILE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// The CA's files (etcd only: what a replica needs to start; private keys sealed with the KEK, `kek.rs`).
    CaFiles,
    /// The registry's address claims: canonical IP -> key of the workload holding it (`mesh/claims.rs`).
    WorkloadAddresses,
    /// The registry's declarations: node -> keys of the workloads it declared (`mesh/claims.rs`).
    NodeWorkloads,
}

impl Table {
    pub const ALL: [Table; 12] = [
        Table::Resources,
        Table::Tokens,
        Table::Nodes,
        Table::Workloads,
        Table::Certificates,
        Table::Meta,
        Table::RevokedCertificates,
        Table::RevokedIdentities,
        Table::Admins,
        Table::CaFiles,
        Table::WorkloadAddresses,
        Table::NodeWorkloads,
    ];

    /// The table's name: redb's table name, etcd's key segment (`<prefix><name>/<key>`).
    pub fn name(self) -> &'static str {
        match self {
            Table::Resources => "resources",
            Table::Tokens => "tokens",
            Table::Nodes => "nodes",
            Table::Workloads => "workloads",
            Table::Certificates => "certificates",
            Table::Meta => "meta",
            Table::RevokedCertificates => "revoked_certificates",
            Table::RevokedIdentities => "revoked_identities",
            Table::Admins => "admins",
            Table::CaFiles => "ca_files",
            Table::WorkloadAddresses => "workload_addresses",
            Table::NodeWorkloads => "node_workloads",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Clone, so that one error can be handed to several callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Backend(String),
    /// The file could not be read or written (a full disk, say). redb refuses every later write after one ("previous
    /// I/O error") until the database is reopened, which `RedbStore` does.
    #[error("store: {0}")]
    Io(String),
    /// The backend cannot be reached (etcd down or without quorum): nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A commit was sent and no answer says whether it applied, and that could not be found out (etcd still without
    /// a quorum, or the history that would tell compacted): it may have been written, or may still be once etcd
    /// has a quorum again. Callers say how to check (`mesh/errors.rs`).
    #[error(
        "store unavailable: outcome unknown: {reason}; transaction {txn} may have been committed, or may still be once etcd has a quorum again"
    )]
    OutcomeUnknown { txn: String, reason: String },
    /// Other replicas kept changing what the transaction read; nothing was written.
    #[error("store: transaction conflicted with concurrent writes {attempts} times; nothing was written")]
    Conflict { attempts: u32 },
    #[error("store: corrupt value in {table:?}/{key}: {reason}")]
    Corrupt { table: Table, key: String, reason: String },
    /// The transaction's closure failed; nothing was written.
    #[error("transaction aborted")]
    Aborted,
}

/// One entry of a followed table: (table, key, value).
pub type Entry = (Table, String, Vec<u8>);
/// One write of a committed transaction: (table, key, value; None: deleted).
pub type Write = (Table, String, Option<Vec<u8>>);

/// What a follower of the store ([`Store::follow`]) is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Everything the followed tables hold, read at one revision: replaces what the follower knew.
    Reset(Vec<Entry>),
    /// The writes to the followed tables of one or more committed transactions, in commit order, each transaction
    /// whole (never split across two deltas).
    Delta(Vec<Write>),
}

/// Reads and writes inside one atomic transaction.
pub trait Txn {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Several keys at once, as [`Txn::get`] reads each (and compared at commit the same way), in order: one round
    /// trip to a remote backend (etcd) instead of one per key.
    fn get_many(&self, keys: &[(Table, &str)]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|(table, key)| self.get(*table, key)).collect()
    }
    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError>;
}

pub trait Store: Send + Sync + 'static {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Runs `f` in a transaction; commits what it wrote if it returns Ok, discards everything otherwise. A backend
    /// with optimistic transactions may run `f` more than once (each run sees fresh reads; only the last commits).
    fn update(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), StoreError>) -> Result<(), StoreError>;

    /// Follows what anyone (other replicas too, this one included) writes to `tables`: first a [`Change::Reset`]
    /// with everything they hold, then a [`Change::Delta`] per batch of committed transactions, and a new `Reset`
    /// whenever the backend cannot say what changed (a reconnect, a compaction). None where this process is the
    /// only writer (redb).
    fn follow(&self, tables: &[Table]) -> Option<tokio::sync::mpsc::UnboundedReceiver<Change>> {
        let _ = tables;
        None
    }

    /// Whether the backend answers now (readiness); always true for an embedded store.
    fn available(&self) -> bool {
        true
    }

    /// Status that each replica keeps under a lease of its own (etcd), so that what a dead replica wrote
    /// disappears; None where this process is the only one (redb: status stays in memory).
    fn leased(&self) -> Option<&dyn LeasedStatus> {
        None
    }
}

/// Entries each replica writes under `<prefix>status/<replica>/<key>`, attached to a lease this replica keeps
/// alive by calling [`LeasedStatus::keep_alive`]; when the lease expires (the replica died, or could not reach the
/// store for longer than the TTL) its entries go.
pub trait LeasedStatus: Send + Sync {
    /// Keeps this replica's lease alive, granting a new one if it expired (or none was granted yet). Returns the
    /// lease's id: a new id means every entry written under the old one is gone and must be written again.
    fn keep_alive(&self) -> Result<i64, StoreError>;
    /// Writes (Some) and deletes (None) entries of `replica` under `lease`, in batches.
    fn write(&self, lease: i64, replica: &str, entries: &[(String, Option<Vec<u8>>)]) -> Result<(), StoreError>;
    /// Every replica's entries: (replica, key, value).
    fn list_all(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError>;
    /// Takes the role `role` (`<prefix>status/_<role>`) for `replica` under `lease` unless another replica holds
    /// it; returns the holder. The role is free again when its holder's lease expires.
    fn claim(&self, lease: i64, role: &str, replica: &str) -> Result<String, StoreError>;
    /// Revokes this replica's lease (a clean shutdown): its entries and roles go at once.
    fn release(&self) -> Result<(), StoreError>;
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
        (Err(StoreError::Aborted), Some(Err(e))) => Err(e),
        (Err(e), _) => Err(e.into()),
        (Ok(()), _) => unreachable!("update committed after the closure succeeded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both backends: a fresh redb file, and a fresh prefix on a real etcd.
    fn backends() -> Vec<(&'static str, Box<dyn Store>, Option<std::path::PathBuf>)> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("trellis-store-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let redb = RedbStore::open(&dir.join(STORE_FILE)).unwrap();
        let etcd = EtcdStore::connect(&test_etcd::options()).unwrap();
        vec![("redb", Box::new(redb), Some(dir)), ("etcd", Box::new(etcd), None)]
    }

    #[test]
    fn transactions_are_all_or_nothing_and_read_their_own_writes() {
        for (name, store, dir) in backends() {
            transact::<_, StoreError>(store.as_ref(), |txn| {
                txn.put(Table::Meta, "a", b"1")?;
                assert_eq!(txn.get(Table::Meta, "a")?, Some(b"1".to_vec()), "{name}");
                assert_eq!(txn.list(Table::Meta)?.len(), 1, "{name}");
                Ok(())
            })
            .unwrap();
            let failed: Result<(), StoreError> = transact(store.as_ref(), |txn| {
                txn.put(Table::Meta, "b", b"2")?;
                txn.delete(Table::Meta, "a")?;
                Err(StoreError::Backend("boom".into()))
            });
            assert!(matches!(failed, Err(StoreError::Backend(ref m)) if m == "boom"), "{name}: {failed:?}");
            assert_eq!(store.get(Table::Meta, "b").unwrap(), None, "{name}");
            assert_eq!(store.get(Table::Meta, "a").unwrap(), Some(b"1".to_vec()), "{name}");
            // Tables are separate.
            assert_eq!(store.list(Table::Tokens).unwrap(), vec![], "{name}");
            if let Some(dir) = dir {
                std::fs::remove_dir_all(dir).unwrap();
            }
        }
    }

    /// `get_many` answers as `get` does, key by key: this transaction's own writes, absent keys, a key named twice.
    #[test]
    fn get_many_reads_what_get_reads() {
        for (name, store, dir) in backends() {
            transact::<_, StoreError>(store.as_ref(), |txn| txn.put(Table::Meta, "a", b"1")).unwrap();
            transact::<_, StoreError>(store.as_ref(), |txn| {
                txn.put(Table::Meta, "c", b"3")?;
                let keys = [(Table::Meta, "a"), (Table::Meta, "x"), (Table::Meta, "c"), (Table::Meta, "a")];
                let values = txn.get_many(&keys)?;
                let expected = [Some(b"1".to_vec()), None, Some(b"3".to_vec()), Some(b"1".to_vec())];
                assert_eq!(values, expected, "{name}");
                let one_by_one: Vec<_> = keys.iter().map(|(t, k)| txn.get(*t, k).unwrap()).collect();
                assert_eq!(one_by_one, expected, "{name}");
                Ok(())
            })
            .unwrap();
            if let Some(dir) = dir {
                std::fs::remove_dir_all(dir).unwrap();
            }
        }
    }

    /// What a transaction read through `get_many` is compared at commit, as a `get` is: another replica's write to a
    /// key it read (present or absent) between its read and its commit makes it run again on fresh reads.
    #[test]
    fn keys_read_together_conflict_with_a_concurrent_write() {
        let options = test_etcd::options();
        let one = EtcdStore::connect(&options).unwrap();
        let two = EtcdStore::connect(&options).unwrap();
        transact::<_, StoreError>(&one, |txn| txn.put(Table::Nodes, "n1", b"active")).unwrap();
        for (key, value) in [("n1", b"revoked"), ("absent", b"created")] {
            let mut runs = 0;
            let mut seen = Vec::new();
            transact::<_, StoreError>(&one, |txn| {
                runs += 1;
                seen = txn.get_many(&[(Table::Nodes, "n1"), (Table::Nodes, "absent")])?;
                if runs == 1 {
                    transact::<_, StoreError>(&two, |t| t.put(Table::Nodes, key, value)).unwrap();
                }
                txn.put(Table::Certificates, "c", b"x")
            })
            .unwrap();
            assert_eq!(runs, 2, "{key}: the first commit must have been refused");
            let index = usize::from(key == "absent");
            assert_eq!(seen[index].as_deref(), Some(&value[..]), "{key}: the second run read the other write");
        }
        // Control, through the same path: with no concurrent write, one run commits.
        let mut runs = 0;
        transact::<_, StoreError>(&one, |txn| {
            runs += 1;
            txn.get_many(&[(Table::Nodes, "n1"), (Table::Nodes, "other")])?;
            txn.put(Table::Certificates, "d", b"y")
        })
        .unwrap();
        assert_eq!(runs, 1);
    }

    /// Racing read-modify-write transactions on one counter from several threads (several etcd clients: as
    /// replicas do) lose no increment: each commit compares what it read.
    #[test]
    fn concurrent_increments_are_serialized() {
        let options = test_etcd::options();
        let stores: Vec<std::sync::Arc<EtcdStore>> =
            (0..3).map(|_| std::sync::Arc::new(EtcdStore::connect(&options).unwrap())).collect();
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let store = stores[i % 3].clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        transact::<_, StoreError>(store.as_ref(), |txn| {
                            let n: u64 = txn
                                .get(Table::Meta, "n")?
                                .map(|v| String::from_utf8(v).unwrap().parse().unwrap())
                                .unwrap_or(0);
                            txn.put(Table::Meta, "n", (n + 1).to_string().as_bytes())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(stores[0].get(Table::Meta, "n").unwrap(), Some(b"120".to_vec()));
    }

    /// A transaction that listed a table conflicts with an insert into that table made meanwhile (the key it
    /// never read): the table's generation key is compared.
    #[test]
    fn listing_conflicts_with_a_concurrent_insert() {
        let options = test_etcd::options();
        let one = EtcdStore::connect(&options).unwrap();
        let two = EtcdStore::connect(&options).unwrap();
        let mut runs = 0;
        transact::<_, StoreError>(&one, |txn| {
            runs += 1;
            let count = txn.list(Table::Nodes)?.len();
            if runs == 1 {
                // Another replica inserts between this transaction's read and its commit.
                transact::<_, StoreError>(&two, |t| t.put(Table::Nodes, "other", b"x")).unwrap();
            }
            txn.put(Table::Meta, "count", count.to_string().as_bytes())
        })
        .unwrap();
        assert_eq!(runs, 2, "the first commit must have been refused");
        assert_eq!(one.get(Table::Meta, "count").unwrap(), Some(b"1".to_vec()));
    }

    /// A commit whose answer is lost and which is sent again (as after a leader change) reports its own success,
    /// not a conflict: the second send fails its compares because the first committed, and the transaction's id,
    /// written in the same transaction, says so. Without that, the closure ran again and refused its own write.
    #[test]
    fn a_resent_commit_that_committed_reports_success() {
        let options = test_etcd::options();
        let store = EtcdStore::connect(&options).unwrap();
        transact::<_, StoreError>(&store, |txn| txn.put(Table::Tokens, "t", b"fresh")).unwrap();
        let consume = |store: &EtcdStore| {
            let mut runs = 0;
            let result = transact::<_, StoreError>(store, |txn| {
                runs += 1;
                match txn.get(Table::Tokens, "t")? {
                    Some(v) if v == b"fresh" => txn.put(Table::Tokens, "t", b"used"),
                    _ => Err(StoreError::Backend("already used".into())),
                }
            });
            (result, runs)
        };
        store.lose_answers.store(1, std::sync::atomic::Ordering::Relaxed);
        let (result, runs) = consume(&store);
        assert_eq!(store.lose_answers.load(std::sync::atomic::Ordering::Relaxed), 0, "the first answer was lost");
        assert!(result.is_ok(), "the resent commit reported {result:?}");
        assert_eq!(runs, 1, "the closure did not run again");
        assert_eq!(store.get(Table::Tokens, "t").unwrap(), Some(b"used".to_vec()));
        // Control, through the same path: a second consumption is refused, by the closure, as already used.
        let (result, runs) = consume(&store);
        assert!(matches!(result, Err(StoreError::Backend(ref m)) if m == "already used"), "{result:?}");
        assert_eq!(runs, 1);
        // And a resent commit that conflicts with another writer's commit (not its own) is still a conflict: the
        // closure runs again on fresh reads.
        let other = EtcdStore::connect(&options).unwrap();
        transact::<_, StoreError>(&other, |txn| txn.put(Table::Tokens, "u", b"1")).unwrap();
        let mut runs = 0;
        transact::<_, StoreError>(&other, |txn| {
            runs += 1;
            let n = txn.get(Table::Tokens, "u")?.unwrap();
            if runs == 1 {
                transact::<_, StoreError>(&store, |t| t.put(Table::Tokens, "u", b"2")).unwrap();
                other.lose_answers.store(1, std::sync::atomic::Ordering::Relaxed);
            }
            txn.put(Table::Tokens, "u", &[n, b"+".to_vec()].concat())
        })
        .unwrap();
        assert_eq!(runs, 2, "the conflict made the closure run again");
        assert_eq!(other.get(Table::Tokens, "u").unwrap(), Some(b"2+".to_vec()));
    }

    /// A commit that etcd applied but never answered (the call timed out) reports success, not "store unavailable";
    /// one that never reached etcd is fenced off (sent late, it no longer applies) and reported unavailable with
    /// nothing written; one whose outcome cannot be found out (etcd unreachable meanwhile) is reported unknown, with
    /// its transaction's id, by the store that commits it.
    #[test]
    fn an_unanswered_commit_reports_its_true_outcome() {
        let store = EtcdStore::connect(&test_etcd::options()).unwrap();
        let fault = |f: CommitFault| store.commit_faults.lock().unwrap().push_back(f);
        let put = |key: &str| {
            let mut runs = 0;
            let result = transact::<_, StoreError>(&store, |txn| {
                runs += 1;
                txn.put(Table::Resources, key, b"v")
            });
            (result, runs)
        };
        let stored = |key: &str| store.get(Table::Resources, key).unwrap();

        // Control: no fault.
        assert!(matches!(put("control"), (Ok(()), 1)));
        // Applied, answer lost: found committed, reported as such; the closure did not run again.
        fault(CommitFault::AnswerLost);
        let (result, runs) = put("applied");
        assert!(result.is_ok(), "an applied commit reported {result:?}");
        assert_eq!((runs, stored("applied")), (1, Some(b"v".to_vec())));
        assert!(store.commit_faults.lock().unwrap().is_empty(), "the fault was used");

        // Never reached etcd: nothing written, said so, and the commit can no longer apply.
        fault(CommitFault::RequestLost);
        let (result, runs) = put("lost");
        match &result {
            Err(StoreError::Unavailable(m)) => assert!(
                m.starts_with("etcd did not answer within 3s; nothing was written (transaction ")
                    && m.ends_with(" was fenced off before it applied)"),
                "{m}"
            ),
            other => panic!("a lost commit reported {other:?}"),
        }
        assert_eq!((runs, stored("lost")), (1, None));
        // The request reaches etcd late (a proposal committed when the cluster recovers): its fence refuses it.
        let late = store.lost_request.lock().unwrap().take().expect("the lost request");
        let applied = store.commit(late.clone(), Default::default()).unwrap();
        assert!(!applied.succeeded(), "the fenced-off commit applied late");
        assert_eq!(stored("lost"), None);

        // Applied, answer lost, and etcd out of reach while looking: unknown, with the reason and the id.
        fault(CommitFault::AnswerLostThenUnreachable);
        let (result, runs) = put("unknown");
        match &result {
            Err(e @ StoreError::OutcomeUnknown { txn, .. }) => {
                let m = e.to_string();
                assert!(
                    m.starts_with(
                        "store unavailable: outcome unknown: etcd did not answer within 3s; fencing it off failed \
                         (store unavailable: etcd did not answer within 3s); transaction "
                    ) && m.contains(txn.as_str())
                        && m.ends_with("may have been committed, or may still be once etcd has a quorum again"),
                    "{m}"
                );
            }
            other => panic!("an unsettled commit reported {other:?}"),
        }
        // (It did apply: what the error leaves open.)
        assert_eq!((runs, stored("unknown")), (1, Some(b"v".to_vec())));
    }

    /// The follower of an etcd store is told everything at first, then each transaction's writes to the followed
    /// tables, whole and in order, and nothing about other tables.
    #[test]
    fn follow_reports_a_reset_then_each_transaction() {
        let options = test_etcd::options();
        let store = EtcdStore::connect(&options).unwrap();
        transact::<_, StoreError>(&store, |txn| txn.put(Table::Resources, "a", b"1")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut changes = store.follow(&[Table::Resources, Table::Meta]).unwrap();
        let next = |changes: &mut tokio::sync::mpsc::UnboundedReceiver<Change>| {
            runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv()).await })
        };
        assert_eq!(next(&mut changes), Ok(Some(Change::Reset(vec![(Table::Resources, "a".into(), b"1".to_vec())]))));
        transact::<_, StoreError>(&store, |txn| {
            txn.put(Table::Resources, "b", b"2")?;
            txn.delete(Table::Resources, "a")?;
            txn.put(Table::Meta, "v", b"7")?;
            txn.put(Table::Certificates, "c", b"x")
        })
        .unwrap();
        transact::<_, StoreError>(&store, |txn| txn.put(Table::Certificates, "d", b"y")).unwrap();
        transact::<_, StoreError>(&store, |txn| txn.put(Table::Resources, "a", b"3")).unwrap();
        // Each transaction whole, in commit order (the watch may batch both into one response), nothing else.
        let expected = vec![
            (Table::Resources, "a".into(), None),
            (Table::Resources, "b".into(), Some(b"2".to_vec())),
            (Table::Meta, "v".into(), Some(b"7".to_vec())),
            (Table::Resources, "a".into(), Some(b"3".to_vec())),
        ];
        let mut received = Vec::new();
        while received.len() < expected.len() {
            match next(&mut changes) {
                Ok(Some(Change::Delta(writes))) => {
                    let whole = if received.is_empty() { [3, 4].contains(&writes.len()) } else { writes.len() == 1 };
                    assert!(whole, "a transaction split across deltas: {writes:?} after {received:?}");
                    received.extend(writes);
                }
                other => panic!("expected a delta, got {other:?}"),
            }
        }
        assert_eq!(received, expected);
    }

    /// etcd sends a follower only what lies in the followed tables' key range: a transaction writing to several
    /// followed tables (and to the certificate log) still arrives whole, in one delta, while the certificate
    /// records, the generation keys and the fence keys written meanwhile are never sent to the watch at all. The
    /// control: a follower of the certificate log, through the same watch code, is sent those records.
    #[test]
    fn follow_is_sent_only_the_followed_tables() {
        // The tables a replica follows (mesh::FOLLOWED), in an order unlike etcd's.
        let followed =
            [Table::Workloads, Table::Meta, Table::RevokedIdentities, Table::Resources, Table::RevokedCertificates];
        let options = test_etcd::options();
        let (store, other) = (EtcdStore::connect(&options).unwrap(), EtcdStore::connect(&options).unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let next = |changes: &mut tokio::sync::mpsc::UnboundedReceiver<Change>| {
            runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv()).await })
        };
        let mut changes = store.follow(&followed).unwrap();
        assert_eq!(next(&mut changes), Ok(Some(Change::Reset(vec![]))));
        let mut logged = other.follow(&[Table::Certificates]).unwrap();
        assert_eq!(next(&mut logged), Ok(Some(Change::Reset(vec![]))));

        // The certificate log (each transaction also puts `_gen/certificates`), a fence key, tokens: none followed.
        for i in 0..20 {
            transact::<_, StoreError>(&store, |txn| txn.put(Table::Certificates, &format!("serial-{i}"), b"c"))
                .unwrap();
        }
        store.fence(&store.fence_key("some-transaction")).unwrap();
        transact::<_, StoreError>(&store, |txn| txn.put(Table::Tokens, "t", b"1")).unwrap();
        // One transaction over three followed tables, an unfollowed one inside their range, and the log.
        transact::<_, StoreError>(&store, |txn| {
            txn.put(Table::Workloads, "w", b"1")?;
            txn.put(Table::Meta, "v", b"2")?;
            txn.put(Table::RevokedIdentities, "i", b"3")?;
            txn.put(Table::Nodes, "n", b"4")?;
            txn.put(Table::Certificates, "serial-x", b"5")
        })
        .unwrap();
        let expected = vec![
            (Table::Workloads, "w".into(), Some(b"1".to_vec())),
            (Table::Meta, "v".into(), Some(b"2".to_vec())),
            (Table::RevokedIdentities, "i".into(), Some(b"3".to_vec())),
        ];
        assert_eq!(next(&mut changes), Ok(Some(Change::Delta(expected))), "the transaction, whole, in one delta");
        // Sent by etcd: the tokens write and the transaction's 4 writes inside the range (tokens and nodes sort
        // between meta and workloads: dropped by the replica); no certificate record, generation or fence key.
        assert_eq!(store.watched_events(), 1 + 4, "etcd sent the watch writes outside the followed tables' range");

        // Control: the same watch code following the certificate log (another replica) is sent every record.
        let mut records = 0;
        while records < 21 {
            match next(&mut logged) {
                Ok(Some(Change::Delta(writes))) => {
                    assert!(writes.iter().all(|(t, _, _)| *t == Table::Certificates), "{writes:?}");
                    records += writes.len();
                }
                other => panic!("expected the certificate log's writes, got {other:?}"),
            }
        }
        assert_eq!((records, other.watched_events()), (21, 21), "the log's follower was sent its records only");
    }

    #[test]
    fn unreachable_etcd_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = EtcdOptions { endpoints: vec![format!("http://127.0.0.1:{port}")], prefix: "/x/".into() };
        let err = EtcdStore::connect(&options).err().expect("no etcd there");
        assert!(err.to_string().starts_with("store unavailable: "), "{err}");
    }
}
