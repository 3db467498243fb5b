//! L2 tables: the entry encoding and a bounded cache of decoded tables.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::file::{decode_table, ImgFile};
use crate::Result;

pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
/// All 32 subclusters allocated / reading as zeroes (extended L2 bitmap halves).
pub const SUB_ALLOC_ALL: u64 = 0xffff_ffff;
pub const SUB_ZERO_ALL: u64 = 0xffff_ffff << 32;

/// What one guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated: reads come from the backing file or are zero.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster (0 if none).
    Zero { host: u64, copied: bool },
    /// Data at `host`. In extended L2 images `alloc`/`zero` are the subcluster bitmaps; a
    /// standard image has all 32 subclusters allocated.
    Normal {
        host: u64,
        copied: bool,
        alloc: u32,
        zero: u32,
    },
    /// Compressed data of `len` bytes at `host` (not aligned).
    Compressed { host: u64, len: u64 },
}

impl Cluster {
    /// Host clusters this mapping holds a reference on, as (first byte, length in bytes).
    pub fn host_range(&self) -> Option<(u64, u64)> {
        match *self {
            Cluster::Zero { host, .. } if host != 0 => Some((host, 1)),
            Cluster::Normal { host, .. } if host != 0 => Some((host, 1)),
            Cluster::Compressed { host, len } => Some((host, len)),
            _ => None,
        }
    }

    /// A standard cluster whose data can be overwritten in place.
    pub fn writable_in_place(&self) -> bool {
        matches!(self, Cluster::Normal { copied: true, alloc, zero: 0, .. } if *alloc == u32::MAX)
    }
}

/// Decodes an L2 entry (with its bitmap for extended L2) of an image with `cluster_bits`.
pub fn decode(entry: u64, bitmap: Option<u64>, cluster_bits: u32) -> Cluster {
    if entry & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = (entry >> x) & ((1u64 << (62 - x)) - 1);
        let len = (sectors + 1) * 512 - (host & 511);
        return Cluster::Compressed { host, len };
    }
    let host = entry & L2_OFFSET_MASK;
    let copied = entry & COPIED != 0;
    match bitmap {
        Some(bm) => {
            let alloc = bm as u32;
            let zero = (bm >> 32) as u32;
            if alloc == 0 && host == 0 {
                // No host cluster: whole-cluster states, or a mix of zeroed and
                // backing-file subclusters (a Normal mapping with host 0).
                return match zero {
                    0 => Cluster::Unallocated,
                    u32::MAX => Cluster::Zero { host: 0, copied },
                    _ => Cluster::Normal {
                        host: 0,
                        copied,
                        alloc: 0,
                        zero,
                    },
                };
            }
            if alloc == 0 && zero == u32::MAX {
                return Cluster::Zero { host, copied };
            }
            Cluster::Normal {
                host,
                copied,
                alloc,
                zero,
            }
        }
        None => {
            if entry & ZERO != 0 {
                Cluster::Zero { host, copied }
            } else if host == 0 {
                Cluster::Unallocated
            } else {
                Cluster::Normal {
                    host,
                    copied,
                    alloc: u32::MAX,
                    zero: 0,
                }
            }
        }
    }
}

/// Hashes cluster offsets (multiples of 512) with one multiplication: SipHash costs more
/// than the rest of a cached lookup, and the keys come from our own tables.
#[derive(Default)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by host offsets.
pub type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

/// Decoded L2 tables keyed by host offset, bounded in memory.
pub struct L2Cache {
    tables: OffsetMap<Vec<u64>>,
    cap: usize,
}

impl L2Cache {
    /// A cache of at most `bytes` worth of tables of `cluster_size` bytes.
    pub fn new(bytes: u64, cluster_size: u64) -> Self {
        L2Cache {
            tables: OffsetMap::default(),
            cap: (bytes / cluster_size).max(4) as usize,
        }
    }

    /// The table at `off` if it is cached.
    pub fn peek(&self, off: u64) -> Option<&Vec<u64>> {
        self.tables.get(&off)
    }

    /// The table at `off`, loaded from `file` if absent.
    pub fn get(&mut self, file: &ImgFile, off: u64, cluster_size: u64) -> Result<&mut Vec<u64>> {
        if !self.tables.contains_key(&off) {
            if self.tables.len() >= self.cap {
                if let Some(&k) = self.tables.keys().next() {
                    self.tables.remove(&k);
                }
            }
            let mut buf = vec![0u8; cluster_size as usize];
            file.read_meta(&mut buf, off, "L2 table")?;
            self.tables.insert(off, decode_table(&buf));
        }
        Ok(self.tables.get_mut(&off).expect("inserted above"))
    }

    pub fn insert(&mut self, off: u64, table: Vec<u64>) {
        if self.tables.len() >= self.cap {
            if let Some(&k) = self.tables.keys().next() {
                self.tables.remove(&k);
            }
        }
        self.tables.insert(off, table);
    }

    pub fn remove(&mut self, off: u64) {
        self.tables.remove(&off);
    }

    pub fn clear(&mut self) {
        self.tables.clear();
    }
}
