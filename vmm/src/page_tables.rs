//! Identity page tables for 64-bit entry.
//!
//! The low 4 GiB are identity-mapped with user-accessible entries (the U bit), because firmware
//! runs at CPL 3 (docs/HOST.md). The first 2 MiB use 4 KiB pages so that page 0 can be read-only:
//! a null-pointer write faults. Page 0 cannot be unmapped: the task register KVM gives a new vCPU
//! has base 0, and KVM reads that TSS's I/O bitmap through the guest page tables on every port
//! access, so an unmapped page 0 turns the first `out` into a triple fault (seen on the
//! development machines). Zeroed, the bitmap allows every port. The rest uses 2 MiB pages.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{IDENTITY_MAP_SIZE, PAGE_TABLES};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const FLAGS: u64 = PRESENT | WRITABLE | USER;

const PAGE: u64 = 0x1000;
const LARGE_PAGE: u64 = 0x20_0000;
const ENTRIES: usize = 512;
const DIRECTORIES: usize = (IDENTITY_MAP_SIZE / (1 << 30)) as usize;

const PML4: u64 = PAGE_TABLES;
const PDPT: u64 = PML4 + PAGE;
const FIRST_PD: u64 = PDPT + PAGE;
const FIRST_PT: u64 = FIRST_PD + DIRECTORIES as u64 * PAGE;
/// One past the last page-table page.
pub const PAGE_TABLES_END: u64 = FIRST_PT + PAGE;

const _: () = assert!(PAGE_TABLES_END <= crate::layout::STACK_BOTTOM);
const _: () = assert!(crate::layout::GDT + 0x100 <= PAGE_TABLES);

/// One page of page-table entries and the guest-physical address it belongs at.
pub struct TablePage {
    /// Guest-physical address of the page.
    pub addr: u64,
    /// Its 512 entries.
    pub entries: [u64; ENTRIES],
}

/// All page-table pages; the first is the PML4 (the CR3 value).
pub fn pages() -> Vec<TablePage> {
    let mut pml4 = [0u64; ENTRIES];
    pml4[0] = PDPT | FLAGS;

    let mut pdpt = [0u64; ENTRIES];
    for (i, entry) in pdpt.iter_mut().take(DIRECTORIES).enumerate() {
        *entry = (FIRST_PD + i as u64 * PAGE) | FLAGS;
    }

    let mut pages =
        vec![TablePage { addr: PML4, entries: pml4 }, TablePage { addr: PDPT, entries: pdpt }];
    for dir in 0..DIRECTORIES {
        let mut pd = [0u64; ENTRIES];
        for (i, entry) in pd.iter_mut().enumerate() {
            let base = (dir * ENTRIES + i) as u64 * LARGE_PAGE;
            *entry = base | FLAGS | HUGE;
        }
        if dir == 0 {
            pd[0] = FIRST_PT | FLAGS;
        }
        pages.push(TablePage { addr: FIRST_PD + dir as u64 * PAGE, entries: pd });
    }

    let mut pt = [0u64; ENTRIES];
    for (i, entry) in pt.iter_mut().enumerate() {
        *entry = (i as u64 * PAGE) | FLAGS;
    }
    pt[0] = PRESENT | USER;
    pages.push(TablePage { addr: FIRST_PT, entries: pt });
    pages
}

/// Writes the tables into guest memory and returns the CR3 value.
pub fn write(mem: &GuestMemoryMmap) -> Result<u64, GuestMemoryError> {
    for page in pages() {
        let mut bytes = [0u8; PAGE as usize];
        for (chunk, entry) in bytes.chunks_exact_mut(8).zip(page.entries) {
            chunk.copy_from_slice(&entry.to_le_bytes());
        }
        mem.write_slice(&bytes, GuestAddress(page.addr))?;
    }
    Ok(PML4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{BOOT_INFO, FIRMWARE_BASE, MMIO_BASE, STACK_BOTTOM};

    /// Walks the tables as the CPU would: the physical address and whether every level allows
    /// user access and writes, or `None` if the address is not mapped.
    fn translate(pages: &[TablePage], virt: u64) -> Option<(u64, bool, bool)> {
        let lookup = |table: u64, index: u64| -> u64 {
            let page = pages.iter().find(|p| p.addr == table).expect("table exists");
            page.entries[index as usize]
        };
        if virt >> 48 != 0 {
            return None;
        }
        let mut table = PML4;
        let mut user = true;
        let mut writable = true;
        for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
            let entry = lookup(table, (virt >> shift) & 0x1ff);
            if entry & PRESENT == 0 {
                return None;
            }
            user &= entry & USER != 0;
            writable &= entry & WRITABLE != 0;
            let frame = entry & 0x000f_ffff_ffff_f000;
            if level == 2 && entry & HUGE != 0 {
                return Some((frame + (virt & (LARGE_PAGE - 1)), user, writable));
            }
            if level == 3 {
                return Some((frame + (virt & (PAGE - 1)), user, writable));
            }
            table = frame;
        }
        None
    }

    #[test]
    fn low_four_gib_are_identity_mapped_for_user_mode() {
        let pages = pages();
        for addr in [
            BOOT_INFO,
            STACK_BOTTOM,
            FIRMWARE_BASE,
            FIRMWARE_BASE + 0x1234,
            0x1f_ffff,
            0x20_0000,
            0x1234_5678,
            MMIO_BASE,
            IDENTITY_MAP_SIZE - 1,
        ] {
            assert_eq!(translate(&pages, addr), Some((addr, true, true)), "{addr:#x}");
        }
    }

    #[test]
    fn page_zero_is_read_only() {
        let pages = pages();
        for addr in [0, 8, 0xfff] {
            assert_eq!(translate(&pages, addr), Some((addr, true, false)), "{addr:#x}");
        }
    }

    #[test]
    fn everything_above_four_gib_is_unmapped() {
        let pages = pages();
        for addr in [IDENTITY_MAP_SIZE, 0x80_0000_0000, u64::MAX] {
            assert_eq!(translate(&pages, addr), None, "{addr:#x}");
        }
    }

    #[test]
    fn tables_fit_below_the_stack() {
        let pages = pages();
        assert_eq!(pages[0].addr, PML4);
        assert!(pages.iter().all(|p| p.addr >= PAGE_TABLES && p.addr + PAGE <= PAGE_TABLES_END));
    }
}
