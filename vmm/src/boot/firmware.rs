//! Raw firmware images, mapped so that they end at 4 GiB like a flash ROM.

use std::path::Path;

use vm_memory::GuestAddress;

use super::{BootError, FirmwareImage};

/// Largest firmware image: 16 MiB, the size of the legacy flash window.
pub const FIRMWARE_MAX_SIZE: u64 = 16 << 20;

pub(super) fn read(path: &Path) -> Result<FirmwareImage, BootError> {
    use std::io::Read;
    let read_err = |source| BootError::Read {
        what: "firmware",
        path: path.to_path_buf(),
        source,
    };
    let file =
        quantix_hostfs::inherit::open(path, quantix_hostfs::Access::ReadOnly).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    // Never read more than the limit, whatever the file claims or grows to meanwhile.
    let mut bytes = Vec::new();
    file.take(FIRMWARE_MAX_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let size = bytes.len() as u64;
    if size == 0 || !size.is_multiple_of(4096) || size > FIRMWARE_MAX_SIZE {
        return Err(BootError::FirmwareSize {
            path: path.to_path_buf(),
            size: meta.len().max(size),
            max: FIRMWARE_MAX_SIZE,
        });
    }
    Ok(FirmwareImage {
        base: GuestAddress((1u64 << 32) - size),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_to_end_at_4g_and_checks_size() {
        let dir = std::env::temp_dir().join(format!("qx-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.bin");
        std::fs::File::create(&good)
            .unwrap()
            .write_all(&[0x90; 8192])
            .unwrap();
        let fw = read(&good).unwrap();
        assert_eq!(fw.base, GuestAddress(0xffff_e000));
        let bad = dir.join("bad.bin");
        std::fs::File::create(&bad)
            .unwrap()
            .write_all(&[0x90; 100])
            .unwrap();
        assert!(matches!(
            read(&bad),
            Err(BootError::FirmwareSize { size: 100, .. })
        ));
        assert!(matches!(
            read(&dir.join("missing")),
            Err(BootError::Read { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
