//! `convert`: copy images between formats, skipping holes and zeroes, optionally compressing.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rvirt_image::qcow2::CreateOptions;
use rvirt_image::{create_image, BlockDevice, Format, Image};

use crate::common::{apply_create_options, open, progress, split_options};
use crate::size::parse_size;

/// Bytes read and written per step.
const CHUNK: u64 = 2 << 20;

#[derive(Args)]
pub struct ConvertArgs {
    /// Source format (probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output format options (as for create).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Compress the output (qcow2 only).
    #[arg(short = 'c')]
    compress: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Runs of zeroes of at least this size are left unallocated (0: allocate everything).
    #[arg(short = 'S', default_value = "4k")]
    sparse: String,
    /// Make the output an overlay of this backing file; only data the source's top image
    /// holds is copied.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the -B backing file.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Write into an existing output instead of creating it.
    #[arg(short = 'n')]
    no_create: bool,
    /// Output cache mode: unsafe (the default for convert, as in qemu-img) skips the final
    /// flush to disk; writeback, writethrough, directsync and none flush when done.
    #[arg(short = 't', default_value = "unsafe", value_parser = ["none", "writeback", "writethrough", "directsync", "unsafe"])]
    cache: String,
    /// Source cache mode (accepted for qemu-img compatibility; reads use the page cache).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Allow out-of-order writes (accepted for qemu-img compatibility; rvirt-img's writer is
    /// a single ordered stream).
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Number of parallel requests (accepted for qemu-img compatibility).
    #[arg(short = 'm')]
    parallel: Option<u32>,
    /// Read sources without taking their lock.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(short = 'q')]
    quiet: bool,
    /// Source image(s), concatenated, then the output.
    #[arg(required = true, num_args = 2..)]
    files: Vec<PathBuf>,
}

struct Plan {
    sparse: u64,
    compress: bool,
    /// The output starts out reading as zeroes, so zero ranges need no writes.
    fresh: bool,
    /// Copy only what a source's top layer holds (-B).
    top_only: bool,
}

pub fn run(mut a: ConvertArgs) -> Result<u8> {
    let out_path = a.files.pop().context("no output file given")?;
    let out_format: Format = a.out_format.parse()?;
    let sparse = parse_size(&a.sparse)?;
    if !sparse.is_multiple_of(512) {
        bail!("-S {} must be a multiple of 512", a.sparse);
    }
    if a.compress && out_format != Format::Qcow2 {
        bail!("-c needs an output format that supports compression: use -O qcow2");
    }
    let sources = a
        .files
        .iter()
        .map(|p| open(p, a.format.as_deref(), true, a.force_share))
        .collect::<Result<Vec<Image>>>()?;
    let total: u64 = sources.iter().map(|s| s.size()).sum();
    if !a.no_create {
        let mut o = CreateOptions {
            size: total,
            ..Default::default()
        };
        apply_create_options(&mut o, out_format, &split_options(&a.options))?;
        if a.backing.is_some() {
            o.backing_file = a.backing.clone();
            o.backing_format = a.backing_fmt.clone();
            if o.backing_format.is_none() {
                bail!("-B given without -F: name the backing file's format");
            }
        }
        create_image(&out_path, out_format, &o)
            .with_context(|| format!("could not create '{}'", out_path.display()))?;
    } else if !a.options.is_empty() {
        bail!("-o cannot be used with -n (the output already exists)");
    }
    let target = open(&out_path, Some(out_format.name()), false, false)?;
    if target.size() < total {
        bail!(
            "output '{}' ({} bytes) is smaller than the input ({total} bytes)",
            out_path.display(),
            target.size()
        );
    }
    let plan = Plan {
        sparse,
        compress: a.compress,
        fresh: !a.no_create && a.backing.is_none(),
        top_only: a.backing.is_some(),
    };
    let pb = progress(a.progress && !a.quiet, total);
    let mut base = 0;
    for (src, path) in sources.iter().zip(&a.files) {
        copy(src, &target, base, &plan, &pb).with_context(|| {
            format!(
                "converting '{}' to '{}' failed",
                path.display(),
                out_path.display()
            )
        })?;
        base += src.size();
    }
    if a.cache != "unsafe" {
        target
            .flush()
            .with_context(|| format!("flushing '{}'", out_path.display()))?;
    }
    let _ = (a.src_cache, a.out_of_order, a.parallel);
    pb.finish_and_clear();
    Ok(0)
}

/// One step of the copy, made by the reading thread and carried out by the writing one.
enum Step {
    /// Nothing to write (progress only).
    Skip(u64),
    Zero {
        off: u64,
        len: u64,
    },
    Data {
        off: u64,
        buf: Vec<u8>,
    },
    /// Whole output clusters with their compressed forms (`None`: store plainly).
    Compressed {
        off: u64,
        buf: Vec<u8>,
        z: Vec<Option<Vec<u8>>>,
    },
}

/// Copies `src` into `dst` at `base`: one thread reads (and compresses) while this one
/// writes, so reading, compressing and writing overlap.
fn copy(
    src: &Image,
    dst: &Image,
    base: u64,
    plan: &Plan,
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Step>>(4);
    // Written buffers go back to the reader: no fresh (page-faulting) buffer per step.
    let (pool_tx, pool) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        s.spawn(move || {
            let r = if plan.compress {
                read_compressed(src, dst, base, &tx, &pool)
            } else {
                read_plain(src, base, plan, &tx, &pool)
            };
            if let Err(e) = r {
                let _ = tx.send(Err(e));
            }
        });
        for step in rx {
            match step? {
                Step::Skip(n) => pb.inc(n),
                Step::Zero { off, len } => {
                    dst.write_zeroes(off, len, true)?;
                    pb.inc(len);
                }
                Step::Data { off, buf } => {
                    write_sparse(dst, &buf, off, plan)?;
                    pb.inc(buf.len() as u64);
                    let _ = pool_tx.send(buf);
                }
                Step::Compressed { off, buf, z } => {
                    let q = dst.as_qcow2().context("compression needs a qcow2 output")?;
                    let cs = q.cluster_size() as usize;
                    for (i, (piece, z)) in buf.chunks(cs).zip(z).enumerate() {
                        if !is_zero(piece) {
                            q.write_precompressed(piece, z, off + (i * cs) as u64)?;
                        }
                    }
                    pb.inc(buf.len() as u64);
                    let _ = pool_tx.send(buf);
                }
            }
        }
        Ok(())
    })
}

fn read_plain(
    src: &Image,
    base: u64,
    plan: &Plan,
    tx: &std::sync::mpsc::SyncSender<Result<Step>>,
    pool: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<()> {
    let size = src.size();
    let mut pos = 0;
    while pos < size {
        let e = src.map_extent(pos, CHUNK.min(size - pos))?;
        let n = e.length;
        let skip = plan.top_only && e.depth > 0 && src.as_qcow2().is_some();
        let step = if skip || (!e.data && plan.sparse > 0 && plan.fresh) {
            Step::Skip(n)
        } else if !e.data && plan.sparse > 0 {
            Step::Zero {
                off: base + pos,
                len: n,
            }
        } else {
            let mut buf = take_buffer(pool, n);
            src.read_at(&mut buf, pos)?;
            Step::Data {
                off: base + pos,
                buf,
            }
        };
        if tx.send(Ok(step)).is_err() {
            return Ok(());
        }
        pos += n;
    }
    Ok(())
}

/// Reads whole output clusters and compresses them on two threads.
fn read_compressed(
    src: &Image,
    dst: &Image,
    base: u64,
    tx: &std::sync::mpsc::SyncSender<Result<Step>>,
    pool: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<()> {
    let q = dst.as_qcow2().context("compression needs a qcow2 output")?;
    let cs = q.cluster_size();
    if !base.is_multiple_of(cs) {
        bail!("with -c, every input but the last must be a multiple of the {cs}-byte cluster size");
    }
    let size = src.size();
    let mut pos = 0;
    while pos < size {
        let n = CHUNK.max(cs).min(size - pos);
        let e = src.map_extent(pos, n)?;
        if !e.data && e.length >= cs.min(size - pos) {
            // Whole clusters of zeroes stay unallocated.
            let len = if e.length == size - pos {
                e.length
            } else {
                e.length / cs * cs
            };
            if tx.send(Ok(Step::Skip(len))).is_err() {
                return Ok(());
            }
            pos += len;
            continue;
        }
        let mut buf = take_buffer(pool, n);
        src.read_at(&mut buf, pos)?;
        let clusters: Vec<&[u8]> = buf.chunks(cs as usize).collect();
        let half = clusters.len().div_ceil(2);
        let compress = |part: &[&[u8]]| -> Vec<Option<Vec<u8>>> {
            part.iter()
                .map(|c| if is_zero(c) { None } else { q.compress(c) })
                .collect()
        };
        let z = std::thread::scope(|s| -> Result<_> {
            let first = s.spawn(|| compress(&clusters[..half]));
            let second = compress(&clusters[half..]);
            let mut z = first
                .join()
                .map_err(|_| anyhow::anyhow!("the compression thread failed"))?;
            z.extend(second);
            Ok(z)
        })?;
        if tx
            .send(Ok(Step::Compressed {
                off: base + pos,
                buf,
                z,
            }))
            .is_err()
        {
            return Ok(());
        }
        pos += n;
    }
    Ok(())
}

/// A recycled buffer of `n` bytes (contents undefined), or a new one.
fn take_buffer(pool: &std::sync::mpsc::Receiver<Vec<u8>>, n: u64) -> Vec<u8> {
    let mut buf = pool.try_recv().unwrap_or_default();
    buf.resize(n as usize, 0);
    buf
}

/// Writes `data` at `off`, leaving out runs of zeroes of at least the sparse size.
fn write_sparse(dst: &Image, data: &[u8], off: u64, plan: &Plan) -> Result<()> {
    if plan.sparse == 0 {
        return Ok(dst.write_at(data, off)?);
    }
    let g = plan.sparse as usize;
    // Runs of equal kind: (is zero, start); flushed when the kind changes.
    let mut run: Option<(bool, usize)> = None;
    let flush = |zero: bool, s: usize, e: usize| -> Result<()> {
        if !zero {
            dst.write_at(&data[s..e], off + s as u64)?;
        } else if !plan.fresh {
            dst.write_zeroes(off + s as u64, (e - s) as u64, true)?;
        }
        Ok(())
    };
    let mut i = 0;
    while i < data.len() {
        // Blocks follow the output's grid of sparse-size blocks.
        let end = ((((off as usize) + i) / g + 1) * g - off as usize).min(data.len());
        let zero = end - i == g && is_zero(&data[i..end]);
        match run {
            Some((z, s)) if z != zero => {
                flush(z, s, i)?;
                run = Some((zero, i));
            }
            None => run = Some((zero, i)),
            _ => {}
        }
        i = end;
    }
    if let Some((z, s)) = run {
        flush(z, s, data.len())?;
    }
    Ok(())
}

pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    let words_zero = chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0);
    words_zero && chunks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvirt_image::{open_image, OpenOptions};

    fn qcow2(dir: &std::path::Path, fill: u8) -> Image {
        let p = dir.join("t.qcow2");
        let o = CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..Default::default()
        };
        create_image(&p, Format::Qcow2, &o).unwrap();
        let img = open_image(&p, None, &OpenOptions::default()).unwrap();
        img.write_at(&vec![fill; 1 << 20], 0).unwrap();
        img
    }

    #[test]
    fn sparse_writes_skip_or_zero_runs_of_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![7u8; 64 << 10];
        data[8192..40960].fill(0);
        data[50000..50010].fill(0); // too short to be left out
        for fresh in [true, false] {
            let img = qcow2(dir.path(), if fresh { 0 } else { 0xff });
            if fresh {
                img.discard(0, 1 << 20).unwrap();
            }
            let plan = Plan {
                sparse: 4096,
                compress: false,
                fresh,
                top_only: false,
            };
            write_sparse(&img, &data, 4096, &plan).unwrap();
            let mut back = vec![0u8; data.len()];
            img.read_at(&mut back, 4096).unwrap();
            assert!(back == data, "fresh={fresh}");
            // The zero run is not data in the image.
            let e = img.map_extent(4096 + 8192, 4096).unwrap();
            assert!(!e.data && e.zero, "fresh={fresh}: {e:?}");
            assert!(img.map_extent(4096 + 49152, 4096).unwrap().data);
        }
    }
}
