//! The guest-physical memory map of a partition.
//!
//! ```text
//! 0x0000_0000  page 0: zero and read-only (see page_tables), so null-pointer writes fault
//! 0x0000_1000  boot-info block (RDI at entry), the argument string at 0x1100, the GDT at 0x1800
//! 0x0000_2000  page tables: PML4, PDPT, 4 page directories, 1 page table
//! 0x0001_0000  stack, growing down from 0x0010_0000
//! 0x0010_0000  firmware image (FIRMWARE_BASE), then free RAM up to the RAM size
//! 0xd000_0000  MMIO window for virtio devices
//! 0x1_0000_0000 end of the identity map: nothing above is mapped
//! ```
//! Guest RAM starts at 0 and may reach [`MAX_RAM`]; everything between the end of RAM and 4 GiB
//! is mapped too, so that a stray access exits to the VMM as MMIO and is reported.

/// Where the boot-info block goes.
pub const BOOT_INFO: u64 = 0x1000;
/// Where the partition's argument string goes (at most `boot_info::MAX_ARGS` bytes).
pub const BOOT_ARGS: u64 = 0x1100;
/// Where the GDT goes (same page as the boot info, which is much smaller than 0x100 bytes).
pub const GDT: u64 = 0x1800;
/// First page-table page (the PML4).
pub const PAGE_TABLES: u64 = 0x2000;
/// Lowest address of the stack.
pub const STACK_BOTTOM: u64 = 0x1_0000;
/// One past the highest byte of the stack.
pub const STACK_TOP: u64 = 0x10_0000;
/// Lowest address a firmware segment may occupy.
pub const FIRMWARE_BASE: u64 = 0x10_0000;
/// Base of the MMIO window for virtio devices.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of the MMIO window.
pub const MMIO_SIZE: u64 = 0x1000_0000;
/// Size of the identity map built by `page_tables`.
pub const IDENTITY_MAP_SIZE: u64 = 0x1_0000_0000;

/// Smallest partition RAM: room for the low pages, stack and a 1 MiB image.
pub const MIN_RAM: u64 = 2 << 20;
/// Largest partition RAM: RAM must end below the MMIO window.
pub const MAX_RAM: u64 = 3 << 30;

const _: () = assert!(MAX_RAM <= MMIO_BASE);
const _: () = assert!(BOOT_INFO + guest_agent::boot_info::SIZE as u64 <= BOOT_ARGS);
const _: () = assert!(BOOT_ARGS + guest_agent::boot_info::MAX_ARGS as u64 <= GDT);
const _: () = assert!(MMIO_BASE + MMIO_SIZE <= IDENTITY_MAP_SIZE);
const _: () = assert!(STACK_TOP <= FIRMWARE_BASE && FIRMWARE_BASE < MIN_RAM);
