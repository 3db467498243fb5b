//! The control socket against a running VMM (tiny idle / power-button guests).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rvirt_api::vmm::{Event, ExitReason, Request, Response, RunState};

const VMM: &str = env!("CARGO_BIN_EXE_rvirt-vmm");

struct Vm {
    child: Child,
    sock: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _img: rvirt_testkit::GuestImage,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let st = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self._dir.path().join("stderr")).unwrap_or_default();
            eprintln!("VMM status {st:?}, stderr:\n{log}");
        }
    }
}

fn start(img: rvirt_testkit::GuestImage, cpus: &str) -> Option<Vm> {
    if let Some(why) = rvirt_testkit::kvm_unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let child = Command::new(VMM)
        .arg("--kernel")
        .arg(img.path())
        .args([
            "--memory", "64M", "--cpus", cpus, "--name", "t1", "--serial", "none",
        ])
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed() < Duration::from_secs(15), "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(Vm {
        child,
        sock,
        _dir: dir,
        _img: img,
    })
}

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn new(vm: &Vm) -> Conn {
        let w = UnixStream::connect(&vm.sock).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Conn { w, r }
    }
    fn send(&mut self, req: &Request) {
        let mut l = serde_json::to_string(req).unwrap();
        l.push('\n');
        self.w.write_all(l.as_bytes()).unwrap();
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }
    fn call(&mut self, req: Request) -> Response {
        self.send(&req);
        serde_json::from_str(&self.line()).unwrap()
    }
    fn event(&mut self) -> Event {
        let l = self.line();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }
}

fn wait_exit(vm: &mut Vm) -> Option<i32> {
    let t = Instant::now();
    loop {
        if let Some(s) = vm.child.try_wait().unwrap() {
            return s.code();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "VMM did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn info_vcpu_info_stats_pause_resume_quit() {
    let Some(mut vm) = start(rvirt_testkit::idle().unwrap(), "2") else {
        return;
    };
    let mut c = Conn::new(&vm);
    match c.call(Request::Info) {
        Response::Info {
            pid,
            name,
            state,
            vcpus,
            memory_bytes,
            ..
        } => {
            assert_eq!(pid, vm.child.id());
            assert_eq!(name.as_deref(), Some("t1"));
            assert_eq!(state, RunState::Running);
            assert_eq!(vcpus, 2);
            assert_eq!(memory_bytes, 64 << 20);
        }
        r => panic!("{r:?}"),
    }
    match c.call(Request::VcpuInfo) {
        Response::VcpuInfo { vcpus } => {
            assert_eq!(vcpus.len(), 2);
            for v in vcpus {
                let comm =
                    std::fs::read_to_string(format!("/proc/{}/task/{}/comm", vm.child.id(), v.tid))
                        .unwrap();
                assert_eq!(comm.trim(), format!("vcpu{}", v.vcpu));
            }
        }
        r => panic!("{r:?}"),
    }
    match c.call(Request::Stats) {
        Response::Stats {
            rss_bytes,
            cpu_time_ns,
            ..
        } => {
            assert!(rss_bytes > 1 << 20, "{rss_bytes}");
            assert!(cpu_time_ns > 0);
        }
        r => panic!("{r:?}"),
    }
    let mut w = Conn::new(&vm);
    w.send(&Request::Watch);
    // Give the watcher time to register before the state changes.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(c.call(Request::Pause), Response::Ok);
    assert_eq!(
        w.event(),
        Event::StateChanged {
            state: RunState::Paused
        }
    );
    match c.call(Request::Info) {
        Response::Info { state, .. } => assert_eq!(state, RunState::Paused),
        r => panic!("{r:?}"),
    }
    assert_eq!(c.call(Request::Resume), Response::Ok);
    assert_eq!(
        w.event(),
        Event::StateChanged {
            state: RunState::Running
        }
    );
    assert_eq!(c.call(Request::Quit), Response::Ok);
    assert_eq!(
        w.event(),
        Event::Exited {
            reason: ExitReason::Quit
        }
    );
    assert_eq!(wait_exit(&mut vm), Some(0));
}

#[test]
fn bad_request_gets_an_error_line() {
    let Some(vm) = start(rvirt_testkit::idle().unwrap(), "1") else {
        return;
    };
    let mut c = Conn::new(&vm);
    c.w.write_all(b"{\"request\":\"explode\"}\n").unwrap();
    let r: Response = serde_json::from_str(&c.line()).unwrap();
    assert!(matches!(r, Response::Error { .. }), "{r:?}");
}

#[test]
fn power_button_makes_the_guest_power_off() {
    let Some(mut vm) = start(rvirt_testkit::power_button().unwrap(), "1") else {
        return;
    };
    let mut w = Conn::new(&vm);
    w.send(&Request::Watch);
    // Let the guest enable the power-button event.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Conn::new(&vm);
    assert_eq!(c.call(Request::PowerButton), Response::Ok);
    assert_eq!(
        w.event(),
        Event::StateChanged {
            state: RunState::ShuttingDown
        }
    );
    assert_eq!(
        w.event(),
        Event::Exited {
            reason: ExitReason::Poweroff
        }
    );
    assert_eq!(wait_exit(&mut vm), Some(0));
}

/// `--config FILE` (what rvirtd writes) runs the same VM as the flags: a disk whose path has
/// commas and spaces, opened with O_DIRECT (cache=none) and another with cache=unsafe.
#[test]
fn config_file_front_end_runs_a_vm() {
    if let Some(why) = rvirt_testkit::kvm_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let img = rvirt_testkit::idle().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let odd = dir.path().join("disk, one,format=qcow2 x.img");
    std::fs::write(&odd, vec![0u8; 1 << 20]).unwrap();
    let plain = dir.path().join("plain.img");
    std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let cfg = serde_json::json!({
        "name": "from-config",
        "boot": {"kind": "kernel", "kernel": img.path(), "cmdline": "console=ttyS0"},
        "memory": {"size": 64u64 << 20},
        "cpus": {"boot": 2},
        "disks": [
            {"path": odd, "format": "raw", "cache": "none", "serial": "SN-1", "id": "virtio-disk0"},
            {"path": plain, "format": "raw", "cache": "unsafe", "readonly": true}
        ],
        "serial": {"kind": "none"},
        "api_socket": sock,
    });
    let cfg_path = dir.path().join("vmm-config.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let child = Command::new(VMM)
        .arg("--config")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut vm = Vm {
        child,
        sock: sock.clone(),
        _dir: dir,
        _img: img,
    };
    let t = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        if let Some(st) = vm.child.try_wait().unwrap() {
            panic!("VMM exited with {st}");
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Conn::new(&vm);
    match c.call(Request::Info) {
        Response::Info {
            name,
            vcpus,
            memory_bytes,
            ..
        } => {
            assert_eq!(name.as_deref(), Some("from-config"));
            assert_eq!((vcpus, memory_bytes), (2, 64 << 20));
        }
        other => panic!("{other:?}"),
    }
    c.call(Request::Quit);
    assert_eq!(wait_exit(&mut vm), Some(0));
    // --config excludes the VM flags: a usage error.
    let st = Command::new(VMM)
        .args(["--config", "/nonexistent.json", "--cpus", "2"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2));
}
