//! The few AML encodings the DSDT needs (ACPI 6.4, chapter 20).

/// `NameOp NameString DataRefObject`.
pub fn name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

/// An integer constant in its shortest encoding.
pub fn integer(n: u64) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, n as u8],
        0x100..=0xffff => {
            let mut v = vec![0x0b];
            v.extend_from_slice(&(n as u16).to_le_bytes());
            v
        }
        0x1_0000..=0xffff_ffff => {
            let mut v = vec![0x0c];
            v.extend_from_slice(&(n as u32).to_le_bytes());
            v
        }
        _ => {
            let mut v = vec![0x0e];
            v.extend_from_slice(&n.to_le_bytes());
            v
        }
    }
}

/// `PackageOp PkgLength NumElements PackageElementList` (up to 255 elements).
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len() as u8];
    for e in elements {
        body.extend_from_slice(e);
    }
    let mut v = vec![0x12];
    v.extend_from_slice(&pkg_length(body.len()));
    v.extend_from_slice(&body);
    v
}

/// The PkgLength encoding of a body of `len` bytes (the length counts itself).
pub fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 0x40 {
        return vec![(len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    // AML objects are limited to 2^28 bytes; the DSDT is far below.
    vec![0xff, 0xff, 0xff, 0xff]
}

/// A term that wraps `body` after an opcode (one or two bytes) and optional name.
fn with_pkg(opcode: &[u8], name: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut inner = name.to_vec();
    inner.extend_from_slice(body);
    let mut v = opcode.to_vec();
    v.extend_from_slice(&pkg_length(inner.len()));
    v.extend_from_slice(&inner);
    v
}

/// `Scope (name) { body }`.
pub fn scope(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
    with_pkg(&[0x10], name, body)
}

/// `Device (name) { body }`.
pub fn device(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
    with_pkg(&[0x5b, 0x82], name, body)
}

/// `EisaId ("PNPxxxx")` as a DWord constant.
pub fn eisa_id(id: &[u8; 7]) -> Vec<u8> {
    let letter = |c: u8| u32::from(c.wrapping_sub(0x40) & 0x1f);
    let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0);
    let value = (letter(id[0]) << 26)
        | (letter(id[1]) << 21)
        | (letter(id[2]) << 16)
        | (hex(id[3]) << 12)
        | (hex(id[4]) << 8)
        | (hex(id[5]) << 4)
        | hex(id[6]);
    let mut v = vec![0x0c];
    v.extend_from_slice(&value.to_be_bytes());
    v
}

/// `Buffer () { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = integer(bytes.len() as u64);
    body.extend_from_slice(bytes);
    let mut v = vec![0x11];
    v.extend_from_slice(&pkg_length(body.len()));
    v.extend_from_slice(&body);
    v
}

/// A NUL-terminated ASCII string constant.
pub fn string(s: &str) -> Vec<u8> {
    let mut v = vec![0x0d];
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// A resource template: a fixed 32-bit memory window and one extended interrupt
/// (consumer, edge-triggered, active high, exclusive).
pub fn mmio_irq_resources(base: u32, len: u32, gsi: u32) -> Vec<u8> {
    let mut r = vec![0x86, 0x09, 0x00, 0x01]; // Memory32Fixed, read-write
    r.extend_from_slice(&base.to_le_bytes());
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]); // Interrupt: consumer|edge, 1 entry
    r.extend_from_slice(&gsi.to_le_bytes());
    r.extend_from_slice(&[0x79, 0x00]);
    buffer(&r)
}

/// A resource template with one extended interrupt (consumer, edge-triggered, active
/// high, exclusive).
pub fn irq_resources(gsi: u32) -> Vec<u8> {
    let mut r = vec![0x89, 0x06, 0x00, 0x03, 0x01];
    r.extend_from_slice(&gsi.to_le_bytes());
    r.extend_from_slice(&[0x79, 0x00]);
    buffer(&r)
}

/// `Method (name, args, NotSerialized) { body }`.
pub fn method(name: &[u8; 4], args: u8, body: &[u8]) -> Vec<u8> {
    let mut inner = vec![args & 0x7];
    inner.extend_from_slice(body);
    with_pkg(&[0x14], name, &inner)
}

/// `Notify (\scope.device, value)`, for a device one level below the root scope.
pub fn notify(scope: &[u8; 4], device: &[u8; 4], value: u8) -> Vec<u8> {
    let mut v = vec![0x86, b'\\', 0x2e]; // NotifyOp, root prefix, DualNamePrefix
    v.extend_from_slice(scope);
    v.extend_from_slice(device);
    v.extend_from_slice(&integer(value.into()));
    v
}

/// A resource template: fixed 16-bit I/O ports and one ISA IRQ (edge, active high).
pub fn io_irq_resources(port: u16, len: u8, irq: u8) -> Vec<u8> {
    let mut r = vec![0x47, 0x01];
    r.extend_from_slice(&port.to_le_bytes());
    r.extend_from_slice(&port.to_le_bytes());
    r.extend_from_slice(&[0x01, len]);
    r.push(0x22);
    r.extend_from_slice(&(1u16 << irq).to_le_bytes());
    r.extend_from_slice(&[0x79, 0x00]);
    buffer(&r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_object_matches_the_reference_encoding() {
        // iasl for `Name (_S5, Package () { 5, 0 })`.
        let s5 = name(b"_S5_", &package(&[integer(5), integer(0)]));
        assert_eq!(
            s5,
            [0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]
        );
    }

    #[test]
    fn com1_device_matches_the_reference_encoding() {
        // iasl for: Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_CRS,
        //   ResourceTemplate () { IO (Decode16, 0x3F8, 0x3F8, 0x01, 0x08) IRQNoFlags () {4} }) }
        assert_eq!(eisa_id(b"PNP0501"), [0x0c, 0x41, 0xd0, 0x05, 0x01]);
        let crs = io_irq_resources(0x3f8, 8, 4);
        assert_eq!(
            crs,
            [
                0x11, 0x10, 0x0a, 0x0d, 0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x22, 0x10,
                0x00, 0x79, 0x00
            ]
        );
        let dev = device(b"COM1", &name(b"_HID", &eisa_id(b"PNP0501")));
        assert_eq!(&dev[..3], &[0x5b, 0x82, 0x0f]);
        assert_eq!(&dev[3..7], b"COM1");
    }

    #[test]
    fn virtio_mmio_resources_match_the_reference_encoding() {
        // iasl for: ResourceTemplate () { Memory32Fixed (ReadWrite, 0xD0000000, 0x1000)
        //   Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 5 } }
        let crs = mmio_irq_resources(0xd000_0000, 0x1000, 5);
        assert_eq!(
            crs,
            [
                0x11, 0x1a, 0x0a, 0x17, 0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10,
                0x00, 0x00, 0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00, 0x79, 0x00
            ]
        );
        assert_eq!(string("LNRO0005"), b"\x0dLNRO0005\x00");
    }

    #[test]
    fn power_button_event_method_matches_the_reference_encoding() {
        // iasl for: Method (_EVT, 1, NotSerialized) { Notify (\_SB.PWRB, 0x80) }
        let evt = method(b"_EVT", 1, &notify(b"_SB_", b"PWRB", 0x80));
        assert_eq!(
            evt,
            [
                0x14, 0x13, b'_', b'E', b'V', b'T', 0x01, 0x86, b'\\', 0x2e, b'_', b'S', b'B',
                b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80
            ]
        );
        // ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 23 } }
        assert_eq!(
            irq_resources(23),
            [
                0x11, 0x0e, 0x0a, 0x0b, 0x89, 0x06, 0x00, 0x03, 0x01, 0x17, 0x00, 0x00, 0x00, 0x79,
                0x00
            ]
        );
        assert_eq!(eisa_id(b"PNP0C0C"), [0x0c, 0x41, 0xd0, 0x0c, 0x0c]);
    }

    #[test]
    fn integers_and_lengths() {
        assert_eq!(integer(0x1234), [0x0b, 0x34, 0x12]);
        assert_eq!(integer(0x1_0000), [0x0c, 0, 0, 1, 0]);
        assert_eq!(pkg_length(0x3e), [0x3f]);
        // 0x3f body bytes + 2 length bytes = 0x41.
        assert_eq!(pkg_length(0x3f), [0x41, 0x04]);
        assert_eq!(pkg_length(0x1000), [0x83, 0x00, 0x01]);
    }
}
