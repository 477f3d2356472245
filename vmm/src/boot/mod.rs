//! Loading what the VM boots into guest memory, and describing where it starts.
//!
//! Three entries are supported:
//! - a Linux ELF `vmlinux` with a PVH note: 32-bit protected-mode entry with `hvm_start_info`;
//! - a Linux ELF `vmlinux` without one, or a `bzImage`: the 64-bit Linux boot protocol
//!   (boot_params "zero page", identity-mapped page tables, long mode);
//! - a raw firmware image: real mode at the reset vector, as on a real machine.

mod firmware;
mod kernel;
mod params;

use std::path::{Path, PathBuf};

use crate::memory::GuestMemory;
use thiserror::Error;
use vm_memory::GuestAddress;

use crate::config::BootSource;

pub use firmware::FIRMWARE_MAX_SIZE;
pub use kernel::KernelFormat;

/// Errors while loading the boot payload.
#[derive(Debug, Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel", "initramfs" or "firmware".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF vmlinux nor a bzImage.
    #[error("{0} is not a Linux kernel: expected an x86_64 ELF vmlinux or a bzImage")]
    NotAKernel(PathBuf),
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The kernel.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel does not fit in guest memory.
    #[error(
        "kernel {path} ends at {end:#x}, beyond guest RAM ({mem_mib} MiB): give the VM more memory"
    )]
    KernelTooLarge {
        /// The kernel.
        path: PathBuf,
        /// Its last byte plus one.
        end: u64,
        /// Guest memory.
        mem_mib: u64,
    },
    /// The bzImage's boot protocol is too old for a 64-bit entry.
    #[error("bzImage {path} uses boot protocol {version:#x}; 2.06 or later with a 64-bit entry is required")]
    OldBootProtocol {
        /// The kernel.
        path: PathBuf,
        /// The version found.
        version: u16,
    },
    /// No room for the initramfs between the kernel and the top of usable memory.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}: give the VM more memory")]
    InitramfsTooLarge {
        /// The initramfs.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// The command line has a NUL byte or is too long for the kernel.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// A firmware image of an unusable size.
    #[error("firmware {path} is {size} bytes; it must be a non-empty multiple of 4 KiB no larger than {max} bytes")]
    FirmwareSize {
        /// The firmware.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {reason}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Real-mode code at the legacy BIOS reset vector (F000:FFF0): a kernel that reboots
/// "through the BIOS" (jumping there in real mode) writes the ACPI reset value to the
/// power port instead of running off into empty memory.
const RESET_STUB: [u8; 9] = [
    0xba, 0x00, 0x06, // mov dx, ACPI_POWER_PORT
    0xb0, 0x01, // mov al, ACPI_RESET_VALUE
    0xee, // out dx, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp hlt
];

fn write_reset_stub(mem: &GuestMemory) -> Result<(), BootError> {
    const _: () = assert!(crate::layout::ACPI_POWER_PORT == 0x600);
    const _: () = assert!(quantix_devices::power::ACPI_RESET_VALUE == 1);
    use vm_memory::Bytes;
    mem.write_slice(&RESET_STUB[..], crate::layout::BIOS_RESET_VECTOR)
        .map_err(|e| BootError::GuestMemory {
            what: "reset vector stub",
            reason: e.to_string(),
        })
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit Linux boot protocol: long mode, `rsi` = zero page.
    Linux64 {
        /// The 64-bit entry address.
        entry: GuestAddress,
    },
    /// PVH: 32-bit protected mode without paging, `rbx` = `hvm_start_info`.
    Pvh {
        /// The PVH entry address.
        entry: GuestAddress,
    },
    /// Real mode at the reset vector (CS base 0xffff0000, IP 0xfff0).
    ResetVector,
}

/// What was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// Where the boot vCPU starts.
    pub entry: EntryPoint,
    /// The kernel's format, when a kernel was loaded.
    pub format: Option<KernelFormat>,
}

/// Memory a firmware image occupies, mapped below 4 GiB (outside guest RAM).
#[derive(Debug)]
pub struct FirmwareImage {
    /// The address of its first byte.
    pub base: GuestAddress,
    /// Its contents.
    pub bytes: Vec<u8>,
}

/// Reads a firmware image (the VMM maps it before building guest memory).
pub fn read_firmware(path: &Path) -> Result<FirmwareImage, BootError> {
    firmware::read(path)
}

/// Loads a Linux kernel, initramfs and command line, and writes the boot structures.
pub fn load_linux(
    mem: &GuestMemory,
    mem_size: u64,
    source: &BootSource,
    rsdp: GuestAddress,
) -> Result<BootInfo, BootError> {
    let BootSource::Kernel {
        kernel,
        initramfs,
        cmdline,
    } = source
    else {
        return Ok(BootInfo {
            entry: EntryPoint::ResetVector,
            format: None,
        });
    };
    let loaded = kernel::load(mem, mem_size, kernel)?;
    let initrd = match initramfs {
        Some(path) => Some(kernel::load_initramfs(mem, mem_size, path, &loaded)?),
        None => None,
    };
    params::write_cmdline(mem, cmdline, loaded.cmdline_limit())?;
    write_reset_stub(mem)?;
    let entry = params::write(mem, mem_size, &loaded, initrd, cmdline, rsdp)?;
    Ok(BootInfo {
        entry,
        format: Some(loaded.format),
    })
}
/// Whether the guest gets an i8254 PIT. A Linux kernel booted with our ACPI tables
/// (hardware-reduced ACPI) never uses one: its timers are the LAPIC's (TSC deadline) and
/// kvm-clock. Firmware (which programs the PIT to count time) and a kernel told
/// `acpi=off` (whose timer check routes the PIT through the I/O APIC) get one. Without it
/// the VM is one in-kernel device lighter, and its teardown is about 9 ms shorter: KVM
/// waits for SRCU grace periods when it frees a PIT (measured with `quantix-bench
/// first-insn`, docs/vmm.md).
pub fn needs_pit(boot: &crate::config::BootSource) -> bool {
    match boot {
        crate::config::BootSource::Firmware(_) => true,
        crate::config::BootSource::Kernel { cmdline, .. } => {
            cmdline.split_whitespace().any(|w| w == "acpi=off")
        }
    }
}
