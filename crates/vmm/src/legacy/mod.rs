//! Platform devices a Linux guest expects at fixed I/O ports, each a [`crate::bus::BusDevice`]:
//! COM1 ([`serial`]), the ACPI PM1a block and power button ([`pm`]), the CMOS RTC ([`cmos`]),
//! the reset register and the i8042's reset line ([`reset`]), and rvirt's boot-timer port
//! ([`boot_timer`]). [`install`] puts them on the port I/O bus. [`fw_cfg`], the firmware
//! configuration device for firmware boot, is not installed yet.

pub mod boot_timer;
pub mod cmos;
pub mod debugcon;
pub mod fw_cfg;
pub mod pm;
pub mod reset;
pub mod serial;

use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusError};
use crate::layout::ports;
use crate::messages::Mailbox;

/// The platform devices the VMM keeps handles on.
pub struct Platform {
    pub com1: Arc<Mutex<serial::Com1>>,
    pub pm: Arc<Mutex<pm::Pm>>,
}

/// Puts COM1, the PM block, the CMOS RTC (with the memory size and boot vCPU count of a VM
/// with `ram` bytes and `cpus` vCPUs), the reset register, the i8042 and the boot-timer port on
/// `pio`.
pub fn install(
    pio: &Bus,
    com1: Arc<Mutex<serial::Com1>>,
    pm: Arc<Mutex<pm::Pm>>,
    (ram, cpus): (u64, u32),
    mailbox: &Mailbox,
) -> Result<Platform, BusError> {
    pio.insert(u64::from(ports::COM1), 8, com1.clone())?;
    pio.insert(u64::from(ports::PM1A_EVT), pm::PM_BLOCK_LEN, pm.clone())?;
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
    // The i8042 data port reads 0 (no keys); its command port takes the reset pulse.
    pio.insert(
        u64::from(ports::I8042_DATA),
        1,
        Arc::new(Mutex::new(reset::I8042::data_port())),
    )?;
    pio.insert(
        u64::from(ports::I8042_CMD),
        1,
        Arc::new(Mutex::new(reset::I8042::command_port(mailbox.clone()))),
    )?;
    pio.insert(
        u64::from(ports::BOOT_TIMER),
        1,
        Arc::new(Mutex::new(boot_timer::BootTimer::default())),
    )?;
    Ok(Platform { com1, pm })
}
