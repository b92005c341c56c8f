//! Kernel symbols from the kallsyms tables inside a vmlinux (found by
//! content: see `kallsyms_locate`), decoded the way kernel/kallsyms.c does.
use serde::{Deserialize, Serialize};

use super::elf::{ElfImage, Section, SHF_ALLOC, SHF_EXECINSTR};
use super::error::ProfileError;
use super::kallsyms_locate::{self as locate, AddressEncoding, Names, Tokens};

/// One kallsyms entry: unslid address and the type letter (`T`, `t`, `D`,
/// `d`, `B`, `b`, `R`, `r`, `A`, `W`, ...; upper case is global).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSymbol {
    pub name: String,
    pub addr: u64,
    pub kind: char,
}

/// Where the tables are (kernel virtual addresses of the unslid image) and
/// how they encode addresses: enough to check them against a live guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KallsymsTables {
    pub section: String,
    pub num_syms: u32,
    pub addresses: u64,
    pub relative_base: Option<u64>,
    pub encoding: AddressEncoding,
    pub num_syms_addr: u64,
    pub names: u64,
    pub markers: u64,
    pub token_table: u64,
    pub token_index: u64,
}

/// The symbols of `vmlinux`, in kallsyms (address) order.
pub fn extract(vmlinux: &[u8]) -> Result<Vec<KernelSymbol>, ProfileError> {
    extract_with_tables(vmlinux).map(|(syms, _)| syms)
}

/// The symbols and where their tables were found.
pub fn extract_with_tables(vmlinux: &[u8]) -> Result<(Vec<KernelSymbol>, KallsymsTables), ProfileError> {
    let elf = ElfImage::parse(vmlinux)?;
    extract_from_elf(&elf)
}

pub fn extract_from_elf(elf: &ElfImage<'_>) -> Result<(Vec<KernelSymbol>, KallsymsTables), ProfileError> {
    let mut regions: Vec<&Section> = elf
        .sections
        .iter()
        .filter(|s| s.has_data() && s.flags & SHF_ALLOC != 0 && s.flags & SHF_EXECINSTR == 0)
        .collect();
    // .rodata is where the kernel links them; look there first.
    regions.sort_by_key(|s| s.name != ".rodata");
    let mut token_tables = 0;
    for sec in regions {
        let Some(r) = elf.section_data(sec) else { continue };
        for tokens in locate::token_tables(r) {
            token_tables += 1;
            if let Some(found) = tables_at(r, sec, &tokens) {
                return Ok(found);
            }
        }
    }
    Err(ProfileError::no_kallsyms(if token_tables == 0 {
        "no kallsyms_token_table (256 NUL-terminated tokens with the digits as tokens 48..57, then their u16 index) in any allocated data section".to_string()
    } else {
        format!("{token_tables} token table(s) found, but no kallsyms_names/markers/offsets that decode consistently with them")
    }))
}

pub(super) fn tables_at(r: &[u8], sec: &Section, tokens: &Tokens<'_>) -> Option<(Vec<KernelSymbol>, KallsymsTables)> {
    let va0 = sec.addr;
    let (names, _markers) =
        locate::find_names(r, va0, tokens.table, 4).or_else(|| locate::find_names(r, va0, tokens.table, 8))?;
    let addrs = locate::addresses(r, va0, &names, tokens.index)?;
    let symbols = decode(r, &names, tokens, &addrs.addrs)?;
    let va = |p: u64| va0.wrapping_add(p);
    let tables = KallsymsTables {
        section: sec.name.clone(),
        num_syms: names.num_syms,
        addresses: va(addrs.table),
        relative_base: addrs.relative_base,
        encoding: addrs.encoding,
        num_syms_addr: va(names.num_syms_pos),
        names: va(names.names),
        markers: va(names.markers),
        token_table: va(tokens.table),
        token_index: va(tokens.index),
    };
    Some((symbols, tables))
}

/// Expands every name: each compressed byte is an index into the token
/// table; the first expanded byte is the type letter.
fn decode(r: &[u8], names: &Names, tokens: &Tokens<'_>, addrs: &[u64]) -> Option<Vec<KernelSymbol>> {
    let mut out = Vec::with_capacity(addrs.len());
    let mut pos = names.names;
    let mut buf = Vec::with_capacity(64);
    for &addr in addrs {
        let (hdr, len) = locate::entry_len(r, pos)?;
        let data = super::bytes::slice(r, pos + hdr, len)?;
        buf.clear();
        for &b in data {
            buf.extend_from_slice(tokens.tokens.get(usize::from(b))?);
        }
        let (&kind, name) = buf.split_first()?;
        if !kind.is_ascii_graphic() || name.is_empty() {
            return None;
        }
        out.push(KernelSymbol { name: String::from_utf8_lossy(name).into_owned(), addr, kind: char::from(kind) });
        pos += hdr + len;
    }
    Some(out)
}
