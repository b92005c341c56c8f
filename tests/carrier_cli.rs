//! The operator's commands from the host against a VM that `dvisor run`
//! put in the carrier (hosts without hardware KVM): the monitor's control
//! socket is relayed to the host's runtime dir (guest-images/src/carrier/relay.rs), so `status`,
//! `pause`, `resume` and `events` work from another process on the host,
//! and the host socket is gone once the VM has powered off.
//!
//! On a host with hardware KVM there is no carrier and nothing to check
//! here (tests/monitored_guest.rs covers the direct case).
mod common;

use std::time::{Duration, Instant};

use common::{dvisor_json, dvisor_out, heartbeat, Console};

fn beats(c: &Console, from: usize) -> Vec<u64> {
    c.lines()[from..].iter().filter_map(|l| heartbeat(l).map(|(n, _)| n)).collect()
}

/// `dvisor status --json` from the host, retried until the carrier's
/// monitor answers through the relay.
fn wait_status(name: &str) -> serde_json::Value {
    let deadline = Instant::now() + common::STEP_TIMEOUT;
    loop {
        let (ok, out, err) = dvisor_out(&["status", "--vm", name, "--json"]);
        if ok {
            return serde_json::from_str(&out).unwrap_or_else(|e| panic!("status printed non-JSON ({e}):\n{out}"));
        }
        assert!(Instant::now() < deadline, "no monitor answered from the host: {err}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn operator_commands_reach_the_carrier() {
    if dvisor_images::carrier::host_has_hardware_kvm() {
        eprintln!("carrier_cli: this host has hardware KVM, so `dvisor run` uses no carrier; nothing to relay");
        return;
    }
    common::carrier_reruns("operator_commands_reach_the_carrier", relay_session);
}

fn relay_session() {
    common::ensure_image();
    let name = format!("cc{}", std::process::id());
    let host_socket = dvisor_monitor::paths::control_socket(&name);
    let mut c = Console::start(&["--vcpus", "1", "--name", &name, "--cmdline", &common::cmdline("")]);
    c.wait_for(0, "the first heartbeat", |l| heartbeat(l).is_some());
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");

    // --- status from the host, through the relay
    let status = wait_status(&name);
    assert_eq!(status["vm"]["vcpus"], 1, "{status}");
    assert_eq!(status["vm"]["state"], "running", "{status}");
    assert!(host_socket.exists(), "{} missing while the monitor answers", host_socket.display());

    // --- pause: the heartbeat stops; resume: it goes on
    let p = dvisor_json(&["pause", "--vm", &name]);
    assert_eq!(p["already"], false, "{p}");
    let paused_at = c.line_count();
    std::thread::sleep(Duration::from_secs(3));
    let during = beats(&c, paused_at);
    // A line written just before the pause may still be on its way through
    // the carrier's serial line; nothing new may follow it.
    assert!(during.len() <= 1, "heartbeats while paused: {during:?}");
    assert_eq!(wait_status(&name)["vm"]["state"], "paused");
    let last = beats(&c, 0).into_iter().max().unwrap_or(0);
    let r = dvisor_json(&["resume", "--vm", &name]);
    assert_eq!(r["already"], false, "{r}");
    c.wait_for(paused_at, &format!("a heartbeat after {last}"), |l| heartbeat(l).is_some_and(|(n, _)| n > last));

    // --- a streamed reply: two live console events, then the client leaves
    let (ok, out, err) = dvisor_out(&["events", "--vm", &name, "--kinds", "console", "--count", "2", "--json"]);
    assert!(ok, "dvisor events failed: {err}");
    let events: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?} is not JSON: {e}"))).collect();
    assert_eq!(events.len(), 2, "{out}");
    assert!(events.iter().all(|e| e["kind"] == "console" && e["line"].is_string()), "{out}");
    // The relay still serves after a streaming client hung up.
    assert_eq!(wait_status(&name)["vm"]["state"], "running");

    c.type_line("poweroff -f");
    let st = c.wait_exit();
    assert!(st.success(), "dvisor run exited with {st}; stderr:\n{}", c.stderr());
    assert!(!host_socket.exists(), "{} outlived the VM", host_socket.display());
    let dir = host_socket.parent().unwrap();
    assert!(!dir.exists(), "{} (which held only the relayed socket) outlived the VM", dir.display());
    let (ok, _, err) = dvisor_out(&["status", "--vm", &name]);
    assert!(!ok && err.contains("no monitor serves"), "status after poweroff: {err}");
}
