//! Guest RAM backed by one memfd, so that the monitor can later map the very
//! same pages (zero copy) after receiving the fd over the support API.
use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::error::VmmError;
use crate::layout;

/// With a dirty bitmap: every write the VMM makes through it (virtio
/// rings, received frames, disk reads) is marked, which KVM's dirty log
/// cannot see (snapshot/memory.rs).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    pub memory: GuestMemory,
    pub memfd: File,
    pub size: u64,
}

impl GuestRam {
    pub fn new(size: u64) -> Result<Self, VmmError> {
        let memfd = create_memfd("dvisor-guest-ram", size)?;
        let mut file_off = 0u64;
        let mut ranges = Vec::new();
        for (gpa, len) in layout::ram_ranges(size) {
            let fd = memfd.try_clone().map_err(VmmError::GuestMemory)?;
            ranges.push((
                GuestAddress(gpa),
                len as usize,
                Some(FileOffset::new(fd, file_off)),
            ));
            file_off += len;
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| VmmError::GuestMemoryMap(e.to_string()))?;
        Ok(GuestRam { memory, memfd, size })
    }
}

fn create_memfd(name: &str, size: u64) -> Result<File, VmmError> {
    let cname = CString::new(name).map_err(|_| VmmError::GuestMemoryMap("bad memfd name".into()))?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is
    // checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(VmmError::GuestMemory(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(VmmError::GuestMemory)?;
    seal_size(&file)?;
    Ok(file)
}

/// The memfd goes to the monitor (support API `memory`): sealed at its
/// size first, so no holder of it can truncate the guest's RAM under the
/// VMM (its mappings would then fault with SIGBUS) or grow it; the seals
/// themselves are sealed.
fn seal_size(memfd: &File) -> Result<(), VmmError> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(VmmError::GuestMemory(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_cannot_be_resized_through_its_memfd() {
        let ram = GuestRam::new(128 << 20).unwrap();
        // What a client holding the fd would try.
        let shrink = ram.memfd.set_len(4096).unwrap_err();
        assert_eq!(shrink.raw_os_error(), Some(libc::EPERM), "{shrink}");
        let grow = ram.memfd.set_len(256 << 20).unwrap_err();
        assert_eq!(grow.raw_os_error(), Some(libc::EPERM), "{grow}");
        assert_eq!(ram.memfd.metadata().unwrap().len(), 128 << 20);
    }
}
