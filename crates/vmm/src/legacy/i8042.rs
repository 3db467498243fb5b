//! The i8042 keyboard controller with a PS/2 keyboard on its first port and a PS/2 mouse on
//! its aux port, at I/O 0x60 (data) and 0x64 (status on read, controller command on write).
//! Firmware (OVMF's Ps2KeyboardDxe, SeaBIOS) and Linux (`i8042` + `atkbd`/`psmouse`) drive
//! it; the FADT's 8042 flag and the DSDT's PNP0303/PNP0F13 devices tell the OS it is there.
//!
//! Model: the controller has one output byte (status OBF, AUXB when it came from the mouse).
//! Behind it wait, in this order: the controller's own replies, then the keyboard's bytes
//! (while the keyboard port is enabled in the command byte), then the mouse's. Each device
//! answers a command before any pending input events, as a real device stops scanning to
//! reply. Queues are bounded; an input event that does not fit is dropped whole, so a flood
//! never splits a scancode sequence or a mouse packet.
//!
//! IRQ 1 (keyboard and controller bytes) and IRQ 12 (mouse bytes) follow OBF gated by the
//! command byte's INT bits, as the 8042's output lines do; the VMM delivers them as edges
//! (irqfds on GSI 1 and 12), so an [`EventFd`] is written when a line rises: a byte becoming
//! readable, or its INT bit being set while it waits.
//!
//! With the command byte's XLATE bit the controller translates every keyboard byte from
//! set 2 to set 1 (the IBM translation table; 0xF0 prefixes a release: the next byte comes
//! out with bit 7 set). The keyboard itself speaks set 2, or set 1 after `F0 01`; set 3 is
//! refused. Resetting the machine (0xFE, any even 0xF0–0xFE pulse, or an output-port write
//! with bit 0 clear) goes to the VMM as a reboot, as the reset register does.

use std::collections::VecDeque;

use rvirt_api::vmm::ExitReason;
use rvirt_devices::guest_warn;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::messages::Mailbox;

/// Status register bits.
pub mod status {
    /// Output buffer full: a byte waits at 0x60.
    pub const OBF: u8 = 1 << 0;
    /// Input buffer full (never: every write is handled at once).
    pub const IBF: u8 = 1 << 1;
    /// System flag: set by the self-test (and bit 2 of the command byte).
    pub const SYS: u8 = 1 << 2;
    /// The last write went to the command port 0x64 (A2 line).
    pub const A2: u8 = 1 << 3;
    /// Keyboard not inhibited (no key lock).
    pub const UNLOCKED: u8 = 1 << 4;
    /// The output byte comes from the aux (mouse) port.
    pub const AUXB: u8 = 1 << 5;
}

/// Command byte bits.
pub mod ctr {
    /// IRQ 1 for keyboard bytes.
    pub const KBD_INT: u8 = 1 << 0;
    /// IRQ 12 for aux bytes.
    pub const AUX_INT: u8 = 1 << 1;
    /// System flag.
    pub const SYS: u8 = 1 << 2;
    /// Keyboard port disabled (its clock held low).
    pub const KBD_DIS: u8 = 1 << 4;
    /// Aux port disabled.
    pub const AUX_DIS: u8 = 1 << 5;
    /// Translate keyboard bytes from set 2 to set 1.
    pub const XLATE: u8 = 1 << 6;
}

/// Bytes of command replies the controller or a device holds.
const REPLY_CAP: usize = 16;
/// Bytes of input events a device holds (about 40 key presses, or 60 mouse packets).
const EVENT_CAP: usize = 256;

/// Set 2 → set 1 for codes 0x00–0x7F (the translation the 8042 applies with XLATE).
#[rustfmt::skip]
const XLATE_TABLE: [u8; 128] = [
    0xff, 0x43, 0x41, 0x3f, 0x3d, 0x3b, 0x3c, 0x58, 0x64, 0x44, 0x42, 0x40, 0x3e, 0x0f, 0x29, 0x59,
    0x65, 0x38, 0x2a, 0x70, 0x1d, 0x10, 0x02, 0x5a, 0x66, 0x71, 0x2c, 0x1f, 0x1e, 0x11, 0x03, 0x5b,
    0x67, 0x2e, 0x2d, 0x20, 0x12, 0x05, 0x04, 0x5c, 0x68, 0x39, 0x2f, 0x21, 0x14, 0x13, 0x06, 0x5d,
    0x69, 0x31, 0x30, 0x23, 0x22, 0x15, 0x07, 0x5e, 0x6a, 0x72, 0x32, 0x24, 0x16, 0x08, 0x09, 0x5f,
    0x6b, 0x33, 0x25, 0x17, 0x18, 0x0b, 0x0a, 0x60, 0x6c, 0x34, 0x35, 0x26, 0x27, 0x19, 0x0c, 0x61,
    0x6d, 0x73, 0x28, 0x74, 0x1a, 0x0d, 0x62, 0x6e, 0x3a, 0x36, 0x1c, 0x1b, 0x75, 0x2b, 0x63, 0x76,
    0x55, 0x56, 0x77, 0x78, 0x79, 0x7a, 0x0e, 0x7b, 0x7c, 0x4f, 0x7d, 0x4b, 0x47, 0x7e, 0x7f, 0x6f,
    0x52, 0x53, 0x50, 0x4c, 0x4d, 0x48, 0x01, 0x45, 0x57, 0x4e, 0x51, 0x4a, 0x37, 0x49, 0x46, 0x54,
];

/// One set-2 byte in set 1 (without the release bit).
fn to_set1(b: u8) -> u8 {
    match b {
        0..=0x7f => XLATE_TABLE[b as usize],
        // F7 and SysRq sit above 0x7F in set 2; every other high byte (E0, E1, FA, AA...) is
        // passed through unchanged.
        0x83 => 0x41,
        0x84 => 0x54,
        _ => b,
    }
}

/// The set-2 make code of Pause: it has no break code and its own sequence.
pub const KEY_PAUSE: u16 = 0xe114;

/// Where an output byte came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Src {
    Kbd,
    Aux,
}

/// What the next byte written to 0x60 is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DataTarget {
    Kbd,
    Ctr,
    OutPort,
    KbdObuf,
    AuxObuf,
    Aux,
    Ram(u8),
}

/// A device's output: command replies first, then input events.
#[derive(Default)]
struct DevQueue {
    replies: VecDeque<u8>,
    events: VecDeque<u8>,
}

impl DevQueue {
    fn reply(&mut self, bytes: &[u8]) {
        for b in bytes {
            if self.replies.len() < REPLY_CAP {
                self.replies.push_back(*b);
            }
        }
    }

    /// Queues a whole event or nothing; false when it did not fit.
    fn event(&mut self, bytes: &[u8]) -> bool {
        if self.events.len() + bytes.len() > EVENT_CAP {
            return false;
        }
        self.events.extend(bytes);
        true
    }

    fn pop(&mut self) -> Option<u8> {
        self.replies.pop_front().or_else(|| self.events.pop_front())
    }

    fn clear(&mut self) {
        self.replies.clear();
        self.events.clear();
    }
}

/// The PS/2 keyboard.
struct Keyboard {
    q: DevQueue,
    /// The argument byte the last command waits for (0xED, 0xF0, 0xF3).
    pending: Option<u8>,
    scanning: bool,
    set: u8,
    leds: u8,
    typematic: u8,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard {
            q: DevQueue::default(),
            pending: None,
            scanning: true,
            set: 2,
            leds: 0,
            typematic: 0x2b,
        }
    }

    fn defaults(&mut self) {
        self.set = 2;
        self.typematic = 0x2b;
        self.scanning = true;
    }

    fn write(&mut self, v: u8) {
        if let Some(cmd) = self.pending.take() {
            match cmd {
                0xed => {
                    self.leds = v & 7;
                    self.q.reply(&[0xfa]);
                }
                0xf3 => {
                    self.typematic = v & 0x7f;
                    self.q.reply(&[0xfa]);
                }
                _ => match v {
                    0 => self.q.reply(&[0xfa, self.set]),
                    1 | 2 => {
                        self.set = v;
                        self.q.reply(&[0xfa]);
                    }
                    _ => self.q.reply(&[0xfe]),
                },
            }
            return;
        }
        match v {
            0xed | 0xf0 | 0xf3 => {
                self.pending = Some(v);
                self.q.reply(&[0xfa]);
            }
            0xee => self.q.reply(&[0xee]),
            0xf2 => self.q.reply(&[0xfa, 0xab, 0x83]),
            0xf4 => {
                self.scanning = true;
                self.q.reply(&[0xfa]);
            }
            // Disable also restores the defaults; both drop pending keys.
            0xf5 | 0xf6 => {
                self.q.events.clear();
                self.defaults();
                self.scanning = v == 0xf6;
                self.q.reply(&[0xfa]);
            }
            0xff => {
                self.q.clear();
                self.defaults();
                self.leds = 0;
                self.q.reply(&[0xfa, 0xaa]);
            }
            // Set-3 per-key modes and resend: acknowledged and ignored.
            0xf7..=0xfe => self.q.reply(&[0xfa]),
            _ => self.q.reply(&[0xfe]),
        }
    }

    /// The bytes of `code` (set-2 make code, 0xE0xx for extended keys) in the current set.
    fn key_bytes(&self, code: u16, pressed: bool) -> Vec<u8> {
        let mut set2 = Vec::with_capacity(8);
        if code == KEY_PAUSE {
            if pressed {
                set2.extend([0xe1, 0x14, 0x77, 0xe1, 0xf0, 0x14, 0xf0, 0x77]);
            }
        } else {
            if code >> 8 == 0xe0 {
                set2.push(0xe0);
            }
            if !pressed {
                set2.push(0xf0);
            }
            set2.push(code as u8);
        }
        if self.set == 2 {
            return set2;
        }
        translate(&set2)
    }
}

/// Set-2 bytes in set 1.
fn translate(set2: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(set2.len());
    let mut release = false;
    for b in set2 {
        if *b == 0xf0 {
            release = true;
            continue;
        }
        out.push(to_set1(*b) | if release { 0x80 } else { 0 });
        release = false;
    }
    out
}

/// The PS/2 mouse (with the IntelliMouse wheel extension).
struct Mouse {
    q: DevQueue,
    pending: Option<u8>,
    streaming: bool,
    remote: bool,
    scaling21: bool,
    resolution: u8,
    rate: u8,
    /// Last three sample rates set, for the IntelliMouse knock (200, 100, 80).
    rates: [u8; 3],
    /// Device id: 0 plain, 3 with a wheel.
    id: u8,
    buttons: u8,
}

impl Mouse {
    fn new() -> Self {
        Mouse {
            q: DevQueue::default(),
            pending: None,
            streaming: false,
            remote: false,
            scaling21: false,
            resolution: 2,
            rate: 100,
            rates: [0; 3],
            id: 0,
            buttons: 0,
        }
    }

    fn defaults(&mut self) {
        self.streaming = false;
        self.remote = false;
        self.scaling21 = false;
        self.resolution = 2;
        self.rate = 100;
    }

    fn write(&mut self, v: u8) {
        if let Some(cmd) = self.pending.take() {
            if cmd == 0xe8 {
                self.resolution = v & 3;
            } else {
                self.rate = v;
                self.rates = [self.rates[1], self.rates[2], v];
                if self.rates == [200, 100, 80] {
                    self.id = 3;
                }
            }
            self.q.reply(&[0xfa]);
            return;
        }
        match v {
            0xe8 | 0xf3 => {
                self.pending = Some(v);
                self.q.reply(&[0xfa]);
            }
            0xe6 | 0xe7 => {
                self.scaling21 = v == 0xe7;
                self.q.reply(&[0xfa]);
            }
            0xe9 => {
                let b0 = (u8::from(self.remote) << 6)
                    | (u8::from(self.streaming) << 5)
                    | (u8::from(self.scaling21) << 4)
                    | (self.buttons & 7);
                self.q.reply(&[0xfa, b0, self.resolution, self.rate]);
            }
            0xea | 0xf0 => {
                self.remote = v == 0xf0;
                self.q.reply(&[0xfa]);
            }
            // Read data (remote mode): a packet with no motion.
            0xeb => {
                self.q.reply(&[0xfa]);
                let p = self.packet(0, 0, self.buttons, 0);
                self.q.reply(&p);
            }
            0xf2 => self.q.reply(&[0xfa, self.id]),
            0xf4 | 0xf5 => {
                self.streaming = v == 0xf4;
                self.q.events.clear();
                self.q.reply(&[0xfa]);
            }
            0xf6 => {
                self.defaults();
                self.q.events.clear();
                self.q.reply(&[0xfa]);
            }
            0xff => {
                self.q.clear();
                self.defaults();
                self.id = 0;
                self.rates = [0; 3];
                self.q.reply(&[0xfa, 0xaa, 0x00]);
            }
            _ => self.q.reply(&[0xfe]),
        }
    }

    fn packet(&self, dx: i32, dy: i32, buttons: u8, wheel: i32) -> Vec<u8> {
        let dx = dx.clamp(-256, 255);
        let dy = dy.clamp(-256, 255);
        let b0 = 0x08 | (buttons & 7) | (u8::from(dx < 0) << 4) | (u8::from(dy < 0) << 5);
        let mut p = vec![b0, dx as u8, dy as u8];
        if self.id == 3 {
            p.push(wheel.clamp(-8, 7) as u8);
        }
        p
    }
}

/// Which port of the controller a bus range is.
pub enum I8042Port {
    Data,
    Command,
}

/// The keyboard controller, its keyboard and its mouse.
pub struct I8042 {
    ctr: u8,
    /// The byte at 0x60 and where it came from.
    obuf: Option<(u8, Src)>,
    /// Controller replies (0x20, self-tests, 0xD2/0xD3 echoes) waiting for the output buffer.
    ctrl_q: VecDeque<(u8, Src)>,
    target: DataTarget,
    /// Status A2: last write was a command.
    last_cmd: bool,
    outport: u8,
    /// Internal RAM bytes 1–31 (0x21–0x3F reads, 0x61–0x7F writes); byte 0 is `ctr`.
    ram: [u8; 32],
    /// A translated 0xF0 waits for the code it releases.
    xlate_release: bool,
    kbd: Keyboard,
    aux: Mouse,
    irq1: Option<EventFd>,
    irq12: Option<EventFd>,
    /// Line levels, to signal only rising edges.
    irq1_level: bool,
    irq12_level: bool,
    mailbox: Mailbox,
}

/// Output port: reset line (active low), A20 gate, and the lines that read as set.
const OUTPORT_RESET: u8 = 1 << 0;
const OUTPORT_A20: u8 = 1 << 1;
const OUTPORT_POWER_ON: u8 = 0xcf;

impl I8042 {
    /// A controller after power-on: both ports enabled with their interrupts, no translation
    /// (firmware sets the command byte it wants), the keyboard scanning in set 2. `irq1` and
    /// `irq12` are the keyboard and aux interrupt lines (`None` in tests).
    pub fn new(mailbox: Mailbox, irq1: Option<EventFd>, irq12: Option<EventFd>) -> Self {
        I8042 {
            ctr: ctr::KBD_INT | ctr::AUX_INT,
            obuf: None,
            ctrl_q: VecDeque::new(),
            target: DataTarget::Kbd,
            last_cmd: false,
            outport: OUTPORT_POWER_ON,
            ram: [0; 32],
            xlate_release: false,
            kbd: Keyboard::new(),
            aux: Mouse::new(),
            irq1,
            irq12,
            irq1_level: false,
            irq12_level: false,
            mailbox,
        }
    }

    /// Back to the power-on state (platform reset); the interrupt lines stay.
    pub fn reset(&mut self) {
        let fresh = I8042::new(self.mailbox.clone(), self.irq1.take(), self.irq12.take());
        *self = fresh;
    }

    /// The keyboard LEDs the guest set last (bit 0 Scroll Lock, 1 Num Lock, 2 Caps Lock).
    pub fn leds(&self) -> u8 {
        self.kbd.leds
    }

    /// The A20 gate of the output port (KVM does not mask A20; this is only what was set).
    pub fn a20(&self) -> bool {
        self.outport & OUTPORT_A20 != 0
    }

    /// A key press or release from the host: `code` is its set-2 make code (0xE0xx for the
    /// extended keys, [`KEY_PAUSE`] for Pause, which only has a press). Sent in the
    /// keyboard's current set; the controller translates to set 1 when XLATE is on. Dropped
    /// while the keyboard is not scanning or its queue is full; false then.
    pub fn key_event(&mut self, code: u16, pressed: bool) -> bool {
        if !self.kbd.scanning {
            return false;
        }
        let bytes = self.kbd.key_bytes(code, pressed);
        let ok = !bytes.is_empty() && self.kbd.q.event(&bytes);
        self.update();
        ok
    }

    /// Mouse motion from the host: `dx` right, `dy` up (PS/2's direction), each clamped to
    /// one packet's -256..=255; `buttons` bit 0 left, 1 right, 2 middle; `wheel` (clamped to
    /// -8..=7) only reaches a guest that enabled the IntelliMouse mode. Dropped unless the
    /// guest enabled streaming (0xF4), or when the queue is full; false then.
    pub fn mouse_event(&mut self, dx: i32, dy: i32, buttons: u8, wheel: i32) -> bool {
        self.aux.buttons = buttons & 7;
        if !self.aux.streaming || self.aux.remote {
            return false;
        }
        let p = self.aux.packet(dx, dy, buttons, wheel);
        let ok = self.aux.q.event(&p);
        self.update();
        ok
    }

    fn status(&self) -> u8 {
        let mut s = status::UNLOCKED | (self.ctr & ctr::SYS);
        if self.last_cmd {
            s |= status::A2;
        }
        match self.obuf {
            Some((_, Src::Aux)) => s |= status::OBF | status::AUXB,
            Some(_) => s |= status::OBF,
            None => {}
        }
        s
    }

    fn ctrl_reply(&mut self, v: u8, src: Src) {
        if self.ctrl_q.len() < REPLY_CAP {
            self.ctrl_q.push_back((v, src));
        }
    }

    /// The next keyboard byte as the host reads it (translated when XLATE is on).
    fn next_kbd_byte(&mut self) -> Option<u8> {
        while let Some(b) = self.kbd.q.pop() {
            if self.ctr & ctr::XLATE == 0 {
                return Some(b);
            }
            if b == 0xf0 {
                self.xlate_release = true;
                continue;
            }
            let out = to_set1(b) | if self.xlate_release { 0x80 } else { 0 };
            self.xlate_release = false;
            return Some(out);
        }
        None
    }

    /// Fills the output buffer if it is empty and recomputes the interrupt lines.
    fn update(&mut self) {
        if self.obuf.is_none() {
            self.obuf = self.ctrl_q.pop_front();
        }
        if self.obuf.is_none() && self.ctr & ctr::KBD_DIS == 0 {
            self.obuf = self.next_kbd_byte().map(|b| (b, Src::Kbd));
        }
        if self.obuf.is_none() && self.ctr & ctr::AUX_DIS == 0 {
            self.obuf = self.aux.q.pop().map(|b| (b, Src::Aux));
        }
        let src = self.obuf.map(|(_, s)| s);
        let l1 = src == Some(Src::Kbd) && self.ctr & ctr::KBD_INT != 0;
        let l12 = src == Some(Src::Aux) && self.ctr & ctr::AUX_INT != 0;
        if l1 && !self.irq1_level {
            if let Some(e) = &self.irq1 {
                let _ = e.write(1);
            }
        }
        if l12 && !self.irq12_level {
            if let Some(e) = &self.irq12 {
                let _ = e.write(1);
            }
        }
        self.irq1_level = l1;
        self.irq12_level = l12;
    }

    fn pulse_reset(&self, why: &str) {
        log::info!("i8042 {why}: reboot");
        self.mailbox.exit(ExitReason::Reboot);
    }

    fn command(&mut self, cmd: u8) {
        self.target = DataTarget::Kbd;
        match cmd {
            0x20 => self.ctrl_reply(self.ctr, Src::Kbd),
            0x21..=0x3f => self.ctrl_reply(self.ram[usize::from(cmd & 0x1f)], Src::Kbd),
            0x60 => self.target = DataTarget::Ctr,
            0x61..=0x7f => self.target = DataTarget::Ram(cmd & 0x1f),
            // No password installed.
            0xa4 => self.ctrl_reply(0xf1, Src::Kbd),
            0xa7 => self.ctr |= ctr::AUX_DIS,
            0xa8 => self.ctr &= !ctr::AUX_DIS,
            0xa9 | 0xab => self.ctrl_reply(0x00, Src::Kbd),
            0xaa => {
                self.ctr |= ctr::SYS;
                self.ctrl_reply(0x55, Src::Kbd);
            }
            0xad => self.ctr |= ctr::KBD_DIS,
            0xae => self.ctr &= !ctr::KBD_DIS,
            // Input port: keyboard not inhibited.
            0xc0 => self.ctrl_reply(0x80, Src::Kbd),
            0xd0 => {
                let mut v = self.outport & !0x30;
                match self.obuf {
                    Some((_, Src::Kbd)) => v |= 0x10,
                    Some((_, Src::Aux)) => v |= 0x20,
                    None => {}
                }
                self.ctrl_reply(v, Src::Kbd);
            }
            0xd1 => self.target = DataTarget::OutPort,
            0xd2 => self.target = DataTarget::KbdObuf,
            0xd3 => self.target = DataTarget::AuxObuf,
            0xd4 => self.target = DataTarget::Aux,
            // Pulse output-port lines 0–3 low for the bits clear in the low nibble: bit 0 is
            // the reset line.
            0xf0..=0xff => {
                if cmd & 1 == 0 {
                    self.pulse_reset("reset line pulsed");
                }
            }
            _ => guest_warn!("i8042: unknown controller command {cmd:#04x} ignored"),
        }
    }

    fn data(&mut self, v: u8) {
        let target = std::mem::replace(&mut self.target, DataTarget::Kbd);
        match target {
            DataTarget::Kbd => {
                // Sending to the keyboard enables its port again, as the 8042 does.
                self.ctr &= !ctr::KBD_DIS;
                self.kbd.write(v);
            }
            DataTarget::Ctr => {
                self.ctr = v;
                // A new command byte ends a half-translated release.
                if v & ctr::XLATE == 0 {
                    self.xlate_release = false;
                }
            }
            DataTarget::Ram(i) => self.ram[usize::from(i)] = v,
            DataTarget::OutPort => {
                self.outport = v;
                if v & OUTPORT_RESET == 0 {
                    self.pulse_reset("output port reset line low");
                }
            }
            DataTarget::KbdObuf => self.ctrl_reply(v, Src::Kbd),
            DataTarget::AuxObuf => self.ctrl_reply(v, Src::Aux),
            DataTarget::Aux => self.aux.write(v),
        }
    }

    /// A read of port 0x60 or 0x64.
    pub fn read_port(&mut self, port: &I8042Port) -> u8 {
        match port {
            I8042Port::Command => self.status(),
            I8042Port::Data => {
                // An empty buffer reads the last byte again on real controllers; 0 here is
                // as good, and nothing relies on it.
                let v = self.obuf.take().map_or(0, |(b, _)| b);
                // The read empties the buffer and drops the line: the next byte, if one
                // waits, raises it again (one edge per byte).
                self.irq1_level = false;
                self.irq12_level = false;
                self.update();
                v
            }
        }
    }

    /// A write to port 0x60 or 0x64.
    pub fn write_port(&mut self, port: &I8042Port, v: u8) {
        match port {
            I8042Port::Command => {
                self.last_cmd = true;
                self.command(v);
            }
            I8042Port::Data => {
                self.last_cmd = false;
                self.data(v);
            }
        }
        self.update();
    }
}

/// One of the two ports on the bus, sharing the controller.
pub struct I8042Bus {
    pub dev: std::sync::Arc<std::sync::Mutex<I8042>>,
    pub port: I8042Port,
}

impl BusDevice for I8042Bus {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let mut dev = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        // Port I/O of more than one byte to a one-byte port reads the one register.
        if let Some(d) = data.first_mut() {
            *d = dev.read_port(&self.port);
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut dev = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.first() {
            dev.write_port(&self.port, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{mailbox, VmmMessage};
    use std::sync::mpsc::Receiver;

    fn dev() -> (I8042, Receiver<VmmMessage>) {
        let (m, rx) = mailbox();
        (I8042::new(m, None, None), rx)
    }

    fn cmd(d: &mut I8042, v: u8) {
        d.write_port(&I8042Port::Command, v);
    }

    fn data(d: &mut I8042, v: u8) {
        d.write_port(&I8042Port::Data, v);
    }

    fn st(d: &mut I8042) -> u8 {
        d.read_port(&I8042Port::Command)
    }

    /// Reads every waiting byte (at most 64), as a polling driver does.
    fn drain(d: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while st(d) & status::OBF != 0 && out.len() < 64 {
            out.push(d.read_port(&I8042Port::Data));
        }
        out
    }

    fn exit_of(rx: &Receiver<VmmMessage>) -> Option<ExitReason> {
        match rx.try_recv() {
            Ok(VmmMessage::Exit(r)) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn ps2keyboarddxe_init_sequence() {
        let (mut d, rx) = dev();
        cmd(&mut d, 0xaa);
        assert_eq!(drain(&mut d), [0x55]);
        assert_ne!(st(&mut d) & status::SYS, 0, "self-test sets SYS");
        cmd(&mut d, 0x60);
        assert_ne!(st(&mut d) & status::A2, 0);
        data(&mut d, 0x67);
        assert_eq!(st(&mut d) & status::A2, 0);
        cmd(&mut d, 0x20);
        assert_eq!(drain(&mut d), [0x67]);
        cmd(&mut d, 0xab);
        assert_eq!(drain(&mut d), [0x00]);
        data(&mut d, 0xff);
        assert_eq!(drain(&mut d), [0xfa, 0xaa]);
        data(&mut d, 0xf0);
        assert_eq!(drain(&mut d), [0xfa]);
        data(&mut d, 0x02);
        assert_eq!(drain(&mut d), [0xfa]);
        data(&mut d, 0xf4);
        assert_eq!(drain(&mut d), [0xfa]);
        data(&mut d, 0xed);
        assert_eq!(drain(&mut d), [0xfa]);
        data(&mut d, 0x02);
        assert_eq!(drain(&mut d), [0xfa]);
        assert_eq!(d.leds(), 0x02, "Num Lock");
        // With XLATE (0x67 has bit 6) 'a' arrives in set 1.
        d.key_event(0x1c, true);
        d.key_event(0x1c, false);
        assert_eq!(drain(&mut d), [0x1e, 0x9e]);
        assert_eq!(exit_of(&rx), None);
    }

    #[test]
    fn seabios_sequence_with_ports_disabled_and_polling() {
        let (mut d, _rx) = dev();
        // Disable both ports, flush, self-test.
        cmd(&mut d, 0xad);
        cmd(&mut d, 0xa7);
        assert!(drain(&mut d).is_empty());
        cmd(&mut d, 0xaa);
        assert_eq!(drain(&mut d), [0x55]);
        cmd(&mut d, 0xab);
        assert_eq!(drain(&mut d), [0x00]);
        // Keyboard commands while polling: CTR with interrupts off, kbd port on.
        cmd(&mut d, 0x60);
        data(&mut d, 0x30);
        data(&mut d, 0xff);
        assert_eq!(drain(&mut d), [0xfa, 0xaa]);
        data(&mut d, 0xf5);
        assert_eq!(drain(&mut d), [0xfa]);
        data(&mut d, 0xf0);
        data(&mut d, 0x02);
        assert_eq!(drain(&mut d), [0xfa, 0xfa]);
        // Keys are dropped while the keyboard does not scan.
        assert!(!d.key_event(0x1c, true));
        cmd(&mut d, 0x60);
        data(&mut d, 0x61);
        data(&mut d, 0xf4);
        assert_eq!(drain(&mut d), [0xfa]);
        data(&mut d, 0xf2);
        // Translated ID, as a real 8042 with XLATE delivers it.
        assert_eq!(drain(&mut d), [0xfa, 0xab, 0x41]);
        // Mouse behind the disabled aux port: its reply waits until the port is enabled.
        cmd(&mut d, 0xd4);
        data(&mut d, 0xff);
        assert!(drain(&mut d).is_empty());
        cmd(&mut d, 0xa8);
        let r: Vec<u8> = drain(&mut d);
        assert_eq!(r, [0xfa, 0xaa, 0x00]);
    }

    #[test]
    fn linux_i8042_probe() {
        let (mut d, _rx) = dev();
        // i8042_controller_check: flush; read CTR; selftest.
        assert!(drain(&mut d).is_empty());
        cmd(&mut d, 0x20);
        let ctr0 = drain(&mut d)[0];
        assert_eq!(ctr0 & (ctr::KBD_INT | ctr::AUX_INT), 3);
        cmd(&mut d, 0xaa);
        assert_eq!(drain(&mut d), [0x55]);
        // Write back a CTR with interrupts off and aux disabled.
        cmd(&mut d, 0x60);
        data(
            &mut d,
            (ctr0 | ctr::AUX_DIS) & !(ctr::KBD_INT | ctr::AUX_INT),
        );
        // Not a MUX: loopback returns what is sent, including 0xA4.
        for v in [0xf0, 0x56, 0xa4] {
            cmd(&mut d, 0xd3);
            data(&mut d, v);
            assert_ne!(st(&mut d) & status::AUXB, 0);
            assert_eq!(drain(&mut d), [v]);
        }
        // i8042_check_aux: loopback 0x5A, then 0xA9 → 0, toggling AUX_DIS visible in CTR.
        cmd(&mut d, 0xd3);
        data(&mut d, 0x5a);
        assert_eq!(drain(&mut d), [0x5a]);
        cmd(&mut d, 0xa9);
        assert_eq!(drain(&mut d), [0x00]);
        cmd(&mut d, 0xa7);
        cmd(&mut d, 0x20);
        assert_ne!(drain(&mut d)[0] & ctr::AUX_DIS, 0);
        cmd(&mut d, 0xa8);
        cmd(&mut d, 0x20);
        assert_eq!(drain(&mut d)[0] & ctr::AUX_DIS, 0);
        // The IRQ 12 loopback test: with AUX_INT set, the loopback byte raises IRQ 12.
        let (m, _rx) = mailbox();
        let e1 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let e12 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = I8042::new(
            m,
            Some(e1.try_clone().unwrap()),
            Some(e12.try_clone().unwrap()),
        );
        cmd(&mut d, 0xd3);
        data(&mut d, 0xa5);
        assert!(e12.read().is_ok(), "IRQ 12 for aux loopback");
        assert!(e1.read().is_err(), "no IRQ 1 for an aux byte");
        assert_eq!(drain(&mut d), [0xa5]);
    }

    #[test]
    fn keys_in_set2_translated_and_native_set1() {
        let (mut d, _rx) = dev();
        d.key_event(0x1c, true);
        d.key_event(0x1c, false);
        d.key_event(0xe075, true);
        d.key_event(0xe075, false);
        assert_eq!(
            drain(&mut d),
            [0x1c, 0xf0, 0x1c, 0xe0, 0x75, 0xe0, 0xf0, 0x75]
        );
        cmd(&mut d, 0x60);
        data(&mut d, 0x43);
        d.key_event(0x1c, true);
        d.key_event(0x1c, false);
        d.key_event(0xe075, true);
        d.key_event(0xe075, false);
        d.key_event(0x76, false);
        assert_eq!(drain(&mut d), [0x1e, 0x9e, 0xe0, 0x48, 0xe0, 0xc8, 0x81]);
        d.key_event(KEY_PAUSE, true);
        assert!(!d.key_event(KEY_PAUSE, false), "Pause has no release");
        assert_eq!(drain(&mut d), [0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5]);
        // Keyboard in set 1, no translation.
        cmd(&mut d, 0x60);
        data(&mut d, 0x03);
        data(&mut d, 0xf0);
        data(&mut d, 0x01);
        data(&mut d, 0xf0);
        data(&mut d, 0x00);
        assert_eq!(drain(&mut d), [0xfa, 0xfa, 0xfa, 0xfa, 0x01]);
        d.key_event(0x29, true);
        d.key_event(0x29, false);
        assert_eq!(drain(&mut d), [0x39, 0xb9]);
        // Set 3 refused.
        data(&mut d, 0xf0);
        data(&mut d, 0x03);
        assert_eq!(drain(&mut d), [0xfa, 0xfe]);
    }

    #[test]
    fn keyboard_commands() {
        let (mut d, _rx) = dev();
        data(&mut d, 0xee);
        assert_eq!(drain(&mut d), [0xee]);
        data(&mut d, 0xf3);
        data(&mut d, 0x20);
        assert_eq!(drain(&mut d), [0xfa, 0xfa]);
        data(&mut d, 0x12);
        assert_eq!(drain(&mut d), [0xfe], "unknown command: resend");
        data(&mut d, 0xf2);
        assert_eq!(drain(&mut d), [0xfa, 0xab, 0x83]);
        data(&mut d, 0xed);
        data(&mut d, 0x07);
        assert_eq!(drain(&mut d), [0xfa, 0xfa]);
        assert_eq!(d.leds(), 7);
        data(&mut d, 0xff);
        assert_eq!(drain(&mut d), [0xfa, 0xaa]);
        assert_eq!(d.leds(), 0);
        // A reply overtakes pending keys (the first is already in the output buffer).
        d.key_event(0x1c, true);
        d.key_event(0x1b, true);
        data(&mut d, 0xee);
        assert_eq!(drain(&mut d), [0x1c, 0xee, 0x1b]);
        // A reset drops pending keys.
        d.key_event(0x1c, true);
        d.key_event(0x1b, true);
        data(&mut d, 0xff);
        assert_eq!(drain(&mut d), [0x1c, 0xfa, 0xaa]);
    }

    #[test]
    fn mouse_commands_and_packets() {
        let (mut d, _rx) = dev();
        let aux = |d: &mut I8042, v: u8| {
            cmd(d, 0xd4);
            data(d, v);
        };
        aux(&mut d, 0xff);
        assert_eq!(drain(&mut d), [0xfa, 0xaa, 0x00]);
        aux(&mut d, 0xf2);
        assert_eq!(drain(&mut d), [0xfa, 0x00]);
        assert!(!d.mouse_event(1, 1, 0, 0), "not streaming yet");
        for r in [200, 100, 80] {
            aux(&mut d, 0xf3);
            aux(&mut d, r);
        }
        assert_eq!(drain(&mut d), [0xfa; 6]);
        aux(&mut d, 0xf2);
        assert_eq!(drain(&mut d), [0xfa, 0x03]);
        aux(&mut d, 0xe8);
        aux(&mut d, 0x03);
        aux(&mut d, 0xe7);
        aux(&mut d, 0xe9);
        assert_eq!(drain(&mut d), [0xfa, 0xfa, 0xfa, 0xfa, 0x10, 0x03, 80]);
        aux(&mut d, 0xe6);
        aux(&mut d, 0xf4);
        assert_eq!(drain(&mut d), [0xfa, 0xfa]);
        assert!(d.mouse_event(5, -3, 1, -1));
        assert_ne!(st(&mut d) & status::AUXB, 0);
        assert_eq!(drain(&mut d), [0x29, 5, 0xfd, 0xff]);
        assert!(d.mouse_event(1000, -1000, 6, 100));
        assert_eq!(drain(&mut d), [0x2e, 0xff, 0x00, 0x07]);
        aux(&mut d, 0xf0);
        assert!(!d.mouse_event(1, 1, 0, 0), "remote mode");
        aux(&mut d, 0xeb);
        assert_eq!(drain(&mut d), [0xfa, 0xfa, 0x08, 0, 0, 0]);
        aux(&mut d, 0xea);
        aux(&mut d, 0xf5);
        aux(&mut d, 0x00);
        assert_eq!(drain(&mut d), [0xfa, 0xfa, 0xfe]);
        // After a reset: plain 3-byte packets.
        aux(&mut d, 0xff);
        aux(&mut d, 0xf4);
        assert_eq!(drain(&mut d), [0xfa, 0xaa, 0x00, 0xfa]);
        d.mouse_event(-2, 2, 0, 3);
        assert_eq!(drain(&mut d), [0x18, 0xfe, 0x02]);
    }

    #[test]
    fn irqs_follow_the_command_byte() {
        let (m, _rx) = mailbox();
        let e1 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let e12 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = I8042::new(
            m,
            Some(e1.try_clone().unwrap()),
            Some(e12.try_clone().unwrap()),
        );
        // Interrupts off: no IRQ for a key.
        cmd(&mut d, 0x60);
        data(&mut d, 0x00);
        d.key_event(0x1c, true);
        assert!(e1.read().is_err());
        // Enabling with a byte waiting raises the line.
        cmd(&mut d, 0x60);
        data(&mut d, ctr::KBD_INT);
        assert!(e1.read().is_ok());
        // One edge per byte: two bytes waiting, one IRQ now, the next after the read.
        assert_eq!(d.read_port(&I8042Port::Data), 0x1c);
        d.key_event(0x1c, false);
        assert_eq!(e1.read().unwrap(), 1);
        assert_eq!(d.read_port(&I8042Port::Data), 0xf0);
        assert!(e1.read().is_ok());
        assert_eq!(d.read_port(&I8042Port::Data), 0x1c);
        assert!(e1.read().is_err());
        // Aux: AUX_INT off → no IRQ 12; on → IRQ 12.
        cmd(&mut d, 0xd4);
        data(&mut d, 0xf4);
        assert!(e12.read().is_err());
        assert!(e1.read().is_err());
        assert_eq!(drain(&mut d), [0xfa]);
        cmd(&mut d, 0x60);
        data(&mut d, ctr::KBD_INT | ctr::AUX_INT);
        let _ = e1.read();
        d.mouse_event(1, 0, 0, 0);
        assert!(e12.read().is_ok());
        assert!(e1.read().is_err());
    }

    #[test]
    fn floods_are_bounded_and_events_stay_whole() {
        let (mut d, _rx) = dev();
        let mut queued = 0;
        for _ in 0..10_000 {
            if d.key_event(0xe075, false) {
                queued += 1;
            }
        }
        assert!(queued < 100, "{queued}");
        let bytes = drain_all(&mut d);
        assert_eq!(bytes.len() % 3, 0);
        assert!(bytes.chunks(3).all(|c| c == [0xe0, 0xf0, 0x75]));
        cmd(&mut d, 0xd4);
        data(&mut d, 0xf4);
        drain_all(&mut d);
        for _ in 0..10_000 {
            d.mouse_event(1, 1, 0, 0);
        }
        let bytes = drain_all(&mut d);
        assert!(bytes.len() <= EVENT_CAP && bytes.len().is_multiple_of(3));
        // Replies are bounded too.
        for _ in 0..10_000 {
            cmd(&mut d, 0x20);
            data(&mut d, 0xee);
        }
        assert!(drain_all(&mut d).len() <= 2 * REPLY_CAP + 1);
    }

    fn drain_all(d: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while st(d) & status::OBF != 0 {
            out.push(d.read_port(&I8042Port::Data));
            assert!(out.len() < 10_000);
        }
        out
    }

    #[test]
    fn reset_line_and_pulses() {
        let (mut d, rx) = dev();
        cmd(&mut d, 0xff);
        cmd(&mut d, 0xd1);
        data(&mut d, 0xdf);
        assert_eq!(exit_of(&rx), None);
        assert!(d.a20());
        cmd(&mut d, 0xd0);
        assert_eq!(drain(&mut d)[0] & 0x03, 0x03);
        cmd(&mut d, 0xd1);
        data(&mut d, 0xdd);
        assert!(!d.a20());
        cmd(&mut d, 0xfe);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reboot));
        cmd(&mut d, 0xf0);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reboot));
        cmd(&mut d, 0xd1);
        data(&mut d, 0xde);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reboot));
        assert_eq!(exit_of(&rx), None);
        d.reset();
        cmd(&mut d, 0x20);
        assert_eq!(drain(&mut d), [ctr::KBD_INT | ctr::AUX_INT]);
    }

    #[test]
    fn bus_ports_share_one_controller() {
        use std::sync::{Arc, Mutex};
        let (m, rx) = mailbox();
        let dev = Arc::new(Mutex::new(I8042::new(m, None, None)));
        let mut dp = I8042Bus {
            dev: dev.clone(),
            port: I8042Port::Data,
        };
        let mut cp = I8042Bus {
            dev,
            port: I8042Port::Command,
        };
        cp.write(0, &[0xaa]);
        let mut s = [0u8; 4];
        cp.read(0, &mut s);
        assert_eq!(s[0] & status::OBF, status::OBF);
        let mut v = [0u8];
        dp.read(0, &mut v);
        assert_eq!(v, [0x55]);
        cp.write(0, &[]);
        cp.write(0, &[0xfe]);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reboot));
    }

    #[test]
    fn random_byte_sequences_never_panic() {
        let (m, _rx) = mailbox();
        let mut d = I8042::new(
            m,
            Some(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            Some(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        );
        let mut r = rvirt_testkit::XorShift(0x8042_8042);
        for _ in 0..200_000 {
            let x = r.next_u64();
            let v = (x >> 8) as u8;
            match x % 7 {
                0 => cmd(&mut d, v),
                1 | 2 => data(&mut d, v),
                3 => {
                    d.read_port(&I8042Port::Data);
                }
                4 => {
                    st(&mut d);
                }
                5 => {
                    d.key_event((x >> 16) as u16, x & 0x100 != 0);
                }
                _ => {
                    d.mouse_event((x >> 16) as i32, (x >> 32) as i32, v, (x >> 48) as i32);
                }
            }
            assert!(d.ctrl_q.len() <= REPLY_CAP);
            assert!(d.kbd.q.events.len() <= EVENT_CAP && d.aux.q.events.len() <= EVENT_CAP);
        }
    }
}
