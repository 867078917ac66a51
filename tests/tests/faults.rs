//! Faults injected into real processes: the control plane killed with SIGKILL while it applies and pushes 1,000
//! policies (all or nothing, everywhere, after the restart), and a proxy out of file descriptors (the excess
//! connections closed at once with a logged, counted reason; open tunnels unaffected; service again once the
//! descriptors are free). Figures are printed, never asserted on.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trellis_tests::prometheus::sum_samples;
use trellis_tests::{ControlPlane, Echo, Proxy, ProxyOptions, WorkloadSpec, bin, http, read_log, socks, wait_for};

const A_IP: &str = "127.0.12.1";
const B_IP: &str = "127.0.12.2";
const C_IP: &str = "127.0.12.3";
const NAMESPACE: &str = "faults";

struct Mesh {
    cp: ControlPlane,
    proxies: Vec<Proxy>,
    _echoes: Vec<Echo>,
    echo_b: SocketAddr,
}

/// A control plane and one proxy per address, each fronting an echo server at its address.
fn mesh(ips: &[&str]) -> Mesh {
    let cp = ControlPlane::start(&[]);
    let mut proxies = Vec::new();
    let mut echoes = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let echo = Echo::start(format!("{ip}:0").parse().unwrap());
        let name = format!("w{i}");
        let mut spec = WorkloadSpec::new(&name, NAMESPACE, &name, ip);
        spec.ports = vec![(echo.addr.port(), "tcp")];
        proxies.push(Proxy::start(&cp, &format!("node-{i}"), &[spec]));
        echoes.push(echo);
    }
    for proxy in &proxies {
        proxy.wait_ready();
        for ip in ips {
            proxy.wait_config(&format!("{ip} in {}'s registry", proxy.node), |d| {
                d["workloads"].to_string().contains(ip)
            });
        }
    }
    let echo_b = echoes[1].addr;
    Mesh { cp, proxies, _echoes: echoes, echo_b }
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http::get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn resource_names(dump: &serde_json::Value) -> BTreeSet<String> {
    dump["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect()
}

/// `count` DENY policies for principals nobody uses (they change no decision in this test), `bulk-0000`…
fn bulk_policies(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: bulk-{i:04}\n  \
                 namespace: {NAMESPACE}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
                 principals: [\"cluster.local/ns/nobody/sa/bulk-{i}\"]\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

const BASE: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: base\n  \
                    namespace: faults\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
                    principals: [\"cluster.local/ns/nobody/sa/base\"]\n";

/// Starts `trellisctl apply -f FILE` against the control plane, without waiting for it.
fn spawn_apply(cp: &ControlPlane, file: &std::path::Path) -> std::process::Child {
    Command::new(bin("trellisctl"))
        .arg("--config")
        .arg(cp.admin_config())
        .args(["apply", "-f"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn trellisctl apply")
}

/// The pid of the process listening on `addr` (from `ss`).
fn listening_pid(addr: SocketAddr) -> u32 {
    let out = Command::new("ss").args(["-Htlnp"]).output().expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains(&format!(" {addr} "))).unwrap_or_else(|| panic!("no listener {addr}"));
    let pid = line.split("pid=").nth(1).and_then(|r| r.split(',').next()).expect("pid in ss output");
    pid.parse().expect("pid")
}

/// User and system CPU time of `pid`, in clock ticks (10 ms).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    tick(11) + tick(12)
}

/// Every proxy's resource names, sampled until `stop`: each distinct set seen, per proxy.
fn watch_sets(admins: Vec<(String, SocketAddr)>, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<(String, usize)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for (node, admin) in &admins {
                let Ok((200, body)) = http::get(*admin, "/config_dump") else { continue };
                let Ok(dump) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
                let count = resource_names(&dump).len();
                let mut seen = record.lock().unwrap();
                if !seen.contains(&(node.clone(), count)) {
                    seen.push((node.clone(), count));
                }
            }
        }
    });
    seen
}

/// SIGKILL of the control plane while it applies and pushes 1,000 policies, twice: once as soon as the first proxy
/// holds the new set (the push to the others in flight), once while the control plane works on the apply (50 ms
/// of its CPU spent since the apply started: parsing, validating or in the store's transaction, whichever the kill
/// meets). The store is all or nothing, so after each restart
/// every proxy converges to one set, the control plane's, and no proxy ever holds a part of the 1,000 (sampled
/// throughout from each proxy's `/config_dump`).
#[test]
fn control_plane_killed_during_a_push_of_1000_policies_leaves_no_proxy_with_a_partial_set() {
    let mut m = mesh(&[A_IP, B_IP, C_IP]);
    m.cp.apply(BASE);
    for proxy in &m.proxies {
        proxy.wait_config("the base policy", |d| resource_names(d).len() == 1);
    }
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bulk.yaml");
    std::fs::write(&file, bulk_policies(N)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let admins: Vec<(String, SocketAddr)> = m.proxies.iter().map(|p| (p.node.clone(), p.admin_addr)).collect();
    let seen = watch_sets(admins.clone(), stop.clone());

    for round in ["when the first proxy holds the new set", "while the control plane works on the apply"] {
        // From the base set (1) again, so each round's kill meets a real change.
        if round == "while the control plane works on the apply" {
            m.cp.ctl_ok(&["delete", "-f", file.to_str().unwrap()]);
            for proxy in &m.proxies {
                proxy.wait_config("the bulk policies deleted", |d| resource_names(d).len() == 1);
            }
        }
        let started = Instant::now();
        let mut apply = spawn_apply(&m.cp, &file);
        if round == "while the control plane works on the apply" {
            // Once the control plane has spent 50 ms of CPU since the apply started: parsing, validating or
            // storing the 1,000 documents (the kill meets whichever).
            let pid = listening_pid(m.cp.addr);
            let start = cpu_ticks(pid);
            wait_for("the control plane working on the apply", Duration::from_secs(60), || {
                (cpu_ticks(pid) >= start + 5).then_some(())
            });
        }
        if round == "when the first proxy holds the new set" {
            wait_for("a proxy holding the 1,000 policies", Duration::from_secs(60), || {
                admins
                    .iter()
                    .any(|(_, admin)| {
                        let Ok((200, body)) = http::get(*admin, "/config_dump") else { return false };
                        serde_json::from_str::<serde_json::Value>(&body)
                            .is_ok_and(|d| resource_names(&d).len() == N + 1)
                    })
                    .then_some(())
            });
        }
        m.cp.kill9();
        let killed_after = started.elapsed();
        let status = apply.wait().unwrap();
        let mut stderr = String::new();
        apply.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        m.cp.resume();
        let resumed = Instant::now();
        // The control plane's own view, after the restart: all of them or none.
        let listed = m.cp.ctl_json(&["get", "authorizationpolicies", "-n", NAMESPACE]);
        let stored = listed.as_array().map_or_else(|| listed["items"].as_array().unwrap().len(), |a| a.len());
        assert!(stored == 1 || stored == N + 1, "{round}: the store holds {stored} policies after the restart");
        for proxy in &m.proxies {
            proxy.wait_config(&format!("{round}: {} converged to the store's {stored}", proxy.node), |d| {
                resource_names(d).len() == stored && d["version"].is_number()
            });
        }
        let versions: BTreeSet<String> = m.proxies.iter().map(|p| p.config_dump()["version"].to_string()).collect();
        assert_eq!(versions.len(), 1, "{round}: one version everywhere: {versions:?}");
        wait_for(&format!("{round}: every proxy SYNCED"), Duration::from_secs(60), || {
            let status = m.cp.proxy_status();
            let proxies = status["proxies"].as_array()?;
            (proxies.len() == m.proxies.len() && proxies.iter().all(|p| p["synced"] == true)).then_some(())
        });
        println!(
            "{round}: killed {} ms after the apply started (trellisctl {status}: {}), store holds {stored}, every \
             proxy converged {} ms after the restart, versions {versions:?}",
            killed_after.as_millis(),
            stderr.lines().last().unwrap_or("no error"),
            resumed.elapsed().as_millis()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let seen = seen.lock().unwrap().clone();
    println!("resource counts seen at the proxies: {seen:?}");
    for (node, count) in &seen {
        assert!(*count == 1 || *count == N + 1, "{node} held {count} policies: a partial set");
    }
    // Traffic through the mesh after it all (the DENY policies match nobody).
    let echoed = socks::echo_round_trip(socks::connect_ok(m.proxies[0].socks5_addr, m.echo_b), b"after");
    assert_eq!(echoed, b"after");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Whether the proxy ended this connection (EOF or reset) rather than holding it open.
fn ended(mut tcp: &TcpStream) -> bool {
    tcp.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let ended = match tcp.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    tcp.set_nonblocking(false).unwrap();
    ended
}

/// A proxy whose RLIMIT_NOFILE is lowered (prlimit) to its open descriptors plus 40, flooded with 300 connections
/// on its SOCKS5 port: it keeps running; once out of descriptors it closes the excess at once (its clients see the
/// end, not a hang in the backlog), logs why through the rate limit and counts them
/// (`trellis_connections_shed_total{listener="socks5"}`, the lines beyond the burst in
/// `trellis_log_suppressed_total{log="accept_error"}`); a tunnel opened before the flood keeps echoing through
/// it; once the flood's connections are closed, a new tunnel works (the control case through the same port).
#[test]
fn a_proxy_out_of_file_descriptors_sheds_new_connections_keeps_open_ones_and_recovers() {
    let mut m = mesh(&[A_IP, B_IP]);
    let a = &m.proxies[0];
    let pid = a.pid().expect("proxy running");
    let socks5 = a.socks5_addr;
    // Control: a tunnel before anything, kept open through the flood.
    let mut open = socks::connect_ok(socks5, m.echo_b);
    let mut round_trip = |message: &[u8; 6]| {
        open.write_all(message).unwrap();
        let mut reply = [0u8; 6];
        open.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, message, "the tunnel opened before the flood");
    };
    round_trip(b"before");
    let baseline = open_fds(pid);
    let limit = baseline + 40;
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --pid {pid} --nofile={limit}: {status}");
    let shed_lines = |log: &str| log.lines().filter(|l| l.contains("out of file descriptors")).count();
    let lines_before = shed_lines(&read_log(&a.log_path()));

    const FLOOD: usize = 300;
    let flood_started = Instant::now();
    let flood: Vec<TcpStream> = (0..FLOOD).map(|_| TcpStream::connect(socks5).expect("connect")).collect();
    // The refusing side says why, in its log.
    wait_for("the proxy to log a shed connection", Duration::from_secs(30), || {
        (shed_lines(&read_log(&a.log_path())) > lines_before).then_some(())
    });
    let at_limit = open_fds(pid);
    // Clients see their connection end (the ones the proxy could accept wait in the SOCKS5 handshake).
    let ended_early = wait_for("shed connections ended at their clients", Duration::from_secs(30), || {
        let n = flood.iter().filter(|tcp| ended(tcp)).count();
        (n > 0).then_some(n)
    });
    // The open tunnel still echoes, the process still runs.
    round_trip(b"during");
    assert!(m.proxies[0].running(), "the proxy survived the flood");

    drop(flood);
    let a = &m.proxies[0];
    wait_for("the proxy's descriptors back near the baseline", Duration::from_secs(30), || {
        (open_fds(pid) <= baseline + 5).then_some(())
    });
    let after = open_fds(pid);
    // Control: a new connection through the same port works again.
    assert_eq!(socks::echo_round_trip(socks::connect_ok(socks5, m.echo_b), b"after"), b"after");
    let body = scrape(a.metrics_addr);
    let shed = sum_samples(&body, "trellis_connections_shed_total", &[r#"listener="socks5""#]);
    let suppressed = sum_samples(&body, "trellis_log_suppressed_total", &[r#"log="accept_error""#]);
    let logged = shed_lines(&read_log(&a.log_path())) - lines_before;
    println!(
        "RLIMIT_NOFILE {limit} (baseline {baseline} fds): {FLOOD} connections → {shed} shed ({logged} logged, \
         {suppressed} suppressed), {ended_early} ended at their clients when first checked; fds {baseline} → \
         {at_limit} → {after}"
    );
    assert!(shed > 0.0, "connections shed are counted");
    assert!(logged as f64 + suppressed >= shed, "each shed connection is logged or counted as suppressed");
    // 20 at once, then one a second (log_limit.rs).
    let bound = 20 + flood_started.elapsed().as_secs() as usize + 1;
    assert!(logged <= bound, "{logged} lines for {shed} shed connections (bound {bound})");
    round_trip(b"after!");
}

/// A small tmpfs mounted at a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::mount_at(dir, size)
    }

    fn mount_at(dir: tempfile::TempDir, size: &str) -> Self {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "trl-faults"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs at {}: {status}", dir.path().display());
        Self { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the file system with one file until the kernel says it is full; returns the file's path.
    fn fill(&self) -> std::path::PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // Whatever a partial block left.
        while file.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The proxy's `stateDir` on a full tmpfs: a config change is applied and served all the same, the write is
/// refused with a clear warning (ENOSPC, naming the file) and leaves no partial file behind; once space returns
/// the proxy writes the current config without waiting for another change (the control case: the same write
/// with space).
#[test]
fn a_full_state_dir_refuses_the_write_with_a_clear_error_serving_continues_and_the_write_is_retried() {
    let state = Tmpfs::mount("256k");
    let cp = ControlPlane::start(&[]);
    let mut echoes = Vec::new();
    let mut proxies = Vec::new();
    for (i, ip) in [A_IP, B_IP].iter().enumerate() {
        let echo = Echo::start(format!("{ip}:0").parse().unwrap());
        let name = format!("w{i}");
        let mut spec = WorkloadSpec::new(&name, NAMESPACE, &name, ip);
        spec.ports = vec![(echo.addr.port(), "tcp")];
        let mut options = trellis_tests::ProxyOptions::default();
        if i == 0 {
            options.extra.insert("stateDir".into(), serde_json::json!(state.path()));
        }
        proxies.push(Proxy::start_with(&cp, &format!("node-{i}"), &[spec], options));
        echoes.push(echo);
    }
    let (a, b) = (&proxies[0], &proxies[1]);
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-1's workload at node-0", |d| d["workloads"].to_string().contains(B_IP));
    let config = state.path().join("mesh-config.pb");
    let stored = |log: &str| log.lines().filter(|l| l.contains("config stored for a restart")).count();
    wait_for("the first stored config (control: a write with space)", Duration::from_secs(30), || {
        (config.exists() && stored(&read_log(&a.log_path())) > 0).then_some(())
    });

    let filler = state.fill();
    let refused = |log: &str| {
        log.lines().filter(|l| l.contains("cannot store the config") && l.contains("No space left on device")).count()
    };
    let stored_before = stored(&read_log(&a.log_path()));
    cp.apply(BASE);
    let dump = a.wait_config("the change applied with the disk full", |d| resource_names(d).len() == 1);
    let version = dump["version"].as_u64().expect("synced version");
    wait_for("the refused write, with its reason", Duration::from_secs(30), || {
        (refused(&read_log(&a.log_path())) > 0).then_some(())
    });
    let line = read_log(&a.log_path()).lines().find(|l| l.contains("cannot store the config")).unwrap().to_owned();
    println!("disk full: {line}");
    assert!(line.contains("mesh-config.pb"), "the warning names the file: {line}");
    let left: Vec<_> = std::fs::read_dir(state.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().ends_with(".tmp")),
        "a refused write leaves no partial file: {left:?}"
    );
    // Serving continues, both ways.
    let echoed = socks::echo_round_trip(socks::connect_ok(a.socks5_addr, echoes[1].addr), b"disk full");
    assert_eq!(echoed, b"disk full");
    let echoed = socks::echo_round_trip(socks::connect_ok(b.socks5_addr, echoes[0].addr), b"disk full");
    assert_eq!(echoed, b"disk full");

    std::fs::remove_file(&filler).unwrap();
    let line = wait_for("the config written once space returned", Duration::from_secs(60), || {
        let log = read_log(&a.log_path());
        (stored(&log) > stored_before)
            .then(|| log.lines().rfind(|l| l.contains("config stored for a restart")).unwrap().to_owned())
    });
    println!("space back: {line}");
    assert!(line.contains(&format!("version={version}")), "the current version is stored: {line}");
}

/// The control plane's data dir on a full tmpfs: an apply is refused with a clear error at the CLI (and nothing of
/// it is stored), the control plane keeps serving (proxy status, the mesh's tunnels); once space returns the same
/// apply succeeds (the control case), and after a SIGKILL and restart the store holds exactly what was applied.
#[test]
fn a_full_control_plane_data_dir_refuses_applies_clearly_keeps_serving_and_recovers() {
    let mut m = mesh(&[A_IP, B_IP]);
    // Move the data dir onto a small tmpfs, with the control plane stopped.
    m.cp.kill9();
    let data = m.cp.data_dir();
    let moved = m.cp.dir.path().join("data-moved");
    std::fs::rename(&data, &moved).unwrap();
    std::fs::create_dir(&data).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "trl-faults"])
        .arg(&data)
        .status()
        .expect("run mount");
    assert!(status.success(), "mount tmpfs at {}", data.display());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());
    let copied = Command::new("cp").arg("-a").arg(format!("{}/.", moved.display())).arg(&data).status().unwrap();
    assert!(copied.success(), "copy the data dir onto the tmpfs");
    m.cp.resume();
    for proxy in &m.proxies {
        proxy.wait_config("synced after the move", |d| d["version"].is_number());
    }

    let filler = data.join("filler");
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write(&block).is_ok_and(|n| n > 0) {}
        while file.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
    }
    let policies = bulk_policies(200);
    let out = m.cp.ctl_stdin(&["apply", "-f", "-"], Some(&policies));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("apply with the data dir full: {} {stderr}", out.status);
    assert!(!out.status.success(), "the apply is refused");
    assert!(
        stderr.to_lowercase().contains("no space left on device") || stderr.to_lowercase().contains("storage"),
        "a clear reason: {stderr}"
    );
    let log = read_log(&m.cp.log_path());
    println!(
        "control plane log: {}",
        log.lines().rfind(|l| l.to_lowercase().contains("space")).unwrap_or("(no line about space)")
    );
    // Nothing of it stored; still serving.
    let listed = m.cp.ctl_json(&["get", "ap", "-n", NAMESPACE]);
    assert_eq!(listed["items"].as_array().map_or(0, |a| a.len()), 0, "nothing of a refused apply is stored");
    // Both proxies connected (a proxy may still be reconnecting after the restart onto the small disk above).
    wait_for("both proxies connected while the disk is full", Duration::from_secs(30), || {
        let status = m.cp.proxy_status();
        let proxies = status["proxies"].as_array()?;
        (proxies.len() == 2 && proxies.iter().all(|p| p["connected"] == true)).then_some(())
    });
    let echoed = socks::echo_round_trip(socks::connect_ok(m.proxies[0].socks5_addr, m.echo_b), b"full");
    assert_eq!(echoed, b"full");

    // Space back: the same apply succeeds, reaches the proxies, and survives a crash.
    std::fs::remove_file(&filler).unwrap();
    let out = m.cp.ctl_stdin(&["apply", "-f", "-"], Some(&policies));
    println!(
        "apply once space returned: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
    );
    assert!(out.status.success(), "after space returned: {}", String::from_utf8_lossy(&out.stderr));
    for proxy in &m.proxies {
        proxy.wait_config("the 200 policies", |d| resource_names(d).len() == 200);
    }
    m.cp.kill9();
    m.cp.resume();
    let listed = m.cp.ctl_json(&["get", "ap", "-n", NAMESPACE]);
    assert_eq!(listed["items"].as_array().map_or(0, |a| a.len()), 200, "the store after a restart");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// A destination workload that accepts and then stops reading, with a client that keeps writing: what the proxies
/// buffer for it is bounded by the socket buffers and the HTTP/2 stream window (measured: RSS of both proxies
/// before, while the writer is blocked, after), other connections through the same proxies and the same pooled
/// HBONE connection keep echoing meanwhile, and when the client gives up (closes) the proxies' open connections
/// return to 0. The proxies have no idle timeout for tunnelled connections, so nothing closes the stalled one
/// before its client does (printed, not asserted on: a stall is not an error by itself).
#[test]
fn a_destination_that_stops_reading_costs_bounded_memory_and_other_connections_flow() {
    let cp = ControlPlane::start(&[]);
    let echo = Echo::start(format!("{B_IP}:0").parse().unwrap());
    let stall = std::net::TcpListener::bind(format!("{B_IP}:0")).unwrap();
    let stall_addr = stall.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in stall.incoming().flatten() {
            keep.lock().unwrap().push(stream); // accepted, never read
        }
    });
    let a_spec = WorkloadSpec::new("w0", NAMESPACE, "w0", A_IP);
    let mut b_spec = WorkloadSpec::new("w1", NAMESPACE, "w1", B_IP);
    b_spec.ports = vec![(echo.addr.port(), "tcp"), (stall_addr.port(), "tcp")];
    let a = Proxy::start(&cp, "node-0", &[a_spec]);
    let b = Proxy::start(&cp, "node-1", &[b_spec]);
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-1's workload at node-0", |d| d["workloads"].to_string().contains(B_IP));
    let pids = [a.pid().unwrap(), b.pid().unwrap()];
    let echo_ok = || {
        let echoed = socks::echo_round_trip(socks::connect_ok(a.socks5_addr, echo.addr), b"other traffic");
        assert_eq!(echoed, b"other traffic");
    };
    echo_ok();
    let before = pids.map(rss_kib);

    // The writer: 1 MiB blocks until a write blocks for good (nothing sent for 2 s after the last block).
    let mut stalled = socks::connect_ok(a.socks5_addr, stall_addr);
    stalled.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let block = vec![7u8; 1 << 20];
    let mut sent = 0usize;
    loop {
        match stalled.write(&block) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("writing to the stalled tunnel: {e}"),
        }
        assert!(sent < 1 << 30, "1 GiB written to a destination that reads nothing: unbounded buffering");
    }
    let during = pids.map(rss_kib);
    // Other connections flow meanwhile, over the same proxies (and the same pooled HBONE connection).
    for _ in 0..20 {
        echo_ok();
    }
    println!(
        "a destination that stops reading: the client wrote {:.1} MiB before its write blocked; RSS KiB node-0 {} → {} \
         , node-1 {} → {}",
        sent as f64 / 1048576.0,
        before[0],
        during[0],
        before[1],
        during[1]
    );
    let open = |p: &Proxy| sum_samples(&scrape(p.metrics_addr), "trellis_open_connections", &[]);
    assert!(open(&a) >= 1.0, "the stalled connection is still open at node-0 (within the 5 min write-stall timeout)");
    drop(stalled);
    held.lock().unwrap().clear();
    for proxy in [&a, &b] {
        wait_for(&format!("{}'s open connections back to 0", proxy.node), Duration::from_secs(30), || {
            (open(proxy) == 0.0).then_some(())
        });
    }
    let after = pids.map(rss_kib);
    println!("after the client closed: RSS KiB node-0 {}, node-1 {}", after[0], after[1]);
    echo_ok();
}

/// Proxy B closes the tunnels that carry nothing: one left silent for its `connection.idleTimeout` (3 s here), one
/// whose destination accepts and never reads, once B's writes to it have made no progress for its
/// `connection.writeStallTimeout` (2 s). The control: a tunnel opened at the same time through the same proxies to
/// the same server, echoing every 500 ms, stays open long after both. The closing side says why: B's access log
/// names the timeout, and `trellis_connections_timed_out_total` counts each by reason at B; A (defaults: 1 h and
/// 5 min) closes nothing itself.
#[test]
fn idle_and_stalled_tunnels_are_closed_by_their_timeouts_with_the_reason_and_an_active_one_stays_open() {
    const IDLE: Duration = Duration::from_secs(3);
    let cp = ControlPlane::start(&[]);
    let echo = Echo::start(format!("{B_IP}:0").parse().unwrap());
    let stall = std::net::TcpListener::bind(format!("{B_IP}:0")).unwrap();
    let stall_addr = stall.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in stall.incoming().flatten() {
            keep.lock().unwrap().push(stream); // accepted, never read
        }
    });
    let a_spec = WorkloadSpec::new("w0", NAMESPACE, "w0", A_IP);
    let mut b_spec = WorkloadSpec::new("w1", NAMESPACE, "w1", B_IP);
    b_spec.ports = vec![(echo.addr.port(), "tcp"), (stall_addr.port(), "tcp")];
    let a = Proxy::start(&cp, "node-0", &[a_spec]);
    let mut b_options = ProxyOptions::default();
    b_options.extra.insert("connection".into(), serde_json::json!({"idleTimeout": "3s", "writeStallTimeout": "2s"}));
    let b = Proxy::start_with(&cp, "node-1", &[b_spec], b_options);
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-1's workload at node-0", |d| d["workloads"].to_string().contains(B_IP));
    let round = |tcp: &mut TcpStream, message: &[u8]| {
        tcp.write_all(message).unwrap();
        let mut back = vec![0; message.len()];
        tcp.read_exact(&mut back).unwrap();
        assert_eq!(back, message);
    };

    let started = Instant::now();
    let mut active = socks::connect_ok(a.socks5_addr, echo.addr);
    let mut idle = socks::connect_ok(a.socks5_addr, echo.addr);
    round(&mut active, b"active");
    round(&mut idle, b"once, then silence");
    // The stalled one: a writer that sends until its connection is closed under it.
    let stalled = socks::connect_ok(a.socks5_addr, stall_addr);
    let writer = std::thread::spawn(move || {
        let mut stalled = stalled;
        let block = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        loop {
            match stalled.write(&block) {
                Ok(n) => sent += n,
                Err(e) => return (sent, e.kind(), Instant::now()),
            }
            assert!(sent < 1 << 30, "1 GiB written to a destination that reads nothing");
        }
    });

    // Echo on the active tunnel every 500 ms until both others ended, then for two more idle timeouts.
    let mut idle_closed = None;
    let mut idle = Some(idle);
    while idle_closed.is_none() || !writer.is_finished() {
        assert!(started.elapsed() < Duration::from_secs(60), "a tunnel was never closed: idle {idle_closed:?}");
        std::thread::sleep(Duration::from_millis(500));
        round(&mut active, b"ping");
        if idle.as_ref().is_some_and(ended) {
            idle_closed = Some(started.elapsed());
            // Its client closes on the end it saw (A passes a half-close on and waits for the client's side).
            idle = None;
        }
    }
    let (sent, write_error, stall_closed) = writer.join().unwrap();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(500));
        round(&mut active, b"still here");
    }
    println!(
        "idle tunnel closed {:.2?} after it opened (idle timeout {IDLE:?}); stalled tunnel's client wrote {:.1} MiB, \
         then its write failed ({write_error:?}) {:.2?} after the start; the active tunnel, {:.2?} old, still echoes",
        idle_closed.unwrap(),
        sent as f64 / 1048576.0,
        stall_closed - started,
        started.elapsed()
    );

    // The reasons, at the side that closed (B).
    let b_log = read_log(&b.log_path());
    assert!(b_log.contains("closed by the proxy: idle timeout: no byte either way for 3s"), "{b_log}");
    assert!(b_log.contains("closed by the proxy: write stalled: the peer took no byte for 2s"), "{b_log}");
    let timed_out = |p: &Proxy, reason: &str| {
        sum_samples(&scrape(p.metrics_addr), "trellis_connections_timed_out_total", &[&format!("reason=\"{reason}\"")])
    };
    assert_eq!((timed_out(&b, "idle"), timed_out(&b, "write_stall")), (1.0, 1.0), "counted at B, once each");
    assert_eq!(sum_samples(&scrape(a.metrics_addr), "trellis_connections_timed_out_total", &[]), 0.0, "A closed none");
    // The control: the active tunnel is the only one open at both proxies.
    let open = |p: &Proxy| sum_samples(&scrape(p.metrics_addr), "trellis_open_connections", &[]);
    for proxy in [&a, &b] {
        wait_for(&format!("only the active tunnel open at {}", proxy.node), Duration::from_secs(30), || {
            (open(proxy) == 1.0).then_some(())
        });
    }
    round(&mut active, b"last");
    drop(active);
    held.lock().unwrap().clear();
}
