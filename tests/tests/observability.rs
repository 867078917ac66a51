//! Observability with real processes: a real Prometheus scrapes the control plane and the proxies of a running
//! mesh and finds exactly the traffic the test made; `promtool` lints every `/metrics`; the access log and the
//! decision counters name the policy that denied; the admin endpoints show certificates but never keys.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use trellis_tests::outcome::{Outcome, Refusal};
use trellis_tests::prometheus::Prometheus;
use trellis_tests::{ControlPlane, Echo, Proxy, ProxyOptions, WorkloadSpec, http, socks, wait_for};

const WEB: &str = "127.0.10.41";
const BATCH: &str = "127.0.10.45";
const API: &str = "127.0.10.42";

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-allow-web, namespace: shop}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-batch, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["jobs"]}}]}]
"#;

struct Mesh {
    cp: ControlPlane,
    web: Proxy,
    batch: Proxy,
    server: Proxy,
    _echo: Echo,
    api: SocketAddr,
}

fn mesh() -> Mesh {
    let cp = ControlPlane::start(&[]);
    // Port 0: the echo reports the port the kernel gave it, and the workload declares that port.
    let echo = Echo::start(format!("{API}:0").parse().unwrap());
    let (api, port) = (echo.addr, echo.addr.port());
    let mut api_spec = WorkloadSpec::new("api", "shop", "api", API);
    api_spec.ports = vec![(port, "tcp")];
    let json_logs = ProxyOptions {
        extra: serde_json::json!({"logFormat": "json"}).as_object().unwrap().clone(),
        ..Default::default()
    };
    let server = Proxy::start_with(&cp, "node-server", &[api_spec], json_logs);
    let web = Proxy::start(&cp, "node-web", &[WorkloadSpec::new("web", "shop", "web", WEB)]);
    let batch = Proxy::start(&cp, "node-batch", &[WorkloadSpec::new("batch", "jobs", "batch", BATCH)]);
    for p in [&server, &web, &batch] {
        p.wait_ready();
        p.wait_config("the server in the registry", |d| d["workloads"].to_string().contains(API));
    }
    cp.apply(POLICIES);
    wait_for("every proxy to ACK the policies", Duration::from_secs(30), || {
        let all = cp.proxy_status()["proxies"].as_array()?.clone();
        (all.len() == 3 && all.iter().all(|p| p["synced"] == true)).then_some(())
    });
    Mesh { cp, web, batch, server, _echo: echo, api }
}

#[test]
fn prometheus_scrapes_exactly_the_traffic_made() {
    let m = mesh();
    const ALLOWED: usize = 3;
    const DENIED: usize = 2;
    const BYTES: usize = 1500;
    let payload = vec![b'x'; BYTES];
    for _ in 0..ALLOWED {
        assert_eq!(socks::echo_round_trip(socks::connect_ok(m.web.socks5_addr, m.api), &payload), payload);
    }
    for _ in 0..DENIED {
        let refused = socks::connect(m.batch.socks5_addr, m.api).map(|_| ());
        assert_eq!(refused, Err(Outcome::Refused(Refusal::Socks5(2))), "batch must be refused as not allowed");
    }

    let prometheus = Prometheus::start(&[
        ("control", m.cp.metrics_addr),
        ("server", m.server.metrics_addr),
        ("web", m.web.metrics_addr),
        ("batch", m.batch.metrics_addr),
    ]);
    prometheus.wait_targets_up(4);

    let at_api = r#"reporter="destination",destination_workload="api",destination_workload_namespace="shop",destination_principal="cluster.local/ns/shop/sa/api",connection_security_policy="mutual_tls""#;
    let from_web = r#"source_workload="web",source_workload_namespace="shop",source_principal="cluster.local/ns/shop/sa/web",response_flags="-""#;
    let from_batch =
        r#"source_workload="batch",source_principal="cluster.local/ns/jobs/sa/batch",response_flags="DENY""#;
    let sum = |metric: &str, labels: &[&str]| format!("sum({metric}{{{}}})", labels.join(","));

    // The destination proxy: three connections from web with their bytes, two denied from batch.
    prometheus.wait_value(&sum("istio_tcp_connections_opened_total", &[at_api, from_web]), ALLOWED as f64);
    prometheus.wait_value(&sum("istio_tcp_connections_closed_total", &[at_api, from_web]), ALLOWED as f64);
    prometheus.wait_value(&sum("istio_tcp_received_bytes_total", &[at_api, from_web]), (ALLOWED * BYTES) as f64);
    prometheus.wait_value(&sum("istio_tcp_sent_bytes_total", &[at_api, from_web]), (ALLOWED * BYTES) as f64);
    prometheus.wait_value(&sum("istio_tcp_connections_opened_total", &[at_api, from_batch]), DENIED as f64);
    prometheus.wait_value(&sum("istio_tcp_received_bytes_total", &[at_api, from_batch]), 0.0);

    // The source proxies report the same connections from their side.
    let web_side = r#"reporter="source",source_workload="web",destination_workload="api",response_flags="-",job="web""#;
    prometheus.wait_value(&sum("istio_tcp_connections_opened_total", &[web_side]), ALLOWED as f64);
    prometheus.wait_value(&sum("istio_tcp_received_bytes_total", &[web_side]), (ALLOWED * BYTES) as f64);
    let batch_side = r#"reporter="source",source_workload="batch",destination_workload="api",response_flags="DENY""#;
    prometheus.wait_value(&sum("istio_tcp_connections_opened_total", &[batch_side]), DENIED as f64);

    // Decisions by deciding policy.
    let decisions = |labels: &str| format!("sum(trellis_authz_decisions_total{{{labels}}})");
    prometheus.wait_value(&decisions(r#"policy="shop/api-allow-web",action="ALLOW",result="allowed""#), ALLOWED as f64);
    prometheus.wait_value(&decisions(r#"policy="shop/deny-batch",action="DENY",result="denied""#), DENIED as f64);

    // Health of identities and config, and the control plane's view.
    prometheus.wait_value("count(trellis_certificate_expiry_timestamp_seconds > time())", 3.0);
    prometheus.wait_value(r#"sum(trellis_certificate_rotations_total{result="ok"})"#, 3.0);
    prometheus.wait_value("count(trellis_trust_bundle_roots == 1)", 3.0);
    prometheus.wait_value("sum(trellis_control_plane_connected)", 3.0);
    prometheus.wait_value("sum(trellis_open_connections)", 0.0);
    prometheus.wait_value(
        r#"count(trellis_config_version{job!="control"} == scalar(trellis_config_version{job="control"}))"#,
        3.0,
    );
    prometheus.wait_value("trellis_connected_proxies", 3.0);
    // At least the policy push to each proxy (registrations of later proxies are pushed to earlier ones too).
    prometheus.wait_value("trellis_config_convergence_seconds_count >= bool 3", 1.0);
    prometheus.wait_value(r#"trellis_store_resources{kind="AuthorizationPolicy"}"#, 2.0);
    prometheus.wait_value(r#"sum(trellis_join_attempts_total{result="ok"})"#, 3.0);
    prometheus.wait_value(r#"count(process_resident_memory_bytes{job!="control"} > 1e6)"#, 3.0);

    // Every query of the shipped Grafana dashboard is valid PromQL for this Prometheus.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/grafana/trellis.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 10);
    for expr in exprs {
        prometheus.query(&expr.replace("$__rate_interval", "1m"));
    }

    // proxy-status carries the same convergence measurements.
    let status = m.cp.proxy_status();
    for proxy in status["proxies"].as_array().unwrap() {
        assert!(proxy["lastConvergenceSeconds"].as_f64().is_some_and(|s| s > 0.0), "{proxy}");
    }

    // The denial is in the destination's access log, with the deciding policy.
    let log = trellis_tests::read_log(&m.server.log_path());
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "access")
        .collect();
    let denied: Vec<_> = access.iter().filter(|e| e["fields"]["decision"] == "denied").collect();
    assert_eq!(denied.len(), DENIED, "{log}");
    for e in &denied {
        let f = &e["fields"];
        assert_eq!(f["policy"], "shop/deny-batch", "{e}");
        assert_eq!(f["source_principal"], "cluster.local/ns/jobs/sa/batch", "{e}");
        assert_eq!(f["response_flags"], "DENY", "{e}");
        assert_eq!(f["source_workload"], "batch", "{e}");
        // SOCKS5 clients connect from 127.0.0.1; the address is the client's as the source proxy reported it.
        assert!(f["source_address"].as_str().unwrap().parse::<SocketAddr>().is_ok(), "{e}");
    }
    let allowed: Vec<_> = access.iter().filter(|e| e["fields"]["decision"] == "allowed").collect();
    assert_eq!(allowed.len(), ALLOWED, "{log}");
    for e in &allowed {
        let f = &e["fields"];
        assert_eq!((f["bytes_received"].as_u64(), f["bytes_sent"].as_u64()), (Some(1500), Some(1500)), "{e}");
        assert_eq!(f["policy"], "shop/api-allow-web", "{e}");
        assert_eq!(f["destination_address"], m.api.to_string(), "{e}");
    }
}

#[test]
fn promtool_finds_no_problem_in_any_metrics_output() {
    let m = mesh();
    let payload = b"lint me";
    assert_eq!(socks::echo_round_trip(socks::connect_ok(m.web.socks5_addr, m.api), payload), payload);
    let refused = socks::connect(m.batch.socks5_addr, m.api).map(|_| ());
    assert_eq!(refused, Err(Outcome::Refused(Refusal::Socks5(2))), "batch must be refused as not allowed");
    for (what, addr) in
        [("control plane", m.cp.metrics_addr), ("server", m.server.metrics_addr), ("web", m.web.metrics_addr)]
    {
        let body = wait_for(&format!("{what} metrics with traffic"), Duration::from_secs(10), || {
            let (status, body) = http::get(addr, "/metrics").ok()?;
            (status == 200 && (what == "control plane" || body.contains("istio_tcp_connections_closed_total{")))
                .then_some(body)
        });
        promtool_check(what, &body);
    }
}

/// `promtool check metrics` on a `/metrics` body: no problem other than its base-unit lint on Istio's own
/// `istio_request_duration_milliseconds` (kept for dashboard compatibility).
fn promtool_check(what: &str, body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool: install Debian's `prometheus` package (.ci/run does)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let problems: Vec<&str> =
        report.lines().filter(|l| !l.trim().is_empty() && !l.contains("istio_request_duration_milliseconds")).collect();
    assert!(problems.is_empty(), "promtool on {what}'s /metrics:\n{report}\n---\n{body}");
}

#[test]
fn admin_endpoints_show_certificates_never_keys_and_change_the_log_level() {
    let m = mesh();
    let dump = http::get(m.web.admin_addr, "/config_dump").unwrap().1;
    let certs = http::get(m.web.admin_addr, "/certs").unwrap().1;
    let node_key = std::fs::read_dir(m.web.state_dir())
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .find(|text| text.contains("PRIVATE KEY"))
        .expect("the node key is in the state dir");
    let key_body: String = node_key.lines().filter(|l| !l.starts_with("-----")).collect();
    for (what, text) in [("config_dump", &dump), ("certs", &certs)] {
        assert!(!text.contains("PRIVATE KEY"), "{what}: {text}");
        assert!(!text.contains(&key_body[..40]), "{what} contains key bytes");
    }
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let kinds: Vec<&str> = dump["resources"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["AuthorizationPolicy", "AuthorizationPolicy"]);
    assert_eq!(dump["resources"][1]["resource"]["spec"]["action"], "DENY", "{dump}");
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let workload = &certs["workload_certificates"][0];
    assert_eq!(workload["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/web");
    assert!(workload["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(workload["seconds_until_expiry"].as_i64().is_some_and(|s| s > 0));
    assert_eq!(workload["chain"][0]["uri_sans"][0], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(certs["trust_bundle"].as_array().unwrap().len(), 1);

    // The log level changes at run time; a bad one is refused and changes nothing.
    assert_eq!(http::get(m.web.admin_addr, "/logging").unwrap(), (200, "level: info\n".to_owned()));
    assert_eq!(http::post(m.web.admin_addr, "/logging?level=debug").unwrap().0, 200);
    assert_eq!(http::get(m.web.admin_addr, "/logging").unwrap(), (200, "level: debug\n".to_owned()));
    assert_eq!(http::post(m.web.admin_addr, "/logging?level=info%2Caccess%3Doff").unwrap().0, 200);
    let (status, body) = http::post(m.web.admin_addr, "/logging?level=not%20a%20level%3D%3D").unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(http::get(m.web.admin_addr, "/logging").unwrap().1, "level: info,access=off\n");
    assert_eq!(
        http::get(m.web.admin_addr, "/logging?level=debug").unwrap().1,
        "level: info,access=off\n",
        "GET changes nothing"
    );
    // The metrics port serves metrics only; the admin endpoints are not there.
    assert_eq!(http::get(m.web.metrics_addr, "/config_dump").unwrap().0, 404);
}

/// Requests on a port declared `http` are counted in Istio's request series (code, flags, duration histogram)
/// and logged one by one; the tunnel that carries them is counted as a TCP connection with its bytes.
#[test]
fn http_requests_are_counted_and_logged_per_request() {
    use trellis_tests::HttpEcho;
    use trellis_tests::http::Conn;
    const CLIENT: &str = "127.0.10.51";
    const SITE: &str = "127.0.10.52";
    let cp = ControlPlane::start(&[]);
    let _echo = HttpEcho::start(format!("{SITE}:0").parse().unwrap());
    let (site, port) = (_echo.addr, _echo.addr.port());
    let mut site_spec = WorkloadSpec::new("site", "shop", "site", SITE);
    site_spec.ports = vec![(port, "http")];
    let json_logs = ProxyOptions {
        extra: serde_json::json!({"logFormat": "json"}).as_object().unwrap().clone(),
        ..Default::default()
    };
    let server = Proxy::start_with(&cp, "node-site", &[site_spec], json_logs);
    let client = Proxy::start(&cp, "node-client", &[WorkloadSpec::new("web", "shop", "web", CLIENT)]);
    for p in [&server, &client] {
        p.wait_ready();
        p.wait_config("the site in the registry", |d| d["workloads"].to_string().contains(SITE));
    }
    cp.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"#,
    );
    server.wait_config("the policy", |d| d["resources"].to_string().contains("no-admin"));

    let mut conn = Conn::new(socks::connect_ok(client.socks5_addr, site));
    for target in ["/", "/a", "/admin", "/b?x=secret", "/admin"] {
        let expected = if target == "/admin" { 403 } else { 200 };
        assert_eq!(conn.request("GET", target, "site.shop", &[]).status, expected, "{target}");
    }
    drop(conn);

    let series = |body: &str, name: &str, labels: &[&str]| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|label| l.contains(label)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let common = r#"reporter="destination""#;
    let from_web = r#"source_workload="web""#;
    wait_for("the tunnel's close in /metrics", Duration::from_secs(10), || {
        let (_, body) = http::get(server.metrics_addr, "/metrics").ok()?;
        (series(&body, "istio_tcp_connections_closed_total", &[common, from_web, r#"destination_workload="site""#])
            == 1.0)
            .then_some(())
    });
    // A render is not a snapshot: one that saw the close may have read the byte counters just before it.
    let body = http::get(server.metrics_addr, "/metrics").unwrap().1;
    let ok = [common, from_web, r#"response_code="200""#, r#"response_flags="-""#, r#"request_protocol="http""#];
    assert_eq!(series(&body, "istio_requests_total", &ok), 3.0, "{body}");
    let denied = [common, from_web, r#"response_code="403""#, r#"response_flags="DENY""#];
    assert_eq!(series(&body, "istio_requests_total", &denied), 2.0, "{body}");
    assert_eq!(series(&body, "istio_request_duration_milliseconds_count", &[common, from_web]), 5.0, "{body}");
    assert!(body.contains(r#"istio_request_duration_milliseconds_bucket{"#) && body.contains(r#"le="0.5""#), "{body}");
    assert!(series(&body, "istio_tcp_received_bytes_total", &[common, from_web]) > 0.0, "{body}");
    assert!(!body.contains("secret"), "no client-controlled string in labels");
    promtool_check("the HTTP server proxy", &body);

    // Request and response sizes, through a real Prometheus: histograms with Istio's buckets and exactly the
    // labels of istio_requests_total. A request's size is its head (method, path, header names and values) plus
    // its body; a response's is its status, header names and values, and body.
    let prometheus = Prometheus::start(&[("server", server.metrics_addr)]);
    prometheus.wait_targets_up(1);
    let at = r#"reporter="destination",source_workload="web",destination_workload="site""#;
    for name in ["istio_request_bytes", "istio_response_bytes"] {
        prometheus.wait_value(&format!("sum({name}_count{{{at}}})"), 5.0);
        let labels = |expr: &str| -> Vec<serde_json::Value> {
            let json = prometheus.query(expr);
            let mut found: Vec<serde_json::Value> = (json["data"]["result"].as_array().unwrap().iter())
                .map(|r| {
                    let mut m = r["metric"].clone();
                    m.as_object_mut().unwrap().remove("__name__");
                    m
                })
                .collect();
            found.sort_by_key(|m| m.to_string());
            found
        };
        assert_eq!(
            labels(&format!("{name}_count{{{at}}}")),
            labels(&format!("istio_requests_total{{{at}}}")),
            "{name}"
        );
        let buckets = prometheus.query(&format!("{name}_bucket{{{at},response_code=\"200\"}}"));
        let les: Vec<&str> = (buckets["data"]["result"].as_array().unwrap().iter())
            .map(|r| r["metric"]["le"].as_str().unwrap())
            .collect();
        let istio = [
            "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000", "30000", "60000",
            "300000", "600000", "1800000", "3600000", "+Inf",
        ];
        let mut sorted = les.clone();
        sorted.sort_by(|a, b| a.parse::<f64>().unwrap().total_cmp(&b.parse::<f64>().unwrap()));
        assert_eq!(sorted, istio, "{name}: Istio's buckets");
    }
    // The two denials: `GET /admin` with `Host: site.shop` (3 + 6 + 4 + 9 bytes), answered 403 with
    // `content-type: text/plain` and "RBAC: access denied" (3 + 12 + 10 + 19 bytes).
    let denied_at = format!("{at},response_code=\"403\"");
    prometheus.wait_value(&format!("sum(istio_request_bytes_sum{{{denied_at}}})"), 2.0 * 22.0);
    prometheus.wait_value(&format!("sum(istio_response_bytes_sum{{{denied_at}}})"), 2.0 * 44.0);
    // The allowed ones: the echo's JSON bodies, which are bigger than the denials' text.
    let ok_at = format!("{at},response_code=\"200\"");
    let allowed = prometheus.query_value(&format!("sum(istio_response_bytes_sum{{{ok_at}}})")).unwrap();
    println!("response bytes of the three allowed requests: {allowed}");
    assert!(allowed > 3.0 * 100.0, "{allowed}");

    let log = trellis_tests::read_log(&server.log_path());
    let requests: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "access" && e["fields"]["message"] == "request")
        .map(|e| e["fields"].clone())
        .collect();
    let summary: Vec<(String, u64, String)> = requests
        .iter()
        .map(|f| {
            (f["path"].as_str().unwrap().to_owned(), f["response_code"].as_u64().unwrap(), f["policy"].to_string())
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("/".to_owned(), 200, "\"-\"".to_owned()),
            ("/a".to_owned(), 200, "\"-\"".to_owned()),
            ("/admin".to_owned(), 403, "\"shop/no-admin\"".to_owned()),
            ("/b".to_owned(), 200, "\"-\"".to_owned()),
            ("/admin".to_owned(), 403, "\"shop/no-admin\"".to_owned()),
        ],
        "{log}"
    );
    assert!(requests.iter().all(|f| f["source_principal"] == "cluster.local/ns/shop/sa/web"));
}
