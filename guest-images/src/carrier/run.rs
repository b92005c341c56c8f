//! Running one host command inside the carrier VM.
//!
//! Host side of the protocol (the guest side is init/carrier-init.sh):
//! - a private run dir (`$TMPDIR/dvisor-carrier-XXXX`, visible inside through
//!   the 9p root) holds `cmd.sh` (cd + filtered environment + exec of the
//!   command), the console log, and receives `ready` and `status` files that
//!   the carrier writes through 9p;
//! - ttyS0 = carrier console → `console.log`; ttyS1 = the command's stdin and
//!   stdout, ttyS2 = its stderr, each a QEMU socket chardev connected to a
//!   UNIX socket we listen on, pumped to/from our own stdio by threads;
//! - stdin crosses as a canonical-mode tty stream (see `StdinEncoder`), so
//!   end of input reaches the command as EOF.
//!
//! The terminal is never put in raw mode (QEMU gets no stdio chardev), so
//! Ctrl-C simply reaches QEMU and us as SIGINT and the terminal stays sane.

use std::os::unix::process::CommandExt;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{carrier_image, CarrierError, CarrierOptions, TcpForward, CARRIER_IP, CARRIER_NET_PREFIX};

/// Environment variables passed from the caller to the command.
const ENV_NAMES: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "TERM", "LANG", "RUST_LOG", "RUST_BACKTRACE", "TMPDIR"];
const ENV_PREFIXES: &[&str] = &["DVISOR_", "XDG_", "CARGO_"];
/// `DVISOR_RUNTIME_DIR` of every command in the carrier, replacing the
/// host's: UNIX sockets cannot be created on the 9p root, so runtime files
/// go to this carrier-local tmpfs (the carrier init mounts it and creates
/// the directory). Only `-e DVISOR_RUNTIME_DIR=...` overrides it.
pub const RUNTIME_DIR: &str = "/dev/shm/dvisor";
const RUNTIME_DIR_VAR: &str = "DVISOR_RUNTIME_DIR";

/// Encodes a byte stream for a tty in canonical mode whose only active
/// control characters are VEOF (^D) and VLNEXT (^V), as the carrier init
/// configures ttyS1. Every data byte that means something to the line
/// discipline (^D, ^V, and newline too) is quoted with ^V, so the data
/// arrives untouched; a ^D after each chunk (and every `FLUSH_AT` bytes,
/// well inside the 4095-byte canonical line limit) hands the buffered bytes
/// to the reader as one read(), and a ^D on an empty buffer is end of input.
/// Quoting newlines matters for speed: unquoted, every line would cost the
/// guest one read()/write() pair, which is slow under TCG.
#[derive(Debug, Default)]
pub struct StdinEncoder {
    pending: usize,
}

const VEOF: u8 = 0x04;
const VLNEXT: u8 = 0x16;
const FLUSH_AT: usize = 2048;

impl StdinEncoder {
    /// Encodes one chunk of input and flushes it.
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if b == VEOF || b == VLNEXT || b == b'\n' {
                out.push(VLNEXT);
            }
            out.push(b);
            self.pending += 1;
            if self.pending >= FLUSH_AT {
                self.flush(out);
            }
        }
        self.flush(out);
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        // Only with bytes pending: a ^D on an empty buffer would be EOF.
        if self.pending > 0 {
            out.push(VEOF);
            self.pending = 0;
        }
    }

    /// End of input.
    pub fn eof(&mut self, out: &mut Vec<u8>) {
        self.flush(out);
        out.push(VEOF);
    }
}

/// Runs `cmd` in the carrier with the caller's current directory and returns
/// its exit status (128+N when we were stopped by signal N).
pub fn run(cmd: &[String], opts: &CarrierOptions) -> Result<i32, CarrierError> {
    run_forwarding(cmd, opts, &[])
}

/// `run`, plus TCP ports forwarded from the host's 127.0.0.1 into the
/// carrier. With forwards, the carrier gets a virtio-net NIC on a private
/// QEMU user-mode network (`-netdev user,restrict=on`: no route to the
/// outside, only the forwards reach in) and its init configures `eth0` as
/// `CARRIER_IP`; without, the carrier is exactly what `run` boots.
///
/// If QEMU cannot listen on a host port (taken since the caller picked it),
/// nothing ran yet and the error is `CarrierError::HostForward`.
pub fn run_forwarding(cmd: &[String], opts: &CarrierOptions, forwards: &[TcpForward]) -> Result<i32, CarrierError> {
    if cmd.is_empty() {
        return Err(CarrierError::EmptyCommand);
    }
    let qemu = find_in_path("qemu-system-x86_64").ok_or(CarrierError::QemuMissing)?;
    let image = carrier_image(false)?;
    let cwd = std::env::current_dir().map_err(|e| CarrierError::io(".", e))?;

    let tmp = std::env::temp_dir();
    let rundir = tempfile::Builder::new().prefix("dvisor-carrier-").tempdir_in(&tmp).map_err(|e| CarrierError::io(&tmp, e))?;
    let run = rundir.path().to_path_buf();
    if run.to_string_lossy().chars().any(char::is_whitespace) {
        return Err(CarrierError::BadPath { what: "carrier run dir", path: run });
    }
    let script = run.join("cmd.sh");
    let env = filtered_env(&opts.extra_env);
    std::fs::write(&script, command_script(&cwd, &env, cmd)).map_err(|e| CarrierError::io(&script, e))?;

    let (io_sock, err_sock) = (run.join("io.sock"), run.join("err.sock"));
    let io_listener = UnixListener::bind(&io_sock).map_err(|e| CarrierError::io(&io_sock, e))?;
    let err_listener = UnixListener::bind(&err_sock).map_err(|e| CarrierError::io(&err_sock, e))?;
    let console = run.join("console.log");
    let qemu_log = run.join("qemu.log");
    let qemu_stderr = std::fs::File::create(&qemu_log).map_err(|e| CarrierError::io(&qemu_log, e))?;

    let cache_mode = std::env::var("DVISOR_CARRIER_9P_CACHE").unwrap_or_else(|_| "mmap".into());
    let mut append = format!("console=ttyS0 quiet panic=-1 dvisor.cmd={} dvisor.9pcache={cache_mode}", script.display());
    if !forwards.is_empty() {
        append.push_str(&format!(" dvisor.net={CARRIER_IP}/{CARRIER_NET_PREFIX}"));
    }
    let mut qcmd = Command::new(&qemu);
    qcmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .args(["-smp", &opts.cpus.max(1).to_string(), "-m", &opts.mem_mib.max(256).to_string()])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &append])
        .args(["-serial", &format!("file:{}", qemu_escape(&console))])
        .args(["-chardev", &format!("socket,id=cio,path={}", qemu_escape(&io_sock)), "-serial", "chardev:cio"])
        .args(["-chardev", &format!("socket,id=cerr,path={}", qemu_escape(&err_sock)), "-serial", "chardev:cerr"])
        .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,multidevs=remap"])
        .args(netdev_args(forwards))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(qemu_stderr);
    // If dvisor dies (SIGKILL included), the carrier must not live on as
    // an orphan burning a CPU under TCG.
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        qcmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tracing::debug!(?qcmd, "starting carrier");

    let signals = SignalGuard::install();
    let started = Instant::now();
    let mut child = qcmd.spawn().map_err(CarrierError::Spawn)?;
    let done = Arc::new(AtomicBool::new(false));
    let ready = run.join("ready");
    let io_thread = {
        let done = done.clone();
        std::thread::spawn(move || pump_io(io_listener, ready, done))
    };
    let err_thread = std::thread::spawn(move || pump_out(err_listener, std::io::stderr()));

    let mut term_sent: Option<Instant> = None;
    let mut last_lockup_check = Instant::now();
    let qemu_status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.to_string(),
            Ok(None) => {}
            Err(e) => break format!("unknown ({e})"),
        }
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 && term_sent.is_none() {
            // QEMU usually got the terminal's SIGINT itself; this covers a
            // signal sent to us alone. SIGTERM makes QEMU quit cleanly.
            // SAFETY: kill(2) on our own child's pid; no memory involved.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            term_sent = Some(Instant::now());
        }
        if term_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            let _ = child.kill();
        }
        // A KVM nested on QEMU-TCG can lock up for good (docs/carrier.md);
        // the command would then wait out every timeout it has. Stop the
        // carrier instead, so the caller sees it died (status 2).
        if term_sent.is_none() && last_lockup_check.elapsed() > Duration::from_secs(2) {
            last_lockup_check = Instant::now();
            if let Some(line) = locked_up(&tail_file(&console, 20)) {
                eprintln!("dvisor carrier: the carrier's kernel is locked up ({line}); stopping it");
                let _ = child.kill();
                term_sent = Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    done.store(true, Ordering::SeqCst);
    tracing::info!(elapsed = ?started.elapsed(), %qemu_status, "carrier VM ended");
    // Unblock pump threads still waiting in accept() (QEMU never connected).
    for sock in [&io_sock, &err_sock] {
        let _ = UnixStream::connect(sock);
    }
    join_quietly(io_thread);
    join_quietly(err_thread);
    drop(signals);

    let sig = SIGNALLED.swap(0, Ordering::SeqCst);
    if sig != 0 {
        eprintln!("dvisor carrier: interrupted (signal {sig})");
        return Ok(128 + sig);
    }
    let status = std::fs::read_to_string(run.join("status")).ok().and_then(|s| s.trim().parse::<i32>().ok());
    let Some(code) = status else {
        let qemu_err = std::fs::read_to_string(&qemu_log).unwrap_or_default();
        if let Some(line) = qemu_err.lines().find(|l| l.contains("Could not set up host forwarding rule")) {
            return Err(CarrierError::HostForward(line.trim().to_string()));
        }
        let mut tail = tail_file(&console, 40);
        let qtail = tail_file(&qemu_log, 10);
        if !qtail.is_empty() {
            tail.push_str("\n--- qemu stderr ---\n");
            tail.push_str(&qtail);
        }
        // Keep the run dir so the full log can be read.
        let kept = rundir.keep();
        return Err(CarrierError::NoStatus { qemu_status, log: kept.join("console.log"), tail });
    };
    if std::env::var_os("DVISOR_CARRIER_KEEP").is_some() {
        eprintln!("dvisor carrier: run dir kept: {}", rundir.keep().display());
    }
    Ok(code)
}

/// Seconds a soft lockup must have lasted before the carrier is given up.
const LOCKUP_GIVE_UP_S: u64 = 120;

/// A console line saying a carrier CPU has been stuck for at least
/// [`LOCKUP_GIVE_UP_S`]: `watchdog: BUG: soft lockup - CPU#0 stuck for 156s! [vcpu0:154]`.
fn locked_up(console_tail: &str) -> Option<String> {
    console_tail.lines().find_map(|l| {
        let rest = &l[l.find("BUG: soft lockup")?..];
        let secs: u64 = rest.split("stuck for ").nth(1)?.split('s').next()?.parse().ok()?;
        (secs >= LOCKUP_GIVE_UP_S).then(|| rest.trim().to_string())
    })
}

fn join_quietly(h: JoinHandle<()>) {
    if h.join().is_err() {
        tracing::warn!("carrier I/O thread panicked");
    }
}

/// ttyS1: carrier output → our stdout; our stdin → carrier (once the
/// carrier says `ready`, so no byte reaches the tty before it is set up).
fn pump_io(listener: UnixListener, ready: PathBuf, done: Arc<AtomicBool>) {
    let Ok((stream, _)) = listener.accept() else { return };
    if let Ok(writer) = stream.try_clone() {
        let done = done.clone();
        // Detached: it may block in read(stdin) forever (e.g. a terminal).
        std::thread::spawn(move || pump_stdin(writer, &ready, &done));
    }
    pump_out_stream(stream, std::io::stdout());
}

fn pump_stdin(mut to_guest: UnixStream, ready: &Path, done: &AtomicBool) {
    while !ready.exists() {
        if done.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut enc = StdinEncoder::default();
    let mut buf = vec![0u8; 16 << 10];
    let mut out = Vec::with_capacity(40 << 10);
    let mut stdin = std::io::stdin().lock();
    loop {
        out.clear();
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                enc.eof(&mut out);
                let _ = to_guest.write_all(&out);
                // Never shut the socket down: QEMU would treat our EOF as a
                // disconnect of the whole chardev, output direction included.
                return;
            }
            Ok(n) => enc.encode(&buf[..n], &mut out),
        }
        if to_guest.write_all(&out).is_err() {
            return;
        }
    }
}

fn pump_out(listener: UnixListener, out: impl Write) {
    if let Ok((stream, _)) = listener.accept() {
        pump_out_stream(stream, out);
    }
}

/// Copies until EOF. If our side of the output is gone (e.g. `| head`), keep
/// draining so the carrier's command never blocks on a full serial line.
fn pump_out_stream(mut from_guest: UnixStream, mut out: impl Write) {
    let mut buf = vec![0u8; 16 << 10];
    let mut out_ok = true;
    loop {
        match from_guest.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if out_ok && (out.write_all(&buf[..n]).is_err() || out.flush().is_err()) {
                    out_ok = false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The caller's environment filtered to what makes sense in the carrier,
/// plus `DVISOR_RUNTIME_DIR=/dev/shm/dvisor` (unless `extra` sets it),
/// `extra` and `DVISOR_IN_CARRIER=1`.
fn filtered_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    filter_env(std::env::vars(), extra)
}

fn filter_env(host: impl Iterator<Item = (String, String)>, extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = host
        .filter(|(k, _)| ENV_NAMES.contains(&k.as_str()) || ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        .filter(|(k, _)| k != super::IN_CARRIER_VAR && k != RUNTIME_DIR_VAR)
        .collect();
    if !extra.iter().any(|(k, _)| k == RUNTIME_DIR_VAR) {
        env.push((RUNTIME_DIR_VAR.into(), RUNTIME_DIR.into()));
    }
    env.extend(extra.iter().cloned());
    env.push((super::IN_CARRIER_VAR.into(), "1".into()));
    env
}

/// The script the carrier runs (under the host's /bin/sh, with an empty
/// environment): export the environment, cd, exec the command.
pub fn command_script(cwd: &Path, env: &[(String, String)], cmd: &[String]) -> String {
    let mut s = String::from("# generated by `dvisor carrier`; run inside the carrier VM\n");
    for (k, v) in env {
        if is_shell_name(k) {
            s.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
    }
    // The carrier init creates the default runtime dir; this covers `-e`.
    s.push_str(&format!("[ -z \"${{{RUNTIME_DIR_VAR}:-}}\" ] || mkdir -p \"${RUNTIME_DIR_VAR}\" 2>/dev/null || :\n"));
    let dir = shell_quote(&cwd.to_string_lossy());
    s.push_str(&format!("cd {dir} || {{ echo \"dvisor carrier: cannot cd to \"{dir} >&2; exit 125; }}\n"));
    let argv: Vec<String> = cmd.iter().map(|a| shell_quote(a)).collect();
    s.push_str(&format!("exec {}\n", argv.join(" ")));
    s
}

fn is_shell_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// POSIX single-quote quoting.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The carrier's NIC, only when something is forwarded: a user-mode
/// network restricted to the forwards (`restrict=on`), IPv6 off (nothing
/// uses it, and its router advertisements would only wake the carrier),
/// and no option ROM (we boot with -kernel; the ROM would only cost time).
fn netdev_args(forwards: &[TcpForward]) -> Vec<String> {
    if forwards.is_empty() {
        return Vec::new();
    }
    let o = CARRIER_IP.octets();
    let mut netdev = format!("user,id=dvnet0,restrict=on,ipv6=off,net={}.{}.{}.0/{CARRIER_NET_PREFIX}", o[0], o[1], o[2]);
    for f in forwards {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-{CARRIER_IP}:{}", f.host_port, f.carrier_port));
    }
    ["-netdev", &netdev, "-device", "virtio-net-pci,netdev=dvnet0,romfile="].map(String::from).to_vec()
}

/// QEMU option values escape `,` as `,,`.
fn qemu_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DVISOR_QEMU").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

fn tail_file(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// Catches SIGINT/SIGTERM/SIGHUP while the carrier runs (so we can stop
/// QEMU and report 128+N instead of dying with QEMU orphaned) and restores
/// the previous handlers when dropped.
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> Self {
        SIGNALLED.store(0, Ordering::SeqCst);
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: plain sigaction(2) calls with zero-initialised structs;
            // the handler only stores to an atomic (async-signal-safe).
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                new.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &new, &mut prev) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        SignalGuard { old }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores the handler saved by `install`.
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_soft_lockups_are_seen_short_ones_not() {
        let log = "[  184.609252] watchdog: BUG: soft lockup - CPU#0 stuck for 156s! [vcpu0:154]\n";
        assert_eq!(super::locked_up(log).as_deref(), Some("BUG: soft lockup - CPU#0 stuck for 156s! [vcpu0:154]"));
        assert_eq!(super::locked_up("[ 30.1] watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [vcpu1:155]\n"), None);
        assert_eq!(super::locked_up("heartbeat 3 v1\n"), None);
    }

    use super::*;

    #[test]
    fn encoder_quotes_and_flushes() {
        let mut e = StdinEncoder::default();
        let mut out = Vec::new();
        e.encode(b"a\x04b\x16\n", &mut out);
        assert_eq!(out, b"a\x16\x04b\x16\x16\x16\n\x04");
        out.clear();
        e.eof(&mut out);
        assert_eq!(out, [VEOF]);
        let mut e = StdinEncoder::default();
        let mut out = Vec::new();
        e.encode(&vec![b'x'; FLUSH_AT * 2 + 1], &mut out);
        assert_eq!(out.iter().filter(|&&b| b == VEOF).count(), 3);
        out.clear();
        e.encode(b"", &mut out);
        assert!(out.is_empty(), "an empty chunk must not send EOF");
    }

    #[test]
    fn script_quotes_everything() {
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string()), ("bad-name".to_string(), "x".to_string())];
        let s = command_script(Path::new("/work/it's"), &env, &["sh".into(), "-c".into(), "echo 'hi' $HOME".into()]);
        assert!(s.contains("export PATH='/usr/bin:/bin'\n"));
        assert!(!s.contains("bad-name"));
        assert!(s.contains("cd '/work/it'\\''s' ||"));
        assert!(s.ends_with("exec 'sh' '-c' 'echo '\\''hi'\\'' $HOME'\n"));
    }

    #[test]
    fn runtime_dir_is_carrier_local() {
        let host = vec![
            ("DVISOR_RUNTIME_DIR".to_string(), "/run/user/1000/dvisor".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
            ("SECRET".to_string(), "x".to_string()),
        ];
        let env = filter_env(host.clone().into_iter(), &[]);
        let rt: Vec<_> = env.iter().filter(|(k, _)| k == "DVISOR_RUNTIME_DIR").collect();
        assert_eq!(rt, [&("DVISOR_RUNTIME_DIR".to_string(), RUNTIME_DIR.to_string())]);
        assert!(env.iter().all(|(k, _)| k != "SECRET"));
        assert!(env.contains(&("DVISOR_IN_CARRIER".to_string(), "1".to_string())));
        let extra = [("DVISOR_RUNTIME_DIR".to_string(), "/dev/shm/mine".to_string())];
        let env = filter_env(host.into_iter(), &extra);
        let rt: Vec<_> = env.iter().filter(|(k, _)| k == "DVISOR_RUNTIME_DIR").map(|(_, v)| v.as_str()).collect();
        assert_eq!(rt, ["/dev/shm/mine"]);
        let s = command_script(Path::new("/"), &env, &["true".into()]);
        assert!(s.contains("export DVISOR_RUNTIME_DIR='/dev/shm/mine'\n"));
        assert!(s.contains("mkdir -p \"$DVISOR_RUNTIME_DIR\""));
    }

    #[test]
    fn forwards_add_a_restricted_nic() {
        assert!(netdev_args(&[]).is_empty(), "a plain carrier has no NIC");
        let a = netdev_args(&[TcpForward { host_port: 40001, carrier_port: 7077 }]);
        assert_eq!(a[0], "-netdev");
        assert!(a[1].starts_with("user,id=dvnet0,restrict=on,"), "{}", a[1]);
        assert!(a[1].contains(",net=10.254.77.0/24,"), "{}", a[1]);
        assert!(a[1].ends_with(",hostfwd=tcp:127.0.0.1:40001-10.254.77.15:7077"), "{}", a[1]);
        assert_eq!(a[2..], ["-device", "virtio-net-pci,netdev=dvnet0,romfile="]);
    }

    #[test]
    fn qemu_values_escape_commas() {
        assert_eq!(qemu_escape(Path::new("/tmp/a,b")), "/tmp/a,,b");
    }
}
