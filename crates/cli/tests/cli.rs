//! The `rvirt` binary against a real `rvirtd` supervising `rvirt-fake-vmm` (a test double of
//! rvirt-vmm speaking its control protocol; it runs no guest). Both daemon binaries come from the
//! same target dir; `cargo test --workspace` builds them.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::Env;

impl Env {
    fn start() -> Option<Env> {
        Env::launch(&[&["destroy", "vm1"], &["destroy", "inst"]], |_| {})
    }

    fn xml_file(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.xml"));
        std::fs::write(
            &p,
            format!(
                "<domain type='kvm'>\n  <name>{name}</name>\n  <memory unit='MiB'>64</memory>\n  <vcpu>2</vcpu>\n  <os>\n    <type>hvm</type>\n    <kernel>{k}</kernel>\n  </os>\n  <devices>\n    <disk type='file'>\n      <source file='{d}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    <interface type='bridge'>\n      <source bridge='br-test'/>\n    </interface>\n  </devices>\n</domain>\n",
                k = self.dir.path().join("vmlinux").display(),
                d = self.dir.path().join("disk.img").display()
            ),
        )
        .unwrap();
        p
    }

    fn xml_file_no_nic(&self, name: &str) -> PathBuf {
        let p = self.xml_file(name);
        let x = std::fs::read_to_string(&p).unwrap();
        let start = x.find("    <interface").unwrap();
        let end = x.find("</interface>\n").unwrap() + "</interface>\n".len();
        std::fs::write(&p, format!("{}{}", &x[..start], &x[end..])).unwrap();
        p
    }
}

#[test]
fn virsh_layouts_and_messages() {
    let Some(e) = Env::start() else { return };
    let f1 = e.xml_file_no_nic("vm1");
    let f2 = e.xml_file("vm2");
    assert_eq!(
        e.ok(&["define", f1.to_str().unwrap()]),
        format!("Domain 'vm1' defined from {}\n\n", f1.display())
    );
    e.ok(&["define", f2.to_str().unwrap()]);
    assert_eq!(e.ok(&["start", "vm1"]), "Domain 'vm1' started\n\n");
    assert_eq!(
        e.err(&["start", "vm1"]),
        "error: Domain is already active\n"
    );
    assert_eq!(
        e.ok(&["list", "--all"]),
        " Id   Name   State\n\
         -----------------------\n \
         1    vm1    running\n \
         -    vm2    shut off\n\n"
    );
    assert_eq!(e.ok(&["list"]).lines().count(), 4, "only the running one");
    assert_eq!(e.ok(&["list", "--all", "--name"]), "vm1\nvm2\n\n");
    assert_eq!(e.ok(&["list", "--state-shutoff", "--name"]), "vm2\n\n");
    assert_eq!(
        e.ok(&["list", "--state-running", "--state-paused", "--name"]),
        "vm1\n\n"
    );
    assert_eq!(e.ok(&["list", "--all", "--transient", "--name"]), "\n");
    assert_eq!(
        e.ok(&["list", "--all", "--no-autostart", "--persistent", "--name"]),
        "vm1\nvm2\n\n"
    );
    assert_eq!(e.ok(&["list", "--inactive", "--name"]), "vm2\n\n");
    let v = e.ok(&["version"]);
    assert!(v.contains("Running daemon: rvirtd "), "{v}");
    let uuids = e.ok(&["list", "--all", "--uuid"]);
    assert_eq!(
        uuids.lines().filter(|l| l.len() == 36).count(),
        2,
        "{uuids}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&e.ok(&["list", "--all", "--json"])).unwrap();
    assert_eq!(json[0]["name"], "vm1");
    assert_eq!(json[1]["state"], "shut off");
    let info = e.ok(&["dominfo", "vm1"]);
    for line in [
        "Id:             1",
        "Name:           vm1",
        "State:          running",
        "CPU(s):         2",
        "Max memory:     65536 KiB",
        "Persistent:     yes",
        "Autostart:      disable",
        "Memory backing: anonymous, private, KSM, THP",
    ] {
        assert!(info.contains(line), "'{line}' missing:\n{info}");
    }
    assert_eq!(e.ok(&["domstate", "vm1"]), "running\n\n");
    assert_eq!(
        e.ok(&["domstate", "vm1", "--reason"]),
        "running (booted)\n\n"
    );
    assert!(
        e.ok(&["dominfo", "1"]).contains("Name:           vm1"),
        "lookup by id"
    );
    assert_eq!(e.ok(&["domid", "vm1"]), "1\n\n");
    let uuid = e.ok(&["domuuid", "vm1"]);
    assert_eq!(e.ok(&["domname", uuid.trim()]), "vm1\n\n");
    assert_eq!(e.ok(&["domid", "vm2"]), "-\n\n");
    let blk = e.ok(&["domblklist", "vm1"]);
    assert!(blk.starts_with(" Target   Source\n---"), "{blk}");
    assert!(blk.contains(" vda      /"), "{blk}");
    let ifl = e.ok(&["domiflist", "vm2"]);
    assert!(
        ifl.contains(" -           bridge   br-test   virtio   52:54:00:"),
        "{ifl}"
    );
    let vi = e.ok(&["vcpuinfo", "vm1"]);
    assert!(
        vi.contains("VCPU:           1") && vi.contains("CPU Affinity:   "),
        "{vi}"
    );
    assert!(e
        .ok(&["vcpupin", "vm1"])
        .starts_with(" VCPU   CPU Affinity\n"));
    let err = e.err(&["vcpupin", "vm1", "0", "0-x"]);
    assert!(err.contains("invalid cpuset '0-x'"), "{err}");
    assert!(e.ok(&["emulatorpin", "vm1"]).contains("       *: "));
    let ms = e.ok(&["dommemstat", "vm1"]);
    assert!(ms.starts_with("actual 65536\nrss "), "{ms}");
    assert!(e
        .err(&["dommemstat", "vm2"])
        .contains("domain is not running"));
    assert_eq!(e.ok(&["suspend", "vm1"]), "Domain 'vm1' suspended\n\n");
    assert_eq!(e.ok(&["domstate", "vm1", "--reason"]), "paused (user)\n\n");
    assert_eq!(e.ok(&["resume", "vm1"]), "Domain 'vm1' resumed\n\n");
    assert_eq!(
        e.ok(&["shutdown", "vm1", "--timeout", "10"]),
        "Domain 'vm1' has been shut down\n\n"
    );
    assert_eq!(
        e.ok(&["domstate", "vm1", "--reason"]),
        "shut off (shutdown)\n\n"
    );
    assert_eq!(
        e.err(&["destroy", "vm1"]),
        "error: Failed to destroy domain 'vm1'\nerror: Requested operation is not valid: domain is not running\n"
    );
    let err = e.err(&["start", "nope"]);
    assert!(
        err.starts_with("error: failed to get domain 'nope'\n"),
        "{err}"
    );
    assert_eq!(
        e.ok(&["autostart", "vm2"]),
        "Domain 'vm2' marked as autostarted\n\n"
    );
    assert!(e.ok(&["dominfo", "vm2"]).contains("Autostart:      enable"));
    assert_eq!(
        e.ok(&["undefine", "vm2"]),
        "Domain 'vm2' has been undefined\n\n"
    );
    assert!(e.ok(&["dumpxml", "vm1"]).contains("<name>vm1</name>"));
    // Malformed file: error names the place.
    let bad = e.dir.path().join("bad.xml");
    std::fs::write(&bad, "<domain type='kvm'>\n  <name>x\n</domain>").unwrap();
    let err = e.err(&["define", bad.to_str().unwrap()]);
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn connect_failure_is_explained() {
    let o = Command::new(env!("CARGO_BIN_EXE_rvirt"))
        .args(["-c", "/nonexistent/rvirtd.sock", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/rvirtd.sock") && err.contains("is rvirtd running"),
        "{err}"
    );
}

#[test]
fn console_shows_guest_and_ctrl_bracket_detaches() {
    let Some(e) = Env::start() else { return };
    e.ok(&["define", e.xml_file_no_nic("vm1").to_str().unwrap()]);
    e.ok(&["start", "vm1"]);
    let mut child = e
        .cmd()
        .args(["console", "vm1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"marker-123\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(&[0x1d]).unwrap();
    // Detach works without closing stdin.
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "Ctrl+] did not detach");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("Connected to domain 'vm1'") && text.contains("Escape character is ^]"),
        "{text}"
    );
    assert!(
        text.contains("guest vm1 booted") && text.contains("marker-123"),
        "{text}"
    );
    drop(stdin);
    // The domain keeps running after a detach, and a new session can attach.
    assert_eq!(e.ok(&["domstate", "vm1"]), "running\n\n");
    let o = e
        .cmd()
        .args(["console", "vm1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn edit_validates_and_redefines() {
    let Some(e) = Env::start() else { return };
    e.ok(&["define", e.xml_file_no_nic("vm1").to_str().unwrap()]);
    let o = e
        .cmd()
        .args(["edit", "vm1"])
        .env("EDITOR", "sed -i 's/>64</>96</'")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Domain 'vm1' XML configuration edited.\n\n"
    );
    assert!(e
        .ok(&["dominfo", "vm1"])
        .contains("Max memory:     98304 KiB"));
    // An invalid edit is reported and, answered 'n', leaves the definition as it was.
    let mut child = e
        .cmd()
        .args(["edit", "vm1"])
        .env("EDITOR", "sed -i s/virtio/ide/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"n\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bus='ide'"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("Try again?"));
    assert!(e.ok(&["dumpxml", "vm1"]).contains("bus='virtio'"));
}

#[test]
fn start_paused_then_resume() {
    let Some(e) = Env::start() else { return };
    let f = e.xml_file_no_nic("sp");
    e.ok(&["define", f.to_str().unwrap()]);
    assert_eq!(
        e.ok(&["start", "--paused", "sp"]),
        "Domain 'sp' started\n\n"
    );
    assert_eq!(e.ok(&["domstate", "sp"]), "paused\n\n");
    e.ok(&["resume", "sp"]);
    assert_eq!(e.ok(&["domstate", "sp"]), "running\n\n");
    e.ok(&["destroy", "sp"]);
}

#[test]
fn install_creates_disk_defines_and_starts() {
    let Some(e) = Env::start() else { return };
    let disk = e.dir.path().join("inst.qcow2");
    let kernel = e.dir.path().join("vmlinux");
    let boot = format!(
        "kernel={},kernel_args=\"console=ttyS0 quiet\"",
        kernel.display()
    );
    let disk_arg = format!("path={},size=1", disk.display());
    let common = [
        "install",
        "--name",
        "inst",
        "--memory",
        "128",
        "--vcpus",
        "2",
        "--disk",
        &disk_arg,
        "--boot",
        &boot,
        "--network",
        "none",
        "--import",
    ];
    let xml = e.ok(&[&common[..], &["--print-xml"]].concat());
    assert!(
        xml.contains("<cmdline>console=ttyS0 quiet</cmdline>"),
        "{xml}"
    );
    assert!(
        xml.contains("<memballoon model='virtio'>\n      <stats period='5'/>"),
        "a virtio balloon, as virt-install writes: {xml}"
    );
    assert!(!disk.exists(), "--print-xml changes nothing");
    let out = e.ok(&[&common[..], &["--noautoconsole", "--autostart"]].concat());
    assert!(out.contains("Domain creation completed."), "{out}");
    assert!(disk.exists());
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(&disk).unwrap(), &mut magic).unwrap();
    assert_eq!(&magic, b"QFI\xfb", "a qcow2 image was created");
    assert_eq!(e.ok(&["domstate", "inst"]), "running\n\n");
    assert!(e
        .ok(&["dominfo", "inst"])
        .contains("Autostart:      enable"));
    assert!(e
        .ok(&["domblklist", "inst"])
        .contains(&disk.display().to_string()));
    // Same name again: refused, and the existing disk is untouched.
    let err = e.err(&[
        "install",
        "--name",
        "inst",
        "--disk",
        &format!("path={}", e.dir.path().join("new.img").display()),
        "--boot",
        &boot,
    ]);
    assert!(err.contains("size=GiB"), "{err}");
}

#[test]
fn install_from_a_cdrom_with_uefi_defines_the_install_then_the_installed_system() {
    let Some(e) = Env::start() else { return };
    let disk = e.dir.path().join("deb.qcow2");
    let iso = e.dir.path().join("debian.iso");
    std::fs::write(&iso, vec![0u8; 4096]).unwrap();
    // The OVMF pair is Debian's (the ovmf package scripts/install-deps installs); the fake
    // VMM runs no guest, so this checks what is defined, started and kept.
    let out = e.ok(&[
        "install",
        "--name",
        "deb",
        "--memory",
        "256",
        "--cdrom",
        iso.to_str().unwrap(),
        "--disk",
        &format!("path={},size=1,bus=scsi", disk.display()),
        "--boot",
        "uefi",
        "--network",
        "none",
        "--noautoconsole",
    ]);
    assert!(out.contains("Domain creation completed."), "{out}");
    assert!(
        out.contains("'rvirt start deb' boots the installed system"),
        "{out}"
    );
    // Running: the installer disc is in and boots first; a reboot ends the install.
    let live = e.ok(&["dumpxml", "deb"]);
    for needle in [
        "<os firmware='efi'>",
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>",
        "<boot dev='cdrom'/>",
        "<on_reboot>destroy</on_reboot>",
        &format!("<source file='{}'/>", iso.display()),
        "<target dev='sdb' bus='scsi'/>",
    ] {
        assert!(live.contains(needle), "{needle} missing in {live}");
    }
    // Kept: boots the disk, the drive is empty, the same NVRAM.
    let kept = e.ok(&["dumpxml", "deb", "--inactive"]);
    assert!(
        !kept.contains("<boot dev='cdrom'/>") && kept.contains("<boot dev='hd'/>"),
        "{kept}"
    );
    assert!(
        !kept.contains("debian.iso") && kept.contains("<on_reboot>restart</on_reboot>"),
        "{kept}"
    );
    assert!(kept.contains("deb_VARS.fd</nvram>"), "{kept}");
    let blk = e.ok(&["domblklist", "deb"]);
    assert!(blk.contains(&iso.display().to_string()), "{blk}");
    e.ok(&["destroy", "deb"]);
    // An undefine must say what happens to the variable store.
    let err = e.err(&["undefine", "deb"]);
    assert!(err.contains("cannot undefine domain with nvram"), "{err}");
    e.ok(&["undefine", "deb", "--nvram"]);
}

#[test]
fn completions_and_man_pages_are_generated() {
    let o = Command::new(env!("CARGO_BIN_EXE_rvirt"))
        .args(["completion", "bash"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && s.contains("vcpupin") && s.contains("domstate"),
        "{s}"
    );
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_rvirt"))
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    let page = std::fs::read_to_string(dir.path().join("rvirt-list.1")).unwrap();
    assert!(page.contains(".TH") && page.contains("\\-\\-all"), "{page}");
    assert!(dir.path().join("rvirt.1").exists());
}
