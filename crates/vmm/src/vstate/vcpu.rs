//! One vCPU: its initial registers, CPUID, MSRs and LAPIC, and the thread-local kick that
//! makes a running `KVM_RUN` return (`immediate_exit` set from a signal handler).

use std::cell::Cell;

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_run, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::{self, BootEntry};
use crate::layout::*;

thread_local! {
    /// This thread's `kvm_run` while it runs a vCPU, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int) {
    // Only a thread-local read and a volatile store: async-signal-safe.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set by `bind_kick` and cleared
        // by `unbind_kick` before the VcpuFd (which owns the mapping) can be dropped.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler (once per process; repeated calls are harmless).
pub fn install_kick_handler() -> Result<()> {
    // SAFETY: a zeroed sigaction with a handler that only touches thread-local state is a
    // valid argument; no SA_RESTART so KVM_RUN returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            bail!("sigaction: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lets the kick handler reach `vcpu`'s `kvm_run` from this thread. A kick that arrives before
/// the next `KVM_RUN` makes it return at once, so no kick is ever lost.
pub fn bind_kick(vcpu: &mut VcpuFd) {
    let run: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|c| c.set(run));
}

/// Undoes [`bind_kick`]; call before the `VcpuFd` leaves this thread.
pub fn unbind_kick() {
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

fn segment(selector: u16, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

pub fn setup_boot_regs(vcpu: &VcpuFd, entry: BootEntry) -> Result<()> {
    if entry == BootEntry::Firmware {
        // The firmware starts from the architectural reset state KVM gives a new vCPU.
        return Ok(());
    }
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let long = matches!(entry, BootEntry::Linux64 { .. });
    let code = if long {
        segment(0x8, true, true)
    } else {
        segment(0x10, true, false)
    };
    let data = segment(0x18, false, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x20,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (boot::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rflags = 2;
    match entry {
        BootEntry::Pvh { entry } => {
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_START_INFO;
        }
        BootEntry::Linux64 { entry } => {
            sregs.cr3 = PML4;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = 0x500; // LME | LMA
            regs.rip = entry;
            regs.rsi = ZERO_PAGE;
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
        }
        BootEntry::Firmware => {}
    }
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    Ok(())
}

fn patch_cpuid(kvm: &Kvm, id: u32, ncpus: u32) -> Result<kvm_bindings::CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    if !crate::cpuid::patch(cpuid.as_mut_slice(), id, ncpus) {
        let _ = cpuid.push(crate::cpuid::hypervisor_leaf());
    }
    Ok(cpuid)
}

fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().context("KVM_GET_LAPIC")?;
    let get = |regs: &[libc::c_char], off: usize| -> u32 {
        u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ])
    };
    let put = |regs: &mut [libc::c_char], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as libc::c_char;
        }
    };
    let lint0 = get(&lapic.regs, 0x350);
    put(&mut lapic.regs, 0x350, (lint0 & !0x700) | (7 << 8)); // ExtINT
    let lint1 = get(&lapic.regs, 0x360);
    put(&mut lapic.regs, 0x360, (lint1 & !0x700) | (4 << 8)); // NMI
    vcpu.set_lapic(&lapic).context("KVM_SET_LAPIC")?;
    Ok(())
}

/// CPUID, MSRs, FPU and LAPIC LINT pins of vCPU `id` of `ncpus`. A kernel booted directly
/// gets MTRRs enabled with write-back as default (nobody else would program them); firmware
/// finds them off as after power-on, as OVMF's memory init expects, and programs them itself.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u32, ncpus: u32, entry: BootEntry) -> Result<()> {
    let cpuid = patch_cpuid(kvm, id, ncpus)?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
    let mut entries = vec![kvm_msr_entry {
        index: 0x1a0, // IA32_MISC_ENABLE: fast strings
        data: 1,
        ..Default::default()
    }];
    if entry != BootEntry::Firmware {
        entries.push(kvm_msr_entry {
            index: 0x2ff, // MTRRdefType: enabled, default write-back
            data: (1 << 11) | 6,
            ..Default::default()
        });
    }
    let msrs = Msrs::from_entries(&entries).map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
    vcpu.set_msrs(&msrs).context("KVM_SET_MSRS")?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).context("KVM_SET_FPU")?;
    set_lint(vcpu)?;
    Ok(())
}
