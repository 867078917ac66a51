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
    /// This replica's name (`--replica-name`), shown beside each of its proxies.
    replica: String,
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
        *state = ProxyState {
            connected: true,
            connected_since: crate::mesh::now_unix(),
            proxy_version: proxy_version.to_owned(),
            stream_id,
            ..ProxyState::default()
        };
        stream_id
    }

    pub fn disconnect(&self, node: &str, stream_id: u64) {
        if let Some(entry) = self.proxies.get(node) {
            let mut state = entry.state.lock().expect("lock");
            if state.stream_id == stream_id {
                state.connected = false;
                entry.commands.lock().expect("lock").take();
            }
        }
    }

    pub fn update(&self, node: &str, f: impl FnOnce(&mut ProxyState)) {
        if let Some(entry) = self.proxies.get(node) {
            f(&mut entry.state.lock().expect("lock"));
        }
    }

    /// Sends a command to the node's live stream; false when it has none.
    pub fn command(&self, node: &str, command: StreamCommand) -> bool {
        let sender = self.proxies.get(node).and_then(|e| e.commands.lock().expect("lock").clone());
        sender.is_some_and(|s| s.try_send(command).is_ok())
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.proxies.get(node).is_some_and(|e| e.state.lock().expect("lock").connected)
    }

    pub fn connected_count(&self) -> usize {
        self.proxies.iter().filter(|e| e.state.lock().expect("lock").connected).count()
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
