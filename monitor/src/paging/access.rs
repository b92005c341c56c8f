//! Reads and writes of guest virtual ranges, one page at a time.
//!
//! The monitor acts as the hypervisor: it ignores R/W, U/S and NX (live
//! patching writes read-only kernel text), and only needs each page to be
//! present and backed by guest RAM.
use super::{translate, Level, PagingError, PagingMode, PhysRead, PhysWrite, Translation, TranslationCache};

const PAGE: u64 = 4096;

fn lookup(
    mem: &impl PhysRead,
    cache: &mut Option<&mut TranslationCache>,
    cr3: u64,
    mode: PagingMode,
    va: u64,
) -> Result<Translation, PagingError> {
    match cache {
        Some(c) => c.translate(mem, cr3, mode, va),
        None => translate(mem, cr3, mode, va),
    }
}

/// The pieces of `[va, va+len)` that lie in one 4 KiB page each: (va,
/// offset into the caller's buffer, length).
fn chunks(va: u64, len: usize) -> Result<impl Iterator<Item = (u64, usize, usize)>, PagingError> {
    if len > 0 && va.checked_add(len as u64 - 1).is_none() {
        return Err(PagingError::RangeWraps { va, len: len as u64 });
    }
    let mut done = 0usize;
    Ok(std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let cur = va + done as u64;
        let in_page = (PAGE - (cur & (PAGE - 1))) as usize;
        let n = in_page.min(len - done);
        let item = (cur, done, n);
        done += n;
        Some(item)
    }))
}

/// The guest-physical address of the piece `[va, va+len)` (inside one
/// page), checked to be RAM, and the level of the entry that maps it.
fn resolve(
    mem: &impl PhysRead,
    cache: &mut Option<&mut TranslationCache>,
    cr3: u64,
    mode: PagingMode,
    va: u64,
    len: usize,
) -> Result<(u64, Level), PagingError> {
    let t = lookup(mem, cache, cr3, mode, va)?;
    let level = t.page_size.leaf_level();
    if !mem.phys_contains(t.pa, len as u64) {
        return Err(PagingError::PageOutsideRam { va, level, pa: t.pa, len: len as u64 });
    }
    Ok((t.pa, level))
}

/// Read guest-virtual `[va, va+buf.len())` through the page tables at
/// `cr3`. A failure names the first byte that could not be read; `buf` is
/// then partly filled.
pub fn read_virt(
    mem: &impl PhysRead,
    mut cache: Option<&mut TranslationCache>,
    cr3: u64,
    mode: PagingMode,
    va: u64,
    buf: &mut [u8],
) -> Result<(), PagingError> {
    for (cva, off, n) in chunks(va, buf.len())? {
        let (pa, level) = resolve(mem, &mut cache, cr3, mode, cva, n)?;
        mem.read_phys(pa, &mut buf[off..off + n]).map_err(|_| PagingError::PageOutsideRam {
            va: cva,
            level,
            pa,
            len: n as u64,
        })?;
    }
    Ok(())
}

/// Write `data` at guest-virtual `va` through the page tables at `cr3`.
/// Every page is translated and checked first: if any byte cannot be
/// written, nothing is, and the error names the first such byte.
pub fn write_virt(
    mem: &impl PhysWrite,
    mut cache: Option<&mut TranslationCache>,
    cr3: u64,
    mode: PagingMode,
    va: u64,
    data: &[u8],
) -> Result<(), PagingError> {
    let mut plan = Vec::with_capacity(data.len() / PAGE as usize + 2);
    for (cva, off, n) in chunks(va, data.len())? {
        let (pa, level) = resolve(mem, &mut cache, cr3, mode, cva, n)?;
        plan.push((cva, pa, level, off, n));
    }
    for (cva, pa, level, off, n) in plan {
        mem.write_phys(pa, &data[off..off + n]).map_err(|_| PagingError::PageOutsideRam {
            va: cva,
            level,
            pa,
            len: n as u64,
        })?;
    }
    Ok(())
}
