//! The port-I/O and MMIO buses: map address ranges to devices.
use std::sync::{Arc, Mutex, MutexGuard};

/// A device reached through x86 port I/O. `offset` is relative to the base
/// port the device was registered at; `data` is 1, 2 or 4 bytes as the guest
/// issued it.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A device reached through guest-physical MMIO. `offset` is relative to
/// the device's base address; `data` is 1, 2, 4 or 8 bytes.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range<D: ?Sized> {
    base: u64,
    len: u64,
    device: Arc<Mutex<D>>,
}

/// Maps address ranges to devices; one lookup for both address spaces.
pub struct Bus<D: ?Sized> {
    ranges: Vec<Range<D>>,
}

/// x86 port I/O.
pub type PioBus = Bus<dyn PioDevice>;
/// Guest-physical MMIO (devices in the 32-bit hole).
pub type MmioBus = Bus<dyn MmioDevice>;

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus { ranges: Vec::new() }
    }
}

impl<D: ?Sized> Bus<D> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `[base, base+len)`. Overlaps are a VMM bug.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<D>>) {
        debug_assert!(self
            .ranges
            .iter()
            .all(|r| base + len <= r.base || r.base + r.len <= base));
        self.ranges.push(Range { base, len, device });
    }

    /// The device at `addr` (locked) and the offset into it.
    fn find(&self, addr: u64) -> Option<(MutexGuard<'_, D>, u64)> {
        self.ranges
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            // A device mutex poisoned by a panicking vCPU thread still holds
            // valid register state; keep serving rather than cascading.
            .map(|r| (r.device.lock().unwrap_or_else(|p| p.into_inner()), addr - r.base))
    }
}

impl PioBus {
    /// Reads from `port`; ports nobody owns float high, as on a real bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(u64::from(port)) {
            Some((mut d, off)) => d.read(off as u16, data),
            None => data.fill(0xff),
        }
    }

    /// Writes to `port`; writes to unowned ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((mut d, off)) = self.find(u64::from(port)) {
            d.write(off as u16, data);
        }
    }
}

impl MmioBus {
    /// Reads from `addr`; unbacked addresses float high.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((mut d, off)) => d.read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((mut d, off)) = self.find(addr) {
            d.write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_floats_unowned_ports() {
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(0x10))));
        let mut b = [0u8; 1];
        bus.read(0x3fa, &mut b);
        assert_eq!(b[0], 0x12);
        bus.write(0x3f8, &[0x20]);
        bus.read(0x3f8, &mut b);
        assert_eq!(b[0], 0x20);
        bus.read(0x400, &mut b);
        assert_eq!(b[0], 0xff);
    }
}
