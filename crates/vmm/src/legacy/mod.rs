//! Platform devices a guest expects at fixed I/O ports, each a [`crate::bus::BusDevice`]:
//! COM1 ([`serial`]), the ACPI PM block with the power button, PM timer, GPE0 and SMI
//! registers, and the APM ports ([`pm`]), the CMOS RTC ([`cmos`]), the reset register
//! ([`reset`]), the i8042 keyboard controller with keyboard and mouse ([`i8042`]), and rvirt's
//! boot-timer port ([`boot_timer`]). [`install`] puts them on the port I/O bus. For firmware
//! boot, not installed yet: [`fw_cfg`] (port I/O) and [`pflash`] (the MMIO variable store).

pub mod boot_timer;
pub mod cmos;
pub mod debugcon;
pub mod fw_cfg;
pub mod i8042;
pub mod pflash;
pub mod pm;
pub mod reset;
pub mod serial;

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError};
use crate::layout::ports;
use crate::messages::Mailbox;

/// The platform devices the VMM keeps handles on.
pub struct Platform {
    pub com1: Arc<Mutex<serial::Com1>>,
    pub pm: Arc<Mutex<pm::Pm>>,
    /// For host keyboard/mouse input ([`i8042::I8042::key_event`], `mouse_event`) and LEDs.
    pub i8042: Arc<Mutex<i8042::I8042>>,
}

/// Puts COM1, the PM block, the APM ports, the CMOS RTC (with the memory size and boot vCPU
/// count of a VM with `ram` bytes and `cpus` vCPUs), the reset register, the i8042 (raising
/// `kbd_irqs`: IRQ 1 and IRQ 12) and the boot-timer port on `pio`.
pub fn install(
    pio: &Bus,
    com1: Arc<Mutex<serial::Com1>>,
    pm: Arc<Mutex<pm::Pm>>,
    (ram, cpus): (u64, u32),
    kbd_irqs: (EventFd, EventFd),
    mailbox: &Mailbox,
) -> Result<Platform, BusError> {
    pio.insert(u64::from(ports::COM1), 8, com1.clone())?;
    pio.insert(u64::from(ports::PM1A_EVT), pm::PM_BLOCK_LEN, pm.clone())?;
    pio.insert(
        u64::from(ports::APM_CNT),
        pm::APM_LEN,
        Arc::new(Mutex::new(pm::Apm::default())),
    )?;
    pio.insert(
        u64::from(ports::CMOS_INDEX),
        2,
        Arc::new(Mutex::new(cmos::Cmos::new(ram, cpus))),
    )?;
    pio.insert(
        u64::from(ports::RESET),
        1,
        Arc::new(Mutex::new(reset::ResetControl::new(mailbox.clone()))),
    )?;
    // Two one-byte ranges on one controller: 0x61 in between is the PIT's speaker port,
    // which KVM's in-kernel PIT answers, and must not be decoded here.
    let (irq1, irq12) = kbd_irqs;
    let kbc = Arc::new(Mutex::new(i8042::I8042::new(
        mailbox.clone(),
        Some(irq1),
        Some(irq12),
    )));
    for (port, which) in [
        (ports::I8042_DATA, i8042::I8042Port::Data),
        (ports::I8042_CMD, i8042::I8042Port::Command),
    ] {
        let dev = i8042::I8042Bus {
            dev: kbc.clone(),
            port: which,
        };
        pio.insert(u64::from(port), 1, Arc::new(Mutex::new(dev)))?;
    }
    pio.insert(
        u64::from(ports::BOOT_TIMER),
        1,
        Arc::new(Mutex::new(boot_timer::BootTimer::default())),
    )?;
    Ok(Platform {
        com1,
        pm,
        i8042: kbc,
    })
}
