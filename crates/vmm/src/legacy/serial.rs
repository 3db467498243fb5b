//! COM1: a 16550A UART (vm-superio) whose interrupt is an irqfd and whose output goes to the
//! console sink (stdout, a pty, or the connected socket client).

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// An interrupt line backed by an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the console's bytes go right now; `None` drops them.
pub type Sink = Arc<Mutex<Option<Box<dyn Write + Send>>>>;

/// Where guest serial output goes.
pub struct SerialOut {
    /// stdout, a pty master, or the connected console client.
    pub sink: Sink,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = g.as_mut() {
            if w.write_all(buf).and_then(|_| w.flush()).is_err() {
                // A console client went away: drop output until the next one connects.
                *g = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// COM1 as seen by the vCPUs.
pub type Com1 = Serial<IrqLine, vm_superio::serial::NoEvents, SerialOut>;

impl BusDevice for Com1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data[0] = Serial::read(self, offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let _ = Serial::write(self, offset as u8, v);
        }
    }
}
