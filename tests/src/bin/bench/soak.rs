//! `trellis-bench soak --duration D`: a mesh kept busy for a long time while everything that changes in production
//! changes: three proxies (two clients, one fronting the echo server) on loopback, or with `--netns` each on a host
//! of its own (network namespaces `trl-soak-*`, the control plane on a fourth) with capture on, so that the clients
//! connect straight to the echo server's address and their host's nftables rules send it through the mesh; workload
//! certificates of
//! `--cert-ttl` (default 1m, so each proxy rotates about twice a minute), an AuthorizationPolicy rewritten every
//! `--policy-every` (default 30 s, at most a third of the run; it still allows the traffic, so every rewrite re-authorizes every open
//! connection without closing any), long-lived streams echoing 1 KiB every second, and short connections opened at a
//! fixed rate. Reports connections attempted and failed, bytes lost, each proxy's RSS and open fds per sample, and
//! the p99 latency of the short connections per window (5 minutes, or the whole run if shorter). Prints; writes
//! nothing. Exits 1 if a connection failed or a byte was lost.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_tests::netns::{self, Net};
use trellis_tests::{ControlPlane, Proxy, ProxyOptions, WorkloadSpec};

use super::procfs;
use crate::common::{self, socks5, step};

const USAGE: &str = "usage: trellis-bench soak --duration D [--cert-ttl D] [--policy-every D] [--rate N] [--streams N] \
                     [--netns] [--no-build]";
const SERVER_IP: [u8; 4] = [127, 0, 50, 2];
const CLIENT_IPS: [[u8; 4]; 2] = [[127, 0, 50, 1], [127, 0, 50, 3]];
const NAMESPACE: &str = "soak";
const STREAM_MESSAGE: usize = 1024;
const SHORT_MESSAGE: &[u8] = b"short connection through the mesh";
const WINDOW: Duration = Duration::from_secs(300);
/// `--netns`: hosts `trl-soak-0` (control plane) .. `trl-soak-3` on 10.200.88.0/24 (a subnet no test uses).
const NETNS_TAG: &str = "soak";
const NETNS_SUBNET: u8 = 88;
/// `--netns`: the echo server's port on its host (a namespace of its own, so a fixed port is free).
const NETNS_ECHO_PORT: u16 = 7000;

struct Args {
    duration: Duration,
    cert_ttl: Duration,
    policy_every: Duration,
    rate: u32,
    streams: usize,
    netns: bool,
    no_build: bool,
}

fn parse_args(argv: &[String]) -> anyhow::Result<Args> {
    let mut args = Args {
        duration: Duration::ZERO,
        cert_ttl: Duration::from_secs(60),
        policy_every: Duration::from_secs(30),
        rate: 20,
        streams: 20,
        netns: false,
        no_build: false,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        let duration = |v: &String| parse_duration(v).with_context(|| format!("{arg} {v:?}: a number with s, m or h"));
        match arg.as_str() {
            "--duration" => args.duration = duration(value()?)?,
            "--cert-ttl" => args.cert_ttl = duration(value()?)?,
            "--policy-every" => args.policy_every = duration(value()?)?,
            "--rate" => args.rate = value()?.parse().context("--rate")?,
            "--streams" => args.streams = value()?.parse().context("--streams")?,
            "--netns" => args.netns = true,
            "--no-build" => args.no_build = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if args.duration.is_zero() {
        bail!("--duration is required (e.g. 30s, 1h)");
    }
    if args.rate == 0 {
        bail!("--rate must be at least 1");
    }
    Ok(args)
}

/// `30s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.len().checked_sub(1)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(unit)?))
}

pub fn main(argv: &[String]) -> ExitCode {
    let args = match parse_args(argv) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("trellis-bench soak: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("\ntrellis-bench soak: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the load reports, shared by its tasks.
#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    failed: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_echoed: AtomicU64,
    bytes_lost: AtomicU64,
}

/// Where a client's connections come from.
#[derive(Clone)]
enum Client {
    /// A process on loopback using its client proxy's SOCKS5 listener.
    Socks(SocketAddr),
    /// An application on a captured host (this network namespace): it connects straight to the echo server and the
    /// host's nftables rules send the connection through its proxy.
    Captured(String),
}

impl Client {
    async fn dial(&self, echo: SocketAddr) -> std::io::Result<TcpStream> {
        match self {
            Client::Socks(socks) => socks5::connect_async(*socks, echo).await,
            Client::Captured(_) => TcpStream::connect(echo).await,
        }
    }
}

/// The mesh and its hosts. Fields drop in order: the processes before the namespaces they run in.
struct Mesh {
    cp: ControlPlane,
    proxies: Vec<Proxy>,
    clients: Vec<Client>,
    echo: SocketAddr,
    /// The control plane's namespace (`trellisctl` runs there), if any.
    cp_netns: Option<String>,
    _net: Option<Net>,
}

fn start_mesh(args: &Args, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Mesh> {
    let ttl = format!("{}s", args.cert_ttl.as_secs());
    let (net, echo_listener) = if args.netns {
        let net = step("creating the hosts (network namespaces trl-soak-*; root needed)", &[], || {
            Ok(Net::new(NETNS_TAG, NETNS_SUBNET, 4))
        })?;
        let at = net.host(1).addr(NETNS_ECHO_PORT);
        let listener = netns::in_netns(&net.host(1).ns, move || std::net::TcpListener::bind(at))
            .with_context(|| format!("echo server on {at} in {}", net.host(1).ns))?;
        listener.set_nonblocking(true)?;
        let _runtime = runtime.enter();
        (Some(net), TcpListener::from_std(listener)?)
    } else {
        (None, runtime.block_on(TcpListener::bind((IpAddr::from(SERVER_IP), 0)))?)
    };
    let echo = echo_listener.local_addr()?;
    runtime.spawn(super::load::serve(echo_listener, echo_connection));
    let host = |i: usize| net.as_ref().map(|n| n.host(i).clone());
    let cp = step("starting the control plane", &[], || {
        Ok(match host(0) {
            Some(h0) => ControlPlane::start_in(&h0, &["--cert-ttl", &ttl]),
            None => ControlPlane::start(&["--cert-ttl", &ttl]),
        })
    })?;
    let options = |i: usize| ProxyOptions {
        passthrough: Some("deny"),
        capture: net.is_some(),
        netns: host(i),
        ..ProxyOptions::default()
    };
    let server_ip = echo.ip().to_string();
    let mut server = WorkloadSpec::new("server", NAMESPACE, "server", &server_ip);
    server.ports = vec![(echo.port(), "tcp")];
    let mut proxies = vec![step("starting the server proxy", &[], || {
        Ok(Proxy::start_with(&cp, "soak-server", &[server], options(1)))
    })?];
    let mut clients = Vec::new();
    for (i, ip) in CLIENT_IPS.iter().enumerate() {
        let name = format!("client-{}", i + 1);
        let ip = host(i + 2).map_or(IpAddr::from(*ip), |h| h.ip.into());
        let spec = WorkloadSpec::new(&name, NAMESPACE, &name, &ip.to_string());
        let proxy = step(&format!("starting proxy soak-{name}"), &[], || {
            Ok(Proxy::start_with(&cp, &format!("soak-{name}"), &[spec], options(i + 2)))
        })?;
        clients.push(match host(i + 2) {
            Some(h) => Client::Captured(h.ns),
            None => Client::Socks(proxy.socks5_addr),
        });
        proxies.push(proxy);
    }
    super::wait_for_server_in_registry(&proxies, &server_ip)?;
    Ok(Mesh { cp, proxies, clients, echo, cp_netns: host(0).map(|h| h.ns), _net: net })
}

/// The policy of rewrite `n`: both clients allowed to the echo port; odd rewrites allow one more port, so every
/// rewrite is a real change that every proxy applies and re-authorizes open connections against.
fn policy(n: u64, echo_port: u16) -> String {
    let ports = if n % 2 == 1 { format!("\"{echo_port}\", \"9\"") } else { format!("\"{echo_port}\"") };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: soak-allow\n  namespace: \
         {NAMESPACE}\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: \
         [\"cluster.local/ns/{NAMESPACE}/sa/client-1\", \"cluster.local/ns/{NAMESPACE}/sa/client-2\"]\n    to:\n    \
         - operation:\n        ports: [{ports}]\n"
    )
}

fn run(args: &Args) -> anyhow::Result<bool> {
    common::prepare(args.no_build, |line| eprintln!("{line}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mesh = start_mesh(args, &runtime)?;
    let echo = mesh.echo;
    mesh.cp.apply(&policy(0, echo.port()));
    let pids: Vec<(String, u32)> =
        mesh.proxies.iter().map(|p| (p.node.clone(), p.pid().expect("proxy running"))).collect();
    eprintln!(
        "soak: {:?}, {}, cert TTL {:?}, a policy change every {:?}, {} long-lived streams, {} short connections/s",
        args.duration,
        where_(args),
        args.cert_ttl,
        args.policy_every,
        args.streams,
        args.rate
    );

    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = started + args.duration;
    let window = WINDOW.min(args.duration);
    let sample_every = Duration::from_secs(60).min(args.duration / 3);

    // Each client its own thread (in its host's namespace with --netns) and runtime; streams and the rate shared out.
    let n = mesh.clients.len();
    let load: Vec<_> = mesh
        .clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            let streams = args.streams / n + usize::from(i < args.streams % n);
            let rate = args.rate / n as u32 + u32::from((i as u32) < args.rate % n as u32);
            let plan = ClientLoad { client: client.clone(), echo, streams, rate, started, deadline };
            spawn_client(plan, counters.clone())
        })
        .collect();
    let (samples, policy_changes) = runtime.block_on(async {
        let policies = {
            // A short run (a check) still changes the policy a few times.
            let every = args.policy_every.min(args.duration / 3);
            let cp_args = (mesh.cp.admin_config(), mesh.cp_netns.clone(), echo.port());
            tokio::spawn(change_policies(every, deadline, cp_args))
        };
        let samples = sample(&pids, sample_every, started, deadline).await;
        let changes = policies.await.unwrap_or(Ok(0));
        (samples, changes)
    });
    let mut latencies = Vec::new();
    for client in load {
        latencies.extend(client.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?);
    }
    let policy_changes = policy_changes?;

    // Every certificate a proxy installed (the first ones and each rotation), from the proxies' own logs.
    let installed: usize = mesh
        .proxies
        .iter()
        .map(|p| trellis_tests::read_log(&p.log_path()).matches("workload certificate installed").count())
        .sum();
    let c = &counters;
    let (attempted, failed) = (c.attempted.load(Ordering::Relaxed), c.failed.load(Ordering::Relaxed));
    let lost = c.bytes_lost.load(Ordering::Relaxed);
    println!("## Soak ({:?}, commit {})\n", args.duration, commit());
    println!(
        "3 proxies {}, cert TTL {:?} ({installed} workload certificates installed, the first three included), \
         {policy_changes} policy changes, {} long-lived streams (1 KiB echoed every second), {} short connections/s\n",
        where_(args),
        args.cert_ttl,
        args.streams,
        args.rate
    );
    println!("| connections attempted | failed | bytes sent | bytes echoed | bytes lost |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| {attempted} | {failed} | {} | {} | {lost} |\n",
        c.bytes_sent.load(Ordering::Relaxed),
        c.bytes_echoed.load(Ordering::Relaxed)
    );
    println!("| at | {} |", pids.iter().map(|(n, _)| format!("{n} RSS MiB / fds")).collect::<Vec<_>>().join(" | "));
    println!("| --- |{}", " --- |".repeat(pids.len()));
    for (at, per_proxy) in &samples {
        let cells: Vec<String> =
            per_proxy.iter().map(|(rss, fds)| format!("{:.1} / {fds}", *rss as f64 / 1048576.0)).collect();
        println!("| {}s | {} |", at.as_secs(), cells.join(" | "));
    }
    println!("\n| window | short connections | p50 | p99 |");
    println!("| --- | --- | --- | --- |");
    let mut by_window: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    latencies.sort();
    for (at, latency) in latencies {
        by_window.entry(at.as_secs() / window.as_secs().max(1)).or_default().push(latency);
    }
    for (index, mut values) in by_window {
        values.sort();
        let at = |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
        let from = window * index as u32;
        let (from, to) = (from.as_secs(), (from + window).as_secs());
        println!("| {from}s–{to}s | {} | {:.2?} | {:.2?} |", values.len(), at(0.5), at(0.99));
    }
    drop(mesh);
    Ok(failed == 0 && lost == 0)
}

fn where_(args: &Args) -> &'static str {
    if args.netns { "on network-namespace hosts, capture on" } else { "on loopback" }
}

pub fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn echo_connection(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// One long-lived stream: 1 KiB every second, each echo checked; on a failure the stream counts it (and the bytes
/// not echoed) and opens a new connection.
async fn long_lived(client: Client, echo: SocketAddr, deadline: Instant, c: Arc<Counters>) {
    let message: Vec<u8> = (0..STREAM_MESSAGE).map(|i| (i * 7 % 251) as u8).collect();
    let mut back = vec![0u8; STREAM_MESSAGE];
    while Instant::now() < deadline {
        c.attempted.fetch_add(1, Ordering::Relaxed);
        let mut stream = match client.dial(echo).await {
            Ok(stream) => stream,
            Err(e) => {
                fail(&c, &format!("long-lived stream: connect: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if Instant::now() >= deadline {
                return;
            }
            c.bytes_sent.fetch_add(STREAM_MESSAGE as u64, Ordering::Relaxed);
            let exchange = async {
                stream.write_all(&message).await?;
                stream.read_exact(&mut back).await?;
                std::io::Result::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                Ok(Ok(())) if back == message => {
                    c.bytes_echoed.fetch_add(STREAM_MESSAGE as u64, Ordering::Relaxed);
                }
                outcome => {
                    c.bytes_lost.fetch_add(STREAM_MESSAGE as u64, Ordering::Relaxed);
                    fail(&c, &format!("long-lived stream: {outcome:?}"));
                    break;
                }
            }
        }
    }
}

fn fail(c: &Counters, what: &str) {
    let n = c.failed.fetch_add(1, Ordering::Relaxed);
    if n < 10 {
        eprintln!("soak: failure: {what}");
    }
}

/// One client's share of the load.
struct ClientLoad {
    client: Client,
    echo: SocketAddr,
    streams: usize,
    rate: u32,
    started: Instant,
    deadline: Instant,
}

/// Runs a client's long-lived streams and short connections on a thread of its own (in the client's namespace when
/// captured) until the deadline; the thread returns the short connections' (time since start, latency).
fn spawn_client(plan: ClientLoad, c: Arc<Counters>) -> std::thread::JoinHandle<Vec<(Duration, Duration)>> {
    let ns = match &plan.client {
        Client::Captured(ns) => Some(ns.clone()),
        Client::Socks(_) => None,
    };
    let work = move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        runtime.block_on(async move {
            let streams: Vec<_> = (0..plan.streams)
                .map(|_| tokio::spawn(long_lived(plan.client.clone(), plan.echo, plan.deadline, c.clone())))
                .collect();
            let latencies = short_connections(&plan, c).await;
            for stream in streams {
                let _ = stream.await;
            }
            latencies
        })
    };
    match ns {
        Some(ns) => netns::spawn_in_netns(&ns, work),
        None => std::thread::spawn(work),
    }
}

/// Short connections at a fixed rate (open loop: one is started at each tick whatever the others do); returns
/// (time since start, latency) of each that worked.
async fn short_connections(plan: &ClientLoad, c: Arc<Counters>) -> Vec<(Duration, Duration)> {
    if plan.rate == 0 {
        return Vec::new();
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1) / plan.rate);
    let mut tasks = Vec::new();
    loop {
        tick.tick().await;
        if Instant::now() >= plan.deadline {
            break;
        }
        let (client, echo, started, c) = (plan.client.clone(), plan.echo, plan.started, c.clone());
        tasks.push(tokio::spawn(async move {
            c.attempted.fetch_add(1, Ordering::Relaxed);
            let at = started.elapsed();
            let begun = Instant::now();
            let exchange = short_exchange(&client, echo);
            match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                Ok(Ok(back)) if back == SHORT_MESSAGE => Some((at, begun.elapsed())),
                outcome => {
                    fail(&c, &format!("short connection: {outcome:?}"));
                    None
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        if let Ok(Some(sample)) = task.await {
            latencies.push(sample);
        }
    }
    latencies
}

/// One short connection: send the message, half-close, read the echo to its end.
async fn short_exchange(client: &Client, echo: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut stream = client.dial(echo).await?;
    stream.write_all(SHORT_MESSAGE).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await?;
    Ok(back)
}

/// Rewrites the policy every `every` until the deadline (trellisctl, as an operator would); returns how many times.
async fn change_policies(
    every: Duration,
    deadline: Instant,
    (admin_config, cp_ns, echo_port): (std::path::PathBuf, Option<String>, u16),
) -> anyhow::Result<u64> {
    let mut n = 0;
    loop {
        tokio::time::sleep(every).await;
        if Instant::now() >= deadline {
            return Ok(n);
        }
        n += 1;
        let text = policy(n, echo_port);
        let (config, cp_ns) = (admin_config.clone(), cp_ns.clone());
        let output = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = netns::command(cp_ns.as_deref(), trellis_tests::bin("trellisctl"))
                .args(["--config", &config.to_string_lossy(), "apply", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            child.stdin.take().expect("stdin").write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .await??;
        if !output.status.success() {
            bail!("policy change {n}: trellisctl apply: {}", String::from_utf8_lossy(&output.stderr));
        }
    }
}

/// (time since start, per proxy (RSS bytes, open fds)) every `every` until the deadline, and once at the end.
async fn sample(
    pids: &[(String, u32)],
    every: Duration,
    started: Instant,
    deadline: Instant,
) -> Vec<(Duration, Vec<(u64, usize)>)> {
    let read = || {
        pids.iter()
            .map(|(_, pid)| {
                let rss = procfs::rss_bytes(*pid).unwrap_or_default();
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or_default();
                (rss, fds)
            })
            .collect::<Vec<_>>()
    };
    let mut samples = vec![(Duration::ZERO, read())];
    loop {
        let next = Instant::now() + every;
        if next > deadline {
            tokio::time::sleep_until(deadline.into()).await;
            samples.push((started.elapsed(), read()));
            return samples;
        }
        tokio::time::sleep_until(next.into()).await;
        samples.push((started.elapsed(), read()));
    }
}
