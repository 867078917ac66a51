//! Captured plaintext inbound in one process: a loopback client's connection handed to proxy B's plaintext path as
//! the capture listener hands it over once it has read the original destination (`inbound_plaintext::redirected`).
//! To W_b's `http` port it takes the HTTP path (`l7`) and each request is authorized on its own with a plaintext
//! peer; to a `tcp` port it stays one TCP connection authorized once. What the client gets, what W_b saw and what B
//! logged are checked; no timing is asserted.

use std::net::SocketAddr;
use std::time::Instant;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use trellis_policy::MtlsMode;

use super::inbound_plaintext::{self, Check, PlaintextError, Refusal};
use crate::connections::PlaintextConn;
use crate::testing::{Mesh, Proxy, within};

/// Only GET /allowed, from anyone: a rule with HTTP fields, which a TCP connection cannot satisfy.
const ALLOW_PATH: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-path, namespace: back}
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["/allowed"]
"#;

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: back}
spec: {mtls: {mode: STRICT}}
"#;

/// A plaintext client connected to B's plaintext path as if redirected from `target`; the path's result comes out
/// of the handle when the connection ends.
async fn plaintext_to(
    b: &Proxy,
    target: SocketAddr,
) -> (TcpStream, tokio::task::JoinHandle<Result<(), PlaintextError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (accepted, from) = listener.accept().await.unwrap();
    let data = b.data.clone();
    let path = tokio::spawn(inbound_plaintext::redirected(accepted, from, target, Instant::now(), data));
    (client, path)
}

/// HTTP/1.1 over `tcp`: a sender for requests on that one connection.
async fn http1(tcp: TcpStream) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("HTTP/1.1");
    tokio::spawn(connection);
    sender
}

async fn get(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, path: &str) -> (u16, String) {
    within("the response", async {
        let request = hyper::Request::get(path).header("host", "api.back").body(Empty::new()).unwrap();
        let response = sender.send_request(request).await.expect("a response");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("the body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

fn conn(mesh: &Mesh, target: SocketAddr) -> PlaintextConn {
    PlaintextConn { client: "127.0.0.1:40000".parse().unwrap(), destination: target, workload: mesh.b.workload.clone() }
}

#[tokio::test]
async fn plaintext_to_an_http_port_is_checked_per_request_and_to_a_tcp_port_per_connection() {
    let mut mesh = Mesh::start().await;
    mesh.apply_policy(ALLOW_PATH).await;
    let policies = mesh.b.data.authz.load_full();
    // The routing decision, under the same policy: the `http` port is authorized request by request; the `tcp`
    // port once, on TCP attributes, which an HTTP-only ALLOW rule never matches (fails closed).
    let http = conn(&mesh, mesh.http.addr);
    assert!(matches!(inbound_plaintext::check(&policies, &http), Check::PerRequest { mode: MtlsMode::Permissive }));
    let tcp = conn(&mesh, mesh.echo.addr);
    assert!(matches!(inbound_plaintext::check(&policies, &tcp), Check::Denied(_)));

    // Per request on one connection: GET /allowed is forwarded, GET /denied is answered 403 by B and never
    // reaches W_b, and the connection stays usable.
    let (client, path) = plaintext_to(&mesh.b, mesh.http.addr).await;
    let client_addr = client.local_addr().unwrap().to_string();
    let mut sender = http1(client).await;
    assert_eq!(get(&mut sender, "/allowed").await, (200, "ok\n".to_owned()));
    assert!(mesh.http.received().await.starts_with(b"GET /allowed HTTP/1.1\r\n"));
    assert_eq!(get(&mut sender, "/denied").await, (403, "RBAC: access denied".to_owned()));
    assert_eq!(get(&mut sender, "/allowed?again").await, (200, "ok\n".to_owned()));
    let next = mesh.http.received().await;
    assert!(next.starts_with(b"GET /allowed?again HTTP/1.1\r\n"), "{}", String::from_utf8_lossy(&next));
    assert_eq!(mesh.http.accepted(), 1, "both forwarded requests went over one pooled connection");

    // B's access log: each request with its verdict, as plaintext (no principal, no mTLS).
    let requests = mesh.events.matching(|e| e.target == "access" && e.message() == "request");
    let seen: Vec<_> =
        requests.iter().map(|e| (e.field("path"), e.field("response_code"), e.field("decision"))).collect();
    assert_eq!(seen, [("/allowed", "200", "allowed"), ("/denied", "403", "denied"), ("/allowed", "200", "allowed")]);
    for entry in &requests {
        assert_eq!(entry.field("connection_security_policy"), "none", "{entry:?}");
        assert_eq!(entry.field("source_principal"), "unknown", "{entry:?}");
        assert_eq!(entry.field("source_address"), client_addr, "{entry:?}");
    }
    assert_eq!(requests[1].field("response_flags"), "DENY");
    // Allowed by the path rule; refused because no ALLOW rule matched (so no policy decided it).
    let policies: Vec<_> = requests.iter().map(|e| e.field("policy")).collect();
    assert_eq!(policies, ["back/allow-path", "-", "back/allow-path"]);
    drop(sender);
    within("the plaintext path to end", path).await.unwrap().expect("served as HTTP");

    // Control, through the same path to the `tcp` port: refused once, before anything reaches the echo server.
    let (_client, path) = plaintext_to(&mesh.b, mesh.echo.addr).await;
    let refused = within("the refusal", path).await.unwrap().expect_err("an HTTP-only ALLOW rule never matches TCP");
    assert!(matches!(&refused, PlaintextError::Refused { refusal: Refusal::Denied(_), .. }), "{refused}");
    assert_eq!(mesh.echo.accepted(), 0);
}

#[tokio::test]
async fn strict_refuses_plaintext_to_an_http_port_before_any_request() {
    let mut mesh = Mesh::start().await;
    // Control: PERMISSIVE (no PeerAuthentication) lets the same client in, through the same path.
    let (client, path) = plaintext_to(&mesh.b, mesh.http.addr).await;
    let mut sender = http1(client).await;
    assert_eq!(get(&mut sender, "/").await.0, 200);
    drop(sender);
    within("the plaintext path to end", path).await.unwrap().expect("served as HTTP");

    mesh.apply_policy(STRICT).await;
    let policies = mesh.b.data.authz.load_full();
    assert!(matches!(inbound_plaintext::check(&policies, &conn(&mesh, mesh.http.addr)), Check::MtlsRequired { .. }));
    let (_client, path) = plaintext_to(&mesh.b, mesh.http.addr).await;
    let refused = within("the refusal", path).await.unwrap().expect_err("STRICT refuses plaintext");
    assert!(matches!(&refused, PlaintextError::Refused { refusal: Refusal::MtlsRequired(_), .. }), "{refused}");
    assert!(refused.to_string().contains("requires mTLS"), "{refused}");
    assert_eq!(mesh.http.accepted(), 1, "only the control's request reached W_b");
}
