//! A real Prometheus server (Debian's `prometheus`), scraping given targets every second, queried through its
//! HTTP API. Stopped on drop.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

use crate::{free_addr, http, read_log, wait_for, wait_listening};

pub struct Prometheus {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Child,
}

impl Prometheus {
    /// Starts Prometheus with one scrape job per `(job, target)`; panics (never skips) if it is not installed.
    pub fn start(targets: &[(&str, SocketAddr)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let jobs: String = targets
            .iter()
            .map(|(job, addr)| format!("  - job_name: {job}\n    static_configs: [{{targets: ['{addr}']}}]\n"))
            .collect();
        let config = format!("global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n{jobs}");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = free_addr();
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus: install Debian's `prometheus` package (.ci/run does)");
        wait_listening(addr, &mut child, &log_path);
        let prometheus = Self { addr, dir, child };
        wait_for("Prometheus ready", Duration::from_secs(30), || {
            http::get(addr, "/-/ready").ok().filter(|(s, _)| *s == 200).map(|_| ())
        });
        prometheus
    }

    /// Runs an instant query; panics if Prometheus rejects it (invalid PromQL).
    pub fn query(&self, expr: &str) -> serde_json::Value {
        let path = format!("/api/v1/query?query={}", http::encode_query_value(expr));
        let (status, body) = http::get(self.addr, &path).expect("Prometheus query API");
        assert_eq!(status, 200, "Prometheus rejected {expr}: {body}");
        serde_json::from_str(&body).expect("Prometheus JSON")
    }

    /// The value of an instant query that returns one sample, or None (no sample yet, or several).
    pub fn query_value(&self, expr: &str) -> Option<f64> {
        let json = self.query(expr);
        let result = json["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `expr` evaluates to exactly `expected`; panics with the last value seen.
    pub fn wait_value(&self, expr: &str, expected: f64) {
        let mut last = None;
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(&format!("Prometheus: {expr} == {expected}"), Duration::from_secs(30), || {
                last = self.query_value(expr);
                (last == Some(expected)).then_some(())
            })
        }));
        if found.is_err() {
            panic!("{expr}: expected {expected}, last value {last:?}; prometheus log:\n{}", self.log());
        }
    }

    /// Every scrape target healthy.
    pub fn wait_targets_up(&self, count: usize) {
        self.wait_value("count(up == 1)", count as f64);
    }

    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("prometheus.log"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a `/metrics` text: the sum of the samples of `name` whose labels include every one of `labels` (0 if none: a counter never set).
pub fn sum_samples(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .map(|l| l.rsplit_once(' ').expect("sample value").1.parse::<f64>().expect("number"))
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}
