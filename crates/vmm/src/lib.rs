//! rvirt-vmm: the virtual machine monitor library.
//!
//! One process per VM: parse the command line ([`cli`]), lay out guest memory and load the
//! kernel ([`boot`]), create the VM and its vCPUs on /dev/kvm ([`vm`]) and emulate the few
//! legacy devices a Linux guest needs ([`devices`]). docs/vmm.md is the user reference.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod interrupts;
pub mod layout;
pub mod term;
pub mod vm;

use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Instant;

use clap::Parser;

static START: OnceLock<Instant> = OnceLock::new();

/// Time the process started (first thing `main` does), for the boot-timer port.
pub fn start_instant() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Entry point of the `rvirt-vmm` binary: parse, run, map the outcome to an exit status.
pub fn run_main() -> ExitCode {
    start_instant();
    let args = match cli::Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage {
                rvirt_api::vmm::exit_code::USAGE as u8
            } else {
                0
            });
        }
    };
    let cfg = cli::from_args(&args).inspect(|cfg| {
        for w in cli::not_applied(cfg) {
            eprintln!("rvirt-vmm: warning: {w}");
        }
    });
    match cfg.and_then(vm::run) {
        Ok(reason) => {
            eprintln!("rvirt-vmm: VM stopped: {reason:?}");
            ExitCode::from(reason.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("rvirt-vmm: error: {e:#}");
            ExitCode::from(rvirt_api::vmm::exit_code::VMM_ERROR as u8)
        }
    }
}
