//! The ACPI Generic Event Device (`ACPI0013`): one interrupt and an event selector that tells
//! its `_EVT` method which hotplug scans to run.
//!
//! Register (port I/O, [`REG_LEN`] bytes): a little-endian dword of pending event bits
//! ([`EVENT_CPU`], [`EVENT_PCI`]); **reading clears** the bits read; writes are ignored.
//!
//! AML ([`aml()`]): `\_SB.GED_` with `_HID "ACPI0013"`, `_CRS` = one extended interrupt
//! (edge-triggered, active high, exclusive) and `_EVT`, which reads the selector once and calls
//! `\_SB.CPUS.CSCN` for [`EVENT_CPU`] and `\_SB.PCI0.PCNT` for [`EVENT_PCI`]. Linux's GED
//! driver (drivers/acpi/evged.c, built in on every platform) requests the interrupt with a
//! threaded handler that evaluates `_EVT`; an edge that arrives while `_EVT` runs makes it run
//! again, so no event is lost: [`Ged::notify`] sets the bits before it raises the edge.
//!
//! The `_CRS` holds the interrupt only: evged walks every `_CRS` descriptor as an interrupt
//! and gives up on anything else.

use acpi_tables::aml::{
    self, And, Device, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Local,
    Method, MethodCall, Name, OpRegion, OpRegionSpace, Path, ResourceTemplate, Store,
};
use acpi_tables::Aml;
use rvirt_devices::guest_warn;
use vmm_sys_util::eventfd::EventFd;

use super::{aml_seq, read_bytes};
use crate::bus::BusDevice;

/// Length of the register.
pub const REG_LEN: u64 = 4;
/// Event: a vCPU was plugged or is to be unplugged (runs `\_SB.CPUS.CSCN`).
pub const EVENT_CPU: u32 = 1 << 0;
/// Event: a PCI slot on the root bus came up or is to be emptied (runs `\_SB.PCI0.PCNT`).
pub const EVENT_PCI: u32 = 1 << 1;
/// Every event bit defined.
pub const EVENTS: u32 = EVENT_CPU | EVENT_PCI;

/// Raises the GED interrupt (one edge).
pub type GedTrigger = Box<dyn Fn() + Send>;

/// The Generic Event Device's selector and interrupt.
pub struct Ged {
    pending: u32,
    trigger: GedTrigger,
}

impl std::fmt::Debug for Ged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ged")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Ged {
    /// A GED that calls `trigger` to raise its interrupt.
    pub fn new(trigger: GedTrigger) -> Self {
        Ged {
            pending: 0,
            trigger,
        }
    }

    /// A GED whose interrupt is an irqfd: `irq` is registered with `KVM_IRQFD` on
    /// [`crate::layout::GED_GSI`].
    pub fn with_eventfd(irq: EventFd) -> Self {
        Self::new(Box::new(move || {
            if let Err(e) = irq.write(1) {
                log::warn!("GED: cannot raise the interrupt: {e}");
            }
        }))
    }

    /// Sets `events` (bits outside [`EVENTS`] are dropped) and raises the interrupt. Call it
    /// after the controller's `plug` / `unplug`.
    pub fn notify(&mut self, events: u32) {
        let events = events & EVENTS;
        if events == 0 {
            return;
        }
        self.pending |= events;
        (self.trigger)();
    }

    /// The events the guest has not read yet.
    pub fn pending(&self) -> u32 {
        self.pending
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let pending = &mut self.pending;
        read_bytes(offset, data, |o| {
            if o >= REG_LEN {
                return 0;
            }
            let shift = o * 8;
            let b = (*pending >> shift) as u8;
            *pending &= !(0xff << shift);
            b
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        guest_warn!(
            "GED: write of {} bytes at offset {offset:#x} ignored",
            data.len()
        );
    }
}

/// `\_SB` child: `GED_` with its interrupt on `gsi`, the selector at I/O port `port`, and an
/// `_EVT` that runs the CPU scan when `cpu` and the PCI scan when `pci` (only the scans whose
/// AML is in the DSDT).
pub fn aml(port: u16, gsi: u32, cpu: bool, pci: bool) -> Vec<u8> {
    let hid: aml::AmlStr = "ACPI0013";
    let n_hid = Name::new("_HID".into(), &hid);
    let zero = aml::ZERO;
    let n_uid = Name::new("_UID".into(), &zero);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = ResourceTemplate::new(vec![&irq]);
    let n_crs = Name::new("_CRS".into(), &crs);
    let base = u32::from(port);
    let len = REG_LEN as u32;
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &base, &len);
    let field = aml::Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let l0 = Local(0);
    let gdat = Path::new("GDAT");
    let read = Store::new(&l0, &gdat);
    let cpu_bit = And::new(&zero, &l0, &EVENT_CPU);
    let cscn = MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![]);
    let if_cpu = If::new(&cpu_bit, vec![&cscn]);
    let pci_bit = And::new(&zero, &l0, &EVENT_PCI);
    let pcnt = MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let if_pci = If::new(&pci_bit, vec![&pcnt]);
    let mut body: Vec<&dyn Aml> = vec![&read];
    if cpu {
        body.push(&if_cpu);
    }
    if pci {
        body.push(&if_pci);
    }
    let evt = Method::new("_EVT".into(), 1, true, body);
    aml_seq(&[&Device::new(
        "GED_".into(),
        vec![&n_hid, &n_uid, &n_crs, &region, &field, &evt],
    )])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn counted() -> (Ged, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        let g = Ged::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        (g, n)
    }

    fn sel(g: &mut Ged) -> u32 {
        let mut d = [0xffu8; 4];
        g.read(0, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn notify_sets_bits_then_triggers_and_reading_clears() {
        let (mut g, n) = counted();
        g.notify(EVENT_CPU);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        g.notify(EVENT_PCI);
        assert_eq!(n.load(Ordering::SeqCst), 2);
        assert_eq!(g.pending(), EVENT_CPU | EVENT_PCI);
        assert_eq!(sel(&mut g), EVENT_CPU | EVENT_PCI);
        assert_eq!(sel(&mut g), 0);
    }

    #[test]
    fn unknown_bits_and_empty_notifies_do_nothing() {
        let (mut g, n) = counted();
        g.notify(0);
        g.notify(1 << 7);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        assert_eq!(sel(&mut g), 0);
    }

    #[test]
    fn guest_writes_and_odd_reads_are_harmless() {
        let (mut g, _) = counted();
        g.notify(EVENT_PCI);
        g.write(0, &[0xff; 4]);
        g.write(u64::MAX, &[1]);
        let mut d = [0xffu8; 2];
        g.read(u64::MAX - 1, &mut d);
        assert_eq!(d, [0, 0]);
        g.read(4, &mut d);
        assert_eq!(d, [0, 0]);
        assert_eq!(sel(&mut g), EVENT_PCI);
    }

    #[test]
    fn eventfd_trigger_fires() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut g = Ged::with_eventfd(fd.try_clone().unwrap());
        assert!(fd.read().is_err());
        g.notify(EVENT_CPU);
        assert_eq!(fd.read().unwrap(), 1);
    }

    #[test]
    fn evt_calls_only_the_scans_present() {
        let has = |a: &[u8], n: &[u8]| a.windows(n.len()).any(|w| w == n);
        let both = aml(0xce4, 5, true, true);
        assert!(has(&both, b"CSCN") && has(&both, b"PCNT") && has(&both, b"ACPI0013"));
        let pci = aml(0xce4, 5, false, true);
        assert!(!has(&pci, b"CSCN") && has(&pci, b"PCNT"));
    }
}
