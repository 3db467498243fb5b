//! `info`: what an image is, in qemu-img's layout and JSON field names.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rvirt_image::qcow2::{resolve_backing, SnapshotInfo};
use rvirt_image::{open_image, BlockDevice, Image, OpenOptions};
use serde::Serialize;

use crate::common::parse_format;
use crate::size::human;
use crate::{ImageArgs, Output};

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
    vm_clock_nsec: u64,
    name: String,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_sec: u64,
    id: String,
    vm_state_size: u64,
}

impl From<&SnapshotInfo> for SnapshotJson {
    fn from(s: &SnapshotInfo) -> Self {
        SnapshotJson {
            icount: s.icount,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            name: s.name.clone(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            id: s.id.clone(),
            vm_state_size: s.vm_state_size,
        }
    }
}

#[derive(Serialize)]
struct BitmapJson {
    flags: Vec<&'static str>,
    name: String,
    granularity: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Qcow2Specific {
    compat: String,
    compression_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps: Option<Vec<BitmapJson>>,
    refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

#[derive(Serialize)]
struct FormatSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: Qcow2Specific,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshots: Option<Vec<SnapshotJson>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<String>,
    virtual_size: u64,
    filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: String,
    actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    dirty_flag: bool,
    #[serde(skip)]
    snapshot_list: Vec<SnapshotInfo>,
}

/// Collects the information of one image (not its backing chain).
pub fn describe(path: &Path, img: &Image) -> Result<ImageInfo> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat '{}'", path.display()))?;
    let mut info = ImageInfo {
        snapshots: None,
        backing_filename_format: None,
        virtual_size: img.size(),
        filename: path.display().to_string(),
        cluster_size: None,
        format: img.format().to_string(),
        actual_size: meta.blocks() * 512,
        format_specific: None,
        full_backing_filename: None,
        backing_filename: None,
        dirty_flag: false,
        snapshot_list: Vec::new(),
    };
    if let Some(q) = img.as_qcow2() {
        let h = q.header();
        info.cluster_size = Some(h.cluster_size());
        let v3 = h.version >= 3;
        info.format_specific = Some(FormatSpecific {
            kind: "qcow2",
            data: Qcow2Specific {
                compat: if v3 { "1.1" } else { "0.10" }.into(),
                compression_type: h.compression.name().into(),
                lazy_refcounts: v3.then_some(h.compatible & 1 != 0),
                bitmaps: Some(
                    q.bitmaps()?
                        .into_iter()
                        .map(|b| BitmapJson {
                            flags: b.flags,
                            name: b.name,
                            granularity: b.granularity,
                        })
                        .collect::<Vec<_>>(),
                )
                .filter(|b| !b.is_empty()),
                refcount_bits: h.refcount_bits(),
                corrupt: v3.then_some(h.incompatible & 2 != 0),
                extended_l2: v3.then_some(h.extended_l2()),
            },
        });
        info.dirty_flag = h.incompatible & 1 != 0;
        if let Some(b) = &h.backing_file {
            info.backing_filename = Some(b.clone());
            info.full_backing_filename = Some(resolve_backing(path, b).display().to_string());
            info.backing_filename_format = h.backing_format.clone();
        }
        let snaps = q.snapshots();
        if !snaps.is_empty() {
            info.snapshots = Some(snaps.iter().map(SnapshotJson::from).collect());
        }
        info.snapshot_list = snaps;
    }
    Ok(info)
}

pub fn run(a: &ImageArgs, output: Output, chain: bool, path: &Path) -> Result<u8> {
    let mut infos = Vec::new();
    let mut next: Option<(PathBuf, Option<String>)> = Some((path.to_owned(), a.format.clone()));
    while let Some((p, fmt)) = next.take() {
        let opts = OpenOptions {
            read_only: true,
            force_share: a.force_share,
            no_backing: true,
            ..Default::default()
        };
        let img = open_image(&p, parse_format(fmt.as_deref())?, &opts)
            .with_context(|| format!("could not open '{}'", p.display()))?;
        let info = describe(&p, &img)?;
        if chain {
            if let Some(full) = &info.full_backing_filename {
                next = Some((PathBuf::from(full), info.backing_filename_format.clone()));
            }
        }
        infos.push(info);
        if infos.len() > 64 {
            anyhow::bail!(
                "backing chain of '{}' is deeper than 64 (a loop?)",
                path.display()
            );
        }
    }
    match output {
        Output::Json => {
            let s = if chain {
                crate::common::to_json(&infos)?
            } else {
                crate::common::to_json(&infos[0])?
            };
            println!("{s}");
        }
        Output::Human => {
            let texts: Vec<String> = infos.iter().map(human_info).collect();
            print!("{}", texts.join("\n"));
        }
    }
    Ok(0)
}

fn human_info(i: &ImageInfo) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        i.filename,
        i.format,
        human(i.virtual_size),
        i.virtual_size,
        human(i.actual_size)
    );
    if let Some(cs) = i.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &i.backing_filename {
        let full = i.full_backing_filename.as_deref().unwrap_or(b);
        if full != b {
            s += &format!("backing file: {b} (actual path: {full})\n");
        } else {
            s += &format!("backing file: {b}\n");
        }
        if let Some(f) = &i.backing_filename_format {
            s += &format!("backing file format: {f}\n");
        }
    }
    if i.dirty_flag {
        s += "cleanly shut down: no\n";
    }
    if !i.snapshot_list.is_empty() {
        s += "Snapshot list:\n";
        s += &crate::snapshot::table(&i.snapshot_list);
    }
    if let Some(fs) = &i.format_specific {
        let d = &fs.data;
        s += "Format specific information:\n";
        s += &format!("    compat: {}\n", d.compat);
        s += &format!("    compression type: {}\n", d.compression_type);
        if let Some(l) = d.lazy_refcounts {
            s += &format!("    lazy refcounts: {l}\n");
        }
        if let Some(bitmaps) = &d.bitmaps {
            s += "    bitmaps:\n";
            for (i, b) in bitmaps.iter().enumerate() {
                s += &format!("        [{i}]:\n            flags:\n");
                for (j, f) in b.flags.iter().enumerate() {
                    s += &format!("                [{j}]: {f}\n");
                }
                s += &format!(
                    "            name: {}\n            granularity: {}\n",
                    b.name, b.granularity
                );
            }
        }
        s += &format!("    refcount bits: {}\n", d.refcount_bits);
        if let Some(c) = d.corrupt {
            s += &format!("    corrupt: {c}\n");
        }
        if let Some(e) = d.extended_l2 {
            s += &format!("    extended l2: {e}\n");
        }
    }
    s
}
