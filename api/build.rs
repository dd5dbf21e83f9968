//! Compiles the control-plane protobuf definitions with protox (pure Rust), so no `protoc` is
//! needed. Server stubs only with the `server` feature (the control plane's), client stubs always.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/pillion/control/v1/identity.proto",
        "proto/pillion/control/v1/discovery.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        .compile_fds(descriptors)?;
    Ok(())
}
