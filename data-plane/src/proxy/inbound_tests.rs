//! B's HBONE listener (TLS with the test CA, `h2_server`, `inbound`) as a raw HTTP/2 client presenting W_a's
//! certificate sees it: what a stream asks for decides its answer, and B records why it refused one. The tunnel
//! through both proxies is `tests.rs`'s; these drive B's side alone.

use bytes::Bytes;
use hyper::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::testing::{Mesh, within};

/// An HTTP/2 connection to B's HBONE listener, as A's pool would open it for W_a.
async fn hbone_to_b(mesh: &Mesh) -> h2::client::SendRequest<Bytes> {
    let config = mesh.a.data.tls.load().client_for(&mesh.a.workload.spiffe_id, &mesh.b.workload.spiffe_id).unwrap();
    let tcp = tokio::net::TcpStream::connect(mesh.b.hbone).await.unwrap();
    let server = ServerName::IpAddress(mesh.b.hbone.ip().into());
    let tls = within("TLS", tokio_rustls::TlsConnector::from(config).connect(server, tcp)).await.unwrap();
    let (sender, connection) = within("HTTP/2", h2::client::handshake(tls)).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

async fn open(
    sender: &h2::client::SendRequest<Bytes>,
    request: Request<()>,
) -> (hyper::Response<h2::RecvStream>, h2::SendStream<Bytes>) {
    let mut sender = within("room for a stream", sender.clone().ready()).await.unwrap();
    let (response, send) = sender.send_request(request, false).unwrap();
    (within("the answer", response).await.unwrap(), send)
}

fn head(method: Method, uri: &str, headers: &[(&'static str, &str)]) -> Request<()> {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

#[tokio::test]
async fn bad_connect_requests_are_refused_with_their_status_and_reason_beside_a_connect_that_tunnels() {
    let mesh = Mesh::start().await;
    let sender = hbone_to_b(&mesh).await;
    let echo = mesh.echo.addr;

    // Control: a CONNECT to W_b's echo port, answered 200, carrying bytes both ways.
    let (response, mut send) = open(&sender, head(Method::CONNECT, &echo.to_string(), &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    send.reserve_capacity(5);
    send.send_data(Bytes::from_static(b"hello"), true).unwrap();
    let mut echoed = Vec::new();
    while let Some(data) = within("the echo", body.data()).await {
        echoed.extend_from_slice(&data.unwrap());
    }
    assert_eq!(echoed, b"hello", "echoed, then END_STREAM once the echo server closed");

    let cases = [
        (head(Method::GET, &format!("http://{echo}/"), &[]), StatusCode::METHOD_NOT_ALLOWED, "not_connect"),
        (head(Method::CONNECT, "localhost:80", &[]), StatusCode::BAD_REQUEST, "bad_connect_target"),
        (
            head(Method::CONNECT, &echo.to_string(), &[("content-length", "5")]),
            StatusCode::BAD_REQUEST,
            "connect_with_content",
        ),
    ];
    for (request, status, kind) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (response, _send) = open(&sender, request).await;
        assert_eq!(response.status(), status, "{what}");
        // B's reason, logged where it refused.
        let logged = mesh.events.matching(|e| e.message() == "CONNECT request refused" && e.field("kind") == kind);
        assert_eq!(logged.len(), 1, "{what}: {logged:?}");
        assert_eq!(logged[0].field("source"), mesh.a.workload.spiffe_id.to_string(), "{what}");
    }
    // An address and port B does not front.
    let (response, _send) = open(&sender, head(Method::CONNECT, "127.0.0.1:1", &[])).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let logged = mesh.events.with_message("CONNECT to an address or port this proxy does not front");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].field("target"), "127.0.0.1:1");

    assert_eq!(mesh.echo.accepted(), 1, "only the control reached W_b");
    let refused = mesh.events.access("destination").into_iter().filter(|e| e.field("response_flags") != "-").count();
    assert_eq!(refused, 0, "a request head refused before any lookup is no connection of W_b's");
}

#[tokio::test]
async fn a_tunnel_to_an_http_port_is_served_as_http_on_the_stream() {
    let mesh = Mesh::start().await;
    let mut client = mesh.a.connect(mesh.http.addr).await.expect("the tunnel opens");
    client.write_all(b"GET /through-hbone HTTP/1.1\r\nhost: api\r\n\r\n").await.unwrap();
    let mut answer = vec![0u8; 12];
    within("the answer", client.read_exact(&mut answer)).await.unwrap();
    assert_eq!(answer, b"HTTP/1.1 200", "B's HTTP server on the stream answered for W_b");
    assert!(mesh.http.received().await.starts_with(b"GET /through-hbone HTTP/1.1\r\n"), "forwarded to W_b");
}
