//! Live patching of running guest processes from outside the VM, one
//! named test per property on a guest they share (each starts and ends
//! with no patch applied): bad patches are refused before anything in the
//! process changes; the demo service switches from v1 to v2 with the same
//! pid, a counter that keeps counting and clients served throughout;
//! revert brings v1 back byte for byte; the free map keeps the patch
//! memory flat over apply/revert cycles; a restarted monitor still knows
//! the applied patches; a patch calls into the program and into itself;
//! replaced function bodies hold later patches; and safe mode waits for a
//! thread to leave the function being replaced.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Instant;

use common::{dvisor_json, dvisor_out, heartbeat, Console};

/// Apply/revert cycles of the free-map check: the 100 (about 50 s
/// in the carrier); DVISOR_PATCH_CYCLES sets another count.
fn cycles() -> u32 {
    std::env::var("DVISOR_PATCH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(100)
}
const FLAGS: &[&str] = &["-c", "-O2", "-fpic", "-fno-asynchronous-unwind-tables", "-ffunction-sections", "-fdata-sections"];

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-images/patches")
}

fn compile(src: &Path, out: &Path) {
    let st = Command::new("gcc").args(FLAGS).arg(src).arg("-o").arg(out).status().expect("run gcc");
    assert!(st.success(), "gcc {}", src.display());
}

/// Where the demo service has `name`, and its size, from the binary's
/// symbol table (`nm -S`): the program is rebuilt with the image, so its
/// addresses are not fixed.
fn symbol(name: &str) -> (u64, u64) {
    let binary = dvisor_json(&["image", "path"])["service_binary"].as_str().expect("service_binary").to_string();
    let out = Command::new("nm").args(["-S", &binary]).output().expect("run nm");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.split_whitespace().nth(3) == Some(name)).unwrap_or_else(|| panic!("no {name} in {binary}"));
    let f: Vec<u64> = line.split_whitespace().take(2).map(|h| u64::from_str_radix(h, 16).unwrap()).collect();
    (f[0], f[1])
}

/// The code page that holds `get_message` and the service's other patch
/// targets (`heartbeat`, `reply_counter`, `handle_request`): every byte of
/// it is what a refused patch must leave exactly as it was, and a revert
/// must bring back. (Pages the service never touched are not mapped yet,
/// so whole mappings cannot be compared.)
fn targets_page() -> String {
    let page = symbol("get_message").0 & !0xfff;
    assert_eq!(symbol("handle_request").0 & !0xfff, page, "the targets moved apart");
    format!("{page:#x}")
}

fn service_pid(c: &Console) -> u32 {
    let l = c.lines().into_iter().find(|l| l.contains("service started pid=")).expect("service line");
    l.rsplit('=').next().unwrap().trim().parse().unwrap()
}

fn last_beat(c: &Console) -> (u64, String) {
    c.lines().iter().rev().find_map(|l| heartbeat(l)).expect("a heartbeat")
}

/// Boots a 2-vCPU guest named `name` with its monitor; returns once the
/// shell prompt is there and the monitor answers.
fn boot(name: &str, extra: &[&str]) -> Console {
    let mut args = vec!["--vcpus", "2", "--name", name];
    args.extend_from_slice(extra);
    let mut c = Console::start(&args);
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");
    common::wait_monitor(&mut c, name);
    c
}

/// A new request handler frees the old one's body (164 bytes behind the
/// jump); the next code-only patch (v2) goes there instead of into mapped
/// space; the handler cannot be reverted while v2 lives in its old body;
/// reverting both brings back the original code byte for byte.
fn replaced_bodies_are_reused(name: &str, pid: &str, dir: &Path) {
    let obj = |n: &str| {
        let o = dir.join(format!("{n}.o"));
        compile(&samples().join(format!("{n}.c")), &o);
        (o.to_str().unwrap().to_string(), samples().join(format!("{n}.cmd")).to_str().unwrap().to_string())
    };
    let apply = |(o, cmd): &(String, String)| {
        dvisor_json(&["patch", "apply", "--vm", name, "--pid", pid, "--object", o, "--commands", cmd])
    };
    let rwx = || dvisor_json(&["maps", "--vm", name, pid]).as_array().unwrap().iter().filter(|v| v["perms"] == "rwxp").count();
    let addr = common::GUEST_IP.to_string() + ":8080";
    let (handler_at, handler_len) = symbol("handle_request");
    let (handler_at, handler_len) = (format!("{handler_at:#x}"), handler_len.to_string());
    let handler_code = dvisor_json(&["mem", "--vm", name, pid, &handler_at, &handler_len]);

    let handler = apply(&obj("handler"));
    let answer = common::fetch(&addr);
    assert!(answer.contains("handler=v2"), "the new handler did not answer: {answer:?}");
    let body = &handler["bodies"][0];
    let (start, len) = (body["addr"].as_u64().unwrap(), body["original"].as_str().unwrap().len() as u64 / 2);
    assert!(len >= 100, "handle_request's body: {handler}");
    let areas = rwx();

    let v2 = apply(&obj("v2"));
    let at = v2["space"].as_u64().unwrap();
    assert!(at >= start && at < start + len, "v2 at {at:#x}, not in the body {start:#x}+{len:#x}");
    assert_eq!(rwx(), areas, "v2 mapped new space instead of using the body");
    eprintln!("v2 placed at {at:#x}, in handle_request's replaced body {start:#x}+{len:#x}");

    let (ok, _, err) = dvisor_out(&["patch", "revert", "--vm", name, &handler["id"].to_string()]);
    assert!(!ok && err.contains("revert that first"), "the handler was reverted under v2: {err}");
    dvisor_json(&["patch", "revert", "--vm", name, &v2["id"].to_string()]);
    dvisor_json(&["patch", "revert", "--vm", name, &handler["id"].to_string()]);
    assert_eq!(dvisor_json(&["mem", "--vm", name, pid, &handler_at, &handler_len]), handler_code, "handle_request not restored");
    let answer = common::fetch(&addr);
    assert!(answer.starts_with("counter=") && !answer.contains("handler="), "{answer:?}");
}

/// The callback sample's get_message() calls the program's reply_counter()
/// (counter + 1, its off-by-one) and the patch's own parity(), so each
/// heartbeat N says "even" or "odd" for N + 1. A program built with IPA-RA
/// would die here: heartbeat() keeps its printf format in %rdi across
/// get_message(), and the call to parity() clobbers it (docs/patching.md).
fn calls_into_the_program_and_itself(c: &Console, name: &str, pid: &str, dir: &Path) {
    let o = dir.join("callback.o");
    compile(&samples().join("callback.c"), &o);
    let cmd = samples().join("callback.cmd");
    let mark = c.line_count();
    let applied = dvisor_json(&[
        "patch", "apply", "--vm", name, "--pid", pid,
        "--object", o.to_str().unwrap(), "--commands", cmd.to_str().unwrap(),
    ]);
    let parity = |l: &str| heartbeat(l).filter(|(_, m)| m == "even" || m == "odd");
    let first = c.wait_for(mark, "an even/odd heartbeat", |l| parity(l).is_some());
    let (n0, _) = parity(&c.lines()[first]).unwrap();
    c.wait_for(first, "four even/odd heartbeats", |l| parity(l).is_some_and(|(n, _)| n >= n0 + 3));
    let beats: Vec<(u64, String)> = c.lines()[first..].iter().filter_map(|l| heartbeat(l)).collect();
    for (n, m) in &beats {
        assert_eq!(m, ["even", "odd"][((n + 1) & 1) as usize], "heartbeat {n} with the callback patch: {beats:?}");
    }
    dvisor_json(&["patch", "revert", "--vm", name, &applied["id"].to_string()]);
    let mark = c.line_count();
    c.wait_for(mark, "a v1 heartbeat after the callback's revert", |l| heartbeat(l).is_some_and(|(_, m)| m == "v1"));
}

/// The guest's own md5sum of `path`, typed at its shell.
fn guest_md5(c: &mut Console, path: &str) -> String {
    let mark = c.line_count();
    c.type_line(&format!("md5sum {path}"));
    let i = c.wait_for(mark, "md5sum's answer", |l| l.trim_end().ends_with(&format!("  {path}")) && !l.contains("md5sum "));
    c.lines()[i].split_whitespace().next().unwrap().to_string()
}

/// Steady requests to the service from the host, one after another, until
/// stopped: how many were answered, and every failure.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl Load {
    fn start() -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let addr = format!("{}:8080", common::GUEST_IP);
            let (mut ok, mut failed) = (0, Vec::new());
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                match common::try_fetch(&addr, std::time::Duration::from_secs(30)) {
                    Ok(a) if a.starts_with("counter=") => ok += 1,
                    Ok(a) => failed.push(format!("odd answer {a:?}")),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        });
        Load { stop, thread }
    }

    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The guest the tests share (2 vCPUs, on the tap, the service at v1),
/// the work directory for compiled patches, and a monitor a test started
/// in place of the one `dvisor run` started.
struct Guest {
    c: Console,
    name: String,
    pid: u32,
    dir: PathBuf,
    monitor: Option<Child>,
}

impl AsMut<Console> for Guest {
    fn as_mut(&mut self) -> &mut Console {
        &mut self.c
    }
}

impl Guest {
    fn p(&self) -> String {
        self.pid.to_string()
    }

    /// Compiles the sample patch `n` (n.c, n.cmd); returns (object, commands).
    fn sample(&self, n: &str) -> (String, String) {
        let o = self.dir.join(format!("{n}.o"));
        compile(&samples().join(format!("{n}.c")), &o);
        (o.to_str().unwrap().to_string(), samples().join(format!("{n}.cmd")).to_str().unwrap().to_string())
    }

    fn apply(&self, (obj, cmd): &(String, String)) -> serde_json::Value {
        dvisor_json(&["patch", "apply", "--vm", &self.name, "--pid", &self.p(), "--object", obj, "--commands", cmd])
    }

    fn revert(&self, id: &serde_json::Value) {
        dvisor_json(&["patch", "revert", "--vm", &self.name, &id.to_string()]);
    }

    fn patches(&self) -> Vec<serde_json::Value> {
        dvisor_json(&["patch", "list", "--vm", &self.name]).as_array().unwrap().clone()
    }

    /// The service's patch-target code page, as `dvisor mem` reads it.
    fn code(&self) -> serde_json::Value {
        dvisor_json(&["mem", "--vm", &self.name, &self.p(), &targets_page(), "4096"])
    }

    fn maps(&self) -> Vec<serde_json::Value> {
        dvisor_json(&["maps", "--vm", &self.name, &self.p()]).as_array().unwrap().clone()
    }
}

static GUEST: Mutex<Option<Guest>> = Mutex::new(None);

/// The shared guest, running and unpatched: a test that failed half-way
/// may have left it paused or with patches applied (reverted here, newest
/// first).
fn guest() -> std::sync::MutexGuard<'static, Option<Guest>> {
    let mut g = common::shared(&GUEST, |g| g.c.running(), || {
        common::own_netns_with_tap(common::TAP, common::HOST_IP);
        let name = format!("pt{}", std::process::id());
        let cmdline = common::cmdline(&format!("dvisor.ip={}/24", common::GUEST_IP));
        let c = boot(&name, &["--net", &format!("tap={}", common::TAP), "--cmdline", &cmdline]);
        let pid = service_pid(&c);
        let dir = std::env::temp_dir().join(format!("dvisor-patch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Guest { c, name, pid, dir, monitor: None }
    });
    let guest = g.as_mut().unwrap();
    if dvisor_json(&["status", "--vm", &guest.name])["vm"]["state"] == "paused" {
        dvisor_json(&["resume", "--vm", &guest.name]);
    }
    let mut left = guest.patches();
    left.sort_by_key(|p| std::cmp::Reverse(p["id"].as_u64()));
    for p in left {
        guest.revert(&p["id"]);
    }
    g
}

#[test]
fn bad_patches_are_refused_and_change_nothing() {
    common::in_suite("bad_patches_are_refused_and_change_nothing", guest, |g| {
        let (name, p, dir) = (&g.name, g.p(), &g.dir);
        let code_before = g.code();
        let maps_before = g.maps().len();
        let (v2, v2_cmd) = g.sample("v2");
        let garbage = dir.join("garbage.o");
        std::fs::write(&garbage, b"\x7fELF this is not a patch").unwrap();
        let unknown = dir.join("unknown.cmd");
        std::fs::write(&unknown, "J no_such_function patched_get_message\n").unwrap();
        let malformed = dir.join("malformed.cmd");
        std::fs::write(&malformed, "# ok\nX get_message patched_get_message\n").unwrap();
        let (garbage, unknown, malformed) =
            (garbage.to_str().unwrap(), unknown.to_str().unwrap(), malformed.to_str().unwrap());
        for (obj, cmd, expect) in
            [(garbage, v2_cmd.as_str(), "garbage.o"), (&v2, unknown, "no_such_function"), (&v2, malformed, "malformed.cmd:2")]
        {
            let (ok, _, err) = dvisor_out(&["patch", "apply", "--vm", name, "--pid", &p, "--object", obj, "--commands", cmd]);
            assert!(!ok, "a bad patch was accepted ({expect})");
            assert!(err.contains(expect), "error for {expect} should name it:\n{err}");
        }
        // A VM the operator paused stays paused and untouched.
        assert!(dvisor_out(&["pause", "--vm", name]).0);
        let (ok, _, err) = dvisor_out(&["patch", "apply", "--vm", name, "--pid", &p, "--object", &v2, "--commands", &v2_cmd]);
        assert!(!ok && err.contains("the VM is paused"), "a patch went into a paused VM: {err}");
        assert_eq!(dvisor_json(&["status", "--vm", name])["vm"]["state"], "paused");
        assert!(dvisor_out(&["resume", "--vm", name]).0);
        assert!(g.code() == code_before, "refused patches changed the service's code");
        assert_eq!(g.maps().len(), maps_before);
        assert!(g.patches().is_empty());
    });
}

/// v1 -> v2, same process, state kept, clients served throughout, and the
/// program file in the guest untouched (the patched code pages are the
/// process's own copies, not the file's page cache).
#[test]
fn v1_to_v2_keeps_pid_counter_and_clients() {
    common::in_suite("v1_to_v2_keeps_pid_counter_and_clients", guest, |g| {
        let v2 = g.sample("v2");
        let sum_before = guest_md5(&mut g.c, "/usr/bin/demo-service");
        let load = Load::start();
        let c = &g.c;
        let (before, msg) = last_beat(c);
        assert_eq!(msg, "v1");
        let mark = c.line_count();
        let applied = dvisor_json(&[
            "patch", "apply", "--vm", &g.name, "--comm", "demo-service", "--object", &v2.0, "--commands", &v2.1,
        ]);
        eprintln!("apply timing: {}", applied["timing"]);
        assert_eq!(applied["pid"].as_u64(), Some(u64::from(g.pid)));
        let first_v2 = c.wait_for(mark, "a v2 heartbeat", |l| heartbeat(l).is_some_and(|(_, m)| m == "v2"));
        c.wait_for(first_v2 + 1, "more v2 heartbeats", |l| heartbeat(l).is_some_and(|(_, m)| m == "v2"));
        let seq: Vec<(u64, String)> = c.lines().iter().filter_map(|l| heartbeat(l)).filter(|(n, _)| *n >= before).collect();
        assert!(seq.windows(2).all(|w| w[1].0 == w[0].0 + 1), "the counter skipped or restarted: {seq:?}");
        let procs = dvisor_json(&["ps", "--vm", &g.name]);
        assert!(
            procs.as_array().unwrap().iter().any(|q| q["pid"].as_u64() == Some(u64::from(g.pid)) && q["comm"] == "demo-service"),
            "the service is not the same process any more"
        );
        let list = g.patches();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["sites"][0]["target"], "get_message");
        // The load ran from before the apply until the service beat v2 twice.
        let (served, failed) = load.stop();
        eprintln!("requests around the v2 apply: {served} answered, {} failed", failed.len());
        assert!(failed.is_empty(), "requests failed while patching: {failed:?}");
        assert!(served >= 5, "the load barely ran ({served} requests)");
        assert_eq!(guest_md5(&mut g.c, "/usr/bin/demo-service"), sum_before, "patching the process changed the program file");
        g.revert(&applied["id"]);
    });
}

#[test]
fn revert_brings_v1_back_byte_for_byte() {
    common::in_suite("revert_brings_v1_back_byte_for_byte", guest, |g| {
        let code_before = g.code();
        let maps_before = g.maps().len();
        let applied = g.apply(&g.sample("v2"));
        let mark = g.c.line_count();
        g.c.wait_for(mark, "a v2 heartbeat", |l| heartbeat(l).is_some_and(|(_, m)| m == "v2"));
        assert!(g.code() != code_before, "v2 changed nothing in the service's code");
        g.revert(&applied["id"]);
        let mark = g.c.line_count();
        g.c.wait_for(mark, "a v1 heartbeat after revert", |l| heartbeat(l).is_some_and(|(_, m)| m == "v1"));
        assert!(g.code() == code_before, "revert left the service's code changed");
        assert_eq!(g.maps().len(), maps_before, "patch space not freed");
        assert!(g.patches().is_empty());
    });
}

/// A second patch applied and reverted many times (v2 in place) reuses
/// the space: the mapped patch memory never grows.
#[test]
fn free_map_keeps_patch_memory_flat() {
    common::in_suite("free_map_keeps_patch_memory_flat", guest, |g| {
        let v2 = g.apply(&g.sample("v2"));
        let fix = g.sample("fix");
        let patch_space = || -> u64 {
            g.maps()
                .iter()
                .filter(|v| v["perms"] == "rwxp" && v["name"] == "")
                .map(|v| v["end"].as_u64().unwrap() - v["start"].as_u64().unwrap())
                .sum()
        };
        let after_first = patch_space();
        assert!(after_first > 0, "no patch area mapped");
        let cycles_started = Instant::now();
        let n = cycles();
        for i in 0..n {
            let b = g.apply(&fix);
            g.revert(&b["id"]);
            if i % 10 == 0 {
                assert_eq!(patch_space(), after_first, "patch memory grew in cycle {i}");
            }
        }
        assert_eq!(patch_space(), after_first, "patch memory grew over {n} cycles");
        eprintln!("{n} apply/revert cycles in {:.1} s", cycles_started.elapsed().as_secs_f64());
        g.revert(&v2["id"]);
    });
}

#[test]
fn restarted_monitor_knows_the_applied_patches() {
    common::in_suite("restarted_monitor_knows_the_applied_patches", guest, |g| {
        let applied = g.apply(&g.sample("v2"));
        let old = dvisor_json(&["status", "--vm", &g.name])["monitor_pid"].as_u64().unwrap();
        let st = Command::new("kill").args(["-KILL", &old.to_string()]).status().unwrap();
        assert!(st.success());
        let monitor = common::dvisor()
            .args(["monitor", "--vm", &g.name])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        g.monitor = Some(monitor);
        let deadline = Instant::now() + common::STEP_TIMEOUT;
        while !dvisor_out(&["status", "--vm", &g.name]).0 {
            assert!(Instant::now() < deadline, "the new monitor never answered");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let list = g.patches();
        assert_eq!(list.len(), 1, "a restarted monitor lost the patch list: {list:?}");
        assert_eq!(list[0]["id"], applied["id"]);
        g.revert(&applied["id"]);
        let mark = g.c.line_count();
        g.c.wait_for(mark, "a v1 heartbeat after revert", |l| heartbeat(l).is_some_and(|(_, m)| m == "v1"));
    });
}

#[test]
fn a_patch_calls_into_the_program_and_itself() {
    common::in_suite("a_patch_calls_into_the_program_and_itself", guest, |g| {
        calls_into_the_program_and_itself(&g.c, &g.name, &g.p(), &g.dir);
    });
}

#[test]
fn replaced_bodies_hold_later_patches() {
    common::in_suite("replaced_bodies_hold_later_patches", guest, |g| {
        replaced_bodies_are_reused(&g.name, &g.p(), &g.dir);
    });
}

/// Last in name order (libtest runs them so, one at a time): it ends the
/// shared guest, and a monitor a test restarted leaves with the VMM.
#[test]
fn vmm_power_off_takes_the_monitor_along() {
    let Some(mut g) = common::last_in_suite("vmm_power_off_takes_the_monitor_along", guest) else { return };
    g.c.type_line("poweroff -f");
    assert!(g.c.wait_exit().success(), "{}", g.c.stderr());
    if let Some(mut m) = g.monitor.take() {
        assert!(m.wait().unwrap().success(), "the restarted monitor failed");
    }
    std::fs::remove_dir_all(&g.dir).unwrap();
}

/// spin-demo (a static-pie program in the image) holds its thread inside
/// spin_here(), then inside wait_here() (asleep, with a return address
/// into it on its stack), then lets go. Safe mode refuses a patch of the
/// function the thread is in, and applies it once the thread has left; the
/// patch resolves against the PIE's load base seen in the guest.
#[test]
fn safe_mode_waits_for_threads_to_leave() {
    common::in_suite("safe_mode_waits_for_threads_to_leave", guest, safe_mode_check);
}

fn safe_mode_check(g: &mut Guest) {
    let dir = std::env::temp_dir().join(format!("dvisor-spin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let patch = |name: &str, src: &str, cmd: &str| -> (String, String) {
        let (c_file, o_file, cmd_file) = (dir.join(format!("{name}.c")), dir.join(format!("{name}.o")), dir.join(format!("{name}.cmd")));
        std::fs::write(&c_file, src).unwrap();
        std::fs::write(&cmd_file, cmd).unwrap();
        compile(&c_file, &o_file);
        (o_file.to_str().unwrap().to_string(), cmd_file.to_str().unwrap().to_string())
    };
    let spin2 = patch("spin2", "const char *patched_spin_here(void) { return \"spin v2\"; }\n", "J spin_here patched_spin_here\n");
    let wait2 = patch("wait2", "void patched_wait_here(void) { }\n", "J wait_here patched_wait_here\n");

    let (c, name) = (&mut g.c, g.name.clone());
    // The program as the guest reads it (its page cache): system calls the
    // monitor injects at a spinning thread's RIP must not leave it changed
    // (they once left `syscall; jmp .` there for every later run).
    let md5_before = guest_md5(c, "/usr/bin/spin-demo");
    // The monitor finds the kernel (first VMI request) before anything spins.
    assert!(!dvisor_json(&["ps", "--vm", &name]).as_array().unwrap().iter().any(|p| p["comm"] == "spin-demo"));
    let mark = c.line_count();
    c.type_line("spin-demo &");
    let at = c.wait_for(mark, "spin-demo spinning", |l| l.contains("spin-demo pid=") && l.contains("spinning"));
    let pid: String = c.lines()[at].split("pid=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let maps_before = dvisor_json(&["maps", "--vm", &name, &pid]).as_array().unwrap().len();
    let apply = |(obj, cmd): &(String, String)| {
        dvisor_out(&["patch", "apply", "--vm", &name, "--comm", "spin-demo", "--object", obj, "--commands", cmd, "--json"])
    };

    // --- its thread executes inside spin_here: refused, nothing changed
    let (ok, _, err) = apply(&spin2);
    assert!(!ok, "a patch of the function a thread spins in was applied");
    assert!(err.contains("executing inside spin_here"), "{err}");
    eprintln!("refused as expected: {err}");
    assert!(dvisor_json(&["patch", "list", "--vm", &name]).as_array().unwrap().is_empty());
    assert_eq!(dvisor_json(&["maps", "--vm", &name, &pid]).as_array().unwrap().len(), maps_before, "a refused patch left space mapped");

    // --- it left spin_here for wait_here (asleep in usleep, returning
    // into wait_here): wait_here is refused, spin_here now goes
    let mark = c.line_count();
    c.type_line(&format!("kill -USR1 {pid}"));
    c.wait_for(mark, "spin-demo leaving spin_here", |l| l.contains("spin-demo left spin_here"));
    let (ok, _, err) = apply(&wait2);
    assert!(!ok, "a patch of a function with a return address on the stack was applied");
    assert!(err.contains("return into wait_here"), "{err}");
    eprintln!("refused as expected: {err}");
    let (ok, out, err) = apply(&spin2);
    assert!(ok, "spin_here, left by its thread, was refused: {err}");
    let applied: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(applied["sites"][0]["target"], "spin_here");

    // --- it left wait_here too: the patched spin_here runs (the PIE's
    // load base was right), and wait_here can be patched now
    let mark = c.line_count();
    c.type_line(&format!("kill -USR2 {pid}"));
    c.wait_for(mark, "spin-demo saying spin v2", |l| l.contains("spin-demo says spin v2"));
    let (ok, _, err) = apply(&wait2);
    assert!(ok, "wait_here, left by its thread, was refused: {err}");
    assert_eq!(dvisor_json(&["patch", "list", "--vm", &name]).as_array().unwrap().len(), 2);

    // Both reverted (newest first) while spin-demo lives, then it ends.
    let mut list = dvisor_json(&["patch", "list", "--vm", &name]).as_array().unwrap().clone();
    list.sort_by_key(|p| std::cmp::Reverse(p["id"].as_u64()));
    for p in list {
        dvisor_json(&["patch", "revert", "--vm", &name, &p["id"].to_string()]);
    }
    common::run_in_guest(c, &format!("kill -TERM {pid}; wait {pid}"), "SPIN1");
    assert_eq!(guest_md5(c, "/usr/bin/spin-demo"), md5_before, "patching changed the program in the guest's page cache");
    // A second run is the program as built: refused while it spins.
    let mark = c.line_count();
    c.type_line("spin-demo &");
    let at = c.wait_for(mark, "a second spin-demo spinning", |l| l.contains("spin-demo pid=") && l.contains("spinning"));
    let pid2: String = c.lines()[at].split("pid=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let (ok, _, err) = apply(&spin2);
    assert!(!ok && err.contains("executing inside spin_here"), "the second run: {err}");
    common::run_in_guest(c, &format!("kill -TERM {pid2}; wait {pid2}"), "SPIN2");
    std::fs::remove_dir_all(&dir).unwrap();
}
