//! ShadowReboot on a real guest (`dvisor update`, docs/shadowreboot.md):
//! a shadow that never gets ready, or whose kernel is no kernel, leaves
//! the running VM untouched (never paused, same boot, the service answers
//! throughout); a rejuvenation gives the guest a fresh boot (new boot id,
//! the heartbeat counter starts again, `dvisor ps` equals the guest's
//! `ps`) while a client on the host keeps asking the service every 10 ms,
//! which answers again right after the switch on the same address.
//!
//! Needs root and its own network namespace for the tap device; on this
//! kind of host the whole binary runs inside one carrier (see
//! common::suite_in_carrier).
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{dvisor_json, dvisor_out, heartbeat, Console, GUEST_IP, HOST_IP, TAP};

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

fn guest() -> std::sync::MutexGuard<'static, Option<Guest>> {
    common::shared(&GUEST, |g| g.c.running(), boot)
}

fn boot() -> Guest {
    common::own_netns_with_tap(TAP, HOST_IP);
    let name = format!("up{}", std::process::id());
    let cmdline = common::cmdline(&format!("dvisor.ip={GUEST_IP}/24"));
    // One vCPU: the shadow gets as many, and the carrier has two CPUs for
    // both guests.
    let mut c = Console::start(&["--vcpus", "1", "--name", &name, "--net", &format!("tap={TAP}"), "--cmdline", &cmdline]);
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");
    common::wait_monitor(&mut c, &name);
    Guest { c, name }
}

fn addr() -> String {
    format!("{GUEST_IP}:8080")
}

/// Asks the service every 10 ms until stopped, and watches the VM's run
/// state; returns (answers, longest time between two answers, whether
/// the VM was ever seen paused, failures).
struct Watch {
    stop: Arc<AtomicBool>,
    client: std::thread::JoinHandle<(u64, Duration, Vec<String>)>,
    status: std::thread::JoinHandle<(bool, u64)>,
}

impl Watch {
    fn start(name: &str) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let client = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                common::enter_test_netns();
                let (mut answers, mut longest, mut failures) = (0u64, Duration::ZERO, Vec::new());
                let mut last = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    match common::try_fetch(&addr(), Duration::from_secs(20)) {
                        Ok(a) if a.starts_with("counter=") => {
                            answers += 1;
                            longest = longest.max(last.elapsed());
                            last = Instant::now();
                        }
                        Ok(a) => failures.push(format!("odd answer {a:?}")),
                        Err(e) => failures.push(e),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (answers, longest.max(last.elapsed()), failures)
            })
        };
        let status = {
            let (stop, name) = (stop.clone(), name.to_string());
            std::thread::spawn(move || {
                let (mut paused, mut polls) = (false, 0u64);
                while !stop.load(Ordering::Acquire) {
                    let (ok, out, _) = dvisor_out(&["status", "--vm", &name, "--json"]);
                    if ok {
                        polls += 1;
                        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                        paused |= v["vm"]["state"] == "paused";
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                (paused, polls)
            })
        };
        Watch { stop, client, status }
    }

    fn finish(self) -> (u64, Duration, Vec<String>, bool, u64) {
        self.stop.store(true, Ordering::Release);
        let (answers, longest, failures) = self.client.join().expect("client thread");
        let (paused, polls) = self.status.join().expect("status thread");
        (answers, longest, failures, paused, polls)
    }
}

fn boot_number(name: &str) -> u64 {
    dvisor_json(&["status", "--vm", name])["vm"]["boot"].as_u64().expect("boot number")
}

/// A failed update: exit status 1, the error names `cause`, and the VM
/// ran on untouched the whole time.
fn assert_failed_update_left_vm_alone(g: &mut Guest, args: &[&str], cause: &str) {
    let boot = boot_number(&g.name);
    let mark = g.c.line_count();
    let watch = Watch::start(&g.name);
    let out = update_with_carrier_reruns(&g.name, args, |out| String::from_utf8_lossy(&out.stderr).contains(cause));
    let (answers, _longest, failures, paused, polls) = watch.finish();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "dvisor update {}: {err}", args.join(" "));
    assert!(err.contains(cause), "the error does not name the cause {cause:?}:\n{err}");
    assert!(err.contains("the original VM was not touched"), "{err}");
    assert!(!paused && polls > 0, "the VM was seen paused during a failed update ({polls} status polls)");
    assert!(failures.is_empty() && answers > 0, "the service failed during a failed update: {failures:?} ({answers} answers)");
    assert_eq!(boot_number(&g.name), boot, "a failed update changed the VM's boot");
    // The heartbeat went on, one by one, no restart.
    let beats: Vec<u64> = g.c.lines()[mark..].iter().filter_map(|l| heartbeat(l).map(|h| h.0)).collect();
    assert!(beats.len() > 2, "too few heartbeats during the failed update: {beats:?}");
    assert!(beats.windows(2).all(|w| w[1] == w[0] + 1), "the heartbeat jumped or restarted: {beats:?}");
    let shadows = std::fs::read_dir(dvisor_monitor::paths::vm_dir(&g.name))
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("update-")).count())
        .unwrap_or(0);
    assert_eq!(shadows, 0, "a failed update left its scratch directory behind");
}

#[test]
fn failed_update_ready_never_matches() {
    common::in_suite("failed_update_ready_never_matches", guest, |g| {
        assert_failed_update_left_vm_alone(g, &["--ready", "^this never appears$", "--timeout", "25s"], "before the timeout");
    });
}

#[test]
fn failed_update_kernel_is_not_a_kernel() {
    common::in_suite("failed_update_kernel_is_not_a_kernel", guest, |g| {
        let junk = std::env::temp_dir().join(format!("not-a-kernel-{}", std::process::id()));
        std::fs::write(&junk, b"this is not a bzImage").unwrap();
        assert_failed_update_left_vm_alone(g, &["--kernel", junk.to_str().unwrap(), "--timeout", "60s"], "exited");
        let _ = std::fs::remove_file(&junk);
    });
}

#[test]
fn rejuvenation_gives_a_fresh_boot_and_the_service_answers() {
    common::in_suite("rejuvenation_gives_a_fresh_boot_and_the_service_answers", guest, |g| {
        let before = common::run_in_guest(&mut g.c, "cat /proc/sys/kernel/random/boot_id", "BID1");
        let boot = boot_number(&g.name);
        let last = g.c.lines().iter().rev().find_map(|l| heartbeat(l).map(|h| h.0)).unwrap_or(0);
        let mark = g.c.line_count();
        let watch = Watch::start(&g.name);
        let report = rejuvenate(&g.name);
        // The service answers at once on the same address after the switch.
        let t = Instant::now();
        let first = common::try_fetch(&addr(), Duration::from_secs(20));
        let first_answer = t.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let (answers, longest, failures, _paused, _) = watch.finish();
        let _ = writeln_stderr(&format!(
            "rejuvenation: {report}\nclient: {answers} answers, longest gap {longest:?}, first answer after the update {first_answer:?}, {} failed requests",
            failures.len()
        ));
        assert!(first.as_deref().is_ok_and(|a| a.starts_with("counter=")), "the service did not answer after the switch: {first:?}");
        assert_eq!(report["kind"], "rejuvenation");
        assert!(report["switch_ms"].as_f64().is_some_and(|s| s > 0.0), "{report}");
        assert!(report["boot_to_ready_ms"].as_f64().is_some_and(|s| s > 0.0), "{report}");
        assert!(report["boot"].as_u64().is_some_and(|b| b > boot), "{report}");
        assert!(answers > 0, "the client got no answer during the update");
        // A fresh boot: the counter starts again, the boot id changes.
        let i = g.c.wait_for(mark, "a heartbeat of the new boot", |l| heartbeat(l).is_some_and(|h| h.0 < last));
        assert!(heartbeat(&g.c.lines()[i]).unwrap().0 < last);
        let shell_ready = g.c.line_count();
        g.c.type_line("");
        g.c.wait_prompt(shell_ready, "guest# ");
        let after = common::run_in_guest(&mut g.c, "cat /proc/sys/kernel/random/boot_id", "BID2");
        let id = |l: &[String]| l.iter().find(|s| s.trim().len() == 36).cloned().unwrap_or_default();
        assert!(!id(&before).is_empty() && !id(&after).is_empty(), "no boot id read: {before:?} {after:?}");
        assert_ne!(id(&before), id(&after), "the boot id did not change");
        common::ps_matches(&mut g.c, &g.name);
    });
}

/// `dvisor update --vm NAME ARGS`, started again (at most twice, with a
/// note) when, instead of ending as `expected` says, its shadow died of
/// the triple fault the carrier's nested KVM causes now and then
/// (docs/carrier.md): the VM was not touched then.
fn update_with_carrier_reruns(name: &str, args: &[&str], expected: impl Fn(&std::process::Output) -> bool) -> std::process::Output {
    let mut all = vec!["update", "--vm", name];
    all.extend_from_slice(args);
    let run = || common::dvisor().args(&all).output().expect("run dvisor update");
    let mut out = run();
    for rerun in 1..=2 {
        let carrier = std::env::var_os("DVISOR_IN_CARRIER").is_some();
        if expected(&out) || !(carrier && String::from_utf8_lossy(&out.stderr).contains("triple fault (KVM_EXIT_SHUTDOWN)")) {
            break;
        }
        let _ = writeln_stderr(&format!("NOTE: the shadow triple-faulted inside the carrier; update again ({rerun} of 2)"));
        out = run();
    }
    out
}

/// A rejuvenation that must succeed: its JSON report.
fn rejuvenate(name: &str) -> serde_json::Value {
    let out = update_with_carrier_reruns(name, &["--json"], |out| out.status.success());
    if !out.status.success() {
        let log = std::fs::read_to_string(dvisor_monitor::paths::vm_dir(name).join("monitor.log")).unwrap_or_default();
        panic!("dvisor update failed:\n{}\n--- monitor.log ---\n{log}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("dvisor update printed non-JSON ({e}):\n{text}"))
}

fn writeln_stderr(s: &str) -> std::io::Result<()> {
    use std::io::Write;
    // Straight to fd 2: libtest captures eprintln! of a test.
    writeln!(std::io::stderr(), "{s}")
}

/// Runs last (by name): the updated guest powers off cleanly, which ends
/// its VMM with status 0.
#[test]
fn updated_guest_powers_off() {
    let Some(mut g) = common::last_in_suite("updated_guest_powers_off", guest) else { return };
    let mark = g.c.line_count();
    g.c.type_line("");
    g.c.wait_prompt(mark, "guest# ");
    g.c.type_line("poweroff -f");
    let st = g.c.wait_exit();
    assert_eq!(st.code(), Some(0), "stderr:\n{}", g.c.stderr());
}
