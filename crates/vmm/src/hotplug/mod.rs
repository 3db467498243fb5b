//! ACPI hotplug: the platform devices and the AML behind vCPU hotplug and PCI hotplug on the
//! root bus.
//!
//! Three port-I/O devices, each a [`crate::bus::BusDevice`]:
//!
//! - [`cpu::CpuHotplug`] at [`crate::layout::ports::CPU_HOTPLUG`]: a selector / flags /
//!   command register block in the style of QEMU's "modern" CPU hotplug interface; the DSDT's
//!   `\_SB.CPUS.CSCN` walks it and notifies the `Cxxx` processor devices.
//! - [`pci::PciHotplug`] at [`crate::layout::ports::PCI_HOTPLUG`]: slot-up / slot-down bitmaps
//!   and an eject register (the `PCIU` / `PCID` / `B0EJ` design); `\_SB.PCI0.PCNT` notifies
//!   the `Sxx` slot devices.
//! - [`ged::Ged`] at [`crate::layout::ports::GED`]: the event selector of the ACPI Generic
//!   Event Device (`ACPI0013`) whose interrupt is [`crate::layout::GED_GSI`]; its `_EVT` reads
//!   the selector and runs the scans above.
//!
//! The VMM flow for a hot-add: create the backend (vCPU thread / PCI device on the bus), then
//! `plug()` on the controller, then [`ged::Ged::notify`] with the matching event bit. For a
//! hot-remove: `unplug()`, then `notify`; the guest offlines the device and evaluates `_EJ0`,
//! which the controller reports exactly once through its eject handler; only then does the VMM
//! tear the backend down. docs/vmm.md ("Hotplug") has the whole contract.

pub mod cpu;
pub mod ged;
pub mod pci;

use acpi_tables::aml::{
    self, AmlStr, Device, EISAName, If, Method, Name, Notify, OpRegion, OpRegionSpace, Path,
    ResourceTemplate, IO,
};
use acpi_tables::{Aml, AmlSink};

/// A refusal of a hotplug request from the VMM (never caused by the guest: guest accesses
/// that make no sense are ignored and logged, rate-limited).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// The vCPU count is not possible: `boot` must be 1..=`max`, `max` at most the limit.
    #[error("vCPU counts boot={boot} max={max} are not possible (1 <= boot <= max <= {limit})")]
    BadVcpuCount { boot: u32, max: u32, limit: u32 },
    /// The vCPU id is not below the maximum.
    #[error("vCPU {id} is out of range (max {max})")]
    NoSuchVcpu { id: u32, max: u32 },
    /// The vCPU is already present.
    #[error("vCPU {0} is already present")]
    VcpuPresent(u32),
    /// The vCPU is not present.
    #[error("vCPU {0} is not present")]
    VcpuAbsent(u32),
    /// vCPU 0 (the bootstrap processor) cannot be removed.
    #[error("vCPU 0 cannot be unplugged")]
    Bsp,
    /// A removal of that vCPU is already waiting for the guest's eject.
    #[error("vCPU {0} is already being unplugged (waiting for the guest to eject it)")]
    VcpuRemoving(u32),
    /// The slot is not a hotpluggable root-bus slot (1..=31).
    #[error("PCI slot {0} cannot be hotplugged (slots 1..=31 can)")]
    BadSlot(u32),
    /// The slot is occupied.
    #[error("PCI slot {0} is occupied")]
    SlotOccupied(u32),
    /// The slot is empty.
    #[error("PCI slot {0} is empty")]
    SlotEmpty(u32),
    /// A removal from that slot is already waiting for the guest's eject.
    #[error("PCI slot {0} is already being unplugged (waiting for the guest to eject it)")]
    SlotRemoving(u32),
}

/// Called with the vCPU id or slot number the guest ejected. It runs on the vCPU thread that
/// wrote the eject register, with the controller's lock held: it must not lock the controller;
/// hand the id to the VMM (a channel send, an `EventFd` write) and return.
pub type EjectHandler = Box<dyn Fn(u32) + Send>;

/// Already-encoded AML bytes, to nest inside `acpi_tables::aml` containers.
pub struct RawAml(pub Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Encodes `items` one after the other.
pub(crate) fn aml_seq(items: &[&dyn Aml]) -> Vec<u8> {
    let mut v = Vec::new();
    for i in items {
        i.to_aml_bytes(&mut v);
    }
    v
}

/// The `\_SB` device of a hotplug controller at I/O port `port`: `_HID` PNP0A06, `_UID` `uid`,
/// `_CRS` the `len` ports, `_STA` 0x0b, the mutex `mutex` and the SystemIO operation region
/// `region` over the ports, followed by `rest` (the region's fields and the methods).
pub(crate) struct ControllerAml<'a> {
    pub name: &'a str,
    pub uid: AmlStr,
    pub port: u16,
    pub len: u8,
    pub mutex: &'a str,
    pub region: &'a str,
}

impl ControllerAml<'_> {
    pub(crate) fn encode(&self, rest: &[&dyn Aml]) -> Vec<u8> {
        let hid = EISAName::new("PNP0A06");
        let io = IO::new(self.port, self.port, 1, self.len);
        let crs = ResourceTemplate::new(vec![&io]);
        let sta: u8 = 0x0b;
        let n_hid = Name::new("_HID".into(), &hid);
        let n_uid = Name::new("_UID".into(), &self.uid);
        let n_crs = Name::new("_CRS".into(), &crs);
        let n_sta = Name::new("_STA".into(), &sta);
        let mutex = aml::Mutex::new(self.mutex.into(), 0);
        let base = u32::from(self.port);
        let len = u32::from(self.len);
        let region = OpRegion::new(self.region.into(), OpRegionSpace::SystemIO, &base, &len);
        let mut children: Vec<&dyn Aml> = vec![&n_hid, &n_uid, &n_crs, &n_sta, &mutex, &region];
        children.extend_from_slice(rest);
        aml_seq(&[&Device::new(self.name.into(), children)])
    }
}

/// `Method (name, 2)` that runs `Notify (device, Arg1)` for each `(condition, device)` whose
/// condition (a test of Arg0) holds.
pub(crate) fn notify_method<'a>(
    name: &str,
    cases: impl IntoIterator<Item = (&'a dyn Aml, String)>,
) -> RawAml {
    let a1 = aml::Arg(1);
    let (conds, devices): (Vec<&dyn Aml>, Vec<Path>) =
        cases.into_iter().map(|(c, d)| (c, Path::new(&d))).unzip();
    let notifies: Vec<Notify> = devices.iter().map(|d| Notify::new(d, &a1)).collect();
    let ifs: Vec<If> = conds
        .iter()
        .zip(&notifies)
        .map(|(&c, n)| If::new(c, vec![n]))
        .collect();
    let method = Method::new(
        name.into(),
        2,
        false,
        ifs.iter().map(|i| i as &dyn Aml).collect(),
    );
    RawAml(aml_seq(&[&method]))
}

/// A read at `offset` of a device whose registers are handled byte by byte: `data[i]` comes
/// from `byte(offset + i)`; offsets that overflow read 0.
pub(crate) fn read_bytes(offset: u64, data: &mut [u8], mut byte: impl FnMut(u64) -> u8) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = offset.checked_add(i as u64).map(&mut byte).unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Mutex};

    use super::cpu::{self, CpuHotplug};
    use super::ged::{self, Ged};
    use super::pci::{self, PciHotplug};
    use crate::bus::Bus;
    use crate::layout::ports;

    fn inl(bus: &Bus, port: u16) -> u32 {
        let mut d = [0u8; 4];
        assert!(bus.read(port.into(), &mut d), "nothing at {port:#x}");
        u32::from_le_bytes(d)
    }

    fn inb(bus: &Bus, port: u16) -> u8 {
        let mut d = [0u8; 1];
        assert!(bus.read(port.into(), &mut d), "nothing at {port:#x}");
        d[0]
    }

    fn out(bus: &Bus, port: u16, data: &[u8]) {
        assert!(bus.write(port.into(), data), "nothing at {port:#x}");
    }

    /// The three devices at their layout ports on one bus, driven the way the AML drives them:
    /// a vCPU hot-add and hot-remove and a PCI hot-add and hot-remove, with the ejects reaching
    /// the VMM's channels.
    #[test]
    fn hotplug_flows_through_the_port_bus() {
        let bus = Bus::new();
        let irqs = Arc::new(AtomicUsize::new(0));
        let i = irqs.clone();
        let ged = Arc::new(Mutex::new(Ged::new(Box::new(move || {
            i.fetch_add(1, Ordering::SeqCst);
        }))));
        let mut c = CpuHotplug::new(1, 4).unwrap();
        let (cpu_tx, cpu_rx) = mpsc::channel();
        c.set_eject_handler(Box::new(move |id| cpu_tx.send(id).unwrap()));
        let cpus = Arc::new(Mutex::new(c));
        let mut p = PciHotplug::new();
        let (pci_tx, pci_rx) = mpsc::channel();
        p.set_eject_handler(Box::new(move |s| pci_tx.send(s).unwrap()));
        p.cold_plug(1).unwrap();
        let slots = Arc::new(Mutex::new(p));
        bus.insert(ports::CPU_HOTPLUG.into(), cpu::REG_LEN, cpus.clone())
            .unwrap();
        bus.insert(ports::GED.into(), ged::REG_LEN, ged.clone())
            .unwrap();
        bus.insert(ports::PCI_HOTPLUG.into(), pci::REG_LEN, slots.clone())
            .unwrap();
        // The block ends right below the PCI configuration address port.
        assert_eq!(u64::from(ports::PCI_HOTPLUG) + pci::REG_LEN, 0xcf8);
        let cpu_sel = ports::CPU_HOTPLUG;
        let cpu_flags = ports::CPU_HOTPLUG + 4;

        // vCPU 2 hot-add.
        cpus.lock().unwrap().plug(2).unwrap();
        ged.lock().unwrap().notify(ged::EVENT_CPU);
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
        assert_eq!(inl(&bus, ports::GED), ged::EVENT_CPU);
        assert_eq!(inl(&bus, ports::GED), 0);
        out(&bus, cpu_sel, &0u32.to_le_bytes());
        out(&bus, ports::CPU_HOTPLUG + 5, &[cpu::CMD_NEXT_EVENT]);
        assert_eq!(inl(&bus, ports::CPU_HOTPLUG + 8), 2);
        out(&bus, cpu_sel, &2u32.to_le_bytes());
        assert_eq!(inb(&bus, cpu_flags), cpu::FLAG_ENABLED | cpu::FLAG_INSERT);
        out(&bus, cpu_flags, &[cpu::FLAG_INSERT]);
        assert_eq!(inb(&bus, cpu_flags), cpu::FLAG_ENABLED);

        // vCPU 2 hot-remove: nothing is reported before the guest's _EJ0.
        cpus.lock().unwrap().unplug(2).unwrap();
        ged.lock().unwrap().notify(ged::EVENT_CPU);
        assert_eq!(inl(&bus, ports::GED), ged::EVENT_CPU);
        assert_eq!(inb(&bus, cpu_flags), cpu::FLAG_ENABLED | cpu::FLAG_REMOVE);
        out(&bus, cpu_flags, &[cpu::FLAG_REMOVE]);
        assert!(cpu_rx.try_recv().is_err());
        out(&bus, cpu_flags, &[cpu::FLAG_EJECT]);
        assert_eq!(cpu_rx.try_recv(), Ok(2));
        assert!(cpu_rx.try_recv().is_err());
        assert_eq!(inb(&bus, cpu_flags), 0);

        // PCI slot 4 hot-add, slot 1 (cold-plugged) hot-remove, in one GED event.
        slots.lock().unwrap().plug(4).unwrap();
        slots.lock().unwrap().unplug(1).unwrap();
        ged.lock().unwrap().notify(ged::EVENT_PCI);
        assert_eq!(irqs.load(Ordering::SeqCst), 3);
        assert_eq!(inl(&bus, ports::GED), ged::EVENT_PCI);
        assert_eq!(inl(&bus, ports::PCI_HOTPLUG + 12), 0, "PSEG");
        assert_eq!(inl(&bus, ports::PCI_HOTPLUG), 1 << 4);
        assert_eq!(inl(&bus, ports::PCI_HOTPLUG + 4), 1 << 1);
        assert!(pci_rx.try_recv().is_err());
        out(&bus, ports::PCI_HOTPLUG + 8, &(1u32 << 1).to_le_bytes());
        assert_eq!(pci_rx.try_recv(), Ok(1));
        assert!(pci_rx.try_recv().is_err());
        assert!(!slots.lock().unwrap().occupied(1));
        assert!(slots.lock().unwrap().occupied(4));
    }
}
