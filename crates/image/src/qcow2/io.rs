//! Guest I/O on a qcow2 image: cluster lookup, reads through the backing chain, allocating
//! writes with copy-on-write, zeroing, discard, compressed writes, resize and the allocation map.
//!
//! Ordering for crash safety: a cluster's refcount is raised before its data is written, the
//! data is written before the L2 entry that points at it, and an old cluster's refcount is
//! dropped only after nothing points at it any more. A process killed between two steps leaves
//! leaked clusters at worst.

use super::compress;
use super::file::encode_table;
use super::header::{OFF_L1, OFF_SIZE};
use super::l2::{self, Cluster, COMPRESSED, COPIED, L1_OFFSET_MASK, ZERO};
use super::State;
use crate::{BlockDevice, Error, MapExtent, Result};

/// Where a guest cluster's L2 entry lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    /// Host offset of the L2 table.
    pub l2: u64,
    /// Index of the entry in the table.
    pub idx: u64,
}

impl State {
    /// u64 words per L2 entry (2 with extended L2: entry + subcluster bitmap).
    pub(crate) fn stride(&self) -> u64 {
        if self.hdr.extended_l2() {
            2
        } else {
            1
        }
    }

    fn check_host(&self, host: u64, what: &str) -> Result<()> {
        if !host.is_multiple_of(self.cs()) || host >= 1 << 56 {
            return Err(self.f.corrupt(format!(
                "{what} offset {host:#x} is not a valid cluster offset"
            )));
        }
        Ok(())
    }

    /// Host offset of the L2 table for L1 index `i`, validated.
    pub(crate) fn l2_offset(&self, i: u64) -> Result<Option<u64>> {
        let Some(&e) = self.l1.get(i as usize) else {
            return Ok(None);
        };
        let off = e & L1_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        self.check_host(off, "L2 table")?;
        Ok(Some(off))
    }

    /// Mapping of guest cluster `vc`, and the slot of its entry if its L2 table exists.
    pub(crate) fn lookup(&mut self, vc: u64) -> Result<(Cluster, Option<Slot>)> {
        let n = self.hdr.l2_entries();
        let Some(l2) = self.l2_offset(vc / n)? else {
            return Ok((Cluster::Unallocated, None));
        };
        let idx = vc % n;
        let stride = self.stride();
        let cs = self.cs();
        let t = self.l2.get(&self.f, l2, cs)?;
        let entry = t[(idx * stride) as usize];
        let bitmap = (stride == 2).then(|| t[(idx * stride + 1) as usize]);
        let c = l2::decode(entry, bitmap, self.hdr.cluster_bits);
        match c {
            Cluster::Normal { host: 0, alloc, .. } if alloc != 0 => {
                return Err(self.f.corrupt(format!(
                    "guest cluster {vc} has allocated subclusters but no host cluster"
                )));
            }
            Cluster::Normal { host, .. } | Cluster::Zero { host, .. } if host != 0 => {
                self.check_host(host, "data cluster")?;
            }
            _ => {}
        }
        Ok((c, Some(Slot { l2, idx })))
    }

    /// Reads `buf` at guest `offset` (already range checked).
    /// Reads the piece of `buf` (guest `offset`) that starts it: plain data is not read but
    /// returned as `(host offset, length)` so the caller can read it without the lock; any
    /// other mapping is read here. Returns the length handled and the deferred data read.
    pub(crate) fn read_piece(
        &mut self,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(usize, Option<u64>)> {
        let cs = self.cs();
        let in_c = offset % cs;
        let vc = offset / cs;
        let (c, _) = self.lookup(vc)?;
        let mut n = ((cs - in_c) as usize).min(buf.len());
        if let Cluster::Normal {
            host,
            alloc: u32::MAX,
            ..
        } = c
        {
            // Extend plain data reads over host-contiguous clusters to cut syscalls.
            let mut next = vc + 1;
            while n < buf.len() {
                match self.lookup(next)?.0 {
                    Cluster::Normal {
                        host: h,
                        alloc: u32::MAX,
                        ..
                    } if h == host + (next - vc) * cs => {
                        n = (n + cs as usize).min(buf.len());
                        next += 1;
                    }
                    _ => break,
                }
            }
            return Ok((n, Some(host + in_c)));
        }
        self.read_in_cluster(c, &mut buf[..n], offset)?;
        Ok((n, None))
    }

    /// The host range of plain, fully allocated data at guest `offset` (up to `len` bytes,
    /// extended over host-contiguous clusters), if the L2 tables that say so are cached.
    /// Needs only `&self`, so readers share the lock.
    pub(crate) fn cached_data_run(&self, len: usize, offset: u64) -> Option<(usize, u64)> {
        let cs = self.cs();
        let n_l2 = self.hdr.l2_entries();
        let stride = self.stride();
        let cached = |vc: u64| -> Option<u64> {
            let e = *self.l1.get((vc / n_l2) as usize)?;
            let t = self.l2.peek(e & L1_OFFSET_MASK)?;
            let at = ((vc % n_l2) * stride) as usize;
            let bm = (stride == 2).then(|| t[at + 1]);
            match l2::decode(t[at], bm, self.hdr.cluster_bits) {
                Cluster::Normal {
                    host,
                    alloc: u32::MAX,
                    ..
                } if host != 0 && host.is_multiple_of(cs) && host < 1 << 56 => Some(host),
                _ => None,
            }
        };
        let vc = offset / cs;
        let in_c = offset % cs;
        let host = cached(vc)?;
        let mut n = ((cs - in_c) as usize).min(len);
        let mut next = vc + 1;
        while n < len && cached(next) == Some(host + (next - vc) * cs) {
            n = (n + cs as usize).min(len);
            next += 1;
        }
        Some((n, host + in_c))
    }

    /// Reads a piece of one guest cluster mapped as `c`.
    fn read_in_cluster(&mut self, c: Cluster, buf: &mut [u8], pos: u64) -> Result<()> {
        let cs = self.cs();
        let in_c = pos % cs;
        match c {
            Cluster::Unallocated => self.read_backing(buf, pos),
            Cluster::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Cluster::Normal {
                host, alloc, zero, ..
            } => {
                if alloc == u32::MAX {
                    return self.f.read_data(buf, host + in_c);
                }
                // Extended L2: each 1/32 of the cluster is data, zero or from the backing file.
                let sub = cs / 32;
                let mut done = 0usize;
                while done < buf.len() {
                    let p = in_c + done as u64;
                    let s = (p / sub) as u32;
                    let n = ((sub - p % sub) as usize).min(buf.len() - done);
                    let piece = &mut buf[done..done + n];
                    if alloc & (1 << s) != 0 {
                        self.f.read_data(piece, host + p)?;
                    } else if zero & (1 << s) != 0 {
                        piece.fill(0);
                    } else {
                        self.read_backing(piece, pos - in_c + p)?;
                    }
                    done += n;
                }
                Ok(())
            }
            Cluster::Compressed { host, len } => {
                let data = self.inflate(host, len)?;
                buf.copy_from_slice(&data[in_c as usize..in_c as usize + buf.len()]);
                Ok(())
            }
        }
    }

    /// The whole decompressed cluster at `host`, cached for sequential readers.
    fn inflate(&mut self, host: u64, len: u64) -> Result<Vec<u8>> {
        if let Some((h, data)) = &self.comp_cache {
            if *h == host {
                return Ok(data.clone());
            }
        }
        let mut input = vec![0u8; len as usize];
        self.f.read_data(&mut input, host)?;
        let mut out = vec![0u8; self.cs() as usize];
        compress::decompress(self.hdr.compression, &input, &mut out).map_err(|what| {
            Error::Compression {
                path: self.f.path.clone(),
                offset: host,
                what,
            }
        })?;
        self.comp_cache = Some((host, out.clone()));
        Ok(out)
    }

    /// Reads from the backing file; past its end (or without one) the disk reads zeroes.
    fn read_backing(&mut self, buf: &mut [u8], pos: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let n = bsize.saturating_sub(pos).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut buf[..n], pos)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Writes `buf` at guest `offset` (already range and permission checked).
    pub(crate) fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.mark_dirty()?;
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_c = pos % cs;
            if in_c == 0 && (buf.len() - done) as u64 >= 2 * cs {
                let k = self.fresh_run(pos / cs, (buf.len() - done) as u64 / cs)?;
                if k >= 2 {
                    let n = (k * cs) as usize;
                    self.write_fresh_run(&buf[done..done + n], pos / cs, k)?;
                    done += n;
                    continue;
                }
            }
            let n = ((cs - in_c) as usize).min(buf.len() - done);
            self.write_cluster(&buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    /// How many of the (at most `max`) clusters from `vc` on, within one L2 table, hold no
    /// host cluster, so a whole-cluster write can allocate them as one run.
    fn fresh_run(&mut self, vc: u64, max: u64) -> Result<u64> {
        let n = self.hdr.l2_entries();
        let limit = max.min(n - vc % n);
        let mut k = 0;
        while k < limit {
            match self.lookup(vc + k)?.0 {
                Cluster::Unallocated | Cluster::Zero { host: 0, .. } => k += 1,
                _ => break,
            }
        }
        Ok(k)
    }

    /// Writes `k` whole clusters from `vc` into one newly allocated host run: one refcount
    /// update, one data write and one L2 write instead of three of each per cluster.
    fn write_fresh_run(&mut self, data: &[u8], vc: u64, k: u64) -> Result<()> {
        let slot = self.writable_slot(vc)?;
        let host = self.rc.alloc(k)?;
        self.f.write(data, host)?;
        let cs = self.cs();
        let stride = self.stride();
        let t = self.l2.get(&self.f, slot.l2, cs)?;
        let first = (slot.idx * stride) as usize;
        for i in 0..k {
            let at = first + (i * stride) as usize;
            t[at] = (host + i * cs) | COPIED;
            if stride == 2 {
                t[at + 1] = l2::SUB_ALLOC_ALL;
            }
        }
        let bytes = encode_table(&t[first..first + (k * stride) as usize]);
        self.f.write(&bytes, slot.l2 + first as u64 * 8)
    }

    /// Writes within one guest cluster.
    fn write_cluster(&mut self, data: &[u8], pos: u64) -> Result<()> {
        let cs = self.cs();
        let vc = pos / cs;
        let in_c = pos % cs;
        let (c, _) = self.lookup(vc)?;
        if let Some(host) = self.in_place_target(vc, c)? {
            return self.f.write(data, host + in_c);
        }
        // Copy-on-write: build the whole new cluster, then publish it.
        let mut full = vec![0u8; cs as usize];
        if data.len() as u64 != cs {
            self.read_in_cluster(c, &mut full, vc * cs)?;
        }
        full[in_c as usize..in_c as usize + data.len()].copy_from_slice(data);
        if let Cluster::Zero { host, copied: true } = c {
            if host != 0 {
                // A preallocated zero cluster of ours: fill it in place, then make it data.
                self.f.write(&full, host)?;
                let slot = self.writable_slot(vc)?;
                return self.set_entry(slot, host | COPIED, l2::SUB_ALLOC_ALL);
            }
        }
        self.store_new_cluster(vc, c, &full)
    }

    /// The host cluster a write to `vc` may overwrite in place, fixing a missing COPIED flag
    /// when the cluster is in fact not shared.
    fn in_place_target(&mut self, vc: u64, c: Cluster) -> Result<Option<u64>> {
        if c.writable_in_place() {
            if let Cluster::Normal { host, .. } = c {
                return Ok(Some(host));
            }
        }
        if let Cluster::Normal {
            host,
            copied: false,
            alloc: u32::MAX,
            zero: 0,
        } = c
        {
            if self.rc.get(host / self.cs())? == 1 {
                let slot = self.writable_slot(vc)?;
                self.set_entry(slot, host | COPIED, l2::SUB_ALLOC_ALL)?;
                return Ok(Some(host));
            }
        }
        Ok(None)
    }

    /// Allocates a host cluster for `vc`, writes `full` there and points the L2 entry at it,
    /// releasing the old mapping `old`.
    pub(crate) fn store_new_cluster(&mut self, vc: u64, old: Cluster, full: &[u8]) -> Result<()> {
        let slot = self.writable_slot(vc)?;
        let host = self.rc.alloc(1)?;
        self.f.write(full, host)?;
        self.set_entry(slot, host | COPIED, l2::SUB_ALLOC_ALL)?;
        self.release(old)
    }

    /// Drops this mapping's reference on its host clusters.
    pub(crate) fn release(&mut self, c: Cluster) -> Result<()> {
        let cs = self.cs();
        match c.host_range() {
            Some((host, len)) => {
                let first = host / cs;
                let last = (host + len.max(1) - 1) / cs;
                if self.comp_cache.as_ref().is_some_and(|(h, _)| *h == host) {
                    self.comp_cache = None;
                }
                // Never append compressed data to a cluster that may be freed now.
                if self.comp_next != 0 && (first..=last).contains(&((self.comp_next - 1) / cs)) {
                    self.comp_next = 0;
                }
                self.rc.adjust(first, last - first + 1, -1, &[])
            }
            None => Ok(()),
        }
    }

    /// Writes an L2 entry (and its bitmap in extended L2 images).
    pub(crate) fn set_entry(&mut self, slot: Slot, entry: u64, bitmap: u64) -> Result<()> {
        let stride = self.stride();
        let cs = self.cs();
        let t = self.l2.get(&self.f, slot.l2, cs)?;
        let at = (slot.idx * stride) as usize;
        t[at] = entry;
        let mut bytes = entry.to_be_bytes().to_vec();
        if stride == 2 {
            t[at + 1] = bitmap;
            bytes.extend_from_slice(&bitmap.to_be_bytes());
        }
        self.f.write(&bytes, slot.l2 + slot.idx * stride * 8)
    }

    /// The slot of `vc`'s entry in an L2 table this image alone owns, allocating or copying the
    /// table as needed.
    pub(crate) fn writable_slot(&mut self, vc: u64) -> Result<Slot> {
        let n = self.hdr.l2_entries();
        let i = vc / n;
        let idx = vc % n;
        if i >= self.l1.len() as u64 {
            return Err(self.f.corrupt(format!(
                "guest cluster {vc} lies past the L1 table of {} entries",
                self.l1.len()
            )));
        }
        let e = self.l1[i as usize];
        let cs = self.cs();
        if let Some(off) = self.l2_offset(i)? {
            if e & COPIED != 0 {
                return Ok(Slot { l2: off, idx });
            }
            if self.rc.get(off / cs)? == 1 {
                self.set_l1(i, off | COPIED)?;
                return Ok(Slot { l2: off, idx });
            }
            // Shared with a snapshot: this image gets its own copy of the table.
            let table = self.l2.get(&self.f, off, cs)?.clone();
            let new = self.rc.alloc(1)?;
            self.f.write(&encode_table(&table), new)?;
            self.l2.insert(new, table);
            self.set_l1(i, new | COPIED)?;
            self.rc.adjust(off / cs, 1, -1, &[])?;
            return Ok(Slot { l2: new, idx });
        }
        let new = self.rc.alloc(1)?;
        self.f.write(&vec![0u8; cs as usize], new)?;
        self.l2.insert(new, vec![0u64; (cs / 8) as usize]);
        self.set_l1(i, new | COPIED)?;
        Ok(Slot { l2: new, idx })
    }

    pub(crate) fn set_l1(&mut self, i: u64, entry: u64) -> Result<()> {
        self.l1[i as usize] = entry;
        self.f
            .write(&entry.to_be_bytes(), self.hdr.l1_table_offset + i * 8)
    }

    /// Makes `[offset, offset+len)` read as zeroes.
    pub(crate) fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.mark_dirty()?;
        let cs = self.cs();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let in_c = pos % cs;
            let n = (cs - in_c).min(end - pos);
            let vc = pos / cs;
            let whole = n == cs || (in_c == 0 && pos + n == self.hdr.size);
            if whole && !may_unmap && self.hdr.version >= 3 && self.zero_in_place(vc)? {
                // The space stays allocated, as a caller that did not allow unmapping expects.
            } else if whole && self.can_zero_cluster() {
                self.zero_cluster(vc)?;
            } else {
                let (c, _) = self.lookup(vc)?;
                let reads_zero = matches!(c, Cluster::Zero { .. })
                    || (c == Cluster::Unallocated && self.backing.is_none());
                if !reads_zero {
                    self.write_cluster(&vec![0u8; n as usize], pos)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Turns an allocated cluster this image alone owns into a zero cluster that keeps its host
    /// cluster (v3); false when the cluster is not such a cluster.
    fn zero_in_place(&mut self, vc: u64) -> Result<bool> {
        let (c, _) = self.lookup(vc)?;
        let host = match c {
            Cluster::Normal {
                host, copied: true, ..
            } if host != 0 => host,
            Cluster::Zero { host, copied: true } if host != 0 => return Ok(true),
            _ => return Ok(false),
        };
        let slot = self.writable_slot(vc)?;
        if self.hdr.extended_l2() {
            self.set_entry(slot, host | COPIED, l2::SUB_ZERO_ALL)?;
        } else {
            self.set_entry(slot, host | COPIED | ZERO, 0)?;
        }
        Ok(true)
    }

    /// Zero clusters exist in v3; in v2 an unallocated cluster reads as zeroes only without a
    /// backing file.
    fn can_zero_cluster(&self) -> bool {
        self.hdr.version >= 3 || self.backing.is_none()
    }

    /// Turns guest cluster `vc` into a zero cluster, releasing its host cluster.
    fn zero_cluster(&mut self, vc: u64) -> Result<()> {
        let (c, slot) = self.lookup(vc)?;
        let no_backing = self.backing.is_none();
        match c {
            Cluster::Zero { host: 0, .. } => return Ok(()),
            Cluster::Unallocated if no_backing => return Ok(()),
            _ => {}
        }
        if slot.is_none() && no_backing {
            return Ok(());
        }
        let slot = self.writable_slot(vc)?;
        if self.hdr.version >= 3 {
            let (entry, bitmap) = if self.hdr.extended_l2() {
                (0, l2::SUB_ZERO_ALL)
            } else {
                (ZERO, 0)
            };
            self.set_entry(slot, entry, bitmap)?;
        } else {
            self.set_entry(slot, 0, 0)?;
        }
        self.release(c)
    }

    /// Releases whole clusters of `[offset, offset+len)`; partial clusters are left alone, as
    /// discard is advisory.
    pub(crate) fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.mark_dirty()?;
        let cs = self.cs();
        let first = offset.div_ceil(cs);
        let end = offset + len;
        let last = if end == self.hdr.size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        for vc in first..last {
            if self.backing.is_some() {
                // Exposing the backing file would change the data; make it read zeroes.
                if self.hdr.version >= 3 {
                    self.zero_cluster(vc)?;
                }
                continue;
            }
            let (c, slot) = self.lookup(vc)?;
            if c == Cluster::Unallocated || slot.is_none() {
                continue;
            }
            let slot = self.writable_slot(vc)?;
            self.set_entry(slot, 0, 0)?;
            self.release(c)?;
        }
        Ok(())
    }

    /// Writes one guest cluster compressed; falls back to a plain write when it does not shrink.
    /// Stores `buf` (one cluster, or the last partial one) as its compressed form `z`, or
    /// plainly when compression did not shrink it (`z` is `None`).
    pub(crate) fn write_compressed(
        &mut self,
        buf: &[u8],
        z: Option<Vec<u8>>,
        offset: u64,
    ) -> Result<()> {
        let cs = self.cs();
        if !offset.is_multiple_of(cs)
            || buf.len() as u64 > cs
            || offset + buf.len() as u64 > self.hdr.size
        {
            return Err(Error::InvalidArgument(format!(
                "compressed writes to '{}' must cover one aligned cluster of {cs} bytes",
                self.f.path.display()
            )));
        }
        self.check_writable()?;
        self.mark_dirty()?;
        let Some(z) = z else {
            return self.write(buf, offset);
        };
        let vc = offset / cs;
        let (old, _) = self.lookup(vc)?;
        let slot = self.writable_slot(vc)?;
        let len = z.len() as u64;
        let room = if self.comp_next.is_multiple_of(cs) {
            0
        } else {
            cs - self.comp_next % cs
        };
        let host = if self.comp_next != 0 && room >= len {
            self.rc.adjust(self.comp_next / cs, 1, 1, &[])?;
            self.comp_next
        } else if self.comp_next != 0 && room > 0 && self.rc.claim(self.comp_next / cs + 1)? {
            // Pack tightly, as QEMU does: the data runs on into the next cluster.
            self.rc.adjust(self.comp_next / cs, 1, 1, &[])?;
            self.comp_next
        } else {
            self.rc.alloc(1)?
        };
        self.f.write(&z, host)?;
        self.comp_next = host + len;
        let x = 62 - (self.hdr.cluster_bits - 8);
        let sectors = (host + len - 1) / 512 - host / 512;
        let entry = COMPRESSED | (sectors << x) | host;
        self.set_entry(slot, entry, 0)?;
        self.release(old)
    }

    /// Grows or shrinks the disk. Shrinking drops the clusters past the new end.
    pub(crate) fn resize(&mut self, size: u64) -> Result<()> {
        self.check_writable()?;
        if !self.snapshots.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "'{}' has internal snapshots; delete them before resizing",
                self.f.path.display()
            )));
        }
        self.mark_dirty()?;
        let cs = self.cs();
        let old = self.hdr.size;
        if size < old {
            let n = self.hdr.l2_entries();
            let first = size.div_ceil(cs);
            let last = old.div_ceil(cs);
            for vc in first..last {
                let (c, slot) = self.lookup(vc)?;
                if slot.is_some() && c != Cluster::Unallocated {
                    let slot = self.writable_slot(vc)?;
                    self.set_entry(slot, 0, 0)?;
                    self.release(c)?;
                }
            }
            // L2 tables wholly past the end go too.
            for i in first.div_ceil(n)..self.l1.len() as u64 {
                if let Some(off) = self.l2_offset(i)? {
                    self.set_l1(i, 0)?;
                    self.l2.remove(off);
                    self.rc.adjust(off / cs, 1, -1, &[])?;
                }
            }
            if !size.is_multiple_of(cs) {
                // The tail of the last cluster must read as zeroes if the disk grows again.
                let tail = old.min(size.next_multiple_of(cs)) - size;
                if tail > 0 {
                    self.write_zeroes(size, tail, false)?;
                }
            }
        } else {
            let need = self.hdr.l1_entries_for(size);
            if need > self.l1.len() as u64 {
                self.grow_l1(need)?;
            }
        }
        self.hdr.size = size;
        self.f.write(&size.to_be_bytes(), OFF_SIZE)
    }

    /// Moves the L1 table to a larger place.
    pub(crate) fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "'{}' cannot grow that large: its L1 table would exceed 32 MiB; use larger clusters",
                self.f.path.display()
            )));
        }
        let cs = self.cs();
        let clusters = (entries * 8).div_ceil(cs);
        let new = self.rc.alloc(clusters)?;
        let mut table = self.l1.clone();
        table.resize(entries as usize, 0);
        let mut bytes = encode_table(&table);
        bytes.resize((clusters * cs) as usize, 0);
        self.f.write(&bytes, new)?;
        let mut hdr = (entries as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&new.to_be_bytes());
        self.f.write(&hdr, OFF_L1)?;
        let (old_off, old_len) = (self.hdr.l1_table_offset, self.l1.len() as u64);
        self.hdr.l1_table_offset = new;
        self.hdr.l1_size = entries as u32;
        self.l1 = table;
        if old_off != 0 && old_len > 0 {
            self.rc
                .adjust(old_off / cs, (old_len * 8).div_ceil(cs), -1, &[])?;
        }
        Ok(())
    }

    /// The first extent of `[offset, offset+len)` with one allocation state.
    pub(crate) fn map_extent(&mut self, offset: u64, len: u64) -> Result<MapExtent> {
        let cs = self.cs();
        let end = offset + len;
        let first = self.map_piece(offset, end)?;
        let mut ext = first;
        while ext.start + ext.length < end {
            let next = self.map_piece(ext.start + ext.length, end)?;
            let contiguous = match (ext.offset, next.offset) {
                (Some(a), Some(b)) => a + ext.length == b,
                (None, None) => true,
                _ => false,
            };
            let same = next.depth == ext.depth
                && next.present == ext.present
                && next.zero == ext.zero
                && next.data == ext.data
                && next.compressed == ext.compressed
                && contiguous;
            if !same {
                break;
            }
            ext.length += next.length;
            // Bound the work per call on huge uniform ranges.
            if ext.length >= 1 << 30 && ext.length % cs == 0 {
                break;
            }
        }
        Ok(ext)
    }

    /// Allocation of the piece of `[pos, end)` inside one guest cluster (or subcluster).
    fn map_piece(&mut self, pos: u64, end: u64) -> Result<MapExtent> {
        let cs = self.cs();
        let vc = pos / cs;
        let in_c = pos % cs;
        let mut n = (cs - in_c).min(end - pos);
        let (c, _) = self.lookup(vc)?;
        let mut e = MapExtent {
            start: pos,
            length: n,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: None,
        };
        let state = match c {
            Cluster::Unallocated => None,
            Cluster::Zero { host: 0, .. } => Some((true, false, None)),
            // Preallocated zero clusters still point at their host cluster.
            Cluster::Zero { host, .. } => Some((true, false, Some(host + in_c))),
            Cluster::Compressed { .. } => {
                e.compressed = true;
                Some((false, true, None))
            }
            Cluster::Normal {
                host, alloc, zero, ..
            } => {
                if alloc == u32::MAX {
                    // Data clusters whose host range is a hole in the file (preallocated
                    // metadata) read as zeroes, and map says so, as qemu-img does.
                    let (hole, len) = if self.metadata_preallocated()? {
                        self.host_segment(host + in_c, n)?
                    } else {
                        (false, n)
                    };
                    n = len;
                    e.length = n;
                    Some((hole, true, Some(host + in_c)))
                } else {
                    let sub = cs / 32;
                    let s = (in_c / sub) as u32;
                    n = n.min(sub - in_c % sub);
                    e.length = n;
                    if alloc & (1 << s) != 0 {
                        Some((false, true, Some(host + in_c)))
                    } else if zero & (1 << s) != 0 {
                        Some((true, false, None))
                    } else {
                        None
                    }
                }
            }
        };
        match state {
            Some((zero, data, offset)) => {
                e.zero = zero;
                e.data = data;
                e.offset = offset;
                Ok(e)
            }
            None => {
                let mut e = self.map_backing(e)?;
                // Unallocated subclusters of a host cluster that no lower layer defines
                // still sit at their place in it, and qemu-img map reports that offset.
                if let (Cluster::Normal { host, .. }, false) = (c, e.present) {
                    if host != 0 && e.depth == 0 {
                        e.offset = Some(host + in_c);
                    }
                }
                Ok(e)
            }
        }
    }

    /// Whether the image looks created with `preallocation=metadata`: its last used cluster
    /// lies well past the space the file really occupies. Only then are holes in the file
    /// behind data clusters reported as zeroes, the same test qemu-img applies, so the two
    /// tools print the same map.
    fn metadata_preallocated(&mut self) -> Result<bool> {
        if let Some(v) = self.prealloc_detected {
            return Ok(v);
        }
        use std::os::unix::fs::MetadataExt;
        let cs = self.cs();
        let meta = self
            .f
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.f.path, e))?;
        let real = meta.blocks() * 512 / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let mut last = 0;
        for c in (0..meta.len().div_ceil(cs)).rev() {
            if self.rc.get(c)? > 0 {
                last = c;
                break;
            }
        }
        let v = last >= threshold;
        self.prealloc_detected = Some(v);
        Ok(v)
    }

    /// Whether the image file has a hole at `off`, and for how many of the next `len` bytes
    /// that stays so. The last SEEK_DATA / SEEK_HOLE answer is kept, so a sequential map
    /// costs a few seeks, not two per cluster.
    fn host_segment(&mut self, off: u64, len: u64) -> Result<(bool, u64)> {
        let seg = match self.host_seg {
            Some(seg) if off >= seg.0 && off < seg.1 => seg,
            _ => {
                let seg = self.f.segment(off)?;
                self.host_seg = Some(seg);
                seg
            }
        };
        Ok((seg.2, len.min(seg.1 - off)))
    }

    /// Fills in `e` from the backing chain (depth 1 and below).
    fn map_backing(&mut self, mut e: MapExtent) -> Result<MapExtent> {
        let bsize = self.backing.as_ref().map_or(0, |b| b.size());
        match &self.backing {
            Some(b) if e.start < bsize => {
                let len = e.length.min(bsize - e.start);
                let sub = b.map_extent(e.start, len)?;
                Ok(MapExtent {
                    depth: sub.depth + 1,
                    ..sub
                })
            }
            Some(_) => {
                // Past the backing file's end: zeroes, not defined by any level.
                e.depth = 1;
                e.present = false;
                e.zero = true;
                e.data = false;
                Ok(e)
            }
            None => {
                e.present = false;
                e.zero = true;
                e.data = false;
                Ok(e)
            }
        }
    }

    pub(crate) fn make_empty(&mut self) -> Result<()> {
        self.check_writable()?;
        self.mark_dirty()?;
        let cs = self.cs();
        let stride = self.stride();
        for i in 0..self.l1.len() as u64 {
            let Some(off) = self.l2_offset(i)? else {
                continue;
            };
            let t = self.l2.get(&self.f, off, cs)?.clone();
            self.set_l1(i, 0)?;
            self.l2.remove(off);
            self.rc.adjust(off / cs, 1, -1, &[])?;
            // Each L1 table holds its own reference on the data it reaches, even through a
            // table shared with a snapshot.
            for k in 0..t.len() as u64 / stride {
                let bm = (stride == 2).then(|| t[(k * stride + 1) as usize]);
                let c = l2::decode(t[(k * stride) as usize], bm, self.hdr.cluster_bits);
                self.release(c)?;
            }
        }
        self.comp_cache = None;
        self.comp_next = 0;
        Ok(())
    }

    /// Host clusters holding guest data in the active L1 tree.
    pub(crate) fn count_allocated(&mut self) -> Result<u64> {
        let n = self.hdr.l2_entries();
        let total = self.hdr.size.div_ceil(self.cs());
        let mut count = 0;
        for vc in 0..total {
            if vc % n == 0 && self.l2_offset(vc / n)?.is_none() {
                continue;
            }
            if matches!(
                self.lookup(vc)?.0,
                Cluster::Normal { host: 1.., .. } | Cluster::Compressed { .. }
            ) {
                count += 1;
            }
        }
        Ok(count)
    }
}
