//! The type-0 configuration space of one PCI function (256 bytes plus the 4 KiB extended space).
//!
//! Every register is described by three masks: which bits the guest may write, which bits are
//! write-1-to-clear, and (implicitly) everything else is read-only. BAR registers get their
//! writable mask from the BAR size, so the classic sizing sequence (write all ones, read back,
//! restore) returns `!(size - 1)` plus the read-only type bits, as Linux expects.

use super::PciError;

/// Size of the configuration space, extended part included.
pub const CONFIG_SPACE_SIZE: usize = 4096;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// Number of BAR registers of a type-0 header.
pub const NUM_BARS: usize = 6;

const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAP_PTR_OFFSET: usize = 0x34;
const FIRST_CAP_OFFSET: usize = 0x40;
const STD_CONFIG_END: usize = 0x100;

/// Command register: I/O space decode enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decode enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Bits of the command register a guest may change (I/O, memory, master, parity, SERR, INTx
/// disable).
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status register bits that are write-1-to-clear (parity and abort errors).
const STATUS_W1C: u32 = 0xf900;
const STATUS_CAP_LIST: u32 = 1 << 4;

/// The kind of a BAR, fixed by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// An I/O port BAR.
    Io,
    /// A 32-bit memory BAR.
    Mem32 {
        /// Reads have no side effects.
        prefetchable: bool,
    },
    /// A 64-bit memory BAR; it also occupies the next BAR register.
    Mem64 {
        /// Reads have no side effects.
        prefetchable: bool,
    },
}

impl BarKind {
    fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Mem32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Mem64 { prefetchable } => 0x4 | (u32::from(prefetchable) << 3),
        }
    }
}

/// A BAR a device implements: its kind and size (a power of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// I/O, 32-bit or 64-bit memory.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 for memory and 4 for I/O BARs.
    pub size: u64,
}

/// The identity of a function, written into the read-only header fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    /// Class code, subclass and programming interface as one 24-bit value (0x060000 = host
    /// bridge).
    pub class: u32,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// The configuration space of one type-0 function.
#[derive(Clone)]
pub struct PciConfigSpace {
    regs: Box<[u32; NUM_REGS]>,
    writable: Box<[u32; NUM_REGS]>,
    w1c: Box<[u32; NUM_REGS]>,
    bars: [Option<BarSpec>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl std::fmt::Debug for PciConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigSpace")
            .field("vendor", &format_args!("{:#06x}", self.regs[0] & 0xffff))
            .field("device", &format_args!("{:#06x}", self.regs[0] >> 16))
            .field("bars", &self.bars)
            .finish()
    }
}

/// What a configuration write changed, so the owner can react (move BAR mappings, re-register
/// ioeventfds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigWriteEffect {
    /// A BAR register or the decode enables in the command register changed.
    pub bars_changed: bool,
}

impl PciConfigSpace {
    /// A type-0 header with the given ids, no BARs and no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut cs = PciConfigSpace {
            regs: Box::new([0; NUM_REGS]),
            writable: Box::new([0; NUM_REGS]),
            w1c: Box::new([0; NUM_REGS]),
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        };
        cs.regs[0] = u32::from(ids.vendor) | (u32::from(ids.device) << 16);
        cs.writable[COMMAND_REG] = COMMAND_WRITABLE;
        cs.w1c[COMMAND_REG] = STATUS_W1C << 16;
        cs.regs[2] = u32::from(ids.revision) | ((ids.class & 0xff_ffff) << 8);
        // Cache line size and latency timer are plain read/write scratch registers.
        cs.writable[3] = 0x0000_ffff;
        cs.regs[0x2c / 4] = u32::from(ids.subsystem_vendor) | (u32::from(ids.subsystem) << 16);
        // Interrupt line is scratch for the OS; interrupt pin 0: no INTx, MSI-X only.
        cs.writable[0x3c / 4] = 0xff;
        cs
    }

    /// Declares BAR `index`. A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        let is64 = matches!(spec.kind, BarKind::Mem64 { .. });
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        let last = if is64 { index + 1 } else { index };
        if last >= NUM_BARS
            || !spec.size.is_power_of_two()
            || spec.size < min
            || (spec.kind == BarKind::Io && spec.size > 256)
            || (!is64 && spec.size > 1 << 31)
            || self.bars[index].is_some()
            || (is64 && (self.bars[index + 1].is_some() || self.is_upper_half(index + 1)))
            || self.is_upper_half(index)
        {
            return Err(PciError::InvalidBar {
                index,
                size: spec.size,
            });
        }
        self.bars[index] = Some(spec);
        let addr_mask = !(spec.size - 1);
        let low_bits = if spec.kind == BarKind::Io { 0x3 } else { 0xf };
        self.regs[BAR0_REG + index] = spec.kind.type_bits();
        self.writable[BAR0_REG + index] = (addr_mask as u32) & !low_bits;
        if is64 {
            self.regs[BAR0_REG + index + 1] = 0;
            self.writable[BAR0_REG + index + 1] = (addr_mask >> 32) as u32;
        }
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0
            && matches!(
                self.bars[index - 1],
                Some(BarSpec {
                    kind: BarKind::Mem64 { .. },
                    ..
                })
            )
    }

    /// The BARs the device declared, by register index.
    pub fn bars(&self) -> &[Option<BarSpec>; NUM_BARS] {
        &self.bars
    }

    /// The address currently programmed into BAR `index` (whether or not decode is enabled).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bars.get(index).copied().flatten()?;
        let low = self.regs[BAR0_REG + index];
        Some(match spec.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Mem32 { .. } => u64::from(low & !0xf),
            BarKind::Mem64 { .. } => {
                u64::from(low & !0xf) | (u64::from(self.regs[BAR0_REG + index + 1]) << 32)
            }
        })
    }

    /// Programs BAR `index` (as firmware would before the OS boots).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let spec = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .ok_or(PciError::InvalidBar { index, size: 0 })?;
        if addr & (spec.size - 1) != 0 {
            return Err(PciError::MisalignedBar { index, addr });
        }
        let keep = !self.writable[BAR0_REG + index];
        self.regs[BAR0_REG + index] = (self.regs[BAR0_REG + index] & keep) | (addr as u32 & !keep);
        if let BarKind::Mem64 { .. } = spec.kind {
            self.regs[BAR0_REG + index + 1] = (addr >> 32) as u32;
        } else if addr >> 32 != 0 {
            return Err(PciError::MisalignedBar { index, addr });
        }
        Ok(())
    }

    /// The guest-physical (or port) range BAR `index` decodes now: `None` when the BAR does not
    /// exist, its decode is disabled in the command register, or it is unprogrammed (0) or
    /// wraps.
    pub fn decoded_bar(&self, index: usize) -> Option<(u64, u64, BarKind)> {
        let spec = self.bars.get(index).copied().flatten()?;
        let enabled = match spec.kind {
            BarKind::Io => self.command() & COMMAND_IO != 0,
            _ => self.command() & COMMAND_MEMORY != 0,
        };
        let addr = self.bar_address(index)?;
        let end_ok = addr.checked_add(spec.size).is_some();
        let limit_ok = spec.kind != BarKind::Io || addr + spec.size <= 0x1_0000;
        (enabled && addr != 0 && end_ok && limit_ok).then_some((addr, spec.size, spec.kind))
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[COMMAND_REG] as u16
    }

    /// Sets command register bits (as firmware would).
    pub fn enable_command(&mut self, bits: u16) {
        self.regs[COMMAND_REG] |= u32::from(bits);
    }

    /// Appends a capability: `body` is everything after the id and next-pointer bytes;
    /// `writable` (same length as `body`, or empty) says which of its bits the guest may write.
    /// Returns the capability's offset in config space.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciError> {
        let len = body.len() + 2;
        let offset = self.next_cap;
        if offset + len > STD_CONFIG_END || (!writable.is_empty() && writable.len() != body.len()) {
            return Err(PciError::NoCapabilitySpace { id, len });
        }
        self.write_byte_raw(offset, id);
        self.write_byte_raw(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.write_byte_raw(offset + 2 + i, *b);
        }
        for (i, m) in writable.iter().enumerate() {
            let at = offset + 2 + i;
            let shift = (at % 4) * 8;
            self.writable[at / 4] |= u32::from(*m) << shift;
        }
        match self.last_cap {
            Some(prev) => self.write_byte_raw(prev + 1, offset as u8),
            None => self.write_byte_raw(CAP_PTR_OFFSET, offset as u8),
        }
        self.regs[COMMAND_REG] |= STATUS_CAP_LIST << 16;
        self.last_cap = Some(offset);
        self.next_cap = (offset + len + 3) & !3;
        Ok(offset)
    }

    /// Reads the dword register `reg` (offset `reg * 4`); out-of-range registers read as 0.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes at byte `offset` without side effects (bytes past the end read
    /// as 0xff).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i;
            *b = match self.regs.get(at / 4) {
                Some(reg) => (reg >> ((at % 4) * 8)) as u8,
                None => 0xff,
            };
        }
    }

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` of register `reg`, honouring
    /// read-only, writable and write-1-to-clear bits.
    pub fn write_reg(&mut self, reg: usize, offset: usize, data: &[u8]) -> ConfigWriteEffect {
        if reg >= NUM_REGS || offset + data.len() > 4 || data.is_empty() {
            return ConfigWriteEffect::default();
        }
        let mut value = [0u8; 4];
        let mut byte_mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            value[offset + i] = *b;
            byte_mask |= 0xff << ((offset + i) * 8);
        }
        let value = u32::from_le_bytes(value);
        let old = self.regs[reg];
        let wmask = self.writable[reg] & byte_mask;
        let mut new = (old & !wmask) | (value & wmask);
        new &= !(value & self.w1c[reg] & byte_mask);
        self.regs[reg] = new;
        let is_bar = (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg);
        let decode = u32::from(COMMAND_IO | COMMAND_MEMORY);
        let bars_changed =
            (is_bar && old != new) || (reg == COMMAND_REG && (old ^ new) & decode != 0);
        ConfigWriteEffect { bars_changed }
    }

    /// Device-side write of one byte, bypassing the guest masks.
    pub fn write_byte_raw(&mut self, offset: usize, value: u8) {
        if offset < CONFIG_SPACE_SIZE {
            let shift = (offset % 4) * 8;
            let reg = &mut self.regs[offset / 4];
            *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
        }
    }

    /// Device-side write of a little-endian u16, bypassing the guest masks.
    pub fn write_u16_raw(&mut self, offset: usize, value: u16) {
        let [a, b] = value.to_le_bytes();
        self.write_byte_raw(offset, a);
        self.write_byte_raw(offset + 1, b);
    }

    /// Device-side read of a little-endian u16.
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }
}

/// Walks the capability list of `cs`, returning (offset, id) pairs; stops on loops.
pub fn capabilities(cs: &PciConfigSpace) -> Vec<(usize, u8)> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    cs.read(CAP_PTR_OFFSET, &mut b);
    let mut at = usize::from(b[0] & !3);
    while at >= FIRST_CAP_OFFSET && out.len() < 48 {
        cs.read(at, &mut b);
        let id = b[0];
        out.push((at, id));
        cs.read(at + 1, &mut b);
        at = usize::from(b[0] & !3);
    }
    out
}
