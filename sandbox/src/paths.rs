//! Fixed paths inside the nested host.

/// The guest kernel's bzImage.
pub const GUEST_VMLINUZ: &str = "/guest/vmlinuz";
/// The guest kernel's ELF (PVH entry).
pub const GUEST_VMLINUX: &str = "/guest/vmlinux";
/// The guest initramfs (newc cpio, `/init` from `sandbox/guest/init`).
pub const GUEST_INITRAMFS: &str = "/guest/initramfs.cpio";
/// Conventional directory for payload files (on `PATH` in jobs).
pub const PAYLOAD_DIR: &str = "/payload";
/// Where [`crate::Payload::add_qemu`] puts `qemu-system-x86_64`.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Where [`crate::Payload::add_qemu`] puts QEMU's firmware (QEMU's own
/// default data directory, so `-L` is optional).
pub const QEMU_FIRMWARE_DIR: &str = "/usr/share/qemu";
/// Firmware files `qemu-system-x86_64 -M microvm -kernel ...` loads: qboot,
/// and the option ROMs that load a bzImage (`linuxboot_dma.bin`) or a PVH
/// ELF such as vmlinux (`pvh.bin`) through fw_cfg.
pub const QEMU_MICROVM_FIRMWARE: &[&str] = &["bios-microvm.bin", "linuxboot_dma.bin", "pvh.bin"];
/// A scratch directory (tmpfs) jobs may use; also the jobs' working directory.
pub const SCRATCH_DIR: &str = "/tmp";

/// Paths the sandbox writes itself; payload entries may not use them.
pub(crate) const RESERVED: &[&str] = &[
    "/init",
    "/qx",
    "/guest",
    "/bin/busybox",
    "/dev",
    "/proc",
    "/sys",
];

/// In the nested host: the generated job script and the kernel modules.
pub(crate) const JOBS_SCRIPT: &str = "/qx/jobs.sh";
pub(crate) const MODULES_DIR: &str = "/qx/modules";
