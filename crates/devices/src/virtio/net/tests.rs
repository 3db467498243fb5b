//! virtio-net driven through the PCI transport by the fake driver, over a datagram socketpair
//! standing in for the TAP (same framing: one frame with its vnet header per datagram).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::*;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const RXBUF: u64 = DATA;
const TXBUF: u64 = DATA + 0x10_0000;

/// A socket backend that records offload settings and refuses the flags in `refuse`.
#[derive(Debug)]
struct Recording {
    inner: PacketSocket,
    refuse: u32,
    offloads: Mutex<Vec<u32>>,
}

impl NetBackend for Recording {
    fn file(&self) -> &File {
        self.inner.file()
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        if flags & self.refuse != 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

struct NetTest {
    d: TestDriver,
    rx: TestQueue,
    tx: TestQueue,
    peer: UnixDatagram,
    backend: Arc<Recording>,
    features: u64,
}

fn setup_with(wanted: u64, refuse: u32) -> NetTest {
    let (a, b) = UnixDatagram::pair().unwrap();
    let backend = Arc::new(Recording {
        inner: PacketSocket::new(OwnedFd::from(a)).unwrap(),
        refuse,
        offloads: Mutex::default(),
    });
    let net = Net::new(backend.clone(), NetConfig { mac: MAC });
    let d = TestDriver::new(Box::new(net));
    let features = d.negotiate(wanted);
    let rx = d.setup_queue(0, 16);
    let tx = d.setup_queue(1, 16);
    d.driver_ok();
    assert!(d.dev.lock().unwrap().is_activated());
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    NetTest {
        d,
        rx,
        tx,
        peer: b,
        backend,
        features,
    }
}

fn setup() -> NetTest {
    setup_with(!0, 0)
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| tag.wrapping_add(i as u8)));
    f
}

impl NetTest {
    fn counter(&self, name: &str) -> u64 {
        let c = self.d.dev.lock().unwrap().counters();
        c.iter().find(|c| c.0 == name).unwrap().1
    }

    fn post_rx(&mut self, addr: u64, len: u32) {
        self.rx.add_chain(&self.d.mem, &[(addr, len, true)]);
        self.d.kick(0);
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn config_and_offered_features() {
    let t = setup();
    assert_eq!(t.d.cfg_read32(0) >> 16, 0x1041);
    assert_eq!(t.d.cfg_read32(8) >> 8, 0x02_0000, "Ethernet controller");
    let mac: Vec<u8> = (0..6).map(|i| t.d.device_cfg(i, 1) as u8).collect();
    assert_eq!(mac, MAC);
    assert_eq!(t.d.device_cfg(6, 2), u64::from(VIRTIO_NET_S_LINK_UP));
    for f in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_UFO,
    ] {
        assert_ne!(t.features & (1 << f), 0, "feature {f} offered");
    }
    assert_ne!(t.features & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
}

#[test]
fn offloads_follow_the_negotiated_features() {
    let t = setup();
    let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;
    assert_eq!(t.backend.offloads.lock().unwrap().last(), Some(&all));

    let t = setup_with(
        (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4),
        0,
    );
    assert_eq!(
        t.backend.offloads.lock().unwrap().last(),
        Some(&(TUN_F_CSUM | TUN_F_TSO4))
    );

    let t = setup_with(1 << VIRTIO_NET_F_MAC, 0);
    assert_eq!(t.backend.offloads.lock().unwrap().last(), Some(&0));

    // A TAP without UFO support: UFO is not offered at all.
    let t = setup_with(!0, TUN_F_UFO);
    assert_eq!(t.features & (1 << VIRTIO_NET_F_GUEST_UFO), 0);
    assert_eq!(t.features & (1 << VIRTIO_NET_F_HOST_UFO), 0);
    assert_ne!(t.features & (1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_eq!(
        tun_offload_flags(1 << VIRTIO_NET_F_GUEST_TSO4),
        0,
        "TSO without GUEST_CSUM is not enabled"
    );
}

#[test]
fn transmit_reaches_the_backend() {
    let mut t = setup();
    let f = frame(60, 7);
    t.d.mem
        .write_slice(&f[..VNET_HDR_LEN], GuestAddress(TXBUF))
        .unwrap();
    t.d.mem
        .write_slice(&f[VNET_HDR_LEN..], GuestAddress(TXBUF + 0x1000))
        .unwrap();
    let head = t.tx.add_chain(
        &t.d.mem,
        &[
            (TXBUF, VNET_HDR_LEN as u32, false),
            (TXBUF + 0x1000, 60, false),
        ],
    );
    t.d.kick(1);
    let mut got = vec![0u8; 2048];
    let n = t.peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    assert_eq!(t.tx.wait_used(&t.d.mem), Some((u32::from(head), 0)));
    assert!(t.d.wait_irq(2) >= 1, "tx queue vector");
    assert_eq!(t.counter("tx_frames"), 1);
    assert_eq!(t.counter("tx_bytes"), 60);
}

#[test]
fn receive_fills_posted_buffers() {
    let mut t = setup();
    t.post_rx(RXBUF, 2048);
    let f = frame(100, 3);
    t.peer.send(&f).unwrap();
    let (_, len) = t.rx.wait_used(&t.d.mem).expect("frame received");
    assert_eq!(len as usize, f.len());
    let got = t.guest(RXBUF, f.len());
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers = 1");
    assert!(t.d.wait_irq(1) >= 1, "rx queue vector");
    assert_eq!(t.counter("rx_frames"), 1);
}

#[test]
fn frames_wait_for_receive_buffers() {
    let mut t = setup();
    for tag in 0..3u8 {
        t.peer.send(&frame(64, tag * 50)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(t.rx.used_idx(&t.d.mem), 0, "no buffers, nothing received");
    for i in 0..3u64 {
        t.rx.add_chain(&t.d.mem, &[(RXBUF + i * 0x1000, 2048, true)]);
    }
    t.d.kick(0);
    for i in 0..3u64 {
        let (id, len) = t.rx.wait_used(&t.d.mem).expect("frame received");
        assert_eq!(id, i as u32);
        assert_eq!(len as usize, VNET_HDR_LEN + 64);
        let got = t.guest(RXBUF + i * 0x1000 + VNET_HDR_LEN as u64, 64);
        assert_eq!(got, frame(64, i as u8 * 50)[VNET_HDR_LEN..]);
    }
    // Later frames go straight in (the TAP is watched again).
    t.post_rx(RXBUF + 0x8000, 2048);
    t.peer.send(&frame(10, 9)).unwrap();
    assert!(t.rx.wait_used(&t.d.mem).is_some());
}

#[test]
fn receive_buffer_too_small_drops_the_frame() {
    // Without mergeable buffers a frame must fit one chain.
    let mut t = setup_with(!(1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    t.rx.add_chain(&t.d.mem, &[(RXBUF, 20, true)]);
    t.rx.add_chain(&t.d.mem, &[(RXBUF + 0x1000, 2048, true)]);
    t.d.kick(0);
    t.peer.send(&frame(100, 1)).unwrap();
    assert_eq!(
        t.rx.wait_used(&t.d.mem),
        Some((0, 0)),
        "small buffer returned empty"
    );
    t.peer.send(&frame(30, 2)).unwrap();
    assert_eq!(
        t.rx.wait_used(&t.d.mem),
        Some((1, (VNET_HDR_LEN + 30) as u32))
    );
    assert_eq!(t.counter("rx_dropped"), 1);
}

#[test]
fn hostile_transmit_chains_are_dropped() {
    let mut t = setup();
    let mem = t.d.mem.clone();
    let chains: Vec<Vec<(u64, u32, bool)>> = vec![
        vec![(MEM_SIZE as u64 - 8, 64, false)], // outside guest memory
        vec![(TXBUF, 64, true)],                // device-writable
        vec![(TXBUF, 0x1_0000, false), (TXBUF, 0x1_0000, false)], // > 64 KiB
        vec![(TXBUF, 4, false)],                // shorter than the header
        vec![(u64::MAX - 16, 64, false)],       // wrapping address
    ];
    let n = chains.len();
    for c in &chains {
        t.tx.add_chain(&mem, c);
    }
    t.d.kick(1);
    for _ in 0..n {
        assert_eq!(t.tx.wait_used(&mem).map(|u| u.1), Some(0));
    }
    assert_eq!(t.counter("tx_dropped"), n as u64);
    t.peer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        t.peer.recv(&mut buf).is_err(),
        "nothing reached the backend"
    );
    // A good frame still goes through.
    mem.write_slice(&frame(20, 5), GuestAddress(TXBUF)).unwrap();
    t.tx.add_chain(&mem, &[(TXBUF, 32, false)]);
    t.d.kick(1);
    t.peer.set_nonblocking(false).unwrap();
    assert_eq!(t.peer.recv(&mut buf).unwrap(), 32);
    assert_eq!(t.d.status() & 0x40, 0);
}

fn hostile_receive_chains(mergeable: bool) {
    let wanted = if mergeable {
        !0
    } else {
        !(1 << VIRTIO_NET_F_MRG_RXBUF)
    };
    let mut t = setup_with(wanted, 0);
    // A device-readable receive buffer, then one outside guest memory, then a good one.
    t.rx.add_chain(&t.d.mem, &[(RXBUF, 2048, false)]);
    t.rx.add_chain(&t.d.mem, &[(MEM_SIZE as u64 - 16, 2048, true)]);
    t.rx.add_chain(&t.d.mem, &[(RXBUF + 0x1000, 2048, true)]);
    t.d.kick(0);
    for tag in 0..3 {
        t.peer.send(&frame(50, tag)).unwrap();
    }
    assert_eq!(t.rx.wait_used(&t.d.mem), Some((0, 0)));
    assert_eq!(t.rx.wait_used(&t.d.mem), Some((1, 0)));
    assert_eq!(t.rx.wait_used(&t.d.mem), Some((2, 62)));
    // Without mergeable buffers each bad chain costs a frame; with them the frame waits for
    // a usable buffer.
    let first_delivered = if mergeable { 0 } else { 2 };
    assert_eq!(
        t.guest(RXBUF + 0x1000 + 12, 50),
        frame(50, first_delivered)[12..]
    );
    assert_eq!(t.counter("rx_dropped"), if mergeable { 0 } else { 2 });
    assert_eq!(t.d.status() & 0x40, 0);
}

#[test]
fn hostile_receive_chains_single_buffers() {
    hostile_receive_chains(false);
}

#[test]
fn hostile_receive_chains_mergeable_buffers() {
    hostile_receive_chains(true);
}

#[test]
fn mergeable_frame_spans_several_buffers() {
    let mut t = setup();
    assert_ne!(t.features & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    for i in 0..3u64 {
        t.rx.add_chain(&t.d.mem, &[(RXBUF + i * 0x1000, 1024, true)]);
    }
    t.d.kick(0);
    let f = frame(2500, 9);
    t.peer.send(&f).unwrap();
    let mut got = Vec::new();
    for (i, want) in [1024u32, 1024, (f.len() - 2048) as u32]
        .into_iter()
        .enumerate()
    {
        assert_eq!(t.rx.wait_used(&t.d.mem), Some((i as u32, want)));
        got.extend(t.guest(RXBUF + i as u64 * 0x1000, want as usize));
    }
    assert_eq!(&got[10..12], &3u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(t.counter("rx_frames"), 1);
}

#[test]
fn mergeable_frame_larger_than_the_whole_ring_is_dropped() {
    let mut t = setup();
    // 16 buffers of 64 bytes cannot hold a 2000-byte frame.
    for i in 0..16u64 {
        t.rx.add_chain(&t.d.mem, &[(RXBUF + i * 0x100, 64, true)]);
    }
    t.d.kick(0);
    t.peer.send(&frame(2000, 1)).unwrap();
    t.peer.send(&frame(40, 2)).unwrap();
    assert_eq!(
        t.rx.wait_used(&t.d.mem),
        Some((0, 52)),
        "next frame delivered"
    );
    assert_eq!(t.counter("rx_dropped"), 1);
}

#[test]
fn mergeable_frame_waits_for_enough_buffers() {
    let mut t = setup();
    t.post_rx(RXBUF, 1024);
    let f = frame(2000, 4);
    t.peer.send(&f).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        t.rx.used_idx(&t.d.mem),
        0,
        "one buffer is not enough: nothing used"
    );
    t.post_rx(RXBUF + 0x1000, 1024);
    assert_eq!(t.rx.wait_used(&t.d.mem), Some((0, 1024)));
    assert_eq!(t.rx.wait_used(&t.d.mem), Some((1, (f.len() - 1024) as u32)));
    assert_eq!(&t.guest(RXBUF + 10, 2), &2u16.to_le_bytes());
    // The TAP is polled again afterwards.
    t.post_rx(RXBUF + 0x2000, 1024);
    t.peer.send(&frame(10, 1)).unwrap();
    assert_eq!(t.rx.wait_used(&t.d.mem), Some((2, 22)));
    assert_eq!(&t.guest(RXBUF + 0x2000 + 10, 2), &1u16.to_le_bytes());
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the array we pass; we own them afterwards.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn a_dead_backend_does_not_spin_the_worker() {
    // A SOCK_SEQPACKET backend reads as end-of-file once its peer is closed.
    let (a, peer) = seqpacket_pair();
    let net = Net::new(
        Arc::new(PacketSocket::new(a).unwrap()),
        NetConfig { mac: MAC },
    );
    let d = TestDriver::new(Box::new(net));
    d.negotiate(!0);
    let mut rx = d.setup_queue(0, 16);
    let mut tx = d.setup_queue(1, 16);
    d.driver_ok();
    rx.add_chain(&d.mem, &[(RXBUF, 2048, true)]);
    d.kick(0);
    drop(peer);
    std::thread::sleep(Duration::from_millis(50));
    let counter = |name: &str| {
        let c = d.dev.lock().unwrap().counters();
        c.iter().find(|c| c.0 == name).unwrap().1
    };
    // The worker is not stuck: transmit is still served (the frame is dropped).
    d.mem
        .write_slice(&frame(20, 1), GuestAddress(TXBUF))
        .unwrap();
    tx.add_chain(&d.mem, &[(TXBUF, 32, false)]);
    d.kick(1);
    assert_eq!(tx.wait_used(&d.mem), Some((0, 0)));
    assert_eq!(counter("tx_dropped"), 1);
    assert_eq!(counter("rx_dropped"), 0);
    assert_eq!(rx.used_idx(&d.mem), 0);
    // And it is idle: its thread burns no CPU.
    let cpu = || -> u64 {
        let mut total = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() == "virtio-net" {
                let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
                let fields: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .collect();
                total += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            }
        }
        total
    };
    let before = cpu();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        cpu() - before < 10,
        "virtio-net worker busy-loops on a dead backend"
    );
}

#[test]
fn adopting_an_fd_that_is_not_a_tap_fails_clearly() {
    let (a, _b) = UnixDatagram::pair().unwrap();
    let e = Tap::from_fd(OwnedFd::from(a)).unwrap_err();
    assert!(e.to_string().contains("TUNGETIFF"), "{e}");
}

#[test]
fn tap_name_is_validated() {
    for bad in ["", "a-very-long-tap-name", "a/b"] {
        let e = Tap::open(bad).unwrap_err();
        assert!(matches!(e, TapError::InvalidName(_)), "{bad}: {e}");
    }
}

/// Test-side plumbing for a real TAP: link up and an AF_PACKET socket on it, inside the
/// network namespace of the calling thread.
mod netns {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn check(r: libc::c_int) -> io::Result<libc::c_int> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// Moves the calling thread into a new, empty network namespace; it disappears with the
    /// last fd or thread using it.
    pub fn unshare_net() -> io::Result<()> {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET only affects the calling thread.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) }).map(drop)
    }

    pub fn link_up(name: &str) -> io::Result<()> {
        // SAFETY: plain socket creation; the fd is owned right away.
        let s = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) })?;
        // SAFETY: `s` is a fresh fd nobody else owns.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = b as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass, which lives
        // across the calls; the union field read is the one the kernel filled.
        unsafe {
            check(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req))?;
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            check(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req))?;
        }
        // Keep IPv6 autoconfiguration chatter off the link (best effort).
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        Ok(())
    }

    /// An AF_PACKET socket bound to interface `name`, receiving every protocol.
    pub fn packet_socket(name: &str) -> io::Result<OwnedFd> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto.into()) })?;
        // SAFETY: `fd` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: the pointers reference live locals of the sizes passed.
        unsafe {
            check(libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ))?;
            check(libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ))?;
        }
        Ok(fd)
    }
}

const ETHERTYPE_TEST: [u8; 2] = [0x88, 0xb5]; // IEEE local experimental

fn test_frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_TEST);
    f.extend_from_slice(payload);
    f
}

#[test]
fn real_tap_in_a_private_network_namespace() {
    use std::io::{Read, Write};
    // unshare(CLONE_NEWNET) moves only the calling thread: run in a thread of our own so the
    // namespace (and the TAP in it) vanishes when the thread and its fds are gone.
    let worker = std::thread::spawn(|| {
        if let Err(e) = netns::unshare_net() {
            eprintln!("skipping real TAP test: cannot create a network namespace: {e}");
            return;
        }
        let tap = match Tap::open("rvtest0") {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipping real TAP test: {e}");
                return;
            }
        };
        assert_eq!(tap.name(), "rvtest0");
        // The daemon's way: a TAP fd opened elsewhere, adopted by the VMM.
        {
            let other = Tap::open("rvtest1").expect("second TAP");
            let fd = OwnedFd::from(other.file().try_clone().unwrap());
            drop(other);
            let adopted = Tap::from_fd(fd).expect("adopt a TAP fd");
            assert_eq!(adopted.name(), "rvtest1");
        }
        // The real TAP accepts the receive offloads the guest negotiates.
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .expect("TUNSETOFFLOAD");
        netns::link_up("rvtest0").expect("link up");
        let mut pkt = std::fs::File::from(netns::packet_socket("rvtest0").expect("AF_PACKET"));

        let net = Net::new(Arc::new(tap), NetConfig { mac: MAC });
        let d = TestDriver::new(Box::new(net));
        let features = d.negotiate(!0);
        assert_ne!(
            features & (1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO offered by a real TAP"
        );
        let mut rx = d.setup_queue(0, 16);
        let mut tx = d.setup_queue(1, 16);
        d.driver_ok();

        // Guest → TAP → kernel: the frame shows up on the interface.
        let out = test_frame(MAC, b"from the guest");
        let mut wire = vec![0u8; VNET_HDR_LEN];
        wire.extend_from_slice(&out);
        d.mem.write_slice(&wire, GuestAddress(TXBUF)).unwrap();
        tx.add_chain(&d.mem, &[(TXBUF, wire.len() as u32, false)]);
        d.kick(1);
        assert!(tx.wait_used(&d.mem).is_some());
        let mut buf = vec![0u8; 2048];
        loop {
            let n = pkt
                .read(&mut buf)
                .expect("frame from the guest seen on rvtest0");
            if buf[12..14] == ETHERTYPE_TEST {
                assert_eq!(&buf[..n], &out[..]);
                break;
            }
        }

        // Kernel → TAP → guest: a frame sent on the interface reaches the guest's rx buffer.
        for i in 0..8u64 {
            rx.add_chain(&d.mem, &[(RXBUF + i * 0x1000, 2048, true)]);
        }
        d.kick(0);
        let inbound = test_frame([0x52, 0x54, 0, 0, 0, 1], b"to the guest");
        pkt.write_all(&inbound).unwrap();
        loop {
            let (id, len) = rx.wait_used(&d.mem).expect("frame delivered to the guest");
            let at = RXBUF + u64::from(id) * 0x1000 + VNET_HDR_LEN as u64;
            let mut got = vec![0u8; len as usize - VNET_HDR_LEN];
            d.mem.read_slice(&mut got, GuestAddress(at)).unwrap();
            if got.len() >= 14 && got[12..14] == ETHERTYPE_TEST {
                // The kernel may pad short frames; the payload must be there as sent.
                assert_eq!(&got[..inbound.len()], &inbound[..]);
                break;
            }
        }
    });
    worker.join().expect("TAP test thread");
}
