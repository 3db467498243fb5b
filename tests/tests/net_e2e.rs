//! Virtual networks with real guests, inside the test host VM (`tests/scenarios/net-e2e.sh`):
//! rvirtd starts the NAT `default` network (bridge, dnsmasq, nftables masquerade) and two rvirt-vmm
//! guests on it get DHCP leases, resolve and ping each other by name through dnsmasq, ping the
//! gateway and reach an "outside" namespace only through masquerade (the outside records the
//! host's address, never a guest's). `net-dhcp-leases` and `domifaddr` show them. `net-destroy`
//! is refused while they run (also after an rvirtd restart, which keeps the network and its
//! dnsmasq process), `--force` removes their TAPs and dnsmasq, `net-undefine` is refused while
//! domains use the network. A guest started and powered off several times leaves no TAP, the same
//! dnsmasq and one lease. An isolated network lets guests reach each other but not the outside
//! (even with a default route through the host). A bridge-mode network puts a guest's TAP on a
//! test bridge whose address the guest pings. At the end no rvirt link, nftables table or dnsmasq
//! is left.

use rvirt_tests::{workspace_root, Scenario, TestHost};
use std::time::Duration;

#[test]
fn nat_isolated_and_bridge_networks_with_real_guests() {
    if let Some(why) = TestHost::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let scenario = Scenario::file("net-e2e.sh")
        .bin("rvirtd")
        .bin("rvirt")
        .bin("rvirt-vmm")
        .with_file(
            workspace_root().join("tests/scenarios/net-guest.sh"),
            "/scenarios/net-guest.sh",
        )
        .arg("cycles", "3")
        .timeout(Duration::from_secs(900));
    let out = TestHost::run(&scenario).expect("test host run");
    eprintln!("{}", out.summary());
    let mut want: Vec<String> = [
        "host.tools",
        "host.outside",
        "net.default.defined",
        "net.default.start",
        "net.default.bridge",
        "net.default.forwarding",
        "net.default.nft",
    ]
    .map(String::from)
    .to_vec();
    // Both NAT guests: lease + gateway ping (net), peer by name (dns, peer), gateway, outside.
    for g in ["g1", "g2"] {
        for c in ["net", "dns", "peer", "gw", "outside", "done"] {
            want.push(format!("{g}.{c}"));
        }
        want.push(format!("leases.{g}"));
        want.push(format!("domifaddr.{g}"));
    }
    want.extend(
        [
            "outside.saw",
            "net.destroy.refused",
            "net.destroy.still-active",
            "restart.dnsmasq",
            "restart.active",
            "restart.domains",
            "restart.leases",
            "restart.taps",
            "net.destroy.refused-after-restart",
            "net.destroy.force",
            "net.destroy.force.taps",
            "net.destroy.force.dnsmasq",
            "net.undefine.refused",
            "net.default.restart",
            "cycles",
            "cycles.domstate",
            "net.iso.define",
            "net.iso.start",
        ]
        .map(String::from),
    );
    for g in ["i1", "i2"] {
        for c in ["net", "dns", "peer", "gw", "outside", "done"] {
            want.push(format!("{g}.{c}"));
        }
    }
    want.extend(
        [
            "net.iso.destroy",
            "net.bridge.define",
            "net.bridge.missing",
            "net.bridge.start",
            "b1.net",
            "b1.done",
            "net.bridge.port",
            "net.bridge.cleaned",
            "net.bridge.destroy",
            "net.bridge.kept",
            "net.default.destroy",
            "net.clean",
        ]
        .map(String::from),
    );
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    out.expect_passed(&want);
}
