//! `--on-reboot exit`: a reboot from inside the guest ends `dvisor run`
//! with its own status (3) instead of booting again.
mod common;

use common::{heartbeat, Console};

#[test]
fn on_reboot_exit_stops_with_status_3() {
    common::carrier_reruns("on_reboot_exit_stops_with_status_3", reboot_session);
}

fn reboot_session() {
    common::ensure_image();
    let mut c = Console::start(&["--vcpus", "1", "--on-reboot", "exit"]);
    c.wait_for(0, "the first heartbeat", |l| heartbeat(l).is_some());
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");
    c.type_line("reboot -f");
    let st = c.wait_exit();
    assert_eq!(st.code(), Some(3), "stderr:\n{}", c.stderr());
    assert!(c.stderr().contains("guest rebooted"), "{}", c.stderr());
    let inits = c.lines().iter().filter(|l| l.contains("dvisor-guest: init")).count();
    assert_eq!(inits, 1);
}
