//! Every proxy of the mesh, whichever replica holds its stream. On a shared store each replica publishes its own
//! proxies' stream status (and the certificates each reported holding, which a root rotation waits on) as leased
//! entries (`store/leased.rs`): at most once per [`PUBLISH_EVERY`], only the entries that changed (so a burst of
//! ACKs costs one write per proxy per period, in batches), and everything again when its lease had expired. A
//! publication waits (at most [`SETTLE_AT_MOST`] longer) while a push of this replica is unanswered, so that the
//! writes do not compete with the push and a change costs one write per proxy, not one for the push and one for its
//! ACK; a period where nothing changed encodes nothing. A dead replica's entries go with its lease. With redb the
//! status stays in memory, as the only replica's.

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
/// The key of a replica's entry about itself among its proxies' (node names have no `_`): the fingerprint of the
/// root its serving certificate chains to (`Shared::serving_root`).
const SERVING_KEY: &str = "_serving";

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

/// The stored form of one entry (`<prefix>status/<replica>/<node>`).
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

fn encode(proxy: &MeshProxy) -> Vec<u8> {
    let s = &proxy.status;
    serde_json::to_vec(&Entry {
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
    })
    .expect("a status entry serializes")
}

fn decode(replica: &str, node: &str, bytes: &[u8]) -> Result<MeshProxy, serde_json::Error> {
    let e: Entry = serde_json::from_slice(bytes)?;
    Ok(MeshProxy {
        status: pb::ProxyStatus {
            node: node.to_owned(),
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
    })
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
                for (replica, node, bytes) in entries {
                    if replica == shared.proxies.replica() || node.starts_with('_') {
                        continue;
                    }
                    match decode(&replica, &node, &bytes) {
                        Ok(proxy) => all.push(proxy),
                        Err(e) => tracing::warn!(%replica, %node, error = %e, "unreadable proxy status entry"),
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
    written: HashMap<String, Vec<u8>>,
    /// What `written` reflects (the proxies' and holdings' generations, the serving root), once written whole: a
    /// period where none of it changed encodes nothing.
    reflects: Option<(u64, u64, String)>,
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
            self.reflects = None;
            self.lease = lease;
        }
        // Read before listing: a change made while listing leaves a newer generation, listed next time.
        let serving_root = shared.serving_root.lock().expect("serving root").clone();
        let reflects = (shared.proxies.generation(), shared.holdings.generation(), serving_root.clone());
        if self.reflects.as_ref() == Some(&reflects) {
            return;
        }
        let mut current: HashMap<String, Vec<u8>> =
            local(shared).into_iter().map(|p| (p.status.node.clone(), encode(&p))).collect();
        if !serving_root.is_empty() {
            current.insert(SERVING_KEY.to_owned(), serving_root.into_bytes());
        }
        let mut changes: Vec<(String, Option<Vec<u8>>)> = current
            .iter()
            .filter(|(node, bytes)| self.written.get(*node) != Some(*bytes))
            .map(|(node, bytes)| (node.clone(), Some(bytes.clone())))
            .collect();
        changes.extend(self.written.keys().filter(|n| !current.contains_key(*n)).map(|n| (n.clone(), None)));
        if changes.is_empty() {
            self.reflects = Some(reflects);
            return;
        }
        match leased.write(lease, shared.proxies.replica(), &changes) {
            Ok(()) => {
                metrics::counter!("trellis_proxy_status_writes_total").increment(changes.len() as u64);
                self.written = current;
                self.reflects = Some(reflects);
            }
            Err(e) => {
                // Partly written perhaps: write everything next time.
                tracing::warn!(error = %e, "cannot publish the proxy status");
                self.written.clear();
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
        let decoded = decode("r1", "a", &encode(&original)).unwrap();
        assert_eq!(decoded, original);
        assert_eq!((decoded.signed_by("old"), decoded.signed_by("new"), decoded.certificates()), (1, 2, 3));
        assert!(decode("r1", "a", b"not json").is_err());
    }
}
