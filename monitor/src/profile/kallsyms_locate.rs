//! Finding the kernel's kallsyms tables by their content (the vmlinux has no
//! symbol table that names them). All positions are byte offsets into one
//! region (an ELF section's bytes); `va0` is the region's virtual address,
//! used for the 8-byte alignment every table label has (`ALGN`).
//!
//! Layout written by scripts/kallsyms.c (x86-64, 6.1; see docs/vmi-profile.md):
//! `offsets[N]` (s32) · `relative_base` (u64) · `num_syms` (u32) · `names` ·
//! `markers[(N+255)/256]` (u32) · [`seqs_of_names` (3 bytes per symbol)] ·
//! `token_table` (256 NUL-terminated strings) · `token_index[256]` (u16).
//! Newer kernels move `offsets`/`relative_base` behind `token_index`; older
//! ones have u64 markers or absolute u64 `addresses`. All are tried, and
//! every candidate is validated before it is used.
use super::bytes::{align_up, cstr_at, u16_at, u32_at, u64_at, u8_at};

/// Longest token accepted (real ones are a few dozen bytes).
const MAX_TOKEN: usize = 256;
/// Longest compressed name entry (KSYM_NAME_LEN is 512 since 6.1).
const MAX_ENTRY: u64 = 2 + 1024;
/// How far before the token table the markers may start (names of ~100k
/// symbols take ~1.5 MB; markers + seqs_of_names a few hundred KB).
const MARKER_WINDOW: u64 = 32 << 20;
/// A real kernel has thousands of symbols; two marker blocks at least.
const MIN_MARKERS: usize = 2;
/// The lowest canonical kernel-half address.
pub const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// The token table and its index.
#[derive(Debug, Clone)]
pub struct Tokens<'a> {
    pub table: u64,
    pub index: u64,
    pub tokens: Vec<&'a [u8]>,
}

/// The names blob and its markers.
#[derive(Debug, Clone)]
pub struct Names {
    pub num_syms: u32,
    pub num_syms_pos: u64,
    pub names: u64,
    pub markers: u64,
}

/// How `kallsyms_offsets`/`kallsyms_addresses` encode the addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressEncoding {
    /// s32 offsets: >= 0 absolute (per-cpu), < 0 is `relative_base - 1 - off`.
    AbsolutePercpu,
    /// u32 offsets from `relative_base`.
    Relative,
    /// u64 absolute addresses (CONFIG_KALLSYMS_BASE_RELATIVE=n).
    Absolute,
}

#[derive(Debug, Clone)]
pub struct Addresses {
    pub table: u64,
    pub relative_base: Option<u64>,
    pub encoding: AddressEncoding,
    pub addrs: Vec<u64>,
}

/// Token tables in `r`: a run of 256 NUL-terminated strings whose entries
/// for '0'..'9' are the digits themselves, followed by a u16[256] index of
/// exactly those strings' offsets.
pub fn token_tables(r: &[u8]) -> Vec<Tokens<'_>> {
    const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
    memchr::memmem::find_iter(r, DIGITS).filter_map(|hit| token_table_at_digits(r, hit as u64)).collect()
}

fn token_table_at_digits(r: &[u8], digits: u64) -> Option<Tokens<'_>> {
    // Walk back over the 48 tokens before '0' (one per byte value 0..=47).
    let mut pos = digits;
    for _ in 0..48 {
        let nul = pos.checked_sub(1)?;
        if u8_at(r, nul)? != 0 {
            return None;
        }
        let mut start = nul;
        while start > 0 && u8_at(r, start - 1)? != 0 {
            start -= 1;
            if nul - start > MAX_TOKEN as u64 {
                return None;
            }
        }
        if start == nul {
            return None; // an empty token
        }
        pos = start;
    }
    let table = pos;
    let mut tokens = Vec::with_capacity(256);
    let mut offsets = Vec::with_capacity(256);
    let mut at = table;
    for _ in 0..256 {
        let tok = cstr_at(r, at, MAX_TOKEN)?;
        if tok.is_empty() {
            return None;
        }
        offsets.push(at - table);
        tokens.push(tok);
        at += tok.len() as u64 + 1;
    }
    let index = (0..8).map(|pad| align_up(at, 2) + 2 * pad).find(|&idx| {
        offsets.iter().enumerate().all(|(i, &o)| u16_at(r, idx + 2 * i as u64).map(u64::from) == Some(o))
    })?;
    Some(Tokens { table, index, tokens })
}

/// The highest 8-aligned (in virtual addresses) position <= `p`.
fn align_down(va0: u64, p: u64) -> Option<u64> {
    p.checked_sub(va0.wrapping_add(p) % 8)
}

/// The names and markers before the token table at `before`. Markers are
/// searched nearest first: 8-aligned runs of `elem`-byte values that start
/// at 0 and grow by 2..=`MAX_ENTRY` bytes per symbol (256 symbols per
/// marker); each run is accepted only if a names blob ends right before it.
pub fn find_names(r: &[u8], va0: u64, before: u64, elem: u64) -> Option<(Names, Vec<u64>)> {
    let read = |p: u64| if elem == 4 { u32_at(r, p).map(u64::from) } else { u64_at(r, p) };
    let floor = before.saturating_sub(MARKER_WINDOW).max(8);
    let mut p = align_down(va0, before.checked_sub(elem)?)?;
    while p >= floor {
        if read(p) == Some(0) {
            let mut run = vec![0u64];
            let mut q = p + elem;
            while q + elem <= before {
                let (Some(prev), Some(v)) = (run.last().copied(), read(q)) else { break };
                if v < prev + 256 * 2 || v > prev + 256 * MAX_ENTRY {
                    break;
                }
                run.push(v);
                q += elem;
            }
            // The value after the last marker can pass for one more marker
            // by chance: also try the run one or two shorter.
            for keep in (run.len().saturating_sub(2)..=run.len()).rev().filter(|&k| k >= MIN_MARKERS) {
                if let Some(names) = names_before(r, va0, p, &run[..keep]) {
                    run.truncate(keep);
                    return Some((names, run));
                }
            }
        }
        p = p.checked_sub(8)?;
    }
    None
}

/// Finds `num_syms` and the names blob that ends just before the markers at
/// `markers_pos`: entry 256*k must start at markers[k], and the N entries
/// must end at most 8 bytes (alignment padding) before the markers.
fn names_before(r: &[u8], va0: u64, markers_pos: u64, markers: &[u64]) -> Option<Names> {
    let m = markers.len() as u64;
    let last = *markers.last()?;
    let newest = markers_pos.checked_sub(last + 2)?;
    let oldest = newest.saturating_sub(256 * MAX_ENTRY);
    let mut s = align_down(va0, newest)?;
    while s >= oldest.max(8) {
        if let Some(n) = u32_at(r, s - 8) {
            let n64 = u64::from(n);
            if n64 > 256 * (m - 1) && n64 <= 256 * m {
                if let Some(end) = walk_names(r, s, n, markers) {
                    if end <= markers_pos && markers_pos - end < 8 {
                        return Some(Names { num_syms: n, num_syms_pos: s - 8, names: s, markers: markers_pos });
                    }
                }
            }
        }
        s = s.checked_sub(8)?;
    }
    None
}

/// One names entry at `pos`: (header length, compressed length). The length
/// is one byte, or two (ULEB128, 6.1+) when the first has bit 7 set.
pub fn entry_len(r: &[u8], pos: u64) -> Option<(u64, u64)> {
    let b0 = u64::from(u8_at(r, pos)?);
    if b0 & 0x80 == 0 {
        return Some((1, b0));
    }
    let b1 = u64::from(u8_at(r, pos + 1)?);
    Some((2, (b0 & 0x7f) | (b1 << 7)))
}

/// Walks `n` entries from `start`, checking them against the markers;
/// returns where the last one ends.
fn walk_names(r: &[u8], start: u64, n: u32, markers: &[u64]) -> Option<u64> {
    let mut pos = start;
    for i in 0..n as usize {
        if i % 256 == 0 && markers.get(i / 256).copied() != Some(pos - start) {
            return None;
        }
        let (hdr, len) = entry_len(r, pos)?;
        if len == 0 || len > MAX_ENTRY {
            return None;
        }
        pos = pos.checked_add(hdr + len)?;
        if pos > r.len() as u64 {
            return None;
        }
    }
    Some(pos)
}

/// Finds and decodes the address table for `n` symbols: before `num_syms`
/// (up to 6.3) or after the token index (later kernels).
pub fn addresses(r: &[u8], va0: u64, names: &Names, token_index: u64) -> Option<Addresses> {
    let n = u64::from(names.num_syms);
    let after_index = align_up(va0.wrapping_add(token_index + 512), 8).wrapping_sub(va0);
    // (offsets table, relative_base) candidates.
    let rb_before = names.num_syms_pos.checked_sub(8);
    let relative = [
        rb_before.and_then(|rb| Some((rb.checked_sub(align_up(4 * n, 8))?, rb))),
        Some((after_index, after_index + align_up(4 * n, 8))),
    ];
    for (table, rb_pos) in relative.into_iter().flatten() {
        if let Some(found) = decode_offsets(r, table, rb_pos, n) {
            return Some(found);
        }
    }
    let absolute = [names.num_syms_pos.checked_sub(8 * n), Some(after_index)];
    absolute.into_iter().flatten().find_map(|table| {
        let addrs = (0..n).map(|i| u64_at(r, table + 8 * i)).collect::<Option<Vec<u64>>>()?;
        plausible(&addrs).then_some(Addresses { table, relative_base: None, encoding: AddressEncoding::Absolute, addrs })
    })
}

fn decode_offsets(r: &[u8], table: u64, rb_pos: u64, n: u64) -> Option<Addresses> {
    let rb = u64_at(r, rb_pos)?;
    if rb < KERNEL_HALF {
        return None;
    }
    let raw = (0..n).map(|i| u32_at(r, table + 4 * i)).collect::<Option<Vec<u32>>>()?;
    // Offsets of kernel addresses are negative only with absolute per-cpu.
    let encoding = if raw.iter().any(|&o| (o as i32) < 0) { AddressEncoding::AbsolutePercpu } else { AddressEncoding::Relative };
    let addrs: Vec<u64> = raw
        .iter()
        .map(|&o| match encoding {
            AddressEncoding::AbsolutePercpu if (o as i32) >= 0 => u64::from(o),
            AddressEncoding::AbsolutePercpu => rb.wrapping_sub(1).wrapping_sub(i64::from(o as i32) as u64),
            _ => rb.wrapping_add(u64::from(o)),
        })
        .collect();
    plausible(&addrs).then_some(Addresses { table, relative_base: Some(rb), encoding, addrs })
}

/// kallsyms sorts symbols by address, and most are kernel-half addresses.
fn plausible(addrs: &[u64]) -> bool {
    let sorted = addrs.windows(2).all(|w| w[0] <= w[1]);
    let kernel = addrs.iter().filter(|&&a| a >= KERNEL_HALF).count();
    sorted && kernel * 10 >= addrs.len() * 9
}
