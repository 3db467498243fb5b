//! rvirt-vmm boots Debian's stock kernel with the test initramfs inside the test host VM: all
//! vCPUs online, memory within 5%, virtio-blk read and written (the test host checks the bytes),
//! virtio-net pings the test host's end of the TAP, /dev/hwrng gives bytes, poweroff exits 0, and
//! the guest's write to the boot-timer port shows up as the VMM's `boot-timer:` line.

use rvirt_tests::{Scenario, TestHost};

fn boot(kernel: &str, cpus: u32) {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let scenario = Scenario::file("vmm-boot.sh")
        .bin("rvirt-vmm")
        .arg("kernel", kernel)
        .arg("cpus", &cpus.to_string())
        .arg("mem", "256");
    let out = TestHost::run(&scenario).expect("test host run");
    eprintln!("{}", out.summary());
    out.expect_passed(&[
        "vmm.cpus",
        "vmm.mem",
        "vmm.blk",
        "vmm.net",
        "vmm.rng",
        "vmm.done",
        "vmm.exit",
        "vmm.disk",
        "vmm.boottime",
    ]);
}

#[test]
fn pvh_vmlinux_1_vcpu() {
    boot("vmlinux", 1);
}

#[test]
fn pvh_vmlinux_2_vcpus() {
    boot("vmlinux", 2);
}

#[test]
fn bzimage_1_vcpu() {
    boot("bzImage", 1);
}

#[test]
fn bzimage_2_vcpus() {
    boot("bzImage", 2);
}
