//! The shipped examples an operator installs as they are: `examples/systemd/` units pass `systemd-analyze verify`
//! (with the capture drop-in applied), pointing at the binaries this build made.

use std::path::Path;
use std::process::Command;

use trellis_tests::bin;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent")
}

/// Copies `examples/systemd` into a unit dir (the drop-in under `trellis-proxy.service.d/`), with the binaries' install
/// path replaced by this build's, and returns `systemd-analyze verify`'s status and output for the two units.
fn verify_units(edit: impl Fn(&str, String) -> String) -> (bool, String) {
    let source = workspace().join("examples/systemd");
    let dir = tempfile::tempdir().expect("temp dir");
    let dropins = dir.path().join("trellis-proxy.service.d");
    std::fs::create_dir(&dropins).expect("drop-in dir");
    for (name, target) in [
        ("trellis-control.service", dir.path().join("trellis-control.service")),
        ("trellis-proxy.service", dir.path().join("trellis-proxy.service")),
        ("trellis-proxy-capture.conf", dropins.join("capture.conf")),
    ] {
        let text = std::fs::read_to_string(source.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
        let text = text
            .replace("/usr/local/bin/trellis-control", bin("trellis-control").to_str().expect("utf-8 path"))
            .replace("/usr/local/bin/trellis-proxy", bin("trellis-proxy").to_str().expect("utf-8 path"));
        std::fs::write(&target, edit(name, text)).expect("writing unit");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "trellis-control.service", "trellis-proxy.service"])
        .current_dir(dir.path())
        // The unit dir first, then the built-in search path (the trailing colon).
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed: scripts/test installs it");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn systemd_units_verify_clean() {
    let (ok, output) = verify_units(|_, text| text);
    assert!(ok && output.trim().is_empty(), "systemd-analyze verify complained:\n{output}");
}

/// Control case: the same path reports a bad key in the drop-in, so the clean result above means something.
#[test]
fn systemd_verify_catches_a_bad_drop_in() {
    let (_, output) =
        verify_units(|name, text| if name == "trellis-proxy-capture.conf" { text + "NoSuchKey=1\n" } else { text });
    assert!(output.contains("Unknown key") && output.contains("NoSuchKey"), "expected a complaint, got:\n{output}");
}
