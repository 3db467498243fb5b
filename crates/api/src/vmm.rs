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
    },
    VcpuInfo {
        vcpus: Vec<VcpuThread>,
    },
    Stats {
        /// Resident set size of the whole VMM process, guest memory included.
        rss_bytes: u64,
        /// User + system CPU time of the process, in nanoseconds.
        cpu_time_ns: u64,
    },
    /// The request failed; `message` says what and what to do.
    Error {
        message: String,
    },
}

/// An event on a [`Request::Watch`] connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    StateChanged {
        state: RunState,
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
