//! Restoring: every check that can refuse a snapshot runs before a VM
//! exists (`prepare`), then guest memory is filled from the chain of
//! memory files (`load_memory`); `vm.rs` rebuilds vCPUs and devices.
use std::path::Path;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;

use super::format::{self, Loaded};
use super::memory::Layer;
use crate::lazy_memory;
use super::{vcpu, SnapshotError};
use crate::config::VmConfig;
use crate::devices::virtio::block::DiskIdentity;
use crate::memory::GuestRam;

/// Loads and checks the snapshot at `dir` and its parents against this
/// host and `config` (the VM it will become): format, checksums, memory
/// file sizes, CPU features, disks. Returns the chain, base first.
/// `adopt`: the snapshot is another VM's (a ShadowReboot shadow) whose
/// disks stood in for this VM's: their count must match, their identity
/// is not compared (this VM keeps its own files).
pub fn prepare(kvm: &Kvm, dir: &Path, config: &VmConfig, adopt: bool) -> Result<Vec<Loaded>, SnapshotError> {
    let chain = format::chain(dir)?;
    let Some(last) = chain.last() else {
        return Err(SnapshotError::Invalid("empty snapshot chain".into()));
    };
    let state = &last.state;
    let host = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| SnapshotError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    for v in &state.vcpus {
        vcpu::check_cpu_features(&v.cpuid, &host)?;
    }
    let saved = &state.config;
    if saved.mem_mib != config.mem_mib || saved.vcpus != config.vcpus {
        return Err(SnapshotError::Invalid(format!(
            "the snapshot is of a VM with {} vCPUs and {} MiB; this VM has {} and {} MiB",
            saved.vcpus, saved.mem_mib, config.vcpus, config.mem_mib
        )));
    }
    if saved.disks.len() != config.disks.len() || saved.nets.len() != config.nets.len() {
        return Err(SnapshotError::Invalid(format!(
            "the snapshot's VM had {} disks and {} network interfaces; this one has {} and {}",
            saved.disks.len(),
            saved.nets.len(),
            config.disks.len(),
            config.nets.len()
        )));
    }
    for (index, (d, c)) in saved.disks.iter().zip(&config.disks).enumerate() {
        if adopt {
            if d.config.read_only != c.read_only {
                return Err(SnapshotError::Invalid(format!(
                    "disk {index}: the snapshot's VM had it {}, this VM has {} {}",
                    if d.config.read_only { "read-only" } else { "writable" },
                    c.path.display(),
                    if c.read_only { "read-only" } else { "writable" }
                )));
            }
            continue;
        }
        check_disk(index, d, &c.path)?;
    }
    Ok(chain)
}

/// Refuses disk `index` at `path` unless it is the file the snapshot
/// recorded, unchanged since.
pub fn check_disk(index: usize, saved: &super::SavedDisk, path: &Path) -> Result<(), SnapshotError> {
    let changed = |what| SnapshotError::DiskChanged { index, path: path.to_owned(), what };
    let now = DiskIdentity::of(path).map_err(|e| changed(format!("cannot read it: {e}")))?;
    match saved.identity.differs(&now) {
        Some(what) => Err(changed(what)),
        None => Ok(()),
    }
}

/// Compares the snapshot's CPU features with this host's KVM.
pub fn check_host_cpu(state: &super::SnapshotState) -> Result<(), SnapshotError> {
    let kvm = Kvm::new().map_err(|e| SnapshotError::Kvm("opening /dev/kvm", e))?;
    let host = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| SnapshotError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    for v in &state.vcpus {
        vcpu::check_cpu_features(&v.cpuid, &host)?;
    }
    Ok(())
}

/// KVM's paravirtual MSRs that hold a guest-physical address KVM itself
/// reads or writes from kernel context (kvmclock, steal time, async page
/// faults, PV EOI), some of it with page faults disabled, where a page
/// still waiting for the lazy loader cannot be served; bit 0 and the low
/// flag bits are not part of the address.
const KVM_PV_MSRS: &[u32] = &[0x11, 0x12, 0x4b56_4d00, 0x4b56_4d01, 0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04];

/// Loads the pages KVM touches on its own (see `KVM_PV_MSRS`) before any
/// vCPU runs, so that with lazy loading they are present by then.
pub fn prefault_kvm_pages(mem: &crate::memory::GuestMemory, state: &super::SnapshotState) {
    use vm_memory::{Bytes, GuestAddress};
    for v in &state.vcpus {
        for &(index, value) in &v.msrs {
            if KVM_PV_MSRS.contains(&index) && value & 1 != 0 {
                let gpa = value & !0x3f;
                let mut b = [0u8; 1];
                // Reading is enough: the fault brings the page in. An
                // address outside RAM is the guest's problem, not ours.
                let _ = mem.read_slice(&mut b, GuestAddress(gpa));
            }
        }
    }
}

/// How guest memory was filled.
pub struct MemoryLoad {
    pub eager_bytes: u64,
    pub lazy: Option<crate::lazy_memory::LazyLoader>,
    pub why_eager: Option<String>,
}

/// Opens the chain's memory files as layers (base first).
pub fn layers(chain: &[Loaded]) -> Result<Vec<Layer>, SnapshotError> {
    chain
        .iter()
        .map(|l| {
            let p = l.dir.join(format::MEMORY_FILE);
            let file = std::fs::File::open(&p).map_err(|e| SnapshotError::Io(format!("opening {}", p.display()), e))?;
            Ok(Layer { file, pages: l.state.memory.pages.clone() })
        })
        .collect()
}

/// Fills guest RAM from the chain: lazily (userfaultfd, pages arrive as
/// the guest touches them while a background thread fetches the rest)
/// where the host allows it, else by reading the data now.
///
/// `DVISOR_RESTORE_EAGER=1` forces the eager path (the benchmark's
/// baseline, and a way out should userfaultfd misbehave on some host).
pub fn load_memory(ram: &GuestRam, chain: &[Loaded]) -> Result<MemoryLoad, SnapshotError> {
    let regions = lazy_memory::regions_of(&ram.memory);
    let to_lazy = |ls: Vec<Layer>| -> Vec<lazy_memory::Layer> {
        ls.into_iter().map(|l| lazy_memory::Layer { file: l.file, pages: l.pages.map(|p| p.words) }).collect()
    };
    let fail = |e: lazy_memory::LazyError| SnapshotError::Invalid(format!("loading the snapshot's memory: {e}"));
    let why_eager = if std::env::var_os("DVISOR_RESTORE_EAGER").is_some_and(|v| v == "1") {
        "DVISOR_RESTORE_EAGER=1".to_string()
    } else {
        match lazy_memory::LazyLoader::start(&regions, to_lazy(layers(chain)?)) {
            Ok(l) => return Ok(MemoryLoad { eager_bytes: 0, lazy: Some(l), why_eager: None }),
            Err(e) if e.is_unavailable() => {
                tracing::warn!("restoring guest memory eagerly: {e}");
                e.to_string()
            }
            Err(e) => return Err(fail(e)),
        }
    };
    let stats = lazy_memory::load_eager(&regions, &to_lazy(layers(chain)?)).map_err(fail)?;
    Ok(MemoryLoad { eager_bytes: stats.bytes, lazy: None, why_eager: Some(why_eager) })
}
