//! The host bridge at 00:00.0: a config space only, so the guest's bus scan finds a root.

use super::{PciConfigSpace, PciDevice, PciIds};

/// Intel's vendor id and the device id QEMU's `pci-host` / Cloud Hypervisor use for a generic
/// host bridge.
const VENDOR_INTEL: u16 = 0x8086;
const DEVICE_HOST_BRIDGE: u16 = 0x0d57;
/// Class: bridge, host bridge.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// The root complex's host bridge function.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfigSpace,
}

impl HostBridge {
    /// A host bridge with the usual ids.
    pub fn new() -> Self {
        HostBridge {
            config: PciConfigSpace::new(PciIds {
                vendor: VENDOR_INTEL,
                device: DEVICE_HOST_BRIDGE,
                class: CLASS_HOST_BRIDGE,
                ..Default::default()
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
