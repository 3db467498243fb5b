//! rvirt-vmm: the virtual machine monitor library.
//!
//! One process per VM: parse the command line ([`cli`]), lay out guest memory and load the
//! kernel ([`boot`]), create the KVM VM ([`vstate`]), its devices ([`device_manager`]: the
//! platform devices of [`legacy`] on a [`bus`], virtio on PCI) and its vCPU threads
//! ([`vcpu_manager`]), then run the control loop ([`vmm`]) that owns them all and answers
//! typed [`messages`] from the control socket ([`control`]), the vCPUs and the devices.
//! docs/vmm.md is the user reference.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod exits;
pub mod firmware;
pub mod hotplug;
pub mod interrupts;
pub mod layout;
pub mod legacy;
pub mod logger;
pub mod memory;
pub mod messages;
pub mod signals;
pub mod term;
pub mod threads;
pub mod vcpu_manager;
pub mod vmm;
pub mod vstate;

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
    match cfg.and_then(vmm::run) {
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
