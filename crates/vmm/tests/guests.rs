//! Boots the tiny guests from rvirt-testkit with the real `rvirt-vmm` binary and checks what
//! they print and how the VMM exits. Skipped (with a message) without a usable /dev/kvm.

use std::process::{Command, Output};
use std::time::Duration;

use rvirt_testkit::GuestImage;

const VMM: &str = env!("CARGO_BIN_EXE_rvirt-vmm");

fn skip() -> bool {
    if let Some(why) = rvirt_testkit::kvm_unavailable() {
        eprintln!("skipped: {why}");
        return true;
    }
    false
}

/// Run the VMM on `img`, killing it after 30 s.
fn boot(img: &GuestImage, extra: &[&str]) -> Output {
    boot_env(img, extra, &[])
}

/// [`boot`] with environment variables for the VMM.
fn boot_env(img: &GuestImage, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(VMM);
    cmd.arg("--kernel")
        .arg(img.path())
        .args(["--memory", "64M", "--serial", "stdio"])
        .args(extra)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    run_with_timeout(cmd, Duration::from_secs(30))
}

fn run_with_timeout(mut cmd: Command, t: Duration) -> Output {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("spawn rvirt-vmm");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(t).is_err() {
            // SAFETY: kill on our own child's pid; at worst the pid is already reaped (ESRCH).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("wait rvirt-vmm");
    let _ = tx.send(());
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn serial_hello_powers_off_with_exit_0() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::serial_hello().unwrap();
    let out = boot(&img, &[]);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout {so:?} stderr {se:?}");
    assert_eq!(so, "hello from guest\n");
    assert!(se.contains("boot-timer: "), "{se}");
}

/// The guest owns the boot-timer port: writing it in a loop must not fill the domain log (one
/// line a second at most, the rest counted).
#[test]
fn boot_port_flood_is_rate_limited() {
    if skip() {
        return;
    }
    let writes = 20_000;
    let img = rvirt_testkit::boot_port_flood(writes).unwrap();
    let t = std::time::Instant::now();
    let out = boot(&img, &[]);
    let secs = t.elapsed().as_secs();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout {so:?} stderr {se:?}");
    assert_eq!(so, "flooded\n");
    let lines = se.lines().filter(|l| l.starts_with("boot-timer: ")).count();
    assert!(lines >= 1, "{se}");
    assert!(
        lines as u64 <= secs + 2,
        "{lines} boot-timer lines in {secs} s for {writes} writes:\n{se}"
    );
}

/// rvirt-vmm's `log` records reach stderr (which rvirtd appends to the domain log), at the
/// level RVIRT_LOG names; an unknown level is said so, not ignored.
#[test]
fn log_records_reach_stderr_at_the_rvirt_log_level() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::serial_hello().unwrap();
    let out = boot_env(&img, &[], &[("RVIRT_LOG", "debug")]);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{se}");
    assert!(
        se.contains("rvirt-vmm: debug: rvirt_vmm::vstate::vm: guest RAM: "),
        "{se}"
    );

    let out = boot_env(&img, &[], &[("RVIRT_LOG", "loud")]);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{se}");
    assert!(se.contains("rvirt-vmm: warn: "), "{se}");
    assert!(se.contains("RVIRT_LOG=\"loud\" is not a level"), "{se}");
    assert!(
        !se.contains("guest RAM: "),
        "debug lines at the default level: {se}"
    );
}

#[test]
fn serial_hello_with_two_vcpus_and_1g() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::serial_hello().unwrap();
    let out = boot(&img, &["--cpus", "2", "--memory", "1G"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from guest\n");
}

#[test]
fn serial_none_discards_output() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::serial_hello().unwrap();
    let out = boot(&img, &["--serial", "none"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn i8042_reset_is_reboot_exit_3() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::i8042_reboot().unwrap();
    let out = boot(&img, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "rebooting\n");
}

#[test]
fn acpi_reset_register_is_reboot_exit_3() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::acpi_reset().unwrap();
    let out = boot(&img, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}

#[test]
fn triple_fault_is_crash_exit_4() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::triple_fault().unwrap();
    let out = boot(&img, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
}

#[test]
fn pci_config_reads_host_bridge_and_virtio_rng() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::pci_probe().unwrap();
    let out = boot(&img, &[]);
    let so = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Host bridge 8086:0d57; without disks or NICs 00:01.0 is virtio-rng (1af4:1044).
    assert!(so.contains("pci 00:00.0 0d578086\n"), "{so}");
    assert!(so.contains("pci 00:01.0 10441af4\n"), "{so}");
    assert!(so.contains("ecam 00:00.0 0d578086\n"), "{so}");
}

#[test]
fn pci_first_slot_is_the_disk() {
    if skip() {
        return;
    }
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let img = rvirt_testkit::pci_probe().unwrap();
    let spec = format!("path={},format=raw", disk.path().display());
    let out = boot(&img, &["--disk", &spec]);
    let so = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(so.contains("pci 00:01.0 10421af4\n"), "{so}");
}

fn vmm(args: &[&str]) -> Output {
    let mut cmd = Command::new(VMM);
    cmd.args(args);
    run_with_timeout(cmd, Duration::from_secs(30))
}

#[test]
fn missing_kernel_is_exit_1_naming_the_file() {
    let out = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/vmlinux"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn not_a_kernel_is_exit_1() {
    if skip() {
        return;
    }
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), b"this is not a kernel at all").unwrap();
    let p = f.path().display().to_string();
    let out = vmm(&["--kernel", &p, "--memory", "64M"]);
    assert_eq!(out.status.code(), Some(1));
    let se = text(&out.stderr);
    assert!(se.contains(&p) && se.contains("not a kernel"), "{se}");
}

#[test]
fn bad_memory_and_cpus_are_exit_1() {
    let img = rvirt_testkit::serial_hello().unwrap();
    let k = img.path().display().to_string();
    for (args, want) in [
        (vec!["--memory", "0"], "--memory"),
        (vec!["--memory", "5T"], "too big"),
        (vec!["--cpus", "0"], "--cpus 0"),
        (
            vec!["--disk", "path=/nonexistent/d.img"],
            "/nonexistent/d.img",
        ),
        (vec!["--serial", "file"], "--serial"),
    ] {
        let mut a = vec!["--kernel", &k];
        a.extend(args.iter());
        let out = vmm(&a);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains(want),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn too_many_cpus_for_kvm_is_exit_1() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::serial_hello().unwrap();
    let k = img.path().display().to_string();
    // 254 is accepted by the parser; most hosts' KVM allow more, so only check it does not
    // panic and gives a definite answer.
    let out = vmm(&[
        "--kernel", &k, "--cpus", "254", "--memory", "64M", "--serial", "none",
    ]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn usage_errors_are_exit_2() {
    let out = vmm(&["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let out = vmm(&[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn pvh_start_info_carries_cmdline_and_initrd() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::pvh_info().unwrap();
    let initrd = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(initrd.path(), b"INITRD-OK\0padding").unwrap();
    let ip = initrd.path().display().to_string();
    let out = boot(&img, &["--cmdline", "console=ttyS0 x=1", "--initrd", &ip]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "cmdline: console=ttyS0 x=1\ninitrd: INITRD-OK\n"
    );
}

#[test]
fn elf_without_pvh_note_boots_in_long_mode_with_zero_page() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::elf64_hello().unwrap();
    let out = boot(&img, &["--cmdline", "root=/dev/vda"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "hello from long mode\ncmdline: root=/dev/vda\n"
    );
}

#[test]
fn bzimage_boots_at_64_bit_entry_with_zero_page() {
    if skip() {
        return;
    }
    let img = rvirt_testkit::bzimage_hello().unwrap();
    let out = boot(&img, &["--cmdline", "quiet", "--cpus", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from bzImage\ncmdline: quiet\n");
}

#[test]
fn serial_socket_carries_input_and_output() {
    use std::io::{Read, Write};
    if skip() {
        return;
    }
    let img = rvirt_testkit::serial_echo().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("serial.sock");
    let spec = format!("socket={}", sock.display());
    let mut child = Command::new(VMM)
        .arg("--kernel")
        .arg(img.path())
        .args(["--memory", "64M", "--serial", &spec])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let mut s = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no serial socket");
        std::thread::sleep(Duration::from_millis(10));
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"hi q").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while got.len() < 4 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "console closed early: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"hi q");
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert!(!sock.exists(), "serial socket left behind");
}

/// A sector-0 pattern nobody would produce by accident.
fn sector0_pattern() -> [u8; 512] {
    let mut p = [0u8; 512];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0x5a;
    }
    p[..16].copy_from_slice(b"RVIRT-SECTOR-0!!");
    p
}

/// A 1 MiB raw disk: sector 0 = [`sector0_pattern`], every other byte 0x11.
fn pattern_disk() -> tempfile::NamedTempFile {
    let disk = tempfile::NamedTempFile::new().unwrap();
    let mut bytes = vec![0x11u8; 1 << 20];
    bytes[..512].copy_from_slice(&sector0_pattern());
    std::fs::write(disk.path(), &bytes).unwrap();
    disk
}

const WRITE_SECTOR: u32 = 5;

/// What the guest of `rvirt_testkit::virtio_blk_rw` prints when the device behaves: the disk
/// in slot 1; three used elements (head 0 wrote 512 data + 1 status bytes, head 3 only its
/// status, head 6 the 20-byte id + status); three OK statuses below the 0xEE guard; the read
/// matched; the id is "disk0"; reset read back 0.
const BLK_OK: &str = "virtio-blk slot 00000001\n\
    used 00000003 00000000 00000201 00000003 00000001 00000006 00000015\n\
    status ee000000\n\
    read ok\n\
    id disk0\n\
    reset ok\n";

/// Checks the disk after the guest ran: the written sector holds the guest's bytes, and
/// nothing else changed.
fn assert_disk_after_guest(disk: &std::path::Path) {
    let after = std::fs::read(disk).unwrap();
    assert_eq!(after.len(), 1 << 20);
    assert_eq!(&after[..512], &sector0_pattern()[..], "sector 0 changed");
    let w = WRITE_SECTOR as usize * 512;
    assert_eq!(
        &after[w..w + 512],
        &rvirt_testkit::blk_guest_sector()[..],
        "sector {WRITE_SECTOR} does not hold the guest's data"
    );
    assert!(
        after[512..w]
            .iter()
            .chain(&after[w + 512..])
            .all(|&b| b == 0x11),
        "bytes outside sector {WRITE_SECTOR} changed"
    );
}

#[test]
fn guest_driver_reads_and_writes_through_virtio_blk() {
    if skip() {
        return;
    }
    let disk = pattern_disk();
    let img = rvirt_testkit::virtio_blk_rw(&sector0_pattern(), WRITE_SECTOR).unwrap();
    let spec = format!("path={},format=raw", disk.path().display());
    let out = boot(&img, &["--disk", &spec]);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout {so:?} stderr {se:?}");
    assert_eq!(so, BLK_OK, "stderr {se}");
    assert_disk_after_guest(disk.path());
}

#[test]
fn guest_driver_sees_a_wrong_sector_0_and_a_read_only_disk_refusing_the_write() {
    if skip() {
        return;
    }
    // The guest expects a different sector 0 and the disk is read-only: the guest must say
    // "read mismatch", the write must get VIRTIO_BLK_S_IOERR (1) and the file stay unchanged.
    let disk = pattern_disk();
    let mut other = sector0_pattern();
    other[100] ^= 1;
    let img = rvirt_testkit::virtio_blk_rw(&other, WRITE_SECTOR).unwrap();
    let spec = format!("path={},format=raw,readonly=on", disk.path().display());
    let out = boot(&img, &["--disk", &spec]);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout {so:?} stderr {se:?}");
    assert!(so.contains("read mismatch\n"), "{so}");
    assert!(so.contains("status ee000100\n"), "{so}");
    let after = std::fs::read(disk.path()).unwrap();
    let mut want = vec![0x11u8; 1 << 20];
    want[..512].copy_from_slice(&sector0_pattern());
    assert!(after == want, "a read-only disk was modified");
}
