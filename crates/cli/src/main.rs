//! rvirt: virsh's verbs and virt-install's `install` for rvirtd.

mod client;
mod commands;
mod console;
mod install;
mod live;
mod table;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Manage rvirt virtual machines (domains) through rvirtd, with virsh's commands and output.
#[derive(Parser, Debug)]
#[command(name = "rvirt", version, propagate_version = true)]
pub struct Cli {
    /// rvirtd's socket (a path, or unix:///path).
    #[arg(short = 'c', long = "connect", env = "RVIRT_SOCKET", global = true,
          default_value = client::DEFAULT_SOCKET)]
    pub connect: String,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct Scope {
    /// Affect the running domain.
    #[arg(long)]
    pub live: bool,
    /// Affect the persistent definition.
    #[arg(long)]
    pub config: bool,
    /// Affect the running domain if active, else the definition (the default).
    #[arg(long)]
    pub current: bool,
}

/// Where a device change applies (virsh's attach/detach options).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct DeviceScope {
    /// Affect the running domain.
    #[arg(long)]
    pub live: bool,
    /// Affect the persistent definition.
    #[arg(long)]
    pub config: bool,
    /// The running domain if active, else the definition (the default).
    #[arg(long)]
    pub current: bool,
    /// The running domain if active and the persistent definition.
    #[arg(long)]
    pub persistent: bool,
}

/// virsh list's selection and output options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ListArgs {
    /// Include inactive domains.
    #[arg(long)]
    pub all: bool,
    /// Only inactive domains.
    #[arg(long)]
    pub inactive: bool,
    /// Only running domains.
    #[arg(long = "state-running")]
    pub state_running: bool,
    /// Only paused domains.
    #[arg(long = "state-paused")]
    pub state_paused: bool,
    /// Only shut off domains.
    #[arg(long = "state-shutoff")]
    pub state_shutoff: bool,
    /// Only domains in another state (in shutdown, crashed).
    #[arg(long = "state-other")]
    pub state_other: bool,
    /// Only persistent domains.
    #[arg(long)]
    pub persistent: bool,
    /// Only transient domains.
    #[arg(long)]
    pub transient: bool,
    /// Only domains with autostart on.
    #[arg(long)]
    pub autostart: bool,
    /// Only domains with autostart off.
    #[arg(long = "no-autostart")]
    pub no_autostart: bool,
    /// Print names only.
    #[arg(long)]
    pub name: bool,
    /// Print UUIDs only.
    #[arg(long)]
    pub uuid: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List domains.
    List(ListArgs),
    /// Define (but do not start) a domain from an XML file.
    Define { file: PathBuf },
    /// Remove a domain's definition (a running domain becomes transient).
    Undefine {
        domain: String,
        /// Also delete the domain's UEFI variable store (NVRAM).
        #[arg(long, conflicts_with = "keep_nvram")]
        nvram: bool,
        /// Keep the domain's UEFI variable store.
        #[arg(long)]
        keep_nvram: bool,
    },
    /// Create and start a transient domain from an XML file.
    Create {
        file: PathBuf,
        /// Attach to the console after creation.
        #[arg(long)]
        console: bool,
    },
    /// Start a defined domain.
    Start {
        domain: String,
        /// Attach to the console after starting.
        #[arg(long)]
        console: bool,
        /// Leave the domain paused (resume starts its vCPUs).
        #[arg(long)]
        paused: bool,
    },
    /// Shut a domain down gracefully (ACPI power button).
    Shutdown {
        domain: String,
        /// Wait up to this many seconds for it to power off; fail if it does not.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Reboot a domain: the guest is asked (ACPI power button) and the domain starts again once
    /// it has powered off.
    Reboot { domain: String },
    /// Reset a domain at once, without asking the guest (its VMM is restarted).
    Reset { domain: String },
    /// Stop a domain immediately.
    Destroy { domain: String },
    /// Pause a running domain.
    Suspend { domain: String },
    /// Resume a paused domain.
    Resume { domain: String },
    /// Domain information.
    Dominfo {
        domain: String,
        #[arg(long)]
        json: bool,
    },
    /// Domain state.
    Domstate {
        domain: String,
        /// Also print why it is in that state.
        #[arg(long)]
        reason: bool,
    },
    /// Runtime id of a domain ("-" when not running).
    Domid { domain: String },
    /// UUID of a domain.
    Domuuid { domain: String },
    /// Name of a domain given its id or UUID.
    Domname { domain: String },
    /// Domain XML.
    Dumpxml {
        domain: String,
        /// The persistent definition rather than the running one.
        #[arg(long)]
        inactive: bool,
    },
    /// Edit a domain's XML in $EDITOR and redefine it.
    Edit { domain: String },
    /// Start a domain when rvirtd starts.
    Autostart {
        domain: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// Attach to a domain's serial console (Ctrl+] detaches).
    Console {
        domain: String,
        /// End another client's session and attach.
        #[arg(long)]
        force: bool,
    },
    /// List a domain's block devices.
    Domblklist {
        domain: String,
        /// Also show type and device.
        #[arg(long)]
        details: bool,
        #[arg(long)]
        json: bool,
    },
    /// List a domain's network interfaces.
    Domiflist {
        domain: String,
        #[arg(long)]
        json: bool,
    },
    /// Interface addresses of a running domain, from its networks' DHCP leases.
    Domifaddr {
        domain: String,
        #[arg(long)]
        json: bool,
    },
    /// Define (but do not start) a virtual network from a libvirt network XML file.
    NetDefine { file: PathBuf },
    /// Remove an inactive network's definition.
    NetUndefine { network: String },
    /// Start a defined network.
    NetStart { network: String },
    /// Stop a network (refused while guests are attached unless --force).
    NetDestroy {
        network: String,
        /// Also delete the guest TAPs attached to it.
        #[arg(long)]
        force: bool,
    },
    /// List networks (active ones unless --all or --inactive).
    NetList {
        /// Include inactive networks.
        #[arg(long)]
        all: bool,
        /// Only inactive networks.
        #[arg(long)]
        inactive: bool,
        /// Print names only.
        #[arg(long)]
        name: bool,
        #[arg(long)]
        json: bool,
    },
    /// Network information.
    NetInfo {
        network: String,
        #[arg(long)]
        json: bool,
    },
    /// Network XML.
    NetDumpxml { network: String },
    /// Start a network when rvirtd starts.
    NetAutostart {
        network: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// DHCP leases of a network.
    NetDhcpLeases {
        network: String,
        /// Only the lease of this MAC address.
        #[arg(long)]
        mac: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show or set vCPU affinity.
    Vcpupin {
        domain: String,
        /// vCPU number.
        vcpu: Option<u32>,
        /// Host CPUs, e.g. 0-3,^2.
        cpulist: Option<String>,
        #[command(flatten)]
        scope: Scope,
        #[arg(long)]
        json: bool,
    },
    /// Memory statistics of a running domain (KiB), from the balloon and the VMM.
    Dommemstat {
        domain: String,
        /// Set the guest statistics polling period (seconds; 0 stops it).
        #[arg(long)]
        period: Option<u32>,
        #[command(flatten)]
        scope: Scope,
    },
    /// Change the memory of a domain (the balloon target when live). SIZE is KiB unless it has a
    /// suffix (b, KiB, MiB, GiB, KB, MB, GB, ...).
    Setmem {
        domain: String,
        #[arg(allow_hyphen_values = true)]
        size: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Change the maximum memory (<memory>) of a domain's definition (not possible live).
    Setmaxmem {
        domain: String,
        #[arg(allow_hyphen_values = true)]
        size: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Change the number of vCPUs (live: ACPI CPU hotplug).
    Setvcpus {
        domain: String,
        count: u32,
        /// Change the maximum (config only).
        #[arg(long)]
        maximum: bool,
        #[command(flatten)]
        scope: Scope,
    },
    /// Maximum and current vCPU counts, config and live.
    Vcpucount { domain: String },
    /// Send a QEMU monitor command (QMP JSON, or HMP with --hmp); rvirtd answers the balloon and
    /// status commands from rvirt-vmm.
    #[command(name = "qemu-monitor-command")]
    QemuMonitorCommand {
        domain: String,
        /// The command is in the human monitor's syntax.
        #[arg(long)]
        hmp: bool,
        /// Pretty-print a QMP reply.
        #[arg(long)]
        pretty: bool,
        /// The command (words are joined by spaces).
        #[arg(long = "cmd", num_args = 1.., allow_hyphen_values = true)]
        cmd_opt: Vec<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Hotplug a disk and/or add it to the definition.
    AttachDisk {
        domain: String,
        /// Image file or block device.
        source: String,
        /// Target device name (vdb, vdc, ...).
        target: String,
        /// Only virtio.
        #[arg(long)]
        targetbus: Option<String>,
        /// Only qemu (accepted for virsh compatibility).
        #[arg(long)]
        driver: Option<String>,
        /// Image format: raw or qcow2.
        #[arg(long)]
        subdriver: Option<String>,
        /// readonly.
        #[arg(long)]
        mode: Option<String>,
        /// Host cache mode: none, writeback, writethrough, directsync, unsafe.
        #[arg(long)]
        cache: Option<String>,
        #[command(flatten)]
        dev: DeviceScope,
    },
    /// Change, insert or eject the disc of a CD-ROM drive (virsh change-media).
    ChangeMedia {
        domain: String,
        /// The drive: its target (sda) or the path of its current disc.
        path: String,
        /// The new disc (an ISO image).
        source: Option<String>,
        /// Eject the disc.
        #[arg(long)]
        eject: bool,
        /// Insert a disc into an empty drive.
        #[arg(long)]
        insert: bool,
        /// Replace the disc (the default; ejects without SOURCE).
        #[arg(long)]
        update: bool,
        /// Eject even if the guest has locked the tray.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        dev: DeviceScope,
    },
    /// Hot-unplug a disk and/or remove it from the definition.
    DetachDisk {
        domain: String,
        /// Target device name (or source path).
        target: String,
        #[command(flatten)]
        dev: DeviceScope,
    },
    /// Hotplug a network interface and/or add it to the definition.
    AttachInterface {
        domain: String,
        /// network or bridge.
        #[arg(value_name = "TYPE")]
        kind: String,
        /// Network name or host bridge.
        source: String,
        #[arg(long)]
        mac: Option<String>,
        /// Only virtio.
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        dev: DeviceScope,
    },
    /// Hot-unplug a network interface and/or remove it from the definition.
    DetachInterface {
        domain: String,
        /// network or bridge.
        #[arg(value_name = "TYPE")]
        kind: String,
        #[arg(long)]
        mac: String,
        #[command(flatten)]
        dev: DeviceScope,
    },
    /// Attach the <disk> or <interface> of an XML file.
    AttachDevice {
        domain: String,
        file: PathBuf,
        #[command(flatten)]
        dev: DeviceScope,
    },
    /// Detach the <disk> (by target) or <interface> (by MAC) of an XML file.
    DetachDevice {
        domain: String,
        file: PathBuf,
        #[command(flatten)]
        dev: DeviceScope,
    },
    /// Block device counters of a running domain (all disks summed without DEVICE).
    Domblkstat {
        domain: String,
        device: Option<String>,
    },
    /// Interface counters of a running domain (by TAP name or MAC).
    Domifstat { domain: String, interface: String },
    /// Domain statistics: state, balloon, vCPUs, disks, NICs.
    Domstats { domain: String },
    /// Show vCPU threads: host CPU, state, CPU time, affinity.
    Vcpuinfo {
        domain: String,
        #[arg(long)]
        json: bool,
    },
    /// Show or set the affinity of the VMM's non-vCPU threads.
    Emulatorpin {
        domain: String,
        cpulist: Option<String>,
        #[command(flatten)]
        scope: Scope,
    },
    /// Create a domain from virt-install-style options, start it and attach its console.
    Install(Box<install::InstallArgs>),
    /// Versions of rvirt and of the daemon it talks to.
    Version,
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (rvirt.1 and one per command) into a directory.
    Man { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli
        .connect
        .strip_prefix("unix://")
        .unwrap_or(&cli.connect)
        .to_string();
    let client = client::Client::new(std::path::Path::new(&socket));
    match commands::run(&client, cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(lines) => {
            for l in lines {
                eprintln!("error: {l}");
            }
            ExitCode::FAILURE
        }
    }
}
