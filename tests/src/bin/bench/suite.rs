//! `trellis-bench all [--smoke] [--quick] [--only N,N] [--worker-threads N] [--bulk-mib N] [--ztunnel PATH]
//! [--no-build]`: every scenario against every contender, on this machine, in one run. Contenders: direct TCP, Trellis
//! (two proxies, HBONE mTLS), a stunnel4 pair and an HAProxy pair (both mutual TLS 1.3 with ECDSA P-256). Each
//! measurement alternates the contenders (A B C D, A B C D, …) for several rounds and reports the median with
//! (min..max). Writes the "targets" and "suite" sections of BENCHMARKS.md and PNG plots into docs/bench/; `--smoke`
//! runs every scenario at tiny sizes in about ten seconds and writes nothing but temporary plots, as do `--quick`
//! (three shorter rounds), `--only` (some scenarios at full size), `--worker-threads` (the proxies' runtime threads,
//! an experiment) and `--bulk-mib` (a longer bulk transfer, to profile). Nothing asserts on timings.
//!
//! `--ztunnel PATH` measures Trellis against that ztunnel binary instead, both on simulated hosts with the client's
//! traffic redirected to the client-side proxy (`netpath.rs`), with direct TCP between hosts as the baseline: the
//! data-plane scenarios, plus single-stream throughput server→client with the proxies' CPU per GB (and its system
//! share: how much of it the kernel spends) and 16-connection closed-loop HTTP; targets of issue 19. `--worker-threads N` then sets both proxies' worker threads. Writes nothing.
//!
//! `--proxy-b PATH` measures two builds of the proxy against each other on loopback (e.g. another allocator,
//! BENCHMARKS.md "Allocator"): "Trellis" runs the workspace's `trellis-proxy`, "Trellis B" a mesh of its own with
//! that executable, alternated round by round with direct TCP as the baseline; stunnel and HAProxy are left out.
//! With `--ztunnel` too, "Trellis B" is a fourth contender on the namespace path (its own two hosts, the same
//! control plane), so a before/after pair is measured beside ztunnel in the same rounds. Writes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::signal::unix::{SignalKind, signal};

use super::contenders::{self, Contender, Route};
use super::report::{cell, machine, median, number, revision, wrap, write_section};
use super::{control, idle, load, plot, procfs};
use crate::common;

const COMMAND: &str = "cargo run --release -p trellis-tests --bin trellis-bench -- all";
const PERCENTILES: [(f64, &str); 4] = [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")];
const MEASUREMENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections of the closed-loop HTTP measurement (`--ztunnel` runs).
const CLOSED_LOOP: usize = 16;

/// Sizes of one run.
struct Plan {
    rounds: usize,
    bulk_bytes: u64,
    streams: usize,
    rates: [u32; 2],
    connections: usize,
    warmup: Duration,
    period: Duration,
    churn_concurrency: usize,
    churn_for: Duration,
    idle: usize,
    /// Quiet time before idle RSS is read, the same for every contender; then each process is read once its RSS
    /// holds still (`idle.rs`). Long enough that Trellis's last housekeeping after a burst (about 20 s: surplus
    /// pooled connections closed, then a quiet period, then the trim) falls inside the steadiness window.
    settle: Duration,
    /// Readings a second apart that must agree before an idle process is read (`idle::STEADY_READINGS`).
    steady_readings: usize,
    control: control::Plan,
}

/// Five rounds and 10 s periods: a p99 over 4 s at 1000 requests/s rests on its 40 slowest requests, and on two
/// shared vCPUs it swung by 2× between runs of the same build; 1 GiB transfers last long enough that direct
/// loopback's (about 0.3 s) is not a scheduling accident.
const FULL: Plan = Plan {
    rounds: 5,
    bulk_bytes: 1 << 30,
    streams: 8,
    rates: [1000, 4000],
    connections: 4,
    warmup: Duration::from_millis(500),
    period: Duration::from_secs(10),
    churn_concurrency: 8,
    churn_for: Duration::from_secs(2),
    idle: 10_000,
    settle: Duration::from_secs(15),
    steady_readings: idle::STEADY_READINGS,
    control: control::Plan::DEFAULT,
};

/// `--quick`: three rounds (the fewest a median of alternated rounds is worth), shorter periods and transfers.
const QUICK: Plan = Plan {
    rounds: 3,
    bulk_bytes: 256 << 20,
    streams: 8,
    rates: [1000, 5000],
    connections: 4,
    warmup: Duration::from_millis(500),
    period: Duration::from_secs(4),
    churn_concurrency: 4,
    churn_for: Duration::from_secs(2),
    idle: 2_000,
    settle: Duration::from_secs(15),
    steady_readings: idle::STEADY_READINGS,
    control: FULL.control,
};

const SMOKE: Plan = Plan {
    rounds: 1,
    bulk_bytes: 4 << 20,
    streams: 8,
    rates: [1000, 4000],
    connections: 4,
    warmup: Duration::from_millis(50),
    period: Duration::from_millis(250),
    churn_concurrency: 4,
    churn_for: Duration::from_millis(200),
    idle: 50,
    settle: Duration::from_millis(100),
    steady_readings: 1,
    control: control::Plan {
        proxies: 20,
        csr_clients: 5,
        rounds: 1,
        sign_for: Duration::from_millis(300),
        replicas: 0,
        ack_only: false,
    },
};

/// `--only 4,5`: just those scenarios, at full size, writing nothing (to try one out).
struct Options {
    smoke: bool,
    no_build: bool,
    only: Option<Vec<u8>>,
    /// `--bulk-mib N`: scenario 1's size per measurement, to hold a transfer long enough to profile.
    bulk_bytes: Option<u64>,
    /// `--ztunnel PATH`: Trellis against that ztunnel binary on the simulated hosts of `netpath.rs`.
    ztunnel: Option<PathBuf>,
    /// `--quick`: three rounds of shorter measurements (a first look; with --ztunnel on a busy machine).
    quick: bool,
    /// `--proxy-b PATH`: a second Trellis contender ("Trellis B") whose proxies run that executable.
    proxy_b: Option<PathBuf>,
}

impl Options {
    fn wants(&self, scenario: u8) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(&scenario))
    }

    /// Whether this run leaves BENCHMARKS.md and docs/bench alone (a run with a non-default proxy setting
    /// measures an experiment, not Trellis as shipped).
    fn dry(&self) -> bool {
        self.smoke
            || self.quick
            || self.only.is_some()
            || self.bulk_bytes.is_some()
            || self.ztunnel.is_some()
            || self.proxy_b.is_some()
            || contenders::proxy_worker_threads().is_some()
    }
}

const USAGE: &str = "trellis-bench all [--smoke] [--quick] [--only N,N] [--worker-threads N] [--bulk-mib N] [--ztunnel PATH] [--proxy-b PATH] [--no-build]";

pub fn main(argv: &[String]) -> ExitCode {
    let mut options = Options {
        smoke: false,
        no_build: false,
        only: None,
        bulk_bytes: None,
        ztunnel: None,
        quick: false,
        proxy_b: None,
    };
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => options.smoke = true,
            "--quick" => options.quick = true,
            "--ztunnel" => match args.next().map(PathBuf::from) {
                Some(path) if path.is_file() => options.ztunnel = Some(path),
                Some(path) => {
                    eprintln!("trellis-bench all: --ztunnel {}: no such file (a ztunnel binary)", path.display());
                    return ExitCode::from(2);
                }
                None => {
                    eprintln!("trellis-bench all: --ztunnel takes the path of a ztunnel binary");
                    return ExitCode::from(2);
                }
            },
            "--proxy-b" => match args.next().map(PathBuf::from) {
                Some(path) if path.is_file() => options.proxy_b = Some(path),
                Some(path) => {
                    eprintln!("trellis-bench all: --proxy-b {}: no such file (a trellis-proxy binary)", path.display());
                    return ExitCode::from(2);
                }
                None => {
                    eprintln!("trellis-bench all: --proxy-b takes the path of a trellis-proxy binary");
                    return ExitCode::from(2);
                }
            },
            "--no-build" => options.no_build = true,
            "--only" => {
                let list = args.next().map(|l| l.split(',').map(str::parse).collect::<Result<Vec<u8>, _>>());
                match list {
                    Some(Ok(list)) => options.only = Some(list),
                    _ => {
                        eprintln!("trellis-bench all: --only takes scenario numbers, e.g. --only 4,5");
                        return ExitCode::from(2);
                    }
                }
            }
            "--worker-threads" => match args.next().map(|n| n.parse::<u64>()) {
                Some(Ok(n)) => contenders::set_proxy_worker_threads(n),
                _ => {
                    eprintln!("trellis-bench all: --worker-threads takes a number (the proxies' workerThreads)");
                    return ExitCode::from(2);
                }
            },
            "--bulk-mib" => match args.next().map(|n| n.parse::<u64>()) {
                Some(Ok(n)) if n > 0 => options.bulk_bytes = Some(n << 20),
                _ => {
                    eprintln!(
                        "trellis-bench all: --bulk-mib takes a number of MiB (scenario 1's size per measurement)"
                    );
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("trellis-bench all: unknown argument {other:?}\nusage: {USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ntrellis-bench all: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every value measured, keyed by (measurement, contender), one per round.
#[derive(Default)]
struct Results {
    values: BTreeMap<(String, String), Vec<f64>>,
    notes: Vec<String>,
}

impl Results {
    /// A note for the report, once however many rounds make it.
    fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    fn push(&mut self, metric: &str, contender: &str, value: f64) {
        self.values.entry((metric.into(), contender.into())).or_default().push(value);
    }

    fn get(&self, metric: &str, contender: &str) -> &[f64] {
        self.values.get(&(metric.to_owned(), contender.to_owned())).map(Vec::as_slice).unwrap_or(&[])
    }

    fn median(&self, metric: &str, contender: &str) -> f64 {
        let v = self.get(metric, contender);
        if v.is_empty() { f64::NAN } else { median(v) }
    }

    fn cell(&self, metric: &str, contender: &str) -> String {
        cell(self.get(metric, contender))
    }

    /// Round by round, the contender's value minus direct's (the rounds alternate, so they pair up).
    fn added(&self, metric: &str, contender: &str) -> Vec<f64> {
        self.get(metric, contender).iter().zip(self.get(metric, DIRECT)).map(|(c, d)| c - d).collect()
    }
}

const DIRECT: &str = "direct";
const ZTUNNEL: &str = "ztunnel";

fn run(options: &Options) -> anyhow::Result<()> {
    let smoke = options.smoke;
    let mut plan = if smoke {
        SMOKE
    } else if options.quick {
        QUICK
    } else {
        FULL
    };
    if let Some(bytes) = options.bulk_bytes {
        plan.bulk_bytes = bytes;
    }
    if options.ztunnel.is_some() {
        // Issue 19's rates.
        plan.rates = [1000, 5000];
    }
    let plan = &plan;
    // Before anything writes BENCHMARKS.md, which would make the tree look modified.
    let header = {
        let date = super::report::command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
        let profile = if cfg!(debug_assertions) { "debug build (numbers not representative)" } else { "release build" };
        let mut flags = String::new();
        for (on, flag) in [(smoke, " --smoke"), (options.quick, " --quick")] {
            if on {
                flags.push_str(flag);
            }
        }
        if let Some(n) = contenders::proxy_worker_threads() {
            flags.push_str(&format!(" --worker-threads {n}"));
        }
        if let Some(path) = &options.ztunnel {
            flags.push_str(&format!(" --ztunnel {}", path.display()));
        }
        if let Some(path) = &options.proxy_b {
            flags.push_str(&format!(" --proxy-b {}", path.display()));
        }
        format!("`{COMMAND}{flags}` — started {date}, {}, {profile}", revision())
    };
    let mut versions = match &options.ztunnel {
        Some(path) => vec![format!("ztunnel: `{}`", super::ztunnel::version(path))],
        None => contenders::versions(),
    };
    versions.push(format!("Trellis: {} (rustls, aws-lc-rs)", revision()));
    let stamp = Stamp { header, versions };
    // Every connection of the idle-connection scenario is a descriptor here and in the proxies (which inherit it).
    let wanted_nofile = 4 * plan.idle as u64 + 4 * plan.control.proxies as u64 + 4096;
    let nofile = procfs::raise_open_files(wanted_nofile);
    if options.ztunnel.is_none() && options.proxy_b.is_none() {
        contenders::ensure_tools()?;
    }
    common::prepare(options.no_build, |line| eprintln!("{line}"))?;
    let work = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (mut sigint, mut sigterm) = {
        let _context = runtime.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    let (all, guard, logs, threads) = match &options.ztunnel {
        Some(binary) => {
            let (all, path) = super::netpath::start(binary, options.proxy_b.as_deref(), work.path())?;
            let (logs, threads) = (path.logs.clone(), path.threads.clone());
            let guard: Box<dyn std::any::Any> = Box::new(path);
            (all, guard, logs, threads)
        }
        None => loopback(work.path(), nofile, options.proxy_b.as_deref())?,
    };
    let mut results = Results::default();
    for line in threads {
        results.notes.push(format!("threads of {line}"));
    }
    results.notes.push(super::link_order::note(&trellis_tests::bin("trellis-proxy")));
    if let Some(proxy_b) = &options.proxy_b {
        results.notes.push(super::link_order::note(proxy_b));
    }
    results.notes.push(format!(
        "open-files limit of the benchmark process, inherited by the proxies: {nofile}{}",
        if nofile < wanted_nofile { " (its hard limit here; raising that is not permitted)" } else { "" }
    ));

    let measured = runtime.block_on(async {
        tokio::select! {
            r = measure_data_plane(plan, options, &all, &mut results) => r,
            _ = sigint.recv() => bail!("interrupted (SIGINT)"),
            _ = sigterm.recv() => bail!("interrupted (SIGTERM)"),
        }
    });
    if let Err(e) = measured {
        let mut message = format!("{e:#}");
        for (name, log) in logs {
            let text = trellis_tests::read_log(&log);
            let tail: Vec<&str> = text.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            message.push_str(&format!("\n--- last lines of the {name} log ---\n{}", tail.join("\n")));
        }
        bail!(message);
    }
    drop(guard);

    let control = if !options.wants(5) || options.ztunnel.is_some() {
        control::Results::default()
    } else {
        eprintln!("scenario 5: control plane, {} simulated proxies", plan.control.proxies);
        runtime.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(600), control::run(&plan.control)) => r.map_err(|_| anyhow!("control-plane scenario: no result after 600s"))?,
            _ = sigint.recv() => bail!("interrupted (SIGINT)"),
            _ = sigterm.recv() => bail!("interrupted (SIGTERM)"),
        }
        })?
    };

    let plots_dir = if options.dry() { work.path().join("plots") } else { root().join("docs/bench") };
    std::fs::create_dir_all(&plots_dir)?;
    let plots = draw(&plots_dir, plan, &all, &results, &control)?;
    let names: Vec<&str> = all.iter().map(|c| c.name).collect();
    let path = root().join("BENCHMARKS.md");
    // Everything else is written before the policy micro-benchmark runs (it takes minutes), with the table the
    // authz section holds; then again with the fresh one.
    let stored = stored_authz_table();
    let (mut targets, mut suite) = render(plan, &stamp, &names, &results, &control, &stored, false, &plots);
    if !options.dry() {
        write_section(&path, "targets", &targets)?;
        write_section(&path, "suite", &suite)?;
        eprintln!(
            "wrote the targets and suite sections of {} and {} plots in {}",
            path.display(),
            plots.len(),
            plots_dir.display()
        );
    }
    let mut authz_failure = None;
    if !smoke && options.wants(6) && options.ztunnel.is_none() {
        eprintln!("scenario 6: policy evaluation micro-benchmark (cargo bench -p trellis-policy --bench authz)");
        // A failure is a row of the table as well as the exit status, once everything else is written.
        let fresh = run_authz_bench().unwrap_or_else(|failure| {
            let row = vec!["| failed |".into(), "| --- |".into(), format!("| {failure} |")];
            authz_failure = Some(failure);
            row
        });
        (targets, suite) = render(plan, &stamp, &names, &results, &control, &fresh, true, &plots);
        if !options.dry() {
            write_section(&path, "suite", &suite)?;
            eprintln!("rewrote the suite section with the fresh policy table");
        }
    }
    println!("{targets}\n{suite}");
    if let Some(failure) = authz_failure {
        anyhow::bail!("scenario 6, the policy micro-benchmark: {failure}");
    }
    if options.dry() {
        eprintln!(
            "(--smoke, --only, --worker-threads or --bulk-mib: BENCHMARKS.md and docs/bench left as they are; plots drawn in {})",
            plots_dir.display()
        );
    }
    Ok(())
}

/// The contenders, what keeps them running (dropped when the data-plane scenarios end), the proxies' logs (shown
/// when a measurement fails) and their threads (for the report).
type Setup = (Vec<Contender>, Box<dyn std::any::Any>, Vec<(&'static str, PathBuf)>, Vec<String>);

/// Today's contenders on loopback: direct TCP, Trellis (SOCKS5), stunnel and HAProxy; with what keeps them running,
/// Trellis's logs and its threads. With `proxy_b`, direct TCP, Trellis and "Trellis B" (that proxy executable).
fn loopback(dir: &Path, nofile: u64, proxy_b: Option<&Path>) -> anyhow::Result<Setup> {
    let server_process = load::Servers::start()?;
    let servers = server_process.ports;
    eprintln!("sink on {}, HTTP responder on {} (`trellis-bench servers`)", servers.sink, servers.http);

    let (trellis, mesh) = contenders::start_trellis(servers, "Trellis", None)?;
    if let Some(binary) = proxy_b {
        let (b, mesh_b) = contenders::start_trellis(servers, "Trellis B", Some(binary))?;
        let direct = Contender {
            name: DIRECT,
            route: Route::Direct(servers),
            pids: vec![],
            fds_per_connection: 0,
            max_connections: None,
        };
        let logs = vec![
            ("client proxy", mesh.client.log_path()),
            ("server proxy", mesh.server.log_path()),
            ("client proxy B", mesh_b.client.log_path()),
            ("server proxy B", mesh_b.server.log_path()),
        ];
        let threads = [("", &mesh), (" B", &mesh_b)]
            .into_iter()
            .flat_map(|(b, m)| [("client", m.client.pid(), b), ("server", m.server.pid(), b)])
            .filter_map(|(side, pid, b)| Some(format!("Trellis{b} {side}: {}", procfs::thread_names(pid?).ok()?)))
            .collect();
        return Ok((vec![direct, trellis, b], Box::new((mesh, mesh_b, server_process)), logs, threads));
    }

    let certs = contenders::Certs::generate(dir)?;
    let (stunnel, stunnel_daemons) = contenders::start_stunnel(dir, &certs, servers)?;
    let (haproxy, haproxy_daemons) =
        contenders::start_haproxy(dir, &certs, servers, (nofile.saturating_sub(200) / 2).min(40_000))?;
    let all = vec![
        Contender {
            name: DIRECT,
            route: Route::Direct(servers),
            pids: vec![],
            fds_per_connection: 0,
            max_connections: None,
        },
        trellis,
        stunnel,
        haproxy,
    ];
    let logs = vec![("client proxy", mesh.client.log_path()), ("server proxy", mesh.server.log_path())];
    let threads = [("client", mesh.client.pid()), ("server", mesh.server.pid())]
        .into_iter()
        .filter_map(|(side, pid)| Some(format!("Trellis {side}: {}", procfs::thread_names(pid?).ok()?)))
        .collect();
    Ok((all, Box::new((mesh, stunnel_daemons, haproxy_daemons, server_process)), logs, threads))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn within<T>(what: &str, c: &Contender, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let what = format!("{what} ({})", c.name);
    tokio::time::timeout(MEASUREMENT_TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("{what}: no result after {MEASUREMENT_TIMEOUT:?}"))?
        .context(what)
}

fn cpu(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&pid| procfs::cpu_seconds(pid)).sum()
}

fn cpu_times(pids: &[u32]) -> anyhow::Result<procfs::CpuTimes> {
    pids.iter().map(|&pid| procfs::cpu_times(pid)).sum()
}

fn rss(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|&pid| procfs::rss_bytes(pid)).sum()
}

async fn measure_data_plane(
    plan: &Plan,
    options: &Options,
    all: &[Contender],
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!("checking every route, warming up");
    for c in all {
        let (open, error) = load::idle_connections(c.route, 1, 1).await;
        if let Some(e) = error.or_else(|| open.is_empty().then(|| "no connection".into())) {
            bail!("a first request through {} ({}): {e}", c.name, load::describe(c.route));
        }
        within("warm-up bulk", c, async { Ok(load::bulk(c.route, plan.bulk_bytes / 8, plan.streams).await?) }).await?;
    }
    idle_rss(plan, all, "after the warm-up", results).await?;

    eprintln!("scenario 1: bulk throughput");
    // Against ztunnel, the single stream runs both ways (the server→client one is "bulk 1 back").
    let versus = options.ztunnel.is_some();
    let mut kinds = vec![("bulk 1".to_owned(), 1, false)];
    if versus {
        kinds.push(("bulk 1 back".to_owned(), 1, true));
    }
    kinds.push((format!("bulk {}", plan.streams), plan.streams, false));
    for round in (1..=plan.rounds).filter(|_| options.wants(1)) {
        for (metric, streams, back) in &kinds {
            let (metric, streams, back) = (metric.as_str(), *streams, *back);
            for c in all {
                let cpu_before = cpu_times(&c.pids)?;
                let mbps = within("bulk", c, async {
                    Ok(if back {
                        load::bulk_reverse(c.route, plan.bulk_bytes, streams).await?
                    } else {
                        load::bulk(c.route, plan.bulk_bytes, streams).await?
                    })
                })
                .await?;
                let used = cpu_times(&c.pids)? - cpu_before;
                let cpu_used = used.user + used.system;
                let system = if cpu_used > 0.0 { used.system / cpu_used } else { 0.0 };
                eprintln!(
                    "  round {round}, {metric:12} {:8} {mbps:>8.0} MB/s, proxies' CPU {cpu_used:.2} s ({:.0} % system)",
                    c.name,
                    system * 100.0
                );
                results.push(metric, c.name, mbps);
                if !c.pids.is_empty() {
                    // CPU seconds per GB moved, both proxies together, and the kernel's share of them.
                    results.push(&format!("{metric} cpu"), c.name, cpu_used / (plan.bulk_bytes as f64 / 1e9));
                    results.push(&format!("{metric} system"), c.name, system * 100.0);
                }
            }
        }
    }

    eprintln!("scenario 2: latency at a fixed request rate (and scenario 4: CPU per request)");
    for rate in plan.rates.into_iter().filter(|_| options.wants(2)) {
        for round in 1..=plan.rounds {
            for c in all {
                let cpu_before = cpu(&c.pids)?;
                let (route, n, warmup, period) = (c.route, plan.connections, plan.warmup, plan.period);
                let run = within("fixed rate", c, async {
                    tokio::task::spawn_blocking(move || load::fixed_rate(route, rate, n, warmup, period)).await?
                })
                .await?;
                let cpu_used = cpu(&c.pids)? - cpu_before;
                let ps = PERCENTILES.map(|(p, _)| run.latencies.value_at_quantile(p / 100.0) as f64 / 1e3);
                eprintln!(
                    "  round {round}, {rate} req/s, {:8} p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
                    c.name, ps[0], ps[2], ps[3]
                );
                for ((_, name), value) in PERCENTILES.iter().zip(ps) {
                    results.push(&format!("rate {rate} {name}"), c.name, value);
                }
                if !c.pids.is_empty() {
                    results.push(&format!("cpu {rate}"), c.name, cpu_used / (run.sent as f64 / 1000.0));
                }
            }
        }
    }

    if versus {
        eprintln!("scenario 2b: HTTP, {CLOSED_LOOP} connections closed loop");
        for round in (1..=plan.rounds).filter(|_| options.wants(2)) {
            for c in all {
                let cpu_before = cpu(&c.pids)?;
                let rate =
                    within("closed loop", c, async { Ok(load::closed_loop(c.route, CLOSED_LOOP, plan.period).await?) })
                        .await?;
                let cpu_used = cpu(&c.pids)? - cpu_before;
                eprintln!("  round {round}, {:8} {rate:>8.0} req/s, proxies' CPU {cpu_used:.2} s", c.name);
                results.push("closed loop", c.name, rate);
            }
        }
    }

    eprintln!("scenario 3: connection churn");
    for round in (1..=plan.rounds).filter(|_| options.wants(3)) {
        for c in all {
            let (conc, period) = (plan.churn_concurrency, plan.churn_for);
            let cpu_before = cpu(&c.pids)?;
            let (rate, mut times) = within("churn", c, async { Ok(load::churn(c.route, conc, period).await?) }).await?;
            if !c.pids.is_empty() {
                results.push("churn cpu", c.name, (cpu(&c.pids)? - cpu_before) / (times.len() as f64 / 1000.0));
            }
            times.sort();
            let q = |p: f64| times[((p / 100.0 * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
            let (p50, p99) = (q(50.0).as_secs_f64() * 1e6, q(99.0).as_secs_f64() * 1e6);
            eprintln!("  round {round}, {:8} {rate:>7.0} conn/s, p50 {p50:.0} µs, p99 {p99:.0} µs", c.name);
            results.push("churn rate", c.name, rate);
            results.push("churn p50", c.name, p50);
            results.push("churn p99", c.name, p99);
        }
    }

    eprintln!("scenario 4: memory with up to {} idle connections", plan.idle);
    for round in (1..=plan.rounds).filter(|_| options.wants(4)) {
        // Every contender quiet for `settle` (the last one's connections closed at least that long ago), then each
        // process read once it holds still: each round adds one idle-RSS sample per process, so the idle targets
        // take medians too.
        idle_rss(plan, all, &format!("before round {round}"), results).await?;
        for c in all.iter().filter(|c| !c.pids.is_empty()) {
            idle_connections(plan, round, c, results).await?;
        }
    }
    Ok(())
}

/// One idle-RSS sample per process of every contender, read by `idle::settled_rss`'s rule; prints when each was read.
/// The first one, after the warm-up, comes before any burst.
async fn idle_rss(plan: &Plan, all: &[Contender], when: &str, results: &mut Results) -> anyhow::Result<()> {
    let pids: Vec<u32> = all.iter().flat_map(|c| c.pids.iter().copied()).collect();
    let readings = idle::settled_rss(&pids, plan.settle, plan.steady_readings).await?;
    let mut readings = readings.into_iter();
    for c in all {
        let mut shown = Vec::new();
        for (i, reading) in (0..c.pids.len()).zip(readings.by_ref()) {
            results.push(&format!("idle RSS {i}"), c.name, reading.bytes as f64 / 1e6);
            shown.push(format!(
                "{:.1} MB at {:.0} s{}",
                reading.bytes as f64 / 1e6,
                reading.after.as_secs_f64(),
                if reading.steady { "" } else { " (never steady)" }
            ));
            if !reading.steady {
                results.note(format!(
                    "{} (pid {}): RSS did not hold still within {} s of the quiet time; its last reading counted",
                    c.name,
                    reading.pid,
                    idle::MAX_WAIT.as_secs()
                ));
            }
        }
        if !shown.is_empty() {
            eprintln!("  idle RSS {when}, {:8} {}", c.name, shown.join(", "));
        }
    }
    Ok(())
}

/// One contender's round of scenario 4: open as many idle connections as it can hold (up to `plan.idle`), read
/// the RSS of its processes before and with them, close them.
async fn idle_connections(plan: &Plan, round: usize, c: &Contender, results: &mut Results) -> anyhow::Result<()> {
    // Open no more than every process's open-files limit allows (HAProxy stops accepting at its maxconn).
    let mut target = plan.idle;
    for &pid in &c.pids {
        let limit = procfs::open_files_limit(pid)?;
        let fit = (limit.saturating_sub(256) / c.fds_per_connection) as usize;
        if fit < target {
            target = fit;
            results.note(format!(
                "{} (pid {pid}) may hold {limit} open files, which limits it to {fit} idle connections instead of {}",
                c.name,
                count(plan.idle)
            ));
        }
    }
    // Less a margin: connections it is still closing count against its cap.
    if let Some(max) = c.max_connections.filter(|max| max.saturating_sub(100) < target) {
        target = max.saturating_sub(100);
        results.note(format!(
            "{} allows itself {max} clients (125/256 of its open-files limit), so it gets {target} idle connections",
            c.name
        ));
    }
    let before = rss(&c.pids)?;
    let (open, error) =
        within("idle connections", c, async { Ok(load::idle_connections(c.route, target, 64).await) }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss(&c.pids)?;
    let each: Vec<String> = c
        .pids
        .iter()
        .map(|&pid| procfs::rss_bytes(pid).map(|b| format!("{:.1}", b as f64 / 1e6)))
        .collect::<anyhow::Result<_>>()?;
    let opened = open.len();
    if let Some(e) = error {
        results.note(format!("{}: opened only {opened} of {target} idle connections: {e}", c.name));
    }
    drop(open);
    let per = (after as f64 - before as f64) / opened.max(1) as f64 / 1024.0;
    eprintln!(
        "  round {round}, {:8} {opened} connections: RSS {:.1} → {:.1} MB ({} MB by pid {:?}), {per:.1} KiB per connection",
        c.name,
        before as f64 / 1e6,
        after as f64 / 1e6,
        each.join(" + "),
        c.pids
    );
    results.push("idle conns opened", c.name, opened as f64);
    results.push("idle conns rss before", c.name, before as f64 / 1e6);
    results.push("idle conns rss", c.name, after as f64 / 1e6);
    results.push("idle conns per conn", c.name, per);
    // Let the proxies close the connections before the next contender.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// The table lines of `text`.
fn table_lines(text: &str) -> Vec<String> {
    text.lines().filter(|l| l.starts_with('|')).map(str::to_owned).collect()
}

/// The policy micro-benchmark's table that BENCHMARKS.md holds (what a run shows until, or unless, it runs it).
fn stored_authz_table() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("BENCHMARKS.md")).unwrap_or_default();
    let section = text.split("<!-- authz:begin -->").nth(1).and_then(|s| s.split("<!-- authz:end -->").next());
    let lines = table_lines(section.unwrap_or_default());
    if lines.is_empty() {
        return vec!["| policies in scope | check |".into(), "| --- | --- |".into(), "| (not run) | – |".into()];
    }
    lines
}

/// The policy micro-benchmark's table, from a run of `cargo bench`; or why that failed.
fn run_authz_bench() -> Result<Vec<String>, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args(["bench", "-p", "trellis-policy", "--bench", "authz"])
        .stderr(Stdio::inherit())
        .output();
    match out {
        Ok(out) if out.status.success() => Ok(table_lines(&String::from_utf8_lossy(&out.stdout))),
        Ok(out) => Err(format!("cargo bench exited with {}", out.status)),
        Err(e) => Err(format!("running cargo bench: {e}")),
    }
}

/// The plots, as (file name, title).
fn draw(
    dir: &Path,
    plan: &Plan,
    all: &[Contender],
    r: &Results,
    control: &control::Results,
) -> anyhow::Result<Vec<(String, String)>> {
    let names: Vec<&str> = all.iter().map(|c| c.name).collect();
    let mut plots = Vec::new();
    let title = "Bulk throughput (MB/s, median)".to_owned();
    let series = vec![
        ("1 stream", names.iter().map(|n| r.median("bulk 1", n)).collect()),
        ("8 streams", names.iter().map(|n| r.median(&format!("bulk {}", plan.streams), n)).collect()),
    ];
    plot::bars(&dir.join("throughput.png"), &title, "MB/s", &names, &series)?;
    plots.push(("throughput.png".to_owned(), title));
    for rate in plan.rates {
        let title =
            format!("Latency at {rate} requests/s, 1 KiB HTTP/1.1 over {} connections (µs, median)", plan.connections);
        let series: Vec<(&str, Vec<f64>)> = names
            .iter()
            .map(|n| (*n, PERCENTILES.iter().map(|(_, p)| r.median(&format!("rate {rate} {p}"), n)).collect()))
            .collect();
        let file = format!("latency-{rate}.png");
        plot::lines(&dir.join(&file), &title, "µs", &PERCENTILES.map(|(_, p)| p), &series)?;
        plots.push((file, title));
    }
    let title = "Connection churn: new connections per second (median)".to_owned();
    plot::bars(
        &dir.join("churn.png"),
        &title,
        "connections/s",
        &names,
        &[("conn/s", names.iter().map(|n| r.median("churn rate", n)).collect())],
    )?;
    plots.push(("churn.png".to_owned(), title));
    if !control.last_round_ms.is_empty() {
        let title = format!("Policy convergence: ACK time of each of {} proxies, last round (ms)", control.proxies);
        let ms = &control.last_round_ms;
        let points = ["p10", "p25", "p50", "p75", "p90", "p99", "max"];
        let qs = [10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 100.0]
            .map(|p| ms[((p / 100.0 * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1]);
        plot::lines(
            &dir.join("convergence.png"),
            &title,
            "ms after trellisctl apply",
            &points,
            &[("ACK", qs.to_vec())],
        )?;
        plots.push(("convergence.png".to_owned(), title));
    }
    Ok(plots)
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 { format!("{:.2}×", a / b) } else { "–".into() }
}

/// The median of differences, with its sign.
fn signed(values: &[f64]) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let m = median(values);
    format!("{}{}", if m >= 0.0 { "+" } else { "" }, number(m))
}

/// A count: 10000 → "10,000", never with decimals.
fn count(n: usize) -> String {
    if n < 100 { n.to_string() } else { number(n as f64) }
}

fn mb(value: f64) -> String {
    if value.is_finite() { format!("{value:.1}") } else { "–".into() }
}

/// The targets table and the results section.
/// What a run says about itself, taken at its start (before it writes BENCHMARKS.md, which would make the tree
/// look modified).
struct Stamp {
    header: String,
    versions: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
fn render(
    plan: &Plan,
    stamp: &Stamp,
    names: &[&str],
    r: &Results,
    control: &control::Results,
    authz: &[String],
    authz_fresh: bool,
    plots: &[(String, String)],
) -> (String, String) {
    let header = &stamp.header;
    let proxied: Vec<&str> = names.iter().copied().filter(|n| *n != DIRECT).collect();
    let versus = names.contains(&ZTUNNEL);

    // ---- targets --------------------------------------------------------------------------------------------
    let t = "Trellis";
    let single = |n: &str| r.median("bulk 1", n);
    let added_p99 = |n: &str| {
        let v = r.added("rate 1000 p99", n);
        if v.is_empty() { f64::NAN } else { median(&v) }
    };
    let cpu = |n: &str| r.median("cpu 1000", n);
    let idle_pair = |n: &str| (0..2).map(|i| r.median(&format!("idle RSS {i}"), n)).sum::<f64>();
    // The first sample of each process, read after the warm-up, before any burst.
    let warm_pair =
        |n: &str| (0..2).map(|i| r.get(&format!("idle RSS {i}"), n).first().copied().unwrap_or(f64::NAN)).sum::<f64>();
    let idle_max = (0..2).map(|i| r.median(&format!("idle RSS {i}"), t)).fold(f64::NAN, f64::max);
    let per_conn = r.median("idle conns per conn", t);
    let conv_p99: Vec<f64> = control.convergence.iter().map(|(s, _)| s[1]).collect();
    let conv = if conv_p99.is_empty() { f64::NAN } else { median(&conv_p99) };
    // Converged only if every simulated proxy ACKed in every round.
    let fewest_acked = control.convergence.iter().map(|(_, n)| *n).min().unwrap_or(0);
    let all_acked = !control.convergence.is_empty() && fewest_acked == control.proxies;
    let samples = |metric: &str, n: &str| r.get(metric, n).len();
    let held = |n: &str| count(r.median("idle conns opened", n).round() as usize);
    let row = |target: &str, measured: String, pass: bool| {
        format!("| {target} | {measured} | {} |\n", if pass { "pass" } else { "**FAIL**" })
    };
    let mut targets = format!(
        "## Targets\n\n{}",
        wrap(&format!(
            "From the suite's run below ({header}). Each ratio compares medians of the same run on the same machine."
        ))
    );
    targets.push_str("| target | measured | result |\n| --- | --- | --- |\n");
    // No "≥ 0.4 × direct" row: issue 19 retired it (over loopback every contender's single stream is bound by the
    // cipher and three loopback copies on two cores); `--ztunnel` compares with ztunnel on the same path instead.
    for other in ["stunnel", "HAProxy"] {
        targets.push_str(&row(
            &format!("single-stream throughput ≥ {other}"),
            format!("{} vs. {} MB/s", number(single(t)), number(single(other))),
            single(t) >= single(other),
        ));
    }
    for other in ["stunnel", "HAProxy"] {
        targets.push_str(&row(
            &format!("added p99 latency at 1000 req/s ≤ {other}"),
            format!("{} vs. {} µs", number(added_p99(t)), number(added_p99(other))),
            added_p99(t) <= added_p99(other),
        ));
    }
    targets.push_str(&row(
        "proxy CPU per 1000 requests (at 1000 req/s) ≤ stunnel pair",
        format!("{:.3} vs. {:.3} CPU-s", cpu(t), cpu("stunnel")),
        cpu(t) <= cpu("stunnel"),
    ));
    // Two moments: before any burst, and over every quiet point (most of them after a round of idle connections,
    // which stunnel's glibc keeps for good: its median is then the burst's, not its footprint's).
    targets.push_str(&row(
        "idle RSS of the pair ≤ stunnel pair, before any burst",
        format!("{} vs. {} MB", mb(warm_pair(t)), mb(warm_pair("stunnel"))),
        warm_pair(t) <= warm_pair("stunnel"),
    ));
    targets.push_str(&row(
        "idle RSS of the pair ≤ stunnel pair, every quiet point (bursts behind)",
        format!(
            "{} vs. {} MB (medians of {} samples per process)",
            mb(idle_pair(t)),
            mb(idle_pair("stunnel")),
            samples("idle RSS 0", t)
        ),
        idle_pair(t) <= idle_pair("stunnel"),
    ));
    targets.push_str(&row(
        "RSS with idle connections (pair) ≤ stunnel pair",
        format!(
            "{} MB holding {} connections vs. {} MB holding {} (medians of {} rounds)",
            mb(r.median("idle conns rss", t)),
            held(t),
            mb(r.median("idle conns rss", "stunnel")),
            held("stunnel"),
            samples("idle conns rss", t)
        ),
        r.median("idle conns rss", t) <= r.median("idle conns rss", "stunnel"),
    ));
    targets.push_str(&row(
        "idle RSS < 20 MB per proxy",
        format!("{} MB (larger of the two; medians of {} samples)", mb(idle_max), samples("idle RSS 0", t)),
        idle_max < 20.0,
    ));
    targets.push_str(&row(
        "< 10 KiB per idle tunnelled connection (both proxies)",
        format!(
            "{per_conn:.1} KiB (median of {} rounds of {} connections)",
            samples("idle conns per conn", t),
            held(t)
        ),
        per_conn < 10.0,
    ));
    targets.push_str(&row(
        &format!("policy convergence to {} proxies: every proxy ACKs, p99 < 1 s", count(control.proxies)),
        format!(
            "{conv:.0} ms (median of {} rounds); at least {} of {} ACKed in every round",
            conv_p99.len(),
            count(fewest_acked),
            count(control.proxies)
        ),
        all_acked && conv < 1000.0,
    ));
    targets.push('\n');
    if versus {
        targets = versus_targets(header, plan, r);
    }

    // ---- results --------------------------------------------------------------------------------------------
    let mut s = if versus {
        "## Suite: Trellis against ztunnel on simulated hosts\n\n".to_owned()
    } else {
        "## Suite: Trellis against direct TCP, stunnel and HAProxy\n\n".to_owned()
    };
    s.push_str(&wrap(&format!("{header}.")));
    s.push_str(&wrap(&format!("Machine: {}.", machine())));
    s.push_str(&wrap(&format!("Versions: {}.", stamp.versions.join("; "))));
    s.push_str(&wrap(if versus {
        "Network namespaces on one bridge (`trellis-bench` sources every client connection from the client host's \
         namespace; see tests/src/bin/bench/netpath.rs). **direct**: TCP from a host of its own to the servers. \
         **Trellis**: a proxy on the client host with `run --capture` (a NAT redirect of the host's outgoing TCP to its \
         outbound listener, SO_ORIGINAL_DST), HBONE (mTLS, HTTP/2 CONNECT) to the server host's proxy on 15008, TCP \
         to the servers there; passthrough denied. **ztunnel**: the same with ztunnel in dedicated mode on each host \
         (FAKE_CA, a static LOCAL_XDS_PATH config with the two workloads, PROXY_MODE=dedicated), the same shape of \
         redirect rule to its port 15001 on the client host. Each logs at info (a line per connection), to a file. All \
         processes share the machine's CPUs. Each measurement alternates the contenders in every round; a cell is \
         the median over the rounds with (min..max)."
    } else {
        "Servers (a bulk sink and an HTTP/1.1 keep-alive responder, tokio, in a process of their own) listen on \
         127.0.20.2. **direct**: TCP straight to them. **Trellis**: SOCKS5 CONNECT to the client proxy, HBONE (mTLS, \
         HTTP/2 CONNECT) to the server proxy, TCP to the server; passthrough denied. **stunnel** and **HAProxy** \
         (TCP mode): a client-side instance accepting plain TCP and a server-side instance, linked by mutual TLS \
         1.3 with ECDSA P-256 certificates made by the suite (each side verifies the other's chain; the client \
         checks the server's name), a service per server port. Each logs as it does by default (Trellis: info, a line \
         per connection; stunnel: notice, a line per connection; HAProxy: no log section), to a file. All processes \
         share the machine's CPUs. Each \
         measurement alternates the contenders in every round; a cell is the median over the rounds with \
         (min..max)."
    }));
    let rounds = plan.rounds;

    s.push_str(&format!(
        "### 1. Bulk throughput\n\n{}",
        wrap(&format!(
            "{} MiB per measurement through a built-in sender and sink (MB = 10⁶ bytes), timed from the first byte \
             until the sink has read everything; connections open before timing. {rounds} rounds.",
            plan.bulk_bytes >> 20
        ))
    ));
    s.push_str(&format!(
        "| contender | 1 stream (MB/s) | vs. direct | {n} streams (MB/s) | vs. direct |\n| --- | ---: | ---: | ---: | ---: |\n",
        n = plan.streams
    ));
    let many = format!("bulk {}", plan.streams);
    for n in names {
        s.push_str(&format!(
            "| {n} | {} | {} | {} | {} |\n",
            r.cell("bulk 1", n),
            ratio(r.median("bulk 1", n), r.median("bulk 1", DIRECT)),
            r.cell(&many, n),
            ratio(r.median(&many, n), r.median(&many, DIRECT)),
        ));
    }
    s.push('\n');
    if versus {
        s.push_str(&wrap(
            "One stream each way, and the CPU both proxies used meanwhile (user + system, /proc/PID/stat) per GB \
             moved:",
        ));
        s.push_str(
            "| contender | client→server (MB/s) | CPU-s / GB | server→client (MB/s) | CPU-s / GB |\n\
             | --- | ---: | ---: | ---: | ---: |\n",
        );
        for n in names {
            s.push_str(&format!(
                "| {n} | {} | {} | {} | {} |\n",
                r.cell("bulk 1", n),
                cpu_cell(r.get("bulk 1 cpu", n)),
                r.cell("bulk 1 back", n),
                cpu_cell(r.get("bulk 1 back cpu", n)),
            ));
        }
        s.push('\n');
        s.push_str(&wrap(
            "Of that CPU, the share spent in the kernel (system time: the proxies' system calls and the network \
             stack's work done in their context), in %:",
        ));
        s.push_str("| contender | client→server | server→client |\n| --- | ---: | ---: |\n");
        for n in names.iter().filter(|n| !r.get("bulk 1 system", n).is_empty()) {
            let share = |v: &[f64]| {
                if v.is_empty() { "–".into() } else { format!("{:.0} ({:.0}..{:.0})", median(v), min(v), max(v)) }
            };
            s.push_str(&format!(
                "| {n} | {} | {} |\n",
                share(r.get("bulk 1 system", n)),
                share(r.get("bulk 1 back system", n))
            ));
        }
        s.push('\n');
    }

    s.push_str(&format!(
        "### 2. Latency at a fixed request rate\n\n{}",
        wrap(&format!(
            "Open loop: 1 KiB HTTP/1.1 POSTs (1 KiB answers) at a fixed rate spread over {c} keep-alive connections, \
             each sent at its scheduled time whatever the answers do (pipelined when they lag); each latency runs \
             from the request's scheduled send time to the end of its response, so stalls count for every request \
             they delay (coordinated-omission corrected). {w} ms warm-up, then {p} s recorded; {rounds} rounds. \
             \"added\" is the contender's value minus direct's in the same round (median over rounds).",
            c = plan.connections,
            w = plan.warmup.as_millis(),
            p = plan.period.as_secs_f64()
        ))
    ));
    for rate in plan.rates {
        s.push_str(&format!("**{rate} requests/s** (µs)\n\n"));
        s.push_str("| contender | p50 | p90 | p99 | p99.9 | added p50 | added p99 | added p99.9 |\n");
        s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for n in names {
            let cells: Vec<String> = PERCENTILES.iter().map(|(_, p)| r.cell(&format!("rate {rate} {p}"), n)).collect();
            let added =
                |p: &str| if *n == DIRECT { "–".into() } else { signed(&r.added(&format!("rate {rate} {p}"), n)) };
            s.push_str(&format!(
                "| {n} | {} | {} | {} | {} |\n",
                cells.join(" | "),
                added("p50"),
                added("p99"),
                added("p99.9")
            ));
        }
        s.push('\n');
    }

    if versus {
        s.push_str(&format!(
            "**{CLOSED_LOOP} connections, closed loop** (each sends its next request when the answer is in; {} s; \
             {rounds} rounds)\n\n| contender | requests/s | vs. direct |\n| --- | ---: | ---: |\n",
            plan.period.as_secs_f64()
        ));
        for n in names {
            s.push_str(&format!(
                "| {n} | {} | {} |\n",
                r.cell("closed loop", n),
                ratio(r.median("closed loop", n), r.median("closed loop", DIRECT))
            ));
        }
        s.push('\n');
    }

    s.push_str(&format!(
        "### 3. Connection churn\n\n{}",
        wrap(&format!(
            "{c} clients in a loop for {p} s: connect{socks}, one request, its response, close. Setup latency is \
             that whole exchange. {rounds} rounds.",
            socks = if versus { "" } else { " (for Trellis: the SOCKS5 handshake too)" },
            c = plan.churn_concurrency,
            p = plan.churn_for.as_secs_f64()
        ))
    ));
    s.push_str(
        "| contender | connections/s | vs. direct | p50 (µs) | p99 (µs) | proxy CPU-s / 1000 connections |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for n in names {
        s.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} |\n",
            r.cell("churn rate", n),
            ratio(r.median("churn rate", n), r.median("churn rate", DIRECT)),
            r.cell("churn p50", n),
            r.cell("churn p99", n),
            cpu_cell(r.get("churn cpu", n)),
        ));
    }
    s.push('\n');

    s.push_str(&format!(
        "### 4. Cost\n\n{}",
        wrap(&format!(
            "CPU: user + system time of the contender's two processes (/proc/PID/stat) over each run of scenario 2, \
             per 1000 requests sent (equivalently, CPU cores per 1000 requests/s). Idle RSS: each process after the warm-up \
             (one request, a short bulk transfer) and again at the start of each of the {rounds} rounds of idle \
             connections, every contender quiet for at least {settle} s and then read once its RSS held still \
             ({steady} readings a second apart within 1 %, at most {max_wait} s more; tests/src/bin/bench/idle.rs); \
             the median of these samples. Idle connections: \
             up to {idle} connections opened through the pair (each after one request) and held, as many as the \
             contender's limits allow (the \"held\" column, median of the rounds); RSS of both processes before \
             and with them, and the difference per connection; {rounds} rounds, medians.",
            rounds = plan.rounds,
            idle = count(plan.idle),
            settle = plan.settle.as_secs_f64(),
            steady = plan.steady_readings,
            max_wait = idle::MAX_WAIT.as_secs()
        ))
    ));
    s.push_str(&format!(
        "| contender | CPU-s / 1000 req at {a} req/s | at {b} req/s | idle RSS client, server (MB) | idle connections held | RSS pair before → with them (MB) | per connection (KiB) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        a = plan.rates[0],
        b = plan.rates[1],
    ));
    for n in &proxied {
        let cpu_rate = |rate: u32| cpu_cell(r.get(&format!("cpu {rate}"), n));
        // The client-side process is started second for the forwarders, first for Trellis: label by role.
        let (client_i, server_i) = if n.starts_with("Trellis") || *n == ZTUNNEL { (0, 1) } else { (1, 0) };
        s.push_str(&format!(
            "| {n} | {} | {} | {}, {} | {} | {} → {} | {:.1} |\n",
            cpu_rate(plan.rates[0]),
            cpu_rate(plan.rates[1]),
            mb(r.median(&format!("idle RSS {client_i}"), n)),
            mb(r.median(&format!("idle RSS {server_i}"), n)),
            held(n),
            mb(r.median("idle conns rss before", n)),
            mb(r.median("idle conns rss", n)),
            r.median("idle conns per conn", n),
        ));
    }
    s.push('\n');
    for note in &r.notes {
        s.push_str(&wrap(&format!("Note: {note}.")));
    }

    if versus {
        return (targets, s);
    }
    s.push_str(&format!(
        "### 5. Control plane\n\n{}",
        wrap(&format!(
            "{p} simulated proxies in the benchmark process, each with its own join token (admin API), its own join \
             (fresh P-256 key, node certificate), and its own discovery stream over its own TLS connection, ACKing \
             every update after applying it as a proxy does (the proxy's own `state::apply`: every resource parsed, \
             the policy set compiled; a NACK fails the run); the first {c} declare a workload. Setup (tokens, joins, streams): {setup:.1} s. Then \
             {rounds} rounds of `trellisctl apply` of a mesh-wide AuthorizationPolicy, each proxy's time being from \
             just before `trellisctl` starts to the ACK of the update carrying the policy (one that did not ACK within \
             60 s counts as infinitely late, so the quantiles are over every proxy). Then {c} of them each \
             keep one workload CSR outstanding on their stream for {sf} s per round.",
            p = count(control.proxies),
            c = control.csr_clients,
            setup = control.setup_seconds,
            rounds = control.convergence.len(),
            sf = plan.control.sign_for.as_secs_f64(),
        ))
    ));
    let col = |i: usize| -> Vec<f64> { control.convergence.iter().map(|(st, _)| st[i]).collect() };
    let acked: Vec<f64> = control.convergence.iter().map(|(_, n)| *n as f64).collect();
    s.push_str("| measurement | value |\n| --- | ---: |\n");
    s.push_str(&format!("| proxies that ACKed the policy, per round | {} |\n", cell(&acked).replace(".0", "")));
    for (i, name) in ["p50", "p99", "max"].into_iter().enumerate() {
        s.push_str(&format!("| convergence {name} (ms) | {} |\n", cell(&col(i))));
    }
    s.push_str(&format!("| of which `trellisctl apply` itself ran (ms) | {} |\n", cell(&control.apply_ms)));
    s.push_str(&format!(
        "| certificate signings/s, {} concurrent clients | {} |\n\n",
        control.csr_clients,
        cell(&control.signings)
    ));

    s.push_str("### 6. Policy evaluation\n\n");
    let source = if !authz_fresh {
        "The table of the authz section below (not re-run by this run, or not yet)."
    } else {
        "`cargo bench -p trellis-policy --bench authz`, run by the suite (see the authz section for what it measures)."
    };
    s.push_str(&wrap(source));
    for line in authz {
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');

    if !plots.is_empty() {
        s.push_str("### Plots\n\n");
        for (file, title) in plots {
            s.push_str(&format!("- [{title}](docs/bench/{file})\n"));
        }
        s.push('\n');
    }
    (targets, s)
}

/// The targets of issue 19 against ztunnel, from a `--ztunnel` run.
fn versus_targets(header: &str, plan: &Plan, r: &Results) -> String {
    let (t, z) = ("Trellis", ZTUNNEL);
    let m = |metric: &str, n: &str| r.median(metric, n);
    let added = |metric: &str, n: &str| {
        let v = r.added(metric, n);
        if v.is_empty() { f64::NAN } else { median(&v) }
    };
    let pair = |metric: &str, n: &str| (0..2).map(|i| m(&format!("{metric} {i}"), n)).sum::<f64>();
    let row = |target: String, ours: f64, theirs: f64, pass: bool, unit: &str| {
        // CPU figures are fractions of a second: three decimals.
        let show = |v: f64| if unit.starts_with("CPU") { format!("{v:.3}") } else { number(v) };
        format!(
            "| {target} | {} vs. {} {unit} = {} | {} |\n",
            show(ours),
            show(theirs),
            ratio(ours, theirs),
            if pass { "pass" } else { "**FAIL**" }
        )
    };
    let mut out = format!(
        "## Targets against ztunnel\n\n{}| target | Trellis vs. ztunnel | result |\n| --- | --- | --- |\n",
        wrap(&format!("From the run below ({header}). Medians of the same run; \"added\" is over direct TCP."))
    );
    for (metric, way) in [("bulk 1", "client→server"), ("bulk 1 back", "server→client")] {
        let (a, b) = (m(metric, t), m(metric, z));
        out.push_str(&row(format!("single stream {way} ≥ 1.15 × ztunnel"), a, b, a >= 1.15 * b, "MB/s"));
        let (a, b) = (m(&format!("{metric} cpu"), t), m(&format!("{metric} cpu"), z));
        out.push_str(&row(format!("CPU per byte, {way} ≤ 0.9 × ztunnel"), a, b, a <= 0.9 * b, "CPU-s/GB"));
    }
    for rate in plan.rates {
        let metric = format!("rate {rate} p99");
        let (a, b) = (added(&metric, t), added(&metric, z));
        out.push_str(&row(format!("added p99 at {rate} req/s ≤ 0.8 × ztunnel"), a, b, a <= 0.8 * b, "µs"));
    }
    let p50 = format!("rate {} p50", plan.rates[1]);
    let (a, b) = (m(&p50, t), m(&p50, z));
    out.push_str(&row(format!("p50 at {} req/s ≤ ztunnel", plan.rates[1]), a, b, a <= b, "µs"));
    let (a, b) = (m("closed loop", t), m("closed loop", z));
    out.push_str(&row(format!("HTTP, {CLOSED_LOOP} connections ≥ 1.3 × ztunnel"), a, b, a >= 1.3 * b, "req/s"));
    let (a, b) = (m("churn rate", t), m("churn rate", z));
    let lower_p99 = m("churn p99", t) < m("churn p99", z);
    out.push_str(&row("churn ≥ 1.5 × ztunnel (and a lower p99, next row)".into(), a, b, a >= 1.5 * b, "conn/s"));
    let (a, b) = (m("churn p99", t), m("churn p99", z));
    out.push_str(&row("churn p99 < ztunnel".into(), a, b, lower_p99, "µs"));
    let (a, b) = (pair("idle RSS", t), pair("idle RSS", z));
    out.push_str(&row("idle RSS of the pair ≤ 0.6 × ztunnel".into(), a, b, a <= 0.6 * b, "MB"));
    let (a, b) = (m("idle conns per conn", t), m("idle conns per conn", z));
    out.push_str(&row("per idle tunnelled connection ≤ ztunnel".into(), a, b, a <= b, "KiB"));
    for rate in plan.rates {
        let metric = format!("cpu {rate}");
        let (a, b) = (m(&metric, t), m(&metric, z));
        out.push_str(&row(
            format!("proxies' CPU at {rate} req/s ≤ 0.5 × ztunnel"),
            a,
            b,
            a <= 0.5 * b,
            "CPU-s/1000 req",
        ));
    }
    out.push('\n');
    out
}

/// CPU seconds, three decimals, median (min..max).
fn cpu_cell(v: &[f64]) -> String {
    if v.is_empty() { "–".into() } else { format!("{:.3} ({:.3}..{:.3})", median(v), min(v), max(v)) }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
