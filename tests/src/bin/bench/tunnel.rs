//! `trellis-bench tunnel [--quick] [--direct-only] [--no-build]`
//!
//! The tunnel benchmark: on loopback, a sink and an echo server (tokio tasks in this process, on 127.0.20.2, the
//! address of the server proxy's workload) reached (A) directly over TCP and (B) through two Trellis proxies:
//! SOCKS5 into the client proxy → HBONE (mTLS, HTTP/2 CONNECT) → server proxy → server. A and B alternate for each
//! measurement, round after round. Measures bulk throughput (1 and 8 streams), 1 KiB ping-pong latency, and
//! connection setup; writes a Markdown section between `<!-- tunnel:begin -->` and `<!-- tunnel:end -->` in
//! BENCHMARKS.md and prints it. Nothing asserts on timings.
//!
//! `--quick` is a smoke test (small sizes, 2 rounds; BENCHMARKS.md untouched). `--direct-only` measures only A,
//! without starting the mesh (BENCHMARKS.md untouched).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

use super::contenders::{mesh_logs, start_mesh};
use super::load::{self, send_bulk};
use super::report::{cell, command_output, machine, median, number, revision, wrap, write_section};
use crate::common::{self, step};

const USAGE: &str = "usage: trellis-bench tunnel [--quick] [--direct-only] [--no-build]";
const SERVER_IP: [u8; 4] = [127, 0, 20, 2];
const COMMAND: &str = "cargo run --release -p trellis-tests --bin trellis-bench -- tunnel";
const MSG: usize = 1024;
/// Longest any single measurement may take before the benchmark gives up.
const MEASUREMENT_TIMEOUT: Duration = Duration::from_secs(300);

/// Sizes of one run.
struct Plan {
    rounds: usize,
    bulk_bytes: u64,
    streams: usize,
    round_trips: usize,
    setups: usize,
    rate_for: Duration,
    rate_concurrency: usize,
}

const FULL: Plan = Plan {
    rounds: 5,
    bulk_bytes: 512 << 20,
    streams: 8,
    round_trips: 10_000,
    setups: 1_000,
    rate_for: Duration::from_secs(2),
    rate_concurrency: 8,
};

const QUICK: Plan = Plan {
    rounds: 2,
    bulk_bytes: 16 << 20,
    streams: 8,
    round_trips: 500,
    setups: 100,
    rate_for: Duration::from_millis(300),
    rate_concurrency: 8,
};

struct Args {
    quick: bool,
    direct_only: bool,
    no_build: bool,
}

fn parse_args(argv: &[String]) -> anyhow::Result<Args> {
    let mut args = Args { quick: false, direct_only: false, no_build: false };
    for arg in argv {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--direct-only" => args.direct_only = true,
            "--no-build" => args.no_build = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

/// `trellis-bench tunnel ARGS`.
pub fn main(argv: &[String]) -> ExitCode {
    let args = match parse_args(argv) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("trellis-bench: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ntrellis-bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How a client reaches a server: straight, or through the client proxy's SOCKS5 listener.
#[derive(Clone, Copy)]
pub(crate) enum Route {
    Direct,
    Mesh(SocketAddr),
}

impl Route {
    pub(crate) async fn dial(self, dest: SocketAddr) -> std::io::Result<TcpStream> {
        match self {
            Route::Direct => {
                let stream = TcpStream::connect(dest).await?;
                stream.set_nodelay(true)?;
                Ok(stream)
            }
            Route::Mesh(socks5) => common::socks5::connect_async(socks5, dest).await,
        }
    }
}

/// Where the in-process servers listen.
#[derive(Clone, Copy)]
struct Servers {
    sink: SocketAddr,
    echo: SocketAddr,
}

fn run(args: &Args) -> anyhow::Result<()> {
    let plan = if args.quick { &QUICK } else { &FULL };
    if !args.direct_only {
        common::prepare(args.no_build, |line| eprintln!("{line}"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // On SIGINT/SIGTERM the measurements stop and `run` returns, so the harness's drops stop the proxies.
    let (mut sigint, mut sigterm) = {
        let _context = runtime.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    let servers = runtime.block_on(start_servers())?;
    eprintln!("sink on {}, echo on {} (in this process)", servers.sink, servers.echo);

    // The mesh: the server proxy's workload owns the servers' address and both ports. Passthrough is denied, so a
    // connection that works went through the tunnel.
    let mut mesh = None;
    if !args.direct_only {
        let (cp, client, server) = start_mesh(&[servers.sink.port(), servers.echo.port()])?;
        let logs = mesh_logs(&client, &server);
        let route = Route::Mesh(client.socks5_addr);
        step("a first round trip through the mesh", &logs, || {
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), connect_round_trip(route, servers.echo)).await??;
                anyhow::Ok(())
            })
        })?;
        eprintln!("mesh up: SOCKS5 {} → bench-client → HBONE → bench-server → servers", client.socks5_addr);
        mesh = Some((cp, client, server));
    }
    let mesh_route = mesh.as_ref().map(|(_, client, _)| Route::Mesh(client.socks5_addr));

    let results = runtime.block_on(async {
        tokio::select! {
            results = measure(plan, servers, mesh_route) => results,
            _ = sigint.recv() => bail!("interrupted (SIGINT)"),
            _ = sigterm.recv() => bail!("interrupted (SIGTERM)"),
        }
    })?;
    let section = render(plan, args, &results);
    println!("{section}");
    if args.quick || args.direct_only {
        eprintln!("(--quick/--direct-only: BENCHMARKS.md left as it is)");
    } else {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
        write_section(&path, "tunnel", &section)?;
        eprintln!("wrote the tunnel section of {}", path.display());
    }
    drop(mesh);
    Ok(())
}

async fn start_servers() -> anyhow::Result<Servers> {
    let ip = IpAddr::from(SERVER_IP);
    let sink = TcpListener::bind((ip, 0)).await.with_context(|| format!("binding the sink on {ip}"))?;
    let echo = TcpListener::bind((ip, 0)).await.with_context(|| format!("binding the echo server on {ip}"))?;
    let servers = Servers { sink: sink.local_addr()?, echo: echo.local_addr()? };
    tokio::spawn(load::serve(sink, load::sink_connection));
    tokio::spawn(load::serve(echo, echo_connection));
    Ok(servers)
}

async fn echo_connection(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// Sends `total` bytes to the sink over `streams` connections (opened first); MB/s from the first byte until
/// every sink has acknowledged reading its exact share.
async fn bulk(route: Route, sink: SocketAddr, total: u64, streams: usize) -> std::io::Result<f64> {
    let share = total / streams as u64;
    let mut connections = Vec::with_capacity(streams);
    for _ in 0..streams {
        connections.push(route.dial(sink).await?);
    }
    send_bulk(connections, share).await
}

/// `n` round trips of 1 KiB on one connection (after 100 unrecorded ones).
async fn ping_pong(route: Route, echo: SocketAddr, n: usize) -> std::io::Result<Vec<Duration>> {
    let mut stream = route.dial(echo).await?;
    let (message, mut back) = ([0x5a; MSG], [0; MSG]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..100 + n {
        let started = Instant::now();
        stream.write_all(&message).await?;
        stream.read_exact(&mut back).await?;
        if i >= 100 {
            samples.push(started.elapsed());
        }
    }
    Ok(samples)
}

/// A new connection and one 1 KiB round trip on it; the connection is closed when this returns.
async fn connect_round_trip(route: Route, echo: SocketAddr) -> std::io::Result<Duration> {
    let started = Instant::now();
    let mut stream = route.dial(echo).await?;
    let (message, mut back) = ([0x5a; MSG], [0; MSG]);
    stream.write_all(&message).await?;
    stream.read_exact(&mut back).await?;
    Ok(started.elapsed())
}

/// `n` sequential connections.
async fn setups(route: Route, echo: SocketAddr, n: usize) -> std::io::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(connect_round_trip(route, echo).await?);
    }
    Ok(samples)
}

/// Connections (each with one round trip) per second, `concurrency` at a time for `period`.
async fn connection_rate(route: Route, echo: SocketAddr, concurrency: usize, period: Duration) -> std::io::Result<f64> {
    let started = Instant::now();
    let deadline = started + period;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                connect_round_trip(route, echo).await?;
                done += 1;
            }
            std::io::Result::Ok(done)
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.map_err(std::io::Error::other)??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The measurements, in table order: name, unit, and one value per round for each route.
struct Metric {
    name: String,
    unit: &'static str,
    higher_is_better: bool,
    direct: Vec<f64>,
    mesh: Vec<f64>,
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

fn label(route: Route) -> &'static str {
    if matches!(route, Route::Direct) { "direct" } else { "mesh" }
}

/// Awaits one measurement, bounded by MEASUREMENT_TIMEOUT.
async fn within<T>(what: &str, route: Route, f: impl Future<Output = std::io::Result<T>>) -> anyhow::Result<T> {
    let what = format!("{what} ({})", label(route));
    tokio::time::timeout(MEASUREMENT_TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("{what}: no result after {MEASUREMENT_TIMEOUT:?}"))?
        .context(what)
}

async fn measure(plan: &Plan, servers: Servers, mesh: Option<Route>) -> anyhow::Result<Vec<Metric>> {
    let mut metrics: Vec<Metric> = Vec::new();
    let mut record = |index: usize, name: String, unit, higher_is_better, route: Route, value: f64| {
        if metrics.len() <= index {
            metrics.push(Metric { name, unit, higher_is_better, direct: Vec::new(), mesh: Vec::new() });
        }
        match route {
            Route::Direct => metrics[index].direct.push(value),
            Route::Mesh(_) => metrics[index].mesh.push(value),
        }
    };
    let routes: Vec<Route> = [Some(Route::Direct), mesh].into_iter().flatten().collect();
    let (sink, echo, streams) = (servers.sink, servers.echo, plan.streams);

    eprintln!("warming up");
    for &route in &routes {
        within("warm-up bulk", route, bulk(route, sink, plan.bulk_bytes / 8, streams)).await?;
        within("warm-up ping-pong", route, ping_pong(route, echo, 1000)).await?;
    }

    let mib = plan.bulk_bytes >> 20;
    for round in 1..=plan.rounds {
        eprintln!("round {round}/{}", plan.rounds);
        for &route in &routes {
            let mbps = within("bulk, 1 stream", route, bulk(route, sink, plan.bulk_bytes, 1)).await?;
            eprintln!("  bulk, 1 stream    {:6} {mbps:>9.0} MB/s", label(route));
            record(0, format!("bulk, 1 stream, {mib} MiB"), "MB/s", true, route, mbps);
        }
        for &route in &routes {
            let mbps = within("bulk, N streams", route, bulk(route, sink, plan.bulk_bytes, streams)).await?;
            eprintln!("  bulk, {streams} streams   {:6} {mbps:>9.0} MB/s", label(route));
            let name = format!("bulk, {streams} streams, {streams} × {} MiB", mib / streams as u64);
            record(1, name, "MB/s", true, route, mbps);
        }
        for &route in &routes {
            let mut samples = within("ping-pong", route, ping_pong(route, echo, plan.round_trips)).await?;
            samples.sort();
            let ps = [50.0, 90.0, 99.0, 99.9].map(|p| percentile(&samples, p));
            eprintln!("  1 KiB round trip  {:6} p50 {:.1} µs, p99 {:.1} µs", label(route), ps[0], ps[2]);
            for (i, (p, value)) in ["p50", "p90", "p99", "p99.9"].into_iter().zip(ps).enumerate() {
                record(2 + i, format!("1 KiB round trip {p}"), "µs", false, route, value);
            }
        }
        for &route in &routes {
            let mut samples = within("connection setup", route, setups(route, echo, plan.setups)).await?;
            samples.sort();
            let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
            eprintln!("  connect + RTT     {:6} p50 {p50:.1} µs, p99 {p99:.1} µs", label(route));
            record(6, "new connection + 1 KiB round trip p50".into(), "µs", false, route, p50);
            record(7, "new connection + 1 KiB round trip p99".into(), "µs", false, route, p99);
        }
        for &route in &routes {
            let (c, period) = (plan.rate_concurrency, plan.rate_for);
            let rate = within("connection rate", route, connection_rate(route, echo, c, period)).await?;
            eprintln!("  connections/s     {:6} {rate:>9.0}", label(route));
            record(8, format!("connections/s, {c} at a time for {period:?}"), "conn/s", true, route, rate);
        }
    }
    Ok(metrics)
}

fn render(plan: &Plan, args: &Args, metrics: &[Metric]) -> String {
    let date = command_output("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default();
    let profile = if cfg!(debug_assertions) { "debug build (numbers not representative)" } else { "release build" };
    let mut flags = String::new();
    for (on, flag) in [(args.quick, " --quick"), (args.direct_only, " --direct-only")] {
        if on {
            flags.push_str(flag);
        }
    }
    let mut s = "## Tunnel: direct TCP vs. two Trellis proxies\n\n".to_owned();
    s.push_str(&wrap(&format!("`{COMMAND}{flags}` — {date}, {}, {profile}.", revision())));
    s.push_str(&wrap(&format!("Machine: {}.", machine())));
    s.push_str(&wrap(&format!(
        "A sink and an echo server run as tokio tasks in the benchmark process on {sip}, the address of the server \
         proxy's workload. **direct**: TCP straight to them. **mesh**: SOCKS5 CONNECT to the client proxy, which \
         carries the connection over HBONE (mTLS, HTTP/2 CONNECT) to the server proxy, which dials the server; \
         passthrough is denied, so nothing bypasses the tunnel. For each measurement direct and mesh alternate, \
         {rounds} rounds; a cell is the median over the rounds with (min..max). The benchmark process, both proxies \
         and the control plane share the machine's CPUs.",
        sip = IpAddr::from(SERVER_IP),
        rounds = plan.rounds,
    )));
    s.push_str("| measurement | direct | mesh | mesh vs. direct |\n| --- | ---: | ---: | ---: |\n");
    for m in metrics {
        let versus = if m.direct.is_empty() || m.mesh.is_empty() {
            "–".into()
        } else if m.higher_is_better {
            format!("{:.2}×", median(&m.mesh) / median(&m.direct))
        } else {
            let added = median(&m.mesh) - median(&m.direct);
            format!("{}{} {}", if added >= 0.0 { "+" } else { "" }, number(added), m.unit)
        };
        s.push_str(&format!("| {} ({}) | {} | {} | {versus} |\n", m.name, m.unit, cell(&m.direct), cell(&m.mesh)));
    }
    s.push('\n');
    s.push_str(&wrap(&format!(
        "MB = 10⁶ bytes. Bulk: each stream's connection is open before timing starts; timing runs from the first \
         byte until every sink has read its exact share and answered a byte. Round trips: {rt} per round on one \
         connection, after 100 unrecorded; \"+\" is the latency the mesh adds over direct. New connection: {setups} \
         sequential per round, timed from connect (or SOCKS5 handshake) to the end of the round trip.",
        rt = number(plan.round_trips as f64),
        setups = number(plan.setups as f64),
    )));
    s
}
