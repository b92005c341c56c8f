//! Bounds-checked little-endian reads from untrusted bytes: every read is an
//! `Option`, so a truncated or garbled image gives `None`, never a panic.

pub fn slice(data: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    data.get(start..end)
}

pub fn u8_at(data: &[u8], off: u64) -> Option<u8> {
    data.get(usize::try_from(off).ok()?).copied()
}

pub fn u16_at(data: &[u8], off: u64) -> Option<u16> {
    Some(u16::from_le_bytes(slice(data, off, 2)?.try_into().ok()?))
}

pub fn u32_at(data: &[u8], off: u64) -> Option<u32> {
    Some(u32::from_le_bytes(slice(data, off, 4)?.try_into().ok()?))
}

pub fn u64_at(data: &[u8], off: u64) -> Option<u64> {
    Some(u64::from_le_bytes(slice(data, off, 8)?.try_into().ok()?))
}

/// The NUL-terminated string at `off`, at most `max` bytes before the NUL.
pub fn cstr_at(data: &[u8], off: u64, max: usize) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let rest = data.get(start..)?;
    let window = &rest[..rest.len().min(max.saturating_add(1))];
    let end = window.iter().position(|&b| b == 0)?;
    Some(&window[..end])
}

pub fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
