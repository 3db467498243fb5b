//! The OpenAPI 3 description served at `/v1/openapi.json`. Kept next to the router; the test
//! `openapi_lists_every_route` checks the two agree.

use serde_json::{json, Value};

/// (method, path, summary, request schema, response schema)
pub const OPERATIONS: &[(&str, &str, &str, Option<&str>, &str)] = &[
    ("get", "/v1/version", "Daemon name and API version", None, "Version"),
    ("get", "/v1/domains", "List all domains (virsh list --all)", None, "DomainSummaryList"),
    ("post", "/v1/domains", "Define a domain, or create a transient one and start it", Some("DefineRequest"), "DefineResponse"),
    ("get", "/v1/domains/{name}", "Domain information (virsh dominfo); name, UUID or id", None, "DomainInfo"),
    ("delete", "/v1/domains/{name}", "Undefine a domain; ?nvram=true deletes its UEFI variable store, ?keep_nvram=true keeps it (one is needed when it exists)", None, "Empty"),
    ("get", "/v1/domains/{name}/xml", "Domain XML; ?inactive=true for the persistent definition", None, "XmlBody"),
    ("post", "/v1/domains/{name}/start", "Start a defined domain; optionally leave it paused", Some("StartRequest"), "Empty"),
    ("post", "/v1/domains/{name}/shutdown", "Press the ACPI power button; optional timeout", Some("ShutdownRequest"), "Empty"),
    ("post", "/v1/domains/{name}/reboot", "Reboot: ACPI power button, then start again (same id) once the guest powers off", None, "Empty"),
    ("post", "/v1/domains/{name}/reset", "Hard reset: stop the VMM and start it again (same id)", None, "Empty"),
    ("post", "/v1/domains/{name}/destroy", "Stop the domain now", None, "Empty"),
    ("post", "/v1/domains/{name}/suspend", "Pause all vCPUs", None, "Empty"),
    ("post", "/v1/domains/{name}/resume", "Resume paused vCPUs", None, "Empty"),
    ("put", "/v1/domains/{name}/autostart", "Enable or disable autostart", Some("AutostartRequest"), "Empty"),
    ("get", "/v1/domains/{name}/disks", "Block devices (virsh domblklist)", None, "BlockDeviceList"),
    ("get", "/v1/domains/{name}/interfaces", "Network interfaces (virsh domiflist)", None, "NetInterfaceList"),
    ("get", "/v1/domains/{name}/vcpus", "vCPU threads (virsh vcpuinfo)", None, "VcpuInfoList"),
    ("get", "/v1/domains/{name}/memstats", "Memory statistics in KiB (virsh dommemstat): balloon, guest statistics, VMM RSS", None, "MemStats"),
    ("put", "/v1/domains/{name}/memstats/period", "Guest memory statistics polling period (virsh dommemstat --period)", Some("StatsPeriodRequest"), "Empty"),
    ("put", "/v1/domains/{name}/memory", "Set the current memory (balloon target, virsh setmem) or with maximum the <memory> (virsh setmaxmem, config only)", Some("MemoryRequest"), "Empty"),
    ("put", "/v1/domains/{name}/vcpus", "Set the vCPU count (virsh setvcpus): live hotplug/unplug (waits for the guest, 5 s) and/or config", Some("VcpusRequest"), "Empty"),
    ("get", "/v1/domains/{name}/vcpucount", "Maximum and current vCPUs, config and live (virsh vcpucount)", None, "VcpuCount"),
    ("post", "/v1/domains/{name}/devices", "Attach a <disk> or <interface> (virsh attach-device/-disk/-interface), live and/or config", Some("AttachRequest"), "AttachResponse"),
    ("post", "/v1/domains/{name}/media", "Change, insert or eject the disc of a CD-ROM drive (virsh change-media)", Some("ChangeMediaRequest"), "Empty"),
    ("post", "/v1/domains/{name}/devices/detach", "Detach the device an XML element or a key names; live detach waits for the guest's eject (5 s)", Some("DetachRequest"), "Empty"),
    ("delete", "/v1/domains/{name}/devices/{key}", "Detach by disk target, MAC address or alias; ?live=true&config=true&kind=disk|interface", None, "Empty"),
    ("get", "/v1/domains/{name}/stats", "Domain statistics: state, balloon, vCPUs, per-disk and per-NIC counters (virsh domstats/domblkstat/domifstat)", None, "DomainStats"),
    ("post", "/v1/domains/{name}/monitor", "A QMP command (JSON) or with hmp an HMP command line, answered from rvirt-vmm's control requests (virsh qemu-monitor-command)", Some("MonitorRequest"), "MonitorReply"),
    ("get", "/v1/domains/{name}/vcpupin", "vCPU and emulator affinity", None, "PinInfo"),
    ("post", "/v1/domains/{name}/vcpupin", "Pin one vCPU", Some("VcpuPinRequest"), "Empty"),
    ("post", "/v1/domains/{name}/emulatorpin", "Pin the emulator threads", Some("EmulatorPinRequest"), "Empty"),
    ("get", "/v1/domains/{name}/console", "Serial console: upgrade to a raw byte stream (Upgrade: rvirt-console); ?force=true ends another session", None, "Empty"),
    ("get", "/v1/domains/{name}/ifaddr", "Interface addresses from DHCP leases (virsh domifaddr)", None, "IfAddrList"),
    ("get", "/v1/networks", "List all networks (virsh net-list --all)", None, "NetworkSummaryList"),
    ("post", "/v1/networks", "Define a network from libvirt network XML", Some("NetDefineRequest"), "NetDefineResponse"),
    ("get", "/v1/networks/{name}", "Network information (virsh net-info)", None, "NetworkSummary"),
    ("delete", "/v1/networks/{name}", "Undefine an inactive network", None, "Empty"),
    ("get", "/v1/networks/{name}/xml", "Network XML (virsh net-dumpxml)", None, "XmlBody"),
    ("post", "/v1/networks/{name}/start", "Start a network (bridge, dnsmasq, nftables)", None, "Empty"),
    ("post", "/v1/networks/{name}/destroy", "Stop a network; refused while guest TAPs are attached unless ?force=true", None, "Empty"),
    ("put", "/v1/networks/{name}/autostart", "Enable or disable network autostart", Some("AutostartRequest"), "Empty"),
    ("get", "/v1/networks/{name}/dhcp-leases", "DHCP leases (virsh net-dhcp-leases)", None, "NetDhcpLeaseList"),
    ("get", "/v1/openapi.json", "This document", None, "Empty"),
];

fn schemas() -> Value {
    let s = |props: &[(&str, &str)]| {
        let map: serde_json::Map<String, Value> = props
            .iter()
            .map(|(k, t)| (k.to_string(), json!({"type": t})))
            .collect();
        json!({"type": "object", "properties": map})
    };
    let list = |item: &str| json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{item}")}});
    json!({
        "Empty": s(&[]),
        "Version": s(&[("name", "string"), ("version", "string"), ("api", "string")]),
        "DomainSummary": s(&[("id", "integer"), ("name", "string"), ("uuid", "string"), ("state", "string"), ("reason", "string"), ("persistent", "boolean"), ("autostart", "boolean")]),
        "DomainSummaryList": list("DomainSummary"),
        "DomainInfo": s(&[("id", "integer"), ("name", "string"), ("uuid", "string"), ("state", "string"), ("reason", "string"), ("persistent", "boolean"), ("autostart", "boolean"), ("os_type", "string"), ("vcpus", "integer"), ("max_memory_kib", "integer"), ("used_memory_kib", "integer"), ("cpu_time_ns", "integer"), ("pid", "integer"), ("memory_backing", "object")]),
        "DefineRequest": s(&[("xml", "string"), ("transient", "boolean")]),
        "DefineResponse": s(&[("name", "string"), ("uuid", "string"), ("warnings", "array")]),
        "XmlBody": s(&[("xml", "string")]),
        "ShutdownRequest": s(&[("timeout_secs", "integer")]),
        "StartRequest": s(&[("paused", "boolean")]),
        "AutostartRequest": s(&[("enable", "boolean")]),
        "BlockDevice": s(&[("target", "string"), ("source", "string"), ("type", "string"), ("device", "string"), ("format", "string"), ("readonly", "boolean")]),
        "BlockDeviceList": list("BlockDevice"),
        "NetInterface": s(&[("interface", "string"), ("type", "string"), ("source", "string"), ("model", "string"), ("mac", "string")]),
        "NetInterfaceList": list("NetInterface"),
        "VcpuInfo": s(&[("vcpu", "integer"), ("cpu", "integer"), ("state", "string"), ("cpu_time_ns", "integer"), ("affinity", "string"), ("affinity_map", "string"), ("tid", "integer")]),
        "VcpuInfoList": list("VcpuInfo"),
        "MemStats": s(&[("swap_in", "integer"), ("swap_out", "integer"), ("major_fault", "integer"), ("minor_fault", "integer"), ("unused", "integer"), ("available", "integer"), ("usable", "integer"), ("actual", "integer"), ("rss", "integer"), ("last_update", "integer"), ("disk_caches", "integer"), ("hugetlb_pgalloc", "integer"), ("hugetlb_pgfail", "integer")]),
        "StatsPeriodRequest": s(&[("seconds", "integer"), ("live", "boolean"), ("config", "boolean")]),
        "MemoryRequest": s(&[("size_kib", "integer"), ("maximum", "boolean"), ("live", "boolean"), ("config", "boolean")]),
        "VcpusRequest": s(&[("count", "integer"), ("maximum", "boolean"), ("live", "boolean"), ("config", "boolean")]),
        "VcpuCount": s(&[("maximum_config", "integer"), ("maximum_live", "integer"), ("current_config", "integer"), ("current_live", "integer")]),
        "AttachRequest": s(&[("xml", "string"), ("live", "boolean"), ("config", "boolean")]),
        "AttachResponse": s(&[("alias", "string"), ("slot", "integer")]),
        "ChangeMediaRequest": s(&[("path", "string"), ("source", "string"), ("action", "string"), ("force", "boolean"), ("live", "boolean"), ("config", "boolean")]),
        "DetachRequest": s(&[("xml", "string"), ("key", "string"), ("kind", "string"), ("live", "boolean"), ("config", "boolean")]),
        "DomainStats": s(&[("name", "string"), ("state", "string"), ("reason", "string"), ("cpu_time_ns", "integer"), ("balloon_current_kib", "integer"), ("balloon_maximum_kib", "integer"), ("rss_kib", "integer"), ("vcpu_current", "integer"), ("vcpu_maximum", "integer"), ("block", "array"), ("net", "array")]),
        "MonitorRequest": s(&[("command", "string"), ("hmp", "boolean")]),
        "MonitorReply": s(&[("text", "string"), ("json", "object")]),
        "PinInfo": s(&[("host_cpus", "integer"), ("vcpus", "array"), ("emulator", "string")]),
        "VcpuPinRequest": s(&[("vcpu", "integer"), ("cpuset", "string"), ("live", "boolean"), ("config", "boolean")]),
        "EmulatorPinRequest": s(&[("cpuset", "string"), ("live", "boolean"), ("config", "boolean")]),
        "IfAddr": s(&[("name", "string"), ("mac", "string"), ("protocol", "string"), ("address", "string")]),
        "IfAddrList": list("IfAddr"),
        "NetworkSummary": s(&[("name", "string"), ("uuid", "string"), ("active", "boolean"), ("autostart", "boolean"), ("persistent", "boolean"), ("bridge", "string")]),
        "NetworkSummaryList": list("NetworkSummary"),
        "NetDefineRequest": s(&[("xml", "string")]),
        "NetDefineResponse": s(&[("name", "string"), ("uuid", "string")]),
        "NetDhcpLease": s(&[("iface", "string"), ("expirytime", "integer"), ("type", "string"), ("mac", "string"), ("ipaddr", "string"), ("prefix", "integer"), ("hostname", "string"), ("clientid", "string")]),
        "NetDhcpLeaseList": list("NetDhcpLease"),
        "ErrorBody": s(&[("error", "string"), ("code", "string")]),
    })
}

pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, req, resp) in OPERATIONS {
        let mut op = json!({
            "summary": summary,
            "responses": {
                "200": {"description": "success", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{resp}")}}}},
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            }
        });
        if path.contains("{name}") {
            let what = if path.starts_with("/v1/networks") {
                "network name"
            } else {
                "domain name, UUID or id"
            };
            op["parameters"] = json!([{"name": "name", "in": "path", "required": true, "description": what, "schema": {"type": "string"}}]);
            if path.contains("{key}") {
                op["parameters"].as_array_mut().expect("an array").push(json!({"name": "key", "in": "path", "required": true, "description": "disk target, MAC address or device alias", "schema": {"type": "string"}}));
            }
        }
        if let Some(r) = req {
            op["requestBody"] = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{r}")}}}});
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "rvirtd API", "version": "1"},
        "servers": [{"url": "http://localhost", "description": "over the daemon's unix socket"}],
        "paths": paths,
        "components": {"schemas": schemas()},
    })
}
