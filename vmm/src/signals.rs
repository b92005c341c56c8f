//! Process signals: SIGINT/SIGTERM/SIGHUP become lifecycle events, and a
//! real-time signal kicks vCPU threads out of KVM_RUN.
//!
//! Handlers are installed with `vmm_sys_util::signal` (which sets no
//! SA_RESTART, so a kicked KVM_RUN returns EINTR) and threads are kicked
//! with its `Killable`; what stays here is what the handlers do, and the
//! pipe that turns a termination signal into an event.
use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use crate::error::VmmError;
use crate::lifecycle::{EventSender, VmEvent};
use vmm_sys_util::signal::register_signal_handler;

static SIGNAL_PIPE_W: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();

/// The signal used to interrupt a vCPU thread blocked in KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_terminate(sig: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let fd = SIGNAL_PIPE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; b lives for the call.
        unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, when it is a vCPU thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Makes kicks of the calling thread set `*flag` (a vCPU's
/// `kvm_run.immediate_exit`), so a kick that arrives just before KVM_RUN
/// still makes it return. Pass null before the mapping goes away.
pub fn set_immediate_exit_target(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(flag));
}

extern "C" fn on_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // A const-initialized thread-local without destructor is a plain TLS
    // load, safe in a signal handler.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the vCPU thread set this to its own live kvm_run mapping
        // and clears it before unmapping; we run on that same thread.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// Installs the handlers once per process; termination signals are
/// delivered to `events` as [`VmEvent::Signal`].
pub fn install_handlers(events: EventSender) -> Result<(), VmmError> {
    let mut result = Ok(());
    INSTALL.call_once(|| result = install_inner(events));
    result
}

fn install_inner(events: EventSender) -> Result<(), VmmError> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(VmmError::Signal(std::io::Error::last_os_error()));
    }
    SIGNAL_PIPE_W.store(fds[1], Ordering::Relaxed);
    // SAFETY: fds[0] is the read end we just created and nobody else owns.
    let mut reader = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            while reader.read_exact(&mut b).is_ok() {
                if events.send(VmEvent::Signal(i32::from(b[0]))).is_err() {
                    return;
                }
            }
        })
        .map_err(VmmError::Thread)?;
    let io = |e: vmm_sys_util::errno::Error| VmmError::Signal(std::io::Error::from_raw_os_error(e.errno()));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        register_signal_handler(sig, on_terminate).map_err(io)?;
    }
    register_signal_handler(kick_signal(), on_kick).map_err(io)
}
