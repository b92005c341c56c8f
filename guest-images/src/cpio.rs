//! Writer (and a small reader, for tests and self-checks) of the cpio "newc"
//! format the Linux kernel unpacks as an initramfs.
//!
//! We write it ourselves so the build needs no `cpio` tool and the archive is
//! reproducible: fixed mtime 0, uid/gid 0, inode numbers in insertion order.
//! The kernel accepts it uncompressed, so there is no gzip step.

use std::collections::BTreeSet;
use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// Streams a newc archive into `out`. Parent directories of every entry are
/// created automatically (mode 0755) so callers only name the leaves.
pub struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, offset: 0, next_ino: 1, dirs: BTreeSet::new() }
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = normalize(path);
        if path.is_empty() || self.dirs.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.dirs.insert(path.clone());
        self.entry(&path, S_IFDIR | (perm & 0o7777), 2, 0, 0, &[])
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = normalize(path);
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (perm & 0o7777), 1, 0, 0, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalize(path);
        self.parents(&path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())
    }

    /// A character device node, e.g. `/dev/console` (5, 1): the kernel opens
    /// it for PID 1 *before* /init can mount devtmpfs.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = normalize(path);
        self.parents(&path)?;
        self.entry(&path, S_IFCHR | (perm & 0o7777), 1, major, minor, &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, 0, 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for comp in &comps[..comps.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            if !self.dirs.contains(&prefix) {
                self.dirs.insert(prefix.clone());
                let p = prefix.clone();
                self.entry(&p, S_IFDIR | 0o755, 2, 0, 0, &[])?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rmaj: u32, rmin: u32, data: &[u8]) -> io::Result<()> {
        let filesize = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: file too large for cpio newc")))?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let fields = [ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rmaj, rmin, name.len() as u32 + 1, 0];
        let mut header = Vec::with_capacity(110 + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write_padded(&header)?;
        self.write_padded(data)
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.offset += pad as u64;
        Ok(())
    }
}

fn normalize(path: &str) -> String {
    path.trim_start_matches('/').trim_end_matches('/').to_string()
}

/// One entry read back from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    pub name: String,
    pub mode: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: Vec<u8>,
}

/// Parses a newc archive (up to the trailer). Used by tests and by the build
/// to check what it wrote.
pub fn read_archive(mut buf: &[u8]) -> Result<Vec<CpioEntry>, String> {
    let total = buf.len();
    let mut entries = Vec::new();
    loop {
        let pos = total - buf.len();
        if buf.len() < 110 || &buf[..6] != MAGIC {
            return Err(format!("bad cpio header at offset {pos}"));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).map_err(|_| format!("non-ascii field at {pos}"))?;
            u32::from_str_radix(s, 16).map_err(|_| format!("bad hex field `{s}` at {pos}"))
        };
        let (mode, filesize, rmaj, rmin, namesize) = (field(1)?, field(6)? as usize, field(9)?, field(10)?, field(11)? as usize);
        let name_end = 110 + namesize;
        if namesize == 0 || buf.len() < name_end {
            return Err(format!("truncated name at {pos}"));
        }
        let name = String::from_utf8_lossy(&buf[110..name_end - 1]).into_owned();
        let data_start = pad4(pos + name_end) - pos;
        let data_end = data_start + filesize;
        if buf.len() < data_end {
            return Err(format!("truncated data of `{name}`"));
        }
        let data = buf[data_start..data_end].to_vec();
        let next = (pad4(pos + data_end) - pos).min(buf.len());
        buf = &buf[next..];
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry { name, mode, rdev_major: rmaj, rdev_minor: rmin, data });
    }
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/bin/busybox", 0o755, b"ELF...").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.dir("/proc", 0o755).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = read_archive(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "proc", "init"]);
        assert_eq!(entries[1].data, b"ELF...");
        assert_eq!(entries[1].mode, S_IFREG | 0o755);
        assert_eq!(entries[2].data, b"busybox");
        assert_eq!(entries[2].mode & 0o170000, S_IFLNK);
        assert_eq!((entries[4].rdev_major, entries[4].rdev_minor), (5, 1));
        assert_eq!(entries[6].data, b"#!/bin/sh\necho hi\n");
    }

    #[test]
    fn cpio_tool_lists_it_if_present() {
        // Cross-check with the system cpio when installed; skip otherwise.
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            return;
        };
        let mut w = CpioWriter::new(Vec::new());
        w.file("a/b.txt", 0o644, b"xyz").unwrap();
        let bytes = w.finish().unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a\na/b.txt\n");
    }

    #[test]
    fn rejects_garbage() {
        assert!(read_archive(b"not a cpio archive at all, definitely not, no no no no no no no no no no no no no no no no no no no no no no no no no no").is_err());
    }
}
