//! Shared by the benchmarks: statistics, number formatting, the machine and revision lines, and writing one marked
//! section of BENCHMARKS.md.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

/// `1234.5` → "1,235"; below 100, one decimal.
pub fn number(value: f64) -> String {
    if value.abs() < 100.0 {
        return format!("{value:.1}");
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

pub fn cell(values: &[f64]) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let (min, max) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    format!("{} ({}..{})", number(median(values)), number(min), number(max))
}

pub fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|s| !s.is_empty())
}

pub fn machine() -> String {
    let cpus = command_output("nproc", &[])
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.to_string()))
        .unwrap_or_else(|| "?".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = command_output("uname", &["-r"]).unwrap_or_else(|| "?".into());
    let rustc = command_output("rustc", &["--version"]).unwrap_or_else(|| "rustc ?".into());
    format!("{cpus} CPUs ({model}), Linux {kernel}, {rustc}")
}

pub fn revision() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let Some(commit) = command_output("git", &["-C", root, "rev-parse", "--short", "HEAD"]) else {
        return "unknown commit".into();
    };
    let dirty = command_output("git", &["-C", root, "status", "--porcelain"]).is_some();
    format!("commit {commit}{}", if dirty { " plus uncommitted changes" } else { "" })
}

/// A paragraph wrapped at 120 columns, followed by a blank line.
pub fn wrap(text: &str) -> String {
    let mut out = String::new();
    let mut width = 0;
    for word in text.split_whitespace() {
        let len = word.chars().count();
        if width > 0 && width + 1 + len > 120 {
            out.push('\n');
            width = 0;
        } else if width > 0 {
            out.push(' ');
            width += 1;
        }
        out.push_str(word);
        width += len;
    }
    out + "\n\n"
}

const HEADER: &str = "# Benchmarks

Performance measurements of Trellis, each on one machine over loopback. A benchmark alternates the baseline and
Trellis (A B A B …) so that drift and noise hit both alike, and reports the median over its rounds with the spread
(min..max). The numbers describe the machine they were taken on; nothing asserts on them. Each section is written
by its command, which replaces only that section (between its markers):

- suite: `cargo run --release -p trellis-tests --bin trellis-bench -- all`
- tunnel: `cargo run --release -p trellis-tests --bin trellis-bench -- tunnel`
- http: `cargo run --release -p trellis-tests --bin trellis-bench -- http`
";

/// Replaces one section of `path` (creating the file, or appending the section, as needed).
/// `marker` names the section: it sits between `<!-- marker:begin -->` and `<!-- marker:end -->`.
pub fn write_section(path: &Path, marker: &str, section: &str) -> anyhow::Result<()> {
    let (begin, end) = (format!("<!-- {marker}:begin -->"), format!("<!-- {marker}:end -->"));
    let block = format!("{begin}\n{section}{end}");
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HEADER.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let text = match (text.find(&begin), text.find(&end)) {
        (Some(begin_at), Some(end_at)) if begin_at < end_at => {
            format!("{}{block}{}", &text[..begin_at], &text[end_at + end.len()..])
        }
        _ => format!("{}\n{block}\n", text.trim_end_matches('\n').to_owned() + "\n"),
    };
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
