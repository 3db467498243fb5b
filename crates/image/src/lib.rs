//! Disk images for rvirt: raw and qcow2, with the semantics qemu-img users know.
//!
//! Every format implements [`BlockDevice`]; virtio-blk, `rvirt-img` and backing chains all go
//! through it, so a qcow2 image backed by a raw file is just one `BlockDevice` holding another.

mod block;
mod error;
pub mod raw;

pub use block::{BlockDevice, BlockStatus, Extent};
pub use error::{Error, Result};
