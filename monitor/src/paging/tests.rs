//! Tests on synthetic page tables in a vector-backed guest memory.
use super::*;

const P: u64 = PTE_PRESENT;
const RW: u64 = PTE_WRITABLE;
const US: u64 = PTE_USER;
const G: u64 = PTE_GLOBAL;
const NX: u64 = PTE_NX;

use super::test_tables::Tables;

/// xorshift64*: deterministic, seedable, good enough for test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MIB: usize = 1 << 20;
const USER_VA: u64 = 0x0000_7fff_1234_5000;
const KERNEL_VA: u64 = 0xffff_ffff_8100_0000;

#[test]
fn four_level_4k_pages_for_user_and_kernel_addresses() {
    let mut t = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    t.map(USER_VA, 0x20_0000, PageSize::Size4K, P | RW | US);
    t.map(KERNEL_VA, 0x30_0000, PageSize::Size4K, P | G | NX);

    let u = t.tr(USER_VA + 0x123).unwrap();
    assert_eq!(u.pa, 0x20_0123);
    assert_eq!(u.page_size, PageSize::Size4K);
    assert!(u.writable && u.user && !u.nx && !u.global);
    assert_eq!(u.entries().len(), 4);
    assert_eq!(u.entries()[3], 0x20_0000 | P | RW | US);
    assert_eq!(u.page_base(), 0x20_0000);

    let k = t.tr(KERNEL_VA + 0xfff).unwrap();
    assert_eq!(k.pa, 0x30_0fff);
    assert!(!k.writable && !k.user && k.nx && k.global);
    assert_eq!(k.nlevels, 4);

    // The neighbouring page has no PT entry.
    assert_eq!(
        t.tr(USER_VA + 0x1000),
        Err(PagingError::NotPresent { va: USER_VA + 0x1000, level: Level::Pt, entry: 0 })
    );
}

#[test]
fn two_mib_and_one_gib_pages() {
    let mut t = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    let va2m = 0xffff_8880_0020_0000;
    let va1g = 0xffff_8881_0000_0000;
    t.map(va2m, 0x4000_0000, PageSize::Size2M, P | RW | G | NX);
    t.map(va1g, 0x1_0000_0000, PageSize::Size1G, P | RW);

    let a = t.tr(va2m + 0x1_2345).unwrap();
    assert_eq!(a.pa, 0x4001_2345);
    assert_eq!(a.page_size, PageSize::Size2M);
    assert_eq!(a.nlevels, 3);
    assert!(a.global && a.nx && a.writable && !a.user);
    assert_eq!(a.page_base(), 0x4000_0000);

    let b = t.tr(va1g + 0x3fff_ffff).unwrap();
    assert_eq!(b.pa, 0x1_3fff_ffff);
    assert_eq!(b.page_size, PageSize::Size1G);
    assert_eq!(b.nlevels, 2);

    // Bit 12 of a large-page entry is PAT, not an address bit.
    t.modify(va2m, Level::Pd, 1 << 12, 0);
    assert_eq!(t.tr(va2m + 5).unwrap().pa, 0x4000_0005);
    t.modify(va1g, Level::Pdpt, 1 << 12, 0);
    assert_eq!(t.tr(va1g + 5).unwrap().pa, 0x1_0000_0005);
}

#[test]
fn five_level_paging_translates_57_bit_addresses() {
    let mut t = Tables::new(PagingMode::FIVE_LEVEL, 4 * MIB);
    let kva = 0xff11_0000_0000_1000; // canonical only with LA57
    let uva = 0x00ff_0000_0040_0000;
    t.map(kva, 0x20_0000, PageSize::Size4K, P | RW);
    t.map(uva, 0x40_0000, PageSize::Size2M, P | US);
    t.map(USER_VA, 0x21_0000, PageSize::Size4K, P | US | RW);

    let k = t.tr(kva + 8).unwrap();
    assert_eq!(k.pa, 0x20_0008);
    assert_eq!(k.nlevels, 5);
    let u = t.tr(uva + 0x1_0000).unwrap();
    assert_eq!((u.pa, u.page_size, u.nlevels), (0x41_0000, PageSize::Size2M, 4));
    assert!(u.user && !u.writable);
    assert_eq!(t.tr(USER_VA).unwrap().pa, 0x21_0000);

    assert!(!PagingMode::FOUR_LEVEL.is_canonical(kva));
    assert_eq!(translate(&t.mem, t.cr3(), PagingMode::FOUR_LEVEL, kva), Err(PagingError::NonCanonical(kva)));
    assert_eq!(PagingMode::from_cr4(0x3020), PagingMode::FIVE_LEVEL);
    assert_eq!(PagingMode::from_cr4(0x2020), PagingMode::FOUR_LEVEL);
}

#[test]
fn permissions_accumulate_across_levels() {
    let mut t = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    t.map(USER_VA, 0x20_0000, PageSize::Size4K, P | RW | US);
    let base = t.tr(USER_VA).unwrap();
    assert!(base.writable && base.user && !base.nx);

    for level in [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt] {
        t.modify(USER_VA, level, 0, RW);
        let r = t.tr(USER_VA).unwrap();
        assert!(!r.writable && r.user && !r.nx, "R/W clear at {level}");
        t.modify(USER_VA, level, RW, 0);

        t.modify(USER_VA, level, 0, US);
        let r = t.tr(USER_VA).unwrap();
        assert!(r.writable && !r.user && !r.nx, "U/S clear at {level}");
        t.modify(USER_VA, level, US, 0);

        t.modify(USER_VA, level, NX, 0);
        let r = t.tr(USER_VA).unwrap();
        assert!(r.writable && r.user && r.nx, "NX set at {level}");
        t.modify(USER_VA, level, 0, NX);
    }
    // G counts only in the leaf.
    t.modify(USER_VA, Level::Pd, G, 0);
    assert!(!t.tr(USER_VA).unwrap().global);
    t.modify(USER_VA, Level::Pt, G, 0);
    assert!(t.tr(USER_VA).unwrap().global);
}

#[test]
fn a_non_present_entry_at_each_level_names_that_level() {
    for mode in [PagingMode::FOUR_LEVEL, PagingMode::FIVE_LEVEL] {
        let mut t = Tables::new(mode, 4 * MIB);
        t.map(KERNEL_VA, 0x20_0000, PageSize::Size4K, P | RW);
        for &level in mode.levels() {
            let entry = t.modify(KERNEL_VA, level, 0, P);
            let err = t.tr(KERNEL_VA + 0x10).unwrap_err();
            assert_eq!(err, PagingError::NotPresent { va: KERNEL_VA + 0x10, level, entry });
            let msg = err.to_string();
            assert!(msg.contains("0xffffffff81000010") && msg.contains(level.name()), "{msg}");
            t.modify(KERNEL_VA, level, P, 0);
            assert!(t.tr(KERNEL_VA).is_ok());
        }
        let top = mode.levels()[0];
        assert_eq!(t.tr(0x1000), Err(PagingError::NotPresent { va: 0x1000, level: top, entry: 0 }));
    }
}

#[test]
fn non_canonical_addresses_are_refused_before_any_read() {
    let t = Tables::new(PagingMode::FOUR_LEVEL, MIB);
    for va in [0x0000_8000_0000_0000u64, 0xffff_7fff_ffff_ffff, 0x1234_5678_0000_0000] {
        assert_eq!(t.tr(va), Err(PagingError::NonCanonical(va)));
    }
    for va in [0x0000_7fff_ffff_ffffu64, 0xffff_8000_0000_0000, 0, u64::MAX] {
        assert!(PagingMode::FOUR_LEVEL.is_canonical(va));
    }
    let five = PagingMode::FIVE_LEVEL;
    assert!(!five.is_canonical(0x0100_0000_0000_0000));
    assert!(!five.is_canonical(0xfe00_0000_0000_0000));
    assert!(five.is_canonical(0x00ff_ffff_ffff_ffff) && five.is_canonical(0xff00_0000_0000_0000));
    // A virtual read that runs into the hole fails at the first bad byte.
    let mut buf = [0u8; 16];
    let err = read_virt(&t.mem, None, t.cr3(), t.mode, 0x0000_7fff_ffff_fff8, &mut buf).unwrap_err();
    assert!(matches!(err, PagingError::NotPresent { va: 0x0000_7fff_ffff_fff8, .. }), "{err}");
}

#[test]
fn reserved_bits_are_reported() {
    let mut t = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    t.map(KERNEL_VA, 0x20_0000, PageSize::Size4K, P | RW);
    let e = t.modify(KERNEL_VA, Level::Pml4, PTE_PS, 0);
    assert_eq!(
        t.tr(KERNEL_VA),
        Err(PagingError::ReservedBits { va: KERNEL_VA, level: Level::Pml4, entry: e, bits: PTE_PS })
    );
    t.modify(KERNEL_VA, Level::Pml4, 0, PTE_PS);

    let va2m = 0xffff_8880_0000_0000;
    t.map(va2m, 0x40_0000, PageSize::Size2M, P | RW);
    let e = t.modify(va2m, Level::Pd, 1 << 13, 0);
    let err = t.tr(va2m).unwrap_err();
    assert_eq!(err, PagingError::ReservedBits { va: va2m, level: Level::Pd, entry: e, bits: 1 << 13 });
    assert!(err.to_string().contains("PD entry"));

    let va1g = 0xffff_8890_0000_0000;
    t.map(va1g, 0x4000_0000, PageSize::Size1G, P | RW);
    let e = t.modify(va1g, Level::Pdpt, 1 << 29, 0);
    assert_eq!(t.tr(va1g), Err(PagingError::ReservedBits { va: va1g, level: Level::Pdpt, entry: e, bits: 1 << 29 }));
}

#[test]
fn physical_addresses_outside_guest_ram_are_errors() {
    let mut t = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    t.map(KERNEL_VA, 0x20_0000, PageSize::Size4K, P | RW);
    // CR3 itself outside RAM.
    assert_eq!(
        translate(&t.mem, 0x10_0000_0000, t.mode, KERNEL_VA),
        Err(PagingError::TableOutsideRam { va: KERNEL_VA, level: Level::Pml4, table: 0x10_0000_0000 })
    );
    // A PDPTE pointing to a PD beyond RAM.
    let slot = t.slot(KERNEL_VA, Level::Pdpt);
    let good = t.mem.read_u64(slot).unwrap();
    t.mem.write_u64(slot, 0x000f_ffff_ffff_f000 | P | RW).unwrap();
    let err = t.tr(KERNEL_VA).unwrap_err();
    assert_eq!(err, PagingError::TableOutsideRam { va: KERNEL_VA, level: Level::Pd, table: 0x000f_ffff_ffff_f000 });
    assert!(err.to_string().contains("PD table"));
    t.mem.write_u64(slot, good).unwrap();

    // A leaf beyond RAM translates (it may be MMIO) but cannot be read.
    let far = KERNEL_VA + 0x1000;
    t.map(far, 0x8000_0000, PageSize::Size4K, P | RW);
    assert_eq!(t.tr(far).unwrap().pa, 0x8000_0000);
    let mut buf = [0u8; 4];
    assert_eq!(
        read_virt(&t.mem, None, t.cr3(), t.mode, far + 4, &mut buf),
        Err(PagingError::PageOutsideRam { va: far + 4, level: Level::Pt, pa: 0x8000_0004, len: 4 })
    );
    assert!(write_virt(&t.mem, None, t.cr3(), t.mode, far, &buf).is_err());
}

#[test]
fn virtual_reads_and_writes_cross_pages() {
    let mut t = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    let va = KERNEL_VA;
    // Virtually adjacent, physically not.
    t.map(va, 0x30_0000, PageSize::Size4K, P | RW);
    t.map(va + 0x1000, 0x20_0000, PageSize::Size4K, P);
    t.map(va + 0x2000, 0x25_0000, PageSize::Size4K, P);

    let data: Vec<u8> = (0..0x1800u32).map(|i| (i * 7 + 3) as u8).collect();
    let start = va + 0xc00;
    let mut cache = TranslationCache::new();
    write_virt(&t.mem, Some(&mut cache), t.cr3(), t.mode, start, &data).unwrap();

    let mut p0 = vec![0u8; 0x400];
    t.mem.read_phys(0x30_0c00, &mut p0).unwrap();
    assert_eq!(p0, data[..0x400]);
    let mut p1 = vec![0u8; 0x1000];
    t.mem.read_phys(0x20_0000, &mut p1).unwrap();
    assert_eq!(p1, data[0x400..0x1400]);
    let mut p2 = vec![0u8; 0x400];
    t.mem.read_phys(0x25_0000, &mut p2).unwrap();
    assert_eq!(p2, data[0x1400..]);

    let mut back = vec![0u8; data.len()];
    read_virt(&t.mem, None, t.cr3(), t.mode, start, &mut back).unwrap();
    assert_eq!(back, data);
    let mut back2 = vec![0u8; data.len()];
    read_virt(&t.mem, Some(&mut cache), t.cr3(), t.mode, start, &mut back2).unwrap();
    assert_eq!(back2, data);
    assert!(cache.hits() >= 3, "{cache:?}");

    // Empty ranges touch nothing, even at unmapped addresses.
    read_virt(&t.mem, None, t.cr3(), t.mode, 0x1000, &mut []).unwrap();
    write_virt(&t.mem, None, t.cr3(), t.mode, 0x1000, &[]).unwrap();
    // A range that wraps the address space.
    assert_eq!(
        read_virt(&t.mem, None, t.cr3(), t.mode, u64::MAX - 1, &mut [0u8; 4]),
        Err(PagingError::RangeWraps { va: u64::MAX - 1, len: 4 })
    );
}

#[test]
fn a_range_running_into_a_non_present_page_fails_at_its_first_byte_and_writes_nothing() {
    let mut t = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    let va = KERNEL_VA;
    t.map(va, 0x30_0000, PageSize::Size4K, P | RW);
    t.map(va + 0x1000, 0x31_0000, PageSize::Size4K, P | RW);
    // va + 0x2000 is not mapped.
    let before: Vec<u8> = (0..0x2000u32).map(|i| i as u8).collect();
    t.mem.write_phys(0x30_0000, &before[..0x1000]).unwrap();
    t.mem.write_phys(0x31_0000, &before[0x1000..]).unwrap();

    let bad = va + 0x2000;
    let err = write_virt(&t.mem, None, t.cr3(), t.mode, va + 0x800, &[0xaa; 0x2000]).unwrap_err();
    assert!(matches!(err, PagingError::NotPresent { va: v, level: Level::Pt, .. } if v == bad), "{err}");
    let mut after = vec![0u8; 0x2000];
    t.mem.read_phys(0x30_0000, &mut after[..0x1000]).unwrap();
    t.mem.read_phys(0x31_0000, &mut after[0x1000..]).unwrap();
    assert_eq!(after, before, "nothing written");

    let mut buf = vec![0u8; 0x1801];
    let err = read_virt(&t.mem, None, t.cr3(), t.mode, va + 0x800, &mut buf).unwrap_err();
    assert!(matches!(err, PagingError::NotPresent { va: v, .. } if v == bad), "{err}");
    // Up to the last good byte works.
    read_virt(&t.mem, None, t.cr3(), t.mode, va + 0x800, &mut buf[..0x1800]).unwrap();
    assert_eq!(buf[..0x1800], before[0x800..]);
}

/// A table set with 4K, 2M and 1G pages in both halves, for the random tests.
fn mixed_tables(mode: PagingMode) -> (Tables, Vec<u64>) {
    let mut t = Tables::new(mode, 8 * MIB);
    let mut bases = Vec::new();
    for i in 0..64u64 {
        let va = 0x0000_5555_5555_0000 + i * 0x1000;
        t.map(va, 0x20_0000 + (i % 32) * 0x1000, PageSize::Size4K, P | RW | US);
        bases.push(va);
    }
    for i in 0..8u64 {
        let va = 0xffff_8880_0000_0000 + i * 0x20_0000;
        t.map(va, 0x20_0000 * (i + 1), PageSize::Size2M, P | RW | G | NX);
        bases.push(va);
    }
    for i in 0..4u64 {
        let va = 0xffff_8890_0000_0000 + i * 0x4000_0000;
        t.map(va, 0x4000_0000 * (i + 1), PageSize::Size1G, P | RW | G);
        bases.push(va);
    }
    t.map(KERNEL_VA, 0x60_0000, PageSize::Size4K, P | G);
    bases.push(KERNEL_VA);
    (t, bases)
}

#[test]
fn the_cache_answers_exactly_as_uncached_walks_and_counts_hits() {
    for mode in [PagingMode::FOUR_LEVEL, PagingMode::FIVE_LEVEL] {
        let (t, bases) = mixed_tables(mode);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut cache = TranslationCache::new();
        let mut calls = 0u64;
        let mut ok = 0u64;
        for _ in 0..20_000 {
            let va = match rng.below(4) {
                // Inside a mapped page (possibly far into a large one).
                0 | 1 => bases[rng.below(bases.len() as u64) as usize] + rng.below(0x20_0000),
                // Anywhere, canonical or not.
                2 => rng.next(),
                // Near the mapped ones.
                _ => (bases[rng.below(bases.len() as u64) as usize] ^ (rng.below(64) << 12)) + rng.below(0x1000),
            };
            let want = t.tr(va);
            let got = cache.translate(&t.mem, t.cr3(), mode, va);
            calls += 1;
            ok += u64::from(want.is_ok());
            assert_eq!(got, want, "va {va:#x}");
        }
        assert!(ok > 5_000, "the random addresses hit mapped pages ({ok})");
        assert_eq!(cache.hits() + cache.misses(), calls);
        assert!(cache.hits() > 1_000, "{cache:?}");
        assert!(!cache.is_empty());

        // A changed table is seen only after clear(), as after a resume.
        let va = bases[0];
        let old = cache.translate(&t.mem, t.cr3(), mode, va).unwrap();
        t.modify(va, Level::Pt, 0, P);
        assert_eq!(cache.translate(&t.mem, t.cr3(), mode, va), Ok(old));
        cache.clear();
        assert!(cache.is_empty());
        assert!(matches!(cache.translate(&t.mem, t.cr3(), mode, va), Err(PagingError::NotPresent { .. })));
    }
}

#[test]
fn the_cache_stays_bounded_and_separates_address_spaces() {
    let (t, bases) = mixed_tables(PagingMode::FOUR_LEVEL);
    let mut cache = TranslationCache::with_capacity(16);
    for &b in &bases {
        for off in (0..0x10_0000).step_by(0x1000) {
            let _ = cache.translate(&t.mem, t.cr3(), t.mode, b + off);
            assert!(cache.len() <= 16);
        }
    }
    assert!(cache.flushes() > 0);

    // Another root with the same va: a different (here empty) space.
    let mut other = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    other.map(bases[0], 0x30_0000, PageSize::Size4K, P);
    let mut cache = TranslationCache::new();
    let a = cache.translate(&t.mem, t.cr3(), t.mode, bases[0]).unwrap();
    let b = cache.translate(&other.mem, other.cr3() + 0x1000 * 7, other.mode, bases[0]);
    assert_ne!(Ok(a), b);
    // The PCID bits do not split the cache.
    let c = cache.translate(&t.mem, t.cr3() | 0x5, t.mode, bases[0] + 9).unwrap();
    assert_eq!(c.pa, a.pa + 9);
    assert_eq!(cache.hits(), 1);
}

#[test]
fn random_garbage_tables_never_panic_and_stay_bounded() {
    const PAGES: u64 = 64;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut walks = 0u64;
    let mut oks = 0u64;
    for round in 0..64 {
        let mem = VecMemory::new((PAGES * 4096) as usize);
        for slot in 0..PAGES * 512 {
            let e = match rng.below(8) {
                // Plausible entries pointing inside the memory (cycles included).
                0..=3 => (rng.below(PAGES) << 12) | (rng.next() & 0x1ff) | P,
                // Plausible large pages anywhere in the physical space.
                4 => (rng.next() & PHYS_ADDR_MASK) | PTE_PS | P | (rng.next() & NX),
                5 => 0,
                // Pure noise.
                _ => rng.next(),
            };
            mem.write_u64(slot * 8, e).unwrap();
        }
        let mode = PagingMode { la57: round % 2 == 1 };
        let mut cache = TranslationCache::with_capacity(256);
        for _ in 0..500 {
            let cr3 = if rng.below(10) == 0 { rng.next() } else { rng.below(PAGES) << 12 | rng.below(0x1000) };
            let va = rng.next();
            let va = if rng.below(2) == 0 { va } else { ((va << 7) as i64 >> 7) as u64 };
            let r = translate(&mem, cr3, mode, va);
            walks += 1;
            if let Ok(tr) = &r {
                oks += 1;
                assert!(tr.pa <= 0x000f_ffff_ffff_ffff);
                assert!((1..=5).contains(&tr.nlevels));
                assert_eq!(tr.pa & (tr.page_size.bytes() - 1), va & (tr.page_size.bytes() - 1));
            }
            assert_eq!(cache.translate(&mem, cr3, mode, va), r);
            let mut buf = [0u8; 64];
            let _ = read_virt(&mem, Some(&mut cache), cr3, mode, va.wrapping_sub(32), &mut buf);
            let _ = write_virt(&mem, None, cr3, mode, va, &buf[..8]);
        }
    }
    assert_eq!(walks, 64 * 500);
    assert!(oks > 0, "some random walks succeed, so deep walks were exercised");
}

#[test]
fn guest_memory_map_is_a_phys_memory() {
    use dvisor_api::protocol::MemoryRegion;
    let f = tempfile::tempfile().unwrap();
    f.set_len(0x20_0000).unwrap();
    // RAM at [0, 1M) and [4M, 5M): a hole between.
    let regions = vec![
        MemoryRegion { gpa: 0, size: 0x10_0000, offset: 0 },
        MemoryRegion { gpa: 0x40_0000, size: 0x10_0000, offset: 0x10_0000 },
    ];
    let m = crate::guest_memory::GuestMemoryMap::map(f, 0x20_0000, regions, 1).unwrap();
    let w = |gpa: u64, v: u64| m.write_phys(gpa, &v.to_le_bytes()).unwrap();
    // PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT at 0x40_0000 (second region).
    let va = KERNEL_VA;
    w(0x1000 + ((va >> 39) & 0x1ff) * 8, 0x2000 | P | RW);
    w(0x2000 + ((va >> 30) & 0x1ff) * 8, 0x3000 | P | RW);
    w(0x3000 + ((va >> 21) & 0x1ff) * 8, 0x40_0000 | P | RW);
    w(0x40_0000 + ((va >> 12) & 0x1ff) * 8, 0x40_5000 | P | RW);
    w(0x40_0000 + (((va >> 12) + 1) & 0x1ff) * 8, 0x20_0000 | P | RW); // in the hole
    let tr = translate(&m, 0x1000, PagingMode::FOUR_LEVEL, va + 3).unwrap();
    assert_eq!(tr.pa, 0x40_5003);
    write_virt(&m, None, 0x1000, PagingMode::FOUR_LEVEL, va + 0xffc, b"abcd").unwrap();
    let mut b = [0u8; 4];
    m.read_phys(0x40_5ffc, &mut b).unwrap();
    assert_eq!(&b, b"abcd");

    assert!(m.phys_contains(0x40_0000, 0x10_0000));
    assert!(!m.phys_contains(0xf_f000, 0x2000));
    assert!(!m.phys_contains(u64::MAX, 2));
    assert_eq!(m.read_phys(0x20_0000, &mut b), Err(PagingError::PhysOutOfRange { gpa: 0x20_0000, len: 4 }));
    assert_eq!(
        read_virt(&m, None, 0x1000, PagingMode::FOUR_LEVEL, va + 0x1000, &mut b),
        Err(PagingError::PageOutsideRam { va: va + 0x1000, level: Level::Pt, pa: 0x20_0000, len: 4 })
    );
    // A write straddling into the hole writes nothing.
    assert!(write_virt(&m, None, 0x1000, PagingMode::FOUR_LEVEL, va + 0xffe, b"WXYZ").is_err());
    m.read_phys(0x40_5ffc, &mut b).unwrap();
    assert_eq!(&b, b"abcd");
    assert_eq!(
        translate(&m, 0x20_0000, PagingMode::FOUR_LEVEL, va),
        Err(PagingError::TableOutsideRam { va, level: Level::Pml4, table: 0x20_0000 })
    );
}

#[test]
fn pti_user_cr3_leads_back_to_the_kernel_pgd() {
    // A KPTI pair: kernel PGD at 0x10000, user PGD at 0x11000. The user PGD
    // maps the user half (and in Linux a few kernel entry pages); the kernel
    // PGD maps both halves.
    let mut t = Tables::new(PagingMode::FOUR_LEVEL, 4 * MIB);
    t.next = 0x1_2000;
    t.root = 0x1_0000;
    t.map(USER_VA, 0x20_0000, PageSize::Size4K, P | RW | US);
    t.map(KERNEL_VA, 0x30_0000, PageSize::Size4K, P | RW | G);
    // __pti_set_user_pgtbl: the user PGD gets the entry as is, the kernel
    // PGD's copy of a user entry gets NX.
    let e = t.modify(USER_VA, Level::Pml4, NX, 0);
    t.mem.write_u64(0x1_1000 + ((USER_VA >> 39) & 0x1ff) * 8, e & !NX).unwrap();

    // User CR3 with PCID 5, the user-PCID bit 11, bit 12 and no-flush bit 63.
    let user_cr3 = 0x1_0000 | PTI_USER_PGTABLE_BIT | (1 << 11) | 5 | (1 << 63);
    assert!(matches!(
        translate(&t.mem, user_cr3, t.mode, KERNEL_VA),
        Err(PagingError::NotPresent { level: Level::Pml4, .. })
    ));
    let u = translate(&t.mem, user_cr3, t.mode, USER_VA).unwrap();
    assert_eq!(u.pa, 0x20_0000);
    let kpgd = kernel_pgd_from_cr3(user_cr3);
    assert_eq!(kpgd, 0x1_0000);
    assert_eq!(translate(&t.mem, kpgd, t.mode, KERNEL_VA).unwrap().pa, 0x30_0000);
    let k = translate(&t.mem, kpgd, t.mode, USER_VA).unwrap();
    assert_eq!(k.pa, 0x20_0000);
    assert!(k.nx && !u.nx, "the kernel PGD's user half is NX, as KPTI makes it");
    assert_eq!(kernel_pgd_from_cr3(0x8000_0000_0123_5805), 0x123_4000);
}

#[test]
fn direct_map_arithmetic() {
    let base = 0xffff_8880_0000_0000;
    let four = PagingMode::FOUR_LEVEL;
    assert_eq!(direct_map_to_phys(base + 0x1234, base, four), Some(0x1234));
    assert_eq!(direct_map_to_phys(base - 1, base, four), None);
    assert_eq!(direct_map_to_phys(base + (1 << 46), base, four), None);
    let five_base = 0xff11_0000_0000_0000;
    assert_eq!(direct_map_to_phys(five_base + (1 << 50), five_base, PagingMode::FIVE_LEVEL), Some(1 << 50));
}

#[test]
fn the_benchmark_reports_rates() {
    let (t, bases) = mixed_tables(PagingMode::FOUR_LEVEL);
    let (uncached, cached) = bench_translations(&t.mem, t.cr3(), t.mode, &bases);
    assert!(uncached > 0.0 && cached > 0.0);
    assert_eq!(bench_translations(&t.mem, t.cr3(), t.mode, &[]), (0.0, 0.0));
}

/// `cargo test -p dvisor-monitor --release -- --ignored --nocapture print_walk_rates`
#[test]
#[ignore = "prints timings; run by hand"]
fn print_walk_rates() {
    for mode in [PagingMode::FOUR_LEVEL, PagingMode::FIVE_LEVEL] {
        let (t, bases) = mixed_tables(mode);
        let vas: Vec<u64> = bases.iter().flat_map(|&b| (0..16).map(move |i| b + i * 0x1000)).collect();
        let (uncached, cached) = bench_translations(&t.mem, t.cr3(), mode, &vas);
        println!("{mode:?}: {:.1} M walks/s uncached, {:.1} M/s cached", uncached / 1e6, cached / 1e6);
    }
}
