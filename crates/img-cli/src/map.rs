//! `map` (allocation map) and `measure` (file size needed), with qemu-img's JSON.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rvirt_image::qcow2::{resolve_backing, CreateOptions};
use rvirt_image::{BlockDevice, Format, Image, MapExtent};
use serde::Serialize;

use crate::common::{apply_create_options, open, split_options};
use crate::size::parse_size;
use crate::{ImageArgs, Output};

/// File names of the chain, top first (for the "File" column).
fn chain_names(img: &Image, top: &Path) -> Vec<String> {
    let mut names = vec![top.display().to_string()];
    let mut path = top.to_owned();
    let mut cur = img.as_qcow2().map(|q| q.header());
    while let Some(h) = cur.take() {
        let Some(b) = h.backing_file else { break };
        path = resolve_backing(&path, &b);
        names.push(path.display().to_string());
        if names.len() > 64 {
            break;
        }
        cur = std::fs::read(&path).ok().and_then(|d| {
            rvirt_image::qcow2::header::Header::parse(&d[..d.len().min(2 << 20)], &path).ok()
        });
    }
    names
}

/// The whole map, with neighbouring extents of one kind merged as qemu-img does.
pub fn extents(img: &Image) -> Result<Vec<MapExtent>> {
    let size = img.size();
    let mut out: Vec<MapExtent> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = img.map_extent(pos, size - pos)?;
        pos += e.length.max(1);
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.length == b,
                (None, None) => true,
                _ => false,
            };
            if contiguous
                && last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && last.compressed == e.compressed
            {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

pub fn map(a: &ImageArgs, output: Output, path: &Path) -> Result<u8> {
    let img = open(path, a.format.as_deref(), true, a.force_share)?;
    let ext = extents(&img)?;
    match output {
        Output::Json => {
            let lines: Vec<String> = ext
                .iter()
                .map(|e| {
                    let mut s = format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
                        e.start, e.length, e.depth, e.present, e.zero, e.data
                    );
                    if let Some(o) = e.offset {
                        s += &format!(", \"offset\": {o}");
                    }
                    s + "}"
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        Output::Human => {
            let names = chain_names(&img, path);
            let hex = |v: u64| {
                if v == 0 {
                    "0".to_string()
                } else {
                    format!("{v:#x}")
                }
            };
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in ext.iter().filter(|e| e.data) {
                if let Some(o) = e.offset {
                    let file = names.get(e.depth as usize).cloned().unwrap_or_default();
                    println!(
                        "{:<16}{:<16}{:<16}{file}",
                        hex(e.start),
                        hex(e.length),
                        hex(o)
                    );
                }
            }
        }
    }
    Ok(0)
}

pub struct MeasureArgs {
    pub output: Output,
    pub out_format: String,
    pub options: Vec<String>,
    pub size: Option<String>,
    pub format: Option<String>,
    pub force_share: bool,
    pub filename: Option<PathBuf>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct MeasureJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps: Option<u64>,
    required: u64,
    fully_allocated: u64,
}

/// Refcount table and block bytes for `clusters` clusters, growing until they cover
/// themselves.
fn refcount_metadata(clusters: u64, cs: u64, order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = (cs * 8) >> order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// Bytes a qcow2 file with every cluster of a `size`-byte disk allocated needs.
pub fn qcow2_full_size(size: u64, o: &CreateOptions) -> u64 {
    let cs = o.cluster_size;
    let l2e = if o.extended_l2 { 16 } else { 8 };
    let aligned = size.next_multiple_of(cs);
    let mut meta = cs;
    let nl2e = (aligned / cs).next_multiple_of(cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata((meta + aligned) / cs, cs, o.refcount_bits.trailing_zeros());
    meta + aligned
}

/// Space the source's persistent bitmaps take in an output with `cs`-byte clusters: each
/// bitmap fully allocated, its table, and the directory.
fn bitmaps_bytes(list: &[rvirt_image::qcow2::bitmaps::BitmapInfo], size: u64, cs: u64) -> u64 {
    let mut total = 0;
    let mut dir = 0;
    for b in list {
        let bits = size.div_ceil(b.granularity);
        let clusters = bits.div_ceil(8).div_ceil(cs);
        total += clusters * cs + (clusters * 8).next_multiple_of(cs);
        dir += (24 + b.name.len() as u64).next_multiple_of(8);
    }
    total + dir.next_multiple_of(cs)
}

pub fn measure(a: MeasureArgs) -> Result<u8> {
    let out_format: Format = a.out_format.parse()?;
    let mut o = CreateOptions::default();
    apply_create_options(&mut o, out_format, &split_options(&a.options))?;
    let mut bitmaps_size = 0;
    let (virtual_size, data, bitmaps) = match (&a.size, &a.filename) {
        (Some(_), Some(_)) => bail!("give either --size or an image to measure, not both"),
        (None, None) => bail!("give --size or an image to measure"),
        (Some(s), None) => (parse_size(s)?, 0, false),
        (None, Some(p)) => {
            let img = open(p, a.format.as_deref(), true, a.force_share)?;
            let cs = o.cluster_size;
            let size = img.size();
            let mut required = 0;
            let mut pos = 0;
            while pos < size {
                let e = img.map_extent(pos, size - pos)?;
                let mut n = e.length.max(1);
                // Ranges that read as zeroes need no data clusters.
                if e.data && !e.zero {
                    n = (pos + n).next_multiple_of(cs) - pos;
                    required += pos % cs + n;
                }
                pos += n;
            }
            let v3 = o.version >= 3 && out_format == Format::Qcow2;
            if let Some(q) = img.as_qcow2() {
                bitmaps_size = bitmaps_bytes(&q.bitmaps()?, size, cs);
            }
            (
                size.next_multiple_of(cs),
                required,
                v3 && img.as_qcow2().is_some_and(|q| q.header().version >= 3),
            )
        }
    };
    let (required, full) = match out_format {
        Format::Raw => (virtual_size, virtual_size),
        Format::Qcow2 => {
            let full = qcow2_full_size(virtual_size, &o);
            (full - virtual_size + data, full)
        }
    };
    let j = MeasureJson {
        bitmaps: bitmaps.then_some(bitmaps_size),
        required,
        fully_allocated: full,
    };
    match a.output {
        Output::Json => println!("{}", crate::common::to_json(&j)?),
        Output::Human => {
            println!("required size: {required}\nfully allocated size: {full}");
            if bitmaps {
                println!("bitmaps size: {bitmaps_size}");
            }
        }
    }
    Ok(0)
}
