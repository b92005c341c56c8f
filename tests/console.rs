//! The console a person sees: `dvisor run` on a terminal prints its start
//! banner once, before the guest's console (tests/boot.rs checks that a
//! pipe gets none, and that the default boot prints no failure-looking
//! line).
mod common;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A pseudo-terminal: (master, slave).
fn openpty() -> (std::fs::File, OwnedFd) {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two fds into the locals; no name, termios or
    // window size is passed.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened and are owned here only.
    unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

#[test]
fn banner_on_a_terminal_then_the_console() {
    common::ensure_image();
    let name = format!("tty{}", std::process::id());
    let (mut master, slave) = openpty();
    let mut child = common::dvisor()
        .args(["run", "--vcpus", "1", "--name", &name])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dvisor run");
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let (seen, mut master) = (seen.clone(), master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the last slave fd closes.
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let wait = |what: &str, pred: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + common::STEP_TIMEOUT;
        while !pred(&seen.lock().unwrap()) {
            assert!(Instant::now() < deadline, "no {what} on the terminal:\n{}", seen.lock().unwrap());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("guest shell", &|s| s.contains("dvisor-guest: shell") && s.rfind("guest# ") > s.find("dvisor-guest: shell"));
    master.write_all(b"poweroff -f\r").unwrap();
    let deadline = Instant::now() + common::STEP_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dvisor run did not exit after poweroff:\n{}", seen.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(master);
    let _ = reader.join();
    let text = seen.lock().unwrap().replace('\r', "");
    assert!(status.success(), "dvisor run exited {status}:\n{text}");
    assert_eq!(text.matches("From another terminal").count(), 1, "the banner, once:\n{text}");
    let banner_at = text.find("From another terminal").unwrap();
    let init_at = text.find("dvisor-guest: init").expect("the guest's init line");
    assert!(banner_at < init_at, "the banner came after the guest's console:\n{text}");
    let banner = &text[..init_at];
    for want in [
        format!("VM {name}"),
        format!("dvisor status --vm {name}"),
        format!("dvisor ps --vm {name}"),
        format!("dvisor patch apply --vm {name} --comm demo-service --object "),
        format!("dvisor update --vm {name}"),
        "Ctrl-C".to_string(),
    ] {
        assert!(banner.contains(&want), "the banner lacks {want:?}:\n{banner}");
    }
    // The sample patch it names exists.
    let object = banner.split("--object ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    assert!(std::path::Path::new(object).exists(), "the banner names {object}, which does not exist");
}
