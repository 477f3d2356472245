//! The Quantix node agent: a gRPC server that runs each VM in its own `quantix-vmm` process,
//! keeps specs and status in an embedded store, re-adopts running VMMs after a restart, and
//! serves consoles, events and metrics. See docs/agent.md.

pub mod access;
pub mod cgroup;
pub mod config;
pub mod console;
pub mod control;
pub mod error;
pub mod events;
pub mod grpc;
pub mod jail;
pub mod listen;
pub mod manager;
pub mod metrics;
pub mod node;
pub mod process;
pub mod services;
pub mod store;
pub mod validate;

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
