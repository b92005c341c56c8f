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
    /// Host time from the first heartbeat seen to the one numbered 10.
    first_to_tenth_beat: std::time::Duration,
    first_beat_number: u64,
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
    let first_seen = std::time::Instant::now();
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");
    // Let the counter tick past the restart values we check for below.
    let later = c.wait_for(hb, "more heartbeats", |l| heartbeat(l).is_some_and(|(n, _)| n >= 10));
    let first_to_tenth_beat = first_seen.elapsed();
    let first_beat_number = heartbeat(&c.lines()[hb]).map(|h| h.0).unwrap_or(0);
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
        first_to_tenth_beat,
        first_beat_number,
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

/// What a person would take for a failure, on the default boot's console
/// (the default command line, the default image).
const FAILURE_WORDS: &[&str] = &["Fatal", "BUG", "WARNING", "Call Trace"];

#[test]
fn default_boot_prints_nothing_that_looks_like_a_failure() {
    let t = session();
    let bad: Vec<&String> = t.lines.iter().filter(|l| FAILURE_WORDS.iter().any(|w| l.contains(w))).collect();
    assert!(bad.is_empty(), "the default boot printed failure-looking lines: {bad:#?}");
}

#[test]
fn default_heartbeat_is_slow_enough_to_read() {
    // Once a second by default (a person types at the same console): the
    // beats from the first one seen to number 10 took about a second each
    // on the host's clock (100 ms each with `dvisor.beat=100`).
    let t = session();
    let beats = 10u64.saturating_sub(t.first_beat_number);
    assert!(beats >= 5, "the first heartbeat seen was already number {}", t.first_beat_number);
    let per_beat = t.first_to_tenth_beat.as_secs_f64() / beats as f64;
    assert!(per_beat >= 0.7, "{beats} beats in {:?}: {per_beat:.2} s a beat, not about one a second", t.first_to_tenth_beat);
}

#[test]
fn no_banner_when_stdout_is_not_a_terminal() {
    let t = session();
    let banner: Vec<&String> = t.lines.iter().filter(|l| l.contains("From another terminal")).collect();
    assert!(banner.is_empty(), "the start banner appeared on a pipe: {banner:?}");
}
