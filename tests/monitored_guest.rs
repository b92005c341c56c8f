//! One monitored guest, checked the way an operator would use it, one
//! named test per capability on a guest they share: the monitor comes up
//! with the VM, the network service answers from the host, pause stops the
//! heartbeat and resume restarts it, keys typed on the PS/2 keyboard reach
//! /dev/input and the VT shell, the monitor can be SIGKILLed and restarted
//! without the guest noticing, garbage on the support API gets error
//! replies, single-stepping and register writes work, an NMI reaches the
//! guest kernel, and power-off ends VMM and monitor.
//!
//! Needs root and its own network namespace for the tap device; on this
//! kind of host the whole binary runs inside one carrier (see
//! common::suite_in_carrier).
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{dvisor_json, dvisor_out, heartbeat, Console};
use dvisor_api::VmmClient;
use dvisor_api::protocol::{DebugReason, Event, EventKind, Request};

use common::{GUEST_IP, HOST_IP, TAP};

/// Heartbeat counters seen on the console from line `from` on.
fn beats(c: &Console, from: usize) -> Vec<u64> {
    c.lines()[from..].iter().filter_map(|l| heartbeat(l).map(|(n, _)| n)).collect()
}

fn wait_beat_after(c: &Console, from: usize, n: u64) -> usize {
    c.wait_for(from, &format!("a heartbeat after {n}"), |l| heartbeat(l).is_some_and(|(k, _)| k > n))
}

/// The guest the tests share, and a monitor a test started in place of
/// the one `dvisor run` started.
struct Guest {
    c: Console,
    name: String,
    monitor: Option<Child>,
}

impl AsMut<Console> for Guest {
    fn as_mut(&mut self) -> &mut Console {
        &mut self.c
    }
}

impl Guest {
    fn vm(&self) -> [&str; 2] {
        ["--vm", &self.name]
    }
}

static GUEST: Mutex<Option<Guest>> = Mutex::new(None);

/// The shared guest, running, its monitor answering, its shell at a
/// prompt: booted by the first test that needs it (or again, if a test
/// before left it dead).
fn guest() -> std::sync::MutexGuard<'static, Option<Guest>> {
    let mut g = common::shared(&GUEST, |g| g.c.running(), boot);
    let guest = g.as_mut().unwrap();
    // A test that failed half-way may have left it paused.
    if wait_status(&guest.vm())["vm"]["state"] == "paused" {
        dvisor_json(&["resume", "--vm", &guest.name]);
    }
    g
}

fn boot() -> Guest {
    common::own_netns_with_tap(TAP, HOST_IP);
    let name = format!("mg{}", std::process::id());
    let cmdline = common::cmdline(&format!("dvisor.ip={GUEST_IP}/24"));
    let c = Console::start(&["--vcpus", "2", "--name", &name, "--net", &format!("tap={TAP}"), "--cmdline", &cmdline]);
    let eth = c.wait_for(0, "eth0 configured", |l| l.contains("dvisor-guest: eth0"));
    assert!(c.lines()[eth].contains(GUEST_IP), "{}", c.lines()[eth]);
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");
    wait_status(&["--vm", &name]);
    Guest { c, name, monitor: None }
}

#[test]
fn monitor_comes_up_with_the_vm() {
    common::in_suite("monitor_comes_up_with_the_vm", guest, |g| {
        let status = wait_status(&g.vm());
        assert_eq!(status["vm"]["vcpus"], 2);
        let devices = status["vm"]["devices"].as_array().unwrap();
        assert!(devices.iter().any(|d| d["name"] == "eth0" && d["kind"] == "virtio-net"), "{status}");
    });
}

#[test]
fn service_answers_over_virtio_net() {
    common::in_suite("service_answers_over_virtio_net", guest, |g| {
        let before = device_totals(&g.name, "eth0");
        for _ in 0..3 {
            let answer = common::fetch(&format!("{GUEST_IP}:8080"));
            assert!(answer.starts_with("counter=") && answer.contains("message=v1"), "service answered {answer:?}");
        }
        let after = device_totals(&g.name, "eth0");
        for counter in ["rx_packets", "tx_packets"] {
            let grew = after[counter].as_u64().unwrap() - before[counter].as_u64().unwrap();
            assert!(grew >= 3, "eth0 {counter} grew by {grew} over three requests: {after}");
        }
    });
}

fn device_totals(vm: &str, device: &str) -> serde_json::Value {
    let stats = dvisor_json(&["stats", "--vm", vm]);
    let d = stats["devices"].as_array().unwrap().iter().find(|d| d["name"] == device).cloned();
    d.unwrap_or_else(|| panic!("no {device} in {stats}"))["totals"].clone()
}

#[test]
fn pause_stops_the_heartbeat_and_resume_restarts_it() {
    common::in_suite("pause_stops_the_heartbeat_and_resume_restarts_it", guest, |g| {
        let c = &g.c;
        let before = c.line_count();
        wait_beat_after(c, before, 0);
        let p = dvisor_json(&["pause", "--vm", &g.name]);
        assert_eq!(p["already"], false);
        let paused_at = c.line_count();
        // The VMM says it is paused; then, over a bounded window, no heartbeat
        // appears but the one a line already on its way through the console
        // may still carry.
        assert_eq!(wait_status(&g.vm())["vm"]["state"], "paused");
        let window = Instant::now() + Duration::from_secs(3);
        while Instant::now() < window {
            let during = beats(c, paused_at);
            assert!(during.len() <= 1, "heartbeats while paused: {during:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let regs = dvisor_json(&["regs", "--vm", &g.name]);
        let regs = regs.as_array().unwrap();
        assert_eq!(regs.len(), 2);
        for r in regs {
            assert!(r["regs"]["rip"].as_u64().unwrap() >= 0xffff_8000_0000_0000, "kernel rip expected: {r}");
            assert_ne!(r["sregs"]["cr0"].as_u64().unwrap() & (1 << 31), 0, "paging on: {r}");
        }
        let last = beats(c, before).into_iter().max().unwrap_or(0);
        let r = dvisor_json(&["resume", "--vm", &g.name]);
        assert_eq!(r["already"], false);
        wait_beat_after(c, paused_at, last);
    });
}

#[test]
fn keys_reach_dev_input_and_the_vt_shell() {
    common::in_suite("keys_reach_dev_input_and_the_vt_shell", guest, |g| {
        let c = &mut g.c;
        // A raw reader on /dev/input/event0, then the VT shell.
        let mark = c.line_count();
        c.type_line("evread -n 2");
        c.wait_for(mark, "evread ready", |l| l.contains("evread: ready"));
        // Shift alone: evread sees it, the VT shell gets no stray character.
        let k = dvisor_json(&["keys", "--vm", &g.name, "--raw", "leftshift:press leftshift:release:30"]);
        assert_eq!(k["delivered"], 2);
        let press = c.wait_for(mark, "the key press", |l| l.contains("evread: key 42"));
        assert!(c.lines()[press].contains("press"), "{}", c.lines()[press]);
        let release = c.wait_for(press + 1, "the key release", |l| l.contains("evread: key 42") && l.contains("release"));
        // evread exits after two events; its shell prompts again.
        c.wait_prompt(release, "guest# ");
        let mark = c.line_count();
        dvisor_json(&["keys", "--vm", &g.name, r"echo KEYS-$((6*7))\n"]);
        c.wait_for(mark, "the VT shell's answer to typed keys", |l| l.contains("KEYS-42"));
    });
}

#[test]
fn monitor_survives_sigkill_and_a_new_one_attaches() {
    common::in_suite("monitor_survives_sigkill_and_a_new_one_attaches", guest, |g| {
        let old_pid = wait_status(&g.vm())["monitor_pid"].as_u64().unwrap();
        let c = &g.c;
        let mark = c.line_count();
        let from_beat = beats(c, 0).into_iter().max().unwrap_or(0);
        common::sh(&format!("kill -KILL {old_pid}"));
        let (ok, _, err) = dvisor_out(&["status", "--vm", &g.name]);
        assert!(!ok && err.contains("no monitor serves"), "status without a monitor: {err}");
        let gone = wait_beat_after(c, mark, from_beat + 5);
        let monitor = common::dvisor()
            .args(["monitor", "--vm", &g.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a new monitor");
        g.monitor = Some(monitor);
        let new_status = wait_status(&g.vm());
        assert_ne!(new_status["monitor_pid"].as_u64().unwrap(), old_pid);
        let c = &g.c;
        let after = wait_beat_after(c, gone, from_beat + 10);
        let seq: Vec<u64> = beats(c, mark).into_iter().filter(|&n| n > from_beat).collect();
        assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "heartbeat skipped during the monitor restart: {seq:?}");
        assert!(after > gone);
    });
}

#[test]
fn support_api_answers_garbage_with_errors() {
    common::in_suite("support_api_answers_garbage_with_errors", guest, |g| {
        garbage_gets_errors(&api_socket(&g.name));
        // The guest is unharmed.
        let now = beats(&g.c, 0).into_iter().max().unwrap_or(0);
        wait_beat_after(&g.c, 0, now + 2);
    });
}

#[test]
fn debug_single_step_and_register_writes() {
    common::in_suite("debug_single_step_and_register_writes", guest, |g| {
        guest_debug(&api_socket(&g.name));
        let now = beats(&g.c, 0).into_iter().max().unwrap_or(0);
        wait_beat_after(&g.c, 0, now + 2);
    });
}

#[test]
fn nmi_reaches_the_guest_kernel() {
    common::in_suite("nmi_reaches_the_guest_kernel", guest, |g| {
        let c = &mut g.c;
        let client = VmmClient::connect(std::path::Path::new(&api_socket(&g.name)), "nmi-test").unwrap();
        let _: serde_json::Value = client.call(Request::Nmi { vcpu: 0 }).unwrap();
        drop(client);
        let mark = c.line_count();
        c.type_line("dmesg | grep -c 'NMI received' | sed 's/^/NMI-COUNT-/'");
        let n = c.wait_for(mark, "the NMI count", |l| l.starts_with("NMI-COUNT-"));
        assert_ne!(c.lines()[n], "NMI-COUNT-0", "the guest kernel saw no NMI");
        let mark = c.line_count();
        let now = beats(c, 0).into_iter().max().unwrap_or(0);
        wait_beat_after(c, mark, now + 3);
    });
}

/// Last in name order (libtest runs them so, one at a time): it ends the
/// shared guest. Run alone, it boots its own.
#[test]
fn vmm_power_off_takes_the_monitor_along() {
    let Some(mut g) = common::last_in_suite("vmm_power_off_takes_the_monitor_along", guest) else { return };
    // The monitor `dvisor run` started, or the one a test started instead.
    let monitor_pid = wait_status(&g.vm())["monitor_pid"].as_u64().unwrap();
    g.c.type_line("poweroff -f");
    let st = g.c.wait_exit();
    assert!(st.success(), "stderr:\n{}", g.c.stderr());
    let deadline = Instant::now() + common::STEP_TIMEOUT;
    loop {
        let gone = match g.monitor.as_mut() {
            Some(m) => m.try_wait().unwrap().is_some(),
            None => !std::path::Path::new(&format!("/proc/{monitor_pid}")).exists(),
        };
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "monitor {monitor_pid} outlived the VMM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn api_socket(vm: &str) -> String {
    dvisor_json(&["status", "--vm", vm])["api_socket"].as_str().unwrap().to_string()
}

fn next_debug_event(rx: &std::sync::mpsc::Receiver<Event>) -> (u32, DebugReason, u64) {
    let deadline = Instant::now() + common::STEP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Debug { vcpu, reason, rip, .. }) => return (vcpu, reason, rip),
            Ok(_) => {}
            Err(e) => panic!("no debug event: {e}"),
        }
    }
}

fn guest_debug(api: &str) {
    let client = VmmClient::connect(std::path::Path::new(api), "debug-test").expect("connect to the API");
    let events = client.subscribe(&[EventKind::Debug]).unwrap();
    let state = |c: &VmmClient| c.call::<serde_json::Value>(Request::Status).unwrap()["state"].clone();

    let _: serde_json::Value = client.call(Request::Pause).unwrap();
    let step = Request::SetDebug { vcpu: Some(0), single_step: true, sw_breakpoints: false, hw_breakpoints: vec![] };
    let _: serde_json::Value = client.call(step).unwrap();
    let _: serde_json::Value = client.call(Request::Resume).unwrap();
    let (vcpu, reason, _) = next_debug_event(&events);
    assert_eq!((vcpu, reason), (0, DebugReason::SingleStep));
    let p: serde_json::Value = client.call(Request::Pause).unwrap();
    assert_eq!(p["already"], true, "a debug exit pauses the VM");
    // Hardware breakpoints are not checked here: inside the carrier (KVM
    // nested on QEMU-TCG's emulated SVM) they never fire; see
    // docs/support-api.md.
    let off = Request::SetDebug { vcpu: None, single_step: false, sw_breakpoints: false, hw_breakpoints: vec![] };
    let _: serde_json::Value = client.call(off).unwrap();

    // Register and MSR writes, with the values just read: the guest must
    // run on unharmed, and a read-back must show them.
    let regs: serde_json::Value = client.call(Request::GetRegs { vcpu: 1 }).unwrap();
    let set = Request::SetRegs { vcpu: 1, regs: serde_json::from_value(regs.clone()).unwrap() };
    let _: serde_json::Value = client.call(set).unwrap();
    assert_eq!(client.call::<serde_json::Value>(Request::GetRegs { vcpu: 1 }).unwrap(), regs);
    let lstar = client.read_msr(1, 0xc000_0082).unwrap();
    let msr = dvisor_api::protocol::Msr { index: 0xc000_0082, value: lstar };
    let _: serde_json::Value = client.call(Request::SetMsrs { vcpu: 1, msrs: vec![msr] }).unwrap();
    let _: serde_json::Value = client.call(Request::Resume).unwrap();
    assert_eq!(state(&client), "running");
    // A write to a running VM is refused.
    let e = client.call::<serde_json::Value>(Request::SetMsrs { vcpu: 1, msrs: vec![msr] }).unwrap_err();
    assert!(e.to_string().contains("paused"), "{e}");
}

/// `dvisor status --json`, retried while the monitor is still attaching.
fn wait_status(vm: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + common::STEP_TIMEOUT;
    loop {
        let mut args = vec!["status"];
        args.extend_from_slice(vm);
        args.push("--json");
        let (ok, out, err) = dvisor_out(&args);
        if ok {
            return serde_json::from_str(&out).unwrap();
        }
        assert!(Instant::now() < deadline, "no monitor answered: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends malformed, oversized and out-of-range requests straight to the
/// VMM's socket; each must get an error reply with the right code.
fn garbage_gets_errors(api: &str) {
    let s = UnixStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |line: &[u8]| -> serde_json::Value {
        w.write_all(line).unwrap();
        w.write_all(b"\n").unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"))
    };
    let code = |v: &serde_json::Value| v["error"]["code"].as_str().unwrap_or("").to_string();
    assert_eq!(code(&ask(br#"{"id":1,"op":"pause"}"#)), "wrong_state", "requests before hello");
    assert_eq!(code(&ask(br#"{"id":2,"op":"hello","version":99,"client":"t"}"#)), "version_mismatch");
    assert!(ask(br#"{"id":3,"op":"hello","version":1,"client":"garbage-test"}"#)["ok"].is_object());
    assert_eq!(code(&ask(b"\xff\xfe\x00garbage")), "bad_request");
    assert_eq!(code(&ask(b"{\"id\":4,")), "bad_request");
    assert_eq!(code(&ask(br#"{"id":5,"op":"format_disk"}"#)), "bad_request");
    let huge = format!("{{\"id\":6,\"op\":\"status\",\"pad\":\"{}\"}}", "x".repeat(200_000));
    assert_eq!(code(&ask(huge.as_bytes())), "too_large");
    let bad_vcpu = ask(br#"{"id":7,"op":"get_regs","vcpu":99}"#);
    assert_eq!((code(&bad_vcpu), bad_vcpu["id"].as_u64()), ("out_of_range".into(), Some(7)));
    assert_eq!(code(&ask(br#"{"id":8,"op":"irq","gsi":4000}"#)), "out_of_range");
    assert_eq!(code(&ask(br#"{"id":9,"op":"read_memory","gpa":18446744073709551000,"len":4096}"#)), "out_of_range");
    assert_eq!(code(&ask(br#"{"id":10,"op":"read_memory","gpa":0,"len":99999999}"#)), "too_large");
    assert_eq!(code(&ask(br#"{"id":11,"op":"set_regs","vcpu":0,"regs":{}}"#)), "bad_request");
    assert_eq!(code(&ask(br#"{"id":12,"op":"keys","text":"caf\u00e9"}"#)), "bad_request");
    let st = ask(br#"{"id":13,"op":"status"}"#);
    assert_eq!(st["ok"]["state"], "running", "{st}");

    // pause_with_state: each vCPU's registers as its thread read them while
    // parking, the same that get_regs/get_sregs then read from the stopped
    // vCPU.
    let p = ask(br#"{"id":14,"op":"pause_with_state"}"#);
    let vcpus = p["ok"]["vcpus"].as_array().unwrap_or_else(|| panic!("{p}")).clone();
    assert_eq!(vcpus.len(), 2, "{p}");
    for v in &vcpus {
        let n = v["vcpu"].as_u64().unwrap();
        assert_eq!(ask(format!(r#"{{"id":15,"op":"get_regs","vcpu":{n}}}"#).as_bytes())["ok"], v["regs"], "vCPU {n}");
        assert_eq!(ask(format!(r#"{{"id":16,"op":"get_sregs","vcpu":{n}}}"#).as_bytes())["ok"], v["sregs"], "vCPU {n}");
    }
    assert_eq!(ask(br#"{"id":17,"op":"resume"}"#)["ok"]["already"], false);
}
