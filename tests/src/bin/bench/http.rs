//! `trellis-bench http [--quick] [--no-build]`: HTTP/1.1 keep-alive requests to a tiny in-process server, (A)
//! directly, (B) through two proxies with the server's port declared `http` (every request parsed, authorized and
//! forwarded over a pooled connection), and (C) the same with a RequestAuthentication (an ES256 token verified on
//! every request) and an ALLOW policy on `requestPrincipals`. A, B and C alternate, round after round. Writes the
//! section between `<!-- http:begin -->` and `<!-- http:end -->` of BENCHMARKS.md (not with `--quick`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::net::TcpListener;
use trellis_tests::{ControlPlane, Proxy, ProxyOptions, WorkloadSpec};

use super::report::{cell, command_output, machine, median, number, revision, wrap, write_section};
use super::tunnel::{Route, percentile};
use crate::common::{self, step};

const CLIENT_IP: [u8; 4] = [127, 0, 21, 1];
const PLAIN_IP: [u8; 4] = [127, 0, 21, 2];
const JWT_IP: [u8; 4] = [127, 0, 21, 3];
const ISSUER: &str = "https://bench.example";
const COMMAND: &str = "cargo run --release -p trellis-tests --bin trellis-bench -- http";

struct Plan {
    rounds: usize,
    requests: usize,
    rate_for: Duration,
    concurrency: usize,
}

const FULL: Plan = Plan { rounds: 5, requests: 5_000, rate_for: Duration::from_secs(2), concurrency: 8 };
const QUICK: Plan = Plan { rounds: 2, requests: 300, rate_for: Duration::from_millis(300), concurrency: 8 };

/// The three ways of reaching the server.
#[derive(Clone, Copy)]
struct Target {
    label: &'static str,
    route: Route,
    server: SocketAddr,
}

/// `trellis-bench http ARGS`.
pub fn main(argv: &[String]) -> std::process::ExitCode {
    let (mut quick, mut no_build) = (false, false);
    for arg in argv {
        match arg.as_str() {
            "--quick" => quick = true,
            "--no-build" => no_build = true,
            other => {
                eprintln!(
                    "trellis-bench http: unknown argument {other:?}\nusage: trellis-bench http [--quick] [--no-build]"
                );
                return std::process::ExitCode::from(2);
            }
        }
    }
    match run(quick, no_build) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ntrellis-bench: FAILED: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn run(quick: bool, no_build: bool) -> anyhow::Result<()> {
    let plan = if quick { &QUICK } else { &FULL };
    common::prepare(no_build, |line| eprintln!("{line}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (plain, jwt) = runtime.block_on(async { anyhow::Ok((server(PLAIN_IP).await?, server(JWT_IP).await?)) })?;
    eprintln!("HTTP servers on {plain} and {jwt} (in this process)");
    let (jwks, token) = signing_key()?;

    let cp = step("starting the control plane", &[], || Ok(ControlPlane::start(&[])))?;
    let options = ProxyOptions { passthrough: Some("deny"), ..ProxyOptions::default() };
    let client_spec = WorkloadSpec::new("client", "bench", "client", &IpAddr::from(CLIENT_IP).to_string());
    let mut plain_spec = WorkloadSpec::new("plain", "bench-plain", "plain", &plain.ip().to_string());
    plain_spec.ports = vec![(plain.port(), "http")];
    let mut jwt_spec = WorkloadSpec::new("jwt", "bench-jwt", "jwt", &jwt.ip().to_string());
    jwt_spec.ports = vec![(jwt.port(), "http")];
    let client = step("starting the client proxy", &[], || {
        Ok(Proxy::start_with(&cp, "bench-client", &[client_spec], options.clone()))
    })?;
    let server_proxy = step("starting the server proxy", &[], || {
        Ok(Proxy::start_with(&cp, "bench-server", &[plain_spec, jwt_spec], options.clone()))
    })?;
    let logs = [("client proxy", client.log_path()), ("server proxy", server_proxy.log_path())];
    step("applying the JWT rule and waiting for the proxies", &logs, || {
        client.wait_ready();
        server_proxy.wait_ready();
        cp.apply(&format!(
            r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: bench-jwt}}
spec:
  jwtRules: [{{issuer: "{ISSUER}", jwks: '{jwks}'}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: bench-jwt}}
spec:
  rules: [{{from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]}}]
"#
        ));
        trellis_tests::wait_for("both proxies synced", Duration::from_secs(30), || {
            let status = cp.proxy_status();
            let all = status["proxies"].as_array()?;
            (all.len() == 2 && all.iter().all(|p| p["synced"] == true)).then_some(())
        });
        client.wait_config("the servers in the client proxy's registry", |d| {
            d["workloads"].to_string().contains(&jwt.ip().to_string())
        });
        Ok(())
    })?;
    let mesh = Route::Mesh(client.socks5_addr);
    let targets = [
        Target { label: "direct", route: Route::Direct, server: plain },
        Target { label: "mesh", route: mesh, server: plain },
        Target { label: "mesh + JWT", route: mesh, server: jwt },
    ];
    step("a first request on every route, and a refused one without the token", &logs, || {
        runtime.block_on(async {
            for t in targets {
                let mut conn = Client::connect(t, &token).await?;
                conn.get().await?;
            }
            let mut anonymous = Client::connect(targets[2], "").await?;
            if anonymous.get().await.is_ok() {
                bail!("a request without a token was allowed on the JWT route");
            }
            anyhow::Ok(())
        })
    })?;

    let metrics = runtime.block_on(measure(plan, &targets, &token))?;
    let section = render(plan, quick, &metrics);
    println!("{section}");
    if quick {
        eprintln!("(--quick: BENCHMARKS.md left as it is)");
    } else {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
        write_section(&path, "http", &section)?;
        eprintln!("wrote the http section of {}", path.display());
    }
    drop((client, server_proxy, cp));
    Ok(())
}

/// An ES256 key generated for this run: (JWKS text, a token valid for an hour).
fn signing_key() -> anyhow::Result<(String, String)> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
    let key = EncodingKey::from_ec_der(pkcs8.as_ref());
    let mut jwk = serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256)?)?;
    jwk["kid"] = "bench".into();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({"iss": ISSUER, "sub": "bench", "exp": now + 3600, "scope": "read write"});
    let header = Header { kid: Some("bench".into()), ..Header::new(Algorithm::ES256) };
    let token = jsonwebtoken::encode(&header, &claims, &key)?;
    Ok((serde_json::json!({"keys": [jwk]}).to_string(), token))
}

/// A minimal HTTP/1.1 server answering every request with 200 and a 2-byte body.
async fn server(ip: [u8; 4]) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((IpAddr::from(ip), 0)).await.context("binding an HTTP server")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(addr)
}

/// One keep-alive HTTP/1.1 connection sending `GET /` with the token.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    authorization: String,
    host: String,
}

impl Client {
    async fn connect(target: Target, token: &str) -> anyhow::Result<Client> {
        let stream = target.route.dial(target.server).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Client { sender, authorization: format!("Bearer {token}"), host: target.server.to_string() })
    }

    async fn get(&mut self) -> anyhow::Result<()> {
        let request = hyper::Request::get("/api/items")
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::AUTHORIZATION, &self.authorization)
            .body(Empty::new())?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        if !status.is_success() {
            bail!("HTTP {status}");
        }
        Ok(())
    }
}

struct Metric {
    name: String,
    unit: &'static str,
    higher_is_better: bool,
    /// One list of per-round values per target.
    values: [Vec<f64>; 3],
}

async fn latencies(target: Target, token: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut client = Client::connect(target, token).await?;
    for _ in 0..100 {
        client.get().await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        client.get().await?;
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(samples)
}

async fn rate(target: Target, token: &str, concurrency: usize, period: Duration) -> anyhow::Result<f64> {
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let mut client = Client::connect(target, token).await?;
        client.get().await?;
        clients.push(client);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while started.elapsed() < period {
                    client.get().await?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn measure(plan: &Plan, targets: &[Target; 3], token: &str) -> anyhow::Result<Vec<Metric>> {
    let mut metrics: Vec<Metric> = Vec::new();
    let mut record = |index: usize, name: String, unit, higher_is_better, target: usize, value: f64| {
        if metrics.len() <= index {
            metrics.push(Metric { name, unit, higher_is_better, values: Default::default() });
        }
        metrics[index].values[target].push(value);
    };
    let timeout = Duration::from_secs(300);
    for round in 1..=plan.rounds {
        eprintln!("round {round}/{}", plan.rounds);
        for (i, &t) in targets.iter().enumerate() {
            let samples = tokio::time::timeout(timeout, latencies(t, token, plan.requests))
                .await
                .context("latency: timed out")?
                .with_context(|| format!("latency ({})", t.label))?;
            let ps = [50.0, 90.0, 99.0].map(|p| percentile(&samples, p));
            eprintln!("  request latency   {:10} p50 {:.1} µs, p99 {:.1} µs", t.label, ps[0], ps[2]);
            for (j, (p, value)) in ["p50", "p90", "p99"].into_iter().zip(ps).enumerate() {
                record(j, format!("request latency {p}, one keep-alive connection"), "µs", false, i, value);
            }
        }
        for (i, &t) in targets.iter().enumerate() {
            let c = plan.concurrency;
            let r = tokio::time::timeout(timeout, rate(t, token, c, plan.rate_for))
                .await
                .context("rate: timed out")?
                .with_context(|| format!("rate ({})", t.label))?;
            eprintln!("  requests/s        {:10} {r:>9.0}", t.label);
            let name = format!("requests/s, {c} keep-alive connections for {:?}", plan.rate_for);
            record(3, name, "req/s", true, i, r);
        }
    }
    Ok(metrics)
}

fn render(plan: &Plan, quick: bool, metrics: &[Metric]) -> String {
    let date = command_output("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default();
    let profile = if cfg!(debug_assertions) { "debug build (numbers not representative)" } else { "release build" };
    let flags = if quick { " --quick" } else { "" };
    let mut s = "## HTTP requests: direct vs. two Trellis proxies, with and without a JWT rule\n\n".to_owned();
    s.push_str(&wrap(&format!("`{COMMAND}{flags}` — {date}, {}, {profile}.", revision())));
    s.push_str(&wrap(&format!(
        "Machine: {}. Shared with other builds and benchmarks while this ran: treat the numbers as indicative.",
        machine()
    )));
    s.push_str(&wrap(&format!(
        "A minimal HTTP/1.1 server (hyper, 2-byte body) runs in the benchmark process. **direct**: keep-alive \
         HTTP/1.1 straight to it. **mesh**: SOCKS5 to the client proxy, HBONE (mTLS, HTTP/2 CONNECT) to the server \
         proxy, whose workload port is declared `http`: each request is parsed, its path normalized, authorized and \
         forwarded over a pooled connection. **mesh + JWT**: the same to a workload with a RequestAuthentication and \
         an ALLOW policy on `requestPrincipals`, so every request's ES256 token is verified. Every request carries \
         the same `Authorization: Bearer` header. The three alternate, {rounds} rounds; a cell is the median over \
         the rounds with (min..max).",
        rounds = plan.rounds,
    )));
    s.push_str("| measurement | direct | mesh | mesh + JWT | mesh vs. direct | mesh + JWT vs. direct |\n");
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    for m in metrics {
        let versus = |i: usize| {
            let (base, value) = (median(&m.values[0]), median(&m.values[i]));
            if m.higher_is_better {
                format!("{:.2}×", value / base)
            } else {
                let added = value - base;
                format!("{}{} {}", if added >= 0.0 { "+" } else { "" }, number(added), m.unit)
            }
        };
        s.push_str(&format!(
            "| {} ({}) | {} | {} | {} | {} | {} |\n",
            m.name,
            m.unit,
            cell(&m.values[0]),
            cell(&m.values[1]),
            cell(&m.values[2]),
            versus(1),
            versus(2)
        ));
    }
    s.push('\n');
    s.push_str(&wrap(&format!(
        "Latency: {n} sequential requests per round on one connection, after 100 unrecorded; \"+\" is what the \
         mesh adds over direct. Requests/s: each connection sends its next request when the previous answer is read.",
        n = number(plan.requests as f64),
    )));
    s
}
