//! Pausing the vCPUs and running requests on them.
//!
//! KVM vCPU ioctls block while the vCPU is inside KVM_RUN, so anything the
//! support API asks of a vCPU (registers, MSRs, debug, NMI) is queued in its
//! mailbox and executed by the vCPU's own thread between two runs. A kick
//! signal takes the thread out of KVM_RUN; the signal handler also sets
//! `immediate_exit`, so a kick that lands just before KVM_RUN still makes it
//! return at once (see signals.rs).
use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

/// Work for one vCPU thread. The closure runs on that thread with its fd.
pub type VcpuJob = Box<dyn FnOnce(&VcpuFd) + Send>;

/// A vCPU's registers, read by its own thread as it parked.
pub type VcpuSnapshot = Result<(kvm_regs, kvm_sregs), kvm_ioctls::Error>;

#[derive(Default)]
struct State {
    pause_requested: bool,
    stopping: bool,
    /// vCPU threads parked by a pause (or finished).
    parked: usize,
    mailboxes: Vec<VecDeque<VcpuJob>>,
    /// Set by `pause_capturing`: each thread reads its registers as it
    /// parks, all at once, instead of one mailbox job after another.
    capture: bool,
    snapshots: Vec<Option<VcpuSnapshot>>,
}

/// Shared by the vCPU threads of one boot and whoever controls them.
pub struct VcpuControl {
    vcpus: usize,
    state: Mutex<State>,
    changed: Condvar,
    /// pthread ids of the vCPU threads, filled in as they start.
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
}

impl VcpuControl {
    pub fn new(vcpus: usize) -> Self {
        let state = State {
            mailboxes: (0..vcpus).map(|_| VecDeque::new()).collect(),
            snapshots: (0..vcpus).map(|_| None).collect(),
            ..Default::default()
        };
        VcpuControl {
            vcpus,
            state: Mutex::new(state),
            changed: Condvar::new(),
            threads: Mutex::new(vec![None; vcpus]),
        }
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A vCPU thread that panicked while holding the lock leaves valid
        // state behind (plain flags and queues).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by vCPU thread `id` when it starts.
    pub fn register_thread(&self, id: usize) {
        if let Ok(mut t) = self.threads.lock() {
            if let Some(slot) = t.get_mut(id) {
                // SAFETY: pthread_self has no preconditions.
                *slot = Some(unsafe { libc::pthread_self() });
            }
        }
    }

    fn kick(&self, only: Option<usize>) {
        let Ok(threads) = self.threads.lock() else { return };
        for (i, t) in threads.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            if let Some(t) = t {
                // SAFETY: the id belongs to a vCPU thread of this boot, which
                // is only joined after `stop` (no kicks after that).
                unsafe { libc::pthread_kill(*t, crate::signals::kick_signal()) };
            }
        }
    }

    pub fn is_paused(&self) -> bool {
        let s = self.lock();
        s.pause_requested && s.parked == self.vcpus
    }

    /// Asks every vCPU to stop and waits until all have. Returns whether
    /// the VM was already paused and how long the vCPUs took to stop.
    pub fn pause(&self) -> (bool, Duration) {
        let (already, took, _) = self.pause_capturing(false);
        (already, took)
    }

    /// As `pause`; with `capture`, also each vCPU's registers as its
    /// thread read them while parking. A vCPU that was parked already (the
    /// VM was paused, or it had finished) has no snapshot: `None`.
    pub fn pause_capturing(&self, capture: bool) -> (bool, Duration, Vec<Option<VcpuSnapshot>>) {
        let start = Instant::now();
        let mut s = self.lock();
        let already = s.pause_requested;
        s.capture = capture && !already;
        s.snapshots.iter_mut().for_each(|x| *x = None);
        s.pause_requested = true;
        drop(s);
        self.wait_parked();
        let mut s = self.lock();
        s.capture = false;
        let snaps = s.snapshots.iter_mut().map(Option::take).collect();
        (already, start.elapsed(), snaps)
    }

    /// Requests a pause without waiting (used by a vCPU thread that hit a
    /// debug exit: it must not wait for itself).
    pub fn request_pause(&self) {
        self.lock().pause_requested = true;
        self.kick(None);
    }

    fn wait_parked(&self) {
        // Kicks can be lost by a thread not yet registered; repeat them
        // until every thread is parked.
        loop {
            self.kick(None);
            let s = self.lock();
            if s.parked >= self.vcpus || s.stopping {
                return;
            }
            let (s, _) = self
                .changed
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap_or_else(|p| p.into_inner());
            if s.parked >= self.vcpus || s.stopping {
                return;
            }
        }
    }

    /// Lets the vCPUs run again. Returns whether they were running already.
    pub fn resume(&self) -> bool {
        let mut s = self.lock();
        let was_running = !s.pause_requested;
        s.pause_requested = false;
        drop(s);
        self.changed.notify_all();
        was_running
    }

    /// Runs `job` on vCPU `id`'s thread and returns its result. The vCPU
    /// keeps its run state (a running vCPU is kicked out of KVM_RUN, does
    /// the job and goes back in).
    pub fn run_on<T: Send + 'static>(
        &self,
        id: usize,
        job: impl FnOnce(&VcpuFd) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut s = self.lock();
            if s.stopping {
                return None;
            }
            s.mailboxes.get_mut(id)?.push_back(Box::new(move |fd| {
                let _ = tx.send(job(fd));
            }));
        }
        self.changed.notify_all();
        self.kick(Some(id));
        // Generous: a vCPU returns from KVM_RUN within microseconds of a
        // kick; this only guards against a thread that died.
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(v) => return Some(v),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.lock().stopping {
                        return None;
                    }
                    self.kick(Some(id));
                }
            }
        }
    }

    /// Tears down: parked threads wake and exit; queued jobs are dropped
    /// (their callers get `None`).
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stopping = true;
        for m in s.mailboxes.iter_mut() {
            m.clear();
        }
        drop(s);
        self.changed.notify_all();
    }

    /// The vCPU thread's side, called before every KVM_RUN: runs queued
    /// jobs and, while a pause is requested, parks. Returns false when the
    /// thread must exit.
    pub fn checkpoint(&self, id: usize, fd: &VcpuFd) -> bool {
        let mut s = self.lock();
        let mut parked = false;
        let mut snapped = false;
        loop {
            if s.stopping {
                if parked {
                    s.parked -= 1;
                }
                return false;
            }
            if let Some(job) = s.mailboxes.get_mut(id).and_then(VecDeque::pop_front) {
                drop(s);
                job(fd);
                s = self.lock();
                continue;
            }
            if !s.pause_requested {
                if parked {
                    s.parked -= 1;
                }
                return true;
            }
            if !parked && s.capture && !snapped {
                drop(s);
                let snap = fd.get_regs().and_then(|r| Ok((r, fd.get_sregs()?)));
                s = self.lock();
                if let Some(slot) = s.snapshots.get_mut(id) {
                    *slot = Some(snap);
                }
                snapped = true;
                // The state may have moved on meanwhile: look again.
                continue;
            }
            if !parked {
                parked = true;
                s.parked += 1;
                self.changed.notify_all();
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}
