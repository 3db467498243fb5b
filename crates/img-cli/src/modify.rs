//! Commands that change an image: `resize`, `rebase`, `commit`, `amend`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rvirt_image::qcow2::resolve_backing;
use rvirt_image::{BlockDevice, Image};

use crate::common::{open, parse_bool, progress, split_options};
use crate::size::parse_size;

pub fn resize(
    format: Option<&str>,
    shrink: bool,
    quiet: bool,
    path: &Path,
    size: &str,
) -> Result<u8> {
    let mut img = open(path, format, false, false)?;
    let cur = img.size();
    let new = if let Some(d) = size.strip_prefix('+') {
        cur.checked_add(parse_size(d)?)
            .context("new size overflows")?
    } else if let Some(d) = size.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?)
            .with_context(|| format!("cannot shrink '{}' below zero bytes", path.display()))?
    } else {
        parse_size(size)?
    };
    if new < cur && !shrink {
        bail!(
            "shrinking '{}' from {cur} to {new} bytes loses data: use the --shrink option to perform a shrink operation",
            path.display()
        );
    }
    match &mut img {
        Image::Raw(r) => r.resize(new)?,
        Image::Qcow2(q) => q.resize(new)?,
    }
    img.flush()?;
    if !quiet {
        println!("Image resized.");
    }
    Ok(0)
}

pub struct RebaseArgs {
    pub format: Option<String>,
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
    pub unsafe_mode: bool,
    pub force_share: bool,
    pub progress: bool,
    pub filename: PathBuf,
}

pub fn rebase(a: RebaseArgs) -> Result<u8> {
    let Some(new) = a.backing.as_deref() else {
        bail!("rebase needs -b <new backing file> (\"\" for none)");
    };
    let new = (!new.is_empty()).then_some(new);
    if a.unsafe_mode {
        let opts = rvirt_image::OpenOptions {
            no_backing: true,
            ..Default::default()
        };
        let img = rvirt_image::open_image(
            &a.filename,
            crate::common::parse_format(a.format.as_deref())?,
            &opts,
        )
        .with_context(|| format!("could not open '{}'", a.filename.display()))?;
        let q = qcow2_of(&img, &a.filename)?;
        q.set_backing(new, new.and(a.backing_fmt.as_deref()))?;
        return Ok(0);
    }
    let img = open(&a.filename, a.format.as_deref(), false, false)?;
    let q = qcow2_of(&img, &a.filename)?;
    if new.is_some() && a.backing_fmt.is_none() {
        bail!("-b without -F: name the new backing file's format");
    }
    let new_img = match new {
        Some(b) => Some(open(
            &resolve_backing(&a.filename, b),
            a.backing_fmt.as_deref(),
            true,
            a.force_share,
        )?),
        None => None,
    };
    // Where the image does not hold data itself, copy what the old backing shows and the new
    // one would not.
    let size = img.size();
    let step = q.header().cluster_size().max(1 << 16);
    let mut old_buf = vec![0u8; step as usize];
    let mut new_buf = vec![0u8; step as usize];
    let pb = progress(a.progress, size);
    let mut pos = 0;
    while pos < size {
        let e = img.map_extent(pos, (size - pos).min(step))?;
        let n = e.length;
        if e.depth > 0 || !e.present {
            let o = &mut old_buf[..n as usize];
            img.read_at(o, pos)?;
            let nb = &mut new_buf[..n as usize];
            match &new_img {
                Some(ni) if pos < ni.size() => {
                    let k = (ni.size() - pos).min(n) as usize;
                    ni.read_at(&mut nb[..k], pos)?;
                    nb[k..].fill(0);
                }
                _ => nb.fill(0),
            }
            if o != nb {
                if crate::convert::is_zero(o) {
                    img.write_zeroes(pos, n, false)?;
                } else {
                    img.write_at(o, pos)?;
                }
            }
        }
        pb.inc(n);
        pos += n;
    }
    q.set_backing(new, new.and(a.backing_fmt.as_deref()))?;
    img.flush()?;
    pb.finish_and_clear();
    Ok(0)
}

fn qcow2_of<'a>(img: &'a Image, path: &Path) -> Result<&'a rvirt_image::Qcow2> {
    img.as_qcow2().with_context(|| {
        format!(
            "'{}' is a {} image, which has no backing file",
            path.display(),
            img.format()
        )
    })
}

pub fn commit(
    format: Option<&str>,
    base: Option<&str>,
    keep: bool,
    show: bool,
    quiet: bool,
    path: &Path,
) -> Result<u8> {
    let img = open(path, format, base.is_some() || keep, false)?;
    let q = qcow2_of(&img, path)?;
    // The chain below the image, to find the base's depth and format.
    let mut chain: Vec<(PathBuf, Option<String>)> = Vec::new();
    let mut h = q.header();
    let mut cur = path.to_owned();
    while let Some(b) = h.backing_file.clone() {
        cur = resolve_backing(&cur, &b);
        chain.push((cur.clone(), h.backing_format.clone()));
        if chain.len() > 64 {
            bail!("backing chain of '{}' is too deep", path.display());
        }
        match std::fs::read(&cur).ok().and_then(|d| {
            rvirt_image::qcow2::header::Header::parse(&d[..d.len().min(2 << 20)], &cur).ok()
        }) {
            Some(next) => h = next,
            None => break,
        }
    }
    if chain.is_empty() {
        bail!("'{}' has no backing file to commit into", path.display());
    }
    let depth = match base {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b).with_context(|| format!("base '{b}' not found"))?;
            1 + chain
                .iter()
                .position(|(p, _)| std::fs::canonicalize(p).is_ok_and(|c| c == want))
                .with_context(|| {
                    format!("'{b}' is not in the backing chain of '{}'", path.display())
                })?
        }
    };
    let (base_path, base_fmt) = &chain[depth - 1];
    // The chain opened above holds a shared lock on the base that keeps other writers out; the
    // base is opened a second time, writable, under that lock.
    let target = rvirt_image::open_image(
        base_path,
        crate::common::parse_format(base_fmt.as_deref())?,
        &rvirt_image::OpenOptions {
            force_share: true,
            ..Default::default()
        },
    )
    .with_context(|| format!("could not open base '{}' for writing", base_path.display()))?;
    let size = img.size().min(target.size());
    let pb = progress(show, size);
    let mut buf = vec![0u8; 2 << 20];
    let mut pos = 0;
    while pos < size {
        let e = img.map_extent(pos, (size - pos).min(2 << 20))?;
        let n = e.length;
        if (e.depth as usize) < depth && e.present {
            if e.zero && !e.data {
                target.write_zeroes(pos, n, false)?;
            } else {
                let b = &mut buf[..n as usize];
                img.read_at(b, pos)?;
                target.write_at(b, pos)?;
            }
        }
        pb.inc(n);
        pos += n;
    }
    target.flush()?;
    drop(target);
    if !keep && base.is_none() {
        qcow2_of(&img, path)?.make_empty()?;
        img.flush()?;
    }
    pb.finish_and_clear();
    if !quiet {
        println!("Image committed.");
    }
    Ok(0)
}

pub fn amend(format: Option<&str>, options: &[String], quiet: bool, path: &Path) -> Result<u8> {
    let _ = quiet;
    let img = open(path, format, false, false)?;
    let q = qcow2_of(&img, path)?;
    let mut version = None;
    let mut lazy = None;
    let h = q.header();
    let mut backing = h.backing_file.clone();
    let mut backing_fmt = h.backing_format.clone();
    let mut backing_changed = false;
    for (k, v) in split_options(options) {
        match k.as_str() {
            "compat" => {
                version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("invalid compat level '{v}': use 0.10 or 1.1"),
                })
            }
            "lazy_refcounts" => lazy = Some(parse_bool(&k, &v)?),
            "backing_file" => {
                backing = (!v.is_empty()).then_some(v);
                backing_changed = true;
            }
            "backing_fmt" => {
                backing_fmt = (!v.is_empty()).then_some(v);
                backing_changed = true;
            }
            "cluster_size" | "refcount_bits" | "compression_type" | "extended_l2"
            | "preallocation" => {
                bail!("changing '{k}' of an existing image is not supported; use 'rvirt-img convert -o {k}={v}' instead")
            }
            _ => bail!("invalid option '{k}' for amend"),
        }
    }
    if version.is_some() || lazy.is_some() {
        q.amend(version, lazy)
            .with_context(|| format!("amending '{}' failed", path.display()))?;
    }
    if backing_changed {
        q.set_backing(
            backing.as_deref(),
            backing.as_ref().and(backing_fmt.as_deref()),
        )?;
    }
    img.flush()?;
    Ok(0)
}
