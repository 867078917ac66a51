//! The benchmark suite's smoke run (`trellis-bench all --smoke`): every scenario against every contender at tiny
//! sizes, to prove the suite still works. It asserts what was measured and printed, never how fast: no timing
//! thresholds. Needs stunnel4 and HAProxy (`.ci/run` installs them; the suite installs them itself as root).

#![forbid(unsafe_code)]

use std::process::Command;

use trellis_tests::bin;

const CONTENDERS: [&str; 4] = ["direct", "Trellis", "stunnel", "HAProxy"];

/// The text from `heading` to the next heading of the same or a higher level.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text.find(heading).unwrap_or_else(|| panic!("no {heading:?} in the output:\n{text}"));
    let rest = &text[start + heading.len()..];
    let end = rest.find("\n### ").or_else(|| rest.find("\n## ")).unwrap_or(rest.len());
    &rest[..end]
}

/// The table row whose first cell is `name`, as its cells.
fn row<'a>(section: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("| {name} |");
    let line =
        section.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no row {name:?} in:\n{section}"));
    line.trim_matches('|').split(" | ").map(str::trim).collect()
}

/// A measured cell: a number first (e.g. "1,234 (1,200..1,300)" or "+56"), not "–" or NaN.
fn assert_measured(cell: &str, what: &str) {
    let first = cell.trim_start_matches(['+', '-']).chars().next();
    assert!(first.is_some_and(|c| c.is_ascii_digit()), "{what}: {cell:?} is not a measurement");
    assert!(!cell.contains("NaN") && !cell.contains("inf"), "{what}: {cell:?}");
}

#[test]
fn smoke_run_measures_every_scenario_for_every_contender_and_leaves_benchmarks_md_alone() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let before = std::fs::read_to_string(root.join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    let out = Command::new(bin("trellis-bench")).args(["all", "--smoke", "--no-build"]).output().expect("run");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "trellis-bench all --smoke failed ({}):\n{stdout}\n{stderr}", out.status);

    let targets = section(&stdout, "## Targets");
    let verdicts = targets.lines().filter(|l| l.ends_with("| pass |") || l.ends_with("| **FAIL** |")).count();
    assert_eq!(verdicts, 11, "every target gets a verdict:\n{targets}");
    // A figure without samples is printed "–" (or NaN where a ratio is taken).
    assert!(!targets.contains('–') && !targets.contains("NaN"), "every target's figures are measured:\n{targets}");

    let bulk = section(&stdout, "### 1. Bulk throughput");
    let rate = section(&stdout, "### 2. Latency at a fixed request rate");
    let churn = section(&stdout, "### 3. Connection churn");
    for name in CONTENDERS {
        let cells = row(bulk, name);
        assert_measured(cells[1], &format!("bulk 1 stream, {name}"));
        assert_measured(cells[3], &format!("bulk 8 streams, {name}"));
        assert_measured(row(churn, name)[1], &format!("churn, {name}"));
        assert_measured(row(churn, name)[4], &format!("churn p99, {name}"));
    }
    for rate_heading in ["**1000 requests/s**", "**4000 requests/s**"] {
        let table = &rate[rate.find(rate_heading).unwrap_or_else(|| panic!("no {rate_heading}:\n{rate}"))..];
        for name in CONTENDERS {
            let cells = row(table, name);
            for (i, p) in ["p50", "p90", "p99", "p99.9"].into_iter().enumerate() {
                assert_measured(cells[1 + i], &format!("{rate_heading} {p}, {name}"));
            }
            if name != "direct" {
                assert_measured(cells[6], &format!("{rate_heading} added p99, {name}"));
            }
        }
    }
    let cost = section(&stdout, "### 4. Cost");
    for name in &CONTENDERS[1..] {
        let cells = row(cost, name);
        let columns = [
            "CPU at the lower rate",
            "CPU at the higher rate",
            "idle RSS",
            "held",
            "RSS with idle connections",
            "per conn",
        ];
        for (i, what) in columns.into_iter().enumerate() {
            assert_measured(cells[1 + i], &format!("{what}, {name}"));
        }
        // The smoke plan asks for 50 idle connections, which every contender can hold.
        assert_eq!(cells[4], "50", "idle connections held, {name}");
    }
    let control = section(&stdout, "### 5. Control plane");
    let acked = row(control, "proxies that ACKed the policy, per round");
    assert!(acked[1].starts_with("20 "), "every simulated proxy ACKed the policy: {acked:?}");
    assert_measured(row(control, "convergence p99 (ms)")[1], "convergence p99");
    assert_measured(row(control, "certificate signings/s, 5 concurrent clients")[1], "signings/s");
    let authz = section(&stdout, "### 6. Policy evaluation");
    assert!(authz.lines().filter(|l| l.starts_with('|')).count() >= 3, "the policy table:\n{authz}");
    assert!(stdout.contains("### Plots"), "{stdout}");

    let after = std::fs::read_to_string(root.join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    assert!(before == after, "--smoke must leave BENCHMARKS.md as it was");
}

/// `trellis-bench load` at a tenth of its size (1,000 concurrent tunnelled connections held 5 s, then 300 new
/// connections/s for 3 s): every connection opened, every echo returned, every burst connection worked (the bench
/// exits 1 otherwise); the figures are printed, never compared with a threshold.
#[test]
fn load_run_at_a_tenth_of_its_size_has_no_failure() {
    let args = ["load", "--connections", "1000", "--hold", "5s", "--burst-rate", "300", "--burst", "3s", "--no-build"];
    let out = Command::new(bin("trellis-bench")).args(args).output().expect("run");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(out.status.success(), "trellis-bench load failed ({}):\n{stdout}\n{stderr}", out.status);
    let table = section(&stdout, "## Load");
    let held = row(table, "1000 concurrent, held 5s echoing 64 B every second");
    assert!(held[1].starts_with("1000 opened in "), "{held:?}");
    assert_eq!(held[2], "0 open, 0 during the hold", "{held:?}");
    assert!(held[3].contains(", 0 bytes lost; failures: none"), "{held:?}");
    let burst = row(table, "burst 300 new connections/s for 3s");
    assert_eq!(burst[1], "900 attempted, 900 worked", "{burst:?}");
    assert_eq!(burst[2], "0", "{burst:?}");
}

/// `trellis-bench rotation` at a tiny size: the simulated proxies answer `RenewNow`, report what they hold and ACK
/// both bundles, so a real rotation completes; the report says every certificate was renewed and nothing failed.
#[test]
fn rotation_bench_completes_with_simulated_proxies_and_reports_what_they_renewed() {
    let out = Command::new(bin("trellis-bench"))
        .args(["rotation", "--proxies", "10", "--workloads", "3", "--overlap", "1s"])
        .output()
        .expect("run");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "trellis-bench rotation failed ({}):\n{stdout}\n{stderr}", out.status);
    let report = section(&stdout, "## Root CA rotation with 10 simulated proxies");
    assert_eq!(row(report, "RenewNow received; node credentials renewed; workload SVIDs renewed")[1], "10; 10; 3");
    assert_eq!(row(report, "failed: discovery streams; NACKs; refused renewals")[1], "0; 0; 0");
    assert_measured(row(report, "whole rotation (RotateCa to `done` seen)")[1], "whole rotation");
    let progress = stdout
        .lines()
        .find_map(|l| l.strip_prefix("proxies still holding a certificate of the old CA: "))
        .unwrap_or_else(|| panic!("no progress line:\n{stdout}"));
    assert!(progress.rsplit(", ").next().is_some_and(|last| last.starts_with("0 at ")), "{progress}");
}
