//! Per-proxy stream status (connected since, versions sent, ACKed and NACKed), for `trellisctl proxy-status`,
//! and the handle that lets the control plane reach a connected proxy's stream (renew, disconnect).

use std::sync::Mutex;

use dashmap::DashMap;
use tokio::sync::mpsc;
use trellis_proto::v1 as pb;

/// A command for one proxy's stream task.
#[derive(Debug)]
pub enum StreamCommand {
    Renew(Vec<String>),
    Disconnect(String),
}

#[derive(Debug, Default, Clone)]
pub struct ProxyState {
    pub connected: bool,
    pub connected_since: i64,
    pub sent_version: u64,
    pub acked_version: u64,
    pub nacked_version: u64,
    pub last_nack_error: String,
    pub proxy_version: String,
    /// From the latest change pushed on this stream to the proxy's ACK of it.
    pub last_convergence_seconds: f64,
    /// Identifies the stream, so an old stream that ends late does not mark a newer one disconnected.
    stream_id: u64,
}

struct Entry {
    state: Mutex<ProxyState>,
    commands: Mutex<Option<mpsc::Sender<StreamCommand>>>,
}

#[derive(Default)]
pub struct ProxyRegistry {
    proxies: DashMap<String, Entry>,
    next_stream: std::sync::atomic::AtomicU64,
    /// Bumped by every change of a proxy's state, so that the status publisher skips a period where nothing changed.
    generation: std::sync::atomic::AtomicU64,
    /// This replica's name (`--replica-name`), shown beside each of its proxies.
    replica: String,
    /// How many proxies are connected, kept as states change (`trellis_connected_proxies` is set at every connect
    /// and disconnect: counting the map each time made a burst of N connections cost N² lock-and-reads).
    connected: std::sync::atomic::AtomicUsize,
}

impl ProxyRegistry {
    pub fn named(replica: &str) -> Self {
        Self { replica: replica.to_owned(), ..Self::default() }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Records a new stream for `node` (replacing any older one, which is told to disconnect).
    pub fn connect(&self, node: &str, proxy_version: &str, commands: mpsc::Sender<StreamCommand>) -> u64 {
        let stream_id = self.next_stream.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let entry = self
            .proxies
            .entry(node.to_owned())
            .or_insert_with(|| Entry { state: Mutex::new(ProxyState::default()), commands: Mutex::new(None) });
        let old = entry.commands.lock().expect("lock").replace(commands);
        if let Some(old) = old {
            let _ = old.try_send(StreamCommand::Disconnect("replaced by a newer stream from the same node".into()));
        }
        let mut state = entry.state.lock().expect("lock");
        if !state.connected {
            self.connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        *state = ProxyState {
            connected: true,
            connected_since: crate::mesh::now_unix(),
            proxy_version: proxy_version.to_owned(),
            stream_id,
            ..ProxyState::default()
        };
        drop(state);
        self.changed();
        stream_id
    }

    pub fn disconnect(&self, node: &str, stream_id: u64) {
        if let Some(entry) = self.proxies.get(node) {
            let mut state = entry.state.lock().expect("lock");
            if state.stream_id == stream_id && state.connected {
                state.connected = false;
                self.connected.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                entry.commands.lock().expect("lock").take();
                drop(state);
                self.changed();
            }
        }
    }

    pub fn update(&self, node: &str, f: impl FnOnce(&mut ProxyState)) {
        if let Some(entry) = self.proxies.get(node) {
            f(&mut entry.state.lock().expect("lock"));
            self.changed();
        }
    }

    /// After a change (a publisher that read the generation before listing sees the change, or a newer generation).
    fn changed(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes with every change of a proxy's state (read it before reading the states).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a connected proxy has a push it has not answered yet (neither ACKed nor NACKed).
    pub fn awaiting_answers(&self) -> bool {
        self.proxies.iter().any(|entry| {
            let s = entry.state.lock().expect("lock");
            s.connected && s.sent_version > s.acked_version.max(s.nacked_version)
        })
    }

    /// Sends a command to the node's live stream; false when it has none.
    pub fn command(&self, node: &str, command: StreamCommand) -> bool {
        let sender = self.proxies.get(node).and_then(|e| e.commands.lock().expect("lock").clone());
        sender.is_some_and(|s| s.try_send(command).is_ok())
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.proxies.get(node).is_some_and(|e| e.state.lock().expect("lock").connected)
    }

    /// Proxies with an open stream (kept as they connect and disconnect: O(1)).
    pub fn connected_count(&self) -> usize {
        self.connected.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn list(&self) -> Vec<pb::ProxyStatus> {
        let mut out: Vec<pb::ProxyStatus> = self
            .proxies
            .iter()
            .map(|entry| {
                let s = entry.state.lock().expect("lock").clone();
                pb::ProxyStatus {
                    node: entry.key().clone(),
                    connected: s.connected,
                    connected_since_unix: s.connected_since,
                    sent_version: s.sent_version,
                    acked_version: s.acked_version,
                    nacked_version: s.nacked_version,
                    last_nack_error: s.last_nack_error,
                    proxy_version: s.proxy_version,
                    last_convergence_seconds: s.last_convergence_seconds,
                    replica: self.replica.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status publisher skips a period where the generation did not move, and waits while a push is unanswered.
    #[test]
    fn every_change_moves_the_generation_and_unanswered_pushes_are_seen() {
        let registry = ProxyRegistry::named("r1");
        let g0 = registry.generation();
        let (tx, _rx) = mpsc::channel(1);
        let stream = registry.connect("a", "v1", tx);
        let g1 = registry.generation();
        assert!(g1 > g0, "a connection is a change");
        assert!(!registry.awaiting_answers(), "nothing pushed yet");
        registry.update("a", |s| s.sent_version = 5);
        assert!(registry.generation() > g1, "a push is a change");
        assert!(registry.awaiting_answers(), "version 5 pushed, not answered");
        registry.update("a", |s| s.acked_version = 5);
        assert!(!registry.awaiting_answers(), "ACKed");
        registry.update("a", |s| s.sent_version = 6);
        registry.update("a", |s| s.nacked_version = 6);
        assert!(!registry.awaiting_answers(), "a NACK answers too");
        registry.update("a", |s| s.sent_version = 7);
        let g2 = registry.generation();
        registry.update("missing", |s| s.sent_version = 1);
        assert_eq!(registry.generation(), g2, "no proxy, no change");
        registry.disconnect("a", stream + 1);
        assert_eq!(registry.generation(), g2, "another stream's end changes nothing");
        assert!(registry.awaiting_answers());
        registry.disconnect("a", stream);
        assert!(registry.generation() > g2);
        assert!(!registry.awaiting_answers(), "a disconnected proxy is not waited for");
    }

    /// `trellis_connected_proxies` is kept as proxies connect and disconnect, not counted over the map.
    #[test]
    fn the_connected_count_follows_connections_replacements_and_late_ends() {
        let registry = ProxyRegistry::named("r1");
        let (tx, _rx) = mpsc::channel(1);
        let a1 = registry.connect("a", "v1", tx.clone());
        let b = registry.connect("b", "v1", tx.clone());
        assert_eq!(registry.connected_count(), 2);
        // a reconnects: its old stream is replaced, still one proxy; the old stream ending late changes nothing.
        let a2 = registry.connect("a", "v1", tx.clone());
        assert_eq!(registry.connected_count(), 2);
        registry.disconnect("a", a1);
        assert_eq!(registry.connected_count(), 2, "a late end of a replaced stream");
        registry.disconnect("a", a2);
        registry.disconnect("a", a2);
        assert_eq!(registry.connected_count(), 1, "one end counted once");
        registry.disconnect("b", b);
        assert_eq!(registry.connected_count(), 0);
        registry.connect("b", "v1", tx);
        assert_eq!(registry.connected_count(), 1);
        assert_eq!(registry.connected_count(), registry.list().iter().filter(|p| p.connected).count());
    }
}
