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
    /// The file is not a valid image of the format it claims (bad header field, table out of
    /// bounds, ...).
    #[error("'{path}' is not a valid {format} image: {what}")]
    Invalid {
        path: PathBuf,
        format: &'static str,
        what: String,
    },
    /// Metadata inside a valid header points somewhere impossible.
    #[error("image '{path}' is corrupt: {what}; run 'rvirt-img check -r all {path}' to repair it")]
    Corrupt { path: PathBuf, what: String },
    /// The image uses a feature this implementation does not support.
    #[error("image '{path}' uses an unsupported feature: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// Another process holds a conflicting lock on the image.
    #[error("image '{path}' is in use by {holder}; stop it first, or use -U (force share) to read it anyway")]
    Locked { path: PathBuf, holder: String },
    /// A compressed cluster could not be inflated.
    #[error("image '{path}': compressed cluster at host offset {offset} is damaged: {what}")]
    Compression {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// A caller-supplied option is invalid.
    #[error("{0}")]
    InvalidArgument(String),
}

impl Error {
    /// Builds an [`Error::Io`].
    pub fn io(op: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
