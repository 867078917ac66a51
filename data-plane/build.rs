//! How `trellis-proxy` is linked. An idle proxy's RSS is mostly its own binary's pages (BENCHMARKS.md, "Idle RSS: a
//! smaller binary"), so the link keeps what the process maps small.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    // Relative relocations packed as RELR (DT_RELR: glibc 2.36, lld, GNU ld 2.38) instead of 24-byte RELA entries:
    // the proxy's ~16,000 relocations of its own addresses (vtables, string tables) took 385 KB of the binary, which
    // the dynamic loader reads at every start and which then stayed mapped; as RELR they take 4 KB. The binary stays
    // position-independent (ASLR as before). Test: data-plane/tests/link.rs.
    println!("cargo::rustc-link-arg-bin=trellis-proxy=-Wl,-z,pack-relative-relocs");
}
