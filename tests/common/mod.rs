//! Shared by the integration tests: the built `dvisor`, the default image,
//! and a console session with a guest that tests can wait on and type into.
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Generous safety net for one guest step under TCG; never the thing tested.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// The default command line with the demo service beating every 100 ms
/// (tests wait for beats; the default, once a second, is for people), plus
/// `extra`.
pub fn cmdline(extra: &str) -> String {
    format!("{} {extra}", dvisor_images::fast_beat_cmdline()).trim_end().to_string()
}

pub fn dvisor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dvisor"))
}

/// Builds the default guest image once per test binary (cached on disk).
pub fn ensure_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = dvisor().args(["image", "build"]).output().expect("run dvisor image build");
        assert!(
            out.status.success(),
            "dvisor image build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

#[derive(Default)]
struct Shared {
    lines: Vec<String>,
    partial: String,
    closed: bool,
}

/// A running `dvisor run` whose console we read line by line.
pub struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: std::thread::JoinHandle<()>,
    /// The `--name` (or clone `--as`) the VM was started with, for the
    /// register dump of a failing test.
    vm: Option<String>,
}

impl Console {
    pub fn start(args: &[&str]) -> Console {
        Console::start_cmd("run", args)
    }

    /// A console command other than `run` (e.g. `clone`).
    pub fn start_cmd(cmd: &str, args: &[&str]) -> Console {
        let mut child = dvisor()
            .arg(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dvisor run");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr_pipe = child.stderr.take().expect("stderr");
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let s2 = shared.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = r.read_until(b'\n', &mut buf).unwrap_or(0);
                let (m, cv) = &*s2;
                let mut g = m.lock().unwrap();
                if n == 0 {
                    g.closed = true;
                    cv.notify_all();
                    return;
                }
                let text = String::from_utf8_lossy(&buf).replace('\r', "");
                if text.ends_with('\n') {
                    let line = std::mem::take(&mut g.partial) + text.trim_end_matches('\n');
                    g.lines.push(line);
                } else {
                    g.partial.push_str(&text);
                }
                cv.notify_all();
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e2 = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr_pipe.read_to_string(&mut s);
            if std::env::var_os("DVISOR_IN_CARRIER").is_some() && s.contains(GUEST_CRASH) {
                GUEST_TRIPLE_FAULTED.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            e2.lock().unwrap().push_str(&s);
        });
        let vm = args.windows(2).find(|w| w[0] == "--name" || w[0] == "--as").map(|w| w[1].to_string());
        Console { stdin: child.stdin.take(), child, shared, stderr, stderr_reader, vm }
    }

    /// Waits until `found` answers from the console seen so far. Panics
    /// with the console tail on timeout or when the VMM's output ends.
    fn wait_until<T>(&self, what: &str, found: impl Fn(&Shared) -> Option<T>) -> T {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(v) = found(&g) {
                return v;
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                let why = if g.closed { "console closed" } else { "timed out" };
                let tail: Vec<_> = g.lines.iter().rev().take(40).rev().cloned().collect();
                drop(g);
                panic!(
                    "{why} waiting for {what}\n--- console tail ---\n{}\n--- stderr ---\n{}",
                    tail.join("\n"),
                    self.stderr()
                );
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Waits for a line (after line index `from`) that satisfies `pred`;
    /// returns its index.
    pub fn wait_for(&self, from: usize, what: &str, pred: impl Fn(&str) -> bool) -> usize {
        self.wait_until(what, |g| g.lines.iter().skip(from).position(|l| pred(l)).map(|i| from + i))
    }

    /// Waits until the guest shell has printed its prompt (after line
    /// `from`), so typed input reaches the shell rather than being flushed
    /// while it sets up its terminal.
    pub fn wait_prompt(&self, from: usize, prompt: &str) {
        // The heartbeat keeps printing, so the prompt soon ends up at the
        // start of a full line rather than staying the last one.
        self.wait_until(&format!("the shell prompt {prompt:?}"), |g| {
            (g.partial.contains(prompt) || g.lines.iter().skip(from).any(|l| l.contains(prompt))).then_some(())
        })
    }

    pub fn line_count(&self) -> usize {
        self.shared.0.lock().unwrap().lines.len()
    }

    pub fn lines(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().lines.clone()
    }

    /// Types a command at the guest's console shell.
    pub fn type_line(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Kills `dvisor run` with SIGKILL (no cleanup of any kind) and waits
    /// for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether `dvisor run` is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the VMM to exit on its own.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader threads drain.
                std::thread::sleep(Duration::from_millis(200));
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("dvisor did not exit\n--- stderr ---\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Console {
    /// Prints what the guest and the VMM said last (console tail, the
    /// VMM's stderr so far) and, while the VMM runs, where its vCPUs are:
    /// for a test that failed on something other than the console (a CLI
    /// call, an assertion, a request over the network).
    pub fn report(&mut self) {
        // A guest that hangs shows where its vCPUs are, while it still
        // runs (a stuck vCPU names the culprit of a lockup on another).
        if let (Ok(None), Some(vm)) = (self.child.try_wait(), &self.vm) {
            dump_vcpus(vm);
        }
        let tail: Vec<_> = {
            let g = self.shared.0.lock().unwrap();
            g.lines.iter().rev().take(40).rev().cloned().collect()
        };
        eprintln!("--- console tail ---\n{}\n--- dvisor run stderr ---\n{}", tail.join("\n"), self.stderr());
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // All of stderr: the VMM's last words come at its exit.
            if let (Ok(None), Some(vm)) = (self.child.try_wait(), &self.vm) {
                dump_vcpus(vm);
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while !self.stderr_reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            // The VMM has ended: this prints no vCPUs again.
            self.report();
            let stderr = self.stderr();
            if stderr.contains(GUEST_CRASH) || stderr.contains(CARRIER_LOCKUP) {
                CARRIER_FAILED.set(true);
            }
            if std::env::var_os("DVISOR_IN_CARRIER").is_some() && stderr.contains(GUEST_CRASH) {
                // See rerun_in_carrier: the host side decides on a rerun.
                eprintln!("NOTE: the guest crashed under the carrier's nested KVM");
                std::process::exit(GUEST_CRASHED_IN_CARRIER);
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Prints each vCPU's RIP, RSP and the kernel symbol at its RIP, three
/// times apart (a vCPU whose RIP never moves is stuck, in the guest or in
/// the VMM). Each call is bounded: a VMM stuck for good does not answer.
fn dump_vcpus(vm: &str) {
    let bounded = |args: &[&str]| -> Option<String> {
        let mut child = dvisor().args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut out = String::new();
        child.stdout.take()?.read_to_string(&mut out).ok()?;
        Some(out)
    };
    for round in 0..3 {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let Some(regs) = bounded(&["regs", "--vm", vm, "--json"]) else {
            eprintln!("--- vCPUs: `dvisor regs --vm {vm}` did not answer within 10 s");
            return;
        };
        let regs: serde_json::Value = serde_json::from_str(&regs).unwrap_or_default();
        for v in regs.as_array().into_iter().flatten() {
            let rip = v["regs"]["rip"].as_u64().unwrap_or(0);
            let sym = bounded(&["ksym", "--vm", vm, &format!("{rip:#x}")]).unwrap_or_default();
            eprintln!(
                "--- vCPU {} (look {round}): rip {rip:#x} rsp {:#x} rflags {:#x}: {}",
                v["vcpu"],
                v["regs"]["rsp"].as_u64().unwrap_or(0),
                v["regs"]["rflags"].as_u64().unwrap_or(0),
                sym.trim()
            );
        }
    }
}

/// Parses "heartbeat <counter> <message>".
pub fn heartbeat(line: &str) -> Option<(u64, String)> {
    let rest = &line[line.find("heartbeat ")? + "heartbeat ".len()..];
    let mut it = rest.split_whitespace();
    let n = it.next()?.parse().ok()?;
    Some((n, it.next().unwrap_or("").to_string()))
}

/// What the VMM says when the guest kernel crashed hard.
const GUEST_CRASH: &str = "triple fault (KVM_EXIT_SHUTDOWN)";
/// Exit status of a test run inside the carrier whose guest crashed so.
const GUEST_CRASHED_IN_CARRIER: i32 = 3;
/// Reruns of a test whose carrier or guest died under it. Three: the
/// patch test's 100 apply/revert cycles met the guest's triple fault in
/// about one run of three (docs/carrier.md), twice in a row once.
const RERUNS: u32 = 3;
/// What `dvisor run` and `dvisor carrier` say when the carrier's own
/// kernel locked up and they stopped it.
const CARRIER_LOCKUP: &str = "the carrier's kernel is locked up";

thread_local! {
    /// Set by a Console dropped in a panic whose VMM or carrier died of
    /// the carrier's own faults (see `carrier_reruns`).
    static CARRIER_FAILED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `test`, a test that boots its guest with `dvisor run` on this host
/// (through the carrier when there is no hardware KVM), again when it
/// failed because the carrier did: the carrier's kernel locked up, or the
/// guest triple-faulted under the carrier's nested KVM (docs/carrier.md).
/// At most RERUNS times, and says so. Any other failure, and any failure
/// on a host with hardware KVM, is the test's own.
pub fn carrier_reruns<T>(test_name: &str, test: impl Fn() -> T) -> T {
    let mut rerun = 0;
    loop {
        CARRIER_FAILED.set(false);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&test)) {
            Ok(v) => return v,
            Err(e) => {
                let carrier = CARRIER_FAILED.get() && !dvisor_images::carrier::host_has_hardware_kvm();
                if !carrier || rerun == RERUNS {
                    std::panic::resume_unwind(e);
                }
                rerun += 1;
                eprintln!("NOTE: the carrier failed under {test_name}; rerun {rerun} of {RERUNS}");
            }
        }
    }
}

/// Tests that need several host processes around one VM (monitor, CLI,
/// tap device) run whole inside the carrier when this host has no hardware
/// KVM: the test binary re-runs itself there, filtered to `test_name`.
/// Returns true when it did (the caller then returns: the inner run made
/// the assertions).
pub fn rerun_in_carrier(test_name: &str) -> bool {
    if !needs_carrier() {
        return false;
    }
    // --include-ignored: an opt-in test runs inside as it was asked for
    // outside.
    let args = ["--exact", test_name, "--include-ignored", "--nocapture", "--test-threads=1"];
    let st = in_carrier(test_name, &args, false).status;
    assert!(st.success(), "{test_name} failed inside the carrier ({st})");
    true
}

/// Whether tests that boot guests must run inside the carrier here.
fn needs_carrier() -> bool {
    std::env::var_os("DVISOR_IN_CARRIER").is_none() && !dvisor_images::carrier::host_has_hardware_kvm()
}

/// Runs this test binary inside the carrier with `args`, again when the
/// carrier or its guest died under it (see below); `capture` keeps stdout.
fn in_carrier(what: &str, args: &[&str], capture: bool) -> std::process::Output {
    ensure_image();
    // Build the kernel profile natively: inside the TCG carrier it would
    // take the monitor minutes.
    if let Ok(image) = dvisor_images::current_guest_image() {
        let _ = dvisor_monitor::profile::KernelProfile::load_or_build(&image.vmlinux, &dvisor_images::cache_root());
    }
    // One carrier at a time per test binary: two nested guests on TCG
    // starve each other (and the carrier's KVM then misbehaves).
    static ONE_CARRIER: Mutex<()> = Mutex::new(());
    let _one = ONE_CARRIER.lock().unwrap_or_else(|p| p.into_inner());
    let exe = std::env::current_exe().expect("test executable");
    let run = || {
        let mut child = dvisor()
            .args(["carrier", "--mem", "1536", "--"])
            .arg(&exe)
            .args(args)
            .env("DVISOR_IN_CARRIER", "1")
            .stdout(if capture { Stdio::piped() } else { Stdio::inherit() })
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the test inside the carrier");
        // Kept for the caller and shown as it comes: a long suite shows
        // its progress.
        let mut stdout = Vec::new();
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).split(b'\n') {
                let line = line.unwrap_or_default();
                // Straight to fd 2: libtest captures eprintln! of a test.
                let _ = writeln!(std::io::stderr(), "carrier| {}", String::from_utf8_lossy(&line));
                stdout.extend_from_slice(&line);
                stdout.push(b'\n');
            }
        }
        let status = child.wait().expect("wait for the carrier");
        std::process::Output { status, stdout, stderr: Vec::new() }
    };
    let mut out = run();
    // Status 2 is `dvisor carrier` itself failing: the carrier VM died
    // without reporting (seen: a soft lockup of its KVM, nested on TCG).
    // Status 3 is the guest dying of a triple fault inside the carrier,
    // which its nested SVM on TCG does now and then with no patch or VMI
    // write involved (docs/carrier.md). Either reruns the test, at most
    // RERUNS times, and says so; a test that fails otherwise (101) is never
    // retried.
    for rerun in 1..=RERUNS {
        if !matches!(out.status.code(), Some(2) | Some(GUEST_CRASHED_IN_CARRIER)) {
            break;
        }
        let why = if out.status.code() == Some(2) { "the carrier VM died" } else { "the guest triple-faulted inside the carrier" };
        // Straight to fd 2: libtest captures eprintln! of a test.
        let _ = writeln!(std::io::stderr(), "NOTE: {why} under {what}; rerun {rerun} of {RERUNS}");
        out = run();
    }
    out
}

/// For test binaries whose tests share one booted guest (each named test
/// checks one thing, so a failure hides nothing else): on a host without
/// hardware KVM, the first of its tests runs the whole binary inside one
/// carrier, one test at a time, and every test then reports its own result
/// from that run. Returns true when the caller's result came from there.
pub fn suite_in_carrier(test_name: &str) -> bool {
    if !needs_carrier() {
        return false;
    }
    static SUITE: OnceLock<(String, ExitStatus)> = OnceLock::new();
    let (out, status) = SUITE.get_or_init(|| {
        let out = in_carrier("this test binary", &["--test-threads=1"], true);
        (String::from_utf8_lossy(&out.stdout).into_owned(), out.status)
    });
    let verdict = out.lines().find_map(|l| {
        let rest = l.strip_prefix("test ")?.strip_prefix(test_name)?.strip_prefix(" ... ")?;
        Some(rest.trim().to_string())
    });
    match verdict.as_deref() {
        Some("ok") => true,
        Some(v) => {
            // libtest prints a failed test's captured output as a section.
            let head = format!("---- {test_name} stdout ----");
            let section: String = out
                .split(&head)
                .nth(1)
                .map(|rest| rest.split("\n---- ").next().unwrap_or(rest).split("\nfailures:").next().unwrap_or(rest).to_string())
                .unwrap_or_default();
            panic!("{test_name} inside the carrier: {v}\n{section}");
        }
        None => panic!("{test_name} did not run inside the carrier ({status}); its output is above"),
    }
}

/// The guest that a test binary's tests share: the one in `slot` if
/// `usable` says it still is (a test before may have failed with it in any
/// state), else a new one from `boot`. The tests take turns on the lock.
pub fn shared<T>(
    slot: &'static Mutex<Option<T>>,
    usable: impl Fn(&mut T) -> bool,
    boot: impl FnOnce() -> T,
) -> std::sync::MutexGuard<'static, Option<T>> {
    let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
    if !g.as_mut().is_some_and(usable) {
        *g = None;
        *g = Some(boot());
    }
    enter_test_netns();
    g
}

/// Set when a console's VMM, inside the carrier, ended with [`GUEST_CRASH`].
static GUEST_TRIPLE_FAULTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One named test of a suite: its result from the suite's carrier run
/// (`suite_in_carrier`), or `check` run here on the shared guest that
/// `guest` hands out. Inside the carrier, a check that failed because the
/// shared guest died of the carrier's triple fault (docs/carrier.md) runs
/// again on a new guest, at most twice, and says so; any other failure
/// is the test's own.
pub fn in_suite<T: AsMut<Console> + 'static>(
    test: &str,
    guest: impl Fn() -> std::sync::MutexGuard<'static, Option<T>>,
    check: impl Fn(&mut T),
) {
    use std::sync::atomic::Ordering;
    if suite_in_carrier(test) {
        return;
    }
    for rerun in 1..=3 {
        GUEST_TRIPLE_FAULTED.store(false, Ordering::SeqCst);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut g = guest();
            let t = g.as_mut().expect("the shared guest");
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(t)));
            if let Err(e) = r {
                // The shared guest outlives the test: say what it said.
                t.as_mut().report();
                std::panic::resume_unwind(e);
            }
        }));
        let Err(e) = r else { return };
        // The VMM's stderr closes as it exits: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !GUEST_TRIPLE_FAULTED.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !GUEST_TRIPLE_FAULTED.load(Ordering::SeqCst) || rerun == 3 {
            std::panic::resume_unwind(e);
        }
        let _ = writeln!(std::io::stderr(), "NOTE: the suite's guest triple-faulted inside the carrier under {test}; rerun {rerun} of 2 on a new guest");
    }
}

/// The suite's last test (by name: libtest runs them in name order, one
/// at a time), which ends the shared guest: the guest, taken out of the
/// suite's slot; None when the result came from the carrier run.
pub fn last_in_suite<T: 'static>(
    test: &str,
    guest: impl FnOnce() -> std::sync::MutexGuard<'static, Option<T>>,
) -> Option<T> {
    if suite_in_carrier(test) {
        return None;
    }
    guest().take()
}

/// Waits until the monitor of VM `name` answers. Fails at once when the
/// VMM exits first (a guest that crashed at boot), instead of at the
/// timeout; the console tail and the VMM's stderr then say why.
pub fn wait_monitor(c: &mut Console, name: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !dvisor_out(&["status", "--vm", name]).0 {
        assert!(c.running(), "the VMM exited before the monitor of {name} answered");
        assert!(Instant::now() < deadline, "the monitor of {name} never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `dvisor ARGS` and returns (exit success, stdout, stderr).
pub fn dvisor_out(args: &[&str]) -> (bool, String, String) {
    let out = dvisor().args(args).output().expect("run dvisor");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `dvisor ARGS --json`, asserting success, and parses stdout.
pub fn dvisor_json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = dvisor_out(&all);
    if !ok {
        // The monitor's own log says why it went away, if it did.
        let log = all
            .iter()
            .position(|a| *a == "--vm")
            .and_then(|i| all.get(i + 1))
            .map(|vm| dvisor_monitor::paths::vm_dir(vm).join("monitor.log"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        panic!("dvisor {} failed:\n{err}\n--- monitor.log ---\n{log}", all.join(" "));
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("dvisor {} printed non-JSON ({e}):\n{out}", all.join(" ")))
}

/// The tap device, host address and guest address of tests with a network.
pub const TAP: &str = "dvtap0";
pub const HOST_IP: &str = "10.0.2.1/24";
pub const GUEST_IP: &str = "10.0.2.15";

pub fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().expect("run sh");
    assert!(st.success(), "`{cmd}` failed");
}

/// Moves this test thread (and what it spawns) into a network namespace
/// of its own with tap device `tap` at `host_ip`: the tap and its address
/// vanish with the namespace. Needs root (the carrier runs tests as root).
pub fn own_netns_with_tap(tap: &str, host_ip: &str) {
    // SAFETY: unshare affects only this thread (and what it spawns).
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET) needs root");
    sh(&format!("ip link set lo up && ip tuntap add dev {tap} mode tap && ip addr add {host_ip} dev {tap} && ip link set {tap} up"));
    let ns = std::fs::File::open("/proc/thread-self/ns/net").expect("open this thread's network namespace");
    let _ = TEST_NETNS.set(ns);
}

/// The namespace `own_netns_with_tap` made: tests that share a guest run
/// on threads of their own, which start in the process's namespace.
static TEST_NETNS: OnceLock<std::fs::File> = OnceLock::new();

/// Moves this thread into the namespace `own_netns_with_tap` made (if it
/// made one), where the guest's network is reachable.
pub fn enter_test_netns() {
    if let Some(ns) = TEST_NETNS.get() {
        use std::os::fd::AsRawFd;
        // SAFETY: a namespace fd we opened; setns affects this thread only.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns into the test's network namespace");
    }
}

/// One request to the demo service at `addr`; its whole answer.
pub fn try_fetch(addr: &str, timeout: Duration) -> Result<String, String> {
    use std::net::TcpStream;
    let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, timeout).map_err(|e| format!("connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let _ = s.write_all(b"GET\n");
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| format!("reading from {addr}: {e}"))?;
    Ok(answer)
}

pub fn fetch(addr: &str) -> String {
    try_fetch(addr, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

/// Types `cmd` and returns the lines it printed, up to a marker the guest
/// shell computes (so the echoed command line never matches).
pub fn run_in_guest(c: &mut Console, cmd: &str, tag: &str) -> Vec<String> {
    let mark = c.line_count();
    c.type_line(&format!("{cmd}; echo {tag}-END-$((40+2))"));
    let end = c.wait_for(mark, &format!("the end of `{cmd}`"), |l| l.contains(&format!("{tag}-END-42")));
    let lines = c.lines()[mark..end].iter().filter(|l| heartbeat(l).is_none()).cloned().collect();
    c.wait_prompt(end, "guest# ");
    lines
}

pub fn service_pid(c: &Console) -> u32 {
    let l = c.lines().into_iter().find(|l| l.contains("service started pid=")).expect("service line");
    l.rsplit('=').next().unwrap().trim().parse().unwrap()
}

/// `dvisor ps` on VM `name` equals the guest's own `ps` (typed at its
/// console), taken with the VM paused right after.
pub fn ps_matches(c: &mut Console, name: &str) {
    let guest = run_in_guest(c, "ps -o pid,ppid,comm", "PS");
    // Right after the guest's ps, freeze the VM and walk its task list.
    dvisor_json(&["pause", "--vm", name]);
    // --consistent also runs the walk with the translation cache.
    let ours = dvisor_json(&["ps", "--vm", name, "--consistent"]);
    let paused = dvisor_json(&["status", "--vm", name]);
    assert_eq!(paused["vm"]["state"], "paused", "--consistent resumed a VM it had not paused");
    dvisor_json(&["resume", "--vm", name]);
    let guest: std::collections::BTreeMap<u64, (u64, String)> = guest
        .iter()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let pid = f.next()?.parse().ok()?;
            let ppid = f.next()?.parse().ok()?;
            Some((pid, (ppid, f.next()?.to_string())))
        })
        // The ps process itself has exited by now.
        .filter(|(_, (_, comm))| comm != "ps")
        .collect();
    let ours: std::collections::BTreeMap<u64, (u64, String)> = ours
        .as_array()
        .unwrap()
        .iter()
        // busybox ps lists /proc, which has no pid 0.
        .filter(|p| p["pid"] != 0)
        .map(|p| (p["pid"].as_u64().unwrap(), (p["ppid"].as_u64().unwrap(), p["comm"].as_str().unwrap().to_string())))
        .collect();
    assert!(guest.len() > 10, "guest ps printed too little: {guest:?}");
    // Linux shows a kworker with its workqueue appended, '+' while it runs
    // a work item and '-' after ("kworker/0:2+events", "kworker/1:1-mm_"):
    // the task's comm, which is what VMI reads, is the part before.
    let same_comm = |guest: &str, ours: &str| {
        guest == ours
            || (ours.starts_with("kworker/")
                && guest.strip_prefix(ours).is_some_and(|rest| rest.starts_with('+') || rest.starts_with('-')))
    };
    let differ: Vec<_> = guest
        .keys()
        .chain(ours.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|pid| match (guest.get(pid), ours.get(pid)) {
            (Some((gp, gc)), Some((op, oc))) => gp != op || !same_comm(gc, oc),
            _ => true,
        })
        .map(|pid| (pid, guest.get(pid), ours.get(pid)))
        .collect();
    assert!(differ.is_empty(), "dvisor ps differs from the guest's ps (pid, guest's, dvisor's): {differ:?}");
}

pub fn symbol_addr(elf: &std::path::Path, sym: &str) -> u64 {
    let out = std::process::Command::new("nm").arg(elf).output().expect("run nm (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.ends_with(&format!(" {sym}"))).unwrap_or_else(|| panic!("no {sym} in {}", elf.display()));
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

