//! Revocation in the data path, in one process (`crate::testing::Mesh`): a revocation list reaching a proxy closes
//! the open connections of the peer it names, in both directions, and that proxy refuses new handshakes with it,
//! saying why; a peer it does not name is left alone (each test revokes something else first, through the same
//! path, as its control). The time from installing the list to the client seeing its tunnel end is printed, not
//! asserted.

use std::time::Instant;

use tokio::io::AsyncReadExt;

use trellis_proto::v1;

use crate::testing::{At, Event, Mesh, echo_round, eventually, revocations, revoked_tags, within};

/// Waits for the client's side of a tunnel to end (EOF or reset); returns how long that took from `since`.
async fn ended(client: &mut tokio::net::TcpStream, since: Instant) -> std::time::Duration {
    let mut rest = Vec::new();
    let _ = within("the tunnel to end", client.read_to_end(&mut rest)).await;
    since.elapsed()
}

fn detail_contains<'a>(entries: &'a [Event], text: &str) -> Vec<&'a Event> {
    entries.iter().filter(|e| e.field("detail").contains(text)).collect()
}

/// How a test names node A's certificate as revoked: the list naming another node (the control) and the list
/// naming A too, given A's serial.
type Lists = fn(&str) -> (v1::Revocations, v1::Revocations);

#[tokio::test]
async fn revoking_the_client_node_closes_its_tunnel_at_the_server_and_refuses_its_handshakes() {
    client_node_revoked_at_the_server(|serial| {
        let control = revocations(&[("0123abcd", "node-z")], &[]);
        (control, revocations(&[("0123abcd", "node-z"), (serial, "node-a")], &[]))
    })
    .await;
}

/// The same, with node A revoked by the tag its serial starts with (as the control plane revokes a node's workload
/// certificates): the control names another node's tag.
#[tokio::test]
async fn revoking_the_client_nodes_serial_tag_closes_its_tunnel_at_the_server_and_refuses_its_handshakes() {
    client_node_revoked_at_the_server(|serial| {
        let tag = &serial[..2 * trellis_proto::SERIAL_TAG_BYTES];
        let other = if tag.starts_with('7') { "4000000000000000" } else { "7fffffffffffffff" };
        (revoked_tags(&[(other, "node-z")]), revoked_tags(&[(other, "node-z"), (tag, "node-a")]))
    })
    .await;
}

async fn client_node_revoked_at_the_server(lists: Lists) {
    let mut mesh = Mesh::start().await;
    let serial = mesh.a.cert().info.serial.clone();
    let (control, revoking) = lists(&serial);
    let mut client = mesh.a.connect(mesh.echo.addr).await.expect("the tunnel opens");
    echo_round(&mut client, b"before").await;

    // Control: another node's certificate revoked at B, through the same path: the tunnel stays.
    mesh.revoke(At::B, control).await;
    echo_round(&mut client, b"still open").await;
    assert_eq!(mesh.b.data.connections.len(), 1);

    // Node A's certificate revoked at B (A itself hears nothing, as a revoked node's stream is cut).
    let started = Instant::now();
    mesh.revoke(At::B, revoking).await;
    let took = ended(&mut client, started).await;
    println!("revocation installed at B -> A's client saw its tunnel end: {took:?}");
    assert_eq!(mesh.echo.received().await, b"beforestill open", "W_b's connection was closed too");
    eventually("nothing open at A or B", || mesh.a.data.connections.is_empty() && mesh.b.data.connections.is_empty())
        .await;

    // B says why: its access-log entry for the stream, and the HBONE connection it closed.
    let reason = format!("peer certificate {serial} was issued to revoked node \"node-a\"");
    let at_b = mesh.events.access("destination");
    assert_eq!(detail_contains(&at_b, &format!("closed by the proxy: {reason}")).len(), 1, "{at_b:?}");
    let closed = mesh.events.with_message("HBONE connection closed");
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].field("reason"), format!("closed by the proxy: {reason}"));

    // A new tunnel from A is refused by B's verifier, with the reason at B.
    assert!(mesh.a.connect(mesh.echo.addr).await.is_err(), "B refused the handshake");
    // A refused handshake is logged once, as its access-log entry.
    let at_b = mesh.events.access("destination");
    let refused = format!("TLS handshake refused: {reason}");
    assert!(detail_contains(&at_b, &refused).iter().any(|e| e.field("response_flags") == "TLS_FAILURE"), "{at_b:?}");
    assert_eq!(mesh.echo.accepted(), 1, "W_b was never dialled for the refused tunnel");
}

#[tokio::test]
async fn revoking_the_server_identity_closes_the_pooled_connection_and_the_client_refuses_it() {
    let mut mesh = Mesh::start().await;
    let server = mesh.b.workload.spiffe_id.clone();
    let mut client = mesh.a.connect(mesh.echo.addr).await.expect("the tunnel opens");
    echo_round(&mut client, b"before").await;
    assert_eq!(mesh.a.data.pool.size(), 1);

    // Control: another identity revoked at A, through the same path, leaves A → W_b alone.
    let unrelated =
        trellis_proto::spiffe::SpiffeId::workload(crate::testing::TRUST_DOMAIN, "elsewhere", "someone").unwrap();
    mesh.revoke(At::A, revocations(&[], &[&unrelated.to_string()])).await;
    echo_round(&mut client, b"still open").await;
    assert_eq!(mesh.a.data.pool.size(), 1, "the pooled connection stays");

    // W_b's identity revoked at A (the client side): A closes its pooled connection to B and the stream on it.
    let started = Instant::now();
    mesh.revoke(At::A, revocations(&[], &[&unrelated.to_string(), &server.to_string()])).await;
    let took = ended(&mut client, started).await;
    println!("revocation installed at A -> A's client saw its tunnel end: {took:?}");
    assert_eq!(mesh.a.data.pool.size(), 0, "the pooled connection to the revoked peer is gone");
    eventually("nothing open at A or B", || mesh.a.data.connections.is_empty() && mesh.b.data.connections.is_empty())
        .await;
    let reason = format!("peer identity {server} was revoked");
    let at_a = mesh.events.access("source");
    assert_eq!(detail_contains(&at_a, &format!("closed by the proxy: {reason}")).len(), 1, "{at_a:?}");

    // A new tunnel to W_b is refused by A's verifier, with the reason at A.
    assert!(mesh.a.connect(mesh.echo.addr).await.is_err(), "A refused B's certificate");
    let at_a = mesh.events.access("source");
    let refused = detail_contains(&at_a, &reason);
    assert!(refused.iter().any(|e| e.field("response_flags") == "TLS_FAILURE"), "{at_a:?}");
    assert_eq!(mesh.echo.accepted(), 1, "no new connection reached W_b");
}
