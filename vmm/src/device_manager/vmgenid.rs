//! The VM Generation ID (Microsoft's "Virtual Machine Generation ID" specification, as
//! QEMU's `vmgenid` and Firecracker's): a 16-byte identifier in reserved guest memory that
//! the DSDT's `VGEN` device (`_CID "VM_Gen_Counter"`) points to with its `ADDR` package.
//! A booted VM gets a random one; a restored VM a new one, followed by an ACPI
//! notification (a second Generic Event Device, `GED1`, on its own interrupt), so that a
//! guest (Linux's `vmgenid` driver) re-seeds its random number generator and learns that
//! it is a copy: two VMs restored from one snapshot must not share their entropy pool.

use std::sync::Arc;

use tracing::{info, warn};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceError, Lifecycle};
use crate::memory::GuestMemory;

/// The generation ID's saved state: the identifier the guest saw.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VmGenIdState {
    /// 32 hex digits.
    id: String,
}

/// A VM's generation ID.
pub struct VmGenId {
    mem: Arc<GuestMemory>,
    addr: GuestAddress,
    irq: EventFd,
    id: [u8; 16],
    /// Restored: the guest is notified of the new identifier when it next runs (once the
    /// interrupt controllers hold their restored state).
    notify_pending: bool,
}

/// 16 random bytes.
fn random_id() -> Result<[u8; 16], String> {
    let mut id = [0u8; 16];
    // SAFETY: `id` is writable for its length.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        return Err(format!("getrandom: {}", std::io::Error::last_os_error()));
    }
    Ok(id)
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl VmGenId {
    /// A new identifier at `addr` (reserved guest memory), the notification on `gsi`.
    pub fn new(
        vm: &kvm_ioctls::VmFd,
        mem: Arc<GuestMemory>,
        addr: GuestAddress,
        gsi: u32,
    ) -> Result<Self, DeviceError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::Host {
            what: "VM generation ID eventfd",
            source,
        })?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|source| DeviceError::Kvm {
                op: "IRQFD (VM generation ID)",
                source,
            })?;
        let id = random_id().map_err(|e| DeviceError::Host {
            what: "VM generation ID",
            source: std::io::Error::other(e),
        })?;
        // Written by `boot`: a VM arriving by migration shares the source's memory, which
        // nothing may touch before the switch.
        Ok(Self {
            mem,
            addr,
            irq,
            id,
            notify_pending: false,
        })
    }

    fn write(&self) -> Result<(), String> {
        self.mem
            .write_slice(&self.id, self.addr)
            .map_err(|e| format!("writing the generation ID at {:#x}: {e}", self.addr.0))
    }

    /// The identifier now.
    pub fn id(&self) -> [u8; 16] {
        self.id
    }
}

impl Lifecycle for VmGenId {
    fn resume(&mut self) {
        if std::mem::take(&mut self.notify_pending) {
            match self.irq.write(1) {
                Ok(()) => info!(id = %hex(&self.id), "VM generation ID changed; guest notified"),
                Err(e) => warn!(error = %e, "cannot notify the guest of its new generation ID"),
            }
        }
    }
    fn boot(&mut self) -> Result<(), String> {
        self.write()
    }
    fn save(&mut self) -> Result<serde_json::Value, String> {
        serde_json::to_value(VmGenIdState { id: hex(&self.id) }).map_err(|e| e.to_string())
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let saved: VmGenIdState = serde_json::from_value(state.clone())
            .map_err(|e| format!("the generation ID's state: {e}"))?;
        let old = (saved.id.len() == 32 && saved.id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(&saved.id)
            .ok_or_else(|| format!("the generation ID {:?} is not 32 hex digits", saved.id))?;
        // Every restore is a new generation, even of a snapshot restored once before.
        let mut id = random_id()?;
        while hex(&id) == *old {
            id = random_id()?;
        }
        self.id = id;
        self.write()?;
        self.notify_pending = true;
        Ok(())
    }
    fn restore_migrated(&mut self, state: &serde_json::Value) -> Result<(), String> {
        // The same VM, moved: its generation stays (a guest re-seeds on a clone, not on a
        // migration).
        let saved: VmGenIdState = serde_json::from_value(state.clone())
            .map_err(|e| format!("the generation ID's state: {e}"))?;
        self.id = parse_id(&saved.id)?;
        self.write()
    }
}

/// The 16 bytes of a saved identifier, 32 hex digits.
fn parse_id(text: &str) -> Result<[u8; 16], String> {
    let bad = || format!("the generation ID {text:?} is not 32 hex digits");
    let bytes = crate::hex::decode(text).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_hex() {
        let (a, b) = (random_id().unwrap(), random_id().unwrap());
        assert_ne!(a, b);
        assert_eq!(hex(&a).len(), 32);
    }
}
