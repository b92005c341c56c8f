//! virtio-net (virtio 1.2 §5.1) over a Linux tap device.
//!
//! Queue 0 receives, queue 1 transmits. The tap is opened with a 12-byte
//! vnet header, the same layout the guest uses with VERSION_1, so frames
//! pass through with their header. We offer no offloads, so TX headers are
//! zeroed: a guest cannot ask the host kernel for checksum or GSO work.
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader};

use super::chain::{self, BitmapSlice};
use super::stats::{IoKind, StatsHandle};
use super::{MmioTransport, VirtioDevice, VirtioError, TYPE_NET};
use crate::devices::DeviceStateError;
use crate::memory::GuestMemory;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// struct virtio_net_hdr with num_buffers (always present with VERSION_1).
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame a tap hands over without GSO, plus its header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Locally administered (bit 1 of the first octet), unicast.
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0xd5, 0x00, 0x00, 0x00, 0x01];

/// Where frames go and come from. `recv` returns `WouldBlock` when nothing
/// is waiting. Each frame starts with the 12-byte vnet header.
pub trait NetBackend: Send {
    fn send(&mut self, frame: &[u8]) -> io::Result<usize>;
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// A tap interface, non-blocking, with vnet headers.
pub struct Tap {
    file: File,
    name: String,
    /// A detached interface's other end (see `detached`).
    _peer: Option<std::sync::Arc<File>>,
}

impl Tap {
    /// Attaches to tap `name`, creating it if this process may (it then
    /// disappears when the VMM exits unless made persistent beforehand).
    pub fn open(name: &str) -> Result<Tap, VirtioError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
            return Err(VirtioError::TapName(name.to_owned()));
        }
        let fail = |e| VirtioError::TapOpen(name.to_owned(), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(fail)?;
        // SAFETY: ifreq is plain data (bytes, integers, a union of those and
        // a pointer), for which all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `ifr`
        // is, on the tun fd `file` owns; the result is checked.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `hdr_len`; the result is checked.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        Ok(Tap { file, name: name.to_owned(), _peer: None })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another handle on the same tap queue, so that the tap (and the
    /// host's address on it) outlives a guest reboot.
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap { file: self.file.try_clone()?, name: self.name.clone(), _peer: self._peer.clone() })
    }

    /// An interface with no link to the host: what a restored or cloned
    /// VM gets with `--no-net` (its guest keeps the NIC it had, but a
    /// clone must never share its origin's tap). Frames the guest sends
    /// go into a socket nobody reads and are dropped once it is full;
    /// nothing ever arrives.
    pub fn detached() -> Result<Tap, VirtioError> {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two descriptors into `fds`; checked.
        let r = unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        };
        if r != 0 {
            return Err(VirtioError::TapOpen("(detached)".into(), io::Error::last_os_error()));
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (file, peer) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        Ok(Tap { file, name: String::new(), _peer: Some(std::sync::Arc::new(peer)) })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

pub struct Net<B> {
    backend: B,
    mac: [u8; 6],
    config: Vec<u8>,
    stats: StatsHandle,
    /// A frame read from the backend that no RX buffer has taken yet.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    tx_frame: Vec<u8>,
}

/// What the guest would miss of a virtio-net device if lost, for
/// snapshots: its MAC and a received frame still waiting for an RX buffer
/// (a frame the tap has handed over is not there to read again). Not the
/// backend (the tap is the host's; reattach it) nor the statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC in the config space.
    pub mac: [u8; 6],
    /// The frame, vnet header first, that arrived while the guest had no
    /// RX buffer posted; delivered when it posts one. 12 bytes to 64 KiB.
    pub rx_held: Option<Vec<u8>>,
}

impl Net<Tap> {
    pub fn tap(name: &str, mac: [u8; 6]) -> Result<Self, VirtioError> {
        Ok(Net::new(Tap::open(name)?, mac))
    }

    /// Poll this fd for readability and call `process_rx` on the transport.
    pub fn tap_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }
}

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        let mut config = mac.to_vec();
        config.extend(VIRTIO_NET_S_LINK_UP.to_le_bytes());
        Net {
            backend,
            mac,
            config,
            stats: StatsHandle::default(),
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_frame: vec![0; MAX_FRAME],
        }
    }

    /// The MAC and held frame, for a snapshot. Take it with RX stopped
    /// (the net-rx thread not in `process_rx`).
    pub fn state(&self) -> NetState {
        NetState { mac: self.mac, rx_held: self.rx_pending.map(|len| self.rx_frame[..len].to_vec()) }
    }

    /// A device on `backend` as `state` left it: a held frame is delivered
    /// when the guest next posts an RX buffer and notifies, or at the next
    /// `process_rx`. Its statistics start from zero: take a fresh
    /// [`Net::stats`] handle for reporting.
    pub fn from_state(backend: B, state: &NetState) -> Result<Self, VirtioError> {
        let mut net = Net::new(backend, state.mac);
        if let Some(frame) = &state.rx_held {
            if !(VNET_HDR_LEN..=MAX_FRAME).contains(&frame.len()) {
                return Err(DeviceStateError::invalid(
                    "virtio-net",
                    format!("held frame of {} bytes, not {VNET_HDR_LEN} to {MAX_FRAME}", frame.len()),
                )
                .into());
            }
            net.rx_frame[..frame.len()].copy_from_slice(frame);
            net.rx_pending = Some(frame.len());
        }
        Ok(net)
    }

    /// The MAC the guest sees in the config space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// A frame is waiting for the guest to post RX buffers; polling the
    /// backend again would only spin until it does.
    pub fn rx_blocked(&self) -> bool {
        self.rx_pending.is_some()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Moves frames from the backend into RX buffers until either runs
    /// out. A frame without a buffer stays pending for the next call.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_frame) {
                    // A tap never reads empty; if one did, spinning on it
                    // would hold the vCPU that notified us.
                    Ok(0) => return used,
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            tracing::warn!("virtio-net: receive from backend: {e}");
                        }
                        return used;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                self.stats.dropped();
                self.rx_pending = None;
                continue;
            }
            self.rx_pending = Some(len);
            let Some(c) = queue.pop_descriptor_chain(mem) else { return used };
            let head = c.head_index();
            let mut b = match chain::buffers(c, mem) {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!("virtio-net: RX chain {head} refused: {e}");
                    self.stats.error();
                    used |= chain::put_used(queue, mem, head, 0);
                    continue;
                }
            };
            if b.writer.available_bytes() < len {
                // Without MRG_RXBUF a frame must fit one buffer; this one
                // may suit the next frame.
                drop(b);
                queue.go_to_previous_position();
                self.stats.dropped();
                self.rx_pending = None;
                continue;
            }
            let frame = &mut self.rx_frame[..len];
            frame[10..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            let written = match b.writer.write_all(frame) {
                Ok(()) => {
                    self.stats.record(IoKind::Rx, (len - VNET_HDR_LEN) as u64);
                    len as u32
                }
                Err(_) => 0,
            };
            self.rx_pending = None;
            used |= chain::put_used(queue, mem, head, written);
        }
    }

    fn transmit_all(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(c) = queue.pop_descriptor_chain(mem) {
            let head = c.head_index();
            match chain::buffers(c, mem) {
                Ok(mut b) => self.transmit(&mut b.reader),
                Err(e) => {
                    tracing::debug!("virtio-net: TX chain {head} refused: {e}");
                    self.stats.error();
                }
            }
            used |= chain::put_used(queue, mem, head, 0);
        }
        used
    }

    fn transmit(&mut self, reader: &mut Reader<'_, BitmapSlice<'_>>) {
        let len = reader.available_bytes();
        if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
            self.stats.dropped();
            return;
        }
        let frame = &mut self.tx_frame[..len];
        if reader.read_exact(frame).is_err() {
            self.stats.error();
            return;
        }
        frame[..VNET_HDR_LEN].fill(0);
        match self.backend.send(frame) {
            Ok(_) => self.stats.record(IoKind::Tx, (len - VNET_HDR_LEN) as u64),
            // A full tap queue drops the frame, as a NIC would.
            Err(e) => {
                tracing::debug!("virtio-net: send to backend: {e}");
                self.stats.dropped();
            }
        }
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit_all(queue, mem),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.rx_pending = None;
    }
}

impl<B: NetBackend> MmioTransport<Net<B>> {
    /// Call when the backend (tap fd) is readable. Register the fd
    /// edge-triggered: a frame that finds no RX buffer is held until the
    /// guest posts buffers, which runs this again through QueueNotify.
    pub fn process_rx(&mut self) {
        self.process_queue(RX_QUEUE);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::virtio::mmio::MmioTransportState;
    use crate::devices::virtio::testing::{Buf, Driver};
    use crate::devices::virtio::VIRTIO_F_VERSION_1;

    /// Records what the device sends; hands it frames queued by the test.
    #[derive(Clone, Default)]
    struct Wire {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
    }

    impl NetBackend for Wire {
        fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(frame.len())
        }

        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = self.inbox.lock().unwrap().pop_front().ok_or(io::ErrorKind::WouldBlock)?;
            let n = frame.len().min(buf.len());
            buf[..n].copy_from_slice(&frame[..n]);
            Ok(n)
        }
    }

    fn up() -> (Driver<Net<Wire>>, Wire) {
        let wire = Wire::default();
        let mut d = Driver::new(Net::new(wire.clone(), DEFAULT_MAC));
        let f = d.probe(u64::MAX, 2);
        assert_eq!(f & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS), VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS);
        (d, wire)
    }

    fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..payload_len).map(|i| (i as u8) ^ seed));
        f
    }

    fn rx_buffer(d: &mut Driver<Net<Wire>>, len: u32) -> (u16, u64) {
        let addr = d.alloc(len);
        (d.add_chain(RX_QUEUE, &[Buf { addr, len, write: true }]), addr)
    }

    #[test]
    fn config_has_mac_and_link_up() {
        let (mut d, _) = up();
        assert_eq!(d.config(0, 6), DEFAULT_MAC);
        assert_eq!(d.config(6, 2), [1, 0]);
    }

    #[test]
    fn tx_gathers_the_chain_and_zeroes_the_header() {
        let (mut d, wire) = up();
        let hdr = d.alloc(12);
        d.write_mem(hdr, &[1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]); // NEEDS_CSUM, GSO_TCPV4
        let f = frame(64, 5);
        let (a, b) = (d.alloc(14), d.alloc(50));
        d.write_mem(a, &f[12..26]);
        d.write_mem(b, &f[26..]);
        let irqs = d.irq.count();
        let head = d.add_chain(TX_QUEUE, &[Buf { addr: hdr, len: 12, write: false }, Buf { addr: a, len: 14, write: false }, Buf { addr: b, len: 50, write: false }]);
        d.notify(TX_QUEUE);
        assert_eq!(d.used(TX_QUEUE), vec![(u32::from(head), 0)]);
        assert!(d.irq.count() > irqs);
        assert_eq!(*wire.sent.lock().unwrap(), vec![f]);

        // Shorter than a header: dropped, buffer still returned.
        let short = d.add_chain(TX_QUEUE, &[Buf { addr: hdr, len: 8, write: false }]);
        d.notify(TX_QUEUE);
        assert_eq!(d.used(TX_QUEUE), vec![(u32::from(short), 0)]);
        assert_eq!(wire.sent.lock().unwrap().len(), 1);
        let t = d.dev.device().stats().totals();
        assert_eq!((t.tx_packets, t.tx_bytes, t.dropped), (1, 64, 1));
    }

    #[test]
    fn rx_holds_a_frame_until_the_guest_posts_buffers() {
        let (mut d, wire) = up();
        let f1 = frame(60, 1);
        wire.inbox.lock().unwrap().push_back(f1.clone());
        d.dev.process_rx();
        assert!(d.used(RX_QUEUE).is_empty());
        assert!(wire.inbox.lock().unwrap().is_empty(), "read and held");

        let (head, addr) = rx_buffer(&mut d, 1526);
        d.notify(RX_QUEUE);
        assert_eq!(d.used(RX_QUEUE), vec![(u32::from(head), 72)]);
        let got = d.read_mem(addr, 72);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers");
        assert_eq!(&got[12..], &f1[12..]);

        // Two frames, one buffer: the second waits for the next buffer.
        wire.inbox.lock().unwrap().extend([frame(100, 2), frame(200, 3)]);
        let (h2, _) = rx_buffer(&mut d, 1526);
        d.dev.process_rx();
        assert_eq!(d.used(RX_QUEUE), vec![(u32::from(h2), 112)]);
        let (h3, a3) = rx_buffer(&mut d, 1526);
        d.notify(RX_QUEUE);
        assert_eq!(d.used(RX_QUEUE), vec![(u32::from(h3), 212)]);
        assert_eq!(d.read_mem(a3 + 12, 200), &frame(200, 3)[12..]);
        let t = d.dev.device().stats().totals();
        assert_eq!((t.rx_packets, t.rx_bytes), (3, 360));
    }

    #[test]
    fn rx_drops_a_frame_too_big_for_the_buffer_and_keeps_the_buffer() {
        let (mut d, wire) = up();
        let (head, addr) = rx_buffer(&mut d, 64);
        wire.inbox.lock().unwrap().extend([frame(200, 1), frame(40, 2)]);
        d.dev.process_rx();
        assert_eq!(d.used(RX_QUEUE), vec![(u32::from(head), 52)]);
        assert_eq!(d.read_mem(addr + 12, 40), &frame(40, 2)[12..]);
        assert_eq!(d.dev.device().stats().totals().dropped, 1);
    }

    #[test]
    fn malformed_rx_buffers_are_returned_empty() {
        let (mut d, wire) = up();
        let bad = d.add_raw(RX_QUEUE, &[(0xffff_0000_0000, 1526, 2, 0)]);
        let (good, _) = rx_buffer(&mut d, 1526);
        wire.inbox.lock().unwrap().push_back(frame(60, 1));
        d.notify(RX_QUEUE);
        assert_eq!(d.used(RX_QUEUE), vec![(u32::from(bad), 0), (u32::from(good), 72)]);
    }

    /// Rebuilds device and transport from their states (through JSON) on
    /// the same wire and memory.
    fn restore(d: &mut Driver<Net<Wire>>, wire: &Wire) {
        let (net, transport) = (d.dev.device().state(), d.dev.state());
        let net: NetState = serde_json::from_str(&serde_json::to_string(&net).unwrap()).unwrap();
        let transport: MmioTransportState = serde_json::from_str(&serde_json::to_string(&transport).unwrap()).unwrap();
        let dev = Net::from_state(wire.clone(), &net).unwrap();
        assert_eq!(dev.state(), net);
        d.dev = MmioTransport::from_state(dev, d.mem.clone(), Box::new(d.irq.clone()), &transport).unwrap();
    }

    #[test]
    fn a_held_frame_survives_a_restore() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        let wire = Wire::default();
        let mut d = Driver::new(Net::new(wire.clone(), mac));
        d.probe(u64::MAX, 2);
        let held = frame(1400, 9);
        wire.inbox.lock().unwrap().push_back(held.clone());
        d.dev.process_rx();
        assert!(d.dev.device().rx_blocked());
        assert_eq!(d.dev.device().state().rx_held.as_deref(), Some(&held[..]));

        restore(&mut d, &wire);
        assert!(d.dev.device().rx_blocked());
        assert_eq!(d.config(0, 8), [2, 1, 2, 3, 4, 5, 1, 0]);
        assert_eq!(d.dev.device().mac(), mac);
        let (head, addr) = rx_buffer(&mut d, 1526);
        d.notify(RX_QUEUE);
        assert_eq!(d.used(RX_QUEUE), vec![(u32::from(head), 1412)]);
        assert_eq!(d.read_mem(addr + 12, 1400), &held[12..]);
        assert!(!d.dev.device().rx_blocked());
        assert_eq!(d.dev.device().stats().totals().rx_packets, 1, "fresh counters");

        // Nothing held: restores to nothing held, and TX carries on.
        restore(&mut d, &wire);
        assert_eq!(d.dev.device().state().rx_held, None);
        let f = frame(64, 3);
        let a = d.alloc(76);
        d.write_mem(a, &f);
        let h = d.add_chain(TX_QUEUE, &[Buf { addr: a, len: 76, write: false }]);
        d.notify(TX_QUEUE);
        assert_eq!(d.used(TX_QUEUE), vec![(u32::from(h), 0)]);
        assert_eq!(*wire.sent.lock().unwrap(), vec![f]);
    }

    #[test]
    fn held_frames_of_impossible_lengths_are_refused() {
        for len in [0, VNET_HDR_LEN - 1, MAX_FRAME + 1, 1 << 20] {
            let state = NetState { mac: DEFAULT_MAC, rx_held: Some(vec![0; len]) };
            match Net::from_state(Wire::default(), &state) {
                Err(VirtioError::State(DeviceStateError::Invalid { device: "virtio-net", .. })) => {}
                Err(e) => panic!("{len}: {e}"),
                Ok(_) => panic!("{len}: accepted"),
            }
        }
        for len in [VNET_HDR_LEN, MAX_FRAME] {
            let state = NetState { mac: DEFAULT_MAC, rx_held: Some(vec![0; len]) };
            assert!(Net::from_state(Wire::default(), &state).unwrap().rx_blocked());
        }
    }

    #[test]
    fn tap_names_are_checked_before_any_syscall() {
        for name in ["", "a-name-too-long-for-linux", "nul\0"] {
            assert!(matches!(Tap::open(name), Err(VirtioError::TapName(_))), "{name:?}");
        }
    }

    /// Needs CAP_NET_ADMIN; creates a transient tap: `cargo test -p
    /// dvisor-vmm -- --ignored tap_opens`.
    #[test]
    #[ignore]
    fn tap_opens_nonblocking_with_vnet_headers() {
        let net = Net::tap("dvtest0", DEFAULT_MAC).unwrap();
        assert!(net.tap_fd() >= 0);
        assert_eq!(net.backend().name(), "dvtest0");
        let mut tap = net.backend;
        let err = tap.recv(&mut [0u8; 2048]).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock) || err.raw_os_error() == Some(libc::EIO), "{err}");
    }
}
