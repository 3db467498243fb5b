//! rvirtd end to end, with real daemon processes supervising `rvirt-fake-vmm` (a test double
//! of rvirt-vmm: the real control protocol, no guest). Real-guest tests live with the VMM's
//! end-to-end suite.

mod common;

use common::{processes_mentioning, Daemon};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

#[test]
fn define_start_console_shutdown() {
    let d = Daemon::start();
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "API socket must be 0600");
    let r = d.define("vm1", "");
    assert_eq!(r["name"], "vm1");
    assert_eq!(r["uuid"].as_str().unwrap().len(), 36, "a UUID is generated");
    assert_eq!(d.state("vm1"), ("shut off".into(), "unknown".into()));
    d.ok("POST", "/v1/domains/vm1/start", None);
    assert_eq!(d.state("vm1"), ("running".into(), "booted".into()));
    let run_mode = std::fs::metadata(d.run_dir().join("vm1"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(run_mode & 0o777, 0o700, "the VMM's sockets are private");
    let mut con = d.console("vm1", false).unwrap();
    con.send("hello");
    con.expect("hello");
    d.ok(
        "POST",
        "/v1/domains/vm1/shutdown",
        Some(json!({"timeout_secs": 10})),
    );
    assert_eq!(d.state("vm1"), ("shut off".into(), "shutdown".into()));
    assert!(
        !d.run_dir().join("vm1").exists(),
        "run files removed at shut off"
    );
    let log = d.domain_log("vm1");
    assert!(
        log.contains("started rvirt-vmm pid") && log.contains("exited (poweroff)"),
        "{log}"
    );
}

#[test]
fn daemon_log_to_a_file_has_no_colour_codes() {
    let d = Daemon::start();
    // The socket accepts connections from its bind on; the line comes after start-up work
    // (networks, re-attach).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut log = d.daemon_log();
    while !log.contains("rvirtd listening on") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        log = d.daemon_log();
    }
    assert!(log.contains("rvirtd listening on"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "escape sequences in a log file: {log:?}"
    );
}

#[test]
fn console_shows_boot_marker_and_second_attach_needs_force() {
    let d = Daemon::start();
    d.define("c1", "");
    d.ok("POST", "/v1/domains/c1/start", None);
    let mut first = d.console("c1", false).unwrap();
    first.expect("guest c1 booted");
    let (status, err) = d.console("c1", false).err().expect("second attach refused");
    assert_eq!(status, 500);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("Active console session exists"),
        "{err}"
    );
    let mut second = d.console("c1", true).unwrap();
    second.expect("guest c1 booted");
    second.send("still here");
    second.expect("still here");
    d.ok("POST", "/v1/domains/c1/destroy", None);
}

#[test]
fn destroy_suspend_resume() {
    let d = Daemon::start();
    d.define("p1", "");
    d.ok("POST", "/v1/domains/p1/start", None);
    let pid = d.pid("p1").unwrap();
    let mut con = d.console("p1", false).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    d.ok("POST", "/v1/domains/p1/suspend", None);
    assert_eq!(d.state("p1"), ("paused".into(), "user".into()));
    let a = con.progress();
    std::thread::sleep(Duration::from_millis(300));
    let b = con.progress();
    assert_eq!(a, b, "a paused guest makes no progress");
    d.ok("POST", "/v1/domains/p1/resume", None);
    assert_eq!(d.state("p1"), ("running".into(), "unpaused".into()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(con.progress() > b, "a resumed guest makes progress");
    d.ok("POST", "/v1/domains/p1/destroy", None);
    assert_eq!(d.state("p1"), ("shut off".into(), "destroyed".into()));
    assert!(processes_mentioning(&d.run_dir().join("p1").display().to_string()).is_empty());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || processes_mentioning("p1/api.sock").is_empty()
    );
}

#[test]
fn guest_poweroff_reboot_and_crash_follow_on_actions() {
    let d = Daemon::start();
    // Defaults: on_poweroff destroy, on_reboot restart, on_crash destroy.
    d.define("g1", "");
    d.ok("POST", "/v1/domains/g1/start", None);
    let pid1 = d.pid("g1").unwrap();
    d.console("g1", false).unwrap().send("reboot");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.pid("g1").is_none_or(|p| p == pid1) {
        assert!(
            std::time::Instant::now() < deadline,
            "not restarted after guest reboot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.wait_state("g1", "running", "booted");
    d.console("g1", false).unwrap().send("panic");
    d.wait_state("g1", "shut off", "crashed");
    d.ok("POST", "/v1/domains/g1/start", None);
    d.console("g1", false).unwrap().send("poweroff");
    d.wait_state("g1", "shut off", "shutdown");
    // on_crash restart and on_reboot destroy are honoured too.
    d.define(
        "g2",
        "<on_reboot>destroy</on_reboot><on_crash>restart</on_crash>",
    );
    d.ok("POST", "/v1/domains/g2/start", None);
    let pid2 = d.pid("g2").unwrap();
    d.console("g2", false).unwrap().send("panic");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.pid("g2").is_none_or(|p| p == pid2) {
        assert!(
            std::time::Instant::now() < deadline,
            "not restarted after crash"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.console("g2", false).unwrap().send("reboot");
    d.wait_state("g2", "shut off", "shutdown");
}

#[test]
fn killed_vmm_is_crashed_and_logged() {
    let d = Daemon::start();
    d.define("k1", "");
    d.ok("POST", "/v1/domains/k1/start", None);
    let pid = d.pid("k1").unwrap();
    // SAFETY: kill(2) on the VMM this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    d.wait_state("k1", "shut off", "crashed");
    assert!(
        d.domain_log("k1").contains("died without an exit notice"),
        "{}",
        d.domain_log("k1")
    );
    // The daemon's log line is written just after the state changes: give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !d.daemon_log().contains("WARN") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.daemon_log().contains("WARN"),
        "crash logged by the daemon"
    );
}

#[test]
fn daemon_kill9_reattaches_three_running_vms() {
    let mut d = Daemon::start();
    let mut pids = Vec::new();
    for n in ["r1", "r2", "r3"] {
        d.define(n, "");
        d.ok("POST", &format!("/v1/domains/{n}/start"), None);
        pids.push(d.pid(n).unwrap());
    }
    d.ok("POST", "/v1/domains/r2/suspend", None);
    d.kill9();
    for p in &pids {
        assert!(
            std::path::Path::new(&format!("/proc/{p}")).exists(),
            "VMM {p} died with the daemon"
        );
    }
    d.spawn();
    for (n, p) in ["r1", "r2", "r3"].iter().zip(&pids) {
        assert_eq!(d.pid(n), Some(*p), "{n} re-attached to the same VMM");
    }
    assert_eq!(d.state("r1"), ("running".into(), "booted".into()));
    assert_eq!(
        d.state("r2").0,
        "paused",
        "pause state is read back from the VMM"
    );
    // New ids do not collide with re-attached ones.
    d.define("r4", "");
    d.ok("POST", "/v1/domains/r4/start", None);
    let id = d.ok("GET", "/v1/domains/r4", None)["id"].as_u64().unwrap();
    assert!(id > 3, "id {id} reused");
    d.ok("POST", "/v1/domains/r4/destroy", None);
    // Still controllable: resume, console, destroy, and a guest-initiated exit is still seen.
    d.ok("POST", "/v1/domains/r2/resume", None);
    d.console("r1", false).unwrap().expect("booted");
    d.ok("POST", "/v1/domains/r1/destroy", None);
    assert_eq!(d.state("r1"), ("shut off".into(), "destroyed".into()));
    d.console("r3", false).unwrap().send("poweroff");
    d.wait_state("r3", "shut off", "shutdown");
    // A VMM killed while the daemon was down is found dead at the next start.
    d.kill9();
    // SAFETY: kill(2) on a VMM this test started.
    unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(100));
    d.spawn();
    assert_eq!(d.state("r2").0, "shut off");
    assert!(!d.run_dir().join("r2").exists());
}

#[test]
fn autostart_across_daemon_restart() {
    let mut d = Daemon::start();
    d.define("a1", "");
    d.define("a2", "");
    d.ok(
        "PUT",
        "/v1/domains/a1/autostart",
        Some(json!({"enable": true})),
    );
    assert!(d.state_dir().join("autostart/a1.xml").exists());
    d.kill9();
    d.spawn();
    d.wait_state("a1", "running", "booted");
    assert_eq!(d.state("a2").0, "shut off");
    let v = d.ok("GET", "/v1/domains/a1", None);
    assert_eq!(v["autostart"], true);
    d.ok(
        "PUT",
        "/v1/domains/a1/autostart",
        Some(json!({"enable": false})),
    );
    assert!(!d.state_dir().join("autostart/a1.xml").exists());
}

#[test]
fn transient_domain_vanishes_at_shutoff() {
    let d = Daemon::start();
    let r = d.ok(
        "POST",
        "/v1/domains",
        Some(json!({"xml": d.xml("t1", ""), "transient": true})),
    );
    assert_eq!(r["name"], "t1");
    let v = d.ok("GET", "/v1/domains/t1", None);
    assert_eq!(
        (v["persistent"].clone(), v["state"].clone()),
        (json!(false), json!("running"))
    );
    assert!(
        !d.state_dir().join("domains/t1.xml").exists(),
        "transient: nothing written"
    );
    d.ok("POST", "/v1/domains/t1/destroy", None);
    let (status, _) = d.call("GET", "/v1/domains/t1", None);
    assert_eq!(status, 404);
}

#[test]
fn in_shutdown_while_the_guest_powers_off() {
    let d = Daemon::start();
    let xml = d
        .xml("s2", "")
        .replace("console=ttyS0", "console=ttyS0 fake.shutdown_ms=800");
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    d.ok("POST", "/v1/domains/s2/start", None);
    d.ok("POST", "/v1/domains/s2/shutdown", None);
    d.wait_state("s2", "in shutdown", "user");
    d.wait_state("s2", "shut off", "shutdown");
}

/// Waits until `name` runs a VMM other than `old`, returning the new pid.
fn wait_new_pid(d: &Daemon, name: &str, old: u32) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(p) = d.pid(name).filter(|p| *p != old) {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: VMM pid {old} was not replaced; log:\n{}",
            d.domain_log(name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn id_of(d: &Daemon, name: &str) -> u64 {
    d.ok("GET", &format!("/v1/domains/{name}"), None)["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} has no id"))
}

#[test]
fn reboot_asks_the_guest_and_restarts_with_the_same_id() {
    let d = Daemon::start();
    // The guest takes 500 ms to power off after the button: the domain keeps running meanwhile.
    let xml = d
        .xml("r1", "<on_poweroff>destroy</on_poweroff>")
        .replace("console=ttyS0", "console=ttyS0 fake.shutdown_ms=500");
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    d.ok("POST", "/v1/domains/r1/start", None);
    let (pid, id) = (d.pid("r1").unwrap(), id_of(&d, "r1"));
    d.ok("POST", "/v1/domains/r1/reboot", None);
    assert_eq!(
        d.pid("r1"),
        Some(pid),
        "reboot returns before the guest acts"
    );
    let pid2 = wait_new_pid(&d, "r1", pid);
    d.wait_state("r1", "running", "booted");
    assert_eq!(id_of(&d, "r1"), id, "a reboot keeps the domain id");
    let log = d.domain_log("r1");
    assert!(log.contains("reboot: power button pressed"), "{log}");
    assert!(log.contains("restarting the domain"), "{log}");
    // A guest that ignores the button is not rebooted (virsh reboot only asks).
    let xml = d
        .xml("r2", "")
        .replace("console=ttyS0", "console=ttyS0 fake.ignore_acpi");
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    d.ok("POST", "/v1/domains/r2/start", None);
    let pid_r2 = d.pid("r2").unwrap();
    d.ok("POST", "/v1/domains/r2/reboot", None);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.pid("r2"), Some(pid_r2));
    // A shutdown after a reboot request shuts the domain off (the request is dropped).
    d.ok("POST", "/v1/domains/r1/reboot", None);
    d.ok(
        "POST",
        "/v1/domains/r1/shutdown",
        Some(json!({"timeout_secs": 10})),
    );
    assert_eq!(d.state("r1"), ("shut off".into(), "shutdown".into()));
    assert!(
        d.pid("r1").is_none(),
        "not restarted after shutdown (was {pid2})"
    );
    // Not running: refused.
    let (status, err) = d.call("POST", "/v1/domains/r1/reboot", None);
    assert_eq!(status, 409, "{err}");
    d.ok("POST", "/v1/domains/r2/destroy", None);
}

#[test]
fn reset_restarts_the_vmm_at_once_with_the_same_id() {
    let d = Daemon::start();
    let xml = d
        .xml("x1", "")
        .replace("console=ttyS0", "console=ttyS0 fake.ignore_acpi");
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    d.ok("POST", "/v1/domains/x1/start", None);
    let (pid, id) = (d.pid("x1").unwrap(), id_of(&d, "x1"));
    d.ok("POST", "/v1/domains/x1/reset", None);
    let pid2 = d.pid("x1").expect("running right after reset");
    assert_ne!(pid, pid2, "a new VMM");
    assert_eq!(d.state("x1"), ("running".into(), "booted".into()));
    assert_eq!(id_of(&d, "x1"), id, "reset keeps the domain id");
    // Guest-initiated reboot (VMM exit 3) keeps the id too, per on_reboot restart.
    d.console("x1", false).unwrap().send("reboot");
    wait_new_pid(&d, "x1", pid2);
    d.wait_state("x1", "running", "booted");
    assert_eq!(id_of(&d, "x1"), id, "a guest reboot keeps the domain id");
    d.ok("POST", "/v1/domains/x1/destroy", None);
    assert_eq!(d.state("x1"), ("shut off".into(), "destroyed".into()));
}

#[test]
fn shutdown_timeout_reports_and_keeps_running() {
    let d = Daemon::start();
    let xml = d
        .xml("s1", "")
        .replace("console=ttyS0", "console=ttyS0 fake.ignore_acpi");
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    d.ok("POST", "/v1/domains/s1/start", None);
    let (status, err) = d.call(
        "POST",
        "/v1/domains/s1/shutdown",
        Some(json!({"timeout_secs": 1})),
    );
    assert_eq!(status, 504, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("did not shut down within 1 seconds"),
        "{err}"
    );
    assert_eq!(d.state("s1").0, "running");
    d.ok("POST", "/v1/domains/s1/destroy", None);
}

#[test]
fn vcpupin_and_cputune_set_real_thread_affinity() {
    let d = Daemon::start();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipping: pinning needs at least 2 host CPUs");
        return;
    }
    d.define(
        "pin",
        "<cputune><vcpupin vcpu='1' cpuset='1'/><emulatorpin cpuset='0'/></cputune>",
    );
    d.ok("POST", "/v1/domains/pin/start", None);
    let v = d.ok("GET", "/v1/domains/pin/vcpus", None);
    let tid = |n: usize| v[n]["tid"].as_i64().unwrap() as i32;
    assert_eq!(v[1]["affinity"], "1", "cputune applied at start: {v}");
    assert_eq!(affinity(tid(1)), vec![1]);
    assert_eq!(
        affinity(d.pid("pin").unwrap() as i32),
        vec![0],
        "emulatorpin applied"
    );
    d.ok(
        "POST",
        "/v1/domains/pin/vcpupin",
        Some(json!({"vcpu": 0, "cpuset": "1"})),
    );
    assert_eq!(affinity(tid(0)), vec![1], "live vcpupin");
    // Bad cpusets are refused and change nothing.
    for bad in ["99", "a-b", "1-0", ""] {
        let (status, err) = d.call(
            "POST",
            "/v1/domains/pin/vcpupin",
            Some(json!({"vcpu": 0, "cpuset": bad})),
        );
        assert_eq!(status, 400, "{bad}: {err}");
        assert!(err["error"].as_str().unwrap().contains("invalid"), "{err}");
    }
    let (status, _) = d.call(
        "POST",
        "/v1/domains/pin/vcpupin",
        Some(json!({"vcpu": 7, "cpuset": "0"})),
    );
    assert_eq!(status, 400);
    assert_eq!(affinity(tid(0)), vec![1]);
    // --config persists into the definition.
    d.ok(
        "POST",
        "/v1/domains/pin/vcpupin",
        Some(json!({"vcpu": 0, "cpuset": "0", "config": true})),
    );
    let x = d.ok("GET", "/v1/domains/pin/xml?inactive=true", None);
    assert!(
        x["xml"]
            .as_str()
            .unwrap()
            .contains("<vcpupin vcpu='0' cpuset='0'/>"),
        "{x}"
    );
    d.ok("POST", "/v1/domains/pin/destroy", None);
}

fn affinity(tid: i32) -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size.
    let rc = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(rc, 0);
    // SAFETY: c is below CPU_SETSIZE.
    (0..64)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let d = Daemon::start();
    let (status, err) = d.call(
        "POST",
        "/v1/domains",
        Some(json!({"xml": "<domain type='kvm'>\n<name>x</nam>\n</domain>"})),
    );
    assert_eq!(status, 400);
    assert_eq!(err["code"], "xml_error");
    assert!(err["error"].as_str().unwrap().contains("line 2"), "{err}");
    let (status, err) = d.call(
        "POST",
        "/v1/domains",
        Some(json!({"xml": d.xml("b1", "").replace("bus='virtio'", "bus='ide'")})),
    );
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().contains("bus='ide'"),
        "{err}"
    );
    let r = d.define("b1", "");
    // Same name, different UUID: refused.
    let other = d.xml("b1", "").replace(
        "<name>b1</name>",
        "<name>b1</name><uuid>00000000-0000-4000-8000-000000000001</uuid>",
    );
    let (status, err) = d.call("POST", "/v1/domains", Some(json!({"xml": other})));
    assert_eq!(status, 409, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("already exists with uuid"),
        "{err}"
    );
    // Same UUID, different name: refused.
    let dup = d.xml("b2", "").replace(
        "<name>b2</name>",
        &format!(
            "<name>b2</name><uuid>{}</uuid>",
            r["uuid"].as_str().unwrap()
        ),
    );
    let (status, err) = d.call("POST", "/v1/domains", Some(json!({"xml": dup})));
    assert_eq!(status, 409, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("domain 'b1' already exists"),
        "{err}"
    );
    // Unknown domain.
    for (m, p) in [
        ("GET", "/v1/domains/nope"),
        ("POST", "/v1/domains/nope/start"),
        ("DELETE", "/v1/domains/nope"),
    ] {
        let (status, err) = d.call(m, p, None);
        assert_eq!(status, 404, "{m} {p}");
        assert_eq!(err["code"], "no_domain");
    }
    // Starting a running domain.
    d.ok("POST", "/v1/domains/b1/start", None);
    let pid = d.pid("b1");
    let (status, err) = d.call("POST", "/v1/domains/b1/start", None);
    assert_eq!(status, 409);
    assert_eq!(err["error"], "Domain is already active");
    assert_eq!(d.pid("b1"), pid);
    d.ok("POST", "/v1/domains/b1/destroy", None);
    // Missing disk: clear error, state unchanged, nothing left behind.
    let missing = d.xml("b3", "").replace("disk.img", "gone.img");
    d.ok("POST", "/v1/domains", Some(json!({"xml": missing})));
    let (status, err) = d.call("POST", "/v1/domains/b3/start", None);
    assert_eq!(status, 500);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("Cannot access storage file")
            && err["error"].as_str().unwrap().contains("gone.img"),
        "{err}"
    );
    assert_eq!(d.state("b3"), ("shut off".into(), "unknown".into()));
    assert!(!d.run_dir().join("b3").exists());
    // A VMM that fails during start-up: its error reaches the user, state is failed.
    let bad_vmm = d.xml("b4", "").replace("console=ttyS0", "fake.fail_start");
    d.ok("POST", "/v1/domains", Some(json!({"xml": bad_vmm})));
    let (status, err) = d.call("POST", "/v1/domains/b4/start", None);
    assert_eq!(status, 500, "{err}");
    let msg = err["error"].as_str().unwrap();
    assert!(
        msg.contains("did not start") && msg.contains("simulated start-up failure"),
        "{err}"
    );
    assert_eq!(d.state("b4"), ("shut off".into(), "failed".into()));
    assert!(!d.run_dir().join("b4").exists());
    // The stored definitions are intact.
    assert!(d.state_dir().join("domains/b1.xml").exists());
    let list = d.ok("GET", "/v1/domains", None);
    assert_eq!(list.as_array().unwrap().len(), 3, "b1, b3, b4");
}

#[test]
fn undefine_running_makes_transient_then_it_vanishes() {
    let d = Daemon::start();
    d.define("u1", "");
    d.ok("POST", "/v1/domains/u1/start", None);
    d.ok("DELETE", "/v1/domains/u1", None);
    assert!(!d.state_dir().join("domains/u1.xml").exists());
    assert_eq!(d.ok("GET", "/v1/domains/u1", None)["persistent"], false);
    d.ok("POST", "/v1/domains/u1/destroy", None);
    assert_eq!(d.call("GET", "/v1/domains/u1", None).0, 404);
}

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let d = Daemon::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rvirtd"))
        .arg("--socket")
        .arg(d.socket())
        .arg("--state-dir")
        .arg(d.state_dir())
        .arg("--run-dir")
        .arg(d.run_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already listening"),
        "{out:?}"
    );
}

#[test]
fn openapi_lists_every_route() {
    let d = Daemon::start();
    let doc = d.ok("GET", "/v1/openapi.json", None);
    assert_eq!(doc["openapi"], "3.0.3");
    for (method, path, ..) in rvirtd::openapi::OPERATIONS {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        let probe = path.replace("{name}", "nope");
        let (status, _) = d.call(&method.to_uppercase(), &probe, Some(json!({})));
        assert_ne!(
            status, 405,
            "{method} {path} is in the document but not routed"
        );
    }
}

#[test]
fn unresponsive_vmm_is_still_reattached_and_destroyable() {
    let mut d = Daemon::start();
    d.define("h1", "");
    d.ok("POST", "/v1/domains/h1/start", None);
    let pid = d.pid("h1").unwrap();
    d.kill9();
    // SAFETY: kill(2) on the VMM this test started: freeze it so it cannot answer.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    d.spawn();
    assert_eq!(
        d.pid("h1"),
        Some(pid),
        "a live but silent VMM is not forgotten"
    );
    assert_eq!(d.state("h1").0, "running");
    d.ok("POST", "/v1/domains/h1/destroy", None);
    assert_eq!(d.state("h1"), ("shut off".into(), "destroyed".into()));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || processes_mentioning(&format!("{}/", d.run_dir().display())).is_empty()
    );
}

/// Runs `ip` inside the test's network namespace.
fn ip_in(ns: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ip"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn interfaces_get_taps_on_their_bridge_in_a_netns() {
    let ns = format!("rvirt-test-{}", std::process::id());
    let made = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .output();
    if !made.as_ref().is_ok_and(|o| o.status.success())
        || !std::path::Path::new("/dev/net/tun").exists()
    {
        eprintln!("skipping: needs root, ip netns and /dev/net/tun ({made:?})");
        return;
    }
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .output();
        }
    }
    let _ns = Ns(ns.clone());
    assert!(ip_in(&ns, &["link", "add", "br-t", "type", "bridge"])
        .status
        .success());
    // The daemon runs inside the namespace, as it would on a host with that bridge.
    let mut d = Daemon::start();
    d.kill9();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.dir.path().join("rvirtd.log"))
        .unwrap();
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_rvirtd")])
        .arg("--socket")
        .arg(d.socket())
        .arg("--state-dir")
        .arg(d.state_dir())
        .arg("--run-dir")
        .arg(d.run_dir())
        .arg("--vmm-binary")
        .arg(common::fake_vmm())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    d.child = Some(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(d.socket()).is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", d.daemon_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let nic = "<devices><interface type='bridge'><source bridge='br-t'/><mac address='52:54:00:aa:bb:01'/></interface></devices>";
    let xml = d.xml("n1", "").replace(
        "</devices></domain>",
        &format!("{}</domain>", nic.replace("<devices>", "")),
    );
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    d.ok("POST", "/v1/domains/n1/start", None);
    let ifs = d.ok("GET", "/v1/domains/n1/interfaces", None);
    let tap = ifs[0]["interface"].as_str().unwrap().to_string();
    assert!(tap.starts_with("rvnet"), "{ifs}");
    let show =
        String::from_utf8_lossy(&ip_in(&ns, &["-o", "link", "show", &tap]).stdout).into_owned();
    assert!(show.contains("master br-t"), "{show}");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(d.run_dir().join("n1/vmm-config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["nets"],
        json!([{"tap": tap, "mac": [0x52, 0x54, 0, 0xaa, 0xbb, 1], "id": "net0"}]),
        "{cfg}"
    );
    d.ok("POST", "/v1/domains/n1/destroy", None);
    assert!(
        !ip_in(&ns, &["link", "show", &tap]).status.success(),
        "TAP removed at shut off"
    );
    // A missing bridge is a clear error, and no TAP is left.
    let xml2 = xml
        .replace("br-t", "br-missing")
        .replace("<name>n1</name>", "<name>n2</name>")
        .replace("aa:bb:01", "aa:bb:02");
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml2})));
    let (status, err) = d.call("POST", "/v1/domains/n2/start", None);
    assert_eq!(status, 500);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("bridge 'br-missing'"),
        "{err}"
    );
    let links = String::from_utf8_lossy(&ip_in(&ns, &["-o", "link"]).stdout).into_owned();
    assert!(!links.contains("rvnet"), "{links}");
}

#[test]
fn hand_placed_definitions_are_checked_at_start() {
    let mut d = Daemon::start();
    d.define("good", "");
    d.kill9();
    let domains = d.state_dir().join("domains");
    // No uuid: one is generated and stored. Wrong file name, duplicate uuid, broken XML: skipped.
    std::fs::write(domains.join("nouuid.xml"), d.xml("nouuid", "")).unwrap();
    std::fs::write(domains.join("other-name.xml"), d.xml("misnamed", "")).unwrap();
    let good = std::fs::read_to_string(domains.join("good.xml")).unwrap();
    std::fs::write(
        domains.join("twin.xml"),
        good.replace("<name>good</name>", "<name>twin</name>"),
    )
    .unwrap();
    std::fs::write(
        domains.join("broken.xml"),
        "<domain type='kvm'><name>broken",
    )
    .unwrap();
    d.spawn();
    let list = d.ok("GET", "/v1/domains", None);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["good", "nouuid"], "{list}");
    assert_eq!(list[1]["uuid"].as_str().unwrap().len(), 36);
    assert!(std::fs::read_to_string(domains.join("nouuid.xml"))
        .unwrap()
        .contains("<uuid>"));
    let log = d.daemon_log();
    for needle in [
        "broken.xml",
        "another file name",
        "is used by another domain",
    ] {
        assert!(log.contains(needle), "{needle} not logged:\n{log}");
    }
    assert!(
        domains.join("broken.xml").exists(),
        "a bad file is left for the user to fix"
    );
}

#[test]
fn sigterm_stops_the_daemon_but_not_the_vms() {
    let mut d = Daemon::start();
    d.define("t9", "");
    d.ok("POST", "/v1/domains/t9/start", None);
    let pid = d.pid("t9").unwrap();
    let mut child = d.child.take().unwrap();
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", d.daemon_log());
    assert!(!d.socket().exists(), "socket removed on a clean stop");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VM kept running"
    );
    d.spawn();
    assert_eq!(d.pid("t9"), Some(pid));
    d.ok("POST", "/v1/domains/t9/destroy", None);
}

/// What rvirtd hands the VMM: `vmm-config.json` (0600) in the run dir, `--config` on the
/// command line, with the XML settings the old argv dropped.
#[test]
fn vmm_config_file_carries_the_xml_settings() {
    let d = Daemon::start();
    let odd = d.dir.path().join("disk, one,format=qcow2 x.img");
    std::fs::write(&odd, vec![0u8; 4096]).unwrap();
    let xml = format!(
        "<domain type='kvm'><name>cfg</name>\
         <memory unit='MiB'>512</memory><currentMemory unit='MiB'>256</currentMemory>\
         <vcpu current='1'>3</vcpu>\
         <memoryBacking><nosharepages/><source type='memfd'/><access mode='shared'/></memoryBacking>\
         <cputune><vcpupin vcpu='2' cpuset='0'/><emulatorpin cpuset='0'/></cputune>\
         <os><type>hvm</type><kernel>{k}</kernel><cmdline>console=ttyS0</cmdline></os>\
         <devices>\
         <disk type='file'><driver name='qemu' type='raw' cache='none'/><source file='{p}'/>\
         <target dev='vdb' bus='virtio'/><serial>SN-42</serial></disk>\
         <disk type='file'><driver type='raw' cache='unsafe'/><source file='{p2}'/>\
         <target dev='vda' bus='virtio'/><readonly/><alias name='ua-boot'/></disk>\
         <memballoon model='virtio' autodeflate='on'><stats period='7'/></memballoon>\
         </devices></domain>",
        k = d.dir.path().join("vmlinux").display(),
        p = odd.display(),
        p2 = d.dir.path().join("disk.img").display(),
    );
    let r = d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    assert_eq!(r["warnings"], json!([]), "everything here is applied: {r}");
    d.ok("POST", "/v1/domains/cfg/start", None);
    let path = d.run_dir().join("cfg").join("vmm-config.json");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the VMM config is private");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let run = d.run_dir().join("cfg");
    let expected = json!({
        "name": "cfg",
        "boot": {
            "kind": "kernel",
            "kernel": d.dir.path().join("vmlinux"),
            "initrd": null,
            "cmdline": "console=ttyS0"
        },
        "memory": {
            "size": 512u64 << 20,
            "current": 256u64 << 20,
            "backing": {"hugepages": false, "nosharepages": true, "memfd": true, "shared": true}
        },
        "cpus": {"boot": 1, "max": 3},
        "disks": [
            {"path": odd, "format": "raw", "readonly": false, "cache": "none",
             "serial": "SN-42", "id": "virtio-disk1", "bus": "virtio", "device": "disk",
             "unit": null, "boot_order": null},
            {"path": d.dir.path().join("disk.img"), "format": "raw", "readonly": true,
             "cache": "unsafe", "serial": null, "id": "ua-boot", "bus": "virtio",
             "device": "disk", "unit": null, "boot_order": null}
        ],
        "nets": [],
        "serial": {"kind": "socket", "path": run.join("serial.sock")},
        "balloon": {"deflate_on_oom": true, "free_page_reporting": false, "stats_period": 7},
        "rng": true,
        "api_socket": run.join("api.sock"),
        "start_paused": true,
        "emulator_affinity": [0],
        "vcpu_affinity": [{"vcpu": 2, "cpus": [0]}]
    });
    assert_eq!(cfg, expected, "{cfg:#}");
    // The typed struct reads it back (unknown fields would be refused).
    let typed: rvirt_api::vmm_config::VmConfig = serde_json::from_value(cfg).unwrap();
    assert_eq!(typed.disks[0].path.as_ref(), Some(&odd));
    let log = d.domain_log("cfg");
    assert!(
        log.contains(&format!("--config {}", path.display())),
        "{log}"
    );
    // The stand-in VMM read it: one vCPU thread (cpus.boot).
    let v = d.ok("GET", "/v1/domains/cfg/vcpus", None);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    d.ok("POST", "/v1/domains/cfg/destroy", None);
    assert!(!path.exists(), "run files removed at shut off");
}

/// libvirt's QEMU start: -S, pin, cont. The stand-in VMM starts paused (start_paused) and, on
/// its first resume, logs the affinity every thread had then.
#[test]
fn start_pins_while_paused_then_resumes() {
    let d = Daemon::start();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipping: pinning needs at least 2 host CPUs");
        return;
    }
    d.define(
        "sp",
        "<cputune><vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='1' cpuset='0'/><emulatorpin cpuset='0'/></cputune>",
    );
    d.ok("POST", "/v1/domains/sp/start", None);
    assert_eq!(d.state("sp"), ("running".into(), "booted".into()));
    let log = d.domain_log("sp");
    let applied = log.find("cputune applied").expect(&log);
    let resumed = log
        .find("rvirt-fake-vmm: resumed; affinity vcpu0=1 vcpu1=0 emulator=0\n")
        .unwrap_or_else(|| panic!("pinned before the vCPUs ran: {log}"));
    assert!(applied < resumed, "{log}");
    let mut con = d.console("sp", false).unwrap();
    let a = con.progress();
    std::thread::sleep(Duration::from_millis(200));
    assert!(con.progress() > a, "resumed: the guest makes progress");
    d.ok("POST", "/v1/domains/sp/destroy", None);
}

/// virsh start --paused: the VMM is pinned and stays paused until resume.
#[test]
fn start_paused_stays_paused_until_resume() {
    let d = Daemon::start();
    d.define("pp", "");
    d.ok(
        "POST",
        "/v1/domains/pp/start",
        Some(json!({"paused": true})),
    );
    assert_eq!(d.state("pp"), ("paused".into(), "user".into()));
    let mut con = d.console("pp", false).unwrap();
    assert_eq!(con.progress(), 0, "no vCPU has run");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(con.progress(), 0, "still paused");
    let log = d.domain_log("pp");
    assert!(
        log.contains("(id 1, paused)") && !log.contains("resumed;"),
        "{log}"
    );
    let (status, err) = d.call(
        "POST",
        "/v1/domains/pp/start",
        Some(json!({"paused": "yes"})),
    );
    assert_eq!(status, 400, "{err}");
    d.ok("POST", "/v1/domains/pp/resume", None);
    assert_eq!(d.state("pp"), ("running".into(), "unpaused".into()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(con.progress() > 0, "resumed");
    assert!(d.domain_log("pp").contains("rvirt-fake-vmm: resumed;"));
    d.ok("POST", "/v1/domains/pp/destroy", None);
}

/// A VMM that ignores start_paused: rvirtd says so in the log and still honours --paused.
#[test]
fn start_paused_with_a_vmm_that_runs_at_once() {
    let d = Daemon::start();
    let xml = d
        .xml("old", "")
        .replace("console=ttyS0", "console=ttyS0 fake.ignore_start_paused");
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    d.ok(
        "POST",
        "/v1/domains/old/start",
        Some(json!({"paused": true})),
    );
    assert_eq!(d.state("old"), ("paused".into(), "user".into()));
    let mut con = d.console("old", false).unwrap();
    let a = con.progress();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(con.progress(), a, "paused by rvirtd");
    assert!(
        d.domain_log("old").contains("did not start paused"),
        "{}",
        d.domain_log("old")
    );
    d.ok("POST", "/v1/domains/old/destroy", None);
}

#[test]
fn uefi_domain_gets_its_own_nvram_and_boots_the_cdrom_first() {
    let d = Daemon::start();
    // Stand-ins for Debian's OVMF pair (only their bytes matter to the daemon).
    let code = d.dir.path().join("OVMF_CODE_4M.fd");
    let vars = d.dir.path().join("OVMF_VARS_4M.fd");
    std::fs::write(&code, vec![0xc0u8; 64 << 10]).unwrap();
    std::fs::write(&vars, vec![0x5au8; 64 << 10]).unwrap();
    let iso = d.dir.path().join("install.iso");
    std::fs::write(&iso, vec![0u8; 2 << 20]).unwrap();
    let xml = format!(
        "<domain type='kvm'><name>efi</name><memory unit='MiB'>256</memory>\
         <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>\
         <loader readonly='yes' type='pflash'>{code}</loader><nvram template='{vars}'/>\
         <boot dev='cdrom'/><boot dev='hd'/></os>\
         <devices>\
         <disk type='file'><driver type='raw'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='cdrom'><source file='{iso}'/><target dev='sda' bus='scsi'/><readonly/></disk>\
         <controller type='scsi' model='virtio-scsi'/>\
         </devices></domain>",
        code = code.display(),
        vars = vars.display(),
        disk = d.dir.path().join("disk.img").display(),
        iso = iso.display(),
    );
    let r = d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    assert_eq!(r["warnings"], json!([]), "{r}");
    // dumpxml shows the store libvirt would have made up: under the state dir, per domain.
    let nvram = d.state_dir().join("nvram").join("efi_VARS.fd");
    let (_, x) = d.call("GET", "/v1/domains/efi/xml", None);
    let text = x["xml"].as_str().unwrap_or_default().to_string();
    assert!(
        text.contains(&format!(
            "<nvram template='{}'>{}</nvram>",
            vars.display(),
            nvram.display()
        )),
        "{text}"
    );
    assert!(!nvram.exists(), "the store is made at start, not at define");
    d.ok("POST", "/v1/domains/efi/start", None);
    assert_eq!(
        std::fs::read(&nvram).unwrap(),
        std::fs::read(&vars).unwrap()
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(d.run_dir().join("efi").join("vmm-config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["boot"],
        json!({"kind": "firmware", "firmware": code, "nvram": nvram, "boot_menu_ms": null}),
        "{cfg:#}"
    );
    // <boot dev='cdrom'/> then 'hd': the CD-ROM first, then the disk.
    let disks = cfg["disks"].as_array().unwrap();
    assert_eq!(disks[0]["boot_order"], 2);
    assert_eq!(disks[1]["boot_order"], 1);
    assert_eq!(
        (
            &disks[1]["bus"],
            &disks[1]["device"],
            &disks[1]["readonly"],
            &disks[1]["id"]
        ),
        (
            &json!("scsi"),
            &json!("cdrom"),
            &json!(true),
            &json!("scsi0-0-0-0")
        )
    );
    // The guest's variables survive a restart: the store is not re-copied.
    std::fs::write(&nvram, b"guest wrote Boot0001").unwrap();
    d.ok("POST", "/v1/domains/efi/destroy", None);
    d.ok("POST", "/v1/domains/efi/start", None);
    assert_eq!(std::fs::read(&nvram).unwrap(), b"guest wrote Boot0001");
    d.ok("POST", "/v1/domains/efi/destroy", None);
    // undefine: refused while the store exists unless told what to do with it (virsh).
    let (status, err) = d.call("DELETE", "/v1/domains/efi", None);
    assert_eq!(status, 409, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("cannot undefine domain with nvram"),
        "{err}"
    );
    let (status, _) = d.call("DELETE", "/v1/domains/efi?nvram=true&keep_nvram=true", None);
    assert_eq!(status, 400);
    d.ok("DELETE", "/v1/domains/efi?keep_nvram=true", None);
    assert!(nvram.exists(), "--keep-nvram keeps it");
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    d.ok("DELETE", "/v1/domains/efi?nvram=true", None);
    assert!(!nvram.exists(), "--nvram deletes it");
}

#[test]
fn a_domain_without_kernel_boots_seabios_and_missing_firmware_names_the_package() {
    let d = Daemon::start();
    let xml = format!(
        "<domain type='kvm'><name>bios</name><memory unit='MiB'>128</memory>\
         <os><type>hvm</type><loader type='rom'>/usr/share/seabios/no-such-bios.bin</loader>\
         <bootmenu enable='yes' timeout='1500'/></os>\
         <devices><disk type='file'><source file='{}'/><target dev='vda'/><boot order='1'/></disk>\
         </devices></domain>",
        d.dir.path().join("disk.img").display()
    );
    // Nothing to boot at all: refused at define, not at start.
    let (status, err) = d.call(
        "POST",
        "/v1/domains",
        Some(json!({"xml": "<domain type='kvm'><name>nothing</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>"})),
    );
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("no way to boot"),
        "{err}"
    );
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    let (status, err) = d.call("POST", "/v1/domains/bios/start", None);
    assert_eq!(status, 500, "{err}");
    let msg = err["error"].as_str().unwrap();
    assert!(
        msg.contains("no-such-bios.bin") && msg.contains("seabios package"),
        "{msg}"
    );
    // No <loader>: SeaBIOS's image, with the disk's boot order passed on.
    let xml = xml.replace(
        "<loader type='rom'>/usr/share/seabios/no-such-bios.bin</loader>",
        "",
    );
    d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
    assert!(
        std::path::Path::new("/usr/share/seabios/bios-256k.bin").exists(),
        "Debian's seabios package is missing: run ./scripts/install-deps"
    );
    d.ok("POST", "/v1/domains/bios/start", None);
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(d.run_dir().join("bios").join("vmm-config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["boot"],
        json!({"kind": "firmware", "firmware": "/usr/share/seabios/bios-256k.bin", "nvram": null, "boot_menu_ms": 1500})
    );
    assert_eq!(cfg["disks"][0]["boot_order"], 1);
}

#[test]
fn change_media_swaps_ejects_and_inserts_discs_live_and_in_the_definition() {
    let d = Daemon::start();
    let iso1 = d.dir.path().join("installer.iso");
    let iso2 = d.dir.path().join("drivers.iso");
    std::fs::write(&iso1, vec![0u8; 4096]).unwrap();
    std::fs::write(&iso2, vec![0u8; 4096]).unwrap();
    let cd = format!(
        "<disk type='file' device='cdrom'><source file='{}'/><target dev='sda' bus='scsi'/><readonly/></disk>",
        iso1.display()
    );
    let def = d
        .xml("cd", "")
        .replace("</devices>", &format!("{cd}</devices>"));
    d.ok("POST", "/v1/domains", Some(json!({"xml": def})));
    d.ok("POST", "/v1/domains/cd/start", None);
    let media = |body: Value| d.call("POST", "/v1/domains/cd/media", Some(body));
    let xml = |inactive: bool| {
        let q = if inactive { "?inactive=true" } else { "" };
        d.ok("GET", &format!("/v1/domains/cd/xml{q}"), None)["xml"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Replace the disc (default action update), live only: the definition keeps the first.
    let (s, e) = media(json!({"path": "sda", "source": iso2}));
    assert_eq!(s, 200, "{e}");
    assert!(xml(false).contains(&format!("<source file='{}'/>", iso2.display())));
    assert!(xml(true).contains(&format!("<source file='{}'/>", iso1.display())));
    // A drive named by its disc: the running one has the new disc.
    let (s, e) = media(json!({"path": iso2, "source": iso1, "live": true}));
    assert_eq!(s, 200, "{e}");
    // Eject live and in the definition: no <source> left in either, domblklist shows '-'.
    let (s, e) = media(json!({"path": "sda", "action": "eject", "live": true, "config": true}));
    assert_eq!(s, 200, "{e}");
    for inactive in [false, true] {
        let x = xml(inactive);
        assert!(!x.contains(".iso"), "{x}");
        assert!(
            x.contains("<disk type='file' device='cdrom'>\n      <target dev='sda'"),
            "{x}"
        );
    }
    let blk = d.ok("GET", "/v1/domains/cd/disks", None);
    assert!(blk.to_string().contains("\"source\":\"-\""), "{blk}");
    // Insert into the empty drive; a second insert is refused (it has media now).
    let (s, e) = media(json!({"path": "sda", "source": iso1, "action": "insert"}));
    assert_eq!(s, 200, "{e}");
    let (s, e) = media(json!({"path": "sda", "source": iso2, "action": "insert"}));
    assert_eq!(s, 409, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("already has media"),
        "{e}"
    );
    // Not a drive, no such drive, no such disc, bad action.
    let (s, e) = media(json!({"path": "vda", "action": "eject"}));
    assert_eq!(s, 409, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("not removable"),
        "{e}"
    );
    let (s, e) = media(json!({"path": "sdz", "action": "eject"}));
    assert_eq!(s, 500, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("No disk found"),
        "{e}"
    );
    let (s, e) = media(json!({"path": "sda", "source": "/nonexistent.iso"}));
    assert_eq!(s, 500, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("/nonexistent.iso"),
        "{e}"
    );
    let (s, _) = media(json!({"path": "sda", "action": "spin"}));
    assert_eq!(s, 400);
}
