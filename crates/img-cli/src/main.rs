//! rvirt-img: qemu-img's verbs, options, output and exit codes on rvirt's image library.

mod check;
mod common;
mod compare;
mod convert;
mod create;
mod info;
mod map;
mod modify;
mod size;
mod snapshot;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "rvirt-img",
    version,
    about = "Create, inspect, check and convert raw and qcow2 disk images (qemu-img's verbs)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

/// Options shared by commands that open one image.
#[derive(Args)]
pub struct ImageArgs {
    /// Image format (raw or qcow2); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Open without taking the image lock (force share), read-only.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new image.
    Create {
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// Format options, comma separated (cluster_size, preallocation, lazy_refcounts, compat,
        /// backing_file, backing_fmt, compression_type, refcount_bits, extended_l2).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Backing file.
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        /// Do not open the backing file to check it (its size must then be given).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// The new image (not needed with -o help).
        filename: Option<PathBuf>,
        /// Virtual size (K, M, G, T suffixes); taken from the backing file when omitted.
        size: Option<String>,
    },
    /// Show information about an image.
    Info {
        #[command(flatten)]
        img: ImageArgs,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Show every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        filename: PathBuf,
    },
    /// Check an image's metadata for consistency (exit 0 clean, 2 corrupt, 3 leaks only).
    Check {
        #[command(flatten)]
        img: ImageArgs,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Repair leaks, or all problems.
        #[arg(short = 'r', value_parser = ["leaks", "all"])]
        repair: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
    },
    /// Convert images to another format (or copy them).
    Convert(convert::ConvertArgs),
    /// Change the virtual size.
    Resize {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Allow shrinking (data past the new end is lost).
        #[arg(long)]
        shrink: bool,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
        /// New size, or +SIZE / -SIZE relative to the current one.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::SnapshotArgs),
    /// Change the backing file (safe: copies data that differs; -u: header only).
    Rebase {
        #[arg(short = 'f')]
        format: Option<String>,
        /// New backing file ("" for none).
        #[arg(short = 'b')]
        backing: Option<String>,
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        /// Unsafe: only rewrite the header.
        #[arg(short = 'u')]
        unsafe_mode: bool,
        #[arg(short = 'U')]
        force_share: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
    },
    /// Write an image's changes into its backing file.
    Commit {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Commit into this image of the chain (implies -d).
        #[arg(short = 'b')]
        base: Option<String>,
        /// Keep the image's contents instead of emptying it.
        #[arg(short = 'd')]
        keep: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
    },
    /// Show the allocation map.
    Map {
        #[command(flatten)]
        img: ImageArgs,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        filename: PathBuf,
    },
    /// Compute the file size needed for an image.
    Measure {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Measure a new empty image of this size instead of an existing one.
        #[arg(long)]
        size: Option<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        filename: Option<PathBuf>,
    },
    /// Compare two images' contents (exit 0 same, 1 different, 2 error).
    Compare {
        #[arg(short = 'f')]
        format1: Option<String>,
        #[arg(short = 'F')]
        format2: Option<String>,
        /// Strict: sizes and allocation must match too.
        #[arg(short = 's')]
        strict: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        file1: PathBuf,
        file2: PathBuf,
    },
    /// Change format options of an existing image.
    Amend {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'o', required = true)]
        options: Vec<String>,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
    },
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Cmd::Create {
            format,
            options,
            backing,
            backing_fmt,
            unsafe_backing,
            quiet,
            filename,
            size,
        } => create::run(create::CreateArgs {
            format,
            options,
            backing,
            backing_fmt,
            unsafe_backing,
            quiet,
            filename,
            size,
        }),
        Cmd::Info {
            img,
            output,
            backing_chain,
            filename,
        } => info::run(&img, output, backing_chain, &filename),
        Cmd::Check {
            img,
            output,
            repair,
            quiet,
            filename,
        } => check::run(&img, output, repair.as_deref(), quiet, &filename),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Resize {
            format,
            shrink,
            quiet,
            filename,
            size,
        } => modify::resize(format.as_deref(), shrink, quiet, &filename, &size),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Rebase {
            format,
            backing,
            backing_fmt,
            unsafe_mode,
            force_share,
            progress,
            quiet,
            filename,
        } => modify::rebase(modify::RebaseArgs {
            format,
            backing,
            backing_fmt,
            unsafe_mode,
            force_share,
            progress: progress && !quiet,
            filename,
        }),
        Cmd::Commit {
            format,
            base,
            keep,
            progress,
            quiet,
            filename,
        } => modify::commit(
            format.as_deref(),
            base.as_deref(),
            keep,
            progress && !quiet,
            quiet,
            &filename,
        ),
        Cmd::Map {
            img,
            output,
            filename,
        } => map::map(&img, output, &filename),
        Cmd::Measure {
            output,
            out_format,
            options,
            size,
            format,
            force_share,
            filename,
        } => map::measure(map::MeasureArgs {
            output,
            out_format,
            options,
            size,
            format,
            force_share,
            filename,
        }),
        Cmd::Compare {
            format1,
            format2,
            strict,
            force_share,
            progress,
            quiet,
            file1,
            file2,
        } => compare::run(compare::CompareArgs {
            format1,
            format2,
            strict,
            force_share,
            progress: progress && !quiet,
            quiet,
            file1,
            file2,
        }),
        Cmd::Amend {
            format,
            options,
            quiet,
            filename,
        } => modify::amend(format.as_deref(), &options, quiet, &filename),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // compare reports errors with exit status 2, as qemu-img does.
    let error_code = if matches!(cli.cmd, Cmd::Compare { .. }) {
        2
    } else {
        1
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rvirt-img: {e:#}");
            ExitCode::from(error_code)
        }
    }
}
