//! What one proxied connection tells the operator: Istio's TCP series and one access-log entry at its end. Every
//! path (HBONE inbound, plaintext inbound, HTTP tunnels, outbound) reports through this, so they report alike.
//!
//! A connection is reported exactly once, and the types say so: a [`ConnectionReport`] is consumed either by
//! [`ConnectionReport::refused`] or by [`ConnectionReport::opened`], whose [`Open`] is consumed by [`Open::closed`].

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authz {
    /// `allowed`, `denied`, `per_request` (HTTP tunnels) or `none` (the source side, which does not authorize).
    pub decision: &'static str,
    /// The deciding policy (`ns/name`, see `metrics::policy_name`); logged as `-` when none decided.
    pub policy: Option<Arc<str>>,
}

impl Authz {
    /// The source side, which does not authorize.
    pub const NONE: Authz = Authz { decision: "none", policy: None };
    /// HTTP tunnels: each request is authorized on its own.
    pub const PER_REQUEST: Authz = Authz { decision: "per_request", policy: None };

    pub fn allowed(policy: Option<Arc<str>>) -> Self {
        Self { decision: "allowed", policy }
    }

    pub fn denied(policy: Option<Arc<str>>) -> Self {
        Self { decision: "denied", policy }
    }

    fn policy(&self) -> &str {
        self.policy.as_deref().unwrap_or("-")
    }
}

/// A connection counted as open: its report, its series, and its place in the open-connections gauge until it is
/// closed.
pub struct Open {
    report: ConnectionReport,
    authz: Authz,
    series: Arc<TcpSeries>,
    _gauge: OpenGuard,
}

impl ConnectionReport {
    pub fn new(key: TrafficKey, source_addr: SocketAddr, destination_addr: SocketAddr) -> Self {
        Self { key, source_addr, destination_addr, started: Instant::now() }
    }

    /// Counts and logs a connection refused before any byte moved; `flags` come from why (each refusal's error
    /// type derives them).
    pub fn refused(self, traffic: &TrafficMetrics, flags: Flags, authz: Authz, detail: &str) {
        self.refused_logged(traffic, flags, authz, detail, true)
    }

    /// The same, logging the access-log entry only when `log` (a rate limit decided; the series always count).
    pub fn refused_logged(self, traffic: &TrafficMetrics, flags: Flags, authz: Authz, detail: &str, log: bool) {
        let key = TrafficKey { flags, ..self.key.clone() };
        let series = traffic.tcp(key.clone());
        series.opened();
        series.closed(0, 0);
        if log {
            self.log(&key, 0, 0, &authz, detail);
        }
    }

    /// Counts the connection as opened, under what authorization decided for it.
    pub fn opened(self, traffic: &TrafficMetrics, authz: Authz) -> Open {
        let series = traffic.tcp(self.key.clone());
        series.opened();
        let gauge = traffic.open_connection(self.key.reporter);
        Open { report: self, authz, series, _gauge: gauge }
    }

    fn log(&self, key: &TrafficKey, received: u64, sent: u64, authz: &Authz, detail: &str) {
        access_log::connection(&access_log::Entry {
            key,
            source_addr: Some(self.source_addr),
            destination_addr: self.destination_addr,
            received,
            sent,
            duration: self.started.elapsed(),
            decision: authz.decision,
            policy: authz.policy(),
            detail,
        });
    }
}

impl Open {
    /// Counts its end with the bytes each way (`received`: from the source) and logs it; `detail` says why it
    /// ended early, if it did.
    pub fn closed(self, received: u64, sent: u64, detail: Option<&str>) {
        self.series.closed(received, sent);
        let report = &self.report;
        report.log(&report.key, received, sent, &self.authz, detail.unwrap_or("-"));
    }
}
