//! The root PCI bus (bus 0): slots, legacy 0xCF8/0xCFC and ECAM config access, BAR allocation
//! and routing of BAR accesses.
//!
//! Locking: the slot table and the decoded-BAR map sit behind one `RwLock`; each device behind
//! its own `Mutex`. A vCPU access takes the read lock only long enough to clone the device's
//! `Arc`, then locks the device, so a config write (which rebuilds the map under the write lock
//! after releasing the device) never waits on a vCPU that holds both.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::alloc::AddressAllocator;
use super::config::{BarKind, NUM_BARS};
use super::host_bridge::HostBridge;
use super::{PciDevice, PciError};

/// The legacy config address port.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// The first legacy config data port (0xCFC..=0xCFF).
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
const NUM_SLOTS: usize = 32;

/// The address windows BARs are allocated from (the VMM describes the same windows to the
/// guest in ACPI `_CRS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciWindows {
    /// Below 4 GiB, for 32-bit memory BARs (and 64-bit ones when `mmio64` is empty or full).
    pub mmio32: Range<u64>,
    /// Above RAM, for 64-bit memory BARs.
    pub mmio64: Range<u64>,
    /// I/O ports for I/O BARs.
    pub io: Range<u16>,
}

/// A bus/device/function address on the root bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct BarMapping {
    base: u64,
    size: u64,
    io: bool,
    slot: usize,
    bar: usize,
}

type SharedDevice = Arc<Mutex<dyn PciDevice>>;

struct BusInner {
    slots: Vec<Option<SharedDevice>>,
    mappings: Vec<BarMapping>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    io: AddressAllocator,
    /// Per slot, the BAR ranges the bus allocated (window, base), freed on removal.
    allocated: Vec<Vec<(Window, u64)>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Mmio32,
    Mmio64,
    Io,
}

/// The root bus with its host bridge at 00:00.0.
pub struct PciBus {
    inner: RwLock<BusInner>,
    windows: PciWindows,
    config_address: AtomicU32,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("windows", &self.windows)
            .finish()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A device that panicked mid-access leaves plain data behind; keep serving the guest.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciBus {
    /// A bus with the generic host bridge at slot 0; BARs are allocated from `windows`.
    pub fn new(windows: PciWindows) -> Self {
        Self::with_host_bridge(windows, Arc::new(Mutex::new(HostBridge::new())))
    }

    /// A bus with `bridge` (e.g. the q35 MCH) at slot 0.
    pub fn with_host_bridge(windows: PciWindows, bridge: SharedDevice) -> Self {
        let bus = PciBus {
            inner: RwLock::new(BusInner {
                slots: vec![None; NUM_SLOTS],
                mappings: Vec::new(),
                mmio32: AddressAllocator::new(windows.mmio32.clone()),
                mmio64: AddressAllocator::new(windows.mmio64.clone()),
                io: AddressAllocator::new(u64::from(windows.io.start)..u64::from(windows.io.end)),
                allocated: vec![Vec::new(); NUM_SLOTS],
            }),
            windows,
            config_address: AtomicU32::new(0),
        };
        bus.write_inner().slots[0] = Some(bridge);
        bus
    }

    fn read_inner(&self) -> std::sync::RwLockReadGuard<'_, BusInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_inner(&self) -> std::sync::RwLockWriteGuard<'_, BusInner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a device at the first free slot, allocates and programs its BARs, enables its
    /// decoding (as firmware would) and calls [`PciDevice::bars_assigned`].
    pub fn add_device(&self, device: SharedDevice) -> Result<PciAddress, PciError> {
        self.add_device_in(None, device)
    }

    /// Adds a device at `slot` (a chipset function with a fixed address, e.g. the LPC bridge
    /// at 00:1f.0), as [`PciBus::add_device`] does otherwise.
    pub fn add_device_at(&self, slot: u8, device: SharedDevice) -> Result<PciAddress, PciError> {
        self.add_device_in(Some(slot), device)
    }

    fn add_device_in(
        &self,
        want: Option<u8>,
        device: SharedDevice,
    ) -> Result<PciAddress, PciError> {
        let mut inner = self.write_inner();
        let slot = match want {
            Some(s) => {
                let s = usize::from(s);
                if s == 0 || s >= NUM_SLOTS || inner.slots[s].is_some() {
                    return Err(PciError::SlotTaken(s as u8));
                }
                s
            }
            None => inner
                .slots
                .iter()
                .position(Option::is_none)
                .ok_or(PciError::BusFull)?,
        };
        {
            let mut dev = lock(&device);
            let ranges = Self::allocate_bars(&mut inner, &mut *dev)?;
            inner.allocated[slot] = ranges;
            dev.bars_assigned();
        }
        inner.slots[slot] = Some(device);
        Self::rebuild_mappings(&mut inner);
        Ok(PciAddress {
            bus: 0,
            device: slot as u8,
            function: 0,
        })
    }

    /// Takes the device out of `slot` (hot-unplug, after the guest ejected it): its BARs stop
    /// decoding and their ranges and the slot become free for the next device.
    pub fn remove_device(&self, slot: u8) -> Result<SharedDevice, PciError> {
        let mut inner = self.write_inner();
        let s = usize::from(slot);
        if s == 0 || s >= NUM_SLOTS || inner.slots[s].is_none() {
            return Err(PciError::NoDevice(slot));
        }
        let dev = inner.slots[s].take().ok_or(PciError::NoDevice(slot))?;
        for (w, base) in std::mem::take(&mut inner.allocated[s]) {
            match w {
                Window::Mmio32 => inner.mmio32.free(base),
                Window::Mmio64 => inner.mmio64.free(base),
                Window::Io => inner.io.free(base),
            };
        }
        Self::rebuild_mappings(&mut inner);
        Ok(dev)
    }

    /// The slot numbers that hold a device (the host bridge, slot 0, included).
    pub fn occupied_slots(&self) -> Vec<u8> {
        let inner = self.read_inner();
        (0..NUM_SLOTS)
            .filter(|&s| inner.slots[s].is_some())
            .map(|s| s as u8)
            .collect()
    }

    /// Assigns every BAR of `dev` from the windows, as firmware would; returns the ranges.
    fn allocate_bars(
        inner: &mut BusInner,
        dev: &mut dyn PciDevice,
    ) -> Result<Vec<(Window, u64)>, PciError> {
        let bars = *dev.config().bars();
        let mut command = 0;
        let mut ranges = Vec::new();
        let result = (|| {
            for (index, spec) in bars.iter().enumerate() {
                let Some(spec) = spec else { continue };
                let (window, addr) = match spec.kind {
                    BarKind::Io => {
                        command |= super::config::COMMAND_IO;
                        let a = inner.io.allocate(spec.size, spec.size);
                        (
                            Window::Io,
                            a.ok_or(PciError::NoBarSpace {
                                size: spec.size,
                                kind: "I/O",
                            })?,
                        )
                    }
                    BarKind::Mem32 { .. } => {
                        command |= super::config::COMMAND_MEMORY;
                        let a = inner.mmio32.allocate(spec.size, spec.size);
                        (
                            Window::Mmio32,
                            a.ok_or(PciError::NoBarSpace {
                                size: spec.size,
                                kind: "32-bit memory",
                            })?,
                        )
                    }
                    BarKind::Mem64 { .. } => {
                        command |= super::config::COMMAND_MEMORY;
                        match inner.mmio64.allocate(spec.size, spec.size) {
                            Some(a) => (Window::Mmio64, a),
                            None => (
                                Window::Mmio32,
                                inner.mmio32.allocate(spec.size, spec.size).ok_or(
                                    PciError::NoBarSpace {
                                        size: spec.size,
                                        kind: "64-bit memory",
                                    },
                                )?,
                            ),
                        }
                    }
                };
                ranges.push((window, addr));
                dev.config_mut().set_bar_address(index, addr)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Nothing half-allocated stays behind.
            for (w, base) in ranges {
                match w {
                    Window::Mmio32 => inner.mmio32.free(base),
                    Window::Mmio64 => inner.mmio64.free(base),
                    Window::Io => inner.io.free(base),
                };
            }
            return Err(e);
        }
        dev.config_mut().enable_command(command);
        Ok(ranges)
    }

    fn rebuild_mappings(inner: &mut BusInner) {
        let mut mappings = Vec::new();
        for (slot, dev) in inner.slots.iter().enumerate() {
            let Some(dev) = dev else { continue };
            let dev = lock(dev);
            for bar in 0..NUM_BARS {
                if let Some((base, size, kind)) = dev.config().decoded_bar(bar) {
                    let io = kind == BarKind::Io;
                    mappings.push(BarMapping {
                        base,
                        size,
                        io,
                        slot,
                        bar,
                    });
                }
            }
        }
        inner.mappings = mappings;
    }

    fn device_at(&self, bus: u8, slot: u8, function: u8) -> Option<SharedDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.read_inner()
            .slots
            .get(usize::from(slot))
            .cloned()
            .flatten()
    }

    fn config_read(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        let Some(dev) = self.device_at(bus, slot, function) else {
            data.fill(0xff);
            return;
        };
        let reg = lock(&dev).read_config_register(offset / 4).to_le_bytes();
        let start = offset % 4;
        for (i, b) in data.iter_mut().enumerate() {
            *b = reg.get(start + i).copied().unwrap_or(0xff);
        }
    }

    fn config_write(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(dev) = self.device_at(bus, slot, function) else {
            return;
        };
        if offset % 4 + data.len() > 4 {
            return;
        }
        let effect = lock(&dev).write_config_register(offset / 4, offset % 4, data);
        if effect.bars_changed {
            Self::rebuild_mappings(&mut self.write_inner());
        }
    }

    /// Splits a 0xCF8 address latch into (bus, device, function, register byte offset).
    fn decode_cf8(addr: u32) -> Option<(u8, u8, u8, usize)> {
        if addr & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (addr >> 16) as u8;
        let dev = ((addr >> 11) & 0x1f) as u8;
        let func = ((addr >> 8) & 0x7) as u8;
        Some((bus, dev, func, (addr & 0xfc) as usize))
    }

    /// Guest read of an I/O port: legacy config access on 0xCF8..=0xCFF, or an I/O BAR.
    /// Returns false when no one decodes `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                data.copy_from_slice(&self.config_address.load(Ordering::Acquire).to_le_bytes());
            }
            CONFIG_ADDRESS_PORT..=0xcfb => data.fill(0xff),
            CONFIG_DATA_PORT..=0xcff => {
                let latch = self.config_address.load(Ordering::Acquire);
                match Self::decode_cf8(latch) {
                    Some((b, d, f, reg))
                        if usize::from(port - CONFIG_DATA_PORT) + data.len() <= 4 =>
                    {
                        self.config_read(b, d, f, reg + usize::from(port - CONFIG_DATA_PORT), data)
                    }
                    _ => data.fill(0xff),
                }
            }
            _ => return self.bar_access(u64::from(port), true, Access::Read(data)),
        }
        true
    }

    /// Guest write of an I/O port: legacy config access on 0xCF8..=0xCFF, or an I/O BAR.
    /// Returns false when no one decodes `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.config_address.store(v, Ordering::Release);
            }
            CONFIG_ADDRESS_PORT..=0xcfb => {}
            CONFIG_DATA_PORT..=0xcff => {
                let latch = self.config_address.load(Ordering::Acquire);
                if let Some((b, d, f, reg)) = Self::decode_cf8(latch) {
                    self.config_write(b, d, f, reg + usize::from(port - CONFIG_DATA_PORT), data);
                }
            }
            _ => return self.bar_access(u64::from(port), true, Access::Write(data)),
        }
        true
    }

    fn decode_ecam(offset: u64) -> (u8, u8, u8, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            (offset & 0xfff) as usize,
        )
    }

    /// Guest read of the ECAM window, `offset` relative to its base.
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = Self::decode_ecam(offset);
        if !matches!(data.len(), 1 | 2 | 4) || reg % data.len() != 0 {
            data.fill(0xff);
            return;
        }
        self.config_read(b, d, f, reg, data);
    }

    /// Guest write of the ECAM window, `offset` relative to its base.
    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = Self::decode_ecam(offset);
        if matches!(data.len(), 1 | 2 | 4) && reg % data.len() == 0 {
            self.config_write(b, d, f, reg, data);
        }
    }

    /// Guest read of MMIO `addr`: routed to the device whose enabled memory BAR holds it.
    /// Returns false when no BAR decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.bar_access(addr, false, Access::Read(data))
    }

    /// Guest write of MMIO `addr`. Returns false when no BAR decodes `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.bar_access(addr, false, Access::Write(data))
    }

    fn bar_access(&self, addr: u64, io: bool, access: Access<'_>) -> bool {
        let found = {
            let inner = self.read_inner();
            inner
                .mappings
                .iter()
                .find(|m| m.io == io && addr >= m.base && addr - m.base < m.size)
                .and_then(|m| Some((inner.slots[m.slot].clone()?, m.bar, addr - m.base)))
        };
        let Some((dev, bar, offset)) = found else {
            return false;
        };
        let mut dev = lock(&dev);
        match access {
            Access::Read(data) => dev.bar_read(bar, offset, data),
            Access::Write(data) => dev.bar_write(bar, offset, data),
        }
        true
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}
