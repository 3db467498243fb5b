//! The typed configuration of one VM, as `rvirt-vmm` runs it.
//!
//! One type, two front ends: `rvirt-vmm`'s own command line flags build a [`VmConfig`], and
//! rvirtd writes the same struct as JSON (`rvirt-vmm --config FILE`) instead of formatting an
//! argv the VMM would have to split again. A disk path with commas or spaces is just a string
//! here. Sizes are bytes; unknown fields are refused, so a daemon newer than its VMM is told so
//! instead of having a setting silently dropped.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything rvirt-vmm needs to run a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// VM name, shown in `info` and in log lines.
    #[serde(default)]
    pub name: Option<String>,
    /// How the guest starts.
    pub boot: BootConfig,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// vCPUs.
    pub cpus: CpuConfig,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// COM1.
    #[serde(default)]
    pub serial: SerialConfig,
    /// The virtio memory balloon, if any (libvirt's `<memballoon model='virtio'>`).
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// The virtio entropy device (on unless turned off, as before).
    #[serde(default = "yes")]
    pub rng: bool,
    /// The control socket (JSON lines, see [`crate::vmm`]).
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Start with the vCPUs stopped (QEMU's `-S`): a supervisor pins threads, then resumes.
    #[serde(default)]
    pub start_paused: bool,
    /// Host CPUs for the VMM's own threads (main, control, device workers): libvirt's
    /// `<emulatorpin>`. Threads started later (device workers, hotplugged devices) get it too.
    #[serde(default)]
    pub emulator_affinity: Option<Vec<usize>>,
    /// Host CPUs per vCPU id (`<vcpupin>`), applied when the vCPU thread starts, hotplugged
    /// vCPUs included.
    #[serde(default)]
    pub vcpu_affinity: Vec<VcpuAffinity>,
}

fn yes() -> bool {
    true
}

/// How the VM boots: a kernel loaded by the VMM, or firmware from the reset vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "kind")]
pub enum BootConfig {
    /// Direct kernel boot.
    Kernel {
        /// ELF vmlinux (PVH entry or 64-bit boot protocol) or bzImage.
        kernel: PathBuf,
        #[serde(default)]
        initrd: Option<PathBuf>,
        #[serde(default)]
        cmdline: String,
    },
    /// Firmware boot on the q35-like platform: the vCPUs start at the reset vector in
    /// `firmware`, mapped read-only so that it ends at 4 GiB (SeaBIOS `bios-256k.bin`, OVMF
    /// `OVMF_CODE_4M.fd`).
    Firmware {
        /// The firmware code image (a multiple of 4 KiB, at most 16 MiB).
        firmware: PathBuf,
        /// The UEFI variable store (a per-VM copy of `OVMF_VARS_4M.fd`), mapped as CFI flash
        /// just below the code image; writes go to this file.
        #[serde(default)]
        nvram: Option<PathBuf>,
        /// Offer the firmware's boot menu, waiting this many milliseconds (libvirt's
        /// `<bootmenu enable='yes' timeout=...>`, QEMU's `-boot menu=on,splash-time=`).
        #[serde(default)]
        boot_menu_ms: Option<u16>,
    },
}

/// Guest RAM: `size` is what the guest's memory map holds (libvirt's `<memory>`, the maximum);
/// the balloon takes it down to `current` (libvirt's `<currentMemory>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of RAM in the guest's memory map.
    pub size: u64,
    /// Balloon target at start (bytes); `None` = `size`. Needs a balloon when below `size`.
    #[serde(default)]
    pub current: Option<u64>,
    /// How guest RAM is backed.
    #[serde(default)]
    pub backing: MemoryBacking,
}

/// Host memory behind guest RAM (libvirt's `<memoryBacking>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBacking {
    /// `<hugepages/>`: hugetlbfs pages (MFD_HUGETLB); fails clearly when none are reserved.
    #[serde(default)]
    pub hugepages: bool,
    /// `<nosharepages/>`: keep KSM away (otherwise RAM is MADV_MERGEABLE, as QEMU does).
    #[serde(default)]
    pub nosharepages: bool,
    /// `<source type='memfd'/>`: RAM is a memfd (shareable, punch-hole on balloon).
    #[serde(default)]
    pub memfd: bool,
    /// `<access mode='shared'/>`: MAP_SHARED (needs memfd or hugepages).
    #[serde(default)]
    pub shared: bool,
}

/// vCPUs: `boot` run from the start, up to `max` can be added at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    pub boot: u32,
    /// Hotpluggable maximum (libvirt `<vcpu current='boot'>max</vcpu>`); `None` = `boot`.
    #[serde(default)]
    pub max: Option<u32>,
}

impl CpuConfig {
    /// The number of possible vCPUs.
    pub fn max(&self) -> u32 {
        self.max.unwrap_or(self.boot).max(self.boot)
    }
}

/// Host CPUs for one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuAffinity {
    pub vcpu: u32,
    pub cpus: Vec<usize>,
}

/// Image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// Host page cache use, as QEMU's `cache=` (libvirt `<driver cache=...>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// O_DIRECT, flushes honoured.
    None,
    /// Page cache, flushes honoured (QEMU's default).
    #[default]
    Writeback,
    /// Page cache, every write is followed by a flush.
    Writethrough,
    /// O_DIRECT + every write flushed.
    Directsync,
    /// Page cache, flushes ignored.
    Unsafe,
}

impl CacheMode {
    /// QEMU/libvirt's spelling.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }

    /// Parses QEMU/libvirt's spelling (`default` is writeback, as libvirt reads it).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => CacheMode::None,
            "writeback" | "default" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }

    /// Whether the file is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether every write is made durable before it completes.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }

    /// Whether guest flushes reach the disk.
    pub fn honours_flush(self) -> bool {
        self != CacheMode::Unsafe
    }
}

/// Which controller a disk hangs off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// Its own virtio-blk PCI function (`/dev/vdX`).
    #[default]
    Virtio,
    /// A target of the VM's one virtio-scsi controller (`/dev/sdX`, `/dev/srN`).
    Scsi,
}

impl DiskBus {
    /// libvirt's spelling (`<target bus=...>`).
    pub fn name(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Scsi => "scsi",
        }
    }
}

/// What the guest sees on that bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskDevice {
    /// A hard disk.
    #[default]
    Disk,
    /// A CD/DVD drive: always read-only, may be empty, media can change at run time.
    Cdrom,
}

impl DiskDevice {
    /// libvirt's spelling (`<disk device=...>`).
    pub fn name(self) -> &'static str {
        match self {
            DiskDevice::Disk => "disk",
            DiskDevice::Cdrom => "cdrom",
        }
    }
}

/// A disk or CD-ROM drive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image; `None` only for an empty CD-ROM drive.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `None`: probe (qcow2 magic or raw).
    #[serde(default)]
    pub format: Option<DiskFormat>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub cache: CacheMode,
    /// Serial number reported to the guest (`<serial>`, /dev/disk/by-id), at most 20 bytes.
    #[serde(default)]
    pub serial: Option<String>,
    /// A stable device id for hotplug and statistics (libvirt's alias, e.g. `virtio-disk0`);
    /// the VMM makes one up when absent.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub bus: DiskBus,
    #[serde(default)]
    pub device: DiskDevice,
    /// SCSI target id on the controller (libvirt's `<address type='drive' unit=...>`); the
    /// lowest free one when absent. Only for `bus: scsi`.
    #[serde(default)]
    pub unit: Option<u16>,
    /// Boot priority (libvirt's per-device `<boot order='N'/>`, lower first), passed to the
    /// firmware as its `bootorder` list.
    #[serde(default)]
    pub boot_order: Option<u32>,
}

/// A virtio-net NIC on a TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    /// `None`: 52:54:00:12:34:(56+index), as before.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// Stable device id (libvirt's alias, e.g. `net0`); made up when absent.
    #[serde(default)]
    pub id: Option<String>,
}

/// Where COM1 goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "snake_case",
    tag = "kind",
    content = "path"
)]
pub enum SerialConfig {
    /// The VMM's stdin/stdout (raw mode on a terminal; Ctrl-A x quits).
    #[default]
    Stdio,
    /// A new pty; its path is printed on stderr.
    Pty,
    /// A unix socket the VMM listens on; one client at a time.
    Socket(PathBuf),
    /// Output dropped.
    None,
}

/// The virtio balloon (libvirt `<memballoon model='virtio' autodeflate= freePageReporting=>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM (`autodeflate='on'`).
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// VIRTIO_BALLOON_F_REPORTING (`freePageReporting='on'`).
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Statistics polling period in seconds (`<stats period='N'/>`); 0 = off.
    #[serde(default)]
    pub stats_period: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmConfig {
        VmConfig {
            name: Some("vm1".into()),
            boot: BootConfig::Kernel {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                cmdline: "console=ttyS0".into(),
            },
            memory: MemoryConfig {
                size: 512 << 20,
                current: Some(256 << 20),
                backing: MemoryBacking::default(),
            },
            cpus: CpuConfig {
                boot: 1,
                max: Some(4),
            },
            disks: vec![DiskConfig {
                path: Some("/images/a, b.qcow2".into()),
                format: Some(DiskFormat::Qcow2),
                readonly: false,
                cache: CacheMode::None,
                serial: Some("S1".into()),
                id: Some("virtio-disk0".into()),
                bus: DiskBus::Scsi,
                device: DiskDevice::Disk,
                unit: Some(2),
                boot_order: Some(1),
            }],
            nets: vec![NetConfig {
                tap: "rvnet0".into(),
                mac: Some([0x52, 0x54, 0, 1, 2, 3]),
                id: None,
            }],
            serial: SerialConfig::Socket("/run/x.sock".into()),
            balloon: Some(BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                stats_period: 5,
            }),
            rng: true,
            api_socket: Some("/run/api.sock".into()),
            start_paused: true,
            emulator_affinity: Some(vec![0]),
            vcpu_affinity: vec![VcpuAffinity {
                vcpu: 0,
                cpus: vec![1],
            }],
        }
    }

    #[test]
    fn round_trips_through_json() {
        let c = sample();
        let s = serde_json::to_string_pretty(&c).unwrap();
        assert!(s.contains("a, b.qcow2"), "{s}");
        assert_eq!(serde_json::from_str::<VmConfig>(&s).unwrap(), c);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["disks"][0]["iothread"] = serde_json::json!(1);
        let e = serde_json::from_value::<VmConfig>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("iothread"), "{e}");
    }

    #[test]
    fn cache_modes() {
        for m in [
            CacheMode::None,
            CacheMode::Writeback,
            CacheMode::Writethrough,
            CacheMode::Directsync,
            CacheMode::Unsafe,
        ] {
            assert_eq!(CacheMode::parse(m.name()), Some(m));
        }
        assert!(CacheMode::None.direct() && !CacheMode::None.write_through());
        assert!(CacheMode::Directsync.direct() && CacheMode::Directsync.write_through());
        assert!(!CacheMode::Unsafe.honours_flush());
        assert_eq!(CacheMode::parse("bogus"), None);
    }
}
