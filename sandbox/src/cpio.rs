//! A writer for `newc` cpio archives, the format of Linux initramfs images.
//!
//! Entries are written in the order given; parent directories are created on
//! demand (the kernel's unpacker does not create them). Paths are absolute or
//! relative, always normalised to the relative form the kernel expects
//! (`bin/busybox`). Owner is root, mtime is 0, so archives are reproducible.
//! Archives may be concatenated: the kernel unpacks them one after the other,
//! later entries overwriting earlier ones.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

const MAGIC: &[u8] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc archive to `W`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
    dirs: BTreeSet<String>,
}

/// One entry's header fields that vary.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
            dirs: BTreeSet::new(),
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Adds a directory (and its missing parents). Adding an existing one is a no-op.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = normalise(path)?;
        if path.is_empty() {
            return Ok(());
        }
        self.parents(&path)?;
        self.dir_entry(&path, mode)
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let mut reader = data;
        self.file_from(path, mode, data.len() as u64, &mut reader)
    }

    /// Adds a regular file of `len` bytes read from `reader` (streamed, not
    /// buffered). Fails if the reader yields a different number of bytes.
    pub fn file_from(
        &mut self,
        path: &str,
        mode: u32,
        len: u64,
        reader: &mut dyn Read,
    ) -> io::Result<()> {
        let path = normalise(path)?;
        let size = u32::try_from(len)
            .map_err(|_| invalid(format!("{path}: {len} bytes is too large for a cpio entry")))?;
        self.parents(&path)?;
        self.header(&Header {
            name: &path,
            mode: S_IFREG | (mode & 0o7777),
            nlink: 1,
            size,
            rdev: (0, 0),
        })?;
        let copied = io::copy(&mut reader.take(len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: expected {len} bytes, got {copied}"),
            ));
        }
        self.written += copied;
        self.pad()
    }

    /// Adds a symbolic link `path` pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalise(path)?;
        let size = u32::try_from(target.len()).map_err(|_| invalid("symlink target too long"))?;
        self.parents(&path)?;
        self.header(&Header {
            name: &path,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            size,
            rdev: (0, 0),
        })?;
        self.raw(target.as_bytes())?;
        self.pad()
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1).
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = normalise(path)?;
        self.parents(&path)?;
        self.header(&Header {
            name: &path,
            mode: S_IFCHR | (mode & 0o7777),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(&Header {
            name: TRAILER,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        })?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut end = 0;
        while let Some(pos) = path[end..].find('/') {
            let parent = &path[..end + pos];
            if !self.dirs.contains(parent) {
                let parent = parent.to_string();
                self.dir_entry(&parent, 0o755)?;
            }
            end += pos + 1;
        }
        Ok(())
    }

    fn dir_entry(&mut self, path: &str, mode: u32) -> io::Result<()> {
        if self.dirs.contains(path) {
            return Ok(());
        }
        self.header(&Header {
            name: path,
            mode: S_IFDIR | (mode & 0o7777),
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        })?;
        self.dirs.insert(path.to_string());
        Ok(())
    }

    fn header(&mut self, h: &Header<'_>) -> io::Result<()> {
        let name_size = h.name.len() + 1;
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime
            h.size,
            0, // devmajor
            0, // devminor
            h.rdev.0,
            h.rdev.1,
            u32::try_from(name_size).map_err(|_| invalid("name too long"))?,
            0, // check
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name_size + 3);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(h.name.as_bytes());
        header.push(0);
        self.raw(&header)?;
        self.pad()
    }

    fn raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Pads to a multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.raw(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }
}

/// `/a//b/` → `a/b`; rejects `.`/`..` components and NUL bytes.
fn normalise(path: &str) -> io::Result<String> {
    if path.contains('\0') {
        return Err(invalid(format!("{path:?}: NUL in path")));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" => {}
            "." | ".." => return Err(invalid(format!("{path:?}: `.` or `..` in path"))),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// A parsed entry, for tests and checks.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a (possibly concatenated) newc archive.
#[cfg(test)]
pub(crate) fn parse(mut data: &[u8]) -> Result<Vec<Entry>, String> {
    fn field(h: &[u8], i: usize) -> Result<u32, String> {
        let s = std::str::from_utf8(&h[6 + 8 * i..6 + 8 * (i + 1)]).map_err(|e| e.to_string())?;
        u32::from_str_radix(s, 16).map_err(|e| e.to_string())
    }
    let align = |n: usize| (n + 3) & !3;
    let mut entries = Vec::new();
    let total = data.len();
    loop {
        // Padding between concatenated archives is zeros (the kernel skips them).
        while let Some((0, rest)) = data.split_first() {
            data = rest;
        }
        if data.is_empty() {
            break;
        }
        if data.len() < HEADER_LEN || &data[..6] != MAGIC {
            return Err(format!("bad magic at offset {}", total - data.len()));
        }
        let mode = field(data, 1)?;
        let size = field(data, 6)? as usize;
        let rdev = (field(data, 9)?, field(data, 10)?);
        let name_size = field(data, 11)? as usize;
        let name_end = HEADER_LEN + name_size;
        let name = std::str::from_utf8(&data[HEADER_LEN..name_end - 1])
            .map_err(|e| e.to_string())?
            .to_string();
        let data_start = align(name_end);
        let data_end = data_start + size;
        let content = data
            .get(data_start..data_end)
            .ok_or("truncated entry")?
            .to_vec();
        data = data.get(align(data_end)..).unwrap_or(&[]);
        if name != TRAILER {
            entries.push(Entry {
                name,
                mode,
                rdev,
                data: content,
            });
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut CpioWriter<Vec<u8>>) -> io::Result<()>) -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        build(&mut w).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn writes_entries_with_parents_first() {
        let bytes = archive(|w| {
            w.file("/a/b/c.txt", 0o644, b"hello")?;
            w.symlink("/a/link", "b/c.txt")?;
            w.char_device("/dev/console", 0o600, 5, 1)?;
            w.dir("/a/b", 0o700)?; // already created: no-op
            w.file("/top", 0o755, b"")
        });
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a",
                "a/b",
                "a/b/c.txt",
                "a/link",
                "dev",
                "dev/console",
                "top"
            ]
        );
        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[2].mode, S_IFREG | 0o644);
        assert_eq!(entries[2].data, b"hello");
        assert_eq!(entries[3].mode, S_IFLNK | 0o777);
        assert_eq!(entries[3].data, b"b/c.txt");
        assert_eq!(entries[5].mode, S_IFCHR | 0o600);
        assert_eq!(entries[5].rdev, (5, 1));
        assert_eq!(entries[6].mode, S_IFREG | 0o755);
    }

    #[test]
    fn header_layout_is_newc() {
        let bytes = archive(|w| w.file("x", 0o644, b"abc"));
        // header(110) + "x\0" (2) = 112, already aligned; data 3 + pad 1.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[110..112], b"x\0");
        assert_eq!(&bytes[112..116], b"abc\0");
        assert_eq!(&bytes[116..122], b"070701");
        // filesize field (7th) of the first header.
        assert_eq!(&bytes[6 + 6 * 8..6 + 7 * 8], b"00000003");
    }

    #[test]
    fn rejects_bad_paths_and_short_readers() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("/a/../b", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
        let mut short: &[u8] = b"ab";
        let err = w.file_from("f", 0o644, 5, &mut short).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn concatenated_archives_parse() {
        let mut bytes = archive(|w| w.file("a", 0o644, b"1"));
        bytes.extend(archive(|w| w.file("a", 0o644, b"2")));
        let entries = parse(&bytes).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].data, b"2");
    }

    /// Cross-check with GNU cpio when it is installed (scripts/sandbox-assets installs it).
    #[test]
    fn gnu_cpio_lists_our_archive() {
        let bytes = archive(|w| {
            w.file("/bin/tool", 0o755, b"#!/bin/sh\n")?;
            w.symlink("/bin/sh", "busybox")
        });
        let child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("cpio not installed: skipping the cross-check");
            return;
        };
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "bin\nbin/tool\nbin/sh\n"
        );
    }
}
