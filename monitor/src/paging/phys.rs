//! Guest-physical memory access for the page walker: the monitor's mapping
//! of guest RAM, or a plain vector in tests and benchmarks.
use std::cell::RefCell;

use super::PagingError;
use crate::error::MonitorError;
use crate::guest_memory::GuestMemoryMap;

/// Reads of guest-physical memory.
pub trait PhysRead {
    /// Fill `buf` from guest-physical `[gpa, gpa+buf.len())`, or fail with
    /// no guarantee about `buf`'s contents.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PagingError>;

    /// Whether `[gpa, gpa+len)` is readable (and, for `PhysWrite`, writable)
    /// guest RAM. The default probes the first and last byte, which is exact
    /// for ranges inside one 4 KiB page as long as RAM is page-granular.
    fn phys_contains(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = gpa.checked_add(len - 1) else { return false };
        let mut b = [0u8; 1];
        self.read_phys(gpa, &mut b).is_ok() && self.read_phys(last, &mut b).is_ok()
    }
}

/// Writes of guest-physical memory. Takes `&self`: guest RAM is shared
/// memory that the guest's vCPUs change concurrently anyway.
pub trait PhysWrite: PhysRead {
    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), PagingError>;
}

fn map_err(e: MonitorError, gpa: u64, len: usize) -> PagingError {
    match e {
        MonitorError::OutOfRange { gpa, len } => PagingError::PhysOutOfRange { gpa, len: len as u64 },
        // GuestMemoryMap fails only with OutOfRange; keep the request's
        // range for anything else.
        _ => PagingError::PhysOutOfRange { gpa, len: len as u64 },
    }
}

impl PhysRead for GuestMemoryMap {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        self.read(gpa, buf).map_err(|e| map_err(e, gpa, buf.len()))
    }

    fn phys_contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else { return false };
        self.regions().iter().any(|r| gpa >= r.gpa && r.gpa.checked_add(r.size).is_some_and(|rend| end <= rend))
    }
}

impl PhysWrite for GuestMemoryMap {
    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), PagingError> {
        self.write(gpa, data).map_err(|e| map_err(e, gpa, data.len()))
    }
}

/// Guest "RAM" in a vector, at guest-physical `[0, len)`: for tests and for
/// benchmarking the walker on synthetic page tables.
#[derive(Debug, Clone, Default)]
pub struct VecMemory {
    data: RefCell<Vec<u8>>,
}

impl VecMemory {
    pub fn new(size: usize) -> Self {
        VecMemory { data: RefCell::new(vec![0; size]) }
    }

    pub fn from_vec(data: Vec<u8>) -> Self {
        VecMemory { data: RefCell::new(data) }
    }

    pub fn len(&self) -> u64 {
        self.data.borrow().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.data.borrow().is_empty()
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, PagingError> {
        let err = PagingError::PhysOutOfRange { gpa, len: len as u64 };
        let start = usize::try_from(gpa).map_err(|_| err.clone())?;
        let end = start.checked_add(len).ok_or(err.clone())?;
        if end > self.data.borrow().len() {
            return Err(err);
        }
        Ok(start..end)
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, PagingError> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), PagingError> {
        self.write_phys(gpa, &value.to_le_bytes())
    }
}

impl PhysRead for VecMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.data.borrow()[r]);
        Ok(())
    }

    fn phys_contains(&self, gpa: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|len| self.range(gpa, len).is_ok())
    }
}

impl PhysWrite for VecMemory {
    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), PagingError> {
        let r = self.range(gpa, data.len())?;
        self.data.borrow_mut()[r].copy_from_slice(data);
        Ok(())
    }
}
