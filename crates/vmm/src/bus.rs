//! Port I/O and MMIO buses: platform devices register an address range and get the vCPU
//! accesses that fall in it. Adding a device (fw_cfg, a PM timer, a hotplug controller) is an
//! `insert`, not a new arm in a `match` on port numbers.
//!
//! Locking: the range map sits behind an `RwLock` that a vCPU holds only long enough to clone
//! the device's `Arc`; the access itself runs under the device's own `Mutex`, so two vCPUs
//! touching different devices never wait on each other, and a device may insert or remove
//! ranges (e.g. a BAR move) without deadlocking against an access in flight.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a [`Bus`]. Offsets are relative to the start of the range it was inserted at;
/// `data.len()` is the access size (1, 2, 4 or 8 bytes; port I/O at most 4).
pub trait BusDevice: Send {
    /// A guest read. Bytes the device does not set read as 0 (the bus zeroes `data` first).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device as the bus holds it.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// A bus operation that cannot be done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    /// The range overlaps one that is already taken.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other: u64,
        other_len: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// Address ranges → devices.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(r.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base + len`.
    pub fn insert(&self, base: u64, len: u64, device: SharedBusDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut r = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        // The entry starting below `end` with the highest base is the only one that can overlap
        // from below; any entry starting inside the range overlaps too.
        if let Some((&b, e)) = r.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other: b,
                    other_len: e.len,
                });
            }
        }
        r.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device inserted at `base` and returns it.
    pub fn remove(&self, base: u64) -> Option<SharedBusDevice> {
        let mut r = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        r.remove(&base).map(|e| e.device)
    }

    /// The device covering `addr` and the offset of `addr` in its range.
    fn resolve(&self, addr: u64) -> Option<(SharedBusDevice, u64)> {
        let r = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&b, e) = r.range(..=addr).next_back()?;
        (addr - b < e.len).then(|| (e.device.clone(), addr - b))
    }

    /// A guest read at `addr`; false when no device decodes it (the caller answers all-ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((dev, off)) = self.resolve(addr) else {
            return false;
        };
        data.fill(0);
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(off, data);
        true
    }

    /// A guest write at `addr`; false when no device decodes it (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((dev, off)) = self.resolve(addr) else {
            return false;
        };
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(off, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = offset as u8;
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_relative_offsets() {
        let bus = Bus::new();
        let p = Arc::new(Mutex::new(Probe::default()));
        bus.insert(0x600, 8, p.clone()).unwrap();
        let mut d = [0xffu8; 2];
        assert!(bus.read(0x605, &mut d));
        assert_eq!(d, [5, 0]);
        assert!(bus.write(0x607, &[1, 2]));
        assert_eq!(p.lock().unwrap().last, Some((7, vec![1, 2])));
        assert!(!bus.read(0x608, &mut d));
        assert!(!bus.read(0x5ff, &mut d));
        assert!(!bus.write(0, &[1]));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let bus = Bus::new();
        let p = || Arc::new(Mutex::new(Probe::default())) as SharedBusDevice;
        bus.insert(0x100, 0x10, p()).unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, p()),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(0xf8, 0x10, p()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x0, 0x1000, p()),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(0x110, 1, p()).unwrap();
        bus.insert(0xff, 1, p()).unwrap();
        assert_eq!(
            bus.insert(u64::MAX, 2, p()),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
        assert!(bus.insert(0x200, 0, p()).is_err());
    }

    #[test]
    fn removed_ranges_stop_decoding_and_can_be_reused() {
        let bus = Bus::new();
        let p = Arc::new(Mutex::new(Probe::default()));
        bus.insert(0x1000, 0x100, p.clone()).unwrap();
        assert!(bus.remove(0x1000).is_some());
        assert!(bus.remove(0x1000).is_none());
        assert!(!bus.write(0x1000, &[1]));
        bus.insert(0x1080, 0x100, p).unwrap();
        assert!(bus.write(0x1100, &[1]));
    }
}
