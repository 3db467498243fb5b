//! rvirt-kvm-probe: does this machine's /dev/kvm run guest code natively?
//!
//! Runs a tiny real-mode guest loop (400,000 instructions) on /dev/kvm and times it. Hardware
//! virtualization runs it in about a millisecond; software nested virtualization (such as PVM)
//! emulates it at around a million instructions per second, and some cannot run it at all.
//! Prints one line and exits 0 when guests run natively, 1 when they do not, 2 when there is no
//! usable /dev/kvm. scripts/demo uses it to choose between booting the demo guest directly and
//! booting it inside the test host VM.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

/// Iterations of the guest's `dec ecx; jnz` loop: two instructions each.
const ITERATIONS: u32 = 200_000;
/// Native KVM needs well under 1 ms for the loop; anything slower than this is emulation.
const NATIVE_LIMIT: Duration = Duration::from_millis(50);
const CODE_ADDR: u64 = 0x1000;
const MEM_SIZE: usize = 0x10000;

fn guest_code() -> Vec<u8> {
    let mut code = vec![0x66, 0xb9]; // mov ecx, imm32 (operand-size prefix: real mode)
    code.extend_from_slice(&ITERATIONS.to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0x49, // dec ecx
        0x75, 0xfc, // jnz back to dec
        0xf4, // hlt
    ]);
    code
}

fn probe() -> Result<Duration, String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    // SAFETY: an anonymous private mapping of MEM_SIZE bytes; the result is checked below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let code = guest_code();
    // SAFETY: `mem` is a fresh writable mapping of MEM_SIZE bytes and the code fits after
    // CODE_ADDR; nothing else references it yet.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            (mem as *mut u8).add(CODE_ADDR as usize),
            code.len(),
        );
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the mapping stays alive (never unmapped) for the life of the process, so for the VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => return Ok(start.elapsed()),
            Ok(exit) => return Err(format!("unexpected exit {exit:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
}

fn main() -> ExitCode {
    match probe() {
        Ok(t) => {
            let rate = f64::from(ITERATIONS) * 2.0 / t.as_secs_f64();
            let verdict = if t <= NATIVE_LIMIT {
                "native"
            } else {
                "emulated"
            };
            println!(
                "{verdict}: {} guest instructions in {:.1} ms ({:.1} M instructions/s)",
                ITERATIONS * 2,
                t.as_secs_f64() * 1000.0,
                rate / 1e6
            );
            if t <= NATIVE_LIMIT {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            println!("unusable: {e}");
            ExitCode::from(2)
        }
    }
}
