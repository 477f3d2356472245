//! Post-copy: the guest switches to the destination before all its memory is there. The
//! destination punches the pages it lacks out of its memfd and registers its RAM with a
//! userfaultfd; a guest (or device) touch of a missing page asks the source for it
//! (`page-request`), while the source streams every missing page in the background;
//! `complete` ends it. A failure in this phase cannot fall back (the guest ran on both
//! sides' halves): the destination stops the VM with the reason.

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{info, warn};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::protocol::{self, Kind, Message};
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestRam;
use crate::snapshot::{MemoryRegion, PageRange, PAGE_SIZE};
use crate::uffd::{Msg, Uffd, EVENT_PAGEFAULT};

/// How long a failed post-copy waits for the VM's stop to begin before it wakes the
/// threads that wait on missing pages.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// A set of guest pages, one bit each, shared between threads.
pub struct PageSet {
    regions: Vec<MemoryRegion>,
    words: Vec<Vec<AtomicU64>>,
    count: AtomicU64,
}

impl PageSet {
    /// The pages of `bitmaps` (one per region, as the dirty log has them).
    pub fn new(regions: &[MemoryRegion], bitmaps: &[Vec<u64>]) -> Self {
        let words: Vec<Vec<AtomicU64>> = bitmaps
            .iter()
            .map(|b| b.iter().map(|w| AtomicU64::new(*w)).collect())
            .collect();
        let count = bitmaps
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        PageSet {
            regions: regions.to_vec(),
            words,
            count: AtomicU64::new(count),
        }
    }

    fn locate(&self, gpa: u64) -> Option<(usize, usize, u64)> {
        let (i, r) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| gpa >= r.guest_addr && gpa < r.guest_addr + r.size)?;
        let page = (gpa - r.guest_addr) / PAGE_SIZE;
        Some((i, (page / 64) as usize, 1 << (page % 64)))
    }

    /// Whether the page at `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .and_then(|(r, w, bit)| {
                self.words
                    .get(r)?
                    .get(w)
                    .map(|a| a.load(Ordering::Acquire) & bit != 0)
            })
            .unwrap_or(false)
    }

    /// Takes the page at `gpa` out; whether it was in.
    pub fn remove(&self, gpa: u64) -> bool {
        let Some(word) = self
            .locate(gpa)
            .and_then(|(r, w, bit)| Some((self.words.get(r)?.get(w)?, bit)))
        else {
            return false;
        };
        let was = word.0.fetch_and(!word.1, Ordering::AcqRel) & word.1 != 0;
        if was {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        was
    }

    /// Pages left.
    pub fn remaining(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// The set's pages as runs, in address order.
    pub fn ranges(&self) -> Vec<PageRange> {
        let bitmaps: Vec<Vec<u64>> = self
            .words
            .iter()
            .map(|v| v.iter().map(|a| a.load(Ordering::Acquire)).collect())
            .collect();
        crate::snapshot::memory::dirty_ranges(&self.regions, &bitmaps)
    }
}

/// Guest RAM's host mapping, to turn a faulting host address into a guest address.
struct HostMap(Vec<(u64, u64, u64)>);

impl HostMap {
    fn of(ram: &GuestRam) -> Self {
        HostMap(
            ram.mem
                .iter()
                .map(|r| (r.as_ptr() as u64, r.len(), r.start_addr().0))
                .collect(),
        )
    }
    fn guest(&self, host: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|(h, len, _)| host >= *h && host < h + len)
            .map(|(h, _, g)| g + ((host - h) & !(PAGE_SIZE - 1)))
    }
    fn host(&self, gpa: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|(_, len, g)| gpa >= *g && gpa < g + len)
            .map(|(h, _, g)| h + (gpa - g))
    }
}

/// The destination's side, prepared before the switch.
pub struct Incoming {
    uffd: Arc<Uffd>,
    missing: Arc<PageSet>,
    map: Arc<HostMap>,
}

impl Incoming {
    /// Punches the `missing` pages (stale copies from earlier rounds) out of `ram`'s
    /// memfd and registers its regions with a userfaultfd from `device` (as a lazy
    /// restore opens it). Nothing may touch guest memory from here until [`Incoming::spawn`].
    pub fn prepare(
        ram: &GuestRam,
        regions: &[MemoryRegion],
        missing: &[Vec<u64>],
        device: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let set = PageSet::new(regions, missing);
        for r in set.ranges() {
            ram.punch_hole(r.guest_addr, r.pages * PAGE_SIZE)
                .map_err(|e| format!("dropping stale pages at {:#x}: {e}", r.guest_addr))?;
        }
        let uffd = Uffd::open(device).map_err(|e| format!("no userfaultfd for post-copy: {e}"))?;
        for r in ram.mem.iter() {
            uffd.register(r.as_ptr() as u64, r.len())
                .map_err(|e| format!("registering guest RAM with the userfaultfd: {e}"))?;
        }
        info!(missing = set.remaining(), "post-copy: guest RAM registered");
        Ok(Incoming {
            uffd: Arc::new(uffd),
            missing: Arc::new(set),
            map: Arc::new(HostMap::of(ram)),
        })
    }

    /// Serves the guest's faults and places the pages the source sends, on two threads,
    /// until `complete`; `reader` receives from the source, `writer` (shared with the
    /// caller's own replies) sends to it. A failure stops the VM.
    pub fn spawn(
        self,
        mut reader: UnixStream,
        writer: Arc<Mutex<UnixStream>>,
        regions: Vec<MemoryRegion>,
        exit: Arc<ExitSignal>,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let done = Arc::new(AtomicBool::new(false));
        let (uffd, missing, map) = (self.uffd.clone(), self.missing.clone(), self.map.clone());
        let (stop, fault_exit) = (done.clone(), exit.clone());
        let faults = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::Kind::Pager) {
                    fault_exit.request(ExitReason::VmmError(format!("post-copy: {e}")));
                    return;
                }
                if let Err(e) = serve_faults(&uffd, &missing, &map, &writer, &stop) {
                    if !stop.load(Ordering::Acquire) {
                        fault_exit.request(ExitReason::VmmError(format!("post-copy: {e}")));
                    }
                }
            })?;
        let (uffd, missing, map) = (self.uffd, self.missing, self.map);
        let pages = std::thread::Builder::new()
            .name("postcopy-pages".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::Kind::Pager) {
                    exit.request(ExitReason::VmmError(format!("post-copy: {e}")));
                    return;
                }
                let result = place_pages(&uffd, &missing, &map, &mut reader, &regions);
                done.store(true, Ordering::Release);
                match result {
                    Ok(()) => {
                        // Every page is in: the rest of RAM behaves as any memory again.
                        for (host, len, _) in &map.0 {
                            if let Err(e) = uffd.unregister(*host, *len) {
                                warn!(error = %e, "post-copy: cannot unregister guest RAM");
                            }
                        }
                        info!("post-copy complete: every page is here");
                    }
                    Err(e) => {
                        exit.request(ExitReason::VmmError(format!(
                            "post-copy failed with {} pages not received: {e}",
                            missing.remaining()
                        )));
                        // A vCPU or device waiting on a missing page cannot stop while it
                        // waits. Once the stop is under way (its flag is set before the
                        // vCPUs are joined), the registration ends, which wakes them: each
                        // sees the stop before the guest runs again.
                        std::thread::sleep(STOP_GRACE);
                        for (host, len, _) in &map.0 {
                            let _ = uffd.unregister(*host, *len);
                        }
                    }
                }
            })?;
        Ok(vec![faults, pages])
    }
}

/// The fault thread: asks the source for each missing page the guest touches; a page not
/// in the missing set (a zero page the source never sent) is filled with zeros here.
fn serve_faults(
    uffd: &Uffd,
    missing: &PageSet,
    map: &HostMap,
    writer: &Mutex<UnixStream>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let zeros = vec![0u8; PAGE_SIZE as usize];
    let mut requested = HashSet::new();
    let mut msgs = [Msg::default(); 16];
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a 100 ms limit so that `stop` is seen.
        let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll on the userfaultfd: {e}"));
        }
        let n = uffd
            .read(&mut msgs)
            .map_err(|e| format!("reading the userfaultfd: {e}"))?;
        for m in &msgs[..n] {
            if m.event != EVENT_PAGEFAULT {
                continue;
            }
            let Some(gpa) = map.guest(m.address) else {
                return Err(format!("a fault at {:#x}, outside guest RAM", m.address));
            };
            if missing.contains(gpa) {
                if requested.insert(gpa) {
                    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    protocol::send(&mut *w, Kind::PageRequest, &gpa.to_le_bytes())
                        .map_err(|e| format!("asking the source for {gpa:#x}: {e}"))?;
                }
            } else if let Some(host) = map.host(gpa) {
                place(uffd, host, &zeros)?;
            }
        }
    }
    Ok(())
}

/// Copies `data` in at `host` (a page or more), waking whoever waits on it.
fn place(uffd: &Uffd, host: u64, data: &[u8]) -> Result<(), String> {
    loop {
        match uffd.copy(host, data) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => return Err(format!("UFFDIO_COPY at {host:#x}: {e}")),
        }
    }
}

/// The page thread: places every page the source sends that is still missing, until
/// `complete`.
fn place_pages(
    uffd: &Uffd,
    missing: &PageSet,
    map: &HostMap,
    reader: &mut UnixStream,
    regions: &[MemoryRegion],
) -> Result<(), String> {
    let zeros = vec![0u8; PAGE_SIZE as usize];
    loop {
        match protocol::receive(reader, regions).map_err(|e| e.to_string())? {
            Message::Memory(batch) => {
                for (range, data) in batch.pieces() {
                    for p in 0..u64::from(range.pages) {
                        let gpa = range.addr + p * PAGE_SIZE;
                        if !missing.contains(gpa) {
                            continue;
                        }
                        let host = map
                            .host(gpa)
                            .ok_or_else(|| format!("no mapping for {gpa:#x}"))?;
                        let page = match data {
                            Some(d) => &d[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize],
                            None => &zeros[..],
                        };
                        // Placed first, then out of the set: the fault thread fills a page
                        // outside the set with zeros, which must never beat the real bytes
                        // (a copy onto a present page fails with EEXIST and changes nothing).
                        place(uffd, host, page)?;
                        missing.remove(gpa);
                    }
                }
            }
            Message::Complete if missing.remaining() == 0 => return Ok(()),
            Message::Complete => {
                return Err(format!(
                    "the source says complete with {} pages never sent",
                    missing.remaining()
                ))
            }
            Message::Abandon(why) => return Err(format!("the source gave up: {why}")),
            other => return Err(format!("expected pages, got {}", other.name())),
        }
    }
}

/// A writer for the source's replies, shared with the fault thread.
pub fn shared_writer(conn: &UnixStream) -> std::io::Result<Arc<Mutex<UnixStream>>> {
    Ok(Arc::new(Mutex::new(conn.try_clone()?)))
}
