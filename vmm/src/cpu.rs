//! vCPU configuration: CPUID, FPU, local APIC and the 64-bit boot state.
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId};
use kvm_ioctls::VcpuFd;

use crate::boot::{self, BootEntry};
use crate::error::VmmError;
use crate::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const CPUID_HYPERVISOR: u32 = 1 << 31;

/// Gives each vCPU its own APIC ID in the leaves that report one.
pub fn cpuid_for(base: &CpuId, vcpu_id: u32, vcpus: u32) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (vcpu_id << 24) | (vcpus.min(255) << 16);
                e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                e.ecx |= CPUID_HYPERVISOR;
            }
            0xb | 0x1f => e.edx = vcpu_id,
            _ => {}
        }
    }
    cpuid
}

pub fn configure_common(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), VmmError> {
    vcpu.set_cpuid2(cpuid).map_err(|e| VmmError::Kvm("KVM_SET_CPUID2", e))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| VmmError::Kvm("KVM_SET_FPU", e))?;
    set_lint(vcpu)
}

/// LINT0 as ExtINT and LINT1 as NMI, the wiring of a PC's boot CPU.
fn set_lint(vcpu: &VcpuFd) -> Result<(), VmmError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DM_EXTINT: u32 = 0x7 << 8;
    const DM_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(|e| VmmError::Kvm("KVM_GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, DM_EXTINT), (APIC_LVT1, DM_NMI)] {
        let raw = &mut lapic.regs[reg..reg + 4];
        let mut v = u32::from_le_bytes([raw[0] as u8, raw[1] as u8, raw[2] as u8, raw[3] as u8]);
        v = (v & !0x700) | mode;
        for (d, s) in raw.iter_mut().zip(v.to_le_bytes()) {
            *d = s as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|e| VmmError::Kvm("KVM_SET_LAPIC", e))
}

/// Puts the boot CPU in long mode at the kernel's 64-bit entry point.
pub fn configure_boot_cpu(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), VmmError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: entry.zero_page,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| VmmError::Kvm("KVM_SET_REGS", e))?;

    let mut sregs = vcpu.get_sregs().map_err(|e| VmmError::Kvm("KVM_GET_SREGS", e))?;
    let code = segment(boot::GDT_CODE, boot::GDT[boot::GDT_CODE as usize]);
    let data = segment(boot::GDT_DATA, boot::GDT[boot::GDT_DATA as usize]);
    let tss = segment(boot::GDT_TSS, boot::GDT[boot::GDT_TSS as usize]);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&boot::GDT) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(|e| VmmError::Kvm("KVM_SET_SREGS", e))
}

/// A KVM segment from a GDT descriptor.
fn segment(index: u16, desc: u64) -> kvm_segment {
    let base = ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000);
    let mut limit = (desc & 0xffff) | ((desc >> 32) & 0xf_0000);
    let g = (desc >> 55) & 1;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g: g as u8,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// A one-screen register dump for fatal-exit reports.
pub fn dump_registers(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    match vcpu.get_regs() {
        Ok(r) => out.push_str(&format!(
            "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
             rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
             rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
             r8 ={:#018x} r9 ={:#018x} r10={:#018x} r11={:#018x}\n\
             r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9,
            r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        )),
        Err(e) => out.push_str(&format!("(registers unavailable: {e})\n")),
    }
    match vcpu.get_sregs() {
        Ok(s) => out.push_str(&format!(
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (l={} dpl={})",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.l, s.cs.dpl
        )),
        Err(e) => out.push_str(&format!("(special registers unavailable: {e})")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_the_boot_gdt() {
        let cs = segment(1, boot::GDT[1]);
        assert_eq!((cs.selector, cs.l, cs.present, cs.type_, cs.limit), (8, 1, 1, 0xb, 0xffff_ffff));
        let ds = segment(2, boot::GDT[2]);
        assert_eq!((ds.db, ds.l, ds.type_), (1, 0, 0x3));
    }
}
