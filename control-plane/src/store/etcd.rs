//! The shared backend: etcd v3, for several replicas serving one mesh.
//!
//! Keys are `<prefix><table>/<key>` (default prefix `/trellis/`). A transaction is optimistic: its closure runs on
//! an in-memory view (reads go to etcd and are remembered with their `mod_revision`, writes are buffered), then one
//! etcd `Txn` commits the writes only if nothing it read changed: `mod_revision == read` for every key read,
//! `version == 0` for a key read as absent, and for a table it listed, the table's generation key (`<prefix>_gen/
//! <table>`, put by every transaction that writes to the table) not modified since the listing's revision. On a
//! conflict the closure runs again on fresh reads, a bounded number of times. A call that reached no member is
//! [`StoreError::Unavailable`]: nothing was written.
//!
//! A commit that was sent but got no answer (a timeout, a leader change) may have been applied, or may still be (a
//! proposal in the Raft log commits when the cluster has a quorum again). Its outcome is settled before anything is
//! reported: every commit also compares its *fence key* (`<prefix>_fence/<txn id>`) as absent, so putting that key
//! makes sure the commit can no longer apply; the transaction's id, written to the generation keys in the same
//! commit, then tells from their history whether it applied before the fence. Success is reported as success; a
//! fenced commit that did not apply is `Unavailable` (nothing was written); only when the fence cannot be put (etcd
//! still has no quorum) or the history is compacted is the outcome reported unknown
//! ([`StoreError::OutcomeUnknown`]).
//!
//! The [`Store`] interface is synchronous (closures run under the mesh's writer lock); this backend runs its etcd
//! client on a small runtime of its own and the calling thread waits for each answer, bounded by [`OP_TIMEOUT`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, TxnOp, WatchOptions};
use tokio::sync::mpsc;

use super::{Change, Entry, Store, StoreError, Table, Txn, Write};

/// How long one etcd call may take before the store is considered unavailable (etcd without quorum hangs).
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often readiness is probed (a linearizable read, which needs quorum).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Conflicting commits before a transaction gives up.
const MAX_ATTEMPTS: u32 = 64;
const GENERATION: &str = "_gen/";
/// Fence keys of transactions whose commit went unanswered (`<prefix>_fence/<txn id>`).
const FENCE: &str = "_fence/";
/// How long a fence key stays: longer than any commit left in a Raft log could wait for a quorum in practice.
const FENCE_TTL_SECS: i64 = 7 * 24 * 3600;
/// Keys per read-only transaction of [`EtcdStore::read_many`]: etcd's default `--max-txn-ops` (128) bounds the
/// operations of one transaction.
const READ_BATCH: usize = 128;

#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the etcd members (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Prefix of every key (ends with `/`), so several meshes can share one etcd.
    pub prefix: String,
}

pub struct EtcdStore {
    /// One client per member: a call that cannot reach one member goes to the next (etcd-client's balanced
    /// channel keeps picking a dead member).
    clients: Arc<Members>,
    prefix: String,
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    available: Arc<AtomicBool>,
    /// The highest etcd revision this replica has seen (reads, its commits, watch events).
    seen: Arc<AtomicI64>,
    /// Events the follower's watch received from etcd (followed or not), since the store was connected.
    watched: Arc<AtomicU64>,
    /// Tests: how many of the next commits lose etcd's answer (the request is then sent again).
    #[cfg(test)]
    pub(crate) lose_answers: std::sync::atomic::AtomicU32,
    /// Tests: faults of the next commits, in order (`CommitFault`).
    #[cfg(test)]
    pub(crate) commit_faults: std::sync::Mutex<std::collections::VecDeque<CommitFault>>,
    /// Tests: the last request a `CommitFault::RequestLost` kept from etcd (to send it late).
    #[cfg(test)]
    pub(crate) lost_request: std::sync::Mutex<Option<etcd_client::Txn>>,
    /// The lease this replica's status entries are attached to (0: none granted yet, or expired); `leased.rs`.
    pub(super) lease: std::sync::Mutex<i64>,
}

/// Tests: what happens to a commit instead of its answer.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitFault {
    /// etcd applies it; its answer never comes (the call times out).
    AnswerLost,
    /// It never reaches etcd; the call times out.
    RequestLost,
    /// etcd applies it; its answer never comes, and etcd cannot be reached while the outcome is looked for.
    AnswerLostThenUnreachable,
}

/// What became of the sends of one call (`Members::call_noting`).
#[derive(Default)]
pub(crate) struct Sends {
    /// The call was sent again after an answer that leaves open whether the first was applied (a leader change
    /// while it was being committed).
    resent: AtomicBool,
    /// A send may have reached etcd and been (or yet be) applied: any send except one that could not connect.
    in_doubt: AtomicBool,
}

/// The members' clients and which one answered last.
pub(super) struct Members {
    clients: Vec<Client>,
    preferred: std::sync::atomic::AtomicUsize,
}

impl Members {
    /// Runs `call` on the member that answered last, moving on to the next member while the connection fails,
    /// and again after a pause while the cluster elects a leader; the caller bounds the whole (`OP_TIMEOUT`).
    pub(super) async fn call<T, F, Fut>(&self, call: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_noting(call, &Sends::default()).await
    }

    /// [`Members::call`], noting in `sends` whether a send may have been applied, and whether the call was sent
    /// again after one such send (a future dropped mid-call, at a timeout, leaves `in_doubt` set).
    async fn call_noting<T, F, Fut>(&self, call: F, sends: &Sends) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut i = self.preferred.load(Ordering::Relaxed);
        let mut unreachable = 0;
        loop {
            let member = i % self.clients.len();
            let doubted = sends.in_doubt.swap(true, Ordering::Relaxed);
            match call(self.clients[member].clone()).await {
                Err(e) if unreachable_member(&e) => {
                    // This send reached nobody.
                    sends.in_doubt.store(doubted, Ordering::Relaxed);
                    unreachable += 1;
                    if unreachable >= self.clients.len() {
                        return Err(e);
                    }
                    i += 1;
                }
                Err(e) if electing(&e) => {
                    sends.resent.store(true, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => {
                    self.preferred.store(member, Ordering::Relaxed);
                    return other;
                }
            }
        }
    }
}

/// etcd is electing a leader: the request was not applied, and will be once a leader is there.
fn electing(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.message().contains("leader changed") || s.message().contains("no leader"))
}

/// A member that could not be reached at all (nothing was sent): safe to try another.
fn unreachable_member(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable
                && (s.message().contains("connect")
                    || s.message().contains("transport")
                    || s.message().contains("refused"))
        }
        _ => false,
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s)
            if !matches!(
                s.code(),
                tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition
            ) =>
        {
            StoreError::Unavailable(format!("etcd: {}", s.message()))
        }
        E::GRpcStatus(s) => StoreError::Backend(format!("etcd: {}", s.message())),
        E::TransportError(e) => StoreError::Unavailable(format!("etcd: {e}")),
        E::IoError(e) => StoreError::Unavailable(format!("etcd: {e}")),
        other => StoreError::Backend(format!("etcd: {other}")),
    }
}

impl EtcdStore {
    /// Connects (checking that etcd answers) and starts following changes under the prefix.
    pub fn connect(options: &EtcdOptions) -> Result<Self, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Backend("etcd: no endpoints (--etcd-endpoints)".into()));
        }
        let mut prefix = options.prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("etcd client runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let mut clients = Vec::new();
        for endpoint in &options.endpoints {
            let connect = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(OP_TIMEOUT)
                .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
                .with_keep_alive_while_idle(true);
            let endpoint = endpoint.clone();
            // Lazy: connects at the first call.
            clients.push(wait(&handle, async move { Client::connect([endpoint], Some(connect)).await })?);
        }
        let clients = Arc::new(Members { clients, preferred: Default::default() });
        let available = Arc::new(AtomicBool::new(true));
        let seen = Arc::new(AtomicI64::new(0));
        let store = Self {
            clients,
            prefix,
            runtime: Some(runtime),
            handle,
            available,
            seen,
            watched: Default::default(),
            #[cfg(test)]
            lose_answers: Default::default(),
            #[cfg(test)]
            commit_faults: Default::default(),
            #[cfg(test)]
            lost_request: Default::default(),
            lease: Default::default(),
        };
        // A first read: fails now, clearly, if etcd does not answer.
        store.read(Table::Meta, "-", false)?;
        store.handle.spawn(probe(store.clients.clone(), store.prefix.clone(), store.available.clone()));
        Ok(store)
    }

    fn key(&self, table: Table, key: &str) -> String {
        format!("{}{}/{key}", self.prefix, table.name())
    }

    fn table_prefix(&self, table: Table) -> String {
        format!("{}{}/", self.prefix, table.name())
    }

    fn generation_key(&self, table: Table) -> String {
        format!("{}{GENERATION}{}", self.prefix, table.name())
    }

    pub(super) fn fence_key(&self, id: &str) -> String {
        format!("{}{FENCE}{id}", self.prefix)
    }

    /// The prefix of every key (ends with `/`).
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Events the follower's watch has received from etcd so far, whether they were for a followed table or not.
    #[cfg(test)]
    pub(crate) fn watched_events(&self) -> u64 {
        self.watched.load(Ordering::Relaxed)
    }

    pub(super) fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        wait(&self.handle, f)
    }

    pub(super) fn members(&self) -> Arc<Members> {
        self.clients.clone()
    }

    /// A Range (one key, or every key under a prefix). `serializable`: answered by the member alone (works without
    /// quorum); read again linearizably if that member is behind what this replica has already seen (its own
    /// commits, watch events), so a reader never goes back in time.
    fn range(&self, key: String, prefix: bool, serializable: bool) -> Result<etcd_client::GetResponse, StoreError> {
        let once = |serializable: bool| {
            let members = self.members();
            let key = key.clone();
            self.run(async move {
                members
                    .call(|mut c| {
                        let options = GetOptions::new();
                        let options = if prefix { options.with_prefix() } else { options };
                        let options = if serializable { options.with_serializable() } else { options };
                        let key = key.clone();
                        async move { c.get(key, Some(options)).await }
                    })
                    .await
            })
        };
        let response = once(serializable)?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        if serializable && revision < self.seen.load(Ordering::Relaxed) {
            return once(false);
        }
        self.seen.fetch_max(revision, Ordering::Relaxed);
        Ok(response)
    }

    /// One key with its mod_revision (0 when absent).
    fn read(&self, table: Table, key: &str, serializable: bool) -> Result<(Option<Vec<u8>>, i64), StoreError> {
        let response = self.range(self.key(table, key), false, serializable)?;
        Ok(match response.kvs().first() {
            Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
            None => (None, 0),
        })
    }

    /// Several keys in one linearizable read (a read-only etcd `Txn` of [`READ_BATCH`] ranges at most; more keys take
    /// more), each with its mod_revision (0 when absent), in order.
    fn read_many(&self, keys: &[(Table, &str)]) -> Result<Vec<Read>, StoreError> {
        let mut reads = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(READ_BATCH) {
            let ops: Vec<TxnOp> = chunk.iter().map(|(table, key)| TxnOp::get(self.key(*table, key), None)).collect();
            let members = self.members();
            let response = self.run(async move {
                members
                    .call(|mut c| {
                        let request = etcd_client::Txn::new().and_then(ops.clone());
                        async move { c.txn(request).await }
                    })
                    .await
            })?;
            self.seen.fetch_max(response.header().map(|h| h.revision()).unwrap_or(0), Ordering::Relaxed);
            let answers = response.op_responses();
            if answers.len() != chunk.len() {
                return Err(StoreError::Backend(format!(
                    "etcd answered {} of {} reads of one transaction",
                    answers.len(),
                    chunk.len()
                )));
            }
            for answer in answers {
                let etcd_client::TxnOpResponse::Get(got) = answer else {
                    return Err(StoreError::Backend("etcd answered a read with something else".into()));
                };
                reads.push(match got.kvs().first() {
                    Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
                    None => (None, 0),
                });
            }
        }
        Ok(reads)
    }

    /// A table's entries, with the revision they were read at.
    fn read_table(&self, table: Table, serializable: bool) -> Result<(Entries, i64), StoreError> {
        let prefix = self.table_prefix(table);
        let response = self.range(prefix.clone(), true, serializable)?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        let mut entries = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            entries.push((key, kv.value().to_vec()));
        }
        Ok((entries, revision))
    }

    fn attempt(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), StoreError>) -> Result<bool, StoreError> {
        // The transaction commits after this revision, if at all.
        let floor = self.seen.load(Ordering::Relaxed);
        let mut txn =
            EtcdTxn { store: self, reads: RefCell::default(), listed: RefCell::default(), writes: BTreeMap::new() };
        f(&mut txn)?;
        if txn.writes.is_empty() {
            return Ok(true);
        }
        let mut compares = Vec::new();
        for ((table, key), (_, revision)) in txn.reads.borrow().iter() {
            let full = self.key(*table, key);
            compares.push(if *revision == 0 {
                Compare::version(full, CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(full, CompareOp::Equal, *revision)
            });
        }
        for (table, revision) in txn.listed.borrow().iter() {
            compares.push(Compare::mod_revision(self.generation_key(*table), CompareOp::Less, revision + 1));
        }
        let mut ops = Vec::new();
        let mut tables = std::collections::BTreeSet::new();
        for ((table, key), value) in &txn.writes {
            tables.insert(*table);
            let full = self.key(*table, key);
            ops.push(match value {
                Some(value) => TxnOp::put(full, value.clone(), None),
                None => TxnOp::delete(full, None),
            });
        }
        // Every generation key written holds this transaction's id: if etcd's answer is lost and the request sent
        // again, the second send fails its compares, and the id tells whether that is because the first committed.
        let id = txn_id();
        let witness = self.generation_key(*tables.first().expect("a transaction that writes writes to a table"));
        for table in tables {
            ops.push(TxnOp::put(self.generation_key(table), id.clone(), None));
        }
        // And it applies only while its fence key is absent: `settle` puts that key when no answer came.
        let fence = self.fence_key(&id);
        compares.push(Compare::version(fence.clone(), CompareOp::Equal, 0));
        let (compared, written) = (compares.len(), ops.len());
        let request = etcd_client::Txn::new().when(compares).and_then(ops);
        let sends = Arc::new(Sends::default());
        let response = match self.commit_or_fault(request.clone(), sends.clone()) {
            Ok(response) => response,
            // Sent, and no answer: it may have been applied, or may yet be.
            Err(StoreError::Unavailable(reason)) if sends.in_doubt.load(Ordering::Relaxed) => {
                return self.settle(&witness, &fence, &id, floor, reason);
            }
            // etcd's own message names no flag: say which limit and by how much.
            Err(StoreError::Backend(m)) if m.contains("too many operations") => {
                return Err(StoreError::Backend(format!(
                    "etcd refused a transaction of {compared} compares and {written} writes ({m}): start etcd with \
                     --max-txn-ops of at least {}",
                    compared.max(written)
                )));
            }
            Err(other) => return Err(other),
        };
        #[cfg(test)]
        let response =
            if self.lose_answers.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                // As if etcd's answer had been lost to a leader change and `Members::call` had sent the request again.
                sends.resent.store(true, Ordering::Relaxed);
                self.commit(request, sends.clone())?
            } else {
                response
            };
        self.seen.fetch_max(response.header().map(|h| h.revision()).unwrap_or(0), Ordering::Relaxed);
        if response.succeeded() {
            return Ok(true);
        }
        if !sends.resent.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // The last send was applied and failed its compares: an earlier send either committed before it, or never
        // will (it was not in the log the cluster kept). The history up to now tells which.
        match self.committed_before(&witness, &id, floor, 0) {
            Ok(Some(committed)) => Ok(committed),
            Ok(None) => Err(StoreError::OutcomeUnknown {
                txn: id,
                reason: "etcd's answer was lost, the commit sent again, and the history that would say whether the \
                         first send applied is compacted"
                    .into(),
            }),
            Err(e) => Err(StoreError::OutcomeUnknown {
                txn: id,
                reason: format!(
                    "etcd's answer was lost, the commit sent again, and its history could not be read: {e}"
                ),
            }),
        }
    }

    /// [`EtcdStore::commit`], or (tests) the fault injected for it.
    fn commit_or_fault(
        &self,
        request: etcd_client::Txn,
        sends: Arc<Sends>,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        #[cfg(test)]
        {
            let fault = self.commit_faults.lock().expect("faults").front().copied();
            if let Some(fault) = fault {
                if fault == CommitFault::RequestLost {
                    *self.lost_request.lock().expect("lost request") = Some(request);
                } else {
                    self.commit(request, sends.clone())?;
                }
                if fault != CommitFault::AnswerLostThenUnreachable {
                    self.commit_faults.lock().expect("faults").pop_front();
                }
                sends.in_doubt.store(true, Ordering::Relaxed);
                return Err(StoreError::Unavailable(format!("etcd did not answer within {OP_TIMEOUT:?}")));
            }
        }
        self.commit(request, sends)
    }

    pub(crate) fn commit(
        &self,
        request: etcd_client::Txn,
        sends: Arc<Sends>,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        let members = self.members();
        self.run(async move {
            members
                .call_noting(
                    |mut c| {
                        let request = request.clone();
                        async move { c.txn(request).await }
                    },
                    &sends,
                )
                .await
        })
    }

    /// The outcome of the commit of transaction `id`, sent after revision `floor` and left without an answer
    /// (`reason`): fences it off (puts its fence key, so it can no longer apply), then looks whether it applied
    /// before. Ok(true): it did. `Unavailable`: it did not and never will. `OutcomeUnknown`: it cannot be known
    /// now (etcd still without a quorum: the commit may yet apply).
    fn settle(&self, witness: &str, fence: &str, id: &str, floor: i64, reason: String) -> Result<bool, StoreError> {
        let unknown =
            |why: String| StoreError::OutcomeUnknown { txn: id.to_owned(), reason: format!("{reason}; {why}") };
        let fenced = self.fence(fence).map_err(|e| unknown(format!("fencing it off failed ({e})")))?;
        match self.committed_before(witness, id, floor, fenced) {
            Ok(Some(true)) => {
                tracing::info!(txn = id, "a commit etcd did not answer had applied: reported as committed");
                Ok(true)
            }
            Ok(Some(false)) => Err(StoreError::Unavailable(format!(
                "{reason}; nothing was written (transaction {id} was fenced off before it applied)"
            ))),
            Ok(None) => Err(unknown("the history that would say whether it applied is compacted".into())),
            Err(e) => Err(unknown(format!("its history could not be read ({e})"))),
        }
    }

    /// Puts `fence` (under a lease of [`FENCE_TTL_SECS`]); returns the revision it was put at.
    pub(super) fn fence(&self, fence: &str) -> Result<i64, StoreError> {
        #[cfg(test)]
        {
            let mut faults = self.commit_faults.lock().expect("faults");
            if faults.front() == Some(&CommitFault::AnswerLostThenUnreachable) {
                faults.pop_front();
                return Err(StoreError::Unavailable(format!("etcd did not answer within {OP_TIMEOUT:?}")));
            }
        }
        let members = self.members();
        let key = fence.to_owned();
        let put = self.run(async move {
            members
                .call(|mut c| {
                    let key = key.clone();
                    async move {
                        let lease = c.lease_grant(FENCE_TTL_SECS, None).await?.id();
                        let options = etcd_client::PutOptions::new().with_lease(lease);
                        c.put(key, "fenced", Some(options)).await
                    }
                })
                .await
        })?;
        let revision = put.header().map(|h| h.revision()).unwrap_or(0);
        self.seen.fetch_max(revision, Ordering::Relaxed);
        Ok(revision)
    }

    /// Whether transaction `id` committed after revision `floor` and at or before revision `until` (0: now): some
    /// version of its generation key `witness` written in that span holds the id. None: that history is compacted.
    fn committed_before(&self, witness: &str, id: &str, floor: i64, until: i64) -> Result<Option<bool>, StoreError> {
        let (members, key, id) = (self.members(), witness.to_owned(), id.to_owned());
        self.run(async move {
            let at = if until > 0 { GetOptions::new().with_revision(until) } else { GetOptions::new() };
            let latest = members
                .call(|mut c| {
                    let (key, at) = (key.clone(), at.clone());
                    async move { c.get(key, Some(at)).await }
                })
                .await;
            let latest = match latest {
                Ok(response) => response,
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => return Ok(None),
                Err(e) => return Err(e),
            };
            let last = match latest.kvs().first() {
                None => return Ok(Some(false)),
                Some(kv) if kv.value() == id.as_bytes() => return Ok(Some(true)),
                Some(kv) if kv.mod_revision() <= floor => return Ok(Some(false)),
                Some(kv) => kv.mod_revision(),
            };
            // The versions written between `floor` and `last`, oldest first.
            let mut stream = members
                .call(|mut c| {
                    let key = key.clone();
                    async move { c.watch(key, Some(WatchOptions::new().with_start_revision(floor + 1))).await }
                })
                .await?;
            while let Some(response) = stream.message().await? {
                if response.compact_revision() > 0 {
                    return Ok(None);
                }
                for kv in response.events().iter().filter_map(|e| e.kv()) {
                    if kv.value() == id.as_bytes() {
                        return Ok(Some(true));
                    }
                    if kv.mod_revision() >= last {
                        return Ok(Some(false));
                    }
                }
            }
            Ok(None)
        })
    }
}

/// Runs `f` on the store's runtime and waits for it on this thread, at most [`OP_TIMEOUT`].
fn wait<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(tokio::time::timeout(OP_TIMEOUT, f).await);
    });
    // On a worker of a multi-threaded runtime (a gRPC handler), tell the runtime this thread blocks, so the other
    // tasks it holds move to another worker meanwhile.
    let receive = || rx.recv();
    let received = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(receive)
        }
        _ => receive(),
    };
    match received {
        Ok(Ok(result)) => result.map_err(unavailable),
        Ok(Err(_)) => Err(StoreError::Unavailable(format!("etcd did not answer within {OP_TIMEOUT:?}"))),
        Err(_) => Err(StoreError::Unavailable("etcd client stopped".into())),
    }
}

/// Tells `changes` what is written to `tables`: a [`Change::Reset`] read at one revision R, then the watch's events
/// from R + 1 on, one [`Change::Delta`] per watch response (etcd never splits one revision's events across responses
/// unless asked to: a transaction arrives whole). When the watch fails or falls behind a compaction, a new `Reset`
/// and a watch from its revision: the follower catches up on what it missed without replaying anything twice.
async fn follow(
    members: Arc<Members>,
    prefix: String,
    tables: Vec<Table>,
    changes: mpsc::UnboundedSender<Change>,
    watch: Watch,
) {
    if tables.is_empty() {
        return;
    }
    while !changes.is_closed() {
        match tokio::time::timeout(OP_TIMEOUT, read_tables(&members, &prefix, &tables)).await {
            Ok(Ok((entries, revision))) => {
                watch.seen.fetch_max(revision, Ordering::Relaxed);
                if changes.send(Change::Reset(entries)).is_err() {
                    return;
                }
                watch_from(&members, &prefix, &tables, revision + 1, &changes, &watch).await;
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "etcd: reading the followed tables failed"),
            Err(_) => tracing::debug!("etcd: reading the followed tables timed out"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every entry of `tables`, all read at one revision (the first listing's, linearizable), and that revision.
async fn read_tables(
    members: &Members,
    prefix: &str,
    tables: &[Table],
) -> Result<(Vec<Entry>, i64), etcd_client::Error> {
    let mut entries = Vec::new();
    let mut revision = 0;
    for table in tables {
        let table_prefix = format!("{prefix}{}/", table.name());
        let response = members
            .call(|mut c| {
                let options = GetOptions::new().with_prefix();
                let options = if revision > 0 { options.with_revision(revision) } else { options };
                let key = table_prefix.clone();
                async move { c.get(key, Some(options)).await }
            })
            .await?;
        if revision == 0 {
            revision = response.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(&kv.key()[table_prefix.len()..]).into_owned();
            entries.push((*table, key, kv.value().to_vec()));
        }
    }
    Ok((entries, revision))
}

/// What the follower's watch reports back to the store: the revision it saw, the events etcd sent it.
struct Watch {
    seen: Arc<AtomicI64>,
    events: Arc<AtomicU64>,
}

/// The one key range holding every key of `tables` (not empty): from the first table's `<prefix><table>/` to the
/// end of the last one's, in etcd's byte order. One range, so that one watch covers it and a transaction's writes to
/// several followed tables arrive in one response. The tables that sort between the followed ones lie inside it
/// (their writes are dropped by [`followed_writes`]); the certificate log, generation and fence keys (`_gen/`,
/// `_fence/`), admins and CA files lie outside, so etcd no longer sends them to every replica.
fn followed_range(prefix: &str, tables: &[Table]) -> (String, String) {
    let mut prefixes: Vec<String> = tables.iter().map(|t| format!("{prefix}{}/", t.name())).collect();
    prefixes.sort();
    let first = prefixes.first().cloned().unwrap_or_else(|| prefix.to_owned());
    // The end is exclusive: `<prefix><last>0` (`0` is the byte after `/`) is the first key past `<prefix><last>/`.
    let mut end = prefixes.last().cloned().unwrap_or_else(|| prefix.to_owned());
    end.pop();
    end.push('0');
    (first, end)
}

/// Follows the watch from `start` until it fails, is canceled or compacted, or nobody listens any more.
async fn watch_from(
    members: &Members,
    prefix: &str,
    tables: &[Table],
    start: i64,
    changes: &mpsc::UnboundedSender<Change>,
    progress: &Watch,
) {
    let (from, end) = followed_range(prefix, tables);
    let watch = members.call(|mut c| {
        let (from, end) = (from.clone(), end.clone());
        async move { c.watch(from, Some(WatchOptions::new().with_range(end).with_start_revision(start))).await }
    });
    let mut stream = match watch.await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "etcd watch not established");
            return;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(response)) => {
                if response.canceled() || response.compact_revision() > 0 {
                    tracing::warn!(reason = response.cancel_reason(), "etcd watch canceled; reading everything again");
                    return;
                }
                progress.events.fetch_add(response.events().len() as u64, Ordering::Relaxed);
                let writes = followed_writes(prefix, tables, response.events());
                // Before telling: whatever the follower reads next must be at least this revision.
                let revision = response.header().map(|h| h.revision()).unwrap_or(0);
                progress.seen.fetch_max(revision, Ordering::Relaxed);
                if !writes.is_empty() && changes.send(Change::Delta(writes)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "etcd watch failed; reading everything again");
                return;
            }
        }
    }
}

/// The events that write to one of `tables` (not generation keys, not other tables), in order.
fn followed_writes(prefix: &str, tables: &[Table], events: &[etcd_client::Event]) -> Vec<Write> {
    let mut writes = Vec::new();
    for event in events {
        let Some(kv) = event.kv() else { continue };
        let Some(rest) = kv.key().strip_prefix(prefix.as_bytes()) else { continue };
        let rest = String::from_utf8_lossy(rest);
        let Some((table, key)) = rest.split_once('/') else { continue };
        let Some(table) = Table::from_name(table).filter(|t| tables.contains(t)) else { continue };
        let value = match event.event_type() {
            EventType::Put => Some(kv.value().to_vec()),
            EventType::Delete => None,
        };
        writes.push((table, key.to_owned(), value));
    }
    writes
}

/// Keeps `available` true while a linearizable read succeeds (it needs a quorum).
async fn probe(members: Arc<Members>, prefix: String, available: Arc<AtomicBool>) {
    let key = format!("{prefix}{GENERATION}probe");
    loop {
        let read = members.call(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        });
        let ok = matches!(tokio::time::timeout(OP_TIMEOUT, read).await, Ok(Ok(_)));
        if available.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("etcd available again");
            } else {
                tracing::warn!("etcd unavailable: writes are refused, discovery serves the last snapshot");
            }
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Store for EtcdStore {
    /// Serializable: keeps answering (possibly a little behind) when etcd has lost its quorum. What decides a
    /// write is read again inside the transaction, linearizably, and compared at commit.
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read(table, key, true)?.0)
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self.read_table(table, true)?.0)
    }

    fn update(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), StoreError>) -> Result<(), StoreError> {
        for attempt in 1..=MAX_ATTEMPTS {
            if self.attempt(f)? {
                return Ok(());
            }
            // Another writer won: back off a little (randomly, so racing replicas spread), then read again.
            let jitter = u64::from(rand_u8()) % (attempt.min(8) as u64 * 2 + 1);
            std::thread::sleep(Duration::from_millis(jitter));
        }
        Err(StoreError::Conflict { attempts: MAX_ATTEMPTS })
    }

    fn follow(&self, tables: &[Table]) -> Option<mpsc::UnboundedReceiver<Change>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let watch = Watch { seen: self.seen.clone(), events: self.watched.clone() };
        self.handle.spawn(follow(self.members(), self.prefix.clone(), tables.to_vec(), tx, watch));
        Some(rx)
    }

    fn leased(&self) -> Option<&dyn super::LeasedStatus> {
        Some(self)
    }

    fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }
}

/// A transaction's id: 16 random bytes, hex.
fn txn_id() -> String {
    let mut bytes = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    hex::encode(bytes)
}

fn rand_u8() -> u8 {
    let mut byte = [0u8];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    byte[0]
}

/// A table's entries: (key, value).
type Entries = Vec<(String, Vec<u8>)>;
/// A key's value (None: absent) and mod_revision (0: absent) when read.
type Read = (Option<Vec<u8>>, i64);

struct EtcdTxn<'a> {
    store: &'a EtcdStore,
    /// Keys read, with their value and mod_revision (0: absent) when first read.
    reads: RefCell<BTreeMap<(Table, String), Read>>,
    /// Tables listed, with the revision of the listing.
    listed: RefCell<BTreeMap<Table, i64>>,
    /// Buffered writes (None: delete).
    writes: BTreeMap<(Table, String), Option<Vec<u8>>>,
}

impl Txn for EtcdTxn<'_> {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let id = (table, key.to_owned());
        if let Some(value) = self.writes.get(&id) {
            return Ok(value.clone());
        }
        if let Some((value, _)) = self.reads.borrow().get(&id) {
            return Ok(value.clone());
        }
        let read = self.store.read(table, key, false)?;
        let value = read.0.clone();
        self.reads.borrow_mut().insert(id, read);
        Ok(value)
    }

    fn get_many(&self, keys: &[(Table, &str)]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        // What this transaction wrote or read already, from memory; the rest in one read.
        let known = |table: Table, key: &str| {
            let id = (table, key.to_owned());
            (self.writes.get(&id).cloned()).or_else(|| self.reads.borrow().get(&id).map(|(value, _)| value.clone()))
        };
        let mut values: Vec<Option<Option<Vec<u8>>>> = keys.iter().map(|(table, key)| known(*table, key)).collect();
        let missing: Vec<(Table, &str)> =
            keys.iter().zip(&values).filter(|(_, value)| value.is_none()).map(|(key, _)| *key).collect();
        if !missing.is_empty() {
            let mut fetched = self.store.read_many(&missing)?.into_iter();
            for ((table, key), value) in keys.iter().zip(values.iter_mut()) {
                if value.is_some() {
                    continue;
                }
                let read = fetched.next().expect("one read per missing key");
                *value = Some(read.0.clone());
                // A key named twice is read once; the first read is the one compared.
                self.reads.borrow_mut().entry((*table, (*key).to_owned())).or_insert(read);
            }
        }
        Ok(values.into_iter().map(|value| value.expect("every key known or read")).collect())
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (entries, revision) = self.store.read_table(table, false)?;
        self.listed.borrow_mut().entry(table).and_modify(|r| *r = (*r).min(revision)).or_insert(revision);
        let mut merged: BTreeMap<String, Vec<u8>> = entries.into_iter().collect();
        for ((t, key), value) in &self.writes {
            if *t == table {
                match value {
                    Some(value) => merged.insert(key.clone(), value.clone()),
                    None => merged.remove(key),
                };
            }
        }
        Ok(merged.into_iter().collect())
    }

    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.writes.insert((table, key.to_owned()), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError> {
        self.writes.insert((table, key.to_owned()), None);
        Ok(())
    }
}
