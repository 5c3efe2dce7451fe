//! Firmware images: checked, then loaded into guest RAM with linux-loader.
//!
//! linux-loader checks the ELF magic, byte order and header sizes; everything else that makes an
//! image unfit for a keyhold partition is checked here first, so that the operator learns what
//! is wrong with the file rather than that a copy failed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr};
use linux_loader::loader::{Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::layout::FIRMWARE_BASE;

/// Largest firmware file accepted, so that a wrong path (a disk image, say) fails at once.
pub const MAX_FIRMWARE_FILE: u64 = 64 << 20;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;

/// Why a firmware image was refused.
#[derive(Debug, Error)]
pub enum FirmwareError {
    /// Reading the file failed.
    #[error("cannot read it: {0}")]
    Io(#[from] std::io::Error),
    /// A directory, device or other non-file.
    #[error("it is not a regular file")]
    NotAFile,
    /// The file is larger than [`MAX_FIRMWARE_FILE`].
    #[error("it is {size} bytes, over the {MAX_FIRMWARE_FILE}-byte limit for firmware")]
    TooLarge {
        /// File size in bytes.
        size: u64,
    },
    /// No ELF magic, or too short to hold an ELF header.
    #[error("it is not an ELF file")]
    NotElf,
    /// A 32-bit ELF.
    #[error("it is a 32-bit ELF; keyhold boots 64-bit (ELF64) firmware only")]
    Not64Bit,
    /// A big-endian ELF.
    #[error("it is a big-endian ELF; x86-64 firmware is little-endian")]
    BigEndian,
    /// Built for another CPU.
    #[error("it is built for ELF machine {0}, not x86-64 (62)")]
    WrongMachine(u16),
    /// A shared object, relocatable or core file.
    #[error("it is an ELF of type {0}, not a static executable (ET_EXEC)")]
    NotExecutable(u16),
    /// Has an interpreter or dynamic section.
    #[error("it is dynamically linked (it has a {0} segment); firmware must be static")]
    Dynamic(&'static str),
    /// The program-header table is malformed.
    #[error("its program-header table is malformed (entry size {entsize}, offset {offset:#x})")]
    BadProgramHeaders {
        /// `e_phentsize`.
        entsize: u16,
        /// `e_phoff`.
        offset: u64,
    },
    /// No PT_LOAD segment with contents.
    #[error("it has no loadable segment")]
    NoSegments,
    /// A segment whose virtual and physical addresses differ: the identity map cannot honour it.
    #[error("segment {index} has virtual address {vaddr:#x} but physical address {paddr:#x}; firmware must be linked with them equal")]
    NotIdentityMapped {
        /// Index in the program-header table.
        index: usize,
        /// `p_vaddr`.
        vaddr: u64,
        /// `p_paddr`.
        paddr: u64,
    },
    /// A segment outside the RAM firmware may occupy.
    #[error("segment {index} ({start:#x}..{end:#x}) lies outside guest RAM available to firmware ({FIRMWARE_BASE:#x}..{ram_end:#x})")]
    SegmentOutsideRam {
        /// Index in the program-header table.
        index: usize,
        /// First byte of the segment.
        start: u64,
        /// One past its last byte (saturated on overflow).
        end: u64,
        /// RAM size.
        ram_end: u64,
    },
    /// A segment whose file bytes lie past the end of the file.
    #[error("segment {index} claims file bytes past the end of the file")]
    TruncatedSegment {
        /// Index in the program-header table.
        index: usize,
    },
    /// The entry point is in no loaded segment.
    #[error("its entry point {0:#x} is not inside any loaded segment")]
    EntryOutsideImage(u64),
    /// linux-loader refused or failed to copy the image.
    #[error("loading it failed: {0}")]
    Load(#[from] linux_loader::loader::Error),
}

/// A checked image: where it runs and where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLayout {
    /// The entry point (`e_entry`).
    pub entry: u64,
    /// One past the highest byte any segment occupies in guest RAM.
    pub end: u64,
}

/// Checks an image against a partition with `ram_size` bytes of RAM.
pub fn inspect<R: Read + Seek>(image: &mut R, ram_size: u64) -> Result<ImageLayout, FirmwareError> {
    let size = image.seek(SeekFrom::End(0))?;
    if size > MAX_FIRMWARE_FILE {
        return Err(FirmwareError::TooLarge { size });
    }
    let header = read_header(image, size)?;
    let phdrs = read_program_headers(image, &header, size)?;
    // Say "dynamically linked" before "wrong type": a PIE has both, and the first is the cause.
    for ph in &phdrs {
        match ph.p_type {
            PT_INTERP => return Err(FirmwareError::Dynamic("PT_INTERP")),
            PT_DYNAMIC => return Err(FirmwareError::Dynamic("PT_DYNAMIC")),
            _ => {}
        }
    }
    if header.e_type != ET_EXEC {
        return Err(FirmwareError::NotExecutable(header.e_type));
    }

    let mut end = None;
    let mut entry_found = false;
    for (index, ph) in phdrs.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let seg_end = check_segment(index, ph, ram_size, size)?;
        entry_found |= ph.p_filesz > 0 && (ph.p_paddr..seg_end).contains(&header.e_entry);
        end = end.max(Some(seg_end));
    }
    let end = end.ok_or(FirmwareError::NoSegments)?;
    if !entry_found {
        return Err(FirmwareError::EntryOutsideImage(header.e_entry));
    }
    Ok(ImageLayout { entry: header.e_entry, end })
}

/// A firmware file, opened and checked, ready to load.
#[derive(Debug)]
pub struct Firmware {
    file: File,
    layout: ImageLayout,
}

impl Firmware {
    /// Opens and checks the image at `path` for a partition with `ram_size` bytes of RAM.
    pub fn open(path: &Path, ram_size: u64) -> Result<Self, FirmwareError> {
        let mut file = File::open(path)?;
        if !file.metadata()?.is_file() {
            return Err(FirmwareError::NotAFile);
        }
        let layout = inspect(&mut file, ram_size)?;
        Ok(Self { file, layout })
    }

    /// Copies the image's segments into guest memory.
    pub fn load(mut self, mem: &GuestMemoryMmap) -> Result<ImageLayout, FirmwareError> {
        load_checked(&mut self.file, mem)?;
        Ok(self.layout)
    }
}

/// Copies an image that [`inspect`] accepted into guest memory.
fn load_checked<R: Read + Seek + ReadVolatile>(
    image: &mut R,
    mem: &GuestMemoryMmap,
) -> Result<(), FirmwareError> {
    Elf::load(mem, None, image, Some(GuestAddress(FIRMWARE_BASE)))?;
    Ok(())
}

fn read_header<R: Read + Seek>(image: &mut R, size: u64) -> Result<Elf64_Ehdr, FirmwareError> {
    let mut header = Elf64_Ehdr::default();
    if size < std::mem::size_of::<Elf64_Ehdr>() as u64 {
        return Err(FirmwareError::NotElf);
    }
    image.seek(SeekFrom::Start(0))?;
    image.read_exact(header.as_mut_slice())?;
    let ident = header.e_ident;
    if ident[..4] != ELF_MAGIC {
        return Err(FirmwareError::NotElf);
    }
    if ident[EI_CLASS] != ELFCLASS64 {
        return Err(FirmwareError::Not64Bit);
    }
    if ident[EI_DATA] != ELFDATA2LSB {
        return Err(FirmwareError::BigEndian);
    }
    if header.e_machine != EM_X86_64 {
        return Err(FirmwareError::WrongMachine(header.e_machine));
    }
    Ok(header)
}

fn read_program_headers<R: Read + Seek>(
    image: &mut R,
    header: &Elf64_Ehdr,
    size: u64,
) -> Result<Vec<Elf64_Phdr>, FirmwareError> {
    let entsize = std::mem::size_of::<Elf64_Phdr>() as u64;
    let bad =
        FirmwareError::BadProgramHeaders { entsize: header.e_phentsize, offset: header.e_phoff };
    // e_phnum is a u16, so the table is at most 64 K entries and the allocation is bounded.
    let table_end = u64::from(header.e_phnum)
        .checked_mul(entsize)
        .and_then(|len| len.checked_add(header.e_phoff));
    let fits = table_end.is_some_and(|end| end <= size);
    if u64::from(header.e_phentsize) != entsize || header.e_phoff < 64 || !fits {
        return Err(bad);
    }
    image.seek(SeekFrom::Start(header.e_phoff))?;
    let mut phdrs = vec![Elf64_Phdr::default(); usize::from(header.e_phnum)];
    for ph in &mut phdrs {
        image.read_exact(ph.as_mut_slice())?;
    }
    Ok(phdrs)
}

/// Checks one PT_LOAD segment; returns one past its last byte in guest RAM.
fn check_segment(
    index: usize,
    ph: &Elf64_Phdr,
    ram_size: u64,
    file_size: u64,
) -> Result<u64, FirmwareError> {
    if ph.p_vaddr != ph.p_paddr {
        return Err(FirmwareError::NotIdentityMapped {
            index,
            vaddr: ph.p_vaddr,
            paddr: ph.p_paddr,
        });
    }
    let end = ph.p_paddr.checked_add(ph.p_memsz);
    if ph.p_paddr < FIRMWARE_BASE || end.is_none_or(|end| end > ram_size) {
        return Err(FirmwareError::SegmentOutsideRam {
            index,
            start: ph.p_paddr,
            end: end.unwrap_or(u64::MAX),
            ram_end: ram_size,
        });
    }
    let file_end = ph.p_offset.checked_add(ph.p_filesz);
    if ph.p_filesz > ph.p_memsz || file_end.is_none_or(|end| end > file_size) {
        return Err(FirmwareError::TruncatedSegment { index });
    }
    Ok(end.unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const RAM: u64 = 16 << 20;

    fn hello() -> Vec<u8> {
        std::fs::read(firmware_fixtures::path("hello")).expect("hello fixture is built")
    }

    fn inspect_bytes(bytes: Vec<u8>) -> Result<ImageLayout, FirmwareError> {
        inspect(&mut Cursor::new(bytes), RAM)
    }

    /// Offset of program header `i` in `image`.
    fn phdr_offset(image: &[u8], i: usize) -> usize {
        let phoff = u64::from_le_bytes(image[32..40].try_into().unwrap()) as usize;
        phoff + i * 56
    }

    fn set_u64(image: &mut [u8], at: usize, value: u64) {
        image[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn loads_the_hello_fixture() {
        let image = hello();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let mut cursor = Cursor::new(image.clone());
        let layout = inspect(&mut cursor, RAM).unwrap();
        load_checked(&mut cursor, &mem).unwrap();
        assert_eq!(layout.entry, FIRMWARE_BASE);
        assert!(layout.end > FIRMWARE_BASE && layout.end < RAM);
        // The first segment's first bytes are in guest RAM at its physical address.
        let at = phdr_offset(&image, 0);
        let offset = u64::from_le_bytes(image[at + 8..at + 16].try_into().unwrap()) as usize;
        let mut loaded = [0u8; 16];
        mem.read_slice(&mut loaded, GuestAddress(FIRMWARE_BASE)).unwrap();
        assert_eq!(loaded, image[offset..offset + 16]);
    }

    #[test]
    fn refuses_what_is_not_a_64_bit_static_x86_executable() {
        assert!(matches!(
            inspect_bytes(b"#!/bin/sh\necho hi\n".to_vec()),
            Err(FirmwareError::NotElf)
        ));
        assert!(matches!(inspect_bytes(Vec::new()), Err(FirmwareError::NotElf)));
        let mut image = hello();
        image[EI_CLASS] = 1;
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::Not64Bit)));
        let mut image = hello();
        image[EI_DATA] = 2;
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::BigEndian)));
        let mut image = hello();
        image[18] = 183; // EM_AARCH64
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::WrongMachine(183))));
        let mut image = hello();
        image[16] = 3; // ET_DYN
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::NotExecutable(3))));
        let pie = std::fs::read("/bin/true").expect("/bin/true exists");
        assert!(matches!(inspect_bytes(pie), Err(FirmwareError::Dynamic(_))));
        let mut image = hello();
        let at = phdr_offset(&image, 0);
        image[at..at + 4].copy_from_slice(&PT_INTERP.to_le_bytes());
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::Dynamic("PT_INTERP"))));
    }

    #[test]
    fn refuses_segments_outside_ram() {
        let mut image = hello();
        let at = phdr_offset(&image, 0);
        set_u64(&mut image, at + 16, RAM - 0x10); // p_vaddr
        set_u64(&mut image, at + 24, RAM - 0x10); // p_paddr
        let err = inspect_bytes(image).unwrap_err();
        assert!(matches!(err, FirmwareError::SegmentOutsideRam { index: 0, .. }), "{err}");

        let mut image = hello();
        set_u64(&mut image, at + 16, 0x1000);
        set_u64(&mut image, at + 24, 0x1000);
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::SegmentOutsideRam { .. })));

        let mut image = hello();
        set_u64(&mut image, at + 40, u64::MAX); // p_memsz: wraps
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::SegmentOutsideRam { .. })));
    }

    #[test]
    fn refuses_inconsistent_headers() {
        let mut image = hello();
        let at = phdr_offset(&image, 0);
        set_u64(&mut image, at + 16, FIRMWARE_BASE + 0x1000);
        assert!(matches!(
            inspect_bytes(image),
            Err(FirmwareError::NotIdentityMapped { index: 0, .. })
        ));

        let mut image = hello();
        set_u64(&mut image, at + 32, 1 << 30); // p_filesz past EOF (and past p_memsz)
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::TruncatedSegment { index: 0 })));

        let mut image = hello();
        set_u64(&mut image, 24, 0x5000_0000); // e_entry
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::EntryOutsideImage(0x5000_0000))));

        let mut image = hello();
        image[54] = 32; // e_phentsize
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::BadProgramHeaders { .. })));

        let mut image = hello();
        image[56..58].copy_from_slice(&u16::MAX.to_le_bytes()); // e_phnum past EOF
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::BadProgramHeaders { .. })));

        let mut image = hello();
        let len = image.len();
        image.truncate(len.min(phdr_offset(&image, 1)));
        assert!(inspect_bytes(image).is_err());
    }

    #[test]
    fn refuses_oversized_files() {
        let mut image = hello();
        image.resize(MAX_FIRMWARE_FILE as usize + 1, 0);
        assert!(matches!(inspect_bytes(image), Err(FirmwareError::TooLarge { .. })));
    }

    #[test]
    fn randomly_damaged_images_are_refused_or_loaded_never_panic() {
        let image = hello();
        let mut state = 0x1234_5678_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3_000 {
            let mut damaged = image.clone();
            // Damage the headers, where the parsing is: a few random bytes of the first 512.
            for _ in 0..1 + next() % 4 {
                let at = (next() % 512) as usize;
                damaged[at] = next() as u8;
            }
            let _ = inspect_bytes(damaged);
        }
    }
}
