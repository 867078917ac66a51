//! Compiles the protobuf contracts with protox (pure Rust), so building needs no system `protoc`: Trellis's own
//! (`trellis.v1`) and the SPIFFE Workload API as the SPIFFE project publishes it (no protobuf package, so its
//! service is `/SpiffeWorkloadAPI/...` on the wire, as every SPIFFE client expects).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/trellis/v1/trellis.proto", "proto/spiffe/workload/workload.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
