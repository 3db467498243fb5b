//! qcow2 images (QEMU's docs/interop/qcow2): v2 and v3, with backing chains, compressed
//! clusters, internal snapshots, lazy refcounts and extended L2 entries.

pub mod bitmaps;
mod check;
mod compress;
mod create;
mod file;
pub mod header;
mod io;
mod l2;
mod refcount;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use check::{CheckReport, RepairMode};
pub use create::CreateOptions;
pub use header::CompressionType;
pub use snapshot::SnapshotInfo;

use crate::lock::lock_image;
use crate::{BlockDevice, Error, Extent, Image, MapExtent, OpenOptions, Result};
use file::{decode_table, ImgFile};
use header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use l2::L2Cache;
use refcount::Refcounts;
use snapshot::Snapshot;

/// Default L2 cache: 32 MiB of tables (maps 256 GiB with 64 KiB clusters).
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Deepest backing chain we follow (guards against loops).
const MAX_CHAIN_DEPTH: u32 = 64;

/// An open qcow2 image.
pub struct Qcow2 {
    state: RwLock<State>,
    size: AtomicU64,
    read_only: bool,
    path: PathBuf,
    cluster_size: u64,
    compression: CompressionType,
    /// The image file, for data reads outside the lock.
    data: ImgFile,
}

pub(crate) struct State {
    f: ImgFile,
    hdr: Header,
    l1: Vec<u64>,
    l2: L2Cache,
    rc: Refcounts,
    backing: Option<Box<Image>>,
    snapshots: Vec<Snapshot>,
    read_only: bool,
    /// Next free byte in the cluster that holds the last compressed cluster we wrote.
    comp_next: u64,
    /// We set the dirty bit (lazy refcounts) and must clear it on close.
    marked_dirty: bool,
    /// Last inflated compressed cluster: (host entry, data).
    comp_cache: Option<(u64, Vec<u8>)>,
    /// Last data/hole segment of the image file seen by map: (start, end, is_hole).
    host_seg: Option<(u64, u64, bool)>,
    /// Whether the image looks metadata-preallocated (see `metadata_preallocated`).
    prealloc_detected: Option<bool>,
}

impl Qcow2 {
    /// Creates (or truncates) `path` as an empty qcow2 image.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
        create::create(path, opts)
    }

    /// Opens a qcow2 image.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        Self::open_depth(path, opts, 0)
    }

    pub(crate) fn open_depth(path: &Path, opts: &OpenOptions, depth: u32) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        lock_image(&file, path, opts.lock_mode())?;
        let direct = if opts.direct {
            Some(Arc::new(crate::direct::Direct::open(
                path,
                !opts.read_only,
            )?))
        } else {
            None
        };
        let f = ImgFile {
            file: Arc::new(file),
            path: path.to_owned(),
            direct,
        };
        let len = f.len()?;
        let mut first = vec![0u8; len.min(2 << 20) as usize];
        f.read_data(&mut first, 0)?;
        let hdr = Header::parse(&first, path)?;
        if hdr.incompatible & INCOMPAT_CORRUPT != 0 && !opts.read_only && !opts.repair {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                what: "the corrupt bit is set, so it can only be opened read-only".into(),
            });
        }
        let mut st = State::load(f, hdr, opts.read_only)?;
        if !opts.no_backing {
            st.backing = st.open_backing(opts, depth)?;
        }
        st.after_open(opts)?;
        Ok(Qcow2 {
            size: AtomicU64::new(st.hdr.size),
            cluster_size: st.hdr.cluster_size(),
            data: st.f.clone(),
            compression: st.hdr.compression,
            state: RwLock::new(st),
            read_only: opts.read_only,
            path: path.to_owned(),
        })
    }

    fn st(&self) -> RwLockWriteGuard<'_, State> {
        // A panic while holding the lock would be a bug; the state is still the best we have.
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn st_read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A copy of the parsed header.
    pub fn header(&self) -> Header {
        self.st().hdr.clone()
    }

    /// The backing image, if opened.
    pub fn with_backing<R>(&self, f: impl FnOnce(Option<&Image>) -> R) -> R {
        let st = self.st();
        f(st.backing.as_deref())
    }

    /// Host bytes the image file occupies.
    pub fn file_length(&self) -> Result<u64> {
        self.st().f.len()
    }

    /// Allocation map of `[offset, offset+len)`'s first extent, with qcow2 details.
    pub fn map_extent(&self, offset: u64, len: u64) -> Result<MapExtent> {
        self.st().map_extent(offset, len)
    }

    /// Checks metadata consistency, optionally repairing.
    pub fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        self.st().check(repair)
    }

    /// Persistent dirty bitmaps recorded in the image (none once rvirt has written to it).
    pub fn bitmaps(&self) -> Result<Vec<bitmaps::BitmapInfo>> {
        let st = self.st();
        bitmaps::load(&st.f, &st.hdr)
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.st().snapshots.iter().map(Snapshot::info).collect()
    }

    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.st().snapshot_create(name)
    }

    /// Reverts the disk to a snapshot (its size too, if that differed).
    pub fn snapshot_apply(&self, name: &str) -> Result<()> {
        let mut st = self.st();
        st.snapshot_apply(name)?;
        self.size.store(st.hdr.size, Ordering::Relaxed);
        Ok(())
    }

    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.st().snapshot_delete(name)
    }

    /// Grows or shrinks the virtual disk.
    pub fn resize(&self, size: u64) -> Result<()> {
        let mut st = self.st();
        st.resize(size)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// Writes one cluster-aligned cluster compressed (`convert -c`).
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let z = self.compress(buf);
        self.write_precompressed(buf, z, offset)
    }

    /// Compresses one cluster of guest data (or the last, partial one) as this image stores
    /// compressed clusters; `None` when that would not save space. Needs no lock, so callers
    /// can compress on several threads and then write in order.
    pub fn compress(&self, buf: &[u8]) -> Option<Vec<u8>> {
        let mut full = buf.to_vec();
        full.resize(self.cluster_size as usize, 0);
        compress::compress(self.compression, &full)
    }

    /// Writes a cluster compressed earlier by [`Qcow2::compress`].
    pub fn write_precompressed(&self, buf: &[u8], z: Option<Vec<u8>>, offset: u64) -> Result<()> {
        self.st().write_compressed(buf, z, offset)
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Rewrites the header with a new backing file (`rebase -u`, `commit`, `amend`).
    pub fn set_backing(&self, file: Option<&str>, format: Option<&str>) -> Result<()> {
        let mut st = self.st();
        st.check_writable()?;
        st.hdr.backing_file = file.map(str::to_owned);
        st.hdr.backing_format = format.map(str::to_owned);
        st.write_header()
    }

    /// Changes header feature bits (`amend`): compat version and lazy refcounts.
    pub fn amend(&self, version: Option<u32>, lazy: Option<bool>) -> Result<()> {
        self.st().amend(version, lazy)
    }

    /// Drops every cluster of the active layer, so all reads fall through to the backing file
    /// (what `commit` leaves behind).
    pub fn make_empty(&self) -> Result<()> {
        self.st().make_empty()
    }

    /// Guest bytes allocated in this image (not the chain), in host clusters.
    pub fn allocated_clusters(&self) -> Result<u64> {
        self.st().count_allocated()
    }
}

impl State {
    fn load(f: ImgFile, hdr: Header, read_only: bool) -> Result<State> {
        let mut l1buf = vec![0u8; hdr.l1_size as usize * 8];
        f.read_meta(&mut l1buf, hdr.l1_table_offset, "L1 table")?;
        let rc = Refcounts::load(
            f.clone(),
            hdr.cluster_bits,
            hdr.refcount_order,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
        )?;
        let snapshots = snapshot::load_table(&f, &hdr)?;
        Ok(State {
            l2: L2Cache::new(L2_CACHE_BYTES, hdr.cluster_size()),
            l1: decode_table(&l1buf),
            rc,
            backing: None,
            snapshots,
            read_only,
            comp_next: 0,
            marked_dirty: false,
            comp_cache: None,
            host_seg: None,
            prealloc_detected: None,
            f,
            hdr,
        })
    }

    fn open_backing(&self, opts: &OpenOptions, depth: u32) -> Result<Option<Box<Image>>> {
        let Some(name) = self.hdr.backing_file.clone() else {
            return Ok(None);
        };
        if depth >= MAX_CHAIN_DEPTH {
            return Err(Error::Corrupt {
                path: self.f.path.clone(),
                what: format!("backing chain deeper than {MAX_CHAIN_DEPTH} (a loop?)"),
            });
        }
        let path = resolve_backing(&self.f.path, &name);
        let format = match self.hdr.backing_format.as_deref() {
            Some(s) => Some(s.parse()?),
            None => None,
        };
        let bopts = OpenOptions {
            read_only: true,
            ..opts.clone()
        };
        let img = crate::open_image_depth(&path, format, &bopts, depth + 1).map_err(|e| {
            Error::InvalidArgument(format!(
                "could not open backing file '{}' of '{}': {e}",
                path.display(),
                self.f.path.display()
            ))
        })?;
        Ok(Some(Box::new(img)))
    }

    /// Repairs a dirty image, marks lazy-refcount images dirty and drops unknown autoclear
    /// bits before the first write.
    fn after_open(&mut self, opts: &OpenOptions) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.hdr.incompatible & INCOMPAT_DIRTY != 0 && !opts.repair {
            log::info!(
                "{}: dirty bit set, repairing refcounts",
                self.f.path.display()
            );
            let report = self.check(RepairMode::All)?;
            if report.corruptions_after() > 0 {
                return Err(Error::Corrupt {
                    path: self.f.path.clone(),
                    what: "refcounts could not be repaired after an unclean shutdown".into(),
                });
            }
            self.hdr.incompatible &= !INCOMPAT_DIRTY;
            self.write_incompat()?;
        }
        if self.hdr.autoclear != 0 {
            // We do not keep dirty bitmaps up to date: drop them (header first, then their
            // clusters, so a crash leaks at worst) rather than leave stale ones behind.
            let cs = self.cs();
            let dir = bitmaps::directory_range(&self.hdr);
            let mut ranges = Vec::new();
            if let Some((off, len)) = dir {
                let list = bitmaps::load(&self.f, &self.hdr)?;
                ranges = bitmaps::ranges(&self.f, &list, cs)?;
                ranges.push((off, len));
                log::warn!(
                    "{}: dropping {} persistent dirty bitmap(s), which rvirt does not maintain",
                    self.f.path.display(),
                    list.len()
                );
            }
            self.hdr
                .extensions
                .retain(|(k, _)| *k != bitmaps::EXT_BITMAPS);
            self.hdr.autoclear = 0;
            self.write_header()?;
            self.f.sync()?;
            for (off, len) in ranges {
                let first = off / cs;
                let n = (off + len.max(1) - 1) / cs - first + 1;
                self.rc.adjust(first, n, -1, &[])?;
            }
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.f.path.clone()));
        }
        Ok(())
    }

    fn cs(&self) -> u64 {
        self.hdr.cluster_size()
    }

    fn write_incompat(&self) -> Result<()> {
        if self.hdr.version < 3 {
            return Ok(());
        }
        self.f
            .write(&self.hdr.incompatible.to_be_bytes(), header::OFF_INCOMPAT)
    }

    /// Rewrites the whole header cluster from the in-memory header.
    fn write_header(&mut self) -> Result<()> {
        self.sync_header_fields();
        let buf = self.hdr.serialize(&self.f.path)?;
        self.f.write(&buf, 0)
    }

    fn sync_header_fields(&mut self) {
        self.hdr.refcount_table_offset = self.rc.table_offset;
        self.hdr.refcount_table_clusters = self.rc.table_clusters;
        self.hdr.nb_snapshots = self.snapshots.len() as u32;
    }

    /// Sets the dirty bit before the first write of a lazy-refcounts image.
    fn mark_dirty(&mut self) -> Result<()> {
        // Every write path passes here: the file's holes may change.
        self.host_seg = None;
        self.prealloc_detected = None;
        if self.marked_dirty || self.hdr.compatible & header::COMPAT_LAZY_REFCOUNTS == 0 {
            return Ok(());
        }
        self.hdr.incompatible |= INCOMPAT_DIRTY;
        self.write_incompat()?;
        self.marked_dirty = true;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.f.sync()?;
        if self.marked_dirty {
            self.hdr.incompatible &= !INCOMPAT_DIRTY;
            self.write_incompat()?;
            self.f.sync()?;
            self.marked_dirty = false;
        }
        Ok(())
    }
}

impl State {
    fn amend(&mut self, version: Option<u32>, lazy: Option<bool>) -> Result<()> {
        self.check_writable()?;
        let path = self.f.path.clone();
        let bad = |what: String| {
            Error::InvalidArgument(format!("cannot amend '{}': {what}", path.display()))
        };
        let version = version.unwrap_or(self.hdr.version);
        if version < self.hdr.version {
            return Err(bad("downgrading to compat=0.10 is not supported".into()));
        }
        if version != 2 && version != 3 {
            return Err(bad(format!("unknown qcow2 version {version}")));
        }
        if version == 3 && self.hdr.version == 2 {
            self.hdr.version = 3;
            self.hdr.header_length = 112;
            if !self
                .hdr
                .extensions
                .iter()
                .any(|(k, _)| *k == header::EXT_FEATURE_TABLE)
            {
                self.hdr
                    .extensions
                    .push((header::EXT_FEATURE_TABLE, header::default_feature_table()));
            }
        }
        if let Some(lazy) = lazy {
            if lazy && self.hdr.version < 3 {
                return Err(bad("lazy_refcounts need compat=1.1".into()));
            }
            if lazy {
                self.hdr.compatible |= header::COMPAT_LAZY_REFCOUNTS;
            } else {
                self.hdr.compatible &= !header::COMPAT_LAZY_REFCOUNTS;
            }
        }
        self.write_header()?;
        self.f.sync()
    }
}

impl State {
    /// A write that found corrupt metadata marks the image corrupt (v3) and stops writing to
    /// it, as QEMU does, so the damage does not spread; `check -r all` repairs and clears it.
    fn on_error(&mut self, r: Result<()>) -> Result<()> {
        if let Err(Error::Corrupt { what, .. }) = &r {
            log::error!(
                "{}: marking the image corrupt: {what}",
                self.f.path.display()
            );
            self.read_only = true;
            if self.hdr.version >= 3 {
                self.hdr.incompatible |= INCOMPAT_CORRUPT;
                let _ = self.write_incompat().and_then(|()| self.f.sync());
            }
        }
        r
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if self.marked_dirty {
            if let Err(e) = self.flush() {
                log::warn!("{}: closing failed: {e}", self.f.path.display());
            }
        }
    }
}

/// A backing file name is relative to the directory of the image that names it.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_owned();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_owned(),
    }
}

impl BlockDevice for Qcow2 {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::check_range(offset, buf.len() as u64, self.size())?;
        // Data reads run outside the lock so several queues or threads read in parallel;
        // plain data mapped by a cached L2 table needs only the shared lock, and only other
        // lookups take the exclusive one.
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let cached = self.st_read().cached_data_run(buf.len() - done, pos);
            if let Some((n, host)) = cached {
                self.data.read_data(&mut buf[done..done + n], host)?;
                done += n;
                continue;
            }
            let (n, host) = self.st().read_piece(&mut buf[done..], pos)?;
            if let Some(host) = host {
                self.data.read_data(&mut buf[done..done + n], host)?;
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        crate::check_range(offset, buf.len() as u64, self.size())?;
        let mut st = self.st();
        st.check_writable()?;
        let r = st.write(buf, offset);
        st.on_error(r)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.st().flush()
    }

    fn read_only(&self) -> bool {
        // An image found corrupt while open refuses writes from then on.
        self.read_only || self.st_read().read_only
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        crate::check_range(offset, len, self.size())?;
        let mut st = self.st();
        st.check_writable()?;
        let r = st.discard(offset, len);
        st.on_error(r)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        crate::check_range(offset, len, self.size())?;
        let mut st = self.st();
        st.check_writable()?;
        let r = st.write_zeroes(offset, len, may_unmap);
        st.on_error(r)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        crate::check_range(offset, len, self.size())?;
        Ok(self.st().map_extent(offset, len)?.to_extent())
    }
}
