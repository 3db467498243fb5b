//! MSI-X: the capability, the vector table and the pending-bit array (PBA).
//!
//! Each vector owns a VMM-allocated GSI + irqfd ([`MsiVector`]). The guest's table writes and
//! mask changes are forwarded with [`MsiRouting::update_route`]. Masking is also enforced here:
//! [`MsixState::trigger`] on a masked vector sets its pending bit instead of raising it, and
//! unmasking a vector with its pending bit set raises it then, as the PCI spec requires.

use std::sync::Arc;

use super::config::PciConfigSpace;
use super::PciError;
use crate::interrupt::{MsiMessage, MsiRouting, MsiVector};

/// The PCI capability id of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;
/// The largest number of vectors a function may have.
pub const MAX_VECTORS: u16 = 2048;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl MsixEntry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            data: self.data,
        }
    }
}

/// MSI-X state of one function: table, PBA, enable and function mask, and the vectors' irqfds.
pub struct MsixState {
    entries: Vec<MsixEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<MsiVector>,
    routing: Arc<dyn MsiRouting>,
    cap_offset: usize,
}

impl std::fmt::Debug for MsixState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixState")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl MsixState {
    /// Allocates `count` vectors from `routing` and adds the MSI-X capability to `config`, with
    /// the table at `table_offset` and the PBA at `pba_offset` of BAR `bar`.
    pub fn new(
        count: u16,
        routing: Arc<dyn MsiRouting>,
        config: &mut PciConfigSpace,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Result<Self, PciError> {
        if count == 0 || count > MAX_VECTORS {
            return Err(PciError::InvalidMsixVectors(count));
        }
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            match routing.alloc_vector() {
                Ok(v) => vectors.push(v),
                Err(e) => {
                    for v in vectors {
                        routing.free_vector(v);
                    }
                    return Err(PciError::Interrupt(e));
                }
            }
        }
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(count - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let writable = [0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0];
        let cap_offset = config.add_capability(MSIX_CAP_ID, &body, &writable)?;
        let entries = vec![
            MsixEntry {
                control: ENTRY_MASKED,
                ..Default::default()
            };
            usize::from(count)
        ];
        Ok(MsixState {
            entries,
            pba: vec![0; usize::from(count).div_ceil(64)],
            enabled: false,
            function_masked: false,
            vectors,
            routing,
            cap_offset,
        })
    }

    /// Offset of the MSI-X capability in config space.
    pub fn cap_offset(&self) -> usize {
        self.cap_offset
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false: a function has at least one vector.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// GSI of vector `v`.
    pub fn gsi(&self, v: u16) -> Option<u32> {
        self.vectors.get(usize::from(v)).map(|x| x.gsi)
    }

    fn masked(&self, v: usize) -> bool {
        !self.enabled || self.function_masked || self.entries[v].control & ENTRY_MASKED != 0
    }

    /// Whether vector `v`'s pending bit is set.
    pub fn pending(&self, v: u16) -> bool {
        let v = usize::from(v);
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pba[v / 64] |= 1 << (v % 64);
        } else {
            self.pba[v / 64] &= !(1 << (v % 64));
        }
    }

    fn update_route(&self, v: usize) {
        let gsi = self.vectors[v].gsi;
        if let Err(e) = self
            .routing
            .update_route(gsi, self.entries[v].message(), self.masked(v))
        {
            crate::guest_warn!("MSI-X vector {v} (GSI {gsi}): route update failed: {e}");
        }
    }

    fn fire(&self, v: usize) {
        if let Err(e) = self.vectors[v].eventfd.write(1) {
            crate::guest_warn!("MSI-X vector {v}: irqfd write failed: {e}");
        }
    }

    /// Raises vector `v`, or sets its pending bit when it is masked. Returns whether the
    /// interrupt was delivered.
    pub fn trigger(&mut self, v: u16) -> bool {
        let v = usize::from(v);
        if v >= self.entries.len() {
            return false;
        }
        if self.masked(v) {
            self.set_pending(v, true);
            false
        } else {
            self.fire(v);
            true
        }
    }

    /// Delivers pending vectors that are no longer masked.
    fn flush_pending(&mut self) {
        for v in 0..self.entries.len() {
            if !self.masked(v) && self.pending(v as u16) {
                self.set_pending(v, false);
                self.fire(v);
            }
        }
    }

    /// Applies a guest write to config space that may have touched the message control word.
    pub fn config_written(&mut self, config: &PciConfigSpace) {
        let ctrl = config.read_u16(self.cap_offset + 2);
        let enabled = ctrl & CTRL_ENABLE != 0;
        let function_masked = ctrl & CTRL_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for v in 0..self.entries.len() {
            self.update_route(v);
        }
        self.flush_pending();
    }

    /// A guest read of the table, `offset` relative to the table start.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let fill = |data: &mut [u8], value: u64| {
            let bytes = value.to_le_bytes();
            let n = data.len().min(8);
            data[..n].copy_from_slice(&bytes[..n]);
        };
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(index) else {
            data.fill(0xff);
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let field = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        match (data.len(), offset % 4) {
            (4, 0) => fill(data, u64::from(words[field])),
            (8, 0) if field.is_multiple_of(2) => fill(
                data,
                u64::from(words[field]) | (u64::from(words[field + 1]) << 32),
            ),
            _ => data.fill(0xff),
        }
    }

    /// A guest write of the table, `offset` relative to the table start.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        if index >= self.entries.len() || !offset.is_multiple_of(4) {
            return;
        }
        let field = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        let dword = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        let words = match data.len() {
            4 => [(field, dword(0)), (usize::MAX, 0)],
            8 if field.is_multiple_of(2) => [(field, dword(0)), (field + 1, dword(4))],
            _ => return,
        };
        let before = self.entries[index];
        let e = &mut self.entries[index];
        for (field, value) in words {
            match field {
                usize::MAX => {}
                0 => e.addr_lo = value,
                1 => e.addr_hi = value,
                2 => e.data = value,
                // Only the mask bit of vector control is writable.
                _ => e.control = value & ENTRY_MASKED,
            }
        }
        if *e != before {
            self.update_route(index);
            self.flush_pending();
        }
    }

    /// A guest read of the PBA (read-only), `offset` relative to the PBA start.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let qword = self.pba.get((offset / 8) as usize).copied().unwrap_or(0);
        let bytes = qword.to_le_bytes();
        let start = (offset % 8) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    /// The eventfd of vector `v` (for tests and for devices that signal directly).
    pub fn eventfd(&self, v: u16) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.vectors.get(usize::from(v)).map(|x| &x.eventfd)
    }

    /// Returns every vector's GSI to the VMM.
    pub fn release(&mut self) {
        for v in self.vectors.drain(..) {
            self.routing.free_vector(v);
        }
        self.entries.clear();
    }
}

impl Drop for MsixState {
    fn drop(&mut self) {
        self.release();
    }
}
