//! KVM's plain-old-data structs as bytes, for the parts of a saved VM that are stored as
//! opaque blobs of their exact KVM size (the vCPU event block, the interrupt
//! controllers, the PIT).
//!
//! Only the types listed here implement [`Plain`]: `repr(C)` structs generated from the
//! kernel's headers, made of integers, integer arrays and unions of those, with no
//! pointers, references or enums, so every bit pattern is a valid value.

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, kvm_vcpu_events};

/// A KVM struct whose bytes may be read and written freely.
///
/// # Safety
///
/// Implement only for `repr(C)` types made of integers and unions or arrays of integers
/// (no pointers, references, `bool`s, enums or niches), for which every bit pattern of
/// `size_of::<Self>()` bytes is a valid value, and which implement `Default`.
pub unsafe trait Plain: Default + Copy {
    /// The value's bytes.
    fn to_bytes(&self) -> Vec<u8> {
        let size = std::mem::size_of::<Self>();
        // SAFETY: `Self: Plain` is an integer-only `repr(C)` type (the trait's contract);
        // the slice covers exactly the value, borrowed for the call. KVM fills the whole
        // struct, padding included, so no byte is uninitialised.
        let bytes = unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size) };
        bytes.to_vec()
    }

    /// The value of exactly `size_of::<Self>()` bytes; `None` for any other length.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let size = std::mem::size_of::<Self>();
        if bytes.len() != size {
            return None;
        }
        let mut value = Self::default();
        // SAFETY: the destination is a live `Self` of `size` bytes, the source holds
        // `size` bytes, they do not overlap, and every bit pattern is a valid `Self` (the
        // trait's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut value as *mut Self).cast::<u8>(),
                size,
            );
        }
        Some(value)
    }
}

// SAFETY: integers, integer arrays and a union of integer arrays (`kvm_vcpu_events` in
// the kernel's uapi `kvm.h`).
unsafe impl Plain for kvm_vcpu_events {}
// SAFETY: two `u32`s and a union of integer arrays and integer-only structs (the PIC's
// and I/O APIC's state, `kvm_irqchip`).
unsafe impl Plain for kvm_irqchip {}
// SAFETY: an array of integer-only channel structs, integers and a reserved array.
unsafe impl Plain for kvm_pit_state2 {}
// SAFETY: integers and a reserved integer array.
unsafe impl Plain for kvm_clock_data {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_lengths() {
        let mut e = kvm_vcpu_events::default();
        e.exception.nr = 14;
        e.exception.error_code = 0x1234;
        e.sipi_vector = 7;
        let bytes = e.to_bytes();
        assert_eq!(bytes.len(), std::mem::size_of::<kvm_vcpu_events>());
        let back = kvm_vcpu_events::from_bytes(&bytes).unwrap();
        assert_eq!(back.exception.nr, 14);
        assert_eq!(back.exception.error_code, 0x1234);
        assert_eq!(back.sipi_vector, 7);
        assert!(kvm_vcpu_events::from_bytes(&bytes[1..]).is_none());
        let mut pit = kvm_pit_state2::default();
        pit.channels[2].count = 0xabcd;
        assert_eq!(
            kvm_pit_state2::from_bytes(&pit.to_bytes())
                .unwrap()
                .channels[2]
                .count,
            0xabcd
        );
    }
}
