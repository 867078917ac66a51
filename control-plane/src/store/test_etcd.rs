//! Tests only: one real etcd member per test process, on free loopback ports with a temp data dir, stopped when
//! the process exits (a watchdog shell kills it once its parent is gone). Each user takes its own key prefix.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{EtcdOptions, EtcdStore};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local addr").port()
}

fn start() -> String {
    for _attempt in 0..5 {
        let (client, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("trellis-test-etcd-{}-{client}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd temp dir");
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let etcd = format!(
            "etcd --name t --data-dir {data} --listen-client-urls {endpoint} --advertise-client-urls {endpoint} \
             --listen-peer-urls {peer_url} --initial-advertise-peer-urls {peer_url} --initial-cluster t={peer_url} \
             --max-txn-ops 100000 --logger zap --log-level error",
            data = dir.join("data").display()
        );
        // The watchdog: etcd lives as long as this test process.
        let script = format!(
            "{etcd} 2>{log} & pid=$!; while kill -0 {parent} 2>/dev/null && kill -0 $pid 2>/dev/null; do sleep 0.5; done; \
             kill $pid; wait $pid 2>/dev/null; rm -rf {dir}",
            log = dir.join("etcd.log").display(),
            parent = std::process::id(),
            dir = dir.display()
        );
        // Not waited for: it ends after this process does.
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting etcd (Debian package etcd-server)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let options = EtcdOptions { endpoints: vec![endpoint.clone()], prefix: "/probe/".into() };
            if EtcdStore::connect(&options).is_ok() {
                return endpoint;
            }
            // etcd gone (a port taken between our probe and its bind): try other ports.
            if std::fs::read_to_string(dir.join("etcd.log")).is_ok_and(|log| log.contains("address already in use")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("etcd did not start (is the Debian package etcd-server installed?)");
}

/// Connection options for a fresh prefix on this process's etcd.
pub(crate) fn options() -> EtcdOptions {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let endpoint = ENDPOINT.get_or_init(start).clone();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    EtcdOptions { endpoints: vec![endpoint], prefix: format!("/test-{}-{n}/", std::process::id()) }
}

/// Whether this run puts the in-process mesh tests on etcd (`TRELLIS_TEST_STORE=etcd`).
pub(crate) fn requested() -> bool {
    std::env::var("TRELLIS_TEST_STORE").is_ok_and(|v| v == "etcd")
}
