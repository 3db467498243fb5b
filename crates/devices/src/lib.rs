//! Emulated devices for rvirt-vmm: PCI config space and bus, virtio-over-PCI transport and devices.

pub mod interrupt;
pub mod pci;
#[doc(hidden)]
pub mod ratelimit;
pub mod virtio;

pub use interrupt::{InterruptError, IoEventRegistry, MsiMessage, MsiRouting, MsiVector};

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

#[cfg(test)]
pub(crate) mod test_utils;
