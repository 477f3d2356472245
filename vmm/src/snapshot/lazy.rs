//! Lazy restore: the guest runs before its memory is loaded. Guest RAM is a fresh memfd
//! (as for a boot) registered with a userfaultfd for missing pages; a pager thread
//! serves each page the first time a vCPU, KVM or a device touches it, from the snapshot
//! that holds it (the newest diff of the chain with that page, else the full one), and
//! meanwhile copies in the rest in address order, faults first. Pages that are zero in
//! the snapshot are not copied ahead (they would take memory a mapped restore does not):
//! they are served as zeros when touched, so the registration stays for the VM's life.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{MemoryRegion, PAGE_SIZE};
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestRam;
use crate::uffd::{Msg, Uffd, EVENT_PAGEFAULT};

/// Pages copied ahead per round between looks at the fault queue (1 MiB).
const PREFETCH_PAGES: usize = 256;

/// Where each page of guest RAM comes from.
pub struct Plan {
    /// The snapshot images, the full one first, then each diff, oldest first.
    pub sources: Vec<(File, PathBuf)>,
    /// The image layout (the same for every snapshot of a chain).
    pub regions: Vec<MemoryRegion>,
    /// For each page of RAM in guest-address order, the index of its source.
    pub owner: Vec<u8>,
}

impl Plan {
    /// A plan where every page is the full snapshot's; then [`Plan::apply_diff`].
    pub fn new(full: (File, PathBuf), regions: Vec<MemoryRegion>) -> Self {
        let pages: u64 = regions.iter().map(|r| r.size / PAGE_SIZE).sum();
        Self {
            sources: vec![full],
            regions,
            owner: vec![0; pages as usize],
        }
    }

    /// The page index of a guest address.
    fn index(&self, addr: u64) -> Option<usize> {
        let mut base = 0u64;
        for r in &self.regions {
            if addr >= r.guest_addr && addr < r.guest_addr + r.size {
                return usize::try_from(base + (addr - r.guest_addr) / PAGE_SIZE).ok();
            }
            base += r.size / PAGE_SIZE;
        }
        None
    }

    /// The guest address and image offset of page `index`.
    fn page(&self, index: usize) -> Option<(u64, u64)> {
        let mut base = 0u64;
        let index = index as u64;
        for r in &self.regions {
            let pages = r.size / PAGE_SIZE;
            if index < base + pages {
                let off = (index - base) * PAGE_SIZE;
                return Some((r.guest_addr + off, r.file_offset + off));
            }
            base += pages;
        }
        None
    }

    /// Lays a diff over the plan: its pages come from its image.
    pub fn apply_diff(
        &mut self,
        image: (File, PathBuf),
        pages: &[super::PageRange],
    ) -> Result<(), String> {
        let source = u8::try_from(self.sources.len())
            .map_err(|_| "more than 255 snapshots in the chain".to_string())?;
        for range in pages {
            for i in 0..range.pages {
                let addr = range.guest_addr + i * PAGE_SIZE;
                let index = self
                    .index(addr)
                    .ok_or_else(|| format!("page {addr:#x} is outside guest RAM"))?;
                self.owner[index] = source;
            }
        }
        self.sources.push(image);
        Ok(())
    }
}

/// A running pager: dropping it tells the thread to stop.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops the pager (once the vCPUs are gone) and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("pager thread panicked");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// What a pager did.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    faults: u64,
    faults_before_complete: u64,
    copied: u64,
    zero: u64,
}

/// The pager of one VM.
pub struct Pager {
    uffd: Uffd,
    plan: Plan,
    /// Host address of each region's start, in `plan.regions` order.
    hosts: Vec<u64>,
    /// Pages present in guest RAM.
    present: Vec<u64>,
}

impl Pager {
    /// Registers every region of `ram` with `uffd`; `ram` must be fresh (no page
    /// present) and laid out as `plan.regions`.
    pub fn new(uffd: Uffd, ram: &GuestRam, plan: Plan) -> Result<Self, String> {
        let mut hosts = Vec::new();
        for r in &plan.regions {
            let region = ram
                .mem
                .find_region(GuestAddress(r.guest_addr))
                .filter(|g| g.len() == r.size)
                .ok_or_else(|| {
                    format!("no RAM region of {} bytes at {:#x}", r.size, r.guest_addr)
                })?;
            let host = region.as_ptr() as u64;
            uffd.register(host, r.size)
                .map_err(|e| format!("registering guest RAM at {:#x}: {e}", r.guest_addr))?;
            hosts.push(host);
        }
        let words = plan.owner.len().div_ceil(64);
        Ok(Self {
            uffd,
            plan,
            hosts,
            present: vec![0; words],
        })
    }

    fn is_present(&self, i: usize) -> bool {
        self.present[i / 64] & (1 << (i % 64)) != 0
    }

    fn mark(&mut self, i: usize) {
        self.present[i / 64] |= 1 << (i % 64);
    }

    /// The host address of page `index`.
    fn host_of(&self, index: usize) -> Option<u64> {
        let (addr, _) = self.plan.page(index)?;
        let (k, r) = self
            .plan
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| addr >= r.guest_addr && addr < r.guest_addr + r.size)?;
        Some(self.hosts[k] + (addr - r.guest_addr))
    }

    /// The page index of a faulting host address.
    fn index_of_host(&self, host: u64) -> Option<usize> {
        let (k, r) = self
            .plan
            .regions
            .iter()
            .enumerate()
            .find(|(k, r)| host >= self.hosts[*k] && host < self.hosts[*k] + r.size)?;
        self.plan.index(r.guest_addr + (host - self.hosts[k]))
    }

    /// Reads page `index` from its source into `buf`; true when it is all zeros.
    fn read(&self, index: usize, buf: &mut [u8]) -> Result<bool, String> {
        let (_, offset) = self
            .plan
            .page(index)
            .ok_or_else(|| format!("page {index} is outside guest RAM"))?;
        let (file, path) = &self.plan.sources[usize::from(self.plan.owner[index])];
        file.read_exact_at(buf, offset)
            .map_err(|e| format!("reading {} at {offset:#x}: {e}", path.display()))?;
        Ok(buf.iter().all(|b| *b == 0))
    }

    /// Puts page `index` in place (its bytes, or zeros) and wakes whoever waits on it.
    fn serve(&mut self, index: usize, buf: &mut [u8]) -> Result<(), String> {
        if self.is_present(index) {
            return Ok(());
        }
        self.read(index, buf)?;
        self.place(index, buf)
    }

    /// Copies `buf`, page `index`'s bytes, into guest RAM.
    fn place(&mut self, index: usize, buf: &[u8]) -> Result<(), String> {
        let host = self
            .host_of(index)
            .ok_or_else(|| format!("page {index} has no host address"))?;
        loop {
            match self.uffd.copy(host, buf) {
                Ok(_) => break,
                // The mapping is changing (another thread's madvise): try again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(format!("UFFDIO_COPY at {host:#x}: {e}")),
            }
        }
        self.mark(index);
        Ok(())
    }

    /// Serves faults and copies the snapshot in, on a thread of its own, until the
    /// returned handle stops it (or is dropped); a failure stops the VM (a vCPU would
    /// otherwise wait on its page forever).
    pub fn spawn(mut self, exit: Arc<ExitSignal>) -> std::io::Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pager".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::Kind::Pager) {
                    exit.request(ExitReason::VmmError(format!("pager seccomp: {e}")));
                    return;
                }
                if let Err(e) = self.run(&flag) {
                    warn!(error = %e, "lazy restore failed; stopping the VM");
                    exit.request(ExitReason::VmmError(format!("lazy restore: {e}")));
                }
            })?;
        Ok(Running {
            stop,
            thread: Some(thread),
        })
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<(), String> {
        let started = Instant::now();
        let total = self.plan.owner.len();
        let mut next = 0usize;
        let mut tally = Tally::default();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut msgs = [Msg::default(); 16];
        let mut complete = false;
        while !stop.load(Ordering::Relaxed) {
            // Faults first: a vCPU is waiting on each.
            let n = self
                .uffd
                .read(&mut msgs)
                .map_err(|e| format!("reading faults: {e}"))?;
            for m in &msgs[..n] {
                if m.event != EVENT_PAGEFAULT {
                    continue;
                }
                let page = m.address & !(PAGE_SIZE - 1);
                let index = self
                    .index_of_host(page)
                    .ok_or_else(|| format!("a fault at {page:#x}, outside guest RAM"))?;
                self.serve(index, &mut buf)?;
                tally.faults += 1;
                if !complete {
                    tally.faults_before_complete += 1;
                }
            }
            if n > 0 {
                continue;
            }
            if next < total {
                let end = (next + PREFETCH_PAGES).min(total);
                for i in next..end {
                    if self.is_present(i) {
                        continue;
                    }
                    // Zero pages wait for a touch: copying them ahead would only take memory.
                    if self.read(i, &mut buf)? {
                        tally.zero += 1;
                        continue;
                    }
                    self.place(i, &buf)?;
                    tally.copied += 1;
                }
                next = end;
                continue;
            }
            if !complete {
                complete = true;
                info!(
                    pages_copied_ahead = tally.copied,
                    pages_faulted = tally.faults,
                    faults_before_complete = tally.faults_before_complete,
                    zero_pages_left = tally.zero,
                    ms = started.elapsed().as_millis() as u64,
                    "lazy restore: every data page of the snapshot is in guest memory"
                );
            }
            // Only zero pages are left: wait for their faults.
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let rc =
                unsafe { libc::poll(&mut pfd, 1, Duration::from_millis(200).as_millis() as i32) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(format!("poll: {e}"));
                }
            }
        }
        for (k, r) in self.plan.regions.iter().enumerate() {
            let _ = self.uffd.unregister(self.hosts[k], r.size);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_finds_each_page_and_lays_diffs_over_it() {
        let f = || (tempfile_like(), PathBuf::from("/x"));
        let regions = vec![
            MemoryRegion {
                guest_addr: 0,
                size: 4 * PAGE_SIZE,
                file_offset: 0,
            },
            MemoryRegion {
                guest_addr: 0x1_0000_0000,
                size: 2 * PAGE_SIZE,
                file_offset: 4 * PAGE_SIZE,
            },
        ];
        let mut plan = Plan::new(f(), regions);
        assert_eq!(plan.owner.len(), 6);
        assert_eq!(plan.index(0x1_0000_1000), Some(5));
        assert_eq!(plan.page(5), Some((0x1_0000_1000, 5 * PAGE_SIZE)));
        assert_eq!(plan.index(4 * PAGE_SIZE), None, "the hole between regions");
        plan.apply_diff(
            f(),
            &[super::super::PageRange {
                guest_addr: PAGE_SIZE,
                pages: 2,
            }],
        )
        .unwrap();
        assert_eq!(plan.owner, [0, 1, 1, 0, 0, 0]);
        let e = plan
            .apply_diff(
                f(),
                &[super::super::PageRange {
                    guest_addr: 0x2_0000_0000,
                    pages: 1,
                }],
            )
            .unwrap_err();
        assert!(e.contains("outside guest RAM"), "{e}");
    }

    fn tempfile_like() -> File {
        File::open("/dev/null").unwrap()
    }
}
