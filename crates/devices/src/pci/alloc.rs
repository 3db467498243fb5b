//! First-fit allocation of aligned ranges inside a window, with freeing: PCI BARs (and other
//! address ranges a VMM hands out) can be returned on hot-unplug and reused.

use std::collections::BTreeMap;
use std::ops::Range;

/// Ranges handed out from one window.
#[derive(Clone, Debug)]
pub struct AddressAllocator {
    window: Range<u64>,
    /// base → size of each range in use.
    used: BTreeMap<u64, u64>,
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

impl AddressAllocator {
    /// An allocator over `window`.
    pub fn new(window: Range<u64>) -> Self {
        AddressAllocator {
            window,
            used: BTreeMap::new(),
        }
    }

    /// The lowest free range of `size` bytes aligned to `align` (a power of two), or `None`.
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let mut candidate = align_up(self.window.start, align)?;
        for (&base, &len) in &self.used {
            let end = candidate.checked_add(size)?;
            if end <= base {
                break;
            }
            if base + len > candidate {
                candidate = align_up(base + len, align)?;
            }
        }
        let end = candidate.checked_add(size)?;
        if end > self.window.end {
            return None;
        }
        self.used.insert(candidate, size);
        Some(candidate)
    }

    /// Returns the range starting at `base`; false if none was allocated there.
    pub fn free(&mut self, base: u64) -> bool {
        self.used.remove(&base).is_some()
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.used.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_aligned_and_bounded() {
        let mut a = AddressAllocator::new(0x1000..0x9000);
        assert_eq!(a.allocate(0x1000, 0x1000), Some(0x1000));
        assert_eq!(a.allocate(0x2000, 0x2000), Some(0x2000));
        assert_eq!(a.allocate(0x100, 0x100), Some(0x4000));
        assert_eq!(
            a.allocate(0x4000, 0x4000),
            None,
            "0x8000..0xc000 is past the end"
        );
        assert_eq!(a.allocate(0, 8), None);
        assert_eq!(a.allocate(8, 3), None);
        assert_eq!(a.used(), 0x3100);
    }

    #[test]
    fn freed_ranges_are_reused() {
        let mut a = AddressAllocator::new(0..0x10000);
        let x = a.allocate(0x8000, 0x8000).unwrap();
        let y = a.allocate(0x8000, 0x8000).unwrap();
        assert_eq!((x, y), (0, 0x8000));
        assert_eq!(a.allocate(0x8000, 0x8000), None);
        assert!(a.free(x));
        assert!(!a.free(x));
        assert_eq!(a.allocate(0x4000, 0x4000), Some(0));
        assert_eq!(a.allocate(0x4000, 0x4000), Some(0x4000));
    }

    #[test]
    fn huge_requests_do_not_overflow() {
        let mut a = AddressAllocator::new(u64::MAX - 0x1000..u64::MAX);
        assert_eq!(a.allocate(1 << 63, 1 << 63), None);
        assert_eq!(a.allocate(0x2000, 0x1000), None);
    }
}
