//! The KVM VM: /dev/kvm, the VM fd with its in-kernel irqchip and PIT, and guest memory
//! registered as memslots.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use rvirt_api::vmm_config::MemoryBacking;

use crate::boot::GuestMem;
use crate::layout::Machine;

/// A KVM VM with its memory.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub mem: GuestMem,
    /// How guest RAM is backed (reported by `info`).
    pub backing: crate::memory::Applied,
}

impl Vm {
    /// Opens /dev/kvm, creates the VM (irqchip, PIT, TSS) for up to `max_vcpus` vCPUs and
    /// `ram` bytes of guest memory backed as `backing` says, and registers the memory.
    pub fn new(
        machine: Machine,
        max_vcpus: u32,
        ram: u64,
        backing: &MemoryBacking,
    ) -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| {
            anyhow::anyhow!(
                "cannot open /dev/kvm ({e}): load the kvm module (kvm_intel/kvm_amd) and check the permissions of /dev/kvm"
            )
        })?;
        let max = kvm.get_max_vcpus();
        if max_vcpus as usize > max {
            bail!("--cpus {max_vcpus}: this host's KVM allows at most {max} vCPUs");
        }
        let fd = Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);
        fd.set_tss_address(machine.tss_addr() as usize)
            .context("KVM_SET_TSS_ADDR")?;
        if machine == Machine::Q35 {
            // KVM puts its identity map page just below the TSS unless told; on q35 that is
            // still outside the firmware window, but say where, as QEMU does.
            fd.set_identity_map_address(crate::layout::Q35_IDENTITY_MAP)
                .context("KVM_SET_IDENTITY_MAP_ADDR")?;
        }
        fd.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .context("KVM_CREATE_PIT2")?;
        let (mem, applied) = crate::memory::create(machine, ram, backing)?;
        log::debug!("guest RAM: {applied:?}");
        register_memory(&fd, &mem)?;
        Ok(Vm {
            kvm,
            fd,
            mem,
            backing: applied,
        })
    }

    /// An eventfd that raises `gsi` when written (KVM_IRQFD).
    pub fn irqfd(&self, gsi: u32, what: &str) -> Result<EventFd> {
        let e = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        self.fd
            .register_irqfd(&e, gsi)
            .with_context(|| format!("KVM_IRQFD for {what} (GSI {gsi})"))?;
        Ok(e)
    }
}

fn register_memory(vm: &VmFd, mem: &GuestMem) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the `Vm` keeps for as long as
        // the VM fd exists; its size is `region.len()`.
        unsafe { vm.set_user_memory_region(r) }
            .with_context(|| format!("KVM_SET_USER_MEMORY_REGION slot {slot}"))?;
    }
    Ok(())
}
