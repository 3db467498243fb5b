//! TAP devices as virtio-net backends: opening one by name (or adopting an fd opened by the
//! management daemon), the 12-byte virtio-net header, and offload control.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the virtio-net header on the wire between the device and the TAP (virtio 1.x
/// `struct virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
const IFNAMSIZ: usize = 16;

/// TUNSETOFFLOAD flags.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// TSO with ECN bits.
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
/// UDP fragmentation offload.
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;

/// A TAP device could not be opened or set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or has a NUL byte.
    #[error("invalid TAP name '{0}': use 1 to 15 bytes without NUL or '/'")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun for TAP '{name}': {source} (load the 'tun' module, and run as root or with CAP_NET_ADMIN)")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    /// TUNSETIFF failed.
    #[error("cannot attach to TAP '{name}': {source} (create it with 'ip tuntap add {name} mode tap vnet_hdr', owned by this user, or run with CAP_NET_ADMIN)")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    /// A set-up ioctl failed.
    #[error("TAP '{name}': {op} failed: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// An open TAP queue in non-blocking mode with a 12-byte vnet header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// ioctl whose argument is a pointer to `arg`. Private: every call site passes the type its
/// request expects (`IfReq` for TUNSETIFF/TUNGETIFF, `c_int` for TUNSETVNETHDRSZ).
fn ioctl_ptr<T>(fd: &File, req: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: `fd` is an open file; `arg` is a live, exclusively borrowed value of the type
    // the request reads or writes, valid for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens (and, with CAP_NET_ADMIN, creates) the TAP interface `name`, with the vnet
    /// header enabled and no packet information prefix.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.bytes().any(|b| b == 0 || b == b'/') {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq::new();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        ioctl_ptr(&file, libc::TUNSETIFF, &mut req).map_err(|source| TapError::Attach {
            name: name.to_string(),
            source,
        })?;
        Self::setup(file, req.name())
    }

    /// Adopts an already-open TAP fd (e.g. passed by the management daemon). It must have been
    /// opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let file = File::from(fd);
        let mut req = IfReq::new();
        ioctl_ptr(&file, libc::TUNGETIFF, &mut req).map_err(|source| TapError::Ioctl {
            name: "<fd>".into(),
            op: "TUNGETIFF (is this fd a TAP?)",
            source,
        })?;
        let name = req.name();
        let want = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        if req.flags & want != want {
            return Err(TapError::Ioctl {
                name,
                op: "flag check (needs IFF_TAP, IFF_NO_PI and IFF_VNET_HDR)",
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no pointers involved.
        let r = unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
        };
        if r < 0 {
            return Err(TapError::Ioctl {
                name,
                op: "O_NONBLOCK",
                source: io::Error::last_os_error(),
            });
        }
        Self::setup(file, name)
    }

    fn setup(file: File, name: String) -> Result<Tap, TapError> {
        let mut size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(&file, libc::TUNSETVNETHDRSZ, &mut size).map_err(|source| TapError::Ioctl {
            name: name.clone(),
            op: "TUNSETVNETHDRSZ",
            source,
        })?;
        let tap = Tap { file, name };
        tap.set_offload(0).map_err(|source| TapError::Ioctl {
            name: tap.name.clone(),
            op: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What virtio-net needs from its backend: a non-blocking, packet-preserving fd (each read
/// returns one frame with its vnet header, each write sends one) and offload control.
pub trait NetBackend: Send + Sync + std::fmt::Debug {
    /// The fd to read frames from, write frames to, and poll.
    fn file(&self) -> &File;
    /// Tells the backend which offloads the guest can receive (`TUN_F_*` flags).
    fn set_offload(&self, tun_flags: u32) -> io::Result<()>;
}

impl NetBackend for Tap {
    fn file(&self) -> &File {
        &self.file
    }

    fn set_offload(&self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is ours.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                tun_flags as libc::c_ulong,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// A backend over any packet-preserving fd (a `SOCK_DGRAM`/`SOCK_SEQPACKET` socket): frames
/// carry the same 12-byte vnet header; offloads are accepted and ignored. Used by tests and
/// by VMMs that relay frames to user-space switches.
#[derive(Debug)]
pub struct PacketSocket {
    file: File,
}

impl PacketSocket {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let file = File::from(fd);
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no pointers involved.
        let r = unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { file })
    }
}

impl NetBackend for PacketSocket {
    fn file(&self) -> &File {
        &self.file
    }

    fn set_offload(&self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}
