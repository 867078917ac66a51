//! `trellis-bench load [--connections N] [--hold D] [--burst-rate N] [--burst D]`: many connections through one
//! proxy pair. Two proxies on loopback (a client proxy and one fronting an echo server in this process), then:
//! 1. `--connections` (default 10,000) tunnelled connections opened through the client's SOCKS5 port (at most 200
//!    handshakes in flight) and kept open for `--hold` (default 30 s), each echoing 64 bytes every second;
//! 2. a burst of `--burst-rate` (default 2,000) new connections per second for `--burst` (default 10 s), open loop,
//!    each sending and reading back one message and closing.
//!
//! Reports connections attempted and failed (with the first reasons), echoes and bytes lost, each proxy's RSS,
//! open fds and CPU seconds before, at the peak and after, and the burst's connection latency. Raises this
//! process's RLIMIT_NOFILE first (the proxies inherit it). The echo server is a process of its own
//! (`trellis-bench load-echo`): in this one, its 10,000 ends beside the 10,000 client ends went past a 20,000
//! descriptor limit by the dozen other descriptors the process holds, and exactly that many echoes timed out (their
//! connections waited in the backlog of a server that could not accept). Prints; writes nothing; exits 1 if
//! anything failed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::{ControlPlane, Proxy, ProxyOptions, WorkloadSpec};

use super::procfs;
use crate::common::{self, socks5, step};

const USAGE: &str = "usage: trellis-bench load [--connections N] [--hold D] [--burst-rate N] [--burst D] [--no-build]";
const SERVER_IP: [u8; 4] = [127, 0, 60, 2];
const CLIENT_IP: [u8; 4] = [127, 0, 60, 1];
const NAMESPACE: &str = "load";
const MESSAGE: usize = 64;
const IN_FLIGHT: usize = 200;

struct Args {
    connections: usize,
    hold: Duration,
    burst_rate: u32,
    burst: Duration,
    no_build: bool,
}

fn parse_args(argv: &[String]) -> anyhow::Result<Args> {
    let mut args = Args {
        connections: 10_000,
        hold: Duration::from_secs(30),
        burst_rate: 2000,
        burst: Duration::from_secs(10),
        no_build: false,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        let duration = |v: &String| {
            super::soak::parse_duration(v).with_context(|| format!("{arg} {v:?}: a number with s, m or h"))
        };
        match arg.as_str() {
            "--connections" => args.connections = value()?.parse().context("--connections")?,
            "--hold" => args.hold = duration(value()?)?,
            "--burst-rate" => args.burst_rate = value()?.parse().context("--burst-rate")?,
            "--burst" => args.burst = duration(value()?)?,
            "--no-build" => args.no_build = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if args.burst_rate == 0 {
        bail!("--burst-rate must be at least 1");
    }
    Ok(args)
}

pub fn main(argv: &[String]) -> ExitCode {
    let args = match parse_args(argv) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("trellis-bench load: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("\ntrellis-bench load: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Failures by reason (the error's text), and the total.
#[derive(Default)]
struct Failures {
    count: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
}

impl Failures {
    fn add(&self, reason: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        *self.reasons.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_default() += 1;
    }

    fn summary(&self) -> String {
        let reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        if reasons.is_empty() {
            return "none".into();
        }
        reasons.iter().map(|(r, n)| format!("{n}× {r}")).collect::<Vec<_>>().join("; ")
    }
}

/// A process's RSS (MiB), open fds and CPU seconds.
#[derive(Clone, Copy)]
struct Usage {
    rss_mib: f64,
    fds: usize,
    cpu: f64,
}

fn usage(pid: u32) -> Usage {
    Usage {
        rss_mib: procfs::rss_bytes(pid).unwrap_or_default() as f64 / 1048576.0,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or_default(),
        cpu: procfs::cpu_seconds(pid).unwrap_or_default(),
    }
}

fn start_mesh(echo: SocketAddr) -> anyhow::Result<(ControlPlane, Vec<Proxy>)> {
    let cp = step("starting the control plane", &[], || Ok(ControlPlane::start(&[])))?;
    let options = ProxyOptions { passthrough: Some("deny"), ..ProxyOptions::default() };
    let mut server = WorkloadSpec::new("server", NAMESPACE, "server", &IpAddr::from(SERVER_IP).to_string());
    server.ports = vec![(echo.port(), "tcp")];
    let client = WorkloadSpec::new("client", NAMESPACE, "client", &IpAddr::from(CLIENT_IP).to_string());
    let proxies = vec![
        step("starting the server proxy", &[], || {
            Ok(Proxy::start_with(&cp, "load-server", &[server], options.clone()))
        })?,
        step("starting the client proxy", &[], || {
            Ok(Proxy::start_with(&cp, "load-client", &[client], options.clone()))
        })?,
    ];
    super::wait_for_server_in_registry(&proxies, &IpAddr::from(SERVER_IP).to_string())?;
    Ok((cp, proxies))
}

async fn echo_connection(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// `trellis-bench load-echo`: the load's echo server, on `SERVER_IP` (a port the kernel picks, backlog 4096); prints
/// `echo ADDR`, serves until its standard input closes (the benchmark ended, however it ended).
pub fn echo_main() -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        use std::io::Write;
        procfs::raise_open_files(65536);
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let listener = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((IpAddr::from(SERVER_IP), 0).into())?;
            socket.listen(4096)
        })?;
        println!("echo {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        runtime.spawn(super::load::serve(listener, echo_connection));
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench load-echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `load-echo` process, killed on drop.
struct EchoProcess(std::process::Child);

impl EchoProcess {
    fn start() -> anyhow::Result<(Self, SocketAddr)> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg("load-echo")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting `trellis-bench load-echo`")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let process = Self(child);
        let addr = line.strip_prefix("echo ").and_then(|a| a.trim().parse().ok());
        let addr = addr.with_context(|| format!("`trellis-bench load-echo` did not say where it listens: {line:?}"))?;
        Ok((process, addr))
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &Args) -> anyhow::Result<bool> {
    common::prepare(args.no_build, |line| eprintln!("{line}"))?;
    // The client end of every connection lives in this process, plus the burst's (the echo ends in load-echo's).
    let want = (args.connections + args.burst_rate as usize * 10 + 4096) as u64;
    let limit = procfs::raise_open_files(want);
    if limit < want {
        eprintln!("load: RLIMIT_NOFILE is {limit}, below the {want} this run may need; failures may be EMFILE");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (_echo_process, echo) = EchoProcess::start()?;
    let (_cp, proxies) = start_mesh(echo)?;
    let socks = proxies[1].socks5_addr;
    let pids: Vec<(String, u32)> = proxies.iter().map(|p| (p.node.clone(), p.pid().expect("proxy running"))).collect();
    let sample = || pids.iter().map(|(_, pid)| usage(*pid)).collect::<Vec<_>>();
    eprintln!(
        "load: {} connections held {:?}, then {} new connections/s for {:?}; RLIMIT_NOFILE {limit}",
        args.connections, args.hold, args.burst_rate, args.burst
    );

    // Phase 1: many concurrent connections, each echoing every second.
    let before = sample();
    let failures = Arc::new(Failures::default());
    let echoes = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let opened_at = Instant::now();
    let (streams, open_took) = runtime.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let opening: Vec<_> = (0..args.connections)
            .map(|_| {
                let (gate, failures) = (gate.clone(), failures.clone());
                tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await.ok()?;
                    match tokio::time::timeout(Duration::from_secs(30), socks5::connect_async(socks, echo)).await {
                        Ok(Ok(stream)) => Some(stream),
                        Ok(Err(e)) => {
                            failures.add(format!("open: {e}"));
                            None
                        }
                        Err(_) => {
                            failures.add("open: timed out after 30 s".into());
                            None
                        }
                    }
                })
            })
            .collect();
        let mut streams = Vec::with_capacity(args.connections);
        for task in opening {
            if let Ok(Some(stream)) = task.await {
                streams.push(stream);
            }
        }
        (streams, opened_at.elapsed())
    });
    let open_failures = failures.count.load(Ordering::Relaxed);
    let held = streams.len();
    let deadline = Instant::now() + args.hold;
    let peak = runtime.block_on(async {
        let tasks: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, mut stream)| {
                let (failures, echoes, lost) = (failures.clone(), echoes.clone(), lost.clone());
                let spread = Duration::from_millis((i % 1000) as u64);
                tokio::spawn(async move {
                    let message = [(i % 251) as u8; MESSAGE];
                    let mut back = [0u8; MESSAGE];
                    tokio::time::sleep(spread).await;
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        if Instant::now() >= deadline {
                            return;
                        }
                        let exchange = async {
                            stream.write_all(&message).await?;
                            stream.read_exact(&mut back).await?;
                            std::io::Result::Ok(())
                        };
                        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                            Ok(Ok(())) if back == message => {
                                echoes.fetch_add(1, Ordering::Relaxed);
                            }
                            outcome => {
                                lost.fetch_add(MESSAGE as u64, Ordering::Relaxed);
                                failures.add(format!("echo: {outcome:?}"));
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        // Midway through the hold: the peak.
        tokio::time::sleep(args.hold / 2).await;
        let peak = sample();
        for task in tasks {
            let _ = task.await;
        }
        peak
    });
    let hold_failures = failures.count.load(Ordering::Relaxed) - open_failures;
    // Every connection closed (dropped with its task): wait for the proxies' fds to come down.
    let settle = Instant::now() + Duration::from_secs(30);
    while Instant::now() < settle && pids.iter().zip(&before).any(|((_, pid), b)| usage(*pid).fds > b.fds + 10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let after_hold = sample();

    // Phase 2: the burst.
    let burst_failures = Arc::new(Failures::default());
    let latencies = runtime.block_on(burst(socks, echo, args.burst_rate, args.burst, burst_failures.clone()));
    let attempted_burst = (args.burst_rate as f64 * args.burst.as_secs_f64()) as u64;
    let settle = Instant::now() + Duration::from_secs(30);
    while Instant::now() < settle && pids.iter().zip(&before).any(|((_, pid), b)| usage(*pid).fds > b.fds + 10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let after_burst = sample();

    println!("## Load (commit {})\n", super::soak::commit());
    println!(
        "2 proxies on loopback (client → server → echo, the echo a process of its own), {} build; RLIMIT_NOFILE \
         {limit}\n",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!("| phase | connections | failed | detail |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| {} concurrent, held {:?} echoing {MESSAGE} B every second | {} opened in {:.1} s | {} open, {} during the \
         hold | {} echoes, {} bytes lost; failures: {} |",
        args.connections,
        args.hold,
        held,
        open_took.as_secs_f64(),
        open_failures,
        hold_failures,
        echoes.load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed),
        failures.summary()
    );
    let mut sorted = latencies.clone();
    sorted.sort();
    let at = |q: f64| {
        if sorted.is_empty() {
            Duration::ZERO
        } else {
            sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
        }
    };
    println!(
        "| burst {} new connections/s for {:?} | {attempted_burst} attempted, {} worked | {} | latency p50 {:.2?}, \
         p99 {:.2?}, max {:.2?}; failures: {} |",
        args.burst_rate,
        args.burst,
        latencies.len(),
        burst_failures.count.load(Ordering::Relaxed),
        at(0.5),
        at(0.99),
        at(1.0),
        burst_failures.summary()
    );
    println!("\n| proxy | RSS MiB before / peak / after hold / after burst | fds | CPU s (hold, burst) |");
    println!("| --- | --- | --- | --- |");
    for (i, (node, _)) in pids.iter().enumerate() {
        let (b, p, h, u) = (before[i], peak[i], after_hold[i], after_burst[i]);
        println!(
            "| {node} | {:.1} / {:.1} / {:.1} / {:.1} | {} / {} / {} / {} | {:.1}, {:.1} |",
            b.rss_mib,
            p.rss_mib,
            h.rss_mib,
            u.rss_mib,
            b.fds,
            p.fds,
            h.fds,
            u.fds,
            h.cpu - b.cpu,
            u.cpu - h.cpu
        );
    }
    let failed = failures.count.load(Ordering::Relaxed) + burst_failures.count.load(Ordering::Relaxed);
    Ok(failed == 0 && lost.load(Ordering::Relaxed) == 0)
}

/// `rate` new connections per second for `duration`, open loop; the latency of each that worked.
async fn burst(
    socks: SocketAddr,
    echo: SocketAddr,
    rate: u32,
    duration: Duration,
    failures: Arc<Failures>,
) -> Vec<Duration> {
    const SHORT: &[u8] = b"a new connection through the mesh";
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let started = tokio::time::Instant::now();
    let every = Duration::from_secs(1) / rate;
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        tokio::time::sleep_until(started + every * n as u32).await;
        let failures = failures.clone();
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let exchange = super::short_exchange(socks, echo, SHORT);
            match tokio::time::timeout(Duration::from_secs(30), exchange).await {
                Ok(Ok(back)) if back == SHORT => Some(begun.elapsed()),
                Ok(Ok(back)) => {
                    failures.add(format!("burst: {} of {} bytes echoed", back.len(), SHORT.len()));
                    None
                }
                Ok(Err(e)) => {
                    failures.add(format!("burst: {e}"));
                    None
                }
                Err(_) => {
                    failures.add("burst: timed out after 30 s".into());
                    None
                }
            }
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(Some(latency)) = task.await {
            latencies.push(latency);
        }
    }
    latencies
}
