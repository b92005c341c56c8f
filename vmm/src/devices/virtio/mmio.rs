//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): the register
//! file a guest driver programs, the device status state machine, feature
//! negotiation and queue setup. Register values are guest-controlled: each
//! write is checked against the state it may legally change.
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{IrqLine, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC};
use crate::devices::bus::MmioDevice;
use crate::devices::DeviceStateError;
use crate::memory::GuestMemory;

/// Size of a device's MMIO window (registers plus config space), as QEMU
/// microvm describes it in the DSDT.
pub const MMIO_LEN: u64 = 0x200;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"DVSR");

pub(crate) mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

pub const INT_USED_BUFFER: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Which half of a 64-bit queue address a register write sets.
#[derive(Clone, Copy)]
enum Half {
    Low,
    High,
}

#[derive(Clone, Copy)]
enum Ring {
    Desc,
    Driver,
    Device,
}

/// Names the transport in [`DeviceStateError`]s.
const DEVICE: &str = "virtio-mmio";

/// One queue's state, for snapshots: a serde copy of virtio-queue's
/// `QueueState` (which has none). The ring contents live in guest memory;
/// this is where the device is in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// Largest size the device offers (QueueNumMax).
    pub max_size: u16,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use (never, today: it is not offered).
    pub event_idx_enabled: bool,
    /// Size the driver chose (QueueNum).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest address of the used (device) ring.
    pub used_ring: u64,
}

impl From<QueueState> for VirtqueueState {
    fn from(q: QueueState) -> Self {
        VirtqueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&VirtqueueState> for QueueState {
    fn from(q: &VirtqueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's register file and queues, for snapshots: everything
/// the driver programmed. Not the device behind it (each device type has
/// its own state), the guest memory or the interrupt line.
///
/// Nothing else is cached from the registers: interrupt suppression
/// (VRING_AVAIL_F_NO_INTERRUPT) is read from the available ring in guest
/// memory at each use, and virtio-queue's `num_added` only matters with
/// EVENT_IDX, which is not offered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device type behind the transport (DeviceID), checked on restore.
    pub device_type: u32,
    /// Device status (virtio 1.2 §2.1).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote (accepted once FEATURES_OK is set).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus bits the driver has not acknowledged.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// One per queue of the device, in queue order.
    pub queues: Vec<VirtqueueState>,
}

/// One virtio device behind its MMIO window. Register it on the MMIO bus
/// at its base; route the tap or other host events to `process_queue`.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemory,
    irq: Box<dyn IrqLine>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemory, irq: Box<dyn IrqLine>) -> Result<Self, VirtioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| VirtioError::Queue(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            irq,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        })
    }

    /// The register file and queues, for a snapshot. Take it with the
    /// device quiescent (vCPUs and the device's I/O threads paused), so
    /// that it agrees with guest memory.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Puts `device` behind a transport programmed as `state` says, over
    /// `mem` (the restored guest memory). Refuses state that does not fit
    /// the device (type, queue count and sizes) or that no driver could
    /// have produced. Neither processes the queues nor raises an interrupt;
    /// see [`MmioTransport::reassert_irq`].
    pub fn from_state(device: D, mem: GuestMemory, irq: Box<dyn IrqLine>, state: &MmioTransportState) -> Result<Self, VirtioError> {
        let bad = |reason: String| VirtioError::State(DeviceStateError::invalid(DEVICE, reason));
        if state.device_type != device.device_type() {
            return Err(bad(format!("saved for device type {}, restored onto type {}", state.device_type, device.device_type())));
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(bad(format!("{} queues saved, the device has {}", state.queues.len(), max_sizes.len())));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (q, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                return Err(bad(format!("queue {i}: maximum size {} saved, the device's is {max}", q.max_size)));
            }
            if q.event_idx_enabled {
                return Err(bad(format!("queue {i}: EVENT_IDX in use, but it is never offered")));
            }
            // Checks the sizes and the ring alignment; a queue the driver
            // never set up (not ready, size max, rings at 0) passes.
            queues.push(Queue::try_from(QueueState::from(q)).map_err(|e| bad(format!("queue {i}: {e}")))?);
        }
        let transport = MmioTransport {
            device,
            mem,
            irq,
            queues,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            interrupt_status: state.interrupt_status,
            config_generation: state.config_generation,
        };
        transport.check_restored_registers().map_err(bad)?;
        Ok(transport)
    }

    /// What `set_status`, `write_reg` and `raise` let the registers become.
    fn check_restored_registers(&self) -> Result<(), String> {
        use status::*;
        let s = self.status;
        let known = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET | FAILED;
        if s & !known != 0 {
            return Err(format!("status {s:#x} has bits no driver or device sets"));
        }
        for (bit, needs) in [(DRIVER, ACKNOWLEDGE), (FEATURES_OK, DRIVER), (DRIVER_OK, FEATURES_OK), (DEVICE_NEEDS_RESET, DRIVER_OK)] {
            if s & bit != 0 && s & needs == 0 {
                return Err(format!("status {s:#x} has bit {bit:#x} without bit {needs:#x}"));
            }
        }
        if s & FEATURES_OK != 0 && !self.features_acceptable() {
            return Err(format!(
                "features {:#x} accepted, but {:#x} were offered (VERSION_1 required)",
                self.driver_features,
                self.offered_features()
            ));
        }
        if s & DRIVER == 0 && self.driver_features != 0 {
            return Err(format!("driver features {:#x} written before the driver was found", self.driver_features));
        }
        if self.interrupt_status & !(INT_USED_BUFFER | INT_CONFIG_CHANGE) != 0 {
            return Err(format!("interrupt status {:#x} has unknown bits", self.interrupt_status));
        }
        Ok(())
    }

    /// Signals the interrupt line again if the driver has an interrupt it
    /// has not acknowledged. After a restore whose interrupt controller
    /// state may have lost the edge this keeps the driver from waiting
    /// forever; if it was not lost the driver sees one more interrupt and
    /// finds nothing new, which virtio drivers take in their stride.
    pub fn reassert_irq(&self) {
        if self.interrupt_status != 0 {
            if let Err(e) = self.irq.trigger() {
                tracing::warn!("virtio: cannot raise interrupt: {e}");
            }
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC
    }

    /// The features the driver accepted (valid once FEATURES_OK is set).
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// Runs the device on queue `index` and interrupts the guest if it
    /// wants to hear about the used buffers. A no-op unless the driver has
    /// brought the device up.
    pub fn process_queue(&mut self, index: usize) {
        let live = self.status & status::DRIVER_OK != 0
            && self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0;
        let Some(queue) = self.queues.get_mut(index) else { return };
        if !live || !queue.ready() {
            return;
        }
        if !queue.is_valid(&self.mem) {
            tracing::debug!("virtio: queue {index} rings are outside guest memory");
            self.status |= status::DEVICE_NEEDS_RESET;
            self.raise(INT_CONFIG_CHANGE);
            return;
        }
        if self.device.process_queue(index, queue, &self.mem) && wants_interrupt(queue, &self.mem) {
            self.raise(INT_USED_BUFFER);
        }
    }

    /// Tells the driver the config space changed (e.g. net link status).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.raise(INT_CONFIG_CHANGE);
        }
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.irq.trigger() {
            tracing::warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues.iter_mut().for_each(QueueT::reset);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered_features() == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    /// The driver may only add status bits, in the order of virtio 1.2
    /// §3.1.1, or write 0 to reset. FEATURES_OK sticks only if the features
    /// it accepted are ones we offered, VERSION_1 among them; the driver
    /// reads the status back to learn that.
    fn set_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        let value = (value & !DEVICE_NEEDS_RESET) | (self.status & DEVICE_NEEDS_RESET);
        if value & self.status != self.status {
            tracing::debug!("virtio: driver tried to clear status bits {:#x} -> {value:#x}", self.status);
            return;
        }
        let added = value & !self.status;
        let mut new = self.status | (added & FAILED);
        for (bit, needs) in [(ACKNOWLEDGE, 0), (DRIVER, ACKNOWLEDGE), (FEATURES_OK, DRIVER), (DRIVER_OK, FEATURES_OK)] {
            let allowed = new & needs == needs && (bit != FEATURES_OK || self.features_acceptable());
            if added & bit != 0 && allowed {
                new |= bit;
            }
        }
        let went_live = new & DRIVER_OK != 0 && self.status & DRIVER_OK == 0;
        self.status = new;
        if went_live {
            // Buffers the driver queued before DRIVER_OK (RX buffers, say)
            // got no notification we acted on.
            (0..self.queues.len()).for_each(|i| self.process_queue(i));
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may still configure it: a queue
    /// is frozen while ready.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize).filter(|q| !q.ready())
    }

    fn set_ring_address(&mut self, ring: Ring, half: Half, value: u32) {
        let Some(q) = self.configurable_queue() else { return };
        let old = match ring {
            Ring::Desc => q.desc_table(),
            Ring::Driver => q.avail_ring(),
            Ring::Device => q.used_ring(),
        };
        let new = GuestAddress(match half {
            Half::Low => (old & !0xffff_ffff) | u64::from(value),
            Half::High => (old & 0xffff_ffff) | (u64::from(value) << 32),
        });
        // Misaligned addresses are refused by the queue; the driver then
        // finds its rings unused, its own failure.
        let _ = match ring {
            Ring::Desc => q.try_set_desc_table_address(new),
            Ring::Driver => q.try_set_avail_ring_address(new),
            Ring::Device => q.try_set_used_ring_address(new),
        };
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let features = self.offered_features();
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // No shared memory regions: their length reads as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let negotiating = self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if negotiating => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let (Some(q), Ok(size)) = (self.configurable_queue(), u16::try_from(value)) {
                    let _ = q.try_set_size(size);
                }
            }
            reg::QUEUE_READY => match value {
                0 => {
                    if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                        q.set_ready(false);
                    }
                }
                1 => {
                    if let Some(q) = self.configurable_queue() {
                        q.set_ready(true);
                    }
                }
                _ => {}
            },
            reg::QUEUE_NOTIFY => self.process_queue(value as usize),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => self.set_status(value),
            reg::QUEUE_DESC_LOW => self.set_ring_address(Ring::Desc, Half::Low, value),
            reg::QUEUE_DESC_HIGH => self.set_ring_address(Ring::Desc, Half::High, value),
            reg::QUEUE_DRIVER_LOW => self.set_ring_address(Ring::Driver, Half::Low, value),
            reg::QUEUE_DRIVER_HIGH => self.set_ring_address(Ring::Driver, Half::High, value),
            reg::QUEUE_DEVICE_LOW => self.set_ring_address(Ring::Device, Half::Low, value),
            reg::QUEUE_DEVICE_HIGH => self.set_ring_address(Ring::Device, Half::High, value),
            _ => tracing::trace!("virtio: ignored write {value:#x} at {offset:#x}"),
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.device.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
}

/// Without EVENT_IDX (not offered) the driver suppresses interrupts with
/// VRING_AVAIL_F_NO_INTERRUPT, which virtio-queue does not look at. An
/// unreadable flag is the guest's problem: send an interrupt it can ignore.
///
/// The fence first: this is one half of a store-then-load handshake. The
/// driver, ending a poll, clears NO_INTERRUPT, issues a full barrier and
/// reads the used index once more (Linux: virtqueue_enable_cb_prepare,
/// then virtqueue_poll after virtio_mb). We stored the used index
/// (add_used) and now load the flag; x86 lets that load pass the store
/// still in the store buffer, so without a full fence both sides can read
/// the other's old value: the driver sees no new buffer, we see the flag
/// still set, no interrupt goes out, and the queue stalls for good (a net
/// RX queue then holds its last frame until the guest posts buffers, which
/// it never does). Seen as guests whose network died mid-test in CI.
fn wants_interrupt(queue: &Queue, mem: &GuestMemory) -> bool {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map_or(true, |flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.read_config(offset - reg::CONFIG, data);
        } else if let Ok(out) = <&mut [u8; 4]>::try_from(&mut *data) {
            *out = self.read_reg(offset).to_le_bytes();
        } else {
            // Registers are 32-bit only (virtio 1.2 §4.2.2.2).
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // Nothing we offer has a writable config field.
            return;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::block::{Block, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use crate::devices::virtio::net::{Net, NetBackend, DEFAULT_MAC};
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::EventFdIrq;

    /// Completes every chain untouched; counts the chains it saw.
    struct Null {
        seen: usize,
    }

    impl VirtioDevice for Null {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn config(&self) -> &[u8] {
            &[1, 2, 3, 4, 5, 6, 7, 8]
        }
        fn process_queue(&mut self, _: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
            let mut used = false;
            while let Some(c) = queue.pop_descriptor_chain(mem) {
                self.seen += 1;
                used |= crate::devices::virtio::chain::put_used(queue, mem, c.head_index(), 0);
            }
            used
        }
    }

    fn null() -> Driver<Null> {
        Driver::new(Null { seen: 0 })
    }

    fn one_buffer(d: &mut Driver<Null>) -> u16 {
        let addr = d.alloc(16);
        d.add_chain(0, &[Buf { addr, len: 16, write: true }])
    }

    #[test]
    fn identity_and_feature_words() {
        let mut d = null();
        assert_eq!(d.read32(MAGIC), 0x7472_6976);
        assert_eq!(d.read32(reg::VERSION), 2);
        assert_eq!(d.read32(DEVICE_ID), 42);
        d.write32(DEVICE_FEATURES_SEL, 0);
        assert_eq!(d.read32(DEVICE_FEATURES), 1 | (1 << 28));
        d.write32(DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.read32(DEVICE_FEATURES), 1); // VERSION_1
        d.write32(DEVICE_FEATURES_SEL, 7);
        assert_eq!(d.read32(DEVICE_FEATURES), 0);
        assert_eq!(d.config(0, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(d.config(6, 4), [7, 8, 0, 0], "past the end reads zero");
    }

    #[test]
    fn features_without_version_1_or_not_offered_are_refused() {
        for (low, high) in [(1, 0), (1 | 2, 1), (0, 1 | 4)] {
            let mut d = null();
            d.write32(STATUS, status::ACKNOWLEDGE);
            d.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER);
            d.write32(DRIVER_FEATURES_SEL, 0);
            d.write32(DRIVER_FEATURES, low);
            d.write32(DRIVER_FEATURES_SEL, 1);
            d.write32(DRIVER_FEATURES, high);
            d.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            assert_eq!(d.read32(STATUS) & status::FEATURES_OK, 0, "{low:#x} {high:#x}");
        }
        let mut d = null();
        assert_eq!(d.probe(u64::MAX, 2), 1 | (1 << 28) | VIRTIO_F_VERSION_1);
        assert_eq!(d.dev.acked_features(), 1 | (1 << 28) | VIRTIO_F_VERSION_1);
        // Features are frozen once accepted.
        d.write32(DRIVER_FEATURES_SEL, 0);
        d.write32(DRIVER_FEATURES, 0);
        assert_eq!(d.dev.acked_features() & 1, 1);
    }

    #[test]
    fn status_bits_only_grow_in_order_until_reset() {
        let mut d = null();
        d.write32(STATUS, status::DRIVER_OK);
        assert_eq!(d.read32(STATUS), 0, "DRIVER_OK needs the steps before it");
        d.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET | 0x30);
        assert_eq!(d.read32(STATUS), status::ACKNOWLEDGE | status::DRIVER, "device-owned and reserved bits ignored");
        d.write32(STATUS, status::ACKNOWLEDGE);
        assert_eq!(d.read32(STATUS), status::ACKNOWLEDGE | status::DRIVER, "bits are not cleared but by reset");

        d.probe(u64::MAX, 2);
        one_buffer(&mut d);
        d.notify(0);
        assert_ne!(d.read32(INTERRUPT_STATUS), 0);
        d.write32(STATUS, 0);
        assert_eq!(d.read32(STATUS), 0);
        assert_eq!(d.read32(INTERRUPT_STATUS), 0);
        d.write32(QUEUE_SEL, 0);
        assert_eq!(d.read32(QUEUE_READY), 0);
        assert_eq!(d.dev.acked_features(), 0);
        d.notify(0);
        assert_eq!(d.dev.device().seen, 1, "a reset device ignores notifications");
    }

    #[test]
    fn queues_configure_only_while_not_ready() {
        let mut d = null();
        d.write32(QUEUE_SEL, 1);
        assert_eq!(d.read32(QUEUE_NUM_MAX), 8);
        d.write32(QUEUE_SEL, 2);
        assert_eq!(d.read32(QUEUE_NUM_MAX), 0, "no such queue");
        d.write32(QUEUE_READY, 1);
        assert_eq!(d.read32(QUEUE_READY), 0);

        d.probe(u64::MAX, 2);
        d.write32(QUEUE_SEL, 0);
        d.write32(QUEUE_DESC_LOW, 0x0bad_0000);
        d.write32(QUEUE_NUM, 3);
        let head = one_buffer(&mut d);
        d.notify(0);
        assert_eq!(d.used(0), vec![(u32::from(head), 0)], "a ready queue keeps its rings");

        d.write32(QUEUE_READY, 0);
        assert_eq!(d.read32(QUEUE_READY), 0);
        one_buffer(&mut d);
        d.notify(0);
        assert!(d.used(0).is_empty(), "a disabled queue is not processed");
    }

    #[test]
    fn buffers_queued_before_driver_ok_run_on_driver_ok() {
        // Probe by hand, stopping short of DRIVER_OK.
        let mut e = null();
        e.write32(STATUS, status::ACKNOWLEDGE);
        e.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        e.write32(DRIVER_FEATURES_SEL, 1);
        e.write32(DRIVER_FEATURES, 1);
        e.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        e.write32(QUEUE_SEL, 0);
        e.write32(QUEUE_NUM, 16);
        for (i, a) in [0x10000u32, 0x11000, 0x12000].into_iter().enumerate() {
            e.write32(QUEUE_DESC_LOW + 0x10 * i as u64, a);
        }
        e.write32(QUEUE_READY, 1);
        e.mem.write_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 2, 0, 0, 0], GuestAddress(0x10000)).unwrap();
        e.mem.write_obj(0u16, GuestAddress(0x11004)).unwrap();
        e.mem.write_obj(1u16, GuestAddress(0x11002)).unwrap();
        e.notify(0);
        assert_eq!(e.dev.device().seen, 0);
        e.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert_eq!(e.dev.device().seen, 1);
        assert_eq!(e.irq.count(), 1);
    }

    #[test]
    fn interrupts_ack_and_config_generation() {
        let mut d = null();
        d.probe(u64::MAX, 2);
        let gen = d.read32(CONFIG_GENERATION);
        d.dev.config_changed();
        assert_eq!(d.read32(CONFIG_GENERATION), gen.wrapping_add(1));
        assert_eq!(d.read32(INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        one_buffer(&mut d);
        d.notify(0);
        assert_eq!(d.read32(INTERRUPT_STATUS), INT_CONFIG_CHANGE | INT_USED_BUFFER);
        d.write32(INTERRUPT_ACK, INT_CONFIG_CHANGE);
        assert_eq!(d.read32(INTERRUPT_STATUS), INT_USED_BUFFER);
        assert_eq!(d.irq.count(), 2);

        // VRING_AVAIL_F_NO_INTERRUPT: the driver polls, no interrupt.
        d.ack_interrupt();
        d.mem.write_obj(1u16, GuestAddress(0x11000)).unwrap();
        one_buffer(&mut d);
        d.notify(0);
        assert_eq!(d.used(0).len(), 2);
        assert_eq!(d.irq.count(), 2);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut d = null();
        let mut two = [0xffu8; 2];
        d.dev.read(MAGIC, &mut two);
        assert_eq!(two, [0, 0], "registers are 32-bit only");
        d.dev.write(STATUS, &[1, 0]);
        assert_eq!(d.read32(STATUS), 0);
        let mut eight = [0xffu8; 8];
        d.dev.read(CONFIG, &mut eight);
        assert_eq!(eight, [1, 2, 3, 4, 5, 6, 7, 8]);
        d.dev.read(u64::MAX, &mut eight);
        assert_eq!(eight, [0; 8]);
        d.dev.write(u64::MAX, &[1; 8]);
        d.dev.read(0x2, &mut [0u8; 4]);
        d.dev.write(0x71, &[1, 2, 3, 4]);
        d.dev.read(0, &mut []);
    }

    #[test]
    fn rings_outside_memory_make_the_device_need_reset() {
        let mut d = null();
        d.probe(u64::MAX, 2);
        d.write32(QUEUE_SEL, 1);
        d.write32(QUEUE_READY, 0);
        d.write32(QUEUE_DESC_LOW + 4, 0x10); // descriptor table at 64 GiB
        d.write32(QUEUE_READY, 1);
        d.notify(1);
        assert_ne!(d.read32(STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(d.read32(INTERRUPT_STATUS) & INT_CONFIG_CHANGE, INT_CONFIG_CHANGE);
        d.probe(u64::MAX, 2);
        assert_eq!(d.read32(STATUS) & status::DEVICE_NEEDS_RESET, 0, "reset clears it");
    }

    /// Replaces the transport by one rebuilt from its state (after a trip
    /// through JSON) over the same memory; returns the old one.
    fn restore(d: &mut Driver<Null>) -> MmioTransport<Null> {
        let state = d.dev.state();
        let back: MmioTransportState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(back, state);
        let device = Null { seen: d.dev.device().seen };
        let new = MmioTransport::from_state(device, d.mem.clone(), Box::new(d.irq.clone()), &back).unwrap();
        assert_eq!(new.state(), state);
        std::mem::replace(&mut d.dev, new)
    }

    /// Every register the driver can read, each queue's included.
    fn registers<D: VirtioDevice>(d: &mut Driver<D>) -> Vec<u32> {
        let mut regs: Vec<u32> = (0..0x100).step_by(4).map(|o| d.read32(o)).collect();
        regs.extend(d.config(0, 8).into_iter().map(u32::from));
        let sel = d.dev.state().queue_sel;
        for q in 0..3 {
            d.write32(QUEUE_SEL, q);
            regs.extend([d.read32(QUEUE_NUM_MAX), d.read32(QUEUE_READY)]);
        }
        d.write32(QUEUE_SEL, sel);
        regs
    }

    #[test]
    fn state_round_trips_and_the_queues_carry_on() {
        let mut d = null();
        d.probe(u64::MAX, 2);
        one_buffer(&mut d);
        d.notify(0);
        assert_eq!(d.used(0).len(), 1);
        d.dev.config_changed();
        d.write32(DEVICE_FEATURES_SEL, 1);
        d.write32(DRIVER_FEATURES_SEL, 1);
        d.write32(QUEUE_SEL, 1);
        // Published on queue 1, not yet notified.
        let addr = d.alloc(16);
        let pending = d.add_chain(1, &[Buf { addr, len: 16, write: true }]);
        let before = registers(&mut d);
        let irqs = d.irq.count();

        let old = restore(&mut d);
        assert_eq!(registers(&mut d), before);
        assert_eq!(d.irq.count(), irqs, "restoring raises nothing by itself");
        assert_eq!(d.dev.acked_features(), old.acked_features());
        assert_eq!(d.read32(INTERRUPT_STATUS), INT_USED_BUFFER | INT_CONFIG_CHANGE);
        // Each queue resumes where it was: nothing taken twice, nothing
        // skipped, used entries where the driver looks for them.
        d.notify(1);
        assert_eq!(d.used(1), vec![(u32::from(pending), 0)]);
        let head = one_buffer(&mut d);
        d.notify(0);
        assert_eq!(d.used(0), vec![(u32::from(head), 0)]);
        assert_eq!(d.dev.device().seen, 3);
        d.dev.reassert_irq();
        assert_eq!(d.irq.count(), irqs + 3);
        d.ack_interrupt();
        d.dev.reassert_irq();
        assert_eq!(d.irq.count(), irqs + 3, "nothing unacknowledged: no interrupt");
    }

    #[test]
    fn unconfigured_queues_and_half_probed_devices_restore() {
        // Untouched, and with only the first queue set up.
        let mut d = null();
        restore(&mut d);
        d.probe(u64::MAX, 1);
        restore(&mut d);
        d.write32(QUEUE_SEL, 1);
        assert_eq!((d.read32(QUEUE_NUM_MAX), d.read32(QUEUE_READY)), (8, 0));
        // Stopped in the middle of feature negotiation: the driver goes on.
        let mut e = null();
        e.write32(STATUS, status::ACKNOWLEDGE);
        e.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        e.write32(DRIVER_FEATURES_SEL, 1);
        e.write32(DRIVER_FEATURES, 1);
        restore(&mut e);
        e.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(e.read32(STATUS) & status::FEATURES_OK, 0);
        assert_eq!(e.dev.acked_features(), VIRTIO_F_VERSION_1);
        // And a restored device probes again from scratch.
        e.probe(u64::MAX, 2);
        let head = one_buffer(&mut e);
        e.notify(0);
        assert_eq!(e.used(0), vec![(u32::from(head), 0)]);
    }

    #[test]
    fn state_that_does_not_fit_is_refused() {
        let mut d = null();
        d.probe(u64::MAX, 2);
        let good = d.dev.state();
        /// Turns a good state into a bad one.
        type Spoil = fn(&mut MmioTransportState);
        let cases: &[(&str, Spoil)] = &[
            ("other device type", |s| s.device_type = 2),
            ("a queue short", |s| {
                s.queues.pop();
            }),
            ("a queue more", |s| s.queues.push(s.queues[0])),
            ("other max size", |s| s.queues[1].max_size = 16),
            ("size over max", |s| s.queues[1].size = 16),
            ("size not a power of 2", |s| s.queues[0].size = 12),
            ("size 0", |s| s.queues[0].size = 0),
            ("misaligned descriptors", |s| s.queues[0].desc_table += 8),
            ("misaligned used ring", |s| s.queues[0].used_ring += 2),
            ("EVENT_IDX", |s| s.queues[0].event_idx_enabled = true),
            ("unknown status bit", |s| s.status |= 0x10),
            ("DRIVER_OK without FEATURES_OK", |s| s.status &= !status::FEATURES_OK),
            ("features not offered", |s| s.driver_features |= 1 << 40),
            ("no VERSION_1", |s| s.driver_features &= !VIRTIO_F_VERSION_1),
            ("features without a driver", |s| s.status = status::ACKNOWLEDGE),
            ("unknown interrupt", |s| s.interrupt_status = 4),
        ];
        for &(what, spoil) in cases {
            let mut bad = good.clone();
            spoil(&mut bad);
            let irq = Box::new(CountingIrq::default());
            match MmioTransport::from_state(Null { seen: 0 }, d.mem.clone(), irq, &bad) {
                Err(VirtioError::State(DeviceStateError::Invalid { device: "virtio-mmio", .. })) => {}
                Err(e) => panic!("{what}: {e}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
    }

    #[test]
    fn random_reachable_states_restore() {
        let mut n = null();
        let mut restores = 0;
        fuzz(&mut n, 2, 5, &mut |d| {
            restore(d);
            restores += 1;
        });
        assert!(restores > 100 && n.dev.device().seen > 10, "{restores} {}", n.dev.device().seen);
    }

    #[test]
    fn eventfd_irq_signals_the_fd() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFdIrq(fd.try_clone().unwrap());
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        assert_eq!(fd.read().unwrap(), 2);
    }

    /// Sends nowhere; receives frames of pseudo-random length.
    struct Noise(Rng);

    impl NetBackend for Noise {
        fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
            Ok(frame.len())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.below(4) {
                0 => Err(io::ErrorKind::WouldBlock.into()),
                _ => Ok((self.0.below(2000) as usize).min(buf.len())),
            }
        }
    }

    const REGS: [u64; 22] = [
        0x00, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
        0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xfc, 0x100, 0x104,
    ];

    /// Random register writes, random ring contents, random notifies,
    /// with enough well-formed probes and published heads that the
    /// garbage reaches the device.
    fn fuzz<D: VirtioDevice>(d: &mut Driver<D>, queues: usize, seed: u64, extra: &mut dyn FnMut(&mut Driver<D>)) {
        let mut rng = Rng(seed);
        d.probe(u64::MAX, queues);
        for _ in 0..4000 {
            match rng.below(12) {
                0 | 1 => {
                    let off = REGS[rng.below(REGS.len() as u64) as usize];
                    let v = match rng.below(4) {
                        0 => rng.below(8) as u32,
                        1 => 0x10000 + 0x1000 * rng.below(16) as u32,
                        2 => 1 << rng.below(32),
                        _ => rng.next() as u32,
                    };
                    d.write32(off, v);
                }
                2 => {
                    let len = [1, 2, 4, 8][rng.below(4) as usize];
                    let bytes = rng.next().to_le_bytes();
                    d.dev.write(rng.below(0x240), &bytes[..len]);
                }
                3 => {
                    let len = [1, 2, 4, 8][rng.below(4) as usize];
                    d.dev.read(rng.below(0x240), &mut [0u8; 8][..len]);
                }
                4..=6 => {
                    // A plausible descriptor in some queue's table.
                    let at = 0x10000 + 0x4000 * rng.below(queues as u64) + 16 * rng.below(256);
                    let addr = if rng.below(4) > 0 { rng.below(MEM_SIZE as u64 + 0x1000) } else { rng.next() };
                    let len = if rng.below(4) > 0 { rng.below(0x3000) as u32 } else { rng.next() as u32 };
                    let mut desc = addr.to_le_bytes().to_vec();
                    desc.extend(len.to_le_bytes());
                    desc.extend((rng.below(8) as u16).to_le_bytes());
                    desc.extend((rng.below(300) as u16).to_le_bytes());
                    d.write_mem(at, &desc);
                }
                7 => {
                    let at = 0x10000 + rng.below(0xc000);
                    d.write_mem(at, &rng.next().to_le_bytes());
                }
                8 => {
                    let q = rng.below(queues as u64) as usize;
                    d.publish(q, rng.below(300) as u16);
                    d.notify(q);
                }
                9 => d.notify(rng.below(queues as u64 + 1) as usize),
                10 => {
                    if rng.below(8) == 0 {
                        d.probe(rng.next() | VIRTIO_F_VERSION_1, queues);
                    }
                }
                _ => extra(d),
            }
        }
    }

    #[test]
    fn random_registers_and_ring_garbage_never_panic() {
        let mut n = null();
        fuzz(&mut n, 2, 1, &mut |_| {});
        assert!(n.dev.device().seen > 10, "the fuzzer reached the device: {}", n.dev.device().seen);

        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(64 * 512).unwrap();
        let mut b = Driver::new(Block::open(img.path(), false).unwrap());
        fuzz(&mut b, 1, 2, &mut |_| {});
        let t = b.dev.device().stats().totals();
        assert!(t.errors > 10, "the fuzzer reached the request parser: {t:?}");
        // Still a working disk afterwards.
        b.probe(u64::MAX, 1);
        let (hdr, data, st) = (0x200000, 0x201000, 0x202000);
        b.write_mem(hdr, &[VIRTIO_BLK_T_IN as u8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let head = b.add_chain(0, &[Buf { addr: hdr, len: 16, write: false }, Buf { addr: data, len: 512, write: true }, Buf { addr: st, len: 1, write: true }]);
        b.notify(0);
        assert_eq!(b.used(0), vec![(u32::from(head), 513)]);
        assert_eq!(b.read_mem(st, 1)[0], VIRTIO_BLK_S_OK);

        let mut net = Driver::new(Net::new(Noise(Rng(3)), DEFAULT_MAC));
        fuzz(&mut net, 2, 4, &mut |d| d.dev.process_rx());
        let t = net.dev.device().stats().totals();
        assert!(t.errors + t.dropped + t.rx_packets + t.tx_packets > 10, "{t:?}");
    }
}
