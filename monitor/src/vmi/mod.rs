//! Virtual machine introspection: the guest kernel and its processes as
//! seen from outside, through guest physical memory, the kernel profile
//! (symbols + BTF layouts) and the vCPU registers.
//!
//! Everything read from the guest is untrusted: every walk is bounded and
//! every pointer checked, so a corrupted guest yields an error, not a hang.
mod kaslr;
mod maps;
mod tasks;

use serde::{Deserialize, Serialize};

use crate::paging::{self, PagingError, PagingMode, PhysRead, PhysWrite};
use crate::profile::{Field, KernelProfile};

pub use kaslr::{slide_from_lstar, MSR_LSTAR};
pub use maps::Vma;
pub use tasks::{Process, TaskState, UserState};

/// Most tasks a walk visits before it calls the list corrupt.
pub const MAX_TASKS: usize = 65_536;
/// Most bytes of a command line or path component read.
const MAX_STRING: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VmiError {
    #[error(transparent)]
    Paging(#[from] PagingError),
    #[error("the kernel profile lacks {0}: this kernel is not supported yet")]
    Profile(String),
    #[error("KASLR slide check failed: {0}")]
    Slide(String),
    #[error("corrupt guest structure: {0}")]
    Corrupt(String),
    #[error("no process with pid {0} in the guest")]
    NoSuchPid(u32),
    #[error("pid {0} is a kernel thread: it has no user memory")]
    KernelThread(u32),
}

/// Where the kernel is in this boot, found once per boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelView {
    /// Runtime address minus the profile's address.
    pub slide: u64,
    /// Physical address of a page-table root that maps the kernel.
    pub kernel_pgd: u64,
    pub la57: bool,
}

/// One introspection session over guest memory `M`.
pub struct Vmi<'a, M: PhysRead> {
    pub mem: &'a M,
    pub profile: &'a KernelProfile,
    pub view: KernelView,
    /// Translations remembered for this session. Only valid while the VM
    /// stays paused: the guest rewrites its page tables as it runs.
    cache: Option<&'a std::cell::RefCell<paging::TranslationCache>>,
}

impl<'a, M: PhysRead> Vmi<'a, M> {
    /// Finds the kernel from a vCPU's CR3, CR4 and MSR_LSTAR and checks
    /// the result against init_task.
    pub fn attach(mem: &'a M, profile: &'a KernelProfile, cr3: u64, cr4: u64, lstar: u64) -> Result<Self, VmiError> {
        let slide = slide_from_lstar(profile, lstar)?;
        let mode = PagingMode::from_cr4(cr4);
        let init_task = symbol(profile, "init_task")?.wrapping_add(slide);
        // With page-table isolation a vCPU in user mode runs on the user
        // half of the PGD pair, which does not map kernel data; the kernel
        // half is the 4 KiB page below it.
        let candidates = [cr3 & paging::PHYS_ADDR_MASK, paging::kernel_pgd_from_cr3(cr3)];
        let mut last = None;
        for pgd in candidates {
            let view = KernelView { slide, kernel_pgd: pgd, la57: mode.la57 };
            let vmi = Vmi { mem, profile, view, cache: None };
            match paging::translate(mem, pgd, mode, init_task) {
                Ok(_) => {
                    vmi.check_init_task()?;
                    return Ok(vmi.on_kernel_pgd());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(VmiError::Slide(format!(
            "init_task at {init_task:#x} is not mapped by CR3 {cr3:#x}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// Moves the view from the CR3 it was found through to the kernel's own
    /// top-level table, `init_top_pgt` (swapper_pg_dir). The CR3 a vCPU
    /// had at attach belongs to whatever process ran there; that process
    /// may exit and its table page be reused, while the view is kept for
    /// the whole boot. Every process's kernel half is a copy of this one.
    fn on_kernel_pgd(self) -> Self {
        let Ok(va) = self.symbol("init_top_pgt") else { return self };
        let Ok(t) = paging::translate(self.mem, self.view.kernel_pgd, self.mode(), va) else { return self };
        let view = KernelView { kernel_pgd: t.pa, ..self.view };
        let moved = Vmi { view, ..self };
        // It must map what the old root mapped; otherwise keep the old root.
        match moved.check_init_task() {
            Ok(()) => moved,
            Err(_) => Vmi { view: KernelView { kernel_pgd: self.view.kernel_pgd, ..view }, ..moved },
        }
    }

    /// Re-attaches with a known view (no register reads).
    pub fn with_view(mem: &'a M, profile: &'a KernelProfile, view: KernelView) -> Self {
        Vmi { mem, profile, view, cache: None }
    }

    /// Uses `cache` for translations. The caller must keep the VM paused
    /// for as long as this session lives and clear the cache on resume.
    pub fn with_cache(mut self, cache: &'a std::cell::RefCell<paging::TranslationCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    fn translate_into(&self, pgd: u64, va: u64, buf: &mut [u8]) -> Result<(), VmiError> {
        match self.cache {
            Some(c) => paging::read_virt(self.mem, Some(&mut c.borrow_mut()), pgd, self.mode(), va, buf)?,
            None => paging::read_virt(self.mem, None, pgd, self.mode(), va, buf)?,
        }
        Ok(())
    }

    pub fn mode(&self) -> PagingMode {
        PagingMode { la57: self.view.la57 }
    }

    /// A canonical upper-half address under this boot's paging mode
    /// (with 5-level paging the direct map starts at 0xff00...).
    pub fn is_kernel_va(&self, va: u64) -> bool {
        va >> 63 == 1 && self.mode().is_canonical(va)
    }

    /// The runtime address of a kernel symbol.
    pub fn symbol(&self, name: &str) -> Result<u64, VmiError> {
        Ok(symbol(self.profile, name)?.wrapping_add(self.view.slide))
    }

    /// `addr` as symbol+offset, in runtime addresses.
    pub fn symbolize(&self, addr: u64) -> Option<(String, u64)> {
        self.profile.symbolize(addr.wrapping_sub(self.view.slide)).map(|(n, o)| (n.to_string(), o))
    }

    pub fn read_kernel(&self, va: u64, buf: &mut [u8]) -> Result<(), VmiError> {
        self.translate_into(self.view.kernel_pgd, va, buf)
    }

    pub fn read_u64(&self, va: u64) -> Result<u64, VmiError> {
        let mut b = [0u8; 8];
        self.read_kernel(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads an integer field of 1, 2, 4 or 8 bytes.
    pub fn read_field(&self, base: u64, f: &Field) -> Result<u64, VmiError> {
        let mut b = [0u8; 8];
        let n = (f.size as usize).clamp(1, 8);
        self.read_kernel(base.wrapping_add(f.offset), &mut b[..n])?;
        Ok(u64::from_le_bytes(b))
    }

    /// A NUL-terminated string of at most `max` bytes.
    pub fn read_cstr(&self, va: u64, max: usize) -> Result<String, VmiError> {
        let max = max.min(MAX_STRING);
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        while out.len() < max {
            // Never cross a page in one read, so a string that ends just
            // before an unmapped page still reads.
            let at = va.wrapping_add(out.len() as u64);
            let n = buf.len().min(max - out.len()).min(4096 - (at % 4096) as usize);
            self.read_kernel(at, &mut buf[..n])?;
            if let Some(end) = buf[..n].iter().position(|&c| c == 0) {
                out.extend_from_slice(&buf[..end]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Physical address of the page-table root of `mm` (its `pgd` is a
    /// kernel virtual address).
    pub fn mm_pgd(&self, mm: u64) -> Result<u64, VmiError> {
        let pgd_va = self.read_field(mm, &self.profile.layouts.mm_struct.pgd)?;
        let t = paging::translate(self.mem, self.view.kernel_pgd, self.mode(), pgd_va)?;
        Ok(t.pa)
    }

    pub fn read_user(&self, pgd: u64, va: u64, buf: &mut [u8]) -> Result<(), VmiError> {
        self.translate_into(pgd, va, buf)
    }

    fn check_init_task(&self) -> Result<(), VmiError> {
        let t = &self.profile.layouts.task_struct;
        let init = self.symbol("init_task")?;
        let pid = self.read_field(init, &t.pid)?;
        let comm = self.read_cstr(init + t.comm.offset, t.comm.size as usize)?;
        let mm = self.read_field(init, &t.mm)?;
        if pid != 0 || !comm.starts_with("swapper") || mm != 0 {
            return Err(VmiError::Slide(format!(
                "init_task at {init:#x} reads pid {pid}, comm {comm:?}, mm {mm:#x}; expected pid 0 \"swapper/0\" with no mm (wrong slide or profile for this kernel?)"
            )));
        }
        Ok(())
    }
}

impl<M: PhysWrite> Vmi<'_, M> {
    pub fn write_kernel(&self, va: u64, data: &[u8]) -> Result<(), VmiError> {
        paging::write_virt(self.mem, None, self.view.kernel_pgd, self.mode(), va, data)?;
        Ok(())
    }

    pub fn write_user(&self, pgd: u64, va: u64, data: &[u8]) -> Result<(), VmiError> {
        paging::write_virt(self.mem, None, pgd, self.mode(), va, data)?;
        Ok(())
    }
}

fn symbol(profile: &KernelProfile, name: &str) -> Result<u64, VmiError> {
    profile.addr_of(name).ok_or_else(|| VmiError::Profile(format!("symbol {name}")))
}
