//! A small, bounds-checked reader of the vmlinux ELF64 headers: sections,
//! load segments, the GNU build-id note, and the mapping between file
//! offsets and kernel virtual addresses.
use super::bytes::{cstr_at, hex, slice, u16_at, u32_at, u64_at};
use super::error::ProfileError;

const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const SHT_NOBITS: u32 = 8;
const SHT_NOTE: u32 = 7;
/// Section flags: allocated at run time / executable.
pub const SHF_ALLOC: u64 = 0x2;
pub const SHF_EXECINSTR: u64 = 0x4;
const NT_GNU_BUILD_ID: u32 = 3;
/// More would be a garbled header (vmlinux has ~40 sections, 5 segments).
const MAX_HEADERS: u16 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub kind: u32,
    pub flags: u64,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
}

impl Section {
    /// Whether the section's bytes are in the file (not .bss-like).
    pub fn has_data(&self) -> bool {
        self.kind != SHT_NOBITS && self.kind != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
}

#[derive(Debug)]
pub struct ElfImage<'a> {
    data: &'a [u8],
    pub sections: Vec<Section>,
    pub segments: Vec<Segment>,
}

impl<'a> ElfImage<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ProfileError> {
        let bad = |d: String| ProfileError::not_elf(d);
        if data.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err(bad("no ELF magic".into()));
        }
        if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
            return Err(bad("not a little-endian ELF64".into()));
        }
        if u16_at(data, 18) != Some(EM_X86_64) {
            return Err(bad("e_machine is not x86-64".into()));
        }
        let hdr = |off: u64| u64_at(data, off).ok_or_else(|| bad("truncated ELF header".into()));
        let hdr16 = |off: u64| u16_at(data, off).ok_or_else(|| bad("truncated ELF header".into()));
        let (phoff, shoff) = (hdr(32)?, hdr(40)?);
        let (phentsize, phnum) = (hdr16(54)?, hdr16(56)?);
        let (shentsize, shnum, shstrndx) = (hdr16(58)?, hdr16(60)?, hdr16(62)?);
        if phnum > MAX_HEADERS || shnum > MAX_HEADERS {
            return Err(bad(format!("implausible header counts ({phnum} segments, {shnum} sections)")));
        }
        if (phnum > 0 && phentsize < 56) || (shnum > 0 && shentsize < 64) {
            return Err(bad("header entries are too small for ELF64".into()));
        }

        let mut segments = Vec::new();
        for i in 0..u64::from(phnum) {
            let base = phoff + i * u64::from(phentsize);
            let ph = slice(data, base, 56).ok_or_else(|| bad(format!("program header {i} is past the end of the file")))?;
            if u32_at(ph, 0) == Some(PT_LOAD) {
                let (offset, vaddr, filesz) = (u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 32));
                if let (Some(offset), Some(vaddr), Some(filesz)) = (offset, vaddr, filesz) {
                    segments.push(Segment { offset, vaddr, filesz });
                }
            }
        }

        let mut raw = Vec::new();
        for i in 0..u64::from(shnum) {
            let base = shoff + i * u64::from(shentsize);
            let sh = slice(data, base, 64).ok_or_else(|| bad(format!("section header {i} is past the end of the file")))?;
            let field = |o| u64_at(sh, o).unwrap_or(0);
            raw.push((u32_at(sh, 0).unwrap_or(0), u32_at(sh, 4).unwrap_or(0), field(8), field(16), field(24), field(32)));
        }
        let strtab = raw.get(usize::from(shstrndx)).map(|s| (s.4, s.5));
        let sections = raw
            .iter()
            .map(|&(name_off, kind, flags, addr, offset, size)| {
                let name = strtab
                    .and_then(|(off, size)| slice(data, off, size))
                    .and_then(|tab| cstr_at(tab, u64::from(name_off), 256))
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default();
                Section { name, kind, flags, addr, offset, size }
            })
            .collect();
        Ok(ElfImage { data, sections, segments })
    }

    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The file bytes of a section, if they are all in the file.
    pub fn section_data(&self, s: &Section) -> Option<&'a [u8]> {
        if !s.has_data() {
            return None;
        }
        slice(self.data, s.offset, s.size)
    }

    /// The kernel virtual address of a file offset, through the section
    /// holding it (sections are exact; segments can overlap .data..percpu).
    pub fn offset_to_vaddr(&self, off: u64) -> Option<u64> {
        let s = self
            .sections
            .iter()
            .find(|s| s.has_data() && s.flags & SHF_ALLOC != 0 && off >= s.offset && off - s.offset < s.size)?;
        s.addr.checked_add(off - s.offset)
    }

    /// The file offset of a kernel virtual address, through the load segments.
    pub fn vaddr_to_offset(&self, va: u64) -> Option<u64> {
        let s = self.segments.iter().find(|s| va >= s.vaddr && va - s.vaddr < s.filesz)?;
        s.offset.checked_add(va - s.vaddr)
    }

    /// The GNU build-id (hex), from the first note section that has one.
    pub fn build_id(&self) -> Option<String> {
        self.sections
            .iter()
            .filter(|s| s.kind == SHT_NOTE)
            .filter_map(|s| self.section_data(s))
            .find_map(find_build_id)
    }
}

/// Walks ELF notes (namesz, descsz, type, name, desc; 4-byte aligned).
fn find_build_id(notes: &[u8]) -> Option<String> {
    let mut off = 0u64;
    let end = notes.len() as u64;
    // Each note is at least 12 bytes, so this loop is bounded by end / 12.
    while off + 12 <= end {
        let namesz = u64::from(u32_at(notes, off)?);
        let descsz = u64::from(u32_at(notes, off + 4)?);
        let kind = u32_at(notes, off + 8)?;
        let name_off = off + 12;
        let desc_off = name_off.checked_add(namesz.div_ceil(4) * 4)?;
        if kind == NT_GNU_BUILD_ID && slice(notes, name_off, namesz)? == b"GNU\0" {
            return slice(notes, desc_off, descsz).map(hex);
        }
        off = desc_off.checked_add(descsz.div_ceil(4) * 4)?;
    }
    None
}
