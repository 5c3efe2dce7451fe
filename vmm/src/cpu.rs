//! The CPU state a partition starts in: 64-bit mode, paging on, CPL 3 with IOPL 3.
//!
//! docs/HOST.md says why: on the development machines KVM runs CPL-0 code through its instruction
//! emulator (1,000x slower, and no SSE), while CPL-3 code runs natively. The same state is valid
//! on any x86 KVM host, so firmware needs no variant per host. No 16- or 32-bit code ever runs.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{BOOT_INFO, GDT, STACK_TOP};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// GDT laid out as Linux's, so the user selectors are Linux's `__USER_DS` (0x2b) and
/// `__USER_CS` (0x33). The pagetable-based KVM of the development machines (docs/HOST.md) runs
/// guest user code on the host's own segments and reads the selector to tell 64-bit from
/// compatibility mode: with Linux's `__USER32_CS` (0x23) the guest faults on its first fetch.
/// Firmware never loads a selector; the table gives the hidden segment state a consistent
/// source should anything look.
const GDT_ENTRIES: [u64; 7] = [
    0,
    0x00cf_9b00_0000_ffff, // 32-bit code, DPL 0
    0x00af_9b00_0000_ffff, // 64-bit code, DPL 0
    0x00cf_9300_0000_ffff, // data, DPL 0
    0x00cf_fb00_0000_ffff, // 32-bit code, DPL 3
    0x00cf_f300_0000_ffff, // data, DPL 3
    0x00af_fb00_0000_ffff, // 64-bit code, DPL 3
];
const USER_DATA_SELECTOR: u16 = (5 << 3) | 3;
const USER_CODE_SELECTOR: u16 = (6 << 3) | 3;

/// Writes the GDT into guest memory.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    let mut bytes = [0u8; GDT_ENTRIES.len() * 8];
    for (chunk, entry) in bytes.chunks_exact_mut(8).zip(GDT_ENTRIES) {
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(GDT))
}

/// Special registers for entry, starting from the vCPU's own (whose task register must be kept:
/// docs/HOST.md explains that a TSS of ours would make `out` fault at CPL 3).
pub fn boot_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: USER_CODE_SELECTOR,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: USER_DATA_SELECTOR,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers for entry: `RIP` at the entry point, `RDI` at the boot info, and `RSP`
/// 8 below a 16-byte boundary, as if `_start` had been called (the compiler's aligned SSE
/// stores fault otherwise). Interrupts off, IOPL 3 so port I/O exits to the VMM.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: STACK_TOP - 8,
        rdi: BOOT_INFO,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    }
}

/// x87 and SSE control state as after `FNINIT` and a reset MXCSR (all exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enters_long_mode_at_cpl3_with_iopl3() {
        let sregs = boot_sregs(kvm_sregs::default(), 0x2000);
        assert_eq!(sregs.cs.dpl, 3);
        assert_eq!(sregs.cs.selector & 3, 3);
        assert_eq!(sregs.ss.dpl, 3);
        assert_eq!((sregs.cs.l, sregs.cs.db), (1, 0));
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_ne!(sregs.cr4 & CR4_OSFXSR, 0);
        assert_eq!(sregs.cr3, 0x2000);
        let regs = boot_regs(0x10_0000);
        assert_eq!(regs.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
        assert_eq!(regs.rflags & (1 << 9), 0, "interrupts off");
        assert_eq!(regs.rsp % 16, 8);
        assert_eq!(regs.rdi, BOOT_INFO);
    }

    #[test]
    fn selectors_match_the_gdt() {
        let sregs = boot_sregs(kvm_sregs::default(), 0);
        let desc = |sel: u16| GDT_ENTRIES[usize::from(sel >> 3)];
        // DPL is bits 45-46, L is bit 53 of a descriptor.
        assert_eq!((desc(sregs.cs.selector) >> 45) & 3, 3);
        assert_eq!((desc(sregs.cs.selector) >> 53) & 1, 1);
        assert_eq!((desc(sregs.ss.selector) >> 45) & 3, 3);
        assert_eq!(u64::from(sregs.gdt.limit) + 1, GDT_ENTRIES.len() as u64 * 8);
    }
}
