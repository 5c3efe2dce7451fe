//! The boot-info block: what the VMM tells a partition at entry.
//!
//! The VMM writes one [`BootInfo`] into guest RAM and passes its guest-physical address in `RDI`.
//! Firmware runs on identity-mapped page tables, so that address is also a valid pointer.
//! All fields are little-endian and the layout has no padding; `VERSION` changes whenever the
//! layout does.

/// `"KHBI"` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KHBI");
/// Layout version of [`BootInfo`].
pub const VERSION: u16 = 2;
/// Longest argument string the VMM passes.
pub const MAX_ARGS: usize = 1024;
/// Most devices a partition can be given.
pub const MAX_DEVICES: usize = 8;

/// What kind of device a [`DeviceInfo`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DeviceKind {
    /// virtio-rng behind a virtio-mmio transport.
    VirtioRng = 1,
    /// The keyhold secure-channel device behind a virtio-mmio transport.
    SecureChannel = 2,
    /// virtio-vsock (virtio 1.2 section 5.10) behind a virtio-mmio transport.
    VirtioVsock = 3,
}

impl DeviceKind {
    /// Decodes a raw kind; `None` for kinds this build does not know.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::VirtioRng),
            2 => Some(Self::SecureChannel),
            3 => Some(Self::VirtioVsock),
            _ => None,
        }
    }
}

/// One device of the partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DeviceInfo {
    /// A [`DeviceKind`] as `u32`.
    pub kind: u32,
    /// Interrupt line (GSI) the device signals on.
    pub irq: u32,
    /// Guest-physical base of the device's MMIO window.
    pub mmio_base: u64,
    /// Size of the MMIO window in bytes.
    pub mmio_size: u64,
}

/// The boot-info block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BootInfo {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`VERSION`].
    pub version: u16,
    /// How many entries of `devices` are valid.
    pub device_count: u16,
    /// Bytes of guest RAM, starting at guest-physical 0.
    pub ram_size: u64,
    /// The node this partition runs on.
    pub node_id: u32,
    /// This partition's ID, assigned by the operator.
    pub partition_id: u32,
    /// Guest-physical start of the RAM the firmware may use freely (above its image).
    pub free_ram_start: u64,
    /// Guest-physical address of the partition's argument string (UTF-8, not terminated).
    pub args_addr: u64,
    /// Its length in bytes (at most [`MAX_ARGS`]).
    pub args_len: u32,
    /// The TSC frequency in kHz, so firmware can turn `rdtsc` into time (0 if unknown).
    pub tsc_khz: u32,
    /// The partition's devices; the first `device_count` are valid.
    pub devices: [DeviceInfo; MAX_DEVICES],
}

/// Size of [`BootInfo`] in bytes.
pub const SIZE: usize = core::mem::size_of::<BootInfo>();

// The layout is an ABI: no padding may creep in (every byte of it is initialised by `new`).
const _: () = assert!(SIZE == 4 + 2 + 2 + 8 + 4 + 4 + 8 + 8 + 4 + 4 + MAX_DEVICES * 24);
const _: () = assert!(core::mem::size_of::<DeviceInfo>() == 24);

/// Why a boot-info block was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootInfoError {
    /// The magic number is wrong: `RDI` did not point at a boot-info block.
    BadMagic,
    /// The block was written for another layout version.
    BadVersion(u16),
    /// `device_count` exceeds [`MAX_DEVICES`].
    TooManyDevices(u16),
}

impl BootInfo {
    /// A block for a partition with no devices yet.
    pub fn new(ram_size: u64, node_id: u32, partition_id: u32, free_ram_start: u64) -> Self {
        Self {
            magic: MAGIC,
            version: VERSION,
            device_count: 0,
            ram_size,
            node_id,
            partition_id,
            free_ram_start,
            args_addr: 0,
            args_len: 0,
            tsc_khz: 0,
            devices: [DeviceInfo::default(); MAX_DEVICES],
        }
    }

    /// Adds a device; `false` when the table is full.
    pub fn push_device(&mut self, device: DeviceInfo) -> bool {
        let Some(slot) = self.devices.get_mut(usize::from(self.device_count)) else {
            return false;
        };
        *slot = device;
        self.device_count += 1;
        true
    }

    /// Checks that the block is one this build understands.
    pub fn validate(&self) -> Result<(), BootInfoError> {
        if self.magic != MAGIC {
            return Err(BootInfoError::BadMagic);
        }
        if self.version != VERSION {
            return Err(BootInfoError::BadVersion(self.version));
        }
        if usize::from(self.device_count) > MAX_DEVICES {
            return Err(BootInfoError::TooManyDevices(self.device_count));
        }
        Ok(())
    }

    /// The valid device entries.
    pub fn devices(&self) -> &[DeviceInfo] {
        let count = usize::from(self.device_count).min(MAX_DEVICES);
        &self.devices[..count]
    }

    /// The argument string (empty if none or not valid UTF-8).
    pub fn args(&self) -> &str {
        if self.args_addr == 0 || self.args_len as usize > MAX_ARGS {
            return "";
        }
        // SAFETY: the VMM wrote `args_len` bytes at `args_addr` in identity-mapped guest RAM
        // and never changes them; the length is bounded above.
        let bytes = unsafe {
            core::slice::from_raw_parts(self.args_addr as *const u8, self.args_len as usize)
        };
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// The value of `key=value` in the argument string (words separated by spaces).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args().split(' ').find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
    }

    /// `key=N` as a number, or `default` if absent; `None` if present but not a number.
    pub fn arg_u64(&self, key: &str, default: u64) -> Option<u64> {
        match self.arg(key) {
            None => Some(default),
            Some(v) => v.parse().ok(),
        }
    }

    /// `key=NODE:PARTITION:PROCESS` as an endpoint; `None` if absent or malformed.
    pub fn arg_endpoint(&self, key: &str) -> Option<crate::channel::abi::Endpoint> {
        self.arg(key).and_then(crate::channel::abi::Endpoint::parse)
    }

    /// The first device of `kind`, if the partition has one.
    pub fn find_device(&self, kind: DeviceKind) -> Option<&DeviceInfo> {
        self.devices().iter().find(|d| d.kind == kind as u32)
    }

    /// The block's bytes as the VMM writes them into guest RAM.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `BootInfo` is `repr(C)`, made only of integers, and has no padding (asserted
        // above), so all `SIZE` bytes behind `self` are initialised and any view of them is valid.
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u8>(), SIZE) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        let mut info = BootInfo::new(0x0400_0000, 7, 3, 0x20_0000);
        assert!(info.push_device(DeviceInfo {
            kind: DeviceKind::VirtioRng as u32,
            irq: 5,
            mmio_base: 0xd000_0000,
            mmio_size: 0x1000,
        }));
        let bytes = info.as_bytes();
        assert_eq!(bytes.len(), 240);
        assert_eq!(&bytes[0..4], b"KHBI");
        assert_eq!(&bytes[6..8], &1u16.to_le_bytes());
        assert_eq!(&bytes[8..16], &0x0400_0000u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &7u32.to_le_bytes());
        assert_eq!(&bytes[20..24], &3u32.to_le_bytes());
        assert_eq!(&bytes[24..32], &0x20_0000u64.to_le_bytes());
        assert_eq!(&bytes[4..6], &2u16.to_le_bytes());
        assert_eq!(&bytes[48..52], &1u32.to_le_bytes());
        assert_eq!(&bytes[52..56], &5u32.to_le_bytes());
        assert_eq!(&bytes[56..64], &0xd000_0000u64.to_le_bytes());
        assert_eq!(&bytes[64..72], &0x1000u64.to_le_bytes());
    }

    #[test]
    fn validation_rejects_foreign_blocks() {
        let good = BootInfo::new(1 << 20, 0, 1, 0);
        assert_eq!(good.validate(), Ok(()));
        let mut bad = good;
        bad.magic = 0;
        assert_eq!(bad.validate(), Err(BootInfoError::BadMagic));
        let mut bad = good;
        bad.version = 9;
        assert_eq!(bad.validate(), Err(BootInfoError::BadVersion(9)));
        let mut bad = good;
        bad.device_count = 9;
        assert_eq!(bad.validate(), Err(BootInfoError::TooManyDevices(9)));
        assert!(bad.devices().len() <= MAX_DEVICES);
    }

    #[test]
    fn device_table_fills_up() {
        let mut info = BootInfo::new(1 << 20, 0, 1, 0);
        for _ in 0..MAX_DEVICES {
            assert!(info.push_device(DeviceInfo::default()));
        }
        assert!(!info.push_device(DeviceInfo::default()));
        assert_eq!(info.devices().len(), MAX_DEVICES);
        assert_eq!(info.find_device(DeviceKind::SecureChannel), None);
    }
}
