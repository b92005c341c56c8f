//! virtio-blk (virtio 1.2 §5.2) over a disk image: a raw file or a
//! copy-on-write overlay chain (`disk.rs`, `overlay.rs`).
//!
//! A request is `header (16 bytes, readable) | data | status (1 byte,
//! writable, last)`. Every sector range is checked against the capacity and
//! data moves through a bounded bounce buffer, so a guest asking for 4 GiB
//! costs it time, not the VMM memory.
//!
//! For snapshots and clones the device can describe itself
//! ([`Block::state`], [`BlockState`]), be rebuilt from that description
//! ([`Block::from_state`]), and switch a running VM onto a fresh overlay at
//! a clone point ([`Block::fork`], [`Block::replace_image`]) so that the
//! file it used until then stays frozen for the clones to share.
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::chain::{self, BitmapSlice, Buffers};
pub use super::disk::{DiskIdentity, DiskImage, ImageFormat, SECTOR_SIZE};
use super::disk::{self, DiskError, RawImage};
use super::overlay::Overlay;
use super::stats::{IoKind, StatsHandle};
use super::{VirtioDevice, VirtioError, TYPE_BLOCK};
use crate::memory::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const HEADER_LEN: usize = 16;
/// The serial a GET_ID request returns: 20 bytes, NUL-padded.
pub const ID_LEN: usize = 20;
const BOUNCE_LEN: usize = 128 << 10;

/// Why one request failed; the guest sees IOERR or UNSUPP, we log at debug
/// level only (a guest could otherwise flood the host log).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("request type {0} not supported")]
    Unsupported(u32),
    #[error("data length {0} is not a whole number of sectors")]
    Length(usize),
    #[error("sectors {sector}+{len} bytes lie beyond the disk end")]
    Range { sector: u64, len: usize },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("guest buffer: {0}")]
    Guest(io::Error),
    #[error("disk image: {0}")]
    Disk(io::Error),
}

/// What a virtio-blk device is, beyond its queues (which the transport
/// saves): enough to rebuild it over an image and to check that image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The capacity the guest was told, in 512-byte sectors.
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// The serial GET_ID returns (the guest's /dev/disk/by-id name), kept
    /// across a rebuild even when the image file has another name.
    pub id: String,
    pub format: ImageFormat,
    /// The image file the device was using when the state was taken.
    pub image: DiskIdentity,
}

impl BlockState {
    /// Fails, saying what changed, unless the image file is still the one
    /// recorded: a restored guest must find the disk it left.
    pub fn check_image(&self) -> Result<(), DiskError> {
        self.image.check()
    }
}

/// A virtio-blk device. Requests run synchronously on the vCPU thread that
/// notifies; the image decides where the bytes live.
pub struct Block {
    image: Box<dyn DiskImage>,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    config: Vec<u8>,
    stats: StatsHandle,
    bounce: Vec<u8>,
}

/// The GET_ID serial for a name: its first 20 bytes, NUL-padded.
fn id_bytes(name: &[u8]) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let n = name.len().min(ID_LEN);
    id[..n].copy_from_slice(&name[..n]);
    id
}

impl Block {
    /// Opens the image at `path`: an overlay (and its chain of bases) if the
    /// file starts with the overlay magic, else a raw file. Read-only
    /// images are opened without write access, so not even a VMM bug can
    /// change them. The serial is the file's name.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, VirtioError> {
        Self::new(disk::open_image(path, read_only)?)
    }

    /// A raw image from an open file; `path` names it in errors and gives
    /// the disk its serial.
    pub fn from_file(file: std::fs::File, path: &Path, read_only: bool) -> Result<Self, VirtioError> {
        Self::new(Box::new(RawImage::from_file(file, path, read_only, disk::Lock::Shared)?))
    }

    /// A device over `image`, whose file name becomes the serial.
    pub fn new(image: Box<dyn DiskImage>) -> Result<Self, VirtioError> {
        let name = image.path().file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_else(|| b"dvisor-disk".to_vec());
        Self::with_id(image, id_bytes(&name))
    }

    fn with_id(image: Box<dyn DiskImage>, id: [u8; ID_LEN]) -> Result<Self, VirtioError> {
        let size = image.size();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size { path: image.path().to_owned(), size }.into());
        }
        let mut config = Vec::with_capacity(24);
        config.extend((size / SECTOR_SIZE).to_le_bytes()); // capacity
        config.extend(0u32.to_le_bytes()); // size_max: not offered
        config.extend((u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        config.extend([0u8; 4]); // geometry: not offered
        config.extend((SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        Ok(Block {
            read_only: image.read_only(),
            image,
            capacity: size,
            id,
            config,
            stats: StatsHandle::default(),
            bounce: vec![0; BOUNCE_LEN],
        })
    }

    /// Rebuilds a device from a saved state over `image`, which must have
    /// the saved capacity and access; the serial is the saved one. Whether
    /// `image` is the saved file is the caller's check
    /// ([`BlockState::check_image`]): a clone is rebuilt over its own
    /// overlay, not over the file the state names.
    pub fn from_state(state: &BlockState, image: Box<dyn DiskImage>) -> Result<Self, VirtioError> {
        let mismatch = |reason: String| VirtioError::ImageMismatch { path: image.path().to_owned(), reason };
        if image.size() != state.capacity_sectors.saturating_mul(SECTOR_SIZE) {
            return Err(mismatch(format!(
                "the image is {} bytes but the saved device had {} sectors ({} bytes)",
                image.size(),
                state.capacity_sectors,
                state.capacity_sectors.saturating_mul(SECTOR_SIZE)
            )));
        }
        if image.read_only() != state.read_only {
            return Err(mismatch(format!(
                "the image is open {} but the saved device was {}",
                access(image.read_only()),
                access(state.read_only)
            )));
        }
        Self::with_id(image, id_bytes(state.id.as_bytes()))
    }

    /// The device as it is now, for a snapshot. Call [`Block::sync`] first
    /// (with the VM paused): until then an overlay may hold allocations in
    /// memory whose later flush would change the file after its identity
    /// was taken.
    pub fn state(&self) -> Result<BlockState, VirtioError> {
        let image = self.image.identity().map_err(DiskError::io("read the metadata of", self.image.path()))?;
        let end = self.id.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
        Ok(BlockState {
            capacity_sectors: self.capacity_sectors(),
            read_only: self.read_only,
            id: String::from_utf8_lossy(&self.id[..end]).into_owned(),
            format: self.image.format(),
            image,
        })
    }

    /// Makes every completed guest write durable and puts the image file in
    /// its final state for as long as the guest writes nothing more.
    pub fn sync(&mut self) -> Result<(), VirtioError> {
        self.image.flush().map_err(|e| DiskError::Io { op: "flush", path: self.image.path().to_owned(), source: e }.into())
    }

    /// Serves `image` from now on and hands back the one it replaces, after
    /// flushing it. For a clone point, with the VM paused: the new image
    /// must have the same size and access, since the guest already
    /// negotiated both. On error nothing changes.
    pub fn replace_image(&mut self, image: Box<dyn DiskImage>) -> Result<Box<dyn DiskImage>, VirtioError> {
        let mismatch = |reason: String| VirtioError::ImageMismatch { path: image.path().to_owned(), reason };
        if image.size() != self.capacity {
            return Err(mismatch(format!("the image is {} bytes but the device has {} bytes", image.size(), self.capacity)));
        }
        if image.read_only() != self.read_only {
            return Err(mismatch(format!(
                "the image is open {} but the device is {}",
                access(image.read_only()),
                access(self.read_only)
            )));
        }
        self.sync()?;
        Ok(std::mem::replace(&mut self.image, image))
    }

    /// The clone point for this disk: syncs the image, freezes its file
    /// under a new overlay at `overlay` and serves that overlay from now on.
    /// Returns the frozen file's identity; clones get their own overlays
    /// over it (`Overlay::create(&identity.path, ...)`), and the file must
    /// not be written again. A read-only disk never changes, so it is left
    /// as it is and its own identity returned. On error the device keeps
    /// its image and no overlay is left behind.
    pub fn fork(&mut self, overlay: &Path) -> Result<DiskIdentity, VirtioError> {
        self.sync()?;
        let frozen = self.image.path().to_owned();
        if self.read_only {
            return Ok(self.image.identity().map_err(DiskError::io("read the metadata of", &frozen))?);
        }
        Overlay::create(&frozen, overlay)?;
        let switched = Overlay::open(overlay, false)
            .map_err(VirtioError::from)
            .and_then(|ov| self.replace_image(Box::new(ov)));
        match switched {
            // The old handle is synced, so dropping it writes nothing.
            Ok(old) => drop(old),
            Err(e) => {
                let _ = std::fs::remove_file(overlay);
                return Err(e);
            }
        }
        Ok(DiskIdentity::of(&frozen)?)
    }

    /// The image served now.
    pub fn image(&self) -> &dyn DiskImage {
        self.image.as_ref()
    }

    /// The file the image was opened from (the top of an overlay chain).
    pub fn image_path(&self) -> PathBuf {
        self.image.path().to_owned()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Runs one well-formed chain; returns the bytes written to the guest.
    fn execute(&mut self, mut b: Buffers<'_>) -> u32 {
        let Some(status_at) = b.writer.available_bytes().checked_sub(1).filter(|_| b.ends_writable) else {
            tracing::debug!("virtio-blk: request {} has no writable status byte", b.head);
            self.stats.error();
            return 0;
        };
        let mut status_w = match b.writer.split_at(status_at) {
            Ok(w) => w,
            Err(_) => return 0,
        };
        let result = match b.reader.read_obj::<[u8; HEADER_LEN]>() {
            Ok(header) => self.request(&header, &mut b.reader, &mut b.writer),
            Err(e) => Err(RequestError::Guest(e)),
        };
        let status = match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::debug!("virtio-blk: request {} failed: {e}", b.head);
                self.stats.error();
                match e {
                    RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
                    _ => VIRTIO_BLK_S_IOERR,
                }
            }
        };
        if status_w.write_all(&[status]).is_err() {
            return 0;
        }
        u32::try_from(b.writer.bytes_written() + 1).unwrap_or(u32::MAX)
    }

    fn request(&mut self, header: &[u8; HEADER_LEN], reader: &mut Reader<'_, BitmapSlice<'_>>, writer: &mut Writer<'_, BitmapSlice<'_>>) -> Result<(), RequestError> {
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *header;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);
        match kind {
            VIRTIO_BLK_T_IN => self.read(sector, writer),
            VIRTIO_BLK_T_OUT => self.write(sector, reader),
            VIRTIO_BLK_T_FLUSH => {
                self.image.flush().map_err(RequestError::Disk)?;
                self.stats.record(IoKind::Flush, 0);
                Ok(())
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(ID_LEN);
                writer.write_all(&self.id[..n]).map_err(RequestError::Guest)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole
    /// sectors inside the disk.
    fn range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        if !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Length(len));
        }
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|start| start.checked_add(len as u64).is_some_and(|end| end <= self.capacity))
            .ok_or(RequestError::Range { sector, len })
    }

    fn read(&mut self, sector: u64, writer: &mut Writer<'_, BitmapSlice<'_>>) -> Result<(), RequestError> {
        let len = writer.available_bytes();
        let mut offset = self.range(sector, len)?;
        let mut left = len;
        while left > 0 {
            let chunk = &mut self.bounce[..left.min(BOUNCE_LEN)];
            self.image.read_at(chunk, offset).map_err(RequestError::Disk)?;
            writer.write_all(chunk).map_err(RequestError::Guest)?;
            offset += chunk.len() as u64;
            left -= chunk.len();
        }
        self.stats.record(IoKind::Read, len as u64);
        Ok(())
    }

    fn write(&mut self, sector: u64, reader: &mut Reader<'_, BitmapSlice<'_>>) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        let len = reader.available_bytes();
        let mut offset = self.range(sector, len)?;
        let mut left = len;
        while left > 0 {
            let chunk = &mut self.bounce[..left.min(BOUNCE_LEN)];
            reader.read_exact(chunk).map_err(RequestError::Guest)?;
            self.image.write_at(chunk, offset).map_err(RequestError::Disk)?;
            offset += chunk.len() as u64;
            left -= chunk.len();
        }
        self.stats.record(IoKind::Write, len as u64);
        Ok(())
    }
}

fn access(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        // virtio-queue refuses an avail index more than a queue size
        // ahead of ours, so a lying driver cannot make us spin on it.
        while let Some(c) = queue.pop_descriptor_chain(mem) {
            let head = c.head_index();
            let len = match chain::buffers(c, mem) {
                Ok(b) => self.execute(b),
                Err(e) => {
                    tracing::debug!("virtio-blk: chain {head} refused: {e}");
                    self.stats.error();
                    0
                }
            };
            used |= chain::put_used(queue, mem, head, len);
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::devices::virtio::disk;
    use crate::devices::virtio::testing::{Buf, Driver, RawDesc, F_NEXT, F_WRITE, INTERRUPT_STATUS};
    use crate::devices::virtio::VIRTIO_F_VERSION_1;

    const ALL: u64 = u64::MAX;

    fn image(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn driver(img: &tempfile::NamedTempFile, read_only: bool) -> Driver<Block> {
        let mut d = Driver::new(Block::open(img.path(), read_only).unwrap());
        let features = d.probe(ALL, 1);
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        d
    }

    /// One request as virtio_blk sends it: header, data, status. Returns
    /// (status, used length).
    fn request(d: &mut Driver<Block>, kind: u32, sector: u64, data: &mut Vec<u8>) -> (u8, u32) {
        let hdr = d.alloc(16);
        let mut h = kind.to_le_bytes().to_vec();
        h.extend(0u32.to_le_bytes());
        h.extend(sector.to_le_bytes());
        d.write_mem(hdr, &h);
        let device_writes = kind != VIRTIO_BLK_T_OUT;
        let buf = d.alloc(data.len() as u32);
        d.write_mem(buf, data);
        let status = d.alloc(1);
        d.write_mem(status, &[0xff]);
        let mut bufs = vec![Buf { addr: hdr, len: 16, write: false }];
        if !data.is_empty() {
            bufs.push(Buf { addr: buf, len: data.len() as u32, write: device_writes });
        }
        bufs.push(Buf { addr: status, len: 1, write: true });
        let head = d.add_chain(0, &bufs);
        d.notify(0);
        let used = d.used(0);
        assert_eq!(used.len(), 1, "one request, one used entry");
        assert_eq!(used[0].0, u32::from(head));
        *data = d.read_mem(buf, data.len());
        (d.read_mem(status, 1)[0], used[0].1)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn read_write_flush_round_trip() {
        let img = image(&vec![0u8; 64 * 512]);
        let mut d = driver(&img, false);
        assert_eq!(d.config(0, 8), 64u64.to_le_bytes());
        assert_eq!(d.config(20, 4), 512u32.to_le_bytes());
        let stats = d.dev.device().stats();

        let data = pattern(2 * 512, 7);
        let irqs = d.irq.count();
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 3, &mut data.clone()), (VIRTIO_BLK_S_OK, 1));
        assert!(d.irq.count() > irqs, "interrupt line triggered");
        assert_eq!(d.read32(INTERRUPT_STATUS) & 1, 1);
        assert_eq!(d.ack_interrupt() & 1, 1);
        assert_eq!(d.read32(INTERRUPT_STATUS), 0);

        assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &mut Vec::new()), (VIRTIO_BLK_S_OK, 1));
        let on_disk = std::fs::read(img.path()).unwrap();
        assert_eq!(&on_disk[3 * 512..5 * 512], &data[..]);

        let mut back = vec![0u8; 2 * 512];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 3, &mut back), (VIRTIO_BLK_S_OK, 1024 + 1));
        assert_eq!(back, data);

        // The last sector is in range; one past it is not.
        let mut last = vec![0u8; 512];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 63, &mut last).0, VIRTIO_BLK_S_OK);

        let t = stats.totals();
        assert_eq!((t.write_ops, t.write_bytes), (1, 1024));
        assert_eq!((t.read_ops, t.read_bytes), (2, 1024 + 512));
        assert_eq!((t.flush_ops, t.errors), (1, 0));
        assert_eq!(stats.snapshot().records.len(), 4);
    }

    #[test]
    fn large_requests_cross_the_bounce_buffer() {
        let img = image(&vec![0u8; 1 << 20]);
        let mut d = driver(&img, false);
        let data = pattern(300 << 10, 3);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 8, &mut data.clone()).0, VIRTIO_BLK_S_OK);
        let mut back = vec![0u8; data.len()];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 8, &mut back).0, VIRTIO_BLK_S_OK);
        assert_eq!(back, data);
    }

    #[test]
    fn read_only_refuses_writes() {
        let original = pattern(8 * 512, 1);
        let img = image(&original);
        let mut d = Driver::new(Block::open(img.path(), true).unwrap());
        assert_ne!(d.probe(ALL, 1) & VIRTIO_BLK_F_RO, 0);
        let (status, len) = request(&mut d, VIRTIO_BLK_T_OUT, 0, &mut vec![0xaa; 512]);
        assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1));
        assert_eq!(std::fs::read(img.path()).unwrap(), original);
        let mut back = vec![0u8; 512];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 1, &mut back).0, VIRTIO_BLK_S_OK);
        assert_eq!(back, &original[512..1024]);
        assert_eq!(d.dev.device().stats().totals().errors, 1);
    }

    #[test]
    fn out_of_range_and_odd_lengths_fail_with_ioerr() {
        let img = image(&vec![0u8; 8 * 512]);
        let mut d = driver(&img, false);
        for (sector, len) in [(8, 512), (7, 1024), (u64::MAX, 512), (u64::MAX / 512, 512), (0, 100)] {
            let mut buf = vec![0u8; len];
            assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, sector, &mut buf).0, VIRTIO_BLK_S_IOERR, "read {sector}+{len}");
            assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, sector, &mut buf).0, VIRTIO_BLK_S_IOERR, "write {sector}+{len}");
        }
        assert_eq!(std::fs::read(img.path()).unwrap(), vec![0u8; 8 * 512]);
        assert_eq!(request(&mut d, 99, 0, &mut Vec::new()).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn get_id_names_the_image() {
        let img = image(&[0u8; 512]);
        let mut d = driver(&img, false);
        let mut id = vec![0u8; 20];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_GET_ID, 0, &mut id), (VIRTIO_BLK_S_OK, 21));
        let name = img.path().file_name().unwrap().as_encoded_bytes();
        let n = name.len().min(20);
        assert_eq!(&id[..n], &name[..n]);
    }

    #[test]
    fn odd_sized_image_is_refused_with_its_name_and_size() {
        let img = image(&[0u8; 1000]);
        let err = Block::open(img.path(), false).err().expect("a 1000-byte image must be refused");
        let msg = err.to_string();
        assert!(msg.contains(&img.path().display().to_string()), "{msg}");
        assert!(msg.contains("1000 bytes") && msg.contains("512"), "{msg}");
        let missing = Block::open(Path::new("/nonexistent/disk.img"), true).err().expect("missing image");
        assert!(missing.to_string().contains("/nonexistent/disk.img"));
    }

    /// A raw base of `sectors` patterned sectors and an overlay over it.
    fn base_and_overlay(dir: &tempfile::TempDir, sectors: usize) -> (PathBuf, PathBuf) {
        let base = dir.path().join("base.raw");
        std::fs::write(&base, pattern(sectors * 512, 5)).unwrap();
        let ovl = dir.path().join("vm.ovl");
        Overlay::create(&base, &ovl).unwrap();
        (base, ovl)
    }

    fn get_id(d: &mut Driver<Block>) -> Vec<u8> {
        let mut id = vec![0u8; 20];
        assert_eq!(request(d, VIRTIO_BLK_T_GET_ID, 0, &mut id).0, VIRTIO_BLK_S_OK);
        id
    }

    #[test]
    fn an_overlay_disk_reads_the_base_and_writes_only_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let (base, ovl) = base_and_overlay(&dir, 256);
        let base_bytes = std::fs::read(&base).unwrap();
        let mut d = Driver::new(Block::open(&ovl, false).unwrap());
        d.probe(ALL, 1);
        assert_eq!(d.config(0, 8), 256u64.to_le_bytes(), "the capacity is the base's");
        assert_eq!(d.dev.device().image().format(), ImageFormat::Overlay);

        let mut back = vec![0u8; 4 * 512];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 10, &mut back).0, VIRTIO_BLK_S_OK);
        assert_eq!(back, &base_bytes[10 * 512..14 * 512]);

        let data = pattern(3 * 512, 99);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 130, &mut data.clone()).0, VIRTIO_BLK_S_OK);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &mut Vec::new()).0, VIRTIO_BLK_S_OK);
        let mut back = vec![0u8; 5 * 512];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 129, &mut back).0, VIRTIO_BLK_S_OK);
        assert_eq!(&back[..512], &base_bytes[129 * 512..130 * 512]);
        assert_eq!(&back[512..4 * 512], &data[..]);
        assert_eq!(&back[4 * 512..], &base_bytes[133 * 512..134 * 512]);
        assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "the base is never written");

        // The flush made the allocation durable: a second reader sees it.
        let again = Overlay::open(&ovl, true).unwrap();
        assert_eq!(again.allocated_clusters(), 1);
        let mut on_disk = vec![0u8; 3 * 512];
        again.read_at(&mut on_disk, 130 * 512).unwrap();
        assert_eq!(on_disk, data);
    }

    #[test]
    fn fork_freezes_the_disk_for_clones_and_keeps_the_guest_view() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, vec![0u8; 256 * 512]).unwrap();
        let mut d = Driver::new(Block::open(&img, false).unwrap());
        d.probe(ALL, 1);
        let id = get_id(&mut d);
        let before = pattern(512, 1);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 7, &mut before.clone()).0, VIRTIO_BLK_S_OK);

        // The clone point, for this disk.
        let parent_ovl = dir.path().join("parent.ovl");
        let frozen = d.dev.device_mut().fork(&parent_ovl).unwrap();
        assert_eq!(frozen, DiskIdentity::of(&img).unwrap());
        assert_eq!(d.dev.device().image_path(), parent_ovl);
        let clone_ovl = dir.path().join("clone.ovl");
        Overlay::create(&frozen.path, &clone_ovl).unwrap();
        let frozen_bytes = std::fs::read(&img).unwrap();

        // The parent goes on: it reads what it wrote and writes the overlay.
        assert_eq!(get_id(&mut d), id, "the serial does not change");
        let mut back = vec![0u8; 512];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 7, &mut back).0, VIRTIO_BLK_S_OK);
        assert_eq!(back, before);
        let after = pattern(512, 2);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 7, &mut after.clone()).0, VIRTIO_BLK_S_OK);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &mut Vec::new()).0, VIRTIO_BLK_S_OK);
        assert_eq!(std::fs::read(&img).unwrap(), frozen_bytes, "the frozen file stays frozen");
        assert!(frozen.check().is_ok());

        // The clone sees the disk as it was at the clone point.
        let clone = Block::from_state(&d.dev.device().state().unwrap(), disk::open_image(&clone_ovl, false).unwrap()).unwrap();
        let mut c = Driver::new(clone);
        c.probe(ALL, 1);
        assert_eq!(get_id(&mut c), id);
        let mut back = vec![0u8; 512];
        assert_eq!(request(&mut c, VIRTIO_BLK_T_IN, 7, &mut back).0, VIRTIO_BLK_S_OK);
        assert_eq!(back, before);

        // Forking again chains: the parent's overlay is frozen in turn.
        let second = dir.path().join("parent2.ovl");
        let frozen2 = d.dev.device_mut().fork(&second).unwrap();
        assert_eq!(frozen2.path, parent_ovl);
        let info = crate::devices::virtio::overlay::info(&second).unwrap();
        assert_eq!((info.base, info.base_format), (std::fs::canonicalize(&parent_ovl).unwrap(), ImageFormat::Overlay));
    }

    #[test]
    fn replace_image_refuses_another_size_or_access_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (base, ovl) = base_and_overlay(&dir, 64);
        let small = dir.path().join("small.raw");
        std::fs::write(&small, vec![0u8; 32 * 512]).unwrap();
        let mut b = Block::open(&base, false).unwrap();
        let err = b.replace_image(disk::open_image(&small, false).unwrap()).err().expect("size");
        let msg = err.to_string();
        assert!(msg.contains("small.raw") && msg.contains("16384 bytes") && msg.contains("32768"), "{msg}");
        let err = b.replace_image(disk::open_image(&ovl, true).unwrap()).err().expect("access");
        assert!(err.to_string().contains("read-only"), "{err}");
        assert_eq!(b.image_path(), base);
        let old = b.replace_image(disk::open_image(&ovl, false).unwrap()).unwrap();
        assert_eq!((old.path(), b.image_path()), (base.as_path(), ovl.clone()));

        // A fork that cannot create its overlay leaves the device as it was.
        let mut b = Block::open(&base, true).unwrap();
        assert_eq!(b.fork(&dir.path().join("unused.ovl")).unwrap().path, base, "read-only: nothing to freeze");
        assert!(!dir.path().join("unused.ovl").exists());
        let mut b = Block::open(&small, false).unwrap();
        assert!(b.fork(&ovl).is_err(), "the overlay name is taken");
        assert_eq!(b.image_path(), small);
    }

    #[test]
    fn state_round_trips_and_names_a_changed_image() {
        let dir = tempfile::tempdir().unwrap();
        let (_base, ovl) = base_and_overlay(&dir, 64);
        let mut b = Block::open(&ovl, false).unwrap();
        b.sync().unwrap();
        let state = b.state().unwrap();
        assert_eq!((state.capacity_sectors, state.read_only, state.id.as_str()), (64, false, "vm.ovl"));
        assert_eq!((state.format, state.image.path.as_path()), (ImageFormat::Overlay, ovl.as_path()));
        let json = serde_json::to_string(&state).unwrap();
        let back: BlockState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert!(state.check_image().is_ok());
        drop(b);
        assert!(state.check_image().is_ok(), "closing a synced disk writes nothing");

        let b = Block::from_state(&state, disk::open_image(&ovl, false).unwrap()).unwrap();
        assert_eq!(b.state().unwrap(), state);
        drop(b);
        let err = Block::from_state(&state, disk::open_image(&ovl, true).unwrap()).err().expect("access");
        assert!(err.to_string().contains("read-write"), "{err}");
        let mut short = state.clone();
        short.capacity_sectors = 63;
        assert!(Block::from_state(&short, disk::open_image(&ovl, false).unwrap()).is_err());

        let mut w = Overlay::open(&ovl, false).unwrap();
        w.write_at(&[1u8; 512], 0).unwrap();
        drop(w);
        let msg = state.check_image().unwrap_err().to_string();
        assert!(msg.contains("vm.ovl") && msg.contains("changed"), "{msg}");
    }

    #[test]
    fn malformed_chains_fail_alone() {
        let img = image(&vec![0u8; 16 * 512]);
        let mut d = driver(&img, false);
        let hdr = d.alloc(16);
        let mut h = VIRTIO_BLK_T_OUT.to_le_bytes().to_vec();
        h.extend([0u8; 12]);
        d.write_mem(hdr, &h);
        let data = d.alloc(512);
        d.write_mem(data, &[0x55; 512]);
        let status = d.alloc(1);
        let far = 0xffff_ff00_0000u64;
        let cases: Vec<(&str, Vec<RawDesc>)> = vec![
            ("header outside memory", vec![(far, 16, F_NEXT, 1), (status, 1, F_WRITE, 0)]),
            ("data straddles the end of memory", vec![(hdr, 16, F_NEXT, 1), ((16 << 20) - 256, 512, F_NEXT, 2), (status, 1, F_WRITE, 0)]),
            ("status outside memory", vec![(hdr, 16, F_NEXT, 1), (far, 1, F_WRITE, 0)]),
            ("loop", vec![(hdr, 16, F_NEXT, 1), (data, 512, F_NEXT, 0)]),
            ("next out of range", vec![(hdr, 16, F_NEXT, 999)]),
            ("read-only status", vec![(hdr, 16, F_NEXT, 1), (data, 512, F_NEXT, 2), (status, 1, 0, 0)]),
            ("readable after writable", vec![(status, 1, F_WRITE | F_NEXT, 1), (hdr, 16, 0, 0)]),
            ("huge length", vec![(hdr, 16, F_NEXT, 1), (data, u32::MAX, F_NEXT, 2), (status, 1, F_WRITE, 0)]),
            ("indirect table outside memory", vec![(far, 64, 4, 0)]),
            ("zero-length indirect table", vec![(hdr, 0, 4, 0)]),
        ];
        for (what, descs) in cases {
            let head = d.add_raw(0, &descs);
            d.notify(0);
            let used = d.used(0);
            assert_eq!(used, vec![(u32::from(head), 0)], "{what}");
        }
        assert_eq!(std::fs::read(img.path()).unwrap(), vec![0u8; 16 * 512], "no malformed write reached the disk");

        // A header too short fails with IOERR (the status byte is fine).
        let short = d.add_chain(0, &[Buf { addr: hdr, len: 8, write: false }, Buf { addr: status, len: 1, write: true }]);
        d.notify(0);
        assert_eq!(d.used(0), vec![(u32::from(short), 1)]);
        assert_eq!(d.read_mem(status, 1)[0], VIRTIO_BLK_S_IOERR);

        // A head index beyond the queue is dropped without an entry.
        d.publish(0, 4000);
        d.notify(0);
        assert!(d.used(0).is_empty());

        let good = pattern(512, 9);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 2, &mut good.clone()).0, VIRTIO_BLK_S_OK);
        let mut back = vec![0u8; 512];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 2, &mut back).0, VIRTIO_BLK_S_OK);
        assert_eq!(back, good);
        assert!(d.dev.device().stats().totals().errors >= 11);
    }
}
