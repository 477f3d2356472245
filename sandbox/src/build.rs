//! Static builds of workspace binaries, for putting into the nested host (which has no
//! shared libraries of its own).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::SandboxError;

/// The target triple static binaries are built for.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where static builds go: a target directory of their own, so that building one from
/// inside `cargo test` does not wait on the lock of the tests' target directory, and the
/// `crt-static` flag does not invalidate the ordinary build.
pub fn static_target_dir() -> PathBuf {
    workspace_root().join("target").join("static")
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds `bin` of workspace package `package` in release mode, statically linked
/// (`-C target-feature=+crt-static`), and returns the binary's path. Cargo makes this a
/// no-op when nothing changed.
pub fn static_binary(package: &str, bin: &str) -> Result<PathBuf, SandboxError> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let target_dir = static_target_dir();
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            package,
            "--bin",
            bin,
            "--target",
            STATIC_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        // Flags meant for the outer build (e.g. coverage) must not leak into this one.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let command = format!(
        "{cargo} build --release -p {package} --bin {bin} --target {STATIC_TARGET} (crt-static)"
    );
    tracing::info!(%command, "building a static binary for the sandbox");
    let out = cmd
        .output()
        .map_err(|e| SandboxError::io(format!("running {command}"), e))?;
    if !out.status.success() {
        return Err(SandboxError::Command {
            command,
            reason: format!("{}\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    let path = target_dir.join(STATIC_TARGET).join("release").join(bin);
    if !path.is_file() {
        return Err(SandboxError::Command {
            command,
            reason: format!("{} was not produced", path.display()),
        });
    }
    Ok(path)
}
