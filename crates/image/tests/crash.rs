//! Crash safety: a writer killed with SIGKILL at random points leaves an image that
//! `qemu-img check` finds free of corruptions (leaks are allowed, as in QEMU).
//!
//! The test re-runs its own binary as the writer (the ignored test `crash_writer_child`), so
//! the writer is a real separate process that dies without running any destructor.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rvirt_image::qcow2::{CompressionType, CreateOptions, RepairMode};
use rvirt_image::{open_image, BlockDevice, OpenOptions, Qcow2};

const ENV_IMAGE: &str = "RVIRT_CRASH_IMAGE";
const ENV_SEED: &str = "RVIRT_CRASH_SEED";

/// The writer: random writes, zeroes, discards and compressed writes until killed.
#[test]
#[ignore = "run by killed_writers_leave_consistent_images as a child process"]
fn crash_writer_child() {
    let Ok(path) = std::env::var(ENV_IMAGE) else {
        return;
    };
    let seed: u64 = std::env::var(ENV_SEED).unwrap().parse().unwrap();
    let img = open_image(Path::new(&path), None, &OpenOptions::default()).unwrap();
    let q = img.as_qcow2().unwrap();
    let cs = q.header().cluster_size();
    let size = img.size();
    let mut rng = fastrand::Rng::with_seed(seed);
    // Tell the parent we are writing.
    println!("ready");
    loop {
        let off = rng.u64(0..size);
        let len = rng.u64(1..=(size - off).min(4 * cs));
        match rng.u8(0..10) {
            0 => img.write_zeroes(off, len, rng.bool()).unwrap(),
            1 => img.discard(off, len).unwrap(),
            2 => {
                let c = off / cs * cs;
                let n = cs.min(size - c) as usize;
                let buf = vec![rng.u8(..) & 0x3; n];
                q.write_compressed(&buf, c).unwrap();
            }
            _ => {
                let buf: Vec<u8> = (0..len).map(|i| (i as u8) ^ (seed as u8)).collect();
                img.write_at(&buf, off).unwrap();
            }
        }
        if rng.u8(0..50) == 0 {
            img.flush().unwrap();
        }
    }
}

fn qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: qemu-img is not installed");
    }
    ok
}

#[test]
fn killed_writers_leave_consistent_images() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x42u8; 2 << 20]).unwrap();
    let mut rng = fastrand::Rng::with_seed(2024);
    let (mut leaky, mut written) = (0, 0);
    for round in 0..50u64 {
        let path = dir.path().join(format!("crash{round}.qcow2"));
        let o = CreateOptions {
            size: 2 << 20,
            cluster_size: [512, 4096, 65536][round as usize % 3],
            lazy_refcounts: round % 4 == 1,
            refcount_bits: [16, 1, 64, 8][round as usize % 4],
            compression: if round % 2 == 0 {
                CompressionType::Zlib
            } else {
                CompressionType::Zstd
            },
            backing_file: (round % 5 == 0).then(|| "base.raw".to_string()),
            backing_format: (round % 5 == 0).then(|| "raw".to_string()),
            ..Default::default()
        };
        Qcow2::create(&path, &o).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "crash_writer_child", "--nocapture"])
            .env(ENV_IMAGE, &path)
            .env(ENV_SEED, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the writer is writing, then kill it at a random moment.
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut b = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("ready") {
            use std::io::Read;
            let n = out.read(&mut b).unwrap();
            assert!(n > 0, "writer {round} exited before writing");
            seen.extend_from_slice(&b[..n]);
        }
        std::thread::sleep(Duration::from_millis(rng.u64(5..300)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "writer {round} was not killed");
        let check = Command::new("qemu-img")
            .args(["check", "--output=json", "-U"])
            .arg(&path)
            .output()
            .unwrap();
        let code = check.status.code().unwrap();
        let report = String::from_utf8_lossy(&check.stdout).into_owned();
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check exit {code}: {report}{}",
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(
            !report.contains("\"corruptions\""),
            "round {round}: {report}"
        );
        leaky += usize::from(code == 3);
        written += usize::from(report.contains("allocated-clusters"));
        // Reopening repairs a dirty lazy-refcounts image, and a leak repair leaves it clean.
        let img = Qcow2::open(&path, &OpenOptions::default()).unwrap();
        let r = img.check(RepairMode::Leaks).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "round {round}: {r:?}");
        drop(img);
        let check = Command::new("qemu-img")
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        assert!(check.status.success(), "round {round}: after repair");
        std::fs::remove_file(&path).unwrap();
    }
    eprintln!("50 writers killed: {written} had written data, {leaky} left leaked clusters");
    assert!(
        written >= 40,
        "the writers were killed before they wrote anything"
    );
}
