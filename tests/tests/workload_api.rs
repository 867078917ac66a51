//! The SPIFFE Workload API served by the proxy (issue 17), driven by clients no one here wrote: the `spiffe` crate
//! (`trellis-spiffe-client`, run under other uids) and Python's py-spiffe over grpc-python's C core
//! (`py_spiffe_client.py`, attested by the interpreter's path); what they receive is checked with `openssl`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use trellis_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use trellis_proto::workload::{ValidateJwtsvidRequest, X509svidRequest};
use trellis_tests::prometheus::sum_samples;
use trellis_tests::{ControlPlane, Proxy, ProxyOptions, WorkloadSpec, bin, ok_json, python_exe, read_log, wait_for};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";
const OPS: &str = "spiffe://cluster.local/ns/shop/sa/ops";
const TESTER: &str = "spiffe://cluster.local/ns/shop/sa/tester";
const PYCLIENT: &str = "spiffe://cluster.local/ns/shop/sa/pyclient";

struct Setup {
    cp: ControlPlane,
    proxy: Proxy,
    socket: PathBuf,
    /// World-readable, so that clients under other uids reach the socket and write their files.
    dir: tempfile::TempDir,
}

fn setup(cp_args: &[&str]) -> Setup {
    let cp = ControlPlane::start(cp_args);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("api").join("workload.sock");
    let workload = |name: &str, ip: &str, attest: Vec<Value>| {
        let mut w = WorkloadSpec::new(name, "shop", name, ip);
        w.attest = attest;
        w
    };
    let test_exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    // SVID files for three of them: orders runs a command after each write, payments gets SIGHUP.
    let files = dir.path().join("files");
    let mut orders = workload("orders", "127.0.10.1", vec![json!({"uid": 1000})]);
    let log = files.join("orders-command.log");
    orders.svid_files = Some(json!({
        "dir": files.join("orders"), "owner": "1000:1000",
        "command": ["/bin/sh", "-c", format!("date +%s.%N >> {}", log.display())],
    }));
    let mut payments = workload("payments", "127.0.10.2", vec![json!({"uid": 1001})]);
    payments.svid_files = Some(json!({
        "dir": files.join("payments"), "owner": "1001:1001", "signal": "SIGHUP",
        "pidFile": files.join("payments-server.pid"),
    }));
    let mut ops = workload("ops", "127.0.10.3", vec![json!({"uid": 1002}), json!({"gid": 1002})]);
    ops.svid_files = Some(json!({"dir": files.join("ops"), "owner": "1002:1002"}));
    let workloads = [
        orders,
        payments,
        ops,
        workload("tester", "127.0.10.4", vec![json!({"uid": 0}), json!({"path": test_exe})]),
        workload("pyclient", "127.0.10.6", vec![json!({"path": python_exe()})]),
        // No selectors: never handed out.
        workload("web", "127.0.10.5", vec![]),
    ];
    let options = ProxyOptions {
        socks5_workload: Some("web".into()),
        // The URI form clients use in SPIFFE_ENDPOINT_SOCKET.
        workload_api: Some(PathBuf::from(format!("unix://{}", socket.display()))),
        ..ProxyOptions::default()
    };
    let proxy = Proxy::start_with(&cp, "node-a", &workloads, options);
    wait_for("the Workload API socket", Duration::from_secs(30), || socket.exists().then_some(()));
    Setup { cp, proxy, socket, dir }
}

impl Setup {
    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// `trellis-spiffe-client ARGS` as `uid` (gid the same).
    fn rust_client(&self, uid: u32, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.runnable_by_anyone("trellis-spiffe-client"));
        cmd.args(args).env("SPIFFE_ENDPOINT_SOCKET", self.endpoint()).uid(uid).gid(uid);
        cmd
    }

    /// `py_spiffe_client.py ARGS` (as root: the interpreter's path is what attests it).
    fn py_client(&self, args: &[&str]) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("py_spiffe_client.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).args(args).env("SPIFFE_ENDPOINT_SOCKET", self.endpoint());
        cmd
    }

    /// The binary `name` copied into this test's world-readable directory: clients under other uids run it from
    /// there, wherever the checkout (and its target directory) lies and whoever may enter it.
    fn runnable_by_anyone(&self, name: &str) -> PathBuf {
        let copy = self.dir.path().join(name);
        if !copy.exists() {
            std::fs::copy(bin(name), &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    }

    /// A directory `uid` may write to.
    fn out_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        dir
    }

    fn metrics(&self) -> String {
        trellis_tests::http::get(self.proxy.metrics_addr, "/metrics").unwrap().1
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The chain verifies against the bundle the client received, whose root is the mesh's; the leaf is the SPIFFE ID
/// (one URI SAN) and the key the client got is the leaf's.
fn check_with_openssl(dir: &Path, spiffe_id: &str, key_file: &str, key_form: &str, mesh_root: &str) {
    let svid = dir.join("svid.pem");
    let bundle = dir.join("bundle.pem");
    let (svid, bundle) = (svid.to_str().unwrap(), bundle.to_str().unwrap());
    let verified = openssl(&["verify", "-CAfile", bundle, "-untrusted", svid, "-purpose", "sslclient", svid]);
    assert!(verified.trim().ends_with("OK"), "{verified}");
    let leaf = openssl(&["x509", "-in", svid, "-noout", "-ext", "subjectAltName"]);
    assert!(leaf.contains(&format!("URI:{spiffe_id}")), "{leaf}");
    let bundle_root = openssl(&["x509", "-in", bundle, "-outform", "PEM"]);
    assert_eq!(bundle_root.trim(), mesh_root.trim(), "the bundle is the mesh root");
    let leaf_key = openssl(&["x509", "-in", svid, "-noout", "-pubkey"]);
    let key = dir.join(key_file);
    let key_pub = openssl(&["pkey", "-inform", key_form, "-in", key.to_str().unwrap(), "-pubout"]);
    assert_eq!(leaf_key, key_pub, "the private key handed out is the leaf's");
}

fn normalize_serial(s: &str) -> String {
    s.replace(':', "").trim_start_matches('0').to_ascii_lowercase()
}

#[test]
fn clients_under_different_uids_get_their_own_identities_verified_by_openssl() {
    let s = setup(&[]);
    let root = s.cp.root_pem();

    // Callers under different uids, through the `spiffe` crate.
    let mut serials = Vec::new();
    for (uid, expected) in [(1000, ORDERS), (1001, PAYMENTS), (1002, OPS)] {
        let out_dir = s.out_dir(&format!("uid{uid}"));
        let got = ok_json(s.rust_client(uid, &["fetch", out_dir.to_str().unwrap()]).output().unwrap(), "rust fetch");
        assert_eq!(got["spiffe_id"], expected, "uid {uid}");
        check_with_openssl(&out_dir, expected, "svid_key.der", "DER", &root);
        serials.push((expected, normalize_serial(got["serial"].as_str().unwrap())));
        let bundles = ok_json(s.rust_client(uid, &["bundles"]).output().unwrap(), "rust bundles");
        assert_eq!(bundles["trust_domains"], json!(["cluster.local"]));
    }

    // Application SVIDs are not the proxy's tunnel certificates: other serials (other keys).
    let dump = s.proxy.config_dump();
    for (id, app_serial) in &serials {
        let tunnel = dump["certificates"].as_array().unwrap().iter().find(|c| c["spiffe_id"] == *id);
        let tunnel_serial = normalize_serial(tunnel.unwrap()["serial"].as_str().unwrap());
        assert_ne!(&tunnel_serial, app_serial, "{id}: the application got the proxy's own certificate");
    }

    // Each issuance logged and counted.
    let log = read_log(&s.proxy.log_path());
    for id in [ORDERS, PAYMENTS, OPS, TESTER, PYCLIENT] {
        assert!(
            log.lines().any(|l| l.contains("application SVID (Workload API) installed") && l.contains(id)),
            "no issuance logged for {id}"
        );
        let issued =
            sum_samples(&s.metrics(), "trellis_workload_api_svids_issued_total", &[&format!("spiffe_id=\"{id}\"")]);
        assert!(issued >= 1.0, "{id}: {issued}");
    }
    assert!(log.contains("Workload API: X.509-SVIDs sent"), "handouts are logged");
}

/// grpc-python (C core) sends the socket path, percent-encoded, as `:authority`; h2 alone would reset the stream,
/// the proxy's authority relay makes it acceptable. The control case is the Rust client on the same socket above.
#[test]
fn py_spiffe_fetches_svid_and_bundle_verified_by_openssl() {
    let s = setup(&[]);
    let root = s.cp.root_pem();
    let out_dir = s.out_dir("py");
    let got = ok_json(s.py_client(&["x509", out_dir.to_str().unwrap()]).output().unwrap(), "py-spiffe x509");
    assert_eq!(got["spiffe_id"], PYCLIENT);
    assert_eq!(got["trust_domains"], json!(["cluster.local"]));
    check_with_openssl(&out_dir, PYCLIENT, "svid_key.pem", "PEM", &root);
    let log = read_log(&s.proxy.log_path());
    assert!(log.lines().any(|l| l.contains("X.509-SVIDs sent") && l.contains(PYCLIENT)), "{log}");

    // The shipped example client does the same.
    let example_dir = s.out_dir("example");
    let out = example("fetch_svid.py").arg(&example_dir).env("SPIFFE_ENDPOINT_SOCKET", s.endpoint()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("SPIFFE ID:  {PYCLIENT}")), "{stdout}");
    assert!(stdout.contains(&format!("JWT-SVID:   sub {PYCLIENT}, aud ['example']")), "{stdout}");
    check_with_openssl(&example_dir, PYCLIENT, "svid_key.pem", "PEM", &root);
}

/// `examples/workload-api/NAME ARGS` (run as root: the files are the credentials, not the uid).
fn example(name: &str) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/workload-api").join(name);
    let mut cmd = Command::new("python3");
    cmd.arg(script);
    cmd
}

fn file_serial(path: &Path) -> String {
    let text = openssl(&["x509", "-in", path.to_str().unwrap(), "-noout", "-serial"]);
    normalize_serial(text.trim().trim_start_matches("serial="))
}

/// The textbook scenario: two plain Python `ssl` programs doing mutual TLS with each other from the SVID files the
/// proxy writes, each checking the other's SPIFFE ID, across a certificate rotation (--cert-ttl 1m) without a
/// restart (the server builds a new context from the files per handshake). Refusal beside it: the server refuses
/// a client with another identity (ops's files), and says why.
#[test]
fn svid_files_serve_mutual_tls_across_rotation_without_restart() {
    let s = setup(&["--cert-ttl", "1m"]);
    let root = s.cp.root_pem();
    let files = s.dir.path().join("files");
    let (orders_dir, payments_dir, ops_dir) = (files.join("orders"), files.join("payments"), files.join("ops"));
    for dir in [&orders_dir, &payments_dir, &ops_dir] {
        wait_for("SVID files", Duration::from_secs(30), || dir.join("bundle.pem").exists().then_some(()));
    }
    // Modes and owners as configured; the chain verifies against the bundle; the key is the leaf's.
    for (dir, id, uid) in [(&orders_dir, ORDERS, 1000), (&payments_dir, PAYMENTS, 1001), (&ops_dir, OPS, 1002)] {
        use std::os::unix::fs::MetadataExt;
        let key = std::fs::metadata(dir.join("svid_key.pem")).unwrap();
        assert_eq!(key.mode() & 0o777, 0o600, "{id}: key mode");
        assert_eq!((key.uid(), key.gid()), (uid, uid), "{id}: key owner");
        let svid = std::fs::metadata(dir.join("svid.pem")).unwrap();
        assert_eq!((svid.uid(), svid.gid()), (uid, uid), "{id}: svid owner");
        check_with_openssl(dir, id, "svid_key.pem", "PEM", &root);
    }

    let port = trellis_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let pid_file = files.join("payments-server.pid");
    let server_log = s.dir.path().join("server.log");
    let mut server = example("mtls_server.py")
        .args(["--dir", payments_dir.to_str().unwrap(), "--listen", &addr, "--allow", ORDERS])
        .args(["--pid-file", pid_file.to_str().unwrap()])
        .stderr(std::fs::File::create(&server_log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the mTLS server", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&addr).ok().filter(|_| pid_file.exists())
    });
    let client = |dir: &Path| {
        example("mtls_client.py")
            .args(["--dir", dir.to_str().unwrap(), "--connect", &addr, "--expect", PAYMENTS])
            .output()
            .unwrap()
    };

    // Control: orders is served, both sides check each other.
    let first = ok_json(client(&orders_dir), "mTLS client (orders)");
    assert_eq!(first["server_id"], PAYMENTS);
    assert_eq!(first["client_id"], ORDERS);

    // Refusal at the server, with its reason: ops has a valid SVID, but not the allowed identity.
    let refused = client(&ops_dir);
    assert_eq!(refused.status.code(), Some(2), "{}", String::from_utf8_lossy(&refused.stdout));
    let log = read_log(&server_log);
    assert!(log.contains(&format!("client SPIFFE ID ['{OPS}'] is not {ORDERS}")), "{log}");

    // Rotation: both files are rewritten with new certificates before the old ones expire ...
    let (client_serial, server_serial) =
        (file_serial(&orders_dir.join("svid.pem")), file_serial(&payments_dir.join("svid.pem")));
    let started = Instant::now();
    wait_for("both SVID files renewed", Duration::from_secs(90), || {
        (file_serial(&orders_dir.join("svid.pem")) != client_serial
            && file_serial(&payments_dir.join("svid.pem")) != server_serial)
            .then_some(())
    });
    println!("both SVID files renewed {:?} after the first handshake", started.elapsed());
    // ... and the same server process (never restarted) serves the new certificate to a client presenting its own.
    let after = wait_for("a handshake with the renewed files", Duration::from_secs(30), || {
        let out = client(&orders_dir);
        out.status.success().then(|| ok_json(out, "after rotation"))
    });
    assert!(server.try_wait().unwrap().is_none(), "the server was not restarted");
    assert_eq!(after["server_id"], PAYMENTS);
    assert_eq!(after["client_id"], ORDERS);
    assert_ne!(normalize_serial(after["server_serial"].as_str().unwrap()), server_serial, "the server's new SVID");
    assert_ne!(normalize_serial(after["client_serial"].as_str().unwrap()), client_serial, "the client's new SVID");
    assert!(after["sighups"].as_u64().unwrap() >= 1, "payments' server got SIGHUP after the rewrite: {after}");
    let command_runs = std::fs::read_to_string(files.join("orders-command.log")).unwrap().lines().count();
    assert!(command_runs >= 2, "orders' command ran after the first write and the rewrite: {command_runs}");
    let written = sum_samples(&s.metrics(), "trellis_svid_files_written_total", &[&format!("spiffe_id=\"{ORDERS}\"")]);
    assert!(written >= 2.0, "{written}");
    let _ = server.kill();
    let _ = server.wait();
}

/// Resident memory (bytes) and open descriptors of a process.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = (status.lines().find_map(|l| l.strip_prefix("VmRSS:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    (kib * 1024, std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count())
}

const CALLERS: usize = 1000;

/// 1,000 callers at once, each holding a FetchX509SVID stream open: every one is answered, a new caller is still
/// served meanwhile, and the proxy's memory stays bounded and its descriptors come back when they leave.
#[test]
fn a_thousand_concurrent_callers_are_served_with_bounded_memory() {
    let s = setup(&[]);
    let pid = s.proxy.pid().unwrap();
    // Warm up: one caller through the whole path.
    ok_json(s.rust_client(1000, &["fetch", s.out_dir("warm").to_str().unwrap()]).output().unwrap(), "warm-up");
    let (rss_before, fds_before) = usage(pid);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let streams = runtime.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..CALLERS {
            let socket = s.socket.clone();
            set.spawn(async move {
                let mut client = grpc_client(&socket).await;
                let mut stream =
                    client.fetch_x509svid(with_header(X509svidRequest {}, true)).await.unwrap().into_inner();
                let first = stream.message().await.unwrap().unwrap();
                assert_eq!(first.svids[0].spiffe_id, TESTER);
                (client, stream)
            });
        }
        set.join_all().await
    });
    assert_eq!(streams.len(), CALLERS);
    let (rss_during, fds_during) = usage(pid);
    // A new caller while the thousand are open.
    let during =
        ok_json(s.rust_client(1001, &["fetch", s.out_dir("during").to_str().unwrap()]).output().unwrap(), "during");
    assert_eq!(during["spiffe_id"], PAYMENTS);
    drop(streams);
    drop(runtime);
    let (rss_after, fds_after) =
        wait_for("the proxy to close the callers' connections", Duration::from_secs(30), || {
            let (rss, fds) = usage(pid);
            (fds <= fds_before + 10).then_some((rss, fds))
        });
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{CALLERS} open FetchX509SVID streams: proxy RSS {:.1} MiB before, {:.1} MiB with them open ({:.1} KiB per \
         caller), {:.1} MiB after they left; fds {fds_before} -> {fds_during} -> {fds_after}",
        mib(rss_before),
        mib(rss_during),
        (rss_during.saturating_sub(rss_before)) as f64 / 1024.0 / CALLERS as f64,
        mib(rss_after)
    );
    assert!(fds_during >= CALLERS, "the thousand were connected at once: {fds_during}");
    // Bounded: well under a MiB per open caller.
    assert!(rss_during < rss_before + 256 * 1024 * 1024, "RSS {:.1} MiB with {CALLERS} callers", mib(rss_during));
    let again =
        ok_json(s.rust_client(1000, &["fetch", s.out_dir("again").to_str().unwrap()]).output().unwrap(), "after");
    assert_eq!(again["spiffe_id"], ORDERS);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn grpc_client(socket: &Path) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let path = socket.to_owned();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
    });
    let channel =
        tonic::transport::Endpoint::from_static("http://localhost").connect_with_connector(connector).await.unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

fn with_header<T>(message: T, header: bool) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if header {
        request.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
    }
    request
}

#[test]
fn refusals_unattested_caller_missing_header_oversized_request_garbage() {
    let s = setup(&[]);

    // Control: uid 1000 is orders.
    let out_dir = s.out_dir("control");
    let got = ok_json(s.rust_client(1000, &["fetch", out_dir.to_str().unwrap()]).output().unwrap(), "control");
    assert_eq!(got["spiffe_id"], ORDERS);

    // uid 2000 matches no workload: PermissionDenied, no key material, and the proxy says why.
    let refused_dir = s.out_dir("refused");
    let out = s.rust_client(2000, &["fetch", refused_dir.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // The crate's name for a PermissionDenied answer.
    assert!(stderr.contains("NoIdentityIssued"), "{stderr}");
    assert!(std::fs::read_dir(&refused_dir).unwrap().next().is_none(), "nothing written for a refused caller");
    // The same through `trellis-proxy workload-api fetch`, which shows the status and its reason, beside its control.
    let fetch = |uid: u32| {
        Command::new(s.runnable_by_anyone("trellis-proxy"))
            .args(["workload-api", "fetch", "--socket", &s.endpoint()])
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap()
    };
    let out = fetch(2000);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("PermissionDenied: no identity issued: the caller (uid 2000, gid 2000"), "{stderr}");
    assert!(stderr.contains("matches no workload's attest selectors"), "{stderr}");
    let out = fetch(1000);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("spiffe_id: {ORDERS}")), "{stdout}");
    assert!(
        stdout.contains("private key: PKCS#8") && stdout.contains("bundle:\n-----BEGIN CERTIFICATE-----"),
        "{stdout}"
    );
    let log = read_log(&s.proxy.log_path());
    assert!(
        log.lines().any(|l| l.contains("matches no workload's attest selectors; refused") && l.contains("uid=2000")),
        "the proxy's log names the refused caller:\n{log}"
    );
    assert!(sum_samples(&s.metrics(), "trellis_workload_api_calls_total", &["result=\"permission_denied\""]) >= 1.0);

    rt().block_on(async {
        let mut client = grpc_client(&s.socket).await;
        // With the header this test binary (uid 0, its own path) is `tester`; without it the call is refused.
        let mut stream = client.fetch_x509svid(with_header(X509svidRequest {}, true)).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.svids[0].spiffe_id, TESTER);
        drop(stream);
        let status = client.fetch_x509svid(with_header(X509svidRequest {}, false)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), "security header missing from request");

        // An oversized request is refused before it is decoded; a small one reaches the method.
        let small = ValidateJwtsvidRequest { audience: "a".into(), svid: "x".repeat(100) };
        let status = client.validate_jwtsvid(with_header(small, true)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with("JWT-SVID refused: malformed token"), "{status:?}");
        let big = ValidateJwtsvidRequest { audience: "a".into(), svid: "x".repeat(1 << 20) };
        let status = client.validate_jwtsvid(with_header(big, true)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    });
    let log = read_log(&s.proxy.log_path());
    assert!(log.contains("Workload API request without the workload.spiffe.io header refused"), "{log}");

    // Garbage bytes cost one connection, not the proxy.
    let mut garbage = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    garbage.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = garbage.write_all(&[0xde; 64 * 1024]);
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest);
    println!("garbage connection: the proxy answered {} bytes, then closed", rest.len());
    let again =
        ok_json(s.rust_client(1001, &["fetch", s.out_dir("after").to_str().unwrap()]).output().unwrap(), "after");
    assert_eq!(again["spiffe_id"], PAYMENTS);
}

#[test]
fn open_stream_receives_renewed_svids_before_expiry() {
    let s = setup(&["--cert-ttl", "1m"]);
    let mut child = s.rust_client(1000, &["watch", "3"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let started = Instant::now();
    let mut previous: Option<(String, i64)> = None;
    let mut received = 0;
    for line in stdout.lines() {
        let line = line.unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let svid: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(svid["spiffe_id"], ORDERS);
        let serial = svid["serial"].as_str().unwrap().to_owned();
        let not_after = svid["not_after"].as_i64().unwrap();
        if let Some((old_serial, old_not_after)) = &previous {
            assert_ne!(&serial, old_serial, "a push carries a new SVID");
            assert!(now < *old_not_after, "the new SVID arrived after the old one expired");
            println!("renewed after {:?}, {}s before the old SVID expired", started.elapsed(), old_not_after - now);
        }
        previous = Some((serial, not_after));
        received += 1;
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(received, 3, "three SVIDs on one stream (two renewals)");
}
