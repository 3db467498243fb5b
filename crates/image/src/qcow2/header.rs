//! The qcow2 header and its extensions: parsing with bounds checks, and writing back with every
//! extension we do not interpret kept intact.

use std::path::Path;

use crate::{Error, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits: 32 MiB of L1 table, 8 MiB of refcount table, 64 Ki snapshots.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_BACKING_NAME: u32 = 1023;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
const SUPPORTED_INCOMPAT: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

/// Header offsets of fields updated in place with one small write.
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_L1: u64 = 36; // l1_size u32 + l1_table_offset u64
pub const OFF_REFTABLE: u64 = 48; // refcount_table_offset u64 + clusters u32
pub const OFF_SNAPSHOTS: u64 = 60; // nb_snapshots u32 + snapshots_offset u64
pub const OFF_SIZE: u64 = 24;

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A parsed qcow2 header (v2 or v3).
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: CompressionType,
    /// Additional header fields past byte 105 that we do not know, kept verbatim.
    pub extra_fields: Vec<u8>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Extensions other than the backing format, in file order, kept verbatim.
    pub extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn invalid(path: &Path, what: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        format: "qcow2",
        what: what.into(),
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Guest clusters one L2 table maps.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cluster_size() * self.l2_entries())
    }

    /// Parses the header from the image's first bytes (`buf` holds the first cluster, or the
    /// whole file if it is shorter).
    pub fn parse(buf: &[u8], path: &Path) -> Result<Header> {
        if buf.len() < 72 || buf[..4] != MAGIC {
            return Err(invalid(
                path,
                "no qcow2 magic or file shorter than a header",
            ));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                what: format!("qcow2 version {version} (only 2 and 3 exist)"),
            });
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(
                path,
                format!("cluster_bits {cluster_bits} outside 9..=21 (512 B to 2 MiB clusters)"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        if (buf.len() as u64) < cs.min(512) {
            return Err(invalid(path, "file is shorter than its first cluster"));
        }
        if be32(buf, 32) != 0 {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                what: format!("encryption (crypt_method {})", be32(buf, 32)),
            });
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: CompressionType::Zlib,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            extensions: Vec::new(),
        };
        if version == 3 {
            h.parse_v3_fields(buf, path)?;
        }
        h.parse_extensions(buf, path)?;
        h.parse_backing_name(buf, path)?;
        h.validate(path)?;
        Ok(h)
    }

    fn parse_v3_fields(&mut self, buf: &[u8], path: &Path) -> Result<()> {
        if buf.len() < 104 {
            return Err(invalid(path, "version 3 header truncated"));
        }
        self.incompatible = be64(buf, 72);
        self.compatible = be64(buf, 80);
        self.autoclear = be64(buf, 88);
        self.refcount_order = be32(buf, 96);
        self.header_length = be32(buf, 100);
        let hl = self.header_length as u64;
        if hl < 104 || !hl.is_multiple_of(8) || hl > self.cluster_size() || hl as usize > buf.len()
        {
            return Err(invalid(
                path,
                format!("header_length {hl} must be a multiple of 8, at least 104 and within the first cluster"),
            ));
        }
        let ctype = if hl > 104 { buf[104] } else { 0 };
        if hl > 105 {
            self.extra_fields = buf[105..hl as usize].to_vec();
        }
        let has_bit = self.incompatible & INCOMPAT_COMPRESSION != 0;
        self.compression = match (ctype, has_bit) {
            (0, false) => CompressionType::Zlib,
            (1, true) => CompressionType::Zstd,
            (0, true) => {
                return Err(invalid(
                    path,
                    "compression type bit set but compression_type is 0",
                ))
            }
            (t, false) => {
                return Err(invalid(
                    path,
                    format!("compression_type {t} without the compression type bit"),
                ))
            }
            (t, true) => {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    what: format!("compression type {t}"),
                })
            }
        };
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8], path: &Path) -> Result<()> {
        let end = buf.len().min(self.cluster_size() as usize);
        let mut at = self.header_length as usize;
        while at + 8 <= end {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_end = at + 8 + len;
            if data_end > end {
                return Err(invalid(
                    path,
                    format!(
                        "header extension 0x{kind:08x} of {len} bytes runs past the first cluster"
                    ),
                ));
            }
            let data = buf[at + 8..data_end].to_vec();
            if kind == EXT_BACKING_FORMAT {
                self.backing_format = Some(String::from_utf8_lossy(&data).into_owned());
            } else {
                self.extensions.push((kind, data));
            }
            at = data_end.next_multiple_of(8);
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8], path: &Path) -> Result<()> {
        let off = be64(buf, 8);
        if off == 0 {
            return Ok(());
        }
        let len = be32(buf, 16);
        if len > MAX_BACKING_NAME {
            return Err(invalid(
                path,
                format!("backing file name of {len} bytes is longer than 1023"),
            ));
        }
        let end = off
            .checked_add(len as u64)
            .filter(|&e| e <= buf.len() as u64 && e <= self.cluster_size());
        let Some(end) = end else {
            return Err(invalid(
                path,
                "backing file name lies outside the first cluster",
            ));
        };
        let name = &buf[off as usize..end as usize];
        self.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let unknown = self.incompatible & !SUPPORTED_INCOMPAT;
        if unknown != 0 {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                what: format!("incompatible features {}", self.feature_names(unknown)),
            });
        }
        if self.refcount_order > 6 {
            return Err(invalid(
                path,
                format!("refcount_order {} exceeds 6", self.refcount_order),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(invalid(
                path,
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        let cs = self.cluster_size();
        let aligned = |o: u64| o.is_multiple_of(cs);
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(invalid(
                path,
                format!("L1 table of {} entries exceeds 32 MiB", self.l1_size),
            ));
        }
        if (self.l1_size as u64) < self.l1_entries_for(self.size) {
            return Err(invalid(
                path,
                format!(
                    "L1 table of {} entries is too small for a {}-byte disk",
                    self.l1_size, self.size
                ),
            ));
        }
        if !aligned(self.l1_table_offset) || (self.l1_size > 0 && self.l1_table_offset == 0) {
            return Err(invalid(
                path,
                format!(
                    "L1 table offset {:#x} is not cluster aligned",
                    self.l1_table_offset
                ),
            ));
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES || self.refcount_table_clusters == 0 {
            return Err(invalid(
                path,
                format!(
                    "refcount table of {} clusters is empty or exceeds 8 MiB",
                    self.refcount_table_clusters
                ),
            ));
        }
        if !aligned(self.refcount_table_offset) || self.refcount_table_offset == 0 {
            return Err(invalid(
                path,
                format!(
                    "refcount table offset {:#x} is not cluster aligned",
                    self.refcount_table_offset
                ),
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                path,
                format!("{} snapshots exceed the limit of 65536", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 && (!aligned(self.snapshots_offset) || self.snapshots_offset == 0)
        {
            return Err(invalid(
                path,
                format!(
                    "snapshot table offset {:#x} is not cluster aligned",
                    self.snapshots_offset
                ),
            ));
        }
        Ok(())
    }

    /// Names the bits of `mask` from the image's feature name table, e.g. "bit 5 (foo), bit 9".
    pub fn feature_names(&self, mask: u64) -> String {
        let table = self
            .extensions
            .iter()
            .find(|(k, _)| *k == EXT_FEATURE_TABLE);
        let mut out = Vec::new();
        for bit in 0..64 {
            if mask & (1 << bit) == 0 {
                continue;
            }
            let name = table.and_then(|(_, d)| {
                d.chunks_exact(48)
                    .find(|e| e[0] == 0 && e[1] as u32 == bit)
                    .map(|e| {
                        String::from_utf8_lossy(&e[2..])
                            .trim_end_matches('\0')
                            .to_string()
                    })
            });
            out.push(match name {
                Some(n) => format!("bit {bit} ({n})"),
                None => format!("bit {bit}"),
            });
        }
        out.join(", ")
    }

    /// Serialises the header, extensions and backing file name into the first cluster. The
    /// feature name table is only informative: it is left out when the cluster is too small.
    pub fn serialize(&self, path: &Path) -> Result<Vec<u8>> {
        match self.serialize_with(path, true) {
            Err(_) if self.extensions.iter().any(|(k, _)| *k == EXT_FEATURE_TABLE) => {
                self.serialize_with(path, false)
            }
            r => r,
        }
    }

    fn serialize_with(&self, path: &Path, feature_table: bool) -> Result<Vec<u8>> {
        let mut b = vec![0u8; 72];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            let hl = (105 + self.extra_fields.len()).next_multiple_of(8).max(112) as u32;
            b.extend_from_slice(&hl.to_be_bytes());
            b.push(match self.compression {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            });
            b.extend_from_slice(&self.extra_fields);
            b.resize(hl as usize, 0);
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        for (kind, data) in &self.extensions {
            if feature_table || *kind != EXT_FEATURE_TABLE {
                push_ext(&mut b, *kind, data);
            }
        }
        push_ext(&mut b, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::InvalidArgument(format!(
                    "backing file name '{name}' is longer than 1023 bytes"
                )));
            }
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::InvalidArgument(format!(
                "header of '{}' with its extensions and backing file name needs {} bytes, more than one {}-byte cluster",
                path.display(),
                b.len(),
                self.cluster_size()
            )));
        }
        Ok(b)
    }
}

/// The feature name table QEMU writes into new images, so other tools can name our bits.
pub fn default_feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut out = Vec::new();
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&e);
    }
    out
}
