//! `snapshot`: internal snapshots of qcow2 images.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rvirt_image::qcow2::SnapshotInfo;

use crate::common::open;
use crate::size::human;

#[derive(Args)]
#[group(required = true, multiple = false, id = "action")]
pub struct Action {
    /// List snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot.
    #[arg(short = 'c', value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Revert the disk to a snapshot.
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
}

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    action: Action,
    #[arg(short = 'f')]
    format: Option<String>,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(short = 'q')]
    quiet: bool,
    filename: PathBuf,
}

pub fn run(a: SnapshotArgs) -> Result<u8> {
    let read_only = a.action.list;
    let img = open(
        &a.filename,
        a.format.as_deref(),
        read_only,
        a.force_share && read_only,
    )?;
    let Some(q) = img.as_qcow2() else {
        bail!(
            "'{}' is a {} image, which has no internal snapshots; convert it to qcow2 first",
            a.filename.display(),
            img.format()
        );
    };
    let ctx = |what: &str| format!("could not {what} on '{}'", a.filename.display());
    if a.action.list {
        let snaps = q.snapshots();
        if !snaps.is_empty() {
            print!("Snapshot list:\n{}", table(&snaps));
        }
    } else if let Some(n) = &a.action.create {
        q.snapshot_create(n)
            .with_context(|| ctx("create snapshot"))?;
    } else if let Some(n) = &a.action.apply {
        q.snapshot_apply(n).with_context(|| ctx("apply snapshot"))?;
    } else if let Some(n) = &a.action.delete {
        q.snapshot_delete(n)
            .with_context(|| ctx("delete snapshot"))?;
    }
    Ok(0)
}

fn local_time(secs: u32) -> String {
    let t = secs as libc::time_t;
    // SAFETY: tm is a plain C struct; localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The snapshot table as `qemu-img snapshot -l` prints it.
pub fn table(snaps: &[SnapshotInfo]) -> String {
    let mut s = format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let ns = sn.vm_clock_nsec;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            ns / 3_600_000_000_000,
            ns / 60_000_000_000 % 60,
            ns / 1_000_000_000 % 60,
            ns / 1_000_000 % 1000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        s += &format!(
            "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n",
            sn.id,
            sn.name,
            human(sn.vm_state_size),
            local_time(sn.date_sec),
            clock,
            icount
        );
    }
    s
}
