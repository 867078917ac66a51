//! The path `trellis-bench all --ztunnel PATH` measures on: simulated hosts (network namespaces on a bridge, see
//! `trellis_tests::netns`), each proxy on the host of the workload it serves, the client's traffic sent to the
//! client-side proxy the way a deployment does it: a NAT redirect rule in the client host's output chain (Trellis's
//! own `run --capture` rules; for ztunnel the same shape of rule, `ztunnel::redirect_rules`). Neither proxy is
//! dialled through SOCKS5, and the server side of both is reached on its HBONE port 15008 across the bridge.
//!
//! | host | what runs there |
//! | --- | --- |
//! | `trl-zb<pid>-0` | the Trellis control plane |
//! | `trl-zb<pid>-1` | Trellis client proxy (capture); the benchmark's client sockets for Trellis |
//! | `trl-zb<pid>-2` | Trellis server proxy (capture; it dials the servers from the client's address, `capture.preserveSourceAddress`'s default); the servers (`trellis-bench servers`) on its address |
//! | `trl-zb<pid>-3` | ztunnel client (dedicated, redirect rule); the client sockets for ztunnel |
//! | `trl-zb<pid>-4` | ztunnel server (dedicated; it dials the servers from the client's address, its default as root, with istio-cni's return path, `ztunnel::return_rules`); the servers on its address |
//! | `trl-zb<pid>-5` | the client sockets for direct TCP, to host 4's servers (no rule on the way) |
//! | `trl-zb<pid>-6`, `-7` | with `--proxy-b PATH`: "Trellis B", a client and server proxy running that executable, as 1 and 2 |
//!
//! The benchmark process stays in its own namespace: a thread per client host creates the sockets there
//! (`nsdial`). All processes share the machine's CPUs, as in the loopback suite.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use trellis_tests::netns::Net;
use trellis_tests::{ControlPlane, Proxy, ProxyOptions, WorkloadSpec};

use super::contenders::{Contender, Route, mesh_logs, proxy_worker_threads};
use super::load::Servers;
use super::nsdial::NetnsDialer;
use super::ztunnel::{self, Workload, Ztunnel};
use crate::common::step;

/// 10.200.219.0/24: no test uses it (the tests pick 11 and 61..77). The namespaces are isolated from the root one
/// (the bridge has its own), so two benchmarks at once may share the subnet; their namespace names differ.
const SUBNET: u8 = 219;

/// `zb<pid>`: the namespaces' tag, this process's own, so that a benchmark started beside a running one does not
/// remove that one's namespaces as leftovers.
fn tag() -> String {
    format!("zb{}", std::process::id() % 100_000)
}

/// Everything the path runs; dropping it stops the processes and then removes the namespaces.
pub struct NetPath {
    _servers: Servers,
    _ztunnels: [Ztunnel; 2],
    _trellis: TrellisPair,
    _trellis_b: Option<TrellisPair>,
    _cp: ControlPlane,
    _net: Net,
    pub logs: Vec<(&'static str, PathBuf)>,
    /// Each proxy's threads, by name, as started (for the report).
    pub threads: Vec<String>,
}

/// A Trellis client and server proxy, each capturing on its own host, with the servers on the server's host.
struct TrellisPair {
    client: Proxy,
    server: Proxy,
    servers: Servers,
}

impl TrellisPair {
    /// `suffix` tells a second pair's workloads and nodes apart ("" or "-b"); `binary` is its proxies' executable
    /// (default: the workspace's `trellis-proxy`).
    fn start(
        cp: &ControlPlane,
        net: &Net,
        (client_host, server_host): (usize, usize),
        suffix: &str,
        binary: Option<&Path>,
    ) -> anyhow::Result<TrellisPair> {
        let ip = |i: usize| IpAddr::V4(net.host(i).ip);
        let servers = Servers::start_in(Some(&net.host(server_host).ns), ip(server_host))?;
        let mut options = ProxyOptions {
            passthrough: Some("deny"),
            capture: true,
            binary: binary.map(Path::to_path_buf),
            ..ProxyOptions::default()
        };
        if let Some(n) = proxy_worker_threads() {
            options.extra.insert("workerThreads".into(), n.into());
        }
        let client_spec =
            WorkloadSpec::new(&format!("client{suffix}"), "bench", "client", &ip(client_host).to_string());
        let mut server_spec =
            WorkloadSpec::new(&format!("servers{suffix}"), "bench", "servers", &ip(server_host).to_string());
        server_spec.ports = vec![(servers.ports.sink.port(), "tcp"), (servers.ports.http.port(), "tcp")];
        let on = |i: usize| ProxyOptions { netns: Some(net.host(i).clone()), ..options.clone() };
        let client = step(&format!("starting the Trellis{suffix} client proxy"), &[], || {
            Ok(Proxy::start_with(cp, &format!("bench-client{suffix}"), &[client_spec], on(client_host)))
        })?;
        let server = step(&format!("starting the Trellis{suffix} server proxy"), &[], || {
            Ok(Proxy::start_with(cp, &format!("bench-server{suffix}"), &[server_spec], on(server_host)))
        })?;
        step(&format!("waiting for the Trellis{suffix} proxies"), &mesh_logs(&client, &server), || {
            client.wait_ready();
            server.wait_ready();
            let server_ip = ip(server_host).to_string();
            client.wait_config("the servers' workload in the client proxy's registry", |d| {
                d["workloads"].to_string().contains(&server_ip)
            });
            Ok(())
        })?;
        Ok(TrellisPair { client, server, servers })
    }

    fn pids(&self) -> Vec<u32> {
        [self.client.pid(), self.server.pid()].into_iter().flatten().collect()
    }
}

/// Lets host `ns` open connections as fast as churn closes them, the same for every contender: a churn round leaves
/// about 14,000 connections in TIME_WAIT on a host, which with the default range (32768-60999, of which `connect`
/// takes every other port) leaves no port to dial from, and the fastest contender hit that first. So: the range
/// above the proxies' ports (15000-15080), and reuse of a TIME_WAIT port for a new outgoing connection (safe with TCP
/// timestamps; the default `2` allows it on loopback only).
fn widen_ports(ns: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=16000 65535"])
        .args(["net.ipv4.tcp_tw_reuse=1"])
        .status()?;
    anyhow::ensure!(status.success(), "sysctl in {ns}: {status}");
    Ok(())
}

/// Builds the hosts and starts both meshes; returns the contenders direct, Trellis and ztunnel (in that order), and
/// "Trellis B" last when `proxy_b` names a second `trellis-proxy` executable (its own pair on hosts 6 and 7, on the
/// same control plane).
pub fn start(ztunnel_binary: &Path, proxy_b: Option<&Path>, dir: &Path) -> anyhow::Result<(Vec<Contender>, NetPath)> {
    let hosts = if proxy_b.is_some() { 8 } else { 6 };
    let net =
        step("building the hosts (network namespaces; root needed)", &[], || Ok(Net::new(&tag(), SUBNET, hosts)))?;
    let host = |i: usize| net.host(i).clone();
    for i in 0..hosts {
        step("widening each host's ports for churn", &[], || widen_ports(&net.host(i).ns))?;
    }

    let ztunnel_servers = Servers::start_in(Some(&host(4).ns), IpAddr::V4(net.host(4).ip))?;

    // Trellis: the control plane on host 0, a capturing proxy on hosts 1 and 2 (and 6 and 7 for Trellis B).
    let cp = step("starting the control plane", &[], || Ok(ControlPlane::start_in(&host(0), &[])))?;
    let trellis_pair = TrellisPair::start(&cp, &net, (1, 2), "", None)?;
    let pair_b = proxy_b.map(|binary| TrellisPair::start(&cp, &net, (6, 7), "-b", Some(binary))).transpose()?;

    // ztunnel: a dedicated instance on hosts 3 and 4, the redirect on host 3.
    let v4 = |i: usize| net.host(i).ip;
    let z_client = Workload { name: "client", namespace: "bench", service_account: "client", ip: v4(3) };
    let z_server = Workload { name: "servers", namespace: "bench", service_account: "servers", ip: v4(4) };
    let config = dir.join("ztunnel-local.yaml");
    std::fs::write(&config, ztunnel::local_config(&[z_client.clone(), z_server.clone()]))?;
    let threads = proxy_worker_threads();
    let z_server_proc =
        Ztunnel::start(ztunnel_binary, &host(4), &z_server, &config, threads, dir.join("zt-server.log"))?;
    let z_client_proc =
        Ztunnel::start(ztunnel_binary, &host(3), &z_client, &config, threads, dir.join("zt-client.log"))?;
    ztunnel::install_rules(&host(3).ns, &ztunnel::redirect_rules())?;
    ztunnel::install_return_path(&host(4).ns)?;

    let dial = |i: usize| NetnsDialer::start(&net.host(i).ns);
    let direct = Contender {
        name: "direct",
        route: Route::Netns { from: dial(5)?, servers: ztunnel_servers.ports },
        pids: vec![],
        fds_per_connection: 0,
        max_connections: None,
    };
    let trellis = Contender {
        name: "Trellis",
        route: Route::Netns { from: dial(1)?, servers: trellis_pair.servers.ports },
        pids: trellis_pair.pids(),
        fds_per_connection: 1,
        max_connections: None,
    };
    let ztunnel = Contender {
        name: "ztunnel",
        route: Route::Netns { from: dial(3)?, servers: ztunnel_servers.ports },
        pids: vec![z_client_proc.pid(), z_server_proc.pid()],
        fds_per_connection: 1,
        max_connections: None,
    };
    let trellis_b = match &pair_b {
        Some(pair) => Some(Contender {
            name: "Trellis B",
            route: Route::Netns { from: dial(6)?, servers: pair.servers.ports },
            pids: pair.pids(),
            fds_per_connection: 1,
            max_connections: None,
        }),
        None => None,
    };
    let mut logs = vec![
        ("Trellis client proxy", trellis_pair.client.log_path()),
        ("Trellis server proxy", trellis_pair.server.log_path()),
        ("ztunnel client", z_client_proc.log.clone()),
        ("ztunnel server", z_server_proc.log.clone()),
    ];
    if let Some(pair) = &pair_b {
        logs.push(("Trellis B client proxy", pair.client.log_path()));
        logs.push(("Trellis B server proxy", pair.server.log_path()));
    }
    logs.retain(|(_, p)| p.exists());
    let threads = [("Trellis", &trellis.pids), ("ztunnel", &ztunnel.pids)]
        .into_iter()
        .chain(trellis_b.as_ref().map(|b| ("Trellis B", &b.pids)))
        .flat_map(|(name, pids)| {
            pids.iter().zip(["client", "server"]).map(move |(&pid, side)| {
                format!("{name} {side}: {}", super::procfs::thread_names(pid).unwrap_or_else(|e| e.to_string()))
            })
        })
        .collect();
    let path = NetPath {
        _servers: ztunnel_servers,
        _ztunnels: [z_client_proc, z_server_proc],
        _trellis: trellis_pair,
        _trellis_b: pair_b,
        _cp: cp,
        _net: net,
        logs,
        threads,
    };
    let mut all = vec![direct, trellis, ztunnel];
    all.extend(trellis_b);
    Ok((all, path))
}
