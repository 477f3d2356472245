//! Hand-made guests and helpers to run the real `quantix-vmm` binary on this host's /dev/kvm.

#![allow(dead_code)]

pub mod nested;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The VMM binary built by cargo for this test run.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_quantix-vmm")
}

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qx-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// x86 machine code snippets (64-bit and 16-bit encodings are the same for these).
pub mod asm {
    /// `mov dx, port` (with operand-size prefix in 64-bit mode).
    pub fn mov_dx(port: u16, long_mode: bool) -> Vec<u8> {
        let mut v = if long_mode { vec![0x66] } else { vec![] };
        v.push(0xba);
        v.extend_from_slice(&port.to_le_bytes());
        v
    }
    /// `mov al, imm8; out dx, al`.
    pub fn out_al(value: u8) -> Vec<u8> {
        vec![0xb0, value, 0xee]
    }
    /// Writes `text` to COM1.
    pub fn print(text: &[u8], long_mode: bool) -> Vec<u8> {
        let mut v = mov_dx(0x3f8, long_mode);
        for b in text {
            v.extend(out_al(*b));
        }
        v
    }
    /// Writes `value` to `port`.
    pub fn outb(port: u16, value: u8, long_mode: bool) -> Vec<u8> {
        let mut v = mov_dx(port, long_mode);
        v.extend(out_al(value));
        v
    }
    /// `hlt; jmp $-1`: park the vCPU.
    pub const HALT_LOOP: [u8; 3] = [0xf4, 0xeb, 0xfd];
    /// `jmp $`: spin forever.
    pub const SPIN: [u8; 2] = [0xeb, 0xfe];
    /// ACPI S5 through the sleep control register (port 0x600).
    pub fn acpi_poweroff(long_mode: bool) -> Vec<u8> {
        outb(0x600, (5 << 2) | (1 << 5), long_mode)
    }
}

/// Wraps 64-bit code in a minimal ELF64 executable loaded at 16 MiB, entered in long mode
/// through the Linux 64-bit boot protocol (no PVH note).
pub fn elf64(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let entry = LOAD + (EHDR + PHDR) as u64;
    let total = (EHDR + PHDR + code.len()) as u64;
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF");
    v.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&62u16.to_le_bytes()); // x86_64
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&entry.to_le_bytes());
    v.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    v.extend_from_slice(&(EHDR as u16).to_le_bytes());
    v.extend_from_slice(&(PHDR as u16).to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    v.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(v.len(), EHDR);
    v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v.extend_from_slice(&7u32.to_le_bytes()); // RWX
    v.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    v.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    v.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
    v.extend_from_slice(&total.to_le_bytes()); // p_filesz
    v.extend_from_slice(&total.to_le_bytes()); // p_memsz
    v.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(v.len(), EHDR + PHDR);
    v.extend_from_slice(code);
    v
}

/// A 4 KiB real-mode firmware image: `code` at its start (IP 0xf000 in segment 0xf000),
/// and a jump to it at the reset vector (offset 0xff0).
pub fn firmware16(code: &[u8]) -> Vec<u8> {
    assert!(code.len() < 0xff0);
    let mut img = vec![0xf4u8; 4096];
    img[..code.len()].copy_from_slice(code);
    // jmp near 0xf000 from IP 0xfff0: rel16 = 0xf000 - 0xfff3.
    let rel = 0xf000u16.wrapping_sub(0xfff3);
    img[0xff0] = 0xe9;
    img[0xff1..0xff3].copy_from_slice(&rel.to_le_bytes());
    img
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs the VMM to completion with a wall-clock limit; kills it on time-out.
pub fn run_vmm(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_limit(child, limit)
}

/// Waits for `child` at most `limit`; kills it and panics on time-out.
pub fn wait_limit(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "quantix-vmm did not exit within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The exit code, stdout and stderr of a run, for assertions with context.
pub fn summary(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
