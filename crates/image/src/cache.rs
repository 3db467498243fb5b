//! Host cache policy of an open image (QEMU's `cache=`): what a write and a flush mean.
//!
//! O_DIRECT (`cache=none` / `directsync`) is chosen with [`crate::OpenOptions::direct`]; the
//! two other knobs are applied on top of any [`BlockDevice`] by [`Cached`]:
//! `write_through` makes every write durable before it completes (`writethrough`,
//! `directsync`) and `ignore_flush` turns guest flushes into no-ops (`unsafe`).

use std::sync::Arc;

use crate::{BlockDevice, Extent, Result};

/// What writes and flushes do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachePolicy {
    /// Flush after every write (and write-zeroes / discard) before reporting it done.
    pub write_through: bool,
    /// Guest flushes return at once without reaching the disk. [`Cached::sync`] still flushes
    /// (a VMM flushes at exit whatever the mode, as QEMU does).
    pub ignore_flush: bool,
}

impl CachePolicy {
    /// True when the policy changes nothing (page cache, flushes honoured: `writeback`).
    pub fn is_default(self) -> bool {
        self == CachePolicy::default()
    }
}

/// A block device with a [`CachePolicy`].
pub struct Cached {
    inner: Arc<dyn BlockDevice>,
    policy: CachePolicy,
}

impl Cached {
    pub fn new(inner: Arc<dyn BlockDevice>, policy: CachePolicy) -> Self {
        Cached { inner, policy }
    }

    pub fn policy(&self) -> CachePolicy {
        self.policy
    }

    /// Flushes the underlying device even when guest flushes are ignored.
    pub fn sync(&self) -> Result<()> {
        self.inner.flush()
    }

    fn after_write(&self) -> Result<()> {
        if self.policy.write_through {
            self.inner.flush()?;
        }
        Ok(())
    }
}

impl BlockDevice for Cached {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)?;
        self.after_write()
    }
    fn flush(&self) -> Result<()> {
        if self.policy.ignore_flush {
            return Ok(());
        }
        self.inner.flush()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn supports_discard(&self) -> bool {
        self.inner.supports_discard()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)?;
        self.after_write()
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, may_unmap)?;
        self.after_write()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts flushes; stores nothing.
    #[derive(Default)]
    struct Counting {
        flushes: AtomicUsize,
    }

    impl BlockDevice for Counting {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn read_only(&self) -> bool {
            false
        }
        fn discard(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
            Ok(Extent {
                start: offset,
                length: len,
                status: crate::BlockStatus {
                    data: true,
                    zero: false,
                    offset: None,
                    depth: 0,
                },
            })
        }
    }

    fn setup(policy: CachePolicy) -> (Arc<Counting>, Cached) {
        let inner = Arc::new(Counting::default());
        (inner.clone(), Cached::new(inner, policy))
    }

    #[test]
    fn write_through_flushes_every_write() {
        let (inner, c) = setup(CachePolicy {
            write_through: true,
            ignore_flush: false,
        });
        c.write_at(b"x", 0).unwrap();
        c.write_zeroes(0, 512, false).unwrap();
        assert_eq!(inner.flushes.load(Ordering::SeqCst), 2);
        c.flush().unwrap();
        assert_eq!(inner.flushes.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn unsafe_ignores_guest_flushes_but_not_sync() {
        let (inner, c) = setup(CachePolicy {
            write_through: false,
            ignore_flush: true,
        });
        c.write_at(b"x", 0).unwrap();
        c.flush().unwrap();
        assert_eq!(inner.flushes.load(Ordering::SeqCst), 0);
        c.sync().unwrap();
        assert_eq!(inner.flushes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn writeback_passes_flushes_through() {
        let (inner, c) = setup(CachePolicy::default());
        assert!(c.policy().is_default());
        c.write_at(b"x", 0).unwrap();
        assert_eq!(inner.flushes.load(Ordering::SeqCst), 0);
        c.flush().unwrap();
        assert_eq!(inner.flushes.load(Ordering::SeqCst), 1);
    }
}
