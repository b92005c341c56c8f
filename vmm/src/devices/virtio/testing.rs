//! A test driver that does what Linux's virtio_mmio and virtio_ring do:
//! probe through the registers, lay out split rings in a memory image,
//! publish chains, notify, and read the used ring back.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::mmio::{status, MmioTransport};
use super::{IrqLine, VirtioDevice};
use crate::devices::bus::MmioDevice;
use crate::memory::GuestMemory;

pub const MEM_SIZE: usize = 16 << 20;
const RINGS_BASE: u64 = 0x10000;
const RING_STRIDE: u64 = 0x4000;
const DATA_BASE: u64 = 0x100000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub use super::mmio::reg::*;

#[derive(Clone, Default)]
pub struct CountingIrq(pub Arc<AtomicUsize>);

impl CountingIrq {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl IrqLine for CountingIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A descriptor as written to the table: (addr, len, flags, next).
pub type RawDesc = (u64, u32, u16, u16);

/// One buffer of a chain as the driver sees it.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

#[derive(Default, Clone)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

pub struct Driver<D> {
    pub dev: MmioTransport<D>,
    pub mem: GuestMemory,
    pub irq: CountingIrq,
    rings: Vec<Ring>,
    next_data: u64,
}

impl<D: VirtioDevice> Driver<D> {
    pub fn new(device: D) -> Self {
        let mem = memory();
        let irq = CountingIrq::default();
        let dev = MmioTransport::new(device, mem.clone(), Box::new(irq.clone())).unwrap();
        Driver { dev, mem, irq, rings: Vec::new(), next_data: DATA_BASE }
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&mut self, offset: u64, value: u32) {
        self.dev.write(offset, &value.to_le_bytes());
    }

    fn add_status(&mut self, bit: u32) {
        let s = self.read32(STATUS);
        self.write32(STATUS, s | bit);
    }

    pub fn config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let mut b = [0u8];
                self.dev.read(CONFIG + offset + i, &mut b);
                b[0]
            })
            .collect()
    }

    /// virtio_mmio probe + virtio_dev_probe + find_vqs + device_ready.
    /// Returns the negotiated features.
    pub fn probe(&mut self, wanted: u64, queues: usize) -> u64 {
        assert_eq!(self.read32(MAGIC), 0x7472_6976);
        assert_eq!(self.read32(VERSION), 2);
        self.write32(STATUS, 0);
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        self.write32(DEVICE_FEATURES_SEL, 1);
        let mut offered = u64::from(self.read32(DEVICE_FEATURES)) << 32;
        self.write32(DEVICE_FEATURES_SEL, 0);
        offered |= u64::from(self.read32(DEVICE_FEATURES));
        let features = offered & wanted;
        self.write32(DRIVER_FEATURES_SEL, 1);
        self.write32(DRIVER_FEATURES, (features >> 32) as u32);
        self.write32(DRIVER_FEATURES_SEL, 0);
        self.write32(DRIVER_FEATURES, features as u32);
        self.add_status(status::FEATURES_OK);
        assert_ne!(self.read32(STATUS) & status::FEATURES_OK, 0, "device refused features {features:#x}");
        self.rings.clear();
        for q in 0..queues {
            self.setup_queue(q);
        }
        self.add_status(status::DRIVER_OK);
        features
    }

    fn setup_queue(&mut self, q: usize) {
        self.write32(QUEUE_SEL, q as u32);
        assert_eq!(self.read32(QUEUE_READY), 0);
        let size = self.read32(QUEUE_NUM_MAX) as u16;
        assert!(size > 0);
        self.write32(QUEUE_NUM, u32::from(size));
        let base = RINGS_BASE + RING_STRIDE * q as u64;
        let ring = Ring { size, desc: base, avail: base + 0x1000, used: base + 0x2000, ..Ring::default() };
        // Linux allocates its rings zeroed.
        self.write_mem(base, &[0; 0x3000]);
        for (i, addr) in [ring.desc, ring.avail, ring.used].into_iter().enumerate() {
            let reg = QUEUE_DESC_LOW + 0x10 * i as u64;
            self.write32(reg, addr as u32);
            self.write32(reg + 4, (addr >> 32) as u32);
        }
        self.write32(QUEUE_READY, 1);
        self.rings.push(ring);
    }

    /// A fresh buffer in the data area.
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_data;
        self.next_data += (u64::from(len) + 15) & !15;
        addr
    }

    pub fn write_mem(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Writes raw descriptors (addr, len, flags, next) at consecutive
    /// slots and publishes the first as a chain head, without judging
    /// them. `next` counts from the chain's first slot (0 = the head); one
    /// of queue size or more is written as is, out of range. Returns the
    /// head index.
    pub fn add_raw(&mut self, q: usize, descs: &[RawDesc]) -> u16 {
        let ring = self.rings[q].clone();
        let head = ring.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (head as usize + i) % ring.size as usize;
            let at = ring.desc + 16 * slot as u64;
            let next = if next < ring.size { ((head as usize + next as usize) % ring.size as usize) as u16 } else { next };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.write_mem(at, &d);
        }
        let r = &mut self.rings[q];
        r.next_desc = ((head as usize + descs.len()) % r.size as usize) as u16;
        self.publish(q, head);
        head
    }

    pub fn publish(&mut self, q: usize, head: u16) {
        let r = self.rings[q].clone();
        let slot = r.avail + 4 + 2 * u64::from(r.avail_idx % r.size);
        self.write_mem(slot, &head.to_le_bytes());
        let idx = r.avail_idx.wrapping_add(1);
        self.write_mem(r.avail + 2, &idx.to_le_bytes());
        self.rings[q].avail_idx = idx;
    }

    /// A well-formed chain of `bufs`, chained in order.
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let last = i + 1 == bufs.len();
                let flags = if last { 0 } else { F_NEXT } | if b.write { F_WRITE } else { 0 };
                (b.addr, b.len, flags, if last { 0 } else { i as u16 + 1 })
            })
            .collect();
        self.add_raw(q, &descs)
    }

    pub fn notify(&mut self, q: usize) {
        self.write32(QUEUE_NOTIFY, q as u32);
    }

    /// Used entries (id, len) the device added since the last call.
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let r = self.rings[q].clone();
        let idx = u16::from_le_bytes(self.read_mem(r.used + 2, 2).try_into().unwrap());
        let mut out = Vec::new();
        let mut i = r.last_used;
        while i != idx {
            let e = self.read_mem(r.used + 4 + 8 * u64::from(i % r.size), 8);
            out.push((
                u32::from_le_bytes(e[..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..].try_into().unwrap()),
            ));
            i = i.wrapping_add(1);
        }
        self.rings[q].last_used = idx;
        out
    }

    /// The interrupt handler: read and acknowledge InterruptStatus.
    pub fn ack_interrupt(&mut self) -> u32 {
        let s = self.read32(INTERRUPT_STATUS);
        self.write32(INTERRUPT_ACK, s);
        s
    }
}

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
