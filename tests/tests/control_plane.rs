//! The control plane as a real process: join, certificates, admin API, validation, and every refusal.

#![forbid(unsafe_code)]

use std::process::Command;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use trellis_proto::tls::ClientIdentity;
use trellis_proto::v1 as pb;
use trellis_proto::v1::discovery_response::Message as Out;
use trellis_tests::client::{self, csr, hello, workload};
use trellis_tests::outcome::{Outcome, Refusal};
use trellis_tests::{ControlPlane, bin, read_log, wait_for};

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client
  namespace: default
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/client"]
"#;

async fn joined(cp: &ControlPlane, node: &str, namespaces: &[&str]) -> client::Joined {
    let (token, pin) = cp.token(node, namespaces, &[]);
    client::join(&cp.addr.to_string(), &pin, &token, node).await.expect("connect").expect("join")
}

fn join_error(result: anyhow::Result<Result<client::Joined, tonic::Status>>) -> tonic::Status {
    match result.expect("connect") {
        Ok(_) => panic!("join should have been refused"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_expired_reused_revoked_and_wrong_node_are_refused() {
    let cp = ControlPlane::start(&[]);
    let addr = cp.addr.to_string();

    let (token, pin) = cp.token("n1", &["default"], &[]);
    client::join(&addr, &pin, &token, "n1").await.unwrap().expect("first use joins");
    let reused = join_error(client::join(&addr, &pin, &token, "n1").await);
    assert_eq!(reused.code(), tonic::Code::Unauthenticated);
    assert!(reused.message().contains("already used"), "{}", reused.message());

    let created = cp.ctl_json(&["token", "create", "--node", "n2", "--namespace", "default", "--ttl", "1s"]);
    let token = created["token"].as_str().unwrap().to_owned();
    // The control plane refuses a token once its clock reaches `expiresAt` (whole seconds): wait for that instant.
    let expires_at = time::OffsetDateTime::parse(
        created["expiresAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    wait_for("the token's expiry", Duration::from_secs(10), || {
        (time::OffsetDateTime::now_utc() >= expires_at).then_some(())
    });
    let expired = join_error(client::join(&addr, &pin, &token, "n2").await);
    assert_eq!(expired.code(), tonic::Code::Unauthenticated);
    assert!(expired.message().contains("expired"), "{}", expired.message());

    let (token, _) = cp.token("n3", &["default"], &[]);
    let id = token.split('.').next().unwrap();
    cp.ctl_ok(&["token", "revoke", id]);
    let revoked = join_error(client::join(&addr, &pin, &token, "n3").await);
    assert!(revoked.message().contains("revoked"), "{}", revoked.message());

    let (token, _) = cp.token("n4", &["default"], &[]);
    let wrong_node = join_error(client::join(&addr, &pin, &token, "other").await);
    assert_eq!(wrong_node.code(), tonic::Code::PermissionDenied);

    let forged = join_error(client::join(&addr, &pin, &format!("{id}.{}", "0".repeat(32)), "n3").await);
    assert_eq!(forged.code(), tonic::Code::Unauthenticated);

    let (token, _) = cp.token("n5", &["default"], &["--reusable"]);
    for _ in 0..2 {
        client::join(&addr, &pin, &token, "n5").await.unwrap().expect("reusable token joins again");
    }
    let tokens = cp.ctl_json(&["token", "list"]);
    let n5 = tokens.as_array().unwrap().iter().find(|t| t["node"] == "n5").unwrap();
    assert_eq!(n5["uses"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_ca_pin_is_refused_at_handshake() {
    let cp = ControlPlane::start(&[]);
    let (token, _) = cp.token("n1", &["default"], &[]);
    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    let err = match client::join(&cp.addr.to_string(), &wrong_pin, &token, "n1").await {
        Err(e) => format!("{e:#}"),
        Ok(Err(status)) => format!("{status:?}"),
        Ok(Ok(_)) => panic!("joined through a control plane that does not match the pin"),
    };
    eprintln!("wrong pin error: {err}");
    assert!(err.contains("matches the CA pin"), "{err}");
    // The token was not consumed.
    let tokens = cp.ctl_json(&["token", "list"]);
    assert_eq!(tokens[0]["uses"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_refusals_and_a_valid_svid_checked_by_openssl() {
    let cp = ControlPlane::start(&[]);
    let node = joined(&cp, "n1", &["default"]).await;
    let mut stream = node
        .discover(hello(vec![workload("web", "default", "web-sa", "10.9.0.1")]))
        .await
        .unwrap()
        .expect("stream opens");
    match stream.next().await.unwrap() {
        Out::Update(u) => {
            assert!(u.full, "first update is a full snapshot");
            assert_eq!(u.workloads.len(), 1);
            assert_eq!(u.workloads[0].spiffe_id, "spiffe://cluster.local/ns/default/sa/web-sa");
            assert_eq!(u.workloads[0].node, "n1");
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }

    let cases: &[(&[&str], &str)] = &[
        (&["spiffe://cluster.local/ns/other/sa/web-sa"], "namespace"),
        (
            &["spiffe://cluster.local/ns/default/sa/web-sa", "spiffe://cluster.local/ns/default/sa/x"],
            "exactly one URI SAN",
        ),
        (&["spiffe://evil.example/ns/default/sa/web-sa"], "trust domain"),
        (&["spiffe://cluster.local/ns/default/sa/not-hosted"], "fronts no workload"),
        (&["spiffe://cluster.local/ns//sa/web-sa"], "invalid SPIFFE ID"),
        (&["spiffe://cluster.local/trellis/node/n2"], "not a workload identity"),
        (&[], "exactly one URI SAN"),
    ];
    for (i, (uris, reason)) in cases.iter().enumerate() {
        let (_, der) = csr(uris);
        let answer = stream.certify(i as u64 + 1, der).await;
        assert!(answer.certificate_chain.is_empty(), "case {uris:?} was signed");
        assert!(answer.error.contains(reason), "case {uris:?}: {}", answer.error);
    }
    // A CSR whose signature does not match its key.
    let (_, mut der) = csr(&["spiffe://cluster.local/ns/default/sa/web-sa"]);
    let last = der.len() - 3;
    der[last] ^= 0x55;
    let answer = stream.certify(100, der).await;
    assert!(answer.error.contains("CSR"), "tampered CSR: {}", answer.error);

    let (_, der) = csr(&["spiffe://cluster.local/ns/default/sa/web-sa"]);
    let answer = stream.certify(200, der).await;
    assert!(answer.error.is_empty(), "{}", answer.error);
    assert_eq!(answer.certificate_chain.len(), 2, "leaf and root");

    // An independent tool agrees: chain verifies, one URI SAN, not a CA, the right usages.
    let dir = tempfile::tempdir().unwrap();
    let leaf_pem = dir.path().join("leaf.pem");
    let root_pem = dir.path().join("root.pem");
    std::fs::write(&leaf_pem, pem_encode(&answer.certificate_chain[0])).unwrap();
    std::fs::write(&root_pem, cp.root_pem()).unwrap();
    let verify = Command::new("openssl").args(["verify", "-CAfile"]).arg(&root_pem).arg(&leaf_pem).output().unwrap();
    assert!(verify.status.success(), "openssl verify: {}", String::from_utf8_lossy(&verify.stderr));
    let text = Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&leaf_pem).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("URI:spiffe://cluster.local/ns/default/sa/web-sa"), "{text}");
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{text}");
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");
}

fn pem_encode(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn workload_declarations_outside_the_token_or_claiming_taken_addresses_are_refused() {
    let cp = ControlPlane::start(&[]);
    let n1 = joined(&cp, "n1", &["default"]).await;
    let n2 = joined(&cp, "n2", &["default", "team"]).await;

    let outside = n1.discover(hello(vec![workload("db", "team", "db", "10.9.0.9")])).await.unwrap();
    let status = outside.err().expect("namespace outside the token is refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("namespace \"team\""), "{}", status.message());

    let _s1 = n1.discover(hello(vec![workload("web", "default", "web", "10.9.0.1")])).await.unwrap().expect("n1");
    let clash = n2.discover(hello(vec![workload("api", "team", "api", "10.9.0.1")])).await.unwrap();
    let status = clash.err().expect("duplicate address is refused");
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
    assert!(status.message().contains("10.9.0.1") && status.message().contains("n1"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_requires_the_admin_credential() {
    let cp = ControlPlane::start(&[]);
    let roots = client::pem_certs(&cp.root_pem());
    let addr = cp.addr.to_string();

    let anonymous = client::connect(&addr, roots.clone(), None).await.unwrap();
    let status = pb::admin_client::AdminClient::new(anonymous).list_tokens(pb::ListTokensRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // A node credential and a workload SVID are valid mesh certificates, but not admins.
    let node = joined(&cp, "n1", &["default"]).await;
    let status = pb::admin_client::AdminClient::new(node.channel().await.unwrap())
        .apply(pb::ApplyRequest { documents: POLICY.into(), dry_run: false })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let mut stream = node.discover(hello(vec![workload("web", "default", "web", "10.9.0.1")])).await.unwrap().unwrap();
    let (key, der) = csr(&["spiffe://cluster.local/ns/default/sa/web"]);
    let svid = stream.certify(1, der).await;
    let identity = ClientIdentity {
        chain: svid.certificate_chain.into_iter().map(Into::into).collect(),
        key: client::key_der(&key),
    };
    let workload = client::connect(&addr, roots.clone(), Some(identity)).await.unwrap();
    let status = pb::admin_client::AdminClient::new(workload).list_nodes(pb::ListNodesRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(cp.ctl_ok(&["get", "authorizationpolicies", "-A"]).starts_with("NAMESPACE"));

    // An admin certificate from another mesh's CA. The config trusts this control plane (its endpoint and CA
    // bundle), so that trellisctl completes its side of the handshake and it is the control plane that judges the
    // foreign certificate. The control case is the same config with this mesh's own admin credential.
    let other = ControlPlane::start(&[]);
    let read_config = |path: &std::path::Path| -> serde_json::Value {
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let ours = read_config(&cp.admin_config());
    let mut config = read_config(&other.admin_config());
    assert_ne!(config["certificate"], ours["certificate"]);
    config["endpoint"] = ours["endpoint"].clone();
    config["caBundle"] = ours["caBundle"].clone();
    let mixed = other.dir.path().join("mixed.yaml");
    std::fs::write(&mixed, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    let ctl = |config: &std::path::Path| {
        Command::new(bin("trellisctl")).arg("--config").arg(config).args(["token", "list"]).output().unwrap()
    };
    let control = ctl(&cp.admin_config());
    assert!(control.status.success(), "control case: {}", String::from_utf8_lossy(&control.stderr));
    let out = ctl(&mixed);
    assert!(!out.status.success(), "a foreign admin was accepted: {}", String::from_utf8_lossy(&out.stdout));
    // The control plane refuses the foreign certificate in the TLS handshake, before any gRPC call: there is no
    // gRPC status, and trellisctl's transport error does not carry the alert (its text varies between
    // "Unknown: transport error" and "Cancelled: operation was canceled"). The refusal and its reason, at the
    // control plane: the alert it sends to a client using trellisctl's TLS config, beside the same handshake with
    // this mesh's admin credential, and the reason it logs.
    let identity = |config: &serde_json::Value| ClientIdentity {
        chain: client::pem_certs(config["certificate"].as_str().unwrap()),
        key: rustls_pki_types::PrivateKeyDer::from_pem_slice(config["key"].as_str().unwrap().as_bytes()).unwrap(),
    };
    assert_eq!(client::handshake(cp.addr, roots.clone(), Some(identity(&ours))).await, Outcome::Passed);
    let reason = "error=invalid peer certificate: BadSignature";
    let logged_before = read_log(&cp.log_path()).matches(reason).count();
    assert!(logged_before >= 1, "trellisctl's attempt was refused for another reason:\n{}", read_log(&cp.log_path()));
    let refused = client::handshake(cp.addr, roots.clone(), Some(identity(&config))).await;
    // Both meshes' CAs carry the same name: the chain finds the name and fails on the signature.
    assert_eq!(refused, Outcome::Refused(Refusal::TlsAlert(rustls::AlertDescription::DecryptError)));
    wait_for("the control plane to log the refused handshake", Duration::from_secs(10), || {
        (read_log(&cp.log_path()).matches(reason).count() > logged_before).then_some(())
    });
}

#[test]
fn invalid_documents_are_rejected_with_their_field_and_nothing_is_half_applied() {
    let cp = ControlPlane::start(&[]);
    cp.apply(POLICY);
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {actions: DENY}\n",
            "actions",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: PERMIT, rules: [{}]}\n",
            "PERMIT",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  rules:\n  - from:\n    - source: {ipBlocks: [\"10.0.0.300/8\"]}\n",
            "ipBlocks",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  rules:\n  - to:\n    - operation: {ports: [\"70000\"]}\n",
            "ports",
        ),
        ("apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {}\n", "apiVersion"),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: DENY}\n",
            "rules",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: CUSTOM, provider: {name: x}, rules: [{}]}\n",
            "CUSTOM",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {mtls: {mode: SOMETIMES}}\n",
            "SOMETIMES",
        ),
    ];
    for (yaml, needle) in cases {
        let out = cp.ctl_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(!out.status.success(), "accepted: {yaml}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("InvalidArgument") && stderr.contains(needle), "{yaml}\n=> {stderr}");
    }

    // A good document followed by a bad one: neither is applied.
    let mixed = format!(
        "{}---\n{}",
        POLICY.replace("allow-client", "second"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad}\nspec: {action: DENY}\n"
    );
    let out = cp.ctl_stdin(&["apply", "-f", "-"], Some(&mixed));
    assert!(!out.status.success());
    // The bad document is the second one, and users count from 1.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("document 2 (AuthorizationPolicy default/bad)"), "{stderr}");
    let all = cp.ctl_json(&["get", "ap", "-A"]);
    let names: Vec<&str> =
        all["items"].as_array().unwrap().iter().map(|d| d["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["allow-client"], "store changed by a rejected apply");
}

/// A hostile text (a flow sequence nested 100,000 levels, 200 KB, as a document's `spec`) used to keep the control plane parsing for tens of
/// seconds, during which no other call was answered. It is now refused before any parser runs, naming the limit
/// and the document, and parsing never runs on the workers that serve other calls and the proxies' streams.
#[test]
fn hostile_yaml_is_refused_before_parsing_and_other_calls_are_answered_meanwhile() {
    let cp = std::sync::Arc::new(ControlPlane::start(&[]));
    cp.apply(POLICY);
    let nested = |levels: usize| format!("{}{}\n", "[".repeat(levels), "]".repeat(levels));
    // Control, through the same path: a nesting under the limit is parsed, and refused for what it holds.
    let out = cp.ctl_stdin(&["apply", "-f", "-"], Some(&nested(32)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("document 1: expected a Kubernetes object")
            && stderr.contains("found a list"),
        "{stderr}"
    );

    // As many hostile applies at once as the control plane has async workers (one per core), so that parsing on
    // the workers would hold them all.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let received = || read_log(&cp.log_path()).matches("apply received").count();
    let received_before = received();
    let hostile: Vec<_> = (0..workers)
        .map(|i| {
            let cp = cp.clone();
            // Nested in a mapping's value, where the parser's cost grows fastest (20k levels: 3 s, 40k: 11 s).
            let text = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: hostile-{i}}}\nspec: {}",
                nested(100_000)
            );
            std::thread::spawn(move || cp.ctl_stdin(&["apply", "-f", "-"], Some(&text)))
        })
        .collect();
    // Once the control plane is reading them (the others follow on the same or other connections).
    wait_for("the control plane to receive a hostile apply", Duration::from_secs(20), || {
        (received() > received_before).then_some(())
    });
    // Other admin calls while the hostile ones are in flight: answered. Unbounded parsing on the workers held every
    // call for about 40 s; the bound only tells "answered" from "stalled".
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let cp = cp.clone();
        std::thread::spawn(move || {
            let _ = tx.send((cp.ctl(&["proxy-status"]), cp.ctl(&["get", "ap", "allow-client", "-n", "default"])));
        });
    }
    let (status, get) = rx.recv_timeout(Duration::from_secs(20)).expect("admin calls answered during a hostile apply");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(get.status.success(), "{}", String::from_utf8_lossy(&get.stderr));

    for hostile in hostile {
        let out = hostile.join().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "hostile text accepted");
        assert!(stderr.contains("InvalidArgument: document 1: nesting deeper than 64 levels (line 4)"), "{stderr}");
    }

    // Too many documents: refused before parsing, naming the first one over the limit.
    let many: Vec<String> = (0..1001).map(|i| POLICY.replace("allow-client", &format!("p{i}"))).collect();
    let out = cp.ctl_stdin(&["apply", "-f", "-"], Some(&many.join("---\n")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "1001 documents accepted");
    assert!(stderr.contains("InvalidArgument: document 1001: more than 1000 resources in one text"), "{stderr}");
    // Nothing of either was stored.
    let all = cp.ctl_json(&["get", "ap", "-A"]);
    assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");
}

fn request_authentication(jwks_uri: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\n\
         spec:\n  jwtRules:\n  - issuer: https://auth.example.com\n    jwksUri: \"{jwks_uri}\"\n"
    )
}

/// A `jwksUri` on a loopback or link-local host (a cloud metadata service, say) would have the control plane fetch
/// from services only its host reaches, every refresh. Refused at apply time on the literal host, and at fetch time
/// on the resolved address (a resource stored while allowed, read by a control plane that no longer allows it),
/// unless the control plane runs with `--jwks-allow-local`.
#[test]
fn jwks_uri_on_local_addresses_is_refused_unless_allowed() {
    let cp = ControlPlane::start(&[]);
    for (uri, host, kind) in [
        ("http://127.0.0.1:8080/jwks.json", "127.0.0.1", "loopback"),
        ("https://[::1]/jwks.json", "::1", "loopback"),
        ("https://localhost/jwks.json", "localhost", "loopback"),
        ("https://[::ffff:127.0.0.2]/jwks.json", "::ffff:127.0.0.2", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "link-local"),
        ("https://[fe80::1]/jwks.json", "fe80::1", "link-local"),
    ] {
        let out = cp.ctl_stdin(&["apply", "-f", "-"], Some(&request_authentication(uri)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{uri} accepted");
        let reason = format!(
            "InvalidArgument: RequestAuthentication shop/jwt: spec.jwtRules[0].jwksUri: \"{uri}\": host {host} is a \
             {kind} address: refused (start the control plane with --jwks-allow-local to allow it)"
        );
        assert!(stderr.contains(&reason), "{uri}: {stderr}");
    }
    // Control, through the same path: a public host is applied.
    assert!(cp.apply(&request_authentication("https://auth.example.com/jwks.json")).contains("created"));

    // Allowed: applied, and fetched (the control plane connects to the server).
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    server.set_nonblocking(true).unwrap();
    let uri = format!("http://{}/jwks.json", server.local_addr().unwrap());
    let mut cp = ControlPlane::start(&["--jwks-allow-local", "--jwks-allow-http", "--jwks-refresh", "1s"]);
    assert!(cp.apply(&request_authentication(&uri)).contains("created"));
    wait_for("the control plane to connect to the JWKS server", Duration::from_secs(20), || server.accept().ok());

    // The same stored URI, read by a control plane without the flag: refused at fetch time, never connected to.
    cp.kill9();
    while server.accept().is_ok() {}
    cp.restart_with(&["--jwks-allow-http", "--jwks-refresh", "1s"]);
    let reason = "host 127.0.0.1 resolves to 127.0.0.1, a loopback address: refused (start the control plane with \
                  --jwks-allow-local to allow it)";
    wait_for("the control plane to refuse the fetch", Duration::from_secs(20), || {
        (read_log(&cp.log_path()).matches(reason).count() >= 2).then_some(())
    });
    assert!(server.accept().is_err(), "the control plane connected to a loopback JWKS server");
}

#[test]
fn apply_get_delete_round_trip() {
    let cp = ControlPlane::start(&[]);
    assert!(cp.apply(POLICY).contains("created"));
    assert!(cp.apply(POLICY).contains("unchanged"));
    assert!(cp.apply(&POLICY.replace("sa/client", "sa/other")).contains("configured"));
    let doc = cp.ctl_json(&["get", "authorizationpolicy", "allow-client", "-n", "default"]);
    assert_eq!(doc["spec"]["rules"][0]["from"][0]["source"]["principals"][0], "cluster.local/ns/default/sa/other");
    let yaml = cp.ctl_ok(&["get", "ap", "allow-client", "-o", "yaml"]);
    assert!(yaml.contains("kind: AuthorizationPolicy"), "{yaml}");
    let err = cp.ctl_err(&["get", "ap", "missing"]);
    assert!(err.contains("NotFound"), "{err}");
    cp.ctl_ok(&["delete", "ap", "allow-client", "-n", "default"]);
    let err = cp.ctl_err(&["delete", "ap", "allow-client", "-n", "default"]);
    assert!(err.contains("not found"), "{err}");
    let err = cp.ctl_err(&["get", "ap", "allow-client"]);
    assert!(err.contains("NotFound"), "{err}");

    // Stored, but reported as not applying to proxies (as Istio's sidecars ignore targetRefs policies).
    let waypoint = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: wp, namespace: default}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: api}]\n  rules: [{}]\n";
    assert!(cp.apply(waypoint).contains("not enforced by proxies"));
}

#[test]
fn init_refuses_an_existing_data_dir_and_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let cp = ControlPlane::start(&[]);
    let out = Command::new(bin("trellis-control")).args(["init", "--data-dir"]).arg(cp.data_dir()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    for key in ["ca/ca-key.pem", "admin/admin-key.pem", "admin.yaml"] {
        let mode = std::fs::metadata(cp.data_dir().join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
}

/// Istio's plug-in CA: the operator's intermediate signs, the operator's root is the trust anchor and the pin.
#[tokio::test(flavor = "multi_thread")]
async fn imported_intermediate_ca_signs_and_its_root_is_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::write(p("ca.ext"), "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n").unwrap();
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("root.key")]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("root.key"),
        "-subj",
        "/O=corp/CN=Corp Root",
        "-days",
        "30",
        "-out",
        &p("root.pem"),
    ]);
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("int.key")]);
    openssl(&["req", "-new", "-key", &p("int.key"), "-subj", "/O=corp/CN=Mesh Intermediate", "-out", &p("int.csr")]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("int.csr"),
        "-CA",
        &p("root.pem"),
        "-CAkey",
        &p("root.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &p("ca.ext"),
        "-out",
        &p("int.pem"),
    ]);
    let data = dir.path().join("data");
    let mismatched = Command::new(bin("trellis-control"))
        .args(["init", "--data-dir"])
        .arg(dir.path().join("bad"))
        .args(["--ca-cert", &p("int.pem"), "--ca-key", &p("root.key"), "--ca-chain", &p("root.pem")])
        .output()
        .unwrap();
    assert!(!mismatched.status.success());
    assert!(String::from_utf8_lossy(&mismatched.stderr).contains("does not match"));
    let init = Command::new(bin("trellis-control"))
        .args(["init", "--data-dir"])
        .arg(&data)
        .args(["--ca-cert", &p("int.pem"), "--ca-key", &p("int.key"), "--ca-chain", &p("root.pem")])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let root_in_data = std::fs::read_to_string(data.join("ca/root-cert.pem")).unwrap();
    assert_eq!(client::pem_certs(&root_in_data), client::pem_certs(&std::fs::read_to_string(p("root.pem")).unwrap()));

    // Serve that data dir through the harness's process handling.
    let addresses = dir.path().join("addresses.json");
    let mut child = Command::new(bin("trellis-control"))
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--addresses-file"])
        .arg(&addresses)
        .spawn()
        .unwrap();
    let reported = trellis_tests::wait_addresses(&mut child, &addresses, &dir.path().join("no-log"), "listen");
    let addr: std::net::SocketAddr = reported["listen"].as_str().unwrap().parse().unwrap();
    let ctl = |args: &[&str]| {
        let mut config: serde_json::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(data.join("admin.yaml")).unwrap()).unwrap();
        config["endpoint"] = serde_json::json!(addr.to_string());
        std::fs::write(dir.path().join("ctl.yaml"), serde_yaml_ng::to_string(&config).unwrap()).unwrap();
        Command::new(bin("trellisctl")).arg("--config").arg(dir.path().join("ctl.yaml")).args(args).output().unwrap()
    };
    let out = ctl(&["token", "create", "--node", "n1", "-o", "json"]);
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let joined = client::join(
        &addr.to_string(),
        created["caPin"].as_str().unwrap_or(""),
        created["token"].as_str().unwrap_or(""),
        "n1",
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let root_der = &client::pem_certs(&root_in_data)[0];
    assert_eq!(created["caPin"], trellis_proto::tls::ca_pin(root_der).unwrap());
    let joined = joined.expect("connect through the pinned operator root").expect("join");
    assert_eq!(joined.chain.len(), 3, "node credential, intermediate, root");
}
