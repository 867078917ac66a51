//! `cargo run --release --bin trellis-demo [-- --serve]`: a working mesh on one machine, without root.
//!
//! A control plane, two proxies (`client-node` fronting demo/client, `server-node` fronting demo/echo), an echo
//! service behind the server proxy, and a client that reaches it through the client proxy's SOCKS5 listener:
//! SOCKS5 → client-node → HBONE (mTLS, HTTP/2 CONNECT) → server-node → echo. Prints each step; exits 0 when all of
//! them worked, 1 with the reason (and the proxies' last log lines) otherwise.
//!
//! `--serve` keeps the mesh up until SIGINT/SIGTERM and prints one line `READY {json}` on stdout with its addresses
//! (everything else goes to stderr). `--no-build` skips building the mesh binaries; `--client-ip`/`--server-ip`
//! move the workloads off 127.0.10.1/127.0.10.2.

#![forbid(unsafe_code)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use common::step;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use trellis_tests::{ControlPlane, Echo, Proxy, ProxyOptions, WorkloadSpec};

const USAGE: &str = "usage: trellis-demo [--serve] [--no-build] [--client-ip IP] [--server-ip IP]";
const ECHO_PORT: u16 = 8080;

struct Args {
    serve: bool,
    no_build: bool,
    client_ip: IpAddr,
    server_ip: IpAddr,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args =
        Args { serve: false, no_build: false, client_ip: [127, 0, 10, 1].into(), server_ip: [127, 0, 10, 2].into() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--serve" => args.serve = true,
            "--no-build" => args.no_build = true,
            "--client-ip" => args.client_ip = it.next().context("--client-ip needs a value")?.parse()?,
            "--server-ip" => args.server_ip = it.next().context("--server-ip needs a value")?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("trellis-demo: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ntrellis-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Human output: stdout, or stderr in `--serve` mode (where stdout carries only the READY line).
fn print_human(serve: bool, line: &str) {
    if serve {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let say = |line: &str| print_human(args.serve, line);
    common::prepare(args.no_build, say)?;
    // Handlers go in before anything starts, so that a signal always ends in a normal return (and the harness's
    // drops stop every process).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut sigint, mut sigterm) = {
        let _context = runtime.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };

    let cp = step("starting the control plane", &[], || Ok(ControlPlane::start(&[])))?;
    say(&format!(
        "control plane started: gRPC (TLS 1.3) on {}, metrics on {}; admin config {}",
        cp.addr,
        cp.metrics_addr,
        cp.admin_config().display()
    ));

    // With passthrough denied the client proxy refuses destinations outside the mesh: an echo that comes back went
    // through the tunnel, not around it.
    let options = ProxyOptions { passthrough: Some("deny"), ..ProxyOptions::default() };
    let client_spec = WorkloadSpec::new("client", "demo", "client", &args.client_ip.to_string());
    let server_spec = WorkloadSpec::new("echo", "demo", "echo", &args.server_ip.to_string());
    let client = step("starting proxy client-node", &[], || {
        Ok(Proxy::start_with(&cp, "client-node", std::slice::from_ref(&client_spec), options.clone()))
    })?;
    let server = step("starting proxy server-node", &[], || {
        Ok(Proxy::start_with(&cp, "server-node", std::slice::from_ref(&server_spec), options.clone()))
    })?;
    let logs =
        [("control plane", cp.log_path()), ("client-node", client.log_path()), ("server-node", server.log_path())];
    for (proxy, spec) in [(&client, &client_spec), (&server, &server_spec)] {
        let identity = step(&format!("proxy {} becoming ready", proxy.node), &logs, || {
            proxy.wait_ready();
            let dump = proxy.wait_config("a workload certificate", |d| d["certificates"][0]["spiffe_id"].is_string());
            Ok(dump["certificates"][0]["spiffe_id"].as_str().unwrap_or_default().to_owned())
        })?;
        say(&format!(
            "proxy {} joined: fronts {}/{} at {} as {identity}; SOCKS5 on {}, HBONE on port {}",
            proxy.node, spec.namespace, spec.name, spec.addresses[0], proxy.socks5_addr, proxy.hbone_port
        ));
    }
    let server_ip = args.server_ip.to_string();
    step("client-node learning about demo/echo", &logs, || {
        client.wait_config("demo/echo in client-node's registry", |d| d["workloads"].to_string().contains(&server_ip));
        Ok(())
    })?;
    say(&format!("client-node's registry has demo/echo at {server_ip} (pushed by the control plane)"));

    let echo_addr = SocketAddr::new(args.server_ip, ECHO_PORT);
    // Echo::start counts the address as up once something accepts there, even if that is someone else's server.
    std::net::TcpListener::bind(echo_addr).with_context(|| {
        format!("{echo_addr} is taken (another trellis-demo running? --server-ip moves the echo service)")
    })?;
    let _echo = step("starting the echo service", &[], || Ok(Echo::start(echo_addr)))?;
    say(&format!("echo service listening on {echo_addr}, behind server-node"));

    step("SOCKS5 → HBONE mTLS → echo round trip", &logs, || {
        let (sent, took) = round_trip(client.socks5_addr, echo_addr)?;
        say(&format!(
            "SOCKS5 {} → client-node → HBONE mTLS → server-node → {echo_addr}: sent {sent} bytes, got them back \
             in {took:.1?}; half-close made it through (EOF)",
            client.socks5_addr
        ));
        Ok(())
    })?;

    if !args.serve {
        say("everything worked; stopping the mesh");
        return Ok(());
    }
    let proxy_json = |p: &Proxy| {
        json!({"name": p.node, "socks5": p.socks5_addr.to_string(), "metrics": p.metrics_addr.to_string(),
               "ready": p.ready_addr.to_string(), "admin": p.admin_addr.to_string()})
    };
    let ready = json!({
        "control_plane": cp.addr.to_string(),
        "control_plane_metrics": cp.metrics_addr.to_string(),
        "admin_config": cp.admin_config().display().to_string(),
        "proxies": [proxy_json(&client), proxy_json(&server)],
        "services": [{"name": "echo", "address": echo_addr.to_string(), "protocol": "tcp"}],
    });
    say(&format!("mesh is up; trellisctl --config {} proxy-status; Ctrl-C to stop", cp.admin_config().display()));
    println!("READY {ready}");
    std::io::stdout().flush()?;
    let name = runtime.block_on(async {
        tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        }
    });
    say(&format!("{name}: stopping the mesh"));
    Ok(())
}

/// Through the SOCKS5 listener at `socks5`: sends 64 KiB to `dest`, reads them back, then closes its write side and
/// expects the echo's EOF. Returns (bytes, time from CONNECT to EOF).
fn round_trip(socks5: SocketAddr, dest: SocketAddr) -> anyhow::Result<(usize, Duration)> {
    let payload: Vec<u8> = b"hello through the mesh\n".iter().copied().cycle().take(64 * 1024).collect();
    let started = Instant::now();
    let mut stream = common::socks5::connect(socks5, dest, Duration::from_secs(10))
        .with_context(|| format!("SOCKS5 CONNECT {dest} via {socks5}"))?;
    let mut writer = stream.try_clone()?;
    let mut echoed = vec![0; payload.len()];
    std::thread::scope(|s| {
        let sending = s.spawn(|| writer.write_all(&payload));
        let received = stream.read_exact(&mut echoed);
        sending.join().map_err(|_| anyhow!("writer thread panicked"))?.context("sending")?;
        received.context("reading the echo")
    })?;
    if echoed != payload {
        let at = echoed.iter().zip(&payload).position(|(a, b)| a != b).unwrap_or(0);
        bail!("the echo differs from what was sent, first at byte {at}");
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).context("waiting for the echo's EOF after our half-close")?;
    if !rest.is_empty() {
        bail!("{} unexpected bytes after the echo", rest.len());
    }
    Ok((payload.len(), started.elapsed()))
}
