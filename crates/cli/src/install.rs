//! `rvirt install`: virt-install's options turned into a domain definition; missing disks are
//! created with rvirt-image, then the domain is defined, started, and its console attached.

use anyhow::{bail, Context};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct InstallArgs {
    /// Name of the new domain.
    #[arg(long, short = 'n')]
    pub name: String,
    /// Memory in MiB (virt-install's unit).
    #[arg(long, default_value_t = 1024)]
    pub memory: u64,
    /// vCPUs: N[,maxvcpus=M] (N running at boot, up to M with `setvcpus --live`).
    #[arg(long, default_value = "1")]
    pub vcpus: String,
    /// Disk: path=P[,size=GiB][,format=raw|qcow2][,bus=virtio][,readonly=on]; repeatable.
    /// A missing file with a size is created.
    #[arg(long)]
    pub disk: Vec<String>,
    /// Boot from the existing disks (no installer); rvirt always boots this way.
    #[arg(long)]
    pub import: bool,
    /// Direct kernel boot: kernel=PATH[,initrd=PATH][,kernel_args="..."].
    #[arg(long)]
    pub boot: Option<String>,
    /// network=NAME | bridge=BR | none [,mac=MAC][,model=virtio]; repeatable. Default:
    /// network=default.
    #[arg(long)]
    pub network: Vec<String>,
    /// vnc[,listen=ADDR][,port=N] | none.
    #[arg(long, default_value = "none")]
    pub graphics: String,
    /// Accepted for virt-install compatibility; rvirt does not use OS profiles.
    #[arg(long = "os-variant", alias = "osinfo")]
    pub os_variant: Option<String>,
    /// Do not attach to the console after starting.
    #[arg(long)]
    pub noautoconsole: bool,
    /// Start the domain when rvirtd starts.
    #[arg(long)]
    pub autostart: bool,
    /// Print the generated XML and do nothing else.
    #[arg(long = "print-xml")]
    pub print_xml: bool,
}

/// `key=value,key=value` (values may be double-quoted to hold commas).
pub fn parse_opts(s: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut parts = Vec::new();
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        bail!("unbalanced quote in '{s}'");
    }
    parts.push(cur);
    for p in parts.into_iter().filter(|p| !p.is_empty()) {
        match p.split_once('=') {
            Some((k, v)) => out.push((k.trim().to_string(), v.to_string())),
            None => out.push((p.trim().to_string(), String::new())),
        }
    }
    Ok(out)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiskPlan {
    pub path: PathBuf,
    pub format: String,
    /// Bytes to create when the file is missing.
    pub create_size: Option<u64>,
    pub readonly: bool,
    /// `cache=` (libvirt's `<driver cache=...>`).
    pub cache: Option<String>,
}

pub fn plan_disks(args: &InstallArgs) -> anyhow::Result<Vec<DiskPlan>> {
    let mut disks = Vec::new();
    for spec in &args.disk {
        if spec == "none" {
            continue;
        }
        let mut plan = DiskPlan {
            path: PathBuf::new(),
            format: String::new(),
            create_size: None,
            readonly: false,
            cache: None,
        };
        let mut size_gib: Option<f64> = None;
        for (k, v) in parse_opts(spec)? {
            match k.as_str() {
                "path" => plan.path = PathBuf::from(v),
                "size" => {
                    size_gib = Some(
                        v.parse()
                            .with_context(|| format!("--disk size='{v}' is not a number of GiB"))?,
                    )
                }
                "format" => plan.format = v,
                "bus" if v != "virtio" => bail!("--disk bus={v}: only bus=virtio is supported"),
                "bus" => {}
                "readonly" => plan.readonly = matches!(v.as_str(), "on" | "yes" | "true" | ""),
                "device" if v != "disk" => bail!("--disk device={v}: only disks are supported"),
                "cache" => {
                    if rvirt_api::vmm_config::CacheMode::parse(&v).is_none() {
                        bail!(
                            "--disk cache={v}: use none, writeback, writethrough, directsync or unsafe"
                        );
                    }
                    plan.cache = Some(v);
                }
                "device" | "sparse" => {}
                other => bail!(
                    "--disk: unknown option '{other}' (use path=,size=,format=,bus=,readonly=,cache=)"
                ),
            }
        }
        if plan.path.as_os_str().is_empty() {
            bail!("--disk '{spec}' needs path=FILE");
        }
        let exists = plan.path.exists();
        if plan.format.is_empty() {
            plan.format = if exists {
                rvirt_image::probe(&plan.path)
                    .with_context(|| format!("cannot read disk {}", plan.path.display()))?
                    .name()
                    .to_string()
            } else {
                "qcow2".into()
            };
        }
        if plan.format != "raw" && plan.format != "qcow2" {
            bail!("--disk format={}: use raw or qcow2", plan.format);
        }
        if !exists {
            let gib = size_gib.with_context(|| {
                format!(
                    "disk {} does not exist; give size=GiB to create it",
                    plan.path.display()
                )
            })?;
            if gib <= 0.0 {
                bail!("--disk size must be above zero");
            }
            plan.create_size = Some(((gib * (1u64 << 30) as f64) as u64).div_ceil(512) * 512);
        }
        disks.push(plan);
    }
    Ok(disks)
}

pub fn create_disk(plan: &DiskPlan) -> anyhow::Result<()> {
    let Some(size) = plan.create_size else {
        return Ok(());
    };
    let format = if plan.format == "qcow2" {
        rvirt_image::Format::Qcow2
    } else {
        rvirt_image::Format::Raw
    };
    let opts = rvirt_image::qcow2::CreateOptions {
        size,
        ..Default::default()
    };
    rvirt_image::create_image(&plan.path, format, &opts)
        .with_context(|| format!("cannot create disk {}", plan.path.display()))
}

/// `--vcpus`: `N`, `vcpus=N`, `N,maxvcpus=M` as virt-install takes them. Returns (current,
/// maximum); without maxvcpus= both are N, with only maxvcpus= both are M.
pub fn parse_vcpus(spec: &str) -> anyhow::Result<(u32, u32)> {
    let num = |k: &str, v: &str| -> anyhow::Result<u32> {
        match v.parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("--vcpus {k}'{v}' is not a vCPU count above zero"),
        }
    };
    let mut current = None;
    let mut max = None;
    for (i, (k, v)) in parse_opts(spec)?.into_iter().enumerate() {
        match k.as_str() {
            "vcpus" => current = Some(num("vcpus=", &v)?),
            "maxvcpus" => max = Some(num("maxvcpus=", &v)?),
            n if i == 0 && v.is_empty() => current = Some(num("", n)?),
            other => bail!("--vcpus: unknown option '{other}' (use N[,maxvcpus=M])"),
        }
    }
    let (current, max) = match (current, max) {
        (Some(c), Some(m)) => (c, m),
        (Some(c), None) => (c, c),
        (None, Some(m)) => (m, m),
        (None, None) => bail!("--vcpus '{spec}' names no vCPU count"),
    };
    if current > max {
        bail!("--vcpus {current} is more than maxvcpus={max}");
    }
    Ok((current, max))
}

/// The domain XML virt-install would write for these options (direct kernel boot).
pub fn build_xml(args: &InstallArgs, disks: &[DiskPlan]) -> anyhow::Result<String> {
    let boot = args
        .boot
        .as_deref()
        .context("rvirt boots a kernel directly: give --boot kernel=PATH[,initrd=PATH][,kernel_args=\"...\"]")?;
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    for (k, v) in parse_opts(boot)? {
        match k.as_str() {
            "kernel" => kernel = Some(v),
            "initrd" => initrd = Some(v),
            "kernel_args" | "cmdline" => cmdline = Some(v),
            "hd" | "network" | "cdrom" | "uefi" => {
                bail!("--boot {k}: firmware boot is not supported; use kernel=PATH")
            }
            other => bail!("--boot: unknown option '{other}' (use kernel=,initrd=,kernel_args=)"),
        }
    }
    let kernel = kernel.context("--boot needs kernel=PATH")?;
    let mut x = String::new();
    x.push_str("<domain type='kvm'>\n");
    x.push_str(&format!("  <name>{}</name>\n", esc(&args.name)));
    x.push_str(&format!("  <memory unit='MiB'>{}</memory>\n", args.memory));
    x.push_str(&format!(
        "  <currentMemory unit='MiB'>{}</currentMemory>\n",
        args.memory
    ));
    let (current, max) = parse_vcpus(&args.vcpus)?;
    if current == max {
        x.push_str(&format!("  <vcpu placement='static'>{max}</vcpu>\n"));
    } else {
        x.push_str(&format!(
            "  <vcpu placement='static' current='{current}'>{max}</vcpu>\n"
        ));
    }
    x.push_str("  <os>\n    <type arch='x86_64'>hvm</type>\n");
    x.push_str(&format!("    <kernel>{}</kernel>\n", esc(&kernel)));
    if let Some(i) = initrd {
        x.push_str(&format!("    <initrd>{}</initrd>\n", esc(&i)));
    }
    if let Some(c) = cmdline {
        x.push_str(&format!("    <cmdline>{}</cmdline>\n", esc(&c)));
    }
    x.push_str("  </os>\n  <features>\n    <acpi/>\n  </features>\n");
    x.push_str("  <cpu mode='host-passthrough'/>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    for (i, d) in disks.iter().enumerate() {
        let dev = format!("vd{}", (b'a' + i as u8) as char);
        x.push_str("    <disk type='file' device='disk'>\n");
        let cache = d
            .cache
            .as_ref()
            .map(|c| format!(" cache='{c}'"))
            .unwrap_or_default();
        x.push_str(&format!(
            "      <driver name='qemu' type='{}'{cache}/>\n",
            d.format
        ));
        x.push_str(&format!(
            "      <source file='{}'/>\n",
            esc(&d.path.display().to_string())
        ));
        x.push_str(&format!("      <target dev='{dev}' bus='virtio'/>\n"));
        if d.readonly {
            x.push_str("      <readonly/>\n");
        }
        x.push_str("    </disk>\n");
    }
    let nets = if args.network.is_empty() {
        vec!["network=default".to_string()]
    } else {
        args.network.clone()
    };
    for n in nets.iter().filter(|n| n.as_str() != "none") {
        x.push_str(&interface_xml(n)?);
    }
    x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
    x.push_str(
        "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
    );
    x.push_str(&graphics_xml(&args.graphics)?);
    // A virtio balloon with statistics every 5 s, as virt-install writes for KVM guests.
    x.push_str("    <memballoon model='virtio'>\n      <stats period='5'/>\n    </memballoon>\n");
    x.push_str("    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>\n");
    x.push_str("  </devices>\n</domain>\n");
    Ok(x)
}

fn interface_xml(spec: &str) -> anyhow::Result<String> {
    let mut kind = None;
    let mut mac = None;
    for (k, v) in parse_opts(spec)? {
        match k.as_str() {
            "network" => kind = Some(("network", v)),
            "bridge" => kind = Some(("bridge", v)),
            "mac" | "mac.address" => mac = Some(v),
            "model" | "model.type" if v != "virtio" => {
                bail!("--network model={v}: only virtio is supported")
            }
            "model" | "model.type" => {}
            other => {
                bail!("--network: unknown option '{other}' (use network=NAME, bridge=BR or none)")
            }
        }
    }
    let (kind, source) = kind.context("--network needs network=NAME, bridge=BR or none")?;
    let mut x = format!(
        "    <interface type='{kind}'>\n      <source {kind}='{}'/>\n",
        esc(&source)
    );
    if let Some(m) = mac {
        x.push_str(&format!("      <mac address='{}'/>\n", esc(&m)));
    }
    x.push_str("      <model type='virtio'/>\n    </interface>\n");
    Ok(x)
}

fn graphics_xml(spec: &str) -> anyhow::Result<String> {
    let opts = parse_opts(spec)?;
    match opts.first().map(|(k, _)| k.as_str()) {
        Some("none") | None => Ok(String::new()),
        Some("vnc") => {
            let mut listen = "127.0.0.1".to_string();
            let mut port = "-1".to_string();
            for (k, v) in &opts[1..] {
                match k.as_str() {
                    "listen" => listen = v.clone(),
                    "port" => port = v.clone(),
                    other => bail!("--graphics vnc: unknown option '{other}'"),
                }
            }
            let autoport = if port == "-1" { "yes" } else { "no" };
            Ok(format!(
                "    <graphics type='vnc' port='{}' autoport='{autoport}' listen='{}'>\n      <listen type='address' address='{}'/>\n    </graphics>\n",
                esc(&port),
                esc(&listen),
                esc(&listen)
            ))
        }
        Some(other) => bail!("--graphics {other}: use vnc or none"),
    }
}

/// Removes disks this run created, when a later step failed.
pub fn remove_created(disks: &[DiskPlan]) {
    for d in disks.iter().filter(|d| d.create_size.is_some()) {
        let _ = std::fs::remove_file(&d.path);
    }
}

pub fn check_file(p: &Path, what: &str) -> anyhow::Result<()> {
    if !p.exists() {
        bail!("{what} {} does not exist", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: InstallArgs,
    }

    fn args(extra: &[&str]) -> InstallArgs {
        let mut v = vec!["t", "--name", "vm1"];
        v.extend_from_slice(extra);
        T::parse_from(v).a
    }

    #[test]
    fn options_parse_with_quotes() {
        let o = parse_opts("kernel=/k,kernel_args=\"console=ttyS0 a=b,c\"").unwrap();
        assert_eq!(o[1], ("kernel_args".into(), "console=ttyS0 a=b,c".into()));
    }

    #[test]
    fn builds_xml_and_plans_missing_disks() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("new.qcow2");
        let a = args(&[
            "--memory",
            "512",
            "--vcpus",
            "2",
            "--disk",
            &format!("path={},size=1,cache=writethrough", disk.display()),
            "--boot",
            "kernel=/k,initrd=/i,kernel_args=\"console=ttyS0\"",
            "--network",
            "bridge=br0",
            "--graphics",
            "vnc,listen=0.0.0.0",
        ]);
        let disks = plan_disks(&a).unwrap();
        assert_eq!(disks[0].create_size, Some(1 << 30));
        assert_eq!(disks[0].format, "qcow2");
        let xml = build_xml(&a, &disks).unwrap();
        for needle in [
            "<memory unit='MiB'>512</memory>",
            "<vcpu placement='static'>2</vcpu>",
            "<cmdline>console=ttyS0</cmdline>",
            "<source bridge='br0'/>",
            "listen='0.0.0.0'",
            "type='qcow2' cache='writethrough'",
            "<memballoon model='virtio'>",
        ] {
            assert!(xml.contains(needle), "{needle} missing in {xml}");
        }
        create_disk(&disks[0]).unwrap();
        assert_eq!(
            rvirt_image::probe(&disk).unwrap(),
            rvirt_image::Format::Qcow2
        );
    }

    #[test]
    fn vcpus_take_virt_install_maxvcpus() {
        assert_eq!(parse_vcpus("2").unwrap(), (2, 2));
        assert_eq!(parse_vcpus("1,maxvcpus=4").unwrap(), (1, 4));
        assert_eq!(parse_vcpus("vcpus=2,maxvcpus=3").unwrap(), (2, 3));
        assert_eq!(parse_vcpus("maxvcpus=3").unwrap(), (3, 3));
        assert!(parse_vcpus("3,maxvcpus=2")
            .unwrap_err()
            .to_string()
            .contains("maxvcpus=2"));
        assert!(parse_vcpus("0").is_err());
        assert!(parse_vcpus("2,sockets=1")
            .unwrap_err()
            .to_string()
            .contains("'sockets'"));
        let a = args(&["--vcpus", "1,maxvcpus=2", "--boot", "kernel=/k"]);
        let xml = build_xml(&a, &[]).unwrap();
        assert!(
            xml.contains("<vcpu placement='static' current='1'>2</vcpu>"),
            "{xml}"
        );
    }

    #[test]
    fn bad_options_are_named() {
        let a = args(&["--disk", "path=/nonexistent/x.img"]);
        assert!(plan_disks(&a).unwrap_err().to_string().contains("size=GiB"));
        let a = args(&["--disk", "path=/x,size=1,cache=fast"]);
        assert!(plan_disks(&a)
            .unwrap_err()
            .to_string()
            .contains("cache=fast"));
        let a = args(&["--disk", "path=/x,bus=sata"]);
        assert!(plan_disks(&a).unwrap_err().to_string().contains("bus=sata"));
        let a = args(&["--boot", "hd"]);
        assert!(build_xml(&a, &[])
            .unwrap_err()
            .to_string()
            .contains("firmware"));
        let a = args(&["--boot", "kernel=/k", "--network", "user"]);
        assert!(build_xml(&a, &[])
            .unwrap_err()
            .to_string()
            .contains("'user'"));
    }
}
