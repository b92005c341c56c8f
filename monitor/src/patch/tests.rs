//! Tests with real gcc output: the sample patches in guest-images/patches
//! compiled with the documented flags, linked against the real demo service
//! of the default guest image, checked byte by byte, fuzzed, and run for
//! real in a small host program built like the demo service.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::OnceLock;
use std::time::Instant;

use super::object::{SectionKind, SymbolDef};
use super::*;

/// A small xorshift generator, for fuzzing without a dependency.
pub fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

const COMMON_FLAGS: &[&str] = &["-c", "-O2", "-fno-asynchronous-unwind-tables", "-ffunction-sections", "-fdata-sections"];
/// Near model: the patch must be within ±2 GiB of the program and below 2 GiB.
const NOPIC: &[&str] = &["-fno-pic", "-mcmodel=small"];
/// Position-independent: program globals through the GOT, calls through
/// PLT32 (a stub when far).
const PIC: &[&str] = &["-fpic"];
/// Position-independent, calls through the GOT as well.
const PIC_NOPLT: &[&str] = &["-fpic", "-fno-plt"];
/// Absolute 64-bit addressing everywhere.
const LARGE: &[&str] = &["-fno-pic", "-mcmodel=large"];

const NEAR: u64 = 0x1000_0000;
const FAR: u64 = 0x7f00_0000_0000;

fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/patches")
}

fn sample_text(name: &str) -> String {
    let p = samples_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn run(cmd: &mut Process) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (gcc and binutils are needed for these tests)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Compiles C source text with the common flags plus `model` into an object.
fn compile_src(src: &str, model: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (c, o) = (dir.path().join("p.c"), dir.path().join("p.o"));
    std::fs::write(&c, src).unwrap();
    run(Process::new("gcc").args(COMMON_FLAGS).args(model).arg("-o").arg(&o).arg(&c));
    std::fs::read(&o).unwrap()
}

fn compile(sample: &str, model: &[&str]) -> Vec<u8> {
    compile_src(&sample_text(sample), model)
}

fn object(sample: &str, model: &[&str]) -> PatchObject {
    let name = sample.replace(".c", ".o");
    PatchObject::parse(&name, &compile(sample, model)).unwrap_or_else(|e| panic!("{e}"))
}

fn cmds(name: &str) -> CommandFile {
    CommandFile::parse(name, &sample_text(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// The demo service, compiled once from the image's source with the image's
/// flags (`dvisor_images::service`), so no image is needed.
struct Demo {
    bytes: Vec<u8>,
    symbols: HashMap<String, TargetSymbol>,
}

fn demo() -> &'static Demo {
    static DEMO: OnceLock<Demo> = OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo-service");
        dvisor_images::service::compile(dir.path(), &path).unwrap_or_else(|e| panic!("{e}"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let symbols = target_symbols(&bytes, 0).unwrap_or_else(|e| panic!("{e}"));
        Demo { bytes, symbols }
    })
}

/// Writes the demo service into `dir` for the tools that want a file.
fn demo_file(dir: &Path) -> PathBuf {
    let path = dir.join("demo-service");
    std::fs::write(&path, &demo().bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

fn sym(name: &str) -> TargetSymbol {
    *demo().symbols.get(name).unwrap_or_else(|| panic!("{name} not in the demo service"))
}

/// `nm -S` of a file: name -> (addr, size, type letter).
fn nm(path: &Path) -> HashMap<String, (u64, u64, char)> {
    let out = run(Process::new("nm").arg("-S").arg(path));
    let mut m = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let [addr, size, t, name] = w.as_slice() {
            let (Ok(a), Ok(s)) = (u64::from_str_radix(addr, 16), u64::from_str_radix(size, 16)) else { continue };
            m.entry(name.to_string()).or_insert((a, s, t.chars().next().unwrap_or('?')));
        }
    }
    m
}

fn err_text<T: std::fmt::Debug>(r: Result<T, PatchError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn u32_at(b: &[u8], off: u64) -> u32 {
    u32::from_le_bytes(b[off as usize..off as usize + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: u64) -> u64 {
    u64::from_le_bytes(b[off as usize..off as usize + 8].try_into().unwrap())
}

fn cstr_at(p: &LinkedPatch, addr: u64) -> String {
    let off = (addr - p.base) as usize;
    let end = p.bytes[off..].iter().position(|&b| b == 0).unwrap();
    String::from_utf8_lossy(&p.bytes[off..off + end]).into_owned()
}

// ---------------------------------------------------------------- target

#[test]
fn demo_service_symbols_match_nm() {
    let d = demo();
    let dir = tempfile::tempdir().unwrap();
    let reference = nm(&demo_file(dir.path()));
    for name in ["get_message", "message_ptr", "config_interval_ms", "counter", "reply_counter", "handle_request", "heartbeat"] {
        let t = sym(name);
        let (addr, size, letter) = reference[name];
        assert_eq!((t.addr, t.size), (addr, size), "{name}");
        let want = if letter.eq_ignore_ascii_case(&'t') { TargetKind::Func } else { TargetKind::Object };
        assert_eq!(t.kind, want, "{name}");
        assert!(!t.ambiguous, "{name}");
    }
    assert_eq!(sym("strlen").kind, TargetKind::Ifunc);
    assert_eq!(sym("message_ptr").size, 8);
    assert_eq!(sym("config_interval_ms").size, 4);
    assert!(!target_is_pie(&d.bytes).unwrap());
    assert!(err_text(target_symbols(&d.bytes, 0x1000)).contains("not position-independent (ET_EXEC)"));
}

#[test]
fn pie_symbols_get_the_load_base() {
    let dir = tempfile::tempdir().unwrap();
    let (c, exe) = (dir.path().join("pie.c"), dir.path().join("pie"));
    std::fs::write(&c, "int pie_var = 3;\n__attribute__((noinline)) int pie_fn(void) { return pie_var; }\nint main(void) { return pie_fn(); }\n").unwrap();
    run(Process::new("gcc").args(["-O2", "-fpie", "-pie", "-o"]).arg(&exe).arg(&c));
    let bytes = std::fs::read(&exe).unwrap();
    assert!(target_is_pie(&bytes).unwrap());
    let reference = nm(&exe);
    let base = 0x5555_5555_4000;
    let syms = target_symbols(&bytes, base).unwrap();
    for name in ["pie_fn", "pie_var", "main"] {
        assert_eq!(syms[name].addr, reference[name].0 + base, "{name}");
    }
    assert_eq!(syms["pie_fn"].kind, TargetKind::Func);
    assert_eq!(syms["pie_var"].kind, TargetKind::Object);
}

#[test]
fn stripped_or_wrong_programs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("demo-stripped");
    run(Process::new("strip").arg("-o").arg(&stripped).arg(demo_file(dir.path())));
    let e = err_text(target_symbols(&std::fs::read(&stripped).unwrap(), 0));
    assert!(e.starts_with("target program: has no symbol table (stripped?)"), "{e}");
    let e = err_text(target_symbols(&compile("fix.c", NOPIC), 0));
    assert!(e.contains("relocatable object (ET_REL), not a linked program"), "{e}");
    assert!(err_text(target_symbols(b"#!/bin/sh\n", 0)).contains("not an ELF file"));
}

// ---------------------------------------------------------------- object

#[test]
fn parses_the_samples() {
    let o = object("callback.c", NOPIC);
    assert_eq!(o.name, "callback.o");
    let text = o.sections.iter().find(|s| s.name == ".text.callback_get_message").unwrap();
    assert_eq!((text.kind, text.align), (SectionKind::Text, 16));
    assert_eq!(text.data.len() as u64, text.size);
    assert!(o.sections.iter().any(|s| s.name == ".rodata.names" && s.kind == SectionKind::Rodata));
    let kinds: Vec<&str> = o.relocations.iter().map(|r| r.kind.name()).collect();
    // reply_counter (PLT32), counter (PC32), parity (PC32: a static function in
    // another section), names[] (32S), and names[]'s two string pointers.
    assert_eq!(kinds, ["R_X86_64_PLT32", "R_X86_64_PC32", "R_X86_64_PC32", "R_X86_64_32S", "R_X86_64_64", "R_X86_64_64"]);
    let (_, f) = o.defined("callback_get_message").unwrap();
    assert!(matches!(f.def, SymbolDef::Section { .. }));
    for undefined in ["reply_counter", "counter"] {
        assert!(o.symbols.iter().any(|s| s.name == undefined && s.def == SymbolDef::Undefined), "{undefined}");
    }
    // .eh_frame (default gcc flags) is dropped, with its relocations.
    let dir = tempfile::tempdir().unwrap();
    let (c, obj) = (samples_dir().join("fix.c"), dir.path().join("fix.o"));
    run(Process::new("gcc").args(["-c", "-O2", "-o"]).arg(&obj).arg(&c));
    let o = PatchObject::parse("fix.o", &std::fs::read(&obj).unwrap()).unwrap();
    assert!(o.sections.iter().all(|s| s.name != ".eh_frame"));
    assert_eq!(o.relocations.len(), 1);
    // No code at all: an empty image.
    let e = object("empty.c", NOPIC);
    assert_eq!(e.required_size(), 0);
    assert!(e.relocations.is_empty());
}

#[test]
fn placement_follows_the_relocations() {
    let p = object("fix.c", NOPIC).placement();
    assert!(p.near_program);
    assert_eq!(object("v2.c", NOPIC).placement(), Placement { near_program: false, max_end: Some(1 << 32) });
    assert_eq!(object("callback.c", NOPIC).placement(), Placement { near_program: true, max_end: Some(1 << 31) });
    for model in [PIC, PIC_NOPLT, LARGE] {
        assert_eq!(object("callback.c", model).placement(), Placement { near_program: false, max_end: None }, "{model:?}");
    }
}

#[test]
fn rejects_what_cannot_run_in_a_live_process() {
    let parse = |src: &str, model: &[&str]| err_text(PatchObject::parse("bad.o", &compile_src(src, model)));
    let e = parse("extern __thread int t __attribute__((tls_model(\"local-exec\")));\nint f(void) { return t; }\n", NOPIC);
    assert_eq!(e, "bad.o: relocation R_X86_64_TPOFF32 at .text.f+0x4 is not supported (thread-local storage)");
    let e = parse("extern __thread int t;\nint f(void) { return t; }\n", PIC);
    assert!(e.contains("relocation R_X86_64_TLSGD at .text.f+") && e.ends_with("(thread-local storage)"), "{e}");
    let e = parse("__thread int t;\nint f(void) { return t; }\n", NOPIC);
    assert!(e.starts_with("bad.o: section .tbss.t is not supported: thread-local storage (SHF_TLS)"), "{e}");
    let e = parse("extern int x; extern int g(void);\nint f(void) { return x + g(); }\n", &["-fpic", "-mcmodel=large"]);
    assert!(e.contains("relocation R_X86_64_GOTPC64 at .text.f+0x") && e.contains("compile with -fpic"), "{e}");
    let e = parse("static int n;\n__attribute__((constructor)) static void init(void) { n = 1; }\nint f(void) { return n; }\n", NOPIC);
    assert!(e.starts_with("bad.o: section .init_array is not supported: constructors and destructors never run"), "{e}");
    let e = parse("__asm__(\".section .wx,\\\"awx\\\",@progbits\\n.byte 0xc3\\n.previous\");\nint f(void) { return 1; }\n", NOPIC);
    assert_eq!(e, "bad.o: section .wx is not supported: it is writable and executable; keep code and data in separate sections");

    let good = compile("fix.c", NOPIC);
    let patched = |at: usize, val: &[u8]| {
        let mut b = good.clone();
        b[at..at + val.len()].copy_from_slice(val);
        err_text(PatchObject::parse("fix.o", &b))
    };
    assert!(patched(4, &[1]).contains("32-bit ELF (ELFCLASS32)"));
    assert!(patched(5, &[2]).contains("not little-endian"));
    assert!(patched(18, &[3, 0]).contains("e_machine is 3, not x86-64"));
    assert!(patched(16, &[2, 0]).contains("is a linked executable (ELF type 2), not a relocatable object: compile the patch with `gcc -c`"));
    assert!(err_text(PatchObject::parse("demo", &demo().bytes)).contains("not a relocatable object"));
    assert_eq!(err_text(PatchObject::parse("x.o", b"hello")), "x.o: not an ELF file (no \\x7fELF magic)");
    assert!(err_text(PatchObject::parse("x.o", &good[..40])).contains("truncated ELF header"));
    assert!(err_text(PatchObject::parse("x.o", &good[..good.len() - 10])).contains("past the end of the file"));
}

#[test]
fn truncated_objects_never_panic() {
    for sample in ["callback.c", "fix.c"] {
        for model in [NOPIC, PIC] {
            let good = compile(sample, model);
            for len in 0..good.len() {
                assert!(PatchObject::parse("t.o", &good[..len]).is_err(), "{sample} {model:?} cut at {len} parsed");
            }
        }
    }
}

#[test]
fn garbled_objects_never_panic() {
    let d = demo();
    let cmd = cmds("callback.cmd");
    let objects = [compile("callback.c", NOPIC), compile("callback.c", PIC), compile("ptr.c", PIC)];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut parsed, mut linked, mut n) = (0, 0, 0);
    let t = Instant::now();
    for good in &objects {
        for _ in 0..10_000 {
            let mut b = good.clone();
            let flips = 1 + xorshift(&mut seed) % 4;
            for _ in 0..flips {
                let at = (xorshift(&mut seed) % b.len() as u64) as usize;
                // Mostly single-bit flips, sometimes a whole random byte.
                if xorshift(&mut seed) & 3 == 0 {
                    b[at] = xorshift(&mut seed) as u8;
                } else {
                    b[at] ^= 1 << (xorshift(&mut seed) % 8);
                }
            }
            n += 1;
            if let Ok(o) = PatchObject::parse("fuzz.o", &b) {
                parsed += 1;
                assert!(o.required_size() as u64 <= object::MAX_IMAGE_SIZE);
                for base in [NEAR, FAR] {
                    let aligned = base.next_multiple_of(o.required_alignment());
                    if let Ok((p, _)) = link(&o, &cmd, &d.symbols, aligned) {
                        assert_eq!(p.bytes.len() as u64, p.size);
                        linked += 1;
                    }
                }
            }
        }
    }
    eprintln!("fuzz: {n} garbled objects in {:?}: {parsed} still parsed, {linked} links", t.elapsed());
    assert!(parsed > 0 && parsed < n);
}

#[test]
fn garbled_programs_never_panic() {
    let good = &demo().bytes;
    let mut seed = 0x1234_5678_9abc_def1u64;
    // Headers, section headers and the symbol table are where damage matters.
    let shoff = u64::from_le_bytes(good[40..48].try_into().unwrap()) as usize;
    for i in 0..300 {
        let mut b = good.clone();
        for _ in 0..1 + xorshift(&mut seed) % 8 {
            let region = if i % 2 == 0 { 0..64 } else { shoff..good.len() };
            let at = region.start + (xorshift(&mut seed) % (region.end - region.start) as u64) as usize;
            b[at] = xorshift(&mut seed) as u8;
        }
        let _ = target_symbols(&b, 0);
    }
    for len in [0, 3, 20, 63, 64, 1000, good.len() / 2, shoff, shoff + 100, good.len() - 1] {
        let _ = target_symbols(&good[..len], 0);
    }
}

// ---------------------------------------------------------------- link

#[test]
fn v2_links_near_with_absolute_32_bit_string_address() {
    let o = object("v2.c", NOPIC);
    let (p, c) = link(&o, &cmds("v2.cmd"), &demo().symbols, NEAR).unwrap();
    assert_eq!(p.bytes.len(), o.required_size());
    assert_eq!(p.size as usize, o.required_size());
    let f = p.symbols["patched_get_message"];
    assert_eq!(f, NEAR, "text comes first");
    // mov $imm32, %eax; ret -- the immediate is the address of "v2".
    let off = f - NEAR;
    assert_eq!(p.bytes[off as usize], 0xb8);
    assert_eq!(cstr_at(&p, u64::from(u32_at(&p.bytes, off + 1))), "v2");
    let gm = sym("get_message");
    assert_eq!(
        c,
        vec![ResolvedCommand {
            line: 2,
            target: "get_message".into(),
            patch_symbol: Some("patched_get_message".into()),
            action: ResolvedAction::Jump { target_addr: gm.addr, target_size: gm.size, patch_addr: f, jump: jump_bytes(gm.addr, f) },
        }]
    );
    assert_eq!(jump_bytes(gm.addr, f).len(), JMP_REL32_LEN);
}

#[test]
fn fix_reads_the_programs_counter() {
    let counter = sym("counter").addr;
    // Near, -fno-pic: mov counter(%rip), %rax; ret.
    let o = object("fix.c", NOPIC);
    let (p, c) = link(&o, &cmds("fix.cmd"), &demo().symbols, NEAR).unwrap();
    let f = p.symbols["fixed_reply_counter"];
    let off = f - NEAR;
    assert_eq!(&p.bytes[off as usize..off as usize + 3], &[0x48, 0x8b, 0x05]);
    let disp = u32_at(&p.bytes, off + 3) as i32;
    assert_eq!((f + 7).wrapping_add(disp as i64 as u64), counter);
    let rc = sym("reply_counter");
    assert!(matches!(c[0].action, ResolvedAction::Jump { target_addr, target_size: 12, patch_addr, .. } if target_addr == rc.addr && patch_addr == f));

    // Far, -fno-pic: the PC32 cannot reach the program.
    let e = err_text(link(&o, &cmds("fix.cmd"), &demo().symbols, FAR));
    assert_eq!(
        e,
        format!(
            "fix.o: relocation R_X86_64_PC32 at .text.fixed_reply_counter+0x3 to counter overflows: the patch at 0x7f0000000000 is more than 2 GiB away from the target {counter:#x}: place the patch within ±2 GiB of it, or compile the patch with -fpic (program globals then go through the GOT)"
        )
    );

    // Far, -fpic: mov slot(%rip), %rax; mov (%rax), %rax -- the slot holds &counter.
    let o = object("fix.c", PIC);
    let no_commands = CommandFile { name: "none.cmd".into(), commands: vec![] };
    let (p, _) = link(&o, &no_commands, &demo().symbols, FAR).unwrap();
    let f = p.symbols["fixed_reply_counter"];
    let off = f - FAR;
    assert_eq!(&p.bytes[off as usize..off as usize + 3], &[0x48, 0x8b, 0x05]);
    let slot = (f + 7).wrapping_add(u32_at(&p.bytes, off + 3) as i32 as i64 as u64);
    let got = p.sections.iter().find(|s| s.name == ".got").unwrap();
    assert_eq!((got.addr, got.size), (slot, 8));
    assert_eq!(u64_at(&p.bytes, slot - FAR), counter);
    // ...but the 12-byte reply_counter cannot take the 14-byte far jump.
    let e = err_text(link(&o, &cmds("fix.cmd"), &demo().symbols, FAR));
    assert!(
        e.starts_with("fix.cmd:2: reply_counter is 12 bytes, too small for the 14-byte absolute jump to 0x7f")
            && e.ends_with("place the patch within ±2 GiB of the program so a 5-byte jump is used"),
        "{e}"
    );
}

#[test]
fn v2_far_reports_the_32_bit_overflow() {
    let e = err_text(link(&object("v2.c", NOPIC), &cmds("v2.cmd"), &demo().symbols, FAR));
    eprintln!("{e}");
    assert!(e.starts_with("v2.o: relocation R_X86_64_32 at .text.patched_get_message+0x1 to .rodata.patched_get_message.str1.1 overflows: 0x7f"), "{e}");
    assert!(e.contains("must lie below 4 GiB") && e.contains("compile the patch with -fpic"), "{e}");
    // -fpic code is fine anywhere; the jump is what needs the patch near.
    let e = err_text(link(&object("v2.c", PIC), &cmds("v2.cmd"), &demo().symbols, FAR));
    assert!(e.starts_with("v2.cmd:2: get_message is 6 bytes, too small for the 14-byte absolute jump"), "{e}");
}

#[test]
fn callback_calls_into_the_program_in_every_code_model() {
    let d = demo();
    let (rc, counter) = (sym("reply_counter").addr, sym("counter").addr);
    let check_names = |p: &LinkedPatch| {
        let names = p.symbols["names"];
        assert_eq!(cstr_at(p, u64_at(&p.bytes, names - p.base)), "even");
        assert_eq!(cstr_at(p, u64_at(&p.bytes, names + 8 - p.base)), "odd");
    };
    // -fno-pic near: direct call (PLT32) and PC32 to counter.
    let o = object("callback.c", NOPIC);
    let (p, _) = link(&o, &cmds("callback.cmd"), &d.symbols, NEAR).unwrap();
    let f = p.symbols["callback_get_message"];
    let call = f + 4; // after sub $8,%rsp
    assert_eq!(p.bytes[(call - NEAR) as usize], 0xe8);
    assert_eq!((call + 5).wrapping_add(u32_at(&p.bytes, call + 1 - NEAR) as i32 as i64 as u64), rc);
    check_names(&p);

    // -fpic far: the call goes through a PLT stub, counter through the GOT.
    let o = object("callback.c", PIC);
    let cb = CommandFile::parse("cb.cmd", "J heartbeat callback_get_message\n").unwrap();
    let (p, c) = link(&o, &cb, &d.symbols, FAR).unwrap();
    let plt = p.sections.iter().find(|s| s.name == ".plt").unwrap();
    let stub = &p.bytes[(plt.addr - FAR) as usize..][..16];
    assert_eq!(&stub[..6], &[0xff, 0x25, 0, 0, 0, 0]);
    assert_eq!(u64::from_le_bytes(stub[6..14].try_into().unwrap()), rc);
    let f = p.symbols["callback_get_message"];
    let call = f + 4;
    assert_eq!(p.bytes[(call - FAR) as usize], 0xe8);
    assert_eq!((call + 5).wrapping_add(u32_at(&p.bytes, call + 1 - FAR) as i32 as i64 as u64), plt.addr);
    let got = p.sections.iter().find(|s| s.name == ".got").unwrap();
    assert_eq!(u64_at(&p.bytes, got.addr - FAR), counter);
    check_names(&p);
    // heartbeat is big enough for the absolute jump.
    let hb = sym("heartbeat");
    assert!(matches!(&c[0].action, ResolvedAction::Jump { jump, .. } if jump.len() == JMP_ABS64_LEN && jump == &jump_bytes(hb.addr, f)));

    // -fpic near: the PLT32 reaches the program directly, the stub is unused.
    let (p, _) = link(&o, &cmds("callback.cmd"), &d.symbols, NEAR).unwrap();
    let call = p.symbols["callback_get_message"] + 4;
    assert_eq!((call + 5).wrapping_add(u32_at(&p.bytes, call + 1 - NEAR) as i32 as i64 as u64), rc);

    // -fpic -fno-plt far: two GOT slots (reply_counter, counter), no PLT.
    let o = object("callback.c", PIC_NOPLT);
    let (p, _) = link(&o, &cb, &d.symbols, FAR).unwrap();
    assert!(p.sections.iter().all(|s| s.name != ".plt"));
    let got = p.sections.iter().find(|s| s.name == ".got").unwrap();
    assert_eq!(got.size, 16);
    let mut slots = [u64_at(&p.bytes, got.addr - FAR), u64_at(&p.bytes, got.addr + 8 - FAR)];
    slots.sort();
    let mut want = [rc, counter];
    want.sort();
    assert_eq!(slots, want);

    // -mcmodel=large far: movabs of the absolute addresses.
    let o = object("callback.c", LARGE);
    let (p, _) = link(&o, &cb, &d.symbols, FAR).unwrap();
    let f = p.symbols["callback_get_message"] - FAR;
    assert_eq!(&p.bytes[f as usize..f as usize + 2], &[0x48, 0xb8]); // movabs $reply_counter, %rax
    assert_eq!(u64_at(&p.bytes, f + 2), rc);
}

#[test]
fn ptr_and_var_resolve_the_programs_variables() {
    let d = demo();
    let o = object("ptr.c", PIC);
    for base in [NEAR, FAR] {
        let (p, c) = link(&o, &cmds("ptr.cmd"), &d.symbols, base).unwrap();
        let m = p.symbols["patched_message"];
        assert_eq!(cstr_at(&p, m), "v2-ptr");
        assert_eq!(
            c,
            vec![ResolvedCommand {
                line: 2,
                target: "message_ptr".into(),
                patch_symbol: Some("patched_message".into()),
                action: ResolvedAction::Pointer { addr: sym("message_ptr").addr, value: m },
            }]
        );
    }
    // V needs no code: an empty object, parsed from gcc or made here.
    let v = cmds("var.cmd");
    let cfg = sym("config_interval_ms");
    for o in [object("empty.c", NOPIC), PatchObject::empty("none")] {
        let (p, c) = link(&o, &v, &d.symbols, NEAR).unwrap();
        assert_eq!((p.size, p.bytes.len()), (0, 0));
        assert_eq!(c[0].action, ResolvedAction::Variable { addr: cfg.addr, size: 4, bytes: vec![0x32, 0, 0, 0] });
        assert_eq!(c[0].line, 4);
    }
}

#[test]
fn command_errors_name_the_line_and_symbol() {
    let d = demo();
    let o = object("callback.c", NOPIC);
    let e = |text: &str| err_text(link(&o, &CommandFile::parse("p.cmd", text).unwrap(), &d.symbols, NEAR));
    assert_eq!(
        e("# x\nJ no_such_function callback_get_message\n"),
        "p.cmd:2: J target function \"no_such_function\" is not in the target program's symbol table (check the name, and that --binary is the program running in the guest)"
    );
    assert!(e("J get_message no_such_patch").starts_with("p.cmd:1: J get_message: patch symbol \"no_such_patch\" is not defined in the patch object callback.o"));
    assert_eq!(e("J counter callback_get_message"), "p.cmd:1: J target \"counter\" is a variable, not a function: use V or P for variables");
    assert_eq!(e("J get_message names"), "p.cmd:1: J get_message: patch symbol \"names\" is not code (not in an executable section)");
    assert_eq!(e("V get_message 00"), "p.cmd:1: V target \"get_message\" is a function, not a variable: use J to replace a function");
    assert_eq!(
        e("V config_interval_ms 3200000000"),
        "p.cmd:1: V config_interval_ms: 5 bytes given, but the variable is 4 bytes (from the program's symbol table); give at most 4 bytes"
    );
    assert_eq!(e("P config_interval_ms callback_get_message"), "p.cmd:1: P target config_interval_ms is 4 bytes; a pointer is 8 bytes on x86-64");
    assert!(e("J strlen callback_get_message").starts_with("p.cmd:1: J target \"strlen\" is a GNU indirect function (IFUNC)"));
    // check() finds the same problems without a base.
    assert!(check(&o, &CommandFile::parse("p.cmd", "V get_message 00").unwrap(), &d.symbols).is_err());
    assert!(check(&o, &cmds("callback.cmd"), &d.symbols).is_ok());
}

#[test]
fn symbol_errors_name_the_symbol_and_place() {
    let d = demo();
    let none = CommandFile { name: "none.cmd".into(), commands: vec![] };
    let link_src = |src: &str, model: &[&str]| link(&PatchObject::parse("p.o", &compile_src(src, model)).unwrap(), &none, &d.symbols, NEAR);
    let e = err_text(link_src("extern int nonexistent; extern int gone(void);\nint f(void) { return nonexistent + gone(); }\n", NOPIC));
    eprintln!("{e}");
    assert!(e.starts_with("p.o: unresolved symbols: "), "{e}");
    assert!(e.contains("\"nonexistent\" (used at .text.f+0x") && e.contains("\"gone\" (used at .text.f+0x"), "{e}");
    assert!(e.contains("is defined neither in the patch nor in the target program's symbol table"), "{e}");
    let e = err_text(link_src("#include <string.h>\nunsigned long f(const char *s) { return strlen(s); }\n", NOPIC));
    assert!(e.contains("\"strlen\" is a GNU indirect function (IFUNC) in the target program") && e.contains("(used at .text.f+0x1)"), "{e}");
    // A weak undefined symbol the program lacks is 0, as in a static link.
    let (p, _) = link_src("extern int maybe __attribute__((weak));\nint *f(void) { return &maybe; }\n", LARGE).unwrap();
    let f = p.symbols["f"] - NEAR;
    assert_eq!(u64_at(&p.bytes, f + 2), 0);
    // Common symbols (-fcommon) get space at the end of the image.
    let (p, _) = link_src("int common_var;\nint *f(void) { return &common_var; }\n", &["-fno-pic", "-fcommon"]).unwrap();
    let v = p.symbols["common_var"];
    assert!(v >= NEAR && v + 4 <= NEAR + p.size, "{v:#x}");
    assert!(p.sections.iter().any(|s| s.name == "COMMON" && s.addr == v && s.size == 4));
    assert_eq!(u32_at(&p.bytes, p.symbols["f"] - NEAR + 1), v as u32);
}

#[test]
fn layout_orders_and_aligns_sections() {
    let src = "extern long counter;\n_Alignas(64) char buf[100];\nlong table[3] = {1, 2, 3};\nconst char msg[] = \"hi\";\nlong f(int i) { buf[i] = 1; return table[i] + counter + msg[i] + buf[i + 1]; }\n";
    let o = PatchObject::parse("l.o", &compile_src(src, PIC)).unwrap();
    assert_eq!(o.required_alignment(), 64);
    let e = err_text(link(&o, &CommandFile { name: "n".into(), commands: vec![] }, &demo().symbols, NEAR + 16));
    assert!(e.contains("is not aligned to the 64 bytes the patch needs"), "{e}");
    let (p, _) = link(&o, &CommandFile { name: "n".into(), commands: vec![] }, &demo().symbols, NEAR).unwrap();
    let order = |name: &str| p.sections.iter().find(|s| s.name.starts_with(name)).unwrap_or_else(|| panic!("{name}: {:?}", p.sections));
    let (text, ro, got, data, bss) = (order(".text"), order(".rodata"), order(".got"), order(".data"), order(".bss.buf"));
    assert!(text.addr < ro.addr && ro.addr < got.addr && got.addr < data.addr && data.addr < bss.addr, "{:?}", p.sections);
    assert_eq!(bss.addr % 64, 0);
    assert!(p.bytes[(bss.addr - NEAR) as usize..][..100].iter().all(|&b| b == 0));
    assert_eq!(u64_at(&p.bytes, p.symbols["table"] + 16 - NEAR), 3);
    assert_eq!(p.bytes.len(), o.required_size());
    assert_eq!(required_size(&o), o.required_size());
    // Sections do not overlap.
    let mut s: Vec<_> = p.sections.iter().filter(|s| s.size > 0).collect();
    s.sort_by_key(|s| s.addr);
    assert!(s.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr), "{s:?}");
}

#[test]
fn base_must_be_a_user_address() {
    let o = object("ptr.c", PIC);
    let e = err_text(link(&o, &cmds("ptr.cmd"), &demo().symbols, u64::MAX - 4095));
    assert!(e.contains("is not a user-space address range"), "{e}");
}

#[test]
fn every_sample_command_file_parses() {
    let mut n = 0;
    for entry in std::fs::read_dir(samples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cmd") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let f = CommandFile::parse(&name, &sample_text(&name)).unwrap_or_else(|e| panic!("{e}"));
            let (o, obj) = match f.commands[0].action {
                Action::Variable { .. } => ("empty.c", NOPIC),
                _ => (name.strip_suffix(".cmd").map(|s| format!("{s}.c")).unwrap().leak() as &str, NOPIC),
            };
            check(&object(o, obj), &f, &demo().symbols).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert_eq!(n, 6);
}

#[test]
fn parse_and_link_time_of_the_samples() {
    let d = demo();
    for (src, cmd, model, base) in [
        ("v2.c", "v2.cmd", NOPIC, NEAR),
        ("fix.c", "fix.cmd", NOPIC, NEAR),
        ("empty.c", "var.cmd", NOPIC, NEAR),
        ("ptr.c", "ptr.cmd", PIC, FAR),
        ("callback.c", "callback.cmd", PIC, NEAR),
    ] {
        let (bytes, text) = (compile(src, model), sample_text(cmd));
        let n = 1000;
        let t = Instant::now();
        for _ in 0..n {
            let o = PatchObject::parse(src, &bytes).unwrap();
            let c = CommandFile::parse(cmd, &text).unwrap();
            link(&o, &c, &d.symbols, base).unwrap();
        }
        eprintln!("{src} + {cmd}: parse+link {:?} each ({} bytes object)", t.elapsed() / n, bytes.len());
    }
    let t = Instant::now();
    let syms = target_symbols(&d.bytes, 0).unwrap();
    eprintln!("target_symbols(demo-service, {} bytes): {} symbols in {:?}", d.bytes.len(), syms.len(), t.elapsed());
}

// ---------------------------------------------------------------- end to end

/// A host program shaped like the demo service (same globals and small
/// functions, non-PIE) that maps a linked patch at its base, applies the
/// resolved commands to itself and prints what its functions now return.
const HARNESS: &str = r#"
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

volatile unsigned long counter = 41;
const char *message_ptr = "v1";
volatile int config_interval_ms = 100;

__attribute__((noipa)) const char *get_message(void) { return "v1"; }
__attribute__((noipa)) unsigned long reply_counter(void) { return counter + 1; }
/* Big enough for a 14-byte absolute jump. */
__attribute__((noipa)) const char *describe(void)
{
	static char buf[64];
	snprintf(buf, sizeof buf, "describe %lu %s", counter, message_ptr);
	return buf;
}

int main(int argc, char **argv)
{
	if (argc != 4)
		return 2;
	uint64_t base = strtoull(argv[1], NULL, 16);
	FILE *f = fopen(argv[2], "rb");
	if (!f)
		return 3;
	static unsigned char img[1 << 20];
	size_t len = fread(img, 1, sizeof img, f);
	fclose(f);
	if (len) {
		void *p = mmap((void *)base, len, PROT_READ | PROT_WRITE | PROT_EXEC,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
		if (p != (void *)base) {
			perror("mmap");
			return 4;
		}
		memcpy(p, img, len);
	}
	FILE *plan = fopen(argv[3], "r");
	unsigned long addr;
	char hex[256];
	while (plan && fscanf(plan, "%lx %255s", &addr, hex) == 2) {
		uintptr_t page = addr & ~4095UL;
		if (mprotect((void *)page, 8192, PROT_READ | PROT_WRITE | PROT_EXEC)) {
			perror("mprotect");
			return 5;
		}
		for (size_t i = 0; hex[2 * i]; i++) {
			unsigned int b;
			sscanf(hex + 2 * i, "%2x", &b);
			((volatile unsigned char *)addr)[i] = (unsigned char)b;
		}
	}
	printf("get_message=%s\n", get_message());
	printf("reply_counter=%lu\n", reply_counter());
	printf("message_ptr=%s\n", message_ptr);
	printf("config_interval_ms=%d\n", config_interval_ms);
	printf("describe=%s\n", describe());
	return 0;
}
"#;

struct Harness {
    _dir: tempfile::TempDir,
    exe: PathBuf,
    symbols: HashMap<String, TargetSymbol>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (c, exe) = (dir.path().join("harness.c"), dir.path().join("harness"));
        std::fs::write(&c, HARNESS).unwrap();
        run(Process::new("gcc").args(["-O2", "-g", "-fno-pie", "-no-pie", "-o"]).arg(&exe).arg(&c));
        let symbols = target_symbols(&std::fs::read(&exe).unwrap(), 0).unwrap();
        Harness { _dir: dir, exe, symbols }
    })
}

/// Links `src` (compiled with `model`) with `cmd_text` at `base`, runs the
/// harness with it and returns its output as `key=value` pairs.
fn run_patched(src: &str, model: &[&str], cmd_text: &str, base: u64) -> HashMap<String, String> {
    run_patched_object(src, &compile(src, model), cmd_text, base)
}

fn run_patched_object(name: &str, object: &[u8], cmd_text: &str, base: u64) -> HashMap<String, String> {
    let h = harness();
    let o = PatchObject::parse(name, object).unwrap_or_else(|e| panic!("{e}"));
    let c = CommandFile::parse("e2e.cmd", cmd_text).unwrap();
    let (p, resolved) = link(&o, &c, &h.symbols, base).unwrap_or_else(|e| panic!("{e}"));
    let mut plan = String::new();
    for r in &resolved {
        let (addr, bytes) = match &r.action {
            ResolvedAction::Jump { target_addr, jump, .. } => (*target_addr, jump.clone()),
            ResolvedAction::Variable { addr, bytes, .. } => (*addr, bytes.clone()),
            ResolvedAction::Pointer { addr, value } => (*addr, value.to_le_bytes().to_vec()),
        };
        let hex = hex::encode(&bytes);
        plan.push_str(&format!("{addr:x} {hex}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, plan_file) = (dir.path().join("patch.bin"), dir.path().join("plan"));
    std::fs::write(&img, &p.bytes).unwrap();
    std::fs::write(&plan_file, plan).unwrap();
    let out = run(Process::new(&h.exe).arg(format!("{base:x}")).arg(&img).arg(&plan_file));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[test]
fn linked_patches_run() {
    let unpatched = run_patched("empty.c", NOPIC, "V counter 2900000000000000\n", NEAR);
    assert_eq!(unpatched["get_message"], "v1");
    assert_eq!(unpatched["reply_counter"], "42"); // the off-by-one
    assert_eq!(unpatched["describe"], "describe 41 v1");

    // Near, -fno-pic (PC32, 32, 32S, direct calls).
    let v2 = run_patched("v2.c", NOPIC, &sample_text("v2.cmd"), NEAR);
    assert_eq!(v2["get_message"], "v2");
    let fix = run_patched("fix.c", NOPIC, &sample_text("fix.cmd"), NEAR);
    assert_eq!(fix["reply_counter"], "41");
    let var = run_patched("empty.c", NOPIC, &sample_text("var.cmd"), NEAR);
    assert_eq!(var["config_interval_ms"], "50");
    let ptr = run_patched("ptr.c", NOPIC, &sample_text("ptr.cmd"), NEAR);
    assert_eq!(ptr["message_ptr"], "v2-ptr");
    assert_eq!(ptr["describe"], "describe 41 v2-ptr");
    let cb = run_patched("callback.c", NOPIC, &sample_text("callback.cmd"), NEAR);
    assert_eq!(cb["get_message"], "even"); // reply_counter() = 42
    let both = run_patched("callback.c", NOPIC, "J get_message callback_get_message\nV counter 2a00000000000000\n", NEAR);
    assert_eq!((both["get_message"].as_str(), both["reply_counter"].as_str()), ("odd", "43"));

    // Far: 14-byte jumps, PLT stubs, GOT slots, 64-bit absolutes.
    for model in [PIC, PIC_NOPLT, LARGE] {
        let far = run_patched("callback.c", model, "J describe callback_get_message\n", FAR);
        assert_eq!(far["describe"], "even", "{model:?}");
        assert_eq!(far["get_message"], "v1", "{model:?}");
        let ptr = run_patched("ptr.c", model, &sample_text("ptr.cmd"), FAR);
        assert_eq!(ptr["message_ptr"], "v2-ptr", "{model:?}");
    }
}

#[test]
fn read_only_patches_are_told_apart() {
    assert!(object("v2.c", PIC).is_read_only());
    assert!(object("handler.c", PIC).is_read_only());
    let with_data = PatchObject::parse("d.o", &compile_src("int hits; int f(void) { return ++hits; }\n", PIC)).unwrap();
    assert!(!with_data.is_read_only());
}

#[test]
fn benchmark_sized_patches_run() {
    for kib in [10, 50, 100] {
        let src = sized_patch_source(kib);
        let obj = compile_src(&src, PIC);
        let o = PatchObject::parse("sized.o", &obj).unwrap();
        let size = required_size(&o) as u64;
        assert!(size >= kib * 1024 && size < kib * 1024 + 4096, "{kib} KiB patch is {size} bytes");
        let out = run_patched_object("sized.o", &obj, "J get_message patched_get_message\n", NEAR);
        assert_eq!(out["get_message"], "v2", "{kib} KiB patch");
    }
}

