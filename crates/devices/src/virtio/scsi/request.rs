//! One virtio-scsi request: the descriptor chain as two byte streams (device-readable, then
//! device-writable), command requests run through the SCSI engine, and control requests.
//! Every guest address and length is checked before use; a bad request gets a response
//! code, never a panic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_FUNCTION_REJECTED,
    VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN, VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE,
    VIRTIO_SCSI_T_TMF, VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::scsi::{DataIn, DataOut, ScsiLun, ScsiResult, TransferError};
use crate::GuestMemory;

/// The LUNs of the device by target id.
pub(crate) type Targets = Arc<BTreeMap<u8, Arc<Mutex<ScsiLun>>>>;

/// Bytes before the CDB in a command request: lun[8], id, task_attr, prio, crn.
const CMD_HEADER: usize = 19;
/// Bytes before the sense data in a command response.
const RESP_HEADER: usize = 12;

/// The chain cannot be parsed at all: it is returned with nothing written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadChain {
    #[error("device-readable descriptor after a device-writable one")]
    Order,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    Address { addr: u64, len: u32 },
}

/// A list of guest buffers read or written front to back.
#[derive(Debug)]
pub(crate) struct Stream<'m> {
    mem: &'m GuestMemory,
    segs: Vec<(u64, u32)>,
    seg: usize,
    off: u32,
    remaining: u64,
}

impl<'m> Stream<'m> {
    fn new(mem: &'m GuestMemory, segs: Vec<(u64, u32)>) -> Self {
        let remaining = segs.iter().map(|s| u64::from(s.1)).sum();
        Stream {
            mem,
            segs,
            seg: 0,
            off: 0,
            remaining,
        }
    }

    pub fn len(&self) -> u64 {
        self.segs.iter().map(|s| u64::from(s.1)).sum()
    }

    /// Calls `f(guest address, n)` for the next `len` bytes, segment piece by piece.
    fn walk(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        if len as u64 > self.remaining {
            return Err(TransferError);
        }
        let mut done = 0usize;
        while done < len {
            let &(addr, seg_len) = self.segs.get(self.seg).ok_or(TransferError)?;
            let n = ((seg_len - self.off) as usize).min(len - done);
            // In memory and not wrapping: checked when the chain was parsed.
            f(GuestAddress(addr + u64::from(self.off)), done, n)?;
            done += n;
            self.off += n as u32;
            if self.off == seg_len {
                self.seg += 1;
                self.off = 0;
            }
        }
        self.remaining -= len as u64;
        Ok(())
    }

    /// Skips `len` bytes (at most what remains).
    fn skip(&mut self, len: usize) {
        let len = (len as u64).min(self.remaining) as usize;
        let _ = self.walk(len, |_, _, _| Ok(()));
    }
}

impl DataOut for Stream<'_> {
    fn remaining(&self) -> u64 {
        self.remaining
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<(), TransferError> {
        let mem = self.mem;
        self.walk(buf.len(), |a, at, n| {
            mem.read_slice(&mut buf[at..at + n], a)
                .map_err(|_| TransferError)
        })
    }
}

impl DataIn for Stream<'_> {
    fn remaining(&self) -> u64 {
        self.remaining
    }
    fn write(&mut self, buf: &[u8]) -> Result<(), TransferError> {
        let mem = self.mem;
        self.walk(buf.len(), |a, at, n| {
            mem.write_slice(&buf[at..at + n], a)
                .map_err(|_| TransferError)
        })
    }
}

/// A chain split into its device-readable and device-writable parts.
pub(crate) struct Chain<'m> {
    pub readable: Stream<'m>,
    pub writable: Stream<'m>,
    mem: &'m GuestMemory,
    writable_segs: Vec<(u64, u32)>,
}

impl<'m> Chain<'m> {
    pub fn parse(
        mem: &'m GuestMemory,
        chain: DescriptorChain<&'m GuestMemory>,
    ) -> Result<Self, BadChain> {
        let (mut r, mut w) = (Vec::new(), Vec::new());
        // The iterator stops at loops (after queue-size descriptors) and bad indices.
        for d in chain {
            let (addr, len) = (d.addr().0, d.len());
            let fits = addr.checked_add(u64::from(len)).is_some()
                && mem.check_range(GuestAddress(addr), len as usize);
            if !fits {
                return Err(BadChain::Address { addr, len });
            }
            if len == 0 {
                continue;
            }
            if d.is_write_only() {
                w.push((addr, len));
            } else if !w.is_empty() {
                return Err(BadChain::Order);
            } else {
                r.push((addr, len));
            }
        }
        Ok(Chain {
            readable: Stream::new(mem, r),
            writable: Stream::new(mem, w.clone()),
            mem,
            writable_segs: w,
        })
    }

    /// Writes `bytes` at the start of the writable part (as much as fits); returns how many.
    fn write_front(&self, bytes: &[u8]) -> u32 {
        let mut s = Stream::new(self.mem, self.writable_segs.clone());
        let n = (bytes.len() as u64).min(s.remaining) as usize;
        match s.write(&bytes[..n]) {
            Ok(()) => n as u32,
            Err(_) => 0,
        }
    }
}

/// The outcome of a command request, for counters.
#[derive(Debug, Default)]
pub(crate) struct CmdDone {
    pub used_len: u32,
    pub result: Option<ScsiResult>,
    pub bad_target: bool,
}

/// The 8-byte virtio-scsi LUN: byte 0 = 1, byte 1 = target, bytes 2-3 = LUN (flat space
/// 0x40 flag or peripheral 0). Only LUN 0 exists on each target.
fn lookup(targets: &Targets, lun: &[u8]) -> Option<Arc<Mutex<ScsiLun>>> {
    let lun0 = matches!(lun.get(2..4), Some([0x40, 0]) | Some([0, 0]));
    if lun.first() != Some(&1) || !lun0 {
        return None;
    }
    targets.get(lun.get(1)?).cloned()
}

/// A command request: header, CDB, data-out → response header, sense, data-in.
pub(crate) fn command(mut chain: Chain<'_>, targets: &Targets, sizes: (usize, usize)) -> CmdDone {
    let (cdb_size, sense_size) = sizes;
    let resp_len = RESP_HEADER + sense_size;
    let mut resp = vec![0u8; resp_len];
    let mut header = vec![0u8; CMD_HEADER + cdb_size];
    if chain.readable.read(&mut header).is_err() || chain.writable.len() < resp_len as u64 {
        resp[11] = VIRTIO_SCSI_S_FAILURE as u8;
        return CmdDone {
            used_len: chain.write_front(&resp),
            ..Default::default()
        };
    }
    let Some(lun) = lookup(targets, &header[0..8]) else {
        resp[11] = VIRTIO_SCSI_S_BAD_TARGET as u8;
        return CmdDone {
            used_len: chain.write_front(&resp),
            bad_target: true,
            ..Default::default()
        };
    };
    chain.writable.skip(resp_len);
    let (in_cap, out_cap) = (chain.writable.remaining, chain.readable.remaining);
    let cdb = &header[CMD_HEADER..];
    let result = lun.lock().unwrap_or_else(|e| e.into_inner()).execute(
        cdb,
        &mut chain.readable,
        &mut chain.writable,
    );
    // Residual of the data direction the command has buffers for.
    let resid = if result.overrun {
        in_cap.max(out_cap)
    } else if in_cap > 0 {
        in_cap - result.data_in
    } else {
        out_cap - result.data_out
    };
    resp[4..8].copy_from_slice(&(resid.min(u64::from(u32::MAX)) as u32).to_le_bytes());
    resp[10] = result.status.byte();
    resp[11] = if result.overrun {
        VIRTIO_SCSI_S_OVERRUN
    } else {
        VIRTIO_SCSI_S_OK
    } as u8;
    if let Some(s) = result.status.sense() {
        let fixed = s.fixed();
        let n = fixed.len().min(sense_size);
        resp[0..4].copy_from_slice(&(n as u32).to_le_bytes());
        resp[RESP_HEADER..RESP_HEADER + n].copy_from_slice(&fixed[..n]);
    }
    // Data-in was written first; the response goes in front of it.
    let head = chain.write_front(&resp);
    let data = result.data_in.min(u64::from(u32::MAX - head)) as u32;
    CmdDone {
        used_len: head + data,
        result: Some(result),
        bad_target: false,
    }
}

/// A control request: task management or asynchronous notification. Commands complete
/// synchronously, so there is never a task to abort: TMFs succeed at once.
pub(crate) fn control(mut chain: Chain<'_>, targets: &Targets) -> u32 {
    let mut kind = [0u8; 4];
    if chain.readable.read(&mut kind).is_err() {
        return 0;
    }
    match u32::from_le_bytes(kind) {
        VIRTIO_SCSI_T_TMF => {
            // subtype, lun[8], tag
            let mut rest = [0u8; 20];
            if chain.readable.read(&mut rest).is_err() {
                return chain.write_front(&[VIRTIO_SCSI_S_FAILURE as u8]);
            }
            let subtype = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let response = if lookup(targets, &rest[4..12]).is_none() {
                VIRTIO_SCSI_S_BAD_TARGET
            } else if (VIRTIO_SCSI_T_TMF_ABORT_TASK..=VIRTIO_SCSI_T_TMF_QUERY_TASK_SET)
                .contains(&subtype)
            {
                // FUNCTION COMPLETE (the same code as OK).
                VIRTIO_SCSI_S_OK
            } else {
                VIRTIO_SCSI_S_FUNCTION_REJECTED
            };
            chain.write_front(&[response as u8])
        }
        VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => {
            // lun[8], event_requested → event_actual (none supported), response.
            let mut rest = [0u8; 12];
            let response = if chain.readable.read(&mut rest).is_err() {
                VIRTIO_SCSI_S_FAILURE
            } else if lookup(targets, &rest[0..8]).is_none() {
                VIRTIO_SCSI_S_BAD_TARGET
            } else {
                VIRTIO_SCSI_S_OK
            };
            let mut r = [0u8; 5];
            r[4] = response as u8;
            chain.write_front(&r)
        }
        // Unknown type: the response layout is unknown too, so nothing is written.
        _ => 0,
    }
}
