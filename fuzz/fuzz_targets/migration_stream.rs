//! Fuzz target: see quantix_vmm::fuzzing::migration_stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    quantix_vmm::fuzzing::migration_stream(data);
});
