//! The data path in one process: two proxies on loopback (`crate::testing::Mesh`), a client of A's SOCKS5 listener,
//! tunnels through A's pool to B's HBONE listener and on to W_b's servers. Each test drives what a developer changes
//! when working on the data path (tunnel open and close, refusal by policy, a rotation of the TLS set, the pool) and
//! checks what the client gets and what each proxy recorded. No timing is asserted: every wait is for a condition,
//! bounded by `testing::WAIT`.

use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::outbound::{self, OutboundError};
use super::pool::TunnelError;
use crate::identity::certs::CertInfo;
use crate::identity::certs::test_ca::TestCa;
use crate::testing::{GREETING, Mesh, echo_round, eventually, socks5_connect, within};

/// RFC 1928 reply "connection not allowed by ruleset": what the SOCKS5 listener answers when B refuses with 403.
const NOT_ALLOWED: u8 = 2;

const ALLOW_WEB: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: back}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["td.test/ns/front/sa/web"]
"#;

const DENY_WEB: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-web, namespace: back}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["td.test/ns/front/sa/web"]
"#;

/// Reads what is left until EOF; an error (a reset) counts as the end too.
async fn read_rest(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut rest = Vec::new();
    within("the end of the stream", stream.read_to_end(&mut rest)).await.map(|_| rest)
}

#[tokio::test]
async fn a_tunnel_carries_bytes_both_ways_and_its_half_close_crosses_both_hops() {
    let mesh = Mesh::start().await;
    let (a, b) = (&mesh.a, &mesh.b);
    let message = b"through A, HBONE and B to W_b";

    let mut client = a.connect(mesh.echo.addr).await.expect("the tunnel opens");
    echo_round(&mut client, message).await;
    eventually("the connection registered at A and at B", || {
        a.data.connections.len() == 1 && b.data.connections.len() == 1
    })
    .await;
    assert_eq!(a.data.pool.size(), 1, "one pooled HTTP/2 connection to B");
    let accepts = mesh.events.hbone_accepts(&a.workload.spiffe_id);
    assert_eq!(accepts.len(), 1, "B accepted one mTLS connection from W_a: {accepts:?}");
    assert_eq!(accepts[0].field("serial"), a.cert().info.serial, "A presented W_a's certificate");

    // The client stops writing: END_STREAM from A, FIN from B; the echo server sees EOF and closes, and that close
    // travels back the same way.
    client.shutdown().await.unwrap();
    assert_eq!(mesh.echo.received().await, message, "the echo server saw everything, then EOF");
    assert_eq!(read_rest(&mut client).await.expect("a clean EOF"), b"", "nothing after the echo, then EOF");
    eventually("the connection gone from A and B", || a.data.connections.is_empty() && b.data.connections.is_empty())
        .await;

    // Each side reported it once, with the same bytes.
    let (at_a, at_b) = (mesh.events.access("source"), mesh.events.access("destination"));
    assert_eq!((at_a.len(), at_b.len()), (1, 1), "{at_a:?} {at_b:?}");
    let length = message.len().to_string();
    for entry in [&at_a[0], &at_b[0]] {
        assert_eq!(entry.field("bytes_received"), length, "{entry:?}");
        assert_eq!(entry.field("bytes_sent"), length, "{entry:?}");
        assert_eq!(entry.field("response_flags"), "-", "{entry:?}");
        assert_eq!(entry.field("connection_security_policy"), "mutual_tls", "{entry:?}");
        assert_eq!(entry.field("source_workload"), "web", "{entry:?}");
        assert_eq!(entry.field("destination_workload"), "api", "{entry:?}");
        assert_eq!(entry.field("detail"), "-", "ended normally: {entry:?}");
    }
    assert_eq!(at_b[0].field("decision"), "allowed", "no policy: allowed");
    assert_eq!(at_b[0].field("source_principal"), "td.test/ns/front/sa/web");
}

#[tokio::test]
async fn when_the_workload_closes_first_the_client_sees_eof_and_can_still_send() {
    let mesh = Mesh::start().await;
    let mut client = mesh.a.connect(mesh.greeter.addr).await.expect("the tunnel opens");
    // The greeter wrote its greeting and closed its side at once.
    let mut greeting = vec![0u8; GREETING.len()];
    within("the greeting", client.read_exact(&mut greeting)).await.unwrap();
    assert_eq!(greeting, GREETING);
    let mut byte = [0u8; 1];
    assert_eq!(within("EOF from W_b", client.read(&mut byte)).await.unwrap(), 0, "W_b's FIN reached the client");
    // Only one direction is closed: what the client sends now still reaches W_b, which reads until the client's FIN.
    client.write_all(b"after your FIN").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(mesh.greeter.received().await, b"after your FIN");
    eventually("the connection gone from A and B", || {
        mesh.a.data.connections.is_empty() && mesh.b.data.connections.is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_deny_policy_at_the_destination_refuses_the_tunnel_and_closes_the_open_one() {
    let mut mesh = Mesh::start().await;
    let source = mesh.a.workload.spiffe_id.principal();

    // Control: a policy allowing W_a, through the same fixture.
    mesh.apply_policy(ALLOW_WEB).await;
    let mut open = mesh.a.connect(mesh.echo.addr).await.expect("allowed by back/allow-web");
    echo_round(&mut open, b"allowed").await;
    let allowed = mesh.events.access("destination");
    assert!(allowed.is_empty(), "the allowed connection is still open: {allowed:?}");
    assert_eq!(mesh.echo.accepted(), 1);

    // DENY for W_a's principal, beside the ALLOW: deny wins.
    mesh.apply_policy(DENY_WEB).await;
    assert_eq!(
        mesh.a.connect(mesh.echo.addr).await.err(),
        Some(NOT_ALLOWED),
        "B answered 403, A replied 'not allowed'"
    );
    assert_eq!(mesh.echo.accepted(), 1, "B never dialled W_b for the refused tunnel");
    let accepts = mesh.events.hbone_accepts(&mesh.a.workload.spiffe_id);
    assert_eq!(accepts.len(), 1, "a policy change leaves the TLS set and the pooled connection alone: {accepts:?}");

    // B recorded why (its access log, the report every path makes): the decision, its policy and the DENY flag, for
    // W_a's principal.
    let refused: Vec<_> =
        mesh.events.access("destination").into_iter().filter(|e| e.field("decision") == "denied").collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].field("policy"), "back/deny-web");
    assert_eq!(refused[0].field("response_flags"), "DENY");
    assert_eq!(refused[0].field("source_principal"), source);
    assert_eq!(refused[0].field("bytes_received"), "0");
    // A reported the refusal it got.
    let at_a: Vec<_> =
        mesh.events.access("source").into_iter().filter(|e| e.field("response_flags") == "DENY").collect();
    assert_eq!(at_a.len(), 1, "{at_a:?}");

    // The tunnel opened under the ALLOW policy alone was re-checked and closed.
    let closed = mesh.events.with_message("closing connection after a policy change");
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert!(closed[0].field("decision").contains("back/deny-web"), "{:?}", closed[0]);
    let _ = read_rest(&mut open).await;
    eventually("the revoked connection gone from B", || mesh.b.data.connections.is_empty()).await;
    let revoked: Vec<_> =
        mesh.events.access("destination").into_iter().filter(|e| e.field("decision") == "allowed").collect();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0].field("policy"), "back/allow-web");
    assert_ne!(revoked[0].field("detail"), "-", "ended by the proxy, not by either end: {:?}", revoked[0]);
}

/// The serial of the certificate B's HBONE listener presents to a client using A's current TLS set for W_a → W_b.
async fn served_serial(mesh: &Mesh) -> String {
    let tls = mesh.a.data.tls.load();
    let config = tls.client_for(&mesh.a.workload.spiffe_id, &mesh.b.workload.spiffe_id).expect("A has a config");
    let tcp = tokio::net::TcpStream::connect(mesh.b.hbone).await.unwrap();
    let name = ServerName::IpAddress(mesh.b.hbone.ip().into());
    let stream = within("the handshake", tokio_rustls::TlsConnector::from(config).connect(name, tcp)).await.unwrap();
    let leaf = stream.get_ref().1.peer_certificates().expect("B sent its chain")[0].clone();
    CertInfo::parse(&leaf).unwrap().serial
}

#[tokio::test]
async fn a_rotation_to_a_new_root_serves_new_tunnels_with_new_certificates_and_keeps_open_ones() {
    let mut mesh = Mesh::start().await;
    let w_a = mesh.a.workload.spiffe_id.clone();
    let mut open = mesh.a.connect(mesh.echo.addr).await.expect("the tunnel opens");
    echo_round(&mut open, b"before").await;
    let old_serial = mesh.a.cert().info.serial.clone();
    let old_b_serial = mesh.b.cert().info.serial.clone();

    // A root rotation as the control plane runs it: the new root joins the bundle, every SVID is renewed under it.
    let old_root = mesh.ca.root.clone();
    let new_ca = TestCa::named("second root");
    let new_root = new_ca.root.clone();
    mesh.set_roots(&[old_root.clone(), new_root.clone()]).await;
    echo_round(&mut open, b"after the bundle grew").await;
    mesh.renew_certificates(new_ca).await;
    let new_serial = mesh.a.cert().info.serial.clone();
    assert_ne!(new_serial, old_serial);
    echo_round(&mut open, b"after the renewal").await;

    // A new tunnel gets a new handshake, in which A presents its new certificate.
    let mut fresh = mesh.a.connect(mesh.echo.addr).await.expect("a tunnel with the new certificates");
    echo_round(&mut fresh, b"new").await;
    let accepts = mesh.events.hbone_accepts(&w_a);
    let serials: Vec<_> = accepts.iter().map(|e| e.field("serial")).collect();
    assert_eq!(serials, [old_serial.as_str(), new_serial.as_str()], "B saw the old, then the new client certificate");
    assert_eq!(mesh.a.data.pool.size(), 2, "the connection of the old set is not reused for new streams");

    // The old root leaves the bundle: open tunnels are not re-verified, new ones still work.
    mesh.set_roots(&[new_root]).await;
    echo_round(&mut open, b"after the old root left").await;
    echo_round(&mut fresh, b"still here").await;
    let mut last = mesh.a.connect(mesh.echo.addr).await.expect("a tunnel under the new root alone");
    echo_round(&mut last, b"new root only").await;
    assert_eq!(mesh.events.hbone_accepts(&w_a).len(), 3, "a new TLS set, a new handshake");

    // B serves its new certificate to anyone using A's current set.
    let served = served_serial(&mesh).await;
    assert_eq!(served, mesh.b.cert().info.serial);
    assert_ne!(served, old_b_serial);

    // The tunnel opened before the rotation still closes cleanly.
    open.shutdown().await.unwrap();
    assert_eq!(read_rest(&mut open).await.expect("a clean EOF"), b"");
}

#[tokio::test]
async fn tunnels_share_a_pooled_connection_until_it_expires_idle() {
    let mesh = Mesh::start().await;
    let (a, w_a) = (&mesh.a, &mesh.a.workload.spiffe_id);

    let mut first = a.connect(mesh.echo.addr).await.expect("first tunnel");
    let mut second = a.connect(mesh.echo.addr).await.expect("second tunnel");
    echo_round(&mut first, b"one").await;
    echo_round(&mut second, b"two").await;
    assert_eq!(a.data.pool.size(), 1);
    assert_eq!(mesh.events.hbone_accepts(w_a).len(), 1, "both streams on one mTLS connection");
    assert_eq!(mesh.b.data.connections.len(), 2, "two streams at B");

    // A connection carrying streams never expires, however long ago the last one ended.
    let long_after = || Instant::now() + super::pool::IDLE_TIMEOUT + Duration::from_secs(1);
    let generation = a.data.tls.load().generation;
    a.data.pool.reap_at(long_after(), generation);
    assert_eq!(a.data.pool.size(), 1, "busy connections are kept");

    for stream in [&mut first, &mut second] {
        stream.shutdown().await.unwrap();
        assert_eq!(read_rest(stream).await.expect("a clean EOF"), b"");
    }
    eventually("both tunnels gone from A", || a.data.connections.is_empty()).await;
    a.data.pool.reap_at(Instant::now(), generation);
    assert_eq!(a.data.pool.size(), 1, "idle, but not for long: kept");
    let surplus = Instant::now() + super::pool::SURPLUS_IDLE_TIMEOUT + Duration::from_secs(1);
    a.data.pool.reap_at(surplus, generation);
    assert_eq!(a.data.pool.size(), 1, "the key's only connection is kept past the surplus timeout");
    a.data.pool.reap_at(long_after(), generation);
    assert_eq!(a.data.pool.size(), 0, "idle past the timeout: dropped");
    eventually("B sees the idle connection closed", || mesh.b.data.connections.sessions() == 0).await;

    let mut third = a.connect(mesh.echo.addr).await.expect("a tunnel after the expiry");
    echo_round(&mut third, b"three").await;
    assert_eq!(a.data.pool.size(), 1);
    assert_eq!(mesh.events.hbone_accepts(w_a).len(), 2, "a new mTLS connection");
}

/// After a burst that needed more than one pooled connection (more concurrent tunnels than one carries), the
/// connections beyond the first close once idle for the surplus timeout, at both ends (their buffers and stream
/// tables go with them), the first stays for the next tunnel until the idle timeout, and tunnels after each step work.
#[tokio::test]
async fn connections_a_burst_opened_close_once_idle_and_the_next_tunnel_still_works() {
    use crate::hbone::MAX_STREAMS_PER_CONNECTION;
    let mesh = Mesh::start().await;
    let (a, b, w_a) = (&mesh.a, &mesh.b, &mesh.a.workload.spiffe_id);
    let generation = a.data.tls.load().generation;

    // One tunnel more than a connection carries: two pooled connections, both accepted by B.
    let mut burst = Vec::new();
    for i in 0..=MAX_STREAMS_PER_CONNECTION {
        let mut tunnel = a.connect(mesh.echo.addr).await.unwrap_or_else(|e| panic!("tunnel {i}: SOCKS5 reply {e}"));
        echo_round(&mut tunnel, b"burst").await;
        burst.push(tunnel);
    }
    assert_eq!(a.data.pool.size(), 2, "a second connection for the stream beyond the first's limit");
    assert_eq!(b.data.connections.sessions(), 2);
    assert_eq!(mesh.events.hbone_accepts(w_a).len(), 2);

    // Busy connections are kept, however late the reap.
    let late = Instant::now() + super::pool::IDLE_TIMEOUT + Duration::from_secs(1);
    a.data.pool.reap_at(late, generation);
    assert_eq!(a.data.pool.size(), 2, "connections carrying streams are kept");

    for mut tunnel in burst {
        tunnel.shutdown().await.unwrap();
        assert_eq!(read_rest(&mut tunnel).await.expect("a clean EOF"), b"");
    }
    eventually("every tunnel gone from A", || a.data.connections.is_empty()).await;

    // Control: just idle, nothing closes.
    a.data.pool.reap_at(Instant::now(), generation);
    assert_eq!(a.data.pool.size(), 2, "idle for less than the surplus timeout: both kept");
    // Past the surplus timeout: the second connection closes, at A and (its GOAWAY and close) at B.
    let surplus = Instant::now() + super::pool::SURPLUS_IDLE_TIMEOUT + Duration::from_secs(1);
    a.data.pool.reap_at(surplus, generation);
    assert_eq!(a.data.pool.size(), 1, "the surplus connection is dropped, the first kept");
    eventually("B sees the surplus connection closed", || b.data.connections.sessions() == 1).await;

    // The kept connection carries the next tunnel without a handshake.
    let mut next = a.connect(mesh.echo.addr).await.expect("a tunnel on the kept connection");
    echo_round(&mut next, b"after the burst").await;
    assert_eq!(mesh.events.hbone_accepts(w_a).len(), 2, "no new handshake: the kept connection took it");
    next.shutdown().await.unwrap();
    assert_eq!(read_rest(&mut next).await.expect("a clean EOF"), b"");
    eventually("the tunnel gone from A", || a.data.connections.is_empty()).await;

    // Past the idle timeout the last one closes too, at both ends; a new tunnel dials afresh.
    a.data.pool.reap_at(Instant::now() + super::pool::IDLE_TIMEOUT + Duration::from_secs(1), generation);
    assert_eq!(a.data.pool.size(), 0, "idle past the timeout: dropped");
    eventually("B sees the last connection closed", || b.data.connections.sessions() == 0).await;
    let mut fresh = a.connect(mesh.echo.addr).await.expect("a tunnel on a new connection");
    echo_round(&mut fresh, b"fresh").await;
    assert_eq!(a.data.pool.size(), 1);
    assert_eq!(mesh.events.hbone_accepts(w_a).len(), 3, "a new mTLS connection");
}

#[tokio::test]
async fn a_burst_of_tunnels_shares_the_first_handshake() {
    let mesh = Mesh::start().await;
    let mut clients = JoinSet::new();
    for i in 0..8u8 {
        let (socks5, target) = (mesh.a.socks5, mesh.echo.addr);
        clients.spawn(async move {
            let mut stream = socks5_connect(socks5, target).await.expect("tunnel");
            echo_round(&mut stream, &[i; 64]).await;
            stream
        });
    }
    let streams = within("the burst", clients.join_all()).await;
    assert_eq!(streams.len(), 8);
    assert_eq!(mesh.a.data.pool.size(), 1);
    assert_eq!(mesh.events.hbone_accepts(&mesh.a.workload.spiffe_id).len(), 1, "one handshake for the burst");
    assert_eq!(mesh.b.data.connections.len(), 8);
    drop(streams);
    eventually("the burst gone from A and B", || {
        mesh.a.data.connections.is_empty() && mesh.b.data.connections.is_empty()
    })
    .await;
}

/// Streams queued behind one dial to a peer that accepts TCP and never answers TLS share that dial and its
/// failure: one TCP connection reaches the peer, every stream fails after one dial timeout (not one each, in turn).
#[tokio::test]
async fn streams_waiting_for_a_dial_to_a_silent_peer_share_its_failure() {
    let mesh = Mesh::start().await;
    let a = &mesh.a;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let key = crate::proxy::pool::PoolKey {
        source: a.workload.spiffe_id.clone(),
        proxy: silent_addr,
        destination: mesh.b.workload.spiffe_id.clone(),
    };
    let started = Instant::now();
    let mut streams = JoinSet::new();
    for _ in 0..5 {
        let (data, key) = (a.data.clone(), key.clone());
        streams.spawn(async move {
            let tls = data.tls.load();
            let result =
                data.pool.open(&key, &tls, silent_addr, "127.0.0.1:1".parse().unwrap(), &bytes::Bytes::new()).await;
            (result.err().map(|e| e.to_string()), Instant::now())
        });
    }
    let mut ends = Vec::new();
    while let Some(joined) = streams.join_next().await {
        let (error, at) = joined.unwrap();
        let error = error.expect("no tunnel through a silent peer");
        assert!(error.contains("timed out connecting to proxy"), "{error}");
        ends.push(at - started);
    }
    println!("5 streams to a silent peer ended after {ends:?} (dial timeout {:?})", super::TUNNEL_DIAL_TIMEOUT);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "one dial, shared by every waiting stream");
    holder.abort();
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_by_the_idle_timeout_and_an_active_one_of_the_same_age_stays_open() {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use crate::config::Connection;
    // B closes tunnels idle for IDLE; A keeps the default (1 h), so any close seen here is B's.
    const IDLE: Duration = Duration::from_millis(800);
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    // Every task of both proxies runs on this test's thread (current-thread runtime).
    let _local = metrics::set_default_local_recorder(&recorder);
    let mesh = Mesh::start_with(Connection { idle_timeout: Some(IDLE), write_stall_timeout: None }).await;
    let a = &mesh.a;
    let mut idle = a.connect(mesh.echo.addr).await.expect("the idle tunnel opens");
    let mut active = a.connect(mesh.echo.addr).await.expect("the active tunnel opens");
    // Taken before the round: B's last byte on this tunnel moves after it.
    let last_byte = Instant::now();
    echo_round(&mut idle, b"one round, then silence").await;

    // The control, through the same proxies and to the same server: an echo every quarter of the idle timeout
    // while the idle one waits for its end, and for two idle timeouts after.
    let mut byte = [0u8; 1];
    let closed_after = loop {
        echo_round(&mut active, b"ping").await;
        match tokio::time::timeout(IDLE / 4, idle.read(&mut byte)).await {
            Err(_) => assert!(last_byte.elapsed() < crate::testing::WAIT, "the idle tunnel was never closed"),
            Ok(Ok(0) | Err(_)) => break last_byte.elapsed(),
            Ok(Ok(n)) => panic!("{n} unexpected bytes on the idle tunnel"),
        }
    };
    for _ in 0..8 {
        tokio::time::sleep(IDLE / 4).await;
        echo_round(&mut active, b"still here").await;
    }
    let active_age = last_byte.elapsed();
    println!(
        "idle tunnel closed {closed_after:?} after its last byte (idle timeout {IDLE:?}); the active one, {active_age:?} old, still echoes"
    );

    // The refusal and its reason at the side that closed: B's access log and counter.
    let at_b = mesh.events.access("destination");
    let reason = "closed by the proxy: idle timeout: no byte either way for 800ms";
    let closed: Vec<_> = at_b.iter().filter(|e| e.field("detail") == reason).collect();
    assert_eq!(closed.len(), 1, "one connection closed for idleness, by B: {at_b:?}");
    assert_eq!(at_b.len(), 1, "the active tunnel has not ended: {at_b:?}");
    assert!(closed_after >= IDLE, "not before the idle timeout: {closed_after:?}");
    let rendered = metrics.render();
    assert!(
        rendered.lines().any(|l| l == "trellis_connections_timed_out_total{reason=\"idle\"} 1"),
        "counted once, as idle: {rendered}"
    );
    assert_eq!(mesh.b.data.connections.len(), 1, "B still holds the active one");
    drop(active);
    eventually("both tunnels gone at B", || mesh.b.data.connections.is_empty()).await;
}

#[tokio::test]
async fn a_large_transfer_crosses_both_hops_both_ways_byte_exact_through_odd_writes_and_a_half_close() {
    // 16 MiB and an odd remainder, sent in writes of odd sizes (one byte, just over a TLS record, just over a copy
    // buffer, ...): the echo server sends each piece back as it reads it, so both directions run at once, through
    // both proxies' read-ahead, TLS, HTTP/2 frames and copy buffers.
    let mesh = Mesh::start().await;
    let client = mesh.a.connect(mesh.echo.addr).await.expect("the tunnel opens");
    let data: Vec<u8> =
        (0..16 * 1024 * 1024 + 12_345u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (mut read, mut write) = client.into_split();
    let send = async {
        let (mut rest, mut i) = (&data[..], 0);
        while !rest.is_empty() {
            let n = [1, 16_385, 262_147, 4_093, 65_537, 7][i % 6].min(rest.len());
            write.write_all(&rest[..n]).await?;
            (rest, i) = (&rest[n..], i + 1);
        }
        // The half-close: END_STREAM from A, FIN from B; the echo server then finishes and closes its side.
        write.shutdown().await
    };
    let receive = async {
        let mut got = Vec::with_capacity(data.len());
        read.read_to_end(&mut got).await.map(|_| got)
    };
    let (sent, got) = within("the transfer both ways", async { tokio::join!(send, receive) }).await;
    sent.expect("every byte sent, then the half-close");
    let got = got.expect("the echo, then a clean EOF (not a reset)");
    let first_difference = got.iter().zip(&data).position(|(a, b)| a != b);
    assert_eq!((got.len(), first_difference), (data.len(), None), "the echo is byte-exact");
    assert!(mesh.echo.received().await == data, "W_b received every byte in order, then EOF");

    eventually("the connection gone from A and B", || {
        mesh.a.data.connections.is_empty() && mesh.b.data.connections.is_empty()
    })
    .await;
    let length = data.len().to_string();
    let (at_a, at_b) = (mesh.events.access("source"), mesh.events.access("destination"));
    assert_eq!((at_a.len(), at_b.len()), (1, 1), "{at_a:?} {at_b:?}");
    for entry in [&at_a[0], &at_b[0]] {
        assert_eq!(entry.field("bytes_received"), length, "{entry:?}");
        assert_eq!(entry.field("bytes_sent"), length, "{entry:?}");
        assert_eq!(entry.field("detail"), "-", "ended normally: {entry:?}");
    }
}

#[tokio::test]
async fn a_workload_that_resets_is_seen_as_a_reset_by_the_client_through_both_proxies_and_one_that_closes_as_an_eof() {
    let mesh = Mesh::start().await;
    let a = &mesh.a;

    // Control: the greeter sends its greeting and closes (FIN): the client reads it, then EOF.
    let mut client = a.connect(mesh.greeter.addr).await.expect("the tunnel opens");
    let mut got = Vec::new();
    within("the greeting, then EOF", client.read_to_end(&mut got)).await.expect("a clean close is an EOF");
    assert_eq!(got, GREETING);

    // W_b resets its connection: B's copy fails on the read, B resets the HBONE stream, A's copy fails on the read
    // and resets the client's connection.
    let mut client = a.connect(mesh.resetter.addr).await.expect("the tunnel opens");
    client.write_all(b"hello").await.unwrap();
    assert_eq!(mesh.resetter.received().await, b"hello", "W_b read the bytes, then reset");
    let error = read_rest(&mut client).await.expect_err("the reset reaches the client as a reset");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

/// A client of A's capture path as `outbound::serve_captured` takes it over: the accepted end of a loopback
/// connection whose client has already written `sent` (all of it in the accepted socket by the time this returns).
async fn captured_client(sent: &[u8]) -> (tokio::net::TcpStream, tokio::net::TcpStream, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (accepted, peer) = listener.accept().await.unwrap();
    within("the client's bytes", client.write_all(sent)).await.unwrap();
    let mut peeked = vec![0u8; sent.len()];
    within("the client's bytes in the accepted socket", async {
        while accepted.peek(&mut peeked).await.unwrap() < sent.len() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    (client, accepted, peer)
}

#[tokio::test]
async fn a_captured_clients_first_bytes_leave_with_the_tunnels_opening_before_a_relays_anything() {
    let mesh = Mesh::start().await;
    let data = mesh.a.data.clone();
    // W_b's http port reports each request head as it arrives.
    let head = b"GET /first HTTP/1.1\r\nhost: w-b\r\n\r\n";
    let (mut client, accepted, peer) = captured_client(head).await;

    let open = outbound::connect(&data, Some(&mesh.a.workload), peer, mesh.http.addr, Some(&accepted));
    let connected = within("the tunnel", open).await.expect("the tunnel opens");
    // A has not relayed anything yet (no relay runs): the head went behind the CONNECT, and B, having answered 200,
    // passed it on to W_b.
    assert_eq!(mesh.http.received().await, head, "W_b has the request before A's relay started");

    let relay = tokio::spawn(async move { outbound::relay(&data, accepted, connected).await });
    let mut answer = Vec::new();
    within("the answer", async {
        while !answer.ends_with(b"ok\n") {
            let mut chunk = [0u8; 1024];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "EOF before the answer: {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{:?}", String::from_utf8_lossy(&answer));
    client.shutdown().await.unwrap();
    let _ = read_rest(&mut client).await;
    within("A's relay to end", relay).await.unwrap();
    let at_a = mesh.events.access("source");
    assert_eq!(at_a.len(), 1, "{at_a:?}");
    assert_eq!(at_a[0].field("bytes_received"), head.len().to_string(), "the first bytes count as received: {at_a:?}");
    assert_eq!(at_a[0].field("response_flags"), "-", "{at_a:?}");
}

#[tokio::test]
async fn a_captured_client_whose_first_bytes_exceed_one_read_arrives_byte_exact_through_a_half_close() {
    let mesh = Mesh::start().await;
    let data = mesh.a.data.clone();
    // More than the first read takes (`copy::FIRST_BUFFER_SIZE`): the rest follows through the relay.
    let sent: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    assert!(sent.len() > crate::copy::FIRST_BUFFER_SIZE);
    let (mut client, accepted, peer) = captured_client(&sent).await;

    let open = outbound::connect(&data, Some(&mesh.a.workload), peer, mesh.echo.addr, Some(&accepted));
    let connected = within("the tunnel", open).await.expect("the tunnel opens");
    let relay = tokio::spawn(async move { outbound::relay(&data, accepted, connected).await });
    client.shutdown().await.unwrap();
    assert!(mesh.echo.received().await == sent, "W_b got every byte in order, then EOF");
    let back = read_rest(&mut client).await.expect("a clean EOF");
    assert!(back == sent, "the echo came back whole ({} of {} bytes)", back.len(), sent.len());
    within("A's relay to end", relay).await.unwrap();

    let (at_a, at_b) = (mesh.events.access("source"), mesh.events.access("destination"));
    assert_eq!((at_a.len(), at_b.len()), (1, 1), "{at_a:?} {at_b:?}");
    for entry in [&at_a[0], &at_b[0]] {
        assert_eq!(entry.field("bytes_received"), sent.len().to_string(), "{entry:?}");
        assert_eq!(entry.field("bytes_sent"), sent.len().to_string(), "{entry:?}");
        assert_eq!(entry.field("detail"), "-", "ended normally: {entry:?}");
    }
}

#[tokio::test]
async fn a_refused_captured_client_whose_first_bytes_went_with_the_connect_is_refused_at_b_and_reset_at_a() {
    let mut mesh = Mesh::start().await;
    let data = mesh.a.data.clone();
    let sent = b"first bytes for W_b";

    // Control: the same path under an ALLOW policy.
    mesh.apply_policy(ALLOW_WEB).await;
    let (mut client, accepted, peer) = captured_client(sent).await;
    let open = outbound::connect(&data, Some(&mesh.a.workload), peer, mesh.echo.addr, Some(&accepted));
    let connected = within("the tunnel", open).await.expect("allowed by back/allow-web");
    let relay_data = data.clone();
    let relay = tokio::spawn(async move { outbound::relay(&relay_data, accepted, connected).await });
    client.shutdown().await.unwrap();
    assert_eq!(read_rest(&mut client).await.expect("a clean EOF"), sent, "echoed");
    within("A's relay to end", relay).await.unwrap();
    assert_eq!(mesh.echo.accepted(), 1);

    mesh.apply_policy(DENY_WEB).await;
    let (mut client, accepted, peer) = captured_client(sent).await;
    let open = outbound::connect(&data, Some(&mesh.a.workload), peer, mesh.echo.addr, Some(&accepted));
    let error = within("the refusal", open).await.err().expect("B refuses");
    let status = match &error {
        OutboundError::Tunnel(e) => match e.cause() {
            TunnelError::Refused(_, status) => Some(*status),
            _ => None,
        },
        _ => None,
    };
    assert_eq!(status, Some(hyper::StatusCode::FORBIDDEN), "B answered 403: {error}");
    // B refused it (its access log: denied by back/deny-web) and never dialled W_b: the bytes sent with the
    // CONNECT went nowhere.
    let refused: Vec<_> =
        mesh.events.access("destination").into_iter().filter(|e| e.field("decision") == "denied").collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].field("policy"), "back/deny-web");
    assert_eq!(refused[0].field("response_flags"), "DENY");
    assert_eq!(refused[0].field("bytes_received"), "0");
    assert_eq!(mesh.echo.accepted(), 1, "B never dialled W_b for the refused tunnel");
    // A closes the client's connection with a reset, as a close with its bytes unread would have.
    drop(accepted);
    let mut byte = [0u8; 1];
    let reset = within("the client's connection to end", client.read(&mut byte)).await.expect_err("a reset");
    assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset, "{reset}");
}
