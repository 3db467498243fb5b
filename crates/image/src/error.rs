//! Errors of the image library.

use std::io;
use std::path::PathBuf;

/// An image operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on the image file.
    #[error("{op} on '{path}' failed: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A request lies (partly) outside the device.
    #[error("access of {len} bytes at offset {offset} is beyond the end of the {size}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write to an image opened read-only.
    #[error("image '{0}' is read-only")]
    ReadOnly(PathBuf),
}

pub type Result<T> = std::result::Result<T, Error>;
