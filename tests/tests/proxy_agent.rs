//! The proxy as a control-plane client, with both real processes: join, certify, follow the stream, ACK; survive a
//! control-plane crash; get cut off when its node is revoked.

#![forbid(unsafe_code)]

use std::time::Duration;

use trellis_tests::{ControlPlane, Proxy, WorkloadSpec, wait_for};

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
    // It stays out: its reconnects are refused.
    std::thread::sleep(Duration::from_secs(1));
    let status = cp.proxy_status();
    let b_status = status["proxies"].as_array().unwrap().iter().find(|p| p["node"] == "node-b").unwrap();
    assert_eq!(b_status["connected"], false);
    assert!(trellis_tests::read_log(&b.log_path()).contains("revoked"), "the proxy logs why it was cut off");
}
