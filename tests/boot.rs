//! One guest, booted once (through the carrier on hosts without hardware
//! KVM), taken through its whole life: first heartbeat, vCPU count, a
//! reboot from inside, and a poweroff. Each test checks one step of the
//! shared transcript.
mod common;

use std::process::ExitStatus;
use std::sync::OnceLock;

use common::{heartbeat, Console};

struct Transcript {
    lines: Vec<String>,
    first_boot_heartbeat: usize,
    second_boot_init: usize,
    second_boot_heartbeat: usize,
    exit: ExitStatus,
    stderr: String,
}

/// The session runs once; if it fails, every test reports that failure
/// instead of booting again.
fn session() -> &'static Transcript {
    static T: OnceLock<Result<Transcript, String>> = OnceLock::new();
    let result = T.get_or_init(|| {
        std::panic::catch_unwind(|| common::carrier_reruns("the boot session", run_session)).map_err(|e| {
            e.downcast_ref::<String>().cloned().unwrap_or_else(|| "session panicked".into())
        })
    });
    match result {
        Ok(t) => t,
        Err(e) => panic!("the shared guest session failed:\n{e}"),
    }
}

fn run_session() -> Transcript {
    common::ensure_image();
    let mut c = Console::start(&["--vcpus", "2", "--mem", "256"]);
    let hb = c.wait_for(0, "the first heartbeat", |l| heartbeat(l).is_some());
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");
    // Let the counter tick past the restart values we check for below.
    let later = c.wait_for(hb, "more heartbeats", |l| heartbeat(l).is_some_and(|(n, _)| n >= 10));
    c.type_line("reboot -f");
    let init2 = c.wait_for(later, "the guest init after reboot", |l| l.contains("dvisor-guest: init"));
    let hb2 = c.wait_for(init2, "a heartbeat after reboot", |l| heartbeat(l).is_some());
    let shell2 = c.wait_for(init2, "the guest shell after reboot", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell2, "guest# ");
    c.type_line("poweroff -f");
    let exit = c.wait_exit();
    Transcript {
        lines: c.lines(),
        first_boot_heartbeat: hb,
        second_boot_init: init2,
        second_boot_heartbeat: hb2,
        exit,
        stderr: c.stderr(),
    }
}

#[test]
fn boot_reaches_first_heartbeat_with_message_v1() {
    let t = session();
    let (_, msg) = heartbeat(&t.lines[t.first_boot_heartbeat]).unwrap();
    assert_eq!(msg, "v1");
}

#[test]
fn heartbeat_counter_advances() {
    let t = session();
    let counts: Vec<u64> = t.lines[..t.second_boot_init].iter().filter_map(|l| heartbeat(l)).map(|h| h.0).collect();
    assert!(counts.len() >= 5, "{counts:?}");
    assert!(counts.windows(2).all(|w| w[1] > w[0]), "counter not increasing: {counts:?}");
}

#[test]
fn guest_uses_two_vcpus() {
    let t = session();
    let cpus: Vec<&String> = t.lines.iter().filter(|l| l.contains("dvisor-guest: cpus=")).collect();
    assert!(!cpus.is_empty(), "guest never reported its CPUs");
    for l in cpus {
        assert!(l.trim_end().ends_with("cpus=2"), "guest saw {l:?} with --vcpus 2");
    }
}

#[test]
fn guest_reboot_boots_again_and_heartbeat_restarts() {
    let t = session();
    let before = t.lines[..t.second_boot_init].iter().filter_map(|l| heartbeat(l)).map(|h| h.0).max().unwrap();
    let (after, _) = heartbeat(&t.lines[t.second_boot_heartbeat]).unwrap();
    assert!(after < before, "counter did not restart: {after} after {before}");
    let inits = t.lines.iter().filter(|l| l.contains("dvisor-guest: init")).count();
    assert_eq!(inits, 2, "expected exactly two boots");
}

#[test]
fn guest_poweroff_exits_zero() {
    let t = session();
    assert!(t.exit.success(), "dvisor run exited {:?}\nstderr:\n{}", t.exit, t.stderr);
}
