//! One function per verb: call rvirtd, print what virsh prints.

use crate::client::{seg, Client, ClientError};
use crate::live::DetachWhat;
use crate::table::Table;
use crate::{install, Cmd, ListArgs, Scope};
use clap::CommandFactory;
use rvirt_api::rest::*;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::path::Path;

/// Error lines, printed each with an `error: ` prefix (virsh prints two for a failed action).
pub(crate) type Out = Result<(), Vec<String>>;

pub(crate) fn fail(context: Option<String>, key: &str, e: ClientError) -> Vec<String> {
    match (&e, e.code()) {
        (_, Some(ErrorCode::NoDomain)) => {
            vec![format!("failed to get domain '{key}'"), e.to_string()]
        }
        (ClientError::Api(b), _) if b.error == "Domain is already active" => vec![b.error.clone()],
        _ => context.into_iter().chain([e.to_string()]).collect(),
    }
}

pub(crate) fn dom_path(d: &str, rest: &str) -> String {
    format!("/v1/domains/{}{rest}", seg(d))
}

/// A lifecycle action: POST, then virsh's confirmation line.
fn action(c: &Client, d: &str, verb: &str, body: serde_json::Value, done: &str) -> Out {
    c.post::<serde_json::Value>(&dom_path(d, &format!("/{verb}")), &body)
        .map_err(|e| fail(Some(format!("Failed to {verb} domain '{d}'")), d, e))?;
    println!("Domain '{d}' {done}\n");
    Ok(())
}

pub(crate) fn get<T: DeserializeOwned>(c: &Client, d: &str, rest: &str) -> Result<T, Vec<String>> {
    c.get(&dom_path(d, rest)).map_err(|e| fail(None, d, e))
}

fn net_path(n: &str, rest: &str) -> String {
    format!("/v1/networks/{}{rest}", seg(n))
}

fn net_fail(context: Option<String>, key: &str, e: ClientError) -> Vec<String> {
    match e.code() {
        Some(ErrorCode::NoNetwork) => vec![format!("failed to get network '{key}'"), e.to_string()],
        _ => context.into_iter().chain([e.to_string()]).collect(),
    }
}

fn net_get<T: DeserializeOwned>(c: &Client, n: &str, rest: &str) -> Result<T, Vec<String>> {
    c.get(&net_path(n, rest)).map_err(|e| net_fail(None, n, e))
}

/// A network action: POST, then virsh's confirmation line.
fn net_action(c: &Client, n: &str, rest: &str, verb: &str, done: &str) -> Out {
    c.post::<serde_json::Value>(&net_path(n, rest), &json!({}))
        .map_err(|e| net_fail(Some(format!("Failed to {verb} network '{n}'")), n, e))?;
    println!("Network '{n}' {done}\n");
    Ok(())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn net_list(c: &Client, all: bool, inactive: bool, name: bool, json: bool) -> Out {
    let mut nets: Vec<NetworkSummary> = c
        .get("/v1/networks")
        .map_err(|e| vec!["failed to list networks".to_string(), e.to_string()])?;
    nets.retain(|n| all || (inactive && !n.active) || (!inactive && n.active));
    nets.sort_by(|a, b| a.name.cmp(&b.name));
    if json {
        print_json(&nets);
        return Ok(());
    }
    if name {
        for n in &nets {
            println!("{}", n.name);
        }
        println!();
        return Ok(());
    }
    print!("{}", net_list_table(&nets));
    println!();
    Ok(())
}

pub fn net_list_table(nets: &[NetworkSummary]) -> String {
    let mut t = Table::new(&["Name", "State", "Autostart", "Persistent"]);
    for n in nets {
        t.row(vec![
            n.name.clone(),
            if n.active { "active" } else { "inactive" }.to_string(),
            yes_no(n.autostart),
            yes_no(n.persistent),
        ]);
    }
    t.render()
}

fn net_info(c: &Client, n: &str, json: bool) -> Out {
    let i: NetworkSummary = net_get(c, n, "")?;
    if json {
        print_json(&i);
        return Ok(());
    }
    let row = |k: &str, v: String| println!("{k:<15} {v}");
    row("Name:", i.name.clone());
    row("UUID:", i.uuid.clone());
    row("Active:", yes_no(i.active));
    row("Persistent:", yes_no(i.persistent));
    row("Autostart:", yes_no(i.autostart));
    row("Bridge:", i.bridge.clone());
    println!();
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` in local time, as virsh prints lease expiry.
fn local_time(secs: u64) -> String {
    if secs == 0 {
        return "never".to_string();
    }
    let t = secs as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives on this stack frame.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

pub fn leases_table(leases: &[NetDhcpLease]) -> String {
    let mut t = Table::new(&[
        "Expiry Time",
        "MAC address",
        "Protocol",
        "IP address",
        "Hostname",
        "Client ID or DUID",
    ]);
    for l in leases {
        t.row(vec![
            local_time(l.expirytime),
            l.mac.clone(),
            l.kind.clone(),
            format!("{}/{}", l.ipaddr, l.prefix),
            l.hostname.clone().unwrap_or_else(|| "-".into()),
            l.clientid.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

fn net_dhcp_leases(c: &Client, n: &str, mac: Option<String>, json: bool) -> Out {
    let mut leases: Vec<NetDhcpLease> = net_get(c, n, "/dhcp-leases")?;
    if let Some(m) = &mac {
        leases.retain(|l| l.mac.eq_ignore_ascii_case(m));
    }
    if json {
        print_json(&leases);
        return Ok(());
    }
    print!("{}", leases_table(&leases));
    println!();
    Ok(())
}

fn domifaddr(c: &Client, d: &str, json: bool) -> Out {
    let addrs: Vec<IfAddr> = get(c, d, "/ifaddr")?;
    if json {
        print_json(&addrs);
        return Ok(());
    }
    let mut t = Table::new(&["Name", "MAC address", "Protocol", "Address"]);
    for a in &addrs {
        t.row(vec![
            a.name.clone(),
            a.mac.clone(),
            a.protocol.clone(),
            a.address.clone(),
        ]);
    }
    print!("{}", t.render());
    println!();
    Ok(())
}

pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

pub(crate) fn read_file(p: &Path) -> Result<String, Vec<String>> {
    std::fs::read_to_string(p)
        .map_err(|e| vec![format!("Failed to open file '{}': {e}", p.display())])
}

fn print_warnings(w: &[String]) {
    for line in w {
        eprintln!("warning: {line}");
    }
}

pub fn run(c: &Client, cmd: Cmd) -> Out {
    match cmd {
        Cmd::List(args) => list(c, &args),
        Cmd::Define { file } => {
            let xml = read_file(&file)?;
            let r: DefineResponse = c
                .post(
                    "/v1/domains",
                    &DefineRequest {
                        xml,
                        transient: false,
                    },
                )
                .map_err(|e| {
                    fail(
                        Some(format!("Failed to define domain from {}", file.display())),
                        "",
                        e,
                    )
                })?;
            print_warnings(&r.warnings);
            println!("Domain '{}' defined from {}\n", r.name, file.display());
            Ok(())
        }
        Cmd::Create { file, console } => {
            let xml = read_file(&file)?;
            let r: DefineResponse = c
                .post(
                    "/v1/domains",
                    &DefineRequest {
                        xml,
                        transient: true,
                    },
                )
                .map_err(|e| {
                    fail(
                        Some(format!("Failed to create domain from {}", file.display())),
                        "",
                        e,
                    )
                })?;
            print_warnings(&r.warnings);
            println!("Domain '{}' created from {}\n", r.name, file.display());
            if console {
                return attach(c, &r.name, false);
            }
            Ok(())
        }
        Cmd::Undefine {
            domain,
            nvram,
            keep_nvram,
        } => {
            let query = if nvram {
                "?nvram=true"
            } else if keep_nvram {
                "?keep_nvram=true"
            } else {
                ""
            };
            c.call::<serde_json::Value>("DELETE", &dom_path(&domain, query), None::<&()>)
                .map_err(|e| {
                    fail(
                        Some(format!("Failed to undefine domain '{domain}'")),
                        &domain,
                        e,
                    )
                })?;
            println!("Domain '{domain}' has been undefined\n");
            Ok(())
        }
        Cmd::Start {
            domain,
            console,
            paused,
        } => {
            let body = serde_json::to_value(StartRequest { paused }).unwrap();
            action(c, &domain, "start", body, "started")?;
            if console {
                return attach(c, &domain, false);
            }
            Ok(())
        }
        Cmd::Shutdown { domain, timeout } => {
            let body = serde_json::to_value(ShutdownRequest {
                timeout_secs: timeout,
            })
            .unwrap();
            let done = if timeout.is_some() {
                "has been shut down"
            } else {
                "is being shutdown"
            };
            action(c, &domain, "shutdown", body, done)
        }
        Cmd::Reboot { domain } => action(c, &domain, "reboot", json!({}), "is being rebooted"),
        Cmd::Reset { domain } => action(c, &domain, "reset", json!({}), "was reset"),
        Cmd::Destroy { domain } => action(c, &domain, "destroy", json!({}), "destroyed"),
        Cmd::Suspend { domain } => action(c, &domain, "suspend", json!({}), "suspended"),
        Cmd::Resume { domain } => action(c, &domain, "resume", json!({}), "resumed"),
        Cmd::Dominfo { domain, json } => dominfo(c, &domain, json),
        Cmd::Domstate { domain, reason } => {
            let i: DomainInfo = get(c, &domain, "")?;
            if reason {
                println!(
                    "{} ({})\n",
                    i.summary.state.as_str(),
                    i.summary.reason.as_str()
                );
            } else {
                println!("{}\n", i.summary.state.as_str());
            }
            Ok(())
        }
        Cmd::Domid { domain } => field(c, &domain, |s| s.id.map_or("-".into(), |i| i.to_string())),
        Cmd::Domuuid { domain } => field(c, &domain, |s| s.uuid),
        Cmd::Domname { domain } => field(c, &domain, |s| s.name),
        Cmd::Dumpxml { domain, inactive } => {
            let x: XmlBody = get(
                c,
                &domain,
                if inactive {
                    "/xml?inactive=true"
                } else {
                    "/xml"
                },
            )?;
            print!("{}", x.xml);
            Ok(())
        }
        Cmd::Edit { domain } => edit(c, &domain),
        Cmd::Autostart { domain, disable } => {
            c.call::<serde_json::Value>(
                "PUT",
                &dom_path(&domain, "/autostart"),
                Some(&AutostartRequest { enable: !disable }),
            )
            .map_err(|e| {
                fail(
                    Some(format!(
                        "Failed to {}mark domain '{domain}' as autostarted",
                        if disable { "un" } else { "" }
                    )),
                    &domain,
                    e,
                )
            })?;
            if disable {
                println!("Domain '{domain}' unmarked as autostarted\n");
            } else {
                println!("Domain '{domain}' marked as autostarted\n");
            }
            Ok(())
        }
        Cmd::Console { domain, force } => attach(c, &domain, force),
        Cmd::Domblklist {
            domain,
            details,
            json,
        } => {
            let disks: Vec<BlockDevice> = get(c, &domain, "/disks")?;
            if json {
                print_json(&disks);
                return Ok(());
            }
            let mut t = if details {
                Table::new(&["Type", "Device", "Target", "Source"])
            } else {
                Table::new(&["Target", "Source"])
            };
            for d in disks {
                if details {
                    t.row(vec![d.kind, d.device, d.target, d.source]);
                } else {
                    t.row(vec![d.target, d.source]);
                }
            }
            println!("{}", t.render());
            Ok(())
        }
        Cmd::Domifaddr { domain, json } => domifaddr(c, &domain, json),
        Cmd::NetDefine { file } => {
            let xml = read_file(&file)?;
            let r: NetDefineResponse =
                c.post("/v1/networks", &NetDefineRequest { xml })
                    .map_err(|e| {
                        fail(
                            Some(format!("Failed to define network from {}", file.display())),
                            "",
                            e,
                        )
                    })?;
            println!("Network '{}' defined from {}\n", r.name, file.display());
            Ok(())
        }
        Cmd::NetUndefine { network } => {
            c.call::<serde_json::Value>("DELETE", &net_path(&network, ""), None::<&()>)
                .map_err(|e| {
                    net_fail(
                        Some(format!("Failed to undefine network '{network}'")),
                        &network,
                        e,
                    )
                })?;
            println!("Network '{network}' has been undefined\n");
            Ok(())
        }
        Cmd::NetStart { network } => net_action(c, &network, "/start", "start", "started"),
        Cmd::NetDestroy { network, force } => {
            let q = if force {
                "/destroy?force=true"
            } else {
                "/destroy"
            };
            net_action(c, &network, q, "destroy", "destroyed")
        }
        Cmd::NetList {
            all,
            inactive,
            name,
            json,
        } => net_list(c, all, inactive, name, json),
        Cmd::NetInfo { network, json } => net_info(c, &network, json),
        Cmd::NetDumpxml { network } => {
            let x: XmlBody = net_get(c, &network, "/xml")?;
            print!("{}", x.xml);
            if !x.xml.ends_with('\n') {
                println!();
            }
            Ok(())
        }
        Cmd::NetAutostart { network, disable } => {
            c.call::<serde_json::Value>(
                "PUT",
                &net_path(&network, "/autostart"),
                Some(&AutostartRequest { enable: !disable }),
            )
            .map_err(|e| {
                let what = if disable { "unmark" } else { "mark" };
                net_fail(
                    Some(format!(
                        "failed to {what} network '{network}' as autostarted"
                    )),
                    &network,
                    e,
                )
            })?;
            if disable {
                println!("Network '{network}' unmarked as autostarted\n");
            } else {
                println!("Network '{network}' marked as autostarted\n");
            }
            Ok(())
        }
        Cmd::NetDhcpLeases { network, mac, json } => net_dhcp_leases(c, &network, mac, json),
        Cmd::Domiflist { domain, json } => {
            let ifs: Vec<NetInterface> = get(c, &domain, "/interfaces")?;
            if json {
                print_json(&ifs);
                return Ok(());
            }
            let mut t = Table::new(&["Interface", "Type", "Source", "Model", "MAC"]);
            for i in ifs {
                t.row(vec![i.interface, i.kind, i.source, i.model, i.mac]);
            }
            println!("{}", t.render());
            Ok(())
        }
        Cmd::Vcpupin {
            domain,
            vcpu,
            cpulist,
            scope,
            json,
        } => vcpupin(c, &domain, vcpu, cpulist, scope, json),
        Cmd::Vcpuinfo { domain, json } => {
            let v: Vec<VcpuInfo> = get(c, &domain, "/vcpus")?;
            if json {
                print_json(&v);
                return Ok(());
            }
            for i in v {
                println!("{:<15} {}", "VCPU:", i.vcpu);
                println!(
                    "{:<15} {}",
                    "CPU:",
                    i.cpu.map_or("-".to_string(), |c| c.to_string())
                );
                println!("{:<15} {}", "State:", i.state);
                println!("{:<15} {:.1}s", "CPU time:", i.cpu_time_ns as f64 / 1e9);
                println!("{:<15} {}", "CPU Affinity:", i.affinity_map);
                println!("{:<15} {}\n", "Thread ID:", i.tid);
            }
            Ok(())
        }
        Cmd::Emulatorpin {
            domain,
            cpulist,
            scope,
        } => emulatorpin(c, &domain, cpulist, scope),
        Cmd::Install(args) => crate::commands::install(c, &args),
        Cmd::Dommemstat {
            domain,
            period,
            scope,
        } => crate::live::dommemstat(c, &domain, period, scope),
        Cmd::Setmem {
            domain,
            size,
            scope,
        } => crate::live::setmem(c, &domain, &size, false, scope),
        Cmd::Setmaxmem {
            domain,
            size,
            scope,
        } => crate::live::setmem(c, &domain, &size, true, scope),
        Cmd::Setvcpus {
            domain,
            count,
            maximum,
            scope,
        } => crate::live::setvcpus(c, &domain, count, maximum, scope),
        Cmd::Vcpucount { domain } => crate::live::vcpucount(c, &domain),
        Cmd::QemuMonitorCommand {
            domain,
            hmp,
            pretty,
            cmd_opt,
            words,
        } => {
            let cmd: Vec<String> = cmd_opt.into_iter().chain(words).collect();
            crate::live::monitor(c, &domain, hmp, pretty, &cmd.join(" "))
        }
        Cmd::AttachDisk {
            domain,
            source,
            target,
            targetbus,
            driver,
            subdriver,
            mode,
            cache,
            dev,
        } => crate::live::attach_disk(
            c,
            &domain,
            crate::live::DiskArgs {
                source,
                target,
                targetbus,
                driver,
                subdriver,
                mode,
                cache,
            },
            dev,
        ),
        Cmd::ChangeMedia {
            domain,
            path,
            source,
            eject,
            insert,
            update,
            force,
            dev,
        } => crate::live::change_media(
            c,
            &domain,
            &path,
            source,
            (eject, insert, update, force),
            dev,
        ),
        Cmd::DetachDisk {
            domain,
            target,
            dev,
        } => crate::live::detach(c, &domain, DetachWhat::Disk(target), dev),
        Cmd::AttachInterface {
            domain,
            kind,
            source,
            mac,
            model,
            dev,
        } => crate::live::attach_interface(c, &domain, &kind, &source, mac, model, dev),
        Cmd::DetachInterface {
            domain,
            kind,
            mac,
            dev,
        } => crate::live::detach(c, &domain, DetachWhat::Iface(kind, mac), dev),
        Cmd::AttachDevice { domain, file, dev } => {
            crate::live::attach_device(c, &domain, &file, dev)
        }
        Cmd::DetachDevice { domain, file, dev } => {
            crate::live::detach(c, &domain, DetachWhat::File(file), dev)
        }
        Cmd::Domblkstat { domain, device } => crate::live::domblkstat(c, &domain, device),
        Cmd::Domifstat { domain, interface } => crate::live::domifstat(c, &domain, &interface),
        Cmd::Domstats { domain } => crate::live::domstats(c, &domain),
        Cmd::Version => {
            println!(
                "Compiled against library: rvirt {}",
                env!("CARGO_PKG_VERSION")
            );
            println!("Using API: rvirtd REST v1");
            let v: serde_json::Value = c.get("/v1/version").map_err(|e| fail(None, "", e))?;
            println!(
                "Running daemon: {} {}\n",
                v["name"].as_str().unwrap_or("rvirtd"),
                v["version"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Cmd::Completion { shell } => {
            let mut cmd = crate::Cli::command();
            clap_complete::generate(shell, &mut cmd, "rvirt", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { dir } => {
            man(&dir).map_err(|e| vec![format!("cannot write man pages to {}: {e}", dir.display())])
        }
    }
}

/// domid/domuuid/domname: one field of the domain, virsh-style.
fn field(c: &Client, d: &str, pick: impl FnOnce(DomainSummary) -> String) -> Out {
    let i: DomainInfo = get(c, d, "")?;
    println!("{}\n", pick(i.summary));
    Ok(())
}

fn selected(a: &ListArgs, d: &DomainSummary) -> bool {
    use DomainState as S;
    let states = [
        a.state_running,
        a.state_paused,
        a.state_shutoff,
        a.state_other,
    ];
    let by_state = if states.iter().any(|&x| x) {
        match d.state {
            S::Running => a.state_running,
            S::Paused => a.state_paused,
            S::ShutOff => a.state_shutoff,
            S::InShutdown | S::Crashed => a.state_other,
        }
    } else if a.all {
        true
    } else {
        d.state.is_active() != a.inactive
    };
    let by_persistence = (!a.persistent && !a.transient)
        || (a.persistent && d.persistent)
        || (a.transient && !d.persistent);
    let by_autostart = (!a.autostart && !a.no_autostart)
        || (a.autostart && d.autostart)
        || (a.no_autostart && !d.autostart);
    by_state && by_persistence && by_autostart
}

fn list(c: &Client, a: &ListArgs) -> Out {
    let (name, uuid, json) = (a.name, a.uuid, a.json);
    let mut doms: Vec<DomainSummary> = c.get("/v1/domains").map_err(|e| fail(None, "", e))?;
    doms.retain(|d| selected(a, d));
    // virsh: running domains by id first, then inactive ones by name.
    doms.sort_by(|a, b| match (a.id, b.id) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.name.cmp(&b.name),
    });
    if json {
        print_json(&doms);
        return Ok(());
    }
    if name || uuid {
        let mut out = String::new();
        for d in &doms {
            match (uuid, name) {
                (true, true) => out.push_str(&format!("{} {}\n", d.uuid, d.name)),
                (true, false) => out.push_str(&format!("{}\n", d.uuid)),
                _ => out.push_str(&format!("{}\n", d.name)),
            }
        }
        println!("{out}");
        return Ok(());
    }
    let mut t = Table::new(&["Id", "Name", "State"]);
    for d in &doms {
        t.row(vec![
            d.id.map_or("-".to_string(), |i| i.to_string()),
            d.name.clone(),
            d.state.as_str().to_string(),
        ]);
    }
    println!("{}", t.render());
    Ok(())
}

fn dominfo(c: &Client, d: &str, json: bool) -> Out {
    let i: DomainInfo = get(c, d, "")?;
    if json {
        print_json(&i);
        return Ok(());
    }
    let s = &i.summary;
    let row = |k: &str, v: String| println!("{k:<15} {v}");
    row("Id:", s.id.map_or("-".to_string(), |i| i.to_string()));
    row("Name:", s.name.clone());
    row("UUID:", s.uuid.clone());
    row("OS Type:", i.os_type.clone());
    row("State:", s.state.as_str().to_string());
    row("CPU(s):", i.vcpus.to_string());
    if let Some(ns) = i.cpu_time_ns {
        row("CPU time:", format!("{:.1}s", ns as f64 / 1e9));
    }
    row("Max memory:", format!("{} KiB", i.max_memory_kib));
    row("Used memory:", format!("{} KiB", i.used_memory_kib));
    row(
        "Persistent:",
        if s.persistent { "yes" } else { "no" }.to_string(),
    );
    row(
        "Autostart:",
        if s.autostart { "enable" } else { "disable" }.to_string(),
    );
    row("Managed save:", "no".to_string());
    row("Security model:", "none".to_string());
    row("Security DOI:", "0".to_string());
    // rvirt's addition after virsh's rows: how the running VMM backs guest RAM.
    if let Some(b) = &i.memory_backing {
        row("Memory backing:", b.describe());
    }
    println!();
    Ok(())
}

fn scope_of(s: Scope) -> PinScope {
    PinScope {
        live: s.live && !s.current,
        config: s.config && !s.current,
    }
}

fn vcpupin(
    c: &Client,
    d: &str,
    vcpu: Option<u32>,
    cpulist: Option<String>,
    scope: Scope,
    json: bool,
) -> Out {
    if let (Some(vcpu), Some(cpuset)) = (vcpu, cpulist) {
        let req = VcpuPinRequest {
            vcpu,
            cpuset,
            scope: scope_of(scope),
        };
        return c
            .post::<serde_json::Value>(&dom_path(d, "/vcpupin"), &req)
            .map(|_| println!())
            .map_err(|e| fail(Some("vcpupin: failed to update vcpu pinning".into()), d, e));
    }
    let info: PinInfo = get(c, d, "/vcpupin")?;
    if json {
        print_json(&info);
        return Ok(());
    }
    let mut t = Table::new(&["VCPU", "CPU Affinity"]);
    for p in info
        .vcpus
        .iter()
        .filter(|p| vcpu.is_none_or(|v| v == p.vcpu))
    {
        t.row(vec![p.vcpu.to_string(), p.affinity.clone()]);
    }
    println!("{}", t.render());
    Ok(())
}

fn emulatorpin(c: &Client, d: &str, cpulist: Option<String>, scope: Scope) -> Out {
    if let Some(cpuset) = cpulist {
        let req = EmulatorPinRequest {
            cpuset,
            scope: scope_of(scope),
        };
        return c
            .post::<serde_json::Value>(&dom_path(d, "/emulatorpin"), &req)
            .map(|_| println!())
            .map_err(|e| fail(Some("Unable to change emulatorpin".into()), d, e));
    }
    let info: PinInfo = get(c, d, "/vcpupin")?;
    println!("emulator: CPU Affinity");
    println!("----------------------------------");
    println!("       *: {}\n", info.emulator);
    Ok(())
}

fn attach(c: &Client, d: &str, force: bool) -> Out {
    crate::console::attach(c, d, force).map_err(|e| fail(None, d, e))
}

/// virsh edit: $EDITOR on a temp copy; on a failed define, offer to edit again.
fn edit(c: &Client, d: &str) -> Out {
    use std::io::{BufRead, Write};
    let x: XmlBody = get(c, d, "/xml?inactive=true")?;
    let dir = tempfile::tempdir().map_err(|e| vec![format!("cannot create a temp dir: {e}")])?;
    let path = dir.path().join(format!("{d}.xml"));
    std::fs::write(&path, &x.xml)
        .map_err(|e| vec![format!("cannot write {}: {e}", path.display())])?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    loop {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&path)
            .status()
            .map_err(|e| vec![format!("cannot run editor '{editor}': {e}")])?;
        if !status.success() {
            return Err(vec![format!(
                "editor '{editor}' failed ({status}); nothing changed"
            )]);
        }
        let new = read_file(&path)?;
        if new == x.xml {
            println!("Domain '{d}' XML configuration not changed.\n");
            return Ok(());
        }
        match c.post::<DefineResponse>(
            "/v1/domains",
            &DefineRequest {
                xml: new,
                transient: false,
            },
        ) {
            Ok(r) => {
                print_warnings(&r.warnings);
                println!("Domain '{}' XML configuration edited.\n", r.name);
                return Ok(());
            }
            Err(e) => {
                eprintln!("error: {e}");
                print!("Failed. Try again? [y,n]: ");
                let _ = std::io::stdout().flush();
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer).ok();
                if !answer.trim().eq_ignore_ascii_case("y") {
                    return Err(vec![format!("Domain '{d}' XML configuration not changed.")]);
                }
            }
        }
    }
}

fn install(c: &Client, args: &install::InstallArgs) -> Out {
    let err = |e: anyhow::Error| vec![format!("{e:#}")];
    let disks = install::plan_disks(args).map_err(err)?;
    let xml = install::build_xml(args, &disks).map_err(err)?;
    if args.print_xml {
        print!("{xml}");
        return Ok(());
    }
    if let Some(boot) = &args.boot {
        for (k, v) in install::parse_opts(boot).map_err(err)? {
            if k == "kernel" || k == "initrd" {
                install::check_file(Path::new(&v), &k).map_err(err)?;
            }
        }
    }
    println!("\nStarting install...");
    for d in &disks {
        if d.create_size.is_some() {
            println!(
                "Creating storage file {} ({} format)",
                d.path.display(),
                d.format
            );
            if let Err(e) = install::create_disk(d) {
                install::remove_created(&disks);
                return Err(err(e));
            }
        }
    }
    println!("Creating domain...");
    let defined: Result<DefineResponse, _> = c.post(
        "/v1/domains",
        &DefineRequest {
            xml,
            transient: false,
        },
    );
    let r = match defined {
        Ok(r) => r,
        Err(e) => {
            install::remove_created(&disks);
            return Err(fail(
                Some(format!("Failed to define domain '{}'", args.name)),
                &args.name,
                e,
            ));
        }
    };
    print_warnings(&r.warnings);
    if args.autostart {
        c.call::<serde_json::Value>(
            "PUT",
            &dom_path(&r.name, "/autostart"),
            Some(&AutostartRequest { enable: true }),
        )
        .map_err(|e| fail(None, &r.name, e))?;
    }
    c.post::<serde_json::Value>(&dom_path(&r.name, "/start"), &json!({}))
        .map_err(|e| {
            fail(
                Some(format!(
                    "Failed to start domain '{}' (it stays defined; fix and run 'rvirt start {}')",
                    r.name, r.name
                )),
                &r.name,
                e,
            )
        })?;
    if args.cdrom.is_some() {
        // As virt-install: the definition the domain keeps boots its disk with the drive
        // emptied; the running install keeps its disc until the installer reboots.
        let final_xml = install::build_xml_phase(args, &disks, false).map_err(err)?;
        let r2: Result<DefineResponse, _> = c.post(
            "/v1/domains",
            &DefineRequest {
                xml: final_xml,
                transient: false,
            },
        );
        r2.map_err(|e| {
            fail(
                Some(format!(
                    "Failed to define the post-install domain '{}'",
                    r.name
                )),
                &r.name,
                e,
            )
        })?;
    }
    println!("Domain creation completed.");
    if args.cdrom.is_some() {
        println!(
            "When the installer reboots, the domain shuts off; 'rvirt start {}' boots the installed system.",
            r.name
        );
    }
    if args.noautoconsole {
        println!("You can reconnect to the console to complete the installation process with 'rvirt console {}'.", r.name);
        return Ok(());
    }
    attach(c, &r.name, false)
}

fn man(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cmd = crate::Cli::command();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(dir.join("rvirt.1"), buf)?;
    for sub in cmd.get_subcommands() {
        let name = format!("rvirt-{}", sub.get_name());
        let sub = sub.clone().name(&*Box::leak(name.clone().into_boxed_str()));
        let mut buf = Vec::new();
        clap_mangen::Man::new(sub).render(&mut buf)?;
        std::fs::write(dir.join(format!("{name}.1")), buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod net_tests {
    use super::*;

    #[test]
    fn net_list_matches_virsh_layout() {
        let nets = vec![NetworkSummary {
            name: "default".into(),
            uuid: "u".into(),
            active: true,
            autostart: true,
            persistent: true,
            bridge: "rvirbr0".into(),
        }];
        let expected = " Name      State    Autostart   Persistent\n\
                        --------------------------------------------\n \
                        default   active   yes         yes\n";
        assert_eq!(net_list_table(&nets), expected);
    }

    #[test]
    fn leases_header_matches_virsh() {
        let out = leases_table(&[NetDhcpLease {
            iface: "rvirbr0".into(),
            expirytime: 0,
            kind: "ipv4".into(),
            mac: "52:54:00:00:00:01".into(),
            ipaddr: "192.168.122.10".into(),
            prefix: 24,
            hostname: Some("vm1".into()),
            clientid: None,
        }]);
        let mut lines = out.lines();
        let head = lines.next().unwrap();
        for col in [
            "Expiry Time",
            "MAC address",
            "Protocol",
            "IP address",
            "Hostname",
            "Client ID or DUID",
        ] {
            assert!(head.contains(col), "{head}");
        }
        assert!(lines.next().unwrap().chars().all(|c| c == '-'));
        let row = lines.next().unwrap();
        assert!(row.contains("192.168.122.10/24") && row.contains("vm1") && row.ends_with('-'));
    }
}
