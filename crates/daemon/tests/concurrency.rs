//! Twenty domains defined, started and destroyed from parallel clients: every operation succeeds,
//! and afterwards no VMM process, file descriptor, socket or run file is left.

mod common;

use common::{fd_count, processes_mentioning, Daemon};
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn twenty_domains_from_parallel_clients_leave_nothing_behind() {
    let d = Daemon::start();
    let daemon_pid = d.child.as_ref().unwrap().id();
    // Warm up once so lazily created runtime resources are in the baseline.
    d.define("warm", "");
    d.ok("POST", "/v1/domains/warm/start", None);
    d.ok("POST", "/v1/domains/warm/destroy", None);
    d.ok("DELETE", "/v1/domains/warm", None);
    let baseline = fd_count(daemon_pid);

    std::thread::scope(|s| {
        for i in 0..20 {
            let d = &d;
            s.spawn(move || {
                let name = format!("c{i:02}");
                d.define(&name, "");
                d.ok("POST", &format!("/v1/domains/{name}/start"), None);
                // Operations on one domain from two clients at once are serialized.
                let (a, b) = std::thread::scope(|s2| {
                    let a = s2.spawn(|| {
                        d.call("POST", &format!("/v1/domains/{name}/suspend"), None)
                            .0
                    });
                    let b =
                        s2.spawn(|| d.call("GET", &format!("/v1/domains/{name}/vcpus"), None).0);
                    (a.join().unwrap(), b.join().unwrap())
                });
                assert_eq!((a, b), (200, 200));
                let (status, err) = d.call("POST", &format!("/v1/domains/{name}/start"), None);
                assert_eq!(status, 409, "{err}");
                d.ok("POST", &format!("/v1/domains/{name}/destroy"), None);
                assert_eq!(d.state(&name), ("shut off".into(), "destroyed".into()));
                d.ok("DELETE", &format!("/v1/domains/{name}"), None);
            });
        }
    });

    let list = d.ok("GET", "/v1/domains", None);
    assert_eq!(list, json!([]), "all undefined");
    let run = d.run_dir();
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        // The networks' run directory (rvirt-net) stays; no network was started here.
        .filter(|p| !(p.ends_with("networks") && std::fs::read_dir(p).unwrap().next().is_none()))
        .collect();
    assert!(leftovers.is_empty(), "run files left: {leftovers:?}");
    assert!(
        processes_mentioning(&format!("{}/", run.display())).is_empty(),
        "VMM processes left"
    );
    let sockets: Vec<_> = std::fs::read_dir(d.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "sock"))
        .collect();
    assert_eq!(sockets.len(), 1, "only the API socket remains");
    // Connections close asynchronously: give the daemon a moment to drop them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fd_count(daemon_pid) > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fd_count(daemon_pid) <= baseline,
        "daemon fds: {} now, {baseline} before",
        fd_count(daemon_pid)
    );
    assert!(d
        .state_dir()
        .join("domains")
        .read_dir()
        .unwrap()
        .next()
        .is_none());
}
