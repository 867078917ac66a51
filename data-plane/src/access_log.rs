//! Access logs: one structured event per proxied connection, at its end (target `access`, JSON with
//! `logFormat: json`): who talked to whom, how much, for how long, and what authorization decided.

use std::net::SocketAddr;
use std::time::Duration;

use crate::metrics::TrafficKey;

/// What is known of a connection when it ends (or is refused).
pub struct Entry<'a> {
    pub key: &'a TrafficKey,
    pub source_addr: Option<SocketAddr>,
    pub destination_addr: SocketAddr,
    /// Bytes from the source, and to it.
    pub received: u64,
    pub sent: u64,
    pub duration: Duration,
    /// `allowed`, `denied`, or `none` where no authorization applies (the source side).
    pub decision: &'static str,
    /// The deciding policy (`ns/name`), or `-`.
    pub policy: &'a str,
    /// Why it ended early, if it did (`-` otherwise).
    pub detail: &'a str,
}

pub fn connection(e: &Entry<'_>) {
    let source_addr = e.source_addr.map(|a| a.to_string());
    tracing::info!(
        target: "access",
        reporter = e.key.reporter.as_str(),
        source_principal = &*e.key.source.principal,
        source_workload = &*e.key.source.workload,
        source_namespace = &*e.key.source.namespace,
        source_address = source_addr.as_deref().unwrap_or("-"),
        destination_principal = &*e.key.destination.principal,
        destination_workload = &*e.key.destination.workload,
        destination_namespace = &*e.key.destination.namespace,
        destination_address = %e.destination_addr,
        connection_security_policy = if e.key.mutual_tls { "mutual_tls" } else { "none" },
        bytes_received = e.received,
        bytes_sent = e.sent,
        duration_ms = e.duration.as_millis() as u64,
        decision = e.decision,
        policy = e.policy,
        response_flags = e.key.flags.as_str(),
        detail = e.detail,
        "connection"
    );
}
