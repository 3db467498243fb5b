//! Harness of rvirt's end-to-end tests: runs a scenario script inside the *test host VM* (Debian's
//! kernel under QEMU TCG with emulated AMD SVM, so KVM works in it even where this machine's own
//! /dev/kvm cannot run a stock Linux guest) and parses the results it prints on its serial console.
//!
//! ```no_run
//! use rvirt_tests::{Scenario, TestHost};
//! let out = TestHost::run(
//!     &Scenario::file("vmm-boot.sh").bin("rvirt-vmm").arg("cpus", "2"),
//! ).unwrap();
//! out.expect_passed(&["vmm.cpus", "vmm.exit"]);
//! ```
//!
//! The fixtures (guest kernel, guest initramfs, test host initramfs) are built and cached by the
//! `guest/` scripts; scenario scripts live in `tests/scenarios/` and source
//! `/lib/rvirt/scenario.sh` (documented in `guest/scenario.sh`).

mod output;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use output::Output;

/// The workspace root (the tests crate sits one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

/// What to run in the test host: a script from `tests/scenarios/`, the workspace binaries it
/// needs, extra files and `rvirt.NAME=VALUE` arguments it reads with `arg NAME`.
#[derive(Debug, Clone)]
pub struct Scenario {
    script: PathBuf,
    bins: Vec<String>,
    files: Vec<(PathBuf, String)>,
    args: Vec<(String, String)>,
    qemu: bool,
    outer_qemu: Option<String>,
    timeout: Duration,
}

impl Scenario {
    /// `tests/scenarios/<name>`.
    pub fn file(name: &str) -> Self {
        Scenario {
            script: workspace_root().join("tests/scenarios").join(name),
            bins: Vec::new(),
            files: Vec::new(),
            args: Vec::new(),
            qemu: false,
            outer_qemu: None,
            timeout: Duration::from_secs(300),
        }
    }

    /// A binary of the workspace (built with `cargo build --release --bin NAME`), installed in the
    /// test host's PATH with the shared libraries it links.
    pub fn bin(mut self, name: &str) -> Self {
        self.bins.push(name.to_string());
        self
    }

    /// A file of this machine, copied to `dest` (absolute) inside the test host.
    pub fn with_file(mut self, src: impl Into<PathBuf>, dest: &str) -> Self {
        self.files.push((src.into(), dest.to_string()));
        self
    }

    /// `rvirt.NAME=VALUE` on the test host's kernel command line (no spaces in VALUE).
    pub fn arg(mut self, name: &str, value: &str) -> Self {
        self.args.push((name.to_string(), value.to_string()));
        self
    }

    /// Adds qemu-system-x86_64 and its firmware to the test host (fixture check, benchmark peer).
    pub fn qemu(mut self) -> Self {
        self.qemu = true;
        self
    }

    /// The QEMU that emulates the test host itself (`guest/testhost --outer-qemu`): `patched`
    /// (guest/qemu's build, needed for OVMF inside the test host) or a path; default Debian's.
    pub fn outer_qemu(mut self, which: &str) -> Self {
        self.outer_qemu = Some(which.to_string());
        self
    }

    /// Wall-clock limit of the whole test host run (default 300 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The test host VM. One runs (or builds its binaries) at a time per test process: the machine
/// has two cores.
pub struct TestHost;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// guest/testhost's exit status when the test host froze.
const TESTHOST_FROZE: i32 = 125;

impl TestHost {
    /// Why the test host cannot run here, if it cannot (tests print this and skip).
    pub fn unavailable() -> Option<String> {
        for tool in ["qemu-system-x86_64", "cpio", "busybox", "apt-get"] {
            if !on_path(tool) {
                return Some(format!(
                    "'{tool}' is not installed (./scripts/install-deps installs it)"
                ));
            }
        }
        None
    }

    /// Builds the scenario's binaries, boots the test host with them and returns its parsed
    /// serial output. Errors mean the harness could not run the scenario at all; scenario
    /// failures are in the [`Output`].
    pub fn run(scenario: &Scenario) -> Result<Output> {
        if !scenario.script.is_file() {
            bail!(
                "scenario script {} does not exist",
                scenario.script.display()
            );
        }
        // The lock also covers the release build: a cargo build on the two cores next to a test
        // host starves the nested guest until the run times out.
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let bins = build_release(&scenario.bins)?;
        let root = workspace_root();
        let mut cmd = Command::new(root.join("guest/testhost"));
        cmd.arg("run")
            .arg("--scenario")
            .arg(&scenario.script)
            .arg("--timeout")
            .arg(scenario.timeout.as_secs().to_string());
        for b in &bins {
            cmd.arg("--bin").arg(b);
        }
        for (src, dest) in &scenario.files {
            cmd.arg("--file").arg(format!("{}:{dest}", src.display()));
        }
        if scenario.qemu {
            cmd.arg("--qemu");
        }
        if let Some(q) = &scenario.outer_qemu {
            cmd.arg("--outer-qemu").arg(q);
        }
        let append: Vec<String> = scenario
            .args
            .iter()
            .map(|(k, v)| format!("rvirt.{k}={v}"))
            .collect();
        cmd.arg("--append").arg(append.join(" "));
        let start = Instant::now();
        let mut out = run_watched(&mut cmd)?;
        // A frozen or livelocked test host is a fault of the emulated SVM the tests run on, not
        // of the scenario: run it once more, and say so.
        if let Some(why) = out.stuck() {
            eprintln!("{why}; running the scenario once more");
            out = run_watched(&mut cmd)?;
        }
        let mut log = String::from_utf8_lossy(&out.stderr).into_owned();
        if let Some(why) = out.stuck() {
            log.push_str(&format!("\n{why} (second run too)\n"));
        }
        let serial = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        Ok(Output::parse(serial, log, out.status, start.elapsed()))
    }
}

/// The test host prints `RVIRT-HOST-ALIVE` every 20 s (guest/testhost-init). Emulated SVM under
/// TCG sometimes livelocks it: QEMU keeps burning CPU (so guest/testhost's freeze check does not
/// fire) but nothing inside the test host runs again, not even its own timeouts. Silence this
/// long after its first output means that.
const SILENCE: Duration = Duration::from_secs(90);

/// One `guest/testhost run`, its output, and whether it was stopped as stuck.
struct Run {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: std::process::ExitStatus,
    silent: bool,
}

impl Run {
    /// Why the run says nothing about the scenario, if so.
    fn stuck(&self) -> Option<String> {
        if self.silent {
            Some(format!(
                "the test host livelocked (no serial output for {} s)",
                SILENCE.as_secs()
            ))
        } else if self.status.code() == Some(TESTHOST_FROZE) {
            Some(format!(
                "the test host froze ({})",
                String::from_utf8_lossy(&self.stderr).trim()
            ))
        } else {
            None
        }
    }
}

/// Runs `guest/testhost` in its own process group, collecting its output, and stops the whole
/// group if the test host falls silent for [`SILENCE`] after it first spoke (before that it may
/// be waiting for the machine-wide test host lock, which its own --timeout does not count).
fn run_watched(cmd: &mut Command) -> Result<Run> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::sync::Arc;

    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot run {}",
            workspace_root().join("guest/testhost").display()
        )
    })?;
    let last_output: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut stdout = child.stdout.take().context("guest/testhost stdout")?;
    let mut stderr = child.stderr.take().context("guest/testhost stderr")?;
    let seen = Arc::clone(&last_output);
    let out_reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        all
    });
    let err_reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stderr.read_to_end(&mut all);
        all
    });
    let pgid = child.id() as libc::pid_t;
    let mut silent = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for guest/testhost")? {
            break status;
        }
        let quiet_for = last_output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed());
        if quiet_for.is_some_and(|d| d >= SILENCE) && !silent {
            silent = true;
            // SAFETY: kill(2) on our own child's process group; no memory is involved.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(5));
            // SAFETY: as above; the group may be gone already, which kill reports harmlessly.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Run {
        stdout,
        stderr,
        status,
        silent,
    })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// `cargo build --release` of the named binaries; returns their paths.
fn build_release(names: &[String]) -> Result<Vec<PathBuf>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "--release",
        "--message-format=json-render-diagnostics",
    ]);
    for n in names {
        cmd.arg("--bin").arg(n);
    }
    let out = cmd.output().context("cannot run cargo")?;
    if !out.status.success() {
        bail!(
            "cargo build --release --bin {} failed:\n{}",
            names.join(" --bin "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut paths = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_wanted_bin = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"))
            && msg["target"]["name"]
                .as_str()
                .is_some_and(|n| names.iter().any(|w| w == n));
        if let (true, Some(exe)) = (is_wanted_bin, msg["executable"].as_str()) {
            paths.push(PathBuf::from(exe));
        }
    }
    if paths.len() != names.len() {
        bail!("cargo built {paths:?}, expected the binaries {names:?}");
    }
    Ok(paths)
}
