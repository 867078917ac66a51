//! Authorization enforced by the destination proxy, with real processes: policies pushed through `trellisctl`,
//! connections made by applications through SOCKS5.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use trellis_tests::{ControlPlane, Echo, Proxy, WorkloadSpec, socks, wait_for};

const WEB: &str = "127.0.10.1";
const BATCH: &str = "127.0.10.5";
const API: &str = "127.0.10.2";
const DB: &str = "127.0.10.3";
/// SOCKS5 reply for a tunnel the destination proxy answered 403.
const NOT_ALLOWED: u8 = 2;

struct Mesh {
    cp: ControlPlane,
    web: Proxy,
    batch: Proxy,
    server: Proxy,
    _echoes: Vec<Echo>,
    api: SocketAddr,
    db: SocketAddr,
}

fn mesh() -> Mesh {
    let cp = ControlPlane::start(&[]);
    // Port 0: the echo reports the port the kernel gave it; the second echo takes the same port on its own address.
    let api_echo = Echo::start(format!("{API}:0").parse().unwrap());
    let (api, port) = (api_echo.addr, api_echo.addr.port());
    let db: SocketAddr = format!("{DB}:{port}").parse().unwrap();
    let echoes = vec![api_echo, Echo::start(db)];
    let mut api_spec = WorkloadSpec::new("api", "shop", "api", API);
    api_spec.ports = vec![(port, "tcp")];
    let mut db_spec = WorkloadSpec::new("db", "data", "db", DB);
    db_spec.ports = vec![(port, "tcp")];
    let server = Proxy::start(&cp, "node-server", &[api_spec, db_spec]);
    let web = Proxy::start(&cp, "node-web", &[WorkloadSpec::new("web", "shop", "web", WEB)]);
    let batch = Proxy::start(&cp, "node-batch", &[WorkloadSpec::new("batch", "jobs", "batch", BATCH)]);
    for p in [&server, &web, &batch] {
        p.wait_ready();
    }
    for p in [&web, &batch] {
        p.wait_config("the servers in the registry", |d| {
            let w = d["workloads"].to_string();
            w.contains(API) && w.contains(DB)
        });
    }
    Mesh { cp, web, batch, server, _echoes: echoes, api, db }
}

impl Mesh {
    /// Applies and waits until every proxy ACKed the new version.
    fn apply(&self, yaml: &str) {
        self.cp.apply(yaml);
        self.wait_synced();
    }

    fn delete(&self, kind: &str, name: &str, namespace: &str) {
        self.cp.ctl_ok(&["delete", kind, name, "-n", namespace]);
        self.wait_synced();
    }

    fn wait_synced(&self) {
        wait_for("every proxy to ACK the latest version", Duration::from_secs(20), || {
            let status = self.cp.proxy_status();
            let all = status["proxies"].as_array()?;
            (all.len() == 3 && all.iter().all(|p| p["synced"] == true)).then_some(())
        });
    }
}

/// Ok if an echo round trip from `from`'s SOCKS5 listener works, Err(SOCKS5 reply code) if the tunnel is refused.
fn reach(from: &Proxy, to: SocketAddr) -> Result<(), u8> {
    socks::reach(from.socks5_addr, to)
}

fn allow_web_to_api() -> &'static str {
    r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-allow-web, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/web"]
"#
}

#[test]
fn allow_by_principal_and_deny_beats_allow() {
    let m = mesh();
    // No policy: everything is allowed.
    assert_eq!(reach(&m.web, m.api), Ok(()));
    assert_eq!(reach(&m.batch, m.api), Ok(()));

    m.apply(allow_web_to_api());
    assert_eq!(reach(&m.web, m.api), Ok(()), "the allowed principal");
    assert_eq!(reach(&m.batch, m.api), Err(NOT_ALLOWED), "another principal");
    assert_eq!(reach(&m.batch, m.db), Ok(()), "a policy in shop does not touch data/db");

    m.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-deny-web, namespace: shop}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/web"]
"#,
    );
    assert_eq!(reach(&m.web, m.api), Err(NOT_ALLOWED), "DENY beats ALLOW");
    let log = trellis_tests::read_log(&m.server.log_path());
    assert!(log.contains("denied by DENY policy shop/api-deny-web rule 0"), "the log names the policy and rule");
    assert!(log.contains("no ALLOW policy matched"), "{log}");
}

/// Reads until the peer closes; Ok(true) if it closed, Ok(false) on timeout.
fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn a_new_deny_closes_open_connections_and_deleting_it_lets_new_ones_in() {
    let m = mesh();
    let mut open = socks::connect_ok(m.web.socks5_addr, m.api);
    open.write_all(b"hello").unwrap();
    let mut reply = [0u8; 5];
    open.read_exact(&mut reply).unwrap();
    let mut unaffected = socks::connect_ok(m.web.socks5_addr, m.db);

    let applied = Instant::now();
    m.cp.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-web, namespace: shop}
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["shop"]
"#,
    );
    let left = Duration::from_secs(2).saturating_sub(applied.elapsed());
    assert!(closed_within(&mut open, left), "the denied connection was still open 2s after the apply");
    assert_eq!(reach(&m.web, m.api), Err(NOT_ALLOWED), "new connections are refused");

    // The connection to data/db is not covered by the policy and stays open.
    unaffected.write_all(b"still").unwrap();
    let mut reply = [0u8; 5];
    unaffected.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    unaffected.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"still");

    m.delete("ap", "deny-web", "shop");
    assert_eq!(reach(&m.web, m.api), Ok(()));
}

#[test]
fn namespace_wide_and_mesh_wide_policies_apply_where_they_should() {
    let m = mesh();
    // Namespace-wide allow-nothing in "data": db is closed to everyone, api is not.
    m.apply("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: data}\nspec: {}\n");
    assert_eq!(reach(&m.web, m.db), Err(NOT_ALLOWED));
    assert_eq!(reach(&m.batch, m.db), Err(NOT_ALLOWED));
    assert_eq!(reach(&m.web, m.api), Ok(()));
    m.delete("ap", "allow-nothing", "data");

    // Mesh-wide (root namespace) DENY of the batch identity: every workload refuses it.
    m.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-batch, namespace: trellis-system}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/jobs/sa/batch"]
"#,
    );
    assert_eq!(reach(&m.batch, m.api), Err(NOT_ALLOWED));
    assert_eq!(reach(&m.batch, m.db), Err(NOT_ALLOWED));
    assert_eq!(reach(&m.web, m.api), Ok(()));
    assert_eq!(reach(&m.web, m.db), Ok(()));

    // The same policy in an ordinary namespace applies to that namespace only (here: none of our workloads).
    m.delete("ap", "deny-batch", "trellis-system");
    m.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-batch, namespace: elsewhere}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/jobs/sa/batch"]
"#,
    );
    assert_eq!(reach(&m.batch, m.api), Ok(()));

    // A dry run reports, per registered workload, whether its applicable policies change, and stores nothing.
    let file = m.cp.dir.path().join("dry.yaml");
    std::fs::write(&file, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: lock, namespace: data}\nspec: {}\n").unwrap();
    let dry = m.cp.ctl_json(&["apply", "--dry-run", "-f", file.to_str().unwrap()]);
    let changes = dry["changes"].as_array().unwrap();
    let changed = |w: &str| changes.iter().find(|c| c["workload"] == w).map(|c| c["changed"] == true);
    assert_eq!(changed("data/db"), Some(true), "{dry}");
    assert_eq!(changed("shop/api"), Some(false), "{dry}");
    assert_eq!(changed("shop/web"), Some(false), "{dry}");
    assert!(!m.cp.ctl_ok(&["get", "ap", "-A"]).contains("lock"), "a dry run stored the policy");
    assert_eq!(reach(&m.web, m.db), Ok(()));
}

/// `trellisctl authz eval` runs the proxies' evaluator offline: no control plane involved.
#[test]
fn authz_eval_explains_offline_and_rejects_bad_input_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    std::fs::write(
        &policies,
        format!(
            "{}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: strict, namespace: shop}}\nspec: {{mtls: {{mode: STRICT}}}}\n",
            allow_web_to_api()
        ),
    )
    .unwrap();
    let eval = |request: &str| {
        let path = dir.path().join("request.json");
        std::fs::write(&path, request).unwrap();
        std::process::Command::new(trellis_tests::bin("trellisctl"))
            .args(["authz", "eval", "-f"])
            .arg(&policies)
            .arg("--request")
            .arg(&path)
            .env("TRELLIS_CONFIG", "/nonexistent")
            .output()
            .unwrap()
    };
    let request = |principal: &str, protocol: &str| {
        format!(
            r#"{{"source": {{"principal": {principal}, "ip": "10.0.0.1"}},
                "destination": {{"namespace": "shop", "labels": {{"app": "api"}}, "ip": "10.0.0.2", "port": 8080}},
                "protocol": "{protocol}"{}}}"#,
            if protocol == "http" { r#", "http": {"method": "GET", "path": "/x?y=1", "host": "api"}"# } else { "" }
        )
    };
    let cases = [
        (request("\"cluster.local/ns/shop/sa/web\"", "tcp"), "allow", serde_json::json!(null), "shop/api-allow-web"),
        (request("\"cluster.local/ns/jobs/sa/batch\"", "http"), "deny", serde_json::json!(403), ""),
        (request("null", "tcp"), "deny", serde_json::json!(null), "shop/strict"),
    ];
    for (req, decision, status, policy) in cases {
        let out = eval(&req);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["decision"], decision, "{v}");
        assert_eq!(v["status"], status, "{v}");
        if !policy.is_empty() {
            assert_eq!(v["policy"], policy, "{v}");
        }
        assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
    let out = eval(r#"{"source": {"ip": "not-an-ip"}, "destination": {}, "protocol": "tcp"}"#);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ip"), "{}", String::from_utf8_lossy(&out.stderr));
}
