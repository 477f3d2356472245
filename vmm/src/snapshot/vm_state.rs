//! The state KVM holds for the VM as a whole: the in-kernel interrupt controllers (both
//! PICs and the I/O APIC), the PIT when the VM has one, and the guest clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hex::hex_bytes;
use crate::plain::Plain;

/// Why the VM's state could not be read or loaded.
#[derive(Debug, Error)]
pub enum VmStateError {
    /// A KVM call failed.
    #[error("KVM_{op} failed: {source}")]
    Kvm {
        /// The ioctl, without its `KVM_` prefix.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved blob has the wrong size or names another chip.
    #[error("saved {what} is invalid: {reason}")]
    Invalid {
        /// Which part.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The saved VM had a PIT and this one has none, or the other way round.
    #[error("the saved VM {} a PIT and this one {}", if *.saved { "had" } else { "had no" }, if *.saved { "has none" } else { "has one" })]
    PitMismatch {
        /// Whether the saved VM had one.
        saved: bool,
    },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { op, source }
}

/// The guest clock at the save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clock {
    /// kvm-clock's value, ns.
    pub clock_ns: u64,
    /// The host's `CLOCK_REALTIME` at that moment, ns, when KVM gave it: a restore then
    /// advances the guest clock by the time that passed since.
    pub realtime_ns: Option<u64>,
}

/// What KVM holds for the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The master PIC (`struct kvm_irqchip`), hex.
    #[serde(with = "hex_bytes")]
    pub pic_master: Vec<u8>,
    /// The slave PIC, hex.
    #[serde(with = "hex_bytes")]
    pub pic_slave: Vec<u8>,
    /// The I/O APIC, hex.
    #[serde(with = "hex_bytes")]
    pub ioapic: Vec<u8>,
    /// The PIT (`struct kvm_pit_state2`), hex; absent when the VM has no PIT.
    #[serde(default, with = "opt_hex")]
    pub pit: Option<Vec<u8>>,
    /// The guest clock.
    pub clock: Clock,
}

mod opt_hex {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().map(crate::hex::encode).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<std::borrow::Cow<str>>::deserialize(d)? {
            Some(text) => crate::hex::decode(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<Vec<u8>, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(kvm("GET_IRQCHIP"))?;
    Ok(chip.to_bytes())
}

fn set_chip(fd: &VmFd, what: &'static str, chip_id: u32, bytes: &[u8]) -> Result<(), VmStateError> {
    let chip = kvm_irqchip::from_bytes(bytes).ok_or_else(|| VmStateError::Invalid {
        what,
        reason: format!(
            "{} bytes, not {}",
            bytes.len(),
            std::mem::size_of::<kvm_irqchip>()
        ),
    })?;
    if chip.chip_id != chip_id {
        return Err(VmStateError::Invalid {
            what,
            reason: format!("it names chip {}, not {chip_id}", chip.chip_id),
        });
    }
    fd.set_irqchip(&chip).map_err(kvm("SET_IRQCHIP"))
}

impl VmState {
    /// Reads the VM's state; `pit` says whether the VM has a PIT, `clock` is the guest
    /// clock as read at the pause. The vCPUs are paused.
    pub fn save(fd: &VmFd, pit: bool, clock: kvm_clock_data) -> Result<Self, VmStateError> {
        Ok(Self {
            pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: if pit {
                Some(fd.get_pit2().map_err(kvm("GET_PIT2"))?.to_bytes())
            } else {
                None
            },
            clock: Clock {
                clock_ns: clock.clock,
                realtime_ns: (clock.flags & KVM_CLOCK_REALTIME != 0).then_some(clock.realtime),
            },
        })
    }

    /// Loads the state into a VM built from the same configuration (`pit`: whether it
    /// has a PIT), before its vCPUs run. The guest clock goes on from the saved value,
    /// advanced by the host time since the save when the save recorded it (so guest time
    /// never goes backwards, and jumps forward by the time the VM was stopped).
    pub fn restore(&self, fd: &VmFd, pit: bool) -> Result<(), VmStateError> {
        if self.pit.is_some() != pit {
            return Err(VmStateError::PitMismatch {
                saved: self.pit.is_some(),
            });
        }
        set_chip(fd, "master PIC", KVM_IRQCHIP_PIC_MASTER, &self.pic_master)?;
        set_chip(fd, "slave PIC", KVM_IRQCHIP_PIC_SLAVE, &self.pic_slave)?;
        set_chip(fd, "I/O APIC", KVM_IRQCHIP_IOAPIC, &self.ioapic)?;
        if let Some(bytes) = &self.pit {
            let state = kvm_pit_state2::from_bytes(bytes).ok_or_else(|| VmStateError::Invalid {
                what: "PIT",
                reason: format!(
                    "{} bytes, not {}",
                    bytes.len(),
                    std::mem::size_of::<kvm_pit_state2>()
                ),
            })?;
            fd.set_pit2(&state).map_err(kvm("SET_PIT2"))?;
        }
        let mut clock = kvm_clock_data {
            clock: self.clock.clock_ns,
            ..Default::default()
        };
        if let Some(realtime) = self.clock.realtime_ns {
            clock.flags = KVM_CLOCK_REALTIME;
            clock.realtime = realtime;
        }
        match fd.set_clock(&clock) {
            Ok(()) => Ok(()),
            // A KVM that does not take KVM_CLOCK_REALTIME: the clock goes on from the
            // saved value without the forward jump.
            Err(e) if clock.flags != 0 => {
                tracing::warn!(error = %e, "KVM refused the clock with its realtime stamp; restoring it without");
                clock.flags = 0;
                fd.set_clock(&clock).map_err(kvm("SET_CLOCK"))
            }
            Err(e) => Err(VmStateError::Kvm {
                op: "SET_CLOCK",
                source: e,
            }),
        }
    }
}
