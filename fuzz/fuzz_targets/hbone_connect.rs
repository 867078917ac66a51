//! The head of an HBONE stream as the inbound listener reads it (`proxy/inbound.rs`: method, CONNECT authority,
//! `Forwarded`). The input is split into method, URI and header lines; whatever `http` itself refuses is skipped,
//! as hyper would have refused it before our code runs.
#![no_main]

use hyper::Request;
use libfuzzer_sys::fuzz_target;
use trellis_data_plane::hbone;
use trellis_data_plane::proxy::inbound::ConnectRequest;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else { return };
    let Ok(method) = hyper::Method::from_bytes(method) else { return };
    let Ok(uri) = hyper::Uri::try_from(uri) else { return };
    let mut builder = Request::builder().method(method).uri(uri);
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(&line[..colon]),
            hyper::header::HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    let Ok(request) = builder.body(()) else { return };
    if let Ok(connect) = ConnectRequest::parse(&request) {
        if let Some(source) = connect.source_addr {
            // What the client side writes for an address reads back as that address.
            let mut headers = hyper::HeaderMap::new();
            headers.insert(hbone::FORWARDED, hbone::forwarded_for(source).parse().unwrap());
            assert_eq!(hbone::original_source(&headers), Some(source));
        }
    }
});
