//! The patch object: an x86-64 ELF64 relocatable file (`gcc -c`), parsed
//! and validated before anything touches the guest. Only what a live patch
//! can use is kept: the allocatable sections (code, read-only data, data,
//! bss), the symbol table and the relocations of those sections. Unwind
//! tables (`.eh_frame`), notes and non-allocatable sections (debug info,
//! `.comment`) are dropped. Everything that cannot work in a running
//! process is rejected by name: thread-local storage, constructors,
//! writable+executable sections, unsupported relocation types.
use std::collections::BTreeSet;

use super::elf::*;
use super::PatchError;

/// The largest patch image accepted (all sections, GOT and stubs). It
/// bounds the memory a garbled object (e.g. a huge .bss) can make us use.
pub const MAX_IMAGE_SIZE: u64 = 64 << 20;
/// The largest section alignment accepted; the patch base is page-aligned.
pub const MAX_ALIGN: u64 = 4096;
/// Size of one PLT stub: `ff 25 00 00 00 00` + 8-byte address + 2 x int3.
pub const PLT_STUB_SIZE: u64 = 16;
/// Size of one GOT slot (an absolute address).
pub const GOT_SLOT_SIZE: u64 = 8;

/// Where a section goes in the patch image; the image is laid out in this
/// order (code first, then read-only data, then data, then zero-filled bss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SectionKind {
    Text,
    Rodata,
    Data,
    Bss,
}

/// A section loaded into the patch image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjSection {
    /// Index of the section header in the ELF file.
    pub elf_index: usize,
    pub name: String,
    pub kind: SectionKind,
    pub flags: u64,
    /// Power of two, at least 1, at most [`MAX_ALIGN`].
    pub align: u64,
    pub size: u64,
    /// The bytes (empty for [`SectionKind::Bss`]).
    pub data: Vec<u8>,
}

/// Where a patch symbol's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymbolDef {
    /// In a loaded section: `section` indexes [`PatchObject::sections`].
    Section { section: usize, value: u64 },
    /// `SHN_ABS`: a fixed value.
    Absolute(u64),
    /// `SHN_COMMON` (gcc -fcommon): allocated at the end of the image.
    Common { size: u64, align: u64 },
    /// Needs resolution against the target program.
    Undefined,
    /// Defined in a section that is not loaded (debug info, .eh_frame...):
    /// an error if a loaded section refers to it.
    Unloaded { section: String },
}

/// Symbol type (`STT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolType {
    NoType,
    Object,
    Func,
    Section,
    File,
    Tls,
    Ifunc,
    Other(u8),
}

impl SymbolType {
    pub fn from_elf(t: u8) -> Self {
        match t {
            STT_NOTYPE => SymbolType::NoType,
            STT_OBJECT | STT_COMMON => SymbolType::Object,
            STT_FUNC => SymbolType::Func,
            STT_SECTION => SymbolType::Section,
            STT_FILE => SymbolType::File,
            STT_TLS => SymbolType::Tls,
            STT_GNU_IFUNC => SymbolType::Ifunc,
            other => SymbolType::Other(other),
        }
    }
}

/// Symbol binding (`STB_*`); unknown bindings are treated as global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    Local,
    Global,
    Weak,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjSymbol {
    /// The name; a section symbol gets its section's name.
    pub name: String,
    pub kind: SymbolType,
    pub binding: Binding,
    pub def: SymbolDef,
    pub size: u64,
}

/// The relocation types applied (the ones gcc emits for x86-64 code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelocKind {
    /// R_X86_64_NONE (0): nothing to do.
    None,
    /// R_X86_64_64 (1): S + A, 64 bits.
    Abs64,
    /// R_X86_64_PC32 (2): S + A - P, signed 32 bits.
    Pc32,
    /// R_X86_64_PLT32 (4): L + A - P; L is S, or a stub when S is a
    /// program function out of rel32 reach.
    Plt32,
    /// R_X86_64_GOTPCREL (9): G + GOT + A - P.
    GotPcRel,
    /// R_X86_64_32 (10): S + A, zero-extended 32 bits.
    Abs32,
    /// R_X86_64_32S (11): S + A, sign-extended 32 bits.
    Abs32S,
    /// R_X86_64_GOTPCRELX (41): as GOTPCREL (no relaxation).
    GotPcRelX,
    /// R_X86_64_REX_GOTPCRELX (42): as GOTPCREL (no relaxation).
    RexGotPcRelX,
}

impl RelocKind {
    /// The supported type for an ELF `r_type`, or why it is not supported.
    pub fn from_elf(t: u32) -> Result<Self, &'static str> {
        Ok(match t {
            0 => RelocKind::None,
            1 => RelocKind::Abs64,
            2 => RelocKind::Pc32,
            4 => RelocKind::Plt32,
            9 => RelocKind::GotPcRel,
            10 => RelocKind::Abs32,
            11 => RelocKind::Abs32S,
            41 => RelocKind::GotPcRelX,
            42 => RelocKind::RexGotPcRelX,
            16..=23 | 34..=36 => return Err("thread-local storage"),
            3 | 25..=31 => return Err("large-code-model or PIC GOT/PLT addressing; compile with -fpic, -fno-pic or -mcmodel=large"),
            5..=8 | 37 | 38 => return Err("a dynamic relocation, only found in linked programs; compile the patch with gcc -c"),
            12..=15 => return Err("8- or 16-bit field"),
            24 => return Err("64-bit PC-relative; compile with -mcmodel=small or large"),
            32 | 33 => return Err("symbol size relocation"),
            _ => return Err("unknown relocation type"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RelocKind::None => "R_X86_64_NONE",
            RelocKind::Abs64 => "R_X86_64_64",
            RelocKind::Pc32 => "R_X86_64_PC32",
            RelocKind::Plt32 => "R_X86_64_PLT32",
            RelocKind::GotPcRel => "R_X86_64_GOTPCREL",
            RelocKind::Abs32 => "R_X86_64_32",
            RelocKind::Abs32S => "R_X86_64_32S",
            RelocKind::GotPcRelX => "R_X86_64_GOTPCRELX",
            RelocKind::RexGotPcRelX => "R_X86_64_REX_GOTPCRELX",
        }
    }

    /// Bytes written at the relocated place.
    pub fn width(self) -> u64 {
        match self {
            RelocKind::None => 0,
            RelocKind::Abs64 => 8,
            _ => 4,
        }
    }

    pub fn uses_got(self) -> bool {
        matches!(self, RelocKind::GotPcRel | RelocKind::GotPcRelX | RelocKind::RexGotPcRelX)
    }
}

/// The ELF name of any x86-64 relocation type number, for messages.
pub fn reloc_type_name(t: u32) -> String {
    const NAMES: [&str; 43] = [
        "NONE", "64", "PC32", "GOT32", "PLT32", "COPY", "GLOB_DAT", "JUMP_SLOT", "RELATIVE", "GOTPCREL", "32", "32S", "16",
        "PC16", "8", "PC8", "DTPMOD64", "DTPOFF64", "TPOFF64", "TLSGD", "TLSLD", "DTPOFF32", "GOTTPOFF", "TPOFF32", "PC64",
        "GOTOFF64", "GOTPC32", "GOT64", "GOTPCREL64", "GOTPC64", "GOTPLT64", "PLTOFF64", "SIZE32", "SIZE64",
        "GOTPC32_TLSDESC", "TLSDESC_CALL", "TLSDESC", "IRELATIVE", "RELATIVE64", "", "", "GOTPCRELX", "REX_GOTPCRELX",
    ];
    match usize::try_from(t).ok().and_then(|i| NAMES.get(i)).filter(|n| !n.is_empty()) {
        Some(n) => format!("R_X86_64_{n}"),
        None => format!("type {t}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocation {
    /// Index into [`PatchObject::sections`] of the section patched.
    pub section: usize,
    /// Offset in that section; `offset + kind.width() <= size` is checked.
    pub offset: u64,
    pub kind: RelocKind,
    /// Index into [`PatchObject::symbols`] (0 is the null symbol, value 0).
    pub symbol: usize,
    pub addend: i64,
}

/// Offsets of everything in the patch image, relative to its base. It
/// depends only on the object, so the caller can allocate
/// [`PatchObject::required_size`] bytes before it knows the base.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Offset of each of [`PatchObject::sections`], same order.
    pub section_offsets: Vec<u64>,
    /// PLT stubs: one per program symbol called through R_X86_64_PLT32
    /// (used only when the call cannot reach it directly).
    pub plt_offset: u64,
    pub plt_symbols: Vec<usize>,
    /// GOT: one 8-byte slot per symbol used through a GOTPCREL relocation.
    pub got_offset: u64,
    pub got_symbols: Vec<usize>,
    /// Offset of each `SHN_COMMON` symbol: (symbol index, offset).
    pub commons: Vec<(usize, u64)>,
    /// Total bytes, including the zero-filled bss.
    pub size: u64,
    /// The alignment the base address must have.
    pub align: u64,
}

/// A parsed, validated patch object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchObject {
    /// Labels error messages (usually the path).
    pub name: String,
    pub sections: Vec<ObjSection>,
    pub symbols: Vec<ObjSymbol>,
    pub relocations: Vec<Relocation>,
    pub layout: Layout,
}

/// Where the patch can be placed, given its relocations (see
/// [`PatchObject::placement`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// A PC-relative reference to the program (R_X86_64_PC32 to a program
    /// symbol) needs the whole patch within ±2 GiB of that symbol.
    pub near_program: bool,
    /// Absolute 32-bit references to the patch itself (R_X86_64_32 /
    /// 32S, from -fno-pic -mcmodel=small) need the patch to end at or below
    /// this address (4 GiB / 2 GiB).
    pub max_end: Option<u64>,
}

impl PatchObject {
    /// A patch with no code or data, for command files with only V lines.
    pub fn empty(name: &str) -> Self {
        PatchObject { name: name.to_string(), sections: Vec::new(), symbols: Vec::new(), relocations: Vec::new(), layout: Layout { align: 1, ..Layout::default() } }
    }

    /// Parses and validates an ELF relocatable object; `name` labels errors.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self, PatchError> {
        let obj_err = |msg: String| PatchError::Object { file: name.to_string(), msg };
        let sec_err = |section: &str, reason: &str| PatchError::Section { file: name.to_string(), section: section.to_string(), reason: reason.to_string() };
        let elf = Elf::parse(bytes).map_err(obj_err)?;
        match elf.kind {
            ET_REL => {}
            ET_EXEC | ET_DYN => {
                return Err(obj_err(format!(
                    "is a linked {} (ELF type {}), not a relocatable object: compile the patch with `gcc -c`",
                    if elf.kind == ET_EXEC { "executable" } else { "shared object or PIE" },
                    elf.kind
                )))
            }
            t => return Err(obj_err(format!("ELF type {t} is not a relocatable object (ET_REL): compile the patch with `gcc -c`"))),
        }

        // Sections: keep the allocatable ones a process can use.
        let mut sections = Vec::new();
        let mut loaded_index = vec![None; elf.sections.len()];
        for (i, s) in elf.sections.iter().enumerate() {
            let n = s.name.as_str();
            let ctor = [".init_array", ".fini_array", ".preinit_array", ".ctors", ".dtors"]
                .iter()
                .any(|p| n == *p || n.strip_prefix(p).is_some_and(|r| r.starts_with('.')))
                || n == ".init"
                || n == ".fini";
            if matches!(s.kind, SHT_INIT_ARRAY | SHT_FINI_ARRAY | SHT_PREINIT_ARRAY) || ctor {
                return Err(sec_err(n, "constructors and destructors never run in a live patch; call the setup from a patch function instead"));
            }
            if s.flags & SHF_ALLOC == 0 {
                continue;
            }
            if s.flags & SHF_TLS != 0 {
                return Err(sec_err(n, "thread-local storage (SHF_TLS): a patch cannot add thread-local variables; use a plain global"));
            }
            if n == ".eh_frame" || s.kind == SHT_X86_64_UNWIND || s.kind == SHT_NOTE {
                continue; // unwind tables and notes are not registered or needed
            }
            if s.flags & SHF_WRITE != 0 && s.flags & SHF_EXECINSTR != 0 {
                return Err(sec_err(n, "it is writable and executable; keep code and data in separate sections"));
            }
            let kind = match s.kind {
                SHT_NOBITS => SectionKind::Bss,
                SHT_PROGBITS if s.flags & SHF_EXECINSTR != 0 => SectionKind::Text,
                SHT_PROGBITS if s.flags & SHF_WRITE != 0 => SectionKind::Data,
                SHT_PROGBITS => SectionKind::Rodata,
                t => return Err(sec_err(n, &format!("allocatable section of type {t:#x}; only code, data and bss (PROGBITS/NOBITS) can be loaded"))),
            };
            let align = s.align.max(1);
            if !align.is_power_of_two() || align > MAX_ALIGN {
                return Err(sec_err(n, &format!("alignment {} is not a power of two up to {MAX_ALIGN}", s.align)));
            }
            if s.size > MAX_IMAGE_SIZE {
                return Err(sec_err(n, &format!("{:#x} bytes is more than the {MAX_IMAGE_SIZE:#x} a patch may have (garbled object?)", s.size)));
            }
            let data = if kind == SectionKind::Bss { Vec::new() } else { elf.section_data(i).map_err(obj_err)?.to_vec() };
            loaded_index[i] = Some(sections.len());
            sections.push(ObjSection { elf_index: i, name: s.name.clone(), kind, flags: s.flags, align, size: s.size, data });
        }

        // Symbols: the object's one SHT_SYMTAB (none if it has no symbols).
        let symtabs: Vec<usize> = elf.sections.iter().enumerate().filter(|(_, s)| s.kind == SHT_SYMTAB).map(|(i, _)| i).collect();
        let symtab = match symtabs.as_slice() {
            [] => None,
            [one] => Some(*one),
            _ => return Err(obj_err(format!("has {} symbol tables; a relocatable object has one", symtabs.len()))),
        };
        let mut symbols = Vec::new();
        if let Some(st) = symtab {
            for (i, sym) in elf.symbols(st).map_err(obj_err)?.into_iter().enumerate() {
                symbols.push(Self::symbol(&elf, &sections, &loaded_index, i, sym).map_err(obj_err)?);
            }
        }

        // Relocations of the loaded sections.
        let mut relocations = Vec::new();
        for (i, s) in elf.sections.iter().enumerate() {
            if s.kind != SHT_RELA && s.kind != SHT_REL {
                continue;
            }
            let target = usize::try_from(s.info).ok().filter(|&t| t < elf.sections.len()).ok_or_else(|| {
                obj_err(format!("relocation section {} applies to section {}, which does not exist", s.name, s.info))
            })?;
            let Some(section) = loaded_index[target] else { continue };
            let sec = &sections[section];
            if s.kind == SHT_REL {
                return Err(sec_err(&s.name, "SHT_REL relocations (without addend) are not used on x86-64; rebuild with an x86-64 gcc"));
            }
            if Some(s.link as usize) != symtab {
                return Err(obj_err(format!("relocation section {} does not use the object's symbol table", s.name)));
            }
            let data = elf.section_data(i).map_err(obj_err)?;
            let count = data.len() as u64 / RELA_SIZE;
            for r in 0..count {
                let field = |o: u64| u64_at(data, r * RELA_SIZE + o).ok_or_else(|| obj_err(format!("relocation {r} of {} is truncated", s.name)));
                let (offset, info, addend) = (field(0)?, field(8)?, field(16)? as i64);
                let (sym, rtype) = ((info >> 32) as usize, (info & 0xffff_ffff) as u32);
                let place = format!("{}+{offset:#x}", sec.name);
                let kind = RelocKind::from_elf(rtype).map_err(|reason| PatchError::Relocation {
                    file: name.to_string(),
                    kind: reloc_type_name(rtype),
                    place: place.clone(),
                    reason: reason.to_string(),
                })?;
                if sym >= symbols.len().max(1) {
                    return Err(obj_err(format!("relocation at {place} uses symbol {sym}, past the symbol table")));
                }
                if sec.kind == SectionKind::Bss && kind != RelocKind::None {
                    return Err(obj_err(format!("relocation at {place} patches a bss section, which has no bytes")));
                }
                if offset.checked_add(kind.width()).is_none_or(|end| end > sec.size) {
                    return Err(obj_err(format!("relocation at {place} ({} bytes) is past the end of {} ({:#x} bytes)", kind.width(), sec.name, sec.size)));
                }
                if let Some(SymbolDef::Unloaded { section: unloaded }) = symbols.get(sym).map(|s: &ObjSymbol| &s.def) {
                    return Err(sec_err(&sec.name, &format!("relocation at {place} refers to section {unloaded}, which is not loaded")));
                }
                if kind != RelocKind::None {
                    relocations.push(Relocation { section, offset, kind, symbol: sym, addend });
                }
            }
        }

        let mut obj = PatchObject { name: name.to_string(), sections, symbols, relocations, layout: Layout::default() };
        obj.layout = obj.compute_layout()?;
        Ok(obj)
    }

    fn symbol(elf: &Elf, sections: &[ObjSection], loaded_index: &[Option<usize>], i: usize, sym: Sym) -> Result<ObjSymbol, String> {
        let kind = SymbolType::from_elf(sym.kind);
        let binding = match sym.bind {
            STB_LOCAL => Binding::Local,
            STB_WEAK => Binding::Weak,
            _ => Binding::Global,
        };
        let def = match sym.shndx {
            SHN_UNDEF => SymbolDef::Undefined,
            SHN_ABS => SymbolDef::Absolute(sym.value),
            SHN_COMMON => {
                let align = sym.value.max(1);
                if !align.is_power_of_two() || align > MAX_ALIGN || sym.size > MAX_IMAGE_SIZE {
                    return Err(format!("common symbol {} has a bad size {:#x} or alignment {:#x}", sym.name, sym.size, sym.value));
                }
                SymbolDef::Common { size: sym.size, align }
            }
            SHN_XINDEX => return Err(format!("symbol {} uses an extended section index, which is not supported", sym.name)),
            x if x >= SHN_LORESERVE => return Err(format!("symbol {} has a special section index {x:#x}, which is not supported", sym.name)),
            x => {
                let x = usize::from(x);
                let shdr = elf.sections.get(x).ok_or_else(|| format!("symbol {i} ({}) is in section {x}, which does not exist", sym.name))?;
                match loaded_index.get(x).copied().flatten() {
                    Some(section) => {
                        let size = sections.get(section).map_or(0, |s| s.size);
                        if sym.value > size {
                            return Err(format!("symbol {} at {:#x} is past the end of {} ({size:#x} bytes)", sym.name, sym.value, shdr.name));
                        }
                        SymbolDef::Section { section, value: sym.value }
                    }
                    None => SymbolDef::Unloaded { section: shdr.name.clone() },
                }
            }
        };
        let name = match (kind, &def) {
            (SymbolType::Section, SymbolDef::Section { section, .. }) => sections.get(*section).map(|s| s.name.clone()).unwrap_or_default(),
            (SymbolType::Section, SymbolDef::Unloaded { section }) => section.clone(),
            _ => sym.name,
        };
        Ok(ObjSymbol { name, kind, binding, def, size: sym.size })
    }

    fn compute_layout(&self) -> Result<Layout, PatchError> {
        let too_big = || PatchError::Object {
            file: self.name.clone(),
            msg: format!("the patch image would be more than {MAX_IMAGE_SIZE:#x} bytes (garbled object?)"),
        };
        let mut lay = Layout { section_offsets: vec![0; self.sections.len()], align: 1, ..Layout::default() };
        let mut at = 0u64;
        let place = |at: &mut u64, size: u64, align: u64, lay: &mut Layout| -> Result<u64, PatchError> {
            let start = at.checked_next_multiple_of(align).ok_or_else(too_big)?;
            *at = start.checked_add(size).filter(|&end| end <= MAX_IMAGE_SIZE).ok_or_else(too_big)?;
            lay.align = lay.align.max(align);
            Ok(start)
        };
        let plt: BTreeSet<usize> = self
            .relocations
            .iter()
            .filter(|r| r.kind == RelocKind::Plt32 && self.symbols.get(r.symbol).is_some_and(|s| s.def == SymbolDef::Undefined))
            .map(|r| r.symbol)
            .collect();
        let got: BTreeSet<usize> = self.relocations.iter().filter(|r| r.kind.uses_got()).map(|r| r.symbol).collect();
        lay.plt_symbols = plt.into_iter().collect();
        lay.got_symbols = got.into_iter().collect();
        for kind in [SectionKind::Text, SectionKind::Rodata, SectionKind::Data, SectionKind::Bss] {
            for (i, s) in self.sections.iter().enumerate().filter(|(_, s)| s.kind == kind) {
                lay.section_offsets[i] = place(&mut at, s.size, s.align, &mut lay)?;
            }
            match kind {
                SectionKind::Text if !lay.plt_symbols.is_empty() => {
                    lay.plt_offset = place(&mut at, lay.plt_symbols.len() as u64 * PLT_STUB_SIZE, 16, &mut lay)?;
                }
                SectionKind::Rodata if !lay.got_symbols.is_empty() => {
                    lay.got_offset = place(&mut at, lay.got_symbols.len() as u64 * GOT_SLOT_SIZE, 8, &mut lay)?;
                }
                _ => {}
            }
        }
        for (i, s) in self.symbols.iter().enumerate() {
            if let SymbolDef::Common { size, align } = s.def {
                let off = place(&mut at, size, align, &mut lay)?;
                lay.commons.push((i, off));
            }
        }
        lay.size = at;
        Ok(lay)
    }

    /// Bytes the linked patch takes (code, data, GOT, stubs and bss).
    pub fn required_size(&self) -> usize {
        // Bounded by MAX_IMAGE_SIZE, so it fits any usize on 64-bit hosts.
        usize::try_from(self.layout.size).unwrap_or(usize::MAX)
    }

    /// Whether the patch has nothing it writes itself (no non-empty data or
    /// bss section): it can then live in read-only program text.
    pub fn is_read_only(&self) -> bool {
        self.sections.iter().all(|s| s.size == 0 || matches!(s.kind, SectionKind::Text | SectionKind::Rodata))
    }

    /// The alignment the patch base must have (at most a page).
    pub fn required_alignment(&self) -> u64 {
        self.layout.align
    }

    /// Where the patch may be placed, from its relocations.
    pub fn placement(&self) -> Placement {
        let mut p = Placement { near_program: false, max_end: None };
        for r in &self.relocations {
            let Some(sym) = self.symbols.get(r.symbol) else { continue };
            let program = sym.def == SymbolDef::Undefined;
            let local = matches!(sym.def, SymbolDef::Section { .. } | SymbolDef::Common { .. });
            match r.kind {
                RelocKind::Pc32 if program => p.near_program = true,
                RelocKind::Abs32 if local => p.max_end = Some(p.max_end.unwrap_or(1 << 32).min(1 << 32)),
                RelocKind::Abs32S if local => p.max_end = Some(p.max_end.unwrap_or(1 << 31).min(1 << 31)),
                _ => {}
            }
        }
        p
    }

    /// The defined symbol named `name` (a global or weak one first, then a
    /// local one), skipping section and file symbols.
    pub fn defined(&self, name: &str) -> Option<(usize, &ObjSymbol)> {
        let defined = |s: &&ObjSymbol| {
            s.name == name
                && !matches!(s.kind, SymbolType::Section | SymbolType::File)
                && matches!(s.def, SymbolDef::Section { .. } | SymbolDef::Absolute(_) | SymbolDef::Common { .. })
        };
        let all: Vec<(usize, &ObjSymbol)> = self.symbols.iter().enumerate().filter(|(_, s)| defined(s)).collect();
        all.iter().find(|(_, s)| s.binding != Binding::Local).or_else(|| all.first()).copied()
    }

    /// `section+0xoffset`, for messages.
    pub fn place(&self, section: usize, offset: u64) -> String {
        format!("{}+{offset:#x}", self.sections.get(section).map_or("?", |s| s.name.as_str()))
    }
}
