//! Custom nested-guest initramfs images: the base image from the assets plus
//! an appended overlay archive (the kernel unpacks concatenated archives in
//! order, later files replacing earlier ones).
//!
//! ```no_run
//! # fn main() -> Result<(), quantix_sandbox::SandboxError> {
//! use quantix_sandbox::{Assets, GuestInitramfs, Payload};
//! let assets = Assets::from_env()?;
//! let image = GuestInitramfs::new(&assets)
//!     .script("#!/bin/sh\necho hello from the guest\n")
//!     .build()?;
//! let mut payload = Payload::new();
//! payload.add_bytes("/payload/guest-script.cpio", image, 0o644)?;
//! // ...then boot the guest with qx.action=script
//! # Ok(()) }
//! ```

use std::fs;
use std::path::PathBuf;

use crate::assets::Assets;
use crate::cpio::CpioWriter;
use crate::error::SandboxError;

/// The line the guest's `/init` prints first:
/// `QX-GUEST-INIT cpus=<n> memtotal_kb=<n> uptime=<s> kernel=<release>`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GuestInit {
    /// Online CPUs in the guest.
    pub cpus: u32,
    /// `MemTotal` of the guest, KiB.
    pub memtotal_kb: u64,
    /// Guest uptime (seconds) when `/init` printed the line.
    pub uptime_s: f64,
    /// `uname -r` of the guest.
    pub kernel: String,
}

impl GuestInit {
    /// Finds the first `QX-GUEST-INIT` line in `text` (e.g. a job's output;
    /// the marker may be preceded by other text on its line).
    pub fn find(text: &str) -> Option<GuestInit> {
        text.lines().find_map(Self::parse_line)
    }

    /// Parses one line containing the marker. A kernel message printed into the end of
    /// the line (`... kernel=6.1.0[    6.8] IPv6: ...`) is cut off at its `[`.
    pub fn parse_line(line: &str) -> Option<GuestInit> {
        let at = line.find("QX-GUEST-INIT ")?;
        let rest = &line[at..];
        let rest = rest.split('[').next().unwrap_or(rest);
        let fields: Vec<(&str, &str)> = rest
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.split_once('='))
            .collect();
        let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        Some(GuestInit {
            cpus: get("cpus")?.parse().ok()?,
            memtotal_kb: get("memtotal_kb")?.parse().ok()?,
            uptime_s: get("uptime")?.parse().ok()?,
            kernel: get("kernel")?.to_string(),
        })
    }
}

/// The value after `key=` on the first line of `out` that has it, up to the end of the
/// line or the first `[` (a kernel message printed into the middle of a console line).
pub fn console_field(out: &str, key: &str) -> Option<String> {
    out.lines().find_map(|l| {
        l.split_once(&format!("{key}="))
            .map(|(_, v)| v.split('[').next().unwrap_or("").trim().to_string())
    })
}

/// Path of the script the guest's `/init` runs with `qx.action=script`.
pub const GUEST_SCRIPT: &str = "/qx-script";

/// Builder of a guest initramfs with extra files.
#[derive(Debug, Clone)]
pub struct GuestInitramfs {
    base: PathBuf,
    files: Vec<(String, Vec<u8>, u32)>,
}

impl GuestInitramfs {
    /// Starts from the assets' guest initramfs.
    pub fn new(assets: &Assets) -> Self {
        GuestInitramfs {
            base: assets.guest_initramfs.clone(),
            files: Vec::new(),
        }
    }

    /// Adds a file inside the guest.
    pub fn file(mut self, dest: &str, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files.push((dest.to_string(), data.into(), mode));
        self
    }

    /// Adds [`GUEST_SCRIPT`] (run by `/init` with `qx.action=script`).
    pub fn script(self, script: impl Into<Vec<u8>>) -> Self {
        self.file(GUEST_SCRIPT, script, 0o755)
    }

    /// Adds the guest kernel's `modules` (paths under its module directory, in load order:
    /// each after its dependencies) as `/qx-mod-N.ko`, and a [`GUEST_SCRIPT`] that loads
    /// them in order (a failure prints `QX-FAIL insmod <module>`) and then runs `body`.
    pub fn script_after_modules(
        mut self,
        assets: &Assets,
        modules: &[&str],
        body: &str,
    ) -> Result<Self, SandboxError> {
        let mut script = String::from("#!/bin/sh\n");
        for (i, m) in modules.iter().enumerate() {
            let path = assets.module(m);
            let data = fs::read(&path)
                .map_err(|e| SandboxError::io(format!("reading module {}", path.display()), e))?;
            let dest = format!("/qx-mod-{i}.ko");
            script.push_str(&format!("insmod {dest} || echo \"QX-FAIL insmod {m}\"\n"));
            self = self.file(&dest, data, 0o644);
        }
        script.push_str(body);
        Ok(self.script(script))
    }

    /// The image: base archive followed by the overlay archive.
    pub fn build(&self) -> Result<Vec<u8>, SandboxError> {
        let mut image = fs::read(&self.base)
            .map_err(|e| SandboxError::io(format!("reading {}", self.base.display()), e))?;
        if self.files.is_empty() {
            return Ok(image);
        }
        // The base ends with a trailer; keep the next archive 4-byte aligned.
        while image.len() % 4 != 0 {
            image.push(0);
        }
        let mut w = CpioWriter::new(image);
        for (dest, data, mode) in &self.files {
            w.file(dest, *mode, data)
                .map_err(|e| SandboxError::InvalidPayload {
                    dest: dest.clone(),
                    reason: e.to_string(),
                })?;
        }
        w.finish()
            .map_err(|e| SandboxError::io("building the guest overlay archive", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;

    #[test]
    fn console_fields_stop_at_a_kernel_message() {
        let out = "x\nQX-DEV ping=yes[   12.5] virtio_net\nQX-DEV ping=no\nQX-DEV mac= 52:54 \n";
        assert_eq!(console_field(out, "QX-DEV ping").as_deref(), Some("yes"));
        assert_eq!(console_field(out, "QX-DEV mac").as_deref(), Some("52:54"));
        assert_eq!(console_field(out, "QX-DEV serial"), None);
    }

    #[test]
    fn a_kernel_message_at_the_end_of_the_line_is_cut_off() {
        let line = "QX-GUEST-INIT cpus=4 memtotal_kb=480692 uptime=8.57 kernel=6.1.0-56-cloud-amd64[    6.835093] IPv6: eth0";
        let init = GuestInit::parse_line(line).unwrap();
        assert_eq!(
            (init.cpus, init.kernel.as_str()),
            (4, "6.1.0-56-cloud-amd64")
        );
    }

    #[test]
    fn parses_the_guest_init_line() {
        let out = "[    1.0] Run /init as init process\n\
                   QX-GUEST-INIT cpus=2 memtotal_kb=223520 uptime=16.37 kernel=6.1.0-56-cloud-amd64\n";
        assert_eq!(
            GuestInit::find(out),
            Some(GuestInit {
                cpus: 2,
                memtotal_kb: 223520,
                uptime_s: 16.37,
                kernel: "6.1.0-56-cloud-amd64".into()
            })
        );
        assert_eq!(
            GuestInit::find("QX-GUEST-INIT cpus=x memtotal_kb=1 uptime=1 kernel=k"),
            None
        );
        assert_eq!(GuestInit::find("nothing here"), None);
    }

    #[test]
    fn overlay_is_appended() {
        let dir = std::env::temp_dir().join(format!("qx-guest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let base_path = dir.join("base.cpio");
        let mut base = CpioWriter::new(Vec::new());
        base.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        let mut base = base.finish().unwrap();
        base.extend_from_slice(&[0u8; 2]); // odd padding like GNU cpio's 512-byte blocks
        fs::write(&base_path, &base).unwrap();
        let g = GuestInitramfs {
            base: base_path,
            files: Vec::new(),
        }
        .script("echo hi\n");
        let image = g.build().unwrap();
        let _ = fs::remove_dir_all(&dir);
        let entries = cpio::parse(&image).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["init", "qx-script"]);
        assert_eq!(entries[1].data, b"echo hi\n");
        assert_eq!(entries[1].mode & 0o777, 0o755);
    }
}
