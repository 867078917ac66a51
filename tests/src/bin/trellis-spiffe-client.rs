//! `trellis-spiffe-client fetch OUT_DIR | watch N | bundles`: a SPIFFE Workload API client built on the `spiffe`
//! crate (the library Rust applications use, written by others), for tests/tests/workload_api.rs. Finds the socket
//! through `SPIFFE_ENDPOINT_SOCKET`, as the SPIFFE spec says.
//!   fetch OUT_DIR  one X.509 context: prints {"spiffe_id", "serial"}, writes svid.pem, svid_key.der, bundle.pem
//!   watch N        the FetchX509SVID stream: one line {"spiffe_id", "serial", "not_after"} per SVID received, N times
//!   bundles        FetchX509Bundles once: {"trust_domains": [...]}
//!   jwt AUD OUT_DIR  FetchJWTSVID for audience AUD: prints {"spiffe_id", "token"}; FetchJWTBundles: writes
//!                  OUT_DIR/jwt_bundle.json as {"trust_domain", "keys": [{"kid", "jwk"}]}
//!   validate TOKEN AUD  ValidateJWTSVID: prints {"spiffe_id"}
//! A refusal exits with status 2 and the error on stderr.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use spiffe::WorkloadApiClient;
use tokio_stream::StreamExt;

fn pem(label: &str, ders: &[&[u8]]) -> String {
    ders.iter()
        .map(|der| {
            pem::encode_config(
                &pem::Pem::new(label, *der),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        })
        .collect()
}

fn leaf_facts(der: &[u8]) -> anyhow::Result<(String, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).context("leaf")?;
    Ok((cert.raw_serial_as_string().replace(':', ""), cert.validity().not_after.timestamp()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let client = WorkloadApiClient::connect_env().await.context("connect")?;
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["fetch", dir] => {
            let context = client.fetch_x509_context().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let svid = context.default_svid().context("no SVID in the answer")?;
            let dir = PathBuf::from(dir);
            let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
            std::fs::write(dir.join("svid.pem"), pem("CERTIFICATE", &chain))?;
            std::fs::write(dir.join("svid_key.der"), svid.private_key().as_bytes())?;
            let td = svid.spiffe_id().trust_domain();
            let bundle = context.bundle_set().get(td).context("no bundle for the SVID's trust domain")?;
            let roots: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_bytes()).collect();
            std::fs::write(dir.join("bundle.pem"), pem("CERTIFICATE", &roots))?;
            let (serial, _) = leaf_facts(svid.leaf().as_bytes())?;
            println!("{}", serde_json::json!({"spiffe_id": svid.spiffe_id().to_string(), "serial": serial}));
        }
        ["watch", n] => {
            let n: usize = n.parse()?;
            let mut stream = client.stream_x509_svids().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            for _ in 0..n {
                let svid = stream.next().await.context("stream ended")?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let (serial, not_after) = leaf_facts(svid.leaf().as_bytes())?;
                let line = serde_json::json!({"spiffe_id": svid.spiffe_id().to_string(), "serial": serial, "not_after": not_after});
                println!("{line}");
            }
        }
        ["bundles"] => {
            let set = client.fetch_x509_bundles().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let tds: Vec<String> = set.iter().map(|(td, _)| td.to_string()).collect();
            println!("{}", serde_json::json!({"trust_domains": tds}));
        }
        ["jwt", audience, dir] => {
            let svid = client.fetch_jwt_svid([audience], None).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let bundles = client.fetch_jwt_bundles().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let td = svid.spiffe_id().trust_domain();
            let bundle = bundles.get(td).context("no JWT bundle for the SVID's trust domain")?;
            let keys: Vec<serde_json::Value> = bundle
                .jwt_authorities()
                .map(|a| {
                    let jwk: serde_json::Value = serde_json::from_slice(a.jwk_json())?;
                    Ok(serde_json::json!({"kid": a.key_id(), "jwk": jwk}))
                })
                .collect::<anyhow::Result<_>>()?;
            let file = serde_json::json!({"trust_domain": td.to_string(), "keys": keys});
            std::fs::write(PathBuf::from(dir).join("jwt_bundle.json"), file.to_string())?;
            println!("{}", serde_json::json!({"spiffe_id": svid.spiffe_id().to_string(), "token": svid.token()}));
        }
        ["validate", token, audience] => {
            let svid = client.validate_jwt_token(audience, token).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            println!("{}", serde_json::json!({"spiffe_id": svid.spiffe_id().to_string()}));
        }
        _ => anyhow::bail!(
            "usage: trellis-spiffe-client fetch OUT_DIR | watch N | bundles | jwt AUD OUT_DIR | validate TOKEN AUD"
        ),
    }
    Ok(())
}
