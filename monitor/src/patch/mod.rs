//! Live-patch input, validation and linking (docs/patching.md). A pure
//! library with no VM access: it turns a patch object (`gcc -c` output),
//! a Pannus-style command file and the target program's ELF into the bytes
//! to write at a chosen base address in the target process and the list of
//! jumps and variable writes to make.
//!
//! ```text
//! let obj = PatchObject::parse("fix.o", &std::fs::read("fix.o")?)?;
//! let cmds = CommandFile::parse("fix.cmd", &std::fs::read_to_string("fix.cmd")?)?;
//! let program = target_symbols(&std::fs::read(binary)?, load_base)?;
//! check(&obj, &cmds, &program)?;                 // before touching the guest
//! let base = /* allocate obj.required_size() bytes in the target */;
//! let (patch, commands) = link(&obj, &cmds, &program, base)?;
//! ```
pub mod commands;
pub mod compiled;
mod elf;
pub mod error;
pub mod jump;
pub mod link;
pub mod object;
pub mod sized;
pub mod target;
#[cfg(test)]
mod tests;

pub use commands::{Action, Command, CommandFile};
pub use compiled::{register_assumptions, RegisterAssumptions};
pub use error::PatchError;
pub use jump::{fits, jump_bytes, jump_len, JMP_ABS64_LEN, JMP_REL32_LEN};
pub use link::{check, link, required_size, LinkedPatch, PlacedSection, ResolvedAction, ResolvedCommand};
pub use object::{PatchObject, Placement};
pub use sized::sized_patch_source;
pub use target::{program_bytes, target_is_pie, target_symbols, TargetKind, TargetSymbol};
