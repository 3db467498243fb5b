//! Command line of `rvirt-vmm`: two front ends, one [`VmConfig`].
//!
//! Either the VM-describing flags (`--kernel`, `--memory`, `--disk` ...) or `--config FILE`
//! (the same struct as JSON, which is what rvirtd writes) build a
//! [`rvirt_api::vmm_config::VmConfig`]; [`validate`] then checks it the same way for both.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;

pub use rvirt_api::vmm_config::{
    BalloonConfig, BootConfig, CacheMode, CpuConfig, DiskBus, DiskConfig, DiskDevice, DiskFormat,
    MemoryBacking, MemoryConfig, NetConfig, SerialConfig, VcpuAffinity, VmConfig,
};

/// The old name of [`SerialConfig`] (same variants).
pub type SerialMode = SerialConfig;

/// Flags that describe the VM: `--config` replaces all of them.
const VM_FLAGS: &[&str] = &[
    "kernel",
    "firmware",
    "nvram",
    "boot_menu",
    "initrd",
    "cmdline",
    "memory",
    "cpus",
    "max_cpus",
    "disk",
    "net",
    "serial",
    "balloon",
    "start_paused",
    "no_rng",
    "api_socket",
    "name",
];

/// Kernel command line when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Smallest guest RAM accepted (16 MiB).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest RAM accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs (boot or hotplug maximum) accepted.
pub const MAX_VCPUS: u32 = 254;
/// Longest disk serial (virtio-blk's ID field).
pub const MAX_DISK_SERIAL: usize = 20;

/// rvirt's virtual machine monitor: runs one VM on /dev/kvm.
///
/// The VM is described either by the flags below or by `--config FILE` (JSON, the
/// rvirt_api::vmm_config::VmConfig struct; see docs/vmm.md), not both.
///
/// Exit status: 0 guest powered off (or quit via the control socket), 1 VMM error,
/// 2 usage error, 3 guest reboot, 4 guest crash (triple fault).
#[derive(Parser, Debug)]
#[command(name = "rvirt-vmm", version, about, long_about = None, args_override_self = true)]
pub struct Args {
    /// The whole VM configuration as a JSON file (what rvirtd writes); excludes every other
    /// flag.
    #[arg(long, value_name = "FILE", conflicts_with_all = VM_FLAGS)]
    pub config: Option<PathBuf>,
    /// Guest kernel: ELF vmlinux (PVH entry or 64-bit boot protocol) or bzImage.
    #[arg(long, required_unless_present_any = ["config", "firmware"], conflicts_with = "firmware")]
    pub kernel: Option<PathBuf>,
    /// Boot firmware instead of a kernel: a code image mapped read-only so that it ends at
    /// 4 GiB (SeaBIOS bios-256k.bin, OVMF_CODE_4M.fd); the vCPUs start at its reset vector.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["initrd", "cmdline"])]
    pub firmware: Option<PathBuf>,
    /// The UEFI variable store for --firmware (a per-VM copy of OVMF_VARS_4M.fd): CFI flash
    /// just below the code image, written through to this file.
    #[arg(long, value_name = "PATH", requires = "firmware")]
    pub nvram: Option<PathBuf>,
    /// Offer the firmware's boot menu for --firmware, waiting MS milliseconds.
    #[arg(long, value_name = "MS", requires = "firmware")]
    pub boot_menu: Option<u16>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM (the memory map's size), e.g. 512M, 1G, or a number of MiB [default: 512M].
    #[arg(long)]
    pub memory: Option<String>,
    /// Number of vCPUs running at boot [default: 1].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Most vCPUs the VM can have (hotplug maximum) [default: --cpus].
    #[arg(long, value_name = "N")]
    pub max_cpus: Option<u32>,
    /// Disk: path=FILE[,format=raw|qcow2][,readonly=on][,cache=MODE][,serial=S][,id=ID], MODE
    /// one of none, writeback (default), writethrough, directsync, unsafe. Repeatable. A path
    /// with ',' needs --config.
    #[arg(long)]
    pub disk: Vec<String>,
    /// Network interface: tap=NAME[,mac=52:54:00:xx:xx:xx][,id=ID]. Repeatable.
    #[arg(long)]
    pub net: Vec<String>,
    /// Serial console (COM1): stdio, pty, socket=PATH or none [default: stdio]. With stdio on a
    /// terminal, the terminal is in raw mode (Ctrl-C goes to the guest) until exit; Ctrl-A x
    /// quits.
    #[arg(long)]
    pub serial: Option<String>,
    /// Add a virtio balloon:
    /// [deflate_on_oom=on][,free_page_reporting=on][,stats_period=SECS][,current=SIZE];
    /// current= is the balloon target at start (the guest starts with that much usable RAM).
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    pub balloon: Option<String>,
    /// Start with the vCPUs stopped; `resume` on the control socket starts them.
    #[arg(long)]
    pub start_paused: bool,
    /// No virtio entropy device.
    #[arg(long)]
    pub no_rng: bool,
    /// Control socket (JSON lines, see rvirt_api::vmm).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// VM name (shown in `info` and logs).
    #[arg(long)]
    pub name: Option<String>,
}

/// Parses a size: `512M`, `1G`, `2048` (MiB), `1T`, `65536K`. `what` names the setting in
/// errors.
pub fn parse_size(s: &str, what: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64 << 20),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_lowercase();
            let mult = match unit.as_str() {
                "k" | "kib" | "kb" => 1 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                "t" | "tib" | "tb" => 1 << 40,
                _ => bail!(
                    "{what} {s:?}: unknown unit {:?}; use e.g. 512M or 2G",
                    &t[i..]
                ),
            };
            (&t[..i], mult)
        }
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{what} {s:?}: not a size; use e.g. 512M or 2G"))?;
    let bytes = n
        .checked_mul(mult)
        .with_context(|| format!("{what} {s:?} is too big"))?;
    Ok(bytes & !0xfff)
}

/// Parses `--memory`: a size from 16M to 1T, rounded down to 4 KiB.
pub fn parse_memory(s: &str) -> Result<u64> {
    let bytes = parse_size(s, "--memory")?;
    if bytes < MIN_MEMORY {
        bail!("--memory {s:?} is too small: give at least 16M");
    }
    if bytes > MAX_MEMORY {
        bail!("--memory {s:?} is too big: at most 1T is supported");
    }
    Ok(bytes)
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("mac {s:?}: expected six hex bytes like 52:54:00:12:34:56");
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16)
            .with_context(|| format!("mac {s:?}: {p:?} is not a hex byte"))?;
    }
    Ok(mac)
}

/// The MAC of NIC `index` when none is given: 52:54:00:12:34:(56+index), as always.
pub fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]
}

fn kv(spec: &str) -> Vec<(String, String)> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" | "" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses `path=FILE[,format=raw|qcow2][,readonly=on][,cache=MODE][,serial=S][,id=ID]
/// [,bus=virtio|scsi][,device=disk|cdrom][,unit=N][,bootindex=N]`. A CD-ROM may leave out
/// `path=` (an empty drive). Whether the file exists is checked by [`validate`].
pub fn parse_disk(spec: &str) -> Result<DiskConfig> {
    let mut d = DiskConfig::default();
    let number = |k: &str, v: &str| -> Result<u32> {
        v.parse()
            .with_context(|| format!("--disk {spec:?}: {k}= must be a number, not {v:?}"))
    };
    for (k, v) in kv(spec) {
        match k.as_str() {
            "path" => d.path = Some(PathBuf::from(v)),
            "format" => {
                d.format = Some(match v.as_str() {
                    "raw" => DiskFormat::Raw,
                    "qcow2" => DiskFormat::Qcow2,
                    _ => bail!("--disk {spec:?}: format must be raw or qcow2, not {v:?}"),
                })
            }
            "readonly" => {
                d.readonly = on_off(&v)
                    .with_context(|| format!("--disk {spec:?}: readonly must be on or off"))?
            }
            "cache" => {
                d.cache = CacheMode::parse(&v).with_context(|| {
                    format!(
                        "--disk {spec:?}: cache must be none, writeback, writethrough, \
                         directsync or unsafe, not {v:?}"
                    )
                })?
            }
            "serial" => d.serial = Some(v),
            "id" => d.id = Some(v),
            "bus" => {
                d.bus = match v.as_str() {
                    "virtio" => DiskBus::Virtio,
                    "scsi" => DiskBus::Scsi,
                    _ => bail!("--disk {spec:?}: bus must be virtio or scsi, not {v:?}"),
                }
            }
            "device" | "media" => {
                d.device = match v.as_str() {
                    "disk" => DiskDevice::Disk,
                    "cdrom" => DiskDevice::Cdrom,
                    _ => bail!("--disk {spec:?}: device must be disk or cdrom, not {v:?}"),
                }
            }
            "unit" => {
                d.unit = Some(
                    u8::try_from(number(&k, &v)?)
                        .map(u16::from)
                        .with_context(|| {
                            format!("--disk {spec:?}: unit= must be a SCSI target id 0..=255")
                        })?,
                )
            }
            "bootindex" | "boot_order" => d.boot_order = Some(number(&k, &v)?),
            _ => bail!(
                "--disk {spec:?}: unknown key {k:?}; use path=,format=,readonly=,cache=,serial=,\
                 id=,bus=,device=,unit=,bootindex="
            ),
        }
    }
    if d.path.is_none() && d.device != DiskDevice::Cdrom {
        bail!("--disk {spec:?}: path=FILE is required (only device=cdrom may be empty)");
    }
    // Optical media are read-only whatever the flags say (QEMU's scsi-cd, libvirt's cdrom).
    if d.device == DiskDevice::Cdrom {
        d.readonly = true;
    }
    Ok(d)
}

/// Parses `tap=NAME[,mac=M][,id=ID]`; without mac= the VMM picks [`default_mac`].
pub fn parse_net(spec: &str) -> Result<NetConfig> {
    let mut tap = None;
    let mut mac = None;
    let mut id = None;
    for (k, v) in kv(spec) {
        match k.as_str() {
            "tap" => tap = Some(v),
            "mac" => mac = Some(parse_mac(&v).with_context(|| format!("--net {spec:?}"))?),
            "id" => id = Some(v),
            _ => bail!("--net {spec:?}: unknown key {k:?}; use tap=NAME,mac=M,id=ID"),
        }
    }
    let tap = tap.with_context(|| format!("--net {spec:?}: tap=NAME is required"))?;
    Ok(NetConfig { tap, mac, id })
}

/// Parses `stdio|pty|socket=PATH|none`.
pub fn parse_serial(s: &str) -> Result<SerialConfig> {
    Ok(match s {
        "stdio" => SerialConfig::Stdio,
        "pty" => SerialConfig::Pty,
        "none" | "null" => SerialConfig::None,
        _ => match s.strip_prefix("socket=") {
            Some(p) if !p.is_empty() => SerialConfig::Socket(PathBuf::from(p)),
            _ => bail!("--serial {s:?}: use stdio, pty, socket=PATH or none"),
        },
    })
}

/// Parses `--balloon [deflate_on_oom=on][,free_page_reporting=on][,stats_period=N][,current=SIZE]`
/// into the balloon and the start target (`current=`).
pub fn parse_balloon(spec: &str) -> Result<(BalloonConfig, Option<u64>)> {
    let mut b = BalloonConfig::default();
    let mut current = None;
    for (k, v) in kv(spec) {
        let flag = |v: &str| {
            on_off(v).with_context(|| format!("--balloon {spec:?}: {k} must be on or off"))
        };
        match k.as_str() {
            "deflate_on_oom" => b.deflate_on_oom = flag(&v)?,
            "free_page_reporting" => b.free_page_reporting = flag(&v)?,
            "stats_period" => {
                b.stats_period = v.parse().with_context(|| {
                    format!("--balloon {spec:?}: stats_period must be a number of seconds")
                })?
            }
            "current" => current = Some(parse_size(&v, "--balloon current=")?),
            _ => bail!(
                "--balloon {spec:?}: unknown key {k:?}; use deflate_on_oom=,free_page_reporting=,\
                 stats_period=,current="
            ),
        }
    }
    Ok((b, current))
}

/// Reads a `--config` file (JSON [`VmConfig`]); it is validated by [`from_args`].
pub fn load_config(path: &Path) -> Result<VmConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--config {}: cannot read the file", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--config {}: not a valid VM configuration (JSON, see docs/vmm.md); fix the field named",
            path.display()
        )
    })
}

fn config_from_flags(a: &Args) -> Result<VmConfig> {
    let boot = match (&a.kernel, &a.firmware) {
        (_, Some(firmware)) => BootConfig::Firmware {
            firmware: firmware.clone(),
            nvram: a.nvram.clone(),
            boot_menu_ms: a.boot_menu,
        },
        (Some(kernel), None) => BootConfig::Kernel {
            kernel: kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.into()),
        },
        (None, None) => {
            bail!("--kernel or --firmware is required (or give the whole VM with --config FILE)")
        }
    };
    let (balloon, current) = match &a.balloon {
        Some(spec) => {
            let (b, c) = parse_balloon(spec)?;
            (Some(b), c)
        }
        None => (None, None),
    };
    let size = match &a.memory {
        Some(m) => parse_memory(m)?,
        None => DEFAULT_MEMORY,
    };
    Ok(VmConfig {
        name: a.name.clone(),
        boot,
        memory: MemoryConfig {
            size,
            current,
            backing: MemoryBacking::default(),
        },
        cpus: CpuConfig {
            boot: a.cpus.unwrap_or(1),
            max: a.max_cpus,
        },
        disks: a
            .disk
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<_>>()?,
        nets: a.net.iter().map(|n| parse_net(n)).collect::<Result<_>>()?,
        serial: match &a.serial {
            Some(s) => parse_serial(s)?,
            None => SerialConfig::Stdio,
        },
        balloon,
        rng: !a.no_rng,
        api_socket: a.api_socket.clone(),
        start_paused: a.start_paused,
        emulator_affinity: None,
        vcpu_affinity: Vec::new(),
    })
}

/// Builds the configuration from the command line (flags or `--config`) and validates it.
pub fn from_args(a: &Args) -> Result<VmConfig> {
    let cfg = match &a.config {
        Some(path) => load_config(path)?,
        None => config_from_flags(a)?,
    };
    validate(&cfg)?;
    Ok(cfg)
}

/// Checks a configuration, whichever front end built it. Each error names the setting as both
/// spell it (JSON field, flag) and says what to do.
pub fn validate(cfg: &VmConfig) -> Result<()> {
    match &cfg.boot {
        BootConfig::Kernel {
            kernel,
            initrd,
            cmdline,
        } => validate_kernel(kernel, initrd.as_deref(), cmdline)?,
        BootConfig::Firmware {
            firmware, nvram, ..
        } => crate::firmware::check_images(firmware, nvram.as_deref())?,
    }
    validate_machine(cfg)
}

fn validate_kernel(kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> Result<()> {
    if !kernel.is_file() {
        bail!(
            "kernel {} (boot.kernel, --kernel): no such file; give the path of a vmlinux (ELF) or bzImage",
            kernel.display()
        );
    }
    if let Some(i) = initrd {
        if !i.is_file() {
            bail!(
                "initrd {} (boot.initrd, --initrd): no such file; fix the path",
                i.display()
            );
        }
    }
    if cmdline.len() >= crate::layout::CMDLINE_MAX {
        bail!(
            "the kernel command line (boot.cmdline, --cmdline) is {} bytes long: at most {} are supported",
            cmdline.len(),
            crate::layout::CMDLINE_MAX - 1
        );
    }
    if cmdline.contains('\0') {
        bail!("the kernel command line (boot.cmdline, --cmdline) contains a NUL byte; remove it");
    }
    Ok(())
}

fn validate_machine(cfg: &VmConfig) -> Result<()> {
    let boot = cfg.cpus.boot;
    if boot == 0 {
        bail!("--cpus 0 (cpus.boot): a VM needs at least one vCPU");
    }
    if boot > MAX_VCPUS {
        bail!("--cpus {boot} (cpus.boot): at most {MAX_VCPUS} vCPUs are supported");
    }
    if let Some(max) = cfg.cpus.max {
        if max < boot {
            bail!(
                "cpus.max (--max-cpus) {max} is below cpus.boot (--cpus) {boot}: give a maximum of at least {boot}"
            );
        }
        if max > MAX_VCPUS {
            bail!("cpus.max (--max-cpus) is {max}: at most {MAX_VCPUS} vCPUs are supported");
        }
    }

    let mem = &cfg.memory;
    let mib = |b: u64| b >> 20;
    if mem.size < MIN_MEMORY || mem.size > MAX_MEMORY {
        bail!(
            "memory.size (--memory) is {} MiB: give 16 MiB to 1 TiB",
            mib(mem.size)
        );
    }
    if !mem.size.is_multiple_of(4096) {
        bail!(
            "memory.size (--memory) {} bytes is not a multiple of 4 KiB; round it",
            mem.size
        );
    }
    if let Some(cur) = mem.current {
        if cur > mem.size {
            bail!(
                "memory.current (--balloon current=) {} MiB is above memory.size (--memory) {} MiB: \
                 the balloon can only take memory away; lower it or raise the size",
                mib(cur),
                mib(mem.size)
            );
        }
        if cur < MIN_MEMORY {
            bail!(
                "memory.current (--balloon current=) is {} MiB: give at least 16 MiB",
                mib(cur)
            );
        }
        if !cur.is_multiple_of(4096) {
            bail!(
                "memory.current (--balloon current=) {cur} bytes is not a multiple of 4 KiB; round it"
            );
        }
        if cur < mem.size && cfg.balloon.is_none() {
            bail!(
                "memory.current {} MiB is below memory.size {} MiB but there is no balloon to hold \
                 the difference: add a balloon (\"balloon\": {{}}, --balloon) or drop memory.current",
                mib(cur),
                mib(mem.size)
            );
        }
    }
    if mem.backing.shared && !(mem.backing.memfd || mem.backing.hugepages) {
        bail!(
            "memory.backing.shared needs memfd or hugepages backing (anonymous private memory \
             cannot be shared): set memory.backing.memfd"
        );
    }

    let mut ids = HashSet::new();
    let mut units = HashSet::new();
    let mut boot_orders = HashSet::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        match &d.path {
            None if d.device != DiskDevice::Cdrom => bail!(
                "disks[{i}].path (--disk path=) is missing; give the image file (only a CD-ROM \
                 drive may be empty)"
            ),
            None => {}
            Some(p) if p.as_os_str().is_empty() => {
                bail!("disks[{i}].path (--disk path=) is empty; give the image file")
            }
            Some(p) if !p.exists() => bail!(
                "disks[{i}].path (--disk path=): disk image {} does not exist; create it \
                 (rvirt-img create) or fix the path",
                p.display()
            ),
            Some(_) => {}
        }
        if d.device == DiskDevice::Cdrom {
            if d.bus == DiskBus::Virtio {
                bail!(
                    "disks[{i}]: a CD-ROM cannot be a virtio-blk disk; put it on the SCSI \
                     controller (--disk bus=scsi,device=cdrom)"
                );
            }
            if !d.readonly {
                bail!("disks[{i}]: a CD-ROM is read-only; drop readonly=off");
            }
        }
        if let Some(u) = d.unit {
            if d.bus != DiskBus::Scsi {
                bail!("disks[{i}].unit (--disk unit=) is a SCSI target id: it needs bus=scsi");
            }
            if u > 255 {
                bail!("disks[{i}].unit (--disk unit=) {u} is beyond the last SCSI target 255");
            }
            if !units.insert(u) {
                bail!(
                    "disks[{i}].unit (--disk unit=) {u} is taken by another SCSI disk; choose \
                     another unit"
                );
            }
        }
        if let Some(b) = d.boot_order {
            if !matches!(cfg.boot, BootConfig::Firmware { .. }) {
                bail!(
                    "disks[{i}].boot_order (--disk bootindex=) only applies to firmware boot \
                     (--firmware); a kernel boot does not read it"
                );
            }
            if b == 0 {
                bail!("disks[{i}].boot_order (--disk bootindex=) starts at 1");
            }
            if !boot_orders.insert(b) {
                bail!(
                    "disks[{i}].boot_order (--disk bootindex=) {b} is given to two devices; \
                     make each unique"
                );
            }
        }
        if let Some(s) = &d.serial {
            if s.len() > MAX_DISK_SERIAL {
                bail!(
                    "disks[{i}].serial (--disk serial=) {s:?} is {} bytes: virtio-blk serials are at most {MAX_DISK_SERIAL} bytes; shorten it",
                    s.len()
                );
            }
            if let Some(c) = s.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
                bail!(
                    "disks[{i}].serial (--disk serial=) {s:?} contains {c:?}: use printable ASCII"
                );
            }
        }
        if let Some(id) = &d.id {
            check_id(id, &format!("disks[{i}].id (--disk id=)"), &mut ids)?;
        }
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        if n.tap.is_empty() || n.tap.len() > 15 || n.tap.contains(['/', ' ', '\0']) {
            bail!(
                "nets[{i}].tap (--net tap=) {:?} is not an interface name: give 1 to 15 characters without '/' or spaces",
                n.tap
            );
        }
        if let Some(mac) = n.mac {
            if mac[0] & 1 != 0 {
                bail!(
                    "nets[{i}].mac (--net mac=) {}: a multicast address cannot be a NIC's; clear the low bit of the first byte (e.g. 52:54:00:...)",
                    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
                );
            }
        }
        if let Some(id) = &n.id {
            check_id(id, &format!("nets[{i}].id (--net id=)"), &mut ids)?;
        }
    }
    if let SerialConfig::Socket(p) = &cfg.serial {
        if p.as_os_str().is_empty() {
            bail!("serial socket path (--serial socket=) is empty; give a path");
        }
    }
    if let Some(cpus) = &cfg.emulator_affinity {
        check_cpus(cpus, "emulator_affinity")?;
    }
    let max = cfg.cpus.max();
    let mut seen = HashSet::new();
    for a in &cfg.vcpu_affinity {
        if a.vcpu >= max {
            bail!(
                "vcpu_affinity for vCPU {}: the VM has vCPUs 0-{}; drop it or raise cpus.max",
                a.vcpu,
                max - 1
            );
        }
        if !seen.insert(a.vcpu) {
            bail!("vcpu_affinity lists vCPU {} twice; keep one entry", a.vcpu);
        }
        check_cpus(&a.cpus, &format!("vcpu_affinity of vCPU {}", a.vcpu))?;
    }
    Ok(())
}

/// Settings that are valid but that this VM core does not apply yet: printed as warnings at
/// start (`rvirt-vmm: warning: ...`) so nobody believes the guest has them. Remove an entry
/// when `vm` implements it.
pub fn not_applied(cfg: &VmConfig) -> Vec<String> {
    let mut w = Vec::new();
    // A start target below the RAM size needs a balloon to take the rest away.
    if cfg.balloon.is_none() && cfg.memory.current.is_some_and(|c| c < cfg.memory.size) {
        w.push(format!(
            "memory.current without a balloon: the guest gets all {} MiB of memory.size; add a balloon (--balloon) to start it smaller",
            cfg.memory.size >> 20
        ));
    }
    w
}

fn check_id(id: &str, what: &str, ids: &mut HashSet<String>) -> Result<()> {
    if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{what} {id:?}: give a non-empty id without spaces");
    }
    if !ids.insert(id.to_string()) {
        bail!("{what} {id:?} is already used by another device; device ids must be unique");
    }
    Ok(())
}

fn check_cpus(cpus: &[usize], what: &str) -> Result<()> {
    if cpus.is_empty() {
        bail!("{what} is an empty CPU list; give at least one host CPU or leave it out");
    }
    if let Some(c) = cpus.iter().find(|&&c| c >= libc::CPU_SETSIZE as usize) {
        bail!(
            "{what}: host CPU {c} is beyond the {} CPUs an affinity mask can hold",
            libc::CPU_SETSIZE
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn args(a: &[&str]) -> std::result::Result<Args, clap::Error> {
        let mut v = vec!["rvirt-vmm"];
        v.extend_from_slice(a);
        Args::try_parse_from(v)
    }

    fn cfg(a: &[&str]) -> Result<VmConfig> {
        from_args(&args(a).map_err(|e| anyhow::anyhow!("{e}"))?)
    }

    struct Files {
        dir: tempfile::TempDir,
        kernel: String,
        disk: String,
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, [0u8; 512]).unwrap();
        Files {
            kernel: kernel.display().to_string(),
            disk: disk.display().to_string(),
            dir,
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("256").unwrap(), 256 << 20);
        assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("0M").is_err());
        assert!(parse_memory("2T").is_err());
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("99999999999999999999G").is_err());
    }

    #[test]
    fn serial_and_net() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialMode::Stdio);
        assert_eq!(
            parse_serial("socket=/tmp/x").unwrap(),
            SerialMode::Socket("/tmp/x".into())
        );
        assert!(parse_serial("file").is_err());
        let n = parse_net("tap=t0,mac=52:54:00:aa:bb:cc,id=net0").unwrap();
        assert_eq!(n.tap, "t0");
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(n.id.as_deref(), Some("net0"));
        assert_eq!(parse_net("tap=t1").unwrap().mac, None);
        assert_eq!(default_mac(1), [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        assert!(parse_net("mac=52:54:00:aa:bb:cc").is_err());
        assert!(parse_net("tap=t,mac=zz").is_err());
        assert!(parse_net("tap=t,queues=2").is_err());
    }

    #[test]
    fn disk_specs() {
        let d =
            parse_disk("path=/x.img,format=raw,readonly=on,cache=none,serial=SN 1,id=virtio-disk0")
                .unwrap();
        assert_eq!(d.path, Some(PathBuf::from("/x.img")));
        assert!(d.readonly);
        assert_eq!((d.bus, d.device), (DiskBus::Virtio, DiskDevice::Disk));
        assert_eq!(d.format, Some(DiskFormat::Raw));
        assert_eq!(d.cache, CacheMode::None);
        assert_eq!(d.serial.as_deref(), Some("SN 1"));
        assert_eq!(d.id.as_deref(), Some("virtio-disk0"));
        for (m, c) in [
            ("writeback", CacheMode::Writeback),
            ("writethrough", CacheMode::Writethrough),
            ("directsync", CacheMode::Directsync),
            ("unsafe", CacheMode::Unsafe),
        ] {
            assert_eq!(parse_disk(&format!("path=/x,cache={m}")).unwrap().cache, c);
        }
        assert_eq!(parse_disk("path=/x").unwrap().cache, CacheMode::Writeback);
        assert!(parse_disk("path=/x,cache=fast").is_err());
        assert!(parse_disk("path=/x,format=vmdk").is_err());
        assert!(parse_disk("format=raw").is_err());
        assert!(parse_disk("path=/x,iothread=1").is_err());
        let cd = parse_disk("bus=scsi,device=cdrom,unit=2").unwrap();
        assert_eq!(cd.path, None);
        assert!(cd.readonly, "a CD-ROM is read-only");
        assert_eq!(
            (cd.bus, cd.device, cd.unit),
            (DiskBus::Scsi, DiskDevice::Cdrom, Some(2))
        );
        let d = parse_disk("path=/d.img,bus=scsi,bootindex=1").unwrap();
        assert_eq!((d.bus, d.boot_order), (DiskBus::Scsi, Some(1)));
        assert!(parse_disk("bus=scsi").is_err(), "a disk needs a path");
        assert!(parse_disk("path=/x,bus=ide").is_err());
        assert!(parse_disk("path=/x,device=floppy").is_err());
        assert!(parse_disk("path=/x,unit=300").is_err());
        assert!(parse_disk("path=/x,bootindex=first").is_err());
    }

    #[test]
    fn balloon_spec() {
        let (b, cur) =
            parse_balloon("deflate_on_oom=on,free_page_reporting=on,stats_period=5,current=256M")
                .unwrap();
        assert!(b.deflate_on_oom && b.free_page_reporting);
        assert_eq!(b.stats_period, 5);
        assert_eq!(cur, Some(256 << 20));
        assert_eq!(parse_balloon("").unwrap(), (BalloonConfig::default(), None));
        assert!(parse_balloon("stats_period=often").is_err());
        assert!(parse_balloon("deflate_on_oom=maybe").is_err());
        assert!(parse_balloon("size=1G").is_err());
    }

    #[test]
    fn flags_build_the_config() {
        let f = files();
        let disk = format!("path={},format=qcow2,cache=unsafe,serial=S1,id=d0", f.disk);
        let c = cfg(&[
            "--kernel",
            &f.kernel,
            "--cmdline",
            "console=hvc0",
            "--memory",
            "1G",
            "--cpus",
            "2",
            "--max-cpus",
            "4",
            "--disk",
            &disk,
            "--net",
            "tap=tap0,id=n0",
            "--serial",
            "socket=/run/s.sock",
            "--balloon",
            "stats_period=5,current=512M",
            "--start-paused",
            "--no-rng",
            "--api-socket",
            "/run/api.sock",
            "--name",
            "vm1",
        ])
        .unwrap();
        assert_eq!(
            c.boot,
            BootConfig::Kernel {
                kernel: f.kernel.clone().into(),
                initrd: None,
                cmdline: "console=hvc0".into()
            }
        );
        assert_eq!(c.memory.size, 1 << 30);
        assert_eq!(c.memory.current, Some(512 << 20));
        assert_eq!(
            c.cpus,
            CpuConfig {
                boot: 2,
                max: Some(4)
            }
        );
        assert_eq!(c.disks[0].format, Some(DiskFormat::Qcow2));
        assert_eq!(c.disks[0].cache, CacheMode::Unsafe);
        assert_eq!(c.nets[0].id.as_deref(), Some("n0"));
        assert_eq!(c.serial, SerialConfig::Socket("/run/s.sock".into()));
        assert_eq!(c.balloon.as_ref().unwrap().stats_period, 5);
        assert!(c.start_paused && !c.rng);
        assert_eq!(c.api_socket, Some("/run/api.sock".into()));
        assert_eq!(c.name.as_deref(), Some("vm1"));
    }

    #[test]
    fn flag_defaults_are_unchanged() {
        let f = files();
        let c = cfg(&["--kernel", &f.kernel]).unwrap();
        assert_eq!(
            c.boot,
            BootConfig::Kernel {
                kernel: f.kernel.clone().into(),
                initrd: None,
                cmdline: DEFAULT_CMDLINE.into()
            }
        );
        assert_eq!(c.memory.size, 512 << 20);
        assert_eq!(c.memory.current, None);
        assert_eq!(c.cpus, CpuConfig { boot: 1, max: None });
        assert_eq!(c.serial, SerialConfig::Stdio);
        assert!(c.balloon.is_none() && c.rng && !c.start_paused);
        // --balloon alone: a balloon with every option off.
        let c = cfg(&["--kernel", &f.kernel, "--balloon"]).unwrap();
        assert_eq!(c.balloon, Some(BalloonConfig::default()));
    }

    fn write_json(dir: &Path, v: &serde_json::Value) -> PathBuf {
        let p = dir.join("vm.json");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(v.to_string().as_bytes()).unwrap();
        p
    }

    #[test]
    fn config_file_builds_the_same_struct() {
        let f = files();
        let disk = format!("path={},cache=writethrough,id=d0", f.disk);
        let from_flags = cfg(&[
            "--kernel",
            &f.kernel,
            "--memory",
            "256M",
            "--cpus",
            "2",
            "--disk",
            &disk,
            "--serial",
            "none",
            "--api-socket",
            "/run/a.sock",
        ])
        .unwrap();
        let p = write_json(f.dir.path(), &serde_json::to_value(&from_flags).unwrap());
        let from_file = cfg(&["--config", p.to_str().unwrap()]).unwrap();
        assert_eq!(from_file, from_flags);
        // A minimal file: defaults as documented.
        let p = write_json(
            f.dir.path(),
            &serde_json::json!({
                "boot": {"kind": "kernel", "kernel": f.kernel},
                "memory": {"size": 268435456},
                "cpus": {"boot": 1}
            }),
        );
        let c = cfg(&["--config", p.to_str().unwrap()]).unwrap();
        assert!(c.rng && c.disks.is_empty() && c.serial == SerialConfig::Stdio);
    }

    #[test]
    fn config_file_disk_path_with_commas_and_spaces() {
        // The old argv hand-over split `path=` at commas; a JSON string is just a string.
        let f = files();
        let odd = f.dir.path().join("my disk, v2,format=qcow2.img");
        std::fs::write(&odd, [0u8; 512]).unwrap();
        let p = write_json(
            f.dir.path(),
            &serde_json::json!({
                "boot": {"kind": "kernel", "kernel": f.kernel},
                "memory": {"size": 268435456},
                "cpus": {"boot": 1},
                "disks": [{"path": odd, "format": "raw"}]
            }),
        );
        let c = cfg(&["--config", p.to_str().unwrap()]).unwrap();
        assert_eq!(c.disks[0].path.as_ref(), Some(&odd));
        assert_eq!(c.disks[0].format, Some(DiskFormat::Raw));
    }

    #[test]
    fn config_conflicts_with_vm_flags() {
        for extra in [
            &["--kernel", "/k"][..],
            &["--memory", "1G"],
            &["--cpus", "2"],
            &["--disk", "path=/x"],
            &["--serial", "none"],
            &["--balloon"],
            &["--start-paused"],
            &["--api-socket", "/a"],
        ] {
            let mut a = vec!["--config", "/c.json"];
            a.extend_from_slice(extra);
            let e = args(&a).expect_err("conflict refused");
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{a:?}");
        }
        assert_eq!(
            args(&[]).unwrap_err().kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "--kernel or --config is required"
        );
        assert!(args(&["--config", "/c.json"]).is_ok());
    }

    #[test]
    fn config_file_errors_name_the_problem() {
        let f = files();
        let e = cfg(&["--config", "/nonexistent/vm.json"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        let p = write_json(
            f.dir.path(),
            &serde_json::json!({
                "boot": {"kind": "kernel", "kernel": f.kernel},
                "memory": {"size": 268435456},
                "cpus": {"boot": 1},
                "turbo": true
            }),
        );
        let e = format!("{:#}", cfg(&["--config", p.to_str().unwrap()]).unwrap_err());
        assert!(e.contains("turbo"), "{e}");
    }

    fn base(f: &Files) -> VmConfig {
        cfg(&["--kernel", &f.kernel]).unwrap()
    }

    fn refused(c: &VmConfig, needle: &str) {
        let e = validate(c).expect_err(needle).to_string();
        assert!(e.contains(needle), "{needle:?} not in {e:?}");
    }

    #[test]
    fn unapplied_settings_are_listed() {
        let f = files();
        assert!(
            not_applied(&base(&f)).is_empty(),
            "defaults are all applied"
        );
        let c = cfg(&[
            "--kernel",
            &f.kernel,
            "--start-paused",
            "--balloon",
            "current=64M",
            "--no-rng",
        ])
        .unwrap();
        assert!(not_applied(&c).is_empty(), "{:?}", not_applied(&c));
        let mut c = base(&f);
        c.memory.current = Some(c.memory.size / 2);
        let w = not_applied(&c).join("\n");
        assert!(w.contains("without a balloon"), "{w}");
    }

    #[test]
    fn validation_names_the_field() {
        let f = files();
        let mut c = base(&f);
        c.boot = BootConfig::Kernel {
            kernel: "/nonexistent/vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
        };
        refused(&c, "boot.kernel");
        let mut c = base(&f);
        c.boot = BootConfig::Kernel {
            kernel: f.kernel.clone().into(),
            initrd: Some("/nonexistent/initrd".into()),
            cmdline: String::new(),
        };
        refused(&c, "boot.initrd");
        let mut c = base(&f);
        c.boot = BootConfig::Kernel {
            kernel: f.kernel.clone().into(),
            initrd: None,
            cmdline: "x".repeat(crate::layout::CMDLINE_MAX),
        };
        refused(&c, "boot.cmdline");
        let mut c = base(&f);
        c.cpus.boot = 0;
        refused(&c, "cpus.boot");
        c.cpus.boot = 255;
        refused(&c, "at most 254");
        c.cpus = CpuConfig {
            boot: 4,
            max: Some(2),
        };
        refused(&c, "cpus.max");
        let mut c = base(&f);
        c.memory.size = 1 << 20;
        refused(&c, "memory.size");
        c.memory.size = (256 << 20) + 1;
        refused(&c, "multiple of 4 KiB");
        let mut c = base(&f);
        c.memory.current = Some(1 << 30);
        refused(&c, "above memory.size");
        c.memory.current = Some(256 << 20);
        refused(&c, "no balloon");
        c.balloon = Some(BalloonConfig::default());
        validate(&c).unwrap();
        let mut c = base(&f);
        c.memory.backing.shared = true;
        refused(&c, "memory.backing.shared");
        c.memory.backing.memfd = true;
        validate(&c).unwrap();
        let disk = |id: Option<&str>, serial: Option<&str>| DiskConfig {
            path: Some(f.disk.clone().into()),
            serial: serial.map(Into::into),
            id: id.map(Into::into),
            ..Default::default()
        };
        let mut c = base(&f);
        c.disks = vec![DiskConfig {
            path: Some("/nonexistent/disk.img".into()),
            ..disk(None, None)
        }];
        refused(&c, "disks[0].path");
        // SCSI drives: a CD-ROM only on SCSI, always read-only, may be empty; units unique;
        // boot priorities only with firmware, unique.
        let cd = DiskConfig {
            path: None,
            bus: DiskBus::Scsi,
            device: DiskDevice::Cdrom,
            readonly: true,
            ..Default::default()
        };
        c.disks = vec![cd.clone()];
        validate(&c).unwrap();
        c.disks = vec![DiskConfig {
            bus: DiskBus::Virtio,
            ..cd.clone()
        }];
        refused(&c, "cannot be a virtio-blk disk");
        c.disks = vec![DiskConfig {
            readonly: false,
            ..cd.clone()
        }];
        refused(&c, "read-only");
        c.disks = vec![DiskConfig {
            path: None,
            ..disk(None, None)
        }];
        refused(&c, "only a CD-ROM");
        c.disks = vec![
            DiskConfig {
                unit: Some(3),
                ..cd.clone()
            },
            DiskConfig {
                unit: Some(3),
                bus: DiskBus::Scsi,
                ..disk(None, None)
            },
        ];
        refused(&c, "disks[1].unit");
        c.disks = vec![DiskConfig {
            unit: Some(1),
            ..disk(None, None)
        }];
        refused(&c, "needs bus=scsi");
        c.disks = vec![DiskConfig {
            boot_order: Some(1),
            ..disk(None, None)
        }];
        refused(&c, "only applies to firmware boot");
        c.disks = vec![disk(None, Some("123456789012345678901"))];
        refused(&c, "at most 20 bytes");
        c.disks = vec![disk(None, Some("bad\nserial"))];
        refused(&c, "printable");
        c.disks = vec![disk(Some("a"), None), disk(Some("a"), None)];
        refused(&c, "disks[1].id");
        c.disks = vec![disk(Some("net0"), Some("12345678901234567890"))];
        c.nets = vec![NetConfig {
            tap: "tap0".into(),
            mac: None,
            id: Some("net0".into()),
        }];
        refused(&c, "unique");
        c.nets[0].id = None;
        validate(&c).unwrap();
        c.nets[0].mac = Some([0x53, 0, 0, 0, 0, 1]);
        refused(&c, "multicast");
        c.nets[0].mac = None;
        c.nets[0].tap = "a-very-long-tap-name".into();
        refused(&c, "nets[0].tap");
        let mut c = base(&f);
        c.vcpu_affinity = vec![VcpuAffinity {
            vcpu: 1,
            cpus: vec![0],
        }];
        refused(&c, "vCPUs 0-0");
        c.cpus.max = Some(2);
        validate(&c).unwrap();
        c.emulator_affinity = Some(vec![]);
        refused(&c, "emulator_affinity");
    }
}
