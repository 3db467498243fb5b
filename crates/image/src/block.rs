//! The interface every image format implements.

use crate::Result;

/// Allocation state of a range, as `qemu-img map` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// The range holds data in this image or in its backing chain (else reads return zeroes
    /// without any file holding them).
    pub data: bool,
    /// Reads of the range return zeroes.
    pub zero: bool,
    /// Host offset in the top image's file, when the range maps 1:1 to it.
    pub offset: Option<u64>,
    /// How far down the backing chain the range is defined: 0 = this image.
    pub depth: u32,
}

/// A contiguous range with one [`BlockStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub status: BlockStatus,
}

/// A virtual disk: a byte-addressed device of fixed size.
///
/// Methods take `&self` so a device can serve several queues or threads; implementations keep
/// their own locking. Reads past the end and writes past the end are errors, never truncated
/// silently.
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fills all of `buf` from `offset`. Unallocated ranges read as zeroes (or from the backing
    /// file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes all completed writes durable.
    fn flush(&self) -> Result<()>;

    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// Whether [`BlockDevice::discard`] can release space (virtio-blk advertises DISCARD only
    /// then).
    fn supports_discard(&self) -> bool {
        false
    }

    /// Releases `[offset, offset+len)`; afterwards the range reads as zeroes or as the backing
    /// file, as the format defines.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes `[offset, offset+len)` read as zeroes. With `may_unmap` the space may be released.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;

    /// Allocation status of the range starting at `offset`, at most `len` bytes long: the
    /// returned extent starts at `offset` and has a length in `1..=len`.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;
}
