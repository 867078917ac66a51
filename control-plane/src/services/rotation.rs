//! The root CA rotation's driver and its status. The driver runs in the control plane (so a rotation goes on
//! without the CLI, and resumes after a restart from the phase the store holds): it looks at the proxies (ACKed
//! versions, reported certificates) every [`POLL`], asks [`rotation::decide`] whether the phase is complete, and
//! moves the rotation on through the mesh (store first). It also keeps the data dir's `admin.yaml` usable: from
//! the switch on, its credential is re-issued by the new CA, and its CA bundle follows the trust bundle.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_proto::v1 as pb;

use super::Shared;
use crate::authority::{Authority, fingerprint};
use crate::ca::{LocalCert, certs_to_pem};
use crate::mesh::{MeshError, now_unix};
use crate::rotation::{self, Decision, Phase, ProxyView, ReplicaView, RotationRecord};
use crate::settings::{ADMIN_FILE, CliConfig};

/// How often the driver looks at the proxies while a rotation is under way.
const POLL: Duration = Duration::from_millis(100);
/// Lifetime of the admin credential re-issued for the data dir's `admin.yaml` (as `init`'s).
pub const ADMIN_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Drives rotations until shutdown. `hold`: never leave that phase (for tests that interrupt a rotation in a given
/// phase: `trellis-control serve --rotation-hold`).
pub async fn drive(shared: Shared, data_dir: PathBuf, hold: Option<Phase>) {
    let mut admin_refreshed: Option<(u64, bool)> = None;
    // On a shared store the proxies' status is read from it, and is written there once a period: looking more
    // often would only read the same entries again.
    let poll = if shared.mesh.store().leased().is_some() { super::mesh_status::PUBLISH_EVERY } else { POLL };
    loop {
        match step(&shared, &data_dir, &mut admin_refreshed, hold) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "root CA rotation step failed; retrying"),
        }
        tokio::select! {
            () = shared.rotation_wake.notified() => {}
            () = tokio::time::sleep(poll) => {}
            () = shared.shutting_down() => return,
        }
    }
}

/// One look: true when the rotation moved on (look again at once).
fn step(
    shared: &Shared,
    data_dir: &Path,
    admin_refreshed: &mut Option<(u64, bool)>,
    hold: Option<Phase>,
) -> Result<bool, MeshError> {
    let record = shared.mesh.rotation()?;
    if let Some(record) = &record {
        // The store's record may be ahead of this replica's CAs (another replica moved the rotation on, and the
        // watch has not told this one yet): catch up first, so that what follows (the admin.yaml refreshed below,
        // what is decided) is from the CAs of the record's phase, not the phase before.
        shared.mesh.follow_rotation(record)?;
    }
    // Outside a rotation no proxy holds a retiring CA's certificate: the proxies (on a shared store, every
    // replica's, read from it) are looked at only while one is under way.
    let views: Vec<ProxyView> = match &record {
        Some(r) if r.phase != Phase::Done => proxy_views(shared).into_iter().map(|(v, _)| v).collect(),
        _ => Vec::new(),
    };
    record_gauges(record.as_ref().map(|r| r.phase), &views);
    let Some(record) = record else { return Ok(false) };
    if record.phase >= Phase::Switch {
        let done = record.phase == Phase::Done;
        if *admin_refreshed != Some((record.rotation, done)) {
            match refresh_admin_config(&shared.mesh.authority(), data_dir) {
                Ok(()) => *admin_refreshed = Some((record.rotation, done)),
                Err(e) => tracing::warn!(error = %e, "cannot refresh the data dir's admin.yaml"),
            }
        }
    }
    if record.phase == Phase::Done {
        return Ok(false);
    }
    let replicas = replica_views(shared, &record)?;
    match rotation::decide(&record, &views, &replicas, now_unix()) {
        Decision::Advance(_) if hold == Some(record.phase) => Ok(false),
        Decision::Advance(_) if !driving(shared)? => Ok(false),
        Decision::Advance(phase) => {
            // The data dir's admin.yaml was refreshed above (from the switch on) before the retiring root goes.
            shared.mesh.advance_rotation(phase)?;
            Ok(true)
        }
        Decision::Wait(_) => Ok(false),
    }
}

/// Whether this replica drives the rotation: always with one replica; on a shared store, the replica that holds
/// the `rotation-driver` role (taken by the first replica to find a phase complete, kept while its lease lives, so
/// another replica takes over when it dies). Every replica follows the phases; one moves them on.
fn driving(shared: &Shared) -> Result<bool, MeshError> {
    let Some(leased) = shared.mesh.store().leased() else { return Ok(true) };
    let lease = leased.keep_alive()?;
    let replica = shared.proxies.replica();
    let holder = leased.claim(lease, DRIVER_ROLE, replica)?;
    if holder == replica {
        tracing::debug!(replica, "driving the root CA rotation");
        Ok(true)
    } else {
        tracing::debug!(replica, %holder, "another replica drives the root CA rotation");
        Ok(false)
    }
}

/// The role (`store::LeasedStatus::claim`) of the replica that moves a rotation on.
pub const DRIVER_ROLE: &str = "rotation-driver";

/// `trellis_rotation_phase{phase}`: 1 for the current phase (`none` without a rotation ever), 0 for the others;
/// `trellis_rotation_proxies_holding_old_ca`: proxies (connected or not) whose last report names a certificate of
/// the retiring CA, 0 outside a rotation.
fn record_gauges(phase: Option<Phase>, views: &[ProxyView]) {
    let current = phase.map_or("none", Phase::as_str);
    for name in ["none"].into_iter().chain(Phase::ALL.iter().map(|p| p.as_str())) {
        metrics::gauge!("trellis_rotation_phase", "phase" => name).set(if name == current { 1.0 } else { 0.0 });
    }
    let holding_old = views.iter().filter(|v| v.old_certificates > 0).count();
    metrics::gauge!("trellis_rotation_proxies_holding_old_ca").set(holding_old as f64);
}

/// What the rotation sees of every proxy that ever connected, whichever replica holds its stream
/// (`mesh_status.rs`).
fn proxy_views(shared: &Shared) -> Vec<(ProxyView, usize)> {
    let retiring = shared.mesh.authority().retiring();
    super::mesh_status::list(shared)
        .into_iter()
        .map(|p| {
            let view = ProxyView {
                old_certificates: retiring.as_deref().map_or(0, |r| p.signed_by(r)),
                reported: p.reported,
                connected: p.status.connected,
                acked_version: p.status.acked_version,
                node: p.status.node.clone(),
            };
            (view, p.certificates())
        })
        .collect()
}

/// What the rotation sees of every live replica, in the overlap (the only phase that waits on them; empty in the
/// others): whether its serving certificate chains to the root of the CA that signs now (the new one, this replica
/// having followed the record).
fn replica_views(shared: &Shared, record: &RotationRecord) -> Result<Vec<ReplicaView>, MeshError> {
    if record.phase != Phase::Overlap {
        return Ok(Vec::new());
    }
    let new_root = fingerprint(shared.mesh.authority().signer().root());
    Ok(super::mesh_status::serving_roots(shared)?
        .into_iter()
        .map(|(replica, root)| ReplicaView { serves_new_root: root == new_root, replica })
        .collect())
}

/// Re-issues the data dir's admin credential (a new key) with the signing CA, and sets its CA bundle to the trust
/// bundle, unless both are current already; written atomically, 0600.
fn refresh_admin_config(authority: &Authority, data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(ADMIN_FILE);
    let mut config = CliConfig::load(&path)?;
    let certs = crate::ca::parse_pem_certs(&config.certificate)?;
    let signer = authority.signer();
    let bundle = crate::ca::parse_pem_certs(&config.ca_bundle)?;
    if bundle == authority.roots() && issued_by(&certs[0], &signer.chain()[0]) {
        return Ok(());
    }
    let name = admin_name(&certs[0]).ok_or_else(|| anyhow::anyhow!("{}: no admin identity", path.display()))?;
    let (issued, key) = signer.issue_local(LocalCert::Admin(&name), ADMIN_VALIDITY)?;
    config.certificate = certs_to_pem(&issued.chain[..issued.chain.len() - 1]);
    config.key = key;
    config.ca_bundle = certs_to_pem(authority.roots());
    let tmp = path.with_extension("yaml.tmp");
    let _ = std::fs::remove_file(&tmp);
    crate::files::write_new(&tmp, serde_yaml_ng::to_string(&config)?.as_bytes(), 0o600)?;
    std::fs::rename(&tmp, &path)?;
    tracing::info!(path = %path.display(), "admin.yaml refreshed for the root CA rotation");
    Ok(())
}

/// Whether `cert` was issued by `ca`'s key (its authority key identifier is `ca`'s subject key identifier): the
/// admin credential is current. Names are not enough: a renewed operator CA may keep its name.
fn issued_by(cert: &[u8], ca: &[u8]) -> bool {
    use x509_parser::extensions::ParsedExtension;
    let (Ok((_, cert)), Ok((_, ca))) =
        (x509_parser::parse_x509_certificate(cert), x509_parser::parse_x509_certificate(ca))
    else {
        return false;
    };
    let aki = cert.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0.to_vec()),
        _ => None,
    });
    let ski = ca.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
        _ => None,
    });
    aki.is_some() && aki == ski
}

fn admin_name(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            match trellis_proto::spiffe::SpiffeId::parse(uri).ok()?.subject() {
                trellis_proto::spiffe::Subject::Admin(name) => Some(name.to_owned()),
                _ => None,
            }
        }
        _ => None,
    })
}

/// `trellisctl ca status`: roots, phase, and per proxy how many certificates of the retiring CA it holds.
pub fn status(shared: &Shared) -> Result<pb::CaStatusResponse, MeshError> {
    let record = shared.mesh.rotation()?;
    if let Some(r) = &record
        && let Err(e) = shared.mesh.follow_rotation(r)
    {
        // Shown as this replica has it; the driver tries again.
        tracing::warn!(error = %e, "cannot follow the root CA rotation");
    }
    let authority = shared.mesh.authority();
    let signing_root = authority.signer().root().clone();
    let retiring_root = authority.retiring_root().cloned().filter(|r| *r != signing_root);
    let mut roots: Vec<pb::CaRoot> = authority.roots().iter().map(|der| ca_root(der, &signing_root, None)).collect();
    if let Some(old) = retiring_root.as_ref().filter(|r| !authority.roots().contains(r)) {
        // Retire: no longer in the bundle, still shown as what is being retired.
        roots.push(ca_root(old, &signing_root, Some(true)));
    }
    for root in &mut roots {
        root.retiring |= retiring_root.as_ref().is_some_and(|r| fingerprint(r) == root.sha256);
    }
    let (views, certificates): (Vec<ProxyView>, Vec<usize>) = proxy_views(shared).into_iter().unzip();
    let proxies = views
        .iter()
        .zip(certificates)
        .map(|(v, certificates)| pb::ProxyCaHolding {
            node: v.node.clone(),
            connected: v.connected,
            reported: v.reported,
            certificates: certificates as u32,
            old_certificates: v.old_certificates as u32,
            acked_version: v.acked_version,
        })
        .collect();
    let (phase, waiting_for) = match &record {
        None => ("none".to_owned(), String::new()),
        Some(r) => (r.phase.as_str().to_owned(), waiting(r, &views, &replica_views(shared, r).unwrap_or_default())),
    };
    Ok(pb::CaStatusResponse {
        phase,
        rotation: record.as_ref().map_or(0, |r| r.rotation),
        roots,
        waiting_for,
        retire_at_unix: record.as_ref().and_then(|r| r.retire_at).unwrap_or(0),
        proxies,
        history: record
            .map(|r| {
                r.history
                    .into_iter()
                    .map(|(phase, at)| pb::RotationEvent { phase: phase.as_str().into(), at_unix: at })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn waiting(record: &RotationRecord, views: &[ProxyView], replicas: &[ReplicaView]) -> String {
    match rotation::decide(record, views, replicas, now_unix()) {
        Decision::Wait(what) if record.phase != Phase::Done => what,
        Decision::Wait(_) => String::new(),
        Decision::Advance(next) => format!("nothing: moving on to {}", next.as_str()),
    }
}

fn ca_root(der: &[u8], signing_root: &[u8], retiring: Option<bool>) -> pb::CaRoot {
    let (subject, not_after) = x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| (c.subject().to_string(), c.validity().not_after.timestamp()))
        .unwrap_or_default();
    pb::CaRoot {
        subject,
        sha256: fingerprint(der),
        spki_sha256: trellis_proto::tls::ca_pin(der).unwrap_or_default(),
        not_after_unix: not_after,
        signing: der == signing_root,
        retiring: retiring.unwrap_or(false),
    }
}
