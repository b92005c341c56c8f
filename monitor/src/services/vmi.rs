//! The VMI service: the kernel profile (loaded once), the kernel's place
//! in the current boot (found once per boot), the VMI sessions the other
//! services read the guest through, and the ksym answers. The process and
//! memory views themselves are `crate::vmi`, which knows nothing of the
//! VMM.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dvisor_api::protocol::{Request, Sregs, Status};
use serde::{Deserialize, Serialize};

use crate::core::{Core, VmControl};
use crate::error::MonitorError;
use crate::guest_memory::GuestMemoryMap;
use crate::paging;
use crate::profile::KernelProfile;
use crate::vmi::{KernelView, Vmi, VmiError, MSR_LSTAR};

/// Largest read or write through `mem` / `kmem`.
pub const MAX_ACCESS: u64 = 1 << 20;

#[derive(Default)]
pub struct VmiService {
    profile: Mutex<Option<Arc<KernelProfile>>>,
    /// (boot number, where the kernel is in that boot).
    view: Mutex<Option<(u64, KernelView)>>,
    /// Overrides the vmlinux found beside the VM's kernel.
    pub vmlinux: Option<PathBuf>,
    /// Where profiles of kernels in read-only directories are cached.
    cache_root: PathBuf,
    /// Translations for `--consistent` sessions, cleared before each one:
    /// entries never outlive the pause they were made in.
    cache: Mutex<paging::TranslationCache>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SymbolAnswer {
    pub name: String,
    pub addr: u64,
    pub offset: u64,
    pub kind: Option<char>,
    pub slide: u64,
}


fn vmi_err(e: VmiError) -> MonitorError {
    MonitorError::Vmi(e.to_string())
}

impl VmiService {
    pub fn new(vmlinux: Option<PathBuf>, cache_root: PathBuf) -> Self {
        VmiService { vmlinux, cache_root, ..Default::default() }
    }

    fn profile(&self, core: &Core) -> Result<Arc<KernelProfile>, MonitorError> {
        let mut g = self.profile.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = g.as_ref() {
            return Ok(p.clone());
        }
        let path = match &self.vmlinux {
            Some(p) => p.clone(),
            None => {
                let s: Status = core.vmm().call(Request::Status)?;
                let kernel = PathBuf::from(&s.kernel);
                let beside = kernel.parent().unwrap_or(Path::new(".")).join("vmlinux");
                if !beside.exists() {
                    return Err(MonitorError::Vmi(format!(
                        "no vmlinux beside the VM's kernel {}: start the monitor with --vmlinux PATH (the uncompressed kernel of that bzImage)",
                        kernel.display()
                    )));
                }
                beside
            }
        };
        let p = Arc::new(KernelProfile::load_or_build(&path, &self.cache_root).map_err(|e| MonitorError::Vmi(e.to_string()))?);
        *g = Some(p.clone());
        Ok(p)
    }

    /// Forgets the kernel's place (a reboot may move it).
    pub fn forget_kernel_view(&self) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn kernel_view(&self, core: &Core, mem: &GuestMemoryMap, profile: &KernelProfile) -> Result<KernelView, MonitorError> {
        let mut g = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((boot, v)) = *g {
            if boot == mem.boot {
                return Ok(v);
            }
        }
        // Read with the VM paused: a vCPU's registers are only read while
        // it is out of the guest anyway, and reading them from a running
        // VM was followed by guest crashes in the carrier (docs/carrier.md).
        let already = core.pause()?;
        let regs = (|| -> Result<(Sregs, u64), MonitorError> {
            Ok((core.vmm().call(Request::GetSregs { vcpu: 0 })?, core.vmm().read_msr(0, MSR_LSTAR)?))
        })();
        if !already {
            core.resume()?;
        }
        let (sregs, lstar) = regs?;
        if lstar == 0 {
            return Err(MonitorError::Vmi("MSR_LSTAR is 0: the guest kernel has not set up system calls yet (still booting?)".into()));
        }
        let vmi = Vmi::attach(mem, profile, sregs.cr3, sregs.cr4, lstar).map_err(vmi_err)?;
        *g = Some((mem.boot, vmi.view));
        Ok(vmi.view)
    }

    /// Runs `f` on a VMI session; with `consistent`, the VM is paused
    /// around it (and resumed only if this call paused it).
    pub fn with_vmi<T>(
        &self,
        core: &Core,
        consistent: bool,
        f: impl FnOnce(&Vmi<'_, GuestMemoryMap>) -> Result<T, VmiError>,
    ) -> Result<T, MonitorError> {
        let profile = self.profile(core)?;
        let paused_here = consistent && !core.pause()?;
        let result = core.with_memory(|mem| {
            let view = self.kernel_view(core, mem, &profile)?;
            let vmi = Vmi::with_view(mem, &profile, view);
            if !consistent {
                return f(&vmi).map_err(vmi_err);
            }
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.clear();
            let cell = std::cell::RefCell::new(std::mem::take(&mut *cache));
            let r = f(&vmi.with_cache(&cell)).map_err(vmi_err);
            let mut used = cell.into_inner();
            // Dropped before the VM resumes.
            used.clear();
            *cache = used;
            r
        });
        if paused_here {
            core.resume()?;
        }
        result
    }

    pub fn ksym(&self, core: &Core, query: &str) -> Result<SymbolAnswer, MonitorError> {
        let profile = self.profile(core)?;
        let slide = core.with_memory(|mem| Ok(self.kernel_view(core, mem, &profile)?.slide))?;
        if let Some(addr) = parse_addr(query) {
            let (name, offset) = profile
                .symbolize(addr.wrapping_sub(slide))
                .ok_or_else(|| MonitorError::Vmi(format!("{addr:#x} is not inside the kernel image")))?;
            let kind = profile.symbol(name).map(|s| s.kind);
            return Ok(SymbolAnswer { name: name.to_string(), addr, offset, kind, slide });
        }
        let s = profile
            .symbol(query)
            .ok_or_else(|| MonitorError::Vmi(format!("no kernel symbol {query:?}")))?;
        Ok(SymbolAnswer { name: s.name.clone(), addr: s.addr.wrapping_add(slide), offset: 0, kind: Some(s.kind), slide })
    }

    /// Resolves a kmem target: a symbol name or an address.
    pub fn kernel_address(&self, core: &Core, target: &str) -> Result<u64, MonitorError> {
        match parse_addr(target) {
            Some(a) => Ok(a),
            None => Ok(self.ksym(core, target)?.addr),
        }
    }
}

/// "0x1234", "ffffffff81000000" (16 hex digits) or a decimal number.
pub fn parse_addr(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    if s.len() == 16 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        return u64::from_str_radix(s, 16).ok();
    }
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return s.parse().ok();
    }
    None
}
