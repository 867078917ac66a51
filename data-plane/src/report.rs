//! What one proxied connection tells the operator: Istio's TCP series and one access-log entry at its end. Every
//! path (HBONE inbound, plaintext inbound, HTTP tunnels, outbound) reports through this, so they report alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::access_log;
use crate::metrics::{Flags, OpenGuard, TcpSeries, TrafficKey, TrafficMetrics};

/// A connection's labels and addresses, from its start.
pub struct ConnectionReport {
    /// Its series' labels for a connection that goes through (`Flags::None`); refusals use their own flags.
    pub key: TrafficKey,
    pub source_addr: SocketAddr,
    pub destination_addr: SocketAddr,
    pub started: Instant,
}

/// What authorization decided for a connection, for the access log.
#[derive(Clone, Copy)]
pub struct Authz<'a> {
    /// `allowed`, `denied`, `per_request` (HTTP tunnels) or `none` (the source side, which does not authorize).
    pub decision: &'static str,
    /// The deciding policy (`ns/name`), or `-`.
    pub policy: &'a str,
}

impl Authz<'_> {
    pub const NONE: Authz<'static> = Authz { decision: "none", policy: "-" };
}

/// A connection counted as open: its series, and its place in the open-connections gauge until dropped.
pub struct Open {
    series: Arc<TcpSeries>,
    _gauge: OpenGuard,
}

impl ConnectionReport {
    pub fn new(key: TrafficKey, source_addr: SocketAddr, destination_addr: SocketAddr) -> Self {
        Self { key, source_addr, destination_addr, started: Instant::now() }
    }

    /// Counts and logs a connection refused before any byte moved.
    pub fn refused(&self, traffic: &TrafficMetrics, flags: Flags, authz: Authz<'_>, detail: &str) {
        let key = TrafficKey { flags, ..self.key.clone() };
        let series = traffic.tcp(key.clone());
        series.opened();
        series.closed(0, 0);
        self.log(&key, 0, 0, authz, detail);
    }

    /// Counts the connection as opened.
    pub fn opened(&self, traffic: &TrafficMetrics) -> Open {
        let series = traffic.tcp(self.key.clone());
        series.opened();
        Open { series, _gauge: traffic.open_connection(self.key.reporter) }
    }

    /// Counts its end with the bytes each way (`received`: from the source) and logs it; `detail` says why it
    /// ended early, if it did.
    pub fn closed(&self, open: Open, received: u64, sent: u64, authz: Authz<'_>, detail: Option<&str>) {
        open.series.closed(received, sent);
        self.log(&self.key, received, sent, authz, detail.unwrap_or("-"));
    }

    fn log(&self, key: &TrafficKey, received: u64, sent: u64, authz: Authz<'_>, detail: &str) {
        access_log::connection(&access_log::Entry {
            key,
            source_addr: Some(self.source_addr),
            destination_addr: self.destination_addr,
            received,
            sent,
            duration: self.started.elapsed(),
            decision: authz.decision,
            policy: authz.policy,
            detail,
        });
    }
}
