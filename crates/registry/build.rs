//! Compiles `proto/registry.proto` with the pure-Rust `protox` compiler, so building needs no
//! `protoc` on the machine, and hands the descriptors to tonic-prost-build.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("registry.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .bytes(".starling.registry.v1.Session.presence")
        .bytes(".starling.registry.v1.SetPresence.presence")
        .bytes(".starling.registry.v1.InstallSnapshotRequest.data")
        .compile_fds(fds)?;
    Ok(())
}
