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
use std::time::{Duration, Instant};

use dvisor_vmm::api::protocol::{Regs, Request};
use serde::Deserialize;

use crate::daemon::Monitor;
use crate::error::MonitorError;
use crate::vmi::VmiError;

/// `jmp .` : the thread spins here until the monitor takes it.
const SPIN: [u8; 2] = [0xeb, 0xfe];
/// `syscall; jmp .`
const SYSCALL_SPIN: [u8; 4] = [0x0f, 0x05, 0xeb, 0xfe];
/// How long the process may take to reach user mode again.
const CATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two looks at the vCPUs.
const POLL: Duration = Duration::from_millis(2);

/// Where a thread of the process will resume in user mode.
struct Target {
    pgd: u64,
    rip: u64,
}

fn err(m: impl Into<String>) -> MonitorError {
    MonitorError::Vmi(m.into())
}

impl Monitor {
    fn syscall_target(&self, pid: u32) -> Result<Target, MonitorError> {
        self.with_vmi(false, |v| {
            let p = v.process_by_pid(pid)?;
            if p.mm == 0 {
                return Err(VmiError::KernelThread(pid));
            }
            let pgd = v.mm_pgd(p.mm)?;
            let rip = v.saved_user_rip(p.task)?;
            if rip >> 63 != 0 || rip == 0 {
                return Err(VmiError::Corrupt(format!("pid {pid}'s saved user RIP {rip:#x} is not a user address")));
            }
            Ok(Target { pgd, rip })
        })
    }

    fn write_user(&self, pgd: u64, va: u64, data: &[u8]) -> Result<(), MonitorError> {
        self.with_vmi(false, |v| v.write_user(pgd, va, data))
    }

    fn read_user(&self, pgd: u64, va: u64, len: usize) -> Result<Vec<u8>, MonitorError> {
        let mut b = vec![0u8; len];
        self.with_vmi(false, |v| v.read_user(pgd, va, &mut b))?;
        Ok(b)
    }

    /// Runs the VM until a vCPU is in user mode at `at` in the address
    /// space `pgd` (a thread spinning there), and returns that vCPU with
    /// the VM paused.
    fn catch(&self, pgd: u64, at: u64) -> Result<u32, MonitorError> {
        #[derive(Deserialize)]
        struct Status {
            vcpus: u32,
        }
        #[derive(Deserialize)]
        struct Seg {
            selector: u16,
        }
        #[derive(Deserialize)]
        struct Sregs {
            cr3: u64,
            cs: Seg,
        }
        let vcpus = self.vmm().call::<Status>(Request::Status)?.vcpus;
        let deadline = Instant::now() + CATCH_TIMEOUT;
        let root = |cr3: u64| (cr3 & crate::paging::PHYS_ADDR_MASK) & !0x1000;
        loop {
            let _: serde_json::Value = self.vmm().call(Request::Pause)?;
            for vcpu in 0..vcpus {
                let s: Sregs = self.vmm().call(Request::GetSregs { vcpu })?;
                if s.cs.selector & 3 != 3 || root(s.cr3) != root(pgd) {
                    continue;
                }
                let r: Regs = self.vmm().call(Request::GetRegs { vcpu })?;
                if r.rip == at {
                    return Ok(vcpu);
                }
            }
            if Instant::now() > deadline {
                return Err(err(format!("no thread of the process reached {at:#x} within {CATCH_TIMEOUT:?}")));
            }
            let _: serde_json::Value = self.vmm().call(Request::Resume)?;
            std::thread::sleep(POLL);
        }
    }

    /// Runs system call `nr` with `args` in process `pid` and returns its
    /// result (rax). The process's registers and code are restored; the
    /// VM is left running.
    pub fn inject_syscall(&self, pid: u32, nr: u64, args: [u64; 6]) -> Result<u64, MonitorError> {
        let _: serde_json::Value = self.vmm().call(Request::Pause)?;
        let t = self.syscall_target(pid)?;
        let original = self.read_user(t.pgd, t.rip, SYSCALL_SPIN.len())?;
        let result = (|| {
            self.write_user(t.pgd, t.rip, &SPIN)?;
            let vcpu = self.catch(t.pgd, t.rip)?;
            let saved: Regs = self.vmm().call(Request::GetRegs { vcpu })?;
            self.write_user(t.pgd, t.rip, &SYSCALL_SPIN)?;
            let call = Regs {
                rip: t.rip,
                rax: nr,
                rdi: args[0],
                rsi: args[1],
                rdx: args[2],
                r10: args[3],
                r8: args[4],
                r9: args[5],
                ..saved
            };
            let _: serde_json::Value = self.vmm().call(Request::SetRegs { vcpu, regs: call })?;
            let _: serde_json::Value = self.vmm().call(Request::Resume)?;
            // The call returns to the spin after `syscall`, on whichever
            // vCPU the thread runs then.
            let done_on = self.catch(t.pgd, t.rip + 2)?;
            let after: Regs = self.vmm().call(Request::GetRegs { vcpu: done_on })?;
            // The thread goes on exactly where it was caught.
            let _: serde_json::Value = self.vmm().call(Request::SetRegs { vcpu: done_on, regs: saved })?;
            Ok(after.rax)
        })();
        // Whatever happened, the original code goes back (the VM is
        // paused here, or the spinning thread is harmless until resumed).
        let _: serde_json::Value = self.vmm().call(Request::Pause)?;
        let restored = self.write_user(t.pgd, t.rip, &original);
        let _: serde_json::Value = self.vmm().call(Request::Resume)?;
        restored?;
        result
    }
}
