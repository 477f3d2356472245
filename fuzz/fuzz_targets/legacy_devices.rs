//! Fuzz target: see quantix_devices::fuzzing::legacy.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    quantix_devices::fuzzing::legacy(data);
});
