//! The monitor's control socket, reachable from the host when the VM runs
//! in the carrier.
//!
//! UNIX sockets do not cross the carrier's 9p root or the VM boundary, so
//! `dvisor run` on a host without hardware KVM relays them over TCP:
//!
//! ```text
//! dvisor pause ──unix──▶ <host runtime>/<name>/monitor.sock   (HostRelay, host side of `dvisor run`)
//!                        ──tcp──▶ 127.0.0.1:PORT              (QEMU hostfwd, user-mode net)
//!                        ──tcp──▶ CARRIER_IP:7077             (serve_in_carrier, the inner `dvisor run`)
//!                        ──unix──▶ /dev/shm/dvisor/<name>/monitor.sock (the monitor)
//! ```
//!
//! Each TCP connection starts with a one-line handshake: the host sends
//! `HELLO <token>`, the carrier answers `ok` once it is connected to the
//! monitor, or `error <why>` and hangs up. The token (random, handed to the
//! carrier through its private command script) keeps other local users,
//! who can reach a 127.0.0.1 port but not the operator's runtime dir, out.
//! After `ok` the bytes pass untouched both ways (`pipe`), with half-closes
//! passed on, so request/reply and the `events` stream work as over the
//! socket itself.
//!
//! The host socket exists only while the carrier's monitor answers: the host
//! side probes until it does, then binds; when the monitor stops answering
//! it removes the socket and probes again. So `dvisor status` says "no
//! monitor serves ..." in between, as it does without the carrier.
//!
//! [`run_relaying`] is the host side as `dvisor run` uses it (carrier plus
//! relay), [`serve_from_env`] the carrier side. Problems that only cost the
//! host its access to the monitor are warnings on stderr, never errors: the
//! VM runs anyway.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvisor_api::owner;

use super::{CarrierError, CarrierOptions, TcpForward, CARRIER_IP};

/// The port the inner `dvisor run` listens on, inside the carrier.
pub const CARRIER_PORT: u16 = 7077;
/// `ADDR:PORT` (or `PORT`, meaning all addresses) for the inner `dvisor
/// run` to serve the relay on; set by the host side through the carrier.
pub const ENV_LISTEN: &str = "DVISOR_CONTROL_RELAY";
/// The token the host side presents; set with `ENV_LISTEN`.
pub const ENV_TOKEN: &str = "DVISOR_CONTROL_RELAY_TOKEN";

const HELLO: &str = "dvisor-control-relay/1";
const MAX_LINE: usize = 256;
/// How long the carrier side keeps trying the monitor's socket (it may
/// still be starting) before it answers `error`.
const MONITOR_RETRY: Duration = Duration::from_secs(1);
/// Host side: pause between probes while the carrier's monitor is not up.
const PROBE_EVERY: Duration = Duration::from_millis(300);
/// Host side: a probe whose handshake takes longer is abandoned (before
/// the carrier's NIC is up, QEMU accepts and then waits for the guest).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshake limit for a real connection: a safety net, not a latency.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A byte stream that can be split into a reader and a writer and
/// half-closed: what `pipe` needs from both ends.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()>;
}

impl Duplex for TcpStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

impl Duplex for UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// Copies bytes both ways between `a` and `b` until both directions have
/// ended. End of input on one side becomes a half-close (shutdown of
/// writing) on the other, so a peer that closes its sending side still
/// gets the rest of the answer; an error in either direction (a peer that
/// vanished) tears the whole connection down, so a server streaming into it
/// sees its writes fail.
pub fn pipe<A: Duplex, B: Duplex>(a: A, b: B) -> std::io::Result<()> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let t = std::thread::Builder::new().name("relay-copy".into()).spawn(move || copy_half(a2, b2))?;
    copy_half(b, a);
    let _ = t.join();
    Ok(())
}

fn copy_half<R: Duplex, W: Duplex>(mut from: R, mut to: W) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Reads one `\n`-terminated line byte by byte (nothing after it is
/// consumed: the stream is handed on as it is).
fn read_line(s: &mut impl Read) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed during the handshake")),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_LINE => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "handshake line too long")),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 128 random bits, hex.
pub fn new_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

/// Parses `ENV_LISTEN`: `ADDR:PORT`, or a bare `PORT` (all addresses).
pub fn parse_listen(s: &str) -> Option<SocketAddr> {
    s.parse().ok().or_else(|| s.parse::<u16>().ok().map(|p| SocketAddr::from(([0, 0, 0, 0], p))))
}

// ---------------------------------------------------------------- carrier side

/// Inside the carrier: accepts relay connections on `listen` and joins each
/// one, after the handshake, to the monitor's control socket `control`.
/// Runs in background threads for the rest of the process.
pub fn serve_in_carrier(listen: SocketAddr, token: String, control: PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    let token = Arc::new(token);
    let control = Arc::new(control);
    std::thread::Builder::new().name("relay-accept".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(c) => {
                    let (token, control) = (token.clone(), control.clone());
                    let _ = std::thread::Builder::new().name("relay-conn".into()).spawn(move || carrier_conn(c, &token, &control));
                }
                // E.g. out of file descriptors: do not spin.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })?;
    Ok(())
}

/// Inside the carrier, when the host side asked for it (`ENV_LISTEN` and
/// `ENV_TOKEN`, set by [`run_relaying`]): serves the monitor's control
/// socket `control` over TCP for the host. `Err` says why the host cannot
/// reach it; outside the carrier, or when not asked, does nothing.
pub fn serve_from_env(control: &Path) -> Result<(), String> {
    if !super::in_carrier() {
        return Ok(());
    }
    let Ok(listen) = std::env::var(ENV_LISTEN) else { return Ok(()) };
    let addr = parse_listen(&listen).ok_or_else(|| format!("bad {ENV_LISTEN}={listen:?}"))?;
    let token = std::env::var(ENV_TOKEN).ok().filter(|t| !t.is_empty()).ok_or_else(|| format!("{ENV_TOKEN} is not set"))?;
    serve_in_carrier(addr, token, control.to_owned()).map_err(|e| format!("listening on {addr}: {e}"))
}

fn carrier_conn(mut tcp: TcpStream, token: &str, control: &Path) {
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let Ok(hello) = read_line(&mut tcp) else { return };
    let authorised = hello.split_once(' ').is_some_and(|(h, t)| h == HELLO && same_token(t, token));
    if !authorised {
        tracing::warn!("control relay: refused a connection without the right token");
        let _ = tcp.write_all(b"error refused\n");
        return;
    }
    let deadline = Instant::now() + MONITOR_RETRY;
    let monitor = loop {
        match UnixStream::connect(control) {
            Ok(m) => break m,
            Err(e) if Instant::now() >= deadline => {
                let _ = tcp.write_all(format!("error no monitor serves {} in the carrier: {e}\n", control.display()).as_bytes());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if tcp.write_all(b"ok\n").is_err() || tcp.set_read_timeout(None).is_err() {
        return;
    }
    let _ = pipe(tcp, monitor);
}

// ---------------------------------------------------------------- host side

/// Host side: serves `path` while the carrier's monitor answers through
/// `127.0.0.1:port`. Dropping it stops serving and removes the socket file.
pub struct HostRelay {
    shared: Arc<HostShared>,
}

impl std::fmt::Debug for HostRelay {
    // Not the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRelay").field("path", &self.shared.path).field("port", &self.shared.port).finish_non_exhaustive()
    }
}

struct HostShared {
    path: PathBuf,
    port: u16,
    token: String,
    stop: AtomicBool,
    /// True while the socket file at `path` is ours; held while binding
    /// and removing so that `drop` never races a bind.
    bound: Mutex<bool>,
}

impl HostRelay {
    /// Checks that `path` is free (no file, or a socket nobody answers on)
    /// and starts probing `127.0.0.1:port` in the background.
    pub fn start(path: PathBuf, port: u16, token: String) -> Result<HostRelay, String> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        check_free(&path)?;
        let shared = Arc::new(HostShared { path, port, token, stop: AtomicBool::new(false), bound: Mutex::new(false) });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("relay-host".into())
            .spawn(move || host_loop(&s))
            .map_err(|e| format!("starting the relay thread: {e}"))?;
        Ok(HostRelay { shared })
    }
}

impl Drop for HostRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut bound = self.shared.bound.lock().unwrap_or_else(|p| p.into_inner());
        if *bound {
            let _ = std::fs::remove_file(&self.shared.path);
            *bound = false;
        }
        // The VM's dir on the host held only this socket; leave it if
        // something else lives there.
        if let Some(dir) = self.shared.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `Err` if something answers at `path` or it is not a socket; removes a
/// stale socket (its server died).
fn check_free(path: &Path) -> Result<(), String> {
    let Ok(m) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !m.file_type().is_socket() {
        return Err(format!("{} exists and is not a socket", path.display()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!("{} already answers (another VM of that name runs; pick another --name)", path.display()));
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn host_loop(s: &Arc<HostShared>) {
    while !s.stop.load(Ordering::SeqCst) {
        if host_handshake(s, PROBE_TIMEOUT).is_err() {
            std::thread::sleep(PROBE_EVERY);
            continue;
        }
        let listener = {
            let mut bound = s.bound.lock().unwrap_or_else(|p| p.into_inner());
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            let l = check_free(&s.path).and_then(|()| owner::bind_private(&s.path).map_err(|e| format!("binding {}: {e}", s.path.display())));
            match l {
                Ok(l) => {
                    *bound = true;
                    l
                }
                Err(e) => {
                    warn_no_relay(&e);
                    return;
                }
            }
        };
        tracing::info!(socket = %s.path.display(), port = s.port, "the carrier's monitor answers; relaying its control socket");
        serve_host(s, &listener);
        let mut bound = s.bound.lock().unwrap_or_else(|p| p.into_inner());
        if *bound {
            let _ = std::fs::remove_file(&s.path);
            *bound = false;
        }
    }
}

/// Accepts until stopped or until a connection finds no monitor behind
/// the relay.
fn serve_host(s: &Arc<HostShared>, listener: &UnixListener) {
    let lost = Arc::new(AtomicBool::new(false));
    while !s.stop.load(Ordering::SeqCst) && !lost.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the listener we own.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        let Ok((conn, _)) = listener.accept() else { continue };
        // The same rule as the monitor's own socket: its user or root.
        if let Err(why) = owner::check_client(&conn) {
            owner::refuse(&conn, &why);
            continue;
        }
        let (s, lost) = (s.clone(), lost.clone());
        let _ = std::thread::Builder::new().name("relay-host-conn".into()).spawn(move || match host_handshake(&s, HANDSHAKE_TIMEOUT) {
            Ok(tcp) => {
                let _ = pipe(conn, tcp);
            }
            Err(e) => {
                tracing::info!("control relay: {e}");
                lost.store(true, Ordering::SeqCst);
            }
        });
    }
}

fn warn_no_relay(why: &str) {
    eprintln!("dvisor: warning: not relaying the monitor's control socket to this host: {why}; `dvisor pause` etc. from here will not reach this VM (the console works)");
}

/// Host side, as `dvisor run` uses it: runs `cmd` in the carrier (as
/// [`super::run`]) and, while it runs, serves the control socket of the
/// monitor in the carrier at `host_socket` on this host. If the relay
/// cannot be set up it says so once and runs the carrier without it.
pub fn run_relaying(cmd: &[String], opts: &CarrierOptions, host_socket: PathBuf) -> Result<i32, CarrierError> {
    let (guard, port, token) = match start_on_free_port(host_socket) {
        Ok(v) => v,
        Err(e) => {
            warn_no_relay(&e);
            return super::run(cmd, opts);
        }
    };
    let forward = TcpForward { host_port: port, carrier_port: CARRIER_PORT };
    let mut relayed = opts.clone();
    relayed.extra_env.push((ENV_LISTEN.into(), format!("{CARRIER_IP}:{CARRIER_PORT}")));
    relayed.extra_env.push((ENV_TOKEN.into(), token));
    match super::run_forwarding(cmd, &relayed, &[forward]) {
        // The port was taken since we picked it; nothing ran yet.
        Err(CarrierError::HostForward(e)) => {
            drop(guard);
            warn_no_relay(&e);
            super::run(cmd, opts)
        }
        other => other,
    }
}

/// A free 127.0.0.1 port for QEMU to forward into the carrier, a fresh
/// token, and the host socket served while the carrier's monitor answers.
fn start_on_free_port(path: PathBuf) -> Result<(HostRelay, u16, String), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free 127.0.0.1 port: {e}"))?
        .port();
    let token = new_token().map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let r = HostRelay::start(path, port, token.clone())?;
    Ok((r, port, token))
}

/// Connects to the carrier and waits for its `ok`.
fn host_handshake(s: &HostShared, timeout: Duration) -> Result<TcpStream, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], s.port));
    let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    tcp.write_all(format!("{HELLO} {}\n", s.token).as_bytes()).map_err(|e| format!("writing to {addr}: {e}"))?;
    let answer = read_line(&mut tcp).map_err(|e| format!("reading from {addr}: {e}"))?;
    if answer != "ok" {
        return Err(answer.strip_prefix("error ").unwrap_or(&answer).to_string());
    }
    tcp.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("dvisor-relay-test-{}-{}", std::process::id(), new_token().unwrap()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A stand-in monitor: answers each line with "re:<line>"; on "stream"
    /// it writes lines until a write fails and reports that on `gone`.
    fn fake_monitor(path: &Path, gone: std::sync::mpsc::Sender<()>) {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let gone = gone.clone();
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    for line in std::io::BufReader::new(c).lines() {
                        let Ok(line) = line else { return };
                        if line == "stream" {
                            while w.write_all(b"event\n").is_ok() {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            let _ = gone.send(());
                            return;
                        }
                        if w.write_all(format!("re:{line}\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn relays_requests_half_closes_and_streams() {
        let dir = tmpdir();
        let monitor_sock = dir.join("monitor.sock");
        let (gone_tx, gone_rx) = std::sync::mpsc::channel();
        fake_monitor(&monitor_sock, gone_tx);
        // The carrier side on a free loopback port, the host side in front.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        serve_in_carrier(SocketAddr::from(([127, 0, 0, 1], port)), "t0ken".into(), monitor_sock.clone()).unwrap();
        let host_sock = dir.join("host").join("monitor.sock");
        let relay = HostRelay::start(host_sock.clone(), port, "t0ken".into()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let connect = || loop {
            if let Ok(c) = UnixStream::connect(&host_sock) {
                return c;
            }
            assert!(Instant::now() < deadline, "the host socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        };

        // Request, half-close, then the whole reply.
        let mut c = connect();
        c.write_all(b"status\nregs\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut all = String::new();
        c.read_to_string(&mut all).unwrap();
        assert_eq!(all, "re:status\nre:regs\n");

        // A stream: the client reads a few lines and hangs up; the server's
        // writes must start failing.
        let c = connect();
        (&c).write_all(b"stream\n").unwrap();
        let mut r = std::io::BufReader::new(c);
        for _ in 0..3 {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            assert_eq!(l, "event\n");
        }
        drop(r);
        gone_rx.recv_timeout(Duration::from_secs(30)).expect("the streaming server noticed the hang-up");

        // A wrong token gets nothing from the monitor.
        let mut t = TcpStream::connect(("127.0.0.1", port)).unwrap();
        t.write_all(format!("{HELLO} wrong\n").as_bytes()).unwrap();
        assert_eq!(read_line(&mut t).unwrap(), "error refused");

        // A second relay for the same socket refuses while this one serves.
        assert!(HostRelay::start(host_sock.clone(), port, "t0ken".into()).unwrap_err().contains("already answers"));
        drop(relay);
        assert!(!host_sock.exists(), "the host socket outlived its relay");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_socket_follows_the_monitor() {
        let dir = tmpdir();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let monitor_sock = dir.join("monitor.sock");
        serve_in_carrier(SocketAddr::from(([127, 0, 0, 1], port)), "k".into(), monitor_sock.clone()).unwrap();
        let host_sock = dir.join("h.sock");
        // A stale socket (its server died) is replaced; a plain file is not.
        std::fs::write(&host_sock, b"").unwrap();
        assert!(HostRelay::start(host_sock.clone(), port, "k".into()).unwrap_err().contains("not a socket"));
        std::fs::remove_file(&host_sock).unwrap();
        drop(UnixListener::bind(&host_sock).unwrap());
        let relay = HostRelay::start(host_sock.clone(), port, "k".into()).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!host_sock.exists(), "no monitor yet, so no host socket");
        let (tx, _rx) = std::sync::mpsc::channel();
        fake_monitor(&monitor_sock, tx);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !host_sock.exists() {
            assert!(Instant::now() < deadline, "the host socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(relay);
        assert!(!host_sock.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(parse_listen("7077"), Some(SocketAddr::from(([0, 0, 0, 0], 7077))));
        assert_eq!(parse_listen("10.254.77.15:7077"), Some(SocketAddr::from(([10, 254, 77, 15], 7077))));
        assert_eq!(parse_listen("nope"), None);
        assert!(same_token("abc", "abc") && !same_token("abc", "abd") && !same_token("abc", "ab"));
    }
}
