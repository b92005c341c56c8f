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
//! patch's bytes are reused by the next one, the bodies of functions a
//! patch redirected hold later code-only patches, and only an area that
//! becomes entirely free is unmapped. The applied patches and the maps are
//! saved beside the control socket, so a restarted monitor knows them.
//!
//! As livepatch splits its core, patches and transition, the parts are
//! separate modules: this one holds the service (state, apply, revert,
//! persistence), `safety` the safe-mode check and guarded write, `space`
//! the patch-space free map. All of it works on a `Guest`, not on the
//! monitor, so it runs on a memory image in unit tests.
pub mod safety;
pub mod space;
mod state;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dvisor_api::protocol::RunState;
use serde::{Deserialize, Serialize};

use crate::error::MonitorError;
use crate::patch::{self, Action, CommandFile, PatchObject, RegisterAssumptions, ResolvedAction, TargetSymbol};
use crate::services::inject::inject_syscall;
use crate::services::{Guest, ProcessInfo};
use safety::{BACKOFF, RETRIES};
use space::{Range, SpaceMap};

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
const SYS_OPEN: u64 = 2;
const SYS_CLOSE: u64 = 3;
const SYS_PWRITE64: u64 = 18;
const O_RDWR: u64 = 2;
/// How far below a program high in memory (a PIE) its patch space is
/// asked for.
const SPACE_BELOW_PROGRAM: u64 = 64 << 20;

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
    /// The safe-mode check, between attach and write jump (the paper's
    /// breakdown has no step of its own for it).
    #[serde(default)]
    pub check_us: u64,
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
    /// Bodies of the functions this patch redirected, given to the free
    /// map for later patches' code, with their bytes to put back on revert.
    #[serde(default)]
    pub bodies: Vec<Site>,
    /// What the user should know about this apply (said once, not kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The smallest replaced body worth giving to the free map.
const MIN_BODY: u64 = 16;

struct ProgramPlacement {
    load_base: u64,
    hint: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    format: u32,
    /// Patches live in one boot's processes; another boot starts empty.
    boot: u64,
    next_id: u32,
    applied: Vec<AppliedPatch>,
    spaces: HashMap<u32, SpaceMap>,
    /// Pages of each process already given their own copy (see
    /// `make_sites_private`), with the frame of that copy.
    #[serde(default)]
    private_pages: HashMap<u32, std::collections::BTreeMap<u64, u64>>,
}

const STATE_FORMAT: u32 = 1;

/// The patches applied in the current boot, and where they live.
#[derive(Default)]
pub struct PatchService {
    state: Mutex<Saved>,
    file: Mutex<Option<std::path::PathBuf>>,
}

/// A warning for each redirected function whose callers gcc may have let
/// keep values in registers the original body leaves alone (IPA-RA; see
/// `patch::compiled`).
fn register_warnings(bin: &[u8], cmds: &CommandFile, program: &HashMap<String, TargetSymbol>, load_base: u64, binary: &Path) -> Vec<String> {
    let targets: Vec<(&str, u64)> = cmds
        .commands
        .iter()
        .filter(|c| matches!(c.action, Action::Jump { .. }))
        .filter_map(|c| Some((c.target.as_str(), program.get(&c.target)?.addr - load_base)))
        .collect();
    let vaddrs: Vec<u64> = targets.iter().map(|(_, va)| *va).collect();
    targets
        .iter()
        .zip(patch::register_assumptions(bin, &vaddrs))
        .filter_map(|((target, _), found)| match found {
            RegisterAssumptions::Possible { producer } => Some(format!(
                "{target} was compiled with gcc's interprocedural register allocation ({producer:?} in {}'s DWARF): its callers may keep values in registers the original leaves alone, so the patch must not change more registers than it did. Rebuild the program with -flive-patching=inline-clone (or -fno-ipa-ra) to patch it freely (docs/patching.md)",
                binary.display()
            )),
            _ => None,
        })
        .collect()
}

/// Whether `bytes` is a patch state file this monitor would load (for the
/// fuzz target and for checks from outside; `state::decode` is the rule).
pub fn check_state_file(bytes: &[u8]) -> Result<(), String> {
    state::decode(bytes).map(|_| ())
}

fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

/// Bytes this monitor recorded itself. The state file is validated when
/// loaded (`state::decode`), so bad hex here is a bug; it is an error all
/// the same, never bytes made up for guest code.
fn unhex(s: &str) -> Result<Vec<u8>, MonitorError> {
    hex::decode(s).map_err(|e| err(format!("recorded bytes {s:?} are not hex ({e})")))
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn err(m: impl Into<String>) -> MonitorError {
    MonitorError::Patch(m.into())
}

fn patch_err(e: patch::PatchError) -> MonitorError {
    MonitorError::PatchInput(e.to_string())
}

fn read_process(g: &impl Guest, pid: u32, va: u64, len: usize) -> Result<Vec<u8>, MonitorError> {
    let mut b = vec![0u8; len];
    g.read_user(g.process(pid)?.pgd, va, &mut b)?;
    Ok(b)
}

/// A `Busy` with the replaced function's name.
fn describe_busy(b: &safety::Busy, resolved: &[patch::ResolvedCommand]) -> String {
    use safety::Busy;
    let func = match b {
        Busy::Executing { func, .. } | Busy::ReturnAddress { func, .. } => *func,
    };
    let name = resolved
        .iter()
        .find(|r| matches!(r.action, ResolvedAction::Jump { target_addr, .. } if target_addr == func))
        .map(|r| r.target.as_str())
        .unwrap_or("?");
    match b {
        Busy::Executing { rip, .. } => format!("a thread is executing inside {name} (at {rip:#x})"),
        Busy::ReturnAddress { at, value, .. } => {
            format!("a thread will return into {name} (return address {value:#x} on its stack at {at:#x})")
        }
    }
}

impl PatchService {
    /// Writes all `(addr, bytes)` or, if any page is not mapped, none.
    fn write_process(&self, g: &impl Guest, pid: u32, writes: &[(u64, Vec<u8>)]) -> Result<(), MonitorError> {
        safety::write_all(g, g.process(pid)?.pgd, writes)
    }

    /// The patch space must be mapped writable page by page: a read-only
    /// entry there would be a shared page (the zero page, a COW copy), and
    /// writing it through physical memory would change it for everyone.
    fn check_private_writable(&self, g: &impl Guest, pid: u32, start: u64, len: u64) -> Result<(), MonitorError> {
        let pages: Vec<u64> = ((start & !(PAGE - 1))..start + len).step_by(PAGE as usize).collect();
        for (page, t) in pages.iter().zip(self.translate_pages(g, pid, &pages)?) {
            if !t.writable {
                return Err(err(format!(
                    "patch space page {page:#x} of pid {pid} is mapped read-only (shared page at {:#x}); refusing to write it",
                    t.pa
                )));
            }
        }
        Ok(())
    }

    /// How each of `pages` of process `pid` is mapped now.
    fn translate_pages(&self, g: &impl Guest, pid: u32, pages: &[u64]) -> Result<Vec<crate::paging::Translation>, MonitorError> {
        let pgd = g.process(pid)?.pgd;
        pages.iter().map(|&p| g.translate(pgd, p)).collect()
    }

    /// A patch pauses and resumes the VM itself, and needs the process to
    /// run (injected calls, threads leaving replaced functions): a VM the
    /// operator paused stays paused and untouched.
    fn require_running(&self, g: &impl Guest, what: &str) -> Result<(), MonitorError> {
        match g.run_state()? {
            RunState::Running => Ok(()),
            RunState::Paused => Err(err(format!("the VM is paused: `dvisor resume` it first, then {what}"))),
            RunState::Stopped => Err(err(format!("the guest is not running (rebooting or shutting down): cannot {what} now"))),
        }
    }

    /// Applies a patch to process `pid`. `unsafe_mode` skips the check
    /// that no thread is inside a replaced function.
    pub fn apply_patch(
        &self,
        g: &impl Guest,
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
        let bin = read(binary)?;
        let placed = self.program_placement(g, pid, &bin, binary)?;
        let program = patch::target_symbols(&bin, placed.load_base).map_err(patch_err)?;
        patch::check(&obj, &cmds, &program).map_err(patch_err)?;
        self.check_not_patched(pid, &cmds, &program)?;
        Self::check_program_matches(g, pid, &bin, binary, &cmds, &program, placed.load_base)?;
        // Everything is validated before the guest is touched.
        self.require_running(g, "apply a patch")?;
        let len = (patch::required_size(&obj) as u64).max(1);
        let align = obj.required_alignment().max(16);

        let t = Instant::now();
        let code_only = obj.is_read_only();
        let space = self.allocate_space(g, pid, len, align, placed.hint, code_only)?;
        let alloc = t.elapsed();
        let result = self.apply_in(g, pid, &obj, &cmds, &program, space, len, unsafe_mode, alloc, &obj_name);
        if result.is_err() {
            let _ = self.release_space(g, pid, Range { start: space, len });
        }
        result.map(|applied| AppliedPatch { warnings: register_warnings(&bin, &cmds, &program, placed.load_base, binary), ..applied })
    }

    /// Where the program runs in `pid`: the load base of a PIE (the start
    /// of its executable's mapping at file offset 0; gcc links a PIE's
    /// first segment at 0) and where to ask for patch space, so that rel32
    /// jumps and calls between program and patch reach.
    fn program_placement(&self, g: &impl Guest, pid: u32, bin: &[u8], binary: &Path) -> Result<ProgramPlacement, MonitorError> {
        let pie = patch::target_is_pie(bin).map_err(patch_err)?;
        let ProcessInfo { exe, .. } = g.process(pid)?;
        let vmas = g.memory_map(pid)?;
        let mapped: Vec<&crate::vmi::Vma> = vmas.iter().filter(|m| !exe.is_empty() && m.name == exe).collect();
        let low = mapped.iter().map(|m| m.start).min();
        let load_base = if pie {
            mapped.iter().filter(|m| m.offset == 0).map(|m| m.start).min().ok_or_else(|| {
                err(format!(
                    "{} is position-independent, but pid {pid} has no mapping of its program {exe:?} at file offset 0 to take the load base from",
                    binary.display()
                ))
            })?
        } else {
            0
        };
        let hint = match low {
            Some(low) if low >= SPACE_BELOW_PROGRAM + SPACE_HINT => (low - SPACE_BELOW_PROGRAM) & !(PAGE - 1),
            _ => SPACE_HINT,
        };
        Ok(ProgramPlacement { load_base, hint })
    }

    /// One patch per function: a second one over it would save the first
    /// one's jump as "original", and reverting them out of order would
    /// leave a jump into freed space.
    fn check_not_patched(
        &self,
        pid: u32,
        cmds: &CommandFile,
        program: &HashMap<String, patch::TargetSymbol>,
    ) -> Result<(), MonitorError> {
        let applied = self.patches();
        for c in &cmds.commands {
            let Some(sym) = program.get(&c.target) else { continue };
            if let Some(p) = applied.iter().find(|p| p.pid == pid && p.sites.iter().any(|s| s.addr == sym.addr)) {
                return Err(err(format!(
                    "{}:{}: {} in pid {pid} is already patched by patch {}: revert that first (`dvisor patch revert {}`)",
                    cmds.name, c.line, c.target, p.id, p.id
                )));
            }
        }
        Ok(())
    }

    /// The code about to be replaced must be the code of `binary`: a wrong
    /// --binary (another build, another program) would put jumps at
    /// meaningless addresses.
    fn check_program_matches(
        g: &impl Guest,
        pid: u32,
        bin: &[u8],
        binary: &Path,
        cmds: &CommandFile,
        program: &HashMap<String, patch::TargetSymbol>,
        load_base: u64,
    ) -> Result<(), MonitorError> {
        for c in &cmds.commands {
            let (patch::Action::Jump { .. }, Some(sym)) = (&c.action, program.get(&c.target)) else { continue };
            let n = sym.size.clamp(1, 16);
            let Some(file) = patch::program_bytes(bin, sym.addr - load_base, n) else { continue };
            let live = read_process(g, pid, sym.addr, n as usize)?;
            if live != file {
                return Err(err(format!(
                    "the code of {} at {:#x} in pid {pid} ({}) is not the code of {} there ({}): is --binary the program this process runs?",
                    c.target,
                    sym.addr,
                    hex(&live),
                    binary.display(),
                    hex(&file)
                )));
            }
        }
        Ok(())
    }

    /// Gives the process its own copy of every page a site is on, before
    /// the pause. Program code and initialised data are mapped from the
    /// file: until the process writes to such a page it is the page-cache
    /// page itself, shared with the file and every process running the
    /// program, and a write through guest-physical memory would patch them
    /// all (and the file). The process is made to write each site's own
    /// bytes back through /proc/self/mem (injected open, pwrite64, close),
    /// the way ptrace pokes text: the kernel copies the page on write.
    fn make_sites_private(&self, g: &impl Guest, pid: u32, sites: &[Site]) -> Result<(), MonitorError> {
        let mut pages: Vec<u64> = sites.iter().map(|s| s.addr & !(PAGE - 1)).collect();
        pages.sort_unstable();
        pages.dedup();
        // A page copied before still maps the same frame; a pid reused by
        // a new process maps other ones.
        let frames = self.frames_of(g, pid, &pages)?;
        let done = self.with_private_pages(pid, |known| pages.iter().zip(&frames).all(|(p, f)| known.get(p) == Some(f)));
        if done {
            return Ok(());
        }
        const PROC_SELF_MEM: &[u8] = b"/proc/self/mem\0";
        const SLOT: u64 = 32;
        let scratch_len = SLOT * (sites.len() as u64 + 1);
        let scratch = self.allocate_space(g, pid, scratch_len, 16, SPACE_HINT, false)?;
        let result = (|| {
            let mut data = vec![0u8; scratch_len as usize];
            data[..PROC_SELF_MEM.len()].copy_from_slice(PROC_SELF_MEM);
            for (i, s) in sites.iter().enumerate() {
                let b = unhex(&s.original)?;
                if b.len() > SLOT as usize {
                    return Err(err(format!("site {:#x} records {} bytes; a site holds at most {SLOT}", s.addr, b.len())));
                }
                let at = SLOT as usize * (i + 1);
                data[at..at + b.len()].copy_from_slice(&b);
            }
            self.check_private_writable(g, pid, scratch, scratch_len)?;
            self.write_process(g, pid, &[(scratch, data)])?;
            let fd = inject_syscall(g, pid, SYS_OPEN, [scratch, O_RDWR, 0, 0, 0, 0])? as i64;
            if fd < 0 {
                return Err(err(format!("pid {pid} could not open /proc/self/mem (errno {}) to copy its code pages", -fd)));
            }
            let mut written = Ok(());
            for (i, s) in sites.iter().enumerate() {
                let len = (s.original.len() / 2) as u64;
                let rc = inject_syscall(g, pid, SYS_PWRITE64, [fd as u64, scratch + SLOT * (i as u64 + 1), len, s.addr, 0, 0])?;
                if rc != len {
                    written = Err(err(format!(
                        "pid {pid} could not copy the page of {} at {:#x} (pwrite64 returned {})",
                        s.target, s.addr, rc as i64
                    )));
                    break;
                }
            }
            inject_syscall(g, pid, SYS_CLOSE, [fd as u64, 0, 0, 0, 0, 0])?;
            written
        })();
        self.release_space(g, pid, Range { start: scratch, len: scratch_len })?;
        result?;
        let frames = self.frames_of(g, pid, &pages)?;
        self.with_private_pages(pid, |known| known.extend(pages.into_iter().zip(frames)));
        self.save_patches();
        Ok(())
    }

    /// The guest-physical frame behind each page of `pid`.
    fn frames_of(&self, g: &impl Guest, pid: u32, pages: &[u64]) -> Result<Vec<u64>, MonitorError> {
        Ok(self.translate_pages(g, pid, pages)?.into_iter().map(|t| t.pa).collect())
    }

    fn with_private_pages<T>(&self, pid: u32, f: impl FnOnce(&mut std::collections::BTreeMap<u64, u64>) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(s.private_pages.entry(pid).or_default())
    }

    /// Takes `len` bytes from the process's free map, mapping a new area
    /// (injected mmap) only when no free range fits.
    /// `code_only` patches (no writable data) may also go into the bodies
    /// of functions replaced by applied patches.
    fn allocate_space(&self, g: &impl Guest, pid: u32, len: u64, align: u64, hint: u64, code_only: bool) -> Result<u64, MonitorError> {
        let taken = self.with_space(pid, |m| if code_only { m.allocate_code(len, align) } else { m.allocate(len, align) });
        if let Some(at) = taken {
            return Ok(at);
        }
        let area_len = len.div_ceil(PAGE) * PAGE;
        let hint = self.with_space(pid, |m| m.areas.iter().map(Range::end).max()).unwrap_or(hint);
        let area = inject_syscall(g, pid, SYS_MMAP, [hint, area_len, PROT_RWX, MAP_PRIVATE_ANONYMOUS_POPULATE, u64::MAX, 0])?;
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
    fn release_space(&self, g: &impl Guest, pid: u32, r: Range) -> Result<(), MonitorError> {
        for area in self.with_space(pid, |m| m.release(r)) {
            let rc = inject_syscall(g, pid, SYS_MUNMAP, [area.start, area.len, 0, 0, 0, 0])?;
            if rc != 0 {
                return Err(err(format!("munmap of patch area {:#x} failed with errno {}", area.start, -(rc as i64))));
            }
        }
        self.save_patches();
        Ok(())
    }

    fn with_space<T>(&self, pid: u32, f: impl FnOnce(&mut SpaceMap) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(s.spaces.entry(pid).or_default())
    }

    /// The patch space mapped into `pid` (bytes).
    pub fn patch_space_mapped(&self, pid: u32) -> u64 {
        self.with_space(pid, |m| m.mapped())
    }

    /// Where the patch state is kept; loads it if it belongs to `boot`.
    /// A file that fails its checks is set aside (`.rejected`) with the
    /// reason in the log, and the monitor starts with no patches: its
    /// bytes are never written into guest code.
    pub fn load(&self, file: std::path::PathBuf, boot: u64) {
        if let Ok(bytes) = std::fs::read(&file) {
            match state::decode(&bytes) {
                Ok(s) if s.format == STATE_FORMAT && s.boot == boot => {
                    tracing::info!("{} applied patches restored from {}", s.applied.len(), file.display());
                    *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
                }
                Ok(_) => tracing::info!("{} is from another boot; starting with no patches", file.display()),
                Err(e) => {
                    let aside = file.with_extension("json.rejected");
                    let _ = std::fs::rename(&file, &aside);
                    tracing::error!(
                        "refusing the patch state {}: {e}; moved to {} and starting with no patches \
                         (patches applied before cannot be reverted by this monitor)",
                        file.display(),
                        aside.display()
                    );
                    eprintln!("dvisor monitor: refusing the patch state {}: {e}; moved to {}", file.display(), aside.display());
                }
            }
        }
        self.state.lock().unwrap_or_else(|p| p.into_inner()).boot = boot;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    }

    /// A new boot: the old processes and their patches are gone.
    pub fn reset(&self, boot: u64) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Saved { boot, ..Saved::default() };
        self.save_patches();
    }

    fn save_patches(&self) {
        let Some(file) = self.file.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.format = STATE_FORMAT;
        let tmp = file.with_extension("json.tmp");
        // Written and synced under a temporary name, then renamed: a crash
        // leaves the old state or the new, never half of one.
        let ok = state::encode(&s).map_err(std::io::Error::other).and_then(|b| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&b)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &file)
        });
        if let Err(e) = ok {
            tracing::warn!("saving the patch state to {}: {e}", file.display());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_in(
        &self,
        g: &impl Guest,
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
        let in_body = self.with_space(pid, |m| m.in_body(Range { start: space, len }));
        if !linked.bytes.is_empty() {
            // A body is program text, read-only to the process; its page
            // was copied for the process when its function was patched.
            if !in_body {
                self.check_private_writable(g, pid, space, linked.bytes.len() as u64)?;
            }
            self.write_process(g, pid, &[(space, linked.bytes.clone())])?;
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
            let original = read_process(g, pid, *addr, bytes.len())?;
            sites.push(Site { target: target.clone(), addr: *addr, original: hex(&original), new: hex(bytes) });
        }
        let t = Instant::now();
        self.make_sites_private(g, pid, &sites)?;
        let cow = t.elapsed();

        // Found before the pause, so that the pause holds only the check
        // and the writes.
        let ProcessInfo { pgd, tasks, .. } = g.process(pid)?;
        let vmas = if unsafe_mode { Vec::new() } else { g.memory_map(pid)? };
        let all: Vec<(u64, Vec<u8>)> = writes.iter().map(|(_, a, b)| (*a, b.clone())).collect();
        let guarded = safety::write_when_safe(g, pgd, &tasks, &vmas, if unsafe_mode { &[] } else { &ranges }, &all)?;
        let guard = match guarded {
            Ok(g) => g,
            Err(busy) => {
                return Err(err(format!(
                    "not safe to patch pid {pid} now: {} (still so after {RETRIES} tries over {:?}); nothing was changed. Retry when it has left, or use --unsafe",
                    describe_busy(&busy, &resolved),
                    BACKOFF * RETRIES
                )))
            }
        };
        let id = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.next_id += 1;
            st.next_id
        };
        // The paper's "free": the replaced bodies go to the free map (after
        // the pause: nothing can enter them once the jumps are there).
        let t = Instant::now();
        let bodies = self.donate_bodies(g, pid, id, &resolved);
        let free = t.elapsed();
        let timing = Timing {
            attach_us: us(guard.attach),
            check_us: us(guard.check),
            alloc_us: us(alloc + cow),
            write_patch_us: us(write_patch),
            write_jump_us: us(guard.write),
            free_us: us(free),
            detach_us: us(guard.detach),
            pause_us: us(guard.pause),
        };
        let applied = AppliedPatch {
            id,
            pid,
            object: obj_name.to_string(),
            space,
            space_len: len,
            sites,
            timing,
            attempts: guard.attempts,
            bodies,
            warnings: Vec::new(),
        };
        // The patch lives in the processes of the boot whose memory it was
        // written to. The state's boot can still be the 0 of "not known at
        // attach" (a monitor that attached before the first boot mapped its
        // memory lazily, and the Boot event then saw no change): recorded
        // so, a restarted monitor took the saved patches for another boot's
        // and dropped them.
        let boot = g.boot();
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = boot {
                st.boot = b;
            }
            st.applied.push(applied.clone());
        }
        self.save_patches();
        Ok(applied)
    }

    pub fn patches(&self) -> Vec<AppliedPatch> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).applied.clone()
    }

    /// Gives the free map the bodies of the functions patch `id` just
    /// redirected: the part behind the jump on the jump's own page (the
    /// page the process got its own copy of), when it is big enough. No
    /// thread is in them (the safe-mode check covered the whole function)
    /// and none can enter (the jump). Returns them with their bytes.
    fn donate_bodies(&self, g: &impl Guest, pid: u32, id: u32, resolved: &[patch::ResolvedCommand]) -> Vec<Site> {
        let mut out = Vec::new();
        for r in resolved {
            let ResolvedAction::Jump { target_addr, target_size, jump, .. } = &r.action else { continue };
            let start = target_addr + jump.len() as u64;
            let end = (target_addr + target_size).min((target_addr & !(PAGE - 1)) + PAGE);
            if end < start + MIN_BODY {
                continue;
            }
            let Ok(bytes) = read_process(g, pid, start, (end - start) as usize) else { continue };
            self.with_space(pid, |m| m.add_body(Range { start, len: end - start }, id));
            out.push(Site { target: r.target.clone(), addr: start, original: hex(&bytes), new: String::new() });
        }
        out
    }

    /// Restores every site of patch `id` in one pause and frees its space.
    /// Bodies it gave to the free map must be empty again; their bytes go
    /// back in the same pause, once no thread executes in or returns into
    /// them (a patch that lived there may just have been reverted).
    pub fn revert_patch(&self, g: &impl Guest, id: u32) -> Result<AppliedPatch, MonitorError> {
        let p = self
            .patches()
            .into_iter()
            .find(|p| p.id == id)
            .ok_or_else(|| err(format!("no applied patch {id}: see `dvisor patch list`")))?;
        self.require_running(g, "revert a patch")?;
        if let Err(used) = self.with_space(p.pid, |m| m.free_bodies_of(id)) {
            let tenant = self
                .patches()
                .into_iter()
                .find(|q| q.pid == p.pid && q.space >= used.start && q.space < used.end())
                .map(|q| q.id.to_string())
                .unwrap_or_else(|| "?".into());
            return Err(err(format!(
                "patch {id} redirected a function whose body ({:#x}+{:#x}) now holds patch {tenant}: revert that first (`dvisor patch revert {tenant}`)",
                used.start, used.len
            )));
        }
        let mut writes = Vec::new();
        for s in p.sites.iter().chain(&p.bodies) {
            writes.push((s.addr, unhex(&s.original)?));
        }
        let ranges: Vec<(u64, u64)> = p.bodies.iter().map(|b| (b.addr, b.addr + (b.original.len() / 2) as u64)).collect();
        let ProcessInfo { pgd, tasks, .. } = g.process(p.pid)?;
        let vmas = if ranges.is_empty() { Vec::new() } else { g.memory_map(p.pid)? };
        if safety::write_when_safe(g, pgd, &tasks, &vmas, &ranges, &writes)?.is_err() {
            return Err(err(format!(
                "not safe to revert patch {id} now: a thread is still in the code that was placed in its replaced function's body; retry"
            )));
        }
        self.with_space(p.pid, |m| m.remove_bodies(id)).map_err(|r| err(format!("body {:#x} in use", r.start)))?;
        self.state.lock().unwrap_or_else(|p| p.into_inner()).applied.retain(|a| a.id != id);
        self.release_space(g, p.pid, Range { start: p.space, len: p.space_len })?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::image::{ImageGuest, PID};

    /// Patch `id` as an apply of the v2 sample leaves it: one jump over
    /// get_message at 0x401850 (its original bytes recorded).
    fn v2_patch(id: u32) -> AppliedPatch {
        let site = Site { target: "get_message".into(), addr: 0x401850, original: "488d050102".into(), new: "e9abcdef0f".into() };
        AppliedPatch {
            id,
            pid: PID,
            object: "v2.o".into(),
            space: 0x1000_0000,
            space_len: 0x40,
            sites: vec![site],
            timing: Timing::default(),
            attempts: 1,
            bodies: Vec::new(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn revert_puts_the_original_bytes_back_in_one_pause_on_a_memory_image() {
        let mut g = ImageGuest::new();
        g.map(0x401000, 0x1000, "/usr/bin/demo");
        g.poke(0x401850, &[0xe9, 0xab, 0xcd, 0xef, 0x0f]);
        let svc = PatchService::default();
        svc.state.lock().unwrap().applied.push(v2_patch(1));
        assert!(svc.revert_patch(&g, 2).is_err(), "no such patch");
        let reverted = svc.revert_patch(&g, 1).unwrap();
        assert_eq!(reverted.id, 1);
        assert_eq!(g.peek(0x401850, 5), [0x48, 0x8d, 0x05, 0x01, 0x02]);
        assert_eq!((g.pauses.get(), g.writes_while_running.get()), (1, 0));
        assert!(svc.patches().is_empty());
    }

    /// What a restarted monitor sees: the state file written after an
    /// apply (ids as the service hands them out) loads back whole; a
    /// damaged one is set aside and loads as nothing.
    #[test]
    fn the_state_file_survives_a_restart_and_a_damaged_one_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("patches.json");
        let svc = PatchService::default();
        svc.load(file.clone(), 7);
        {
            let mut st = svc.state.lock().unwrap();
            st.next_id += 1;
            let id = st.next_id;
            st.applied.push(v2_patch(id));
        }
        svc.save_patches();
        let again = PatchService::default();
        again.load(file.clone(), 7);
        assert_eq!(again.patches().len(), 1, "a restarted monitor lost the patch list");
        let text = std::fs::read_to_string(&file).unwrap().replacen("488d050102", "488d0501ff", 1);
        std::fs::write(&file, text).unwrap();
        let damaged = PatchService::default();
        damaged.load(file.clone(), 7);
        assert!(damaged.patches().is_empty());
        assert!(file.with_extension("json.rejected").exists(), "the damaged file was not set aside");
    }
}
