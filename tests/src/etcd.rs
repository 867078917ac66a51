//! A real etcd cluster for the HA tests (Debian's `etcd-server`): N members on loopback ports, data in a temp dir,
//! killed on drop. etcd cannot bind port 0 and report it, so ports come from [`crate::free_port`] (below the
//! ephemeral range, so no client socket takes one meanwhile); if a member still finds its port taken, the whole
//! cluster starts again on other ports.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, poll, read_log};

struct Member {
    name: String,
    client: String,
    peer: String,
    child: Option<Child>,
}

pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader and answers writes.
    pub fn start(n: usize) -> Self {
        for _attempt in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let members: Vec<Member> = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client: format!("http://127.0.0.1:{}", free_port()),
                    peer: format!("http://127.0.0.1:{}", free_port()),
                    child: None,
                })
                .collect();
            let mut cluster = Self { dir, members };
            for i in 0..n {
                cluster.spawn(i, "new");
            }
            if cluster.wait_healthy(Duration::from_secs(30)) {
                return cluster;
            }
            let taken = (0..n).any(|i| read_log(&cluster.log(i)).contains("address already in use"));
            assert!(taken, "etcd cluster did not become healthy; logs:\n{}", cluster.logs());
        }
        panic!("etcd: ports kept being taken");
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[i].name))
    }

    fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| format!("--- {} ---\n{}", self.members[i].name, read_log(&self.log(i))))
            .collect()
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial_cluster =
            self.members.iter().map(|m| format!("{}={}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log(i)).expect("etcd log");
        let member = &self.members[i];
        let child = Command::new("etcd")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.dir.path().join(&member.name))
            .args(["--listen-client-urls", &member.client, "--advertise-client-urls", &member.client])
            .args(["--listen-peer-urls", &member.peer, "--initial-advertise-peer-urls", &member.peer])
            .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", state])
            .args(["--initial-cluster-token", "trellis-test"])
            // Trellis commits an `apply` in one transaction, with a compare per key it read.
            .args(["--max-txn-ops", "100000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian package etcd-server)");
        self.members[i].child = Some(child);
    }

    /// Whether a write through every running member succeeds (a quorum answers).
    fn wait_healthy(&mut self, timeout: Duration) -> bool {
        poll(timeout, || {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(child) = m.child.as_mut()
                    && let Ok(Some(_)) = child.try_wait()
                {
                    m.child = None;
                    let _ = i;
                    return Some(false);
                }
            }
            let running: Vec<String> =
                self.members.iter().filter(|m| m.child.is_some()).map(|m| m.client.clone()).collect();
            let ok = running.iter().all(|endpoint| {
                Command::new("etcdctl")
                    .args(["--endpoints", endpoint, "--command-timeout", "2s", "put", "/health-probe", "1"])
                    .env("ETCDCTL_API", "3")
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            ok.then_some(true)
        })
        .unwrap_or(false)
    }

    /// Client URLs of every member, comma-separated (the form of `--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| m.client.clone()).collect::<Vec<_>>().join(",")
    }

    /// The process ids of the running members (the benchmarks read their CPU time from /proc).
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().filter_map(|m| m.child.as_ref().map(Child::id)).collect()
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again (its data dir kept) and waits until the cluster answers writes.
    pub fn revive(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        self.spawn(i, "existing");
        assert!(self.wait_healthy(Duration::from_secs(30)), "etcd did not recover; logs:\n{}", self.logs());
    }

    /// `etcdctl get KEY` through the first running member: the raw value, if any.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let endpoint = &self.members.iter().find(|m| m.child.is_some()).expect("a running member").client;
        let out = Command::new("etcdctl")
            .args(["--endpoints", endpoint, "get", key, "--print-value-only"])
            .env("ETCDCTL_API", "3")
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "etcdctl get {key}: {}", String::from_utf8_lossy(&out.stderr));
        let mut value = out.stdout;
        // etcdctl ends the value with a newline.
        if value.last() == Some(&b'\n') {
            value.pop();
        }
        (!value.is_empty()).then_some(value)
    }
}

impl EtcdCluster {
    /// `etcdctl get --prefix --keys-only` through the first running member: the keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let endpoint = &self.members.iter().find(|m| m.child.is_some()).expect("a running member").client;
        let out = Command::new("etcdctl")
            .args(["--endpoints", endpoint, "get", prefix, "--prefix", "--keys-only"])
            .env("ETCDCTL_API", "3")
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "etcdctl get --prefix {prefix}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!("--- etcd logs ---\n{}", self.logs());
        }
    }
}
