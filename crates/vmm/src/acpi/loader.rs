//! The `etc/table-loader` command file of QEMU's ACPI linker/loader interface.
//!
//! Firmware (OVMF's AcpiPlatformDxe, SeaBIOS's romfile loader) reads this fw_cfg file and
//! executes its commands in order: it copies each named fw_cfg file into memory it allocates,
//! adds the address of one file to pointer fields inside another, and recomputes checksums.
//! The tables can therefore be built without knowing where they will live.
//!
//! Every command is 128 bytes, little-endian: a `u32` command type, then its arguments,
//! zero-padded. File names are NUL-padded to 56 bytes (at most 55 bytes of name).

/// Size of one command.
pub const ENTRY_LEN: usize = 128;
/// Size of a file name field (the name plus at least one NUL).
pub const NAME_LEN: usize = 56;

/// Command type ALLOCATE: `{name[56], le32 align, u8 zone}`.
pub const CMD_ALLOCATE: u32 = 1;
/// Command type ADD_POINTER: `{pointer file[56], pointee file[56], le32 offset, u8 size}`.
pub const CMD_ADD_POINTER: u32 = 2;
/// Command type ADD_CHECKSUM: `{name[56], le32 result offset, le32 start, le32 length}`.
pub const CMD_ADD_CHECKSUM: u32 = 3;

/// Allocation zone: anywhere in RAM below 4 GiB (firmware's choice).
pub const ZONE_HIGH: u8 = 1;
/// Allocation zone: the BIOS F segment (0xE0000–0xFFFFF), where a BIOS looks for the RSDP.
pub const ZONE_FSEG: u8 = 2;

/// A loader command file under construction. The methods panic on arguments no caller in this
/// crate passes (names too long, bad sizes): they are built from constants, never from guest
/// data.
#[derive(Debug, Default, Clone)]
pub struct Loader {
    bytes: Vec<u8>,
}

fn name_field(name: &str) -> [u8; NAME_LEN] {
    assert!(
        !name.is_empty() && name.len() < NAME_LEN && !name.contains('\0'),
        "bad fw_cfg file name {name:?}"
    );
    let mut f = [0u8; NAME_LEN];
    f[..name.len()].copy_from_slice(name.as_bytes());
    f
}

impl Loader {
    /// An empty command file.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, cmd: u32, args: &[u8]) {
        let mut e = [0u8; ENTRY_LEN];
        e[0..4].copy_from_slice(&cmd.to_le_bytes());
        e[4..4 + args.len()].copy_from_slice(args);
        self.bytes.extend_from_slice(&e);
    }

    /// Copy fw_cfg file `file` into memory aligned to `align` (a power of two, at most one
    /// page: OVMF refuses more) in `zone`.
    pub fn allocate(&mut self, file: &str, align: u32, zone: u8) {
        assert!(
            align.is_power_of_two() && align <= 4096,
            "alignment {align}"
        );
        let mut a = Vec::with_capacity(NAME_LEN + 5);
        a.extend_from_slice(&name_field(file));
        a.extend_from_slice(&align.to_le_bytes());
        a.push(zone);
        self.push(CMD_ALLOCATE, &a);
    }

    /// Add the address of `pointee` to the `size`-byte little-endian field at `offset` in
    /// `pointer` (which holds an offset into `pointee`).
    pub fn add_pointer(&mut self, pointer: &str, pointee: &str, offset: u32, size: u8) {
        assert!(matches!(size, 1 | 2 | 4 | 8), "pointer size {size}");
        let mut a = Vec::with_capacity(2 * NAME_LEN + 5);
        a.extend_from_slice(&name_field(pointer));
        a.extend_from_slice(&name_field(pointee));
        a.extend_from_slice(&offset.to_le_bytes());
        a.push(size);
        self.push(CMD_ADD_POINTER, &a);
    }

    /// Make bytes `start..start + len` of `file` sum to zero by setting the byte at `result`
    /// (inside that range, and zero in the file: OVMF stores the checksum of the range
    /// including the old value of that byte, SeaBIOS subtracts it; both agree only then).
    pub fn add_checksum(&mut self, file: &str, result: u32, start: u32, len: u32) {
        let mut a = Vec::with_capacity(NAME_LEN + 12);
        a.extend_from_slice(&name_field(file));
        a.extend_from_slice(&result.to_le_bytes());
        a.extend_from_slice(&start.to_le_bytes());
        a.extend_from_slice(&len.to_le_bytes());
        self.push(CMD_ADD_CHECKSUM, &a);
    }

    /// The command file.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_the_qemu_layout() {
        let mut l = Loader::new();
        l.allocate("etc/acpi/tables", 64, ZONE_HIGH);
        l.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 0x18, 8);
        l.add_checksum("etc/acpi/rsdp", 8, 0, 20);
        let b = l.into_bytes();
        assert_eq!(b.len(), 3 * ENTRY_LEN);
        let (a, p, c) = (&b[..128], &b[128..256], &b[256..]);
        assert_eq!(a[..4], 1u32.to_le_bytes());
        assert_eq!(&a[4..19], b"etc/acpi/tables");
        assert!(a[19..60].iter().all(|&x| x == 0));
        assert_eq!(a[60..64], 64u32.to_le_bytes());
        assert_eq!(a[64], ZONE_HIGH);
        assert!(a[65..].iter().all(|&x| x == 0));
        assert_eq!(p[..4], 2u32.to_le_bytes());
        assert_eq!(&p[4..17], b"etc/acpi/rsdp");
        assert_eq!(&p[60..75], b"etc/acpi/tables");
        assert_eq!(p[116..120], 0x18u32.to_le_bytes());
        assert_eq!(p[120], 8);
        assert!(p[121..].iter().all(|&x| x == 0));
        assert_eq!(c[..4], 3u32.to_le_bytes());
        assert_eq!(c[60..64], 8u32.to_le_bytes());
        assert_eq!(c[64..68], 0u32.to_le_bytes());
        assert_eq!(c[68..72], 20u32.to_le_bytes());
    }

    #[test]
    #[should_panic(expected = "bad fw_cfg file name")]
    fn a_56_byte_name_has_no_room_for_its_nul() {
        Loader::new().allocate(&"x".repeat(NAME_LEN), 16, ZONE_HIGH);
    }
}
