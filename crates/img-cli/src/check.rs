//! `check`: metadata consistency, with qemu-img's output and exit codes (0 clean, 1 check
//! failed, 2 corruptions, 3 leaks only).

use std::path::Path;

use anyhow::{Context, Result};
use rvirt_image::qcow2::{CheckReport, RepairMode};
use rvirt_image::{open_image, OpenOptions};
use serde::Serialize;

use crate::common::parse_format;
use crate::{ImageArgs, Output};

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct CheckJson<'a> {
    image_end_offset: u64,
    total_clusters: u64,
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    filename: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    compressed_clusters: u64,
    format: &'a str,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub fn run(
    a: &ImageArgs,
    output: Output,
    repair: Option<&str>,
    quiet: bool,
    path: &Path,
) -> Result<u8> {
    let mode = match repair {
        Some("leaks") => RepairMode::Leaks,
        Some(_) => RepairMode::All,
        None => RepairMode::None,
    };
    let opts = OpenOptions {
        read_only: mode == RepairMode::None,
        force_share: a.force_share && mode == RepairMode::None,
        no_backing: true,
        repair: mode != RepairMode::None,
        direct: false,
    };
    let img = open_image(path, parse_format(a.format.as_deref())?, &opts)
        .with_context(|| format!("could not open '{}'", path.display()))?;
    let Some(q) = img.as_qcow2() else {
        eprintln!(
            "rvirt-img: '{}' is a {} image, which has no metadata to check",
            path.display(),
            img.format()
        );
        return Ok(63);
    };
    let r = q
        .check(mode)
        .with_context(|| format!("checking '{}' failed", path.display()))?;
    let code = if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    };
    match output {
        Output::Json => {
            let j = CheckJson {
                image_end_offset: r.image_end_offset,
                total_clusters: r.total_clusters,
                check_errors: r.check_errors,
                leaks: r.leaks,
                corruptions: r.corruptions,
                leaks_fixed: r.leaks_fixed,
                corruptions_fixed: r.corruptions_fixed,
                allocated_clusters: r.allocated_clusters,
                filename: &path.display().to_string(),
                fragmented_clusters: r.fragmented_clusters,
                compressed_clusters: r.compressed_clusters,
                format: "qcow2",
            };
            println!("{}", crate::common::to_json(&j)?);
        }
        Output::Human if !quiet => print!("{}", human(&r, mode)),
        Output::Human => {}
    }
    Ok(code)
}

fn human(r: &CheckReport, mode: RepairMode) -> String {
    let mut s = String::new();
    for m in &r.messages {
        eprintln!("{m}");
    }
    if mode != RepairMode::None && (r.leaks_fixed > 0 || r.corruptions_fixed > 0) {
        s += &format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            s += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            s += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    if r.image_end_offset > 0 {
        s += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    s
}
