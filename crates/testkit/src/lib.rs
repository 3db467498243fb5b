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
        ] {
            let img = img.unwrap();
            assert!(std::fs::metadata(img.path()).unwrap().len() > 150);
        }
    }
}
