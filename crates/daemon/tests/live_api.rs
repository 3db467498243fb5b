//! The live-resource REST endpoints (memory, vCPUs, devices, stats, monitor) with the fake VMM,
//! including a daemon restart with a hotplugged disk.

mod common;

use common::Daemon;
use serde_json::json;
use std::time::{Duration, Instant};

fn wait(d: &Daemon, path: &str, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = d.ok("GET", path, None);
        if want(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "GET {path}: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn live_resources_over_rest_and_across_a_daemon_restart() {
    let mut d = Daemon::start();
    d.define("l1", "");
    d.ok("POST", "/v1/domains/l1/start", None);
    // Balloon.
    d.ok(
        "PUT",
        "/v1/domains/l1/memory",
        Some(json!({"size_kib": 32768})),
    );
    wait(&d, "/v1/domains/l1/memstats", |v| v["actual"] == 32768);
    let (status, e) = d.call(
        "PUT",
        "/v1/domains/l1/memory",
        Some(json!({"size_kib": 1 << 30})),
    );
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_arg")),
        "{e}"
    );
    let r = d.ok(
        "POST",
        "/v1/domains/l1/monitor",
        Some(json!({"command": "info balloon", "hmp": true})),
    );
    assert_eq!(r["text"], "balloon: actual=32\n");
    // vCPUs.
    let c = d.ok("GET", "/v1/domains/l1/vcpucount", None);
    assert_eq!(
        c,
        json!({"maximum_config": 2, "maximum_live": 2, "current_config": 2, "current_live": 2})
    );
    d.ok("PUT", "/v1/domains/l1/vcpus", Some(json!({"count": 1})));
    assert_eq!(
        d.ok("GET", "/v1/domains/l1/vcpus", None)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A disk: attached, listed with its alias and slot, counted in the stats.
    let img = d.state_dir().with_file_name("disk2.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let a = d.ok(
        "POST",
        "/v1/domains/l1/devices",
        Some(json!({"xml": format!("<disk type='file'><source file='{}'/><target dev='vdb' bus='virtio'/></disk>", img.display())})),
    );
    assert_eq!(a, json!({"alias": "virtio-disk1", "slot": 3}));
    let s = d.ok("GET", "/v1/domains/l1/stats", None);
    assert_eq!(s["block"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["block"][1]["name"], "vdb");
    assert_eq!(s["block"][1]["rd_req"], 103);
    // The hotplugged disk survives a daemon restart (the live XML is in the run dir).
    d.kill9();
    d.spawn();
    let x = d.ok("GET", "/v1/domains/l1/xml", None);
    assert!(
        x["xml"]
            .as_str()
            .unwrap()
            .contains("<alias name='virtio-disk1'/>"),
        "{x}"
    );
    // Detach by target with DELETE.
    d.ok("DELETE", "/v1/domains/l1/devices/vdb?kind=disk", None);
    let x = d.ok("GET", "/v1/domains/l1/xml", None);
    assert!(!x["xml"].as_str().unwrap().contains("vdb"), "{x}");
    let (status, e) = d.call("DELETE", "/v1/domains/l1/devices/vdb?kind=disk", None);
    assert_eq!(status, 500, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("No disk found"),
        "{e}"
    );
    // Shut-off domain: --live refused, config works.
    d.ok("POST", "/v1/domains/l1/destroy", None);
    let (status, e) = d.call(
        "PUT",
        "/v1/domains/l1/vcpus",
        Some(json!({"count": 1, "live": true})),
    );
    assert_eq!(status, 409, "{e}");
    d.ok("PUT", "/v1/domains/l1/vcpus", Some(json!({"count": 1})));
    let x = d.ok("GET", "/v1/domains/l1/xml", None);
    assert!(
        x["xml"]
            .as_str()
            .unwrap()
            .contains("<vcpu current='1'>2</vcpu>"),
        "{x}"
    );
}
