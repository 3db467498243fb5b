//! PCI hotplug on the root bus: the controller behind the DSDT's slot devices, and that AML.
//!
//! Register block (port I/O, [`REG_LEN`] bytes, little-endian dwords; any access width, each
//! byte is handled on its own), bit n = slot n:
//!
//! | offset | name | read | write |
//! |---|---|---|---|
//! | 0 | `PCIU` | slots that came up since the last read; **reading clears** the bits read | ignored |
//! | 4 | `PCID` | slots the VMM wants removed since the last read; **reading clears** | ignored |
//! | 8 | `B0EJ` | 0 | 1 bits eject those slots (honoured only after [`PciHotplug::unplug`]) |
//! | 12 | `PSEG` | 0 (the only segment) | reserved for a segment selector: ignored |
//!
//! `PCNT` notifies nothing unless `PSEG` reads 0: an I/O port no device decodes reads all
//! ones, and `PCIU`/`PCID` of all ones would ask the guest to eject every slot.
//!
//! Slots 1..=31 are hotpluggable; slot 0 is the host bridge.
//!
//! AML: `\_SB.PHPR` (PNP0A06; [`controller_aml`]) holds the region, the fields, the mutex
//! `BLCK` and `PCEJ(slot)` (writes `B0EJ`); inside `\_SB.PCI0` ([`pci0_aml`]) there is one
//! `Device (Sxx)` per slot (`_ADR` = slot << 16, `_SUN` = slot, `_EJ0` → `PCEJ`), `DVNT(bits,
//! event)` notifying the slots in `bits`, and `PCNT`, which reads `PCIU` and `PCID` under
//! `BLCK` and notifies 1 (device check) for the slots that came up and 3 (eject request) for
//! the slots to remove. Linux's acpiphp picks the slots up because they have `_ADR` and `_EJ0`.

use acpi_tables::aml::{
    self, Acquire, And, Device, Equal, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule,
    If, Local, Method, MethodCall, Name, Path, Release, Return, ShiftLeft, Store,
};
use acpi_tables::Aml;
use rvirt_devices::guest_warn;

use super::{
    aml_seq, notify_method, read_bytes, ControllerAml, EjectHandler, HotplugError, RawAml,
};
use crate::bus::BusDevice;

/// Length of the register block.
pub const REG_LEN: u64 = 16;
/// Slots on the root bus.
pub const SLOTS: u32 = 32;
/// The hotpluggable slots as a bitmap (all but slot 0, the host bridge).
pub const HOTPLUG_SLOTS: u32 = !1;

/// The PCI hotplug controller of the root bus.
#[derive(Default)]
pub struct PciHotplug {
    /// Slots with a device the guest may use.
    occupied: u32,
    /// Pending "came up" events (PCIU).
    up: u32,
    /// Pending "remove" events (PCID).
    down: u32,
    /// Unplug requested, waiting for the guest's eject.
    removing: u32,
    on_eject: Option<EjectHandler>,
}

impl std::fmt::Debug for PciHotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHotplug")
            .field("occupied", &format_args!("{:#010x}", self.occupied))
            .field("up", &format_args!("{:#010x}", self.up))
            .field("down", &format_args!("{:#010x}", self.down))
            .field("removing", &format_args!("{:#010x}", self.removing))
            .finish_non_exhaustive()
    }
}

fn slot_bit(slot: u32) -> Result<u32, HotplugError> {
    if slot < SLOTS && HOTPLUG_SLOTS & (1 << slot) != 0 {
        Ok(1 << slot)
    } else {
        Err(HotplugError::BadSlot(slot))
    }
}

impl PciHotplug {
    /// A controller with every slot empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where guest ejects are reported (once per [`PciHotplug::unplug`]); see [`EjectHandler`].
    pub fn set_eject_handler(&mut self, handler: EjectHandler) {
        self.on_eject = Some(handler);
    }

    /// Records a device present at boot in `slot` (no event: the guest finds it by
    /// enumeration), so that it can be unplugged later.
    pub fn cold_plug(&mut self, slot: u32) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        if self.occupied & bit != 0 {
            return Err(HotplugError::SlotOccupied(slot));
        }
        self.occupied |= bit;
        Ok(())
    }

    /// A device was put in `slot` (it answers config cycles already): marks it up. The VMM
    /// raises [`super::ged::EVENT_PCI`] after.
    pub fn plug(&mut self, slot: u32) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        if self.removing & bit != 0 {
            return Err(HotplugError::SlotRemoving(slot));
        }
        if self.occupied & bit != 0 {
            return Err(HotplugError::SlotOccupied(slot));
        }
        self.occupied |= bit;
        self.up |= bit;
        Ok(())
    }

    /// Asks the guest to release the device in `slot`: marks it down. The VMM raises
    /// [`super::ged::EVENT_PCI`] after and removes the device from the bus only once the eject
    /// is reported.
    pub fn unplug(&mut self, slot: u32) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        if self.removing & bit != 0 {
            return Err(HotplugError::SlotRemoving(slot));
        }
        if self.occupied & bit == 0 {
            return Err(HotplugError::SlotEmpty(slot));
        }
        self.removing |= bit;
        self.down |= bit;
        Ok(())
    }

    /// Whether `slot` holds a device (plugged and not yet ejected).
    pub fn occupied(&self, slot: u32) -> bool {
        slot < SLOTS && self.occupied & (1 << slot) != 0
    }

    /// Whether `slot` was unplugged and the guest has not ejected it yet.
    pub fn removing(&self, slot: u32) -> bool {
        slot < SLOTS && self.removing & (1 << slot) != 0
    }

    fn eject(&mut self, bits: u32) {
        let refused = bits & !self.removing;
        if refused != 0 {
            guest_warn!(
                "pci hotplug: guest ejects slots {refused:#x}, which were not unplugged: ignored"
            );
        }
        let ejected = bits & self.removing;
        for slot in (0..SLOTS).filter(|s| ejected & (1 << s) != 0) {
            let bit = 1 << slot;
            self.occupied &= !bit;
            self.removing &= !bit;
            self.up &= !bit;
            self.down &= !bit;
            log::info!("pci hotplug: guest ejected slot {slot}");
            if let Some(h) = &self.on_eject {
                h(slot);
            }
        }
    }
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (up, down) = (&mut self.up, &mut self.down);
        read_bytes(offset, data, |o| {
            let reg = match o {
                0..=3 => &mut *up,
                4..=7 => &mut *down,
                _ => return 0,
            };
            let shift = (o % 4) * 8;
            let b = (*reg >> shift) as u8;
            *reg &= !(0xff << shift);
            b
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut eject = 0u32;
        for (i, &b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(o @ 8..=11) => eject |= u32::from(b) << ((o - 8) * 8),
                Some(12..=15) if b == 0 => {}
                _ => guest_warn!("pci hotplug: write {b:#x} at offset {offset:#x}+{i} ignored"),
            }
        }
        if eject != 0 {
            self.eject(eject);
        }
    }
}

/// The name segment of `slot`'s device under `\_SB.PCI0`: `S01_`..`S1F_` (shown as
/// `S01`..`S1F` by ASL, which pads short names with `_`).
pub fn slot_name(slot: u32) -> String {
    format!("S{slot:02X}_")
}

const BLCK: &str = "\\_SB_.PHPR.BLCK";
const PCIU: &str = "\\_SB_.PHPR.PCIU";
const PCID: &str = "\\_SB_.PHPR.PCID";
const PCEJ: &str = "\\_SB_.PHPR.PCEJ";
const PSEG: &str = "\\_SB_.PHPR.PSEG";

/// `\_SB` child: the `PHPR` device for the controller at I/O port `port`.
pub fn controller_aml(port: u16) -> Vec<u8> {
    let fields = aml::Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
            FieldEntry::Named(*b"PSEG", 32),
        ],
    );
    // PCEJ(slot): B0EJ = 1 << slot.
    let ones: u16 = 0xffff;
    let acquire = Acquire::new("BLCK".into(), ones);
    let release = Release::new("BLCK".into());
    let one = aml::ONE;
    let zero = aml::ZERO;
    let a0 = aml::Arg(0);
    let b0ej = Path::new("B0EJ");
    let bit = ShiftLeft::new(&b0ej, &one, &a0);
    let ret = Return::new(&zero);
    let pcej = Method::new("PCEJ".into(), 1, true, vec![&acquire, &bit, &release, &ret]);
    ControllerAml {
        name: "PHPR",
        uid: "PCI Hotplug Controller",
        port,
        len: REG_LEN as u8,
        mutex: "BLCK",
        region: "PCST",
    }
    .encode(&[&fields, &pcej])
}

/// `\_SB.PCI0` children: the slot devices `S01`..`S1F`, `DVNT` and `PCNT`.
pub fn pci0_aml() -> Vec<u8> {
    let slots: Vec<u32> = (0..SLOTS)
        .filter(|s| HOTPLUG_SLOTS & (1 << s) != 0)
        .collect();
    let devices: Vec<RawAml> = slots.iter().map(|&s| RawAml(slot_device(s))).collect();

    // DVNT(bits, event): Notify(Sxx, event) for each slot in bits.
    let a0 = aml::Arg(0);
    let zero = aml::ZERO;
    let masks: Vec<u32> = slots.iter().map(|s| 1 << s).collect();
    let tests: Vec<And> = masks.iter().map(|m| And::new(&zero, &a0, m)).collect();
    let dvnt = notify_method(
        "DVNT",
        tests
            .iter()
            .zip(&slots)
            .map(|(t, &s)| (t as &dyn Aml, slot_name(s))),
    );

    // PCNT: read both bitmaps (clear on read) under BLCK, then notify.
    let ones: u16 = 0xffff;
    let acquire = Acquire::new(BLCK.into(), ones);
    let release = Release::new(BLCK.into());
    let (l0, l1) = (Local(0), Local(1));
    let pciu = Path::new(PCIU);
    let pcid = Path::new(PCID);
    let get_up = Store::new(&l0, &pciu);
    let get_down = Store::new(&l1, &pcid);
    let pseg = Path::new(PSEG);
    let present = Equal::new(&pseg, &zero);
    let l0_zero = Store::new(&l0, &zero);
    let l1_zero = Store::new(&l1, &zero);
    let read = If::new(&present, vec![&get_up, &get_down]);
    let absent = aml::Else::new(vec![&l0_zero, &l1_zero]);
    let dev_check: u8 = 1;
    let eject_req: u8 = 3;
    let n_up = MethodCall::new("DVNT".into(), vec![&l0, &dev_check]);
    let n_down = MethodCall::new("DVNT".into(), vec![&l1, &eject_req]);
    let pcnt = Method::new(
        "PCNT".into(),
        0,
        true,
        vec![&acquire, &read, &absent, &release, &n_up, &n_down],
    );

    let mut items: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    items.push(&dvnt);
    items.push(&pcnt);
    aml_seq(&items)
}

/// `Device (Sxx)` for `slot`.
fn slot_device(slot: u32) -> Vec<u8> {
    let adr = slot << 16;
    let n_adr = Name::new("_ADR".into(), &adr);
    let n_sun = Name::new("_SUN".into(), &slot);
    let pcej = MethodCall::new(PCEJ.into(), vec![&slot]);
    let ej0 = Method::new("_EJ0".into(), 1, false, vec![&pcej]);
    aml_seq(&[&Device::new(
        slot_name(slot).as_str().into(),
        vec![&n_adr, &n_sun, &ej0],
    )])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn ejects(c: &mut PciHotplug) -> Arc<Mutex<Vec<u32>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        c.set_eject_handler(Box::new(move |slot| s.lock().unwrap().push(slot)));
        seen
    }

    fn reg(c: &mut PciHotplug, off: u64) -> u32 {
        let mut d = [0xffu8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn plug_raises_up_once_and_reading_clears_it() {
        let mut c = PciHotplug::new();
        c.plug(3).unwrap();
        c.plug(5).unwrap();
        assert_eq!(c.plug(3), Err(HotplugError::SlotOccupied(3)));
        assert_eq!(reg(&mut c, 0), (1 << 3) | (1 << 5));
        assert_eq!(reg(&mut c, 0), 0, "PCIU clears on read");
        assert_eq!(reg(&mut c, 4), 0);
        assert!(c.occupied(3) && c.occupied(5) && !c.occupied(4));
    }

    #[test]
    fn byte_reads_clear_only_the_bytes_read() {
        let mut c = PciHotplug::new();
        c.plug(1).unwrap();
        c.plug(9).unwrap();
        let mut b = [0u8];
        c.read(1, &mut b);
        assert_eq!(b[0], 1 << 1);
        assert_eq!(reg(&mut c, 0), 1 << 1);
    }

    #[test]
    fn slot_numbers_are_checked() {
        let mut c = PciHotplug::new();
        for s in [0, 32, 1000, u32::MAX] {
            assert_eq!(c.plug(s), Err(HotplugError::BadSlot(s)));
            assert_eq!(c.unplug(s), Err(HotplugError::BadSlot(s)));
            assert!(!c.occupied(s) && !c.removing(s));
        }
        assert_eq!(c.unplug(4), Err(HotplugError::SlotEmpty(4)));
        c.cold_plug(4).unwrap();
        assert_eq!(c.cold_plug(4), Err(HotplugError::SlotOccupied(4)));
        assert_eq!(reg(&mut c, 0), 0, "cold plug raises no event");
    }

    #[test]
    fn unplug_then_eject_is_reported_once() {
        let mut c = PciHotplug::new();
        let seen = ejects(&mut c);
        c.cold_plug(2).unwrap();
        c.cold_plug(6).unwrap();
        c.unplug(2).unwrap();
        c.unplug(6).unwrap();
        assert_eq!(c.unplug(2), Err(HotplugError::SlotRemoving(2)));
        assert_eq!(c.plug(2), Err(HotplugError::SlotRemoving(2)));
        assert_eq!(reg(&mut c, 4), (1 << 2) | (1 << 6));
        assert_eq!(reg(&mut c, 4), 0);
        assert!(c.occupied(2) && c.removing(2));
        // The guest ejects slot 6 first, then 2 (what _EJ0 → PCEJ writes).
        c.write(8, &(1u32 << 6).to_le_bytes());
        c.write(8, &(1u32 << 2).to_le_bytes());
        c.write(8, &(1u32 << 2).to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![6, 2]);
        assert!(!c.occupied(2) && !c.removing(2) && !c.occupied(6));
        // The slot can be reused.
        c.plug(2).unwrap();
        assert_eq!(reg(&mut c, 0), 1 << 2);
    }

    #[test]
    fn ejects_of_slots_not_unplugged_are_ignored() {
        let mut c = PciHotplug::new();
        let seen = ejects(&mut c);
        c.cold_plug(3).unwrap();
        c.unplug(4).unwrap_err();
        c.write(8, &u32::MAX.to_le_bytes());
        assert!(seen.lock().unwrap().is_empty());
        assert!(c.occupied(3));
        // Only the unplugged one of several set bits goes.
        c.cold_plug(7).unwrap();
        c.unplug(7).unwrap();
        c.write(8, &((1u32 << 3) | (1 << 7) | 1).to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![7]);
        assert!(c.occupied(3));
    }

    #[test]
    fn guest_garbage_is_ignored() {
        let mut c = PciHotplug::new();
        let seen = ejects(&mut c);
        c.plug(1).unwrap();
        c.write(0, &[0xff; 8]);
        c.write(12, &[1, 2, 3, 4]);
        c.write(16, &[1]);
        c.write(u64::MAX, &[0xff, 0xff]);
        let mut d = [0xffu8; 4];
        c.read(u64::MAX - 2, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(reg(&mut c, 8), 0);
        assert_eq!(reg(&mut c, 12), 0);
        assert_eq!(reg(&mut c, 0), 1 << 1);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn plug_and_unplug_before_the_guest_looks_give_both_events() {
        let mut c = PciHotplug::new();
        c.plug(8).unwrap();
        c.unplug(8).unwrap();
        assert_eq!(reg(&mut c, 0), 1 << 8);
        assert_eq!(reg(&mut c, 4), 1 << 8);
    }

    #[test]
    fn aml_has_every_slot() {
        let a = pci0_aml();
        let has = |n: &[u8]| a.windows(n.len()).any(|w| w == n);
        assert!(has(b"S01_") && has(b"S1F_") && has(b"PCNT") && has(b"DVNT"));
        assert!(!has(b"S00_"));
        let c = controller_aml(0xce8);
        let has = |n: &[u8]| c.windows(n.len()).any(|w| w == n);
        assert!(has(b"PHPR") && has(b"B0EJ") && has(b"PCEJ"));
    }
}
