//! `trellis-proxy run --config proxy.yaml`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use trellis_data_plane::config::Config;

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
    },
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
    let Command::Run { config } = cli.command;
    // Config errors go to stderr before logging exists; the log format is itself configured.
    let config = Config::load(&config)?;
    trellis_data_plane::logging::init(config.log_format);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(async move {
            match wait_for_signal().await {
                Ok(signal) => tracing::info!("{signal} received; shutting down"),
                Err(e) => tracing::error!(error = %e, "cannot listen for signals; shutting down"),
            }
            let _ = stop.send(true);
        });
        trellis_data_plane::proxy::run(config, shutdown).await.map_err(anyhow::Error::from)
    })
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
