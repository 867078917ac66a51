//! `cargo run --release -p trellis-tests --bin trellis-bench -- all [--smoke] [--no-build]`: the benchmark suite
//! (Trellis against direct TCP, a stunnel4 pair and an HAProxy pair; see `bench/suite.rs`); `all --ztunnel PATH`:
//! Trellis against Istio's ztunnel on simulated hosts (see `bench/netpath.rs`).
//! `trellis-bench tunnel [--quick] [--direct-only] [--no-build]`: the older direct vs. Trellis tunnel benchmark.
//! `trellis-bench http [--quick] [--no-build]`: HTTP/1.1 requests direct vs. through the mesh, with and without a
//! JWT rule (see `bench/http.rs`).
//! Both write their own marked section of BENCHMARKS.md; nothing asserts on timings.
//! `trellis-bench soak --duration D`: a long run under certificate rotation and policy changes (see `bench/soak.rs`);
//! prints its report (RELIABILITY.md's soak row), writes nothing.
//! `trellis-bench rotation [--proxies N]`: a root CA rotation with N simulated proxies (see `bench/rotation.rs`);
//! prints its report (RELIABILITY.md's rotation figures), writes nothing.
//! `trellis-bench scoping [--namespaces N] [--workloads W] [--rounds R] [--no-build]`: bytes pushed per proxy per
//! namespace-local change with and without scoped pushes (see `bench/scoping.rs`); prints, writes nothing.
//! `trellis-bench load [--connections N] [--hold D] [--burst-rate N] [--burst D]`: 10,000 concurrent tunnelled
//! connections and a burst of new ones through one proxy pair (see `bench/scale.rs`); prints, writes nothing.

// `deny`, not `forbid`: a few system calls std does not wrap (sysconf, rlimits, prctl in `bench::procfs`; geteuid
// in `bench::contenders`) allow unsafe code where they are made, with their SAFETY reasoning.
#![deny(unsafe_code)]

mod bench;
mod common;

use std::process::ExitCode;

const USAGE: &str = "usage: trellis-bench all [--smoke] [--quick] [--only N,N] [--worker-threads N] [--bulk-mib N] [--ztunnel PATH] [--no-build] | trellis-bench tunnel [--quick] [--direct-only] [--no-build] | trellis-bench control [--replicas N] [--proxies N] [--csr-clients N] [--rounds N] [--sign-for SECONDS] [--ack-only] | trellis-bench soak --duration D [--cert-ttl D] [--policy-every D] [--rate N] [--streams N] [--no-build] | trellis-bench rotation [--proxies N] [--workloads M] [--overlap D] | trellis-bench scoping [--namespaces N] [--workloads W] [--rounds R] [--no-build] | trellis-bench load [--connections N] [--hold D] [--burst-rate N] [--burst D] [--no-build]";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("all") => bench::suite::main(&argv[1..]),
        Some("tunnel") => bench::tunnel::main(&argv[1..]),
        Some("http") => bench::http::main(&argv[1..]),
        Some("control") => bench::control::main(&argv[1..]),
        Some("soak") => bench::soak::main(&argv[1..]),
        Some("rotation") => bench::rotation::main(&argv[1..]),
        Some("scoping") => bench::scoping::main(&argv[1..]),
        Some("load") => bench::scale::main(&argv[1..]),
        // The suite's servers, as a process of their own.
        Some("servers") => bench::load::servers_main(&argv[1..]),
        // The load's echo server, as a process of its own.
        Some("load-echo") => bench::scale::echo_main(),
        _ => {
            eprintln!("trellis-bench: which benchmark?\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
