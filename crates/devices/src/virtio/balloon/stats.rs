//! The statistics the driver posts on the stats queue: an array of packed
//! `struct virtio_balloon_stat { le16 tag; le64 val; }` (10 bytes each).

/// VIRTIO_BALLOON_S_SWAP_IN: bytes swapped in.
pub const VIRTIO_BALLOON_S_SWAP_IN: u16 = 0;
/// VIRTIO_BALLOON_S_SWAP_OUT: bytes swapped out.
pub const VIRTIO_BALLOON_S_SWAP_OUT: u16 = 1;
/// VIRTIO_BALLOON_S_MAJFLT: major page faults.
pub const VIRTIO_BALLOON_S_MAJFLT: u16 = 2;
/// VIRTIO_BALLOON_S_MINFLT: minor page faults.
pub const VIRTIO_BALLOON_S_MINFLT: u16 = 3;
/// VIRTIO_BALLOON_S_MEMFREE: free memory, bytes.
pub const VIRTIO_BALLOON_S_MEMFREE: u16 = 4;
/// VIRTIO_BALLOON_S_MEMTOT: total memory, bytes.
pub const VIRTIO_BALLOON_S_MEMTOT: u16 = 5;
/// VIRTIO_BALLOON_S_AVAIL: memory available without swapping, bytes.
pub const VIRTIO_BALLOON_S_AVAIL: u16 = 6;
/// VIRTIO_BALLOON_S_CACHES: disk caches, bytes.
pub const VIRTIO_BALLOON_S_CACHES: u16 = 7;
/// VIRTIO_BALLOON_S_HTLB_PGALLOC: hugetlb page allocations.
pub const VIRTIO_BALLOON_S_HTLB_PGALLOC: u16 = 8;
/// VIRTIO_BALLOON_S_HTLB_PGFAIL: hugetlb page allocation failures.
pub const VIRTIO_BALLOON_S_HTLB_PGFAIL: u16 = 9;

/// Size of one (tag, value) entry.
pub(crate) const STAT_SIZE: usize = 10;

/// The guest's latest statistics, as it reported them (bytes or event counts, see the tag
/// constants). A tag the guest left out of its last report is `None`: every report replaces
/// the whole set, so nothing stale survives (QEMU does the same).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Tag 0, bytes.
    pub swap_in: Option<u64>,
    /// Tag 1, bytes.
    pub swap_out: Option<u64>,
    /// Tag 2.
    pub major_faults: Option<u64>,
    /// Tag 3.
    pub minor_faults: Option<u64>,
    /// Tag 4, bytes (libvirt's `unused`).
    pub free_memory: Option<u64>,
    /// Tag 5, bytes (libvirt's `available`).
    pub total_memory: Option<u64>,
    /// Tag 6, bytes (libvirt's `usable`).
    pub available_memory: Option<u64>,
    /// Tag 7, bytes.
    pub disk_caches: Option<u64>,
    /// Tag 8.
    pub hugetlb_allocations: Option<u64>,
    /// Tag 9.
    pub hugetlb_failures: Option<u64>,
    /// Host time of the last report, seconds since the Unix epoch; 0 before the first one.
    pub last_update: u64,
}

impl BalloonStats {
    fn slot(&mut self, tag: u16) -> Option<&mut Option<u64>> {
        Some(match tag {
            VIRTIO_BALLOON_S_SWAP_IN => &mut self.swap_in,
            VIRTIO_BALLOON_S_SWAP_OUT => &mut self.swap_out,
            VIRTIO_BALLOON_S_MAJFLT => &mut self.major_faults,
            VIRTIO_BALLOON_S_MINFLT => &mut self.minor_faults,
            VIRTIO_BALLOON_S_MEMFREE => &mut self.free_memory,
            VIRTIO_BALLOON_S_MEMTOT => &mut self.total_memory,
            VIRTIO_BALLOON_S_AVAIL => &mut self.available_memory,
            VIRTIO_BALLOON_S_CACHES => &mut self.disk_caches,
            VIRTIO_BALLOON_S_HTLB_PGALLOC => &mut self.hugetlb_allocations,
            VIRTIO_BALLOON_S_HTLB_PGFAIL => &mut self.hugetlb_failures,
            _ => return None,
        })
    }

    /// The value reported for `tag` (None: not reported, or a tag this device does not keep).
    pub fn get(&self, tag: u16) -> Option<u64> {
        let mut copy = *self;
        copy.slot(tag).and_then(|v| *v)
    }
}

/// What one stats buffer held.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub stats: BalloonStats,
    /// Entries with a tag this device does not keep (newer guests send tags 10..).
    pub unknown_tags: u32,
    /// Bytes at the end that do not make a whole entry.
    pub trailing_bytes: usize,
}

/// Parses the bytes of one stats buffer, stamped `now` (seconds since the epoch).
pub(crate) fn parse(bytes: &[u8], now: u64) -> Parsed {
    let mut out = Parsed {
        stats: BalloonStats {
            last_update: now,
            ..BalloonStats::default()
        },
        ..Parsed::default()
    };
    let mut entries = bytes.chunks_exact(STAT_SIZE);
    for e in entries.by_ref() {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..STAT_SIZE]);
        match out.stats.slot(tag) {
            Some(slot) => *slot = Some(u64::from_le_bytes(v)),
            None => out.unknown_tags += 1,
        }
    }
    out.trailing_bytes = entries.remainder().len();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, v: u64) -> Vec<u8> {
        let mut b = tag.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        b
    }

    #[test]
    fn parses_known_tags_ignores_unknown_and_trailing_bytes() {
        let mut buf = Vec::new();
        buf.extend(entry(VIRTIO_BALLOON_S_MEMFREE, 1 << 30));
        buf.extend(entry(VIRTIO_BALLOON_S_MAJFLT, 7));
        buf.extend(entry(12, 99)); // ASYNC_SCAN (Linux 6.12): not kept
        buf.extend(entry(0xffff, 1));
        buf.extend(entry(VIRTIO_BALLOON_S_HTLB_PGFAIL, 3));
        buf.extend_from_slice(&[4, 0, 1]); // a cut entry
        let p = parse(&buf, 1234);
        assert_eq!(p.stats.free_memory, Some(1 << 30));
        assert_eq!(p.stats.major_faults, Some(7));
        assert_eq!(p.stats.hugetlb_failures, Some(3));
        assert_eq!(p.stats.get(VIRTIO_BALLOON_S_MEMFREE), Some(1 << 30));
        assert_eq!(p.stats.swap_in, None);
        assert_eq!(p.stats.last_update, 1234);
        assert_eq!(p.unknown_tags, 2);
        assert_eq!(p.trailing_bytes, 3);
    }

    #[test]
    fn empty_and_tiny_buffers() {
        let p = parse(&[], 5);
        assert_eq!(p.stats.last_update, 5);
        assert_eq!(p.stats.get(VIRTIO_BALLOON_S_MEMTOT), None);
        assert_eq!(parse(&[1], 5).trailing_bytes, 1);
    }
}
