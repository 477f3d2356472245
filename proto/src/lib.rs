//! The node agent's gRPC API, `quantixkvm.agent.v1`, generated from
//! `proto/quantixkvm/agent/v1/agent.proto` by protox and tonic-prost-build.
//! The agent (server) and `quantixctl` (client) share it.

#![allow(clippy::all, missing_docs)]

/// Version 1 of the agent API.
pub mod v1 {
    tonic::include_proto!("quantixkvm.agent.v1");
    // serde in the canonical proto3 JSON mapping (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/quantixkvm.agent.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(
    env!("OUT_DIR"),
    "/quantixkvm_agent_v1_descriptor.bin"
));

/// The `.proto` source, for tools that generate clients in other languages.
pub const AGENT_PROTO: &str = include_str!("../quantixkvm/agent/v1/agent.proto");
