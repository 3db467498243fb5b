//! Creating qcow2 images with qemu-img's options.

use std::path::Path;
use std::sync::Arc;

use super::file::{encode_table, ImgFile};
use super::header::{
    default_feature_table, CompressionType, Header, COMPAT_LAZY_REFCOUNTS, EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
};
use super::l2::{COPIED, SUB_ALLOC_ALL};
use super::refcount::{set_entry, Refcounts};
use crate::{Error, Preallocation, Result};

/// Options of a new qcow2 image (`qemu-img create -f qcow2 -o ...`).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub lazy_refcounts: bool,
    pub refcount_bits: u32,
    pub compression: CompressionType,
    pub extended_l2: bool,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            lazy_refcounts: false,
            refcount_bits: 16,
            compression: CompressionType::Zlib,
            extended_l2: false,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
        }
    }
}

fn bad(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

impl CreateOptions {
    fn validate(&self) -> Result<u32> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(bad(format!(
                "cluster size {cs} must be a power of two between 512 and 2M"
            )));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(bad(format!(
                "refcount_bits {} must be a power of two up to 64",
                self.refcount_bits
            )));
        }
        if self.version == 2 {
            if self.lazy_refcounts {
                return Err(bad("lazy_refcounts need compat=1.1".into()));
            }
            if self.refcount_bits != 16 {
                return Err(bad("refcount_bits other than 16 need compat=1.1".into()));
            }
            if self.compression != CompressionType::Zlib {
                return Err(bad("compression_type=zstd needs compat=1.1".into()));
            }
            if self.extended_l2 {
                return Err(bad("extended_l2 needs compat=1.1".into()));
            }
        } else if self.version != 3 {
            return Err(bad(format!("unknown qcow2 version {}", self.version)));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(bad(
                "extended_l2 needs a cluster size of at least 16K".into()
            ));
        }
        if self.backing_file.is_none() && self.backing_format.is_some() {
            return Err(bad("backing_fmt given without a backing file".into()));
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            return Err(bad(
                "preallocation is not supported together with a backing file".into(),
            ));
        }
        Ok(cs.trailing_zeros())
    }
}

/// Creates (or truncates) `path` as an empty qcow2 image.
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    let cluster_bits = o.validate()?;
    let cs = o.cluster_size;
    let order = o.refcount_bits.trailing_zeros();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    let f = ImgFile {
        file: Arc::new(file),
        path: path.to_owned(),
        direct: None,
    };
    let mut incompatible = 0;
    if o.compression == CompressionType::Zstd {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    if o.extended_l2 {
        incompatible |= INCOMPAT_EXTL2;
    }
    let mut hdr = Header {
        version: o.version,
        cluster_bits,
        size: o.size,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        compatible: if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order: order,
        header_length: 112,
        compression: o.compression,
        extra_fields: Vec::new(),
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_format.clone(),
        extensions: if o.version >= 3 {
            vec![(EXT_FEATURE_TABLE, default_feature_table())]
        } else {
            Vec::new()
        },
    };
    // Header, refcount table and first refcount block, each refcounted by that block.
    let head = hdr.serialize(path)?;
    let mut table = vec![0u64; (cs / 8) as usize];
    table[0] = 2 * cs;
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 {
        set_entry(&mut block, c, order, 1);
    }
    f.write(&block, 2 * cs)?;
    f.write(&encode_table(&table), cs)?;
    f.write(&head, 0)?;
    let mut rc = Refcounts::load(f.clone(), cluster_bits, order, cs, 1)?;
    let l1_entries = hdr.l1_entries_for(o.size);
    if l1_entries * 8 > super::header::MAX_L1_BYTES {
        return Err(bad(format!(
            "a {}-byte disk needs an L1 table over 32 MiB with {cs}-byte clusters; use larger clusters",
            o.size
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let l1_off = rc.alloc(l1_clusters)?;
    f.write(&vec![0u8; (l1_clusters * cs) as usize], l1_off)?;
    hdr.l1_size = l1_entries as u32;
    hdr.l1_table_offset = l1_off;
    hdr.refcount_table_offset = rc.table_offset;
    hdr.refcount_table_clusters = rc.table_clusters;
    f.write(&hdr.serialize(path)?, 0)?;
    if o.preallocation != Preallocation::Off {
        preallocate(&f, &hdr, &mut rc, o.preallocation)?;
    }
    f.sync()
}

/// Allocates every L2 table and data cluster (`preallocation=metadata|falloc|full`).
fn preallocate(f: &ImgFile, hdr: &Header, rc: &mut Refcounts, mode: Preallocation) -> Result<()> {
    let cs = hdr.cluster_size();
    let n = hdr.l2_entries();
    let total = hdr.size.div_ceil(cs);
    let stride = if hdr.extended_l2() { 2 } else { 1 };
    let mut l1 = vec![0u64; hdr.l1_size as usize];
    let mut vc = 0;
    let mut data_end = 0;
    while vc < total {
        let i = vc / n;
        let count = (total - vc).min(n);
        let l2_off = rc.alloc(1)?;
        let data = rc.alloc(count)?;
        data_end = data_end.max(data + count * cs);
        if mode != Preallocation::Metadata {
            crate::prealloc::preallocate(&f.file, &f.path, data, count * cs, mode)?;
        }
        let mut table = vec![0u64; (cs / 8) as usize];
        for k in 0..count {
            table[(k * stride) as usize] = (data + k * cs) | COPIED;
            if stride == 2 {
                table[(k * stride + 1) as usize] = SUB_ALLOC_ALL;
            }
        }
        f.write(&encode_table(&table), l2_off)?;
        l1[i as usize] = l2_off | COPIED;
        vc += count;
    }
    f.write(&encode_table(&l1), hdr.l1_table_offset)?;
    let file_end = f.len()?;
    if data_end > file_end {
        f.file
            .set_len(data_end)
            .map_err(|e| Error::io("extend", &f.path, e))?;
    }
    Ok(())
}
