//! The plain-HTTP endpoint for Prometheus (`/metrics`) and readiness (`/healthz/ready`); no auth, as Istio's 15014.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency histograms as real Prometheus histograms (buckets), so `histogram_quantile` works across instances.
pub fn metrics_builder() -> Result<PrometheusBuilder, BuildError> {
    const SECONDS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
}

/// HELP text for every series the control plane exports (Prometheus lints series without it).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("trellis_connected_proxies", "Proxies with an open discovery stream.");
    describe_counter!("trellis_pushes_total", "Config updates sent to proxies.");
    describe_counter!(
        "trellis_jwt_svids_total",
        "JWT-SVID signing requests from proxies, by outcome (issued, permission_denied, invalid_argument, error)."
    );
    describe_counter!(
        "trellis_proxy_status_writes_total",
        "Proxy status entries this replica wrote to the shared store (etcd), batched at most once a second."
    );
    describe_counter!(
        "trellis_proxy_status_puts_total",
        "Keys this replica put to the shared store (etcd) for its proxies' status: one per bucket of proxies written."
    );
    describe_counter!(
        "trellis_push_updates_total",
        "Config updates sent to proxies, by kind: full (snapshot), delta, resume (a resumed stream's first delta)."
    );
    describe_counter!("trellis_push_bytes_total", "Encoded bytes of the config updates sent to proxies, by kind.");
    describe_counter!(
        "trellis_stream_resumes_total",
        "Discovery streams by what their Hello's resume request got: delta, not_asked, other_lineage, unknown_version."
    );
    describe_counter!("trellis_nacks_total", "Config updates proxies rejected, by the part rejected.");
    describe_histogram!(
        "trellis_config_convergence_seconds",
        metrics::Unit::Seconds,
        "Time from a config change to each proxy's ACK of it."
    );
    describe_counter!("trellis_certificates_signed_total", "Workload certificates issued.");
    describe_counter!("trellis_certificates_refused_total", "Certificate requests refused, by reason.");
    describe_histogram!("trellis_certificate_signing_seconds", metrics::Unit::Seconds, "Time to sign a workload CSR.");
    describe_counter!("trellis_join_attempts_total", "Node join attempts, by result.");
    describe_gauge!("trellis_store_resources", "Security resources in the store, by kind.");
    describe_gauge!("trellis_store_workloads", "Workloads registered by proxies.");
    describe_gauge!("trellis_config_version", "The current config version.");
    describe_gauge!("trellis_store_available", "1 while the store answers (etcd with quorum), else 0.");
    describe_counter!("trellis_revocations_total", "Revocations recorded, by kind (node, identity, admin).");
    describe_gauge!(
        "trellis_rotation_phase",
        "The root CA rotation's phase: 1 for the current one (none, prepare, switch, overlap, retire, done), 0 for the others."
    );
    describe_gauge!(
        "trellis_rotation_proxies_holding_old_ca",
        "Proxies whose last report names a certificate of the retiring CA (0 outside a rotation)."
    );
}

/// Whether the replica is ready: its store answers (a replica whose etcd lost quorum serves discovery from its last
/// snapshot but refuses writes, and says so here).
pub type Readiness = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

pub async fn serve_metrics(listener: tokio::net::TcpListener, handle: PrometheusHandle, ready: Readiness) {
    loop {
        let (tcp, _peer): (tokio::net::TcpStream, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(route(&req, &handle, ready())) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

fn route(req: &Request<hyper::body::Incoming>, handle: &PrometheusHandle, ready: bool) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => {
            metrics::gauge!("trellis_store_available").set(if ready { 1.0 } else { 0.0 });
            (StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        "/healthz/ready" if ready => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/healthz/ready" => {
            (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: store unavailable\n".to_owned())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}
