//! Internal snapshots: the snapshot table, and create/apply/delete with refcount updates.
//!
//! A snapshot is a copy of the L1 table. Every L1 table that reaches an L2 table or a data
//! cluster holds one reference on it, so taking a snapshot raises the refcount of everything
//! the active L1 reaches and clears its COPIED flags; deleting one lowers them again.

use std::collections::BTreeMap;

use super::file::{decode_table, encode_table, ImgFile};
use super::header::{Header, OFF_SNAPSHOTS};
use super::l2::{self, Cluster, COPIED, L1_OFFSET_MASK};
use super::State;
use crate::{Error, Result};

/// Bytes of snapshot table we are willing to read (QEMU's limit).
const MAX_TABLE_BYTES: u64 = 64 << 20;
const MAX_EXTRA: u32 = 1024;

/// One entry of the snapshot table.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
    /// Extra data past the fields we know, kept verbatim.
    pub extra_rest: Vec<u8>,
}

/// A snapshot as `snapshot -l` and `info` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
    pub disk_size: Option<u64>,
}

impl Snapshot {
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            icount: self.icount,
            disk_size: self.disk_size,
        }
    }

    fn serialize(&self, out: &mut Vec<u8>) {
        let mut extra = Vec::new();
        extra.extend_from_slice(&self.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        if let Some(ic) = self.icount {
            extra.extend_from_slice(&ic.to_be_bytes());
            extra.extend_from_slice(&self.extra_rest);
        }
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(self.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        out.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (be32(b, at) as u64) << 32 | be32(b, at + 4) as u64
}

/// Reads the snapshot table the header points at.
pub(crate) fn load_table(f: &ImgFile, hdr: &Header) -> Result<Vec<Snapshot>> {
    let mut out = Vec::with_capacity(hdr.nb_snapshots.min(1024) as usize);
    let mut at = hdr.snapshots_offset;
    let start = at;
    for i in 0..hdr.nb_snapshots {
        if at - start > MAX_TABLE_BYTES {
            return Err(f.corrupt("snapshot table exceeds 64 MiB".into()));
        }
        let mut fixed = [0u8; 40];
        f.read_meta(&mut fixed, at, "snapshot table")?;
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(f.corrupt(format!(
                "snapshot {i} has {extra_len} bytes of extra data (more than {MAX_EXTRA})"
            )));
        }
        let mut var = vec![0u8; extra_len as usize + id_len + name_len];
        f.read_meta(&mut var, at + 40, "snapshot table")?;
        let (extra, names) = var.split_at(extra_len as usize);
        let l1_size = be32(&fixed, 8);
        let l1_table_offset = be64(&fixed, 0);
        if l1_size as u64 * 8 > super::header::MAX_L1_BYTES
            || !l1_table_offset.is_multiple_of(hdr.cluster_size())
        {
            return Err(f.corrupt(format!(
                "snapshot {i} has an invalid L1 table ({l1_size} entries at {l1_table_offset:#x})"
            )));
        }
        let mut vm_state_size = be32(&fixed, 32) as u64;
        let mut disk_size = None;
        let mut icount = None;
        if extra.len() >= 8 {
            vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            disk_size = Some(be64(extra, 8));
        }
        if extra.len() >= 24 {
            icount = Some(be64(extra, 16));
        }
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(&names[..id_len]).into_owned(),
            name: String::from_utf8_lossy(&names[id_len..]).into_owned(),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_rest: extra.get(24..).unwrap_or_default().to_vec(),
        });
        at = (at + 40 + var.len() as u64).next_multiple_of(8);
    }
    Ok(out)
}

impl State {
    /// Host clusters reached from an L1 table (L2 tables and data), with how often.
    pub(crate) fn tree_refs(&mut self, l1: &[u64]) -> Result<BTreeMap<u64, u64>> {
        let cs = self.cs();
        let stride = self.stride();
        let mut refs = BTreeMap::new();
        for &e in l1 {
            let off = e & L1_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(self
                    .f
                    .corrupt(format!("L2 table offset {off:#x} is unaligned")));
            }
            *refs.entry(off / cs).or_insert(0) += 1;
            let t = self.l2.get(&self.f, off, cs)?.clone();
            for k in 0..t.len() as u64 / stride {
                let bm = (stride == 2).then(|| t[(k * stride + 1) as usize]);
                let c = l2::decode(t[(k * stride) as usize], bm, self.hdr.cluster_bits);
                if let Some((host, len)) = c.host_range() {
                    for hc in host / cs..=(host + len.max(1) - 1) / cs {
                        *refs.entry(hc).or_insert(0) += 1;
                    }
                }
            }
        }
        Ok(refs)
    }

    /// Applies `sign` × the references of an L1 tree to the refcounts, in contiguous runs.
    fn adjust_tree(&mut self, l1: &[u64], sign: i64) -> Result<()> {
        let refs = self.tree_refs(l1)?;
        let mut by_count: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (c, n) in refs {
            by_count.entry(n).or_default().push(c);
        }
        for (n, clusters) in by_count {
            let mut i = 0;
            while i < clusters.len() {
                let mut j = i + 1;
                while j < clusters.len() && clusters[j] == clusters[j - 1] + 1 {
                    j += 1;
                }
                self.rc
                    .adjust(clusters[i], (j - i) as u64, sign * n as i64, &[])?;
                i = j;
            }
        }
        Ok(())
    }

    /// Sets each COPIED flag of the active tree to whether the refcount is 1.
    pub(crate) fn fix_copied_flags(&mut self) -> Result<u64> {
        let cs = self.cs();
        let stride = self.stride();
        let mut fixed = 0;
        for i in 0..self.l1.len() as u64 {
            let Some(off) = self.l2_offset(i)? else {
                continue;
            };
            let e = self.l1[i as usize];
            let single = self.rc.get(off / cs)? == 1;
            if single != (e & COPIED != 0) {
                self.set_l1(i, if single { e | COPIED } else { e & !COPIED })?;
                fixed += 1;
            }
            if !single {
                // A shared table's entries also belong to snapshots; they are not ours to edit.
                continue;
            }
            let mut t = self.l2.get(&self.f, off, cs)?.clone();
            let mut changed = false;
            for k in 0..t.len() as u64 / stride {
                let at = (k * stride) as usize;
                let bm = (stride == 2).then(|| t[at + 1]);
                let c = l2::decode(t[at], bm, self.hdr.cluster_bits);
                let host = match c {
                    Cluster::Normal { host, .. } | Cluster::Zero { host, .. } if host != 0 => host,
                    _ => continue,
                };
                let single = self.rc.get(host / cs)? == 1;
                if single != (t[at] & COPIED != 0) {
                    t[at] = if single {
                        t[at] | COPIED
                    } else {
                        t[at] & !COPIED
                    };
                    changed = true;
                    fixed += 1;
                }
            }
            if changed {
                self.f.write(&encode_table(&t), off)?;
                self.l2.insert(off, t);
            }
        }
        Ok(fixed)
    }

    /// Clears every COPIED flag of the active tree (everything is now shared).
    fn clear_copied_flags(&mut self) -> Result<()> {
        let cs = self.cs();
        for i in 0..self.l1.len() as u64 {
            let Some(off) = self.l2_offset(i)? else {
                continue;
            };
            let mut t = self.l2.get(&self.f, off, cs)?.clone();
            let stride = self.stride() as usize;
            let mut changed = false;
            for k in (0..t.len()).step_by(stride) {
                if t[k] & COPIED != 0 {
                    t[k] &= !COPIED;
                    changed = true;
                }
            }
            if changed {
                self.f.write(&encode_table(&t), off)?;
                self.l2.insert(off, t);
            }
            let e = self.l1[i as usize];
            if e & COPIED != 0 {
                self.set_l1(i, e & !COPIED)?;
            }
        }
        Ok(())
    }

    fn find_snapshot(&self, name: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == name || s.name == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "'{}' has no snapshot named '{name}'; list them with 'rvirt-img snapshot -l'",
                    self.f.path.display()
                ))
            })
    }

    /// Writes the snapshot table to new clusters, publishes it in the header and frees the old.
    fn write_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<()> {
        let cs = self.cs();
        let mut bytes = Vec::new();
        for s in &snaps {
            s.serialize(&mut bytes);
        }
        let new = if bytes.is_empty() {
            0
        } else {
            let n = (bytes.len() as u64).div_ceil(cs);
            let off = self.rc.alloc(n)?;
            bytes.resize((n * cs) as usize, 0);
            self.f.write(&bytes, off)?;
            off
        };
        let mut hdr = (snaps.len() as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&new.to_be_bytes());
        self.f.write(&hdr, OFF_SNAPSHOTS)?;
        let old = self.hdr.snapshots_offset;
        let old_len = self.snapshot_table_len();
        self.hdr.snapshots_offset = new;
        self.hdr.nb_snapshots = snaps.len() as u32;
        self.snapshots = snaps;
        if old != 0 && old_len > 0 {
            self.rc.adjust(old / cs, old_len.div_ceil(cs), -1, &[])?;
        }
        Ok(())
    }

    /// Bytes the current snapshot table occupies.
    pub(crate) fn snapshot_table_len(&self) -> u64 {
        let mut bytes = Vec::new();
        for s in &self.snapshots {
            s.serialize(&mut bytes);
        }
        bytes.len() as u64
    }

    pub(crate) fn snapshot_create(&mut self, name: &str) -> Result<()> {
        self.check_writable()?;
        if name.is_empty() || name.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::InvalidArgument(format!(
                "'{}' already has a snapshot named '{name}'",
                self.f.path.display()
            )));
        }
        if self.rc.max_refcount() < 2 {
            return Err(Error::Unsupported {
                path: self.f.path.clone(),
                what: "internal snapshots with refcount_bits=1 (a shared cluster needs a refcount of 2); convert the image with -o refcount_bits=16 first".into(),
            });
        }
        let cs = self.cs();
        let l1 = self.l1.clone();
        self.adjust_tree(&l1, 1)?;
        self.clear_copied_flags()?;
        let snap_l1: Vec<u64> = self.l1.iter().map(|e| e & !COPIED).collect();
        let clusters = ((snap_l1.len() as u64) * 8).div_ceil(cs).max(1);
        let l1_off = self.rc.alloc(clusters)?;
        let mut bytes = encode_table(&snap_l1);
        bytes.resize((clusters * cs) as usize, 0);
        self.f.write(&bytes, l1_off)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let next_id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let mut snaps = self.snapshots.clone();
        snaps.push(Snapshot {
            l1_table_offset: l1_off,
            l1_size: snap_l1.len() as u32,
            id: next_id.to_string(),
            name: name.to_owned(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.hdr.size),
            icount: None,
            extra_rest: Vec::new(),
        });
        self.write_snapshot_table(snaps)?;
        self.f.sync()
    }

    fn read_snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; s.l1_size as usize * 8];
        self.f
            .read_meta(&mut buf, s.l1_table_offset, "snapshot L1 table")?;
        Ok(decode_table(&buf))
    }

    pub(crate) fn snapshot_apply(&mut self, name: &str) -> Result<()> {
        self.check_writable()?;
        let i = self.find_snapshot(name)?;
        let s = self.snapshots[i].clone();
        let snap_l1 = self.read_snapshot_l1(&s)?;
        let size = s.disk_size.unwrap_or(self.hdr.size);
        let need = self.hdr.l1_entries_for(size).max(snap_l1.len() as u64);
        if need > self.l1.len() as u64 {
            self.grow_l1(need)?;
        }
        self.adjust_tree(&snap_l1, 1)?;
        let old = self.l1.clone();
        let mut new = snap_l1.clone();
        new.resize(self.l1.len(), 0);
        self.f
            .write(&encode_table(&new), self.hdr.l1_table_offset)?;
        self.l1 = new;
        self.l2.clear();
        self.comp_cache = None;
        self.adjust_tree(&old, -1)?;
        if size != self.hdr.size {
            self.hdr.size = size;
            self.f.write(&size.to_be_bytes(), super::header::OFF_SIZE)?;
        }
        self.fix_copied_flags()?;
        self.f.sync()
    }

    pub(crate) fn snapshot_delete(&mut self, name: &str) -> Result<()> {
        self.check_writable()?;
        let i = self.find_snapshot(name)?;
        let s = self.snapshots[i].clone();
        let snap_l1 = self.read_snapshot_l1(&s)?;
        let mut snaps = self.snapshots.clone();
        snaps.remove(i);
        self.write_snapshot_table(snaps)?;
        self.adjust_tree(&snap_l1, -1)?;
        let cs = self.cs();
        let clusters = (s.l1_size as u64 * 8).div_ceil(cs).max(1);
        self.rc.adjust(s.l1_table_offset / cs, clusters, -1, &[])?;
        self.l2.clear();
        self.fix_copied_flags()?;
        self.f.sync()
    }

    /// L1 tables of all snapshots (for check).
    pub(crate) fn snapshot_l1s(&self) -> Result<Vec<(u64, Vec<u64>)>> {
        self.snapshots
            .iter()
            .map(|s| Ok((s.l1_table_offset, self.read_snapshot_l1(s)?)))
            .collect()
    }
}
