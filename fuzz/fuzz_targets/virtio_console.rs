//! Fuzz target: see quantix_virtio::fuzzing::console.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    quantix_virtio::fuzzing::console(data);
});
