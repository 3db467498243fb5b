//! Stubs of the VMM side for unit tests: MSI routing and ioeventfd registration that record
//! every call.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::{InterruptError, IoEventRegistry, MsiMessage, MsiRouting, MsiVector};

/// Records route updates; hands out vectors whose eventfds are clones kept here, so tests can
/// count interrupts per GSI.
#[derive(Default)]
pub struct StubRouting {
    next_gsi: AtomicU32,
    pub routes: Mutex<Vec<(u32, MsiMessage, bool)>>,
    pub fds: Mutex<Vec<(u32, EventFd)>>,
    pub freed: Mutex<Vec<u32>>,
}

impl StubRouting {
    /// Interrupts raised on `gsi` since the last call (reads and resets its eventfd).
    pub fn take_count(&self, gsi: u32) -> u64 {
        let fds = self.fds.lock().unwrap();
        let fd = &fds.iter().find(|(g, _)| *g == gsi).expect("unknown GSI").1;
        fd.read().unwrap_or(0)
    }

    /// The last route set for `gsi`.
    pub fn last_route(&self, gsi: u32) -> Option<(MsiMessage, bool)> {
        let routes = self.routes.lock().unwrap();
        routes.iter().rev().find(|r| r.0 == gsi).map(|r| (r.1, r.2))
    }

    pub fn route_count(&self) -> usize {
        self.routes.lock().unwrap().len()
    }
}

impl MsiRouting for StubRouting {
    fn alloc_vector(&self) -> Result<MsiVector, InterruptError> {
        let gsi = 24 + self.next_gsi.fetch_add(1, Ordering::SeqCst);
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        self.fds
            .lock()
            .unwrap()
            .push((gsi, fd.try_clone().unwrap()));
        Ok(MsiVector { gsi, eventfd: fd })
    }
    fn update_route(&self, gsi: u32, msg: MsiMessage, masked: bool) -> Result<(), InterruptError> {
        self.routes.lock().unwrap().push((gsi, msg, masked));
        Ok(())
    }
    fn free_vector(&self, v: MsiVector) {
        self.freed.lock().unwrap().push(v.gsi);
    }
}

/// Records ioeventfd registrations as (address, registered?) and keeps a clone of each live
/// fd, so a test can signal an address the way KVM does on a guest write.
#[derive(Default)]
pub struct StubIoEvents {
    pub events: Mutex<Vec<(u64, bool)>>,
    live: Mutex<Vec<(u64, EventFd)>>,
}

#[allow(dead_code)]
impl StubIoEvents {
    /// Addresses registered now.
    pub fn registered(&self) -> Vec<u64> {
        let mut live: Vec<u64> = self.live.lock().unwrap().iter().map(|x| x.0).collect();
        live.sort_unstable();
        live
    }

    /// What KVM does when the guest writes `addr`: signals the eventfd registered there.
    /// Returns false when nothing is registered at `addr`.
    pub fn signal(&self, addr: u64) -> bool {
        let live = self.live.lock().unwrap();
        match live.iter().find(|x| x.0 == addr) {
            Some((_, fd)) => fd.write(1).is_ok(),
            None => false,
        }
    }
}

impl IoEventRegistry for StubIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError> {
        self.events.lock().unwrap().push((addr, true));
        self.live
            .lock()
            .unwrap()
            .push((addr, fd.try_clone().unwrap()));
        Ok(())
    }
    fn unregister(&self, addr: u64, _fd: &EventFd) -> Result<(), InterruptError> {
        self.events.lock().unwrap().push((addr, false));
        let mut live = self.live.lock().unwrap();
        if let Some(i) = live.iter().position(|x| x.0 == addr) {
            live.remove(i);
        }
        Ok(())
    }
}
