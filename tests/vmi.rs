//! Introspection against the guest's own view: `dvisor ps` equals the
//! guest's `ps`, `dvisor maps` equals /proc/PID/maps, the service's counter
//! read through VMI equals what it prints, kernel symbols equal
//! /proc/kallsyms on a KASLR and a nokaslr boot, and corrupted copies of
//! the guest's structures give errors instead of hangs.
mod common;

use std::time::Instant;

use common::{dvisor_json, heartbeat, ps_matches, run_in_guest, service_pid, symbol_addr, Console};
use dvisor_monitor::paging::{self, PagingMode, VecMemory};
use dvisor_monitor::profile::KernelProfile;
use dvisor_monitor::vmi::{Vmi, VmiError, MSR_LSTAR};
use dvisor_monitor::VmmClient;
use dvisor_vmm::api::protocol::{Request, Sregs};

fn boot(name: &str, cmdline: &str) -> Console {
    let c = Console::start(&["--vcpus", "2", "--name", name, "--cmdline", cmdline]);
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");
    c
}

#[test]
fn introspection_matches_the_guest() {
    if common::rerun_in_carrier("introspection_matches_the_guest") {
        return;
    }
    let image = dvisor_images::current_guest_image().expect("guest image");
    let name = format!("vmi{}", std::process::id());
    let mut c = boot(&name, "console=ttyS0 quiet");
    // The monitor loads the profile on first use.
    common::wait_monitor(&mut c, &name);

    ps_matches(&mut c, &name);
    maps_match(&mut c, &name);
    counter_matches(&c, &name, &image.service_binary);
    let slide = kallsyms_match(&mut c, &name);
    corrupted_copies_fail(&name, &image.vmlinux);
    syscall_injection(&c, &name);
    c.type_line("poweroff -f");
    assert!(c.wait_exit().success(), "{}", c.stderr());

    let name2 = format!("{name}n");
    let mut c = boot(&name2, "console=ttyS0 quiet nokaslr");
    common::wait_monitor(&mut c, &name2);
    assert_eq!(kallsyms_match(&mut c, &name2), 0, "nokaslr boot has a slide");
    c.type_line("poweroff -f");
    assert!(c.wait_exit().success(), "{}", c.stderr());
    eprintln!("KASLR boot slide {slide:#x}");
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
    // Let a line already on its way through the console arrive.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mark = c.line_count();
    let printed = c.lines().iter().rev().find_map(|l| heartbeat(l)).unwrap().0;
    let mem = dvisor_json(&["mem", "--vm", name, &pid, &addr, "8"]);
    dvisor_json(&["resume", "--vm", name]);
    let hex = mem["hex"].as_str().unwrap();
    let bytes = hex::decode(&hex[..16]).unwrap();
    let value = u64::from_le_bytes(bytes.try_into().unwrap());
    if value == printed + 1 {
        // Paused between the increment and the printf: the next line
        // must print exactly that value.
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
    let profile = KernelProfile::load_or_build(vmlinux).unwrap();
    let _: serde_json::Value = client.call(Request::Pause).unwrap();
    let sregs: Sregs = client.call(Request::GetSregs { vcpu: 0 }).unwrap();
    let lstar = client.read_msr(0, MSR_LSTAR).unwrap();
    let map = client.map_memory().unwrap().expect("guest memory");
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
