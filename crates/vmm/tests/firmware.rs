//! Firmware boot with Debian's unmodified SeaBIOS (`bios-256k.bin`, from the seabios package
//! that scripts/install-deps installs): the firmware runs from the reset vector on the q35
//! platform, finds fw_cfg, enumerates PCI (MCH 8086:29C0 + ICH9 LPC), and boots a one-sector
//! MBR from a virtio-blk disk, which prints a marker and powers off. Skipped without a usable
//! /dev/kvm.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_rvirt-vmm");
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

fn skip() -> bool {
    if let Some(why) = rvirt_testkit::kvm_unavailable() {
        eprintln!("skipped: {why}");
        return true;
    }
    assert!(
        std::path::Path::new(SEABIOS).is_file(),
        "{SEABIOS} is missing: run ./scripts/install-deps (Debian's seabios package)"
    );
    false
}

fn run(args: &[&str], limit: Duration) -> (Option<i32>, String, String, Duration) {
    let mut child = Command::new(VMM)
        .args(args)
        // SeaBIOS's own log (debugcon 0x402) shows what it found of the platform.
        .env("RVIRT_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rvirt-vmm");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    let out = child.wait_with_output().expect("output");
    (
        status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    )
}

#[test]
fn seabios_boots_an_mbr_from_virtio_blk() {
    if skip() {
        return;
    }
    let disk = rvirt_testkit::mbr_hello("rvirt: booted by the BIOS\n").unwrap();
    let spec = format!("path={},format=raw", disk.path().display());
    let (status, out, err, took) = run(
        &[
            "--firmware",
            SEABIOS,
            "--memory",
            "128M",
            "--cpus",
            "2",
            "--disk",
            &spec,
            "--serial",
            "stdio",
        ],
        Duration::from_secs(60),
    );
    eprintln!("SeaBIOS → MBR → poweroff took {took:?}");
    // SeaBIOS's own banner on the serial console (etc/sercon-port), then the boot sector.
    assert!(
        out.contains("SeaBIOS (version"),
        "stdout: {out}\nstderr: {err}"
    );
    assert!(
        out.contains("rvirt: booted by the BIOS"),
        "stdout: {out}\nstderr: {err}"
    );
    assert_eq!(status, Some(0), "stdout: {out}\nstderr: {err}");
    // What SeaBIOS itself reports: QEMU's q35 recognised (MCH id + subsystem), fw_cfg with DMA,
    // both vCPUs brought up (fw_cfg NB_CPUS = CMOS = MADT), rvirt's DSDT from the
    // table-loader parsed, the PM block where the tables say, the PS/2 controller answering.
    for want in [
        "Running on QEMU (q35)",
        "QEMU fw_cfg DMA interface supported",
        "Found 2 cpu(s) max supported 2 cpu(s)",
        "ACPI: parse DSDT",
        "found virtio-blk at 00:01.0",
    ] {
        assert!(err.contains(want), "SeaBIOS did not log {want:?}:\n{err}");
    }
    for bad in ["Timeout at i8042", "PMBASE", "triple fault"] {
        assert!(!err.contains(bad), "unexpected {bad:?}:\n{err}");
    }
}

#[test]
fn firmware_images_are_checked_before_the_vm_starts() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("short.bin");
    std::fs::write(&bad, b"not firmware").unwrap();
    let (status, _, err, _) = run(
        &["--firmware", bad.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(status, Some(1), "{err}");
    assert!(err.contains("--firmware") && err.contains("4 KiB"), "{err}");
    let (status, _, err, _) = run(
        &["--firmware", SEABIOS, "--kernel", "/x"],
        Duration::from_secs(10),
    );
    assert_eq!(status, Some(2), "{err}");
}

/// An El Torito CD (ISO 9660 made by xorriso, as grub-mkrescue makes them) whose no-emulation
/// boot image is `mbr_hello`'s boot sector: the BIOS loads it at 0x7C00 and runs it.
fn hello_iso(dir: &std::path::Path, msg: &str) -> std::path::PathBuf {
    let sector = rvirt_testkit::mbr_hello(msg).unwrap();
    let bytes = std::fs::read(sector.path()).unwrap();
    let root = dir.join("iso-root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("boot.img"), &bytes[..2048]).unwrap();
    std::fs::write(root.join("README.TXT"), b"rvirt test disc\n").unwrap();
    let iso = dir.join("hello.iso");
    let out = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "RVIRT_TEST", "-o"])
        .arg(&iso)
        .args(["-b", "boot.img", "-no-emul-boot", "-boot-load-size", "4"])
        .arg(&root)
        .output()
        .expect("xorriso (Debian's xorriso package; run ./scripts/install-deps)");
    assert!(
        out.status.success(),
        "xorriso: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    iso
}

/// Boots SeaBIOS with a virtio-blk disk and a virtio-scsi CD-ROM, each printing its own
/// marker, in the boot order given; returns (stdout, SeaBIOS log).
fn boot_disk_and_cd(disk_first: bool) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let disk = rvirt_testkit::mbr_hello("rvirt: booted from the hard disk\n").unwrap();
    let iso = hello_iso(dir.path(), "rvirt: booted from the CD-ROM\n");
    let (d, c) = if disk_first { (1, 2) } else { (2, 1) };
    let disk = format!("path={},format=raw,bootindex={d}", disk.path().display());
    let cd = format!("path={},bus=scsi,device=cdrom,bootindex={c}", iso.display());
    let (status, out, err, took) = run(
        &[
            "--firmware",
            SEABIOS,
            "--memory",
            "128M",
            "--disk",
            &disk,
            "--disk",
            &cd,
            "--serial",
            "stdio",
        ],
        Duration::from_secs(60),
    );
    eprintln!("SeaBIOS → boot sector (disk first: {disk_first}) took {took:?}");
    assert_eq!(status, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        !out.contains("Press ESC for boot menu"),
        "no menu unless asked: {out}"
    );
    (out, err)
}

#[test]
fn seabios_boots_a_cd_on_virtio_scsi_in_the_boot_order() {
    if skip() {
        return;
    }
    let (out, err) = boot_disk_and_cd(false);
    assert!(
        out.contains("rvirt: booted from the CD-ROM") && !out.contains("hard disk"),
        "stdout: {out}\nstderr: {err}"
    );
    // SeaBIOS found the controller, saw an MMC drive (INQUIRY type 5, READ CAPACITY of 2048-byte
    // blocks) and matched it against the fw_cfg bootorder path rvirt wrote for it.
    for want in [
        "found virtio-scsi at 00:02.0",
        "Searching bootorder for: /pci@i0cf8/*@2/*@0/*@0,0",
        "Booting from DVD/CD",
    ] {
        assert!(err.contains(want), "SeaBIOS did not log {want:?}:\n{err}");
    }
    // The other way round: the disk's priority wins.
    let (out, err) = boot_disk_and_cd(true);
    assert!(
        out.contains("rvirt: booted from the hard disk") && !out.contains("CD-ROM"),
        "stdout: {out}\nstderr: {err}"
    );
}

#[test]
fn seabios_boots_an_mbr_from_a_virtio_scsi_disk() {
    if skip() {
        return;
    }
    let disk = rvirt_testkit::mbr_hello("rvirt: booted from sda\n").unwrap();
    let spec = format!("path={},format=raw,bus=scsi,unit=3", disk.path().display());
    let (status, out, err, _) = run(
        &[
            "--firmware",
            SEABIOS,
            "--memory",
            "128M",
            "--disk",
            &spec,
            "--disk",
            "bus=scsi,device=cdrom",
            "--boot-menu",
            "200",
            "--serial",
            "stdio",
        ],
        Duration::from_secs(60),
    );
    assert!(
        out.contains("rvirt: booted from sda"),
        "stdout: {out}\nstderr: {err}"
    );
    // fw_cfg BOOT_MENU + etc/boot-menu-wait: SeaBIOS offers its menu, then boots on its own.
    assert!(out.contains("Press ESC for boot menu"), "stdout: {out}");
    assert_eq!(status, Some(0), "stdout: {out}\nstderr: {err}");
    // Both targets answer INQUIRY as QEMU's do (the empty drive at target 0 as an MMC
    // device), and the disk's READ CAPACITY gives its 2048 sectors.
    for want in [
        "found virtio-scsi at 00:01.0",
        "product='QEMU CD-ROM' rev='2.5+' type=5 removable=1",
        "product='QEMU HARDDISK' rev='2.5+' type=0 removable=0",
        "virtio-scsi blksize=512 sectors=2048",
    ] {
        assert!(err.contains(want), "SeaBIOS did not log {want:?}:\n{err}");
    }
}
