//! How `trellis-proxy` is linked. An idle proxy's RSS is mostly its own binary's pages (BENCHMARKS.md, "Idle RSS: a
//! smaller binary, and its start-up code together"), so the link keeps what the process maps small.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=trellis-proxy.order");
    // Relative relocations packed as RELR (DT_RELR: glibc 2.36, lld, GNU ld 2.38) instead of 24-byte RELA entries:
    // the proxy's ~16,000 relocations of its own addresses (vtables, string tables) took 385 KB of the binary, which
    // the dynamic loader reads at every start and which then stayed mapped; as RELR they take 4 KB. The binary stays
    // position-independent (ASLR as before). Test: data-plane/tests/link.rs.
    println!("cargo::rustc-link-arg-bin=trellis-proxy=-Wl,-z,pack-relative-relocs");
    // Release: the functions an idle proxy has run (start-up, joining, a connection's path) first, in one stretch.
    // The kernel maps the 64 KiB around each page a process touches, so that code scattered over the binary made
    // nearly all of the code resident, including the part that never runs. The list comes from a run
    // (bench/link-order.sh); a function missing from it is only placed after the listed ones. The symbol-ordering
    // file is an lld option: lld (rust-lld) is the default linker of x86_64-unknown-linux-gnu (Rust 1.90 on), so it
    // is passed for that target only; elsewhere the binary links in the linker's own order.
    let lld_by_default = std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    if std::env::var("PROFILE").as_deref() == Ok("release") && lld_by_default {
        let order = format!("{}/trellis-proxy.order", std::env::var("CARGO_MANIFEST_DIR").unwrap());
        println!("cargo::rustc-link-arg-bin=trellis-proxy=-Wl,--symbol-ordering-file={order}");
        println!("cargo::rustc-link-arg-bin=trellis-proxy=-Wl,--no-warn-symbol-ordering");
    }
}
