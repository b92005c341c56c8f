//! The monitor's capabilities, one module each around the core
//! (`crate::core`): each owns its state and reaches the guest only through
//! the two narrow interfaces below, so that its logic can be tested on a
//! memory image without a live VMM.
//!
//! - `vmi`: the kernel profile and the kernel's place in each boot; the
//!   VMI sessions every other service reads the guest through.
//! - `inject`: running a system call inside a guest process.
//! - `patching`: live patches of guest processes (apply, revert, the
//!   safe-mode check, the patch-space free map, persistence).
//!
//! - `update`: ShadowReboot, the guest updated or rejuvenated through a
//!   shadow VM whose state the VMM adopts in place.
//!
//! Coming ones (kernel patching, correlation,
//! history, policies) go beside them, the same way.
#[cfg(test)]
pub(crate) mod image;
pub mod inject;
pub mod patching;
pub mod update;
pub mod vmi;

use crate::core::{Core, VmControl};
use crate::error::MonitorError;
use crate::paging::Translation;
use crate::vmi::{UserState, Vma, VmiError};

/// A guest process as the services need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its task_struct (the thread-group leader).
    pub task: u64,
    /// Physical address of its page-table root.
    pub pgd: u64,
    /// Its threads (task_struct addresses), the leader first.
    pub tasks: Vec<u64>,
    /// Its executable's path in the guest.
    pub exe: String,
}

/// What services read and write of the guest, through VMI: process
/// memory by page-table root, and where threads stopped.
pub trait GuestView {
    fn read_user(&self, pgd: u64, va: u64, buf: &mut [u8]) -> Result<(), MonitorError>;
    fn write_user(&self, pgd: u64, va: u64, data: &[u8]) -> Result<(), MonitorError>;
    /// Reads and writes guest-physical memory (a page a process no longer
    /// maps where it did: see `inject`).
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MonitorError>;
    fn write_phys(&self, pa: u64, data: &[u8]) -> Result<(), MonitorError>;
    /// How user address `va` is mapped in the address space `pgd`.
    fn translate(&self, pgd: u64, va: u64) -> Result<Translation, MonitorError>;
    /// The user registers a task saved when it last entered the kernel.
    fn saved_user_state(&self, task: u64) -> Result<UserState, MonitorError>;
    /// Whether a task is TASK_RUNNING (on a CPU or runnable).
    fn task_running(&self, task: u64) -> Result<bool, MonitorError>;
    /// A user process (not a kernel thread).
    fn process(&self, pid: u32) -> Result<ProcessInfo, MonitorError>;
    fn memory_map(&self, pid: u32) -> Result<Vec<Vma>, MonitorError>;
    /// The boot whose memory these reads and writes reach; None when no
    /// memory is mapped.
    fn boot(&self) -> Option<u64>;
}

/// Everything a service may do to a guest.
pub trait Guest: VmControl + GuestView {}

impl<T: VmControl + GuestView> Guest for T {}

/// The live guest: the core's VMM and the VMI service's sessions.
pub struct Live<'a> {
    pub core: &'a Core,
    pub vmi: &'a vmi::VmiService,
}

impl Live<'_> {
    fn session<T>(
        &self,
        f: impl FnOnce(&crate::vmi::Vmi<'_, crate::GuestMemoryMap>) -> Result<T, VmiError>,
    ) -> Result<T, MonitorError> {
        self.vmi.with_vmi(self.core, false, f)
    }
}

impl VmControl for Live<'_> {
    fn pause(&self) -> Result<bool, MonitorError> {
        self.core.pause()
    }

    fn pause_with_state(&self) -> Result<Vec<dvisor_api::protocol::VcpuState>, MonitorError> {
        self.core.pause_with_state()
    }

    fn resume(&self) -> Result<(), MonitorError> {
        self.core.resume()
    }

    fn set_regs(&self, vcpu: u32, regs: dvisor_api::protocol::Regs) -> Result<(), MonitorError> {
        self.core.set_regs(vcpu, regs)
    }

    fn run_state(&self) -> Result<dvisor_api::protocol::RunState, MonitorError> {
        self.core.run_state()
    }
}

impl GuestView for Live<'_> {
    fn read_user(&self, pgd: u64, va: u64, buf: &mut [u8]) -> Result<(), MonitorError> {
        self.session(|v| v.read_user(pgd, va, buf))
    }

    fn write_user(&self, pgd: u64, va: u64, data: &[u8]) -> Result<(), MonitorError> {
        self.session(|v| v.write_user(pgd, va, data))
    }

    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MonitorError> {
        use crate::paging::PhysRead;
        self.session(|v| Ok(v.mem.read_phys(pa, buf)?))
    }

    fn write_phys(&self, pa: u64, data: &[u8]) -> Result<(), MonitorError> {
        use crate::paging::PhysWrite;
        self.session(|v| Ok(v.mem.write_phys(pa, data)?))
    }

    fn translate(&self, pgd: u64, va: u64) -> Result<Translation, MonitorError> {
        self.session(|v| Ok(crate::paging::translate(v.mem, pgd, v.mode(), va)?))
    }

    fn saved_user_state(&self, task: u64) -> Result<UserState, MonitorError> {
        self.session(|v| v.saved_user_state(task))
    }

    fn task_running(&self, task: u64) -> Result<bool, MonitorError> {
        self.session(|v| Ok(v.task_state_raw(task)? == 0))
    }

    fn process(&self, pid: u32) -> Result<ProcessInfo, MonitorError> {
        self.session(|v| {
            let p = v.process_by_pid(pid)?;
            if p.mm == 0 {
                return Err(VmiError::KernelThread(pid));
            }
            Ok(ProcessInfo { task: p.task, pgd: v.mm_pgd(p.mm)?, tasks: v.threads_of(&p)?, exe: p.exe.clone() })
        })
    }

    fn memory_map(&self, pid: u32) -> Result<Vec<Vma>, MonitorError> {
        self.session(|v| v.memory_map(pid))
    }

    fn boot(&self) -> Option<u64> {
        self.core.boot()
    }
}
