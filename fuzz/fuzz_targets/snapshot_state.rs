//! Fuzz target: see quantix_vmm::fuzzing::snapshot_state.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    quantix_vmm::fuzzing::snapshot_state(data);
});
