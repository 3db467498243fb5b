//! O_DIRECT I/O for `cache=none` / `directsync` ([`crate::OpenOptions::direct`]).
//!
//! O_DIRECT needs the file offset, the length and the memory buffer aligned to the device's
//! logical block size; callers (virtio-blk requests into guest memory, qcow2 metadata in
//! `Vec`s) provide none of that. So each request is split: the block-aligned middle goes
//! through a second descriptor opened with O_DIRECT, via an aligned bounce buffer; the
//! unaligned head and tail (a sub-block guest write, a qcow2 header field) go through the
//! normal descriptor and the page cache. The kernel keeps the two coherent (direct I/O writes
//! back and invalidates cached pages in its range), and a flush (`fdatasync` on the inode)
//! covers both. [`ALIGN`] is 4 KiB, which satisfies 512-byte and 4 KiB devices alike.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::{Error, Result};

/// Offset, length and memory alignment of the O_DIRECT part of a request.
pub const ALIGN: usize = 4096;
/// Largest bounce buffer (longer requests are done in pieces).
const MAX_BOUNCE: usize = 1 << 20;

/// The O_DIRECT descriptor of an image file.
#[derive(Debug)]
pub struct Direct {
    file: File,
}

impl Direct {
    /// Opens `path` a second time with O_DIRECT. A file system without O_DIRECT (tmpfs) is an
    /// [`Error::InvalidArgument`] that says which cache modes work instead.
    pub fn open(path: &Path, writable: bool) -> Result<Direct> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map(|file| Direct { file })
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    Error::InvalidArgument(format!(
                        "{}: the file system does not support O_DIRECT (cache=none or \
                         cache=directsync); use cache=writeback or cache=writethrough",
                        path.display()
                    ))
                } else {
                    Error::io("open with O_DIRECT", path, e)
                }
            })
    }
}

/// Splits `[offset, offset + len)` into (head, body) lengths: the body is the block-aligned
/// middle (possibly empty), the tail is what remains.
fn split(offset: u64, len: usize) -> (usize, usize) {
    let a = ALIGN as u64;
    let end = offset + len as u64;
    let body_start = offset.next_multiple_of(a).min(end);
    let body_end = (end / a * a).max(body_start);
    (
        (body_start - offset) as usize,
        (body_end - body_start) as usize,
    )
}

/// A zeroed buffer of `len` bytes whose start is [`ALIGN`]ed: (storage, start index).
fn bounce(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + ALIGN];
    let start = v.as_ptr().align_offset(ALIGN);
    (v, start)
}

/// Reads from `offset` until `buf` is full or the file ends; returns the bytes read.
fn read_buffered(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn read_direct(d: &Direct, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = (buf.len() - done).min(MAX_BOUNCE);
        let (mut v, s) = bounce(n);
        let got = match d.file.read_at(&mut v[s..s + n], offset + done as u64) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        buf[done..done + got].copy_from_slice(&v[s..s + got]);
        done += got;
        // A short (or unaligned) direct read is the end of the file: the next offset would not
        // be aligned anyway.
        if got == 0 || got % ALIGN != 0 {
            break;
        }
    }
    Ok(done)
}

/// Reads from `offset` until `buf` is full or the file ends (returns the bytes read), the
/// aligned middle with O_DIRECT when `direct` is given.
pub fn read(
    direct: Option<&Direct>,
    file: &File,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<usize> {
    let Some(d) = direct else {
        return read_buffered(file, buf, offset);
    };
    let (head, body) = split(offset, buf.len());
    let n = read_buffered(file, &mut buf[..head], offset)?;
    if n < head {
        return Ok(n);
    }
    let n = read_direct(d, &mut buf[head..head + body], offset + head as u64)?;
    if n < body {
        return Ok(head + n);
    }
    let tail_off = offset + (head + body) as u64;
    Ok(head + body + read_buffered(file, &mut buf[head + body..], tail_off)?)
}

/// [`read`] that fails with `UnexpectedEof` when the file ends first.
pub fn read_exact(
    direct: Option<&Direct>,
    file: &File,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<()> {
    if read(direct, file, buf, offset)? < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "failed to fill whole buffer",
        ));
    }
    Ok(())
}

/// Writes all of `buf` at `offset`, the aligned middle with O_DIRECT when `direct` is given.
pub fn write_all(direct: Option<&Direct>, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let Some(d) = direct else {
        return file.write_all_at(buf, offset);
    };
    let (head, body) = split(offset, buf.len());
    file.write_all_at(&buf[..head], offset)?;
    let mut done = 0;
    while done < body {
        let n = (body - done).min(MAX_BOUNCE);
        let (mut v, s) = bounce(n);
        v[s..s + n].copy_from_slice(&buf[head + done..head + done + n]);
        d.file
            .write_all_at(&v[s..s + n], offset + (head + done) as u64)?;
        done += n;
    }
    file.write_all_at(&buf[head + body..], offset + (head + body) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_finds_the_aligned_middle() {
        assert_eq!(split(0, 8192), (0, 8192));
        assert_eq!(split(512, 8192), (3584, 4096));
        assert_eq!(split(100, 200), (200, 0));
        assert_eq!(split(4096, 100), (0, 0));
        assert_eq!(split(4000, 200), (96, 0));
        assert_eq!(split(0, 0), (0, 0));
    }

    #[test]
    fn bounce_buffers_are_aligned() {
        for len in [1, 4096, 10000] {
            let (v, s) = bounce(len);
            assert_eq!(v[s..].as_ptr() as usize % ALIGN, 0);
            assert!(v.len() - s >= len);
        }
    }

    #[test]
    fn unaligned_requests_read_back_through_both_paths() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(64 << 10).unwrap();
        let d = match Direct::open(f.path(), true) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let file = f.as_file();
        let data: Vec<u8> = (0..20000u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in [0u64, 1, 511, 4096, 5000, 40000] {
            write_all(Some(&d), file, &data, off).unwrap();
            let mut back = vec![0u8; data.len()];
            read_exact(Some(&d), file, &mut back, off).unwrap();
            assert_eq!(back, data, "offset {off}");
            // The buffered descriptor sees the same bytes.
            let mut plain = vec![0u8; data.len()];
            read_exact(None, file, &mut plain, off).unwrap();
            assert_eq!(plain, data, "offset {off}");
        }
        // Reads stop at the end of the file (64 KiB).
        let mut buf = vec![0u8; 8192];
        assert_eq!(
            read(Some(&d), file, &mut buf, (64 << 10) - 100).unwrap(),
            100
        );
        assert!(read_exact(Some(&d), file, &mut buf, (64 << 10) - 100).is_err());
    }
}
