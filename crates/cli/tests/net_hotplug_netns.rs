//! `rvirt attach-interface` / `detach-interface` / `domifstat` live, against a real `rvirtd` in a
//! network namespace this test creates (`ip netns exec`): the hotplugged NIC's TAP joins a host
//! bridge made in the namespace, and goes away when the (fake) guest ejects the NIC. Skips with a
//! reason without root, iproute2 or namespaces, or when rvirtd is not built next to rvirt.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn sibling(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_BIN_EXE_rvirt")).with_file_name(name);
    p.exists().then_some(p)
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for network namespaces".into());
    }
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join("ip").exists());
    if !found {
        return Some("ip (iproute2) is not installed (scripts/install-deps installs it)".into());
    }
    if sibling("rvirtd").is_none() || sibling("rvirt-fake-vmm").is_none() {
        return Some("rvirtd and rvirt-fake-vmm are not built next to rvirt".into());
    }
    let probe = format!("rvhp-probe-{}", std::process::id());
    if !sh(&["ip", "netns", "add", &probe]).status.success() {
        return Some("cannot create network namespaces".into());
    }
    let _ = sh(&["ip", "netns", "del", &probe]);
    None
}

/// The namespace, the daemon in it and its files; dropping it kills everything in the
/// namespace and deletes it, also when the test fails.
struct Env {
    ns: String,
    dir: tempfile::TempDir,
    daemon: Option<Child>,
}

impl Env {
    fn start() -> Env {
        let ns = format!("rvhp-{}", std::process::id());
        let _ = sh(&["ip", "netns", "del", &ns]);
        assert!(
            sh(&["ip", "netns", "add", &ns]).status.success(),
            "ip netns add {ns}"
        );
        let mut env = Env {
            ns,
            dir: tempfile::tempdir().unwrap(),
            daemon: None,
        };
        env.ip(&["link", "set", "lo", "up"]);
        env.ip(&["link", "add", "rvhb0", "type", "bridge"]);
        env.ip(&["link", "set", "rvhb0", "up"]);
        std::fs::write(env.dir.path().join("vmlinux"), b"fake").unwrap();
        std::fs::write(env.dir.path().join("disk.img"), vec![0u8; 4096]).unwrap();
        let sock = env.dir.path().join("sock");
        let log = std::fs::File::create(env.dir.path().join("rvirtd.log")).unwrap();
        let daemon = Command::new("ip")
            .args(["netns", "exec", &env.ns])
            .arg(sibling("rvirtd").unwrap())
            .arg("--socket")
            .arg(&sock)
            .arg("--state-dir")
            .arg(env.dir.path().join("state"))
            .arg("--run-dir")
            .arg(env.dir.path().join("run"))
            .arg("--vmm-binary")
            .arg(sibling("rvirt-fake-vmm").unwrap())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        env.daemon = Some(daemon);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "rvirtd did not start: {}",
                env.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        env
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rvirtd.log")).unwrap_or_default()
    }

    /// `ip -n <ns> ...`, which must succeed.
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.ns];
        full.extend_from_slice(args);
        let o = sh(&full);
        assert!(
            o.status.success(),
            "{full:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn has_link(&self, name: &str) -> bool {
        sh(&["ip", "-n", &self.ns, "link", "show", "dev", name])
            .status
            .success()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_rvirt"))
            .arg("-c")
            .arg(self.dir.path().join("sock"))
            .env_remove("RVIRT_SOCKET")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "rvirt {args:?}: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn err(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(1), "rvirt {args:?} should fail");
        String::from_utf8(o.stderr).unwrap()
    }

    /// Waits until the live XML contains `want` (boot devices are annotated just after start).
    fn until_xml(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let x = self.ok(&["dumpxml", "vm1"]);
            if x.contains(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{want} not in {x}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.run(&["destroy", "vm1"]);
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let pids = String::from_utf8_lossy(&sh(&["ip", "netns", "pids", &self.ns]).stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect::<Vec<_>>();
        for pid in pids {
            // SAFETY: kill(2) on a process living in the namespace this test created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

#[test]
fn nic_hotplug_creates_and_removes_the_tap() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP: {why}");
        return;
    }
    let e = Env::start();
    let dom = e.file(
        "vm1.xml",
        &format!(
            "<domain type='kvm'><name>vm1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type>hvm</type><kernel>{k}</kernel></os><devices><disk type='file'>\
             <source file='{d}'/><target dev='vda' bus='virtio'/></disk>\
             <interface type='bridge'><source bridge='rvhb0'/><mac address='52:54:00:00:00:10'/></interface>\
             </devices></domain>",
            k = e.dir.path().join("vmlinux").display(),
            d = e.dir.path().join("disk.img").display()
        ),
    );
    e.ok(&["define", &dom]);
    e.ok(&["start", "vm1"]);
    assert!(e.has_link("rvnet0"), "boot NIC's TAP");
    e.until_xml("<target dev='rvnet0'/>\n      <alias name='net0'/>");
    assert_eq!(
        e.ok(&[
            "attach-interface",
            "vm1",
            "bridge",
            "rvhb0",
            "--mac",
            "52:54:00:00:00:11",
            "--model",
            "virtio"
        ]),
        "Interface attached successfully\n\n"
    );
    let ports = e.ip(&["-o", "link", "show", "master", "rvhb0"]);
    assert_eq!(ports.lines().count(), 2, "{ports}");
    assert!(e.has_link("rvnet1"), "{ports}");
    let iflist = e.ok(&["domiflist", "vm1"]);
    assert!(
        iflist.contains(" rvnet1      bridge   rvhb0    virtio   52:54:00:00:00:11"),
        "{iflist}"
    );
    let x = e.ok(&["dumpxml", "vm1"]);
    assert!(
        x.contains("<mac address='52:54:00:00:00:11'/>\n      <source bridge='rvhb0'/>\n      <target dev='rvnet1'/>\n      <model type='virtio'/>\n      <alias name='net1'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>"),
        "{x}"
    );
    assert_eq!(
        e.ok(&["domifstat", "vm1", "rvnet1"]),
        "rvnet1 rx_bytes 5400\nrvnet1 rx_packets 54\nrvnet1 rx_errs 0\nrvnet1 rx_drop 0\n\
         rvnet1 tx_bytes 4400\nrvnet1 tx_packets 44\nrvnet1 tx_errs 0\nrvnet1 tx_drop 1\n\n"
    );
    assert!(e
        .ok(&["domifstat", "vm1", "52:54:00:00:00:11"])
        .starts_with("rvnet1 rx_bytes "));
    assert!(e
        .ok(&["domstats", "vm1"])
        .contains("  net.count=2\n  net.0.name=rvnet0\n"));
    // Unplug the boot NIC: its TAP goes, the hotplugged one stays with its MAC.
    assert_eq!(
        e.ok(&[
            "detach-interface",
            "vm1",
            "bridge",
            "--mac",
            "52:54:00:00:00:10"
        ]),
        "Interface detached successfully\n\n"
    );
    assert!(!e.has_link("rvnet0"), "boot TAP removed after the eject");
    let iflist = e.ok(&["domiflist", "vm1"]);
    assert!(
        iflist.contains(" rvnet1 ") && !iflist.contains("52:54:00:00:00:10"),
        "{iflist}"
    );
    e.ok(&[
        "detach-interface",
        "vm1",
        "bridge",
        "--mac",
        "52:54:00:00:00:11",
    ]);
    assert!(!e.has_link("rvnet1"), "hotplugged TAP removed");
    assert_eq!(e.ip(&["-o", "link", "show", "master", "rvhb0"]), "");
    assert!(e.ok(&["domstats", "vm1"]).contains("  net.count=0\n"));
    // A bridge that does not exist: refused, nothing left behind.
    let err = e.err(&["attach-interface", "vm1", "bridge", "nosuchbr", "--live"]);
    assert!(
        err.starts_with("error: Failed to attach interface\n"),
        "{err}"
    );
    assert!(!e.ip(&["-o", "link"]).contains("rvnet"));
    // A hotplugged NIC's TAP also goes when the domain stops.
    e.ok(&["attach-interface", "vm1", "bridge", "rvhb0"]);
    assert!(e.ip(&["-o", "link"]).contains("rvnet"));
    e.ok(&["destroy", "vm1"]);
    assert!(
        !e.ip(&["-o", "link"]).contains("rvnet"),
        "TAP left after destroy"
    );
}
