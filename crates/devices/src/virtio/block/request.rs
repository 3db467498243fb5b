//! One virtio-blk request: parsing a descriptor chain into header, data segments and status
//! byte, and executing it against the backend. Every guest-supplied address, length and sector
//! is checked here; a bad request gets an error status, never a panic.

use std::sync::Arc;

use rvirt_image::BlockDevice;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMemory;

/// Bytes per virtio-blk sector, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial number GET_ID returns.
pub const ID_BYTES: usize = 20;
const HEADER_SIZE: u32 = 16;
/// Size of one discard / write-zeroes range descriptor.
const RANGE_SIZE: u64 = 16;
/// Ranges accepted per discard / write-zeroes request (advertised as max_*_seg).
pub const MAX_RANGES: u32 = 1;
/// Sectors per discard / write-zeroes range (advertised as max_*_sectors).
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;

/// What the device offers, as the request executor needs it.
#[derive(Clone, Debug)]
pub(crate) struct DiskProps {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub id: [u8; ID_BYTES],
}

/// A chain that cannot even carry a status byte back: it is returned with length 0.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UnanswerableChain {
    #[error("empty descriptor chain")]
    Empty,
    #[error("last descriptor is not a device-writable status byte inside guest memory")]
    NoStatus,
}

/// A request that fails; `status()` says what the driver sees.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("request header missing, device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("data buffer {addr:#x}+{len:#x} has the wrong direction for this request")]
    WrongDirection { addr: u64, len: u32 },
    #[error("data buffer {addr:#x}+{len:#x} is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("data length {0} is not a multiple of 512")]
    BadLength(u64),
    #[error("sectors {sector}+{count} are beyond the disk's end ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("malformed discard/write-zeroes ranges: {0}")]
    BadRanges(&'static str),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("unsupported flags {0:#x} in a discard/write-zeroes range")]
    UnsupportedFlags(u32),
    #[error("backend I/O failed: {0}")]
    Backend(#[from] rvirt_image::Error),
}

impl RequestError {
    /// The status byte the driver gets.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A contiguous guest buffer.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: u64,
    len: u32,
    writable: bool,
}

/// A parsed request: where its status byte goes and what it asks for (or why it cannot be
/// served).
#[derive(Debug)]
pub(crate) struct Request {
    status_addr: GuestAddress,
    body: Result<(u32, u64, Vec<Segment>), RequestError>,
}

/// The outcome of one request, for counters.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Done {
    pub kind: u32,
    pub bytes: u64,
    pub ok: bool,
    /// Bytes written into device-writable buffers, status byte included.
    pub used_len: u32,
}

impl Request {
    /// Splits `chain` into header, data segments and status byte.
    pub fn parse(
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Result<Request, UnanswerableChain> {
        // The chain iterator stops at a loop (after queue-size descriptors), at an index
        // beyond the table and at a bad indirect table.
        let descs: Vec<_> = chain.collect();
        let last = descs.last().ok_or(UnanswerableChain::Empty)?;
        if !last.is_write_only() || last.len() == 0 {
            return Err(UnanswerableChain::NoStatus);
        }
        let status_addr = last
            .addr()
            .0
            .checked_add(u64::from(last.len()) - 1)
            .map(GuestAddress)
            .filter(|a| mem.check_range(*a, 1))
            .ok_or(UnanswerableChain::NoStatus)?;
        let body = Self::parse_body(mem, &descs);
        Ok(Request { status_addr, body })
    }

    fn parse_body(
        mem: &GuestMemory,
        descs: &[virtio_queue::desc::split::Descriptor],
    ) -> Result<(u32, u64, Vec<Segment>), RequestError> {
        let first = &descs[0];
        if descs.len() < 2 || first.is_write_only() || first.len() < HEADER_SIZE {
            return Err(RequestError::BadHeader);
        }
        let mut header = [0u8; HEADER_SIZE as usize];
        mem.read_slice(&mut header, first.addr())
            .map_err(|_| RequestError::BadHeader)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let mut segs = Vec::with_capacity(descs.len());
        let mut push = |addr: u64, len: u32, writable: bool| {
            if len > 0 {
                segs.push(Segment {
                    addr,
                    len,
                    writable,
                });
            }
        };
        // Bytes after the header in its descriptor, every middle descriptor, and the bytes
        // before the status byte in the last one are data.
        push(
            first.addr().0.wrapping_add(u64::from(HEADER_SIZE)),
            first.len() - HEADER_SIZE,
            false,
        );
        for d in &descs[1..descs.len() - 1] {
            push(d.addr().0, d.len(), d.is_write_only());
        }
        let last = &descs[descs.len() - 1];
        push(last.addr().0, last.len() - 1, true);
        for s in &segs {
            let in_memory = GuestAddress(s.addr)
                .0
                .checked_add(u64::from(s.len))
                .is_some()
                && mem.check_range(GuestAddress(s.addr), s.len as usize);
            if !in_memory {
                return Err(RequestError::BadAddress {
                    addr: s.addr,
                    len: s.len,
                });
            }
        }
        Ok((kind, sector, segs))
    }

    /// Runs the request and writes its status byte, last. Returns what happened.
    pub fn execute(
        self,
        mem: &GuestMemory,
        disk: &Arc<dyn BlockDevice>,
        props: &DiskProps,
        buf: &mut Vec<u8>,
    ) -> (Done, Option<RequestError>) {
        let (kind, result) = match self.body {
            Ok((kind, sector, segs)) => (kind, execute(mem, disk, props, buf, kind, sector, &segs)),
            Err(e) => (u32::MAX, Err(e)),
        };
        let (status, written, bytes, err) = match result {
            Ok((written, bytes)) => (VIRTIO_BLK_S_OK as u8, written, bytes, None),
            Err(e) => (e.status(), 0, 0, Some(e)),
        };
        // The status byte goes last, after all data: the driver may look at it as soon as the
        // used entry appears.
        let status_ok = mem.write_obj(status, self.status_addr).is_ok();
        let done = Done {
            kind,
            bytes,
            ok: err.is_none(),
            used_len: if status_ok {
                written.saturating_add(1)
            } else {
                written
            },
        };
        (done, err)
    }
}

/// Dispatches on the request type; returns (bytes written to the guest, bytes transferred).
fn execute(
    mem: &GuestMemory,
    disk: &Arc<dyn BlockDevice>,
    props: &DiskProps,
    buf: &mut Vec<u8>,
    kind: u32,
    sector: u64,
    segs: &[Segment],
) -> Result<(u32, u64), RequestError> {
    match kind {
        VIRTIO_BLK_T_IN => {
            let len = data_len(segs, true)?;
            let offset = check_sectors(props, sector, len)?;
            transfer(mem, disk, buf, segs, offset, true)?;
            Ok((len as u32, len))
        }
        VIRTIO_BLK_T_OUT => {
            let len = data_len(segs, false)?;
            if props.read_only {
                return Err(RequestError::ReadOnly);
            }
            let offset = check_sectors(props, sector, len)?;
            transfer(mem, disk, buf, segs, offset, false)?;
            Ok((0, len))
        }
        VIRTIO_BLK_T_FLUSH => {
            if !props.read_only {
                disk.flush()?;
            }
            Ok((0, 0))
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut written = 0usize;
            for s in segs {
                if !s.writable {
                    return Err(RequestError::WrongDirection {
                        addr: s.addr,
                        len: s.len,
                    });
                }
                let n = (s.len as usize).min(ID_BYTES - written);
                mem.write_slice(&props.id[written..written + n], GuestAddress(s.addr))
                    .map_err(|_| RequestError::BadAddress {
                        addr: s.addr,
                        len: s.len,
                    })?;
                written += n;
            }
            Ok((written as u32, 0))
        }
        VIRTIO_BLK_T_DISCARD if props.discard => ranges(mem, disk, props, segs, false),
        VIRTIO_BLK_T_WRITE_ZEROES if props.write_zeroes => ranges(mem, disk, props, segs, true),
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Total data length, checking every segment's direction (device-writable for reads).
fn data_len(segs: &[Segment], writable: bool) -> Result<u64, RequestError> {
    let mut len = 0u64;
    for s in segs {
        if s.writable != writable {
            return Err(RequestError::WrongDirection {
                addr: s.addr,
                len: s.len,
            });
        }
        len += u64::from(s.len);
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::BadLength(len));
    }
    Ok(len)
}

/// Checks that `len` bytes from `sector` fit the disk; returns the byte offset.
fn check_sectors(props: &DiskProps, sector: u64, len: u64) -> Result<u64, RequestError> {
    let count = len / SECTOR_SIZE;
    let fits = sector
        .checked_add(count)
        .is_some_and(|end| end <= props.capacity_sectors);
    if !fits {
        return Err(RequestError::OutOfRange {
            sector,
            count,
            capacity: props.capacity_sectors,
        });
    }
    Ok(sector * SECTOR_SIZE)
}

/// Moves data between guest buffers and the disk through a bounded bounce buffer, so a huge
/// request never makes the VMM allocate its size.
fn transfer(
    mem: &GuestMemory,
    disk: &Arc<dyn BlockDevice>,
    buf: &mut Vec<u8>,
    segs: &[Segment],
    mut offset: u64,
    read: bool,
) -> Result<(), RequestError> {
    const CHUNK: usize = 256 << 10;
    for s in segs {
        let mut done = 0usize;
        let len = s.len as usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let chunk = &mut buf[..n];
            let addr = GuestAddress(s.addr + done as u64);
            let bad = |_| RequestError::BadAddress {
                addr: s.addr,
                len: s.len,
            };
            if read {
                disk.read_at(chunk, offset)?;
                mem.write_slice(chunk, addr).map_err(bad)?;
            } else {
                mem.read_slice(chunk, addr).map_err(bad)?;
                disk.write_at(chunk, offset)?;
            }
            done += n;
            offset += n as u64;
        }
    }
    Ok(())
}

/// DISCARD and WRITE_ZEROES: an array of {sector, num_sectors, flags} ranges.
fn ranges(
    mem: &GuestMemory,
    disk: &Arc<dyn BlockDevice>,
    props: &DiskProps,
    segs: &[Segment],
    zeroes: bool,
) -> Result<(u32, u64), RequestError> {
    if props.read_only {
        return Err(RequestError::ReadOnly);
    }
    let mut raw = Vec::new();
    for s in segs {
        if s.writable {
            return Err(RequestError::WrongDirection {
                addr: s.addr,
                len: s.len,
            });
        }
        if raw.len() + s.len as usize > (RANGE_SIZE * u64::from(MAX_RANGES)) as usize {
            return Err(RequestError::BadRanges("more ranges than max_*_seg"));
        }
        let start = raw.len();
        raw.resize(start + s.len as usize, 0);
        mem.read_slice(&mut raw[start..], GuestAddress(s.addr))
            .map_err(|_| RequestError::BadAddress {
                addr: s.addr,
                len: s.len,
            })?;
    }
    if raw.is_empty() || !(raw.len() as u64).is_multiple_of(RANGE_SIZE) {
        return Err(RequestError::BadRanges("length is not a multiple of 16"));
    }
    let mut total = 0u64;
    for r in raw.chunks_exact(RANGE_SIZE as usize) {
        let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
        let allowed = if zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if count > MAX_RANGE_SECTORS {
            return Err(RequestError::BadRanges("more sectors than max_*_sectors"));
        }
        let len = u64::from(count) * SECTOR_SIZE;
        let offset = check_sectors(props, sector, len)?;
        if zeroes {
            disk.write_zeroes(offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)?;
        } else {
            disk.discard(offset, len)?;
        }
        total += len;
    }
    Ok((0, total))
}
