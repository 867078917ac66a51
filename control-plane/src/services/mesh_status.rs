//! Every proxy of the mesh, whichever replica holds its stream. On a shared store each replica publishes its own
//! proxies' stream status (and the certificates each reported holding, which a root rotation waits on) as leased
//! entries (`store/leased.rs`), grouped: the proxies fall into [`BUCKETS`] buckets by a hash of their node name,
//! and each bucket is one entry (`<prefix>_status/<replica>/_proxies-NN`, the bucket's proxies by node), written
//! only when one of its proxies changed or left it. So a change that every proxy ACKs costs a replica at most
//! [`BUCKETS`] puts, not one per proxy. It publishes at most once per [`PUBLISH_EVERY`], and everything again when
//! its lease had expired. A publication waits (at most [`SETTLE_AT_MOST`] longer) while a push of this replica is
//! unanswered, so that the writes do not compete with the push and a change costs one write per bucket, not one for
//! the push and one for its ACK; a period where nothing changed encodes nothing. A dead replica's entries go with
//! its lease. With redb the status stays in memory, as the only replica's.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_proto::v1 as pb;

use super::Shared;
use crate::holdings::Held;

/// How often a replica writes what changed in its proxies' status.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// How much longer a publication waits, at most, while a push of this replica is not answered yet: the status
/// writes (one etcd put per proxy that changed, which every replica's watch then receives) do not compete with a
/// push for the CPU and the store, and a push's sent and ACKed versions go out in one write instead of two.
const SETTLE_AT_MOST: Duration = Duration::from_secs(1);
/// How often a waiting publication looks again.
const SETTLE_POLL: Duration = Duration::from_millis(20);
/// The key of a replica's entry about itself among its buckets: the fingerprint of the root its serving certificate
/// chains to (`Shared::serving_root`).
const SERVING_KEY: &str = "_serving";
/// How many buckets a replica's proxies are grouped in (one etcd key each): a few dozen keys per replica, each
/// rewritten when one of its proxies changes; 10,000 proxies on 3 replicas make buckets of about 50 (13 KB).
pub const BUCKETS: u32 = 64;
/// The start of a bucket's key (node names have no `_`, so no bucket is mistaken for a node).
const BUCKET_KEY: &str = "_proxies-";

/// One proxy as the mesh sees it: its stream's status and what it reported holding.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshProxy {
    pub status: pb::ProxyStatus,
    /// A report of held certificates came on the current stream.
    pub reported: bool,
    /// The reported certificates, counted by the SHA-256 of their issuer.
    pub issuers: BTreeMap<String, u32>,
}

impl MeshProxy {
    fn new(status: pb::ProxyStatus, held: &Held) -> Self {
        let mut issuers = BTreeMap::new();
        for cert in &held.certificates {
            *issuers.entry(cert.issuer_sha256.clone()).or_insert(0u32) += 1;
        }
        Self { status, reported: held.reported, issuers }
    }

    /// How many of its certificates the CA with this fingerprint signed.
    pub fn signed_by(&self, ca_sha256: &str) -> usize {
        self.issuers.get(ca_sha256).copied().unwrap_or(0) as usize
    }

    pub fn certificates(&self) -> usize {
        self.issuers.values().map(|n| *n as usize).sum()
    }
}

/// The stored form of one proxy in its bucket (`<prefix>_status/<replica>/_proxies-NN`: node to entry).
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    connected: bool,
    connected_since: i64,
    sent: u64,
    acked: u64,
    nacked: u64,
    nack_error: String,
    proxy_version: String,
    convergence: f64,
    reported: bool,
    issuers: BTreeMap<String, u32>,
}

fn entry(proxy: &MeshProxy) -> Entry {
    let s = &proxy.status;
    Entry {
        connected: s.connected,
        connected_since: s.connected_since_unix,
        sent: s.sent_version,
        acked: s.acked_version,
        nacked: s.nacked_version,
        nack_error: s.last_nack_error.clone(),
        proxy_version: s.proxy_version.clone(),
        convergence: s.last_convergence_seconds,
        reported: proxy.reported,
        issuers: proxy.issuers.clone(),
    }
}

/// The bucket of a node: FNV-1a of its name (stable across processes and versions).
pub fn bucket_of(node: &str) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(BUCKETS)) as u32
}

fn bucket_key(bucket: u32) -> String {
    format!("{BUCKET_KEY}{bucket:02}")
}

/// One bucket's stored form: its proxies by node (sorted, so the same proxies encode to the same bytes).
fn encode_bucket<'a>(proxies: impl IntoIterator<Item = &'a MeshProxy>) -> Vec<u8> {
    let entries: BTreeMap<&str, Entry> = proxies.into_iter().map(|p| (p.status.node.as_str(), entry(p))).collect();
    serde_json::to_vec(&entries).expect("a status bucket serializes")
}

/// A bucket's proxies, as `replica` published them.
fn decode_bucket(replica: &str, bytes: &[u8]) -> Result<Vec<MeshProxy>, serde_json::Error> {
    let entries: BTreeMap<String, Entry> = serde_json::from_slice(bytes)?;
    Ok(entries.into_iter().map(|(node, e)| from_entry(replica, node, e)).collect())
}

fn from_entry(replica: &str, node: String, e: Entry) -> MeshProxy {
    MeshProxy {
        status: pb::ProxyStatus {
            node,
            connected: e.connected,
            connected_since_unix: e.connected_since,
            sent_version: e.sent,
            acked_version: e.acked,
            nacked_version: e.nacked,
            last_nack_error: e.nack_error,
            proxy_version: e.proxy_version,
            last_convergence_seconds: e.convergence,
            replica: replica.to_owned(),
        },
        reported: e.reported,
        issuers: e.issuers,
    }
}

/// This replica's proxies.
fn local(shared: &Shared) -> Vec<MeshProxy> {
    shared.proxies.list().into_iter().map(|s| MeshProxy::new(s.clone(), &shared.holdings.get(&s.node))).collect()
}

/// Every proxy of the mesh, one entry per node, sorted by node. A node listed by several replicas (it moved, and
/// the replica it left still lists it: disconnected, or connected until the dead replica's lease expires) is shown
/// once: connected before disconnected, then the latest stream, then this replica's own entry. Entries of other
/// replicas that cannot be read (the store unreachable) are left out, with a warning: this replica's own proxies
/// are still listed.
pub fn list(shared: &Shared) -> Vec<MeshProxy> {
    let mut all = local(shared);
    if let Some(leased) = shared.mesh.store().leased() {
        match leased.list_all() {
            Ok(entries) => {
                for (replica, key, bytes) in entries {
                    if replica == shared.proxies.replica() || !key.starts_with(BUCKET_KEY) {
                        continue;
                    }
                    match decode_bucket(&replica, &bytes) {
                        Ok(proxies) => all.extend(proxies),
                        Err(e) => tracing::warn!(%replica, %key, error = %e, "unreadable proxy status entry"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "other replicas' proxy status unavailable; listing this replica's"),
        }
    }
    one_per_node(all, shared.proxies.replica())
}

/// Every live replica (this one first) and the fingerprint of the root its serving certificate chains to. A
/// replica is live while its lease is (`store/leased.rs`): a dead one drops out within the lease's TTL. Without a
/// shared store, this replica alone.
pub fn serving_roots(shared: &Shared) -> Result<Vec<(String, String)>, crate::store::StoreError> {
    let own = shared.proxies.replica().to_owned();
    let mut roots = vec![(own.clone(), shared.serving_root.lock().expect("serving root").clone())];
    if let Some(leased) = shared.mesh.store().leased() {
        for (replica, key, bytes) in leased.list_all()? {
            if key == SERVING_KEY && replica != own {
                roots.push((replica, String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
    }
    Ok(roots)
}

/// One entry per node, sorted by node: connected before disconnected, then the latest stream, then `own`'s.
fn one_per_node(all: Vec<MeshProxy>, own: &str) -> Vec<MeshProxy> {
    let mut by_node: BTreeMap<String, MeshProxy> = BTreeMap::new();
    for proxy in all {
        let rank = |p: &MeshProxy| (p.status.connected, p.status.connected_since_unix, p.status.replica == own);
        match by_node.get(&proxy.status.node) {
            Some(kept) if rank(kept) >= rank(&proxy) => {}
            _ => {
                by_node.insert(proxy.status.node.clone(), proxy);
            }
        }
    }
    by_node.into_values().collect()
}

/// Publishes this replica's proxies' status until shutdown (nothing to do without a shared store).
pub async fn publish(shared: Shared) {
    if shared.mesh.store().leased().is_none() {
        return;
    }
    let mut published = Published::default();
    loop {
        let tick = shared.clone();
        let mut state = std::mem::take(&mut published);
        published = match tokio::task::spawn_blocking(move || {
            state.once(&tick);
            state
        })
        .await
        {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(error = %e, "proxy status publication failed");
                Published::default()
            }
        };
        tokio::select! {
            () = tokio::time::sleep(PUBLISH_EVERY) => {}
            () = shared.shutting_down() => break,
        }
        let settle_by = tokio::time::Instant::now() + SETTLE_AT_MOST;
        while shared.proxies.awaiting_answers() && tokio::time::Instant::now() < settle_by {
            tokio::select! {
                () = tokio::time::sleep(SETTLE_POLL) => {}
                () = shared.shutting_down() => break,
            }
        }
        if *shared.shutdown.borrow() {
            break;
        }
    }
    // A clean shutdown: this replica's entries (and the rotation driver role) go now, not at the lease's end.
    let store = shared.clone();
    let released = tokio::task::spawn_blocking(move || store.mesh.store().leased().map(|l| l.release())).await;
    if let Ok(Some(Err(e))) = released {
        tracing::warn!(error = %e, "cannot release the proxy status lease; it expires on its own");
    }
}

/// What this replica last wrote, under which lease.
#[derive(Default)]
struct Published {
    lease: i64,
    /// Every proxy as last written, by node.
    written: HashMap<String, MeshProxy>,
    /// The serving root as last written.
    serving: Option<String>,
    /// What `written` reflects (the proxies' and holdings' generations, the serving root), once written whole: a
    /// period where none of it changed encodes nothing.
    reflects: Option<(u64, u64, String)>,
}

/// What one publication writes: the buckets to put (Some) or delete (None, emptied), by key.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    writes: Vec<(String, Option<Vec<u8>>)>,
    /// The proxies whose entry changed, appeared or went.
    changed: usize,
}

/// The buckets to write so that the store holds `current` where it held `written`: a bucket none of whose proxies
/// changed (nor appeared in it, nor left it) is not written.
fn plan(written: &HashMap<String, MeshProxy>, current: &HashMap<String, MeshProxy>) -> Plan {
    let mut dirty = std::collections::BTreeSet::new();
    let mut changed = 0;
    for (node, proxy) in current {
        if written.get(node) != Some(proxy) {
            dirty.insert(bucket_of(node));
            changed += 1;
        }
    }
    for node in written.keys().filter(|n| !current.contains_key(*n)) {
        dirty.insert(bucket_of(node));
        changed += 1;
    }
    if dirty.is_empty() {
        return Plan::default();
    }
    let mut members: BTreeMap<u32, Vec<&MeshProxy>> = dirty.iter().map(|b| (*b, Vec::new())).collect();
    for (node, proxy) in current {
        if let Some(bucket) = members.get_mut(&bucket_of(node)) {
            bucket.push(proxy);
        }
    }
    let writes = members
        .into_iter()
        .map(|(bucket, proxies)| (bucket_key(bucket), (!proxies.is_empty()).then(|| encode_bucket(proxies))))
        .collect();
    Plan { writes, changed }
}

impl Published {
    fn once(&mut self, shared: &Shared) {
        let Some(leased) = shared.mesh.store().leased() else { return };
        let lease = match leased.keep_alive() {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep the proxy status lease alive");
                return;
            }
        };
        if lease != self.lease {
            // A new lease: whatever was written under the old one is gone (or going).
            self.written.clear();
            self.serving = None;
            self.reflects = None;
            self.lease = lease;
        }
        // Read before listing: a change made while listing leaves a newer generation, listed next time.
        let serving_root = shared.serving_root.lock().expect("serving root").clone();
        let reflects = (shared.proxies.generation(), shared.holdings.generation(), serving_root.clone());
        if self.reflects.as_ref() == Some(&reflects) {
            return;
        }
        let current: HashMap<String, MeshProxy> =
            local(shared).into_iter().map(|p| (p.status.node.clone(), p)).collect();
        let Plan { mut writes, changed } = plan(&self.written, &current);
        let serving = (!serving_root.is_empty()).then_some(serving_root);
        if serving != self.serving {
            writes.push((SERVING_KEY.to_owned(), serving.clone().map(String::into_bytes)));
        }
        if writes.is_empty() {
            self.reflects = Some(reflects);
            return;
        }
        match leased.write(lease, shared.proxies.replica(), &writes) {
            Ok(()) => {
                metrics::counter!("trellis_proxy_status_writes_total").increment(changed as u64);
                metrics::counter!("trellis_proxy_status_puts_total").increment(writes.len() as u64);
                self.written = current;
                self.serving = serving;
                self.reflects = Some(reflects);
            }
            Err(e) => {
                // Partly written perhaps: write everything next time.
                tracing::warn!(error = %e, "cannot publish the proxy status");
                self.written.clear();
                self.serving = None;
                self.reflects = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(node: &str, replica: &str, connected: bool, since: i64, acked: u64) -> MeshProxy {
        let status = pb::ProxyStatus {
            node: node.into(),
            replica: replica.into(),
            connected,
            connected_since_unix: since,
            acked_version: acked,
            ..Default::default()
        };
        MeshProxy::new(status, &Held::default())
    }

    #[test]
    fn a_node_listed_by_several_replicas_is_shown_once_at_its_live_stream() {
        let all = vec![
            // a moved from r1 (dead, its entry not expired yet) to r2.
            proxy("a", "r2", true, 200, 7),
            proxy("a", "r1", true, 100, 5),
            // b left r2 (still alive: disconnected there) for r3.
            proxy("b", "r3", true, 120, 6),
            proxy("b", "r2", false, 150, 6),
            proxy("c", "r3", true, 50, 7),
        ];
        let listed: Vec<(String, String)> =
            one_per_node(all, "r2").into_iter().map(|p| (p.status.node, p.status.replica)).collect();
        assert_eq!(
            listed,
            [("a".into(), "r2".into()), ("b".into(), "r3".into()), ("c".into(), "r3".into())],
            "connected first, then the latest stream"
        );
    }

    #[test]
    fn an_entry_round_trips_with_its_replica_and_holdings() {
        let held = Held {
            reported: true,
            certificates: vec![
                pb::HeldCertificate { issuer_sha256: "old".into(), ..Default::default() },
                pb::HeldCertificate { issuer_sha256: "new".into(), ..Default::default() },
                pb::HeldCertificate { issuer_sha256: "new".into(), ..Default::default() },
            ],
        };
        let mut status = proxy("a", "r1", true, 100, 5).status;
        status.last_nack_error = "bad".into();
        let original = MeshProxy::new(status, &held);
        let other = proxy("b", "r1", false, 90, 4);
        let decoded = decode_bucket("r1", &encode_bucket([&other, &original])).unwrap();
        assert_eq!(decoded, [original.clone(), other.clone()], "by node");
        let decoded = &decoded[0];
        assert_eq!((decoded.signed_by("old"), decoded.signed_by("new"), decoded.certificates()), (1, 2, 3));
        // The replica comes from the key, not the value.
        assert_eq!(decode_bucket("r2", &encode_bucket([&other])).unwrap()[0].status.replica, "r2");
        assert_eq!(encode_bucket([&original, &other]), encode_bucket([&other, &original]), "same bytes in any order");
        assert!(decode_bucket("r1", b"not json").is_err());
        assert!(decode_bucket("r1", &encode_bucket([])).unwrap().is_empty());
    }

    #[test]
    fn nodes_spread_over_the_buckets_and_keep_theirs() {
        assert_eq!(bucket_of("node-1"), bucket_of("node-1"));
        // FNV-1a, fixed: a bucket does not move between processes or versions.
        assert_eq!(bucket_of(""), (0xcbf2_9ce4_8422_2325u64 % u64::from(BUCKETS)) as u32);
        let mut sizes = vec![0usize; BUCKETS as usize];
        for i in 0..10_000 {
            sizes[bucket_of(&format!("bench-{i}")) as usize] += 1;
        }
        let (least, most) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        println!("10,000 nodes in {BUCKETS} buckets: {least} to {most} each");
        assert!(*least > 0 && *most < 10_000 / BUCKETS as usize * 2, "{sizes:?}");
        assert_eq!(bucket_key(7), "_proxies-07");
        assert!(bucket_key(7).starts_with(BUCKET_KEY) && bucket_key(7).starts_with('_'));
    }

    fn by_node(proxies: &[MeshProxy]) -> HashMap<String, MeshProxy> {
        proxies.iter().map(|p| (p.status.node.clone(), p.clone())).collect()
    }

    /// A publication writes the buckets where a proxy changed, appeared or went, each whole; no other.
    #[test]
    fn an_unchanged_bucket_is_not_rewritten() {
        let nodes: Vec<MeshProxy> = (0..500).map(|i| proxy(&format!("n{i}"), "r1", true, 100, 5)).collect();
        let written = by_node(&nodes);
        // Everything new: every bucket written, each whole.
        let first = plan(&HashMap::new(), &written);
        assert_eq!((first.writes.len(), first.changed), (BUCKETS as usize, 500));
        let mut decoded = Vec::new();
        for (key, value) in &first.writes {
            let proxies = decode_bucket("r1", value.as_ref().unwrap()).unwrap();
            assert!(proxies.iter().all(|p| bucket_key(bucket_of(&p.status.node)) == *key), "{key}");
            decoded.extend(proxies);
        }
        assert_eq!(by_node(&decoded), written, "the buckets hold every proxy once");

        // Nothing changed: nothing written (the control for the cases below).
        assert_eq!(plan(&written, &written), Plan::default());

        // n7 ACKs a new version: its bucket alone, whole, with the new version.
        let mut current = written.clone();
        current.get_mut("n7").unwrap().status.acked_version = 6;
        let one = plan(&written, &current);
        assert_eq!(one.changed, 1);
        assert_eq!(one.writes.len(), 1, "{:?}", one.writes.iter().map(|w| &w.0).collect::<Vec<_>>());
        assert_eq!(one.writes[0].0, bucket_key(bucket_of("n7")));
        let bucket = decode_bucket("r1", one.writes[0].1.as_ref().unwrap()).unwrap();
        let expected: Vec<&MeshProxy> = nodes.iter().filter(|p| bucket_of(&p.status.node) == bucket_of("n7")).collect();
        assert_eq!(bucket.len(), expected.len());
        assert_eq!(bucket.iter().find(|p| p.status.node == "n7").unwrap().status.acked_version, 6);

        // A new node and one gone, in other buckets: those two written.
        let mut current = written.clone();
        let gone = (0..500).map(|i| format!("n{i}")).find(|n| bucket_of(n) != bucket_of("new")).unwrap();
        current.remove(&gone);
        current.insert("new".into(), proxy("new", "r1", true, 100, 5));
        let two = plan(&written, &current);
        let keys: std::collections::BTreeSet<String> = two.writes.iter().map(|w| w.0.clone()).collect();
        assert_eq!(keys, [bucket_key(bucket_of("new")), bucket_key(bucket_of(&gone))].into());
        assert_eq!(two.changed, 2);

        // A bucket's only proxy goes: the bucket is deleted.
        let lone = by_node(&[proxy("a", "r1", true, 1, 1)]);
        assert_eq!(plan(&lone, &HashMap::new()).writes, [(bucket_key(bucket_of("a")), None)]);
    }
}
