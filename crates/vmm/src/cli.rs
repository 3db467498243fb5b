//! Command line of `rvirt-vmm` and its validation into a [`VmConfig`].

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

/// rvirt's virtual machine monitor: runs one VM on /dev/kvm.
///
/// Exit status: 0 guest powered off (or quit via the control socket), 1 VMM error,
/// 2 usage error, 3 guest reboot, 4 guest crash (triple fault).
#[derive(Parser, Debug)]
#[command(name = "rvirt-vmm", version, about, long_about = None, args_override_self = true)]
pub struct Args {
    /// Guest kernel: ELF vmlinux (PVH entry or 64-bit boot protocol) or bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    pub cmdline: String,
    /// Guest RAM, e.g. 512M, 1G, or a number of MiB.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Disk: path=FILE[,format=raw|qcow2][,readonly=on]. Repeatable.
    #[arg(long)]
    pub disk: Vec<String>,
    /// Network interface: tap=NAME[,mac=52:54:00:xx:xx:xx]. Repeatable.
    #[arg(long)]
    pub net: Vec<String>,
    /// Serial console (COM1): stdio, pty, socket=PATH or none. With stdio on a terminal, the
    /// terminal is in raw mode (Ctrl-C goes to the guest) until exit; Ctrl-A x quits.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// Control socket (JSON lines, see rvirt_api::vmm).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// VM name (shown in `info` and logs).
    #[arg(long)]
    pub name: Option<String>,
}

/// Where COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    Stdio,
    Pty,
    Socket(PathBuf),
    None,
}

/// A disk to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub format: Option<rvirt_image::Format>,
    pub readonly: bool,
}

/// A NIC to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

/// Validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub cpus: u32,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub serial: SerialMode,
    pub api_socket: Option<PathBuf>,
    pub name: Option<String>,
}

/// Largest guest RAM accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Parse a memory size: `512M`, `1G`, `2048` (MiB), `1T`, `65536K`.
pub fn parse_memory(s: &str) -> Result<u64> {
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
                    "--memory {s:?}: unknown unit {:?}; use e.g. 512M or 2G",
                    &t[i..]
                ),
            };
            (&t[..i], mult)
        }
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("--memory {s:?}: not a size; use e.g. 512M or 2G"))?;
    let bytes = n
        .checked_mul(mult)
        .with_context(|| format!("--memory {s:?} is too big"))?;
    if bytes < (16 << 20) {
        bail!("--memory {s:?} is too small: give at least 16M");
    }
    if bytes > MAX_MEMORY {
        bail!("--memory {s:?} is too big: at most 1T is supported");
    }
    Ok(bytes & !0xfff)
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

fn kv(spec: &str) -> Vec<(String, String)> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

/// Parse `path=FILE[,format=raw|qcow2][,readonly=on]`.
pub fn parse_disk(spec: &str) -> Result<DiskConfig> {
    let mut path = None;
    let mut format = None;
    let mut readonly = false;
    for (k, v) in kv(spec) {
        match k.as_str() {
            "path" => path = Some(PathBuf::from(v)),
            "format" => {
                format = Some(match v.as_str() {
                    "raw" => rvirt_image::Format::Raw,
                    "qcow2" => rvirt_image::Format::Qcow2,
                    _ => bail!("--disk {spec:?}: format must be raw or qcow2, not {v:?}"),
                })
            }
            "readonly" => {
                readonly = match v.as_str() {
                    "on" | "true" | "yes" | "1" | "" => true,
                    "off" | "false" | "no" | "0" => false,
                    _ => bail!("--disk {spec:?}: readonly must be on or off"),
                }
            }
            _ => bail!("--disk {spec:?}: unknown key {k:?}; use path=,format=,readonly="),
        }
    }
    let path = path.with_context(|| format!("--disk {spec:?}: path=FILE is required"))?;
    if !path.exists() {
        bail!(
            "--disk: disk image {} does not exist; create it (rvirt-img create) or fix the path",
            path.display()
        );
    }
    Ok(DiskConfig {
        path,
        format,
        readonly,
    })
}

/// Parse `tap=NAME[,mac=M]`.
pub fn parse_net(spec: &str, index: usize) -> Result<NetConfig> {
    let mut tap = None;
    let mut mac = [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ];
    for (k, v) in kv(spec) {
        match k.as_str() {
            "tap" => tap = Some(v),
            "mac" => mac = parse_mac(&v).with_context(|| format!("--net {spec:?}"))?,
            _ => bail!("--net {spec:?}: unknown key {k:?}; use tap=NAME,mac=M"),
        }
    }
    let tap = tap.with_context(|| format!("--net {spec:?}: tap=NAME is required"))?;
    Ok(NetConfig { tap, mac })
}

/// Parse `stdio|pty|socket=PATH|none`.
pub fn parse_serial(s: &str) -> Result<SerialMode> {
    Ok(match s {
        "stdio" => SerialMode::Stdio,
        "pty" => SerialMode::Pty,
        "none" | "null" => SerialMode::None,
        _ => match s.strip_prefix("socket=") {
            Some(p) if !p.is_empty() => SerialMode::Socket(PathBuf::from(p)),
            _ => bail!("--serial {s:?}: use stdio, pty, socket=PATH or none"),
        },
    })
}

impl VmConfig {
    /// Validate the command line.
    pub fn from_args(a: &Args) -> Result<VmConfig> {
        if !a.kernel.is_file() {
            bail!(
                "--kernel {}: no such file; give the path of a vmlinux (ELF) or bzImage",
                a.kernel.display()
            );
        }
        if let Some(i) = &a.initrd {
            if !i.is_file() {
                bail!("--initrd {}: no such file; fix the path", i.display());
            }
        }
        if a.cpus == 0 {
            bail!("--cpus 0: a VM needs at least one vCPU");
        }
        if a.cpus > 254 {
            bail!("--cpus {}: at most 254 vCPUs are supported", a.cpus);
        }
        if a.cmdline.len() >= crate::layout::CMDLINE_MAX {
            bail!(
                "--cmdline is too long: at most {} bytes",
                crate::layout::CMDLINE_MAX - 1
            );
        }
        Ok(VmConfig {
            kernel: a.kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
            memory: parse_memory(&a.memory)?,
            cpus: a.cpus,
            disks: a
                .disk
                .iter()
                .map(|d| parse_disk(d))
                .collect::<Result<_>>()?,
            nets: a
                .net
                .iter()
                .enumerate()
                .map(|(i, n)| parse_net(n, i))
                .collect::<Result<_>>()?,
            serial: parse_serial(&a.serial)?,
            api_socket: a.api_socket.clone(),
            name: a.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let n = parse_net("tap=t0,mac=52:54:00:aa:bb:cc", 0).unwrap();
        assert_eq!(n.tap, "t0");
        assert_eq!(n.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert!(parse_net("mac=52:54:00:aa:bb:cc", 0).is_err());
        assert!(parse_net("tap=t,mac=zz", 0).is_err());
    }

    #[test]
    fn disk_specs() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let p = f.path().display().to_string();
        let d = parse_disk(&format!("path={p},format=raw,readonly=on")).unwrap();
        assert!(d.readonly);
        assert_eq!(d.format, Some(rvirt_image::Format::Raw));
        assert!(parse_disk("path=/nonexistent/disk.img").is_err());
        assert!(parse_disk(&format!("path={p},format=vmdk")).is_err());
    }
}
