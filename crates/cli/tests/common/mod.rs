//! The harness the CLI integration tests share: a real `rvirtd` supervising `rvirt-fake-vmm`
//! (a test double of rvirt-vmm speaking its control protocol; it runs no guest), both built
//! next to `rvirt`, on a temp dir of its own, optionally inside a network namespace the
//! harness creates (`ip netns exec`); and `rvirt` run against its socket. Each test file uses
//! part of it: the items only some use allow dead code.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `rvirt` commands an [`Env`] runs when it is dropped, before the daemon is killed (for
/// the domains and networks a test may leave running); their failures are ignored.
pub type Cleanup = &'static [&'static [&'static str]];

/// Runs `args[0]` with the rest as its arguments; panics only when it cannot run.
pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn sibling(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_BIN_EXE_rvirt")).with_file_name(name);
    p.exists().then_some(p)
}

/// `rvirtd` and `rvirt-fake-vmm`, when both are built next to `rvirt`.
fn binaries() -> Option<(PathBuf, PathBuf)> {
    Some((sibling("rvirtd")?, sibling("rvirt-fake-vmm")?))
}

/// Why the namespace tests cannot run here (needing `tools` and a namespace named after
/// `prefix` as a probe), or None.
fn netns_skip_reason(prefix: &str, tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for network namespaces".into());
    }
    for tool in tools {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            return Some(format!(
                "{tool} is not installed (scripts/install-deps installs it)"
            ));
        }
    }
    if binaries().is_none() {
        return Some("rvirtd and rvirt-fake-vmm are not built next to rvirt".into());
    }
    let probe = format!("{prefix}-probe-{}", std::process::id());
    if !sh(&["ip", "netns", "add", &probe]).status.success() {
        return Some("cannot create network namespaces".into());
    }
    let _ = sh(&["ip", "netns", "del", &probe]);
    None
}

/// The daemon, its files (`vmlinux`, `disk.img`, `sock`, `rvirtd.log`, `state/`, `run/`) and,
/// for the namespace tests, its namespace; dropping it runs the cleanup, kills the daemon and
/// everything in the namespace and deletes the namespace, also when the test fails.
pub struct Env {
    pub dir: tempfile::TempDir,
    ns: Option<String>,
    daemon: Option<Child>,
    cleanup: Cleanup,
}

impl Env {
    /// rvirtd in this namespace; `configure` adds to its command (its environment). None, after
    /// saying why, when the daemon binaries are not built.
    #[allow(dead_code)]
    pub fn launch(cleanup: Cleanup, configure: impl FnOnce(&mut Command)) -> Option<Env> {
        let Some((rvirtd, vmm)) = binaries() else {
            eprintln!("skipping: rvirtd and rvirt-fake-vmm are not built next to rvirt (run cargo test --workspace)");
            return None;
        };
        let mut env = Env {
            dir: tempfile::tempdir().unwrap(),
            ns: None,
            daemon: None,
            cleanup,
        };
        let mut cmd = Command::new(rvirtd);
        configure(&mut cmd);
        env.spawn(cmd, &vmm);
        Some(env)
    }

    /// rvirtd in a new network namespace `<prefix>-<pid>` whose loopback is up, after `setup`
    /// has added to the namespace (with [`Env::ip`]). None, after saying why, without root,
    /// one of `tools`, network namespaces or the daemon binaries.
    #[allow(dead_code)]
    pub fn launch_in_netns(
        prefix: &str,
        tools: &[&str],
        cleanup: Cleanup,
        setup: impl FnOnce(&Env),
    ) -> Option<Env> {
        if let Some(why) = netns_skip_reason(prefix, tools) {
            eprintln!("SKIP: {why}");
            return None;
        }
        let (rvirtd, vmm) = binaries()?;
        let ns = format!("{prefix}-{}", std::process::id());
        let _ = sh(&["ip", "netns", "del", &ns]);
        assert!(
            sh(&["ip", "netns", "add", &ns]).status.success(),
            "ip netns add {ns}"
        );
        let mut env = Env {
            dir: tempfile::tempdir().unwrap(),
            ns: Some(ns.clone()),
            daemon: None,
            cleanup,
        };
        env.ip(&["link", "set", "lo", "up"]);
        setup(&env);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).arg(rvirtd);
        env.spawn(cmd, &vmm);
        Some(env)
    }

    /// Writes the fake kernel and disk, starts `daemon` (rvirtd, or a command that runs it)
    /// with the paths in the temp dir and waits for its socket.
    fn spawn(&mut self, mut daemon: Command, vmm: &Path) {
        std::fs::write(self.dir.path().join("vmlinux"), b"fake").unwrap();
        std::fs::write(self.dir.path().join("disk.img"), vec![0u8; 4096]).unwrap();
        let sock = self.dir.path().join("sock");
        let log = std::fs::File::create(self.dir.path().join("rvirtd.log")).unwrap();
        daemon
            .arg("--socket")
            .arg(&sock)
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--run-dir")
            .arg(self.dir.path().join("run"))
            .arg("--vmm-binary")
            .arg(vmm)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.daemon = Some(daemon.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "rvirtd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon wrote to its stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rvirtd.log")).unwrap_or_default()
    }

    /// `f` in the temp dir.
    #[allow(dead_code)]
    pub fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }

    /// Writes `text` to `name` in the temp dir; returns its path.
    #[allow(dead_code)]
    pub fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// Writes `vm1.xml`: a 64 MiB domain with one vCPU, the fake kernel, disk vda and
    /// `devices` (XML) after it; returns its path.
    #[allow(dead_code)]
    pub fn vm1_file(&self, devices: &str) -> String {
        self.file(
            "vm1.xml",
            &format!(
                "<domain type='kvm'><name>vm1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
                 <os><type>hvm</type><kernel>{k}</kernel></os><devices><disk type='file'>\
                 <source file='{d}'/><target dev='vda' bus='virtio'/></disk>{devices}\
                 </devices></domain>",
                k = self.path("vmlinux"),
                d = self.path("disk.img"),
            ),
        )
    }

    /// `rvirt` connected to the daemon, to add arguments to.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rvirt"));
        c.arg("-c").arg(self.dir.path().join("sock"));
        c.env_remove("RVIRT_SOCKET");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `rvirt args`, which must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "rvirt {args:?}: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// `rvirt args`, which must fail with status 1: its stderr.
    pub fn err(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(1), "rvirt {args:?} should fail");
        String::from_utf8(o.stderr).unwrap()
    }

    /// Runs `rvirt args` until `want` holds for its output (within 5 s): that output.
    #[allow(dead_code)]
    pub fn until(&self, args: &[&str], want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.ok(args);
            if want(&out) {
                return out;
            }
            assert!(Instant::now() < deadline, "rvirt {args:?} gave {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The network namespace (of an [`Env::launch_in_netns`] environment).
    pub fn ns(&self) -> &str {
        self.ns
            .as_deref()
            .expect("the daemon runs in a network namespace")
    }

    /// `ip -n <ns> ...`, which must succeed: its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", self.ns()];
        full.extend_from_slice(args);
        let o = sh(&full);
        assert!(
            o.status.success(),
            "{full:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Whether the namespace has the link `name`.
    #[allow(dead_code)]
    pub fn has_link(&self, name: &str) -> bool {
        sh(&["ip", "-n", self.ns(), "link", "show", "dev", name])
            .status
            .success()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for args in self.cleanup {
            let _ = self.run(args);
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let Some(ns) = &self.ns else { return };
        let pids = String::from_utf8_lossy(&sh(&["ip", "netns", "pids", ns]).stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect::<Vec<_>>();
        for pid in pids {
            // SAFETY: kill(2) on a process living in the namespace this harness created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = sh(&["ip", "netns", "del", ns]);
    }
}
