//! Where a vCPU's exits go: port I/O to the platform devices' bus, then to the PCI bus
//! (0xCF8/0xCFC and I/O BARs); MMIO to the ECAM window, the MMIO bus, then PCI memory BARs.
//! Nobody decoding an access reads all-ones, as on real hardware.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use kvm_ioctls::VcpuExit;
use rvirt_api::vmm::ExitReason;
use rvirt_devices::pci::PciBus;

use crate::bus::Bus;
use crate::layout::ECAM_SIZE;

/// The buses a vCPU exit can reach.
pub struct ExitHandler {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub pci: Arc<PciBus>,
    /// Where the ECAM window starts (the machine's layout).
    pub ecam_base: u64,
}

impl ExitHandler {
    /// Handles one exit of vCPU `id`; `Some` when the VM must stop.
    pub fn handle(&self, exit: VcpuExit<'_>, id: u32) -> Option<ExitReason> {
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) && !self.pci.pio_read(port, data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                if !self.pio.write(u64::from(port), data) {
                    self.pci.pio_write(port, data);
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                if (self.ecam_base..self.ecam_base + ECAM_SIZE).contains(&addr) {
                    self.pci.ecam_read(addr - self.ecam_base, data);
                } else if !self.mmio.read(addr, data) && !self.pci.mmio_read(addr, data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if (self.ecam_base..self.ecam_base + ECAM_SIZE).contains(&addr) {
                    self.pci.ecam_write(addr - self.ecam_base, data);
                } else if !self.mmio.write(addr, data) {
                    self.pci.mmio_write(addr, data);
                }
            }
            VcpuExit::Hlt => thread::sleep(Duration::from_millis(1)),
            VcpuExit::Shutdown => {
                log::error!("vcpu{id}: triple fault (KVM shutdown exit): guest crashed");
                return Some(ExitReason::Crash);
            }
            VcpuExit::SystemEvent(ty, _) => {
                return Some(match ty {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Poweroff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                    _ => ExitReason::Crash,
                });
            }
            VcpuExit::FailEntry(reason, cpu) => {
                log::error!("vcpu{id}: VM entry failed (reason {reason:#x}, cpu {cpu})");
                return Some(ExitReason::Error);
            }
            VcpuExit::InternalError => {
                log::error!("vcpu{id}: KVM internal error (emulation failure)");
                return Some(ExitReason::Crash);
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            other => {
                rvirt_devices::guest_warn!("vcpu{id}: unhandled exit {other:?}");
            }
        }
        None
    }
}
