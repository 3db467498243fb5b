//! Persistent dirty bitmaps (the bitmaps header extension), read only: listed by `info` and
//! counted by `check` so their clusters are not taken for leaks. rvirt does not update
//! bitmaps; opening an image for writing clears the autoclear bit, which marks them stale for
//! QEMU, as the specification asks of such writers.

use super::file::{decode_table, ImgFile};
use super::header::Header;
use crate::Result;

pub const EXT_BITMAPS: u32 = 0x2385_2875;
const AUTOCLEAR_BITMAPS: u64 = 1;
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY: u64 = 64 << 20;
const MAX_TABLE_ENTRIES: u32 = 1 << 20;

/// One persistent bitmap, as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Flag names: "in-use", "auto".
    pub flags: Vec<&'static str>,
    pub(crate) table_offset: u64,
    pub(crate) table_size: u32,
}

/// Where the bitmap directory is, when the extension is present and valid.
fn directory(hdr: &Header) -> Option<(u32, u64, u64)> {
    if hdr.autoclear & AUTOCLEAR_BITMAPS == 0 {
        return None;
    }
    let (_, d) = hdr.extensions.iter().find(|(k, _)| *k == EXT_BITMAPS)?;
    if d.len() < 24 {
        return None;
    }
    let nb = u32::from_be_bytes(d[0..4].try_into().ok()?);
    let size = u64::from_be_bytes(d[8..16].try_into().ok()?);
    let off = u64::from_be_bytes(d[16..24].try_into().ok()?);
    Some((nb, size, off))
}

/// The bitmap directory's host range, if any.
pub fn directory_range(hdr: &Header) -> Option<(u64, u64)> {
    directory(hdr).map(|(_, size, off)| (off, size))
}

/// Reads the bitmap directory.
pub fn load(f: &ImgFile, hdr: &Header) -> Result<Vec<BitmapInfo>> {
    let Some((nb, size, off)) = directory(hdr) else {
        return Ok(Vec::new());
    };
    if nb > MAX_BITMAPS || size > MAX_DIRECTORY {
        return Err(f.corrupt(format!(
            "bitmap directory of {nb} bitmaps / {size} bytes is too large"
        )));
    }
    let mut dir = vec![0u8; size as usize];
    f.read_meta(&mut dir, off, "bitmap directory")?;
    let mut out = Vec::new();
    let mut at = 0usize;
    for i in 0..nb {
        let bad = || f.corrupt(format!("bitmap directory entry {i} is truncated"));
        let e = dir.get(at..at + 24).ok_or_else(bad)?;
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let table_offset = u64::from_be_bytes(e[0..8].try_into().map_err(|_| bad())?);
        let table_size = be32(&e[8..12]);
        let flags = be32(&e[12..16]);
        let granularity_bits = e[17];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = be32(&e[20..24]) as usize;
        let name_at = at + 24 + extra;
        let name = dir.get(name_at..name_at + name_size).ok_or_else(bad)?;
        if table_size > MAX_TABLE_ENTRIES || !(9..=31).contains(&granularity_bits) {
            return Err(f.corrupt(format!("bitmap {i} has an invalid table or granularity")));
        }
        let mut names = Vec::new();
        if flags & 1 != 0 {
            names.push("in-use");
        }
        if flags & 2 != 0 {
            names.push("auto");
        }
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(name).into_owned(),
            granularity: 1 << granularity_bits,
            flags: names,
            table_offset,
            table_size,
        });
        at = (name_at + name_size).next_multiple_of(8);
    }
    Ok(out)
}

/// Host ranges the bitmaps occupy: each bitmap table and each data cluster it points at.
pub fn ranges(f: &ImgFile, bitmaps: &[BitmapInfo], cs: u64) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for b in bitmaps {
        if b.table_size == 0 {
            continue;
        }
        let mut buf = vec![0u8; b.table_size as usize * 8];
        f.read_meta(&mut buf, b.table_offset, "bitmap table")?;
        out.push((b.table_offset, buf.len() as u64));
        for e in decode_table(&buf) {
            let off = e & 0x00ff_ffff_ffff_fe00;
            if off != 0 {
                out.push((off, cs));
            }
        }
    }
    Ok(out)
}
