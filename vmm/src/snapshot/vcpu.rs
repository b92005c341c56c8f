//! One vCPU's complete architectural state, as KVM lets a VMM save and
//! restore it.
//!
//! What is saved: general and special registers, XSAVE (FPU, SSE, AVX...),
//! XCR0, every MSR in KVM's `KVM_GET_MSR_INDEX_LIST` that this vCPU can
//! read (the TSC, kvmclock's and the other paravirtual MSRs included),
//! the LAPIC, pending exceptions/interrupts/NMIs (`KVM_GET_VCPU_EVENTS`),
//! the MP state, the debug registers, the CPUID the vCPU was given and
//! its TSC frequency. Nested-virtualization state is not saved: D-Visor
//! does not offer VMX/SVM to its guests.
//!
//! Order on restore matters and follows what KVM expects: CPUID first (it
//! decides which MSRs and XSAVE components exist), then MP state,
//! registers, XSAVE, XCRs, debug registers, LAPIC, MSRs (after the LAPIC:
//! writing the LAPIC resets the TSC-deadline timer, which its MSR then
//! re-arms) and the pending events last.
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Most MSRs a vCPU state may hold (KVM lists about a hundred).
pub const MAX_MSRS: usize = 1024;
/// Most CPUID leaves (KVM_MAX_CPUID_ENTRIES).
pub const MAX_CPUID: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// Everything about one vCPU. The KVM structs serialize as their raw bytes
/// (kvm-bindings' `serde` feature), so the layout is KVM's own ABI.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: Option<u32>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The 4 KiB legacy XSAVE area (`kvm_xsave.region`).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// (index, value) of every MSR that could be read.
    pub msrs: Vec<(u32, u64)>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs to save: KVM's list of MSRs a VMM should save and restore
/// (`msrs_to_save` and `emulated_msrs` in the kernel's x86.c).
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm.get_msr_index_list().map_err(|e| SnapshotError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    Ok(list.as_slice().to_vec())
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm(what, e)
}

/// Reads every MSR of `indices` this vCPU can read. KVM_GET_MSRS stops at
/// the first MSR it refuses (some listed MSRs exist only with certain CPU
/// features), so a refused one is skipped and the rest read again.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(256)];
        let entries: Vec<kvm_msr_entry> = chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| SnapshotError::Invalid(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Skip the one that stopped the batch (if any).
        let consumed = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a stopped vCPU. Runs on the vCPU's own thread
    /// (vCPU ioctls block while it is in KVM_RUN).
    pub fn save(id: u32, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
        let cpuid = fd.get_cpuid2(MAX_CPUID).map_err(kvm("KVM_GET_CPUID2"))?;
        // The xsave area of KVM_GET_XSAVE is 4 KiB; a guest using larger
        // components (AMX) needs KVM_GET_XSAVE2, which we do not offer:
        // refuse rather than save a truncated FPU state.
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            tsc_khz: fd.get_tsc_khz().ok(),
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?.region.to_vec(),
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Checks bounds a hostile state file could break before any of it
    /// reaches KVM.
    pub fn check(&self) -> Result<(), SnapshotError> {
        if self.cpuid.is_empty() || self.cpuid.len() > MAX_CPUID {
            return Err(SnapshotError::Invalid(format!("vCPU {}: {} CPUID leaves", self.id, self.cpuid.len())));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(SnapshotError::Invalid(format!("vCPU {}: {} MSRs (at most {MAX_MSRS})", self.id, self.msrs.len())));
        }
        Ok(())
    }

    /// The CPUID to give the restored vCPU (before anything else).
    pub fn cpuid(&self) -> Result<CpuId, SnapshotError> {
        CpuId::from_entries(&self.cpuid).map_err(|e| SnapshotError::Invalid(format!("vCPU {} CPUID: {e:?}", self.id)))
    }

    /// Loads the state into a fresh vCPU that has not run yet.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        self.check()?;
        fd.set_cpuid2(&self.cpuid()?).map_err(kvm("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            // Same frequency as the host's (the usual case): nothing to
            // scale. Otherwise ask KVM to scale the guest's TSC, which
            // needs TSC scaling in hardware.
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(|e| SnapshotError::TscFrequency { khz, error: e })?;
            }
        }
        fd.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(SnapshotError::Invalid(format!("vCPU {}: XSAVE area of {} words", self.id, self.xsave.len())));
        }
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: a plain kvm_xsave of KVM_GET_XSAVE's 4 KiB size; we never
        // enabled KVM_CAP_XSAVE2, so KVM reads exactly that much.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> =
            self.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        for chunk in entries.chunks(256) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| SnapshotError::Invalid(format!("MSRs: {e:?}")))?;
            let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if n < chunk.len() {
                return Err(SnapshotError::MsrRefused { vcpu: self.id, index: chunk[n].index });
            }
        }
        fd.set_vcpu_events(&self.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// CPUID leaves whose bits say which instructions and state a guest may
/// use: (leaf, subleaf, register) where a feature the snapshot's vCPU had
/// must also be offered by this host's KVM.
const FEATURE_WORDS: &[(u32, u32, Reg, &str)] = &[
    (1, 0, Reg::Ecx, "CPUID.1:ECX"),
    (1, 0, Reg::Edx, "CPUID.1:EDX"),
    (7, 0, Reg::Ebx, "CPUID.7.0:EBX"),
    (7, 0, Reg::Ecx, "CPUID.7.0:ECX"),
    (7, 0, Reg::Edx, "CPUID.7.0:EDX"),
    (0xd, 1, Reg::Eax, "CPUID.0xD.1:EAX"),
    (0x8000_0001, 0, Reg::Ecx, "CPUID.0x80000001:ECX"),
    (0x8000_0001, 0, Reg::Edx, "CPUID.0x80000001:EDX"),
];

/// Bits that are not features of the host: the hypervisor bit and HTT,
/// which we set ourselves (cpu.rs), and the bits KVM derives from the
/// guest's own control registers, OSXSAVE (CR4.OSXSAVE) and OSPKE
/// (CR4.PKE), which the restored CR4 sets again.
fn own_bits(leaf: u32, r: Reg) -> u32 {
    match (leaf, r) {
        (1, Reg::Ecx) => (1 << 31) | (1 << 27),
        (1, Reg::Edx) => 1 << 28,
        (7, Reg::Ecx) => 1 << 4,
        _ => 0,
    }
}

#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

fn reg(e: &kvm_cpuid_entry2, r: Reg) -> u32 {
    match r {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| e.function == leaf && (e.index == sub || (sub == 0 && e.index == 0)))
}

/// Refuses a snapshot whose guest was given CPU features this host's KVM
/// does not offer: the guest kernel chose code paths (AVX-512, ...) at its
/// boot and would fault on the first such instruction.
pub fn check_cpu_features(saved: &[kvm_cpuid_entry2], host: &CpuId) -> Result<(), SnapshotError> {
    let host = host.as_slice();
    let mut missing = Vec::new();
    for &(leaf, sub, r, name) in FEATURE_WORDS {
        let Some(s) = find(saved, leaf, sub) else { continue };
        let have = find(host, leaf, sub).map(|e| reg(e, r)).unwrap_or(0);
        let lacking = reg(s, r) & !have & !own_bits(leaf, r);
        if lacking != 0 {
            missing.push(format!("{name} bits {lacking:#010x}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::CpuFeatures(missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ecx, edx, ..Default::default() }
    }

    #[test]
    fn cpu_features_missing_on_the_host_are_named() {
        let host = CpuId::from_entries(&[leaf(1, 0, 0b0110, 0xff)]).unwrap();
        let ok = [leaf(1, 0, 0b0100 | (1 << 31), 0x0f | (1 << 28))];
        assert!(check_cpu_features(&ok, &host).is_ok());
        let bad = [leaf(1, 0, 0b1100, 0)];
        let e = check_cpu_features(&bad, &host).unwrap_err().to_string();
        assert!(e.contains("CPUID.1:ECX bits 0x00000008"), "{e}");
    }
}
