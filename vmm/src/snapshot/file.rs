//! The snapshot's state file: one header line, then the state as JSON.
//!
//! ```text
//! QUANTIX-VMSTATE 1.0 <body bytes> <CRC-64/ECMA-182 of the body, 16 hex digits>\n
//! {"config": ..., "vcpus": [...], ...}
//! ```
//!
//! A person reads it with `tail -n +2 vmstate | jq`. A reader checks, before parsing any
//! JSON: the magic, the format version (same major; a minor at most ours), the body's
//! size against the header and against [`MAX_STATE_BYTES`], and the checksum. A writer
//! writes a temporary file beside the target, syncs it and renames it over the target,
//! so that a crash or a full disk never leaves a half-written state under the real name.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The first word of a state file.
pub const MAGIC: &str = "QUANTIX-VMSTATE";
/// The format's major version: a reader refuses any other.
pub const FORMAT_MAJOR: u16 = 1;
/// The format's minor version: a reader refuses a newer one (it would hold fields this
/// reader does not know), accepts an older one.
pub const FORMAT_MINOR: u16 = 0;
/// The largest state body read (a 255-vCPU VM's state is about 6 MiB).
pub const MAX_STATE_BYTES: u64 = 32 << 20;
/// The longest header line.
const MAX_HEADER: usize = 128;

// Slicing by 16: a restore checks the whole body before parsing it, and every cycle of
// a VMM's start counts under nested virtualisation.
const CRC: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_ECMA_182);

/// Why a state file could not be read or written.
#[derive(Debug, Error)]
pub enum StateFileError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a state file, or a broken one.
    #[error("not a valid quantix-vmm state file: {0}")]
    Corrupt(String),
    /// A format version this reader does not take.
    #[error("state file format {major}.{minor} is not supported (this quantix-vmm reads {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR})")]
    Version {
        /// The file's major version.
        major: u16,
        /// The file's minor version.
        minor: u16,
    },
    /// The body is larger than any state this VMM writes.
    #[error("state body of {0} bytes is over the {MAX_STATE_BYTES}-byte limit")]
    TooLarge(u64),
}

fn corrupt(reason: impl Into<String>) -> StateFileError {
    StateFileError::Corrupt(reason.into())
}

/// The checksum of a state body (a child diff records its parent's, so that a chain
/// cannot be pointed at another VM's snapshot).
pub fn checksum(body: &[u8]) -> u64 {
    CRC.checksum(body)
}

/// Opens `path` for reading: a regular file, not followed through a symlink, never
/// blocking (a FIFO put in its place is refused instead of hanging the reader).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// A state body with its header, as written to disk.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{MAGIC} {FORMAT_MAJOR}.{FORMAT_MINOR} {} {:016x}\n",
        body.len(),
        CRC.checksum(body)
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The body of a whole state file's bytes, once its header, size and checksum check out.
pub fn decode(bytes: &[u8]) -> Result<&[u8], StateFileError> {
    let end = bytes
        .iter()
        .take(MAX_HEADER)
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no header line"))?;
    let header =
        std::str::from_utf8(&bytes[..end]).map_err(|_| corrupt("the header is not text"))?;
    let words: Vec<&str> = header.split(' ').collect();
    let [magic, version, size, crc] = words[..] else {
        return Err(corrupt(format!("header {header:?} does not have 4 fields")));
    };
    if magic != MAGIC {
        return Err(corrupt(format!("it starts with {magic:?}, not {MAGIC}")));
    }
    let (major, minor) = version
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
        .ok_or_else(|| corrupt(format!("version {version:?} is not MAJOR.MINOR")))?;
    if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
        return Err(StateFileError::Version { major, minor });
    }
    let size: u64 = size
        .parse()
        .map_err(|_| corrupt(format!("size {size:?} is not a number")))?;
    if size > MAX_STATE_BYTES {
        return Err(StateFileError::TooLarge(size));
    }
    let body = &bytes[end + 1..];
    if body.len() as u64 != size {
        return Err(corrupt(format!(
            "the header says {size} bytes of state, the file holds {} (truncated or appended to)",
            body.len()
        )));
    }
    let want = u64::from_str_radix(crc, 16)
        .ok()
        .filter(|_| crc.len() == 16)
        .ok_or_else(|| corrupt(format!("checksum {crc:?} is not 16 hex digits")))?;
    let got = CRC.checksum(body);
    if got != want {
        return Err(corrupt(format!(
            "checksum mismatch (header {want:016x}, contents {got:016x}): the file is damaged"
        )));
    }
    Ok(body)
}

/// Reads the state file at `path` and returns its checked body.
pub fn read(path: &Path) -> Result<Vec<u8>, StateFileError> {
    let io = |source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = open_regular(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let limit = MAX_STATE_BYTES + MAX_HEADER as u64;
    if len > limit {
        return Err(StateFileError::TooLarge(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    Ok(decode(&bytes)?.to_vec())
}

/// Writes `body` as the state file `path`: to a temporary file beside it, synced, then
/// renamed over `path` (and the directory synced), so that `path` is either the old file
/// or the whole new one.
pub fn write(path: &Path, body: &[u8]) -> Result<(), StateFileError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StateFileError::Io { path: p, source }
    };
    if body.len() as u64 > MAX_STATE_BYTES {
        return Err(StateFileError::TooLarge(body.len() as u64));
    }
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&encode(body)).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let body = br#"{"a":1}"#;
        let file = encode(body);
        assert!(file.starts_with(b"QUANTIX-VMSTATE 1.0 7 "));
        assert_eq!(decode(&file).unwrap(), body);
    }

    #[test]
    fn every_kind_of_damage_is_refused_before_parsing() {
        let good = encode(br#"{"vcpus":[]}"#);
        let text = String::from_utf8(good.clone()).unwrap();
        let (header, body) = text.split_once('\n').unwrap();
        let fields: Vec<&str> = header.split(' ').collect();
        let with = |i: usize, v: &str| {
            let mut f = fields.clone();
            f[i] = v;
            format!("{}\n{body}", f.join(" ")).into_bytes()
        };
        let err = |b: &[u8]| decode(b).unwrap_err().to_string();

        assert!(err(b"").contains("no header line"));
        assert!(err(&[b'x'; 200]).contains("no header line"));
        assert!(err(&with(0, "QEMU-VMSTATE")).contains("not QUANTIX-VMSTATE"));
        assert!(matches!(
            decode(&with(1, "2.0")),
            Err(StateFileError::Version { major: 2, minor: 0 })
        ));
        assert!(matches!(
            decode(&with(1, "1.1")),
            Err(StateFileError::Version { major: 1, minor: 1 })
        ));
        assert!(err(&with(1, "one")).contains("MAJOR.MINOR"));
        assert!(err(&with(2, "-1")).contains("not a number"));
        assert!(matches!(
            decode(&with(2, "99999999999")),
            Err(StateFileError::TooLarge(99_999_999_999))
        ));
        assert!(err(&with(3, "xyz")).contains("16 hex digits"));
        // Truncated, appended to, or one byte flipped.
        assert!(err(&good[..good.len() - 1]).contains("truncated"));
        let mut longer = good.clone();
        longer.push(b' ');
        assert!(err(&longer).contains("appended"));
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        assert!(err(&flipped).contains("checksum mismatch"));
        assert!(err(b"QUANTIX-VMSTATE 1.0 0\n").contains("4 fields"));
    }

    #[test]
    fn write_replaces_whole_files_and_read_checks_them() {
        let dir = std::env::temp_dir().join(format!("qx-statefile-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmstate");
        write(&path, b"{\"first\":true}").unwrap();
        write(&path, b"{\"second\":true}").unwrap();
        assert_eq!(read(&path).unwrap(), b"{\"second\":true}");
        assert!(!dir.join("vmstate.tmp").exists());
        fs::write(&path, b"garbage\n").unwrap();
        assert!(matches!(read(&path), Err(StateFileError::Corrupt(_))));
        let missing = read(&dir.join("absent")).unwrap_err().to_string();
        assert!(missing.contains("absent"), "{missing}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
