//! Shared by `trellis-demo` and `trellis-bench`: make sure the mesh binaries exist next to the running one, where the
//! harness (`trellis_tests::bin`) looks for them.

pub mod socks5;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, anyhow, bail};
use trellis_tests::read_log;

pub const MESH_BINARIES: [&str; 4] = ["trellis-control", "trellisctl", "trellis-proxy", "trellis-echo"];

/// `target/<profile>/`, where the harness looks for the mesh binaries.
pub fn profile_dir() -> anyhow::Result<PathBuf> {
    Ok(trellis_tests::profile_dir())
}

/// Unless `no_build`, builds the mesh binaries with the same cargo and profile; then checks that they exist.
pub fn prepare(no_build: bool, say: impl Fn(&str)) -> anyhow::Result<()> {
    let dir = profile_dir()?;
    if !no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(root).arg("build");
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        for name in MESH_BINARIES {
            cmd.args(["--bin", name]);
        }
        let shown: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        say(&format!("building the mesh binaries: cargo {} (in {})", shown.join(" "), root.display()));
        // Cargo reports progress on stderr; keep our stdout for our own output.
        let status = cmd.stdout(Stdio::from(std::io::stderr())).status().with_context(|| {
            format!("running {} (set CARGO to the cargo binary, or pass --no-build)", cargo.to_string_lossy())
        })?;
        if !status.success() {
            bail!("building the mesh binaries failed ({status})");
        }
    }
    let missing: Vec<&str> = MESH_BINARIES.into_iter().filter(|name| !dir.join(name).exists()).collect();
    if !missing.is_empty() {
        bail!(
            "{} missing in {}: build them with the same profile (e.g. `cargo build --workspace{}`)",
            missing.join(", "),
            dir.display(),
            if cfg!(debug_assertions) { "" } else { " --release" }
        );
    }
    Ok(())
}

/// Runs one step; a failure (an error, or a harness panic) becomes an error naming the step, followed by the last
/// lines of `logs`.
pub fn step<T>(what: &str, logs: &[(&str, PathBuf)], f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // the panic's message becomes the error's
    let result = catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    let error = match result {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()),
    };
    let mut message = format!("{what}: {error}");
    for (name, log) in logs {
        let text = read_log(log);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        message.push_str(&format!("\n--- last lines of the {name} log ({}) ---\n{}", log.display(), tail.join("\n")));
    }
    Err(anyhow!(message))
}
