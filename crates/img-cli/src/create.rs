//! `create`: new raw or qcow2 images.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rvirt_image::qcow2::{resolve_backing, CreateOptions};
use rvirt_image::{create_image, BlockDevice, Format};

use crate::common::{apply_create_options, formatting_line, open, split_options};
use crate::size::parse_size;

pub struct CreateArgs {
    pub format: String,
    pub options: Vec<String>,
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
    pub unsafe_backing: bool,
    pub quiet: bool,
    pub filename: Option<PathBuf>,
    pub size: Option<String>,
}

pub fn run(a: CreateArgs) -> Result<u8> {
    let format: Format = a.format.parse()?;
    let opts = split_options(&a.options);
    if opts.iter().any(|(k, _)| k == "help" || k == "?") {
        print!("{}", crate::common::options_help(format));
        return Ok(0);
    }
    let Some(filename) = a.filename.clone() else {
        bail!("no file name given: rvirt-img create -f {format} FILE SIZE");
    };
    let mut o = CreateOptions::default();
    apply_create_options(&mut o, format, &opts)?;
    if let Some(b) = a.backing {
        o.backing_file = Some(b);
    }
    if let Some(f) = a.backing_fmt {
        o.backing_format = Some(f);
    }
    if o.backing_file.is_some() && format == Format::Raw {
        bail!("raw images cannot have a backing file; use -f qcow2");
    }
    let size = a.size.as_deref().map(parse_size).transpose()?;
    if let Some(b) = o.backing_file.clone() {
        let path = resolve_backing(&filename, &b);
        if o.backing_format.is_none() {
            let detected = rvirt_image::probe(&path)
                .map(|f| format!(" (it looks like {f})"))
                .unwrap_or_default();
            bail!(
                "backing file '{b}' given without its format{detected}: add -F <format>, since probing a backing file's format is unsafe"
            );
        }
        if !a.unsafe_backing {
            let img = open(&path, o.backing_format.as_deref(), true, true).with_context(|| {
                format!("could not open backing file '{b}'; use -u to skip this check")
            })?;
            if size.is_none() && o.size == 0 {
                o.size = img.size();
            }
        } else if size.is_none() && o.size == 0 {
            bail!("with -u the size of '{}' must be given", filename.display());
        }
    }
    if let Some(s) = size {
        o.size = s;
    }
    if o.size == 0 && o.backing_file.is_none() && a.size.is_none() {
        bail!(
            "no size given for '{}': rvirt-img create -f {format} {} SIZE",
            filename.display(),
            filename.display()
        );
    }
    if !a.quiet {
        println!("{}", formatting_line(&filename, format, &o));
    }
    create_image(&filename, format, &o)
        .with_context(|| format!("could not create '{}'", filename.display()))?;
    Ok(0)
}
