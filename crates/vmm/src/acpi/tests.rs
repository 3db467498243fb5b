use super::*;

fn sum(d: &[u8]) -> u8 {
    d.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn cfg(boot: u32, max: u32, pci_hotplug: bool) -> AcpiConfig {
    AcpiConfig {
        boot_vcpus: boot,
        max_vcpus: max,
        ram: 64 << 20,
        pci_hotplug,
    }
}

fn dsdt(c: &AcpiConfig) -> Vec<u8> {
    sdt(b"DSDT", 2, &dsdt_aml(0x1_0000_0000..0x11_0000_0000, c))
}

/// (type, bytes) of every MADT entry.
fn madt_entries(t: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    let mut at = 44;
    while at < t.len() {
        let len = t[at + 1] as usize;
        assert!(len >= 2 && at + len <= t.len(), "bad MADT entry at {at}");
        v.push((t[at], t[at..at + len].to_vec()));
        at += len;
    }
    v
}

/// (APIC id, flags) of every Local APIC / x2APIC entry.
fn madt_cpus(t: &[u8]) -> Vec<(u32, u32)> {
    let dw = |e: &[u8], o: usize| u32::from_le_bytes(e[o..o + 4].try_into().unwrap());
    madt_entries(t)
        .into_iter()
        .filter_map(|(ty, e)| match ty {
            0 => {
                assert_eq!(e[2], e[3], "UID = APIC id");
                Some((u32::from(e[3]), dw(&e, 4)))
            }
            9 => {
                assert_eq!(dw(&e, 4), dw(&e, 12), "UID = x2APIC id");
                Some((dw(&e, 4), dw(&e, 8)))
            }
            _ => None,
        })
        .collect()
}

fn has(a: &[u8], n: &[u8]) -> bool {
    a.windows(n.len()).any(|w| w == n)
}

#[test]
fn tables_checksum_to_zero() {
    assert_eq!(sum(&fadt(0x1000, 0x2000)), 0);
    assert_eq!(fadt(0x1000, 0x2000).len(), 276);
    for (b, m) in [(4, 4), (1, 4), (2, 8), (1, 300)] {
        assert_eq!(sum(&madt(b, m)), 0, "MADT {b}/{m}");
    }
    // Without hotplug the MADT is what it always was.
    assert_eq!(madt(2, 2).len(), 44 + 2 * 8 + 12 + 10 + 10 + 6);
    assert_eq!(sum(&mcfg()), 0);
    assert_eq!(mcfg().len(), 60);
    for c in [
        cfg(1, 1, false),
        cfg(1, 4, false),
        cfg(2, 8, true),
        cfg(1, 1, true),
    ] {
        assert_eq!(sum(&dsdt(&c)), 0, "{c:?}");
    }
}

#[test]
fn madt_lists_possible_vcpus_with_acpi_6_3_flags() {
    for (boot, max) in [(1u32, 1u32), (1, 4), (2, 8)] {
        let t = madt(boot, max);
        assert_eq!(&t[0..4], b"APIC");
        assert!(t[8] >= 5, "revision {} has no Online Capable bit", t[8]);
        let cpus = madt_cpus(&t);
        assert_eq!(cpus.len() as u32, max, "{boot}/{max}");
        for (i, (id, flags)) in cpus.into_iter().enumerate() {
            assert_eq!(id, i as u32);
            let want = if id < boot { 1 } else { 2 };
            assert_eq!(flags, want, "vCPU {id} of {boot}/{max}");
        }
        // IOAPIC, two overrides, one LAPIC NMI, as before.
        let kinds: Vec<u8> = madt_entries(&t).iter().map(|e| e.0).collect();
        assert_eq!(kinds.iter().filter(|&&k| k == 1).count(), 1);
        assert_eq!(kinds.iter().filter(|&&k| k == 2).count(), 2);
        assert_eq!(kinds.iter().filter(|&&k| k == 4).count(), 1);
        assert!(!kinds.contains(&9) && !kinds.contains(&0x0a));
    }
}

#[test]
fn madt_uses_x2apic_entries_above_254() {
    let t = madt(2, 300);
    let cpus = madt_cpus(&t);
    assert_eq!(cpus.len(), 300);
    let kinds: Vec<u8> = madt_entries(&t).iter().map(|e| e.0).collect();
    assert_eq!(kinds.iter().filter(|&&k| k == 0).count(), 255);
    assert_eq!(kinds.iter().filter(|&&k| k == 9).count(), 45);
    assert_eq!(kinds.iter().filter(|&&k| k == 0x0a).count(), 1);
    assert_eq!(cpus[299], (299, 2));
    assert_eq!(cpus[1], (1, 1));
}

#[test]
fn rsdp_and_xsdt_in_memory() {
    let mem = crate::boot::create_memory(64 << 20).unwrap();
    let at = write_tables(&mem, &cfg(2, 2, false)).unwrap();
    let mut r = [0u8; 36];
    mem.read_slice(&mut r, GuestAddress(at)).unwrap();
    assert_eq!(&r[0..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0);
    assert_eq!(sum(&r), 0);
    let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
    let mut sig = [0u8; 4];
    mem.read_slice(&mut sig, GuestAddress(xsdt)).unwrap();
    assert_eq!(&sig, b"XSDT");
}

#[test]
fn every_table_in_memory_checksums_with_hotplug() {
    let mem = crate::boot::create_memory(64 << 20).unwrap();
    let c = cfg(2, 8, true);
    write_tables(&mem, &c).unwrap();
    let t = build(&c).unwrap();
    assert_eq!(t.blobs.len(), 7);
    for (at, blob) in &t.blobs[1..] {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(*at)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, blob.len());
        let mut whole = vec![0u8; len];
        mem.read_slice(&mut whole, GuestAddress(*at)).unwrap();
        if &hdr[0..4] != b"FACS" {
            assert_eq!(sum(&whole), 0, "{}", String::from_utf8_lossy(&hdr[0..4]));
        }
    }
}

#[test]
fn bad_vcpu_counts_and_oversized_tables_are_refused() {
    let mem = crate::boot::create_memory(64 << 20).unwrap();
    for (b, m) in [(0, 0), (0, 4), (3, 2), (1, cpu::MAX_VCPUS + 1)] {
        assert!(
            matches!(
                write_tables(&mem, &cfg(b, m, false)),
                Err(AcpiError::Vcpus(_))
            ),
            "{b}/{m}"
        );
    }
    assert!(matches!(
        build(&cfg(1, cpu::MAX_VCPUS, true)),
        Err(AcpiError::TooBig { .. })
    ));
    // About 890 possible vCPUs fit next to PCI hotplug; 512 must.
    let t = build(&cfg(1, 512, true)).unwrap();
    assert!(t.end <= ACPI_END);
    // Nothing was written.
    let mut r = [0u8; 8];
    mem.read_slice(&mut r, GuestAddress(ACPI_START)).unwrap();
    assert_eq!(r, [0; 8]);
}

#[test]
fn dsdt_has_s5_and_pci() {
    let a = dsdt_aml(0x1_0000_0000..0x2_0000_0000, &cfg(1, 1, false));
    assert!(has(&a, b"_S5_"));
    assert!(has(&a, b"PCI0"));
    assert!(has(&a, b"COM1"));
}

#[test]
fn dsdt_without_hotplug_has_no_hotplug_objects() {
    for c in [cfg(1, 1, false), cfg(4, 4, false)] {
        let a = dsdt(&c);
        for n in [
            &b"CPUS"[..],
            b"PRES",
            b"GED_",
            b"PHPR",
            b"S01_",
            b"ACPI0013",
        ] {
            assert!(!has(&a, n), "{}", String::from_utf8_lossy(n));
        }
    }
    // The vCPU count alone does not change it.
    assert_eq!(dsdt(&cfg(1, 1, false)), dsdt(&cfg(4, 4, false)));
}

#[test]
fn dsdt_hotplug_pieces_follow_the_config() {
    let cpu_only = dsdt(&cfg(1, 4, false));
    assert!(has(&cpu_only, b"CPUS") && has(&cpu_only, b"GED_"));
    assert!(!has(&cpu_only, b"PHPR") && !has(&cpu_only, b"PCNT"));
    let pci_only = dsdt(&cfg(2, 2, true));
    assert!(has(&pci_only, b"PHPR") && has(&pci_only, b"GED_"));
    assert!(!has(&pci_only, b"CPUS") && !has(&pci_only, b"CSCN"));
}

/// `iasl -d` on `table` (named `name`); None when iasl is not installed.
pub(super) fn disassemble(dir: &std::path::Path, name: &str, table: &[u8]) -> Option<String> {
    let bin = dir.join(format!("{name}.dat"));
    std::fs::write(&bin, table).unwrap();
    let out = match std::process::Command::new("iasl")
        .arg("-d")
        .arg(&bin)
        .current_dir(dir)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("running iasl: {e}"),
    };
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name} failed:\n{log}");
    assert!(
        !log.contains("Error") && !log.contains("Warning") && !log.contains("Incorrect"),
        "iasl -d {name} complained:\n{log}"
    );
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
    // One space between words, so the checks do not depend on iasl's column layout.
    Some(
        dsl.split(' ')
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Compiles `dsl` back with iasl: no errors (the one warning, PCI0 with both _HID and
/// _ADR, predates hotplug and is what QEMU does too).
pub(super) fn recompile(dir: &std::path::Path, name: &str) {
    let out = std::process::Command::new("iasl")
        .arg("-p")
        .arg(dir.join(format!("{name}-rt")))
        .arg(dir.join(format!("{name}.dsl")))
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && log.contains(" 0 Errors"),
        "iasl cannot compile the disassembled {name}:\n{log}"
    );
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn iasl_decodes_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (boot, max) = (1, 1): what rvirt always had.
    let c = cfg(1, 1, false);
    let Some(dsl) = disassemble(d, "dsdt11", &dsdt(&c)) else {
        eprintln!("SKIPPED: iasl is not installed (Debian package acpica-tools)");
        return;
    };
    recompile(d, "dsdt11");
    assert!(dsl.contains("Device (PCI0)") && dsl.contains("Device (COM1)"));
    for absent in ["CPUS", "ACPI0007", "ACPI0013", "PHPR", "_EJ0"] {
        assert!(!dsl.contains(absent), "{absent} in a DSDT without hotplug");
    }
    let apic = disassemble(d, "apic11", &madt(1, 1)).unwrap();
    assert_eq!(count(&apic, "[Processor Local APIC]"), 1);
    assert_eq!(count(&apic, "Processor Enabled : 1"), 1);
    assert_eq!(count(&apic, "Runtime Online Capable : 1"), 0);

    // (1, 4): CPU hotplug only.
    let c = cfg(1, 4, false);
    let dsl = disassemble(d, "dsdt14", &dsdt(&c)).unwrap();
    recompile(d, "dsdt14");
    assert!(dsl.contains("Device (C003)") && !dsl.contains("Device (C004)"));
    assert!(dsl.contains("Device (GED)") && dsl.contains("\\_SB.CPUS.CSCN ()"));
    assert!(!dsl.contains("PCNT") && !dsl.contains("Device (S01)"));
    let apic = disassemble(d, "apic14", &madt(1, 4)).unwrap();
    assert_eq!(count(&apic, "[Processor Local APIC]"), 4);
    assert_eq!(count(&apic, "Processor Enabled : 1"), 1);
    assert_eq!(count(&apic, "Processor Enabled : 0"), 3);
    assert_eq!(count(&apic, "Runtime Online Capable : 1"), 3);

    // (2, 8) with PCI hotplug: everything.
    let c = cfg(2, 8, true);
    let dsl = disassemble(d, "dsdt28", &dsdt(&c)).unwrap();
    recompile(d, "dsdt28");
    for want in [
        "Device (CPUS)",
        "Name (_HID, \"ACPI0010\"",
        "Device (C000)",
        "Device (C003)",
        "Device (C007)",
        "Name (_HID, \"ACPI0007\"",
        "Name (_UID, 0x03)",
        "Return (CSTA (0x03))",
        "CEJT (0x03)",
        "Notify (C003, Arg1)",
        "Method (CSCN, 0, Serialized)",
        "Mutex (CPLK, 0x00)",
        "Acquire (\\_SB.PRES.CPLK, 0xFFFF)",
        "OperationRegion (PRST, SystemIO, 0x0CD8, 0x0C)",
        "Device (GED)",
        "Name (_HID, \"ACPI0013\"",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
        "0x00000005,",
        "OperationRegion (GDST, SystemIO, 0x0CE4, 0x04)",
        "Method (_EVT, 1, Serialized)",
        "\\_SB.CPUS.CSCN ()",
        "\\_SB.PCI0.PCNT ()",
        "Device (PHPR)",
        "OperationRegion (PCST, SystemIO, 0x0CE8, 0x10)",
        "Device (S01)",
        "Device (S03)",
        "Name (_ADR, 0x00030000)",
        "Name (_SUN, 0x03)",
        "\\_SB.PHPR.PCEJ (0x03)",
        "Device (S1F)",
        "Notify (S1F, Arg1)",
        "Method (PCNT, 0, Serialized)",
        "DVNT (Local1, 0x03)",
    ] {
        assert!(dsl.contains(want), "DSDT (2, 8) lacks {want:?}");
    }
    assert!(!dsl.contains("Device (C008)") && !dsl.contains("Device (S00)"));
    // Every possible vCPU but the BSP can be ejected; every slot too.
    assert_eq!(count(&dsl, "Method (_EJ0, 1"), 7 + 31);
    assert_eq!(count(&dsl, "Method (_MAT, 0"), 8);
    let apic = disassemble(d, "apic28", &madt(2, 8)).unwrap();
    assert_eq!(count(&apic, "[Processor Local APIC]"), 8);
    assert_eq!(count(&apic, "Processor Enabled : 1"), 2);
    assert_eq!(count(&apic, "Runtime Online Capable : 1"), 6);
    assert!(apic.contains("Local Apic ID : 07"));

    // (1, 300): x2APIC entries from id 255 on.
    let c = cfg(1, 300, true);
    let dsl = disassemble(d, "dsdt300", &dsdt(&c)).unwrap();
    assert!(dsl.contains("Device (C12B)") && !dsl.contains("Device (C12C)"));
    let apic = disassemble(d, "apic300", &madt(1, 300)).unwrap();
    assert_eq!(count(&apic, "[Processor Local APIC]"), 255);
    assert_eq!(count(&apic, "[Processor Local x2APIC]"), 45);
    assert_eq!(count(&apic, "[Local x2APIC NMI]"), 1);
    assert!(apic.contains("Processor x2Apic ID : 0000012B"));
}

/// Runs ACPICA's acpiexec on `dsdt`: I/O regions are simulated as memory filled with
/// `fill`, with the field values of `init` (lines "\PATH VALUE") stored first, and
/// `commands` in batch mode (AML while loops time out after 10 s). None when acpiexec is
/// not installed. Fails on any ACPICA exception, error or warning.
fn acpiexec(
    dir: &std::path::Path,
    dsdt: &[u8],
    fill: u8,
    init: &str,
    commands: &str,
) -> Option<String> {
    let table = dir.join("exec-dsdt.dat");
    std::fs::write(&table, dsdt).unwrap();
    let init_file = dir.join("exec-init.txt");
    std::fs::write(&init_file, init).unwrap();
    let out = match std::process::Command::new("acpiexec")
        .args(["-to", "10", "-fv"])
        .arg(format!("{fill:#x}"))
        .arg("-fi")
        .arg(&init_file)
        .arg("-b")
        .arg(commands)
        .arg(&table)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("running acpiexec: {e}"),
    };
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "acpiexec failed:\n{log}");
    for bad in ["AE_", "Error", "Warning", "failed", "Exception"] {
        assert!(!log.contains(bad), "acpiexec: {bad}:\n{log}");
    }
    for cmd in commands.split(';') {
        let method = cmd.split_whitespace().nth(1).unwrap();
        assert!(
            log.contains(&format!("Evaluating {method}")),
            "{method} not run:\n{log}"
        );
    }
    Some(log)
}

fn notified(log: &str) -> Vec<(String, u8)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("Received a System Notify on [").nth(1)?;
            let name = rest.get(..4)?.trim_end_matches('_').to_string();
            let v = rest.split("Value 0x").nth(1)?.get(..2)?;
            Some((name, u8::from_str_radix(v, 16).ok()?))
        })
        .collect()
}

/// The hotplug methods run under ACPICA's interpreter without exceptions, dispatch the
/// GED events to the scans, and notify the right devices. acpiexec's simulated regions
/// are plain memory, not our controllers (their logic has its own tests): this checks the
/// AML, its argument counts, types and paths, and that it stops on hostile port values.
#[test]
fn acpiexec_runs_the_hotplug_methods() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let table = dsdt(&cfg(2, 8, true));
    // Nothing pending (controllers read 0): every method runs, nothing is notified.
    let all = "execute \\_SB.GED._EVT 5; execute \\_SB.CPUS.CSCN; \
               execute \\_SB.CPUS.C001._STA; execute \\_SB.CPUS.C001._MAT; \
               execute \\_SB.CPUS.C001._EJ0 0; execute \\_SB.PCI0.PCNT; \
               execute \\_SB.PCI0.S03._EJ0 0; execute \\_SB.PHPR.PCEJ 31";
    let Some(log) = acpiexec(d, &table, 0, "", all) else {
        eprintln!("SKIPPED: acpiexec is not installed (Debian package acpica-tools)");
        return;
    };
    assert!(notified(&log).is_empty(), "{log}");
    assert!(
        log.contains("[Integer] = 0000000000000000"),
        "C001 absent:\n{log}"
    );
    assert!(
        log.contains("0000: 00 08 01 01 02 00 00 00"),
        "disabled _MAT:\n{log}"
    );

    // A present vCPU: _STA 0xF and the enabled _MAT entry.
    let log = acpiexec(
        d,
        &table,
        0,
        "\\_SB.PRES.CPEN 1\n",
        "execute \\_SB.CPUS.C005._STA; execute \\_SB.CPUS.C005._MAT",
    )
    .unwrap();
    assert!(log.contains("[Integer] = 000000000000000F"), "{log}");
    assert!(log.contains("0000: 00 08 05 05 01 00 00 00"), "{log}");

    // Pending events: PCI slot 3 up, slot 5 down, vCPU 3 inserted; both GED bits.
    let init = "\\_SB.GED_.GDAT 3\n\\_SB.PHPR.PCIU 0x8\n\\_SB.PHPR.PCID 0x20\n\
                \\_SB.PRES.CDAT 3\n\\_SB.PRES.CINS 1\n";
    let log = acpiexec(d, &table, 0, init, "execute \\_SB.GED._EVT 5").unwrap();
    let n = notified(&log);
    assert!(n.contains(&("C003".into(), 1)), "{log}");
    assert!(n.contains(&("S03".into(), 1)), "{log}");
    assert!(n.contains(&("S05".into(), 3)), "{log}");
    assert!(
        !n.iter()
            .any(|(d, _)| d == "C000" || d == "C001" || d == "C002"),
        "{log}"
    );

    // No controllers on the bus (ports read all ones): the scans end and notify nothing,
    // and no vCPU looks present.
    let log = acpiexec(
        d,
        &table,
        0xff,
        "",
        "execute \\_SB.GED._EVT 5; execute \\_SB.CPUS.C003._STA",
    )
    .unwrap();
    assert!(notified(&log).is_empty(), "{log}");
    assert!(log.contains("[Integer] = 0000000000000000"), "{log}");
}

/// FNV-1a of every (address, bytes) the direct-boot tables write.
fn fnv(t: &Tables) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (at, d) in &t.blobs {
        for x in at.to_le_bytes().iter().chain(d.iter()) {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// The direct-boot tables are byte for byte what they were before the firmware mode was
/// added (hashes taken from that version).
#[test]
fn direct_boot_tables_are_unchanged() {
    for (b, m, hp, ram, want, end) in [
        (
            1u32,
            1u32,
            false,
            64u64 << 20,
            0xc87c_e349_021f_16d0u64,
            0xe03bcu64,
        ),
        (2, 8, true, 4 << 30, 0xaf95_255a_a559_bd0b, 0xe12fc),
        (1, 4, false, 512 << 20, 0x4082_8b0b_51c6_8884, 0xe085c),
        (4, 4, true, 1 << 30, 0x684b_6ff1_c704_c21f, 0xe0d1c),
    ] {
        let c = AcpiConfig {
            boot_vcpus: b,
            max_vcpus: m,
            ram,
            pci_hotplug: hp,
        };
        let t = build(&c).unwrap();
        assert_eq!((fnv(&t), t.end), (want, end), "{c:?}");
    }
}
