//! rvirtd: the rvirt management daemon (libvirtd's role).

use clap::Parser;
use rvirtd::manager::Config;
use rvirtd::server::{run, Options};
use std::io::IsTerminal;
use std::path::PathBuf;

/// rvirt's management daemon: persistent libvirt-XML domains, lifecycle and supervision of
/// rvirt-vmm processes, served as a REST API on a unix socket.
///
/// Running VMs survive a daemon stop or crash: the next rvirtd re-attaches to them.
#[derive(Parser, Debug)]
#[command(name = "rvirtd", version)]
struct Args {
    /// API socket path.
    #[arg(long, default_value = "/run/rvirt/rvirtd.sock")]
    socket: PathBuf,
    /// Permission bits of the API socket (octal); 660 lets a group use it.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Persistent state: domain definitions, autostart links, logs.
    #[arg(long, default_value = "/var/lib/rvirt")]
    state_dir: PathBuf,
    /// Runtime files: one directory per running domain (VMM pid record and sockets).
    #[arg(long, default_value = "/run/rvirt")]
    run_dir: PathBuf,
    /// The rvirt-vmm executable (default: next to rvirtd, else from PATH).
    #[arg(long, env = "RVIRT_VMM")]
    vmm_binary: Option<PathBuf>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{s}' is not an octal mode like 600"))
}

fn default_vmm() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("rvirt-vmm")));
    match beside {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("rvirt-vmm"),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RVIRTD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: the log is usually a file (a service's journal, a test's
        // log), where escape sequences are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let opts = Options {
        config: Config {
            state_dir: args.state_dir,
            run_dir: args.run_dir,
            vmm_binary: args.vmm_binary.unwrap_or_else(default_vmm),
        },
        socket: args.socket,
        socket_mode: args.socket_mode,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rvirtd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rvirtd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
