//! The VMM's side of the rvirt-devices contract: MSI routing (GSIs + irqfds) and ioeventfds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use rvirt_devices::{InterruptError, IoEventRegistry, MsiMessage, MsiRouting, MsiVector};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First GSI handed out for MSI vectors (0–23 are the IOAPIC pins).
pub const FIRST_MSI_GSI: u32 = 24;
/// Last usable GSI.
pub const MAX_GSI: u32 = 4095;

fn hv(op: &str, e: kvm_ioctls::Error) -> InterruptError {
    InterruptError::Hypervisor {
        op: op.to_string(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

#[derive(Default)]
struct State {
    next_gsi: u32,
    free: Vec<u32>,
    msi: BTreeMap<u32, (MsiMessage, bool)>,
}

/// GSI routing table kept by the VMM; pushed whole on every change.
pub struct Routing {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

/// The legacy routes QEMU installs: PIC pins for GSI 0–15 (not 2), IOAPIC pins for 0–23 with
/// GSI 0 going to IOAPIC pin 2 (the MADT's IRQ0 → GSI2 override).
pub fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    let mut chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
        v.push(e);
    };
    for i in 0..16u32 {
        if i == 2 {
            continue;
        }
        if i < 8 {
            chip(i, KVM_IRQCHIP_PIC_MASTER, i);
        } else {
            chip(i, KVM_IRQCHIP_PIC_SLAVE, i - 8);
        }
    }
    for i in 0..24u32 {
        if i == 0 {
            chip(0, KVM_IRQCHIP_IOAPIC, 2);
        } else if i != 2 {
            chip(i, KVM_IRQCHIP_IOAPIC, i);
        }
    }
    v
}

impl Routing {
    /// New table; installs the legacy routes.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, InterruptError> {
        let r = Routing {
            vm,
            state: Mutex::new(State {
                next_gsi: FIRST_MSI_GSI,
                ..Default::default()
            }),
        };
        {
            let st = r.state.lock().unwrap_or_else(|e| e.into_inner());
            r.push(&st)?;
        }
        Ok(r)
    }

    fn push(&self, st: &State) -> Result<(), InterruptError> {
        let mut entries = legacy_routes();
        for (gsi, (msg, masked)) in &st.msi {
            if *masked {
                continue;
            }
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.address as u32;
            e.u.msi.address_hi = (msg.address >> 32) as u32;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::NoFreeGsi)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| hv("KVM_SET_GSI_ROUTING", e))
    }
}

impl MsiRouting for Routing {
    fn alloc_vector(&self) -> Result<MsiVector, InterruptError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = match st.free.pop() {
            Some(g) => g,
            None => {
                if st.next_gsi > MAX_GSI {
                    return Err(InterruptError::NoFreeGsi);
                }
                st.next_gsi += 1;
                st.next_gsi - 1
            }
        };
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|e| InterruptError::Hypervisor {
            op: "eventfd".into(),
            source: e,
        })?;
        self.vm
            .register_irqfd(&eventfd, gsi)
            .map_err(|e| hv("KVM_IRQFD", e))?;
        Ok(MsiVector { gsi, eventfd })
    }

    fn update_route(&self, gsi: u32, msg: MsiMessage, masked: bool) -> Result<(), InterruptError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.msi.insert(gsi, (msg, masked));
        self.push(&st)
    }

    fn free_vector(&self, v: MsiVector) {
        let _ = self.vm.unregister_irqfd(&v.eventfd, v.gsi);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.msi.remove(&v.gsi).is_some() {
            let _ = self.push(&st);
        }
        st.free.push(v.gsi);
    }
}

/// KVM_IOEVENTFD registrations for virtio notify addresses.
pub struct IoEvents {
    pub vm: Arc<VmFd>,
}

impl IoEventRegistry for IoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| hv("KVM_IOEVENTFD", e))
    }

    fn unregister(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| hv("KVM_IOEVENTFD (deassign)", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_match_qemu() {
        let r = legacy_routes();
        // 15 PIC routes + 23 IOAPIC routes.
        assert_eq!(r.len(), 15 + 23);
        // SAFETY: the entries were built as IRQCHIP routes, so `irqchip` is the live union field.
        let gsi0_ioapic = r
            .iter()
            .filter(|e| e.gsi == 0)
            .map(|e| unsafe { e.u.irqchip })
            .any(|c| c.irqchip == KVM_IRQCHIP_IOAPIC && c.pin == 2);
        assert!(gsi0_ioapic);
        assert!(!r.iter().any(|e| e.gsi == 2));
    }
}
