//! `trellisctl`'s connection to the control plane and its output formats.

use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::Channel;

use crate::settings::CliConfig;

/// Connects with the admin credential of `config`, verifying the control plane against its CA bundle: to the
/// first of its endpoints that accepts the connection (each replica is verified the same way).
pub async fn connect(config: &CliConfig) -> anyhow::Result<Channel> {
    let roots = certs(&config.ca_bundle).context("config caBundle")?;
    let chain = certs(&config.certificate).context("config certificate")?;
    let key = PrivateKeyDer::from_pem_slice(config.key.as_bytes()).context("config key")?;
    let tls = trellis_proto::tls::client_config(
        trellis_proto::tls::ServerTrust::Roots(roots),
        Some(trellis_proto::tls::ClientIdentity { chain, key }),
    )?;
    let tls = Arc::new(tls);
    let endpoints = config.endpoints().map_err(|e| anyhow::anyhow!("config: {e}"))?;
    let mut failures = Vec::new();
    for endpoint in &endpoints {
        match trellis_proto::tls::connect(endpoint, tls.clone()).await {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                if endpoints.len() > 1 {
                    eprintln!("trellisctl: cannot connect to {endpoint} ({e}); trying the next endpoint");
                }
                failures.push(format!("{endpoint}: {e:#}"));
            }
        }
    }
    anyhow::bail!("connecting to the control plane: {}", failures.join("; "))
}

fn certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "no PEM certificate");
    Ok(certs)
}

/// Renders rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Seconds since the epoch as RFC 3339 (UTC).
pub fn timestamp(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// A gRPC error as one line: the status code's name and the server's message.
pub fn status_line(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns() {
        let out = super::table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(out, "A     LONGER\nxyz   1\n");
    }
}
