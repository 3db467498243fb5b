//! `compare`: are two images' contents the same? Exit 0 same, 1 different, 2 error.

use std::path::PathBuf;

use anyhow::Result;
use rvirt_image::{BlockDevice, Image};

use crate::common::{open, progress};
use crate::convert::is_zero;

const CHUNK: u64 = 1 << 20;

pub struct CompareArgs {
    pub format1: Option<String>,
    pub format2: Option<String>,
    pub strict: bool,
    pub force_share: bool,
    pub progress: bool,
    pub quiet: bool,
    pub file1: PathBuf,
    pub file2: PathBuf,
}

pub fn run(a: CompareArgs) -> Result<u8> {
    let one = open(&a.file1, a.format1.as_deref(), true, a.force_share)?;
    let two = open(&a.file2, a.format2.as_deref(), true, a.force_share)?;
    let say = |s: String| {
        if !a.quiet {
            println!("{s}");
        }
    };
    let (s1, s2) = (one.size(), two.size());
    if s1 != s2 {
        if a.strict {
            say("Strict mode: Image size mismatch!".into());
            return Ok(1);
        }
        say("Warning: Image size mismatch!".into());
    }
    let common = s1.min(s2);
    let pb = progress(a.progress, s1.max(s2));
    if let Some(off) = first_difference(&one, &two, common, a.strict, &pb)? {
        match off {
            Diff::Content(o) => say(format!("Content mismatch at offset {o}!")),
            Diff::Status(o) => say(format!("Strict mode: Offset {o} block status mismatch!")),
        }
        return Ok(1);
    }
    let longer = if s1 > s2 { &one } else { &two };
    if let Some(o) = first_nonzero(longer, common, s1.max(s2))? {
        say(format!("Content mismatch at offset {o}!"));
        return Ok(1);
    }
    pb.finish_and_clear();
    say("Images are identical.".into());
    Ok(0)
}

enum Diff {
    Content(u64),
    Status(u64),
}

fn first_difference(
    one: &Image,
    two: &Image,
    size: u64,
    strict: bool,
    pb: &indicatif::ProgressBar,
) -> Result<Option<Diff>> {
    let mut b1 = vec![0u8; CHUNK as usize];
    let mut b2 = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let e1 = one.map_extent(pos, (size - pos).min(CHUNK))?;
        let e2 = two.map_extent(pos, e1.length)?;
        let n = e2.length;
        if strict && (e1.data, e1.zero) != (e2.data, e2.zero) {
            return Ok(Some(Diff::Status(pos)));
        }
        if !(e1.zero && e2.zero) {
            let (p1, p2) = (&mut b1[..n as usize], &mut b2[..n as usize]);
            one.read_at(p1, pos)?;
            two.read_at(p2, pos)?;
            if p1 != p2 {
                let i = p1
                    .iter()
                    .zip(p2.iter())
                    .position(|(a, b)| a != b)
                    .unwrap_or(0) as u64;
                return Ok(Some(Diff::Content((pos + i) / 512 * 512)));
            }
        }
        pb.inc(n);
        pos += n;
    }
    Ok(None)
}

fn first_nonzero(img: &Image, from: u64, to: u64) -> Result<Option<u64>> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = from;
    while pos < to {
        let e = img.map_extent(pos, (to - pos).min(CHUNK))?;
        let n = e.length;
        if !e.zero {
            let p = &mut buf[..n as usize];
            img.read_at(p, pos)?;
            if !is_zero(p) {
                let i = p.iter().position(|&b| b != 0).unwrap_or(0) as u64;
                return Ok(Some((pos + i) / 512 * 512));
            }
        }
        pos += n;
    }
    Ok(None)
}
