//! rvirtd and rvirt with real rvirt-vmm processes booting the Debian test guest inside the test
//! host VM (issue #4's end-to-end list): define from a libvirt XML file, start, the guest's
//! marker on `rvirt console`, suspend/resume stopping and resuming guest progress, shutdown
//! through the ACPI power button with its reason, destroy, autostart and re-attach of three
//! running VMs across a kill -9 of rvirtd, kill -9 of a VMM (crashed, both for a VMM the daemon
//! spawned and one it re-attached to), guest reboot and `rvirt reboot` (restart, same id).
//! The scenario is `tests/scenarios/daemon-e2e.sh`.

use std::time::Duration;

use rvirt_tests::{workspace_root, Scenario, TestHost};

/// Every result the scenario reports, by name.
const RESULTS: &[&str] = &[
    "daemon.up",
    "define",
    "define.state",
    "start",
    "console",
    "guest.blk",
    "start.after-boot",
    "console.second",
    "suspend",
    "suspend.frozen",
    "resume",
    "resume.progress",
    "shutdown",
    "shutdown.guest",
    "shutdown.state",
    "daemon.kill9.vms-survive",
    "daemon.restart",
    "reattach",
    "autostart",
    "reattach.console",
    "reattach.suspend",
    "reattach.resume",
    "reattach.shutdown",
    "reattach.shutdown.state",
    "destroy",
    "destroy.state",
    "destroy.process",
    "crash.reattached",
    "crash.child",
    "crash.log",
    "runfiles.clean",
    "guest-reboot",
    "guest-reboot.state",
    "guest-reboot.id",
    "guest-reboot.log",
    "reboot",
    "reboot.guest",
    "reboot.up",
    "reboot.state",
    "reboot.id",
];

#[test]
fn daemon_lifecycle_with_real_vmms() {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let scenario = Scenario::file("daemon-e2e.sh")
        .bin("rvirtd")
        .bin("rvirt")
        .bin("rvirt-vmm")
        .with_file(
            workspace_root().join("tests/scenarios/daemon-lib.sh"),
            "/scenarios/daemon-lib.sh",
        )
        .arg("mem", "128")
        .timeout(Duration::from_secs(900));
    let out = TestHost::run(&scenario).expect("test host run");
    eprintln!("{}", out.summary());
    out.expect_passed(RESULTS);
}
