//! The SOCKS5 listener's handshake (`proxy/socks5.rs`) over an in-memory pipe: the input is everything the client
//! sends before closing its side. The handshake must end (a target, a refusal or an error) without panicking, and
//! write back no more than a method selection.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_data_plane::proxy::socks5;

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"));

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(async {
        let (mut client, mut listener) = tokio::io::duplex(1024);
        let client_side = async {
            // The listener closes its end once the handshake ends: a write then fails, which is fine.
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        };
        let listener_side = async {
            let outcome = socks5::handshake(&mut listener).await;
            drop(listener);
            outcome
        };
        let (answer, _outcome) = tokio::join!(client_side, listener_side);
        assert!(answer.len() <= 2, "the handshake wrote {answer:?}");
    });
});
