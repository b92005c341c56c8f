//! A guest made of a memory image, for unit tests of the services: one
//! process whose address space is synthetic page tables in a vector, the
//! vCPUs and saved registers a test sets, and a record of what was done
//! while the VM ran. No VMM, no kernel.
use std::cell::Cell;
use std::collections::HashMap;

use dvisor_api::protocol::{Regs, RunState, Sregs, VcpuState};

use super::{GuestView, ProcessInfo};
use crate::core::VmControl;
use crate::error::MonitorError;
use crate::paging::test_tables::{Tables, TABLE_AREA_END, USER_RW};
use crate::paging::{self, PageSize, PagingMode, Translation};
use crate::vmi::{UserState, Vma};

pub const PID: u32 = 100;
const TASK: u64 = 0xffff_8880_0100_0000;

pub struct ImageGuest {
    tables: Tables,
    next_frame: u64,
    pub process: ProcessInfo,
    pub vmas: Vec<Vma>,
    pub vcpus: Vec<VcpuState>,
    /// User registers each task saved on its kernel stack.
    pub saved: HashMap<u64, UserState>,
    paused: Cell<bool>,
    pub pauses: Cell<u32>,
    /// Writes into the process made while the VM was running.
    pub writes_while_running: Cell<u32>,
}

impl ImageGuest {
    /// Process `PID`, one thread, nothing mapped yet.
    pub fn new() -> Self {
        let tables = Tables::new(PagingMode::FOUR_LEVEL, 4 << 20);
        let process = ProcessInfo { task: TASK, pgd: tables.cr3(), tasks: vec![TASK], exe: "/usr/bin/demo".into() };
        ImageGuest {
            tables,
            next_frame: TABLE_AREA_END,
            process,
            vmas: Vec::new(),
            vcpus: Vec::new(),
            saved: HashMap::new(),
            paused: Cell::new(false),
            pauses: Cell::new(0),
            writes_while_running: Cell::new(0),
        }
    }

    /// Maps `[start, start+len)` (whole pages) to fresh zeroed frames.
    pub fn map(&mut self, start: u64, len: u64, name: &str) {
        for va in (start..start + len).step_by(4096) {
            let pa = self.next_frame;
            self.next_frame += 4096;
            self.tables.map(va, pa, PageSize::Size4K, USER_RW);
        }
        let vma = Vma { start, end: start + len, perms: "rw-p".into(), offset: 0, name: name.into(), flags: 0 };
        self.vmas.push(vma);
    }

    /// Gives the process a private copy of the page at `va`, as the
    /// kernel does on a write to a shared page; returns (old, new) frame.
    pub fn copy_on_write(&mut self, va: u64) -> (u64, u64) {
        use crate::paging::{PhysRead, PhysWrite};
        let page = va & !0xfff;
        let old = paging::translate(&self.tables.mem, self.process.pgd, self.tables.mode, page).unwrap().pa;
        let mut data = vec![0u8; 4096];
        self.tables.mem.read_phys(old, &mut data).unwrap();
        let new = self.next_frame;
        self.next_frame += 4096;
        self.tables.mem.write_phys(new, &data).unwrap();
        self.tables.map(page, new, PageSize::Size4K, USER_RW);
        (old, new)
    }

    /// Writes into the image as the process itself would (not counted).
    pub fn poke(&self, va: u64, data: &[u8]) {
        paging::write_virt(&self.tables.mem, None, self.process.pgd, self.tables.mode, va, data).unwrap();
    }

    pub fn peek(&self, va: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        paging::read_virt(&self.tables.mem, None, self.process.pgd, self.tables.mode, va, &mut b).unwrap();
        b
    }

    /// A thread of the process running in user mode on a vCPU.
    pub fn on_cpu(&mut self, rip: u64, rsp: u64) {
        let mut sregs = Sregs { cr3: self.process.pgd, ..Sregs::default() };
        sregs.cs.selector = 0x33;
        let vcpu = self.vcpus.len() as u32;
        self.vcpus.push(VcpuState { vcpu, regs: Regs { rip, rsp, ..Regs::default() }, sregs });
    }

    pub fn is_paused(&self) -> bool {
        self.paused.get()
    }
}

impl VmControl for ImageGuest {
    fn pause(&self) -> Result<bool, MonitorError> {
        self.pauses.set(self.pauses.get() + 1);
        Ok(self.paused.replace(true))
    }

    fn pause_with_state(&self) -> Result<Vec<VcpuState>, MonitorError> {
        self.pause()?;
        Ok(self.vcpus.clone())
    }

    fn resume(&self) -> Result<(), MonitorError> {
        self.paused.set(false);
        Ok(())
    }

    fn set_regs(&self, _vcpu: u32, _regs: Regs) -> Result<(), MonitorError> {
        Ok(())
    }

    fn run_state(&self) -> Result<RunState, MonitorError> {
        Ok(if self.paused.get() { RunState::Paused } else { RunState::Running })
    }
}

fn vmi(e: impl std::fmt::Display) -> MonitorError {
    MonitorError::Vmi(e.to_string())
}

impl GuestView for ImageGuest {
    fn read_user(&self, pgd: u64, va: u64, buf: &mut [u8]) -> Result<(), MonitorError> {
        paging::read_virt(&self.tables.mem, None, pgd, self.tables.mode, va, buf).map_err(vmi)
    }

    fn write_user(&self, pgd: u64, va: u64, data: &[u8]) -> Result<(), MonitorError> {
        if !self.paused.get() {
            self.writes_while_running.set(self.writes_while_running.get() + 1);
        }
        paging::write_virt(&self.tables.mem, None, pgd, self.tables.mode, va, data).map_err(vmi)
    }

    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MonitorError> {
        use crate::paging::PhysRead;
        self.tables.mem.read_phys(pa, buf).map_err(vmi)
    }

    fn write_phys(&self, pa: u64, data: &[u8]) -> Result<(), MonitorError> {
        use crate::paging::PhysWrite;
        self.tables.mem.write_phys(pa, data).map_err(vmi)
    }

    fn translate(&self, pgd: u64, va: u64) -> Result<Translation, MonitorError> {
        paging::translate(&self.tables.mem, pgd, self.tables.mode, va).map_err(vmi)
    }

    fn saved_user_state(&self, task: u64) -> Result<UserState, MonitorError> {
        self.saved.get(&task).copied().ok_or_else(|| vmi(format!("task {task:#x} saved no user registers")))
    }

    fn task_running(&self, _task: u64) -> Result<bool, MonitorError> {
        Ok(true)
    }

    fn process(&self, pid: u32) -> Result<ProcessInfo, MonitorError> {
        match pid {
            PID => Ok(self.process.clone()),
            _ => Err(vmi(format!("no process with pid {pid} in the guest"))),
        }
    }

    fn memory_map(&self, pid: u32) -> Result<Vec<Vma>, MonitorError> {
        self.process(pid).map(|_| self.vmas.clone())
    }

    fn boot(&self) -> Option<u64> {
        Some(1)
    }
}
