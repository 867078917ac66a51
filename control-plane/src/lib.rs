//! The Trellis control plane: the mesh CA, the store of security resources, the workload registry, and the
//! gRPC services that push them to proxies. `trellisctl` (the CLI) lives here too.

#![forbid(unsafe_code)]

pub mod auth;
pub mod authority;
pub mod bound_addresses;
pub mod ca;
pub mod ca_cli;
pub mod cli;
pub mod files;
pub mod holdings;
pub mod http;
pub mod init;
pub mod jwks;
pub mod jwks_host;
pub mod jwt_key;
pub mod kek;
pub mod mesh;
pub mod records;
pub mod rotation;
pub mod serial_tag;
pub mod server;
pub mod services;
pub mod serving;
pub mod settings;
pub mod shared_files;
pub mod status;
pub mod store;
pub mod store_config;
pub mod tokens;

/// A command-line duration [`parse_duration`] refuses.
#[derive(Debug, thiserror::Error)]
#[error("{input:?}: {source}")]
pub struct InvalidDuration {
    pub input: String,
    pub source: humantime::DurationError,
}

/// Parses durations such as `90s`, `30m`, `24h`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, InvalidDuration> {
    humantime::parse_duration(s).map_err(|source| InvalidDuration { input: s.to_owned(), source })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations_and_their_refusal() {
        assert_eq!(super::parse_duration("90s").unwrap(), Duration::from_secs(90));
        let refused = super::parse_duration("soon").unwrap_err().to_string();
        assert!(refused.starts_with("\"soon\": "), "{refused}");
    }
}
