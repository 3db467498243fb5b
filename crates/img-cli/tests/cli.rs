//! rvirt-img end to end, side by side with the real qemu-img.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use rvirt_image::BlockDevice;
use serde_json::Value;

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: qemu-img is not installed (scripts/install-deps installs it)");
    }
    ok
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

fn rv(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_rvirt-img"), args)
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn rvok(args: &[&str]) -> String {
    ok(rv(args), &format!("rvirt-img {args:?}"))
}

fn qok(args: &[&str]) -> String {
    ok(run("qemu-img", args), &format!("qemu-img {args:?}"))
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// qemu-img check finds no errors and no leaks.
fn qcheck(p: &str) {
    qok(&["check", "-U", p]);
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn p(&self, name: &str) -> String {
        self.0.path().join(name).to_str().unwrap().to_owned()
    }
}

fn qemu_io(p: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    ok(c.arg(p).output().unwrap(), "qemu-io");
}

/// A raw file with patterned data in a few places and holes elsewhere.
fn patterned_raw(path: &str, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    for (i, b) in data.iter_mut().enumerate() {
        let region = i / (256 << 10);
        if region % 3 == 0 {
            *b = (i % 253) as u8 | 1;
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn create_option_matrix_passes_qemu_check_and_info_matches() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let base = d.p("base.raw");
    patterned_raw(&base, 4 << 20);
    let combos: &[&[&str]] = &[
        &[],
        &["-o", "cluster_size=512"],
        &["-o", "cluster_size=2M"],
        &["-o", "compat=0.10"],
        &["-o", "lazy_refcounts=on"],
        &["-o", "refcount_bits=1"],
        &["-o", "refcount_bits=64,cluster_size=4k"],
        &["-o", "compression_type=zstd"],
        &["-o", "extended_l2=on"],
        &["-o", "preallocation=metadata"],
        &["-o", "preallocation=falloc"],
        &["-o", "preallocation=full,cluster_size=128k"],
        &["-b", "base.raw", "-F", "raw"],
        &["-o", "backing_file=base.raw,backing_fmt=raw,compat=0.10"],
    ];
    for (i, extra) in combos.iter().enumerate() {
        let img = d.p(&format!("img{i}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(extra);
        args.push(&img);
        if !extra.contains(&"-b") && !extra.iter().any(|a| a.contains("backing_file")) {
            args.push("4M");
        }
        rvok(&args);
        // qemu writes into our layout, then checks it and reports the same info as we do.
        qemu_io(&img, &["write -P 0x5a 100k 300k", "write -z 1m 64k"]);
        qcheck(&img);
        let ours = json(&rvok(&["info", "--output=json", &img]));
        let theirs = json(&qok(&["info", "--output=json", &img]));
        let strip = |mut v: Value| {
            v.as_object_mut().unwrap().remove("actual-size");
            v
        };
        assert_eq!(strip(ours), strip(theirs), "info of {extra:?}");
        // Then rvirt-img writes, grows, snapshots and writes again; qemu still agrees.
        let newer = d.p(&format!("data{i}.raw"));
        let mut want = patterned_raw(&newer, 4 << 20);
        rvok(&["convert", "-n", "-O", "qcow2", &newer, &img]);
        rvok(&["resize", &img, "+1M"]);
        let one_bit = extra.iter().any(|a| a.contains("refcount_bits=1"));
        if one_bit {
            // One-bit refcounts cannot count a snapshot's second reference.
            let o = rv(&["snapshot", "-c", "s1", &img]);
            assert!(String::from_utf8_lossy(&o.stderr).contains("refcount_bits=16"));
        } else {
            rvok(&["snapshot", "-c", "s1", &img]);
        }
        let more = d.p(&format!("more{i}.raw"));
        std::fs::write(&more, vec![0x3cu8; 4 << 20]).unwrap();
        rvok(&["convert", "-n", "-S", "0", "-O", "qcow2", &more, &img]);
        qcheck(&img);
        want.iter_mut().for_each(|b| *b = 0x3c);
        want.extend_from_slice(&[0u8; 1 << 20]);
        let model = d.p(&format!("model{i}.raw"));
        std::fs::write(&model, &want).unwrap();
        qok(&["compare", "-f", "raw", &model, &img]);
        assert_eq!(qok(&["snapshot", "-l", &img]).contains("s1"), !one_bit);
    }
}

#[test]
fn json_of_check_map_measure_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let base = d.p("base.qcow2");
    let top = d.p("top.qcow2");
    qok(&["create", "-q", "-f", "qcow2", &base, "16M"]);
    qemu_io(&base, &["write -P 1 0 1m", "write -P 2 5m 100k"]);
    qok(&["snapshot", "-c", "snap", &base]);
    qok(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    qemu_io(&top, &["write -P 3 512k 64k", "write -z 5m 64k"]);
    // A compressed image and a raw one too.
    let raw = d.p("plain.raw");
    patterned_raw(&raw, 3 << 20);
    let comp = d.p("comp.qcow2");
    qok(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        &raw,
        &comp,
    ]);
    qemu_io(&comp, &["write -P 8 64k 64k"]);
    // Preallocated metadata (holes behind data clusters) and preallocated zero clusters.
    let pre = d.p("pre.qcow2");
    qok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        &pre,
        "4M",
    ]);
    qemu_io(&pre, &["write -z 1m 1m", "write -P 3 3m 4k"]);
    // Persistent dirty bitmaps made by qemu-img.
    let bm = d.p("bitmaps.qcow2");
    qok(&["create", "-q", "-f", "qcow2", &bm, "64M"]);
    qemu_io(&bm, &["write -P 1 0 8m"]);
    qok(&["bitmap", "--add", &bm, "b0"]);
    qok(&["bitmap", "--add", "-g", "512k", &bm, "b1"]);
    qemu_io(&bm, &["write -P 2 0 1m"]);
    assert_eq!(rvok(&["info", &bm]), qok(&["info", &bm]));
    // Other layouts made by qemu-img.
    let mut layouts = Vec::new();
    for (name, opts) in [
        ("extl2", "extended_l2=on"),
        ("v2", "compat=0.10"),
        ("c512", "cluster_size=512"),
        ("c2m", "cluster_size=2M,lazy_refcounts=on"),
    ] {
        let p = d.p(&format!("{name}.qcow2"));
        qok(&["create", "-q", "-f", "qcow2", "-o", opts, &p, "8M"]);
        qemu_io(
            &p,
            &[
                "write -P 1 0 100k",
                "write -z 200k 8k",
                "write -P 2 3m 3k",
                "discard 0 4k",
            ],
        );
        layouts.push(p);
    }
    let mut all = vec![&base, &top, &comp, &raw, &pre, &bm];
    all.extend(layouts.iter());
    for img in all {
        let is_raw = img.ends_with(".raw");
        for cmd in [
            vec!["check", "--output=json"],
            vec!["map", "--output=json"],
            vec!["measure", "--output=json", "-O", "qcow2"],
            vec!["measure", "--output=json", "-O", "raw"],
            vec!["info", "--output=json", "--backing-chain"],
        ] {
            if is_raw && cmd[0] == "check" {
                continue;
            }
            let mut args = cmd.clone();
            args.push(img);
            let mut ours = json(&rvok(&args));
            let mut theirs = json(&qok(&args));
            if cmd[0] == "info" {
                for v in [&mut ours, &mut theirs] {
                    for i in v.as_array_mut().unwrap() {
                        i.as_object_mut().unwrap().remove("actual-size");
                    }
                }
            }
            assert_eq!(ours, theirs, "{args:?}");
        }
    }
    // Writing through rvirt drops the bitmaps (it does not maintain them) without leaks.
    let img = rvirt_image::open_image(Path::new(&bm), None, &Default::default()).unwrap();
    img.write_at(&[7; 4096], 0).unwrap();
    drop(img);
    qcheck(&bm);
    let i = json(&qok(&["info", "--output=json", &bm]));
    assert!(i["format-specific"]["data"].get("bitmaps").is_none(), "{i}");
    // Human map output too.
    assert_eq!(rvok(&["map", &top]), qok(&["map", &top]));
    assert_eq!(
        rvok(&[
            "measure",
            "--size",
            "10G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k"
        ]),
        qok(&[
            "measure",
            "--size",
            "10G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k"
        ])
    );
}

#[test]
fn convert_between_formats_with_compression_and_backing() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let raw = d.p("src.raw");
    patterned_raw(&raw, 6 << 20);
    let q = d.p("a.qcow2");
    rvok(&["convert", "-O", "qcow2", &raw, &q]);
    qcheck(&q);
    qok(&["compare", &raw, &q]);
    // Holes stay holes: only the patterned third of the data is allocated.
    let map = json(&rvok(&["map", "--output=json", &q]));
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 2 << 20);
    let back = d.p("back.raw");
    rvok(&["convert", "-f", "qcow2", "-O", "raw", &q, &back]);
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&raw).unwrap());
    for ct in ["zlib", "zstd"] {
        let c = d.p(&format!("c-{ct}.qcow2"));
        rvok(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            &q,
            &c,
        ]);
        qcheck(&c);
        qok(&["compare", &raw, &c]);
        let chk = json(&qok(&["check", "--output=json", &c]));
        assert!(chk["compressed-clusters"].as_u64().unwrap() > 0, "{chk}");
    }
    // -B: the output only holds what differs from the new backing file.
    let over = d.p("over.qcow2");
    qok(&[
        "create", "-q", "-f", "qcow2", "-b", &q, "-F", "qcow2", &over,
    ]);
    qemu_io(&over, &["write -P 9 1m 64k"]);
    let out = d.p("out.qcow2");
    rvok(&[
        "convert", "-O", "qcow2", "-B", &q, "-F", "qcow2", &over, &out,
    ]);
    qcheck(&out);
    qok(&["compare", &over, &out]);
    let info = json(&qok(&["info", "--output=json", &out]));
    assert_eq!(info["backing-filename"], q.as_str());
    let m = json(&rvok(&["map", "--output=json", &out]));
    let own: u64 = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(own, 65536);
    // Several sources are concatenated.
    let cat = d.p("cat.qcow2");
    let two = d.p("two.raw");
    std::fs::write(&two, vec![0x77u8; 1 << 20]).unwrap();
    rvok(&["convert", "-O", "qcow2", &raw, &two, &cat]);
    let mut both = std::fs::read(&raw).unwrap();
    both.extend_from_slice(&[0x77u8; 1 << 20]);
    let want = d.p("both.raw");
    std::fs::write(&want, &both).unwrap();
    qok(&["compare", &want, &cat]);
    let info = json(&rvok(&["info", "--output=json", &cat]));
    assert_eq!(info["virtual-size"], 7 << 20);
    qcheck(&cat);
    // -n writes into an existing image, and -S 0 allocates everything.
    let pre = d.p("pre.qcow2");
    qok(&["create", "-q", "-f", "qcow2", &pre, "6M"]);
    qemu_io(&pre, &["write -P 7 0 6m"]);
    rvok(&["convert", "-n", "-O", "qcow2", &raw, &pre]);
    qok(&["compare", &raw, &pre]);
    qcheck(&pre);
    let full = d.p("full.qcow2");
    rvok(&[
        "convert", "-S", "0", "-O", "qcow2", "-p", "-W", "-m", "8", "-t", "none", &raw, &full,
    ]);
    let chk = json(&qok(&["check", "--output=json", &full]));
    assert_eq!(chk["allocated-clusters"], 96);
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

#[test]
fn check_exit_codes_and_repair() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = d.p("l.qcow2");
    rvok(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    let o = rv(&["check", &img]);
    assert_eq!(code(&o), 0);
    // Leak a cluster: bump the refcount of cluster 5 (past the end of the file).
    let mut data = std::fs::read(&img).unwrap();
    data[0x20000 + 10..0x20000 + 12].copy_from_slice(&1u16.to_be_bytes());
    data.resize(6 * 65536, 0);
    std::fs::write(&img, &data).unwrap();
    assert_eq!(code(&run("qemu-img", &["check", &img])), 3);
    let o = rv(&["check", "--output=json", &img]);
    assert_eq!(code(&o), 3);
    assert_eq!(json(&String::from_utf8_lossy(&o.stdout))["leaks"], 1);
    let o = rv(&["check", "-r", "leaks", &img]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 leaked clusters"));
    qcheck(&img);
    // A corruption: the L1 table points at an L2 table whose refcount is 0.
    qemu_io(&img, &["write -P 1 0 4k"]);
    let mut data = std::fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(data[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(data[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let idx = 0x20000 + 2 * (l2 / 65536);
    data[idx..idx + 2].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&img, &data).unwrap();
    assert_eq!(code(&run("qemu-img", &["check", &img])), 2);
    assert_eq!(code(&rv(&["check", &img])), 2);
    assert_eq!(code(&rv(&["check", "-r", "all", &img])), 0);
    qcheck(&img);
    // Raw images have nothing to check.
    let raw = d.p("r.raw");
    rvok(&["create", "-q", "-f", "raw", &raw, "1M"]);
    assert_eq!(code(&rv(&["check", &raw])), 63);
}

#[test]
fn snapshots_resize_rebase_commit_amend_interoperate() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = d.p("s.qcow2");
    rvok(&["create", "-q", "-f", "qcow2", &img, "8M"]);
    qemu_io(&img, &["write -P 1 0 2m"]);
    rvok(&["snapshot", "-c", "before", &img]);
    qemu_io(&img, &["write -P 2 1m 2m"]);
    rvok(&["snapshot", "-c", "after", &img]);
    let list = qok(&["snapshot", "-l", &img]);
    assert!(list.contains("before") && list.contains("after"), "{list}");
    assert_eq!(rvok(&["snapshot", "-l", &img]), list);
    qcheck(&img);
    rvok(&["snapshot", "-a", "before", &img]);
    qemu_io(&img, &["read -P 1 0 2m", "read -P 0 2m 1m"]);
    rvok(&["snapshot", "-d", "after", &img]);
    rvok(&["snapshot", "-d", "before", &img]);
    qcheck(&img);
    assert_eq!(rvok(&["snapshot", "-l", &img]), "");
    // resize
    assert!(rvok(&["resize", &img, "+8M"]).contains("Image resized."));
    assert_eq!(
        json(&qok(&["info", "--output=json", &img]))["virtual-size"],
        16 << 20
    );
    assert_eq!(code(&rv(&["resize", &img, "1M"])), 1);
    rvok(&["resize", "--shrink", &img, "-15M"]);
    assert_eq!(
        json(&qok(&["info", "--output=json", &img]))["virtual-size"],
        1 << 20
    );
    qcheck(&img);
    qemu_io(&img, &["read -P 1 0 1m"]);
    // rebase: safe mode keeps the visible data when the backing file changes.
    let b1 = d.p("b1.raw");
    let b2 = d.p("b2.raw");
    std::fs::write(&b1, vec![0x11u8; 4 << 20]).unwrap();
    std::fs::write(&b2, vec![0x22u8; 4 << 20]).unwrap();
    let ov = d.p("ov.qcow2");
    rvok(&[
        "create", "-q", "-f", "qcow2", "-b", "b1.raw", "-F", "raw", &ov,
    ]);
    qemu_io(&ov, &["write -P 0x33 1m 64k"]);
    rvok(&["rebase", "-b", "b2.raw", "-F", "raw", &ov]);
    qcheck(&ov);
    qemu_io(&ov, &["read -P 0x11 0 1m", "read -P 0x33 1m 64k"]);
    rvok(&["rebase", "-u", "-b", "b1.raw", "-F", "raw", &ov]);
    qemu_io(&ov, &["read -P 0x11 0 1m"]);
    // commit: the overlay's data lands in its backing file, and the overlay is emptied.
    let base = d.p("cbase.qcow2");
    let top = d.p("ctop.qcow2");
    rvok(&["create", "-q", "-f", "qcow2", &base, "4M"]);
    qemu_io(&base, &["write -P 4 0 4m"]);
    rvok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "cbase.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    qemu_io(&top, &["write -P 5 100k 200k", "write -z 2m 64k"]);
    assert!(rvok(&["commit", &top]).contains("Image committed."));
    qcheck(&base);
    qcheck(&top);
    qemu_io(
        &base,
        &[
            "read -P 4 0 100k",
            "read -P 5 100k 200k",
            "read -P 0 2m 64k",
        ],
    );
    let m = json(&qok(&["map", "--output=json", &top]));
    assert!(m
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["depth"] != 0 || e["data"] == false));
    // amend
    let v2 = d.p("v2.qcow2");
    rvok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        &v2,
        "1M",
    ]);
    qemu_io(&v2, &["write -P 6 0 64k"]);
    rvok(&["amend", "-o", "compat=1.1,lazy_refcounts=on", &v2]);
    let i = json(&qok(&["info", "--output=json", &v2]));
    assert_eq!(i["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(i["format-specific"]["data"]["lazy-refcounts"], true);
    qcheck(&v2);
    qemu_io(&v2, &["read -P 6 0 64k"]);
}

#[test]
fn create_lists_its_options_and_refuses_bad_ones() {
    let help = rvok(&["create", "-f", "qcow2", "-o", "help"]);
    for o in [
        "cluster_size",
        "lazy_refcounts",
        "compression_type",
        "refcount_bits",
    ] {
        assert!(help.contains(o), "{help}");
    }
    let d = Dir::new();
    let img = d.p("x.raw");
    let o = rv(&["create", "-f", "raw", "-o", "cluster_size=4k", &img, "1M"]);
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cluster_size"));
    let o = rv(&["create", "-f", "qcow2", "-o", "cluster_size=3k", &img, "1M"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("power of two"));
    let o = rv(&["create", "-f", "qcow2", &img, "12Q"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid size"));
}

#[test]
fn compare_exit_codes() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let a = d.p("a.raw");
    let b = d.p("b.qcow2");
    patterned_raw(&a, 1 << 20);
    rvok(&["convert", "-O", "qcow2", &a, &b]);
    assert_eq!(rvok(&["compare", &a, &b]), "Images are identical.\n");
    qemu_io(&b, &["write -P 9 5000 1"]);
    let o = rv(&["compare", &a, &b]);
    assert_eq!(code(&o), 1);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Content mismatch at offset 4608!\n"
    );
    let c = d.p("c.raw");
    let mut data = std::fs::read(&a).unwrap();
    data.extend_from_slice(&[0; 4096]);
    std::fs::write(&c, &data).unwrap();
    assert_eq!(code(&rv(&["compare", &a, &c])), 0);
    let o = rv(&["compare", "-s", &a, &c]);
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Strict mode: Image size mismatch!"));
    assert_eq!(code(&rv(&["compare", &a, &d.p("missing")])), 2);
}

#[test]
fn a_second_writer_is_refused_naming_the_holder() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = d.p("l.qcow2");
    rvok(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    // qemu-io keeps the image open (and locked for writing) while it waits on stdin.
    let mut child = Command::new("qemu-io")
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut tries = 0;
    let err = loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let o = rv(&["resize", &img, "2M"]);
        tries += 1;
        if !o.status.success() || tries > 50 {
            break String::from_utf8_lossy(&o.stderr).into_owned();
        }
        // qemu-io had not opened the image yet; undo and retry.
        rvok(&["resize", "--shrink", &img, "1M"]);
    };
    assert!(
        err.contains(&format!("in use by process {}", child.id())),
        "{err}"
    );
    // -U reads anyway; without it even a reader is refused.
    rvok(&["info", "-U", &img]);
    assert_eq!(code(&rv(&["info", &img])), 1);
    drop(child.stdin.take());
    child.wait().unwrap();
    rvok(&["info", &img]);
}

#[test]
fn qemu_sees_our_lock() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = d.p("held.qcow2");
    rvok(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    let held = rvirt_image::open_image(Path::new(&img), None, &rvirt_image::OpenOptions::default())
        .unwrap();
    let o = run("qemu-img", &["info", &img]);
    assert!(
        !o.status.success(),
        "qemu-img opened an image we hold for writing"
    );
    qok(&["info", "-U", &img]);
    drop(held);
    qok(&["info", &img]);
}
