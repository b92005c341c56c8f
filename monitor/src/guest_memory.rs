//! Guest RAM mapped from the VMM's memfd: reads and writes go straight to
//! the pages the guest uses, with no copy through the VMM.
//!
//! The guest's vCPUs write these pages while we read them, so plain Rust
//! loads and stores (or `copy_nonoverlapping`) would be a data race. The
//! mapping is a `vm_memory` `MmapRegion`, and every access goes through
//! its volatile slices, which copy without the compiler assuming anything
//! about the memory's contents.
use std::fs::File;

use dvisor_api::protocol::MemoryRegion;
use dvisor_api::{MemoryGrant, VmmClient};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory, VolatileSlice};

use crate::error::MonitorError;

pub struct GuestMemoryMap {
    /// The whole memfd, shared and writable; unmapped (and the memfd
    /// closed) on drop.
    map: MmapRegion,
    regions: Vec<MemoryRegion>,
    /// The boot this mapping belongs to: a reboot gets a new memfd.
    pub boot: u64,
}

impl GuestMemoryMap {
    /// Asks the VMM for guest RAM and maps it. `Ok(None)` between boots.
    pub fn from_vmm(vmm: &VmmClient) -> Result<Option<Self>, MonitorError> {
        vmm.memory()?.map(Self::from_grant).transpose()
    }

    /// Maps what a `memory` reply handed over.
    pub fn from_grant(g: MemoryGrant) -> Result<Self, MonitorError> {
        Self::map(g.fd.into(), g.size, g.regions, g.boot)
    }

    pub fn map(file: File, size: u64, regions: Vec<MemoryRegion>, boot: u64) -> Result<Self, MonitorError> {
        for r in &regions {
            if r.offset.checked_add(r.size).is_none_or(|end| end > size) {
                return Err(MonitorError::Protocol(format!("memory region {r:?} lies outside the {size}-byte memfd")));
            }
        }
        let len = usize::try_from(size).map_err(|_| MonitorError::Protocol("guest memory too large".into()))?;
        let map = MmapRegion::from_file(FileOffset::new(file, 0), len).map_err(|e| {
            MonitorError::Io("mapping guest memory".into(), std::io::Error::other(e.to_string()))
        })?;
        Ok(GuestMemoryMap { map, regions, boot })
    }

    pub fn size(&self) -> u64 {
        self.map.size() as u64
    }

    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// The memfd offset of guest-physical `[gpa, gpa+len)`, which must lie
    /// inside one RAM region.
    fn offset(&self, gpa: u64, len: usize) -> Result<usize, MonitorError> {
        let out = || MonitorError::OutOfRange { gpa, len };
        let end = gpa.checked_add(len as u64).ok_or_else(out)?;
        let r = self.regions.iter().find(|r| gpa >= r.gpa && end <= r.gpa + r.size).ok_or_else(out)?;
        Ok((r.offset + (gpa - r.gpa)) as usize)
    }

    fn slice(&self, gpa: u64, len: usize) -> Result<VolatileSlice<'_>, MonitorError> {
        let off = self.offset(gpa, len)?;
        self.map.get_slice(off, len).map_err(|_| MonitorError::OutOfRange { gpa, len })
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MonitorError> {
        // Page-table entries and kernel pointers (a page walk reads four):
        // one aligned 8-byte volatile load, a third cheaper than a copy.
        if let Ok(word) = <&mut [u8; 8]>::try_from(&mut *buf) {
            let off = self.offset(gpa, 8)?;
            if off % 8 == 0 {
                if let Ok(r) = self.map.get_ref::<u64>(off) {
                    *word = r.load().to_le_bytes();
                    return Ok(());
                }
            }
        }
        self.slice(gpa, buf.len())?.copy_to(buf);
        Ok(())
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MonitorError> {
        self.slice(gpa, data.len())?.copy_from(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(size: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f
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
        // Words (the aligned fast path) and unaligned ones.
        let v = 0x1122_3344_5566_7788u64.to_le_bytes();
        m.write(0x10020, &v).unwrap();
        let mut w = [0u8; 8];
        m.read(0x10020, &mut w).unwrap();
        assert_eq!(w, v);
        m.read(0x10021, &mut w).unwrap();
        assert_eq!(w[..7], v[1..]);
        assert!(m.read(0x0ffc, &mut w).is_err(), "a word across a region end");
        let bad = vec![MemoryRegion { gpa: 0, size: 0x3000, offset: 0 }];
        assert!(GuestMemoryMap::map(memfd(0x2000), 0x2000, bad, 1).is_err());
    }
}
