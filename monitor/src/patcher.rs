//! Applying and reverting live patches of a guest process from outside.
//!
//! Apply: space comes from an mmap injected into the process (near the
//! program, so 5-byte jumps reach it); the linked patch is written while
//! the guest runs (nothing jumps there yet); then, in one pause, the
//! monitor checks that no thread is inside a replaced function, writes
//! every jump, variable and pointer, and resumes. Revert writes the saved
//! bytes back in one pause and unmaps the space.
//!
//! Space comes from a per-process free map (`space.rs`): a reverted
//! patch's bytes are reused by the next one, and only an area that
//! becomes entirely free is unmapped. The applied patches and the maps are
//! saved beside the control socket, so a restarted monitor knows them.
//!
//! Not yet here: reuse of replaced function bodies, and the return-address
//! scan of user stacks.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dvisor_vmm::api::protocol::{Regs, Request};
use serde::{Deserialize, Serialize};

use crate::daemon::Monitor;
use crate::error::MonitorError;
use crate::patch::{self, CommandFile, PatchObject, ResolvedAction};
use crate::space::{Range, SpaceMap};
use crate::vmi::VmiError;

const PAGE: u64 = 4096;
/// Where the first patch area is asked for: low, so that rel32 jumps and
/// calls reach a non-PIE program at 0x400000.
const SPACE_HINT: u64 = 0x1000_0000;
const PROT_RWX: u64 = 7;
/// MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE: the pages must exist
/// before the monitor writes into them from outside (an untouched
/// anonymous page has no frame to write to).
const MAP_PRIVATE_ANONYMOUS_POPULATE: u64 = 0x8022;
const SYS_MMAP: u64 = 9;
const SYS_MUNMAP: u64 = 11;
/// Safe-mode retries when a thread is inside a site, and the wait between.
const RETRIES: u32 = 20;
const BACKOFF: Duration = Duration::from_millis(20);

/// One written site: what was there before.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Site {
    pub target: String,
    pub addr: u64,
    pub original: String,
    pub new: String,
}

/// Microseconds of each step, as the memory-efficient update paper
/// breaks an apply down.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timing {
    pub attach_us: u64,
    pub alloc_us: u64,
    pub write_patch_us: u64,
    pub write_jump_us: u64,
    pub free_us: u64,
    pub detach_us: u64,
    /// From the pause to the resume: what the guest felt.
    pub pause_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedPatch {
    pub id: u32,
    pub pid: u32,
    pub object: String,
    pub space: u64,
    pub space_len: u64,
    pub sites: Vec<Site>,
    pub timing: Timing,
    pub attempts: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    format: u32,
    /// Patches live in one boot's processes; another boot starts empty.
    boot: u64,
    next_id: u32,
    applied: Vec<AppliedPatch>,
    spaces: HashMap<u32, SpaceMap>,
}

const STATE_FORMAT: u32 = 1;

#[derive(Default)]
pub struct PatchState {
    state: Mutex<Saved>,
    file: Mutex<Option<std::path::PathBuf>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn err(m: impl Into<String>) -> MonitorError {
    MonitorError::Vmi(m.into())
}

fn patch_err(e: patch::PatchError) -> MonitorError {
    MonitorError::Vmi(e.to_string())
}

impl Monitor {
    fn read_process(&self, pid: u32, va: u64, len: usize) -> Result<Vec<u8>, MonitorError> {
        let mut b = vec![0u8; len];
        self.with_vmi(false, |v| {
            let p = v.process_by_pid(pid)?;
            let pgd = v.mm_pgd(p.mm)?;
            v.read_user(pgd, va, &mut b)
        })?;
        Ok(b)
    }

    /// The page-table root and the threads of `pid`.
    fn process_handles(&self, pid: u32) -> Result<(u64, Vec<u64>), MonitorError> {
        self.with_vmi(false, |v| {
            let p = v.process_by_pid(pid)?;
            if p.mm == 0 {
                return Err(VmiError::KernelThread(pid));
            }
            Ok((v.mm_pgd(p.mm)?, v.threads_of(&p)?))
        })
    }

    /// Writes all `(addr, bytes)` or, if any page is not mapped, none.
    fn write_process(&self, pid: u32, writes: &[(u64, Vec<u8>)]) -> Result<(), MonitorError> {
        let (pgd, _) = self.process_handles(pid)?;
        self.write_pgd(pgd, writes)
    }

    /// The patch space must be mapped writable page by page: a read-only
    /// entry there would be a shared page (the zero page, a COW copy), and
    /// writing it through physical memory would change it for everyone.
    fn check_private_writable(&self, pid: u32, start: u64, len: u64) -> Result<(), MonitorError> {
        let (pgd, _) = self.process_handles(pid)?;
        let mut page = start & !(PAGE - 1);
        while page < start + len {
            let t = self.with_vmi(false, |v| Ok(crate::paging::translate(v.mem, pgd, v.mode(), page)?))?;
            if !t.writable {
                return Err(err(format!(
                    "patch space page {page:#x} of pid {pid} is mapped read-only (shared page at {:#x}); refusing to write it",
                    t.pa
                )));
            }
            page += PAGE;
        }
        Ok(())
    }

    fn write_pgd(&self, pgd: u64, writes: &[(u64, Vec<u8>)]) -> Result<(), MonitorError> {
        self.with_vmi(false, |v| {
            for (addr, data) in writes {
                let mut probe = vec![0u8; data.len()];
                v.read_user(pgd, *addr, &mut probe)?;
            }
            for (addr, data) in writes {
                v.write_user(pgd, *addr, data)?;
            }
            Ok(())
        })
    }

    /// User RIPs of every thread of `pid`: on a vCPU now (its registers),
    /// or asleep (the user RIP saved on its kernel stack). VM paused.
    fn thread_rips(&self, pgd: u64, tasks: &[u64]) -> Result<Vec<u64>, MonitorError> {
        let mut rips = Vec::new();
        #[derive(Deserialize)]
        struct St {
            vcpus: u32,
        }
        #[derive(Deserialize)]
        struct Seg {
            selector: u16,
        }
        #[derive(Deserialize)]
        struct Sr {
            cr3: u64,
            cs: Seg,
        }
        let vcpus = self.vmm().call::<St>(Request::Status)?.vcpus;
        let root = |c: u64| (c & crate::paging::PHYS_ADDR_MASK) & !0x1000;
        for vcpu in 0..vcpus {
            let s: Sr = self.vmm().call(Request::GetSregs { vcpu })?;
            if root(s.cr3) == root(pgd) && s.cs.selector & 3 == 3 {
                let r: Regs = self.vmm().call(Request::GetRegs { vcpu })?;
                rips.push(r.rip);
            }
        }
        for &t in tasks {
            if let Ok(rip) = self.with_vmi(false, |v| v.saved_user_rip(t)) {
                rips.push(rip);
            }
        }
        Ok(rips)
    }

    /// Applies a patch to process `pid`. `unsafe_mode` skips the check
    /// that no thread is inside a replaced function.
    pub fn apply_patch(
        &self,
        pid: u32,
        object_path: &Path,
        commands_path: &Path,
        binary: &Path,
        unsafe_mode: bool,
    ) -> Result<AppliedPatch, MonitorError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| MonitorError::Io(format!("reading {}", p.display()), e));
        let obj_name = object_path.display().to_string();
        let obj = PatchObject::parse(&obj_name, &read(object_path)?).map_err(patch_err)?;
        let cmd_text = String::from_utf8_lossy(&read(commands_path)?).into_owned();
        let cmds = CommandFile::parse(&commands_path.display().to_string(), &cmd_text).map_err(patch_err)?;
        let program = patch::target_symbols(&read(binary)?, 0).map_err(patch_err)?;
        patch::check(&obj, &cmds, &program).map_err(patch_err)?;
        // Everything is validated before the guest is touched.
        let len = (patch::required_size(&obj) as u64).max(1);
        let align = obj.required_alignment().max(16);

        let t = Instant::now();
        let space = self.allocate_space(pid, len, align)?;
        let alloc = t.elapsed();
        let result = self.apply_in(pid, &obj, &cmds, &program, space, len, unsafe_mode, alloc, &obj_name);
        if result.is_err() {
            let _ = self.release_space(pid, Range { start: space, len });
        }
        result
    }

    /// Takes `len` bytes from the process's free map, mapping a new area
    /// (injected mmap) only when no free range fits.
    fn allocate_space(&self, pid: u32, len: u64, align: u64) -> Result<u64, MonitorError> {
        if let Some(at) = self.with_space(pid, |m| m.allocate(len, align)) {
            return Ok(at);
        }
        let area_len = len.div_ceil(PAGE) * PAGE;
        let hint = self.with_space(pid, |m| m.areas.iter().map(Range::end).max()).unwrap_or(SPACE_HINT);
        let area = self.inject_syscall(pid, SYS_MMAP, [hint, area_len, PROT_RWX, MAP_PRIVATE_ANONYMOUS_POPULATE, u64::MAX, 0])?;
        if (area as i64) < 0 {
            return Err(err(format!("mmap in pid {pid} failed with errno {}", -(area as i64))));
        }
        self.with_space(pid, |m| {
            m.add_area(Range { start: area, len: area_len });
            m.allocate(len, align)
        })
        .ok_or_else(|| err("a fresh patch area is too small (alignment)"))
    }

    /// Returns bytes to the free map and unmaps areas left empty.
    fn release_space(&self, pid: u32, r: Range) -> Result<(), MonitorError> {
        for area in self.with_space(pid, |m| m.release(r)) {
            let rc = self.inject_syscall(pid, SYS_MUNMAP, [area.start, area.len, 0, 0, 0, 0])?;
            if rc != 0 {
                return Err(err(format!("munmap of patch area {:#x} failed with errno {}", area.start, -(rc as i64))));
            }
        }
        self.save_patches();
        Ok(())
    }

    fn with_space<T>(&self, pid: u32, f: impl FnOnce(&mut SpaceMap) -> T) -> T {
        let mut s = self.patches.state.lock().unwrap_or_else(|p| p.into_inner());
        f(s.spaces.entry(pid).or_default())
    }

    /// The patch space mapped into `pid` (bytes).
    pub fn patch_space_mapped(&self, pid: u32) -> u64 {
        self.with_space(pid, |m| m.mapped())
    }

    /// Where the patch state is kept; loads it if it belongs to `boot`.
    pub(crate) fn load_patches(&self, file: std::path::PathBuf, boot: u64) {
        if let Ok(text) = std::fs::read_to_string(&file) {
            match serde_json::from_str::<Saved>(&text) {
                Ok(s) if s.format == STATE_FORMAT && s.boot == boot => {
                    tracing::info!("{} applied patches restored from {}", s.applied.len(), file.display());
                    *self.patches.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
                }
                Ok(_) => tracing::info!("{} is from another boot; starting with no patches", file.display()),
                Err(e) => tracing::warn!("ignoring unreadable {}: {e}", file.display()),
            }
        }
        self.patches.state.lock().unwrap_or_else(|p| p.into_inner()).boot = boot;
        *self.patches.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    }

    /// A new boot: the old processes and their patches are gone.
    pub(crate) fn reset_patches(&self, boot: u64) {
        *self.patches.state.lock().unwrap_or_else(|p| p.into_inner()) = Saved { boot, ..Saved::default() };
        self.save_patches();
    }

    fn save_patches(&self) {
        let Some(file) = self.patches.file.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        let mut s = self.patches.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.format = STATE_FORMAT;
        let tmp = file.with_extension("json.tmp");
        let ok = serde_json::to_vec_pretty(&s)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, &file));
        if let Err(e) = ok {
            tracing::warn!("saving the patch state to {}: {e}", file.display());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_in(
        &self,
        pid: u32,
        obj: &PatchObject,
        cmds: &CommandFile,
        program: &HashMap<String, patch::TargetSymbol>,
        space: u64,
        len: u64,
        unsafe_mode: bool,
        alloc: Duration,
        obj_name: &str,
    ) -> Result<AppliedPatch, MonitorError> {
        let (linked, resolved) = patch::link(obj, cmds, program, space).map_err(patch_err)?;
        if linked.bytes.len() as u64 > len {
            return Err(err("linked patch is larger than its space"));
        }
        let t = Instant::now();
        if !linked.bytes.is_empty() {
            self.check_private_writable(pid, space, linked.bytes.len() as u64)?;
            self.write_process(pid, &[(space, linked.bytes.clone())])?;
        }
        let write_patch = t.elapsed();

        let mut writes = Vec::new();
        let mut ranges = Vec::new();
        for r in &resolved {
            let (addr, bytes) = match &r.action {
                ResolvedAction::Jump { target_addr, target_size, jump, .. } => {
                    ranges.push((*target_addr, *target_addr + *target_size));
                    (*target_addr, jump.clone())
                }
                ResolvedAction::Variable { addr, bytes, .. } => (*addr, bytes.clone()),
                ResolvedAction::Pointer { addr, value } => (*addr, value.to_le_bytes().to_vec()),
            };
            writes.push((r.target.clone(), addr, bytes));
        }
        let mut sites = Vec::new();
        for (target, addr, bytes) in &writes {
            let original = self.read_process(pid, *addr, bytes.len())?;
            sites.push(Site { target: target.clone(), addr: *addr, original: hex(&original), new: hex(bytes) });
        }

        // Found before the pause, so that the pause holds only the check
        // and the writes.
        let (pgd, tasks) = self.process_handles(pid)?;
        let all: Vec<(u64, Vec<u8>)> = writes.iter().map(|(_, a, b)| (*a, b.clone())).collect();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let pause_start = Instant::now();
            let _: serde_json::Value = self.vmm().call(Request::Pause)?;
            let attach = pause_start.elapsed();
            let busy = if unsafe_mode {
                None
            } else {
                self.thread_rips(pgd, &tasks)?.into_iter().find(|rip| ranges.iter().any(|(s, e)| rip >= s && rip < e))
            };
            if busy.is_none() {
                let t = Instant::now();
                let written = self.write_pgd(pgd, &all);
                let write_jump = t.elapsed();
                let t = Instant::now();
                let _: serde_json::Value = self.vmm().call(Request::Resume)?;
                let detach = t.elapsed();
                written?;
                let timing = Timing {
                    attach_us: us(attach),
                    alloc_us: us(alloc),
                    write_patch_us: us(write_patch),
                    write_jump_us: us(write_jump),
                    free_us: 0,
                    detach_us: us(detach),
                    pause_us: us(pause_start.elapsed()),
                };
                let id = {
                    let mut st = self.patches.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.next_id += 1;
                    st.next_id
                };
                let applied = AppliedPatch {
                    id,
                    pid,
                    object: obj_name.to_string(),
                    space,
                    space_len: len,
                    sites,
                    timing,
                    attempts,
                };
                self.patches.state.lock().unwrap_or_else(|p| p.into_inner()).applied.push(applied.clone());
                self.save_patches();
                return Ok(applied);
            }
            let _: serde_json::Value = self.vmm().call(Request::Resume)?;
            if attempts >= RETRIES {
                return Err(err(format!(
                    "a thread of pid {pid} kept executing inside a function being replaced (at {:#x}) over {RETRIES} tries; retry later or use --unsafe",
                    busy.unwrap_or(0)
                )));
            }
            std::thread::sleep(BACKOFF);
        }
    }

    pub fn patches(&self) -> Vec<AppliedPatch> {
        self.patches.state.lock().unwrap_or_else(|p| p.into_inner()).applied.clone()
    }

    /// Restores every site of patch `id` in one pause and frees its space.
    pub fn revert_patch(&self, id: u32) -> Result<AppliedPatch, MonitorError> {
        let p = self
            .patches()
            .into_iter()
            .find(|p| p.id == id)
            .ok_or_else(|| err(format!("no applied patch {id}: see `dvisor patch list`")))?;
        let writes: Vec<(u64, Vec<u8>)> = p.sites.iter().map(|s| (s.addr, unhex(&s.original))).collect();
        let _: serde_json::Value = self.vmm().call(Request::Pause)?;
        let written = self.write_process(p.pid, &writes);
        let _: serde_json::Value = self.vmm().call(Request::Resume)?;
        written?;
        self.patches.state.lock().unwrap_or_else(|p| p.into_inner()).applied.retain(|a| a.id != id);
        self.release_space(p.pid, Range { start: p.space, len: p.space_len })?;
        Ok(p)
    }
}

impl<M: crate::paging::PhysRead> crate::vmi::Vmi<'_, M> {
    /// Every thread (task) of a process: its thread group.
    pub fn threads_of(&self, p: &crate::vmi::Process) -> Result<Vec<u64>, VmiError> {
        let t = &self.profile.layouts.task_struct;
        let Some(group) = t.thread_group.as_ref() else { return Ok(vec![p.task]) };
        let mut out = vec![p.task];
        let mut next = self.read_u64(p.task + group.offset)?;
        while next.wrapping_sub(group.offset) != p.task {
            if out.len() > crate::vmi::MAX_TASKS {
                return Err(VmiError::Corrupt("thread group list loops".into()));
            }
            out.push(next.wrapping_sub(group.offset));
            next = self.read_u64(next)?;
        }
        Ok(out)
    }

    /// The user RIP saved at the top of a task's kernel stack.
    pub fn saved_user_rip(&self, task: u64) -> Result<u64, VmiError> {
        let l = &self.profile.layouts;
        let ip = l.fields.get("pt_regs.ip").ok_or_else(|| VmiError::Profile("pt_regs.ip".into()))?;
        let size = l.sizes.get("pt_regs").copied().ok_or_else(|| VmiError::Profile("sizeof(pt_regs)".into()))?;
        let stack = self.read_field(task, &l.task_struct.stack)?;
        self.read_field(stack + 16 * 1024 - size, ip)
    }
}
