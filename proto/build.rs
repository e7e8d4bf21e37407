//! Compiles `proto/sluice/v2/node.proto` (and the legacy `v1`) with the pure-Rust `protox` compiler (no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["sluice/v2/node.proto", "sluice/v1/node.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
