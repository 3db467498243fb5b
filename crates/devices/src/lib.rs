//! Emulated devices for rvirt-vmm: PCI config space and bus, virtio-over-PCI transport and devices.
//!
//! Nothing here needs `/dev/kvm`: the VMM supplies interrupts and ioeventfds through two traits
//! ([`MsiRouting`], [`IoEventRegistry`]) and forwards vCPU exits to the [`pci::PciBus`].
//!
//! # Wiring a VM (what rvirt-vmm does)
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use rvirt_devices::{pci::*, virtio::*, GuestMemory, MsiRouting, IoEventRegistry};
//! # fn wire(mem: GuestMemory, routing: Arc<dyn MsiRouting>, ioevents: Arc<dyn IoEventRegistry>,
//! #         disk: Arc<dyn rvirt_image::BlockDevice>) -> Result<(), Box<dyn std::error::Error>> {
//! // 1. The root bus, with the windows the VMM also describes in ACPI.
//! let bus = PciBus::new(PciWindows {
//!     mmio32: 0xc000_0000..0xe000_0000,
//!     mmio64: 0x1_0000_0000..0x2_0000_0000,
//!     io: 0xc000..0xf000,
//! });
//! // 2. Devices: wrap each virtio device in the PCI transport and plug it in. `add_device`
//! //    assigns BAR 0 and the transport registers one ioeventfd per queue through `ioevents`
//! //    (and moves them if the guest moves the BAR). Do not register them again yourself.
//! let blk = block::Block::new(disk, &block::BlockConfig { id: "disk0".into(), read_only: false });
//! let blk = VirtioPciDevice::new(Box::new(blk), mem.clone(), routing.clone(), ioevents.clone())?;
//! bus.add_device(Arc::new(Mutex::new(blk)))?;
//! let tap = net::Tap::open("rvnet0")?;
//! let nic = net::Net::new(Arc::new(tap), net::NetConfig { mac: [0x52, 0x54, 0, 1, 2, 3] });
//! bus.add_device(Arc::new(Mutex::new(VirtioPciDevice::new(
//!     Box::new(nic), mem.clone(), routing.clone(), ioevents.clone())?)))?;
//! let rng = VirtioPciDevice::new(Box::new(rng::Rng::new()?), mem, routing, ioevents)?;
//! bus.add_device(Arc::new(Mutex::new(rng)))?;
//! // 3. vCPU exits: port I/O → bus.pio_read/pio_write (0xCF8..=0xCFF and I/O BARs);
//! //    MMIO inside the ECAM window → bus.ecam_read/ecam_write(addr - ecam_base);
//! //    any other MMIO → bus.mmio_read/mmio_write(addr) (false: nobody decodes it).
//! # Ok(()) }
//! ```
//!
//! The VMM's side of the contract:
//! - [`MsiRouting::alloc_vector`]: allocate a GSI, create an `EventFd`, `KVM_IRQFD` it to the
//!   GSI. [`MsiRouting::update_route`]: keep a table of every GSI's MSI message and push the
//!   whole table with `KVM_SET_GSI_ROUTING` (it replaces the table); masked vectors may simply
//!   be left out. It is called from a vCPU thread while that device's lock is held: it must not
//!   call back into the bus.
//! - [`IoEventRegistry::register`]: `KVM_IOEVENTFD` on the MMIO address, any access length
//!   (length 0, no datamatch).
//! - Device work runs on one worker thread per device (`virtio-blk`, `virtio-net`,
//!   `virtio-rng`), started when the driver sets DRIVER_OK and stopped on device reset or drop;
//!   vCPU threads only touch registers.

pub mod interrupt;
pub mod pci;
#[doc(hidden)]
pub mod ratelimit;
pub mod scsi;
pub mod virtio;

pub use interrupt::{InterruptError, IoEventRegistry, MsiMessage, MsiRouting, MsiVector};

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

#[cfg(test)]
pub(crate) mod test_utils;
