//! Test harness: a real `rvirtd` process on a temp state/run dir, supervising the
//! `rvirt-fake-vmm` test double (a stand-in for rvirt-vmm that speaks its control protocol but
//! runs no guest), and a tiny HTTP client for its socket.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
}

pub fn fake_vmm() -> &'static str {
    env!("CARGO_BIN_EXE_rvirt-fake-vmm")
}

impl Daemon {
    pub fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("vmlinux"),
            b"not a kernel: the fake VMM only checks it exists",
        )
        .unwrap();
        std::fs::write(dir.path().join("disk.img"), vec![0u8; 4096]).unwrap();
        let mut d = Daemon { dir, child: None };
        d.spawn();
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("rvirtd.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("rvirtd.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rvirtd"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--vmm-binary")
            .arg(fake_vmm())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "rvirtd did not come up: {}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the daemon (its VMMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rvirtd.log")).unwrap_or_default()
    }

    pub fn domain_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state_dir().join("log").join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// A definition that the fake VMM accepts.
    pub fn xml(&self, name: &str, extra: &str) -> String {
        format!(
            "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>2</vcpu>\
             <os><type>hvm</type><kernel>{k}</kernel><cmdline>console=ttyS0</cmdline></os>{extra}\
             <devices><disk type='file'><source file='{d}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            k = self.dir.path().join("vmlinux").display(),
            d = self.dir.path().join("disk.img").display(),
        )
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        http(&self.socket(), method, path, body)
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    pub fn define(&self, name: &str, extra: &str) -> Value {
        self.ok(
            "POST",
            "/v1/domains",
            Some(serde_json::json!({"xml": self.xml(name, extra)})),
        )
    }

    pub fn state(&self, name: &str) -> (String, String) {
        let v = self.ok("GET", &format!("/v1/domains/{name}"), None);
        (
            v["state"].as_str().unwrap().into(),
            v["reason"].as_str().unwrap().into(),
        )
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        let v = self.ok("GET", &format!("/v1/domains/{name}"), None);
        v["pid"].as_u64().map(|p| p as u32)
    }

    pub fn wait_state(&self, name: &str, state: &str, reason: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.state(name);
            if s == (state.to_string(), reason.to_string()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: still {s:?}, wanted {state} ({reason}); log:\n{}",
                self.domain_log(name)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens the console and returns the stream after the upgrade.
    pub fn console(&self, name: &str, force: bool) -> Result<Console, (u16, Value)> {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        let q = if force { "?force=true" } else { "" };
        write!(s, "GET /v1/domains/{name}/console{q} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: rvirt-console\r\n\r\n").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let (status, len) = read_head(&mut r);
        if status != 101 {
            let mut body = vec![0; len.unwrap_or(0)];
            r.read_exact(&mut body).unwrap();
            return Err((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
        }
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Ok(Console { w: s, r })
    }
}

pub struct Console {
    pub w: UnixStream,
    pub r: BufReader<UnixStream>,
}

impl Console {
    /// Reads lines until one contains `needle`; returns that line.
    pub fn expect(&mut self, needle: &str) -> String {
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) | Err(_) => panic!("console closed before '{needle}'; got: {seen}"),
                Ok(_) => {}
            }
            if line.contains(needle) {
                return line.trim().to_string();
            }
            seen.push_str(&line);
        }
    }

    pub fn send(&mut self, line: &str) {
        self.w.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    pub fn progress(&mut self) -> u64 {
        self.send("progress");
        let l = self.expect("progress ");
        l.trim_start_matches("progress ").parse().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Kill every VMM this daemon left running (tests must not leak processes).
        if let Ok(entries) = std::fs::read_dir(self.run_dir()) {
            for e in entries.flatten() {
                if let Ok(t) = std::fs::read_to_string(e.path().join("vmm.json")) {
                    if let Ok(v) = serde_json::from_str::<Value>(&t) {
                        if let Some(pid) = v["pid"].as_i64() {
                            // SAFETY: kill(2) on a pid of a VMM this test started.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        }
                    }
                }
            }
        }
    }
}

fn read_head(r: &mut impl BufRead) -> (u16, Option<usize>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut len = None;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        let l = line.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().ok();
        }
    }
    (status, len)
}

pub fn http(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).unwrap();
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let msg = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    // The daemon may answer and close before reading a body it does not need.
    let _ = s.write_all(msg.as_bytes());
    let mut r = BufReader::new(s);
    let (status, len) = read_head(&mut r);
    let mut buf = Vec::new();
    match len {
        Some(n) => {
            buf.resize(n, 0);
            r.read_exact(&mut buf).unwrap();
        }
        None => {
            r.read_to_end(&mut buf).unwrap();
        }
    }
    (status, serde_json::from_slice(&buf).unwrap_or(Value::Null))
}

/// Processes whose command line mentions `needle` (to find leaked VMMs).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
