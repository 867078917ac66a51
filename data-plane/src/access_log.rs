//! Access logs: one structured event per proxied connection at its end, and one per request on HTTP ports (target
//! `access`, JSON with `logFormat: json`): who talked to whom, how much, for how long, and what authorization
//! decided.

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

/// One HTTP request on a port declared `http`.
pub struct RequestEntry<'a> {
    pub key: &'a TrafficKey,
    pub source_addr: Option<SocketAddr>,
    pub destination_addr: SocketAddr,
    pub method: &'a str,
    /// Normalized, without the query (which may carry tokens).
    pub path: &'a str,
    pub status: u16,
    /// Until the response head was ready.
    pub duration: Duration,
    /// `allowed`, `denied`, `unauthenticated`, `bad_request`, `upstream_error`.
    pub decision: &'a str,
    pub policy: &'a str,
    /// `iss/sub` of the verified token, or `-`.
    pub request_principal: &'a str,
}

pub fn request(e: &RequestEntry<'_>) {
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
        method = e.method,
        path = e.path,
        response_code = e.status,
        duration_ms = e.duration.as_secs_f64() * 1000.0,
        decision = e.decision,
        policy = e.policy,
        request_principal = e.request_principal,
        response_flags = e.key.flags.as_str(),
        "request"
    );
}
