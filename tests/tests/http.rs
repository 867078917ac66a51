//! HTTP-aware enforcement with real processes: a client proxy (SOCKS5) tunnels to a server proxy whose workload
//! port is declared `http`; the server proxy authenticates (RequestAuthentication) and authorizes every request and
//! forwards allowed ones to `trellis-http-echo`. Tokens are signed by an independent JOSE implementation (Python's
//! PyJWT with `cryptography`) with keys generated per run.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::http::{Conn, Response};
use trellis_tests::outcome::{Outcome, Refusal};
use trellis_tests::{ControlPlane, HttpEcho, Proxy, WorkloadSpec, jose, socks, wait_for};

const CLIENT: &str = "127.0.12.1";
const API: &str = "127.0.12.2";
const HOST: &str = "shop.example";

struct Mesh {
    cp: ControlPlane,
    client: Proxy,
    server: Proxy,
    echo: HttpEcho,
}

fn mesh() -> Mesh {
    mesh_with(&[])
}

fn mesh_with(control_plane_args: &[&str]) -> Mesh {
    mesh_full(control_plane_args, "http", &[])
}

/// The echo's port declared `echo_protocol`; `extra`: more ports of the API workload, `(port, protocol)`, for
/// servers the test starts on [`API`] itself.
fn mesh_full(control_plane_args: &[&str], echo_protocol: &'static str, extra: &[(u16, &'static str)]) -> Mesh {
    let cp = ControlPlane::start(control_plane_args);
    // Port 0: the server reports the port the kernel gave it, and the workload declares that port.
    let echo = HttpEcho::start(format!("{API}:0").parse().unwrap());
    let port = echo.addr.port();
    let mut api_spec = WorkloadSpec::new("api", "shop", "api", API);
    api_spec.ports = vec![(port, echo_protocol)];
    api_spec.ports.extend_from_slice(extra);
    let server = Proxy::start(&cp, "node-server", &[api_spec]);
    let client = Proxy::start(&cp, "node-client", &[WorkloadSpec::new("web", "shop", "web", CLIENT)]);
    for p in [&server, &client] {
        p.wait_ready();
    }
    client.wait_config("the server in the registry", |d| d["workloads"].to_string().contains(API));
    Mesh { cp, client, server, echo }
}

impl Mesh {
    /// Applies and waits until both proxies ACKed the new version.
    fn apply(&self, yaml: &str) {
        self.cp.apply(yaml);
        self.wait_synced();
    }

    fn delete(&self, kind: &str, name: &str) {
        self.cp.ctl_ok(&["delete", kind, name, "-n", "shop"]);
        self.wait_synced();
    }

    fn wait_synced(&self) {
        wait_for("both proxies to ACK the latest version", Duration::from_secs(20), || {
            let status = self.cp.proxy_status();
            let all = status["proxies"].as_array()?;
            (all.len() == 2 && all.iter().all(|p| p["synced"] == true)).then_some(())
        });
    }

    /// A new HTTP connection from the client workload to the API, through both proxies.
    fn conn(&self) -> Conn {
        Conn::new(socks::connect_ok(self.client.socks5_addr, self.echo.addr))
    }

    /// What the workload received so far (asked directly, not through the mesh).
    fn received(&self) -> String {
        let (status, body) = trellis_tests::http::get(self.echo.addr, "/__requests").expect("GET /__requests");
        assert_eq!(status, 200);
        body
    }
}

fn get(conn: &mut Conn, target: &str) -> Response {
    conn.request("GET", target, HOST, &[])
}

/// The target the workload saw, from the echo's JSON.
fn forwarded_target(r: &Response) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["target"].as_str().expect("target").to_owned()
}

fn assert_denied(r: &Response, what: &str) {
    assert_eq!(r.status, 403, "{what}: {r:?}");
    assert_eq!(r.body, "RBAC: access denied", "{what}");
}

const RULES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-rules, namespace: shop}
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        hosts: ["shop.example"]
        paths: ["/api/*", "/public/*", "/private"]
  - to:
    - operation:
        methods: ["POST"]
        paths: ["/admin"]
    when:
    - key: request.headers[x-role]
      values: ["admin"]
"#;

const DENY_PRIVATE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-private, namespace: shop}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/private"]
"#;

#[test]
fn request_rules_apply_to_every_request_on_one_keep_alive_connection() {
    let m = mesh();
    let mut c = m.conn();
    assert_eq!(forwarded_target(&get(&mut c, "/anything?q=1")), "/anything?q=1", "no policy: allowed");

    m.apply(RULES);
    // The same connection, opened before the policy: it applies to the next request.
    assert_denied(&get(&mut c, "/anything"), "path not allowed");
    assert_eq!(forwarded_target(&get(&mut c, "/api/items")), "/api/items");
    assert_denied(&c.request("DELETE", "/api/items", HOST, &[]), "method");
    assert_denied(&c.request("GET", "/api/items", "evil.example", &[]), "host");
    assert_eq!(forwarded_target(&c.request("GET", "/api/items", "SHOP.example", &[])), "/api/items", "host case");
    let admin = [("x-role", "admin"), ("content-length", "0")];
    assert_eq!(forwarded_target(&c.request("POST", "/admin", HOST, &admin)), "/admin");
    assert_denied(&c.request("POST", "/admin", HOST, &[("x-role", "user"), ("content-length", "0")]), "header");
    // A refused request's body does not poison the connection.
    c.send_raw(format!("POST /admin HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello").as_bytes()).unwrap();
    assert_denied(&c.read_response().unwrap(), "POST with a body");
    // Queries are ignored for matching and forwarded as sent.
    assert_eq!(forwarded_target(&get(&mut c, "/api/items?x=/../admin")), "/api/items?x=/../admin");
    // Normalized before matching, and forwarded normalized.
    assert_eq!(forwarded_target(&get(&mut c, "/api/x/%2E%2E/y")), "/api/y");
    assert_eq!(forwarded_target(&get(&mut c, "/api/%61b%63")), "/api/abc");
    assert_eq!(forwarded_target(&get(&mut c, "/api\\x")), "/api/x");
    assert_denied(&get(&mut c, "/api/../admin"), "a GET to /admin in disguise");

    // Path confusion: without normalization these would match ALLOW /public/* and miss DENY /private.
    assert_eq!(forwarded_target(&get(&mut c, "/public/../private")), "/private", "allowed before the DENY");
    m.apply(DENY_PRIVATE);
    for path in ["/private", "/public/../private", "/public/%2E%2E/private", "/public/%2e/%2e%2e/private"] {
        assert_denied(&get(&mut c, path), path);
    }
    assert_eq!(forwarded_target(&get(&mut c, "/public/./x")), "/public/x");
    m.delete("ap", "deny-private");
    assert_eq!(forwarded_target(&get(&mut c, "/private")), "/private", "DENY removed: next request allowed");
    assert!(!m.received().contains("/public/.."), "only normalized paths reach the workload");
}

#[test]
fn malformed_requests_get_400_and_are_not_forwarded() {
    let m = mesh();
    let host = format!("Host: {HOST}\r\n");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("lower-case method", format!("get /lower HTTP/1.1\r\n{host}\r\n").into_bytes(), 400),
        ("encoded NUL", format!("GET /nul%00x HTTP/1.1\r\n{host}\r\n").into_bytes(), 400),
        ("space in the target", format!("GET /sp ace HTTP/1.1\r\n{host}\r\n").into_bytes(), 400),
        ("invalid method token", format!("G(T /badmethod HTTP/1.1\r\n{host}\r\n").into_bytes(), 400),
        ("newline in a header value", format!("GET /newline HTTP/1.1\r\n{host}X-A: a\nb\r\n\r\n").into_bytes(), 400),
        ("obsolete line folding", format!("GET /fold HTTP/1.1\r\n{host}X-A: a\r\n b\r\n\r\n").into_bytes(), 400),
        ("space before the colon", format!("GET /colon HTTP/1.1\r\n{host}X-A : a\r\n\r\n").into_bytes(), 400),
        (
            "two different Content-Lengths",
            format!("POST /dup-cl HTTP/1.1\r\n{host}Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd").into_bytes(),
            400,
        ),
        (
            "oversized headers",
            format!("GET /big HTTP/1.1\r\n{host}X-Big: {}\r\n\r\n", "a".repeat(80 * 1024)).into_bytes(),
            431,
        ),
    ];
    for (name, raw, want) in cases {
        let mut c = m.conn();
        c.send_raw(&raw).expect("write");
        let r = c.read_response().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.status, want, "{name}: {r:?}");
        assert_eq!(c.end(), Outcome::Refused(Refusal::Closed), "{name}: closed after a malformed request");
    }
    // Content-Length and Transfer-Encoding together (the request-smuggling shape): 400 and the connection closed,
    // in either header order, even when the chunked body is complete; nothing of it reaches the workload. The
    // same request with only one of the two headers, through the same path, is forwarded (control).
    let reason = "request refused: both Content-Length and Transfer-Encoding";
    let refusals = |m: &Mesh| trellis_tests::read_log(&m.server.log_path()).matches(reason).count();
    let before = refusals(&m);
    for (name, headers) in [
        ("/cl-te", "Content-Length: 30\r\nTransfer-Encoding: chunked\r\n"),
        ("/te-cl", "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
    ] {
        let mut c = m.conn();
        let smuggle =
            format!("POST {name} HTTP/1.1\r\n{host}{headers}\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n{host}\r\n");
        c.send_raw(smuggle.as_bytes()).expect("write");
        let r = c.read_response().expect("response");
        assert_eq!((r.status, r.header("connection")), (400, Some("close")), "{name}: {r:?}");
        assert_eq!(c.end(), Outcome::Refused(Refusal::Closed), "{name}: closed after both headers");
    }
    wait_for("the proxy to log both refusals", Duration::from_secs(10), || (refusals(&m) >= before + 2).then_some(()));
    let mut c = m.conn();
    c.send_raw(
        format!("POST /chunked HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").as_bytes(),
    )
    .expect("write");
    assert_eq!(forwarded_target(&c.read_response().expect("response")), "/chunked", "control: chunked only");
    assert_eq!(forwarded_target(&c.request("POST", "/length", HOST, &[("content-length", "0")])), "/length");

    let received = m.received();
    for bad in [
        "/lower",
        "/nul",
        "/sp",
        "/badmethod",
        "/newline",
        "/fold",
        "/colon",
        "/dup-cl",
        "/big",
        "/cl-te",
        "/te-cl",
        "/smuggled",
    ] {
        assert!(!received.contains(bad), "{bad} reached the workload: {received}");
    }
    // A good request still works on a new connection.
    assert_eq!(forwarded_target(&get(&mut m.conn(), "/fine")), "/fine");
}

const ISS1: &str = "https://issuer1.example";
const ISS2: &str = "https://issuer2.example";

fn token(tokens: &Value, name: &str) -> String {
    tokens["tokens"][name].as_str().unwrap_or_else(|| panic!("no token {name}")).to_owned()
}

fn bearer(c: &mut Conn, target: &str, token: &str) -> Response {
    c.request("GET", target, HOST, &[("authorization", &format!("Bearer {token}"))])
}

fn assert_status(r: &Response, status: u16, body: &str, what: &str) {
    assert_eq!((r.status, r.body.as_str()), (status, body), "{what}: {r:?}");
}

#[test]
fn jwt_request_authentication_and_request_principals() {
    let m = mesh();
    let alice = json!({"iss": ISS1, "sub": "alice", "aud": ["shop"], "exp": 600, "groups": ["admin", "dev"],
                       "scope": "read write", "team": {"name": "blue"}});
    let with = |patch: Value| {
        let mut c = alice.clone();
        c.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        c
    };
    let t = jose(json!({
        "keys": {"rs": {"kind": "RS256", "kid": "rs"}, "es": {"kind": "ES256", "kid": "es"},
                 "ed": {"kind": "EdDSA", "kid": "ed"}, "ps": {"kind": "PS256", "kid": "ps"},
                 "stranger": {"kind": "RS256", "kid": "rs"}},
        "jwks": {"one": ["rs", "es", "ps"], "two": ["ed"]},
        "tokens": {
            "alice": {"key": "rs", "claims": alice},
            "alice-es": {"key": "es", "claims": alice},
            "alice-ps": {"key": "ps", "claims": alice},
            "bob": {"key": "es", "claims": with(json!({"sub": "bob", "groups": ["dev"], "scope": "read"}))},
            "expired": {"key": "rs", "claims": with(json!({"exp": -120}))},
            "not-yet": {"key": "rs", "claims": with(json!({"nbf": 600}))},
            "wrong-issuer": {"key": "rs", "claims": with(json!({"iss": "https://evil.example"}))},
            "wrong-audience": {"key": "rs", "claims": with(json!({"aud": "billing"}))},
            "stranger": {"key": "stranger", "claims": alice},
            "unknown-kid": {"key": "rs", "kid": "nope", "claims": alice},
            "none": {"alg": "none", "claims": alice},
            "carol": {"key": "ed", "claims": {"iss": ISS2, "sub": "carol", "exp": 600, "team": {"name": "red"}}},
        }
    }));
    let jwks_one = t["jwks"]["one"].as_str().unwrap();
    let jwks_two = t["jwks"]["two"].as_str().unwrap();
    m.apply(&format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules:
  - issuer: "{ISS1}"
    audiences: ["shop"]
    jwks: '{jwks_one}'
  - issuer: "{ISS2}"
    jwks: '{jwks_two}'
    fromHeaders: [{{name: x-jwt, prefix: "Token "}}]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{{header: x-team, claim: team.name}}]
"#
    ));
    let mut c = m.conn();
    // No token: passes without a principal. A valid token: its header is stripped before forwarding.
    assert_eq!(forwarded_target(&get(&mut c, "/open")), "/open");
    let spoofed = c.request("GET", "/open", HOST, &[("x-team", "spoofed"), ("x-jwt-payload", "e30")]);
    let headers = &spoofed.json()["headers"];
    assert!(headers.get("x-team").is_none() && headers.get("x-jwt-payload").is_none(), "{spoofed:?}");
    for name in ["alice", "alice-es", "alice-ps"] {
        let r = bearer(&mut c, "/open", &token(&t, name));
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert!(r.json()["headers"].get("authorization").is_none(), "{name}: token forwarded: {r:?}");
    }
    // Invalid tokens: 401 (audience: 403), and the connection stays usable.
    let unauthorized = "Jwt verification fails";
    for name in ["expired", "not-yet", "wrong-issuer", "stranger", "unknown-kid", "none"] {
        assert_status(&bearer(&mut c, "/open", &token(&t, name)), 401, unauthorized, name);
    }
    let (alice_token, bob_token) = (token(&t, "alice"), token(&t, "bob"));
    let parts: Vec<&str> = alice_token.split('.').collect();
    let bad_signature = format!("{}.{}.{}", parts[0], parts[1], token(&t, "stranger").split('.').nth(2).unwrap());
    assert_status(&bearer(&mut c, "/open", &bad_signature), 401, unauthorized, "bad signature");
    assert_status(&bearer(&mut c, "/open", "deadbeef"), 401, unauthorized, "malformed");
    assert_status(
        &bearer(&mut c, "/open", &token(&t, "wrong-audience")),
        403,
        "Audiences in Jwt are not allowed",
        "aud",
    );
    // The second issuer's location, forwarding and header outputs.
    let carol = token(&t, "carol");
    let r = c.request("GET", "/open", HOST, &[("x-jwt", &format!("Token {carol}"))]);
    let headers = &r.json()["headers"];
    assert_eq!(headers["x-jwt"], format!("Token {carol}"), "forwardOriginalToken");
    assert_eq!(headers["x-jwt-payload"], carol.split('.').nth(1).unwrap());
    assert_eq!(headers["x-team"], "red");
    assert_status(&bearer(&mut c, "/open", &carol), 401, unauthorized, "issuer 2's token at issuer 1's location");
    // A location no rule reads: no token at all.
    assert_eq!(
        forwarded_target(&get(&mut c, &format!("/open?token={alice_token}"))),
        format!("/open?token={alice_token}")
    );
    assert_eq!(get(&mut c, &format!("/open?access_token={alice_token}")).status, 200, "default parameter");
    assert_eq!(get(&mut c, &format!("/open?access_token={}", token(&t, "expired"))).status, 401);

    m.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: shop}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notRequestPrincipals: ["*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-rules, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["https://issuer1.example/alice", "https://issuer2.example/*"]
    to:
    - operation: {paths: ["/principal"]}
  - to:
    - operation: {paths: ["/admin"]}
    when:
    - {key: "request.auth.claims[groups]", values: ["admin"]}
  - to:
    - operation: {paths: ["/write"]}
    when:
    - {key: "request.auth.claims[scope]", values: ["write"]}
  - to:
    - operation: {paths: ["/team"]}
    when:
    - {key: "request.auth.claims[team][name]", values: ["blue"]}
"#,
    );
    assert_denied(&get(&mut c, "/principal"), "no token, notRequestPrincipals DENY");
    assert_denied(&get(&mut c, &format!("/principal?token={alice_token}")), "token in an unconfigured location");
    assert_eq!(bearer(&mut c, "/principal", &alice_token).status, 200, "requestPrincipals iss/sub");
    assert_denied(&bearer(&mut c, "/principal", &bob_token), "another subject");
    let r = c.request("GET", "/principal", HOST, &[("x-jwt", &format!("Token {carol}"))]);
    assert_eq!(r.status, 200, "second issuer, wildcard subject: {r:?}");
    assert_eq!(bearer(&mut c, "/admin", &alice_token).status, 200, "list claim");
    assert_denied(&bearer(&mut c, "/admin", &bob_token), "list claim without admin");
    assert_eq!(bearer(&mut c, "/write", &alice_token).status, 200, "scope split on spaces");
    assert_denied(&bearer(&mut c, "/write", &bob_token), "scope without write");
    assert_eq!(bearer(&mut c, "/team", &alice_token).status, 200, "nested claim");
    assert_denied(&c.request("GET", "/team", HOST, &[("x-jwt", &format!("Token {carol}"))]), "nested claim red");
    assert_status(&bearer(&mut c, "/principal", &token(&t, "expired")), 401, unauthorized, "401 before authorization");
}

/// One gRPC-shaped HTTP/2 request (h2c prior knowledge) through the mesh: (HTTP status, grpc-status from the
/// headers or, when the response has a body, from the trailers).
async fn grpc_call(m: &Mesh, path: &str, token: Option<&str>) -> (u16, String) {
    use http_body_util::BodyExt;
    let stream = socks::connect_ok(m.client.socks5_addr, m.echo.addr);
    stream.set_nonblocking(true).unwrap();
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(stream).unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.expect("h2c handshake");
    tokio::spawn(conn);
    let mut request = hyper::Request::post(format!("http://{HOST}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = http_body_util::Full::new(hyper::body::Bytes::from_static(&[0, 0, 0, 0, 0]));
    let response = sender.send_request(request.body(body).unwrap()).await.expect("gRPC call");
    let status = response.status().as_u16();
    if let Some(code) = response.headers().get("grpc-status") {
        return (status, code.to_str().unwrap().to_owned());
    }
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    (status, trailers.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default())
}

#[test]
fn grpc_denials_are_trailers_only_responses() {
    let m = mesh_full(&[], "grpc", &[]);
    let t = jose(json!({
        "keys": {"rs": {"kind": "RS256", "kid": "rs"}},
        "jwks": {"one": ["rs"]},
        "tokens": {"expired": {"key": "rs", "claims": {"iss": ISS1, "sub": "a", "exp": -600}}}
    }));
    m.apply(&format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules:
  - issuer: "{ISS1}"
    jwks: '{}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-forbidden, namespace: shop}}
spec:
  action: DENY
  rules:
  - to:
    - operation: {{paths: ["/pkg.Svc/Forbidden"], methods: ["POST"]}}
"#,
        t["jwks"]["one"].as_str().unwrap()
    ));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        assert_eq!(grpc_call(&m, "/pkg.Svc/Ok", None).await, (200, "0".into()), "allowed: the workload's answer");
        assert_eq!(grpc_call(&m, "/pkg.Svc/Forbidden", None).await, (200, "7".into()), "PERMISSION_DENIED");
        let expired = token(&t, "expired");
        assert_eq!(grpc_call(&m, "/pkg.Svc/Ok", Some(&expired)).await, (200, "16".into()), "UNAUTHENTICATED");
    });
    assert!(m.received().contains("POST /pkg.Svc/Ok"));
    assert!(!m.received().contains("Forbidden"));
}

/// A static file server (Python's `http.server`, an independent process) publishing `dir`.
struct FileServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl FileServer {
    fn start(dir: &std::path::Path) -> Self {
        Self::start_at(dir, trellis_tests::free_addr())
    }

    fn start_at(dir: &std::path::Path, addr: SocketAddr) -> Self {
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", &addr.ip().to_string(), &addr.port().to_string(), "--directory"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        wait_for("python3 -m http.server", Duration::from_secs(10), || std::net::TcpStream::connect(addr).ok());
        Self { child, addr }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn jwks_uri_is_fetched_by_the_control_plane_and_rotations_reach_proxies() {
    let claims = json!({"iss": ISS1, "sub": "alice", "exp": 3600});
    let t = jose(json!({
        "keys": {"old": {"kind": "ES256", "kid": "old"}, "new": {"kind": "RS256", "kid": "new"}},
        "jwks": {"old": ["old"], "new": ["new"]},
        "tokens": {"old": {"key": "old", "claims": claims}, "new": {"key": "new", "claims": claims}}
    }));
    let (old, new) = (token(&t, "old"), token(&t, "new"));
    let dir = tempfile::tempdir().unwrap();
    let publish = |name: &str| std::fs::write(dir.path().join("jwks.json"), t["jwks"][name].as_str().unwrap()).unwrap();
    publish("old");
    let server = FileServer::start(dir.path());
    let m = mesh_with(&["--jwks-refresh", "1s", "--jwks-allow-http", "--jwks-allow-local"]);
    m.apply(&format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules:
  - issuer: "{ISS1}"
    jwksUri: "http://{}/jwks.json"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: shop}}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notRequestPrincipals: ["*"]
"#,
        server.addr
    ));
    let mut c = m.conn();
    let status = |c: &mut Conn, token: &str| bearer(c, "/x", token).status;
    wait_for("the JWKS to reach the proxy", Duration::from_secs(20), || (status(&mut c, &old) == 200).then_some(()));
    assert_eq!(status(&mut c, &new), 401, "a key the JWKS does not hold");
    assert_denied(&get(&mut c, "/x"), "no token");

    // Rotation: the new key starts working on the same connection, nothing restarted; the old one stops.
    publish("new");
    wait_for("the rotated JWKS to reach the proxy", Duration::from_secs(20), || {
        (status(&mut c, &new) == 200).then_some(())
    });
    assert_eq!(status(&mut c, &old), 401);

    // The JWKS server goes away: the last good keys stay in use.
    let kept = |m: &Mesh| trellis_tests::read_log(&m.cp.log_path()).matches("keeping the last good one").count();
    let kept_before = kept(&m);
    drop(server);
    let version = m.cp.proxy_status()["proxies"][0]["ackedVersion"].clone();
    assert!(version.is_u64(), "{version}");
    // Wait for a failed refresh (the control plane logs it), then the proxy still holds the last good keys.
    wait_for("a failed JWKS refresh", Duration::from_secs(20), || (kept(&m) > kept_before).then_some(()));
    assert_eq!(status(&mut c, &new), 200, "last good JWKS kept after failed refreshes");
    m.wait_synced();
    assert_eq!(m.cp.proxy_status()["proxies"][0]["ackedVersion"], version, "failed refreshes push nothing");
}

/// `trellisctl authz eval` verifies tokens from the request's headers like the proxy, offline.
#[test]
fn authz_eval_reports_401_and_403_like_the_proxy() {
    let alice = json!({"iss": ISS1, "sub": "alice", "aud": "shop", "exp": 600});
    let t = jose(json!({
        "keys": {"rs": {"kind": "RS256", "kid": "rs"}},
        "jwks": {"one": ["rs"]},
        "tokens": {
            "alice": {"key": "rs", "claims": alice},
            "expired": {"key": "rs", "claims": {"iss": ISS1, "sub": "alice", "aud": "shop", "exp": -600}},
            "other-aud": {"key": "rs", "claims": {"iss": ISS1, "sub": "alice", "aud": "billing", "exp": 600}},
        }
    }));
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    std::fs::write(
        &policies,
        format!(
            r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules:
  - issuer: "{ISS1}"
    audiences: [shop]
    jwks: '{}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: alice, namespace: shop}}
spec:
  rules: [{{from: [{{source: {{requestPrincipals: ["{ISS1}/alice"]}}}}]}}]
"#,
            t["jwks"]["one"].as_str().unwrap()
        ),
    )
    .unwrap();
    let eval = |token: Option<&str>| {
        let headers = token.map_or(json!({}), |t| json!({"authorization": format!("Bearer {t}")}));
        let request = json!({"source": {"principal": "cluster.local/ns/shop/sa/web", "ip": "10.0.0.1"},
            "destination": {"namespace": "shop", "ip": "10.0.0.2", "port": 8080},
            "protocol": "http", "http": {"method": "GET", "path": "/x", "headers": headers}});
        let path = dir.path().join("request.json");
        std::fs::write(&path, request.to_string()).unwrap();
        let out = Command::new(trellis_tests::bin("trellisctl"))
            .args(["authz", "eval", "-f"])
            .arg(&policies)
            .arg("--request")
            .arg(&path)
            .env("TRELLIS_CONFIG", "/nonexistent")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let ok = eval(Some(&token(&t, "alice")));
    assert_eq!((&ok["decision"], &ok["status"]), (&json!("allow"), &Value::Null), "{ok}");
    assert_eq!(ok["requestPrincipal"], format!("{ISS1}/alice"));
    let expired = eval(Some(&token(&t, "expired")));
    assert_eq!((&expired["decision"], &expired["status"]), (&json!("deny"), &json!(401)), "{expired}");
    assert_eq!(eval(Some(&token(&t, "other-aud")))["status"], 403);
    assert_eq!(eval(None)["status"], 403, "no token: no request principal, ALLOW does not match");
}

/// `trellisctl authz eval -f policies --request request` (offline), its JSON answer.
fn authz_eval(policies: &str, request: &Value) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (policy_path, request_path) = (dir.path().join("policies.yaml"), dir.path().join("request.json"));
    std::fs::write(&policy_path, policies).unwrap();
    std::fs::write(&request_path, request.to_string()).unwrap();
    let out = Command::new(trellis_tests::bin("trellisctl"))
        .args(["authz", "eval", "-f"])
        .arg(&policy_path)
        .arg("--request")
        .arg(&request_path)
        .env("TRELLIS_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A CORS preflight (OPTIONS with Origin and Access-Control-Request-Method) is not authenticated, as in Istio: an
/// expired token on it passes authentication while the same token on a GET gets 401. Authorization still applies
/// (without a request principal). `trellisctl authz eval` answers the same.
#[test]
fn cors_preflight_skips_authentication_the_same_get_does_not() {
    let m = mesh();
    let t = jose(json!({
        "keys": {"rs": {"kind": "RS256", "kid": "rs"}},
        "jwks": {"one": ["rs"]},
        "tokens": {"expired": {"key": "rs", "claims": {"iss": ISS1, "sub": "alice", "exp": -600}}}
    }));
    let policies = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules: [{{issuer: "{ISS1}", jwks: '{}'}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api, namespace: shop}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
  - to: [{{operation: {{methods: [OPTIONS], paths: ["/cors/*"]}}}}]
"#,
        t["jwks"]["one"].as_str().unwrap()
    );
    m.apply(&policies);
    let expired = format!("Bearer {}", token(&t, "expired"));
    let origin = ("origin", "https://app.example");
    let asks = ("access-control-request-method", "GET");
    let auth = ("authorization", expired.as_str());
    let mut c = m.conn();
    let rejected = |m: &Mesh| trellis_tests::read_log(&m.server.log_path()).matches("JWT rejected").count();
    let before = rejected(&m);

    let r = c.request("OPTIONS", "/cors/items", HOST, &[origin, asks, auth]);
    assert_eq!(r.json()["method"], "OPTIONS", "preflight with an expired token: forwarded: {r:?}");
    assert_status(&c.request("GET", "/cors/items", HOST, &[origin, auth]), 401, "Jwt verification fails", "GET");
    // Not preflights (a header missing or empty): authenticated like any request.
    for headers in [vec![origin, auth], vec![asks, auth], vec![("origin", ""), asks, auth]] {
        let r = c.request("OPTIONS", "/cors/items", HOST, &headers);
        assert_status(&r, 401, "Jwt verification fails", &format!("{headers:?}"));
    }
    // Authorization still applies to a preflight: no request principal, and no rule for this path.
    assert_denied(&c.request("OPTIONS", "/other", HOST, &[origin, asks, auth]), "preflight outside the OPTIONS rule");
    wait_for("the proxy to log the four rejections", Duration::from_secs(10), || {
        (rejected(&m) == before + 4).then_some(())
    });

    // The CLI, with the same policies and requests.
    let eval = |method: &str, headers: Value| {
        authz_eval(
            &policies,
            &json!({"source": {"principal": "cluster.local/ns/shop/sa/web", "ip": CLIENT},
                "destination": {"namespace": "shop", "ip": API, "port": m.echo.addr.port()},
                "protocol": "http", "http": {"method": method, "path": "/cors/items", "headers": headers}}),
        )
    };
    let preflight =
        eval("OPTIONS", json!({"origin": origin.1, "access-control-request-method": "GET", "authorization": expired}));
    assert_eq!((&preflight["decision"], &preflight["status"]), (&json!("allow"), &Value::Null), "{preflight}");
    let get = eval("GET", json!({"origin": origin.1, "authorization": expired}));
    assert_eq!((&get["decision"], &get["status"]), (&json!("deny"), &json!(401)), "{get}");
}

/// A server process from one of this folder's Python scripts (`SCRIPT server HOST PORT`), started on [`API`] and
/// waited for until it prints "listening".
struct PyServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl PyServer {
    fn start(script: &str) -> Self {
        Self::start_with(script, &[])
    }

    fn start_with(script: &str, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let addr: SocketAddr = format!("{API}:{}", trellis_tests::free_port()).parse().unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
        let mut child = Command::new("python3")
            .arg(&path)
            .args(["server", API, &addr.port().to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        assert_eq!(
            line.trim(),
            "listening",
            "{script} did not start (pip install websockets grpcio: see scripts/test)"
        );
        Self { child, addr }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `python3 SCRIPT client ARGS...`: its JSON answer.
fn py_client(script: &str, args: &[&str]) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let out = Command::new("python3").arg(&path).arg("client").args(args).output().expect("python3");
    assert!(out.status.success(), "{script} client {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{script}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `curl` through the client proxy's SOCKS5 listener: (status, body).
fn curl(m: &Mesh, args: &[&str], url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", "--socks5"])
        .arg(m.client.socks5_addr.to_string())
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Ports declared `http` speak HTTP/1.1 to the workload, translating HTTP/2 callers: curl with
/// `--http2-prior-knowledge` gets 200 from Python's HTTP/1.1-only `http.server`. The same server behind a port
/// declared `http2` (h2c upstream) cannot answer (503): the translation is what makes the first one work.
/// `http2` ports translate HTTP/1.1 callers to h2c.
#[test]
fn ports_speak_their_declared_protocol_whatever_the_caller_speaks() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hello from http.server\n").unwrap();
    let (h1_port, h2_port) = (trellis_tests::free_port(), trellis_tests::free_port());
    let _h1 = FileServer::start_at(dir.path(), format!("{API}:{h1_port}").parse().unwrap());
    let _h2 = FileServer::start_at(dir.path(), format!("{API}:{h2_port}").parse().unwrap());
    let m = mesh_full(&[], "http2", &[(h1_port, "http"), (h2_port, "kubernetes.io/h2c")]);
    let dump = m.server.config_dump();
    assert!(dump["workloads"].to_string().contains(r#""protocol":"http2""#), "alias shown canonical: {dump}");

    let h2 = ["--http2-prior-knowledge"];
    let url = |port: u16| format!("http://{API}:{port}/hello.txt");
    assert_eq!(curl(&m, &h2, &url(h1_port)), (200, "hello from http.server\n".into()), "h2 caller, http port");
    assert_eq!(curl(&m, &[], &url(h1_port)), (200, "hello from http.server\n".into()), "h1 caller, http port");
    assert_eq!(curl(&m, &h2, &url(h2_port)).0, 503, "control: h2c to an HTTP/1.1-only server");

    // An http2 port: the echo sees HTTP/2 whatever the caller spoke.
    let (status, body) = curl(&m, &[], &format!("http://{API}:{}/v", m.echo.addr.port()));
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    let (_, body) = curl(&m, &h2, &format!("http://{API}:{}/v", m.echo.addr.port()));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["version"], "HTTP/2.0");
}

/// gRPC through a `grpc` port between unmodified peers (Python's grpcio): unary and bidirectional streaming calls
/// pass; a call a policy denies gets PERMISSION_DENIED (7), from the proxy (the server never sees it).
#[test]
fn grpc_port_carries_unary_and_streaming_calls_and_denies_with_status_7() {
    let server = PyServer::start("grpc_peer.py");
    let m = mesh_full(&[], "http", &[(server.addr.port(), "grpc")]);
    let forward = socks::Forward::start(m.client.socks5_addr, server.addr);
    let address = forward.addr.to_string();
    let out = py_client("grpc_peer.py", &[&address]);
    assert_eq!(out["unary"], "echo:hi", "{out}");
    assert_eq!(out["bidi"], json!(["echo:a", "echo:b", "echo:c"]), "{out}");
    assert_eq!(out["forbidden"], "OK", "control: allowed before the policy: {out}");

    m.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-forbidden, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/pkg.Svc/Forbidden"]}}]}]
"#,
    );
    let out = py_client("grpc_peer.py", &[&address]);
    assert_eq!((&out["unary"], &out["bidi"][2]), (&json!("echo:hi"), &json!("echo:c")), "{out}");
    assert_eq!(
        (&out["forbidden"], &out["forbiddenDetails"]),
        (&json!("PERMISSION_DENIED"), &json!("RBAC: access denied"))
    );
    let log = trellis_tests::read_log(&m.server.log_path());
    assert!(
        log.lines()
            .any(|l| l.contains("/pkg.Svc/Forbidden") && l.contains("denied") && l.contains("shop/deny-forbidden")),
        "the proxy's access log names the refusal and its policy"
    );
}

const WS_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  jwtRules: [{issuer: "https://issuer1.example", jwks: 'JWKS'}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: chat, namespace: shop}
spec:
  rules:
  - from: [{source: {requestPrincipals: ["https://issuer1.example/alice"]}}]
    to: [{operation: {paths: ["/chat"]}}]
  - to: [{operation: {ports: ["TCP_PORT"]}}]
"#;

/// WebSocket through an `http` port between unmodified peers (Python's websockets): the Upgrade request is
/// authorized like any request (here: a JWT principal is required), then 1,000 messages go both ways over the
/// switched connection. Without the principal: 403 from the proxy. On a `tcp` port the Upgrade just passes.
#[test]
fn websocket_upgrade_is_authorized_then_carried() {
    let (http_ws, tcp_ws) = (PyServer::start("ws.py"), PyServer::start("ws.py"));
    let m = mesh_full(&[], "http", &[(http_ws.addr.port(), "http"), (tcp_ws.addr.port(), "tcp")]);
    let t = jose(json!({
        "keys": {"rs": {"kind": "RS256", "kid": "rs"}},
        "jwks": {"one": ["rs"]},
        "tokens": {"alice": {"key": "rs", "claims": {"iss": ISS1, "sub": "alice", "exp": 600}},
                   "bob": {"key": "rs", "claims": {"iss": ISS1, "sub": "bob", "exp": 600}}}
    }));
    let policy = WS_POLICY.replace("JWKS", t["jwks"]["one"].as_str().unwrap());
    m.apply(&policy.replace("TCP_PORT", &tcp_ws.addr.port().to_string()));
    let through_http = socks::Forward::start(m.client.socks5_addr, http_ws.addr);
    let through_tcp = socks::Forward::start(m.client.socks5_addr, tcp_ws.addr);
    let (http_addr, tcp_addr) = (through_http.addr.to_string(), through_tcp.addr.to_string());

    let started = std::time::Instant::now();
    let out = py_client("ws.py", &[&http_addr, "1000", &token(&t, "alice")]);
    println!("1,000 WebSocket round trips through the mesh (http port, JWT): {:?}", started.elapsed());
    assert_eq!(out, json!({"echoed": 1000}));

    let denied = |m: &Mesh| {
        let log = trellis_tests::read_log(&m.server.log_path());
        let refusal = ["path=\"/chat\"", "response_code=403", "decision=\"denied\"", "response_flags=\"DENY\""];
        log.lines().filter(|l| refusal.iter().all(|part| l.contains(part))).count()
    };
    let before = denied(&m);
    assert_eq!(
        py_client("ws.py", &[&http_addr, "1", &token(&t, "bob")]),
        json!({"status": 403, "body": "RBAC: access denied"})
    );
    assert_eq!(py_client("ws.py", &[&http_addr, "1"]), json!({"status": 403, "body": "RBAC: access denied"}));
    wait_for("the proxy's access log to show both refusals", Duration::from_secs(10), || {
        (denied(&m) == before + 2).then_some(())
    });

    // A tcp port: opaque bytes, the Upgrade passes untouched (no request policy applies to TCP).
    assert_eq!(py_client("ws.py", &[&tcp_addr, "100"]), json!({"echoed": 100}));
}

/// WebSocket over HTTP/2 (RFC 8441 extended CONNECT) through an `http` port to Python's websockets server, which
/// speaks HTTP/1.1 only: the proxy advertises SETTINGS_ENABLE_CONNECT_PROTOCOL, authorizes the CONNECT
/// `:protocol=websocket` like any request (the same JWT principal as over HTTP/1.1 is required), forwards it as an
/// HTTP/1.1 Upgrade and answers 200 once the workload switched; 1,000 messages then go both ways. Without the
/// principal: 403 as the stream's answer, from the proxy, whose access log names the refusal. No unmodified
/// client speaks extended CONNECT, so the client is `trellis_tests::ws_h2` (hyper's HTTP/2 client).
#[test]
fn websocket_over_http2_extended_connect_is_authorized_then_carried() {
    use trellis_tests::ws_h2::{self, WsOutcome};
    let http_ws = PyServer::start("ws.py");
    let m = mesh_full(&[], "http", &[(http_ws.addr.port(), "http")]);
    let t = jose(json!({
        "keys": {"rs": {"kind": "RS256", "kid": "rs"}},
        "jwks": {"one": ["rs"]},
        "tokens": {"alice": {"key": "rs", "claims": {"iss": ISS1, "sub": "alice", "exp": 600}},
                   "bob": {"key": "rs", "claims": {"iss": ISS1, "sub": "bob", "exp": 600}}}
    }));
    let policy = WS_POLICY.replace("JWKS", t["jwks"]["one"].as_str().unwrap());
    // The policy's tcp-port rule names a port this workload does not have.
    m.apply(&policy.replace("TCP_PORT", &trellis_tests::free_port().to_string()));
    let through = socks::Forward::start(m.client.socks5_addr, http_ws.addr);
    let authority = http_ws.addr.to_string();
    let open = |token: Option<&str>, count| {
        ws_h2::exchange(through.addr, &authority, "/chat", token, count).unwrap_or_else(|e| panic!("{e}"))
    };

    let started = std::time::Instant::now();
    assert_eq!(open(Some(&token(&t, "alice")), 1000), WsOutcome::Echoed(1000));
    println!("1,000 WebSocket round trips over HTTP/2 extended CONNECT (http port, JWT): {:?}", started.elapsed());

    let denied = |m: &Mesh| {
        let log = trellis_tests::read_log(&m.server.log_path());
        let refusal = ["path=\"/chat\"", "response_code=403", "decision=\"denied\"", "response_flags=\"DENY\""];
        log.lines().filter(|l| refusal.iter().all(|part| l.contains(part))).count()
    };
    let before = denied(&m);
    let refused = WsOutcome::Refused { status: 403, body: "RBAC: access denied".into() };
    assert_eq!(open(Some(&token(&t, "bob")), 1), refused, "another principal");
    assert_eq!(open(None, 1), refused, "no token");
    wait_for("the proxy's access log to show both refusals", Duration::from_secs(10), || {
        (denied(&m) == before + 2).then_some(())
    });
}

/// A request is reported (access log, Istio's series) when the last byte of its response has gone, not when its
/// headers have: while the workload holds the end of the body back, the client has the headers and the first
/// bytes and nothing is logged; once the body ends, the request is.
#[test]
fn requests_are_reported_at_the_last_byte_of_the_response() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let server = PyServer::start_with("slow_body.py", &[release.to_str().unwrap()]);
    let m = mesh_full(&[], "http", &[(server.addr.port(), "http")]);
    let logged = |m: &Mesh| {
        let log = trellis_tests::read_log(&m.server.log_path());
        log.lines().filter(|l| l.contains("INFO access: request") && l.contains("path=\"/slow\"")).count()
    };
    let mut stream = socks::connect_ok(m.client.socks5_addr, server.addr);
    stream.write_all(format!("GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(b"first") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    assert_eq!(logged(&m), 0, "reported before the response ended");

    std::fs::write(&release, "").unwrap();
    while !seen.ends_with(b"first-last") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    wait_for("the request in the access log", Duration::from_secs(10), || (logged(&m) == 1).then_some(()));
}
