//! The test host and guest fixtures, checked with QEMU/KVM inside the test host: independent of
//! rvirt-vmm, so a failure here is a fixture problem, not a VMM one.

use rvirt_tests::{Scenario, TestHost};

#[test]
fn qemu_boots_the_guest_fixture_with_every_check_passing() {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let out = TestHost::run(&Scenario::file("qemu-guest.sh").qemu()).expect("test host run");
    eprintln!("{}", out.summary());
    out.expect_passed(&[
        "qemu.cpus",
        "qemu.mem",
        "qemu.blk",
        "qemu.net",
        "qemu.rng",
        "qemu.done",
        "qemu.exit",
        "qemu.disk",
    ]);
}

#[test]
fn kvm_probe_sees_native_kvm_in_the_test_host() {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let scenario = Scenario::file("kvm-probe.sh").bin("rvirt-kvm-probe");
    let out = TestHost::run(&scenario).expect("test host run");
    eprintln!("{}", out.summary());
    out.expect_passed(&["probe.native"]);
}
