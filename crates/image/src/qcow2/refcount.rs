//! Refcount table and blocks: reading, updating and growing them, and allocating clusters.
//!
//! Every update is written through at once, and a new structure is always written before the
//! pointer that publishes it, so a process killed at any point leaves at worst leaked clusters.

use std::collections::HashMap;
use std::ops::Range;

use super::file::{decode_table, encode_table, ImgFile};
use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use crate::{Error, Result};

/// Offset bits of refcount table entries.
const RT_OFFSET_MASK: u64 = !0x1ff;
/// Highest host cluster offset the L1/L2 layout can address (56 bits).
const MAX_HOST_OFFSET: u64 = 1 << 56;

pub struct Refcounts {
    file: ImgFile,
    cluster_bits: u32,
    order: u32,
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u32,
    cache: super::l2::OffsetMap<Vec<u8>>,
    cache_cap: usize,
    free_hint: u64,
}

/// Reads entry `i` of a refcount block with `1 << order`-bit entries.
pub fn get_entry(block: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let b = block[i * bits / 8];
            ((b >> ((i * bits) % 8)) & ((1u16 << bits) - 1) as u8) as u64
        }
        3 => block[i] as u64,
        4 => u16::from_be_bytes([block[2 * i], block[2 * i + 1]]) as u64,
        5 => u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap_or([0; 4])) as u64,
        _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().unwrap_or([0; 8])),
    }
}

/// Writes entry `i`; returns the byte range touched.
pub fn set_entry(block: &mut [u8], i: usize, order: u32, v: u64) -> Range<usize> {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let at = i * bits / 8;
            let shift = (i * bits) % 8;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[at] = (block[at] & !mask) | (((v as u8) << shift) & mask);
            at..at + 1
        }
        3 => {
            block[i] = v as u8;
            i..i + 1
        }
        4 => {
            block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes());
            2 * i..2 * i + 2
        }
        5 => {
            block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes());
            4 * i..4 * i + 4
        }
        _ => {
            block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes());
            8 * i..8 * i + 8
        }
    }
}

fn in_any(c: u64, ranges: &[Range<u64>]) -> bool {
    ranges.iter().any(|r| r.contains(&c))
}

impl Refcounts {
    /// Loads the refcount table the header points at.
    pub fn load(
        file: ImgFile,
        cluster_bits: u32,
        order: u32,
        offset: u64,
        clusters: u32,
    ) -> Result<Self> {
        let bytes = clusters as u64 * (1 << cluster_bits);
        if bytes > MAX_REFTABLE_BYTES {
            return Err(file.corrupt(format!("refcount table of {bytes} bytes exceeds 8 MiB")));
        }
        let mut buf = vec![0u8; bytes as usize];
        file.read_meta(&mut buf, offset, "refcount table")?;
        let cache_cap = ((64u64 << 20) >> cluster_bits).max(16) as usize;
        Ok(Refcounts {
            file,
            cluster_bits,
            order,
            table: decode_table(&buf),
            table_offset: offset,
            table_clusters: clusters,
            cache: Default::default(),
            cache_cap,
            free_hint: 0,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    pub fn epb(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }

    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    /// Host offset of refcount block `bi`, if allocated.
    pub fn block_offset(&self, bi: u64) -> Result<Option<u64>> {
        let Some(&e) = self.table.get(bi as usize) else {
            return Ok(None);
        };
        let off = e & RT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) {
            return Err(self.file.corrupt(format!(
                "refcount block {bi} at offset {off:#x} is not cluster aligned"
            )));
        }
        Ok(Some(off))
    }

    fn block(&mut self, off: u64) -> Result<&mut Vec<u8>> {
        if !self.cache.contains_key(&off) {
            if self.cache.len() >= self.cache_cap {
                if let Some(&k) = self.cache.keys().next() {
                    self.cache.remove(&k);
                }
            }
            let mut buf = vec![0u8; self.cs() as usize];
            self.file.read_meta(&mut buf, off, "refcount block")?;
            self.cache.insert(off, buf);
        }
        Ok(self.cache.get_mut(&off).expect("inserted above"))
    }

    /// Refcount of host cluster `c`.
    pub fn get(&mut self, c: u64) -> Result<u64> {
        let epb = self.epb();
        let order = self.order;
        match self.block_offset(c / epb)? {
            None => Ok(0),
            Some(off) => Ok(get_entry(self.block(off)?, (c % epb) as usize, order)),
        }
    }

    /// Finds `n` consecutive free clusters, skipping `avoid`.
    fn scan_free(&mut self, n: u64, avoid: &[Range<u64>]) -> Result<u64> {
        let epb = self.epb();
        let mut c = self.free_hint.max(1);
        let mut start = c;
        while c - start < n {
            if c * self.cs() >= MAX_HOST_OFFSET {
                return Err(Error::Unsupported {
                    path: self.file.path.clone(),
                    what: "image file would grow past 64 PiB".into(),
                });
            }
            if in_any(c, avoid) {
                c += 1;
                start = c;
                continue;
            }
            let bi = c / epb;
            if self.block_offset(bi)?.is_none()
                && !avoid.iter().any(|r| r.end > c && r.start < (bi + 1) * epb)
            {
                c = (bi + 1) * epb;
                continue;
            }
            if self.get(c)? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters with refcount 1; returns the host offset.
    pub fn alloc(&mut self, n: u64) -> Result<u64> {
        let start = self.scan_free(n, &[])?;
        self.adjust(start, n, 1, &[])?;
        self.free_hint = start + n;
        Ok(start * self.cs())
    }

    /// Adds `delta` to the refcounts of clusters `[start, start+n)`.
    pub fn adjust(&mut self, start: u64, n: u64, delta: i64, avoid: &[Range<u64>]) -> Result<()> {
        let epb = self.epb();
        let order = self.order;
        let max = self.max_refcount() as i128;
        let mut avoid = avoid.to_vec();
        avoid.push(start..start + n);
        let mut c = start;
        while c < start + n {
            let bi = c / epb;
            if delta > 0 {
                self.ensure_block(bi, &avoid)?;
            }
            let Some(off) = self.block_offset(bi)? else {
                return Err(self.file.corrupt(format!(
                    "refcount of cluster {:#x} would drop below zero (no refcount block)",
                    c * self.cs()
                )));
            };
            let end = (start + n).min((bi + 1) * epb);
            let path = self.file.path.clone();
            let cs = self.cs();
            let block = self.block(off)?;
            let mut span: Option<Range<usize>> = None;
            let mut first_freed = u64::MAX;
            for i in c..end {
                let idx = (i - bi * epb) as usize;
                let v = get_entry(block, idx, order) as i128 + delta as i128;
                if v < 0 {
                    return Err(Error::Corrupt {
                        path,
                        what: format!("refcount of cluster {:#x} would become {v}", i * cs),
                    });
                }
                if v > max {
                    return Err(Error::Unsupported {
                        path,
                        what: format!(
                            "refcount of cluster {:#x} would exceed {max}, the most {} refcount bits hold; convert the image with -o refcount_bits=16",
                            i * cs,
                            1u32 << order
                        ),
                    });
                }
                if v == 0 {
                    first_freed = first_freed.min(i);
                }
                let r = set_entry(block, idx, order, v as u64);
                span = Some(match span {
                    None => r,
                    Some(s) => s.start.min(r.start)..s.end.max(r.end),
                });
            }
            if let Some(s) = span {
                let data = block[s.clone()].to_vec();
                self.file.write(&data, off + s.start as u64)?;
            }
            // Only clusters that became free pull the allocation hint back; scanning from
            // a cluster that merely lost one of several references would rescan used space.
            self.free_hint = self.free_hint.min(first_freed);
            c = end;
        }
        Ok(())
    }

    /// Makes sure refcount block `bi` exists, allocating it outside `avoid`.
    fn ensure_block(&mut self, bi: u64, avoid: &[Range<u64>]) -> Result<()> {
        if self.block_offset(bi)?.is_some() {
            return Ok(());
        }
        if bi >= self.table.len() as u64 {
            self.grow_table(bi + 1, avoid)?;
            if self.block_offset(bi)?.is_some() {
                return Ok(());
            }
        }
        let epb = self.epb();
        let cs = self.cs();
        let own = (bi * epb..(bi + 1) * epb).find(|c| !in_any(*c, avoid));
        let mut block = vec![0u8; cs as usize];
        let at = match own {
            Some(c) => {
                set_entry(&mut block, (c - bi * epb) as usize, self.order, 1);
                self.file.write(&block, c * cs)?;
                c
            }
            None => {
                let c = self.scan_free(1, avoid)?;
                self.file.write(&block, c * cs)?;
                let mut more = avoid.to_vec();
                more.push(c..c + 1);
                self.adjust(c, 1, 1, &more)?;
                c
            }
        };
        self.table[bi as usize] = at * cs;
        self.file
            .write(&(at * cs).to_be_bytes(), self.table_offset + bi * 8)?;
        self.cache.insert(at * cs, block);
        Ok(())
    }

    /// First cluster past everything referenced and past the end of the file.
    fn used_end(&mut self) -> Result<u64> {
        let file_end = self.file.len()?.div_ceil(self.cs());
        let epb = self.epb();
        let order = self.order;
        for bi in (0..self.table.len() as u64).rev() {
            let Some(off) = self.block_offset(bi)? else {
                continue;
            };
            let block = self.block(off)?;
            if let Some(i) = (0..epb as usize)
                .rev()
                .find(|&i| get_entry(block, i, order) != 0)
            {
                return Ok(file_end.max(bi * epb + i as u64 + 1));
            }
        }
        Ok(file_end)
    }

    /// Replaces the refcount table with one of at least `min_entries`, placed past the end of
    /// the image together with the refcount blocks that describe it.
    fn grow_table(&mut self, min_entries: u64, avoid: &[Range<u64>]) -> Result<()> {
        let cs = self.cs();
        let epc = cs / 8;
        let epb = self.epb();
        let start = avoid.iter().map(|r| r.end).fold(self.used_end()?, u64::max);
        let mut want = min_entries.max(self.table.len() as u64 * 2);
        let mut nb = 0;
        let missing = |t: &[u64], b: u64| t.get(b as usize).is_none_or(|e| e & RT_OFFSET_MASK == 0);
        let (tc, area_end) = loop {
            let tc = want.div_ceil(epc);
            let area_end = start + tc + nb;
            let last_block = (area_end - 1) / epb;
            want = want.max(last_block + 1);
            let tc2 = want.div_ceil(epc);
            let miss = (start / epb..=last_block)
                .filter(|&b| missing(&self.table, b))
                .count() as u64;
            if tc2 == tc && miss == nb {
                break (tc, area_end);
            }
            nb = miss;
        };
        if tc * cs > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                path: self.file.path.clone(),
                what: "the refcount table would exceed 8 MiB; use larger clusters".into(),
            });
        }
        let mut table = self.table.clone();
        table.resize((tc * epc) as usize, 0);
        let mut new_blocks: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut next = start + tc;
        for b in start / epb..=(area_end - 1) / epb {
            if missing(&self.table, b) {
                table[b as usize] = next * cs;
                new_blocks.insert(b, vec![0u8; cs as usize]);
                next += 1;
            }
        }
        let mut old_covered = Vec::new();
        for c in start..area_end {
            match new_blocks.get_mut(&(c / epb)) {
                Some(block) => {
                    set_entry(block, (c % epb) as usize, self.order, 1);
                }
                None => old_covered.push(c),
            }
        }
        for (b, block) in &new_blocks {
            self.file.write(block, table[*b as usize])?;
        }
        for c in old_covered {
            self.adjust(c, 1, 1, std::slice::from_ref(&(start..area_end)))?;
        }
        self.file.write(&encode_table(&table), start * cs)?;
        let mut hdr = Vec::with_capacity(12);
        hdr.extend_from_slice(&(start * cs).to_be_bytes());
        hdr.extend_from_slice(&(tc as u32).to_be_bytes());
        self.file.write(&hdr, OFF_REFTABLE)?;
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters as u64);
        self.table = table;
        self.table_offset = start * cs;
        self.table_clusters = tc as u32;
        for (b, block) in new_blocks {
            self.cache.insert(self.table[b as usize], block);
        }
        self.adjust(old_off / cs, old_clusters, -1, &[])
    }

    /// Sets the refcount of cluster `c` to `v` (repair only).
    pub fn set(&mut self, c: u64, v: u64) -> Result<()> {
        let cur = self.get(c)?;
        if cur == v {
            return Ok(());
        }
        let delta = v as i128 - cur as i128;
        self.adjust(c, 1, delta as i64, &[])
    }

    /// Takes free cluster `c` (refcount 0 → 1); false if it is in use.
    pub fn claim(&mut self, c: u64) -> Result<bool> {
        if c * self.cs() >= MAX_HOST_OFFSET || self.get(c)? != 0 {
            return Ok(false);
        }
        self.adjust(c, 1, 1, &[])?;
        Ok(true)
    }

    /// Makes later allocations start at cluster `c` or beyond.
    pub fn allocate_past(&mut self, c: u64) {
        self.free_hint = self.free_hint.max(c);
    }
}
