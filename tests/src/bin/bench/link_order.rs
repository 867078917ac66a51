//! Whether the `trellis-proxy` measured was linked in the order `data-plane/trellis-proxy.order` names (see
//! data-plane/build.rs). The list names functions as the linker knows them, and fat LTO gives many of them a number
//! (`name.1234`) that a change anywhere in the code can shift: a stale list still links, in the linker's own order
//! for what it no longer names, and an idle proxy then maps more of its binary (BENCHMARKS.md, "Idle RSS: a smaller
//! binary, and its start-up code together"). So the suite says how much of the list the binary still has.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, ensure};

/// The list, as the checkout the benchmark was built from has it.
const LIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data-plane/trellis-proxy.order");

/// A line for the report's notes.
pub fn note(proxy: &Path) -> String {
    match coverage(proxy, Path::new(LIST)) {
        Ok((found, listed)) => format!(
            "link order of {}: {found} of the {listed} functions data-plane/trellis-proxy.order lists are in it{}",
            proxy.display(),
            if found * 20 < listed * 19 { " (a stale list: regenerate it with bench/link-order.sh)" } else { "" }
        ),
        Err(e) => format!("link order of {}: not checked ({e:#})", proxy.display()),
    }
}

/// How many of the functions `list` names `binary` defines, and how many it names.
fn coverage(binary: &Path, list: &Path) -> anyhow::Result<(usize, usize)> {
    let text = std::fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    let listed: HashSet<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let out = Command::new("nm").arg("--defined-only").arg(binary).output().context("running nm")?;
    ensure!(out.status.success(), "nm {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr).trim());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // `nm` lines: address, type, name.
    let defined: HashSet<&str> = stdout.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    Ok((listed.iter().filter(|name| defined.contains(*name)).count(), listed.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_listed_functions_the_binary_defines_and_not_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("order");
        // `main` is defined in this test binary; the other name in no binary.
        std::fs::write(&list, "main\n_RNvCs0_9no_such_fn\n\n").unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(coverage(&exe, &list).unwrap(), (1, 2));
        let stale = note(&exe);
        assert!(stale.contains("functions data-plane/trellis-proxy.order lists are in it"), "{stale}");
        assert!(stale.contains("a stale list"), "this test binary has few of the proxy's functions: {stale}");
    }

    #[test]
    fn a_missing_list_or_binary_is_said_not_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let err = coverage(&exe, &dir.path().join("none")).unwrap_err();
        assert!(format!("{err:#}").contains("reading"), "{err:#}");
        let list = dir.path().join("order");
        std::fs::write(&list, "main\n").unwrap();
        let err = coverage(&dir.path().join("no-binary"), &list).unwrap_err();
        assert!(format!("{err:#}").starts_with("nm "), "{err:#}");
    }
}
