//! The one test harness: start the real binaries (control plane, proxies) as processes on port 0 (they report the
//! ports the kernel picked, so no other process can take them in between), drive them with `trellisctl` or raw
//! gRPC, and tear everything down on drop. Binaries come from the workspace's target dir, so
//! `cargo build --workspace` must run before the tests (the README's test command does).

// `deny`, not `forbid`: `netns::in_netns` needs setns(2), which std does not wrap; that one place allows unsafe
// code, with its SAFETY reasoning.
#![deny(unsafe_code)]

pub mod client;
pub mod etcd;
pub mod hbone;
pub mod http;
pub mod netns;
pub mod outcome;
pub mod prometheus;
pub mod socks;
pub mod ws_h2;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/`: where the running executable is (binaries), or the parent of its `deps/` (tests).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("running executable path");
    let dir = exe.parent().expect("executable has a parent directory");
    if dir.ends_with("deps") { dir.parent().unwrap_or(dir) } else { dir }.to_path_buf()
}

/// The JSON a successful child process printed on stdout; panics naming `what`, with its exit status and output,
/// when it failed or printed something else.
pub fn ok_json(out: std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Keys, JWKS documents and tokens from `tests/jose.py` (PyJWT), as `spec` asks for them (see the script). Claims
/// `exp`/`nbf`/`iat` are relative to now.
pub fn jose(spec: serde_json::Value) -> serde_json::Value {
    use std::io::Write as _;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jose.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed (with pyjwt and cryptography: see .ci/run)");
    child.stdin.take().unwrap().write_all(spec.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "jose.py failed (pip install pyjwt cryptography): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("jose.py output")
}

/// The Python interpreter's executable, as /proc/PID/exe shows it (what a workload's `path` selector names to attest
/// a Python client of the Workload API).
pub fn python_exe() -> PathBuf {
    let out = std::process::Command::new("python3")
        .args(["-c", "import os, sys; print(os.path.realpath(sys.executable))"])
        .output()
        .expect("python3 must be installed (with py-spiffe: see scripts/test)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Path of a workspace binary built with the same profile (`target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

/// A port that was free a moment ago on 127.0.0.1 and 0.0.0.0, and never handed out before by this process.
///
/// Ports come from below the kernel's ephemeral range, so neither a client socket's automatic port nor another
/// process's `bind(0)` takes one between this check and the moment a server binds it; each test process walks
/// the range from its own random start, so concurrent test processes rarely probe the same ports.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static NEXT: Mutex<Option<u16>> = Mutex::new(None);
    let (low, high) = port_pool();
    let mut next = NEXT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut candidate = next.unwrap_or_else(|| {
        let seed = std::process::id() as u64 ^ nanos_now();
        low + (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u16 % (high - low)
    });
    for _ in 0..(high - low) {
        let port = candidate;
        candidate = if candidate + 1 >= high { low } else { candidate + 1 };
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("0.0.0.0", port)).is_ok();
        if free {
            *next = Some(candidate);
            return port;
        }
    }
    panic!("no free TCP port in {low}..{high}")
}

/// Ports below the kernel's ephemeral range (`ip_local_port_range`), or 20000..30000 if it cannot be read.
fn port_pool() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|low| low.parse::<u16>().ok()));
    match ephemeral_low {
        Some(low) if low > 12_000 => (10_000, low),
        _ => (20_000, 30_000),
    }
}

fn nanos_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Whether a child process has exited (a zombie not yet reaped counts), read from /proc so no `&mut Child` is needed.
fn exited(pid: Option<u32>) -> bool {
    let Some(pid) = pid else { return true };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name: `pid (comm) S ...`.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// Polls `check` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(timeout, check).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `check` until it returns Some; None after `timeout` (for callers that report their own last state).
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_listening(addr: SocketAddr, child: &mut Child, log: &Path) {
    wait_listening_in(None, addr, child, log)
}

fn wait_listening_in(netns: Option<&str>, addr: SocketAddr, child: &mut Child, log: &Path) {
    wait_for(&format!("{addr} to accept connections"), Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited with {status} before listening; log:\n{}", read_log(log));
        }
        match netns {
            None => TcpStream::connect(addr).ok().map(|_| ()),
            Some(_) => netns::connect_in(netns, addr).ok().map(|_| ()),
        }
    });
}

/// Waits until `child` has written its `--addresses-file` at `path` with `last` in it (the listener it binds last),
/// and returns the file's JSON object; panics with its log if it exits first.
pub fn wait_addresses(child: &mut Child, path: &Path, log: &Path, last: &str) -> serde_json::Value {
    wait_for(&format!("{} to report its addresses ({last})", path.display()), Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited with {status} before listening; log:\n{}", read_log(log));
        }
        // Replaced atomically: the file is absent, older, or whole.
        let text = std::fs::read_to_string(path).ok()?;
        let reported: serde_json::Value = serde_json::from_str(&text).expect("the addresses file is JSON");
        reported.get(last).is_some().then_some(reported)
    })
}

pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `trellis-control init` of `data_dir`, its admin.yaml naming `addr`, with extra (store) flags.
fn init_data_dir(data_dir: &Path, addr: SocketAddr, store_args: &[String]) {
    let init = Command::new(bin("trellis-control"))
        .args(["init", "--data-dir"])
        .arg(data_dir)
        .args(["--endpoint", &addr.to_string()])
        .args(store_args)
        .output()
        .expect("run trellis-control init");
    assert!(init.status.success(), "init failed: {}", String::from_utf8_lossy(&init.stderr));
}

/// A running `trellis-control` with its own data dir.
///
/// It binds port 0 and reports the ports the kernel picked (`serve --addresses-file`), so no other process can take
/// them in between; a restart binds the same addresses again (the proxies' configs name them).
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The test's extra `serve` flags.
    extra_args: Vec<String>,
    child: Option<Child>,
    /// Network namespace it runs in (and `trellisctl` with it); `None`: this one.
    netns: Option<String>,
    /// The etcd this control plane alone uses (`TRELLIS_TEST_STORE=etcd`), stopped with it.
    own_etcd: Option<etcd::EtcdCluster>,
    /// `serve` flags of the store (and replica name), kept across `restart_with`.
    store_args: Vec<String>,
}

/// `init`/`serve` flags for the etcd store at `etcd`, with the KEK file kept beside its data (made on first use).
pub fn etcd_store_args(etcd: &etcd::EtcdCluster) -> Vec<String> {
    let kek = etcd.dir.path().join("kek");
    if !kek.exists() {
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).expect("random KEK");
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&kek, hex).expect("write KEK");
        std::fs::set_permissions(&kek, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod KEK");
    }
    ["--store", "etcd", "--etcd-endpoints", &etcd.endpoints(), "--kek-file", &kek.display().to_string()]
        .map(String::from)
        .to_vec()
}

/// Whether `ControlPlane::start` puts its control plane on etcd (`TRELLIS_TEST_STORE=etcd`: CI runs one
/// representative test binary so).
pub fn etcd_requested() -> bool {
    std::env::var("TRELLIS_TEST_STORE").is_ok_and(|v| v == "etcd")
}

impl ControlPlane {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn admin_config(&self) -> PathBuf {
        self.data_dir().join("admin.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("control.log")
    }

    fn addresses_file(&self) -> PathBuf {
        self.dir.path().join("addresses.json")
    }

    /// `trellis-control init` then `serve`, with extra `serve` flags (e.g. `--cert-ttl 1m`), on 127.0.0.1 at ports
    /// the kernel picks.
    pub fn start(extra_serve_args: &[&str]) -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_at(None, any_port, any_port, &[], extra_serve_args)
    }

    /// The same with extra `init` flags (e.g. an operator CA: `--ca-cert`, `--ca-key`, `--ca-chain`).
    pub fn start_init(extra_init_args: &[&str], extra_serve_args: &[&str]) -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_at(None, any_port, any_port, extra_init_args, extra_serve_args)
    }

    /// The same on `host`, listening on its address at Istio's ports (15012, metrics on 127.0.0.1:15014).
    pub fn start_in(host: &netns::Host, extra_serve_args: &[&str]) -> Self {
        let metrics = SocketAddr::from(([127, 0, 0, 1], 15014));
        Self::start_at(Some(host.ns.clone()), host.addr(15012), metrics, &[], extra_serve_args)
    }

    fn start_at(
        netns: Option<String>,
        addr: SocketAddr,
        metrics_addr: SocketAddr,
        extra_init_args: &[&str],
        extra_serve_args: &[&str],
    ) -> Self {
        let own_etcd = (etcd_requested() && netns.is_none()).then(|| etcd::EtcdCluster::start(1));
        let store_args = own_etcd.as_ref().map(etcd_store_args).unwrap_or_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let init_args: Vec<String> =
            store_args.iter().cloned().chain(extra_init_args.iter().map(|s| s.to_string())).collect();
        init_data_dir(&dir.path().join("data"), addr, &init_args);
        let extra_args = extra_serve_args.iter().map(|s| s.to_string()).collect();
        let mut cp = Self { dir, addr, metrics_addr, extra_args, child: None, netns, own_etcd, store_args };
        cp.spawn();
        cp
    }

    /// `init --store etcd` against `etcd`, then `n` replicas serving it on 127.0.0.1 (ports the kernel picks), each
    /// with its own data dir, filled from etcd at start, and its own admin.yaml pointing at it; replica i is named
    /// `replica-i` in proxy-status.
    pub fn start_replicas(etcd: &etcd::EtcdCluster, n: usize, extra_serve_args: &[&str]) -> Vec<Self> {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let store_args = etcd_store_args(etcd);
        let mut replicas: Vec<Self> = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir().expect("tempdir");
            let data_dir = dir.path().join("data");
            match replicas.first() {
                None => init_data_dir(&data_dir, any_port, &store_args),
                Some(first) => {
                    std::fs::DirBuilder::new().mode(0o700).create(&data_dir).expect("replica data dir");
                    std::fs::copy(first.admin_config(), data_dir.join("admin.yaml")).expect("copy admin.yaml");
                }
            }
            let extra_args = extra_serve_args.iter().map(|s| s.to_string()).collect();
            let store_args =
                store_args.iter().cloned().chain(["--replica-name".to_owned(), format!("replica-{i}")]).collect();
            let mut cp = Self {
                dir,
                addr: any_port,
                metrics_addr: any_port,
                extra_args,
                child: None,
                netns: None,
                own_etcd: None,
                store_args,
            };
            cp.spawn();
            replicas.push(cp);
        }
        replicas
    }

    /// The etcd this control plane alone uses, when `TRELLIS_TEST_STORE=etcd`.
    /// The process id while the control plane runs (the benchmarks read its CPU time from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn own_etcd(&self) -> Option<&etcd::EtcdCluster> {
        self.own_etcd.as_ref()
    }

    /// `GET /healthz/ready` on the metrics listener: the status code.
    pub fn readiness(&self) -> u16 {
        let mut stream = TcpStream::connect(self.metrics_addr).expect("connect metrics");
        use std::io::{Read, Write};
        write!(stream, "GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    /// Starts `serve` at `addr` and `metrics_addr` and waits for the addresses it reports; the first start (port 0)
    /// learns its ports there and points `admin.yaml` at them.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let _ = std::fs::remove_file(self.addresses_file());
        let mut child = netns::command(self.netns.as_deref(), bin("trellis-control"))
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen", &self.addr.to_string(), "--metrics-listen", &self.metrics_addr.to_string()])
            .arg("--addresses-file")
            .arg(self.addresses_file())
            .args(&self.store_args)
            .args(&self.extra_args)
            // Refused handshakes are logged at debug: tests check the control plane's reason for refusing.
            .env("RUST_LOG", "info,trellis_control_plane::server=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn trellis-control serve");
        let reported = wait_addresses(&mut child, &self.addresses_file(), &self.log_path(), "listen");
        let bound = |key: &str| -> SocketAddr {
            reported[key].as_str().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("{key} in {reported}"))
        };
        let first_start = self.addr.port() == 0;
        (self.addr, self.metrics_addr) = (bound("listen"), bound("metricsListen"));
        if first_start {
            let path = self.admin_config();
            let mut config: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(&std::fs::read_to_string(&path).expect("admin.yaml")).expect("admin.yaml");
            config["endpoint"] = self.addr.to_string().into();
            std::fs::write(&path, serde_yaml_ng::to_string(&config).expect("yaml")).expect("write admin.yaml");
        }
        self.child = Some(child);
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts it again after `kill9` (same data dir, addresses and flags); returns once it listens.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "resume: the control plane still runs");
        self.spawn();
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit: its exit status, or None if it still runs.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {}: {status}", child.id());
        let exited = poll(timeout, || child.try_wait().ok().flatten());
        if exited.is_some() {
            self.child = None;
        }
        exited
    }

    /// Restarts it with other extra `serve` flags (same data dir and addresses).
    pub fn restart_with(&mut self, extra_serve_args: &[&str]) {
        self.extra_args = extra_serve_args.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Runs `trellisctl` with this control plane's admin config.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_stdin(args, None)
    }

    pub fn ctl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = netns::command(self.netns.as_deref(), bin("trellisctl"))
            .arg("--config")
            .arg(self.admin_config())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn trellisctl");
        {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("stdin");
            if let Some(text) = stdin {
                pipe.write_all(text.as_bytes()).expect("write stdin");
            }
        }
        child.wait_with_output().expect("trellisctl output")
    }

    /// Runs `trellisctl` and returns its stdout, panicking with its stderr if it failed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "trellisctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Runs `trellisctl` expecting failure; returns stderr.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            !out.status.success(),
            "trellisctl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("utf8")
    }

    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.ctl_ok(&args)).expect("trellisctl -o json output")
    }

    /// A fresh join token for `node`; returns (token, CA pin).
    pub fn token(&self, node: &str, namespaces: &[&str], extra: &[&str]) -> (String, String) {
        let mut args = vec!["token", "create", "--node", node];
        for ns in namespaces {
            args.extend(["--namespace", ns]);
        }
        args.extend(extra);
        let v = self.ctl_json(&args);
        (v["token"].as_str().expect("token").to_owned(), v["caPin"].as_str().expect("caPin").to_owned())
    }

    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("ca/root-cert.pem")).expect("root cert")
    }

    pub fn apply(&self, yaml: &str) -> String {
        let out = self.ctl_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// The per-proxy status, keyed by node.
    pub fn proxy_status(&self) -> serde_json::Value {
        self.ctl_json(&["proxy-status"])
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- control plane log ---\n{}", read_log(&self.log_path()));
        }
    }
}

/// A workload a proxy fronts, as written in the proxy's config.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub addresses: Vec<String>,
    pub ports: Vec<(u16, &'static str)>,
    pub labels: Vec<(String, String)>,
    /// `attest` selectors (Workload API), e.g. `{"uid": 1000}`.
    pub attest: Vec<serde_json::Value>,
    /// `svidFiles`, e.g. `{"dir": "/run/orders", "owner": "1000:1000"}`.
    pub svid_files: Option<serde_json::Value>,
}

impl WorkloadSpec {
    pub fn new(name: &str, namespace: &str, service_account: &str, address: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            addresses: vec![address.into()],
            ports: vec![(8080, "tcp")],
            labels: Vec::new(),
            attest: Vec::new(),
            svid_files: None,
        }
    }
}

/// Knobs of a test proxy beyond its workloads.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// `outbound.passthrough`: "deny" (default: a destination outside the mesh is refused, so that a data-path test
    /// cannot pass over direct TCP without the mesh) or "allow" (tests of passthrough say so).
    pub passthrough: Option<&'static str>,
    /// `outbound.socks5Workload` (default: the only workload).
    pub socks5_workload: Option<String>,
    /// Extra top-level config fields (e.g. `{"drainTimeout": "5s"}`), merged over the generated ones.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Run on this host (network namespace): every listener at Istio's default port, `hboneAddress` the host's.
    pub netns: Option<netns::Host>,
    /// `run --capture`: install the nftables rules (root; use with `netns`).
    pub capture: bool,
    /// `listen.workloadApi` (default: none, the Workload API is off).
    pub workload_api: Option<PathBuf>,
    /// `controlPlane.addresses` instead of `controlPlane.address` (the given control plane's address), in order.
    pub control_plane_addresses: Vec<String>,
    /// Run this `trellis-proxy` executable instead of the workspace's (the bench's `--proxy-b`: another build of it).
    pub binary: Option<PathBuf>,
}

/// A running `trellis-proxy`. Its HBONE listener is on every address (so that tunnels dialled to a workload's
/// loopback address such as 127.0.10.1 reach it) at `hbone_port`; everything else on 127.0.0.1. Every listener
/// binds port 0 and the proxy reports the ports the kernel picked (`run --addresses-file`), so no other process can
/// take them in between; the config is then rewritten with them, so that a restart binds the same ports.
pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub node: String,
    pub admin_addr: SocketAddr,
    pub socks5_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub ready_addr: SocketAddr,
    pub hbone_port: u16,
    config_path: PathBuf,
    /// The config as written (JSON form of `config_path`).
    config: serde_json::Value,
    child: Option<Child>,
    netns: Option<String>,
    capture: bool,
    /// The executable (`ProxyOptions::binary`).
    binary: PathBuf,
}

impl Proxy {
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("proxy.log")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Writes a config for `node` fronting `workloads`, joins with a fresh token, and starts the proxy.
    pub fn start(cp: &ControlPlane, node: &str, workloads: &[WorkloadSpec]) -> Self {
        Self::start_with(cp, node, workloads, ProxyOptions::default())
    }

    pub fn start_with(cp: &ControlPlane, node: &str, workloads: &[WorkloadSpec], options: ProxyOptions) -> Self {
        let namespaces: Vec<&str> = {
            let mut ns: Vec<&str> = workloads.iter().map(|w| w.namespace.as_str()).collect();
            ns.sort();
            ns.dedup();
            if ns.is_empty() {
                ns.push("default");
            }
            ns
        };
        let (token, pin) = cp.token(node, &namespaces, &[]);
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |ip: [u8; 4], port| SocketAddr::from((ip, port));
        let (admin_addr, socks5_addr, outbound_addr, inbound_addr, metrics_addr, ready_addr, hbone_port) =
            match &options.netns {
                // A namespace of its own: nothing else listens there.
                Some(_) => (
                    at([127, 0, 0, 1], 15000),
                    at([127, 0, 0, 1], 15080),
                    at([127, 0, 0, 1], 15001),
                    at([0, 0, 0, 0], 15006),
                    at([0, 0, 0, 0], 15020),
                    at([0, 0, 0, 0], 15021),
                    15008,
                ),
                // Ports the kernel picks, reported by the proxy.
                None => {
                    let any = at([127, 0, 0, 1], 0);
                    (any, any, any, any, any, any, 0)
                }
            };
        // Port 0: the port listen.hbone is bound to.
        let hbone_address = match &options.netns {
            Some(host) => host.addr(hbone_port).to_string(),
            None => format!("127.0.0.1:{hbone_port}"),
        };
        let workloads_yaml: Vec<serde_json::Value> = workloads
            .iter()
            .map(|w| {
                let mut yaml = serde_json::json!({
                    "name": w.name, "namespace": w.namespace, "serviceAccount": w.service_account,
                    "addresses": w.addresses,
                    "labels": w.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                    "ports": w.ports.iter().map(|(p, proto)| serde_json::json!({"port": p, "protocol": proto})).collect::<Vec<_>>(),
                    "attest": w.attest,
                });
                if let Some(files) = &w.svid_files {
                    yaml["svidFiles"] = files.clone();
                }
                yaml
            })
            .collect();
        let mut outbound = serde_json::json!({"passthrough": options.passthrough.unwrap_or("deny")});
        if let Some(name) = &options.socks5_workload {
            outbound["socks5Workload"] = serde_json::json!(name);
        }
        let mut config = serde_json::json!({
            "node": node,
            "controlPlane": {"address": cp.addr.to_string(), "caPin": pin, "token": token},
            "stateDir": dir.path().join("state"),
            "workloads": workloads_yaml,
            "listen": {
                "hbone": format!("0.0.0.0:{hbone_port}"),
                "outbound": outbound_addr.to_string(),
                "inbound": inbound_addr.to_string(),
                "socks5": socks5_addr.to_string(),
                "admin": admin_addr.to_string(),
                "metrics": metrics_addr.to_string(),
                "ready": ready_addr.to_string(),
            },
            "hboneAddress": hbone_address,
            "outbound": outbound,
        });
        config["listen"]["workloadApi"] =
            options.workload_api.as_ref().map_or_else(|| serde_json::json!("none"), |p| serde_json::json!(p));
        if !options.control_plane_addresses.is_empty() {
            config["controlPlane"] =
                serde_json::json!({"addresses": options.control_plane_addresses, "caPin": pin, "token": token});
        }
        for (key, value) in options.extra {
            config[key] = value;
        }
        let config_path = dir.path().join("proxy.yaml");
        std::fs::write(&config_path, serde_yaml_ng::to_string(&config).expect("yaml")).expect("write config");
        let mut proxy = Self {
            config,
            dir,
            node: node.into(),
            admin_addr,
            socks5_addr,
            outbound_addr,
            inbound_addr,
            metrics_addr,
            ready_addr,
            hbone_port,
            config_path,
            child: None,
            netns: options.netns.map(|h| h.ns),
            capture: options.capture,
            binary: options.binary.unwrap_or_else(|| bin("trellis-proxy")),
        };
        proxy.spawn();
        proxy
    }

    fn addresses_file(&self) -> PathBuf {
        self.dir.path().join("addresses.json")
    }

    /// What the proxy wrote to its `--addresses-file` (every listener bound, by name).
    pub fn bound_addresses(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.addresses_file()).expect("read the addresses file");
        serde_json::from_str(&text).expect("the addresses file is JSON")
    }

    /// Starts the proxy and waits until every listener is bound (`ready`, bound last, is in the addresses file); the
    /// first start learns the ports the kernel picked and writes them into the config.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let _ = std::fs::remove_file(self.addresses_file());
        let mut child = netns::command(self.netns.as_deref(), &self.binary)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .args(self.capture.then_some("--capture"))
            .arg("--addresses-file")
            .arg(self.addresses_file())
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn trellis-proxy");
        let reported = wait_addresses(&mut child, &self.addresses_file(), &self.log_path(), "ready");
        let bound = |key: &str| -> Option<SocketAddr> { reported.get(key)?.as_str()?.parse().ok() };
        let must = |key: &str| bound(key).unwrap_or_else(|| panic!("listen.{key} not in {reported}"));
        let first_start = self.admin_addr.port() == 0;
        (self.admin_addr, self.outbound_addr, self.inbound_addr) = (must("admin"), must("outbound"), must("inbound"));
        (self.metrics_addr, self.ready_addr, self.hbone_port) = (must("metrics"), must("ready"), must("hbone").port());
        // Only with a SOCKS5 workload.
        self.socks5_addr = bound("socks5").unwrap_or(self.socks5_addr);
        if first_start {
            let listen = &mut self.config["listen"];
            for key in ["admin", "outbound", "inbound", "metrics", "ready", "hbone", "socks5"] {
                if let Some(address) = bound(key) {
                    listen[key] = address.to_string().into();
                }
            }
            let yaml = serde_yaml_ng::to_string(&self.config).expect("yaml");
            std::fs::write(&self.config_path, yaml).expect("write config");
        }
        self.child = Some(child);
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Starts it again (after `kill9`, say), with the node credential it stored.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The proxy's `/config_dump`, once it answers.
    pub fn config_dump(&self) -> serde_json::Value {
        let (status, body) =
            http::get_in(self.netns.as_deref(), self.admin_addr, "/config_dump").expect("GET /config_dump");
        assert_eq!(status, 200, "config_dump: {body}");
        serde_json::from_str(&body).expect("config_dump JSON")
    }

    /// Waits until `/config_dump` satisfies `check`.
    pub fn wait_config(&self, what: &str, mut check: impl FnMut(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_for(what, Duration::from_secs(30), || {
            let (status, body) = http::get_in(self.netns.as_deref(), self.admin_addr, "/config_dump").ok()?;
            let dump: serde_json::Value = serde_json::from_str(&body).ok()?;
            (status == 200 && check(&dump)).then_some(dump)
        })
    }

    /// `GET /healthz/ready` on the readiness listener (`listen.ready`, Istio's 15021), as a kubelet probes it.
    pub fn readiness(&self) -> std::io::Result<(u16, String)> {
        http::get_in(self.netns.as_deref(), self.ready_addr_local(), "/healthz/ready")
    }

    /// The readiness listener's address to dial (it listens on 0.0.0.0 in a network namespace).
    fn ready_addr_local(&self) -> SocketAddr {
        if self.ready_addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], self.ready_addr.port()))
        } else {
            self.ready_addr
        }
    }

    /// Waits until the readiness probe on `listen.ready` answers 200.
    pub fn wait_ready(&self) {
        wait_for("proxy ready (200 on listen.ready /healthz/ready)", Duration::from_secs(30), || {
            // A proxy that exited (bad config, a port taken) will never be ready: fail now, with its log.
            assert!(!exited(self.pid()), "proxy {} exited before it was ready", self.node);
            self.readiness().ok().filter(|(s, _)| *s == 200).map(|_| ())
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id while the proxy runs (the benchmarks read its CPU time and memory from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM, without waiting.
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill");
            assert!(status.success(), "kill -TERM {pid}: {status}");
        }
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the process to exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.sigterm();
        let Some(child) = self.child.as_mut() else { return true };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- proxy {} log ---\n{}", self.node, read_log(&self.log_path()));
        }
    }
}

/// A `trellis-echo` process: echoes every byte back, and closes its write side after the client closes its own.
pub struct Echo {
    pub addr: SocketAddr,
    child: Child,
}

impl Echo {
    /// Starts it and waits for its "listening on" line, so that an address someone else holds is an error here
    /// rather than a test silently talking to another process. With port 0 the echo binds a port the kernel picks
    /// and `addr` is the address it reports: no window in which another process can take the port.
    pub fn start(addr: SocketAddr) -> Self {
        Self::start_in(None, addr)
    }

    /// The same inside network namespace `netns`.
    pub fn start_in(netns: Option<&str>, addr: SocketAddr) -> Self {
        let (child, addr) = spawn_listening(netns, "trellis-echo", addr);
        Self { addr, child }
    }
}

/// Starts a helper server bin with `--listen addr` (in `netns`, if given) and waits for its "listening on" line, so
/// that an address someone else holds is an error here rather than a test silently talking to another process.
/// Returns the address it reports (the port the kernel picked when `addr`'s port is 0).
fn spawn_listening(netns: Option<&str>, name: &str, addr: SocketAddr) -> (Child, SocketAddr) {
    use std::io::BufRead;
    let mut child = netns::command(netns, bin(name))
        .args(["--listen", &addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    let Some(bound) = line.strip_prefix("listening on ").and_then(|a| a.trim().parse::<SocketAddr>().ok()) else {
        let _ = child.wait();
        let mut stderr = String::new();
        let _ = child.stderr.take().map(|mut e| std::io::Read::read_to_string(&mut e, &mut stderr));
        panic!("{name} could not listen on {addr}: {line}{stderr}");
    };
    (child, bound)
}

/// A `trellis-http-echo` process: answers every HTTP/1.1 or h2c request with a JSON description of it.
pub struct HttpEcho {
    pub addr: SocketAddr,
    child: Child,
}

impl HttpEcho {
    pub fn start(addr: SocketAddr) -> Self {
        let (child, addr) = spawn_listening(None, "trellis-http-echo", addr);
        Self { addr, child }
    }
}

impl Drop for HttpEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `proxy`'s process again, started by the test itself so that it can carry environment variables (the harness's
/// child is private): the harness's process is stopped and `trellis-proxy run` starts with the same config and
/// state dir (its node credential), logging to the same file. Killed on drop.
pub struct OwnProcess(pub Child);

impl Drop for OwnProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn respawn(proxy: &mut Proxy, env: &[(&str, &str)]) -> OwnProcess {
    proxy.kill9();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(proxy.log_path()).expect("log file");
    let child = Command::new(bin("trellis-proxy"))
        .args(["run", "--config"])
        .arg(proxy.config_path())
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn trellis-proxy");
    let mut own = OwnProcess(child);
    wait_for("the respawned proxy to be ready", Duration::from_secs(30), || {
        if let Ok(Some(status)) = own.0.try_wait() {
            panic!("respawned proxy exited with {status}");
        }
        http::get(proxy.admin_addr, "/healthz/ready").ok().filter(|(s, _)| *s == 200).map(|_| ())
    });
    own
}
