//! A guest for benchmarks: `dvisor run --no-monitor` as a child, its
//! console lines on a channel and its shell on stdin.
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Safety net for one guest step under TCG; never what is measured.
const STEP: Duration = Duration::from_secs(300);

pub struct Vm {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// The console's last lines, for a report when something fails.
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// How many console lines [`Vm::tail`] keeps.
const TAIL: usize = 40;

impl Vm {
    /// Boots the default guest (no monitor) and waits for its shell prompt.
    pub fn boot(name: &str) -> anyhow::Result<Vm> {
        Self::boot_with(name, &["--vcpus", "2", "--no-monitor"])
    }

    /// The same, with the monitor that `dvisor run` starts.
    pub fn boot_monitored(name: &str) -> anyhow::Result<Vm> {
        Self::boot_with(name, &["--vcpus", "2"])
    }

    /// `dvisor run --name NAME EXTRA...` (with its monitor unless EXTRA
    /// says --no-monitor), up to the shell prompt.
    pub fn boot_with(name: &str, extra: &[&str]) -> anyhow::Result<Vm> {
        let mut args = vec!["run", "--name", name];
        args.extend_from_slice(extra);
        let mut vm = Self::start(&args)?;
        vm.wait_line(|l| l.contains("guest# "))?;
        Ok(vm)
    }

    /// `dvisor ARGS` as a child whose stdout is a VM's console (`run`,
    /// `clone`); returns at once.
    pub fn start(args: &[&str]) -> anyhow::Result<Vm> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting dvisor {}", args.first().unwrap_or(&"")))?;
        let out = child.stdout.take().context("no stdout")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let (tx, lines) = mpsc::channel();
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        // Always drain the console so the guest never blocks on it.
        let kept = tail.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let mut t = kept.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == TAIL {
                    t.pop_front();
                }
                t.push_back(l.clone());
                drop(t);
                let _ = tx.send(l);
            }
        });
        Ok(Vm { child, stdin, lines, tail })
    }

    /// Waits for a console line matching `pred`; returns it.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        self.wait_line_within(STEP, pred)
    }

    /// The same, giving up after `limit`.
    pub fn wait_line_within(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Ok(l),
                Ok(_) => {}
                Err(_) => bail!("the guest console ended or stalled"),
            }
        }
    }

    /// Types a command at the guest shell and returns how long until the
    /// guest printed `marker`, as the host sees it.
    pub fn time_command(&mut self, cmd: &str, marker: &str) -> anyhow::Result<Duration> {
        while self.lines.try_recv().is_ok() {}
        let t = Instant::now();
        writeln!(self.stdin, "{cmd}").context("typing into the guest")?;
        self.stdin.flush()?;
        self.wait_line(|l| l.contains(marker))?;
        Ok(t.elapsed())
    }

    /// The console's last lines (at most 40).
    pub fn tail(&self) -> Vec<String> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Types a line at the guest's serial shell.
    pub fn type_line(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}").context("typing into the guest")?;
        Ok(self.stdin.flush()?)
    }

    /// Ends the child (SIGTERM: the VM stops and its monitor with it) and
    /// reaps it; a child that already ended is only reaped.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A VM is never left behind, whatever path the caller leaves by.
impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
