//! Fuzz target: see quantix_virtio::fuzzing::vsock.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    quantix_virtio::fuzzing::vsock(data);
});
