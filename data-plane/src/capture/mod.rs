//! Transparent capture with nftables: [`rules`] renders the ruleset (pure), this module applies it with the `nft`
//! tool, one atomic transaction per change. `nft` was chosen over raw netlink: it is on every distribution that has
//! nftables, its error messages name the offending rule, and the rules an operator sees (`nft list table inet
//! trellis`) are the ones we wrote.

pub mod rules;

use std::io::Write;
use std::process::{Command, Stdio};

pub use rules::{CaptureSpec, ReturnRoute, SpecError, TABLE};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("`nft` was not found on PATH: install nftables (Debian/Ubuntu: apt-get install nftables)")]
    NftMissing,
    #[error("nft was refused (it needs CAP_NET_ADMIN in the network namespace: run as root): {0}")]
    Permission(String),
    #[error("running nft: {0}")]
    Spawn(std::io::Error),
    #[error("the kernel lacks {missing}: nft said: {stderr}")]
    KernelFeature { missing: &'static str, stderr: String },
    #[error("nft -f - ({what}) failed: {stderr}")]
    Nft { what: &'static str, stderr: String },
    #[error(transparent)]
    Spec(#[from] SpecError),
}

/// Why the return route for preserved source addresses could not be installed (capture goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("`ip` (iproute2) was not found on PATH: install iproute2")]
    IpMissing,
    #[error("running ip: {0}")]
    Spawn(std::io::Error),
    #[error("`ip {command}` failed: {stderr}")]
    Ip { command: String, stderr: String },
}

/// What [`install`] did.
#[derive(Debug)]
pub struct Installed {
    /// `Some` when `capture.preserveSourceAddress` is on but its return route could not be installed: the proxy
    /// dials workloads from its own address instead (today's behaviour), and says why.
    pub return_route_failed: Option<RouteError>,
}

impl Installed {
    /// Whether the proxy may dial workloads from their clients' addresses.
    pub fn preserves_source(&self, spec: &CaptureSpec) -> bool {
        spec.preserve_source.is_some() && self.return_route_failed.is_none()
    }
}

/// Installs the rules, replacing any previous copy of the table in the same transaction, then the return route
/// (`capture.preserveSourceAddress`). A refused return route is not an error: see [`Installed`].
pub fn install(spec: &CaptureSpec) -> Result<Installed, CaptureError> {
    match nft_stdin(&spec.render()) {
        Ok(()) => {}
        Err(CaptureError::Nft { stderr, .. }) => {
            return Err(diagnose().unwrap_or(CaptureError::Nft { what: "install", stderr }));
        }
        Err(e) => return Err(e),
    }
    let return_route_failed = spec.preserve_source.and_then(|route| install_route(&route).err());
    if return_route_failed.is_some()
        && let Some(route) = spec.preserve_source
    {
        remove_route(&route);
    }
    Ok(Installed { return_route_failed })
}

/// Removes the table (succeeds when it was not there) and the return route when `route` is given.
pub fn uninstall(route: Option<ReturnRoute>) -> Result<(), CaptureError> {
    if let Some(route) = route {
        remove_route(&route);
    }
    nft_stdin(&rules::remove_transaction()).map_err(|e| match e {
        CaptureError::Nft { stderr, .. } => CaptureError::Nft { what: "uninstall", stderr },
        e => e,
    })
}

fn install_route(route: &ReturnRoute) -> Result<(), RouteError> {
    // Removed first, so that a leftover rule from a crash is replaced instead of doubled.
    remove_route(route);
    route.ip_commands().iter().try_for_each(|args| ip(args))
}

/// Best effort: each command fails harmlessly when there is nothing to remove.
fn remove_route(route: &ReturnRoute) {
    for args in route.remove_commands() {
        // `rule del` removes one matching rule per call: repeat until none is left (bounded, in case it never says
        // so).
        for _ in 0..16 {
            if ip(&args).is_err() || args[1] != "rule" {
                break;
            }
        }
    }
}

fn ip(args: &[String]) -> Result<(), RouteError> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound { RouteError::IpMissing } else { RouteError::Spawn(e) }
    })?;
    match out.status.success() {
        true => Ok(()),
        false => Err(RouteError::Ip {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

/// The installed table as nft lists it, or `None` when it is not installed.
pub fn status() -> Result<Option<String>, CaptureError> {
    let out = nft().args(["list", "table", "inet", TABLE]).output().map_err(spawn_error)?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No such file or directory") {
        return Ok(None);
    }
    Err(CaptureError::Nft { what: "status", stderr: stderr.trim().to_owned() })
}

fn nft() -> Command {
    let mut cmd = Command::new("nft");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn spawn_error(e: std::io::Error) -> CaptureError {
    if e.kind() == std::io::ErrorKind::NotFound { CaptureError::NftMissing } else { CaptureError::Spawn(e) }
}

/// Runs `nft -f -` with `script` as one transaction.
fn nft_stdin(script: &str) -> Result<(), CaptureError> {
    let mut child = nft().args(["-f", "-"]).spawn().map_err(spawn_error)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(script.as_bytes()).map_err(CaptureError::Spawn)?;
    drop(stdin);
    let out = child.wait_with_output().map_err(CaptureError::Spawn)?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    match out.status.success() {
        true => Ok(()),
        false if stderr.contains("Operation not permitted") => Err(CaptureError::Permission(stderr)),
        false => Err(CaptureError::Nft { what: "apply", stderr }),
    }
}

/// After a failed install: finds the first kernel feature the rules need that is missing, with a throwaway table.
fn diagnose() -> Option<CaptureError> {
    const PROBE: &str = "trellis_probe";
    let steps: [(&str, &'static str); 3] = [
        ("", "nf_tables with the inet family (CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET)"),
        (
            "chain c { type nat hook output priority -100; policy accept; }",
            "nftables NAT (CONFIG_NFT_NAT, module nft_chain_nat)",
        ),
        (
            "chain c { type nat hook output priority -100; policy accept; meta mark 0x1 return; meta l4proto tcp redirect to :1; }",
            "the nftables redirect and meta expressions (CONFIG_NFT_REDIR, module nft_redir)",
        ),
    ];
    let mut found = None;
    for (body, missing) in steps {
        let script = format!("add table inet {PROBE}\ndelete table inet {PROBE}\ntable inet {PROBE} {{ {body} }}\n");
        if let Err(CaptureError::Nft { stderr, .. }) = nft_stdin(&script) {
            found = Some(CaptureError::KernelFeature { missing, stderr });
            break;
        }
    }
    let _ = nft_stdin(&format!("add table inet {PROBE}\ndelete table inet {PROBE}\n"));
    found
}

/// `trellis-proxy capture install|uninstall|status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Uninstall,
    Status,
}

/// Runs one operator command; `Ok(false)` for `status` when the rules are not installed.
pub fn command(action: Action, config: &crate::config::Config) -> Result<bool, CaptureError> {
    match action {
        Action::Install => {
            let installed = install(&CaptureSpec::from_config(config)?)?;
            println!("installed nftables table inet {TABLE}");
            if let Some(e) = installed.return_route_failed {
                println!("warning: capture.preserveSourceAddress: return route not installed ({e})");
            }
        }
        Action::Uninstall => {
            uninstall(CaptureSpec::from_config(config)?.preserve_source)?;
            println!("removed nftables table inet {TABLE} (if it was there)");
        }
        Action::Status => match status()? {
            Some(table) => print!("installed:\n{table}"),
            None => {
                println!("not installed (no nftables table inet {TABLE})");
                return Ok(false);
            }
        },
    }
    Ok(true)
}
