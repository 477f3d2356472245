//! virtio-blk on a raw image file.
//!
//! Requests are served on the device's worker thread with positional reads and writes
//! (`pread`/`pwrite`), in chunks of at most [`CHUNK`] bytes, so a slow disk holds up only
//! its own queue, never a vCPU or another device. An acknowledged flush is an `fdatasync`
//! of the image. Every guest-supplied sector, length and address is checked; a bad
//! request completes with `VIRTIO_BLK_S_IOERR` (or `UNSUPP`) and is counted.

mod request;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tracing::warn;
use virtio_queue::Queue;

use crate::worker::{QueueHandler, Worker};
use crate::{
    device_type, features, serve_queue, ActivateContext, ActivateError, GuestMemory, Interrupt,
    QueueError, VirtioDevice,
};

pub use request::{RequestType, Status, CHUNK, SECTOR_SIZE};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request the driver may use.
pub const SEG_MAX: u32 = (QUEUE_SIZE as u32) - 2;
/// Most discard / write-zeroes segments per request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Length of the serial number returned by GET_ID.
pub const ID_BYTES: usize = 20;

/// Block device feature bits.
pub mod feature {
    /// Maximum number of segments in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command.
    pub const FLUSH: u64 = 1 << 9;
    /// Discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Errors opening a disk image.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a regular file or block device.
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    /// The image is smaller than one sector.
    #[error("disk image {path} is {size} bytes; a disk needs at least one 512-byte sector")]
    TooSmall {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// Counters of one disk.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Read requests completed.
    pub reads: AtomicU64,
    /// Write requests completed.
    pub writes: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Bytes read from the image.
    pub read_bytes: AtomicU64,
    /// Bytes written to the image.
    pub write_bytes: AtomicU64,
    /// Requests that failed with an I/O error on the host.
    pub io_errors: AtomicU64,
    /// Malformed requests from the guest (bad sector, length, address or layout).
    pub invalid: AtomicU64,
}

/// A disk: an image file and what the guest is told about it.
pub struct Block {
    name: String,
    file: Arc<File>,
    capacity_sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
}

impl Block {
    /// Opens `path` (read-only if `readonly`) as disk `name`; `id` is its serial (GET_ID).
    pub fn open(name: &str, path: &Path, readonly: bool, id: &str) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(BlockError::NotAFile(path.to_path_buf()));
        }
        let size = if ft.is_block_device() {
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0)).map_err(open_err)?
        } else {
            meta.len()
        };
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall {
                path: path.to_path_buf(),
                size,
            });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            warn!(
                disk = name,
                size, "image size is not a multiple of 512; the tail is not visible to the guest"
            );
        }
        let capacity_sectors = size / SECTOR_SIZE;
        let mut serial = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            name: name.to_string(),
            file: Arc::new(file),
            capacity_sectors,
            readonly,
            id: serial,
            config: config_space(capacity_sectors),
            counters: Arc::default(),
            worker: None,
        })
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }
}

/// A disk for the fuzz targets: `file` of `sectors` sectors, with a fixed serial.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_disk(file: File, sectors: u64, readonly: bool) -> request::Disk {
    request::Disk {
        file: Arc::new(file),
        capacity_sectors: sectors,
        readonly,
        id: *b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0",
        counters: Arc::default(),
    }
}

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4), 60 bytes.
fn config_space(capacity: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
    let max_sectors = u32::MAX / SECTOR_SIZE as u32;
    c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let common = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH;
        if self.readonly {
            common | feature::RO
        } else {
            common | feature::DISCARD | feature::WRITE_ZEROES
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx.take_ready_queue(0)?;
        let handler = BlockHandler {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            disk: request::Disk {
                file: self.file.clone(),
                capacity_sectors: self.capacity_sectors,
                readonly: self.readonly,
                id: self.id,
                counters: self.counters.clone(),
            },
            broken: false,
            name: self.name.clone(),
        };
        self.worker = Some(Worker::spawn(
            format!("virtio-{}", self.name),
            ctx.queue_evts,
            handler,
        )?);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

struct BlockHandler {
    mem: Arc<GuestMemory>,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    disk: request::Disk,
    broken: bool,
    name: String,
}

impl BlockHandler {
    fn process_queue(&mut self) -> Result<(), QueueError> {
        let disk = &self.disk;
        serve_queue(
            &mut self.queue,
            self.mem.as_ref(),
            &self.interrupt,
            |chain| disk.execute(self.mem.as_ref(), chain),
        )
    }
}

impl QueueHandler for BlockHandler {
    fn process(&mut self, _index: usize) {
        if self.broken {
            return;
        }
        if let Err(e) = self.process_queue() {
            warn!(disk = %self.name, error = %e, "virtio-blk queue is broken; the device needs a reset");
            self.disk.counters.invalid.fetch_add(1, Ordering::Relaxed);
            self.broken = true;
            self.interrupt.signal_config();
        }
    }
}
