//! An OS install from a CD through unmodified firmware inside the test host: rvirt-vmm boots
//! Debian's SeaBIOS (and OVMF, where the outer QEMU can run it), which boots a grub-mkrescue CD
//! (guest/install-iso) from a virtio-scsi CD-ROM ahead of a blank disk; GRUB starts Linux,
//! whose sr driver reads the disc and copies it onto the disk; then the disk boots by itself.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rvirt_tests::{workspace_root, Scenario, TestHost};

/// Builds (once, cached) the installer CD and returns its fixture directory.
fn install_iso() -> PathBuf {
    let out = Command::new(workspace_root().join("guest/install-iso"))
        .output()
        .expect("run guest/install-iso");
    assert!(
        out.status.success(),
        "guest/install-iso failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn scenario(fw: &str) -> Scenario {
    let iso = install_iso();
    let s = Scenario::file("firmware-install.sh")
        .bin("rvirt-vmm")
        .with_file(iso.join("install.iso"), "/fw/install.iso")
        .arg("fw", fw)
        .timeout(Duration::from_secs(900));
    match fw {
        "bios" => s.with_file("/usr/share/seabios/bios-256k.bin", "/fw/bios-256k.bin"),
        _ => s
            .with_file("/usr/share/OVMF/OVMF_CODE_4M.fd", "/fw/OVMF_CODE_4M.fd")
            .with_file("/usr/share/OVMF/OVMF_VARS_4M.fd", "/fw/OVMF_VARS_4M.fd"),
    }
}

const INSTALL: &[&str] = &[
    "install.grub",
    "install.cpus",
    "install.cd.drive",
    "install.cd.read",
    "install.install.copy",
    "install.done",
    "install.exit",
    "disk.installed",
    "installed.installed.boot",
    "installed.done",
    "installed.exit",
];

#[test]
fn seabios_installs_from_a_virtio_scsi_cdrom_then_boots_the_disk() {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let out = TestHost::run(&scenario("bios")).expect("test host run");
    eprintln!("{}", out.summary());
    out.expect_passed(INSTALL);
}

/// The same install with Debian's OVMF and a private copy of its variable store. OVMF makes
/// Debian's QEMU abort when it emulates the test host (docs/firmware-testing.md), so the test
/// host runs under guest/qemu's patched build (built once and cached).
#[test]
fn ovmf_installs_from_a_virtio_scsi_cdrom_then_boots_the_disk() {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let out = TestHost::run(&scenario("efi").outer_qemu("patched")).expect("test host run");
    eprintln!("{}", out.summary());
    let mut want = INSTALL.to_vec();
    want.push("efi.nvram");
    out.expect_passed(&want);
}
