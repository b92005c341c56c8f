//! The process list: a walk of `init_task.tasks`, as `ps` shows it.
use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{Vmi, VmiError, MAX_TASKS};
use crate::paging::PhysRead;

/// The one-letter states of fs/proc/array.c.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState(pub char);

const TASK_REPORT: u64 = 0x7f;
const TASK_IDLE: u64 = 0x402;
const STATE_LETTERS: &[u8] = b"RSDTtXZPI";

impl TaskState {
    pub fn from_raw(state: u64, exit_state: u64) -> TaskState {
        if state == TASK_IDLE {
            return TaskState('I');
        }
        let bits = (state | exit_state) & TASK_REPORT;
        let index = (u64::BITS - bits.leading_zeros()) as usize;
        TaskState(*STATE_LETTERS.get(index).unwrap_or(&b'?') as char)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub tgid: u32,
    /// The parent's tgid, as `ps` reports it.
    pub ppid: u32,
    pub comm: String,
    pub state: TaskState,
    pub uid: u32,
    pub threads: u32,
    pub rss_kib: u64,
    /// Empty for kernel threads.
    pub cmdline: String,
    /// The executable's path in the guest (mm->exe_file); empty for kernel
    /// threads or when the profile lacks the field.
    #[serde(default)]
    pub exe: String,
    pub kernel_thread: bool,
    /// Address of the task_struct.
    pub task: u64,
    /// Address of the mm_struct (0 for kernel threads).
    pub mm: u64,
}

impl<M: PhysRead> Vmi<'_, M> {
    /// Every thread-group leader, in task-list order (init_task first).
    pub fn processes(&self) -> Result<Vec<Process>, VmiError> {
        let t = &self.profile.layouts.task_struct;
        let init = self.symbol("init_task")?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut task = init;
        loop {
            if !seen.insert(task) {
                return Err(VmiError::Corrupt(format!(
                    "the task list loops back to {task:#x} without returning to init_task"
                )));
            }
            if seen.len() > MAX_TASKS {
                return Err(VmiError::Corrupt(format!("more than {MAX_TASKS} tasks: the task list is corrupt")));
            }
            out.push(self.process(task)?);
            let next = self.read_u64(task + t.tasks.offset)?;
            task = next.wrapping_sub(t.tasks.offset);
            if task == init {
                return Ok(out);
            }
            if !self.is_kernel_va(next) {
                return Err(VmiError::Corrupt(format!("task list pointer {next:#x} is not a kernel address")));
            }
        }
    }

    pub fn process_by_pid(&self, pid: u32) -> Result<Process, VmiError> {
        self.processes()?.into_iter().find(|p| p.pid == pid).ok_or(VmiError::NoSuchPid(pid))
    }

    fn process(&self, task: u64) -> Result<Process, VmiError> {
        let l = &self.profile.layouts;
        let t = &l.task_struct;
        let pid = self.read_field(task, &t.pid)? as u32;
        let tgid = self.read_field(task, &t.tgid)? as u32;
        let comm = self.read_cstr(task + t.comm.offset, t.comm.size as usize)?;
        let mm = self.read_field(task, &t.mm)?;
        let parent = self.read_field(task, &t.real_parent)?;
        let ppid = if parent == 0 || parent == task { 0 } else { self.read_field(parent, &t.tgid)? as u32 };
        let exit_state = match l.fields.get("task_struct.exit_state") {
            Some(f) => self.read_field(task, f)?,
            None => 0,
        };
        let state = TaskState::from_raw(self.read_field(task, &t.state)?, exit_state);
        let cred = self.read_field(task, &t.real_cred)?;
        let uid = if cred == 0 { 0 } else { self.read_field(cred, &l.cred.uid)? as u32 };
        let signal = self.read_field(task, &t.signal)?;
        let threads = if signal == 0 { 1 } else { self.read_field(signal, &l.signal_struct.nr_threads)? as u32 };
        let (rss_kib, cmdline) = if mm == 0 { (0, String::new()) } else { (self.rss_kib(mm)?, self.cmdline(mm)) };
        let exe = if mm == 0 { String::new() } else { self.exe_path(mm) };
        Ok(Process { pid, tgid, ppid, comm, state, uid, threads, rss_kib, cmdline, exe, kernel_thread: mm == 0, task, mm })
    }

    /// The path of mm->exe_file, or empty if there is none to read.
    fn exe_path(&self, mm: u64) -> String {
        let Some(f) = self.profile.layouts.fields.get("mm_struct.exe_file") else { return String::new() };
        match self.read_field(mm, f) {
            Ok(file) if file != 0 => self.file_path(file).unwrap_or_default(),
            _ => String::new(),
        }
    }

    fn rss_kib(&self, mm: u64) -> Result<u64, VmiError> {
        use crate::profile::layouts::RssCounters;
        let m = &self.profile.layouts.mm_struct;
        let idx = &m.rss_index;
        let mut pages: i64 = 0;
        for i in [Some(idx.file), Some(idx.anon), idx.shmem].into_iter().flatten() {
            let at = match &m.rss {
                RssCounters::Atomic { count, elem_size, len } if i < *len => mm + count.offset + i * elem_size,
                RssCounters::Percpu { array, elem_size, len, value } if i < *len => {
                    mm + array.offset + i * elem_size + value.offset
                }
                _ => continue,
            };
            pages += self.read_u64(at)? as i64;
        }
        Ok(pages.max(0) as u64 * 4)
    }

    /// The argument strings, read through the process's own page tables;
    /// empty when they are paged out or the process is exiting.
    fn cmdline(&self, mm: u64) -> String {
        let m = &self.profile.layouts.mm_struct;
        let read = || -> Result<String, VmiError> {
            let start = self.read_field(mm, &m.arg_start)?;
            let end = self.read_field(mm, &m.arg_end)?;
            let len = end.saturating_sub(start).min(4096) as usize;
            if len == 0 {
                return Ok(String::new());
            }
            let pgd = self.mm_pgd(mm)?;
            let mut buf = vec![0u8; len];
            self.read_user(pgd, start, &mut buf)?;
            let s: Vec<&[u8]> = buf.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
            Ok(s.iter().map(|a| String::from_utf8_lossy(a)).collect::<Vec<_>>().join(" "))
        };
        read().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_like_proc() {
        assert_eq!(TaskState::from_raw(0, 0).0, 'R');
        assert_eq!(TaskState::from_raw(1, 0).0, 'S');
        assert_eq!(TaskState::from_raw(2, 0).0, 'D');
        assert_eq!(TaskState::from_raw(TASK_IDLE, 0).0, 'I');
        assert_eq!(TaskState::from_raw(0, 0x20).0, 'Z');
        assert_eq!(TaskState::from_raw(4, 0).0, 'T');
    }
}

/// Where a thread is in user mode: its instruction and stack pointers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserState {
    pub rip: u64,
    pub rsp: u64,
}

/// x86-64 kernel stacks are 16 KiB (THREAD_SIZE without KASAN); the user
/// `pt_regs` sit at their top.
const THREAD_SIZE: u64 = 16 * 1024;

/// A task's threads and saved registers: what live patching and syscall
/// injection need to know of a process beyond the process list.
impl<M: PhysRead> Vmi<'_, M> {
    /// A task's `__state`: 0 is TASK_RUNNING (on a CPU or runnable).
    pub fn task_state_raw(&self, task: u64) -> Result<u64, VmiError> {
        self.read_field(task, &self.profile.layouts.task_struct.state)
    }

    /// The user registers saved at the top of a task's kernel stack.
    pub fn saved_user_state(&self, task: u64) -> Result<UserState, VmiError> {
        let l = &self.profile.layouts;
        let field = |name: &str| l.fields.get(name).ok_or_else(|| VmiError::Profile(name.into()));
        let size = l.sizes.get("pt_regs").copied().ok_or_else(|| VmiError::Profile("sizeof(pt_regs)".into()))?;
        let regs = self.read_field(task, &l.task_struct.stack)? + THREAD_SIZE - size;
        Ok(UserState { rip: self.read_field(regs, field("pt_regs.ip")?)?, rsp: self.read_field(regs, field("pt_regs.sp")?)? })
    }

    /// Every thread (task) of a process: its thread group, the leader first.
    pub fn threads_of(&self, p: &Process) -> Result<Vec<u64>, VmiError> {
        let t = &self.profile.layouts.task_struct;
        let Some(group) = t.thread_group.as_ref() else { return Ok(vec![p.task]) };
        let mut out = vec![p.task];
        let mut next = self.read_u64(p.task + group.offset)?;
        while next.wrapping_sub(group.offset) != p.task {
            if out.len() > MAX_TASKS {
                return Err(VmiError::Corrupt("thread group list loops".into()));
            }
            out.push(next.wrapping_sub(group.offset));
            next = self.read_u64(next)?;
        }
        Ok(out)
    }
}
