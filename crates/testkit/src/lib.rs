//! Tiny guest programs and helpers for rvirt's KVM tests.
//!
//! Each guest is 32-bit protected-mode code assembled with iced-x86, wrapped in an ELF64 with
//! one `PT_LOAD` segment at [`LOAD_ADDR`] and a Xen `XEN_ELFNOTE_PHYS32_ENTRY` note, so
//! `rvirt-vmm --kernel FILE` boots it through PVH. They run in a few hundred instructions (this
//! matters on hosts where KVM emulates non-PVM guests slowly).
//!
//! Ports the guests use (documented in docs/vmm.md): COM1 0x3F8, ACPI PM1a control 0x604 (S5 =
//! 0x3400), PM1a event 0x600/0x602, i8042 0x64, boot timer 0x440, PCI 0xCF8/0xCFC.

use std::io::Write;
use std::path::Path;

use iced_x86::code_asm::*;

/// Guest-physical load address and entry point of every image.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("assembling the guest program: {0}")]
    Asm(#[from] IcedError),
    #[error("writing the guest image: {0}")]
    Io(#[from] std::io::Error),
}

/// A guest image on disk; the file is removed on drop.
pub struct GuestImage {
    file: tempfile::NamedTempFile,
}

impl GuestImage {
    /// Path to pass as `--kernel`.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Write `bytes` to a new temporary file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let mut file = tempfile::Builder::new()
            .prefix("rvirt-guest-")
            .suffix(".elf")
            .tempfile()?;
        file.write_all(bytes)?;
        file.flush()?;
        Ok(GuestImage { file })
    }
}

/// Wrap flat code loaded at [`LOAD_ADDR`] into a PVH ELF64 whose entry is [`LOAD_ADDR`].
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    elf(code, true)
}

/// Wrap flat code loaded at [`LOAD_ADDR`] into an ELF64 (entry [`LOAD_ADDR`]), with or without
/// the PVH note. Without it the VMM uses the 64-bit Linux boot protocol.
pub fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum = if pvh { 2 } else { 1 };
    let note_off = EHDR + phnum * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz "Xen\0"
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let code_off = (note_off + note.len()).div_ceil(16) * 16;

    let mut v = Vec::new();
    // ELF header.
    v.extend_from_slice(b"\x7fELF");
    v.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, LE, version 1, SysV
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    v.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // flags
    v.extend_from_slice(&(EHDR as u16).to_le_bytes());
    v.extend_from_slice(&(PHDR as u16).to_le_bytes());
    v.extend_from_slice(&(phnum as u16).to_le_bytes()); // phnum
    v.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    v.extend_from_slice(&0u16.to_le_bytes()); // shnum
    v.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
    assert_eq!(v.len(), EHDR);
    let phdr =
        |v: &mut Vec<u8>, ty: u32, flags: u32, off: usize, addr: u64, len: usize, align: u64| {
            v.extend_from_slice(&ty.to_le_bytes());
            v.extend_from_slice(&flags.to_le_bytes());
            v.extend_from_slice(&(off as u64).to_le_bytes());
            v.extend_from_slice(&addr.to_le_bytes());
            v.extend_from_slice(&addr.to_le_bytes());
            v.extend_from_slice(&(len as u64).to_le_bytes());
            v.extend_from_slice(&(len as u64).to_le_bytes());
            v.extend_from_slice(&align.to_le_bytes());
        };
    phdr(&mut v, 1, 7, code_off, LOAD_ADDR, code.len(), 16); // PT_LOAD RWX
    if pvh {
        phdr(&mut v, 4, 4, note_off, 0, note.len(), 4); // PT_NOTE
        v.extend_from_slice(&note);
    }
    v.resize(code_off, 0);
    v.extend_from_slice(code);
    v
}

/// Offset of the data area from [`LOAD_ADDR`] (code must fit below it).
pub const DATA_OFFSET: u64 = 0x1000;

/// Constant data placed after the code at [`LOAD_ADDR`] + [`DATA_OFFSET`].
#[derive(Default)]
pub struct Data {
    bytes: Vec<u8>,
}

impl Data {
    /// Append `b`; returns its guest-physical address.
    pub fn add(&mut self, b: &[u8]) -> u32 {
        let at = (LOAD_ADDR + DATA_OFFSET) as u32 + self.bytes.len() as u32;
        self.bytes.extend_from_slice(b);
        at
    }

    /// Append a NUL-terminated string; returns its address.
    pub fn str(&mut self, s: &str) -> u32 {
        let at = self.add(s.as_bytes());
        self.bytes.push(0);
        at
    }
}

/// Assemble a 32-bit program at [`LOAD_ADDR`] with its data area.
pub fn assemble(
    f: impl FnOnce(&mut CodeAssembler, &mut Data) -> Result<(), IcedError>,
) -> Result<Vec<u8>, Error> {
    assemble_at(32, LOAD_ADDR, f)
}

/// Assemble a `bitness`-bit program at `addr`; the data area follows at
/// [`LOAD_ADDR`] + [`DATA_OFFSET`] so `addr` must be within the first page of the image.
pub fn assemble_at(
    bitness: u32,
    addr: u64,
    f: impl FnOnce(&mut CodeAssembler, &mut Data) -> Result<(), IcedError>,
) -> Result<Vec<u8>, Error> {
    let mut a = CodeAssembler::new(bitness)?;
    let mut d = Data::default();
    // PVH enters with no stack: use the 64 KiB below the image.
    a.mov(esp, LOAD_ADDR as u32)?;
    f(&mut a, &mut d)?;
    let mut code = vec![0u8; (addr - LOAD_ADDR) as usize];
    code.extend_from_slice(&a.assemble(addr)?);
    assert!(code.len() as u64 <= DATA_OFFSET, "guest code too large");
    code.resize(DATA_OFFSET as usize, 0);
    code.extend_from_slice(&d.bytes);
    Ok(code)
}

/// Emit code printing the NUL-terminated string at `msg` on COM1 (clobbers eax, edx, esi).
fn print(a: &mut CodeAssembler, msg: u32) -> Result<(), IcedError> {
    let mut lp = a.create_label();
    let mut done = a.create_label();
    a.mov(esi, msg)?;
    a.mov(dx, 0x3f8u32)?;
    a.set_label(&mut lp)?;
    a.mov(al, byte_ptr(esi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.inc(esi)?;
    a.jmp(lp)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// Emit code printing EAX as 8 hex digits on COM1 (clobbers ebx, ecx, edx, edi).
fn print_hex(a: &mut CodeAssembler, digits: u32) -> Result<(), IcedError> {
    let mut lp = a.create_label();
    a.mov(ecx, 8u32)?;
    a.mov(dx, 0x3f8u32)?;
    a.mov(edi, digits)?;
    a.set_label(&mut lp)?;
    a.rol(eax, 4u32)?;
    a.mov(ebx, eax)?;
    a.and(ebx, 0xfu32)?;
    a.push(eax)?;
    a.mov(al, byte_ptr(edi + ebx))?;
    a.out(dx, al)?;
    a.pop(eax)?;
    a.dec(ecx)?;
    a.jnz(lp)?;
    Ok(())
}

/// Emit the ACPI S5 poweroff (PM1a control 0x604 ← SLP_TYP 5 | SLP_EN), then halt forever.
fn poweroff(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut h = a.create_label();
    a.mov(dx, 0x604u32)?;
    a.mov(ax, 0x3400u32)?;
    a.out(dx, ax)?;
    a.set_label(&mut h)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(h)?;
    Ok(())
}

/// A 1 MiB disk image whose first sector is an MBR boot sector (16-bit real mode, loaded at 0x7C00
/// by a BIOS) that prints `msg` on COM1 and powers off via ACPI S5 (0x3400 to port 0x604,
/// where rvirt's PM block stays whatever the firmware writes to PMBASE).
pub fn mbr_hello(msg: &str) -> Result<GuestImage, Error> {
    const MBR_ADDR: u64 = 0x7c00;
    let mut a = CodeAssembler::new(16)?;
    // The message sits at a fixed offset of the sector (labels cannot be 16-bit immediates).
    const TEXT: usize = 0x100;
    let mut next = a.create_label();
    let mut done = a.create_label();
    let mut halt = a.create_label();
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(si, (MBR_ADDR as usize + TEXT) as u32)?;
    a.mov(dx, 0x3f8u32)?;
    a.set_label(&mut next)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.jmp(next)?;
    a.set_label(&mut done)?;
    a.mov(dx, 0x604u32)?;
    a.mov(ax, 0x3400u32)?;
    a.out(dx, ax)?;
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    let mut sector = a.assemble(MBR_ADDR)?;
    assert!(sector.len() <= TEXT, "boot code too large");
    assert!(msg.len() < 446 - TEXT, "message too long for an MBR");
    sector.resize(TEXT, 0);
    sector.extend_from_slice(msg.as_bytes());
    sector.resize(512, 0);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    // SeaBIOS refuses a one-sector drive (its CHS geometry comes out empty).
    sector.resize(1 << 20, 0);
    GuestImage::from_bytes(&sector)
}

/// Pokes the boot-timer port, prints "hello from guest\n" on COM1, powers off via ACPI S5.
pub fn serial_hello() -> Result<GuestImage, Error> {
    let code = assemble(|a, d| {
        let msg = d.str("hello from guest\n");
        a.mov(dx, 0x440u32)?;
        a.out(dx, al)?;
        print(a, msg)?;
        poweroff(a)
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Prints "rebooting\n", then pulses the i8042 reset line (0xFE to port 0x64).
pub fn i8042_reboot() -> Result<GuestImage, Error> {
    let code = assemble(|a, d| {
        let msg = d.str("rebooting\n");
        let mut h = a.create_label();
        print(a, msg)?;
        a.mov(al, 0xfeu32)?;
        a.mov(dx, 0x64u32)?;
        a.out(dx, al)?;
        a.set_label(&mut h)?;
        a.hlt()?;
        a.jmp(h)
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Writes the ACPI reset value 6 to the reset register (port 0xCF9).
pub fn acpi_reset() -> Result<GuestImage, Error> {
    let code = assemble(|a, _| {
        let mut h = a.create_label();
        a.mov(dx, 0xcf9u32)?;
        a.mov(al, 0x06u32)?;
        a.out(dx, al)?;
        a.set_label(&mut h)?;
        a.hlt()?;
        a.jmp(h)?;
        Ok(())
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Loads an IDT with limit 0 and executes int3: a triple fault.
pub fn triple_fault() -> Result<GuestImage, Error> {
    let code = assemble(|a, d| {
        let idt = d.add(&[0u8; 6]);
        a.mov(eax, idt)?;
        a.lidt(ptr(eax))?;
        a.int3()?;
        a.hlt()
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Prints `pci 00:00.0 VVVVDDDD\n` (legacy 0xCF8/0xCFC), `pci 00:01.0 VVVVDDDD\n` (ECAM at
/// 0xE0000000) and `ecam 00:00.0 VVVVDDDD\n`, then powers off. The dword is the
/// vendor/device register as read (device id in the high half).
pub fn pci_probe() -> Result<GuestImage, Error> {
    let code = assemble(|a, d| {
        let digits = d.str("0123456789abcdef");
        let m0 = d.str("pci 00:00.0 ");
        let m1 = d.str("pci 00:01.0 ");
        let m2 = d.str("ecam 00:00.0 ");
        let nl = d.str("\n");
        // 00:00.0 through 0xCF8/0xCFC.
        print(a, m0)?;
        a.mov(eax, 0x8000_0000u32)?;
        a.mov(dx, 0xcf8u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfcu32)?;
        a.in_(eax, dx)?;
        print_hex(a, digits)?;
        print(a, nl)?;
        // 00:01.0 through 0xCF8/0xCFC.
        print(a, m1)?;
        a.mov(eax, 0x8000_0800u32)?;
        a.mov(dx, 0xcf8u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfcu32)?;
        a.in_(eax, dx)?;
        print_hex(a, digits)?;
        print(a, nl)?;
        // 00:00.0 through ECAM.
        print(a, m2)?;
        a.mov(esi, 0xe000_0000u32)?;
        a.mov(eax, dword_ptr(esi))?;
        print_hex(a, digits)?;
        print(a, nl)?;
        poweroff(a)
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Writes the boot-timer port (0x440) `writes` times in a tight loop, prints "flooded\n" and
/// powers off: a guest that would fill the VMM's log if the port's line were not rate-limited.
pub fn boot_port_flood(writes: u32) -> Result<GuestImage, Error> {
    let code = assemble(|a, d| {
        let msg = d.str("flooded\n");
        let mut again = a.create_label();
        a.mov(ecx, writes)?;
        a.mov(dx, 0x440u32)?;
        a.set_label(&mut again)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(again)?;
        print(a, msg)?;
        poweroff(a)
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Prints "ready\n", then halts with interrupts off forever (for control-socket tests).
pub fn idle() -> Result<GuestImage, Error> {
    let code = assemble(|a, d| {
        let msg = d.str("ready\n");
        print(a, msg)?;
        let mut h = a.create_label();
        a.set_label(&mut h)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(h)
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Enables the ACPI power-button event, prints "ready\n", polls PM1 status until the power
/// button is pressed, acknowledges it (write-1-to-clear), prints "power button\n" and powers off.
pub fn power_button() -> Result<GuestImage, Error> {
    let code = assemble(|a, d| {
        let ready = d.str("ready\n");
        let pressed = d.str("power button\n");
        let mut poll = a.create_label();
        a.mov(dx, 0x602u32)?;
        a.mov(ax, 0x100u32)?;
        a.out(dx, ax)?;
        print(a, ready)?;
        a.set_label(&mut poll)?;
        a.pause()?;
        a.mov(dx, 0x600u32)?;
        a.in_(ax, dx)?;
        a.test(ax, 0x100u32)?;
        a.jz(poll)?;
        a.mov(ax, 0x100u32)?;
        a.out(dx, ax)?;
        print(a, pressed)?;
        poweroff(a)
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// PVH: checks the `hvm_start_info` magic at EBX (prints "bad start_info\n" otherwise),
/// prints `cmdline: <cmdline>\n`, then, if there is a module (initrd), `initrd: <its first
/// bytes up to a NUL>\n`, and powers off.
pub fn pvh_info() -> Result<GuestImage, Error> {
    let code = assemble(|a, d| {
        let bad = d.str("bad start_info\n");
        let m_cmd = d.str("cmdline: ");
        let m_initrd = d.str("initrd: ");
        let nl = d.str("\n");
        let mut fail = a.create_label();
        let mut no_mod = a.create_label();
        a.mov(ebp, ebx)?;
        a.cmp(dword_ptr(ebp), 0x336e_c578u32)?;
        a.jne(fail)?;
        print(a, m_cmd)?;
        a.mov(esi, dword_ptr(ebp + 24))?;
        print_at_esi(a)?;
        print(a, nl)?;
        a.cmp(dword_ptr(ebp + 12), 0u32)?;
        a.je(no_mod)?;
        print(a, m_initrd)?;
        a.mov(esi, dword_ptr(ebp + 16))?;
        a.mov(esi, dword_ptr(esi))?;
        print_at_esi(a)?;
        print(a, nl)?;
        a.set_label(&mut no_mod)?;
        poweroff(a)?;
        a.set_label(&mut fail)?;
        print(a, bad)?;
        poweroff(a)
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Print the NUL-terminated string at ESI (clobbers eax, edx, esi).
fn print_at_esi(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut lp = a.create_label();
    let mut done = a.create_label();
    a.mov(dx, 0x3f8u32)?;
    a.set_label(&mut lp)?;
    a.mov(al, byte_ptr(esi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.inc(esi)?;
    a.jmp(lp)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// 64-bit code for the Linux boot protocol guests: RSI = zero page. Checks the boot_params
/// `boot_flag` 0xAA55 and "HdrS", prints `<hello>` then `cmdline: <cmdline>\n`, powers off.
fn long_mode_body(a: &mut CodeAssembler, d: &mut Data, hello: &str) -> Result<(), IcedError> {
    let bad = d.str("bad zero page\n");
    let hello = d.str(hello);
    let m_cmd = d.str("cmdline: ");
    let nl = d.str("\n");
    let mut fail = a.create_label();
    a.mov(r15, rsi)?;
    a.cmp(word_ptr(r15 + 0x1fe), 0xaa55u32)?;
    a.jne(fail)?;
    a.cmp(dword_ptr(r15 + 0x202), 0x5372_6448u32)?;
    a.jne(fail)?;
    print(a, hello)?;
    print(a, m_cmd)?;
    a.mov(esi, dword_ptr(r15 + 0x228))?;
    print_at_esi(a)?;
    print(a, nl)?;
    poweroff(a)?;
    a.set_label(&mut fail)?;
    print(a, bad)?;
    poweroff(a)
}

/// An ELF without the PVH note (64-bit Linux boot protocol): see [`long_mode_body`]; prints
/// "hello from long mode\n".
pub fn elf64_hello() -> Result<GuestImage, Error> {
    let code = assemble_at(64, LOAD_ADDR, |a, d| {
        long_mode_body(a, d, "hello from long mode\n")
    })?;
    GuestImage::from_bytes(&elf(&code, false))
}

/// A minimal bzImage (boot sector + one setup sector + protected-mode part whose 64-bit entry
/// at +0x200 runs [`long_mode_body`]); prints "hello from bzImage\n".
pub fn bzimage_hello() -> Result<GuestImage, Error> {
    let code = assemble_at(64, LOAD_ADDR + 0x200, |a, d| {
        long_mode_body(a, d, "hello from bzImage\n")
    })?;
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x236..0x238].copy_from_slice(&0x1u16.to_le_bytes()); // XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&0x7ffu32.to_le_bytes()); // cmdline_size
    img.extend_from_slice(&code);
    GuestImage::from_bytes(&img)
}

/// Echoes COM1 input back (polling the line status register); after echoing a `q` it powers
/// off.
pub fn serial_echo() -> Result<GuestImage, Error> {
    let code = assemble(|a, _| {
        let mut poll = a.create_label();
        a.set_label(&mut poll)?;
        a.pause()?;
        a.mov(dx, 0x3fdu32)?;
        a.in_(al, dx)?;
        a.test(al, 1u32)?;
        a.jz(poll)?;
        a.mov(dx, 0x3f8u32)?;
        a.in_(al, dx)?;
        a.out(dx, al)?;
        a.cmp(al, b'q' as u32)?;
        a.jne(poll)?;
        poweroff(a)
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// Guest-physical layout of [`virtio_blk_rw`]'s driver state (all in the first 64 MiB).
pub mod blk_layout {
    /// Descriptor table (16 entries).
    pub const DESC: u32 = 0x20_0000;
    /// Available (driver) ring.
    pub const AVAIL: u32 = 0x20_1000;
    /// Used (device) ring.
    pub const USED: u32 = 0x20_2000;
    /// Three 16-byte request headers: read, write, get-id.
    pub const HDR: u32 = 0x20_3000;
    /// Buffer the READ of sector 0 lands in.
    pub const RBUF: u32 = 0x20_4000;
    /// The sector the guest writes.
    pub const WBUF: u32 = 0x20_5000;
    /// The GET_ID answer (20 bytes).
    pub const IDBUF: u32 = 0x20_6000;
    /// Status bytes of the three requests, then a guard byte 0xEE.
    pub const STATUS: u32 = 0x20_7000;
    /// Driver variables: common cfg address, notify base, notify multiplier, queue 0 notify.
    pub const VARS: u32 = 0x20_8000;
    /// Where the driver moves BAR 0 (the start of the VMM's 32-bit PCI window).
    pub const BAR0_32: u32 = 0xc000_0000;
    /// Queue size the driver programs.
    pub const QUEUE_SIZE: u16 = 16;
}

/// The 512 bytes [`virtio_blk_rw`] writes: dword `i` is `0xA5A5_A5A5 + i * 0x0101_0101`
/// (wrapping), computed by the guest.
pub fn blk_guest_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    let mut v = 0xA5A5_A5A5u32;
    for c in s.chunks_exact_mut(4) {
        c.copy_from_slice(&v.to_le_bytes());
        v = v.wrapping_add(0x0101_0101);
    }
    s
}

/// A virtio 1.x driver in a few hundred instructions. It finds the first virtio-blk PCI
/// function (1af4:1042) on bus 0 through 0xCF8/0xCFC, moves its 64-bit BAR 0 to
/// [`blk_layout::BAR0_32`] (the VMM assigns it above 4 GiB, beyond this unpaged 32-bit code),
/// enables memory decoding and bus mastering, walks the capability list for the
/// common and notify structures, then: reset, ACKNOWLEDGE, DRIVER, VERSION_1 (only),
/// FEATURES_OK (checked), queue 0 of size 16 with its three ring addresses, queue enable,
/// DRIVER_OK (checked, no NEEDS_RESET). It submits three chains in one notify — READ of sector
/// 0, WRITE of [`blk_guest_sector`] to `write_sector`, GET_ID — and polls the used ring
/// (bounded). It prints:
///
/// ```text
/// virtio-blk slot SSSSSSSS
/// used IIIIIIII id len id len id len        (used idx, then each used element, hex)
/// status EE0000..                            (the three status bytes, little-endian + guard)
/// read ok | read mismatch                    (sector 0 against `sector0`)
/// id <GET_ID string>
/// reset ok
/// ```
///
/// and powers off. Any failed step prints `FAIL <step>` and powers off.
pub fn virtio_blk_rw(sector0: &[u8; 512], write_sector: u32) -> Result<GuestImage, Error> {
    use blk_layout::*;
    let bar32 = BAR0_32;
    let code = assemble(|a, d| {
        let digits = d.str("0123456789abcdef");
        let expected = d.add(sector0);
        let m_slot = d.str("virtio-blk slot ");
        let m_used = d.str("used ");
        let m_status = d.str("status ");
        let m_ok = d.str("read ok\n");
        let m_bad = d.str("read mismatch\n");
        let m_id = d.str("id ");
        let m_reset = d.str("reset ok\n");
        let m_space = d.str(" ");
        let nl = d.str("\n");
        let f_nodev = d.str("FAIL no virtio-blk function\n");
        let f_bar = d.str("FAIL BAR 0 is not 64-bit memory or did not move\n");
        let f_caps = d.str("FAIL common/notify capability missing\n");
        let f_reset = d.str("FAIL status not 0 after reset\n");
        let f_v1 = d.str("FAIL VERSION_1 not offered\n");
        let f_fok = d.str("FAIL FEATURES_OK refused\n");
        let f_qsize = d.str("FAIL queue 0 too small\n");
        let f_dok = d.str("FAIL DRIVER_OK refused or NEEDS_RESET\n");
        let f_timeout = d.str("FAIL no completion in the used ring\n");
        let f_reset2 = d.str("FAIL status not 0 after final reset\n");

        let v_common = VARS;
        let v_notify = VARS + 4;
        let v_mult = VARS + 8;
        let v_qnotify = VARS + 12;
        let v_bar = VARS + 16;

        let mut cfg_rd = a.create_label();
        let mut cfg_wr = a.create_label();
        let mut fail = a.create_label();
        let mut scan = a.create_label();
        let mut found = a.create_label();
        let mut cap_loop = a.create_label();
        let mut cap_next = a.create_label();
        let mut not_common = a.create_label();
        let mut caps_done = a.create_label();
        let mut poll = a.create_label();
        let mut completed = a.create_label();
        let mut mismatch = a.create_label();
        let mut compared = a.create_label();
        let mut fill = a.create_label();

        // Find 1af4:1042 in slots 1..=31 (EBP = config address of the function).
        a.mov(ebp, 0x8000_0800u32)?;
        a.mov(edi, 31u32)?;
        a.set_label(&mut scan)?;
        a.xor(ebx, ebx)?;
        a.call(cfg_rd)?;
        a.cmp(eax, 0x1042_1af4u32)?;
        a.je(found)?;
        a.add(ebp, 0x800u32)?;
        a.dec(edi)?;
        a.jnz(scan)?;
        a.mov(esi, f_nodev)?;
        a.jmp(fail)?;
        a.set_label(&mut found)?;
        print(a, m_slot)?;
        a.mov(eax, ebp)?;
        a.shr(eax, 11u32)?;
        a.and(eax, 0x1fu32)?;
        print_hex(a, digits)?;
        print(a, nl)?;
        // BAR 0 must be 64-bit memory. The VMM puts it above 4 GiB, out of reach of this
        // unpaged 32-bit code, so move it (memory decoding off meanwhile) to `bar32` as
        // firmware would, and check the move reads back.
        a.mov(esi, f_bar)?;
        a.mov(ebx, 0x10u32)?;
        a.call(cfg_rd)?;
        a.and(eax, 7u32)?;
        a.cmp(eax, 4u32)?;
        a.jne(fail)?;
        a.mov(ebx, 4u32)?;
        a.call(cfg_rd)?;
        a.and(eax, 0xfff9u32)?;
        a.mov(ecx, eax)?;
        a.mov(ebx, 4u32)?;
        a.call(cfg_wr)?;
        a.mov(ecx, bar32)?;
        a.mov(ebx, 0x10u32)?;
        a.call(cfg_wr)?;
        a.xor(ecx, ecx)?;
        a.mov(ebx, 0x14u32)?;
        a.call(cfg_wr)?;
        a.mov(ebx, 0x10u32)?;
        a.call(cfg_rd)?;
        a.and(eax, 0xffff_fff0u32)?;
        a.cmp(eax, bar32)?;
        a.jne(fail)?;
        a.mov(dword_ptr(v_bar), eax)?;
        a.mov(ebx, 0x14u32)?;
        a.call(cfg_rd)?;
        a.test(eax, eax)?;
        a.jnz(fail)?;
        // Command: memory space + bus master on.
        a.mov(ebx, 4u32)?;
        a.call(cfg_rd)?;
        a.and(eax, 0xffffu32)?;
        a.or(eax, 6u32)?;
        a.mov(ecx, eax)?;
        a.mov(ebx, 4u32)?;
        a.call(cfg_wr)?;
        // Capabilities: vendor-specific (9) ones of type 1 (common) and 2 (notify).
        a.mov(ebx, 0x34u32)?;
        a.call(cfg_rd)?;
        a.and(eax, 0xfcu32)?;
        a.mov(edi, eax)?;
        a.set_label(&mut cap_loop)?;
        a.test(edi, edi)?;
        a.jz(caps_done)?;
        a.mov(ebx, edi)?;
        a.call(cfg_rd)?;
        a.mov(esi, eax)?;
        a.cmp(al, 9u32)?;
        a.jne(cap_next)?;
        a.shr(eax, 24u32)?;
        a.cmp(eax, 1u32)?;
        a.jne(not_common)?;
        a.lea(ebx, ptr(edi + 8))?;
        a.call(cfg_rd)?;
        a.add(eax, dword_ptr(v_bar))?;
        a.mov(dword_ptr(v_common), eax)?;
        a.jmp(cap_next)?;
        a.set_label(&mut not_common)?;
        a.cmp(eax, 2u32)?;
        a.jne(cap_next)?;
        a.lea(ebx, ptr(edi + 8))?;
        a.call(cfg_rd)?;
        a.add(eax, dword_ptr(v_bar))?;
        a.mov(dword_ptr(v_notify), eax)?;
        a.lea(ebx, ptr(edi + 16))?;
        a.call(cfg_rd)?;
        a.mov(dword_ptr(v_mult), eax)?;
        a.set_label(&mut cap_next)?;
        a.mov(eax, esi)?;
        a.shr(eax, 8u32)?;
        a.and(eax, 0xfcu32)?;
        a.mov(edi, eax)?;
        a.jmp(cap_loop)?;
        a.set_label(&mut caps_done)?;
        a.mov(esi, f_caps)?;
        a.cmp(dword_ptr(v_common), 0u32)?;
        a.je(fail)?;
        a.cmp(dword_ptr(v_notify), 0u32)?;
        a.je(fail)?;

        // Device initialisation (virtio 1.2, 3.1.1). EDI = common configuration.
        a.mov(edi, dword_ptr(v_common))?;
        a.mov(byte_ptr(edi + 0x14), 0u32)?;
        a.mov(esi, f_reset)?;
        a.mov(al, byte_ptr(edi + 0x14))?;
        a.test(al, al)?;
        a.jnz(fail)?;
        a.mov(byte_ptr(edi + 0x14), 1u32)?; // ACKNOWLEDGE
        a.mov(byte_ptr(edi + 0x14), 3u32)?; // DRIVER
        a.mov(dword_ptr(edi), 1u32)?; // device_feature_select = 1
        a.mov(esi, f_v1)?;
        a.test(dword_ptr(edi + 4), 1u32)?; // VERSION_1 is bit 32
        a.jz(fail)?;
        a.mov(dword_ptr(edi + 8), 0u32)?;
        a.mov(dword_ptr(edi + 0xc), 0u32)?;
        a.mov(dword_ptr(edi + 8), 1u32)?;
        a.mov(dword_ptr(edi + 0xc), 1u32)?;
        a.mov(byte_ptr(edi + 0x14), 0xbu32)?; // FEATURES_OK
        a.mov(esi, f_fok)?;
        a.mov(al, byte_ptr(edi + 0x14))?;
        a.test(al, 8u32)?;
        a.jz(fail)?;
        a.mov(word_ptr(edi + 0x16), 0u32)?; // queue_select
        a.mov(esi, f_qsize)?;
        a.movzx(eax, word_ptr(edi + 0x18))?;
        a.cmp(eax, u32::from(QUEUE_SIZE))?;
        a.jb(fail)?;
        a.mov(word_ptr(edi + 0x18), u32::from(QUEUE_SIZE))?;
        for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            a.mov(dword_ptr(edi + off), addr)?;
            a.mov(dword_ptr(edi + off + 4), 0u32)?;
        }
        a.movzx(eax, word_ptr(edi + 0x1e))?;
        a.imul_2(eax, dword_ptr(v_mult))?;
        a.add(eax, dword_ptr(v_notify))?;
        a.mov(dword_ptr(v_qnotify), eax)?;
        a.mov(word_ptr(edi + 0x1c), 1u32)?; // queue_enable

        // Requests: headers, the guest-made sector, descriptors, status bytes.
        a.mov(dword_ptr(HDR), 0u32)?; // VIRTIO_BLK_T_IN, sector 0
        a.mov(dword_ptr(HDR + 8), 0u32)?;
        a.mov(dword_ptr(HDR + 16), 1u32)?; // VIRTIO_BLK_T_OUT
        a.mov(dword_ptr(HDR + 24), write_sector)?;
        a.mov(dword_ptr(HDR + 32), 8u32)?; // VIRTIO_BLK_T_GET_ID
        a.mov(dword_ptr(HDR + 40), 0u32)?;
        a.mov(dword_ptr(STATUS), 0xeeff_ffffu32)?;
        a.mov(edx, WBUF)?;
        a.mov(eax, 0xa5a5_a5a5u32)?;
        a.mov(ecx, 128u32)?;
        a.set_label(&mut fill)?;
        a.mov(dword_ptr(edx), eax)?;
        a.add(edx, 4u32)?;
        a.add(eax, 0x0101_0101u32)?;
        a.dec(ecx)?;
        a.jnz(fill)?;
        const NEXT: u32 = 1;
        const WRITE: u32 = 2;
        let descs: [(u32, u32, u32); 9] = [
            (HDR, 16, NEXT),
            (RBUF, 512, NEXT | WRITE),
            (STATUS, 1, WRITE),
            (HDR + 16, 16, NEXT),
            (WBUF, 512, NEXT),
            (STATUS + 1, 1, WRITE),
            (HDR + 32, 16, NEXT),
            (IDBUF, 20, NEXT | WRITE),
            (STATUS + 2, 1, WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let at = DESC + 16 * i as u32;
            let next = if flags & NEXT != 0 { i as u32 + 1 } else { 0 };
            a.mov(dword_ptr(at), addr)?;
            a.mov(dword_ptr(at + 4), 0u32)?;
            a.mov(dword_ptr(at + 8), len)?;
            a.mov(dword_ptr(at + 12), flags | (next << 16))?;
        }
        // Available ring: no interrupts wanted, heads 0, 3, 6, then idx = 3.
        a.mov(word_ptr(AVAIL), 1u32)?;
        a.mov(word_ptr(AVAIL + 4), 0u32)?;
        a.mov(word_ptr(AVAIL + 6), 3u32)?;
        a.mov(word_ptr(AVAIL + 8), 6u32)?;
        a.mov(word_ptr(AVAIL + 2), 3u32)?;

        a.mov(byte_ptr(edi + 0x14), 0xfu32)?; // DRIVER_OK
        a.mov(esi, f_dok)?;
        a.mov(al, byte_ptr(edi + 0x14))?;
        a.test(al, 0x40u32)?;
        a.jnz(fail)?;
        a.test(al, 4u32)?;
        a.jz(fail)?;

        // Notify queue 0 and poll the used ring (bounded).
        a.mov(eax, dword_ptr(v_qnotify))?;
        a.mov(word_ptr(eax), 0u32)?;
        a.mov(ecx, 3_000_000u32)?;
        a.set_label(&mut poll)?;
        a.pause()?;
        a.cmp(word_ptr(USED + 2), 3u32)?;
        a.jae(completed)?;
        a.dec(ecx)?;
        a.jnz(poll)?;
        a.mov(esi, f_timeout)?;
        a.jmp(fail)?;
        a.set_label(&mut completed)?;

        // Report.
        print(a, m_used)?;
        a.movzx(eax, word_ptr(USED + 2))?;
        print_hex(a, digits)?;
        for i in 0..3u32 {
            for off in [4, 8] {
                print(a, m_space)?;
                a.mov(eax, dword_ptr(USED + 8 * i + off))?;
                print_hex(a, digits)?;
            }
        }
        print(a, nl)?;
        print(a, m_status)?;
        a.mov(eax, dword_ptr(STATUS))?;
        print_hex(a, digits)?;
        print(a, nl)?;
        a.cld()?;
        a.mov(esi, RBUF)?;
        a.mov(edi, expected)?;
        a.mov(ecx, 128u32)?;
        a.repe().cmpsd()?;
        a.jne(mismatch)?;
        print(a, m_ok)?;
        a.jmp(compared)?;
        a.set_label(&mut mismatch)?;
        print(a, m_bad)?;
        a.set_label(&mut compared)?;
        print(a, m_id)?;
        a.mov(esi, IDBUF)?;
        print_at_esi(a)?;
        print(a, nl)?;
        // Reset: the device must stop and read back status 0.
        a.mov(edi, dword_ptr(v_common))?;
        a.mov(byte_ptr(edi + 0x14), 0u32)?;
        a.mov(esi, f_reset2)?;
        a.mov(al, byte_ptr(edi + 0x14))?;
        a.test(al, al)?;
        a.jnz(fail)?;
        print(a, m_reset)?;
        poweroff(a)?;

        a.set_label(&mut fail)?;
        print_at_esi(a)?;
        poweroff(a)?;

        // EAX = config dword at register EBX of function EBP (clobbers edx).
        a.set_label(&mut cfg_rd)?;
        a.mov(eax, ebp)?;
        a.or(eax, ebx)?;
        a.and(eax, 0xffff_fffcu32)?;
        a.mov(dx, 0xcf8u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfcu32)?;
        a.in_(eax, dx)?;
        a.ret()?;
        // Config dword at register EBX of function EBP = ECX (clobbers eax, edx).
        a.set_label(&mut cfg_wr)?;
        a.mov(eax, ebp)?;
        a.or(eax, ebx)?;
        a.mov(dx, 0xcf8u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfcu32)?;
        a.mov(eax, ecx)?;
        a.out(dx, eax)?;
        a.ret()
    })?;
    GuestImage::from_bytes(&pvh_elf(&code))
}

/// xorshift64*: a deterministic pseudo-random source for randomised hostile-input tests (the
/// same seed gives the same run, so a failure can be replayed), without a dependency.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// True if /dev/kvm can be opened read-write; otherwise the reason to print when skipping.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_has_pvh_note_and_code() {
        let code = [0xf4u8, 0xeb, 0xfd];
        let e = pvh_elf(&code);
        assert_eq!(&e[..4], b"\x7fELF");
        assert!(e.windows(4).any(|w| w == b"Xen\0"));
        assert_eq!(&e[e.len() - 3..], &code);
    }

    #[test]
    fn programs_assemble() {
        for img in [
            serial_hello(),
            i8042_reboot(),
            acpi_reset(),
            triple_fault(),
            pci_probe(),
            idle(),
            power_button(),
            pvh_info(),
            serial_echo(),
            elf64_hello(),
            bzimage_hello(),
            virtio_blk_rw(&[7; 512], 3),
        ] {
            let img = img.unwrap();
            assert!(std::fs::metadata(img.path()).unwrap().len() > 150);
        }
    }
}
