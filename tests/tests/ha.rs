//! A highly available control plane: three `trellis-control` replicas over one real 3-member etcd cluster
//! (Debian's etcd-server, started by the harness on loopback ports). Changes made through any replica reach proxies
//! on every replica; single-use tokens hold across replicas; every replica signs under the same root; etcd losing
//! quorum refuses writes with the reason while discovery keeps serving; CA keys in etcd are sealed with the KEK.

#![forbid(unsafe_code)]

use std::process::Command;
use std::time::Duration;

use trellis_tests::client::{self, csr, hello, workload};
use trellis_tests::etcd::EtcdCluster;
use trellis_tests::{ControlPlane, Proxy, ProxyOptions, WorkloadSpec, bin, wait_for};

fn policy(name: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: default
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/client"]
"#
    )
}

/// (proxy-status entry of `node` on `cp`, the replica's current version)
fn status_of(cp: &ControlPlane, node: &str) -> Option<(serde_json::Value, u64)> {
    let status = cp.proxy_status();
    let current = status["currentVersion"].as_u64()?;
    let entry = status["proxies"].as_array()?.iter().find(|p| p["node"] == node).cloned()?;
    Some((entry, current))
}

/// Every replica serves `version` (or later) and its proxy ACKed it.
fn wait_all_acked(replicas: &[ControlPlane], nodes: &[&str], version: u64) {
    for (cp, node) in replicas.iter().zip(nodes) {
        wait_for(&format!("{node} to ACK version {version}"), Duration::from_secs(30), || {
            let (entry, current) = status_of(cp, node)?;
            (current >= version && entry["ackedVersion"].as_u64()? >= version).then_some(())
        });
    }
}

#[test]
fn a_change_through_one_replica_reaches_proxies_on_every_replica() {
    let etcd = EtcdCluster::start(3);
    let replicas = ControlPlane::start_replicas(&etcd, 3, &[]);
    let nodes = ["node-0", "node-1", "node-2"];
    let proxies: Vec<Proxy> = replicas
        .iter()
        .zip(nodes)
        .enumerate()
        .map(|(i, (cp, node))| {
            let spec = WorkloadSpec::new(&format!("web-{i}"), "default", "web", &format!("10.9.0.{}", i + 1));
            Proxy::start(cp, node, &[spec])
        })
        .collect();
    for proxy in &proxies {
        proxy.wait_ready();
    }
    // The registry is shared: replica 2's proxy learns the workloads of proxies on replicas 0 and 1.
    proxies[2].wait_config("every replica's workloads", |dump| {
        let text = dump.to_string();
        text.contains("web-0") && text.contains("web-1") && text.contains("web-2")
    });

    let before: Vec<u64> = replicas.iter().map(|cp| cp.proxy_status()["currentVersion"].as_u64().unwrap()).collect();
    let started = std::time::Instant::now();
    replicas[0].apply(&policy("allow-client"));
    let version = replicas[0].proxy_status()["currentVersion"].as_u64().unwrap();
    assert!(version > before[0], "the apply made a new version");
    wait_all_acked(&replicas, &nodes, version);
    println!("one apply through replica 0 ACKed by the proxies of 3 replicas in {:?}", started.elapsed());
    // Versions are comparable across replicas: every replica serves the same number for the same state.
    for cp in &replicas {
        assert_eq!(cp.proxy_status()["currentVersion"].as_u64().unwrap(), version);
    }
    for proxy in &proxies {
        proxy.wait_config("the policy", |dump| dump.to_string().contains("allow-client"));
    }
    // And the other way: a delete through replica 2 reaches replica 0's proxy.
    replicas[2].ctl_ok(&["delete", "ap", "allow-client", "-n", "default"]);
    proxies[0].wait_config("the policy gone", |dump| !dump.to_string().contains("allow-client"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn one_single_use_token_raced_through_three_replicas_joins_exactly_once() {
    let etcd = EtcdCluster::start(3);
    let replicas = ControlPlane::start_replicas(&etcd, 3, &[]);
    let (token, pin) = replicas[0].token("racer", &["default"], &[]);
    let attempts: Vec<_> = (0..50)
        .map(|i| {
            let addr = replicas[i % 3].addr.to_string();
            let (token, pin) = (token.clone(), pin.clone());
            tokio::spawn(async move { (i % 3, client::join(&addr, &pin, &token, "racer").await.expect("connect")) })
        })
        .collect();
    let mut joined = Vec::new();
    let mut refused = Vec::new();
    for attempt in attempts {
        let (replica, result) = attempt.await.unwrap();
        match result {
            Ok(_) => joined.push(replica),
            Err(status) => refused.push((replica, status)),
        }
    }
    assert_eq!(joined.len(), 1, "exactly one join succeeds; refusals: {refused:?}");
    assert_eq!(refused.len(), 49);
    for (replica, status) in &refused {
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "replica {replica}: {status:?}");
        assert!(status.message().contains("join token was already used"), "replica {replica}: {status:?}");
    }
    // The refusals came from every replica, not only from the one that let the join through.
    for r in 0..3 {
        assert!(refused.iter().any(|(replica, _)| *replica == r) || joined[0] == r, "replica {r} answered");
    }
    println!("50 racing joins: replica {} let one through, 49 refused", joined[0]);
}

fn pem_encode(der: &[u8]) -> String {
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", pem_lines(der))
}

fn pem_lines(der: &[u8]) -> String {
    let out = Command::new("openssl")
        .args(["base64", "-A"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(der)?;
            child.wait_with_output()
        })
        .expect("openssl base64");
    let b64 = String::from_utf8(out.stdout).unwrap();
    b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_replica_signs_under_the_same_root() {
    let etcd = EtcdCluster::start(3);
    let replicas = ControlPlane::start_replicas(&etcd, 3, &[]);
    let root = replicas[0].root_pem();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root.pem"), &root).unwrap();
    for (i, cp) in replicas.iter().enumerate() {
        // Each replica's data dir was filled from etcd: the same root.
        assert_eq!(cp.root_pem(), root, "replica {i}'s root");
        let node = format!("signer-{i}");
        let (token, pin) = cp.token(&node, &["default"], &[]);
        let joined = client::join(&cp.addr.to_string(), &pin, &token, &node).await.unwrap().expect("join");
        let address = format!("10.9.1.{}", i + 1);
        let mut stream = joined
            .discover(hello(vec![workload(&format!("web-{i}"), "default", "web", &address)]))
            .await
            .unwrap()
            .expect("stream");
        let (_, der) = csr(&["spiffe://cluster.local/ns/default/sa/web"]);
        let answer = stream.certify(1, der).await;
        assert!(answer.error.is_empty(), "replica {i}: {}", answer.error);
        let leaf = dir.path().join(format!("leaf-{i}.pem"));
        std::fs::write(&leaf, pem_encode(&answer.certificate_chain[0])).unwrap();
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(dir.path().join("root.pem"))
            .arg(&leaf)
            .output()
            .unwrap();
        assert!(verify.status.success(), "replica {i}: openssl verify: {}", String::from_utf8_lossy(&verify.stderr));
    }
    // Control: a root made elsewhere does not verify these leaves (the check can fail).
    let other = tempfile::tempdir().unwrap();
    let init = Command::new(bin("trellis-control")).args(["init", "--data-dir"]).arg(other.path().join("d")).output();
    assert!(init.unwrap().status.success());
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(other.path().join("d/ca/root-cert.pem"))
        .arg(dir.path().join("leaf-0.pem"))
        .output()
        .unwrap();
    assert!(!verify.status.success(), "a foreign root must not verify the leaf");
}

#[test]
fn etcd_losing_quorum_refuses_writes_keeps_serving_and_recovers() {
    let mut etcd = EtcdCluster::start(3);
    let replicas = ControlPlane::start_replicas(&etcd, 2, &[]);
    let proxy = Proxy::start(&replicas[1], "node-a", &[WorkloadSpec::new("web", "default", "web", "10.9.2.1")]);
    proxy.wait_ready();

    // One member down: a quorum is left, everything works.
    etcd.kill(2);
    replicas[0].apply(&policy("one-down"));
    proxy.wait_config("the policy applied with one etcd member down", |d| d.to_string().contains("one-down"));
    assert_eq!(replicas[0].readiness(), 200);

    // Two down: no quorum. Writes are refused with the reason, at the replica.
    etcd.kill(1);
    let refused = wait_for("a write to be refused", Duration::from_secs(30), || {
        let out = replicas[0].ctl_stdin(&["apply", "-f", "-"], Some(&policy("no-quorum")));
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    assert!(refused.contains("store unavailable: "), "{refused}");
    wait_for("replica 0 to report not-ready", Duration::from_secs(30), || {
        (replicas[0].readiness() == 503).then_some(())
    });
    wait_for("replica 1 to report not-ready", Duration::from_secs(30), || {
        (replicas[1].readiness() == 503).then_some(())
    });
    // Discovery keeps serving from the last snapshot: the connected proxy stays ready and configured, and the
    // replica still answers reads from memory.
    proxy.wait_ready();
    assert!(proxy.config_dump().to_string().contains("one-down"));
    let status = replicas[1].proxy_status();
    assert_eq!(status["proxies"][0]["node"], "node-a", "{status}");
    assert_eq!(status["proxies"][0]["connected"], true, "{status}");

    // Members return: writes succeed again, on their own, and reach the proxy.
    etcd.revive(1);
    etcd.revive(2);
    wait_for("replica 0 to be ready again", Duration::from_secs(30), || (replicas[0].readiness() == 200).then_some(()));
    wait_for("a write to succeed again", Duration::from_secs(30), || {
        replicas[0].ctl_stdin(&["apply", "-f", "-"], Some(&policy("recovered"))).status.success().then_some(())
    });
    proxy.wait_config("the policy applied after recovery", |d| d.to_string().contains("recovered"));
    assert!(!proxy.config_dump().to_string().contains("no-quorum"), "the refused apply left nothing behind");
}

#[test]
fn ca_keys_in_etcd_are_sealed_and_a_second_init_is_refused() {
    let etcd = EtcdCluster::start(3);
    let replicas = ControlPlane::start_replicas(&etcd, 1, &[]);
    // Control: the values exist, and a certificate is stored as it is.
    let cert = etcd.get("/trellis/ca_files/ca/ca-cert.pem").expect("the CA certificate is in etcd");
    assert!(String::from_utf8_lossy(&cert).contains("BEGIN CERTIFICATE"));
    let key = etcd.get("/trellis/ca_files/ca/ca-key.pem").expect("the CA key is in etcd");
    let text = String::from_utf8_lossy(&key);
    assert!(!text.contains("PRIVATE KEY"), "the CA key is readable in etcd: {text}");
    assert!(text.starts_with("trellis-sealed:v1:"), "{text}");
    // The replica's own copy is the plaintext key, private.
    let local = replicas[0].data_dir().join("ca/ca-key.pem");
    assert!(std::fs::read_to_string(&local).unwrap().contains("PRIVATE KEY"));

    // A second init against the same etcd refuses, before writing anything, and says why.
    let dir = tempfile::tempdir().unwrap();
    let store_args = trellis_tests::etcd_store_args(&etcd);
    let second = Command::new(bin("trellis-control"))
        .args(["init", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(&store_args)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already holds a mesh"), "{stderr}");
    assert!(!dir.path().join("d").exists(), "nothing written by the refused init");

    // A KEK readable by others is refused, naming the file.
    let loose = dir.path().join("loose-kek");
    std::fs::write(&loose, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut args = store_args.clone();
    *args.last_mut().unwrap() = loose.display().to_string();
    let refused = Command::new(bin("trellis-control"))
        .args(["init", "--data-dir"])
        .arg(dir.path().join("e"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains(&loose.display().to_string()), "{stderr}");
    assert!(stderr.contains("0600"), "{stderr}");
}

/// The control-plane addresses for a proxy of replica `first`: its replica, then the others in order.
fn addresses_from(replicas: &[ControlPlane], first: usize) -> Vec<String> {
    (0..replicas.len()).map(|k| replicas[(first + k) % replicas.len()].addr.to_string()).collect()
}

/// proxy-status through `cp`: node -> (replica, connected). Panics if a node is listed twice.
fn listed(cp: &ControlPlane) -> std::collections::BTreeMap<String, (String, bool)> {
    let status = cp.proxy_status();
    let mut out = std::collections::BTreeMap::new();
    for p in status["proxies"].as_array().expect("proxies") {
        let node = p["node"].as_str().unwrap().to_owned();
        let entry = (p["replica"].as_str().unwrap_or_default().to_owned(), p["connected"] == true);
        assert!(out.insert(node.clone(), entry).is_none(), "{node} listed twice: {status}");
    }
    out
}

/// `trellisctl proxy-status` through any replica lists every proxy of the mesh with the replica holding its stream
/// (each replica publishes its proxies' status to etcd under a lease). A replica killed with SIGKILL: its proxies
/// fail over and show at their new replica; its own entries go when its lease expires; no proxy is ever listed
/// twice.
#[test]
fn proxy_status_through_any_replica_lists_every_proxy_at_its_replica() {
    let etcd = EtcdCluster::start(3);
    let mut replicas = ControlPlane::start_replicas(&etcd, 3, &[]);
    let mut proxies = Vec::new();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..6 {
        let r = i % 3;
        let node = format!("node-{i}");
        let spec = WorkloadSpec::new(&format!("web-{i}"), "default", "web", &format!("10.9.3.{}", i + 1));
        let options = ProxyOptions { control_plane_addresses: addresses_from(&replicas, r), ..Default::default() };
        proxies.push(Proxy::start_with(&replicas[r], &node, &[spec], options));
        expected.insert(node, (format!("replica-{r}"), true));
    }
    for proxy in &proxies {
        proxy.wait_ready();
    }
    let started = std::time::Instant::now();
    for (i, cp) in replicas.iter().enumerate() {
        wait_for(&format!("replica {i} to list every proxy at its replica"), Duration::from_secs(30), || {
            (listed(cp) == expected).then_some(())
        });
    }
    println!("every replica listed the 6 proxies of 3 replicas after {:?}", started.elapsed());
    // Control: the status is in etcd, under each replica's name: its proxies, grouped in buckets (one key per
    // bucket, `_proxies-NN`, outside the followed tables' range), and the root it serves under (`_serving`, which
    // a root rotation waits on).
    let keys = etcd.keys("/trellis/_status/");
    for r in 0..3 {
        let prefix = format!("/trellis/_status/replica-{r}/");
        assert!(keys.contains(&format!("{prefix}_serving")), "{keys:?}");
        let nodes = status_nodes(&etcd, r);
        let mine: Vec<String> =
            expected.iter().filter(|(_, (at, _))| *at == format!("replica-{r}")).map(|(n, _)| n.clone()).collect();
        assert_eq!(nodes, mine, "{keys:?}");
    }
    assert!(etcd.keys("/trellis/status/").is_empty(), "nothing under the old per-proxy keys");

    replicas[0].kill9();
    let killed = std::time::Instant::now();
    // node-0 and node-3 fail over to replica 1 (next in their lists).
    for node in ["node-0", "node-3"] {
        expected.insert(node.to_owned(), ("replica-1".to_owned(), true));
    }
    for (i, cp) in replicas.iter().enumerate().skip(1) {
        wait_for(&format!("replica {i} to list replica 0's proxies at replica 1"), Duration::from_secs(60), || {
            (listed(cp) == expected).then_some(())
        });
    }
    println!("replica 0's proxies listed at replica 1 {:?} after the kill", killed.elapsed());
    wait_for("replica 0's status entries to expire with its lease", Duration::from_secs(60), || {
        let keys = etcd.keys("/trellis/_status/replica-0/");
        // Meanwhile no proxy is listed twice, nor elsewhere than at its live replica.
        assert_eq!(listed(&replicas[2]), expected);
        keys.is_empty().then_some(())
    });
    println!("replica 0's status entries gone {:?} after the kill", killed.elapsed());
    for cp in &replicas[1..] {
        assert_eq!(listed(cp), expected, "after the lease expired");
    }
    assert_eq!(status_nodes(&etcd, 1), ["node-0", "node-1", "node-3", "node-4"], "replica 1's buckets");
    // Writes are per changed entry, batched once a second: a handful per proxy over the whole test.
    let (code, metrics) = trellis_tests::http::get(replicas[1].metrics_addr, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    let writes = trellis_tests::prometheus::sum_samples(&metrics, "trellis_proxy_status_writes_total", &[]);
    assert!(writes >= 4.0, "{metrics}");
    let puts = trellis_tests::prometheus::sum_samples(&metrics, "trellis_proxy_status_puts_total", &[]);
    assert!(puts >= 1.0, "{metrics}");
    println!(
        "replica 1 wrote {writes} status entries in {puts} bucket puts in {:?} (4 proxies at the end)",
        started.elapsed()
    );
}

/// The nodes in replica `r`'s status buckets in etcd (`/trellis/_status/replica-R/_proxies-NN`: node to entry).
fn status_nodes(etcd: &EtcdCluster, r: usize) -> Vec<String> {
    let prefix = format!("/trellis/_status/replica-{r}/_proxies-");
    let mut nodes = Vec::new();
    for key in etcd.keys(&prefix) {
        let bucket: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&etcd.get(&key).expect("a bucket's value")).expect("a bucket is a JSON object");
        nodes.extend(bucket.into_iter().map(|(node, _)| node));
    }
    nodes.sort();
    nodes
}

fn ca_status(cp: &ControlPlane) -> serde_json::Value {
    cp.ctl_json(&["ca", "status"])
}

/// Joins a node through `cp` and has it sign a CSR; the leaf, PEM, in `dir/leaf-NAME.pem`.
async fn signed_leaf(cp: &ControlPlane, name: &str, address: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let (token, pin) = cp.token(name, &["default"], &[]);
    let joined = client::join(&cp.addr.to_string(), &pin, &token, name).await.unwrap().expect("join");
    let mut stream = joined
        .discover(hello(vec![workload(&format!("w-{name}"), "default", "web", address)]))
        .await
        .unwrap()
        .expect("stream");
    let (_, der) = csr(&["spiffe://cluster.local/ns/default/sa/web"]);
    let answer = stream.certify(1, der).await;
    assert!(answer.error.is_empty(), "{name}: {}", answer.error);
    let leaf = dir.join(format!("leaf-{name}.pem"));
    std::fs::write(&leaf, pem_encode(&answer.certificate_chain[0])).unwrap();
    leaf
}

fn openssl_verify(root: &std::path::Path, leaf: &std::path::Path) -> std::process::Output {
    Command::new("openssl").args(["verify", "-CAfile"]).arg(root).arg(leaf).output().unwrap()
}

/// A root CA rotation on etcd: started through replica 1, its CA (key sealed with the KEK) and record go to etcd,
/// every replica follows its phases (signs with the new CA from the switch on, trusts what the bundle holds), and
/// the replica driving it, killed with SIGKILL mid-rotation (in the overlap), is replaced by another that completes
/// it. CSRs signed by each replica verify against the new root (and, once retired, not the old one).
#[tokio::test(flavor = "multi_thread")]
async fn a_root_rotation_on_etcd_is_followed_by_every_replica_and_outlives_its_driver() {
    let etcd = EtcdCluster::start(3);
    let mut replicas = ControlPlane::start_replicas(&etcd, 3, &[]);
    let mut proxies = Vec::new();
    for r in 0..3 {
        let spec = WorkloadSpec::new(&format!("web-{r}"), "default", "web", &format!("10.9.4.{}", r + 1));
        let options = ProxyOptions { control_plane_addresses: addresses_from(&replicas, r), ..Default::default() };
        proxies.push(Proxy::start_with(&replicas[r], &format!("node-{r}"), &[spec], options));
    }
    for proxy in &proxies {
        proxy.wait_ready();
    }
    let dir = tempfile::tempdir().unwrap();
    let old_root = dir.path().join("old-root.pem");
    std::fs::write(&old_root, replicas[0].root_pem()).unwrap();

    let started = std::time::Instant::now();
    replicas[1].ctl_ok(&["ca", "rotate", "--detach", "--overlap", "45s"]);
    // The new CA is in etcd, its key sealed.
    let key = etcd.get("/trellis/ca_files/ca-1/ca-key.pem").expect("the new CA key is in etcd");
    assert!(String::from_utf8_lossy(&key).starts_with("trellis-sealed:v1:"));
    for (i, cp) in replicas.iter().enumerate() {
        wait_for(&format!("replica {i} to follow the rotation to its overlap"), Duration::from_secs(90), || {
            (ca_status(cp)["phase"] == "overlap").then_some(())
        });
    }
    println!("prepare and switch through 3 replicas in {:?}", started.elapsed());
    let new_root = replicas[1].data_dir().join("ca-1/root-cert.pem");
    for (i, cp) in replicas.iter().enumerate() {
        // Each replica loaded the new CA from etcd (its own copy in its data dir).
        let copy = std::fs::read_to_string(cp.data_dir().join("ca-1/root-cert.pem")).expect("replica's copy");
        assert_eq!(copy, std::fs::read_to_string(&new_root).unwrap(), "replica {i}");
        let leaf = signed_leaf(cp, &format!("overlap-{i}"), &format!("10.9.5.{}", i + 1), dir.path()).await;
        let verify = openssl_verify(&new_root, &leaf);
        assert!(verify.status.success(), "replica {i}: {}", String::from_utf8_lossy(&verify.stderr));
        // Control: the old root does not verify what the new CA signed.
        assert!(!openssl_verify(&old_root, &leaf).status.success(), "replica {i}");
    }

    // The driver: the replica holding the role in etcd. Killed in the overlap, another one completes it.
    let driver = String::from_utf8(etcd.get("/trellis/_status/_rotation-driver").expect("a driver")).unwrap();
    let killed: usize = driver.strip_prefix("replica-").and_then(|n| n.parse().ok()).expect("a replica name");
    assert_eq!(ca_status(&replicas[killed])["phase"], "overlap", "killed mid-rotation");
    replicas[killed].kill9();
    println!("killed the driver, {driver}, in the overlap");
    let live: Vec<usize> = (0..3).filter(|i| *i != killed).collect();
    // As in rotation.rs: a call may fail while the retire swaps the replica's TLS (printed, not hidden).
    let mut failed = 0;
    wait_for("another replica to complete the rotation", Duration::from_secs(180), || {
        let out = replicas[live[0]].ctl(&["ca", "status", "-o", "json"]);
        if !out.status.success() {
            failed += 1;
            println!("ca status through replica {} failed: {}", live[0], String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (status["phase"] == "done").then_some(())
    });
    println!("ca status calls that failed meanwhile: {failed}");
    let successor = String::from_utf8(etcd.get("/trellis/_status/_rotation-driver").expect("a driver")).unwrap();
    assert_ne!(successor, driver);
    println!("rotation done, completed by {successor}, {:?} after it started", started.elapsed());
    for &i in &live {
        // The replica serves a chain under the new root (its admin.yaml now trusts only that one).
        let status = ca_status(&replicas[i]);
        assert_eq!(status["phase"], "done", "replica {i}");
        assert_eq!(status["roots"].as_array().unwrap().len(), 1, "replica {i}: {status}");
        let leaf = signed_leaf(&replicas[i], &format!("done-{i}"), &format!("10.9.6.{}", i + 1), dir.path()).await;
        let verify = openssl_verify(&new_root, &leaf);
        assert!(verify.status.success(), "replica {i}: {}", String::from_utf8_lossy(&verify.stderr));
        assert!(!openssl_verify(&old_root, &leaf).status.success(), "replica {i}: the old root is retired");
    }
    for proxy in &proxies {
        proxy.wait_ready();
    }
}

/// `trellisctl --config CONFIG ARGS`: (succeeded, stderr).
fn ctl_with(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("trellisctl")).arg("--config").arg(config).args(args).output().expect("trellisctl");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The rotation's phase as etcd holds it (read there, not through a replica's TLS).
fn stored_phase(etcd: &EtcdCluster) -> Option<String> {
    let record: serde_json::Value = serde_json::from_slice(&etcd.get("/trellis/meta/ca_rotation")?).ok()?;
    record["phase"].as_str().map(str::to_owned)
}

/// Right after `trellisctl ca rotate` retires the old root on 3 etcd-backed replicas, admin calls reach EVERY
/// replica: with each replica's own admin.yaml (which that replica refreshes) and with the config the CLI renewed
/// through replica 0, pointed at each replica in turn. The old root leaves only once every replica serves a
/// certificate from the new one, and an admin credential renewed for the switch comes from the new CA even through
/// a replica that had not followed the switch yet. Calls go from the moment etcd records `retire` until after
/// `done` (waiting on the record, never sleeping); any failure fails the test, with the replica's reason.
#[test]
fn admin_calls_reach_every_replica_right_after_a_rotation_on_etcd_retires_the_old_root() {
    let etcd = EtcdCluster::start(3);
    let replicas = ControlPlane::start_replicas(&etcd, 3, &[]);
    let dir = tempfile::tempdir().unwrap();
    // The config `ca rotate` renews (replica 0's), pointed at replica i.
    let cli_config_for = |i: usize| {
        let mut config: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(replicas[0].admin_config()).unwrap()).unwrap();
        config["endpoint"] = replicas[i].addr.to_string().into();
        let path = dir.path().join(format!("cli-{i}.yaml"));
        std::fs::write(&path, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
        path
    };
    let mut calls = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut round = |when: &str| {
        for (i, cp) in replicas.iter().enumerate() {
            let configs = [("its own admin.yaml", cp.admin_config()), ("the CLI's config", cli_config_for(i))];
            for (which, config) in configs {
                for args in [&["ca", "status", "-o", "json"][..], &["proxy-status", "-o", "json"][..]] {
                    calls += 1;
                    let (ok, stderr) = ctl_with(&config, args);
                    if !ok {
                        failures.push(format!("{when}: replica {i} with {which}: trellisctl {args:?}: {stderr}"));
                    }
                }
            }
        }
    };

    let rotate = {
        let config = replicas[0].admin_config();
        std::thread::spawn(move || {
            Command::new(bin("trellisctl"))
                .arg("--config")
                .arg(config)
                .args(["ca", "rotate", "--overlap", "1s", "-o", "json"])
                .output()
                .expect("trellisctl ca rotate")
        })
    };
    wait_for("etcd to record the retire", Duration::from_secs(120), || {
        stored_phase(&etcd).filter(|p| p == "retire" || p == "done")
    });
    let mut rounds = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !rotate.is_finished() {
        assert!(std::time::Instant::now() < deadline, "ca rotate did not finish within 120s of the retire");
        rounds += 1;
        round("after the retire");
    }
    let rotated = rotate.join().unwrap();
    assert!(
        rotated.status.success(),
        "ca rotate: {}{}",
        String::from_utf8_lossy(&rotated.stdout),
        String::from_utf8_lossy(&rotated.stderr)
    );
    assert_eq!(stored_phase(&etcd).as_deref(), Some("done"));
    round("after done");
    println!("{calls} admin calls in {} rounds from the retire on; {} failed", rounds + 1, failures.len());
    assert!(failures.is_empty(), "admin calls failed after the retire:\n{}", failures.join("\n"));
    // Every replica and every config ends under the new root only.
    let new_root = std::fs::read_to_string(replicas[0].data_dir().join("ca-1/root-cert.pem")).unwrap();
    for (i, cp) in replicas.iter().enumerate() {
        let status = ca_status(cp);
        assert_eq!(status["roots"].as_array().unwrap().len(), 1, "replica {i}: {status}");
        // A replica refreshes its admin.yaml once it has followed `done` (the watch wakes its rotation loop), which
        // may be a moment after its CA status says so: wait for the file, bounded.
        for config in [cp.admin_config(), cli_config_for(i)] {
            let bundle = || -> String {
                let config: serde_yaml_ng::Value =
                    serde_yaml_ng::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
                config["caBundle"].as_str().unwrap().trim().to_owned()
            };
            if trellis_tests::poll(Duration::from_secs(30), || (bundle() == new_root.trim()).then_some(())).is_none() {
                assert_eq!(bundle(), new_root.trim(), "replica {i}: {}", config.display());
            }
        }
    }
}
