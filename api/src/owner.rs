//! Only the user who runs a VM (or root) may use its sockets
//! (docs/security.md).
//!
//! Three layers, each enough on its own against another local user:
//! - the directories D-Visor creates for its sockets are mode 0700 and
//!   must belong to this user: one that someone else created (say a
//!   `/tmp/dvisor-<uid>` made in advance by another user, who could then
//!   swap our sockets for theirs) is refused;
//! - every listening socket is mode 0600;
//! - every accepted connection's peer credentials (`SO_PEERCRED`) are
//!   checked: the same uid as this process, or root; and a client checks
//!   the server the same way, so it never talks to a socket someone else
//!   put in its place.
//!
//! Also here: a cap on the connections a socket serves at once, so a
//! client that opens many cannot exhaust the server's threads.
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Connections one socket serves at once; more are refused with a
/// message. Operators use a handful; a monitor one.
pub const MAX_CONNECTIONS: usize = 64;

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (and missing parents) with mode 0700, or checks the one
/// that exists: it must be a directory (not a symlink) owned by this
/// user. One of ours with a looser mode (an older dvisor made it 0755) is
/// tightened to 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let m = std::fs::symlink_metadata(dir)?;
    if !m.file_type().is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a directory (a symlink?): remove it, or set DVISOR_RUNTIME_DIR to a directory of yours", dir.display()),
        ));
    }
    if m.uid() != euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to you (uid {}): another user created it and could replace the sockets in it; \
                 remove it (as root or its owner), or set DVISOR_RUNTIME_DIR to a directory of yours",
                dir.display(),
                m.uid(),
                euid()
            ),
        ));
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Binds a listening socket at `path`, readable and writable by this user
/// only (0600). The caller has removed a stale socket file.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The peer's (pid, uid) from `SO_PEERCRED`: the process that connected,
/// or for a client, the one that bound the socket.
pub fn peer(conn: &UnixStream) -> io::Result<(i32, u32)> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid
    // ucred; the fd is open for the call's duration.
    let r = unsafe {
        libc::getsockopt(conn.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid))
}

/// Whether a peer with `uid` may talk to this process: the same user, or
/// root. (Root is let in both ways: it can reach any file anyway.)
fn allowed(uid: u32) -> bool {
    uid == euid() || uid == 0
}

/// Server side: refuses a client that is neither this user nor root; the
/// message is what the client is told.
pub fn check_client(conn: &UnixStream) -> Result<(), String> {
    let (pid, uid) = peer(conn).map_err(|e| format!("cannot read the client's credentials (SO_PEERCRED): {e}"))?;
    if allowed(uid) {
        return Ok(());
    }
    Err(format!(
        "permission denied: this VM belongs to uid {}; your process (pid {pid}) runs as uid {uid}. \
         Run the command as the VM's user (or root)",
        euid()
    ))
}

/// Client side: refuses a server that is neither this user nor root (a
/// socket someone else put where ours should be).
pub fn check_server(conn: &UnixStream, path: &Path) -> io::Result<()> {
    let (pid, uid) = peer(conn)?;
    if allowed(uid) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing {}: the process serving it (pid {pid}) runs as uid {uid}, neither you (uid {}) nor root; \
             it is not a VM of yours",
            path.display(),
            euid()
        ),
    ))
}

/// Tells a client it is not served, as one error line with no request id
/// (both sockets speak newline-framed JSON), and lets the connection
/// close; a write that would block is given up.
pub fn refuse(conn: &UnixStream, why: &str) {
    use crate::protocol::{encode_line, ApiError, ErrorCode, ServerMessage};
    use std::io::Write;
    tracing::warn!("refused a connection: {why}");
    let code = if why.starts_with("busy") { ErrorCode::Busy } else { ErrorCode::PermissionDenied };
    let _ = conn.set_write_timeout(Some(std::time::Duration::from_millis(100)));
    let _ = (&*conn).write_all(&encode_line(&ServerMessage::Err { id: None, error: ApiError::new(code, why) }));
}

/// Counts a socket's open connections; [`Slots::take`] fails at the cap.
#[derive(Clone, Default)]
pub struct Slots(Arc<AtomicUsize>);

/// One connection's place; frees it when dropped (the connection ended).
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slots {
    /// The gate of an accept loop: a connection of this user (or root)
    /// while there is room gets its slot; any other is told why
    /// ([`refuse`]) and gets `None` (drop it).
    pub fn admit(&self, conn: &UnixStream) -> Option<Slot> {
        match check_client(conn).and_then(|()| self.take()) {
            Ok(slot) => Some(slot),
            Err(why) => {
                refuse(conn, &why);
                None
            }
        }
    }

    fn take(&self) -> Result<Slot, String> {
        let n = self.0.fetch_add(1, Ordering::AcqRel);
        if n >= MAX_CONNECTIONS {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return Err(format!("busy: this socket already serves {MAX_CONNECTIONS} connections; close some and retry"));
        }
        Ok(Slot(self.0.clone()))
    }

    pub fn open(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket address of `p`, made before a fork (no allocation after).
    fn sockaddr(p: &Path) -> libc::sockaddr_un {
        // SAFETY: sockaddr_un is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(p.as_os_str().as_encoded_bytes()) {
            *d = *s as libc::c_char;
        }
        addr
    }

    /// In a forked child: become uid/gid 65534 (nobody) and open a UNIX
    /// stream socket; exits the child with 3 if the uid cannot change.
    unsafe fn nobody_socket() -> i32 {
        if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
            libc::_exit(3);
        }
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)
    }

    /// Waits for our child `pid`; its exit status.
    fn exit_status(pid: i32) -> i32 {
        let mut st = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        libc::WEXITSTATUS(st)
    }

    #[test]
    fn private_dir_is_made_0700_and_a_loose_one_of_ours_tightened() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_symlink_is_not_a_private_dir() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    /// Needs root (to give a directory away); CI runs as root.
    #[test]
    fn someone_elses_dir_is_refused() {
        if euid() != 0 {
            eprintln!("skipped: giving a directory to another uid needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("theirs");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        let e = private_dir(&d).unwrap_err().to_string();
        assert!(e.contains("belongs to uid 65534") && e.contains("DVISOR_RUNTIME_DIR"), "{e}");
    }

    #[test]
    fn sockets_are_0600_and_the_same_user_is_let_in() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.sock");
        let l = bind_private(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let c = UnixStream::connect(&p).unwrap();
        let (s, _) = l.accept().unwrap();
        check_client(&s).unwrap();
        check_server(&c, &p).unwrap();
        assert_eq!(peer(&s).unwrap().0, std::process::id() as i32);
    }

    /// A client of another uid is refused with the reason. The client is a
    /// forked child that drops to uid 65534 and uses raw system calls only
    /// (the parent has other threads). Needs root.
    #[test]
    fn another_users_client_is_refused() {
        if euid() != 0 {
            eprintln!("skipped: running a client as another uid needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = t.path().join("s.sock");
        let l = UnixListener::bind(&p).unwrap();
        // Open to all for this test: only SO_PEERCRED stands in the way.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let addr = sockaddr(&p);
        // SAFETY: the child calls only async-signal-safe functions and
        // _exit; the parent waits for it.
        let child = unsafe { libc::fork() };
        if child == 0 {
            unsafe {
                let fd = nobody_socket();
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                    libc::_exit(4);
                }
                let mut b = [0u8; 16];
                while libc::read(fd, b.as_mut_ptr().cast(), b.len()) > 0 {}
                libc::_exit(0);
            }
        }
        let (s, _) = l.accept().unwrap();
        let e = check_client(&s).unwrap_err();
        assert!(e.contains("permission denied") && e.contains("uid 65534"), "{e}");
        drop(s);
        assert_eq!(exit_status(child), 0, "the child could not connect");
    }

    /// A server of another uid (a socket someone else put in our place) is
    /// refused by the client. The server is a forked child as uid 65534.
    #[test]
    fn another_users_server_is_refused() {
        if euid() != 0 {
            eprintln!("skipped: running a server as another uid needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let p = t.path().join("s.sock");
        let addr = sockaddr(&p);
        let mut ready = [0i32; 2];
        // SAFETY: a pipe into two fresh descriptors.
        assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
        // SAFETY: the child calls only async-signal-safe functions and
        // _exit; the parent waits for it.
        let child = unsafe { libc::fork() };
        if child == 0 {
            unsafe {
                let fd = nobody_socket();
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 || libc::listen(fd, 1) != 0 {
                    libc::_exit(4);
                }
                libc::write(ready[1], b"r".as_ptr().cast(), 1);
                let c = libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
                let mut b = [0u8; 16];
                while libc::read(c, b.as_mut_ptr().cast(), b.len()) > 0 {}
                libc::_exit(0);
            }
        }
        let mut b = [0u8; 1];
        // SAFETY: reading one byte from our pipe.
        unsafe { libc::read(ready[0], b.as_mut_ptr().cast(), 1) };
        let c = UnixStream::connect(&p).unwrap();
        let e = check_server(&c, &p).unwrap_err().to_string();
        assert!(e.contains("runs as uid 65534") && e.contains("not a VM of yours"), "{e}");
        drop(c);
        assert_eq!(exit_status(child), 0, "the child could not serve");
    }

    #[test]
    fn slots_cap_connections_and_free_on_drop() {
        let s = Slots::default();
        let held: Vec<Slot> = (0..MAX_CONNECTIONS).map(|_| s.take().unwrap()).collect();
        assert!(s.take().unwrap_err().contains("busy"));
        drop(held);
        assert_eq!(s.open(), 0);
        s.take().unwrap();
    }
}
