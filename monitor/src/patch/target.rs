//! The target program's symbols, from its ELF symbol table on the host
//! (`.symtab`, else `.dynsym`): what patch symbols and command targets
//! resolve against.
use std::collections::HashMap;

use super::elf::*;
use super::PatchError;

/// What a program symbol is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A function (STT_FUNC): can be called by the patch or redirected (J).
    Func,
    /// A variable (STT_OBJECT, STT_COMMON): can be read by the patch or
    /// overwritten (V, P).
    Object,
    /// An untyped symbol (STT_NOTYPE, e.g. linker-made `_end`).
    NoType,
    /// Thread-local (STT_TLS): its value is an offset, not an address.
    Tls,
    /// GNU indirect function (STT_GNU_IFUNC, e.g. strlen in static glibc):
    /// its address is the resolver, not the function.
    Ifunc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetSymbol {
    /// Run-time address (load base applied for a PIE).
    pub addr: u64,
    /// Size from the ELF symbol (0 if unknown).
    pub size: u64,
    pub kind: TargetKind,
    /// Several different local symbols have this name and no global one
    /// does: resolving it would be a guess, so it is an error.
    pub ambiguous: bool,
}

/// Whether the program is position-independent (ET_DYN): its symbols are
/// then offsets to add to the load base seen in the guest.
pub fn target_is_pie(elf_bytes: &[u8]) -> Result<bool, PatchError> {
    let elf = Elf::parse(elf_bytes).map_err(PatchError::Program)?;
    program_kind(&elf).map(|k| k == ET_DYN)
}

fn program_kind(elf: &Elf) -> Result<u16, PatchError> {
    match elf.kind {
        ET_EXEC | ET_DYN => Ok(elf.kind),
        ET_REL => Err(PatchError::Program("is a relocatable object (ET_REL), not a linked program; pass the program binary".into())),
        t => Err(PatchError::Program(format!("ELF type {t} is not an executable"))),
    }
}

/// The symbols of the target program, by name, at their run-time
/// addresses. `load_base` is added to every (non-absolute) symbol of a PIE
/// (ET_DYN); a non-PIE program (ET_EXEC) is not relocated, so its
/// `load_base` must be 0.
///
/// When a name is defined more than once, a global or weak symbol wins over
/// local ones; several different local ones only are marked `ambiguous`.
/// Undefined, section and file symbols are left out.
pub fn target_symbols(elf_bytes: &[u8], load_base: u64) -> Result<HashMap<String, TargetSymbol>, PatchError> {
    let elf = Elf::parse(elf_bytes).map_err(PatchError::Program)?;
    let kind = program_kind(&elf)?;
    if kind == ET_EXEC && load_base != 0 {
        return Err(PatchError::Program(format!(
            "is not position-independent (ET_EXEC), so it always loads at its link addresses; load base {load_base:#x} must be 0"
        )));
    }
    let table = elf
        .sections
        .iter()
        .position(|s| s.kind == SHT_SYMTAB)
        .or_else(|| elf.sections.iter().position(|s| s.kind == SHT_DYNSYM))
        .ok_or_else(|| PatchError::Program("has no symbol table (stripped?): use the unstripped build of the program".into()))?;
    let syms = elf.symbols(table).map_err(PatchError::Program)?;
    let mut map: HashMap<String, (TargetSymbol, bool)> = HashMap::new();
    for s in syms {
        let kind = match s.kind {
            STT_FUNC => TargetKind::Func,
            STT_OBJECT | STT_COMMON => TargetKind::Object,
            STT_NOTYPE => TargetKind::NoType,
            STT_TLS => TargetKind::Tls,
            STT_GNU_IFUNC => TargetKind::Ifunc,
            _ => continue,
        };
        if s.name.is_empty() || s.shndx == SHN_UNDEF || s.shndx == SHN_COMMON {
            continue;
        }
        // TLS values are offsets in the TLS block, absolute ones are fixed.
        let relocate = elf.kind == ET_DYN && s.shndx != SHN_ABS && kind != TargetKind::Tls;
        let addr = if relocate { s.value.wrapping_add(load_base) } else { s.value };
        let sym = TargetSymbol { addr, size: s.size, kind, ambiguous: false };
        let global = s.bind != STB_LOCAL;
        match map.get_mut(&s.name) {
            None => {
                map.insert(s.name, (sym, global));
            }
            Some((old, old_global)) => match (*old_global, global) {
                (false, true) => *old = sym,
                (true, _) => {}
                (false, false) => {
                    if old.addr != sym.addr {
                        old.ambiguous = true;
                    }
                }
            },
        }
    }
    Ok(map.into_iter().map(|(k, (v, _))| (k, v)).collect())
}

/// The program file's bytes at link-time address `vaddr` (before any load
/// base), from the allocated section holding them; None when no section
/// with file contents covers all `len` bytes.
pub fn program_bytes(elf_bytes: &[u8], vaddr: u64, len: u64) -> Option<Vec<u8>> {
    let elf = Elf::parse(elf_bytes).ok()?;
    let end = vaddr.checked_add(len)?;
    let s = elf
        .sections
        .iter()
        .find(|s| s.kind == SHT_PROGBITS && s.flags & SHF_ALLOC != 0 && s.addr <= vaddr && end <= s.addr + s.size)?;
    let start = usize::try_from(s.offset + (vaddr - s.addr)).ok()?;
    elf_bytes.get(start..start.checked_add(usize::try_from(len).ok()?)?).map(<[u8]>::to_vec)
}
