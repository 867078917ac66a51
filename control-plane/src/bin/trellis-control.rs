//! `trellis-control`: initialise a data dir, or serve the control plane.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trellis_control_plane::store_config::StoreArgs;
use trellis_control_plane::{init, parse_duration, server};

#[derive(Parser)]
#[command(name = "trellis-control", version, about = "Trellis control plane: mesh CA, policy store, discovery")]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data dir: CA (new, or imported with --ca-cert/--ca-key), admin credential, trellisctl config, store.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Operator CA certificate (PEM) to sign with, e.g. an intermediate under the operator's root.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// Private key of --ca-cert (PEM).
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Certificates above --ca-cert, up to and including the root (PEM).
        #[arg(long, requires = "ca_cert")]
        ca_chain: Option<PathBuf>,
        /// Control-plane address written into the generated admin.yaml.
        #[arg(long, default_value = "127.0.0.1:15012")]
        endpoint: String,
        #[arg(long, default_value = "admin")]
        admin_name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Serve the Identity, Discovery and Admin gRPC services over TLS, and metrics over HTTP.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:15012")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:15014")]
        metrics_listen: SocketAddr,
        /// Lifetime of workload certificates (minimum 1m).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_ttl: Duration,
        /// Lifetime of node credentials (minimum 30s). Proxies renew theirs at about 2/3 of it, so the default of 30
        /// days keeps a credential valid for 10 more days after its renewal falls due: a proxy may be away that long
        /// and still reconnect without a new token, while a stolen credential is usable for at most 30 days.
        #[arg(long, default_value = "720h", value_parser = parse_duration)]
        node_cert_ttl: Duration,
        /// Lifetime of JWT-SVIDs (at most --cert-ttl, minimum 10s): short, since a bearer token cannot be revoked
        /// [default: 5m, or --cert-ttl where that is shorter].
        #[arg(long, value_parser = parse_duration)]
        jwt_svid_ttl: Option<Duration>,
        /// Extra DNS name or IP for the serving certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// How often the JWKS of every RequestAuthentication `jwksUri` is fetched again.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        jwks_refresh: Duration,
        /// Accept plain `http://` jwksUri values (keys fetched without TLS: for local tests only).
        #[arg(long)]
        jwks_allow_http: bool,
        /// Accept jwksUri hosts that are, or resolve to, loopback (127.0.0.0/8, ::1, localhost), link-local
        /// (169.254.0.0/16, fe80::/10) or unspecified addresses: the control plane would fetch from services only
        /// this host reaches (for local tests only).
        #[arg(long)]
        jwks_allow_local: bool,
        /// Write the addresses the listeners are bound to into this file, as JSON
        /// (`{"listen": "...", "metricsListen": "..."}`), once both are bound: for --listen / --metrics-listen
        /// with port 0, whose port the kernel picks.
        #[arg(long, value_name = "PATH")]
        addresses_file: Option<PathBuf>,
        /// For tests that interrupt a root rotation in a given phase: the rotation never leaves this phase.
        #[arg(long, hide = true)]
        rotation_hold: Option<trellis_control_plane::rotation::Phase>,
        #[command(flatten)]
        store: StoreArgs,
        /// This replica's name in `trellisctl proxy-status` [default: the host name].
        #[arg(long)]
        replica_name: Option<String>,
    },
}

/// How long exiting waits for blocking work still running.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    trellis_control_plane::init_logging(cli.log_json);
    let result = match cli.command {
        Command::Init { data_dir, trust_domain, ca_cert, ca_key, ca_chain, endpoint, admin_name, store } => {
            let store = match store.resolve(None) {
                Ok(store) => store,
                Err(e) => {
                    eprintln!("error: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            let opts =
                init::InitOptions { data_dir, trust_domain, ca_cert, ca_key, ca_chain, endpoint, admin_name, store };
            init::init(&opts).map(|()| {
                println!("initialised {}", opts.data_dir.display());
                println!("trellisctl config: {}", opts.data_dir.join("admin.yaml").display());
            })
        }
        Command::Serve {
            data_dir,
            listen,
            metrics_listen,
            cert_ttl,
            node_cert_ttl,
            jwt_svid_ttl,
            sans,
            jwks_refresh,
            jwks_allow_http,
            jwks_allow_local,
            addresses_file,
            rotation_hold,
            store,
            replica_name,
        } => {
            if cert_ttl < Duration::from_secs(60) {
                eprintln!("error: --cert-ttl must be at least 1m");
                return std::process::ExitCode::FAILURE;
            }
            let jwt_svid_ttl = jwt_svid_ttl.unwrap_or(trellis_control_plane::jwt_key::DEFAULT_JWT_TTL.min(cert_ttl));
            if jwt_svid_ttl < Duration::from_secs(10) || jwt_svid_ttl > cert_ttl {
                eprintln!("error: --jwt-svid-ttl must be at least 10s and at most --cert-ttl");
                return std::process::ExitCode::FAILURE;
            }
            if node_cert_ttl < Duration::from_secs(30) {
                eprintln!("error: --node-cert-ttl must be at least 30s");
                return std::process::ExitCode::FAILURE;
            }
            if jwks_refresh < Duration::from_secs(1) {
                eprintln!("error: --jwks-refresh must be at least 1s");
                return std::process::ExitCode::FAILURE;
            }
            let jwks = trellis_control_plane::jwks::JwksOptions {
                refresh: jwks_refresh,
                allow_http: jwks_allow_http,
                allow_local: jwks_allow_local,
            };
            let opts = server::ServeOptions {
                data_dir,
                listen,
                metrics_listen,
                cert_ttl,
                node_cert_ttl,
                jwt_svid_ttl,
                sans,
                jwks,
                addresses_file,
                rotation_hold,
                store,
                replica_name: replica_name.unwrap_or_else(host_name),
            };
            tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(anyhow::Error::from).and_then(
                |rt| {
                    let result = rt.block_on(server::serve(opts, shutdown_signal()));
                    // Not waiting for blocking work left behind (a name resolution of a JWKS fetch, say).
                    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
                    result
                },
            )
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The host's name (`/proc/sys/kernel/hostname`), else "replica".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "replica".to_owned())
}
