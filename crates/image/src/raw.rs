//! Raw images: the file is the disk, byte for byte.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{BlockDevice, BlockStatus, Error, Extent, Result};

/// A raw image file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl RawFile {
    /// Opens `path` as a raw disk.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let io = |op, source| Error::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io("open", e))?;
        let size = file.metadata().map_err(|e| io("stat", e))?.len();
        Ok(RawFile {
            file,
            path: path.to_owned(),
            size,
            read_only,
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
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("read", e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("write", e))
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_err("flush", e))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Discard is advisory; a raw file without hole punching simply keeps its data.
        self.check_writable()?;
        self.check_range(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
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
        let status = BlockStatus {
            data: true,
            zero: false,
            offset: Some(offset),
            depth: 0,
        };
        Ok(Extent {
            start: offset,
            length: len,
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
