//! qcow2 behaviour, checked against an in-memory model and against the real qemu-img.

use std::path::Path;
use std::process::Command;

use rvirt_image::qcow2::{CompressionType, CreateOptions, RepairMode};
use rvirt_image::{open_image, BlockDevice, Error, Format, OpenOptions, Preallocation, Qcow2};

fn qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping qemu-img interop part: qemu-img is not installed");
    }
    ok
}

/// `qemu-img check` must find no errors and no leaks.
fn qemu_check(path: &Path) {
    if !qemu_img() {
        return;
    }
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {} failed: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(path: &Path, fmt: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(path).output().unwrap();
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
        "qemu-io {cmds:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

fn create(path: &Path, size: u64, f: impl FnOnce(&mut CreateOptions)) {
    let mut o = CreateOptions {
        size,
        ..Default::default()
    };
    f(&mut o);
    Qcow2::create(path, &o).unwrap();
}

/// Random writes of random sizes, mirrored into `model`.
fn random_writes(dev: &dyn BlockDevice, model: &mut [u8], n: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let size = model.len() as u64;
    for _ in 0..n {
        let len = rng.u64(1..=(size / 8).clamp(1, 300_000));
        let off = rng.u64(0..=size - len);
        let byte = rng.u8(1..);
        let buf: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
        dev.write_at(&buf, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

/// qemu-img sees the same disk as `model`.
fn qemu_compare(path: &Path, model: &[u8]) {
    if !qemu_img() {
        return;
    }
    let raw = path.with_extension("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::remove_file(raw).unwrap();
}

#[test]
fn writes_read_back_and_pass_qemu_check_for_each_layout() {
    let dir = tempfile::tempdir().unwrap();
    type Tweak = Box<dyn Fn(&mut CreateOptions)>;
    let cases: Vec<(&str, Tweak)> = vec![
        ("default", Box::new(|_| {})),
        ("c512", Box::new(|o| o.cluster_size = 512)),
        ("c2m", Box::new(|o| o.cluster_size = 2 << 20)),
        ("v2", Box::new(|o| o.version = 2)),
        ("rc1", Box::new(|o| o.refcount_bits = 1)),
        ("rc64", Box::new(|o| o.refcount_bits = 64)),
        (
            "rc4c512",
            Box::new(|o| {
                o.refcount_bits = 4;
                o.cluster_size = 512
            }),
        ),
        ("lazy", Box::new(|o| o.lazy_refcounts = true)),
        (
            "extl2",
            Box::new(|o| {
                o.extended_l2 = true;
                o.cluster_size = 32768
            }),
        ),
        ("zstd", Box::new(|o| o.compression = CompressionType::Zstd)),
    ];
    for (name, f) in cases {
        let path = dir.path().join(format!("{name}.qcow2"));
        let size = 24 << 20;
        create(&path, size, f);
        let mut model = vec![0u8; size as usize];
        {
            let img = Qcow2::open(&path, &rw()).unwrap();
            random_writes(&img, &mut model, 40, 7);
            img.write_zeroes(1 << 20, 3 << 20, true).unwrap();
            model[1 << 20..4 << 20].fill(0);
            img.flush().unwrap();
            assert!(
                read_all(&img) == model,
                "{name}: data differs before reopen"
            );
        }
        let img = Qcow2::open(&path, &ro()).unwrap();
        assert!(read_all(&img) == model, "{name}: data differs after reopen");
        let report = img.check(RepairMode::None).unwrap();
        assert_eq!(
            (report.corruptions, report.leaks),
            (0, 0),
            "{name}: {:?}",
            report.messages
        );
        drop(img);
        qemu_check(&path);
        qemu_compare(&path, &model);
    }
}

#[test]
fn overlay_copies_on_write_from_raw_and_qcow2_backing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let base = dir.path().join("base.raw");
    let base_data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(&base, &base_data).unwrap();
    let mid = dir.path().join("mid.qcow2");
    create(&mid, size, |o| {
        o.backing_file = Some("base.raw".into());
        o.backing_format = Some("raw".into());
    });
    let mut model = base_data.clone();
    {
        let img = open_image(&mid, None, &rw()).unwrap();
        img.write_at(&[0xaa; 100], 70_000).unwrap();
        model[70_000..70_100].fill(0xaa);
    }
    let top = dir.path().join("top.qcow2");
    create(&top, size, |o| {
        o.backing_file = Some(mid.to_str().unwrap().into());
        o.backing_format = Some("qcow2".into());
        o.cluster_size = 4096;
    });
    let img = open_image(&top, Some(Format::Qcow2), &rw()).unwrap();
    img.write_at(&[0x55; 10], 65_530).unwrap();
    model[65_530..65_540].fill(0x55);
    img.write_zeroes(200_000, 8192, false).unwrap();
    model[200_000..208_192].fill(0);
    assert!(read_all(&img) == model);
    // The top image holds only the clusters it wrote: two for the write across a cluster
    // boundary, two for the unaligned ends of the zeroed range (its middle is a zero cluster).
    let q = img.as_qcow2().unwrap();
    assert_eq!(q.allocated_clusters().unwrap(), 4);
    let e = img.map_extent(0, size).unwrap();
    assert_eq!((e.start, e.length, e.depth, e.data), (0, 61_440, 2, true));
    drop(img);
    qemu_check(&top);
    qemu_check(&mid);
    qemu_compare(&top, &model);
}

#[test]
fn qemu_made_images_read_identically() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let cases: &[(&str, &[&str])] = &[
        ("c512", &["-o", "cluster_size=512"]),
        ("c64k", &[]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("v2", &["-o", "compat=0.10"]),
        ("lazy", &["-o", "lazy_refcounts=on"]),
        ("extl2", &["-o", "extended_l2=on"]),
        ("rc8", &["-o", "refcount_bits=8"]),
    ];
    for (name, opts) in cases {
        let img = p(&format!("{name}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[&img, "16M"]);
        qemu(&args);
        qemu_io(
            Path::new(&img),
            "qcow2",
            &[
                "write -P 0x11 0 100k".into(),
                "write -P 0x22 3m 5000".into(),
                "write -z 3m 1k".into(),
                "write -P 0x33 15m 1m".into(),
                "discard 15m 64k".into(),
            ],
        );
        let raw = p(&format!("{name}.raw"));
        qemu(&["convert", "-O", "raw", &img, &raw]);
        let want = std::fs::read(&raw).unwrap();
        let dev = open_image(Path::new(&img), None, &rw()).unwrap();
        assert!(
            read_all(&dev) == want,
            "{name}: reads differ from qemu-img's"
        );
        // It survives writes through us.
        let mut model = want.clone();
        random_writes(&dev, &mut model, 20, 3);
        drop(dev);
        qemu_check(Path::new(&img));
        qemu_compare(Path::new(&img), &model);
    }
}

#[test]
fn qemu_compressed_images_read_identically() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let src = p("src.raw");
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| ((i / 777) % 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    for ct in ["zlib", "zstd"] {
        let img = p(&format!("{ct}.qcow2"));
        qemu(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            &src,
            &img,
        ]);
        let dev = open_image(Path::new(&img), None, &rw()).unwrap();
        assert!(read_all(&dev) == data, "{ct}: compressed reads differ");
        let e = dev.map_extent(0, 4 << 20).unwrap();
        assert!(e.compressed, "{ct}: map shows compression");
        // Overwriting a compressed cluster partially copies it out.
        dev.write_at(&[9; 3], 100).unwrap();
        let mut model = data.clone();
        model[100..103].fill(9);
        assert!(read_all(&dev) == model);
        drop(dev);
        qemu_check(Path::new(&img));
        qemu_compare(Path::new(&img), &model);
    }
}

#[test]
fn compressed_writes_are_readable_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for ct in [CompressionType::Zlib, CompressionType::Zstd] {
        let path = dir.path().join(format!("{}.qcow2", ct.name()));
        let size = 1u64 << 20;
        create(&path, size, |o| o.compression = ct);
        let img = Qcow2::open(&path, &rw()).unwrap();
        let mut model = vec![0u8; size as usize];
        for (i, chunk) in model.chunks_mut(65536).enumerate() {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = ((j / 100 + i) % 7) as u8;
            }
        }
        for off in (0..size).step_by(65536) {
            img.write_compressed(&model[off as usize..off as usize + 65536], off)
                .unwrap();
        }
        assert!(read_all(&img) == model);
        assert!(img.file_length().unwrap() < 400_000);
        drop(img);
        qemu_check(&path);
        qemu_compare(&path, &model);
    }
}

#[test]
fn snapshots_keep_old_data_and_refcounts_right() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.qcow2");
    let size = 4u64 << 20;
    create(&path, size, |_| {});
    let mut model = vec![0u8; size as usize];
    let img = Qcow2::open(&path, &rw()).unwrap();
    random_writes(&img, &mut model, 10, 1);
    img.snapshot_create("one").unwrap();
    let one = model.clone();
    random_writes(&img, &mut model, 10, 2);
    img.snapshot_create("two").unwrap();
    random_writes(&img, &mut model, 10, 3);
    assert!(read_all(&img) == model);
    assert_eq!(img.check(RepairMode::None).unwrap().corruptions, 0);
    let names: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["one", "two"]);
    drop(img);
    qemu_check(&path);
    let img = Qcow2::open(&path, &rw()).unwrap();
    img.snapshot_apply("one").unwrap();
    assert!(read_all(&img) == one);
    img.snapshot_delete("two").unwrap();
    random_writes(&img, &mut model, 5, 4);
    img.snapshot_delete("1").unwrap();
    let r = img.check(RepairMode::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    assert!(img.snapshots().is_empty());
    drop(img);
    qemu_check(&path);
    if qemu_img() {
        // qemu-img sees our snapshot table too.
        let img = Qcow2::open(&path, &rw()).unwrap();
        img.snapshot_create("mine").unwrap();
        drop(img);
        let out = Command::new("qemu-img")
            .args(["snapshot", "-l"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("mine"));
        qemu_check(&path);
    }
}

#[test]
fn resize_grows_and_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    create(&path, 1 << 20, |o| o.cluster_size = 512);
    let img = Qcow2::open(&path, &rw()).unwrap();
    img.write_at(&[7; 4096], (1 << 20) - 4096).unwrap();
    // 512-byte clusters: one L2 table maps 32 KiB, so 64 MiB needs a larger L1 table.
    img.resize(64 << 20).unwrap();
    img.write_at(&[8; 10], (64 << 20) - 10).unwrap();
    let mut b = [0u8; 10];
    img.read_at(&mut b, (64 << 20) - 10).unwrap();
    assert_eq!(b, [8; 10]);
    img.resize(1000).unwrap();
    img.resize(1 << 20).unwrap();
    img.read_at(&mut b, (1 << 20) - 10).unwrap();
    assert_eq!(b, [0; 10], "shrunk data must not come back");
    let r = img.check(RepairMode::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    drop(img);
    qemu_check(&path);
}

#[test]
fn preallocation_modes_allocate_everything() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        let path = dir.path().join(format!("{mode:?}.qcow2"));
        create(&path, 3 << 20, |o| o.preallocation = mode);
        let img = Qcow2::open(&path, &ro()).unwrap();
        assert_eq!(img.allocated_clusters().unwrap(), 48);
        assert!(read_all(&img).iter().all(|&b| b == 0));
        drop(img);
        qemu_check(&path);
    }
}

#[test]
fn leaks_are_found_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.qcow2");
    create(&path, 1 << 20, |_| {});
    {
        let img = Qcow2::open(&path, &rw()).unwrap();
        img.write_at(&[1; 512], 0).unwrap();
    }
    // Leak one cluster by hand: raise the refcount of a cluster past the end.
    let data = std::fs::read(&path).unwrap();
    let rt = u64::from_be_bytes(data[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(data[rt..rt + 8].try_into().unwrap()) as usize;
    let nclusters = data.len() / 65536;
    let mut data = data;
    data[rb + 2 * nclusters + 1] = 1;
    data.resize(data.len() + 65536, 0);
    std::fs::write(&path, &data).unwrap();
    let img = Qcow2::open(&path, &ro()).unwrap();
    let r = img.check(RepairMode::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 1));
    drop(img);
    let img = Qcow2::open(
        &path,
        &OpenOptions {
            repair: true,
            ..Default::default()
        },
    )
    .unwrap();
    let r = img.check(RepairMode::Leaks).unwrap();
    assert_eq!((r.leaks, r.leaks_fixed), (0, 1));
    drop(img);
    qemu_check(&path);
}

#[test]
fn unknown_incompatible_bits_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.qcow2");
    create(&path, 1 << 20, |_| {});
    let mut data = std::fs::read(&path).unwrap();
    data[72 + 7] |= 1 << 5; // bit 5
    std::fs::write(&path, &data).unwrap();
    let err = Qcow2::open(&path, &ro()).err().unwrap();
    assert!(matches!(err, Error::Unsupported { .. }));
    assert!(err.to_string().contains("bit 5"), "{err}");
}

#[test]
fn corrupt_bit_forces_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2");
    create(&path, 1 << 20, |_| {});
    let mut data = std::fs::read(&path).unwrap();
    data[72 + 7] |= 2;
    std::fs::write(&path, &data).unwrap();
    assert!(matches!(
        Qcow2::open(&path, &rw()),
        Err(Error::Corrupt { .. })
    ));
    Qcow2::open(&path, &ro()).unwrap();
}

#[test]
fn lazy_refcounts_dirty_image_is_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    create(&path, 1 << 20, |o| o.lazy_refcounts = true);
    {
        let img = Qcow2::open(&path, &rw()).unwrap();
        img.write_at(&[3; 100], 0).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap()[79] & 1,
            1,
            "dirty bit set while writing"
        );
        // Simulate a crash: copy the file while the writer still has it open and dirty.
        std::fs::copy(&path, dir.path().join("crashed.qcow2")).unwrap();
    }
    let path = dir.path().join("crashed.qcow2");
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data[79] & 1, 1);
    let img = Qcow2::open(&path, &rw()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap()[79] & 1, 0, "repaired on open");
    let mut b = [0u8; 100];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [3; 100]);
    drop(img);
    qemu_check(&path);
}

#[test]
fn hostile_headers_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.qcow2");
    create(&path, 64 << 20, |_| {});
    {
        let img = Qcow2::open(&path, &rw()).unwrap();
        img.write_at(&[1; 70000], 0).unwrap();
        img.snapshot_create("s").unwrap();
    }
    let good = std::fs::read(&path).unwrap();
    let mut rng = fastrand::Rng::with_seed(42);
    let fields: &[(usize, usize)] = &[
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
        (64, 8),
        (96, 4),
        (100, 4),
    ];
    // More rounds on demand: RVIRT_HOSTILE_ROUNDS=100000 cargo test hostile
    let rounds = std::env::var("RVIRT_HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    for round in 0..rounds {
        let mut data = good.clone();
        let (at, len) = fields[rng.usize(..fields.len())];
        for b in &mut data[at..at + len] {
            *b = match round % 3 {
                0 => 0xff,
                1 => rng.u8(..),
                _ => 0,
            };
        }
        if round % 5 == 0 {
            // Also damage tables somewhere in the file (and sometimes nothing in the header).
            for _ in 0..rng.usize(1..40) {
                let at = rng.usize(65536..data.len());
                data[at] = rng.u8(..);
            }
            if round % 10 == 0 {
                data[..512].copy_from_slice(&good[..512]);
            }
        }
        std::fs::write(&path, &data).unwrap();
        if let Ok(img) = Qcow2::open(&path, &ro()) {
            let mut buf = vec![0u8; 65536];
            let size = img.size();
            for _ in 0..10 {
                let off = rng.u64(0..size.max(1));
                let len = (size - off).min(65536) as usize;
                let _ = img.read_at(&mut buf[..len], off);
            }
            let _ = img.check(RepairMode::None);
        }
        if round % 4 == 0 {
            // Repair and write paths on hostile metadata: errors are fine, panics are not.
            let repair = OpenOptions {
                repair: true,
                no_backing: true,
                ..Default::default()
            };
            if let Ok(img) = Qcow2::open(&path, &repair) {
                let _ = img.check(RepairMode::All);
                let size = img.size();
                if size > 0 {
                    let off = rng.u64(0..size);
                    let len = (size - off).min(70_000) as usize;
                    let _ = img.write_at(&vec![9u8; len], off);
                    let _ = img.discard(0, size.min(1 << 20));
                }
            }
        }
    }
    for len in [0, 3, 50, 100, 1000] {
        std::fs::write(&path, &good[..len]).unwrap();
        assert!(Qcow2::open(&path, &ro()).is_err(), "truncated to {len}");
    }
}

#[test]
fn qemu_backing_chain_of_depth_three_reads_identically() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_str().unwrap().to_owned();
    qemu(&["create", "-q", "-f", "raw", &s("l0.raw"), "8M"]);
    qemu_io(&p("l0.raw"), "raw", &["write -P 0x10 0 8m".into()]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "l0.raw",
        "-F",
        "raw",
        &s("l1.qcow2"),
    ]);
    qemu_io(
        &p("l1.qcow2"),
        "qcow2",
        &["write -P 0x11 1m 1m".into(), "write -z 3m 64k".into()],
    );
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "l1.qcow2",
        "-F",
        "qcow2",
        &s("l2.qcow2"),
    ]);
    qemu_io(
        &p("l2.qcow2"),
        "qcow2",
        &["write -P 0x12 1536k 100k".into()],
    );
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "l2.qcow2",
        "-F",
        "qcow2",
        &s("l3.qcow2"),
    ]);
    qemu_io(
        &p("l3.qcow2"),
        "qcow2",
        &["write -P 0x13 1600k 5k".into(), "write -z 0 4k".into()],
    );
    qemu(&["convert", "-O", "raw", &s("l3.qcow2"), &s("want.raw")]);
    let want = std::fs::read(p("want.raw")).unwrap();
    let img = open_image(&p("l3.qcow2"), None, &rw()).unwrap();
    assert!(read_all(&img) == want);
    // Map depths follow the chain: the 2 KiB subclusters written at 1600k are the top's own,
    // 1536k.. comes from l2, 1m.. from l1 and the rest from l0.
    assert_eq!(img.map_extent(1 << 20, 4096).unwrap().depth, 2);
    assert_eq!(img.map_extent(1536 << 10, 4096).unwrap().depth, 1);
    assert_eq!(img.map_extent(1600 << 10, 1024).unwrap().depth, 0);
    assert_eq!(img.map_extent(5 << 20, 4096).unwrap().depth, 3);
    // The zeroed first 4 KiB are two zero subclusters; the rest of that cluster is l0's.
    let e = img.map_extent(0, 65536).unwrap();
    assert_eq!((e.length, e.zero, e.depth), (4096, true, 0));
    let mut model = want.clone();
    random_writes(&img, &mut model, 30, 9);
    drop(img);
    qemu_check(&p("l3.qcow2"));
    qemu_compare(&p("l3.qcow2"), &model);
    // The lower layers were not touched.
    qemu_check(&p("l1.qcow2"));
}

#[test]
fn qemu_internal_snapshots_apply_and_delete() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.qcow2");
    let s = path.to_str().unwrap();
    qemu(&["create", "-q", "-f", "qcow2", s, "4M"]);
    qemu_io(&path, "qcow2", &["write -P 1 0 1m".into()]);
    qemu(&["snapshot", "-c", "first", s]);
    qemu_io(
        &path,
        "qcow2",
        &["write -P 2 512k 1m".into(), "write -c -P 3 3m 64k".into()],
    );
    qemu(&["snapshot", "-c", "second", s]);
    qemu_io(&path, "qcow2", &["write -P 4 0 4k".into()]);
    let raw = |snap: &str| {
        let out = dir.path().join(format!("{snap}.raw"));
        qemu(&[
            "convert",
            "-l",
            &format!("snapshot.name={snap}"),
            "-O",
            "raw",
            s,
            out.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    };
    let (first, second) = (raw("first"), raw("second"));
    let img = Qcow2::open(&path, &rw()).unwrap();
    let names: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["first", "second"]);
    img.snapshot_apply("second").unwrap();
    assert!(read_all(&img) == second);
    img.snapshot_apply("first").unwrap();
    assert!(read_all(&img) == first);
    img.snapshot_delete("first").unwrap();
    drop(img);
    qemu_check(&path);
    qemu_compare(&path, &first);
    assert!(raw("second") == second, "the other snapshot is intact");
}

#[test]
fn corrupt_metadata_found_by_a_write_sets_the_corrupt_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.qcow2");
    create(&path, 1 << 20, |_| {});
    {
        let img = Qcow2::open(&path, &rw()).unwrap();
        img.write_at(&[1; 512], 0).unwrap();
    }
    // Point the first L2 entry at an unaligned host offset.
    let mut data = std::fs::read(&path).unwrap();
    let l1 = u64::from_be_bytes(data[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(data[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    data[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | 0x30200).to_be_bytes());
    std::fs::write(&path, &data).unwrap();
    let img = Qcow2::open(&path, &rw()).unwrap();
    let err = img.write_at(&[2; 512], 0).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("check -r all"), "{err}");
    // Further writes are refused; the header carries the corrupt bit.
    assert!(matches!(
        img.write_at(&[2; 512], 4096),
        Err(Error::ReadOnly(_))
    ));
    assert!(img.read_only());
    drop(img);
    assert_eq!(std::fs::read(&path).unwrap()[79] & 2, 2);
    assert!(matches!(
        Qcow2::open(&path, &rw()),
        Err(Error::Corrupt { .. })
    ));
    if qemu_img() {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"corrupt\": true"));
    }
}

#[test]
fn unknown_header_extensions_survive_header_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ext.qcow2");
    create(&path, 1 << 20, |_| {});
    let mut data = std::fs::read(&path).unwrap();
    // Insert an unknown extension right after the header fields.
    let hl = u32::from_be_bytes(data[100..104].try_into().unwrap()) as usize;
    let mut ext = 0x1234_5678u32.to_be_bytes().to_vec();
    ext.extend_from_slice(&5u32.to_be_bytes());
    ext.extend_from_slice(b"hello\0\0\0");
    let tail = data[hl..65536 - ext.len()].to_vec();
    data[hl..hl + ext.len()].copy_from_slice(&ext);
    data[hl + ext.len()..65536].copy_from_slice(&tail);
    std::fs::write(&path, &data).unwrap();
    let img = Qcow2::open(&path, &rw()).unwrap();
    img.set_backing(Some("other.raw"), Some("raw")).unwrap();
    img.amend(None, Some(true)).unwrap();
    drop(img);
    let h = Qcow2::open(
        &path,
        &OpenOptions {
            read_only: true,
            no_backing: true,
            ..Default::default()
        },
    )
    .unwrap()
    .header();
    assert!(h
        .extensions
        .iter()
        .any(|(k, d)| *k == 0x1234_5678 && d == b"hello"));
    assert_eq!(h.backing_file.as_deref(), Some("other.raw"));
    assert_eq!(h.compatible & 1, 1);
}

#[test]
fn repair_all_rebuilds_a_broken_refcount_structure() {
    let dir = tempfile::tempdir().unwrap();
    let repair = OpenOptions {
        repair: true,
        ..Default::default()
    };
    for case in ["misaligned block", "zeroed block"] {
        let path = dir.path().join(format!("{}.qcow2", case.replace(' ', "_")));
        create(&path, 8 << 20, |o| o.cluster_size = 4096);
        let mut model = vec![0u8; 8 << 20];
        {
            let img = Qcow2::open(&path, &rw()).unwrap();
            random_writes(&img, &mut model, 30, 5);
            img.snapshot_create("s").unwrap();
            random_writes(&img, &mut model, 10, 6);
        }
        let mut data = std::fs::read(&path).unwrap();
        let rt = u64::from_be_bytes(data[48..56].try_into().unwrap()) as usize;
        let rb = u64::from_be_bytes(data[rt..rt + 8].try_into().unwrap()) as usize;
        match case {
            "misaligned block" => data[rt + 6] |= 2, // +512: no longer cluster aligned
            _ => data[rb..rb + 4096].fill(0),
        }
        std::fs::write(&path, &data).unwrap();
        let img = Qcow2::open(&path, &repair).unwrap();
        let before = img.check(RepairMode::None).unwrap();
        assert!(before.corruptions > 0, "{case}: damage found");
        let r = img.check(RepairMode::All).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{case}: {:?}", r.messages);
        assert!(read_all(&img) == model, "{case}: data kept");
        drop(img);
        qemu_check(&path);
        qemu_compare(&path, &model);
    }
}

#[test]
fn zeroing_without_unmap_keeps_clusters_allocated() {
    let dir = tempfile::tempdir().unwrap();
    for extl2 in [false, true] {
        let path = dir.path().join(format!("z{extl2}.qcow2"));
        create(&path, 1 << 20, |o| o.extended_l2 = extl2);
        let img = Qcow2::open(&path, &rw()).unwrap();
        img.write_at(&[5; 131072], 0).unwrap();
        let before = img.file_length().unwrap();
        img.write_zeroes(0, 131072, false).unwrap();
        let e = img.block_status(0, 131072).unwrap();
        assert!(e.status.zero && !e.status.data, "{e:?}");
        let m = img.map_extent(0, 65536).unwrap();
        assert!(m.offset.is_some(), "host cluster kept: {m:?}");
        let mut b = vec![1u8; 131072];
        img.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // Writing into it reuses the kept cluster.
        img.write_at(&[6; 100], 70_000).unwrap();
        assert_eq!(img.file_length().unwrap(), before);
        img.read_at(&mut b, 0).unwrap();
        assert!(b[70_000..70_100].iter().all(|&x| x == 6));
        assert!(b[..70_000].iter().all(|&x| x == 0));
        // With unmap the space is released.
        img.write_zeroes(0, 65536, true).unwrap();
        assert!(img.map_extent(0, 65536).unwrap().offset.is_none());
        let r = img.check(RepairMode::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        drop(img);
        qemu_check(&path);
    }
}

#[test]
fn threads_read_and_write_one_image_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mt.qcow2");
    create(&path, 16 << 20, |o| o.cluster_size = 4096);
    let img = Qcow2::open(&path, &rw()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let img = &img;
            s.spawn(move || {
                // Each thread owns 4 MiB and checks every write it makes.
                let base = t << 22;
                let mut rng = fastrand::Rng::with_seed(t);
                let mut model = vec![0u8; 4 << 20];
                for _ in 0..300 {
                    let len = rng.u64(1..20_000);
                    let off = rng.u64(0..(4 << 20) - len);
                    let fill = rng.u8(1..);
                    img.write_at(&vec![fill; len as usize], base + off).unwrap();
                    model[off as usize..(off + len) as usize].fill(fill);
                    let roff = rng.u64(0..(4 << 20) - 8192);
                    let mut b = vec![0u8; 8192];
                    img.read_at(&mut b, base + roff).unwrap();
                    assert!(b[..] == model[roff as usize..roff as usize + 8192]);
                }
            });
        }
    });
    let r = img.check(RepairMode::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    drop(img);
    qemu_check(&path);
}

/// cache=none: a qcow2 image (and its raw backing file) opened with O_DIRECT takes unaligned
/// random writes, reads them back, and is consistent when reopened through the page cache.
#[test]
fn direct_io_qcow2_with_backing_matches_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    let size = 4u64 << 20;
    let mut model: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(&base, &model).unwrap();
    create(&top, size, |o| {
        o.backing_file = Some(base.display().to_string());
        o.backing_format = Some("raw".into());
    });
    let direct = OpenOptions {
        direct: true,
        ..Default::default()
    };
    let img = match open_image(&top, None, &direct) {
        Ok(i) => i,
        Err(Error::InvalidArgument(m)) if m.contains("does not support O_DIRECT") => {
            eprintln!("skipping: {m}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    random_writes(&img, &mut model, 30, 11);
    assert_eq!(read_all(&img), model, "read back with O_DIRECT");
    img.flush().unwrap();
    drop(img);
    let img = open_image(&top, None, &rw()).unwrap();
    assert_eq!(read_all(&img), model, "read back through the page cache");
    let report = img.as_qcow2().unwrap().check(RepairMode::None).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
}
