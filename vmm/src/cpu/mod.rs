//! vCPUs: their initial state (CPUID, MSRs, registers) and the threads that run them.

pub mod cpuid;
pub mod msrs;
pub mod pause;
pub mod recorder;
pub mod regs;
pub mod state;
mod vcpu;

pub use pause::{PauseError, PauseGate};
pub use vcpu::{
    kick_signal, kick_thread, register_kick_handler, IoBuses, Vcpu, VcpuCounters, VcpuHandle,
};
