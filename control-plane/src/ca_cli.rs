//! `trellisctl ca`: rotate the root CA (start or resume a rotation, then follow it to the end, reconnecting through
//! control-plane restarts), show its status, renew this config's admin credential.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use trellis_proto::v1 as pb;
use trellis_proto::v1::admin_client::AdminClient;

use crate::cli::{self, status_line, table, timestamp};
use crate::settings::CliConfig;

/// How often `ca rotate` looks at the rotation.
const POLL: Duration = Duration::from_millis(200);
/// How long `ca rotate` keeps trying to reach a control plane that went away (a restart) before giving up.
const UNREACHABLE_FOR: Duration = Duration::from_secs(300);

pub struct RotateArgs {
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub ca_chain: Option<PathBuf>,
    pub overlap: Option<Duration>,
    pub force: bool,
    /// Return once the rotation started (or resumed), without following it.
    pub detach: bool,
    pub json: bool,
}

type Admin = AdminClient<tonic::transport::Channel>;

async fn connect(config_path: &Path) -> anyhow::Result<Admin> {
    let config = CliConfig::load(config_path)?;
    Ok(AdminClient::new(cli::connect(&config).await?))
}

pub async fn rotate(config_path: &Path, args: RotateArgs) -> anyhow::Result<()> {
    let read = |p: &Option<PathBuf>| -> anyhow::Result<String> {
        p.as_ref()
            .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let request = pb::RotateCaRequest {
        ca_cert_pem: read(&args.ca_cert)?,
        ca_key_pem: read(&args.ca_key)?,
        ca_chain_pem: read(&args.ca_chain)?,
        overlap_seconds: args.overlap.map(|d| d.as_secs()),
        force: args.force,
    };
    let started = Instant::now();
    let mut admin = connect(config_path).await?;
    let status = admin.rotate_ca(request).await.map_err(|s| anyhow::anyhow!(status_line(&s)))?.into_inner();
    let rotation = status.rotation;
    let mut last_phase = String::new();
    report(&status, &mut last_phase, args.json, started);
    if args.detach {
        return Ok(());
    }
    let mut renewed_for: Option<&str> = None;
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let status = match admin.ca_status(pb::CaStatusRequest {}).await {
            Ok(status) => {
                unreachable_since = None;
                status.into_inner()
            }
            Err(e) => {
                // The control plane may be restarting: the rotation resumes there; reconnect (with the config
                // as it is now: the control plane refreshes its data dir's admin.yaml) and follow it again.
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                anyhow::ensure!(
                    since.elapsed() < UNREACHABLE_FOR,
                    "control plane unreachable for {UNREACHABLE_FOR:?}: {}",
                    status_line(&e)
                );
                eprintln!("control plane unreachable ({}); retrying", status_line(&e));
                tokio::time::sleep(POLL).await;
                if let Ok(fresh) = connect(config_path).await {
                    admin = fresh;
                }
                continue;
            }
        };
        anyhow::ensure!(status.rotation == rotation, "another rotation ({}) replaced this one", status.rotation);
        // From the switch on, this config's credential is renewed under the new CA (before the retiring root goes),
        // and once done its CA bundle loses the retiring root.
        let due = match status.phase.as_str() {
            "prepare" => None,
            "done" => Some("done"),
            _ => Some("switch"),
        };
        if let Some(due) = due
            && renewed_for != Some(due)
        {
            match renew_credential(&mut admin, config_path).await {
                Ok(()) => renewed_for = Some(due),
                Err(e) => eprintln!("cannot renew the admin credential of {}: {e:#}", config_path.display()),
            }
        }
        report(&status, &mut last_phase, args.json, started);
        if status.phase == "done" {
            let seconds = started.elapsed().as_secs_f64();
            if args.json {
                println!("{}", json!({"event": "done", "rotation": rotation, "seconds": seconds}));
            } else {
                println!("rotation {rotation} done in {seconds:.1}s");
            }
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Prints the phase when it changes (one JSON line per change with `--output json`).
fn report(status: &pb::CaStatusResponse, last_phase: &mut String, json: bool, started: Instant) {
    if status.phase == *last_phase {
        return;
    }
    *last_phase = status.phase.clone();
    if json {
        println!(
            "{}",
            json!({"event": "phase", "rotation": status.rotation, "phase": status.phase,
                "waitingFor": status.waiting_for, "at": timestamp(crate::mesh::now_unix()),
                "elapsedSeconds": started.elapsed().as_secs_f64()})
        );
    } else if status.waiting_for.is_empty() {
        println!("rotation {}: {}", status.rotation, status.phase);
    } else {
        println!("rotation {}: {} (waiting for {})", status.rotation, status.phase, status.waiting_for);
    }
}

/// A new key and an admin certificate for it from the signing CA; the config file is replaced atomically (0600).
pub async fn renew_credential(admin: &mut Admin, config_path: &Path) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let response = admin
        .renew_admin_credential(pb::RenewAdminCredentialRequest { csr_der: csr.der().to_vec() })
        .await
        .map_err(|s| anyhow::anyhow!(status_line(&s)))?
        .into_inner();
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
        response.certificate_chain.into_iter().map(Into::into).collect();
    anyhow::ensure!(chain.len() >= 2, "the control plane sent no chain");
    let roots: Vec<rustls_pki_types::CertificateDer<'static>> =
        response.trust_bundle.map(|b| b.roots.into_iter().map(Into::into).collect()).unwrap_or_default();
    anyhow::ensure!(!roots.is_empty(), "the control plane sent no trust bundle");
    let mut config = CliConfig::load(config_path)?;
    config.certificate = crate::ca::certs_to_pem(&chain[..chain.len() - 1]);
    config.key = key.serialize_pem();
    config.ca_bundle = crate::ca::certs_to_pem(&roots);
    let tmp = config_path.with_extension("renew.tmp");
    let _ = std::fs::remove_file(&tmp);
    crate::files::write_new(&tmp, serde_yaml_ng::to_string(&config)?.as_bytes(), 0o600)?;
    std::fs::rename(&tmp, config_path).with_context(|| format!("replacing {}", config_path.display()))?;
    Ok(())
}

pub async fn renew(config_path: &Path) -> anyhow::Result<()> {
    let mut admin = connect(config_path).await?;
    renew_credential(&mut admin, config_path).await?;
    println!("admin credential in {} renewed", config_path.display());
    Ok(())
}

pub async fn status(config_path: &Path, json_output: bool) -> anyhow::Result<()> {
    let mut admin = connect(config_path).await?;
    let s = admin.ca_status(pb::CaStatusRequest {}).await.map_err(|s| anyhow::anyhow!(status_line(&s)))?.into_inner();
    if json_output {
        let roots: Vec<_> = s
            .roots
            .iter()
            .map(|r| {
                json!({"subject": r.subject, "sha256": r.sha256, "caPin": r.spki_sha256,
                "notAfter": timestamp(r.not_after_unix), "signing": r.signing, "retiring": r.retiring})
            })
            .collect();
        let proxies: Vec<_> = s
            .proxies
            .iter()
            .map(|p| {
                json!({"node": p.node, "connected": p.connected, "reported": p.reported,
                "certificates": p.certificates, "oldCertificates": p.old_certificates, "ackedVersion": p.acked_version})
            })
            .collect();
        let history: Vec<_> = s
            .history
            .iter()
            .map(|e| json!({"phase": e.phase, "at": timestamp(e.at_unix), "atUnix": e.at_unix}))
            .collect();
        let out = json!({"rotation": s.rotation, "phase": s.phase, "waitingFor": s.waiting_for,
            "retireAt": (s.retire_at_unix > 0).then(|| timestamp(s.retire_at_unix)),
            "roots": roots, "proxies": proxies, "history": history});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("rotation: {} (phase {})", s.rotation, s.phase);
    if !s.waiting_for.is_empty() {
        println!("waiting for: {}", s.waiting_for);
    }
    if s.retire_at_unix > 0 {
        println!("retiring root leaves the bundle at: {}", timestamp(s.retire_at_unix));
    }
    let rows: Vec<Vec<String>> = s
        .roots
        .iter()
        .map(|r| {
            let role = match (r.signing, r.retiring) {
                (true, _) => "signing",
                (_, true) => "retiring",
                _ => "trusted",
            };
            vec![r.subject.clone(), role.into(), r.spki_sha256.clone(), timestamp(r.not_after_unix)]
        })
        .collect();
    print!("{}", table(&["ROOT", "ROLE", "CA PIN", "NOT AFTER"], &rows));
    let rows: Vec<Vec<String>> = s
        .proxies
        .iter()
        .map(|p| {
            vec![
                p.node.clone(),
                if p.connected { "connected" } else { "disconnected" }.into(),
                if p.reported { p.certificates.to_string() } else { "-".into() },
                p.old_certificates.to_string(),
                p.acked_version.to_string(),
            ]
        })
        .collect();
    print!("{}", table(&["NODE", "STATE", "CERTIFICATES", "OF RETIRING CA", "ACKED"], &rows));
    Ok(())
}
