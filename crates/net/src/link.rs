//! Links over rtnetlink: bridges, addresses, TAPs, and the host's routes.
//!
//! Links rvirt creates carry the alias `rvirt:<owner>` (IFLA_IFALIAS); rvirt deletes or changes
//! only links whose alias says it owns them, so a host bridge or a TAP of other software is never
//! touched by a mistaken name.
//!
//! The calls are synchronous: each [`Netlink`] runs a private single-thread runtime for the
//! rtnetlink connection, and the socket lives in the network namespace of the thread that made
//! it. Call from a blocking context (the daemon uses `spawn_blocking`).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    BridgeStpState, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

use crate::{Ipv4Net, MacAddr};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink: {what} failed on '{link}': {source}")]
    Netlink {
        what: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link '{0}' does not exist")]
    NotFound(String),
    #[error("link '{link}' is not owned by rvirt ({why}); rvirt leaves it alone")]
    NotOwned { link: String, why: String },
    #[error("cannot create TAP '{name}': {source}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, LinkError>;

/// Facts about one link.
#[derive(Debug, Clone)]
pub struct LinkInfoView {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
    pub kind: Option<String>,
    pub controller: Option<u32>,
    pub up: bool,
}

/// A netlink connection in the calling thread's network namespace.
pub struct Netlink {
    /// Always `Some` until drop.
    rt: Option<tokio::runtime::Runtime>,
    handle: Handle,
}

/// Runs `f` on `rt`. Inside an async context (a tokio worker thread) a nested `block_on` would
/// panic, so the wait moves to a scoped thread; a new thread shares the caller's network
/// namespace, so the socket stays where the caller is.
fn run_on<F>(rt: &tokio::runtime::Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    } else {
        rt.block_on(f)
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        // A plain drop of a runtime inside an async context panics; this one does not wait.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The alias that marks a link as rvirt's.
pub fn owner_alias(owner: &str) -> String {
    format!("rvirt:{owner}")
}

impl Netlink {
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(LinkError::Socket)?;
        let (conn, handle) = run_on(&rt, async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            Ok::<_, std::io::Error>((conn, handle))
        })
        .map_err(LinkError::Socket)?;
        rt.spawn(conn);
        Ok(Netlink {
            rt: Some(rt),
            handle,
        })
    }

    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        run_on(self.rt.as_ref().expect("runtime lives until drop"), f)
    }

    fn nl(what: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError {
        let link = link.to_owned();
        move |source| LinkError::Netlink { what, link, source }
    }

    /// All links in the namespace.
    pub fn links(&self) -> Result<Vec<LinkInfoView>> {
        let msgs: Vec<LinkMessage> = self
            .block_on(self.handle.link().get().execute().try_collect())
            .map_err(Self::nl("list links", "*"))?;
        Ok(msgs.into_iter().map(view).collect())
    }

    pub fn link(&self, name: &str) -> Result<Option<LinkInfoView>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    fn owned(&self, name: &str, owner: &str) -> Result<LinkInfoView> {
        let l = self
            .link(name)?
            .ok_or_else(|| LinkError::NotFound(name.into()))?;
        if l.alias.as_deref() != Some(owner_alias(owner).as_str()) {
            let why = match &l.alias {
                Some(a) => format!("its alias is '{a}'"),
                None => "it has no rvirt alias".into(),
            };
            return Err(LinkError::NotOwned {
                link: name.into(),
                why,
            });
        }
        Ok(l)
    }

    /// Creates a bridge marked as owned by `owner`, with the given MAC, STP and forward delay
    /// (seconds), and brings it up.
    pub fn create_bridge(
        &self,
        name: &str,
        owner: &str,
        mac: Option<MacAddr>,
        stp: bool,
        delay: u32,
    ) -> Result<()> {
        let mut b = LinkBridge::new(name)
            .stp_state(if stp {
                BridgeStpState::KernelStp
            } else {
                BridgeStpState::Disabled
            })
            .forward_delay(delay.saturating_mul(100));
        if let Some(m) = mac {
            b = b.address(m.0.to_vec());
        }
        self.block_on(self.handle.link().add(b.build()).execute())
            .map_err(Self::nl("create bridge", name))?;
        // The kernel ignores IFLA_IFALIAS when creating a link, so the mark is a second step. The
        // create was exclusive, so until the mark is set the link is certainly ours to remove.
        let index = self
            .link(name)?
            .ok_or_else(|| LinkError::NotFound(name.into()))?
            .index;
        let mark = LinkUnspec::new_with_index(index)
            .alias(owner_alias(owner))
            .build();
        if let Err(e) = self.block_on(self.handle.link().set(mark).execute()) {
            let _ = self.block_on(self.handle.link().del(index).execute());
            return Err(Self::nl("set alias", name)(e));
        }
        Ok(())
    }

    /// Adds an IPv4 address to a link rvirt owns.
    pub fn add_address(&self, name: &str, owner: &str, ip: Ipv4Net) -> Result<()> {
        let l = self.owned(name, owner)?;
        self.block_on(
            self.handle
                .address()
                .add(l.index, ip.addr.into(), ip.prefix)
                .execute(),
        )
        .map_err(Self::nl("add address", name))
    }

    pub fn set_up(&self, name: &str, owner: &str, up: bool) -> Result<()> {
        let l = self.owned(name, owner)?;
        let msg = LinkUnspec::new_with_index(l.index);
        let msg = if up { msg.up() } else { msg.down() };
        self.block_on(self.handle.link().set(msg.build()).execute())
            .map_err(Self::nl("set up/down", name))
    }

    /// Enslaves a link rvirt owns to `bridge`, which must exist and be a bridge (it may be the
    /// host's: joining it does not change it).
    pub fn set_controller(&self, name: &str, owner: &str, bridge: &str) -> Result<()> {
        let l = self.owned(name, owner)?;
        let b = self
            .link(bridge)?
            .ok_or_else(|| LinkError::NotFound(bridge.into()))?;
        if b.kind.as_deref() != Some("bridge") {
            return Err(LinkError::NotOwned {
                link: bridge.into(),
                why: "it is not a bridge".into(),
            });
        }
        let msg = LinkUnspec::new_with_index(l.index)
            .controller(b.index)
            .up()
            .build();
        self.block_on(self.handle.link().set(msg).execute())
            .map_err(Self::nl("attach to bridge", name))
    }

    /// Marks a TAP rvirt has just created (a tun link with no alias yet) as owned by `owner`.
    pub fn claim_new_tap(&self, name: &str, owner: &str) -> Result<()> {
        let l = self
            .link(name)?
            .ok_or_else(|| LinkError::NotFound(name.into()))?;
        if l.kind.as_deref() != Some("tun") || l.alias.is_some() {
            return Err(LinkError::NotOwned {
                link: name.into(),
                why: "it is not a fresh TAP".into(),
            });
        }
        let msg = LinkUnspec::new_with_index(l.index)
            .alias(owner_alias(owner))
            .build();
        self.block_on(self.handle.link().set(msg).execute())
            .map_err(Self::nl("set alias", name))
    }

    /// Rolls back a TAP rvirt has just created: deleted only if it is a tun link with no alias
    /// or an rvirt domain alias.
    pub fn delete_new_tap(&self, name: &str) -> Result<()> {
        let Some(l) = self.link(name)? else {
            return Ok(());
        };
        let ours = l
            .alias
            .as_deref()
            .is_none_or(|a| a.starts_with("rvirt:dom:"));
        if l.kind.as_deref() != Some("tun") || !ours {
            return Err(LinkError::NotOwned {
                link: name.into(),
                why: "it is not rvirt's TAP".into(),
            });
        }
        self.block_on(self.handle.link().del(l.index).execute())
            .map_err(Self::nl("delete", name))
    }

    /// Deletes a link if rvirt owns it; `Ok(false)` when it is already gone.
    pub fn delete_owned(&self, name: &str, owner: &str) -> Result<bool> {
        let l = match self.owned(name, owner) {
            Err(LinkError::NotFound(_)) => return Ok(false),
            other => other?,
        };
        self.block_on(self.handle.link().del(l.index).execute())
            .map_err(Self::nl("delete", name))?;
        Ok(true)
    }

    /// The host's IPv4 routes as (destination, device) pairs, for clash checks.
    pub fn ipv4_routes(&self) -> Result<Vec<(Ipv4Net, String)>> {
        let names: Vec<(u32, String)> = self
            .links()?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let msgs: Vec<_> = self
            .block_on(
                self.handle
                    .route()
                    .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                    .execute()
                    .try_collect(),
            )
            .map_err(Self::nl("list routes", "*"))?;
        let mut out = Vec::new();
        for m in msgs {
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut dev = String::new();
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                    RouteAttribute::Oif(i) => {
                        dev = names
                            .iter()
                            .find(|(x, _)| x == i)
                            .map(|(_, n)| n.clone())
                            .unwrap_or_default()
                    }
                    _ => {}
                }
            }
            out.push((Ipv4Net::new(dst, m.header.destination_prefix_length), dev));
        }
        Ok(out)
    }
}

fn view(m: LinkMessage) -> LinkInfoView {
    let mut v = LinkInfoView {
        index: m.header.index,
        name: String::new(),
        alias: None,
        kind: None,
        controller: None,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => v.name = n,
            LinkAttribute::IfAlias(a) => v.alias = Some(a),
            LinkAttribute::Controller(c) => v.controller = Some(c),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        v.kind = Some(match k {
                            InfoKind::Bridge => "bridge".into(),
                            InfoKind::Tun => "tun".into(),
                            InfoKind::Veth => "veth".into(),
                            other => format!("{other:?}").to_lowercase(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    v
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates a persistent TAP (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) named `name` and closes it: the
/// VMM reopens it by name (`rvirt-vmm --net tap=NAME`), with the same flags, which is what a
/// persistent TAP requires. The caller marks it as owned (alias) and enslaves it.
pub fn create_persistent_tap(name: &str) -> Result<()> {
    let err = |source| LinkError::Tap {
        name: name.into(),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err(std::io::Error::other("name must be 1..15 bytes")));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(err)?;
    let fd = OwnedFd::from(file);
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` is one (name, flags, padding to
    // the kernel's 40 bytes) and lives across the call. The fd is an open /dev/net/tun.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument; the fd is the TAP just attached.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}
