//! Errors of patch input, validation and linking. Each names the file (and
//! line, section or symbol) at fault and, where there is one, the fix.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// A command-file line is wrong, or cannot be resolved.
    #[error("{file}:{line}: {msg}")]
    Command { file: String, line: usize, msg: String },
    /// The command file as a whole is wrong (e.g. it has no commands).
    #[error("{file}: {msg}")]
    CommandFile { file: String, msg: String },
    /// The patch object is not an ELF file dvisor can load, or is garbled.
    #[error("{file}: {msg}")]
    Object { file: String, msg: String },
    /// A section of the patch object that cannot be loaded into a live process.
    #[error("{file}: section {section} is not supported: {reason}")]
    Section { file: String, section: String, reason: String },
    /// A relocation type dvisor does not apply.
    #[error("{file}: relocation {kind} at {place} is not supported ({reason})")]
    Relocation { file: String, kind: String, place: String, reason: String },
    /// A relocation whose value does not fit its field at this base.
    #[error("{file}: relocation {kind} at {place} to {symbol} overflows: {msg}")]
    Overflow { file: String, kind: String, place: String, symbol: String, msg: String },
    /// Symbols the patch uses that neither the patch nor the program defines.
    #[error("{file}: {msg}")]
    Undefined { file: String, msg: String },
    /// The target program's ELF cannot give a symbol table.
    #[error("target program: {0}")]
    Program(String),
    /// The address chosen for the patch cannot hold it.
    #[error("{file}: {msg}")]
    Base { file: String, msg: String },
}
