//! Scenario 5, the control plane: N simulated proxies in this process, each with its own join token (admin API),
//! its own join (fresh P-256 key, node certificate), and its own discovery stream over its own TLS connection,
//! applying every update as a real proxy does (the proxy's own `state::apply`: every resource parsed, the policy set
//! compiled) before ACKing it. Then rounds of `trellisctl apply` of a mesh-wide policy, timing each proxy's ACK of
//! the update that carries it (a round converges only if every proxy ACKed); then workload-certificate signings per
//! second with some of them asking at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Semaphore, mpsc, watch};
use trellis_data_plane::state::{self, State};
use trellis_proto::tls;
use trellis_proto::v1 as pb;
use trellis_proto::v1::discovery_request::Message as Up;
use trellis_proto::v1::discovery_response::Message as Down;
use trellis_tests::ControlPlane;
use trellis_tests::client::{self, Joined};

/// Sizes of one run.
pub struct Plan {
    pub proxies: usize,
    pub csr_clients: usize,
    pub rounds: usize,
    pub sign_for: Duration,
    /// 0: one control plane on redb; N: N replicas on a 3-member etcd cluster, proxies spread over them.
    pub replicas: usize,
    /// The simulated proxies ACK each update without applying it (`--ack-only`): a diagnostic, to measure how much
    /// of the convergence time is the simulator's own work on the shared machine.
    pub ack_only: bool,
}

impl Plan {
    /// The suite's full run and `trellis-bench control` without flags: 1,000 proxies on one redb-backed replica.
    pub const DEFAULT: Plan = Plan {
        proxies: 1000,
        csr_clients: 100,
        rounds: 3,
        sign_for: Duration::from_secs(3),
        replicas: 0,
        ack_only: false,
    };
}

/// What it measured.
#[derive(Default)]
pub struct Results {
    pub proxies: usize,
    pub csr_clients: usize,
    /// Tokens, joins and streams up, seconds.
    pub setup_seconds: f64,
    /// Per round: p50, p99, max of the per-proxy ACK times (ms) over every proxy, one that never ACKed counting as
    /// infinitely late; and how many proxies ACKed.
    pub convergence: Vec<([f64; 3], usize)>,
    /// Per round: how long `trellisctl apply` itself ran (ms), part of the ACK times.
    pub apply_ms: Vec<f64>,
    /// The last round's per-proxy ACK times (ms), sorted.
    pub last_round_ms: Vec<f64>,
    /// Per round: signings/s.
    pub signings: Vec<f64>,
    /// Per round: mean encoded bytes of the update carrying the round's policy, per proxy.
    pub bytes_per_proxy: Vec<f64>,
}

pub const NAMESPACE: &str = "bench";
const MARKER: &str = "bench-converge-";
/// The control plane's trust domain (`trellis-control init`'s default), which a proxy's state is bound to.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// What a proxy does with an update: apply it to a copy of its state (`state::apply`, the proxy's own code: every
/// resource parsed by trellis-policy, the policy set compiled), keep the result and ACK, or NACK with the reason.
pub fn apply_and_answer(state: &mut State, update: &pb::ConfigUpdate) -> (pb::Ack, Result<(), String>) {
    match state::apply(state, update) {
        Ok(next) => {
            *state = next;
            (pb::Ack { version: update.version, ..Default::default() }, Ok(()))
        }
        Err(e) => {
            let ack = pb::Ack { version: update.version, error: e.to_string(), reason: e.kind().to_owned() };
            (ack, Err(format!("NACKed version {}: {e}", update.version)))
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdminConfig {
    endpoint: String,
    ca_bundle: String,
    certificate: String,
    key: String,
}

pub async fn admin(cp: &ControlPlane) -> anyhow::Result<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    let text = std::fs::read_to_string(cp.admin_config())?;
    let config: AdminConfig = serde_yaml_ng::from_str(&text).context("admin.yaml")?;
    let certs = |pem: &str| CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>();
    let tls = tls::client_config(
        tls::ServerTrust::Roots(certs(&config.ca_bundle)?),
        Some(tls::ClientIdentity {
            chain: certs(&config.certificate)?,
            key: PrivateKeyDer::from_pem_slice(config.key.as_bytes())?,
        }),
    )?;
    let channel = tls::connect(&config.endpoint, Arc::new(tls)).await?;
    Ok(pb::admin_client::AdminClient::new(channel))
}

/// Shared by the simulated proxies.
struct Signals {
    acked: mpsc::UnboundedSender<Acked>,
    signing: watch::Receiver<bool>,
    signed: AtomicU64,
    failed: AtomicBool,
    /// CPU nanoseconds the simulated proxies spent in `state::apply` (their thread's CPU time, so time the thread was
    /// preempted does not count), every update together.
    applying_ns: AtomicU64,
}

/// A simulated proxy ACKed the update carrying a round's policy.
struct Acked {
    round: usize,
    proxy: usize,
    /// When the update was read off its stream (before applying it).
    received: Instant,
    /// When its ACK went out (after applying it).
    acked: Instant,
    /// Encoded bytes of the update.
    bytes: usize,
}

/// CPU seconds used so far by each process taking part, read from /proc, to tell which one a round's time went to.
struct Cpu {
    at: Instant,
    bench: f64,
    replicas: Vec<f64>,
    etcd: f64,
    /// Children waited for (`trellisctl`): getrusage(RUSAGE_CHILDREN).
    children: f64,
    /// Every CPU of the machine, busy (not idle, not waiting for I/O): includes other users of the machine.
    machine: f64,
}

impl Cpu {
    fn now(replicas: &[u32], etcd: &[u32]) -> Cpu {
        let cpu = |pid: u32| super::procfs::cpu_seconds(pid).unwrap_or(f64::NAN);
        Cpu {
            at: Instant::now(),
            bench: cpu(std::process::id()),
            replicas: replicas.iter().map(|p| cpu(*p)).collect(),
            etcd: etcd.iter().map(|p| cpu(*p)).sum(),
            children: children_cpu_seconds(),
            machine: machine_busy_seconds().unwrap_or(f64::NAN),
        }
    }

    /// What was used from `self` to `later`, as one line.
    fn used_until(&self, later: &Cpu, applying_s: f64) -> String {
        let replicas: Vec<String> =
            self.replicas.iter().zip(&later.replicas).map(|(a, b)| format!("{:.2}", b - a)).collect();
        format!(
            "CPU s over {:.2} s wall: bench {:.2} (of which state::apply {applying_s:.2}), replicas {} (sum {:.2}), etcd {:.2}, \
             trellisctl {:.2}, machine {:.2} of {:.2}",
            later.at.duration_since(self.at).as_secs_f64(),
            later.bench - self.bench,
            replicas.join("/"),
            later.replicas.iter().sum::<f64>() - self.replicas.iter().sum::<f64>(),
            later.etcd - self.etcd,
            later.children - self.children,
            later.machine - self.machine,
            later.at.duration_since(self.at).as_secs_f64()
                * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        )
    }
}

/// CPU seconds (user + system) of this process's children that were waited for.
#[allow(unsafe_code)]
fn children_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data (all zeroes is a valid value); getrusage only writes the struct passed.
    let (usage, status) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let status = libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        (usage, status)
    };
    if status != 0 {
        return f64::NAN;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU nanoseconds the calling thread has used so far.
#[allow(unsafe_code)]
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the struct passed.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Busy CPU seconds of the whole machine so far (/proc/stat: every field but idle and iowait).
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    let busy: u64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(busy as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Proxy status entries the replicas wrote to the store so far, and the puts (buckets) they went in
/// (`trellis_proxy_status_writes_total`, `trellis_proxy_status_puts_total`, summed over the replicas).
fn status_writes(replicas: &[ControlPlane]) -> [f64; 2] {
    let mut sum = [0.0; 2];
    for cp in replicas {
        if let Ok((200, body)) = trellis_tests::http::get(cp.metrics_addr, "/metrics") {
            sum[0] += trellis_tests::prometheus::sum_samples(&body, "trellis_proxy_status_writes_total", &[]);
            sum[1] += trellis_tests::prometheus::sum_samples(&body, "trellis_proxy_status_puts_total", &[]);
        }
    }
    sum
}

/// p50, p99 and max of `ms` (sorted; a missing value counts as infinitely late).
fn quantiles(ms: &[f64]) -> [f64; 3] {
    if ms.is_empty() {
        return [f64::NAN; 3];
    }
    let q = |p: f64| ms[((p / 100.0 * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    [q(50.0), q(99.0), q(100.0)]
}

pub async fn run(plan: &Plan) -> anyhow::Result<Results> {
    // Declared first, dropped last: the replicas stop before their etcd.
    let etcd = (plan.replicas > 0).then(|| trellis_tests::etcd::EtcdCluster::start(3));
    let replicas = match &etcd {
        Some(etcd) => ControlPlane::start_replicas(etcd, plan.replicas, &[]),
        None => vec![ControlPlane::start(&[])],
    };
    let cp = &replicas[0];
    let started = Instant::now();
    let mut admin = admin(cp).await?;
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.to_string()).collect();
    let gate = Arc::new(Semaphore::new(32));
    let joined = join_all(&mut admin, &addrs, plan.proxies, &gate).await?;
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel();
    let (signing_tx, signing_rx) = watch::channel(false);
    let signals = Arc::new(Signals {
        acked: acked_tx,
        signing: signing_rx,
        signed: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        applying_ns: AtomicU64::new(0),
    });
    let replica_pids: Vec<u32> = replicas.iter().filter_map(|r| r.pid()).collect();
    let etcd_pids = etcd.as_ref().map(|e| e.pids()).unwrap_or_default();
    eprintln!("  opening {} discovery streams", plan.proxies);
    // The proxies that will ask for workload certificates declare a workload; they connect first, so that their
    // registrations reach few streams.
    let mut up = tokio::task::JoinSet::new();
    let mut simulated = tokio::task::JoinSet::new();
    for (i, j) in joined.into_iter().enumerate() {
        let (gate, signals) = (gate.clone(), signals.clone());
        let csr_client = i < plan.csr_clients;
        up.spawn(async move {
            let _permit = gate.acquire().await?;
            let workloads = if csr_client {
                let address = format!("10.200.{}.{}", 1 + i / 250, 1 + i % 250);
                vec![client::workload(&node_name(i), NAMESPACE, &node_name(i), &address)]
            } else {
                vec![]
            };
            let mut stream = j.discover(client::hello(workloads)).await?.map_err(|s| anyhow!("discovery: {s}"))?;
            // Up once the first snapshot is applied and ACKed.
            let mut state = State::new(TRUST_DOMAIN);
            match stream.rx.message().await? {
                Some(pb::DiscoveryResponse { message: Some(Down::Update(u)) }) => {
                    let (ack, applied) = apply_and_answer(&mut state, &u);
                    stream.send(Up::Ack(ack)).await;
                    applied.map_err(|e| anyhow!("{}: the first snapshot: {e}", node_name(i)))?;
                }
                other => bail!("expected a snapshot first, got {other:?}"),
            }
            anyhow::Ok((i, stream, state, csr_client))
        });
        if i + 1 == plan.csr_clients || i + 1 == plan.proxies {
            while let Some(done) = up.join_next().await {
                let (i, stream, state, csr_client) = done??;
                let signals = signals.clone();
                simulated.spawn(simulate(i, stream, state, csr_client, plan.ack_only, signals));
            }
        }
    }
    let setup_seconds = started.elapsed().as_secs_f64();
    eprintln!("  {} proxies connected in {setup_seconds:.1}s", plan.proxies);

    // What the processes use with nothing to do (a measurement window, not a wait): the baseline of the rounds'
    // CPU figures (probes, lease keep-alives, proxy status publication, Raft heartbeats).
    let idle_before = Cpu::now(&replica_pids, &etcd_pids);
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("  idle: {}", idle_before.used_until(&Cpu::now(&replica_pids, &etcd_pids), 0.0));

    let mut convergence = Vec::new();
    let mut last_round_ms = Vec::new();
    let mut apply_ms = Vec::new();
    let mut bytes_per_proxy = Vec::new();
    for round in 1..=plan.rounds {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {MARKER}{round}\n  \
             namespace: trellis-system\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
             principals: [\"cluster.local/ns/{NAMESPACE}/sa/blocked-{round}\"]\n"
        );
        let writes_before = status_writes(&replicas);
        let cpu_before = Cpu::now(&replica_pids, &etcd_pids);
        let applying_before = signals.applying_ns.load(Ordering::Relaxed);
        let applied_at = Instant::now();
        let out = tokio::task::block_in_place(|| cp.ctl_stdin(&["apply", "-f", "-"], Some(&yaml)));
        if !out.status.success() {
            bail!("trellisctl apply failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        apply_ms.push(applied_at.elapsed().as_secs_f64() * 1e3);
        let since = |at: Instant| at.saturating_duration_since(applied_at).as_secs_f64() * 1e3;
        let mut times = vec![None; plan.proxies];
        let mut received = vec![f64::INFINITY; plan.proxies];
        // Per replica: when the first and the last of its proxies read the update (ms after the apply started).
        let mut spread = vec![(f64::INFINITY, 0f64); replicas.len()];
        let mut bytes = 0usize;
        let mut count = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while count < plan.proxies {
            match tokio::time::timeout_at(deadline, acked_rx.recv()).await {
                Ok(Some(a)) if a.round == round => {
                    if times[a.proxy].is_none() {
                        count += 1;
                        bytes += a.bytes;
                    }
                    times[a.proxy] = Some(since(a.acked));
                    received[a.proxy] = since(a.received);
                    let (first, last) = &mut spread[a.proxy % replicas.len()];
                    *first = first.min(since(a.received));
                    *last = last.max(since(a.received));
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("every simulated proxy stopped"),
                Err(_) => break,
            }
        }
        let cpu_after = Cpu::now(&replica_pids, &etcd_pids);
        let applying_s = (signals.applying_ns.load(Ordering::Relaxed) - applying_before) as f64 / 1e9;
        if signals.failed.load(Ordering::Relaxed) {
            bail!("a simulated proxy's stream failed (see above)");
        }
        // Quantiles over every proxy: one that did not ACK within the deadline never converged, so it counts as
        // infinitely late (a round where 500 of 1,000 ACKed has an infinite p99, not the p99 of the 500).
        let mut ms: Vec<f64> = times.into_iter().map(|t| t.unwrap_or(f64::INFINITY)).collect();
        ms.sort_by(f64::total_cmp);
        let stats = quantiles(&ms);
        received.sort_by(f64::total_cmp);
        let read = quantiles(&received);
        eprintln!(
            "  apply round {round}: {count}/{} ACKed, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; update read p50 {:.1}, \
             p99 {:.1}, max {:.1} ms",
            plan.proxies, stats[0], stats[1], stats[2], read[0], read[1], read[2]
        );
        let spread: Vec<String> =
            spread.iter().enumerate().map(|(r, (a, b))| format!("replica {r} {a:.0}..{b:.0}")).collect();
        eprintln!("  apply round {round}: first..last read (ms) {}", spread.join(", "));
        let writes_after = status_writes(&replicas);
        eprintln!(
            "  apply round {round}: {}; proxy status entries written to the store {:.0} in {:.0} puts",
            cpu_before.used_until(&cpu_after, applying_s),
            writes_after[0] - writes_before[0],
            writes_after[1] - writes_before[1]
        );
        if count < plan.proxies {
            eprintln!("  apply round {round}: {} proxies did not ACK within 60 s", plan.proxies - count);
        }
        convergence.push((stats, count));
        bytes_per_proxy.push(bytes as f64 / count.max(1) as f64);
        last_round_ms = ms;
    }

    let mut signings = Vec::new();
    for round in 1..=plan.rounds {
        let before = signals.signed.load(Ordering::Relaxed);
        let cpu_before = Cpu::now(&replica_pids, &etcd_pids);
        let t0 = Instant::now();
        signing_tx.send_replace(true);
        tokio::time::sleep(plan.sign_for).await;
        signing_tx.send_replace(false);
        let signed = signals.signed.load(Ordering::Relaxed) - before;
        let cpu_after = Cpu::now(&replica_pids, &etcd_pids);
        let rate = signed as f64 / t0.elapsed().as_secs_f64();
        eprintln!("  signing round {round}: {rate:.0} certificates/s with {} clients", plan.csr_clients);
        // Where the CPU of a signing goes (the round's CPU over its signings; idle baseline included).
        let per_signing = |seconds: f64| seconds * 1e6 / signed.max(1) as f64;
        eprintln!(
            "    {}; per signing: replicas {:.0} µs, etcd {:.0} µs, bench {:.0} µs",
            cpu_before.used_until(&cpu_after, 0.0),
            per_signing(cpu_after.replicas.iter().sum::<f64>() - cpu_before.replicas.iter().sum::<f64>()),
            per_signing(cpu_after.etcd - cpu_before.etcd),
            per_signing(cpu_after.bench - cpu_before.bench),
        );
        signings.push(rate);
        // Let the answers in flight land before the next round.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if signals.failed.load(Ordering::Relaxed) {
        bail!("a simulated proxy's stream failed (see above)");
    }
    simulated.abort_all();
    Ok(Results {
        proxies: plan.proxies,
        csr_clients: plan.csr_clients,
        setup_seconds,
        convergence,
        apply_ms,
        last_round_ms,
        signings,
        bytes_per_proxy,
    })
}

/// Creates a join token for each of `count` simulated proxies (named by [`node_name`]) and joins each (a fresh
/// P-256 key, its node certificate), at most `gate`'s permits at once.
pub async fn join_all(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    addrs: &[String],
    count: usize,
    gate: &Arc<Semaphore>,
) -> anyhow::Result<Vec<Joined>> {
    eprintln!("  creating {count} join tokens");
    let mut tokens = Vec::with_capacity(count);
    for i in 0..count {
        let request = pb::CreateTokenRequest {
            node: node_name(i),
            namespaces: vec![NAMESPACE.into()],
            ttl_seconds: 3600,
            reusable: false,
        };
        let token = admin.create_token(request).await.context("CreateToken")?.into_inner();
        tokens.push((token.token, token.ca_pin));
    }
    eprintln!("  joining {count} proxies");
    let mut joins = tokio::task::JoinSet::new();
    for (i, (token, pin)) in tokens.into_iter().enumerate() {
        // Proxy i joins (and then streams from) replica i mod N.
        let (gate, addr) = (gate.clone(), addrs[i % addrs.len()].clone());
        joins.spawn(async move {
            let _permit = gate.acquire().await?;
            let joined = client::join(&addr, &pin, &token, &node_name(i)).await?.map_err(|s| anyhow!("join: {s}"))?;
            anyhow::Ok((i, joined))
        });
    }
    let mut joined: Vec<Option<Joined>> = (0..count).map(|_| None).collect();
    while let Some(done) = joins.join_next().await {
        let (i, j) = done??;
        joined[i] = Some(j);
    }
    joined.into_iter().map(|j| j.context("a join result is missing")).collect()
}

pub fn node_name(i: usize) -> String {
    format!("sim-{i:04}")
}

/// One simulated proxy: applies every update and ACKs it (noting when it ACKs one that carries a round's policy), or
/// NACKs it and stops (a failure of the run) and, while signing is on and it is a CSR client, keeps one workload CSR
/// outstanding.
async fn simulate(
    i: usize,
    mut stream: client::Stream,
    mut state: State,
    csr_client: bool,
    ack_only: bool,
    signals: Arc<Signals>,
) {
    let result = async {
        let (_key, csr_der) = client::csr(&[&format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{}", node_name(i))]);
        let mut signing = signals.signing.clone();
        let mut outstanding = false;
        let mut request_id = 0;
        loop {
            if csr_client && !outstanding && *signing.borrow_and_update() {
                request_id += 1;
                let csr = pb::CertificateRequest { request_id, csr_der: csr_der.clone() };
                stream.send(Up::CertificateRequest(csr)).await;
                outstanding = true;
            }
            tokio::select! {
                message = stream.rx.message() => match message? {
                    Some(pb::DiscoveryResponse { message: Some(Down::Update(u)) }) => {
                        let received = Instant::now();
                        let cpu = thread_cpu_ns();
                        let (ack, applied) = if ack_only {
                            (pb::Ack { version: u.version, ..Default::default() }, Ok(()))
                        } else {
                            apply_and_answer(&mut state, &u)
                        };
                        signals.applying_ns.fetch_add(thread_cpu_ns().saturating_sub(cpu), Ordering::Relaxed);
                        stream.send(Up::Ack(ack)).await;
                        applied.map_err(|e| anyhow!(e))?;
                        let acked = Instant::now();
                        for r in &u.resources {
                            let round = r.key.as_ref().and_then(|k| k.name.strip_prefix(MARKER)?.parse().ok());
                            if let Some(round) = round {
                                let bytes = prost::Message::encoded_len(&u);
                                let _ = signals.acked.send(Acked { round, proxy: i, received, acked, bytes });
                            }
                        }
                    }
                    Some(pb::DiscoveryResponse { message: Some(Down::Certificate(c)) }) => {
                        if !c.error.is_empty() || c.certificate_chain.is_empty() {
                            bail!("certificate refused: {}", c.error);
                        }
                        signals.signed.fetch_add(1, Ordering::Relaxed);
                        outstanding = false;
                    }
                    Some(_) => {}
                    None => bail!("stream ended"),
                },
                changed = signing.changed(), if csr_client && !outstanding => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    };
    let result: anyhow::Result<()> = result.await;
    if let Err(e) = result {
        eprintln!("simulated proxy {}: {e:#}", node_name(i));
        signals.failed.store(true, Ordering::Relaxed);
    }
}

/// `trellis-bench control [--replicas N] [--proxies N] [--csr-clients N] [--rounds N]`: this scenario alone, e.g. to
/// compare one redb-backed control plane with replicas on etcd.
pub fn main(argv: &[String]) -> std::process::ExitCode {
    let mut plan = Plan::DEFAULT;
    let mut args = argv.iter();
    while let Some(flag) = args.next() {
        if flag == "--ack-only" {
            plan.ack_only = true;
            continue;
        }
        let value = args.next().and_then(|v| v.parse::<usize>().ok());
        match (flag.as_str(), value) {
            ("--replicas", Some(v)) => plan.replicas = v,
            ("--proxies", Some(v)) => plan.proxies = v,
            ("--csr-clients", Some(v)) => plan.csr_clients = v,
            ("--rounds", Some(v)) => plan.rounds = v,
            ("--sign-for", Some(v)) => plan.sign_for = Duration::from_secs(v as u64),
            _ => {
                eprintln!(
                    "trellis-bench control: {flag}: expected --replicas/--proxies/--csr-clients/--rounds N, --sign-for SECONDS or --ack-only"
                );
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    match runtime.block_on(run(&plan)) {
        Ok(r) => {
            let store =
                if plan.replicas > 0 { format!("{} replicas on etcd", plan.replicas) } else { "1 on redb".into() };
            println!("control plane: {store}; {} proxies, setup {:.1}s", r.proxies, r.setup_seconds);
            for (((stats, count), apply), bytes) in r.convergence.iter().zip(&r.apply_ms).zip(&r.bytes_per_proxy) {
                println!(
                    "  convergence: {count} ACKed, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (apply {apply:.0} ms), \
                     {bytes:.0} bytes per proxy",
                    stats[0], stats[1], stats[2]
                );
            }
            for rate in &r.signings {
                println!("  signings/s with {} clients: {rate:.0}", r.csr_clients);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis-bench control: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
