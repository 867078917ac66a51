//! The admin HTTP endpoint (loopback by default): `/config_dump` shows what the proxy currently holds,
//! `/healthz/ready` says whether it can serve. Public material only: no private key is ever rendered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};
use trellis_proto::v1;

use crate::identity::certs::{CertInfo, rfc3339};
use crate::identity::{NodeCredential, WorkloadCerts};
use crate::shutdown_requested;
use crate::state::StateStore;

/// What the admin endpoint reads, filled in as start-up progresses (`app`).
pub struct Shared {
    pub node: String,
    /// The node credential in use (replaced at each renewal).
    pub node_credential: Arc<arc_swap::ArcSwapOption<NodeCredential>>,
    pub workload_certs: OnceLock<Arc<WorkloadCerts>>,
    pub state: Arc<StateStore>,
    /// Renders `/metrics` (absent where no recorder is installed, e.g. in unit tests).
    pub metrics: OnceLock<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Shared {
    pub fn new(node: String, state: Arc<StateStore>) -> Self {
        Self { node, node_credential: Arc::default(), workload_certs: OnceLock::new(), state, metrics: OnceLock::new() }
    }
}

pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

type Router = fn(&Request<Incoming>, &Shared) -> Response<Full<Bytes>>;

/// Serves the admin endpoints until shutdown; open connections finish their current request.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    serve_with(listener, shared, shutdown, route).await
}

/// Serves only `/healthz/ready` (the readiness port, reachable from outside the host, shows nothing else).
pub async fn serve_ready(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    serve_with(listener, shared, shutdown, |req, shared| match req.uri().path() {
        "/healthz/ready" => route(req, shared),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
    .await
}

async fn serve_with(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>, router: Router) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown_requested(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(router(&req, &shared)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown_requested(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Serves only `/metrics` (Prometheus text format) on the metrics port.
pub async fn serve_metrics(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    serve_with(listener, shared, shutdown, |req, shared| match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            crate::metrics::record_process();
            let body = shared.metrics.get().map(|h| h.render()).unwrap_or_default();
            respond(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
    .await
}

fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let json = |value: &Value| serde_json::to_string_pretty(value).expect("JSON values serialize");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => respond(StatusCode::OK, "application/json", json(&config_dump(shared))),
        (&Method::GET, "/certs") => respond(StatusCode::OK, "application/json", json(&certs(shared))),
        (&Method::GET, "/logging") => match crate::logging::level() {
            Some(level) => respond(StatusCode::OK, "text/plain", format!("level: {level}\n")),
            None => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "logging is not initialised\n".into()),
        },
        (&Method::POST, "/logging") => set_logging(req),
        (&Method::GET, "/healthz/ready") => match readiness(shared) {
            Ok(note) => {
                respond(StatusCode::OK, "text/plain", note.map_or("ready\n".into(), |n| format!("ready: {n}\n")))
            }
            Err(waiting) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {waiting}\n")),
        },
        (_, "/config_dump" | "/healthz/ready" | "/certs") => {
            respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET is allowed\n".into())
        }
        (_, "/logging") => respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or POST\n".into()),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// `POST /logging?level=SPEC`: a level (`debug`) or a full filter (`info,access=off`), as `RUST_LOG` takes.
/// POST, not GET, so that a prefetching browser or crawler cannot change it.
fn set_logging(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let level = req.uri().query().unwrap_or("").split('&').find_map(|pair| pair.strip_prefix("level="));
    let Some(level) = level.map(percent_decode).filter(|l| !l.is_empty()) else {
        return respond(StatusCode::BAD_REQUEST, "text/plain", "missing ?level=\n".into());
    };
    match crate::logging::set_level(&level) {
        Ok(()) => {
            info!(%level, "log level changed through the admin endpoint");
            respond(StatusCode::OK, "text/plain", format!("level: {level}\n"))
        }
        Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    }
}

/// Decodes `%XX` escapes (a filter such as `info,a=debug` arrives as `info%2Ca%3Ddebug` from some clients); a `%`
/// without two hex digits after it stays as it is, and bytes that are not UTF-8 become U+FFFD.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// `/certs`: every certificate the proxy holds (workload SVIDs and the node credential, with their chains as PEM) and
/// the trust bundle, with serials, SPIFFE IDs and validity. Never key material.
pub fn certs(shared: &Shared) -> Value {
    let now = std::time::SystemTime::now();
    let chain_json = |chain: &[rustls_pki_types::CertificateDer<'static>]| -> Vec<Value> {
        chain
            .iter()
            .filter_map(|der| {
                let mut entry = chain_entry(&CertInfo::parse(der).ok()?);
                // Public material: lets an operator check a chain with other tools (openssl verify).
                entry["pem"] = json!(crate::identity::certs::to_pem(std::slice::from_ref(der)));
                Some(entry)
            })
            .collect()
    };
    let workloads: Vec<Value> = shared
        .workload_certs
        .get()
        .map(|certs| {
            certs
                .all()
                .iter()
                .map(|c| {
                    let mut entry = cert_json(&c.spiffe_id.to_string(), &c.info);
                    entry["seconds_until_expiry"] = json!(seconds_until(c.info.not_after, now));
                    entry["chain"] = json!(chain_json(&c.chain));
                    entry
                })
                .collect()
        })
        .unwrap_or_default();
    let state = shared.state.load();
    let roots: Vec<Value> =
        state.trust_bundle.as_ref().map(|b| b.roots.iter().map(|r| root_json(&r.info)).collect()).unwrap_or_default();
    json!({
        "workload_certificates": workloads,
        "node_certificate": shared.node_credential.load_full().map(|n| {
            let mut entry = cert_json(&n.spiffe_id.to_string(), &n.info);
            entry["seconds_until_expiry"] = json!(seconds_until(n.info.not_after, now));
            entry["chain"] = json!(chain_json(&n.chain));
            entry
        }),
        "trust_bundle": roots,
    })
}

fn seconds_until(t: std::time::SystemTime, now: std::time::SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn chain_entry(info: &CertInfo) -> Value {
    json!({
        "subject": info.subject,
        "serial": info.serial,
        "uri_sans": info.uri_sans,
        "is_ca": info.is_ca,
        "not_before": rfc3339(info.not_before),
        "not_after": rfc3339(info.not_after),
        "sha256": info.sha256,
    })
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Ready once the node credential, every workload certificate and the first full config are in place;
/// otherwise says what is missing. Certificates and config read back from the state directory at start count
/// (the proxy serves with them while the control plane is unreachable); then the answer says so.
pub fn readiness(shared: &Shared) -> Result<Option<String>, String> {
    let mut missing = Vec::new();
    if shared.node_credential.load().is_none() {
        missing.push("node credential".to_owned());
    }
    match shared.workload_certs.get() {
        Some(certs) => {
            let total = certs.ids().count();
            let have = certs.all().len();
            if have < total {
                missing.push(format!("workload certificates ({have}/{total})"));
            }
        }
        None => missing.push("workload certificates".to_owned()),
    }
    if !shared.state.load().synced {
        missing.push("first config from the control plane".to_owned());
    }
    if !missing.is_empty() {
        return Err(format!("waiting for {}", missing.join(", ")));
    }
    let state = shared.state.load();
    Ok(state.restored.then(|| {
        format!("serving the config stored at version {} (not yet confirmed by the control plane)", state.version)
    }))
}

pub fn config_dump(shared: &Shared) -> Value {
    let state = shared.state.load();
    let node = shared.node_credential.load_full();

    let (trust_domain, roots): (Option<String>, Vec<Value>) = match (&state.trust_bundle, &node) {
        (Some(bundle), _) => {
            (Some(bundle.trust_domain.clone()), bundle.roots.iter().map(|r| root_json(&r.info)).collect())
        }
        (None, Some(node)) => (
            Some(node.trust_domain().to_owned()),
            node.roots.iter().filter_map(|der| CertInfo::parse(der).ok()).map(|info| root_json(&info)).collect(),
        ),
        (None, None) => (None, Vec::new()),
    };

    let certificates: Vec<Value> = shared
        .workload_certs
        .get()
        .map(|certs| certs.all().iter().map(|c| cert_json(&c.spiffe_id.to_string(), &c.info)).collect())
        .unwrap_or_default();

    json!({
        "node": shared.node,
        "version": state.synced.then_some(state.version),
        // True while the config is the one read from stateDir at start, before the control plane's snapshot.
        "restored": state.restored,
        "trust_domain": trust_domain,
        "roots": roots,
        "workloads": state.workloads.values().map(|w| workload_json(w)).collect::<Vec<_>>(),
        "resources": state.resources.iter().map(|(key, stored)| json!({
            "kind": key.kind.as_str(),
            "namespace": key.namespace,
            "name": key.name,
            "revision": stored.revision,
            "resource": serde_json::to_value(&stored.resource).unwrap_or(Value::Null),
        })).collect::<Vec<_>>(),
        "certificates": certificates,
        "node_certificate": node.as_ref().map(|n| cert_json(&n.spiffe_id.to_string(), &n.info)),
        "namespaces": node.as_ref().map(|n| n.namespaces.clone()),
    })
}

fn root_json(info: &CertInfo) -> Value {
    json!({
        "subject": info.subject,
        "not_after": rfc3339(info.not_after),
        "sha256": info.sha256,
        "spki_sha256": info.spki_sha256,
    })
}

fn cert_json(spiffe_id: &str, info: &CertInfo) -> Value {
    json!({
        "spiffe_id": spiffe_id,
        "serial": info.serial,
        "not_before": rfc3339(info.not_before),
        "not_after": rfc3339(info.not_after),
    })
}

fn workload_json(w: &v1::Workload) -> Value {
    let ports: Vec<Value> = w
        .ports
        .iter()
        .map(|p| {
            let protocol = v1::Protocol::try_from(p.protocol)
                .ok()
                .and_then(crate::config::Protocol::from_proto)
                .map_or("unspecified", crate::config::Protocol::as_str);
            json!({"port": p.port, "protocol": protocol})
        })
        .collect();
    json!({
        "name": w.name,
        "namespace": w.namespace,
        "service_account": w.service_account,
        "labels": w.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "addresses": w.addresses,
        "ports": ports,
        "node": w.node,
        "proxy_address": w.proxy_address,
        "spiffe_id": w.spiffe_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certs::test_ca::TestCa;
    use crate::identity::{CertManager, WorkloadCerts};
    use crate::state::{State, StateStore, apply};
    use std::time::{Duration, Instant, SystemTime};
    use trellis_proto::spiffe::SpiffeId;

    #[tokio::test]
    async fn serves_dump_and_readiness_without_keys() {
        let ca = TestCa::new();
        let shared = Arc::new(Shared::new("node-a".into(), Arc::new(StateStore::new(State::new("td")))));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, shared.clone(), shutdown));

        let (status, body) = get(address, "/healthz/ready").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("node credential") && body.contains("first config"), "{body}");

        // Give it a certificate and a config.
        let id = SpiffeId::workload("td", "ns", "sa").unwrap();
        let certs = Arc::new(WorkloadCerts::new([id.clone()]));
        let mut manager = CertManager::new(certs.clone(), Instant::now());
        let request = manager.step(Instant::now()).requests.remove(0);
        let chain = ca.sign(&request.csr_der, Duration::from_secs(3600));
        let answer = v1::CertificateResponse {
            request_id: request.request_id,
            certificate_chain: chain.iter().map(|c| c.to_vec()).collect(),
            error: String::new(),
        };
        manager.on_response(answer, Instant::now(), SystemTime::now()).unwrap();
        let _ = shared.workload_certs.set(certs);
        let update = v1::ConfigUpdate {
            version: 7,
            full: true,
            trust_bundle: Some(v1::TrustBundle {
                trust_domain: "td".into(),
                roots: vec![ca.root.to_vec()],
                jwks: String::new(),
            }),
            workloads: vec![v1::Workload {
                name: "w".into(),
                namespace: "ns".into(),
                addresses: vec!["10.0.0.1".into()],
                ports: vec![v1::Port { port: 80, protocol: v1::Protocol::Http as i32 }],
                ..Default::default()
            }],
            ..Default::default()
        };
        shared.state.store(apply(&shared.state.load(), &update).unwrap());

        let (status, body) = get(address, "/config_dump").await;
        assert_eq!(status, 200);
        assert!(!body.contains("PRIVATE"), "{body}");
        let dump: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(dump["node"], "node-a");
        assert_eq!(dump["version"], 7);
        assert_eq!(dump["trust_domain"], "td");
        assert_eq!(dump["roots"][0]["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(dump["workloads"][0]["ports"][0]["protocol"], "http");
        let cert = &dump["certificates"][0];
        assert_eq!(cert["spiffe_id"], id.to_string());
        assert_eq!(cert["serial"], CertInfo::parse(&chain[0]).unwrap().serial);
        assert!(humantime::parse_rfc3339(cert["not_after"].as_str().unwrap()).is_ok());

        // Still not ready: no node credential in this test.
        let (status, body) = get(address, "/healthz/ready").await;
        assert_eq!(status, 503);
        assert_eq!(body, "not ready: waiting for node credential\n");
        assert_eq!(get(address, "/nope").await.0, 404);

        stop.send(true).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn percent_decoding_of_the_level_matches_the_hand_written_one() {
        assert_eq!(percent_decode("info%2Ca%3Ddebug"), "info,a=debug");
        assert_eq!(percent_decode("info%2ca%3ddebug"), "info,a=debug", "lower-case hex digits");
        assert_eq!(percent_decode("debug"), "debug");
        assert_eq!(percent_decode("a+b"), "a+b", "`+` is not a space here");
        assert_eq!(percent_decode("100%"), "100%", "a `%` at the end stays");
        assert_eq!(percent_decode("%4"), "%4", "one hex digit: the `%` stays");
        assert_eq!(percent_decode("%zzinfo"), "%zzinfo", "no hex digits: the `%` stays");
        assert_eq!(percent_decode("%%41"), "%A", "the second `%` starts an escape");
        assert_eq!(percent_decode("%ff"), "\u{fffd}", "not UTF-8: the replacement character");
    }

    /// Minimal HTTP/1.1 GET, enough for these tests.
    async fn get(address: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }
}
