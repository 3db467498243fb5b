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
    start_with(img, cpus, &[])
}

fn start_with(img: rvirt_testkit::GuestImage, cpus: &str, extra: &[&str]) -> Option<Vm> {
    if let Some(why) = rvirt_testkit::kvm_unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut cmd = Command::new(VMM);
    cmd.arg("--kernel")
        .arg(img.path())
        .args([
            "--memory", "64M", "--cpus", cpus, "--name", "t1", "--serial", "none",
        ])
        .arg("--api-socket")
        .arg(&sock)
        .args(extra);
    Some(spawn(cmd, dir, sock, img))
}

/// Runs rvirt-vmm with `--config` (what rvirtd does) on `cfg`, a VmConfig in JSON whose
/// `api_socket` is `dir`/api.sock.
fn start_config(
    img: rvirt_testkit::GuestImage,
    dir: tempfile::TempDir,
    cfg: serde_json::Value,
) -> Vm {
    let sock = dir.path().join("api.sock");
    assert_eq!(cfg["api_socket"].as_str(), sock.to_str(), "api_socket");
    let cfg_path = dir.path().join("vmm-config.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(VMM);
    cmd.arg("--config").arg(&cfg_path);
    spawn(cmd, dir, sock, img)
}

/// Starts `cmd` (stderr kept in `dir` for a failing test's log) and waits for its control socket.
fn spawn(
    mut cmd: Command,
    dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    img: rvirt_testkit::GuestImage,
) -> Vm {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut vm = Vm {
        child,
        sock,
        _dir: dir,
        _img: img,
    };
    let t = Instant::now();
    while UnixStream::connect(&vm.sock).is_err() {
        if let Some(st) = vm.child.try_wait().unwrap() {
            panic!("VMM exited with {st}");
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm
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
            memory_backing,
            ..
        } => {
            let b = memory_backing.expect("info reports the memory backing");
            assert_eq!(
                (b.source.as_str(), b.shared, b.ksm),
                ("anonymous", false, true)
            );
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

fn allowed_cpus(pid: u32, tid: i32) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn start_paused_runs_no_guest_code_until_resumed() {
    // serial_hello powers off right after its first instructions: while the VM is still there,
    // the guest has not run.
    let Some(mut vm) = start_with(
        rvirt_testkit::serial_hello().unwrap(),
        "2",
        &["--start-paused"],
    ) else {
        return;
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        vm.child.try_wait().unwrap(),
        None,
        "the guest ran while paused"
    );
    let mut c = Conn::new(&vm);
    match c.call(Request::Info) {
        Response::Info { state, vcpus, .. } => {
            assert_eq!(state, RunState::Paused);
            assert_eq!(vcpus, 2);
        }
        r => panic!("{r:?}"),
    }
    // The vCPU threads exist (a supervisor pins them now).
    match c.call(Request::VcpuInfo) {
        Response::VcpuInfo { vcpus } => assert_eq!(vcpus.len(), 2),
        r => panic!("{r:?}"),
    }
    assert_eq!(c.call(Request::Resume), Response::Ok);
    assert_eq!(wait_exit(&mut vm), Some(0));
}

#[test]
fn config_file_pins_vcpus_and_the_emulator_threads() {
    let cpus = std::fs::read_to_string("/proc/self/status").unwrap();
    let ncpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if ncpus < 2 || !cpus.contains("Cpus_allowed_list:") {
        eprintln!("skipped: needs two host CPUs");
        return;
    }
    let Some(img) = rvirt_testkit::kvm_unavailable()
        .is_none()
        .then(|| rvirt_testkit::idle().unwrap())
    else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let cfg = serde_json::json!({
        "name": "pinned",
        "boot": {"kind": "kernel", "kernel": img.path(), "cmdline": ""},
        "memory": {"size": 64u64 << 20},
        "cpus": {"boot": 2},
        "serial": {"kind": "none"},
        "api_socket": sock,
        "emulator_affinity": [1],
        "vcpu_affinity": [{"vcpu": 0, "cpus": [0]}, {"vcpu": 1, "cpus": [1]}],
    });
    let mut vm = start_config(img, dir, cfg);
    let pid = vm.child.id();
    let mut c = Conn::new(&vm);
    let vcpus = match c.call(Request::VcpuInfo) {
        Response::VcpuInfo { vcpus } => vcpus,
        r => panic!("{r:?}"),
    };
    assert_eq!(allowed_cpus(pid, vcpus[0].tid), "0");
    assert_eq!(allowed_cpus(pid, vcpus[1].tid), "1");
    // Every other thread (main, control, serial, signals) has the emulator set.
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i32 = t.unwrap().file_name().to_str().unwrap().parse().unwrap();
        if vcpus.iter().any(|v| v.tid == tid) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        // KVM's own worker (kvm-nx-lpage-recovery) is a kernel task in the VMM's thread group;
        // its affinity is the kernel's business.
        if comm.starts_with("kvm-") {
            continue;
        }
        assert_eq!(allowed_cpus(pid, tid), "1", "thread {tid} {comm}");
    }
    assert_eq!(c.call(Request::Quit), Response::Ok);
    assert_eq!(wait_exit(&mut vm), Some(0));
}

#[test]
fn balloon_requests_reach_the_balloon_device() {
    let Some(vm) = start_with(
        rvirt_testkit::idle().unwrap(),
        "1",
        &["--balloon", "stats_period=1,current=48M"],
    ) else {
        return;
    };
    let mut c = Conn::new(&vm);
    // No driver runs in the tiny guest: the balloon is empty (actual = all RAM), the start
    // target waits in its config space.
    assert_eq!(
        c.call(Request::QueryBalloon),
        Response::Balloon {
            actual_bytes: 64 << 20,
            target_bytes: 48 << 20,
            max_bytes: 64 << 20
        }
    );
    assert_eq!(
        c.call(Request::Balloon {
            target_bytes: 32 << 20
        }),
        Response::Ok
    );
    // Above the RAM size is clamped to it, as QEMU does.
    assert_eq!(
        c.call(Request::Balloon {
            target_bytes: 1 << 40
        }),
        Response::Ok
    );
    match c.call(Request::QueryBalloon) {
        Response::Balloon { target_bytes, .. } => assert_eq!(target_bytes, 64 << 20),
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        c.call(Request::Balloon { target_bytes: 0 }),
        Response::Error { .. }
    ));
    match c.call(Request::BalloonStats) {
        Response::BalloonStats { stats } => assert_eq!(stats.last_update, 0, "{stats:?}"),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        c.call(Request::SetBalloonStatsPeriod { seconds: 5 }),
        Response::Ok
    );
    match c.call(Request::Stats) {
        Response::Stats { devices, .. } => {
            let kinds: Vec<&str> = devices.iter().map(|d| d.kind.as_str()).collect();
            assert_eq!(kinds, ["rng", "balloon"], "{devices:?}");
            assert!(devices[1].counters.contains_key("inflated_pages"));
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn balloon_requests_without_a_balloon_get_qemus_error() {
    let Some(vm) = start(rvirt_testkit::idle().unwrap(), "1") else {
        return;
    };
    let mut c = Conn::new(&vm);
    assert_eq!(
        c.call(Request::QueryBalloon),
        Response::Error {
            message: "No balloon device has been activated".into()
        }
    );
}

#[test]
fn vcpu_and_disk_hotplug_requests_start_threads_and_plug_slots() {
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let Some(vm) = start_with(rvirt_testkit::idle().unwrap(), "1", &["--max-cpus", "2"]) else {
        return;
    };
    let mut w = Conn::new(&vm);
    w.send(&Request::Watch);
    std::thread::sleep(Duration::from_millis(100));
    let mut c = Conn::new(&vm);
    match c.call(Request::Info) {
        Response::Info {
            vcpus, max_vcpus, ..
        } => assert_eq!((vcpus, max_vcpus), (1, 2)),
        r => panic!("{r:?}"),
    }
    for (count, want) in [(0, "vCPU 0"), (3, "3 > 2")] {
        match c.call(Request::SetVcpus { count }) {
            Response::Error { message } => assert!(message.contains(want), "{message}"),
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(c.call(Request::SetVcpus { count: 2 }), Response::Ok);
    let tid = match w.event() {
        Event::VcpuAdded { vcpu: 1, tid } => tid,
        e => panic!("{e:?}"),
    };
    match c.call(Request::VcpuInfo) {
        Response::VcpuInfo { vcpus } => {
            assert_eq!(vcpus.len(), 2);
            assert_eq!(vcpus[1].tid, tid);
            let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", vm.child.id()))
                .unwrap();
            assert_eq!(comm.trim(), "vcpu1");
        }
        r => panic!("{r:?}"),
    }
    // Removal waits for the guest's eject (this guest has no ACPI): the thread stays.
    assert_eq!(c.call(Request::SetVcpus { count: 1 }), Response::Ok);
    match c.call(Request::Info) {
        Response::Info { vcpus, .. } => assert_eq!(vcpus, 2),
        r => panic!("{r:?}"),
    }

    let disk_cfg = rvirt_api::vmm_config::DiskConfig {
        path: Some(disk.path().to_path_buf()),
        format: Some(rvirt_api::vmm_config::DiskFormat::Raw),
        id: Some("virtio-disk1".into()),
        ..Default::default()
    };
    let slot = match c.call(Request::AddDisk {
        disk: disk_cfg.clone(),
    }) {
        Response::DeviceAdded { id, slot } => {
            assert_eq!(id, "virtio-disk1");
            slot
        }
        r => panic!("{r:?}"),
    };
    assert!(slot >= 2, "slot {slot}: the rng holds the first slot");
    match c.call(Request::Stats) {
        Response::Stats { devices, .. } => {
            let d = devices.iter().find(|d| d.id == "virtio-disk1").unwrap();
            assert_eq!((d.kind.as_str(), d.slot), ("block", slot));
        }
        r => panic!("{r:?}"),
    }
    // The same id twice is refused, naming it.
    match c.call(Request::AddDisk { disk: disk_cfg }) {
        Response::Error { message } => assert!(message.contains("virtio-disk1"), "{message}"),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        c.call(Request::RemoveDevice {
            id: "virtio-disk1".into()
        }),
        Response::Ok
    );
    match c.call(Request::RemoveDevice { id: "nope".into() }) {
        Response::Error { message } => assert!(message.contains("nope"), "{message}"),
        r => panic!("{r:?}"),
    }
}

#[test]
fn vcpu_hotplug_needs_a_maximum_above_the_boot_count() {
    let Some(vm) = start(rvirt_testkit::idle().unwrap(), "1") else {
        return;
    };
    let mut c = Conn::new(&vm);
    assert_eq!(
        c.call(Request::SetVcpus { count: 1 }),
        Response::Ok,
        "no change"
    );
    match c.call(Request::SetVcpus { count: 2 }) {
        Response::Error { message } => assert!(message.contains("2 > 1"), "{message}"),
        r => panic!("{r:?}"),
    }
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
    let mut vm = start_config(img, dir, cfg);
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

#[test]
fn change_media_inserts_and_ejects_discs_of_scsi_cdrom_drives_only() {
    let iso = tempfile::NamedTempFile::new().unwrap();
    iso.as_file().set_len(2 << 20).unwrap();
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let disk_spec = format!("path={},bus=scsi,id=sdb", disk.path().display());
    let Some(vm) = start_with(
        rvirt_testkit::idle().unwrap(),
        "1",
        &[
            "--disk",
            "bus=scsi,device=cdrom,id=sda",
            "--disk",
            &disk_spec,
        ],
    ) else {
        return;
    };
    let mut c = Conn::new(&vm);
    let change = |id: &str, source: Option<&std::path::Path>| Request::ChangeMedia {
        id: id.into(),
        source: source.map(Into::into),
        format: None,
        force: false,
    };
    assert_eq!(c.call(change("sda", Some(iso.path()))), Response::Ok);
    assert_eq!(c.call(change("sda", None)), Response::Ok);
    // A disc that is not there, a drive that is not there, a disk that is no drive.
    match c.call(change(
        "sda",
        Some(std::path::Path::new("/nonexistent.iso")),
    )) {
        Response::Error { message } => assert!(message.contains("/nonexistent.iso"), "{message}"),
        r => panic!("{r:?}"),
    }
    match c.call(change("hdc", None)) {
        Response::Error { message } => {
            assert!(
                message.contains("\"hdc\"") && message.contains("sda"),
                "{message}"
            )
        }
        r => panic!("{r:?}"),
    }
    match c.call(change("sdb", Some(iso.path()))) {
        Response::Error { message } => assert!(message.contains("not a CD-ROM"), "{message}"),
        r => panic!("{r:?}"),
    }
    // SCSI drives are not hotplugged (yet): said so, not half-done.
    let add = Request::AddDisk {
        disk: rvirt_api::vmm_config::DiskConfig {
            path: Some(disk.path().to_path_buf()),
            bus: rvirt_api::vmm_config::DiskBus::Scsi,
            ..Default::default()
        },
    };
    match c.call(add) {
        Response::Error { message } => assert!(message.contains("bus=virtio"), "{message}"),
        r => panic!("{r:?}"),
    }
}
