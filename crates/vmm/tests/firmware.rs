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
