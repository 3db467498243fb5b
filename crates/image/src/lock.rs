//! Image locking with open-file-description (OFD) byte-range locks, laid out as QEMU does so a
//! running QEMU, qemu-img and rvirt see each other's locks.
//!
//! Byte `100 + p` is read-locked while we hold permission `p`, byte `200 + p` while we refuse to
//! share it. Before taking a permission we test that nobody refuses to share it, and before
//! refusing one that nobody holds it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;
/// Re-tests of a conflicting lock, 10 ms apart, before giving up.
const RETRIES: u32 = 20;

/// How an image is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// No lock (qemu-img's `-U`/force-share).
    None,
    /// Readers share the image with other readers but refuse a writer.
    Shared,
    /// A writer refuses other writers and readers that need a consistent view.
    Exclusive,
}

fn lock_bytes(mode: LockMode) -> (&'static [i64], &'static [i64]) {
    match mode {
        LockMode::None => (&[], &[]),
        LockMode::Shared => (&[PERM_CONSISTENT_READ], &[PERM_WRITE]),
        LockMode::Exclusive => (
            &[PERM_CONSISTENT_READ, PERM_WRITE],
            &[PERM_WRITE, PERM_RESIZE],
        ),
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_lock(file: &File, byte: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: the fd is open for the lifetime of `file` and `fl` is a valid flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether somebody else holds a lock on `byte`.
fn is_held(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: the fd is valid and `fl` is a valid, writable flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes the locks of `mode` on `file`; they last as long as the file stays open.
pub fn lock_image(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    let (perms, unshared) = lock_bytes(mode);
    for &p in perms {
        set_lock(file, PERM_BASE + p).map_err(|e| Error::io("lock", path, e))?;
    }
    for &p in unshared {
        set_lock(file, SHARED_BASE + p).map_err(|e| Error::io("lock", path, e))?;
    }
    let conflicts: Vec<i64> = perms
        .iter()
        .map(|p| SHARED_BASE + p)
        .chain(unshared.iter().map(|p| PERM_BASE + p))
        .collect();
    // A process that forks between our close and its exec briefly keeps our old open file
    // description, and its locks, alive: give such a transient holder a moment.
    for attempt in 0..=RETRIES {
        let mut held = None;
        for &byte in &conflicts {
            if is_held(file, byte).map_err(|e| Error::io("test lock", path, e))? {
                held = Some(byte);
                break;
            }
        }
        match held {
            None => return Ok(()),
            Some(byte) if attempt == RETRIES => {
                return Err(Error::Locked {
                    path: path.to_owned(),
                    holder: holder(file, byte),
                })
            }
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    Ok(())
}

/// Names the process holding `byte`, for the error message. OFD locks show no owner in
/// /proc/locks, so the open files' fdinfo of each process is searched instead.
fn holder(file: &File, byte: i64) -> String {
    let fallback = "another process".to_string();
    let Ok(meta) = file.metadata() else {
        return fallback;
    };
    let ino = meta.ino().to_string();
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return fallback;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if info
                .lines()
                .filter_map(|l| l.strip_prefix("lock:"))
                .any(|l| lock_line_matches(l, &ino, byte))
            {
                return format!("process {pid}");
            }
        }
    }
    fallback
}

/// Whether a lock line ("1: OFDLCK ADVISORY READ -1 fe:00:1234 100 100") covers `byte` of
/// inode `ino`.
fn lock_line_matches(line: &str, ino: &str, byte: i64) -> bool {
    let f: Vec<&str> = line.split_whitespace().collect();
    let Some(pos) = f.iter().position(|w| *w == "READ" || *w == "WRITE") else {
        return false;
    };
    let (Some(dev), Some(start), Some(end)) = (f.get(pos + 2), f.get(pos + 3), f.get(pos + 4))
    else {
        return false;
    };
    let in_range = start.parse::<i64>().is_ok_and(|s| s <= byte)
        && (*end == "EOF" || end.parse::<i64>().is_ok_and(|e| e >= byte));
    dev.rsplit(':').next() == Some(ino) && in_range
}
