//! The demo (`./scripts/demo`, `tests/scenarios/demo.sh`) as a test, so that it keeps working:
//! rvirtd, rvirt-img making the qcow2 disk, `rvirt install --vcpus 1,maxvcpus=2` on the NAT
//! network, the console's boot marker with every guest check passed, `setmem --live` (guest
//! MemTotal 256 MiB lower, `dommemstat` actual), `setvcpus --live` (2 CPUs online in the guest),
//! list, dominfo, domifaddr, `shutdown` through the power button, undefine, and the guest's write
//! read back through the qcow2 image.

use std::time::Duration;

use rvirt_tests::{workspace_root, Scenario, TestHost};

const RESULTS: &[&str] = &[
    "demo.daemon",
    "demo.net.start",
    "demo.disk.create",
    "demo.install",
    "demo.boot",
    "demo.setmem",
    "demo.setmem.guest",
    "demo.dommemstat",
    "demo.setvcpus",
    "demo.setvcpus.guest",
    "demo.vcpucount",
    "demo.list",
    "demo.dominfo",
    "demo.domifaddr",
    "demo.shutdown",
    "demo.shutdown.off",
    "demo.undefine",
    "demo.disk.convert",
    "demo.disk.guest",
    "demo.all",
];

#[test]
fn the_demo_installs_resizes_and_shuts_down_a_guest_through_the_stack() {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let lib = workspace_root().join("tests/scenarios");
    let scenario = Scenario::file("demo.sh")
        .bin("rvirtd")
        .bin("rvirt")
        .bin("rvirt-vmm")
        .bin("rvirt-img")
        .with_file(lib.join("daemon-lib.sh"), "/scenarios/daemon-lib.sh")
        .with_file(lib.join("live-lib.sh"), "/scenarios/live-lib.sh")
        .with_file(lib.join("live-guest.sh"), "/scenarios/live-guest.sh")
        .timeout(Duration::from_secs(600));
    let out = TestHost::run(&scenario).expect("test host run");
    eprintln!("{}", out.summary());
    out.expect_passed(RESULTS);
}
