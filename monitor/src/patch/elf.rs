//! A small, bounds-checked reader of ELF64 little-endian files, shared by
//! the patch-object parser and the target-program symbol reader. Every read
//! of file data is an `Option`/`Result`: a truncated or garbled file gives
//! an error, never a panic or an out-of-bounds index.

pub const ET_REL: u16 = 1;
pub const ET_EXEC: u16 = 2;
pub const ET_DYN: u16 = 3;
pub const EM_X86_64: u16 = 62;

pub const SHT_PROGBITS: u32 = 1;
pub const SHT_SYMTAB: u32 = 2;
pub const SHT_STRTAB: u32 = 3;
pub const SHT_RELA: u32 = 4;
pub const SHT_NOTE: u32 = 7;
pub const SHT_NOBITS: u32 = 8;
pub const SHT_REL: u32 = 9;
pub const SHT_DYNSYM: u32 = 11;
pub const SHT_INIT_ARRAY: u32 = 14;
pub const SHT_FINI_ARRAY: u32 = 15;
pub const SHT_PREINIT_ARRAY: u32 = 16;
pub const SHT_X86_64_UNWIND: u32 = 0x7000_0001;

pub const SHF_WRITE: u64 = 0x1;
pub const SHF_ALLOC: u64 = 0x2;
pub const SHF_EXECINSTR: u64 = 0x4;
pub const SHF_TLS: u64 = 0x400;

pub const SHN_UNDEF: u16 = 0;
pub const SHN_LORESERVE: u16 = 0xff00;
pub const SHN_ABS: u16 = 0xfff1;
pub const SHN_COMMON: u16 = 0xfff2;
pub const SHN_XINDEX: u16 = 0xffff;

pub const STB_LOCAL: u8 = 0;
pub const STB_WEAK: u8 = 2;

pub const STT_NOTYPE: u8 = 0;
pub const STT_OBJECT: u8 = 1;
pub const STT_FUNC: u8 = 2;
pub const STT_SECTION: u8 = 3;
pub const STT_FILE: u8 = 4;
pub const STT_COMMON: u8 = 5;
pub const STT_TLS: u8 = 6;
pub const STT_GNU_IFUNC: u8 = 10;

pub const SYM_SIZE: u64 = 24;
pub const RELA_SIZE: u64 = 24;
const SHDR_SIZE: u64 = 64;
/// Longest symbol or section name read; longer ones are cut (not an error).
const MAX_NAME: usize = 1024;

// The same bounds-checked readers the kernel profile uses.
pub(crate) use crate::profile::bytes::{slice, u16_at, u32_at, u64_at};

/// The NUL-terminated string at `off` in a string table (at most
/// `MAX_NAME` bytes; invalid UTF-8 is replaced, never an error).
pub fn name_at(table: &[u8], off: u64) -> Option<String> {
    let start = usize::try_from(off).ok()?;
    let rest = table.get(start..)?;
    let window = &rest[..rest.len().min(MAX_NAME)];
    let end = window.iter().position(|&b| b == 0).unwrap_or(window.len());
    Some(String::from_utf8_lossy(&window[..end]).into_owned())
}

/// One section header, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shdr {
    pub name: String,
    pub kind: u32,
    pub flags: u64,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
    pub link: u32,
    pub info: u32,
    pub align: u64,
    pub entsize: u64,
}

/// An ELF64 little-endian x86-64 file: its type and section headers.
#[derive(Debug)]
pub struct Elf<'a> {
    pub data: &'a [u8],
    pub kind: u16,
    pub sections: Vec<Shdr>,
}

/// Why a file is not a usable ELF (the caller adds the file name).
pub type ElfResult<T> = Result<T, String>;

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> ElfResult<Self> {
        if data.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err("not an ELF file (no \\x7fELF magic)".into());
        }
        match data.get(4) {
            Some(2) => {}
            Some(1) => return Err("is a 32-bit ELF (ELFCLASS32); build the patch for x86-64 (no -m32)".into()),
            _ => return Err("unknown ELF class (byte 4); expected ELFCLASS64".into()),
        }
        if data.get(5) != Some(&1) {
            return Err("is not little-endian (ELFDATA2LSB)".into());
        }
        let trunc = || "truncated ELF header".to_string();
        let kind = u16_at(data, 16).ok_or_else(trunc)?;
        let machine = u16_at(data, 18).ok_or_else(trunc)?;
        if machine != EM_X86_64 {
            return Err(format!("e_machine is {machine}, not x86-64 ({EM_X86_64}); build the patch with an x86-64 gcc"));
        }
        let shoff = u64_at(data, 40).ok_or_else(trunc)?;
        let shentsize = u16_at(data, 58).ok_or_else(trunc)?;
        let shnum = u16_at(data, 60).ok_or_else(trunc)?;
        let shstrndx = u16_at(data, 62).ok_or_else(trunc)?;
        if shnum == 0 && shoff != 0 {
            return Err("uses extended section numbering (more than 65279 sections), which is not supported".into());
        }
        if shnum > 0 && u64::from(shentsize) < SHDR_SIZE {
            return Err(format!("section header entries are {shentsize} bytes, less than ELF64's {SHDR_SIZE}"));
        }
        if shstrndx == SHN_XINDEX {
            return Err("uses an extended section-name table index, which is not supported".into());
        }
        let mut raw = Vec::with_capacity(usize::from(shnum));
        for i in 0..u64::from(shnum) {
            let at = i.checked_mul(u64::from(shentsize)).and_then(|o| o.checked_add(shoff));
            let sh = at
                .and_then(|at| slice(data, at, SHDR_SIZE))
                .ok_or_else(|| format!("section header {i} is past the end of the file (truncated?)"))?;
            // All reads below are inside the 64-byte slice just checked.
            let w = |o| u32_at(sh, o).unwrap_or(0);
            let x = |o| u64_at(sh, o).unwrap_or(0);
            raw.push((w(0), Shdr {
                name: String::new(),
                kind: w(4),
                flags: x(8),
                addr: x(16),
                offset: x(24),
                size: x(32),
                link: w(40),
                info: w(44),
                align: x(48),
                entsize: x(56),
            }));
        }
        let names: Option<&[u8]> = match raw.get(usize::from(shstrndx)) {
            Some((_, s)) if shstrndx != 0 => Some(
                slice(data, s.offset, s.size).ok_or_else(|| "the section-name table is past the end of the file".to_string())?,
            ),
            _ => None,
        };
        let sections = raw
            .into_iter()
            .enumerate()
            .map(|(i, (name_off, mut s))| {
                s.name = names.and_then(|t| name_at(t, u64::from(name_off))).unwrap_or_else(|| format!("[section {i}]"));
                s
            })
            .collect();
        Ok(Elf { data, kind, sections })
    }

    /// The file bytes of a section that has them (not SHT_NOBITS).
    pub fn section_data(&self, index: usize) -> ElfResult<&'a [u8]> {
        let s = self.sections.get(index).ok_or_else(|| format!("section index {index} does not exist"))?;
        if s.kind == SHT_NOBITS {
            return Ok(&[]);
        }
        slice(self.data, s.offset, s.size)
            .ok_or_else(|| format!("section {} ({:#x} bytes at offset {:#x}) is past the end of the file (truncated?)", s.name, s.size, s.offset))
    }

    /// The symbols of a SHT_SYMTAB/SHT_DYNSYM section, with their names.
    pub fn symbols(&self, index: usize) -> ElfResult<Vec<Sym>> {
        let s = self.sections.get(index).ok_or_else(|| format!("symbol table index {index} does not exist"))?;
        let table = self.section_data(index)?;
        let strtab = usize::try_from(s.link)
            .ok()
            .filter(|&l| l != 0 && self.sections.get(l).is_some_and(|t| t.kind == SHT_STRTAB))
            .ok_or_else(|| format!("symbol table {} has no string table (sh_link {})", s.name, s.link))?;
        let strings = self.section_data(strtab)?;
        let count = table.len() as u64 / SYM_SIZE;
        let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        for i in 0..count {
            let e = slice(table, i * SYM_SIZE, SYM_SIZE).ok_or_else(|| format!("symbol {i} is truncated"))?;
            let name_off = u32_at(e, 0).unwrap_or(0);
            let info = e.get(4).copied().unwrap_or(0);
            out.push(Sym {
                name: name_at(strings, u64::from(name_off)).ok_or_else(|| format!("symbol {i}: name offset {name_off:#x} is outside the string table"))?,
                bind: info >> 4,
                kind: info & 0xf,
                shndx: u16_at(e, 6).unwrap_or(0),
                value: u64_at(e, 8).unwrap_or(0),
                size: u64_at(e, 16).unwrap_or(0),
            });
        }
        Ok(out)
    }
}

/// One ELF symbol, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sym {
    pub name: String,
    pub bind: u8,
    pub kind: u8,
    pub shndx: u16,
    pub value: u64,
    pub size: u64,
}
