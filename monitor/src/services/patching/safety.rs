//! The safe-mode check of a live patch: is any thread of the process
//! inside a function about to be replaced, or will it return into one?
//!
//! A thread is either on a vCPU now (its registers, when the vCPU runs in
//! user mode with the process's page tables) or off-CPU, when its user
//! registers sit in the `pt_regs` at the top of its kernel stack. Both are
//! looked at for every thread: a running thread's saved `pt_regs` are only
//! stale, and looking at them too can only refuse more, never less.
//!
//! The user stack is scanned word by word from the stack pointer up to the
//! end of its mapping (at most `MAX_STACK_SCAN`): a word that points just
//! past a call inside a replaced function is taken as a return address.
//! Without frame pointers or unwind tables a data word that happens to
//! look like one is counted too; that only makes the check refuse more.
//!
//! Everything here works on a `Guest`, so it is tested below on a memory
//! image, without a VMM.
use std::time::{Duration, Instant};

use dvisor_api::protocol::{Regs, VcpuState};

use crate::error::MonitorError;
pub use crate::vmi::UserState;
use crate::services::Guest;
use crate::vmi::Vma;

/// The most of one thread's stack read in a pause.
pub const MAX_STACK_SCAN: u64 = 256 * 1024;
/// Pauses a guarded write tries before it gives up, and the time the
/// process runs between two of them.
pub const RETRIES: u32 = 20;
pub const BACKOFF: Duration = Duration::from_millis(20);

/// How a guarded write went: the paper's attach, write and detach steps,
/// the whole pause, and how many pauses it took.
#[derive(Debug, Clone, Copy)]
pub struct Guarded {
    pub attach: Duration,
    /// The safe-mode check, in the pause.
    pub check: Duration,
    pub write: Duration,
    pub detach: Duration,
    pub pause: Duration,
    pub attempts: u32,
}

/// Why a patch cannot be written now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Busy {
    /// A thread executes at `rip`, inside the function starting at `func`.
    Executing { rip: u64, func: u64 },
    /// The stack word at `at` returns into the function starting at `func`.
    ReturnAddress { at: u64, value: u64, func: u64 },
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Busy::Executing { rip, func } => write!(f, "a thread is executing at {rip:#x}, inside the function at {func:#x}"),
            Busy::ReturnAddress { at, value, func } => write!(
                f,
                "a thread's stack holds {value:#x} at {at:#x}, a return address into the function at {func:#x}"
            ),
        }
    }
}

/// The page-table root a CR3 value points at (PCID bits and the PTI user
/// half cleared), so that a process's kernel and user CR3 compare equal.
pub fn cr3_root(cr3: u64) -> u64 {
    (cr3 & crate::paging::PHYS_ADDR_MASK) & !0x1000
}

/// The first of `ranges` (start, end) holding `rip`.
pub fn executing_in(ranges: &[(u64, u64)], s: UserState) -> Option<Busy> {
    ranges.iter().find(|(a, b)| s.rip >= *a && s.rip < *b).map(|(a, _)| Busy::Executing { rip: s.rip, func: *a })
}

/// The first word of `stack` (read from address `base`) that returns into
/// one of `ranges`: a return address points after the call instruction,
/// so it lies in (start, end]; a word equal to a function's start is a
/// function pointer, not a return address.
pub fn return_address_in(ranges: &[(u64, u64)], base: u64, stack: &[u8]) -> Option<Busy> {
    stack.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let value = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        ranges
            .iter()
            .find(|(a, b)| value > *a && value <= *b)
            .map(|(a, _)| Busy::ReturnAddress { at: base + 8 * i as u64, value, func: *a })
    })
}

/// The vCPUs of `states` running in user mode in the address space `pgd`,
/// with their registers.
pub fn user_vcpus(states: &[VcpuState], pgd: u64) -> Vec<(u32, Regs)> {
    states
        .iter()
        .filter(|s| s.sregs.cs.selector & 3 == 3 && cr3_root(s.sregs.cr3) == cr3_root(pgd))
        .map(|s| (s.vcpu, s.regs))
        .collect()
}

/// Writes all `(addr, bytes)` into the address space `pgd` or, if any
/// page is not mapped, none.
pub fn write_all(g: &impl Guest, pgd: u64, writes: &[(u64, Vec<u8>)]) -> Result<(), MonitorError> {
    for (addr, data) in writes {
        let mut probe = vec![0u8; data.len()];
        g.read_user(pgd, *addr, &mut probe)?;
    }
    for (addr, data) in writes {
        g.write_user(pgd, *addr, data)?;
    }
    Ok(())
}

/// Writes `writes` into the address space `pgd` in one pause of the VM,
/// once no thread in `tasks` executes in or would return into `ranges`
/// (with none, at the first pause). While the process is busy it runs on,
/// and the write is tried again, RETRIES pauses in all; then nothing is
/// written and the last finding is returned.
pub fn write_when_safe(
    g: &impl Guest,
    pgd: u64,
    tasks: &[u64],
    vmas: &[Vma],
    ranges: &[(u64, u64)],
    writes: &[(u64, Vec<u8>)],
) -> Result<Result<Guarded, Busy>, MonitorError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let start = Instant::now();
        let states = if ranges.is_empty() {
            g.pause()?;
            Vec::new()
        } else {
            g.pause_with_state()?
        };
        let attach = start.elapsed();
        let t = Instant::now();
        let busy = if ranges.is_empty() { Ok(None) } else { busy_in(g, &states, pgd, tasks, vmas, ranges) };
        let check = t.elapsed();
        let written = match busy {
            Ok(None) => {
                let t = Instant::now();
                Ok(write_all(g, pgd, writes).map(|()| t.elapsed()))
            }
            Ok(Some(b)) => Err(b),
            Err(e) => {
                g.resume()?;
                return Err(e);
            }
        };
        let t = Instant::now();
        g.resume()?;
        let detach = t.elapsed();
        match written {
            Ok(w) => return Ok(Ok(Guarded { attach, check, write: w?, detach, pause: start.elapsed(), attempts })),
            Err(b) if attempts >= RETRIES => return Ok(Err(b)),
            Err(_) => std::thread::sleep(BACKOFF),
        }
    }
}

/// Where every thread in `tasks` is in user mode: on a vCPU now, and as
/// saved on its kernel stack. The VM must be paused.
fn thread_states(g: &impl Guest, vcpus: &[VcpuState], pgd: u64, tasks: &[u64]) -> Vec<UserState> {
    let mut out: Vec<UserState> =
        user_vcpus(vcpus, pgd).into_iter().map(|(_, r)| UserState { rip: r.rip, rsp: r.rsp }).collect();
    out.extend(tasks.iter().filter_map(|&t| g.saved_user_state(t).ok()));
    out
}

/// The safe-mode check, with the VM paused (`vcpus` as it stopped): None
/// when no thread of the process executes in, or would return into, any
/// of `ranges`. `vmas` is the process's memory map (for the stacks' ends).
pub fn busy_in(
    g: &impl Guest,
    vcpus: &[VcpuState],
    pgd: u64,
    tasks: &[u64],
    vmas: &[Vma],
    ranges: &[(u64, u64)],
) -> Result<Option<Busy>, MonitorError> {
    let states = thread_states(g, vcpus, pgd, tasks);
    if let Some(b) = states.iter().find_map(|s| executing_in(ranges, *s)) {
        return Ok(Some(b));
    }
    for s in &states {
        let Some(vma) = vmas.iter().find(|v| s.rsp >= v.start && s.rsp < v.end) else { continue };
        let start = s.rsp & !7;
        let end = vma.end.min(start + MAX_STACK_SCAN);
        if let Some(b) = scan_stack(g, pgd, start, end, ranges) {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

/// Scans [start, end) page by page; stops at the first page that is not
/// present (nothing above a live stack pointer is ever paged out here, and
/// an unmapped page cannot hold a frame).
fn scan_stack(g: &impl Guest, pgd: u64, start: u64, end: u64, ranges: &[(u64, u64)]) -> Option<Busy> {
    const PAGE: u64 = 4096;
    let mut at = start;
    let mut buf = Vec::new();
    while at < end {
        let chunk = ((at & !(PAGE - 1)) + PAGE).min(end) - at;
        buf.resize(chunk as usize, 0);
        if g.read_user(pgd, at, &mut buf).is_err() {
            return None;
        }
        if let Some(b) = return_address_in(ranges, at, &buf) {
            return Some(b);
        }
        at += chunk;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET_MESSAGE: (u64, u64) = (0x401850, 0x401856);

    fn words(w: &[u64]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn rip_inside_a_replaced_function_is_busy() {
        let r = [GET_MESSAGE];
        assert!(executing_in(&r, UserState { rip: 0x401850, rsp: 0 }).is_some());
        assert!(executing_in(&r, UserState { rip: 0x401855, rsp: 0 }).is_some());
        assert_eq!(executing_in(&r, UserState { rip: 0x401856, rsp: 0 }), None);
        assert_eq!(executing_in(&r, UserState { rip: 0x40184f, rsp: 0 }), None);
    }

    #[test]
    fn return_addresses_are_found_and_function_pointers_are_not() {
        let r = [GET_MESSAGE];
        let stack = words(&[7, 0x401850, 0x4a0000, 0x401853, 9]);
        assert_eq!(
            return_address_in(&r, 0x7ff0_0000, &stack),
            Some(Busy::ReturnAddress { at: 0x7ff0_0018, value: 0x401853, func: 0x401850 })
        );
        // A call as the last instruction returns to the end.
        assert!(return_address_in(&r, 0, &words(&[0x401856])).is_some());
        assert_eq!(return_address_in(&r, 0, &words(&[0x401850, 0x401857, 0])), None);
        // A partial word at the end is ignored, not misread.
        assert_eq!(return_address_in(&r, 0, &[0x53, 0x18, 0x40]), None);
    }

    #[test]
    fn pti_and_pcid_bits_do_not_hide_a_process() {
        assert_eq!(cr3_root(0x1234_5000 | 0x1000 | 0x5), cr3_root(0x1234_4000));
        assert_eq!(cr3_root(0x1234_4000 | (1 << 63)), 0x1234_4000);
    }

    // On a memory image: the whole guarded write, without a VMM.

    use crate::services::image::{ImageGuest, PID};
    use crate::services::GuestView;

    const TEXT: u64 = 0x401000;
    const STACK: u64 = 0x7ffd_0000;
    const JMP: [u8; 5] = [0xe9, 0x10, 0x20, 0x30, 0x40];

    /// The demo's text with get_message's first bytes, a stack, and a
    /// thread asleep outside get_message with `stack_words` on its stack.
    fn image(stack_words: &[u64]) -> ImageGuest {
        let mut g = ImageGuest::new();
        g.map(TEXT, 0x1000, "/usr/bin/demo");
        g.map(STACK, 0x2000, "[stack]");
        g.poke(GET_MESSAGE.0, &[0x48, 0x8d, 0x05, 0x01, 0x02, 0x03]);
        let rsp = STACK + 0x1f00;
        g.poke(rsp, &words(stack_words));
        g.saved.insert(g.process.task, UserState { rip: TEXT + 0x900, rsp });
        g
    }

    fn guarded(g: &ImageGuest) -> Result<Result<Guarded, Busy>, MonitorError> {
        let p = g.process(PID)?;
        let vmas = g.memory_map(PID)?;
        write_when_safe(g, p.pgd, &p.tasks, &vmas, &[GET_MESSAGE], &[(GET_MESSAGE.0, JMP.to_vec())])
    }

    #[test]
    fn a_guarded_write_lands_in_one_pause_when_no_thread_is_in_the_way() {
        let g = image(&[7, 0x401900, 0]);
        let done = guarded(&g).unwrap().unwrap();
        assert_eq!(done.attempts, 1);
        assert_eq!(g.peek(GET_MESSAGE.0, 6), [0xe9, 0x10, 0x20, 0x30, 0x40, 0x03]);
        assert_eq!(g.writes_while_running.get(), 0, "written only while paused");
        assert!(!g.is_paused(), "the VM runs again");
    }

    #[test]
    fn a_return_address_or_a_running_thread_keeps_the_write_out() {
        let g = image(&[7, 0x401853, 0]);
        let busy = guarded(&g).unwrap().unwrap_err();
        assert!(matches!(busy, Busy::ReturnAddress { value: 0x401853, func: 0x401850, .. }), "{busy:?}");
        assert_eq!(g.pauses.get(), RETRIES, "tried in every pause");
        assert_eq!(g.peek(GET_MESSAGE.0, 3), [0x48, 0x8d, 0x05], "nothing written");
        assert!(!g.is_paused());

        let mut g = image(&[]);
        g.on_cpu(0x401852, STACK + 0x1000);
        let busy = guarded(&g).unwrap().unwrap_err();
        assert_eq!(busy, Busy::Executing { rip: 0x401852, func: 0x401850 });
    }

    #[test]
    fn write_all_writes_nothing_when_one_page_is_missing() {
        let g = image(&[]);
        let pgd = g.process.pgd;
        let writes = [(GET_MESSAGE.0, JMP.to_vec()), (0x50_0000, vec![1])];
        assert!(write_all(&g, pgd, &writes).is_err());
        assert_eq!(g.peek(GET_MESSAGE.0, 1), [0x48]);
    }
}
