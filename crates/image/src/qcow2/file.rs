//! Positioned I/O on the image file with errors that name the image, the table and the offset.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use crate::{Error, Result};

/// The image file, shared by the metadata components.
#[derive(Debug, Clone)]
pub struct ImgFile {
    pub file: Arc<File>,
    pub path: PathBuf,
    /// The O_DIRECT descriptor (cache=none/directsync).
    pub direct: Option<Arc<crate::direct::Direct>>,
}

impl ImgFile {
    pub fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len())
    }

    /// Reads metadata `what` at `offset`; a short read means the table lies past the end of
    /// the file, which is corruption rather than an I/O failure.
    pub fn read_meta(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        match crate::direct::read_exact(self.direct.as_deref(), &self.file, buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(self.corrupt(format!(
                "{what} at offset {offset:#x} ({} bytes) lies beyond the end of the file",
                buf.len()
            ))),
            Err(e) => Err(Error::io("read", &self.path, e)),
        }
    }

    /// Reads data; bytes past the end of the file read as zeroes (a sparse tail).
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = crate::direct::read(self.direct.as_deref(), &self.file, buf, offset)
            .map_err(|e| Error::io("read", &self.path, e))?;
        buf[n..].fill(0);
        Ok(())
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        crate::direct::write_all(self.direct.as_deref(), &self.file, buf, offset)
            .map_err(|e| Error::io("write", &self.path, e))
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("flush", &self.path, e))
    }

    /// The data or hole segment of the file containing `off`: (start, end, is_hole). Past the
    /// end of the file, or where seeking for holes is not supported, everything is data.
    pub fn segment(&self, off: u64) -> Result<(u64, u64, bool)> {
        use std::os::unix::io::AsRawFd;
        let fd = self.file.as_raw_fd();
        let seek = |whence| {
            // SAFETY: lseek on an open fd has no memory effects.
            let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
            (r >= 0).then_some(r as u64)
        };
        let len = self.len()?;
        if off >= len {
            return Ok((off, u64::MAX, false));
        }
        Ok(match seek(libc::SEEK_DATA) {
            Some(d) if d > off => (off, d, true),
            Some(_) => (
                off,
                seek(libc::SEEK_HOLE).unwrap_or(len).max(off + 1),
                false,
            ),
            // ENXIO: only a hole from here to the end of the file.
            None => (off, len, true),
        })
    }

    pub fn corrupt(&self, what: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            what,
        }
    }
}

/// Decodes a big-endian u64 table.
pub fn decode_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// Encodes a u64 table big-endian.
pub fn encode_table(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|v| v.to_be_bytes()).collect()
}
