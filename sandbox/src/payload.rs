//! What goes into the nested host besides the fixed parts: files, bytes,
//! dynamically linked binaries with their libraries, directories.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::assets::Assets;
use crate::error::SandboxError;
use crate::paths;

/// Where an entry's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A host file, read (following symlinks) when the initramfs is built.
    File(PathBuf),
    /// Literal contents.
    Bytes(Vec<u8>),
    /// A symbolic link with this target.
    Symlink(String),
}

/// One payload entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub source: Source,
    pub mode: u32,
}

/// Files to put into the nested host, keyed by their absolute destination.
///
/// ```no_run
/// # fn main() -> Result<(), quantix_sandbox::SandboxError> {
/// use quantix_sandbox::{Assets, Payload};
/// let assets = Assets::from_env()?;
/// let mut payload = Payload::new();
/// payload
///     .add_file("target/release/quantix-vmm", "/payload/quantix-vmm")?
///     .add_bytes("/payload/config.json", b"{}".to_vec(), 0o644)?
///     .add_qemu(&assets)?; // Debian's QEMU, its libraries and microvm firmware
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    entries: BTreeMap<String, Entry>,
}

impl Payload {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the host file `src` at `dest` (absolute path inside the nested
    /// host). The mode is taken from the file; symlinks are followed.
    pub fn add_file(
        &mut self,
        src: impl AsRef<Path>,
        dest: &str,
    ) -> Result<&mut Self, SandboxError> {
        let src = src.as_ref();
        let meta = fs::metadata(src)
            .map_err(|e| SandboxError::io(format!("payload file {}", src.display()), e))?;
        if !meta.is_file() {
            return Err(SandboxError::InvalidPayload {
                dest: dest.to_string(),
                reason: format!("{} is not a regular file", src.display()),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        self.insert(dest, Source::File(src.to_path_buf()), mode)?;
        Ok(self)
    }

    /// Adds literal contents at `dest` with `mode` (e.g. `0o755` for a script).
    pub fn add_bytes(
        &mut self,
        dest: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<&mut Self, SandboxError> {
        self.insert(dest, Source::Bytes(data.into()), mode & 0o7777)?;
        Ok(self)
    }

    /// Adds a symbolic link at `dest` pointing at `target`.
    pub fn add_symlink(&mut self, dest: &str, target: &str) -> Result<&mut Self, SandboxError> {
        self.insert(dest, Source::Symlink(target.to_string()), 0o777)?;
        Ok(self)
    }

    /// Adds a (possibly dynamically linked) executable at `dest`, together
    /// with every shared library `ldd` names, each at the path `ldd` shows
    /// (e.g. `/lib/x86_64-linux-gnu/libc.so.6`, `/lib64/ld-linux-x86-64.so.2`),
    /// so the binary runs unchanged in the nested host. A static binary is
    /// just added.
    pub fn add_host_binary(
        &mut self,
        src: impl AsRef<Path>,
        dest: &str,
    ) -> Result<&mut Self, SandboxError> {
        let src = src.as_ref();
        self.add_file(src, dest)?;
        for lib in shared_libraries(src)? {
            let lib_dest = lib.to_string_lossy().into_owned();
            self.add_file(&lib, &lib_dest)?;
        }
        Ok(self)
    }

    /// Adds the directory tree `src` under `dest` (symlinks are followed and
    /// stored as files; sockets, fifos and devices are skipped).
    pub fn add_dir(
        &mut self,
        src: impl AsRef<Path>,
        dest: &str,
    ) -> Result<&mut Self, SandboxError> {
        let src = src.as_ref();
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(|e| SandboxError::io(format!("reading directory {}", src.display()), e))?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| SandboxError::io(format!("reading directory {}", src.display()), e))?;
        names.sort();
        for name in names {
            let path = src.join(&name);
            let child_dest = format!("{}/{}", dest.trim_end_matches('/'), name.to_string_lossy());
            let meta = fs::metadata(&path)
                .map_err(|e| SandboxError::io(format!("payload file {}", path.display()), e))?;
            if meta.is_dir() {
                self.add_dir(&path, &child_dest)?;
            } else if meta.is_file() {
                self.add_file(&path, &child_dest)?;
            }
        }
        Ok(self)
    }

    /// Adds Debian's `qemu-system-x86_64` (from the assets) at
    /// [`paths::QEMU`] with its shared libraries, and the firmware files
    /// `-M microvm` needs at [`paths::QEMU_FIRMWARE_DIR`] (QEMU's built-in
    /// data directory, so `-L` is optional).
    pub fn add_qemu(&mut self, assets: &Assets) -> Result<&mut Self, SandboxError> {
        self.add_host_binary(&assets.qemu, paths::QEMU)?;
        for name in paths::QEMU_MICROVM_FIRMWARE {
            let src = assets.qemu_firmware_dir.join(name);
            self.add_file(&src, &format!("{}/{name}", paths::QEMU_FIRMWARE_DIR))?;
        }
        Ok(self)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Destinations, sorted.
    pub fn destinations(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn insert(&mut self, dest: &str, source: Source, mode: u32) -> Result<(), SandboxError> {
        let dest = check_dest(dest)?;
        let entry = Entry { source, mode };
        match self.entries.get(&dest) {
            Some(existing) if *existing == entry => Ok(()),
            Some(existing) => Err(SandboxError::InvalidPayload {
                dest,
                reason: format!(
                    "already added with different contents ({:?})",
                    existing.source
                ),
            }),
            None => {
                self.entries.insert(dest, entry);
                Ok(())
            }
        }
    }
}

/// Validates and normalises a destination: absolute, no `.`/`..`, not a
/// path the sandbox owns.
fn check_dest(dest: &str) -> Result<String, SandboxError> {
    let bad = |reason: &str| SandboxError::InvalidPayload {
        dest: dest.to_string(),
        reason: reason.to_string(),
    };
    if !dest.starts_with('/') {
        return Err(bad("destination must be an absolute path"));
    }
    if dest.contains('\0') {
        return Err(bad("NUL in destination"));
    }
    let parts: Vec<&str> = dest.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(bad("destination is the root directory"));
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(bad("`.` and `..` are not allowed"));
    }
    let norm = format!("/{}", parts.join("/"));
    for reserved in paths::RESERVED {
        if norm == *reserved || norm.starts_with(&format!("{reserved}/")) {
            return Err(bad(&format!("{reserved} belongs to the sandbox")));
        }
    }
    Ok(norm)
}

/// Shared libraries of `binary` as `ldd` reports them (empty for static binaries).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, SandboxError> {
    let command = format!("ldd {}", binary.display());
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| SandboxError::io(format!("running {command}"), e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(SandboxError::Command {
            command,
            reason: format!("{}: {}", out.status, stderr.trim()),
        });
    }
    parse_ldd(&stdout).map_err(|reason| SandboxError::Command { command, reason })
}

/// Parses `ldd` output into library paths.
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("library {} not found", name.trim()));
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            // `/lib64/ld-linux-x86-64.so.2 (0x...)` or `linux-vdso.so.1 (0x...)`
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(out).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n")
            .unwrap_err()
            .contains("libfoo"));
    }

    #[test]
    fn destinations_are_checked_and_normalised() {
        let mut p = Payload::new();
        p.add_bytes("/payload//x/", b"1".to_vec(), 0o644).unwrap();
        assert_eq!(p.destinations().collect::<Vec<_>>(), ["/payload/x"]);
        assert!(p.add_bytes("relative", b"".to_vec(), 0o644).is_err());
        assert!(p.add_bytes("/a/../b", b"".to_vec(), 0o644).is_err());
        assert!(p.add_bytes("/init", b"".to_vec(), 0o755).is_err());
        assert!(p.add_bytes("/qx/jobs.sh", b"".to_vec(), 0o755).is_err());
        assert!(p.add_bytes("/guest/vmlinuz", b"".to_vec(), 0o644).is_err());
        // Same contents twice is fine, different contents is not.
        p.add_bytes("/payload/x", b"1".to_vec(), 0o644).unwrap();
        assert!(p.add_bytes("/payload/x", b"2".to_vec(), 0o644).is_err());
    }

    #[test]
    fn host_binary_brings_its_libraries() {
        let mut p = Payload::new();
        p.add_host_binary("/bin/sh", "/payload/sh").unwrap();
        let dests: Vec<_> = p.destinations().collect();
        assert!(dests.contains(&"/payload/sh"));
        assert!(dests.iter().any(|d| d.contains("libc.so")), "{dests:?}");
        assert!(dests.iter().any(|d| d.contains("ld-linux")), "{dests:?}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Payload::new()
            .add_file("/nonexistent/qx", "/payload/qx")
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/qx"), "{err}");
    }
}
