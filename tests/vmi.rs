//! Introspection against the guest's own view, one named test per check
//! on a guest they share: `dvisor ps` equals the guest's `ps`, `dvisor
//! maps` equals /proc/PID/maps, the service's counter read through VMI
//! equals what it prints, kernel symbols equal /proc/kallsyms (on a KASLR
//! boot, and on a nokaslr boot of its own), corrupted copies of the
//! guest's structures give errors instead of hangs, and a system call
//! injected into the service runs there.
mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{dvisor_json, heartbeat, ps_matches, run_in_guest, service_pid, symbol_addr, Console};
use dvisor_monitor::paging::{self, PagingMode, VecMemory};
use dvisor_monitor::profile::KernelProfile;
use dvisor_monitor::vmi::{Vmi, VmiError, MSR_LSTAR};
use dvisor_api::VmmClient;
use dvisor_api::protocol::{Request, Sregs};

fn boot(name: &str, cmdline: &str) -> Console {
    let mut c = Console::start(&["--vcpus", "2", "--name", name, "--cmdline", cmdline]);
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");
    // The monitor loads the profile on first use.
    common::wait_monitor(&mut c, name);
    c
}

struct Guest {
    c: Console,
    name: String,
}

impl AsMut<Console> for Guest {
    fn as_mut(&mut self) -> &mut Console {
        &mut self.c
    }
}

static GUEST: Mutex<Option<Guest>> = Mutex::new(None);

/// The KASLR guest the tests share, booted by the first that needs it.
fn guest() -> std::sync::MutexGuard<'static, Option<Guest>> {
    let mut g = common::shared(&GUEST, |g| g.c.running(), || {
        let name = format!("vmi{}", std::process::id());
        Guest { c: boot(&name, &common::cmdline("")), name }
    });
    let guest = g.as_mut().unwrap();
    // A test that failed half-way may have left it paused.
    if dvisor_json(&["status", "--vm", &guest.name])["vm"]["state"] == "paused" {
        dvisor_json(&["resume", "--vm", &guest.name]);
    }
    g
}

#[test]
fn ps_equals_the_guests_ps() {
    common::in_suite("ps_equals_the_guests_ps", guest, |g| {
        ps_matches(&mut g.c, &g.name);
    });
}

#[test]
fn maps_equal_proc_maps() {
    common::in_suite("maps_equal_proc_maps", guest, |g| {
        maps_match(&mut g.c, &g.name);
    });
}

#[test]
fn counter_read_through_vmi_equals_the_printed_one() {
    if common::suite_in_carrier("counter_read_through_vmi_equals_the_printed_one") {
        return;
    }
    let image = dvisor_images::current_guest_image().expect("guest image");
    let g = guest();
    let g = g.as_ref().unwrap();
    counter_matches(&g.c, &g.name, &image.service_binary);
}

#[test]
fn kernel_symbols_equal_kallsyms() {
    common::in_suite("kernel_symbols_equal_kallsyms", guest, |g| {
        let slide = kallsyms_match(&mut g.c, &g.name);
        eprintln!("KASLR boot slide {slide:#x}");
    });
}

#[test]
fn corrupted_copies_give_errors() {
    if common::suite_in_carrier("corrupted_copies_give_errors") {
        return;
    }
    let image = dvisor_images::current_guest_image().expect("guest image");
    let g = guest();
    corrupted_copies_fail(&g.as_ref().unwrap().name, &image.vmlinux);
}

#[test]
fn syscall_injected_into_the_service() {
    common::in_suite("syscall_injected_into_the_service", guest, |g| {
        syscall_injection(&g.c, &g.name);
    });
}

/// A guest of its own, booted with nokaslr: symbols match with no slide.
#[test]
fn nokaslr_boot_has_no_slide() {
    if common::suite_in_carrier("nokaslr_boot_has_no_slide") {
        return;
    }
    // One running guest at a time in the carrier (two nested guests on
    // TCG starve each other): the shared one, if any, waits paused.
    let mut shared = GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let paused = shared.as_mut().and_then(|g| g.c.running().then(|| dvisor_json(&["pause", "--vm", &g.name])));
    let name = format!("vmi{}n", std::process::id());
    let mut c = boot(&name, &common::cmdline("nokaslr"));
    assert_eq!(kallsyms_match(&mut c, &name), 0, "nokaslr boot has a slide");
    c.type_line("poweroff -f");
    assert!(c.wait_exit().success(), "{}", c.stderr());
    if let (Some(_), Some(g)) = (paused, shared.as_ref()) {
        dvisor_json(&["resume", "--vm", &g.name]);
    }
}

/// Last in name order (libtest runs them so, one at a time): it ends the
/// shared guest.
#[test]
fn vmm_powers_off_at_the_end() {
    let Some(mut g) = common::last_in_suite("vmm_powers_off_at_the_end", guest) else { return };
    g.c.type_line("poweroff -f");
    assert!(g.c.wait_exit().success(), "{}", g.c.stderr());
}

fn maps_match(c: &mut Console, name: &str) {
    let pid = service_pid(c);
    let guest = run_in_guest(c, &format!("cat /proc/{pid}/maps"), "MAPS");
    let ours = dvisor_json(&["maps", "--vm", name, &pid.to_string()]);
    let guest: Vec<(u64, u64, String, u64, String)> = guest
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (s, e) = f.first()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
                f.get(1)?.to_string(),
                u64::from_str_radix(f.get(2)?, 16).ok()?,
                f.get(5).map(|s| s.to_string()).unwrap_or_default(),
            ))
        })
        .collect();
    let ours: Vec<(u64, u64, String, u64, String)> = ours
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["start"].as_u64().unwrap(),
                v["end"].as_u64().unwrap(),
                v["perms"].as_str().unwrap().to_string(),
                v["offset"].as_u64().unwrap(),
                v["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(guest.len() >= 5, "guest maps: {guest:?}");
    assert_eq!(ours, guest, "dvisor maps differs from /proc/{pid}/maps");
}

fn counter_matches(c: &Console, name: &str, service: &std::path::Path) {
    let pid = service_pid(c).to_string();
    let addr = format!("{:#x}", symbol_addr(service, "counter"));
    dvisor_json(&["pause", "--vm", name]);
    let mem = dvisor_json(&["mem", "--vm", name, &pid, &addr, "8"]);
    let hex = mem["hex"].as_str().unwrap();
    let bytes = hex::decode(&hex[..16]).unwrap();
    let value = u64::from_le_bytes(bytes.try_into().unwrap());
    // Paused, the service prints nothing new; a line already on its way
    // through the console may still arrive. Within a bounded window the
    // last printed counter reaches the value read (or the one before it,
    // when the pause fell between the increment and the printf).
    let last_printed = || c.lines().iter().rev().find_map(|l| heartbeat(l)).map(|h| h.0).unwrap_or(0);
    let window = Instant::now() + Duration::from_secs(5);
    while last_printed() + 1 < value && Instant::now() < window {
        std::thread::sleep(Duration::from_millis(50));
    }
    let printed = last_printed();
    let mark = c.line_count();
    dvisor_json(&["resume", "--vm", name]);
    if value == printed + 1 {
        // The next line must print exactly that value.
        let next = c.wait_for(mark, "the next heartbeat", |l| heartbeat(l).is_some());
        assert_eq!(heartbeat(&c.lines()[next]).unwrap().0, value);
    } else {
        assert_eq!(value, printed, "counter read through VMI vs printed");
    }
}

/// Compares a sample of /proc/kallsyms with `dvisor ksym`; returns the slide.
fn kallsyms_match(c: &mut Console, name: &str) -> u64 {
    let sample = run_in_guest(c, "grep ' T ' /proc/kallsyms | grep -v '\\[' | awk 'NR % 700 == 1'", "KS");
    let mut checked = 0;
    let mut slide = 0;
    for l in &sample {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [addr, "T", sym] = f[..] else { continue };
        let want = u64::from_str_radix(addr, 16).unwrap();
        let got = dvisor_json(&["ksym", "--vm", name, sym]);
        assert_eq!(got["addr"].as_u64().unwrap(), want, "{sym}: /proc/kallsyms {addr}, dvisor {got}");
        slide = got["slide"].as_u64().unwrap();
        checked += 1;
    }
    assert!(checked >= 20, "too few symbols compared: {sample:?}");
    slide
}

/// Copies guest RAM, checks the walk works on the copy, then corrupts the
/// copy's task list and page tables: each walk must end in an error.
fn corrupted_copies_fail(name: &str, vmlinux: &std::path::Path) {
    let status = dvisor_json(&["status", "--vm", name]);
    let api = std::path::PathBuf::from(status["api_socket"].as_str().unwrap());
    let client = VmmClient::connect(&api, "vmi-test").unwrap();
    let profile = KernelProfile::load_or_build(vmlinux, &dvisor_images::cache_root()).unwrap();
    let _: serde_json::Value = client.call(Request::Pause).unwrap();
    let sregs: Sregs = client.call(Request::GetSregs { vcpu: 0 }).unwrap();
    let lstar = client.read_msr(0, MSR_LSTAR).unwrap();
    let map = dvisor_monitor::GuestMemoryMap::from_vmm(&client).unwrap().expect("guest memory");
    assert_eq!(map.regions().len(), 1, "a 256 MiB guest has one RAM region at 0");
    let mut ram = vec![0u8; map.size() as usize];
    map.read(0, &mut ram).unwrap();
    let _: serde_json::Value = client.call(Request::Resume).unwrap();

    let copy = VecMemory::from_vec(ram.clone());
    let vmi = Vmi::attach(&copy, &profile, sregs.cr3, sregs.cr4, lstar).expect("attach to the copy");
    let procs = vmi.processes().expect("walk the intact copy");
    assert!(procs.len() > 10);
    let view = vmi.view;
    let mode = PagingMode { la57: view.la57 };
    let tasks_off = profile.layouts.task_struct.tasks.offset;
    let pa_of = |va: u64| paging::translate(&copy, view.kernel_pgd, mode, va).unwrap().pa;

    // A cycle: the third task's `tasks.next` points back at the second.
    let (second, third) = (procs[1].task, procs[2].task);
    let slot = pa_of(third + tasks_off);
    let saved = copy.read_u64(slot).unwrap();
    copy.write_u64(slot, second + tasks_off).unwrap();
    let t = Instant::now();
    let e = vmi.processes().expect_err("a cyclic task list must fail");
    assert!(matches!(e, VmiError::Corrupt(_)), "{e}");
    eprintln!("cyclic task list: {e} (after {:?})", t.elapsed());

    // A wild pointer in the list.
    copy.write_u64(slot, 0x4141_4141_4141_4141).unwrap();
    assert!(vmi.processes().is_err(), "a wild task pointer must fail");
    copy.write_u64(slot, saved).unwrap();
    assert_eq!(vmi.processes().unwrap().len(), procs.len());

    // A page-table root full of garbage: attaching must fail cleanly.
    let garbage = VecMemory::from_vec(ram);
    let root = paging::kernel_pgd_from_cr3(sregs.cr3);
    for i in 0..512 {
        garbage.write_u64(root + 8 * i, 0xdead_beef_0000_0000 | i).unwrap();
        garbage.write_u64((sregs.cr3 & paging::PHYS_ADDR_MASK) + 8 * i, 0).unwrap();
    }
    let e = Vmi::attach(&garbage, &profile, sregs.cr3, sregs.cr4, lstar).err().expect("attach to garbage tables");
    eprintln!("garbage page tables: {e}");
}

/// A system call run inside the service from outside: getpid answers its
/// pid, an mmap shows up in its memory map, and the service beats on.
fn syscall_injection(c: &Console, name: &str) {
    let pid = service_pid(c);
    let p = pid.to_string();
    let got = dvisor_json(&["syscall", "--vm", name, &p, "39"]);
    assert_eq!(got["rax"].as_u64(), Some(u64::from(pid)), "getpid injected into the service");
    let before = c.lines().iter().rev().find_map(|l| heartbeat(l)).unwrap().0;
    // mmap(NULL, 8192, PROT_READ|PROT_WRITE|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)
    let got = dvisor_json(&["syscall", "--vm", name, &p, "9", "0", "8192", "7", "0x22", "-1", "0"]);
    let addr = got["rax"].as_u64().unwrap();
    assert!(addr > 0x1000 && addr < 0x8000_0000_0000, "mmap returned {addr:#x}");
    let maps = dvisor_json(&["maps", "--vm", name, &p]);
    let vma = maps.as_array().unwrap().iter().find(|v| v["start"].as_u64() == Some(addr)).cloned();
    let vma = vma.unwrap_or_else(|| panic!("no VMA at {addr:#x}: {maps}"));
    assert_eq!((vma["end"].as_u64().unwrap() - addr, vma["perms"].as_str().unwrap()), (8192, "rwxp"));
    let mark = c.line_count();
    c.wait_for(mark, "heartbeats after the injection", |l| heartbeat(l).is_some_and(|(n, _)| n > before + 3));
    let seq: Vec<u64> = c.lines().iter().filter_map(|l| heartbeat(l).map(|(n, _)| n)).filter(|&n| n >= before).collect();
    assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "the service skipped a beat: {seq:?}");
}
