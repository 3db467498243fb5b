//! Preallocation modes shared by raw and qcow2 creation.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// How much of an image's space is reserved at creation, as qemu-img's `preallocation=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    /// Metadata only (qcow2); raw treats it as `off`.
    Metadata,
    /// Reserve blocks with fallocate.
    Falloc,
    /// Write zeroes to every byte.
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "metadata" => Ok(Self::Metadata),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            _ => Err(Error::InvalidArgument(format!(
                "invalid preallocation mode '{s}': use off, metadata, falloc or full"
            ))),
        }
    }
}

/// Reserves `[offset, offset+len)` of `file` as `mode` asks.
pub fn preallocate(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
    mode: Preallocation,
) -> Result<()> {
    match mode {
        Preallocation::Off | Preallocation::Metadata => Ok(()),
        Preallocation::Falloc => {
            if len == 0 {
                return Ok(());
            }
            // SAFETY: fallocate on a valid fd has no memory effects.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    0,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r != 0 {
                return Err(Error::io(
                    "fallocate",
                    path,
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(())
        }
        Preallocation::Full => {
            let zero = vec![0u8; 1 << 20];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zero.len() as u64) as usize;
                file.write_all_at(&zero[..n], offset + done)
                    .map_err(|e| Error::io("preallocate", path, e))?;
                done += n as u64;
            }
            Ok(())
        }
    }
}
