//! The jump written at a patched function's entry.
//!
//! - `e9 rel32` (5 bytes) when the patch function is within ±2 GiB of the
//!   end of the jump instruction;
//! - else `ff 25 00 00 00 00` + the 8-byte absolute address (14 bytes):
//!   `jmp *0(%rip)` reading the address stored right after it.

/// Length of `jmp rel32`.
pub const JMP_REL32_LEN: usize = 5;
/// Length of `jmp *0(%rip)` + 8-byte address.
pub const JMP_ABS64_LEN: usize = 14;

/// The displacement of a 5-byte `jmp rel32` at `from` to `to`, if in range.
pub fn rel32(from: u64, to: u64) -> Option<i32> {
    let next = i128::from(from) + JMP_REL32_LEN as i128;
    i32::try_from(i128::from(to) - next).ok()
}

/// How many bytes the jump from `from` to `to` takes (5 or 14).
pub fn jump_len(from: u64, to: u64) -> usize {
    if rel32(from, to).is_some() {
        JMP_REL32_LEN
    } else {
        JMP_ABS64_LEN
    }
}

/// The machine code of a jump placed at `from` to `to`.
pub fn jump_bytes(from: u64, to: u64) -> Vec<u8> {
    match rel32(from, to) {
        Some(d) => {
            let mut v = vec![0xe9];
            v.extend_from_slice(&d.to_le_bytes());
            v
        }
        None => {
            let mut v = vec![0xff, 0x25, 0, 0, 0, 0];
            v.extend_from_slice(&to.to_le_bytes());
            v
        }
    }
}

/// Whether a jump of `jump_len` bytes fits in a function of `target_size`
/// bytes (from its ELF symbol), so it overwrites nothing after it.
pub fn fits(target_size: u64, jump_len: usize) -> bool {
    jump_len as u64 <= target_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_jumps_are_e9_rel32() {
        // get_message at 0x401850 to a patch at 0x10000000.
        assert_eq!(jump_bytes(0x401850, 0x1000_0000), vec![0xe9, 0xab, 0xe7, 0xbf, 0x0f]);
        assert_eq!(0x401850u64 + 5 + 0x0fbf_e7ab, 0x1000_0000);
        // Backwards.
        assert_eq!(jump_bytes(0x1000, 0x1000), vec![0xe9, 0xfb, 0xff, 0xff, 0xff]);
        assert_eq!(jump_len(0x401850, 0x1000_0000), JMP_REL32_LEN);
    }

    #[test]
    fn far_jumps_are_absolute() {
        let b = jump_bytes(0x401850, 0x7f00_0000_0000);
        assert_eq!(b, vec![0xff, 0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 0, 0]);
        assert_eq!(b.len(), JMP_ABS64_LEN);
        assert_eq!(jump_len(0x7f00_0000_0000, 0x401850), JMP_ABS64_LEN);
    }

    #[test]
    fn range_edges() {
        let from = 0x1_0000_0000u64;
        let next = from + 5;
        assert_eq!(rel32(from, next + i32::MAX as u64), Some(i32::MAX));
        assert_eq!(rel32(from, next + i32::MAX as u64 + 1), None);
        assert_eq!(rel32(from, next - 0x8000_0000), Some(i32::MIN));
        assert_eq!(rel32(from, next - 0x8000_0001), None);
        assert_eq!(jump_bytes(from, next + i32::MAX as u64).len(), 5);
        assert_eq!(jump_bytes(from, next + i32::MAX as u64 + 1).len(), 14);
        // Extremes of the address space do not overflow.
        assert_eq!(jump_len(u64::MAX, 0), JMP_ABS64_LEN);
        assert_eq!(jump_len(0, u64::MAX), JMP_ABS64_LEN);
        assert_eq!(jump_len(u64::MAX - 4, u64::MAX), JMP_REL32_LEN);
    }

    #[test]
    fn fits_checks_the_function_size() {
        // get_message is 6 bytes in the demo service, reply_counter 12.
        assert!(fits(6, JMP_REL32_LEN));
        assert!(!fits(6, JMP_ABS64_LEN));
        assert!(!fits(12, JMP_ABS64_LEN));
        assert!(fits(14, JMP_ABS64_LEN));
        assert!(!fits(0, JMP_REL32_LEN));
    }
}
