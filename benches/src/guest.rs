//! Tiny hand-made guests for `first-insn`: their first instructions write one byte to
//! COM1 and power the VM off through the ACPI sleep control register (port 0x600,
//! `SLP_EN | SLP_TYP(5)` = 0x34, see docs/vmm.md; Cloud Hypervisor's shutdown port is the
//! same), then, for a VMM without that port (Firecracker), pulse the i8042 reset line.

/// The byte the guests write first.
pub const MARKER_BYTE: u8 = b'Q';
/// COM1's data port.
pub const COM1: u16 = 0x3f8;
/// quantix-vmm's ACPI sleep control / reset port.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// `SLP_EN | SLP_TYP(5)`: power off.
pub const ACPI_POWEROFF: u8 = (1 << 5) | (5 << 2);

/// Where [`elf64`] loads its code (16 MiB).
pub const ELF_LOAD: u64 = 0x100_0000;
/// Size of the firmware image: QEMU's `-bios` wants a multiple of 64 KiB, quantix-vmm's
/// `--firmware` a multiple of 4 KiB; 64 KiB suits both.
pub const FIRMWARE_SIZE: usize = 64 * 1024;

/// `mov dx, port; mov al, value; out dx, al`. In 64-bit mode `mov dx` needs the
/// operand-size prefix; in real mode it does not.
fn outb(port: u16, value: u8, long_mode: bool) -> Vec<u8> {
    let mut v = if long_mode { vec![0x66] } else { vec![] };
    v.push(0xba);
    v.extend_from_slice(&port.to_le_bytes());
    v.extend_from_slice(&[0xb0, value, 0xee]);
    v
}

/// The i8042's command port, and its "pulse reset line" command.
pub const I8042_COMMAND: u16 = 0x64;
/// The reset command.
pub const I8042_RESET: u8 = 0xfe;

/// The guest's code: the byte to COM1, ACPI poweroff, the i8042 reset, then
/// `hlt; jmp $-1` (for a VMM with neither, such as QEMU microvm, the guest just parks).
pub fn code(long_mode: bool) -> Vec<u8> {
    let mut v = outb(COM1, MARKER_BYTE, long_mode);
    v.extend(outb(ACPI_SLEEP_PORT, ACPI_POWEROFF, long_mode));
    v.extend(outb(I8042_COMMAND, I8042_RESET, long_mode));
    v.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    v
}

/// Where [`elf64_restore`]'s guest polls for its go signal (2 MiB, zeroed RAM).
pub const RESTORE_FLAG: u64 = 0x20_0000;

/// A guest for timing restores: it spins until the byte at [`RESTORE_FLAG`] is non-zero,
/// then does what [`code`] does (the byte to COM1, power off). It is snapshotted while it
/// spins; the benchmark then sets the flag in the snapshot's memory image, so the first
/// byte after a restore comes as soon as the restored vCPU runs.
///
/// ```text
///   0: 80 3c 25 00 00 20 00 00   cmp byte [0x200000], 0
///   8: 74 f6                     je 0
///  10: (code)
/// ```
pub fn elf64_restore() -> Vec<u8> {
    let mut v = vec![0x80, 0x3c, 0x25];
    v.extend_from_slice(&(RESTORE_FLAG as u32).to_le_bytes());
    v.extend_from_slice(&[0x00, 0x74, 0xf6]);
    v.extend(code(true));
    elf64_code(&v)
}

/// The byte [`fill_and_tick`]'s guest writes once every page is written.
pub const FILLED_BYTE: u8 = b'F';
/// The byte it then writes again and again.
pub const TICK_BYTE: u8 = b'T';
/// Where [`fill_and_tick`] starts writing (2 MiB: above the page tables, boot data and
/// firmware areas of every VMM).
pub const FILL_START: u32 = 0x20_0000;

/// A guest for timing snapshots (the `snapshot` benchmark): it writes the first 4 bytes
/// of every 4 KiB page from [`FILL_START`] up to 1 MiB below the end of its
/// `memory_mib` MiB of RAM (so that every page holds data and a full snapshot must write
/// all of them), writes [`FILLED_BYTE`] to COM1, then writes [`TICK_BYTE`] once every
/// `delay_tsc` TSC ticks forever, writing no memory (so a diff snapshot of it holds
/// only what its VMM itself changed). Each tick first reads the UART's line status
/// register, as a polling console driver does: a VMM that coalesces transmit writes
/// (quantix-vmm, `KVM_CAP_COALESCED_PIO`) plays them out at that exit, so a restored
/// copy's first tick reaches the VMM's stdout at most two tick periods after its vCPU
/// runs again, with every VMM.
///
/// The bytes mean the same in 32-bit protected mode (a PVH entry, paging off) and in
/// 64-bit mode (the identity map of the low 4 GiB): `mov [rdi], edi` is `mov [edi], edi`
/// there, and `mov edi, imm32` zero-extends. `memory_mib` is at most 3072 (below the
/// 32-bit hole).
///
/// ```text
///  0: bf 00 00 20 00        mov edi, 0x200000
///  5: 89 3f                 mov [rdi], edi
///  7: 81 c7 00 10 00 00     add edi, 0x1000
/// 13: 81 ff END             cmp edi, END
/// 19: 72 f0                 jb 5
/// 21: (out COM1, 'F')
/// T:  66 ba fd 03 ec        mov dx, 0x3fd; in al, dx
///     (out COM1, 'T')
/// +7: 0f 31                 rdtsc
/// +9: 89 c1                 mov ecx, eax
/// W:  f3 90                 pause
///     0f 31                 rdtsc
///     29 c8                 sub eax, ecx
///     3d DELAY              cmp eax, delay_tsc
///     72 f3                 jb W
///     eb e1                 jmp T
/// ```
pub fn fill_and_tick(memory_mib: u32, delay_tsc: u32) -> Vec<u8> {
    let end = memory_mib.min(3072).saturating_sub(1) << 20;
    let mut v = vec![0xbf];
    v.extend_from_slice(&FILL_START.to_le_bytes());
    v.extend_from_slice(&[0x89, 0x3f, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x81, 0xff]);
    v.extend_from_slice(&end.to_le_bytes());
    v.extend_from_slice(&[0x72, 0xf0]);
    v.extend(outb(COM1, FILLED_BYTE, true));
    // T: in al, COM1 + 5 (the line status register), as a polling console driver does.
    v.extend_from_slice(&[0x66, 0xba]);
    v.extend_from_slice(&(COM1 + 5).to_le_bytes());
    v.push(0xec);
    v.extend(outb(COM1, TICK_BYTE, true));
    v.extend_from_slice(&[
        0x0f, 0x31, 0x89, 0xc1, 0xf3, 0x90, 0x0f, 0x31, 0x29, 0xc8, 0x3d,
    ]);
    v.extend_from_slice(&delay_tsc.to_le_bytes());
    v.extend_from_slice(&[0x72, 0xf3, 0xeb, 0xe1]);
    v
}

/// `code` in an ELF64 with a PVH note (see [`elf64_pvh`]).
pub fn elf64_pvh_code(code: &[u8]) -> Vec<u8> {
    elf(code, true)
}

/// A minimal ELF64 executable (one PT_LOAD at [`ELF_LOAD`], no PVH note) whose entry
/// point is [`code`] in 64-bit mode: quantix-vmm boots it through the Linux 64-bit
/// boot protocol, so the vCPU's first instruction is the guest's.
pub fn elf64() -> Vec<u8> {
    elf64_code(&code(true))
}

/// The same ELF64 wrapper around any 64-bit `code`.
pub fn elf64_code(code: &[u8]) -> Vec<u8> {
    elf(code, false)
}

/// [`code`] in an ELF64 with a PVH note (Xen ELF note 18, `XEN_ELFNOTE_PHYS32_ENTRY`):
/// VMMs that boot ELF kernels only by PVH (Cloud Hypervisor, QEMU) enter it in 32-bit
/// protected mode, where [`code`]'s long-mode bytes mean the same (the 0x66 prefix makes
/// `mov dx` 16-bit in either).
pub fn elf64_pvh() -> Vec<u8> {
    elf(&code(true), true)
}

/// The note: namesz, descsz, type, "Xen\0", the 32-bit entry.
const NOTE: usize = 12 + 4 + 4;

fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum = if pvh { 2 } else { 1 };
    let note = if pvh { NOTE } else { 0 };
    let code_off = EHDR + phnum * PHDR + note;
    let entry = ELF_LOAD + code_off as u64;
    let total = (code_off + code.len()) as u64;
    let mut v = Vec::with_capacity(code_off + code.len());
    v.extend_from_slice(b"\x7fELF");
    v.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    v.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    v.extend_from_slice(&entry.to_le_bytes());
    v.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    v.extend_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    v.extend_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    v.extend_from_slice(&(phnum as u16).to_le_bytes()); // e_phnum
    v.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    v.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    v.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v.extend_from_slice(&7u32.to_le_bytes()); // RWX
    v.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    v.extend_from_slice(&ELF_LOAD.to_le_bytes()); // p_vaddr
    v.extend_from_slice(&ELF_LOAD.to_le_bytes()); // p_paddr
    v.extend_from_slice(&total.to_le_bytes()); // p_filesz
    v.extend_from_slice(&total.to_le_bytes()); // p_memsz
    v.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    if pvh {
        let off = (EHDR + phnum * PHDR) as u64;
        v.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        v.extend_from_slice(&4u32.to_le_bytes()); // R
        v.extend_from_slice(&off.to_le_bytes()); // p_offset
        v.extend_from_slice(&(ELF_LOAD + off).to_le_bytes()); // p_vaddr
        v.extend_from_slice(&(ELF_LOAD + off).to_le_bytes()); // p_paddr
        v.extend_from_slice(&(NOTE as u64).to_le_bytes()); // p_filesz
        v.extend_from_slice(&(NOTE as u64).to_le_bytes()); // p_memsz
        v.extend_from_slice(&4u64.to_le_bytes()); // p_align
        v.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
        v.extend_from_slice(&4u32.to_le_bytes()); // descsz
        v.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        v.extend_from_slice(b"Xen\0");
        v.extend_from_slice(&(entry as u32).to_le_bytes());
    }
    debug_assert_eq!(v.len(), code_off);
    v.extend_from_slice(code);
    v
}

/// A [`FIRMWARE_SIZE`] real-mode firmware image ending at 4 GiB: [`code`] (16-bit) at
/// its start, and at the reset vector (offset `size - 16`: CS base `0xffff0000`, IP
/// `0xfff0`) a near jump to it (IP 0). The rest is `hlt`.
pub fn firmware16() -> Vec<u8> {
    let code = code(false);
    let mut img = vec![0xf4u8; FIRMWARE_SIZE];
    img[..code.len()].copy_from_slice(&code);
    let reset = FIRMWARE_SIZE - 16;
    // jmp near rel16: target = IP after the 3-byte instruction + rel = 0.
    let after = (reset + 3) as u16;
    let rel = 0u16.wrapping_sub(after);
    img[reset] = 0xe9;
    img[reset + 1..reset + 3].copy_from_slice(&rel.to_le_bytes());
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_writes_the_marker_then_powers_off() {
        assert_eq!(
            code(true),
            [
                0x66, 0xba, 0xf8, 0x03, 0xb0, b'Q', 0xee, 0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee,
                0x66, 0xba, 0x64, 0x00, 0xb0, 0xfe, 0xee, 0xf4, 0xeb, 0xfd
            ]
        );
        assert_eq!(code(false)[..6], [0xba, 0xf8, 0x03, 0xb0, b'Q', 0xee]);
        assert_eq!(ACPI_POWEROFF, 0x34);
    }

    #[test]
    fn the_fill_and_tick_guest_jumps_where_it_means() {
        let c = fill_and_tick(256, 100_000);
        // The fill loop's jb lands on `mov [rdi], edi`.
        assert_eq!(&c[5..7], &[0x89, 0x3f]);
        assert_eq!(c[19..21], [0x72, 0xf0]);
        assert_eq!(21 + (0xf0u8 as i8) as isize, 5);
        assert_eq!(u32::from_le_bytes(c[15..19].try_into().unwrap()), 255 << 20);
        // Then 'F', then the tick loop at T.
        let t = 21 + 7;
        assert_eq!(c[21 + 5], FILLED_BYTE);
        assert_eq!(
            &c[t..t + 5],
            &[0x66, 0xba, 0xfd, 0x03, 0xec],
            "in al, 0x3fd at T"
        );
        assert_eq!(c[t + 10], TICK_BYTE);
        let w = t + 16;
        assert_eq!(&c[w..w + 2], &[0xf3, 0x90], "pause at W");
        let jb = w + 11;
        assert_eq!(c[jb], 0x72);
        assert_eq!((jb + 2) as isize + (c[jb + 1] as i8) as isize, w as isize);
        assert_eq!(c[jb + 2], 0xeb);
        assert_eq!((jb + 4) as isize + (c[jb + 3] as i8) as isize, t as isize);
        assert_eq!(c.len(), jb + 4);
        assert_eq!(
            u32::from_le_bytes(c[w + 7..w + 11].try_into().unwrap()),
            100_000
        );
    }

    #[test]
    fn elf_header_points_at_the_code() {
        let elf = elf64();
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        let off = (entry - ELF_LOAD) as usize;
        assert_eq!(&elf[off..], &code(true)[..]);
        let filesz = u64::from_le_bytes(elf[64 + 32..64 + 40].try_into().unwrap());
        assert_eq!(filesz as usize, elf.len());
    }

    #[test]
    fn the_pvh_elf_has_a_note_with_the_entry_of_the_code() {
        let elf = elf64_pvh();
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(
            u16::from_le_bytes([elf[56], elf[57]]),
            2,
            "two program headers"
        );
        // The second program header is the PT_NOTE.
        let ph = 64 + 56;
        assert_eq!(u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()), 4);
        let note = u64::from_le_bytes(elf[ph + 8..ph + 16].try_into().unwrap()) as usize;
        assert_eq!(
            u32::from_le_bytes(elf[note + 8..note + 12].try_into().unwrap()),
            18
        );
        assert_eq!(&elf[note + 12..note + 16], b"Xen\0");
        let pvh_entry = u32::from_le_bytes(elf[note + 16..note + 20].try_into().unwrap());
        assert_eq!(u64::from(pvh_entry), entry);
        assert_eq!(&elf[(entry - ELF_LOAD) as usize..], &code(true)[..]);
    }

    #[test]
    fn reset_vector_jumps_to_the_start_of_the_image() {
        let fw = firmware16();
        assert_eq!(fw.len(), FIRMWARE_SIZE);
        assert_eq!(fw.len() % 65536, 0);
        let r = FIRMWARE_SIZE - 16;
        assert_eq!(fw[r], 0xe9);
        let rel = u16::from_le_bytes([fw[r + 1], fw[r + 2]]);
        // IP 0xfff0 + 3 + rel wraps to 0 in the 64 KiB segment.
        assert_eq!(0xfff3u16.wrapping_add(rel), 0);
        assert_eq!(&fw[..code(false).len()], &code(false)[..]);
    }
}
