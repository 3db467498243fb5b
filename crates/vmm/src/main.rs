//! `rvirt-vmm`: one process per VM on /dev/kvm. See docs/vmm.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    rvirt_vmm::run_main()
}
