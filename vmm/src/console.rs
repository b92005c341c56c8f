//! The host side of the guest console: terminal mode and the input pump.
//!
//! One input thread lives as long as the process and feeds whichever UART
//! belongs to the current boot, so a guest reboot does not lose keystrokes
//! or leave a reader blocked on a dead device.
//!
//! The terminal mode is not `vmm_sys_util::terminal`'s: its raw mode clears
//! ISIG (Ctrl-C must still stop the VMM here) and leaves ICRNL/IXON set (so
//! Enter would reach the guest as a newline and Ctrl-S/Ctrl-Q would never
//! reach it), and it has no way back to the saved mode: `set_canon_mode`
//! sets flags rather than restoring what the terminal had. `RawTerminal`
//! saves the whole termios and restores it on drop.
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::devices::serial::Serial;

/// Where console input goes; `None` between boots.
#[derive(Clone, Default)]
pub struct InputTarget(Arc<Mutex<Option<Arc<Mutex<Serial>>>>>);

impl InputTarget {
    pub fn set(&self, serial: Option<Arc<Mutex<Serial>>>) {
        if let Ok(mut t) = self.0.lock() {
            *t = serial;
        }
    }

    fn try_send(&self, bytes: &[u8]) -> usize {
        let target = self.0.lock().ok().and_then(|t| t.clone());
        match target {
            Some(s) => s.lock().map(|mut s| s.enqueue_input(bytes)).unwrap_or(0),
            None => 0,
        }
    }
}

/// Starts the thread that copies `input` to the current UART.
pub fn spawn_input_pump(target: InputTarget, mut input: impl Read + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut sent = 0;
                while sent < n {
                    let took = target.try_send(&buf[sent..n]);
                    sent += took;
                    if took == 0 {
                        // FIFO full or between boots: the guest drains
                        // 16 bytes per interrupt, so a short nap is enough.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("console input disabled: {e}");
    }
}

/// Puts a terminal on stdin into raw mode, keeping ISIG so that Ctrl-C
/// still stops the VMM; restores the old mode when dropped.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    pub fn enable() -> Self {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty and tcgetattr only read the descriptor's state into
        // a zeroed termios we own.
        let saved = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::isatty(fd) == 1 && libc::tcgetattr(fd, &mut t) == 0 {
                Some(t)
            } else {
                None
            }
        };
        if let Some(old) = saved {
            let mut raw = old;
            raw.c_iflag &= !(libc::ICRNL | libc::IXON | libc::INLCR | libc::IGNCR);
            raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            // SAFETY: fd is a terminal (checked above), raw is a valid termios.
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
        }
        RawTerminal { saved }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(old) = self.saved {
            // SAFETY: restores the termios read from the same descriptor.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &old) };
        }
    }
}
