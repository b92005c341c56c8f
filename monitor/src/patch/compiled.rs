//! How the target program's functions were compiled, from its DWARF: the
//! `DW_AT_producer` of the compile unit that covers a function, where gcc
//! records its command-line flags (unless `-gno-record-gcc-switches`).
//!
//! What this is for: gcc's interprocedural register allocation (`-fipa-ra`,
//! on at -O2) lets a caller keep values in the registers that the body of
//! the function it calls happens to leave alone. Redirecting that function
//! to a patch that uses more registers (one that calls a function, say)
//! then corrupts its callers. Linux builds livepatchable kernels with
//! `-flive-patching=inline-clone`, which turns that off; a program built
//! without it gets a warning at apply time.

use gimli::{EndianSlice, LittleEndian, SectionId};

use super::elf::Elf;

/// What the compile unit around an address says about IPA-RA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterAssumptions {
    /// Built so that callers cannot depend on the callee's registers
    /// (not gcc, not optimised, or with IPA-RA turned off).
    None,
    /// Built by gcc with IPA-RA on; `producer` is the compiler's line.
    Possible { producer: String },
    /// No DWARF for that address (stripped, or built without -g), or no
    /// flags recorded: nothing can be said.
    Unknown,
}

/// What the compiler line of the compile unit covering each of `vaddrs`
/// (link-time addresses, before any PIE load base) says, in order. The
/// DWARF is read once; a DWARF that cannot be read counts as none.
pub fn register_assumptions(elf_bytes: &[u8], vaddrs: &[u64]) -> Vec<RegisterAssumptions> {
    let producers = producers(elf_bytes);
    vaddrs
        .iter()
        .map(|&va| match producers.iter().find(|(ranges, _)| ranges.iter().any(|r| r.contains(&va))) {
            Some((_, p)) => judge(p),
            None => RegisterAssumptions::Unknown,
        })
        .collect()
}

/// Judges one `DW_AT_producer` line, e.g.
/// "GNU C17 12.2.0 -mtune=generic -march=x86-64 -g -O2 -fno-pie".
pub fn judge(producer: &str) -> RegisterAssumptions {
    if !producer.starts_with("GNU ") {
        return RegisterAssumptions::None;
    }
    let flags: Vec<&str> = producer.split_whitespace().filter(|w| w.starts_with('-')).collect();
    if flags.is_empty() {
        return RegisterAssumptions::Unknown;
    }
    // The last -O wins, as on gcc's command line; -O, -O1 and -Og leave
    // IPA-RA off.
    let level = flags.iter().rev().find_map(|f| f.strip_prefix("-O")).unwrap_or("0");
    let optimised = matches!(level, "2" | "3" | "s" | "fast" | "z");
    let ipa_ra = flags.iter().rev().find_map(|f| match *f {
        "-fipa-ra" => Some(true),
        "-fno-ipa-ra" => Some(false),
        f if f.starts_with("-flive-patching") => Some(false),
        _ => None,
    });
    if ipa_ra.unwrap_or(optimised) {
        RegisterAssumptions::Possible { producer: producer.to_string() }
    } else {
        RegisterAssumptions::None
    }
}

/// Each compile unit's address ranges and compiler line.
fn producers(elf_bytes: &[u8]) -> Vec<(Vec<std::ops::Range<u64>>, String)> {
    let Ok(elf) = Elf::parse(elf_bytes) else { return Vec::new() };
    let load = |id: SectionId| -> Result<EndianSlice<'_, LittleEndian>, gimli::Error> {
        let data = elf
            .sections
            .iter()
            .position(|s| s.name == id.name())
            .and_then(|i| elf.section_data(i).ok())
            .unwrap_or(&[]);
        Ok(EndianSlice::new(data, LittleEndian))
    };
    let Ok(dwarf) = gimli::Dwarf::load(load) else { return Vec::new() };
    let mut out = Vec::new();
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else { continue };
        let Ok(mut unit_ranges) = dwarf.unit_ranges(&unit) else { continue };
        let mut ranges = Vec::new();
        while let Ok(Some(r)) = unit_ranges.next() {
            ranges.push(r.begin..r.end);
        }
        let mut entries = unit.entries();
        let Ok(Some((_, root))) = entries.next_dfs() else { continue };
        let Ok(Some(attr)) = root.attr_value(gimli::DW_AT_producer) else { continue };
        if let Ok(p) = dwarf.attr_string(&unit, attr) {
            out.push((ranges, p.to_string_lossy().into_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn possible(p: &str) -> bool {
        matches!(judge(p), RegisterAssumptions::Possible { .. })
    }

    #[test]
    fn gcc_flags_decide() {
        assert!(possible("GNU C17 12.2.0 -mtune=generic -march=x86-64 -g -O2 -fno-pie"));
        assert!(possible("GNU C17 12.2.0 -g -O3"));
        assert!(possible("GNU C17 12.2.0 -g -Os"));
        assert!(possible("GNU C17 12.2.0 -g -O0 -fipa-ra"));
        assert!(!possible("GNU C17 12.2.0 -g -O2 -flive-patching=inline-clone"));
        assert!(!possible("GNU C17 12.2.0 -g -O2 -fno-ipa-ra"));
        assert!(!possible("GNU C17 12.2.0 -g -O2 -O0"));
        assert!(!possible("GNU C17 12.2.0 -g -O1"));
        assert!(!possible("GNU C17 12.2.0 -g"));
        assert!(!possible("clang version 16.0.6"));
        assert_eq!(judge("GNU C17 12.2.0"), RegisterAssumptions::Unknown);
    }

    /// A real gcc build: the CU of a function says what its flags were.
    #[test]
    fn reads_the_producer_of_a_gcc_build() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("p.c");
        std::fs::write(&src, "__attribute__((noinline)) int f(int x) { return x + 1; }\nint main(void) { return f(1); }\n").unwrap();
        for (flags, expect_possible) in [(&["-O2"][..], true), (&["-O2", "-flive-patching=inline-clone"][..], false)] {
            let out = dir.path().join("p");
            let st = std::process::Command::new("gcc").args(["-g", "-no-pie"]).args(flags).arg(&src).arg("-o").arg(&out).status().unwrap();
            assert!(st.success());
            let bytes = std::fs::read(&out).unwrap();
            let elf = Elf::parse(&bytes).unwrap();
            let symtab = elf.sections.iter().position(|s| s.name == ".symtab").unwrap();
            let f = elf.symbols(symtab).unwrap().into_iter().find(|s| s.name == "f").unwrap();
            let [got] = &register_assumptions(&bytes, &[f.value])[..] else { unreachable!() };
            assert_eq!(matches!(got, RegisterAssumptions::Possible { .. }), expect_possible, "{flags:?}: {got:?}");
            // Outside any compile unit with DWARF (the C library's code).
            let stripped = dir.path().join("s");
            std::process::Command::new("strip").arg("-g").arg(&out).arg("-o").arg(&stripped).status().unwrap();
            assert_eq!(register_assumptions(&std::fs::read(&stripped).unwrap(), &[f.value]), [RegisterAssumptions::Unknown]);
        }
    }
}
