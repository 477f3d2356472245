//! vCPUs: their initial state (CPUID, MSRs, registers) and the threads that run them.

pub mod cpuid;
pub mod msrs;
pub mod regs;
mod vcpu;

pub use vcpu::{register_kick_handler, Vcpu, VcpuCounters, VcpuHandle};
