//! A real multi-host mesh (root: hosts are network namespaces joined by a bridge) with transparent capture:
//! unmodified programs (curl, python3 http.server, a TCP echo) talk by IP and get mTLS, identity checks and policy
//! without knowing. The hosts:
//!
//! | host | role |
//! | --- | --- |
//! | 0 | control plane |
//! | 1 | proxy A, workload `shop/web` (sa web), passthrough allow |
//! | 2 | proxy B, workload `shop/api` (label app=api): http.server on 8080 (`tcp`) and 8081 (`http`), echoes on 9000 and 9001, peer-name server on 9002 |
//! | 3 | outside the mesh: no proxy, echo on 7000, plaintext clients |
//! | 4 | proxy C, workload `jobs/batch` (sa batch), passthrough deny |
//!
//! Setup failures (namespaces, nft, processes) fail the test: CI runs as root.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use trellis_tests::hbone;
use trellis_tests::netns::{Background, Host, Net, Segment, in_netns};
use trellis_tests::outcome::{self, Outcome, Refusal};
use trellis_tests::{ControlPlane, Echo, Proxy, ProxyOptions, WorkloadSpec, wait_for};

const HTTP: u16 = 8080;
/// A second http.server, on a port declared `http`: its requests go through the proxy's HTTP path (`l7`).
const HTTP_L7: u16 = 8081;
const ECHO: u16 = 9000;
const ECHO2: u16 = 9001;
/// `peername.py`: answers each connection with the client address it sees.
const PEERNAME: u16 = 9002;
const OUTSIDE_ECHO: u16 = 7000;
/// The table every host with a proxy already has before the proxy starts: capture must leave it alone.
const OTHER_TABLE: &str =
    "table inet other { chain c { type filter hook output priority 0; policy accept; tcp dport 4444 accept; }; }";

/// Fields drop in order: processes first, the namespaces (`net`) last.
struct Mesh {
    cp: ControlPlane,
    a: Proxy,
    b: Proxy,
    c: Option<Proxy>,
    _apps: Vec<Echo>,
    _bg: Vec<Background>,
    _www: tempfile::TempDir,
    /// `nft list ruleset` of host 1 before its proxy installed anything.
    ruleset_before: String,
    /// `ip rule` and `ip route show table all` (both families) of host 1 before its proxy installed anything.
    routing_before: String,
    net: Net,
}

impl Mesh {
    fn host(&self, i: usize) -> &Host {
        self.net.host(i)
    }

    fn apply(&self, yaml: &str) {
        self.cp.apply(yaml);
        let proxies = if self.c.is_some() { 3 } else { 2 };
        wait_for("every proxy to ACK the latest version", Duration::from_secs(30), || {
            let status = self.cp.proxy_status();
            let all = status["proxies"].as_array()?;
            (all.len() == proxies && all.iter().all(|p| p["synced"] == true)).then_some(())
        });
    }
}

fn sh(host: &Host, script: &str) {
    let out = host.cmd("sh").args(["-c", script]).output().expect("run sh");
    assert!(out.status.success(), "`{script}` in {}: {}", host.ns, String::from_utf8_lossy(&out.stderr));
}

/// Policy routing of `host`, both families: rules, and routes of every table (link-local ones aside).
fn routing(host: &Host) -> String {
    let mut out = String::new();
    for args in [["-4", "rule"], ["-6", "rule"]]
        .iter()
        .map(|a| a.to_vec())
        .chain([vec!["-4", "route", "show", "table", "all"], vec!["-6", "route", "show", "table", "all"]])
    {
        let run = host.cmd("ip").args(&args).output().expect("run ip");
        assert!(run.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&run.stderr));
        // Without the IPv6 link-local routes, which the kernel adds on its own some time after the link comes up.
        for line in String::from_utf8_lossy(&run.stdout).lines().filter(|l| !l.contains("fe80:")) {
            out += line;
            out.push('\n');
        }
    }
    out
}

/// What `python3 peername.py` on `to` saw as the address of a connection from `from`.
fn peer_name(from: &Host, to: SocketAddr) -> String {
    let mut stream = from.connect(to).unwrap_or_else(|e| panic!("connect {to} from {}: {e}", from.ns));
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut seen = String::new();
    stream.read_to_string(&mut seen).unwrap_or_else(|e| panic!("read from {to}: {e}"));
    seen.trim().to_owned()
}

/// Builds the five hosts; `with_c` also starts proxy C on host 4.
fn mesh(tag: &str, subnet: u8, with_c: bool) -> Mesh {
    mesh_with(tag, subnet, with_c, serde_json::Map::new())
}

/// [`mesh`], with extra config fields for proxy B.
fn mesh_with(tag: &str, subnet: u8, with_c: bool, b_extra: serde_json::Map<String, serde_json::Value>) -> Mesh {
    let net = Net::new(tag, subnet, 5);
    let (h0, h1, h2, h3, h4) = (net.host(0), net.host(1), net.host(2), net.host(3), net.host(4));

    // Applications first, reachable before any capture exists.
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.txt"), "SECRET-BODY-6f1c\n").unwrap();
    // Its access log (stderr) names each request's client address.
    let http_server = |port: u16| {
        let access_log = std::fs::File::create(www.path().join(access_log_name(port))).unwrap();
        let server = h2
            .cmd("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", &h2.ip.to_string(), "--directory"])
            .arg(www.path())
            .stdout(std::process::Stdio::null())
            .stderr(access_log)
            .spawn()
            .expect("spawn python3 -m http.server");
        Background(server)
    };
    let (server, server_l7) = (http_server(HTTP), http_server(HTTP_L7));
    let peername = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peername.py");
    let peername = h2.spawn("python3", &[peername.to_str().unwrap(), &h2.ip.to_string(), &PEERNAME.to_string()]);
    wait_for("http.server on host 2", Duration::from_secs(20), || h2.connect(h2.addr(HTTP)).ok());
    wait_for("the second http.server on host 2", Duration::from_secs(20), || h2.connect(h2.addr(HTTP_L7)).ok());
    wait_for("peername.py on host 2", Duration::from_secs(20), || h2.connect(h2.addr(PEERNAME)).ok());
    let apps = vec![
        Echo::start_in(Some(&h2.ns), h2.addr(ECHO)),
        Echo::start_in(Some(&h2.ns), h2.addr(ECHO2)),
        Echo::start_in(Some(&h3.ns), h3.addr(OUTSIDE_ECHO)),
    ];
    sh(h1, &format!("echo '{OTHER_TABLE}' | nft -f -"));
    let ruleset_before = h1.nft_ruleset();
    let routing_before = routing(h1);

    let cp = ControlPlane::start_in(h0, &[]);
    let on = |host: &Host, passthrough| ProxyOptions {
        netns: Some(host.clone()),
        capture: true,
        passthrough: Some(passthrough),
        ..ProxyOptions::default()
    };
    let mut api = WorkloadSpec::new("api", "shop", "api", &h2.ip.to_string());
    api.ports = vec![(HTTP, "tcp"), (HTTP_L7, "http"), (ECHO, "tcp"), (ECHO2, "tcp"), (PEERNAME, "tcp")];
    api.labels = vec![("app".into(), "api".into())];
    let b = Proxy::start_with(&cp, "node-b", &[api], ProxyOptions { extra: b_extra, ..on(h2, "allow") });
    let a = Proxy::start_with(
        &cp,
        "node-a",
        &[WorkloadSpec::new("web", "shop", "web", &h1.ip.to_string())],
        on(h1, "allow"),
    );
    let c = with_c.then(|| {
        Proxy::start_with(
            &cp,
            "node-c",
            &[WorkloadSpec::new("batch", "jobs", "batch", &h4.ip.to_string())],
            on(h4, "deny"),
        )
    });
    for p in [Some(&a), Some(&b), c.as_ref()].into_iter().flatten() {
        p.wait_ready();
        p.wait_config("host 2's workload in the registry", |d| d["workloads"].to_string().contains(&h2.ip.to_string()));
    }
    Mesh {
        cp,
        a,
        b,
        c,
        _apps: apps,
        _bg: vec![server, server_l7, peername],
        _www: www,
        ruleset_before,
        routing_before,
        net,
    }
}

/// Sends `message` from `from` to `to` and reads it back: `Passed` when the echo came back whole.
fn echo(from: &Host, to: SocketAddr, message: &[u8]) -> Outcome {
    match from.connect(to) {
        Ok(stream) => outcome::echo_on(stream, message),
        Err(e) => Outcome::from_io(&e),
    }
}

/// Connects from `from` to `to` and waits, sending nothing, for the other side to end the connection. A proxy
/// refusing it closes it before any byte arrives: `Refused(Closed)`, deterministically (no unread data turns its
/// close into a reset). An accepted connection to an echo server waits for data: `Hung`.
fn refusal(from: &Host, to: SocketAddr) -> Outcome {
    match from.connect(to) {
        Ok(mut stream) => outcome::closed_without_answer(&mut stream),
        Err(e) => Outcome::from_io(&e),
    }
}

/// What the proxies do to a connection they refuse: close it without an answer.
const CLOSED: Outcome = Outcome::Refused(Refusal::Closed);

/// Polls until `from` → `to` works (`want`) or is refused by being closed (`!want`): policy changes reach proxies
/// asynchronously. Panics with the last outcome.
fn wait_reach(what: &str, from: &Host, to: SocketAddr, want: bool) {
    let mut last = None;
    let reached = trellis_tests::poll(Duration::from_secs(30), || {
        let outcome = if want { echo(from, to, b"ping") } else { refusal(from, to) };
        let done = outcome == if want { Outcome::Passed } else { CLOSED };
        last = Some(outcome);
        done.then_some(())
    });
    assert!(reached.is_some(), "timed out waiting for {what}; last outcome: {last:?}");
}

fn has(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn unmodified_programs_cross_hosts_in_tls_only() {
    let m = mesh("mhenc", 61, false);
    let (a, b) = (m.host(1), m.host(2));
    let pcap = tempfile::tempdir().unwrap();
    let dump = m.net.capture_wire(1, &pcap.path().join("wire.pcap"));

    // curl on host A fetches from host B's python http.server by IP.
    let url = format!("http://{}:{HTTP}/index.txt?q=SECRET-QUERY-93ab", b.ip);
    let out = a.cmd("curl").args(["-sS", "--max-time", "20", &url]).output().expect("run curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SECRET-BODY-6f1c\n");

    // A plain TCP echo, from a socket opened on host A as any program there would.
    let message = b"SECRET-ECHO-77d0".repeat(64);
    assert_eq!(echo(a, b.addr(ECHO), &message), Outcome::Passed);

    let segments = dump.finish();
    let between =
        |s: &&Segment| (s.src.ip() == a.ip && s.dst.ip() == b.ip) || (s.src.ip() == b.ip && s.dst.ip() == a.ip);
    let ab: Vec<&Segment> = segments.iter().filter(between).collect();
    assert!(
        !ab.is_empty(),
        "no traffic between the hosts was captured ({} segments in all: {segments:?})",
        segments.len()
    );
    for s in &ab {
        assert!(s.src.port() == 15008 || s.dst.port() == 15008, "segment outside HBONE on the wire: {s:?}");
    }
    // TLS application-data records (content type 0x17, version 0x0303) both ways.
    let tls_records =
        |to_b: bool| ab.iter().filter(|s| (s.dst.ip() == b.ip) == to_b && has(&s.payload, &[0x17, 0x03, 0x03])).count();
    assert!(tls_records(true) > 0 && tls_records(false) > 0, "no TLS application data records seen");
    for marker in [&b"SECRET-BODY"[..], b"SECRET-QUERY", b"SECRET-ECHO", b"index.txt", b"HTTP/1"] {
        assert!(!segments.iter().any(|s| has(&s.payload, marker)), "{:?} crossed the wire in clear", marker);
    }
}

/// The access log of host 2's http.server on `port`.
fn access_log_name(port: u16) -> String {
    format!("access-{port}.log")
}

/// The client addresses host 2's http.server on `port` logged, in order (its access log:
/// `<client> - - [date] "GET ..."`).
fn access_log_clients(m: &Mesh, port: u16) -> Vec<String> {
    let log = std::fs::read_to_string(m._www.path().join(access_log_name(port))).unwrap_or_default();
    log.lines().filter(|l| l.contains("\"GET ")).filter_map(|l| l.split(' ').next()).map(str::to_owned).collect()
}

/// curl on `from` fetches index.txt from host 2's http.server on `port`, twice on one connection (the second
/// request reuses the proxy's upstream connection); returns the client addresses its access log names.
fn curl_seen_as(m: &Mesh, from: &Host, port: u16) -> Vec<String> {
    let before = access_log_clients(m, port).len();
    let url = format!("http://{}:{port}/index.txt", m.host(2).ip);
    let out = from.cmd("curl").args(["-sS", "--max-time", "20", &url, &url]).output().expect("run curl");
    assert!(out.status.success(), "curl from {}: {}", from.ns, String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SECRET-BODY-6f1c\n".repeat(2));
    wait_for("http.server to log both requests", Duration::from_secs(20), || {
        let seen = access_log_clients(m, port);
        (seen.len() >= before + 2).then(|| seen[before..].to_vec())
    })
}

/// `capture.preserveSourceAddress` (on by default): host 2's workloads see their clients' own addresses, through a
/// tunnel from host 1's workload and from a plaintext client on host 3 alike, in http.server's access log and in
/// getpeername; on a `tcp` port and on an `http` port (whose requests proxy B forwards over its own HTTP
/// connections to the workload) alike. The control case with the option off is
/// `source_address_is_the_proxys_when_preservation_is_off`.
#[test]
fn workloads_see_their_clients_addresses() {
    let m = mesh("mhsrc", 67, false);
    let (a, b, outside) = (m.host(1), m.host(2), m.host(3));
    for (client, path) in [(a, "tunnelled from proxy A"), (outside, "plaintext inbound")] {
        assert_eq!(peer_name(client, b.addr(PEERNAME)), client.ip.to_string(), "getpeername, {path}");
        let ip = client.ip.to_string();
        for port in [HTTP, HTTP_L7] {
            assert_eq!(
                curl_seen_as(&m, client, port),
                [ip.clone(), ip.clone()],
                "http.server access log, port {port}, {path}"
            );
        }
    }
    // The return route is what brings the workload's answers back to proxy B (they are addressed to host 1 or 3).
    let rules = routing(b);
    assert!(rules.contains("fwmark 0x7473 lookup 7472"), "{rules}");
    assert!(b.nft_ruleset().contains("chain preserve_source"), "no preserve_source chain on host 2");
    // Proxy A's claim of its workload's address was trusted (registry: that workload, that identity, that node).
    let log = trellis_tests::read_log(&m.b.log_path());
    assert!(!log.contains("original source address not trusted"), "{log}");
}

/// Control for [`workloads_see_their_clients_addresses`], through the same paths: with
/// `capture.preserveSourceAddress: false` on proxy B, its workloads see proxy B's address (host 2's), and no return
/// route is installed.
#[test]
fn source_address_is_the_proxys_when_preservation_is_off() {
    let extra = serde_json::json!({"capture": {"preserveSourceAddress": false}});
    let m = mesh_with("mhnosrc", 68, false, extra.as_object().unwrap().clone());
    let (a, b, outside) = (m.host(1), m.host(2), m.host(3));
    for (client, path) in [(a, "tunnelled from proxy A"), (outside, "plaintext inbound")] {
        assert_eq!(peer_name(client, b.addr(PEERNAME)), b.ip.to_string(), "getpeername, {path}");
        let ip = b.ip.to_string();
        for port in [HTTP, HTTP_L7] {
            assert_eq!(
                curl_seen_as(&m, client, port),
                [ip.clone(), ip.clone()],
                "http.server access log, port {port}, {path}"
            );
        }
    }
    let rules = routing(b);
    assert!(!rules.contains("lookup 7472"), "{rules}");
    assert!(!b.nft_ruleset().contains("chain preserve_source"), "preserve_source chain with the option off");
}

/// A raw HBONE client on `from` (presenting `credential`, over a socket carrying the capture mark so that a
/// capturing host lets it out like its proxy's own) asks for peername.py on host 2 claiming `claimed` as the original
/// source; returns what peername.py saw.
fn peer_name_claiming(m: &Mesh, from: &Host, credential: &hbone::Credential, claimed: &str) -> String {
    let (roots, credential) = (hbone::roots(&m.cp.root_pem()), credential.clone());
    let (hbone_addr, target) = (m.host(2).addr(15008), m.host(2).addr(PEERNAME).to_string());
    let forwarded = format!("for=\"{claimed}\"");
    in_netns(&from.ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            trellis_data_plane::sockets::set_mark(0x7472);
            let tcp = trellis_data_plane::sockets::connect(hbone_addr).await.expect("connect to proxy B's HBONE port");
            let mut connection =
                hbone::connect_over(tcp, roots, "spiffe://cluster.local/ns/shop/sa/api", Some(credential))
                    .await
                    .unwrap_or_else(|o| panic!("HBONE connection: {o:?}"));
            let mut stream = connection.open(&target, &[("forwarded", &forwarded)]).await.expect("CONNECT");
            let mut seen = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut seen).await.expect("read peername");
            seen.trim().to_owned()
        })
    })
}

/// The `Forwarded` address a tunnel claims is only used as the dial's source when the registry vouches for it: a
/// workload at that address with the identity the peer authenticated as, fronted by the node the tunnel came
/// from. Otherwise proxy B dials from its own address and says why. Control: the same client, credential and path
/// claiming its own workload's address from its own node.
#[test]
fn a_claimed_source_address_is_used_only_when_the_registry_vouches_for_it() {
    let m = mesh("mhfwd", 69, false);
    let (a, b, outside) = (m.host(1), m.host(2), m.host(3));
    let web = hbone::valid_credential(&m.cp.data_dir(), "spiffe://cluster.local/ns/shop/sa/web");
    let claim = |ip: std::net::Ipv4Addr| format!("{ip}:4000");
    assert_eq!(
        peer_name_claiming(&m, a, &web, &claim(a.ip)),
        a.ip.to_string(),
        "control: web's address from web's node"
    );
    // Host 3's address is no workload's.
    assert_eq!(
        peer_name_claiming(&m, a, &web, &claim(outside.ip)),
        b.ip.to_string(),
        "a claim of a non-workload address"
    );
    // web's address, but the tunnel comes from host 3, not from the node that fronts web.
    assert_eq!(peer_name_claiming(&m, outside, &web, &claim(a.ip)), b.ip.to_string(), "a claim from another node");
    let log = trellis_tests::read_log(&m.b.log_path());
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("original source address not trusted")).collect();
    assert!(refusals.iter().any(|l| l.contains("no mesh workload has that address")), "{log}");
    assert!(refusals.iter().any(|l| l.contains(&format!("fronted by the proxy at {}, not the peer", a.ip))), "{log}");
}

#[test]
fn peer_authentication_on_the_plaintext_inbound_listener() {
    let m = mesh("mhpa", 62, false);
    let (a, b, outside) = (m.host(1), m.host(2), m.host(3));

    // No PeerAuthentication: PERMISSIVE, as Istio. A client outside the mesh gets in, so does the mesh client.
    assert_eq!(echo(outside, b.addr(ECHO), b"plaintext"), Outcome::Passed, "default PERMISSIVE refused plaintext");
    assert_eq!(echo(a, b.addr(ECHO), b"mesh"), Outcome::Passed);
    // The plaintext connection is reported as such.
    let (_, metrics) =
        trellis_tests::http::get_in(Some(&b.ns), "127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("connection_security_policy=\"none\"")
            && l.contains("destination_workload=\"api\"")),
        "{metrics}"
    );

    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
    m.apply(strict);
    wait_reach("namespace STRICT to refuse plaintext", outside, b.addr(ECHO), false);
    assert_eq!(echo(a, b.addr(ECHO), b"mesh"), Outcome::Passed, "STRICT must not refuse mTLS from the mesh");
    let log = trellis_tests::read_log(&m.b.log_path());
    assert!(log.contains("requires mTLS"), "the refusal names the reason:\n{log}");

    // Port-level exception on the workload: 9001 PERMISSIVE, the rest inherits the namespace's STRICT.
    m.apply("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {matchLabels: {app: api}}\n  portLevelMtls: {9001: {mode: PERMISSIVE}}\n");
    wait_reach("port-level PERMISSIVE on 9001", outside, b.addr(ECHO2), true);
    assert_eq!(refusal(outside, b.addr(ECHO)), CLOSED, "9000 must stay STRICT");

    // Namespace STRICT, workload DISABLE: plaintext gets in on every port.
    m.apply("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {matchLabels: {app: api}}\n  mtls: {mode: DISABLE}\n");
    wait_reach("workload DISABLE over namespace STRICT", outside, b.addr(ECHO), true);

    // Authorization sees a plaintext peer: a DENY for notPrincipals ["*"] refuses it, the mesh client still passes.
    m.apply("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-plaintext, namespace: shop}\nspec:\n  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]\n");
    wait_reach("DENY notPrincipals [*] to refuse plaintext", outside, b.addr(ECHO), false);
    let log = trellis_tests::read_log(&m.b.log_path());
    assert!(log.contains("denied by DENY policy shop/deny-plaintext"), "the refusal names the policy:\n{log}");
    assert_eq!(echo(a, b.addr(ECHO), b"mesh"), Outcome::Passed);
    // An open plaintext connection is closed when a policy change denies it.
    m.cp.ctl_ok(&["delete", "ap", "deny-plaintext", "-n", "shop"]);
    wait_reach("plaintext allowed again", outside, b.addr(ECHO), true);
    let mut open = outside.connect(b.addr(ECHO)).unwrap();
    open.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    open.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    open.read_exact(&mut one).unwrap();
    m.apply("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {matchLabels: {app: api}}\n  mtls: {mode: STRICT}\n");
    // Closed by node-b: EOF or reset (`Hung` means it stayed open).
    let closed = outcome::closed_without_answer(&mut open);
    assert!(matches!(closed, Outcome::Refused(Refusal::Closed | Refusal::Reset)), "the open connection: {closed:?}");
}

/// Requests on a plaintext connection to an `http` port (captured at 15006, PERMISSIVE) take the same HTTP path as
/// tunnelled ones: each is authenticated and authorized with its HTTP attributes, with a plaintext peer (no
/// principal). curl on host 3 (outside the mesh) to host 2's http.server on `HTTP_L7`: a path rule allows /allowed
/// and refuses /denied with 403 at proxy B (access log and metric name the refusal, http.server never sees it); a
/// `requestPrincipals` rule refuses /protected without a token and lets it through with a valid JWT; the requests
/// are counted in istio_requests_total with connection_security_policy="none".
#[test]
fn plaintext_requests_to_an_http_port_are_authorized_one_by_one() {
    let m = mesh("mhl7", 69, false);
    let (b, outside) = (m.host(2), m.host(3));
    for file in ["allowed", "denied", "protected"] {
        std::fs::write(m._www.path().join(file), format!("{file} body\n")).unwrap();
    }
    let t = trellis_tests::jose(serde_json::json!({
        "keys": {"rs": {"kind": "RS256", "kid": "rs"}},
        "jwks": {"one": ["rs"]},
        "tokens": {"alice": {"key": "rs", "claims": {"iss": "https://issuer1.example", "sub": "alice", "exp": 600}}}
    }));
    let jwks = t["jwks"]["one"].as_str().unwrap();
    let alice = t["tokens"]["alice"].as_str().unwrap();
    m.apply(&format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules: [{{issuer: \"https://issuer1.example\", jwks: '{jwks}'}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: l7, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules:
  - to: [{{operation: {{methods: [GET], paths: [/allowed]}}}}]
  - from: [{{source: {{requestPrincipals: [\"https://issuer1.example/alice\"]}}}}]
    to: [{{operation: {{paths: [/protected]}}}}]
"
    ));
    // One curl per request, from outside the mesh: a plaintext connection captured on host 2.
    let curl = |path: &str, token: Option<&str>| {
        let url = format!("http://{}:{HTTP_L7}{path}", b.ip);
        let mut cmd = outside.cmd("curl");
        cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}", &url]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("authorization: Bearer {token}")]);
        }
        let out = cmd.output().expect("run curl");
        assert!(out.status.success(), "curl {path}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("curl's status line");
        (code.parse::<u16>().expect("a status"), body.to_owned())
    };
    let served = |path: &str| {
        let log = std::fs::read_to_string(m._www.path().join(access_log_name(HTTP_L7))).unwrap_or_default();
        log.lines().filter(|l| l.contains(&format!("\"GET {path} "))).count()
    };

    // The control: allowed by the path rule, from a plaintext client (which an HTTP rule on a TCP connection would
    // never match).
    assert_eq!(curl("/allowed", None), (200, "allowed body\n".into()), "GET /allowed");
    assert_eq!(curl("/denied", None), (403, "RBAC: access denied".into()), "GET /denied");
    // requestPrincipals: no token matches none; alice's token matches.
    assert_eq!(curl("/protected", None), (403, "RBAC: access denied".into()), "GET /protected without a token");
    assert_eq!(curl("/protected", Some(alice)), (200, "protected body\n".into()), "GET /protected with a JWT");
    assert_eq!(
        curl("/protected", Some("not.a.jwt")),
        (401, "Jwt verification fails".into()),
        "GET /protected with a bad token"
    );

    // The workload saw the allowed requests only (logged as they were answered, so the last one is there).
    wait_for("http.server to log the allowed requests", Duration::from_secs(20), || {
        (served("/allowed") == 1 && served("/protected") == 1).then_some(())
    });
    assert_eq!(served("/denied"), 0, "a refused request reached the workload");
    // Refused at proxy B, by the per-request check, as plaintext: its access log names each refusal.
    let log = trellis_tests::read_log(&m.b.log_path());
    let refused = |path: &str| {
        let entry = [
            &format!("path=\"{path}\""),
            "response_code=403",
            "decision=\"denied\"",
            "response_flags=\"DENY\"",
            "connection_security_policy=\"none\"",
            "source_principal=\"unknown\"",
            "policy=\"-\"",
        ];
        log.lines().filter(|l| l.contains("request") && entry.iter().all(|part| l.contains(part))).count()
    };
    assert_eq!((refused("/denied"), refused("/protected")), (1, 1), "proxy B's access log:\n{log}");
    assert!(
        log.lines().any(|l| l.contains("path=\"/protected\"")
            && l.contains("request_principal=\"https://issuer1.example/alice\"")
            && l.contains("response_code=200")
            && l.contains("policy=\"shop/l7\"")),
        "{log}"
    );

    let (_, metrics) =
        trellis_tests::http::get_in(Some(&b.ns), "127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap();
    let requests = |code: &str, flags: &str| {
        let labels = [
            "reporter=\"destination\"",
            "connection_security_policy=\"none\"",
            "destination_workload=\"api\"",
            "source_workload=\"unknown\"",
            code,
            flags,
        ];
        trellis_tests::prometheus::sum_samples(&metrics, "istio_requests_total", &labels)
    };
    assert_eq!(requests("response_code=\"200\"", "response_flags=\"-\""), 2.0, "{metrics}");
    assert_eq!(requests("response_code=\"403\"", "response_flags=\"DENY\""), 2.0, "{metrics}");
    assert_eq!(requests("response_code=\"401\"", ""), 1.0, "{metrics}");
    let sizes = |name: &str| {
        trellis_tests::prometheus::sum_samples(
            &metrics,
            &format!("{name}_count"),
            &["connection_security_policy=\"none\""],
        )
    };
    assert_eq!((sizes("istio_request_bytes"), sizes("istio_response_bytes")), (5.0, 5.0), "{metrics}");
}

#[test]
fn passthrough_and_principal_policies_across_hosts() {
    let m = mesh("mhpol", 63, true);
    let (a, b, outside, c) = (m.host(1), m.host(2), m.host(3), m.host(4));

    // A mesh workload calling an address outside the mesh: passed through by A (allow), refused by C (deny).
    assert_eq!(echo(a, outside.addr(OUTSIDE_ECHO), b"out"), Outcome::Passed, "passthrough allow");
    assert_eq!(refusal(c, outside.addr(OUTSIDE_ECHO)), CLOSED, "passthrough deny");
    let log = trellis_tests::read_log(&m.c.as_ref().unwrap().log_path());
    assert!(log.contains("outbound.passthrough is deny"), "{log}");

    // Both mesh clients reach the server, until an ALLOW by principal admits only host A's workload.
    assert_eq!(echo(a, b.addr(ECHO), b"web"), Outcome::Passed);
    assert_eq!(echo(c, b.addr(ECHO), b"batch"), Outcome::Passed);
    m.apply("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api-allow-web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: api}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]\n");
    wait_reach("host C's workload to be refused", c, b.addr(ECHO), false);
    let log = trellis_tests::read_log(&m.b.log_path());
    assert!(log.contains("no ALLOW policy matched"), "node-b names the reason for refusing host C:\n{log}");
    assert_eq!(echo(a, b.addr(ECHO), b"web"), Outcome::Passed, "host A's workload must still be admitted");
    // And a plaintext client matches no principal.
    assert_eq!(refusal(outside, b.addr(ECHO)), CLOSED, "a plaintext client matches no principal");
}

#[test]
fn a_dead_proxy_fails_closed_and_rules_are_installed_once_and_removed_exactly() {
    let mut m = mesh("mhfail", 64, false);
    let (a, b, outside) = (m.host(1).clone(), m.host(2).clone(), m.host(3).clone());
    assert_eq!(echo(&a, b.addr(ECHO), b"up"), Outcome::Passed);
    let pcap = tempfile::tempdir().unwrap();
    let dump = m.net.capture_wire(1, &pcap.path().join("wire.pcap"));

    // Proxy A crashes: its rules stay, so A's traffic is refused locally instead of leaving in clear.
    m.a.kill9();
    let err = a.connect(b.addr(ECHO)).expect_err("a connection left host A with its proxy down");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let out =
        a.cmd("curl").args(["-sS", "--max-time", "10", &format!("http://{}:{HTTP}/index.txt", b.ip)]).output().unwrap();
    // curl's exit code 7: the connection was refused (the capture rules send it to a listener that is gone).
    assert_eq!(out.status.code(), Some(7), "curl with the proxy down: {}", String::from_utf8_lossy(&out.stderr));
    let segments = dump.finish();
    let leaked: Vec<&Segment> =
        segments.iter().filter(|s| s.dst.ip() == b.ip && [HTTP, ECHO].contains(&s.dst.port())).collect();
    assert!(leaked.is_empty(), "packets went to the destination in clear: {leaked:?}");

    // Proxy B crashes: plaintext clients are refused at B, never reach the workload.
    m.b.kill9();
    let err = outside.connect(b.addr(ECHO)).expect_err("plaintext reached a workload whose proxy is down");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    m.b.restart();
    m.b.wait_ready();

    // Restart: the leftover table is replaced, not duplicated.
    m.a.restart();
    m.a.wait_ready();
    m.a.wait_config("registry", |d| d["workloads"].to_string().contains(&b.ip.to_string()));
    let tables = a.cmd("nft").args(["list", "tables"]).output().unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert_eq!(tables.lines().filter(|l| l.trim() == "table inet trellis").count(), 1, "{tables}");
    // And so is the return route's rule, one per family.
    let rules = routing(&a);
    assert_eq!(rules.lines().filter(|l| l.contains("fwmark 0x7473 lookup 7472")).count(), 2, "{rules}");
    wait_reach("traffic through the restarted proxy", &a, b.addr(ECHO), true);

    // A clean exit removes exactly what was installed.
    assert!(m.a.terminate(Duration::from_secs(30)), "proxy A did not exit on SIGTERM");
    assert_eq!(a.nft_ruleset(), m.ruleset_before, "the ruleset after a clean exit differs from before install");
    assert_eq!(routing(&a), m.routing_before, "the policy routing after a clean exit differs from before install");

    // The operator commands: install twice (one table), status, uninstall: byte-identical ruleset again.
    let proxy = |args: &[&str]| {
        let out = a
            .cmd(trellis_tests::bin("trellis-proxy"))
            .args(args)
            .arg("--config")
            .arg(m.a.config_path())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    assert_eq!(proxy(&["capture", "status"]).0, Some(1));
    for _ in 0..2 {
        let (code, text) = proxy(&["capture", "install"]);
        assert_eq!(code, Some(0), "{text}");
    }
    let (code, text) = proxy(&["capture", "status"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.matches("table inet trellis").count(), 1, "{text}");
    assert!(text.contains("redirect to :15001") && text.contains("redirect to :15006"), "{text}");
    assert_ne!(routing(&a), m.routing_before, "`capture install` did not add the return route");
    let (code, text) = proxy(&["capture", "uninstall"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(a.nft_ruleset(), m.ruleset_before);
    assert_eq!(routing(&a), m.routing_before);
}

/// Without the `nft` tool, capture fails and says what is missing (nothing is touched: no namespace needed):
/// the operator commands, and `run --capture`, which stops before it listens or joins.
#[test]
fn capture_without_nft_names_the_missing_tool() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        "node: a\ncontrolPlane: {address: '10.200.65.1:15012', caPin: 'sha256:0000000000000000000000000000000000000000000000000000000000000000'}\nstateDir: /nonexistent\nlisten: {admin: '127.0.0.1:0'}\n",
    )
    .unwrap();
    let addresses = dir.path().join("addresses.json");
    let runs: [&[&str]; 4] =
        [&["capture", "install"], &["capture", "uninstall"], &["capture", "status"], &["run", "--capture"]];
    for args in runs {
        let mut child = std::process::Command::new(trellis_tests::bin("trellis-proxy"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .args((args[0] == "run").then_some("--addresses-file"))
            .args((args[0] == "run").then_some(&addresses))
            .env("PATH", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A proxy that went on without its rules would keep running: that is a failure too, not a hang.
        let exited = trellis_tests::poll(Duration::from_secs(20), || child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(exited.is_some_and(|status| !status.success()), "{args:?} went on without nft: {exited:?} {stderr}");
        assert!(stderr.contains("`nft` was not found on PATH: install nftables"), "{args:?}: {stderr}");
    }
    // `run --capture` stopped before binding anything (its first listener would have been reported).
    assert!(!addresses.exists(), "run --capture listened without its capture rules");
}

/// IPv6 as IPv4 (README, capture): host 1 runs a dual-stack workload `web`; host 2 an IPv6-only workload `api`
/// (http.server and peername.py on its IPv6 address only); host 3 a dual-stack workload `db` with an echo on both
/// addresses. Unmodified programs on host 1 reach both over IPv6 through the mesh (the HBONE tunnel itself runs over
/// IPv6 to the destination's IPv6 address), host 3 over IPv4 too, the destination sees host 1's IPv6 address, and
/// nothing but TLS on 15008 crosses host 1's wire. Control case first: the same IPv6 connections work before any
/// proxy, so the test proves the mesh carries them rather than the network alone.
#[test]
fn ipv6_workloads_are_captured_and_cross_in_tls_only() {
    let net = Net::new("mhv6", 66, 4);
    let (h0, h1, h2, h3) = (net.host(0), net.host(1), net.host(2), net.host(3));
    for i in 1..=3 {
        net.add_ipv6(i);
    }
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.txt"), "SECRET-BODY-v6\n").unwrap();
    let access_log = std::fs::File::create(www.path().join("access.log")).unwrap();
    let server = h2
        .cmd("python3")
        .args(["-m", "http.server", &HTTP.to_string(), "--bind", &h2.ipv6().to_string(), "--directory"])
        .arg(www.path())
        .stdout(std::process::Stdio::null())
        .stderr(access_log)
        .spawn()
        .expect("spawn python3 -m http.server");
    let peername = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peername.py");
    let _bg = [
        Background(server),
        h2.spawn("python3", &[peername.to_str().unwrap(), &h2.ipv6().to_string(), &PEERNAME.to_string()]),
    ];
    let _apps = [Echo::start_in(Some(&h3.ns), h3.addr(ECHO)), Echo::start_in(Some(&h3.ns), h3.addr6(ECHO))];
    // Control: without the mesh, IPv6 works between the hosts.
    wait_for("http.server on host 2 over IPv6", Duration::from_secs(20), || h1.connect(h2.addr6(HTTP)).ok());
    wait_for("peername.py on host 2", Duration::from_secs(20), || h1.connect(h2.addr6(PEERNAME)).ok());
    assert_eq!(echo(h1, h3.addr6(ECHO), b"v6"), Outcome::Passed, "IPv6 between the hosts before the mesh");

    let cp = ControlPlane::start_in(h0, &[]);
    let on = |host: &Host| ProxyOptions {
        netns: Some(host.clone()),
        capture: true,
        passthrough: Some("deny"),
        ..ProxyOptions::default()
    };
    let mut web = WorkloadSpec::new("web", "shop", "web", &h1.ip.to_string());
    web.addresses.push(h1.ipv6().to_string());
    let mut api = WorkloadSpec::new("api", "shop", "api", &h2.ipv6().to_string());
    api.ports = vec![(HTTP, "tcp"), (PEERNAME, "tcp")];
    let mut db = WorkloadSpec::new("db", "shop", "db", &h3.ip.to_string());
    db.addresses.push(h3.ipv6().to_string());
    db.ports = vec![(ECHO, "tcp")];
    let proxies = [Proxy::start_with(&cp, "node-b", &[api], on(h2)), Proxy::start_with(&cp, "node-c", &[db], on(h3))];
    let a = Proxy::start_with(&cp, "node-a", &[web], on(h1));
    for p in proxies.iter().chain([&a]) {
        p.wait_ready();
        p.wait_config("every workload in the registry", |d| {
            let w = d["workloads"].to_string();
            [h1.ipv6(), h2.ipv6(), h3.ipv6()].iter().all(|ip| w.contains(&ip.to_string()))
        });
    }
    let pcap = tempfile::tempdir().unwrap();
    let dump = net.capture_wire(1, &pcap.path().join("wire.pcap"));

    // curl → http.server over IPv6 only.
    let url = format!("http://[{}]:{HTTP}/index.txt?q=SECRET-QUERY-v6", h2.ipv6());
    let out = h1.cmd("curl").args(["-sS", "--max-time", "20", "-g", &url]).output().expect("run curl");
    assert!(out.status.success(), "curl over IPv6: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SECRET-BODY-v6\n");
    let logged = wait_for("http.server to log the request", Duration::from_secs(20), || {
        std::fs::read_to_string(www.path().join("access.log")).ok().filter(|l| l.contains("GET /index.txt"))
    });
    assert!(logged.starts_with(&format!("{} ", h1.ipv6())), "http.server saw another client: {logged}");
    assert_eq!(peer_name(h1, h2.addr6(PEERNAME)), h1.ipv6().to_string(), "getpeername over IPv6");
    // The dual-stack host, by both families.
    let message = b"SECRET-ECHO-v6".repeat(32);
    assert_eq!(echo(h1, h3.addr6(ECHO), &message), Outcome::Passed, "dual-stack host over IPv6");
    assert_eq!(echo(h1, h3.addr(ECHO), &message), Outcome::Passed, "dual-stack host over IPv4");

    let segments = dump.finish();
    let v6: Vec<&Segment> = segments.iter().filter(|s| s.src.is_ipv6()).collect();
    assert!(
        v6.iter().any(|s| s.dst == h2.addr6(15008)) && v6.iter().any(|s| s.dst == h3.addr6(15008)),
        "no HBONE over IPv6 seen: {v6:?}"
    );
    // Besides the control plane's own connection (host 0), only HBONE crosses host 1's wire.
    for s in segments.iter().filter(|s| s.src.ip() != h0.ip && s.dst.ip() != h0.ip) {
        assert!(s.src.port() == 15008 || s.dst.port() == 15008, "segment outside HBONE on the wire: {s:?}");
    }
    for marker in [&b"SECRET-BODY"[..], b"SECRET-QUERY", b"SECRET-ECHO", b"index.txt", b"HTTP/1"] {
        assert!(!segments.iter().any(|s| has(&s.payload, marker)), "{:?} crossed the wire in clear", marker);
    }
    // The proxies listen on both families where capture delivers.
    let listening = h1.cmd("ss").args(["-H", "-ltn"]).output().expect("run ss (iproute2)");
    let listening = String::from_utf8_lossy(&listening.stdout);
    for twin in ["[::1]:15001 ", "[::]:15006 ", "[::]:15008 "] {
        assert!(listening.contains(twin), "no IPv6 listener {twin}: {listening}");
    }
    // And say so in their addresses file, beside the IPv4 listeners.
    let bound = a.bound_addresses();
    let twins = ["outboundIpv6", "inboundIpv6", "hboneIpv6"].map(|k| bound[k].as_str().unwrap_or("-").to_owned());
    assert_eq!(twins, ["[::1]:15001", "[::]:15006", "[::]:15008"], "{bound}");
}
