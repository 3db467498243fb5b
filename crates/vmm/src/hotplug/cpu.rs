//! vCPU hotplug: the controller the DSDT's processor devices talk to, and that AML.
//!
//! Register block (port I/O, [`REG_LEN`] bytes, little-endian; any access width, each byte
//! is handled on its own), modelled on QEMU's "modern" CPU hotplug interface:
//!
//! | offset | width | read | write |
//! |---|---|---|---|
//! | 0 | dword | selector | selector (`CSEL`): the vCPU the other registers refer to |
//! | 4 | byte | flags of the selected vCPU: bit 0 `CPEN` present, bit 1 `CINS` insert event pending, bit 2 `CRMV` remove event pending; bits 3–7 read 0 | bit 1 = 1 clears the insert event, bit 2 = 1 clears the remove event, bit 3 `CEJ0` = 1 ejects the selected vCPU (honoured only after [`CpuHotplug::unplug`]); bit 0 ignored |
//! | 5 | byte | 0 | command (`CCMD`): [`CMD_NEXT_EVENT`] |
//! | 6, 7 | | 0 | ignored |
//! | 8 | dword | command data (`CDAT`): the result of the last command | ignored |
//!
//! [`CMD_NEXT_EVENT`] puts in `CDAT` the lowest vCPU id ≥ the selector with an insert or remove
//! event pending, or `max` when there is none; the scan method uses it to skip idle vCPUs.
//! A selector ≥ `max` selects nothing: flags read 0, flag writes are ignored.
//!
//! The AML does not trust the port blindly: `CSTA` reports a vCPU present only when the
//! flags byte has bit 0 set *and* bits 3–7 clear (an I/O port no device decodes reads 0xFF,
//! which would otherwise make every possible vCPU look present), and `CSCN` ends after at
//! most `max` turns whatever `CDAT` says.
//!
//! AML ([`aml()`]): `\_SB.PRES` (PNP0A06) holds the operation region, its fields and the mutex
//! `CPLK`; `\_SB.CPUS` (ACPI0010) holds one `Device (Cxxx)` (ACPI0007, `_UID` = id, `C%03X`)
//! per possible vCPU with `_STA`, `_MAT` and (but for vCPU 0) `_EJ0`, and the methods `CSTA`
//! (status of vCPU Arg0), `CEJT` (eject vCPU Arg0), `CTFY` (Notify vCPU Arg0 with Arg1) and
//! `CSCN` (walk the pending events: insert → Notify 1 "device check", remove → Notify 3
//! "eject request", acknowledging each), all under `CPLK`.

use acpi_tables::aml::{
    self, Acquire, Add, AmlStr, And, BufferData, Device, EISAName, Equal, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, LessThan, Local, Method, MethodCall, Name,
    Path, Release, Return, Store, While,
};
use acpi_tables::Aml;
use rvirt_devices::guest_warn;

use super::{
    aml_seq, notify_method, read_bytes, ControllerAml, EjectHandler, HotplugError, RawAml,
};
use crate::bus::BusDevice;

/// Length of the register block.
pub const REG_LEN: u64 = 12;
/// Flags: the selected vCPU is present.
pub const FLAG_ENABLED: u8 = 1 << 0;
/// Flags: an insert event is pending (write 1 to acknowledge).
pub const FLAG_INSERT: u8 = 1 << 1;
/// Flags: a remove event is pending (write 1 to acknowledge).
pub const FLAG_REMOVE: u8 = 1 << 2;
/// Flags (write): eject the selected vCPU.
pub const FLAG_EJECT: u8 = 1 << 3;
/// Command: find the next vCPU with a pending event.
pub const CMD_NEXT_EVENT: u8 = 0;

/// Most vCPUs the controller and the tables describe: the processor devices are named
/// `C000`..`CFFF`, and the DSDT must fit in the 128 KiB ACPI area with everything else
/// ([`crate::acpi::write_tables`] checks the total).
pub const MAX_VCPUS: u32 = 0x1000;

/// MADT Local APIC / x2APIC flags: enabled.
pub const MADT_ENABLED: u32 = 1 << 0;
/// MADT Local APIC / x2APIC flags: online capable (ACPI 6.3; only meaningful when not enabled).
pub const MADT_ONLINE_CAPABLE: u32 = 1 << 1;

/// Highest APIC id described by a (one-byte) Local APIC entry; 0xFF is the broadcast id, so
/// larger ids get a Local x2APIC entry.
pub const MAX_XAPIC_ID: u32 = 254;

/// The MADT entry of vCPU `id` (APIC id and ACPI processor UID both = `id`): a Local APIC
/// (type 0, 8 bytes) up to [`MAX_XAPIC_ID`], a Local x2APIC (type 9, 16 bytes) above.
pub fn madt_entry(id: u32, flags: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    if id <= MAX_XAPIC_ID {
        v.extend_from_slice(&[0, 8, id as u8, id as u8]);
        v.extend_from_slice(&flags.to_le_bytes());
    } else {
        v.extend_from_slice(&[9, 16, 0, 0]);
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

#[derive(Debug, Default, Clone, Copy)]
struct Vcpu {
    present: bool,
    insert: bool,
    remove: bool,
    /// The VMM asked for removal; the guest's eject is honoured until it happens.
    unplugging: bool,
}

/// The vCPU hotplug controller: which of the `max` possible vCPUs are present, their pending
/// events, and the guest's ejects.
pub struct CpuHotplug {
    boot: u32,
    cpus: Vec<Vcpu>,
    selector: u32,
    data: u32,
    on_eject: Option<EjectHandler>,
}

impl std::fmt::Debug for CpuHotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuHotplug")
            .field("boot", &self.boot)
            .field("max", &self.max())
            .field("present", &self.present_ids())
            .field("selector", &self.selector)
            .finish_non_exhaustive()
    }
}

impl CpuHotplug {
    /// vCPUs `0..boot` present (no events pending), `boot..max` absent.
    pub fn new(boot: u32, max: u32) -> Result<Self, HotplugError> {
        if boot == 0 || boot > max || max > MAX_VCPUS {
            return Err(HotplugError::BadVcpuCount {
                boot,
                max,
                limit: MAX_VCPUS,
            });
        }
        let mut cpus = vec![Vcpu::default(); max as usize];
        for c in &mut cpus[..boot as usize] {
            c.present = true;
        }
        Ok(CpuHotplug {
            boot,
            cpus,
            selector: 0,
            data: 0,
            on_eject: None,
        })
    }

    /// Where guest ejects are reported (once per [`CpuHotplug::unplug`]); see [`EjectHandler`].
    pub fn set_eject_handler(&mut self, handler: EjectHandler) {
        self.on_eject = Some(handler);
    }

    /// vCPUs present at boot.
    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// Possible vCPUs.
    pub fn max(&self) -> u32 {
        self.cpus.len() as u32
    }

    /// Whether vCPU `id` is present (plugged and not yet ejected).
    pub fn present(&self, id: u32) -> bool {
        self.cpus.get(id as usize).is_some_and(|c| c.present)
    }

    /// Whether vCPU `id` was unplugged and the guest has not ejected it yet.
    pub fn unplugging(&self, id: u32) -> bool {
        self.cpus.get(id as usize).is_some_and(|c| c.unplugging)
    }

    /// The ids of the present vCPUs, ascending.
    pub fn present_ids(&self) -> Vec<u32> {
        (0..self.max()).filter(|&i| self.present(i)).collect()
    }

    fn cpu_mut(&mut self, id: u32) -> Result<&mut Vcpu, HotplugError> {
        let max = self.max();
        self.cpus
            .get_mut(id as usize)
            .ok_or(HotplugError::NoSuchVcpu { id, max })
    }

    /// Marks vCPU `id` present with an insert event pending. The VMM has created the vCPU
    /// (its thread runs, waiting for INIT/SIPI) before, and raises
    /// [`super::ged::EVENT_CPU`] after.
    pub fn plug(&mut self, id: u32) -> Result<(), HotplugError> {
        let c = self.cpu_mut(id)?;
        if c.unplugging {
            return Err(HotplugError::VcpuRemoving(id));
        }
        if c.present {
            return Err(HotplugError::VcpuPresent(id));
        }
        *c = Vcpu {
            present: true,
            insert: true,
            remove: false,
            unplugging: false,
        };
        Ok(())
    }

    /// Asks the guest to give vCPU `id` back: a remove event pending; the VMM raises
    /// [`super::ged::EVENT_CPU`] after, and stops the vCPU only once the eject is reported.
    pub fn unplug(&mut self, id: u32) -> Result<(), HotplugError> {
        if id == 0 {
            return Err(HotplugError::Bsp);
        }
        let c = self.cpu_mut(id)?;
        if c.unplugging {
            return Err(HotplugError::VcpuRemoving(id));
        }
        if !c.present {
            return Err(HotplugError::VcpuAbsent(id));
        }
        c.remove = true;
        c.unplugging = true;
        Ok(())
    }

    fn flags(&self) -> u8 {
        let Some(c) = self.cpus.get(self.selector as usize) else {
            return 0;
        };
        let mut f = 0;
        if c.present {
            f |= FLAG_ENABLED;
        }
        if c.insert {
            f |= FLAG_INSERT;
        }
        if c.remove {
            f |= FLAG_REMOVE;
        }
        f
    }

    fn write_flags(&mut self, v: u8) {
        let id = self.selector;
        let Some(c) = self.cpus.get_mut(id as usize) else {
            guest_warn!("cpu hotplug: flags write {v:#x} with selector {id} out of range");
            return;
        };
        if v & FLAG_INSERT != 0 {
            c.insert = false;
        }
        if v & FLAG_REMOVE != 0 {
            c.remove = false;
        }
        if v & FLAG_EJECT != 0 {
            if !c.unplugging {
                guest_warn!(
                    "cpu hotplug: guest ejects vCPU {id}, which was not unplugged: ignored"
                );
                return;
            }
            *c = Vcpu::default();
            log::info!("cpu hotplug: guest ejected vCPU {id}");
            if let Some(h) = &self.on_eject {
                h(id);
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_NEXT_EVENT => {
                let from = self.selector as usize;
                self.data = self
                    .cpus
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, c)| c.insert || c.remove)
                    .map_or(self.max(), |(i, _)| i as u32);
            }
            _ => guest_warn!("cpu hotplug: unknown command {cmd:#x} ignored"),
        }
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let sel = self.selector.to_le_bytes();
        let dat = self.data.to_le_bytes();
        let flags = self.flags();
        read_bytes(offset, data, |o| match o {
            0..=3 => sel[o as usize],
            4 => flags,
            8..=11 => dat[o as usize - 8],
            _ => 0,
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(o @ 0..=3) => {
                    let mut s = self.selector.to_le_bytes();
                    s[o as usize] = b;
                    self.selector = u32::from_le_bytes(s);
                }
                Some(4) => self.write_flags(b),
                Some(5) => self.command(b),
                Some(6..=11) => {}
                _ => guest_warn!("cpu hotplug: write at offset {offset:#x}+{i} ignored"),
            }
        }
    }
}

/// The name of vCPU `id`'s processor device (`C000`..`CFFF`).
pub fn device_name(id: u32) -> String {
    format!("C{id:03X}")
}

/// `\_SB` children for vCPU hotplug with `max` possible vCPUs (at most [`MAX_VCPUS`]) and the
/// controller at I/O port `port`: the `PRES` resource device and the `CPUS` container.
pub fn aml(max: u32, port: u16) -> Vec<u8> {
    let max = max.min(MAX_VCPUS);
    let pres = pres_aml(port);
    let cpus = cpus_aml(max);
    aml_seq(&[&RawAml(pres), &RawAml(cpus)])
}

const CPLK: &str = "\\_SB_.PRES.CPLK";
const CSEL: &str = "\\_SB_.PRES.CSEL";
const CFLG: &str = "\\_SB_.PRES.CFLG";
const CINS: &str = "\\_SB_.PRES.CINS";
const CRMV: &str = "\\_SB_.PRES.CRMV";
const CEJ0: &str = "\\_SB_.PRES.CEJ0";
const CCMD: &str = "\\_SB_.PRES.CCMD";
const CDAT: &str = "\\_SB_.PRES.CDAT";

fn pres_aml(port: u16) -> Vec<u8> {
    // WriteAsZeros: a write of one flag bit must not write back the other pending bits
    // (they are write-1-to-clear).
    let f_sel = aml::Field::new(
        "PRST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"CSEL", 32)],
    );
    let f_flags = aml::Field::new(
        "PRST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Reserved(32),
            FieldEntry::Named(*b"CPEN", 1),
            FieldEntry::Named(*b"CINS", 1),
            FieldEntry::Named(*b"CRMV", 1),
            FieldEntry::Named(*b"CEJ0", 1),
            FieldEntry::Reserved(4),
            FieldEntry::Named(*b"CCMD", 8),
        ],
    );
    // The whole flags byte, for CSTA's sanity check.
    let f_byte = aml::Field::new(
        "PRST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Reserved(32), FieldEntry::Named(*b"CFLG", 8)],
    );
    let f_data = aml::Field::new(
        "PRST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Reserved(64), FieldEntry::Named(*b"CDAT", 32)],
    );
    ControllerAml {
        name: "PRES",
        uid: "CPU Hotplug Controller",
        port,
        len: REG_LEN as u8,
        mutex: "CPLK",
        region: "PRST",
    }
    .encode(&[&f_sel, &f_flags, &f_byte, &f_data])
}

fn cpus_aml(max: u32) -> Vec<u8> {
    let hid: AmlStr = "ACPI0010";
    let cid = EISAName::new("PNP0A05");
    let n_hid = Name::new("_HID".into(), &hid);
    let n_cid = Name::new("_CID".into(), &cid);
    let one = aml::ONE;
    let zero = aml::ZERO;
    let ones: u16 = 0xffff;

    // CSTA(id): 0xF when present, else 0.
    let (a0, l0, l1) = (aml::Arg(0), Local(0), Local(1));
    let csel = Path::new(CSEL);
    let sel_a0 = Store::new(&csel, &a0);
    let sta_f: u8 = 0x0f;
    let l0_zero = Store::new(&l0, &zero);
    let l0_f = Store::new(&l0, &sta_f);
    // Present: bit 0 set, bits 3-7 (which the controller reads as 0) clear.
    let cflg = Path::new(CFLG);
    let sane_mask: u8 = 0xf9;
    let flags = And::new(&zero, &cflg, &sane_mask);
    let is_en = Equal::new(&flags, &one);
    let if_en = If::new(&is_en, vec![&l0_f]);
    let ret_l0 = Return::new(&l0);
    let acquire = Acquire::new(CPLK.into(), ones);
    let release = Release::new(CPLK.into());
    let csta = Method::new(
        "CSTA".into(),
        1,
        true,
        vec![&acquire, &sel_a0, &l0_zero, &if_en, &release, &ret_l0],
    );

    // CEJT(id): eject.
    let cej0 = Path::new(CEJ0);
    let set_ej = Store::new(&cej0, &one);
    let cejt = Method::new(
        "CEJT".into(),
        1,
        true,
        vec![&acquire, &sel_a0, &set_ej, &release],
    );

    // CTFY(id, event): Notify(Cxxx, event).
    let ids: Vec<u32> = (0..max).collect();
    let eqs: Vec<Equal> = ids.iter().map(|i| Equal::new(&a0, i)).collect();
    let ctfy = notify_method(
        "CTFY",
        eqs.iter()
            .zip(&ids)
            .map(|(e, &i)| (e as &dyn Aml, device_name(i))),
    );

    // CSCN: for each vCPU with a pending event (found with CMD_NEXT_EVENT from Local0 on):
    // insert → Notify 1 and acknowledge, remove → Notify 3 and acknowledge.
    let ccmd = Path::new(CCMD);
    let cdat = Path::new(CDAT);
    let cins = Path::new(CINS);
    let crmv = Path::new(CRMV);
    let cmd = CMD_NEXT_EVENT;
    let dev_check: u8 = 1;
    let eject_req: u8 = 3;
    let sel_l0 = Store::new(&csel, &l0);
    let run_cmd = Store::new(&ccmd, &cmd);
    let l1_dat = Store::new(&l1, &cdat);
    let sel_l1 = Store::new(&csel, &l1);
    let ins_set = Equal::new(&cins, &one);
    let tfy_ins = MethodCall::new("CTFY".into(), vec![&l1, &dev_check]);
    let ack_ins = Store::new(&cins, &one);
    let if_ins = If::new(&ins_set, vec![&tfy_ins, &ack_ins]);
    let rmv_set = Equal::new(&crmv, &one);
    let tfy_rmv = MethodCall::new("CTFY".into(), vec![&l1, &eject_req]);
    let ack_rmv = Store::new(&crmv, &one);
    let if_rmv = If::new(&rmv_set, vec![&tfy_rmv, &ack_rmv]);
    let found = LessThan::new(&l1, &max);
    let if_found = If::new(&found, vec![&sel_l1, &if_ins, &if_rmv]);
    // The walk must end whatever the port returns (no controller on the bus reads all ones,
    // a broken one anything): Local0 grows on every turn.
    let backwards = LessThan::new(&l1, &l0);
    let l1_l0 = Store::new(&l1, &l0);
    let if_backwards = If::new(&backwards, vec![&l1_l0]);
    let next = Add::new(&l0, &l1, &one);
    let more = LessThan::new(&l0, &max);
    let walk = While::new(
        &more,
        vec![&sel_l0, &run_cmd, &l1_dat, &if_backwards, &if_found, &next],
    );
    let cscn = Method::new(
        "CSCN".into(),
        0,
        true,
        vec![&acquire, &l0_zero, &walk, &release],
    );

    let devices: Vec<RawAml> = ids.iter().map(|&i| RawAml(cpu_device(i))).collect();
    let mut children: Vec<&dyn Aml> = vec![&n_hid, &n_cid, &csta, &cejt, &ctfy, &cscn];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    aml_seq(&[&Device::new("CPUS".into(), children)])
}

/// `Device (Cxxx)` for vCPU `id`.
fn cpu_device(id: u32) -> Vec<u8> {
    let hid: AmlStr = "ACPI0007";
    let n_hid = Name::new("_HID".into(), &hid);
    let n_uid = Name::new("_UID".into(), &id);
    let csta = MethodCall::new("CSTA".into(), vec![&id]);
    let ret_sta = Return::new(&csta);
    let sta = Method::new("_STA".into(), 0, false, vec![&ret_sta]);
    // _MAT: this vCPU's MADT entry, enabled while it is present (Linux maps the processor
    // through it on hot-add and refuses a disabled entry).
    let present: u8 = 0x0f;
    let is_present = Equal::new(&csta, &present);
    let on = BufferData::new(madt_entry(id, MADT_ENABLED));
    let off = BufferData::new(madt_entry(id, MADT_ONLINE_CAPABLE));
    let ret_on = Return::new(&on);
    let ret_off = Return::new(&off);
    let if_present = If::new(&is_present, vec![&ret_on]);
    let mat = Method::new("_MAT".into(), 0, false, vec![&if_present, &ret_off]);
    let cejt = MethodCall::new("CEJT".into(), vec![&id]);
    let ej0 = Method::new("_EJ0".into(), 1, false, vec![&cejt]);
    let mut children: Vec<&dyn Aml> = vec![&n_hid, &n_uid, &sta, &mat];
    if id != 0 {
        children.push(&ej0);
    }
    aml_seq(&[&Device::new(device_name(id).as_str().into(), children)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn ejects(c: &mut CpuHotplug) -> Arc<Mutex<Vec<u32>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        c.set_eject_handler(Box::new(move |id| s.lock().unwrap().push(id)));
        seen
    }

    fn select(c: &mut CpuHotplug, id: u32) {
        c.write(0, &id.to_le_bytes());
    }

    fn flags(c: &mut CpuHotplug) -> u8 {
        let mut d = [0xffu8];
        c.read(4, &mut d);
        d[0]
    }

    fn next_event(c: &mut CpuHotplug, from: u32) -> u32 {
        select(c, from);
        c.write(5, &[CMD_NEXT_EVENT]);
        let mut d = [0u8; 4];
        c.read(8, &mut d);
        u32::from_le_bytes(d)
    }

    /// What the AML's CSCN does, returning the notifications it would send.
    fn scan(c: &mut CpuHotplug) -> Vec<(u32, u8)> {
        let max = c.max();
        let mut out = Vec::new();
        let mut i = 0;
        while i < max {
            let mut n = next_event(c, i);
            if n < i {
                n = i;
            }
            if n < max {
                select(c, n);
                if flags(c) & FLAG_INSERT != 0 {
                    out.push((n, 1));
                    c.write(4, &[FLAG_INSERT]);
                }
                if flags(c) & FLAG_REMOVE != 0 {
                    out.push((n, 3));
                    c.write(4, &[FLAG_REMOVE]);
                }
            }
            i = n + 1;
        }
        out
    }

    #[test]
    fn counts_are_checked() {
        assert!(CpuHotplug::new(0, 1).is_err());
        assert!(CpuHotplug::new(3, 2).is_err());
        assert!(CpuHotplug::new(1, MAX_VCPUS + 1).is_err());
        let c = CpuHotplug::new(2, 4).unwrap();
        assert_eq!(c.present_ids(), vec![0, 1]);
        assert_eq!((c.boot(), c.max()), (2, 4));
    }

    #[test]
    fn boot_vcpus_read_enabled_without_events() {
        let mut c = CpuHotplug::new(2, 4).unwrap();
        for (id, f) in [(0, FLAG_ENABLED), (1, FLAG_ENABLED), (2, 0), (3, 0)] {
            select(&mut c, id);
            assert_eq!(flags(&mut c), f, "vCPU {id}");
        }
        assert_eq!(next_event(&mut c, 0), 4);
        assert!(scan(&mut c).is_empty());
        // The selector reads back.
        select(&mut c, 3);
        let mut d = [0u8; 4];
        c.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 3);
    }

    #[test]
    fn plug_sets_present_and_insert_until_acknowledged() {
        let mut c = CpuHotplug::new(1, 4).unwrap();
        c.plug(2).unwrap();
        assert!(c.present(2));
        assert_eq!(c.plug(2), Err(HotplugError::VcpuPresent(2)));
        select(&mut c, 2);
        assert_eq!(flags(&mut c), FLAG_ENABLED | FLAG_INSERT);
        // Writing the enabled bit or 0 does not acknowledge.
        c.write(4, &[FLAG_ENABLED]);
        assert_eq!(flags(&mut c), FLAG_ENABLED | FLAG_INSERT);
        c.write(4, &[FLAG_INSERT]);
        assert_eq!(flags(&mut c), FLAG_ENABLED);
        assert!(scan(&mut c).is_empty());
    }

    #[test]
    fn several_plugs_are_all_found_by_one_scan() {
        let mut c = CpuHotplug::new(1, 8).unwrap();
        for id in [5, 2, 7] {
            c.plug(id).unwrap();
        }
        assert_eq!(next_event(&mut c, 0), 2);
        assert_eq!(next_event(&mut c, 3), 5);
        assert_eq!(next_event(&mut c, 6), 7);
        assert_eq!(scan(&mut c), vec![(2, 1), (5, 1), (7, 1)]);
        assert!(scan(&mut c).is_empty(), "events were acknowledged");
        assert_eq!(c.present_ids(), vec![0, 2, 5, 7]);
    }

    #[test]
    fn unplug_then_eject_is_reported_once() {
        let mut c = CpuHotplug::new(2, 4).unwrap();
        let seen = ejects(&mut c);
        assert_eq!(c.unplug(0), Err(HotplugError::Bsp));
        assert_eq!(c.unplug(2), Err(HotplugError::VcpuAbsent(2)));
        assert_eq!(c.unplug(9), Err(HotplugError::NoSuchVcpu { id: 9, max: 4 }));
        c.unplug(1).unwrap();
        assert_eq!(c.unplug(1), Err(HotplugError::VcpuRemoving(1)));
        assert_eq!(c.plug(1), Err(HotplugError::VcpuRemoving(1)));
        assert!(c.present(1) && c.unplugging(1));
        assert_eq!(scan(&mut c), vec![(1, 3)]);
        // Still present until the guest ejects.
        select(&mut c, 1);
        assert_eq!(flags(&mut c), FLAG_ENABLED);
        assert!(seen.lock().unwrap().is_empty());
        c.write(4, &[FLAG_EJECT]);
        assert_eq!(*seen.lock().unwrap(), vec![1]);
        assert_eq!(flags(&mut c), 0, "_STA reads absent after the eject");
        assert!(!c.present(1) && !c.unplugging(1));
        // A second eject is not reported again.
        c.write(4, &[FLAG_EJECT]);
        assert_eq!(*seen.lock().unwrap(), vec![1]);
        // And the vCPU can come back.
        c.plug(1).unwrap();
        assert_eq!(scan(&mut c), vec![(1, 1)]);
    }

    #[test]
    fn eject_without_unplug_or_of_vcpu0_is_ignored() {
        let mut c = CpuHotplug::new(2, 4).unwrap();
        let seen = ejects(&mut c);
        for id in [0, 1, 3] {
            select(&mut c, id);
            c.write(4, &[FLAG_EJECT]);
        }
        assert!(seen.lock().unwrap().is_empty());
        assert_eq!(c.present_ids(), vec![0, 1]);
    }

    #[test]
    fn plug_then_unplug_before_the_scan_sends_both_notifications() {
        let mut c = CpuHotplug::new(1, 4).unwrap();
        let seen = ejects(&mut c);
        c.plug(3).unwrap();
        c.unplug(3).unwrap();
        assert_eq!(scan(&mut c), vec![(3, 1), (3, 3)]);
        select(&mut c, 3);
        c.write(4, &[FLAG_EJECT]);
        assert_eq!(*seen.lock().unwrap(), vec![3]);
    }

    #[test]
    fn acknowledging_one_event_keeps_the_other() {
        let mut c = CpuHotplug::new(1, 4).unwrap();
        c.plug(2).unwrap();
        c.unplug(2).unwrap();
        select(&mut c, 2);
        c.write(4, &[FLAG_INSERT]);
        assert_eq!(flags(&mut c), FLAG_ENABLED | FLAG_REMOVE);
    }

    #[test]
    fn guest_garbage_is_ignored() {
        let mut c = CpuHotplug::new(1, 4).unwrap();
        let seen = ejects(&mut c);
        c.unplug(0).unwrap_err();
        for sel in [4u32, 1000, u32::MAX] {
            select(&mut c, sel);
            assert_eq!(flags(&mut c), 0);
            c.write(4, &[0xff]);
            assert_eq!(next_event(&mut c, sel), 4);
        }
        // Unknown commands, reserved offsets, offsets past the block, huge offsets, odd sizes.
        c.write(5, &[0x7f]);
        c.write(6, &[1, 2, 3, 4, 5, 6]);
        c.write(40, &[1]);
        c.write(u64::MAX, &[1, 2]);
        let mut d = [0xffu8; 4];
        c.read(u64::MAX - 1, &mut d);
        assert_eq!(d, [0; 4]);
        c.read(12, &mut d);
        assert_eq!(d, [0; 4]);
        // A byte-wise selector write works like a dword one.
        for (i, b) in 2u32.to_le_bytes().iter().enumerate() {
            c.write(i as u64, &[*b]);
        }
        assert_eq!(flags(&mut c), 0);
        assert!(seen.lock().unwrap().is_empty());
        assert_eq!(c.present_ids(), vec![0]);
    }

    #[test]
    fn madt_entries_switch_to_x2apic_above_254() {
        assert_eq!(madt_entry(3, MADT_ENABLED), vec![0, 8, 3, 3, 1, 0, 0, 0]);
        assert_eq!(madt_entry(254, MADT_ONLINE_CAPABLE)[..4], [0, 8, 254, 254]);
        let e = madt_entry(300, MADT_ONLINE_CAPABLE);
        assert_eq!(e.len(), 16);
        assert_eq!(e[..4], [9, 16, 0, 0]);
        assert_eq!(u32::from_le_bytes(e[4..8].try_into().unwrap()), 300);
        assert_eq!(u32::from_le_bytes(e[8..12].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 300);
    }

    #[test]
    fn aml_names_every_possible_vcpu() {
        let a = aml(4, 0xcd8);
        let has = |n: &[u8]| a.windows(n.len()).any(|w| w == n);
        for n in [
            b"C000", b"C001", b"C002", b"C003", b"CSCN", b"CPLK", b"_EJ0", b"_MAT",
        ] {
            assert!(has(n), "{}", String::from_utf8_lossy(n));
        }
        assert!(!has(b"C004"));
        assert!(has(b"ACPI0007") && has(b"ACPI0010"));
    }
}
