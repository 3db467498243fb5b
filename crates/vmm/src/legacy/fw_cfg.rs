//! The QEMU firmware configuration device (fw_cfg) at ports 0x510–0x51B, so that unmodified
//! OVMF and SeaBIOS builds (Debian's) find the VM's configuration where they look for it: CPU
//! count, RAM size, the e820 map, the boot order and the boot-menu timeout, and later the ACPI
//! tables. Without it OVMF falls back to CMOS guesses and installs no ACPI tables at all.
//!
//! Interface (QEMU's `docs/specs/fw_cfg.rst`, x86 port layout):
//! - 0x510 (offset 0): selector, a 16-bit little-endian write. Selecting resets the data offset.
//!   Bit 14 (the old "write" flag) is ignored when looking an item up.
//! - 0x511 (offset 1): data; each byte read returns the next byte of the selected item, 0 once
//!   past its end. A read of n bytes returns the next n: that is also what a `rep insb` needs,
//!   which KVM reports as one exit carrying count × 1 bytes. Writes are ignored (the spec drops
//!   data-port writes since QEMU 2.4).
//! - 0x514 (offsets 4–11): DMA address, big-endian: the high 32 bits at 0x514, then the low 32
//!   bits at 0x518, whose write starts the transfer; or one 64-bit write at 0x514. The address
//!   names a `FWCfgDmaAccess` in guest RAM: {be32 control, be32 length, be64 address}. Reading
//!   these ports returns the bytes of `"QEMU CFG"` in order (the value 0x51454d5520434647
//!   read big-endian), which is how a driver detects DMA.
//!
//! DMA control bits: error 0x01, read 0x02, skip 0x04, select 0x08 (item in the upper 16 bits,
//! done first), write 0x10. Read wins over write, write over skip. Every item here is
//! read-only, so a write request fails with the error bit. A read past the end of the item
//! copies what is left and zero-fills the rest of the buffer, as QEMU does. When done the
//! device writes the control word back as 0, or as 0x01 on error: a descriptor or buffer that
//! is not entirely in guest RAM, or an address range that wraps. Guest-provided lengths are
//! never used to size an allocation (the zero fill goes out in fixed-size chunks, after the
//! whole buffer range has been checked against guest memory).
//!
//! DMA needs guest memory ([`FwCfg::with_memory`]); without it the ID item advertises the
//! port interface only and the DMA ports read 0 and ignore writes.
//!
//! Not wired yet: nothing calls [`FwCfg`] from [`super::install`] or the boot path. The
//! firmware boot mode (issue #11) will build one, fill it ([`FwCfg::set_cpus`],
//! [`FwCfg::add_e820`], ...) and put it on the port bus at [`PORT_BASE`].

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::boot::GuestMem;
use crate::bus::BusDevice;

/// First port of the device (the selector); the data port is `PORT_BASE + 1`, the DMA
/// address `PORT_BASE + 4`.
pub const PORT_BASE: u16 = 0x510;
/// Ports the device decodes: selector, data, two unused, then the 8-byte DMA address.
pub const PORT_LEN: u64 = 12;

/// Selector keys with a fixed meaning.
pub mod keys {
    /// `"QEMU"`.
    pub const SIGNATURE: u16 = 0x0000;
    /// le32 feature bits ([`super::FEATURE_TRADITIONAL`], [`super::FEATURE_DMA`]).
    pub const ID: u16 = 0x0001;
    /// le64 RAM size in bytes.
    pub const RAM_SIZE: u16 = 0x0003;
    /// le16, 1 when the VM has no display.
    pub const NOGRAPHIC: u16 = 0x0004;
    /// le16 number of vCPUs present at boot (SeaBIOS waits for that many to answer).
    pub const NB_CPUS: u16 = 0x0005;
    /// le16, 1 to offer the firmware's boot menu.
    pub const BOOT_MENU: u16 = 0x000e;
    /// le16 highest possible number of vCPUs.
    pub const MAX_CPUS: u16 = 0x000f;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x0019;
    /// Selector of the first file; files take selectors from here up to 0x3fff.
    pub const FILE_FIRST: u16 = 0x0020;
}

/// ID bit 0: the selector/data port interface (always set).
pub const FEATURE_TRADITIONAL: u32 = 0x01;
/// ID bit 1: the DMA interface.
pub const FEATURE_DMA: u32 = 0x02;

/// DMA control: the transfer failed.
pub const DMA_ERROR: u32 = 0x01;
/// DMA control: copy `length` bytes of the item to guest memory.
pub const DMA_READ: u32 = 0x02;
/// DMA control: advance the data offset by `length`.
pub const DMA_SKIP: u32 = 0x04;
/// DMA control: select the item in the upper 16 bits first.
pub const DMA_SELECT: u32 = 0x08;
/// DMA control: copy guest memory into the item (refused: items are read-only).
pub const DMA_WRITE: u32 = 0x10;

/// What the DMA address ports read as.
pub const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";

/// Longest file name, without the terminating NUL (the directory entry has 56 bytes).
pub const MAX_NAME_LEN: usize = 55;
/// Largest item: the directory records sizes as be32.
pub const MAX_ITEM_LEN: usize = u32::MAX as usize;

/// e820 type of usable RAM, for [`FwCfg::add_e820`].
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The selector's write flag, ignored on lookup.
const KEY_WRITE_FLAG: u16 = 0x4000;
/// Files live below this selector.
const FILE_END: u16 = 0x4000;
/// Size of a `FWCfgDmaAccess`.
const DMA_DESC_LEN: u64 = 16;
/// Chunk for the zero fill of a read past the end of an item.
const ZERO_CHUNK: usize = 4096;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// A configuration the builder refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// File names must not be empty.
    #[error("fw_cfg file name is empty")]
    EmptyName,
    /// The name does not fit a directory entry.
    #[error("fw_cfg file name {0:?} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong(String),
    /// The name would be cut short in the directory.
    #[error("fw_cfg file name {0:?} contains a NUL byte")]
    NulInName(String),
    /// A file of that name exists.
    #[error("fw_cfg file {0:?} already exists")]
    DuplicateFile(String),
    /// Every file selector is taken.
    #[error("fw_cfg has no file selector left for {0:?}")]
    TooManyFiles(String),
    /// The key is generated by the device, belongs to the file range or has the write flag.
    #[error("fw_cfg key {0:#06x} is reserved")]
    ReservedKey(u16),
    /// The item's size does not fit the directory's be32.
    #[error("fw_cfg item of {0} bytes is too large")]
    TooLarge(usize),
    /// A boot order needs at least one device path.
    #[error("fw_cfg boot order is empty")]
    EmptyBootOrder,
    /// A device path would break the newline-separated list.
    #[error("fw_cfg boot device path {0:?} is empty or contains a newline or NUL")]
    BadBootPath(String),
}

/// The fw_cfg device: items by selector, the file directory, the guest's cursor and DMA latch.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    /// File name → selector; iterates in the directory's (byte-wise name) order.
    files: BTreeMap<String, u16>,
    /// The directory item is out of date (rebuilt when selected, not on every `add_file`).
    dir_stale: bool,
    mem: Option<GuestMem>,
    selector: u16,
    offset: usize,
    dma_high: u32,
}

impl Default for FwCfg {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FwCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FwCfg")
            .field("items", &self.items.keys().collect::<Vec<_>>())
            .field("files", &self.files)
            .field("dma", &self.mem.is_some())
            .field("selector", &self.selector)
            .field("offset", &self.offset)
            .finish()
    }
}

impl FwCfg {
    /// A device with the signature, the ID (port interface only until memory is attached) and
    /// an empty file directory.
    pub fn new() -> Self {
        let mut d = FwCfg {
            items: BTreeMap::new(),
            files: BTreeMap::new(),
            dir_stale: false,
            mem: None,
            selector: keys::SIGNATURE,
            offset: 0,
            dma_high: 0,
        };
        d.items.insert(keys::SIGNATURE, b"QEMU".to_vec());
        d.update_id();
        d.update_dir();
        d
    }

    /// Gives the device guest memory, which enables the DMA interface.
    pub fn with_memory(mut self, mem: GuestMem) -> Self {
        self.set_memory(mem);
        self
    }

    /// Gives the device guest memory, which enables the DMA interface.
    pub fn set_memory(&mut self, mem: GuestMem) {
        self.mem = Some(mem);
        self.update_id();
    }

    /// Sets (or replaces) the item at `key`. The signature, ID and directory are generated,
    /// files go through [`FwCfg::add_file`], and keys with the write flag (bit 14) alias
    /// other keys: all refused.
    pub fn add_item(&mut self, key: u16, bytes: impl Into<Vec<u8>>) -> Result<(), FwCfgError> {
        let reserved = key & KEY_WRITE_FLAG != 0
            || matches!(key, keys::SIGNATURE | keys::ID | keys::FILE_DIR)
            || (keys::FILE_FIRST..FILE_END).contains(&key);
        if reserved {
            return Err(FwCfgError::ReservedKey(key));
        }
        let bytes = bytes.into();
        if bytes.len() > MAX_ITEM_LEN {
            return Err(FwCfgError::TooLarge(bytes.len()));
        }
        self.items.insert(key, bytes);
        Ok(())
    }

    /// Adds a named file and returns its selector (0x0020 up, in the order of the calls; the
    /// directory lists files sorted by name). Names are 1–55 bytes, without NUL, unique.
    pub fn add_file(&mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Result<u16, FwCfgError> {
        if name.is_empty() {
            return Err(FwCfgError::EmptyName);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(FwCfgError::NameTooLong(name.to_owned()));
        }
        if name.contains('\0') {
            return Err(FwCfgError::NulInName(name.to_owned()));
        }
        if self.files.contains_key(name) {
            return Err(FwCfgError::DuplicateFile(name.to_owned()));
        }
        let selector = u16::try_from(self.files.len())
            .ok()
            .and_then(|n| keys::FILE_FIRST.checked_add(n))
            .filter(|&s| s < FILE_END)
            .ok_or_else(|| FwCfgError::TooManyFiles(name.to_owned()))?;
        let bytes = bytes.into();
        if bytes.len() > MAX_ITEM_LEN {
            return Err(FwCfgError::TooLarge(bytes.len()));
        }
        self.items.insert(selector, bytes);
        self.files.insert(name.to_owned(), selector);
        self.dir_stale = true;
        if self.selector & !KEY_WRITE_FLAG == keys::FILE_DIR {
            self.update_dir();
        }
        Ok(selector)
    }

    /// The selector of the file `name`.
    pub fn file_selector(&self, name: &str) -> Option<u16> {
        self.files.get(name).copied()
    }

    /// NB_CPUS (vCPUs at boot) and MAX_CPUS (possible vCPUs), both le16.
    pub fn set_cpus(&mut self, boot: u16, max: u16) {
        self.items
            .insert(keys::NB_CPUS, boot.to_le_bytes().to_vec());
        self.items
            .insert(keys::MAX_CPUS, max.to_le_bytes().to_vec());
    }

    /// RAM_SIZE in bytes, le64.
    pub fn set_ram_size(&mut self, bytes: u64) {
        self.items
            .insert(keys::RAM_SIZE, bytes.to_le_bytes().to_vec());
    }

    /// NOGRAPHIC, le16: true when the VM has no display.
    pub fn set_nographic(&mut self, on: bool) {
        self.items
            .insert(keys::NOGRAPHIC, u16::from(on).to_le_bytes().to_vec());
    }

    /// BOOT_MENU, le16: true to offer the firmware's boot menu (see also
    /// [`FwCfg::add_boot_menu_wait`]).
    pub fn set_boot_menu(&mut self, on: bool) {
        self.items
            .insert(keys::BOOT_MENU, u16::from(on).to_le_bytes().to_vec());
    }

    /// `etc/e820`: packed entries {le64 address, le64 length, le32 type}.
    pub fn add_e820(&mut self, entries: &[(u64, u64, u32)]) -> Result<u16, FwCfgError> {
        self.add_file("etc/e820", e820_bytes(entries))
    }

    /// `bootorder`: OpenFirmware device paths separated by newlines, NUL-terminated. Each
    /// path must be non-empty and contain no newline or NUL.
    pub fn add_bootorder<S: AsRef<str>>(&mut self, paths: &[S]) -> Result<u16, FwCfgError> {
        let bytes = bootorder_bytes(paths)?;
        self.add_file("bootorder", bytes)
    }

    /// `etc/boot-menu-wait`: how long the boot menu waits, le16 milliseconds.
    pub fn add_boot_menu_wait(&mut self, ms: u16) -> Result<u16, FwCfgError> {
        self.add_file("etc/boot-menu-wait", ms.to_le_bytes().to_vec())
    }

    /// Platform reset: the signature selected, offset 0, DMA latch clear. Items are kept.
    pub fn reset(&mut self) {
        self.select(keys::SIGNATURE);
        self.dma_high = 0;
    }

    fn update_id(&mut self) {
        let mut id = FEATURE_TRADITIONAL;
        if self.mem.is_some() {
            id |= FEATURE_DMA;
        }
        self.items.insert(keys::ID, id.to_le_bytes().to_vec());
    }

    /// Rebuilds the directory item: be32 count, then per file (sorted by name) be32 size, be16
    /// selector, be16 reserved, 56-byte NUL-padded name.
    fn update_dir(&mut self) {
        let mut dir = Vec::with_capacity(4 + 64 * self.files.len());
        // add_file keeps the count below 0x4000.
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (fname, &selector) in &self.files {
            let size = self.items.get(&selector).map_or(0, Vec::len);
            // add_file keeps every file within MAX_ITEM_LEN = u32::MAX.
            dir.extend_from_slice(&(size as u32).to_be_bytes());
            dir.extend_from_slice(&selector.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut name = [0u8; MAX_NAME_LEN + 1];
            name[..fname.len()].copy_from_slice(fname.as_bytes());
            dir.extend_from_slice(&name);
        }
        self.items.insert(keys::FILE_DIR, dir);
        self.dir_stale = false;
    }

    fn select(&mut self, key: u16) {
        self.selector = key;
        self.offset = 0;
        if self.dir_stale && key & !KEY_WRITE_FLAG == keys::FILE_DIR {
            self.update_dir();
        }
    }

    /// The selected item's bytes; an unknown selector is an empty item.
    fn current(&self) -> &[u8] {
        self.items
            .get(&(self.selector & !KEY_WRITE_FLAG))
            .map_or(&[], Vec::as_slice)
    }

    /// Port-I/O data read: the next bytes of the item, 0 past its end.
    fn read_data(&mut self, data: &mut [u8]) {
        let item = self.current();
        let start = self.offset.min(item.len());
        let n = data.len().min(item.len() - start);
        data[..n].copy_from_slice(&item[start..start + n]);
        data[n..].fill(0);
        self.offset += n;
    }

    /// Runs the transfer described at `desc` and writes its status back.
    fn dma(&mut self, desc: u64) {
        // Take the memory out so the transfer can borrow it while it moves the cursor.
        let Some(mem) = self.mem.take() else {
            return;
        };
        let control = match self.dma_transfer(&mem, desc) {
            Ok(()) => 0,
            Err(()) => DMA_ERROR,
        };
        // A descriptor outside guest memory cannot take its status either; nothing to do then.
        if desc.checked_add(DMA_DESC_LEN).is_some() {
            let _ = mem.write_slice(&control.to_be_bytes(), GuestAddress(desc));
        }
        self.mem = Some(mem);
    }

    fn dma_transfer(&mut self, mem: &GuestMem, desc: u64) -> Result<(), ()> {
        desc.checked_add(DMA_DESC_LEN).ok_or(())?;
        let mut raw = [0u8; DMA_DESC_LEN as usize];
        mem.read_slice(&mut raw, GuestAddress(desc))
            .map_err(|_| ())?;
        let control = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let length = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&raw[8..16]);
        let address = u64::from_be_bytes(addr);

        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        if control & DMA_READ != 0 {
            self.dma_read(mem, address, length)
        } else if control & DMA_WRITE != 0 {
            Err(())
        } else if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(length as usize);
            Ok(())
        } else {
            Ok(())
        }
    }

    /// Copies `length` bytes from the cursor to guest `address`, zero-filling past the item's
    /// end. The whole buffer is checked first: on error neither memory nor the cursor changes.
    fn dma_read(&mut self, mem: &GuestMem, address: u64, length: u32) -> Result<(), ()> {
        if length == 0 {
            return Ok(());
        }
        let len = length as usize;
        address.checked_add(u64::from(length)).ok_or(())?;
        if !GuestMemory::check_range(mem, GuestAddress(address), len, Permissions::Write) {
            return Err(());
        }
        let item = self.current();
        let start = self.offset.min(item.len());
        let n = len.min(item.len() - start);
        mem.write_slice(&item[start..start + n], GuestAddress(address))
            .map_err(|_| ())?;
        let mut done = n;
        while done < len {
            let chunk = (len - done).min(ZERO_CHUNK);
            mem.write_slice(&ZEROS[..chunk], GuestAddress(address + done as u64))
                .map_err(|_| ())?;
            done += chunk;
        }
        self.offset += n;
        Ok(())
    }
}

/// The bytes of `etc/e820` for `(address, length, type)` entries.
pub fn e820_bytes(entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 * entries.len());
    for &(addr, len, kind) in entries {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
    }
    v
}

/// The bytes of `bootorder`: the paths joined by newlines, then a NUL.
pub fn bootorder_bytes<S: AsRef<str>>(paths: &[S]) -> Result<Vec<u8>, FwCfgError> {
    if paths.is_empty() {
        return Err(FwCfgError::EmptyBootOrder);
    }
    let mut v = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let p = p.as_ref();
        if p.is_empty() || p.contains(['\n', '\0']) {
            return Err(FwCfgError::BadBootPath(p.to_owned()));
        }
        if i > 0 {
            v.push(b'\n');
        }
        v.extend_from_slice(p.as_bytes());
    }
    v.push(0);
    Ok(v)
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 => self.read_data(data),
            4..=11 if self.mem.is_some() => {
                let start = (offset - 4) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = DMA_SIGNATURE.get(start + i).copied().unwrap_or(0);
                }
            }
            // The selector is write-only; 0x512–0x513 are unused.
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (4, 4) => self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            (8, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let desc = (u64::from(self.dma_high) << 32) | u64::from(low);
                // The register reads as 0 after an operation: a later 32-bit-only user
                // must not inherit this high half.
                self.dma_high = 0;
                self.dma(desc);
            }
            (4, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                self.dma_high = 0;
                self.dma(u64::from_be_bytes(b));
            }
            // Data-port writes are ignored (read-only items), as are other widths.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestMemoryMmap;

    const MEM: usize = 0x10000;

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn select(d: &mut FwCfg, key: u16) {
        d.write(0, &key.to_le_bytes());
    }

    /// `n` bytes through the data port, one `inb` at a time.
    fn read_port(d: &mut FwCfg, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0xffu8];
                d.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    /// Writes a descriptor at `at` and triggers it with two 32-bit writes, high then low.
    fn dma(d: &mut FwCfg, m: &GuestMem, at: u64, control: u32, length: u32, address: u64) -> u32 {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&control.to_be_bytes());
        raw[4..8].copy_from_slice(&length.to_be_bytes());
        raw[8..16].copy_from_slice(&address.to_be_bytes());
        m.write_slice(&raw, GuestAddress(at)).unwrap();
        d.write(4, &((at >> 32) as u32).to_be_bytes());
        d.write(8, &(at as u32).to_be_bytes());
        control_at(m, at)
    }

    fn control_at(m: &GuestMem, at: u64) -> u32 {
        let mut c = [0u8; 4];
        m.read_slice(&mut c, GuestAddress(at)).unwrap();
        u32::from_be_bytes(c)
    }

    fn guest(m: &GuestMem, at: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        m.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    /// Parses the directory into (size, selector, name).
    fn parse_dir(dir: &[u8]) -> Vec<(u32, u16, String)> {
        let count = u32::from_be_bytes(dir[0..4].try_into().unwrap()) as usize;
        assert_eq!(dir.len(), 4 + 64 * count);
        (0..count)
            .map(|i| {
                let e = &dir[4 + 64 * i..4 + 64 * (i + 1)];
                let size = u32::from_be_bytes(e[0..4].try_into().unwrap());
                let sel = u16::from_be_bytes(e[4..6].try_into().unwrap());
                assert_eq!(&e[6..8], &[0, 0]);
                let name = &e[8..64];
                let end = name.iter().position(|&b| b == 0).unwrap();
                assert!(name[end..].iter().all(|&b| b == 0));
                (size, sel, String::from_utf8(name[..end].to_vec()).unwrap())
            })
            .collect()
    }

    #[test]
    fn port_signature_and_id() {
        let mut d = FwCfg::new();
        // Selected at start and after reset.
        assert_eq!(read_port(&mut d, 4), b"QEMU");
        select(&mut d, keys::SIGNATURE);
        assert_eq!(read_port(&mut d, 6), b"QEMU\0\0");
        select(&mut d, keys::ID);
        assert_eq!(read_port(&mut d, 4), [1, 0, 0, 0]);
        let mut d = d.with_memory(mem());
        select(&mut d, keys::ID);
        assert_eq!(read_port(&mut d, 4), [3, 0, 0, 0]);
        d.reset();
        assert_eq!(read_port(&mut d, 4), b"QEMU");
        // The write flag aliases the plain key.
        select(&mut d, keys::ID | 0x4000);
        assert_eq!(read_port(&mut d, 1), [3]);
        // Unknown selectors are empty items.
        select(&mut d, 0x1234);
        assert_eq!(read_port(&mut d, 3), [0, 0, 0]);
        // Wider data reads return the next bytes in order.
        select(&mut d, keys::SIGNATURE);
        let mut b = [0u8; 2];
        d.read(1, &mut b);
        assert_eq!(&b, b"QE");
        d.read(1, &mut b);
        assert_eq!(&b, b"MU");
        // A `rep insb` exit: many bytes at once, zero past the end.
        select(&mut d, keys::ID);
        let mut rep = [0xffu8; 64];
        d.read(1, &mut rep);
        assert_eq!(rep[..4], [3, 0, 0, 0]);
        assert!(rep[4..].iter().all(|&b| b == 0));
    }

    #[test]
    fn numeric_items() {
        let mut d = FwCfg::new();
        d.set_cpus(2, 8);
        d.set_ram_size(0x4000_0000);
        d.set_nographic(true);
        d.set_boot_menu(false);
        select(&mut d, keys::NB_CPUS);
        assert_eq!(read_port(&mut d, 2), [2, 0]);
        select(&mut d, keys::MAX_CPUS);
        assert_eq!(read_port(&mut d, 2), [8, 0]);
        select(&mut d, keys::RAM_SIZE);
        assert_eq!(read_port(&mut d, 8), 0x4000_0000u64.to_le_bytes());
        select(&mut d, keys::NOGRAPHIC);
        assert_eq!(read_port(&mut d, 2), [1, 0]);
        select(&mut d, keys::BOOT_MENU);
        assert_eq!(read_port(&mut d, 2), [0, 0]);
        d.add_item(0x8000, vec![7, 7]).unwrap();
        select(&mut d, 0x8000);
        assert_eq!(read_port(&mut d, 3), [7, 7, 0]);
    }

    #[test]
    fn reserved_keys_refused() {
        let mut d = FwCfg::new();
        for k in [
            keys::SIGNATURE,
            keys::ID,
            keys::FILE_DIR,
            0x0020,
            0x3fff,
            0x4005,
            0xc000,
        ] {
            assert_eq!(d.add_item(k, vec![1]), Err(FwCfgError::ReservedKey(k)));
        }
        assert_eq!(d.add_item(keys::NB_CPUS, vec![1, 0]), Ok(()));
    }

    #[test]
    fn port_file_dir_sorted() {
        let mut d = FwCfg::new();
        select(&mut d, keys::FILE_DIR);
        assert_eq!(read_port(&mut d, 4), [0, 0, 0, 0]);
        assert_eq!(d.add_file("etc/e820", vec![1; 40]), Ok(0x20));
        assert_eq!(
            d.add_file("bootorder", b"/pci@i0cf8/x\0".to_vec()),
            Ok(0x21)
        );
        assert_eq!(d.add_file("etc/boot-menu-wait", vec![0, 0]), Ok(0x22));
        assert_eq!(d.add_file("etc/acpi/rsdp", vec![]), Ok(0x23));
        select(&mut d, keys::FILE_DIR);
        let dir = read_port(&mut d, 4 + 64 * 4);
        assert_eq!(
            parse_dir(&dir),
            [
                (13, 0x21, "bootorder".to_owned()),
                (0, 0x23, "etc/acpi/rsdp".to_owned()),
                (2, 0x22, "etc/boot-menu-wait".to_owned()),
                (40, 0x20, "etc/e820".to_owned()),
            ]
        );
        assert_eq!(read_port(&mut d, 1), [0], "past the end reads 0");
        assert_eq!(d.file_selector("etc/boot-menu-wait"), Some(0x22));
        assert_eq!(d.file_selector("nope"), None);
        select(&mut d, 0x21);
        assert_eq!(read_port(&mut d, 13), b"/pci@i0cf8/x\0");
    }

    #[test]
    fn bad_file_names_refused() {
        let mut d = FwCfg::new();
        let long = "x".repeat(56);
        let max = "y".repeat(55);
        assert_eq!(d.add_file("", vec![]), Err(FwCfgError::EmptyName));
        assert_eq!(
            d.add_file(&long, vec![]),
            Err(FwCfgError::NameTooLong(long.clone()))
        );
        assert_eq!(
            d.add_file("a\0b", vec![]),
            Err(FwCfgError::NulInName("a\0b".into()))
        );
        assert_eq!(d.add_file(&max, vec![9]), Ok(0x20));
        assert_eq!(
            d.add_file(&max, vec![]),
            Err(FwCfgError::DuplicateFile(max.clone()))
        );
        assert_eq!(d.add_file("z", vec![]), Ok(0x21));
        select(&mut d, keys::FILE_DIR);
        let dir = parse_dir(&read_port(&mut d, 4 + 128));
        assert_eq!(dir[0], (1, 0x20, max));
        assert_eq!(dir[1], (0, 0x21, "z".to_owned()));
    }

    #[test]
    fn file_selectors_run_out() {
        let mut d = FwCfg::new();
        for i in 0..(0x4000 - 0x20) {
            d.add_file(&format!("f{i}"), vec![]).unwrap();
        }
        assert_eq!(
            d.add_file("last", vec![]),
            Err(FwCfgError::TooManyFiles("last".into()))
        );
        select(&mut d, keys::FILE_DIR);
        assert_eq!(read_port(&mut d, 4), 0x3fe0u32.to_be_bytes());
    }

    #[test]
    fn helpers_build_the_expected_files() {
        let mut d = FwCfg::new();
        let e = d
            .add_e820(&[(0, 0x9fc00, E820_RAM), (0xe0000, 0x20000, E820_RESERVED)])
            .unwrap();
        let b = d
            .add_bootorder(&["/pci@i0cf8/scsi@3/disk@0,0", "HALT"])
            .unwrap();
        let w = d.add_boot_menu_wait(2500).unwrap();
        select(&mut d, e);
        let raw = read_port(&mut d, 41);
        assert_eq!(&raw[0..8], &0u64.to_le_bytes());
        assert_eq!(&raw[8..16], &0x9fc00u64.to_le_bytes());
        assert_eq!(&raw[16..20], &1u32.to_le_bytes());
        assert_eq!(&raw[20..28], &0xe0000u64.to_le_bytes());
        assert_eq!(&raw[28..36], &0x20000u64.to_le_bytes());
        assert_eq!(&raw[36..40], &2u32.to_le_bytes());
        assert_eq!(raw[40], 0);
        select(&mut d, b);
        assert_eq!(read_port(&mut d, 32), b"/pci@i0cf8/scsi@3/disk@0,0\nHALT\0");
        select(&mut d, w);
        assert_eq!(read_port(&mut d, 2), 2500u16.to_le_bytes());
        assert_eq!(
            bootorder_bytes::<&str>(&[]),
            Err(FwCfgError::EmptyBootOrder)
        );
        assert_eq!(
            bootorder_bytes(&["a\nb"]),
            Err(FwCfgError::BadBootPath("a\nb".into()))
        );
        assert_eq!(
            bootorder_bytes(&[""]),
            Err(FwCfgError::BadBootPath("".into()))
        );
    }

    #[test]
    fn dma_signature() {
        let mut d = FwCfg::new();
        let mut b = [0u8; 4];
        d.read(4, &mut b);
        assert_eq!(b, [0; 4], "no DMA without memory");
        let mut d = d.with_memory(mem());
        d.read(4, &mut b);
        assert_eq!(&b, b"QEMU");
        d.read(8, &mut b);
        assert_eq!(&b, b" CFG");
        let mut q = [0u8; 8];
        d.read(4, &mut q);
        assert_eq!(u64::from_be_bytes(q), 0x5145_4d55_2043_4647);
        let mut one = [0u8];
        d.read(11, &mut one);
        assert_eq!(&one, b"G");
    }

    #[test]
    fn dma_read_file() {
        let m = mem();
        let mut d = FwCfg::new().with_memory(m.clone());
        let data: Vec<u8> = (0..200u8).collect();
        let sel = d.add_file("etc/test", data.clone()).unwrap();
        select(&mut d, sel);
        assert_eq!(dma(&mut d, &m, 0x1000, DMA_READ, 100, 0x2000), 0);
        assert_eq!(guest(&m, 0x2000, 100), &data[..100]);
        // The cursor moved: the next read continues.
        assert_eq!(dma(&mut d, &m, 0x1000, DMA_READ, 100, 0x3000), 0);
        assert_eq!(guest(&m, 0x3000, 100), &data[100..]);
        // The port cursor is the same cursor.
        assert_eq!(read_port(&mut d, 1), [0]);
    }

    #[test]
    fn dma_select_and_read_in_one() {
        let m = mem();
        let mut d = FwCfg::new().with_memory(m.clone());
        d.add_file("a", b"first".to_vec()).unwrap();
        let sel = d.add_file("b", b"second".to_vec()).unwrap();
        let ctl = (u32::from(sel) << 16) | DMA_SELECT | DMA_READ;
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 6, 0x2000), 0);
        assert_eq!(guest(&m, 0x2000, 6), b"second");
        // Directory through DMA, the way OVMF reads it: count first, then entries.
        let ctl = (u32::from(keys::FILE_DIR) << 16) | DMA_SELECT | DMA_READ;
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 4, 0x2000), 0);
        assert_eq!(guest(&m, 0x2000, 4), [0, 0, 0, 2]);
        assert_eq!(dma(&mut d, &m, 0x1000, DMA_READ, 128, 0x2000), 0);
        let mut dir = vec![0, 0, 0, 2];
        dir.extend(guest(&m, 0x2000, 128));
        let names: Vec<_> = parse_dir(&dir).into_iter().map(|e| e.2).collect();
        assert_eq!(names, ["a", "b"]);
        // A 64-bit write at 0x514 triggers too.
        let ctl = (u32::from(keys::SIGNATURE) << 16) | DMA_SELECT | DMA_READ;
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&ctl.to_be_bytes());
        raw[4..8].copy_from_slice(&4u32.to_be_bytes());
        raw[8..16].copy_from_slice(&0x3000u64.to_be_bytes());
        m.write_slice(&raw, GuestAddress(0x1800)).unwrap();
        d.write(4, &0x1800u64.to_be_bytes());
        assert_eq!(control_at(&m, 0x1800), 0);
        assert_eq!(guest(&m, 0x3000, 4), b"QEMU");
    }

    #[test]
    fn dma_low_half_alone_after_a_high_half() {
        let m = mem();
        let mut d = FwCfg::new().with_memory(m.clone());
        // A transfer with a high half outside memory fails and clears the latch ...
        d.write(4, &1u32.to_be_bytes());
        d.write(8, &0x1000u32.to_be_bytes());
        // ... so a 32-bit-only user is not affected by it.
        let ctl = (u32::from(keys::SIGNATURE) << 16) | DMA_SELECT | DMA_READ;
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&ctl.to_be_bytes());
        raw[4..8].copy_from_slice(&4u32.to_be_bytes());
        raw[8..16].copy_from_slice(&0x2000u64.to_be_bytes());
        m.write_slice(&raw, GuestAddress(0x1000)).unwrap();
        d.write(8, &0x1000u32.to_be_bytes());
        assert_eq!(control_at(&m, 0x1000), 0);
        assert_eq!(guest(&m, 0x2000, 4), b"QEMU");
    }

    #[test]
    fn dma_skip() {
        let m = mem();
        let mut d = FwCfg::new().with_memory(m.clone());
        let sel = d.add_file("etc/test", b"0123456789".to_vec()).unwrap();
        let ctl = (u32::from(sel) << 16) | DMA_SELECT | DMA_SKIP;
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 4, 0), 0);
        assert_eq!(dma(&mut d, &m, 0x1000, DMA_READ, 3, 0x2000), 0);
        assert_eq!(guest(&m, 0x2000, 3), b"456");
        assert_eq!(read_port(&mut d, 1), b"7");
        // Skipping far past the end is fine and leaves only zeros.
        assert_eq!(dma(&mut d, &m, 0x1000, DMA_SKIP, u32::MAX, 0), 0);
        assert_eq!(read_port(&mut d, 2), [0, 0]);
        // No operation bit: nothing happens, success.
        assert_eq!(dma(&mut d, &m, 0x1000, 0, 100, 0x2000), 0);
    }

    #[test]
    fn dma_read_past_end_zero_fills() {
        let m = mem();
        let mut d = FwCfg::new().with_memory(m.clone());
        let sel = d.add_file("etc/test", b"abc".to_vec()).unwrap();
        m.write_slice(&[0xaa; 10000], GuestAddress(0x2000)).unwrap();
        let ctl = (u32::from(sel) << 16) | DMA_SELECT | DMA_READ;
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 9000, 0x2000), 0);
        let got = guest(&m, 0x2000, 10000);
        assert_eq!(&got[..3], b"abc");
        assert!(got[3..9000].iter().all(|&b| b == 0));
        assert!(
            got[9000..].iter().all(|&b| b == 0xaa),
            "wrote beyond length"
        );
        // An unknown item reads as all zeros.
        let ctl = (0x0777 << 16) | DMA_SELECT | DMA_READ;
        m.write_slice(&[0xaa; 8], GuestAddress(0x2000)).unwrap();
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 8, 0x2000), 0);
        assert_eq!(guest(&m, 0x2000, 8), [0; 8]);
    }

    #[test]
    fn dma_out_of_memory_sets_error() {
        let m = mem();
        let mut d = FwCfg::new().with_memory(m.clone());
        let ctl = (u32::from(keys::SIGNATURE) << 16) | DMA_SELECT | DMA_READ;
        // Buffer outside memory, straddling its end, wrapping the address space.
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 4, MEM as u64), DMA_ERROR);
        m.write_slice(&[0xaa; 2], GuestAddress(MEM as u64 - 2))
            .unwrap();
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 4, MEM as u64 - 2), DMA_ERROR);
        assert_eq!(guest(&m, MEM as u64 - 2, 2), [0xaa, 0xaa], "partial write");
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 4, u64::MAX - 1), DMA_ERROR);
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, u32::MAX, 0x2000), DMA_ERROR);
        // Descriptor outside memory, straddling its end, at the top of the address space:
        // nothing to write the status to, and no panic.
        for at in [MEM as u64, MEM as u64 - 8, u64::MAX - 7, u64::MAX] {
            d.write(4, &((at >> 32) as u32).to_be_bytes());
            d.write(8, &(at as u32).to_be_bytes());
            d.write(4, &at.to_be_bytes());
        }
        // Still works afterwards.
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 4, 0x2000), 0);
        assert_eq!(guest(&m, 0x2000, 4), b"QEMU");
    }

    #[test]
    fn dma_write_refused() {
        let m = mem();
        let mut d = FwCfg::new().with_memory(m.clone());
        let sel = d.add_file("etc/ramfb", vec![0; 28]).unwrap();
        m.write_slice(&[0x55; 28], GuestAddress(0x2000)).unwrap();
        let ctl = (u32::from(sel) << 16) | DMA_SELECT | DMA_WRITE;
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 28, 0x2000), DMA_ERROR);
        select(&mut d, sel);
        assert_eq!(read_port(&mut d, 28), [0; 28]);
        // Read wins when both are set, as in QEMU.
        let ctl = (u32::from(sel) << 16) | DMA_SELECT | DMA_READ | DMA_WRITE;
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 28, 0x2000), 0);
        assert_eq!(guest(&m, 0x2000, 28), [0; 28]);
    }

    #[test]
    fn data_port_writes_ignored_and_no_dma_without_memory() {
        let m = mem();
        let mut d = FwCfg::new();
        select(&mut d, keys::SIGNATURE);
        d.write(1, &[0x41]);
        assert_eq!(read_port(&mut d, 4), b"QEMU");
        // A descriptor in some memory the device was not given: untouched.
        let ctl = (u32::from(keys::SIGNATURE) << 16) | DMA_SELECT | DMA_READ;
        assert_eq!(dma(&mut d, &m, 0x1000, ctl, 4, 0x2000), ctl);
        assert_eq!(guest(&m, 0x2000, 4), [0; 4]);
    }

    #[test]
    fn on_the_port_bus() {
        let m = mem();
        let pio = Bus::new();
        let dev = Arc::new(Mutex::new(FwCfg::new().with_memory(m)));
        pio.insert(u64::from(PORT_BASE), PORT_LEN, dev).unwrap();
        let base = u64::from(PORT_BASE);
        assert!(pio.write(base, &keys::SIGNATURE.to_le_bytes()));
        let mut sig = Vec::new();
        for _ in 0..4 {
            let mut b = [0u8];
            assert!(pio.read(base + 1, &mut b));
            sig.push(b[0]);
        }
        assert_eq!(sig, b"QEMU");
        let mut b = [0u8; 4];
        assert!(pio.read(base + 4, &mut b));
        assert_eq!(&b, b"QEMU");
        assert!(pio.read(base + 8, &mut b));
        assert_eq!(&b, b" CFG");
        assert!(!pio.read(base + PORT_LEN, &mut b));
    }

    use rvirt_testkit::XorShift as Rand;

    /// Deterministic values shaped for fw_cfg's DMA interface.
    trait Hostile {
        fn addr(&mut self) -> u64;
        fn len(&mut self) -> u32;
    }

    impl Hostile for Rand {
        /// Mostly addresses in or near guest memory, sometimes anything.
        fn addr(&mut self) -> u64 {
            match self.below(4) {
                0 => self.next_u64(),
                1 => MEM as u64 - self.below(64),
                _ => self.below(MEM as u64),
            }
        }

        fn len(&mut self) -> u32 {
            match self.below(4) {
                0 => self.next_u64() as u32,
                _ => self.below(0x3000) as u32,
            }
        }
    }

    #[test]
    fn random_guest_never_panics() {
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MEM),
            (GuestAddress(0x10_0000), 0x1000),
        ])
        .unwrap();
        let mut d = FwCfg::new().with_memory(m.clone());
        d.set_cpus(2, 4);
        d.add_e820(&[(0, MEM as u64, E820_RAM)]).unwrap();
        d.add_file("etc/big", vec![0x5a; 0x2345]).unwrap();
        d.add_bootorder(&["HALT"]).unwrap();
        let mut r = Rand(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let offset = r.below(PORT_LEN + 4);
            let size = [1usize, 2, 4, 8][r.below(4) as usize];
            match r.below(5) {
                0 => {
                    let mut b = vec![0u8; size];
                    d.read(offset, &mut b);
                }
                1 => {
                    let v = r.next_u64().to_le_bytes();
                    d.write(offset, &v[..size]);
                }
                2 => {
                    let key = match r.below(3) {
                        0 => r.next_u64() as u16,
                        _ => r.below(0x28) as u16,
                    };
                    select(&mut d, key);
                }
                _ => {
                    // A plausible descriptor somewhere, then a trigger at some address.
                    let at = r.below(MEM as u64 - 16);
                    let control = match r.below(3) {
                        0 => r.next_u64() as u32,
                        _ => (r.below(0x28) << 16) as u32 | r.below(0x20) as u32,
                    };
                    let mut raw = [0u8; 16];
                    raw[0..4].copy_from_slice(&control.to_be_bytes());
                    raw[4..8].copy_from_slice(&r.len().to_be_bytes());
                    raw[8..16].copy_from_slice(&r.addr().to_be_bytes());
                    m.write_slice(&raw, GuestAddress(at)).unwrap();
                    let target = if r.below(4) == 0 { r.addr() } else { at };
                    if r.below(2) == 0 {
                        d.write(4, &((target >> 32) as u32).to_be_bytes());
                        d.write(8, &(target as u32).to_be_bytes());
                    } else {
                        d.write(4, &target.to_be_bytes());
                    }
                    if target == at {
                        let c = control_at(&m, at);
                        assert!(c == 0 || c == DMA_ERROR, "control {c:#x}");
                    }
                }
            }
        }
        // Still answers sensibly.
        d.reset();
        assert_eq!(read_port(&mut d, 4), b"QEMU");
    }
}
