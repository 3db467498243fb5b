//! Consistency check and repair (`qemu-img check [-r leaks|all]`).
//!
//! The check counts every reference to every host cluster (header, L1 tables, refcount
//! structures, snapshot table, L2 tables, data) and compares the counts with the refcounts on
//! disk, as QEMU does: a refcount above the reference count is a leak, one below it a
//! corruption, and a COPIED flag that disagrees with "refcount is 1" is a corruption too.

use super::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::l2::{self, Cluster, COPIED, L1_OFFSET_MASK};
use super::State;
use crate::Result;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    None,
    Leaks,
    All,
}

/// The result of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// One line per problem found, as qemu-img prints them.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Corruptions left after any repair.
    pub fn corruptions_after(&self) -> u64 {
        self.corruptions
    }
}

/// Counted references: one counter per host cluster of the file.
struct Refs {
    counts: Vec<u32>,
    cs: u64,
    report: CheckReport,
    /// References without the refcount structures themselves (for a rebuild).
    base: Vec<u32>,
    /// The refcount structures cannot be read as they are: only a rebuild repairs them.
    broken: bool,
}

impl Refs {
    fn add(&mut self, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset / self.cs;
        let last = (offset + len - 1) / self.cs;
        for c in first..=last {
            match self.counts.get_mut(c as usize) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    self.report.corruptions += 1;
                    self.report.messages.push(format!(
                        "ERROR {what} at offset {:#x} lies beyond the end of the file",
                        c * self.cs
                    ));
                    return;
                }
            }
        }
    }
}

impl State {
    /// Checks the image; repairs what `mode` allows, then checks again and reports the
    /// numbers of the second pass with the counts fixed.
    pub(crate) fn check(&mut self, mode: RepairMode) -> Result<CheckReport> {
        let (first, refs) = self.count_refs()?;
        if mode == RepairMode::None || (first.leaks == 0 && first.corruptions == 0) {
            if mode != RepairMode::None && !self.read_only {
                self.clear_repair_bits()?;
            }
            return Ok(first);
        }
        self.check_writable()?;
        if refs.broken && mode == RepairMode::All {
            self.rebuild_refcounts(&refs.base)?;
            self.fix_copied_flags()?;
            self.f.sync()?;
        } else if !refs.broken {
            self.repair(&refs.counts, mode)?;
        }
        let (mut second, _) = self.count_refs()?;
        second.leaks_fixed = first.leaks.saturating_sub(second.leaks);
        second.corruptions_fixed = first.corruptions.saturating_sub(second.corruptions);
        let mut messages = first.messages;
        messages.extend(second.messages);
        second.messages = messages;
        if second.corruptions == 0 && mode == RepairMode::All {
            self.clear_repair_bits()?;
        }
        Ok(second)
    }

    /// Writes a new refcount table and blocks past the end of the file from the counted
    /// references `base`, then points the header at them; the old structures are dropped.
    fn rebuild_refcounts(&mut self, base: &[u32]) -> Result<()> {
        let cs = self.cs();
        let epb = self.rc.epb();
        let order = self.hdr.refcount_order;
        let max = self.rc.max_refcount();
        let n = base.len() as u64;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let b = (n + blocks + table).div_ceil(epb);
            let t = (b * 8).div_ceil(cs);
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        if table * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(self
                .f
                .corrupt("a rebuilt refcount table would exceed 8 MiB".into()));
        }
        let blocks_start = n + table;
        let total = blocks_start + blocks;
        let mut entries = vec![0u64; (table * cs / 8) as usize];
        for bi in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            for i in 0..epb {
                let c = bi * epb + i;
                if c >= total {
                    break;
                }
                let v = if c < n {
                    (base[c as usize] as u64).min(max)
                } else {
                    1
                };
                if v > 0 {
                    super::refcount::set_entry(&mut block, i as usize, order, v);
                }
            }
            self.f.write(&block, (blocks_start + bi) * cs)?;
            entries[bi as usize] = (blocks_start + bi) * cs;
        }
        self.f.write(&super::file::encode_table(&entries), n * cs)?;
        self.f.sync()?;
        let mut hdr = (n * cs).to_be_bytes().to_vec();
        hdr.extend_from_slice(&(table as u32).to_be_bytes());
        self.f.write(&hdr, super::header::OFF_REFTABLE)?;
        self.rc = super::refcount::Refcounts::load(
            self.f.clone(),
            self.hdr.cluster_bits,
            order,
            n * cs,
            table as u32,
        )?;
        self.hdr.refcount_table_offset = n * cs;
        self.hdr.refcount_table_clusters = table as u32;
        Ok(())
    }

    fn clear_repair_bits(&mut self) -> Result<()> {
        let bits = INCOMPAT_CORRUPT | INCOMPAT_DIRTY;
        if self.hdr.incompatible & bits != 0 && !self.marked_dirty {
            self.hdr.incompatible &= !bits;
            self.f.sync()?;
            self.write_incompat()?;
        }
        Ok(())
    }

    /// Counts references and compares them with the refcounts.
    fn count_refs(&mut self) -> Result<(CheckReport, Refs)> {
        let cs = self.cs();
        let file_len = self.f.len()?;
        let mut refs = Refs {
            counts: vec![0; file_len.div_ceil(cs) as usize],
            cs,
            report: CheckReport {
                total_clusters: self.hdr.size.div_ceil(cs),
                ..Default::default()
            },
            base: Vec::new(),
            broken: false,
        };
        refs.add(0, cs, "header");
        refs.add(
            self.hdr.l1_table_offset,
            self.hdr.l1_size as u64 * 8,
            "L1 table",
        );
        if !self.snapshots.is_empty() {
            refs.add(
                self.hdr.snapshots_offset,
                self.snapshot_table_len(),
                "snapshot table",
            );
        }
        if let Some((off, len)) = super::bitmaps::directory_range(&self.hdr) {
            refs.add(off, len, "bitmap directory");
            let list = super::bitmaps::load(&self.f, &self.hdr)?;
            for (off, len) in super::bitmaps::ranges(&self.f, &list, cs)? {
                refs.add(off, len, "bitmap");
            }
        }
        for (off, l1) in self.snapshot_l1s()? {
            refs.add(off, l1.len() as u64 * 8, "snapshot L1 table");
            self.count_tree(&l1, &mut refs, false)?;
        }
        let l1 = self.l1.clone();
        self.count_tree(&l1, &mut refs, true)?;
        refs.base = refs.counts.clone();
        let before = refs.report.corruptions;
        refs.add(
            self.rc.table_offset,
            self.rc.table_clusters as u64 * cs,
            "refcount table",
        );
        for bi in 0..self.rc.table.len() as u64 {
            match self.rc.block_offset(bi) {
                Ok(Some(off)) => refs.add(off, cs, "refcount block"),
                Ok(None) => {}
                Err(e) => {
                    refs.report.corruptions += 1;
                    refs.report.messages.push(format!("ERROR {e}"));
                }
            }
        }
        refs.broken |= refs.report.corruptions > before;
        self.compare(&mut refs)?;
        self.check_copied(&mut refs)?;
        let report = std::mem::take(&mut refs.report);
        Ok((report, refs))
    }

    /// Adds the references of an L1 tree; for the active tree also the allocation statistics.
    fn count_tree(&mut self, l1: &[u64], refs: &mut Refs, active: bool) -> Result<()> {
        let cs = self.cs();
        let stride = self.stride();
        let file_len = refs.counts.len() as u64 * cs;
        for &e in l1 {
            let off = e & L1_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) || off >= file_len {
                refs.report.corruptions += 1;
                refs.report
                    .messages
                    .push(format!("ERROR L2 table offset {off:#x} is invalid"));
                continue;
            }
            refs.add(off, cs, "L2 table");
            // Fragmentation is counted within each L2 table, as QEMU counts it.
            let mut last_host: Option<u64> = None;
            let t = self.l2.get(&self.f, off, cs)?.clone();
            for k in 0..t.len() as u64 / stride {
                let bm = (stride == 2).then(|| t[(k * stride + 1) as usize]);
                let c = l2::decode(t[(k * stride) as usize], bm, self.hdr.cluster_bits);
                let range = c.host_range();
                if let Some((host, len)) = range {
                    if !matches!(c, Cluster::Compressed { .. }) && host % cs != 0 {
                        refs.report.corruptions += 1;
                        refs.report
                            .messages
                            .push(format!("ERROR data cluster offset {host:#x} is unaligned"));
                        continue;
                    }
                    let len = if matches!(c, Cluster::Compressed { .. }) {
                        len
                    } else {
                        cs
                    };
                    refs.add(host, len, "data cluster");
                }
                if !active {
                    continue;
                }
                match c {
                    Cluster::Normal { host, .. } | Cluster::Zero { host, .. } if host != 0 => {
                        refs.report.allocated_clusters += 1;
                        if last_host.is_some_and(|h| h + cs != host) {
                            refs.report.fragmented_clusters += 1;
                        }
                        last_host = Some(host);
                    }
                    Cluster::Compressed { .. } => {
                        // Compressed clusters count as fragmented by nature (as QEMU counts).
                        refs.report.allocated_clusters += 1;
                        refs.report.compressed_clusters += 1;
                        refs.report.fragmented_clusters += 1;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn compare(&mut self, refs: &mut Refs) -> Result<()> {
        let cs = self.cs();
        let mut highest = 0;
        for c in 0..refs.counts.len() as u64 {
            let have = match self.rc.get(c) {
                Ok(v) => v,
                Err(e) => {
                    if !refs.broken {
                        refs.report.corruptions += 1;
                        refs.report.messages.push(format!("ERROR {e}"));
                    }
                    refs.broken = true;
                    0
                }
            };
            let want = refs.counts[c as usize] as u64;
            if have > 0 {
                highest = c + 1;
            }
            if have > want {
                refs.report.leaks += 1;
                refs.report.messages.push(format!(
                    "Leaked cluster {c} refcount={have} reference={want}"
                ));
            } else if have < want {
                refs.report.corruptions += 1;
                refs.report.messages.push(format!(
                    "ERROR cluster {c} refcount={have} reference={want}"
                ));
            }
        }
        refs.report.image_end_offset = highest * cs;
        Ok(())
    }

    /// COPIED must be set exactly where the refcount is 1 in the active tree.
    fn check_copied(&mut self, refs: &mut Refs) -> Result<()> {
        let cs = self.cs();
        let stride = self.stride();
        let nclusters = refs.counts.len() as u64;
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let off = e & L1_OFFSET_MASK;
            if off == 0 || !off.is_multiple_of(cs) || off / cs >= nclusters {
                continue;
            }
            let Ok(rc) = self.rc.get(off / cs) else {
                continue;
            };
            if (rc == 1) != (e & COPIED != 0) {
                refs.report.corruptions += 1;
                refs.report.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
            }
            let t = self.l2.get(&self.f, off, cs)?.clone();
            for k in 0..t.len() as u64 / stride {
                let entry = t[(k * stride) as usize];
                let bm = (stride == 2).then(|| t[(k * stride + 1) as usize]);
                let host = match l2::decode(entry, bm, self.hdr.cluster_bits) {
                    Cluster::Normal { host, .. } | Cluster::Zero { host, .. } if host != 0 => host,
                    _ => continue,
                };
                if host % cs != 0 || host / cs >= nclusters {
                    continue;
                }
                let Ok(rc) = self.rc.get(host / cs) else {
                    continue;
                };
                if (rc == 1) != (entry & COPIED != 0) {
                    refs.report.corruptions += 1;
                    refs.report.messages.push(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                    ));
                }
            }
        }
        Ok(())
    }

    fn repair(&mut self, counts: &[u32], mode: RepairMode) -> Result<()> {
        // New refcount blocks must not land on clusters that are referenced but have a wrong
        // refcount of zero: allocate past the end of the file.
        self.rc.allocate_past(counts.len() as u64);
        for c in 0..counts.len() as u64 {
            let have = self.rc.get(c)?;
            let want = counts[c as usize] as u64;
            if have > want || (mode == RepairMode::All && have < want) {
                self.rc.set(c, want)?;
            }
        }
        if mode == RepairMode::All {
            self.fix_copied_flags()?;
        }
        self.f.sync()
    }
}
