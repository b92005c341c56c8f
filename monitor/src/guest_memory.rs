//! Guest RAM mapped from the VMM's memfd: reads and writes go straight to
//! the pages the guest uses, with no copy through the VMM.
use std::os::fd::{AsRawFd, OwnedFd};

use dvisor_vmm::api::protocol::MemoryRegion;

use crate::error::MonitorError;

pub struct GuestMemoryMap {
    base: *mut u8,
    size: usize,
    regions: Vec<MemoryRegion>,
    /// The boot this mapping belongs to: a reboot gets a new memfd.
    pub boot: u64,
    _fd: OwnedFd,
}

// SAFETY: the mapping is shared memory that the guest changes under us
// anyway; we only ever copy in and out of it with volatile-free memcpy, the
// same access the guest's other vCPUs make concurrently.
unsafe impl Send for GuestMemoryMap {}
unsafe impl Sync for GuestMemoryMap {}

impl GuestMemoryMap {
    pub fn map(fd: OwnedFd, size: u64, regions: Vec<MemoryRegion>, boot: u64) -> Result<Self, MonitorError> {
        for r in &regions {
            if r.offset.checked_add(r.size).is_none_or(|end| end > size) {
                return Err(MonitorError::Protocol(format!("memory region {r:?} lies outside the {size}-byte memfd")));
            }
        }
        let len = usize::try_from(size).map_err(|_| MonitorError::Protocol("guest memory too large".into()))?;
        // SAFETY: a fresh shared mapping of the whole memfd; the result is
        // checked, and unmapped only in Drop.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if base == libc::MAP_FAILED {
            return Err(MonitorError::Io("mapping guest memory".into(), std::io::Error::last_os_error()));
        }
        Ok(GuestMemoryMap { base: base as *mut u8, size: len, regions, boot, _fd: fd })
    }

    pub fn size(&self) -> u64 {
        self.size as u64
    }

    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// The memfd offset of guest-physical `[gpa, gpa+len)`, which must lie
    /// inside one RAM region.
    fn offset(&self, gpa: u64, len: usize) -> Result<usize, MonitorError> {
        let end = gpa.checked_add(len as u64).ok_or(MonitorError::OutOfRange { gpa, len })?;
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
            .map(|r| (r.offset + (gpa - r.gpa)) as usize)
            .ok_or(MonitorError::OutOfRange { gpa, len })
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MonitorError> {
        let off = self.offset(gpa, buf.len())?;
        // SAFETY: offset() checked that [off, off+len) is inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MonitorError> {
        let off = self.offset(gpa, data.len())?;
        // SAFETY: as in read.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(off), data.len()) };
        Ok(())
    }
}

impl Drop for GuestMemoryMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(size: u64) -> OwnedFd {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f.into()
    }

    #[test]
    fn reads_and_writes_land_at_the_region_offset_and_stay_in_bounds() {
        let regions = vec![
            MemoryRegion { gpa: 0, size: 0x1000, offset: 0 },
            MemoryRegion { gpa: 0x10000, size: 0x1000, offset: 0x1000 },
        ];
        let m = GuestMemoryMap::map(memfd(0x2000), 0x2000, regions, 1).unwrap();
        m.write(0x10010, b"abc").unwrap();
        let mut b = [0u8; 3];
        m.read(0x10010, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(m.read(0x0ffe, &mut b).is_err(), "crosses a region end");
        assert!(m.read(0x5000, &mut b).is_err(), "hole");
        assert!(m.read(u64::MAX - 1, &mut b).is_err(), "wraps");
        let bad = vec![MemoryRegion { gpa: 0, size: 0x3000, offset: 0 }];
        assert!(GuestMemoryMap::map(memfd(0x2000), 0x2000, bad, 1).is_err());
    }
}
