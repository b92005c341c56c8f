//! Tests against the real kernel of the default guest image (its vmlinux,
//! or the kernel package alone fetched and cached if no image is built) and
//! against damaged copies of it.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use super::cache::{cache_file_beside, load_or_build_at};
use super::*;

/// The guest kernel's vmlinux bytes and its profile, built once for all tests.
struct Fixture {
    vmlinux: PathBuf,
    data: Vec<u8>,
    profile: KernelProfile,
}

fn fixture() -> &'static Fixture {
    static FIX: OnceLock<Fixture> = OnceLock::new();
    FIX.get_or_init(|| {
        let vmlinux = dvisor_images::guest_vmlinux(false).unwrap_or_else(|e| panic!("no guest kernel: {e}"));
        let data = std::fs::read(&vmlinux).unwrap_or_else(|e| panic!("{}: {e}", vmlinux.display()));
        let t = Instant::now();
        let profile = KernelProfile::from_bytes(&data).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("profile of {} built in {:?}: {} symbols", vmlinux.display(), t.elapsed(), profile.symbols.len());
        Fixture { vmlinux, data, profile }
    })
}

#[test]
fn symbols_of_the_guest_kernel() {
    let p = &fixture().profile;
    assert!(p.symbols.len() > 50_000, "only {} symbols", p.symbols.len());
    assert_eq!(p.kallsyms.num_syms as usize, p.symbols.len());
    assert!(p.symbols.windows(2).all(|w| w[0].addr <= w[1].addr), "symbols not sorted");
    assert_eq!(p.addr_of("_text"), Some(0xffff_ffff_8100_0000));
    for name in ["init_task", "entry_SYSCALL_64", "startup_64", "init_top_pgt", "_end", "_stext", "__per_cpu_start"] {
        assert!(p.addr_of(name).is_some(), "{name} missing");
    }
    let kernel = |n: &str| p.addr_of(n).is_some_and(|a| a >= 0xffff_ffff_8000_0000);
    for name in ["init_task", "entry_SYSCALL_64", "init_top_pgt", "_end"] {
        assert!(kernel(name), "{name} is not a kernel address");
    }
    let sym = |n: &str| p.symbol(n).map(|s| s.kind);
    assert_eq!(sym("entry_SYSCALL_64"), Some('T'));
    assert_eq!(sym("init_task"), Some('D'));
    assert!(p.addr_of("_text") <= p.addr_of("entry_SYSCALL_64") && p.addr_of("entry_SYSCALL_64") < p.addr_of("_etext"));
    assert!(p.addr_of("no_such_symbol_at_all").is_none());
    // Local duplicates: several symbols of one name, first in table order.
    let dup = p.symbols.iter().map(|s| s.name.as_str()).find(|n| p.symbols_named(n).count() > 1);
    let dup = dup.expect("kallsyms has duplicate local names");
    let first = p.symbols.iter().find(|s| s.name == dup).map(|s| s.addr);
    assert_eq!(p.addr_of(dup), first);
}

#[test]
fn symbolize_inside_the_image_only() {
    let p = &fixture().profile;
    let entry = p.addr_of("entry_SYSCALL_64").unwrap_or_default();
    assert_eq!(p.symbolize(entry), Some(("entry_SYSCALL_64", 0)));
    assert_eq!(p.symbolize(entry + 5), Some(("entry_SYSCALL_64", 5)));
    // _text, _stext and startup_64 share an address: the first in table order.
    let text = p.addr_of("_text").unwrap_or_default();
    let first_at_text = p.symbols.iter().find(|s| s.addr == text).map(|s| s.name.as_str());
    assert_eq!(p.symbolize(text).map(|s| s.0), first_at_text);
    assert_eq!(p.symbolize(text - 1), None);
    assert_eq!(p.symbolize(0), None);
    assert_eq!(p.symbolize(0x1000), None, "per-cpu offsets are not addresses");
    assert_eq!(p.symbolize(u64::MAX), None);
    assert_eq!(p.symbolize(0xffff_ffff_f000_0000), None);
    let init_task = p.addr_of("init_task").unwrap_or_default();
    assert_eq!(p.symbolize(init_task + 8), Some(("init_task", 8)));
}

#[test]
fn tables_are_in_rodata_and_map_to_the_file() {
    let f = fixture();
    let elf = elf::ElfImage::parse(&f.data).unwrap_or_else(|e| panic!("{e}"));
    let t = &f.profile.kallsyms;
    assert_eq!(t.section, ".rodata");
    let rodata = elf.section(".rodata").unwrap_or_else(|| panic!("no .rodata"));
    for va in [t.addresses, t.names, t.markers, t.token_table, t.token_index, t.num_syms_addr] {
        assert!(va >= rodata.addr && va < rodata.addr + rodata.size, "{va:#x} outside .rodata");
        let off = elf.vaddr_to_offset(va).unwrap_or_else(|| panic!("{va:#x} not in a load segment"));
        assert_eq!(elf.offset_to_vaddr(off), Some(va));
    }
    let n = elf.vaddr_to_offset(t.num_syms_addr).and_then(|o| bytes::u32_at(&f.data, o));
    assert_eq!(n, Some(t.num_syms));
    assert_eq!(t.relative_base, f.profile.addr_of("_text"));
    assert!(f.profile.build_id.as_ref().is_some_and(|b| b.len() == 40));
    assert!(f.profile.kernel_release.starts_with(|c: char| c.is_ascii_digit()), "{}", f.profile.kernel_release);
    assert!(f.profile.banner.as_ref().is_some_and(|b| b.contains(&f.profile.kernel_release)));
}

#[test]
fn layouts_of_the_guest_kernel() {
    let l = &fixture().profile.layouts;
    let t = &l.task_struct;
    assert_eq!(t.comm.size, 16);
    assert!(t.tasks.end() <= t.size && t.comm.end() <= t.size);
    assert_eq!(t.tasks.size, l.list_head.size);
    assert_eq!(t.tgid.offset, t.pid.offset + 4, "pid_t pid; pid_t tgid;");
    assert!(t.thread_group.is_some() || t.thread_node.is_some());
    assert!(matches!(t.state.size, 4 | 8));
    assert_eq!((l.list_head.next.offset, l.list_head.prev.offset), (0, 8));
    assert_eq!(l.offset_of("task_struct", "tasks"), Some(t.tasks.offset));
    assert_eq!(l.offset_of("task_struct", "tasks.next"), None, "only requested paths are kept");
    assert_eq!(l.size_of("task_struct"), Some(t.size));
    assert_eq!(l.cred.uid.size, 4);
    let m = &l.mm_struct;
    let words = [m.start_code, m.end_code, m.start_data, m.end_data, m.start_brk, m.brk, m.start_stack];
    assert!(words.windows(2).all(|w| w[0].offset < w[1].offset), "mm_struct address fields out of order");
    assert!(m.arg_start.offset < m.arg_end.offset && m.env_start.offset < m.env_end.offset);
    assert!(words.iter().all(|f| f.end() <= m.size));
    match (&m.vmas, &l.maple) {
        (layouts::VmaIndex::MapleTree { mm_mt }, Some(maple)) => {
            assert!(mm_mt.end() <= m.size);
            assert_eq!(maple.range_64.pivot.size / 8 + 1, maple.range_64.slot.size / 8);
            assert_eq!(maple.arange_64.pivot.size / 8 + 1, maple.arange_64.slot.size / 8);
            assert_eq!(maple.arange_64.gap.map(|g| g.size), Some(maple.arange_64.slot.size));
            assert!(maple.node_size.is_power_of_two() && maple.node_size >= 128);
            assert_eq!(maple.type_leaf_64, maple.type_dense + 1);
        }
        (layouts::VmaIndex::List { .. }, None) => {}
        other => panic!("inconsistent VMA layout {other:?}"),
    }
    match &m.rss {
        layouts::RssCounters::Atomic { len, .. } | layouts::RssCounters::Percpu { len, .. } => {
            assert!(*len > m.rss_index.anon && *len > m.rss_index.file);
        }
    }
    let v = &l.vm_area_struct;
    assert!(v.vm_start.offset < v.vm_end.offset && v.vm_file.end() <= v.size);
    assert_eq!(l.dentry.name_len.size, 4);
    assert!(l.dentry.name_ptr.offset >= l.dentry.d_name.offset && l.dentry.name_ptr.end() <= l.dentry.d_name.end());
    assert_eq!(l.file.path_dentry.offset, l.file.f_path.offset + 8, "struct path {{ mnt; dentry; }}");
    assert_eq!(l.qstr.name.offset, 8);
    assert!(l.mount.is_some());
    assert_eq!(l.constant("MM_ANONPAGES"), Some(m.rss_index.anon as i64));
}

#[test]
fn btf_member_paths() {
    let f = fixture();
    let elf = elf::ElfImage::parse(&f.data).unwrap_or_else(|e| panic!("{e}"));
    let sec = elf.section(".BTF").and_then(|s| elf.section_data(s)).unwrap_or_else(|| panic!("no .BTF"));
    let btf = Btf::parse(sec).unwrap_or_else(|e| panic!("{e}"));
    let tasks = btf.field("task_struct", "tasks").unwrap_or_else(|e| panic!("{e}"));
    let next = btf.field("task_struct", "tasks.next").unwrap_or_else(|e| panic!("{e}"));
    let prev = btf.field("task_struct", "tasks.prev").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((next.offset, next.size, prev.offset), (tasks.offset, 8, tasks.offset + 8));
    // An anonymous union member (qstr: union { struct { hash; len; }; hash_len; }).
    let len = btf.field("qstr", "len").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((len.offset, len.size), (4, 4));
    assert!(btf.field("task_struct", "no_such_member").is_err());
    assert!(btf.field("no_such_struct", "x").is_err());
    assert!(btf.field("task_struct", "comm[16]").is_err(), "index past the array");
    assert_eq!(btf.field("task_struct", "comm[3]").map(|f| f.size), Ok(1));
}

#[test]
fn damaged_images_give_errors_not_panics() {
    let data = &fixture().data;
    // Without hashing (slow in debug builds): the parsing is under test.
    let parse = |d: &[u8]| KernelProfile::parse(d, String::new());
    assert!(matches!(parse(&[]), Err(ProfileError::NotElf { .. })));
    assert!(matches!(parse(b"MZ this is not it"), Err(ProfileError::NotElf { .. })));
    // Truncated inside the section headers or before them: refused.
    let shoff = bytes::u64_at(data, 40).unwrap_or_default() as usize;
    for len in [64, 4096, data.len() / 2, shoff + 64 * 3] {
        assert!(parse(&data[..len]).is_err(), "truncated to {len}");
    }
    // Tables wiped: a clear kallsyms error naming the fix.
    let t = &fixture().profile.kallsyms;
    let elf = elf::ElfImage::parse(data).unwrap_or_else(|e| panic!("{e}"));
    let wipe = |va: u64, len: usize| {
        let mut copy = data.clone();
        let off = elf.vaddr_to_offset(va).unwrap_or_default() as usize;
        copy[off..off + len].fill(0xa5);
        copy
    };
    for (va, len) in [(t.token_table, 600), (t.token_index, 64), (t.markers, 64), (t.names, 4096), (t.num_syms_addr, 8), (t.addresses, 64)] {
        match kallsyms::extract(&wipe(va, len)) {
            Err(e @ ProfileError::NoKallsyms { .. }) => assert!(e.to_string().contains("CONFIG_KALLSYMS"), "{e}"),
            other => panic!("wiping {len} bytes at {va:#x}: {:?}", other.map(|s| s.len())),
        }
    }
    // BTF garbled (header, types, strings): an error or a layout, never a panic.
    let btf = elf.section(".BTF").unwrap_or_else(|| panic!("no .BTF")).clone();
    let btf_bytes = elf.section_data(&btf).unwrap_or_default();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..24u32 {
        let mut copy = btf_bytes.to_vec();
        let span = if round % 4 == 0 { 24 } else { copy.len().min(4096 << round) };
        for _ in 0..16 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = (rng % span as u64) as usize;
            copy[at] = (rng >> 32) as u8;
        }
        if let Ok(parsed) = Btf::parse(&copy) {
            let _ = Layouts::from_btf(&parsed);
        }
    }
    let mut no_btf = data.clone();
    no_btf[btf.offset as usize..][..4].fill(0);
    assert!(matches!(parse(&no_btf), Err(ProfileError::NoBtf { .. })));
}

#[test]
fn garbage_is_refused_quickly() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut junk = vec![0u8; 1 << 20];
    for b in junk.iter_mut() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        *b = rng as u8;
    }
    assert!(Btf::parse(&junk).is_err());
    assert!(kallsyms::extract(&junk).is_err());
    // A token table alone (the digits) is not enough.
    let mut fake = b"\x7fELF".to_vec();
    fake.extend_from_slice(&junk[..64]);
    assert!(kallsyms::extract(&fake).is_err());
}

fn copy_vmlinux(dir: &Path) -> PathBuf {
    let path = dir.join("vmlinux");
    std::fs::copy(&fixture().vmlinux, &path).unwrap_or_else(|e| panic!("{e}"));
    path
}

#[test]
fn cache_round_trip_and_invalidation() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let vmlinux = copy_vmlinux(dir.path());
    let beside = cache_file_beside(&vmlinux);
    let fallback = dir.path().join("fallback").join("p.json");
    let places = [beside.clone(), fallback.clone()];

    let t = Instant::now();
    let built = load_or_build_at(&vmlinux, &places).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("load_or_build (cold): {:?}", t.elapsed());
    assert!(beside.exists() && !fallback.exists());
    assert_eq!(built, f.profile);
    let t = Instant::now();
    let cached = load_or_build_at(&vmlinux, &places).unwrap_or_else(|e| panic!("{e}"));
    let warm = t.elapsed();
    let size = std::fs::metadata(&beside).map(|m| m.len()).unwrap_or_default();
    eprintln!("load_or_build (cached, {size} bytes of JSON): {warm:?}");
    assert_eq!(cached, f.profile);
    let t = Instant::now();
    assert_eq!(cached.addr_of("init_task"), f.profile.addr_of("init_task"));
    eprintln!("first addr_of after a cached load (builds the name index): {:?}", t.elapsed());

    // Corrupt cache: rebuilt and rewritten.
    std::fs::write(&beside, b"{\"format\": \"dvisor-kernel-profile\", truncated").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(load_or_build_at(&vmlinux, &places).unwrap_or_else(|e| panic!("{e}")), f.profile);
    assert!(std::fs::read(&beside).is_ok_and(|b| serde_json::from_slice::<serde_json::Value>(&b).is_ok()));

    // A cache of other content (stale sha, other stamp): not trusted.
    let text = std::fs::read_to_string(&beside).unwrap_or_default();
    let forged = text.replace(&f.profile.vmlinux_sha256, &"0".repeat(64));
    let forged = forged.replace(r" D init_task\n", r" D forged_task\n").replace("\"ino\":", "\"ino\":1");
    std::fs::write(&beside, forged).unwrap_or_else(|e| panic!("{e}"));
    let rebuilt = load_or_build_at(&vmlinux, &places).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rebuilt.addr_of("init_task"), f.profile.addr_of("init_task"));
    assert!(rebuilt.addr_of("forged_task").is_none());

    // Same content, new stamp (touched): accepted after hashing.
    std::fs::copy(&vmlinux, dir.path().join("v2")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(dir.path().join("v2"), &vmlinux).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(load_or_build_at(&vmlinux, &places).unwrap_or_else(|e| panic!("{e}")), f.profile);

    // The beside place cannot be written (a directory is in the way): the
    // fallback place is used, and found again next time.
    std::fs::remove_file(&beside).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(&beside).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(load_or_build_at(&vmlinux, &places).unwrap_or_else(|e| panic!("{e}")), f.profile);
    assert!(fallback.is_file());
    let t = Instant::now();
    assert_eq!(load_or_build_at(&vmlinux, &places).unwrap_or_else(|e| panic!("{e}")), f.profile);
    eprintln!("load_or_build (fallback cache): {:?}", t.elapsed());
}

#[test]
fn missing_vmlinux_names_the_fix() {
    let err = KernelProfile::load_or_build(Path::new("/nonexistent/dvisor/vmlinux"), Path::new("/nonexistent/dvisor/cache")).map(|_| ());
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("/nonexistent/dvisor/vmlinux") && msg.contains("dvisor image build"), "{msg}");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let junk = dir.path().join("vmlinux");
    std::fs::write(&junk, b"\x7fELF\x02\x01\x01").unwrap_or_else(|e| panic!("{e}"));
    let msg = KernelProfile::from_vmlinux(&junk).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains(&junk.display().to_string()) && msg.contains("dvisor image build"), "{msg}");
}

/// The carrier's generic-flavour kernel, when a carrier image is on this
/// machine (optional: nothing is built for it).
#[test]
fn carrier_kernel_if_present() {
    let root = std::env::var_os("DVISOR_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/dvisor"));
    let vmlinux = root.join("carrier/current/vmlinux");
    if !vmlinux.is_file() {
        eprintln!("no carrier kernel at {}; skipped", vmlinux.display());
        return;
    }
    let t = Instant::now();
    let p = KernelProfile::from_vmlinux(&vmlinux).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("carrier kernel {}: {} symbols in {:?}", p.kernel_release, p.symbols.len(), t.elapsed());
    assert!(p.symbols.len() > 50_000);
    assert_eq!(p.addr_of("_text"), Some(0xffff_ffff_8100_0000));
    assert!(p.addr_of("entry_SYSCALL_64").is_some() && p.addr_of("init_task").is_some());
    assert_eq!(p.layouts.task_struct.comm.size, 16);
}

/// Prints what each step costs (no limits asserted: CI machines vary).
#[test]
fn timings() {
    let f = fixture();
    let t = Instant::now();
    let syms = kallsyms::extract(&f.data).map(|s| s.len());
    let kallsyms_time = t.elapsed();
    let elf = elf::ElfImage::parse(&f.data).unwrap_or_else(|e| panic!("{e}"));
    let sec = elf.section(".BTF").and_then(|s| elf.section_data(s)).unwrap_or_default();
    let t = Instant::now();
    let layouts = Btf::parse(sec).and_then(|b| Layouts::from_btf(&b));
    let btf_time = t.elapsed();
    let t = Instant::now();
    let hits = ["init_task", "entry_SYSCALL_64", "_text"].iter().filter(|n| f.profile.addr_of(n).is_some()).count();
    let index_time = t.elapsed();
    eprintln!("kallsyms {kallsyms_time:?} ({syms:?} symbols), BTF + layouts {btf_time:?}, first addr_of (name index) {index_time:?}");
    assert!(syms.is_ok() && layouts.is_ok() && hits == 3);
}

/// Writes kallsyms tables the way scripts/kallsyms.c lays them out, with
/// no real compression: printable bytes are their own tokens, the others
/// two-letter tokens. `new_order`: the 6.4+ order; else 6.1-with-seqs.
fn synthetic_kallsyms(symbols: &[(u64, char, String)], new_order: bool) -> Vec<u8> {
    const RB: u64 = 0xffff_ffff_8100_0000;
    let align = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(8), 0);
    let mut tokens = Vec::new();
    let mut index = Vec::new();
    for b in 0..=255u8 {
        index.extend_from_slice(&(tokens.len() as u16).to_le_bytes());
        if b.is_ascii_graphic() {
            tokens.push(b);
        } else {
            tokens.extend_from_slice(&[b'a' + b % 26, b'A' + b / 26 % 26]);
        }
        tokens.push(0);
    }
    let mut names = Vec::new();
    let mut markers = Vec::new();
    for (i, (_, kind, name)) in symbols.iter().enumerate() {
        if i % 256 == 0 {
            markers.extend_from_slice(&(names.len() as u32).to_le_bytes());
        }
        names.push(name.len() as u8 + 1);
        names.push(*kind as u8);
        names.extend_from_slice(name.as_bytes());
    }
    let mut offsets = Vec::new();
    for (addr, _, _) in symbols {
        let off = if *addr < RB { *addr as i32 } else { -((addr - RB) as i64) as i32 - 1 };
        offsets.extend_from_slice(&off.to_le_bytes());
    }
    let n = (symbols.len() as u32).to_le_bytes();
    let seqs = vec![0x5au8; 3 * symbols.len()];
    let rb = RB.to_le_bytes();
    let mut out = vec![0x11u8; 64]; // unrelated data before
    let parts: Vec<&[u8]> = if new_order {
        vec![&n, &names, &markers, &tokens, &index, &offsets, &rb, &seqs]
    } else {
        vec![&offsets, &rb, &n, &names, &markers, &seqs, &tokens, &index]
    };
    for part in parts {
        align(&mut out);
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&[0x22; 64]);
    out
}

#[test]
fn synthetic_tables_in_both_orders() {
    let mut symbols = vec![(0, 'A', "fixed_percpu_data".to_string()), (0x1000, 'A', "cpu_debug_store".to_string())];
    for i in 0..700u64 {
        let kind = ['T', 't', 'D', 'd', 'B', 'r'][i as usize % 6];
        symbols.push((0xffff_ffff_8100_0000 + i * 0x40, kind, format!("sym_{i}_{}", "x".repeat(i as usize % 40))));
    }
    for new_order in [false, true] {
        let region = synthetic_kallsyms(&symbols, new_order);
        let sec = elf::Section { name: ".rodata".into(), kind: 1, flags: elf::SHF_ALLOC, addr: 0xffff_ffff_8200_0000, offset: 0, size: region.len() as u64 };
        let tokens = kallsyms_locate::token_tables(&region);
        assert_eq!(tokens.len(), 1, "new_order={new_order}");
        let (decoded, tables) = kallsyms::tables_at(&region, &sec, &tokens[0]).unwrap_or_else(|| panic!("new_order={new_order}: not decoded"));
        let got: Vec<(u64, char, String)> = decoded.into_iter().map(|s| (s.addr, s.kind, s.name)).collect();
        assert_eq!(got, symbols, "new_order={new_order}");
        assert_eq!(tables.encoding, AddressEncoding::AbsolutePercpu);
        assert_eq!(tables.num_syms, symbols.len() as u32);
    }
}
