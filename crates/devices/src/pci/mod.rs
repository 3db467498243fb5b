//! PCI: configuration space, the root bus with its host bridge, BAR allocation and MSI-X.

pub mod alloc;
mod bus;
pub mod config;
mod host_bridge;
pub mod msix;
pub mod q35;

pub use bus::{PciAddress, PciBus, PciWindows, CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT};
pub use config::{BarKind, BarSpec, ConfigWriteEffect, PciConfigSpace, PciIds, NUM_BARS};
pub use host_bridge::HostBridge;
pub use msix::MsixState;
pub use q35::{Ich9Lpc, Q35Host};

use crate::interrupt::InterruptError;

/// A PCI bus or function operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// Every device slot of bus 0 is taken.
    #[error("PCI bus 0 has no free slot left (32 devices at most)")]
    BusFull,
    /// A fixed slot asked for is taken, the host bridge's or past the bus.
    #[error("PCI slot {0} is not free")]
    SlotTaken(u8),
    /// No device sits in that slot (or it is the host bridge, which cannot be removed).
    #[error("PCI slot {0} holds no removable device")]
    NoDevice(u8),
    /// A BAR declaration is not valid.
    #[error("BAR {index} of size {size:#x} is invalid (size must be a power of two, BAR free)")]
    InvalidBar { index: usize, size: u64 },
    /// A BAR does not fit any window passed to [`PciBus::new`].
    #[error("no room for a {size:#x}-byte {kind} BAR in the PCI windows: enlarge the windows")]
    NoBarSpace { size: u64, kind: &'static str },
    /// A BAR address is not aligned to the BAR size.
    #[error("BAR {index} address {addr:#x} is not aligned to its size")]
    MisalignedBar { index: usize, addr: u64 },
    /// No room left in the capability area.
    #[error("no room for capability {id:#x} of {len} bytes in config space")]
    NoCapabilitySpace { id: u8, len: usize },
    /// An MSI-X vector count outside 1..=2048.
    #[error("invalid MSI-X vector count {0} (must be 1..=2048)")]
    InvalidMsixVectors(u16),
    /// The VMM could not provide an interrupt resource.
    #[error("MSI-X set-up failed: {0}")]
    Interrupt(#[from] InterruptError),
}

/// One PCI function on the bus, as the bus sees it (object safe).
///
/// Config accesses arrive as (dword register index, byte offset in it, data of 1, 2 or 4 bytes).
/// BAR accesses arrive with the BAR register index and the offset inside the BAR.
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn config(&self) -> &PciConfigSpace;

    /// Mutable access, used by the bus to program BARs at allocation time.
    fn config_mut(&mut self) -> &mut PciConfigSpace;

    /// Guest read of config register `reg`.
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    /// Guest write to config register `reg`. Devices with capabilities that have side effects
    /// (MSI-X enable, BAR moves) override this and call the default logic first.
    fn write_config_register(
        &mut self,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) -> ConfigWriteEffect {
        self.config_mut().write_reg(reg, offset, data)
    }

    /// Guest read inside BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// Guest write inside BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Called by the bus after BARs were allocated at start-up (before the guest runs), so the
    /// device can register ioeventfds at their addresses.
    fn bars_assigned(&mut self) {}
}

#[cfg(test)]
mod tests;
