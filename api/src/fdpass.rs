//! Passing file descriptors over a UNIX stream socket (SCM_RIGHTS), on
//! top of `vmm_sys_util::sock_ctrl_msg`.
//!
//! That crate receives without MSG_CMSG_CLOEXEC, so a received descriptor
//! is marked close-on-exec right after `recvmsg`: a process that forks and
//! execs in that instant could inherit it. Neither side of the support API
//! runs programs while it reads the socket, so this is no loss.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most descriptors one message may carry; the protocol sends at most one.
const MAX_FDS: usize = 4;

/// Sends all of `bytes`, with `fd` attached to the first byte.
pub fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: RawFd) -> io::Result<()> {
    let sent = stream.send_with_fd(bytes, fd).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < bytes.len() {
        io::Write::write_all(&mut &*stream, &bytes[sent..])?;
    }
    Ok(())
}

/// Reads into `buf`; descriptors that came with the bytes are returned
/// (and owned: dropping them closes them).
pub fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() }];
    // SAFETY: the one iovec points into `buf`, borrowed mutably for the
    // call; any bytes may be written there.
    let (n, count) =
        unsafe { stream.recv_with_fds(&mut iov, &mut raw) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw[..count]
        .iter()
        // SAFETY: the first `count` entries are descriptors the kernel just
        // gave this process; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for fd in &fds {
        // SAFETY: F_SETFD on a descriptor we own; the result is not needed
        // (on failure the descriptor only stays inheritable).
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_memfd_crosses_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"shared").unwrap();
        send_with_fd(&a, b"hello\n", f.as_raw_fd()).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello\n");
        assert_eq!(fds.len(), 1);
        // SAFETY: F_GETFD on a descriptor the test owns.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "shared");
    }
}
