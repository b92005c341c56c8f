//! Between KVM's register structs and the protocol's.
use kvm_bindings::{kvm_dtable, kvm_guest_debug, kvm_regs, kvm_segment, kvm_sregs};
use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP};

use super::protocol::{
    ApiError, DescriptorTable, ErrorCode, HwBreakpoint, HwBreakpointKind, Regs, Segment, Sregs, SregsUpdate,
};

macro_rules! copy_fields {
    ($from:expr, $to:ident, $($f:ident),*) => { $to { $($f: $from.$f,)* } };
}

pub fn regs_from_kvm(r: &kvm_regs) -> Regs {
    copy_fields!(r, Regs, rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags)
}

pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    copy_fields!(r, kvm_regs, rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags)
}

fn segment(s: &kvm_segment) -> Segment {
    copy_fields!(s, Segment, base, limit, selector, type_, present, dpl, db, s, l, g, avl, unusable)
}

fn table(t: &kvm_dtable) -> DescriptorTable {
    DescriptorTable { base: t.base, limit: t.limit }
}

pub fn sregs_from_kvm(s: &kvm_sregs) -> Sregs {
    Sregs {
        cs: segment(&s.cs),
        ds: segment(&s.ds),
        es: segment(&s.es),
        fs: segment(&s.fs),
        gs: segment(&s.gs),
        ss: segment(&s.ss),
        tr: segment(&s.tr),
        ldt: segment(&s.ldt),
        gdt: table(&s.gdt),
        idt: table(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

pub fn apply_sregs(s: &mut kvm_sregs, u: &SregsUpdate) {
    for (field, value) in [
        (&mut s.cr0, u.cr0),
        (&mut s.cr2, u.cr2),
        (&mut s.cr3, u.cr3),
        (&mut s.cr4, u.cr4),
        (&mut s.cr8, u.cr8),
        (&mut s.efer, u.efer),
    ] {
        if let Some(v) = value {
            *field = v;
        }
    }
}

/// Builds KVM_SET_GUEST_DEBUG's argument: DR0-3 hold the addresses, DR7
/// enables them locally with their kind and length (Intel SDM vol. 3,
/// 18.2.4). No breakpoints and no single step turn debugging off.
pub fn guest_debug(single_step: bool, sw: bool, hw: &[HwBreakpoint]) -> Result<kvm_guest_debug, ApiError> {
    if hw.len() > 4 {
        return Err(ApiError::new(
            ErrorCode::OutOfRange,
            format!("{} hardware breakpoints asked for; x86 has 4 debug address registers", hw.len()),
        ));
    }
    let mut dbg = kvm_guest_debug::default();
    let mut dr7 = 0u64;
    for (i, bp) in hw.iter().enumerate() {
        let rw: u64 = match bp.kind {
            HwBreakpointKind::Execute => 0b00,
            HwBreakpointKind::Write => 0b01,
            HwBreakpointKind::ReadWrite => 0b11,
        };
        let len: u64 = match (bp.kind, bp.len) {
            (HwBreakpointKind::Execute, _) | (_, 1) => 0b00,
            (_, 2) => 0b01,
            (_, 8) => 0b10,
            (_, 4) => 0b11,
            (_, n) => {
                return Err(ApiError::new(ErrorCode::OutOfRange, format!("breakpoint length {n}: use 1, 2, 4 or 8")))
            }
        };
        if bp.kind != HwBreakpointKind::Execute && bp.addr % u64::from(bp.len) != 0 {
            return Err(ApiError::new(
                ErrorCode::OutOfRange,
                format!("data breakpoint at {:#x} is not aligned to its length {}", bp.addr, bp.len),
            ));
        }
        dbg.arch.debugreg[i] = bp.addr;
        dr7 |= 1 << (i * 2);
        dr7 |= (rw | (len << 2)) << (16 + i * 4);
    }
    if dr7 != 0 {
        // Bit 10 is reserved and reads as 1; GE (bit 9) as QEMU's gdbstub
        // sets it for exact breakpoints.
        dr7 |= 0x600;
    }
    dbg.arch.debugreg[7] = dr7;
    if single_step {
        dbg.control |= KVM_GUESTDBG_SINGLESTEP;
    }
    if sw {
        dbg.control |= KVM_GUESTDBG_USE_SW_BP;
    }
    if !hw.is_empty() {
        dbg.control |= KVM_GUESTDBG_USE_HW_BP;
    }
    if dbg.control != 0 {
        dbg.control |= KVM_GUESTDBG_ENABLE;
    }
    Ok(dbg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr7_encodes_kind_and_length() {
        let bps = [
            HwBreakpoint { addr: 0x1000, kind: HwBreakpointKind::Execute, len: 1 },
            HwBreakpoint { addr: 0x2000, kind: HwBreakpointKind::Write, len: 8 },
        ];
        let d = guest_debug(false, false, &bps).unwrap();
        assert_eq!(d.arch.debugreg[0], 0x1000);
        assert_eq!(d.arch.debugreg[1], 0x2000);
        // L0, L1; DR1: RW=01, LEN=10 at bits 20..24.
        assert_eq!(d.arch.debugreg[7], 0x600 | 0b0101 | (0b1001 << 20));
        assert_eq!(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(guest_debug(false, false, &[]).unwrap().control, 0);
        assert!(guest_debug(false, false, &[bps[1]; 5]).is_err());
        let odd = HwBreakpoint { addr: 0x2001, kind: HwBreakpointKind::Write, len: 4 };
        assert!(guest_debug(false, false, &[odd]).is_err());
    }

    #[test]
    fn regs_round_trip() {
        let r = kvm_regs { rax: 1, r15: 2, rip: 3, rflags: 0x202, ..Default::default() };
        let back = regs_to_kvm(&regs_from_kvm(&r));
        assert_eq!((back.rax, back.r15, back.rip, back.rflags), (1, 2, 3, 0x202));
    }
}
