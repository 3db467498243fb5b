//! IPv4 subnets and MAC addresses.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 address with a prefix length: a host address in a subnet, or the subnet itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        Ipv4Net {
            addr,
            prefix: prefix.min(32),
        }
    }

    fn mask_bits(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn netmask(self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The subnet this address lies in (host bits cleared).
    pub fn network(self) -> Ipv4Net {
        Ipv4Net::new(
            Ipv4Addr::from(u32::from(self.addr) & self.mask_bits()),
            self.prefix,
        )
    }

    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask_bits())
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.addr) & self.mask_bits()
    }

    pub fn overlaps(self, other: Ipv4Net) -> bool {
        let shorter = if self.prefix <= other.prefix {
            self
        } else {
            other
        };
        let longer = if self.prefix <= other.prefix {
            other
        } else {
            self
        };
        shorter.contains(longer.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr = a
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or(format!("'{s}' has a bad prefix"))?;
        Ok(Ipv4Net::new(addr, prefix))
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random address in the KVM/libvirt prefix 52:54:00 (from /dev/urandom; the clock and
    /// pid are the fallback).
    pub fn random_kvm() -> MacAddr {
        use std::io::Read;
        let mut b = [0u8; 3];
        let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
        if read.is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let x = (nanos ^ std::process::id().rotate_left(16)).wrapping_mul(0x9E37_79B9);
            b.copy_from_slice(&x.to_le_bytes()[..3]);
        }
        MacAddr([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("'{s}' is not a MAC address (xx:xx:xx:xx:xx:xx)"));
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!("'{s}' is not a MAC address (xx:xx:xx:xx:xx:xx)"));
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| format!("'{s}' is not a MAC address"))?;
        }
        Ok(MacAddr(b))
    }
}
