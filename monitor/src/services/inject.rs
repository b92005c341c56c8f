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
//! The bytes go back where they were written, not only where the address
//! points when the call is done: the injected call itself may give the
//! process a private copy of that page (the patcher's pwrite to
//! /proc/self/mem does, on purpose), and the copy takes our spin with it.
//! Restoring through the address alone then fixed the copy and left
//! `syscall; jmp .` in the page cache, so every later run of the program
//! in that boot hung in it. Each planted piece is remembered with its
//! guest-physical address and put back there too, if it is still ours.
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

/// Bytes planted at the thread's RIP, each piece (one per page it lies
/// on) with the guest-physical address it went to.
#[derive(Default)]
struct Planted {
    /// (guest-physical address, offset from the RIP, the bytes written).
    pieces: Vec<(u64, usize, Vec<u8>)>,
}

impl Planted {
    /// Writes `bytes` at `t.rip` and remembers where they went.
    fn plant(&mut self, g: &impl Guest, t: &Target, bytes: &[u8]) -> Result<(), MonitorError> {
        let mut off = 0;
        while off < bytes.len() {
            let va = t.rip + off as u64;
            let in_page = ((4096 - (va & 0xfff)) as usize).min(bytes.len() - off);
            let pa = g.translate(t.pgd, va)?.pa;
            self.pieces.push((pa, off, bytes[off..off + in_page].to_vec()));
            off += in_page;
        }
        g.write_user(t.pgd, t.rip, bytes)
    }

    /// Puts `original` back at `t.rip` in the process, and at every frame
    /// a piece went to that the RIP no longer maps, if the piece is still
    /// there (a frame freed and reused since holds someone else's data).
    fn restore(&self, g: &impl Guest, t: &Target, original: &[u8]) -> Result<(), MonitorError> {
        let here = g.write_user(t.pgd, t.rip, original);
        for (pa, off, bytes) in &self.pieces {
            let now = g.translate(t.pgd, t.rip + *off as u64).map(|tr| tr.pa).ok();
            if now == Some(*pa) {
                continue;
            }
            let mut seen = vec![0u8; bytes.len()];
            if g.read_phys(*pa, &mut seen).is_ok() && &seen == bytes {
                g.write_phys(*pa, &original[*off..*off + bytes.len()])?;
            }
        }
        here
    }
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
    let mut planted = Planted::default();
    let result = (|| {
        let (vcpu, saved) = match running {
            Some(v) => v,
            None => {
                planted.plant(g, &t, &SPIN)?;
                catch(g, t.pgd, &t.tasks, t.rip, None)?
            }
        };
        // Where the call runs, and the spin it comes back to. The RIP is
        // the guest's: no value of it may overflow here (a RIP below 2
        // has no instruction before it; one at the top has none after).
        let before = t.rip.checked_sub(2);
        let (call_at, back_at) = match before {
            Some(b) if read_user(g, t.pgd, b, 2).ok().as_deref() == Some(&SYSCALL_SPIN[..2]) => {
                planted.plant(g, &t, &SPIN)?;
                (b, t.rip)
            }
            _ => {
                let after = t.rip.checked_add(2).ok_or_else(|| {
                    MonitorError::Protocol(format!("the target thread stopped at {:#x}, the top of the address space: no room for a system call", t.rip))
                })?;
                planted.plant(g, &t, &SYSCALL_SPIN)?;
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
    let restored = planted.restore(g, &t, &original);
    g.resume()?;
    restored?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::image::ImageGuest;
    use crate::services::GuestView;

    const CODE: u64 = 0x40_0000;

    fn phys(g: &ImageGuest, pa: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        g.read_phys(pa, &mut b).unwrap();
        b
    }

    /// The injected call copied the page (as the patcher's pwrite to
    /// /proc/self/mem does): the spin went along into the copy, and must
    /// leave both the copy and the shared frame it was written to.
    #[test]
    fn a_page_copied_under_the_spin_is_restored_in_both_frames() {
        let mut g = ImageGuest::new();
        g.map(CODE, 0x2000, "/usr/bin/demo");
        let rip = CODE + 0x7ac;
        g.poke(rip, &[0x8b, 0x05, 0x24, 0x79]);
        let t = Target { pgd: g.process.pgd, rip, tasks: vec![] };
        let original = g.peek(rip, 4);
        let mut planted = Planted::default();
        planted.plant(&g, &t, &SYSCALL_SPIN).unwrap();
        let (shared, private) = g.copy_on_write(rip);
        assert_eq!(phys(&g, private + 0x7ac), SYSCALL_SPIN, "the copy took the spin along");
        planted.restore(&g, &t, &original).unwrap();
        assert_eq!(g.peek(rip, 4), original);
        assert_eq!(phys(&g, shared + 0x7ac), original, "the shared frame kept the spin");
    }

    /// A frame that no longer holds what was planted (freed and reused)
    /// is left alone; a spin across a page boundary goes back in both.
    #[test]
    fn a_reused_frame_is_not_written_and_split_spins_are_restored() {
        let mut g = ImageGuest::new();
        g.map(CODE, 0x2000, "/usr/bin/demo");
        let rip = CODE + 0xffe;
        g.poke(rip, &[1, 2, 3, 4]);
        let t = Target { pgd: g.process.pgd, rip, tasks: vec![] };
        let mut planted = Planted::default();
        planted.plant(&g, &t, &SYSCALL_SPIN).unwrap();
        assert_eq!(planted.pieces.len(), 2);
        let (old, _) = g.copy_on_write(rip);
        g.write_phys(old + 0xffe, &[9, 9]).unwrap();
        planted.restore(&g, &t, &[1, 2, 3, 4]).unwrap();
        assert_eq!(g.peek(rip, 4), [1, 2, 3, 4]);
        let mut b = [0u8; 2];
        g.read_phys(old + 0xffe, &mut b).unwrap();
        assert_eq!(b, [9, 9], "a frame holding other data was written");
    }
}
