//! Random 4 KiB reads through an image backend, for bench/image (P5).
//!
//! usage: randread IMAGE [COUNT] [THREADS]
//! Prints the reads per second.

use std::path::Path;
use std::time::Instant;

use rvirt_image::{open_image, BlockDevice, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        return Err("usage: randread IMAGE [COUNT] [THREADS]".into());
    };
    let count: u64 = args.get(2).map_or(Ok(200_000), |s| s.parse())?;
    let threads: u64 = args.get(3).map_or(Ok(1), |s| s.parse())?;
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    let img = open_image(Path::new(path), None, &opts)?;
    let blocks = img.size() / 4096;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let img = &img;
            s.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t + 1);
                let mut buf = vec![0u8; 4096];
                for _ in 0..count / threads {
                    img.read_at(&mut buf, rng.u64(0..blocks) * 4096)
                        .expect("read failed");
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!("{:.0}", count as f64 / secs);
    Ok(())
}
