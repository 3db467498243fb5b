//! The REST API between `rvirt` (and any other client) and `rvirtd`: JSON bodies over HTTP/1.1 on
//! the daemon's unix socket, under the versioned prefix [`PREFIX`]. Field names follow libvirt's
//! and virsh's vocabulary so that users of `virsh --json`-style tooling feel at home.
//!
//! Errors are a non-2xx status with an [`ErrorBody`].

use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "/v1";

/// The header a client sends (with `Connection: Upgrade`) to turn a console request into a raw
/// byte stream.
pub const CONSOLE_UPGRADE: &str = "rvirt-console";

/// libvirt's domain states (virsh's spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DomainState {
    #[serde(rename = "running")]
    Running,
    #[serde(rename = "paused")]
    Paused,
    #[serde(rename = "in shutdown")]
    InShutdown,
    #[serde(rename = "shut off")]
    ShutOff,
    #[serde(rename = "crashed")]
    Crashed,
}

impl DomainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::InShutdown => "in shutdown",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
        }
    }

    pub fn is_active(self) -> bool {
        !matches!(self, DomainState::ShutOff)
    }
}

/// libvirt's state reasons, as virsh `domstate --reason` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateReason {
    /// running: started normally.
    Booted,
    /// running: resumed after a pause.
    Unpaused,
    /// paused: paused by the user; in shutdown: shutdown requested.
    User,
    /// shut off: the guest shut down.
    Shutdown,
    /// shut off: forced off (virsh destroy).
    Destroyed,
    /// shut off: the VMM died or the guest crashed.
    Crashed,
    /// shut off: the VMM failed to start or failed while running.
    Failed,
    /// never started in this daemon's life, or state not known.
    Unknown,
}

impl StateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StateReason::Booted => "booted",
            StateReason::Unpaused => "unpaused",
            StateReason::User => "user",
            StateReason::Shutdown => "shutdown",
            StateReason::Destroyed => "destroyed",
            StateReason::Crashed => "crashed",
            StateReason::Failed => "failed",
            StateReason::Unknown => "unknown",
        }
    }
}

/// One row of `GET /v1/domains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    /// Runtime id, present while the domain is active.
    pub id: Option<u32>,
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub reason: StateReason,
    pub persistent: bool,
    pub autostart: bool,
}

/// `GET /v1/domains/{name}`: what virsh dominfo shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    #[serde(flatten)]
    pub summary: DomainSummary,
    pub os_type: String,
    pub vcpus: u32,
    pub max_memory_kib: u64,
    pub used_memory_kib: u64,
    /// CPU time of the VMM process, while active.
    pub cpu_time_ns: Option<u64>,
    /// VMM process id, while active.
    pub pid: Option<u32>,
    /// How the running VMM backs guest RAM (source, sharing, KSM, THP), while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_backing: Option<crate::vmm::MemoryBackingInfo>,
}

/// `POST /v1/domains`: define (persistent) or create (transient, started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefineRequest {
    pub xml: String,
    /// Create a transient domain and start it (virsh create) instead of defining it.
    #[serde(default)]
    pub transient: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefineResponse {
    pub name: String,
    pub uuid: String,
    /// Parts of the definition that rvirt keeps but does not act on.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XmlBody {
    pub xml: String,
}

/// Body of `POST /v1/domains/{name}/start` (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// Leave the domain paused once its VMM is up (virsh start --paused).
    #[serde(default)]
    pub paused: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownRequest {
    /// Wait this long for the guest to power off; fail (domain left running) when it does not.
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutostartRequest {
    pub enable: bool,
}

/// Where a pinning change applies (virsh --live/--config/--current).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinScope {
    #[serde(default)]
    pub live: bool,
    #[serde(default)]
    pub config: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuPinRequest {
    pub vcpu: u32,
    /// libvirt cpuset syntax: `0-3,^2`.
    pub cpuset: String,
    #[serde(flatten)]
    pub scope: PinScope,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmulatorPinRequest {
    pub cpuset: String,
    #[serde(flatten)]
    pub scope: PinScope,
}

/// One row of `GET /v1/domains/{name}/vcpupin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuPin {
    pub vcpu: u32,
    /// Compact cpuset of the allowed host CPUs.
    pub affinity: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinInfo {
    pub host_cpus: usize,
    pub vcpus: Vec<VcpuPin>,
    pub emulator: String,
}

/// One row of `GET /v1/domains/{name}/vcpus` (virsh vcpuinfo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuInfo {
    pub vcpu: u32,
    /// Host CPU the thread last ran on.
    pub cpu: Option<u32>,
    pub state: String,
    pub cpu_time_ns: u64,
    pub affinity: String,
    /// y/- map over host CPUs, as virsh prints it.
    pub affinity_map: String,
    pub tid: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub target: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub device: String,
    pub format: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// Host-side TAP name while active, else "-".
    pub interface: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub model: String,
    pub mac: String,
}

/// `GET /v1/domains/{name}/memstats` (virsh dommemstat), in KiB (faults and hugetlb counts are
/// counts, `last_update` seconds since the epoch). Guest-reported fields are absent until the
/// guest reported them (statistics polling is set with `PUT .../memstats/period`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_fault: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_fault: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usable: Option<u64>,
    /// Memory the guest has: the balloon's actual size (currentMemory without a balloon).
    pub actual: u64,
    /// Resident set size of the VMM process, guest memory included.
    pub rss: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_pgalloc: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_pgfail: Option<u64>,
}

/// `PUT /v1/domains/{name}/memory` (virsh setmem / setmaxmem).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRequest {
    pub size_kib: u64,
    /// Change `<memory>` (setmaxmem) instead of the current size (setmem).
    #[serde(default)]
    pub maximum: bool,
    /// Neither live nor config: the running domain if active, else the definition.
    #[serde(flatten)]
    pub scope: PinScope,
}

/// `PUT /v1/domains/{name}/memstats/period` (virsh dommemstat --period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsPeriodRequest {
    pub seconds: u32,
    #[serde(flatten)]
    pub scope: PinScope,
}

/// `PUT /v1/domains/{name}/vcpus` (virsh setvcpus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpusRequest {
    pub count: u32,
    /// Change the maximum (`<vcpu>N</vcpu>`, config only) instead of the current count.
    #[serde(default)]
    pub maximum: bool,
    #[serde(flatten)]
    pub scope: PinScope,
}

/// `GET /v1/domains/{name}/vcpucount` (virsh vcpucount); live values while active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCount {
    pub maximum_config: u32,
    pub maximum_live: Option<u32>,
    pub current_config: u32,
    pub current_live: Option<u32>,
}

/// `POST /v1/domains/{name}/devices`: hotplug and/or add to the definition a `<disk>` or
/// `<interface>` (virsh attach-device / attach-disk / attach-interface).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub xml: String,
    #[serde(flatten)]
    pub scope: PinScope,
}

/// Where an attached device went (live attach), libvirt's alias and PCI slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachResponse {
    pub alias: Option<String>,
    pub slot: Option<u8>,
}

/// `POST /v1/domains/{name}/devices/detach`: the device named by `xml` (a `<disk>` by target,
/// an `<interface>` by MAC) or by `key` (disk target, MAC address or alias).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachRequest {
    #[serde(default)]
    pub xml: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    /// `disk` or `interface`: only match that kind (virsh detach-disk / detach-interface).
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(flatten)]
    pub scope: PinScope,
}

/// `POST /v1/domains/{name}/media` (virsh change-media): the disc in a CD-ROM drive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeMediaRequest {
    /// The drive: its target (`sda`) or its current source path.
    pub path: String,
    /// The new disc (an ISO or raw image); absent with `eject`.
    #[serde(default)]
    pub source: Option<String>,
    /// `eject`, `insert` (only into an empty drive) or `update` (the default: replace, or eject
    /// without `source`).
    #[serde(default)]
    pub action: Option<String>,
    /// Eject even if the guest has locked the tray.
    #[serde(default)]
    pub force: bool,
    #[serde(flatten)]
    pub scope: PinScope,
}

/// `GET /v1/domains/{name}/stats` (virsh domstats / domblkstat / domifstat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStats {
    pub name: String,
    pub state: DomainState,
    pub reason: StateReason,
    pub cpu_time_ns: u64,
    pub balloon_current_kib: u64,
    pub balloon_maximum_kib: u64,
    pub rss_kib: u64,
    pub vcpu_current: u32,
    pub vcpu_maximum: u32,
    pub block: Vec<BlockStats>,
    pub net: Vec<NetStats>,
}

/// Counters of one disk, with virsh domblkstat's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    /// Target (`vda`).
    pub name: String,
    pub path: String,
    pub rd_req: u64,
    pub rd_bytes: u64,
    pub wr_req: u64,
    pub wr_bytes: u64,
    pub flush_operations: u64,
    pub errs: u64,
}

/// Counters of one NIC, from the guest's side (rx: received by the guest), virsh's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// TAP name (`rvnet0`).
    pub name: String,
    pub mac: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errs: u64,
    pub rx_drop: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errs: u64,
    pub tx_drop: u64,
}

/// `POST /v1/domains/{name}/monitor` (virsh qemu-monitor-command): a QMP command (JSON text) or,
/// with `hmp`, a human monitor command line, answered from rvirt-vmm's control requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorRequest {
    pub command: String,
    #[serde(default)]
    pub hmp: bool,
}

/// The monitor's reply: HMP text, or the QMP reply object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorReply {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub json: Option<serde_json::Value>,
}

/// `GET /v1/networks` row and `GET /v1/networks/{name}` (virsh net-list / net-info).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSummary {
    pub name: String,
    pub uuid: String,
    pub active: bool,
    pub autostart: bool,
    pub persistent: bool,
    /// The bridge guests join ("" when none).
    pub bridge: String,
}

/// `POST /v1/networks`: define a network from libvirt network XML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDefineRequest {
    pub xml: String,
}

/// `POST /v1/networks` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDefineResponse {
    pub name: String,
    pub uuid: String,
}

/// `GET /v1/networks/{name}/dhcp-leases` row; libvirt's JSON field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDhcpLease {
    pub iface: String,
    /// Seconds since the epoch; 0 for an infinite lease.
    pub expirytime: u64,
    /// "ipv4" or "ipv6".
    #[serde(rename = "type")]
    pub kind: String,
    pub mac: String,
    pub ipaddr: String,
    pub prefix: u8,
    pub hostname: Option<String>,
    pub clientid: Option<String>,
}

/// `GET /v1/domains/{name}/ifaddr` row (virsh domifaddr, lease source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfAddr {
    /// Host-side TAP name.
    pub name: String,
    pub mac: String,
    /// "ipv4".
    pub protocol: String,
    /// address/prefix
    pub address: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// Machine-readable class, after libvirt's error codes.
    pub code: ErrorCode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NoDomain,
    NoNetwork,
    OperationInvalid,
    XmlError,
    ConfigUnsupported,
    InvalidArg,
    OperationFailed,
    OperationTimeout,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NoDomain | ErrorCode::NoNetwork => 404,
            ErrorCode::OperationInvalid => 409,
            ErrorCode::XmlError | ErrorCode::ConfigUnsupported | ErrorCode::InvalidArg => 400,
            ErrorCode::OperationTimeout => 504,
            ErrorCode::OperationFailed | ErrorCode::Internal => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_use_virsh_spelling() {
        assert_eq!(
            serde_json::to_string(&DomainState::ShutOff).unwrap(),
            "\"shut off\""
        );
        assert_eq!(
            serde_json::to_string(&StateReason::Destroyed).unwrap(),
            "\"destroyed\""
        );
        let p: VcpuPinRequest =
            serde_json::from_str(r#"{"vcpu":1,"cpuset":"0","live":true}"#).unwrap();
        assert!(p.scope.live && !p.scope.config);
    }
}
