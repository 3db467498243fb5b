//! ACPI hotplug: the platform devices and the AML behind vCPU hotplug and PCI hotplug on the
//! root bus.
//!
//! Three port-I/O devices, each a [`crate::bus::BusDevice`]:
//!
//! - [`cpu::CpuHotplug`] at [`crate::layout::ports::CPU_HOTPLUG`]: a selector / flags /
//!   command register block in the style of QEMU's "modern" CPU hotplug interface; the DSDT's
//!   `\_SB.CPUS.CSCN` walks it and notifies the `Cxxx` processor devices.
//! - [`pci::PciHotplug`] at [`crate::layout::ports::PCI_HOTPLUG`]: slot-up / slot-down bitmaps
//!   and an eject register (the `PCIU` / `PCID` / `B0EJ` design); `\_SB.PCI0.PCNT` notifies
//!   the `Sxx` slot devices.
//! - [`ged::Ged`] at [`crate::layout::ports::GED`]: the event selector of the ACPI Generic
//!   Event Device (`ACPI0013`) whose interrupt is [`crate::layout::GED_GSI`]; its `_EVT` reads
//!   the selector and runs the scans above.
//!
//! The VMM flow for a hot-add: create the backend (vCPU thread / PCI device on the bus), then
//! `plug()` on the controller, then [`ged::Ged::notify`] with the matching event bit. For a
//! hot-remove: `unplug()`, then `notify`; the guest offlines the device and evaluates `_EJ0`,
//! which the controller reports exactly once through its eject handler; only then does the VMM
//! tear the backend down. docs/vmm.md ("Hotplug") has the whole contract.

pub mod cpu;
pub mod ged;
pub mod pci;

use acpi_tables::{Aml, AmlSink};

/// A refusal of a hotplug request from the VMM (never caused by the guest: guest accesses
/// that make no sense are ignored and logged, rate-limited).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// The vCPU count is not possible: `boot` must be 1..=`max`, `max` at most the limit.
    #[error("vCPU counts boot={boot} max={max} are not possible (1 <= boot <= max <= {limit})")]
    BadVcpuCount { boot: u32, max: u32, limit: u32 },
    /// The vCPU id is not below the maximum.
    #[error("vCPU {id} is out of range (max {max})")]
    NoSuchVcpu { id: u32, max: u32 },
    /// The vCPU is already present.
    #[error("vCPU {0} is already present")]
    VcpuPresent(u32),
    /// The vCPU is not present.
    #[error("vCPU {0} is not present")]
    VcpuAbsent(u32),
    /// vCPU 0 (the bootstrap processor) cannot be removed.
    #[error("vCPU 0 cannot be unplugged")]
    Bsp,
    /// A removal of that vCPU is already waiting for the guest's eject.
    #[error("vCPU {0} is already being unplugged (waiting for the guest to eject it)")]
    VcpuRemoving(u32),
    /// The slot is not a hotpluggable root-bus slot (1..=31).
    #[error("PCI slot {0} cannot be hotplugged (slots 1..=31 can)")]
    BadSlot(u32),
    /// The slot is occupied.
    #[error("PCI slot {0} is occupied")]
    SlotOccupied(u32),
    /// The slot is empty.
    #[error("PCI slot {0} is empty")]
    SlotEmpty(u32),
    /// A removal from that slot is already waiting for the guest's eject.
    #[error("PCI slot {0} is already being unplugged (waiting for the guest to eject it)")]
    SlotRemoving(u32),
}

/// Called with the vCPU id or slot number the guest ejected. It runs on the vCPU thread that
/// wrote the eject register, with the controller's lock held: it must not lock the controller;
/// hand the id to the VMM (a channel send, an `EventFd` write) and return.
pub type EjectHandler = Box<dyn Fn(u32) + Send>;

/// Already-encoded AML bytes, to nest inside `acpi_tables::aml` containers.
pub struct RawAml(pub Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Encodes `items` one after the other.
pub(crate) fn aml_seq(items: &[&dyn Aml]) -> Vec<u8> {
    let mut v = Vec::new();
    for i in items {
        i.to_aml_bytes(&mut v);
    }
    v
}

/// A read of the little-endian register file `regs` at `offset`: each byte of `data` comes from
/// `byte(offset + i)`; offsets that overflow read 0.
pub(crate) fn read_bytes(offset: u64, data: &mut [u8], mut byte: impl FnMut(u64) -> u8) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = offset.checked_add(i as u64).map(&mut byte).unwrap_or(0);
    }
}
