//! Verbs for a domain's live resources: memory and balloon, vCPUs, device hotplug, statistics
//! and the QEMU monitor look-alike, printed as virsh prints them.

use crate::client::Client;
use crate::commands::{dom_path, fail, get, read_file, Out};
use crate::{DeviceScope, Scope};
use rvirt_api::rest::*;
use std::path::{Path, PathBuf};

fn pin_scope(s: Scope) -> PinScope {
    PinScope {
        live: s.live && !s.current,
        config: s.config && !s.current,
    }
}

/// virsh's device scope: `--persistent` is the definition, plus the running domain if active.
fn device_scope(c: &Client, d: &str, s: DeviceScope) -> Result<PinScope, Vec<String>> {
    if s.current && (s.live || s.config) {
        return Err(vec![
            "Options --current and --live/--config are mutually exclusive".into(),
        ]);
    }
    if s.persistent {
        let i: DomainInfo = get(c, d, "")?;
        return Ok(PinScope {
            live: i.summary.state.is_active() || s.live,
            config: true,
        });
    }
    Ok(PinScope {
        live: s.live,
        config: s.config,
    })
}

/// A virsh scaled integer: KiB without a suffix; b, KiB/K/k, KB, MiB/M, MB, GiB/G, GB, TiB/T,
/// TB. Returns KiB, rounded up.
pub fn parse_size_kib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("Numeric value '{s}' for <size> option is malformed or out of range")
    })?;
    let n = u128::from(n);
    let per: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "k" | "kib" => 1 << 10,
        "b" | "bytes" => 1,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "Scaled numeric value '{s}' for <size> option is malformed or out of range (units: b, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    u64::try_from((n * per).div_ceil(1024))
        .map_err(|_| format!("Numeric value '{s}' for <size> option is out of range"))
}

pub fn setmem(c: &Client, d: &str, size: &str, maximum: bool, scope: Scope) -> Out {
    let size_kib = parse_size_kib(size).map_err(|e| vec![e])?;
    let req = MemoryRequest {
        size_kib,
        maximum,
        scope: pin_scope(scope),
    };
    c.call::<serde_json::Value>("PUT", &dom_path(d, "/memory"), Some(&req))
        .map_err(|e| fail(None, d, e))?;
    println!();
    Ok(())
}

/// The lines of virsh dommemstat, in its order.
pub fn memstat_lines(m: &MemStats) -> String {
    let mut out = String::new();
    let fields: [(&str, Option<u64>); 13] = [
        ("swap_in", m.swap_in),
        ("swap_out", m.swap_out),
        ("major_fault", m.major_fault),
        ("minor_fault", m.minor_fault),
        ("unused", m.unused),
        ("available", m.available),
        ("usable", m.usable),
        ("actual", Some(m.actual)),
        ("rss", Some(m.rss)),
        ("last_update", m.last_update),
        ("disk_caches", m.disk_caches),
        ("hugetlb_pgalloc", m.hugetlb_pgalloc),
        ("hugetlb_pgfail", m.hugetlb_pgfail),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            out.push_str(&format!("{k} {v}\n"));
        }
    }
    out
}

pub fn dommemstat(c: &Client, d: &str, period: Option<u32>, scope: Scope) -> Out {
    let scope = pin_scope(scope);
    if let Some(seconds) = period {
        let req = StatsPeriodRequest { seconds, scope };
        c.call::<serde_json::Value>("PUT", &dom_path(d, "/memstats/period"), Some(&req))
            .map_err(|e| {
                fail(
                    Some("Unable to change balloon collection period.".into()),
                    d,
                    e,
                )
            })?;
        if scope.config && !scope.live {
            return Ok(());
        }
    }
    let m: MemStats = get(c, d, "/memstats")?;
    println!("{}", memstat_lines(&m));
    Ok(())
}

pub fn setvcpus(c: &Client, d: &str, count: u32, maximum: bool, scope: Scope) -> Out {
    let req = VcpusRequest {
        count,
        maximum,
        scope: pin_scope(scope),
    };
    c.call::<serde_json::Value>("PUT", &dom_path(d, "/vcpus"), Some(&req))
        .map_err(|e| fail(None, d, e))?;
    println!();
    Ok(())
}

pub fn vcpucount_lines(v: &VcpuCount) -> String {
    let mut out = String::new();
    let mut line = |a: &str, b: &str, n: Option<u32>| {
        if let Some(n) = n {
            out.push_str(&format!("{a:<12} {b:<12} {n:>3}\n"));
        }
    };
    line("maximum", "config", Some(v.maximum_config));
    line("maximum", "live", v.maximum_live);
    line("current", "config", Some(v.current_config));
    line("current", "live", v.current_live);
    out
}

pub fn vcpucount(c: &Client, d: &str) -> Out {
    let v: VcpuCount = get(c, d, "/vcpucount")?;
    println!("{}", vcpucount_lines(&v));
    Ok(())
}

/// A QMP reply as QEMU writes it: `return`/`error` first, then `id`.
pub fn qmp_text(v: &serde_json::Value, pretty: bool) -> String {
    let Some(obj) = v.as_object() else {
        return v.to_string();
    };
    let mut parts = Vec::new();
    for k in ["return", "error", "id"] {
        if let Some(val) = obj.get(k) {
            let body = if pretty {
                serde_json::to_string_pretty(val)
                    .unwrap_or_default()
                    .replace('\n', "\n  ")
            } else {
                val.to_string()
            };
            parts.push(if pretty {
                format!("  \"{k}\": {body}")
            } else {
                format!("\"{k}\":{body}")
            });
        }
    }
    if pretty {
        format!("{{\n{}\n}}", parts.join(",\n"))
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

pub fn monitor(c: &Client, d: &str, hmp: bool, pretty: bool, cmd: &str) -> Out {
    if cmd.trim().is_empty() {
        return Err(vec![
            "command 'qemu-monitor-command' requires <cmd> option".into()
        ]);
    }
    let req = MonitorRequest {
        command: cmd.to_string(),
        hmp,
    };
    let r: MonitorReply = c
        .post(&dom_path(d, "/monitor"), &req)
        .map_err(|e| fail(None, d, e))?;
    if let Some(t) = r.text {
        print!("{t}");
    }
    if let Some(j) = r.json {
        println!("{}", qmp_text(&j, pretty));
    }
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub struct DiskArgs {
    pub source: String,
    pub target: String,
    pub targetbus: Option<String>,
    pub driver: Option<String>,
    pub subdriver: Option<String>,
    pub mode: Option<String>,
    pub cache: Option<String>,
}

/// The `<disk>` element virsh attach-disk builds.
pub fn disk_xml(a: &DiskArgs) -> Result<String, String> {
    if let Some(drv) = a.driver.as_deref().filter(|d| *d != "qemu") {
        return Err(format!(
            "driver '{drv}' is not supported: rvirt disks use --driver qemu (or no --driver)"
        ));
    }
    if let Some(m) = a.mode.as_deref().filter(|m| *m != "readonly") {
        return Err(format!(
            "No support for {m} in command 'attach-disk': --mode takes readonly"
        ));
    }
    let block = a.source.starts_with("/dev/");
    let mut x = format!(
        "<disk type='{}' device='disk'>\n",
        if block { "block" } else { "file" }
    );
    let mut drv = String::from("  <driver name='qemu'");
    if let Some(t) = &a.subdriver {
        drv.push_str(&format!(" type='{}'", xml_escape(t)));
    }
    if let Some(cm) = &a.cache {
        drv.push_str(&format!(" cache='{}'", xml_escape(cm)));
    }
    x.push_str(&drv);
    x.push_str("/>\n");
    x.push_str(&format!(
        "  <source {}='{}'/>\n",
        if block { "dev" } else { "file" },
        xml_escape(&a.source)
    ));
    x.push_str(&format!(
        "  <target dev='{}' bus='{}'/>\n",
        xml_escape(&a.target),
        xml_escape(a.targetbus.as_deref().unwrap_or("virtio"))
    ));
    if a.mode.is_some() {
        x.push_str("  <readonly/>\n");
    }
    x.push_str("</disk>\n");
    Ok(x)
}

fn attach(c: &Client, d: &str, xml: String, scope: PinScope, what: &str, done: &str) -> Out {
    let req = AttachRequest { xml, scope };
    c.post::<AttachResponse>(&dom_path(d, "/devices"), &req)
        .map_err(|e| fail(Some(format!("Failed to attach {what}")), d, e))?;
    println!("{done}\n");
    Ok(())
}

pub fn attach_disk(c: &Client, d: &str, a: DiskArgs, dev: DeviceScope) -> Out {
    let xml = disk_xml(&a).map_err(|e| vec![e])?;
    let scope = device_scope(c, d, dev)?;
    attach(c, d, xml, scope, "disk", "Disk attached successfully")
}

pub fn attach_interface(
    c: &Client,
    d: &str,
    kind: &str,
    source: &str,
    mac: Option<String>,
    model: Option<String>,
    dev: DeviceScope,
) -> Out {
    let attr = match kind {
        "network" => "network",
        "bridge" => "bridge",
        other => {
            return Err(vec![format!(
                "No support for {other} in command 'attach-interface': rvirt attaches network or bridge interfaces"
            )])
        }
    };
    let mut x = format!("<interface type='{kind}'>\n");
    if let Some(m) = &mac {
        x.push_str(&format!("  <mac address='{}'/>\n", xml_escape(m)));
    }
    x.push_str(&format!("  <source {attr}='{}'/>\n", xml_escape(source)));
    x.push_str(&format!(
        "  <model type='{}'/>\n</interface>\n",
        xml_escape(model.as_deref().unwrap_or("virtio"))
    ));
    let scope = device_scope(c, d, dev)?;
    attach(
        c,
        d,
        x,
        scope,
        "interface",
        "Interface attached successfully",
    )
}

pub fn attach_device(c: &Client, d: &str, file: &Path, dev: DeviceScope) -> Out {
    let xml = read_file(file)?;
    let scope = device_scope(c, d, dev)?;
    attach(
        c,
        d,
        xml,
        scope,
        &format!("device from {}", file.display()),
        "Device attached successfully",
    )
}

pub enum DetachWhat {
    Disk(String),
    /// Type and MAC.
    Iface(String, String),
    File(PathBuf),
}

pub fn detach(c: &Client, d: &str, what: DetachWhat, dev: DeviceScope) -> Out {
    let scope = device_scope(c, d, dev)?;
    let (req, ctx, done) = match what {
        DetachWhat::Disk(t) => (
            DetachRequest {
                key: Some(t),
                kind: Some("disk".into()),
                scope,
                ..Default::default()
            },
            "Failed to detach disk".to_string(),
            "Disk detached successfully",
        ),
        DetachWhat::Iface(kind, mac) => {
            if kind != "network" && kind != "bridge" {
                return Err(vec![format!(
                    "No support for {kind} in command 'detach-interface': give network or bridge"
                )]);
            }
            (
                DetachRequest {
                    key: Some(mac),
                    kind: Some("interface".into()),
                    scope,
                    ..Default::default()
                },
                "Failed to detach interface".to_string(),
                "Interface detached successfully",
            )
        }
        DetachWhat::File(f) => (
            DetachRequest {
                xml: Some(read_file(&f)?),
                scope,
                ..Default::default()
            },
            format!("Failed to detach device from {}", f.display()),
            "Device detached successfully",
        ),
    };
    c.post::<serde_json::Value>(&dom_path(d, "/devices/detach"), &req)
        .map_err(|e| fail(Some(ctx), d, e))?;
    println!("{done}\n");
    Ok(())
}

/// virsh change-media: `path` is the drive's target or current disc; prints virsh's line.
pub fn change_media(
    c: &Client,
    d: &str,
    path: &str,
    source: Option<String>,
    (eject, insert, update, force): (bool, bool, bool, bool),
    dev: DeviceScope,
) -> Out {
    if [eject, insert, update].iter().filter(|x| **x).count() > 1 {
        return Err(vec![
            "Options --eject, --insert and --update are mutually exclusive".into(),
        ]);
    }
    let action = if eject {
        "eject"
    } else if insert {
        "insert"
    } else {
        "update"
    };
    let scope = device_scope(c, d, dev)?;
    let req = ChangeMediaRequest {
        path: path.to_string(),
        source: source.map(|s| absolute(&s)),
        action: Some(action.into()),
        force,
        scope,
    };
    c.post::<serde_json::Value>(&dom_path(d, "/media"), &req)
        .map_err(|e| {
            fail(
                Some(format!("Failed to complete action {action} on media")),
                d,
                e,
            )
        })?;
    let done = match action {
        "eject" => "ejected",
        "insert" => "inserted",
        _ => "updated",
    };
    println!("Successfully {done} media.");
    Ok(())
}

/// The daemon resolves paths itself: make a relative one absolute here, as virsh users expect.
fn absolute(p: &str) -> String {
    let path = std::path::Path::new(p);
    if path.is_absolute() {
        return p.to_string();
    }
    std::env::current_dir()
        .map(|d| d.join(path).display().to_string())
        .unwrap_or_else(|_| p.to_string())
}

fn stats(c: &Client, d: &str) -> Result<DomainStats, Vec<String>> {
    let s: DomainStats = get(c, d, "/stats")?;
    if !s.state.is_active() {
        return Err(vec![
            "Requested operation is not valid: domain is not running".into(),
        ]);
    }
    Ok(s)
}

pub fn blkstat_lines(dev: &str, b: &BlockStats) -> String {
    [
        ("rd_req", b.rd_req),
        ("rd_bytes", b.rd_bytes),
        ("wr_req", b.wr_req),
        ("wr_bytes", b.wr_bytes),
        ("flush_operations", b.flush_operations),
    ]
    .iter()
    .map(|(k, v)| format!("{dev} {k} {v}\n"))
    .collect()
}

pub fn domblkstat(c: &Client, d: &str, device: Option<String>) -> Out {
    let s = stats(c, d)?;
    let out = match &device {
        Some(dev) => {
            let b = s
                .block
                .iter()
                .find(|b| b.name == *dev || b.path == *dev)
                .ok_or_else(|| {
                    vec![
                        format!("Failed to get block stats {d} {dev}"),
                        format!("invalid argument: invalid path: {dev}; see domblklist for the domain's disks"),
                    ]
                })?;
            blkstat_lines(dev, b)
        }
        None => {
            let mut sum = BlockStats {
                name: String::new(),
                path: String::new(),
                rd_req: 0,
                rd_bytes: 0,
                wr_req: 0,
                wr_bytes: 0,
                flush_operations: 0,
                errs: 0,
            };
            for b in &s.block {
                sum.rd_req += b.rd_req;
                sum.rd_bytes += b.rd_bytes;
                sum.wr_req += b.wr_req;
                sum.wr_bytes += b.wr_bytes;
                sum.flush_operations += b.flush_operations;
            }
            blkstat_lines("", &sum)
        }
    };
    println!("{out}");
    Ok(())
}

pub fn ifstat_lines(n: &NetStats) -> String {
    [
        ("rx_bytes", n.rx_bytes),
        ("rx_packets", n.rx_packets),
        ("rx_errs", n.rx_errs),
        ("rx_drop", n.rx_drop),
        ("tx_bytes", n.tx_bytes),
        ("tx_packets", n.tx_packets),
        ("tx_errs", n.tx_errs),
        ("tx_drop", n.tx_drop),
    ]
    .iter()
    .map(|(k, v)| format!("{} {k} {v}\n", n.name))
    .collect()
}

pub fn domifstat(c: &Client, d: &str, iface: &str) -> Out {
    let s = stats(c, d)?;
    let n = s
        .net
        .iter()
        .find(|n| n.name == iface || n.mac.eq_ignore_ascii_case(iface))
        .ok_or_else(|| {
            vec![
                format!("Failed to get interface stats {d} {iface}"),
                format!("invalid argument: invalid path, '{iface}' is not a known interface; see domiflist"),
            ]
        })?;
    println!("{}", ifstat_lines(n));
    Ok(())
}

/// libvirt's numeric state and reason (virDomainState and the per-state reason enums).
fn state_numbers(s: DomainState, r: StateReason) -> (u32, u32) {
    let state = match s {
        DomainState::Running => 1,
        DomainState::Paused => 3,
        DomainState::InShutdown => 4,
        DomainState::ShutOff => 5,
        DomainState::Crashed => 6,
    };
    let reason = match (s, r) {
        (DomainState::Running, StateReason::Booted) => 1,
        (DomainState::Running, StateReason::Unpaused) => 5,
        (DomainState::Paused | DomainState::InShutdown, StateReason::User) => 1,
        (DomainState::ShutOff, StateReason::Shutdown) => 1,
        (DomainState::ShutOff, StateReason::Destroyed) => 2,
        (DomainState::ShutOff, StateReason::Crashed) => 3,
        (DomainState::ShutOff, StateReason::Failed) => 6,
        _ => 0,
    };
    (state, reason)
}

pub fn domstats_text(s: &DomainStats) -> String {
    let (state, reason) = state_numbers(s.state, s.reason);
    let mut o = format!("Domain: '{}'\n", s.name);
    let mut kv = |k: &str, v: String| o.push_str(&format!("  {k}={v}\n"));
    kv("state.state", state.to_string());
    kv("state.reason", reason.to_string());
    let active = s.state.is_active();
    if active {
        kv("cpu.time", s.cpu_time_ns.to_string());
    }
    kv("balloon.current", s.balloon_current_kib.to_string());
    kv("balloon.maximum", s.balloon_maximum_kib.to_string());
    if active {
        kv("balloon.rss", s.rss_kib.to_string());
    }
    kv("vcpu.current", s.vcpu_current.to_string());
    kv("vcpu.maximum", s.vcpu_maximum.to_string());
    if active {
        kv("net.count", s.net.len().to_string());
        for (i, n) in s.net.iter().enumerate() {
            kv(&format!("net.{i}.name"), n.name.clone());
            kv(&format!("net.{i}.rx.bytes"), n.rx_bytes.to_string());
            kv(&format!("net.{i}.rx.pkts"), n.rx_packets.to_string());
            kv(&format!("net.{i}.rx.errs"), n.rx_errs.to_string());
            kv(&format!("net.{i}.rx.drop"), n.rx_drop.to_string());
            kv(&format!("net.{i}.tx.bytes"), n.tx_bytes.to_string());
            kv(&format!("net.{i}.tx.pkts"), n.tx_packets.to_string());
            kv(&format!("net.{i}.tx.errs"), n.tx_errs.to_string());
            kv(&format!("net.{i}.tx.drop"), n.tx_drop.to_string());
        }
        kv("block.count", s.block.len().to_string());
        for (i, b) in s.block.iter().enumerate() {
            kv(&format!("block.{i}.name"), b.name.clone());
            kv(&format!("block.{i}.path"), b.path.clone());
            kv(&format!("block.{i}.rd.reqs"), b.rd_req.to_string());
            kv(&format!("block.{i}.rd.bytes"), b.rd_bytes.to_string());
            kv(&format!("block.{i}.wr.reqs"), b.wr_req.to_string());
            kv(&format!("block.{i}.wr.bytes"), b.wr_bytes.to_string());
            kv(
                &format!("block.{i}.fl.reqs"),
                b.flush_operations.to_string(),
            );
        }
    }
    o
}

pub fn domstats(c: &Client, d: &str) -> Out {
    let s: DomainStats = get(c, d, "/stats")?;
    println!("{}", domstats_text(&s));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_scale_like_virsh() {
        assert_eq!(parse_size_kib("524288"), Ok(524288));
        assert_eq!(parse_size_kib("512M"), Ok(524288));
        assert_eq!(parse_size_kib("512MiB"), Ok(524288));
        assert_eq!(parse_size_kib("1G"), Ok(1 << 20));
        assert_eq!(parse_size_kib("1GB"), Ok(976563));
        assert_eq!(parse_size_kib("1500b"), Ok(2));
        assert!(parse_size_kib("12furlongs").is_err());
        assert!(parse_size_kib("-5").is_err());
    }

    #[test]
    fn vcpucount_layout() {
        let v = VcpuCount {
            maximum_config: 4,
            maximum_live: Some(4),
            current_config: 2,
            current_live: Some(3),
        };
        assert_eq!(
            vcpucount_lines(&v),
            "maximum      config         4\n\
             maximum      live           4\n\
             current      config         2\n\
             current      live           3\n"
        );
    }

    #[test]
    fn qmp_replies_put_return_first() {
        let v = serde_json::json!({"id": "x", "return": {"actual": 5}});
        assert_eq!(qmp_text(&v, false), r#"{"return":{"actual":5},"id":"x"}"#);
        assert_eq!(
            qmp_text(&v, true),
            "{\n  \"return\": {\n    \"actual\": 5\n  },\n  \"id\": \"x\"\n}"
        );
    }

    #[test]
    fn ifstat_and_shut_off_domstats_layouts() {
        let n = NetStats {
            name: "rvnet0".into(),
            mac: "52:54:00:00:00:01".into(),
            rx_bytes: 1,
            rx_packets: 2,
            rx_errs: 0,
            rx_drop: 3,
            tx_bytes: 4,
            tx_packets: 5,
            tx_errs: 0,
            tx_drop: 6,
        };
        assert_eq!(
            ifstat_lines(&n),
            "rvnet0 rx_bytes 1\nrvnet0 rx_packets 2\nrvnet0 rx_errs 0\nrvnet0 rx_drop 3\n\
             rvnet0 tx_bytes 4\nrvnet0 tx_packets 5\nrvnet0 tx_errs 0\nrvnet0 tx_drop 6\n"
        );
        let s = DomainStats {
            name: "vm1".into(),
            state: DomainState::ShutOff,
            reason: StateReason::Destroyed,
            cpu_time_ns: 0,
            balloon_current_kib: 1024,
            balloon_maximum_kib: 2048,
            rss_kib: 0,
            vcpu_current: 1,
            vcpu_maximum: 2,
            block: Vec::new(),
            net: Vec::new(),
        };
        assert_eq!(
            domstats_text(&s),
            "Domain: 'vm1'\n  state.state=5\n  state.reason=2\n  balloon.current=1024\n  \
             balloon.maximum=2048\n  vcpu.current=1\n  vcpu.maximum=2\n"
        );
    }

    #[test]
    fn attach_disk_builds_libvirt_xml() {
        let a = DiskArgs {
            source: "/i/a.qcow2".into(),
            target: "vdb".into(),
            targetbus: None,
            driver: Some("qemu".into()),
            subdriver: Some("qcow2".into()),
            mode: Some("readonly".into()),
            cache: Some("none".into()),
        };
        assert_eq!(
            disk_xml(&a).unwrap(),
            "<disk type='file' device='disk'>\n  <driver name='qemu' type='qcow2' cache='none'/>\n  <source file='/i/a.qcow2'/>\n  <target dev='vdb' bus='virtio'/>\n  <readonly/>\n</disk>\n"
        );
    }
}
