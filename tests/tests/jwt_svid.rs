//! JWT-SVIDs (issue 17) with real processes: the control plane signs them with the mesh JWT key, the proxy hands
//! them out on the Workload API to attested callers, and its JWKS travels in the trust bundle. Clients no one here
//! wrote fetch and check them: py-spiffe and the Rust `spiffe` crate (FetchJWTSVID, FetchJWTBundles,
//! ValidateJWTSVID) and PyJWT (the signature against the fetched bundle). Then a service calls another through the
//! mesh with one: a RequestAuthentication of the mesh issuer (no jwks, no jwksUri) and an AuthorizationPolicy on
//! requestPrincipals.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use trellis_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use trellis_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest};
use trellis_tests::http::{Conn, Response};
use trellis_tests::prometheus::sum_samples;
use trellis_tests::{
    ControlPlane, HttpEcho, Proxy, ProxyOptions, WorkloadSpec, bin, ok_json, python_exe, read_log, socks, wait_for,
};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BATCH: &str = "spiffe://cluster.local/ns/shop/sa/batch";
const WEB_IP: &str = "127.0.14.1";
const BATCH_IP: &str = "127.0.14.3";
const API_IP: &str = "127.0.14.2";
const REPORTS: &str = "spiffe://cluster.local/ns/shop/sa/reports";
const REPORTS_IP: &str = "127.0.14.4";
const HOST: &str = "api.shop";

/// Node A fronts `web` (handed to the Python interpreter, so py-spiffe gets it) and `batch` (handed to this test
/// binary); node B fronts `api`, an HTTP echo.
struct Mesh {
    cp: ControlPlane,
    client: Proxy,
    server: Proxy,
    echo: HttpEcho,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

fn mesh() -> Mesh {
    let cp = ControlPlane::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let echo = HttpEcho::start(format!("{API_IP}:0").parse().unwrap());
    let mut api = WorkloadSpec::new("api", "shop", "api", API_IP);
    api.ports = vec![(echo.addr.port(), "http")];
    let server = Proxy::start(&cp, "node-b", &[api]);
    let mut web = WorkloadSpec::new("web", "shop", "web", WEB_IP);
    web.attest = vec![json!({"path": python_exe()})];
    let mut batch = WorkloadSpec::new("batch", "shop", "batch", BATCH_IP);
    let test_exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    batch.attest = vec![json!({"uid": 0}), json!({"path": test_exe})];
    // `reports`: the Rust `spiffe` crate's client binary.
    let mut reports = WorkloadSpec::new("reports", "shop", "reports", REPORTS_IP);
    reports.attest = vec![json!({"path": bin("trellis-spiffe-client").canonicalize().unwrap()})];
    let options = ProxyOptions {
        socks5_workload: Some("web".into()),
        workload_api: Some(socket.clone()),
        ..ProxyOptions::default()
    };
    let client = Proxy::start_with(&cp, "node-a", &[web, batch, reports], options);
    for p in [&server, &client] {
        p.wait_ready();
    }
    client.wait_config("the server in the registry", |d| d["workloads"].to_string().contains(API_IP));
    wait_for("the Workload API socket", Duration::from_secs(30), || socket.exists().then_some(()));
    Mesh { cp, client, server, echo, socket, dir }
}

impl Mesh {
    fn py_client(&self, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("py_spiffe_client.py");
        let endpoint = format!("unix://{}", self.socket.display());
        Command::new("python3").arg(script).args(args).env("SPIFFE_ENDPOINT_SOCKET", endpoint).output().unwrap()
    }

    /// `trellis-spiffe-client ARGS` (the Rust `spiffe` crate; attested as `reports` by its path).
    fn rust_client(&self, args: &[&str]) -> Output {
        let endpoint = format!("unix://{}", self.socket.display());
        Command::new(bin("trellis-spiffe-client")).args(args).env("SPIFFE_ENDPOINT_SOCKET", endpoint).output().unwrap()
    }

    fn wait_synced(&self) {
        wait_for("both proxies to ACK the latest version", Duration::from_secs(20), || {
            let status = self.cp.proxy_status();
            let all = status["proxies"].as_array()?;
            (all.len() == 2 && all.iter().all(|p| p["synced"] == true)).then_some(())
        });
    }

    fn metrics(&self) -> String {
        trellis_tests::http::get(self.client.metrics_addr, "/metrics").unwrap().1
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn grpc_client(socket: &Path) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let path = socket.to_owned();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
    });
    let channel =
        tonic::transport::Endpoint::from_static("http://localhost").connect_with_connector(connector).await.unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
    request
}

/// FetchJWTSVID from this test binary (attested as `batch`).
fn fetch_jwt(m: &Mesh, spiffe_id: &str, audience: &[&str]) -> Result<String, tonic::Status> {
    rt().block_on(async {
        let mut client = grpc_client(&m.socket).await;
        let request =
            JwtsvidRequest { audience: audience.iter().map(|a| a.to_string()).collect(), spiffe_id: spiffe_id.into() };
        let answer = client.fetch_jwtsvid(with_header(request)).await?.into_inner();
        assert_eq!(answer.svids.len(), 1, "{answer:?}");
        Ok(answer.svids[0].svid.clone())
    })
}

/// PyJWT verifies `token` with the key of its `kid` from the JWT bundle a client fetched (py-spiffe: PEM per kid;
/// the `spiffe` crate: the JWK per kid), for `audience`: prints the claims, or exits 3 with the error.
fn pyjwt_verify(bundle: &Path, token: &str, audience: &str) -> Output {
    let script = r#"
import json, sys, jwt
bundle, token, audience = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
kid = jwt.get_unverified_header(token)["kid"]
entry = next(k for k in bundle["keys"] if k["kid"] == kid)
key = entry["pem"] if "pem" in entry else jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(entry["jwk"]))
try:
    print(json.dumps(jwt.decode(token, key, algorithms=["ES256"], audience=audience)))
except jwt.PyJWTError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
"#;
    Command::new("python3").args(["-c", script]).arg(bundle).args([token, audience]).output().unwrap()
}

#[test]
fn jwt_svids_from_py_spiffe_verify_with_pyjwt_and_validate_jwtsvid() {
    let m = mesh();
    let out_dir = m.dir.path().join("py");
    std::fs::create_dir_all(&out_dir).unwrap();

    // py-spiffe: FetchJWTSVID (its own identity, audience "api") and FetchJWTBundles.
    let got = ok_json(m.py_client(&["jwt", "api", out_dir.to_str().unwrap()]), "py-spiffe jwt");
    assert_eq!(got["spiffe_id"], WEB);
    let token = got["token"].as_str().unwrap().to_owned();
    let bundle = out_dir.join("jwt_bundle.json");
    let fetched: Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    assert_eq!(fetched["trust_domain"], "cluster.local");

    // PyJWT: the signature verifies against the fetched bundle; the claims are the JWT-SVID's.
    let claims = ok_json(pyjwt_verify(&bundle, &token, "api"), "PyJWT");
    assert_eq!((claims["sub"].as_str(), claims["iss"].as_str()), (Some(WEB), Some("spiffe://cluster.local")));
    assert_eq!(claims["aud"], json!(["api"]));
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 300, "the default JWT-SVID lifetime is 5 minutes");
    // PyJWT, wrong audience: refused by PyJWT as well (control for the check above).
    let out = pyjwt_verify(&bundle, &token, "other");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidAudienceError"));

    // ValidateJWTSVID: the right audience is accepted; a wrong one refused with its reason, and the proxy logs why.
    let valid = ok_json(m.py_client(&["validate", &token, "api"]), "validate");
    assert_eq!(valid["spiffe_id"], WEB);
    let out = m.py_client(&["validate", &token, "other"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(r#"INVALID_ARGUMENT: JWT-SVID refused: audience "other" is not in the token's aud claim"#),
        "{stderr}"
    );
    let log = read_log(&m.client.log_path());
    assert!(
        log.lines().any(|l| l.contains("Workload API request refused")
            && l.contains("method=\"ValidateJWTSVID\"")
            && l.contains("is not in the token's aud claim")),
        "the proxy logs the refusal's reason:\n{log}"
    );

    // The same through the raw gRPC API, with the claims: and a tampered signature is refused.
    rt().block_on(async {
        let mut client = grpc_client(&m.socket).await;
        let request = ValidateJwtsvidRequest { audience: "api".into(), svid: token.clone() };
        let answer = client.validate_jwtsvid(with_header(request)).await.unwrap().into_inner();
        assert_eq!(answer.spiffe_id, WEB);
        let claims = answer.claims.unwrap();
        assert!(claims.fields.contains_key("exp") && claims.fields.contains_key("aud"), "{claims:?}");
        let request = ValidateJwtsvidRequest { audience: "api".into(), svid: tamper(&token) };
        let status = client.validate_jwtsvid(with_header(request)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "JWT-SVID refused: the signature does not verify");
    });

    // FetchJWTSVID: this binary is attested as `batch` only. Its own identity: a token (control); web's: refused
    // by the proxy, which never asks the control plane; no audience: refused.
    let batch = fetch_jwt(&m, BATCH, &["api"]).expect("batch's own JWT-SVID");
    let denied = fetch_jwt(&m, WEB, &["api"]).unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(&format!("is not attested for {WEB}")), "{denied:?}");
    let no_audience = fetch_jwt(&m, BATCH, &[]).unwrap_err();
    assert_eq!(no_audience.code(), tonic::Code::InvalidArgument, "{no_audience:?}");
    assert!(no_audience.message().contains("audience is required"), "{no_audience:?}");
    let claims = ok_json(pyjwt_verify(&bundle, &batch, "api"), "PyJWT batch");
    assert_eq!(claims["sub"], BATCH);

    // Issuance is logged and counted at both ends.
    let log = read_log(&m.client.log_path());
    for id in [WEB, BATCH] {
        assert!(log.lines().any(|l| l.contains("Workload API: JWT-SVID sent") && l.contains(id)), "{id}: {log}");
        let issued =
            sum_samples(&m.metrics(), "trellis_workload_api_jwt_svids_issued_total", &[&format!("spiffe_id=\"{id}\"")]);
        assert!(issued >= 1.0, "{id}: {issued}");
    }
    let cp_log = read_log(&m.cp.log_path());
    assert!(cp_log.lines().any(|l| l.contains("JWT-SVID issued") && l.contains(WEB)), "{cp_log}");
    let cp_metrics = trellis_tests::http::get(m.cp.metrics_addr, "/metrics").unwrap().1;
    assert!(sum_samples(&cp_metrics, "trellis_jwt_svids_total", &["outcome=\"issued\""]) >= 2.0, "{cp_metrics}");
}

#[test]
fn jwt_svids_from_the_rust_spiffe_crate_verify_with_pyjwt_and_validate_jwtsvid() {
    let m = mesh();
    let out_dir = m.dir.path().join("rust");
    std::fs::create_dir_all(&out_dir).unwrap();

    // The `spiffe` crate: FetchJWTSVID (audience "api") and FetchJWTBundles, as the `reports` workload.
    let got = ok_json(m.rust_client(&["jwt", "api", out_dir.to_str().unwrap()]), "spiffe crate jwt");
    assert_eq!(got["spiffe_id"], REPORTS);
    let token = got["token"].as_str().unwrap().to_owned();
    let bundle = out_dir.join("jwt_bundle.json");

    // PyJWT verifies it against the JWKS the crate fetched; a wrong audience is refused (the control).
    let claims = ok_json(pyjwt_verify(&bundle, &token, "api"), "PyJWT");
    assert_eq!((claims["sub"].as_str(), claims["iss"].as_str()), (Some(REPORTS), Some("spiffe://cluster.local")));
    let out = pyjwt_verify(&bundle, &token, "other");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidAudienceError"));

    // ValidateJWTSVID through the crate: the right audience accepted, a wrong one and a tampered signature refused
    // by the proxy with their reasons.
    let valid = ok_json(m.rust_client(&["validate", &token, "api"]), "spiffe crate validate");
    assert_eq!(valid["spiffe_id"], REPORTS);
    for (svid, audience, reason) in [
        (token.clone(), "other", "is not in the token's aud claim"),
        (tamper(&token), "api", "the signature does not verify"),
    ] {
        let out = m.rust_client(&["validate", &svid, audience]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(reason), "{reason}: {stderr}");
        let log = read_log(&m.client.log_path());
        assert!(
            log.lines().any(|l| l.contains("Workload API request refused") && l.contains(reason)),
            "the proxy logs the refusal's reason ({reason}):\n{log}"
        );
    }
}

/// The token with one bit of its signature's first byte flipped.
fn tamper(token: &str) -> String {
    let (head, signature) = token.rsplit_once('.').unwrap();
    let mut bytes = signature.as_bytes().to_vec();
    // base64url: 'A' <-> 'B' changes the first decoded byte and keeps the text valid base64url.
    bytes[0] = if bytes[0] == b'A' { b'B' } else { b'A' };
    format!("{head}.{}", String::from_utf8(bytes).unwrap())
}

fn request(conn: &mut Conn, token: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    conn.request("GET", "/orders", HOST, &headers)
}

#[test]
fn a_service_calls_another_with_its_jwt_svid_through_the_mesh() {
    let m = mesh();
    // The mesh issuer needs no keys in the policy: proxies take them from the trust bundle.
    m.cp.apply(&format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: mesh-jwt, namespace: shop}}
spec:
  jwtRules:
  - issuer: spiffe://cluster.local
    audiences: [api]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-callers, namespace: shop}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{requestPrincipals: ["spiffe://cluster.local/{WEB}"]}}}}]
"#
    ));
    m.wait_synced();
    let out_dir = m.dir.path().join("svc");
    std::fs::create_dir_all(&out_dir).unwrap();
    let web = ok_json(m.py_client(&["jwt", "api", out_dir.to_str().unwrap()]), "web's JWT-SVID");
    let web_token = web["token"].as_str().unwrap().to_owned();
    let batch_token = fetch_jwt(&m, BATCH, &["api"]).unwrap();

    let mut c = Conn::new(socks::connect_ok(m.client.socks5_addr, m.echo.addr));
    let rejected = || read_log(&m.server.log_path()).lines().filter(|l| l.contains("JWT rejected")).count();
    let denied = || {
        let log = read_log(&m.server.log_path());
        let refusal = ["path=\"/orders\"", "response_code=403", "decision=\"denied\"", "response_flags=\"DENY\""];
        log.lines().filter(|l| refusal.iter().all(|part| l.contains(part))).count()
    };
    let (rejected_before, denied_before) = (rejected(), denied());

    // web's JWT-SVID: the principal the policy allows.
    let ok = request(&mut c, Some(&web_token));
    assert_eq!(ok.status, 200, "web's JWT-SVID: {ok:?}");
    // Tampered: 401 at B, which logs why.
    let r = request(&mut c, Some(&tamper(&web_token)));
    assert_eq!((r.status, r.body.as_str()), (401, "Jwt verification fails"), "{r:?}");
    wait_for("B to log the rejected token", Duration::from_secs(10), || {
        (rejected() == rejected_before + 1).then_some(())
    });
    let log = read_log(&m.server.log_path());
    let line = log.lines().rev().find(|l| l.contains("JWT rejected")).unwrap();
    assert!(line.contains("status=401") && line.contains("bad signature"), "{line}");
    println!("B's log of the tampered token: {line}");
    // A valid JWT-SVID of another principal: 403 at B, in its access log.
    let mut c = Conn::new(socks::connect_ok(m.client.socks5_addr, m.echo.addr));
    let r = request(&mut c, Some(&batch_token));
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"), "{r:?}");
    // No token at all: no request principal, denied as well.
    let r = request(&mut c, None);
    assert_eq!(r.status, 403, "{r:?}");
    wait_for("B's access log to show both denials", Duration::from_secs(10), || {
        (denied() == denied_before + 2).then_some(())
    });
    // Control, after the refusals: web's token still passes on the same path.
    assert_eq!(request(&mut c, Some(&web_token)).status, 200);
}
