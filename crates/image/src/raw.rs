//! Raw images: the file is the disk, byte for byte.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::os::unix::io::AsRawFd;

use crate::lock::lock_image;
use crate::{BlockDevice, BlockStatus, Error, Extent, OpenOptions, Result};

/// A raw image file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// The O_DIRECT descriptor (cache=none/directsync).
    direct: Option<crate::direct::Direct>,
}

impl RawFile {
    /// Opens `path` as a raw disk, without taking a lock.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let opts = OpenOptions {
            read_only,
            force_share: true,
            ..Default::default()
        };
        Self::open_with(path, &opts)
    }

    /// Opens `path` as a raw disk, locked as `opts` says.
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Self> {
        let read_only = opts.read_only;
        let io = |op, source| Error::io(op, path, source);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io("open", e))?;
        lock_image(&file, path, opts.lock_mode())?;
        let size = file.metadata().map_err(|e| io("stat", e))?.len();
        let direct = if opts.direct {
            Some(crate::direct::Direct::open(path, !read_only)?)
        } else {
            None
        };
        Ok(RawFile {
            file,
            path: path.to_owned(),
            size,
            read_only,
            direct,
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Creates (or truncates) `path` as a raw image of `size` bytes with `prealloc`.
    pub fn create(path: &Path, size: u64, prealloc: crate::Preallocation) -> Result<()> {
        let io = |op, source| Error::io(op, path, source);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("create", e))?;
        file.set_len(size).map_err(|e| io("truncate", e))?;
        crate::prealloc::preallocate(&file, path, 0, size, prealloc)
    }

    /// Changes the size of the image file.
    pub fn resize(&mut self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.file
            .set_len(size)
            .map_err(|e| self.io_err("truncate", e))?;
        self.size = size;
        Ok(())
    }

    /// Bytes the file occupies on disk.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        // SAFETY: lseek on a valid fd has no memory effects.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    }

    fn punch(&self, offset: u64, len: u64, mode: libc::c_int) -> bool {
        // SAFETY: fallocate on a valid fd with in-range values has no memory effects.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        r == 0
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.path.clone()));
        }
        Ok(())
    }
}

impl BlockDevice for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        crate::direct::read_exact(self.direct.as_ref(), &self.file, buf, offset)
            .map_err(|e| self.io_err("read", e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        crate::direct::write_all(self.direct.as_ref(), &self.file, buf, offset)
            .map_err(|e| self.io_err("write", e))
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_err("flush", e))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Discard is advisory: a file system without hole punching simply keeps the data.
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.punch(
            offset,
            len,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        );
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        if may_unmap && self.punch(offset, len, libc::FALLOC_FL_PUNCH_HOLE | keep) {
            return Ok(());
        }
        if self.punch(offset, len, libc::FALLOC_FL_ZERO_RANGE | keep) {
            return Ok(());
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check_range(offset, len)?;
        let end = offset + len;
        // SEEK_DATA/SEEK_HOLE tell holes from data; without them everything is data.
        let data = self.seek(offset, libc::SEEK_DATA);
        let (is_data, length) = match data {
            Some(d) if d > offset => (false, d.min(end) - offset),
            Some(_) => {
                let hole = self.seek(offset, libc::SEEK_HOLE).unwrap_or(end);
                (true, hole.clamp(offset + 1, end) - offset)
            }
            // ENXIO: no data after offset.
            None => (false, len),
        };
        let status = BlockStatus {
            data: is_data,
            zero: !is_data,
            offset: Some(offset),
            depth: 0,
        };
        Ok(Extent {
            start: offset,
            length,
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_back_writes_and_refuses_out_of_range() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 8192]).unwrap();
        let disk = RawFile::open(f.path(), false).unwrap();
        disk.write_at(b"rvirt", 4096).unwrap();
        let mut buf = [0u8; 5];
        disk.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"rvirt");
        assert!(matches!(
            disk.read_at(&mut buf, 8190),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_at(&buf, u64::MAX),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn read_only_refuses_writes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(512).unwrap();
        let disk = RawFile::open(f.path(), true).unwrap();
        assert!(matches!(disk.write_at(b"x", 0), Err(Error::ReadOnly(_))));
    }
}
