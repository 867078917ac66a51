//! The proxy as a control-plane client, with both real processes: join, certify, follow the stream, ACK; survive a
//! control-plane crash; get cut off when its node is revoked.

#![forbid(unsafe_code)]

use std::time::Duration;

use trellis_tests::{ControlPlane, Proxy, WorkloadSpec, read_log, wait_for};

const DENY_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-plaintext
  namespace: shop
spec:
  action: DENY
  rules:
  - from:
    - source:
        notPrincipals: ["*"]
"#;

fn resource_names(dump: &serde_json::Value) -> Vec<String> {
    dump["resources"]
        .as_array()
        .map(|a| a.iter().map(|r| r["name"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

fn synced(cp: &ControlPlane, node: &str) -> Option<serde_json::Value> {
    let status = cp.proxy_status();
    let proxy = status["proxies"].as_array()?.iter().find(|p| p["node"] == node)?.clone();
    (proxy["synced"] == true).then_some(proxy)
}

#[test]
fn proxy_joins_certifies_follows_updates_and_acks() {
    let cp = ControlPlane::start(&[]);
    let proxy = Proxy::start(&cp, "node-a", &[WorkloadSpec::new("web", "shop", "web", "127.0.10.1")]);
    proxy.wait_ready();
    let dump = proxy.config_dump();
    let certs = dump["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 1, "{dump}");
    assert_eq!(certs[0]["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/web");
    assert!(!dump.to_string().contains("PRIVATE"), "config_dump leaks a key");
    let workloads = dump["workloads"].to_string();
    assert!(workloads.contains("127.0.10.1"), "{workloads}");

    cp.apply(DENY_POLICY);
    proxy.wait_config("the policy to reach the proxy", |d| resource_names(d).contains(&"deny-plaintext".to_owned()));
    let status = wait_for("proxy-status to show the proxy synced", Duration::from_secs(20), || synced(&cp, "node-a"));
    assert_eq!(status["connected"], true);
    assert_eq!(status["lastNackError"], "");

    cp.ctl_ok(&["delete", "ap", "deny-plaintext", "-n", "shop"]);
    proxy.wait_config("the deletion to reach the proxy", |d| resource_names(d).is_empty());
    wait_for("proxy synced after delete", Duration::from_secs(20), || synced(&cp, "node-a"));

    // The control plane's log of issued certificates and the node list agree.
    let nodes = cp.ctl_json(&["nodes"]);
    assert_eq!(nodes[0]["name"], "node-a");
    assert_eq!(nodes[0]["connected"], true);
    assert_eq!(nodes[0]["workloads"][0], "shop/web");
}

/// The readiness probe on `listen.ready` (15021) answers 503 with what is missing while the proxy cannot serve,
/// and 200 once it has its certificates and config: from the control plane, or stored in `stateDir` before a
/// restart (then it says so).
#[test]
fn readiness_probe_answers_503_until_the_proxy_can_serve() {
    let mut cp = ControlPlane::start(&[]);
    let mut proxy = Proxy::start(&cp, "node-a", &[WorkloadSpec::new("web", "shop", "web", "127.0.10.1")]);
    proxy.wait_ready();
    assert_eq!(proxy.readiness().unwrap(), (200, "ready\n".to_owned()));

    // Restarted with no control plane: ready from what it stored, and it says so.
    wait_for("the stored config", Duration::from_secs(20), || {
        proxy.state_dir().join("mesh-config.pb").exists().then_some(())
    });
    proxy.kill9();
    cp.kill9();
    proxy.restart();
    let (status, body) =
        wait_for("the readiness listener to answer", Duration::from_secs(30), || proxy.readiness().ok());
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready: serving the config stored at version"), "{body}");

    // Restarted with only its node credential (the stored config and certificate removed): not ready.
    proxy.kill9();
    for entry in std::fs::read_dir(proxy.state_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("svid-") || name == "mesh-config.pb" {
            std::fs::remove_file(path).unwrap();
        }
    }
    proxy.restart();
    let (status, body) =
        wait_for("the readiness listener to answer", Duration::from_secs(30), || proxy.readiness().ok());
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: waiting for"), "{body}");
    assert!(body.contains("first config from the control plane"), "{body}");

    cp.restart();
    proxy.wait_ready();
    assert_eq!(proxy.readiness().unwrap(), (200, "ready\n".to_owned()));
}

#[test]
fn control_plane_crash_loses_nothing_and_proxies_resync() {
    let mut cp = ControlPlane::start(&[]);
    let proxy = Proxy::start(&cp, "node-a", &[WorkloadSpec::new("web", "shop", "web", "127.0.10.1")]);
    proxy.wait_ready();
    cp.apply(DENY_POLICY);
    cp.token("node-later", &["shop"], &[]);
    wait_for("synced", Duration::from_secs(20), || synced(&cp, "node-a"));
    let root_before = cp.root_pem();

    cp.kill9();
    cp.restart();

    assert_eq!(cp.root_pem(), root_before, "CA changed");
    assert!(cp.ctl_ok(&["get", "ap", "-A"]).contains("deny-plaintext"), "resource lost");
    let tokens = cp.ctl_json(&["token", "list"]);
    assert!(tokens.as_array().unwrap().iter().any(|t| t["node"] == "node-later"), "token lost: {tokens}");
    let nodes = cp.ctl_json(&["nodes"]);
    assert!(nodes.as_array().unwrap().iter().any(|n| n["name"] == "node-a"), "node lost: {nodes}");

    // The proxy reconnects by itself with its stored credential, and follows new changes.
    wait_for("proxy to reconnect and sync", Duration::from_secs(40), || synced(&cp, "node-a"));
    cp.apply(&DENY_POLICY.replace("deny-plaintext", "second"));
    proxy.wait_config("a post-restart policy", |d| resource_names(d).contains(&"second".to_owned()));
    wait_for("synced again", Duration::from_secs(20), || synced(&cp, "node-a"));
}

#[test]
fn revoked_node_is_cut_off_and_its_workloads_leave_the_registry() {
    let cp = ControlPlane::start(&[]);
    let a = Proxy::start(&cp, "node-a", &[WorkloadSpec::new("web", "shop", "web", "127.0.10.1")]);
    let b = Proxy::start(&cp, "node-b", &[WorkloadSpec::new("api", "shop", "api", "127.0.10.2")]);
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-b's workload in node-a's registry", |d| d["workloads"].to_string().contains("127.0.10.2"));

    cp.ctl_ok(&["nodes", "revoke", "node-b"]);
    a.wait_config("node-b's workload to leave", |d| !d["workloads"].to_string().contains("127.0.10.2"));
    wait_for("node-b disconnected", Duration::from_secs(20), || {
        let status = cp.proxy_status();
        let b = status["proxies"].as_array()?.iter().find(|p| p["node"] == "node-b")?.clone();
        (b["connected"] == false).then_some(())
    });
    let nodes = cp.ctl_json(&["nodes"]);
    let revoked = nodes.as_array().unwrap().iter().find(|n| n["name"] == "node-b").unwrap();
    assert_eq!(revoked["revoked"], true);
    // It stays out: its reconnects are refused. Wait for a reconnect attempt made after the disconnection to be
    // refused (the proxy logs the control plane's reason each time), then check it is still disconnected.
    let refusals = || trellis_tests::read_log(&b.log_path()).matches("was revoked").count();
    let before = refusals();
    wait_for("a reconnect of node-b to be refused as revoked", Duration::from_secs(30), || {
        (refusals() > before).then_some(())
    });
    let status = cp.proxy_status();
    let b_status = status["proxies"].as_array().unwrap().iter().find(|p| p["node"] == "node-b").unwrap();
    assert_eq!(b_status["connected"], false);
}

/// On SIGTERM the control plane ends every discovery stream (UNAVAILABLE, "control plane shutting down") and exits
/// with status 0, rather than waiting for streams that never end on their own (it used to take 6.6 s: a grace
/// period, then an abort that the proxy saw as a broken connection).
#[test]
fn control_plane_exits_promptly_on_sigterm_and_ends_the_streams() {
    let mut cp = ControlPlane::start(&[]);
    let proxy = Proxy::start(&cp, "node-a", &[WorkloadSpec::new("web", "shop", "web", "127.0.10.1")]);
    proxy.wait_ready();
    wait_for("the proxy's stream to be synced", Duration::from_secs(20), || synced(&cp, "node-a"));

    // The bound only tells "prompt" from "held open by the stream".
    let status = cp.terminate(Duration::from_secs(4)).expect("the control plane exits promptly after SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", read_log(&cp.log_path()));
    let control_log = read_log(&cp.log_path());
    assert!(control_log.contains("proxy disconnected node=node-a reason=control plane shutting down"), "{control_log}");
    assert!(control_log.contains("stopped"), "{control_log}");
    wait_for("the proxy to log the stream's end", Duration::from_secs(10), || {
        read_log(&proxy.log_path())
            .contains("control plane ended the discovery stream: control plane shutting down")
            .then_some(())
    });
}
