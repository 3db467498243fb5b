//! Opening images and parsing `-o` option lists, shared by the commands.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rvirt_image::qcow2::{CompressionType, CreateOptions};
use rvirt_image::{open_image, Format, Image, OpenOptions};

use crate::size::parse_size;

pub fn parse_format(s: Option<&str>) -> Result<Option<Format>> {
    s.map(|f| f.parse::<Format>().map_err(anyhow::Error::from))
        .transpose()
}

/// Opens an image with its backing chain; read-only images take a shared lock unless
/// `force_share`.
pub fn open(
    path: &Path,
    format: Option<&str>,
    read_only: bool,
    force_share: bool,
) -> Result<Image> {
    if force_share && !read_only {
        bail!(
            "-U (force share) only works for read-only access to '{}'",
            path.display()
        );
    }
    let opts = OpenOptions {
        read_only,
        force_share,
        ..Default::default()
    };
    open_image(path, parse_format(format)?, &opts)
        .with_context(|| format!("could not open '{}'", path.display()))
}

/// `-o` lists, split at commas (qemu-img allows several -o, which add up).
pub fn split_options(lists: &[String]) -> Vec<(String, String)> {
    lists
        .iter()
        .flat_map(|l| l.split(','))
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (kv.trim().to_string(), "on".to_string()),
        })
        .collect()
}

pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("invalid value '{v}' for option {key}: use on or off"),
    }
}

/// Applies `-o` options to `o`; options not valid for `format` are refused by name.
pub fn apply_create_options(
    o: &mut CreateOptions,
    format: Format,
    opts: &[(String, String)],
) -> Result<()> {
    for (k, v) in opts {
        let qcow2_only = || -> Result<()> {
            if format != Format::Qcow2 {
                bail!("option '{k}' is not supported by format raw; use -f qcow2");
            }
            Ok(())
        };
        match k.as_str() {
            "size" => o.size = parse_size(v)?,
            "preallocation" => o.preallocation = v.parse()?,
            "cluster_size" => {
                qcow2_only()?;
                o.cluster_size = parse_size(v)?;
            }
            "lazy_refcounts" => {
                qcow2_only()?;
                o.lazy_refcounts = parse_bool(k, v)?;
            }
            "compat" => {
                qcow2_only()?;
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("invalid compat level '{v}': use 0.10 or 1.1"),
                };
            }
            "backing_file" => {
                qcow2_only()?;
                o.backing_file = Some(v.clone());
            }
            "backing_fmt" => {
                qcow2_only()?;
                o.backing_format = Some(v.clone());
            }
            "compression_type" => {
                qcow2_only()?;
                o.compression = match v.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => bail!("invalid compression_type '{v}': use zlib or zstd"),
                };
            }
            "refcount_bits" => {
                qcow2_only()?;
                o.refcount_bits = v
                    .parse()
                    .with_context(|| format!("invalid refcount_bits '{v}'"))?;
            }
            "extended_l2" => {
                qcow2_only()?;
                o.extended_l2 = parse_bool(k, v)?;
            }
            _ => bail!(
                "invalid option '{k}' for format {format}; supported: size, preallocation{}",
                if format == Format::Qcow2 {
                    ", cluster_size, lazy_refcounts, compat, backing_file, backing_fmt, compression_type, refcount_bits, extended_l2"
                } else {
                    ""
                }
            ),
        }
    }
    Ok(())
}

/// What `-o help` prints: the creation options of `format`.
pub fn options_help(format: Format) -> String {
    let mut s = format!("Supported {format} options:\n");
    let mut opt = |name: &str, kind: &str, help: &str| {
        s += &format!("  {name:<17}<{kind}>\n    {help}\n");
    };
    if format == Format::Qcow2 {
        opt("backing_file", "str", "File name of a base image");
        opt("backing_fmt", "str", "Image format of the base image");
        opt(
            "cluster_size",
            "size",
            "qcow2 cluster size (512 to 2M, default 64K)",
        );
        opt("compat", "str", "Compatibility level (0.10 or 1.1)");
        opt(
            "compression_type",
            "str",
            "Compression method used for image cluster compression (zlib or zstd)",
        );
        opt(
            "extended_l2",
            "bool (on/off)",
            "Extended L2 tables (32 subclusters, cluster size at least 16K)",
        );
        opt(
            "lazy_refcounts",
            "bool (on/off)",
            "Postpone refcount updates",
        );
    }
    opt(
        "preallocation",
        "str",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    );
    if format == Format::Qcow2 {
        opt(
            "refcount_bits",
            "num",
            "Width of a reference count entry in bits (1 to 64, a power of two)",
        );
    }
    opt("size", "size", "Virtual disk size");
    s
}

/// The "Formatting ..." line qemu-img create prints.
pub fn formatting_line(path: &Path, format: Format, o: &CreateOptions) -> String {
    let mut s = format!("Formatting '{}', fmt={format}", path.display());
    if format == Format::Qcow2 {
        s += &format!(
            " cluster_size={} extended_l2={} compression_type={}",
            o.cluster_size,
            onoff(o.extended_l2),
            o.compression.name()
        );
    }
    s += &format!(" size={}", o.size);
    if let Some(b) = &o.backing_file {
        s += &format!(" backing_file={b}");
    }
    if let Some(b) = &o.backing_format {
        s += &format!(" backing_fmt={b}");
    }
    if format == Format::Qcow2 {
        if o.version == 2 {
            s += " compat=0.10";
        }
        s += &format!(
            " lazy_refcounts={} refcount_bits={}",
            onoff(o.lazy_refcounts),
            o.refcount_bits
        );
    }
    s
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// A progress bar on stderr when asked for, else a hidden one.
pub fn progress(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "    ({percent:>3}/100%) [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

/// JSON as qemu-img prints it: pretty, indented by four spaces.
pub fn to_json<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)?;
    Ok(String::from_utf8(out)?)
}
