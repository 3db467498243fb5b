//! Opens arbitrary bytes as a qcow2 image, reads from it and checks it: every outcome must
//! be a value or an error, never a panic, a hang or a huge allocation.
//!
//! cargo +nightly fuzz run qcow2_open_read_check -- -rss_limit_mb=512

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use rvirt_image::qcow2::RepairMode;
use rvirt_image::{BlockDevice, OpenOptions, Qcow2};

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("rvirt-fuzz-{}.qcow2", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        no_backing: true,
        ..Default::default()
    };
    if let Ok(img) = Qcow2::open(&path, &opts) {
        let size = img.size();
        let mut buf = vec![0u8; 65536];
        // Read offsets taken from the input's tail, so the fuzzer steers them.
        for chunk in data.rchunks(8).take(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let off = u64::from_le_bytes(b) % size.max(1);
            let len = (size - off).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..len], off);
            let _ = img.block_status(off, len as u64);
        }
        let _ = img.check(RepairMode::None);
        let _ = img.snapshots();
    }
    let _ = std::fs::remove_file(&path);
});
