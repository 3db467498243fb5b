//! Live resources with the Debian guest inside the test host VM (`tests/scenarios/live-e2e.sh`,
//! guest side `live-guest.sh`): balloon inflate/deflate through `qemu-monitor-command` and
//! `setmem` (guest MemTotal and VMM RSS move), `dommemstat` with guest statistics, free page
//! reporting returning freed guest memory to the host, `setvcpus --live` up and down (the guest
//! onlines, uses and ejects the vCPU), `attach-disk`/`detach-disk` of a qcow2 image (no rescan,
//! image lock released), `attach-interface` on the NAT network (DHCP lease) and its detach.

use std::time::Duration;

use rvirt_tests::{workspace_root, Scenario, TestHost};

const RESULTS: &[&str] = &[
    "daemon.up",
    "net.start",
    "define",
    "vm1.boot",
    "balloon.info",
    "balloon.set",
    "balloon.inflate",
    "balloon.guest",
    "balloon.rss",
    "balloon.stats",
    "balloon.setmem",
    "balloon.deflate",
    "vcpu.set",
    "vcpu.add",
    "vcpu.count",
    "vcpu.work",
    "vcpu.unset",
    "vcpu.remove",
    "vcpu.threads",
    "disk.attach",
    "disk.guest",
    "disk.xml",
    "disk.locked",
    "disk.detach",
    "disk.gone",
    "disk.unlocked",
    "nic.attach",
    "nic.lease",
    "nic.leases",
    "nic.detach",
    "nic.gone",
    "vm1.destroy",
    "define.vm2",
    "vm2.boot",
    "reporting.rss",
    "vm2.destroy",
];

#[test]
fn balloon_vcpu_disk_and_nic_changes_on_a_running_guest() {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let lib = workspace_root().join("tests/scenarios");
    let scenario = Scenario::file("live-e2e.sh")
        .bin("rvirtd")
        .bin("rvirt")
        .bin("rvirt-vmm")
        .bin("rvirt-img")
        .with_file(lib.join("daemon-lib.sh"), "/scenarios/daemon-lib.sh")
        .with_file(lib.join("live-lib.sh"), "/scenarios/live-lib.sh")
        .with_file(lib.join("live-guest.sh"), "/scenarios/live-guest.sh")
        .arg("mem", "384")
        .timeout(Duration::from_secs(900));
    let out = TestHost::run(&scenario).expect("test host run");
    eprintln!("{}", out.summary());
    out.expect_passed(RESULTS);
}
