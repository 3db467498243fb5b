//! Firmware-mode tables: the loader commands are executed the way OVMF and SeaBIOS execute
//! them, then the result is checked the way they and the guest read it.

use std::collections::BTreeSet;

use super::firmware::*;
use super::loader::*;
use super::*;

fn sum(d: &[u8]) -> u8 {
    d.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn cfg(boot: u32, max: u32, pci_hotplug: bool) -> AcpiConfig {
    AcpiConfig {
        boot_vcpus: boot,
        max_vcpus: max,
        ram: 2 << 30,
        pci_hotplug,
    }
}

fn platform(vga: bool) -> FirmwarePlatform {
    FirmwarePlatform::q35(0x80_0000_0000..0x100_0000_0000, vga)
}

fn le(d: &[u8], at: usize, n: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(&d[at..at + n]);
    u64::from_le_bytes(v)
}

/// How the firmware computes ADD_CHECKSUM: OVMF stores the checksum of the range (with the
/// old byte in it), SeaBIOS subtracts the range's sum from the byte.
#[derive(Clone, Copy, Debug)]
enum Flavor {
    Ovmf,
    SeaBios,
}

/// Memory after the loader ran: each file at its base.
struct Loaded {
    /// (name, base, bytes).
    files: Vec<(String, u64, Vec<u8>)>,
    /// Absolute address every ADD_POINTER made its field point to, in command order.
    targets: Vec<u64>,
}

impl Loaded {
    fn read(&self, addr: u64, len: usize) -> &[u8] {
        for (_, base, d) in &self.files {
            if addr >= *base && addr + len as u64 <= *base + d.len() as u64 {
                let o = (addr - base) as usize;
                return &d[o..o + len];
            }
        }
        panic!("{addr:#x}+{len} is in no loaded file");
    }

    /// The whole table (header length) at `addr`.
    fn table(&self, addr: u64) -> &[u8] {
        let len = le(self.read(addr, 8), 4, 4) as usize;
        assert!(len >= 8, "table at {addr:#x} has length {len}");
        self.read(addr, len)
    }

    fn base(&self, name: &str) -> u64 {
        self.files.iter().find(|f| f.0 == name).unwrap().1
    }
}

/// A NUL-padded 56-byte name field: the name, then only NULs.
fn name(field: &[u8]) -> String {
    assert_eq!(field.len(), NAME_LEN);
    let n = field
        .iter()
        .position(|&b| b == 0)
        .expect("name without NUL");
    assert!(n > 0, "empty name");
    assert!(field[n..].iter().all(|&b| b == 0), "junk after the name");
    String::from_utf8(field[..n].to_vec()).unwrap()
}

/// Executes `etc/table-loader` against the other two files, placed at `bases`, checking every
/// command the way OVMF's and SeaBIOS's loaders check them.
fn run(acpi: &FwCfgAcpi, bases: &[(&str, u64)], flavor: Flavor) -> Loaded {
    assert_eq!(acpi.loader.len() % ENTRY_LEN, 0);
    let mut out = Loaded {
        files: Vec::new(),
        targets: Vec::new(),
    };
    let idx = |out: &Loaded, n: &str| {
        out.files
            .iter()
            .position(|f| f.0 == n)
            .unwrap_or_else(|| panic!("{n} used before ALLOCATE"))
    };
    for e in acpi.loader.chunks(ENTRY_LEN) {
        let cmd = le(e, 0, 4) as u32;
        match cmd {
            CMD_ALLOCATE => {
                assert!(e[65..].iter().all(|&b| b == 0), "padding");
                let f = name(&e[4..60]);
                let align = le(e, 60, 4);
                let zone = e[64];
                assert!(align.is_power_of_two() && align <= 4096, "align {align}");
                let want_zone = if f == RSDP_FILE { ZONE_FSEG } else { ZONE_HIGH };
                assert_eq!(zone, want_zone, "{f}");
                let data = acpi
                    .files()
                    .iter()
                    .find(|(n, _)| *n == f)
                    .unwrap_or_else(|| panic!("ALLOCATE of unknown file {f}"))
                    .1
                    .to_vec();
                assert!(!data.is_empty());
                let base = bases.iter().find(|b| b.0 == f).unwrap().1;
                assert_eq!(base % align, 0, "{f} base {base:#x} align {align}");
                assert!(out.files.iter().all(|x| x.0 != f), "{f} allocated twice");
                if zone == ZONE_FSEG {
                    assert!(base >= 0xe0000 && base + data.len() as u64 <= 0x10_0000);
                }
                out.files.push((f, base, data));
            }
            CMD_ADD_POINTER => {
                assert!(e[121..].iter().all(|&b| b == 0), "padding");
                let ptr = idx(&out, &name(&e[4..60]));
                let pointee = idx(&out, &name(&e[60..116]));
                let off = le(e, 116, 4) as usize;
                let size = usize::from(e[120]);
                assert!(matches!(size, 1 | 2 | 4 | 8), "size {size}");
                assert!(
                    off + size <= out.files[ptr].2.len(),
                    "pointer outside its file"
                );
                let v = le(&out.files[ptr].2, off, size);
                let (_, pbase, pdata) = &out.files[pointee];
                // OVMF: the unpatched value must be an offset inside the pointee.
                assert!(
                    v < pdata.len() as u64,
                    "pointer value {v:#x} outside the pointee"
                );
                let abs = v + pbase;
                // OVMF: the result must fit the field.
                assert!(size == 8 || abs >> (8 * size) == 0, "{abs:#x} does not fit");
                out.files[ptr].2[off..off + size].copy_from_slice(&abs.to_le_bytes()[..size]);
                out.targets.push(abs);
            }
            CMD_ADD_CHECKSUM => {
                assert!(e[72..].iter().all(|&b| b == 0), "padding");
                let f = idx(&out, &name(&e[4..60]));
                let (res, start, len) = (
                    le(e, 60, 4) as usize,
                    le(e, 64, 4) as usize,
                    le(e, 68, 4) as usize,
                );
                let d = &mut out.files[f].2;
                assert!(res < d.len() && start + len <= d.len(), "checksum range");
                assert!(
                    (start..start + len).contains(&res),
                    "result outside its range"
                );
                // Only a zero byte gives both firmwares the same result.
                assert_eq!(d[res], 0, "checksum byte at {res} not zero");
                let s = sum(&d[start..start + len]);
                d[res] = match flavor {
                    Flavor::Ovmf => s.wrapping_neg(),
                    Flavor::SeaBios => d[res].wrapping_sub(s),
                };
            }
            other => panic!("unknown loader command {other}"),
        }
    }
    out
}

/// What OVMF's second pass installs: every ADD_POINTER target (once per address) that is a
/// FACS or a table with a valid checksum, except RSDT and XSDT.
fn ovmf_installs(m: &Loaded) -> Vec<[u8; 4]> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for &t in &m.targets {
        if !seen.insert(t) {
            continue;
        }
        let sig: [u8; 4] = m.read(t, 4).try_into().unwrap();
        let tab = m.table(t);
        if &sig != b"FACS" && (tab.len() < 36 || sum(tab) != 0) {
            panic!("pointer target {t:#x} ({sig:?}) is not a valid table: OVMF drops it");
        }
        if &sig != b"RSDT" && &sig != b"XSDT" {
            out.push(sig);
        }
    }
    out
}

const BASES: [[(&str, u64); 2]; 2] = [
    [(TABLES_FILE, 0x7ff0_0000), (RSDP_FILE, 0xf_5000)],
    [(TABLES_FILE, 0xbfff_0040), (RSDP_FILE, 0xe_0010)],
];

/// Follows RSDP → RSDT/XSDT → tables, FADT → FACS/DSDT, checking signatures and checksums;
/// returns the address of every table reached.
fn walk(m: &Loaded) -> Vec<(u64, [u8; 4])> {
    let rsdp = m.read(m.base(RSDP_FILE), 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2);
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    let rsdt_addr = le(rsdp, 16, 4);
    let xsdt_addr = le(rsdp, 24, 8);
    let mut found = vec![(rsdt_addr, *b"RSDT"), (xsdt_addr, *b"XSDT")];
    let rsdt = m.table(rsdt_addr);
    let xsdt = m.table(xsdt_addr);
    assert_eq!(&rsdt[0..4], b"RSDT");
    assert_eq!(&xsdt[0..4], b"XSDT");
    assert_eq!(sum(rsdt), 0);
    assert_eq!(sum(xsdt), 0);
    let r_entries: Vec<u64> = (36..rsdt.len())
        .step_by(4)
        .map(|o| le(rsdt, o, 4))
        .collect();
    let x_entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| le(xsdt, o, 8))
        .collect();
    assert_eq!(r_entries, x_entries, "RSDT and XSDT list the same tables");
    let mut sigs = Vec::new();
    for &a in &x_entries {
        let t = m.table(a);
        assert_eq!(sum(t), 0, "checksum of {:?}", &t[0..4]);
        sigs.push(<[u8; 4]>::try_from(&t[0..4]).unwrap());
        found.push((a, sigs[sigs.len() - 1]));
    }
    assert_eq!(sigs, [*b"FACP", *b"APIC", *b"MCFG"]);
    let fadt = m.table(x_entries[0]);
    assert_eq!(fadt.len(), 276);
    assert_eq!(
        le(fadt, 36, 4),
        le(fadt, 132, 8),
        "FIRMWARE_CTRL = X_FIRMWARE_CTRL"
    );
    assert_eq!(le(fadt, 40, 4), le(fadt, 140, 8), "DSDT = X_DSDT");
    let facs_addr = le(fadt, 132, 8);
    assert_eq!(facs_addr % 64, 0, "FACS alignment");
    let facs = m.table(facs_addr);
    assert_eq!(&facs[0..4], b"FACS");
    assert_eq!(facs.len(), 64);
    let dsdt_addr = le(fadt, 140, 8);
    let dsdt = m.table(dsdt_addr);
    assert_eq!(&dsdt[0..4], b"DSDT");
    assert_eq!(sum(dsdt), 0);
    found.push((facs_addr, *b"FACS"));
    found.push((dsdt_addr, *b"DSDT"));
    found
}

#[test]
fn the_loader_links_and_checksums_everything_for_both_firmwares() {
    for c in [cfg(1, 1, false), cfg(2, 8, true), cfg(4, 4, false)] {
        for vga in [false, true] {
            let acpi = firmware_blobs(&c, &platform(vga)).unwrap();
            for bases in BASES {
                let ovmf = run(&acpi, &bases, Flavor::Ovmf);
                let sea = run(&acpi, &bases, Flavor::SeaBios);
                for (a, b) in ovmf.files.iter().zip(&sea.files) {
                    assert_eq!(a, b, "OVMF and SeaBIOS disagree on {}", a.0);
                }
                let found = walk(&ovmf);
                // OVMF's rule: every table is some ADD_POINTER's target.
                let targets: BTreeSet<u64> = ovmf.targets.iter().copied().collect();
                for (a, sig) in &found {
                    assert!(
                        targets.contains(a),
                        "{sig:?} at {a:#x} is no pointer target"
                    );
                }
                let mut inst = ovmf_installs(&ovmf);
                inst.sort();
                let mut want = vec![*b"APIC", *b"DSDT", *b"FACP", *b"FACS", *b"MCFG"];
                want.sort();
                assert_eq!(inst, want, "{c:?} vga {vga}");
                // The tables blob holds exactly the tables reached, nothing else.
                let tb = ovmf.base(TABLES_FILE);
                let reached: usize = found
                    .iter()
                    .filter(|(a, _)| *a >= tb)
                    .map(|(a, _)| ovmf.table(*a).len())
                    .sum();
                assert!(
                    acpi.tables.len() - reached < 16 * found.len(),
                    "stray bytes"
                );
            }
        }
    }
}

#[test]
fn checksums_come_after_the_pointers_they_cover() {
    // Move the first ADD_CHECKSUM before everything else: the FADT's pointers then change its
    // bytes after the sum, and the interpreter must see a broken table.
    let acpi = firmware_blobs(&cfg(1, 1, false), &platform(false)).unwrap();
    let cmds: Vec<&[u8]> = acpi.loader.chunks(ENTRY_LEN).collect();
    let first_sum = cmds
        .iter()
        .position(|e| le(e, 0, 4) as u32 == CMD_ADD_CHECKSUM)
        .unwrap();
    let fadt_sum = cmds
        .iter()
        .enumerate()
        .filter(|(_, e)| le(e, 0, 4) as u32 == CMD_ADD_CHECKSUM)
        .nth(1)
        .unwrap()
        .0;
    assert!(first_sum < fadt_sum);
    let mut reordered: Vec<u8> = Vec::new();
    reordered.extend_from_slice(cmds[0]);
    reordered.extend_from_slice(cmds[1]);
    reordered.extend_from_slice(cmds[fadt_sum]);
    for (i, e) in cmds.iter().enumerate().skip(2) {
        if i != fadt_sum {
            reordered.extend_from_slice(e);
        }
    }
    let bad = FwCfgAcpi {
        loader: reordered,
        ..acpi.clone()
    };
    let m = run(&bad, &BASES[0], Flavor::Ovmf);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| walk(&m)));
    assert!(r.is_err(), "a FADT checksummed before its pointers passed");
    // The real order passes.
    walk(&run(&acpi, &BASES[0], Flavor::Ovmf));
}

#[test]
fn blobs_are_deterministic_and_whole_commands() {
    let c = cfg(2, 8, true);
    let a = firmware_blobs(&c, &platform(false)).unwrap();
    let b = firmware_blobs(&c, &platform(false)).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.loader.len() % ENTRY_LEN, 0);
    assert_eq!(a.rsdp.len(), 36);
    let names: Vec<&str> = a.files().iter().map(|f| f.0).collect();
    assert_eq!(
        names,
        ["etc/acpi/tables", "etc/acpi/rsdp", "etc/table-loader"]
    );
    // Two ALLOCATEs, 4 FADT + 3 RSDT + 3 XSDT + 2 RSDP pointers, 6 + 2 checksums.
    assert_eq!(a.loader.len() / ENTRY_LEN, 2 + 12 + 8);
    // Unpatched pointers are offsets into the tables blob; checksum bytes are zero.
    assert_eq!(a.rsdp[8], 0);
    assert_eq!(a.rsdp[32], 0);
    assert!(le(&a.rsdp, 24, 8) < a.tables.len() as u64);
}

#[test]
fn fadt_describes_the_q35_pm_block() {
    for vga in [false, true] {
        let acpi = firmware_blobs(&cfg(1, 1, false), &platform(vga)).unwrap();
        let m = run(&acpi, &BASES[0], Flavor::Ovmf);
        let xsdt = m.table(le(m.read(m.base(RSDP_FILE), 36), 24, 8));
        let f = m.table(le(xsdt, 36, 8));
        assert!(f[8] >= 2, "FADT revision");
        assert_eq!(le(f, 46, 2), 9, "SCI_INT");
        assert_eq!(le(f, 48, 4), 0, "SMI_CMD: no SMM, already in ACPI mode");
        assert_eq!(le(f, 56, 4), 0x600);
        assert_eq!(le(f, 64, 4), 0x604);
        assert_eq!(le(f, 76, 4), 0x608, "PM_TMR_BLK");
        assert_eq!(le(f, 80, 4), 0x620, "GPE0_BLK");
        assert_eq!([f[88], f[89], f[91], f[92]], [4, 2, 4, 16]);
        let arch = le(f, 109, 2);
        assert_eq!(arch, if vga { 3 } else { 7 }, "IAPC_BOOT_ARCH");
        assert_eq!(le(f, 112, 4) & (1 << 20), 0, "not hardware-reduced");
        assert_eq!(le(f, 112, 4) & (1 << 8), 0, "24-bit PM timer");
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(le(f, 120, 8), 0xcf9);
        assert_eq!(f[128], 6);
        assert_eq!(&f[208..212], &[1, 32, 0, 3], "X_PM_TMR_BLK");
        assert_eq!(le(f, 212, 8), 0x608);
        assert_eq!(&f[220..224], &[1, 128, 0, 1], "X_GPE0_BLK");
        assert_eq!(le(f, 224, 8), 0x620);
        let mcfg = m.table(le(xsdt, 52, 8));
        assert_eq!(le(mcfg, 44, 8), 0xb000_0000);
        assert_eq!((mcfg[54], mcfg[55]), (0, 255));
    }
}

#[test]
fn bad_windows_and_vcpu_counts_are_refused() {
    let c = cfg(1, 1, false);
    let mut p = platform(false);
    p.mmio64 = 5..5;
    assert!(matches!(
        firmware_blobs(&c, &p),
        Err(AcpiError::Window { .. })
    ));
    let mut p = platform(false);
    p.mmio32 = 0xc000_0000..0x1_0000_0001;
    assert!(matches!(
        firmware_blobs(&c, &p),
        Err(AcpiError::Window { .. })
    ));
    assert!(matches!(
        firmware_blobs(&cfg(3, 2, false), &platform(false)),
        Err(AcpiError::Vcpus(_))
    ));
}

#[test]
fn intx_routing_uses_gsis_16_to_19() {
    assert_eq!(intx_gsi(1, 0), 17);
    assert_eq!(intx_gsi(3, 1), 16);
    assert_eq!(intx_gsi(31, 3), 18);
    for s in 0..32 {
        for p in 0..4 {
            assert!((16..20).contains(&intx_gsi(s, p)));
        }
    }
}

/// A walk of the DSDT's top-level objects as SeaBIOS's small AML parser does it (only
/// Scope, Device, Name, Method, Package, Buffer, integers, strings, OperationRegion, Field,
/// Mutex): finds each Device's `_HID`. SeaBIOS looks for PNP0303 this way to enable its PS/2
/// keyboard; an opcode it does not know makes it skip the rest of that scope.
fn seabios_devices(aml: &[u8]) -> Vec<(String, Vec<u8>)> {
    fn pkglen(a: &[u8]) -> (usize, usize) {
        let n = usize::from(a[0] >> 6);
        if n == 0 {
            return (usize::from(a[0] & 0x3f), 1);
        }
        let mut l = usize::from(a[0] & 0x0f);
        for i in 0..n {
            l |= usize::from(a[1 + i]) << (4 + 8 * i);
        }
        (l, n + 1)
    }
    fn namestring(a: &[u8]) -> (String, usize) {
        let mut i = 0;
        let mut s = String::new();
        while a[i] == b'\\' || a[i] == b'^' {
            s.push(a[i] as char);
            i += 1;
        }
        let segs = match a[i] {
            0 => return (s, i + 1),
            0x2e => {
                i += 1;
                2
            }
            0x2f => {
                i += 2;
                usize::from(a[i - 1])
            }
            b'A'..=b'Z' | b'_' => 1,
            x => panic!("SeaBIOS cannot parse name byte {x:#x}"),
        };
        for k in 0..segs {
            if k > 0 {
                s.push('.');
            }
            s.push_str(std::str::from_utf8(&a[i..i + 4]).unwrap());
            i += 4;
        }
        (s, i)
    }
    fn int(a: &[u8]) -> usize {
        match a[0] {
            0 | 1 => 1,
            0x0a => 2,
            0x0b => 3,
            0x0c => 5,
            x => panic!("SeaBIOS cannot parse integer opcode {x:#x}"),
        }
    }
    /// Length of the term at `a[0]`; devices found go to `out`.
    fn term(a: &[u8], dev: &mut Option<usize>, out: &mut Vec<(String, Vec<u8>)>) -> usize {
        match a[0] {
            0 | 1 => 1,
            0x0a => 2,
            0x0b => 3,
            0x0c => 5,
            0x0d => a.iter().position(|&b| b == 0).unwrap() + 1,
            0x08 => {
                let (n, l) = namestring(&a[1..]);
                let v = term(&a[1 + l..], dev, out);
                if let (Some(d), "_HID") = (*dev, n.as_str()) {
                    out[d].1 = a[1 + l..1 + l + v].to_vec();
                }
                1 + l + v
            }
            0x10 => {
                let (len, pl) = pkglen(&a[1..]);
                let (_, nl) = namestring(&a[1 + pl..]);
                list(&a[1 + pl + nl..1 + len], dev, out);
                1 + len
            }
            0x11..=0x14 => 1 + pkglen(&a[1..]).0,
            0x5b => match a[1] {
                0x01 => 2 + namestring(&a[2..]).1 + 1,
                0x80 => {
                    let l = 2 + namestring(&a[2..]).1 + 1;
                    let l = l + int(&a[l..]);
                    l + int(&a[l..])
                }
                0x81 | 0x83..=0x85 => 2 + pkglen(&a[2..]).0,
                0x82 => {
                    let (len, pl) = pkglen(&a[2..]);
                    let (n, nl) = namestring(&a[2 + pl..]);
                    out.push((n, Vec::new()));
                    let mut inner = Some(out.len() - 1);
                    list(&a[2 + pl + nl..2 + len], &mut inner, out);
                    2 + len
                }
                x => panic!("SeaBIOS cannot parse extended opcode {x:#x}"),
            },
            x => panic!("SeaBIOS cannot parse opcode {x:#x}"),
        }
    }
    fn list(mut a: &[u8], dev: &mut Option<usize>, out: &mut Vec<(String, Vec<u8>)>) {
        while !a.is_empty() {
            let n = term(a, dev, out);
            assert!(n <= a.len(), "term overruns its scope");
            a = &a[n..];
        }
    }
    let mut out = Vec::new();
    list(aml, &mut None, &mut out);
    out
}

#[test]
fn seabios_finds_the_legacy_devices_in_the_dsdt() {
    for c in [cfg(1, 1, false), cfg(2, 8, true)] {
        let devs = seabios_devices(&firmware::dsdt_aml(&c, &platform(false)));
        let hid = |n: &str| {
            devs.iter()
                .find(|d| d.0 == n)
                .unwrap_or_else(|| panic!("no {n}: {devs:?}"))
                .1
                .clone()
        };
        // EISA ids as SeaBIOS matches them: DWord prefix, then the compressed id.
        assert_eq!(hid("KBD_"), [0x0c, 0x41, 0xd0, 0x03, 0x03]);
        assert_eq!(hid("MOU_"), [0x0c, 0x41, 0xd0, 0x0f, 0x13]);
        assert_eq!(hid("RTC_"), [0x0c, 0x41, 0xd0, 0x0b, 0x00]);
        assert_eq!(hid("COM1"), [0x0c, 0x41, 0xd0, 0x05, 0x01]);
        assert_eq!(hid("FWCF"), b"\x0dQEMU0002\0");
        assert_eq!(hid("PCI0"), [0x0c, 0x41, 0xd0, 0x0a, 0x08]);
    }
}

#[test]
fn iasl_decodes_the_firmware_tables() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = cfg(2, 8, true);
    let acpi = firmware_blobs(&c, &platform(false)).unwrap();
    let m = run(&acpi, &BASES[0], Flavor::Ovmf);
    let xsdt = m.table(le(m.read(m.base(RSDP_FILE), 36), 24, 8));
    let fadt = m.table(le(xsdt, 36, 8)).to_vec();
    let dsdt = m.table(le(&fadt, 140, 8)).to_vec();
    let Some(dsl) = super::tests::disassemble(d, "fwdsdt", &dsdt) else {
        eprintln!("SKIPPED: iasl is not installed (Debian package acpica-tools)");
        return;
    };
    super::tests::recompile(d, "fwdsdt");
    for want in [
        "Device (PCI0)",
        "Name (_PRT, Package (0x7C)",
        "0x0001FFFF,",
        "0x001FFFFF,",
        "Device (ISA)",
        "Name (_ADR, 0x001F0000)",
        "Device (KBD)",
        "EisaId (\"PNP0303\")",
        "Device (MOU)",
        "EisaId (\"PNP0F13\")",
        "IRQNoFlags ()",
        "{12}",
        "Device (RTC)",
        "EisaId (\"PNP0B00\")",
        "Device (COM1)",
        "Device (FWCF)",
        "Name (_HID, \"QEMU0002\")",
        "Name (_STA, 0x0B)",
        "0x0510, // Range Minimum\n 0x0510, // Range Maximum\n 0x01, // Alignment\n 0x0C, // Length",
        "0xC0000000, // Range Minimum\n 0xFEBFFFFF, // Range Maximum",
        "0x0000008000000000, // Range Minimum\n 0x000000FFFFFFFFFF, // Range Maximum",
        "Device (CPUS)",
        "Device (S1F)",
    ] {
        assert!(dsl.contains(want), "firmware DSDT lacks {want:?}:\n{dsl}");
    }
    assert!(
        !dsl.contains("0x000A0000, // Range Minimum"),
        "VGA window without VGA"
    );
    let vga = firmware_blobs(&c, &platform(true)).unwrap();
    let m = run(&vga, &BASES[1], Flavor::SeaBios);
    let xsdt = m.table(le(m.read(m.base(RSDP_FILE), 36), 24, 8));
    let vga_fadt = m.table(le(xsdt, 36, 8)).to_vec();
    let vga_dsdt = m.table(le(&vga_fadt, 140, 8)).to_vec();
    let vga_dsl = super::tests::disassemble(d, "fwdsdtvga", &vga_dsdt).unwrap();
    assert!(vga_dsl.contains("0x000A0000, // Range Minimum\n 0x000BFFFF, // Range Maximum"));
    let vga_fadt_dsl = super::tests::disassemble(d, "fwfacpvga", &vga_fadt).unwrap();
    assert!(vga_fadt_dsl.contains("VGA Not Present (V4) : 0"));
    let fadt_dsl = super::tests::disassemble(d, "fwfacp", &fadt).unwrap();
    for want in [
        "PM Timer Block Address : 00000608",
        "GPE0 Block Address : 00000620",
        "8042 Present on ports 60/64 (V2) : 1",
        "VGA Not Present (V4) : 1",
    ] {
        assert!(fadt_dsl.contains(want), "FADT lacks {want:?}:\n{fadt_dsl}");
    }
}
