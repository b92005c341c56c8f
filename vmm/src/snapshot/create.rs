//! A live snapshot: memory is copied while the guest runs, then the VM
//! stops only for the pages dirtied since and for the device and CPU
//! state.
//!
//! 1. dirty logging on (KVM's log for vCPU writes, vm-memory's bitmap for
//!    the VMM's own writes);
//! 2. copy every page (full) or every page that differs from the parent
//!    chain (incremental), guest running;
//! 3. up to `MAX_ROUNDS` rounds: copy the pages dirtied during the
//!    previous round, until few are left;
//! 4. pause; stop the device threads (net RX) by holding their locks;
//!    copy the last dirty pages; read vCPU, VM and device state; resume
//!    (a VM that was paused stays paused);
//! 5. dirty logging off; state and manifest written; the directory is
//!    renamed into place.
//!
//! The pause is step 4 only: it grows with what the guest dirties in the
//! last round, not with memory size. A VM paused before the snapshot
//! starts gets one exact copy with its devices held, no dirty logging.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use super::format::{self, Manifest, ManifestDisk, MemoryState, SnapshotKind, Staging};
use super::memory::{self, PageSet, PAGE_SIZE};
use super::vcpu::VcpuState;
use super::vm_state::VmState;
use super::{ParentRef, SavedConfig, SnapshotError, SnapshotState};
use crate::devices::set::DeviceSet;
use crate::memory::GuestMemory;
use crate::vcpu_control::VcpuControl;

/// Pre-copy rounds before the final, paused one.
const MAX_ROUNDS: usize = 6;
/// Stop pre-copying when a round leaves fewer dirty pages than this
/// (4 MiB): copying them paused is quicker than another round.
const FEW_PAGES: u64 = 1024;

/// What a live snapshot reads from the running VM.
pub struct Source<'a> {
    pub vm: &'a VmFd,
    pub control: &'a VcpuControl,
    pub memory: &'a GuestMemory,
    pub devices: &'a DeviceSet,
    /// The VM's configuration; `disks` is filled in during the pause from
    /// `disks` below and the devices' own state.
    pub config: SavedConfig,
    pub msr_indices: &'a [u32],
    /// The disk files the VM uses now (a clone point changes them).
    pub disks: &'a std::sync::Mutex<Vec<crate::config::DiskConfig>>,
}

pub struct CreateOptions {
    pub out: PathBuf,
    pub parent: Option<PathBuf>,
    /// A clone point: the snapshot's disks become new overlays for the
    /// clone, and this VM moves onto overlays of its own (`fork_disks`).
    pub clone: Option<CloneDisks>,
}

/// Where a clone point puts the disk overlays, and the two VMs' names.
pub struct CloneDisks {
    pub dir: PathBuf,
    pub origin: String,
    pub clone: String,
}

/// Where a snapshot is, for progress reports.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub phase: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

pub use dvisor_api::protocol::CreateReport;

/// The parent chain's content, mapped read-only, for comparing pages.
struct ParentView {
    maps: Vec<(Mapping, Option<PageSet>)>,
}

struct Mapping {
    ptr: *const u8,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr/len are exactly what mmap returned.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

impl ParentView {
    fn open(dir: &std::path::Path) -> Result<(ParentView, format::Loaded), SnapshotError> {
        let chain = format::chain(dir)?;
        let mut maps = Vec::new();
        for l in &chain {
            let p = l.dir.join(format::MEMORY_FILE);
            let f = std::fs::File::open(&p).map_err(|e| SnapshotError::Io(format!("opening {}", p.display()), e))?;
            let len = l.state.memory_file_len() as usize;
            let ptr = if len == 0 {
                std::ptr::null()
            } else {
                // SAFETY: a fresh private read-only mapping of a file we
                // opened, checked below; unmapped in Drop.
                let p = unsafe {
                    libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, std::os::fd::AsRawFd::as_raw_fd(&f), 0)
                };
                if p == libc::MAP_FAILED {
                    return Err(SnapshotError::Io("mapping the parent's memory".into(), std::io::Error::last_os_error()));
                }
                p as *const u8
            };
            maps.push((Mapping { ptr, len }, l.state.memory.pages.clone()));
        }
        let newest = chain.into_iter().last().ok_or_else(|| SnapshotError::Invalid("empty chain".into()))?;
        Ok((ParentView { maps }, newest))
    }

    /// The page's content in the chain (newest layer holding it).
    fn page(&self, page: u64) -> Option<&[u8]> {
        let off = (page * PAGE_SIZE) as usize;
        for (m, pages) in self.maps.iter().rev() {
            if pages.as_ref().is_none_or(|p| p.contains(page)) {
                if off + PAGE_SIZE as usize > m.len {
                    return None;
                }
                // SAFETY: inside the mapping (checked above); the file is
                // a finished snapshot nobody writes.
                return Some(unsafe { std::slice::from_raw_parts(m.ptr.add(off), PAGE_SIZE as usize) });
            }
        }
        None
    }
}

/// The pages of `all` whose content differs from the parent chain's.
fn changed_since(mem: &GuestMemory, all: &PageSet, parent: &ParentView) -> PageSet {
    use vm_memory::{Bytes, GuestAddress};
    let mut out = PageSet::with_pages(all.words.len() as u64 * 64);
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for page in all.iter() {
        if mem.read_slice(&mut buf, GuestAddress(page * PAGE_SIZE)).is_err() {
            continue;
        }
        if parent.page(page) != Some(&buf[..]) {
            out.insert(page);
        }
    }
    out
}

pub fn create(
    src: &Source<'_>,
    opts: &CreateOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<CreateReport, SnapshotError> {
    let start = Instant::now();
    let staging = Staging::new(&opts.out)?;
    let ranges = memory::ram_ranges(src.memory);
    let all = memory::all_pages(&ranges);
    let total_bytes = all.count() * PAGE_SIZE;
    let parent = match &opts.parent {
        Some(dir) => {
            let (view, newest) = ParentView::open(dir)?;
            let s = &newest.state;
            if s.memory.ranges != ranges || usize::from(s.config.vcpus) != src.control.vcpus() {
                return Err(SnapshotError::Invalid(format!(
                    "parent {} is of a VM with {} vCPUs and {} MiB; this one has {} and {} MiB",
                    dir.display(),
                    s.config.vcpus,
                    s.config.mem_mib,
                    src.control.vcpus(),
                    src.config.mem_mib
                )));
            }
            let dir = std::path::absolute(dir).map_err(|e| SnapshotError::Io("resolving --parent".into(), e))?;
            Some((view, ParentRef { id: s.id.clone(), dir }))
        }
        None => None,
    };
    let file = staging.memory_file(ranges.iter().map(|r| r.gpa + r.size).max().unwrap_or(0))?;

    // A VM paused from the start cannot change its memory while it stays
    // so, once the devices' threads are held too: one copy is exact, and
    // dirty logging (write-protecting all of guest memory, costly on
    // nested KVM) is not needed. A ShadowReboot shadow is snapshotted so.
    let mut held = if src.control.is_paused() { Some(src.devices.lock_all()) } else { None };
    let frozen = held.is_some() && src.control.is_paused();
    if !frozen {
        held = None;
    }
    let logging = !frozen;
    if logging {
        memory::set_dirty_logging(src.vm, src.memory, true)?;
    }
    // Whatever happens next, logging goes off again.
    struct LoggingOff<'a>(&'a VmFd, &'a GuestMemory, bool);
    impl Drop for LoggingOff<'_> {
        fn drop(&mut self) {
            if !self.2 {
                return;
            }
            if let Err(e) = memory::set_dirty_logging(self.0, self.1, false) {
                tracing::warn!("turning dirty logging off: {e}");
            }
        }
    }
    let _off = LoggingOff(src.vm, src.memory, logging);
    let mut dirty = PageSet::with_pages(all.words.len() as u64 * 64);
    if logging {
        memory::reset_own_writes(src.memory);
        memory::take_dirty(src.vm, src.memory, &mut dirty)?;
        dirty.clear();
    }

    let mut report = |phase, done| progress(Progress { phase, bytes_done: done, bytes_total: total_bytes });
    // Round 0: everything, or what differs from the parent.
    let mut layer = match &parent {
        None => all.clone(),
        Some((view, _)) => changed_since(src.memory, &all, view),
    };
    let mut written = memory::write_pages(src.memory, &file, &layer, true, &mut |b| report("copying memory", b))?;
    let mut rounds = 1u32;
    // Pre-copy rounds only while the guest runs (not for a frozen VM).
    if logging {
        loop {
            memory::take_dirty(src.vm, src.memory, &mut dirty)?;
            if dirty.count() < FEW_PAGES || rounds as usize >= MAX_ROUNDS {
                break;
            }
            let s = memory::write_pages(src.memory, &file, &dirty, false, &mut |b| report("copying dirtied pages", b))?;
            written.bytes_written += s.bytes_written;
            layer.union(&dirty);
            dirty.clear();
            rounds += 1;
        }
    }

    // The pause.
    let pause_start = Instant::now();
    let (was_paused, _) = src.control.pause();
    let captured = (|| {
        let mut _devices = held.take().unwrap_or_else(|| src.devices.lock_all());
        if logging {
            memory::take_dirty(src.vm, src.memory, &mut dirty)?;
        }
        let last = dirty.count();
        let s = memory::write_pages(src.memory, &file, &dirty, false, &mut |_| {})?;
        layer.union(&dirty);
        let mut vcpus = Vec::new();
        for id in 0..src.control.vcpus() {
            let indices = src.msr_indices.to_vec();
            let state = src
                .control
                .run_on(id, move |fd| VcpuState::save(id as u32, fd, &indices))
                .ok_or_else(|| SnapshotError::WrongState("the guest stopped while its vCPUs were being saved".into()))??;
            vcpus.push(state);
        }
        let vm = VmState::save(src.vm)?;
        let devices = _devices.state()?;
        let mut config = src.config.clone();
        // The disk files in use and their identity at this instant (guest
        // writes stopped), as their devices report them.
        let current = src.disks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        config.disks = current
            .into_iter()
            .zip(&devices.blocks)
            .map(|(c, (_, b))| super::SavedDisk { config: c, identity: b.image.clone() })
            .collect();
        if let Some(c) = &opts.clone {
            std::fs::create_dir_all(&c.dir).map_err(|e| SnapshotError::Io(format!("creating {}", c.dir.display()), e))?;
            let forked = _devices.fork_disks(&c.dir, &c.origin, &c.clone)?;
            let mut now = src.disks.lock().unwrap_or_else(|p| p.into_inner());
            for f in forked {
                if let (Some(d), Some(cur)) = (config.disks.get_mut(f.index), now.get_mut(f.index)) {
                    cur.path = f.origin.clone();
                    d.config.path = f.clone.clone();
                    d.identity = f.clone_identity.clone();
                }
            }
        }
        Ok::<_, SnapshotError>((vcpus, vm, devices, config, s.bytes_written, last))
    })();
    if !was_paused {
        src.control.resume();
    }
    let pause = pause_start.elapsed();
    if frozen && !was_paused {
        // Resumed by someone while its memory was copied without a log.
        return Err(SnapshotError::WrongState("the VM was resumed during the snapshot of it paused: take it again".into()));
    }
    let (vcpus, vm, devices, config, last_bytes, last_pages) = captured?;
    written.bytes_written += last_bytes;
    drop(_off);

    let kind = if parent.is_some() { SnapshotKind::Incremental } else { SnapshotKind::Full };
    let id = format::new_id();
    let state = SnapshotState {
        id: id.clone(),
        parent: parent.as_ref().map(|p| p.1.clone()),
        manifest_crc: 0,
        config: config.clone(),
        memory: MemoryState { ranges, pages: parent.as_ref().map(|_| layer.clone()) },
        vcpus,
        vm,
        devices,
        was_paused,
    };
    let total = start.elapsed();
    let manifest = Manifest {
        format: format::FORMAT_VERSION,
        dvisor_version: format::writer_version().into(),
        id: id.clone(),
        vm_name: config.vm_name.clone(),
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: config.cmdline.clone(),
        vcpus: u32::from(config.vcpus),
        mem_mib: config.mem_mib,
        disks: src
            .config
            .disks
            .iter()
            .map(|d| ManifestDisk {
                path: d.config.path.clone(),
                read_only: d.config.read_only,
                size: d.identity.size,
                identity: d.identity.to_string(),
            })
            .collect(),
        nets: config.nets.iter().map(|n| n.tap.clone()).collect(),
        parent: state.parent.clone(),
        kind,
        memory_pages: layer.count(),
        memory_bytes: written.bytes_written,
        was_paused,
        pause_ms: ms(pause),
        total_ms: ms(total),
    };
    let dir = staging.commit(state, &manifest)?;
    Ok(CreateReport {
        dir,
        id,
        kind,
        was_paused,
        pause_ns: pause.as_nanos() as u64,
        total_ns: start.elapsed().as_nanos() as u64,
        precopy_rounds: rounds,
        pages_in_layer: layer.count(),
        bytes_written: written.bytes_written,
        last_round_pages: last_pages,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
