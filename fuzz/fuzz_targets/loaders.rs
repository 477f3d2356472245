//! Fuzz target: see quantix_vmm::fuzzing::loaders.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    quantix_vmm::fuzzing::loaders(data);
});
