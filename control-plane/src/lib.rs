//! The Trellis control plane: the mesh CA, the store of security resources, the workload registry, and the
//! gRPC services that push them to proxies. `trellisctl` (the CLI) lives here too.

#![forbid(unsafe_code)]

pub mod auth;
pub mod ca;
pub mod cli;
pub mod files;
pub mod http;
pub mod init;
pub mod jwks;
pub mod mesh;
pub mod records;
pub mod server;
pub mod services;
pub mod settings;
pub mod status;
pub mod store;
pub mod tokens;

/// Parses durations such as `90s`, `30m`, `24h`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// Logging for both binaries: `RUST_LOG` filter (default info), text or JSON.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
