//! The monitor's VMI operations: the kernel profile (loaded once), the
//! kernel's place in the current boot (found once per boot), and the
//! ps / maps / mem / kmem / ksym answers built on them.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dvisor_api::protocol::{Request, Sregs, Status};
use serde::{Deserialize, Serialize};

use crate::daemon::Monitor;
use crate::error::MonitorError;
use crate::guest_memory::GuestMemoryMap;
use crate::paging;
use crate::profile::KernelProfile;
use crate::vmi::{KernelView, Vmi, VmiError, MSR_LSTAR};

/// Largest read or write through `mem` / `kmem`.
pub const MAX_ACCESS: u64 = 1 << 20;

#[derive(Default)]
pub struct VmiState {
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

impl VmiState {
    pub fn new(vmlinux: Option<PathBuf>, cache_root: PathBuf) -> Self {
        VmiState { vmlinux, cache_root, ..Default::default() }
    }
}

fn vmi_err(e: VmiError) -> MonitorError {
    MonitorError::Vmi(e.to_string())
}

impl Monitor {
    fn profile(&self) -> Result<Arc<KernelProfile>, MonitorError> {
        let mut g = self.vmi.profile.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = g.as_ref() {
            return Ok(p.clone());
        }
        let path = match &self.vmi.vmlinux {
            Some(p) => p.clone(),
            None => {
                let s: Status = self.vmm().call(Request::Status)?;
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
        let p = Arc::new(KernelProfile::load_or_build(&path, &self.vmi.cache_root).map_err(|e| MonitorError::Vmi(e.to_string()))?);
        *g = Some(p.clone());
        Ok(p)
    }

    /// Forgets the kernel's place (a reboot may move it).
    pub(crate) fn forget_kernel_view(&self) {
        *self.vmi.view.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn kernel_view(&self, mem: &GuestMemoryMap, profile: &KernelProfile) -> Result<KernelView, MonitorError> {
        let mut g = self.vmi.view.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((boot, v)) = *g {
            if boot == mem.boot {
                return Ok(v);
            }
        }
        // Read with the VM paused: a vCPU's registers are only read while
        // it is out of the guest anyway, and reading them from a running
        // VM was followed by guest crashes in the carrier (docs/carrier.md).
        #[derive(Deserialize)]
        struct Paused {
            already: bool,
        }
        let p: Paused = self.vmm().call(Request::Pause)?;
        let regs = (|| -> Result<(Sregs, u64), MonitorError> {
            Ok((self.vmm().call(Request::GetSregs { vcpu: 0 })?, self.vmm().read_msr(0, MSR_LSTAR)?))
        })();
        if !p.already {
            let _: serde_json::Value = self.vmm().call(Request::Resume)?;
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
        consistent: bool,
        f: impl FnOnce(&Vmi<'_, GuestMemoryMap>) -> Result<T, VmiError>,
    ) -> Result<T, MonitorError> {
        let profile = self.profile()?;
        #[derive(Deserialize)]
        struct Paused {
            already: bool,
        }
        let paused_here = if consistent {
            let p: Paused = self.vmm().call(Request::Pause)?;
            !p.already
        } else {
            false
        };
        let result = self.with_memory(|mem| {
            let view = self.kernel_view(mem, &profile)?;
            let vmi = Vmi::with_view(mem, &profile, view);
            if !consistent {
                return f(&vmi).map_err(vmi_err);
            }
            let mut cache = self.vmi.cache.lock().unwrap_or_else(|p| p.into_inner());
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
            let _: serde_json::Value = self.vmm().call(Request::Resume)?;
        }
        result
    }

    pub fn ksym(&self, query: &str) -> Result<SymbolAnswer, MonitorError> {
        let profile = self.profile()?;
        let slide = self.with_memory(|mem| Ok(self.kernel_view(mem, &profile)?.slide))?;
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
    pub fn kernel_address(&self, target: &str) -> Result<u64, MonitorError> {
        match parse_addr(target) {
            Some(a) => Ok(a),
            None => Ok(self.ksym(target)?.addr),
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
