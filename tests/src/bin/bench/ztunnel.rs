//! Istio's ztunnel as a contender (`trellis-bench all --ztunnel PATH`): a binary the user built outside the
//! repository, run in dedicated mode on a simulated host (network namespace) with its own fake CA and a static
//! local config naming the bench's two workloads, as its Development.md runs it locally (`FAKE_CA=true`,
//! `XDS_ADDRESS=""`, `LOCAL_XDS_PATH=...`, `PROXY_MODE=dedicated`, `PROXY_WORKLOAD_INFO=ns/name/sa`). ztunnel binds
//! Istio's fixed ports (15001, 15006, 15008, 15021, ...) on every address, so each instance needs a host of its own.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use trellis_tests::netns::{self, Host};

/// ztunnel's readiness port (`/healthz/ready`) and its captured-outbound and HBONE ports.
const READY_PORT: u16 = 15021;
pub const OUTBOUND_PORT: u16 = 15001;
pub const HBONE_PORT: u16 = 15008;

/// One workload of the static config; its identity is `spiffe://cluster.local/ns/<namespace>/sa/<service_account>`.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub namespace: &'static str,
    pub service_account: &'static str,
    pub ip: Ipv4Addr,
}

/// The `LOCAL_XDS_PATH` file: the workloads, both HBONE-capable (so traffic between them is tunnelled), no services
/// and no policies (ztunnel requires each workload's `services` map, even empty).
pub fn local_config(workloads: &[Workload]) -> String {
    let mut yaml = "workloads:\n".to_owned();
    for w in workloads {
        yaml.push_str(&format!(
            "- uid: bench//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  \
             workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {name}-node\n  network: \"\"\n  services: {{}}\n",
            ns = w.namespace,
            name = w.name,
            sa = w.service_account,
            ip = w.ip,
        ));
    }
    yaml.push_str("policies: []\nservices: []\n");
    yaml
}

/// A ztunnel process on a host, killed on drop.
pub struct Ztunnel {
    pub log: PathBuf,
    child: Child,
}

impl Ztunnel {
    /// Starts `binary` on `host` as `workload`'s dedicated proxy with the static config in `config`; `worker_threads`
    /// sets `ZTUNNEL_WORKER_THREADS` (else ztunnel's default). Returns once `/healthz/ready` answers 200.
    pub fn start(
        binary: &Path,
        host: &Host,
        workload: &Workload,
        config: &Path,
        worker_threads: Option<u64>,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = netns::command(Some(&host.ns), binary);
        command
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", config)
            .env("PROXY_MODE", "dedicated")
            .env(
                "PROXY_WORKLOAD_INFO",
                format!("{}/{}/{}", workload.namespace, workload.name, workload.service_account),
            )
            // The hosts have IPv4 addresses only; listeners bind 0.0.0.0 as Trellis's do.
            .env("IPV6_ENABLED", "false")
            // The original source towards the server, as ztunnel does by default where it may (unset: best effort,
            // which as root succeeds) and as Trellis does (`capture.preserveSourceAddress`): its dial to the servers
            // is transparent, from the client's address. `true` makes ztunnel fail rather than fall back. The
            // servers' answers come back to it by istio-cni's rules (`install_return_path`).
            .env("ENABLE_ORIG_SRC", "true")
            // istio-cni's mark for ztunnel's own sockets (ztunnel's default in shared mode; dedicated mode sets
            // none unless told), which `return_rules` keys on.
            .env("PACKET_MARK", PACKET_MARK.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if let Some(n) = worker_threads {
            command.env("ZTUNNEL_WORKER_THREADS", n.to_string());
        }
        let child = command.spawn().with_context(|| format!("starting {}", binary.display()))?;
        let mut ztunnel = Self { log, child };
        ztunnel.wait_ready(host)?;
        Ok(ztunnel)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self, host: &Host) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = SocketAddr::from(([127, 0, 0, 1], READY_PORT));
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("ztunnel on {} exited with {status}:\n{}", host.ns, trellis_tests::read_log(&self.log));
            }
            match trellis_tests::http::get_in(Some(&host.ns), ready, "/healthz/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("HTTP {code}: {}", body.trim()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                bail!("ztunnel on {} not ready after 30 s ({last}):\n{}", host.ns, trellis_tests::read_log(&self.log));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The redirect a deployment puts in front of a dedicated ztunnel: every new outgoing TCP connection of the host,
/// except to loopback and ztunnel's own HBONE connections, goes to its outbound listener (the shape of Trellis's
/// own `run --capture` output chain). Installed with `nft -f -` in the host's namespace; the namespace's removal
/// removes it.
pub fn redirect_rules() -> String {
    format!(
        "table inet ztunnel_bench {{\n\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\
         \t\tip daddr 127.0.0.0/8 return\n\t\ttcp dport {HBONE_PORT} return\n\
         \t\tmeta l4proto tcp redirect to :{OUTBOUND_PORT}\n\t}}\n}}\n"
    )
}

/// ztunnel's socket mark (`PACKET_MARK`; istio-cni's `0x539`) and the return path's mark and table (istio-cni's
/// in-pod `0x111` and table 100).
const PACKET_MARK: u32 = 1337;
const RETURN_MARK: u32 = 0x111;
const RETURN_TABLE: u32 = 100;

/// The return path of ztunnel's original-source dials, on the server's host, the rules istio-cni installs for it in
/// nftables form (the shape of Trellis's own `preserve_source` chain): a connection that ztunnel's marked socket opens
/// is marked in conntrack, and every packet in its reply direction (the servers' answers, addressed to the client's
/// address, which the host routes out of its interface) gets the return mark, which [`return_route_commands`]
/// routes to loopback, where ztunnel's transparent socket takes it.
pub fn return_rules() -> String {
    format!(
        "table inet ztunnel_bench_return {{\n\tchain output {{\n\t\ttype route hook output priority mangle; policy accept;\n\
         \t\tmeta mark {PACKET_MARK:#x} ct state new ct mark set {RETURN_MARK:#x}\n\
         \t\tct direction reply ct mark {RETURN_MARK:#x} meta mark set {RETURN_MARK:#x}\n\t}}\n}}\n"
    )
}

/// The `ip` invocations of the return path: every packet with the return mark is local (istio-cni: `ip rule add
/// fwmark 0x111/0xfff pref 32764 lookup 100`, `ip route add local 0.0.0.0/0 dev lo table 100`).
pub fn return_route_commands() -> [Vec<String>; 2] {
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (mark, table) = (format!("{RETURN_MARK:#x}"), RETURN_TABLE.to_string());
    [
        words(&["-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &table]),
        words(&["-4", "rule", "add", "fwmark", &mark, "lookup", &table, "priority", "32764"]),
    ]
}

/// Installs the return path of ztunnel's original-source dials in namespace `ns` ([`return_rules`],
/// [`return_route_commands`]); the namespace's removal removes it.
pub fn install_return_path(ns: &str) -> anyhow::Result<()> {
    install_rules(ns, &return_rules())?;
    for args in return_route_commands() {
        let out = netns::command(Some(ns), "ip").args(&args).output().context("running ip")?;
        if !out.status.success() {
            bail!("ip {} in {ns} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// `nft -f -` with `rules` in namespace `ns`.
pub fn install_rules(ns: &str, rules: &str) -> anyhow::Result<()> {
    let mut child = netns::command(Some(ns), "nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (Debian: apt-get install nftables)")?;
    child.stdin.take().context("nft stdin")?.write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft -f - in {ns} failed: {}\n{rules}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `ztunnel --version`'s first line, or why there is none.
pub fn version(binary: &Path) -> String {
    match std::process::Command::new(binary).arg("version").output() {
        Ok(out) => {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            text.lines().find(|l| !l.trim().is_empty()).unwrap_or("(no output)").trim().to_owned()
        }
        Err(e) => format!("{}: {e}", binary.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_config_names_both_workloads_as_hbone_with_their_identity() {
        let w = |name, sa, ip: [u8; 4]| Workload { name, namespace: "bench", service_account: sa, ip: ip.into() };
        let yaml = local_config(&[w("client", "client", [10, 0, 0, 1]), w("servers", "servers", [10, 0, 0, 2])]);
        let doc: serde_json::Value = serde_yaml_ng::from_str(&yaml).expect("YAML");
        let workloads = doc["workloads"].as_array().expect("workloads");
        assert_eq!(workloads.len(), 2, "{yaml}");
        assert_eq!(workloads[1]["name"], "servers");
        assert_eq!(workloads[1]["namespace"], "bench");
        assert_eq!(workloads[1]["serviceAccount"], "servers");
        assert_eq!(workloads[1]["workloadIps"], serde_json::json!(["10.0.0.2"]));
        assert_eq!(workloads[1]["protocol"], "HBONE");
        assert_eq!(workloads[1]["services"], serde_json::json!({}), "ztunnel requires the field");
        assert_eq!(doc["policies"], serde_json::json!([]));
    }

    #[test]
    fn the_return_path_marks_the_replies_of_ztunnels_own_connections_and_routes_them_locally() {
        let rules = return_rules();
        let lines: Vec<&str> = rules.lines().map(str::trim).collect();
        assert!(lines.contains(&"type route hook output priority mangle; policy accept;"), "{rules}");
        assert!(lines.contains(&"meta mark 0x539 ct state new ct mark set 0x111"), "{rules}");
        assert!(lines.contains(&"ct direction reply ct mark 0x111 meta mark set 0x111"), "{rules}");
        let [route, rule] = return_route_commands();
        assert_eq!(route.join(" "), "-4 route replace local 0.0.0.0/0 dev lo table 100");
        assert_eq!(rule.join(" "), "-4 rule add fwmark 0x111 lookup 100 priority 32764");
    }

    #[test]
    fn the_redirect_spares_loopback_and_hbone_and_sends_the_rest_to_15001() {
        let rules = redirect_rules();
        let lines: Vec<&str> = rules.lines().map(str::trim).collect();
        let at = |needle: &str| lines.iter().position(|l| *l == needle).unwrap_or_else(|| panic!("{needle}: {rules}"));
        // Order matters: the exceptions come before the redirect.
        assert!(at("ip daddr 127.0.0.0/8 return") < at("meta l4proto tcp redirect to :15001"));
        assert!(at("tcp dport 15008 return") < at("meta l4proto tcp redirect to :15001"));
        assert!(rules.contains("type nat hook output priority -100"), "{rules}");
    }
}
