//! Trellis proxy (data plane): joins the mesh, keeps workload certificates fresh, follows the control
//! plane's config over the Discovery stream and exposes what it holds on the admin endpoint.
//!
//! Layers, top down (ARCHITECTURE.md): `app` wires the process; `reconfigure` follows changes into the data path;
//! `proxy` is the data path (its children: the paths a connection takes); below them the pieces those share
//! (`tls`, `hbone`, `registry`, `authz`, `connections`, `copy`, `report`, `sockets`, ...). No two sibling modules
//! import each other (checked by `tests/tests/layout.rs`).

// Three functions are allowed `unsafe`: `heap::release_free_pages` (malloc_trim), `heap::set_arena_max` and
// `heap::set_thresholds` (mallopt), each with its SAFETY argument.
#![deny(unsafe_code)]

pub mod access_log;
pub mod activity;
pub mod admin;
pub mod app;
pub mod authz;
pub mod backoff;
pub mod bound_addresses;
pub mod capture;
pub mod config;
pub mod connections;
pub mod copy;
pub mod discovery;
pub mod hbone;
pub mod heap;
pub mod identity;
pub mod listen;
pub mod log_limit;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod proxy;
pub mod read_ahead;
pub mod reconfigure;
pub mod registry;
pub mod report;
pub mod revocation;
pub mod sockets;
pub mod state;
pub mod stored;
pub mod svid_files;
pub mod tls;
pub mod workload_api;
pub mod write_batch;

#[cfg(test)]
mod testing;

use tokio::sync::watch;

/// Resolves once shutdown is requested (or its sender is gone, which also means stop).
pub async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// An error and all its sources on one line: transport errors hide the useful part ("connection
/// refused", "certificate not trusted") in their sources.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}

/// Why `trellis_proto::tls::connect` failed, without the address (callers name it once themselves).
pub(crate) fn connect_error(error: &trellis_proto::tls::TlsError) -> String {
    use trellis_proto::tls::TlsError;
    match error {
        TlsError::Connect { source, .. } | TlsError::BadAddress { source, .. } => error_chain(source),
        other => error_chain(other),
    }
}
