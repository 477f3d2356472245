//! glibc's lazy file reads, done before any filter is installed.
//!
//! glibc's malloc reads two kernel files lazily, from whichever thread gets there first,
//! and caches the answer for the process:
//!
//! - the CPU count (`/sys/devices/system/cpu/online`, or `sched_getaffinity`), to size its
//!   arenas the first time a thread needs a new arena past eight;
//! - `/proc/sys/vm/overcommit_memory`, the first time a heap of a thread's arena shrinks
//!   (`shrink_heap` in `arena.c`: a thread frees enough that its heap's top passes the trim
//!   threshold, 128 KiB by default).
//!
//! Under the device filter (no `openat`) either one kills the VMM on a thread that did
//! nothing wrong: CI saw `refused syscall 257 on thread virtio-net1 (filter device)` as a
//! VM stopped. Cloud Hypervisor met the same reads and allows a read-only `openat` on every
//! thread; we keep `openat` out of the device and vCPU filters and instead settle both
//! answers here, at start: the arena count is fixed (`M_ARENA_MAX`, so glibc never asks),
//! and one heap shrink on a thread of its own makes glibc read and cache the sysctl (a jail
//! without `/proc` caches "no", glibc's answer when the file cannot be opened).

/// How many arenas glibc may create (its default on this machine kind would be 8 × CPUs).
const ARENA_MAX: libc::c_int = 8;
/// What the priming thread allocates and frees: past the default trim threshold (128 KiB),
/// in blocks below the mmap threshold (so they come from the arena's heap) and above the
/// tcache's largest size (so that freeing them returns them to the heap). Small, and
/// touched one byte per block: every page fault counts at a VMM's start (under nested
/// virtualisation one costs tens of µs).
const PRIME_BLOCKS: usize = 24;
const PRIME_BLOCK_BYTES: usize = 8192;

/// Settles glibc's lazy reads (see the module's documentation). Call once, before any
/// thread installs a filter.
pub fn settle() {
    // SAFETY: mallopt takes two integers and changes only malloc's parameters.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) };
    // The thread gets an arena of its own (not the main one, which grows by brk and
    // trims without the sysctl); the join waits for the free, and so for the read.
    let primed = std::thread::Builder::new()
        .name("malloc-prime".into())
        .spawn(shrink_a_heap)
        .map(|t| t.join());
    if !matches!(primed, Ok(Ok(()))) {
        // Without the thread glibc reads the sysctl later, where a filter may refuse it.
        tracing::warn!("cannot prime glibc's malloc on a thread of its own");
    }
}

/// Grows the calling thread's heap past the trim threshold and frees it all.
fn shrink_a_heap() {
    let blocks: Vec<Vec<u8>> = (0..PRIME_BLOCKS)
        .map(|i| {
            let mut b = Vec::with_capacity(PRIME_BLOCK_BYTES);
            b.push(i as u8 | 1);
            b
        })
        .collect();
    // Keep the allocations observable, so that they are not optimised away.
    let sum: usize = blocks.iter().map(|b| usize::from(b[0])).sum();
    std::hint::black_box(sum);
    drop(blocks);
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static OPENS: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn count(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        OPENS.fetch_add(1, Ordering::SeqCst);
        // The refused call returns EACCES to glibc, which then goes on without the file.
        // SAFETY: a SA_SIGINFO handler's third argument is the thread's ucontext_t.
        unsafe {
            (*(ctx as *mut libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RAX as usize] =
                -i64::from(libc::EACCES);
        }
    }

    /// In a child process (see below): a thread under a filter that traps `openat` frees a
    /// heap's worth of memory; prints how many opens it trapped.
    #[test]
    fn child_frees_memory_under_a_filter() {
        let Ok(mode) = std::env::var("QX_GLIBC_CHILD") else {
            return; // only run as the child of the test below
        };
        if mode == "settle" {
            settle();
        }
        // SAFETY: a zeroed sigaction is valid; the handler only counts and sets RAX.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = count as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: a valid sigaction; the old one is not kept.
        let installed = unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) };
        assert_eq!(installed, 0);
        let mut rules = BTreeMap::new();
        rules.insert(libc::SYS_openat, Vec::<SeccompRule>::new());
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Trap,
            TargetArch::x86_64,
        )
        .unwrap();
        let prog = BpfProgram::try_from(filter).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            shrink_a_heap();
        })
        .join()
        .unwrap();
        println!("QX-OPENS={}", OPENS.load(Ordering::SeqCst));
    }

    fn opens_in_child(mode: &str) -> usize {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::glibc::tests::child_frees_memory_under_a_filter",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("QX_GLIBC_CHILD", mode)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The harness prints the test's name on the same line.
        text.split("QX-OPENS=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no count in {text}"))
            .parse()
            .unwrap()
    }

    #[test]
    #[cfg(target_env = "gnu")]
    fn a_settled_glibc_opens_nothing_when_a_filtered_thread_frees_memory() {
        // Without settling, glibc opens the overcommit sysctl from the filtered thread:
        // the failure CI saw, and the proof that this test can fail.
        assert!(
            opens_in_child("none") >= 1,
            "glibc no longer reads the sysctl lazily?"
        );
        assert_eq!(opens_in_child("settle"), 0);
    }
}
