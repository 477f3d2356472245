//! Every limit on a VM's configuration, for the VMM and for clients that check a request
//! before they hand it over.

/// Fewest vCPUs a VM can have.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs a VM can have: xAPIC IDs are 8 bits and 0xff is the broadcast ID;
/// the I/O APIC takes the ID after the last vCPU.
pub const MAX_VCPUS: u8 = 254;
/// Least guest memory: room for the boot structures and a small kernel.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most guest memory a size may name (1 TiB of MiB: bytes stay representable everywhere).
pub const MAX_MEMORY_MIB: u64 = 1 << 40;
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// The command line used when none is given: console on the first serial port,
/// the rest (reboot through the ACPI reset register, then the i8042) is Linux's default.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// The room for the kernel command line in guest memory, its terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Longest disk id: the virtio-blk serial number is 20 bytes.
pub const DISK_ID_MAX: usize = 20;
/// Longest TAP interface name (IFNAMSIZ less the NUL).
pub const TAP_NAME_MAX: usize = 15;
/// Lowest guest CID (0 to 2 are the hypervisor, local and host).
pub const MIN_GUEST_CID: u64 = 3;
/// Highest guest CID (u32::MAX is VMADDR_CID_ANY).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// Most virtio devices a VM can have, all kinds together (disks, cards, rng, console,
/// vsock): one virtio-mmio window and one I/O APIC pin each, GSIs 5 to 22 (the VMM's
/// layout asserts that it has exactly this many).
pub const MAX_VIRTIO_DEVICES: usize = 18;
