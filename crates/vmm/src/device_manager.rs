//! Owns every device of the VM: the port I/O and MMIO buses with the platform devices, the
//! root PCI bus with the virtio functions, and the disk images behind them. Devices are added
//! here at start (and at run time by hotplug); the vCPUs only see the buses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use rvirt_api::vmm::DeviceStats;
use rvirt_devices::pci::{q35, Ich9Lpc, PciBus, PciWindows, Q35Host};
use rvirt_devices::virtio::{self, PauseGate, VirtioPciDevice};
use rvirt_devices::{IoEventRegistry, MsiRouting};

use crate::boot::GuestMem;
use crate::bus::Bus;
use crate::cli::{BalloonConfig, DiskBus, DiskConfig, DiskDevice, DiskFormat, NetConfig};
use crate::exits::ExitHandler;
use crate::hotplug::{self, cpu::CpuHotplug, ged::Ged, pci::PciHotplug};
use crate::interrupts::{IoEvents, Routing};
use crate::layout::*;
use crate::legacy::{self, pm::Pm, serial::Com1};
use crate::messages::{Mailbox, VmmMessage};
use crate::vstate::vm::Vm;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio function and what it is for.
struct VirtioEntry {
    id: String,
    kind: &'static str,
    backend: Option<String>,
    slot: u8,
    device: Arc<Mutex<VirtioPciDevice>>,
}

/// A disk or CD-ROM drive on the virtio-scsi controller.
struct ScsiEntry {
    id: String,
    target: u16,
    backend: Option<String>,
    /// The media side of a CD-ROM drive.
    cdrom: Option<virtio::scsi::CdromHandle>,
}

/// Every device of one VM.
pub struct DeviceManager {
    machine: Machine,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pci: Arc<PciBus>,
    pm: Arc<Mutex<Pm>>,
    virtio: Vec<VirtioEntry>,
    /// The balloon's control side, when the VM has one.
    balloon: Option<virtio::balloon::BalloonHandle>,
    /// ACPI hotplug: the GED that interrupts the guest, the vCPU controller (when vCPUs can be
    /// added) and the PCI slot controller.
    ged: Arc<Mutex<Ged>>,
    cpu_hotplug: Option<Arc<Mutex<CpuHotplug>>>,
    pci_hotplug: Arc<Mutex<PciHotplug>>,
    /// Writable images, flushed at exit.
    disks: Vec<(PathBuf, Arc<dyn rvirt_image::BlockDevice>)>,
    /// The drives of the virtio-scsi controller (in `scsi_slot` when there is one).
    scsi: Vec<ScsiEntry>,
    scsi_slot: Option<u8>,
    /// (boot priority, OpenFirmware device path) of the devices the firmware should boot.
    boot: Vec<(u32, String)>,
    gate: PauseGate,
    mem: GuestMem,
    routing: Arc<dyn MsiRouting>,
    ioevents: Arc<dyn IoEventRegistry>,
    mailbox: Mailbox,
}

impl DeviceManager {
    /// The buses, the platform devices (COM1 from the console, the PM block raising the SCI)
    /// and an empty PCI bus with its windows for `vm`'s RAM size.
    /// The hotplug controllers go on the bus here, before any vCPU runs, as the ACPI tables
    /// written for `boot`/`max` vCPUs expect.
    pub fn new(
        vm: &Vm,
        machine: Machine,
        ram: u64,
        (boot, max): (u32, u32),
        com1: Arc<Mutex<Com1>>,
        mailbox: &Mailbox,
    ) -> Result<Self> {
        let sci = vm.irqfd(9, "the ACPI SCI")?;
        let pm = Arc::new(Mutex::new(Pm::new(Some(sci), mailbox.clone())));
        let pio = Arc::new(Bus::new());
        let kbd_irqs = (
            vm.irqfd(1, "the i8042 keyboard")?,
            vm.irqfd(12, "the i8042 aux port")?,
        );
        legacy::install(&pio, com1, pm.clone(), (ram, boot), kbd_irqs, mailbox)
            .context("platform devices")?;
        let ged = Arc::new(Mutex::new(Ged::with_eventfd(
            vm.irqfd(GED_GSI, "the ACPI GED")?,
        )));
        pio.insert(u64::from(ports::GED), hotplug::ged::REG_LEN, ged.clone())
            .context("ACPI GED")?;
        // Eject handlers run on a vCPU thread with the controller locked: pass the news on.
        let mut pci_hp = PciHotplug::new();
        let m = mailbox.clone();
        pci_hp.set_eject_handler(Box::new(move |slot| {
            m.send(VmmMessage::SlotEjected(slot as u8))
        }));
        let pci_hotplug = Arc::new(Mutex::new(pci_hp));
        pio.insert(
            u64::from(ports::PCI_HOTPLUG),
            hotplug::pci::REG_LEN,
            pci_hotplug.clone(),
        )
        .context("PCI hotplug controller")?;
        let cpu_hotplug = if max > boot {
            let mut c = CpuHotplug::new(boot, max).context("vCPU hotplug controller")?;
            let m = mailbox.clone();
            c.set_eject_handler(Box::new(move |id| m.send(VmmMessage::VcpuEjected(id))));
            let c = Arc::new(Mutex::new(c));
            pio.insert(
                u64::from(ports::CPU_HOTPLUG),
                hotplug::cpu::REG_LEN,
                c.clone(),
            )
            .context("vCPU hotplug controller")?;
            Some(c)
        } else {
            None
        };
        let routing: Arc<dyn MsiRouting> =
            Arc::new(Routing::new(vm.fd.clone()).map_err(|e| anyhow::anyhow!("GSI routing: {e}"))?);
        let ioevents: Arc<dyn IoEventRegistry> = Arc::new(IoEvents { vm: vm.fd.clone() });
        let m64 = machine.mmio64_start(ram);
        let windows = PciWindows {
            mmio32: machine.mmio32(),
            mmio64: m64..m64 + PCI_MMIO64_SIZE,
            io: PCI_IO,
        };
        let pci = match machine {
            Machine::Direct => Arc::new(PciBus::new(windows)),
            Machine::Q35 => {
                // The chipset functions firmware identifies the platform by (see
                // rvirt_devices::pci::q35); Linux ignores them.
                let host = Q35Host::new(machine.ecam_base());
                let bus = PciBus::with_host_bridge(windows, Arc::new(Mutex::new(host)));
                bus.add_device_at(
                    q35::LPC_SLOT,
                    Arc::new(Mutex::new(Ich9Lpc::new(ports::PM1A_EVT))),
                )
                .context("ICH9 LPC bridge")?;
                Arc::new(bus)
            }
        };
        Ok(DeviceManager {
            machine,
            pio,
            mmio: Arc::new(Bus::new()),
            pci,
            pm,
            virtio: Vec::new(),
            balloon: None,
            ged,
            cpu_hotplug,
            pci_hotplug,
            disks: Vec::new(),
            scsi: Vec::new(),
            scsi_slot: None,
            boot: Vec::new(),
            gate: PauseGate::new(),
            mem: vm.mem.clone(),
            routing,
            ioevents,
            mailbox: mailbox.clone(),
        })
    }

    /// What vCPU exits reach.
    pub fn exit_handler(&self) -> ExitHandler {
        ExitHandler {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            pci: self.pci.clone(),
            ecam_base: self.machine.ecam_base(),
        }
    }

    /// The port I/O bus, for platform devices a boot mode adds (fw_cfg).
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus, for platform devices a boot mode adds (the flash variable store).
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// Held closed while the VM is paused: device workers leave guest memory alone.
    pub fn gate(&self) -> &PauseGate {
        &self.gate
    }

    /// Presses the ACPI power button.
    pub fn power_button(&self) {
        self.pm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .power_button();
    }

    fn plug(
        &mut self,
        device: Box<dyn virtio::VirtioDevice>,
        id: String,
        backend: Option<String>,
    ) -> Result<(String, u8)> {
        let kind = device.name();
        let mut dev = VirtioPciDevice::new(
            device,
            self.mem.clone(),
            self.routing.clone(),
            self.ioevents.clone(),
        )
        .with_context(|| format!("virtio-{kind} {id}"))?;
        dev.set_pause_gate(self.gate.clone());
        let device = Arc::new(Mutex::new(dev));
        let addr = self
            .pci
            .add_device(device.clone())
            .map_err(|e| anyhow::anyhow!("adding virtio-{kind} {id} to the PCI bus: {e}"))?;
        // Workers start on the VMM thread (its affinity, no vCPU exit held up), not inside the
        // guest's status write.
        let slot = addr.device;
        let mailbox = self.mailbox.clone();
        lock(&device)
            .set_activation_hook(Box::new(move || mailbox.send(VmmMessage::Activate(slot))));
        self.virtio.push(VirtioEntry {
            id: id.clone(),
            kind,
            backend,
            slot: addr.device,
            device,
        });
        Ok((id, addr.device))
    }

    fn id_taken(&self, id: &str) -> bool {
        self.virtio.iter().any(|e| e.id == id) || self.scsi.iter().any(|e| e.id == id)
    }

    fn unique_id(&self, wanted: Option<&String>, prefix: &str) -> Result<String> {
        if let Some(id) = wanted {
            if self.id_taken(id) {
                anyhow::bail!("device id {id:?} is already in use; choose another id");
            }
            return Ok(id.clone());
        }
        let n = (0..)
            .find(|n| !self.id_taken(&format!("{prefix}{n}")))
            .unwrap_or(0);
        Ok(format!("{prefix}{n}"))
    }

    /// Adds the VM's disks in order: each virtio one as its own function, and all SCSI ones
    /// on one virtio-scsi controller, plugged where the first of them comes.
    pub fn add_disks(&mut self, disks: &[DiskConfig]) -> Result<()> {
        let scsi: Vec<&DiskConfig> = disks.iter().filter(|d| d.bus == DiskBus::Scsi).collect();
        for d in disks {
            match d.bus {
                DiskBus::Virtio => {
                    self.add_disk(d)?;
                }
                DiskBus::Scsi if self.scsi_slot.is_none() => self.add_scsi_controller(&scsi)?,
                DiskBus::Scsi => {}
            }
        }
        Ok(())
    }

    /// Opens `d`'s image with its cache mode; writable ones are remembered for the exit flush.
    fn open_image(
        &mut self,
        d: &DiskConfig,
        path: &Path,
    ) -> Result<Arc<dyn rvirt_image::BlockDevice>> {
        let opts = rvirt_image::OpenOptions {
            read_only: d.readonly,
            direct: d.cache.direct(),
            ..Default::default()
        };
        let format = d.format.map(|f| match f {
            DiskFormat::Raw => rvirt_image::Format::Raw,
            DiskFormat::Qcow2 => rvirt_image::Format::Qcow2,
        });
        let img = rvirt_image::open_image(path, format, &opts).with_context(|| {
            format!(
                "disk {} (cache={}): cannot open the image",
                path.display(),
                d.cache.name()
            )
        })?;
        let img: Arc<dyn rvirt_image::BlockDevice> = Arc::new(img);
        if !d.readonly {
            // The exit flush goes to the image itself: it happens even with cache=unsafe.
            self.disks.push((path.to_path_buf(), img.clone()));
        }
        Ok(Arc::new(rvirt_image::Cached::new(
            img,
            rvirt_image::CachePolicy {
                write_through: d.cache.write_through(),
                ignore_flush: !d.cache.honours_flush(),
            },
        )))
    }

    /// Builds the virtio-scsi controller with one target per drive: `unit` when given, else
    /// the lowest free target id, in order.
    fn add_scsi_controller(&mut self, disks: &[&DiskConfig]) -> Result<()> {
        let mut used: Vec<u16> = disks.iter().filter_map(|d| d.unit).collect();
        let mut targets = Vec::new();
        let mut entries = Vec::new();
        for d in disks {
            let target = match d.unit {
                Some(u) => u,
                None => {
                    let t = (0..=255u16)
                        .find(|t| !used.contains(t))
                        .context("the SCSI controller has no free target left (256 drives)")?;
                    used.push(t);
                    t
                }
            };
            // libvirt's alias of the drive (controller 0, bus 0, target 0, unit): rvirtd maps
            // libvirt's unit to the target id.
            let id = match &d.id {
                Some(id) => self.unique_id(Some(id), "")?,
                None => self.unique_id(Some(&format!("scsi0-0-0-{target}")), "")?,
            };
            let media = match &d.path {
                Some(p) => Some(self.open_image(d, p)?),
                None => None,
            };
            let serial = d.serial.clone().unwrap_or_default();
            let lun = match d.device {
                DiskDevice::Disk => rvirt_devices::scsi::ScsiLun::disk(
                    media.context("a SCSI disk needs an image")?,
                    &serial,
                    d.readonly,
                ),
                DiskDevice::Cdrom => rvirt_devices::scsi::ScsiLun::cdrom(media, &serial),
            };
            targets.push((target, lun));
            entries.push((id, target, d));
        }
        let scsi = virtio::scsi::Scsi::new(virtio::scsi::ScsiConfig {
            id: "scsi0".into(),
            targets,
            num_queues: 1,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut drives = Vec::new();
        for (id, target, d) in entries {
            drives.push(ScsiEntry {
                cdrom: scsi.cdrom(target),
                id,
                target,
                backend: d.path.as_ref().map(|p| p.display().to_string()),
            });
        }
        let ctl = self.unique_id(None, "scsi")?;
        let (_, slot) = self.plug(Box::new(scsi), ctl, None)?;
        self.scsi_slot = Some(slot);
        for (e, d) in drives.iter().zip(disks) {
            if let Some(order) = d.boot_order {
                self.boot.push((
                    order,
                    format!("/pci@i0cf8/scsi@{slot:x}/channel@0/disk@{:x},0", e.target),
                ));
            }
        }
        self.scsi = drives;
        Ok(())
    }

    /// Changes the disc in CD-ROM drive `id`: inserts `source` (read-only), or ejects when
    /// `None`. The guest sees UNIT ATTENTION / a media event, as with a real drive.
    pub fn change_media(
        &mut self,
        id: &str,
        source: Option<&Path>,
        format: Option<DiskFormat>,
        force: bool,
    ) -> Result<()> {
        let Some(pos) = self.scsi.iter().position(|e| e.id == id) else {
            let drives: Vec<&str> = self
                .scsi
                .iter()
                .filter(|e| e.cdrom.is_some())
                .map(|e| e.id.as_str())
                .collect();
            bail!(
                "no CD-ROM drive {id:?} in this VM (CD-ROM drives: {})",
                if drives.is_empty() {
                    "none".to_string()
                } else {
                    drives.join(", ")
                }
            );
        };
        let Some(cd) = self.scsi[pos].cdrom.clone() else {
            bail!("{id:?} is a disk, not a CD-ROM drive: its media cannot change");
        };
        let locked = "the guest has locked the tray (e.g. a mounted disc); unmount it in the \
                      guest or use --force";
        match source {
            None => {
                cd.eject(force)
                    .map_err(|_| anyhow::anyhow!("{id}: {locked}"))?;
                self.scsi[pos].backend = None;
            }
            Some(p) => {
                let d = DiskConfig {
                    path: Some(p.to_path_buf()),
                    format,
                    readonly: true,
                    ..Default::default()
                };
                let img = self.open_image(&d, p)?;
                if force {
                    let _ = cd.eject(true);
                }
                cd.insert(img)
                    .map_err(|_| anyhow::anyhow!("{id}: {locked}"))?;
                self.scsi[pos].backend = Some(p.display().to_string());
            }
        }
        log::info!(
            "{id}: media {}",
            self.scsi[pos].backend.as_deref().unwrap_or("ejected")
        );
        Ok(())
    }

    /// The firmware's `bootorder` list: OpenFirmware paths, highest priority first, as QEMU
    /// writes them (SeaBIOS and OVMF both read this form). Empty: let the firmware choose.
    pub fn boot_order(&self) -> Vec<String> {
        let mut b = self.boot.clone();
        b.sort();
        b.into_iter().map(|(_, p)| p).collect()
    }

    /// Opens `d`'s image (with its cache mode) and adds a virtio-blk function for it.
    pub fn add_disk(&mut self, d: &DiskConfig) -> Result<(String, u8)> {
        if d.bus != DiskBus::Virtio || d.device != DiskDevice::Disk {
            bail!(
                "a {} {} cannot be added as its own device: SCSI drives are set up with the \
                 VM's SCSI controller at start (hotplug them on bus=virtio)",
                d.bus.name(),
                d.device.name()
            );
        }
        let path = d
            .path
            .clone()
            .context("a virtio disk needs an image file (path)")?;
        let id = self.unique_id(d.id.as_ref(), "virtio-disk")?;
        let img = self.open_image(d, &path)?;
        // The serial the guest reads (VIRTIO_BLK_T_GET_ID, /sys/block/vdX/serial): `serial`
        // when given, else diskN by position among the VM's disks, as before.
        let serial = d.serial.clone().unwrap_or_else(|| {
            format!(
                "disk{}",
                self.virtio.iter().filter(|e| e.kind == "block").count()
            )
        });
        let blk = virtio::block::Block::new(
            img,
            &virtio::block::BlockConfig {
                id: serial,
                read_only: d.readonly,
            },
        );
        let (id, slot) = self.plug(Box::new(blk), id, Some(path.display().to_string()))?;
        if let Some(order) = d.boot_order {
            self.boot
                .push((order, format!("/pci@i0cf8/scsi@{slot:x}/disk@0,0")));
        }
        Ok((id, slot))
    }

    /// Opens `n`'s TAP and adds a virtio-net function for it.
    pub fn add_net(&mut self, n: &NetConfig) -> Result<(String, u8)> {
        let id = self.unique_id(n.id.as_ref(), "net")?;
        let tap = virtio::net::Tap::open(&n.tap).with_context(|| format!("--net tap={}", n.tap))?;
        let index = self.virtio.iter().filter(|e| e.kind == "net").count();
        let mac = n.mac.unwrap_or_else(|| crate::cli::default_mac(index));
        let nic = virtio::net::Net::new(Arc::new(tap), virtio::net::NetConfig { mac });
        self.plug(Box::new(nic), id, Some(n.tap.clone()))
    }

    /// Adds the virtio balloon for `ram` bytes of guest RAM, asked to leave the guest `target`
    /// bytes from the start (libvirt's `<currentMemory>`).
    pub fn add_balloon(
        &mut self,
        cfg: &BalloonConfig,
        ram: u64,
        target: u64,
    ) -> Result<(String, u8)> {
        let (balloon, handle) = virtio::balloon::Balloon::new(virtio::balloon::BalloonConfig {
            ram_size: ram,
            deflate_on_oom: cfg.deflate_on_oom,
            free_page_reporting: cfg.free_page_reporting,
            stats_period: cfg.stats_period,
            // Guest RAM is this process's own (anonymous memory or its own memfd): punching
            // holes in a privately mapped memfd harms nobody.
            discard: virtio::balloon::DiscardMode::AutoOwnedFiles,
        })
        .context("virtio-balloon")?;
        handle.set_target_bytes(target);
        // Runs on a vCPU thread with the device locked: only pass the news on.
        let mailbox = self.mailbox.clone();
        handle.on_actual_change(move |actual| mailbox.send(VmmMessage::BalloonChanged(actual)));
        let id = self.unique_id(None, "balloon")?;
        let added = self.plug(Box::new(balloon), id, None)?;
        self.balloon = Some(handle);
        Ok(added)
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<&virtio::balloon::BalloonHandle> {
        self.balloon.as_ref()
    }

    /// Adds the virtio entropy device.
    pub fn add_rng(&mut self) -> Result<(String, u8)> {
        let rng = virtio::rng::Rng::new().context("virtio-rng: /dev/urandom")?;
        let id = self.unique_id(None, "rng")?;
        self.plug(Box::new(rng), id, Some("/dev/urandom".into()))
    }

    /// Starts the virtio device in `slot` if its driver is (still) ready.
    pub fn activate(&self, slot: u8) {
        if let Some(e) = self.virtio.iter().find(|e| e.slot == slot) {
            lock(&e.device).activate_pending();
        }
    }

    /// Marks the devices present at boot in the PCI hotplug controller (no event: the guest
    /// finds them when it enumerates the bus).
    pub fn cold_plugged(&self) -> Result<()> {
        let mut hp = lock(&self.pci_hotplug);
        for e in &self.virtio {
            hp.cold_plug(u32::from(e.slot))
                .with_context(|| format!("PCI slot {} of {}", e.slot, e.id))?;
        }
        Ok(())
    }

    /// Tells the guest a device was added in `slot` (ACPI PCI hotplug).
    pub fn announce_slot(&self, slot: u8) -> Result<()> {
        lock(&self.pci_hotplug)
            .plug(u32::from(slot))
            .with_context(|| format!("PCI slot {slot}"))?;
        lock(&self.ged).notify(hotplug::ged::EVENT_PCI);
        Ok(())
    }

    /// Asks the guest to release device `id`; its slot is ejected later
    /// ([`DeviceManager::remove_slot`]).
    pub fn request_removal(&self, id: &str) -> Result<u8> {
        let Some(e) = self.virtio.iter().find(|e| e.id == id) else {
            let ids: Vec<&str> = self.virtio.iter().map(|e| e.id.as_str()).collect();
            bail!("no device {id:?} in this VM (devices: {})", ids.join(", "));
        };
        if e.kind == "rng" || e.kind == "balloon" {
            bail!("device {id:?} ({}) cannot be unplugged", e.kind);
        }
        lock(&self.pci_hotplug)
            .unplug(u32::from(e.slot))
            .with_context(|| format!("unplugging {id}"))?;
        lock(&self.ged).notify(hotplug::ged::EVENT_PCI);
        Ok(e.slot)
    }

    /// Takes the device the guest ejected from `slot` off the bus and drops it: its workers
    /// stop, its ioeventfds and MSI vectors go, a disk is flushed and closed (its image lock
    /// released), a TAP is closed. Returns its id.
    pub fn remove_slot(&mut self, slot: u8) -> Result<String> {
        let pos = self
            .virtio
            .iter()
            .position(|e| e.slot == slot)
            .with_context(|| format!("slot {slot} holds no virtio device"))?;
        self.pci
            .remove_device(slot)
            .map_err(|e| anyhow::anyhow!("removing slot {slot}: {e}"))?;
        let e = self.virtio.remove(pos);
        if let Some(path) = &e.backend {
            if let Some(i) = self
                .disks
                .iter()
                .position(|(p, _)| p.display().to_string() == *path)
            {
                let (p, disk) = self.disks.remove(i);
                if let Err(err) = disk.flush() {
                    log::error!("flushing unplugged disk {} failed: {err}", p.display());
                }
            }
        }
        if Arc::strong_count(&e.device) > 1 {
            log::warn!("unplugged {} is still referenced; it is freed later", e.id);
        }
        Ok(e.id)
    }

    /// The vCPU hotplug controller, when vCPUs can be added.
    pub fn cpu_hotplug(&self) -> Option<&Arc<Mutex<CpuHotplug>>> {
        self.cpu_hotplug.as_ref()
    }

    /// Raises the GED with `events` (hotplug::ged::EVENT_*).
    pub fn notify(&self, events: u32) {
        lock(&self.ged).notify(events);
    }

    /// Counters of every virtio device.
    pub fn stats(&self) -> Vec<DeviceStats> {
        self.virtio
            .iter()
            .map(|e| {
                let counters: BTreeMap<String, u64> = lock(&e.device)
                    .counters()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                DeviceStats {
                    id: e.id.clone(),
                    kind: e.kind.to_string(),
                    backend: e.backend.clone(),
                    slot: e.slot,
                    counters,
                }
            })
            .collect()
    }

    /// Stops every device (workers finish their requests and are joined) and flushes the
    /// writable disks. Call once no vCPU runs. Returns the disks whose flush failed.
    pub fn shutdown(self) -> Vec<(PathBuf, String)> {
        // A VM stopped while paused: let the workers finish what they hold before they are
        // joined.
        self.gate.resume();
        let DeviceManager {
            pci, virtio, disks, ..
        } = self;
        drop(pci);
        for e in virtio {
            if let Err(d) = Arc::try_unwrap(e.device) {
                let name = d.lock().map(|g| g.name()).unwrap_or("?");
                log::warn!(
                    "virtio-{name} {} is still referenced at exit; its worker may outlive the VM",
                    e.id
                );
            }
        }
        let mut failed = Vec::new();
        for (path, disk) in disks {
            if let Err(e) = disk.flush() {
                failed.push((path, e.to_string()));
            }
        }
        failed
    }
}
