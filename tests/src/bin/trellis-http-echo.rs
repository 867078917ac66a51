//! `trellis-http-echo --listen ADDR`: an HTTP/1.1 and h2c (prior knowledge) server for tests and benchmarks. Every
//! request gets 200 with a JSON body describing what arrived: method, target (path and query), version, headers
//! (repeated ones joined with `,`), body length. A request with `content-type: application/grpc` gets an empty
//! gRPC response with `grpc-status: 0` in trailers. `GET /__requests` lists the targets of every request received
//! so far (one per line), so a test can prove what a proxy did not forward.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = http_body_util::Either<
    Full<Bytes>,
    StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>,
>;

static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

async fn answer(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    if parts.uri.path() == "/__requests" {
        let seen = SEEN.lock().expect("lock").join("\n");
        return Ok(Response::new(http_body_util::Either::Left(Full::new(Bytes::from(seen)))));
    }
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or_default().to_owned();
    SEEN.lock().expect("lock").push(format!("{} {target}", parts.method));
    let length = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.entry(name.as_str().to_owned()).and_modify(|v| *v = format!("{v},{value}")).or_insert(value);
    }
    if headers.get("content-type").is_some_and(|ct| ct.starts_with("application/grpc")) {
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
        let frames = vec![Ok(Frame::data(Bytes::new())), Ok(Frame::trailers(trailers))];
        let mut response = Response::new(http_body_util::Either::Right(StreamBody::new(tokio_stream::iter(frames))));
        response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/grpc"));
        return Ok(response);
    }
    let described = serde_json::json!({
        "method": parts.method.as_str(),
        "target": target,
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "bodyLength": length,
    });
    let mut response = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(described.to_string()))));
    response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(response)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(addr)) => addr.parse()?,
        _ => anyhow::bail!("usage: trellis-http-echo --listen ADDR"),
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer)).await;
        });
    }
}
