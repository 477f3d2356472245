//! Compiles `quantixkvm/agent/v1/*.proto` with protox (a protobuf compiler in Rust), so that
//! the build needs no protoc on the host; pbjson-build adds serde implementations that
//! follow the canonical proto3 JSON mapping (enum names as strings, 64-bit integers as
//! strings), every field written even at its default (friendlier to `jq`), with the
//! .proto's own field names.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto = root.join("quantixkvm/agent/v1/agent.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let fds = protox::compile([&proto], [&root])?;
    // The encoded descriptors, for the agent's gRPC server reflection.
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("quantixkvm_agent_v1_descriptor.bin"), &descriptor)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor)?
        .preserve_proto_field_names()
        .emit_fields()
        .build(&[".quantixkvm.agent.v1"])?;
    Ok(())
}
