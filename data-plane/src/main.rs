//! `trellis-proxy run --config proxy.yaml`

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use trellis_data_plane::config::Config;

/// With the `jemalloc` feature (off by default: BENCHMARKS.md, "Allocator"), Rust's allocations go to jemalloc;
/// without it, to glibc's malloc, trimmed when traffic goes quiet (`heap.rs`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "trellis-proxy", version, about = "Trellis node proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the mesh (first start) and run the proxy.
    Run {
        /// Proxy configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Install the nftables capture rules on start, remove them on exit (kept if the proxy is killed, so
        /// traffic fails closed).
        #[arg(long)]
        capture: bool,
        /// Write the address every listener is bound to into this file, as JSON keyed by `listen.*` field
        /// (`{"admin": "127.0.0.1:15000", ...}`), replaced atomically as listeners start; `ready` is bound last.
        /// For `listen.*` addresses with port 0, whose port the kernel picks.
        #[arg(long, value_name = "PATH")]
        addresses_file: Option<PathBuf>,
    },
    /// Install, remove or show the capture rules (for operators and init containers).
    Capture {
        #[arg(value_enum)]
        action: CaptureAction,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Talk to a SPIFFE Workload API socket as an application would (debugging).
    WorkloadApi {
        #[command(subcommand)]
        command: WorkloadApiCommand,
    },
}

#[derive(Subcommand)]
enum WorkloadApiCommand {
    /// Print what FetchX509SVID answers this caller: SPIFFE IDs, certificate chains and the bundle (PEM; the private
    /// key only by size).
    Fetch {
        /// The socket (a path or unix:///path).
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = trellis_data_plane::config::DEFAULT_WORKLOAD_API_SOCKET)]
        socket: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CaptureAction {
    Install,
    Uninstall,
    Status,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with every cause, without the backtrace anyhow's Debug output would add.
            eprintln!("Error: {}", trellis_data_plane::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    use trellis_data_plane::capture;
    let (config, with_capture, addresses_file) = match cli.command {
        Command::Run { config, capture, addresses_file } => (config, capture, addresses_file),
        Command::WorkloadApi { command: WorkloadApiCommand::Fetch { socket } } => return fetch(&socket),
        Command::Capture { action, config } => {
            let action = match action {
                CaptureAction::Install => capture::Action::Install,
                CaptureAction::Uninstall => capture::Action::Uninstall,
                CaptureAction::Status => capture::Action::Status,
            };
            if !capture::command(action, &Config::load(&config)?)? {
                std::process::exit(1);
            }
            return Ok(());
        }
    };
    // Config errors go to stderr before logging exists; the log format is itself configured.
    let config = Config::load(&config)?;
    trellis_data_plane::logging::init(config.log_format);
    let spec = with_capture.then(|| capture::CaptureSpec::from_config(&config)).transpose()?;
    if let Some(spec) = &spec {
        let installed = capture::install(spec).context("installing the capture rules")?;
        tracing::info!(table = capture::TABLE, "capture rules installed");
        if let Some(error) = &installed.return_route_failed {
            tracing::warn!(
                %error,
                "capture.preserveSourceAddress: cannot install the return route; workloads see the proxy's address \
                 as their clients'"
            );
        }
        trellis_data_plane::sockets::set_preserve_source(installed.preserves_source(spec));
    }
    let result = serve(config, addresses_file);
    if let Some(spec) = spec {
        match capture::uninstall(spec.preserve_source) {
            Ok(()) => tracing::info!("capture rules removed"),
            Err(e) => tracing::error!(error = %e, "cannot remove the capture rules"),
        }
    }
    result
}

fn serve(config: Config, addresses_file: Option<PathBuf>) -> anyhow::Result<()> {
    // One glibc arena per runtime worker, shared by the main and blocking threads (heap.rs): before any thread starts.
    if !trellis_data_plane::heap::limit_arenas(config.worker_threads) {
        tracing::debug!("the allocator did not take an arena limit");
    }
    let runtime = runtime(config.worker_threads).context("starting the runtime")?;
    let workers = config.worker_threads;
    runtime.block_on(async move {
        // What the runtime is, read from the runtime itself: the tests check it against `workerThreads`.
        let flavor = tokio::runtime::Handle::current().runtime_flavor();
        tracing::info!(runtime = ?flavor, workers, "runtime started");
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(async move {
            match wait_for_signal().await {
                Ok(signal) => tracing::info!("{signal} received; shutting down"),
                Err(e) => tracing::error!(error = %e, "cannot listen for signals; shutting down"),
            }
            let _ = stop.send(true);
        });
        trellis_data_plane::app::run(config, addresses_file, shutdown).await.map_err(anyhow::Error::from)
    })
}

/// The proxy's runtime. One worker (the default on two CPUs or fewer) is a current-thread runtime: the main thread
/// runs every task and polls the sockets itself. A multi-thread runtime of one worker did the same work on its worker
/// thread while the main thread slept in `block_on` (waking only for the discovery stream, the root future), and took
/// every park and wake-up through the multi-worker scheduler's bookkeeping (idle-worker accounting under a lock, the
/// injection queue, a search for work to steal) that one worker never needs. Measured: about a tenth less CPU per
/// request with 16 connections in a closed loop, the same at a fixed rate (BENCHMARKS.md, "One worker: a
/// current-thread runtime"). The discovery stream's updates are now applied on the thread that carries the traffic,
/// as reconfiguration already was.
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(worker_threads);
        builder
    };
    builder.enable_all().build()
}

fn fetch(socket: &str) -> anyhow::Result<()> {
    use trellis_data_plane::workload_api::fetch;
    let path = fetch::socket_path(socket)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let answer = runtime.block_on(fetch::x509_svid(&path))?;
    let pem_of = |label: &str, der: &[u8]| -> anyhow::Result<String> {
        // DER certificates back to back: each is one SEQUENCE whose length says where the next starts.
        let mut out = String::new();
        let mut rest = der;
        while !rest.is_empty() {
            let len = der_len(rest).with_context(|| format!("malformed DER in the {label}"))?;
            out.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", rest[..len].to_vec())));
            rest = &rest[len..];
        }
        Ok(out)
    };
    for svid in &answer.svids {
        println!("spiffe_id: {}", svid.spiffe_id);
        if !svid.hint.is_empty() {
            println!("hint: {}", svid.hint);
        }
        println!("private key: PKCS#8, {} bytes (not printed)", svid.x509_svid_key.len());
        println!("chain:");
        print!("{}", pem_of("chain", &svid.x509_svid)?);
        println!("bundle:");
        print!("{}", pem_of("bundle", &svid.bundle)?);
    }
    Ok(())
}

/// Length of the DER element at the start of `der` (tag, length, contents).
fn der_len(der: &[u8]) -> Option<usize> {
    let first = *der.get(1)?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = der.get(2..2 + n)?;
        (2 + n, bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)))
    };
    let total = header.checked_add(len)?;
    (total <= der.len()).then_some(total)
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
