//! `trellis-bench rotation --proxies N [--workloads M] [--overlap D]`: one root CA rotation (`Admin.RotateCa`, what
//! `trellisctl ca rotate` sends) with N simulated proxies in this process (scenario 5's: each its own join, node
//! credential, TLS connection and discovery stream, applying every update with the proxy's own `state::apply`
//! before ACKing it). Like a real proxy, each reports the certificates it holds (`CertificatesHeld`) when its stream
//! opens and after each install, answers `RenewNow` with a CSR for a new key (node credential, and the workload SVID
//! of the first M), installs the answer and reports again. The run polls `Admin.CaStatus` every 50 ms and prints when
//! each phase began, how long each proxy took to hold only certificates of the new CA, and what failed (streams,
//! NACKs, refused renewals): the rotation figure of RELIABILITY.md. Prints, asserts nothing about time.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc};
use trellis_data_plane::identity::certs::CertInfo;
use trellis_data_plane::state::State;
use trellis_proto::v1 as pb;
use trellis_proto::v1::discovery_request::Message as Up;
use trellis_proto::v1::discovery_response::Message as Down;
use trellis_tests::ControlPlane;
use trellis_tests::client::{self, Joined};

use super::control::{self, NAMESPACE, TRUST_DOMAIN, apply_and_answer, node_name};

const USAGE: &str = "usage: trellis-bench rotation [--proxies N] [--workloads M] [--overlap D]";
/// How long the whole rotation may take before the run gives up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

struct Args {
    proxies: usize,
    workloads: usize,
    overlap: Duration,
}

fn parse_args(argv: &[String]) -> anyhow::Result<Args> {
    let mut args = Args { proxies: 1000, workloads: 100, overlap: Duration::from_secs(3) };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--proxies" => args.proxies = value()?.parse().context("--proxies")?,
            "--workloads" => args.workloads = value()?.parse().context("--workloads")?,
            "--overlap" => {
                let v = value()?;
                args.overlap = super::soak::parse_duration(v)
                    .with_context(|| format!("--overlap {v:?}: a number with s, m or h"))?;
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !(1..=5000).contains(&args.proxies) {
        bail!("--proxies must be 1..=5000");
    }
    if args.workloads > args.proxies {
        bail!("--workloads ({}) must not exceed --proxies ({})", args.workloads, args.proxies);
    }
    Ok(args)
}

pub fn main(argv: &[String]) -> ExitCode {
    let args = match parse_args(argv) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("trellis-bench rotation: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-bench rotation: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("\ntrellis-bench rotation: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Counts shared by the simulated proxies.
#[derive(Default)]
struct Counters {
    updates_acked: AtomicU64,
    nacked: AtomicU64,
    renew_now: AtomicU64,
    node_renewed: AtomicU64,
    workload_renewed: AtomicU64,
    refused: AtomicU64,
    streams_failed: AtomicU64,
}

/// A certificate a simulated proxy holds: its key (kept, as a proxy keeps it) and chain.
struct Held {
    spiffe_id: String,
    _key: KeyPair,
    chain: Vec<CertificateDer<'static>>,
}

impl Held {
    fn report(&self) -> anyhow::Result<pb::HeldCertificate> {
        let leaf = CertInfo::parse(&self.chain[0])?;
        let issuer = CertInfo::parse(self.chain.get(1).context("a chain without its CA")?)?;
        Ok(pb::HeldCertificate {
            spiffe_id: self.spiffe_id.clone(),
            serial: leaf.serial,
            issuer_sha256: issuer.sha256,
            not_after_unix: leaf.not_after.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
        })
    }
}

async fn run(args: &Args) -> anyhow::Result<bool> {
    let cp = ControlPlane::start(&[]);
    let started = Instant::now();
    let mut admin = control::admin(&cp).await?;
    let addr = cp.addr.to_string();
    let gate = Arc::new(Semaphore::new(32));
    let joined = control::join_all(&mut admin, std::slice::from_ref(&addr), args.proxies, &gate).await?;
    eprintln!("  opening {} discovery streams", args.proxies);
    let counters = Arc::new(Counters::default());
    // (proxy, when it last installed a certificate of the new CA): sent after each renewal it installs.
    let (renewed_tx, mut renewed_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut up = tokio::task::JoinSet::new();
    // The simulated proxies' tasks: aborted before the control plane stops (at the end of this function), so that
    // its going away is not reported as their failure.
    let sims = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
    for (i, joined) in joined.into_iter().enumerate() {
        let (gate, counters, renewed, sims) = (gate.clone(), counters.clone(), renewed_tx.clone(), sims.clone());
        let with_workload = i < args.workloads;
        up.spawn(async move {
            let sim = {
                let _permit = gate.acquire().await?;
                Sim::connect(i, joined, with_workload).await?
            };
            sims.lock().expect("sims lock").spawn(sim.run(counters, renewed));
            anyhow::Ok(())
        });
    }
    while let Some(done) = up.join_next().await {
        done??;
    }
    drop(renewed_tx);
    eprintln!("  {} proxies connected and reported in {:.1}s", args.proxies, started.elapsed().as_secs_f64());

    let request = pb::RotateCaRequest { overlap_seconds: Some(args.overlap.as_secs()), ..Default::default() };
    let rotate_at = Instant::now();
    let rotation = admin.rotate_ca(request).await.map_err(|s| anyhow!("RotateCa: {s}"))?.into_inner().rotation;
    let mut phases: Vec<(String, Duration)> = Vec::new();
    let mut oldest_left: Vec<(usize, Duration)> = Vec::new();
    let mut renewed_at: Vec<Option<Duration>> = vec![None; args.proxies];
    let done_at = loop {
        while let Ok((i, at)) = renewed_rx.try_recv() {
            renewed_at[i] = Some(at.saturating_duration_since(rotate_at));
        }
        let status = match admin.ca_status(pb::CaStatusRequest {}).await {
            Ok(status) => status.into_inner(),
            // After the retirement the credential of the admin.yaml read at start (old CA) is refused: read it
            // again (the control plane refreshes it).
            Err(status) => {
                eprintln!("  CaStatus: {status}; reconnecting with the data dir's admin.yaml");
                admin = control::admin(&cp).await?;
                continue;
            }
        };
        if status.rotation != rotation {
            bail!("rotation {} replaced rotation {rotation}", status.rotation);
        }
        let now = rotate_at.elapsed();
        if phases.last().is_none_or(|(p, _)| *p != status.phase) {
            let waiting: String = status.waiting_for.chars().take(100).collect();
            eprintln!("  {:>7.2}s {} (waiting for {waiting}…)", now.as_secs_f64(), status.phase);
            phases.push((status.phase.clone(), now));
        }
        let holding_old = status.proxies.iter().filter(|p| p.old_certificates > 0 || !p.reported).count();
        if oldest_left.last().is_none_or(|(n, _)| *n != holding_old) {
            oldest_left.push((holding_old, now));
        }
        if status.phase == "done" {
            break now;
        }
        if now > GIVE_UP_AFTER {
            bail!(
                "the rotation is not done after {GIVE_UP_AFTER:?}: phase {}, waiting for {}",
                status.phase,
                status.waiting_for
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The last renewals' notes may still be queued.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok((i, at)) = renewed_rx.try_recv() {
        renewed_at[i] = Some(at.saturating_duration_since(rotate_at));
    }

    sims.lock().expect("sims lock").abort_all();
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut renewal_ms: Vec<f64> =
        renewed_at.iter().map(|t| t.map_or(f64::INFINITY, |t| t.as_secs_f64() * 1e3)).collect();
    renewal_ms.sort_by(f64::total_cmp);
    let q = |p: f64| renewal_ms[((p / 100.0 * renewal_ms.len() as f64).ceil() as usize).clamp(1, renewal_ms.len()) - 1];
    let phase_at = |name: &str| {
        phases
            .iter()
            .find(|(p, _)| p == name)
            .map_or("not seen (shorter than a 50 ms poll)".to_owned(), |(_, t)| format!("{:.2} s", t.as_secs_f64()))
    };
    let failed = count(&counters.streams_failed) + count(&counters.nacked) + count(&counters.refused);
    println!("## Root CA rotation with {} simulated proxies\n", args.proxies);
    println!("| what | figure |\n| --- | --- |");
    println!("| proxies (of which holding a workload SVID too) | {} ({}) |", args.proxies, args.workloads);
    println!("| `--overlap` | {} s |", args.overlap.as_secs());
    for phase in ["switch", "overlap", "retire", "done"] {
        println!("| {phase} began | {} |", phase_at(phase));
    }
    println!("| whole rotation (RotateCa to `done` seen) | {:.2} s |", done_at.as_secs_f64());
    let began = |name: &str| phases.iter().find(|(p, _)| p == name).map(|(_, t)| *t);
    if let (Some(overlap), Some(retire)) = (began("overlap"), began("retire")) {
        println!("| prepare and switch (RotateCa to the overlap) | {:.2} s |", overlap.as_secs_f64());
        println!("| retire (its start to `done`) | {:.2} s |", done_at.saturating_sub(retire).as_secs_f64());
        println!(
            "| whole rotation without the overlap's wait | {:.2} s |",
            (done_at.saturating_sub(retire) + overlap).as_secs_f64()
        );
    }
    println!(
        "| per proxy, RotateCa to its last new-CA certificate installed: p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
        q(50.0),
        q(99.0),
        q(100.0)
    );
    println!(
        "| RenewNow received; node credentials renewed; workload SVIDs renewed | {}; {}; {} |",
        count(&counters.renew_now),
        count(&counters.node_renewed),
        count(&counters.workload_renewed)
    );
    println!("| config updates applied and ACKed | {} |", count(&counters.updates_acked));
    println!(
        "| failed: discovery streams; NACKs; refused renewals | {}; {}; {} |",
        count(&counters.streams_failed),
        count(&counters.nacked),
        count(&counters.refused)
    );
    let progress: Vec<String> = oldest_left.iter().map(|(n, t)| format!("{n} at {:.2} s", t.as_secs_f64())).collect();
    println!("\nproxies still holding a certificate of the old CA: {}", progress.join(", "));
    Ok(failed == 0 && renewal_ms.iter().all(|t| t.is_finite()))
}

/// One simulated proxy.
struct Sim {
    i: usize,
    stream: client::Stream,
    state: State,
    node: Held,
    workload: Option<Held>,
    /// Keys of the CSRs in flight, by request ID (node credential requests and workload CSRs share the counter).
    pending: Vec<(u64, KeyPair)>,
    next_request: u64,
}

impl Sim {
    /// Opens the stream, applies and ACKs the first snapshot, gets its workload SVID (if it has a workload), and
    /// reports what it holds.
    async fn connect(i: usize, joined: Joined, with_workload: bool) -> anyhow::Result<Self> {
        let workloads = if with_workload {
            let address = format!("10.200.{}.{}", 1 + i / 250, 1 + i % 250);
            vec![client::workload(&node_name(i), NAMESPACE, &node_name(i), &address)]
        } else {
            vec![]
        };
        let mut stream = joined.discover(client::hello(workloads)).await?.map_err(|s| anyhow!("discovery: {s}"))?;
        let mut state = State::new(TRUST_DOMAIN);
        match stream.next().await? {
            Down::Update(u) => {
                let (ack, applied) = apply_and_answer(&mut state, &u);
                stream.send(Up::Ack(ack)).await;
                applied.map_err(|e| anyhow!("{}: the first snapshot: {e}", node_name(i)))?;
            }
            other => bail!("expected a snapshot first, got {other:?}"),
        }
        let Joined { key, chain, .. } = joined;
        let node_id = CertInfo::parse(&chain[0])?.uri_sans.first().cloned().context("node credential URI")?;
        let node = Held { spiffe_id: node_id, _key: key, chain };
        let workload = if with_workload {
            let id = format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}", node_name(i));
            let (key, csr) = client::csr(&[&id]);
            let answer = stream.certify(1, csr).await;
            if !answer.error.is_empty() {
                bail!("{}: workload CSR refused: {}", node_name(i), answer.error);
            }
            Some(Held {
                spiffe_id: id,
                _key: key,
                chain: answer.certificate_chain.into_iter().map(Into::into).collect(),
            })
        } else {
            None
        };
        let sim = Self { i, stream, state, node, workload, pending: Vec::new(), next_request: 2 };
        sim.report().await?;
        Ok(sim)
    }

    async fn report(&self) -> anyhow::Result<()> {
        let mut certificates = vec![self.node.report()?];
        if let Some(w) = &self.workload {
            certificates.push(w.report()?);
        }
        self.stream.send(Up::Held(pb::CertificatesHeld { certificates })).await;
        Ok(())
    }

    async fn run(mut self, counters: Arc<Counters>, renewed: mpsc::UnboundedSender<(usize, Instant)>) {
        let name = node_name(self.i);
        if let Err(e) = self.serve(&counters, &renewed).await {
            eprintln!("simulated proxy {name}: {e:#}");
            counters.streams_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn serve(
        &mut self,
        counters: &Counters,
        renewed: &mpsc::UnboundedSender<(usize, Instant)>,
    ) -> anyhow::Result<()> {
        loop {
            let message = self.stream.rx.message().await?.and_then(|m| m.message).context("stream ended")?;
            match message {
                Down::Update(u) => {
                    let (ack, applied) = apply_and_answer(&mut self.state, &u);
                    self.stream.send(Up::Ack(ack)).await;
                    if let Err(e) = applied {
                        counters.nacked.fetch_add(1, Ordering::Relaxed);
                        bail!(e);
                    }
                    counters.updates_acked.fetch_add(1, Ordering::Relaxed);
                }
                Down::Renew(renew) => {
                    counters.renew_now.fetch_add(1, Ordering::Relaxed);
                    let all = renew.spiffe_ids.is_empty();
                    if all || renew.spiffe_ids.contains(&self.node.spiffe_id) {
                        let (key, csr_der) = client::csr(&[]);
                        let request_id = self.request_id(key);
                        self.stream
                            .send(Up::NodeCredentialRequest(pb::NodeCredentialRequest { request_id, csr_der }))
                            .await;
                    }
                    let workload_id = self.workload.as_ref().map(|w| w.spiffe_id.clone());
                    if let Some(id) = workload_id.filter(|id| all || renew.spiffe_ids.contains(id)) {
                        let (key, csr_der) = client::csr(&[&id]);
                        let request_id = self.request_id(key);
                        self.stream.send(Up::CertificateRequest(pb::CertificateRequest { request_id, csr_der })).await;
                    }
                }
                Down::NodeCredential(answer) => {
                    let key = self.take_pending(answer.request_id)?;
                    if !answer.error.is_empty() || answer.certificate_chain.is_empty() {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        bail!("node credential renewal refused: {}", answer.error);
                    }
                    self.node.chain = answer.certificate_chain.into_iter().map(Into::into).collect();
                    self.node._key = key;
                    counters.node_renewed.fetch_add(1, Ordering::Relaxed);
                    self.report().await?;
                    let _ = renewed.send((self.i, Instant::now()));
                }
                Down::Certificate(answer) => {
                    let key = self.take_pending(answer.request_id)?;
                    if !answer.error.is_empty() || answer.certificate_chain.is_empty() {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        bail!("workload CSR refused: {}", answer.error);
                    }
                    let workload = self.workload.as_mut().context("a certificate for a proxy without workload")?;
                    workload.chain = answer.certificate_chain.into_iter().map(Into::into).collect();
                    workload._key = key;
                    counters.workload_renewed.fetch_add(1, Ordering::Relaxed);
                    self.report().await?;
                    let _ = renewed.send((self.i, Instant::now()));
                }
            }
        }
    }

    fn request_id(&mut self, key: KeyPair) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        self.pending.push((id, key));
        id
    }

    fn take_pending(&mut self, request_id: u64) -> anyhow::Result<KeyPair> {
        let at = self.pending.iter().position(|(id, _)| *id == request_id);
        let at = at.with_context(|| format!("an answer to request {request_id}, which is not pending"))?;
        Ok(self.pending.swap_remove(at).1)
    }
}
