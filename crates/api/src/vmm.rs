//! The `rvirt-vmm` control protocol.
//!
//! Transport: a unix stream socket given by `--api-socket PATH`. Each message is one JSON object
//! on one line (`\n`-terminated). The client sends a [`Request`]; the VMM answers with exactly one
//! [`Response`] line. After a [`Request::Watch`], the connection instead carries [`Event`] lines
//! until the VMM exits; a connection that closes without an [`Event::Exited`] means the VMM died
//! (killed or crashed), which is how a supervisor that is not the VMM's parent (after a daemon
//! restart) still learns why a VM stopped.

use serde::{Deserialize, Serialize};

/// Exit statuses of the `rvirt-vmm` process. Documented in `rvirt-vmm --help` and docs/.
pub mod exit_code {
    /// The guest powered off (ACPI S5), or the VMM was asked to quit.
    pub const POWEROFF: i32 = 0;
    /// The VMM failed: bad configuration, unusable host resource, or an internal error.
    pub const VMM_ERROR: i32 = 1;
    /// Command line usage error (clap's convention).
    pub const USAGE: i32 = 2;
    /// The guest asked for a reboot (ACPI reset, i8042 reset line, or reset port 0xCF9).
    pub const REBOOT: i32 = 3;
    /// The guest crashed: triple fault / KVM shutdown exit, or a pvpanic event.
    pub const CRASH: i32 = 4;
}

/// Why a VM stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    Poweroff,
    Reboot,
    Crash,
    /// The VMM was told to quit through the control socket.
    Quit,
    /// An internal VMM error ended the VM.
    Error,
}

impl ExitReason {
    /// The process exit status that goes with this reason.
    pub fn exit_code(self) -> i32 {
        match self {
            ExitReason::Poweroff | ExitReason::Quit => exit_code::POWEROFF,
            ExitReason::Reboot => exit_code::REBOOT,
            ExitReason::Crash => exit_code::CRASH,
            ExitReason::Error => exit_code::VMM_ERROR,
        }
    }

    /// Inverse of [`ExitReason::exit_code`] for a supervisor that only has the status.
    pub fn from_exit_code(code: i32) -> Option<Self> {
        match code {
            exit_code::POWEROFF => Some(ExitReason::Poweroff),
            exit_code::REBOOT => Some(ExitReason::Reboot),
            exit_code::CRASH => Some(ExitReason::Crash),
            exit_code::VMM_ERROR => Some(ExitReason::Error),
            _ => None,
        }
    }
}

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Identity and state of the VM.
    Info,
    /// Stop all vCPUs (libvirt "paused"). Devices finish in-flight I/O.
    Pause,
    /// Resume vCPUs after [`Request::Pause`].
    Resume,
    /// Press the ACPI power button: the guest should shut down cleanly.
    PowerButton,
    /// Stop the VM now, without asking the guest (virsh destroy).
    Quit,
    /// Per-vCPU thread ids and states, for vcpuinfo/vcpupin.
    VcpuInfo,
    /// Resource usage of the VMM process.
    Stats,
    /// Turn this connection into an event stream.
    Watch,
    /// Set the balloon target: the memory the guest should keep, in bytes (QEMU's `balloon`
    /// takes the same quantity, in MiB). Answered at once; the guest gets there on its own time.
    Balloon { target_bytes: u64 },
    /// Where the balloon is (QEMU's `query-balloon`).
    QueryBalloon,
    /// The guest's latest memory statistics from the balloon's stats queue.
    BalloonStats,
    /// Poll the guest for balloon statistics every `seconds` (0 = stop).
    SetBalloonStatsPeriod { seconds: u32 },
    /// Bring the number of online vCPUs to `count` (ACPI CPU hotplug). Adding completes at
    /// once; removing asks the guest, and [`Event::VcpuRemoved`] follows when it ejects.
    SetVcpus { count: u32 },
    /// Hotplug a virtio-blk disk on a free PCI slot; the guest is notified through ACPI.
    AddDisk { disk: crate::vmm_config::DiskConfig },
    /// Hotplug a virtio-net NIC on a free PCI slot.
    AddNet { net: crate::vmm_config::NetConfig },
    /// Ask the guest to release device `id`; [`Event::DeviceRemoved`] follows when it ejects.
    RemoveDevice { id: String },
    /// Change the disc in CD-ROM drive `id` (virsh change-media): insert `source` (replacing
    /// what is in), or eject when `source` is `None`. Refused while the guest locks the tray,
    /// unless `force`.
    ChangeMedia {
        id: String,
        #[serde(default)]
        source: Option<std::path::PathBuf>,
        #[serde(default)]
        format: Option<crate::vmm_config::DiskFormat>,
        #[serde(default)]
        force: bool,
    },
}

/// Run state of the VM as the VMM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    ShuttingDown,
}

/// One vCPU's thread.
/// How the VMM backed guest RAM (what it applied, not only what was asked for: a hint the
/// host kernel refused is reported as not applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackingInfo {
    /// `anonymous`, `memfd` or `hugepages`.
    pub source: String,
    /// Shared mapping (`<access mode='shared'/>`).
    pub shared: bool,
    /// `MADV_MERGEABLE` applied: KSM may merge the pages.
    pub ksm: bool,
    /// `MADV_HUGEPAGE` applied: transparent huge pages.
    pub thp: bool,
}

impl MemoryBackingInfo {
    /// One line for `dominfo`, e.g. "anonymous, private, KSM, THP".
    pub fn describe(&self) -> String {
        let mut parts = vec![
            self.source.clone(),
            if self.shared { "shared" } else { "private" }.to_string(),
        ];
        if self.ksm {
            parts.push("KSM".into());
        }
        if self.thp {
            parts.push("THP".into());
        }
        parts.join(", ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuThread {
    pub vcpu: u32,
    /// Kernel thread id (for sched_setaffinity and /proc/PID/task/TID).
    pub tid: i32,
    pub state: RunState,
}

/// The VMM's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Info {
        pid: u32,
        /// `--name` given to the VMM, if any.
        name: Option<String>,
        state: RunState,
        vcpus: u32,
        memory_bytes: u64,
        /// Most vCPUs the VM can have (hotplug).
        #[serde(default)]
        max_vcpus: u32,
        /// How guest RAM is backed, as applied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_backing: Option<MemoryBackingInfo>,
    },
    VcpuInfo {
        vcpus: Vec<VcpuThread>,
    },
    Stats {
        /// Resident set size of the whole VMM process, guest memory included.
        rss_bytes: u64,
        /// User + system CPU time of the process, in nanoseconds.
        cpu_time_ns: u64,
        /// Per-device counters (virtio devices, in PCI slot order).
        #[serde(default)]
        devices: Vec<DeviceStats>,
    },
    Balloon {
        /// Guest memory not held by the balloon (QEMU's `actual`).
        actual_bytes: u64,
        /// What the balloon is asked to leave the guest.
        target_bytes: u64,
        /// RAM in the guest's memory map (the most `actual` can be).
        max_bytes: u64,
    },
    BalloonStats {
        stats: BalloonStats,
    },
    /// A hotplugged device and where it went.
    DeviceAdded {
        id: String,
        /// PCI slot on bus 0 (libvirt's `<address type='pci' bus='0x00' slot=...>`).
        slot: u8,
    },
    /// The request failed; `message` says what and what to do.
    Error {
        message: String,
    },
}

/// Counters of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// The device id (`virtio-disk0`, `net0`, ...).
    pub id: String,
    /// `block`, `net`, `rng`, `balloon`.
    pub kind: String,
    /// Host path (disks) or TAP name (NICs).
    #[serde(default)]
    pub backend: Option<String>,
    /// PCI slot on bus 0.
    pub slot: u8,
    /// Named counters, e.g. `read_requests`, `read_bytes`, `rx_packets`.
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// The guest's memory statistics (virtio-balloon stats tags), in bytes or counts, with the names
/// `virsh dommemstat` prints. A field the guest did not report is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_fault: Option<u64>,
    pub minor_fault: Option<u64>,
    /// Free memory (VIRTIO_BALLOON_S_MEMFREE).
    pub unused: Option<u64>,
    /// Total memory the guest sees (VIRTIO_BALLOON_S_MEMTOT).
    pub available: Option<u64>,
    /// Memory available without swapping (VIRTIO_BALLOON_S_AVAIL).
    pub usable: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_pgalloc: Option<u64>,
    pub hugetlb_pgfail: Option<u64>,
    /// Seconds since the epoch of the guest's last report (0: none yet).
    pub last_update: u64,
}

/// An event on a [`Request::Watch`] connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    StateChanged {
        state: RunState,
    },
    /// The guest ejected a device after [`Request::RemoveDevice`]; its host resources (image
    /// lock, TAP) are released.
    DeviceRemoved {
        id: String,
    },
    /// A vCPU came online after [`Request::SetVcpus`] (its thread exists).
    VcpuAdded {
        vcpu: u32,
        tid: i32,
    },
    /// The guest ejected vCPU `vcpu` after [`Request::SetVcpus`]; its thread has ended.
    VcpuRemoved {
        vcpu: u32,
    },
    /// The balloon's actual size changed (QEMU's BALLOON_CHANGE).
    BalloonChanged {
        actual_bytes: u64,
    },
    /// The VM has stopped; the process exits right after with `reason.exit_code()`.
    Exited {
        reason: ExitReason,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_stable_wire_form() {
        let line = serde_json::to_string(&Request::PowerButton).unwrap();
        assert_eq!(line, r#"{"request":"power_button"}"#);
        let back: Request = serde_json::from_str(r#"{"request":"vcpu_info"}"#).unwrap();
        assert_eq!(back, Request::VcpuInfo);
    }

    #[test]
    fn events_round_trip() {
        let ev = Event::Exited {
            reason: ExitReason::Reboot,
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert_eq!(line, r#"{"event":"exited","reason":"reboot"}"#);
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), ev);
    }

    #[test]
    fn exit_codes_map_both_ways() {
        for r in [
            ExitReason::Poweroff,
            ExitReason::Reboot,
            ExitReason::Crash,
            ExitReason::Error,
        ] {
            assert_eq!(ExitReason::from_exit_code(r.exit_code()), Some(r));
        }
        assert_eq!(ExitReason::from_exit_code(exit_code::USAGE), None);
    }
}
