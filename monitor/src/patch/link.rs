//! Resolver and linker: places the patch object at a base address in the
//! target process, resolves its symbols (the patch's own first, then the
//! target program's, so a patch may call the program's functions and read
//! its globals), applies the relocations, and resolves the command file to
//! addresses. Pure computation: nothing here touches the guest.
//!
//! Image layout (offsets from the base; see [`super::object::Layout`]):
//! code sections, PLT stubs, read-only data, GOT, data, bss, common symbols,
//! each aligned as its section asks.
use std::collections::{BTreeSet, HashMap};

use super::commands::{Action, Command, CommandFile};
use super::jump::{fits, jump_bytes, JMP_ABS64_LEN, JMP_REL32_LEN};
use super::object::{Binding, PatchObject, RelocKind, SectionKind, SymbolDef, SymbolType, GOT_SLOT_SIZE, PLT_STUB_SIZE};
use super::target::{TargetKind, TargetSymbol};
use super::PatchError;

/// Highest end address accepted for a patch (user space, lower half, even
/// with 5-level paging).
pub const MAX_USER_ADDR: u64 = 1 << 56;

/// One placed region of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedSection {
    pub name: String,
    pub addr: u64,
    pub size: u64,
}

/// The patch, linked for `base`: write `bytes` at `base` in the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedPatch {
    pub base: u64,
    /// The whole image, bss zero-filled: `bytes.len() == size`.
    pub bytes: Vec<u8>,
    pub size: u64,
    /// The patch's named symbols at their final addresses (a global wins
    /// over a local of the same name).
    pub symbols: HashMap<String, u64>,
    /// Where each section (and `.plt`, `.got`, `COMMON`) went.
    pub sections: Vec<PlacedSection>,
}

/// A command with its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedAction {
    /// Write `jump` at `target_addr` (the function's entry). `jump.len()`
    /// is at most `target_size` (checked).
    Jump { target_addr: u64, target_size: u64, patch_addr: u64, jump: Vec<u8> },
    /// Write `bytes` at `addr`; `bytes.len() <= size` (checked).
    Variable { addr: u64, size: u64, bytes: Vec<u8> },
    /// Write `value` (8 bytes, little-endian) at `addr`.
    Pointer { addr: u64, value: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedCommand {
    /// Line in the command file.
    pub line: usize,
    /// The program symbol patched.
    pub target: String,
    /// The patch symbol used (J, P).
    pub patch_symbol: Option<String>,
    pub action: ResolvedAction,
}

/// Bytes to allocate in the target for this patch (before knowing the base).
pub fn required_size(obj: &PatchObject) -> usize {
    obj.required_size()
}

/// A symbol's value: an offset into the patch image, or an absolute address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    Patch(u64),
    Abs(u64),
}

impl Value {
    fn at(self, base: u64) -> u64 {
        match self {
            Value::Patch(off) => base.wrapping_add(off),
            Value::Abs(a) => a,
        }
    }
}

/// A command resolved except for what depends on the base.
enum Pending {
    Jump { target: TargetSymbol, patch_symbol: String, patch: Value },
    Variable { target: TargetSymbol, bytes: Vec<u8> },
    Pointer { target: TargetSymbol, patch_symbol: String, patch: Value },
}

/// Everything that can be checked without a base address: every symbol
/// the patch uses and every command resolves, and the command targets have
/// the right kind and size. [`link`] does this too, then the rest.
pub fn check(obj: &PatchObject, commands: &CommandFile, program: &HashMap<String, TargetSymbol>) -> Result<(), PatchError> {
    let values = resolve_symbols(obj, program)?;
    resolve_commands(obj, commands, program, &values).map(|_| ())
}

/// Links `obj` for `base` against the program's symbols and resolves the
/// commands. `base` must have [`PatchObject::required_alignment`].
pub fn link(
    obj: &PatchObject,
    commands: &CommandFile,
    program: &HashMap<String, TargetSymbol>,
    base: u64,
) -> Result<(LinkedPatch, Vec<ResolvedCommand>), PatchError> {
    let lay = &obj.layout;
    let base_err = |msg: String| PatchError::Base { file: obj.name.clone(), msg };
    let align = lay.align.max(1);
    if base & (align - 1) != 0 {
        return Err(base_err(format!("base {base:#x} is not aligned to the {align} bytes the patch needs (use a page-aligned base)")));
    }
    if base.checked_add(lay.size).is_none_or(|end| end > MAX_USER_ADDR) {
        return Err(base_err(format!("base {base:#x} + {:#x} bytes is not a user-space address range", lay.size)));
    }
    let values = resolve_symbols(obj, program)?;
    let pending = resolve_commands(obj, commands, program, &values)?;

    // The image: section bytes, GOT slots, PLT stubs; bss stays zero.
    let size = obj.required_size();
    let mut bytes = vec![0u8; size];
    let mut sections = Vec::new();
    for (s, &off) in obj.sections.iter().zip(&lay.section_offsets) {
        if s.kind != SectionKind::Bss {
            write(&mut bytes, off, &s.data);
        }
        sections.push(PlacedSection { name: s.name.clone(), addr: base + off, size: s.size });
    }
    for (slot, &sym) in lay.got_symbols.iter().enumerate() {
        let v = values.get(sym).copied().unwrap_or(Value::Abs(0)).at(base);
        write(&mut bytes, lay.got_offset + slot as u64 * GOT_SLOT_SIZE, &v.to_le_bytes());
    }
    for (slot, &sym) in lay.plt_symbols.iter().enumerate() {
        let v = values.get(sym).copied().unwrap_or(Value::Abs(0)).at(base);
        let mut stub = vec![0xff, 0x25, 0, 0, 0, 0]; // jmp *0(%rip)
        stub.extend_from_slice(&v.to_le_bytes());
        stub.extend_from_slice(&[0xcc, 0xcc]); // int3 padding
        write(&mut bytes, lay.plt_offset + slot as u64 * PLT_STUB_SIZE, &stub);
    }
    if !lay.plt_symbols.is_empty() {
        sections.push(PlacedSection { name: ".plt".into(), addr: base + lay.plt_offset, size: lay.plt_symbols.len() as u64 * PLT_STUB_SIZE });
    }
    if !lay.got_symbols.is_empty() {
        sections.push(PlacedSection { name: ".got".into(), addr: base + lay.got_offset, size: lay.got_symbols.len() as u64 * GOT_SLOT_SIZE });
    }
    for &(sym, off) in &lay.commons {
        if let Some(SymbolDef::Common { size, .. }) = obj.symbols.get(sym).map(|s| &s.def) {
            sections.push(PlacedSection { name: "COMMON".into(), addr: base + off, size: *size });
        }
    }

    // Relocations.
    for r in &obj.relocations {
        let sec_off = lay.section_offsets.get(r.section).copied().unwrap_or(0);
        let at = sec_off + r.offset;
        let p = base + at;
        let value = values.get(r.symbol).copied().unwrap_or(Value::Abs(0));
        let s = i128::from(value.at(base));
        let a = i128::from(r.addend);
        let p128 = i128::from(p);
        let sym = obj.symbols.get(r.symbol);
        let sym_name = sym.map_or("(no symbol)".to_string(), |s| s.name.clone());
        let overflow = |msg: String| PatchError::Overflow {
            file: obj.name.clone(),
            kind: r.kind.name().to_string(),
            place: obj.place(r.section, r.offset),
            symbol: sym_name.clone(),
            msg,
        };
        let far = |target: i128| {
            overflow(format!(
                "the patch at {base:#x} is more than 2 GiB away from the target {target:#x}: place the patch within ±2 GiB of it, or compile the patch with -fpic (program globals then go through the GOT)"
            ))
        };
        match r.kind {
            RelocKind::None => {}
            RelocKind::Abs64 => write(&mut bytes, at, &((s + a) as u64).to_le_bytes()),
            RelocKind::Pc32 => {
                let v = i32::try_from(s + a - p128).map_err(|_| far(s))?;
                write(&mut bytes, at, &v.to_le_bytes());
            }
            RelocKind::Plt32 => {
                let direct = i32::try_from(s + a - p128).ok();
                let stub = lay.plt_symbols.iter().position(|&x| x == r.symbol);
                let v = match (direct, stub) {
                    (Some(v), _) => v,
                    (None, Some(slot)) => {
                        let stub_addr = i128::from(base + lay.plt_offset + slot as u64 * PLT_STUB_SIZE);
                        i32::try_from(stub_addr + a - p128).map_err(|_| far(stub_addr))?
                    }
                    (None, None) => return Err(far(s)),
                };
                write(&mut bytes, at, &v.to_le_bytes());
            }
            RelocKind::GotPcRel | RelocKind::GotPcRelX | RelocKind::RexGotPcRelX => {
                let slot = lay.got_symbols.iter().position(|&x| x == r.symbol).unwrap_or(0);
                let g = i128::from(base + lay.got_offset + slot as u64 * GOT_SLOT_SIZE);
                let v = i32::try_from(g + a - p128).map_err(|_| far(g))?;
                write(&mut bytes, at, &v.to_le_bytes());
            }
            RelocKind::Abs32 => {
                let v = u32::try_from(s + a).map_err(|_| {
                    overflow(format!(
                        "{:#x} does not fit in 32 bits (zero-extended): -fno-pic -mcmodel=small code must lie below 4 GiB, and the patch is at {base:#x}; compile the patch with -fpic, or place it lower",
                        s + a
                    ))
                })?;
                write(&mut bytes, at, &v.to_le_bytes());
            }
            RelocKind::Abs32S => {
                let v = i32::try_from(s + a).map_err(|_| {
                    overflow(format!(
                        "{:#x} does not fit in 32 bits (sign-extended): -fno-pic -mcmodel=small code must lie below 2 GiB, and the patch is at {base:#x}; compile the patch with -fpic, or place it lower",
                        s + a
                    ))
                })?;
                write(&mut bytes, at, &v.to_le_bytes());
            }
        }
    }

    // The patch's symbols: locals first, so a global of the same name wins.
    let mut symbols = HashMap::new();
    for pass_global in [false, true] {
        for (i, s) in obj.symbols.iter().enumerate() {
            let named = !s.name.is_empty() && !s.name.starts_with(".L") && !matches!(s.kind, SymbolType::Section | SymbolType::File);
            let defined = matches!(s.def, SymbolDef::Section { .. } | SymbolDef::Common { .. } | SymbolDef::Absolute(_));
            if named && defined && (s.binding != Binding::Local) == pass_global {
                if let Some(v) = values.get(i) {
                    symbols.insert(s.name.clone(), v.at(base));
                }
            }
        }
    }

    // Commands, now with addresses.
    let cmd_err = |line: usize, msg: String| PatchError::Command { file: commands.name.clone(), line, msg };
    let mut resolved = Vec::with_capacity(pending.len());
    for (cmd, pend) in commands.commands.iter().zip(pending) {
        let (patch_symbol, action) = match pend {
            Pending::Jump { target, patch_symbol, patch } => {
                let patch_addr = patch.at(base);
                let jump = jump_bytes(target.addr, patch_addr);
                if !fits(target.size, jump.len()) {
                    return Err(cmd_err(
                        cmd.line,
                        format!(
                            "{} is {} bytes, too small for the {}-byte absolute jump to {patch_addr:#x} (the patch at {base:#x} is more than 2 GiB from {:#x}): place the patch within ±2 GiB of the program so a {}-byte jump is used",
                            cmd.target, target.size, JMP_ABS64_LEN, target.addr, JMP_REL32_LEN
                        ),
                    ));
                }
                (Some(patch_symbol), ResolvedAction::Jump { target_addr: target.addr, target_size: target.size, patch_addr, jump })
            }
            Pending::Variable { target, bytes } => (None, ResolvedAction::Variable { addr: target.addr, size: target.size, bytes }),
            Pending::Pointer { target, patch_symbol, patch } => {
                (Some(patch_symbol), ResolvedAction::Pointer { addr: target.addr, value: patch.at(base) })
            }
        };
        resolved.push(ResolvedCommand { line: cmd.line, target: cmd.target.clone(), patch_symbol, action });
    }

    let linked = LinkedPatch { base, size: lay.size, bytes, symbols, sections };
    Ok((linked, resolved))
}

/// Copies `data` into the image at `off`. The layout guarantees it fits;
/// a bug would drop bytes rather than panic.
fn write(image: &mut [u8], off: u64, data: &[u8]) {
    let Ok(start) = usize::try_from(off) else { return };
    if let Some(dst) = start.checked_add(data.len()).and_then(|end| image.get_mut(start..end)) {
        dst.copy_from_slice(data);
    }
}

/// The value of every patch symbol; undefined ones from the program.
fn resolve_symbols(obj: &PatchObject, program: &HashMap<String, TargetSymbol>) -> Result<Vec<Value>, PatchError> {
    let lay = &obj.layout;
    // Where each symbol is first used, for messages; unused undefined
    // symbols need no resolution.
    let mut used: HashMap<usize, String> = HashMap::new();
    for r in &obj.relocations {
        used.entry(r.symbol).or_insert_with(|| obj.place(r.section, r.offset));
    }
    let mut problems: BTreeSet<String> = BTreeSet::new();
    let mut values = Vec::with_capacity(obj.symbols.len());
    for (i, s) in obj.symbols.iter().enumerate() {
        let v = match &s.def {
            SymbolDef::Section { section, value } => Value::Patch(lay.section_offsets.get(*section).copied().unwrap_or(0) + value),
            SymbolDef::Common { .. } => Value::Patch(lay.commons.iter().find(|c| c.0 == i).map_or(0, |c| c.1)),
            SymbolDef::Absolute(a) => Value::Abs(*a),
            SymbolDef::Unloaded { .. } => Value::Abs(0),
            SymbolDef::Undefined => match used.get(&i).filter(|_| i != 0) {
                None => Value::Abs(0), // the null symbol, or not used by any relocation
                Some(place) => match program.get(&s.name) {
                    Some(t) => match target_problem(&s.name, t) {
                        Some(why) => {
                            problems.insert(format!("{why} (used at {place})"));
                            Value::Abs(0)
                        }
                        None => Value::Abs(t.addr),
                    },
                    None if s.binding == Binding::Weak => Value::Abs(0),
                    None => {
                        problems.insert(format!(
                            "{:?} (used at {place}) is defined neither in the patch nor in the target program's symbol table: define it in the patch or check the name",
                            s.name
                        ));
                        Value::Abs(0)
                    }
                },
            },
        };
        values.push(v);
    }
    if !problems.is_empty() {
        let list: Vec<String> = problems.into_iter().collect();
        return Err(PatchError::Undefined { file: obj.name.clone(), msg: format!("unresolved symbols: {}", list.join("; ")) });
    }
    Ok(values)
}

/// Why a program symbol cannot be used by a patch, if it cannot.
fn target_problem(name: &str, t: &TargetSymbol) -> Option<String> {
    if t.ambiguous {
        return Some(format!("{name:?} names several different local symbols in the target program, so which one is meant is unclear: give the patch its own copy or use a global"));
    }
    match t.kind {
        TargetKind::Tls => Some(format!("{name:?} is a thread-local variable of the target program; a patch cannot address it")),
        TargetKind::Ifunc => Some(format!(
            "{name:?} is a GNU indirect function (IFUNC) in the target program: its symbol is the resolver, not the function (static glibc does this for str*/mem*); implement it in the patch"
        )),
        _ => None,
    }
}

fn resolve_commands(
    obj: &PatchObject,
    commands: &CommandFile,
    program: &HashMap<String, TargetSymbol>,
    values: &[Value],
) -> Result<Vec<Pending>, PatchError> {
    commands.commands.iter().map(|c| resolve_command(obj, &commands.name, c, program, values)).collect()
}

fn resolve_command(
    obj: &PatchObject,
    file: &str,
    cmd: &Command,
    program: &HashMap<String, TargetSymbol>,
    values: &[Value],
) -> Result<Pending, PatchError> {
    let err = |msg: String| PatchError::Command { file: file.to_string(), line: cmd.line, msg };
    let letter = cmd.action.letter();
    let name = &cmd.target;
    let target = *program.get(name).ok_or_else(|| {
        let what = match letter {
            'J' => "function",
            'V' => "variable",
            _ => "pointer",
        };
        err(format!("{letter} target {what} {name:?} is not in the target program's symbol table (check the name, and that --binary is the program running in the guest)"))
    })?;
    if let Some(why) = target_problem(name, &target) {
        return Err(err(format!("{letter} target {why}")));
    }
    let patch_value = |sym: &str, code: bool| -> Result<Value, PatchError> {
        let (i, s) = obj.defined(sym).ok_or_else(|| {
            err(format!("{letter} {name}: patch symbol {sym:?} is not defined in the patch object {} (is it static and optimized away, or misspelled?)", obj.name))
        })?;
        if code {
            let in_text = match s.def {
                SymbolDef::Section { section, .. } => obj.sections.get(section).is_some_and(|x| x.kind == SectionKind::Text),
                _ => false,
            };
            if !in_text {
                return Err(err(format!("J {name}: patch symbol {sym:?} is not code (not in an executable section)")));
            }
        }
        values.get(i).copied().ok_or_else(|| err(format!("patch symbol {sym:?} has no value")))
    };
    match &cmd.action {
        Action::Jump { patch_function } => {
            match target.kind {
                TargetKind::Func => {}
                TargetKind::Object => return Err(err(format!("J target {name:?} is a variable, not a function: use V or P for variables"))),
                _ => return Err(err(format!("J target {name:?} is not a function symbol (STT_FUNC)"))),
            }
            if !fits(target.size, JMP_REL32_LEN) {
                return Err(err(format!("J target {name} is {} bytes, too small for even a {JMP_REL32_LEN}-byte jump", target.size)));
            }
            let patch = patch_value(patch_function, true)?;
            Ok(Pending::Jump { target, patch_symbol: patch_function.clone(), patch })
        }
        Action::Variable { bytes } => {
            if target.kind == TargetKind::Func {
                return Err(err(format!("V target {name:?} is a function, not a variable: use J to replace a function")));
            }
            if bytes.len() as u64 > target.size {
                return Err(err(format!(
                    "V {name}: {} bytes given, but the variable is {} bytes (from the program's symbol table); give at most {} bytes",
                    bytes.len(),
                    target.size,
                    target.size
                )));
            }
            Ok(Pending::Variable { target, bytes: bytes.clone() })
        }
        Action::Pointer { patch_symbol } => {
            if target.kind == TargetKind::Func {
                return Err(err(format!("P target {name:?} is a function, not a pointer variable: use J to replace a function")));
            }
            if target.size != 8 {
                return Err(err(format!("P target {name} is {} bytes; a pointer is 8 bytes on x86-64", target.size)));
            }
            let patch = patch_value(patch_symbol, false)?;
            Ok(Pending::Pointer { target, patch_symbol: patch_symbol.clone(), patch })
        }
    }
}
