//! Lookups over the address-sorted symbol list, and its compact cache form
//! (one `/proc/kallsyms`-style line per symbol: `ffffffff81000000 T _text`).
use serde::{Deserialize, Deserializer, Serializer};

use super::kallsyms::KernelSymbol;
use super::kallsyms_locate::KERNEL_HALF;

/// Symbol indices sorted by (name, index), so the first of duplicate
/// names (kallsyms has many local ones) is the one in lowest table order.
pub fn name_index(symbols: &[KernelSymbol]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..symbols.len() as u32).collect();
    idx.sort_by(|&a, &b| symbols[a as usize].name.cmp(&symbols[b as usize].name).then(a.cmp(&b)));
    idx
}

/// The indices (into `symbols`, in table order) of the symbols called `name`.
pub fn named<'s>(symbols: &[KernelSymbol], index: &'s [u32], name: &str) -> &'s [u32] {
    let name_at = |i: &u32| symbols.get(*i as usize).map_or("", |s| s.name.as_str());
    let start = index.partition_point(|i| name_at(i) < name);
    let len = index[start..].partition_point(|i| name_at(i) == name);
    &index[start..start + len]
}

/// The address range that symbolization answers for: from `_text` (or
/// the first kernel-half symbol) to `_end` or the last symbol, whichever is
/// later. Per-cpu offsets (type `A`, small numbers) are not addresses.
pub fn text_range(symbols: &[KernelSymbol], addr_of: impl Fn(&str) -> Option<u64>) -> Option<(u64, u64)> {
    let lo = addr_of("_text").or_else(|| symbols.iter().map(|s| s.addr).find(|&a| a >= KERNEL_HALF))?;
    let last = symbols.last()?.addr;
    let hi = addr_of("_end").unwrap_or(last).max(last).checked_add(1)?;
    Some((lo, hi))
}

/// The symbol at or before `addr` (the first of aliases at one address, as
/// the kernel's own lookup picks) and the offset into it.
pub fn symbolize(symbols: &[KernelSymbol], range: (u64, u64), addr: u64) -> Option<(&str, u64)> {
    if addr < range.0 || addr >= range.1 {
        return None;
    }
    let mut i = symbols.partition_point(|s| s.addr <= addr).checked_sub(1)?;
    let at = symbols.get(i)?.addr;
    while i > 0 && symbols.get(i - 1).is_some_and(|s| s.addr == at) {
        i -= 1;
    }
    let s = symbols.get(i)?;
    Some((s.name.as_str(), addr - s.addr))
}

pub fn serialize<S: Serializer>(symbols: &[KernelSymbol], ser: S) -> Result<S::Ok, S::Error> {
    use std::fmt::Write;
    let mut text = String::with_capacity(symbols.len() * 40);
    for s in symbols {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "{:016x} {} {}", s.addr, s.kind, s.name);
    }
    ser.serialize_str(&text)
}

pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<KernelSymbol>, D::Error> {
    let text = String::deserialize(de)?;
    text.lines()
        .map(|line| parse_line(line).ok_or_else(|| serde::de::Error::custom(format!("bad symbol line {line:?}"))))
        .collect()
}

fn parse_line(line: &str) -> Option<KernelSymbol> {
    let (addr, rest) = line.split_once(' ')?;
    let (kind, name) = rest.split_once(' ')?;
    let mut kind_chars = kind.chars();
    let k = kind_chars.next().filter(|_| kind_chars.next().is_none())?;
    Some(KernelSymbol { name: name.to_string(), addr: u64::from_str_radix(addr, 16).ok()?, kind: k })
}
