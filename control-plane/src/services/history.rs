//! Recent snapshots by version, so that a proxy that reconnects (to this replica after a restart, or to another
//! replica over the same store) resumes with a delta from the version it last ACKed instead of a full snapshot.
//!
//! A delta is computed by the same `steps::Step` as every push, from the very snapshot the proxy holds: the
//! history keeps the snapshots themselves (unchanged entries share their `Arc` with the current one, so an entry
//! costs its maps, not its contents). A version is trusted only within one *lineage*: a name recorded once in the
//! store's meta table, the same for every replica of that store. A version of another lineage (another store), a
//! version this replica never published (another replica's future) and one older than the history are answered
//! with a full snapshot: the history never guesses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::mesh::Snapshot;
use crate::records;
use crate::store::{Store, StoreError, Table, transact};

/// Meta-table key of the lineage.
const META_LINEAGE: &str = "lineage";

/// How many versions the history keeps: a proxy more changes behind than this gets a full snapshot.
pub const KEEP: usize = 32;

#[derive(Default)]
pub struct History {
    lineage: OnceLock<String>,
    versions: Mutex<BTreeMap<u64, Arc<Snapshot>>>,
}

/// Why a resume was (not) granted: a bounded label for metrics and logs.
#[derive(Debug, Clone)]
pub enum Resume {
    /// A delta from this snapshot, which the proxy holds.
    From(Arc<Snapshot>),
    /// The proxy asked for nothing (first start, or it holds only what it stored on disk).
    NotAsked,
    /// The version belongs to another store.
    OtherLineage,
    /// This replica does not know the version (too old for the history, or never published here).
    UnknownVersion,
}

impl PartialEq for Resume {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Resume::From(a), Resume::From(b)) => Arc::ptr_eq(a, b),
            _ => self.label() == other.label(),
        }
    }
}

impl Resume {
    pub fn label(&self) -> &'static str {
        match self {
            Resume::From(_) => "delta",
            Resume::NotAsked => "not_asked",
            Resume::OtherLineage => "other_lineage",
            Resume::UnknownVersion => "unknown_version",
        }
    }
}

impl History {
    /// Remembers a snapshot that is (or is about to be) pushed.
    pub fn record(&self, snapshot: &Arc<Snapshot>) {
        let mut versions = self.versions.lock().expect("history lock");
        match versions.get(&snapshot.version) {
            Some(known) if Arc::ptr_eq(known, snapshot) => return,
            // The same version published twice (a replica that follows its store reloads what it wrote itself):
            // the same content keeps the entry.
            Some(known) if same_content(known, snapshot) => return,
            Some(_) => {
                // Two contents under one version (cannot happen with one store; if it did, neither is a safe
                // base): forget the version.
                versions.remove(&snapshot.version);
                return;
            }
            None => {}
        }
        versions.insert(snapshot.version, snapshot.clone());
        while versions.len() > KEEP {
            versions.pop_first();
        }
    }

    /// What a proxy that holds `version` of `lineage` resumes from (`version` 0: it asked for nothing).
    pub fn resume(&self, lineage: &str, own_lineage: &str, version: u64) -> Resume {
        if version == 0 || lineage.is_empty() {
            return Resume::NotAsked;
        }
        if lineage != own_lineage {
            return Resume::OtherLineage;
        }
        match self.versions.lock().expect("history lock").get(&version) {
            Some(snapshot) => Resume::From(snapshot.clone()),
            None => Resume::UnknownVersion,
        }
    }

    /// The store's lineage, created at the first call on a store that has none.
    pub fn lineage(&self, store: &dyn Store) -> Result<&str, StoreError> {
        if let Some(lineage) = self.lineage.get() {
            return Ok(lineage);
        }
        let lineage = match records::load::<String>(store, Table::Meta, META_LINEAGE)? {
            Some(lineage) => lineage,
            None => transact(store, |txn| match records::get::<String>(txn, Table::Meta, META_LINEAGE)? {
                // Another replica named it first.
                Some(lineage) => Ok::<_, StoreError>(lineage),
                None => {
                    let mut bytes = [0u8; 16];
                    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| StoreError::Backend("system RNG failed".into()))?;
                    let lineage = hex::encode(bytes);
                    records::put(txn, Table::Meta, META_LINEAGE, &lineage)?;
                    Ok(lineage)
                }
            })?,
        };
        Ok(self.lineage.get_or_init(|| lineage))
    }
}

/// Whether two snapshots hold the same state a proxy receives (JWKS aside: a resume always resends them).
fn same_content(a: &Snapshot, b: &Snapshot) -> bool {
    a.trust_bundle == b.trust_bundle
        && a.workloads == b.workloads
        && a.resources == b.resources
        && a.revocations == b.revocations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(version: u64) -> Arc<Snapshot> {
        Arc::new(Snapshot { version, ..Default::default() })
    }

    #[test]
    fn a_recorded_version_of_the_same_lineage_resumes_from_that_very_snapshot() {
        let h = History::default();
        let s5 = snapshot(5);
        h.record(&s5);
        h.record(&snapshot(6));
        match h.resume("L", "L", 5) {
            Resume::From(base) => assert!(Arc::ptr_eq(&base, &s5)),
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[test]
    fn unknown_versions_and_other_lineages_get_a_full_snapshot() {
        let h = History::default();
        h.record(&snapshot(5));
        assert_eq!(h.resume("L", "L", 0), Resume::NotAsked);
        assert_eq!(h.resume("", "L", 5), Resume::NotAsked);
        assert_eq!(h.resume("M", "L", 5), Resume::OtherLineage, "the same number in another store means nothing");
        assert_eq!(h.resume("L", "L", 9), Resume::UnknownVersion, "another replica's future");
        assert_eq!(h.resume("L", "L", 4), Resume::UnknownVersion, "never published here");
    }

    #[test]
    fn the_history_is_bounded_and_forgets_the_oldest() {
        let h = History::default();
        for v in 1..=(KEEP as u64 + 10) {
            h.record(&snapshot(v));
        }
        assert_eq!(h.versions.lock().unwrap().len(), KEEP);
        assert_eq!(h.resume("L", "L", 10), Resume::UnknownVersion, "too old");
        assert!(matches!(h.resume("L", "L", 11), Resume::From(_)));
        assert!(matches!(h.resume("L", "L", KEEP as u64 + 10), Resume::From(_)));
    }

    #[test]
    fn recording_the_same_version_twice_is_harmless_but_two_contents_under_one_version_are_forgotten() {
        let h = History::default();
        let s = snapshot(3);
        h.record(&s);
        h.record(&s);
        assert!(matches!(h.resume("L", "L", 3), Resume::From(_)));
        h.record(&snapshot(3));
        assert!(matches!(h.resume("L", "L", 3), Resume::From(_)), "the same content reloaded");
        let other = Snapshot {
            version: 3,
            resources: [("k".to_owned(), Arc::new(Default::default()))].into(),
            ..Default::default()
        };
        h.record(&Arc::new(other));
        assert_eq!(h.resume("L", "L", 3), Resume::UnknownVersion, "two contents under one version");
    }

    #[test]
    fn the_lineage_is_created_once_and_read_back_by_every_replica_of_the_store() {
        let dir = std::env::temp_dir().join(format!("trellis-lineage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = crate::store::RedbStore::open(&dir.join("s.redb")).unwrap();
        let first = History::default().lineage(&store).unwrap().to_owned();
        assert_eq!(first.len(), 32);
        assert_eq!(History::default().lineage(&store).unwrap(), first, "a second replica (or a restart) agrees");
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
