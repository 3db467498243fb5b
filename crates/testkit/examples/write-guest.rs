//! Write one of the test guests to a file: `write-guest NAME OUT`.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: write-guest serial_hello|i8042_reboot|acpi_reset|triple_fault|pci_probe|idle|power_button|pvh_info|serial_echo|elf64_hello|bzimage_hello|virtio_blk_rw OUT");
        std::process::exit(2);
    }
    let img = match args[1].as_str() {
        "serial_hello" => rvirt_testkit::serial_hello(),
        "i8042_reboot" => rvirt_testkit::i8042_reboot(),
        "acpi_reset" => rvirt_testkit::acpi_reset(),
        "triple_fault" => rvirt_testkit::triple_fault(),
        "pci_probe" => rvirt_testkit::pci_probe(),
        "idle" => rvirt_testkit::idle(),
        "power_button" => rvirt_testkit::power_button(),
        "pvh_info" => rvirt_testkit::pvh_info(),
        "serial_echo" => rvirt_testkit::serial_echo(),
        "elf64_hello" => rvirt_testkit::elf64_hello(),
        "bzimage_hello" => rvirt_testkit::bzimage_hello(),
        // Expects sector 0 all zero (a fresh raw file), writes sector 1.
        "virtio_blk_rw" => rvirt_testkit::virtio_blk_rw(&[0; 512], 1),
        other => {
            eprintln!("unknown guest {other}");
            std::process::exit(2);
        }
    };
    let img = img.unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    if let Err(e) = std::fs::copy(img.path(), &args[2]) {
        eprintln!("{}: {e}", args[2]);
        std::process::exit(1);
    }
}
