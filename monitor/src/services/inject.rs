//! Running a system call inside a guest process from outside, as a
//! debugger does with ptrace, but through the support API: catch one of
//! the process's threads at a user-mode instruction, save its registers,
//! run `syscall` there with our arguments, read the result, and put every
//! byte and register back.
//!
//! Threads are caught with a two-byte spin (`jmp .`) rather than a
//! breakpoint: the thread parks itself in user mode, and the monitor finds
//! it by pausing the VM and looking at each vCPU's CR3 and RIP. This needs
//! no guest-debug support at all, which matters in the carrier, where
//! QEMU-TCG's emulated SVM never turns a guest's int3 into a #BP intercept
//! (observed: the int3 reached the guest and SIGTRAP killed the process).
//!
//! The thread is caught where it will next run in user mode: the user RIP
//! saved in the `pt_regs` at the top of its kernel stack (it is asleep in
//! a system call, or preempted).
//!
//! Program text is shared: until the process writes to a code page, that
//! page is the file's page-cache page, run by every process of the same
//! program. A `jmp .` written there is harmless to them (one that gets
//! there spins until the original bytes are back, then goes on as it
//! would have). A `syscall` written there is not: another process would
//! run it with its own registers. So the call runs on the `syscall`
//! instruction the thread has just come back from (the two bytes before
//! its RIP), with the spin after it; only when those two bytes are not a
//! `syscall` (a thread taken while it ran user code) is one written.
//!
//! It works on a `Guest` (the VM's controls and VMI), and keeps no state.
use std::time::{Duration, Instant};

use dvisor_api::protocol::Regs;

use crate::error::MonitorError;
use crate::services::patching::safety::user_vcpus;
use crate::services::Guest;
/// `jmp .` : the thread spins here until the monitor takes it.
const SPIN: [u8; 2] = [0xeb, 0xfe];
/// `syscall; jmp .`
const SYSCALL_SPIN: [u8; 4] = [0x0f, 0x05, 0xeb, 0xfe];
/// How long the process may take to reach user mode again.
const CATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two looks, growing from the first to the second: every look
/// at the vCPUs is a pause, which kicks every vCPU out of the guest.
const POLL_FIRST: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(20);

/// Where a thread of the process will resume in user mode.
struct Target {
    pgd: u64,
    rip: u64,
    /// The process's threads (task_struct addresses).
    tasks: Vec<u64>,
}

fn err(m: impl Into<String>) -> MonitorError {
    MonitorError::Vmi(m.into())
}

fn syscall_target(g: &impl Guest, pid: u32) -> Result<Target, MonitorError> {
    let p = g.process(pid)?;
    let rip = g.saved_user_state(p.task)?.rip;
    if rip >> 63 != 0 || rip == 0 {
        return Err(MonitorError::Vmi(format!("corrupt guest structure: pid {pid}'s saved user RIP {rip:#x} is not a user address")));
    }
    Ok(Target { pgd: p.pgd, rip, tasks: p.tasks })
}

fn read_user(g: &impl Guest, pgd: u64, va: u64, len: usize) -> Result<Vec<u8>, MonitorError> {
    let mut b = vec![0u8; len];
    g.read_user(pgd, va, &mut b)?;
    Ok(b)
}

/// Resumes the VM and runs it until a vCPU is in user mode at `at` in the
/// address space `pgd` (a thread spinning there); returns that vCPU with
/// the VM paused.
///
/// Before each look at the vCPUs (a pause), guest memory alone says
/// whether one is worth it: a thread that can be spinning at `at` is
/// runnable, and its last entry into the kernel (a timer tick while it
/// spins, or the system call it returns from) saved `at` as its user RIP.
/// So the VM is paused only a few times per catch, not every poll.
///
/// With `rsp`, only the thread with that stack pointer counts: another
/// thread of the process may spin at the same place.
fn catch(g: &impl Guest, pgd: u64, tasks: &[u64], at: u64, rsp: Option<u64>) -> Result<(u32, Regs), MonitorError> {
    let deadline = Instant::now() + CATCH_TIMEOUT;
    let mut wait = POLL_FIRST;
    // The thread must run to get there (the caller may have paused).
    g.resume()?;
    loop {
        let maybe = tasks.iter().any(|&t| {
            (|| Ok::<_, MonitorError>(g.task_running(t)? && g.saved_user_state(t)?.rip == at))().unwrap_or(true)
        });
        if maybe {
            let vcpus = g.pause_with_state()?;
            if let Some(caught) =
                user_vcpus(&vcpus, pgd).into_iter().find(|(_, r)| r.rip == at && rsp.is_none_or(|sp| r.rsp == sp))
            {
                return Ok(caught);
            }
            g.resume()?;
        }
        if Instant::now() > deadline {
            return Err(err(format!("no thread of the process reached {at:#x} within {CATCH_TIMEOUT:?}")));
        }
        std::thread::sleep(wait);
        wait = (wait * 2).min(POLL_MAX);
    }
}

/// Runs system call `nr` with `args` in process `pid` and returns its
/// result (rax). The process's registers and code are restored; the VM is
/// left running.
pub fn inject_syscall(g: &impl Guest, pid: u32, nr: u64, args: [u64; 6]) -> Result<u64, MonitorError> {
    let vcpus = g.pause_with_state()?;
    let mut t = syscall_target(g, pid)?;
    // A thread on a vCPU in user mode right now is taken where it stands
    // (a thread that never enters the kernel, like a spinning one, may
    // never pass its stale saved RIP); otherwise a sleeping thread is
    // caught where it will come back to user mode.
    let running = user_vcpus(&vcpus, t.pgd).into_iter().next();
    if let Some((_, r)) = &running {
        t.rip = r.rip;
    }
    let original = read_user(g, t.pgd, t.rip, SYSCALL_SPIN.len())?;
    let result = (|| {
        let (vcpu, saved) = match running {
            Some(v) => v,
            None => {
                g.write_user(t.pgd, t.rip, &SPIN)?;
                catch(g, t.pgd, &t.tasks, t.rip, None)?
            }
        };
        // Where the call runs, and the spin it comes back to. The RIP is
        // the guest's: no value of it may overflow here (a RIP below 2
        // has no instruction before it; one at the top has none after).
        let before = t.rip.checked_sub(2);
        let (call_at, back_at) = match before {
            Some(b) if read_user(g, t.pgd, b, 2).ok().as_deref() == Some(&SYSCALL_SPIN[..2]) => {
                g.write_user(t.pgd, t.rip, &SPIN)?;
                (b, t.rip)
            }
            _ => {
                let after = t.rip.checked_add(2).ok_or_else(|| {
                    MonitorError::Protocol(format!("the target thread stopped at {:#x}, the top of the address space: no room for a system call", t.rip))
                })?;
                g.write_user(t.pgd, t.rip, &SYSCALL_SPIN)?;
                (t.rip, after)
            }
        };
        let call = Regs {
            rip: call_at,
            rax: nr,
            rdi: args[0],
            rsi: args[1],
            rdx: args[2],
            r10: args[3],
            r8: args[4],
            r9: args[5],
            ..saved
        };
        g.set_regs(vcpu, call)?;
        g.resume()?;
        // The call returns to the spin after `syscall`, on whichever vCPU
        // the thread runs then.
        let (done_on, after) = catch(g, t.pgd, &t.tasks, back_at, Some(saved.rsp))?;
        // The thread goes on exactly where it was caught.
        g.set_regs(done_on, saved)?;
        Ok(after.rax)
    })();
    // Whatever happened, the original code goes back (the VM is paused
    // here, or the spinning thread is harmless until resumed).
    g.pause()?;
    let restored = g.write_user(t.pgd, t.rip, &original);
    g.resume()?;
    restored?;
    result
}
